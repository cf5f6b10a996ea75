//! What a peer receives for a best path: the send/don't-send rules (iBGP split horizon, RFC 4456 section 6
//! reflection) and the attribute rewrite (AS prepend and LOCAL_PREF strip towards eBGP, ORIGINATOR_ID and
//! CLUSTER_LIST when reflecting, next hop per `NextHopMode`).
//!
//! Both are pure functions; the RIB caches the rewrite per (source attribute set, source peer, target peer),
//! so a million prefixes sharing a few attribute sets cost a few rewrites.

use std::net::{IpAddr, Ipv4Addr};

use super::decision::{degree_of_preference, Kind};
use super::table::Path;
use super::{NextHopMode, PeerInfo};
use crate::bgp::wire::{Family, MpReach, Origin, PathAttributes};

/// The source of a path as export needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportSource {
    pub slot: u16,
    pub kind: Kind,
    pub router_id: Ipv4Addr,
    pub rr_client: bool,
}

/// The target peer as export needs it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ExportTarget<'a> {
    pub slot: u16,
    pub kind: Kind,
    pub info: &'a PeerInfo,
}

/// May a path from `src` be advertised to `tgt` at all (ignoring policy and family)?
pub(crate) fn may_send(src: &ExportSource, tgt: &ExportTarget<'_>) -> bool {
    // Never back to the peer it came from.
    if src.slot == tgt.slot {
        return false;
    }
    match (src.kind, tgt.kind) {
        // RFC 4271 9.2 iBGP split horizon, relaxed by RFC 4456 6: a route from a client goes to everyone,
        // a route from a non-client goes to clients only.
        (Kind::Ibgp, Kind::Ibgp) => src.rr_client || tgt.info.rr_client,
        _ => true,
    }
}

/// The attributes `tgt` receives for `path` (from `src`), or None when no usable next hop exists for the
/// target (e.g. an IPv6 route towards a session that has no IPv6 address of ours).
pub(crate) fn rewrite(
    path: &Path,
    src: &ExportSource,
    tgt: &ExportTarget<'_>,
    family: Family,
    cluster_id: Ipv4Addr,
) -> Option<PathAttributes> {
    let a = &path.attrs;
    let mut out = PathAttributes {
        origin: Some(a.origin.unwrap_or(Origin::Igp)),
        as_path: Some(a.as_path.clone().unwrap_or_default()),
        next_hop: None,
        med: a.med,
        local_pref: None,
        atomic_aggregate: a.atomic_aggregate,
        aggregator: a.aggregator,
        communities: a.communities.clone(),
        large_communities: a.large_communities.clone(),
        originator_id: None,
        cluster_list: Vec::new(),
        mp_reach: None,
        mp_unreach: None,
        unknown: a.unknown.clone(),
    };
    let received_nh: Option<IpAddr> = received_next_hop(a, family);

    let keep = match tgt.kind {
        Kind::Ebgp => {
            // RFC 4271 5.1.2: prepend our AS towards an external peer.
            if let Some(p) = out.as_path.as_mut() {
                p.prepend(tgt.info.local_asn);
            }
            // RFC 4271 5.1.4: a MED received from a neighbouring AS is not propagated to other ASes.
            if src.kind == Kind::Ebgp {
                out.med = None;
            }
            // LOCAL_PREF (5.1.5) and ORIGINATOR_ID / CLUSTER_LIST (RFC 4456 8) stay inside the AS: not set.
            tgt.info.next_hop_mode == NextHopMode::Keep
        }
        Kind::Ibgp | Kind::Local => {
            // RFC 4271 5.1.5: LOCAL_PREF is sent to every internal peer.
            out.local_pref = Some(degree_of_preference(path, src.kind));
            if src.kind == Kind::Ibgp {
                // RFC 4456 8: reflecting. ORIGINATOR_ID is the originator's router id unless already set;
                // our cluster id goes in front of CLUSTER_LIST.
                out.originator_id = Some(a.originator_id.unwrap_or(src.router_id));
                out.cluster_list = Vec::with_capacity(a.cluster_list.len() + 1);
                out.cluster_list.push(cluster_id);
                out.cluster_list.extend_from_slice(&a.cluster_list);
            }
            match tgt.info.next_hop_mode {
                NextHopMode::SelfAddr => false,
                NextHopMode::Keep => true,
                // Keep the next hop of reflected routes (a reflector must not put itself in the data path,
                // as BIRD's iBGP default); self for routes from eBGP and our own routes.
                NextHopMode::Auto => src.kind == Kind::Ibgp,
            }
        }
    };

    let nh = match (keep, received_nh) {
        (true, Some(nh)) => nh,
        // Local routes have no next hop of their own: they always get ours.
        _ => self_next_hop(tgt.info, family)?,
    };
    match (family, nh) {
        (f, IpAddr::V4(v4)) if f == Family::IPV4_UNICAST => out.next_hop = Some(v4),
        (f, nh) => {
            out.mp_reach = Some(MpReach {
                family: f,
                next_hop: vec![nh],
                nlri: Vec::new(),
            });
        }
    }
    Some(out)
}

/// The next hop a path carries for its family: NEXT_HOP for IPv4 (or an IPv4 MP_REACH next hop), the first
/// (global) MP_REACH next hop otherwise. The link-local one is meaningful only on the link it came from.
pub(crate) fn received_next_hop(a: &PathAttributes, family: Family) -> Option<IpAddr> {
    if family == Family::IPV4_UNICAST {
        if let Some(nh) = a.next_hop {
            return Some(IpAddr::V4(nh));
        }
    }
    a.mp_reach
        .as_ref()
        .and_then(|m| m.next_hop.first().copied())
}

fn self_next_hop(info: &PeerInfo, family: Family) -> Option<IpAddr> {
    if family == Family::IPV4_UNICAST {
        info.local_v4.map(IpAddr::V4)
    } else {
        info.local_v6.map(IpAddr::V6)
    }
}
