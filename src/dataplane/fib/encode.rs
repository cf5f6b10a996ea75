//! Netlink encoding of route requests: a fast path for the common shapes and the general encoder.

#[allow(unused_imports)]
use super::*;

/// Append one op's request to `buf`. The common shapes (one next hop, blackhole, unreachable, delete) are
/// written directly, byte for byte what `netlink-packet-route` would emit for [`encode`]'s message (a
/// property test holds them equal); everything else goes through the crate.
pub(super) fn encode_op(cfg: &FibConfig, op: &Op, seq: u32, buf: &mut Vec<u8>) {
    if !encode_fast(cfg, op, seq, buf) {
        let (msg, flags) = encode(cfg, op);
        crate::dataplane::nl::encode_into(buf, seq, msg, flags);
    }
}

pub(super) const RTM_NEWROUTE: u16 = 24;
pub(super) const RTM_DELROUTE: u16 = 25;

pub(super) fn put_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    // Addresses and u32s are multiples of 4: no padding needed.
}

pub(super) fn put_addr(buf: &mut Vec<u8>, ty: u16, a: IpAddr) {
    match a {
        IpAddr::V4(v) => put_attr(buf, ty, &v.octets()),
        IpAddr::V6(v) => put_attr(buf, ty, &v.octets()),
    }
}

/// The hot path of [`encode_op`]; false when the op needs the general encoder (multipath).
pub(super) fn encode_fast(cfg: &FibConfig, op: &Op, seq: u32, buf: &mut Vec<u8>) -> bool {
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_PRIORITY: u16 = 6;
    const RTA_TABLE: u16 = 15;
    let (prefix, ty, flags, scope, kind, rtm_flags, hop) = match op {
        Op::Delete(p, _) => (*p, RTM_DELROUTE, 0u16, 255u8, 0u8, 0u32, None),
        Op::Create(r) | Op::Replace(r) => {
            let flags = if matches!(op, Op::Create(_)) {
                NLM_F_CREATE | NLM_F_EXCL
            } else {
                NLM_F_CREATE | NLM_F_REPLACE
            };
            match &r.next_hops {
                NextHops::Blackhole => (r.prefix, RTM_NEWROUTE, flags, 0, 6, 0, None),
                NextHops::Unreachable => (r.prefix, RTM_NEWROUTE, flags, 0, 7, 0, None),
                NextHops::Via(hops) if hops.len() == 1 => {
                    let h = &hops[0];
                    let scope = if h.gateway.is_none() { 253 } else { 0 };
                    let onlink = if h.onlink { 4u32 } else { 0 };
                    (r.prefix, RTM_NEWROUTE, flags, scope, 1, onlink, Some(h))
                }
                NextHops::Via(_) => return false,
            }
        }
    };
    let metric = match op {
        Op::Delete(_, m) => *m,
        _ => cfg.metric,
    };
    let start = buf.len();
    // nlmsghdr; the length is patched below.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(
        &(flags | netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK)
            .to_ne_bytes(),
    );
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg
    let family = if prefix.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    buf.extend_from_slice(&[
        family,
        prefix.prefix(),
        0,
        0,
        table_byte(cfg.table),
        cfg.protocol,
        scope,
        kind,
    ]);
    buf.extend_from_slice(&rtm_flags.to_ne_bytes());
    put_addr(buf, RTA_DST, prefix.ip());
    put_attr(buf, RTA_TABLE, &cfg.table.to_ne_bytes());
    put_attr(buf, RTA_PRIORITY, &metric.to_ne_bytes());
    if let Some(h) = hop {
        if let Some(gw) = h.gateway {
            put_addr(buf, RTA_GATEWAY, gw);
        }
        let idx = dev_index(&h.dev);
        if idx != 0 {
            put_attr(buf, RTA_OIF, &idx.to_ne_bytes());
        }
    }
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    true
}

pub(super) fn family(prefix: &IpNetwork) -> AddressFamily {
    if prefix.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

pub(super) fn base_header(cfg: &FibConfig, prefix: &IpNetwork) -> RouteHeader {
    RouteHeader {
        address_family: family(prefix),
        destination_prefix_length: prefix.prefix(),
        table: table_byte(cfg.table),
        protocol: RouteProtocol::from(cfg.protocol),
        ..Default::default()
    }
}

pub(super) fn dev_index(d: &Option<Dev>) -> u32 {
    match d {
        Some(Dev::Index(i)) => *i,
        _ => 0,
    }
}

/// The netlink message and flags for one op.
pub(super) fn encode(cfg: &FibConfig, op: &Op) -> (RouteNetlinkMessage, u16) {
    match op {
        Op::Delete(prefix, metric) => {
            let mut m = RouteMessage::default();
            m.header = base_header(cfg, prefix);
            // Match any scope and type: the kernel then matches on prefix, table, metric and protocol.
            m.header.scope = RouteScope::NoWhere;
            m.header.kind = RouteType::Unspec;
            m.attributes
                .push(RouteAttribute::Destination(prefix.ip().into()));
            m.attributes.push(RouteAttribute::Table(cfg.table));
            m.attributes.push(RouteAttribute::Priority(*metric));
            (RouteNetlinkMessage::DelRoute(m), 0)
        }
        Op::Create(r) | Op::Replace(r) => {
            let flags = if matches!(op, Op::Create(_)) {
                NLM_F_CREATE | NLM_F_EXCL
            } else {
                NLM_F_CREATE | NLM_F_REPLACE
            };
            let mut m = RouteMessage::default();
            m.header = base_header(cfg, &r.prefix);
            m.attributes
                .push(RouteAttribute::Destination(r.prefix.ip().into()));
            m.attributes.push(RouteAttribute::Table(cfg.table));
            m.attributes.push(RouteAttribute::Priority(cfg.metric));
            match &r.next_hops {
                NextHops::Blackhole => {
                    m.header.kind = RouteType::BlackHole;
                    m.header.scope = RouteScope::Universe;
                }
                NextHops::Unreachable => {
                    m.header.kind = RouteType::Unreachable;
                    m.header.scope = RouteScope::Universe;
                }
                NextHops::Via(hops) => {
                    m.header.kind = RouteType::Unicast;
                    m.header.scope = if hops.iter().all(|h| h.gateway.is_none()) {
                        RouteScope::Link
                    } else {
                        RouteScope::Universe
                    };
                    if hops.len() == 1 {
                        let h = &hops[0];
                        if let Some(gw) = h.gateway {
                            m.attributes.push(RouteAttribute::Gateway(gw.into()));
                        }
                        let idx = dev_index(&h.dev);
                        if idx != 0 {
                            m.attributes.push(RouteAttribute::Oif(idx));
                        }
                        if h.onlink {
                            m.header.flags |= RouteFlags::Onlink;
                        }
                    } else {
                        let mut nhs = Vec::with_capacity(hops.len());
                        for h in hops {
                            let mut nh = RouteNextHop::default();
                            nh.interface_index = dev_index(&h.dev);
                            if h.onlink {
                                nh.flags |= RouteNextHopFlags::Onlink;
                            }
                            if let Some(gw) = h.gateway {
                                nh.attributes.push(RouteAttribute::Gateway(gw.into()));
                            }
                            nhs.push(nh);
                        }
                        m.attributes.push(RouteAttribute::MultiPath(nhs));
                    }
                }
            }
            (RouteNetlinkMessage::NewRoute(m), flags)
        }
    }
}
