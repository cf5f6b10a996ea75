//! `NodeIpam`: the one task that owns a node's IPAM view and performs its assigns and releases.
//!
//! ```text
//!   callers (CNI server, tests) --Request + oneshot--> [ node IPAM task ] <-- watch: blocks
//!                                                        owns View       <-- watch: ippools
//!                                                        |               <-- watch: IPAM config
//!                                                        v
//!                                                  Datastore (one txn per uncontended assign)
//! ```
//!
//! Requests are served one at a time, so the node never races itself (Calico needs a host-wide flock for this);
//! nodes race each other only through etcd's compare-and-swap.
//!
//! Churn (blocks come back, addresses cool down):
//! - an affine block that has been empty for the grace period (`emptyBlockGracePeriod`, default 15 min) and
//!   whose addresses no longer cool down is released (block and affinity in one transaction guarded by the
//!   block's revision), except that the node keeps one block of every pool that selects it;
//! - when a pool has no unclaimed block left, an assign may take over another node's empty block. The race
//!   with that owner assigning from the same block at the same moment is decided by etcd: both transactions
//!   are guarded by the block's mod_revision (the reclaim also by the owner's confirmed affinity at the
//!   revision read, and by the absence of ours), so exactly one commits. The loser's transaction reads the
//!   block back: the owner then sees the block is no longer its own and plans again (a claim, a borrow, or
//!   "no free address"); the reclaimer sees an allocation in it and looks elsewhere. A block with an
//!   allocation, or whose owner's affinity is not `confirmed` (a claim or release in flight), is never taken;
//! - released addresses cool down (`releasedAddressCooldown`, default 30 s; see `block.rs`) and are handed out
//!   again inside it only when the pools have nothing else;
//! - before answering "no free address", the view is re-read from etcd once, so a stale view never reports
//!   a pool exhausted while it has an empty block.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::sync::{mpsc, oneshot, watch};

use super::block::{now_ms, Block, BlockError, ATTR_NODE};
use super::model::{Affinity, AffinityState, Handle};
use super::view::{Cached, Choice, Family, IpamOptions, NodeInfo, View};
use super::{ops, parse, to_json, IpamError, MAX_ATTEMPTS};
use crate::config::ippool::{IpPool, PLURAL};
use crate::datastore::{keys, Datastore, Guard, TxnOutcome, WatchMessage, Watcher, Write};

/// What a workload asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AssignRequest {
    /// Owner of the addresses (CNI: `k8s-pod-network.<containerID>`). Assign is idempotent per handle: asking
    /// again returns what the handle already holds.
    pub handle_id: String,
    /// One IPv4 address.
    pub ipv4: bool,
    /// One IPv6 address.
    pub ipv6: bool,
    /// Specific addresses wanted (in addition to the families above).
    pub ips: Vec<IpAddr>,
    /// Only these pools (by name); None = every pool that selects the node.
    pub pools: Option<Vec<String>>,
    /// Stored with the allocation (`namespace`, `pod`, ...); `node` is added.
    pub attributes: BTreeMap<String, String>,
}

impl AssignRequest {
    /// One IPv4 address for `handle_id`.
    pub fn v4(handle_id: &str) -> AssignRequest {
        AssignRequest {
            handle_id: handle_id.to_string(),
            ipv4: true,
            ..Default::default()
        }
    }
}

/// One address handed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct AssignedIp {
    pub ip: IpAddr,
    pub block: IpNetwork,
    /// From another node's block: must be advertised as a /32 (/128) host route.
    pub borrowed: bool,
}

/// The answer to an assign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub handle_id: String,
    pub ips: Vec<AssignedIp>,
}

/// What BGP must advertise for this node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeRoutes {
    /// Blocks affine to this node (advertised whole, with a blackhole route).
    pub blocks: Vec<IpNetwork>,
    /// Addresses this node borrowed from other nodes' blocks (advertised as host routes).
    pub borrowed: Vec<(IpAddr, IpNetwork)>,
    /// Addresses the affine blocks hold (for metrics and status).
    pub addresses_total: u64,
    /// Of those, allocated.
    pub addresses_allocated: u64,
    /// Affine blocks without any allocation.
    pub blocks_empty: u64,
    /// Free addresses of the affine blocks still cooling down after their release.
    pub addresses_cooling: u64,
    /// Counters since the task started.
    pub counters: IpamCounters,
}

/// What the node's IPAM did since it started (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IpamCounters {
    /// Empty blocks of other nodes (or of nobody) this node took over.
    pub blocks_reclaimed: u64,
    /// Own blocks released after being empty for the grace period.
    pub blocks_released: u64,
    /// Addresses handed out inside their cooldown because nothing else was left.
    pub cooling_handed_out: u64,
    /// Assigns answered "no free address".
    pub exhausted: u64,
}

type Reply<T> = oneshot::Sender<Result<T, IpamError>>;

/// Most assigns committed in one transaction (etcd allows 128 operations per transaction by default; a batch
/// writes a handle per assign plus its blocks and affinities).
const MAX_BATCH: usize = 32;

enum Request {
    Assign(Box<AssignRequest>, Reply<Assignment>),
    ReleaseHandle(String, Reply<Vec<IpAddr>>),
    ReleaseIps(Vec<IpAddr>, Reply<Vec<IpAddr>>),
    Routes(oneshot::Sender<NodeRoutes>),
    Allocations(oneshot::Sender<Vec<NodeAllocation>>),
    Pools(oneshot::Sender<Vec<IpPool>>),
    /// Whether etcd holds a pool of this name now (not the view: it may be behind).
    PoolStored(String, oneshot::Sender<Result<bool, IpamError>>),
    Usable(Family, oneshot::Sender<Vec<String>>),
    /// The node's labels changed (its Node resource): pools' nodeSelector is evaluated with these from now on.
    SetLabels(BTreeMap<String, String>, oneshot::Sender<()>),
    /// A block as the view holds it, with its revision.
    ViewBlock(IpNetwork, oneshot::Sender<Option<(Block, i64)>>),
    /// Run the empty-block release now (tests; the task also runs it on its own timer).
    ReleaseIdle(oneshot::Sender<usize>),
}

/// One address allocated to this node's workloads, as the view holds it (for restart reconciliation and
/// CNI GC).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeAllocation {
    pub ip: IpAddr,
    pub block: IpNetwork,
    /// The owner (`<network>.<container id>` for CNI); None for an allocation written without one.
    pub handle_id: Option<String>,
    /// `namespace`, `pod`, `node`, ... as stored with the allocation.
    pub attributes: BTreeMap<String, String>,
}

/// Handle to a node's IPAM task. Dropping it stops the task.
pub struct NodeIpam {
    node: String,
    tx: mpsc::Sender<Request>,
    pools: watch::Receiver<Vec<IpPool>>,
    affinities: watch::Receiver<BTreeMap<IpNetwork, String>>,
    /// Aborted when the handle is dropped.
    task: crate::task::Task<()>,
}

impl NodeIpam {
    /// Read the pools, the IPAM configuration and every block, start the watches, and serve requests.
    pub async fn start(ds: Arc<Datastore>, node: NodeInfo) -> Result<NodeIpam, IpamError> {
        NodeIpam::start_with(ds, node, IpamOptions::default()).await
    }

    /// [`NodeIpam::start`] with the node's own defaults for what IPAMConfiguration leaves unset.
    pub async fn start_with(
        ds: Arc<Datastore>,
        node: NodeInfo,
        options: IpamOptions,
    ) -> Result<NodeIpam, IpamError> {
        if node.name.is_empty() || node.name.contains('/') {
            return Err(IpamError::Invalid(format!("bad node name {:?}", node.name)));
        }
        let name = node.name.clone();
        let state = State::load(ds, node, options).await?;
        let (pools_tx, pools) = watch::channel(state.pool_list());
        let (affinities_tx, affinities) = watch::channel(state.affinities());
        let (tx, rx) = mpsc::channel(1024);
        let task = crate::task::spawn("ipam", run(state, rx, pools_tx, affinities_tx));
        Ok(NodeIpam {
            node: name,
            tx,
            pools,
            affinities,
            task,
        })
    }

    /// Observer of the IPAM task's end, for the daemon's supervisor.
    pub fn task_watch(&self) -> crate::task::TaskWatch {
        self.task.watch()
    }

    async fn ask<T>(&self, f: impl FnOnce(Reply<T>) -> Request) -> Result<T, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(f(reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?
    }

    /// Assign addresses (see [`AssignRequest`]).
    pub async fn assign(&self, req: AssignRequest) -> Result<Assignment, IpamError> {
        self.ask(|r| Request::Assign(Box::new(req), r)).await
    }

    /// Release everything a handle owns. Idempotent: an unknown handle releases nothing.
    pub async fn release_handle(&self, handle_id: &str) -> Result<Vec<IpAddr>, IpamError> {
        let h = handle_id.to_string();
        self.ask(|r| Request::ReleaseHandle(h, r)).await
    }

    /// Release addresses. Idempotent: free addresses are ignored.
    pub async fn release_ips(&self, ips: &[IpAddr]) -> Result<Vec<IpAddr>, IpamError> {
        let ips = ips.to_vec();
        self.ask(|r| Request::ReleaseIps(ips, r)).await
    }

    /// Affine blocks and borrowed addresses, as the view holds them now.
    pub async fn routes(&self) -> Result<NodeRoutes, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Routes(reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }
}

impl NodeIpam {
    /// Every address allocated to this node: those whose `node` attribute names it (in any block, borrowed
    /// ones included) and those in its affine blocks without a `node` attribute.
    pub async fn allocations(&self) -> Result<Vec<NodeAllocation>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Allocations(reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }

    /// Names of the pools this node may take workload addresses of `family` from (enabled, workload use,
    /// selecting the node), as an assign without a pool override would consider them.
    pub async fn usable_pools(&self, family: Family) -> Result<Vec<String>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Usable(family, reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }

    /// The pools as [`NodeIpam::pools`] gives them, but once they include `name` if etcd holds a pool of
    /// that name: a pool written just now (`margay apply`, then at once `docker network create` naming
    /// it) reaches the view through its watch a moment later, longer while the watch resumes after an
    /// etcd outage. Waits at most `within` for it; a name etcd does not hold is answered at once.
    pub async fn pools_naming(
        &self,
        name: &str,
        within: Duration,
    ) -> Result<Vec<IpPool>, IpamError> {
        let named = |pools: &[IpPool]| pools.iter().any(|p| p.name() == name);
        let pools = self.pools().await?;
        if named(&pools) {
            return Ok(pools);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::PoolStored(name.to_string(), reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        let stored = rx
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))??;
        if !stored {
            return Ok(pools);
        }
        let mut published = self.pools.clone();
        let _ = tokio::time::timeout(within, published.wait_for(|p| named(p))).await;
        self.pools().await
    }

    /// The IP pools as the view holds them, published again whenever a pool is added, changed or deleted
    /// (every pool, enabled or not, in name order). For the parts that follow pools live (outgoing NAT)
    /// without a watch of their own on etcd.
    pub fn subscribe_pools(&self) -> watch::Receiver<Vec<IpPool>> {
        self.pools.clone()
    }

    /// Every block's affinity (block -> host) and every borrowed address (/32 -> the node using it), as the
    /// view holds them, published again whenever one changes. For routing without BGP (VXLAN-only): a route
    /// per block towards its host and per borrowed address towards its user, as Felix derives them.
    pub fn subscribe_affinities(&self) -> watch::Receiver<BTreeMap<IpNetwork, String>> {
        self.affinities.clone()
    }

    /// Evaluate pools' `nodeSelector` with these labels from now on (the node's Node resource changed):
    /// new blocks come from the pools that select the node, and empty affine blocks of pools that no longer
    /// select it are released (blocks in use keep their affinity, as Calico does).
    pub async fn set_labels(&self, labels: BTreeMap<String, String>) -> Result<(), IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::SetLabels(labels, reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }

    /// A block as this node's view holds it now, with the revision it was read at (None: absent).
    pub async fn view_block(&self, cidr: IpNetwork) -> Result<Option<(Block, i64)>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::ViewBlock(cidr, reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }

    /// Release the blocks that have been empty for the grace period now (the task also does it on its own
    /// timer). Returns how many were released.
    pub async fn release_idle_blocks(&self) -> Result<usize, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::ReleaseIdle(reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }

    /// The IP pools as the view holds them now (every pool, enabled or not), in name order.
    pub async fn pools(&self) -> Result<Vec<IpPool>, IpamError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Pools(reply))
            .await
            .map_err(|_| IpamError::Stopped(self.node.clone()))?;
        rx.await.map_err(|_| IpamError::Stopped(self.node.clone()))
    }
}

/// How a staged block is written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Staged {
    /// An existing block, guarded by the revision the view holds.
    Existing,
    /// A new block, created with our confirmed affinity (both guarded by absence).
    New,
    /// Another node's empty block (or one nobody holds), taken over: block guarded by the revision seen
    /// empty, their affinity (if any) by the revision read as confirmed and deleted, ours created.
    Reclaim {
        from: Option<String>,
        affinity_rev: i64,
    },
}

struct State {
    ds: Arc<Datastore>,
    view: View,
    watch_blocks: Watcher,
    watch_pools: Watcher,
    watch_config: Watcher,
    /// When this task first saw each of its blocks empty (unix ms); the block's last release time, when it
    /// has one, takes precedence (it survives restarts).
    first_empty: BTreeMap<IpNetwork, u64>,
    counters: IpamCounters,
}

impl State {
    async fn load(
        ds: Arc<Datastore>,
        node: NodeInfo,
        options: IpamOptions,
    ) -> Result<State, IpamError> {
        let (mut view, revs) = read_view(&ds, node).await?;
        view.options = options;
        Ok(State {
            watch_blocks: ds.watch(keys::BLOCKS_PREFIX, revs[0] + 1),
            watch_pools: ds.watch(&keys::resource_prefix(PLURAL), revs[1] + 1),
            watch_config: ds.watch(keys::IPAM_CONFIG_KEY, revs[2] + 1),
            ds,
            view,
            first_empty: BTreeMap::new(),
            counters: IpamCounters::default(),
        })
    }

    async fn resync(&mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match State::load(self.ds.clone(), self.view.node.clone(), self.view.options).await {
                Ok(mut s) => {
                    s.first_empty = std::mem::take(&mut self.first_empty);
                    s.counters = self.counters;
                    *self = s;
                    return;
                }
                Err(e) => {
                    tracing::warn!(node = %self.view.node.name, error = %e, "IPAM resync failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Apply a watch message; returns true when pools or config may have changed.
    async fn on_watch(&mut self, m: Option<WatchMessage>) -> bool {
        match m {
            Some(WatchMessage::Events(evs)) => {
                for ev in &evs {
                    self.view.apply_event(ev);
                }
                true
            }
            Some(WatchMessage::Resync) | None => {
                self.resync().await;
                true
            }
        }
    }

    /// Serve queued assigns: together in one transaction when they are plain (one address per family, distinct
    /// new handles) and nothing races them; otherwise, or after a lost race, one by one.
    ///
    /// A reply that cannot be delivered (here and in `serve`) means the asker gave up (a CNI request that
    /// timed out): the result stays recorded in etcd, where the next ADD with that handle finds it.
    async fn serve_assigns(&mut self, batch: Vec<(Box<AssignRequest>, Reply<Assignment>)>) {
        if batch.len() > 1 {
            let reqs: Vec<&AssignRequest> = batch.iter().map(|(r, _)| r.as_ref()).collect();
            match self.assign_batch(&reqs).await {
                Ok(Some(results)) => {
                    for ((_, reply), a) in batch.into_iter().zip(results) {
                        let _ = reply.send(Ok(a));
                    }
                    return;
                }
                Ok(None) => {}
                Err(e) => tracing::debug!(error = %e, "batched assign failed; serving one by one"),
            }
        }
        for (r, reply) in batch {
            let _ = reply.send(self.assign(&r).await);
        }
    }

    /// Plan several plain assigns on the same staged blocks and commit them in one transaction. Ok(None): the
    /// batch does not qualify or lost a race (the view has been corrected); the caller serves them one by one.
    async fn assign_batch(
        &mut self,
        reqs: &[&AssignRequest],
    ) -> Result<Option<Vec<Assignment>>, IpamError> {
        let me = self.view.node.name.clone();
        let mut ids = BTreeSet::new();
        let plain = reqs.iter().all(|r| {
            r.ips.is_empty()
                && (r.ipv4 || r.ipv6)
                && !r.handle_id.is_empty()
                && !r.handle_id.contains('/')
                && ids.insert(r.handle_id.as_str())
                && r.pools
                    .as_ref()
                    .is_none_or(|o| o.iter().all(|n| self.view.pools.contains_key(n)))
        });
        if !plain {
            return Ok(None);
        }
        let mut staged: BTreeMap<IpNetwork, (Block, Staged)> = BTreeMap::new();
        let mut full: BTreeSet<IpNetwork> = BTreeSet::new();
        let mut results = Vec::with_capacity(reqs.len());
        let cd = self.view.cooldown_at(now_ms());
        for r in reqs {
            let mut secondary = r.attributes.clone();
            secondary.insert(ATTR_NODE.to_string(), me.clone());
            let mut ips = Vec::new();
            let fams = [(r.ipv4, Family::V4), (r.ipv6, Family::V6)];
            for fam in fams.iter().filter(|f| f.0).map(|f| f.1) {
                // Only the plain choices batch; reclaims and cooling addresses go one by one.
                let choice = match self.view.plan(fam, r.pools.as_deref(), &full, &cd) {
                    Ok(c @ (Choice::Affine(_) | Choice::Claim(_) | Choice::Borrow(_))) => c,
                    _ => return Ok(None),
                };
                let (cidr, borrowed) = self.stage(&mut staged, &choice, &me);
                let Some((b, _)) = staged.get_mut(&cidr) else {
                    return Ok(None);
                };
                let Some(&ip) = b
                    .assign_avoiding(1, &r.handle_id, &secondary, &cd, false)
                    .first()
                else {
                    return Ok(None);
                };
                if b.free_cool_count(&cd) == 0 {
                    full.insert(cidr);
                }
                ips.push(AssignedIp {
                    ip,
                    block: cidr,
                    borrowed,
                });
            }
            ips.sort();
            results.push(Assignment {
                handle_id: r.handle_id.clone(),
                ips,
            });
        }
        let mut guards = Vec::new();
        let mut writes = Vec::new();
        self.block_writes(&staged, &me, &mut guards, &mut writes);
        for a in &results {
            let mut h = Handle::default();
            for ip in &a.ips {
                h.add(&ip.block, 1);
            }
            let hkey = keys::handle_key(&a.handle_id);
            guards.push(Guard::Absent(hkey.clone()));
            writes.push(Write::Put(hkey, to_json(&h)));
        }
        match self.ds.txn(&guards, &writes).await? {
            TxnOutcome::Committed { revision } => {
                for (cidr, (b, _)) in staged {
                    self.view.apply_block(cidr, Some(b), revision);
                }
                Ok(Some(results))
            }
            TxnOutcome::Conflict { current, revision } => {
                for (key, kv) in current {
                    self.view.apply_read(&key, kv.as_ref(), revision)?;
                }
                Ok(None)
            }
        }
    }

    /// Guards and writes for staged blocks: existing ones by mod_revision; new ones created together with their
    /// confirmed affinity, both guarded by absence; reclaimed ones by the block's revision, the old owner's
    /// affinity revision (deleted) and the absence of ours (created).
    fn block_writes(
        &self,
        staged: &BTreeMap<IpNetwork, (Block, Staged)>,
        me: &str,
        guards: &mut Vec<Guard>,
        writes: &mut Vec<Write>,
    ) {
        for (cidr, (b, how)) in staged {
            let bkey = keys::block_key(cidr);
            let view_rev = || {
                self.view
                    .blocks
                    .get(cidr)
                    .map(|c| c.mod_revision)
                    .unwrap_or(0)
            };
            match how {
                Staged::New => {
                    guards.push(Guard::Absent(bkey.clone()));
                    let akey = keys::affinity_key(me, cidr);
                    guards.push(Guard::Absent(akey.clone()));
                    writes.push(Write::Put(akey, to_json(&Affinity::confirmed())));
                }
                Staged::Existing => guards.push(Guard::ModRevision(bkey.clone(), view_rev())),
                Staged::Reclaim { from, affinity_rev } => {
                    guards.push(Guard::ModRevision(bkey.clone(), view_rev()));
                    if let Some(from) = from {
                        let theirs = keys::affinity_key(from, cidr);
                        guards.push(Guard::ModRevision(theirs.clone(), *affinity_rev));
                        writes.push(Write::Delete(theirs));
                    }
                    let akey = keys::affinity_key(me, cidr);
                    guards.push(Guard::Absent(akey.clone()));
                    writes.push(Write::Put(akey, to_json(&Affinity::confirmed())));
                }
            }
            writes.push(Write::Put(bkey, to_json(b)));
        }
    }

    /// Stage a takeover of `block` (empty, held by `from` or by nobody): read the owner's affinity, which must
    /// be `confirmed` (a pending claim or a release in flight is never taken). False when it cannot be taken.
    async fn stage_reclaim(
        &self,
        staged: &mut BTreeMap<IpNetwork, (Block, Staged)>,
        block: IpNetwork,
        from: Option<&str>,
        me: &str,
    ) -> Result<bool, IpamError> {
        if staged.contains_key(&block) {
            return Ok(true);
        }
        let Some(c) = self.view.blocks.get(&block) else {
            return Ok(false);
        };
        let affinity_rev = match from {
            None => 0,
            Some(from) => {
                let akey = keys::affinity_key(from, &block);
                match self.ds.get(&akey).await? {
                    Some(kv) => match parse::<Affinity>(&akey, &kv.value) {
                        Ok(a) if a.state == AffinityState::Confirmed && !a.deleted => {
                            kv.mod_revision
                        }
                        _ => return Ok(false),
                    },
                    None => return Ok(false),
                }
            }
        };
        let mut b = c.value.clone();
        b.affinity = Some(format!("host:{me}"));
        staged.insert(
            block,
            (
                b,
                Staged::Reclaim {
                    from: from.map(str::to_string),
                    affinity_rev,
                },
            ),
        );
        Ok(true)
    }

    /// Re-read every block from etcd (before answering "no free address": the view may be behind).
    async fn refresh_blocks(&mut self) -> Result<(), IpamError> {
        let (kvs, rev) = self.ds.list(keys::BLOCKS_PREFIX).await?;
        let mut seen = BTreeSet::new();
        for kv in kvs {
            if let Some(cidr) = keys::parse_block_key(&kv.key) {
                if let Ok(b) = parse::<Block>(&kv.key, &kv.value) {
                    seen.insert(cidr);
                    self.view.apply_block(cidr, Some(b), kv.mod_revision);
                }
            }
        }
        let gone: Vec<IpNetwork> = self
            .view
            .blocks
            .keys()
            .filter(|c| !seen.contains(c))
            .copied()
            .collect();
        for cidr in gone {
            self.view.apply_block(cidr, None, rev);
        }
        Ok(())
    }

    async fn serve(&mut self, req: Request) {
        match req {
            Request::Assign(r, reply) => {
                let _ = reply.send(self.assign(&r).await);
            }
            Request::ReleaseHandle(h, reply) => {
                let res = ops::release_handle(&self.ds, Some(&mut self.view), &h).await;
                let _ = reply.send(res);
                self.tidy().await;
            }
            Request::ReleaseIps(ips, reply) => {
                let res = ops::release_ips(&self.ds, Some(&mut self.view), &ips).await;
                let _ = reply.send(res);
                self.tidy().await;
            }
            Request::Routes(reply) => {
                let (mut total, mut allocated, mut empty, mut cooling) = (0u64, 0u64, 0u64, 0u64);
                let cd = self.view.cooldown_at(now_ms());
                for c in self.view.my_blocks() {
                    total += c.value.size() as u64;
                    allocated += c.value.in_use() as u64;
                    empty += u64::from(c.value.is_empty());
                    cooling += c.value.cooling_count(&cd) as u64;
                }
                let _ = reply.send(NodeRoutes {
                    blocks: self.view.my_blocks().map(|c| c.value.cidr).collect(),
                    borrowed: self.view.borrowed(),
                    addresses_total: total,
                    addresses_allocated: allocated,
                    blocks_empty: empty,
                    addresses_cooling: cooling,
                    counters: self.counters,
                });
            }
            Request::Allocations(reply) => {
                let _ = reply.send(self.node_allocations());
            }
            Request::Usable(family, reply) => {
                let _ = reply.send(
                    self.view
                        .usable_pools(family, None)
                        .into_iter()
                        .map(|p| p.name().to_string())
                        .collect(),
                );
            }
            Request::Pools(reply) => {
                let _ = reply.send(self.pool_list());
            }
            Request::PoolStored(name, reply) => {
                let stored = self
                    .ds
                    .get(&keys::resource_key(PLURAL, &name))
                    .await
                    .map(|kv| kv.is_some())
                    .map_err(IpamError::from);
                let _ = reply.send(stored);
            }
            Request::ViewBlock(cidr, reply) => {
                let _ = reply.send(
                    self.view
                        .blocks
                        .get(&cidr)
                        .map(|c| (c.value.clone(), c.mod_revision)),
                );
            }
            Request::ReleaseIdle(reply) => {
                let _ = reply.send(self.release_idle_blocks().await);
            }
            Request::SetLabels(labels, reply) => {
                if labels != self.view.node.labels {
                    tracing::info!(node = %self.view.node.name, labels = ?labels, "node labels changed: pools' nodeSelector re-evaluated");
                    self.view.node.labels = labels;
                    self.tidy().await;
                }
                let _ = reply.send(());
            }
        }
    }

    fn affinities(&self) -> BTreeMap<IpNetwork, String> {
        self.view.routes_by_affinity()
    }

    fn pool_list(&self) -> Vec<IpPool> {
        self.view.pools.values().map(|c| c.value.clone()).collect()
    }

    fn node_allocations(&self) -> Vec<NodeAllocation> {
        let me = self.view.node.name.as_str();
        let mut out = Vec::new();
        for c in self.view.blocks.values() {
            let affine = c.value.host() == Some(me);
            for (ip, a) in c.value.allocated() {
                let node = a.secondary.as_ref().and_then(|s| s.get(ATTR_NODE));
                let mine = match node {
                    Some(n) => n == me,
                    None => affine,
                };
                if mine {
                    out.push(NodeAllocation {
                        ip,
                        block: c.value.cidr,
                        handle_id: a.handle_id.clone(),
                        attributes: a.secondary.clone().unwrap_or_default(),
                    });
                }
            }
        }
        out
    }

    /// Release empty affine blocks whose pool no longer selects this node (or is gone), with their affinity.
    /// A block whose addresses still cool down is kept, held by no node, so their release times are not
    /// forgotten (another node may take it over; `ipam gc --release` deletes it once cooled).
    async fn tidy(&mut self) {
        let me = self.view.node.name.clone();
        let cd = self.view.cooldown_at(now_ms());
        let stale: Vec<(Block, i64)> = self
            .view
            .my_blocks()
            .filter(|c| c.value.is_empty())
            .filter(|c| match self.view.pool_of(&c.value.cidr) {
                None => true,
                Some(p) => !p.selects_node(&self.view.node.labels),
            })
            .map(|c| (c.value.clone(), c.mod_revision))
            .collect();
        for (b, rev) in stale {
            let cidr = b.cidr;
            let guards = [Guard::ModRevision(keys::block_key(&cidr), rev)];
            let cooling = b.cooling_count(&cd) > 0;
            let mut unheld = b;
            unheld.affinity = None;
            let writes = [
                if cooling {
                    Write::Put(keys::block_key(&cidr), to_json(&unheld))
                } else {
                    Write::Delete(keys::block_key(&cidr))
                },
                Write::Delete(keys::affinity_key(&me, &cidr)),
            ];
            match self.ds.txn(&guards, &writes).await {
                Ok(TxnOutcome::Committed { revision }) => {
                    tracing::info!(node = %me, block = %cidr, "released empty block: its pool no longer selects this node");
                    self.view
                        .apply_block(cidr, cooling.then_some(unheld), revision);
                }
                Ok(TxnOutcome::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(node = %me, block = %cidr, error = %e, "cannot release empty block")
                }
            }
        }
    }

    /// Release own blocks that have been empty for the grace period and whose addresses no longer cool down,
    /// keeping one block of every pool that selects this node. Returns how many were released.
    async fn release_idle_blocks(&mut self) -> usize {
        let me = self.view.node.name.clone();
        let now = now_ms();
        let cd = self.view.cooldown_at(now);
        let grace = self.view.empty_block_grace().as_millis() as u64;
        let mine: BTreeMap<IpNetwork, bool> = self
            .view
            .my_blocks()
            .map(|c| (c.value.cidr, c.value.is_empty()))
            .collect();
        self.first_empty
            .retain(|c, _| mine.get(c).copied().unwrap_or(false));
        for (c, empty) in &mine {
            if *empty {
                self.first_empty.entry(*c).or_insert(now);
            }
        }
        // Per pool selecting this node: its blocks, and which of them may go.
        let mut by_pool: BTreeMap<IpNetwork, (usize, Vec<(IpNetwork, i64)>)> = BTreeMap::new();
        for c in self.view.my_blocks() {
            let Some(pool) = self.view.pool_of(&c.value.cidr) else {
                continue; // no pool: tidy() releases it when empty
            };
            if !pool.selects_node(&self.view.node.labels) {
                continue; // tidy() releases it when empty
            }
            let e = by_pool.entry(pool.spec.cidr).or_default();
            e.0 += 1;
            let since = c
                .value
                .last_release()
                .or_else(|| self.first_empty.get(&c.value.cidr).copied());
            let idle = c.value.is_empty()
                && c.value.cooling_count(&cd) == 0
                && since.is_some_and(|t| now >= t.saturating_add(grace));
            if idle {
                e.1.push((c.value.cidr, c.mod_revision));
            }
        }
        let mut released = 0;
        for (_, (held, mut idle)) in by_pool {
            if idle.len() == held {
                // Keep one block of the pool: the first in address order.
                idle.remove(0);
            }
            for (cidr, rev) in idle {
                let guards = [Guard::ModRevision(keys::block_key(&cidr), rev)];
                let writes = [
                    Write::Delete(keys::block_key(&cidr)),
                    Write::Delete(keys::affinity_key(&me, &cidr)),
                ];
                match self.ds.txn(&guards, &writes).await {
                    Ok(TxnOutcome::Committed { revision }) => {
                        tracing::info!(node = %me, block = %cidr, "released a block empty for the grace period");
                        self.view.apply_block(cidr, None, revision);
                        self.first_empty.remove(&cidr);
                        self.counters.blocks_released += 1;
                        released += 1;
                    }
                    // Someone assigned from it (a borrower) or took it over: it is not idle any more.
                    Ok(TxnOutcome::Conflict { .. }) => {}
                    Err(e) => {
                        tracing::warn!(node = %me, block = %cidr, error = %e, "cannot release empty block")
                    }
                }
            }
        }
        released
    }

    async fn assign(&mut self, req: &AssignRequest) -> Result<Assignment, IpamError> {
        if req.handle_id.is_empty() || req.handle_id.contains('/') {
            return Err(IpamError::Invalid(format!(
                "bad handle id {:?}",
                req.handle_id
            )));
        }
        if !req.ipv4 && !req.ipv6 && req.ips.is_empty() {
            return Err(IpamError::Invalid(
                "nothing to assign: ask for IPv4, IPv6 or addresses".into(),
            ));
        }
        if let Some(only) = &req.pools {
            for n in only {
                if !self.view.pools.contains_key(n) {
                    return Err(IpamError::NoAddress(format!("no IP pool named {n:?}")));
                }
            }
        }
        let me = self.view.node.name.clone();
        let hkey = keys::handle_key(&req.handle_id);
        let mut secondary = req.attributes.clone();
        secondary.insert(ATTR_NODE.to_string(), me.clone());
        // None = believed absent (the common case: a new pod).
        let mut handle: Option<Cached<Handle>> = None;
        let mut skip: BTreeSet<IpNetwork> = BTreeSet::new();
        let mut refreshed = false;

        'attempt: for _ in 0..MAX_ATTEMPTS {
            // What the handle already holds (idempotent retry of an ADD, or an answer lost in an outage).
            let mut have = Vec::new();
            if let Some(h) = &handle {
                for (cidr, _) in h.value.blocks() {
                    self.ensure_block(cidr).await?;
                    if let Some(b) = self.view.blocks.get(&cidr) {
                        for ip in b.value.ips_of_handle(&req.handle_id) {
                            have.push(AssignedIp {
                                ip,
                                block: cidr,
                                borrowed: b.value.host() != Some(me.as_str()),
                            });
                        }
                    }
                }
            }
            let has = |f: Family| have.iter().any(|a| Family::of_ip(&a.ip) == f);
            let mut families = Vec::new();
            if req.ipv4 && !has(Family::V4) {
                families.push(Family::V4);
            }
            if req.ipv6 && !has(Family::V6) {
                families.push(Family::V6);
            }
            let want_ips: Vec<IpAddr> = req
                .ips
                .iter()
                .filter(|ip| !have.iter().any(|a| a.ip == **ip))
                .copied()
                .collect();
            if families.is_empty() && want_ips.is_empty() {
                have.sort();
                return Ok(Assignment {
                    handle_id: req.handle_id.clone(),
                    ips: have,
                });
            }

            // Plan on copies of the blocks.
            let cd = self.view.cooldown_at(now_ms());
            let mut staged: BTreeMap<IpNetwork, (Block, Staged)> = BTreeMap::new();
            let mut cooling_used = 0;
            let mut got = Vec::new();
            let choices = want_ips
                .iter()
                .map(|ip| (Some(*ip), self.view.plan_ip(*ip)))
                .collect::<Vec<_>>();
            for (ip, choice) in choices {
                let choice = choice.map_err(IpamError::NoAddress)?;
                let (cidr, borrowed) = self.stage(&mut staged, &choice, &me);
                let Some(ip) = ip else { continue };
                let Some((b, _)) = staged.get_mut(&cidr) else {
                    continue;
                };
                match b.assign_ip(ip, &req.handle_id, &secondary) {
                    Ok(()) => got.push(AssignedIp {
                        ip,
                        block: cidr,
                        borrowed,
                    }),
                    Err(BlockError::InUse { ip, handle }) => {
                        return Err(IpamError::InUse { ip, handle })
                    }
                    Err(e) => return Err(IpamError::Invalid(e.to_string())),
                }
            }
            for fam in families {
                let choice = match self.view.plan(fam, req.pools.as_deref(), &skip, &cd) {
                    Ok(c) => c,
                    Err(_) if !refreshed => {
                        // The view may be behind (an empty block it believes full): look again once.
                        refreshed = true;
                        self.refresh_blocks().await?;
                        continue 'attempt;
                    }
                    Err(e) => {
                        self.counters.exhausted += 1;
                        return Err(IpamError::NoAddress(e));
                    }
                };
                if let Choice::Reclaim { block, from } = &choice {
                    if !self
                        .stage_reclaim(&mut staged, *block, from.as_deref(), &me)
                        .await?
                    {
                        skip.insert(*block);
                        continue 'attempt;
                    }
                }
                let allow_cooling = matches!(choice, Choice::Cooling(_));
                let (cidr, borrowed) = self.stage(&mut staged, &choice, &me);
                let Some((b, _)) = staged.get_mut(&cidr) else {
                    continue;
                };
                match b
                    .assign_avoiding(1, &req.handle_id, &secondary, &cd, allow_cooling)
                    .first()
                {
                    Some(&ip) => {
                        if allow_cooling {
                            cooling_used += 1;
                        }
                        got.push(AssignedIp {
                            ip,
                            block: cidr,
                            borrowed,
                        })
                    }
                    None => {
                        // The specific addresses above took the last free one: plan again without it.
                        skip.insert(cidr);
                        continue 'attempt;
                    }
                }
            }

            // One transaction: blocks (+ affinities of new blocks) and the handle.
            let mut guards = Vec::new();
            let mut writes = Vec::new();
            self.block_writes(&staged, &me, &mut guards, &mut writes);
            let mut hv = handle.as_ref().map(|h| h.value.clone()).unwrap_or_default();
            for g in &got {
                hv.add(&g.block, 1);
            }
            guards.push(match &handle {
                Some(h) => Guard::ModRevision(hkey.clone(), h.mod_revision),
                None => Guard::Absent(hkey.clone()),
            });
            writes.push(Write::Put(hkey.clone(), to_json(&hv)));

            match self.ds.txn(&guards, &writes).await? {
                TxnOutcome::Committed { revision } => {
                    for (cidr, (b, how)) in staged {
                        if let Staged::Reclaim { from, .. } = &how {
                            tracing::info!(node = %me, block = %cidr, from = ?from, "took over an empty block: the pools had no unclaimed block left");
                            self.counters.blocks_reclaimed += 1;
                        }
                        self.view.apply_block(cidr, Some(b), revision);
                    }
                    if cooling_used > 0 {
                        tracing::info!(node = %me, handle = %req.handle_id, "handed out an address inside its cooldown: the pools have no other free address");
                        self.counters.cooling_handed_out += cooling_used;
                    }
                    have.extend(got);
                    have.sort();
                    return Ok(Assignment {
                        handle_id: req.handle_id.clone(),
                        ips: have,
                    });
                }
                TxnOutcome::Conflict { current, revision } => {
                    for (key, kv) in current {
                        if self.view.apply_read(&key, kv.as_ref(), revision)? {
                            continue;
                        }
                        if key == hkey {
                            handle = match kv {
                                Some(kv) => Some(Cached {
                                    value: parse(&key, &kv.value)?,
                                    mod_revision: kv.mod_revision,
                                }),
                                None => None,
                            };
                        } else if let Some((node, cidr)) = keys::parse_affinity_key(&key) {
                            // A reclaim whose owner's affinity changed (a release or a claim in flight):
                            // leave that block alone.
                            if node != me {
                                skip.insert(cidr);
                                continue;
                            }
                            let Some(kv) = kv else { continue };
                            // An affinity of ours without a block (a Calico claim that crashed half-way, or
                            // one in flight), or for a block that is not ours: do not fight over it; `ipam
                            // check` reports it if it stays.
                            if self.view.blocks.get(&cidr).map(|c| c.value.host())
                                != Some(Some(me.as_str()))
                            {
                                tracing::debug!(
                                    key,
                                    rev = kv.mod_revision,
                                    "affinity exists without block; skipping"
                                );
                                skip.insert(cidr);
                            }
                        }
                    }
                }
            }
        }
        Err(IpamError::TooManyConflicts {
            what: format!("assign for handle {:?} on node {me:?}", req.handle_id),
        })
    }

    /// Put the block a choice names into `staged` (a copy of the cached one, or a new block for a claim; a
    /// reclaim is staged by [`State::stage_reclaim`] first).
    fn stage(
        &self,
        staged: &mut BTreeMap<IpNetwork, (Block, Staged)>,
        choice: &Choice,
        me: &str,
    ) -> (IpNetwork, bool) {
        let cidr = choice.block();
        let borrowed = match choice {
            Choice::Affine(_) | Choice::Claim(_) | Choice::Reclaim { .. } => false,
            Choice::Borrow(_) => true,
            Choice::Cooling(c) => self
                .view
                .blocks
                .get(c)
                .is_some_and(|b| b.value.host() != Some(me)),
        };
        staged
            .entry(cidr)
            .or_insert_with(|| match self.view.blocks.get(&cidr) {
                Some(c) => (c.value.clone(), Staged::Existing),
                None => (Block::for_node(cidr, me, now_nanos()), Staged::New),
            });
        (cidr, borrowed)
    }

    /// Make sure the view holds `cidr` if it exists (one read when the watch has not delivered it yet).
    async fn ensure_block(&mut self, cidr: IpNetwork) -> Result<(), IpamError> {
        if self.view.blocks.contains_key(&cidr) {
            return Ok(());
        }
        let key = keys::block_key(&cidr);
        if let Some(kv) = self.ds.get(&key).await? {
            let b: Block = parse(&key, &kv.value)?;
            self.view.apply_block(cidr, Some(b), kv.mod_revision);
        }
        Ok(())
    }
}

async fn run(
    mut st: State,
    mut rx: mpsc::Receiver<Request>,
    pools_tx: watch::Sender<Vec<IpPool>>,
    affinities_tx: watch::Sender<BTreeMap<IpNetwork, String>>,
) {
    let mut next_idle_check = tokio::time::Instant::now() + idle_check_period(&st.view);
    loop {
        let changed = tokio::select! {
            _ = tokio::time::sleep_until(next_idle_check) => {
                st.release_idle_blocks().await;
                next_idle_check = tokio::time::Instant::now() + idle_check_period(&st.view);
                false
            }
            req = rx.recv() => match req {
                Some(Request::Assign(r, reply)) => {
                    // Assigns that queued up while we were busy go out together, in one transaction.
                    let mut batch = vec![(r, reply)];
                    let mut other = None;
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(Request::Assign(r, reply)) => batch.push((r, reply)),
                            Ok(o) => {
                                other = Some(o);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                    st.serve_assigns(batch).await;
                    if let Some(o) = other {
                        st.serve(o).await;
                    }
                    false
                }
                Some(r) => { st.serve(r).await; false }
                None => return,
            },
            m = st.watch_blocks.recv() => {
                st.on_watch(m).await;
                // Only worth the scan when someone routes by affinities (NodeIpam holds one receiver).
                if affinities_tx.receiver_count() > 1 {
                    let a = st.affinities();
                    affinities_tx.send_if_modified(|old| {
                        if *old == a {
                            return false;
                        }
                        *old = a;
                        true
                    });
                }
                false
            }
            m = st.watch_pools.recv() => st.on_watch(m).await,
            m = st.watch_config.recv() => st.on_watch(m).await,
        };
        if changed {
            // The grace period may have been shortened by the configuration: check sooner.
            next_idle_check =
                next_idle_check.min(tokio::time::Instant::now() + idle_check_period(&st.view));
            st.tidy().await;
            let pools = st.pool_list();
            pools_tx.send_if_modified(|old| {
                if *old == pools {
                    return false;
                }
                *old = pools;
                true
            });
        }
    }
}

/// Read blocks, pools and IPAM config; returns the view and the revision each was read at.
async fn read_view(ds: &Datastore, node: NodeInfo) -> Result<(View, [i64; 3]), IpamError> {
    let mut view = View::new(node);
    let (blocks, rb) = ds.list(keys::BLOCKS_PREFIX).await?;
    for kv in blocks {
        if let Some(cidr) = keys::parse_block_key(&kv.key) {
            match parse::<Block>(&kv.key, &kv.value) {
                Ok(b) => view.apply_block(cidr, Some(b), kv.mod_revision),
                Err(e) => tracing::warn!(error = %e, "ignoring block"),
            }
        }
    }
    let prefix = keys::resource_prefix(PLURAL);
    let (pools, rp) = ds.list(&prefix).await?;
    for kv in pools {
        if let Some(name) = kv.key.strip_prefix(&prefix) {
            view.apply_pool(
                name,
                crate::datastore::WatchEventKind::Put,
                &kv.value,
                kv.mod_revision,
            );
        }
    }
    let (cfg, rc) = ds.list(keys::IPAM_CONFIG_KEY).await?;
    for kv in cfg.iter().filter(|kv| kv.key == keys::IPAM_CONFIG_KEY) {
        view.apply_config(
            crate::datastore::WatchEventKind::Put,
            &kv.value,
            kv.mod_revision,
        );
    }
    Ok((view, [rb, rp, rc]))
}

/// How often the empty-block release looks: a quarter of the grace period, between 100 ms and 30 s.
fn idle_check_period(view: &View) -> Duration {
    (view.empty_block_grace() / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
