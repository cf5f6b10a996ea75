//! The one lab handle of the tests: bring a `margay lab` up under a unique name with a guard that runs
//! `margay lab down` on drop (also on panic), read its nodes and pods, stop and restart daemons, run
//! margay-cni and commands in its namespaces, read `margay status` and margay's kernel routes.
#![allow(dead_code)]

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use ipnetwork::Ipv4Network;
use serde_json::Value;

pub use super::eventually;
use super::{have, is_root, require};

pub const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
/// The lab's etcd, as seen from inside its namespaces.
pub const ETCD: &str = "http://10.99.0.2:2379";

/// The node's own block: its one blackhole route of margay's protocol in namespace `ns`.
pub fn own_block(ns: &str) -> Ipv4Network {
    let own: Vec<Ipv4Network> = proto77(ns)
        .into_iter()
        .filter(|(_, via)| via.is_none())
        .map(|(p, _)| p)
        .collect();
    assert_eq!(own.len(), 1, "{ns} should own one block: {own:?}");
    own[0]
}

/// The prerequisites of a lab (root, etcd, etcdctl, ip, ping); false (SKIP) or a panic under CI.
pub fn lab_prerequisites(test: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(
            have("etcd"),
            test,
            "etcd is not installed (scripts/install-deps.sh)",
        )
        && require(
            have("etcdctl"),
            test,
            "etcdctl is not installed (etcd-client)",
        )
        && require(have("ip"), test, "iproute2 is not installed")
        && require(have("ping"), test, "ping is not installed (iputils-ping)")
}

/// A running lab; `margay lab down` when dropped.
pub struct Lab {
    pub name: String,
    pub state: PathBuf,
    _dir: tempfile::TempDir,
    pub nodes: Vec<(String, Ipv4Addr)>,
    /// (pod, node, address)
    pub pods: Vec<(String, String, Ipv4Addr)>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = Command::new(MARGAY)
            .args(["lab", "down", "--name", &self.name, "--state-dir"])
            .arg(&self.state)
            .output();
    }
}

impl Lab {
    /// `margay lab up` with `flags` under a name unique to this process and `tag`; panics (with the logs)
    /// when it fails.
    pub fn up(tag: &str, flags: &[&str]) -> Lab {
        Lab::start(format!("mg{tag}{}", std::process::id() % 100000), flags)
    }

    /// `margay lab up --nodes N --pods P` plus `extra` flags, under the name `<tag><pid % 10000>`.
    pub fn with(tag: &str, nodes: usize, pods: usize, extra: &[&str]) -> Lab {
        let (n, p) = (nodes.to_string(), pods.to_string());
        let mut flags = vec!["--nodes", n.as_str(), "--pods", p.as_str()];
        flags.extend_from_slice(extra);
        Lab::start(format!("{tag}{}", std::process::id() % 10000), &flags)
    }

    fn start(name: String, flags: &[&str]) -> Lab {
        // Every test module shares one process: two labs under one name would tear each other down.
        assert_eq!(
            super::claim(&format!("lab:{name}")),
            0,
            "lab name {name} is already used in this test process: give this test its own tag"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("lab");
        let mut lab = Lab {
            name,
            state,
            _dir: dir,
            nodes: Vec::new(),
            pods: Vec::new(),
        };
        let (ok, out) = lab.margay_lab("up", flags);
        assert!(ok, "margay lab up failed:\n{out}\n{}", lab.logs());
        lab.reload();
        lab
    }

    pub fn margay_lab(&self, cmd: &str, args: &[&str]) -> (bool, String) {
        run(Command::new(MARGAY)
            .args(["lab", cmd])
            .args(args)
            .args(["--name", &self.name, "--state-dir"])
            .arg(&self.state))
    }

    /// Re-read nodes and pods from lab.json.
    pub fn reload(&mut self) {
        (self.nodes, self.pods) = read_state(&self.state);
    }

    pub fn node(&self, i: usize) -> &str {
        &self.nodes[i].0
    }

    /// The first pod on `node`.
    pub fn pod_on(&self, node: &str) -> (String, Ipv4Addr) {
        self.pods
            .iter()
            .find(|(_, n, _)| n == node)
            .map(|(p, _, ip)| (p.clone(), *ip))
            .unwrap_or_else(|| panic!("no pod on {node}"))
    }

    /// Every log file of the lab, for a failure message.
    pub fn logs(&self) -> String {
        let mut s = String::new();
        if let Ok(d) = std::fs::read_dir(&self.state) {
            let mut files: Vec<PathBuf> = d
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "log"))
                .collect();
            files.sort();
            for p in files {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                // The tail is what matters; whole logs drown the assertion.
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                s.push_str(&format!("--- {}\n", p.display()));
                for l in tail.iter().rev() {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }

    /// The node's own block: its blackhole route of margay's protocol.
    pub fn own_block(&self, node: &str) -> Ipv4Network {
        let own: Vec<Ipv4Network> = proto77(node)
            .into_iter()
            .filter(|(_, via)| via.is_none())
            .map(|(p, _)| p)
            .collect();
        assert_eq!(own.len(), 1, "{node} should own one block: {own:?}");
        own[0]
    }

    /// Run margay-cni as `node`'s runtime would, with `conf` on stdin and extra environment.
    pub fn cni(
        &self,
        node: &str,
        pod: &str,
        command: &str,
        conf: &str,
        env: &[(&str, &str)],
    ) -> (bool, String) {
        use std::io::Write;
        let bin = self.state.join("cni-bin");
        let mut c = Command::new("ip");
        c.args(["netns", "exec", node])
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
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            c.env(k, v);
        }
        let mut child = c.spawn().expect("spawn margay-cni");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(conf.as_bytes())
            .expect("write config");
        run_output(child.wait_with_output())
    }

    /// The CNI configuration the lab uses for `node`.
    pub fn cni_conf(&self, node: &str) -> Value {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "margay",
            "socket": self.state.join(node).join("cni.sock"),
        })
    }

    pub fn socket(&self, node: &str) -> PathBuf {
        self.state.join(node).join("cni.sock")
    }

    pub fn state_path(&self, p: &str) -> PathBuf {
        self.state.join(p)
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
        let mut cmd = Command::new(MARGAY);
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
        let mut all: Vec<&str> = vec![MARGAY];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--etcd-endpoints", ETCD]);
        in_ns(node, &all)
    }

    /// `margay status -o json` of `node`'s daemon.
    pub fn status(&self, node: &str) -> Option<Value> {
        let (ok, out) = in_ns(node, &[MARGAY, "status", "-o", "json"]);
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

    /// Run the lab's margay-cni for `pod` on `node` with `command` and the lab's own configuration (as the
    /// lab's runtime does).
    pub fn pod_cni(&self, node: &str, pod: &str, command: &str) -> (bool, String) {
        self.cni(node, pod, command, &self.cni_conf(node).to_string(), &[])
    }
}

/// Nodes (name, address) and pods (name, node, address) as `margay lab up` recorded them in `<state>/lab.json`.
pub type LabMembers = (Vec<(String, Ipv4Addr)>, Vec<(String, String, Ipv4Addr)>);

/// Read `<state>/lab.json` (panics with the reason: a test cannot go on without it).
pub fn read_state(state: &Path) -> LabMembers {
    let lab: Value =
        serde_json::from_slice(&std::fs::read(state.join("lab.json")).expect("lab.json after up"))
            .expect("lab.json is JSON");
    let nodes = lab["nodes"]
        .as_array()
        .expect("nodes")
        .iter()
        .map(|n| {
            (
                n["name"].as_str().expect("node name").to_string(),
                n["ip"].as_str().expect("node ip").parse().expect("node ip"),
            )
        })
        .collect();
    let pods = lab["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().expect("pod name").to_string(),
                p["node"].as_str().expect("pod node").to_string(),
                p["ip"].as_str().expect("pod ip").parse().expect("pod ip"),
            )
        })
        .collect();
    (nodes, pods)
}

pub fn run(cmd: &mut Command) -> (bool, String) {
    run_output(cmd.output())
}

pub fn run_output(o: std::io::Result<std::process::Output>) -> (bool, String) {
    match o {
        Ok(o) => (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        ),
        Err(e) => (false, e.to_string()),
    }
}

pub fn in_ns(ns: &str, args: &[&str]) -> (bool, String) {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// The routes of margay's protocol in a namespace: (prefix, Some(gateway)) or (prefix, None) for a blackhole.
pub fn proto77(ns: &str) -> Vec<(Ipv4Network, Option<Ipv4Addr>)> {
    let (ok, out) = run(Command::new("ip").args(["-n", ns, "route", "show", "proto", "77"]));
    assert!(ok, "ip route show in {ns}: {out}");
    out.lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            if w.first() == Some(&"blackhole") {
                Some((w.get(1)?.parse().ok()?, None))
            } else {
                let via = w.iter().position(|x| *x == "via")?;
                Some((w.first()?.parse().ok()?, w.get(via + 1)?.parse().ok()))
            }
        })
        .collect()
}

/// `margay status -o json` in `ns` (at `endpoint` when given).
pub fn status_json(ns: &str, endpoint: Option<&str>) -> Result<Value, String> {
    let mut args = vec![MARGAY, "status", "-o", "json"];
    if let Some(e) = endpoint {
        args.extend(["--endpoint", e]);
    }
    let (ok, out) = in_ns(ns, &args);
    if !ok {
        return Err(out);
    }
    serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))
}

/// ping's own summary: (transmitted, received).
pub fn ping_summary(out: &str) -> Option<(u64, u64)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let nums: Vec<u64> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    Some((*nums.first()?, *nums.get(1)?))
}

/// Keys under `prefix` in the lab's etcd (read with etcdctl inside `ns`).
pub fn etcd_keys(ns: &str, prefix: &str) -> Vec<String> {
    let (ok, out) = in_ns(
        ns,
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "get",
            "--prefix",
            "--keys-only",
            prefix,
        ],
    );
    assert!(ok, "etcdctl get {prefix}: {out}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

pub fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// `GET path` from `addr` inside network namespace `ns` (a thread that enters the namespace; HTTP/1.0 so the
/// server closes). Returns (status code, body).
pub fn http_get(ns: &str, addr: &str, path: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    let ns_path = format!("/var/run/netns/{ns}");
    let addr = addr.to_string();
    let path = path.to_string();
    std::thread::spawn(move || -> Result<(u16, String), String> {
        let f = std::fs::File::open(&ns_path).map_err(|e| format!("{ns_path}: {e}"))?;
        nix::sched::setns(f.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
            .map_err(|e| format!("setns {ns_path}: {e}"))?;
        let mut s = std::net::TcpStream::connect(&addr).map_err(|e| format!("{addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").map_err(|e| e.to_string())?;
        let mut text = String::new();
        s.read_to_string(&mut text).map_err(|e| e.to_string())?;
        let code = text
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("not HTTP: {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        Ok((code, body.to_string()))
    })
    .join()
    .map_err(|_| "HTTP thread panicked".to_string())?
}

/// margay's pod veths in a node namespace.
pub fn pod_veths(node: &str) -> Vec<String> {
    let (ok, out) = in_ns(node, &["ip", "-o", "link", "show"]);
    assert!(ok, "ip link in {node}: {out}");
    out.lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with("mg"))
        .collect()
}

/// "IPS IN USE" of `block` in `margay ipam show --show-blocks`.
pub fn block_in_use(node: &str, block: Ipv4Network) -> u64 {
    let (ok, out) = in_ns(
        node,
        &[
            MARGAY,
            "ipam",
            "show",
            "--show-blocks",
            "--etcd-endpoints",
            ETCD,
        ],
    );
    assert!(ok, "ipam show: {out}");
    let row = out
        .lines()
        .find(|l| l.contains(&format!(" {block} ")))
        .unwrap_or_else(|| panic!("no row for {block} in:\n{out}"));
    let cols: Vec<&str> = row.split('|').map(str::trim).collect();
    cols.get(4)
        .and_then(|c| c.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read IPS IN USE from {row:?}"))
}

pub fn ipam_check(node: &str) -> String {
    let (ok, out) = in_ns(node, &[MARGAY, "ipam", "check", "--etcd-endpoints", ETCD]);
    assert!(ok, "ipam check: {out}");
    out
}

/// A stand-in for kube-proxy in namespace `ns` (a node): traffic to the service address `service` is
/// DNATed to `backend`, and traffic from outside `cluster_cidr` is also masqueraded on the way out (as
/// kube-proxy's KUBE-MARK-MASQ does for a cluster IP reached from outside `--cluster-cidr`), so replies
/// return through this node. One nft table, `kubeproxy`, created only inside `ns`.
pub fn kube_proxy_dnat(ns: &str, service: &str, backend: &str, cluster_cidr: &str) {
    let rules = format!(
        "table ip kubeproxy {{
  chain pre {{
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr {service} ip saddr != {cluster_cidr} meta mark set 0x4000
    ip daddr {service} dnat to {backend}
  }}
  chain out {{
    type nat hook output priority -100; policy accept;
    ip daddr {service} dnat to {backend}
  }}
  chain post {{
    type nat hook postrouting priority srcnat; policy accept;
    meta mark 0x4000 masquerade
  }}
}}
"
    );
    let file = tempfile::NamedTempFile::new().expect("tempfile");
    std::fs::write(file.path(), rules).expect("write nft rules");
    let (ok, out) = in_ns(ns, &["nft", "-f", &path_str(file.path())]);
    assert!(ok, "nft -f (kube-proxy stand-in) in {ns}: {out}");
}
