#!/usr/bin/env bash
# Installs everything margay's build, tests, benchmarks and lab need on a fresh Debian/Ubuntu machine (root).
set -euo pipefail
if [ "$(id -u)" != 0 ]; then echo "install-deps.sh: run as root (it uses apt-get)" >&2; exit 1; fi
export DEBIAN_FRONTEND=noninteractive
pkgs=(protobuf-compiler etcd-server etcd-client bird2 gobgpd frr containernetworking-plugins
      nftables iproute2 iputils-ping procps psmisc python3-pip openssl)
pkgs+=(g++)  # libFuzzer (C++) for scripts/fuzz.sh
pkgs+=(python3-venv binutils iptables podman busybox-static)  # manifest checks, nm, portmap, CNI runtime tests
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The packages install services; margay's tests start their own copies in namespaces, never these.
for s in frr bird etcd gobgpd; do systemctl disable --now "$s" >/dev/null 2>&1 || true; done
if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps.sh: cargo not found: install a Rust toolchain (rustup, 1.85 or newer)" >&2; exit 1
fi
