//! Recursive next-hop resolution for learned routes, as BIRD's `gateway recursive` (which Calico's BIRD
//! configuration sets): a BGP next hop is looked up in the node's own routes (the main table, every
//! protocol but margay's) and the learned route takes what the lookup found.
//!
//! - The best match is a device (connected) route: the next hop is on-link; install `via <next hop>`.
//! - The best match has gateways (a default route via the ToR, a static route): the learned route inherits
//!   them and their devices, `<block> via <ToR> dev eth0`, exactly as BIRD does. One level only: margay's
//!   own routes (learned over BGP) are never used to resolve, so BGP never resolves through BGP.
//! - No match, or a blackhole/unreachable/prohibit match: unresolved. The caller installs nothing for it,
//!   reports it and resolves again when the node's routes change.
//!
//! This module is pure lookups over a dump ([`Igp`]) plus the netlink dump and the route-change socket; it
//! owns no kernel state and writes nothing.

use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::Path;

use ipnetwork::IpNetwork;
use netlink_packet_route::route::RouteMessage;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};

use super::error::{ns_label, DataplaneError};
use super::fib::{parse_route, table_byte, NextHop, NextHops};
use super::netns::in_netns;
use super::nl::{decode_all, grow_rcvbuf, recv_into, NlSocket};

const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// One route of the node's own (non-margay) routing, as resolution needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IgpRoute {
    pub prefix: IpNetwork,
    pub metric: u32,
    pub next_hops: NextHops,
}

/// The routes a next hop is resolved through: one table, margay's protocol left out.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Igp {
    routes: Vec<IgpRoute>,
}

/// What a next hop resolves to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Resolution {
    /// On a connected network: the route goes `via` the next hop itself.
    OnLink,
    /// Through a route with gateways: the learned route inherits these (gateway and device each).
    Via(Vec<NextHop>),
    /// Nothing usable covers it (the reason, for logs and status).
    Unresolved(String),
}

impl Igp {
    pub fn new(routes: Vec<IgpRoute>) -> Igp {
        Igp { routes }
    }

    /// Longest prefix match (lowest metric among equal prefixes), as the kernel would choose.
    fn best(&self, nh: IpAddr) -> Option<&IgpRoute> {
        self.routes
            .iter()
            .filter(|r| r.prefix.is_ipv4() == nh.is_ipv4() && r.prefix.contains(nh))
            .min_by_key(|r| (std::cmp::Reverse(r.prefix.prefix()), r.metric))
    }

    /// Resolve a BGP next hop (BIRD `gateway recursive`, one level).
    pub fn resolve(&self, nh: IpAddr) -> Resolution {
        let Some(r) = self.best(nh) else {
            return Resolution::Unresolved(format!("no route covers next hop {nh}"));
        };
        match &r.next_hops {
            NextHops::Blackhole | NextHops::Unreachable => Resolution::Unresolved(format!(
                "next hop {nh} is covered by {} which drops it",
                r.prefix
            )),
            NextHops::Via(hops) if hops.is_empty() => Resolution::Unresolved(format!(
                "next hop {nh} is covered by {}, a route that does not forward",
                r.prefix
            )),
            NextHops::Via(hops) => {
                if hops.iter().all(|h| h.gateway.is_none()) {
                    return Resolution::OnLink;
                }
                // Inherit the gateways (and their devices) of the covering route; a device-only hop of a
                // mixed multipath route means the next hop is on that link.
                let mut out: Vec<NextHop> = hops
                    .iter()
                    .map(|h| match h.gateway {
                        Some(_) => NextHop {
                            gateway: h.gateway,
                            dev: h.dev.clone(),
                            onlink: h.onlink,
                        },
                        None => NextHop {
                            gateway: Some(nh),
                            dev: h.dev.clone(),
                            onlink: false,
                        },
                    })
                    .collect();
                out.sort();
                out.dedup();
                Resolution::Via(out)
            }
        }
    }

    /// Dump the main routing `table` of `netns`, every protocol but `own_protocol` (margay's).
    pub fn dump(netns: Option<&Path>, table: u32, own_protocol: u8) -> Result<Igp, DataplaneError> {
        let mut sock = NlSocket::open(netns)?;
        let mut routes = Vec::new();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            msg.header.table = table_byte(table);
            msg.attributes
                .push(netlink_packet_route::route::RouteAttribute::Table(table));
            let replies = sock
                .dump(RouteNetlinkMessage::GetRoute(msg))
                .map_err(|source| DataplaneError::Netlink {
                    op: "dump routes",
                    object: format!("of table {table} (next-hop resolution)"),
                    netns: ns_label(netns),
                    source,
                })?;
            for reply in replies {
                if let RouteNetlinkMessage::NewRoute(m) = reply {
                    if let Some(k) = parse_route(&m) {
                        if k.table == table && k.protocol != own_protocol {
                            routes.push(IgpRoute {
                                prefix: k.route.prefix,
                                metric: k.metric,
                                next_hops: k.route.next_hops,
                            });
                        }
                    }
                }
            }
        }
        Ok(Igp { routes })
    }
}

/// A non-blocking socket on the IPv4 and IPv6 route-change groups of `netns`: anything readable on it
/// means the node's routes changed (the caller filters out margay's own protocol).
pub fn route_monitor(netns: Option<&Path>) -> Result<Socket, DataplaneError> {
    let label = ns_label(netns);
    in_netns(netns, || {
        let mk = || -> std::io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            s.add_membership(RTNLGRP_IPV4_ROUTE)?;
            s.add_membership(RTNLGRP_IPV6_ROUTE)?;
            grow_rcvbuf(s.as_raw_fd(), 1 << 20)?;
            s.set_non_blocking(true)?;
            Ok(s)
        };
        mk().map_err(|source| DataplaneError::Socket {
            netns: label.clone(),
            source,
        })
    })
}

/// Does this notification concern a route that next-hop resolution depends on (any route in `table` not
/// of `own_protocol`)? A notification that does not decode counts as a change.
pub fn is_igp_change(msg: &RouteNetlinkMessage, table: u32, own_protocol: u8) -> bool {
    let m = match msg {
        RouteNetlinkMessage::NewRoute(m) | RouteNetlinkMessage::DelRoute(m) => m,
        _ => return false,
    };
    match parse_route(m) {
        Some(k) => k.table == table && k.protocol != own_protocol,
        None => true,
    }
}

/// Read everything queued on a [`route_monitor`] socket without blocking; true when any of it concerns a
/// route resolution depends on (an overflow counts as a change: something was missed).
pub fn drain_changes(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
    table: u32,
    own_protocol: u8,
) -> std::io::Result<bool> {
    let mut changed = false;
    loop {
        match recv_into(fd, buf, libc::MSG_DONTWAIT) {
            Ok(0) => return Ok(changed),
            Ok(n) => {
                changed |= decode_all(&buf[..n])
                    .iter()
                    .any(|(_, m)| is_igp_change(m, table, own_protocol));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(changed),
            Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => changed = true,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::fib::Dev;

    fn r(prefix: &str, metric: u32, hops: NextHops) -> IgpRoute {
        IgpRoute {
            prefix: prefix.parse().unwrap(),
            metric,
            next_hops: hops,
        }
    }
    fn dev(i: u32) -> NextHop {
        NextHop {
            gateway: None,
            dev: Some(Dev::Index(i)),
            onlink: false,
        }
    }
    fn gw(g: &str, i: u32) -> NextHop {
        NextHop {
            gateway: Some(g.parse().unwrap()),
            dev: Some(Dev::Index(i)),
            onlink: false,
        }
    }

    #[test]
    fn connected_next_hop_is_on_link() {
        let igp = Igp::new(vec![
            r("10.1.0.0/24", 0, NextHops::Via(vec![dev(2)])),
            r("0.0.0.0/0", 0, NextHops::Via(vec![gw("10.1.0.1", 2)])),
        ]);
        assert_eq!(igp.resolve("10.1.0.7".parse().unwrap()), Resolution::OnLink);
    }

    #[test]
    fn off_link_next_hop_inherits_the_covering_gateway() {
        let igp = Igp::new(vec![
            r("10.1.0.0/24", 0, NextHops::Via(vec![dev(2)])),
            r("0.0.0.0/0", 0, NextHops::Via(vec![gw("10.1.0.1", 2)])),
            r("10.2.0.0/16", 10, NextHops::Via(vec![gw("10.1.0.9", 2)])),
            r("10.2.0.0/16", 5, NextHops::Via(vec![gw("10.1.0.5", 2)])),
        ]);
        assert_eq!(
            igp.resolve("10.3.0.2".parse().unwrap()),
            Resolution::Via(vec![gw("10.1.0.1", 2)])
        );
        // Longest prefix, then lowest metric.
        assert_eq!(
            igp.resolve("10.2.0.2".parse().unwrap()),
            Resolution::Via(vec![gw("10.1.0.5", 2)])
        );
    }

    #[test]
    fn uncovered_or_dropped_next_hop_is_unresolved() {
        let igp = Igp::new(vec![
            r("10.1.0.0/24", 0, NextHops::Via(vec![dev(2)])),
            r("10.9.0.0/16", 0, NextHops::Blackhole),
        ]);
        assert!(matches!(
            igp.resolve("10.2.0.2".parse().unwrap()),
            Resolution::Unresolved(_)
        ));
        assert!(matches!(
            igp.resolve("10.9.0.2".parse().unwrap()),
            Resolution::Unresolved(_)
        ));
        // IPv6 next hops are matched against IPv6 routes only.
        assert!(matches!(
            igp.resolve("fd00::1".parse().unwrap()),
            Resolution::Unresolved(_)
        ));
    }
}
