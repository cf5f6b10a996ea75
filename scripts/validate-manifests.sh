#!/usr/bin/env bash
# Validates the deploy/ manifests offline:
#  - kubernetes-validate --strict against the Kubernetes schemas (default 1.30.0): unknown fields, wrong
#    types, missing required fields. It only WARNs (exit 0) on an unknown apiVersion/kind, so any WARN line
#    counts as a failure here.
#  - yamllint (relaxed, plus key-duplicates and a line length): kubernetes-validate lets duplicate keys pass.
# Both tools come from PyPI into a virtualenv under target/ (Debian 12's pip refuses system installs).
# Before trusting a pass, each tool is shown a known-bad document and must reject it.
set -euo pipefail
cd "$(dirname "$0")/.."
K8S_VERSION="${K8S_VERSION:-1.30.0}"
VENV="${MARGAY_MANIFEST_VENV:-target/manifest-venv}"
files=(deploy/daemonset.yaml deploy/route-reflector.yaml)

if [ ! -x "$VENV/bin/kubernetes-validate" ] || [ ! -x "$VENV/bin/yamllint" ]; then
  echo "validate-manifests: installing kubernetes-validate and yamllint into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check kubernetes-validate yamllint
fi
kv() { "$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "$@"; }
yl() {
  "$VENV/bin/yamllint" -f parsable \
    -d '{extends: relaxed, rules: {key-duplicates: enable, line-length: {max: 120}}}' "$@"
}

# kubernetes-validate: a failure, or any WARN, fails the file.
validate() {
  local out rc=0
  out=$(kv "$1" 2>&1) || rc=$?
  if [ "$rc" != 0 ] || grep -q 'WARN' <<<"$out"; then
    printf '%s\n' "$out"
    return 1
  fi
}

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cat >"$tmp/unknown-field.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: x
  namespce: typo
YAML
cat >"$tmp/unknown-kind.yaml" <<'YAML'
apiVersion: example.invalid/v1
kind: Nothing
metadata:
  name: x
YAML
cat >"$tmp/duplicate-key.yaml" <<'YAML'
apiVersion: v1
kind: ConfigMap
metadata:
  name: x
  name: y
YAML
for bad in unknown-field unknown-kind; do
  if validate "$tmp/$bad.yaml" >/dev/null 2>&1; then
    echo "validate-manifests: kubernetes-validate accepted a bad document ($bad): the check is broken" >&2
    exit 1
  fi
done
if yl "$tmp/duplicate-key.yaml" >/dev/null 2>&1; then
  echo "validate-manifests: yamllint accepted a duplicate key: the check is broken" >&2
  exit 1
fi

fail=0
for f in "${files[@]}"; do
  if validate "$f"; then echo "ok   kubernetes-validate $K8S_VERSION $f"; else echo "FAIL kubernetes-validate $f"; fail=1; fi
done
if yl "${files[@]}"; then echo "ok   yamllint ${files[*]}"; else echo "FAIL yamllint"; fail=1; fi
exit "$fail"
