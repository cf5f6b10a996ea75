#!/usr/bin/env bash
# Proves that README's set-up works on a machine that is not this one: builds a minimal Debian 12 root with
# debootstrap in a scratch folder, bind-mounts this machine's Rust toolchain and this checkout read-only, and
# inside it (chroot) runs scripts/install-deps.sh and `cargo build --locked --all-targets`. A package that the
# build needs but install-deps.sh does not install fails the check. Run by hand (as root; it takes 15-30
# minutes: debootstrap, the packages, a cold build of every crate), not by CI.
#
# Usage: scripts/fresh-check.sh [SCRATCH_DIR]      (default: a new folder under /var/tmp)
#   KEEP=1        keep the scratch root afterwards (default: delete it)
#   SUITE=...     Debian suite (default bookworm);  MIRROR=... Debian mirror (default: the one apt uses here)
#   TESTS="..."   after the build, also run these cargo test arguments inside the root (e.g. "--lib")
set -euo pipefail
src=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" != 0 ]; then
  echo "fresh-check.sh: run as root (debootstrap, chroot and mounts need it)" >&2
  exit 1
fi
if ! command -v rustc >/dev/null 2>&1; then
  echo "fresh-check.sh: no Rust toolchain on PATH here; the check lends this machine's toolchain to the root" >&2
  exit 1
fi
sysroot=$(rustc --print sysroot)
suite="${SUITE:-bookworm}"
mirror="${MIRROR:-$(sed -n 's/^URIs: *\(http[^ ]*debian\)$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)}"
mirror="${mirror:-http://deb.debian.org/debian}"
root="${1:-$(mktemp -d /var/tmp/margay-fresh.XXXXXX)}"
mkdir -p "$root"
start=$(date +%s)
log() { echo "fresh-check.sh [$(( $(date +%s) - start ))s]: $*"; }

mounts=()
cleanup() {
  local rc=$? m i
  for (( i=${#mounts[@]}-1; i>=0; i-- )); do
    m=${mounts[$i]}
    mountpoint -q "$m" && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done
  # Never delete while anything is still mounted inside (the source is bind-mounted there).
  if [ "${KEEP:-0}" != 1 ] && ! grep -q " $root/" /proc/self/mounts; then
    rm -rf "$root"
  else
    log "kept $root"
  fi
  if [ $rc -eq 0 ]; then log "PASS"; else log "FAIL (exit $rc)"; fi
  exit $rc
}
trap cleanup EXIT
bind() {  # bind SRC DST [ro]
  mkdir -p "$2"
  mount --bind "$1" "$2"
  mounts+=("$2")
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

if ! command -v debootstrap >/dev/null 2>&1; then
  log "installing debootstrap"
  apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi
if [ ! -x "$root/usr/bin/apt-get" ]; then
  log "debootstrap --variant=minbase $suite from $mirror into $root"
  debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$root.debootstrap.log" 2>&1 || {
    tail -20 "$root.debootstrap.log" >&2; exit 1; }
  rm -f "$root.debootstrap.log"
fi
# Packages' maintainer scripts must not start services inside the root.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod +x "$root/usr/sbin/policy-rc.d"
# This machine's network settings, which any machine here has: name servers, and the local CA certificates
# (an intercepting proxy's) that ca-certificates adds to the bundle cargo and apt use when it is installed.
cp /etc/resolv.conf "$root/etc/resolv.conf"
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  mkdir -p "$root/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
fi
mkdir -p "$root/proc" "$root/dev" "$root/src" "$root/opt/rust" "$root/build"
mount -t proc proc "$root/proc"; mounts+=("$root/proc")
bind /dev "$root/dev"
bind /dev/pts "$root/dev/pts"
bind "$src" "$root/src" ro
bind "$sysroot" "$root/opt/rust" ro

log "packages in the base root: $(chroot "$root" dpkg-query -W -f='.\n' | wc -l)"
in_root() {
  local proxy=()
  for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY; do
    [ -n "${!v:-}" ] && proxy+=("$v=${!v}")
  done
  chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb CI=true "${proxy[@]}" \
    PATH=/opt/rust/bin:/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    CARGO_HOME=/root/.cargo CARGO_TARGET_DIR=/build/target LD_LIBRARY_PATH=/opt/rust/lib \
    /bin/bash -c "set -eo pipefail; cd /src && $1"
}
log "scripts/install-deps.sh (inside the root)"
in_root "scripts/install-deps.sh"
log "packages after install-deps.sh: $(chroot "$root" dpkg-query -W -f='.\n' | wc -l)"
log "cargo build --locked --all-targets (inside the root, cold)"
in_root "cargo build --locked --all-targets 2>&1 | grep -Ev '^ +(Compiling|Downloaded|Downloading) '"
if [ -n "${TESTS:-}" ]; then
  log "cargo test --locked $TESTS (inside the root)"
  in_root "cargo test --locked $TESTS"
fi
log "built: $(ls "$root/build/target/debug/margay" "$root/build/target/debug/margay-cni" | tr '\n' ' ')"
