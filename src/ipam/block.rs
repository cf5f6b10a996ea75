//! An allocation block exactly as Calico stores it (`model.AllocationBlock`), and the pure operations on it:
//! assign (FIFO), assign a specific address, release, structural checks. No I/O.
//!
//! Layout (Calico's IPAM block JSON): `allocations[ordinal]` is an index into `attributes` or null when free;
//! `unallocated` is a FIFO of free ordinals (released ones go to the tail so the address idle longest is reused
//! first); `sequenceNumber` is bumped on every write and `sequenceNumberForAllocation[ordinal]` records it at
//! allocation time. Fields we do not know are kept verbatim (`extra`) so a read-modify-write never drops what a
//! newer Calico wrote.
//!
//! Cooldown (margay's addition, calicoctl ignores it): `margayReleasedAt[ordinal]` is the wall-clock time (unix
//! milliseconds) the address was last released. Stored in the block, it survives a daemon restart and every
//! node sees it. An address released less than the cooldown ago is handed out only when nothing else is left
//! ([`Block::assign_avoiding`]), so a new pod does not receive traffic meant for the old one (conntrack entries,
//! stale endpoints). Calico has no such field; when Calico rewrites a block it drops it (the cooldown of that
//! block's addresses is then lost, nothing else).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize};

/// The attribute keys Calico sets on an allocation (`model.IPAMBlockAttribute*`).
pub const ATTR_NODE: &str = "node";
pub const ATTR_POD: &str = "pod";
pub const ATTR_NAMESPACE: &str = "namespace";
pub const ATTR_TIMESTAMP: &str = "timestamp";
pub const ATTR_TYPE: &str = "type";

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Metadata of one or more allocations (`model.AllocationAttribute`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AllocationAttribute {
    /// The handle that owns the allocations pointing here (Go: `*string`, written as null when unset).
    #[serde(rename = "handle_id", default)]
    pub handle_id: Option<String>,
    /// namespace, pod, node, timestamp, type.
    #[serde(default)]
    pub secondary: Option<BTreeMap<String, String>>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A block of addresses claimed by (usually) one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Block {
    pub cidr: IpNetwork,
    /// `host:<node>` (or `virtual:<name>`); null when not affine.
    #[serde(default)]
    pub affinity: Option<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub allocations: Vec<Option<usize>>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub unallocated: Vec<usize>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub attributes: Vec<AllocationAttribute>,
    #[serde(rename = "sequenceNumber", default)]
    pub sequence_number: u64,
    #[serde(
        rename = "sequenceNumberForAllocation",
        default,
        deserialize_with = "null_as_default"
    )]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    #[serde(default)]
    pub deleted: bool,
    /// ordinal -> unix milliseconds of its last release (margay's cooldown; absent when empty, so a block
    /// that never released an address is byte-for-byte what Calico writes).
    #[serde(
        rename = "margayReleasedAt",
        default,
        deserialize_with = "null_as_default",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub released_at: BTreeMap<String, u64>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// The cooldown rule at one moment: an address released at `t` is cooling while `now_ms < t + cooldown_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Cooldown {
    pub now_ms: u64,
    pub cooldown_ms: u64,
}

impl Cooldown {
    /// No cooldown at all (every free address may be handed out).
    pub const NONE: Cooldown = Cooldown {
        now_ms: 0,
        cooldown_ms: 0,
    };

    pub fn is_cooling(&self, released_at: u64) -> bool {
        self.cooldown_ms > 0 && self.now_ms < released_at.saturating_add(self.cooldown_ms)
    }
}

/// Wall-clock unix milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Why a block operation was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("{ip} is not inside block {block}")]
    OutsideBlock { ip: IpAddr, block: IpNetwork },
    #[error("{ip} is already allocated (handle {handle:?})")]
    InUse { ip: IpAddr, handle: Option<String> },
    #[error("block {block} has no free address")]
    Full { block: IpNetwork },
}

/// Number of addresses in a prefix (u128 so /0 style pools cannot overflow).
pub fn prefix_size(cidr: &IpNetwork) -> u128 {
    let bits: u32 = if cidr.is_ipv4() { 32 } else { 128 };
    let host = bits - u32::from(cidr.prefix());
    if host >= 128 {
        u128::MAX
    } else {
        1u128 << host
    }
}

fn ip_to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v) => u128::from(u32::from(v)),
        IpAddr::V6(v) => u128::from(v),
    }
}

/// The address `offset` places after the network address of `cidr`.
pub fn nth_ip(cidr: &IpNetwork, offset: u128) -> IpAddr {
    let base = ip_to_u128(cidr.network());
    match cidr {
        IpNetwork::V4(_) => IpAddr::V4(((base + offset) as u32).into()),
        IpNetwork::V6(_) => IpAddr::V6((base + offset).into()),
    }
}

impl Block {
    /// A fresh block: every ordinal free, FIFO in address order, sequence number seeded by the caller
    /// (Calico uses the creation time in nanoseconds).
    pub fn new(cidr: IpNetwork, affinity: Option<String>, sequence_number: u64) -> Block {
        let n = prefix_size(&cidr) as usize;
        Block {
            cidr,
            affinity,
            allocations: vec![None; n],
            unallocated: (0..n).collect(),
            attributes: Vec::new(),
            sequence_number,
            sequence_number_for_allocation: BTreeMap::new(),
            deleted: false,
            released_at: BTreeMap::new(),
            extra: BTreeMap::new(),
        }
    }

    /// A block affine to `node`.
    pub fn for_node(cidr: IpNetwork, node: &str, sequence_number: u64) -> Block {
        Block::new(cidr, Some(format!("host:{node}")), sequence_number)
    }

    /// Number of addresses (ordinals).
    pub fn size(&self) -> usize {
        prefix_size(&self.cidr) as usize
    }

    /// The node this block is affine to, if any.
    pub fn host(&self) -> Option<&str> {
        self.affinity.as_deref()?.strip_prefix("host:")
    }

    pub fn free_count(&self) -> usize {
        self.unallocated.len()
    }

    pub fn in_use(&self) -> usize {
        self.allocations.iter().filter(|a| a.is_some()).count()
    }

    pub fn is_empty(&self) -> bool {
        self.allocations.iter().all(Option::is_none)
    }

    pub fn ordinal(&self, ip: IpAddr) -> Result<usize, BlockError> {
        if !self.cidr.contains(ip) {
            return Err(BlockError::OutsideBlock {
                ip,
                block: self.cidr,
            });
        }
        Ok((ip_to_u128(ip) - ip_to_u128(self.cidr.network())) as usize)
    }

    pub fn ip(&self, ordinal: usize) -> IpAddr {
        nth_ip(&self.cidr, ordinal as u128)
    }

    /// The attribute of an allocated ordinal.
    pub fn attribute_of(&self, ordinal: usize) -> Option<&AllocationAttribute> {
        let idx = (*self.allocations.get(ordinal)?)?;
        self.attributes.get(idx)
    }

    /// The handle owning an address, if allocated.
    pub fn handle_of(&self, ip: IpAddr) -> Option<&str> {
        let ord = self.ordinal(ip).ok()?;
        self.attribute_of(ord)?.handle_id.as_deref()
    }

    /// Every allocated address with its attribute.
    pub fn allocated(&self) -> impl Iterator<Item = (IpAddr, &AllocationAttribute)> + '_ {
        self.allocations.iter().enumerate().filter_map(|(ord, a)| {
            let attr = self.attributes.get((*a)?)?;
            Some((self.ip(ord), attr))
        })
    }

    /// Addresses owned by `handle`.
    pub fn ips_of_handle(&self, handle: &str) -> Vec<IpAddr> {
        self.allocated()
            .filter(|(_, a)| a.handle_id.as_deref() == Some(handle))
            .map(|(ip, _)| ip)
            .collect()
    }

    fn attribute_index(&mut self, handle: &str, secondary: &BTreeMap<String, String>) -> usize {
        let found = self.attributes.iter().position(|a| {
            a.handle_id.as_deref() == Some(handle) && a.secondary.as_ref() == Some(secondary)
        });
        match found {
            Some(i) => i,
            None => {
                self.attributes.push(AllocationAttribute {
                    handle_id: Some(handle.to_string()),
                    secondary: Some(secondary.clone()),
                    extra: BTreeMap::new(),
                });
                self.attributes.len() - 1
            }
        }
    }

    fn bump(&mut self) {
        self.sequence_number = self.sequence_number.wrapping_add(1);
    }

    /// Take up to `count` addresses from the head of the FIFO for `handle`. Returns the addresses given
    /// (fewer than asked when the block runs out).
    pub fn assign(
        &mut self,
        count: usize,
        handle: &str,
        secondary: &BTreeMap<String, String>,
    ) -> Vec<IpAddr> {
        let n = count.min(self.unallocated.len());
        if n == 0 {
            return Vec::new();
        }
        self.bump();
        let idx = self.attribute_index(handle, secondary);
        let ords: Vec<usize> = self.unallocated.drain(..n).collect();
        self.take_ordinals(ords, idx)
    }

    fn take_ordinals(&mut self, ords: Vec<usize>, idx: usize) -> Vec<IpAddr> {
        let mut out = Vec::with_capacity(ords.len());
        for ord in ords {
            self.allocations[ord] = Some(idx);
            self.sequence_number_for_allocation
                .insert(ord.to_string(), self.sequence_number);
            self.released_at.remove(&ord.to_string());
            out.push(self.ip(ord));
        }
        out
    }

    /// Is this free ordinal cooling down?
    fn cooling(&self, ord: usize, cd: &Cooldown) -> bool {
        self.released_at
            .get(&ord.to_string())
            .is_some_and(|&t| cd.is_cooling(t))
    }

    /// Free addresses that are not cooling down.
    pub fn free_cool_count(&self, cd: &Cooldown) -> usize {
        if self.released_at.is_empty() {
            return self.unallocated.len();
        }
        self.unallocated
            .iter()
            .filter(|&&o| !self.cooling(o, cd))
            .count()
    }

    /// Free addresses still cooling down.
    pub fn cooling_count(&self, cd: &Cooldown) -> usize {
        self.unallocated.len() - self.free_cool_count(cd)
    }

    /// Unix milliseconds of the latest release recorded in this block, if any.
    pub fn last_release(&self) -> Option<u64> {
        self.released_at.values().copied().max()
    }

    /// Take up to `count` addresses for `handle`, in FIFO order, skipping those released less than the cooldown
    /// ago; with `allow_cooling`, cooling addresses make up the rest (still in FIFO order, so the one released
    /// longest ago comes first). Expired release stamps are dropped on the way (the block stays small).
    pub fn assign_avoiding(
        &mut self,
        count: usize,
        handle: &str,
        secondary: &BTreeMap<String, String>,
        cd: &Cooldown,
        allow_cooling: bool,
    ) -> Vec<IpAddr> {
        let mut picked: Vec<usize> = Vec::with_capacity(count);
        let mut cooling: Vec<usize> = Vec::new();
        for &o in &self.unallocated {
            if picked.len() == count {
                break;
            }
            if self.cooling(o, cd) {
                cooling.push(o);
            } else {
                picked.push(o);
            }
        }
        if allow_cooling {
            let more = count - picked.len();
            picked.extend(cooling.into_iter().take(more));
        }
        if picked.is_empty() {
            return Vec::new();
        }
        self.bump();
        let idx = self.attribute_index(handle, secondary);
        let set: BTreeSet<usize> = picked.iter().copied().collect();
        self.unallocated.retain(|o| !set.contains(o));
        self.released_at.retain(|_, t| cd.is_cooling(*t));
        self.take_ordinals(picked, idx)
    }

    /// Allocate one specific address.
    pub fn assign_ip(
        &mut self,
        ip: IpAddr,
        handle: &str,
        secondary: &BTreeMap<String, String>,
    ) -> Result<(), BlockError> {
        let ord = self.ordinal(ip)?;
        if self.allocations[ord].is_some() {
            return Err(BlockError::InUse {
                ip,
                handle: self.handle_of(ip).map(str::to_string),
            });
        }
        let Some(pos) = self.unallocated.iter().position(|&o| o == ord) else {
            return Err(BlockError::InUse { ip, handle: None });
        };
        self.unallocated.remove(pos);
        self.bump();
        let idx = self.attribute_index(handle, secondary);
        self.take_ordinals(vec![ord], idx);
        Ok(())
    }

    /// Free these addresses (those not allocated are ignored: release is idempotent). Returns, per handle, how
    /// many addresses were freed, so the caller can decrement the handles.
    pub fn release(&mut self, ips: &[IpAddr]) -> BTreeMap<String, u64> {
        self.release_stamped(ips, None)
    }

    /// [`Block::release`], recording the release time of each freed address (the cooldown starts now).
    pub fn release_at(&mut self, ips: &[IpAddr], now_ms: u64) -> BTreeMap<String, u64> {
        self.release_stamped(ips, Some(now_ms))
    }

    fn release_stamped(&mut self, ips: &[IpAddr], now_ms: Option<u64>) -> BTreeMap<String, u64> {
        let mut freed = BTreeMap::new();
        let mut touched = false;
        for &ip in ips {
            let Ok(ord) = self.ordinal(ip) else { continue };
            let Some(idx) = self.allocations[ord] else {
                continue;
            };
            if let Some(h) = self.attributes.get(idx).and_then(|a| a.handle_id.clone()) {
                *freed.entry(h).or_insert(0) += 1;
            }
            self.allocations[ord] = None;
            self.unallocated.push(ord);
            self.sequence_number_for_allocation.remove(&ord.to_string());
            if let Some(t) = now_ms {
                self.released_at.insert(ord.to_string(), t);
            }
            touched = true;
        }
        if touched {
            self.bump();
            self.compact_attributes();
        }
        freed
    }

    /// Free everything `handle` owns here. Returns the addresses freed.
    pub fn release_handle(&mut self, handle: &str) -> Vec<IpAddr> {
        let ips = self.ips_of_handle(handle);
        self.release(&ips);
        ips
    }

    /// [`Block::release_handle`], starting the cooldown of the freed addresses.
    pub fn release_handle_at(&mut self, handle: &str, now_ms: u64) -> Vec<IpAddr> {
        let ips = self.ips_of_handle(handle);
        self.release_at(&ips, now_ms);
        ips
    }

    /// Drop attributes no allocation points at and renumber the rest (as Calico's `deleteAttributes` does).
    fn compact_attributes(&mut self) {
        let used: BTreeSet<usize> = self.allocations.iter().flatten().copied().collect();
        if used.len() == self.attributes.len() {
            return;
        }
        let mut remap = vec![None; self.attributes.len()];
        let mut kept = Vec::with_capacity(used.len());
        for (i, a) in std::mem::take(&mut self.attributes).into_iter().enumerate() {
            if used.contains(&i) {
                remap[i] = Some(kept.len());
                kept.push(a);
            }
        }
        self.attributes = kept;
        for a in self.allocations.iter_mut().flatten() {
            // Every allocated index is in `used`, so the remap entry exists.
            if let Some(Some(n)) = remap.get(*a) {
                *a = *n;
            }
        }
    }

    /// Count of allocations per handle.
    pub fn handle_counts(&self) -> BTreeMap<String, u64> {
        let mut m = BTreeMap::new();
        for (_, a) in self.allocated() {
            if let Some(h) = &a.handle_id {
                *m.entry(h.clone()).or_insert(0) += 1;
            }
        }
        m
    }

    /// Structural problems (empty when sound): lengths, FIFO contents, attribute indexes, free + used = size.
    pub fn problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let n = self.size();
        if self.cidr.network() != self.cidr.ip() {
            p.push(format!("block {}: CIDR has host bits set", self.cidr));
        }
        if self.allocations.len() != n {
            p.push(format!(
                "block {}: {} allocation slots for {} addresses",
                self.cidr,
                self.allocations.len(),
                n
            ));
        }
        let mut seen = BTreeSet::new();
        for &o in &self.unallocated {
            if o >= n {
                p.push(format!(
                    "block {}: free ordinal {o} is outside the block",
                    self.cidr
                ));
            } else if !seen.insert(o) {
                p.push(format!("block {}: ordinal {o} is free twice", self.cidr));
            } else if matches!(self.allocations.get(o), Some(Some(_))) {
                p.push(format!(
                    "block {}: {} is both free and allocated",
                    self.cidr,
                    self.ip(o)
                ));
            }
        }
        let used = self.in_use();
        if used + self.unallocated.len() != n {
            p.push(format!(
                "block {}: {} free + {} used != {} addresses",
                self.cidr,
                self.unallocated.len(),
                used,
                n
            ));
        }
        for (ord, a) in self.allocations.iter().enumerate() {
            if let Some(idx) = a {
                match self.attributes.get(*idx) {
                    None => p.push(format!(
                        "block {}: {} points at missing attribute {idx}",
                        self.cidr,
                        self.ip(ord)
                    )),
                    Some(attr) if attr.handle_id.is_none() => p.push(format!(
                        "block {}: {} has no handle",
                        self.cidr,
                        self.ip(ord)
                    )),
                    Some(_) => {}
                }
            }
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pod: &str) -> BTreeMap<String, String> {
        BTreeMap::from([
            (ATTR_NODE.to_string(), "n1".to_string()),
            (ATTR_POD.to_string(), pod.to_string()),
        ])
    }

    #[test]
    fn fifo_assign_and_reuse_oldest_first() {
        let mut b = Block::for_node("10.0.0.0/30".parse().unwrap(), "n1", 7);
        assert_eq!(b.size(), 4);
        let a = b.assign(1, "h1", &attrs("a"));
        let c = b.assign(2, "h2", &attrs("c"));
        assert_eq!(a, vec!["10.0.0.0".parse::<IpAddr>().unwrap()]);
        assert_eq!(c.len(), 2);
        assert_eq!(b.sequence_number, 9);
        assert_eq!(b.handle_of(c[1]), Some("h2"));
        assert_eq!(b.release(&a), BTreeMap::from([("h1".to_string(), 1)]));
        // Freed address goes to the tail: the never-used .3 comes first.
        assert_eq!(
            b.assign(1, "h3", &attrs("d")),
            vec!["10.0.0.3".parse::<IpAddr>().unwrap()]
        );
        assert_eq!(b.assign(1, "h4", &attrs("e")), a);
        assert!(b.assign(1, "h5", &attrs("f")).is_empty());
        assert!(b.problems().is_empty(), "{:?}", b.problems());
        // Attributes are compacted when released.
        assert_eq!(b.release_handle("h2").len(), 2);
        assert_eq!(b.attributes.len(), 2);
        assert!(b.problems().is_empty(), "{:?}", b.problems());
        // Releasing again is a no-op.
        assert!(b.release(&c).is_empty());
    }

    #[test]
    fn specific_address() {
        let mut b = Block::for_node("fd00::/126".parse().unwrap(), "n1", 0);
        let ip: IpAddr = "fd00::2".parse().unwrap();
        b.assign_ip(ip, "h", &attrs("p")).unwrap();
        assert!(matches!(
            b.assign_ip(ip, "x", &attrs("q")),
            Err(BlockError::InUse { .. })
        ));
        assert!(matches!(
            b.assign_ip("fd00::9".parse().unwrap(), "x", &attrs("q")),
            Err(BlockError::OutsideBlock { .. })
        ));
        assert_eq!(b.free_count(), 3);
        assert!(b.problems().is_empty());
        assert_eq!(b.host(), Some("n1"));
    }

    #[test]
    fn cooling_addresses_come_last_and_only_when_allowed() {
        let mut b = Block::for_node("10.0.0.0/30".parse().unwrap(), "n1", 0);
        let cd = |now| Cooldown {
            now_ms: now,
            cooldown_ms: 1000,
        };
        let all = b.assign_avoiding(4, "h", &attrs("a"), &cd(0), false);
        assert_eq!(all.len(), 4);
        b.release_at(&all[1..3], 5000);
        assert_eq!(b.free_cool_count(&cd(5500)), 0);
        assert_eq!(b.cooling_count(&cd(5500)), 2);
        // Inside the cooldown: nothing, unless cooling addresses are allowed (then FIFO: .1 first).
        assert!(b
            .assign_avoiding(1, "x", &attrs("x"), &cd(5999), false)
            .is_empty());
        let forced = b.assign_avoiding(1, "x", &attrs("x"), &cd(5999), true);
        assert_eq!(forced, vec![all[1]]);
        assert!(!b.released_at.contains_key("1"));
        // After it, the address is free again and its stamp is dropped.
        assert_eq!(
            b.assign_avoiding(1, "y", &attrs("y"), &cd(6000), false),
            vec![all[2]]
        );
        assert!(b.released_at.is_empty());
        assert!(b.problems().is_empty(), "{:?}", b.problems());
        // A block that never released anything serializes without the field (Calico's exact JSON).
        let fresh = Block::for_node("10.0.0.0/30".parse().unwrap(), "n1", 0);
        assert!(!serde_json::to_string(&fresh)
            .unwrap()
            .contains("margayReleasedAt"));
        b.release_at(&[all[0]], 7000);
        let back: Block = serde_json::from_str(&serde_json::to_string(&b).unwrap()).unwrap();
        assert_eq!(back.released_at.get("0"), Some(&7000));
        assert!(!back.extra.contains_key("margayReleasedAt"));
    }

    #[test]
    fn detects_broken_structure() {
        let mut b = Block::for_node("10.0.0.0/30".parse().unwrap(), "n1", 0);
        b.assign(1, "h", &attrs("p"));
        b.unallocated.push(0);
        assert!(!b.problems().is_empty());
        let mut b = Block::for_node("10.0.0.0/30".parse().unwrap(), "n1", 0);
        b.allocations[1] = Some(5);
        assert!(!b.problems().is_empty());
    }
}
