//! OPEN and its capabilities (RFC 4271 4.2, RFC 5492, RFC 9072 extended optional parameters), and the
//! derivation of the decode/encode contexts from the two OPENs of a session.

use std::net::Ipv4Addr;

use bytes::{BufMut, BytesMut};

use super::error::{DecodeError, EncodeError};
use super::types::*;
use super::{DecodeCtx, EncodeCtx};

/// Optional parameter type carrying capabilities (RFC 5492 4).
const PARAM_CAPABILITIES: u8 = 2;
/// RFC 9072 2: a non-extended length of 255 with this type announces extended optional parameters.
const PARAM_EXTENDED: u8 = 255;

pub(crate) mod cap {
    pub const MULTIPROTOCOL: u8 = 1;
    pub const ROUTE_REFRESH: u8 = 2;
    pub const EXTENDED_NEXT_HOP: u8 = 5;
    pub const EXTENDED_MESSAGE: u8 = 6;
    pub const GRACEFUL_RESTART: u8 = 64;
    pub const FOUR_OCTET_AS: u8 = 65;
    pub const ADD_PATH: u8 = 69;
    pub const LONG_LIVED_GRACEFUL_RESTART: u8 = 71;
}

pub(crate) fn decode_open(b: &[u8]) -> Result<Open, DecodeError> {
    // The header check guarantees at least 10 body bytes (minimum OPEN length 29).
    let version = b[0];
    if version != 4 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let my_as = u16::from_be_bytes([b[1], b[2]]);
    let hold_time = u16::from_be_bytes([b[3], b[4]]);
    // RFC 4271 6.2: a hold time of 1 or 2 seconds MUST be rejected.
    if hold_time == 1 || hold_time == 2 {
        return Err(DecodeError::UnacceptableHoldTime(hold_time));
    }
    let bgp_id = Ipv4Addr::new(b[5], b[6], b[7], b[8]);
    if bgp_id.is_unspecified() {
        return Err(DecodeError::BadBgpId(bgp_id));
    }
    let opt_len = b[9] as usize;
    let rest = &b[10..];
    let mut capabilities = Vec::new();
    // RFC 9072 2: extended optional parameters: length 255, first type 255, then a 2-octet length, and
    // each parameter has a 2-octet length.
    let (params, extended) = if opt_len == 255 && rest.first() == Some(&PARAM_EXTENDED) {
        let Some(l) = rest.get(1..3) else {
            return Err(DecodeError::MalformedOpen(
                "truncated extended optional parameters length",
            ));
        };
        let l = u16::from_be_bytes([l[0], l[1]]) as usize;
        if rest.len() != 3 + l {
            return Err(DecodeError::MalformedOpen(
                "optional parameters length does not match the message length",
            ));
        }
        (&rest[3..], true)
    } else {
        if rest.len() != opt_len {
            return Err(DecodeError::MalformedOpen(
                "optional parameters length does not match the message length",
            ));
        }
        (rest, false)
    };
    let hdr = if extended { 3 } else { 2 };
    let mut i = 0;
    while i < params.len() {
        let Some(h) = params.get(i..i + hdr) else {
            return Err(DecodeError::MalformedOpen("truncated optional parameter"));
        };
        let ptype = h[0];
        let plen = if extended {
            u16::from_be_bytes([h[1], h[2]]) as usize
        } else {
            h[1] as usize
        };
        let Some(value) = params.get(i + hdr..i + hdr + plen) else {
            return Err(DecodeError::MalformedOpen(
                "optional parameter runs past the end of the OPEN",
            ));
        };
        if ptype != PARAM_CAPABILITIES {
            return Err(DecodeError::UnsupportedOptionalParameter(ptype));
        }
        decode_capabilities(value, &mut capabilities)?;
        i += hdr + plen;
    }
    Ok(Open {
        version,
        my_as,
        hold_time,
        bgp_id,
        capabilities,
    })
}

fn family_at(b: &[u8]) -> Family {
    Family {
        afi: Afi::from_code(u16::from_be_bytes([b[0], b[1]])),
        safi: Safi::from_code(b[2]),
    }
}

fn decode_capabilities(mut b: &[u8], out: &mut Vec<Capability>) -> Result<(), DecodeError> {
    while !b.is_empty() {
        let Some(&[code, len]) = b.get(..2) else {
            return Err(DecodeError::MalformedOpen("truncated capability"));
        };
        let Some(v) = b.get(2..2 + len as usize) else {
            return Err(DecodeError::MalformedOpen(
                "capability runs past its optional parameter",
            ));
        };
        let bad = |reason| DecodeError::MalformedCapability { code, reason };
        let c = match code {
            cap::MULTIPROTOCOL => {
                if v.len() != 4 {
                    return Err(bad("length is not 4"));
                }
                // AFI (2), reserved (1), SAFI (1) (RFC 4760 8).
                Capability::Multiprotocol(Family {
                    afi: Afi::from_code(u16::from_be_bytes([v[0], v[1]])),
                    safi: Safi::from_code(v[3]),
                })
            }
            cap::ROUTE_REFRESH if v.is_empty() => Capability::RouteRefresh,
            cap::ROUTE_REFRESH => return Err(bad("length is not 0")),
            cap::EXTENDED_MESSAGE if v.is_empty() => Capability::ExtendedMessage,
            cap::EXTENDED_MESSAGE => return Err(bad("length is not 0")),
            cap::FOUR_OCTET_AS => {
                if v.len() != 4 {
                    return Err(bad("length is not 4"));
                }
                Capability::FourOctetAs(u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            }
            cap::GRACEFUL_RESTART => {
                // RFC 4724 3: flags + time (2), then (AFI, SAFI, flags) per family.
                if v.len() < 2 || (v.len() - 2) % 4 != 0 {
                    return Err(bad("length is not 2 + 4n"));
                }
                let ft = u16::from_be_bytes([v[0], v[1]]);
                let families = v[2..]
                    .chunks_exact(4)
                    .map(|c| GracefulRestartFamily {
                        family: family_at(c),
                        forwarding_preserved: c[3] & 0x80 != 0,
                    })
                    .collect();
                Capability::GracefulRestart {
                    restarting: ft & 0x8000 != 0,
                    // RFC 8538 2: the N bit.
                    notification: ft & 0x4000 != 0,
                    restart_time: ft & 0x0fff,
                    families,
                }
            }
            cap::ADD_PATH => {
                // RFC 7911 4: (AFI, SAFI, send/receive) per family; other mode values are ignored.
                if v.len() % 4 != 0 {
                    return Err(bad("length is not a multiple of 4"));
                }
                let entries = v
                    .chunks_exact(4)
                    .filter_map(|c| {
                        let mode = match c[3] {
                            1 => AddPathMode::Receive,
                            2 => AddPathMode::Send,
                            3 => AddPathMode::Both,
                            _ => return None,
                        };
                        Some((family_at(c), mode))
                    })
                    .collect();
                Capability::AddPath(entries)
            }
            cap::LONG_LIVED_GRACEFUL_RESTART => {
                // RFC 9494 3.1: (AFI 2, SAFI 1, flags 1, stale time 3) per family. Only the F bit of the
                // flags means anything; the others are ignored on receipt. A length that is not a
                // multiple of 7 is malformed (as BIRD and GoBGP treat it).
                if v.len() % 7 != 0 {
                    return Err(bad("length is not a multiple of 7"));
                }
                Capability::LongLivedGracefulRestart(
                    v.chunks_exact(7)
                        .map(|c| LongLivedFamily {
                            family: family_at(c),
                            forwarding_preserved: c[3] & 0x80 != 0,
                            stale_time: u32::from_be_bytes([0, c[4], c[5], c[6]]),
                        })
                        .collect(),
                )
            }
            cap::EXTENDED_NEXT_HOP => {
                // RFC 8950 3: NLRI AFI (2), NLRI SAFI (2), next-hop AFI (2).
                if v.len() % 6 != 0 {
                    return Err(bad("length is not a multiple of 6"));
                }
                let mut entries = Vec::with_capacity(v.len() / 6);
                for c in v.chunks_exact(6) {
                    let safi = u16::from_be_bytes([c[2], c[3]]);
                    let Ok(safi) = u8::try_from(safi) else {
                        return Err(bad("SAFI above 255"));
                    };
                    entries.push((
                        Family {
                            afi: Afi::from_code(u16::from_be_bytes([c[0], c[1]])),
                            safi: Safi::from_code(safi),
                        },
                        Afi::from_code(u16::from_be_bytes([c[4], c[5]])),
                    ));
                }
                Capability::ExtendedNextHop(entries)
            }
            _ => Capability::Unknown {
                code,
                data: v.to_vec(),
            },
        };
        out.push(c);
        b = &b[2 + len as usize..];
    }
    Ok(())
}

fn put_family(f: Family, out: &mut BytesMut) {
    out.put_u16(f.afi.code());
    out.put_u8(f.safi.code());
}

fn encode_capability(c: &Capability, out: &mut BytesMut) -> Result<(), EncodeError> {
    let start = out.len();
    let code = match c {
        Capability::Multiprotocol(_) => cap::MULTIPROTOCOL,
        Capability::RouteRefresh => cap::ROUTE_REFRESH,
        Capability::ExtendedMessage => cap::EXTENDED_MESSAGE,
        Capability::GracefulRestart { .. } => cap::GRACEFUL_RESTART,
        Capability::FourOctetAs(_) => cap::FOUR_OCTET_AS,
        Capability::AddPath(_) => cap::ADD_PATH,
        Capability::ExtendedNextHop(_) => cap::EXTENDED_NEXT_HOP,
        Capability::LongLivedGracefulRestart(_) => cap::LONG_LIVED_GRACEFUL_RESTART,
        Capability::Unknown { code, .. } => *code,
    };
    out.put_u8(code);
    out.put_u8(0);
    match c {
        Capability::Multiprotocol(f) => {
            out.put_u16(f.afi.code());
            out.put_u8(0);
            out.put_u8(f.safi.code());
        }
        Capability::RouteRefresh | Capability::ExtendedMessage => {}
        Capability::GracefulRestart {
            restarting,
            notification,
            restart_time,
            families,
        } => {
            let mut ft = restart_time & 0x0fff;
            if *restarting {
                ft |= 0x8000;
            }
            if *notification {
                ft |= 0x4000;
            }
            out.put_u16(ft);
            for f in families {
                put_family(f.family, out);
                out.put_u8(if f.forwarding_preserved { 0x80 } else { 0 });
            }
        }
        Capability::FourOctetAs(asn) => out.put_u32(*asn),
        Capability::AddPath(entries) => {
            for (f, mode) in entries {
                put_family(*f, out);
                out.put_u8(match mode {
                    AddPathMode::Receive => 1,
                    AddPathMode::Send => 2,
                    AddPathMode::Both => 3,
                });
            }
        }
        Capability::ExtendedNextHop(entries) => {
            for (f, nh) in entries {
                out.put_u16(f.afi.code());
                out.put_u16(f.safi.code() as u16);
                out.put_u16(nh.code());
            }
        }
        Capability::LongLivedGracefulRestart(entries) => {
            for e in entries {
                put_family(e.family, out);
                // RFC 9494 3.1: only the F bit is defined; the rest are sent as zero.
                out.put_u8(if e.forwarding_preserved { 0x80 } else { 0 });
                let t = e.stale_time.min(LLGR_MAX_STALE_TIME).to_be_bytes();
                out.put_slice(&t[1..]);
            }
        }
        Capability::Unknown { data, .. } => out.put_slice(data),
    }
    let length = out.len() - start - 2;
    if length > 255 {
        return Err(EncodeError::CapabilityTooLong { code, length });
    }
    out[start + 1] = length as u8;
    Ok(())
}

/// OPEN body. All capabilities go into one Capabilities optional parameter; when that exceeds 255 octets
/// the RFC 9072 extended format is used.
pub(crate) fn encode_open(o: &Open, out: &mut BytesMut) -> Result<(), EncodeError> {
    out.put_u8(o.version);
    out.put_u16(o.my_as);
    out.put_u16(o.hold_time);
    out.put_slice(&o.bgp_id.octets());
    let mut caps = BytesMut::new();
    for c in &o.capabilities {
        encode_capability(c, &mut caps)?;
    }
    if caps.is_empty() {
        out.put_u8(0);
    } else if caps.len() + 2 <= 255 {
        out.put_u8(caps.len() as u8 + 2);
        out.put_u8(PARAM_CAPABILITIES);
        out.put_u8(caps.len() as u8);
        out.put_slice(&caps);
    } else {
        let length = caps.len() + 3;
        if length > u16::MAX as usize {
            return Err(EncodeError::OptionalParametersTooLong { length });
        }
        out.put_u8(255);
        out.put_u8(PARAM_EXTENDED);
        out.put_u16(length as u16);
        out.put_u8(PARAM_CAPABILITIES);
        out.put_u16(caps.len() as u16);
        out.put_slice(&caps);
    }
    Ok(())
}

fn add_path_modes(o: &Open) -> impl Iterator<Item = (Family, AddPathMode)> + '_ {
    o.capabilities
        .iter()
        .flat_map(|c| match c {
            Capability::AddPath(v) => v.as_slice(),
            _ => &[],
        })
        .copied()
}

/// Derive the decode and encode contexts of a session from our OPEN (`local`) and the peer's (`remote`):
/// 4-octet AS when both sent it (RFC 6793 3), extended messages when both sent it (RFC 8654 3), and
/// ADD-PATH per family where one side sends and the other receives (RFC 7911 4). Whether the families
/// themselves were negotiated is the session's business.
pub fn contexts(local: &Open, remote: &Open) -> (DecodeCtx, EncodeCtx) {
    let has = |o: &Open, f: fn(&Capability) -> bool| o.capabilities.iter().any(f);
    let four = has(local, |c| matches!(c, Capability::FourOctetAs(_)))
        && has(remote, |c| matches!(c, Capability::FourOctetAs(_)));
    let ext = has(local, |c| matches!(c, Capability::ExtendedMessage))
        && has(remote, |c| matches!(c, Capability::ExtendedMessage));
    let sends = |m: AddPathMode| matches!(m, AddPathMode::Send | AddPathMode::Both);
    let receives = |m: AddPathMode| matches!(m, AddPathMode::Receive | AddPathMode::Both);
    let mut dec = DecodeCtx {
        four_octet_as: four,
        extended_message: ext,
        ..Default::default()
    };
    let mut enc = EncodeCtx {
        four_octet_as: four,
        extended_message: ext,
        ..Default::default()
    };
    for (f, lm) in add_path_modes(local) {
        for (rf, rm) in add_path_modes(remote) {
            if rf != f {
                continue;
            }
            if receives(lm) && sends(rm) {
                dec.add_path_rx.insert(f);
            }
            if sends(lm) && receives(rm) {
                enc.add_path_tx.insert(f);
            }
        }
    }
    (dec, enc)
}
