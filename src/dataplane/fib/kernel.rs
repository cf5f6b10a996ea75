//! Reading the kernel: the route-notification socket (with its sender filter), link indexes, and parsing
//! route messages into margay's model.

#[allow(unused_imports)]
use super::*;

/// The route-notification socket: IPv4 and IPv6 route groups, non-blocking, with a BPF filter that drops
/// notifications caused by our own write socket (port id `own_portid`) in the kernel, so a bulk install
/// does not flood it.
pub(super) fn open_monitor(
    netns: Option<&std::path::Path>,
    own_portid: u32,
) -> Result<Socket, DataplaneError> {
    let label = ns_label(netns);
    in_netns(netns, || {
        let mk = || -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            attach_sender_filter(s.as_raw_fd(), own_portid)?;
            s.add_membership(RTNLGRP_IPV4_ROUTE)?;
            s.add_membership(RTNLGRP_IPV6_ROUTE)?;
            grow_rcvbuf(s.as_raw_fd(), 8 << 20)?;
            s.set_non_blocking(true)?;
            Ok(s)
        };
        mk().map_err(|source| DataplaneError::Socket {
            netns: label.clone(),
            source,
        })
    })
}

/// Classic BPF: accept unless nlmsghdr.nlmsg_pid (offset 12) equals `portid`. BPF loads words in network
/// byte order while the header is in host order, hence the byte swap of the constant.
pub(super) fn attach_sender_filter(fd: RawFd, portid: u32) -> io::Result<()> {
    let k = u32::from_be_bytes(portid.to_ne_bytes());
    let code = [
        // ld [12]
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 12,
        },
        // jeq #k, drop, accept
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 1,
            jf: 0,
            k,
        },
        // accept
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0xffff_ffff,
        },
        // drop
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points at `code`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// "netlink port 1234 (ip)" — the sender of a notification, with the process name when the port id is a pid.
pub(super) fn describe_sender(portid: u32) -> String {
    if portid == 0 {
        return "the kernel".to_string();
    }
    match std::fs::read_to_string(format!("/proc/{portid}/comm")) {
        Ok(comm) => format!("netlink port {portid} ({})", comm.trim()),
        Err(_) => format!("netlink port {portid}"),
    }
}

/// Look a device up by name with RTM_GETLINK.
pub(crate) fn link_index(sock: &mut NlSocket, name: &str) -> Result<u32, NlError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let replies = sock.get(RouteNetlinkMessage::GetLink(msg))?;
    for r in replies {
        if let RouteNetlinkMessage::NewLink(l) = r {
            return Ok(l.header.index);
        }
    }
    Err(NlError {
        errno: libc::ENODEV,
        message: None,
    })
}

pub(crate) fn table_byte(table: u32) -> u8 {
    if table < 256 {
        table as u8
    } else {
        // RT_TABLE_UNSPEC: the RTA_TABLE attribute carries the real id.
        0
    }
}

/// A route as the kernel reported it.
pub(crate) struct KernelRoute {
    pub(crate) route: Route,
    pub(crate) protocol: u8,
    pub(crate) table: u32,
    pub(crate) metric: u32,
}

pub(super) fn addr_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn parse_route(m: &RouteMessage) -> Option<KernelRoute> {
    let v4 = match m.header.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return None,
    };
    let mut dst: Option<IpAddr> = None;
    let mut table = u32::from(m.header.table);
    let mut metric = 0;
    let mut gateway = None;
    let mut oif = None;
    let mut multipath = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr_of(d),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Gateway(g) => gateway = addr_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    });
    let prefix = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
    let next_hops = match m.header.kind {
        RouteType::BlackHole => NextHops::Blackhole,
        RouteType::Unreachable => NextHops::Unreachable,
        RouteType::Unicast => {
            let mut hops = Vec::new();
            if let Some(mp) = multipath {
                for h in mp {
                    let gw = h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => addr_of(g),
                        _ => None,
                    });
                    hops.push(NextHop {
                        gateway: gw,
                        dev: Some(Dev::Index(h.interface_index)),
                        onlink: h.flags.contains(RouteNextHopFlags::Onlink),
                    });
                }
            } else {
                hops.push(NextHop {
                    gateway,
                    dev: oif.map(Dev::Index),
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                });
            }
            hops.sort();
            NextHops::Via(hops)
        }
        // Other kinds (prohibit, throw, local...) never equal a desired route: replaced if ours.
        _ => NextHops::Via(Vec::new()),
    };
    Some(KernelRoute {
        route: Route { prefix, next_hops },
        protocol: m.header.protocol.into(),
        table,
        metric,
    })
}

/// Does the kernel's route satisfy the desired one? A desired next hop without a device accepts whatever
/// device the kernel resolved.
pub(super) fn matches(desired: &Route, kernel: &Route) -> bool {
    match (&desired.next_hops, &kernel.next_hops) {
        (NextHops::Blackhole, NextHops::Blackhole) => true,
        (NextHops::Unreachable, NextHops::Unreachable) => true,
        (NextHops::Via(d), NextHops::Via(k)) => {
            if d.len() != k.len() {
                return false;
            }
            // Both sorted; a desired hop without a device may sort differently from the kernel's, so match
            // each desired hop against an unused kernel hop.
            let mut used = vec![false; k.len()];
            d.iter().all(|dh| {
                let found = k.iter().enumerate().position(|(i, kh)| {
                    !used[i]
                        && dh.gateway == kh.gateway
                        && dh.onlink == kh.onlink
                        && (dh.dev.is_none() || dh.dev == kh.dev)
                });
                match found {
                    Some(i) => {
                        used[i] = true;
                        true
                    }
                    None => false,
                }
            })
        }
        _ => false,
    }
}
