//! Helpers shared by the integration tests: prerequisites, network namespaces that clean up after
//! themselves, and finding free loopback ports.
#![allow(dead_code)]

use std::process::Command;

/// True when running under CI (`CI=true`): a missing prerequisite is then a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Check a prerequisite. Returns true when it is met. When it is not: under CI the test panics with
/// `why`; elsewhere it prints a skip message and returns false so the test can return early.
pub fn require(ok: bool, test: &str, why: &str) -> bool {
    if ok {
        return true;
    }
    if in_ci() {
        panic!("{test}: prerequisite missing under CI=true: {why}");
    }
    eprintln!("SKIP {test}: {why} (set CI=true to make this a failure)");
    false
}

/// Is the process root (needed for network namespaces)?
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// Is `bin` on PATH (or an absolute path that exists)?
pub fn have(bin: &str) -> bool {
    if bin.starts_with('/') {
        return std::path::Path::new(bin).exists();
    }
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin} >/dev/null 2>&1"))
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Run a command, panicking with its stderr when it fails. Returns stdout.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("spawn sh");
    if !out.status.success() {
        panic!(
            "command failed ({}): {cmd}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run a command, returning (success, stdout+stderr) without panicking.
pub fn try_sh(cmd: &str) -> (bool, String) {
    match Command::new("sh").arg("-c").arg(cmd).output() {
        Ok(out) => {
            let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
            s.push_str(&String::from_utf8_lossy(&out.stderr));
            (out.status.success(), s)
        }
        Err(e) => (false, e.to_string()),
    }
}

/// A name unique to this test process and `tag`, so parallel tests and runs never collide:
/// `mgt<pid%100000><tag>`. Every test module shares one process, so a tag already handed out (by this
/// module or another) gets `mg<pid><n><tag>` instead, the same length plus one. Linux limits interface
/// names to 15 bytes; keep tags short.
pub fn unique(tag: &str) -> String {
    let pid = std::process::id() % 100000;
    match claim(&format!("unique:{tag}")) {
        0 => format!("mgt{pid}{tag}"),
        n => format!("mg{pid}{}{tag}", base36(n)),
    }
}

/// How many times `key` was claimed before in this process (0 the first time). The names tests give to
/// namespaces, labs and interfaces go through here so two modules choosing the same tag do not collide.
pub fn claim(key: &str) -> usize {
    static SEEN: std::sync::Mutex<Option<std::collections::HashMap<String, usize>>> =
        std::sync::Mutex::new(None);
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    let count = seen
        .get_or_insert_with(Default::default)
        .entry(key.to_string())
        .or_insert(0);
    *count += 1;
    *count - 1
}

fn base36(n: usize) -> char {
    char::from_digit((n % 36) as u32, 36).unwrap_or('z')
}

/// A set of network namespaces that are deleted when the guard drops (also on panic).
pub struct Netns {
    pub names: Vec<String>,
}

impl Netns {
    pub fn new(names: &[&str]) -> Netns {
        let mut g = Netns { names: Vec::new() };
        for n in names {
            let _ = try_sh(&format!("ip netns del {n} 2>/dev/null"));
            sh(&format!("ip netns add {n}"));
            sh(&format!("ip -n {n} link set lo up"));
            g.names.push(n.to_string());
        }
        g
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in &self.names {
            // Kill anything we left running inside before deleting.
            let _ = try_sh(&format!("ip netns pids {n} 2>/dev/null | xargs -r kill -9"));
            let _ = try_sh(&format!("ip netns del {n}"));
        }
    }
}

/// Poll `f` every 50 ms until it holds or `limit` passes; false if it never held. The one polling helper
/// of the tests: a generous limit is a hang guard, not a speed assertion (timing belongs to benchmarks).
pub fn eventually(limit: std::time::Duration, f: impl FnMut() -> bool) -> bool {
    poll_every(limit, std::time::Duration::from_millis(50), f)
}

/// The loop under [`eventually`] and [`wait_for`]: `f` every `every` until it holds or `limit` passes.
fn poll_every(
    limit: std::time::Duration,
    every: std::time::Duration,
    mut f: impl FnMut() -> bool,
) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(every);
    }
}

/// [`eventually`] for an observation: poll `f` until it returns Ok and give its value; panic naming `what`
/// and the last reason `f` gave when `limit` passes. Every 200 ms: observations here run commands
/// (`birdc`, `gobgp`, `vtysh`).
pub fn wait_for<T>(
    what: &str,
    limit: std::time::Duration,
    mut f: impl FnMut() -> Result<T, String>,
) -> T {
    let mut last = String::new();
    let mut value = None;
    poll_every(limit, std::time::Duration::from_millis(200), || match f() {
        Ok(v) => {
            value = Some(v);
            true
        }
        Err(why) => {
            last = why;
            false
        }
    });
    value
        .unwrap_or_else(|| panic!("gave up waiting for {what} after {limit:?}; last seen:\n{last}"))
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests that start a server next).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}
pub mod bgp_peers;
pub mod dataplane;

pub mod etcd;
pub mod lab;
pub mod podman;
pub mod reflector;
pub mod session;
pub mod subnets;
pub mod wire;
