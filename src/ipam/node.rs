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

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::sync::{mpsc, oneshot, watch};

use super::block::{Block, BlockError, ATTR_NODE};
use super::model::{Affinity, Handle};
use super::view::{Cached, Choice, Family, NodeInfo, View};
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
    Usable(Family, oneshot::Sender<Vec<String>>),
    /// The node's labels changed (its Node resource): pools' nodeSelector is evaluated with these from now on.
    SetLabels(BTreeMap<String, String>, oneshot::Sender<()>),
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
        if node.name.is_empty() || node.name.contains('/') {
            return Err(IpamError::Invalid(format!("bad node name {:?}", node.name)));
        }
        let name = node.name.clone();
        let state = State::load(ds, node).await?;
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

struct State {
    ds: Arc<Datastore>,
    view: View,
    watch_blocks: Watcher,
    watch_pools: Watcher,
    watch_config: Watcher,
}

impl State {
    async fn load(ds: Arc<Datastore>, node: NodeInfo) -> Result<State, IpamError> {
        let (view, revs) = read_view(&ds, node).await?;
        Ok(State {
            watch_blocks: ds.watch(keys::BLOCKS_PREFIX, revs[0] + 1),
            watch_pools: ds.watch(&keys::resource_prefix(PLURAL), revs[1] + 1),
            watch_config: ds.watch(keys::IPAM_CONFIG_KEY, revs[2] + 1),
            ds,
            view,
        })
    }

    async fn resync(&mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match State::load(self.ds.clone(), self.view.node.clone()).await {
                Ok(s) => {
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
        let mut staged: BTreeMap<IpNetwork, (Block, bool)> = BTreeMap::new();
        let mut full: BTreeSet<IpNetwork> = BTreeSet::new();
        let mut results = Vec::with_capacity(reqs.len());
        for r in reqs {
            let mut secondary = r.attributes.clone();
            secondary.insert(ATTR_NODE.to_string(), me.clone());
            let mut ips = Vec::new();
            let fams = [(r.ipv4, Family::V4), (r.ipv6, Family::V6)];
            for fam in fams.iter().filter(|f| f.0).map(|f| f.1) {
                let Ok(choice) = self.view.plan(fam, r.pools.as_deref(), &full) else {
                    return Ok(None);
                };
                let (cidr, borrowed) = self.stage(&mut staged, choice, &me);
                let Some((b, _)) = staged.get_mut(&cidr) else {
                    return Ok(None);
                };
                let Some(&ip) = b.assign(1, &r.handle_id, &secondary).first() else {
                    return Ok(None);
                };
                if b.free_count() == 0 {
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
                    if let Some(cidr) = keys::parse_block_key(&key) {
                        match kv {
                            Some(kv) => {
                                let b: Block = parse(&key, &kv.value)?;
                                self.view.apply_block(cidr, Some(b), kv.mod_revision);
                            }
                            None => self.view.apply_block(cidr, None, revision),
                        }
                    }
                }
                Ok(None)
            }
        }
    }

    /// Guards and writes for staged blocks: existing ones by mod_revision; new ones created together with their
    /// confirmed affinity, both guarded by absence.
    fn block_writes(
        &self,
        staged: &BTreeMap<IpNetwork, (Block, bool)>,
        me: &str,
        guards: &mut Vec<Guard>,
        writes: &mut Vec<Write>,
    ) {
        for (cidr, (b, is_new)) in staged {
            let bkey = keys::block_key(cidr);
            if *is_new {
                guards.push(Guard::Absent(bkey.clone()));
                let akey = keys::affinity_key(me, cidr);
                guards.push(Guard::Absent(akey.clone()));
                writes.push(Write::Put(akey, to_json(&Affinity::confirmed())));
            } else {
                let rev = self
                    .view
                    .blocks
                    .get(cidr)
                    .map(|c| c.mod_revision)
                    .unwrap_or(0);
                guards.push(Guard::ModRevision(bkey.clone(), rev));
            }
            writes.push(Write::Put(bkey, to_json(b)));
        }
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
                let (mut total, mut allocated) = (0u64, 0u64);
                for c in self.view.my_blocks() {
                    total += c.value.size() as u64;
                    allocated += c.value.in_use() as u64;
                }
                let _ = reply.send(NodeRoutes {
                    blocks: self.view.my_blocks().map(|c| c.value.cidr).collect(),
                    borrowed: self.view.borrowed(),
                    addresses_total: total,
                    addresses_allocated: allocated,
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
    async fn tidy(&mut self) {
        let me = self.view.node.name.clone();
        let stale: Vec<(IpNetwork, i64)> = self
            .view
            .my_blocks()
            .filter(|c| c.value.is_empty())
            .filter(|c| match self.view.pool_of(&c.value.cidr) {
                None => true,
                Some(p) => !p.selects_node(&self.view.node.labels),
            })
            .map(|c| (c.value.cidr, c.mod_revision))
            .collect();
        for (cidr, rev) in stale {
            let guards = [Guard::ModRevision(keys::block_key(&cidr), rev)];
            let writes = [
                Write::Delete(keys::block_key(&cidr)),
                Write::Delete(keys::affinity_key(&me, &cidr)),
            ];
            match self.ds.txn(&guards, &writes).await {
                Ok(TxnOutcome::Committed { revision }) => {
                    tracing::info!(node = %me, block = %cidr, "released empty block: its pool no longer selects this node");
                    self.view.apply_block(cidr, None, revision);
                }
                Ok(TxnOutcome::Conflict { .. }) => {}
                Err(e) => {
                    tracing::warn!(node = %me, block = %cidr, error = %e, "cannot release empty block")
                }
            }
        }
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
            let mut staged: BTreeMap<IpNetwork, (Block, bool)> = BTreeMap::new();
            let mut got = Vec::new();
            let choices = want_ips
                .iter()
                .map(|ip| (Some(*ip), self.view.plan_ip(*ip)))
                .collect::<Vec<_>>();
            for (ip, choice) in choices {
                let choice = choice.map_err(IpamError::NoAddress)?;
                let (cidr, borrowed) = self.stage(&mut staged, choice, &me);
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
                let choice = self
                    .view
                    .plan(fam, req.pools.as_deref(), &skip)
                    .map_err(IpamError::NoAddress)?;
                let (cidr, borrowed) = self.stage(&mut staged, choice, &me);
                let Some((b, _)) = staged.get_mut(&cidr) else {
                    continue;
                };
                match b.assign(1, &req.handle_id, &secondary).first() {
                    Some(&ip) => got.push(AssignedIp {
                        ip,
                        block: cidr,
                        borrowed,
                    }),
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
                    for (cidr, (b, _)) in staged {
                        self.view.apply_block(cidr, Some(b), revision);
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
                        if let Some(cidr) = keys::parse_block_key(&key) {
                            match kv {
                                Some(kv) => {
                                    let b: Block = parse(&key, &kv.value)?;
                                    self.view.apply_block(cidr, Some(b), kv.mod_revision);
                                }
                                None => self.view.apply_block(cidr, None, revision),
                            }
                        } else if key == hkey {
                            handle = match kv {
                                Some(kv) => Some(Cached {
                                    value: parse(&key, &kv.value)?,
                                    mod_revision: kv.mod_revision,
                                }),
                                None => None,
                            };
                        } else if let (Some(kv), Some((_, cidr))) =
                            (kv, keys::parse_affinity_key(&key))
                        {
                            // An affinity of ours without a block (a Calico claim that crashed half-way, or
                            // one in flight): do not fight over it; `ipam check` reports it if it stays.
                            if !self.view.blocks.contains_key(&cidr) {
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

    /// Put the block a choice names into `staged` (a copy of the cached one, or a new block for a claim).
    fn stage(
        &self,
        staged: &mut BTreeMap<IpNetwork, (Block, bool)>,
        choice: Choice,
        me: &str,
    ) -> (IpNetwork, bool) {
        let (cidr, borrowed) = match choice {
            Choice::Affine(c) | Choice::Claim(c) => (c, false),
            Choice::Borrow(c) => (c, true),
        };
        staged
            .entry(cidr)
            .or_insert_with(|| match self.view.blocks.get(&cidr) {
                Some(c) => (c.value.clone(), false),
                None => (Block::for_node(cidr, me, now_nanos()), true),
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
    loop {
        let changed = tokio::select! {
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

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}
