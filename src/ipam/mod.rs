//! IP address management: pools, blocks, affinities, handles. Calico-compatible on disk.
//!
//! ```text
//!   pure, no I/O                         round trips (datastore)
//!   ------------                         -----------------------
//!   block.rs       Block (Calico JSON),   node.rs   NodeIpam: ONE task per node owns a View, fed by
//!                  FIFO assign/release              etcd watches (blocks, pools, IPAM config) and by the
//!   model.rs       Affinity, Handle                 answers of its own transactions; assign/release
//!   candidates.rs  which block to claim             requests come in over a channel with a oneshot reply
//!   view.rs        View: cached state +   ops.rs    cluster-wide operations for the CLI and GC:
//!                  plan (affine / claim /           release by handle / address, node remove,
//!                  reclaim / borrow /               check, usage report
//!                  cooling)               liveness.rs  etcd-lease liveness per node, `ipam gc`, the
//!                                                   opt-in gc leader
//! ```
//!
//! Every write is one etcd transaction guarded by the revisions the plan was made from, so nothing is ever
//! half-written: an assign puts the block (and, when claiming, the block and its confirmed affinity, created
//! together) and creates or updates the handle in the same transaction. With the node's view current, an
//! uncontended assign is exactly one etcd round trip. On a guard failure the transaction reads the guarded keys
//! back, the view is corrected and the plan is made again.

pub mod block;
pub mod candidates;
pub mod liveness;
pub mod model;
pub mod node;
pub mod ops;
pub mod view;

use std::net::IpAddr;

pub use block::Block;
pub use model::{Affinity, AffinityState, Handle};
pub use node::{
    AssignRequest, AssignedIp, Assignment, IpamCounters, NodeAllocation, NodeIpam, NodeRoutes,
};
pub use view::{Family, IpamOptions, NodeInfo, View};

use crate::datastore::DatastoreError;

/// How many times an operation re-plans after losing a race before it gives up (Calico: 100).
pub const MAX_ATTEMPTS: usize = 100;

/// What went wrong in IPAM.
#[derive(Debug, thiserror::Error)]
pub enum IpamError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("{0}")]
    NoAddress(String),
    #[error("{ip} is already allocated to handle {handle:?}")]
    InUse { ip: IpAddr, handle: Option<String> },
    #[error("{what}: gave up after {MAX_ATTEMPTS} attempts: too many concurrent IPAM writers")]
    TooManyConflicts { what: String },
    #[error("{key}: stored value does not parse: {reason}")]
    BadData { key: String, reason: String },
    #[error("{0}")]
    Invalid(String),
    #[error("the IPAM task of node {0:?} has stopped")]
    Stopped(String),
}

impl IpamError {
    /// True when etcd could not be reached (the request may be retried later with the same handle).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, IpamError::Datastore(e) if e.is_unreachable())
    }
}

pub(crate) fn parse<T: serde::de::DeserializeOwned>(
    key: &str,
    value: &[u8],
) -> Result<T, IpamError> {
    serde_json::from_slice(value).map_err(|e| IpamError::BadData {
        key: key.to_string(),
        reason: e.to_string(),
    })
}

pub(crate) fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Our own types always serialize (string keys, no non-finite floats).
    serde_json::to_vec(v).unwrap_or_default()
}

/// The handle id the CNI plugin uses for a container (`k8s-pod-network.<containerID>`).
pub fn cni_handle_id(network: &str, container_id: &str) -> String {
    format!("{network}.{container_id}")
}
