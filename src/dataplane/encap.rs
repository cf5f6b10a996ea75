//! Encapsulation support of the node's kernel. margay builds no tunnel yet; this module answers whether
//! one could be built, so an IPIP pool on a kernel without the `ipip` module is reported with the reason
//! instead of being routed unencapsulated in silence.

use std::path::Path;

use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use netlink_packet_route::RouteNetlinkMessage;

use super::error::{ns_label, DataplaneError};
use super::nl::NlSocket;

/// Name of the short-lived device the probe creates (margay's interface prefix).
const PROBE: &str = "mgipipprobe";

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
        Err(e) if e.errno == libc::EOPNOTSUPP || e.errno == libc::ENODEV => Ok(false),
        Err(source) => Err(DataplaneError::Netlink {
            op: "probe for ipip support",
            object: PROBE.into(),
            netns: ns_label(netns),
            source,
        }),
    }
}
