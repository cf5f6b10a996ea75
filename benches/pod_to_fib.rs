//! From a pod ADD on node A to its block's route in node B's FIB, for the first pod of a new block: the
//! whole path IPAM claim (etcd) -> A's speaker originates the block -> BGP UPDATE -> B's RIB -> B's FIB
//! task -> kernel.
//!
//! ```text
//!   margay lab, 2 nodes, full iBGP mesh
//!   bench (in <lab>-n1) ──exec──▶ margay-cni ──▶ node A: claim a block in etcd, plumb the pod, originate
//!                                                  │ BGP UPDATE (block prefix, next hop A)
//!                                                  ▼
//!   route monitor (netlink socket on RTNLGRP_IPV4_ROUTE in <lab>-n2) ◀── node B: RIB ─▶ FIB (proto 77)
//! ```
//!
//! Every sample is a new block, honestly: the lab's default pool (10.244.0.0/16) is created with /31 blocks
//! (`MARGAY_IPV4POOL_BLOCK_SIZE=31` in the environment of `margay lab up`, which its nodes inherit; two
//! addresses per block; Calico allows IPv4 blocks from /20 to /32), so every second ADD on A finds its
//! affine blocks full and claims a fresh block in etcd, which A then advertises. The clock starts when the runtime
//! would start the plugin (just before `margay-cni` is executed) and stops when the kernel in B's namespace
//! announces the block's route (the notification's arrival on the monitor socket, no polling). ADDs that
//! land in an existing block (the second address of each /31) are not samples. The first block is a
//! warm-up (the BGP session may still be opening) and not counted.
//!
//! `cargo bench --bench pod_to_fib -- [--samples 200]` (root; etcd).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use node_lab::{
    cni, in_netns, pct, prerequisites, result_ipv4, Bird, Lab, PodNamespaces, RouteMonitor,
    MARGAY_CNI,
};
use serde_json::json;

const BLOCK: u8 = 31;

fn block_of(ip: Ipv4Addr) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(ip) & (u32::MAX << (32 - BLOCK)))
}

fn main() {
    let mut samples = 200usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--samples") {
        samples = args
            .get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(samples);
    }
    if !prerequisites("pod_to_fib bench", &[]) {
        return;
    }
    let block = BLOCK.to_string();
    let lab = Lab::up_with_env(
        "mgbf",
        2,
        0,
        &[("MARGAY_IPV4POOL_BLOCK_SIZE", block.as_str())],
    );
    let pid = std::process::id() % 10000;
    // Two ADDs per block, plus the warm-up block and a margin.
    let pods = PodNamespaces::new(&format!("mgbf{pid}p"), 2 * samples + 8);
    let monitor = RouteMonitor::start(&lab.node_ns(2));
    // The bench thread runs margay-cni in node A's namespace, as A's runtime would.
    let (mut to_fib, mut add_times, before_add_returned, fillers) = in_netns(
        &lab.node_ns(1),
        || {
            let monitor = monitor; // moved in: a Receiver is not Sync
            let conf = lab.conf(1, json!({}));

            let mut seen_blocks = HashSet::new();
            let mut to_fib: Vec<Duration> = Vec::new();
            let mut add_times: Vec<Duration> = Vec::new();
            let mut before_add_returned = 0usize;
            let mut fillers = 0usize;
            let mut warmed = false;
            for i in 0..pods.0.len() {
                if to_fib.len() == samples {
                    break;
                }
                let t0 = Instant::now();
                let (took, r) = cni(MARGAY_CNI, "ADD", &pods.0[i], &pods.path(i), &conf);
                let v = r.unwrap_or_else(|e| panic!("{e}"));
                let ip = result_ipv4(&v).unwrap_or_else(|| panic!("no IPv4 in {v}"));
                let block = block_of(ip);
                if !seen_blocks.insert(block) {
                    fillers += 1;
                    continue;
                }
                let limit = if warmed { 10 } else { 60 };
                let deadline = Instant::now() + Duration::from_secs(limit);
                let at = loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match monitor.events.recv_timeout(left) {
                    Ok(e) if e.new && e.dst == block && e.prefix_len == BLOCK => break e.at,
                    Ok(_) => continue,
                    Err(_) => panic!(
                        "block {block}/{BLOCK} of pod {ip} did not reach {}'s FIB within {limit} s (logs in {})",
                        lab.node_ns(2),
                        lab.state.display()
                    ),
                }
                };
                if !warmed {
                    warmed = true;
                    eprintln!(
                        "warm-up block {block}/{BLOCK} reached B after {:.1} ms (not counted)",
                        (at - t0).as_secs_f64() * 1000.0
                    );
                    continue;
                }
                if at < t0 + took {
                    before_add_returned += 1;
                }
                to_fib.push(at - t0);
                add_times.push(took);
            }
            (to_fib, add_times, before_add_returned, fillers)
        },
    );
    assert_eq!(to_fib.len(), samples, "ran out of pod namespaces");
    to_fib.sort();
    add_times.sort();
    println!(
        "Pod ADD on node A -> the new block's route in node B's FIB, {samples} samples (one new /{BLOCK} block each; {fillers} filler ADDs in between):"
    );
    println!("| what | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|");
    println!(
        "| ADD start -> route in B's FIB | {:.2} | {:.2} | {:.2} |",
        pct(&to_fib, 0.5),
        pct(&to_fib, 0.99),
        pct(&to_fib, 1.0)
    );
    println!(
        "| the ADD itself (margay-cni wall time) | {:.2} | {:.2} | {:.2} |",
        pct(&add_times, 0.5),
        pct(&add_times, 0.99),
        pct(&add_times, 1.0)
    );
    println!(
        "route in B's FIB before the ADD returned on A: {before_add_returned}/{samples} samples"
    );
    drop(pods);
    drop(lab);

    if let Some(mut anchor) = bird_anchor(samples) {
        anchor.sort();
        println!();
        println!("Anchor, same run: Calico's path without confd (a block's static route added to BIRD A's configuration, `birdc configure`) -> route in BIRD B's FIB, {samples} samples:");
        println!("| what | p50 (ms) | p99 (ms) | max (ms) |");
        println!("|---|---|---|---|");
        println!(
            "| BIRD 2 reconfigure on A -> route in B's FIB | {:.2} | {:.2} | {:.2} |",
            pct(&anchor, 0.5),
            pct(&anchor, 0.99),
            pct(&anchor, 1.0)
        );
    }
}

/// The floor of Calico's path for the same event: when a node claims a block, confd re-renders BIRD's
/// configuration with the block as a static blackhole route and has BIRD reload it; BIRD then announces
/// it over iBGP and the peer's BIRD writes it into the kernel. Here the clock starts when the new
/// configuration is written (confd's watch and render not counted) and stops at the route's kernel
/// notification in B's namespace, watched the same way as for margay.
fn bird_anchor(samples: usize) -> Option<Vec<Duration>> {
    if !node_lab::sh("command -v bird && command -v birdc") {
        println!("(bird not installed: no anchor)");
        return None;
    }
    let pid = std::process::id() % 10000;
    let ns = PodNamespaces::new(&format!("mgbf{pid}b"), 2);
    let (a, b) = (ns.0[0].clone(), ns.0[1].clone());
    for cmd in [
        format!("ip -n {a} link add eth0 type veth peer name eth0 netns {b}"),
        format!("ip -n {a} addr add 10.98.0.1/24 dev eth0"),
        format!("ip -n {b} addr add 10.98.0.2/24 dev eth0"),
        format!("ip -n {a} link set eth0 up"),
        format!("ip -n {b} link set eth0 up"),
    ] {
        assert!(node_lab::sh(&cmd), "{cmd}");
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let blocks = dir.path().join("blocks.conf");
    // As Calico's bird_aggr.cfg: the node's blocks as one static protocol of blackhole routes.
    let render = |routes: &str| format!("protocol static blocks {{ ipv4; {routes} }}\n");
    std::fs::write(&blocks, render("")).expect("write blocks.conf");
    let bird_a = Bird::start(
        &a,
        &format!(
            "router id 10.98.0.1;\nprotocol device {{ }}\n\
             include \"{}\";\n\
             protocol bgp b {{ local 10.98.0.1 as 64512; neighbor 10.98.0.2 as 64512; direct; \
             ipv4 {{ import none; export all; next hop self; }}; }}\n",
            blocks.display()
        ),
    );
    let bird_b = Bird::start(
        &b,
        "router id 10.98.0.2;\nprotocol device { }\n\
         protocol kernel { ipv4 { import none; export all; }; }\n\
         protocol bgp a { local 10.98.0.2 as 64512; neighbor 10.98.0.1 as 64512; direct; \
         ipv4 { import all; export none; }; }\n",
    );
    bird_a.wait_established(1, Duration::from_secs(60));
    bird_b.wait_established(1, Duration::from_secs(60));
    let monitor = RouteMonitor::start(&b);
    let mut lines = String::new();
    let mut out = Vec::new();
    // Sample 0 is a warm-up, as for margay.
    for i in 0..=samples {
        let block = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 250, 0, 0)) + 2 * i as u32);
        lines.push_str(&format!("route {block}/{BLOCK} blackhole;\n"));
        let t0 = Instant::now();
        std::fs::write(&blocks, render(&lines)).expect("write blocks.conf");
        let reply = bird_a.birdc("configure");
        assert!(reply.contains("Reconfigured"), "birdc configure: {reply}");
        let deadline = t0 + Duration::from_secs(10);
        let at = loop {
            match monitor
                .events
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(e) if e.new && e.dst == block && e.prefix_len == BLOCK => break e.at,
                Ok(_) => continue,
                Err(_) => panic!("BIRD: {block}/{BLOCK} did not reach {b}'s FIB within 10 s"),
            }
        };
        if i > 0 {
            out.push(at - t0);
        }
    }
    drop(bird_b);
    drop(bird_a);
    drop(ns);
    Some(out)
}
