//! What one BGP session is configured with: the peer, the local speaker, timers, transport options and
//! the capabilities margay offers. Plain data, filled by the speaker from Calico's BGPPeer /
//! BGPConfiguration / Node resources; nothing here talks to the network.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use crate::bgp::wire::{AddPathMode, Family};

/// Timers that are not negotiated. Defaults follow what Calico renders for BIRD (section 1.3 of the
/// reference): connect retry 5 s, error wait 5..30 s, hold 240 s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timers {
    /// Hold time offered in our OPEN (RFC 4271 4.2). 0 means no hold timer and no keepalives; otherwise at
    /// least 3 s.
    pub hold_time: u16,
    /// Keepalive interval; `None` = a third of the negotiated hold time (RFC 4271 10).
    pub keepalive: Option<u16>,
    /// ConnectRetryTimer (RFC 4271 8): how long one outgoing connection attempt may take before the
    /// next one, and how often a session in Active retries.
    pub connect_retry: Duration,
    /// IdleHoldTimer after a failure (RFC 4271 8.1.1 DampPeerOscillations): starts at `error_wait_min` and
    /// doubles on each consecutive failure up to `error_wait_max`; reset once the session is Established.
    pub error_wait_min: Duration,
    pub error_wait_max: Duration,
    /// Hold timer used while waiting for the peer's OPEN (RFC 4271 8.2.2 suggests 4 minutes).
    pub open_hold: Duration,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            hold_time: 240,
            keepalive: None,
            connect_retry: Duration::from_secs(5),
            error_wait_min: Duration::from_secs(5),
            error_wait_max: Duration::from_secs(30),
            open_hold: Duration::from_secs(240),
        }
    }
}

/// Graceful restart as margay advertises it (RFC 4724 section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GracefulRestartConfig {
    /// Restart Time in seconds (12 bits): how long peers should keep our routes after the session drops.
    pub restart_time: u16,
    /// Restart State ("R") bit: set in the OPENs sent right after margay itself restarted, so peers
    /// do not wait for our End-of-RIB in vain and know to keep our stale routes until it arrives.
    pub restarting: bool,
    /// Forwarding State ("F") bit, per advertised family: the kernel routes survived our restart.
    pub forwarding_preserved: bool,
    /// Long-lived graceful restart (RFC 9494): the Long-Lived Stale Time in seconds we advertise for
    /// every family, and the longest we keep a peer's routes long-lived stale as its helper (a peer
    /// asking for more gets ours). 0 = LLGR off: no capability, no helper (RFC 9494 5: never on unless
    /// configured).
    pub long_lived_stale_time: u32,
    /// The F bit of the LLGR capability. Separate from `forwarding_preserved`: a reflector forwards
    /// nothing, so the forwarding of the routes it reflects (they point at their origins) survives any
    /// outage of it.
    pub long_lived_forwarding_preserved: bool,
}

impl Default for GracefulRestartConfig {
    fn default() -> Self {
        // BIRD's default restart time, which Calico inherits (maxRestartTime default 120 s).
        GracefulRestartConfig {
            restart_time: 120,
            restarting: false,
            forwarding_preserved: false,
            long_lived_stale_time: 0,
            long_lived_forwarding_preserved: false,
        }
    }
}

/// TCP MD5 signature password (RFC 2385). Debug output never shows the key.
#[derive(Clone, PartialEq, Eq)]
pub struct Password(pub String);

impl std::fmt::Debug for Password {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Password(***)")
    }
}

/// Everything one peer session needs. `PartialEq` lets the speaker tell whether a change needs a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerConfig {
    /// The peer's address; also its identity in [`super::SessionEvent`]s and on the shared listener.
    pub peer_addr: IpAddr,
    /// The TCP port we connect to (179 unless BGPPeer `peerIP` carries one).
    pub peer_port: u16,
    /// The AS we expect in the peer's OPEN.
    pub peer_as: u32,
    /// Our AS.
    pub local_as: u32,
    /// Our BGP identifier (router id).
    pub router_id: Ipv4Addr,
    /// Source address for the outgoing connection (BGPPeer `sourceAddress: UseNodeIP`).
    pub source_addr: Option<IpAddr>,
    /// Never connect; only accept (Calico makes the side with the higher address passive).
    pub passive: bool,
    /// TCP MD5 password, set on the connecting socket and, for this address, on the listening sockets.
    pub password: Option<Password>,
    /// IP TTL / hop limit of our packets (multihop). `None` keeps the kernel default.
    pub ttl: Option<u8>,
    /// GTSM (RFC 5082, BGPPeer `ttlSecurity`): send with TTL 255 and drop packets whose TTL is below
    /// `256 - hops` (IP_MINTTL / IPV6_MINHOPCOUNT).
    pub ttl_security_hops: Option<u8>,
    /// Address families offered with the multiprotocol capability (RFC 4760).
    pub families: Vec<Family>,
    /// ADD-PATH modes offered per family (RFC 7911).
    pub add_path: Vec<(Family, AddPathMode)>,
    /// Offer route refresh (RFC 2918).
    pub route_refresh: bool,
    /// Offer extended messages up to 65535 bytes (RFC 8654).
    pub extended_message: bool,
    /// Offer graceful restart (RFC 4724).
    pub graceful_restart: Option<GracefulRestartConfig>,
    pub timers: Timers,
}

impl PeerConfig {
    /// A config with Calico's defaults for everything but the identities.
    pub fn new(peer_addr: IpAddr, peer_as: u32, local_as: u32, router_id: Ipv4Addr) -> PeerConfig {
        PeerConfig {
            peer_addr,
            peer_port: 179,
            peer_as,
            local_as,
            router_id,
            source_addr: None,
            passive: false,
            password: None,
            ttl: None,
            ttl_security_hops: None,
            families: vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST],
            add_path: Vec::new(),
            route_refresh: true,
            extended_message: true,
            graceful_restart: Some(GracefulRestartConfig::default()),
            timers: Timers::default(),
        }
    }

    /// iBGP when both sides are in the same AS.
    pub fn is_ibgp(&self) -> bool {
        self.peer_as == self.local_as
    }
}
