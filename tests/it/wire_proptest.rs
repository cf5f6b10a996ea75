//! Properties of the BGP codec: every message round-trips exactly, the bulk packers lose and reorder
//! nothing, and decode never panics on any input (random bytes or mutated valid messages) under any
//! session context, always returning an error that knows its NOTIFICATION and RFC 7606 action.

use crate::common::wire as wire_gen;

use bytes::BytesMut;
use margay::bgp::wire::*;
use proptest::prelude::*;
use wire_gen::*;

fn check_decode_result(r: &Result<Decoded, DecodeError>, ectx: &EncodeCtx) {
    match r {
        Ok(d) => {
            for e in &d.discarded {
                assert_eq!(e.action(), Rfc7606Action::AttributeDiscard, "{e}");
            }
            // Whatever decodes can be encoded again (it may be too large, never a panic).
            let mut out = BytesMut::new();
            let _ = encode(&d.message, ectx, &mut out);
        }
        Err(e) => {
            let (code, _, _) = e.notification();
            assert!((1..=7).contains(&code), "{e}");
            let _ = e.to_string();
            assert_eq!(
                e.action() == Rfc7606Action::TreatAsWithdraw,
                e.withdrawals().is_some(),
                "{e}"
            );
            // Only UPDATE problems may be softened (RFC 7606 is about UPDATE only).
            if e.action() != Rfc7606Action::SessionReset {
                assert_eq!(code, 3, "{e}");
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips((cfg, m) in cfg().prop_flat_map(|c| (Just(c.clone()), message(&c)))) {
        let mut out = BytesMut::new();
        encode(&m, &cfg.encode_ctx(), &mut out).expect("generated messages fit");
        let len = cfg.decode_ctx().peek_len(&out).expect("valid header").expect("whole header");
        prop_assert_eq!(len, out.len());
        let d = decode_full(&out, &cfg.decode_ctx()).expect("decodes");
        prop_assert!(d.discarded.is_empty());
        prop_assert_eq!(&d.message, &m);
        let mut again = BytesMut::new();
        encode(&d.message, &cfg.encode_ctx(), &mut again).expect("encodes again");
        prop_assert_eq!(out, again);
    }

    #[test]
    fn decode_never_panics_on_random_bytes(
        cfg in cfg(),
        t in 0u8..7,
        body in proptest::collection::vec(any::<u8>(), 0..600),
        lie in proptest::option::of(any::<u16>()),
    ) {
        let mut m = vec![0xff; 16];
        let len = lie.unwrap_or((19 + body.len()) as u16);
        m.extend_from_slice(&len.to_be_bytes());
        m.push(t);
        m.extend(body);
        let _ = peek_len(&m);
        check_decode_result(&decode_full(&m, &cfg.decode_ctx()), &cfg.encode_ctx());
    }

    #[test]
    fn decode_never_panics_on_mutated_messages(
        (cfg, m) in cfg().prop_flat_map(|c| (Just(c.clone()), message(&c))),
        other in cfg(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<prop::sample::Index>()),
    ) {
        let mut out = BytesMut::new();
        encode(&m, &cfg.encode_ctx(), &mut out).expect("generated messages fit");
        let mut b = out.to_vec();
        for (i, v) in flips {
            // Keep the marker so that the body parsers, not the header check, see the damage.
            let i = 16 + i.index(b.len() - 16);
            b[i] = v;
        }
        if let Some(c) = cut {
            b.truncate(19.max(c.index(b.len() + 1)));
        }
        // Make the header agree with the new size half of the time, so body parsers get the bytes.
        if b.len().is_multiple_of(2) {
            let l = b.len() as u16;
            b[16..18].copy_from_slice(&l.to_be_bytes());
        }
        // Decode under the session it was built for and under another one (wrong AS size, ADD-PATH).
        check_decode_result(&decode_full(&b, &cfg.decode_ctx()), &cfg.encode_ctx());
        check_decode_result(&decode_full(&b, &other.decode_ctx()), &other.encode_ctx());
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn packers_keep_every_prefix_in_order(
        (cfg, attrs, v4, v6) in cfg().prop_flat_map(|c| (
            Just(c.clone()),
            update(&c),
            nlris(Family::IPV4_UNICAST, &c, 3000),
            nlris(Family::IPV6_UNICAST, &c, 1500),
        )),
        extended in any::<bool>(),
    ) {
        let mut ectx = cfg.encode_ctx();
        ectx.extended_message = extended;
        let mut dctx = cfg.decode_ctx();
        dctx.extended_message = extended;
        let mut attrs = attrs.attributes;
        attrs.mp_unreach = None;
        attrs.origin.get_or_insert(Origin::Igp);
        attrs.as_path.get_or_insert_with(AsPath::default);
        attrs.next_hop.get_or_insert(std::net::Ipv4Addr::new(192, 0, 2, 1));
        for (family, prefixes) in [(Family::IPV4_UNICAST, &v4), (Family::IPV6_UNICAST, &v6)] {
            let mut a = attrs.clone();
            if family == Family::IPV6_UNICAST {
                a.mp_reach = Some(MpReach {
                    family,
                    next_hop: vec!["2001:db8::1".parse().expect("addr")],
                    nlri: vec![],
                });
            } else if a.mp_reach.as_ref().is_some_and(|r| r.family != family) {
                a.mp_reach = None;
            }
            let mut out = BytesMut::new();
            match encode_updates(&a, family, prefixes, &ectx, &mut out) {
                Ok(count) => {
                    let (got, n) = split_and_decode(&out, &dctx, |u| {
                        u.nlri.into_iter().chain(u.attributes.mp_reach.into_iter().flat_map(|r| r.nlri)).collect()
                    });
                    prop_assert_eq!(n, count);
                    prop_assert_eq!(&got, prefixes);
                }
                // Large generated attribute sets may leave no room for a prefix in 4096 bytes.
                Err(EncodeError::MessageTooLarge { .. }) => prop_assert!(!extended),
                Err(e) => return Err(TestCaseError::fail(e.to_string())),
            }
            let mut out = BytesMut::new();
            let count = encode_withdrawals(family, prefixes, &ectx, &mut out).expect("withdrawals always fit");
            let (got, n) = split_and_decode(&out, &dctx, |u| {
                u.withdrawn.into_iter().chain(u.attributes.mp_unreach.into_iter().flat_map(|r| r.withdrawn)).collect()
            });
            prop_assert_eq!(n, count);
            prop_assert_eq!(&got, prefixes);
        }
    }
}

/// Split a buffer of UPDATEs, decode each and collect prefixes with `pick`; returns them and the count.
fn split_and_decode(
    mut b: &[u8],
    ctx: &DecodeCtx,
    pick: impl Fn(Update) -> Vec<Nlri>,
) -> (Vec<Nlri>, usize) {
    let mut got = Vec::new();
    let mut n = 0;
    while !b.is_empty() {
        let len = ctx
            .peek_len(b)
            .expect("valid header")
            .expect("whole header");
        assert!(len <= ctx.max_message_len(2));
        match decode(&b[..len], ctx).expect("decodes") {
            Message::Update(u) => got.extend(pick(u)),
            m => panic!("not an UPDATE: {m:?}"),
        }
        b = &b[len..];
        n += 1;
    }
    (got, n)
}
