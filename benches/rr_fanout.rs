//! Benchmark: route-reflector fan-out. One reflector, N simulated iBGP route-reflector clients, each from its
//! own loopback address and announcing one /26 with its own next hop; every client must end up holding every
//! other client's block. Then one more client announces and withdraws one block at a time and the clock runs
//! until all N clients have seen it. The same simulator drives BIRD 2 and `margay reflector` in the same run.
//!
//! ```text
//!   netns mgrf<pid> (loopback only; 127/8 is local, so every client has its own source address)
//!   client i: 127.1.(i/250).(i%250+1) ──iBGP──▶ reflector 127.0.0.1:179 (AS 65000) ──▶ every other client
//!             announces 172.16.0.0 + 64·i /26, next hop 10.200.(i/250).(i%250+1)
//!   probe:    one more client, announces / withdraws 172.31.255.0/26 `--rounds` times (and reads
//!             what it is sent, as a live client does)
//! ```
//!
//! The simulator is one current-thread tokio runtime: each client is a task that reads into a buffer and
//! only walks the NLRI bytes, one receive call per message (see `read_some`). It still shares the
//! machine: at N = 2,000 it takes 11-14 ms of CPU per probe change (about three quarters of it the
//! kernel's receive and ACK path), against 12.5-16.0 ms for margay's reflector and 18.7 ms for BIRD's; on
//! two cores that CPU is taken from the reflector being measured, and its reads end the measurement.
//! Every reflector is passive (BIRD `passive on`, GoBGP `passive-mode`; margay makes Calico nodes with the
//! higher address passive), so none spends time on connection attempts. After the probe rounds comes a
//! restart storm: every tenth client closes its session and reconnects at once; the clock runs until every
//! client has heard each of those blocks announced again and holds every block. Peak RSS is the
//! reflector's VmHWM, CPU its utime + stime from /proc, both over the whole run. Needs root (network
//! namespace), BIRD 2 and GoBGP (`gobgpd`) for their rows, a release build of margay. Addressing allows up
//! to 16,000 clients (client 16,380's block would be the probe's).
//!
//! Before the probe rounds the simulator waits until no client has heard an UPDATE for 500 ms (the reflector
//! may still be sending repeats of routes every client already holds); that moment is reported as
//! `settled`, with how many announcements the clients got per one they needed. The first probe round
//! after that quiet wait is the slowest for every reflector (BIRD as well as margay, at 2,000 clients
//! 70-110 ms against 20-27 ms for the next ones): a pause of one second before a later round makes that
//! round as slow, so it is the cost of a fan-out after an idle spell, not of the probe's new session.
//!
//! With `--runs K` the daemons take turns (run 1 of each, then run 2 of each, ...), so a machine whose speed
//! drifts over minutes slows every daemon's runs alike; each daemon's row pools its runs, and the line under
//! it gives each run's p50s, to be compared with the other daemon's run of the same turn.
//!
//! With `--pin` every thread of the daemon runs on CPU 0 (`taskset -c 0`) and the simulator on CPU 1, so
//! neither takes CPU from the other: each daemon is measured on one core of its own (BIRD uses one
//! thread anyway; margay's worker and helper threads share that core), and the simulator's CPU no longer
//! lands on the daemon measured. Needs two CPUs.
//!
//! Run: `cargo bench --bench rr_fanout -- [--clients N] [--rounds R] [--runs K] [--only bird,gobgp,margay] [--pin]`
//! (`RR_FANOUT_ROUNDS=1` prints every probe round's time). Stopped by a signal (Ctrl-C, `timeout`), it kills
//! the daemon it started and deletes its namespace before it exits.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

const AS: u32 = 65000;
const REFLECTOR: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const PROBE_BLOCK: [u8; 4] = [172, 31, 255, 0];

fn client_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8)
}
fn client_nh(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 200, (i / 250) as u8, (i % 250 + 1) as u8)
}
fn client_block(i: usize) -> [u8; 4] {
    let base = u32::from(Ipv4Addr::new(172, 16, 0, 0)) + 64 * i as u32;
    base.to_be_bytes()
}

struct Figures {
    established: f64,
    full: f64,
    /// When the last UPDATE of the initial convergence reached a client (the reflector went quiet).
    settled: f64,
    /// Announcements the clients received until then, per announcement they needed (1.0: no repeats).
    repeats: f64,
    join: Vec<f64>,
    withdraw: Vec<f64>,
    /// Restart storm: seconds until every route is back (None: not back within the time limit).
    storm: Option<f64>,
    rss_kb: u64,
    /// At the end of the run (not the peak): the heap and stacks, and the mapped files (the binary).
    anon_kb: u64,
    file_kb: u64,
    cpu_s: f64,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut clients = 200usize;
    let mut rounds = 20usize;
    let mut runs = 1usize;
    let mut only: Vec<String> = vec!["bird".into(), "gobgp".into(), "margay".into()];
    let mut pin = false;
    let mut i = 1;
    while i < args.len() {
        let next = |i: usize| args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--clients" => {
                clients = next(i).parse().expect("--clients N");
                i += 1;
            }
            "--rounds" => {
                rounds = next(i).parse().expect("--rounds R");
                i += 1;
            }
            "--runs" => {
                runs = next(i).parse().expect("--runs K");
                i += 1;
            }
            "--only" => {
                only = next(i).split(',').map(str::to_string).collect();
                i += 1;
            }
            "--pin" => pin = true,
            _ => {}
        }
        i += 1;
    }
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("rr_fanout bench: needs root (it creates a network namespace); skipped");
        return;
    }
    assert!(clients <= 16_000, "--clients at most 16000");
    clean_up_on_signals();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "rr_fanout: {clients} iBGP clients x one /26, {rounds} probe rounds, {runs} run(s) per daemon, alternating; medians{}",
        if pin { "; daemon on CPU 0, simulator on CPU 1" } else { "" }
    );
    println!("load average at start: {}", load.trim());
    println!(
        "{:<7} {:>13} {:>10} {:>10} {:>10} {:>10} {:>10} {:>9} {:>8} {:>7}",
        "daemon",
        "established s",
        "full s",
        "join p50",
        "join p99",
        "wdr p50",
        "wdr p99",
        "storm s",
        "RSS MB",
        "CPU s"
    );
    // The runs alternate between the daemons (BIRD, margay, BIRD, margay, ...): this machine's speed drifts
    // over minutes, and a drift must not land on one daemon's runs only.
    let mut results: Vec<(&String, Vec<Figures>)> = only.iter().map(|d| (d, Vec::new())).collect();
    for _ in 0..runs {
        for (daemon, all) in results.iter_mut() {
            match run_one(daemon, clients, rounds, pin) {
                Ok(f) => all.push(f),
                Err(e) => println!("{daemon:<7} failed: {e}"),
            }
        }
    }
    for (daemon, all) in results {
        if all.is_empty() {
            continue;
        }
        let med = |v: Vec<f64>| -> f64 { pct(v, 50.0) };
        let joins: Vec<f64> = all.iter().flat_map(|f| f.join.clone()).collect();
        let wdrs: Vec<f64> = all.iter().flat_map(|f| f.withdraw.clone()).collect();
        // A storm that did not finish counts as infinitely slow in the median.
        let storm = med(all
            .iter()
            .map(|f| f.storm.unwrap_or(f64::INFINITY))
            .collect());
        println!(
            "{:<7} {:>13.3} {:>10.3} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>9.3} {:>8.1} {:>7.2}",
            daemon,
            med(all.iter().map(|f| f.established).collect()),
            med(all.iter().map(|f| f.full).collect()),
            pct(joins.clone(), 50.0) * 1e3,
            pct(joins, 99.0) * 1e3,
            pct(wdrs.clone(), 50.0) * 1e3,
            pct(wdrs, 99.0) * 1e3,
            storm,
            med(all.iter().map(|f| f.rss_kb as f64).collect()) / 1024.0,
            med(all.iter().map(|f| f.cpu_s).collect()),
        );
        let per_run: Vec<String> = all
            .iter()
            .map(|f| {
                format!(
                    "full {:.2}s settled {:.2}s ({:.2} announcements per needed one) storm {} RSS {:.1}MB (at the end: anon {:.1}MB, file {:.1}MB) CPU {:.2}s",
                    f.full,
                    f.settled,
                    f.repeats,
                    f.storm.map_or("-".into(), |s| format!("{s:.2}s")),
                    f.rss_kb as f64 / 1024.0,
                    f.anon_kb as f64 / 1024.0,
                    f.file_kb as f64 / 1024.0,
                    f.cpu_s
                )
            })
            .collect();
        println!("        runs: {}", per_run.join("; "));
        let p50s = |v: fn(&Figures) -> &Vec<f64>| -> String {
            all.iter()
                .map(|f| format!("{:.1}", pct(v(f).clone(), 50.0) * 1e3))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "        p50 per run (ms): join {}, withdraw {}",
            p50s(|f| &f.join),
            p50s(|f| &f.withdraw)
        );
    }
}

fn pct(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let k = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[k.min(v.len() - 1)]
}

/// What the current run must not leave behind if a signal ends the bench: its namespace and its
/// daemon's pid (the guards below register and clear them).
static LIVE: Mutex<(Option<String>, Option<u32>)> = Mutex::new((None, None));
/// The signal that asked the bench to stop (0: none).
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

fn live() -> std::sync::MutexGuard<'static, (Option<String>, Option<u32>)> {
    LIVE.lock().unwrap_or_else(PoisonError::into_inner)
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Only an atomic store: the watcher thread does the rest outside the handler.
    SIGNALLED.store(sig, Ordering::SeqCst);
}

/// SIGINT, SIGTERM and SIGHUP (Ctrl-C, `timeout`) end the bench as its guards would: the daemon
/// killed, the namespace deleted. Without this a signal left `mgrf<pid>` and the daemon behind (drop
/// guards do not run when a signal ends the process).
fn clean_up_on_signals() {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        let act = SigAction::new(
            SigHandler::Handler(on_signal),
            SaFlags::empty(),
            SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic. Children get the default disposition back at exec.
        unsafe { sigaction(sig, &act) }.expect("install a signal handler");
    }
    std::thread::spawn(|| loop {
        let sig = SIGNALLED.load(Ordering::SeqCst);
        if sig != 0 {
            let live = live();
            if let Some(pid) = live.1 {
                let _ =
                    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
            if let Some(ns) = &live.0 {
                let _ = Command::new("ip").args(["netns", "del", ns]).status();
            }
            eprintln!("rr_fanout: stopped by signal {sig}; its daemon and namespace are gone");
            std::process::exit(128 + sig);
        }
        std::thread::sleep(Duration::from_millis(50));
    });
}

/// A namespace that is deleted, with everything in it, when dropped.
struct Netns(String);
impl Netns {
    fn new() -> Netns {
        let name = format!("mgrf{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        live().0 = Some(name.clone());
        run("ip", &["netns", "add", &name]);
        run("ip", &["-n", &name, "link", "set", "lo", "up"]);
        Netns(name)
    }
}
impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        live().0 = None;
    }
}

struct Daemon(Child);
impl Daemon {
    fn new(child: Child) -> Daemon {
        live().1 = Some(child.id());
        Daemon(child)
    }
}
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        live().1 = None;
    }
}

fn run(cmd: &str, args: &[&str]) {
    let st = Command::new(cmd).args(args).status().expect(cmd);
    assert!(st.success(), "{cmd} {args:?} failed");
}

/// The margay binary: `MARGAY_EXE` if set (e.g. a wrapper that runs it under a heap profiler), else the
/// release build beside this bench.
fn margay_exe() -> Result<std::path::PathBuf, String> {
    if let Some(p) = std::env::var_os("MARGAY_EXE") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
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

/// `ip netns exec ...` for a daemon: with `pin`, under `taskset -c 0` (every thread on CPU 0).
fn netns_exec(pin: bool) -> Command {
    if pin {
        let mut c = Command::new("taskset");
        c.args(["-c", "0", "ip"]);
        c
    } else {
        Command::new("ip")
    }
}

fn start(
    daemon: &str,
    ns: &str,
    d: &std::path::Path,
    clients: usize,
    pin: bool,
) -> Result<Child, String> {
    // The probe is client `clients` (one more than the measured ones).
    let n = clients + 1;
    match daemon {
        "bird" => {
            let mut conf = String::from(
                "router id 10.255.0.1;\nprotocol device { }\n\
                 protocol static { ipv4; route 10.200.0.0/16 blackhole; }\n\
                 template bgp rrc { local 127.0.0.1 as 65000; multihop; passive on; rr client; rr cluster id 10.255.0.1;\n\
                 ipv4 { import all; export all; }; }\n",
            );
            for i in 0..n {
                conf.push_str(&format!(
                    "protocol bgp c{i} from rrc {{ neighbor {} as {AS}; }}\n",
                    client_addr(i)
                ));
            }
            let path = d.join("bird.conf");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            netns_exec(pin)
                .args(["netns", "exec", ns, "bird", "-f", "-c"])
                .arg(&path)
                .arg("-s")
                .arg(d.join("ctl"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn bird: {e}"))
        }
        "gobgp" => {
            let mut conf = format!(
                "[global.config]\n  as = {AS}\n  router-id = \"10.255.0.1\"\n  port = 179\n  \
                 local-address-list = [\"127.0.0.1\"]\n"
            );
            for i in 0..n {
                conf.push_str(&format!(
                    "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = {AS}\n  \
                     [neighbors.transport.config]\n    passive-mode = true\n  \
                     [neighbors.route-reflector.config]\n    route-reflector-client = true\n    \
                     route-reflector-cluster-id = \"10.255.0.1\"\n  \
                     [[neighbors.afi-safis]]\n    [neighbors.afi-safis.config]\n      afi-safi-name = \"ipv4-unicast\"\n",
                    client_addr(i)
                ));
            }
            let path = d.join("gobgpd.toml");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            netns_exec(pin)
                .args(["netns", "exec", ns, "gobgpd", "-f"])
                .arg(&path)
                .args([
                    "-t",
                    "toml",
                    "-l",
                    "warn",
                    "--api-hosts",
                    "127.0.0.1:50051",
                    "--pprof-disable",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn gobgpd: {e}"))
        }
        "margay" => {
            // Calico's reflector layout: the reflector is a Node with a cluster id and a label, the clients
            // are Nodes, one BGPPeer peers the reflector with every client.
            let mut conf = format!(
                "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata: {{name: default}}\n\
                 spec: {{asNumber: {AS}, nodeToNodeMeshEnabled: false}}\n---\n\
                 apiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: rr, labels: {{rr: 'true'}}}}\n\
                 spec: {{bgp: {{ipv4Address: 127.0.0.1/8, routeReflectorClusterID: 10.255.0.1}}}}\n---\n\
                 apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {{name: clients}}\n\
                 spec: {{nodeSelector: \"rr == 'true'\", peerSelector: \"!has(rr)\"}}\n"
            );
            for i in 0..n {
                conf.push_str(&format!(
                    "---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata: {{name: c{i}}}\n\
                     spec: {{bgp: {{ipv4Address: {}/8}}}}\n",
                    client_addr(i)
                ));
            }
            let path = d.join("margay.yaml");
            std::fs::write(&path, conf).map_err(|e| e.to_string())?;
            netns_exec(pin)
                .args(["netns", "exec", ns])
                .arg(margay_exe()?)
                .args(["reflector", "--node-name", "rr", "--state-dir"])
                .arg(d)
                .arg("--config")
                .arg(&path)
                .args([
                    "--router-id",
                    "10.255.0.1",
                    "--listen",
                    "127.0.0.1",
                    "--http-listen",
                    "127.0.0.1:9199",
                ])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .map_err(|e| format!("spawn margay: {e}"))
        }
        other => Err(format!("unknown daemon {other}")),
    }
}

fn run_one(daemon: &str, clients: usize, rounds: usize, pin: bool) -> Result<Figures, String> {
    let ns = Netns::new();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let child = start(daemon, &ns.0, dir.path(), clients, pin)?;
    let pid = child.id();
    let _guard = Daemon::new(child);
    // The simulator runs inside the namespace: a thread of its own enters it and runs the runtime.
    let ns_path = format!("/var/run/netns/{}", ns.0);
    let sim = std::thread::spawn(move || -> Result<Sim, String> {
        let f = std::fs::File::open(&ns_path).map_err(|e| e.to_string())?;
        nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| e.to_string())?;
        if pin {
            let mut cpus = nix::sched::CpuSet::new();
            cpus.set(1).map_err(|e| e.to_string())?;
            nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpus)
                .map_err(|e| format!("--pin: the simulator on CPU 1: {e}"))?;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        rt.block_on(simulate(clients, rounds))
    });
    let Sim {
        established,
        full,
        settled,
        repeats,
        join,
        withdraw,
        storm,
    } = sim.join().map_err(|_| "simulator panicked")??;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
            .unwrap_or(0)
    };
    let rss_kb = field("VmHWM:");
    let anon_kb = field("RssAnon:");
    let file_kb = field("RssFile:");
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |k: usize| {
        fields
            .get(k)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/pid/stat (11 and 12 after the command name).
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu_s = (ticks(11) + ticks(12)) / hz;
    Ok(Figures {
        established,
        full,
        settled,
        repeats,
        join,
        withdraw,
        storm,
        rss_kb,
        anon_kb,
        file_kb,
        cpu_s,
    })
}

/// What the simulator measured.
struct Sim {
    established: f64,
    full: f64,
    settled: f64,
    repeats: f64,
    join: Vec<f64>,
    withdraw: Vec<f64>,
    storm: Option<f64>,
}

/// The restart storm as the clients see it: which clients restart, and whether it has begun.
struct Storm {
    begun: AtomicBool,
    restarting: Vec<bool>,
    /// One per client: told to drop its session and reconnect.
    kick: Vec<tokio::sync::Notify>,
}

impl Storm {
    fn new(clients: usize) -> Storm {
        Storm {
            begun: AtomicBool::new(false),
            // Every tenth client: 10% of them, spread over the address range.
            restarting: (0..clients).map(|i| i % 10 == 0).collect(),
            kick: (0..clients).map(|_| tokio::sync::Notify::new()).collect(),
        }
    }

    /// The blocks a client must hear announced again before its routes count as back.
    fn blocks_for(&self, me: usize) -> HashSet<u32> {
        (0..self.restarting.len())
            .filter(|&i| self.restarting[i] && i != me)
            .map(|i| u32::from_be_bytes(client_block(i)))
            .collect()
    }
}

/// What a client task reports.
enum Seen {
    Established,
    Full,
    Probe {
        announced: bool,
        at: Instant,
    },
    /// After the storm began: every restarted block heard again and every block held.
    Back,
}

async fn simulate(clients: usize, rounds: usize) -> Result<Sim, String> {
    // Counters of this run only (the simulator runs once per daemon and run in one process).
    epoch();
    LAST_UPDATE_NS.store(0, Ordering::Relaxed);
    ANNOUNCED.store(0, Ordering::Relaxed);
    // Wait for the reflector to listen.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if TcpStream::connect((REFLECTOR, 179)).await.is_ok() {
            break;
        }
        if Instant::now() > deadline {
            return Err("the reflector never listened on 127.0.0.1:179".into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Let the reflector notice and drop that probe connection.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Seen)>();
    let failed = Arc::new(AtomicUsize::new(0));
    let storm = Arc::new(Storm::new(clients));
    let t0 = Instant::now();
    for i in 0..clients {
        let tx = tx.clone();
        let failed = failed.clone();
        let storm = storm.clone();
        tokio::spawn(async move {
            if let Err(e) = client(i, clients, tx, storm).await {
                if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                    eprintln!("client {i}: {e}");
                }
            }
        });
    }
    let mut established = 0usize;
    let mut full = 0usize;
    let (mut t_est, mut t_full) = (0.0, 0.0);
    while full < clients {
        let got = tokio::time::timeout(Duration::from_secs(300), rx.recv()).await;
        match got {
            Ok(Some((_, Seen::Established))) => {
                established += 1;
                if established == clients {
                    t_est = t0.elapsed().as_secs_f64();
                }
            }
            Ok(Some((_, Seen::Full))) => {
                full += 1;
                if full == clients {
                    t_full = t0.elapsed().as_secs_f64();
                }
            }
            Ok(Some(_)) => {}
            _ => {
                return Err(format!(
                    "stuck: {established} established, {full} full of {clients}, {} clients failed",
                    failed.load(Ordering::Relaxed)
                ))
            }
        }
    }
    // Let the initial convergence settle before the probe: a reflector may still be sending (repeats of
    // routes already held) after every client holds every block. The probe rounds measure one change on a
    // quiet reflector; the time until it went quiet is reported as `settled`.
    let quiet_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let last = Duration::from_nanos(LAST_UPDATE_NS.load(Ordering::Relaxed));
        if epoch().elapsed().saturating_sub(last) >= QUIET || Instant::now() > quiet_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let settled = (epoch() + Duration::from_nanos(LAST_UPDATE_NS.load(Ordering::Relaxed)))
        .saturating_duration_since(t0)
        .as_secs_f64();
    let repeats =
        ANNOUNCED.load(Ordering::Relaxed) as f64 / (clients as f64 * (clients as f64 - 1.0));
    // The probe: one more client announcing and withdrawing one block.
    let (mut probe_rd, mut probe) = connect_and_open(clients).await?.into_split();
    // The probe reads what the reflector sends it (the table, then the rounds' echoes), as a live client
    // does: a probe that never read would be a stalled client, a different measurement.
    tokio::spawn(async move {
        let mut buf = vec![0u8; 1 << 16];
        while probe_rd.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    });
    let mut join = Vec::new();
    let mut withdraw = Vec::new();
    for _ in 0..rounds {
        for announce in [true, false] {
            let msg = if announce {
                update(&[], Some((&PROBE_BLOCK, client_nh(clients))))
            } else {
                update(&[PROBE_BLOCK], None)
            };
            let sent = Instant::now();
            probe.write_all(&msg).await.map_err(|e| e.to_string())?;
            let mut seen = 0;
            let mut last = sent;
            while seen < clients {
                match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                    Ok(Some((_, Seen::Probe { announced, at }))) if announced == announce => {
                        seen += 1;
                        last = last.max(at);
                    }
                    Ok(Some(_)) => {}
                    _ => return Err(format!("probe: only {seen} of {clients} clients saw it")),
                }
            }
            let d = (last - sent).as_secs_f64();
            if std::env::var_os("RR_FANOUT_ROUNDS").is_some() {
                eprintln!(
                    "round {} {}: {:.1} ms",
                    withdraw.len(),
                    if announce { "join" } else { "withdraw" },
                    d * 1e3
                );
            }
            if announce {
                join.push(d);
            } else {
                withdraw.push(d);
            }
            // Between rounds, let keep-alive-free sessions settle.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // The restart storm: every tenth client drops its session and reconnects at once.
    storm.begun.store(true, Ordering::SeqCst);
    let t_storm = Instant::now();
    for (i, k) in storm.kick.iter().enumerate() {
        if storm.restarting[i] {
            k.notify_one();
        }
    }
    let mut back = 0usize;
    let mut storm_s = None;
    while back < clients {
        match tokio::time::timeout(Duration::from_secs(120), rx.recv()).await {
            Ok(Some((_, Seen::Back))) => {
                back += 1;
                if back == clients {
                    storm_s = Some(t_storm.elapsed().as_secs_f64());
                }
            }
            Ok(Some(_)) => {}
            _ => {
                eprintln!("restart storm: only {back} of {clients} clients got every route back");
                break;
            }
        }
    }
    Ok(Sim {
        established: t_est,
        full: t_full,
        settled,
        repeats,
        join,
        withdraw,
        storm: storm_s,
    })
}

/// Connect and exchange OPEN / KEEPALIVE, trying again while the reflector is not ready for this client
/// (BIRD accepts the TCP connection of a protocol it has not started yet and then closes it or stays
/// silent), for up to three minutes.
async fn connect_and_open(i: usize) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), try_connect_and_open(i)).await {
            Ok(Ok(s)) => return Ok(s),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e),
            Err(_) if Instant::now() > deadline => {
                return Err(format!("client {i}: no OPEN from the reflector"))
            }
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn try_connect_and_open(i: usize) -> Result<TcpStream, String> {
    let sock = TcpSocket::new_v4().map_err(|e| e.to_string())?;
    sock.bind((client_addr(i), 0).into())
        .map_err(|e| format!("bind {}: {e}", client_addr(i)))?;
    let mut s = sock
        .connect((REFLECTOR, 179).into())
        .await
        .map_err(|e| format!("connect from {}: {e}", client_addr(i)))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(&open(client_addr(i)))
        .await
        .map_err(|e| e.to_string())?;
    // OPEN, then KEEPALIVE from the reflector; we answer its OPEN with a KEEPALIVE.
    let mut got_open = false;
    loop {
        let (ty, _) = read_msg(&mut s).await?;
        match ty {
            1 => {
                got_open = true;
                s.write_all(&keepalive()).await.map_err(|e| e.to_string())?;
            }
            3 => return Err(format!("NOTIFICATION to client {i}")),
            4 if got_open => return Ok(s),
            _ => {}
        }
    }
}

/// How long no client may hear an UPDATE before the reflector counts as quiet.
const QUIET: Duration = Duration::from_millis(500);
/// When any client last read an UPDATE, in nanoseconds since [`epoch`].
static LAST_UPDATE_NS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
/// Announcements the clients read before the storm.
static ANNOUNCED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

async fn client(
    i: usize,
    clients: usize,
    tx: mpsc::UnboundedSender<(usize, Seen)>,
    storm: Arc<Storm>,
) -> Result<(), String> {
    // Every other client's block, by index; our own does not come back.
    let mut have: HashSet<u32> = HashSet::with_capacity(clients);
    let mut full_sent = false;
    // Restarted blocks not yet heard again since the storm began (None: no storm yet).
    let mut awaited: Option<HashSet<u32>> = None;
    let mut back_sent = false;
    let mut buf = vec![0u8; 1 << 16];
    'session: loop {
        let mut s = connect_and_open(i).await?;
        if awaited.is_none() {
            let _ = tx.send((i, Seen::Established));
        }
        // A new session starts from nothing: the reflector sends the whole table again.
        have.clear();
        let mut first = update(&[], Some((&client_block(i), client_nh(i))));
        first.extend_from_slice(&update(&[], None)); // End-of-RIB
        s.write_all(&first).await.map_err(|e| e.to_string())?;
        let mut len = 0usize;
        let mut ka_timer =
            tokio::time::interval_at(tokio::time::Instant::now() + KEEPALIVE, KEEPALIVE);
        loop {
            if len == buf.len() {
                buf.resize(buf.len() * 2, 0);
            }
            let r = tokio::select! {
                r = read_some(&s, &mut buf[len..]) => r.map_err(|e| e.to_string())?,
                _ = ka_timer.tick() => {
                    s.write_all(&keepalive()).await.map_err(|e| e.to_string())?;
                    continue;
                }
                _ = storm.kick[i].notified() => {
                    // The restart: close (no NOTIFICATION, as a crashed node) and connect again.
                    drop(s);
                    continue 'session;
                }
            };
            if r == 0 {
                return Err(format!("client {i}: reflector closed the session"));
            }
            if awaited.is_none() && storm.begun.load(Ordering::SeqCst) {
                awaited = Some(storm.blocks_for(i));
            }
            len += r;
            let mut off = 0;
            while len - off >= 19 {
                let mlen = u16::from_be_bytes([buf[off + 16], buf[off + 17]]) as usize;
                if len - off < mlen {
                    break;
                }
                if buf[off + 18] == 3 && mlen >= 21 {
                    return Err(format!(
                        "client {i}: NOTIFICATION {}/{} from the reflector",
                        buf[off + 19],
                        buf[off + 20]
                    ));
                }
                if buf[off + 18] == 2 {
                    LAST_UPDATE_NS
                        .fetch_max(epoch().elapsed().as_nanos() as u64, Ordering::Relaxed);
                    let body = &buf[off + 19..off + mlen];
                    let wl = u16::from_be_bytes([body[0], body[1]]) as usize;
                    for p in prefixes(&body[2..2 + wl]) {
                        if p == PROBE_BLOCK {
                            let _ = tx.send((
                                i,
                                Seen::Probe {
                                    announced: false,
                                    at: Instant::now(),
                                },
                            ));
                        } else {
                            have.remove(&u32::from_be_bytes(p));
                        }
                    }
                    let al = u16::from_be_bytes([body[2 + wl], body[3 + wl]]) as usize;
                    for p in prefixes(&body[4 + wl + al..]) {
                        if p == PROBE_BLOCK {
                            let _ = tx.send((
                                i,
                                Seen::Probe {
                                    announced: true,
                                    at: Instant::now(),
                                },
                            ));
                        } else {
                            if awaited.is_none() {
                                ANNOUNCED.fetch_add(1, Ordering::Relaxed);
                            }
                            let b = u32::from_be_bytes(p);
                            have.insert(b);
                            if let Some(a) = awaited.as_mut() {
                                a.remove(&b);
                            }
                        }
                    }
                }
                off += mlen;
            }
            buf.copy_within(off..len, 0);
            len -= off;
            let is_full = have.len() + 1 >= clients;
            if !full_sent && is_full {
                full_sent = true;
                let _ = tx.send((i, Seen::Full));
            }
            if !back_sent && is_full && awaited.as_ref().is_some_and(|a| a.is_empty()) {
                back_sent = true;
                let _ = tx.send((i, Seen::Back));
            }
        }
    }
}

/// Read what `s` holds, at most `buf.len()` bytes. A read shorter than the buffer emptied the socket, so it
/// also clears the socket's readiness: the next read waits for new data instead of making a second
/// system call that only says "would block". Half the simulator's reads: it shares the machine's cores
/// with the reflector, so every microsecond it spends per client and change is taken from the daemon
/// being measured (from a multi-threaded one more than from a single-threaded one).
async fn read_some(s: &TcpStream, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::os::fd::AsRawFd;
    let fd = s.as_raw_fd();
    loop {
        s.readable().await?;
        let mut got = None;
        let r = s.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: `buf` is valid for `buf.len()` bytes for the call.
            let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = n as usize;
            got = Some(n);
            if n > 0 && n < buf.len() {
                // The socket is empty now: report "would block" so the readiness is cleared (tokio
                // keeps it if a new event arrived meanwhile). The bytes read are in `got`.
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        });
        match (r, got) {
            (Ok(n), _) => return Ok(n),
            (Err(e), Some(n)) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(n),
            (Err(e), _) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            (Err(e), _) => return Err(e),
        }
    }
}

/// IPv4 prefixes of an NLRI field (no ADD-PATH), as 4 address bytes.
fn prefixes(mut b: &[u8]) -> Vec<[u8; 4]> {
    let mut out = Vec::new();
    while let Some(&bits) = b.first() {
        let n = (bits as usize).div_ceil(8);
        if b.len() < 1 + n || n > 4 {
            break;
        }
        let mut a = [0u8; 4];
        a[..n].copy_from_slice(&b[1..1 + n]);
        out.push(a);
        b = &b[1 + n..];
    }
    out
}

async fn read_msg(s: &mut TcpStream) -> Result<(u8, Vec<u8>), String> {
    let mut hdr = [0u8; 19];
    tokio::time::timeout(Duration::from_secs(60), s.read_exact(&mut hdr))
        .await
        .map_err(|_| "timed out waiting for the reflector".to_string())?
        .map_err(|e| format!("read: {e}"))?;
    let len = u16::from_be_bytes([hdr[16], hdr[17]]) as usize;
    if !(19..=65535).contains(&len) {
        return Err(format!("bad length {len}"));
    }
    let mut body = vec![0u8; len - 19];
    s.read_exact(&mut body)
        .await
        .map_err(|e| format!("read: {e}"))?;
    Ok((hdr[18], body))
}

fn header(out: &mut Vec<u8>, ty: u8, body_len: usize) {
    out.extend_from_slice(&[0xff; 16]);
    out.extend_from_slice(&((19 + body_len) as u16).to_be_bytes());
    out.push(ty);
}

/// The clients' hold time. Not 0 (no KEEPALIVEs at all, RFC 4271 4.2): gobgpd 3.10 sets every write's
/// deadline to now + hold time, so with 0 its first UPDATE times out and it drops the session. Long, so
/// the reflectors' KEEPALIVEs cost nothing measurable; the clients send theirs every [`KEEPALIVE`].
const HOLD_TIME: u16 = 240;
const KEEPALIVE: Duration = Duration::from_secs(60);

/// OPEN with hold time [`HOLD_TIME`], MP IPv4 unicast and 4-octet AS.
fn open(id: Ipv4Addr) -> Vec<u8> {
    let asn = AS.to_be_bytes();
    let caps: Vec<u8> = vec![
        2, 6, 1, 4, 0, 1, 0, 1, 2, 6, 65, 4, asn[0], asn[1], asn[2], asn[3],
    ];
    let mut body = vec![4];
    body.extend_from_slice(&(AS as u16).to_be_bytes());
    body.extend_from_slice(&HOLD_TIME.to_be_bytes());
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

/// An UPDATE withdrawing `withdrawn` /26s and announcing one /26 with ORIGIN IGP, an empty AS_PATH,
/// NEXT_HOP and LOCAL_PREF 100. Neither: End-of-RIB.
fn update(withdrawn: &[[u8; 4]], announce: Option<(&[u8; 4], Ipv4Addr)>) -> Vec<u8> {
    let mut w = Vec::new();
    for p in withdrawn {
        w.push(26);
        w.extend_from_slice(p);
    }
    let mut attrs = Vec::new();
    let mut nlri = Vec::new();
    if let Some((p, nh)) = announce {
        attrs.extend_from_slice(&[0x40, 1, 1, 0]);
        attrs.extend_from_slice(&[0x40, 2, 0]);
        attrs.extend_from_slice(&[0x40, 3, 4]);
        attrs.extend_from_slice(&nh.octets());
        attrs.extend_from_slice(&[0x40, 5, 4, 0, 0, 0, 100]);
        nlri.push(26);
        nlri.extend_from_slice(p);
    }
    let mut body = Vec::new();
    body.extend_from_slice(&(w.len() as u16).to_be_bytes());
    body.extend_from_slice(&w);
    body.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
    body.extend_from_slice(&attrs);
    body.extend_from_slice(&nlri);
    let mut out = Vec::new();
    header(&mut out, 2, body.len());
    out.extend_from_slice(&body);
    out
}
