//! The pod MTU, by Calico's rule: the smallest MTU among the node's oper-up interfaces whose name matches
//! `mtuIfacePattern` (1460 when none does), minus the overhead of the encapsulations in use (the smallest
//! result wins; no encapsulation: the host MTU itself).
//!
//! | encapsulation | overhead |
//! |---|---|
//! | IPIP | 20 |
//! | VXLAN IPv4 | 50 |
//! | VXLAN IPv6 | 70 |
//!
//! Reads links over netlink in the node's namespace; writes nothing. [`PodMtu`] is the value the CNI
//! backend reads for every ADD whose network configuration sets no `mtu` (or 0).

use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use netlink_packet_route::link::{LinkAttribute, LinkMessage, State};
use netlink_packet_route::RouteNetlinkMessage;
use regex::Regex;

use super::error::{ns_label, DataplaneError};
use super::nl::NlSocket;

/// Felix's `MTUIfacePattern` default: the interfaces that carry the node's traffic.
pub const DEFAULT_IFACE_PATTERN: &str = r"^((en|wl|ww|sl|ib)[Pcopsvx].*|(eth|wlan|wwan).*)";
/// Host MTU assumed when no interface matches (Felix's fallback).
pub const FALLBACK_HOST_MTU: u32 = 1460;
pub const IPIP_OVERHEAD: u32 = 20;
pub const VXLAN_V4_OVERHEAD: u32 = 50;
pub const VXLAN_V6_OVERHEAD: u32 = 70;

/// The host side of the computation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostMtu {
    pub mtu: u32,
    /// The interface it came from (None: no interface matched, the fallback is used).
    pub iface: Option<String>,
}

/// Encapsulations enabled in the cluster (Calico: any pool with the mode other than Never).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Encaps {
    pub ipip: bool,
    pub vxlan_v4: bool,
    pub vxlan_v6: bool,
}

/// The pod MTU for a host MTU and the enabled encapsulations, with a human account of it.
pub fn pod_mtu(host: &HostMtu, encaps: Encaps) -> (u32, String) {
    let from = match &host.iface {
        Some(i) => format!("interface {i} {}", host.mtu),
        None => format!(
            "no interface matched the MTU pattern; fallback {}",
            host.mtu
        ),
    };
    let mut best: Option<(u32, &str)> = None;
    for (on, overhead, name) in [
        (encaps.ipip, IPIP_OVERHEAD, "IPIP"),
        (encaps.vxlan_v4, VXLAN_V4_OVERHEAD, "VXLAN"),
        (encaps.vxlan_v6, VXLAN_V6_OVERHEAD, "VXLAN IPv6"),
    ] {
        if on {
            let m = host.mtu.saturating_sub(overhead);
            if best.is_none_or(|(b, _)| m < b) {
                best = Some((m, name));
            }
        }
    }
    match best {
        Some((m, name)) => (m, format!("{from} - {name} {}", host.mtu - m)),
        None => (host.mtu, from),
    }
}

/// The smallest MTU among oper-up interfaces of `netns` whose name matches `pattern`.
pub fn host_mtu(netns: Option<&Path>, pattern: &Regex) -> Result<HostMtu, DataplaneError> {
    let mut sock = NlSocket::open(netns)?;
    let replies = sock
        .dump(RouteNetlinkMessage::GetLink(LinkMessage::default()))
        .map_err(|source| DataplaneError::Netlink {
            op: "list interfaces",
            object: "for the MTU".into(),
            netns: ns_label(netns),
            source,
        })?;
    let mut best: Option<HostMtu> = None;
    for r in replies {
        let RouteNetlinkMessage::NewLink(l) = r else {
            continue;
        };
        let (mut name, mut mtu, mut up) = (None, None, false);
        for a in &l.attributes {
            match a {
                LinkAttribute::IfName(n) => name = Some(n.clone()),
                LinkAttribute::Mtu(m) => mtu = Some(*m),
                LinkAttribute::OperState(s) => up = matches!(s, State::Up),
                _ => {}
            }
        }
        let (Some(name), Some(mtu)) = (name, mtu) else {
            continue;
        };
        if up && pattern.is_match(&name) && best.as_ref().is_none_or(|b| mtu < b.mtu) {
            best = Some(HostMtu {
                mtu,
                iface: Some(name),
            });
        }
    }
    Ok(best.unwrap_or(HostMtu {
        mtu: FALLBACK_HOST_MTU,
        iface: None,
    }))
}

/// The pod MTU the CNI backend uses, shared with the task that re-detects it.
#[derive(Debug, Clone)]
pub struct PodMtu(Arc<AtomicU32>);

impl PodMtu {
    pub fn new(mtu: u32) -> PodMtu {
        PodMtu(Arc::new(AtomicU32::new(mtu)))
    }
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
    pub fn set(&self, mtu: u32) {
        self.0.store(mtu, Ordering::Relaxed)
    }
}

impl From<u32> for PodMtu {
    fn from(mtu: u32) -> PodMtu {
        PodMtu::new(mtu)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(mtu: u32) -> HostMtu {
        HostMtu {
            mtu,
            iface: Some("eth0".into()),
        }
    }

    #[test]
    fn overheads_match_calico() {
        assert_eq!(pod_mtu(&host(1450), Encaps::default()).0, 1450);
        let vx = Encaps {
            vxlan_v4: true,
            ..Default::default()
        };
        assert_eq!(
            pod_mtu(&host(1450), vx),
            (1400, "interface eth0 1450 - VXLAN 50".into())
        );
        let all = Encaps {
            ipip: true,
            vxlan_v4: true,
            vxlan_v6: true,
        };
        // The smallest wins.
        assert_eq!(pod_mtu(&host(1500), all).0, 1430);
        assert_eq!(
            pod_mtu(
                &HostMtu {
                    mtu: FALLBACK_HOST_MTU,
                    iface: None
                },
                Encaps::default()
            )
            .0,
            1460
        );
    }

    #[test]
    fn default_pattern_is_felix_s() {
        let re = Regex::new(DEFAULT_IFACE_PATTERN).unwrap();
        for yes in ["eth0", "ens192", "enp0s3", "wlan0", "ibp1s0"] {
            assert!(re.is_match(yes), "{yes}");
        }
        for no in [
            "lo",
            "docker0",
            "cali123",
            "mg0123456789a",
            "vxlan.calico",
            "br0",
        ] {
            assert!(!re.is_match(no), "{no}");
        }
    }
}
