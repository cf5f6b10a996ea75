//! What the tunnel devices share (VXLAN in [`super::vxlan`], IPIP in [`super::ipip`]): whether the kernel
//! can build a link kind at all, and the device's tunnel address kept as its only address. Whether an
//! `ipip` device can be created is asked once at start, so an IPIP pool on a kernel without the module is
//! reported with the reason and the fix rather than discovered through lost packets.

use std::net::IpAddr;
use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::address::{AddressAttribute, AddressMessage};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

use super::error::{ns_label, DataplaneError, NlError};
use super::nl::NlSocket;
use super::pod::{add_address, dump_addresses};

/// Name of the short-lived device the probe creates (margay's interface prefix).
const PROBE: &str = "mgipipprobe";

/// The kernel's answer when it knows no such link kind (no module, and none could be loaded): rtnetlink
/// says EOPNOTSUPP ("Unknown device type"); some paths answer ENODEV or EAFNOSUPPORT.
pub(crate) fn kernel_lacks_kind(e: &NlError) -> bool {
    matches!(
        e.errno,
        libc::EOPNOTSUPP | libc::ENODEV | libc::EAFNOSUPPORT
    )
}

/// Can an `ipip` device be created in `netns`? Tries to create one (the kernel loads the module on demand
/// where it can) and deletes it at once; `tunl0` present means the module is loaded already.
pub fn ipip_supported(netns: Option<&Path>) -> Result<bool, DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    let mut get = LinkMessage::default();
    get.attributes.push(LinkAttribute::IfName("tunl0".into()));
    if sock.get(RouteNetlinkMessage::GetLink(get)).is_ok() {
        return Ok(true);
    }
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(PROBE.into()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::IpIp,
        )]));
    match sock.request(RouteNetlinkMessage::NewLink(msg), NLM_F_CREATE | NLM_F_EXCL) {
        Ok(()) => {
            let mut del = LinkMessage::default();
            del.attributes.push(LinkAttribute::IfName(PROBE.into()));
            let _ = sock.request(RouteNetlinkMessage::DelLink(del), 0);
            Ok(true)
        }
        Err(e) if e.errno == libc::EEXIST => Ok(true),
        Err(e) if kernel_lacks_kind(&e) => Ok(false),
        Err(source) => Err(DataplaneError::Netlink {
            op: "probe for ipip support",
            object: PROBE.into(),
            netns: ns_label(netns),
            source,
        }),
    }
}

fn del_address(sock: &mut NlSocket, index: u32, ip: IpAddr, len: u8) {
    let mut m = AddressMessage::default();
    m.header.index = index;
    m.header.prefix_len = len;
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.attributes.push(AddressAttribute::Local(ip));
    m.attributes.push(AddressAttribute::Address(ip));
    // Gone already is fine; anything else shows in the next reconcile's add.
    let _ = sock.request(RouteNetlinkMessage::DelAddress(m), 0);
}

/// Make `ip` (/32 or /128) the only address of the tunnel device `index` (Felix: the tunnel address is the
/// only Calico address on the device). IPv6 link-local addresses the kernel adds itself are left alone.
pub(crate) fn set_only_address(
    sock: &mut NlSocket,
    index: u32,
    dev: &str,
    ip: IpAddr,
) -> Result<(), DataplaneError> {
    for (a, len) in dump_addresses(sock, index)? {
        let link_local = matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
        if a != ip && !link_local {
            del_address(sock, index, a, len);
        }
    }
    add_address(sock, index, dev, ip)
}

/// Remove every address of the device `index` (its tunnel is no longer used).
pub(crate) fn clear_addresses(sock: &mut NlSocket, index: u32) -> Result<(), DataplaneError> {
    for (a, len) in dump_addresses(sock, index)? {
        del_address(sock, index, a, len);
    }
    Ok(())
}
