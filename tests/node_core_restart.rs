//! Restart rebuilds state before trusting its routes: a node that was down while another node left the
//! cluster comes back, keeps forwarding on the routes it adopted, and sweeps the departed node's block once
//! BGP has converged.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
//!     A = n1 10.99.0.11   B = n2 10.99.0.12   C = n3 10.99.0.13     full iBGP mesh, 2 pods per node
//!
//!   1. SIGTERM A's daemon: A's kernel keeps its proto-77 routes (B's and C's blocks, its blackhole)
//!   2. SIGKILL C's daemon; `margay node remove C` (Node resource + IPAM): B drops C's block;
//!      A, being down, still holds "C's block via 10.99.0.13"
//!   3. start A: it adopts its routes, meshes with B only, B sends End-of-RIB ─▶ A converges and sweeps:
//!        A's FIB:  C's block        gone
//!                  B's block        via 10.99.0.12   (re-learned, never removed)
//!                  A's block        blackhole        (IPAM says it is A's)
//!      /readyz on A: ready; A's pods ping B's pods.
//! ```
//!
//! Needs root, etcd, iproute2 and ping; SKIP otherwise (a failure under CI=true).

mod common;

use std::time::Duration;

use common::lab_core::{eventually, in_ns, own_block, proto77, Lab};
use nix::sys::signal::Signal;

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
// Cargo builds margay-cni beside margay for integration tests; `lab up` finds it there.
const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

#[test]
fn restarted_node_sweeps_the_block_of_a_node_removed_while_it_was_down() {
    const T: &str = "restarted_node_sweeps_the_block_of_a_node_removed_while_it_was_down";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::up(MARGAY, "mgr", 3, 2, &[]);
    let (a, _) = lab.nodes[0].clone();
    let (b, b_ip) = lab.nodes[1].clone();
    let (c, c_ip) = lab.nodes[2].clone();
    let (block_a, block_b, block_c) = (own_block(&a), own_block(&b), own_block(&c));
    assert!(
        proto77(&a).contains(&(block_c, Some(c_ip))),
        "before: {a} has no route to {c}'s block: {:?}",
        proto77(&a)
    );
    lab.wait_ready(&a);

    // 1. A stops (as a DaemonSet update stops it).
    lab.stop_daemon(&a, Signal::SIGTERM);
    // 2. C dies and is removed from the cluster.
    lab.stop_daemon(&c, Signal::SIGKILL);
    let (ok, out) = lab.margay_in(&b, &["node", "remove", &c]);
    assert!(ok, "margay node remove {c}: {out}");
    assert!(out.contains("Removed Node resource"), "{out}");
    assert!(
        eventually(Duration::from_secs(30), || !proto77(&b)
            .iter()
            .any(|(p, _)| *p == block_c)),
        "{b} still routes {c}'s block {block_c}: {:?}\n{}",
        proto77(&b),
        lab.node_logs(&b)
    );
    // A was down: its kernel still has the departed node's block (and everything else).
    let before = proto77(&a);
    assert!(before.contains(&(block_c, Some(c_ip))), "{before:?}");
    assert!(before.contains(&(block_b, Some(b_ip))), "{before:?}");
    assert!(before.contains(&(block_a, None)), "{before:?}");

    // 3. A starts again.
    lab.restart_node(&a);
    let status = lab.wait_ready(&a);
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 1, "{a} should mesh with {b} only: {status}");
    let after = proto77(&a);
    assert!(
        !after.iter().any(|(p, _)| *p == block_c),
        "{a} still routes removed {c}'s block {block_c} after converging: {after:?}\n{}",
        lab.node_logs(&a)
    );
    assert!(after.contains(&(block_b, Some(b_ip))), "{after:?}");
    assert!(after.contains(&(block_a, None)), "{after:?}");
    let logs = lab.node_logs(&a);
    assert!(
        logs.contains("swept routes nobody re-announced") && logs.contains(&block_c.to_string()),
        "{a}'s log does not show the sweep of {block_c}:\n{logs}"
    );
    assert!(
        logs.contains("pod veths reconciled with IPAM"),
        "{a}'s log does not show the pod reconciliation:\n{logs}"
    );

    // A's pods still reach B's pods, both ways.
    let mut failed = Vec::new();
    for (pa, na, ipa) in lab.pods.iter().filter(|(_, n, _)| *n == a) {
        for (pb, nb, ipb) in lab.pods.iter().filter(|(_, n, _)| *n == b) {
            for (from, to, ip) in [(pa, pb, ipb), (pb, pa, ipa)] {
                let (ok, _) = in_ns(from, &["ping", "-c", "1", "-W", "2", &ip.to_string()]);
                if !ok {
                    failed.push(format!("{from} ({na}/{nb}) -> {to} ({ip})"));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "pings failed: {failed:?}\n{}",
        lab.logs()
    );
}

/// Both daemons of a two-node lab stop (a rolling update taking two at once); A starts first. A converges
/// on its own (its configured peer B is down) and is ready, but keeps B's block (held for B: B's kernel still
/// forwards) instead of sweeping it; when B is back and re-announces it, the route simply stays. The pods
/// ping across the whole time.
///
/// ```text
///   n1 = A 10.99.0.11   n2 = B 10.99.0.12        both SIGTERM; A started (MARGAY_CONVERGE_MIN_WAIT=1)
///   A's FIB: B's block via 10.99.0.12  held (log: "held"), A ready
///   B started: the mesh is back, B's block still via 10.99.0.12 in A's FIB, pods ping
/// ```
#[test]
fn routes_of_a_peer_not_back_yet_are_held_not_swept() {
    const T: &str = "routes_of_a_peer_not_back_yet_are_held_not_swept";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::up(MARGAY, "mgh", 2, 1, &[]);
    let (a, _) = lab.nodes[0].clone();
    let (b, b_ip) = lab.nodes[1].clone();
    let block_b = own_block(&b);
    lab.wait_ready(&a);
    lab.stop_daemon(&a, Signal::SIGTERM);
    lab.stop_daemon(&b, Signal::SIGTERM);

    lab.restart_node_with_env(&a, &[("MARGAY_CONVERGE_MIN_WAIT", "1")]);
    lab.wait_ready(&a);
    assert!(
        eventually(Duration::from_secs(30), || lab
            .node_logs(&a)
            .contains(&format!("held={block_b}"))),
        "{a} does not report holding {block_b}:\n{}",
        lab.node_logs(&a)
    );
    assert!(
        proto77(&a).contains(&(block_b, Some(b_ip))),
        "{a} swept {b}'s block while {b} was down: {:?}",
        proto77(&a)
    );
    let ping = |from: &str, to: std::net::Ipv4Addr| {
        in_ns(from, &["ping", "-c", "1", "-W", "2", &to.to_string()]).0
    };
    let (pa, _, ipa) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == a)
        .cloned()
        .expect("pod on A");
    let (pb, _, ipb) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == b)
        .cloned()
        .expect("pod on B");
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping while {b} is down"
    );

    lab.restart_node(&b);
    lab.wait_ready(&b);
    assert!(
        eventually(Duration::from_secs(30), || lab
            .status(&a)
            .and_then(|s| s["peers"].as_array().cloned())
            .is_some_and(
                |p| p.iter().all(|p| p["fsmState"] == "Established") && !p.is_empty()
            )),
        "the mesh did not come back: {:?}",
        lab.status(&a)
    );
    assert!(
        proto77(&a).contains(&(block_b, Some(b_ip))),
        "{:?}",
        proto77(&a)
    );
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping after {b} is back"
    );
}
