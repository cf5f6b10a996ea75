//! Benchmark: propagation of N unique IPv4 prefixes from a generator peer, through a route reflector, to a
//! monitor peer. The same generator and monitor drive every reflector in the same run: BIRD 2, GoBGP and
//! margay's own `margay reflector`, so the figures compare like with like.
//!
//! ```text
//!   netns mgbp<pid> (loopback only)
//!   generator 127.0.0.2 --iBGP--> reflector 127.0.0.1:179 (AS 65000) --iBGP--> monitor 127.0.0.3
//!   (rr client)                   BIRD | GoBGP | margay                           (rr client)
//! ```
//!
//! The generator pre-encodes its UPDATEs (about 1000 /24s each, shared attributes) and writes them in
//! large blobs, so it outruns every daemon; the clock runs from the first UPDATE byte written to the moment
//! the monitor has seen every prefix. Peak RSS is the reflector's VmHWM. Needs root (network namespace).
//!
//! Run: `cargo bench --bench propagation -- [--prefixes N] [--only bird,gobgp,margay]`

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpStream};
use std::os::fd::FromRawFd;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AS: u32 = 65000;
const REFLECTOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const GENERATOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const MONITOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
/// Next hop of the generated routes: not a loopback address (GoBGP drops routes via 127/8); BIRD resolves
/// it through a static blackhole cover.
const NEXT_HOP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 2);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut prefixes: u32 = 1_000_000;
    let mut only: Vec<String> = vec!["bird".into(), "gobgp".into(), "margay".into()];
    let mut gobgp_max: u32 = 100_000;
    let mut i = 1;
    while i < args.len() {
        match args[i].as_str() {
            "--prefixes" => {
                prefixes = args[i + 1].parse().expect("--prefixes N");
                i += 1;
            }
            "--only" => {
                only = args[i + 1].split(',').map(str::to_string).collect();
                i += 1;
            }
            "--gobgp-max" => {
                gobgp_max = args[i + 1].parse().expect("--gobgp-max N");
                i += 1;
            }
            _ => {}
        }
        i += 1;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("propagation bench: needs root (it creates a network namespace); skipped");
        return;
    }
    let updates = build_updates(prefixes);
    println!(
        "propagation: {prefixes} IPv4 /24 prefixes in {} UPDATEs, generator -> reflector -> monitor",
        updates.len()
    );
    println!(
        "{:<8} {:>10} {:>14} {:>12}",
        "daemon", "seconds", "prefixes/s", "peak RSS MB"
    );
    for daemon in &only {
        let n = if daemon == "gobgp" {
            prefixes.min(gobgp_max)
        } else {
            prefixes
        };
        let ups = if n == prefixes {
            updates.clone()
        } else {
            build_updates(n)
        };
        match run_one(daemon, n, &ups) {
            Ok((secs, rss_kb)) => println!(
                "{:<8} {:>10.3} {:>14.0} {:>12.1}{}",
                daemon,
                secs,
                n as f64 / secs,
                rss_kb as f64 / 1024.0,
                if n != prefixes {
                    format!("   ({n} prefixes)")
                } else {
                    String::new()
                }
            ),
            Err(e) => println!("{daemon:<8} failed: {e}"),
        }
    }
}

/// A namespace that is deleted, with everything in it, when dropped.
struct Netns(String);
impl Netns {
    fn new() -> Netns {
        // Namespaces of earlier runs that were killed before their guard ran.
        if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
            for old in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Some(pid) = old.strip_prefix("mgbp").and_then(|p| p.parse::<u32>().ok()) {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        let _ = Command::new("ip").args(["netns", "del", old]).status();
                    }
                }
            }
        }
        let name = format!("mgbp{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Daemon(Child);
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect(cmd);
    assert!(st.success(), "{cmd} {args:?} failed");
}

fn run_one(daemon: &str, prefixes: u32, updates: &[Vec<u8>]) -> Result<(f64, u64), String> {
    let ns = Netns::new();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let d = dir.path();
    let child = match daemon {
        "bird" => {
            let conf = d.join("bird.conf");
            std::fs::write(
                &conf,
                format!(
                    "router id 10.255.0.1;\nprotocol device {{ }}\nprotocol direct {{ ipv4; interface \"lo\"; }}\n\
                     protocol static {{ ipv4; route 10.255.0.0/16 blackhole; }}\n\
                     template bgp rrc {{ local {REFLECTOR} as {AS}; multihop; rr client; rr cluster id 10.255.0.1;\n\
                     ipv4 {{ import all; export all; }}; }}\n\
                     protocol bgp gen from rrc {{ neighbor {GENERATOR} as {AS}; }}\n\
                     protocol bgp mon from rrc {{ neighbor {MONITOR} as {AS}; }}\n"
                ),
            )
            .map_err(|e| e.to_string())?;
            Command::new("ip")
                .args(["netns", "exec", &ns.0, "bird", "-f", "-c"])
                .arg(&conf)
                .arg("-s")
                .arg(d.join("ctl"))
                .arg("-P")
                .arg(d.join("pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        }
        "gobgp" => {
            let conf = d.join("gobgp.toml");
            let nb = |a: Ipv4Addr| {
                format!(
                    "[[neighbors]]\n[neighbors.config]\nneighbor-address = \"{a}\"\npeer-as = {AS}\n\
                     [neighbors.transport.config]\nlocal-address = \"{REFLECTOR}\"\n\
                     [neighbors.route-reflector.config]\nroute-reflector-client = true\n\
                     route-reflector-cluster-id = \"10.255.0.1\"\n\
                     [[neighbors.afi-safis]]\n[neighbors.afi-safis.config]\nafi-safi-name = \"ipv4-unicast\"\n"
                )
            };
            std::fs::write(
                &conf,
                format!(
                    "[global.config]\nas = {AS}\nrouter-id = \"10.255.0.1\"\nlocal-address-list = [\"{REFLECTOR}\"]\n{}{}",
                    nb(GENERATOR),
                    nb(MONITOR)
                ),
            )
            .map_err(|e| e.to_string())?;
            Command::new("ip")
                .args(["netns", "exec", &ns.0, "gobgpd", "-f"])
                .arg(&conf)
                .args(["-t", "toml", "-l", "warn", "--api-hosts", "127.0.0.1:50151", "--pprof-disable"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        }
        "margay" => {
            let conf = d.join("margay.yaml");
            let peer = |name: &str, a: Ipv4Addr| {
                format!(
                    "---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: {name}\n\
                     spec:\n  peerIP: {a}\n  asNumber: {AS}\n"
                )
            };
            std::fs::write(
                &conf,
                format!(
                    "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\n\
                     spec:\n  asNumber: {AS}\n  nodeToNodeMeshEnabled: false\n---\n\
                     apiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: rr\n\
                     spec:\n  bgp:\n    ipv4Address: {REFLECTOR}/8\n{}{}",
                    peer("gen", GENERATOR),
                    peer("mon", MONITOR)
                ),
            )
            .map_err(|e| e.to_string())?;
            let exe = margay_exe()?;
            Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .arg(exe)
                .args(["reflector", "--node-name", "rr", "--state-dir"])
                .arg(d)
                .arg("--config")
                .arg(&conf)
                .args(["--router-id", "10.255.0.1", "--cluster-id", "10.255.0.1", "--listen", "127.0.0.1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
        }
        other => return Err(format!("unknown daemon {other}")),
    }
    .map_err(|e| format!("spawn {daemon}: {e}"))?;
    let daemon_pid = child.id();
    let _guard = Daemon(child);

    // Both peers connect from inside the namespace; the reflector may take a moment to listen.
    let ns_path = format!("/var/run/netns/{}", ns.0);
    let enter = move || -> Result<(), String> {
        let f = std::fs::File::open(&ns_path).map_err(|e| e.to_string())?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())
    };
    let mon_thread = {
        let enter = enter.clone();
        std::thread::spawn(move || -> Result<Instant, String> {
            enter()?;
            let mut s = establish(MONITOR, 3, true)?;
            count_prefixes(&mut s, prefixes)
        })
    };
    let gen_thread = {
        let updates = updates.to_vec();
        std::thread::spawn(move || -> Result<(Instant, TcpStream), String> {
            enter()?;
            let mut s = establish(GENERATOR, 2, false)?;
            // Let the monitor come up too, so that the clock measures propagation, not session set-up.
            std::thread::sleep(Duration::from_millis(1500));
            let start = Instant::now();
            let mut blob = Vec::with_capacity(1 << 20);
            for u in &updates {
                blob.extend_from_slice(u);
                if blob.len() > (1 << 20) - 4096 {
                    s.write_all(&blob)
                        .map_err(|e| format!("generator write: {e}"))?;
                    blob.clear();
                }
            }
            blob.extend_from_slice(&eor());
            s.write_all(&blob)
                .map_err(|e| format!("generator write: {e}"))?;
            Ok((start, s))
        })
    };
    let (start, _gen_sock) = gen_thread.join().map_err(|_| "generator panicked")??;
    let end = mon_thread.join().map_err(|_| "monitor panicked")??;
    let rss = std::fs::read_to_string(format!(
        "/proc/{}/status",
        find_daemon_pid(daemon_pid, daemon)
    ))
    .ok()
    .and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
    })
    .unwrap_or(0);
    Ok(((end - start).as_secs_f64(), rss))
}

/// `ip netns exec` execs the daemon in place, so its PID is the child's; fall back to a child search.
fn find_daemon_pid(pid: u32, _daemon: &str) -> u32 {
    pid
}

fn margay_exe() -> Result<std::path::PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/release/deps/propagation-xxxx -> target/release/margay
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .ok_or("no target dir")?;
    let p = dir.join("margay");
    if p.exists() {
        Ok(p)
    } else {
        Err(format!(
            "{} not built: run `cargo build --release` first",
            p.display()
        ))
    }
}

/// Connect from `local` to the reflector, exchange OPEN and KEEPALIVE; retries while the daemon starts.
fn establish(local: Ipv4Addr, id_last: u8, keepalives: bool) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match connect_from(local) {
            Ok(mut s) => {
                s.write_all(&open(Ipv4Addr::new(10, 255, 0, id_last)))
                    .map_err(|e| e.to_string())?;
                s.set_read_timeout(Some(Duration::from_secs(10)))
                    .map_err(|e| e.to_string())?;
                // Read the peer's OPEN and KEEPALIVE (skip anything else until the first KEEPALIVE).
                let mut got_open = false;
                let mut refused = false;
                loop {
                    let (ty, _body) = read_msg(&mut s)?;
                    match ty {
                        1 => {
                            got_open = true;
                            s.write_all(&keepalive()).map_err(|e| e.to_string())?;
                        }
                        // A daemon whose own connection attempt to us had just failed may refuse ours
                        // (Cease) while it waits to retry: try again, as a BGP speaker would.
                        3 if Instant::now() < deadline => {
                            refused = true;
                            break;
                        }
                        3 => return Err(format!("NOTIFICATION from reflector to {local}")),
                        4 if got_open => break,
                        _ => {}
                    }
                }
                if refused {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
                s.set_read_timeout(None).map_err(|e| e.to_string())?;
                if !keepalives {
                    // The generator writes big blobs; a second writer could split them. Hold time 240 s
                    // outlasts every run, so it sends no KEEPALIVE at all.
                    return Ok(s);
                }
                let ka = s.try_clone().map_err(|e| e.to_string())?;
                std::thread::spawn(move || {
                    let mut ka = ka;
                    while ka.write_all(&keepalive()).is_ok() {
                        std::thread::sleep(Duration::from_secs(20));
                    }
                });
                return Ok(s);
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("connect from {local}: {e}")),
        }
    }
}

fn connect_from(local: Ipv4Addr) -> std::io::Result<TcpStream> {
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let s = TcpStream::from_raw_fd(fd);
        let mk = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(ip).to_be(),
            },
            sin_zero: [0; 8],
        };
        let la = mk(local, 0);
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if libc::bind(fd, &la as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let ra = mk(REFLECTOR, 179);
        if libc::connect(fd, &ra as *const _ as *const libc::sockaddr, len) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(s)
    }
}

fn read_msg(s: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let mut hdr = [0u8; 19];
    s.read_exact(&mut hdr).map_err(|e| format!("read: {e}"))?;
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    if !(19..=65535).contains(&len) {
        return Err(format!("bad length {len}"));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body).map_err(|e| format!("read: {e}"))?;
    Ok((hdr[18], body))
}

/// Read UPDATEs until `want` distinct announcements were counted; returns the instant the last arrived.
fn count_prefixes(s: &mut TcpStream, want: u32) -> Result<Instant, String> {
    let mut seen = vec![false; want as usize];
    let mut n = 0u32;
    let mut buf = vec![0u8; 1 << 20];
    let mut have = 0usize;
    s.set_read_timeout(Some(Duration::from_secs(240)))
        .map_err(|e| e.to_string())?;
    loop {
        let r = s
            .read(&mut buf[have..])
            .map_err(|e| format!("monitor read: {e}"))?;
        if r == 0 {
            return Err(format!(
                "reflector closed the monitor session after {n} prefixes"
            ));
        }
        have += r;
        let mut off = 0;
        while have - off >= 19 {
            let len = u16::from_be_bytes([buf[off + 16], buf[off + 17]]) as usize;
            if have - off < len {
                break;
            }
            if buf[off + 18] == 2 {
                let body = &buf[off + 19..off + len];
                let wl = u16::from_be_bytes([body[0], body[1]]) as usize;
                let al = u16::from_be_bytes([body[2 + wl], body[3 + wl]]) as usize;
                let mut p = 4 + wl + al;
                while p < body.len() {
                    let bits = body[p] as usize;
                    let bytes = bits.div_ceil(8);
                    if bits == 24 && p + 4 <= body.len() {
                        let idx = prefix_index(&body[p + 1..p + 4]);
                        if let Some(slot) = seen.get_mut(idx) {
                            if !*slot {
                                *slot = true;
                                n += 1;
                            }
                        }
                    }
                    p += 1 + bytes;
                }
            }
            off += len;
        }
        buf.copy_within(off..have, 0);
        have -= off;
        if n >= want {
            return Ok(Instant::now());
        }
    }
}

/// Prefix k is (16 + k / 65536).(k / 256 % 256).(k % 256).0/24: 1M prefixes fill 16.0.0.0 - 31.255.255.0.
fn prefix_index(b: &[u8]) -> usize {
    ((b[0] as usize - 16) << 16) | ((b[1] as usize) << 8) | b[2] as usize
}

fn header(out: &mut Vec<u8>, ty: u8, body_len: usize) {
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&((19 + body_len) as u16).to_be_bytes());
    out.push(ty);
}

fn open(id: Ipv4Addr) -> Vec<u8> {
    // Capabilities: MP IPv4 unicast, 4-octet AS.
    let caps: Vec<u8> = vec![2, 6, 1, 4, 0, 1, 0, 1, 2, 6, 65, 4, 0, 0, 0xfd, 0xe8];
    let mut body = vec![4];
    body.extend_from_slice(&(AS as u16).to_be_bytes());
    body.extend_from_slice(&240u16.to_be_bytes());
    body.extend_from_slice(&id.octets());
    body.push(caps.len() as u8);
    body.extend_from_slice(&caps);
    let mut out = Vec::new();
    header(&mut out, 1, body.len());
    out.extend_from_slice(&body);
    out
}

fn keepalive() -> Vec<u8> {
    let mut out = Vec::new();
    header(&mut out, 4, 0);
    out
}

fn eor() -> Vec<u8> {
    let mut out = Vec::new();
    header(&mut out, 2, 4);
    out.extend_from_slice(&[0, 0, 0, 0]);
    out
}

/// Pre-encode UPDATEs of up to 1000 /24s each: ORIGIN IGP, empty AS_PATH (iBGP), NEXT_HOP generator,
/// LOCAL_PREF 100.
fn build_updates(prefixes: u32) -> Vec<Vec<u8>> {
    let mut attrs = Vec::new();
    attrs.extend_from_slice(&[0x40, 1, 1, 0]); // ORIGIN IGP
    attrs.extend_from_slice(&[0x40, 2, 0]); // AS_PATH empty
    attrs.extend_from_slice(&[0x40, 3, 4]);
    attrs.extend_from_slice(&NEXT_HOP.octets()); // NEXT_HOP
    attrs.extend_from_slice(&[0x40, 5, 4, 0, 0, 0, 100]); // LOCAL_PREF
    let mut out = Vec::new();
    let mut k = 0u32;
    while k < prefixes {
        let n = (prefixes - k).min(1000);
        let mut body = Vec::with_capacity(4 + attrs.len() + 4 * n as usize);
        body.extend_from_slice(&[0, 0]);
        body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        body.extend_from_slice(&attrs);
        for j in k..k + n {
            body.extend_from_slice(&[24, 16 + (j >> 16) as u8, (j >> 8) as u8, j as u8]);
        }
        let mut msg = Vec::with_capacity(19 + body.len());
        header(&mut msg, 2, body.len());
        msg.extend_from_slice(&body);
        out.push(msg);
        k += n;
    }
    out
}
