//! CNI: the types shared with the `margay-cni` shim, the shim <-> daemon socket protocol, and the daemon-side
//! socket server that runs each request on a [`CniBackend`] (implemented by the node: IPAM + pod plumbing +
//! route advertisement).
//!
//! `types` and `proto` depend on `std` + `serde` + `serde_json` only, because the shim links them and must
//! link no tokio and no etcd; `backend` and `server` are daemon-side.
//!
//! DEL while the daemon is down: the shim records the DEL in `<socket dir>/pending-del/` and exits 0, so
//! kubelet can finish tearing the pod down (the veth dies with the netns anyway); the server replays the spool
//! before it accepts its first request and then every `spool_sweep_interval`, releasing the addresses. A DEL
//! the backend cannot do now (code 11, e.g. etcd unreachable) is spooled the same way by the server, and an
//! ADD of a container with a spooled DEL runs that DEL first, so the spool never reorders DEL and ADD.

pub mod backend;
pub mod proto;
pub mod server;
pub mod types;

pub use backend::{
    Attachment, CniBackend, DelRequest, GcRequest, HostVethAttachment, HostVethDel,
    HostVethRequest, PodRef, PodRequest, StatusRequest,
};
pub use server::{CniMetrics, CniServer, ServerConfig, ServerError};
pub use types::{codes, CniError, CniResult, CniVersion};
