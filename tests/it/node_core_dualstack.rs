//! Dual-stack pods: with an IPv6 pool (MARGAY_IPV6POOL_CIDR) and the node's IPv6 address (IP6), an ADD gives
//! the pod an IPv4 /32 and an IPv6 /128; the node writes its IPv6 address to its Node resource
//! (`ipv6Address`), so the nodes also mesh over IPv6 transport (as Calico's BIRD does), each family on its own
//! session; the node's IPv6 block lands in the other node's FIB via its IPv6 address; the pods ping each
//! other over both families.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24 (+ fd99::/64 on the nodes), etcd 10.99.0.2
//!     n1 10.99.0.11 ◀──iBGP, IPv4 transport, IPv4 unicast──▶ n2 10.99.0.12
//!     n1 fd99::11   ◀──iBGP, IPv6 transport, IPv6 unicast──▶ n2 fd99::12
//!     <lab>-v6a (on n1): 10.244.x.y/32, fd00:244::../128      <lab>-v6b (on n2): same shape
//!   n1's FIB: n2's IPv6 /122 block via fd99::12 proto 77 (and the reverse)
//! ```
//!
//! Needs root, etcd, iproute2 and ping; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::net::IpAddr;
use std::time::Duration;

use common::lab::{eventually, in_ns, run, Lab};
use common::Netns;
use serde_json::Value;

const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");
const POOL6: &str = "fd00:244::/48";

/// IPv6 routes of margay's protocol in `ns`: (prefix, gateway or "blackhole").
fn proto77_v6(ns: &str) -> Vec<(String, String)> {
    let (ok, out) = run(
        std::process::Command::new("ip").args(["-6", "-n", ns, "route", "show", "proto", "77"])
    );
    assert!(ok, "ip -6 route in {ns}: {out}");
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() == Some(&"blackhole") {
                Some((w.get(1)?.to_string(), "blackhole".to_string()))
            } else {
                let via = w.iter().position(|x| *x == "via")?;
                Some((w.first()?.to_string(), w.get(via + 1)?.to_string()))
            }
        })
        .collect()
}

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn dual_stack_pods_ping_across_nodes_over_both_families() {
    const T: &str = "dual_stack_pods_ping_across_nodes_over_both_families";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgd", 2, 1, &[]);
    let (n1, _) = lab.nodes[0].clone();
    let (n2, _) = lab.nodes[1].clone();
    for (node, ip6) in [(&n1, "fd99::11"), (&n2, "fd99::12")] {
        let (ok, out) = in_ns(
            node,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        assert!(ok, "address {ip6} on {node}: {out}");
        lab.restart_node_with_env(node, &[("IP6", ip6), ("MARGAY_IPV6POOL_CIDR", POOL6)]);
        lab.wait_ready(node);
    }
    // The Node resources carry the IPv6 addresses, and the IPv6 mesh sessions come up.
    for (node, ip6, other_ip6) in [(&n1, "fd99::11", "fd99::12"), (&n2, "fd99::12", "fd99::11")] {
        let (ok, out) = in_ns(
            &format!("{}-etcd", lab.name),
            &[
                "etcdctl",
                "--endpoints",
                common::lab::ETCD,
                "get",
                &format!("/calico/resources/v3/projectcalico.org/nodes/{node}"),
                "--print-value-only",
            ],
        );
        assert!(
            ok && out.contains(&format!("\"ipv6Address\":\"{ip6}/64\"")),
            "Node {node}: {out}"
        );
        assert!(
            eventually(Duration::from_secs(60), || lab
                .status(node)
                .and_then(|s| s["peers"].as_array().cloned())
                .is_some_and(|p| p.iter().any(
                    |p| p["address"] == other_ip6 && p["fsmState"] == "Established"
                ))),
            "{node}: no Established IPv6 session with {other_ip6}: {:?}\n{}",
            lab.status(node),
            lab.logs()
        );
    }
    let (pa, pb) = (format!("{}-v6a", lab.name), format!("{}-v6b", lab.name));
    let _ns = Netns::new(&[&pa, &pb]);
    let mut addrs = Vec::new();
    for (node, pod) in [(&n1, &pa), (&n2, &pb)] {
        let (ok, out) = lab.pod_cni(node, pod, "ADD");
        assert!(ok, "ADD {pod} on {node}: {out}\n{}", lab.node_logs(node));
        let r: Value = serde_json::from_str(&out).expect("CNI result");
        let ips: Vec<IpAddr> = r["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .collect();
        let v4 = ips
            .iter()
            .find(|i| i.is_ipv4())
            .copied()
            .unwrap_or_else(|| panic!("no IPv4 in {r}"));
        let v6 = ips
            .iter()
            .find(|i| i.is_ipv6())
            .copied()
            .unwrap_or_else(|| panic!("no IPv6 in {r}"));
        let pool: ipnetwork::IpNetwork = POOL6.parse().unwrap();
        assert!(pool.contains(v6), "{v6} outside {POOL6}");
        assert!(
            out.contains("fe80::ecee:eeff:feee:eeee"),
            "no IPv6 default route via the host veth in {r}"
        );
        addrs.push((v4, v6));
    }
    // Each node's IPv6 block reaches the other node's FIB via its IPv6 address.
    for (node, other_ip6) in [(&n1, "fd99::12"), (&n2, "fd99::11")] {
        assert!(
            eventually(Duration::from_secs(30), || proto77_v6(node)
                .iter()
                .any(|(p, via)| via == other_ip6 && p.ends_with("/122"))),
            "{node} has no IPv6 block via {other_ip6}: {:?}\n{}",
            proto77_v6(node),
            lab.logs()
        );
    }
    for (from, (v4, v6)) in [(&pa, addrs[1]), (&pb, addrs[0])] {
        for ip in [v4, v6] {
            let (ok, out) = in_ns(from, &["ping", "-c", "1", "-W", "2", &ip.to_string()]);
            assert!(ok, "{from} cannot ping {ip}: {out}\n{:?}", proto77_v6(&n1));
        }
    }
    for (node, pod) in [(&n1, &pa), (&n2, &pb)] {
        let (ok, out) = lab.pod_cni(node, pod, "DEL");
        assert!(ok, "DEL {pod}: {out}");
    }
}

/// IP6=autodetect, re-checked beside the IPv4 address (here every second): n1's IPv6 address is found by
/// first-found and written to its Node; when it changes, the Node's `ipv6Address` follows and n2 re-peers
/// over IPv6 with the new address.
///
/// ```text
///   n1 10.99.0.11, IP6=autodetect: fd99::11 ─▶ fd99::21      n2 10.99.0.12, IP6=fd99::12
///   expect: Node n1 ipv6Address fd99::11/64, n2 ◀─IPv6─▶ fd99::11 Established;
///           then Node n1 ipv6Address fd99::21/64, n2 ◀─IPv6─▶ fd99::21 Established, fd99::11 gone
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd and iproute2: scripts/test.sh runs it (--include-ignored)"]
fn an_autodetected_ipv6_address_is_rechecked_and_the_peers_follow() {
    const T: &str = "an_autodetected_ipv6_address_is_rechecked_and_the_peers_follow";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mg6", 2, 0, &[]);
    let (n1, _) = lab.nodes[0].clone();
    let (n2, _) = lab.nodes[1].clone();
    let add = |node: &str, ip6: &str| {
        let (ok, out) = in_ns(
            node,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        assert!(ok, "address {ip6} on {node}: {out}");
    };
    add(&n2, "fd99::12");
    lab.restart_node_with_env(&n2, &[("IP6", "fd99::12")]);
    add(&n1, "fd99::11");
    lab.restart_node_with_env(
        &n1,
        &[("IP6", "autodetect"), ("MARGAY_IP_RECHECK_INTERVAL", "1")],
    );
    lab.wait_ready(&n1);
    let node_doc = |node: &str| {
        in_ns(
            &format!("{}-etcd", lab.name),
            &[
                "etcdctl",
                "--endpoints",
                common::lab::ETCD,
                "get",
                &format!("/calico/resources/v3/projectcalico.org/nodes/{node}"),
                "--print-value-only",
            ],
        )
        .1
    };
    let n2_peer_up = |addr: &str| {
        lab.status(&n2)
            .and_then(|s| s["peers"].as_array().cloned())
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["address"] == addr && p["fsmState"] == "Established")
            })
    };
    for (ip6, old) in [("fd99::11", None), ("fd99::21", Some("fd99::11"))] {
        if let Some(old) = old {
            add(&n1, ip6);
            let (ok, out) = in_ns(
                &n1,
                &["ip", "addr", "del", &format!("{old}/64"), "dev", "eth0"],
            );
            assert!(ok, "delete {old} on {n1}: {out}");
        }
        let mut doc = String::new();
        assert!(
            eventually(Duration::from_secs(30), || {
                doc = node_doc(&n1);
                doc.contains(&format!("\"ipv6Address\":\"{ip6}/64\""))
            }),
            "Node {n1} does not carry {ip6}: {doc}\n{}",
            lab.node_logs(&n1)
        );
        assert!(
            eventually(Duration::from_secs(60), || n2_peer_up(ip6)
                && old.is_none_or(|o| !n2_peer_up(o))),
            "{n2} is not peered over IPv6 with {ip6} alone: {:?}\n{}",
            lab.status(&n2),
            lab.logs()
        );
    }
    assert!(
        lab.node_logs(&n1).contains("node IPv6 address changed"),
        "{}",
        lab.node_logs(&n1)
    );
}

/// Kills a daemon the test started itself, by PID, on drop (also on panic).
struct Daemon(std::process::Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// IPv6-only nodes (Calico's IP=none with IP6): no ipv4Address in their Node resources (the lab had
/// written one: it is removed), a BGP router id from the node name, one IPv6 mesh session between them,
/// each node's IPv6 block in the other's FIB via its IPv6 address, and pods that ping over IPv6.
///
/// ```text
///   n1 IP=none IP6=fd99::11 ◀──iBGP, IPv6 transport, IPv6 unicast──▶ n2 IP=none IP6=fd99::12
///   <lab>-o1 (on n1) fd00:244::../128   ping over IPv6   <lab>-o2 (on n2) fd00:244::../128
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn ipv6_only_nodes_peer_over_ipv6_and_their_pods_ping() {
    const T: &str = "ipv6_only_nodes_peer_over_ipv6_and_their_pods_ping";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgo", 2, 0, &[]);
    let nodes = [
        (lab.nodes[0].0.clone(), "fd99::11"),
        (lab.nodes[1].0.clone(), "fd99::12"),
    ];
    let mut daemons = Vec::new();
    for (node, ip6) in &nodes {
        lab.stop_daemon(node, nix::sys::signal::Signal::SIGTERM);
        let (ok, out) = in_ns(
            node,
            &[
                "ip",
                "addr",
                "add",
                &format!("{ip6}/64"),
                "dev",
                "eth0",
                "nodad",
            ],
        );
        assert!(ok, "address {ip6} on {node}: {out}");
        let log = lab.state.join(format!("{node}-v6only.log"));
        daemons.push(Daemon(
            std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    node,
                    common::lab::MARGAY,
                    "node",
                    "run",
                    "--node-name",
                    node,
                ])
                .args(["--etcd-endpoints", common::lab::ETCD])
                .arg("--cni-socket")
                .arg(lab.state.join(node).join("cni.sock"))
                .env("IP", "none")
                .env("IP6", ip6)
                .env("MARGAY_IPV6POOL_CIDR", POOL6)
                .env("RUST_LOG", "info")
                .stdout(std::process::Stdio::null())
                .stderr(std::fs::File::create(&log).expect("log file"))
                .spawn()
                .expect("start margay node"),
        ));
    }
    let log = |node: &str| {
        std::fs::read_to_string(lab.state.join(format!("{node}-v6only.log"))).unwrap_or_default()
    };
    for ((node, ip6), (other, other_ip6)) in [
        (nodes[0].clone(), nodes[1].clone()),
        (nodes[1].clone(), nodes[0].clone()),
    ] {
        let mut doc = String::new();
        assert!(
            eventually(Duration::from_secs(30), || {
                doc = in_ns(
                    &format!("{}-etcd", lab.name),
                    &[
                        "etcdctl",
                        "--endpoints",
                        common::lab::ETCD,
                        "get",
                        &format!("/calico/resources/v3/projectcalico.org/nodes/{node}"),
                        "--print-value-only",
                    ],
                )
                .1;
                doc.contains(&format!("\"ipv6Address\":\"{ip6}/64\""))
                    && !doc.contains("ipv4Address")
            }),
            "Node {node}: {doc}\n{}",
            log(&node)
        );
        let mut status = None;
        assert!(
            eventually(Duration::from_secs(60), || {
                status = lab.status(&node);
                status
                    .as_ref()
                    .and_then(|s| s["peers"].as_array().cloned())
                    .is_some_and(|p| {
                        p.len() == 1
                            && p[0]["address"] == other_ip6
                            && p[0]["fsmState"] == "Established"
                    })
            }),
            "{node}: not one Established IPv6 session with {other} ({other_ip6}): {status:?}\n{}",
            log(&node)
        );
    }
    let (pa, pb) = (format!("{}-o1", lab.name), format!("{}-o2", lab.name));
    let _ns = Netns::new(&[&pa, &pb]);
    let mut v6s = Vec::new();
    for ((node, _), pod) in nodes.iter().zip([&pa, &pb]) {
        let (ok, out) = lab.pod_cni(node, pod, "ADD");
        assert!(ok, "ADD {pod} on {node}: {out}\n{}", log(node));
        let r: Value = serde_json::from_str(&out).expect("CNI result");
        let v6: IpAddr = r["ips"]
            .as_array()
            .expect("ips")
            .iter()
            .filter_map(|i| i["address"].as_str()?.split('/').next()?.parse().ok())
            .find(|i: &IpAddr| i.is_ipv6())
            .unwrap_or_else(|| panic!("no IPv6 in {r}"));
        v6s.push(v6);
    }
    for ((node, _), (_, other_ip6)) in [
        (nodes[0].clone(), nodes[1].clone()),
        (nodes[1].clone(), nodes[0].clone()),
    ] {
        assert!(
            eventually(Duration::from_secs(30), || proto77_v6(&node)
                .iter()
                .any(|(p, via)| via == other_ip6 && p.ends_with("/122"))),
            "{node} has no IPv6 block via {other_ip6}: {:?}\n{}",
            proto77_v6(&node),
            log(&node)
        );
    }
    for (from, to) in [(&pa, v6s[1]), (&pb, v6s[0])] {
        assert!(
            eventually(Duration::from_secs(20), || in_ns(
                from,
                &["ping", "-c", "1", "-W", "2", &to.to_string()]
            )
            .0),
            "{from} cannot ping {to} over IPv6"
        );
    }
    for ((node, _), pod) in nodes.iter().zip([&pa, &pb]) {
        let (ok, out) = lab.pod_cni(node, pod, "DEL");
        assert!(ok, "DEL {pod}: {out}");
    }
    drop(daemons);
}
