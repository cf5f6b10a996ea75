//! The node's IPIP tunnel as Calico's Felix builds it, so Calico and margay nodes can share an IPIP overlay:
//! device `tunl0` of kind `ipip` with no local or remote address (the kernel's fallback device, which the
//! `ipip` module creates in every namespace when it loads: "already exists" is success), the tunnel address
//! as its only address (/32), MTU host − 20, up. IPv4 only.
//!
//! Routes through it go through the FIB task (`<block> via <remote node address> dev tunl0 onlink`): with no
//! remote on the device the kernel takes the outer destination from the route's gateway, so one device
//! serves every remote node and there are no per-node entries (unlike VXLAN). The fallback device cannot be
//! deleted; when no pool uses IPIP its address goes and it is set down, as Felix leaves it.
//! Blocking netlink calls in the node's namespace: call from `spawn_blocking`.

use std::net::Ipv4Addr;
use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use super::encap::{kernel_lacks_kind, set_only_address};
use super::error::DataplaneError;
use super::nl::NlSocket;
use super::pod::{find_link, nl_err, set_link_up};

/// Calico's IPIP device (`dataplanedefs.IPIPIfaceName`).
pub const DEVICE: &str = "tunl0";

/// The RTM_NEWLINK that creates `tunl0`: kind `ipip`, no IFLA_INFO_DATA (no local, no remote: Felix's
/// `netlink.Iptun{Name: "tunl0"}`). Sent with NLM_F_CREATE | NLM_F_EXCL.
pub fn link_request() -> LinkMessage {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(DEVICE.into()));
    msg.attributes
        .push(LinkAttribute::LinkInfo(vec![LinkInfo::Kind(
            InfoKind::IpIp,
        )]));
    msg
}

/// Make `tunl0` exist, with `mtu`, `tunnel_ip` as its only address, and up. Returns its index. On a kernel
/// without the `ipip` module the error says so (the kernel refuses the link kind).
pub fn ensure_device(
    netns: Option<&Path>,
    tunnel_ip: Ipv4Addr,
    mtu: u32,
) -> Result<u32, DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    let index = match find_link(&mut sock, DEVICE)? {
        Some(l) => l.index,
        None => {
            match sock.request(
                RouteNetlinkMessage::NewLink(link_request()),
                NLM_F_CREATE | NLM_F_EXCL,
            ) {
                Ok(()) => {}
                // The module loaded meanwhile and made its fallback device: that is the one we want.
                Err(e) if e.errno == libc::EEXIST => {}
                Err(e) if kernel_lacks_kind(&e) => {
                    return Err(DataplaneError::Invalid {
                        what: "IPIP device",
                        value: DEVICE.into(),
                        reason: format!(
                            "this kernel has no ipip module ({e}): IPIP pools cannot be encapsulated on this \
                             node; load the module (modprobe ipip) or switch the pool to VXLAN"
                        ),
                    })
                }
                Err(e) => return Err(nl_err(&sock, "create IPIP device", DEVICE, e)),
            }
            find_link(&mut sock, DEVICE)?
                .ok_or_else(|| DataplaneError::DeviceNotFound {
                    name: DEVICE.into(),
                    netns: sock.netns.clone(),
                })?
                .index
        }
    };
    let mut msg = LinkMessage::default();
    msg.header.index = index;
    msg.attributes.push(LinkAttribute::Mtu(mtu));
    sock.request(RouteNetlinkMessage::SetLink(msg), 0)
        .map_err(|e| nl_err(&sock, "set MTU", DEVICE, e))?;
    set_only_address(&mut sock, index, DEVICE, tunnel_ip.into())?;
    set_link_up(&mut sock, index, DEVICE, None)?;
    Ok(index)
}

/// No pool uses IPIP: take margay's address off `tunl0` and set it down (the fallback device itself cannot
/// be deleted). Success when there is no `tunl0`.
pub fn release_device(netns: Option<&Path>) -> Result<(), DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    let Some(l) = find_link(&mut sock, DEVICE)? else {
        return Ok(());
    };
    super::encap::clear_addresses(&mut sock, l.index)?;
    let mut msg = LinkMessage::default();
    msg.header.index = l.index;
    msg.header.flags = LinkFlags::empty();
    msg.header.change_mask = LinkFlags::Up;
    sock.request(RouteNetlinkMessage::SetLink(msg), 0)
        .map_err(|e| nl_err(&sock, "set down", DEVICE, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The exact bytes margay sends to create `tunl0` (sequence number 7), checked field by field against
    /// the rtnetlink ABI: nlmsghdr, ifinfomsg, IFLA_IFNAME, IFLA_LINKINFO { IFLA_INFO_KIND "ipip" }.
    #[test]
    fn tunl0_link_request_bytes() {
        let mut buf = Vec::new();
        crate::dataplane::nl::encode_into(
            &mut buf,
            7,
            RouteNetlinkMessage::NewLink(link_request()),
            NLM_F_CREATE | NLM_F_EXCL,
        );
        let mut want: Vec<u8> = Vec::new();
        let total: u32 = 16 + 16 + 12 + 16;
        want.extend_from_slice(&total.to_ne_bytes()); // nlmsg_len
        want.extend_from_slice(&16u16.to_ne_bytes()); // RTM_NEWLINK
                                                      // NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
        want.extend_from_slice(&(0x001u16 | 0x004 | 0x200 | 0x400).to_ne_bytes());
        want.extend_from_slice(&7u32.to_ne_bytes()); // seq
        want.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
                                                     // ifinfomsg: AF_UNSPEC, pad, type 0, index 0, flags 0, change 0.
        want.extend_from_slice(&[0u8; 16]);
        // IFLA_IFNAME (3) "tunl0\0", padded to 4.
        want.extend_from_slice(&10u16.to_ne_bytes());
        want.extend_from_slice(&3u16.to_ne_bytes());
        want.extend_from_slice(b"tunl0\0\0\0");
        // IFLA_LINKINFO (18) { IFLA_INFO_KIND (1) "ipip" }.
        want.extend_from_slice(&16u16.to_ne_bytes());
        want.extend_from_slice(&18u16.to_ne_bytes());
        want.extend_from_slice(&9u16.to_ne_bytes());
        want.extend_from_slice(&1u16.to_ne_bytes());
        want.extend_from_slice(b"ipip\0\0\0\0");
        assert_eq!(buf, want, "\n got {buf:02x?}\nwant {want:02x?}");
    }
}
