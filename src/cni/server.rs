//! The daemon side of the CNI socket: accepts one request per connection from `margay-cni`, runs it on a
//! [`CniBackend`], answers with the CNI result or error.
//!
//! ```text
//!  margay-cni ──unix socket (0600)──▶ accept loop ──spawn──▶ connection task ─┐
//!                                        │                    read request    │ per-container lock
//!                                        │                    deadline ───────┤ GC gate (GC excludes all)
//!                                        │                                    ▼
//!                                        │                              CniBackend::{add,del,check,status,gc}
//!                                        └─ every spool_sweep_interval: replay spooled DELs (written by the
//!                                           shim while we were down, or by us when a DEL failed with 11)
//! ```
//!
//! Guarantees: requests run concurrently; requests for the same container id run one after the other, in
//! arrival order (tokio's mutex is fair); GC waits for everything in flight and holds everything else back.
//! When `request_timeout` passes, the caller gets error 11 at once, but the backend call is *not* cancelled
//! (cancelling an ADD half way would leak more than finishing it): it keeps its lock and runs on, and the
//! runtime's follow-up DEL queues behind it. Only after `abandon_after` is the backend future dropped.
//!
//! The server owns no IPAM or kernel state; it never touches etcd or netlink itself.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{OwnedMutexGuard, RwLock, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use super::backend::{
    CniBackend, DelRequest, GcRequest, HostVethDel, HostVethRequest, PodRequest, StatusRequest,
};
use super::proto::{
    spool_dir, spool_file_name, write_spool, Command, Outcome, Request, Response,
    MAX_MESSAGE_BYTES, PROTOCOL_VERSION,
};
use super::types::{codes, CniError, CniResult, Interface, DEFAULT_SOCKET};

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The socket path (its directory is created; a stale socket file is replaced).
    pub socket: PathBuf,
    /// The caller gets an answer within this time, success or error 11.
    pub request_timeout: Duration,
    /// A backend call still running after this long is dropped (see the module doc).
    pub abandon_after: Duration,
    /// Connections served at once; more wait in the accept queue.
    pub max_in_flight: usize,
    /// How often spooled DELs are retried (they are always replayed once before the first accept).
    pub spool_sweep_interval: Duration,
    /// A DEL that fails with "try again later" (11: etcd unreachable, backend abandoned) is spooled and
    /// answered with success, so kubelet can finish deleting the pod; the sweep retries it. Off: the error
    /// goes back to the runtime, which retries the DEL itself.
    pub spool_transient_del_failures: bool,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            // Below the shim's default wait (90 s), so the caller sees our clear timeout, not its own.
            request_timeout: Duration::from_secs(60),
            abandon_after: Duration::from_secs(240),
            max_in_flight: 256,
            spool_sweep_interval: Duration::from_secs(10),
            spool_transient_del_failures: true,
        }
    }
}

/// Why the server could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot create the CNI socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("cannot bind the CNI socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error(
        "another process is already serving {path}; is a second margay running on this node? \
         stop it or give this one another socket"
    )]
    InUse { path: PathBuf },
    #[error("{path} exists and is not a socket; remove it or choose another socket path")]
    NotASocket { path: PathBuf },
    #[error("cannot replace the CNI socket {path}: {source}")]
    Replace { path: PathBuf, source: io::Error },
    #[error("CNI socket listener failed: {0}")]
    Listen(io::Error),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    command: String,
    /// The CNI error code, "0" for success.
    code: String,
}

/// Prometheus metrics of the CNI server: `margay_cni_request_duration_seconds{command,code}`.
#[derive(Clone)]
pub struct CniMetrics {
    latency: Family<RequestLabels, Histogram, fn() -> Histogram>,
}

impl CniMetrics {
    /// Create the metrics and register them in `registry`.
    pub fn register(registry: &mut Registry) -> CniMetrics {
        fn buckets() -> Histogram {
            // 0.5 ms .. ~16 s.
            Histogram::new(exponential_buckets(0.0005, 2.0, 16))
        }
        let latency = Family::<RequestLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            buckets as fn() -> Histogram,
        );
        registry.register(
            "margay_cni_request_duration_seconds",
            "Time from reading a CNI request to answering it, by command and CNI error code (0 = ok)",
            latency.clone(),
        );
        CniMetrics { latency }
    }

    fn observe(&self, command: &str, code: u32, took: Duration) {
        self.latency
            .get_or_create(&RequestLabels {
                command: command.to_string(),
                code: code.to_string(),
            })
            .observe(took.as_secs_f64());
    }
}

/// One async mutex per container id, created on demand and forgotten when nobody holds or waits for it.
#[derive(Default)]
struct KeyLocks {
    map: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl KeyLocks {
    async fn lock(&self, key: &str) -> OwnedMutexGuard<()> {
        let m = {
            // Poisoning only follows a panic inside this short block, which cannot panic; recover anyway.
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            if map.len() > 1024 {
                map.retain(|_, w| w.strong_count() > 0);
            }
            match map.get(key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key.to_string(), Arc::downgrade(&m));
                    m
                }
            }
        };
        m.lock_owned().await
    }
}

/// Where a request is, for the timeout message.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    WaitingForGc,
    WaitingForContainer,
    InBackend,
}

struct Inner<B> {
    backend: Arc<B>,
    cfg: ServerConfig,
    locks: KeyLocks,
    /// Read-held by ADD/DEL/CHECK, write-held by GC.
    gc_gate: RwLock<()>,
    in_flight: Arc<Semaphore>,
    metrics: Option<CniMetrics>,
    /// Only one spool sweep at a time.
    sweeping: tokio::sync::Mutex<()>,
}

/// The CNI socket server. [`CniServer::bind`] claims the socket; [`CniServer::run`] serves it.
pub struct CniServer<B> {
    listener: std::os::unix::net::UnixListener,
    socket: PathBuf,
    inode: u64,
    inner: Arc<Inner<B>>,
}

/// Removes the socket file when the server stops, unless someone else has replaced it meanwhile.
struct SocketFile {
    path: PathBuf,
    inode: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.inode) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

impl<B: CniBackend> CniServer<B> {
    /// Create the socket's directory (0700 when we create it), refuse to steal a socket someone is serving,
    /// replace a stale one, and bind with mode 0600. The socket is bound under a temporary name, chmod-ed,
    /// then renamed into place, so it is never reachable with a wider mode.
    pub fn bind(cfg: ServerConfig, backend: Arc<B>) -> Result<CniServer<B>, ServerError> {
        let path = cfg.socket.clone();
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or_else(|| Path::new("."))
            .to_path_buf();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| ServerError::CreateDir {
                path: dir.clone(),
                source,
            })?;
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                    return Err(ServerError::InUse { path });
                }
                // Stale (its daemon died): the rename below replaces it atomically.
            }
            Ok(_) => return Err(ServerError::NotASocket { path }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(ServerError::Replace { path, source }),
        }
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cni.sock".into());
        let tmp = dir.join(format!(".{file}.{}.tmp", std::process::id()));
        let _ = std::fs::remove_file(&tmp);
        let listener =
            std::os::unix::net::UnixListener::bind(&tmp).map_err(|source| ServerError::Bind {
                path: tmp.clone(),
                source,
            })?;
        let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .and_then(|()| std::fs::rename(&tmp, &path))
            .and_then(|()| std::fs::symlink_metadata(&path));
        let inode = match placed {
            Ok(m) => m.ino(),
            Err(source) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(ServerError::Replace { path, source });
            }
        };
        let in_flight = Arc::new(Semaphore::new(cfg.max_in_flight.max(1)));
        Ok(CniServer {
            listener,
            socket: path,
            inode,
            inner: Arc::new(Inner {
                backend,
                cfg,
                locks: KeyLocks::default(),
                gc_gate: RwLock::new(()),
                in_flight,
                metrics: None,
                sweeping: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Record request latencies in these metrics.
    pub fn with_metrics(mut self, metrics: CniMetrics) -> CniServer<B> {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.metrics = Some(metrics);
        }
        self
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Replay spooled DELs, then serve until `shutdown` completes. On shutdown the socket file is removed at
    /// once (new shims see "not reachable" instead of waiting), requests in flight get up to
    /// `request_timeout` to finish, then are aborted.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let socket_file = SocketFile {
            path: self.socket.clone(),
            inode: self.inode,
        };
        self.listener
            .set_nonblocking(true)
            .map_err(ServerError::Listen)?;
        let listener =
            tokio::net::UnixListener::from_std(self.listener).map_err(ServerError::Listen)?;
        let inner = self.inner;
        // Before the first ADD: a DEL spooled while we were down must not overtake a new ADD of that id.
        inner.replay_spool().await;
        info!(socket = %socket_file.path.display(), "CNI server listening");

        let mut tasks = JoinSet::new();
        let mut sweep = tokio::time::interval(inner.cfg.spool_sweep_interval);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sweep.tick().await;
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let inner = inner.clone();
                        tasks.spawn(async move { inner.serve_connection(stream).await });
                    }
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        warn!(error = %e, "CNI socket accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = sweep.tick() => {
                    let inner = inner.clone();
                    tasks.spawn(async move { inner.replay_spool().await });
                }
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        drop(listener);
        drop(socket_file);
        let grace = inner.cfg.request_timeout;
        let drained =
            tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            warn!(
                left = tasks.len(),
                "CNI requests still running at shutdown after {grace:?}: aborting them"
            );
        }
        Ok(())
    }
}

impl<B: CniBackend> Inner<B> {
    async fn serve_connection(self: Arc<Self>, mut stream: UnixStream) {
        let Ok(_permit) = self.in_flight.clone().acquire_owned().await else {
            return;
        };
        let start = Instant::now();
        let deadline = tokio::time::Instant::now() + self.cfg.request_timeout;
        let req = match tokio::time::timeout_at(deadline, read_request(&mut stream)).await {
            Ok(Ok(req)) => req,
            Ok(Err(e)) => {
                self.answer(&mut stream, "unknown", Response::error(e), start)
                    .await;
                return;
            }
            Err(_) => {
                debug!("CNI client sent no complete request in time");
                return;
            }
        };
        let command = req.command;
        let who = req.container_id.clone().unwrap_or_default();
        let phase = Arc::new(Mutex::new(Phase::InBackend));
        let op = self.clone().execute(req, phase.clone());
        tokio::pin!(op);
        tokio::select! {
            resp = &mut op => {
                self.answer(&mut stream, command.as_str(), resp, start).await;
            }
            _ = tokio::time::sleep_until(deadline) => {
                let where_ = match *phase.lock().unwrap_or_else(|p| p.into_inner()) {
                    Phase::WaitingForGc => "while waiting for a GC in progress",
                    Phase::WaitingForContainer => {
                        "while waiting for an earlier request for the same container"
                    }
                    Phase::InBackend => "while margay was working on it (IPAM, pod plumbing)",
                };
                let e = CniError::try_again(
                    format!(
                        "margay: {command} for container {who:?} timed out after {:.1}s {where_}",
                        self.cfg.request_timeout.as_secs_f64()
                    ),
                    "the operation goes on in the background; a retried ADD or a DEL queues behind it",
                );
                self.answer(&mut stream, command.as_str(), Response::error(e), start).await;
                drop(stream);
                let late = op.await;
                info!(%command, container = %who, outcome = ?late.outcome,
                      "CNI request finished after its caller timed out");
            }
        }
    }

    async fn answer(&self, stream: &mut UnixStream, command: &str, resp: Response, start: Instant) {
        let code = match &resp.outcome {
            Outcome::Ok { .. } => 0,
            Outcome::Error(e) => e.code,
        };
        if let Some(m) = &self.metrics {
            m.observe(command, code, start.elapsed());
        }
        let body = match serde_json::to_vec(&resp) {
            Ok(b) => b,
            Err(e) => {
                warn!(error = %e, "cannot encode a CNI response");
                return;
            }
        };
        // The shim may have given up; nothing more to tell it then.
        if let Err(e) = stream.write_all(&body).await {
            debug!(error = %e, "CNI client went away before the answer");
        }
        let _ = stream.shutdown().await;
    }

    /// Run one request under the locks it needs; never fails, errors become a response.
    async fn execute(self: Arc<Self>, req: Request, phase: Arc<Mutex<Phase>>) -> Response {
        if req.protocol != PROTOCOL_VERSION {
            return Response::error(CniError::new(
                codes::PROTOCOL_MISMATCH,
                format!(
                    "margay-cni speaks socket protocol {} but the daemon speaks {PROTOCOL_VERSION}",
                    req.protocol
                ),
                "the install-cni init container copies the matching margay-cni when the margay pod starts",
            ));
        }
        let set = |p: Phase| *phase.lock().unwrap_or_else(|e| e.into_inner()) = p;
        let started = Instant::now();
        let result = match req.command {
            Command::Add | Command::Check | Command::Del => {
                set(Phase::WaitingForGc);
                let _gate = self.gc_gate.read().await;
                set(Phase::WaitingForContainer);
                let key = req.container_id.clone().unwrap_or_default();
                let _lock = self.locks.lock(&key).await;
                set(Phase::InBackend);
                match req.command {
                    Command::Add => match self.pending_del_first(&req).await {
                        Ok(()) => self.add(&req).await,
                        Err(e) => Err(e),
                    },
                    Command::Check => self.check(&req).await.map(|()| None),
                    _ => self.del_or_spool(&req).await.map(|()| None),
                }
            }
            Command::Status => self
                .bounded(self.backend.status(StatusRequest {
                    network: req.network.clone(),
                }))
                .await
                .map(|()| None),
            Command::Gc => match req.valid_attachments.clone() {
                None => Err(CniError::invalid_config(
                    "GC needs \"cni.dev/valid-attachments\" in the configuration (an empty list \
                         releases every attachment of the network; a missing one releases nothing)",
                )),
                Some(valid_attachments) => {
                    set(Phase::WaitingForGc);
                    let _gate = self.gc_gate.write().await;
                    set(Phase::InBackend);
                    self.bounded(self.backend.gc(GcRequest {
                        network: req.network.clone(),
                        valid_attachments,
                    }))
                    .await
                    .map(|()| None)
                }
            },
        };
        let took = started.elapsed();
        match result {
            Ok(result) => {
                debug!(command = %req.command, container = ?req.container_id, ?took, "CNI request done");
                Response::ok(result)
            }
            Err(e) => {
                warn!(command = %req.command, container = ?req.container_id, ?took, error = %e,
                      "CNI request failed");
                Response::error(e)
            }
        }
    }

    /// A backend call limited by `abandon_after`.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, CniError>>,
    ) -> Result<T, CniError> {
        let limit = self.cfg.abandon_after;
        match tokio::time::timeout(limit, fut).await {
            Ok(r) => r,
            Err(_) => Err(CniError::try_again(
                format!(
                    "margay abandoned the request after {:.0}s without an answer from IPAM or the dataplane",
                    limit.as_secs_f64()
                ),
                "see the margay pod's log for the part that hung",
            )),
        }
    }

    async fn add(&self, req: &Request) -> Result<Option<CniResult>, CniError> {
        if req.host_veth.is_some() {
            return self.host_veth_add(req).await.map(Some);
        }
        let pod = PodRequest::from_request(req)?;
        let netns = pod.netns.to_string_lossy().into_owned();
        let ifname = pod.ifname.clone();
        let att = self.bounded(self.backend.add(pod)).await?;
        if att.pod_ifname != ifname {
            return Err(CniError::internal(format!(
                "margay built pod interface {:?} but the runtime asked for {ifname:?}",
                att.pod_ifname
            )));
        }
        let ours = att.to_result(&netns);
        // Margay is meant to be first in a chain; if something ran before it, keep its entries first.
        Ok(Some(match &req.prev_result {
            Some(prev) => prev.clone().merged_with(ours),
            None => ours,
        }))
    }

    async fn del(&self, req: &Request) -> Result<(), CniError> {
        let del = DelRequest::from_request(req)?;
        if let Some(hv) = &req.host_veth {
            return self
                .bounded(self.backend.host_veth_del(HostVethDel {
                    del,
                    veth_name: hv.veth_name.clone(),
                }))
                .await;
        }
        self.bounded(self.backend.del(del)).await
    }

    /// DEL; a transient failure is spooled for the sweep and reported as success (see
    /// [`ServerConfig::spool_transient_del_failures`]).
    async fn del_or_spool(&self, req: &Request) -> Result<(), CniError> {
        match self.del(req).await {
            Err(e) if e.code == codes::TRY_AGAIN_LATER && self.cfg.spool_transient_del_failures => {
                match write_spool(&self.cfg.socket, req) {
                    Ok(file) => {
                        warn!(container = ?req.container_id, error = %e, file = %file.display(),
                              "DEL failed for now; spooled, will retry");
                        Ok(())
                    }
                    Err(io) => Err(CniError::try_again(
                        e.msg,
                        format!("{}; and the DEL could not be spooled: {io}", e.details),
                    )),
                }
            }
            other => other,
        }
    }

    /// An ADD for a container whose DEL is still spooled runs that DEL first (it happened before), so a
    /// later sweep can never remove what this ADD builds. Called with the container's lock held.
    async fn pending_del_first(&self, req: &Request) -> Result<(), CniError> {
        let file = spool_dir(&self.cfg.socket).join(spool_file_name(
            req.container_id.as_deref().unwrap_or(""),
            req.ifname.as_deref().unwrap_or(""),
        ));
        let Ok(bytes) = std::fs::read(&file) else {
            return Ok(());
        };
        let del: Request = match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => {
                warn!(file = %file.display(), error = %e, "unreadable CNI DEL spool entry; renamed *.bad");
                let _ = std::fs::rename(&file, file.with_extension("bad"));
                return Ok(());
            }
        };
        self.del(&del).await.map_err(|e| {
            CniError::try_again(
                format!(
                    "an earlier DEL of container {:?} is still pending and failed again: {}",
                    req.container_id.as_deref().unwrap_or(""),
                    e.msg
                ),
                e.details,
            )
        })?;
        info!(container = ?req.container_id, "ran the spooled DEL before a new ADD of the same container");
        let _ = std::fs::remove_file(&file);
        Ok(())
    }

    /// CHECK: the backend verifies its own state and returns what exists; then every interface and address
    /// margay owns must appear in `prevResult` exactly so (entries of other plugins are not ours to judge).
    async fn check(&self, req: &Request) -> Result<(), CniError> {
        if req.host_veth.is_some() {
            return self.host_veth_check(req).await;
        }
        let pod = PodRequest::from_request(req)?;
        let netns = pod.netns.to_string_lossy().into_owned();
        let now = self
            .bounded(self.backend.check(pod))
            .await?
            .to_result(&netns);
        let Some(prev) = &req.prev_result else {
            return Ok(());
        };
        let diffs = compare_with_prev(prev, &now);
        if diffs.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                codes::CHECK_FAILED,
                format!(
                    "CHECK for container {:?}: the pod's network differs from prevResult",
                    req.container_id.as_deref().unwrap_or("")
                ),
                diffs.join("; "),
            ))
        }
    }

    /// Host-veth mode: what the backend needs, from the request and its `prevResult` (the previous plugin's
    /// interface `CNI_IFNAME` and its addresses).
    fn host_veth_request(req: &Request) -> Result<(HostVethRequest, CniResult), CniError> {
        let pod = PodRequest::from_request(req)?;
        let conf = req
            .host_veth
            .clone()
            .ok_or_else(|| CniError::internal("not host-veth"))?;
        let prev = req.prev_result.clone().ok_or_else(|| {
            CniError::invalid_config(format!(
                "\"mode\": \"host-veth\" makes margay a later plugin in a chain, and {} came without prevResult: \
                 list margay after the plugin that makes {} (macvlan, ipvlan) in the conflist's plugins",
                req.command, pod.ifname
            ))
        })?;
        if conf.veth_name == pod.ifname {
            return Err(CniError::invalid_config(format!(
                "field \"veth_name\" is {:?}, the same as CNI_IFNAME (the previous plugin's interface); give the veth another name",
                conf.veth_name
            )));
        }
        let idx = prev
            .interfaces
            .iter()
            .position(|i| i.name == pod.ifname && i.sandbox.is_some());
        let pod_ips: Vec<IpAddr> = prev
            .ips
            .iter()
            .filter(|ip| idx.is_none() || ip.interface.is_none() || ip.interface == idx)
            .map(|ip| ip.address.ip())
            .collect();
        if pod_ips.is_empty() {
            return Err(CniError::invalid_config(format!(
                "prevResult has no address on {} (interfaces: {:?}): host-veth mode routes the previous plugin's addresses, so that plugin needs IPAM (host-local, static, dhcp)",
                pod.ifname,
                prev.interfaces.iter().map(|i| i.name.as_str()).collect::<Vec<_>>()
            )));
        }
        Ok((
            HostVethRequest {
                container_id: pod.container_id,
                netns: pod.netns,
                ifname: pod.ifname,
                network: pod.network,
                pod: pod.pod,
                pod_ips,
                conf,
                mtu: pod.mtu,
            },
            prev,
        ))
    }

    /// Host-veth ADD: the backend builds the veth; the result is `prevResult` with the two ends appended
    /// (the host end without `sandbox`), its addresses and routes unchanged (CNI spec: a chained plugin
    /// passes the previous result on, extended).
    async fn host_veth_add(&self, req: &Request) -> Result<CniResult, CniError> {
        let (hv, prev) = Self::host_veth_request(req)?;
        let netns = hv.netns.to_string_lossy().into_owned();
        let att = self.bounded(self.backend.host_veth_add(hv)).await?;
        let mut out = prev;
        // A repeated ADD (the runtime retried) must not list the veth twice.
        out.interfaces.retain(|i| {
            i.name != att.host_ifname && !(i.name == att.pod_ifname && i.sandbox.is_some())
        });
        out.interfaces.push(Interface {
            name: att.host_ifname,
            mac: att.host_mac,
            mtu: None,
            sandbox: None,
        });
        out.interfaces.push(Interface {
            name: att.pod_ifname,
            mac: att.pod_mac,
            mtu: None,
            sandbox: Some(netns),
        });
        Ok(out)
    }

    /// Host-veth CHECK: the backend verifies the veth and its routes; `prevResult` must list both ends.
    async fn host_veth_check(&self, req: &Request) -> Result<(), CniError> {
        let (hv, prev) = Self::host_veth_request(req)?;
        let att = self.bounded(self.backend.host_veth_check(hv)).await?;
        let mut missing = Vec::new();
        for (name, in_pod) in [(&att.host_ifname, false), (&att.pod_ifname, true)] {
            if !prev
                .interfaces
                .iter()
                .any(|i| &i.name == name && i.sandbox.is_some() == in_pod)
            {
                missing.push(format!("prevResult does not list interface {name}"));
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                codes::CHECK_FAILED,
                format!(
                    "CHECK for container {:?}: the result of the ADD is not the one passed in",
                    req.container_id.as_deref().unwrap_or("")
                ),
                missing.join("; "),
            ))
        }
    }

    /// Replay DELs the shim spooled while we were unreachable. Files that cannot be read as a DEL are
    /// renamed `*.bad` so they are reported once, not retried forever.
    async fn replay_spool(&self) {
        let Ok(_one) = self.sweeping.try_lock() else {
            return;
        };
        let dir = spool_dir(&self.cfg.socket);
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return,
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot read the CNI DEL spool");
                return;
            }
        };
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension().is_some_and(|x| x == "json")
                    && !p
                        .file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        for path in files {
            let req = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Request>(&b).map_err(|e| e.to_string()))
                .and_then(|r| match r.command {
                    Command::Del if r.container_id.is_some() => Ok(r),
                    other => Err(format!("{other} is not a DEL with a container id")),
                });
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "unreadable CNI DEL spool entry; renamed *.bad");
                    let _ = std::fs::rename(&path, path.with_extension("bad"));
                    continue;
                }
            };
            let _gate = self.gc_gate.read().await;
            let _lock = self
                .locks
                .lock(req.container_id.as_deref().unwrap_or(""))
                .await;
            match self.del(&req).await {
                Ok(()) => {
                    info!(container = ?req.container_id, "replayed a DEL spooled while margay was down");
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    warn!(container = ?req.container_id, error = %e, "spooled DEL failed; will retry");
                }
            }
        }
    }
}

/// Read the request: everything up to the shim's end of file, at most [`MAX_MESSAGE_BYTES`].
async fn read_request(stream: &mut UnixStream) -> Result<Request, CniError> {
    let mut buf = Vec::new();
    let mut limited = (&mut *stream).take(MAX_MESSAGE_BYTES as u64 + 1);
    limited
        .read_to_end(&mut buf)
        .await
        .map_err(|e| CniError::new(codes::IO_FAILURE, format!("reading the request: {e}"), ""))?;
    if buf.len() > MAX_MESSAGE_BYTES {
        return Err(CniError::new(
            codes::DECODING_FAILURE,
            format!("request longer than {MAX_MESSAGE_BYTES} bytes"),
            "",
        ));
    }
    serde_json::from_slice(&buf).map_err(|e| {
        CniError::new(
            codes::DECODING_FAILURE,
            format!("the daemon cannot read the request: {e}"),
            "margay-cni and the daemon may come from different releases",
        )
    })
}

/// Differences between what exists now and `prevResult`, in words, for margay's own interfaces only.
fn compare_with_prev(prev: &CniResult, now: &CniResult) -> Vec<String> {
    let mut diffs = Vec::new();
    for ours in &now.interfaces {
        match prev.interfaces.iter().find(|i| i.name == ours.name) {
            None => diffs.push(format!(
                "interface {} is missing from prevResult",
                ours.name
            )),
            Some(p) => {
                if p.sandbox != ours.sandbox {
                    diffs.push(format!(
                        "interface {}: sandbox {:?} in prevResult, {:?} now",
                        ours.name, p.sandbox, ours.sandbox
                    ));
                }
                if let (Some(a), Some(b)) = (&p.mac, &ours.mac) {
                    if !a.eq_ignore_ascii_case(b) {
                        diffs.push(format!(
                            "interface {}: MAC {a} in prevResult, {b} now",
                            ours.name
                        ));
                    }
                }
            }
        }
    }
    let pod_if = now.interfaces.get(1).map(|i| i.name.as_str());
    for ip in &now.ips {
        if !prev.ips.iter().any(|p| p.address.ip() == ip.address.ip()) {
            diffs.push(format!(
                "address {} is on the pod but not in prevResult",
                ip.address
            ));
        }
    }
    for p in &prev.ips {
        let on_pod_if = p
            .interface
            .and_then(|i| prev.interfaces.get(i))
            .is_some_and(|i| Some(i.name.as_str()) == pod_if && i.sandbox.is_some());
        if on_pod_if && !now.ips.iter().any(|n| n.address.ip() == p.address.ip()) {
            diffs.push(format!(
                "prevResult lists {} on the pod, but margay no longer assigns it",
                p.address
            ));
        }
    }
    diffs
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::backend::Attachment;
    use crate::cni::types::Dns;

    fn att(ip: &str, mac: &str) -> CniResult {
        Attachment {
            host_ifname: "mgx".into(),
            host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
            pod_ifname: "eth0".into(),
            pod_mac: Some(mac.into()),
            mtu: None,
            ips: vec![ip.parse().unwrap()],
            routes: vec![],
            dns: Dns::default(),
        }
        .to_result("/var/run/netns/p")
    }

    #[test]
    fn check_compare_finds_each_kind_of_difference() {
        let now = att("10.0.0.1/32", "02:00:00:00:00:01");
        assert!(compare_with_prev(&now, &now).is_empty());
        let other_ip = att("10.0.0.2/32", "02:00:00:00:00:01");
        let d = compare_with_prev(&other_ip, &now);
        assert_eq!(d.len(), 2, "{d:?}");
        let other_mac = att("10.0.0.1/32", "02:00:00:00:00:02");
        assert!(compare_with_prev(&other_mac, &now)[0].contains("MAC"));
        let mut moved = now.clone();
        moved.interfaces[1].sandbox = Some("/elsewhere".into());
        assert!(compare_with_prev(&moved, &now)[0].contains("sandbox"));
        // Entries from other plugins do not matter.
        let mut more = now.clone();
        more.interfaces.push(crate::cni::types::Interface {
            name: "other".into(),
            ..Default::default()
        });
        assert!(compare_with_prev(&more, &now).is_empty());
    }

    #[tokio::test]
    async fn key_locks_serialize_one_key_only() {
        let locks = KeyLocks::default();
        let a = locks.lock("a").await;
        // Another key is free while "a" is held.
        let _b = locks.lock("b").await;
        use futures::FutureExt;
        assert!(
            locks.lock("a").now_or_never().is_none(),
            "a second holder of the same key"
        );
        drop(a);
        let _a2 = locks.lock("a").await;
    }
}
