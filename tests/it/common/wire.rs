//! proptest generators for BGP messages, shared by the wire property and differential tests. Every value
//! generated here is one the codec must round-trip exactly under the matching session context.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use margay::bgp::wire::*;
use proptest::collection::{btree_map, vec};
use proptest::option;
use proptest::prelude::*;

/// What the generated messages may use; mirrors a negotiated session.
#[derive(Debug, Clone)]
pub struct Cfg {
    pub four_octet_as: bool,
    pub add_path: BTreeSet<Family>,
    /// Unknown attribute type codes are drawn from this range (the differential test keeps clear of
    /// codes the other parser interprets).
    pub unknown_types: std::ops::RangeInclusive<u8>,
}

impl Cfg {
    pub fn decode_ctx(&self) -> DecodeCtx {
        DecodeCtx {
            four_octet_as: self.four_octet_as,
            add_path_rx: self.add_path.clone(),
            extended_message: true,
            ..Default::default()
        }
    }
    pub fn encode_ctx(&self) -> EncodeCtx {
        EncodeCtx {
            four_octet_as: self.four_octet_as,
            add_path_tx: self.add_path.clone(),
            extended_message: true,
        }
    }
}

/// Session configurations worth covering.
pub fn cfg() -> impl Strategy<Value = Cfg> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(four, ap4, ap6)| {
        let mut add_path = BTreeSet::new();
        if ap4 {
            add_path.insert(Family::IPV4_UNICAST);
        }
        if ap6 {
            add_path.insert(Family::IPV6_UNICAST);
        }
        Cfg {
            four_octet_as: four,
            add_path,
            unknown_types: 0..=255,
        }
    })
}

fn known_attribute(t: u8) -> bool {
    matches!(t, 1..=10 | 14 | 15 | 17 | 18 | 32)
}

pub fn v4_prefix() -> impl Strategy<Value = IpNetwork> {
    (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
        let mask = if l == 0 {
            0
        } else {
            u32::MAX << (32 - l as u32)
        };
        IpNetwork::V4(Ipv4Network::new(Ipv4Addr::from(a & mask), l).expect("length <= 32"))
    })
}

pub fn v6_prefix() -> impl Strategy<Value = IpNetwork> {
    (any::<u128>(), 0u8..=128).prop_map(|(a, l)| {
        let mask = if l == 0 {
            0
        } else {
            u128::MAX << (128 - l as u32)
        };
        IpNetwork::V6(Ipv6Network::new(Ipv6Addr::from(a & mask), l).expect("length <= 128"))
    })
}

pub fn nlri(family: Family, cfg: &Cfg) -> BoxedStrategy<Nlri> {
    let prefix = if family.afi == Afi::Ipv4 {
        v4_prefix().boxed()
    } else {
        v6_prefix().boxed()
    };
    let path_id = if cfg.add_path.contains(&family) {
        any::<u32>().boxed()
    } else {
        Just(0).boxed()
    };
    (prefix, path_id)
        .prop_map(|(prefix, path_id)| Nlri { prefix, path_id })
        .boxed()
}

pub fn nlris(family: Family, cfg: &Cfg, max: usize) -> BoxedStrategy<Vec<Nlri>> {
    vec(nlri(family, cfg), 0..max).boxed()
}

pub fn asn() -> impl Strategy<Value = u32> {
    prop_oneof![3 => 1u32..65536, 1 => any::<u32>(), 1 => Just(AS_TRANS as u32)]
}

/// An AS_PATH. Towards a 2-octet peer confederation segments only lead the path (RFC 5065 5: they are
/// prepended inside the confederation), which is the only shape that survives the AS4_PATH round trip.
pub fn as_path(cfg: &Cfg) -> BoxedStrategy<AsPath> {
    let four = cfg.four_octet_as;
    vec((0u8..4, vec(asn(), 1..12)), 0..5)
        .prop_map(move |segs| {
            let mut segments: Vec<AsSegment> = segs
                .into_iter()
                .map(|(t, v)| match t {
                    0 => AsSegment::Sequence(v),
                    1 => AsSegment::Set(v),
                    2 => AsSegment::ConfedSequence(v),
                    _ => AsSegment::ConfedSet(v),
                })
                .collect();
            if !four {
                // Confederation members are 2-octet ASes in a 2-octet world: they have no AS4_PATH
                // counterpart (RFC 6793 3) and cannot be carried otherwise.
                for s in &mut segments {
                    if let AsSegment::ConfedSequence(v) | AsSegment::ConfedSet(v) = s {
                        v.iter_mut().for_each(|a| *a &= 0xffff);
                    }
                }
                segments.sort_by_key(|s| {
                    !matches!(s, AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_))
                });
            }
            AsPath { segments }
        })
        .boxed()
}

fn v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    any::<u32>().prop_map(Ipv4Addr::from)
}

/// An address a NEXT_HOP may carry (RFC 4271 6.3): outside 0/8 and 224/3.
fn host_v4_addr() -> impl Strategy<Value = Ipv4Addr> {
    (0x0100_0000u32..0xe000_0000).prop_map(Ipv4Addr::from)
}

fn v6_addr() -> impl Strategy<Value = Ipv6Addr> {
    any::<u128>().prop_map(Ipv6Addr::from)
}

pub fn mp_reach(cfg: &Cfg) -> BoxedStrategy<MpReach> {
    let v4 = Family::IPV4_UNICAST;
    let v6 = Family::IPV6_UNICAST;
    prop_oneof![
        (v4_addr(), nlris(v4, cfg, 12)).prop_map(move |(nh, nlri)| MpReach {
            family: v4,
            next_hop: vec![IpAddr::V4(nh)],
            nlri
        }),
        (v6_addr(), option::of(v6_addr()), nlris(v6, cfg, 12)).prop_map(move |(nh, ll, nlri)| {
            let mut next_hop = vec![IpAddr::V6(nh)];
            next_hop.extend(ll.map(IpAddr::V6));
            MpReach {
                family: v6,
                next_hop,
                nlri,
            }
        }),
        // RFC 8950: IPv4 routes with an IPv6 next hop.
        (v6_addr(), nlris(v4, cfg, 12)).prop_map(move |(nh, nlri)| MpReach {
            family: v4,
            next_hop: vec![IpAddr::V6(nh)],
            nlri
        }),
    ]
    .boxed()
}

pub fn mp_unreach(cfg: &Cfg) -> BoxedStrategy<MpUnreach> {
    let v4 = Family::IPV4_UNICAST;
    let v6 = Family::IPV6_UNICAST;
    prop_oneof![
        nlris(v4, cfg, 12).prop_map(move |withdrawn| MpUnreach {
            family: v4,
            withdrawn
        }),
        nlris(v6, cfg, 12).prop_map(move |withdrawn| MpUnreach {
            family: v6,
            withdrawn
        }),
    ]
    .boxed()
}

fn origin() -> impl Strategy<Value = Origin> {
    prop_oneof![
        Just(Origin::Igp),
        Just(Origin::Egp),
        Just(Origin::Incomplete)
    ]
}

/// Unknown optional transitive attributes, already carrying the Partial bit (the codec sets it on
/// re-encode), at most one per type, in type order as they come off the wire.
pub fn unknown_attrs(cfg: &Cfg) -> BoxedStrategy<Vec<RawAttribute>> {
    let types = cfg.unknown_types.clone();
    btree_map(
        types.prop_filter("not a known attribute", |t| !known_attribute(*t)),
        vec(any::<u8>(), 0..300),
        0..3,
    )
    .prop_map(|m| {
        m.into_iter()
            .map(|(type_code, value)| RawAttribute {
                flags: 0xe0,
                type_code,
                value,
            })
            .collect()
    })
    .boxed()
}

pub fn update(cfg: &Cfg) -> BoxedStrategy<Update> {
    let v4 = Family::IPV4_UNICAST;
    let base = (
        option::of(origin()),
        option::of(as_path(cfg)),
        option::of(host_v4_addr()),
        option::of(any::<u32>()),
        option::of(any::<u32>()),
        any::<bool>(),
        option::of((asn(), v4_addr()).prop_map(|(asn, address)| Aggregator { asn, address })),
        vec(any::<u32>(), 0..5),
        option::of(v4_addr()),
        vec(v4_addr(), 0..4),
        vec(
            (any::<u32>(), any::<u32>(), any::<u32>()).prop_map(|(g, a, b)| LargeCommunity {
                global_admin: g,
                local_data1: a,
                local_data2: b,
            }),
            0..3,
        ),
        unknown_attrs(cfg),
    );
    (
        nlris(v4, cfg, 20),
        nlris(v4, cfg, 20),
        option::of(mp_reach(cfg)),
        option::of(mp_unreach(cfg)),
        base,
    )
        .prop_map(|(withdrawn, nlri, mp_reach, mp_unreach, b)| {
            let (
                origin,
                as_path,
                next_hop,
                med,
                local_pref,
                atomic_aggregate,
                aggregator,
                communities,
                originator_id,
                cluster_list,
                large_communities,
                unknown,
            ) = b;
            let mut a = PathAttributes {
                origin,
                as_path,
                next_hop,
                med,
                local_pref,
                atomic_aggregate,
                aggregator,
                communities,
                large_communities,
                originator_id,
                cluster_list,
                mp_reach,
                mp_unreach,
                unknown,
            };
            // Announcements carry the mandatory attributes (else the decoder rightly withdraws them).
            let announces =
                !nlri.is_empty() || a.mp_reach.as_ref().is_some_and(|r| !r.nlri.is_empty());
            if announces {
                a.origin.get_or_insert(Origin::Igp);
                a.as_path.get_or_insert_with(AsPath::default);
                if !nlri.is_empty() {
                    a.next_hop.get_or_insert(Ipv4Addr::new(192, 0, 2, 1));
                }
            }
            Update {
                withdrawn,
                attributes: a,
                nlri,
            }
        })
        .boxed()
}

fn family_any() -> impl Strategy<Value = Family> {
    (any::<u16>(), any::<u8>()).prop_map(|(a, s)| Family {
        afi: Afi::from_code(a),
        safi: Safi::from_code(s),
    })
}

pub fn capability() -> impl Strategy<Value = Capability> {
    let mode = prop_oneof![
        Just(AddPathMode::Receive),
        Just(AddPathMode::Send),
        Just(AddPathMode::Both)
    ];
    prop_oneof![
        family_any().prop_map(Capability::Multiprotocol),
        Just(Capability::RouteRefresh),
        Just(Capability::ExtendedMessage),
        any::<u32>().prop_map(Capability::FourOctetAs),
        (
            any::<bool>(),
            any::<bool>(),
            0u16..4096,
            vec((family_any(), any::<bool>()), 0..4)
        )
            .prop_map(|(restarting, notification, restart_time, f)| {
                Capability::GracefulRestart {
                    restarting,
                    notification,
                    restart_time,
                    families: f
                        .into_iter()
                        .map(|(family, forwarding_preserved)| GracefulRestartFamily {
                            family,
                            forwarding_preserved,
                        })
                        .collect(),
                }
            }),
        vec((family_any(), mode), 0..4).prop_map(Capability::AddPath),
        vec((family_any(), any::<u16>().prop_map(Afi::from_code)), 0..3)
            .prop_map(Capability::ExtendedNextHop),
        vec((family_any(), any::<bool>(), 0u32..=0x00ff_ffff), 0..4).prop_map(|v| {
            Capability::LongLivedGracefulRestart(
                v.into_iter()
                    .map(
                        |(family, forwarding_preserved, stale_time)| LongLivedFamily {
                            family,
                            forwarding_preserved,
                            stale_time,
                        },
                    )
                    .collect(),
            )
        }),
        (
            any::<u8>().prop_filter("unknown code", |c| !matches!(
                c,
                1 | 2 | 5 | 6 | 64 | 65 | 69 | 71
            )),
            vec(any::<u8>(), 0..40)
        )
            .prop_map(|(code, data)| Capability::Unknown { code, data }),
    ]
}

pub fn open() -> impl Strategy<Value = Open> {
    (
        any::<u16>(),
        any::<u16>().prop_filter("hold time 1 and 2 are illegal", |h| *h != 1 && *h != 2),
        1u32..,
        vec(capability(), 0..10),
    )
        .prop_map(|(my_as, hold_time, id, capabilities)| Open {
            version: 4,
            my_as,
            hold_time,
            bgp_id: Ipv4Addr::from(id),
            capabilities,
        })
}

pub fn message(cfg: &Cfg) -> BoxedStrategy<Message> {
    prop_oneof![
        2 => open().prop_map(Message::Open),
        6 => update(cfg).prop_map(Message::Update),
        1 => (any::<u8>(), any::<u8>(), vec(any::<u8>(), 0..40))
            .prop_map(|(code, subcode, data)| Message::Notification(Notification { code, subcode, data })),
        1 => Just(Message::Keepalive),
        1 => (family_any(), any::<u8>()).prop_map(|(family, subtype)| Message::RouteRefresh(RouteRefresh { family, subtype })),
    ]
    .boxed()
}
