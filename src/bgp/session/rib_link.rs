//! A peer task's own link to the RIB: the session feeds the RIB directly (PeerUp with the session's
//! generation, the decoded routes, End-of-RIB, route refresh, PeerDown) and encodes the RIB's output for
//! its Established session ([`RibOutputs`]) straight into the connection's write queue. The speaker only starts and stops peers; no route passes through it.
//!
//! What the RIB must know about the peer beyond what the OPEN exchange negotiated (its route-reflector
//! role, next-hop mode, limits) is the [`RibRole`] the speaker hands over at spawn; a change of role
//! restarts the peer task, so the role never changes under a running session.

use std::net::{IpAddr, Ipv6Addr};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::bgp::rib::{
    NextHopMode, PeerGracefulRestart as RibGr, PeerId, PeerInfo, PeerLongLived, RibInput,
    RibOutput, SharedWire,
};
use crate::bgp::wire::{
    encode, encode_updates, encode_withdrawals, EncodeCtx, Family, Message, Update,
};
use crate::task::chan;

use super::config::PeerConfig;
use super::open::{family_text, Negotiated};
use super::peer::DirectSink;

/// How many RIB output messages may wait for one session's encoder (each holds up to the RIB's
/// `max_batch` prefixes sharing one attribute set). Small on purpose: the RIB fills it from the session's
/// place in the RIB's change log when it has room (see `Rib::drain_dirty`), so what is owed to
/// a session waits there, once per prefix, not here.
pub const RIB_OUTPUT_QUEUE: usize = 16;

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

/// Most bytes one batch of encoded UPDATEs holds before it goes to the connection's write queue. Small on
/// purpose: the encoder must not run ahead of the socket (the kernel's send buffer is the queue), so a
/// table dump costs a session about this much while it drains, not the encoded table.
const BATCH: usize = 16 * 1024;

/// The RIB's output channel of the Established session and its encoding context: the peer task takes
/// from it while its connection's write queue has room and encodes straight into that queue.
pub(crate) struct RibOutputs {
    pub rx: chan::Receiver<RibOutput>,
    ctx: EncodeCtx,
    /// The socket as the RIB writes to it; told how many messages each batch took.
    pub direct: Option<Arc<DirectSink>>,
}

/// One batch of encoded output.
pub(crate) struct Batch {
    /// UPDATEs (and End-of-RIB markers last) for the socket, in order: this session's own encoding and
    /// the pieces shared with its update group, which stay one buffer for every member (the writer
    /// writes them vectored, nothing is copied per session).
    pub pieces: Vec<Bytes>,
    /// The peer exceeded its max-prefix limit: stop the session.
    pub max_prefix_exceeded: Option<u32>,
    /// How many messages of the channel the batch took.
    pub taken: u64,
}

impl RibOutputs {
    pub fn new(
        rx: chan::Receiver<RibOutput>,
        ctx: EncodeCtx,
        direct: Option<Arc<DirectSink>>,
    ) -> RibOutputs {
        RibOutputs { rx, ctx, direct }
    }

    /// Encode `first` and what else waits, up to [`BATCH`] bytes or the first End-of-RIB. Messages the
    /// RIB marked as shared by an update group are encoded by the first member and taken as the same
    /// bytes by the others. Nothing is kept between batches: an idle session holds no buffer.
    pub fn batch(&mut self, peer: IpAddr, first: RibOutput) -> Batch {
        let mut buf = BytesMut::new();
        // The batch so far, in order: this session's own encoding (split off `buf`) and shared pieces;
        // `size` counts the bytes in `pieces`.
        let mut pieces: Vec<Bytes> = Vec::new();
        let mut size = 0usize;
        let mut eors: Vec<Family> = Vec::new();
        let mut max_prefix_exceeded = None;
        let ctx = &self.ctx;
        let mut next = Some(first);
        let mut taken = 0;
        while let Some(out) = next.take() {
            taken += 1;
            match out {
                RibOutput::Updates {
                    family,
                    attrs,
                    nlri,
                    wire,
                } => {
                    let encode = |b: &mut BytesMut| {
                        encode_updates(&attrs, family, &nlri, ctx, b).map(|_| ())
                    };
                    if let Err(e) = add(&wire, ctx, encode, &mut buf, &mut pieces, &mut size) {
                        tracing::error!(%peer, error = %e, prefixes = nlri.len(), "cannot encode UPDATE; routes not sent");
                    }
                }
                RibOutput::Withdraw { family, nlri, wire } => {
                    let encode =
                        |b: &mut BytesMut| encode_withdrawals(family, &nlri, ctx, b).map(|_| ());
                    if let Err(e) = add(&wire, ctx, encode, &mut buf, &mut pieces, &mut size) {
                        tracing::error!(%peer, error = %e, "cannot encode withdrawal");
                    }
                }
                RibOutput::EndOfRib(family) => eors.push(family),
                RibOutput::MaxPrefixExceeded { limit } => {
                    tracing::warn!(%peer, limit, "peer exceeded its max-prefix limit: stopping the session");
                    max_prefix_exceeded = Some(limit);
                    break;
                }
            }
            if size + buf.len() >= BATCH || !eors.is_empty() {
                break;
            }
            next = self.rx.try_recv().ok();
        }
        // RFC 4724 2: End-of-RIB is an UPDATE with nothing in it, after the table.
        for family in eors {
            let eor = Message::Update(Update::end_of_rib_for(family));
            if let Err(e) = encode(&eor, ctx, &mut buf) {
                tracing::error!(%peer, "End-of-RIB for {}: {e}", family_text(family));
            }
        }
        if !buf.is_empty() {
            pieces.push(buf.freeze());
        }
        Batch {
            pieces,
            max_prefix_exceeded,
            taken,
        }
    }
}

/// Add one message to the batch: the shared bytes when another member has encoded it under our
/// context, else our own encoding (offered to the other members when the message is shared).
fn add<E>(
    wire: &SharedWire,
    ctx: &EncodeCtx,
    encode: impl FnOnce(&mut BytesMut) -> Result<(), E>,
    buf: &mut BytesMut,
    pieces: &mut Vec<Bytes>,
    size: &mut usize,
) -> Result<(), E> {
    if !wire.is_shared() {
        return encode(buf);
    }
    let bytes = wire.get_or_encode(ctx, encode)?;
    if !buf.is_empty() {
        *size += buf.len();
        pieces.push(buf.split().freeze());
    }
    *size += bytes.len();
    pieces.push(bytes);
    Ok(())
}
