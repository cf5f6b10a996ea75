//! Driving `margay lab` from a test: bring a lab up under a guard that runs `lab down` on drop (also on
//! panic), read its nodes and pods, run commands in its namespaces, read margay's routes of a node. This is the
//! node_core_* tests' lab handle (a fixed node/pod count, daemon stop/restart with an environment); the
//! helpers that do not depend on it are [`super::lab`]'s.
#![allow(dead_code)]

#[allow(unused_imports)]
pub use super::lab::{in_ns, lab_prerequisites, path_str, proto77, read_state, run, run_output};

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

use ipnetwork::Ipv4Network;
use serde_json::Value;

/// The lab's etcd, as its nodes reach it.
pub const LAB_ETCD: &str = "http://10.99.0.2:2379";

/// A lab brought up with `margay lab up`; `margay lab down` runs on drop.
pub struct Lab {
    pub margay: String,
    pub name: String,
    pub state: PathBuf,
    pub nodes: Vec<(String, Ipv4Addr)>,
    /// (pod, node, address)
    pub pods: Vec<(String, String, Ipv4Addr)>,
    _dir: tempfile::TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(&self.margay)
            .args(["lab", "down", "--name", &self.name, "--state-dir"])
            .arg(&self.state)
            .status();
    }
}

impl Lab {
    /// `margay lab up --name <tag><pid> --nodes N --pods P` plus `extra` flags; panics with the logs on failure.
    pub fn up(margay: &str, tag: &str, nodes: usize, pods: usize, extra: &[&str]) -> Lab {
        let name = format!("{tag}{}", std::process::id() % 10000);
        // Every test module shares one process: two labs under one name would tear each other down.
        assert_eq!(
            super::claim(&format!("lab:{name}")),
            0,
            "lab name {name} is already used in this test process: give this test its own tag"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("lab");
        let mut lab = Lab {
            margay: margay.to_string(),
            name,
            state,
            nodes: Vec::new(),
            pods: Vec::new(),
            _dir: dir,
        };
        let (n, p) = (nodes.to_string(), pods.to_string());
        let (ok, out) = run(Command::new(margay)
            .args([
                "lab", "up", "--nodes", &n, "--pods", &p, "--name", &lab.name,
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(&lab.state));
        assert!(ok, "margay lab up failed:\n{out}\n{}", lab.logs());
        (lab.nodes, lab.pods) = read_state(&lab.state);
        lab
    }

    /// Every log of the lab's state directory (etcd and every daemon run), for failure messages.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&self.state)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        for p in files
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
        {
            s.push_str(&format!(
                "--- {}\n{}\n",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            ));
        }
        s
    }

    /// The text of every daemon log of `node` whose file name starts with `<node>` (first run and restarts).
    pub fn node_logs(&self, node: &str) -> String {
        let mut s = String::new();
        if let Ok(d) = std::fs::read_dir(&self.state) {
            for e in d.flatten() {
                let f = e.file_name().to_string_lossy().to_string();
                if f.starts_with(node) && f.ends_with(".log") {
                    s.push_str(&std::fs::read_to_string(e.path()).unwrap_or_default());
                }
            }
        }
        s
    }

    /// The PID of `node`'s daemon, from the lab's PID file.
    pub fn daemon_pid(&self, node: &str) -> i32 {
        std::fs::read_to_string(self.state.join(format!("{node}.pid")))
            .ok()
            .and_then(|p| p.trim().parse().ok())
            .unwrap_or_else(|| panic!("no PID file for {node}'s daemon"))
    }

    /// Send `sig` to `node`'s daemon and wait (bounded) until it has exited.
    pub fn stop_daemon(&self, node: &str, sig: nix::sys::signal::Signal) {
        use nix::sys::signal::kill;
        use nix::unistd::Pid;
        let pid = Pid::from_raw(self.daemon_pid(node));
        kill(pid, sig).unwrap_or_else(|e| panic!("signal {sig} to {node}'s daemon: {e}"));
        for _ in 0..200 {
            if kill(pid, None).is_err() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!("{node}'s daemon (pid {pid}) did not exit after {sig}");
    }

    /// `margay lab restart-node NODE` (also starts a daemon that is not running).
    pub fn restart_node(&self, node: &str) {
        self.restart_node_with_env(node, &[]);
    }

    /// `margay lab restart-node NODE` with extra environment for the new daemon (it inherits it).
    pub fn restart_node_with_env(&self, node: &str, env: &[(&str, &str)]) {
        let mut cmd = Command::new(&self.margay);
        cmd.args([
            "lab",
            "restart-node",
            node,
            "--name",
            &self.name,
            "--state-dir",
        ])
        .arg(&self.state);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let (ok, out) = run(&mut cmd);
        assert!(ok, "lab restart-node {node}: {out}");
    }

    /// `margay <args> --etcd-endpoints <lab etcd>` run inside `node`'s namespace.
    pub fn margay_in(&self, node: &str, args: &[&str]) -> (bool, String) {
        let mut all: Vec<&str> = vec![self.margay.as_str()];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--etcd-endpoints", LAB_ETCD]);
        in_ns(node, &all)
    }

    /// `margay status -o json` of `node`'s daemon.
    pub fn status(&self, node: &str) -> Option<Value> {
        let (ok, out) = in_ns(node, &[&self.margay, "status", "-o", "json"]);
        ok.then(|| serde_json::from_str(&out).ok()).flatten()
    }

    /// Poll (bounded) until `node` reports ready; returns the last status.
    pub fn wait_ready(&self, node: &str) -> Value {
        let mut last = None;
        for _ in 0..600 {
            last = self.status(node);
            if last.as_ref().is_some_and(|s| s["ready"]["ready"] == true) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        let last = last.unwrap_or(Value::Null);
        assert_eq!(
            last["ready"]["ready"],
            true,
            "{node} never became ready: {last}\n{}",
            self.node_logs(node)
        );
        last
    }

    /// Run the lab's margay-cni for `pod` on `node` with `command` (as the lab's runtime does).
    pub fn cni(&self, node: &str, pod: &str, command: &str) -> (bool, String) {
        use std::io::Write;
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "margay",
            "socket": self.state.join(node).join("cni.sock"),
        });
        let bin = self.state.join("cni-bin");
        let mut child = Command::new("ip")
            .args(["netns", "exec", node])
            .arg(bin.join("margay"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", pod)
            .env("CNI_NETNS", format!("/var/run/netns/{pod}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", &bin)
            .env(
                "CNI_ARGS",
                format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}"),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn margay-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.to_string().as_bytes())
            .expect("write config");
        run_output(child.wait_with_output())
    }
}

/// The node's own block: its one blackhole route.
pub fn own_block(ns: &str) -> Ipv4Network {
    let own: Vec<Ipv4Network> = proto77(ns)
        .into_iter()
        .filter(|(_, via)| via.is_none())
        .map(|(p, _)| p)
        .collect();
    assert_eq!(own.len(), 1, "{ns} should own one block: {own:?}");
    own[0]
}

/// Poll (bounded) until `f` holds; false if it never did.
pub fn eventually(limit: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = std::time::Instant::now() + limit;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= end {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}
