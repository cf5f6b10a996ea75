//! CNI ADD latency of margay's CNI path (the `margay-cni` process, the socket round trip, the server) beside
//! the reference `bridge` + `host-local` plugins doing a full ADD, in the same run.
//!
//! margay's backend here does no work (an in-memory allocator): the figure is the cost the shim and the
//! server add on top of IPAM and pod plumbing, i.e. the floor of a margay ADD. The anchor does everything
//! (veth, bridge, host-local's file-locked allocation) and is what a node pays for a plain CNI ADD.
//!
//! ```text
//!   bench process (inside node netns mgt<pid>bn) ──exec──▶ margay-cni ──socket──▶ CniServer(NullBackend)
//!                                                ──exec──▶ bridge ──exec──▶ host-local
//!   pods: mgt<pid>b<i> network namespaces, one per ADD (deleted at the end)
//! ```
//!
//! `cargo bench --bench cni_shim -- [--pods 200] [--concurrent 100]` (root; needs /usr/lib/cni).

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::collections::HashSet;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use margay::cni::backend::{
    Attachment, CniBackend, DelRequest, GcRequest, PodRequest, StatusRequest,
};
use margay::cni::types::{cidr, CniError, Dns};
use margay::cni::{CniServer, ServerConfig};
use serde_json::{json, Value};

/// Hands out 10.80.x.y/32 from a counter; nothing else.
#[derive(Default)]
struct NullBackend {
    next: AtomicU32,
}

impl CniBackend for NullBackend {
    async fn add(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let n = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let ip = Ipv4Addr::new(10, 80, (n >> 8) as u8, n as u8);
        Ok(Attachment {
            host_ifname: format!("mg{n:011x}"),
            host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
            pod_ifname: req.ifname,
            pod_mac: None,
            mtu: None,
            ips: vec![cidr::host(ip.into())],
            routes: vec![],
            dns: Dns::default(),
        })
    }
    async fn del(&self, _req: DelRequest) -> Result<(), CniError> {
        Ok(())
    }
    async fn check(&self, _req: PodRequest) -> Result<Attachment, CniError> {
        Err(CniError::internal("not in this benchmark"))
    }
    async fn status(&self, _req: StatusRequest) -> Result<(), CniError> {
        Ok(())
    }
    async fn gc(&self, _req: GcRequest) -> Result<(), CniError> {
        Ok(())
    }
}

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

/// Namespaces deleted on drop, also on panic.
struct Namespaces(Vec<String>);
impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.0 {
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
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME=p",
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
    let v = serde_json::from_slice(&out.stdout).expect("result JSON");
    (took, v)
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

struct Row {
    what: &'static str,
    p50: f64,
    p99: f64,
    max: f64,
}

fn sequential(bin: &str, conf: &str, pods: &[String], tag: &str) -> Row {
    let mut times: Vec<Duration> = pods
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
    times.sort();
    Row {
        what: "",
        p50: pct(&times, 0.50),
        p99: pct(&times, 0.99),
        max: pct(&times, 1.0),
    }
}

/// `n` ADDs released at once; returns (wall time, distinct addresses).
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

fn main() {
    let mut pods_n = 200usize;
    let mut conc_n = 100usize;
    let args: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--pods" => {
                pods_n = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(pods_n);
                i += 1;
            }
            "--concurrent" => {
                conc_n = args
                    .get(i + 1)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(conc_n);
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    if !nix::unistd::Uid::effective().is_root()
        || !std::path::Path::new("/usr/lib/cni/bridge").exists()
    {
        eprintln!(
            "cni_shim bench: needs root and containernetworking-plugins (/usr/lib/cni); skipped"
        );
        return;
    }
    let pid = std::process::id() % 100000;
    let node = format!("mgt{pid}bn");
    let total = pods_n.max(conc_n);
    let mut names = vec![node.clone()];
    names.extend((0..2 * total).map(|i| format!("mgt{pid}b{i}")));
    let mut guard = Namespaces(Vec::new());
    for n in &names {
        assert!(sh(&format!("ip netns add {n}")), "ip netns add {n}");
        guard.0.push(n.clone());
    }
    // The whole benchmark runs in the node namespace: the bridge plugin's bridge and veths land there, and
    // every child process inherits it without `ip netns exec` (which would add its own cost).
    let f = std::fs::File::open(format!("/var/run/netns/{node}")).expect("open node netns");
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns node");
    sh("ip link set lo up");

    let dir = tempfile::tempdir().expect("tempdir");
    let socket: PathBuf = dir.path().join("cni.sock");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let server = {
        let _g = rt.enter();
        CniServer::bind(
            ServerConfig {
                socket: socket.clone(),
                ..Default::default()
            },
            Arc::new(NullBackend::default()),
        )
        .expect("bind")
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server_task = rt.spawn(server.run(async {
        let _ = stopped.await;
    }));

    let margay_conf = json!({"cniVersion": "1.0.0", "name": "bench", "type": "margay",
                             "socket": socket.to_string_lossy()})
    .to_string();
    let bridge_conf = |data: &str| {
        json!({"cniVersion": "1.0.0", "name": "bench", "type": "bridge", "bridge": "mgtbr0",
               "isGateway": true, "ipam": {"type": "host-local", "subnet": "10.81.0.0/16",
               "dataDir": dir.path().join(data).to_string_lossy()}})
        .to_string()
    };
    let shim = env!("CARGO_BIN_EXE_margay-cni");
    let pods: Vec<String> = names[1..].to_vec();

    // Warm the page cache for both binaries so the first ADD is not a disk read.
    add(shim, "warm", "/var/run/netns/none", &margay_conf);

    let mut m = sequential(shim, &margay_conf, &pods[..pods_n], "m");
    m.what = "margay-cni + socket + server (no-op backend)";
    let mut b = sequential(
        "/usr/lib/cni/bridge",
        &bridge_conf("seq"),
        &pods[..pods_n],
        "b",
    );
    b.what = "reference bridge + host-local (full ADD)";
    let (mw, md) = concurrent(shim, &margay_conf, &pods[pods_n..pods_n + conc_n], "mc");
    let (bw, bd) = concurrent(
        "/usr/lib/cni/bridge",
        &bridge_conf("conc"),
        &pods[total..total + conc_n],
        "bc",
    );

    println!("CNI ADD, {pods_n} sequential (ms):");
    println!("| path | p50 | p99 | max |");
    println!("|---|---|---|---|");
    for r in [&m, &b] {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} |",
            r.what, r.p50, r.p99, r.max
        );
    }
    println!();
    println!("{conc_n} concurrent ADDs:");
    println!("| path | wall (ms) | distinct addresses |");
    println!("|---|---|---|");
    println!(
        "| margay-cni + socket + server (no-op backend) | {:.1} | {md}/{conc_n} |",
        mw.as_secs_f64() * 1000.0
    );
    println!(
        "| reference bridge + host-local | {:.1} | {bd}/{conc_n} |",
        bw.as_secs_f64() * 1000.0
    );

    let _ = stop.send(());
    let _ = rt.block_on(server_task);
    drop(guard);
}
