//! A big lab, measured: `margay lab up --nodes N --pods 1` with the full iBGP mesh and with two route
//! reflectors, real `margay node run` processes (this build's release binary) in network namespaces.
//!
//! ```text
//!   netns <lab>-br: br0 10.99.0.1/16 (permanent neighbours; see src/lab/up.rs)
//!     |-- <lab>-etcd  10.99.0.2     etcd (its own /metrics read too, as a cross-check)
//!     |-- <lab>-rr    10.99.0.3  ┐  margay reflector x2 (--reflectors 2 only; one cluster id,
//!     |-- <lab>-rr2   10.99.0.4  ┘  every node peers with both)
//!     `-- <lab>-n1..N 10.99.0.11+   margay node run, one pod each (so one /26 block each)
//!   mesh: N(N-1)/2 sessions; reflectors: 2N (+1 between the reflectors)
//! ```
//!
//! Per run, in this order:
//! - **convergence**: from the start of `margay lab up` until every node's kernel holds every node's block
//!   (N IPv4 /26 routes of protocol 77 in each node namespace: its own blackhole and N-1 learned), counted
//!   by a netlink route dump in each namespace every 200 ms; also the time at which the last block was
//!   claimed (the last node's own blackhole appeared), so the BGP part shows apart from the start-up;
//! - **memory**: after `--settle` seconds idle, VmRSS (and its anonymous part, RssAnon: VmRSS also counts
//!   the binary's pages, which every process maps) of every node, median and max, and of each reflector;
//! - **etcd at idle**: `margay_etcd_requests_total` of every daemon's /metrics summed, over `--idle`
//!   seconds; beside it etcd's own count of requests (`grpc_server_handled_total` of the KV and Lease
//!   services), which sees any client, margay-cni and margay CLI included;
//! - **a node joining**: `margay lab add-node` (one more `margay node run`, no pod): the time until its
//!   kernel holds all N blocks, its own etcd requests, the others' summed (target: none, the watch pushes
//!   the new Node), and etcd's count over the same window.
//!
//! `cargo bench --bench lab_scale -- [--nodes 50,100] [--topologies mesh,rr2] [--runs 3] [--settle 10]
//! [--idle 30]` (root; etcd). Prints one Markdown row per run and the medians.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

#[path = "node_lab/mod.rs"]
mod node_lab;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_REQUEST,
};
use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use node_lab::{prerequisites, MARGAY};

const NODE_HTTP: &str = "127.0.0.1:9190";
const ETCD_METRICS: &str = "10.99.0.2:2379";

fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn list(name: &str, default: &str) -> Vec<String> {
    arg(name, default.to_string())
        .split(',')
        .map(str::to_string)
        .collect()
}

/// A route dump socket opened inside a namespace (it stays bound to it).
struct RouteCounter {
    sock: Socket,
    seq: u32,
}

impl RouteCounter {
    fn open(ns: &str) -> Option<RouteCounter> {
        let path = format!("/var/run/netns/{ns}");
        std::thread::scope(|s| {
            s.spawn(|| {
                let f = std::fs::File::open(&path).ok()?;
                nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
                let mut sock = Socket::new(NETLINK_ROUTE).ok()?;
                sock.bind_auto().ok()?;
                sock.connect(&SocketAddr::new(0, 0)).ok()?;
                Some(RouteCounter { sock, seq: 0 })
            })
            .join()
            .ok()
            .flatten()
        })
    }

    /// IPv4 /26 routes of protocol 77 in the pool 10.244.0.0/16: (own blackholes, learned).
    fn count(&mut self) -> (usize, usize) {
        self.seq += 1;
        let mut rm = RouteMessage::default();
        rm.header.address_family = AddressFamily::Inet;
        let mut hdr = NetlinkHeader::default();
        hdr.flags = NLM_F_REQUEST | NLM_F_DUMP;
        hdr.sequence_number = self.seq;
        let mut msg = NetlinkMessage::new(
            hdr,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(rm)),
        );
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.serialize(&mut buf);
        if self.sock.send(&buf, 0).is_err() {
            return (0, 0);
        }
        let (mut own, mut learned) = (0, 0);
        let mut rx = vec![0u8; 1 << 20];
        loop {
            let n = match self.sock.recv(&mut &mut rx[..], 0) {
                Ok(n) => n,
                Err(_) => return (own, learned),
            };
            let mut off = 0;
            while off + 16 <= n {
                let len =
                    u32::from_ne_bytes([rx[off], rx[off + 1], rx[off + 2], rx[off + 3]]) as usize;
                let kind = u16::from_ne_bytes([rx[off + 4], rx[off + 5]]);
                if len < 16 || off + len > n {
                    break;
                }
                if kind == 3 || kind == 2 {
                    // NLMSG_DONE / NLMSG_ERROR: the dump is over.
                    return (own, learned);
                }
                if let Ok(m) =
                    NetlinkMessage::<RouteNetlinkMessage>::deserialize(&rx[off..off + len])
                {
                    if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) =
                        m.payload
                    {
                        let in_pool = r.attributes.iter().any(|a| {
                            matches!(a, RouteAttribute::Destination(RouteAddress::Inet(d))
                                if d.octets()[0] == 10 && d.octets()[1] == 244)
                        });
                        if u8::from(r.header.protocol) == 77
                            && r.header.destination_prefix_length == 26
                            && in_pool
                        {
                            if u8::from(r.header.kind) == 6 {
                                own += 1; // RTN_BLACKHOLE: this node's own block
                            } else {
                                learned += 1;
                            }
                        }
                    }
                }
                off += (len + 3) & !3;
            }
        }
    }
}

/// GET `path` from `addr` inside namespace `ns` (a short-lived thread enters it).
fn http_in(ns: &str, addr: &str, path: &str) -> Option<String> {
    let nsf = format!("/var/run/netns/{ns}");
    std::thread::scope(|s| {
        s.spawn(|| {
            let f = std::fs::File::open(&nsf).ok()?;
            nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).ok()?;
            let mut c =
                TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
            c.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
            write!(
                c,
                "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
            )
            .ok()?;
            let mut out = String::new();
            c.read_to_string(&mut out).ok()?;
            Some(out)
        })
        .join()
        .ok()
        .flatten()
    })
}

/// The value of a Prometheus sample line starting with `name` (first match; labels included in `name`).
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.split_whitespace().next() == Some(name))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// etcd's own count of unary requests (KV and Lease services), by method.
fn etcd_requests(lab: &str) -> BTreeMap<String, f64> {
    let text = http_in(&format!("{lab}-etcd"), ETCD_METRICS, "/metrics").unwrap_or_default();
    let mut by = BTreeMap::new();
    for l in text
        .lines()
        .filter(|l| l.starts_with("grpc_server_handled_total{"))
    {
        let service = l
            .split("grpc_service=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("");
        if !(service.ends_with(".KV") || service.ends_with(".Lease")) {
            continue;
        }
        let method = l
            .split("grpc_method=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("?")
            .to_string();
        let v: f64 = l
            .split_whitespace()
            .last()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *by.entry(method).or_insert(0.0) += v;
    }
    by
}

fn total(m: &BTreeMap<String, f64>) -> f64 {
    m.values().sum()
}

fn delta(a: &BTreeMap<String, f64>, b: &BTreeMap<String, f64>) -> String {
    let parts: Vec<String> = b
        .iter()
        .filter_map(|(k, v)| {
            let d = v - a.get(k).copied().unwrap_or(0.0);
            (d > 0.0).then(|| format!("{k} {d}"))
        })
        .collect();
    if parts.is_empty() {
        "none".into()
    } else {
        parts.join(", ")
    }
}

/// margay_etcd_requests_total of the daemon in `ns` (nodes and reflectors serve it on the same port).
fn margay_requests(ns: &str) -> Option<f64> {
    let text = http_in(ns, NODE_HTTP, "/metrics")?;
    metric(&text, "margay_etcd_requests_total")
}

fn rss_kib(pid: i32) -> (f64, f64) {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |f: &str| -> f64 {
        s.lines()
            .find_map(|l| l.strip_prefix(f))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(f64::NAN)
    };
    (field("VmRSS:"), field("RssAnon:"))
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

fn pid_of(state: &std::path::Path, name: &str) -> Option<i32> {
    std::fs::read_to_string(state.join(format!("{name}.pid")))
        .ok()
        .and_then(|p| p.trim().parse().ok())
}

/// `margay lab down`, also when the run panics.
struct Down(String);

impl Drop for Down {
    fn drop(&mut self) {
        let _ = Command::new(MARGAY)
            .args(["lab", "down", "--name", &self.0])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

#[derive(Debug, Default, Clone)]
struct Run {
    /// lab up start -> every node holds every block.
    converged_s: f64,
    /// lab up start -> the last node's own block exists.
    last_block_s: f64,
    rss_median_mib: f64,
    rss_max_mib: f64,
    anon_median_mib: f64,
    rr_rss_mib: Vec<f64>,
    idle_margay_per_s: f64,
    idle_etcd_per_s: f64,
    join_converged_s: f64,
    join_own: f64,
    join_others: f64,
    join_etcd: f64,
    join_etcd_methods: String,
}

fn one_run(n: usize, reflectors: usize, run: usize, settle: u64, idle: u64) -> Run {
    let name = format!("ls{}{}", std::process::id() % 1000, run);
    let state = PathBuf::from("/run/margay-lab").join(&name);
    let _down = Down(name.clone());
    let t0 = Instant::now();
    let mut up = Command::new(MARGAY);
    up.args(["lab", "up", "--name", &name, "--nodes"])
        .arg(n.to_string())
        .args(["--pods", "1"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if reflectors > 0 {
        up.arg("--reflectors").arg(reflectors.to_string());
    }
    let mut child = up.spawn().expect("margay lab up");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let mut counters: Vec<Option<RouteCounter>> = (0..n).map(|_| None).collect();
    let mut has_block = vec![false; n];
    let mut last_block = None;
    let mut converged = None;
    let mut exited = None;
    while t0.elapsed() < Duration::from_secs(900) {
        if exited.is_none() {
            if let Ok(Some(st)) = child.try_wait() {
                exited = Some(st);
            }
        }
        let mut done = 0;
        for i in 0..n {
            let ns = format!("{name}-n{}", i + 1);
            if counters[i].is_none()
                && std::path::Path::new(&format!("/var/run/netns/{ns}")).exists()
            {
                counters[i] = RouteCounter::open(&ns);
            }
            if let Some(c) = counters[i].as_mut() {
                let (own, learned) = c.count();
                if own > 0 && !has_block[i] {
                    has_block[i] = true;
                    if has_block.iter().all(|b| *b) {
                        last_block = Some(t0.elapsed());
                    }
                }
                if own + learned >= n {
                    done += 1;
                }
            }
        }
        if done == n && converged.is_none() {
            converged = Some(t0.elapsed());
        }
        if converged.is_some() && exited.is_some() {
            break;
        }
        if let Some(st) = exited {
            if !st.success() {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let status = match exited {
        Some(s) => s,
        None => child.wait().expect("lab up"),
    };
    let stdout_text = reader.join().unwrap_or_default();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        status.success(),
        "margay lab up --nodes {n} failed (logs in {}):\n{}\n{err}",
        state.display(),
        stdout_text
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let converged = converged.unwrap_or_else(|| {
        panic!(
            "{n} nodes: not every node holds every block after 900 s (logs in {})",
            state.display()
        )
    });
    if let Some(l) = stdout_text.lines().find(|l| l.starts_with("lab \"")) {
        eprintln!("  {l}");
    }

    std::thread::sleep(Duration::from_secs(settle));
    let nodes: Vec<String> = (1..=n).map(|i| format!("{name}-n{i}")).collect();
    let rrs: Vec<String> = (0..reflectors)
        .map(|k| {
            if k == 0 {
                format!("{name}-rr")
            } else {
                format!("{name}-rr{}", k + 1)
            }
        })
        .collect();
    let (mut rss, mut anon): (Vec<f64>, Vec<f64>) = nodes
        .iter()
        .filter_map(|ns| pid_of(&state, ns))
        .map(rss_kib)
        .map(|(r, a)| (r / 1024.0, a / 1024.0))
        .unzip();
    let rss_max = rss.iter().cloned().fold(f64::NAN, f64::max);
    let rr_rss: Vec<f64> = rrs
        .iter()
        .filter_map(|ns| pid_of(&state, ns))
        .map(|p| rss_kib(p).0 / 1024.0)
        .collect();

    let daemons: Vec<String> = nodes.iter().chain(&rrs).cloned().collect();
    let sum_margay =
        |who: &[String]| -> f64 { who.iter().filter_map(|ns| margay_requests(ns)).sum() };
    let (m0, e0) = (sum_margay(&daemons), etcd_requests(&name));
    let ti = Instant::now();
    std::thread::sleep(Duration::from_secs(idle));
    let (m1, e1) = (sum_margay(&daemons), etcd_requests(&name));
    let secs = ti.elapsed().as_secs_f64();
    // Reading the counters is itself no etcd request; etcd's count includes nothing of ours either.
    let idle_margay = (m1 - m0) / secs;
    let idle_etcd = (total(&e1) - total(&e0)) / secs;

    // One node joins.
    let tj = Instant::now();
    let out = Command::new(MARGAY)
        .args(["lab", "add-node", "--name", &name])
        .env("RUST_LOG", "warn")
        .output()
        .expect("lab add-node");
    assert!(
        out.status.success(),
        "add-node: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let newcomer = format!("{name}-n{}", n + 1);
    let mut c = RouteCounter::open(&newcomer).expect("route socket in the new node");
    let join_conv = loop {
        let (own, learned) = c.count();
        if own + learned >= n {
            break tj.elapsed();
        }
        assert!(
            tj.elapsed() < Duration::from_secs(300),
            "{newcomer} did not learn the {n} blocks"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    // The others' share of the join settles with the watch event; give it the same settle time.
    std::thread::sleep(Duration::from_secs(settle));
    let m2 = sum_margay(&daemons);
    let own = margay_requests(&newcomer).unwrap_or(f64::NAN);
    let e2 = etcd_requests(&name);
    let r = Run {
        converged_s: converged.as_secs_f64(),
        last_block_s: last_block.map(|d| d.as_secs_f64()).unwrap_or(f64::NAN),
        rss_median_mib: median(&mut rss),
        rss_max_mib: rss_max,
        anon_median_mib: median(&mut anon),
        rr_rss_mib: rr_rss,
        idle_margay_per_s: idle_margay,
        idle_etcd_per_s: idle_etcd,
        join_converged_s: join_conv.as_secs_f64(),
        join_own: own,
        join_others: m2 - m1,
        join_etcd: total(&e2) - total(&e1),
        join_etcd_methods: delta(&e1, &e2),
    };
    drop(_down);
    r
}

fn main() {
    if !prerequisites("lab_scale", &[]) {
        return;
    }
    let sizes: Vec<usize> = list("--nodes", "50,100")
        .iter()
        .filter_map(|s| s.parse().ok())
        .collect();
    let topologies = list("--topologies", "mesh,rr2");
    let runs: usize = arg("--runs", 3);
    let settle: u64 = arg("--settle", 10);
    let idle: u64 = arg("--idle", 30);
    println!(
        "lab_scale: release margay ({MARGAY}), {runs} runs each, settle {settle} s, idle window {idle} s; load at start: {}",
        std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim()
    );
    println!("| topology | N | run | converged (s) | last block claimed (s) | node RSS median / max (MiB) | node RssAnon median (MiB) | reflector RSS (MiB) | etcd req/s idle (margay / etcd) | join: new node has all blocks (s) | join: new node's etcd req | join: others' etcd req | join: etcd's count (by method) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for topo in &topologies {
        let reflectors = match topo.as_str() {
            "mesh" => 0,
            t => t.trim_start_matches("rr").parse().unwrap_or(2),
        };
        for &n in &sizes {
            let mut all = Vec::new();
            for run in 0..runs {
                let r = one_run(n, reflectors, run, settle, idle);
                println!(
                    "| {topo} | {n} | {run} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {} | {:.2} / {:.2} | {:.2} | {} | {} | {} ({}) |",
                    r.converged_s,
                    r.last_block_s,
                    r.rss_median_mib,
                    r.rss_max_mib,
                    r.anon_median_mib,
                    r.rr_rss_mib.iter().map(|x| format!("{x:.1}")).collect::<Vec<_>>().join(", "),
                    r.idle_margay_per_s,
                    r.idle_etcd_per_s,
                    r.join_converged_s,
                    r.join_own,
                    r.join_others,
                    r.join_etcd,
                    r.join_etcd_methods
                );
                all.push(r);
            }
            let med = |f: &dyn Fn(&Run) -> f64| median(&mut all.iter().map(f).collect::<Vec<_>>());
            println!(
                "| **{topo} median** | {n} | {runs} | {:.1} | {:.1} | {:.1} / {:.1} | {:.1} | {:.1} | {:.2} / {:.2} | {:.2} | {} | {} | {} |",
                med(&|r| r.converged_s),
                med(&|r| r.last_block_s),
                med(&|r| r.rss_median_mib),
                med(&|r| r.rss_max_mib),
                med(&|r| r.anon_median_mib),
                med(&|r| r.rr_rss_mib.iter().cloned().fold(f64::NAN, f64::max)),
                med(&|r| r.idle_margay_per_s),
                med(&|r| r.idle_etcd_per_s),
                med(&|r| r.join_converged_s),
                med(&|r| r.join_own),
                med(&|r| r.join_others),
                med(&|r| r.join_etcd),
            );
        }
    }
    println!(
        "load at end: {}",
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
}
