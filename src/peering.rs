//! What `margay node` and `margay reflector` share between the Calico schema and the speaker: a peer
//! derived from Calico's resources (`config::peers`) turned into the session and RIB settings the speaker
//! runs. The speaker knows nothing of Calico; this is the one place that translates.

use std::net::Ipv4Addr;

use tokio::sync::mpsc;

use crate::bfd::{BfdEvent, BfdPeer, Timers};
use crate::bgp::rib::NextHopMode;
use crate::bgp::session::PeerConfig;
use crate::bgp::speaker::{BfdLink, DesiredPeer};
use crate::bgp::wire::Family;
use crate::config::peers as config;

/// The session and RIB settings of a peer derived from Calico resources (`config::peers`), as BIRD would
/// get them from Calico's confd template.
pub fn speaker_peer(p: &config::DesiredPeer, router_id: Ipv4Addr) -> DesiredPeer {
    use crate::bgp::session::{GracefulRestartConfig, Password};
    let mut s = PeerConfig::new(p.address, p.peer_as, p.local_as, router_id);
    s.peer_port = p.port;
    s.source_addr = p.source_address;
    s.passive = p.passive;
    s.password = p.password.clone().map(Password);
    s.ttl_security_hops = p.ttl_security;
    // RFC 7911 both ways, as Calico's BIRD runs `add paths on`: we accept several paths per prefix (the
    // RIB sees every origin and the FIB gets the ECMP set) and send every path to a peer that asked (a
    // reflector's clients keep ECMP across the origins of a prefix). A peer that does not offer it gets
    // the best path alone.
    s.add_path = vec![
        (Family::IPV4_UNICAST, crate::bgp::wire::AddPathMode::Both),
        (Family::IPV6_UNICAST, crate::bgp::wire::AddPathMode::Both),
    ];
    if let Some(k) = p.keepalive_time {
        s.timers.keepalive = Some(k.as_secs().clamp(1, u64::from(u16::MAX)) as u16);
    }
    s.graceful_restart = Some(GracefulRestartConfig {
        restart_time: p.max_restart_time.as_secs().min(4095) as u16,
        // The F bit (RFC 4724 3): margay's FIB never flushes its kernel routes when the process stops,
        // so forwarding survives a restart. Without it a helper drops our stale routes the moment the
        // session is back (RFC 4724 4.2), before we re-announce them: a withdraw-then-add gap in every
        // peer's FIB. A speaker that forwards nothing (the reflector) clears it.
        forwarding_preserved: true,
        // RFC 9494: the stale time from the annotations (`config::peers`); the LLGR F bit follows the GR
        // one on a node (the caller sets both after a restart).
        long_lived_stale_time: p.llgr_stale_time.as_secs().min(u64::from(u32::MAX)) as u32,
        long_lived_forwarding_preserved: true,
        ..Default::default()
    });
    DesiredPeer {
        peer_type: p.peer_type.as_status().to_string(),
        session: s,
        rr_client: p.rr_client,
        next_hop_mode: p.next_hop_mode.into(),
        max_prefixes: None,
        allow_local_as: p.num_allowed_local_as.unwrap_or(0),
        next_hop_v6: None,
    }
}

/// Calico's `nextHopMode` of a BGPPeer is the RIB's next-hop rule for that peer.
impl From<crate::config::bgp::NextHopMode> for NextHopMode {
    fn from(m: crate::config::bgp::NextHopMode) -> NextHopMode {
        match m {
            crate::config::bgp::NextHopMode::Auto => NextHopMode::Auto,
            crate::config::bgp::NextHopMode::SelfAddr => NextHopMode::SelfAddr,
            crate::config::bgp::NextHopMode::Keep => NextHopMode::Keep,
        }
    }
}

/// The BFD session a peer asked for (annotations, `config::bfd`), from the BGP session's own source
/// address to its peer address.
pub fn bfd_peer(p: &config::DesiredPeer) -> Option<BfdPeer> {
    let c = p.bfd?;
    Some(BfdPeer {
        peer: p.address,
        local: p.source_address,
        multihop: c.multihop,
        timers: Timers {
            desired_min_tx: c.min_tx,
            required_min_rx: c.min_rx,
            detect_mult: c.multiplier,
        },
    })
}

/// The BFD peers of a peer set: one per address and hop mode (two BGP sessions to one address on two
/// ports share their BFD session).
pub fn bfd_peers(peers: &[config::DesiredPeer]) -> Vec<BfdPeer> {
    let mut out: Vec<BfdPeer> = peers.iter().filter_map(bfd_peer).collect();
    out.sort_by_key(|b| (b.peer, b.multihop));
    out.dedup_by_key(|b| (b.peer, b.multihop));
    out
}

/// BFD Down -> the BGP session of that peer is reset at once (RFC 5882 4.3): its routes leave the RIB
/// and the FIB now and a fresh connection follows, instead of waiting for the hold timer.
pub async fn bfd_to_speaker(mut events: mpsc::Receiver<BfdEvent>, spk: BfdLink) {
    while let Some(ev) = events.recv().await {
        match ev {
            BfdEvent::Down { peer, diag } => {
                tracing::warn!(%peer, diag = diag.as_str(), "BFD session down: resetting the BGP session");
                if spk.bfd_down(peer, diag.as_str().to_string()).await.is_err() {
                    return; // the speaker is gone: the daemon is stopping
                }
            }
            BfdEvent::Up { peer } => tracing::info!(%peer, "BFD session up"),
        }
    }
}
