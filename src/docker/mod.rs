//! Docker's remote network driver and IPAM driver (libnetwork's plugin protocols), served by `margay node
//! run --docker-plugin` on a unix socket: containers on plain Docker hosts get addresses from the node's
//! affine IPAM blocks and veths plumbed like pods, and reach other hosts over the BGP routes of their blocks.
//!
//! ```text
//!  dockerd ──POST /<Interface>.<Method> (JSON, unix socket)──▶ "docker-plugin" ──▶ Plugin::handle
//!                                                                  │ assign/release ──▶ "ipam" task
//!                                                                  │ add_endpoint/del_pod (blocking) ──▶ kernel
//!                                                                  └ Created/Deleted(id) ──▶ "docker-sync"
//!  "docker-sync" ◀──watch /margay/docker/v1/networks/── etcd;  ──/networks API──▶ local dockerd
//! ```
//!
//! It owns no state besides the sync's id→name map: addresses live in the IPAM task, interfaces in the
//! kernel, network definitions in etcd. It must never touch an interface it did not create (`mg` + hash
//! host side, `mgt` + hash peer) nor answer for a pool id it did not hand out.

pub mod engine;
pub mod plugin;
pub mod proto;
pub mod sync;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use tokio::sync::{mpsc, Notify};

pub use plugin::{Backend, Plugin, PluginError, PoolId};
pub use sync::{NetworkDef, SyncEvent, NETWORKS_PREFIX};

use crate::config::ippool::IpPool;
use crate::dataplane::mtu::PodMtu;
use crate::dataplane::pod::{self, EndpointSpec};
use crate::ipam::{AssignRequest, Family, NodeIpam};

/// The driver name Docker knows us by (`--driver margay --ipam-driver margay`): the socket or spec file
/// must be named after it.
pub const DRIVER: &str = "margay";
/// Where Docker looks for the plugin's socket.
pub const DEFAULT_SOCKET: &str = "/run/docker/plugins/margay.sock";
/// Docker's API socket, for the network sync.
pub const DEFAULT_DOCKER_HOST: &str = "unix:///var/run/docker.sock";
/// The media type Docker's plugin client speaks.
const MIME: &str = "application/vnd.docker.plugins.v1.2+json";

/// Why the plugin socket could not be served.
#[derive(Debug, thiserror::Error)]
pub enum DockerError {
    #[error("cannot create the Docker plugin socket directory {path}: {source}")]
    CreateDir { path: PathBuf, source: io::Error },
    #[error("{path} exists and is not a socket; remove it or give --docker-plugin another path")]
    NotASocket { path: PathBuf },
    #[error("cannot bind the Docker plugin socket {path}: {source}")]
    Bind { path: PathBuf, source: io::Error },
    #[error("Docker plugin socket {path}: {source}")]
    Serve { path: PathBuf, source: io::Error },
}

/// The node's side of the plugin: IPAM task + pod plumbing + the sync's inbox.
pub struct NodeDocker {
    pub ipam: Arc<NodeIpam>,
    /// The node's network namespace (None: the daemon's).
    pub netns: Option<PathBuf>,
    pub mtu: PodMtu,
    /// Woken after every address change, so a new block is advertised at once.
    pub refresh: Arc<Notify>,
    pub sync: mpsc::UnboundedSender<SyncEvent>,
}

async fn blocking<T: Send + 'static>(
    what: &str,
    f: impl FnOnce() -> Result<T, crate::dataplane::DataplaneError> + Send + 'static,
) -> Result<T, PluginError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(source)) => Err(PluginError::Dataplane {
            what: what.to_string(),
            source,
        }),
        Err(e) => Err(PluginError::Refused(format!("{what}: dataplane task: {e}"))),
    }
}

/// How long a network naming a pool that etcd holds waits for the node's view of the pools to catch up
/// (its watch resumes within seconds after an etcd outage).
const POOL_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(10);

impl Backend for NodeDocker {
    async fn pools(&self) -> Result<Vec<IpPool>, PluginError> {
        self.ipam
            .pools()
            .await
            .map_err(|e| PluginError::ipam("IPAM pools", e))
    }

    async fn pools_naming(&self, name: &str) -> Result<Vec<IpPool>, PluginError> {
        self.ipam
            .pools_naming(name, POOL_CATCH_UP)
            .await
            .map_err(|e| PluginError::ipam("IPAM pools", e))
    }

    async fn usable_pools(&self, v6: bool) -> Result<Vec<String>, PluginError> {
        let fam = if v6 { Family::V6 } else { Family::V4 };
        self.ipam
            .usable_pools(fam)
            .await
            .map_err(|e| PluginError::ipam("IPAM pools", e))
    }

    async fn assign(&self, req: AssignRequest) -> Result<Vec<IpAddr>, PluginError> {
        let a = self
            .ipam
            .assign(req)
            .await
            .map_err(|e| PluginError::ipam("IPAM assign", e))?;
        // The block may be new: advertise it before the container sends its first packet.
        self.refresh.notify_one();
        Ok(a.ips.into_iter().map(|a| a.ip).collect())
    }

    async fn release(&self, ip: IpAddr) -> Result<(), PluginError> {
        self.ipam
            .release_ips(&[ip])
            .await
            .map_err(|e| PluginError::ipam(&format!("IPAM release of {ip}"), e))?;
        self.refresh.notify_one();
        Ok(())
    }

    async fn plumb(
        &self,
        workload_id: String,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> Result<String, PluginError> {
        let spec = EndpointSpec {
            node_netns: self.netns.clone(),
            workload_id,
            mtu: self.mtu.get(),
            ipv4,
            ipv6,
        };
        blocking("endpoint veth", move || pod::add_endpoint(&spec)).await
    }

    async fn unplumb(&self, workload_id: String) -> Result<(), PluginError> {
        let netns = self.netns.clone();
        blocking("endpoint veth removal", move || {
            pod::del_pod(netns.as_deref(), &workload_id).map(|_| ())
        })
        .await
    }

    async fn plumbed(&self, workload_id: String) -> Result<Option<Vec<IpAddr>>, PluginError> {
        let netns = self.netns.clone();
        let pods = blocking("endpoint lookup", move || pod::list_pods(netns.as_deref())).await?;
        Ok(pods
            .into_iter()
            .find(|p| p.workload_id == workload_id)
            .map(|p| p.ips))
    }

    fn network_created(&self, network_id: &str) {
        // Unbounded: the sync may be waiting on this very Docker call (it creates networks through Docker,
        // which calls us); a bounded send could deadlock.
        let _ = self.sync.send(SyncEvent::Created(network_id.to_string()));
    }

    fn network_deleted(&self, network_id: &str) {
        let _ = self.sync.send(SyncEvent::Deleted(network_id.to_string()));
    }
}

/// Removes the socket file when the server stops.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Claim the socket: create its directory, replace a stale socket (never another kind of file), bind.
pub fn bind(path: &Path) -> Result<tokio::net::UnixListener, DockerError> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| DockerError::CreateDir {
            path: dir.to_path_buf(),
            source,
        })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(path);
        }
        Ok(_) => {
            return Err(DockerError::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    tokio::net::UnixListener::bind(path).map_err(|source| DockerError::Bind {
        path: path.to_path_buf(),
        source,
    })
}

async fn route<B: Backend>(
    State(p): State<Arc<Plugin<B>>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    if method != Method::POST {
        return (StatusCode::METHOD_NOT_ALLOWED, "POST only\n").into_response();
    }
    let call = uri.path().trim_start_matches('/');
    let (status, reply) = p.handle(call, &body).await;
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        [(header::CONTENT_TYPE, MIME)],
        reply.to_string(),
    )
        .into_response()
}

/// Serve the plugin on `listener` (bound at `path`, removed when this returns or is dropped).
pub async fn serve<B: Backend>(
    listener: tokio::net::UnixListener,
    path: PathBuf,
    plugin: Plugin<B>,
) -> Result<(), DockerError> {
    let _file = SocketFile(path.clone());
    let app = Router::new()
        .fallback(route::<B>)
        .with_state(Arc::new(plugin));
    axum::serve(listener, app)
        .await
        .map_err(|source| DockerError::Serve { path, source })
}
