//! A node's in-memory picture of the IPAM state (every block, the pools, the IPAM configuration), kept current by
//! watch events and by the answers of its own transactions, and the pure planning on top of it: which block an
//! address should come from. No I/O: the node task owns one `View` and does the round trips.
//!
//! Every entry carries the etcd `mod_revision` it was read at, so an older event never overwrites a newer answer
//! and a write can be guarded by exactly the revision the plan was made from.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;

use std::time::Duration;

use super::block::{Block, Cooldown};
use super::candidates::{block_containing, candidates, fnv1a32};
use super::{parse, IpamError};
use crate::config::ipam_config::{
    IpamConfigSpec, StoredIpamConfig, DEFAULT_EMPTY_BLOCK_GRACE, DEFAULT_RELEASE_COOLDOWN,
};
use crate::config::ippool::{AllowedUse, IpPool, PLURAL};
use crate::datastore::{keys, KeyValue, WatchEvent, WatchEventKind};

/// A node as IPAM needs it: its name and labels (for pools' nodeSelector).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

impl NodeInfo {
    pub fn new(name: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            labels: BTreeMap::new(),
        }
    }
}

/// A value and the revision it was last written at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached<T> {
    pub value: T,
    pub mod_revision: i64,
}

/// Address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(net: &IpNetwork) -> Family {
        if net.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
    pub fn of_ip(ip: &IpAddr) -> Family {
        if ip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The node's own settings for what IPAMConfiguration may leave unset (its flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpamOptions {
    /// How long an affine block stays empty before the node releases it.
    pub empty_block_grace: Duration,
    /// How long a released address rests before it is handed out again.
    pub release_cooldown: Duration,
}

impl Default for IpamOptions {
    fn default() -> Self {
        IpamOptions {
            empty_block_grace: DEFAULT_EMPTY_BLOCK_GRACE,
            release_cooldown: DEFAULT_RELEASE_COOLDOWN,
        }
    }
}

/// Where the next address of a family should come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// A block affine to this node with a free address that is not cooling down.
    Affine(IpNetwork),
    /// A block that does not exist yet: claim it (create block + affinity in the same transaction).
    Claim(IpNetwork),
    /// The pool has no unclaimed block left: take over this empty block of another node (`from`), by CAS on
    /// the block (still empty, at the revision seen) and on both affinities (theirs confirmed at the revision
    /// read, ours absent), all in the assign's transaction.
    /// `from` is None for a block no node holds (left by a removed node, kept while its addresses cool down).
    Reclaim {
        block: IpNetwork,
        from: Option<String>,
    },
    /// Another node's block (strictAffinity is false and nothing can be claimed): the address is borrowed and
    /// must be advertised as a host route.
    Borrow(IpNetwork),
    /// Nothing else is left: an address still cooling down, from this block (affine or borrowed).
    Cooling(IpNetwork),
}

impl Choice {
    /// The block the address comes from.
    pub fn block(&self) -> IpNetwork {
        match self {
            Choice::Affine(c) | Choice::Claim(c) | Choice::Borrow(c) | Choice::Cooling(c) => *c,
            Choice::Reclaim { block, .. } => *block,
        }
    }
}

/// The node's picture.
#[derive(Debug, Clone, Default)]
pub struct View {
    pub node: NodeInfo,
    pub blocks: BTreeMap<IpNetwork, Cached<Block>>,
    /// Blocks known to be absent as of a revision: older puts are stale.
    absent: BTreeMap<IpNetwork, i64>,
    pub pools: BTreeMap<String, Cached<IpPool>>,
    pub config: IpamConfigSpec,
    config_revision: i64,
    /// What applies where `config` leaves a setting unset.
    pub options: IpamOptions,
}

impl View {
    pub fn new(node: NodeInfo) -> View {
        View {
            node,
            ..Default::default()
        }
    }

    fn me(&self) -> &str {
        &self.node.name
    }

    /// The cooldown in force (IPAMConfiguration, else the node's flag).
    pub fn release_cooldown(&self) -> Duration {
        self.config
            .released_address_cooldown
            .map(|d| d.0)
            .unwrap_or(self.options.release_cooldown)
    }

    /// The empty-block grace period in force (IPAMConfiguration, else the node's flag).
    pub fn empty_block_grace(&self) -> Duration {
        self.config
            .empty_block_grace_period
            .map(|d| d.0)
            .unwrap_or(self.options.empty_block_grace)
    }

    /// The cooldown rule at `now_ms`.
    pub fn cooldown_at(&self, now_ms: u64) -> Cooldown {
        Cooldown {
            now_ms,
            cooldown_ms: self.release_cooldown().as_millis() as u64,
        }
    }

    /// A key read back by a transaction whose compare failed, at `revision` (the store revision of that
    /// read): a block goes into the cache. False when `key` is not a block's.
    pub fn apply_read(
        &mut self,
        key: &str,
        kv: Option<&KeyValue>,
        revision: i64,
    ) -> Result<bool, IpamError> {
        let Some(cidr) = keys::parse_block_key(key) else {
            return Ok(false);
        };
        match kv {
            Some(kv) => {
                let b: Block = parse(key, &kv.value)?;
                self.apply_block(cidr, Some(b), kv.mod_revision);
            }
            None => self.apply_block(cidr, None, revision),
        }
        Ok(true)
    }

    /// Record a block's state at `revision` (None = absent), unless we already know a newer one.
    pub fn apply_block(&mut self, cidr: IpNetwork, block: Option<Block>, revision: i64) {
        if let Some(c) = self.blocks.get(&cidr) {
            if c.mod_revision >= revision {
                return;
            }
        }
        if let Some(&r) = self.absent.get(&cidr) {
            if r >= revision {
                return;
            }
        }
        match block {
            Some(b) => {
                self.absent.remove(&cidr);
                self.blocks.insert(
                    cidr,
                    Cached {
                        value: b,
                        mod_revision: revision,
                    },
                );
            }
            None => {
                self.blocks.remove(&cidr);
                self.absent.insert(cidr, revision);
            }
        }
    }

    /// Apply one watch event (blocks, pools, IPAM configuration; other keys are ignored).
    pub fn apply_event(&mut self, ev: &WatchEvent) {
        if let Some(cidr) = keys::parse_block_key(&ev.key) {
            // Our own writes come back through the watch: skip the parse when we already hold this revision.
            if self
                .blocks
                .get(&cidr)
                .is_some_and(|c| c.mod_revision >= ev.mod_revision)
            {
                return;
            }
            let block = match ev.kind {
                WatchEventKind::Put => match serde_json::from_slice::<Block>(&ev.value) {
                    Ok(b) => Some(b),
                    Err(e) => {
                        tracing::warn!(key = %ev.key, error = %e, "ignoring a block that does not parse");
                        return;
                    }
                },
                WatchEventKind::Delete => None,
            };
            self.apply_block(cidr, block, ev.mod_revision);
        } else if let Some(name) = ev.key.strip_prefix(&keys::resource_prefix(PLURAL)) {
            self.apply_pool(name, ev.kind, &ev.value, ev.mod_revision);
        } else if ev.key == keys::IPAM_CONFIG_KEY {
            self.apply_config(ev.kind, &ev.value, ev.mod_revision);
        }
    }

    pub fn apply_pool(&mut self, name: &str, kind: WatchEventKind, value: &[u8], rev: i64) {
        if let Some(c) = self.pools.get(name) {
            if c.mod_revision >= rev {
                return;
            }
        }
        match kind {
            WatchEventKind::Delete => {
                self.pools.remove(name);
            }
            WatchEventKind::Put => match crate::config::tolerant::tolerant_slice::<IpPool>(
                crate::config::ippool::KIND,
                value,
            ) {
                Ok(p) => {
                    self.pools.insert(
                        name.to_string(),
                        Cached {
                            value: p,
                            mod_revision: rev,
                        },
                    );
                }
                Err(e) => {
                    tracing::warn!(pool = name, error = %e, "ignoring a pool that does not parse")
                }
            },
        }
    }

    pub fn apply_config(&mut self, kind: WatchEventKind, value: &[u8], rev: i64) {
        if rev < self.config_revision {
            return;
        }
        self.config_revision = rev;
        self.config = match kind {
            WatchEventKind::Delete => IpamConfigSpec::default(),
            WatchEventKind::Put => {
                match crate::config::tolerant::tolerant_slice::<StoredIpamConfig>(
                    crate::config::ipam_config::KIND,
                    value,
                ) {
                    Ok(c) => c.into(),
                    Err(e) => {
                        tracing::warn!(error = %e, "ignoring an IPAM configuration that does not parse");
                        return;
                    }
                }
            }
        };
    }

    /// The pool a block belongs to.
    pub fn pool_of(&self, block: &IpNetwork) -> Option<&IpPool> {
        self.pools.values().map(|c| &c.value).find(|p| {
            p.spec.cidr.is_ipv4() == block.is_ipv4() && p.spec.cidr.contains(block.network())
        })
    }

    /// Pools this node may take workload addresses of `family` from, in name order; restricted to `only` when
    /// the request names pools.
    pub fn usable_pools(&self, family: Family, only: Option<&[String]>) -> Vec<&IpPool> {
        self.pools
            .values()
            .map(|c| &c.value)
            .filter(|p| Family::of(&p.spec.cidr) == family)
            .filter(|p| !p.spec.disabled && p.allows(AllowedUse::Workload))
            .filter(|p| only.is_none_or(|o| o.iter().any(|n| n == p.name())))
            // A pool named explicitly is used even if its nodeSelector does not match (as Calico does).
            .filter(|p| only.is_some() || p.selects_node(&self.node.labels))
            .collect()
    }

    /// Blocks affine to this node.
    pub fn my_blocks(&self) -> impl Iterator<Item = &Cached<Block>> + '_ {
        self.blocks
            .values()
            .filter(move |c| c.value.host() == Some(self.me()))
    }

    /// Decide where the next address of `family` comes from. `skip`: blocks this request found taken.
    ///
    /// Order: an affine block with an address that is not cooling down; a new block; an empty block of
    /// another node (only when the pools have no unclaimed block left); a borrowed address (strictAffinity
    /// false); and only when all of those fail, an address still cooling down (affine first).
    pub fn plan(
        &self,
        family: Family,
        only: Option<&[String]>,
        skip: &BTreeSet<IpNetwork>,
        cd: &Cooldown,
    ) -> Result<Choice, String> {
        let pools = self.usable_pools(family, only);
        if pools.is_empty() {
            return Err(format!(
                "no enabled {family} pool selects node {:?}{}",
                self.me(),
                only.map(|o| format!(" among {o:?}")).unwrap_or_default()
            ));
        }
        let in_pools = |b: &IpNetwork| pools.iter().any(|p| p.spec.cidr.contains(b.network()));
        let usable = |c: &&Cached<Block>| {
            Family::of(&c.value.cidr) == family
                && !skip.contains(&c.value.cidr)
                && in_pools(&c.value.cidr)
        };
        // 1. An affine block with room.
        if let Some(c) = self
            .my_blocks()
            .filter(usable)
            .find(|c| c.value.free_cool_count(cd) > 0)
        {
            return Ok(Choice::Affine(c.value.cidr));
        }
        // 2. Claim a new block.
        let mine = self.my_blocks().count();
        let max = self.config.max_blocks_per_host as usize;
        let may_claim = self.config.auto_allocate_blocks && (max == 0 || mine < max);
        if may_claim {
            for p in &pools {
                let existing = self
                    .blocks
                    .keys()
                    .filter(|b| p.spec.cidr.contains(b.network()))
                    .count();
                // Among existing + skipped + 1 distinct candidates at least one is free, if any is.
                let budget = existing + skip.len() + 1;
                for cand in candidates(&p.spec.cidr, p.block_size(), self.me()).take(budget) {
                    if !self.blocks.contains_key(&cand) && !skip.contains(&cand) {
                        return Ok(Choice::Claim(cand));
                    }
                }
            }
            // 3. Every block is claimed: take over another node's empty one. Prefer owners holding several
            // blocks (they keep one), then the block with the most addresses ready.
            let mut empty: Vec<(usize, usize, &Cached<Block>)> = self
                .blocks
                .values()
                .filter(usable)
                .filter(|c| {
                    c.value.host() != Some(self.me())
                        && c.value.is_empty()
                        && c.value.free_cool_count(cd) > 0
                        && (c.value.affinity.is_none() || c.value.host().is_some())
                })
                .map(|c| {
                    // A block nobody holds counts as held by many: take it first.
                    let held = match c.value.host() {
                        None => usize::MAX,
                        Some(owner) => self
                            .blocks
                            .values()
                            .filter(|o| o.value.host() == Some(owner))
                            .count(),
                    };
                    (held, c.value.free_cool_count(cd), c)
                })
                .collect();
            empty.sort_by_key(|e| std::cmp::Reverse((e.0, e.1)));
            if let Some((_, _, c)) = empty.first() {
                return Ok(Choice::Reclaim {
                    block: c.value.cidr,
                    from: c.value.host().map(str::to_string),
                });
            }
        }
        // 4. Borrow.
        let others = |cooling: bool| -> Vec<IpNetwork> {
            self.blocks
                .values()
                .filter(usable)
                .filter(|c| c.value.host() != Some(self.me()))
                .filter(|c| {
                    if cooling {
                        c.value.free_count() > 0
                    } else {
                        c.value.free_cool_count(cd) > 0
                    }
                })
                .map(|c| c.value.cidr)
                .collect()
        };
        // Spread borrowers over the candidates so they do not all race for the same block.
        let spread = |v: &[IpNetwork]| v[fnv1a32(self.me()) as usize % v.len()];
        if !self.config.strict_affinity {
            let o = others(false);
            if !o.is_empty() {
                return Ok(Choice::Borrow(spread(&o)));
            }
        }
        // 5. Only cooling addresses are left: the pool would otherwise be exhausted.
        if let Some(c) = self
            .my_blocks()
            .filter(usable)
            .find(|c| c.value.free_count() > 0)
        {
            return Ok(Choice::Cooling(c.value.cidr));
        }
        if !self.config.strict_affinity {
            let o = others(true);
            if !o.is_empty() {
                return Ok(Choice::Cooling(spread(&o)));
            }
        }
        let why = if !self.config.auto_allocate_blocks {
            "autoAllocateBlocks is false".to_string()
        } else if !may_claim {
            format!("node holds {mine} blocks, maxBlocksPerHost is {max}")
        } else {
            "every block of the pools is claimed and none is empty".to_string()
        };
        Err(format!(
            "no free {family} address for node {:?}: {why}{}",
            self.me(),
            if self.config.strict_affinity {
                " and strictAffinity forbids borrowing"
            } else {
                " and no block has a free address to borrow"
            }
        ))
    }

    /// Where a specific address comes from: its existing block, or a claim of the block containing it.
    pub fn plan_ip(&self, ip: IpAddr) -> Result<Choice, String> {
        if let Some(c) = self.blocks.values().find(|c| c.value.cidr.contains(ip)) {
            return Ok(if c.value.host() == Some(self.me()) {
                Choice::Affine(c.value.cidr)
            } else {
                Choice::Borrow(c.value.cidr)
            });
        }
        let pool = self
            .pools
            .values()
            .map(|c| &c.value)
            .find(|p| p.spec.cidr.contains(ip))
            .ok_or_else(|| format!("{ip} is not inside any IP pool"))?;
        if pool.spec.disabled {
            return Err(format!(
                "{ip} is in pool {:?}, which is disabled",
                pool.name()
            ));
        }
        block_containing(ip, pool.block_size())
            .map(Choice::Claim)
            .ok_or_else(|| format!("{ip}: bad block size {}", pool.block_size()))
    }

    /// Addresses allocated to this node in blocks affine to other nodes: BGP must advertise them as /32 (/128).
    pub fn borrowed(&self) -> Vec<(IpAddr, IpNetwork)> {
        let mut out = Vec::new();
        for c in self.blocks.values() {
            if c.value.host() == Some(self.me()) {
                continue;
            }
            for (ip, a) in c.value.allocated() {
                let node = a
                    .secondary
                    .as_ref()
                    .and_then(|s| s.get(super::block::ATTR_NODE));
                if node.map(String::as_str) == Some(self.me()) {
                    out.push((ip, c.value.cidr));
                }
            }
        }
        out
    }
}

impl View {
    /// Where every address goes, as Felix derives routes from blocks (for routing without BGP): each block
    /// with an affinity -> its host, and each borrowed address (its `node` attribute names another node
    /// than the block's host) as a /32 (/128) -> that node.
    pub fn routes_by_affinity(&self) -> BTreeMap<IpNetwork, String> {
        let mut out = BTreeMap::new();
        for c in self.blocks.values() {
            let host = c.value.host();
            if let Some(h) = host {
                out.insert(c.value.cidr, h.to_string());
            }
            for (ip, a) in c.value.allocated() {
                let node = a
                    .secondary
                    .as_ref()
                    .and_then(|s| s.get(super::block::ATTR_NODE));
                if let Some(n) = node.filter(|n| Some(n.as_str()) != host) {
                    let len = if ip.is_ipv4() { 32 } else { 128 };
                    if let Ok(net) = IpNetwork::new(ip, len) {
                        out.insert(net, n.clone());
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_by_affinity_has_blocks_and_borrowed_addresses() {
        let mut v = view("a");
        let b: IpNetwork = "10.0.0.0/26".parse().unwrap();
        let mut block = Block::for_node(b, "a", 0);
        let own: BTreeMap<String, String> = [("node".to_string(), "a".to_string())].into();
        let lent: BTreeMap<String, String> = [("node".to_string(), "b".to_string())].into();
        block.assign(1, "h1", &own);
        let borrowed = block.assign(1, "h2", &lent);
        v.apply_block(b, Some(block), 3);
        let r = v.routes_by_affinity();
        assert_eq!(r.get(&b).map(String::as_str), Some("a"));
        let ip = borrowed[0];
        let host: IpNetwork = IpNetwork::new(ip, 32).unwrap();
        assert_eq!(r.get(&host).map(String::as_str), Some("b"));
        assert_eq!(r.len(), 2, "{r:?}");
    }

    fn view(node: &str) -> View {
        let mut v = View::new(NodeInfo::new(node));
        let p = IpPool::new("p", "10.0.0.0/24".parse().unwrap());
        v.pools.insert(
            "p".into(),
            Cached {
                value: p,
                mod_revision: 1,
            },
        );
        v
    }

    #[test]
    fn plan_prefers_affine_then_claim_then_reclaim_then_borrow_then_cooling() {
        let mut v = view("a");
        let skip = BTreeSet::new();
        let none = Cooldown::NONE;
        let Ok(Choice::Claim(first)) = v.plan(Family::V4, None, &skip, &none) else {
            panic!("expected a claim")
        };
        v.apply_block(first, Some(Block::for_node(first, "a", 0)), 5);
        assert_eq!(
            v.plan(Family::V4, None, &skip, &none),
            Ok(Choice::Affine(first))
        );
        // Fill the pool with other nodes' blocks, empty: the pool has no unclaimed block left.
        let others: Vec<IpNetwork> = candidates(&"10.0.0.0/24".parse().unwrap(), 26, "a")
            .filter(|c| *c != first)
            .collect();
        for (i, c) in others.iter().enumerate() {
            v.apply_block(*c, Some(Block::for_node(*c, &format!("o{i}"), 0)), 6);
        }
        let mut full = v.blocks[&first].value.clone();
        full.assign(64, "h", &BTreeMap::new());
        v.apply_block(first, Some(full), 7);
        match v.plan(Family::V4, None, &skip, &none) {
            Ok(Choice::Reclaim { block, from }) => {
                assert!(others.contains(&block));
                assert_eq!(from.as_deref(), v.blocks[&block].value.host());
            }
            other => panic!("expected a reclaim, got {other:?}"),
        }
        // maxBlocksPerHost stops a reclaim as it stops a claim.
        v.config.max_blocks_per_host = 1;
        assert!(matches!(
            v.plan(Family::V4, None, &skip, &none),
            Ok(Choice::Borrow(_))
        ));
        v.config.max_blocks_per_host = 0;
        // Once every other block holds an address, borrow.
        for c in &others {
            let mut b = v.blocks[c].value.clone();
            b.assign(1, "x", &BTreeMap::new());
            v.apply_block(*c, Some(b), 8);
        }
        assert!(matches!(
            v.plan(Family::V4, None, &skip, &none),
            Ok(Choice::Borrow(_))
        ));
        v.config.strict_affinity = true;
        let e = v.plan(Family::V4, None, &skip, &none).unwrap_err();
        assert!(e.contains("strictAffinity"), "{e}");
        // Free one address of our own block: usable at once without a cooldown; inside one, only as the last
        // resort (strictAffinity: no borrowing), and never while a borrowable address rests.
        let mut b = v.blocks[&first].value.clone();
        let ip = b.ip(3);
        b.release_at(&[ip], 10_000);
        v.apply_block(first, Some(b), 9);
        let cooling = Cooldown {
            now_ms: 10_500,
            cooldown_ms: 1000,
        };
        assert_eq!(
            v.plan(Family::V4, None, &skip, &none),
            Ok(Choice::Affine(first))
        );
        assert_eq!(
            v.plan(Family::V4, None, &skip, &cooling),
            Ok(Choice::Cooling(first))
        );
        v.config.strict_affinity = false;
        assert!(matches!(
            v.plan(Family::V4, None, &skip, &cooling),
            Ok(Choice::Borrow(_))
        ));
        assert!(v
            .plan(Family::V6, None, &skip, &none)
            .unwrap_err()
            .contains("no enabled IPv6 pool"));
    }

    #[test]
    fn stale_events_never_overwrite_newer_state() {
        let mut v = view("a");
        let c: IpNetwork = "10.0.0.0/26".parse().unwrap();
        v.apply_block(c, Some(Block::for_node(c, "a", 0)), 10);
        v.apply_block(c, Some(Block::for_node(c, "b", 0)), 9);
        assert_eq!(v.blocks[&c].value.host(), Some("a"));
        v.apply_block(c, None, 12);
        v.apply_block(c, Some(Block::for_node(c, "b", 0)), 11);
        assert!(!v.blocks.contains_key(&c));
        v.config.max_blocks_per_host = 1;
        v.apply_block(c, Some(Block::for_node(c, "a", 0)), 13);
        let mut full = v.blocks[&c].value.clone();
        full.assign(64, "h", &BTreeMap::new());
        v.apply_block(c, Some(full), 14);
        v.config.strict_affinity = true;
        assert!(v
            .plan(Family::V4, None, &BTreeSet::new(), &Cooldown::NONE)
            .unwrap_err()
            .contains("maxBlocksPerHost is 1"));
    }
}
