//! A peer task's own link to the RIB: the session feeds the RIB directly (PeerUp with the session's
//! generation, the decoded routes, End-of-RIB, route refresh, PeerDown) and runs the encoder of the RIB's
//! output for its Established session. The speaker only starts and stops peers; no route passes through it.
//!
//! What the RIB must know about the peer beyond what the OPEN exchange negotiated (its route-reflector
//! role, next-hop mode, limits) is the [`RibRole`] the speaker hands over at spawn; a change of role
//! restarts the peer task, so the role never changes under a running session.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use bytes::BytesMut;
use tokio::sync::mpsc;

use crate::bgp::rib::{
    NextHopMode, PeerGracefulRestart as RibGr, PeerId, PeerInfo, PeerLongLived, RibInput, RibOutput,
};
use crate::bgp::wire::{encode_updates, encode_withdrawals, EncodeCtx, Family};

use super::config::PeerConfig;
use super::open::Negotiated;
use super::{PeerCommand, SessionId};

/// How many RIB output messages may wait for one session's encoder (each holds up to the RIB's
/// `max_batch` prefixes sharing one attribute set). Beyond it the RIB keeps a dirty set for the peer
/// instead of queueing (see `Rib::drain_dirty`).
pub const RIB_OUTPUT_QUEUE: usize = 128;

/// The RIB-side settings of a peer (Calico BGPPeer / Node derived).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RibRole {
    /// The peer is our route-reflector client (RFC 4456).
    pub rr_client: bool,
    pub next_hop_mode: NextHopMode,
    pub max_prefixes: Option<u32>,
    /// BGPPeer `numAllowedLocalASNumbers`.
    pub allow_local_as: u32,
    /// Our IPv6 next hop for IPv6 routes when the transport is IPv4 (None: the session's own IPv6 source).
    pub next_hop_v6: Option<Ipv6Addr>,
}

/// Where a peer task sends its routes: the RIB's inbox, and who it is there.
#[derive(Debug, Clone)]
pub struct RibLink {
    pub tx: mpsc::Sender<RibInput>,
    pub peer: PeerId,
    pub role: RibRole,
}

/// Everything the RIB needs to know about an Established session.
pub fn peer_info(cfg: &PeerConfig, role: &RibRole, n: &Negotiated) -> PeerInfo {
    let (local_v4, local_v6) = match cfg.source_addr {
        Some(IpAddr::V4(a)) => (Some(a), None),
        Some(IpAddr::V6(a)) => (None, Some(a)),
        None => (None, None),
    };
    PeerInfo {
        asn: n.peer_as,
        local_asn: n.local_as,
        router_id: n.peer_id,
        address: n.peer_addr,
        local_v4: local_v4.or(Some(n.local_id)),
        local_v6: local_v6.or(role.next_hop_v6),
        rr_client: role.rr_client,
        next_hop_mode: role.next_hop_mode,
        graceful_restart: n.peer_graceful_restart.as_ref().map(|g| RibGr {
            restart_time: Duration::from_secs(u64::from(g.restart_time)),
            forwarding_preserved: g
                .families
                .iter()
                .filter(|f| f.forwarding_preserved)
                .map(|f| f.family)
                .collect(),
            long_lived: g.long_lived.as_ref().map(|l| PeerLongLived {
                families: l
                    .iter()
                    .map(|f| (f.family, Duration::from_secs(u64::from(f.stale_time))))
                    .collect(),
                forwarding_preserved: l
                    .iter()
                    .filter(|f| f.forwarding_preserved)
                    .map(|f| f.family)
                    .collect(),
            }),
        }),
        families: n.families.clone(),
        add_path_rx: n.add_path_rx.clone(),
        add_path_tx: n.add_path_tx.clone(),
        max_prefixes: role.max_prefixes,
        allow_local_as: role.allow_local_as,
    }
}

/// Encode the RIB's output for one session into large pre-encoded batches for the peer task.
pub(crate) async fn write_rib_output(
    peer: IpAddr,
    session: SessionId,
    ctx: EncodeCtx,
    mut rx: mpsc::Receiver<RibOutput>,
    cmds: mpsc::Sender<PeerCommand>,
) {
    const BATCH: usize = 1 << 20;
    // Grown as needed and handed over whole: a buffer reserved up front would be touched page by page as
    // batches are split off it, about 1 MiB resident per session on a reflector with a thousand clients.
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut eors: Vec<Family> = Vec::new();
        while let Some(out) = next.take() {
            match out {
                RibOutput::Updates {
                    family,
                    attrs,
                    nlri,
                } => {
                    if let Err(e) = encode_updates(&attrs, family, &nlri, &ctx, &mut buf) {
                        tracing::error!(%peer, error = %e, prefixes = nlri.len(), "cannot encode UPDATE; routes not sent");
                    }
                }
                RibOutput::Withdraw { family, nlri } => {
                    if let Err(e) = encode_withdrawals(family, &nlri, &ctx, &mut buf) {
                        tracing::error!(%peer, error = %e, "cannot encode withdrawal");
                    }
                }
                RibOutput::EndOfRib(family) => eors.push(family),
                RibOutput::MaxPrefixExceeded { limit } => {
                    tracing::warn!(%peer, limit, "peer exceeded its max-prefix limit: stopping the session");
                    // Closed: the peer task has already ended, which is what Stop asks for.
                    let _ = cmds.send(PeerCommand::Stop).await;
                    return;
                }
            }
            if buf.len() >= BATCH || !eors.is_empty() {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            let bytes = buf.split().freeze();
            if cmds
                .send(PeerCommand::SendUpdates { session, bytes })
                .await
                .is_err()
            {
                return;
            }
        }
        for family in eors {
            if cmds
                .send(PeerCommand::SendEndOfRib { session, family })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}
