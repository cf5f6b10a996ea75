//! `margay node` in the lab: the full CNI ADD (margay-cni, socket, etcd IPAM, pod plumbing, advertisement)
//! beside the reference `bridge` + `host-local` plugins in the same run, and the time from a pod ADD on node
//! A to its new block's route in node B's kernel FIB.
//!
//! ```text
//!   margay lab (2 nodes, etcd)      n1 10.99.0.11 ◀──iBGP──▶ n2 10.99.0.12
//!   bench process ──exec──▶ margay-cni ──n1's socket──▶ margay node (n1): IPAM in etcd, veth into mgb<pid>p<i>
//!   bench thread in netns mgb<pid>ref ──exec──▶ bridge ──exec──▶ host-local (the anchor, same pods count)
//!   propagation: pool bench-prop (blockSize 32: every ADD claims a new block) ─▶ n1 advertises it ─▶
//!                `ip -ts monitor route` in n2 stamps the route's arrival; latency = arrival - ADD start
//! ```
//!
//! `sudo cargo bench --bench node_lab -- [--pods 200] [--concurrent 100] [--blocks 50]`
//! (root; etcd, iproute2, containernetworking-plugins in /usr/lib/cni).

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
const SHIM: &str = env!("CARGO_BIN_EXE_margay-cni");
const ETCD: &str = "http://10.99.0.2:2379";

fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The lab and the bench's namespaces, removed on drop (also on panic).
struct Cleanup {
    lab: String,
    state: std::path::PathBuf,
    namespaces: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = Command::new(MARGAY)
            .args(["lab", "down", "--name", &self.lab, "--state-dir"])
            .arg(&self.state)
            .stdout(Stdio::null())
            .status();
        for n in &self.namespaces {
            sh(&format!("ip netns del {n}"));
        }
    }
}

/// Run one plugin as a runtime does; returns (elapsed, result JSON).
fn add(bin: &str, container: &str, netns: &str, conf: &str) -> (Duration, Value) {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {bin}: {e}"));
    if let Some(mut i) = child.stdin.take() {
        let _ = i.write_all(conf.as_bytes());
    }
    let out = child.wait_with_output().expect("plugin output");
    let took = start.elapsed();
    assert!(
        out.status.success(),
        "{bin} ADD {container} failed: {} {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (
        took,
        serde_json::from_slice(&out.stdout).expect("result JSON"),
    )
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

fn sequential(bin: &str, conf: &str, pods: &[String], tag: &str) -> Vec<Duration> {
    let mut t: Vec<Duration> = pods
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            add(
                bin,
                &format!("{tag}{i}"),
                &format!("/var/run/netns/{ns}"),
                conf,
            )
            .0
        })
        .collect();
    t.sort();
    t
}

/// `pods.len()` ADDs released at once; returns (wall time, distinct addresses).
fn concurrent(bin: &str, conf: &str, pods: &[String], tag: &str) -> (Duration, usize) {
    let barrier = Arc::new(Barrier::new(pods.len() + 1));
    let handles: Vec<_> = pods
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let (b, bin, conf, ns) = (
                barrier.clone(),
                bin.to_string(),
                conf.to_string(),
                ns.clone(),
            );
            let id = format!("{tag}{i}");
            std::thread::spawn(move || {
                b.wait();
                let (_, v) = add(&bin, &id, &format!("/var/run/netns/{ns}"), &conf);
                v["ips"][0]["address"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let ips: Vec<String> = handles
        .into_iter()
        .map(|h| h.join().expect("thread"))
        .collect();
    let wall = start.elapsed();
    let distinct: HashSet<&String> = ips.iter().collect();
    (wall, distinct.len())
}

/// `[2026-11-22T06:41:06.264443] 10.250.0.5 via ...` (UTC, `ip -ts monitor` under TZ=UTC) -> seconds since
/// the epoch, and the destination.
fn parse_monitor(line: &str) -> Option<(f64, String)> {
    let rest = line.strip_prefix('[')?;
    let (ts, route) = rest.split_once("] ")?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let mut t = time.split(':');
    let (h, mi, s) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    let secs = days as f64 * 86400.0 + h * 3600.0 + mi * 60.0 + s;
    let dst = route.split_whitespace().next()?.to_string();
    Some((secs, dst))
}

fn main() {
    let mut pods_n = 200usize;
    let mut conc_n = 100usize;
    let mut blocks_n = 50usize;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        let v = args.get(i + 1).and_then(|v| v.parse().ok());
        match args[i].as_str() {
            "--pods" => pods_n = v.unwrap_or(pods_n),
            "--concurrent" => conc_n = v.unwrap_or(conc_n),
            "--blocks" => blocks_n = v.unwrap_or(blocks_n),
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    if !nix::unistd::Uid::effective().is_root()
        || !std::path::Path::new("/usr/lib/cni/bridge").exists()
        || !sh("command -v etcd")
    {
        eprintln!("node_lab bench: needs root, etcd and containernetworking-plugins (/usr/lib/cni); skipped");
        return;
    }
    let pid = std::process::id() % 1000;
    let lab = format!("mgb{pid}");
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("lab");
    let mut cleanup = Cleanup {
        lab: lab.clone(),
        state: state.clone(),
        namespaces: Vec::new(),
    };
    let up = Command::new(MARGAY)
        .args([
            "lab",
            "up",
            "--nodes",
            "2",
            "--pods",
            "0",
            "--name",
            &lab,
            "--state-dir",
        ])
        .arg(&state)
        .output()
        .expect("margay lab up");
    assert!(
        up.status.success(),
        "lab up: {}{}",
        String::from_utf8_lossy(&up.stdout),
        String::from_utf8_lossy(&up.stderr)
    );
    let (n1, n2) = (format!("{lab}-n1"), format!("{lab}-n2"));
    let socket = state.join(&n1).join("cni.sock");

    // Namespaces: margay sequential, margay concurrent, anchor sequential, anchor concurrent, propagation.
    let total = pods_n + conc_n;
    let reference = format!("{lab}ref");
    let mut names = vec![reference.clone()];
    // margay's pods, the anchor's pods, the propagation pods.
    names.extend((0..2 * total + blocks_n).map(|i| format!("{lab}p{i}")));
    for n in &names {
        assert!(sh(&format!("ip netns add {n}")), "ip netns add {n}");
        cleanup.namespaces.push(n.clone());
    }
    sh(&format!("ip -n {reference} link set lo up"));
    let pods: Vec<String> = names[1..].to_vec();

    let margay_conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "margay",
                             "socket": socket.to_string_lossy()})
    .to_string();
    let bridge_conf = |data: &str| {
        json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "mgbbr0",
               "isGateway": true, "ipam": {"type": "host-local", "subnet": "10.81.0.0/16",
               "dataDir": dir.path().join(data).to_string_lossy()}})
        .to_string()
    };

    // margay: the bench process runs margay-cni directly (the socket is a path; the daemon plumbs in n1).
    let m_seq = sequential(SHIM, &margay_conf, &pods[..pods_n], "m");
    let (m_wall, m_distinct) = concurrent(SHIM, &margay_conf, &pods[pods_n..pods_n + conc_n], "mc");

    // The anchor, from a thread inside the reference node namespace (its children inherit it).
    let (b_seq, (b_wall, b_distinct)) = {
        let (pods, reference) = (pods.clone(), reference.clone());
        let conf_seq = bridge_conf("seq");
        let conf_conc = bridge_conf("conc");
        let total_ = total;
        std::thread::spawn(move || {
            let f = std::fs::File::open(format!("/var/run/netns/{reference}")).expect("open netns");
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            let seq = sequential(
                "/usr/lib/cni/bridge",
                &conf_seq,
                &pods[total_..total_ + pods_n],
                "b",
            );
            let conc = concurrent(
                "/usr/lib/cni/bridge",
                &conf_conc,
                &pods[total_ + pods_n..2 * total_],
                "bc",
            );
            (seq, conc)
        })
        .join()
        .expect("anchor thread")
    };

    // Propagation: a pool of /32 blocks, so every ADD claims a new block; n2's route monitor stamps arrivals.
    let pool = "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: bench-prop\nspec:\n  cidr: 10.250.0.0/16\n  blockSize: 32\n";
    let mut apply = Command::new("ip")
        .args([
            "netns",
            "exec",
            &n1,
            MARGAY,
            "apply",
            "-f",
            "-",
            "--etcd-endpoints",
            ETCD,
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("margay apply");
    apply
        .stdin
        .take()
        .expect("stdin")
        .write_all(pool.as_bytes())
        .expect("pool");
    assert!(
        apply.wait().expect("apply").success(),
        "apply bench-prop pool"
    );
    std::thread::sleep(Duration::from_millis(500));
    let mut monitor = Command::new("ip")
        .args(["-ts", "-n", &n2, "monitor", "route"])
        .env("TZ", "UTC")
        .stdout(Stdio::piped())
        .spawn()
        .expect("ip monitor");
    let stdout = monitor.stdout.take().expect("monitor stdout");
    let (tx, rx) = std::sync::mpsc::channel::<(f64, String)>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(ev) = parse_monitor(&line) {
                if tx.send(ev).is_err() {
                    break;
                }
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let prop_conf = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "margay",
                           "socket": socket.to_string_lossy(), "ipv4_pools": ["bench-prop"]})
    .to_string();
    let base = 2 * total;
    let mut prop: Vec<Duration> = Vec::new();
    let mut missed = 0;
    for k in 0..blocks_n {
        let start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock")
            .as_secs_f64();
        let (_, v) = add(
            SHIM,
            &format!("prop{k}"),
            &format!("/var/run/netns/{}", pods[base + k]),
            &prop_conf,
        );
        let ip = v["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut seen = None;
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok((t, dst)) if dst == ip || dst == format!("{ip}/32") => {
                    seen = Some(t);
                    break;
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        match seen {
            Some(t) => prop.push(Duration::from_secs_f64((t - start).max(0.0))),
            None => missed += 1,
        }
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
    prop.sort();

    println!("margay node in the lab (2 nodes, etcd), {pods_n} sequential CNI ADDs (ms):");
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for (what, t) in [
        (
            "margay-cni + margay node (etcd IPAM, veth, advertisement)",
            &m_seq,
        ),
        ("reference bridge + host-local", &b_seq),
    ] {
        println!(
            "| {what} | {:.2} | {:.2} | {:.2} |",
            pct(t, 0.5),
            pct(t, 0.99),
            pct(t, 1.0)
        );
    }
    println!();
    println!("{conc_n} concurrent ADDs:");
    println!("| path | wall (ms) | distinct addresses |");
    println!("|---|---|---|");
    println!(
        "| margay-cni + margay node | {:.0} | {m_distinct}/{conc_n} |",
        m_wall.as_secs_f64() * 1000.0
    );
    println!(
        "| reference bridge + host-local | {:.0} | {b_distinct}/{conc_n} |",
        b_wall.as_secs_f64() * 1000.0
    );
    println!();
    if prop.is_empty() {
        println!("pod ADD on n1 -> new block's route in n2's FIB: no sample ({missed} missed)");
    } else {
        println!(
            "pod ADD on n1 (new /32 block each) -> route in n2's FIB, {} samples ({missed} not seen within 5 s): p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            prop.len(),
            pct(&prop, 0.5),
            pct(&prop, 0.99),
            pct(&prop, 1.0)
        );
    }
    drop(cleanup);
}
