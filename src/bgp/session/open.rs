//! OPEN handling: the OPEN margay sends, validation of the peer's OPEN (RFC 4271 6.2) with errors in
//! plain words, and capability negotiation (RFC 5492) into [`Negotiated`]. Pure functions.

use std::net::{IpAddr, Ipv4Addr};

use crate::bgp::wire::{
    AddPathMode, Capability, Family, GracefulRestartFamily, LongLivedFamily, Notification, Open,
    AS_TRANS, LLGR_MAX_STALE_TIME,
};

use super::config::PeerConfig;

/// NOTIFICATION error codes (RFC 4271 4.5) and the subcodes the session layer sends itself.
pub mod code {
    pub const MESSAGE_HEADER: u8 = 1;
    pub const OPEN_MESSAGE: u8 = 2;
    pub const UPDATE_MESSAGE: u8 = 3;
    pub const HOLD_TIMER_EXPIRED: u8 = 4;
    pub const FSM: u8 = 5;
    pub const CEASE: u8 = 6;
    pub const ROUTE_REFRESH: u8 = 7;

    // OPEN Message Error subcodes (RFC 4271 6.2, RFC 5492).
    pub const OPEN_UNSUPPORTED_VERSION: u8 = 1;
    pub const OPEN_BAD_PEER_AS: u8 = 2;
    pub const OPEN_BAD_BGP_ID: u8 = 3;
    pub const OPEN_UNACCEPTABLE_HOLD_TIME: u8 = 6;
    pub const OPEN_UNSUPPORTED_CAPABILITY: u8 = 7;

    // FSM Error subcodes (RFC 6608).
    pub const FSM_UNEXPECTED_IN_OPENSENT: u8 = 1;
    pub const FSM_UNEXPECTED_IN_OPENCONFIRM: u8 = 2;
    pub const FSM_UNEXPECTED_IN_ESTABLISHED: u8 = 3;

    // Cease subcodes (RFC 4486).
    pub const CEASE_ADMIN_SHUTDOWN: u8 = 2;
    pub const CEASE_PEER_DECONFIGURED: u8 = 3;
    pub const CEASE_CONNECTION_REJECTED: u8 = 5;
    pub const CEASE_OTHER_CONFIG_CHANGE: u8 = 6;
    pub const CEASE_COLLISION_RESOLUTION: u8 = 7;
}

/// The peer's graceful restart capability as negotiated (RFC 4724 section 3), restricted to the
/// families the session carries. The RIB uses it to keep the peer's routes stale when the session drops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerGracefulRestart {
    /// How long to keep the peer's routes after the session drops (seconds).
    pub restart_time: u16,
    /// The peer has just restarted (R bit): it will send End-of-RIB when its table is complete.
    pub restarting: bool,
    /// The peer understands RFC 8538 (N bit).
    pub notification: bool,
    /// Families the peer preserves across a restart, with its Forwarding State bit.
    pub families: Vec<GracefulRestartFamily>,
    /// Long-lived graceful restart (RFC 9494), when both sides advertised it next to graceful restart:
    /// the peer's families (negotiated ones only) with their stale time capped by ours. `Some(vec![])` is
    /// a peer that understands LLGR_STALE routes but keeps no family long-lived (BIRD's "aware").
    pub long_lived: Option<Vec<LongLivedFamily>>,
}

impl PeerGracefulRestart {
    /// Did the peer keep its forwarding state for `family` across its restart?
    pub fn forwarding_preserved(&self, family: Family) -> bool {
        self.families
            .iter()
            .any(|f| f.family == family && f.forwarding_preserved)
    }
}

/// What both sides agreed on in their OPENs; handed to the RIB with `SessionEvent::Established`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    pub peer_addr: IpAddr,
    pub local_as: u32,
    pub peer_as: u32,
    pub local_id: Ipv4Addr,
    pub peer_id: Ipv4Addr,
    /// Negotiated hold time in seconds (the smaller of both; 0 = no hold timer, no keepalives).
    pub hold_time: u16,
    /// Keepalive interval in seconds (0 when hold time is 0).
    pub keepalive: u16,
    /// Both sides support 4-octet AS numbers (RFC 6793).
    pub four_octet_as: bool,
    /// Families both sides announced (RFC 4760); IPv4 unicast when a side announced none.
    pub families: Vec<Family>,
    /// Families on which the peer's UPDATEs carry path identifiers (we receive, it sends; RFC 7911).
    pub add_path_rx: Vec<Family>,
    /// Families on which our UPDATEs must carry path identifiers.
    pub add_path_tx: Vec<Family>,
    pub route_refresh: bool,
    /// Both sides accept messages up to 65535 bytes (RFC 8654).
    pub extended_message: bool,
    /// The peer's graceful restart capability, if it sent one.
    pub peer_graceful_restart: Option<PeerGracefulRestart>,
    /// We advertised graceful restart on this session.
    pub local_graceful_restart: bool,
    /// The peer's OPEN as received, for status pages.
    pub peer_open: Open,
}

impl Negotiated {
    pub fn is_ibgp(&self) -> bool {
        self.local_as == self.peer_as
    }
    /// Largest message either side may send on this session (RFC 4271 4.1, RFC 8654).
    pub fn max_message_len(&self) -> usize {
        if self.extended_message {
            65535
        } else {
            4096
        }
    }
}

/// Why a peer's OPEN was refused: the NOTIFICATION to send and a sentence for the operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenError {
    pub notification: Notification,
    pub reason: String,
}

/// The OPEN margay sends for `cfg` (RFC 4271 4.2 with the RFC 5492 capabilities).
pub fn build_open(cfg: &PeerConfig) -> Open {
    let mut caps = Vec::new();
    for f in &cfg.families {
        caps.push(Capability::Multiprotocol(*f));
    }
    if cfg.route_refresh {
        caps.push(Capability::RouteRefresh);
    }
    if cfg.extended_message {
        caps.push(Capability::ExtendedMessage);
    }
    if let Some(gr) = &cfg.graceful_restart {
        caps.push(Capability::GracefulRestart {
            restarting: gr.restarting,
            notification: false,
            restart_time: gr.restart_time.min(0x0fff),
            families: cfg
                .families
                .iter()
                .map(|f| GracefulRestartFamily {
                    family: *f,
                    forwarding_preserved: gr.forwarding_preserved,
                })
                .collect(),
        });
        if let Some(c) = long_lived_capability(cfg) {
            caps.push(c);
        }
    }
    caps.push(Capability::FourOctetAs(cfg.local_as));
    let add_path: Vec<_> = cfg
        .add_path
        .iter()
        .filter(|(f, _)| cfg.families.contains(f))
        .copied()
        .collect();
    if !add_path.is_empty() {
        caps.push(Capability::AddPath(add_path));
    }
    Open {
        version: 4,
        // RFC 6793 4.1: AS_TRANS in the 2-octet field when our AS does not fit.
        my_as: u16::try_from(cfg.local_as).unwrap_or(AS_TRANS),
        hold_time: cfg.timers.hold_time,
        bgp_id: cfg.router_id,
        capabilities: caps,
    }
}

/// The LLGR capability we advertise (RFC 9494 3.1): only next to graceful restart and only when a stale
/// time is configured, one tuple per family we offer.
fn long_lived_capability(cfg: &PeerConfig) -> Option<Capability> {
    let gr = cfg.graceful_restart.as_ref()?;
    if gr.long_lived_stale_time == 0 {
        return None;
    }
    Some(Capability::LongLivedGracefulRestart(
        cfg.families
            .iter()
            .map(|f| LongLivedFamily {
                family: *f,
                forwarding_preserved: gr.long_lived_forwarding_preserved,
                stale_time: gr.long_lived_stale_time.min(LLGR_MAX_STALE_TIME),
            })
            .collect(),
    ))
}

/// RFC 9494 3.1, 4.2: LLGR is in force when we advertised it and the peer sent it together with graceful
/// restart (alone it is ignored). The peer's stale time is shortened to ours.
fn negotiate_long_lived(
    cfg: &PeerConfig,
    open: &Open,
    families: &[Family],
) -> Option<Vec<LongLivedFamily>> {
    let ours = cfg.graceful_restart.as_ref()?.long_lived_stale_time;
    if ours == 0 {
        return None;
    }
    let mut theirs = open.capabilities.iter().filter_map(|c| match c {
        Capability::LongLivedGracefulRestart(v) => Some(v),
        _ => None,
    });
    let first = theirs.next()?;
    Some(
        first
            .iter()
            .chain(theirs.flatten())
            .filter(|l| families.contains(&l.family))
            .map(|l| LongLivedFamily {
                stale_time: l.stale_time.min(ours),
                ..*l
            })
            .collect(),
    )
}

fn open_error(subcode: u8, data: Vec<u8>, reason: String) -> OpenError {
    OpenError {
        notification: Notification {
            code: code::OPEN_MESSAGE,
            subcode,
            data,
        },
        reason,
    }
}

/// Validate the peer's OPEN against `cfg` (RFC 4271 6.2) and negotiate the session parameters.
pub fn negotiate(cfg: &PeerConfig, open: &Open) -> Result<Negotiated, OpenError> {
    let from = cfg.peer_addr;
    if open.version != 4 {
        return Err(open_error(
            code::OPEN_UNSUPPORTED_VERSION,
            4u16.to_be_bytes().to_vec(),
            format!(
                "OPEN from {from}: unsupported BGP version {}, margay speaks 4",
                open.version
            ),
        ));
    }
    let peer_four_octet = open
        .capabilities
        .iter()
        .any(|c| matches!(c, Capability::FourOctetAs(_)));
    let peer_as = open.asn();
    if peer_as != cfg.peer_as {
        return Err(open_error(
            code::OPEN_BAD_PEER_AS,
            Vec::new(),
            format!(
                "OPEN from {from}: bad peer AS {peer_as}, expected {}",
                cfg.peer_as
            ),
        ));
    }
    // RFC 6793 4.2: a 4-octet speaker whose AS fits in 2 octets must put it in the 2-octet field too.
    if peer_four_octet && peer_as <= 0xffff && u32::from(open.my_as) != peer_as {
        return Err(open_error(
            code::OPEN_BAD_PEER_AS,
            Vec::new(),
            format!(
                "OPEN from {from}: bad peer AS: 2-octet field says {} but the 4-octet AS capability says {peer_as}",
                open.my_as
            ),
        ));
    }
    // RFC 4271 6.2: 1 and 2 seconds are unacceptable.
    if open.hold_time == 1 || open.hold_time == 2 {
        return Err(open_error(
            code::OPEN_UNACCEPTABLE_HOLD_TIME,
            Vec::new(),
            format!(
                "OPEN from {from}: unsupported hold time {} s (must be 0 or at least 3)",
                open.hold_time
            ),
        ));
    }
    // RFC 6286 2.2: the identifier must be a non-zero value; we also refuse what cannot be a unicast
    // router id. Inside one AS it must differ from ours.
    let id = open.bgp_id;
    if id.is_unspecified() || id.is_multicast() || id.is_broadcast() {
        return Err(open_error(
            code::OPEN_BAD_BGP_ID,
            Vec::new(),
            format!("OPEN from {from}: bad BGP identifier {id}"),
        ));
    }
    if cfg.is_ibgp() && id == cfg.router_id {
        return Err(open_error(
            code::OPEN_BAD_BGP_ID,
            Vec::new(),
            format!("OPEN from {from}: bad BGP identifier {id}: it is our own router id (iBGP peers need distinct ids)"),
        ));
    }

    // RFC 4760 8: a speaker that announces no multiprotocol capability carries IPv4 unicast only.
    let mut peer_families: Vec<Family> = open
        .capabilities
        .iter()
        .filter_map(|c| match c {
            Capability::Multiprotocol(f) => Some(*f),
            _ => None,
        })
        .collect();
    if peer_families.is_empty() {
        peer_families.push(Family::IPV4_UNICAST);
    }
    let local_families = if cfg.families.is_empty() {
        vec![Family::IPV4_UNICAST]
    } else {
        cfg.families.clone()
    };
    let families: Vec<Family> = local_families
        .iter()
        .filter(|f| peer_families.contains(f))
        .copied()
        .collect();
    if families.is_empty() {
        // RFC 5492 3: Unsupported Capability, listing what we wanted.
        let mut data = Vec::new();
        for f in &local_families {
            data.extend_from_slice(&[1, 4]);
            data.extend_from_slice(&f.afi.code().to_be_bytes());
            data.extend_from_slice(&[0, f.safi.code()]);
        }
        return Err(open_error(
            code::OPEN_UNSUPPORTED_CAPABILITY,
            data,
            format!(
                "OPEN from {from}: no address family in common (we offer {}, the peer offers {})",
                families_text(&local_families),
                families_text(&peer_families)
            ),
        ));
    }

    let hold_time = cfg.timers.hold_time.min(open.hold_time);
    let keepalive = if hold_time == 0 {
        0
    } else {
        let third = (hold_time / 3).max(1);
        cfg.timers
            .keepalive
            .map(|k| k.clamp(1, third))
            .unwrap_or(third)
    };

    let peer_add_path: Vec<(Family, AddPathMode)> = open
        .capabilities
        .iter()
        .filter_map(|c| match c {
            Capability::AddPath(v) => Some(v.clone()),
            _ => None,
        })
        .flatten()
        .collect();
    let mode_of = |list: &[(Family, AddPathMode)], f: Family| {
        list.iter().find(|(g, _)| *g == f).map(|(_, m)| *m)
    };
    let can_send =
        |m: Option<AddPathMode>| matches!(m, Some(AddPathMode::Send | AddPathMode::Both));
    let can_recv =
        |m: Option<AddPathMode>| matches!(m, Some(AddPathMode::Receive | AddPathMode::Both));
    // RFC 7911 4: we receive path ids where we said Receive and the peer said Send, and vice versa.
    let add_path_rx = families
        .iter()
        .filter(|f| can_recv(mode_of(&cfg.add_path, **f)) && can_send(mode_of(&peer_add_path, **f)))
        .copied()
        .collect();
    let add_path_tx = families
        .iter()
        .filter(|f| can_send(mode_of(&cfg.add_path, **f)) && can_recv(mode_of(&peer_add_path, **f)))
        .copied()
        .collect();

    let peer_graceful_restart = open.capabilities.iter().find_map(|c| match c {
        Capability::GracefulRestart {
            restarting,
            notification,
            restart_time,
            families: gr_families,
        } => Some(PeerGracefulRestart {
            restart_time: *restart_time,
            restarting: *restarting,
            notification: *notification,
            families: gr_families
                .iter()
                .filter(|g| families.contains(&g.family))
                .copied()
                .collect(),
            long_lived: negotiate_long_lived(cfg, open, &families),
        }),
        _ => None,
    });

    Ok(Negotiated {
        peer_addr: from,
        local_as: cfg.local_as,
        peer_as,
        local_id: cfg.router_id,
        peer_id: id,
        hold_time,
        keepalive,
        four_octet_as: peer_four_octet,
        families,
        add_path_rx,
        add_path_tx,
        route_refresh: cfg.route_refresh && open.capabilities.contains(&Capability::RouteRefresh),
        extended_message: cfg.extended_message
            && open.capabilities.contains(&Capability::ExtendedMessage),
        peer_graceful_restart,
        local_graceful_restart: cfg.graceful_restart.is_some(),
        peer_open: open.clone(),
    })
}

/// "IPv4 unicast, IPv6 unicast" for messages.
pub fn families_text(families: &[Family]) -> String {
    families
        .iter()
        .map(|f| family_text(*f))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One family in words.
pub fn family_text(f: Family) -> String {
    use crate::bgp::wire::{Afi, Safi};
    let afi = match f.afi {
        Afi::Ipv4 => "IPv4".to_string(),
        Afi::Ipv6 => "IPv6".to_string(),
        Afi::Other(c) => format!("AFI {c}"),
    };
    let safi = match f.safi {
        Safi::Unicast => "unicast".to_string(),
        Safi::Other(c) => format!("SAFI {c}"),
    };
    format!("{afi} {safi}")
}

/// A NOTIFICATION in words (RFC 4271 4.5, RFC 4486, RFC 6608, RFC 7313), with the RFC 8203 shutdown
/// communication when the peer sent one.
pub fn notification_text(n: &Notification) -> String {
    let code_text = match n.code {
        code::MESSAGE_HEADER => "message header error",
        code::OPEN_MESSAGE => "OPEN message error",
        code::UPDATE_MESSAGE => "UPDATE message error",
        code::HOLD_TIMER_EXPIRED => "hold timer expired",
        code::FSM => "finite state machine error",
        code::CEASE => "cease",
        code::ROUTE_REFRESH => "ROUTE-REFRESH message error",
        _ => "unknown error code",
    };
    let sub = match (n.code, n.subcode) {
        (code::MESSAGE_HEADER, 1) => "connection not synchronized",
        (code::MESSAGE_HEADER, 2) => "bad message length",
        (code::MESSAGE_HEADER, 3) => "bad message type",
        (code::OPEN_MESSAGE, 1) => "unsupported version number",
        (code::OPEN_MESSAGE, 2) => "bad peer AS",
        (code::OPEN_MESSAGE, 3) => "bad BGP identifier",
        (code::OPEN_MESSAGE, 4) => "unsupported optional parameter",
        (code::OPEN_MESSAGE, 6) => "unacceptable hold time",
        (code::OPEN_MESSAGE, 7) => "unsupported capability",
        (code::OPEN_MESSAGE, 11) => "role mismatch",
        (code::UPDATE_MESSAGE, 1) => "malformed attribute list",
        (code::UPDATE_MESSAGE, 2) => "unrecognized well-known attribute",
        (code::UPDATE_MESSAGE, 3) => "missing well-known attribute",
        (code::UPDATE_MESSAGE, 4) => "attribute flags error",
        (code::UPDATE_MESSAGE, 5) => "attribute length error",
        (code::UPDATE_MESSAGE, 6) => "invalid ORIGIN attribute",
        (code::UPDATE_MESSAGE, 8) => "invalid NEXT_HOP attribute",
        (code::UPDATE_MESSAGE, 9) => "optional attribute error",
        (code::UPDATE_MESSAGE, 10) => "invalid network field",
        (code::UPDATE_MESSAGE, 11) => "malformed AS_PATH",
        (code::FSM, 1) => "unexpected message in OpenSent",
        (code::FSM, 2) => "unexpected message in OpenConfirm",
        (code::FSM, 3) => "unexpected message in Established",
        (code::CEASE, 1) => "maximum number of prefixes reached",
        (code::CEASE, 2) => "administrative shutdown",
        (code::CEASE, 3) => "peer de-configured",
        (code::CEASE, 4) => "administrative reset",
        (code::CEASE, 5) => "connection rejected",
        (code::CEASE, 6) => "other configuration change",
        (code::CEASE, 7) => "connection collision resolution",
        (code::CEASE, 8) => "out of resources",
        (code::CEASE, 9) => "hard reset",
        (code::CEASE, 10) => "BFD down",
        (code::ROUTE_REFRESH, 1) => "invalid message length",
        (_, 0) => "",
        _ => "unknown subcode",
    };
    let mut s = if sub.is_empty() {
        format!("{code_text} ({})", n.code)
    } else {
        format!("{code_text} / {sub} ({}/{})", n.code, n.subcode)
    };
    // RFC 8203: Cease 2 and 4 may carry a length-prefixed UTF-8 message.
    if n.code == code::CEASE && (n.subcode == 2 || n.subcode == 4) {
        if let Some((&len, rest)) = n.data.split_first() {
            if let Some(text) = rest
                .get(..usize::from(len))
                .and_then(|b| std::str::from_utf8(b).ok())
            {
                if !text.is_empty() {
                    s.push_str(&format!(": \"{text}\""));
                }
            }
        }
    }
    s
}
