//! Harness for the CNI tests: an in-memory [`CniBackend`] with hooks (block, rendezvous, delay), the real
//! socket server running it, and the real `margay-cni` binary run exactly as a runtime runs it (a clean
//! environment with the CNI_* variables, the configuration on stdin).
#![allow(dead_code)]

pub mod veth;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use margay::cni::backend::{
    Attachment, CniBackend, DelRequest, GcRequest, PodRequest, StatusRequest,
};
use margay::cni::types::{cidr, CniError, Dns, Route, ValidAttachment};
use margay::cni::{CniServer, ServerConfig, ServerError};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;
use tokio::sync::{oneshot, Barrier, Notify};

/// What the test backend does before answering an ADD for a given container id.
#[derive(Clone)]
pub enum Hook {
    /// Wait until notified (a backend that hangs).
    Block(Arc<Notify>),
    /// Wait until as many ADDs as the barrier counts have arrived (proves they run at the same time).
    Rendezvous(Arc<Barrier>),
    /// Take this long (to make overlapping requests for the same container likely if they were allowed).
    Delay(Duration),
    /// Fail with this error.
    Fail(CniError),
}

#[derive(Default)]
pub struct State {
    next: u32,
    pub allocs: HashMap<(String, String), ipnetwork::IpNetwork>,
    /// Every call in order: "add-start c1", "add-done c1", "del c1", "check c1", "status", "gc".
    pub events: Vec<String>,
    in_flight: HashMap<String, usize>,
    /// Highest number of calls seen at once for one container id.
    pub max_same_container: usize,
    pub gc_calls: Vec<Vec<ValidAttachment>>,
    pub dels: Vec<DelRequest>,
    pub adds: Vec<PodRequest>,
    pub status_error: Option<CniError>,
    /// DEL fails with this while set (e.g. code 11, as with etcd unreachable).
    pub del_error: Option<CniError>,
    /// ADD futures dropped before they finished (abandoned by the server).
    pub cancelled: Vec<String>,
}

#[derive(Default)]
pub struct TestBackend {
    pub state: Mutex<State>,
    pub hooks: Mutex<HashMap<String, Hook>>,
}

/// Marks a container's call as in flight; records a cancellation if dropped before `done`.
struct InFlight<'a> {
    b: &'a TestBackend,
    key: String,
    done: bool,
}

impl<'a> InFlight<'a> {
    fn enter(b: &'a TestBackend, key: &str) -> InFlight<'a> {
        let mut s = b.state.lock().unwrap();
        let n = s.in_flight.entry(key.to_string()).or_default();
        *n += 1;
        let n = *n;
        s.max_same_container = s.max_same_container.max(n);
        InFlight {
            b,
            key: key.to_string(),
            done: false,
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut s = self.b.state.lock().unwrap();
        if let Some(n) = s.in_flight.get_mut(&self.key) {
            *n -= 1;
        }
        if !self.done {
            s.cancelled.push(self.key.clone());
        }
    }
}

impl TestBackend {
    pub fn hook(&self, container: &str, hook: Hook) {
        self.hooks
            .lock()
            .unwrap()
            .insert(container.to_string(), hook);
    }

    pub fn events(&self) -> Vec<String> {
        self.state.lock().unwrap().events.clone()
    }

    fn event(&self, e: String) {
        self.state.lock().unwrap().events.push(e);
    }

    fn attachment(req: &PodRequest, ip: ipnetwork::IpNetwork) -> Attachment {
        let n = match ip.ip() {
            std::net::IpAddr::V4(a) => a.octets()[3],
            std::net::IpAddr::V6(_) => 0,
        };
        Attachment {
            host_ifname: format!("mgt{:010x}", n),
            host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
            pod_ifname: req.ifname.clone(),
            pod_mac: Some(format!("02:00:0a:4d:00:{n:02x}")),
            mtu: req.mtu.or(Some(1450)),
            ips: vec![ip],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }
}

impl CniBackend for TestBackend {
    async fn add(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let mut guard = InFlight::enter(self, &req.container_id);
        self.event(format!("add-start {}", req.container_id));
        let hook = self.hooks.lock().unwrap().get(&req.container_id).cloned();
        match hook {
            Some(Hook::Block(n)) => n.notified().await,
            Some(Hook::Rendezvous(b)) => {
                b.wait().await;
            }
            Some(Hook::Delay(d)) => tokio::time::sleep(d).await,
            Some(Hook::Fail(e)) => {
                guard.done = true;
                return Err(e);
            }
            None => {}
        }
        let ip = {
            let mut s = self.state.lock().unwrap();
            s.adds.push(req.clone());
            let key = (req.container_id.clone(), req.ifname.clone());
            match s.allocs.get(&key) {
                Some(ip) => *ip,
                None => {
                    s.next += 1;
                    let n = s.next;
                    let ip = cidr::host(
                        std::net::Ipv4Addr::new(10, 77, (n >> 8) as u8, (n & 0xff) as u8).into(),
                    );
                    s.allocs.insert(key, ip);
                    ip
                }
            }
        };
        self.event(format!("add-done {}", req.container_id));
        guard.done = true;
        Ok(Self::attachment(&req, ip))
    }

    async fn del(&self, req: DelRequest) -> Result<(), CniError> {
        let mut guard = InFlight::enter(self, &req.container_id);
        let mut s = self.state.lock().unwrap();
        if let Some(e) = s.del_error.clone() {
            s.events.push(format!("del-failed {}", req.container_id));
            guard.done = true;
            return Err(e);
        }
        s.allocs
            .remove(&(req.container_id.clone(), req.ifname.clone()));
        s.events.push(format!("del {}", req.container_id));
        s.dels.push(req);
        guard.done = true;
        Ok(())
    }

    async fn check(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let mut guard = InFlight::enter(self, &req.container_id);
        self.event(format!("check {}", req.container_id));
        let ip = self
            .state
            .lock()
            .unwrap()
            .allocs
            .get(&(req.container_id.clone(), req.ifname.clone()))
            .copied();
        guard.done = true;
        match ip {
            Some(ip) => Ok(Self::attachment(&req, ip)),
            None => Err(CniError::new(
                102,
                format!("container {} has no margay network", req.container_id),
                "",
            )),
        }
    }

    async fn status(&self, _req: StatusRequest) -> Result<(), CniError> {
        self.event("status".into());
        match self.state.lock().unwrap().status_error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    async fn gc(&self, req: GcRequest) -> Result<(), CniError> {
        let mut s = self.state.lock().unwrap();
        s.events.push("gc".into());
        let keep = req.valid_attachments.clone();
        s.allocs
            .retain(|(c, i), _| keep.iter().any(|v| &v.container_id == c && &v.ifname == i));
        s.gc_calls.push(req.valid_attachments);
        Ok(())
    }
}

/// The real server on a socket in a temporary directory, with a [`TestBackend`].
pub struct Harness {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub backend: Arc<TestBackend>,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), ServerError>>>,
}

impl Harness {
    pub async fn start() -> Harness {
        Harness::start_with(|_| {}).await
    }

    pub async fn start_with(tune: impl FnOnce(&mut ServerConfig)) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/margay/cni.sock");
        Harness::start_at(dir, socket, Arc::new(TestBackend::default()), tune).await
    }

    /// Start on `socket` (inside `dir`) with an existing backend: used to "restart the daemon".
    pub async fn start_at(
        dir: tempfile::TempDir,
        socket: PathBuf,
        backend: Arc<TestBackend>,
        tune: impl FnOnce(&mut ServerConfig),
    ) -> Harness {
        let mut cfg = ServerConfig {
            socket: socket.clone(),
            ..ServerConfig::default()
        };
        tune(&mut cfg);
        let server = CniServer::bind(cfg, backend.clone()).expect("bind the CNI server");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        Harness {
            dir,
            socket,
            backend,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// A network configuration for this server, in `version`, with `extra` fields merged in.
    pub fn conf(&self, version: &str, extra: Value) -> String {
        conf_for(&self.socket, version, extra)
    }

    /// Stop the server and wait for it (the socket file is removed).
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.shutdown_now().await;
        let dir = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, dir)
    }

    async fn shutdown_now(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.expect("server task").expect("server run");
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}

pub fn conf_for(socket: &std::path::Path, version: &str, extra: Value) -> String {
    let mut c = json!({
        "cniVersion": version,
        "name": "k8s-pod-network",
        "type": "margay",
        "socket": socket.to_string_lossy(),
        // Never let a broken server hang a test forever.
        "timeout_seconds": 30,
    });
    if let (Some(o), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            o.insert(k.clone(), v.clone());
        }
    }
    c.to_string()
}

/// What one run of the shim gave.
#[derive(Debug)]
pub struct ShimOut {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ShimOut {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "shim stdout is not JSON ({e}): {:?} / stderr {:?}",
                self.stdout, self.stderr
            )
        })
    }

    /// The CNI error object; panics if the shim succeeded.
    pub fn error(&self) -> Value {
        assert!(!self.success, "expected a failure, got {:?}", self.stdout);
        let v = self.json();
        assert!(v.get("code").is_some(), "not an error object: {v}");
        v
    }

    pub fn code(&self) -> u64 {
        self.error()["code"].as_u64().expect("numeric code")
    }

    pub fn ok(&self) -> &Self {
        assert!(
            self.success,
            "shim failed: stdout {:?} stderr {:?}",
            self.stdout, self.stderr
        );
        self
    }
}

/// The runtime's view of one call: CNI_* variables (and nothing else from our environment) plus stdin.
pub async fn shim(env: &[(&str, &str)], stdin: &str) -> ShimOut {
    let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_margay-cni"));
    cmd.env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn margay-cni");
    let mut input = child.stdin.take().expect("stdin");
    // The shim may exit before reading (e.g. CNI_COMMAND missing): a broken pipe is its answer, not ours.
    let _ = input.write_all(stdin.as_bytes()).await;
    drop(input);
    let out = child.wait_with_output().await.expect("wait margay-cni");
    ShimOut {
        success: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// The CNI_* environment of a call for a pod (namespace `default`, pod named after the container).
pub fn env_for<'a>(
    command: &'a str,
    container: &'a str,
    netns: &'a str,
) -> Vec<(&'a str, &'a str)> {
    vec![
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", container),
        ("CNI_NETNS", netns),
        ("CNI_IFNAME", "eth0"),
        ("CNI_PATH", "/usr/lib/cni"),
        (
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web",
        ),
    ]
}
