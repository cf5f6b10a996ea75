#!/usr/bin/env bash
# Packet loss across a margay node restart: a 3-node lab (`margay lab`, full mesh, or --reflector), one pod
# per node, ping at 1000 packets/s from a pod on n1 to a pod on n2 and back (10 s each, a fixed count so ping
# waits for the last replies), n2's daemon restarted (SIGTERM + start, `margay lab restart-node`) one second
# in. Prints ping's own summaries; the lab is removed at the end (also on failure).
#
# Usage: scripts/lab-restart-loss.sh [--reflector] [--runs N]
set -euo pipefail
cd "$(dirname "$0")/.."
mode=()
runs=1
while [ $# -gt 0 ]; do
  case "$1" in
    --reflector) mode=(--reflector) ;;
    --runs) runs="$2"; shift ;;
    *) echo "usage: $0 [--reflector] [--runs N]" >&2; exit 2 ;;
  esac
  shift
done
if [ "$(id -u)" != 0 ]; then echo "lab-restart-loss.sh: run as root (network namespaces)" >&2; exit 1; fi
cargo build --bins -q
m=target/debug/margay
name=mgloss
state=/run/margay-lab/$name
"$m" lab down --name "$name" >/dev/null 2>&1 || true
trap '"$m" lab down --name "$name" >/dev/null 2>&1 || true' EXIT
"$m" lab up --nodes 3 --pods 1 --name "$name" "${mode[@]}" >/dev/null
pod() { python3 -c "import json,sys; p=[p for p in json.load(open('$state/lab.json'))['pods'] if p['node']=='$1'][0]; print(p['$2'])"; }
p1=$(pod "$name-n1" name); ip1=$(pod "$name-n1" ip)
p2=$(pod "$name-n2" name); ip2=$(pod "$name-n2" ip)
echo "lab ${mode[*]:-(full mesh)}: $p1 ($ip1) <-> $p2 ($ip2), restarting $name-n2"
for r in $(seq 1 "$runs"); do
  ip netns exec "$p1" ping -q -i 0.001 -c 10000 -W 1 "$ip2" >"$state/fwd.txt" 2>&1 &
  fwd=$!
  ip netns exec "$p2" ping -q -i 0.001 -c 10000 -W 1 "$ip1" >"$state/back.txt" 2>&1 &
  back=$!
  sleep 1
  "$m" lab restart-node "$name-n2" --name "$name" >/dev/null
  wait "$fwd" "$back" || true
  echo "run $r: n1 -> n2: $(grep 'packets transmitted' "$state/fwd.txt")"
  echo "run $r: n2 -> n1: $(grep 'packets transmitted' "$state/back.txt")"
  sleep 3
done
