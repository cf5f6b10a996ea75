//! BFD (RFC 5880/5881) between a margay node and real peers: BIRD 2 (`protocol bfd` + `bfd on`), FRR
//! (bfdd + `neighbor X bfd`), and another margay node over the mesh, all single hop (RFC 5881); and BIRD 2
//! one router away over multihop (RFC 5883, `bfd_multihop_with_bird_across_a_router`). Each test brings BFD Up on both
//! sides, cuts the peer's link inside the peer's own namespace, and checks that margay takes the BGP
//! session down and removes the peer's routes from the kernel long before the 240 s hold time; then the
//! link returns and BFD, BGP and the route come back. Timing figures belong to `benches/bfd.rs`; the
//! bounds here are hang guards far below the hold time.
//!
//! ```text
//!   netns <lab>-n1 (margay node, AS 64512)          netns <peer> (BIRD / FRR, AS 65001)
//!   eth0 10.99.0.11 ── br0 in <lab>-br ── eth0 10.99.0.200      announces 203.0.113.0/24
//!   BGPPeer "tor": peerIP 10.99.0.200, annotations margay.io/bfd: "true", 100ms x 3
//!   expect in n1: 203.0.113.0/24 via 10.99.0.200 proto 77; BFD Up both sides
//!   `ip -n <peer> link set eth0 down`  ->  route gone, BFD Down, BGP not Established (hold 240 s)
//!   `ip -n <peer> link set eth0 up`    ->  BFD Up, BGP Established, route back
//! ```

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common;
use common::bgp_peers::{have_bfdd, have_bird, have_frr, Bird, Frr};
use common::lab::{eventually, in_ns, lab_prerequisites, own_block, proto77, Lab, ETCD};
use common::{require, sh, unique, Netns};

const PEER_IP: &str = "10.99.0.200";
const ROUTE: &str = "203.0.113.0/24";
/// A hang guard, far below the 240 s hold time: only BFD can take the session down this fast.
const DETECT_GUARD: Duration = Duration::from_secs(30);
const RECOVER_GUARD: Duration = Duration::from_secs(120);

/// Put a v3 resource straight into the lab's etcd.
fn put(lab: &Lab, plural: &str, name: &str, json: &str) {
    let key = format!("/calico/resources/v3/projectcalico.org/{plural}/{name}");
    let ns = format!("{}-etcd", lab.name);
    let (ok, out) = in_ns(&ns, &["etcdctl", "--endpoints", ETCD, "put", &key, json]);
    assert!(ok, "etcdctl put {key}: {out}");
}

/// A namespace for the peer daemon on the lab's bridge at 10.99.0.200 (deleted on drop, its veth too).
fn peer_namespace(lab: &Lab, tag: &str) -> (Netns, String) {
    let ns = unique(tag);
    let guard = Netns::new(&[&ns]);
    let br = format!("{}-br", lab.name);
    let port = unique("bp");
    sh(&format!(
        "ip -n {br} link add {port} type veth peer name eth0 netns {ns}"
    ));
    sh(&format!("ip -n {br} link set {port} master br0 up"));
    sh(&format!("ip -n {ns} addr add {PEER_IP}/24 dev eth0"));
    sh(&format!("ip -n {ns} link set eth0 up"));
    (guard, ns)
}

fn tor_peer(lab: &Lab, asn: u32) {
    put(
        lab,
        "bgppeers",
        "tor",
        &format!(
            r#"{{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{{"name":"tor","annotations":{{"margay.io/bfd":"true","margay.io/bfd-min-rx":"100ms","margay.io/bfd-min-tx":"100ms","margay.io/bfd-multiplier":"3"}}}},"spec":{{"peerIP":"{PEER_IP}","asNumber":{asn}}}}}"#
        ),
    );
}

fn bfd_of(status: &Value, peer: &str) -> Value {
    status["bfd"]
        .as_array()
        .and_then(|a| a.iter().find(|b| b["peer"] == peer))
        .cloned()
        .unwrap_or(Value::Null)
}

fn bgp_state(status: &Value, peer: &str) -> String {
    status["peers"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["address"] == peer))
        .and_then(|p| p["fsmState"].as_str())
        .unwrap_or("")
        .to_string()
}

fn has_route(ns: &str, prefix: &str, via: &str) -> bool {
    proto77(ns)
        .iter()
        .any(|(p, gw)| p.to_string() == prefix && gw.map(|g| g.to_string()).as_deref() == Some(via))
}

/// Up on margay's side (state, negotiated 100 ms x 3), BGP Established, the route in the kernel.
fn assert_all_up(
    lab: &Lab,
    node: &str,
    peer: &str,
    (route, via): (&str, &str),
    peer_view: &dyn Fn() -> bool,
    diag: &dyn Fn() -> String,
) {
    let ok = eventually(RECOVER_GUARD, || {
        let Some(st) = lab.status(node) else {
            return false;
        };
        bfd_of(&st, peer)["state"] == "Up"
            && bgp_state(&st, peer) == "Established"
            && has_route(node, route, via)
            && peer_view()
    });
    assert!(
        ok,
        "BFD/BGP never all up with {peer}: {}\nroutes: {:?}\npeer: {}\n{}",
        lab.status(node).unwrap_or(Value::Null),
        proto77(node),
        diag(),
        lab.node_logs(node)
    );
}

/// Cut `ns`'s link; margay must see BFD Down and remove `route` (through `via`) from the kernel well
/// before the hold time. Returns how long the route took to go (printed, not asserted tightly).
fn cut_and_expect_withdrawal(
    lab: &Lab,
    node: &str,
    peer: &str,
    (route, via): (&str, &str),
    ns: &str,
) -> Duration {
    let t0 = Instant::now();
    sh(&format!("ip -n {ns} link set eth0 down"));
    let gone = eventually(DETECT_GUARD, || !has_route(node, route, via));
    let took = t0.elapsed();
    assert!(
        gone,
        "route {route} via {peer} still in the kernel {DETECT_GUARD:?} after the cut (hold time is 240 s): {:?}\n{}",
        proto77(node),
        lab.node_logs(node)
    );
    let st = lab.status(node).unwrap_or(Value::Null);
    let b = bfd_of(&st, peer);
    assert_ne!(b["state"], "Up", "BFD still Up after the cut: {st}");
    assert!(b["downCount"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert_ne!(bgp_state(&st, peer), "Established", "{st}");
    eprintln!("{node}: route via {peer} left the kernel {took:?} after the link cut");
    took
}

/// BIRD 2 as the peer at `local` (AS 65001, announcing ROUTE) of the margay node at `node_ip`, BFD at
/// 100 ms x 3: single hop (`interface "*"`) or multihop (RFC 5883: BIRD's `multihop` block and a
/// multihop BGP session).
fn bird_bfd_conf(local: &str, node_ip: &str, multihop: bool) -> String {
    let (bfd_block, bgp_multihop) = if multihop {
        ("multihop", "  multihop;\n")
    } else {
        ("interface \"*\"", "")
    };
    format!(
        r#"router id {local};
protocol device {{ }}
protocol bfd {{
  {bfd_block} {{ min rx interval 100 ms; min tx interval 100 ms; idle tx interval 1 s; multiplier 3; }};
}}
protocol static {{ ipv4; route {ROUTE} unreachable; }}
protocol bgp margay {{
  local {local} as 65001;
  neighbor {node_ip} as 64512;
{bgp_multihop}  hold time 240;
  connect retry time 2;
  error wait time 1, 5;
  bfd on;
  ipv4 {{ import all; export all; }};
}}
"#
    )
}

/// BIRD's side: its BFD session to the node Up and its BGP session Established.
fn bird_sees_margay_up(bird: &Bird, node_ip: &str) -> bool {
    bird.birdc("show bfd sessions")
        .lines()
        .any(|l| l.contains(node_ip) && l.contains("Up"))
        && bird.birdc("show protocols margay").contains("Established")
}

fn bird_diag(bird: &Bird) -> String {
    format!(
        "{}\n{}\n{}",
        bird.birdc("show bfd sessions"),
        bird.birdc("show protocols all margay"),
        bird.log()
    )
}

#[test]
#[ignore = "needs root, network namespaces, etcd and BIRD 2: scripts/test.sh runs it (--include-ignored)"]
fn bfd_with_bird_withdraws_at_once_on_link_cut_and_recovers() {
    const T: &str = "bfd_with_bird_withdraws_at_once_on_link_cut_and_recovers";
    if !(lab_prerequisites(T) && require(have_bird(), T, "BIRD 2 is not installed (bird2)")) {
        return;
    }
    let lab = Lab::with("bfdb", 1, 0, &[]);
    let node = lab.node(0).to_string();
    let node_ip = lab.nodes[0].1.to_string();
    let (_g, ns) = peer_namespace(&lab, "bfdbp");
    let conf = bird_bfd_conf(PEER_IP, &node_ip, false);
    let bird = Bird::start(&ns, &conf);
    tor_peer(&lab, 65001);
    let bird_up = || bird_sees_margay_up(&bird, &node_ip);
    let diag = || bird_diag(&bird);
    assert_all_up(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &bird_up, &diag);
    // The negotiated figures: max(100 ms, 100 ms), 3 x 100 ms.
    let st = lab.status(&node).unwrap_or(Value::Null);
    assert_eq!(bfd_of(&st, PEER_IP)["txIntervalMs"], 100, "{st}");
    assert_eq!(bfd_of(&st, PEER_IP)["detectTimeMs"], 300, "{st}");

    cut_and_expect_withdrawal(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &ns);
    sh(&format!("ip -n {ns} link set eth0 up"));
    assert_all_up(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &bird_up, &diag);
}

/// RFC 5883 multihop BFD with BIRD one router away: the lab's second subnet (`--subnets 2`), BIRD at
/// 10.99.1.200 behind the router `<lab>-br` (10.99.1.1), the margay node at 10.99.0.11 on the first
/// subnet; the BGP session is multihop (Calico's sessions are, TTL 64), BFD runs on UDP 4784
/// (`margay.io/bfd-multihop`, BIRD's `multihop { }` block), and the learned route goes into the kernel
/// through the node's own next hop to the router (recursive resolution).
#[test]
#[ignore = "needs root, network namespaces, etcd and BIRD 2: scripts/test.sh runs it (--include-ignored)"]
fn bfd_multihop_with_bird_across_a_router() {
    const T: &str = "bfd_multihop_with_bird_across_a_router";
    if !(lab_prerequisites(T) && require(have_bird(), T, "BIRD 2 is not installed (bird2)")) {
        return;
    }
    const FAR_PEER: &str = "10.99.1.200";
    const ROUTER: &str = "10.99.0.1";
    let lab = Lab::with("bfdh", 1, 0, &["--subnets", "2"]);
    let node = lab.node(0).to_string();
    let node_ip = lab.nodes[0].1.to_string();
    let ns = unique("bfdhp");
    let _g = Netns::new(&[&ns]);
    let br = format!("{}-br", lab.name);
    let port = unique("bp");
    sh(&format!(
        "ip -n {br} link add {port} type veth peer name eth0 netns {ns}"
    ));
    sh(&format!("ip -n {br} link set {port} master br1 up"));
    sh(&format!("ip -n {ns} addr add {FAR_PEER}/24 dev eth0"));
    sh(&format!("ip -n {ns} link set eth0 up"));
    sh(&format!("ip -n {ns} route add default via 10.99.1.1"));
    let conf = bird_bfd_conf(FAR_PEER, &node_ip, true);
    let bird = Bird::start(&ns, &conf);
    put(
        &lab,
        "bgppeers",
        "far",
        &format!(
            r#"{{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{{"name":"far","annotations":{{"margay.io/bfd":"true","margay.io/bfd-multihop":"true","margay.io/bfd-min-rx":"100ms","margay.io/bfd-min-tx":"100ms","margay.io/bfd-multiplier":"3"}}}},"spec":{{"peerIP":"{FAR_PEER}","asNumber":65001}}}}"#
        ),
    );
    let bird_up = || bird_sees_margay_up(&bird, &node_ip);
    let diag = || bird_diag(&bird);
    assert_all_up(&lab, &node, FAR_PEER, (ROUTE, ROUTER), &bird_up, &diag);
    let st = lab.status(&node).unwrap_or(Value::Null);
    let b = bfd_of(&st, FAR_PEER);
    assert_eq!(b["multihop"], true, "not a multihop session: {st}");
    assert_eq!(b["detectTimeMs"], 300, "{st}");
    cut_and_expect_withdrawal(&lab, &node, FAR_PEER, (ROUTE, ROUTER), &ns);
    sh(&format!("ip -n {ns} link set eth0 up"));
    sh(&format!("ip -n {ns} route replace default via 10.99.1.1"));
    assert_all_up(&lab, &node, FAR_PEER, (ROUTE, ROUTER), &bird_up, &diag);
}

#[test]
#[ignore = "needs root, network namespaces, etcd and FRR with bfdd: scripts/test.sh runs it (--include-ignored)"]
fn bfd_with_frr_bfdd_withdraws_at_once_on_link_cut_and_recovers() {
    const T: &str = "bfd_with_frr_bfdd_withdraws_at_once_on_link_cut_and_recovers";
    if !(lab_prerequisites(T)
        && require(have_frr(), T, "FRR is not installed (frr)")
        && require(have_bfdd(), T, "FRR's bfdd is not installed (frr)"))
    {
        return;
    }
    let lab = Lab::with("bfdf", 1, 0, &[]);
    let node = lab.node(0).to_string();
    let node_ip = lab.nodes[0].1.to_string();
    let (_g, ns) = peer_namespace(&lab, "bfdfp");
    let bgpd = format!(
        "frr defaults traditional
router bgp 65003
 bgp router-id {PEER_IP}
 no bgp ebgp-requires-policy
 no bgp network import-check
 neighbor {node_ip} remote-as 64512
 neighbor {node_ip} timers 80 240
 neighbor {node_ip} timers connect 2
 neighbor {node_ip} bfd
 neighbor {node_ip} bfd profile fast
 address-family ipv4 unicast
  network {ROUTE}
  neighbor {node_ip} activate
 exit-address-family
exit
"
    );
    let bfdd = "bfd
 profile fast
  detect-multiplier 3
  receive-interval 100
  transmit-interval 100
 exit
exit
";
    let frr = Frr::start_with_bfdd(&ns, &bgpd, bfdd);
    tor_peer(&lab, 65003);
    let frr_up = || {
        let peers: Value =
            serde_json::from_str(&frr.vtysh_bfdd("show bfd peers json")).unwrap_or(Value::Null);
        let bfd_up = peers.as_array().is_some_and(|a| {
            a.iter()
                .any(|p| p["peer"] == node_ip.as_str() && p["status"] == "up")
        });
        bfd_up
            && frr
                .vtysh(&format!("show bgp neighbors {node_ip}"))
                .contains("BGP state = Established")
    };
    let diag = || {
        format!(
            "{}\n{}\nbfdd log:\n{}\nbgpd log:\n{}",
            frr.vtysh_bfdd("show bfd peers"),
            frr.vtysh("show bgp summary"),
            frr.bfdd_log(),
            frr.log()
        )
    };
    assert_all_up(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &frr_up, &diag);
    cut_and_expect_withdrawal(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &ns);
    sh(&format!("ip -n {ns} link set eth0 up"));
    assert_all_up(&lab, &node, PEER_IP, (ROUTE, PEER_IP), &frr_up, &diag);
}

/// Two margay nodes, BFD on the mesh through the default BGPConfiguration's annotations: node 2's link
/// cut, node 1 drops node 2's block at once; the link back, all returns.
#[test]
#[ignore = "needs root, network namespaces and etcd: scripts/test.sh runs it (--include-ignored)"]
fn bfd_on_the_mesh_between_two_margay_nodes() {
    const T: &str = "bfd_on_the_mesh_between_two_margay_nodes";
    if !lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("bfdm", 2, 1, &[]);
    let (n1, n2) = (lab.node(0).to_string(), lab.node(1).to_string());
    let ip2 = lab.nodes[1].1.to_string();
    let ip1 = lab.nodes[0].1.to_string();
    put(
        &lab,
        "bgpconfigurations",
        "default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default","annotations":{"margay.io/bfd":"true","margay.io/bfd-min-rx":"100ms","margay.io/bfd-min-tx":"100ms"}},"spec":{"asNumber":64512,"nodeToNodeMeshEnabled":true}}"#,
    );
    let block2 = own_block(&n2).to_string();
    let n2_sees_n1 = || {
        lab.status(&n2)
            .is_some_and(|st| bfd_of(&st, &ip1)["state"] == "Up")
    };
    let diag = || lab.node_logs(&n2);
    assert_all_up(&lab, &n1, &ip2, (&block2, &ip2), &n2_sees_n1, &diag);
    // The status table shows the section.
    let (ok, table) = in_ns(&n1, &[common::lab::MARGAY, "status"]);
    assert!(
        ok && table.contains("BFD status") && table.contains(&ip2),
        "{table}"
    );

    // Node 2's own link, cut inside its namespace.
    cut_and_expect_withdrawal(&lab, &n1, &ip2, (&block2, &ip2), &n2);
    sh(&format!("ip -n {n2} link set eth0 up"));
    // Its default route went with the link.
    let _ = common::try_sh(&format!("ip -n {n2} route replace default via 10.99.0.1"));
    assert_all_up(&lab, &n1, &ip2, (&block2, &ip2), &n2_sees_n1, &diag);
}

/// The standalone reflector (`margay reflector` in a `lab --reflector`) with BFD towards an outside BIRD
/// configured by a BGPPeer for the reflector's own node name: BFD Up on both sides; the peer's link cut takes
/// the reflector's session down at once (not after the 240 s hold time), and the peer's route (reflected
/// next hop self, as an eBGP-learned route) leaves its clients' kernels; the link back brings BFD, BGP and
/// the route back.
#[test]
#[ignore = "needs root, network namespaces, etcd and BIRD 2: scripts/test.sh runs it (--include-ignored)"]
fn bfd_on_the_standalone_reflector_with_bird() {
    const T: &str = "bfd_on_the_standalone_reflector_with_bird";
    if !(lab_prerequisites(T) && require(have_bird(), T, "BIRD 2 is not installed (bird2)")) {
        return;
    }
    let lab = Lab::with("bfdr", 1, 0, &["--reflector"]);
    let node = lab.node(0).to_string();
    let rr = format!("{}-rr", lab.name);
    let rr_ip = "10.99.0.3";
    let (_g, ns) = peer_namespace(&lab, "bfdrp");
    let conf = format!(
        r#"router id {PEER_IP};
protocol device {{ }}
protocol bfd {{
  interface "*" {{ min rx interval 100 ms; min tx interval 100 ms; idle tx interval 1 s; multiplier 3; }};
}}
protocol static {{ ipv4; route {ROUTE} unreachable; }}
protocol bgp margay {{
  local {PEER_IP} as 65001;
  neighbor {rr_ip} as 64512;
  hold time 240;
  connect retry time 2;
  error wait time 1, 5;
  bfd on;
  ipv4 {{ import all; export all; }};
}}
"#
    );
    let bird = Bird::start(&ns, &conf);
    put(
        &lab,
        "bgppeers",
        "tor-rr",
        &format!(
            r#"{{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{{"name":"tor-rr","annotations":{{"margay.io/bfd":"true","margay.io/bfd-min-rx":"100ms","margay.io/bfd-min-tx":"100ms","margay.io/bfd-multiplier":"3"}}}},"spec":{{"node":"{rr}","peerIP":"{PEER_IP}","asNumber":65001}}}}"#
        ),
    );
    let rr_status = || common::lab::status_json(&rr, Some("127.0.0.1:9190")).unwrap_or(Value::Null);
    let bird_up = || {
        bird.birdc("show bfd sessions")
            .lines()
            .any(|l| l.contains(rr_ip) && l.contains("Up"))
            && bird.birdc("show protocols margay").contains("Established")
    };
    let all_up = || {
        let st = rr_status();
        bfd_of(&st, PEER_IP)["state"] == "Up"
            && bgp_state(&st, PEER_IP) == "Established"
            && has_route(&node, ROUTE, rr_ip)
            && bird_up()
    };
    let diag = || {
        format!(
            "reflector: {}\n{} routes: {:?}\n{}\n{}",
            rr_status(),
            node,
            proto77(&node),
            bird.birdc("show bfd sessions"),
            bird.birdc("show protocols all margay"),
        )
    };
    assert!(
        eventually(RECOVER_GUARD, all_up),
        "never all up: {}",
        diag()
    );
    let st = rr_status();
    assert_eq!(bfd_of(&st, PEER_IP)["detectTimeMs"], 300, "{st}");

    let t0 = Instant::now();
    sh(&format!("ip -n {ns} link set eth0 down"));
    let gone = eventually(DETECT_GUARD, || !has_route(&node, ROUTE, rr_ip));
    assert!(
        gone,
        "{ROUTE} still in {node}'s kernel {DETECT_GUARD:?} after the cut (hold time 240 s): {}",
        diag()
    );
    eprintln!(
        "{node}: the reflected route left the kernel {:?} after the cut",
        t0.elapsed()
    );
    let st = rr_status();
    let b = bfd_of(&st, PEER_IP);
    assert_ne!(b["state"], "Up", "BFD still Up after the cut: {st}");
    assert!(b["downCount"].as_u64().unwrap_or(0) >= 1, "{st}");
    assert_ne!(bgp_state(&st, PEER_IP), "Established", "{st}");

    sh(&format!("ip -n {ns} link set eth0 up"));
    assert!(
        eventually(RECOVER_GUARD, all_up),
        "not back after the link returned: {}",
        diag()
    );
}
