//! The BGP decision process (RFC 4271 9.1.2), with the RFC 4456 section 9 changes for route reflection, and
//! the ECMP set (paths equal up to, but not including, the router-id step).
//!
//! MED is compared only among paths from the same neighbouring AS (9.1.2.2 (c)), which is not a total order,
//! so selection is done the way the RFC describes it: successive elimination over the candidate set, not a sort.

use std::net::{IpAddr, Ipv4Addr};

use super::table::{Path, FLAG_ECMP};
use crate::bgp::wire::{Origin, LLGR_STALE};

/// LOCAL_PREF assumed when none is present (and for routes learned over eBGP, whose received LOCAL_PREF is
/// ignored, RFC 4271 5.1.5). BIRD and FRR use 100 too.
pub const DEFAULT_LOCAL_PREF: u32 = 100;

/// The kind of the session a path came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Ibgp,
    Ebgp,
    /// Originated by this speaker.
    Local,
}

/// What the decision process needs to know about the peer a path came from.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SourceMeta {
    pub kind: Kind,
    pub router_id: Ipv4Addr,
    pub address: IpAddr,
}

/// Degree of preference (RFC 4271 9.1.1): LOCAL_PREF for iBGP-learned and local routes, the default for
/// eBGP-learned ones.
pub(crate) fn degree_of_preference(path: &Path, kind: Kind) -> u32 {
    match kind {
        Kind::Ebgp => DEFAULT_LOCAL_PREF,
        Kind::Ibgp | Kind::Local => path.attrs.local_pref.unwrap_or(DEFAULT_LOCAL_PREF),
    }
}

fn origin_rank(o: Option<Origin>) -> u8 {
    match o.unwrap_or(Origin::Incomplete) {
        Origin::Igp => 0,
        Origin::Egp => 1,
        Origin::Incomplete => 2,
    }
}

/// The tie-break key after the ECMP cut: (g) lowest BGP identifier, ORIGINATOR_ID standing in for it when present
/// (RFC 4456 9), shortest CLUSTER_LIST (RFC 4456 9), lowest peer address (RFC 4271 9.1.2.2 (g)), then the
/// ADD-PATH id and the peer slot so the order is total and deterministic.
fn tiebreak(p: &Path, m: &SourceMeta) -> (u32, usize, IpAddr, u32, u16) {
    let rid = p.attrs.originator_id.unwrap_or(m.router_id);
    (
        u32::from(rid),
        p.attrs.cluster_list.len(),
        m.address,
        p.path_id,
        p.slot,
    )
}

/// Order `paths` best first, with the ECMP set (flagged `FLAG_ECMP`, best included) directly after it.
/// Returns the size of the ECMP set.
pub(crate) fn select(paths: &mut [Path], meta: &dyn Fn(u16) -> SourceMeta) -> usize {
    for p in paths.iter_mut() {
        p.flags &= !FLAG_ECMP;
    }
    if paths.len() == 1 {
        paths[0].flags |= FLAG_ECMP;
        return 1;
    }
    let metas: Vec<SourceMeta> = paths.iter().map(|p| meta(p.slot)).collect();
    let mut cand: Vec<usize> = (0..paths.len()).collect();

    // RFC 9494 4.3: a route carrying LLGR_STALE is less preferred than any route without it, whatever its
    // other attributes; among stale routes the usual steps decide.
    keep_best(&mut cand, |i| {
        paths[i].attrs.communities.contains(&LLGR_STALE)
    });
    // (a) highest degree of preference (9.1.1 / 9.1.2.1).
    keep_best(&mut cand, |i| {
        std::cmp::Reverse(degree_of_preference(&paths[i], metas[i].kind))
    });
    // 9.1.2.2 (a) shortest AS_PATH (a SET counts as one).
    keep_best(&mut cand, |i| {
        paths[i]
            .attrs
            .as_path
            .as_ref()
            .map_or(0, |a| a.len_for_decision())
    });
    // (b) lowest ORIGIN.
    keep_best(&mut cand, |i| origin_rank(paths[i].attrs.origin));
    // (c) MED among paths from the same neighbouring AS: remove a path if another with the same neighbour AS
    // has a lower MED. A missing MED is the lowest possible value.
    let neighbor_as = |i: usize| {
        paths[i]
            .attrs
            .as_path
            .as_ref()
            .and_then(|a| a.neighbor_as())
    };
    let med = |i: usize| paths[i].attrs.med.unwrap_or(0);
    let snapshot = cand.clone();
    cand.retain(|&i| {
        !snapshot
            .iter()
            .any(|&j| neighbor_as(j) == neighbor_as(i) && med(j) < med(i))
    });
    // (d) eBGP over iBGP (and our own routes over both).
    keep_best(&mut cand, |i| std::cmp::Reverse(metas[i].kind));
    // (e) IGP cost to the next hop: margay has no IGP, every next hop costs the same.

    // The paths still in `cand` are equal so far: they form the ECMP set.
    cand.sort_by_key(|&i| tiebreak(&paths[i], &metas[i]));
    let n = cand.len();
    for &i in &cand {
        paths[i].flags |= FLAG_ECMP;
    }
    // Reorder: ECMP members in tie-break order (best first), then the rest in their previous order.
    let mut order: Vec<usize> = cand;
    let mut in_set = vec![false; paths.len()];
    for &i in &order {
        in_set[i] = true;
    }
    order.extend((0..paths.len()).filter(|&i| !in_set[i]));
    apply_order(paths, &order);
    n
}

/// Keep only the candidates with the smallest key.
fn keep_best<K: Ord>(cand: &mut Vec<usize>, key: impl Fn(usize) -> K) {
    if let Some(min) = cand.iter().map(|&i| key(i)).min() {
        cand.retain(|&i| key(i) == min);
    }
}

fn apply_order(paths: &mut [Path], order: &[usize]) {
    let reordered: Vec<Path> = order.iter().map(|&i| paths[i].clone()).collect();
    for (slot, p) in paths.iter_mut().zip(reordered) {
        *slot = p;
    }
}
