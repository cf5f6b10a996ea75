//! `margay lab up --outside-router`: BGP to the fabric. A BIRD 2 router outside the cluster peers with
//! every node through one global BGPPeer (the node-to-node mesh stays on); the nodes export their blocks
//! and the service CIDR (Calico's export rules) and learn the router's default route and segment. A host
//! behind the router, which no node knows except through BGP, pings a pod on every node and a service
//! cluster IP (a kube-proxy-style DNAT in every node's nftables); a node leaving takes its block out of the
//! router's table.
//!
//! ```text
//!   <lab>-br: bridge br0 10.99.0.0/24 (its own router knows no pod route and not 10.97.0.0/24)
//!     |-- <lab>-n1 10.99.0.11 ─┐
//!     |-- <lab>-n2 10.99.0.12 ─┼─ iBGP mesh (AS 64512); each also eBGP to the router (global BGPPeer)
//!     |-- <lab>-n3 10.99.0.13 ─┘   learn: 0.0.0.0/0 and 10.97.0.0/24 via 10.99.0.10 (proto 77)
//!     `-- <lab>-rtr 10.99.0.10, BIRD AS 64567: every node's /26 and 10.96.0.0/12 in its table and kernel
//!            `-- eth1 10.97.0.1/24 ── <lab>-ext 10.97.0.2 (default via the router)
//!   every node: nft table kubeproxy: 10.96.0.10 -> DNAT n2's pod (masquerade when from outside the pool)
//! ```

use crate::common;

use std::time::{Duration, Instant};

use common::lab::{eventually, kube_proxy_dnat, lab_prerequisites, Lab, ETCD, MARGAY};
use common::{have, require, sh, try_sh};

fn pings(ns: &str, ip: &str) -> bool {
    try_sh(&format!("ip netns exec {ns} ping -c1 -W1 {ip}")).0
}

#[test]
#[ignore = "needs root (network namespaces), etcd, BIRD 2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn outside_router_learns_blocks_and_services_and_reaches_pods() {
    const T: &str = "outside_router_learns_blocks_and_services_and_reaches_pods";
    if !lab_prerequisites(T)
        || !require(
            have("bird") && have("birdc"),
            T,
            "needs BIRD 2 (scripts/install-deps.sh)",
        )
    {
        return;
    }
    let mut lab = Lab::with("or", 3, 1, &["--outside-router"]);
    let (rtr, ext) = (format!("{}-rtr", lab.name), format!("{}-ext", lab.name));
    let ctl = lab.state_path(&format!("{}-rtr-bird.ctl", lab.name));
    let router_table = || try_sh(&format!("birdc -s {} show route", ctl.display())).1;
    let etcd_ns = format!("{}-etcd", lab.name);
    let (ok, out) = try_sh(&format!(
        "printf '%s' 'apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceClusterIPs:\n  - cidr: 10.96.0.0/12\n' | ip netns exec {etcd_ns} {MARGAY} apply -f - --etcd-endpoints {ETCD}"
    ));
    assert!(ok, "apply BGPConfiguration: {out}");
    let nodes: Vec<String> = (0..3).map(|i| lab.node(i).to_string()).collect();
    let blocks: Vec<String> = nodes.iter().map(|n| lab.own_block(n).to_string()).collect();
    let pods: Vec<String> = lab.pods.iter().map(|(_, _, ip)| ip.to_string()).collect();
    assert_eq!(pods.len(), 3);
    for n in &nodes {
        kube_proxy_dnat(n, "10.96.0.10", &pods[1], "10.244.0.0/16");
    }

    // The router's table: every node's block and the service CIDR, each from the node that owns it.
    assert!(
        eventually(Duration::from_secs(20), || {
            let t = router_table();
            blocks.iter().all(|b| t.contains(b.as_str())) && t.contains("10.96.0.0/12")
        }),
        "the router lacks blocks or the service CIDR:\n{}\n{}",
        router_table(),
        lab.logs()
    );
    let table = router_table();
    println!("router table:\n{table}");
    let kernel = sh(&format!("ip -n {rtr} route show proto bird"));
    println!("router kernel:\n{kernel}");
    for (b, n) in blocks.iter().zip(&lab.nodes) {
        let line = sh(&format!("ip -n {rtr} route show {b}"));
        assert!(
            line.contains(&n.1.to_string()),
            "the router's kernel has no path to {b} via its node {}: {line:?}",
            n.1
        );
    }
    // The nodes learned the router's default route and segment (margay's metric, beside the lab's own
    // default route, which keeps metric 0).
    for n in &nodes {
        let learned = sh(&format!("ip -n {n} route show proto 77"));
        assert!(
            learned.contains("default via 10.99.0.10")
                && learned.contains("10.97.0.0/24 via 10.99.0.10"),
            "{n} did not learn the router's routes:\n{learned}"
        );
    }

    // The router sends the blocks back too (as a ToR exporting everything does): no node takes them
    // (AS 64512 in the path), so no block is routed towards the router.
    for n in &nodes {
        let learned = sh(&format!("ip -n {n} route show proto 77"));
        assert!(
            !learned
                .lines()
                .any(|l| (l.starts_with("10.244.") || l.starts_with("10.96."))
                    && l.contains("10.99.0.10")),
            "{n} took a block or service route back from the router (a loop):\n{learned}"
        );
    }
    // ... and the nodes did receive them: the router session counts more received than accepted.
    // The router exports the other nodes' blocks to n1 a moment after it installs them, so wait.
    let router_peer = || {
        let st = lab.status(&nodes[0]).expect("n1 status");
        st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["address"] == "10.99.0.10"))
            .cloned()
            .unwrap_or_else(|| panic!("no router peer in {st}"))
    };
    assert!(
        eventually(Duration::from_secs(10), || {
            let p = router_peer();
            p["prefixesReceived"].as_u64() > p["prefixesAccepted"].as_u64()
        }),
        "the router sent the blocks back and nothing was refused? {}",
        router_peer()
    );

    // The host behind the router reaches a pod on every node, and the service.
    for p in &pods {
        assert!(
            eventually(Duration::from_secs(5), || pings(&ext, p)),
            "{ext} does not reach pod {p}:\n{kernel}"
        );
    }
    assert!(
        pings(&ext, "10.96.0.10"),
        "{ext} does not reach the service cluster IP"
    );

    // A node leaves: its block goes from the router's table (and kernel).
    let gone = Instant::now();
    let (ok, out) = lab.margay_lab("remove-node", &[&nodes[2]]);
    assert!(ok, "lab remove-node: {out}");
    lab.reload();
    assert!(
        eventually(Duration::from_secs(15), || !router_table()
            .contains(blocks[2].as_str())),
        "{} left, its block {} is still in the router:\n{}",
        nodes[2],
        blocks[2],
        router_table()
    );
    println!(
        "node leaving -> its block out of the router: {:?} (includes the daemon's stop and `margay node remove`)",
        gone.elapsed()
    );
    let t = router_table();
    assert!(
        t.contains(blocks[0].as_str())
            && t.contains(blocks[1].as_str())
            && t.contains("10.96.0.0/12"),
        "the other nodes' routes went too:\n{t}"
    );
    assert!(pings(&ext, &pods[0]) && pings(&ext, &pods[1]));
}
