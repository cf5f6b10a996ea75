//! Node liveness for IPAM garbage collection: each running node holds a key bound to an etcd lease it keeps
//! alive, plus a permanent record saying "this node runs margay with liveness"; `ipam gc` finds the nodes
//! whose liveness key is gone and, after a grace period, releases what they held exactly as `node remove`
//! does. It must never release anything of a node that still renews its lease.
//!
//! ```text
//!   node (Liveness task)                         etcd                                  `margay ipam gc`
//!   grant lease (TTL) ─────────────▶ /calico/margay/v1/liveness/<node>  (on the lease)  ◀── list
//!   keepalive every TTL/3 ─────────▶ lease renewed; late is fine while inside the TTL
//!   register / come back ──────────▶ /calico/margay/v1/node/<node>      (permanent)     ◀── list, CAS
//!                                      {"registeredAt", "missingSince"?}                    missingSince = now
//! ```
//!
//! A node is "missing" when it has a record but no liveness key (its lease expired: no keepalive for a whole
//! TTL). The first `gc` run that sees it missing stamps `missingSince` in the record (CAS); a run after the
//! grace period has passed since that stamp releases it, when asked to (`--release`). Every release
//! transaction is guarded by the liveness key being absent and the record being unchanged, so a node that
//! comes back at any moment (it writes its liveness key, then clears `missingSince`) stops the release:
//! whatever was already released stays released, nothing more goes. Nodes with IPAM state but no record
//! (Calico nodes in a mixed cluster, nodes from before liveness) are listed and never released automatically:
//! `margay node remove` is for them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::block::now_ms;
use super::ops::{self, RemoveReport};
use super::{parse, to_json, IpamError};
use crate::datastore::{keys, Datastore, Guard, TxnOutcome, Write};

/// Default TTL of a node's liveness lease.
pub const DEFAULT_TTL: Duration = Duration::from_secs(15);

/// The permanent record at `/calico/margay/v1/node/<node>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// Unix ms of the node's first start with liveness.
    #[serde(default)]
    pub registered_at: u64,
    /// Unix ms at which a `gc` first saw the node without its liveness key (cleared by the node when it
    /// comes back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missing_since: Option<u64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The value of the liveness key (for operators; its presence is what counts).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LivenessValue {
    node: String,
    ttl_seconds: i64,
    since: u64,
}

/// A node's liveness, kept alive by a task. Dropping it stops the renewals: the key then vanishes when the
/// lease expires (a crashed daemon looks the same). A restart within the TTL is seamless.
pub struct Liveness {
    lease: Arc<std::sync::atomic::AtomicI64>,
    _task: crate::task::Task<()>,
}

impl Liveness {
    /// Register the node (clearing a `missingSince` stamp), grant a lease of `ttl`, put the liveness key on
    /// it, and keep the lease alive every `ttl / 3`.
    pub async fn start(
        ds: Arc<Datastore>,
        node: &str,
        ttl: Duration,
    ) -> Result<Liveness, IpamError> {
        if node.is_empty() || node.contains('/') {
            return Err(IpamError::Invalid(format!("bad node name {node:?}")));
        }
        let ttl_s = ttl.as_secs().max(1) as i64;
        let lease = put_liveness(&ds, node, ttl_s).await?;
        register(&ds, node).await?;
        let id = Arc::new(std::sync::atomic::AtomicI64::new(lease));
        let task = crate::task::spawn(
            "liveness",
            keep_alive(ds, node.to_string(), ttl_s, id.clone()),
        );
        Ok(Liveness {
            lease: id,
            _task: task,
        })
    }

    /// The lease currently held.
    pub fn lease_id(&self) -> i64 {
        self.lease.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn put_liveness(ds: &Datastore, node: &str, ttl_s: i64) -> Result<i64, IpamError> {
    let lease = ds.lease_grant(ttl_s).await?;
    let v = LivenessValue {
        node: node.to_string(),
        ttl_seconds: ttl_s,
        since: now_ms(),
    };
    ds.txn(
        &[],
        &[Write::PutLeased(
            keys::liveness_key(node),
            to_json(&v),
            lease,
        )],
    )
    .await?;
    Ok(lease)
}

/// Create the node's record, or clear its `missingSince` (the node is back).
async fn register(ds: &Datastore, node: &str) -> Result<(), IpamError> {
    let key = keys::node_record_key(node);
    for _ in 0..super::MAX_ATTEMPTS {
        let (guard, rec) = match ds.get(&key).await? {
            None => (
                Guard::Absent(key.clone()),
                NodeRecord {
                    registered_at: now_ms(),
                    ..Default::default()
                },
            ),
            Some(kv) => {
                let mut r: NodeRecord = parse(&key, &kv.value)?;
                if r.missing_since.is_none() {
                    return Ok(());
                }
                tracing::info!(
                    node,
                    "node is back: clearing the liveness record's missingSince"
                );
                r.missing_since = None;
                (Guard::ModRevision(key.clone(), kv.mod_revision), r)
            }
        };
        if let TxnOutcome::Committed { .. } = ds
            .txn(&[guard], &[Write::Put(key.clone(), to_json(&rec))])
            .await?
        {
            return Ok(());
        }
    }
    Err(IpamError::TooManyConflicts {
        what: format!("liveness record of node {node:?}"),
    })
}

async fn keep_alive(
    ds: Arc<Datastore>,
    node: String,
    ttl_s: i64,
    lease: Arc<std::sync::atomic::AtomicI64>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let period = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
    loop {
        tokio::time::sleep(period).await;
        let id = lease.load(Relaxed);
        match ds.lease_keep_alive(id).await {
            Ok(ttl) if ttl > 0 => {}
            Ok(_) => {
                // The lease expired (etcd down or this process stalled longer than the TTL): the key is gone
                // and a gc may have stamped us missing. Come back: new lease, key, record.
                tracing::warn!(node = %node, "liveness lease expired; taking a new one");
                match put_liveness(&ds, &node, ttl_s).await {
                    Ok(new) => {
                        lease.store(new, Relaxed);
                        if let Err(e) = register(&ds, &node).await {
                            tracing::warn!(node = %node, error = %e, "cannot clear the liveness record");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(node = %node, error = %e, "cannot renew liveness")
                    }
                }
            }
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "liveness keepalive failed; retrying")
            }
        }
    }
}

/// What `gc` knows about one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeLiveness {
    /// Its liveness key exists: never touched.
    Alive,
    /// Registered, liveness key gone; first seen missing at `since` (unix ms).
    Missing { since: u64, releasable: bool },
    /// IPAM holds something for it but it never registered liveness: listed, never released by gc.
    NoRecord,
}

/// One node in the gc report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GcNode {
    pub name: String,
    pub liveness: NodeLiveness,
    /// Blocks affine to it.
    pub blocks: usize,
    /// Set when it was released in this run.
    pub released: Option<RemoveReport>,
}

/// The result of `ipam gc`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GcReport {
    pub nodes: Vec<GcNode>,
    /// Empty blocks held by no node whose addresses have cooled down, deleted (with `release`).
    pub cooled_blocks_deleted: usize,
}

impl GcReport {
    /// Nodes without a liveness key (missing or never registered).
    pub fn without_liveness(&self) -> impl Iterator<Item = &GcNode> {
        self.nodes
            .iter()
            .filter(|n| n.liveness != NodeLiveness::Alive)
    }
}

/// Liveness of every node known to IPAM or registered: read only (for `ipam show`).
pub async fn survey(ds: &Datastore) -> Result<GcReport, IpamError> {
    gc_inner(ds, Duration::MAX, false, false).await
}

/// List nodes whose liveness is gone, stamp newly missing ones, and with `release` free everything held by
/// those missing for longer than `grace` (as `node remove` does, guarded so a returning node stops it).
pub async fn gc(ds: &Datastore, grace: Duration, release: bool) -> Result<GcReport, IpamError> {
    gc_inner(ds, grace, true, release).await
}

async fn gc_inner(
    ds: &Datastore,
    grace: Duration,
    stamp: bool,
    release: bool,
) -> Result<GcReport, IpamError> {
    let now = now_ms();
    let grace_ms = u64::try_from(grace.as_millis()).unwrap_or(u64::MAX);
    let (records, _) = ds.list(keys::NODE_RECORDS_PREFIX).await?;
    let (alive, _) = ds.list(keys::LIVENESS_PREFIX).await?;
    let alive: BTreeSet<String> = alive
        .iter()
        .filter_map(|kv| kv.key.strip_prefix(keys::LIVENESS_PREFIX))
        .map(str::to_string)
        .collect();
    let snap = ops::snapshot(ds).await?;
    let mut blocks_of: BTreeMap<String, usize> = BTreeMap::new();
    for b in snap.blocks.values() {
        if let Some(h) = b.host() {
            *blocks_of.entry(h.to_string()).or_default() += 1;
        }
    }
    for (node, _) in snap.affinities.keys() {
        blocks_of.entry(node.clone()).or_default();
    }
    let mut recs: BTreeMap<String, (NodeRecord, i64)> = BTreeMap::new();
    for kv in &records {
        if let Some(name) = kv.key.strip_prefix(keys::NODE_RECORDS_PREFIX) {
            match parse::<NodeRecord>(&kv.key, &kv.value) {
                Ok(r) => {
                    recs.insert(name.to_string(), (r, kv.mod_revision));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring a liveness record that does not parse")
                }
            }
        }
    }
    let names: BTreeSet<String> = recs
        .keys()
        .chain(blocks_of.keys())
        .chain(alive.iter())
        .cloned()
        .collect();
    let mut report = GcReport::default();
    for name in names {
        let blocks = blocks_of.get(&name).copied().unwrap_or(0);
        let lkey = keys::liveness_key(&name);
        let rkey = keys::node_record_key(&name);
        let liveness = if alive.contains(&name) {
            NodeLiveness::Alive
        } else if let Some((rec, rev)) = recs.get_mut(&name) {
            let since = match rec.missing_since {
                Some(t) => t,
                None if stamp => {
                    rec.missing_since = Some(now);
                    let guards = [
                        Guard::ModRevision(rkey.clone(), *rev),
                        Guard::Absent(lkey.clone()),
                    ];
                    match ds
                        .txn(&guards, &[Write::Put(rkey.clone(), to_json(rec))])
                        .await?
                    {
                        TxnOutcome::Committed { revision } => *rev = revision,
                        // It came back (or another gc stamped it): look again next run.
                        TxnOutcome::Conflict { .. } => {
                            report.nodes.push(GcNode {
                                name,
                                liveness: NodeLiveness::Alive,
                                blocks,
                                released: None,
                            });
                            continue;
                        }
                    }
                    tracing::info!(node = %name, "node has no liveness key: stamped missing");
                    now
                }
                None => now,
            };
            NodeLiveness::Missing {
                since,
                releasable: stamp && now >= since.saturating_add(grace_ms),
            }
        } else {
            NodeLiveness::NoRecord
        };
        let mut released = None;
        if let (
            true,
            NodeLiveness::Missing {
                releasable: true, ..
            },
        ) = (release, &liveness)
        {
            let rev = recs.get(&name).map(|r| r.1).unwrap_or(0);
            let guards = vec![
                Guard::Absent(lkey.clone()),
                Guard::ModRevision(rkey.clone(), rev),
            ];
            let r = ops::remove_node_guarded(ds, &name, guards.clone()).await?;
            // The record goes last, under the same guards: the node is forgotten only when it stayed away.
            if let TxnOutcome::Committed { .. } = ds.txn(&guards, &[Write::Delete(rkey)]).await? {
                tracing::info!(node = %name, report = ?r, "released a node whose liveness is gone");
            }
            released = Some(r);
        }
        report.nodes.push(GcNode {
            name,
            liveness,
            blocks,
            released,
        });
    }
    if release {
        report.cooled_blocks_deleted = delete_cooled_blocks(ds, &snap).await?;
    }
    Ok(report)
}

/// Delete empty blocks that no node holds and whose addresses have cooled down (left by `node remove`).
async fn delete_cooled_blocks(ds: &Datastore, snap: &ops::Snapshot) -> Result<usize, IpamError> {
    let mut view = super::View::default();
    if let Some(kv) = ds.get(keys::IPAM_CONFIG_KEY).await? {
        view.apply_config(
            crate::datastore::WatchEventKind::Put,
            &kv.value,
            kv.mod_revision,
        );
    }
    let cd = view.cooldown_at(now_ms());
    let mut n = 0;
    for (cidr, seen) in &snap.blocks {
        if seen.affinity.is_some() || !seen.is_empty() || seen.cooling_count(&cd) > 0 {
            continue;
        }
        let key = keys::block_key(cidr);
        // Re-read for the revision (the snapshot has none per key).
        let Some(kv) = ds.get(&key).await? else {
            continue;
        };
        let b: super::Block = parse(&key, &kv.value)?;
        if b.affinity.is_none() && b.is_empty() && b.cooling_count(&cd) == 0 {
            if let TxnOutcome::Committed { .. } = ds
                .txn(
                    &[Guard::ModRevision(key.clone(), kv.mod_revision)],
                    &[Write::Delete(key)],
                )
                .await?
            {
                n += 1;
            }
        }
    }
    Ok(n)
}

/// The key whose holder runs the automatic gc.
pub fn leader_key() -> String {
    keys::GC_LEADER_KEY.to_string()
}

/// Who holds the gc leadership now, if anyone.
pub async fn gc_leader(ds: &Datastore) -> Result<Option<String>, IpamError> {
    Ok(ds
        .get(&leader_key())
        .await?
        .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
}

/// Campaign for the gc leadership among the candidates (lease of `ttl`) and, while leader, run
/// `gc(grace, release)` every `interval`. Runs until dropped; a leader that stops renewing (crash, partition)
/// loses the key when its lease expires and another candidate takes over.
pub async fn run_gc_leader(
    ds: Arc<Datastore>,
    node: String,
    ttl: Duration,
    interval: Duration,
    grace: Duration,
) {
    let ttl_s = ttl.as_secs().max(1) as i64;
    let key = leader_key();
    loop {
        let lease = match ds.lease_grant(ttl_s).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(node = %node, error = %e, "gc leader: cannot take a lease");
                tokio::time::sleep(interval).await;
                continue;
            }
        };
        let won = matches!(
            ds.txn(
                &[Guard::Absent(key.clone())],
                &[Write::PutLeased(
                    key.clone(),
                    node.clone().into_bytes(),
                    lease
                )],
            )
            .await,
            Ok(TxnOutcome::Committed { .. })
        );
        if !won {
            let _ = ds.lease_revoke(lease).await;
            tokio::time::sleep(interval.min(ttl)).await;
            continue;
        }
        tracing::info!(node = %node, "gc leader: elected");
        let renew = Duration::from_millis((ttl_s as u64 * 1000 / 3).max(100));
        let mut next_gc = tokio::time::Instant::now();
        loop {
            if tokio::time::Instant::now() >= next_gc {
                match gc(&ds, grace, true).await {
                    Ok(r) => {
                        let released: Vec<&str> = r
                            .nodes
                            .iter()
                            .filter(|n| n.released.is_some())
                            .map(|n| n.name.as_str())
                            .collect();
                        if !released.is_empty() {
                            tracing::info!(nodes = ?released, "gc leader: released nodes whose liveness is gone");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "gc leader: gc failed"),
                }
                next_gc = tokio::time::Instant::now() + interval;
            }
            tokio::time::sleep(renew.min(interval)).await;
            match ds.lease_keep_alive(lease).await {
                Ok(t) if t > 0 => {}
                _ => {
                    tracing::warn!(node = %node, "gc leader: lease lost; campaigning again");
                    break;
                }
            }
        }
    }
}
