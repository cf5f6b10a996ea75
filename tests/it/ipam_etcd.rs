//! IPAM against a real etcd: one transaction per uncontended assign, idempotent and dual-stack assigns,
//! specific addresses, release (idempotent), borrowing and strictAffinity, block limits, tidy-up when a pool
//! stops selecting the node, node removal, `ipam check` on broken data, and the resource CLI.

use crate::common;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use common::etcd::{etcd_available, Etcd};
use margay::cli::{self, resources, CliError, Output};
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::ipam::{ops, AssignRequest, IpamError, NodeInfo, NodeIpam};

const POOLS: &str = "
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: v4}
spec: {cidr: 10.20.0.0/24}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: v6}
spec: {cidr: 'fd00:20::/120'}
";

async fn setup(test: &str, yaml: &str) -> Option<(Etcd, Arc<Datastore>)> {
    if !etcd_available(test) {
        return None;
    }
    let etcd = Etcd::start();
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).unwrap());
    if !yaml.is_empty() {
        resources::apply(&ds, yaml).await.expect("apply pools");
    }
    Some((etcd, ds))
}

async fn node(ds: &Arc<Datastore>, name: &str) -> NodeIpam {
    NodeIpam::start(ds.clone(), NodeInfo::new(name))
        .await
        .expect("start node IPAM")
}

/// Cells of a rendered table.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.trim_matches('|')
                .split('|')
                .map(|c| c.trim().to_string())
                .collect()
        })
        .collect()
}

async fn check_clean(ds: &Datastore) {
    let (r, text) = cli::ipam::check(ds, None).await.unwrap();
    assert!(r.problems.is_empty(), "{text}");
    assert!(text.ends_with("found 0 problems.\n"), "{text}");
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn uncontended_assign_is_one_transaction() {
    let Some((_etcd, ds)) = setup("uncontended_assign_is_one_transaction", POOLS).await else {
        return;
    };
    let n = node(&ds, "node-a").await;
    // First assign claims a block: block + affinity + handle, still one transaction.
    let before = ds.stats();
    let first = n.assign(AssignRequest::v4("h0")).await.unwrap();
    assert_eq!(
        ds.stats().round_trips - before.round_trips,
        1,
        "claim + assign in one txn"
    );
    assert!(!first.ips[0].borrowed);
    for i in 1..20 {
        let before = ds.stats();
        let a = n.assign(AssignRequest::v4(&format!("h{i}"))).await.unwrap();
        let after = ds.stats();
        assert_eq!(
            (
                after.round_trips - before.round_trips,
                after.txns - before.txns
            ),
            (1, 1),
            "assign {i}"
        );
        assert_eq!(a.ips[0].block, first.ips[0].block, "same affine block");
    }
    // What is stored: the block, the confirmed affinity, one handle per pod.
    let block = first.ips[0].block;
    let aff = ds
        .get(&keys::affinity_key("node-a", &block))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(aff.value, br#"{"state":"confirmed","deleted":false}"#);
    let h = ds.get(&keys::handle_key("h3")).await.unwrap().unwrap();
    assert_eq!(
        String::from_utf8(h.value).unwrap(),
        format!(r#"{{"block":{{"{block}":1}},"deleted":false}}"#)
    );
    check_clean(&ds).await;
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn idempotent_dual_stack_and_specific_addresses() {
    let Some((_etcd, ds)) = setup("idempotent_dual_stack_and_specific_addresses", POOLS).await
    else {
        return;
    };
    let n = node(&ds, "node-a").await;
    let req = AssignRequest {
        handle_id: "k8s-pod-network.c1".into(),
        ipv4: true,
        ipv6: true,
        attributes: BTreeMap::from([
            ("namespace".into(), "default".into()),
            ("pod".into(), "web".into()),
        ]),
        ..Default::default()
    };
    let before = ds.stats();
    let a = n.assign(req.clone()).await.unwrap();
    assert_eq!(
        ds.stats().txns - before.txns,
        1,
        "two claims and a handle in one transaction"
    );
    assert_eq!(a.ips.len(), 2);
    assert!(a.ips[0].ip.is_ipv4() && a.ips[1].ip.is_ipv6());
    // The same ADD again (a retry): the same addresses, nothing new allocated.
    let again = n.assign(req).await.unwrap();
    assert_eq!(again.ips, a.ips);
    let snap = ops::snapshot(&ds).await.unwrap();
    assert_eq!(snap.blocks.values().map(|b| b.in_use()).sum::<usize>(), 2);
    let attrs = snap.blocks[&a.ips[0].block]
        .attribute_of(0)
        .unwrap()
        .secondary
        .clone()
        .unwrap();
    assert_eq!(attrs["pod"], "web");
    assert_eq!(attrs["node"], "node-a");

    // A specific address; a second owner is refused.
    let want: IpAddr = "10.20.0.200".parse().unwrap();
    let s = n
        .assign(AssignRequest {
            handle_id: "fixed".into(),
            ips: vec![want],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(s.ips[0].ip, want);
    let e = n
        .assign(AssignRequest {
            handle_id: "other".into(),
            ips: vec![want],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        matches!(e, IpamError::InUse { handle: Some(ref h), .. } if h == "fixed"),
        "{e}"
    );
    let e = n
        .assign(AssignRequest {
            handle_id: "x".into(),
            ips: vec!["192.0.2.1".parse().unwrap()],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not inside any IP pool"), "{e}");
    check_clean(&ds).await;

    // Release by handle frees both families and deletes the handle; twice is fine.
    let freed = n.release_handle("k8s-pod-network.c1").await.unwrap();
    assert_eq!(freed.len(), 2);
    assert!(n
        .release_handle("k8s-pod-network.c1")
        .await
        .unwrap()
        .is_empty());
    assert!(ds
        .get(&keys::handle_key("k8s-pod-network.c1"))
        .await
        .unwrap()
        .is_none());
    // Release by address, also idempotent.
    assert_eq!(n.release_ips(&[want]).await.unwrap(), vec![want]);
    assert!(n.release_ips(&[want]).await.unwrap().is_empty());
    assert!(ds.get(&keys::handle_key("fixed")).await.unwrap().is_none());
    // Freed addresses go to the FIFO tail: the next assign gets a never-used address.
    let next = n.assign(AssignRequest::v4("c2")).await.unwrap();
    assert_ne!(next.ips[0].ip, a.ips[0].ip);
    check_clean(&ds).await;
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn borrowing_strict_affinity_and_block_limits() {
    let one_block = "
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: tiny}
spec: {cidr: 10.30.0.0/28, blockSize: 28}
";
    let Some((_etcd, ds)) = setup("borrowing_strict_affinity_and_block_limits", one_block).await
    else {
        return;
    };
    let a = node(&ds, "node-a").await;
    let got = a.assign(AssignRequest::v4("a1")).await.unwrap();
    assert!(!got.ips[0].borrowed);
    // node-b cannot claim (the pool has one block): it borrows, and must advertise a host route.
    let b = node(&ds, "node-b").await;
    let lent = b.assign(AssignRequest::v4("b1")).await.unwrap();
    assert!(lent.ips[0].borrowed, "{lent:?}");
    assert_eq!(lent.ips[0].block, got.ips[0].block);
    let routes = b.routes().await.unwrap();
    assert!(routes.blocks.is_empty());
    assert_eq!(routes.borrowed, vec![(lent.ips[0].ip, lent.ips[0].block)]);
    let show = cli::ipam::show(&ds, true, true).await.unwrap();
    assert!(
        show.contains(&lent.ips[0].ip.to_string()) && show.contains("node-b"),
        "{show}"
    );
    check_clean(&ds).await;

    // strictAffinity: a node started after the change must not borrow.
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true}\n",
    )
    .await
    .unwrap();
    let c = node(&ds, "node-c").await;
    let e = c.assign(AssignRequest::v4("c1")).await.unwrap_err();
    assert!(e.to_string().contains("strictAffinity"), "{e}");

    // maxBlocksPerHost: 1 and autoAllocateBlocks: false are honoured, with the reason in the error.
    let Some((_etcd2, ds2)) = setup("borrowing_strict_affinity_and_block_limits", POOLS).await
    else {
        return;
    };
    resources::apply(
        &ds2,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true, maxBlocksPerHost: 1}\n",
    )
    .await
    .unwrap();
    let n = node(&ds2, "n").await;
    for i in 0..64 {
        n.assign(AssignRequest::v4(&format!("p{i}"))).await.unwrap();
    }
    let e = n.assign(AssignRequest::v4("p64")).await.unwrap_err();
    assert!(e.to_string().contains("maxBlocksPerHost is 1"), "{e}");
    resources::apply(
        &ds2,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {autoAllocateBlocks: false}\n",
    )
    .await
    .unwrap();
    let m = node(&ds2, "m").await;
    let e = m.assign(AssignRequest::v4("q")).await.unwrap_err();
    assert!(e.to_string().contains("autoAllocateBlocks is false"), "{e}");
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn empty_blocks_released_when_pool_stops_selecting_node() {
    let Some((_etcd, ds)) = setup(
        "empty_blocks_released_when_pool_stops_selecting_node",
        POOLS,
    )
    .await
    else {
        return;
    };
    let n = NodeIpam::start(
        ds.clone(),
        NodeInfo {
            name: "node-a".into(),
            labels: BTreeMap::from([("zone".into(), "a".into())]),
        },
    )
    .await
    .unwrap();
    let a = n.assign(AssignRequest::v4("h")).await.unwrap();
    n.release_handle("h").await.unwrap();
    let bkey = keys::block_key(&a.ips[0].block);
    assert!(
        ds.get(&bkey).await.unwrap().is_some(),
        "an empty affine block is kept"
    );
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v4}\nspec: {cidr: 10.20.0.0/24, nodeSelector: \"zone == 'b'\"}\n",
    )
    .await
    .unwrap();
    // The node learns the change by its watch and releases the block with its affinity (the block itself
    // stays, held by no node, while its released address cools down).
    let mut gone = false;
    for _ in 0..200 {
        match ds.get(&bkey).await.unwrap() {
            None => gone = true,
            Some(kv) => {
                let b: margay::ipam::Block = serde_json::from_slice(&kv.value).unwrap();
                gone = b.affinity.is_none() && b.is_empty();
            }
        }
        if gone {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gone,
        "empty block of a pool that no longer selects the node must be released"
    );
    assert!(ds
        .get(&keys::affinity_key("node-a", &a.ips[0].block))
        .await
        .unwrap()
        .is_none());
    let e = n.assign(AssignRequest::v4("h2")).await.unwrap_err();
    assert!(
        e.to_string().contains("no enabled IPv4 pool selects node"),
        "{e}"
    );
    check_clean(&ds).await;
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn node_remove_releases_affinities_blocks_and_handles() {
    let one_block = "
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: small}
spec: {cidr: 10.40.0.0/27, blockSize: 28}
";
    let Some((_etcd, ds)) = setup(
        "node_remove_releases_affinities_blocks_and_handles",
        one_block,
    )
    .await
    else {
        return;
    };
    let a = node(&ds, "node-a").await;
    let b = node(&ds, "node-b").await;
    for i in 0..16 {
        a.assign(AssignRequest::v4(&format!("a{i}"))).await.unwrap();
    }
    // node-b gets the second block, fills it, then borrows one address from node-a's block... which is full,
    // so free one there first.
    a.release_handle("a15").await.unwrap();
    for i in 0..17 {
        b.assign(AssignRequest::v4(&format!("b{i}"))).await.unwrap();
    }
    let routes = b.routes().await.unwrap();
    assert_eq!(routes.borrowed.len(), 1);
    check_clean(&ds).await;
    drop(a);

    let etcd_args = cli::EtcdArgs {
        etcd_endpoints: ds.endpoints().to_vec(),
        etcd_ca: None,
        etcd_cert: None,
        etcd_key: None,
        etcd_timeout: 5,
    };
    let out = cli::run_node(
        &etcd_args,
        &cli::NodeCmd::Remove {
            name: "node-a".into(),
        },
    )
    .await
    .unwrap();
    assert!(out.contains("15 addresses released"), "{out}");
    assert!(out.contains("1 blocks kept"), "{out}");
    let snap = ops::snapshot(&ds).await.unwrap();
    assert!(snap.affinities.keys().all(|(n, _)| n != "node-a"));
    assert!(
        snap.handles.keys().all(|h| !h.starts_with('a')),
        "{:?}",
        snap.handles.keys()
    );
    assert_eq!(snap.handles.len(), 17);
    check_clean(&ds).await;

    drop(b);
    cli::run_node(
        &etcd_args,
        &cli::NodeCmd::Remove {
            name: "node-b".into(),
        },
    )
    .await
    .unwrap();
    // The emptied blocks stay, held by no node, while their addresses cool down (a block claimed afresh would
    // hand them out at once); any node may take them over, `ipam gc --release` deletes them once cooled.
    let snap = ops::snapshot(&ds).await.unwrap();
    assert!(
        snap.handles.is_empty() && snap.affinities.is_empty(),
        "{snap:?}"
    );
    assert!(!snap.blocks.is_empty());
    for b in snap.blocks.values() {
        assert!(b.affinity.is_none() && b.is_empty() && !b.released_at.is_empty());
    }
    let out = cli::ipam::gc(&ds, Duration::ZERO, true).await.unwrap();
    assert!(
        out.contains("Deleted 0 empty blocks"),
        "still cooling: {out}"
    );
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {releasedAddressCooldown: 200ms}\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let out = cli::ipam::gc(&ds, Duration::ZERO, true).await.unwrap();
    assert!(!out.contains("Deleted 0 empty blocks"), "{out}");
    let snap = ops::snapshot(&ds).await.unwrap();
    assert!(
        snap.blocks.is_empty() && snap.handles.is_empty() && snap.affinities.is_empty(),
        "{snap:?}"
    );
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn check_reports_every_kind_of_problem() {
    let Some((_etcd, ds)) = setup("check_reports_every_kind_of_problem", POOLS).await else {
        return;
    };
    let n = node(&ds, "node-a").await;
    let a = n.assign(AssignRequest::v4("good")).await.unwrap();
    check_clean(&ds).await;
    let block = a.ips[0].block;
    // A handle pointing at a block that does not exist.
    let others: Vec<ipnetwork::IpNetwork> = [
        "10.20.0.0/26",
        "10.20.0.64/26",
        "10.20.0.128/26",
        "10.20.0.192/26",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .filter(|c| *c != block)
    .collect();
    let ghost = format!(r#"{{"block":{{"{}":1}},"deleted":false}}"#, others[0]);
    ds.create(&keys::handle_key("ghost"), ghost.into_bytes())
        .await
        .unwrap();
    // An allocation whose handle does not exist (delete the real handle).
    let h = ds.get(&keys::handle_key("good")).await.unwrap().unwrap();
    ds.delete(&keys::handle_key("good"), h.mod_revision)
        .await
        .unwrap();
    // Another node claiming the same block (two owners), and an affinity without a block.
    ds.create(
        &keys::affinity_key("node-x", &block),
        br#"{"state":"confirmed","deleted":false}"#.to_vec(),
    )
    .await
    .unwrap();
    let other = others[1];
    ds.create(
        &keys::affinity_key("node-y", &other),
        br#"{"state":"pending","deleted":false}"#.to_vec(),
    )
    .await
    .unwrap();
    // A block with broken structure.
    let bad: ipnetwork::IpNetwork = "fd00:20::/122".parse().unwrap();
    ds.create(
        &keys::block_key(&bad),
        br#"{"cidr":"fd00:20::/122","affinity":null,"allocations":[null],"unallocated":[0,0],"attributes":[],"sequenceNumber":1,"sequenceNumberForAllocation":null,"deleted":false}"#.to_vec(),
    )
    .await
    .unwrap();
    let (r, text) = cli::ipam::check(&ds, None).await.unwrap();
    let has = |s: &str| r.problems.iter().any(|p| p.contains(s));
    assert!(
        has(&format!(
            "handle \"ghost\" points at block {}, which does not exist",
            others[0]
        )),
        "{text}"
    );
    assert!(
        has("belongs to handle \"good\", which does not exist"),
        "{text}"
    );
    assert!(has("several owners"), "{text}");
    assert!(
        has(&format!(
            "pending affinity for block {other}, which does not exist"
        )),
        "{text}"
    );
    assert!(has("ordinal 0 is free twice"), "{text}");
    assert!(
        text.ends_with(&format!("found {} problems.\n", r.problems.len())),
        "{text}"
    );
    // Live handles: the allocation of "good" is not in use by any container.
    let live = std::collections::BTreeSet::from(["other".to_string()]);
    let (r2, _) = cli::ipam::check(&ds, Some(&live)).await.unwrap();
    assert!(r2
        .problems
        .iter()
        .any(|p| p.contains("no live container uses it")));
}

#[tokio::test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn apply_get_delete_resources() {
    let Some((_etcd, ds)) = setup("apply_get_delete_resources", POOLS).await else {
        return;
    };
    let table = resources::get(&ds, "ippools", None, Output::Table)
        .await
        .unwrap();
    assert!(
        rows(&table).contains(&vec![
            "v4".to_string(),
            "10.20.0.0/24".into(),
            "all()".into()
        ]),
        "{table}"
    );
    let wide = resources::get(&ds, "ippool", Some("v4"), Output::Wide)
        .await
        .unwrap();
    assert!(
        wide.contains("IPIPMODE") && wide.contains("Automatic"),
        "{wide}"
    );
    let yaml = resources::get(&ds, "ippool", Some("v6"), Output::Yaml)
        .await
        .unwrap();
    assert!(
        yaml.contains("blockSize: 122") && yaml.contains("kind: IPPool"),
        "{yaml}"
    );
    let json = resources::get(&ds, "IPPool", None, Output::Json)
        .await
        .unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"].as_array().unwrap().len(), 2);

    // Refused with the field and the reason; nothing stored.
    let overlap = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: o}\nspec: {cidr: 10.20.0.128/25}\n";
    let e = resources::apply(&ds, overlap).await.unwrap_err();
    assert!(
        matches!(e.inner(), CliError::Config(c) if c.field == "spec.cidr" && c.reason.contains("overlaps pool \"v4\""))
            && e.to_string().starts_with("document 1: "),
        "{e}"
    );
    let bad = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.50.0.1/24, blockSize: 26}\n";
    assert!(resources::apply(&ds, bad)
        .await
        .unwrap_err()
        .to_string()
        .contains("host bits"));
    let bs = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: b}\nspec: {cidr: 10.50.0.0/16, blockSize: 19}\n";
    assert!(resources::apply(&ds, bs)
        .await
        .unwrap_err()
        .to_string()
        .contains("spec.blockSize"));
    assert!(resources::get(&ds, "ippool", Some("o"), Output::Table)
        .await
        .is_err());

    // IPAMConfiguration is stored where Calico keeps it, in Calico's v1 form.
    resources::apply(&ds, "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true, maxBlocksPerHost: 3}\n")
        .await
        .unwrap();
    let raw = ds.get(keys::IPAM_CONFIG_KEY).await.unwrap().unwrap();
    assert_eq!(
        raw.value,
        br#"{"strict_affinity":true,"auto_allocate_blocks":true,"maxBlocksPerHost":3}"#
    );
    let t = resources::get(&ds, "ipamconfig", None, Output::Table)
        .await
        .unwrap();
    assert!(
        rows(&t).contains(&vec!["default".to_string(), "true".into(), "3".into()]),
        "{t}"
    );

    let out = resources::delete(&ds, "ippool", "v6").await.unwrap();
    assert!(out.contains("Successfully deleted"), "{out}");
    assert!(matches!(
        resources::delete(&ds, "ippool", "v6").await,
        Err(CliError::NotFound(_))
    ));
    assert!(resources::kind("bgpfilter").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn a_burst_of_assigns_is_batched_into_few_transactions() {
    let Some((_etcd, ds)) =
        setup("a_burst_of_assigns_is_batched_into_few_transactions", POOLS).await
    else {
        return;
    };
    let n = Arc::new(node(&ds, "node-a").await);
    // Warm: the node holds a block already.
    n.assign(AssignRequest::v4("warm")).await.unwrap();
    let before = ds.stats();
    let mut jobs = Vec::new();
    for i in 0..100 {
        let n = n.clone();
        jobs.push(tokio::spawn(async move {
            let mut r = AssignRequest::v4(&format!("burst-{i}"));
            r.ipv6 = i % 2 == 0;
            n.assign(r).await
        }));
    }
    let mut seen = std::collections::BTreeSet::new();
    for j in jobs {
        let a = j.await.unwrap().expect("assign");
        for ip in a.ips {
            assert!(seen.insert(ip.ip), "{} twice", ip.ip);
        }
    }
    assert_eq!(seen.len(), 150);
    let txns = ds.stats().txns - before.txns;
    eprintln!("100 concurrent assigns (150 addresses) in {txns} transactions");
    assert!(
        txns < 100,
        "queued assigns must share transactions ({txns})"
    );
    let snap = ops::snapshot(&ds).await.unwrap();
    assert_eq!(snap.handles.len(), 101);
    check_clean(&ds).await;
}

/// Empty blocks come back after the grace period, but the node keeps one block of its pool, and a block with
/// an allocation is never released.
#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn empty_blocks_released_after_grace_keeping_one_per_pool() {
    let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: v4}\nspec: {cidr: 10.21.0.0/24}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {emptyBlockGracePeriod: 1h, releasedAddressCooldown: 0s}\n";
    let Some((_etcd, ds)) = setup("empty_blocks_released_after_grace", yaml).await else {
        return;
    };
    let n = node(&ds, "node-a").await;
    // 3 blocks' worth: 64 + 64 + 2.
    for i in 0..130 {
        n.assign(AssignRequest::v4(&format!("p{i}"))).await.unwrap();
    }
    let mine = |s: &ops::Snapshot| {
        s.blocks
            .values()
            .filter(|b| b.host() == Some("node-a"))
            .count()
    };
    assert_eq!(mine(&ops::snapshot(&ds).await.unwrap()), 3);
    // Empty all but one address of the third block: two blocks empty, one in use.
    let snap = ops::snapshot(&ds).await.unwrap();
    let keep = snap
        .blocks
        .values()
        .find_map(|b| b.ips_of_handle("p129").first().map(|ip| (b.cidr, *ip)))
        .unwrap();
    for i in 0..129 {
        n.release_handle(&format!("p{i}")).await.unwrap();
    }
    // Inside the grace: nothing goes.
    assert_eq!(n.release_idle_blocks().await.unwrap(), 0);
    assert_eq!(mine(&ops::snapshot(&ds).await.unwrap()), 3);
    // The grace shortened in IPAMConfiguration: the blocks have been empty for longer than that.
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {emptyBlockGracePeriod: 300ms, releasedAddressCooldown: 0s}\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    n.release_idle_blocks().await.unwrap();
    let snap = ops::snapshot(&ds).await.unwrap();
    // Both empty blocks went (the block in use is the one kept for the pool), with their affinities.
    assert_eq!(mine(&snap), 1, "{:?}", snap.blocks.keys());
    assert_eq!(snap.blocks[&keep.0].handle_of(keep.1), Some("p129"));
    assert_eq!(snap.affinities.len(), 1);
    check_clean(&ds).await;
    // Last address gone: the now-empty block stays (one per pool).
    n.release_handle("p129").await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    n.release_idle_blocks().await.unwrap();
    assert_eq!(mine(&ops::snapshot(&ds).await.unwrap()), 1);
    let r = n.routes().await.unwrap();
    assert_eq!((r.blocks_empty, r.counters.blocks_released), (1, 2));
    check_clean(&ds).await;
}

/// A released address cools down: not handed out again inside the cooldown while anything else is free, even
/// by a restarted node (the stamp is in the block, in etcd), and only when the pool is otherwise exhausted.
#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn released_addresses_cool_down_across_restarts() {
    // Two blocks of 8 addresses; no borrowing.
    let yaml = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: tiny}\nspec: {cidr: 10.22.0.0/28, blockSize: 29}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true, releasedAddressCooldown: 60s}\n";
    let Some((_etcd, ds)) = setup("released_addresses_cool_down_across_restarts", yaml).await
    else {
        return;
    };
    let n = node(&ds, "node-a").await;
    let mut first = Vec::new();
    for i in 0..8 {
        first.push(
            n.assign(AssignRequest::v4(&format!("a{i}")))
                .await
                .unwrap()
                .ips[0],
        );
    }
    let x = first[3];
    n.release_handle("a3").await.unwrap();
    // The block's only free address is cooling: a new block is claimed instead.
    let y = n.assign(AssignRequest::v4("b0")).await.unwrap().ips[0];
    assert_ne!(y.block, x.block);
    // The stamp is stored (calicoctl ignores the field).
    let raw = ds.get(&keys::block_key(&x.block)).await.unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&raw.value).unwrap();
    assert!(v["margayReleasedAt"]["3"].as_u64().unwrap() > 0, "{v}");
    // Restart: the new task reads the stamp from etcd.
    drop(n);
    let n = node(&ds, "node-a").await;
    for i in 1..8 {
        let a = n.assign(AssignRequest::v4(&format!("b{i}"))).await.unwrap();
        assert_ne!(a.ips[0].ip, x.ip, "reused inside the cooldown");
    }
    let out = cli::ipam::show(&ds, false, false).await.unwrap();
    assert!(
        out.contains("Addresses cooling down: 1 (cooldown 60s)"),
        "{out}"
    );
    // Nothing else is left: the cooling address is better than failing.
    let last = n.assign(AssignRequest::v4("c0")).await.unwrap();
    assert_eq!(last.ips[0].ip, x.ip);
    assert_eq!(n.routes().await.unwrap().counters.cooling_handed_out, 1);
    let e = n.assign(AssignRequest::v4("c1")).await.unwrap_err();
    assert!(matches!(e, IpamError::NoAddress(_)), "{e}");
    check_clean(&ds).await;
}

/// The opt-in automatic gc: two candidates elect one leader through etcd; the leader releases a node whose
/// liveness lease is gone (grace 0 here) without any operator; when the leader stops, the other takes over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn elected_gc_leader_releases_vanished_nodes() {
    use margay::ipam::liveness::{gc_leader, run_gc_leader, Liveness};
    let Some((_etcd, ds)) = setup("elected_gc_leader_releases_vanished_nodes", POOLS).await else {
        return;
    };
    let live = Liveness::start(ds.clone(), "gone", Duration::from_secs(1))
        .await
        .unwrap();
    let gone = node(&ds, "gone").await;
    gone.assign(AssignRequest::v4("g0")).await.unwrap();
    let stays = node(&ds, "stays").await;
    let _stays_live = Liveness::start(ds.clone(), "stays", Duration::from_secs(1))
        .await
        .unwrap();
    stays.assign(AssignRequest::v4("s0")).await.unwrap();
    let leader = |name: &str| {
        tokio::spawn(run_gc_leader(
            ds.clone(),
            name.to_string(),
            Duration::from_secs(1),
            Duration::from_millis(200),
            Duration::ZERO,
        ))
    };
    let (c1, c2) = (leader("cand-1"), leader("cand-2"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let first = loop {
        if let Some(l) = gc_leader(&ds).await.unwrap() {
            break l;
        }
        assert!(std::time::Instant::now() < deadline, "nobody elected");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The node dies; the leader releases it.
    drop(live);
    drop(gone);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let snap = ops::snapshot(&ds).await.unwrap();
        if snap.affinities.keys().all(|(n, _)| n != "gone") && !snap.handles.contains_key("g0") {
            assert!(snap.handles.contains_key("s0"), "a live node was released");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "leader never released the node"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The leader stops: its lease runs out, the other candidate is elected.
    if first == "cand-1" {
        c1.abort();
    } else {
        c2.abort();
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match gc_leader(&ds).await.unwrap() {
            Some(l) if l != first => break,
            _ => {}
        }
        assert!(std::time::Instant::now() < deadline, "no new leader");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c1.abort();
    c2.abort();
    check_clean(&ds).await;
}

/// A pool written just now is in the node's pools when asked for by name, even while the node's view is
/// behind (here: its watch resuming after an etcd outage), as `docker network create --ipam-opt pool=NAME`
/// right after `margay apply` needs; a name etcd does not hold is answered without it. (Asking the view
/// alone failed here in one of three runs.)
#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn a_pool_written_just_now_is_found_by_name_after_an_outage() {
    let Some((mut etcd, ds)) = setup(
        "a_pool_written_just_now_is_found_by_name_after_an_outage",
        POOLS,
    )
    .await
    else {
        return;
    };
    let n = node(&ds, "n1").await;
    // The view's watch fails and its resync backs off while etcd is down.
    etcd.kill9();
    tokio::time::sleep(Duration::from_secs(3)).await;
    etcd.restart();
    // The view has read everything again (a request waits for that); its new watch is starting.
    n.pools().await.expect("pools after the outage");
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: late}\nspec: {cidr: 10.21.0.0/24}\n",
    )
    .await
    .expect("apply the new pool");
    let pools = n
        .pools_naming("late", Duration::from_secs(30))
        .await
        .expect("pools");
    assert!(
        pools.iter().any(|p| p.name() == "late"),
        "the pool written just now: {:?}",
        pools.iter().map(|p| p.name()).collect::<Vec<_>>()
    );
    let pools = n
        .pools_naming("nope", Duration::from_secs(60))
        .await
        .expect("pools");
    assert!(pools.iter().all(|p| p.name() != "nope"));
    assert!(pools.iter().any(|p| p.name() == "v4"));
}
