//! Real BGP daemons for tests: BIRD 2, GoBGP and FRR, each started inside a test network namespace with
//! its own configuration and control socket in a temporary folder, and killed by PID when dropped (also
//! on panic). Plus the two-namespace link the session tests use, and a way to run margay's async code
//! with its sockets inside a namespace.
//!
//! ```text
//!   netns <tag>a (margay, the test's own runtime)      netns <tag>b (BIRD / GoBGP / FRR)
//!   10.0.0.1/24  fd00::1/64  ──── veth ────  10.0.0.2/24  fd00::2/64
//! ```
#![allow(dead_code)]

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{have, sh, try_sh, unique, Netns};

/// Two namespaces joined by a veth pair with the addresses in the module picture.
pub struct Link {
    pub margay_ns: String,
    pub peer_ns: String,
    _netns: Netns,
}

pub const MARGAY_V4: &str = "10.0.0.1";
pub const PEER_V4: &str = "10.0.0.2";
pub const MARGAY_V6: &str = "fd00::1";
pub const PEER_V6: &str = "fd00::2";

impl Link {
    pub fn new(tag: &str) -> Link {
        let a = unique(&format!("{tag}a"));
        let b = unique(&format!("{tag}b"));
        let netns = Netns::new(&[&a, &b]);
        let va = unique(&format!("{tag}x"));
        let vb = unique(&format!("{tag}y"));
        sh(&format!(
            "ip -n {a} link add {va} type veth peer name {vb} netns {b}"
        ));
        sh(&format!("ip -n {a} addr add {MARGAY_V4}/24 dev {va}"));
        sh(&format!("ip -n {a} addr add {MARGAY_V6}/64 dev {va} nodad"));
        sh(&format!("ip -n {b} addr add {PEER_V4}/24 dev {vb}"));
        sh(&format!("ip -n {b} addr add {PEER_V6}/64 dev {vb} nodad"));
        sh(&format!("ip -n {a} link set {va} up"));
        sh(&format!("ip -n {b} link set {vb} up"));
        Link {
            margay_ns: a,
            peer_ns: b,
            _netns: netns,
        }
    }
}

/// Run `f` on a fresh thread whose network namespace is `ns`, inside a current-thread tokio runtime, so
/// every socket margay opens lives in that namespace. Panics inside `f` propagate.
pub fn in_netns<F, Fut, T>(ns: &str, f: F) -> T
where
    F: FnOnce() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
    T: Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    let handle = std::thread::spawn(move || {
        let file = fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|e| panic!("setns {path}: {e}"));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        rt.block_on(f())
    });
    match handle.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    }
}

pub use super::wait_for;

/// A process we started; SIGKILLed (by PID) on drop.
struct Proc {
    child: Child,
    what: String,
}

impl Proc {
    fn spawn(what: &str, ns: &str, args: &[&str], log: &Path) -> Proc {
        let out = fs::File::create(log).expect("log file");
        let err = out.try_clone().expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("start {what}: {e}"));
        Proc {
            child,
            what: what.to_string(),
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // `ip netns exec` execs the daemon, so the child's PID is the daemon's.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid()),
            nix::sys::signal::Signal::SIGCONT,
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = &self.what;
    }
}

fn signal(pid: i32, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig)
        .unwrap_or_else(|e| panic!("kill -{sig} {pid}: {e}"));
}

fn read_log(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_default()
}

// ---------------------------------------------------------------- BIRD 2

pub fn have_bird() -> bool {
    have("bird") && have("birdc")
}

/// BIRD 2 in a namespace: `bird -f -c CONF -s CTL -P PIDFILE`.
pub struct Bird {
    pub dir: tempfile::TempDir,
    pub ns: String,
    proc: Option<Proc>,
}

impl Bird {
    /// Start BIRD with `conf` (a whole bird.conf) and wait until its control socket answers.
    pub fn start(ns: &str, conf: &str) -> Bird {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut b = Bird {
            dir,
            ns: ns.to_string(),
            proc: None,
        };
        fs::write(b.path("bird.conf"), conf).expect("write bird.conf");
        b.launch();
        b
    }

    fn launch(&mut self) {
        self.launch_with(&[]);
    }

    fn launch_with(&mut self, extra: &[&str]) {
        let conf = self.path("bird.conf");
        let ctl = self.path("bird.ctl");
        let pid = self.path("bird.pid");
        let log = self.path("bird.log");
        let mut args = vec!["bird", "-f", "-c", s(&conf), "-s", s(&ctl), "-P", s(&pid)];
        args.extend_from_slice(extra);
        let p = Proc::spawn("bird", &self.ns, &args, &log);
        self.proc = Some(p);
        wait_for("BIRD control socket", Duration::from_secs(20), || {
            let (ok, out) = try_sh(&format!("birdc -s {} show status", ctl.display()));
            if ok && out.contains("BIRD") {
                Ok(())
            } else {
                Err(format!("{out}\nlog: {}", read_log(&log)))
            }
        });
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn birdc(&self, cmd: &str) -> String {
        try_sh(&format!(
            "birdc -s {} {cmd}",
            self.path("bird.ctl").display()
        ))
        .1
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn stop_signal(&self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGSTOP);
    }

    pub fn cont_signal(&self) {
        signal(self.pid(), nix::sys::signal::Signal::SIGCONT);
    }

    /// SIGKILL, as a crash (no NOTIFICATION, no clean close).
    pub fn kill(&mut self) {
        self.proc = None;
    }

    /// Start again with the same configuration (after `kill`).
    pub fn restart(&mut self) {
        self.restart_with_args(&[]);
    }

    /// Start again with extra command line arguments (e.g. `-R`, graceful restart recovery).
    pub fn restart_with_args(&mut self, extra: &[&str]) {
        self.proc = None;
        self.launch_with(extra);
    }

    pub fn log(&self) -> String {
        read_log(&self.path("bird.log"))
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 temp path")
}

// ---------------------------------------------------------------- GoBGP

pub fn have_gobgp() -> bool {
    have("gobgpd") && have("gobgp")
}

/// GoBGP in a namespace with its API on the namespace's own loopback.
pub struct GoBgp {
    pub dir: tempfile::TempDir,
    pub ns: String,
    pub api_port: u16,
    proc: Option<Proc>,
}

impl GoBgp {
    /// Start gobgpd with `toml` and wait until its API answers.
    pub fn start(ns: &str, toml: &str) -> GoBgp {
        let dir = tempfile::tempdir().expect("tempdir");
        let api_port = 50051;
        let conf = dir.path().join("gobgpd.toml");
        fs::write(&conf, toml).expect("write gobgpd.toml");
        let log = dir.path().join("gobgpd.log");
        let api = format!("127.0.0.1:{api_port}");
        let p = Proc::spawn(
            "gobgpd",
            ns,
            &[
                "gobgpd",
                "-f",
                s(&conf),
                "-t",
                "toml",
                "-l",
                "info",
                "-p",
                "--api-hosts",
                &api,
                "--pprof-disable",
            ],
            &log,
        );
        let g = GoBgp {
            dir,
            ns: ns.to_string(),
            api_port,
            proc: Some(p),
        };
        wait_for("GoBGP API", Duration::from_secs(20), || {
            let (ok, out) = g.gobgp_ok("global");
            if ok {
                Ok(())
            } else {
                Err(format!("{out}\nlog: {}", g.log()))
            }
        });
        g
    }

    fn gobgp_ok(&self, args: &str) -> (bool, String) {
        try_sh(&format!(
            "ip netns exec {} gobgp -u 127.0.0.1 -p {} {args}",
            self.ns, self.api_port
        ))
    }

    pub fn gobgp(&self, args: &str) -> String {
        self.gobgp_ok(args).1
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("gobgpd.log"))
    }

    pub fn pid(&self) -> i32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }
}

// ---------------------------------------------------------------- FRR

pub fn have_frr() -> bool {
    have("/usr/lib/frr/bgpd") && have("/usr/lib/frr/zebra") && have("vtysh")
}

/// FRR (zebra + bgpd) in a namespace, running as user frr in a work folder it owns, with its own zserv
/// and vty sockets; bgpd does not touch the kernel (`-n`).
pub struct Frr {
    pub dir: tempfile::TempDir,
    pub ns: String,
    zebra: Option<Proc>,
    bgpd: Option<Proc>,
    bfdd: Option<Proc>,
}

pub fn have_bfdd() -> bool {
    have("/usr/lib/frr/bfdd")
}

impl Frr {
    /// Start zebra and bgpd; `bgpd_conf` is bgpd's whole configuration.
    pub fn start(ns: &str, bgpd_conf: &str) -> Frr {
        Frr::start_with(ns, bgpd_conf, None)
    }

    /// Start zebra, bfdd (with `bfdd_conf`) and bgpd: bgpd asks bfdd for sessions through zebra.
    pub fn start_with_bfdd(ns: &str, bgpd_conf: &str, bfdd_conf: &str) -> Frr {
        Frr::start_with(ns, bgpd_conf, Some(bfdd_conf))
    }

    fn start_with(ns: &str, bgpd_conf: &str, bfdd_conf: Option<&str>) -> Frr {
        let dir = tempfile::Builder::new()
            .prefix("margay-frr")
            .tempdir()
            .expect("tempdir");
        let d = dir.path().to_path_buf();
        fs::write(d.join("zebra.conf"), "hostname zebra\n").expect("zebra.conf");
        fs::write(d.join("bgpd.conf"), bgpd_conf).expect("bgpd.conf");
        if let Some(c) = bfdd_conf {
            fs::write(d.join("bfdd.conf"), c).expect("bfdd.conf");
        }
        sh(&format!(
            "chown -R frr:frr {0} && chmod 755 {0}",
            d.display()
        ));
        let zserv = d.join("zserv.api");
        let zserv_arg = s(&zserv).to_string();
        let vty = s(&d).to_string();
        let zebra = Proc::spawn(
            "zebra",
            ns,
            &[
                "/usr/lib/frr/zebra",
                "-u",
                "frr",
                "-g",
                "frr",
                "-z",
                &zserv_arg,
                "--vty_socket",
                &vty,
                "-P",
                "0",
                "-i",
                s(&d.join("zebra.pid")),
                "-f",
                s(&d.join("zebra.conf")),
            ],
            &d.join("zebra.log"),
        );
        wait_for("zebra's zserv socket", Duration::from_secs(20), || {
            if zserv.exists() {
                Ok(())
            } else {
                Err(read_log(&d.join("zebra.log")))
            }
        });
        let bfdd = bfdd_conf.map(|_| {
            let bfdd = Proc::spawn(
                "bfdd",
                ns,
                &[
                    "/usr/lib/frr/bfdd",
                    "-u",
                    "frr",
                    "-g",
                    "frr",
                    "-z",
                    &zserv_arg,
                    "--vty_socket",
                    &vty,
                    "-P",
                    "0",
                    "-i",
                    s(&d.join("bfdd.pid")),
                    "--bfdctl",
                    s(&d.join("bfdd.sock")),
                    "-f",
                    s(&d.join("bfdd.conf")),
                ],
                &d.join("bfdd.log"),
            );
            wait_for("bfdd's vty", Duration::from_secs(20), || {
                let (ok, out) = try_sh(&format!(
                    "vtysh --vty_socket {} -d bfdd -c 'show bfd peers json'",
                    d.display()
                ));
                if ok && out.trim_start().starts_with('[') {
                    Ok(())
                } else {
                    Err(format!("{out}\nlog: {}", read_log(&d.join("bfdd.log"))))
                }
            });
            bfdd
        });
        let bgpd = Proc::spawn(
            "bgpd",
            ns,
            &[
                "/usr/lib/frr/bgpd",
                "-u",
                "frr",
                "-g",
                "frr",
                "-z",
                &zserv_arg,
                "--vty_socket",
                &vty,
                "-P",
                "0",
                "-n",
                "-i",
                s(&d.join("bgpd.pid")),
                "-f",
                s(&d.join("bgpd.conf")),
            ],
            &d.join("bgpd.log"),
        );
        let f = Frr {
            dir,
            ns: ns.to_string(),
            zebra: Some(zebra),
            bgpd: Some(bgpd),
            bfdd,
        };
        wait_for("bgpd's vty", Duration::from_secs(20), || {
            let out = f.vtysh("show bgp summary json");
            if out.trim_start().starts_with('{') {
                Ok(())
            } else {
                Err(format!(
                    "{out}\nlog: {}",
                    read_log(&f.dir.path().join("bgpd.log"))
                ))
            }
        });
        f
    }

    pub fn vtysh(&self, cmd: &str) -> String {
        try_sh(&format!(
            "vtysh --vty_socket {} -d bgpd -c '{cmd}'",
            self.dir.path().display()
        ))
        .1
    }

    /// A vtysh command to bfdd.
    pub fn vtysh_bfdd(&self, cmd: &str) -> String {
        try_sh(&format!(
            "vtysh --vty_socket {} -d bfdd -c '{cmd}'",
            self.dir.path().display()
        ))
        .1
    }

    pub fn bfdd_log(&self) -> String {
        read_log(&self.dir.path().join("bfdd.log"))
    }

    pub fn bgpd_pid(&self) -> i32 {
        self.bgpd.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    pub fn log(&self) -> String {
        read_log(&self.dir.path().join("bgpd.log"))
    }
}

impl Drop for Frr {
    fn drop(&mut self) {
        self.bgpd = None;
        self.bfdd = None;
        self.zebra = None;
    }
}
