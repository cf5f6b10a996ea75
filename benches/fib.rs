//! FIB and pod plumbing benchmark (needs root: it creates network namespaces).
//!
//! `cargo bench --bench fib` — installs N IPv4 routes (default 100,000; `--routes N`) into a fresh network
//! namespace's FIB and removes them, with each writer in the same run:
//!   * margay's FIB task (`Fib::sync` of the whole set, then of the empty set),
//!   * a bare netlink loop (hand-encoded RTM_NEWROUTE, 1000 requests per write, acks read back): the anchor,
//!   * `ip -batch` with the same routes,
//!   * BIRD 2's kernel protocol exporting the same routes as static routes (when `bird` is installed),
//!     timed from its first to its last route notification;
//!
//! then plumbs 200 pods (ADD, then DEL) and prints p50/p99. Runs alternate between writers; the median of
//! `--runs` (default 3) is reported. Without `--bench` (as `cargo test --all-targets` runs it) it does a
//! small smoke run.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ipnetwork::{IpNetwork, Ipv4Network};
use margay::dataplane::fib::{Fib, FibConfig, NextHop, Route, DEFAULT_METRIC, DEFAULT_PROTOCOL};
use margay::dataplane::pod::{add_pod, del_pod, PodSpec};
use margay::dataplane::{in_netns, DataplaneError};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

const GW: Ipv4Addr = Ipv4Addr::new(192, 168, 1, 2);

fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    if !out.status.success() {
        panic!(
            "command failed: {cmd}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A namespace with a link towards the gateway; deleted on drop.
struct Ns(String);
impl Ns {
    fn new(tag: &str) -> Ns {
        let name = format!("mgb{}{}", std::process::id() % 100000, tag);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&format!(
            "ip netns add {name} && ip -n {name} link set lo up \
             && ip -n {name} link add v0 type veth peer name v1 && ip -n {name} link set v0 up \
             && ip -n {name} link set v1 up && ip -n {name} addr add 192.168.1.1/24 dev v0"
        ));
        Ns(name)
    }
    fn path(&self) -> PathBuf {
        PathBuf::from(format!("/var/run/netns/{}", self.0))
    }
}
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ip netns pids {0} | xargs -r kill -9; ip netns del {0}",
                self.0
            ))
            .output();
    }
}

fn prefixes(n: usize) -> Vec<Ipv4Addr> {
    // 10.0.0.0/24, 10.0.1.0/24, ... then 11.x when 10/8 is used up.
    (0..n as u32)
        .map(|i| Ipv4Addr::from(0x0a00_0000u32 + (i << 8)))
        .collect()
}

fn count_routes(ns: &str, proto: &str) -> usize {
    sh(&format!("ip -n {ns} route show proto {proto} | wc -l"))
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Open a raw route socket inside a namespace.
fn socket_in(ns: &Path, groups: &[u32]) -> Socket {
    in_netns(Some(ns), || {
        let mut s = Socket::new(NETLINK_ROUTE).map_err(|e| sock_err(&e))?;
        s.bind_auto().map_err(|e| sock_err(&e))?;
        for g in groups {
            s.add_membership(*g).map_err(|e| sock_err(&e))?;
        }
        let big: libc::c_int = 256 << 20;
        // SAFETY: setsockopt reads one c_int from a valid local.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                &big as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        Ok(s)
    })
    .expect("netlink socket in namespace")
}

fn sock_err(e: &std::io::Error) -> DataplaneError {
    DataplaneError::Invalid {
        what: "socket",
        value: String::new(),
        reason: e.to_string(),
    }
}

/// The anchor: RTM_NEWROUTE / RTM_DELROUTE encoded by hand, `per_write` per sendmsg, every ack read.
fn bare_netlink(ns: &Path, pfx: &[Ipv4Addr], add: bool, per_write: usize) -> Duration {
    let sock = socket_in(ns, &[]);
    let mut buf: Vec<u8> = Vec::with_capacity(per_write * 64);
    let mut rx = vec![0u8; 1 << 20];
    let mut seq = 0u32;
    let mut errors = 0usize;
    let start = Instant::now();
    for chunk in pfx.chunks(per_write) {
        buf.clear();
        for p in chunk {
            seq += 1;
            let len: u32 = 16 + 12 + 8 + 8 + 8;
            let (ty, flags): (u16, u16) = if add {
                (24, 0x1 | 0x4 | 0x400 | 0x200) // NEWROUTE: REQUEST|ACK|CREATE|EXCL
            } else {
                (25, 0x1 | 0x4) // DELROUTE
            };
            buf.extend_from_slice(&len.to_ne_bytes());
            buf.extend_from_slice(&ty.to_ne_bytes());
            buf.extend_from_slice(&flags.to_ne_bytes());
            buf.extend_from_slice(&seq.to_ne_bytes());
            buf.extend_from_slice(&0u32.to_ne_bytes());
            // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
            let scope = if add { 0 } else { 255 };
            let rtype = if add { 1 } else { 0 };
            buf.extend_from_slice(&[2, 24, 0, 0, 254, DEFAULT_PROTOCOL, scope, rtype]);
            buf.extend_from_slice(&0u32.to_ne_bytes());
            // RTA_DST
            buf.extend_from_slice(&8u16.to_ne_bytes());
            buf.extend_from_slice(&1u16.to_ne_bytes());
            buf.extend_from_slice(&p.octets());
            // RTA_GATEWAY
            buf.extend_from_slice(&8u16.to_ne_bytes());
            buf.extend_from_slice(&5u16.to_ne_bytes());
            buf.extend_from_slice(&GW.octets());
            // RTA_PRIORITY
            buf.extend_from_slice(&8u16.to_ne_bytes());
            buf.extend_from_slice(&6u16.to_ne_bytes());
            buf.extend_from_slice(&DEFAULT_METRIC.to_ne_bytes());
        }
        sock.send(&buf, 0).expect("send");
        let mut acks = 0;
        while acks < chunk.len() {
            // SAFETY: rx is a valid writable buffer of rx.len() bytes.
            let n = unsafe {
                libc::recv(
                    sock.as_raw_fd(),
                    rx.as_mut_ptr() as *mut libc::c_void,
                    rx.len(),
                    0,
                )
            };
            assert!(n > 0, "recv: {}", std::io::Error::last_os_error());
            let mut off = 0usize;
            while off + 20 <= n as usize {
                let len =
                    u32::from_ne_bytes(rx[off..off + 4].try_into().expect("4 bytes")) as usize;
                let ty = u16::from_ne_bytes(rx[off + 4..off + 6].try_into().expect("2 bytes"));
                if ty == 2 {
                    acks += 1;
                    if i32::from_ne_bytes(rx[off + 16..off + 20].try_into().expect("4 bytes")) != 0
                    {
                        errors += 1;
                    }
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
    }
    let d = start.elapsed();
    assert_eq!(errors, 0, "bare netlink: {errors} requests failed");
    d
}

fn ip_batch(ns: &str, pfx: &[Ipv4Addr], add: bool) -> Duration {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    for p in pfx {
        if add {
            writeln!(
                f,
                "route add {p}/24 via {GW} proto {DEFAULT_PROTOCOL} metric {DEFAULT_METRIC}"
            )
        } else {
            writeln!(
                f,
                "route del {p}/24 proto {DEFAULT_PROTOCOL} metric {DEFAULT_METRIC}"
            )
        }
        .expect("write batch");
    }
    f.flush().expect("flush");
    let start = Instant::now();
    sh(&format!("ip -n {ns} -batch {}", f.path().display()));
    start.elapsed()
}

fn margay(rt: &tokio::runtime::Runtime, ns: &Path, pfx: &[Ipv4Addr]) -> (Duration, Duration) {
    rt.block_on(async {
        let fib = Fib::spawn(FibConfig {
            netns: Some(ns.to_path_buf()),
            ..FibConfig::default()
        })
        .await
        .expect("spawn FIB");
        let routes: Vec<Route> = pfx
            .iter()
            .map(|p| {
                Route::via(
                    IpNetwork::V4(Ipv4Network::new(*p, 24).expect("/24")),
                    vec![NextHop::via(IpAddr::V4(GW))],
                )
            })
            .collect();
        let start = Instant::now();
        fib.sync(routes).await.expect("sync");
        let st = fib.settle().await.expect("settle");
        let add = start.elapsed();
        assert_eq!(st.installed, pfx.len(), "{:?}", st.failed.first());
        let start = Instant::now();
        fib.sync(Vec::new()).await.expect("sync empty");
        let st = fib.settle().await.expect("settle");
        let del = start.elapsed();
        assert_eq!(st.installed, 0);
        (add, del)
    })
}

/// BIRD 2 exporting `pfx` as static routes through its kernel protocol. Times are first→last route
/// notification for install (after BIRD started) and for removal (BIRD's clean shutdown flushes them).
fn bird(ns: &Ns, pfx: &[Ipv4Addr]) -> Option<(Duration, Duration)> {
    let dir = tempfile::tempdir().ok()?;
    let conf = dir.path().join("bird.conf");
    let mut c = String::from(
        "router id 192.168.1.1;\nprotocol device { scan time 10; }\nprotocol static { ipv4;\n",
    );
    for p in pfx {
        c.push_str(&format!("  route {p}/24 via {GW};\n"));
    }
    c.push_str("}\nprotocol kernel { ipv4 { export all; }; }\n");
    std::fs::write(&conf, c).ok()?;
    let mon = socket_in(&ns.path(), &[7]); // RTNLGRP_IPV4_ROUTE
    let timeout = libc::timeval {
        tv_sec: 0,
        tv_usec: 200_000,
    };
    // SAFETY: setsockopt reads one timeval from a valid local.
    unsafe {
        libc::setsockopt(
            mon.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &timeout as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        );
    }
    let sock = dir.path().join("bird.ctl");
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.0, "bird", "-f", "-c"])
        .arg(&conf)
        .arg("-s")
        .arg(&sock)
        .arg("-P")
        .arg(dir.path().join("bird.pid"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    let count = |want_type: u16, n: usize| -> Option<Duration> {
        let mut rx = vec![0u8; 1 << 20];
        let mut first: Option<Instant> = None;
        let mut seen = 0usize;
        let deadline = Instant::now() + Duration::from_secs(120);
        while seen < n && Instant::now() < deadline {
            // SAFETY: rx is a valid writable buffer.
            let got = unsafe {
                libc::recv(
                    mon.as_raw_fd(),
                    rx.as_mut_ptr() as *mut libc::c_void,
                    rx.len(),
                    0,
                )
            };
            if got <= 0 {
                continue;
            }
            let mut off = 0usize;
            while off + 24 <= got as usize {
                let len = u32::from_ne_bytes(rx[off..off + 4].try_into().ok()?) as usize;
                let ty = u16::from_ne_bytes(rx[off + 4..off + 6].try_into().ok()?);
                if ty == want_type && rx[off + 16 + 5] == 12 {
                    first.get_or_insert_with(Instant::now);
                    seen += 1;
                }
                if len == 0 {
                    break;
                }
                off += (len + 3) & !3;
            }
        }
        if seen < n {
            return None;
        }
        first.map(|f| f.elapsed())
    };
    let add = count(24, pfx.len());
    let add = match add {
        Some(d) => d,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
    };
    // A clean stop makes BIRD remove its kernel routes.
    // SAFETY: kill(2) on the pid of the child we started.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let del = count(25, pfx.len());
    let _ = child.wait();
    Some((add, del?))
}

fn rate(n: usize, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn pct(v: &[Duration], p: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    let i = ((s.len() as f64 - 1.0) * p).round() as usize;
    s[i]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let full = args.iter().any(|a| a == "--bench");
    let arg = |name: &str, default: usize| -> usize {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("benches/fib.rs: needs root (it creates network namespaces and writes their FIBs); nothing measured");
        if full {
            std::process::exit(1);
        }
        return;
    }
    let n = arg("--routes", if full { 100_000 } else { 2_000 });
    let runs = arg("--runs", if full { 3 } else { 1 });
    let npods = arg("--pods", if full { 200 } else { 5 });
    let with_bird = full
        && Command::new("sh")
            .arg("-c")
            .arg("command -v bird")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
    // `--writers 0,1`: only some writers (0 bare netlink, 1 margay, 2 ip -batch, 3 BIRD), e.g. for perf.
    let writers: Vec<usize> = args
        .iter()
        .position(|a| a == "--writers")
        .and_then(|i| args.get(i + 1))
        .map(|v| v.split(',').filter_map(|x| x.parse().ok()).collect())
        .unwrap_or_else(|| vec![0, 1, 2, 3, 4]);
    let pfx = prefixes(n);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    let mut res: Vec<(&str, Vec<Duration>, Vec<Duration>)> = vec![
        ("bare netlink, 1000/write (anchor)", vec![], vec![]),
        ("margay FIB task", vec![], vec![]),
        ("ip -batch", vec![], vec![]),
        ("BIRD 2 kernel protocol", vec![], vec![]),
        ("bare netlink + a route listener", vec![], vec![]),
    ];
    for run in 0..runs {
        // Alternate the order so no writer always runs first (warm caches, other load).
        // The anchor and margay always run next to each other.
        let order: Vec<usize> = if run % 2 == 0 {
            vec![0, 1, 4, 2, 3]
        } else {
            vec![3, 2, 4, 1, 0]
        };
        for w in order {
            if !writers.contains(&w) {
                continue;
            }
            let ns = Ns::new(&format!("f{w}"));
            let (a, d) = match w {
                0 => (
                    bare_netlink(&ns.path(), &pfx, true, 1000),
                    bare_netlink(&ns.path(), &pfx, false, 1000),
                ),
                1 => margay(&rt, &ns.path(), &pfx),
                4 => {
                    // The same loop while a process listens to route notifications (as on any real node,
                    // and as margay itself must, to repair its routes): the kernel then builds one
                    // notification per change.
                    let _listener = socket_in(&ns.path(), &[7]);
                    (
                        bare_netlink(&ns.path(), &pfx, true, 1000),
                        bare_netlink(&ns.path(), &pfx, false, 1000),
                    )
                }
                2 => {
                    let a = ip_batch(&ns.0, &pfx, true);
                    assert_eq!(count_routes(&ns.0, &DEFAULT_PROTOCOL.to_string()), n);
                    (a, ip_batch(&ns.0, &pfx, false))
                }
                _ => {
                    if !with_bird {
                        continue;
                    }
                    match bird(&ns, &pfx) {
                        Some(x) => x,
                        None => {
                            eprintln!("BIRD run did not complete; skipped");
                            continue;
                        }
                    }
                }
            };
            if w != 3 {
                assert_eq!(
                    count_routes(&ns.0, &DEFAULT_PROTOCOL.to_string()),
                    0,
                    "routes left after removal"
                );
            }
            res[w].1.push(a);
            res[w].2.push(d);
            eprintln!(
                "run {run}: {:<36} install {:>8.3}s  remove {:>8.3}s",
                res[w].0,
                a.as_secs_f64(),
                d.as_secs_f64()
            );
        }
    }

    println!(
        "\nFIB: {n} IPv4 /24 routes via one gateway, fresh namespace each, median of {runs} run(s)"
    );
    println!(
        "{:<36} {:>12} {:>14} {:>12} {:>14} {:>10} {:>10}",
        "writer", "install s", "install r/s", "remove s", "remove r/s", "vs anchor", "paired"
    );
    let anchor = if res[0].1.is_empty() {
        Duration::from_secs(1)
    } else {
        median(res[0].1.clone())
    };
    for (name, a, d) in &res {
        if a.is_empty() {
            println!("{name:<36} skipped (not selected, or bird missing / did not finish)");
            continue;
        }
        // Install-rate ratio to the anchor, run by run (the two ran next to each other, under the same
        // load), then the median of those.
        let paired: Vec<f64> = a
            .iter()
            .zip(res[0].1.iter())
            .map(|(x, anchor)| anchor.as_secs_f64() / x.as_secs_f64())
            .collect();
        let (am, dm) = (median(a.clone()), median(d.clone()));
        let mut paired_sorted = paired.clone();
        paired_sorted.sort_by(|x, y| x.total_cmp(y));
        let paired_median = paired_sorted
            .get(paired_sorted.len() / 2)
            .copied()
            .unwrap_or(f64::NAN);
        println!(
            "{name:<36} {:>12.3} {:>14.0} {:>12.3} {:>14.0} {:>9.2}x {:>9.2}x",
            am.as_secs_f64(),
            rate(n, am),
            dm.as_secs_f64(),
            rate(n, dm),
            anchor.as_secs_f64() / am.as_secs_f64(),
            paired_median
        );
    }
    println!("(vs anchor: ratio of median install rates; paired: median of the per-run ratios)");

    // Pod plumbing: ADD then DEL `npods` pods into one node namespace.
    let node = Ns::new("pn");
    let pod_ns: Vec<String> = (0..npods).map(|i| format!("{}p{i}", node.0)).collect();
    for p in &pod_ns {
        sh(&format!("ip netns add {p} && ip -n {p} link set lo up"));
    }
    let mut adds = Vec::new();
    let mut dels = Vec::new();
    for (i, p) in pod_ns.iter().enumerate() {
        let spec = PodSpec {
            node_netns: Some(node.path()),
            pod_netns: PathBuf::from(format!("/var/run/netns/{p}")),
            workload_id: format!("bench.pod-{i}"),
            ifname: "eth0".into(),
            mtu: 1450,
            ipv4: Some(Ipv4Addr::from(0x0af4_0000u32 + i as u32 + 2)),
            ipv6: Some(format!("fd00:244::{:x}", i + 2).parse().expect("v6")),
        };
        let t = Instant::now();
        add_pod(&spec).expect("ADD");
        adds.push(t.elapsed());
    }
    for i in 0..npods {
        let t = Instant::now();
        del_pod(Some(&node.path()), &format!("bench.pod-{i}")).expect("DEL");
        dels.push(t.elapsed());
    }
    for p in &pod_ns {
        let _ = Command::new("ip").args(["netns", "del", p]).output();
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("\nPod plumbing, {npods} pods (IPv4 + IPv6), one at a time");
    println!(
        "ADD p50 {:.2} ms  p99 {:.2} ms   DEL p50 {:.2} ms  p99 {:.2} ms",
        ms(pct(&adds, 0.5)),
        ms(pct(&adds, 0.99)),
        ms(pct(&dels, 0.5)),
        ms(pct(&dels, 0.99))
    );
}
