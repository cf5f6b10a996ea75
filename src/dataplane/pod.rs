//! Pod plumbing: the veth pair between a node's network namespace and a pod's, the pod's addresses and
//! routes, the host-side settings and the host routes. This is what the CNI path calls (ADD, DEL, CHECK),
//! and what the daemon lists after a restart to rebuild its state from the kernel.
//!
//! It owns host interfaces named `mg` + 11 hex characters of SHA-256(workload id) and the host routes with
//! [`POD_ROUTE_PROTOCOL`] through them, and the peers `mgt` + the same hex that [`add_endpoint`] leaves in
//! the node's namespace for a runtime that moves the interface itself (Docker); it never touches another
//! interface. Everything runs on sockets opened
//! inside the right namespace: the node's (given by path, `None` for the current one) and the pod's.
//!
//! ```text
//!   node netns                                  pod netns
//!   mgXXXXXXXXXXX (ee:ee:ee:ee:ee:ee) ◀─veth─▶ eth0   10.244.1.5/32, fd00::5/128
//!     proxy_arp=1 forwarding=1                   169.254.1.1 dev eth0 scope link
//!     proxy_ndp=1 accept_ra=0                    default via 169.254.1.1 dev eth0
//!   10.244.1.5/32 dev mgX scope link              default via fe80::ecee:eeff:feee:eeee dev eth0
//! ```
//! Any failure after the veth exists deletes it, which takes its peer, addresses and routes with it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use sha2::{Digest, Sha256};

use super::error::{ns_label, DataplaneError, NlError};
use super::netns::{in_netns, open_netns};
use super::nl::NlSocket;
use super::sysctl;

/// Prefix of margay's host-side interfaces.
pub const HOST_PREFIX: &str = "mg";
/// The host side's MAC. Pods then never need to re-learn it when a veth is re-created.
pub const HOST_MAC: [u8; 6] = [0xee; 6];
/// Route protocol of the host `/32` (`/128`) routes and the pod's own routes. Not the FIB's number, so the
/// FIB task never adopts or removes them.
pub const POD_ROUTE_PROTOCOL: u8 = 78;
/// The pod's IPv4 next hop; the host veth answers ARP for it (proxy_arp).
pub const POD_GATEWAY_V4: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pod's IPv6 next hop: the host veth's EUI-64 link-local address from [`HOST_MAC`].
pub const POD_GATEWAY_V6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0xecee, 0xeeff, 0xfeee, 0xeeee);

/// What ADD is asked to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodSpec {
    /// The node's network namespace (`None`: the one margay runs in).
    pub node_netns: Option<PathBuf>,
    /// The pod's network namespace: /var/run/netns/NAME or /proc/PID/ns/net.
    pub pod_netns: PathBuf,
    /// Stable id of the workload (container id + interface, or namespace.pod): names the host veth.
    pub workload_id: String,
    /// Interface name inside the pod, usually eth0.
    pub ifname: String,
    pub mtu: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// What ADD built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodResult {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub pod_ifname: String,
    pub pod_ifindex: u32,
    /// The pod interface's MAC, `aa:bb:...`.
    pub pod_mac: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A pod this node has plumbed, as found in the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlumbedPod {
    pub host_ifname: String,
    pub host_ifindex: u32,
    /// From the interface alias ADD set (empty if someone cleared it).
    pub workload_id: String,
    /// Addresses of the host routes through the interface.
    pub ips: Vec<IpAddr>,
}

/// `mg` + the first 11 hex characters of SHA-256(workload id): 13 bytes, under IFNAMSIZ, stable.
pub fn host_ifname(workload_id: &str) -> String {
    let digest = Sha256::digest(workload_id.as_bytes());
    let hex = hex::encode(digest);
    format!("{HOST_PREFIX}{}", &hex[..11])
}

fn is_host_ifname(name: &str) -> bool {
    name.len() == 13
        && name.starts_with(HOST_PREFIX)
        && name[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

pub(crate) fn mac_string(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn invalid(what: &'static str, value: impl ToString, reason: &str) -> DataplaneError {
    DataplaneError::Invalid {
        what,
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl PodSpec {
    /// Check the request before touching anything.
    pub fn validate(&self) -> Result<(), DataplaneError> {
        if self.workload_id.is_empty() {
            return Err(invalid("workload id", "", "must not be empty"));
        }
        let n = &self.ifname;
        if n.is_empty()
            || n.len() > 15
            || n == "."
            || n == ".."
            || n.bytes()
                .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace())
        {
            return Err(invalid(
                "interface name",
                n,
                "1 to 15 bytes, no '/', ':' or spaces",
            ));
        }
        let min = if self.ipv6.is_some() { 1280 } else { 68 };
        if self.mtu < min || self.mtu > 65535 {
            return Err(invalid("MTU", self.mtu, &format!("must be {min} to 65535")));
        }
        if self.ipv4.is_none() && self.ipv6.is_none() {
            return Err(invalid(
                "pod addresses",
                "none",
                "need an IPv4 or IPv6 address",
            ));
        }
        if let Some(a) = self.ipv4 {
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() || a.is_broadcast() {
                return Err(invalid("pod IPv4 address", a, "not a unicast address"));
            }
        }
        if let Some(a) = self.ipv6 {
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(invalid("pod IPv6 address", a, "not a unicast address"));
            }
        }
        Ok(())
    }

    fn ips(&self) -> Vec<IpAddr> {
        let mut v = Vec::new();
        if let Some(a) = self.ipv4 {
            v.push(IpAddr::V4(a));
        }
        if let Some(a) = self.ipv6 {
            v.push(IpAddr::V6(a));
        }
        v
    }
}

/// A link as we need to see it.
pub(crate) struct Link {
    pub(crate) index: u32,
    pub(crate) name: String,
    pub(crate) mtu: u32,
    pub(crate) up: bool,
    pub(crate) mac: Vec<u8>,
    pub(crate) alias: String,
    pub(crate) kind_veth: bool,
    /// IFLA_LINK: for a veth, the peer's index (in the peer's namespace).
    pub(crate) peer_index: Option<u32>,
}

fn link_from(m: &LinkMessage) -> Link {
    let mut l = Link {
        index: m.header.index,
        name: String::new(),
        mtu: 0,
        up: m.header.flags.contains(LinkFlags::Up),
        mac: Vec::new(),
        alias: String::new(),
        kind_veth: false,
        peer_index: None,
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::IfName(n) => l.name = n.clone(),
            LinkAttribute::Mtu(v) => l.mtu = *v,
            LinkAttribute::Address(a) => l.mac = a.clone(),
            LinkAttribute::IfAlias(s) => l.alias = s.clone(),
            LinkAttribute::Link(i) => l.peer_index = Some(*i),
            LinkAttribute::LinkInfo(infos) => {
                l.kind_veth = infos
                    .iter()
                    .any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
            }
            _ => {}
        }
    }
    l
}

/// RTM_GETLINK by name; `None` when there is no such device.
pub(crate) fn find_link(sock: &mut NlSocket, name: &str) -> Result<Option<Link>, DataplaneError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    match sock.get(RouteNetlinkMessage::GetLink(msg)) {
        Ok(replies) => Ok(replies.iter().find_map(|r| match r {
            RouteNetlinkMessage::NewLink(l) => Some(link_from(l)),
            _ => None,
        })),
        Err(e) if e.errno == libc::ENODEV => Ok(None),
        Err(source) => Err(DataplaneError::Netlink {
            op: "look up interface",
            object: name.to_string(),
            netns: sock.netns.clone(),
            source,
        }),
    }
}

pub(crate) fn nl_err(
    sock: &NlSocket,
    op: &'static str,
    object: impl ToString,
    source: NlError,
) -> DataplaneError {
    DataplaneError::Netlink {
        op,
        object: object.to_string(),
        netns: sock.netns.clone(),
        source,
    }
}

pub(crate) fn delete_link(
    sock: &mut NlSocket,
    index: u32,
    name: &str,
) -> Result<(), DataplaneError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    match sock.request(RouteNetlinkMessage::DelLink(msg), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.errno == libc::ENODEV => Ok(()),
        Err(e) => Err(nl_err(sock, "delete interface", name, e)),
    }
}

pub(crate) fn set_link_up(
    sock: &mut NlSocket,
    index: u32,
    name: &str,
    alias: Option<&str>,
) -> Result<(), DataplaneError> {
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.header.flags = LinkFlags::Up;
    msg.header.change_mask = LinkFlags::Up;
    if let Some(a) = alias {
        msg.attributes.push(LinkAttribute::IfAlias(a.to_string()));
    }
    sock.request(RouteNetlinkMessage::SetLink(msg), 0)
        .map_err(|e| nl_err(sock, "set up interface", name, e))
}

pub(crate) fn add_address(
    sock: &mut NlSocket,
    index: u32,
    ifname: &str,
    ip: IpAddr,
) -> Result<(), DataplaneError> {
    let mut msg = AddressMessage::default();
    msg.header.index = index;
    msg.header.scope = AddressScope::Universe;
    match ip {
        IpAddr::V4(_) => {
            msg.header.family = AddressFamily::Inet;
            msg.header.prefix_len = 32;
            msg.attributes.push(AddressAttribute::Local(ip));
            msg.attributes.push(AddressAttribute::Address(ip));
        }
        IpAddr::V6(_) => {
            msg.header.family = AddressFamily::Inet6;
            msg.header.prefix_len = 128;
            msg.attributes.push(AddressAttribute::Address(ip));
            // No duplicate address detection: the address is ours by IPAM, and usable at once.
            msg.attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
    }
    sock.request(
        RouteNetlinkMessage::NewAddress(msg),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(|e| nl_err(sock, "add address", format!("{ip} on {ifname}"), e))
}

/// `dst dev index [via gw] scope ...`, protocol POD_ROUTE_PROTOCOL, by replace.
pub(crate) fn add_route(
    sock: &mut NlSocket,
    dst: IpNetwork,
    gateway: Option<IpAddr>,
    index: u32,
    ifname: &str,
) -> Result<(), DataplaneError> {
    add_route_src(sock, dst, gateway, None, index, ifname)
}

/// As [`add_route`], with a preferred source address (`src`) when given.
pub(crate) fn add_route_src(
    sock: &mut NlSocket,
    dst: IpNetwork,
    gateway: Option<IpAddr>,
    src: Option<IpAddr>,
    index: u32,
    ifname: &str,
) -> Result<(), DataplaneError> {
    let mut m = RouteMessage::default();
    m.header.address_family = if dst.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.destination_prefix_length = dst.prefix();
    m.header.table = 254;
    m.header.protocol = RouteProtocol::from(POD_ROUTE_PROTOCOL);
    m.header.kind = RouteType::Unicast;
    m.header.scope = if gateway.is_some() {
        RouteScope::Universe
    } else {
        RouteScope::Link
    };
    if dst.prefix() > 0 {
        m.attributes
            .push(RouteAttribute::Destination(dst.ip().into()));
    }
    if let Some(gw) = gateway {
        m.attributes.push(RouteAttribute::Gateway(gw.into()));
    }
    if let Some(src) = src {
        m.attributes.push(RouteAttribute::PrefSource(src.into()));
    }
    m.attributes.push(RouteAttribute::Oif(index));
    sock.request(
        RouteNetlinkMessage::NewRoute(m),
        NLM_F_CREATE | NLM_F_REPLACE,
    )
    .map_err(|e| {
        let via = gateway.map(|g| format!(" via {g}")).unwrap_or_default();
        let from = src.map(|a| format!(" src {a}")).unwrap_or_default();
        nl_err(
            sock,
            "add route",
            format!("{dst}{via} dev {ifname}{from}"),
            e,
        )
    })
}

/// Create a veth pair in one request: `host` (with `host_mac` if given) in `node`'s namespace, its peer
/// `pod_ifname` directly inside `pod_ns` (the namespace `pod` is open in). A name taken on either side is a
/// [`DataplaneError::NameCollision`].
pub(crate) fn create_veth_into(
    node: &mut NlSocket,
    pod: &NlSocket,
    pod_ns: &std::fs::File,
    host: (&str, Option<&[u8]>),
    pod_ifname: &str,
    mtu: u32,
) -> Result<(), DataplaneError> {
    create_veth(node, host, pod_ifname, mtu, Some((pod, pod_ns)))
}

/// The one veth-pair request: `host` (with `host_mac` if given) in `node`'s namespace and its peer
/// `peer_ifname`, created inside `peer_ns` (a socket open in it, for messages, and its file) when given,
/// else beside the host side in `node`'s namespace (a Docker endpoint's peer, which the runtime moves).
/// A name taken on either side is a [`DataplaneError::NameCollision`].
fn create_veth(
    node: &mut NlSocket,
    (host, host_mac): (&str, Option<&[u8]>),
    peer_ifname: &str,
    mtu: u32,
    peer_ns: Option<(&NlSocket, &std::fs::File)>,
) -> Result<(), DataplaneError> {
    let mut peer = LinkMessage::default();
    peer.attributes
        .push(LinkAttribute::IfName(peer_ifname.to_string()));
    peer.attributes.push(LinkAttribute::Mtu(mtu));
    if let Some((_, file)) = peer_ns {
        peer.attributes
            .push(LinkAttribute::NetNsFd(file.as_raw_fd()));
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(host.to_string()));
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    if let Some(mac) = host_mac {
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
    }
    msg.attributes.push(LinkAttribute::LinkInfo(vec![
        LinkInfo::Kind(InfoKind::Veth),
        LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer))),
    ]));
    node.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL)
        .map_err(|e| {
            if e.errno == libc::EEXIST {
                DataplaneError::NameCollision {
                    name: format!("{host} or {peer_ifname}"),
                    netns: match peer_ns {
                        Some((sock, _)) => format!("{} / {}", node.netns, sock.netns),
                        None => node.netns.clone(),
                    },
                }
            } else {
                nl_err(node, "create veth", format!("{host} <-> {peer_ifname}"), e)
            }
        })
}

pub(crate) fn host_net(ip: IpAddr) -> IpNetwork {
    match ip {
        IpAddr::V4(a) => IpNetwork::V4(ipnetwork::Ipv4Network::from(a)),
        IpAddr::V6(a) => IpNetwork::V6(ipnetwork::Ipv6Network::from(a)),
    }
}

fn default_net(v4: bool) -> IpNetwork {
    if v4 {
        IpNetwork::V4(ipnetwork::Ipv4Network::new(Ipv4Addr::UNSPECIFIED, 0).expect("/0 is valid"))
    } else {
        IpNetwork::V6(ipnetwork::Ipv6Network::new(Ipv6Addr::UNSPECIFIED, 0).expect("/0 is valid"))
    }
}

/// A route as read back: (dst, gateway, oif, protocol, scope).
pub(crate) type SeenRoute = (IpNetwork, Option<IpAddr>, u32, u8, u8);

/// Dump the main table's routes of both families (optionally only one protocol).
pub(crate) fn dump_routes(
    sock: &mut NlSocket,
    protocol: Option<u8>,
) -> Result<Vec<SeenRoute>, DataplaneError> {
    let mut out = Vec::new();
    for family in [AddressFamily::Inet, AddressFamily::Inet6] {
        let mut m = RouteMessage::default();
        m.header.address_family = family;
        m.header.table = 254;
        if let Some(p) = protocol {
            m.header.protocol = RouteProtocol::from(p);
        }
        m.attributes.push(RouteAttribute::Table(254));
        let replies = sock
            .dump(RouteNetlinkMessage::GetRoute(m))
            .map_err(|e| nl_err(sock, "dump routes", "of the main table", e))?;
        for r in replies {
            let RouteNetlinkMessage::NewRoute(m) = r else {
                continue;
            };
            let v4 = m.header.address_family == AddressFamily::Inet;
            let mut dst = None;
            let mut gw = None;
            let mut oif = 0;
            let mut table = u32::from(m.header.table);
            for a in &m.attributes {
                match a {
                    RouteAttribute::Destination(d) => dst = route_addr(d),
                    RouteAttribute::Gateway(g) => gw = route_addr(g),
                    RouteAttribute::Oif(i) => oif = *i,
                    RouteAttribute::Table(t) => table = *t,
                    _ => {}
                }
            }
            if table != 254 {
                continue;
            }
            let dst = dst.unwrap_or(if v4 {
                IpAddr::V4(Ipv4Addr::UNSPECIFIED)
            } else {
                IpAddr::V6(Ipv6Addr::UNSPECIFIED)
            });
            if let Ok(net) = IpNetwork::new(dst, m.header.destination_prefix_length) {
                out.push((
                    net,
                    gw,
                    oif,
                    u8::from(m.header.protocol),
                    u8::from(m.header.scope),
                ));
            }
        }
    }
    Ok(out)
}

fn route_addr(a: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    use netlink_packet_route::route::RouteAddress;
    match a {
        RouteAddress::Inet(v) => Some(IpAddr::V4(*v)),
        RouteAddress::Inet6(v) => Some(IpAddr::V6(*v)),
        _ => None,
    }
}

/// Addresses on one interface.
pub(crate) fn dump_addresses(
    sock: &mut NlSocket,
    index: u32,
) -> Result<Vec<(IpAddr, u8)>, DataplaneError> {
    let mut m = AddressMessage::default();
    m.header.index = index;
    let replies = sock
        .dump(RouteNetlinkMessage::GetAddress(m))
        .map_err(|e| nl_err(sock, "dump addresses", format!("of ifindex {index}"), e))?;
    let mut out = Vec::new();
    for r in replies {
        let RouteNetlinkMessage::NewAddress(a) = r else {
            continue;
        };
        if a.header.index != index {
            continue;
        }
        for attr in &a.attributes {
            if let AddressAttribute::Address(ip) = attr {
                out.push((*ip, a.header.prefix_len));
            }
        }
    }
    Ok(out)
}

/// ADD: build the pod's veth, addresses and routes. Idempotent for the same workload and spec; a stale
/// veth of the same name (another sandbox, half-built) is replaced. On failure nothing is left.
pub fn add_pod(spec: &PodSpec) -> Result<PodResult, DataplaneError> {
    spec.validate()?;
    let host = host_ifname(&spec.workload_id);
    let pod_ns = open_netns(&spec.pod_netns)?;
    let mut node = NlSocket::open(spec.node_netns.as_deref())?;
    let mut pod = NlSocket::open(Some(&spec.pod_netns))?;

    if let Some(existing) = find_link(&mut node, &host)? {
        let diffs = differences(spec, &mut node, &mut pod, &host)?;
        if diffs.is_empty() {
            return result(spec, &mut node, &mut pod, &host);
        }
        tracing::info!(workload = %spec.workload_id, interface = %host, ?diffs, "replacing stale pod interface");
        delete_link(&mut node, existing.index, &host)?;
    }
    if find_link(&mut pod, &spec.ifname)?.is_some() {
        return Err(DataplaneError::NameCollision {
            name: spec.ifname.clone(),
            netns: pod.netns.clone(),
        });
    }

    // One request makes both ends, the peer directly inside the pod's namespace under its final name:
    // there is no moment where a half-made pair sits in the wrong place.
    create_veth_into(
        &mut node,
        &pod,
        &pod_ns,
        (&host, Some(&HOST_MAC[..])),
        &spec.ifname,
        spec.mtu,
    )?;

    match build(spec, &host, &mut node, &mut pod) {
        Ok(r) => Ok(r),
        Err(e) => {
            // Undo: deleting the host end removes the peer, their addresses and routes.
            if let Ok(Some(l)) = find_link(&mut node, &host) {
                if let Err(undo) = delete_link(&mut node, l.index, &host) {
                    tracing::error!(interface = %host, error = %undo, "could not undo a failed pod ADD");
                }
            }
            Err(e)
        }
    }
}

/// The host end of a workload's veth, made ready: Calico's host-side sysctls (proxy ARP, forwarding, IPv6
/// when `v6`) set, and the link up with the workload id as its alias. Shared by pod ADD and Docker endpoints.
fn ready_host_end(
    node: &mut NlSocket,
    node_netns: Option<&Path>,
    host: &str,
    v6: bool,
    workload_id: &str,
) -> Result<Link, DataplaneError> {
    let host_link = find_link(node, host)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: host.to_string(),
        netns: node.netns.clone(),
    })?;
    let (s4, s6) = sysctl::host_veth_settings(host, v6);
    let node_label = node.netns.clone();
    in_netns(node_netns, || {
        sysctl::set_here(&node_label, &s4, false)?;
        sysctl::set_here(&node_label, &s6, !v6)?;
        Ok(())
    })?;
    set_link_up(node, host_link.index, host, Some(workload_id))?;
    Ok(host_link)
}

fn build(
    spec: &PodSpec,
    host: &str,
    node: &mut NlSocket,
    pod: &mut NlSocket,
) -> Result<PodResult, DataplaneError> {
    let v6 = spec.ipv6.is_some();
    let host_link = ready_host_end(
        node,
        spec.node_netns.as_deref(),
        host,
        v6,
        &spec.workload_id,
    )?;

    let pod_link = find_link(pod, &spec.ifname)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: spec.ifname.clone(),
        netns: pod.netns.clone(),
    })?;
    if v6 {
        let pod_label = pod.netns.clone();
        let ifname = spec.ifname.clone();
        in_netns(Some(&spec.pod_netns), || {
            sysctl::set_here(
                &pod_label,
                &[
                    (format!("net/ipv6/conf/{ifname}/disable_ipv6"), "0"),
                    (format!("net/ipv6/conf/{ifname}/accept_dad"), "0"),
                ],
                false,
            )
        })?;
    }
    set_link_up(pod, pod_link.index, &spec.ifname, None)?;
    if let Some(a) = spec.ipv4 {
        add_address(pod, pod_link.index, &spec.ifname, IpAddr::V4(a))?;
        add_route(
            pod,
            host_net(IpAddr::V4(POD_GATEWAY_V4)),
            None,
            pod_link.index,
            &spec.ifname,
        )?;
        add_route(
            pod,
            default_net(true),
            Some(IpAddr::V4(POD_GATEWAY_V4)),
            pod_link.index,
            &spec.ifname,
        )?;
    }
    if let Some(a) = spec.ipv6 {
        add_address(pod, pod_link.index, &spec.ifname, IpAddr::V6(a))?;
        add_route(
            pod,
            default_net(false),
            Some(IpAddr::V6(POD_GATEWAY_V6)),
            pod_link.index,
            &spec.ifname,
        )?;
    }
    for ip in spec.ips() {
        add_route(node, host_net(ip), None, host_link.index, host)?;
    }
    result(spec, node, pod, host)
}

fn result(
    spec: &PodSpec,
    node: &mut NlSocket,
    pod: &mut NlSocket,
    host: &str,
) -> Result<PodResult, DataplaneError> {
    let h = find_link(node, host)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: host.to_string(),
        netns: node.netns.clone(),
    })?;
    let p = find_link(pod, &spec.ifname)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: spec.ifname.clone(),
        netns: pod.netns.clone(),
    })?;
    Ok(PodResult {
        host_ifname: host.to_string(),
        host_ifindex: h.index,
        pod_ifname: spec.ifname.clone(),
        pod_ifindex: p.index,
        pod_mac: mac_string(&p.mac),
        ipv4: spec.ipv4,
        ipv6: spec.ipv6,
    })
}

/// Everything that differs from what ADD leaves, in words.
fn differences(
    spec: &PodSpec,
    node: &mut NlSocket,
    pod: &mut NlSocket,
    host: &str,
) -> Result<Vec<String>, DataplaneError> {
    let mut d = Vec::new();
    let Some(h) = find_link(node, host)? else {
        d.push(format!("host interface {host} is missing"));
        return Ok(d);
    };
    if !h.kind_veth {
        d.push(format!("{host} is not a veth"));
    }
    if h.mac != HOST_MAC {
        d.push(format!(
            "{host} MAC is {} not ee:ee:ee:ee:ee:ee",
            mac_string(&h.mac)
        ));
    }
    if h.mtu != spec.mtu {
        d.push(format!("{host} MTU is {} not {}", h.mtu, spec.mtu));
    }
    if !h.up {
        d.push(format!("{host} is down"));
    }
    if h.alias != spec.workload_id {
        d.push(format!(
            "{host} belongs to workload {:?}, not {:?}",
            h.alias, spec.workload_id
        ));
    }
    let v6 = spec.ipv6.is_some();
    let mut keys = vec![
        format!("net/ipv4/conf/{host}/proxy_arp"),
        format!("net/ipv4/conf/{host}/forwarding"),
    ];
    if v6 {
        keys.push(format!("net/ipv6/conf/{host}/proxy_ndp"));
        keys.push(format!("net/ipv6/conf/{host}/accept_ra"));
    }
    let want = |k: &str| if k.ends_with("accept_ra") { "0" } else { "1" };
    for (k, v) in sysctl::read_many(spec.node_netns.as_deref(), &keys)? {
        if v.as_deref() != Some(want(&k)) {
            d.push(format!("sysctl {k} is {v:?}, want {}", want(&k)));
        }
    }

    let Some(p) = find_link(pod, &spec.ifname)? else {
        d.push(format!("{} is missing in {}", spec.ifname, pod.netns));
        return Ok(d);
    };
    if p.peer_index != Some(h.index) {
        d.push(format!(
            "{} in {} is not the peer of {host}",
            spec.ifname, pod.netns
        ));
    }
    if p.mtu != spec.mtu {
        d.push(format!("{} MTU is {} not {}", spec.ifname, p.mtu, spec.mtu));
    }
    if !p.up {
        d.push(format!("{} is down", spec.ifname));
    }
    let addrs = dump_addresses(pod, p.index)?;
    if let Some(a) = spec.ipv4 {
        if !addrs.contains(&(IpAddr::V4(a), 32)) {
            d.push(format!("{a}/32 is not on {}", spec.ifname));
        }
    }
    if let Some(a) = spec.ipv6 {
        if !addrs.contains(&(IpAddr::V6(a), 128)) {
            d.push(format!("{a}/128 is not on {}", spec.ifname));
        }
    }
    let pod_routes = dump_routes(pod, None)?;
    let has = |routes: &[SeenRoute], dst: IpNetwork, gw: Option<IpAddr>, oif: u32| {
        routes.iter().any(|r| r.0 == dst && r.1 == gw && r.2 == oif)
    };
    if spec.ipv4.is_some() {
        let gw = IpAddr::V4(POD_GATEWAY_V4);
        if !has(&pod_routes, host_net(gw), None, p.index) {
            d.push(format!("pod route {gw} dev {} is missing", spec.ifname));
        }
        if !has(&pod_routes, default_net(true), Some(gw), p.index) {
            d.push(format!("pod route default via {gw} is missing"));
        }
    }
    if spec.ipv6.is_some() {
        let gw = IpAddr::V6(POD_GATEWAY_V6);
        if !has(&pod_routes, default_net(false), Some(gw), p.index) {
            d.push(format!("pod route default via {gw} is missing"));
        }
    }
    let host_routes = dump_routes(node, Some(POD_ROUTE_PROTOCOL))?;
    for ip in spec.ips() {
        if !has(&host_routes, host_net(ip), None, h.index) {
            d.push(format!("host route {} dev {host} is missing", host_net(ip)));
        }
    }
    Ok(d)
}

/// CHECK: is the pod still as ADD left it? The error lists every difference.
pub fn check_pod(spec: &PodSpec) -> Result<(), DataplaneError> {
    spec.validate()?;
    let host = host_ifname(&spec.workload_id);
    let mut node = NlSocket::open(spec.node_netns.as_deref())?;
    let mut pod = NlSocket::open(Some(&spec.pod_netns))?;
    let diffs = differences(spec, &mut node, &mut pod, &host)?;
    if diffs.is_empty() {
        Ok(())
    } else {
        Err(DataplaneError::CheckFailed {
            workload: spec.workload_id.clone(),
            host_ifname: host,
            diffs,
        })
    }
}

/// What a runtime that moves the interface itself (Docker's remote network driver: its `Join` answer names
/// a host-side device, and Docker moves it into the sandbox, renames it and sets its address) is given:
/// the same host side as a pod's, but the peer left in the node's namespace under [`peer_ifname`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSpec {
    pub node_netns: Option<PathBuf>,
    /// Names the host veth (`mg` + hash) exactly as a pod's workload id does.
    pub workload_id: String,
    pub mtu: u32,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// The peer of an endpoint's veth while it waits in the node's namespace for the runtime to move it:
/// `mgt` + the same 11 hex characters as the host side (14 bytes, so never taken for a host veth).
pub fn peer_ifname(workload_id: &str) -> String {
    format!(
        "{HOST_PREFIX}t{}",
        &host_ifname(workload_id)[HOST_PREFIX.len()..]
    )
}

/// Build an endpoint's veth pair in the node's namespace: the host side exactly as [`add_pod`] leaves it
/// (fixed MAC, alias = workload id, sysctls, up, the `/32` (`/128`) host routes), the peer down and
/// unaddressed under [`peer_ifname`] for the runtime to move. A stale pair of the same workload is replaced.
/// On failure nothing is left.
pub fn add_endpoint(spec: &EndpointSpec) -> Result<String, DataplaneError> {
    PodSpec {
        node_netns: spec.node_netns.clone(),
        pod_netns: PathBuf::from("/"),
        workload_id: spec.workload_id.clone(),
        ifname: peer_ifname(&spec.workload_id),
        mtu: spec.mtu,
        ipv4: spec.ipv4,
        ipv6: spec.ipv6,
    }
    .validate()?;
    let host = host_ifname(&spec.workload_id);
    let peer = peer_ifname(&spec.workload_id);
    let mut node = NlSocket::open(spec.node_netns.as_deref())?;
    for name in [&host, &peer] {
        if let Some(stale) = find_link(&mut node, name)? {
            tracing::info!(workload = %spec.workload_id, interface = %name, "replacing stale endpoint interface");
            delete_link(&mut node, stale.index, name)?;
        }
    }
    create_veth(
        &mut node,
        (&host, Some(&HOST_MAC[..])),
        &peer,
        spec.mtu,
        None,
    )?;
    let built = (|| {
        let host_link = ready_host_end(
            &mut node,
            spec.node_netns.as_deref(),
            &host,
            spec.ipv6.is_some(),
            &spec.workload_id,
        )?;
        for ip in spec
            .ipv4
            .map(IpAddr::V4)
            .into_iter()
            .chain(spec.ipv6.map(IpAddr::V6))
        {
            add_route(&mut node, host_net(ip), None, host_link.index, &host)?;
        }
        Ok(())
    })();
    match built {
        Ok(()) => Ok(peer),
        Err(e) => {
            // Deleting the host end removes the peer and the routes with it.
            if let Ok(Some(l)) = find_link(&mut node, &host) {
                if let Err(undo) = delete_link(&mut node, l.index, &host) {
                    tracing::error!(interface = %host, error = %undo, "could not undo a failed endpoint create");
                }
            }
            Err(e)
        }
    }
}

/// Whether the endpoint's host veth exists in the node's namespace.
pub fn endpoint_exists(
    node_netns: Option<&Path>,
    workload_id: &str,
) -> Result<bool, DataplaneError> {
    let mut node = NlSocket::open(node_netns)?;
    Ok(find_link(&mut node, &host_ifname(workload_id))?.is_some())
}

/// DEL: remove the workload's veth (its peer, addresses and routes go with it) and any host route of ours
/// left pointing at it. An interface already gone is success; the pod's namespace is not needed.
/// Returns whether there was anything to remove.
pub fn del_pod(node_netns: Option<&Path>, workload_id: &str) -> Result<bool, DataplaneError> {
    if workload_id.is_empty() {
        return Err(invalid("workload id", "", "must not be empty"));
    }
    let host = host_ifname(workload_id);
    let mut node = NlSocket::open(node_netns)?;
    let Some(link) = find_link(&mut node, &host)? else {
        return Ok(false);
    };
    delete_link(&mut node, link.index, &host)?;
    // The kernel drops routes through a deleted device; make sure none of ours survived by another path.
    for (dst, _, oif, _, _) in dump_routes(&mut node, Some(POD_ROUTE_PROTOCOL))? {
        if oif == link.index {
            let mut m = RouteMessage::default();
            m.header.address_family = if dst.is_ipv4() {
                AddressFamily::Inet
            } else {
                AddressFamily::Inet6
            };
            m.header.destination_prefix_length = dst.prefix();
            m.header.table = 254;
            m.header.protocol = RouteProtocol::from(POD_ROUTE_PROTOCOL);
            m.header.scope = RouteScope::NoWhere;
            m.attributes
                .push(RouteAttribute::Destination(dst.ip().into()));
            m.attributes.push(RouteAttribute::Oif(oif));
            match node.request(RouteNetlinkMessage::DelRoute(m), 0) {
                Ok(()) => {}
                Err(e) if e.errno == libc::ESRCH || e.errno == libc::ENODEV => {}
                Err(e) => return Err(nl_err(&node, "delete route", dst, e)),
            }
        }
    }
    Ok(true)
}

/// List: the pods this node has plumbed, from the kernel (interfaces named `mg` + 11 hex, veths).
/// Every interface of the namespace `node` was opened in.
pub(crate) fn list_links(node: &mut NlSocket) -> Result<Vec<Link>, DataplaneError> {
    let links = node
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(|e| nl_err(node, "dump interfaces", "all", e))?;
    Ok(links
        .iter()
        .filter_map(|l| match l {
            RouteNetlinkMessage::NewLink(m) => Some(link_from(m)),
            _ => None,
        })
        .collect())
}

pub fn list_pods(node_netns: Option<&Path>) -> Result<Vec<PlumbedPod>, DataplaneError> {
    let mut node = NlSocket::open(node_netns)?;
    let links = node
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(|e| nl_err(&node, "dump interfaces", "all", e))?;
    let mut pods: BTreeMap<u32, PlumbedPod> = BTreeMap::new();
    for l in links {
        let RouteNetlinkMessage::NewLink(m) = l else {
            continue;
        };
        let link = link_from(&m);
        if link.kind_veth && is_host_ifname(&link.name) {
            pods.insert(
                link.index,
                PlumbedPod {
                    host_ifname: link.name,
                    host_ifindex: link.index,
                    workload_id: link.alias,
                    ips: Vec::new(),
                },
            );
        }
    }
    for (dst, _, oif, _, _) in dump_routes(&mut node, Some(POD_ROUTE_PROTOCOL))? {
        if let Some(p) = pods.get_mut(&oif) {
            if dst.prefix() == if dst.is_ipv4() { 32 } else { 128 } {
                p.ips.push(dst.ip());
            }
        }
    }
    let mut out: Vec<PlumbedPod> = pods.into_values().collect();
    out.sort_by(|a, b| a.host_ifname.cmp(&b.host_ifname));
    Ok(out)
}

/// The label used in messages for a namespace path.
pub fn netns_label(p: Option<&Path>) -> String {
    ns_label(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> PodSpec {
        PodSpec {
            node_netns: None,
            pod_netns: "/var/run/netns/x".into(),
            workload_id: "default.nginx-1".into(),
            ifname: "eth0".into(),
            mtu: 1450,
            ipv4: Some(Ipv4Addr::new(10, 244, 1, 5)),
            ipv6: None,
        }
    }

    #[test]
    fn host_name_is_stable_and_short() {
        let n = host_ifname("default.nginx-1");
        assert_eq!(n.len(), 13);
        assert!(is_host_ifname(&n));
        assert_eq!(n, host_ifname("default.nginx-1"));
        assert_ne!(n, host_ifname("default.nginx-2"));
        // sha256("abc") = ba7816bf8f01cfea...
        assert_eq!(host_ifname("abc"), "mgba7816bf8f0");
    }

    #[test]
    fn validation_names_the_bad_field() {
        assert!(spec().validate().is_ok());
        let mut s = spec();
        s.ifname = "a-very-long-interface-name".into();
        assert!(s
            .validate()
            .unwrap_err()
            .to_string()
            .contains("interface name"));
        let mut s = spec();
        s.mtu = 10;
        assert!(s.validate().unwrap_err().to_string().contains("MTU"));
        let mut s = spec();
        s.ipv4 = None;
        assert!(s.validate().is_err());
    }

    #[test]
    fn ipv6_gateway_is_the_eui64_of_the_host_mac() {
        // EUI-64 of ee:ee:ee:ee:ee:ee flips the U/L bit of the first byte (0xee -> 0xec) and inserts ff:fe.
        assert_eq!(POD_GATEWAY_V6.to_string(), "fe80::ecee:eeff:feee:eeee");
    }
}
