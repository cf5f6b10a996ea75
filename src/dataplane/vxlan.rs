//! The node's IPv4 VXLAN tunnel endpoint, as Calico's Felix builds it, so Calico and margay nodes can share
//! a VXLAN overlay: device `vxlan.calico`, VNI 4096, UDP port 4789, local address and parent = the node
//! address and the interface holding it, no learning (every entry is static), MAC `66:` + the first five
//! bytes of SHA-1(node name), the tunnel address as the device's only address (/32).
//!
//! Per remote node: a permanent neighbour entry (its tunnel address -> its VTEP MAC) and a permanent
//! `self` FDB entry (its VTEP MAC -> its node address). Routes through the tunnel go through the FIB task
//! (`<block> via <tunnel address> dev vxlan.calico onlink`); this module owns the device and its entries.
//! Blocking netlink calls in the node's namespace: call from `spawn_blocking`.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::RouteType;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use sha1::{Digest, Sha1};

use super::error::DataplaneError;
use super::nl::NlSocket;
use super::pod::{delete_link, find_link, nl_err, set_link_up};

/// Calico's IPv4 VXLAN device name.
pub const DEVICE: &str = "vxlan.calico";
/// Calico's IPv6 VXLAN device name.
pub const DEVICE_V6: &str = "vxlan-v6.calico";
/// Felix's default VNI (`FELIX_VXLANVNI`).
pub const VNI: u32 = 4096;
/// The IANA VXLAN port (`FELIX_VXLANPORT`).
pub const PORT: u16 = 4789;

/// A node's VTEP MAC as every Calico node derives it (`vtepMACForHost`): `0x66` (locally administered,
/// unicast), then the first five bytes of SHA-1 of the node name.
pub fn vtep_mac(node: &str) -> [u8; 6] {
    let h = Sha1::digest(node.as_bytes());
    [0x66, h[0], h[1], h[2], h[3], h[4]]
}

/// The IPv6 VTEP's MAC: the same rule over `<node>-v6`.
pub fn vtep_mac_v6(node: &str) -> [u8; 6] {
    vtep_mac(&format!("{node}-v6"))
}

/// The device of a family.
pub fn device(v6: bool) -> &'static str {
    if v6 {
        DEVICE_V6
    } else {
        DEVICE
    }
}

/// `66:0a:21:41:0a:c1`.
pub fn mac_string(m: &[u8]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The local VTEP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalVtep {
    /// The node address (the tunnel's outer source); its interface is the parent. Its family is the
    /// device's (`vxlan.calico` or `vxlan-v6.calico`).
    pub node_ip: IpAddr,
    pub tunnel_ip: IpAddr,
    pub mac: [u8; 6],
    pub mtu: u32,
}

/// A remote node's VTEP.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct RemoteVtep {
    pub node_ip: IpAddr,
    pub tunnel_ip: IpAddr,
    pub mac: [u8; 6],
}

fn parent_index(sock: &mut NlSocket, ip: IpAddr) -> Result<u32, DataplaneError> {
    let mut m = AddressMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let replies = sock
        .dump(RouteNetlinkMessage::GetAddress(m))
        .map_err(|e| nl_err(sock, "dump addresses", "to find the VXLAN parent", e))?;
    for r in replies {
        let RouteNetlinkMessage::NewAddress(a) = r else {
            continue;
        };
        let has = a.attributes.iter().any(
            |x| matches!(x, AddressAttribute::Local(v) | AddressAttribute::Address(v) if *v == ip),
        );
        if has {
            return Ok(a.header.index);
        }
    }
    Err(DataplaneError::Invalid {
        what: "VXLAN parent",
        value: ip.to_string(),
        reason: format!("no interface in {} holds the node address", sock.netns),
    })
}

/// Make `vxlan.calico` exist with exactly `v`'s settings (created, or deleted and created again when its MAC
/// differs, as Felix does), up, with the tunnel address as its only address. Returns its index.
pub fn ensure_device(netns: Option<&Path>, v: &LocalVtep) -> Result<u32, DataplaneError> {
    let dev = device(v.node_ip.is_ipv6());
    let mut sock = NlSocket::open(netns)?;
    let parent = parent_index(&mut sock, v.node_ip)?;
    if let Some(l) = find_link(&mut sock, dev)? {
        if l.mac != v.mac {
            delete_link(&mut sock, l.index, dev)?;
        }
    }
    let index = match find_link(&mut sock, dev)? {
        Some(l) => l.index,
        None => {
            let mut msg = LinkMessage::default();
            msg.attributes.push(LinkAttribute::IfName(dev.into()));
            msg.attributes.push(LinkAttribute::Address(v.mac.to_vec()));
            msg.attributes.push(LinkAttribute::Mtu(v.mtu));
            msg.attributes.push(LinkAttribute::LinkInfo(vec![
                LinkInfo::Kind(InfoKind::Vxlan),
                LinkInfo::Data(InfoData::Vxlan(vec![
                    InfoVxlan::Id(VNI),
                    InfoVxlan::Link(parent),
                    match v.node_ip {
                        IpAddr::V4(a) => InfoVxlan::Local(a),
                        IpAddr::V6(a) => InfoVxlan::Local6(a),
                    },
                    // Emitted in network byte order by the codec (IFLA_VXLAN_PORT is big-endian).
                    InfoVxlan::Port(PORT),
                    InfoVxlan::Learning(false),
                ])),
            ]));
            sock.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
                .map_err(|e| nl_err(&sock, "create VXLAN device", dev, e))?;
            find_link(&mut sock, dev)?
                .ok_or_else(|| DataplaneError::DeviceNotFound {
                    name: dev.into(),
                    netns: sock.netns.clone(),
                })?
                .index
        }
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::Mtu(v.mtu));
    sock.request(RouteNetlinkMessage::SetLink(msg), 0)
        .map_err(|e| nl_err(&sock, "set MTU", dev, e))?;
    super::encap::set_only_address(&mut sock, index, dev, v.tunnel_ip)?;
    set_link_up(&mut sock, index, dev, None)?;
    Ok(index)
}

/// The index of the VXLAN device of a family, if it exists.
pub fn device_index(netns: Option<&Path>, v6: bool) -> Result<Option<u32>, DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    Ok(find_link(&mut sock, device(v6))?.map(|l| l.index))
}

/// Remove the VXLAN device of a family (no pool of it uses VXLAN any more). Success if it is not there.
pub fn remove_device(netns: Option<&Path>, v6: bool) -> Result<(), DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    match find_link(&mut sock, device(v6))? {
        Some(l) => delete_link(&mut sock, l.index, device(v6)),
        None => Ok(()),
    }
}

fn neigh(index: u32, fdb: bool, dst: IpAddr, mac: [u8; 6]) -> NeighbourMessage {
    let family = match (fdb, dst) {
        (true, _) => AddressFamily::Bridge,
        (false, IpAddr::V4(_)) => AddressFamily::Inet,
        (false, IpAddr::V6(_)) => AddressFamily::Inet6,
    };
    let mut m = NeighbourMessage::default();
    m.header.family = family;
    m.header.ifindex = index;
    m.header.state = NeighbourState::Permanent;
    m.header.kind = RouteType::Unicast;
    if fdb {
        m.header.flags = NeighbourFlags::Own;
    }
    m.attributes
        .push(NeighbourAttribute::Destination(match dst {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
    m.attributes
        .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
    m
}

/// Program the entries of `want` on the device (ARP: tunnel address -> MAC; FDB: MAC -> node address) and
/// delete those of `gone`.
pub fn sync_remotes(
    netns: Option<&Path>,
    index: u32,
    want: &BTreeSet<RemoteVtep>,
    gone: &BTreeSet<RemoteVtep>,
) -> Result<(), DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    for r in gone {
        for (dst, fdb) in [(r.tunnel_ip, false), (r.node_ip, true)] {
            let m = neigh(index, fdb, dst, r.mac);
            let _ = sock.request(RouteNetlinkMessage::DelNeighbour(m), 0);
        }
    }
    for r in want {
        for (dst, fdb, what) in [
            (r.tunnel_ip, false, "VXLAN neighbour"),
            (r.node_ip, true, "VXLAN FDB entry"),
        ] {
            let m = neigh(index, fdb, dst, r.mac);
            sock.request(
                RouteNetlinkMessage::NewNeighbour(m),
                NLM_F_CREATE | NLM_F_REPLACE,
            )
            .map_err(|e| {
                nl_err(
                    &sock,
                    "program",
                    format!("{what} {} / {}", r.tunnel_ip, mac_string(&r.mac)),
                    e,
                )
            })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_mac_is_calico_s() {
        // The MAC every Calico node computes for node1.
        let h = Sha1::digest(b"node1");
        let m = vtep_mac("node1");
        assert_eq!(m[0], 0x66);
        assert_eq!(&m[1..], &h[..5]);
        // Locally administered, unicast.
        assert_eq!(m[0] & 0x03, 0x02);
        assert_eq!(mac_string(&[0x66, 0x0a, 0, 1, 2, 3]), "66:0a:00:01:02:03");
    }
}
