//! Pod-to-pod throughput and latency through margay's plumbing, beside the same paths built by hand with
//! `ip` in the same run, and the time from a `vxlanMode` change in etcd to the last node's routes switched.
//!
//! ```text
//!   margay lab up --subnets 2 --nodes 3 --pods 1               built by hand (same shape, other namespaces)
//!   <lab>-br: router br0 10.99.0.1 | br1 10.99.1.1             hb<pid>r: router br0 10.98.0.1 | br1 10.98.1.1
//!     n1 10.99.0.11 (p1)  n3 10.99.0.13 (p3) | n2 10.99.1.12 (p2)   n1 10.98.0.11 (p1) n3 .0.13 (p3) | n2 .1.12 (p2)
//! ```
//! Paths, each measured margay / by hand, interleaved, `--runs` times:
//! - same segment, p1 -> p3: `<block> via <node> dev eth0` (pool CrossSubnet: no encapsulation);
//! - across the router with VXLAN, p1 -> p2: `vxlan.calico` (VNI 4096, port 4789, static neighbour + FDB);
//! - across the router via a BIRD "ToR" (pool Never, mesh off, an AS per rack, eBGP to the router): margay
//!   installs `<block> via 10.99.0.1 dev eth0` (next hop resolved recursively), the router forwards on the
//!   routes BIRD learned; by hand: the same routes with `ip route`.
//!
//! Throughput: `iperf3 -c <pod> -t <secs> -J` from the client pod to `iperf3 -s -1` in the server pod (plain
//! processes in the pods' namespaces), received bits/s. Latency: `ping -i 0.005` RTT, median of 200.
//! Pods on both sides have the same MTU (the hand-built pods take the MTU margay gave its pods). A last row
//! loads margay's nftables NAT table into the hand-built nodes, to show what of a difference is netfilter's.
//!
//! Flips: the pool's `vxlanMode` written to etcd (one txn from this process, inside the lab) alternately
//! Always and Never; the clock stops at the kernel notification (a netlink monitor per node namespace) of the
//! last route, on any node, that completes the switch of every node's routes to the other nodes' blocks
//! (through `vxlan.calico` or not), confirmed by reading every node's routes.
//!
//! `cargo bench --bench pod_paths -- [--runs 5] [--secs 3] [--flips 20]` (root; etcd, iperf3, bird).

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use node_lab::{in_netns, prerequisites, sh, Bird, RouteMonitor, LAB_ETCD, MARGAY};

/// Run a command, its stdout (panics with its output when it fails).
fn run(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Percentile `p` (nearest rank) of unsorted values.
fn pctl(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

/// One iperf3 TCP run from `client` to `server` (`ip`): received Gbit/s. The server is started first and
/// waited for (listening), the client is bounded in time, the server is killed by PID afterwards: a lost
/// run is retried, never waited on forever.
fn iperf(client: &str, server: &str, ip: &str, secs: u32) -> f64 {
    for attempt in 0..3 {
        let mut srv = Command::new("ip")
            .args(["netns", "exec", server, "iperf3", "-s", "-1", "-p", "5201"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("iperf3 -s");
        wait_for("iperf3 -s listening", Duration::from_secs(5), || {
            !run(&format!("ip netns exec {server} ss -Hltn sport = :5201"))
                .trim()
                .is_empty()
        });
        let out = Command::new("timeout")
            .arg((secs + 15).to_string())
            .args([
                "ip", "netns", "exec", client, "iperf3", "-c", ip, "-p", "5201",
            ])
            .args(["-t", &secs.to_string(), "-J", "--connect-timeout", "3000"])
            .output()
            .expect("iperf3 -c");
        let _ = srv.kill();
        let _ = srv.wait();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        if let Some(bps) = v["end"]["sum_received"]["bits_per_second"].as_f64() {
            return bps / 1e9;
        }
        eprintln!(
            "  iperf3 {client} -> {ip} attempt {attempt} failed: {}",
            v["error"].as_str().unwrap_or("no result")
        );
    }
    panic!("iperf3 {client} -> {ip}: no result in 3 attempts");
}

/// Median RTT (ms) of 200 pings from `client` to `ip`.
fn ping_p50(client: &str, ip: &str) -> f64 {
    let out = run(&format!(
        "ip netns exec {client} ping -c 200 -i 0.005 -W 1 {ip}"
    ));
    let mut rtts: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        rtts.len() >= 190,
        "ping {client} -> {ip} lost packets:\n{out}"
    );
    median(&mut rtts)
}

fn pod_ipv4(ns: &str) -> String {
    let out = run(&format!("ip -n {ns} -4 -o addr show dev eth0"));
    out.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no IPv4 on {ns} eth0: {out}"))
        .to_string()
}

fn link_mtu(ns: &str, dev: &str) -> u32 {
    let out = run(&format!("ip -n {ns} -o link show dev {dev}"));
    let w: Vec<&str> = out.split_whitespace().collect();
    w.iter()
        .position(|x| *x == "mtu")
        .and_then(|i| w.get(i + 1)?.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {out}"))
}

/// margay's routes in `ns`.
fn routes(ns: &str) -> String {
    run(&format!("ip -n {ns} -4 route show proto 77"))
}

/// The node's own block (its blackhole).
fn own_block(ns: &str) -> String {
    routes(ns)
        .lines()
        .find(|l| l.starts_with("blackhole "))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or_else(|| panic!("{ns} has no block"))
        .to_string()
}

/// The route line of `block` in `ns` ("" when absent).
fn route_of(all: &str, block: &str) -> String {
    all.lines()
        .find(|l| l.starts_with(&format!("{block} ")))
        .unwrap_or("")
        .to_string()
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The same three nodes, router and pods, plumbed with `ip` as margay plumbs them (host veth with proxy
/// ARP and a /32 route, pod /32 with a default route via 169.254.1.1, the node's block blackholed), in
/// namespaces deleted on drop.
struct HandBuilt {
    ns: Vec<String>,
    p: String,
}

impl HandBuilt {
    fn ns(&self, n: &str) -> String {
        format!("{}{n}", self.p)
    }

    fn new(pod_mtu: u32) -> HandBuilt {
        let p = format!("hb{}", std::process::id() % 10000);
        let names: Vec<String> = ["r", "n1", "n2", "n3", "p1", "p2", "p3"]
            .iter()
            .map(|n| format!("{p}{n}"))
            .collect();
        for n in &names {
            run(&format!("ip netns add {n}"));
        }
        let hb = HandBuilt { ns: names, p };
        let (r, n1, n2, n3) = (hb.ns("r"), hb.ns("n1"), hb.ns("n2"), hb.ns("n3"));
        let mut cmds = vec![
            format!("ip -n {r} link add br0 type bridge"),
            format!("ip -n {r} link add br1 type bridge"),
            format!("ip -n {r} addr add 10.98.0.1/24 dev br0"),
            format!("ip -n {r} addr add 10.98.1.1/24 dev br1"),
            format!("ip -n {r} link set br0 up"),
            format!("ip -n {r} link set br1 up"),
            format!("ip netns exec {r} sysctl -qw net.ipv4.ip_forward=1"),
        ];
        for (node, addr, br, gw) in [
            (&n1, "10.98.0.11", "br0", "10.98.0.1"),
            (&n2, "10.98.1.12", "br1", "10.98.1.1"),
            (&n3, "10.98.0.13", "br0", "10.98.0.1"),
        ] {
            let port = format!("{}{}", hb.p, &node[node.len() - 2..]);
            cmds.extend([
                format!("ip -n {r} link add {port} type veth peer name eth0 netns {node}"),
                format!("ip -n {r} link set {port} master {br} up"),
                format!("ip -n {node} addr add {addr}/24 dev eth0"),
                format!("ip -n {node} link set lo up"),
                format!("ip -n {node} link set eth0 up"),
                format!("ip -n {node} route add default via {gw}"),
                format!("ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1"),
            ]);
        }
        for (i, node) in [(1, &n1), (2, &n2), (3, &n3)] {
            let pod = hb.ns(&format!("p{i}"));
            let host = format!("mghand{i}");
            cmds.extend([
                format!("ip -n {node} link add {host} mtu {pod_mtu} type veth peer name eth0 netns {pod} mtu {pod_mtu}"),
                format!("ip netns exec {node} sysctl -qw net.ipv4.conf.{host}.proxy_arp=1"),
                format!("ip netns exec {node} sysctl -qw net.ipv4.neigh.{host}.proxy_delay=0"),
                format!("ip -n {node} link set {host} up"),
                format!("ip -n {node} route add 10.245.{i}.2/32 dev {host} scope link"),
                format!("ip -n {node} route add blackhole 10.245.{i}.0/26"),
                format!("ip -n {pod} link set lo up"),
                format!("ip -n {pod} addr add 10.245.{i}.2/32 dev eth0"),
                format!("ip -n {pod} link set eth0 up"),
                format!("ip -n {pod} route add 169.254.1.1 dev eth0 scope link"),
                format!("ip -n {pod} route add default via 169.254.1.1 dev eth0"),
            ]);
        }
        // Same segment: plain, as margay's CrossSubnet gives it.
        cmds.extend([
            format!("ip -n {n1} route add 10.245.3.0/26 via 10.98.0.13 dev eth0"),
            format!("ip -n {n3} route add 10.245.1.0/26 via 10.98.0.11 dev eth0"),
        ]);
        // VXLAN between n1 and n2, as Calico builds it.
        for (node, local, tunnel, mac) in [
            (&n1, "10.98.0.11", "10.245.1.0", "66:00:00:00:00:01"),
            (&n2, "10.98.1.12", "10.245.2.0", "66:00:00:00:00:02"),
        ] {
            cmds.extend([
                format!("ip -n {node} link add vxlan.calico address {mac} mtu 1450 type vxlan id 4096 local {local} dev eth0 dstport 4789 nolearning"),
                format!("ip -n {node} addr add {tunnel}/32 dev vxlan.calico"),
                format!("ip -n {node} link set vxlan.calico up"),
            ]);
        }
        cmds.extend([
            format!("ip -n {n1} neigh add 10.245.2.0 lladdr 66:00:00:00:00:02 dev vxlan.calico nud permanent"),
            format!("bridge -n {n1} fdb add 66:00:00:00:00:02 dev vxlan.calico dst 10.98.1.12 self permanent"),
            format!("ip -n {n2} neigh add 10.245.1.0 lladdr 66:00:00:00:00:01 dev vxlan.calico nud permanent"),
            format!("bridge -n {n2} fdb add 66:00:00:00:00:01 dev vxlan.calico dst 10.98.0.11 self permanent"),
        ]);
        for c in cmds {
            run(&c);
        }
        hb
    }

    /// Load `table` (nft syntax: margay's `inet margay` NAT table as a node holds it) into every hand-built
    /// node, so the by-hand path pays what netfilter costs margay's (conntrack, the NAT hooks).
    fn load_nft(&self, table: &str) {
        for n in ["n1", "n2", "n3"] {
            let mut c = Command::new("ip")
                .args(["netns", "exec", &self.ns(n), "nft", "-f", "-"])
                .stdin(Stdio::piped())
                .spawn()
                .expect("nft -f -");
            if let Some(mut i) = c.stdin.take() {
                use std::io::Write;
                i.write_all(table.as_bytes()).expect("write nft");
            }
            assert!(
                c.wait().map(|s| s.success()).unwrap_or(false),
                "nft -f in {n}"
            );
        }
    }

    fn unload_nft(&self) {
        for n in ["n1", "n2", "n3"] {
            run(&format!(
                "ip netns exec {} nft delete table inet margay",
                self.ns(n)
            ));
        }
    }

    /// Cross-segment routes through VXLAN (`true`) or through the router (`false`).
    fn cross_via_vxlan(&self, vxlan: bool) {
        let (r, n1, n2) = (self.ns("r"), self.ns("n1"), self.ns("n2"));
        let cmds = if vxlan {
            vec![
                format!(
                    "ip -n {n1} route replace 10.245.2.0/26 via 10.245.2.0 dev vxlan.calico onlink"
                ),
                format!(
                    "ip -n {n2} route replace 10.245.1.0/26 via 10.245.1.0 dev vxlan.calico onlink"
                ),
            ]
        } else {
            vec![
                format!("ip -n {r} route replace 10.245.1.0/26 via 10.98.0.11"),
                format!("ip -n {r} route replace 10.245.2.0/26 via 10.98.1.12"),
                format!("ip -n {n1} route replace 10.245.2.0/26 via 10.98.0.1 dev eth0"),
                format!("ip -n {n2} route replace 10.245.1.0/26 via 10.98.1.1 dev eth0"),
            ]
        };
        for c in cmds {
            run(&c);
        }
    }
}

impl Drop for HandBuilt {
    fn drop(&mut self) {
        for n in &self.ns {
            let _ = sh(&format!("ip netns del {n}"));
        }
    }
}

/// One path measured both ways, interleaved.
struct PathResult {
    name: &'static str,
    margay_gbps: Vec<f64>,
    hand_gbps: Vec<f64>,
    margay_rtt: Vec<f64>,
    hand_rtt: Vec<f64>,
}

fn measure(
    name: &'static str,
    margay: (&str, &str, &str),
    hand: (&str, &str, &str),
    runs: usize,
    secs: u32,
) -> PathResult {
    let mut r = PathResult {
        name,
        margay_gbps: Vec::new(),
        hand_gbps: Vec::new(),
        margay_rtt: Vec::new(),
        hand_rtt: Vec::new(),
    };
    for i in 0..runs {
        // Alternate which goes first, so a drift in the machine's load hits both alike.
        let order = if i % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for m in order {
            let (c, s, ip) = if m { margay } else { hand };
            let g = iperf(c, s, ip, secs);
            let l = ping_p50(c, ip);
            eprintln!(
                "  {name} {} run {i}: {g:.2} Gbit/s, RTT p50 {l:.3} ms",
                if m { "margay" } else { "by hand" }
            );
            if m {
                r.margay_gbps.push(g);
                r.margay_rtt.push(l);
            } else {
                r.hand_gbps.push(g);
                r.hand_rtt.push(l);
            }
        }
    }
    r
}

fn report(results: &mut [PathResult], runs: usize, secs: u32) {
    println!(
        "Pod-to-pod, median of {runs} runs ({secs} s iperf3 TCP each; RTT = median of 200 pings per run, median over runs):"
    );
    println!("| path | margay Gbit/s | by hand Gbit/s | ratio | margay RTT ms | by hand RTT ms | ratio |");
    println!("|---|---|---|---|---|---|---|");
    for r in results.iter_mut() {
        let (mg, hg) = (median(&mut r.margay_gbps), median(&mut r.hand_gbps));
        let (ml, hl) = (median(&mut r.margay_rtt), median(&mut r.hand_rtt));
        println!(
            "| {} | {mg:.2} | {hg:.2} | {:.3} | {ml:.3} | {hl:.3} | {:.3} |",
            r.name,
            mg / hg,
            ml / hl
        );
    }
}

/// The default pool's JSON with `vxlanMode` set, written in one etcd txn; returns when the txn was sent
/// (the clock's start) .
struct PoolWriter {
    rt: tokio::runtime::Runtime,
    ds: std::sync::Arc<margay::datastore::Datastore>,
}

const POOL_KEY: &str = "/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool";

impl PoolWriter {
    fn new() -> PoolWriter {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let ds = rt.block_on(async {
            std::sync::Arc::new(
                margay::datastore::Datastore::new(margay::datastore::DatastoreConfig::new(&[
                    LAB_ETCD,
                ]))
                .expect("etcd client"),
            )
        });
        PoolWriter { rt, ds }
    }

    /// Set `vxlanMode`; the instant just before the write was sent.
    fn set_mode(&self, mode: &str) -> Instant {
        self.rt.block_on(async {
            let kv = self
                .ds
                .get(POOL_KEY)
                .await
                .expect("get pool")
                .expect("the default pool exists");
            let mut v: serde_json::Value = serde_json::from_slice(&kv.value).expect("pool JSON");
            v["spec"]["vxlanMode"] = mode.into();
            let body = serde_json::to_vec(&v).expect("JSON");
            let t0 = Instant::now();
            let r = self
                .ds
                .update(POOL_KEY, body, kv.mod_revision)
                .await
                .expect("update pool");
            assert!(r.is_some(), "the pool changed under the benchmark");
            t0
        })
    }
}

/// Every node's routes to the other nodes' blocks have the form `mode` asks for.
fn switched(nodes: &[String], blocks: &HashMap<String, String>, mode: &str) -> bool {
    nodes.iter().all(|n| {
        let all = routes(n);
        blocks
            .iter()
            .filter(|(owner, _)| *owner != n)
            .all(|(_, b)| {
                let r = route_of(&all, b);
                !r.is_empty() && (r.contains("dev vxlan.calico") == (mode == "Always"))
            })
    })
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1)?.parse().ok())
            .unwrap_or(default)
    };
    let (runs, secs, flips) = (
        arg("--runs", 5),
        arg("--secs", 3) as u32,
        arg("--flips", 20),
    );
    if !prerequisites("pod_paths bench", &["iperf3", "bird", "birdc", "bridge"]) {
        return;
    }
    let name = format!("mgpp{}", std::process::id() % 10000);
    let lab = node_lab::Lab {
        state: std::path::PathBuf::from("/run/margay-lab").join(&name),
        name: name.clone(),
    };
    let out = Command::new(MARGAY)
        .args([
            "lab",
            "up",
            "--name",
            &name,
            "--nodes",
            "3",
            "--pods",
            "1",
            "--subnets",
            "2",
        ])
        .env("RUST_LOG", "warn")
        .output()
        .expect("margay lab up");
    assert!(
        out.status.success(),
        "margay lab up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let node = |i: usize| lab.node_ns(i);
    let pod = |i: usize| format!("{}p1", lab.node_ns(i));
    let (p1, p2, p3) = (pod(1), pod(2), pod(3));
    let (ip2, ip3) = (pod_ipv4(&p2), pod_ipv4(&p3));
    let mtu = link_mtu(&p1, "eth0");
    eprintln!("pods {p1} -> {p2} {ip2} / {p3} {ip3}, pod MTU {mtu}");
    let hb = HandBuilt::new(mtu);
    let (h1, h2, h3) = (hb.ns("p1"), hb.ns("p2"), hb.ns("p3"));
    hb.cross_via_vxlan(true);
    for (c, ip) in [
        (&p1, &ip2),
        (&p1, &ip3),
        (&h1, &"10.245.2.2".to_string()),
        (&h1, &"10.245.3.2".to_string()),
    ] {
        wait_for(&format!("{c} -> {ip}"), Duration::from_secs(30), || {
            sh(&format!("ip netns exec {c} ping -c 1 -W 1 {ip}"))
        });
    }
    let b2 = own_block(&node(2));
    assert!(
        route_of(&routes(&node(1)), &b2).contains("dev vxlan.calico"),
        "n2's block is not through VXLAN on n1: {}",
        routes(&node(1))
    );

    let mut results = vec![
        measure(
            "same segment (no encapsulation)",
            (&p1, &p3, &ip3),
            (&h1, &h3, "10.245.3.2"),
            runs,
            secs,
        ),
        measure(
            "across the router, VXLAN",
            (&p1, &p2, &ip2),
            (&h1, &h2, "10.245.2.2"),
            runs,
            secs,
        ),
    ];

    // vxlanMode flips: Always <-> Never, every node's routes to the other blocks followed.
    let nodes: Vec<String> = (1..=3).map(node).collect();
    let blocks: HashMap<String, String> = nodes.iter().map(|n| (n.clone(), own_block(n))).collect();
    let monitors: Vec<RouteMonitor> = nodes.iter().map(|n| RouteMonitor::start(n)).collect();
    let etcd_ns = format!("{name}-etcd");
    let mut took: Vec<f64> = Vec::new();
    let mut by_mode: HashMap<&str, Vec<f64>> = HashMap::new();
    in_netns(&etcd_ns, || {
        let monitors = monitors;
        let w = PoolWriter::new();
        // Start from Never (not counted).
        w.set_mode("Never");
        wait_for("vxlanMode Never", Duration::from_secs(30), || {
            switched(&nodes, &blocks, "Never")
        });
        for i in 0..flips {
            let mode = if i % 2 == 0 { "Always" } else { "Never" };
            std::thread::sleep(Duration::from_millis(300));
            for m in &monitors {
                while m.events.try_recv().is_ok() {}
            }
            let t0 = w.set_mode(mode);
            wait_for(
                &format!("vxlanMode {mode}"),
                Duration::from_secs(30),
                || switched(&nodes, &blocks, mode),
            );
            // The last notification of a route to another node's block, on any node.
            let mut last = None;
            for (m, n) in monitors.iter().zip(&nodes) {
                while let Ok(e) = m.events.try_recv() {
                    let p = format!("{}/{}", e.dst, e.prefix_len);
                    let remote = blocks.iter().any(|(o, b)| o != n && *b == p);
                    if e.new && remote && e.at > t0 {
                        last = Some(last.map_or(e.at, |l: Instant| l.max(e.at)));
                    }
                }
            }
            let at = last.unwrap_or_else(|| panic!("flip {i} to {mode}: no route notification"));
            let ms = (at - t0).as_secs_f64() * 1000.0;
            eprintln!("  flip {i} -> {mode}: {ms:.1} ms");
            took.push(ms);
            by_mode.entry(mode).or_default().push(ms);
        }
    });

    // Where a difference comes from: the by-hand nodes with margay's nftables table (NAT for the pool:
    // conntrack and the nat hooks see every packet), the same-segment path again (before
    // the ToR phase: with the mesh off, n3 has no peer left).
    let table = run(&format!(
        "ip netns exec {} nft list table inet margay",
        node(1)
    ));
    hb.load_nft(&table);
    results.push(measure(
        "same segment; by hand WITH margay's nft NAT table loaded",
        (&p1, &p3, &ip3),
        (&h1, &h3, "10.245.3.2"),
        runs,
        secs,
    ));
    // VXLAN switched back on for the last row with the table: conntrack then sees the inner and the outer
    // (UDP) packet.
    {
        in_netns(&etcd_ns, || {
            PoolWriter::new().set_mode("CrossSubnet");
        });
        wait_for(
            "n2's block through VXLAN again",
            Duration::from_secs(30),
            || route_of(&routes(&node(1)), &b2).contains("dev vxlan.calico"),
        );
        hb.cross_via_vxlan(true);
        results.push(measure(
            "across the router, VXLAN; by hand WITH margay's nft NAT table loaded",
            (&p1, &p2, &ip2),
            (&h1, &h2, "10.245.2.2"),
            runs,
            secs,
        ));
        in_netns(&etcd_ns, || {
            PoolWriter::new().set_mode("Never");
        });
        wait_for("n2's block plain again", Duration::from_secs(30), || {
            !route_of(&routes(&node(1)), &b2).contains("vxlan")
        });
    }
    hb.unload_nft();

    // Via a BIRD ToR: pool Never, mesh off, rack B in its own AS, eBGP to the router.
    let br = format!("{name}-br");
    let etcdctl = |args: &str| {
        run(&format!(
            "ip netns exec {etcd_ns} etcdctl --endpoints {LAB_ETCD} {args}"
        ))
    };
    etcdctl(&format!(
        "put /calico/resources/v3/projectcalico.org/bgpconfigurations/default '{}'",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"nodeToNodeMeshEnabled":false}}"#
    ));
    {
        let key = format!("/calico/resources/v3/projectcalico.org/nodes/{}", node(2));
        let mut v: serde_json::Value =
            serde_json::from_str(etcdctl(&format!("get {key} --print-value-only")).trim())
                .expect("Node JSON");
        v["spec"]["bgp"]["asNumber"] = 64513.into();
        etcdctl(&format!("put {key} '{v}'"));
        run(&format!(
            "{MARGAY} lab restart-node {} --name {name}",
            node(2)
        ));
    }
    let bird = Bird::start(
        &br,
        "router id 10.99.0.1;\nprotocol device {}\nprotocol kernel { ipv4 { export all; }; }\n\
         protocol bgp a { local 10.99.0.1 as 65001; neighbor 10.99.0.11 as 64512; ipv4 { import all; export all; next hop keep; }; }\n\
         protocol bgp b { local 10.99.1.1 as 65001; neighbor 10.99.1.12 as 64513; ipv4 { import all; export all; next hop keep; }; }\n",
    );
    for (peer, n, ip) in [
        ("tor-a", node(1), "10.99.0.1"),
        ("tor-b", node(2), "10.99.1.1"),
    ] {
        etcdctl(&format!(
            "put /calico/resources/v3/projectcalico.org/bgppeers/{peer} '{{\"apiVersion\":\"projectcalico.org/v3\",\"kind\":\"BGPPeer\",\"metadata\":{{\"name\":\"{peer}\"}},\"spec\":{{\"node\":\"{n}\",\"peerIP\":\"{ip}\",\"asNumber\":65001}}}}'"
        ));
    }
    bird.wait_established(2, Duration::from_secs(60));
    wait_for(
        "n2's block via the ToR on n1",
        Duration::from_secs(60),
        || route_of(&routes(&node(1)), &b2).contains("via 10.99.0.1 dev eth0"),
    );
    wait_for("p1 -> p2 through the ToR", Duration::from_secs(30), || {
        sh(&format!("ip netns exec {p1} ping -c 1 -W 1 {ip2}"))
    });
    hb.cross_via_vxlan(false);
    results.push(measure(
        "across the router via the BIRD ToR (eBGP, recursive next hop)",
        (&p1, &p2, &ip2),
        (&h1, &h2, "10.245.2.2"),
        runs,
        secs,
    ));
    drop(bird);

    report(&mut results, runs, secs);
    println!();
    let mut always = by_mode.remove("Always").unwrap_or_default();
    let mut never = by_mode.remove("Never").unwrap_or_default();
    println!(
        "vxlanMode change in etcd -> the last node's routes switched (3 nodes, 2 subnets, 6 routes), {} flips:",
        took.len()
    );
    println!("| flips | p50 (ms) | p99 (ms) | max (ms) |");
    println!("|---|---|---|---|");
    let n = took.len();
    println!(
        "| all {n} | {:.1} | {:.1} | {:.1} |",
        pctl(&mut took, 0.5),
        pctl(&mut took, 0.99),
        pctl(&mut took, 1.0)
    );
    println!(
        "| Never -> Always ({}) | {:.1} | {:.1} | {:.1} |",
        always.len(),
        pctl(&mut always, 0.5),
        pctl(&mut always, 0.99),
        pctl(&mut always, 1.0)
    );
    println!(
        "| Always -> Never ({}) | {:.1} | {:.1} | {:.1} |",
        never.len(),
        pctl(&mut never, 0.5),
        pctl(&mut never, 0.99),
        pctl(&mut never, 1.0)
    );
    drop(hb);
    drop(lab);
}
