//! CNI ADD latency through a real margay node, beside the reference `bridge` + `host-local` plugins in the
//! same run.
//!
//! ```text
//!   margay lab (2 nodes, etcd, full iBGP mesh):  netns <lab>-n1: margay node run ──BGP── <lab>-n2
//!                                                      ▲ unix socket
//!   bench process (in <lab>-n1) ──exec──▶ margay-cni ──┘   (etcd IPAM, veth + routes, block advertisement)
//!                               ──exec──▶ /usr/lib/cni/bridge ──exec──▶ host-local  (bridge in <lab>-n1)
//!   pods: one fresh network namespace per ADD
//! ```
//!
//! Per path: N ADDs one after another (p50/p99/max of the plugin process's wall time, as the runtime waits
//! for it), then M ADDs released at once (wall time, per-ADD p50/p99, distinct addresses: 0 duplicates
//! expected, also against the sequential pods), then DEL of every pod one after another.
//!
//! `cargo bench --bench cni_add -- [--pods 200] [--concurrent 100]` (root; etcd, /usr/lib/cni).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use node_lab::{cni, in_netns, pct, prerequisites, result_ipv4, Lab, PodNamespaces, MARGAY_CNI};
use serde_json::json;

const BRIDGE: &str = "/usr/lib/cni/bridge";

struct Stats {
    p50: f64,
    p99: f64,
    max: f64,
}

fn stats(mut t: Vec<Duration>) -> Stats {
    t.sort();
    Stats {
        p50: pct(&t, 0.50),
        p99: pct(&t, 0.99),
        max: pct(&t, 1.0),
    }
}

/// ADD one pod per namespace in `range`, one after another.
fn sequential(
    bin: &str,
    conf: &str,
    pods: &PodNamespaces,
    range: std::ops::Range<usize>,
) -> (Vec<Duration>, Vec<Ipv4Addr>) {
    let mut times = Vec::new();
    let mut ips = Vec::new();
    for i in range {
        let (t, r) = cni(bin, "ADD", &pods.0[i], &pods.path(i), conf);
        let v = r.unwrap_or_else(|e| panic!("{e}"));
        ips.push(result_ipv4(&v).unwrap_or_else(|| panic!("no IPv4 in {v}")));
        times.push(t);
    }
    (times, ips)
}

/// ADD one pod per namespace in `range`, all released at once. Returns (wall: first ADD started to last
/// ADD done, per-ADD times, addresses). Each thread notes its own start and end: the main thread may be
/// scheduled late after the barrier on a busy machine, so its own clock would undercount.
fn concurrent(
    bin: &str,
    conf: &str,
    pods: &PodNamespaces,
    range: std::ops::Range<usize>,
) -> (Duration, Vec<Duration>, Vec<Ipv4Addr>) {
    let barrier = Arc::new(Barrier::new(range.len()));
    let handles: Vec<_> = range
        .map(|i| {
            let (b, bin, conf) = (barrier.clone(), bin.to_string(), conf.to_string());
            let (id, path) = (pods.0[i].clone(), pods.path(i));
            std::thread::spawn(move || {
                b.wait();
                let start = Instant::now();
                let (t, r) = cni(&bin, "ADD", &id, &path, &conf);
                let v = r.unwrap_or_else(|e| panic!("{e}"));
                let ip = result_ipv4(&v).unwrap_or_else(|| panic!("no IPv4 in {v}"));
                (start, start + t, t, ip)
            })
        })
        .collect();
    let out: Vec<(Instant, Instant, Duration, Ipv4Addr)> = handles
        .into_iter()
        .map(|h| h.join().expect("ADD thread"))
        .collect();
    let first = out.iter().map(|x| x.0).min();
    let last = out.iter().map(|x| x.1).max();
    let wall = match (first, last) {
        (Some(a), Some(b)) => b - a,
        _ => Duration::ZERO,
    };
    (
        wall,
        out.iter().map(|x| x.2).collect(),
        out.iter().map(|x| x.3).collect(),
    )
}

fn del_all(bin: &str, conf: &str, pods: &PodNamespaces) -> Vec<Duration> {
    (0..pods.0.len())
        .map(|i| {
            let (t, r) = cni(bin, "DEL", &pods.0[i], &pods.path(i), conf);
            r.unwrap_or_else(|e| panic!("{e}"));
            t
        })
        .collect()
}

struct PathResult {
    what: &'static str,
    seq: Stats,
    conc_wall: Duration,
    conc: Stats,
    distinct: usize,
    distinct_all: usize,
    del: Stats,
}

fn run_path(
    what: &'static str,
    bin: &str,
    conf: &str,
    pods: &PodNamespaces,
    n: usize,
    m: usize,
) -> PathResult {
    let (seq_t, seq_ips) = sequential(bin, conf, pods, 0..n);
    let (wall, conc_t, conc_ips) = concurrent(bin, conf, pods, n..n + m);
    let distinct = conc_ips.iter().collect::<HashSet<_>>().len();
    let distinct_all = seq_ips
        .iter()
        .chain(conc_ips.iter())
        .collect::<HashSet<_>>()
        .len();
    let del = del_all(bin, conf, pods);
    PathResult {
        what,
        seq: stats(seq_t),
        conc_wall: wall,
        conc: stats(conc_t),
        distinct,
        distinct_all,
        del: stats(del),
    }
}

fn main() {
    let mut n = 200usize;
    let mut m = 100usize;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let val = || args.get(i + 1).and_then(|v| v.parse::<usize>().ok());
        match args[i].as_str() {
            "--pods" => n = val().unwrap_or(n),
            "--concurrent" => m = val().unwrap_or(m),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    if !prerequisites("cni_add bench", &[BRIDGE, "/usr/lib/cni/host-local"]) {
        return;
    }
    let started = Instant::now();
    let lab = Lab::up("mgbc", 2, 0);
    lab.wait_established(1, 1, Duration::from_secs(60));
    let pid = std::process::id() % 10000;
    let warm = PodNamespaces::new(&format!("mgbc{pid}w"), 2);
    let mpods = PodNamespaces::new(&format!("mgbc{pid}m"), n + m);
    let rpods = PodNamespaces::new(&format!("mgbc{pid}r"), n + m);
    eprintln!(
        "lab {} up (mesh Established) and {} pod namespaces made in {:.1} s",
        lab.name,
        2 * (n + m) + 2,
        started.elapsed().as_secs_f64()
    );
    // margay-cni and the bridge plugin run in node 1's namespace as the runtime on that node would run
    // them, without `ip netns exec` in the timed path.
    let (results, left) = in_netns(&lab.node_ns(1), || {
        let mconf = lab.conf(1, json!({}));
        let dir = tempfile::tempdir().expect("tempdir");
        let rconf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "mgbr0",
                           "isGateway": true, "ipam": {"type": "host-local", "subnet": "10.81.0.0/16",
                           "dataDir": dir.path().join("host-local")}})
        .to_string();

        // Warm-up (page cache, the node's first block claim, the bridge's creation): not counted.
        for (bin, conf, i) in [(MARGAY_CNI, &mconf, 0), (BRIDGE, &rconf, 1)] {
            let (_, r) = cni(bin, "ADD", &warm.0[i], &warm.path(i), conf);
            r.unwrap_or_else(|e| panic!("warm-up: {e}"));
            let (_, r) = cni(bin, "DEL", &warm.0[i], &warm.path(i), conf);
            r.unwrap_or_else(|e| panic!("warm-up: {e}"));
        }

        let results = [
            run_path(
                "margay-cni + margay node (etcd IPAM, veth, routes)",
                MARGAY_CNI,
                &mconf,
                &mpods,
                n,
                m,
            ),
            run_path(
                "reference bridge + host-local",
                BRIDGE,
                &rconf,
                &rpods,
                n,
                m,
            ),
        ];
        // Nothing left behind by margay's DELs: no host veth of margay's in the node namespace.
        let links = std::process::Command::new("ip")
            .args(["-o", "link", "show"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        let left = links
            .lines()
            .filter(|l| {
                l.split(": ")
                    .nth(1)
                    .is_some_and(|n| n.starts_with("mg") && n.len() >= 13)
            })
            .count();
        (results, left)
    });
    println!("CNI ADD through a real node, {n} one after another (ms, plugin process wall time):");
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.what, r.seq.p50, r.seq.p99, r.seq.max
        );
    }
    println!();
    println!("{m} concurrent ADDs:");
    println!("| path | wall (ms) | per-ADD p50 | per-ADD p99 | distinct addresses | distinct with the {n} before |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.1} | {:.2} | {:.2} | {}/{m} | {}/{} |",
            r.what,
            r.conc_wall.as_secs_f64() * 1000.0,
            r.conc.p50,
            r.conc.p99,
            r.distinct,
            r.distinct_all,
            n + m
        );
    }
    println!();
    println!("DEL of all {} pods one after another (ms):", n + m);
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.what, r.del.p50, r.del.p99, r.del.max
        );
    }
    println!();
    println!("margay host veths left after DEL: {left}");
    let dup = results
        .iter()
        .any(|r| r.distinct != m || r.distinct_all != n + m);
    drop(rpods);
    drop(mpods);
    drop(warm);
    drop(lab);
    assert!(!dup, "duplicate addresses (see the table)");
    assert_eq!(left, 0, "margay DEL left host veths behind");
}
