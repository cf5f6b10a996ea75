//! margay in a real cluster's shape, end to end through `margay node run` in a lab: outgoing NAT for
//! natOutgoing pools (live with pool changes, IPv4 and IPv6, natOutgoingAddress), pools chosen by node
//! labels, the pod MTU, and what the node cannot honour said clearly.
//!
//! Needs root, etcd, etcdctl, iproute2, ping and nftables; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::dataplane::ns_path;
use common::lab::{eventually, in_ns, Lab, ETCD};
use common::subnets::{proto77_text, tx_packets, AcrossRouter};
use common::{have, require, unique, Netns};
use margay::dataplane::{in_netns, DataplaneError};

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

fn io(what: &'static str, e: std::io::Error) -> DataplaneError {
    DataplaneError::Invalid {
        what,
        value: String::new(),
        reason: e.to_string(),
    }
}

/// A TCP server inside `ns` that answers every connection with the source address it saw, until dropped.
struct SeenServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SeenServer {
    fn start(ns: &str, addr: &str) -> SeenServer {
        let addr: SocketAddr = addr.parse().expect("addr");
        let l = in_netns(Some(&ns_path(ns)), || {
            TcpListener::bind(addr).map_err(|e| io("bind", e))
        })
        .expect("bind the outside server");
        l.set_nonblocking(true).expect("nonblocking");
        let addr = l.local_addr().expect("local addr");
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match l.accept() {
                    Ok((mut c, peer)) => {
                        let _ = c.write_all(peer.ip().to_string().as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        SeenServer {
            addr,
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for SeenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Open a TCP connection from inside `ns` to `to`; the source address the far end saw, or None when no
/// answer came (the SYN-ACK was lost).
fn tcp_seen(ns: &str, to: SocketAddr) -> Option<String> {
    in_netns(Some(&ns_path(ns)), || {
        let Ok(mut c) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
            return Ok(None);
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
        let mut s = String::new();
        let _ = c.read_to_string(&mut s);
        Ok((!s.is_empty()).then_some(s))
    })
    .expect("client")
}

fn ping(ns: &str, to: &str) -> bool {
    in_ns(ns, &["ping", "-c", "1", "-W", "2", to]).0
}

/// `margay apply -f` of `yaml`, run in `node`'s namespace against the lab's etcd.
fn apply(lab: &Lab, node: &str, yaml: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let f = dir.path().join("r.yaml");
    std::fs::write(&f, yaml).expect("write");
    let (ok, out) = lab.margay_in(node, &["apply", "-f", &f.to_string_lossy()]);
    assert!(ok, "margay apply:\n{yaml}\n{out}");
}

fn pool_yaml(name: &str, cidr: &str, block: u8, nat: bool) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: {name}\nspec:\n  cidr: {cidr}\n  \
         blockSize: {block}\n  natOutgoing: {nat}\n  nodeSelector: all()\n"
    )
}

/// Elements of one set of margay's nftables table in `node` ("" when empty or absent).
fn nat_set(node: &str, set: &str) -> String {
    let (_, out) = in_ns(node, &["nft", "list", "set", "inet", "margay", set]);
    out.lines()
        .find(|l| l.trim_start().starts_with("elements"))
        .unwrap_or("")
        .trim()
        .to_string()
}

/// ```text
///   netns <lab>-br: bridge br0 10.99.0.1/24, fd00:99::1/64 (knows no pod route)
///     |-- n1   eth0 10.99.0.11, fd00:99::11 (+ 10.99.0.111 for natOutgoingAddress)
///     |          margay node run: pool default-ipv4-ippool 10.244.0.0/16 natOutgoing,
///     |          later pool v6 fd00:244::/48 natOutgoing; table inet margay
///     |          └── pod n1p1 10.244.x.y          └── pod v6 (dual stack, added after the v6 pool)
///     `-- OUT  eth0 10.99.0.200/24, fd00:99::200/64: TCP server answering with the source it saw
///              no route to any pool
/// ```
/// Expect: the pod reaches OUT as 10.99.0.11 (masqueraded); natOutgoing flipped off live: no reply (OUT
/// cannot answer a pod address); on again: replies; IPv6 the same with fd00:99::11; with
/// FELIX_NATOUTGOINGADDRESS=10.99.0.111 OUT sees 10.99.0.111.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn nat_outgoing_follows_pools_live() {
    const T: &str = "nat_outgoing_follows_pools_live";
    if !(common::lab::lab_prerequisites(T) && require(have("nft"), T, "nftables is not installed"))
    {
        return;
    }
    let lab = Lab::with("nat", 1, 1, &[]);
    let n1 = lab.nodes[0].0.clone();
    lab.wait_ready(&n1);
    let (pod, _, _) = lab.pods[0].clone();
    let br = format!("{}-br", lab.name);
    let out = unique("out");
    let _ns = Netns::new(&[&out]);
    let port = format!("o{}", std::process::id() % 100000);
    for cmd in [
        format!("ip -n {br} link add {port} type veth peer name eth0 netns {out}"),
        format!("ip -n {br} link set {port} master br0 up"),
        format!("ip -n {out} link set eth0 up"),
        format!("ip -n {out} addr add 10.99.0.200/24 dev eth0"),
        format!("ip -n {out} addr add fd00:99::200/64 dev eth0 nodad"),
        format!("ip -n {n1} addr add fd00:99::11/64 dev eth0 nodad"),
    ] {
        common::sh(&cmd);
    }
    let srv = SeenServer::start(&out, "10.99.0.200:0");
    let srv6 = SeenServer::start(&out, "[fd00:99::200]:0");
    let n1_ip = lab.nodes[0].1.to_string();

    // The default pool has natOutgoing: the pod's traffic leaves as the node.
    assert!(
        eventually(Duration::from_secs(10), || nat_set(&n1, "nat_v4")
            .contains("10.244.0.0/16")),
        "NAT never programmed:\n{}",
        lab.node_logs(&n1)
    );
    assert_eq!(tcp_seen(&pod, srv.addr), Some(n1_ip.clone()));
    assert!(ping(&pod, "10.99.0.200"), "ping with natOutgoing on");

    // Flipped off live: the pod's own address reaches OUT, which has no route back.
    apply(
        &lab,
        &n1,
        &pool_yaml("default-ipv4-ippool", "10.244.0.0/16", 26, false),
    );
    assert!(
        eventually(Duration::from_secs(10), || nat_set(&n1, "nat_v4")
            .is_empty()),
        "natOutgoing off not applied: {}",
        nat_set(&n1, "nat_v4")
    );
    // The pool stays in the "every pool" set (pool-to-pool traffic is never NATed).
    assert!(nat_set(&n1, "all_v4").contains("10.244.0.0/16"));
    assert_eq!(
        tcp_seen(&pod, srv.addr),
        None,
        "a reply arrived without NAT"
    );
    assert!(!ping(&pod, "10.99.0.200"), "ping answered without NAT");

    // On again, live.
    apply(
        &lab,
        &n1,
        &pool_yaml("default-ipv4-ippool", "10.244.0.0/16", 26, true),
    );
    assert!(eventually(Duration::from_secs(10), || nat_set(
        &n1, "nat_v4"
    )
    .contains("10.244.0.0/16")));
    assert_eq!(tcp_seen(&pod, srv.addr), Some(n1_ip.clone()));
    assert!(ping(&pod, "10.99.0.200"), "ping with natOutgoing on again");

    // Someone else flushes the ruleset: margay puts its table back.
    common::sh(&format!("ip netns exec {n1} nft flush ruleset"));
    assert!(
        eventually(Duration::from_secs(15), || nat_set(&n1, "nat_v4")
            .contains("10.244.0.0/16")),
        "table inet margay not restored"
    );

    // IPv6: a pool added live; a dual-stack pod masqueraded to the node's IPv6 address.
    apply(&lab, &n1, &pool_yaml("v6", "fd00:244::/48", 122, true));
    assert!(
        eventually(Duration::from_secs(10), || nat_set(&n1, "nat_v6")
            .contains("fd00:244::/48")),
        "IPv6 NAT never programmed"
    );
    let pod6 = format!("{}-v6pod", lab.name);
    let _pod6 = Netns::new(&[&pod6]);
    let (ok, res) = lab.pod_cni(&n1, &pod6, "ADD");
    assert!(ok, "CNI ADD of a dual-stack pod: {res}");
    assert!(res.contains("fd00:244:"), "no IPv6 address: {res}");
    assert_eq!(tcp_seen(&pod6, srv6.addr), Some("fd00:99::11".to_string()));
    // The pool deleted: its NAT goes with it.
    let (ok, o) = lab.pod_cni(&n1, &pod6, "DEL");
    assert!(ok, "CNI DEL: {o}");
    let (ok, o) = lab.margay_in(&n1, &["delete", "ippool", "v6"]);
    assert!(ok, "delete pool: {o}");
    assert!(eventually(Duration::from_secs(10), || nat_set(
        &n1, "all_v6"
    )
    .is_empty()));

    // natOutgoingAddress: SNAT to a chosen node address instead of masquerade.
    common::sh(&format!("ip -n {n1} addr add 10.99.0.111/24 dev eth0"));
    lab.restart_node_with_env(&n1, &[("FELIX_NATOUTGOINGADDRESS", "10.99.0.111")]);
    lab.wait_ready(&n1);
    assert!(eventually(Duration::from_secs(10), || {
        in_ns(&n1, &["nft", "list", "table", "inet", "margay"])
            .1
            .contains("snat ip to 10.99.0.111")
    }));
    assert_eq!(tcp_seen(&pod, srv.addr), Some("10.99.0.111".to_string()));
    let status = lab.status(&n1).expect("status");
    assert_eq!(
        status["dataplane"]["natOutgoingAddress"], "10.99.0.111",
        "{status}"
    );
    assert_eq!(
        status["dataplane"]["natPools"][0], "10.244.0.0/16",
        "{status}"
    );
}

/// Set `node`'s labels in its Calico Node resource (what `calicoctl label nodes` or kube-controllers' label
/// sync writes), keeping everything else.
fn set_labels(lab: &Lab, node: &str, labels: serde_json::Value) {
    let key = format!("/calico/resources/v3/projectcalico.org/nodes/{node}");
    let etcd = format!("{}-etcd", lab.name);
    let (ok, out) = in_ns(
        &etcd,
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            &key,
            "--print-value-only",
        ],
    );
    assert!(ok, "etcdctl get {key}: {out}");
    let mut v: serde_json::Value = serde_json::from_str(out.trim()).expect("Node JSON");
    v["metadata"]["labels"] = labels;
    let (ok, out) = in_ns(
        &etcd,
        &["etcdctl", "--endpoints", ETCD, "put", &key, &v.to_string()],
    );
    assert!(ok, "etcdctl put {key}: {out}");
}

/// Keys under `prefix` in the lab's etcd.
fn etcd_keys(lab: &Lab, prefix: &str) -> Vec<String> {
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            prefix,
            "--prefix",
            "--keys-only",
        ],
    );
    assert!(ok, "etcdctl get {prefix}: {out}");
    out.lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// CNI ADD of a new pod `pod` on `node`; the IPv4 address it got.
fn add_pod(lab: &Lab, node: &str, pod: &str) -> std::net::Ipv4Addr {
    let (ok, out) = lab.pod_cni(node, pod, "ADD");
    assert!(
        ok,
        "CNI ADD {pod} on {node}: {out}\n{}",
        lab.node_logs(node)
    );
    let v: serde_json::Value = serde_json::from_str(&out).expect("CNI result");
    v["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|i| i["address"].as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .next()
        .unwrap_or_else(|| panic!("no IPv4 address in {out}"))
}

/// ```text
///   netns <lab>-br: bridge 10.99.0.0/24
///     |-- n1 10.99.0.11  labels {} -> {rack: a} (live) -> {rack: b} (live)
///     `-- n2 10.99.0.12  labels {} -> {rack: a} while its daemon is stopped (read at start)
///   pools: default-ipv4-ippool 10.244.0.0/16 nodeSelector rack != "a"
///          rack-a              10.50.0.0/16  nodeSelector rack == "a"
/// ```
/// Expect: a new pod on an unlabelled node gets 10.244.x; n1 labelled rack=a (live): its next pod gets
/// 10.50.x while its old 10.244 block (in use) keeps its affinity; relabelled rack=b: the next pod gets
/// 10.244.x, and once its 10.50 pod is gone the empty 10.50 block and its affinity are released; n2
/// labelled while stopped claims from rack-a after its restart.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn pools_follow_node_labels() {
    const T: &str = "pools_follow_node_labels";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("lbl", 2, 1, &[]);
    let (n1, n2) = (lab.nodes[0].0.clone(), lab.nodes[1].0.clone());
    lab.wait_ready(&n1);
    lab.wait_ready(&n2);
    let in_pool = |ip: std::net::Ipv4Addr, cidr: &str| {
        cidr.parse::<ipnetwork::Ipv4Network>()
            .expect("cidr")
            .contains(ip)
    };
    apply(
        &lab,
        &n1,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  blockSize: 26\n  natOutgoing: true\n  nodeSelector: rack != \"a\"\n---\n\
         apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: rack-a\nspec:\n  cidr: 10.50.0.0/16\n  \
         blockSize: 26\n  nodeSelector: rack == \"a\"\n",
    );
    let pods: Vec<String> = (1..=4).map(|i| format!("{}-lp{i}", lab.name)).collect();
    let refs: Vec<&str> = pods.iter().map(String::as_str).collect();
    let _pods = Netns::new(&refs);

    // Labelled live: the next pod on n1 comes from rack-a.
    set_labels(&lab, &n1, serde_json::json!({"rack": "a"}));
    let mut a = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            // Until the label reaches IPAM the pod gets a 10.244 address: release it and try again.
            let ip = add_pod(&lab, &n1, &pods[0]);
            if in_pool(ip, "10.50.0.0/16") {
                a = Some(ip);
                return true;
            }
            let _ = lab.pod_cni(&n1, &pods[0], "DEL");
            false
        }),
        "n1 labelled rack=a never took from rack-a\n{}",
        lab.node_logs(&n1)
    );
    let a = a.expect("address");
    // The unlabelled node still takes from the default pool.
    let b = add_pod(&lab, &n2, &pods[1]);
    assert!(in_pool(b, "10.244.0.0/16"), "{b}");
    // n1's old block holds its first pod: it keeps its affinity.
    let n1_aff = |cidr_prefix: &str| {
        etcd_keys(&lab, &format!("/calico/ipam/v2/host/{n1}/ipv4/block/"))
            .iter()
            .any(|k| k.contains(cidr_prefix))
    };
    assert!(n1_aff("10.244."), "in-use block lost its affinity");
    assert!(n1_aff("10.50."));

    // Relabelled: new blocks move back to the default pool; the rack-a block goes once it is empty.
    set_labels(&lab, &n1, serde_json::json!({"rack": "b"}));
    let mut c = None;
    assert!(
        eventually(Duration::from_secs(10), || {
            let ip = add_pod(&lab, &n1, &pods[2]);
            if in_pool(ip, "10.244.0.0/16") {
                c = Some(ip);
                return true;
            }
            let _ = lab.pod_cni(&n1, &pods[2], "DEL");
            false
        }),
        "n1 relabelled rack=b still takes from rack-a"
    );
    assert!(n1_aff("10.50."), "a block in use ({a}) was released");
    let (ok, out) = lab.pod_cni(&n1, &pods[0], "DEL");
    assert!(ok, "{out}");
    assert!(
        eventually(Duration::from_secs(10), || !n1_aff("10.50.")),
        "the empty rack-a block kept its affinity\n{}",
        lab.node_logs(&n1)
    );
    // The block itself goes, or stays held by nobody while the address it handed out cools down (issue 15:
    // `ipam gc --release` deletes it afterwards).
    let (_, blocks) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            "/calico/ipam/v2/assignment/ipv4/block/10.50.",
            "--prefix",
            "--print-value-only",
        ],
    );
    for b in blocks.lines().filter(|l| l.trim_start().starts_with('{')) {
        let b: serde_json::Value = serde_json::from_str(b).expect("block JSON");
        assert!(b["affinity"].is_null(), "a rack-a block is still held: {b}");
    }

    // Labels read at start: n2 labelled while its daemon is down claims from rack-a after the restart.
    lab.stop_daemon(&n2, nix::sys::signal::Signal::SIGTERM);
    set_labels(&lab, &n2, serde_json::json!({"rack": "a"}));
    lab.restart_node(&n2);
    lab.wait_ready(&n2);
    let d = add_pod(&lab, &n2, &pods[3]);
    assert!(in_pool(d, "10.50.0.0/16"), "{d}");
}

/// ```text
///   netns A (the node)           netns R (router, no BGP)          netns B (a node in another subnet)
///   eth0 10.1.0.2/24 ─────────── r0 10.1.0.1/24                     lo 10.244.7.1/32 (a pod)
///                                r1 10.2.0.1/24 ─────────────────── eth0 10.2.0.2/24, default via 10.2.0.1
///                                route 10.244.7.0/26 via 10.2.0.2 (what a ToR learns)
///   learned over BGP: 10.244.7.0/26 next hop 10.2.0.2 (not on A's link); 10.244.8.0/26 next hop 10.1.0.9
/// ```
/// Expect: with no route to 10.2.0.0/24 on A the block is not installed and is reported unresolved; a
/// default route via R appears: `10.244.7.0/26 via 10.1.0.1 dev eth0` (the covering route's gateway, as BIRD
/// `gateway recursive`) and A pings the pod; a more specific route to 10.2.0.0/24 via 10.1.0.3 moves it
/// there, its removal moves it back; the default deleted: withdrawn and reported again. An on-link next hop
/// is installed as learned.
#[test]
#[ignore = "needs root for network namespaces; needs iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn learned_next_hops_resolve_recursively_and_follow_the_underlay() {
    const T: &str = "learned_next_hops_resolve_recursively_and_follow_the_underlay";
    if !(require(common::is_root(), T, "needs root for network namespaces")
        && require(have("ip") && have("ping"), T, "needs iproute2 and ping"))
    {
        return;
    }
    let (a, r, b) = (unique("nha"), unique("nhr"), unique("nhb"));
    let _ns = Netns::new(&[&a, &r, &b]);
    for cmd in [
        format!("ip -n {a} link add eth0 type veth peer name r0 netns {r}"),
        format!("ip -n {r} link add r1 type veth peer name eth0 netns {b}"),
        format!("ip -n {a} addr add 10.1.0.2/24 dev eth0"),
        format!("ip -n {r} addr add 10.1.0.1/24 dev r0"),
        format!("ip -n {r} addr add 10.2.0.1/24 dev r1"),
        format!("ip -n {b} addr add 10.2.0.2/24 dev eth0"),
        format!("ip -n {b} addr add 10.244.7.1/32 dev lo"),
        format!("ip -n {a} link set eth0 up"),
        format!("ip -n {r} link set r0 up"),
        format!("ip -n {r} link set r1 up"),
        format!("ip -n {b} link set eth0 up"),
        format!("ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"),
        format!("ip -n {r} route add 10.244.7.0/26 via 10.2.0.2"),
        format!("ip -n {b} route add default via 10.2.0.1"),
    ] {
        common::sh(&cmd);
    }
    let rt = common::dataplane::runtime();
    let status = margay::node::cluster::dataplane_status();
    let (tx, _task, _fib) = rt.block_on(async {
        let fib = margay::dataplane::Fib::spawn(margay::dataplane::FibConfig {
            netns: Some(ns_path(&a)),
            ..Default::default()
        })
        .await
        .expect("FIB");
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let task = tokio::spawn(margay::node::nexthop::learned_routes(
            rx,
            fib.clone(),
            Some(ns_path(&a)),
            status.clone(),
            Vec::new(),
        ));
        (tx, task, fib)
    });
    let send = |ev: Vec<margay::bgp::rib::FibEvent>| {
        rt.block_on(tx.send(ev)).expect("send");
    };
    let unresolved = || status.borrow().unresolved_routes.clone();
    let block: ipnetwork::IpNetwork = "10.244.7.0/26".parse().unwrap();
    send(vec![margay::bgp::rib::FibEvent::Set {
        prefix: block,
        next_hops: vec!["10.2.0.2".parse().unwrap()],
    }]);
    assert!(
        eventually(Duration::from_secs(5), || unresolved()
            .iter()
            .any(|u| u.starts_with("10.244.7.0/26"))),
        "not reported unresolved: {:?}",
        unresolved()
    );
    assert!(!proto77_text(&a).contains("10.244.7.0/26"));
    assert_eq!(status.borrow().unresolved_total, 1);

    // The underlay appears: resolved through the default route's gateway, without any new BGP event.
    common::sh(&format!("ip -n {a} route add default via 10.1.0.1"));
    assert!(
        eventually(Duration::from_secs(5), || proto77_text(&a)
            .contains("10.244.7.0/26 via 10.1.0.1 dev eth0")),
        "not resolved via the default route: {}",
        proto77_text(&a)
    );
    assert!(eventually(Duration::from_secs(2), || unresolved().is_empty()));
    assert!(
        in_ns(&a, &["ping", "-c", "1", "-W", "2", "10.244.7.1"]).0,
        "pod across the router not reachable"
    );

    // A more specific underlay route takes over, and gives back when removed.
    common::sh(&format!("ip -n {a} route add 10.2.0.0/24 via 10.1.0.3"));
    assert!(
        eventually(Duration::from_secs(5), || proto77_text(&a)
            .contains("10.244.7.0/26 via 10.1.0.3 dev eth0")),
        "{}",
        proto77_text(&a)
    );
    common::sh(&format!("ip -n {a} route del 10.2.0.0/24 via 10.1.0.3"));
    assert!(
        eventually(Duration::from_secs(5), || proto77_text(&a)
            .contains("10.244.7.0/26 via 10.1.0.1 dev eth0")),
        "{}",
        proto77_text(&a)
    );

    // On-link next hops go as learned.
    send(vec![margay::bgp::rib::FibEvent::Set {
        prefix: "10.244.8.0/26".parse().unwrap(),
        next_hops: vec!["10.1.0.9".parse().unwrap()],
    }]);
    assert!(
        eventually(Duration::from_secs(5), || proto77_text(&a)
            .contains("10.244.8.0/26 via 10.1.0.9 dev eth0")),
        "{}",
        proto77_text(&a)
    );

    // The underlay goes: withdrawn from the kernel, reported, and the on-link route stays.
    common::sh(&format!("ip -n {a} route del default via 10.1.0.1"));
    assert!(
        eventually(Duration::from_secs(5), || !proto77_text(&a)
            .contains("10.244.7.0/26")),
        "{}",
        proto77_text(&a)
    );
    assert!(eventually(Duration::from_secs(5), || unresolved()
        .iter()
        .any(|u| u.starts_with("10.244.7.0/26"))));
    assert!(proto77_text(&a).contains("10.244.8.0/26"));
}

/// The MTU of `pod`'s eth0.
fn pod_mtu(pod: &str) -> u32 {
    let out = common::sh(&format!("ip -n {pod} -o link show eth0"));
    let w: Vec<&str> = out.split_whitespace().collect();
    w.iter()
        .position(|x| *x == "mtu")
        .and_then(|i| w.get(i + 1)?.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out}"))
}

/// ```text
///   netns <lab>-br: bridge 10.99.0.0/24
///     `-- n1 eth0 10.99.0.11, MTU 1500 -> 1450 (then the daemon restarts)
///           pool default-ipv4-ippool 10.244.0.0/16: vxlanMode Never -> Always (live)
/// ```
/// Expect: pods get 1500 (eth0's MTU, no encapsulation); eth0 at 1450: 1450; a pool with vxlanMode Always:
/// 1400 (VXLAN's 50 bytes), live; MARGAY_POD_MTU=1300 overrides detection. `margay status` says each.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn pod_mtu_is_detected_from_the_node_interfaces() {
    const T: &str = "pod_mtu_is_detected_from_the_node_interfaces";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mtu", 1, 1, &[]);
    let n1 = lab.nodes[0].0.clone();
    lab.wait_ready(&n1);
    assert_eq!(pod_mtu(&lab.pods[0].0), 1500);
    let s = lab.status(&n1).expect("status");
    assert_eq!(s["dataplane"]["podMtu"], 1500, "{s}");

    common::sh(&format!("ip -n {n1} link set eth0 mtu 1450"));
    lab.restart_node(&n1);
    lab.wait_ready(&n1);
    let s = lab.status(&n1).expect("status");
    assert_eq!(s["dataplane"]["podMtu"], 1450, "{s}");
    assert_eq!(s["dataplane"]["podMtuSource"], "interface eth0 1450", "{s}");
    let pods: Vec<String> = (1..=3).map(|i| format!("{}-mp{i}", lab.name)).collect();
    let refs: Vec<&str> = pods.iter().map(String::as_str).collect();
    let _pods = Netns::new(&refs);
    add_pod(&lab, &n1, &pods[0]);
    assert_eq!(pod_mtu(&pods[0]), 1450);

    // VXLAN switched on in a pool: 50 bytes less, without a restart.
    apply(
        &lab,
        &n1,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  blockSize: 26\n  natOutgoing: true\n  vxlanMode: Always\n  nodeSelector: all()\n",
    );
    assert!(
        eventually(Duration::from_secs(10), || lab
            .status(&n1)
            .is_some_and(|s| s["dataplane"]["podMtu"] == 1400)),
        "{:?}",
        lab.status(&n1)
    );
    add_pod(&lab, &n1, &pods[1]);
    assert_eq!(pod_mtu(&pods[1]), 1400);
    let (ok, table) = in_ns(&n1, &[MARGAY, "status"]);
    assert!(
        ok && table.contains("Pod MTU: 1400 (interface eth0 1450 - VXLAN 50)"),
        "{table}"
    );

    // The flag wins over detection.
    lab.restart_node_with_env(&n1, &[("MARGAY_POD_MTU", "1300")]);
    lab.wait_ready(&n1);
    add_pod(&lab, &n1, &pods[2]);
    assert_eq!(pod_mtu(&pods[2]), 1300);
}

/// The Node resource `node` as stored in the lab's etcd (Null when absent).
fn node_json(lab: &Lab, node: &str) -> serde_json::Value {
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            &format!("/calico/resources/v3/projectcalico.org/nodes/{node}"),
            "--print-value-only",
        ],
    );
    if !ok {
        return serde_json::Value::Null;
    }
    serde_json::from_str(out.trim()).unwrap_or_default()
}

/// Can this kernel create an ipip device? Asked independently of margay, in a scratch namespace.
fn kernel_has_ipip() -> bool {
    let probe = unique("ipip");
    let _p = Netns::new(&[&probe]);
    common::try_sh(&format!("ip -n {probe} link add t0 type ipip 2>&1")).0
}

/// ```text
///   netns <lab>-br: bridge 10.99.0.0/24
///     |-- n1 10.99.0.11  (pod p1)   pool default-ipv4-ippool: ipipMode Always (a Calico manifest's pool,
///     `-- n2 10.99.0.12  (pod p2)   adopted as it is)
///   BGPConfiguration default: bindMode NodeIP (parsed, not acted on)
/// ```
/// Expect, on a kernel without ipip (this machine): an error in `margay status` and in the log at start
/// naming the pool, the field, the reason and the exact `margay apply` that switches it to VXLAN; `IPIP:
/// tunl0 not ready` in the status; n2's block is NOT installed on n1 (never unencapsulated) and is listed as
/// unresolved with the reason; the tunnel address is still allocated and written as the Node's
/// `spec.bgp.ipv4IPIPTunnelAddr`, as Calico's allocator does. Running the command from the status clears the
/// error and the IPIP address, n2's block goes through `vxlan.calico` and p1 pings p2. bindMode gives a
/// "Not supported" line naming resource and field. On a kernel with ipip: no error, n2's block goes through
/// `tunl0` and p1 pings p2.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn ignored_settings_are_reported_and_ipip_says_how_to_fix() {
    const T: &str = "ignored_settings_are_reported_and_ipip_says_how_to_fix";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let kernel_ipip = kernel_has_ipip();

    let lab = Lab::with("ign", 2, 1, &[]);
    let (n1, n2) = (lab.nodes[0].0.clone(), lab.nodes[1].0.clone());
    lab.wait_ready(&n1);
    lab.wait_ready(&n2);
    let b2 = common::lab::own_block(&n2).to_string();
    let p1 = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n1)
        .expect("pod on n1")
        .0
        .clone();
    let p2 = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n2)
        .expect("pod on n2")
        .2;
    let route_b2 = || {
        proto77_text(&n1)
            .lines()
            .find(|l| l.starts_with(&format!("{b2} ")))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        eventually(Duration::from_secs(15), || !route_b2().is_empty()),
        "n2's block never reached n1"
    );
    apply(
        &lab,
        &n1,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  blockSize: 26\n  natOutgoing: true\n  ipipMode: Always\n  nodeSelector: all()\n",
    );
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "put",
            "/calico/resources/v3/projectcalico.org/bgpconfigurations/default",
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"bindMode":"NodeIP","nodeToNodeMeshEnabled":true}}"#,
        ],
    );
    assert!(ok, "{out}");
    // The tunnel address is allocated and written where Calico keeps it, module or not.
    let ipip_addr = |n: &str| {
        node_json(&lab, n)["spec"]["bgp"]["ipv4IPIPTunnelAddr"]
            .as_str()
            .map(String::from)
    };
    assert!(
        eventually(Duration::from_secs(15), || ipip_addr(&n1).is_some()),
        "no spec.bgp.ipv4IPIPTunnelAddr on n1: {}\n{}",
        node_json(&lab, &n1),
        lab.node_logs(&n1)
    );
    let errors = |s: &serde_json::Value| s["dataplane"]["errors"].to_string();

    if kernel_ipip {
        // The module is there: margay builds tunl0 and sends n2's block through it.
        assert!(
            eventually(Duration::from_secs(15), || route_b2()
                .contains("via 10.99.0.12 dev tunl0")
                && route_b2().contains("onlink")),
            "{}\n{}",
            route_b2(),
            lab.node_logs(&n1)
        );
        assert!(
            in_ns(&p1, &["ping", "-c", "2", "-W", "2", &p2.to_string()]).0,
            "p1 -> p2 over IPIP"
        );
        let s = lab.status(&n1).expect("status");
        assert!(!errors(&s).contains("ipipMode"), "{s}");
        return;
    }

    // Seen live (the configuration watch), then at start.
    assert!(
        eventually(Duration::from_secs(10), || lab
            .status(&n1)
            .is_some_and(|s| errors(&s).contains("spec.ipipMode = Always"))),
        "{:?}",
        lab.status(&n1)
    );
    // Never unencapsulated: n2's block leaves n1's kernel and is reported with the reason.
    let unresolved = |s: &serde_json::Value| s["dataplane"]["unresolvedRoutes"].to_string();
    assert!(
        eventually(Duration::from_secs(15), || route_b2().is_empty()
            && lab.status(&n1).is_some_and(
                |s| unresolved(&s).contains(&b2) && unresolved(&s).contains("no ipip module")
            )),
        "route {:?}; status {:?}",
        route_b2(),
        lab.status(&n1)
    );
    assert!(
        !in_ns(&p1, &["ping", "-c", "1", "-W", "1", &p2.to_string()]).0,
        "p1 reached p2 unencapsulated"
    );
    lab.restart_node(&n1);
    lab.wait_ready(&n1);
    let log = lab.node_logs(&n1);
    assert!(
        log.contains("IPPool \\\"default-ipv4-ippool\\\": spec.ipipMode = Always")
            || log.contains("IPPool \"default-ipv4-ippool\": spec.ipipMode = Always"),
        "no error at start:\n{log}"
    );
    assert!(
        log.contains("spec.bindMode = NodeIP"),
        "no warning at start:\n{log}"
    );
    let mut table = String::new();
    assert!(
        eventually(Duration::from_secs(15), || {
            table = in_ns(&n1, &[MARGAY, "status"]).1;
            table.contains(&format!("Unresolved next hop: {b2}"))
        }),
        "{table}"
    );
    for want in [
        "ERROR: IPPool \"default-ipv4-ippool\": spec.ipipMode = Always",
        "no ipip module",
        "IPIP: tunl0 not ready",
        "Not supported: BGPConfiguration \"default\": spec.bindMode = NodeIP",
    ] {
        assert!(table.contains(want), "{want:?} missing:\n{table}");
    }
    assert!(
        route_b2().is_empty(),
        "installed after the restart: {}",
        route_b2()
    );
    let metrics = common::lab::http_get(&n1, margay::api::DEFAULT_LISTEN, "/metrics")
        .expect("metrics")
        .1;
    assert!(metrics.contains("margay_dataplane_errors 1"), "{metrics}");

    // The command the status gives, run as it is, switches the pool: the IPIP error goes.
    let fix = table
        .split("margay apply -f - <<'EOF'\n")
        .nth(1)
        .and_then(|t| t.split("\nEOF").next())
        .unwrap_or_else(|| panic!("no apply command in:\n{table}"));
    let (ok, out) = {
        use std::process::{Command, Stdio};
        let mut c = Command::new("ip")
            .args([
                "netns",
                "exec",
                &n1,
                MARGAY,
                "apply",
                "-f",
                "-",
                "--etcd-endpoints",
                ETCD,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        c.stdin
            .take()
            .expect("stdin")
            .write_all(fix.as_bytes())
            .expect("write");
        common::lab::run_output(c.wait_with_output())
    };
    assert!(ok, "{fix}\n{out}");
    assert!(
        eventually(Duration::from_secs(10), || lab
            .status(&n1)
            .is_some_and(|s| !errors(&s).contains("ipipMode"))),
        "{:?}",
        lab.status(&n1)
    );
    // VXLAN (IPv4) is built: nothing is left to report, n2's block goes through it, the IPIP address is
    // released from the Node.
    assert!(
        eventually(Duration::from_secs(15), || route_b2()
            .contains("dev vxlan.calico")),
        "{}\n{}",
        route_b2(),
        lab.node_logs(&n1)
    );
    assert!(
        in_ns(&p1, &["ping", "-c", "2", "-W", "2", &p2.to_string()]).0,
        "p1 -> p2 after the switch to VXLAN"
    );
    assert!(eventually(Duration::from_secs(10), || ipip_addr(&n1).is_none()));
    let s = lab.status(&n1).expect("status");
    assert_eq!(s["dataplane"]["errors"], serde_json::json!([]), "{s}");
    assert!(s["dataplane"]["ipip"].is_null(), "{s}");
}

/// The lab's default pool with `encap` (`vxlanMode`, `ipipMode`) set to `mode`.
fn encap_pool_yaml(encap: &str, mode: &str) -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  \
         cidr: 10.244.0.0/16\n  blockSize: 26\n  natOutgoing: true\n  {encap}: {mode}\n  nodeSelector: all()\n"
    )
}

fn pool_mode_yaml(mode: &str) -> String {
    encap_pool_yaml("vxlanMode", mode)
}

/// ```text
///   netns <lab>-br: bridge 10.99.0.0/24
///     |-- n1 eth0 10.99.0.11  vxlan.calico (VNI 4096, port 4789, MAC 66:+sha1("n1")[0..5], tunnel addr from IPAM)
///     |     └── pod p1
///     `-- n2 eth0 10.99.0.12  vxlan.calico
///           └── pod p2
///   pool default-ipv4-ippool 10.244.0.0/16: vxlanMode Never -> Always -> CrossSubnet -> Never (live)
/// ```
/// Expect: Always: n1 routes n2's block `via <n2 tunnel addr> dev vxlan.calico onlink`, with n2's PERMANENT
/// neighbour and `self permanent` FDB entry, pods ping each other and the VXLAN device counts the packets;
/// each Node resource carries its `ipv4VXLANTunnelAddr`. CrossSubnet between nodes of one subnet: plain
/// `via 10.99.0.12`, the tunnel carries nothing. Never: the device goes, routes stay plain, pings work.
/// Not covered here: nodes in two subnets (no `margay lab --subnets 2` yet).
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn vxlan_always_crosssubnet_never_live() {
    const T: &str = "vxlan_always_crosssubnet_never_live";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("vx", 2, 1, &[]);
    let (n1, n2) = (lab.nodes[0].0.clone(), lab.nodes[1].0.clone());
    lab.wait_ready(&n1);
    lab.wait_ready(&n2);
    let b2 = common::lab::own_block(&n2).to_string();
    let p1 = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n1)
        .expect("pod on n1")
        .0
        .clone();
    let p2 = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n2)
        .expect("pod on n2")
        .2;
    let ping = |n: &str| {
        in_ns(
            &p1,
            &["ping", "-c", n, "-i", "0.2", "-W", "2", &p2.to_string()],
        )
        .0
    };
    assert!(ping("1"), "plain ping");

    apply(&lab, &n1, &pool_mode_yaml("Always"));
    let node_tunnel = |n: &str| -> Option<String> {
        let (ok, out) = in_ns(
            &format!("{}-etcd", lab.name),
            &[
                "etcdctl",
                "--endpoints",
                ETCD,
                "get",
                &format!("/calico/resources/v3/projectcalico.org/nodes/{n}"),
                "--print-value-only",
            ],
        );
        let v: serde_json::Value = serde_json::from_str(out.trim()).ok().filter(|_| ok)?;
        v["spec"]["ipv4VXLANTunnelAddr"].as_str().map(String::from)
    };
    assert!(
        eventually(Duration::from_secs(15), || node_tunnel(&n2).is_some()),
        "n2 never got a tunnel address\n{}",
        lab.node_logs(&n2)
    );
    let t2 = node_tunnel(&n2).expect("tunnel");
    assert!(
        eventually(Duration::from_secs(15), || proto77_text(&n1).lines().any(
            |l| l.starts_with(&format!("{b2} via {t2} dev vxlan.calico ")) && l.contains("onlink")
        )),
        "n2's block not through the tunnel on n1:\n{}\n{}",
        proto77_text(&n1),
        lab.node_logs(&n1)
    );
    // The device as Calico builds it, and n2's entries.
    let mac2 = {
        let h = common::sh(&format!("printf %s {n2} | sha1sum"));
        let h = h.split_whitespace().next().expect("sha1").to_string();
        format!(
            "66:{}:{}:{}:{}:{}",
            &h[0..2],
            &h[2..4],
            &h[4..6],
            &h[6..8],
            &h[8..10]
        )
    };
    let dev = common::sh(&format!("ip -n {n1} -d link show vxlan.calico"));
    for want in [
        "vxlan id 4096",
        "local 10.99.0.11",
        "dev eth0",
        "dstport 4789",
        "nolearning",
        "mtu 1450",
    ] {
        assert!(dev.contains(want), "{want:?} missing:\n{dev}");
    }
    let neigh = common::sh(&format!("ip -n {n1} neigh show dev vxlan.calico"));
    assert!(
        neigh.contains(&format!("{t2} lladdr {mac2} PERMANENT")),
        "{neigh}"
    );
    let fdb = common::sh(&format!("bridge -n {n1} fdb show dev vxlan.calico"));
    assert!(
        fdb.contains(&format!("{mac2} dst 10.99.0.12 self permanent")),
        "{fdb}"
    );
    let (_, table) = in_ns(&n1, &[MARGAY, "status"]);
    assert!(
        table.contains("VXLAN: vxlan.calico up, tunnel address ")
            && table.contains("1 remote VTEPs"),
        "{table}"
    );
    let before = tx_packets(&n1, "vxlan.calico");
    assert!(ping("3"), "ping through VXLAN");
    assert!(
        tx_packets(&n1, "vxlan.calico") >= before + 3,
        "the tunnel did not carry the pings"
    );

    // CrossSubnet: both nodes in 10.99.0.0/24, so no encapsulation between them.
    apply(&lab, &n1, &pool_mode_yaml("CrossSubnet"));
    assert!(
        eventually(Duration::from_secs(15), || proto77_text(&n1)
            .contains(&format!("{b2} via 10.99.0.12 dev eth0"))),
        "{}",
        proto77_text(&n1)
    );
    let before = tx_packets(&n1, "vxlan.calico");
    assert!(ping("3"), "ping with CrossSubnet");
    assert_eq!(
        tx_packets(&n1, "vxlan.calico"),
        before,
        "same-subnet traffic was encapsulated"
    );

    // Never: the device goes, the tunnel address is released from the Node.
    apply(&lab, &n1, &pool_mode_yaml("Never"));
    assert!(
        eventually(Duration::from_secs(15), || !in_ns(
            &n1,
            &["ip", "link", "show", "vxlan.calico"]
        )
        .0),
        "vxlan.calico still there"
    );
    assert!(eventually(Duration::from_secs(15), || node_tunnel(&n1).is_none()));
    assert!(proto77_text(&n1).contains(&format!("{b2} via 10.99.0.12")));
    assert!(ping("1"), "plain ping again");
}

/// ```text
///   netns <lab>-br: router, knows no pod route
///     br0 10.99.0.1/24                          br1 10.99.1.1/24
///      |-- n1 10.99.0.11 (pod p1)                |-- n2 10.99.1.12 (pod p2)
///      |-- n3 10.99.0.13 (pod p3)                |
///      `-- etcd 10.99.0.2
///   iBGP full mesh across the router; pool 10.244.0.0/16 vxlanMode CrossSubnet (margay lab up --subnets 2)
/// ```
/// Expect, CrossSubnet: every pod pings every pod; n1 reaches n3's block plainly (`via 10.99.0.13 dev
/// eth0`, the tunnel carries nothing) and n2's through `vxlan.calico` (its counter moves). Always: n3's
/// block goes through the tunnel too. Never: n2's block is resolved recursively through n1's default route
/// (`via 10.99.0.1 dev eth0`, BIRD `gateway recursive`), and since the router knows no pod route p1 no
/// longer reaches p2, while p3 stays reachable.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn two_subnets_crosssubnet_encapsulates_only_across_the_router() {
    const T: &str = "two_subnets_crosssubnet_encapsulates_only_across_the_router";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("sub", 3, 1, &["--subnets", "2"]);
    let x = AcrossRouter::new(&lab);

    // CrossSubnet.
    x.wait_routes(&["dev vxlan.calico"], &["via 10.99.0.13 dev eth0"]);
    x.crosssubnet_traffic("vxlan.calico");

    // Always: the same-segment node goes through the tunnel too.
    apply(&lab, &x.n1, &pool_mode_yaml("Always"));
    x.wait_routes(&[], &["dev vxlan.calico"]);
    x.always_traffic("vxlan.calico");

    // Never: n2's block resolves through the default route; the router drops it (no pod route there).
    apply(&lab, &x.n1, &pool_mode_yaml("Never"));
    x.wait_routes(&["via 10.99.0.1 dev eth0"], &[]);
    x.never_traffic();
}

fn pool_ipip_yaml(mode: &str) -> String {
    encap_pool_yaml("ipipMode", mode)
}

/// ```text
///   netns <lab>-br: router, knows no pod route
///     br0 10.99.0.1/24                          br1 10.99.1.1/24
///      |-- n1 10.99.0.11 (pod p1)                |-- n2 10.99.1.12 (pod p2)
///      |-- n3 10.99.0.13 (pod p3)                |
///      `-- etcd 10.99.0.2
///   iBGP full mesh across the router; pool 10.244.0.0/16 ipipMode CrossSubnet -> Always -> Never (live)
///   every node: tunl0 (the ipip module's fallback device), its tunnel address from IPAM
/// ```
/// Expect, CrossSubnet: every node's Node carries `spec.bgp.ipv4IPIPTunnelAddr`, which is tunl0's only
/// address; n1 routes n2's block `via 10.99.1.12 dev tunl0 onlink` (the gateway is the remote node itself)
/// and n3's plainly `via 10.99.0.13 dev eth0`; p1 -> p3 leaves tunl0's counter alone, p1 -> p2 moves it.
/// Always: n3's block goes through tunl0 too. Never: tunl0 loses its address, the Node its field, and n2's
/// block resolves through the default route (the router drops it: no pod route there).
/// Runs only where the kernel has the ipip module (scripts/test.sh skips it, saying so, where it has not).
#[test]
#[ignore = "needs the ipip kernel module (and root, etcd, iproute2, ping): scripts/test.sh runs it (--include-ignored) where `modprobe -n ipip` or /sys/module/ipip shows the module, and skips it with a printed line elsewhere"]
fn ipip_crosssubnet_always_never_across_the_router() {
    const T: &str = "ipip_crosssubnet_always_never_across_the_router";
    if !(common::lab::lab_prerequisites(T)
        && require(
            kernel_has_ipip(),
            T,
            "this kernel cannot create an ipip device (no ipip module)",
        ))
    {
        return;
    }
    let lab = Lab::with("ipx", 3, 1, &["--subnets", "2"]);
    let x = AcrossRouter::new(&lab);
    let (n1, n2, n3) = (&x.n1, &x.n2, &x.n3);
    let ipip_addr = |n: &str| {
        node_json(&lab, n)["spec"]["bgp"]["ipv4IPIPTunnelAddr"]
            .as_str()
            .map(String::from)
    };

    apply(&lab, n1, &pool_ipip_yaml("CrossSubnet"));
    x.wait_routes(
        &["via 10.99.1.12 dev tunl0", "onlink"],
        &["via 10.99.0.13 dev eth0"],
    );
    for n in [n1, n2, n3] {
        assert!(
            eventually(Duration::from_secs(10), || ipip_addr(n).is_some()),
            "{n}: no ipv4IPIPTunnelAddr: {}",
            node_json(&lab, n)
        );
    }
    let t1 = ipip_addr(n1).expect("n1's tunnel address");
    let addrs = common::sh(&format!("ip -n {n1} -4 -o addr show dev tunl0"));
    assert!(
        addrs.contains(&format!("inet {t1}/32")) && addrs.lines().count() == 1,
        "tunl0 on n1: {addrs}"
    );
    x.crosssubnet_traffic("tunl0");
    let (_, table) = in_ns(n1, &[MARGAY, "status"]);
    assert!(
        table.contains(&format!("IPIP: tunl0 up, tunnel address {t1}")),
        "{table}"
    );

    // Always: the same-segment node goes through the tunnel too.
    apply(&lab, n1, &pool_ipip_yaml("Always"));
    x.wait_routes(&[], &["via 10.99.0.13 dev tunl0"]);
    x.always_traffic("tunl0");

    // Never: plain routes, resolved recursively; the router drops pod traffic; tunl0 released.
    apply(&lab, n1, &pool_ipip_yaml("Never"));
    x.wait_routes(&["via 10.99.0.1 dev eth0"], &[]);
    assert!(eventually(Duration::from_secs(10), || ipip_addr(n1).is_none()));
    assert!(
        common::sh(&format!("ip -n {n1} -4 -o addr show dev tunl0"))
            .trim()
            .is_empty(),
        "tunl0 kept an address"
    );
    x.never_traffic();
}

/// ```text
///   netns <lab>-br: router (no pod route), br0 10.99.0.0/24 | br1 10.99.1.0/24
///     n1 10.99.0.11 (pod p1)                 |  n2 10.99.1.12 (pod p2)       pool vxlanMode CrossSubnet
///     n3 10.99.0.13 (pod p3)                 |
///   every daemon restarted with CALICO_NETWORKING_BACKEND=vxlan: no BGP session at all
/// ```
/// Expect: no peers in `margay status`, n1 routes n2's block through `vxlan.calico` and n3's plainly (from the
/// blocks' affinities in etcd, not from BGP), and the ping matrix is full: every pod pings every other pod,
/// across the router and within the segment, as with BGP.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn vxlan_only_backend_routes_without_bgp() {
    const T: &str = "vxlan_only_backend_routes_without_bgp";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("vxo", 3, 1, &["--subnets", "2"]);
    let nodes: Vec<String> = lab.nodes.iter().map(|n| n.0.clone()).collect();
    let (n1, n2, n3) = (nodes[0].clone(), nodes[1].clone(), nodes[2].clone());
    for n in &nodes {
        lab.restart_node_with_env(n, &[("CALICO_NETWORKING_BACKEND", "vxlan")]);
    }
    for n in &nodes {
        let s = lab.wait_ready(n);
        assert_eq!(s["peers"], serde_json::json!([]), "{n} has BGP peers: {s}");
    }
    let (b2, b3) = (
        common::lab::own_block(&n2).to_string(),
        common::lab::own_block(&n3).to_string(),
    );
    assert!(
        eventually(Duration::from_secs(15), || {
            let r = proto77_text(&n1);
            r.lines()
                .any(|l| l.starts_with(&format!("{b2} ")) && l.contains("dev vxlan.calico"))
                && r.lines()
                    .any(|l| l.starts_with(&format!("{b3} via 10.99.0.13 dev eth0")))
        }),
        "{}\n{}",
        proto77_text(&n1),
        lab.node_logs(&n1)
    );
    // Readiness swept what BGP had installed before the restart and nobody re-announced: the routes above
    // come from the affinity path, and stay.
    std::thread::sleep(Duration::from_millis(500));
    assert!(proto77_text(&n1).contains(&b2));
    for (from, _, _) in &lab.pods {
        for (to, _, ip) in &lab.pods {
            if from == to {
                continue;
            }
            assert!(
                eventually(Duration::from_secs(5), || in_ns(
                    from,
                    &["ping", "-c", "1", "-W", "1", &ip.to_string()]
                )
                .0),
                "{from} -> {to} without BGP"
            );
        }
    }
    let log = lab.node_logs(&n1);
    assert!(log.contains("networking backend vxlan"), "{log}");
    assert!(
        log.contains("VXLAN-only: routes from block affinities routes=2"),
        "the routes did not come from the affinity path:\n{log}"
    );
}

/// Put a v3 resource straight into the lab's etcd.
fn put(lab: &Lab, plural: &str, name: &str, json: &str) {
    let key = format!("/calico/resources/v3/projectcalico.org/{plural}/{name}");
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &["etcdctl", "--endpoints", ETCD, "put", &key, json],
    );
    assert!(ok, "etcdctl put {key}: {out}");
}

/// ```text
///   netns <lab>-br: router + BIRD 2 "ToR" (AS 65001): learns the nodes' blocks, installs them, and passes
///   them on to the other segment with the next hop kept (`next hop keep`)
///     br0 10.99.0.1/24 ── n1 10.99.0.11 (rack A, AS 64512, pod p1)   BGPPeer tor-a: node n1 -> 10.99.0.1
///     br1 10.99.1.1/24 ── n2 10.99.1.12 (rack B, AS 64513, pod p2)   BGPPeer tor-b: node n2 -> 10.99.1.1
///   an AS per rack, as Calico documents for ToR designs; nodeToNodeMeshEnabled false (nodes peer only with
///   their ToR); pool vxlanMode Never (no encapsulation)
/// ```
/// Expect: n1 learns n2's block from the ToR with next hop 10.99.1.12 (not on its link) and installs it
/// through the covering route's gateway, `via 10.99.0.1 dev eth0` (BIRD `gateway recursive`); the ToR
/// forwards on the block it learned from n2, so p1 pings p2 unencapsulated.
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn tor_routes_pods_across_subnets_with_recursive_next_hops() {
    const T: &str = "tor_routes_pods_across_subnets_with_recursive_next_hops";
    if !(common::lab::lab_prerequisites(T)
        && require(
            common::bgp_peers::have_bird(),
            T,
            "BIRD 2 is not installed (bird2)",
        ))
    {
        return;
    }
    let lab = Lab::with("tor", 2, 1, &["--subnets", "2"]);
    let (n1, n2) = (lab.nodes[0].0.clone(), lab.nodes[1].0.clone());
    apply(&lab, &n1, &pool_mode_yaml("Never"));
    put(
        &lab,
        "bgpconfigurations",
        "default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"nodeToNodeMeshEnabled":false}}"#,
    );
    let br = format!("{}-br", lab.name);
    let conf = "router id 10.99.0.1;\nprotocol device {}\nprotocol kernel { ipv4 { export all; }; }\n\
        protocol bgp a { local 10.99.0.1 as 65001; neighbor 10.99.0.11 as 64512; ipv4 { import all; export all; next hop keep; }; }\n\
        protocol bgp b { local 10.99.1.1 as 65001; neighbor 10.99.1.12 as 64513; ipv4 { import all; export all; next hop keep; }; }\n";
    // Rack B's AS, on n2's Node resource (read at start).
    {
        let key = format!("/calico/resources/v3/projectcalico.org/nodes/{n2}");
        let etcd = format!("{}-etcd", lab.name);
        let (ok, out) = in_ns(
            &etcd,
            &[
                "etcdctl",
                "--endpoints",
                ETCD,
                "get",
                &key,
                "--print-value-only",
            ],
        );
        assert!(ok, "{out}");
        let mut v: serde_json::Value = serde_json::from_str(out.trim()).expect("Node JSON");
        v["spec"]["bgp"]["asNumber"] = serde_json::json!(64513);
        let (ok, out) = in_ns(
            &etcd,
            &["etcdctl", "--endpoints", ETCD, "put", &key, &v.to_string()],
        );
        assert!(ok, "{out}");
        lab.restart_node(&n2);
    }
    let bird = common::bgp_peers::Bird::start(&br, conf);
    for (peer, node, ip) in [("tor-a", &n1, "10.99.0.1"), ("tor-b", &n2, "10.99.1.1")] {
        put(
            &lab,
            "bgppeers",
            peer,
            &format!(
                r#"{{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{{"name":"{peer}"}},"spec":{{"node":"{node}","peerIP":"{ip}","asNumber":65001}}}}"#
            ),
        );
    }
    let b2 = common::lab::own_block(&n2).to_string();
    assert!(
        eventually(Duration::from_secs(30), || bird
            .birdc(&format!("show route for {b2}"))
            .contains("10.99.1.12")),
        "the ToR never learned {b2}:\n{}\n{}",
        bird.birdc("show protocols all"),
        bird.log()
    );
    assert!(
        eventually(Duration::from_secs(15), || proto77_text(&n1)
            .lines()
            .any(|l| l.starts_with(&format!("{b2} via 10.99.0.1 dev eth0")))),
        "not resolved through the ToR:\n{}",
        proto77_text(&n1)
    );
    let p1 = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n1)
        .expect("p1")
        .0
        .clone();
    let p2 = lab.pods.iter().find(|(_, n, _)| *n == n2).expect("p2").2;
    assert!(
        eventually(Duration::from_secs(10), || in_ns(
            &p1,
            &["ping", "-c", "1", "-W", "1", &p2.to_string()]
        )
        .0),
        "p1 -> p2 through the ToR\nrouter:\n{}\nn2:\n{}\nn1:\n{}",
        common::sh(&format!("ip -n {br} route")),
        common::sh(&format!("ip -n {n2} route")),
        common::sh(&format!("ip -n {n1} route"))
    );
    assert_eq!(
        tx_packets(&n1, "vxlan.calico"),
        0,
        "encapsulated although vxlanMode is Never"
    );
}

/// ```text
///   netns <lab>-br: bridge, 10.99.0.0/24 and fd00:99::/64
///     |-- n1 10.99.0.11, fd00:99::11 (IP6)  vxlan-v6.calico (MAC 66:+sha1("n1-v6")[0..5])  └── pod a (dual stack)
///     `-- n2 10.99.0.12, fd00:99::12 (IP6)  vxlan-v6.calico                                 └── pod b (dual stack)
///   pool v6 fd00:244::/48 (/122 blocks) vxlanMode Always; IPv6 blocks over the IPv4 sessions (MP-BGP)
/// ```
/// Expect: n1 routes n2's IPv6 block `via <n2's IPv6 tunnel address> dev vxlan-v6.calico onlink`, the Node
/// carries `spec.ipv6VXLANTunnelAddr`, and pod a pings pod b over IPv6 through the tunnel (its counter moves).
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn vxlan_ipv6_pool_goes_through_vxlan_v6() {
    const T: &str = "vxlan_ipv6_pool_goes_through_vxlan_v6";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("vx6", 2, 0, &[]);
    let (n1, n2) = (lab.nodes[0].0.clone(), lab.nodes[1].0.clone());
    for (n, a) in [(&n1, "fd00:99::11"), (&n2, "fd00:99::12")] {
        common::sh(&format!("ip -n {n} addr add {a}/64 dev eth0 nodad"));
    }
    apply(
        &lab,
        &n1,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: v6\nspec:\n  cidr: fd00:244::/48\n  \
         blockSize: 122\n  vxlanMode: Always\n  nodeSelector: all()\n",
    );
    for (n, a) in [(&n1, "fd00:99::11"), (&n2, "fd00:99::12")] {
        lab.restart_node_with_env(n, &[("IP6", a)]);
    }
    for n in [&n1, &n2] {
        lab.wait_ready(n);
    }
    let pods = [format!("{}-a", lab.name), format!("{}-b", lab.name)];
    let _pods = Netns::new(&[&pods[0], &pods[1]]);
    let v6_of = |node: &str, pod: &str| -> std::net::Ipv6Addr {
        let (ok, out) = lab.pod_cni(node, pod, "ADD");
        assert!(ok, "CNI ADD {pod}: {out}\n{}", lab.node_logs(node));
        let v: serde_json::Value = serde_json::from_str(&out).expect("CNI result");
        v["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|i| i["address"].as_str())
            .filter_map(|a| a.split('/').next()?.parse().ok())
            .next()
            .unwrap_or_else(|| panic!("no IPv6 address in {out}"))
    };
    let _a = v6_of(&n1, &pods[0]);
    let b = v6_of(&n2, &pods[1]);
    let b_block = {
        let out = common::sh(&format!("ip -n {n2} -6 route show proto 77"));
        out.lines()
            .find(|l| l.starts_with("blackhole"))
            .and_then(|l| l.split_whitespace().nth(1).map(String::from))
            .unwrap_or_else(|| panic!("no IPv6 blackhole on n2: {out}"))
    };
    let routes6 = |n: &str| common::sh(&format!("ip -n {n} -6 route show proto 77"));
    assert!(
        eventually(Duration::from_secs(20), || routes6(&n1).lines().any(|l| l
            .starts_with(&format!("{b_block} via "))
            && l.contains("dev vxlan-v6.calico"))),
        "n2's IPv6 block not through vxlan-v6.calico on n1:\n{}\n{}",
        routes6(&n1),
        lab.node_logs(&n1)
    );
    let node_json = {
        let (ok, out) = in_ns(
            &format!("{}-etcd", lab.name),
            &[
                "etcdctl",
                "--endpoints",
                ETCD,
                "get",
                &format!("/calico/resources/v3/projectcalico.org/nodes/{n2}"),
                "--print-value-only",
            ],
        );
        assert!(ok, "{out}");
        out
    };
    assert!(node_json.contains("ipv6VXLANTunnelAddr"), "{node_json}");
    let before = tx_packets(&n1, "vxlan-v6.calico");
    assert!(
        eventually(Duration::from_secs(10), || in_ns(
            &pods[0],
            &["ping", "-6", "-c", "1", "-W", "1", &b.to_string()]
        )
        .0),
        "pod a -> pod b over IPv6\n{}",
        routes6(&n1)
    );
    assert!(
        tx_packets(&n1, "vxlan-v6.calico") > before,
        "the IPv6 tunnel carried nothing"
    );
}
