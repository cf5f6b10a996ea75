//! Byte vectors both ways for every BGP message, capability and path attribute the codec knows, and the
//! RFC 7606 / RFC 4271 6.x outcome of each kind of malformed input. The bytes are written out by hand
//! from the RFC layouts, so a change in the codec's output is caught here.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::BytesMut;
use margay::bgp::wire::*;

/// A whole message: marker, length, type, then the body given as hex (spaces ignored).
fn msg(t: u8, body: &str) -> Vec<u8> {
    let body = hex::decode(body.replace([' ', '\n'], "")).expect("test vector is valid hex");
    let mut v = vec![0xff; 16];
    v.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    v.push(t);
    v.extend(body);
    v
}

fn enc(m: &Message, ctx: &EncodeCtx) -> Vec<u8> {
    let mut out = BytesMut::new();
    encode(m, ctx, &mut out).expect("encodes");
    out.to_vec()
}

fn four() -> (DecodeCtx, EncodeCtx) {
    (
        DecodeCtx {
            four_octet_as: true,
            ..Default::default()
        },
        EncodeCtx {
            four_octet_as: true,
            ..Default::default()
        },
    )
}

/// Check both directions: `bytes` decodes to `m`, and `m` encodes to `bytes`.
fn both_ways(bytes: &[u8], m: &Message, d: &DecodeCtx, e: &EncodeCtx) {
    assert_eq!(
        &decode(bytes, d).expect("decodes"),
        m,
        "decode of {}",
        hex::encode(bytes)
    );
    assert_eq!(
        hex::encode(enc(m, e)),
        hex::encode(bytes),
        "encode of {m:?}"
    );
}

fn n(s: &str) -> Nlri {
    Nlri {
        prefix: s.parse().expect("prefix"),
        path_id: 0,
    }
}

fn seq(v: &[u32]) -> AsSegment {
    AsSegment::Sequence(v.to_vec())
}

#[test]
fn keepalive() {
    both_ways(
        &msg(4, ""),
        &Message::Keepalive,
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
}

#[test]
fn notification() {
    let m = Message::Notification(Notification {
        code: 6,
        subcode: 2,
        data: vec![0xab],
    });
    both_ways(
        &msg(3, "06 02 ab"),
        &m,
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
}

#[test]
fn route_refresh() {
    let m = Message::RouteRefresh(RouteRefresh {
        family: Family::IPV6_UNICAST,
        subtype: 0,
    });
    both_ways(
        &msg(5, "0002 00 01"),
        &m,
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
}

fn full_open() -> Open {
    Open {
        version: 4,
        my_as: 65001,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::Multiprotocol(Family::IPV6_UNICAST),
            Capability::RouteRefresh,
            Capability::FourOctetAs(65001),
            Capability::GracefulRestart {
                restarting: true,
                notification: false,
                restart_time: 120,
                families: vec![GracefulRestartFamily {
                    family: Family::IPV4_UNICAST,
                    forwarding_preserved: true,
                }],
            },
            Capability::AddPath(vec![(Family::IPV4_UNICAST, AddPathMode::Receive)]),
            Capability::ExtendedMessage,
        ],
    }
}

#[test]
fn open_with_every_capability() {
    let bytes = msg(
        1,
        "04 fde9 005a 0a000001 26 02 24
         01 04 0001 00 01
         01 04 0002 00 01
         02 00
         41 04 0000fde9
         40 06 8078 0001 01 80
         45 04 0001 01 01
         06 00",
    );
    both_ways(
        &bytes,
        &Message::Open(full_open()),
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
}

#[test]
fn open_more_capabilities_and_4_octet_asn() {
    let o = Open {
        version: 4,
        my_as: AS_TRANS,
        hold_time: 0,
        bgp_id: Ipv4Addr::new(192, 0, 2, 1),
        capabilities: vec![
            Capability::FourOctetAs(4_200_000_000),
            Capability::GracefulRestart {
                restarting: false,
                notification: true,
                restart_time: 4095,
                families: vec![],
            },
            Capability::AddPath(vec![
                (Family::IPV4_UNICAST, AddPathMode::Both),
                (Family::IPV6_UNICAST, AddPathMode::Send),
            ]),
            Capability::ExtendedNextHop(vec![(Family::IPV4_UNICAST, Afi::Ipv6)]),
            Capability::Unknown {
                code: 73,
                data: b"rtr1".to_vec(),
            },
        ],
    };
    let bytes = msg(
        1,
        "04 5ba0 0000 c0000201 24 02 22
         41 04 fa56ea00
         40 02 4fff
         45 08 0001 01 03 0002 01 02
         05 06 0001 0001 0002
         49 04 72747231",
    );
    both_ways(
        &bytes,
        &Message::Open(o.clone()),
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
    assert_eq!(o.asn(), 4_200_000_000);
}

#[test]
fn open_capabilities_in_separate_parameters_and_extended_parameters() {
    // Several optional parameters with one capability each (as many speakers send them).
    let bytes = msg(
        1,
        "04 fde9 005a 0a000001 0c 02 02 02 00 02 06 41 04 0000fde9",
    );
    let Message::Open(o) = decode(&bytes, &DecodeCtx::default()).expect("decodes") else {
        panic!("not OPEN")
    };
    assert_eq!(
        o.capabilities,
        vec![Capability::RouteRefresh, Capability::FourOctetAs(65001)]
    );
    // RFC 9072 extended optional parameters: 255, 255, 2-octet length, 3-octet parameter header.
    let bytes = msg(1, "04 fde9 005a 0a000001 ff ff 0005 02 0002 02 00");
    let Message::Open(o) = decode(&bytes, &DecodeCtx::default()).expect("decodes") else {
        panic!("not OPEN")
    };
    assert_eq!(o.capabilities, vec![Capability::RouteRefresh]);
    // And we produce that format when the capabilities exceed 255 octets.
    let mut big = full_open();
    big.capabilities.push(Capability::Unknown {
        code: 200,
        data: vec![7; 250],
    });
    let bytes = enc(&Message::Open(big.clone()), &EncodeCtx::default());
    assert_eq!(&bytes[28..30], &[0xff, 0xff]);
    assert_eq!(
        decode(&bytes, &DecodeCtx::default()).expect("decodes"),
        Message::Open(big)
    );
}

#[test]
fn open_errors_map_to_rfc4271_6_2() {
    type Notif = (u8, u8, Vec<u8>);
    let cases: &[(&str, Notif)] = &[
        ("03 fde9 005a 0a000001 00", (2, 1, vec![0, 4])),
        ("04 fde9 0002 0a000001 00", (2, 6, vec![])),
        ("04 fde9 005a 00000000 00", (2, 3, vec![])),
        ("04 fde9 005a 0a000001 03 01 01 00", (2, 4, vec![])),
        ("04 fde9 005a 0a000001 05 02 02 00", (2, 0, vec![])),
        ("04 fde9 005a 0a000001 04 02 02 41 02", (2, 0, vec![])),
    ];
    for (body, want) in cases {
        let e = decode(&msg(1, body), &DecodeCtx::default()).expect_err(body);
        assert_eq!(&e.notification(), want, "{body}: {e}");
        assert_eq!(e.action(), Rfc7606Action::SessionReset);
    }
}

#[test]
fn header_errors_map_to_rfc4271_6_1() {
    let mut bad_marker = msg(4, "");
    bad_marker[3] = 0;
    assert_eq!(
        peek_len(&bad_marker)
            .expect_err("bad marker")
            .notification(),
        (1, 1, vec![])
    );
    let e = peek_len(&msg(4, "00")).expect_err("keepalive too long");
    assert_eq!(e.notification(), (1, 2, vec![0, 20]));
    let e = peek_len(&msg(9, "")).expect_err("bad type");
    assert_eq!(e.notification(), (1, 3, vec![9]));
    // A 5000-byte UPDATE is fine in general but not before extended messages are negotiated.
    let big = msg(2, &"00".repeat(5000 - 19));
    assert_eq!(peek_len(&big).expect("legal size"), Some(5000));
    let e = DecodeCtx::default().peek_len(&big).expect_err("too long");
    assert_eq!(e.notification(), (1, 2, 5000u16.to_be_bytes().to_vec()));
    let ext = DecodeCtx {
        extended_message: true,
        ..Default::default()
    };
    assert_eq!(ext.peek_len(&big).expect("extended"), Some(5000));
    // OPEN stays limited to 4096 even with extended messages (RFC 8654 4).
    let big_open = msg(1, &"00".repeat(5000 - 19));
    assert!(ext.peek_len(&big_open).is_err());
    assert_eq!(peek_len(&msg(4, "")[..18]).expect("short"), None);
    // ROUTE-REFRESH of the wrong length has its own code (RFC 7313 5).
    assert_eq!(
        peek_len(&msg(5, "0001 00 01 00"))
            .expect_err("rr")
            .notification()
            .0,
        7
    );
    // A buffer holding more or less than the message is refused by decode.
    let mut two = msg(4, "");
    two.extend(msg(4, ""));
    assert!(matches!(
        decode(&two, &DecodeCtx::default()),
        Err(DecodeError::LengthMismatch { .. })
    ));
}

#[test]
fn decode_from_frames_a_stream() {
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&msg(4, ""));
    buf.extend_from_slice(&msg(3, "06 02")[..10]);
    let ctx = DecodeCtx::default();
    let d = decode_from(&mut buf, &ctx)
        .expect("ok")
        .expect("one message");
    assert_eq!(d.message, Message::Keepalive);
    assert!(decode_from(&mut buf, &ctx).expect("ok").is_none());
    buf.extend_from_slice(&msg(3, "06 02")[10..]);
    let d = decode_from(&mut buf, &ctx)
        .expect("ok")
        .expect("second message");
    assert!(matches!(d.message, Message::Notification(_)));
    assert!(buf.is_empty());
}

fn basic_update() -> Update {
    Update {
        withdrawn: vec![n("10.2.0.0/16")],
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath {
                segments: vec![seq(&[65001, 65002])],
            }),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            med: Some(100),
            local_pref: Some(200),
            communities: vec![0xfde9_0001],
            ..Default::default()
        },
        nlri: vec![n("10.1.0.0/16"), n("192.168.1.0/24")],
    }
}

const BASIC_ATTRS: &str = "40 01 01 00
     40 02 0a 02 02 0000fde9 0000fdea
     40 03 04 0a000001
     80 04 04 00000064
     40 05 04 000000c8
     c0 08 04 fde90001";

#[test]
fn update_ipv4_basic_attributes() {
    let (d, e) = four();
    let bytes = msg(
        2,
        &format!("0003 10 0a02 002d {BASIC_ATTRS} 10 0a01 18 c0a801"),
    );
    both_ways(&bytes, &Message::Update(basic_update()), &d, &e);
}

#[test]
fn update_ipv6_mp_reach_with_link_local_and_mp_unreach() {
    let (d, e) = four();
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Egp),
            as_path: Some(AsPath {
                segments: vec![seq(&[65001])],
            }),
            mp_reach: Some(MpReach {
                family: Family::IPV6_UNICAST,
                next_hop: vec![
                    IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().expect("addr")),
                    IpAddr::V6("fe80::1".parse::<Ipv6Addr>().expect("addr")),
                ],
                nlri: vec![n("2001:db8:1::/48")],
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let bytes = msg(
        2,
        "0000 003c
         80 0e 2c 0002 01 20 20010db8000000000000000000000001 fe800000000000000000000000000001 00 30 20010db80001
         40 01 01 01
         40 02 06 02 01 0000fde9",
    );
    both_ways(&bytes, &Message::Update(u), &d, &e);

    let w = Update {
        attributes: PathAttributes {
            mp_unreach: Some(MpUnreach {
                family: Family::IPV6_UNICAST,
                withdrawn: vec![n("2001:db8:2::/64"), n("::/0")],
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let bytes = msg(2, "0000 0010 80 0f 0d 0002 01 40 20010db800020000 00");
    both_ways(&bytes, &Message::Update(w), &d, &e);
}

#[test]
fn update_ipv4_with_ipv6_next_hop_rfc8950() {
    let (d, e) = four();
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            mp_reach: Some(MpReach {
                family: Family::IPV4_UNICAST,
                next_hop: vec![IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().expect("addr"))],
                nlri: vec![n("10.0.0.0/8")],
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let bytes = msg(
        2,
        "0000 0021 80 0e 17 0001 01 10 20010db8000000000000000000000001 00 08 0a
         40 01 01 00 40 02 00",
    );
    both_ways(&bytes, &Message::Update(u), &d, &e);
}

#[test]
fn update_remaining_attributes_and_unknown_ones() {
    let (d, e) = four();
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Incomplete),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            atomic_aggregate: true,
            aggregator: Some(Aggregator {
                asn: 65001,
                address: Ipv4Addr::new(10, 0, 0, 1),
            }),
            originator_id: Some(Ipv4Addr::new(10, 0, 0, 2)),
            cluster_list: vec![Ipv4Addr::new(10, 0, 0, 3), Ipv4Addr::new(10, 0, 0, 4)],
            large_communities: vec![LargeCommunity {
                global_admin: 65001,
                local_data1: 1,
                local_data2: 2,
            }],
            unknown: vec![
                RawAttribute {
                    flags: 0xc0,
                    type_code: 16,
                    value: hex::decode("0002fde900000001").expect("hex"),
                },
                RawAttribute {
                    flags: 0xc0,
                    type_code: 99,
                    value: vec![1, 2],
                },
            ],
            ..Default::default()
        },
        nlri: vec![n("10.0.0.0/8")],
        ..Default::default()
    };
    let received = msg(
        2,
        "0000 0051
         40 01 01 02
         40 02 00
         40 03 04 0a000001
         40 06 00
         c0 07 08 0000fde9 0a000001
         80 09 04 0a000002
         80 0a 08 0a000003 0a000004
         c0 10 08 0002fde900000001
         80 62 01 ff
         c0 20 0c 0000fde9 00000001 00000002
         c0 63 02 0102
         08 0a",
    );
    // The optional non-transitive unknown attribute (98) is dropped (RFC 4271 9).
    assert_eq!(
        decode(&received, &d).expect("decodes"),
        Message::Update(u.clone())
    );
    // Re-encoded, unknown transitive attributes carry the Partial bit (RFC 4271 5).
    let sent = msg(
        2,
        "0000 004d
         40 01 01 02
         40 02 00
         40 03 04 0a000001
         40 06 00
         c0 07 08 0000fde9 0a000001
         80 09 04 0a000002
         80 0a 08 0a000003 0a000004
         e0 10 08 0002fde900000001
         c0 20 0c 0000fde9 00000001 00000002
         e0 63 02 0102
         08 0a",
    );
    assert_eq!(
        hex::encode(enc(&Message::Update(u.clone()), &e)),
        hex::encode(&sent)
    );
    let mut partial = u;
    partial
        .attributes
        .unknown
        .iter_mut()
        .for_each(|r| r.flags |= 0x20);
    assert_eq!(
        decode(&sent, &d).expect("decodes"),
        Message::Update(partial)
    );
}

#[test]
fn extended_length_attribute_both_ways() {
    let (d, e) = four();
    let communities: Vec<u32> = (0..100).collect();
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            communities: communities.clone(),
            ..Default::default()
        },
        nlri: vec![n("10.0.0.0/8")],
        ..Default::default()
    };
    let comm_hex: String = communities.iter().map(|c| format!("{c:08x}")).collect();
    let bytes = msg(
        2,
        &format!("0000 01a2 40 01 01 00 40 02 00 40 03 04 0a000001 d0 08 0190 {comm_hex} 08 0a"),
    );
    both_ways(&bytes, &Message::Update(u), &d, &e);
}

#[test]
fn update_to_and_from_2_octet_peer_rfc6793() {
    let d = DecodeCtx::default();
    let e = EncodeCtx::default();
    let big = 4_200_000_000u32; // fa56ea00
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath {
                segments: vec![seq(&[100, big])],
            }),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            aggregator: Some(Aggregator {
                asn: big,
                address: Ipv4Addr::new(10, 0, 0, 9),
            }),
            ..Default::default()
        },
        nlri: vec![n("10.0.0.0/8")],
        ..Default::default()
    };
    let bytes = msg(
        2,
        "0000 0035
         40 01 01 00
         40 02 06 02 02 0064 5ba0
         40 03 04 0a000001
         c0 07 06 5ba0 0a000009
         c0 11 0a 02 02 00000064 fa56ea00
         c0 12 08 fa56ea00 0a000009
         08 0a",
    );
    both_ways(&bytes, &Message::Update(u.clone()), &d, &e);
    // A 2-octet speaker that added its own AS after the 4-octet part: AS4_PATH holds only the tail.
    let bytes = msg(
        2,
        "0000 0033
         40 01 01 00
         40 02 08 02 03 00c8 0064 5ba0
         40 03 04 0a000001
         c0 07 06 5ba0 0a000009
         c0 11 06 02 01 fa56ea00
         c0 12 08 fa56ea00 0a000009
         08 0a",
    );
    let Message::Update(got) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(
        got.attributes.as_path,
        Some(AsPath {
            segments: vec![seq(&[200, 100, big])]
        })
    );
    assert_eq!(got.attributes.aggregator, u.attributes.aggregator);
    // AS4_PATH longer than AS_PATH is ignored (RFC 6793 4.2.3).
    let bytes = msg(
        2,
        "0000 001f 40 01 01 00 40 02 04 02 01 5ba0 40 03 04 0a000001 c0 11 0a 02 02 00000064 fa56ea00 08 0a",
    );
    let Message::Update(got) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(
        got.attributes.as_path,
        Some(AsPath {
            segments: vec![seq(&[AS_TRANS as u32])]
        })
    );
    // An AGGREGATOR that is not AS_TRANS means an old speaker aggregated: both AS4 attributes are stale.
    let bytes = msg(
        2,
        "0000 0031
         40 01 01 00
         40 02 06 02 02 0064 5ba0
         40 03 04 0a000001
         c0 07 06 012c 0a000009
         c0 11 06 02 01 fa56ea00
         c0 12 08 fa56ea00 0a000009
         08 0a",
    );
    let Message::Update(got) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(
        got.attributes.as_path,
        Some(AsPath {
            segments: vec![seq(&[100, AS_TRANS as u32])]
        })
    );
    assert_eq!(got.attributes.aggregator.map(|a| a.asn), Some(300));
    // From a 4-octet peer, AS4_PATH is ignored (RFC 6793 4.1).
    let (d4, _) = four();
    let bytes = msg(
        2,
        "0000 001d 40 01 01 00 40 02 06 02 01 00000064 40 03 04 0a000001 c0 11 06 02 01 fa56ea00 08 0a",
    );
    let Message::Update(got) = decode(&bytes, &d4).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(
        got.attributes.as_path,
        Some(AsPath {
            segments: vec![seq(&[100])]
        })
    );
}

#[test]
fn add_path_ids_where_negotiated() {
    let v4: BTreeSet<Family> = [Family::IPV4_UNICAST].into();
    let d = DecodeCtx {
        four_octet_as: true,
        add_path_rx: v4.clone(),
        ..Default::default()
    };
    let e = EncodeCtx {
        four_octet_as: true,
        add_path_tx: v4,
        ..Default::default()
    };
    let mut u = Update {
        withdrawn: vec![Nlri {
            prefix: "10.9.0.0/16".parse().expect("p"),
            path_id: 7,
        }],
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
            ..Default::default()
        },
        nlri: vec![
            Nlri {
                prefix: "10.1.0.0/16".parse().expect("p"),
                path_id: 1,
            },
            Nlri {
                prefix: "10.1.0.0/16".parse().expect("p"),
                path_id: 2,
            },
        ],
    };
    let bytes = msg(
        2,
        "0007 00000007 10 0a09 000e 40 01 01 00 40 02 00 40 03 04 0a000001 00000001 10 0a01 00000002 10 0a01",
    );
    both_ways(&bytes, &Message::Update(u.clone()), &d, &e);
    // Without ADD-PATH for the family, path ids are neither read nor written.
    u.withdrawn[0].path_id = 0;
    u.nlri.truncate(1);
    u.nlri[0].path_id = 0;
    let bytes = msg(
        2,
        "0003 10 0a09 000e 40 01 01 00 40 02 00 40 03 04 0a000001 10 0a01",
    );
    both_ways(&bytes, &Message::Update(u), &four().0, &four().1);
}

#[test]
fn end_of_rib_markers() {
    let (d, e) = four();
    both_ways(
        &msg(2, "0000 0000"),
        &Message::Update(Update::end_of_rib_for(Family::IPV4_UNICAST)),
        &d,
        &e,
    );
    let bytes = msg(2, "0000 0006 80 0f 03 0002 01");
    both_ways(
        &bytes,
        &Message::Update(Update::end_of_rib_for(Family::IPV6_UNICAST)),
        &d,
        &e,
    );
    let Message::Update(u) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(u.end_of_rib(), Some(Family::IPV6_UNICAST));
}

#[test]
fn host_bits_are_cleared() {
    let (d, _) = four();
    // 10.1.255.0/16 on the wire with a stray third octet is still 10.1.0.0/16; /20 keeps only 4 bits.
    let bytes = msg(
        2,
        "0000 000e 40 01 01 00 40 02 00 40 03 04 0a000001 14 0a01ff",
    );
    let Message::Update(u) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    assert_eq!(u.nlri, vec![n("10.1.240.0/20")]);
}

/// Decode `body` as an UPDATE from a 4-octet peer and return the error.
fn update_err(body: &str) -> DecodeError {
    decode(&msg(2, body), &four().0).expect_err(body)
}

const OK_ATTRS: &str = "40 01 01 00 40 02 00 40 03 04 0a000001"; // 14 octets

#[test]
fn rfc7606_treat_as_withdraw_lists_every_prefix() {
    // ORIGIN value 5: treat-as-withdraw (7.1); the withdrawn route, the IPv4 NLRI and the MP prefixes
    // all come back for withdrawal.
    let e = update_err(
        "0003 10 0a09 001b
         80 0f 0a 0002 01 30 20010db80009
         40 01 01 05 40 02 00 40 03 04 0a000001
         10 0a01 18 0a0201",
    );
    assert_eq!(e.action(), Rfc7606Action::TreatAsWithdraw);
    assert_eq!(
        e.notification(),
        (3, 6, hex::decode("40010105").expect("hex"))
    );
    let notif = e.to_notification();
    assert_eq!(
        (notif.code, notif.subcode, notif.data),
        (3, 6, vec![0x40, 0x01, 0x01, 0x05])
    );
    assert_eq!(
        e.withdrawals().expect("withdrawals"),
        &[
            (
                Family::IPV4_UNICAST,
                vec![n("10.9.0.0/16"), n("10.1.0.0/16"), n("10.2.1.0/24")]
            ),
            (Family::IPV6_UNICAST, vec![n("2001:db8:9::/48")]),
        ]
    );
}

#[test]
fn rfc7606_per_attribute_actions() {
    use Rfc7606Action::*;
    // (attributes after the OK ones, total attribute length, expected action, expected notification code/subcode)
    let cases: &[(&str, &str, Rfc7606Action, (u8, u8))] = &[
        // 7.2: AS_PATH with a bad segment type (replaces the OK one, so first in the list).
        (
            "40 01 01 00 40 02 04 07 01 0001 40 03 04 0a000001",
            "0012",
            TreatAsWithdraw,
            (3, 11),
        ),
        // 7.3 NEXT_HOP length 3.
        (
            "40 01 01 00 40 02 00 40 03 03 0a0000",
            "000d",
            TreatAsWithdraw,
            (3, 5),
        ),
        // 7.4 MED length 2.
        ("{OK} 80 04 02 0001", "0013", TreatAsWithdraw, (3, 5)),
        // 7.5 LOCAL_PREF length 5.
        ("{OK} 40 05 05 0000000001", "0016", TreatAsWithdraw, (3, 5)),
        // 7.6 ATOMIC_AGGREGATE with a value: discarded.
        ("{OK} 40 06 01 00", "0012", AttributeDiscard, (3, 5)),
        // 7.7 AGGREGATOR of 6 octets on a 4-octet session: discarded.
        (
            "{OK} c0 07 06 fde9 0a000001",
            "0017",
            AttributeDiscard,
            (3, 5),
        ),
        // 7.8 COMMUNITIES not a multiple of 4.
        ("{OK} c0 08 03 000001", "0014", TreatAsWithdraw, (3, 5)),
        // 7.9 ORIGINATOR_ID length 0.
        ("{OK} 80 09 00", "0011", TreatAsWithdraw, (3, 5)),
        // 7.10 CLUSTER_LIST length 0.
        ("{OK} 80 0a 00", "0011", TreatAsWithdraw, (3, 5)),
        // RFC 8092 6: LARGE_COMMUNITIES not a multiple of 12.
        ("{OK} c0 20 04 00000001", "0015", TreatAsWithdraw, (3, 5)),
        // 3 (b): MED flagged transitive.
        ("{OK} c0 04 04 00000001", "0015", TreatAsWithdraw, (3, 4)),
        // 3 (c): MED twice: the second is discarded.
        (
            "{OK} 80 04 04 00000001 80 04 04 00000002",
            "001c",
            AttributeDiscard,
            (3, 1),
        ),
        // 3 (d): NEXT_HOP missing.
        ("40 01 01 00 40 02 00", "0007", TreatAsWithdraw, (3, 3)),
        // 4: an attribute length running past the attributes.
        ("{OK} c0 08 08 00000001", "0015", TreatAsWithdraw, (3, 1)),
        // 4: a trailing fragment shorter than an attribute header.
        ("{OK} c0 08", "0010", TreatAsWithdraw, (3, 1)),
        // Unrecognised well-known attribute: session reset (RFC 4271 6.3).
        ("{OK} 40 63 00", "0011", SessionReset, (3, 2)),
        // 3 (g): MP_UNREACH twice.
        (
            "80 0f 03 0002 01 80 0f 03 0002 01",
            "000c",
            SessionReset,
            (3, 1),
        ),
        // 7.11: MP_REACH next-hop length that fits no family.
        (
            "80 0e 0a 0002 01 05 0000000000 00 {OK}",
            "001b",
            SessionReset,
            (3, 9),
        ),
    ];
    for (attrs, alen, action, (code, sub)) in cases {
        let attrs = attrs.replace("{OK}", OK_ATTRS);
        let body = format!("0000 {alen} {attrs} 08 0a");
        let ctx = four().0;
        let r = decode_full(&msg(2, &body), &ctx);
        let (err, got_action) = match r {
            Ok(d) => {
                assert_eq!(d.discarded.len(), 1, "{attrs}");
                let e = d.discarded[0].clone();
                let a = e.action();
                (e, a)
            }
            Err(e) => {
                let a = e.action();
                (e, a)
            }
        };
        assert_eq!(got_action, *action, "{attrs}: {err}");
        let (c, s, _) = err.notification();
        assert_eq!((c, s), (*code, *sub), "{attrs}: {err}");
        if *action == TreatAsWithdraw {
            assert_eq!(
                err.withdrawals().expect("list"),
                &[(Family::IPV4_UNICAST, vec![n("10.0.0.0/8")])]
            );
        }
    }
}

#[test]
fn rfc7606_discard_keeps_the_route() {
    let body = format!("0000 0012 {OK_ATTRS} 40 06 01 00 08 0a");
    let d = decode_full(&msg(2, &body), &four().0).expect("decodes with a discard");
    let Message::Update(u) = d.message else {
        panic!("not UPDATE")
    };
    assert!(!u.attributes.atomic_aggregate);
    assert_eq!(u.nlri, vec![n("10.0.0.0/8")]);
    assert_eq!(d.discarded.len(), 1);
}

#[test]
fn rfc7606_session_reset_for_bad_nlri_and_lengths() {
    // Prefix length 33 (RFC 7606 5.3).
    let e = update_err(&format!("0000 000e {OK_ATTRS} 21 0a000000 00"));
    assert_eq!(
        (e.action(), e.notification().0, e.notification().1),
        (Rfc7606Action::SessionReset, 3, 10)
    );
    // Truncated NLRI.
    let e = update_err(&format!("0000 000e {OK_ATTRS} 18 0a00"));
    assert_eq!(e.notification().1, 10);
    // Withdrawn length past the message (RFC 7606 3 (a)).
    let e = update_err("0009 0000");
    assert_eq!(
        (e.action(), e.notification().1),
        (Rfc7606Action::SessionReset, 1)
    );
    // Total attribute length past the message.
    let e = update_err("0000 0020 40 01 01 00");
    assert_eq!(
        (e.action(), e.notification().1),
        (Rfc7606Action::SessionReset, 1)
    );
}

#[test]
fn contexts_from_two_opens() {
    let mut local = full_open();
    let mut remote = full_open();
    remote
        .capabilities
        .retain(|c| !matches!(c, Capability::ExtendedMessage));
    remote.capabilities.push(Capability::AddPath(vec![(
        Family::IPV4_UNICAST,
        AddPathMode::Both,
    )]));
    local.capabilities.push(Capability::AddPath(vec![(
        Family::IPV6_UNICAST,
        AddPathMode::Both,
    )]));
    let (d, e) = contexts(&local, &remote);
    assert!(d.four_octet_as && e.four_octet_as);
    assert!(!d.extended_message && !e.extended_message);
    assert_eq!(d.add_path_rx, [Family::IPV4_UNICAST].into());
    assert!(e.add_path_tx.is_empty());
    let plain = Open {
        capabilities: vec![],
        ..full_open()
    };
    let (d, e) = contexts(&local, &plain);
    assert_eq!((d, e), (DecodeCtx::default(), EncodeCtx::default()));
}

fn shared_attrs() -> PathAttributes {
    PathAttributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath {
            segments: vec![seq(&[65001, 65002])],
        }),
        next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
        local_pref: Some(100),
        ..Default::default()
    }
}

/// Split a buffer of messages and decode each one.
fn decode_all(mut b: &[u8], ctx: &DecodeCtx) -> Vec<Update> {
    let mut v = Vec::new();
    while !b.is_empty() {
        let len = ctx
            .peek_len(b)
            .expect("valid header")
            .expect("whole header");
        match decode(&b[..len], ctx).expect("decodes") {
            Message::Update(u) => v.push(u),
            m => panic!("not an UPDATE: {m:?}"),
        }
        b = &b[len..];
    }
    v
}

#[test]
fn encode_updates_packs_ipv4_into_few_messages() {
    let (d, e) = four();
    let prefixes: Vec<Nlri> = (0..3000u32)
        .map(|i| Nlri {
            prefix: format!("10.{}.{}.0/24", i / 256, i % 256)
                .parse()
                .expect("p"),
            path_id: 0,
        })
        .collect();
    let mut out = BytesMut::new();
    let count = encode_updates(
        &shared_attrs(),
        Family::IPV4_UNICAST,
        &prefixes,
        &e,
        &mut out,
    )
    .expect("encodes");
    let updates = decode_all(&out, &d);
    assert_eq!(updates.len(), count);
    // 4 octets per /24 and about 50 octets of overhead: about 1000 prefixes per 4096-byte message.
    assert_eq!(count, 3);
    let got: Vec<Nlri> = updates.iter().flat_map(|u| u.nlri.clone()).collect();
    assert_eq!(got, prefixes);
    for u in &updates {
        assert_eq!(u.attributes, shared_attrs());
    }
    // Extended messages: one UPDATE.
    let ext = EncodeCtx {
        extended_message: true,
        ..e.clone()
    };
    let mut out = BytesMut::new();
    assert_eq!(
        encode_updates(
            &shared_attrs(),
            Family::IPV4_UNICAST,
            &prefixes,
            &ext,
            &mut out
        )
        .expect("enc"),
        1
    );
    // Withdrawals.
    let mut out = BytesMut::new();
    let count = encode_withdrawals(Family::IPV4_UNICAST, &prefixes, &e, &mut out).expect("encodes");
    let updates = decode_all(&out, &d);
    assert_eq!(count, 3);
    assert_eq!(
        updates
            .iter()
            .flat_map(|u| u.withdrawn.clone())
            .collect::<Vec<_>>(),
        prefixes
    );
}

#[test]
fn encode_updates_packs_ipv6_and_add_path() {
    let v6: BTreeSet<Family> = [Family::IPV6_UNICAST].into();
    let d = DecodeCtx {
        four_octet_as: true,
        add_path_rx: v6.clone(),
        ..Default::default()
    };
    let e = EncodeCtx {
        four_octet_as: true,
        add_path_tx: v6,
        ..Default::default()
    };
    let prefixes: Vec<Nlri> = (0..2000u32)
        .map(|i| Nlri {
            prefix: format!("2001:db8:{:x}::/48", i).parse().expect("p"),
            path_id: i,
        })
        .collect();
    let mut attrs = shared_attrs();
    attrs.next_hop = None;
    let nh = vec![IpAddr::V6("2001:db8::1".parse::<Ipv6Addr>().expect("a"))];
    attrs.mp_reach = Some(MpReach {
        family: Family::IPV6_UNICAST,
        next_hop: nh.clone(),
        nlri: vec![],
    });
    let mut out = BytesMut::new();
    let count =
        encode_updates(&attrs, Family::IPV6_UNICAST, &prefixes, &e, &mut out).expect("encodes");
    let updates = decode_all(&out, &d);
    assert_eq!(updates.len(), count);
    assert!(count >= 2);
    let mut got = Vec::new();
    for u in updates {
        let r = u.attributes.mp_reach.clone().expect("mp_reach");
        assert_eq!((r.family, &r.next_hop), (Family::IPV6_UNICAST, &nh));
        got.extend(r.nlri);
        assert_eq!(u.attributes.as_path, attrs.as_path);
    }
    assert_eq!(got, prefixes);
    let mut out = BytesMut::new();
    let count = encode_withdrawals(Family::IPV6_UNICAST, &prefixes, &e, &mut out).expect("encodes");
    let got: Vec<Nlri> = decode_all(&out, &d)
        .into_iter()
        .flat_map(|u| u.attributes.mp_unreach.expect("mp_unreach").withdrawn)
        .collect();
    assert!(count >= 2);
    assert_eq!(got, prefixes);
    // An IPv6 announcement without a next hop is refused and leaves the buffer untouched.
    let mut out = BytesMut::from(&b"xy"[..]);
    let err = encode_updates(
        &shared_attrs(),
        Family::IPV6_UNICAST,
        &prefixes,
        &e,
        &mut out,
    )
    .expect_err("no nh");
    assert!(matches!(err, EncodeError::MissingNextHop { .. }));
    assert_eq!(&out[..], b"xy");
}

#[test]
fn encode_refuses_what_does_not_fit() {
    let (_, e) = four();
    let mut u = basic_update();
    u.nlri = (0..2000u32)
        .map(|i| n(&format!("10.{}.{}.0/24", i / 256, i % 256)))
        .collect();
    let mut out = BytesMut::new();
    let err = encode(&Message::Update(u), &e, &mut out).expect_err("too large");
    assert!(matches!(err, EncodeError::MessageTooLarge { .. }), "{err}");
    assert!(out.is_empty());
    let mut u = basic_update();
    u.nlri = vec![n("2001:db8::/32")];
    assert!(matches!(
        encode(&Message::Update(u), &e, &mut out),
        Err(EncodeError::WrongFamily { .. })
    ));
}

#[test]
fn as_path_segment_types_and_long_sequences() {
    let (d, e) = four();
    let u = Update {
        attributes: PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath {
                segments: vec![
                    AsSegment::ConfedSequence(vec![65100]),
                    AsSegment::ConfedSet(vec![65101, 65102]),
                    seq(&[65001]),
                    AsSegment::Set(vec![65002, 65003]),
                ],
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let bytes = msg(
        2,
        "0000 0027 40 01 01 00
         40 02 20 03 01 0000fe4c 04 02 0000fe4d 0000fe4e 02 01 0000fde9 01 02 0000fdea 0000fdeb",
    );
    both_ways(&bytes, &Message::Update(u), &d, &e);

    // A sequence longer than 255 ASes goes out as several segments (RFC 4271 4.3) of the same meaning.
    let long: Vec<u32> = (1..=300).collect();
    let mut u = basic_update();
    u.attributes.as_path = Some(AsPath {
        segments: vec![seq(&long)],
    });
    let bytes = enc(&Message::Update(u), &e);
    let Message::Update(got) = decode(&bytes, &d).expect("decodes") else {
        panic!("not UPDATE")
    };
    let path = got.attributes.as_path.expect("as_path");
    assert_eq!(path.segments, vec![seq(&long[..255]), seq(&long[255..])]);
    assert_eq!(path.len_for_decision(), 300);
}

#[test]
fn rfc4271_6_1_header_length_over_the_negotiated_maximum() {
    // An UPDATE header announcing 5000 octets: fine with extended messages (RFC 8654), Bad Message Length
    // with the length as data otherwise, known from the 19 header octets alone.
    let mut header = vec![0xff; 16];
    header.extend_from_slice(&5000u16.to_be_bytes());
    header.push(2);
    let plain = DecodeCtx::default();
    let e = plain.peek_len(&header).expect_err("5000 > 4096");
    assert_eq!(e.notification(), (1, 2, vec![0x13, 0x88]));
    assert_eq!(e.action(), Rfc7606Action::SessionReset);
    assert!(e.is_header_error());
    let ext = DecodeCtx {
        extended_message: true,
        ..Default::default()
    };
    assert_eq!(ext.peek_len(&header), Ok(Some(5000)));
    // OPEN and KEEPALIVE stay at 4096 even then (RFC 8654 4).
    header[18] = 1;
    assert_eq!(ext.peek_len(&header).expect_err("OPEN").notification().1, 2);
}

#[test]
fn rfc7606_5_2_no_nlri_means_session_reset_unless_discard() {
    // Attribute length running past the attribute section (RFC 7606 4), no NLRI: nothing to withdraw.
    let e = update_err(&format!("0000 0015 {OK_ATTRS} c0 08 08 00000001"));
    assert_eq!(e.action(), Rfc7606Action::SessionReset, "{e}");
    assert_eq!(e.notification().0, 3);
    assert_eq!(e.notification().1, 1);
    assert!(matches!(e, DecodeError::NothingToWithdraw { .. }), "{e:?}");
    // A bad ORIGIN value with only withdrawn routes: reset, with ORIGIN's NOTIFICATION.
    let e = update_err("0003 10 0a09 000e 40 01 01 05 40 02 00 40 03 04 0a000001");
    assert_eq!(e.action(), Rfc7606Action::SessionReset);
    assert_eq!(
        e.notification(),
        (3, 6, hex::decode("40010105").expect("hex"))
    );
    // The same with an announced prefix is treat-as-withdraw (the rule is about announcing nothing).
    let e = update_err("0000 000e 40 01 01 05 40 02 00 40 03 04 0a000001 08 0a");
    assert_eq!(e.action(), Rfc7606Action::TreatAsWithdraw);
    // Attribute discard needs no NLRI: ATOMIC_AGGREGATE with a value, no NLRI, decodes.
    let d = decode_full(
        &msg(2, &format!("0000 0012 {OK_ATTRS} 40 06 01 00")),
        &four().0,
    )
    .expect("a discard does not reset");
    assert_eq!(d.discarded.len(), 1);
}

/// Decode an UPDATE body from an external peer of AS 65002 (4-octet session).
fn from_ebgp(body: &str) -> Result<Decoded, DecodeError> {
    let ctx = DecodeCtx {
        four_octet_as: true,
        ebgp_peer_as: Some(65002),
        ..Default::default()
    };
    decode_full(&msg(2, body), &ctx)
}

/// ORIGIN IGP, AS_PATH [65002], NEXT_HOP 10.0.0.1: 18 octets.
const EBGP_ATTRS: &str = "40 01 01 00 40 02 06 02 01 0000fdea 40 03 04 0a000001";

#[test]
fn rfc7606_7_5_7_9_7_10_discarded_from_an_external_peer() {
    for (what, attr, alen) in [
        // 7.5 LOCAL_PREF, malformed (length 5): discard from eBGP (treat-as-withdraw from iBGP).
        ("LOCAL_PREF", "40 05 05 0000000001", "001c"),
        // 7.5 LOCAL_PREF well-formed: discarded as well.
        ("LOCAL_PREF", "40 05 04 00000064", "001b"),
        // 7.9 ORIGINATOR_ID, well-formed.
        ("ORIGINATOR_ID", "80 09 04 0a000009", "001b"),
        // 7.10 CLUSTER_LIST, malformed (length 0).
        ("CLUSTER_LIST", "80 0a 00", "0017"),
    ] {
        let d = from_ebgp(&format!("0000 {alen} {EBGP_ATTRS} {attr} 08 0a"))
            .unwrap_or_else(|e| panic!("{what} from eBGP must be discarded, got {e}"));
        assert_eq!(d.discarded.len(), 1, "{what}");
        assert_eq!(d.discarded[0].action(), Rfc7606Action::AttributeDiscard);
        let Message::Update(u) = d.message else {
            panic!("not UPDATE")
        };
        assert_eq!(u.nlri, vec![n("10.0.0.0/8")], "{what}: the route stays");
        assert_eq!(u.attributes.local_pref, None);
        assert_eq!(u.attributes.originator_id, None);
        assert!(u.attributes.cluster_list.is_empty());
    }
    // The malformed LOCAL_PREF from an internal peer stays treat-as-withdraw (7.5).
    let e = update_err(&format!("0000 0016 {OK_ATTRS} 40 05 05 0000000001 08 0a"));
    assert_eq!(e.action(), Rfc7606Action::TreatAsWithdraw);
}

#[test]
fn rfc4271_6_3_rfc7606_7_2_external_as_path() {
    // Leftmost AS 65003 from peer 65002: Malformed AS_PATH, treat-as-withdraw.
    let e = from_ebgp("0000 0014 40 01 01 00 40 02 06 02 01 0000fdeb 40 03 04 0a000001 08 0a")
        .expect_err("wrong leftmost AS");
    assert_eq!(e.action(), Rfc7606Action::TreatAsWithdraw, "{e}");
    assert_eq!(e.notification().1, 11);
    // A confederation segment from an external peer (RFC 5065 5): treat-as-withdraw.
    let e = from_ebgp(
        "0000 001a 40 01 01 00 40 02 0c 03 01 0000fdea 02 01 0000fdea 40 03 04 0a000001 08 0a",
    )
    .expect_err("confed segment");
    assert_eq!(e.action(), Rfc7606Action::TreatAsWithdraw, "{e}");
    // The peer's own AS leftmost: fine.
    let d = from_ebgp(&format!("0000 0014 {EBGP_ATTRS} 08 0a")).expect("valid");
    assert!(d.discarded.is_empty());
    // The same AS_PATH from an internal peer is not checked.
    decode(
        &msg(
            2,
            "0000 0014 40 01 01 00 40 02 06 02 01 0000fdeb 40 03 04 0a000001 08 0a",
        ),
        &four().0,
    )
    .expect("iBGP");
}

/// The rules of the audit table in `bgp::wire::error` not proved by the tests above: RFC 7606 3 (f), 3 (h),
/// 3 (i), 4 (zero length), 5.1 (both directions), 5.3 (MP attributes) and the RFC 4271 6.3 NEXT_HOP syntax.
#[test]
fn rfc7606_audit_remaining_rules() {
    use Rfc7606Action::*;
    let outcome = |body: &str| -> (Rfc7606Action, (u8, u8), bool) {
        match decode_full(&msg(2, body), &four().0) {
            Ok(d) => {
                let e = d
                    .discarded
                    .first()
                    .unwrap_or_else(|| panic!("{body}: no error"));
                let (c, s, _) = e.notification();
                let Message::Update(u) = d.message else {
                    panic!("not UPDATE")
                };
                (e.action(), (c, s), !u.nlri.is_empty())
            }
            Err(e) => {
                let (c, s, _) = e.notification();
                (e.action(), (c, s), false)
            }
        }
    };
    let cases: &[(&str, &str, Rfc7606Action, (u8, u8))] = &[
        // 3 (f): AGGREGATOR and ATOMIC_AGGREGATE with wrong flags are discarded, the route kept.
        (
            "3 (f) AGGREGATOR flagged well-known",
            "0000 0019 {OK} 40 07 08 0000fde9 0a000001 08 0a",
            AttributeDiscard,
            (3, 4),
        ),
        (
            "3 (f) ATOMIC_AGGREGATE flagged optional",
            "0000 0011 {OK} c0 06 00 08 0a",
            AttributeDiscard,
            (3, 4),
        ),
        // 5.3 / 3 (j): MP attributes with wrong flags, or too short, cannot locate their NLRI.
        (
            "5.3 MP_UNREACH flagged transitive",
            "0000 0014 c0 0f 03 0002 01 {OK} 08 0a",
            SessionReset,
            (3, 4),
        ),
        (
            "5.3 MP_UNREACH of 2 octets",
            "0000 0013 80 0f 02 0002 {OK} 08 0a",
            SessionReset,
            (3, 9),
        ),
        (
            "5.3 MP_REACH of 4 octets",
            "0000 0015 80 0e 04 0002 01 10 {OK} 08 0a",
            SessionReset,
            (3, 9),
        ),
        // 3 (h): the strongest action wins: treat-as-withdraw over a discard, a reset over both.
        (
            "3 (h) discard + treat-as-withdraw",
            "0000 0017 {OK} 40 06 01 00 80 04 02 0001 08 0a",
            TreatAsWithdraw,
            (3, 5),
        ),
        (
            "3 (h) treat-as-withdraw + reset",
            "0000 001a 40 01 01 05 40 02 00 40 03 04 0a000001 80 0f 03 0002 01 80 0f 03 0002 01 08 0a",
            SessionReset,
            (3, 1),
        ),
        // 3 (i): the withdrawn routes field is checked like the NLRI field.
        (
            "3 (i) withdrawn prefix of length 33",
            "0006 21 0a00000000 0000",
            SessionReset,
            (3, 10),
        ),
        // 4: zero length is malformed for all but AS_PATH and ATOMIC_AGGREGATE.
        (
            "4 ORIGIN of length 0",
            "0000 000d 40 01 00 40 02 00 40 03 04 0a000001 08 0a",
            TreatAsWithdraw,
            (3, 5),
        ),
        (
            "4 NEXT_HOP of length 0",
            "0000 000a 40 01 01 00 40 02 00 40 03 00 08 0a",
            TreatAsWithdraw,
            (3, 5),
        ),
        ("4 MED of length 0", "0000 0011 {OK} 80 04 00 08 0a", TreatAsWithdraw, (3, 5)),
        (
            "4 LOCAL_PREF of length 0",
            "0000 0011 {OK} 40 05 00 08 0a",
            TreatAsWithdraw,
            (3, 5),
        ),
        (
            "4 COMMUNITIES of length 0",
            "0000 0011 {OK} c0 08 00 08 0a",
            TreatAsWithdraw,
            (3, 5),
        ),
        // RFC 4271 6.3: NEXT_HOP must be a host address; RFC 7606 3 (e): treat-as-withdraw.
        (
            "4271 6.3 NEXT_HOP 0.0.0.0",
            "0000 000e 40 01 01 00 40 02 00 40 03 04 00000000 08 0a",
            TreatAsWithdraw,
            (3, 8),
        ),
        (
            "4271 6.3 NEXT_HOP 224.0.0.1",
            "0000 000e 40 01 01 00 40 02 00 40 03 04 e0000001 08 0a",
            TreatAsWithdraw,
            (3, 8),
        ),
        (
            "4271 6.3 NEXT_HOP 255.255.255.255",
            "0000 000e 40 01 01 00 40 02 00 40 03 04 ffffffff 08 0a",
            TreatAsWithdraw,
            (3, 8),
        ),
    ];
    for (rule, body, action, notif) in cases {
        let body = body.replace("{OK}", OK_ATTRS);
        let (a, n, kept) = outcome(&body);
        assert_eq!((a, n), (*action, *notif), "{rule}");
        assert_eq!(
            kept,
            *action == AttributeDiscard,
            "{rule}: route kept only on a discard"
        );
    }
    // The Invalid NEXT_HOP NOTIFICATION carries the attribute.
    let e = update_err("0000 000e 40 01 01 00 40 02 00 40 03 04 00000000 08 0a");
    assert_eq!(
        e.notification().2,
        hex::decode("40030400000000").expect("hex")
    );
    // A loopback next hop is let through (one-host tests), a plain one of course too.
    for nh in ["7f000002", "0a000001"] {
        decode(
            &msg(
                2,
                &format!("0000 000e 40 01 01 00 40 02 00 40 03 04 {nh} 08 0a"),
            ),
            &four().0,
        )
        .unwrap_or_else(|e| panic!("{nh}: {e}"));
    }

    // 5.1 receive: MP_REACH after the other attributes is accepted.
    let d = decode(
        &msg(
            2,
            &format!(
                "0000 002d {OK_ATTRS} 80 0e 1c 0002 01 10 20010db8000000000000000000000001 00 30 20010db80009"
            ),
        ),
        &four().0,
    )
    .expect("MP_REACH last");
    let Message::Update(u) = d else {
        panic!("not UPDATE")
    };
    assert_eq!(
        u.attributes.mp_reach.expect("mp_reach").nlri,
        vec![n("2001:db8:9::/48")]
    );

    // 5.1 send: what sessions send (the packers) has MP_REACH / MP_UNREACH first and one NLRI-bearing
    // field per UPDATE.
    let (_, e) = four();
    let mut a = shared_attrs();
    a.next_hop = None;
    a.mp_reach = Some(MpReach {
        family: Family::IPV6_UNICAST,
        next_hop: vec!["2001:db8::1".parse().expect("v6")],
        nlri: vec![],
    });
    let v6 = vec![n("2001:db8:1::/48")];
    for (what, out) in [
        ("announce", {
            let mut o = BytesMut::new();
            encode_updates(&a, Family::IPV6_UNICAST, &v6, &e, &mut o).expect("enc");
            o
        }),
        ("withdraw", {
            let mut o = BytesMut::new();
            encode_withdrawals(Family::IPV6_UNICAST, &v6, &e, &mut o).expect("enc");
            o
        }),
    ] {
        let body = &out[19..];
        assert_eq!(&body[..2], &[0, 0], "{what}: no withdrawn routes field");
        let alen = u16::from_be_bytes([body[2], body[3]]) as usize;
        assert_eq!(4 + alen, body.len(), "{what}: no NLRI field");
        let first = body[5];
        assert!(
            first == 14 || first == 15,
            "{what}: first attribute is type {first}"
        );
    }
}

/// RFC 9494 3.1: the long-lived graceful restart capability, one 7-octet tuple per family (AFI, SAFI,
/// flags with the F bit, 24-bit stale time), next to graceful restart; an empty one (BIRD's "aware" mode)
/// too.
#[test]
fn open_long_lived_graceful_restart() {
    let o = Open {
        version: 4,
        my_as: 64512,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![
            Capability::GracefulRestart {
                restarting: false,
                notification: false,
                restart_time: 0,
                families: vec![],
            },
            Capability::LongLivedGracefulRestart(vec![
                LongLivedFamily {
                    family: Family::IPV4_UNICAST,
                    forwarding_preserved: true,
                    stale_time: 86_400,
                },
                LongLivedFamily {
                    family: Family::IPV6_UNICAST,
                    forwarding_preserved: false,
                    stale_time: LLGR_MAX_STALE_TIME,
                },
            ]),
            Capability::LongLivedGracefulRestart(vec![]),
        ],
    };
    let bytes = msg(
        1,
        "04 fc00 005a 0a000001 18 02 16
         40 02 0000
         47 0e 0001 01 80 015180 0002 01 00 ffffff
         47 00",
    );
    both_ways(
        &bytes,
        &Message::Open(o),
        &DecodeCtx::default(),
        &EncodeCtx::default(),
    );
    assert_eq!((LLGR_STALE, NO_LLGR), (0xffff_0006, 0xffff_0007));
}

/// Tolerant on receipt: flag bits other than F are ignored (RFC 9494 3.1); a length that is not a
/// multiple of 7 is a malformed capability, refused with the code in the error.
#[test]
fn open_long_lived_graceful_restart_tolerance() {
    let bytes = msg(1, "04 fc00 005a 0a000001 0b 02 09 47 07 0001 01 ff 000e10");
    let Message::Open(o) = decode(&bytes, &DecodeCtx::default()).expect("decodes") else {
        panic!("not an OPEN");
    };
    assert_eq!(
        o.capabilities,
        vec![Capability::LongLivedGracefulRestart(vec![
            LongLivedFamily {
                family: Family::IPV4_UNICAST,
                forwarding_preserved: true,
                stale_time: 3600,
            }
        ])]
    );
    let bad = msg(1, "04 fc00 005a 0a000001 0a 02 08 47 06 0001 01 80 0000");
    match decode(&bad, &DecodeCtx::default()) {
        Err(DecodeError::MalformedCapability { code: 71, .. }) => {}
        other => panic!("want a malformed capability 71, got {other:?}"),
    }
    // Encoding clamps a stale time beyond 24 bits instead of spilling into the next tuple.
    let o = Message::Open(Open {
        version: 4,
        my_as: 64512,
        hold_time: 90,
        bgp_id: Ipv4Addr::new(10, 0, 0, 1),
        capabilities: vec![Capability::LongLivedGracefulRestart(vec![
            LongLivedFamily {
                family: Family::IPV4_UNICAST,
                forwarding_preserved: false,
                stale_time: u32::MAX,
            },
        ])],
    });
    assert!(hex::encode(enc(&o, &EncodeCtx::default())).ends_with("470700010100ffffff"));
}
