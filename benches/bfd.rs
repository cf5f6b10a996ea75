//! BFD failure detection: from a link cut to the peer's route leaving the kernel, margay against BIRD 2's
//! BFD, both watching the same peer and the same cut in the same run.
//!
//! ```text
//!   margay lab (1 node, etcd) on bridge br0 in <lab>-br
//!     <lab>-n1   margay node 10.99.0.11, AS 64512   BGPPeer "tor" 10.99.0.200, margay.io/bfd 100ms x 3
//!     <peer>     BIRD 10.99.0.200, AS 65001: announces 203.0.113.0/24 to both, BFD 100ms x 3, bfd on
//!     <anchor>   BIRD 10.99.0.201, AS 65005: BFD 100ms x 3, bfd on, kernel protocol exports to its FIB
//!   cut: `ip -n <peer> link set eth0 down`; clock stops when each detector's kernel announces the DelRoute
//!   of 203.0.113.0/24 (netlink route monitor in its namespace, no polling); then the link returns and
//!   the next cut waits until both have the route again and both BFD sessions are Up.
//! ```
//!
//! With 100 ms x 3 the detection time is 300 ms after the last packet heard, so a cut is seen 200-300 ms
//! after it happens (packets arrive every 75-100 ms, RFC 5880 6.8.7 jitter), plus the time to take the BGP
//! session down and the route out of the kernel.
//!
//! `cargo bench --bench bfd -- [--cuts 20]` (root; etcd; BIRD 2).
//!
//! `cargo bench --bench bfd -- --cpu-sessions 1000 [--seconds 10]`: CPU cost of many sessions instead. Two
//! BFD tasks in this process (one tokio runtime each, one thread each) hold N sessions with each other over
//! loopback (127.2.x.y <-> 127.3.x.y, a pair of addresses per session) at 100 ms x 3; once all are Up, the
//! CPU time each task's thread uses over the window is read from /proc (utime + stime) and the sessions are
//! checked to have stayed Up.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use node_lab::{pct, prerequisites, Bird, Lab, RouteMonitor, LAB_ETCD, MARGAY};

const PEER_IP: &str = "10.99.0.200";
const ANCHOR_IP: &str = "10.99.0.201";
const ROUTE: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 0);

fn ip(args: &str) {
    let ok = Command::new("ip")
        .args(args.split(' '))
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "ip {args} failed");
}

/// Namespaces on the lab's bridge, deleted on drop.
struct Attached(Vec<String>);

impl Attached {
    fn add(&mut self, lab: &Lab, ns: &str, port: &str, addr: &str) {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
        ip(&format!("netns add {ns}"));
        self.0.push(ns.to_string());
        ip(&format!("-n {ns} link set lo up"));
        ip(&format!(
            "-n {}-br link add {port} type veth peer name eth0 netns {ns}",
            lab.name
        ));
        ip(&format!("-n {}-br link set {port} master br0 up", lab.name));
        ip(&format!("-n {ns} addr add {addr}/24 dev eth0"));
        ip(&format!("-n {ns} link set eth0 up"));
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        for ns in &self.0 {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

fn has_route(ns: &str) -> bool {
    Command::new("ip")
        .args(["-n", ns, "route", "show", "203.0.113.0/24"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("203.0.113.0/24"))
        .unwrap_or(false)
}

fn margay_bfd_up(node_ns: &str) -> bool {
    let out = Command::new("ip")
        .args(["netns", "exec", node_ns, MARGAY, "status", "-o", "json"])
        .output();
    let Ok(out) = out else { return false };
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    v["bfd"]
        .as_array()
        .is_some_and(|a| a.iter().any(|b| b["peer"] == PEER_IP && b["state"] == "Up"))
}

fn wait(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The first DelRoute of 203.0.113.0/24 after `t0`.
fn deleted_after(m: &RouteMonitor, t0: Instant) -> Duration {
    loop {
        let e = m
            .events
            .recv_timeout(Duration::from_secs(30))
            .expect("no route deletion within 30 s of the cut (hold time is 240 s)");
        if !e.new && e.dst == ROUTE && e.prefix_len == 24 && e.at >= t0 {
            return e.at - t0;
        }
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    let i = args.iter().position(|a| a == name)?;
    args.get(i + 1).and_then(|v| v.parse().ok())
}

/// CPU seconds (utime + stime) of thread `tid` of this process.
fn thread_cpu(tid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &s[s.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0 // USER_HZ
}

fn cpu_bench(n: usize, seconds: u64) {
    use margay::bfd::{spawn, BfdPeer, BfdPorts, Timers};
    use std::net::IpAddr;
    use std::sync::mpsc as smpsc;
    let free = || {
        std::net::UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (pa, pb) = (free(), free());
    let timers = Timers {
        desired_min_tx: Duration::from_millis(100),
        required_min_rx: Duration::from_millis(100),
        detect_mult: 3,
    };
    let addr = |net: u8, i: usize| {
        IpAddr::V4(Ipv4Addr::new(
            127,
            net,
            (i / 250) as u8,
            (i % 250 + 1) as u8,
        ))
    };
    // Side `me` talks from 127.<me>.x.y to 127.<other>.x.y.
    let side = |me: u8,
                other: u8,
                listen: u16,
                to: u16,
                report: smpsc::Sender<(i32, usize)>,
                stop: smpsc::Receiver<()>| {
        std::thread::spawn(move || {
            let tid = nix::unistd::gettid().as_raw();
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let (tx, mut rx) = tokio::sync::mpsc::channel(4096);
                let h = spawn(
                    BfdPorts {
                        listen_single_hop: listen,
                        listen_multihop: free(),
                        peer_single_hop: to,
                        peer_multihop: 1,
                    },
                    tx,
                );
                let peers = (0..n)
                    .map(|i| BfdPeer {
                        peer: addr(other, i),
                        local: Some(addr(me, i)),
                        multihop: false,
                        timers,
                    })
                    .collect();
                h.apply(peers).await.unwrap();
                tokio::spawn(async move { while rx.recv().await.is_some() {} });
                loop {
                    let up = h
                        .status()
                        .await
                        .unwrap()
                        .iter()
                        .filter(|b| b.state == "Up")
                        .count();
                    report.send((tid, up)).unwrap();
                    if stop.try_recv().is_ok() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
        })
    };
    let (ra_tx, ra) = smpsc::channel();
    let (rb_tx, rb) = smpsc::channel();
    let (sa_tx, sa) = smpsc::channel();
    let (sb_tx, sb) = smpsc::channel();
    let ta = side(2, 3, pa, pb, ra_tx, sa);
    let tb = side(3, 2, pb, pa, rb_tx, sb);
    let t = Instant::now();
    let (tid_a, tid_b) = loop {
        let (ta_id, up_a) = ra.recv().unwrap();
        let (tb_id, up_b) = rb.recv().unwrap();
        if up_a == n && up_b == n {
            break (ta_id, tb_id);
        }
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "only {up_a}/{up_b} of {n} sessions Up"
        );
    };
    eprintln!(
        "{n} sessions Up on both sides after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    // Let the Poll Sequences settle, then measure.
    std::thread::sleep(Duration::from_secs(2));
    let (a0, b0, w0) = (thread_cpu(tid_a), thread_cpu(tid_b), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (a1, b1, wall) = (
        thread_cpu(tid_a),
        thread_cpu(tid_b),
        w0.elapsed().as_secs_f64(),
    );
    let mut still_up = (0, 0);
    while let Ok((_, u)) = ra.try_recv() {
        still_up.0 = u;
    }
    while let Ok((_, u)) = rb.try_recv() {
        still_up.1 = u;
    }
    let _ = sa_tx.send(());
    let _ = sb_tx.send(());
    let _ = (ta.join(), tb.join());
    let (ca, cb) = ((a1 - a0) / wall * 100.0, (b1 - b0) / wall * 100.0);
    println!("bfd CPU, {n} sessions at 100 ms x 3 (each side sends {:.0} packets/s and receives as many)", n as f64 * 1000.0 / 87.5);
    println!("| side | CPU % of one core | sessions Up at the end |");
    println!("|---|---|---|");
    println!("| A | {ca:.1} | {} |", still_up.0);
    println!("| B | {cb:.1} | {} |", still_up.1);
}

fn main() {
    let mut cuts = 20usize;
    let args: Vec<String> = std::env::args().collect();
    if let Some(n) = arg::<usize>(&args, "--cpu-sessions") {
        cpu_bench(n, arg(&args, "--seconds").unwrap_or(10));
        return;
    }
    if let Some(i) = args.iter().position(|a| a == "--cuts") {
        cuts = args.get(i + 1).and_then(|v| v.parse().ok()).unwrap_or(cuts);
    }
    if !prerequisites("bfd bench", &["bird", "birdc", "etcdctl"]) {
        return;
    }
    let lab = Lab::up("mgbfd", 1, 0);
    let node = lab.node_ns(1);
    let tag = std::process::id() % 10000;
    let (peer, anchor) = (format!("bfdp{tag}"), format!("bfda{tag}"));
    let mut attached = Attached(Vec::new());
    attached.add(&lab, &peer, &format!("bp{tag}"), PEER_IP);
    attached.add(&lab, &anchor, &format!("ba{tag}"), ANCHOR_IP);

    let bfd = r#"protocol bfd { interface "*" { min rx interval 100 ms; min tx interval 100 ms; idle tx interval 1 s; multiplier 3; }; }"#;
    let timers = "hold time 240; connect retry time 1; error wait time 1, 2; bfd on;";
    let _peer_bird = Bird::start(
        &peer,
        &format!(
            "router id {PEER_IP};\nprotocol device {{}}\n{bfd}\nprotocol static {{ ipv4; route 203.0.113.0/24 unreachable; }}\n\
             protocol bgp margay {{ local {PEER_IP} as 65001; neighbor 10.99.0.11 as 64512; {timers} ipv4 {{ import none; export all; }}; }}\n\
             protocol bgp anchor {{ local {PEER_IP} as 65001; neighbor {ANCHOR_IP} as 65005; {timers} ipv4 {{ import none; export all; }}; }}\n"
        ),
    );
    let anchor_bird = Bird::start(
        &anchor,
        &format!(
            "router id {ANCHOR_IP};\nprotocol device {{}}\nprotocol kernel {{ ipv4 {{ export all; }}; }}\n{bfd}\n\
             protocol bgp peer {{ local {ANCHOR_IP} as 65005; neighbor {PEER_IP} as 65001; {timers} ipv4 {{ import all; export none; }}; }}\n"
        ),
    );
    let peer_json = format!(
        r#"{{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{{"name":"tor","annotations":{{"margay.io/bfd":"true","margay.io/bfd-min-rx":"100ms","margay.io/bfd-min-tx":"100ms","margay.io/bfd-multiplier":"3"}}}},"spec":{{"peerIP":"{PEER_IP}","asNumber":65001}}}}"#
    );
    let ok = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{}-etcd", lab.name),
            "etcdctl",
            "--endpoints",
            LAB_ETCD,
            "put",
        ])
        .arg("/calico/resources/v3/projectcalico.org/bgppeers/tor")
        .arg(&peer_json)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "etcdctl put BGPPeer");

    let margay_mon = RouteMonitor::start(&node);
    let anchor_mon = RouteMonitor::start(&anchor);
    let (mut m, mut b) = (Vec::new(), Vec::new());
    for i in 0..cuts {
        wait(
            "both detectors to hold the route with BFD Up",
            Duration::from_secs(120),
            || {
                has_route(&node)
                    && has_route(&anchor)
                    && margay_bfd_up(&node)
                    && anchor_bird
                        .birdc("show bfd sessions")
                        .lines()
                        .any(|l| l.contains(PEER_IP) && l.contains(" Up "))
            },
        );
        // Let the Poll Sequence for the fast rate settle (RFC 5880 6.8.3) before cutting.
        std::thread::sleep(Duration::from_millis(500));
        while margay_mon.events.try_recv().is_ok() {}
        while anchor_mon.events.try_recv().is_ok() {}
        let t0 = Instant::now();
        ip(&format!("-n {peer} link set eth0 down"));
        let dm = deleted_after(&margay_mon, t0);
        let db = deleted_after(&anchor_mon, t0);
        eprintln!(
            "cut {:2}: margay {:6.1} ms   BIRD {:6.1} ms",
            i + 1,
            dm.as_secs_f64() * 1e3,
            db.as_secs_f64() * 1e3
        );
        m.push(dm);
        b.push(db);
        ip(&format!("-n {peer} link set eth0 up"));
    }
    m.sort();
    b.sort();
    println!("bfd detection, link cut -> kernel route deleted, 100 ms x 3, {cuts} cuts");
    println!("| detector | p50 ms | p99 ms | max ms |");
    println!("|---|---|---|---|");
    for (name, v) in [("margay node", &m), ("BIRD 2 (anchor)", &b)] {
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} |",
            pct(v, 0.5),
            pct(v, 0.99),
            v.last().map(|d| d.as_secs_f64() * 1e3).unwrap_or(f64::NAN)
        );
    }
    println!("ratio p50 margay/BIRD: {:.2}", pct(&m, 0.5) / pct(&b, 0.5));
}
