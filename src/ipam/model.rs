//! Calico's stored JSON for block affinities (`model.BlockAffinity`) and handles (`model.IPAMHandle`).
//! Unknown fields are kept verbatim so a read-modify-write never drops what a newer Calico wrote.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

/// Claim state of a block for a node (`pending -> confirmed -> pendingDeletion`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AffinityState {
    #[serde(rename = "pending")]
    Pending,
    #[serde(rename = "confirmed")]
    Confirmed,
    #[serde(rename = "pendingDeletion")]
    PendingDeletion,
}

impl std::fmt::Display for AffinityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AffinityState::Pending => "pending",
            AffinityState::Confirmed => "confirmed",
            AffinityState::PendingDeletion => "pendingDeletion",
        })
    }
}

/// The value at `/calico/ipam/v2/host/<node>/ipv4/block/<cidr>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Affinity {
    pub state: AffinityState,
    #[serde(default)]
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Affinity {
    pub fn confirmed() -> Affinity {
        Affinity {
            state: AffinityState::Confirmed,
            deleted: false,
            extra: BTreeMap::new(),
        }
    }
}

/// The value at `/calico/ipam/v2/handle/<id>`: how many addresses the handle owns in each block, keyed by the
/// block CIDR as Go prints it (`10.10.0.0/26`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Handle {
    #[serde(default)]
    pub block: BTreeMap<String, u64>,
    #[serde(default)]
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Handle {
    /// Add `n` allocations in `block`.
    pub fn add(&mut self, block: &IpNetwork, n: u64) {
        *self.block.entry(block.to_string()).or_insert(0) += n;
    }

    /// Remove `n` allocations in `block`, dropping the entry at zero.
    pub fn remove(&mut self, block: &IpNetwork, n: u64) {
        let k = block.to_string();
        if let Some(c) = self.block.get_mut(&k) {
            *c = c.saturating_sub(n);
            if *c == 0 {
                self.block.remove(&k);
            }
        }
    }

    /// No allocation left: the handle should be deleted.
    pub fn is_empty(&self) -> bool {
        self.block.values().all(|&c| c == 0)
    }

    /// The blocks listed, parsed (entries that do not parse are skipped; `ipam check` reports them).
    pub fn blocks(&self) -> impl Iterator<Item = (IpNetwork, u64)> + '_ {
        self.block
            .iter()
            .filter_map(|(k, &n)| Some((k.parse::<IpNetwork>().ok()?, n)))
    }
}
