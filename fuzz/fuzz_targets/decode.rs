//! Fuzz the BGP decoder: no input may panic it, under any session context. Where a message decodes
//! on a 4-octet session, encoding it and decoding again must give the same message (unknown attributes
//! gain the Partial bit and come out in type order, RFC 4271 5).
//!
//! Input: one control byte, then either a whole message (control bit 7 set) or a message type and body
//! that get a correct header, so most inputs reach the body parsers. Control bits 0-3: 4-octet AS,
//! ADD-PATH IPv4, ADD-PATH IPv6, extended messages.
#![no_main]

#[allow(dead_code, unused_imports)]
#[path = "../../src/bgp/wire/mod.rs"]
mod wire;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use wire::*;

fuzz_target!(|data: &[u8]| {
    let Some((&ctl, rest)) = data.split_first() else {
        return;
    };
    let mut add_path = std::collections::BTreeSet::new();
    if ctl & 2 != 0 {
        add_path.insert(Family::IPV4_UNICAST);
    }
    if ctl & 4 != 0 {
        add_path.insert(Family::IPV6_UNICAST);
    }
    let dctx = DecodeCtx {
        four_octet_as: ctl & 1 != 0,
        add_path_rx: add_path.clone(),
        extended_message: ctl & 8 != 0,
        // Bit 0x10: decode as from an external peer (RFC 7606's eBGP-only rules and the AS_PATH checks).
        ebgp_peer_as: (ctl & 0x10 != 0).then_some(65001),
    };
    let ectx = EncodeCtx {
        four_octet_as: ctl & 1 != 0,
        add_path_tx: add_path,
        extended_message: ctl & 8 != 0,
    };
    let msg: Vec<u8> = if ctl & 0x80 != 0 {
        rest.to_vec()
    } else {
        let Some((&t, body)) = rest.split_first() else {
            return;
        };
        let len = (19 + body.len()).min(u16::MAX as usize) as u16;
        let mut m = vec![0xff; 16];
        m.extend_from_slice(&len.to_be_bytes());
        m.push(t);
        m.extend_from_slice(body);
        m
    };
    let _ = peek_len(&msg);
    let _ = dctx.peek_len(&msg);
    match decode_full(&msg, &dctx) {
        Err(e) => {
            let _ = (e.notification(), e.action(), e.withdrawals(), e.to_string());
        }
        Ok(d) => {
            let mut out = BytesMut::new();
            if encode(&d.message, &ectx, &mut out).is_err() || !dctx.four_octet_as {
                return;
            }
            let again = decode(&out, &dctx).expect("a re-encoded message decodes");
            let mut want = d.message;
            if let Message::Update(u) = &mut want {
                // Attributes are written in type order (RFC 4271 5).
                u.attributes.unknown.sort_by_key(|r| r.type_code);
                for r in &mut u.attributes.unknown {
                    if r.flags & 0xc0 == 0xc0 {
                        r.flags |= 0x20;
                    }
                }
            }
            assert_eq!(again, want, "round trip");
        }
    }
});
