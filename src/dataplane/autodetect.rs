//! Node address autodetection: which IPv4 address of this node it registers (`spec.bgp.ipv4Address`) and
//! peers from, when `--ip` / `IP` is not given. Calico's `IP_AUTODETECTION_METHOD` values, with its
//! semantics (Calico's `IP_AUTODETECTION_METHOD`):
//!
//! - `first-found`: the first global unicast address on an interface that is up and not a loopback,
//!   pod or virtual interface ([`DEFAULT_SKIP`]: Calico's list plus margay's own pod veths);
//! - `interface=REGEX[,REGEX]`: the first address on an interface whose name matches one of the regexes;
//! - `skip-interface=REGEX[,REGEX]`: first-found, also skipping interfaces matching the regexes;
//! - `can-reach=IP|HOSTNAME`: the source address the kernel picks to reach that destination (a connected
//!   UDP socket, so a route lookup and source selection without sending a packet);
//! - `cidr=CIDR[,CIDR]`: the first address inside one of the ranges, on any interface that is up.
//!
//! Regexes match anywhere in the name, as Go's `MatchString` does in calico-node (`interface=eth0` also
//! matches `veth0`); anchor them (`^eth0$`) to match a whole name.
//!
//! This module only reads the node's addresses (in the node's network namespace); it never changes them.
//! Every pick is logged with the other candidates, and a failed pick lists every interface and address it
//! saw, so a wrong node address (a common Calico pain point) is visible at start.

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::str::FromStr;

use ipnetwork::Ipv4Network;
use regex::Regex;

use super::error::DataplaneError;
use super::netns::in_netns;

/// Interfaces first-found and skip-interface never pick (calico-node's `DEFAULT_INTERFACES_TO_EXCLUDE`,
/// plus margay's host-side pod veths `mg` + 11 hex digits, see `dataplane::pod::host_ifname`).
pub const DEFAULT_SKIP: &[&str] = &[
    "^docker.*",
    "^cbr.*",
    "^dummy.*",
    "^virbr.*",
    "^lxcbr.*",
    "^veth.*",
    "^lo",
    "^cali.*",
    "^tunl.*",
    "^flannel.*",
    "^kube-ipvs.*",
    "^cni.*",
    "^vxlan.calico.*",
    "^vxlan-v6.calico.*",
    "^wireguard.cali.*",
    "^wg-v6.cali.*",
    "^nodelocaldns.*",
    "^br-.*",
    "^mg[0-9a-f]{11}$",
];

const KUBE_INTERNAL: &str = "kubernetes-internal-ip needs the Kubernetes API, which margay node does not use; pass --ip (IP=) from the downward API (status.hostIP) instead";

/// The port a `can-reach` probe connects its UDP socket to (no packet is sent; calico-node uses 80 too).
const CAN_REACH_PORT: u16 = 80;

/// Why autodetection failed, each with what was seen and the fix.
#[derive(Debug, thiserror::Error)]
pub enum AutodetectError {
    /// The method string does not parse.
    #[error("invalid IP autodetection method {value:?}: {reason} (valid: first-found, interface=REGEX[,REGEX], skip-interface=REGEX[,REGEX], can-reach=IP|HOSTNAME, cidr=CIDR[,CIDR])")]
    Method { value: String, reason: String },
    /// Listing the node's addresses failed.
    #[error("listing the node's interface addresses: {0}")]
    List(#[source] DataplaneError),
    /// `can-reach`: the name did not resolve to an IPv4 address.
    #[error("can-reach={target}: cannot resolve it to an IPv4 address: {reason} (give an IP address, or check DNS in the node's network namespace)")]
    Resolve { target: String, reason: String },
    /// `can-reach`: the kernel has no route (or no source address) towards the destination.
    #[error("can-reach={target}: no route from this node to {dest}: {reason} (check the node's routes: `ip route get {dest}`; or use another method)")]
    Unreachable {
        target: String,
        dest: Ipv4Addr,
        reason: String,
    },
    /// Nothing matched the method.
    #[error("no node IPv4 address matches {method}: {detail}; interfaces and addresses seen: {seen}. Fix: pass --ip (IP=) with the node's address, or choose another --ip-autodetection-method (MARGAY_IP_AUTODETECTION_METHOD), e.g. interface=^eth0$ or cidr=10.0.0.0/8")]
    NoMatch {
        method: String,
        detail: String,
        seen: String,
    },
    /// IP6=autodetect found nothing.
    #[error("no node IPv6 address matches {method}: {detail}; IPv6 addresses seen: {seen}. Fix: set IP6 to the node's IPv6 address, or choose another --ip6-autodetection-method (IP6_AUTODETECTION_METHOD), e.g. interface=^eth0$")]
    NoMatchV6 {
        method: String,
        detail: String,
        seen: String,
    },
}

/// A list of interface-name regexes, keeping the text the operator wrote for messages.
#[derive(Debug, Clone)]
pub struct Patterns {
    text: Vec<String>,
    /// The regexes joined as alternatives (`(a)|(b)`), as calico-node compiles them.
    joined: Regex,
}

impl Patterns {
    /// Compile `patterns` (at least one; each must be a valid regex).
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Patterns, String> {
        if patterns.is_empty() {
            return Err("needs at least one regex".into());
        }
        let mut text = Vec::new();
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() {
                return Err("an empty regex in the list (check for a stray comma)".into());
            }
            Regex::new(p).map_err(|e| format!("{p:?} is not a valid regex: {e}"))?;
            text.push(p.to_string());
        }
        let joined = text
            .iter()
            .map(|p| format!("({p})"))
            .collect::<Vec<_>>()
            .join("|");
        let joined = Regex::new(&joined).map_err(|e| format!("the regexes together: {e}"))?;
        Ok(Patterns { text, joined })
    }

    /// Does any regex match (anywhere in) `name`?
    pub fn matches(&self, name: &str) -> bool {
        self.joined.is_match(name)
    }
}

impl fmt::Display for Patterns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text.join(","))
    }
}

/// One `IP_AUTODETECTION_METHOD`.
#[derive(Debug, Clone, Default)]
pub enum Method {
    #[default]
    FirstFound,
    Interface(Patterns),
    SkipInterface(Patterns),
    /// An IPv4 address or a host name (resolved in the node's namespace when detecting).
    CanReach(String),
    Cidr(Vec<Ipv4Network>),
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Method::FirstFound => f.write_str("first-found"),
            Method::Interface(p) => write!(f, "interface={p}"),
            Method::SkipInterface(p) => write!(f, "skip-interface={p}"),
            Method::CanReach(t) => write!(f, "can-reach={t}"),
            Method::Cidr(c) => write!(
                f,
                "cidr={}",
                c.iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            ),
        }
    }
}

impl FromStr for Method {
    type Err = AutodetectError;

    fn from_str(s: &str) -> Result<Method, AutodetectError> {
        let bad = |reason: String| AutodetectError::Method {
            value: s.to_string(),
            reason,
        };
        let s_trim = s.trim();
        if s_trim == "first-found" {
            return Ok(Method::FirstFound);
        }
        if s_trim == "kubernetes-internal-ip" {
            return Err(bad(KUBE_INTERNAL.into()));
        }
        let Some((kind, value)) = s_trim.split_once('=') else {
            return Err(bad(if s_trim.is_empty() {
                "empty".into()
            } else {
                "unknown method".into()
            }));
        };
        let list: Vec<&str> = value.split(',').collect();
        match kind.trim() {
            "interface" => Patterns::new(&list).map(Method::Interface).map_err(bad),
            "skip-interface" => Patterns::new(&list).map(Method::SkipInterface).map_err(bad),
            "can-reach" => {
                let t = value.trim();
                if t.is_empty() {
                    return Err(bad("can-reach needs an IP address or a host name".into()));
                }
                if t.parse::<std::net::Ipv6Addr>().is_ok() {
                    return Err(bad(
                        "an IPv6 destination cannot select the node's IPv4 address".into(),
                    ));
                }
                if t.parse::<Ipv4Addr>().is_err() && !is_host_name(t) {
                    return Err(bad(format!(
                        "{t:?} is neither an IPv4 address nor a host name"
                    )));
                }
                Ok(Method::CanReach(t.to_string()))
            }
            "cidr" => {
                let mut out = Vec::new();
                for c in &list {
                    let c = c.trim();
                    if c.contains(':') {
                        return Err(bad(format!(
                            "{c:?} is an IPv6 range; the node address detected here is IPv4"
                        )));
                    }
                    let n: Ipv4Network = c
                        .parse()
                        .map_err(|e| bad(format!("{c:?} is not an IPv4 CIDR: {e}")))?;
                    if !c.contains('/') {
                        return Err(bad(format!("{c:?} has no prefix length (e.g. {c}/24)")));
                    }
                    out.push(n);
                }
                Ok(Method::Cidr(out))
            }
            "kubernetes-internal-ip" => Err(bad(KUBE_INTERNAL.into())),
            other => Err(bad(format!("unknown method {other:?}"))),
        }
    }
}

/// RFC 1123 host name syntax (labels of letters, digits and hyphens, dots between).
fn is_host_name(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

/// The clap value parser for `--ip-autodetection-method`.
pub fn parse_method(s: &str) -> Result<Method, String> {
    s.parse().map_err(|e: AutodetectError| e.to_string())
}

/// One IPv4 address on one interface of the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfaceAddr {
    pub interface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// The interface is administratively up.
    pub up: bool,
}

impl fmt::Display for IfaceAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}/{}{}",
            self.interface,
            self.address,
            self.prefix_len,
            if self.up { "" } else { "(down)" }
        )
    }
}

/// What the node has: every interface (in the kernel's order) and every IPv4 address on them.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub interfaces: Vec<String>,
    pub addrs: Vec<IfaceAddr>,
}

/// How many interfaces without an IPv4 address a message names before it only counts the rest (a node
/// with hundreds of pods has hundreds of pod veths, none of which carries a node address).
const MAX_NAMED_WITHOUT_IPV4: usize = 8;

impl fmt::Display for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        let mut bare = Vec::new();
        for i in &self.interfaces {
            let a: Vec<String> = self
                .addrs
                .iter()
                .filter(|a| &a.interface == i)
                .map(|a| {
                    format!(
                        "{}/{}{}",
                        a.address,
                        a.prefix_len,
                        if a.up { "" } else { " (down)" }
                    )
                })
                .collect();
            if a.is_empty() {
                bare.push(i.as_str());
            } else {
                parts.push(format!("{i} {}", a.join(" ")));
            }
        }
        if !bare.is_empty() {
            let named = bare[..bare.len().min(MAX_NAMED_WITHOUT_IPV4)].join(" ");
            let more = bare.len().saturating_sub(MAX_NAMED_WITHOUT_IPV4);
            parts.push(if more > 0 {
                format!("without IPv4: {named} and {more} more")
            } else {
                format!("without IPv4: {named}")
            });
        }
        if parts.is_empty() {
            f.write_str("none")
        } else {
            f.write_str(&parts.join(", "))
        }
    }
}

/// The pick: the address, the method that chose it, and the other addresses the method would accept.
#[derive(Debug, Clone)]
pub struct Detected {
    pub method: String,
    pub chosen: IfaceAddr,
    pub others: Vec<IfaceAddr>,
}

/// An address any method may register: global unicast in calico-node's sense (not loopback, link-local,
/// multicast, broadcast or unspecified).
fn usable(a: &IfaceAddr) -> bool {
    let ip = a.address;
    !(ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_unspecified())
}

fn default_skip() -> Patterns {
    // The list is a constant of valid regexes; a failure here is a bug caught by the unit tests.
    Patterns::new(DEFAULT_SKIP).unwrap_or_else(|e| panic!("DEFAULT_SKIP: {e}"))
}

/// Apply `method` to what the node has. `reach_source` is the kernel's source address towards the
/// `can-reach` destination (see [`source_address_towards`]); other methods ignore it.
pub fn choose(
    method: &Method,
    seen: &Seen,
    reach_source: Option<Ipv4Addr>,
) -> Result<Detected, AutodetectError> {
    let no_match = |detail: String| AutodetectError::NoMatch {
        method: method.to_string(),
        detail,
        seen: seen.to_string(),
    };
    let skip = default_skip();
    let (candidates, detail): (Vec<&IfaceAddr>, String) = match method {
        Method::FirstFound => (
            seen.addrs
                .iter()
                .filter(|a| a.up && usable(a) && !skip.matches(&a.interface))
                .collect(),
            "no global IPv4 address on an interface that is up and not loopback, virtual or a pod's (skipped by name: docker*, cbr*, veth*, cali*, br-*, ...)".into(),
        ),
        Method::Interface(p) => (
            seen.addrs
                .iter()
                .filter(|a| a.up && usable(a) && p.matches(&a.interface))
                .collect(),
            format!("no global IPv4 address on an interface that is up and whose name matches {p}"),
        ),
        Method::SkipInterface(p) => (
            seen.addrs
                .iter()
                .filter(|a| {
                    a.up && usable(a) && !skip.matches(&a.interface) && !p.matches(&a.interface)
                })
                .collect(),
            format!("every global IPv4 address is on an interface that is down, virtual, a pod's or matches {p}"),
        ),
        Method::Cidr(ranges) => (
            seen.addrs
                .iter()
                .filter(|a| a.up && usable(a) && ranges.iter().any(|r| r.contains(a.address)))
                .collect(),
            "no global IPv4 address inside those ranges on an interface that is up".into(),
        ),
        Method::CanReach(target) => {
            let Some(src) = reach_source else {
                return Err(no_match(format!(
                    "the source address towards {target} is unknown"
                )));
            };
            let on: Vec<&IfaceAddr> = seen.addrs.iter().filter(|a| a.address == src).collect();
            if on.is_empty() {
                return Err(no_match(format!(
                    "the kernel reaches {target} from {src}, which is on no interface"
                )));
            }
            if on.iter().all(|a| !usable(a)) {
                return Err(no_match(format!(
                    "the kernel reaches {target} from {src} ({}), which is not a usable node address (is {target} local to the node?)",
                    on[0].interface
                )));
            }
            (on, String::new())
        }
    };
    let mut it = candidates.into_iter();
    match it.next() {
        Some(chosen) => Ok(Detected {
            method: method.to_string(),
            chosen: chosen.clone(),
            others: it.cloned().collect(),
        }),
        None => Err(no_match(detail)),
    }
}

/// List the interfaces and IPv4 addresses of the namespace at `netns` (`None`: the current one), in the
/// kernel's interface order.
pub fn list_addresses(netns: Option<&Path>) -> Result<Seen, AutodetectError> {
    in_netns(netns, || {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| DataplaneError::Invalid {
            what: "interface addresses",
            value: String::new(),
            reason: format!("getifaddrs: {e}"),
        })?;
        let mut seen = Seen::default();
        for a in addrs {
            if !seen.interfaces.contains(&a.interface_name) {
                seen.interfaces.push(a.interface_name.clone());
            }
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                continue;
            };
            let (Some(sin), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
                continue;
            };
            seen.addrs.push(IfaceAddr {
                interface: a.interface_name.clone(),
                address: sin.ip(),
                prefix_len: u32::from(m.ip()).count_ones() as u8,
                up: a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP),
            });
        }
        Ok(seen)
    })
    .map_err(AutodetectError::List)
}

/// The source address the kernel selects to reach `target` (an IPv4 address or a host name) from the
/// namespace at `netns`: connecting a UDP socket runs the route lookup and source selection (RFC 1122
/// 3.3.4.3 in Linux's `ip_route_connect`) and sends nothing.
pub fn source_address_towards(
    target: &str,
    netns: Option<&Path>,
) -> Result<Ipv4Addr, AutodetectError> {
    let t = target.to_string();
    in_netns(netns, move || Ok(probe(&t))).map_err(AutodetectError::List)?
}

fn probe(target: &str) -> Result<Ipv4Addr, AutodetectError> {
    let dest = match target.parse::<Ipv4Addr>() {
        Ok(ip) => ip,
        Err(_) => (target, CAN_REACH_PORT)
            .to_socket_addrs()
            .map_err(|e| AutodetectError::Resolve {
                target: target.into(),
                reason: e.to_string(),
            })?
            .find_map(|a| match a {
                SocketAddr::V4(v4) => Some(*v4.ip()),
                SocketAddr::V6(_) => None,
            })
            .ok_or_else(|| AutodetectError::Resolve {
                target: target.into(),
                reason: "it has only IPv6 addresses".into(),
            })?,
    };
    let unreachable = |reason: String| AutodetectError::Unreachable {
        target: target.into(),
        dest,
        reason,
    };
    let sock = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))
        .map_err(|e| unreachable(format!("UDP socket: {e}")))?;
    sock.connect((dest, CAN_REACH_PORT))
        .map_err(|e| unreachable(e.to_string()))?;
    match sock.local_addr().map_err(|e| unreachable(e.to_string()))? {
        SocketAddr::V4(a) if !a.ip().is_unspecified() => Ok(*a.ip()),
        other => Err(unreachable(format!(
            "the kernel chose no source address ({other})"
        ))),
    }
}

/// Detect the node's IPv4 address with `method` in the namespace at `netns`, and log the pick with the
/// other candidates.
pub fn detect(method: &Method, netns: Option<&Path>) -> Result<Detected, AutodetectError> {
    let seen = list_addresses(netns)?;
    let reach = match method {
        Method::CanReach(t) => Some(source_address_towards(t, netns)?),
        _ => None,
    };
    let d = choose(method, &seen, reach)?;
    tracing::info!(
        method = %d.method,
        interface = %d.chosen.interface,
        address = %d.chosen.address,
        prefix = d.chosen.prefix_len,
        other_candidates = ?d.others.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        seen = %seen,
        "node address autodetected"
    );
    Ok(d)
}

/// `detect` returning what the Node resource needs: the address and its prefix length.
pub fn detect_ipv4(
    method: &Method,
    netns: Option<&Path>,
) -> Result<(Ipv4Addr, u8), AutodetectError> {
    detect(method, netns).map(|d| (d.chosen.address, d.chosen.prefix_len))
}

/// Detect the node's IPv6 address (Calico's `IP6=autodetect` with `IP6_AUTODETECTION_METHOD`): the first
/// global IPv6 address (not loopback, link-local, multicast or unspecified) on an interface that is up and
/// matches `method`, in the kernel's interface order; with its prefix length. `first-found`,
/// `interface=` and `skip-interface=` as for IPv4; `cidr=` and `can-reach=` take IPv4 ranges and targets
/// here, so they are refused for IPv6 with the fix named.
pub fn detect_ipv6(
    method: &Method,
    netns: Option<&Path>,
) -> Result<(std::net::Ipv6Addr, u8), AutodetectError> {
    let found: Vec<(String, std::net::Ipv6Addr, u8, bool)> = in_netns(netns, || {
        let addrs = nix::ifaddrs::getifaddrs().map_err(|e| DataplaneError::Invalid {
            what: "interface addresses",
            value: String::new(),
            reason: format!("getifaddrs: {e}"),
        })?;
        let mut v = Vec::new();
        for a in addrs {
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                continue;
            };
            let (Some(sin), Some(m)) = (addr.as_sockaddr_in6(), mask.as_sockaddr_in6()) else {
                continue;
            };
            let len = u128::from(m.ip()).count_ones() as u8;
            let up = a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            v.push((a.interface_name.clone(), sin.ip(), len, up));
        }
        Ok(v)
    })
    .map_err(AutodetectError::List)?;
    let usable6 = |ip: &std::net::Ipv6Addr| {
        !(ip.is_loopback()
            || ip.is_unspecified()
            || ip.is_multicast()
            || ip.is_unicast_link_local())
    };
    let skip = default_skip();
    let wanted = |name: &str| -> Result<bool, AutodetectError> {
        Ok(match method {
            Method::FirstFound => !skip.matches(name),
            Method::Interface(p) => p.matches(name),
            Method::SkipInterface(p) => !skip.matches(name) && !p.matches(name),
            Method::CanReach(_) | Method::Cidr(_) => {
                return Err(AutodetectError::Method {
                    value: method.to_string(),
                    reason: "IPv6 autodetection takes first-found, interface= or skip-interface= (can-reach= and cidr= are IPv4 here); or set IP6 to the node's IPv6 address".into(),
                })
            }
        })
    };
    let mut candidates = Vec::new();
    for (name, ip, len, up) in &found {
        if *up && usable6(ip) && wanted(name)? {
            candidates.push((name.clone(), *ip, *len));
        }
    }
    let seen = found
        .iter()
        .map(|(n, ip, len, up)| format!("{n} {ip}/{len}{}", if *up { "" } else { " (down)" }))
        .collect::<Vec<_>>()
        .join(", ");
    match candidates.first() {
        Some((name, ip, len)) => {
            tracing::info!(method = %method, interface = %name, address = %ip, prefix = len,
                other_candidates = ?candidates.iter().skip(1).map(|(n, a, l)| format!("{n} {a}/{l}")).collect::<Vec<_>>(),
                "node IPv6 address autodetected");
            Ok((*ip, *len))
        }
        None => Err(AutodetectError::NoMatchV6 {
            method: method.to_string(),
            detail: "no global IPv6 address on an interface that is up and matches (link-local addresses do not count)".into(),
            seen: if seen.is_empty() { "no IPv6 address at all".into() } else { seen },
        }),
    }
}

/// The prefix length `ip` has on the interfaces of the namespace `netns` (for the Node resource's
/// `ipv4Address` / `ipv6Address` and the CrossSubnet decision); the host length (/32, /128) when no interface
/// carries it or the interfaces cannot be read.
pub fn prefix_len_on_interfaces(netns: Option<&std::path::Path>, ip: std::net::IpAddr) -> u8 {
    let host_len = if ip.is_ipv4() { 32 } else { 128 };
    crate::dataplane::netns::in_netns(netns, || {
        let addrs =
            nix::ifaddrs::getifaddrs().map_err(|e| crate::dataplane::DataplaneError::Invalid {
                what: "interface addresses",
                value: String::new(),
                reason: e.to_string(),
            })?;
        Ok(addrs
            .filter_map(|a| {
                let (addr, mask) = (a.address?, a.netmask?);
                let len = match ip {
                    std::net::IpAddr::V4(v4) => {
                        let (sin, m) = (addr.as_sockaddr_in()?.ip(), mask.as_sockaddr_in()?.ip());
                        (sin == v4).then(|| u32::from(m).count_ones())
                    }
                    std::net::IpAddr::V6(v6) => {
                        let (sin, m) = (addr.as_sockaddr_in6()?.ip(), mask.as_sockaddr_in6()?.ip());
                        (sin == v6).then(|| u128::from(m).count_ones())
                    }
                }?;
                u8::try_from(len).ok()
            })
            .next())
    })
    .ok()
    .flatten()
    .unwrap_or(host_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(interface: &str, ip: &str, len: u8) -> IfaceAddr {
        IfaceAddr {
            interface: interface.into(),
            address: ip.parse().unwrap(),
            prefix_len: len,
            up: true,
        }
    }

    fn seen(addrs: Vec<IfaceAddr>) -> Seen {
        let mut interfaces = Vec::new();
        for x in &addrs {
            if !interfaces.contains(&x.interface) {
                interfaces.push(x.interface.clone());
            }
        }
        Seen { interfaces, addrs }
    }

    fn node() -> Seen {
        seen(vec![
            a("lo", "127.0.0.1", 8),
            a("docker0", "172.17.0.1", 16),
            a("mg0123456789a", "10.244.0.1", 32),
            a("eth0", "169.254.3.3", 16),
            a("eth0", "10.0.0.5", 24),
            a("eth1", "192.168.50.7", 24),
            a("br-1a2b", "172.18.0.1", 16),
            a("mgmt0", "10.9.9.9", 24),
        ])
    }

    fn pick(m: &str, s: &Seen) -> Result<Detected, AutodetectError> {
        choose(&m.parse().unwrap(), s, None)
    }

    #[test]
    fn default_skip_list_compiles() {
        let p = default_skip();
        for name in [
            "lo",
            "docker0",
            "veth9",
            "cali1",
            "br-x",
            "mg0123456789a",
            "tunl0",
        ] {
            assert!(p.matches(name), "{name}");
        }
        for name in ["eth0", "ens3", "bond0", "mgmt0", "mg0123456789", "wlan0"] {
            assert!(!p.matches(name), "{name}");
        }
    }

    #[test]
    fn first_found_skips_virtual_pod_loopback_and_link_local() {
        let d = pick("first-found", &node()).unwrap();
        assert_eq!(d.chosen, a("eth0", "10.0.0.5", 24));
        let others: Vec<String> = d.others.iter().map(|x| x.interface.clone()).collect();
        assert_eq!(others, ["eth1", "mgmt0"]);
    }

    #[test]
    fn first_found_skips_interfaces_that_are_down() {
        let mut s = node();
        for x in &mut s.addrs {
            if x.interface == "eth0" {
                x.up = false;
            }
        }
        assert_eq!(
            pick("first-found", &s).unwrap().chosen,
            a("eth1", "192.168.50.7", 24)
        );
    }

    #[test]
    fn interface_regexes_match_anywhere_like_calico() {
        assert_eq!(
            pick("interface=eth1", &node()).unwrap().chosen.address,
            Ipv4Addr::new(192, 168, 50, 7)
        );
        // Any of the list; order of interfaces decides, not order of regexes.
        assert_eq!(
            pick("interface=^mgmt,eth1", &node())
                .unwrap()
                .chosen
                .interface,
            "eth1"
        );
        // interface= does not apply the default skip list: asking for docker0 gets docker0.
        assert_eq!(
            pick("interface=^docker0$", &node())
                .unwrap()
                .chosen
                .interface,
            "docker0"
        );
        // Unanchored, as Go's MatchString: "th0" matches eth0.
        assert_eq!(
            pick("interface=th0", &node()).unwrap().chosen.interface,
            "eth0"
        );
        let e = pick("interface=^wlan", &node()).unwrap_err().to_string();
        assert!(e.contains("interface=^wlan"), "{e}");
        assert!(e.contains("eth0 169.254.3.3/16 10.0.0.5/24"), "{e}");
        assert!(e.contains("--ip"), "{e}");
    }

    #[test]
    fn skip_interface_adds_to_the_default_list() {
        let d = pick("skip-interface=^eth0$", &node()).unwrap();
        assert_eq!(d.chosen.interface, "eth1");
        let d = pick("skip-interface=eth.*,^mgmt", &node());
        let e = d.unwrap_err().to_string();
        assert!(e.contains("skip-interface=eth.*,^mgmt"), "{e}");
        assert!(e.contains("docker0 172.17.0.1/16"), "{e}");
    }

    #[test]
    fn cidr_picks_the_first_address_in_any_range() {
        assert_eq!(
            pick("cidr=192.168.0.0/16", &node())
                .unwrap()
                .chosen
                .interface,
            "eth1"
        );
        // Ranges do not apply the skip list: the operator named the range.
        assert_eq!(
            pick("cidr=172.18.0.0/16,10.9.0.0/16", &node())
                .unwrap()
                .chosen
                .interface,
            "br-1a2b"
        );
        // Link-local never, even when asked for.
        assert!(pick("cidr=169.254.0.0/16", &node()).is_err());
        assert!(pick("cidr=10.1.0.0/16", &node()).is_err());
    }

    #[test]
    fn can_reach_takes_the_interface_of_the_kernels_source_address() {
        let m: Method = "can-reach=8.8.8.8".parse().unwrap();
        let d = choose(&m, &node(), Some(Ipv4Addr::new(192, 168, 50, 7))).unwrap();
        assert_eq!(d.chosen, a("eth1", "192.168.50.7", 24));
        let e = choose(&m, &node(), Some(Ipv4Addr::LOCALHOST))
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a usable node address"), "{e}");
        let e = choose(&m, &node(), Some(Ipv4Addr::new(1, 2, 3, 4)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("on no interface"), "{e}");
    }

    #[test]
    fn messages_count_rather_than_name_many_interfaces_without_ipv4() {
        let mut s = node();
        for k in 0..300 {
            s.interfaces.push(format!("mg{k:011x}"));
        }
        let text = s.to_string();
        assert!(text.contains("eth1 192.168.50.7/24"), "{text}");
        assert!(text.contains("without IPv4: mg00000000000 "), "{text}");
        assert!(text.ends_with("and 292 more"), "{text}");
    }

    #[test]
    fn nothing_at_all_says_none_seen() {
        let e = pick("first-found", &Seen::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("seen: none"), "{e}");
    }

    #[test]
    fn parsing_accepts_calicos_forms_and_round_trips() {
        for s in [
            "first-found",
            "interface=eth0",
            "interface=eth.*,ens.*",
            "skip-interface=^docker",
            "can-reach=10.0.0.1",
            "can-reach=www.example.com",
            "cidr=10.0.0.0/8,192.168.0.0/16",
        ] {
            let m: Method = s.parse().unwrap();
            assert_eq!(m.to_string(), s);
        }
    }

    #[test]
    fn parsing_rejects_with_the_reason() {
        for (s, why) in [
            ("", "empty"),
            ("first", "unknown method"),
            ("magic=1", "unknown method \"magic\""),
            ("interface=", "empty regex"),
            ("interface=eth(", "not a valid regex"),
            ("interface=eth0,", "stray comma"),
            ("can-reach=", "needs an IP address"),
            ("can-reach=a b", "neither an IPv4 address nor a host name"),
            ("can-reach=2001:db8::1", "IPv6"),
            ("cidr=10.0.0.0/33", "not an IPv4 CIDR"),
            ("cidr=10.0.0.1", "no prefix length"),
            ("cidr=fd00::/8", "IPv6 range"),
            ("kubernetes-internal-ip", "downward API"),
        ] {
            let e = parse_method(s).unwrap_err();
            assert!(e.contains(why), "{s:?}: {e}");
            assert!(e.contains("valid: first-found"), "{s:?}: {e}");
        }
    }
}
