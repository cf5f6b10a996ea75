#!/usr/bin/env bash
# The local lab: N nodes in network namespaces on one bridge, etcd in its own namespace, `margay node run`
# in every node (full iBGP mesh), pods plumbed through the real margay-cni binary, and a cross-node ping
# matrix. Everything is `margay lab` (src/lab.rs); this script installs the prerequisites and builds first.
#
#   netns mgl-br: bridge br0 10.99.0.1/24
#     |-- mgl-etcd  10.99.0.2   etcd
#     |-- mgl-n1    10.99.0.11  margay node run   pods mgl-n1p1, mgl-n1p2 (10.244.x.y from n1's /26 block)
#     |-- mgl-n2    10.99.0.12  margay node run   pods mgl-n2p1, ...
#     `-- mgl-n3    10.99.0.13  margay node run   pods mgl-n3p1, ...
#
# With --reflector the mesh is off and every node peers only with `margay reflector` (reading the lab's etcd)
# in its own namespace mgl-rr (10.99.0.3).
#
# Usage: scripts/lab.sh [up|status|down] [margay lab flags, e.g. --nodes 4 --pods 3 --reflector]
#        (default: up; up prints the status and leaves the lab running; down also cleans up after a crash)
# The older reflector-only demo (margay reflector between BIRD 2 and GoBGP) is scripts/lab-reflector.sh; the
# loss across a node restart under a 1000 pps ping is scripts/lab-restart-loss.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-up}"
[ $# -gt 0 ] && shift
case "$cmd" in
  up|status|down) ;;
  *) echo "usage: $0 [up|status|down] [margay lab flags]" >&2; exit 2 ;;
esac
if [ "$(id -u)" != 0 ]; then echo "lab.sh: run as root (network namespaces)" >&2; exit 1; fi
if [ "$cmd" = up ]; then
  scripts/install-deps.sh
  cargo build --bins
fi
exec target/debug/margay lab "$cmd" "$@"
