//! Throughput of the BGP codec on a full table: 1,000,000 unique IPv4 /24s (and 250,000 IPv6 /48s)
//! sharing one attribute set, packed by `encode_updates` into 4096-byte (and RFC 8654 65535-byte)
//! UPDATEs, then framed with `peek_len` and decoded. The anchor, in the same run on the same bytes, is
//! the independent `bgpkit-parser` decoding them.
//!
//! Run: `cargo bench --bench wire` (add `-- --quick` for one round). Prints prefixes/s per step; the
//! best of several rounds is reported because the machine is shared.

#![allow(clippy::unwrap_used)] // bench code: a panic is the failure report

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use bgpkit_parser::models::AsnLength;
use bgpkit_parser::parser::bgp::messages::parse_bgp_message;
use bytes::{Bytes, BytesMut};
use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use margay::bgp::wire::*;

fn attrs() -> PathAttributes {
    PathAttributes {
        origin: Some(Origin::Igp),
        as_path: Some(AsPath {
            segments: vec![AsSegment::Sequence(vec![65001, 65002, 4_200_000_000])],
        }),
        next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
        local_pref: Some(100),
        communities: vec![0xfde9_0001, 0xfde9_0002],
        ..Default::default()
    }
}

fn v4_table(n: u32) -> Vec<Nlri> {
    (0..n)
        .map(|i| {
            let a = Ipv4Addr::from((11u32 << 24) + (i << 8));
            Nlri {
                prefix: IpNetwork::V4(Ipv4Network::new(a, 24).expect("/24")),
                path_id: 0,
            }
        })
        .collect()
}

fn v6_table(n: u32) -> Vec<Nlri> {
    (0..n)
        .map(|i| {
            let a = Ipv6Addr::from((0x2001_0db8u128 << 96) | ((i as u128) << 80));
            Nlri {
                prefix: IpNetwork::V6(Ipv6Network::new(a, 48).expect("/48")),
                path_id: 0,
            }
        })
        .collect()
}

/// Best time of `rounds` runs of `f`, which returns a count to keep the work alive.
fn best<F: FnMut() -> usize>(rounds: usize, mut f: F) -> (Duration, usize) {
    let mut best = Duration::MAX;
    let mut out = 0;
    for _ in 0..rounds {
        let t = Instant::now();
        out = black_box(f());
        best = best.min(t.elapsed());
    }
    (best, out)
}

fn rate(n: usize, d: Duration) -> String {
    format!("{:>7.2} M prefixes/s", n as f64 / d.as_secs_f64() / 1e6)
}

fn decode_all(buf: &[u8], ctx: &DecodeCtx) -> usize {
    let mut b = buf;
    let mut n = 0;
    while !b.is_empty() {
        let len = ctx.peek_len(b).expect("valid").expect("whole");
        match decode(&b[..len], ctx).expect("decodes") {
            Message::Update(u) => {
                n += u.nlri.len() + u.withdrawn.len();
                if let Some(r) = &u.attributes.mp_reach {
                    n += r.nlri.len();
                }
                if let Some(r) = &u.attributes.mp_unreach {
                    n += r.withdrawn.len();
                }
            }
            _ => unreachable!("only UPDATEs were encoded"),
        }
        b = &b[len..];
    }
    n
}

fn bgpkit_all(buf: &Bytes, four: bool) -> usize {
    let asn_len = if four {
        AsnLength::Bits32
    } else {
        AsnLength::Bits16
    };
    let mut b = buf.clone();
    let mut n = 0;
    while !b.is_empty() {
        let len = u16::from_be_bytes([b[16], b[17]]) as usize;
        let mut m = b.split_to(len);
        match parse_bgp_message(&mut m, false, &asn_len).expect("bgpkit decodes") {
            bgpkit_parser::models::BgpMessage::Update(u) => {
                n += u.announced_prefixes.len() + u.withdrawn_prefixes.len();
                for a in u.attributes.into_attributes_iter() {
                    if let bgpkit_parser::models::AttributeValue::MpReachNlri(r)
                    | bgpkit_parser::models::AttributeValue::MpUnreachNlri(r) = a.value
                    {
                        n += r.prefixes.len();
                    }
                }
            }
            _ => unreachable!("only UPDATEs were encoded"),
        }
    }
    n
}

fn case(name: &str, family: Family, table: &[Nlri], a: &PathAttributes, ext: bool, rounds: usize) {
    let ectx = EncodeCtx {
        four_octet_as: true,
        extended_message: ext,
        ..Default::default()
    };
    let dctx = DecodeCtx {
        four_octet_as: true,
        extended_message: ext,
        ..Default::default()
    };
    let mut buf = BytesMut::new();
    let (t_enc, msgs) = best(rounds, || {
        buf.clear();
        encode_updates(a, family, table, &ectx, &mut buf).expect("encodes")
    });
    let (t_dec, n) = best(rounds, || decode_all(&buf, &dctx));
    assert_eq!(n, table.len());
    let mut wbuf = BytesMut::new();
    let (t_wenc, _) = best(rounds, || {
        wbuf.clear();
        encode_withdrawals(family, table, &ectx, &mut wbuf).expect("encodes")
    });
    let (t_wdec, wn) = best(rounds, || decode_all(&wbuf, &dctx));
    assert_eq!(wn, table.len());
    let frozen = buf.clone().freeze();
    let (t_kit, kn) = best(rounds, || bgpkit_all(&frozen, true));
    assert_eq!(kn, table.len());
    println!(
        "{name}: {} prefixes, {msgs} UPDATEs, {:.1} MB",
        table.len(),
        buf.len() as f64 / 1e6
    );
    println!(
        "  margay encode_updates      {}  ({:?})",
        rate(table.len(), t_enc),
        t_enc
    );
    println!(
        "  margay decode              {}  ({:?})",
        rate(table.len(), t_dec),
        t_dec
    );
    println!(
        "  margay encode_withdrawals  {}  ({:?})",
        rate(table.len(), t_wenc),
        t_wenc
    );
    println!(
        "  margay decode withdrawals  {}  ({:?})",
        rate(table.len(), t_wdec),
        t_wdec
    );
    println!(
        "  anchor bgpkit-parser decode {} ({:?})",
        rate(table.len(), t_kit),
        t_kit
    );
    println!(
        "  decode speed-up over anchor: {:.1}x; decode+encode per prefix: {:.0} ns",
        t_kit.as_secs_f64() / t_dec.as_secs_f64(),
        (t_enc + t_dec).as_secs_f64() * 1e9 / table.len() as f64
    );
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds = if quick { 1 } else { 5 };
    let v4 = v4_table(1_000_000);
    let v6 = v6_table(250_000);
    let a4 = attrs();
    let mut a6 = attrs();
    a6.next_hop = None;
    a6.mp_reach = Some(MpReach {
        family: Family::IPV6_UNICAST,
        next_hop: vec![IpAddr::V6("2001:db8::1".parse().expect("addr"))],
        nlri: vec![],
    });
    case(
        "IPv4 /24, 4096-byte UPDATEs",
        Family::IPV4_UNICAST,
        &v4,
        &a4,
        false,
        rounds,
    );
    case(
        "IPv4 /24, 65535-byte UPDATEs (RFC 8654)",
        Family::IPV4_UNICAST,
        &v4,
        &a4,
        true,
        rounds,
    );
    case(
        "IPv6 /48, 4096-byte UPDATEs (MP_REACH)",
        Family::IPV6_UNICAST,
        &v6,
        &a6,
        false,
        rounds,
    );
}
