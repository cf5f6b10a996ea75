//! The local lab end to end: `margay lab up` with three nodes, full iBGP mesh, two pods per node plumbed by
//! the real `margay-cni` binary.
//!
//! ```text
//!   netns <lab>-br: bridge br0 10.99.0.1/24
//!     |-- <lab>-etcd  10.99.0.2   etcd
//!     |-- <lab>-n1    10.99.0.11  margay node run ── margay-cni ADD ──▶ <lab>-n1p1, <lab>-n1p2
//!     |-- <lab>-n2    10.99.0.12  margay node run                      <lab>-n2p1, <lab>-n2p2
//!     `-- <lab>-n3    10.99.0.13  margay node run                      <lab>-n3p1, <lab>-n3p2
//!          n1 <──iBGP──> n2 <──iBGP──> n3 <──iBGP──> n1    (AS 64512, blocks /26 from 10.244.0.0/16)
//! ```
//!
//! Proves: every pod gets its address from its own node's block (the node's blackhole route); every pod
//! pings every other pod; every node's FIB holds each other node's block via that node, with margay's
//! protocol 77; `margay status` on every node shows both mesh peers Established; a restarted daemon keeps its
//! block in the others' FIBs; DEL/ADD through margay-cni; n3 leaving (`margay lab remove-node`) takes its block
//! out of the others' FIBs and its affinity out of etcd, and the mesh shrinks to n1 <-> n2. A guard runs
//! `margay lab down` on drop (also on panic). Needs root, etcd, iproute2 and ping; SKIP otherwise (a failure
//! under CI=true).

use crate::common;
use std::time::Duration;

use std::net::Ipv4Addr;

use common::lab::{
    block_in_use, etcd_keys, eventually, in_ns, lab_prerequisites, proto77, run_output, Lab, MARGAY,
};
use ipnetwork::Ipv4Network;
use serde_json::Value;

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn three_node_full_mesh_lab() {
    const T: &str = "three_node_full_mesh_lab";
    if !lab_prerequisites(T) {
        return;
    }
    let lab = Lab::up("l", &["--nodes", "3", "--pods", "2"]);
    let nodes = lab.nodes.clone();
    let pods = lab.pods.clone();
    let logs = || lab.logs();
    assert_eq!(nodes.len(), 3);
    assert_eq!(pods.len(), 6);

    // Each node's own block: its blackhole route. Every pod's address is inside its node's block.
    let mut blocks = std::collections::BTreeMap::new();
    for (node, _) in &nodes {
        let own: Vec<Ipv4Network> = proto77(node)
            .into_iter()
            .filter(|(_, via)| via.is_none())
            .map(|(p, _)| p)
            .collect();
        assert_eq!(own.len(), 1, "{node} should own one block: {own:?}");
        blocks.insert(node.clone(), own[0]);
    }
    for (pod, node, ip) in &pods {
        assert!(
            blocks[node].contains(*ip),
            "pod {pod} on {node} has {ip}, outside its node's block {}",
            blocks[node]
        );
    }

    // Every node's FIB holds every other node's block via that node, with protocol 77.
    for (node, _) in &nodes {
        let routes = proto77(node);
        for (other, other_ip) in &nodes {
            if other == node {
                continue;
            }
            assert!(
                routes.contains(&(blocks[other], Some(*other_ip))),
                "{node} has no route to {other}'s block {} via {other_ip} with proto 77: {routes:?}",
                blocks[other]
            );
        }
    }

    // Every pod pings every other pod.
    let mut failed = Vec::new();
    for (a, _, _) in &pods {
        for (b, _, ip) in &pods {
            if a == b {
                continue;
            }
            let (ok, _) = in_ns(a, &["ping", "-c", "1", "-W", "2", &ip.to_string()]);
            if !ok {
                failed.push(format!("{a} -> {b} ({ip})"));
            }
        }
    }
    assert!(failed.is_empty(), "pings failed: {failed:?}\n{}", logs());

    // `margay status` on every node: both mesh peers Established.
    check_status(&nodes);

    // `lab status` agrees (its exit status says every pair is reachable).
    let (ok, out) = lab.margay_lab("status", &[]);
    assert!(ok, "margay lab status:\n{out}");
    assert!(out.contains("30 of 30 pod pairs reachable"), "{out}");

    // Restart one node's daemon (SIGTERM, then start again): graceful restart keeps its block in the other
    // nodes' FIBs meanwhile, and afterwards the mesh is back and every pod pair pings again.
    let (n2, n2_ip) = nodes[1].clone();
    let (ok, out) = lab.margay_lab("restart-node", &[&n2]);
    assert!(ok, "lab restart-node {n2}: {out}");
    let (n1, _) = &nodes[0];
    assert!(
        proto77(n1).contains(&(blocks[&n2], Some(n2_ip))),
        "{n1} lost {n2}'s block across {n2}'s restart"
    );
    let (ok, out) = lab.margay_lab("status", &[]);
    assert!(
        ok && out.contains("30 of 30 pod pairs reachable"),
        "after restart:\n{out}"
    );
    wait_established(&nodes);

    // DEL through margay-cni: the pod's host route goes, its address returns to the block; a second DEL
    // (the runtime retrying) succeeds with nothing left to do.
    // On the restarted node: its new daemon serves the CNI socket with the IPAM state it read back.
    let (pod, node, ip) = pods
        .iter()
        .find(|(_, n, _)| *n == n2)
        .cloned()
        .expect("a pod on the restarted node");
    assert_eq!(block_in_use(&node, blocks[&node]), 2);
    let (ok, out) = cni(&lab, &node, &pod, "DEL");
    assert!(ok, "margay-cni DEL {pod}: {out}");
    let (_, routes) = run_output(
        std::process::Command::new("ip")
            .args(["-n", &node, "route", "show", "proto", "78"])
            .output(),
    );
    assert!(
        !routes.contains(&format!("{ip} ")),
        "{pod}'s host route is still in {node}: {routes}"
    );
    assert_eq!(
        block_in_use(&node, blocks[&node]),
        1,
        "{pod}'s address was not released"
    );
    let (ok, out) = cni(&lab, &node, &pod, "DEL");
    assert!(ok, "second margay-cni DEL {pod}: {out}");
    // ADD again: the pod is back, in the same block, reachable from another node's pod.
    let (ok, out) = cni(&lab, &node, &pod, "ADD");
    assert!(ok, "margay-cni ADD {pod} again: {out}");
    let result: Value = serde_json::from_str(&out).expect("CNI result JSON");
    let new_ip: Ipv4Addr = result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .expect("ADD result address");
    assert!(
        blocks[&node].contains(new_ip),
        "{new_ip} outside {}",
        blocks[&node]
    );
    let (far, _, _) = pods
        .iter()
        .find(|(_, n, _)| *n != node)
        .expect("a pod on another node");
    let (ok, out) = in_ns(far, &["ping", "-c", "1", "-W", "2", &new_ip.to_string()]);
    assert!(ok, "{far} cannot ping re-added {pod} at {new_ip}: {out}");

    // n3 leaves the mesh (daemon stopped: the others first keep its routes for graceful restart; then
    // `margay node remove`): the others drop the session and its block, and its affinity leaves etcd.
    let (n3, _) = nodes[2].clone();
    let (ok, out) = lab.margay_lab("remove-node", &[&n3]);
    assert!(ok, "remove-node {n3}: {out}");
    let gone = eventually(Duration::from_millis(20000), || {
        nodes[..2]
            .iter()
            .all(|(n, _)| !proto77(n).iter().any(|(p, _)| *p == blocks[&n3]))
    });
    assert!(
        gone,
        "{n3}'s block {} is still routed\n{}",
        blocks[&n3],
        logs()
    );
    assert!(
        etcd_keys(&nodes[0].0, &format!("/calico/ipam/v2/host/{n3}/")).is_empty(),
        "{n3}'s affinities are still in etcd"
    );
    wait_established(&nodes[..2]);
}

/// Run the lab's margay-cni (as the runtime of `node` would) with `command` for `pod`.
fn cni(lab: &Lab, node: &str, pod: &str, command: &str) -> (bool, String) {
    lab.cni(node, pod, command, &lab.cni_conf(node).to_string(), &[])
}

/// `margay status` on every node: ready, and both mesh peers Established.
fn check_status(nodes: &[(String, Ipv4Addr)]) {
    for (node, _) in nodes {
        let (ok, out) = in_ns(node, &[MARGAY, "status", "-o", "json"]);
        assert!(ok, "margay status in {node}: {out}");
        let report: Value = serde_json::from_str(&out).expect("status JSON");
        assert_eq!(report["ready"]["ready"], true, "{node} not ready: {report}");
        assert_eq!(report["role"], "node");
        let peers = report["peers"].as_array().expect("peers");
        let mut addrs: Vec<&str> = peers
            .iter()
            .map(|p| p["address"].as_str().unwrap_or(""))
            .collect();
        addrs.sort_unstable();
        let mut want: Vec<String> = nodes
            .iter()
            .filter(|(n, _)| n != node)
            .map(|(_, a)| a.to_string())
            .collect();
        want.sort_unstable();
        assert_eq!(addrs, want, "{node}'s peers");
        for p in peers {
            assert_eq!(p["fsmState"], "Established", "{node}: {p}");
            assert_eq!(p["peerType"], "node-to-node mesh", "{node}: {p}");
        }
    }
}

/// After a restart the sessions take a moment to come back, and readiness follows once the restarted node
/// has the peers' End-of-RIB: poll `margay status` (bounded), then check.
fn wait_established(nodes: &[(String, Ipv4Addr)]) {
    for _ in 0..100 {
        let all = nodes.iter().all(|(node, _)| {
            let (ok, out) = in_ns(node, &[MARGAY, "status", "-o", "json"]);
            ok && serde_json::from_str::<Value>(&out)
                .ok()
                .filter(|r| r["ready"]["ready"] == true)
                .and_then(|r| r["peers"].as_array().cloned())
                .is_some_and(|p| {
                    p.len() == nodes.len() - 1 && p.iter().all(|p| p["fsmState"] == "Established")
                })
        });
        if all {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    check_status(nodes);
}

/// The lab's preflight on this machine: every kernel feature is there, the scratch namespace is gone
/// afterwards; as a user without root, `margay lab up` refuses before building anything, saying why.
#[test]
#[ignore = "needs root for network namespaces: scripts/test.sh runs it (--include-ignored)"]
fn lab_preflight_names_what_is_missing() {
    const T: &str = "lab_preflight_names_what_is_missing";
    if !common::require(common::is_root(), T, "needs root for network namespaces") {
        return;
    }
    let scratch = common::unique("pre");
    let missing = margay::lab::preflight::check(&scratch);
    assert!(missing.is_empty(), "this machine lacks: {missing:?}");
    let (_, list) = common::try_sh("ip netns list");
    assert!(!list.contains(&scratch), "scratch namespace left: {list}");

    // setpriv drops root for one command: the same binary, as uid 65534.
    let (ok, out) = common::try_sh(&format!(
        "setpriv --reuid 65534 --regid 65534 --clear-groups {MARGAY} lab up --name {scratch}x 2>&1"
    ));
    assert!(!ok, "lab up without root succeeded: {out}");
    assert!(
        out.contains("root") && out.contains("sudo"),
        "lab up without root does not say what to do: {out}"
    );
    let (_, list) = common::try_sh("ip netns list");
    assert!(
        !list.contains(&format!("{scratch}x")),
        "lab made namespaces without root: {list}"
    );
}
