//! Idle memory of `margay node run` in the lab, with and without pods, beside BIRD 2 doing calico-node's
//! BGP job for the same cluster in the same run.
//!
//! ```text
//!   netns <lab>-br: br0 10.99.0.1/24
//!     |-- <lab>-etcd  10.99.0.2   etcd
//!     |-- <lab>-n1..3 10.99.0.11-13  margay node run (full iBGP mesh, AS 64512)
//!     `-- <lab>-bird  10.99.0.50  BIRD 2: iBGP with the 3 nodes (a global BGPPeer), their blocks into its FIB
//! ```
//!
//! Steps, each followed by `--settle` seconds (default 20) of idling before VmRSS is read from
//! /proc/PID/status: (1) the lab with no pods; (2) `--pods` pods per node ADDed through margay-cni;
//! (3) BIRD added as a peer of every node (the nodes then hold 3 sessions). BIRD's figure is what
//! calico-node's BIRD costs for the same sessions and routes, without confd and Felix.
//!
//! `cargo bench --bench node_rss -- [--pods 10] [--settle 20]` (root; etcd; bird for the last step).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::process::Command;
use std::time::Duration;

use node_lab::{
    cni, enter_netns, prerequisites, sh, vm_rss_mib, Bird, Lab, PodNamespaces, LAB_ETCD,
};
use serde_json::json;

const NODES: usize = 3;
const BIRD_IP: &str = "10.99.0.50";

fn rss_row(lab: &Lab, what: &str) -> Vec<f64> {
    let v: Vec<f64> = (1..=NODES).map(|i| vm_rss_mib(lab.node_pid(i))).collect();
    println!(
        "| {what} | {} |",
        v.iter()
            .map(|x| format!("{x:.1}"))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    v
}

/// BIRD in its own namespace on the lab bridge, configured as one more node of the mesh would be.
struct BirdPeer {
    bird: Bird,
    ns: String,
}

impl Drop for BirdPeer {
    fn drop(&mut self) {
        // BIRD itself is stopped by `Bird`'s drop, which runs after this one.
        sh(&format!("ip netns del {}", self.ns));
    }
}

fn start_bird(lab: &Lab) -> BirdPeer {
    let ns = format!("{}-bird", lab.name);
    assert!(sh(&format!("ip netns add {ns}")), "ip netns add {ns}");
    let br = format!("{}-br", lab.name);
    for cmd in [
        format!("ip -n {br} link add bird type veth peer name eth0 netns {ns}"),
        format!("ip -n {br} link set bird master br0 up"),
        format!("ip -n {ns} addr add {BIRD_IP}/24 dev eth0"),
        format!("ip -n {ns} link set lo up"),
        format!("ip -n {ns} link set eth0 up"),
    ] {
        assert!(sh(&cmd), "{cmd}");
    }
    // What calico-node's bird.cfg amounts to for one node of this cluster: device scan, kernel export of
    // the learned blocks, and an iBGP session per other node.
    let mut conf = format!(
        "router id {BIRD_IP};\nprotocol device {{ scan time 10; }}\n\
         protocol kernel {{ ipv4 {{ import none; export all; }}; learn; scan time 10; merge paths on; }}\n"
    );
    for i in 1..=NODES {
        conf.push_str(&format!(
            "protocol bgp n{i} {{ local {BIRD_IP} as 64512; neighbor 10.99.0.{} as 64512; direct; \
             ipv4 {{ import all; export none; next hop self; }}; }}\n",
            10 + i
        ));
    }
    BirdPeer {
        bird: Bird::start(&ns, &conf),
        ns,
    }
}

fn main() {
    let mut pods_per_node = 10usize;
    let mut settle = 20u64;
    let args: Vec<String> = std::env::args().collect();
    for (k, v) in args.iter().zip(args.iter().skip(1)) {
        match k.as_str() {
            "--pods" => pods_per_node = v.parse().unwrap_or(pods_per_node),
            "--settle" => settle = v.parse().unwrap_or(settle),
            _ => {}
        }
    }
    if !prerequisites("node_rss bench", &[]) {
        return;
    }
    let have_bird = sh("command -v bird && command -v birdc");
    let lab = Lab::up("mgbr", NODES, 0);
    let idle = || std::thread::sleep(Duration::from_secs(settle));

    println!(
        "VmRSS (MiB) of each `margay node run` after {settle} s idle ({NODES} nodes, full iBGP mesh):"
    );
    println!(
        "| state | {} |",
        (1..=NODES)
            .map(|i| lab.node_ns(i))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|{}", "---|".repeat(NODES));
    for i in 1..=NODES {
        lab.wait_established(i, NODES - 1, Duration::from_secs(60));
    }
    idle();
    let empty = rss_row(&lab, "no pods (2 peers Established)");

    let pid = std::process::id() % 10000;
    let pods = PodNamespaces::new(&format!("mgbr{pid}p"), NODES * pods_per_node);
    std::thread::scope(|s| {
        for node in 1..=NODES {
            let (lab, pods) = (&lab, &pods);
            s.spawn(move || {
                enter_netns(&lab.node_ns(node));
                let conf = lab.conf(node, json!({}));
                for j in 0..pods_per_node {
                    let i = (node - 1) * pods_per_node + j;
                    let (_, r) = cni(
                        node_lab::MARGAY_CNI,
                        "ADD",
                        &pods.0[i],
                        &pods.path(i),
                        &conf,
                    );
                    r.unwrap_or_else(|e| panic!("{e}"));
                }
            });
        }
    });
    idle();
    let with_pods = rss_row(&lab, &format!("{pods_per_node} pods per node"));

    let mut with_bird = Vec::new();
    if have_bird {
        // A global BGPPeer (every node peers with it), written as Calico stores it.
        let peer = json!({"kind": "BGPPeer", "apiVersion": "projectcalico.org/v3",
                          "metadata": {"name": "bench-bird"},
                          "spec": {"peerIP": BIRD_IP, "asNumber": 64512}})
        .to_string();
        let key = "/calico/resources/v3/projectcalico.org/bgppeers/bench-bird";
        let put = Command::new("ip")
            .args([
                "netns",
                "exec",
                &lab.node_ns(1),
                "etcdctl",
                "--endpoints",
                LAB_ETCD,
                "put",
                key,
                &peer,
            ])
            .output()
            .expect("etcdctl put");
        assert!(
            put.status.success(),
            "etcdctl put {key}: {}",
            String::from_utf8_lossy(&put.stderr)
        );
        let bird = start_bird(&lab);
        bird.bird.wait_established(NODES, Duration::from_secs(60));
        for i in 1..=NODES {
            lab.wait_established(i, NODES, Duration::from_secs(60));
        }
        idle();
        with_bird = rss_row(&lab, "the same + BIRD as a third peer");
        let routes = bird.bird.birdc("show route count");
        let bird_pid = bird.bird.child.id() as i32;
        let bird_rss = vm_rss_mib(bird_pid);
        let in_kernel = Command::new("ip")
            .args(["-n", &bird.ns, "route", "show", "proto", "bird"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).lines().count())
            .unwrap_or(0);
        println!();
        println!(
            "BIRD 2 ({NODES} iBGP sessions Established), same run: {bird_rss:.1} MiB; {}; {in_kernel} routes in its kernel table",
            routes.lines().last().unwrap_or("").trim()
        );
    } else {
        println!("(bird not installed: no BIRD figure)");
    }
    let etcd_pid: i32 = std::fs::read_to_string(lab.state.join("etcd.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if etcd_pid > 0 {
        println!("the lab's etcd, same run: {:.1} MiB", vm_rss_mib(etcd_pid));
    }
    let max = empty
        .iter()
        .chain(&with_pods)
        .chain(&with_bird)
        .fold(0.0f64, |a, b| a.max(*b));
    println!("largest margay node VmRSS: {max:.1} MiB (target < 20 MB)");
    drop(pods);
    drop(lab);
}
