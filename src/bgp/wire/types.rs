//! The BGP data model shared by the codec, the sessions and the RIB. Plain data: no I/O, no encoding logic.
//!
//! Every type here is what a message *means*; how it is laid out in bytes lives in the codec next to it.

use std::net::{IpAddr, Ipv4Addr};

use ipnetwork::IpNetwork;

/// Address family identifier (RFC 4760 section 3 / IANA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Afi {
    Ipv4,
    Ipv6,
    /// Any other AFI, kept so that capabilities we do not support can be carried and logged.
    Other(u16),
}

impl Afi {
    pub fn code(self) -> u16 {
        match self {
            Afi::Ipv4 => 1,
            Afi::Ipv6 => 2,
            Afi::Other(c) => c,
        }
    }
    pub fn from_code(c: u16) -> Afi {
        match c {
            1 => Afi::Ipv4,
            2 => Afi::Ipv6,
            c => Afi::Other(c),
        }
    }
}

/// Subsequent address family identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Safi {
    Unicast,
    Other(u8),
}

impl Safi {
    pub fn code(self) -> u8 {
        match self {
            Safi::Unicast => 1,
            Safi::Other(c) => c,
        }
    }
    pub fn from_code(c: u8) -> Safi {
        match c {
            1 => Safi::Unicast,
            c => Safi::Other(c),
        }
    }
}

/// An (AFI, SAFI) pair: the unit that capabilities, End-of-RIB and ADD-PATH are negotiated on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Family {
    pub afi: Afi,
    pub safi: Safi,
}

impl Family {
    pub const IPV4_UNICAST: Family = Family {
        afi: Afi::Ipv4,
        safi: Safi::Unicast,
    };
    pub const IPV6_UNICAST: Family = Family {
        afi: Afi::Ipv6,
        safi: Safi::Unicast,
    };
}

/// Operator words for logs and `margay status` INFO: "IPv4 unicast", or the codes for anything else.
impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.afi, self.safi) {
            (Afi::Ipv4, Safi::Unicast) => f.write_str("IPv4 unicast"),
            (Afi::Ipv6, Safi::Unicast) => f.write_str("IPv6 unicast"),
            (afi, safi) => write!(f, "AFI {} SAFI {}", afi.code(), safi.code()),
        }
    }
}

/// A prefix in an UPDATE, with its ADD-PATH path identifier when ADD-PATH receive/send is negotiated
/// for its family (RFC 7911). `path_id` is 0 when ADD-PATH is not in use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Nlri {
    pub prefix: IpNetwork,
    pub path_id: u32,
}

/// A whole BGP message (RFC 4271 section 4).
// UPDATE is the big variant and also by far the most common one: boxing it would add an allocation per
// message for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Open(Open),
    Update(Update),
    Notification(Notification),
    Keepalive,
    RouteRefresh(RouteRefresh),
}

/// OPEN (RFC 4271 4.2). `my_as` is the 2-octet field as sent (AS_TRANS 23456 for a 4-octet AS);
/// the real AS is in `Capability::FourOctetAs` when present: use `Open::asn()`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub version: u8,
    pub my_as: u16,
    pub hold_time: u16,
    pub bgp_id: Ipv4Addr,
    pub capabilities: Vec<Capability>,
}

impl Open {
    /// The speaker's AS: the 4-octet AS capability when present (RFC 6793 4.1), else the 2-octet field.
    pub fn asn(&self) -> u32 {
        self.capabilities
            .iter()
            .find_map(|c| match c {
                Capability::FourOctetAs(asn) => Some(*asn),
                _ => None,
            })
            .unwrap_or(self.my_as as u32)
    }
}

/// AS_TRANS, the 2-octet stand-in for a 4-octet AS (RFC 6793 section 9).
pub const AS_TRANS: u16 = 23456;

/// ADD-PATH send/receive mode for one family (RFC 7911 section 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddPathMode {
    Receive,
    Send,
    Both,
}

/// One address family entry of the graceful restart capability (RFC 4724 section 3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulRestartFamily {
    pub family: Family,
    /// "Forwarding State" bit: the sender kept its forwarding state for this family across the restart.
    pub forwarding_preserved: bool,
}

/// One address family entry of the long-lived graceful restart capability (RFC 9494 section 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LongLivedFamily {
    pub family: Family,
    /// The F bit (0x80 of the flags): the sender kept its forwarding state for this family.
    pub forwarding_preserved: bool,
    /// Long-Lived Stale Time in seconds (24 bits, 0..=16_777_215): how long a helper may keep the
    /// sender's routes of this family, marked LLGR_STALE, after the graceful-restart time.
    pub stale_time: u32,
}

/// The largest Long-Lived Stale Time the 24-bit field holds (RFC 9494 3.1).
pub const LLGR_MAX_STALE_TIME: u32 = 0x00ff_ffff;

/// Well-known community LLGR_STALE (65535:6, RFC 9494 3.2): the route is kept by a long-lived graceful
/// restart helper after its peer went away; least preferred (RFC 9494 4.3).
pub const LLGR_STALE: u32 = 0xffff_0006;
/// Well-known community NO_LLGR (65535:7, RFC 9494 3.3): drop the route instead of keeping it long-lived
/// stale.
pub const NO_LLGR: u32 = 0xffff_0007;

/// OPEN capabilities (RFC 5492) that margay understands; anything else is carried as `Unknown`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Capability {
    /// Code 1 (RFC 4760).
    Multiprotocol(Family),
    /// Code 2 (RFC 2918).
    RouteRefresh,
    /// Code 6 (RFC 8654).
    ExtendedMessage,
    /// Code 64 (RFC 4724). `restart_time` is 12 bits (seconds).
    GracefulRestart {
        restarting: bool,
        notification: bool,
        restart_time: u16,
        families: Vec<GracefulRestartFamily>,
    },
    /// Code 65 (RFC 6793).
    FourOctetAs(u32),
    /// Code 69 (RFC 7911).
    AddPath(Vec<(Family, AddPathMode)>),
    /// Code 71 (RFC 9494): long-lived graceful restart, one entry per family. Meaningful only next to
    /// `GracefulRestart` (RFC 9494 3.1: received alone it is ignored).
    LongLivedGracefulRestart(Vec<LongLivedFamily>),
    /// Code 5 (RFC 8950): NLRI family, next-hop AFI.
    ExtendedNextHop(Vec<(Family, Afi)>),
    /// Any other capability, kept byte for byte.
    Unknown { code: u8, data: Vec<u8> },
}

/// ORIGIN (RFC 4271 5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Origin {
    #[default]
    Igp,
    Egp,
    Incomplete,
}

/// One AS_PATH segment (RFC 4271 4.3). ASNs are always held as 4-octet values in memory.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AsSegment {
    Sequence(Vec<u32>),
    Set(Vec<u32>),
    ConfedSequence(Vec<u32>),
    ConfedSet(Vec<u32>),
}

/// AS_PATH as a list of segments. In memory it is always the real (merged) 4-octet path; AS4_PATH only
/// exists on the wire towards and from 2-octet speakers.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct AsPath {
    pub segments: Vec<AsSegment>,
}

impl AsPath {
    /// Path length for the decision process (RFC 4271 9.1.2.2 (a)): a SET counts as 1, confederation
    /// segments do not count (RFC 5065 5.3).
    pub fn len_for_decision(&self) -> usize {
        self.segments
            .iter()
            .map(|s| match s {
                AsSegment::Sequence(v) => v.len(),
                AsSegment::Set(_) => 1,
                AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_) => 0,
            })
            .sum()
    }

    /// The neighbouring AS (first AS of the first SEQUENCE), used for MED comparison (RFC 4271 9.1.2.2 (c)).
    pub fn neighbor_as(&self) -> Option<u32> {
        match self.segments.first() {
            Some(AsSegment::Sequence(v)) => v.first().copied(),
            _ => None,
        }
    }

    /// True when `asn` appears anywhere in the path (loop detection, RFC 4271 9.1.2).
    pub fn contains(&self, asn: u32) -> bool {
        self.segments.iter().any(|s| match s {
            AsSegment::Sequence(v)
            | AsSegment::Set(v)
            | AsSegment::ConfedSequence(v)
            | AsSegment::ConfedSet(v) => v.contains(&asn),
        })
    }

    /// Prepend `asn` as eBGP export does (RFC 4271 5.1.2).
    pub fn prepend(&mut self, asn: u32) {
        match self.segments.first_mut() {
            Some(AsSegment::Sequence(v)) if v.len() < 255 => v.insert(0, asn),
            _ => self.segments.insert(0, AsSegment::Sequence(vec![asn])),
        }
    }
}

/// AGGREGATOR (RFC 4271 5.1.7), ASN held as 4 octets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Aggregator {
    pub asn: u32,
    pub address: Ipv4Addr,
}

/// A large community (RFC 8092).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LargeCommunity {
    pub global_admin: u32,
    pub local_data1: u32,
    pub local_data2: u32,
}

/// A path attribute the codec does not interpret, carried through byte for byte (RFC 4271 5: unrecognised
/// optional transitive attributes are passed on with the Partial bit set).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RawAttribute {
    pub flags: u8,
    pub type_code: u8,
    pub value: Vec<u8>,
}

/// MP_REACH_NLRI (RFC 4760 section 3). `next_hop` holds one address, or a global + link-local pair for IPv6.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpReach {
    pub family: Family,
    pub next_hop: Vec<IpAddr>,
    pub nlri: Vec<Nlri>,
}

/// MP_UNREACH_NLRI (RFC 4760 section 4).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MpUnreach {
    pub family: Family,
    pub withdrawn: Vec<Nlri>,
}

/// The path attributes of one UPDATE. Well-known and understood attributes are typed; everything else is
/// in `unknown`, in the order received. `as_path` is the merged real path (AS4_PATH folded in on decode).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct PathAttributes {
    pub origin: Option<Origin>,
    pub as_path: Option<AsPath>,
    pub next_hop: Option<Ipv4Addr>,
    pub med: Option<u32>,
    pub local_pref: Option<u32>,
    pub atomic_aggregate: bool,
    pub aggregator: Option<Aggregator>,
    pub communities: Vec<u32>,
    pub large_communities: Vec<LargeCommunity>,
    pub originator_id: Option<Ipv4Addr>,
    pub cluster_list: Vec<Ipv4Addr>,
    pub mp_reach: Option<MpReach>,
    pub mp_unreach: Option<MpUnreach>,
    pub unknown: Vec<RawAttribute>,
}

/// UPDATE (RFC 4271 4.3). `withdrawn` and `nlri` are the IPv4 fields of the message body; other families
/// travel in `attributes.mp_reach` / `attributes.mp_unreach`. An UPDATE with nothing in it is the IPv4
/// End-of-RIB marker (RFC 4724 section 2); an MP_UNREACH with no prefixes is the marker for its family.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    pub withdrawn: Vec<Nlri>,
    pub attributes: PathAttributes,
    pub nlri: Vec<Nlri>,
}

impl Update {
    /// The family this UPDATE is an End-of-RIB marker for, if it is one (RFC 4724 section 2).
    pub fn end_of_rib(&self) -> Option<Family> {
        let a = &self.attributes;
        let only_unreach = a.origin.is_none()
            && a.as_path.is_none()
            && a.next_hop.is_none()
            && a.mp_reach.is_none()
            && a.unknown.is_empty();
        if self.withdrawn.is_empty() && self.nlri.is_empty() {
            match &a.mp_unreach {
                None if only_unreach => Some(Family::IPV4_UNICAST),
                Some(u) if u.withdrawn.is_empty() && only_unreach => Some(u.family),
                _ => None,
            }
        } else {
            None
        }
    }

    /// The End-of-RIB marker for `family`.
    pub fn end_of_rib_for(family: Family) -> Update {
        if family == Family::IPV4_UNICAST {
            Update::default()
        } else {
            Update {
                attributes: PathAttributes {
                    mp_unreach: Some(MpUnreach {
                        family,
                        withdrawn: Vec::new(),
                    }),
                    ..Default::default()
                },
                ..Default::default()
            }
        }
    }
}

/// NOTIFICATION (RFC 4271 4.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notification {
    pub code: u8,
    pub subcode: u8,
    pub data: Vec<u8>,
}

/// ROUTE-REFRESH (RFC 2918; the subtype byte is RFC 7313's, 0 for a plain refresh request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouteRefresh {
    pub family: Family,
    pub subtype: u8,
}
