//! The lab with a route reflector, end to end: `margay lab up --reflector` (mesh off; `margay reflector`
//! against the lab's etcd; one BGPPeer nodeSelector all(), peerSelector has(route-reflector)).
//!
//! ```text
//!   netns <lab>-br: bridge br0 10.99.0.1/24
//!     |-- <lab>-etcd  10.99.0.2   etcd
//!     |-- <lab>-rr    10.99.0.3   margay reflector (Node <lab>-rr, cluster id 244.0.0.1, label route-reflector)
//!     |-- <lab>-n1    10.99.0.11  margay node run ── pods <lab>-n1p1, <lab>-n1p2
//!     |-- <lab>-n2    10.99.0.12  margay node run ── pods ...
//!     `-- <lab>-n3    10.99.0.13  margay node run ── pods ...
//!          n1, n2, n3 <──iBGP──> rr only
//! ```
//!
//! One lab, in order:
//! 1. every pod pings every other; each node's `margay status` shows only the reflector, Established; each
//!    node's FIB holds the others' blocks via their node address (proto 77); the reflector shows 3 clients;
//!    the reflector's /healthz, /readyz and /metrics answer; a BGPPeer for the reflector alone, put into and
//!    deleted from etcd (`margay apply` / `margay delete`), is added and removed live (the watch), the three client sessions untouched; with
//!    etcd stopped the reflector keeps its sessions and status, /readyz is 503 naming etcd, then 200 again;
//! 2. n2's daemon restarts while pods on n1 and n2 ping each other at 1000 packets/s: the loss from ping's
//!    own summary is printed (and must be 0: graceful restart plus a FIB that is never flushed), and n1's
//!    route to n2's block is never deleted meanwhile (`ip monitor route`); then the same with the reflector
//!    itself restarted: no client deletes a reflected route (F bit, selection deferral) and nothing is lost;
//! 3. n3 leaves (daemon stopped, `margay node remove`): its block leaves n1's and n2's FIBs, its affinity and
//!    block leave etcd, the reflector drops its session.

use crate::common;
use std::time::Duration;

use std::process::{Command, Stdio};

use common::lab::{
    etcd_keys, eventually, http_get, in_ns, lab_prerequisites, path_str, ping_summary, proto77,
    status_json, Lab, ETCD, MARGAY,
};

const RR_IP: &str = "10.99.0.3";
const RR_HTTP: &str = "127.0.0.1:9190";

fn established_with_reflector_only(lab: &Lab, node: &str) -> Result<(), String> {
    let r = status_json(node, None)?;
    if r["ready"]["ready"] != true {
        return Err(format!("{node} not ready: {r}"));
    }
    let peers = r["peers"].as_array().cloned().unwrap_or_default();
    let addrs: Vec<&str> = peers
        .iter()
        .map(|p| p["address"].as_str().unwrap_or(""))
        .collect();
    if addrs != [RR_IP] {
        return Err(format!(
            "{node} peers with {addrs:?}, want only the reflector {RR_IP} (lab {})",
            lab.name
        ));
    }
    if peers[0]["fsmState"] != "Established" {
        return Err(format!("{node}: reflector session {}", peers[0]));
    }
    Ok(())
}

fn reflector_clients(lab: &Lab) -> Result<Vec<(String, String)>, String> {
    let r = status_json(&format!("{}-rr", lab.name), Some(RR_HTTP))?;
    if r["role"] != "reflector" {
        return Err(format!("not a reflector: {r}"));
    }
    let mut v: Vec<(String, String)> = r["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|p| {
            (
                p["address"].as_str().unwrap_or("").to_string(),
                p["fsmState"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    v.sort();
    Ok(v)
}

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn reflector_lab_restart_and_node_leave() {
    const T: &str = "reflector_lab_restart_and_node_leave";
    if !lab_prerequisites(T) {
        return;
    }
    let lab = Lab::up("rr", &["--nodes", "3", "--pods", "2", "--reflector"]);
    assert_eq!(lab.nodes.len(), 3);
    assert_eq!(lab.pods.len(), 6);

    // 1. Nodes peer only with the reflector; routes reflected with the originating node as next hop.
    for (node, _) in &lab.nodes {
        if let Err(e) = established_with_reflector_only(&lab, node) {
            panic!("{e}\n{}", lab.logs());
        }
    }
    let clients = reflector_clients(&lab).expect("reflector status");
    let want: Vec<(String, String)> = lab
        .nodes
        .iter()
        .map(|(_, ip)| (ip.to_string(), "Established".to_string()))
        .collect();
    assert_eq!(clients, want, "reflector's peers");
    let blocks: Vec<_> = lab.nodes.iter().map(|(n, _)| lab.own_block(n)).collect();
    for (i, (node, _)) in lab.nodes.iter().enumerate() {
        let routes = proto77(node);
        for (j, (other, other_ip)) in lab.nodes.iter().enumerate() {
            if i != j {
                assert!(
                    routes.contains(&(blocks[j], Some(*other_ip))),
                    "{node} has no route to {other}'s block {} via {other_ip} (proto 77): {routes:?}",
                    blocks[j]
                );
            }
        }
    }
    for (pod, node, ip) in &lab.pods {
        let i = lab.nodes.iter().position(|(n, _)| n == node).expect("node");
        assert!(blocks[i].contains(*ip), "{pod} {ip} outside {}", blocks[i]);
    }
    let mut failed = Vec::new();
    for (a, _, _) in &lab.pods {
        for (b, _, ip) in &lab.pods {
            if a != b && !in_ns(a, &["ping", "-c", "1", "-W", "2", &ip.to_string()]).0 {
                failed.push(format!("{a} -> {b} ({ip})"));
            }
        }
    }
    assert!(
        failed.is_empty(),
        "pings failed: {failed:?}\n{}",
        lab.logs()
    );
    let (ok, out) = lab.margay_lab("status", &[]);
    assert!(ok, "lab status: {out}");
    assert!(
        out.contains("route reflector") && out.contains("30 of 30 pod pairs reachable"),
        "{out}"
    );

    // The reflector's HTTP endpoint.
    let rr = format!("{}-rr", lab.name);
    assert_eq!(http_get(&rr, RR_HTTP, "/healthz").map(|r| r.0), Ok(200));
    assert_eq!(http_get(&rr, RR_HTTP, "/readyz").map(|r| r.0), Ok(200));
    let metrics = http_get(&rr, RR_HTTP, "/metrics").expect("/metrics");
    assert!(
        eventually(Duration::from_millis(4000), || http_get(
            &rr, RR_HTTP, "/metrics"
        )
        .is_ok_and(
            |(_, m)| m.contains("margay_bgp_sessions{state=\"Established\"} 3")
        )),
        "reflector /metrics: {metrics:?}"
    );

    // A peer for the reflector alone, added and removed through etcd: live, the clients untouched.
    let since = |r: &serde_json::Value| -> Vec<(String, String)> {
        r["peers"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|p| {
                (
                    p["address"].as_str().unwrap_or("").to_string(),
                    p["since"].to_string(),
                )
            })
            .collect()
    };
    let before = since(&status_json(&rr, Some(RR_HTTP)).expect("reflector status"));
    // Idle, the reflector reads nothing from etcd: its peers come from one watch (src/feed.rs), not from
    // re-listing on a timer. Its own request counter, as /status and /metrics report it, stands still.
    let requests = || {
        status_json(&rr, Some(RR_HTTP))
            .ok()
            .and_then(|j| j["datastore"]["requests"].as_u64())
    };
    let idle_from = requests();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let idle_to = requests();
    assert!(
        idle_from.is_some() && idle_from == idle_to,
        "the idle reflector sent etcd requests: {idle_from:?} -> {idle_to:?}"
    );
    let etcd_ns = format!("{}-etcd", lab.name);
    // As an operator does it: `margay apply -f`, later `margay delete bgppeer`.
    let extra = lab.state_path("rr-extra.yaml");
    std::fs::write(
        &extra,
        format!(
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: rr-extra\nspec:\n  node: {rr}\n  peerIP: 10.99.0.60\n  asNumber: 64513\n"
        ),
    )
    .expect("write rr-extra.yaml");
    let (ok, out) = in_ns(
        &etcd_ns,
        &[
            MARGAY,
            "apply",
            "-f",
            &path_str(&extra),
            "--etcd-endpoints",
            ETCD,
        ],
    );
    assert!(ok, "margay apply rr-extra: {out}");
    let added = eventually(Duration::from_millis(10000), || {
        status_json(&rr, Some(RR_HTTP))
            .is_ok_and(|r| since(&r).iter().any(|(a, _)| a == "10.99.0.60") && since(&r).len() == 4)
    });
    assert!(
        added,
        "the reflector did not add 10.99.0.60 from etcd:\n{}",
        lab.logs()
    );
    let (ok, out) = in_ns(
        &etcd_ns,
        &[
            MARGAY,
            "delete",
            "bgppeer",
            "rr-extra",
            "--etcd-endpoints",
            ETCD,
        ],
    );
    assert!(ok, "margay delete bgppeer rr-extra: {out}");
    let removed = eventually(Duration::from_millis(10000), || {
        status_json(&rr, Some(RR_HTTP)).is_ok_and(|r| since(&r).len() == 3)
    });
    assert!(
        removed,
        "the reflector did not remove 10.99.0.60:\n{}",
        lab.logs()
    );
    let after = since(&status_json(&rr, Some(RR_HTTP)).expect("reflector status"));
    assert_eq!(
        before, after,
        "client sessions were touched by an unrelated peer change"
    );
    for (node, _) in &lab.nodes {
        established_with_reflector_only(&lab, node).expect("after the peer change");
    }

    // etcd away: the reflector keeps its sessions and answers its status endpoint, and /readyz says why it
    // is not ready; with etcd back it is ready again.
    let (ok, out) = lab.margay_lab("etcd", &["stop"]);
    assert!(ok, "etcd stop: {out}");
    let unready = eventually(Duration::from_millis(30000), || {
        http_get(&rr, RR_HTTP, "/readyz").is_ok_and(|(c, b)| c == 503 && b.contains("etcd"))
    });
    assert!(
        unready,
        "/readyz with etcd down: {:?}",
        http_get(&rr, RR_HTTP, "/readyz")
    );
    let during = since(&status_json(&rr, Some(RR_HTTP)).expect("status with etcd down"));
    assert_eq!(before, during, "sessions changed while etcd was down");
    let (ok, out) = lab.margay_lab("etcd", &["start"]);
    assert!(ok, "etcd start: {out}");
    assert!(
        eventually(Duration::from_millis(30000), || http_get(
            &rr, RR_HTTP, "/readyz"
        )
        .is_ok_and(|(c, _)| c == 200)),
        "/readyz after etcd came back: {:?}",
        http_get(&rr, RR_HTTP, "/readyz")
    );

    // 2. Restart n2's daemon under 1000 pps in both directions between n1 and n2.
    let (n1, n2) = (lab.node(0).to_string(), lab.node(1).to_string());
    let (_, ip2) = lab.pod_on(&n2);
    restart_under_flood(&lab, &blocks, &n2);
    // 2b. Restart the reflector itself under the same flood: every client keeps the reflected routes
    // (the reflector's F bit) until the reflector's End-of-RIB, which comes only after every client is
    // back and has sent its own (selection deferral, RFC 4724 4.1): no client sweeps a route in between.
    restart_under_flood(&lab, &blocks, &rr);

    // 3. n3 leaves: daemon stopped (graceful: the reflector first keeps its routes as stale), then
    // `margay node remove`: the Node resource goes, the reflector drops the peer and flushes its routes.
    let (n3, n3_ip) = lab.nodes[2].clone();
    assert!(!etcd_keys(&etcd_ns, &format!("/calico/ipam/v2/host/{n3}/")).is_empty());
    let (ok, out) = lab.margay_lab("remove-node", &[&n3]);
    assert!(ok, "remove-node {n3}: {out}");
    assert!(out.contains("Removed Node resource"), "{out}");
    let gone = eventually(Duration::from_millis(20000), || {
        [&n1, &n2]
            .iter()
            .all(|n| !proto77(n).iter().any(|(p, _)| *p == blocks[2]))
    });
    assert!(
        gone,
        "{n3}'s block {} still routed: {n1}: {:?} {n2}: {:?}\n{}",
        blocks[2],
        proto77(&n1),
        proto77(&n2),
        lab.logs()
    );
    assert!(
        etcd_keys(&etcd_ns, &format!("/calico/ipam/v2/host/{n3}/")).is_empty(),
        "{n3}'s affinities are still in etcd"
    );
    let block_key = format!(
        "/calico/ipam/v2/assignment/ipv4/block/{}-{}",
        blocks[2].ip(),
        blocks[2].prefix()
    );
    // The block goes, or stays unheld (no affinity) while the addresses its pods had cool down
    // (`margay ipam gc` deletes it after the cooldown): never held by the node that left.
    let (_, block) = in_ns(
        &etcd_ns,
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            &block_key,
            "--print-value-only",
        ],
    );
    let held = serde_json::from_str::<serde_json::Value>(block.trim())
        .ok()
        .is_some_and(|b| !b["affinity"].is_null());
    assert!(
        !held,
        "{n3}'s block {block_key} is still held in etcd: {block}"
    );
    let clients = eventually(Duration::from_millis(10000), || {
        reflector_clients(&lab).is_ok_and(|c| !c.iter().any(|(a, _)| *a == n3_ip.to_string()))
    });
    assert!(
        clients,
        "the reflector still peers with {n3}: {:?}",
        reflector_clients(&lab)
    );
    // The others still reach each other.
    let (p1, _) = lab.pod_on(&n1);
    let (ok, out) = in_ns(&p1, &["ping", "-c", "1", "-W", "2", &ip2.to_string()]);
    assert!(ok, "{p1} -> {ip2} after {n3} left: {out}");
}

/// Restart `target` (a node's daemon or the reflector) with `margay lab restart-node` while the pods on
/// n1 and n2 ping each other at 1000 packets/s; wait until every session is back. Asserts no lost packet
/// (ping's own summary) and, as a deterministic witness of what ping may miss between two packets, that
/// neither n1's route to n2's block nor n2's route to n1's block was deleted meanwhile (`ip monitor`).
fn restart_under_flood(lab: &Lab, blocks: &[ipnetwork::Ipv4Network], target: &str) {
    let (n1, n2) = (lab.node(0).to_string(), lab.node(1).to_string());
    let (p1, ip1) = lab.pod_on(&n1);
    let (p2, ip2) = lab.pod_on(&n2);
    // A fixed count (10 s at 1000 pps), not SIGINT: ping then waits for the last replies, so a packet in
    // flight when it stops is not counted as lost.
    let ping = |from: &str, to: std::net::Ipv4Addr| {
        Command::new("ip")
            .args([
                "netns", "exec", from, "ping", "-q", "-i", "0.001", "-c", "10000", "-W", "1",
            ])
            .arg(to.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ping")
    };
    let monitor = |ns: &str| {
        Command::new("ip")
            .args(["-n", ns, "-ts", "monitor", "route"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip monitor")
    };
    let monitors = [
        (n1.clone(), blocks[1], monitor(&n1)),
        (n2.clone(), blocks[0], monitor(&n2)),
    ];
    let fwd = ping(&p1, ip2);
    let back = ping(&p2, ip1);
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (ok, out) = lab.margay_lab("restart-node", &[target]);
    assert!(ok, "restart-node {target}: {out}");
    let back_up = eventually(Duration::from_millis(30000), || {
        lab.nodes
            .iter()
            .all(|(n, _)| established_with_reflector_only(lab, n).is_ok())
            && reflector_clients(lab)
                .map(|c| c.iter().all(|(_, s)| s == "Established"))
                .unwrap_or(false)
    });
    // Whether the measurement covered the whole restart (sessions back while ping still ran).
    let mut fwd = fwd;
    let covered = matches!(fwd.try_wait(), Ok(None));
    let mut summaries = Vec::new();
    for (what, child) in [
        (format!("{p1} -> {p2}"), fwd),
        (format!("{p2} -> {p1}"), back),
    ] {
        let out = child.wait_with_output().expect("ping output");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (tx, rx) = ping_summary(&text).unwrap_or_else(|| panic!("no ping summary: {text}"));
        println!(
            "restart of {target} under 1000 pps, {what}: {tx} transmitted, {rx} received, {} lost (ping ran past the re-established sessions: {covered})",
            tx - rx
        );
        summaries.push((what, tx, rx));
    }
    let mut deleted = Vec::new();
    let mut changes = String::new();
    for (ns, block, m) in monitors {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(m.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let text =
            String::from_utf8_lossy(&m.wait_with_output().expect("ip monitor").stdout).to_string();
        if text.contains(&format!("Deleted {block} ")) {
            deleted.push(format!("{ns} deleted its route to {block}"));
        }
        changes.push_str(&format!("--- {ns}: ip monitor route\n{text}"));
    }
    assert!(
        back_up,
        "sessions did not come back after restarting {target}:\n{}",
        lab.logs()
    );
    assert!(
        deleted.is_empty(),
        "{} during the restart of {target}:\n{changes}\n{}",
        deleted.join("; "),
        lab.logs()
    );
    for (what, tx, rx) in &summaries {
        assert!(*tx > 1000, "{what}: only {tx} packets sent");
        assert_eq!(
            tx,
            rx,
            "{what}: packets lost across the restart of {target}\n{changes}\n{}",
            lab.logs()
        );
    }
}
