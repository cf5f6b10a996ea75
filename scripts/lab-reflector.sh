#!/usr/bin/env bash
# Reflector demo: a margay route reflector between BIRD 2 and GoBGP, each in its
# own network namespace on one bridge. The full lab (margay node on several nodes, pods through margay-cni,
# pings across nodes) is scripts/lab.sh (`margay lab`).
#
#   netns mgx-sw: bridge mgxbr0 (10.77.0.0/24)
#     |-- mgx-rr     10.77.0.1  margay reflector, AS 64512, cluster id 10.77.0.1
#     |-- mgx-bird   10.77.0.2  BIRD 2, originates 192.0.2.0/24 and 198.51.100.0/24
#     `-- mgx-gobgp  10.77.0.3  GoBGP, originates 203.0.113.0/24
#
# Usage: scripts/lab-reflector.sh [up|status|down]   (default: up; up prints the status and leaves the lab running)
set -euo pipefail
cd "$(dirname "$0")/.."
cmd="${1:-up}"
state=/var/run/margay-lab-reflector
nss=(mgx-rr mgx-bird mgx-gobgp mgx-sw)

down() {
  for f in "$state"/*.pid; do
    [ -f "$f" ] || continue
    pid=$(cat "$f")
    kill "$pid" 2>/dev/null || true
  done
  sleep 0.5
  for ns in "${nss[@]}"; do
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$state"
}

status() {
  echo "== margay status (reflector in mgx-rr)"
  ip netns exec mgx-rr target/debug/margay status --endpoint 127.0.0.1:9190 || true
  echo
  echo "== BIRD (mgx-bird): routes it learned through the reflector"
  birdc -s "$state/bird.ctl" show route protocol reflector 2>/dev/null || true
  echo
  echo "== GoBGP (mgx-gobgp): its RIB"
  ip netns exec mgx-gobgp gobgp -u 127.0.0.1 -p 50151 global rib -a ipv4 2>/dev/null || true
}

wait_for() { # description, command...
  local what="$1"; shift
  for _ in $(seq 1 100); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.2
  done
  echo "lab: timed out waiting for $what" >&2
  return 1
}

case "$cmd" in
  down) down; echo "lab removed"; exit 0 ;;
  status) status; exit 0 ;;
  up) ;;
  *) echo "usage: $0 [up|status|down]" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then echo "lab-reflector.sh: run as root (network namespaces)" >&2; exit 1; fi
scripts/install-deps.sh
cargo build --bin margay
down
mkdir -p "$state"

ip netns add mgx-sw
ip -n mgx-sw link add mgxbr0 type bridge
ip -n mgx-sw link set mgxbr0 up
i=1
for ns in mgx-rr mgx-bird mgx-gobgp; do
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "mgx$i" netns "$ns" type veth peer "mgxp$i" netns mgx-sw
  ip -n mgx-sw link set "mgxp$i" master mgxbr0 up
  ip -n "$ns" link set "mgx$i" name eth0
  ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
  ip -n "$ns" link set eth0 up
  i=$((i + 1))
done

cat > "$state/margay.yaml" <<'EOF'
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
---
apiVersion: projectcalico.org/v3
kind: Node
metadata:
  name: rr
spec:
  bgp:
    ipv4Address: 10.77.0.1/24
    routeReflectorClusterID: 10.77.0.1
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: bird
spec:
  peerIP: 10.77.0.2
  asNumber: 64512
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata:
  name: gobgp
spec:
  peerIP: 10.77.0.3
  asNumber: 64512
EOF
ip netns exec mgx-rr target/debug/margay reflector --config "$state/margay.yaml" --node-name rr \
  --state-dir "$state/rr" --http-listen 127.0.0.1:9190 >"$state/margay.log" 2>&1 &
echo $! >"$state/margay.pid"

cat > "$state/bird.conf" <<'EOF'
router id 10.77.0.2;
protocol device { }
protocol direct { ipv4; interface "eth0"; }
protocol static { ipv4; route 192.0.2.0/24 blackhole; route 198.51.100.0/24 blackhole; }
protocol bgp reflector {
  local 10.77.0.2 as 64512;
  neighbor 10.77.0.1 as 64512;
  graceful restart on;
  ipv4 { import all; export where source = RTS_STATIC; };
}
EOF
ip netns exec mgx-bird bird -f -c "$state/bird.conf" -s "$state/bird.ctl" -P "$state/bird.pidfile" \
  >"$state/bird.log" 2>&1 &
echo $! >"$state/bird.pid"

cat > "$state/gobgp.toml" <<'EOF'
[global.config]
as = 64512
router-id = "10.77.0.3"
[[neighbors]]
[neighbors.config]
neighbor-address = "10.77.0.1"
peer-as = 64512
[[neighbors.afi-safis]]
[neighbors.afi-safis.config]
afi-safi-name = "ipv4-unicast"
EOF
ip netns exec mgx-gobgp gobgpd -f "$state/gobgp.toml" -t toml -l warn --api-hosts 127.0.0.1:50151 \
  --pprof-disable >"$state/gobgp.log" 2>&1 &
echo $! >"$state/gobgp.pid"
wait_for "GoBGP's API" ip netns exec mgx-gobgp gobgp -u 127.0.0.1 -p 50151 neighbor
ip netns exec mgx-gobgp gobgp -u 127.0.0.1 -p 50151 global rib add 203.0.113.0/24 -a ipv4 nexthop 10.77.0.3

wait_for "BIRD to learn GoBGP's route through margay" \
  sh -c "birdc -s '$state/bird.ctl' show route 203.0.113.0/24 | grep -q 203.0.113.0"
wait_for "GoBGP to learn BIRD's routes through margay" \
  sh -c "ip netns exec mgx-gobgp gobgp -u 127.0.0.1 -p 50151 global rib -a ipv4 198.51.100.0/24 | grep -q 198.51.100.0"
status
echo
echo "The lab stays up: 'scripts/lab-reflector.sh status' to look again, 'scripts/lab-reflector.sh down' to remove it."
echo "Logs and configs: $state"
