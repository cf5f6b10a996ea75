//! Cluster-wide IPAM operations: release by handle and by address, remove a node, check consistency, usage
//! report. Used by the node task (with its view as a cache) and by the operator CLI (without).
//!
//! Each write is one transaction covering every key it changes (blocks, handle(s), affinity), guarded by the
//! revisions read, so a concurrent writer or an outage can never leave a block and its handle disagreeing.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use super::block::{now_ms, Block, Cooldown, ATTR_NAMESPACE, ATTR_NODE, ATTR_POD, ATTR_TYPE};
use super::model::{Affinity, Handle};
use super::view::{Cached, View};
use super::{parse, to_json, IpamError, MAX_ATTEMPTS};
use crate::config::ippool::{IpPool, PLURAL};
use crate::datastore::{keys, Datastore, Guard, KeyValue, TxnOutcome, Write};

/// Blocks read for one operation: from the node's view when there is one, else from etcd once.
struct Blocks<'a> {
    view: Option<&'a mut View>,
    local: BTreeMap<IpNetwork, Option<Cached<Block>>>,
    /// The cooldown in force: an emptied block nobody holds is kept while its addresses cool down.
    cd: Cooldown,
    /// Extra guards for every transaction (`ipam gc`: the node's liveness key must still be absent).
    extra_guards: Vec<Guard>,
}

/// The cooldown in force: from the node's view, else from the stored IPAM configuration (CLI).
async fn cooldown(ds: &Datastore, view: Option<&View>) -> Result<Cooldown, IpamError> {
    if let Some(v) = view {
        return Ok(v.cooldown_at(now_ms()));
    }
    let mut v = View::default();
    if let Some(kv) = ds.get(keys::IPAM_CONFIG_KEY).await? {
        v.apply_config(
            crate::datastore::WatchEventKind::Put,
            &kv.value,
            kv.mod_revision,
        );
    }
    Ok(v.cooldown_at(now_ms()))
}

impl<'a> Blocks<'a> {
    async fn new(ds: &Datastore, view: Option<&'a mut View>) -> Result<Blocks<'a>, IpamError> {
        let cd = cooldown(ds, view.as_deref()).await?;
        Ok(Blocks {
            view,
            local: BTreeMap::new(),
            cd,
            extra_guards: Vec::new(),
        })
    }

    /// What becomes of a block after a write: kept unless it is empty, held by no node and none of its
    /// addresses cools down.
    fn keeps(&self, b: &Block) -> bool {
        !(b.is_empty() && b.affinity.is_none() && b.cooling_count(&self.cd) == 0)
    }

    fn write(&self, cidr: &IpNetwork, b: &Block) -> Write {
        if self.keeps(b) {
            Write::Put(keys::block_key(cidr), to_json(b))
        } else {
            Write::Delete(keys::block_key(cidr))
        }
    }

    async fn get(
        &mut self,
        ds: &Datastore,
        cidr: IpNetwork,
    ) -> Result<Option<Cached<Block>>, IpamError> {
        if let Some(c) = self.local.get(&cidr) {
            return Ok(c.clone());
        }
        if let Some(v) = &self.view {
            if let Some(c) = v.blocks.get(&cidr) {
                return Ok(Some(c.clone()));
            }
        }
        let key = keys::block_key(&cidr);
        let got = match ds.get(&key).await? {
            Some(kv) => Some(Cached {
                value: parse::<Block>(&key, &kv.value)?,
                mod_revision: kv.mod_revision,
            }),
            None => None,
        };
        self.local.insert(cidr, got.clone());
        Ok(got)
    }

    fn set(&mut self, cidr: IpNetwork, block: Option<Block>, revision: i64) {
        if let Some(v) = self.view.as_deref_mut() {
            v.apply_block(cidr, block.clone(), revision);
        }
        self.local.insert(
            cidr,
            block.map(|b| Cached {
                value: b,
                mod_revision: revision,
            }),
        );
    }

    /// Take in what a failed transaction read back.
    fn absorb(
        &mut self,
        current: &[(String, Option<KeyValue>)],
        revision: i64,
    ) -> Result<(), IpamError> {
        for (key, kv) in current {
            if let Some(cidr) = keys::parse_block_key(key) {
                match kv {
                    Some(kv) => {
                        let b = parse::<Block>(key, &kv.value)?;
                        self.set(cidr, Some(b), kv.mod_revision);
                    }
                    None => self.set(cidr, None, revision),
                }
            }
        }
        Ok(())
    }
}

async fn get_handle(ds: &Datastore, id: &str) -> Result<Option<Cached<Handle>>, IpamError> {
    let key = keys::handle_key(id);
    Ok(match ds.get(&key).await? {
        Some(kv) => Some(Cached {
            value: parse(&key, &kv.value)?,
            mod_revision: kv.mod_revision,
        }),
        None => None,
    })
}

/// An emptied block is deleted only when no node holds it (Calico keeps empty affine blocks).
/// The handle side of releasing addresses from one block, for the same transaction as the block write:
/// each handle's count for `cidr` goes down by what was freed (the handle goes when it reaches zero), guarded
/// by its mod_revision; a handle that is already gone is guarded as absent.
async fn handle_releases(
    ds: &Datastore,
    cidr: &IpNetwork,
    per_handle: &BTreeMap<String, u64>,
    guards: &mut Vec<Guard>,
    writes: &mut Vec<Write>,
) -> Result<(), IpamError> {
    for (hid, n) in per_handle {
        let hkey = keys::handle_key(hid);
        match get_handle(ds, hid).await? {
            Some(mut h) => {
                guards.push(Guard::ModRevision(hkey.clone(), h.mod_revision));
                h.value.remove(cidr, *n);
                writes.push(if h.value.is_empty() {
                    Write::Delete(hkey)
                } else {
                    Write::Put(hkey, to_json(&h.value))
                });
            }
            None => guards.push(Guard::Absent(hkey)),
        }
    }
    Ok(())
}

/// Release everything `handle_id` owns, delete the handle. Idempotent. Returns the addresses freed.
pub async fn release_handle(
    ds: &Datastore,
    view: Option<&mut View>,
    handle_id: &str,
) -> Result<Vec<IpAddr>, IpamError> {
    let hkey = keys::handle_key(handle_id);
    let mut blocks = Blocks::new(ds, view).await?;
    for _ in 0..MAX_ATTEMPTS {
        let Some(h) = get_handle(ds, handle_id).await? else {
            return Ok(Vec::new());
        };
        let mut guards = vec![Guard::ModRevision(hkey.clone(), h.mod_revision)];
        let mut writes = vec![Write::Delete(hkey.clone())];
        let mut freed = Vec::new();
        let mut staged = Vec::new();
        for (cidr, _) in h.value.blocks() {
            // A block the handle names but that is gone: nothing to free there; the handle goes anyway.
            let Some(c) = blocks.get(ds, cidr).await? else {
                continue;
            };
            let mut b = c.value.clone();
            freed.extend(b.release_handle_at(handle_id, now_ms()));
            guards.push(Guard::ModRevision(keys::block_key(&cidr), c.mod_revision));
            writes.push(blocks.write(&cidr, &b));
            staged.push((cidr, b));
        }
        match ds.txn(&guards, &writes).await? {
            TxnOutcome::Committed { revision } => {
                for (cidr, b) in staged {
                    let keep = blocks.keeps(&b);
                    blocks.set(cidr, keep.then_some(b), revision);
                }
                return Ok(freed);
            }
            TxnOutcome::Conflict { current, revision } => blocks.absorb(&current, revision)?,
        }
    }
    Err(IpamError::TooManyConflicts {
        what: format!("release of handle {handle_id:?}"),
    })
}

/// Release addresses (whatever handle owns them), decrementing their handles. Idempotent: addresses that are
/// not allocated are skipped. Returns the addresses actually freed.
pub async fn release_ips(
    ds: &Datastore,
    view: Option<&mut View>,
    ips: &[IpAddr],
) -> Result<Vec<IpAddr>, IpamError> {
    // Which block holds each address: the view knows every block; without one, list them once.
    let cidrs: Vec<IpNetwork> = match &view {
        Some(v) => v.blocks.keys().copied().collect(),
        None => ds
            .list(keys::BLOCKS_PREFIX)
            .await?
            .0
            .iter()
            .filter_map(|kv| keys::parse_block_key(&kv.key))
            .collect(),
    };
    let mut by_block: BTreeMap<IpNetwork, Vec<IpAddr>> = BTreeMap::new();
    for ip in ips {
        if let Some(c) = cidrs.iter().find(|c| c.contains(*ip)) {
            by_block.entry(*c).or_default().push(*ip);
        }
    }
    let mut blocks = Blocks::new(ds, view).await?;
    let mut all = Vec::new();
    for (cidr, ips) in by_block {
        all.extend(release_in_block(ds, &mut blocks, cidr, &ips).await?);
    }
    Ok(all)
}

async fn release_in_block(
    ds: &Datastore,
    blocks: &mut Blocks<'_>,
    cidr: IpNetwork,
    ips: &[IpAddr],
) -> Result<Vec<IpAddr>, IpamError> {
    for _ in 0..MAX_ATTEMPTS {
        let Some(c) = blocks.get(ds, cidr).await? else {
            return Ok(Vec::new());
        };
        let mut b = c.value.clone();
        let freed_ips: Vec<IpAddr> = ips
            .iter()
            .filter(|ip| {
                b.handle_of(**ip).is_some()
                    || b.ordinal(**ip).is_ok_and(|o| b.allocations[o].is_some())
            })
            .copied()
            .collect();
        let per_handle = b.release_at(ips, now_ms());
        if freed_ips.is_empty() {
            return Ok(Vec::new());
        }
        let mut guards = vec![Guard::ModRevision(keys::block_key(&cidr), c.mod_revision)];
        guards.extend(blocks.extra_guards.iter().cloned());
        let mut writes = vec![blocks.write(&cidr, &b)];
        handle_releases(ds, &cidr, &per_handle, &mut guards, &mut writes).await?;
        match ds.txn(&guards, &writes).await? {
            TxnOutcome::Committed { revision } => {
                let keep = blocks.keeps(&b);
                blocks.set(cidr, keep.then_some(b), revision);
                return Ok(freed_ips);
            }
            TxnOutcome::Conflict { current, revision } => blocks.absorb(&current, revision)?,
        }
    }
    Err(IpamError::TooManyConflicts {
        what: format!("release of addresses in block {cidr}"),
    })
}

/// What `node remove` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RemoveReport {
    pub blocks_deleted: usize,
    /// Blocks kept because other nodes hold addresses in them; their affinity was dropped.
    pub blocks_released: usize,
    /// Emptied blocks kept, held by no node, while their addresses cool down (any node may take them over;
    /// `ipam gc` deletes them afterwards).
    pub blocks_cooling: usize,
    pub addresses_released: usize,
    pub affinities_deleted: usize,
}

/// Remove a node from IPAM: every affinity, every block it holds (releasing the addresses and decrementing or
/// deleting their handles), and the addresses it borrowed from other blocks. Each block goes in one
/// transaction with its affinity and handles.
pub async fn remove_node(ds: &Datastore, node: &str) -> Result<RemoveReport, IpamError> {
    remove_node_guarded(ds, node, Vec::new()).await
}

/// [`remove_node`], with `extra_guards` in every transaction (`ipam gc`: the node's liveness key is still
/// absent, so a node that comes back in the middle is not released any further).
pub async fn remove_node_guarded(
    ds: &Datastore,
    node: &str,
    extra_guards: Vec<Guard>,
) -> Result<RemoveReport, IpamError> {
    if node.is_empty() || node.contains('/') {
        return Err(IpamError::Invalid(format!("bad node name {node:?}")));
    }
    let mut report = RemoveReport::default();
    let (affs, _) = ds.list(&keys::node_affinities_prefix(node)).await?;
    let (blocks_kv, _) = ds.list(keys::BLOCKS_PREFIX).await?;
    let mut mine = BTreeSet::new();
    let mut borrowed: Vec<(IpNetwork, Vec<IpAddr>)> = Vec::new();
    for kv in &blocks_kv {
        let Some(cidr) = keys::parse_block_key(&kv.key) else {
            continue;
        };
        let b: Block = parse(&kv.key, &kv.value)?;
        if b.host() == Some(node) {
            mine.insert(cidr);
        } else {
            let ips: Vec<IpAddr> = b
                .allocated()
                .filter(|(_, a)| {
                    a.secondary
                        .as_ref()
                        .and_then(|s| s.get(ATTR_NODE))
                        .map(String::as_str)
                        == Some(node)
                })
                .map(|(ip, _)| ip)
                .collect();
            if !ips.is_empty() {
                borrowed.push((cidr, ips));
            }
        }
    }
    for kv in &affs {
        if let Some((_, cidr)) = keys::parse_affinity_key(&kv.key) {
            mine.insert(cidr);
        }
    }
    let mut blocks = Blocks::new(ds, None).await?;
    blocks.extra_guards = extra_guards;
    for cidr in mine {
        remove_node_block(ds, &mut blocks, node, cidr, &mut report).await?;
    }
    for (cidr, ips) in borrowed {
        report.addresses_released += release_in_block(ds, &mut blocks, cidr, &ips).await?.len();
    }
    Ok(report)
}

async fn remove_node_block(
    ds: &Datastore,
    blocks: &mut Blocks<'_>,
    node: &str,
    cidr: IpNetwork,
    report: &mut RemoveReport,
) -> Result<(), IpamError> {
    let akey = keys::affinity_key(node, &cidr);
    let bkey = keys::block_key(&cidr);
    for _ in 0..MAX_ATTEMPTS {
        let aff = ds.get(&akey).await?;
        let block = blocks.get(ds, cidr).await?;
        let mut guards = blocks.extra_guards.clone();
        let mut writes = Vec::new();
        match &aff {
            Some(kv) => {
                guards.push(Guard::ModRevision(akey.clone(), kv.mod_revision));
                writes.push(Write::Delete(akey.clone()));
            }
            None => guards.push(Guard::Absent(akey.clone())),
        }
        let mut freed = 0;
        let mut outcome_block = None;
        if let Some(c) = &block {
            if c.value.host() == Some(node) {
                let mut b = c.value.clone();
                // Release this node's own allocations; others' (borrowers) stay, in a block no node holds.
                let own: Vec<IpAddr> = b
                    .allocated()
                    .filter(|(_, a)| {
                        a.secondary
                            .as_ref()
                            .and_then(|s| s.get(ATTR_NODE))
                            .map(String::as_str)
                            .is_none_or(|n| n == node)
                    })
                    .map(|(ip, _)| ip)
                    .collect();
                let per_handle = b.release_at(&own, now_ms());
                freed = own.len();
                b.affinity = None;
                guards.push(Guard::ModRevision(bkey.clone(), c.mod_revision));
                writes.push(blocks.write(&cidr, &b));
                handle_releases(ds, &cidr, &per_handle, &mut guards, &mut writes).await?;
                outcome_block = Some(b);
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        match ds.txn(&guards, &writes).await? {
            TxnOutcome::Committed { revision } => {
                if aff.is_some() {
                    report.affinities_deleted += 1;
                }
                if let Some(b) = outcome_block {
                    report.addresses_released += freed;
                    if !blocks.keeps(&b) {
                        report.blocks_deleted += 1;
                        blocks.set(cidr, None, revision);
                    } else if b.is_empty() {
                        // Held by nobody until its addresses have cooled down (then any node may take it).
                        report.blocks_cooling += 1;
                        blocks.set(cidr, Some(b), revision);
                    } else {
                        report.blocks_released += 1;
                        blocks.set(cidr, Some(b), revision);
                    }
                }
                return Ok(());
            }
            TxnOutcome::Conflict { current, revision } => blocks.absorb(&current, revision)?,
        }
    }
    Err(IpamError::TooManyConflicts {
        what: format!("removal of node {node:?} block {cidr}"),
    })
}

/// Everything IPAM stores, read at one revision.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub revision: i64,
    pub pools: Vec<IpPool>,
    pub blocks: BTreeMap<IpNetwork, Block>,
    pub handles: BTreeMap<String, Handle>,
    /// (node, block) -> affinity
    pub affinities: BTreeMap<(String, IpNetwork), Affinity>,
    /// Keys that did not parse, with the reason.
    pub unreadable: Vec<String>,
}

/// Read pools, blocks, handles and affinities (each list at its own revision; IPAM writes are transactions,
/// so any block/handle disagreement seen here is real unless a write raced the read: re-run to confirm).
pub async fn snapshot(ds: &Datastore) -> Result<Snapshot, IpamError> {
    let mut s = Snapshot::default();
    let (blocks, rev) = ds.list(keys::BLOCKS_PREFIX).await?;
    s.revision = rev;
    for kv in blocks {
        match (
            keys::parse_block_key(&kv.key),
            serde_json::from_slice::<Block>(&kv.value),
        ) {
            (Some(c), Ok(b)) => {
                s.blocks.insert(c, b);
            }
            (_, Err(e)) => s.unreadable.push(format!("{}: {e}", kv.key)),
            (None, _) => s.unreadable.push(format!("{}: not a block key", kv.key)),
        }
    }
    for kv in ds.list(keys::HANDLES_PREFIX).await?.0 {
        match (
            keys::parse_handle_key(&kv.key),
            serde_json::from_slice::<Handle>(&kv.value),
        ) {
            (Some(id), Ok(h)) => {
                s.handles.insert(id.to_string(), h);
            }
            (_, Err(e)) => s.unreadable.push(format!("{}: {e}", kv.key)),
            (None, _) => s.unreadable.push(format!("{}: not a handle key", kv.key)),
        }
    }
    for kv in ds.list(keys::AFFINITIES_PREFIX).await?.0 {
        match (
            keys::parse_affinity_key(&kv.key),
            serde_json::from_slice::<Affinity>(&kv.value),
        ) {
            (Some(k), Ok(a)) => {
                s.affinities.insert(k, a);
            }
            (_, Err(e)) => s.unreadable.push(format!("{}: {e}", kv.key)),
            (None, _) => s
                .unreadable
                .push(format!("{}: not an affinity key", kv.key)),
        }
    }
    for kv in ds.list(&keys::resource_prefix(PLURAL)).await?.0 {
        match crate::config::tolerant::tolerant_slice::<IpPool>(
            crate::config::ippool::KIND,
            &kv.value,
        ) {
            Ok(p) => s.pools.push(p),
            Err(e) => s.unreadable.push(format!("{}: {e}", kv.key)),
        }
    }
    Ok(s)
}

/// The result of `ipam check`.
#[derive(Debug, Clone, Default)]
pub struct CheckReport {
    pub problems: Vec<String>,
    pub blocks: usize,
    pub handles: usize,
    pub affinities: usize,
    pub allocations: usize,
}

/// Consistency check over a snapshot. `live_handles`: handles with a live container, when the caller can tell
/// (then every other allocated handle is reported as allocated but not in use).
pub fn check(s: &Snapshot, live_handles: Option<&BTreeSet<String>>) -> CheckReport {
    let mut r = CheckReport {
        blocks: s.blocks.len(),
        handles: s.handles.len(),
        affinities: s.affinities.len(),
        ..Default::default()
    };
    let p = &mut r.problems;
    for u in &s.unreadable {
        p.push(format!("unreadable: {u}"));
    }
    // Blocks: structure, and overlaps (an address in two blocks has two owners).
    let cidrs: Vec<&IpNetwork> = s.blocks.keys().collect();
    for (i, a) in cidrs.iter().enumerate() {
        for b in &cidrs[i + 1..] {
            if a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network())) {
                p.push(format!(
                    "blocks {a} and {b} overlap: their addresses have two owners"
                ));
            }
        }
    }
    let mut counted: BTreeMap<&str, BTreeMap<IpNetwork, u64>> = BTreeMap::new();
    for (cidr, b) in &s.blocks {
        if b.cidr != *cidr {
            p.push(format!("block key {cidr} holds a block for {}", b.cidr));
        }
        p.extend(b.problems());
        for (ip, a) in b.allocated() {
            r.allocations += 1;
            let Some(h) = a.handle_id.as_deref() else {
                continue;
            };
            *counted.entry(h).or_default().entry(*cidr).or_insert(0) += 1;
            if !s.handles.contains_key(h) {
                p.push(format!(
                    "{ip} in block {cidr} belongs to handle {h:?}, which does not exist"
                ));
            }
            if let Some(live) = live_handles {
                if !live.contains(h) {
                    p.push(format!(
                        "{ip} is allocated to handle {h:?} but no live container uses it"
                    ));
                }
            }
        }
        if let Some(host) = b.host() {
            if !s.affinities.contains_key(&(host.to_string(), *cidr)) {
                p.push(format!(
                    "block {cidr} is affine to {host:?} but that node has no affinity for it"
                ));
            }
        }
    }
    // Handles: every count matches the blocks, every block exists.
    for (id, h) in &s.handles {
        if h.is_empty() {
            p.push(format!("handle {id:?} holds no address"));
        }
        for (k, n) in &h.block {
            let Ok(cidr) = k.parse::<IpNetwork>() else {
                p.push(format!(
                    "handle {id:?} names a block {k:?} that is not a CIDR"
                ));
                continue;
            };
            if !s.blocks.contains_key(&cidr) {
                p.push(format!(
                    "handle {id:?} points at block {cidr}, which does not exist"
                ));
                continue;
            }
            let actual = counted
                .get(id.as_str())
                .and_then(|m| m.get(&cidr))
                .copied()
                .unwrap_or(0);
            if actual != *n {
                p.push(format!(
                    "handle {id:?} counts {n} addresses in block {cidr}, the block holds {actual}"
                ));
            }
        }
        if let Some(m) = counted.get(id.as_str()) {
            for cidr in m.keys() {
                if !h.block.contains_key(&cidr.to_string()) {
                    p.push(format!("block {cidr} holds addresses of handle {id:?}, which does not list the block"));
                }
            }
        }
    }
    // Affinities: each names a block affine to that node; one owner per block.
    let mut owners: BTreeMap<IpNetwork, Vec<&str>> = BTreeMap::new();
    for ((node, cidr), a) in &s.affinities {
        owners.entry(*cidr).or_default().push(node);
        match s.blocks.get(cidr) {
            None => p.push(format!(
                "node {node:?} has a {} affinity for block {cidr}, which does not exist",
                a.state
            )),
            Some(b) if b.host() != Some(node.as_str()) => p.push(format!(
                "node {node:?} has an affinity for block {cidr}, but the block is affine to {}",
                b.affinity.as_deref().unwrap_or("no node")
            )),
            Some(_) => {}
        }
    }
    for (cidr, nodes) in owners {
        if nodes.len() > 1 {
            p.push(format!("block {cidr} has several owners: {nodes:?}"));
        }
    }
    r
}

/// Usage of one block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockUsage {
    pub cidr: IpNetwork,
    pub host: Option<String>,
    pub total: u128,
    pub in_use: u128,
}

/// Usage of one pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolUsage {
    pub name: String,
    pub cidr: IpNetwork,
    pub total: u128,
    pub in_use: u128,
    pub blocks: Vec<BlockUsage>,
}

/// A borrowed address (`ipam show --show-borrowed`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Borrowed {
    pub ip: IpAddr,
    pub borrowing_node: String,
    pub block: IpNetwork,
    pub block_owner: String,
    pub kind: String,
    pub allocated_to: String,
}

/// Pool and block usage.
pub fn usage(s: &Snapshot) -> (Vec<PoolUsage>, Vec<Borrowed>) {
    let mut pools: Vec<PoolUsage> = s
        .pools
        .iter()
        .map(|p| PoolUsage {
            name: p.name().to_string(),
            cidr: p.spec.cidr,
            total: super::block::prefix_size(&p.spec.cidr),
            in_use: 0,
            blocks: Vec::new(),
        })
        .collect();
    pools.sort_by_key(|p| p.cidr);
    let mut borrowed = Vec::new();
    for (cidr, b) in &s.blocks {
        let in_use = b.in_use() as u128;
        if let Some(p) = pools
            .iter_mut()
            .find(|p| p.cidr.is_ipv4() == cidr.is_ipv4() && p.cidr.contains(cidr.network()))
        {
            p.in_use += in_use;
            p.blocks.push(BlockUsage {
                cidr: *cidr,
                host: b.host().map(str::to_string),
                total: b.size() as u128,
                in_use,
            });
        }
        for (ip, a) in b.allocated() {
            let sec = a.secondary.clone().unwrap_or_default();
            let node = sec.get(ATTR_NODE).cloned().unwrap_or_default();
            if b.host() == Some(node.as_str()) {
                continue;
            }
            let kind = sec
                .get(ATTR_TYPE)
                .cloned()
                .unwrap_or_else(|| "pod".to_string());
            let to = match (sec.get(ATTR_NAMESPACE), sec.get(ATTR_POD)) {
                (Some(ns), Some(pod)) => format!("{ns}/{pod}"),
                _ => a.handle_id.clone().unwrap_or_default(),
            };
            borrowed.push(Borrowed {
                ip,
                borrowing_node: node,
                block: *cidr,
                block_owner: b.host().unwrap_or("").to_string(),
                kind,
                allocated_to: to,
            });
        }
    }
    (pools, borrowed)
}
