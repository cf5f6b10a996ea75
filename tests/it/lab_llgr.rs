//! Surviving a reflector outage with long-lived graceful restart (RFC 9494), end to end in a `margay lab
//! --reflector`: the reflector SIGKILLed for longer than its graceful-restart time.
//!
//! ```text
//!   netns <lab>-br: bridge br0 10.99.0.1/24
//!     |-- <lab>-etcd  10.99.0.2   etcd
//!     |-- <lab>-rr    10.99.0.3   margay reflector        <- SIGKILLed, later restarted
//!     |-- <lab>-n1    10.99.0.11  margay node ── pod p1   n1: n2's block via 10.99.0.12 (proto 77)
//!     `-- <lab>-n2    10.99.0.12  margay node ── pod p2   n2: n1's block via 10.99.0.11
//!          n1, n2 <──iBGP──> rr only; BGPPeer maxRestartTime 2s
//! ```
//!
//! 1. LLGR on (annotation 1h): 5 s after the kill (restart time 2 s) each node still has the other's block in
//!    its kernel, `margay status` shows the routes kept long-lived stale, and the pods ping each other;
//!    the reflector returns: the stale marks go, the routes stay.
//! 2. LLGR off (annotation "0"): the same outage removes the routes from the kernel.

use crate::common;
use std::time::{Duration, Instant};

use common::lab::{eventually, in_ns, lab_prerequisites, path_str, proto77, status_json, Lab};
use common::lab::{ETCD, MARGAY};

const RESTART: &str = "2s";

fn apply_peer(lab: &Lab, llgr: &str) {
    let file = lab.state_path(&format!("llgr-peer-{}.yaml", llgr.replace('"', "")));
    std::fs::write(
        &file,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: peer-with-route-reflectors\n  annotations:\n    margay.io/llgr-stale-time: {llgr}\nspec:\n  nodeSelector: all()\n  peerSelector: has(route-reflector)\n  maxRestartTime: {RESTART}\n"
        ),
    )
    .expect("write BGPPeer");
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            MARGAY,
            "apply",
            "-f",
            &path_str(&file),
            "--etcd-endpoints",
            ETCD,
        ],
    );
    assert!(ok, "margay apply: {out}");
}

/// The reflector session as n's `margay status -o json` shows it.
fn rr_peer(node: &str) -> Option<serde_json::Value> {
    status_json(node, None)
        .ok()?
        .get("peers")?
        .as_array()?
        .first()
        .cloned()
}

fn route_to(node: &str, other_block: ipnetwork::Ipv4Network, via: std::net::Ipv4Addr) -> bool {
    proto77(node).contains(&(other_block, Some(via)))
}

fn pods_ping(lab: &Lab) -> Result<(), String> {
    let (p1, _) = lab.pod_on(lab.node(0));
    let (_, ip2) = lab.pod_on(lab.node(1));
    let (ok, out) = in_ns(
        &p1,
        &["ping", "-c", "3", "-i", "0.2", "-W", "1", &ip2.to_string()],
    );
    if ok {
        Ok(())
    } else {
        Err(format!("{p1} -> {ip2}: {out}"))
    }
}

/// Both nodes up with the reflector (the BGPPeer change restarts the sessions) and routing to each other.
fn converged(lab: &Lab, blocks: &[ipnetwork::Ipv4Network]) -> bool {
    eventually(Duration::from_secs(30), || {
        (0..2).all(|i| {
            let ip = &lab.nodes[1 - i].1;
            rr_peer(lab.node(i)).is_some_and(|p| {
                p["fsmState"] == "Established" && p.get("prefixesLlgrStale").is_none()
            }) && route_to(lab.node(i), blocks[1 - i], *ip)
        })
    })
}

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn reflector_outage_keeps_routes_with_llgr_and_drops_them_without() {
    const T: &str = "reflector_outage_keeps_routes_with_llgr_and_drops_them_without";
    if !lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("llgr", 2, 1, &["--reflector"]);
    let rr = format!("{}-rr", lab.name);
    let blocks: Vec<_> = lab.nodes.iter().map(|(n, _)| lab.own_block(n)).collect();
    let (n1, n2_ip) = (lab.node(0).to_string(), lab.nodes[1].1);

    // 1. LLGR on.
    apply_peer(&lab, "1h");
    std::thread::sleep(Duration::from_secs(2));
    assert!(converged(&lab, &blocks), "not converged:\n{}", lab.logs());
    pods_ping(&lab).expect("pods ping before the outage");

    let killed = Instant::now();
    lab.stop_daemon(&rr, nix::sys::signal::Signal::SIGKILL);
    assert!(
        eventually(Duration::from_secs(10), || rr_peer(&n1)
            .is_some_and(|p| p["fsmState"] != "Established")),
        "n1 did not notice the reflector's death"
    );
    // Past the restart time (2 s): the long-lived phase.
    std::thread::sleep(Duration::from_secs(5));
    let p = rr_peer(&n1).expect("n1 status");
    println!(
        "{:.1} s after the kill, n1's reflector session: {p}",
        killed.elapsed().as_secs_f64()
    );
    assert!(
        p["prefixesLlgrStale"].as_u64().unwrap_or(0) >= 1
            && p["info"]
                .as_str()
                .is_some_and(|i| i.contains("long-lived stale")),
        "n1 shows no long-lived stale routes: {p}\n{}",
        lab.logs()
    );
    for i in 0..2 {
        assert!(
            route_to(lab.node(i), blocks[1 - i], lab.nodes[1 - i].1),
            "{} lost its route to {} with LLGR on: {:?}\n{}",
            lab.node(i),
            blocks[1 - i],
            proto77(lab.node(i)),
            lab.logs()
        );
    }
    pods_ping(&lab).expect("pods ping across nodes during the outage");
    println!(
        "outage of {:.1} s: routes kept LLGR-stale, pods ping",
        killed.elapsed().as_secs_f64()
    );

    lab.restart_node(&rr);
    assert!(
        converged(&lab, &blocks),
        "the stale marks did not go after the reflector returned:\n{}",
        lab.logs()
    );
    pods_ping(&lab).expect("pods ping after the reflector returned");

    // 2. LLGR off: the same outage drops the routes.
    apply_peer(&lab, "\"0\"");
    std::thread::sleep(Duration::from_secs(2));
    assert!(converged(&lab, &blocks), "not converged:\n{}", lab.logs());
    let killed = Instant::now();
    lab.stop_daemon(&rr, nix::sys::signal::Signal::SIGKILL);
    let gone = eventually(Duration::from_secs(15), || !route_to(&n1, blocks[1], n2_ip));
    assert!(
        gone,
        "with LLGR off n1 still routes to {} after the restart time: {:?}\n{}",
        blocks[1],
        proto77(&n1),
        lab.logs()
    );
    println!(
        "LLGR off: n1's route to n2's block gone {:.1} s after the kill",
        killed.elapsed().as_secs_f64()
    );
    lab.restart_node(&rr);
}
