//! What the node benchmarks share: a `margay lab` brought up for the run and taken down on drop (also on
//! panic), pod network namespaces that delete themselves, running a CNI plugin exactly as a runtime does,
//! a netlink route monitor inside a namespace, percentiles and VmRSS.
//!
//! Everything here runs the real binaries of this build (`CARGO_BIN_EXE_margay`, `CARGO_BIN_EXE_margay-cni`):
//! the lab's nodes are `margay node run` processes with etcd IPAM, BGP and the kernel dataplane.
#![allow(dead_code)]

use std::io::Write;
use std::net::Ipv4Addr;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use netlink_packet_core::{NetlinkMessage, NetlinkPayload};
use netlink_packet_route::route::{RouteAddress, RouteAttribute};
use netlink_packet_route::RouteNetlinkMessage;
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use serde_json::Value;

pub const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
pub const MARGAY_CNI: &str = env!("CARGO_BIN_EXE_margay-cni");
/// The lab's etcd, reachable from every lab namespace (see `src/lab.rs`).
pub const LAB_ETCD: &str = "http://10.99.0.2:2379";

/// Run a command quietly; true when it succeeded.
pub fn sh(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Root and the tools the lab needs; prints why not and returns false otherwise.
pub fn prerequisites(bench: &str, extra: &[&str]) -> bool {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("{bench}: needs root (network namespaces); skipped");
        return false;
    }
    for bin in ["ip", "etcd", "etcdctl", "ping"].iter().chain(extra) {
        if !sh(&format!("command -v {bin}")) && !std::path::Path::new(bin).exists() {
            eprintln!("{bench}: {bin} not found (scripts/install-deps.sh installs it); skipped");
            return false;
        }
    }
    true
}

/// A `margay lab` of `nodes` nodes, up for the benchmark, down on drop.
pub struct Lab {
    pub name: String,
    pub state: PathBuf,
}

impl Lab {
    /// `margay lab up --name <tag><pid> --nodes N --pods P`; panics with the lab's output if it fails.
    pub fn up(tag: &str, nodes: usize, pods: usize) -> Lab {
        Lab::up_with_env(tag, nodes, pods, &[])
    }

    /// `up` with extra environment for `margay lab up`, which its `margay node run` processes inherit
    /// (e.g. `MARGAY_IPV4POOL_BLOCK_SIZE` for the default pool the first node creates).
    pub fn up_with_env(tag: &str, nodes: usize, pods: usize, env: &[(&str, &str)]) -> Lab {
        let name = format!("{tag}{}", std::process::id() % 10000);
        let lab = Lab {
            state: PathBuf::from("/run/margay-lab").join(&name),
            name,
        };
        let out = Command::new(MARGAY)
            .args(["lab", "up", "--name", &lab.name, "--nodes"])
            .arg(nodes.to_string())
            .arg("--pods")
            .arg(pods.to_string())
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .output()
            .expect("run margay lab up");
        if !out.status.success() {
            panic!(
                "margay lab up --name {} failed (logs in {}):\n{}{}",
                lab.name,
                lab.state.display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        lab
    }

    /// Namespace of node `i` (1-based).
    pub fn node_ns(&self, i: usize) -> String {
        format!("{}-n{i}", self.name)
    }

    pub fn socket(&self, i: usize) -> PathBuf {
        self.state.join(self.node_ns(i)).join("cni.sock")
    }

    /// PID of node `i`'s `margay node run`.
    pub fn node_pid(&self, i: usize) -> i32 {
        let p = self.state.join(format!("{}.pid", self.node_ns(i)));
        std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or_else(|| panic!("no PID in {}", p.display()))
    }

    /// The CNI network configuration a runtime on node `i` would pass, plus `extra` fields.
    pub fn conf(&self, i: usize, extra: Value) -> String {
        let mut c = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "margay",
            "socket": self.socket(i),
            "mtu": 1500,
        });
        if let (Some(o), Value::Object(e)) = (c.as_object_mut(), extra) {
            o.extend(e);
        }
        c.to_string()
    }

    /// Wait (up to `limit`) until `margay status` on node `i` shows `peers` sessions Established; panics
    /// with the last status otherwise.
    pub fn wait_established(&self, i: usize, peers: usize, limit: Duration) {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < limit {
            let out = Command::new("ip")
                .args(["netns", "exec", &self.node_ns(i), MARGAY, "status"])
                .output();
            if let Ok(o) = out {
                last = String::from_utf8_lossy(&o.stdout).into_owned();
                if last.lines().filter(|l| l.contains("Established")).count() >= peers {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        panic!(
            "{}: {peers} sessions not Established after {limit:?}:\n{last}",
            self.node_ns(i)
        );
    }

    /// `margay <args>` run inside node `i`'s namespace (where the lab's etcd is reachable).
    pub fn margay_in(&self, i: usize, args: &[&str], stdin: &str) -> String {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.node_ns(i), MARGAY])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn margay");
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(stdin.as_bytes());
        }
        let out = child.wait_with_output().expect("margay output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "margay {args:?} failed: {text}");
        text
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(MARGAY)
            .args(["lab", "down", "--name", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Pod network namespaces `<prefix>0..n`, deleted on drop.
pub struct PodNamespaces(pub Vec<String>);

impl PodNamespaces {
    pub fn new(prefix: &str, n: usize) -> PodNamespaces {
        let mut g = PodNamespaces(Vec::new());
        let names: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
        // One `ip -batch` instead of n processes.
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        let mut child = Command::new("ip")
            .args(["-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("ip -batch");
        if let Some(mut s) = child.stdin.take() {
            let _ = s.write_all(batch.as_bytes());
        }
        assert!(
            child.wait().map(|s| s.success()).unwrap_or(false),
            "creating {n} pod namespaces {prefix}*"
        );
        g.0 = names;
        g
    }

    pub fn path(&self, i: usize) -> String {
        format!("/var/run/netns/{}", self.0[i])
    }
}

impl Drop for PodNamespaces {
    fn drop(&mut self) {
        let batch: String = self.0.iter().map(|n| format!("netns del {n}\n")).collect();
        if let Ok(mut child) = Command::new("ip")
            .args(["-force", "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
        {
            if let Some(mut s) = child.stdin.take() {
                let _ = s.write_all(batch.as_bytes());
            }
            let _ = child.wait();
        }
    }
}

/// Move the calling thread into the network namespace `ns` (threads and processes it starts inherit it).
pub fn enter_netns(ns: &str) {
    let f = std::fs::File::open(format!("/var/run/netns/{ns}"))
        .unwrap_or_else(|e| panic!("open netns {ns}: {e}"));
    nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
        .unwrap_or_else(|e| panic!("setns {ns}: {e}"));
}

/// Run `f` on a thread inside the network namespace `ns` (threads and processes it starts inherit it),
/// so that the bench process itself stays where it was: `margay lab down` kills every process whose
/// namespace is one of the lab's, and that must not be the benchmark.
pub fn in_netns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        let h = s.spawn(|| {
            enter_netns(ns);
            f()
        });
        match h.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        }
    })
}

/// Run a CNI plugin once as a runtime does (clean environment, CNI_* variables, the configuration on
/// stdin). Returns the wall time of the process and its result (or its error output).
pub fn cni(
    bin: &str,
    command: &str,
    container: &str,
    netns: &str,
    conf: &str,
) -> (Duration, Result<Value, String>) {
    let start = Instant::now();
    let mut child = Command::new(bin)
        .env_clear()
        .env("CNI_COMMAND", command)
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
    if !out.status.success() {
        return (
            took,
            Err(format!(
                "{bin} {command} {container}: {} {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
        );
    }
    if out.stdout.is_empty() {
        return (took, Ok(Value::Null));
    }
    (
        took,
        serde_json::from_slice(&out.stdout).map_err(|e| format!("result JSON: {e}")),
    )
}

/// The first IPv4 address of a CNI result.
pub fn result_ipv4(v: &Value) -> Option<Ipv4Addr> {
    v["ips"].as_array()?.iter().find_map(|ip| {
        ip["address"]
            .as_str()?
            .split('/')
            .next()?
            .parse::<Ipv4Addr>()
            .ok()
    })
}

/// Percentile `p` (0..=1) of sorted durations, in milliseconds (nearest rank).
pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}

/// VmRSS of a process in MiB (the kernel's kB / 1024).
pub fn vm_rss_mib(pid: i32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"));
    kb / 1024.0
}

/// One IPv4 route notification seen by a [`RouteMonitor`].
#[derive(Debug, Clone)]
pub struct RouteEvent {
    pub new: bool,
    pub dst: Ipv4Addr,
    pub prefix_len: u8,
    pub at: Instant,
}

/// A netlink socket subscribed to the IPv4 route group (RTNLGRP_IPV4_ROUTE) inside namespace `ns`, read by
/// its own thread, which timestamps each notification as it arrives. No polling.
pub struct RouteMonitor {
    pub events: mpsc::Receiver<RouteEvent>,
}

const RTNLGRP_IPV4_ROUTE: u32 = 7;

impl RouteMonitor {
    pub fn start(ns: &str) -> RouteMonitor {
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let ns = ns.to_string();
        std::thread::spawn(move || {
            enter_netns(&ns);
            let mut s = Socket::new(NETLINK_ROUTE).expect("netlink socket");
            s.bind_auto().expect("bind netlink");
            s.add_membership(RTNLGRP_IPV4_ROUTE)
                .expect("join RTNLGRP_IPV4_ROUTE");
            let _ = ready_tx.send(());
            let mut buf = vec![0u8; 1 << 16];
            loop {
                let n = match s.recv(&mut &mut buf[..], 0) {
                    Ok(n) => n,
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                        eprintln!("route monitor in {ns}: ENOBUFS, notifications lost");
                        continue;
                    }
                    Err(e) => panic!("route monitor in {ns}: {e}"),
                };
                let at = Instant::now();
                let mut off = 0;
                while off + 16 <= n {
                    let len =
                        u32::from_ne_bytes([buf[off], buf[off + 1], buf[off + 2], buf[off + 3]])
                            as usize;
                    if len < 16 || off + len > n {
                        break;
                    }
                    if let Ok(m) =
                        NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[off..off + len])
                    {
                        let ev = match m.payload {
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewRoute(r)) => {
                                Some((true, r))
                            }
                            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRoute(r)) => {
                                Some((false, r))
                            }
                            _ => None,
                        };
                        if let Some((new, r)) = ev {
                            let dst = r.attributes.iter().find_map(|a| match a {
                                RouteAttribute::Destination(RouteAddress::Inet(d)) => Some(*d),
                                _ => None,
                            });
                            if let Some(dst) = dst {
                                let e = RouteEvent {
                                    new,
                                    dst,
                                    prefix_len: r.header.destination_prefix_length,
                                    at,
                                };
                                if tx.send(e).is_err() {
                                    return;
                                }
                            }
                        }
                    }
                    off += (len + 3) & !3;
                }
            }
        });
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("route monitor ready");
        RouteMonitor { events: rx }
    }
}

/// BIRD 2 started in namespace `ns` with the configuration `conf` (its own temp dir for the config, the
/// control socket and anything the config includes); killed by PID on drop.
pub struct Bird {
    pub child: std::process::Child,
    pub dir: tempfile::TempDir,
}

impl Bird {
    pub fn start(ns: &str, conf: &str) -> Bird {
        let dir = tempfile::tempdir().expect("tempdir");
        let conf_path = dir.path().join("bird.conf");
        std::fs::write(&conf_path, conf).expect("write bird.conf");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "bird", "-f", "-c"])
            .arg(&conf_path)
            .arg("-s")
            .arg(dir.path().join("bird.ctl"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start bird");
        // `ip netns exec` execs bird, so the child's PID is BIRD's.
        let b = Bird { child, dir };
        let t = Instant::now();
        while !b.birdc("show status").contains("Daemon is up") {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "BIRD in {ns} did not start"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        b
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `birdc -s <ctl> <cmd>`, its output.
    pub fn birdc(&self, cmd: &str) -> String {
        Command::new("birdc")
            .arg("-s")
            .arg(self.path("bird.ctl"))
            .args(cmd.split(' '))
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    /// Wait until `n` BGP protocols are Established (panics after `limit`).
    pub fn wait_established(&self, n: usize, limit: Duration) {
        let t = Instant::now();
        loop {
            let out = self.birdc("show protocols");
            if out
                .lines()
                .filter(|l| l.contains("BGP") && l.contains("Established"))
                .count()
                >= n
            {
                return;
            }
            assert!(
                t.elapsed() < limit,
                "BIRD: {n} sessions not Established:\n{out}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Bird {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
