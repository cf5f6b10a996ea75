//! IPAM assignment rate and etcd round trips per assignment, beside the raw rate of etcd compare-and-swap
//! transactions measured in the same run against the same etcd member (the physical ceiling).
//!
//! `cargo bench --bench ipam [-- --assigns N] [--rounds R] [--only-assign] [--churn N]` (`--only-assign` runs
//! nothing but uncontended assigns, for `perf record`; `--churn N` adds the churn row with N assignments)
//!
//! 1. raw CAS, 1 client: one etcd-client connection, sequential `Txn{ mod_revision(k) == r } then put(k)`;
//! 2. raw CAS, 16 clients: 16 connections, each its own key, concurrently;
//! 3. IPAM, 1 node, uncontended: sequential `NodeIpam::assign` (one IPv4 per pod, a new handle each);
//! 4. IPAM, 8 nodes, contended: 8 node tasks assigning concurrently from two pools, one small enough that
//!    half the nodes borrow from the others' blocks (the concurrency test's set-up).
//!
//! 5. (`--churn N`) IPAM under churn (issue 15): 8 nodes assign and release in random order (at most 8 live
//!    addresses each) from a pool of 4 x that peak (10.90.0.0/24, blockSize 28), with a 200 ms cooldown and a
//!    300 ms empty-block grace: assignments per second and etcd transactions per assignment (releases are
//!    transactions too: both are reported).
//!
//! Target (issue 3): an uncontended assign costs exactly 1 etcd transaction and reaches >= 80% of the
//! 1-client raw CAS rate.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};
use margay::cli::resources;
use margay::datastore::{Datastore, DatastoreConfig};
use margay::ipam::{AssignRequest, NodeInfo, NodeIpam};

/// The tests' etcd launcher (free loopback ports, temporary data dir, killed on drop) and the helpers it needs.
#[path = "../tests/it/common/etcd.rs"]
mod etcd;

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

fn have(bin: &str) -> bool {
    std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn require(ok: bool, what: &str, why: &str) -> bool {
    if !ok {
        eprintln!("{what}: {why}");
    }
    ok
}

fn sh(cmd: &str) -> String {
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    assert!(out.status.success(), "command failed: {cmd}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

struct Run {
    ops: usize,
    elapsed: Duration,
    latencies: Vec<Duration>,
}

impl Run {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, q: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// What a raw CAS transaction carries.
#[derive(Clone, Copy)]
struct CasShape {
    /// Size of the CAS'd value (128 B, or 5 KB: the average /26 block in Calico's JSON).
    size: usize,
    /// Also create a small new key (the handle) under a version == 0 guard in the same transaction.
    handle: bool,
    /// A watch on the keys' prefix runs meanwhile (as an IPAM node keeps one on the blocks), so etcd sends
    /// every write to a watcher too.
    watched: bool,
}

const CAS_SMALL: CasShape = CasShape {
    size: 128,
    handle: false,
    watched: false,
};
const CAS_IPAM: CasShape = CasShape {
    size: 5000,
    handle: true,
    watched: false,
};

/// `clients` connections, each doing `ops_per_client` sequential CAS transactions on its own key, shaped as
/// `shape` says ([`CAS_IPAM`] is what an IPAM assign does at the etcd level).
async fn raw_cas(endpoint: &str, clients: usize, ops_per_client: usize, shape: CasShape) -> Run {
    static ROUND: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let round = ROUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let CasShape {
        size,
        handle: block_sized,
        watched,
    } = shape;
    let watcher = if watched {
        let mut c = Client::connect([endpoint], None).await.expect("connect");
        let mut stream = c
            .watch(
                format!("/bench/cas/{round}/"),
                Some(etcd_client::WatchOptions::new().with_prefix()),
            )
            .await
            .expect("watch");
        Some(tokio::spawn(async move {
            let mut events = 0usize;
            while let Ok(Some(r)) = stream.message().await {
                events += r.events().len();
            }
            events
        }))
    } else {
        None
    };
    let mut tasks = Vec::new();
    let start = Instant::now();
    for c in 0..clients {
        let ep = endpoint.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect([ep.as_str()], None).await.expect("connect");
            let key = format!("/bench/cas/{round}/{c}");
            let put = client
                .put(key.as_str(), vec![b'x'; size], None)
                .await
                .expect("put");
            let mut rev = put.header().map(|h| h.revision()).unwrap_or(0);
            let mut lat = Vec::with_capacity(ops_per_client);
            for i in 0..ops_per_client {
                let t = Instant::now();
                let mut when = vec![Compare::mod_revision(key.as_str(), CompareOp::Equal, rev)];
                let mut then = vec![TxnOp::put(key.as_str(), vec![b'y'; size], None)];
                if block_sized {
                    let h = format!("/bench/handle/{round}/{c}/{i}");
                    when.push(Compare::version(h.as_str(), CompareOp::Equal, 0));
                    then.push(TxnOp::put(h.as_str(), vec![b'h'; 60], None));
                }
                let txn = Txn::new().when(when).and_then(then);
                let r = client.txn(txn).await.expect("txn");
                assert!(r.succeeded(), "uncontended CAS must succeed");
                rev = r.header().map(|h| h.revision()).unwrap_or(0);
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    if let Some(task) = watcher {
        task.abort();
    }
    Run {
        ops: clients * ops_per_client,
        elapsed,
        latencies,
    }
}

fn pools(small: bool) -> String {
    let mut y = String::from(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: big}\nspec: {cidr: 10.128.0.0/12, blockSize: 26}\n",
    );
    if small {
        y.push_str("---\napiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: small}\nspec: {cidr: 10.1.0.0/22, blockSize: 24}\n");
    }
    y
}

fn request(node: usize, i: usize, two_pools: bool) -> AssignRequest {
    AssignRequest {
        handle_id: format!("k8s-pod-network.n{node}-c{i}"),
        ipv4: true,
        pools: two_pools
            .then(|| vec![if i.is_multiple_of(2) { "small" } else { "big" }.to_string()]),
        attributes: BTreeMap::from([
            ("namespace".to_string(), "default".to_string()),
            ("pod".to_string(), format!("pod-{node}-{i}")),
        ]),
        ..Default::default()
    }
}

async fn start_nodes(ds: &Arc<Datastore>, nodes: usize) -> Vec<Arc<NodeIpam>> {
    let mut handles = Vec::new();
    for n in 0..nodes {
        handles.push(Arc::new(
            NodeIpam::start(ds.clone(), NodeInfo::new(&format!("bench-{nodes}-{n}")))
                .await
                .expect("node"),
        ));
    }
    handles
}

/// Each node assigns `per_node` addresses (handles numbered from `first`), all nodes concurrently.
async fn ipam(
    ds: &Arc<Datastore>,
    handles: &[Arc<NodeIpam>],
    first: usize,
    per_node: usize,
    two_pools: bool,
) -> (Run, f64) {
    let nodes = handles.len();
    let before = ds.stats();
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, node) in handles.iter().enumerate() {
        let node = node.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::with_capacity(per_node);
            for i in first..first + per_node {
                let t = Instant::now();
                node.assign(request(n, i, two_pools)).await.expect("assign");
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    let rt = (ds.stats().round_trips - before.round_trips) as f64 / (nodes * per_node) as f64;
    (
        Run {
            ops: nodes * per_node,
            elapsed,
            latencies,
        },
        rt,
    )
}

/// One node, `total` assigns issued `concurrency` at a time (a burst of pod ADDs): queued assigns share
/// transactions.
async fn ipam_burst(ds: &Arc<Datastore>, total: usize, concurrency: usize) -> (Run, f64) {
    let node = start_nodes(ds, 1).await.remove(0);
    let before = ds.stats();
    let sem = Arc::new(tokio::sync::Semaphore::new(concurrency));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..total {
        let node = node.clone();
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let mut r = request(100, i, false);
            r.handle_id = format!("burst-{i}");
            node.assign(r).await.expect("assign");
            drop(permit);
            t.elapsed()
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.push(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    let rt = (ds.stats().round_trips - before.round_trips) as f64 / total as f64;
    (
        Run {
            ops: total,
            elapsed,
            latencies,
        },
        rt,
    )
}

/// Churn: `nodes` node tasks, each keeping at most `live_max` addresses, assigning and releasing in random
/// order until `total` assignments are made. Returns the assign run, txns per assignment, txns per operation
/// (assign or release), and the summed counters.
async fn ipam_churn(
    ds: &Arc<Datastore>,
    nodes: usize,
    live_max: usize,
    total: usize,
) -> (Run, f64, f64, margay::ipam::IpamCounters) {
    resources::apply(
        ds,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: churn}\nspec: {cidr: 10.90.0.0/24, blockSize: 28}\n---\napiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {releasedAddressCooldown: 200ms, emptyBlockGracePeriod: 300ms}\n",
    )
    .await
    .expect("churn pool");
    let handles = start_nodes(ds, nodes).await;
    let before = ds.stats();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let releases = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for (n, node) in handles.iter().enumerate() {
        let (node, done, releases) = (node.clone(), done.clone(), releases.clone());
        tasks.push(tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let mut rng =
                0x9e37_79b9_7f4a_7c15u64 ^ (n as u64 + 1).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let mut next = move || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let (mut lat, mut live, mut i) = (Vec::new(), Vec::<String>::new(), 0usize);
            while done.load(Relaxed) < total {
                if live.is_empty() || (live.len() < live_max && next() % 100 < 55) {
                    let h = format!("churn-{n}-{i}");
                    i += 1;
                    let t = Instant::now();
                    node.assign(AssignRequest::v4(&h))
                        .await
                        .expect("churn assign");
                    lat.push(t.elapsed());
                    done.fetch_add(1, Relaxed);
                    live.push(h);
                } else {
                    let h = live.swap_remove((next() % live.len() as u64) as usize);
                    node.release_handle(&h).await.expect("churn release");
                    releases.fetch_add(1, Relaxed);
                }
            }
            for h in live {
                node.release_handle(&h).await.expect("churn release");
            }
            lat
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.expect("task"));
    }
    let elapsed = start.elapsed();
    let assigns = latencies.len();
    let txns = (ds.stats().txns - before.txns) as f64;
    let rel = releases.load(std::sync::atomic::Ordering::Relaxed);
    let mut c = margay::ipam::IpamCounters::default();
    for h in &handles {
        let r = h.routes().await.expect("routes").counters;
        c.blocks_reclaimed += r.blocks_reclaimed;
        c.blocks_released += r.blocks_released;
        c.cooling_handed_out += r.cooling_handed_out;
        c.exhausted += r.exhausted;
    }
    (
        Run {
            ops: assigns,
            elapsed,
            latencies,
        },
        txns / assigns as f64,
        txns / (assigns + rel) as f64,
        c,
    )
}

fn arg(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !have("etcd") {
        eprintln!("ipam bench: etcd is not installed (scripts/install-deps.sh)");
        std::process::exit(1);
    }
    let assigns = arg("--assigns", 2000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let etcd = etcd::Etcd::start();
    let ep = etcd.endpoint();
    rt.block_on(async {
        let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).expect("datastore"));
        resources::apply(&ds, &pools(true)).await.expect("pools");
        // Warm up etcd before anything is measured.
        raw_cas(&ep, 1, 200, CAS_SMALL).await;

        if std::env::args().any(|a| a == "--only-assign") {
            // For profiling (`perf record`): nothing but uncontended assigns.
            let one = start_nodes(&ds, 1).await;
            let (run, rt) = ipam(&ds, &one, 0, assigns, false).await;
            println!("uncontended assign only: {:.0}/s, {rt:.3} round trips per assign", run.rate());
            return;
        }
        // The machine is shared: measure the uncontended assign and its anchors in alternating rounds and
        // compare medians, so background load hits both alike.
        let rounds = arg("--rounds", 5);
        let per_round = assigns / rounds;
        let one = start_nodes(&ds, 1).await;
        let (mut raw1, mut rawb, mut ipam1, mut rt1s) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        // Where the IPAM-sized CAS's extra cost comes from: the value's size, or the second key.
        let (mut raw_big, mut raw_two, mut raw_watched) = (Vec::new(), Vec::new(), Vec::new());
        for r in 0..rounds {
            raw1.push(raw_cas(&ep, 1, per_round, CAS_SMALL).await);
            raw_big.push(raw_cas(&ep, 1, per_round, CasShape { size: 5000, handle: false, watched: false }).await);
            raw_two.push(raw_cas(&ep, 1, per_round, CasShape { size: 128, handle: true, watched: false }).await);
            rawb.push(raw_cas(&ep, 1, per_round, CAS_IPAM).await);
            raw_watched.push(raw_cas(&ep, 1, per_round, CasShape { watched: true, ..CAS_IPAM }).await);
            let (run, rt) = ipam(&ds, &one, r * per_round, per_round, false).await;
            ipam1.push(run);
            rt1s.push(rt);
        }
        // What the node's writes weigh: its blocks as stored, full ones and the one being filled.
        let (blocks, _) = ds.list("/calico/ipam/v2/assignment/").await.expect("list blocks");
        let sizes: Vec<usize> = blocks.iter().map(|kv| kv.value.len()).collect();
        let largest = sizes.iter().copied().max().unwrap_or(0);
        let smallest = sizes.iter().copied().min().unwrap_or(0);
        let raw16 = raw_cas(&ep, 16, assigns / 16 * 4, CAS_SMALL).await;
        let eight = start_nodes(&ds, 8).await;
        let (run8, rt8) = ipam(&ds, &eight, 0, assigns / 8, true).await;
        let (burst, rtb) = ipam_burst(&ds, assigns, 32).await;
        let churn_n = arg("--churn", 0);
        let churn = if churn_n > 0 { Some(ipam_churn(&ds, 8, 8, churn_n).await) } else { None };

        let median = |runs: &[Run]| -> Run {
            let mut v: Vec<&Run> = runs.iter().collect();
            v.sort_by(|a, b| a.rate().total_cmp(&b.rate()));
            let m = v[v.len() / 2];
            Run {
                ops: m.ops,
                elapsed: m.elapsed,
                latencies: runs.iter().flat_map(|r| r.latencies.clone()).collect(),
            }
        };
        let rates = |runs: &[Run]| runs.iter().map(|r| format!("{:.0}", r.rate())).collect::<Vec<_>>().join(", ");
        println!(
            "etcd {} on loopback, data dir on disk; {rounds} alternating rounds of {per_round} ops for the 1-client rows (median round shown, latency over all rounds)",
            etcd_version()
        );
        println!("| what | ops/s | etcd round trips per op | p50 | p99 |");
        println!("|---|---|---|---|---|");
        let row = |name: &str, r: &Run, rt: &str| {
            println!(
                "| {name} | {:.0} | {rt} | {:.2} ms | {:.2} ms |",
                r.rate(),
                r.p(0.5).as_secs_f64() * 1e3,
                r.p(0.99).as_secs_f64() * 1e3
            );
        };
        let (m_raw1, m_rawb, m_ipam1) = (median(&raw1), median(&rawb), median(&ipam1));
        let rt1 = rt1s.iter().cloned().fold(0.0, f64::max);
        row("raw etcd CAS txn, 1 client", &m_raw1, "1");
        row("raw etcd CAS txn, 1 client, 5 KB value", &median(&raw_big), "1");
        row("raw etcd CAS txn, 1 client, 128 B + handle create", &median(&raw_two), "1");
        row("raw etcd CAS txn, 1 client, IPAM-sized (5 KB CAS + handle create)", &m_rawb, "1");
        row("raw etcd CAS txn, 1 client, IPAM-sized, with a watcher on the prefix", &median(&raw_watched), "1");
        row("IPAM assign, 1 node, uncontended", &m_ipam1, &format!("{rt1:.3}"));
        row("raw etcd CAS txn, 16 clients", &raw16, "1");
        row("IPAM assign, 8 nodes, contended (two pools, half borrowing)", &run8, &format!("{rt8:.3}"));
        row("IPAM assign, 1 node, bursts of 32 concurrent ADDs (batched)", &burst, &format!("{rtb:.3}"));
        if let Some((run, per_assign, per_op, c)) = &churn {
            row(
                "IPAM assign under churn, 8 nodes, pool 4x peak, cooldown 200 ms (txns per assignment)",
                run,
                &format!("{per_assign:.3}"),
            );
            println!(
                "churn: {} assignments, {per_assign:.3} etcd txns per assignment ({per_op:.3} per assign-or-release); {} blocks reclaimed, {} released after the grace, {} cooling addresses handed out, {} exhausted",
                run.ops, c.blocks_reclaimed, c.blocks_released, c.cooling_handed_out, c.exhausted
            );
        }
        println!(
            "per-round ops/s: raw CAS [{}]; 5 KB CAS [{}]; 128 B CAS + handle [{}]; IPAM-sized CAS [{}]; watched IPAM-sized CAS [{}]; IPAM assign [{}]",
            rates(&raw1),
            rates(&raw_big),
            rates(&raw_two),
            rates(&rawb),
            rates(&raw_watched),
            rates(&ipam1)
        );
        println!(
            "block values the uncontended node wrote (its /26 and /24 blocks, as they ended): {} blocks, {smallest}..{largest} bytes; every assign rewrites its block whole",
            sizes.len()
        );
        let ratio = m_ipam1.rate() / m_raw1.rate();
        println!(
            "uncontended assign: {rt1:.3} etcd round trips per assign (target 1), {:.0}% of the 1-client raw CAS rate (target >= 80%): {}; {:.0}% of the IPAM-sized CAS rate",
            ratio * 100.0,
            if rt1 <= 1.0 + 1e-9 && ratio >= 0.8 { "MET" } else { "NOT MET" },
            m_ipam1.rate() / m_rawb.rate() * 100.0
        );
    });
    drop(etcd);
}

fn etcd_version() -> String {
    std::process::Command::new("etcd")
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| {
            s.lines()
                .next()
                .map(|l| l.trim_start_matches("etcd Version: ").to_string())
        })
        .unwrap_or_else(|| "?".into())
}
