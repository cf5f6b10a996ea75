//! 8 simulated nodes assign 200 addresses each at the same time from two pools against a real etcd, one pool
//! small enough to force borrowing; then no address twice, `ipam check` clean, every node's blocks its own;
//! release everything; nothing leaks. The second test runs the same while etcd is SIGKILLed and restarted:
//! no duplicate, no acknowledged allocation lost, outage errors say etcd is unreachable, nothing half-written.
//!
//! ```text
//!   node-0 .. node-7  (one NodeIpam task each, all in this process)
//!        \  |  /
//!         etcd (one member, loopback)      pools: small 10.1.0.0/22, blockSize 24 -> 4 blocks for 8 nodes
//!                                                 big   10.2.0.0/16, blockSize 26
//!   each node: 100 addresses from [small] (4 nodes get a block, 4 must borrow), 100 from [big]
//! ```

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::etcd::{etcd_available, Etcd};
use margay::cli::{self, resources};
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::ipam::{ops, AssignRequest, Assignment, IpamError, NodeInfo, NodeIpam};

const NODES: usize = 8;
const PER_NODE: usize = 200;

const POOLS: &str = "
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: small}
spec: {cidr: 10.1.0.0/22, blockSize: 24}
---
apiVersion: projectcalico.org/v3
kind: IPPool
metadata: {name: big}
spec: {cidr: 10.2.0.0/16, blockSize: 26}
";

fn request(node: usize, i: usize) -> AssignRequest {
    AssignRequest {
        handle_id: format!("k8s-pod-network.n{node}-c{i}"),
        ipv4: true,
        pools: Some(vec![
            if i.is_multiple_of(2) { "small" } else { "big" }.to_string()
        ]),
        attributes: BTreeMap::from([
            ("namespace".to_string(), "default".to_string()),
            ("pod".to_string(), format!("pod-{node}-{i}")),
        ]),
        ..Default::default()
    }
}

fn datastore(etcd: &Etcd, retry_for: Duration) -> Arc<Datastore> {
    let mut cfg = DatastoreConfig::new(&[etcd.endpoint()]);
    cfg.retry_for = retry_for;
    cfg.request_timeout = Duration::from_secs(2);
    cfg.connect_timeout = Duration::from_millis(500);
    Arc::new(Datastore::new(cfg).expect("datastore"))
}

async fn start_nodes(ds: &Arc<Datastore>) -> Vec<Arc<NodeIpam>> {
    let mut nodes = Vec::new();
    for n in 0..NODES {
        nodes.push(Arc::new(
            NodeIpam::start(ds.clone(), NodeInfo::new(&format!("node-{n}")))
                .await
                .expect("node IPAM"),
        ));
    }
    nodes
}

/// The checks after the run: no duplicate, each acknowledged allocation stored under its handle, check clean,
/// blocks and affinities agree node by node.
async fn verify(ds: &Datastore, acked: &BTreeMap<String, (usize, Assignment)>) {
    let mut seen: BTreeMap<IpAddr, &str> = BTreeMap::new();
    for (h, (_, a)) in acked {
        for ip in &a.ips {
            if let Some(other) = seen.insert(ip.ip, h) {
                panic!("{} handed out twice: {other} and {h}", ip.ip);
            }
        }
    }
    let snap = ops::snapshot(ds).await.unwrap();
    for (h, (node, a)) in acked {
        for ip in &a.ips {
            let b = snap
                .blocks
                .get(&ip.block)
                .unwrap_or_else(|| panic!("block {} of {h} lost", ip.block));
            assert_eq!(
                b.handle_of(ip.ip),
                Some(h.as_str()),
                "acknowledged {} of {h} lost",
                ip.ip
            );
            let owner = b.host().unwrap();
            assert_eq!(
                ip.borrowed,
                owner != format!("node-{node}"),
                "{h}: {ip:?} in block of {owner}"
            );
        }
    }
    // Every allocation stored is one somebody was told about (or one retried under the same handle).
    let stored: usize = snap.blocks.values().map(|b| b.in_use()).sum();
    assert_eq!(
        stored,
        acked.values().map(|(_, a)| a.ips.len()).sum::<usize>(),
        "allocations without an owner"
    );
    for (node, cidr) in snap.affinities.keys() {
        assert_eq!(
            snap.blocks[cidr].host(),
            Some(node.as_str()),
            "block {cidr} is not {node}'s own"
        );
    }
    let (r, text) = cli::ipam::check(ds, None).await.unwrap();
    assert!(r.problems.is_empty(), "{text}");
}

async fn release_all_and_check_nothing_leaks(
    ds: &Datastore,
    nodes: &[Arc<NodeIpam>],
    acked: &BTreeMap<String, (usize, Assignment)>,
) {
    let mut jobs = Vec::new();
    for (h, (n, _)) in acked {
        let node = nodes[*n].clone();
        let h = h.clone();
        jobs.push(tokio::spawn(async move { node.release_handle(&h).await }));
    }
    for j in jobs {
        j.await.unwrap().expect("release");
    }
    let snap = ops::snapshot(ds).await.unwrap();
    assert!(
        snap.handles.is_empty(),
        "handles leaked: {:?}",
        snap.handles.keys().take(5).collect::<Vec<_>>()
    );
    assert_eq!(
        snap.blocks.values().map(|b| b.in_use()).sum::<usize>(),
        0,
        "addresses leaked"
    );
    let (r, text) = cli::ipam::check(ds, None).await.unwrap();
    assert!(r.problems.is_empty(), "{text}");
    for n in 0..NODES {
        ops::remove_node(ds, &format!("node-{n}")).await.unwrap();
    }
    // The emptied blocks stay, held by no node, while the addresses just released cool down; once they have
    // cooled, `ipam gc --release` deletes them.
    resources::apply(
        ds,
        "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {releasedAddressCooldown: 200ms}\n",
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    margay::ipam::liveness::gc(ds, Duration::ZERO, true)
        .await
        .unwrap();
    ds.delete(
        keys::IPAM_CONFIG_KEY,
        ds.get(keys::IPAM_CONFIG_KEY)
            .await
            .unwrap()
            .unwrap()
            .mod_revision,
    )
    .await
    .unwrap();
    let (left, _) = ds.list("/calico/ipam/").await.unwrap();
    assert!(
        left.is_empty(),
        "left behind: {:?}",
        left.iter().map(|k| &k.key).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn eight_nodes_assign_concurrently_from_two_pools() {
    if !etcd_available("eight_nodes_assign_concurrently_from_two_pools") {
        return;
    }
    let etcd = Etcd::start();
    let ds = datastore(&etcd, Duration::from_secs(10));
    resources::apply(&ds, POOLS).await.unwrap();
    let nodes = start_nodes(&ds).await;

    let mut jobs = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        for i in 0..PER_NODE {
            let node = node.clone();
            jobs.push(tokio::spawn(async move {
                (n, node.assign(request(n, i)).await)
            }));
        }
    }
    let mut acked = BTreeMap::new();
    for j in jobs {
        let (n, r) = j.await.unwrap();
        let a = r.expect("assign");
        acked.insert(a.handle_id.clone(), (n, a));
    }
    assert_eq!(acked.len(), NODES * PER_NODE);
    let borrowed = acked.values().filter(|(_, a)| a.ips[0].borrowed).count();
    assert!(borrowed > 0, "the small pool must force borrowing");
    eprintln!(
        "{} assignments, {borrowed} borrowed, {} etcd round trips",
        acked.len(),
        ds.stats().round_trips
    );
    verify(&ds, &acked).await;
    release_all_and_check_nothing_leaks(&ds, &nodes, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn same_run_while_etcd_is_killed_and_restarted() {
    if !etcd_available("same_run_while_etcd_is_killed_and_restarted") {
        return;
    }
    let etcd = Etcd::start();
    // Give up on etcd after 1 s so the outage shows as errors (the callers retry, as kubelet retries ADD).
    let ds = datastore(&etcd, Duration::from_secs(1));
    resources::apply(&ds, POOLS).await.unwrap();
    let nodes = start_nodes(&ds).await;

    let done = Arc::new(AtomicUsize::new(0));
    let errors: Arc<Mutex<Vec<String>>> = Arc::new(Mutex::new(Vec::new()));
    let mut workers = Vec::new();
    for (n, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let done = done.clone();
        let errors = errors.clone();
        workers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..PER_NODE {
                // Retry the same ADD (same handle) until it succeeds.
                loop {
                    match node.assign(request(n, i)).await {
                        Ok(a) => {
                            acked.push((n, a));
                            done.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        Err(e) => {
                            errors
                                .lock()
                                .unwrap()
                                .push(format!("{}|{e}", e.is_unreachable()));
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                    }
                }
            }
            acked
        }));
    }
    // Kill etcd once a quarter of the work is acknowledged; bring it back after 2 s.
    let killer = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let mut etcd = etcd;
            while done.load(Ordering::Relaxed) < NODES * PER_NODE / 4 {
                std::thread::sleep(Duration::from_millis(5));
            }
            etcd.kill9();
            let at_kill = done.load(Ordering::Relaxed);
            std::thread::sleep(Duration::from_secs(2));
            etcd.restart();
            (etcd, at_kill)
        })
    };
    let mut acked = BTreeMap::new();
    for w in workers {
        for (n, a) in w.await.unwrap() {
            acked.insert(a.handle_id.clone(), (n, a));
        }
    }
    let (_etcd, at_kill) = killer.await.unwrap();
    let errors = errors.lock().unwrap().clone();
    eprintln!(
        "killed at {at_kill} acknowledged; {} errors during the outage, e.g. {:?}",
        errors.len(),
        errors.first()
    );
    assert!(
        at_kill < NODES * PER_NODE,
        "etcd must die in the middle of the run"
    );
    assert!(!errors.is_empty(), "the outage must be visible to callers");
    for e in &errors {
        assert!(
            e.starts_with("true|etcd unreachable: tried 127.0.0.1:"),
            "outage error must say etcd is unreachable: {e}"
        );
    }
    assert_eq!(acked.len(), NODES * PER_NODE);
    verify(&ds, &acked).await;
    // Nothing half-written: every block key parses and every affinity has its block (verify ran check).
    let (aff, _) = ds.list(keys::AFFINITIES_PREFIX).await.unwrap();
    assert!(!aff.is_empty());
    release_all_and_check_nothing_leaks(&ds, &nodes, &acked).await;
    let set: BTreeSet<_> = acked
        .values()
        .flat_map(|(_, a)| a.ips.iter().map(|i| i.ip))
        .collect();
    assert_eq!(set.len(), NODES * PER_NODE);
}

/// The reclaim race, 1,000 times:
///
/// ```text
///   pool 10.30.0.0/26 = exactly one block; strictAffinity (no borrowing), no cooldown
///   owner (holds the block, empty) ──assign──┐
///                                            ├── etcd: both txns guarded by the block's mod_revision
///   other (pool full, block empty) ─reclaim──┘    (the reclaim also by the owner's affinity, ours absent)
/// ```
/// Each round exactly one of them gets an address, from that block, which is then affine to the winner
/// alone; the loser answers "no free address" (after re-reading etcd) and never an error of another kind.
/// The winner releases; the next round starts with the winner as owner.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn owner_assign_races_reclaim_exactly_one_wins() {
    if !etcd_available("owner_assign_races_reclaim_exactly_one_wins") {
        return;
    }
    const ROUNDS: usize = 1000;
    let etcd = Etcd::start();
    let ds = datastore(&etcd, Duration::from_secs(10));
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: one}\nspec: {cidr: 10.30.0.0/26, blockSize: 26}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true, releasedAddressCooldown: 0s}\n",
    )
    .await
    .unwrap();
    let names = ["node-a", "node-b"];
    let nodes = [
        Arc::new(
            NodeIpam::start(ds.clone(), NodeInfo::new(names[0]))
                .await
                .unwrap(),
        ),
        Arc::new(
            NodeIpam::start(ds.clone(), NodeInfo::new(names[1]))
                .await
                .unwrap(),
        ),
    ];
    let block: ipnetwork::IpNetwork = "10.30.0.0/26".parse().unwrap();
    let first = nodes[0].assign(AssignRequest::v4("warmup")).await.unwrap();
    assert_eq!(first.ips[0].block, block);
    nodes[0].release_handle("warmup").await.unwrap();
    let mut owner = 0usize;
    let (mut owner_won, mut reclaim_won, mut raced) = (0, 0, 0);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..ROUNDS {
        // Both views hold the block as etcd does now (empty, affine to the owner).
        let rev = ds
            .get(&keys::block_key(&block))
            .await
            .unwrap()
            .unwrap()
            .mod_revision;
        for n in &nodes {
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                if let Some((b, r)) = n.view_block(block).await.unwrap() {
                    if r >= rev {
                        assert!(b.is_empty() && b.host() == Some(names[owner]));
                        break;
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "view did not catch up"
                );
                tokio::task::yield_now().await;
            }
        }
        let other = 1 - owner;
        // Vary who gets going first.
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let (spin_owner, spin_other) = ((seed % 4) as usize, ((seed >> 8) % 4) as usize);
        let before = ds.stats().txns;
        let (ho, hr) = (format!("own-{round}"), format!("rec-{round}"));
        let (o, r) = {
            let (no, nr) = (nodes[owner].clone(), nodes[other].clone());
            let (ho, hr) = (ho.clone(), hr.clone());
            tokio::join!(
                tokio::spawn(async move {
                    for _ in 0..spin_owner {
                        tokio::task::yield_now().await;
                    }
                    no.assign(AssignRequest::v4(&ho)).await
                }),
                tokio::spawn(async move {
                    for _ in 0..spin_other {
                        tokio::task::yield_now().await;
                    }
                    nr.assign(AssignRequest::v4(&hr)).await
                })
            )
        };
        let (o, r) = (o.unwrap(), r.unwrap());
        if ds.stats().txns - before >= 2 {
            raced += 1;
        }
        let (winner, handle, loser_err) = match (&o, &r) {
            (Ok(_), Err(e)) => {
                owner_won += 1;
                (owner, &ho, e)
            }
            (Err(e), Ok(_)) => {
                reclaim_won += 1;
                (other, &hr, e)
            }
            _ => panic!("round {round}: exactly one must win: owner {o:?}, other {r:?}"),
        };
        assert!(
            matches!(loser_err, IpamError::NoAddress(m) if m.contains("no free IPv4 address")),
            "round {round}: the loser must get a clean 'no free address': {loser_err}"
        );
        let won = o.as_ref().or(r.as_ref()).unwrap();
        assert_eq!(won.ips[0].block, block);
        assert!(!won.ips[0].borrowed);
        let snap = ops::snapshot(&ds).await.unwrap();
        let b = &snap.blocks[&block];
        assert_eq!(b.host(), Some(names[winner]), "round {round}");
        assert_eq!(b.in_use(), 1, "round {round}");
        assert_eq!(b.handle_of(won.ips[0].ip), Some(handle.as_str()));
        let holders: Vec<&String> = snap.affinities.keys().map(|(n, _)| n).collect();
        assert_eq!(holders, vec![&names[winner].to_string()], "round {round}");
        assert_eq!(ops::check(&snap, None).problems, Vec::<String>::new());
        nodes[winner].release_handle(handle).await.unwrap();
        owner = winner;
    }
    eprintln!(
        "{ROUNDS} rounds: owner won {owner_won}, reclaim won {reclaim_won}, both wrote a transaction in {raced}"
    );
    assert!(
        owner_won > 0 && reclaim_won > 0,
        "both sides must win some rounds"
    );
    assert!(raced > 0, "the two transactions must really race");
}

/// Churn, as a cluster autoscaler makes it:
///
/// ```text
///   8 node slots, each: assign / release in random order (at most 8 live pods), and now and then the node
///   leaves (releases its pods, `node remove`) and a new node takes the slot
///   pool 10.40.0.0/24, blockSize 28: 16 blocks of 16 = 4 x the peak demand of 8 x 8 live addresses
///   cooldown 200 ms, empty-block grace 300 ms; etcd SIGKILLed and restarted twice during the run
/// ```
/// 5,000 assignments. No address ever has two owners; every acknowledged allocation still live at the end is
/// stored under its handle; no assign ever answers "no free address" (the pool always has room, so it must
/// find it, reclaiming empty blocks of other nodes); no address is handed out inside its cooldown (checked
/// against each release's and assignment's time); `ipam check` ends with 0 problems.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn churn_with_nodes_joining_leaving_and_etcd_killed_twice() {
    use margay::ipam::block::now_ms;
    use margay::ipam::IpamCounters;
    if !etcd_available("churn_with_nodes_joining_leaving_and_etcd_killed_twice") {
        return;
    }
    const SLOTS: usize = 8;
    const LIVE_MAX: usize = 8;
    const TOTAL: usize = 5000;
    const COOLDOWN_MS: u64 = 200;
    let etcd = Etcd::start();
    let ds = datastore(&etcd, Duration::from_secs(1));
    resources::apply(
        &ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: churn}\nspec: {cidr: 10.40.0.0/24, blockSize: 28}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {releasedAddressCooldown: 200ms, emptyBlockGracePeriod: 300ms}\n",
    )
    .await
    .unwrap();

    #[derive(Default)]
    struct Shared {
        /// ip -> handle, for live allocations (a second owner is a failure on the spot).
        live: BTreeMap<IpAddr, String>,
        /// ip -> when its last release was first asked for (unix ms).
        released: BTreeMap<IpAddr, u64>,
        /// handle -> (node, assignment) still live.
        acked: BTreeMap<String, (String, Assignment)>,
        violations: Vec<String>,
        exhausted: Vec<String>,
        counters: Vec<IpamCounters>,
        joins: usize,
    }
    let shared = Arc::new(Mutex::new(Shared::default()));
    let assigned = Arc::new(AtomicUsize::new(0));

    async fn retry<T, F, Fut>(mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, IpamError>>,
    {
        loop {
            match f().await {
                Ok(v) => return v,
                Err(e) if e.is_unreachable() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("IPAM error other than an outage: {e}"),
            }
        }
    }

    let started = std::time::Instant::now();
    let txns_before = ds.stats().txns;
    let mut workers = Vec::new();
    for slot in 0..SLOTS {
        let (ds, shared, assigned) = (ds.clone(), shared.clone(), assigned.clone());
        workers.push(tokio::spawn(async move {
            let mut rng = 0x9e37_79b9_7f4a_7c15u64 ^ (slot as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut incarnation = 0;
            let mut seq = 0;
            loop {
                let name = format!("churn-{slot}-{incarnation}");
                let node = retry(|| NodeIpam::start(ds.clone(), NodeInfo::new(&name))).await;
                shared.lock().unwrap().joins += 1;
                let mut mine: Vec<String> = Vec::new();
                let life = 100 + (next() % 300) as usize;
                for _ in 0..life {
                    if assigned.load(Ordering::Relaxed) >= TOTAL {
                        break;
                    }
                    let assign = mine.is_empty() || (mine.len() < LIVE_MAX && next() % 100 < 55);
                    if assign {
                        let h = format!("{name}-p{seq}");
                        seq += 1;
                        let res = loop {
                            match node.assign(AssignRequest::v4(&h)).await {
                                Ok(a) => break Some(a),
                                Err(e) if e.is_unreachable() => {
                                    tokio::time::sleep(Duration::from_millis(50)).await
                                }
                                Err(IpamError::NoAddress(m)) => {
                                    shared.lock().unwrap().exhausted.push(m);
                                    break None;
                                }
                                Err(e) => panic!("assign {h}: {e}"),
                            }
                        };
                        let Some(a) = res else { continue };
                        let at = now_ms();
                        assigned.fetch_add(1, Ordering::Relaxed);
                        let ip = a.ips[0].ip;
                        let mut s = shared.lock().unwrap();
                        if let Some(other) = s.live.insert(ip, h.clone()) {
                            s.violations.push(format!("{ip} has two owners: {other} and {h}"));
                        }
                        if let Some(&rel) = s.released.get(&ip) {
                            if at < rel + COOLDOWN_MS {
                                s.violations.push(format!(
                                    "{ip} reused {} ms after its release (cooldown {COOLDOWN_MS} ms)",
                                    at - rel
                                ));
                            }
                        }
                        s.acked.insert(h.clone(), (name.clone(), a));
                        mine.push(h);
                    } else {
                        let h = mine.swap_remove((next() % mine.len() as u64) as usize);
                        release(&node, &shared, &h).await;
                    }
                    tokio::time::sleep(Duration::from_millis(next() % 4)).await;
                }
                if assigned.load(Ordering::Relaxed) >= TOTAL {
                    // Done: the node stays, with its pods, for the checks.
                    return (node, mine);
                }
                // The node leaves: its pods go, then the node.
                for h in mine.drain(..) {
                    release(&node, &shared, &h).await;
                }
                let counters = retry(|| node.routes()).await.counters;
                shared.lock().unwrap().counters.push(counters);
                drop(node);
                retry(|| ops::remove_node(&ds, &name)).await;
                incarnation += 1;
            }
        }));
    }
    async fn release(node: &NodeIpam, shared: &Mutex<Shared>, h: &str) {
        let t0 = now_ms();
        let ip = shared.lock().unwrap().acked[h].1.ips[0].ip;
        loop {
            match node.release_handle(h).await {
                Ok(_) => break,
                Err(e) if e.is_unreachable() => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => panic!("release {h}: {e}"),
            }
        }
        let mut s = shared.lock().unwrap();
        s.live.remove(&ip);
        s.acked.remove(h);
        s.released.insert(ip, t0);
    }

    // Kill etcd twice: at 30% and at 70% of the assignments, each time for 1 s.
    let killer = {
        let assigned = assigned.clone();
        tokio::task::spawn_blocking(move || {
            let mut etcd = etcd;
            for at in [TOTAL * 3 / 10, TOTAL * 7 / 10] {
                while assigned.load(Ordering::Relaxed) < at {
                    std::thread::sleep(Duration::from_millis(5));
                }
                etcd.kill9();
                std::thread::sleep(Duration::from_secs(1));
                etcd.restart();
            }
            etcd
        })
    };
    let mut remaining = Vec::new();
    for w in workers {
        remaining.push(w.await.unwrap());
    }
    let elapsed = started.elapsed();
    let _etcd = killer.await.unwrap();
    // Every acknowledged allocation still live is stored under its handle, and nothing else is allocated.
    {
        let snap = ops::snapshot(&ds).await.unwrap();
        let s = shared.lock().unwrap();
        for (h, (_, a)) in &s.acked {
            let ip = a.ips[0];
            assert_eq!(
                snap.blocks.get(&ip.block).and_then(|b| b.handle_of(ip.ip)),
                Some(h.as_str()),
                "acknowledged {} of {h} lost",
                ip.ip
            );
        }
        assert_eq!(
            snap.blocks.values().map(|b| b.in_use()).sum::<usize>(),
            s.acked.len(),
            "allocations nobody was told about"
        );
        assert_eq!(ops::check(&snap, None).problems, Vec::<String>::new());
    }
    for (node, mine) in remaining {
        for h in &mine {
            release(&node, &shared, h).await;
        }
        let counters = node.routes().await.unwrap().counters;
        shared.lock().unwrap().counters.push(counters);
    }
    let snap = ops::snapshot(&ds).await.unwrap();
    let (r, text) = cli::ipam::check(&ds, None).await.unwrap();
    let s = shared.lock().unwrap();
    let n = assigned.load(Ordering::Relaxed);
    let txns = ds.stats().txns - txns_before;
    let total: IpamCounters = s.counters.iter().fold(IpamCounters::default(), |mut t, c| {
        t.blocks_reclaimed += c.blocks_reclaimed;
        t.blocks_released += c.blocks_released;
        t.cooling_handed_out += c.cooling_handed_out;
        t.exhausted += c.exhausted;
        t
    });
    eprintln!(
        "churn: {n} assignments in {:.1} s ({:.0}/s) by {} node incarnations, {txns} etcd txns ({:.2} per assignment, releases and node removals included), {} blocks reclaimed, {} released after the grace",
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64(),
        s.joins,
        txns as f64 / n as f64,
        total.blocks_reclaimed,
        total.blocks_released,
    );
    assert!(n >= TOTAL);
    assert!(
        s.violations.is_empty(),
        "{:?}",
        &s.violations[..s.violations.len().min(10)]
    );
    assert!(
        s.exhausted.is_empty(),
        "pool reported exhausted: {:?}",
        s.exhausted.first()
    );
    assert_eq!(
        total.cooling_handed_out, 0,
        "a cooling address was handed out"
    );
    assert!(s.joins > SLOTS, "nodes must leave and join");
    // Everything released: no handle, no allocation left.
    assert!(s.acked.is_empty());
    assert!(
        snap.handles.is_empty(),
        "{:?}",
        snap.handles.keys().take(5).collect::<Vec<_>>()
    );
    assert_eq!(snap.blocks.values().map(|b| b.in_use()).sum::<usize>(), 0);
    assert!(r.problems.is_empty(), "{text}");
}
