//! The real `margay reflector` binary for topology tests: a star of network namespaces around a bridge
//! (margay in the hub, one namespace per client), and a launcher that runs the reflector with a temporary
//! config file and state dir, its own status endpoint, and kills it by PID on drop.
//!
//! ```text
//!                       netns <u>r (margay reflector, bridge <u>br)
//!                       10.1.0.1/24  fd01::1/64   status on 127.0.0.1:9190
//!                 ┌──────────────┬───────┴──────┬──────────────┐
//!   netns <u>c1 10.1.0.2   <u>c2 10.1.0.3   <u>c3 10.1.0.4   ...  (fd01::2, fd01::3, ...)
//! ```
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::bgp_peers::wait_for;
use super::{sh, try_sh, unique, Netns};

pub const RR_V4: &str = "10.1.0.1";
pub const RR_V6: &str = "fd01::1";
/// The reflector's AS: 4-octet, so every session exercises RFC 6793.
pub const RR_AS: u32 = 4200000001;
pub const RR_ROUTER_ID: &str = "10.1.0.1";
pub const RR_CLUSTER_ID: &str = "1.1.1.1";
pub const STATUS: &str = "127.0.0.1:9190";

/// Client `i` (from 1): its IPv4 and IPv6 addresses on the bridge.
pub fn client_v4(i: usize) -> String {
    format!("10.1.0.{}", i + 1)
}
pub fn client_v6(i: usize) -> String {
    format!("fd01::{:x}", i + 1)
}

/// The hub namespace with a bridge and `n` client namespaces, each on a veth port of the bridge.
pub struct Star {
    pub hub: String,
    pub clients: Vec<String>,
    _netns: Netns,
}

impl Star {
    pub fn new(tag: &str, n: usize) -> Star {
        let hub = unique(&format!("{tag}r"));
        let clients: Vec<String> = (1..=n).map(|i| unique(&format!("{tag}c{i}"))).collect();
        let mut names: Vec<&str> = vec![&hub];
        names.extend(clients.iter().map(String::as_str));
        let netns = Netns::new(&names);
        let br = unique(&format!("{tag}br"));
        sh(&format!("ip -n {hub} link add {br} type bridge"));
        sh(&format!("ip -n {hub} addr add {RR_V4}/24 dev {br}"));
        sh(&format!("ip -n {hub} addr add {RR_V6}/64 dev {br} nodad"));
        sh(&format!("ip -n {hub} link set {br} up"));
        for (k, c) in clients.iter().enumerate() {
            let i = k + 1;
            let a = unique(&format!("{tag}h{i}"));
            let b = unique(&format!("{tag}p{i}"));
            sh(&format!(
                "ip -n {hub} link add {a} type veth peer name {b} netns {c}"
            ));
            sh(&format!("ip -n {hub} link set {a} master {br} up"));
            sh(&format!("ip -n {c} addr add {}/24 dev {b}", client_v4(i)));
            sh(&format!(
                "ip -n {c} addr add {}/64 dev {b} nodad",
                client_v6(i)
            ));
            sh(&format!("ip -n {c} link set {b} up"));
        }
        Star {
            hub,
            clients,
            _netns: netns,
        }
    }

    /// Client `i`'s namespace (from 1).
    pub fn ns(&self, i: usize) -> &str {
        &self.clients[i - 1]
    }
}

/// The YAML head every reflector config shares: BGPConfiguration (no mesh) and the reflector's Node.
pub fn config_head() -> String {
    format!(
        "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\n\
         spec:\n  asNumber: {RR_AS}\n  nodeToNodeMeshEnabled: false\n---\n\
         apiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: rr\n\
         spec:\n  bgp:\n    ipv4Address: {RR_V4}/24\n    ipv6Address: {RR_V6}/64\n    \
         routeReflectorClusterID: {RR_CLUSTER_ID}\n"
    )
}

/// One BGPPeer document; `extra` is more `spec:` lines, each indented by two spaces.
pub fn bgp_peer(name: &str, ip: &str, asn: u32, extra: &str) -> String {
    format!(
        "---\napiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata:\n  name: {name}\n\
         spec:\n  peerIP: {ip}\n  asNumber: {asn}\n{extra}"
    )
}

/// A Secret holding a BGP password, and the BGPPeer lines that use it.
pub fn password_secret(name: &str, key: &str, value: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: {name}\n  namespace: calico-system\n\
         stringData:\n  {key}: {value}\n"
    )
}
pub fn password_ref(name: &str, key: &str) -> String {
    format!("  password:\n    secretKeyRef:\n      name: {name}\n      key: {key}\n")
}

/// `margay reflector` running in the hub namespace.
pub struct Reflector {
    pub dir: tempfile::TempDir,
    pub ns: String,
    child: Option<Child>,
    starts: usize,
}

impl Reflector {
    /// Write `config` and start the reflector; wait until its status endpoint answers.
    pub fn start(ns: &str, config: &str) -> Reflector {
        let dir = tempfile::tempdir().expect("tempdir");
        fs::create_dir_all(dir.path().join("state")).expect("state dir");
        let mut r = Reflector {
            dir,
            ns: ns.to_string(),
            child: None,
            starts: 0,
        };
        r.write_config(config);
        r.launch();
        r
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("reflector.yaml")
    }

    pub fn write_config(&self, config: &str) {
        fs::write(self.config_path(), config).expect("write reflector.yaml");
    }

    fn log_path(&self, n: usize) -> PathBuf {
        self.dir.path().join(format!("reflector.{n}.log"))
    }

    fn launch(&mut self) {
        self.starts += 1;
        let log = fs::File::create(self.log_path(self.starts)).expect("log file");
        let err = log.try_clone().expect("log file");
        let state = self.dir.path().join("state");
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns,
                env!("CARGO_BIN_EXE_margay"),
                "reflector",
            ])
            .arg("--config")
            .arg(self.config_path())
            .args(["--node-name", "rr", "--router-id", RR_ROUTER_ID])
            .args([
                "--cluster-id",
                RR_CLUSTER_ID,
                "--listen",
                RR_V4,
                "--listen",
                RR_V6,
            ])
            .args(["--port", "179", "--http-listen", STATUS, "--state-dir"])
            .arg(&state)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("start margay reflector");
        self.child = Some(child);
        wait_for("margay's status endpoint", Duration::from_secs(30), || {
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("margay reflector exited ({st}):\n{}", self.log());
            }
            self.status_json().map(|_| ())
        });
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Is the process still running (not exited)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig)
            .unwrap_or_else(|e| panic!("kill -{sig} margay: {e}"));
    }

    /// SIGTERM and wait for the process to exit (a graceful-restart stop).
    pub fn terminate(&mut self) {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        let mut child = self.child.take().expect("running");
        let st = wait_for(
            "margay to exit on SIGTERM",
            Duration::from_secs(30),
            || match child.try_wait() {
                Ok(Some(st)) => Ok(st),
                _ => Err(String::new()),
            },
        );
        assert!(st.success(), "margay exited with {st} on SIGTERM");
    }

    /// Start again with the same config and state dir.
    pub fn start_again(&mut self) {
        assert!(self.child.is_none(), "still running");
        self.launch();
    }

    /// `margay status -o json --endpoint ...` in the hub namespace.
    pub fn status_json(&self) -> Result<serde_json::Value, String> {
        let (ok, out) = try_sh(&format!(
            "ip netns exec {} {} status -o json --endpoint {STATUS} 2>&1",
            self.ns,
            env!("CARGO_BIN_EXE_margay")
        ));
        if !ok {
            return Err(out);
        }
        serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
    }

    /// The status entry of the peer at `addr` (`Err` with the whole report when absent).
    pub fn peer(&self, addr: &str) -> Result<serde_json::Value, String> {
        let st = self.status_json()?;
        st["peers"]
            .as_array()
            .and_then(|ps| ps.iter().find(|p| p["address"] == addr).cloned())
            .ok_or_else(|| format!("no peer {addr} in {st:#}"))
    }

    /// The table form, for messages.
    pub fn status_table(&self) -> String {
        try_sh(&format!(
            "ip netns exec {} {} status --endpoint {STATUS} 2>&1",
            self.ns,
            env!("CARGO_BIN_EXE_margay")
        ))
        .1
    }

    /// Every log line of every start so far.
    pub fn log(&self) -> String {
        (1..=self.starts)
            .map(|n| fs::read_to_string(self.log_path(n)).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n--- restart ---\n")
    }

    pub fn dir_path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Reflector {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
