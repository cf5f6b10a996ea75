//! The node daemon's datastore side against a real etcd: registering the Node resource (created, updated,
//! operator fields kept, a no-op when unchanged), the default pool (created only when no pool exists), and
//! the BGP resources read back as a ConfigSet from which the full mesh is derived.
//!
//! ```text
//!   test ──register_node / ensure_default_pool / load_config──▶ etcd (loopback, temporary)
//! ```

use crate::common;

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::config::bgp::NODE_PLURAL as NODES_PLURAL;
use margay::config::peers::desired_peers;
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::node::{ensure_default_pool, load_config, register_node};

fn setup(test: &str) -> Option<(Etcd, Arc<Datastore>)> {
    if !etcd_available(test) {
        return None;
    }
    let etcd = Etcd::start();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).expect("datastore"));
    Some((etcd, ds))
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn node_registration_and_mesh_from_etcd() {
    let Some((_etcd, ds)) = setup("node_registration_and_mesh_from_etcd") else {
        return;
    };
    let a = Ipv4Addr::new(10, 0, 0, 1);
    let b = Ipv4Addr::new(10, 0, 0, 2);
    register_node(&ds, "a", a, 24, None)
        .await
        .expect("register a");
    register_node(&ds, "b", b, 24, Some(64512))
        .await
        .expect("register b");

    // Unchanged: no write (the mod revision stays).
    let key = keys::resource_key(NODES_PLURAL, "a");
    let before = ds.get(&key).await.unwrap().expect("node a stored");
    register_node(&ds, "a", a, 24, None)
        .await
        .expect("register a again");
    let after = ds.get(&key).await.unwrap().expect("node a stored");
    assert_eq!(before.mod_revision, after.mod_revision);

    // An operator's label survives a new address.
    let mut doc: serde_json::Value = serde_json::from_slice(&after.value).unwrap();
    doc["metadata"]["labels"] = serde_json::json!({"rack": "r1"});
    ds.update(&key, serde_json::to_vec(&doc).unwrap(), after.mod_revision)
        .await
        .unwrap()
        .expect("label written");
    let a2 = Ipv4Addr::new(10, 0, 0, 11);
    register_node(&ds, "a", a2, 24, None)
        .await
        .expect("re-register a");
    let set = load_config(&ds).await.expect("load config");
    let node_a = &set.nodes["a"];
    assert_eq!(node_a.ipv4(), Some(IpAddr::V4(a2)));
    assert_eq!(
        node_a.metadata.labels.get("rack").map(String::as_str),
        Some("r1")
    );
    assert_eq!(set.nodes["b"].as_number(), Some(64512));

    // The full mesh: a peers with b and b with a.
    let pa = desired_peers(&set, "a").expect("peers of a");
    assert_eq!(
        pa.iter().map(|p| p.address).collect::<Vec<_>>(),
        vec![IpAddr::V4(b)]
    );
    let pb = desired_peers(&set, "b").expect("peers of b");
    assert_eq!(
        pb.iter().map(|p| p.address).collect::<Vec<_>>(),
        vec![IpAddr::V4(a2)]
    );
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn default_pool_only_when_none_exists() {
    let Some((_etcd, ds)) = setup("default_pool_only_when_none_exists") else {
        return;
    };
    let prefix = keys::resource_prefix(margay::config::ippool::PLURAL);
    ensure_default_pool(&ds, "10.244.0.0/16".parse().unwrap(), 26)
        .await
        .expect("default pool");
    let (pools, _) = ds.list(&prefix).await.unwrap();
    assert_eq!(pools.len(), 1);
    let pool: serde_json::Value = serde_json::from_slice(&pools[0].value).unwrap();
    assert_eq!(pool["spec"]["cidr"], "10.244.0.0/16");
    assert_eq!(pool["spec"]["blockSize"], 26);
    // A pool exists: a node with another default changes nothing.
    ensure_default_pool(&ds, "10.250.0.0/16".parse().unwrap(), 24)
        .await
        .expect("second call");
    let (pools, _) = ds.list(&prefix).await.unwrap();
    assert_eq!(pools.len(), 1);
}

/// BGP passwords from Secrets mounted as files (`--bgp-secrets-dir`): without the file the node refuses the
/// set and names the Secret; with it the peer gets the password; a rotated file is read on the next load.
#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn bgp_password_secrets_from_mounted_files() {
    let Some((_etcd, ds)) = setup("bgp_password_secrets_from_mounted_files") else {
        return;
    };
    register_node(&ds, "a", Ipv4Addr::new(10, 0, 0, 1), 24, None)
        .await
        .expect("register a");
    margay::cli::resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: tor}\nspec:\n  peerIP: 10.0.0.254\n  asNumber: 65001\n  password: {secretKeyRef: {name: bgp-secrets, key: tor}}\n",
    )
    .await
    .expect("apply the peer");

    let dir = tempfile::tempdir().unwrap();
    let err = margay::node::load_config_with(&ds, Some(dir.path()))
        .await
        .expect_err("no secret file yet");
    assert!(format!("{err:#}").contains("bgp-secrets"), "{err:#}");

    // The layout of a Kubernetes Secret volume mounted at <dir>/bgp-secrets (..data bookkeeping skipped).
    let secret = dir.path().join("bgp-secrets");
    std::fs::create_dir_all(secret.join("..2026_11_22_07_00_00.0")).unwrap();
    std::fs::write(secret.join("tor"), "s3cret").unwrap();
    let set = margay::node::load_config_with(&ds, Some(dir.path()))
        .await
        .expect("secret resolves");
    let peers = desired_peers(&set, "a").unwrap();
    let tor = peers
        .iter()
        .find(|p| p.address == IpAddr::V4(Ipv4Addr::new(10, 0, 0, 254)))
        .expect("tor peer");
    assert_eq!(tor.password.as_deref(), Some("s3cret"));

    std::fs::write(secret.join("tor"), "rotated").unwrap();
    let set = margay::node::load_config_with(&ds, Some(dir.path()))
        .await
        .unwrap();
    let peers = desired_peers(&set, "a").unwrap();
    assert!(peers
        .iter()
        .any(|p| p.password.as_deref() == Some("rotated")));
    // A missing directory means no Secrets (the same refusal as without the file).
    assert!(
        margay::node::load_config_with(&ds, Some(&dir.path().join("absent")))
            .await
            .is_err()
    );
}

/// The configuration feed follows a BGPPeer put and delete and a Node joining and leaving through its one
/// watch: each change reaches the snapshot and the peers derived from it, while the feed's own etcd request
/// counter (the one `/metrics` exports as `margay_etcd_requests`) stays where the start-up list left it and
/// no second list happens; an idle second reads nothing either.
#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn config_feed_follows_changes_without_relisting() {
    use margay::feed::{ConfigFeed, FeedOptions, Snapshot};
    use std::time::Duration;

    let Some((etcd, writer)) = setup("config_feed_follows_changes_without_relisting") else {
        return;
    };
    register_node(&writer, "a", Ipv4Addr::new(10, 0, 0, 1), 24, None)
        .await
        .expect("register a");
    // The feed's datastore is its own, so its counters hold the feed's requests only.
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).expect("datastore"));
    let feed = ConfigFeed::start(ds.clone(), FeedOptions::default())
        .await
        .expect("feed starts");
    let listed = ds.stats().round_trips;
    assert_eq!(listed, 4, "one list per watched kind at start");
    assert_eq!(feed.counters().lists.get(), 1);
    let mut rx = feed.subscribe();

    async fn until(
        rx: &mut tokio::sync::watch::Receiver<Arc<Snapshot>>,
        what: &str,
        ok: impl Fn(&Snapshot) -> bool,
    ) -> Arc<Snapshot> {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let s = rx.borrow_and_update().clone();
                if ok(&s) {
                    return s;
                }
                rx.changed().await.expect("feed alive");
            }
        })
        .await
        .unwrap_or_else(|_| panic!("the feed never showed {what}"))
    }
    let peer_of = |s: &Snapshot, ip: Ipv4Addr| {
        let set = s.config_set(Default::default()).expect("valid set");
        desired_peers(&set, "a")
            .expect("peers")
            .iter()
            .any(|p| p.address == IpAddr::V4(ip))
    };
    let tor = Ipv4Addr::new(10, 0, 0, 254);
    let b = Ipv4Addr::new(10, 0, 0, 2);

    margay::cli::resources::apply(
        &writer,
        "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: tor}\nspec: {peerIP: 10.0.0.254, asNumber: 65001}\n",
    )
    .await
    .expect("apply the peer");
    until(&mut rx, "the BGPPeer put", |s| peer_of(s, tor)).await;
    margay::cli::resources::delete(&writer, "bgppeer", "tor")
        .await
        .expect("delete the peer");
    until(&mut rx, "the BGPPeer delete", |s| {
        s.bgp_peers.is_empty() && !peer_of(s, tor)
    })
    .await;

    register_node(&writer, "b", b, 24, None)
        .await
        .expect("b joins");
    until(&mut rx, "node b joining the mesh", |s| peer_of(s, b)).await;
    margay::datastore::resources::delete_node(&writer, "b")
        .await
        .expect("b leaves");
    let last = until(&mut rx, "node b leaving", |s| {
        !s.nodes.contains_key("b") && !peer_of(s, b)
    })
    .await;

    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        ds.stats().round_trips,
        listed,
        "the feed sent etcd requests after its start-up list"
    );
    assert_eq!(feed.counters().lists.get(), 1, "the feed listed again");
    assert!(
        feed.counters().events.get() >= 4,
        "four changes, each one event"
    );
    assert_eq!(feed.current().revision, last.revision);
    // The same numbers as the daemon exports them.
    let mut registry = prometheus_client::registry::Registry::default();
    feed.counters().register(&mut registry);
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
    assert!(text.contains("margay_config_feed_lists_total 1"), "{text}");
}
