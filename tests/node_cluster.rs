//! margay in a real cluster's shape, end to end through `margay node run` in a lab: outgoing NAT for
//! natOutgoing pools (live with pool changes, IPv4 and IPv6, natOutgoingAddress), pools chosen by node
//! labels, the pod MTU, and what the node cannot honour said clearly.
//!
//! Needs root, etcd, etcdctl, iproute2, ping and nftables; SKIP otherwise (a failure under CI=true).

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::dataplane::ns_path;
use common::lab_core::{eventually, in_ns, Lab};
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
fn nat_outgoing_follows_pools_live() {
    const T: &str = "nat_outgoing_follows_pools_live";
    if !(common::lab_core::lab_prerequisites(T)
        && require(have("nft"), T, "nftables is not installed"))
    {
        return;
    }
    let lab = Lab::up(MARGAY, "nat", 1, 1, &[]);
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

    // IPv6: a pool added live; a dual-stack pod masqueraded to the node's IPv6 address.
    apply(&lab, &n1, &pool_yaml("v6", "fd00:244::/48", 122, true));
    assert!(
        eventually(Duration::from_secs(10), || nat_set(&n1, "nat_v6")
            .contains("fd00:244::/48")),
        "IPv6 NAT never programmed"
    );
    let pod6 = format!("{}-v6pod", lab.name);
    let _pod6 = Netns::new(&[&pod6]);
    let (ok, res) = lab.cni(&n1, &pod6, "ADD");
    assert!(ok, "CNI ADD of a dual-stack pod: {res}");
    assert!(res.contains("fd00:244:"), "no IPv6 address: {res}");
    assert_eq!(tcp_seen(&pod6, srv6.addr), Some("fd00:99::11".to_string()));
    // The pool deleted: its NAT goes with it.
    let (ok, o) = lab.cni(&n1, &pod6, "DEL");
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
