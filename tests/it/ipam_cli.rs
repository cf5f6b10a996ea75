//! The `margay` binary's datastore commands end to end against a real etcd: apply -f, get -o, delete,
//! ipam show/check/release, node remove, and the error an operator sees when etcd is down.

use crate::common;

use std::process::Command;
use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::datastore::{Datastore, DatastoreConfig};
use margay::ipam::{AssignRequest, NodeInfo, NodeIpam};

fn margay(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_margay"))
        .args(args)
        .env("ETCD_ENDPOINTS", endpoint)
        .output()
        .expect("run margay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn operator_commands_against_etcd() {
    if !etcd_available("operator_commands_against_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pools.yaml");
    std::fs::write(
        &file,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.60.0.0/24, natOutgoing: true}\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();

    let (ok, out, err) = margay(&ep, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Successfully applied 1 'IPPool' resource(s): pods"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "ippool", "-o", "wide"]);
    assert!(
        ok && out.contains("10.60.0.0/24") && out.contains("| true"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "ippool", "pods", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(v["spec"]["blockSize"], 26);

    // A pod on node-a, through the library (the daemon's path).
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).unwrap());
    let n = NodeIpam::start(ds.clone(), NodeInfo::new("node-a"))
        .await
        .unwrap();
    let a = n
        .assign(AssignRequest::v4("k8s-pod-network.c1"))
        .await
        .unwrap();
    let b = n
        .assign(AssignRequest::v4("k8s-pod-network.c2"))
        .await
        .unwrap();
    drop(n);

    let (ok, out, _) = margay(&ep, &["ipam", "show", "--show-blocks"]);
    assert!(
        ok && out.contains("IP Pool") && out.contains("Block") && out.contains("2 (3%)"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["ipam", "check"]);
    assert!(
        ok && out.ends_with("Check complete; found 0 problems.\n"),
        "{out}"
    );
    let ip = a.ips[0].ip.to_string();
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--ip", &ip]);
    assert!(
        ok && out.contains(&format!("Successfully released IP address {ip}")),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--ip", &ip]);
    assert!(ok && out.contains("not allocated"), "{out}");
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--handle", "k8s-pod-network.c2"]);
    assert!(ok && out.contains(&b.ips[0].ip.to_string()), "{out}");
    let (ok, out, _) = margay(&ep, &["node", "remove", "node-a"]);
    assert!(ok && out.contains("Removed node \"node-a\""), "{out}");
    let (ok, out, _) = margay(&ep, &["delete", "-f", f]);
    assert!(
        ok && out.contains("Successfully deleted 1 'IPPool' resource(s): pods"),
        "{out}"
    );
    let (ok, _, err) = margay(&ep, &["get", "ippool", "pods"]);
    assert!(!ok && err.contains("not found"), "{err}");

    // Refused resources name the field; an unreachable etcd says so and what was tried.
    std::fs::write(&file, "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bad}\nspec: {cidr: 10.61.0.0/16, blockSize: 40}\n").unwrap();
    let (ok, _, err) = margay(&ep, &["apply", "-f", f]);
    assert!(!ok && err.contains("spec.blockSize"), "{err}");
    let dead = format!("127.0.0.1:{}", common::free_port());
    let (ok, _, err) = margay(&dead, &["ipam", "check", "--etcd-timeout", "1"]);
    assert!(!ok, "must fail");
    assert!(
        err.contains(&format!(
            "etcd unreachable: tried {dead} (connection refused)"
        )) && err.contains("--etcd-endpoints"),
        "{err}"
    );
}

/// Nodes that vanish, through the binary:
///
/// ```text
///   node "gone": Liveness (lease TTL 1 s) + NodeIpam, 3 pods   ── then dropped: no keepalive, lease expires
///   node "slow": lease TTL 2 s renewed by hand every 1.6 s (late for a 2 s lease, but inside it), 2 pods
///   node "calico": a block and pods but no liveness record (a Calico node in a mixed cluster)
///   `margay ipam gc --release --grace 1s`, run again and again
/// ```
/// "gone" is stamped missing by the first gc, released (handles, blocks, affinities, as `node remove`) by the
/// first gc after the grace; "slow" and "calico" are never touched; `ipam check` ends clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn gc_releases_vanished_nodes_never_slow_ones() {
    use margay::datastore::{keys, Write};
    use margay::ipam::liveness::Liveness;
    use std::time::Duration;
    if !etcd_available("gc_releases_vanished_nodes_never_slow_ones") {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).unwrap());
    margay::cli::resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.62.0.0/24}\n",
    )
    .await
    .unwrap();
    let gone_live = Liveness::start(ds.clone(), "gone", Duration::from_secs(1))
        .await
        .unwrap();
    let gone = NodeIpam::start(ds.clone(), NodeInfo::new("gone"))
        .await
        .unwrap();
    for i in 0..3 {
        gone.assign(AssignRequest::v4(&format!("gone-{i}")))
            .await
            .unwrap();
    }
    // The slow node: its own lease, renewed late.
    let lease = ds.lease_grant(2).await.unwrap();
    ds.txn(
        &[],
        &[
            Write::PutLeased(keys::liveness_key("slow"), b"{}".to_vec(), lease),
            Write::Put(
                keys::node_record_key("slow"),
                br#"{"registeredAt":1}"#.to_vec(),
            ),
        ],
    )
    .await
    .unwrap();
    let slow = NodeIpam::start(ds.clone(), NodeInfo::new("slow"))
        .await
        .unwrap();
    for i in 0..2 {
        slow.assign(AssignRequest::v4(&format!("slow-{i}")))
            .await
            .unwrap();
    }
    let calico = NodeIpam::start(ds.clone(), NodeInfo::new("calico"))
        .await
        .unwrap();
    calico.assign(AssignRequest::v4("calico-0")).await.unwrap();
    drop(calico);

    let (ok, out, err) = margay(&ep, &["ipam", "gc"]);
    assert!(ok, "{err}");
    assert!(out.contains("2 nodes alive"), "{out}");
    assert!(
        out.contains("calico") && out.contains("no liveness record"),
        "{out}"
    );

    // Kill "gone": no more keepalives, and its lease runs out.
    drop(gone_live);
    drop(gone);
    let renew = {
        let ds = ds.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(1600)).await;
                assert!(
                    ds.lease_keep_alive(lease).await.unwrap() > 0,
                    "slow lease lost"
                );
            }
        })
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while ds.get(&keys::liveness_key("gone")).await.unwrap().is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "gone's lease never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // First sight: stamped missing, not yet releasable.
    let (ok, out, err) = margay(&ep, &["ipam", "gc", "--release", "--grace", "1s"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("gone") && out.contains("missing for 0s"),
        "{out}"
    );
    assert!(out.contains("wait: releasable"), "{out}");
    assert_eq!(blocks_of(&ds, "gone").await, 1);
    // Runs while the slow node renews late: after the grace, gone goes; slow never does.
    let mut released = false;
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (ok, out, err) = margay(&ep, &["ipam", "gc", "--release", "--grace", "1s"]);
        assert!(ok, "{err}");
        assert!(!out.contains("slow"), "slow node listed: {out}");
        if out.contains("released: 1 affinities") {
            // Its block stays, held by nobody, while the 3 addresses cool down.
            assert!(out.contains("1 kept cooling, 3 addresses"), "{out}");
            released = true;
        }
    }
    assert!(released, "gone was never released");
    renew.abort();
    let snap = margay::ipam::ops::snapshot(&ds).await.unwrap();
    assert_eq!(blocks_of(&ds, "gone").await, 0);
    assert!(
        snap.handles.keys().all(|h| !h.starts_with("gone")),
        "{:?}",
        snap.handles
    );
    assert!(snap.affinities.keys().all(|(n, _)| n != "gone"));
    assert!(ds
        .get(&keys::node_record_key("gone"))
        .await
        .unwrap()
        .is_none());
    assert_eq!(blocks_of(&ds, "slow").await, 1);
    assert_eq!(
        snap.handles
            .keys()
            .filter(|h| h.starts_with("slow"))
            .count(),
        2
    );
    assert_eq!(blocks_of(&ds, "calico").await, 1);
    let (ok, out, _) = margay(&ep, &["ipam", "check"]);
    assert!(ok && out.ends_with("found 0 problems.\n"), "{out}");
    let (ok, out, _) = margay(&ep, &["ipam", "show"]);
    assert!(
        ok && out.contains("Nodes without liveness: calico (no liveness record)"),
        "{out}"
    );
    drop(slow);
}

async fn blocks_of(ds: &Datastore, node: &str) -> usize {
    let snap = margay::ipam::ops::snapshot(ds).await.unwrap();
    snap.blocks
        .values()
        .filter(|b| b.host() == Some(node))
        .count()
}

/// `ipam check --live-handles F --release` frees the leaked handles and only those.
#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn check_release_frees_leaked_handles() {
    if !etcd_available("check_release_frees_leaked_handles") {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).unwrap());
    margay::cli::resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.63.0.0/24}\n",
    )
    .await
    .unwrap();
    let n = NodeIpam::start(ds.clone(), NodeInfo::new("node-a"))
        .await
        .unwrap();
    for h in ["live-1", "live-2", "leak-1", "leak-2"] {
        n.assign(AssignRequest::v4(h)).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let live = dir.path().join("live");
    std::fs::write(&live, "live-1\nlive-2\n").unwrap();
    let l = live.to_str().unwrap();
    let (ok, out, _) = margay(&ep, &["ipam", "check", "--live-handles", l]);
    assert!(ok && out.contains("found 2 problems"), "{out}");
    let (ok, out, err) = margay(&ep, &["ipam", "check", "--live-handles", l, "--release"]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Released 2 leaked handles (2 addresses)"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["ipam", "check", "--live-handles", l]);
    assert!(ok && out.contains("found 0 problems"), "{out}");
    let snap = margay::ipam::ops::snapshot(&ds).await.unwrap();
    assert_eq!(
        snap.handles.keys().cloned().collect::<Vec<_>>(),
        vec!["live-1".to_string(), "live-2".to_string()]
    );
    let (ok, _, err) = margay(&ep, &["ipam", "check", "--release"]);
    assert!(!ok && err.contains("--live-handles"), "{err}");
}
