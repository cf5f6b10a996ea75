//! UPDATE (RFC 4271 4.3): path attributes, MP_REACH / MP_UNREACH (RFC 4760), the RFC 6793 AS4 merge and
//! generation, RFC 7606 error classification, and the bulk packers the RIB uses for full tables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use bytes::{BufMut, BytesMut};

use super::attr::{self, FLAG_EXTENDED_LENGTH, FLAG_OPTIONAL, FLAG_PARTIAL, FLAG_TRANSITIVE};
use super::error::{DecodeError, EncodeError, Rfc7606Action};
use super::nlri::{decode_nlri, encode_nlris, encode_nlris_sized, nlri_len};
use super::types::*;
use super::{begin_message, finish_message, msg_type, DecodeCtx, EncodeCtx, HEADER_LEN};

/// Optional/transitive bits each understood attribute must carry (RFC 4271 5, RFC 4760, RFC 4456,
/// RFC 6793, RFC 8092). `None` for attributes margay does not interpret.
fn expected_flags(t: u8) -> Option<u8> {
    const WELL_KNOWN: u8 = FLAG_TRANSITIVE;
    const OPT_TRANS: u8 = FLAG_OPTIONAL | FLAG_TRANSITIVE;
    const OPT_NON_TRANS: u8 = FLAG_OPTIONAL;
    Some(match t {
        attr::ORIGIN
        | attr::AS_PATH
        | attr::NEXT_HOP
        | attr::LOCAL_PREF
        | attr::ATOMIC_AGGREGATE => WELL_KNOWN,
        attr::MULTI_EXIT_DISC | attr::ORIGINATOR_ID | attr::CLUSTER_LIST => OPT_NON_TRANS,
        attr::MP_REACH_NLRI | attr::MP_UNREACH_NLRI => OPT_NON_TRANS,
        attr::AGGREGATOR
        | attr::COMMUNITIES
        | attr::AS4_PATH
        | attr::AS4_AGGREGATOR
        | attr::LARGE_COMMUNITIES => OPT_TRANS,
        _ => return None,
    })
}

fn is_supported(f: Family) -> bool {
    f.safi == Safi::Unicast && matches!(f.afi, Afi::Ipv4 | Afi::Ipv6)
}

/// Per-UPDATE decode state that does not belong in `PathAttributes`.
#[derive(Default)]
struct AttrState {
    as4_path: Option<AsPath>,
    as4_aggregator: Option<Aggregator>,
    /// First treat-as-withdraw cause seen.
    withdraw_cause: Option<DecodeError>,
    /// Attribute types seen so far (RFC 7606 3 (c) duplicate detection).
    seen: [u64; 4],
}

impl AttrState {
    fn first_time(&mut self, t: u8) -> bool {
        let (w, b) = ((t >> 6) as usize, 1u64 << (t & 63));
        let first = self.seen[w] & b == 0;
        self.seen[w] |= b;
        first
    }
    fn withdraw(&mut self, e: DecodeError) {
        if self.withdraw_cause.is_none() {
            self.withdraw_cause = Some(e);
        }
    }
}

pub(crate) fn decode_update(
    b: &[u8],
    ctx: &DecodeCtx,
    discarded: &mut Vec<DecodeError>,
) -> Result<Update, DecodeError> {
    // The header check guarantees at least 4 body bytes (minimum UPDATE length 23).
    let wlen = u16::from_be_bytes([b[0], b[1]]) as usize;
    let Some(&[a0, a1]) = b.get(2 + wlen..4 + wlen) else {
        return Err(DecodeError::MalformedAttributeList(
            "withdrawn routes length runs past the message",
        ));
    };
    let alen = u16::from_be_bytes([a0, a1]) as usize;
    let attrs_start = 4 + wlen;
    let Some(attrs_b) = b.get(attrs_start..attrs_start + alen) else {
        return Err(DecodeError::MalformedAttributeList(
            "total path attribute length runs past the message",
        ));
    };
    let v4_ap = ctx.add_path_rx.contains(&Family::IPV4_UNICAST);
    // RFC 7606 5.3: a syntactically wrong NLRI field is a session reset. Both IPv4 fields are decoded
    // before the attributes so that a treat-as-withdraw outcome can list every prefix.
    let mut withdrawn = Vec::new();
    decode_nlri(&b[2..2 + wlen], Family::IPV4_UNICAST, v4_ap, &mut withdrawn)?;
    let mut nlri = Vec::new();
    decode_nlri(
        &b[attrs_start + alen..],
        Family::IPV4_UNICAST,
        v4_ap,
        &mut nlri,
    )?;

    let mut attrs = PathAttributes::default();
    let mut st = AttrState::default();
    decode_attributes(attrs_b, ctx, &mut attrs, &mut st, discarded)?;

    if !ctx.four_octet_as {
        merge_as4(&mut attrs, &mut st);
    }

    // RFC 7606 3 (d) / RFC 4271 6.3: mandatory attributes are only needed when something is announced;
    // NEXT_HOP only for the IPv4 NLRI field (RFC 4760 3).
    let announces = !nlri.is_empty() || attrs.mp_reach.as_ref().is_some_and(|r| !r.nlri.is_empty());
    if st.withdraw_cause.is_none() && announces {
        if attrs.origin.is_none() {
            st.withdraw(DecodeError::MissingWellKnown(attr::ORIGIN));
        } else if attrs.as_path.is_none() {
            st.withdraw(DecodeError::MissingWellKnown(attr::AS_PATH));
        } else if attrs.next_hop.is_none() && !nlri.is_empty() {
            st.withdraw(DecodeError::MissingWellKnown(attr::NEXT_HOP));
        }
    }

    // RFC 4271 6.3 / RFC 7606 7.2: from an external peer the leftmost AS is the peer's own, and (RFC 5065 5,
    // no confederation here) no confederation segment may appear.
    if let (Some(peer_as), Some(path), true) = (ctx.ebgp_peer_as, &attrs.as_path, announces) {
        let reason = match path.segments.first() {
            _ if path
                .segments
                .iter()
                .any(|s| matches!(s, AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_))) =>
            {
                Some("confederation segment from an external peer")
            }
            Some(AsSegment::Sequence(v)) if v.first() == Some(&peer_as) => None,
            _ => Some("the leftmost AS is not the external peer's AS"),
        };
        if let Some(reason) = reason {
            st.withdraw(DecodeError::MalformedAsPath {
                type_code: attr::AS_PATH,
                reason,
                data: Vec::new(),
            });
        }
    }

    if let Some(cause) = st.withdraw_cause {
        // RFC 7606 5.2: with path attributes but nothing announced, treat-as-withdraw would accept the
        // malformed UPDATE silently; the session resets instead.
        if !announces && !attrs_b.is_empty() {
            return Err(DecodeError::NothingToWithdraw {
                cause: Box::new(cause),
            });
        }
        let mut withdraw: Vec<(Family, Vec<Nlri>)> = Vec::new();
        let mut add = |f: Family, v: Vec<Nlri>| {
            if v.is_empty() {
                return;
            }
            match withdraw.iter_mut().find(|(wf, _)| *wf == f) {
                Some((_, w)) => w.extend(v),
                None => withdraw.push((f, v)),
            }
        };
        withdrawn.extend(nlri);
        add(Family::IPV4_UNICAST, withdrawn);
        if let Some(u) = attrs.mp_unreach {
            add(u.family, u.withdrawn);
        }
        if let Some(r) = attrs.mp_reach {
            add(r.family, r.nlri);
        }
        return Err(DecodeError::TreatAsWithdraw {
            cause: Box::new(cause),
            withdraw,
        });
    }
    Ok(Update {
        withdrawn,
        attributes: attrs,
        nlri,
    })
}

fn decode_attributes(
    a: &[u8],
    ctx: &DecodeCtx,
    attrs: &mut PathAttributes,
    st: &mut AttrState,
    discarded: &mut Vec<DecodeError>,
) -> Result<(), DecodeError> {
    let mut i = 0;
    while i < a.len() {
        let rem = &a[i..];
        // RFC 7606 4: too few octets for an attribute header, or a length past the end, is
        // treat-as-withdraw; the Total Attribute Length still locates the NLRI.
        if rem.len() < 3 {
            st.withdraw(DecodeError::AttributeOverrun { type_code: None });
            break;
        }
        let (flags, t) = (rem[0], rem[1]);
        let (hl, len) = if flags & FLAG_EXTENDED_LENGTH != 0 {
            match rem.get(2..4) {
                Some(l) => (4, u16::from_be_bytes([l[0], l[1]]) as usize),
                None => {
                    st.withdraw(DecodeError::AttributeOverrun { type_code: Some(t) });
                    break;
                }
            }
        } else {
            (3, rem[2] as usize)
        };
        let Some(raw) = rem.get(..hl + len) else {
            st.withdraw(DecodeError::AttributeOverrun { type_code: Some(t) });
            break;
        };
        let v = &raw[hl..];
        i += hl + len;

        // RFC 7606 7.5, 7.9, 7.10: from an external peer these are discarded, well-formed or not.
        if ctx.ebgp_peer_as.is_some()
            && matches!(
                t,
                attr::LOCAL_PREF | attr::ORIGINATOR_ID | attr::CLUSTER_LIST
            )
        {
            discarded.push(DecodeError::FromExternalPeer {
                type_code: t,
                data: raw.to_vec(),
            });
            continue;
        }
        if !st.first_time(t) {
            let e = DecodeError::DuplicateAttribute { type_code: t };
            match e.action() {
                Rfc7606Action::SessionReset => return Err(e),
                _ => {
                    discarded.push(e);
                    continue;
                }
            }
        }
        let Some(expected) = expected_flags(t) else {
            if flags & FLAG_OPTIONAL == 0 {
                return Err(DecodeError::UnrecognizedWellKnown {
                    type_code: t,
                    data: raw.to_vec(),
                });
            }
            // RFC 4271 9: unrecognised optional transitive attributes are passed on; non-transitive
            // ones are quietly ignored.
            if flags & FLAG_TRANSITIVE != 0 {
                attrs.unknown.push(RawAttribute {
                    flags: flags & 0xe0,
                    type_code: t,
                    value: v.to_vec(),
                });
            }
            continue;
        };
        let flags_ok = flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE) == expected;
        if !flags_ok {
            let e = DecodeError::AttributeFlags {
                type_code: t,
                data: raw.to_vec(),
            };
            // RFC 7606 3 (c), 3 (f), 5.3: see `DecodeError::action`.
            match e.action() {
                Rfc7606Action::SessionReset => return Err(e),
                Rfc7606Action::TreatAsWithdraw => st.withdraw(e),
                Rfc7606Action::AttributeDiscard => discarded.push(e),
            }
            continue;
        }
        if let Err(e) = decode_known(t, v, raw, ctx, attrs, st) {
            match e.action() {
                Rfc7606Action::SessionReset => return Err(e),
                Rfc7606Action::TreatAsWithdraw => st.withdraw(e),
                Rfc7606Action::AttributeDiscard => discarded.push(e),
            }
        }
    }
    Ok(())
}

#[inline]
fn be32(v: &[u8]) -> u32 {
    u32::from_be_bytes([v[0], v[1], v[2], v[3]])
}

fn len_err(t: u8, raw: &[u8], v: &[u8]) -> DecodeError {
    DecodeError::AttributeLength {
        type_code: t,
        length: v.len(),
        data: raw.to_vec(),
    }
}

fn decode_known(
    t: u8,
    v: &[u8],
    raw: &[u8],
    ctx: &DecodeCtx,
    attrs: &mut PathAttributes,
    st: &mut AttrState,
) -> Result<(), DecodeError> {
    match t {
        attr::ORIGIN => {
            if v.len() != 1 {
                return Err(len_err(t, raw, v));
            }
            attrs.origin = Some(match v[0] {
                0 => Origin::Igp,
                1 => Origin::Egp,
                2 => Origin::Incomplete,
                _ => return Err(DecodeError::InvalidOrigin { data: raw.to_vec() }),
            });
        }
        attr::AS_PATH => {
            attrs.as_path = Some(decode_as_path(
                v,
                if ctx.four_octet_as { 4 } else { 2 },
                t,
                raw,
            )?);
        }
        attr::NEXT_HOP => {
            if v.len() != 4 {
                return Err(len_err(t, raw, v));
            }
            let nh = Ipv4Addr::from(be32(v));
            // RFC 4271 6.3: syntactically the NEXT_HOP must be a valid host address: not in 0/8 ("this
            // network") or 224/3 (multicast, reserved, broadcast). Invalid NEXT_HOP (3/8), treat-as-withdraw
            // by RFC 7606 3 (e). Loopback (which FRR refuses too) is let through: speakers tested on one
            // host use it, and the kernel refuses a route via it anyway.
            let o = nh.octets()[0];
            if o == 0 || o >= 224 {
                return Err(DecodeError::InvalidNextHop { data: raw.to_vec() });
            }
            attrs.next_hop = Some(nh);
        }
        attr::MULTI_EXIT_DISC | attr::LOCAL_PREF | attr::ORIGINATOR_ID => {
            if v.len() != 4 {
                return Err(len_err(t, raw, v));
            }
            match t {
                attr::MULTI_EXIT_DISC => attrs.med = Some(be32(v)),
                attr::LOCAL_PREF => attrs.local_pref = Some(be32(v)),
                _ => attrs.originator_id = Some(Ipv4Addr::from(be32(v))),
            }
        }
        attr::ATOMIC_AGGREGATE => {
            if !v.is_empty() {
                return Err(len_err(t, raw, v));
            }
            attrs.atomic_aggregate = true;
        }
        attr::AGGREGATOR => {
            // RFC 7606 7.7: 6 octets from a 2-octet session, 8 from a 4-octet one.
            attrs.aggregator = Some(match (ctx.four_octet_as, v.len()) {
                (true, 8) => Aggregator {
                    asn: be32(v),
                    address: Ipv4Addr::from(be32(&v[4..])),
                },
                (false, 6) => Aggregator {
                    asn: u16::from_be_bytes([v[0], v[1]]) as u32,
                    address: Ipv4Addr::from(be32(&v[2..])),
                },
                _ => return Err(len_err(t, raw, v)),
            });
        }
        attr::COMMUNITIES | attr::CLUSTER_LIST => {
            // RFC 7606 7.8 / 7.10: a non-zero multiple of 4.
            if v.is_empty() || !v.len().is_multiple_of(4) {
                return Err(len_err(t, raw, v));
            }
            if t == attr::COMMUNITIES {
                attrs.communities = v.chunks_exact(4).map(be32).collect();
            } else {
                attrs.cluster_list = v.chunks_exact(4).map(|c| Ipv4Addr::from(be32(c))).collect();
            }
        }
        attr::LARGE_COMMUNITIES => {
            // RFC 8092 6: a non-zero multiple of 12.
            if v.is_empty() || !v.len().is_multiple_of(12) {
                return Err(len_err(t, raw, v));
            }
            attrs.large_communities = v
                .chunks_exact(12)
                .map(|c| LargeCommunity {
                    global_admin: be32(c),
                    local_data1: be32(&c[4..]),
                    local_data2: be32(&c[8..]),
                })
                .collect();
        }
        attr::MP_REACH_NLRI => attrs.mp_reach = decode_mp_reach(v, raw, ctx)?,
        attr::MP_UNREACH_NLRI => attrs.mp_unreach = decode_mp_unreach(v, raw, ctx)?,
        // RFC 6793 4.1: between two 4-octet speakers AS4_PATH and AS4_AGGREGATOR are ignored.
        attr::AS4_PATH | attr::AS4_AGGREGATOR if ctx.four_octet_as => {}
        attr::AS4_PATH => {
            let mut p = decode_as_path(v, 4, t, raw)?;
            // RFC 6793 3: confederation segments are invalid in AS4_PATH; discard them and go on.
            p.segments
                .retain(|s| matches!(s, AsSegment::Sequence(_) | AsSegment::Set(_)));
            st.as4_path = Some(p);
        }
        attr::AS4_AGGREGATOR => {
            if v.len() != 8 {
                return Err(len_err(t, raw, v));
            }
            st.as4_aggregator = Some(Aggregator {
                asn: be32(v),
                address: Ipv4Addr::from(be32(&v[4..])),
            });
        }
        _ => {}
    }
    Ok(())
}

fn decode_as_path(v: &[u8], asn_len: usize, t: u8, raw: &[u8]) -> Result<AsPath, DecodeError> {
    let bad = |reason| DecodeError::MalformedAsPath {
        type_code: t,
        reason,
        data: raw.to_vec(),
    };
    let mut segments = Vec::new();
    let mut i = 0;
    while i < v.len() {
        let Some(&[st, n]) = v.get(i..i + 2) else {
            return Err(bad("truncated segment header"));
        };
        // RFC 7606 7.2: a zero segment length is malformed.
        if n == 0 {
            return Err(bad("segment of length 0"));
        }
        let end = i + 2 + n as usize * asn_len;
        let Some(asns) = v.get(i + 2..end) else {
            return Err(bad("segment runs past the end of the attribute"));
        };
        let asns: Vec<u32> = if asn_len == 4 {
            asns.chunks_exact(4).map(be32).collect()
        } else {
            asns.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]) as u32)
                .collect()
        };
        segments.push(match st {
            1 => AsSegment::Set(asns),
            2 => AsSegment::Sequence(asns),
            3 => AsSegment::ConfedSequence(asns),
            4 => AsSegment::ConfedSet(asns),
            _ => return Err(bad("unknown segment type")),
        });
        i = end;
    }
    Ok(AsPath { segments })
}

fn path_count(p: &AsPath) -> usize {
    p.len_for_decision()
}

/// RFC 6793 4.2.3: reconstruct the real path and aggregator from a 2-octet speaker's UPDATE.
fn merge_as4(attrs: &mut PathAttributes, st: &mut AttrState) {
    if let Some(as4agg) = st.as4_aggregator.take() {
        match attrs.aggregator {
            // The aggregator was an old speaker: AS4_AGGREGATOR and AS4_PATH are both stale.
            Some(agg) if agg.asn != AS_TRANS as u32 => return,
            Some(_) => attrs.aggregator = Some(as4agg),
            None => {}
        }
    }
    let (Some(as4), Some(path)) = (st.as4_path.take(), attrs.as_path.as_mut()) else {
        return;
    };
    let (n, n4) = (path_count(path), path_count(&as4));
    // AS4_PATH longer than AS_PATH: it is wrong and ignored.
    if n < n4 {
        return;
    }
    // Keep the leading (n - n4) ASes of AS_PATH (the old speakers' hops), then the AS4_PATH.
    let mut take = n - n4;
    let mut out = Vec::with_capacity(path.segments.len() + as4.segments.len());
    // Whether the last kept segment is a SEQUENCE cut short: the AS4_PATH continues it.
    let mut split = false;
    for seg in path.segments.drain(..) {
        match seg {
            // RFC 6793 4.2.3: a confederation segment is kept when it leads the path or is adjacent
            // to a kept segment, which is every one met before the cut.
            AsSegment::ConfedSequence(_) | AsSegment::ConfedSet(_) => out.push(seg),
            AsSegment::Sequence(v) => {
                if take == 0 {
                    break;
                }
                let k = take.min(v.len());
                take -= k;
                split = k < v.len();
                out.push(AsSegment::Sequence(v[..k].to_vec()));
            }
            AsSegment::Set(v) => {
                if take == 0 {
                    break;
                }
                take -= 1;
                split = false;
                out.push(AsSegment::Set(v));
            }
        }
    }
    let mut as4 = as4.segments;
    if split && matches!(as4.first(), Some(AsSegment::Sequence(_))) {
        if let (Some(AsSegment::Sequence(last)), AsSegment::Sequence(first)) =
            (out.last_mut(), as4.remove(0))
        {
            last.extend(first);
        }
    }
    out.extend(as4);
    path.segments = out;
}

fn decode_family(v: &[u8]) -> Family {
    Family {
        afi: Afi::from_code(u16::from_be_bytes([v[0], v[1]])),
        safi: Safi::from_code(v[2]),
    }
}

fn decode_mp_reach(v: &[u8], raw: &[u8], ctx: &DecodeCtx) -> Result<Option<MpReach>, DecodeError> {
    let bad = |reason| DecodeError::OptionalAttribute {
        type_code: attr::MP_REACH_NLRI,
        reason,
        data: raw.to_vec(),
    };
    if v.len() < 5 {
        return Err(bad(
            "shorter than AFI, SAFI, next-hop length and reserved octet",
        ));
    }
    let family = decode_family(v);
    let nhl = v[3] as usize;
    let Some(nh) = v.get(4..4 + nhl) else {
        return Err(bad("next hop runs past the attribute"));
    };
    // One reserved octet follows the next hop (RFC 4760 3).
    let Some(nlri_b) = v.get(5 + nhl..) else {
        return Err(bad("no reserved octet after the next hop"));
    };
    // RFC 4760 7: an AFI/SAFI we did not negotiate or do not know is ignored.
    if !is_supported(family) {
        return Ok(None);
    }
    let v6 = |b: &[u8]| {
        let mut o = [0u8; 16];
        o.copy_from_slice(b);
        IpAddr::V6(Ipv6Addr::from(o))
    };
    // RFC 7606 7.11: a next-hop length that does not fit the AFI is a session reset. IPv4 NLRI may have an
    // IPv6 next hop (RFC 8950); IPv6 may carry a global and a link-local address (RFC 2545 3).
    let next_hop = match (family.afi, nhl) {
        (Afi::Ipv4, 4) => vec![IpAddr::V4(Ipv4Addr::from(be32(nh)))],
        (_, 16) => vec![v6(nh)],
        (_, 32) => vec![v6(&nh[..16]), v6(&nh[16..])],
        _ => return Err(bad("next-hop length does not fit the address family")),
    };
    let mut nlri = Vec::new();
    decode_nlri(nlri_b, family, ctx.add_path_rx.contains(&family), &mut nlri)?;
    Ok(Some(MpReach {
        family,
        next_hop,
        nlri,
    }))
}

fn decode_mp_unreach(
    v: &[u8],
    raw: &[u8],
    ctx: &DecodeCtx,
) -> Result<Option<MpUnreach>, DecodeError> {
    if v.len() < 3 {
        return Err(DecodeError::OptionalAttribute {
            type_code: attr::MP_UNREACH_NLRI,
            reason: "shorter than AFI and SAFI",
            data: raw.to_vec(),
        });
    }
    let family = decode_family(v);
    if !is_supported(family) {
        return Ok(None);
    }
    let mut withdrawn = Vec::new();
    decode_nlri(
        &v[3..],
        family,
        ctx.add_path_rx.contains(&family),
        &mut withdrawn,
    )?;
    Ok(Some(MpUnreach { family, withdrawn }))
}

// ------------------------------------------------------------------------------------------------
// Encoding
// ------------------------------------------------------------------------------------------------

/// Write one attribute whose value `f` appends. The value is written after a 4-octet (extended length)
/// header that is shrunk to 3 octets when the value fits in 255, so the output is canonical.
fn put_attr(
    out: &mut BytesMut,
    flags: u8,
    t: u8,
    f: impl FnOnce(&mut BytesMut) -> Result<(), EncodeError>,
) -> Result<(), EncodeError> {
    let start = out.len();
    out.put_u8(flags | FLAG_EXTENDED_LENGTH);
    out.put_u8(t);
    out.put_u16(0);
    f(out)?;
    let length = out.len() - start - 4;
    if length > u16::MAX as usize {
        return Err(EncodeError::AttributeTooLong {
            type_code: t,
            length,
        });
    }
    if length <= 255 {
        out[start] = flags & !FLAG_EXTENDED_LENGTH;
        out[start + 2] = length as u8;
        out.copy_within(start + 4.., start + 3);
        out.truncate(out.len() - 1);
    } else {
        out[start + 2..start + 4].copy_from_slice(&(length as u16).to_be_bytes());
    }
    Ok(())
}

fn put_as_path(out: &mut BytesMut, p: &AsPath, four: bool, skip_confed: bool) {
    for seg in &p.segments {
        let (code, asns) = match seg {
            AsSegment::Set(v) => (1, v),
            AsSegment::Sequence(v) => (2, v),
            AsSegment::ConfedSequence(v) => (3, v),
            AsSegment::ConfedSet(v) => (4, v),
        };
        if skip_confed && code >= 3 {
            continue;
        }
        // A segment holds at most 255 ASes; longer ones are split (same meaning for sequences; sets
        // that large do not occur in practice).
        for chunk in asns.chunks(255) {
            out.put_u8(code);
            out.put_u8(chunk.len() as u8);
            for &a in chunk {
                if four {
                    out.put_u32(a);
                } else {
                    // RFC 6793 4.2.2: ASes that do not fit become AS_TRANS.
                    out.put_u16(u16::try_from(a).unwrap_or(AS_TRANS));
                }
            }
        }
    }
}

fn needs_as4_path(p: &AsPath) -> bool {
    p.segments.iter().any(|s| match s {
        AsSegment::Sequence(v) | AsSegment::Set(v) => v.iter().any(|&a| a > u16::MAX as u32),
        _ => false,
    })
}

/// All attributes except MP_REACH / MP_UNREACH, in ascending type order (RFC 4271 5 SHOULD), unknown
/// attributes merged in by type code.
pub(crate) fn encode_attrs(
    a: &PathAttributes,
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let four = ctx.four_octet_as;
    let mut unknown: Vec<&RawAttribute> = a.unknown.iter().collect();
    unknown.sort_by_key(|r| r.type_code);
    let mut unknown = unknown.into_iter().peekable();
    let mut flush_below = |code: u16, out: &mut BytesMut| -> Result<(), EncodeError> {
        while let Some(r) = unknown.next_if(|r| (r.type_code as u16) < code) {
            let mut flags = r.flags & 0xe0;
            // RFC 4271 9: we did not recognise it, so the Partial bit is set when passing it on.
            if flags & (FLAG_OPTIONAL | FLAG_TRANSITIVE) == FLAG_OPTIONAL | FLAG_TRANSITIVE {
                flags |= FLAG_PARTIAL;
            }
            put_attr(out, flags, r.type_code, |o| {
                o.put_slice(&r.value);
                Ok(())
            })?;
        }
        Ok(())
    };
    const WK: u8 = FLAG_TRANSITIVE;
    const OT: u8 = FLAG_OPTIONAL | FLAG_TRANSITIVE;
    const ON: u8 = FLAG_OPTIONAL;
    if let Some(o) = a.origin {
        flush_below(attr::ORIGIN as u16, out)?;
        out.put_slice(&[
            WK,
            attr::ORIGIN,
            1,
            match o {
                Origin::Igp => 0,
                Origin::Egp => 1,
                Origin::Incomplete => 2,
            },
        ]);
    }
    if let Some(p) = &a.as_path {
        flush_below(attr::AS_PATH as u16, out)?;
        put_attr(out, WK, attr::AS_PATH, |o| {
            put_as_path(o, p, four, false);
            Ok(())
        })?;
    }
    if let Some(nh) = a.next_hop {
        flush_below(attr::NEXT_HOP as u16, out)?;
        out.put_slice(&[WK, attr::NEXT_HOP, 4]);
        out.put_slice(&nh.octets());
    }
    if let Some(med) = a.med {
        flush_below(attr::MULTI_EXIT_DISC as u16, out)?;
        out.put_slice(&[ON, attr::MULTI_EXIT_DISC, 4]);
        out.put_u32(med);
    }
    if let Some(lp) = a.local_pref {
        flush_below(attr::LOCAL_PREF as u16, out)?;
        out.put_slice(&[WK, attr::LOCAL_PREF, 4]);
        out.put_u32(lp);
    }
    if a.atomic_aggregate {
        flush_below(attr::ATOMIC_AGGREGATE as u16, out)?;
        out.put_slice(&[WK, attr::ATOMIC_AGGREGATE, 0]);
    }
    if let Some(agg) = a.aggregator {
        flush_below(attr::AGGREGATOR as u16, out)?;
        if four {
            out.put_slice(&[OT, attr::AGGREGATOR, 8]);
            out.put_u32(agg.asn);
        } else {
            out.put_slice(&[OT, attr::AGGREGATOR, 6]);
            out.put_u16(u16::try_from(agg.asn).unwrap_or(AS_TRANS));
        }
        out.put_slice(&agg.address.octets());
    }
    if !a.communities.is_empty() {
        flush_below(attr::COMMUNITIES as u16, out)?;
        put_attr(out, OT, attr::COMMUNITIES, |o| {
            a.communities.iter().for_each(|&c| o.put_u32(c));
            Ok(())
        })?;
    }
    if let Some(id) = a.originator_id {
        flush_below(attr::ORIGINATOR_ID as u16, out)?;
        out.put_slice(&[ON, attr::ORIGINATOR_ID, 4]);
        out.put_slice(&id.octets());
    }
    if !a.cluster_list.is_empty() {
        flush_below(attr::CLUSTER_LIST as u16, out)?;
        put_attr(out, ON, attr::CLUSTER_LIST, |o| {
            a.cluster_list.iter().for_each(|c| o.put_slice(&c.octets()));
            Ok(())
        })?;
    }
    if !four {
        // RFC 6793 4.2.2: towards a 2-octet speaker, carry the real path and aggregator when they do
        // not fit in 2 octets.
        if let Some(p) = a.as_path.as_ref().filter(|p| needs_as4_path(p)) {
            flush_below(attr::AS4_PATH as u16, out)?;
            put_attr(out, OT, attr::AS4_PATH, |o| {
                put_as_path(o, p, true, true);
                Ok(())
            })?;
        }
        if let Some(agg) = a.aggregator.filter(|g| g.asn > u16::MAX as u32) {
            flush_below(attr::AS4_AGGREGATOR as u16, out)?;
            out.put_slice(&[OT, attr::AS4_AGGREGATOR, 8]);
            out.put_u32(agg.asn);
            out.put_slice(&agg.address.octets());
        }
    }
    if !a.large_communities.is_empty() {
        flush_below(attr::LARGE_COMMUNITIES as u16, out)?;
        put_attr(out, OT, attr::LARGE_COMMUNITIES, |o| {
            for c in &a.large_communities {
                o.put_u32(c.global_admin);
                o.put_u32(c.local_data1);
                o.put_u32(c.local_data2);
            }
            Ok(())
        })?;
    }
    flush_below(256, out)
}

/// The MP_REACH next hop for `family` as (bytes, length).
fn next_hop_bytes(family: Family, nh: &[IpAddr]) -> Result<([u8; 32], usize), EncodeError> {
    let mut b = [0u8; 32];
    let len = match (family.afi, nh) {
        (Afi::Ipv4, [IpAddr::V4(a)]) => {
            b[..4].copy_from_slice(&a.octets());
            4
        }
        (Afi::Ipv4 | Afi::Ipv6, [IpAddr::V6(a)]) => {
            b[..16].copy_from_slice(&a.octets());
            16
        }
        (Afi::Ipv4 | Afi::Ipv6, [IpAddr::V6(a), IpAddr::V6(ll)]) => {
            b[..16].copy_from_slice(&a.octets());
            b[16..].copy_from_slice(&ll.octets());
            32
        }
        _ => {
            return Err(EncodeError::BadNextHop {
                family,
                next_hop: format!("{nh:?}"),
            })
        }
    };
    Ok((b, len))
}

fn check_family(family: Family) -> Result<(), EncodeError> {
    if is_supported(family) {
        Ok(())
    } else {
        Err(EncodeError::UnsupportedFamily { family })
    }
}

pub(crate) fn encode_update(
    u: &Update,
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v4 = Family::IPV4_UNICAST;
    let v4_ap = ctx.add_path_tx.contains(&v4);
    let too_large = |length| EncodeError::MessageTooLarge {
        what: "UPDATE",
        length,
        max: u16::MAX as usize,
    };

    let wpos = out.len();
    out.put_u16(0);
    encode_nlris(&u.withdrawn, v4, v4_ap, out)?;
    let wlen = out.len() - wpos - 2;
    let wlen16 = u16::try_from(wlen).map_err(|_| too_large(wlen))?;
    out[wpos..wpos + 2].copy_from_slice(&wlen16.to_be_bytes());

    let apos = out.len();
    out.put_u16(0);
    let a = &u.attributes;
    // RFC 7606 5.1: MP_REACH_NLRI / MP_UNREACH_NLRI go first.
    if let Some(r) = &a.mp_reach {
        check_family(r.family)?;
        let (nh, nhl) = next_hop_bytes(r.family, &r.next_hop)?;
        let ap = ctx.add_path_tx.contains(&r.family);
        put_attr(out, FLAG_OPTIONAL, attr::MP_REACH_NLRI, |o| {
            o.put_u16(r.family.afi.code());
            o.put_u8(r.family.safi.code());
            o.put_u8(nhl as u8);
            o.put_slice(&nh[..nhl]);
            o.put_u8(0);
            encode_nlris(&r.nlri, r.family, ap, o)
        })?;
    }
    if let Some(un) = &a.mp_unreach {
        check_family(un.family)?;
        let ap = ctx.add_path_tx.contains(&un.family);
        put_attr(out, FLAG_OPTIONAL, attr::MP_UNREACH_NLRI, |o| {
            o.put_u16(un.family.afi.code());
            o.put_u8(un.family.safi.code());
            encode_nlris(&un.withdrawn, un.family, ap, o)
        })?;
    }
    encode_attrs(a, ctx, out)?;
    let alen = out.len() - apos - 2;
    let alen16 = u16::try_from(alen).map_err(|_| too_large(alen))?;
    out[apos..apos + 2].copy_from_slice(&alen16.to_be_bytes());

    encode_nlris(&u.nlri, v4, v4_ap, out)
}

/// Announce `nlri` (all of `family`) with one shared attribute set, packed into as few UPDATEs as the
/// session's maximum message size allows; returns how many UPDATEs were appended to `out`.
///
/// IPv4 unicast without `attrs.mp_reach` goes in the UPDATE's NLRI field with `attrs.next_hop`. Any other
/// family (or IPv4 with an IPv6 next hop, RFC 8950) goes in MP_REACH_NLRI, taking the next hop from
/// `attrs.mp_reach` (its own `nlri` is ignored). `attrs.mp_unreach` is ignored. The attributes are
/// encoded once and copied into each message. On error `out` is left as it was.
pub fn encode_updates(
    attrs: &PathAttributes,
    family: Family,
    nlri: &[Nlri],
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let start = out.len();
    let r = encode_updates_inner(attrs, family, nlri, ctx, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_updates_inner(
    attrs: &PathAttributes,
    family: Family,
    nlri: &[Nlri],
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    check_family(family)?;
    if nlri.is_empty() {
        return Ok(0);
    }
    let max = ctx.max_message_len(msg_type::UPDATE);
    let ap = ctx.add_path_tx.contains(&family);
    let mut fixed = BytesMut::with_capacity(256);
    encode_attrs(attrs, ctx, &mut fixed)?;
    let body_mode = family == Family::IPV4_UNICAST && attrs.mp_reach.is_none();
    let nh = if body_mode {
        None
    } else {
        let Some(r) = &attrs.mp_reach else {
            return Err(EncodeError::MissingNextHop { family });
        };
        Some(next_hop_bytes(family, &r.next_hop)?)
    };
    // Header, withdrawn length, attribute length, shared attributes; for MP also the MP_REACH header
    // (4-octet attribute header, AFI, SAFI, next-hop length, next hop, reserved).
    let mp_fixed = nh.map_or(0, |(_, l)| 4 + 2 + 1 + 1 + l + 1);
    let overhead = HEADER_LEN + 4 + fixed.len() + mp_fixed;
    let budget = max.saturating_sub(overhead);
    let mut count = 0;
    let mut i = 0;
    while i < nlri.len() {
        let mut size = 0;
        let mut j = i;
        while j < nlri.len() {
            let l = nlri_len(&nlri[j], ap);
            if size + l > budget {
                break;
            }
            size += l;
            j += 1;
        }
        if j == i {
            return Err(EncodeError::MessageTooLarge {
                what: "UPDATE with one prefix",
                length: overhead + nlri_len(&nlri[i], ap),
                max,
            });
        }
        let chunk = &nlri[i..j];
        out.reserve(overhead + size);
        let m = begin_message(out, msg_type::UPDATE);
        out.put_u16(0);
        let apos = out.len();
        out.put_u16(0);
        if let Some((nh, nhl)) = nh {
            put_attr(out, FLAG_OPTIONAL, attr::MP_REACH_NLRI, |o| {
                o.put_u16(family.afi.code());
                o.put_u8(family.safi.code());
                o.put_u8(nhl as u8);
                o.put_slice(&nh[..nhl]);
                o.put_u8(0);
                encode_nlris_sized(chunk, family, ap, size, o)
            })?;
            out.put_slice(&fixed);
            let alen = (out.len() - apos - 2) as u16;
            out[apos..apos + 2].copy_from_slice(&alen.to_be_bytes());
        } else {
            out.put_slice(&fixed);
            let alen = (out.len() - apos - 2) as u16;
            out[apos..apos + 2].copy_from_slice(&alen.to_be_bytes());
            encode_nlris_sized(chunk, family, ap, size, out)?;
        }
        finish_message(out, m, "UPDATE", max)?;
        count += 1;
        i = j;
    }
    Ok(count)
}

/// Withdraw `withdrawn` (all of `family`), packed into as few UPDATEs as the maximum size allows: IPv4
/// unicast in the withdrawn-routes field, other families in MP_UNREACH_NLRI. Returns how many UPDATEs
/// were appended. On error `out` is left as it was.
pub fn encode_withdrawals(
    family: Family,
    withdrawn: &[Nlri],
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    let start = out.len();
    let r = encode_withdrawals_inner(family, withdrawn, ctx, out);
    if r.is_err() {
        out.truncate(start);
    }
    r
}

fn encode_withdrawals_inner(
    family: Family,
    withdrawn: &[Nlri],
    ctx: &EncodeCtx,
    out: &mut BytesMut,
) -> Result<usize, EncodeError> {
    check_family(family)?;
    let max = ctx.max_message_len(msg_type::UPDATE);
    let ap = ctx.add_path_tx.contains(&family);
    let body_mode = family == Family::IPV4_UNICAST;
    let overhead = HEADER_LEN + 4 + if body_mode { 0 } else { 4 + 3 };
    let budget = max - overhead;
    let mut count = 0;
    let mut i = 0;
    while i < withdrawn.len() {
        let mut size = 0;
        let mut j = i;
        while j < withdrawn.len() {
            let l = nlri_len(&withdrawn[j], ap);
            if size + l > budget {
                break;
            }
            size += l;
            j += 1;
        }
        let chunk = &withdrawn[i..j];
        out.reserve(overhead + size);
        let m = begin_message(out, msg_type::UPDATE);
        if body_mode {
            out.put_u16(size as u16);
            encode_nlris_sized(chunk, family, ap, size, out)?;
            out.put_u16(0);
        } else {
            out.put_u16(0);
            let apos = out.len();
            out.put_u16(0);
            put_attr(out, FLAG_OPTIONAL, attr::MP_UNREACH_NLRI, |o| {
                o.put_u16(family.afi.code());
                o.put_u8(family.safi.code());
                encode_nlris_sized(chunk, family, ap, size, o)
            })?;
            let alen = (out.len() - apos - 2) as u16;
            out[apos..apos + 2].copy_from_slice(&alen.to_be_bytes());
        }
        finish_message(out, m, "UPDATE", max)?;
        count += 1;
        i = j;
    }
    Ok(count)
}
