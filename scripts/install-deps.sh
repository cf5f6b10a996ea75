#!/usr/bin/env bash
# Installs everything margay's build, tests, benchmarks and lab need on a machine that has only Debian's (or
# Ubuntu's) base system and a Rust toolchain. Run as root. scripts/fresh-check.sh proves the list complete by
# running this script and a cold build inside a fresh debootstrap root.
set -euo pipefail
die() { echo "install-deps.sh: $*" >&2; exit 1; }
[ "$(id -u)" = 0 ] || die "run as root (it installs packages with apt-get); prefix sudo if you are not root"
command -v apt-get >/dev/null 2>&1 || die "needs a Debian or Ubuntu machine (apt-get not found)"

# The Rust toolchain comes first: nothing here can install it, and a missing one should not cost a download.
min_rust=1.88  # the highest rust-version among Cargo.lock's crates (tonic, proptest)
if ! command -v cargo >/dev/null 2>&1 || ! command -v rustc >/dev/null 2>&1; then
  die "no Rust toolchain on PATH: install Rust $min_rust or newer with rustup (https://rustup.rs), then open a
new shell or run 'source \$HOME/.cargo/env', and run this again"
fi
have_rust=$(rustc --version | awk '{print $2}')
if [ "$(printf '%s\n%s\n' "$min_rust" "$have_rust" | sort -V | head -1)" != "$min_rust" ]; then
  die "Rust $have_rust is too old: margay needs $min_rust or newer ('rustup update stable')"
fi

export DEBIAN_FRONTEND=noninteractive
# Build: a C toolchain for the linker and the crates that compile C (ring, libfuzzer-sys), protoc and the
# well-known .proto files (libprotobuf-dev: only a Recommends of protobuf-compiler) for etcd-client's build
# script, CA certificates for cargo's downloads from crates.io.
pkgs=(gcc g++ libc6-dev make ca-certificates protobuf-compiler libprotobuf-dev)
# Tests, lab and benchmarks: real etcd, BGP peers nobody here wrote, the kernel's tools, a CNI runtime.
pkgs+=(etcd-server etcd-client bird2 gobgpd frr containernetworking-plugins podman busybox-static
       nftables iptables iproute2 iputils-ping procps psmisc util-linux openssl binutils)
# Docker hosts (tests/it/docker_plugin.rs): Debian's dockerd, started by the test inside lab namespaces.
pkgs+=(docker.io)
# Pod-to-pod throughput benchmark (benches/pod_paths.rs).
pkgs+=(iperf3)
# Manifest checks (pip into a venv) and the container image test (a Debian root made with debootstrap).
pkgs+=(python3 python3-pip python3-venv debootstrap)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps.sh: installing ${missing[*]}"
  apt-get update -qq || die "apt-get update failed: check the network and /etc/apt/sources.list*"
  # No package may start its service while installing: a dockerd in the host's namespace would create
  # docker0 and iptables rules there. policy-rc.d 101 = "not allowed" (Debian's invoke-rc.d contract).
  policy=/usr/sbin/policy-rc.d
  own_policy=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && own_policy=1
  fi
  rc=0
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null || rc=$?
  if [ -n "$own_policy" ]; then rm -f "$policy"; fi
  [ $rc -eq 0 ] || die "apt-get install failed for: ${missing[*]}"
fi
# The packages install services; margay's tests start their own copies in namespaces, never these.
if command -v systemctl >/dev/null 2>&1; then
  for s in frr bird etcd gobgpd docker.socket docker containerd; do systemctl disable --now "$s" >/dev/null 2>&1 || true; done
fi
