//! The chained underlay mode's plumbing ("host-veth"): a pod whose interface is macvlan/ipvlan on the
//! node's NIC cannot reach the node itself (macvlan isolates its parent; kubernetes/kubernetes#53089), so the
//! node's addresses and kube-proxy's service IPs, which live in the node's stack, are out of its reach. This
//! adds a second, unnumbered path: a veth pair from the pod to the node, and routes over it.
//!
//! ```text
//!   node netns                                   pod netns
//!   eth0 10.99.0.11 ── (macvlan parent) ───────── eth0 10.99.0.200/24 (the previous plugin's; untouched)
//!   mhXXXXXXXXXXX (no address) ◀────veth────────▶ veth0 (no address)
//!     10.99.0.200/32 dev mhX scope link            10.99.0.11/32 dev veth0 scope link src 10.99.0.200
//!     rule to 10.99.0.200 lookup main pref 90
//!     (proto 78: the node reaches the pod's        10.96.0.0/12 via 10.99.0.11 dev veth0 src 10.99.0.200
//!      underlay address over the veth)             (proto 78: node addresses, service CIDRs, extras)
//! ```
//!
//! Replies return the way requests came: the pod's /32 to each node address beats the macvlan's connected
//! subnet, so the pod answers the node over the veth; on the node, a rule `to <pod address> lookup main
//! pref 90` (ahead of any source-based rule the node keeps for its own addresses) and the /32 through the veth
//! make the node answer (and un-NAT service traffic for) the pod over the veth, never through the underlay
//! where macvlan would drop it. The pod's routes carry `src` so it sends from its underlay address, the one
//! the node routes back.
//!
//! It owns host interfaces named `mh` + 11 hex characters of SHA-256(workload id), what hangs off them and
//! the pref-90 rules to the pod addresses routed through them;
//! in the pod it creates only the veth end (its routes go with it). It never touches the previous
//! plugin's interface, addresses or routes.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL};
use netlink_packet_route::route::RouteProtocol;
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use sha2::{Digest, Sha256};

use super::error::DataplaneError;
use super::netns::{in_netns, open_netns};
use super::nl::NlSocket;
use super::pod::{
    add_route, add_route_src, create_veth_into, delete_link, dump_routes, find_link, host_net,
    mac_string, nl_err, set_link_up, POD_ROUTE_PROTOCOL,
};
use super::sysctl;

/// Prefix of the host ends of host-veth pairs (not `mg`: the node's pod listing and GC never see them).
pub const HOST_VETH_PREFIX: &str = "mh";

/// Priority of the node's `to <pod address> lookup main` rules: ahead of source-based rules a multi-homed
/// node keeps for its own addresses (commonly numbered from 100), so the node's answer to the pod follows the
/// veth route and never a table that sends the pod's subnet out of the macvlan parent.
pub const HOST_VETH_RULE_PRIORITY: u32 = 90;

/// What host-veth ADD (and CHECK) is asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVethSpec {
    /// The node's network namespace (`None`: the one margay runs in).
    pub node_netns: Option<PathBuf>,
    pub pod_netns: PathBuf,
    /// Names the host end.
    pub workload_id: String,
    /// Who the pair belongs to, written as the host end's alias for GC: see [`owner_alias`].
    pub owner: String,
    /// The veth's name inside the pod.
    pub pod_ifname: String,
    pub mtu: u32,
    /// The pod's underlay addresses (the previous plugin's).
    pub pod_ips: Vec<IpAddr>,
    /// The node's addresses the pod reaches over the veth (one per family at least).
    pub node_ips: Vec<IpAddr>,
    /// Further destinations routed over the veth via the node address of their family (service CIDRs,
    /// configured extras).
    pub routes: Vec<IpNetwork>,
}

/// What ADD built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVethResult {
    pub host_ifname: String,
    pub host_mac: String,
    pub pod_ifname: String,
    pub pod_mac: String,
}

/// `mh` + the first 11 hex characters of SHA-256(workload id).
pub fn host_veth_ifname(workload_id: &str) -> String {
    let hex = hex::encode(Sha256::digest(workload_id.as_bytes()));
    format!("{HOST_VETH_PREFIX}{}", &hex[..11])
}

fn invalid(what: &'static str, value: impl ToString, reason: impl Into<String>) -> DataplaneError {
    DataplaneError::Invalid {
        what,
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// One route inside the pod: (destination, gateway or none for a link route, preferred source).
type PodRoute = (IpNetwork, Option<IpAddr>, IpAddr);

impl HostVethSpec {
    fn validate(&self) -> Result<(), DataplaneError> {
        if self.pod_ips.is_empty() {
            return Err(invalid(
                "pod addresses",
                "none",
                "host-veth needs the pod's underlay address",
            ));
        }
        if self.node_ips.is_empty() {
            return Err(invalid(
                "node addresses",
                "none",
                "the node has no address to route the pod to (margay node run with IP=none and no IP6)",
            ));
        }
        if self.mtu < 68 || self.mtu > 65535 {
            return Err(invalid("MTU", self.mtu, "must be 68 to 65535"));
        }
        Ok(())
    }

    /// The pod's routes over the veth, for each family the pod has an address in and the node too.
    pub fn pod_routes(&self) -> Vec<PodRoute> {
        let mut out = Vec::new();
        for src in &self.pod_ips {
            let Some(gw) = self.node_ips.iter().find(|n| n.is_ipv4() == src.is_ipv4()) else {
                continue;
            };
            for n in self
                .node_ips
                .iter()
                .filter(|n| n.is_ipv4() == src.is_ipv4())
            {
                out.push((host_net(*n), None, *src));
            }
            for r in self.routes.iter().filter(|r| r.is_ipv4() == src.is_ipv4()) {
                out.push((*r, Some(*gw), *src));
            }
        }
        // Link routes first: the kernel refuses a gateway it has no route to yet.
        out.sort_by_key(|(dst, gw, src)| (gw.is_some(), *dst, *gw, *src));
        out.dedup_by(|a, b| a.0 == b.0);
        out
    }
}

fn rule_msg(ip: IpAddr) -> RuleMessage {
    let mut m = RuleMessage::default();
    m.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    m.header.dst_len = if ip.is_ipv4() { 32 } else { 128 };
    m.header.table = 254;
    m.header.action = RuleAction::ToTable;
    m.attributes.push(RuleAttribute::Destination(ip));
    m.attributes
        .push(RuleAttribute::Priority(HOST_VETH_RULE_PRIORITY));
    m.attributes.push(RuleAttribute::Table(254));
    m.attributes
        .push(RuleAttribute::Protocol(RouteProtocol::from(
            POD_ROUTE_PROTOCOL,
        )));
    m
}

/// `ip rule add to <ip> lookup main pref 90 proto 78`; present already is fine.
fn add_rule(sock: &mut NlSocket, ip: IpAddr) -> Result<(), DataplaneError> {
    match sock.request(
        RouteNetlinkMessage::NewRule(rule_msg(ip)),
        NLM_F_CREATE | NLM_F_EXCL,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e.errno == libc::EEXIST => Ok(()),
        Err(e) => Err(nl_err(sock, "add rule", format!("to {ip} lookup main"), e)),
    }
}

/// Delete that rule; absent is fine.
fn del_rule(sock: &mut NlSocket, ip: IpAddr) -> Result<(), DataplaneError> {
    match sock.request(RouteNetlinkMessage::DelRule(rule_msg(ip)), 0) {
        Ok(()) => Ok(()),
        Err(e) if e.errno == libc::ENOENT => Ok(()),
        Err(e) => Err(nl_err(
            sock,
            "delete rule",
            format!("to {ip} lookup main"),
            e,
        )),
    }
}

/// Whether the rule for `ip` is in place.
fn has_rule(sock: &mut NlSocket, ip: IpAddr) -> Result<bool, DataplaneError> {
    let mut q = RuleMessage::default();
    q.header.family = if ip.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let replies = sock
        .dump(RouteNetlinkMessage::GetRule(q))
        .map_err(|e| nl_err(sock, "dump rules", "", e))?;
    Ok(replies.iter().any(|r| match r {
        RouteNetlinkMessage::NewRule(m) => {
            m.attributes.contains(&RuleAttribute::Destination(ip))
                && m.attributes
                    .contains(&RuleAttribute::Priority(HOST_VETH_RULE_PRIORITY))
        }
        _ => false,
    }))
}

/// ADD: build the veth and its routes. Idempotent: a complete pair is left as it is; an incomplete one (or
/// one built for other addresses) is replaced. On failure nothing of it is left.
pub fn add_host_veth(spec: &HostVethSpec) -> Result<HostVethResult, DataplaneError> {
    spec.validate()?;
    let host = host_veth_ifname(&spec.workload_id);
    let pod_ns = open_netns(&spec.pod_netns)?;
    let mut node = NlSocket::open(spec.node_netns.as_deref())?;
    let mut pod = NlSocket::open(Some(&spec.pod_netns))?;
    if let Some(existing) = find_link(&mut node, &host)? {
        match verify(spec, &host, &mut node, &mut pod) {
            Ok(()) => return result(spec, &host, &mut node, &mut pod),
            Err(why) => {
                tracing::info!(workload = %spec.workload_id, interface = %host, reason = %why, "replacing an incomplete host-veth pair");
                delete_link(&mut node, existing.index, &host)?;
            }
        }
    }
    if find_link(&mut pod, &spec.pod_ifname)?.is_some() {
        return Err(DataplaneError::NameCollision {
            name: spec.pod_ifname.clone(),
            netns: pod.netns.clone(),
        });
    }
    // Both ends in one request, the peer created inside the pod under its final name.
    create_veth_into(
        &mut node,
        &pod,
        &pod_ns,
        (&host, None),
        &spec.pod_ifname,
        spec.mtu,
    )?;
    match build(spec, &host, &mut node, &mut pod) {
        Ok(r) => Ok(r),
        Err(e) => {
            for ip in &spec.pod_ips {
                let _ = del_rule(&mut node, *ip);
            }
            if let Ok(Some(l)) = find_link(&mut node, &host) {
                if let Err(undo) = delete_link(&mut node, l.index, &host) {
                    tracing::error!(interface = %host, error = %undo, "could not undo a failed host-veth ADD");
                }
            }
            Err(e)
        }
    }
}

fn build(
    spec: &HostVethSpec,
    host: &str,
    node: &mut NlSocket,
    pod: &mut NlSocket,
) -> Result<HostVethResult, DataplaneError> {
    let host_link = find_link(node, host)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: host.to_string(),
        netns: node.netns.clone(),
    })?;
    // Forwarding on the host end: service traffic from the pod is DNATed and forwarded on by the node.
    let label = node.netns.clone();
    let settings = [
        (format!("net/ipv4/conf/{host}/forwarding"), "1"),
        (format!("net/ipv6/conf/{host}/accept_ra"), "0"),
    ];
    in_netns(spec.node_netns.as_deref(), || {
        sysctl::set_here(&label, &settings[..1], false)?;
        sysctl::set_here(&label, &settings[1..], true)?;
        Ok(())
    })?;
    set_link_up(node, host_link.index, host, Some(&spec.owner))?;
    let pod_link =
        find_link(pod, &spec.pod_ifname)?.ok_or_else(|| DataplaneError::DeviceNotFound {
            name: spec.pod_ifname.clone(),
            netns: pod.netns.clone(),
        })?;
    set_link_up(pod, pod_link.index, &spec.pod_ifname, None)?;
    for r in spec.pod_routes() {
        let (dst, gw, src) = r;
        add_route_src(pod, dst, gw, Some(src), pod_link.index, &spec.pod_ifname)?;
    }
    for ip in &spec.pod_ips {
        add_route(node, host_net(*ip), None, host_link.index, host)?;
        add_rule(node, *ip)?;
    }
    result(spec, host, node, pod)
}

fn result(
    spec: &HostVethSpec,
    host: &str,
    node: &mut NlSocket,
    pod: &mut NlSocket,
) -> Result<HostVethResult, DataplaneError> {
    let h = find_link(node, host)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: host.to_string(),
        netns: node.netns.clone(),
    })?;
    let p = find_link(pod, &spec.pod_ifname)?.ok_or_else(|| DataplaneError::DeviceNotFound {
        name: spec.pod_ifname.clone(),
        netns: pod.netns.clone(),
    })?;
    Ok(HostVethResult {
        host_ifname: host.to_string(),
        host_mac: mac_string(&h.mac),
        pod_ifname: spec.pod_ifname.clone(),
        pod_mac: mac_string(&p.mac),
    })
}

/// Everything ADD makes is there: the pair (both up, peers of each other), the host routes to the pod's
/// addresses and the pod's routes over the veth. The first difference is the error.
fn verify(
    spec: &HostVethSpec,
    host: &str,
    node: &mut NlSocket,
    pod: &mut NlSocket,
) -> Result<(), DataplaneError> {
    let differs = |what: String| invalid("host-veth attachment", &spec.workload_id, what);
    let h = find_link(node, host)?.ok_or_else(|| differs(format!("no host interface {host}")))?;
    let p = find_link(pod, &spec.pod_ifname)?
        .ok_or_else(|| differs(format!("no interface {} in the pod", spec.pod_ifname)))?;
    if !h.kind_veth || !p.kind_veth || p.peer_index != Some(h.index) || !h.up || !p.up {
        return Err(differs(format!(
            "{host} and {} are not an up veth pair of each other",
            spec.pod_ifname
        )));
    }
    let host_routes = dump_routes(node, Some(POD_ROUTE_PROTOCOL))?;
    for ip in &spec.pod_ips {
        if !host_routes
            .iter()
            .any(|(dst, gw, oif, _, _)| *dst == host_net(*ip) && gw.is_none() && *oif == h.index)
        {
            return Err(differs(format!("no host route {ip} dev {host}")));
        }
        if !has_rule(node, *ip)? {
            return Err(differs(format!(
                "no rule to {ip} lookup main pref {HOST_VETH_RULE_PRIORITY}"
            )));
        }
    }
    let pod_routes = dump_routes(pod, Some(POD_ROUTE_PROTOCOL))?;
    for (dst, gw, _) in spec.pod_routes() {
        if !pod_routes
            .iter()
            .any(|(d, g, oif, _, _)| *d == dst && *g == gw && *oif == p.index)
        {
            let via = gw.map(|g| format!(" via {g}")).unwrap_or_default();
            return Err(differs(format!(
                "no route {dst}{via} dev {} in the pod",
                spec.pod_ifname
            )));
        }
    }
    Ok(())
}

/// CHECK: everything ADD made is in place (see [`verify`]).
pub fn check_host_veth(spec: &HostVethSpec) -> Result<HostVethResult, DataplaneError> {
    spec.validate()?;
    let host = host_veth_ifname(&spec.workload_id);
    let mut node = NlSocket::open(spec.node_netns.as_deref())?;
    let mut pod = NlSocket::open(Some(&spec.pod_netns))?;
    verify(spec, &host, &mut node, &mut pod)?;
    result(spec, &host, &mut node, &mut pod)
}

/// DEL: delete the rules for the pod's addresses and the host end (its peer, the host routes through it and
/// the pod's routes over it go with it). True when there was something to delete; the previous plugin's interface is not touched.
pub fn del_host_veth(node_netns: Option<&Path>, workload_id: &str) -> Result<bool, DataplaneError> {
    let host = host_veth_ifname(workload_id);
    let mut node = NlSocket::open(node_netns)?;
    match find_link(&mut node, &host)? {
        Some(l) => {
            del_pair(&mut node, l.index, &host)?;
            Ok(true)
        }
        None => Ok(false),
    }
}

/// Delete the rules of the pair whose host end is `index`, then the pair.
fn del_pair(node: &mut NlSocket, index: u32, host: &str) -> Result<(), DataplaneError> {
    // The rules name the pod's addresses, which only the host routes through the veth still know.
    let ips: Vec<IpAddr> = dump_routes(node, Some(POD_ROUTE_PROTOCOL))?
        .into_iter()
        .filter(|(_, gw, oif, _, _)| gw.is_none() && *oif == index)
        .map(|(dst, ..)| dst.ip())
        .collect();
    for ip in ips {
        del_rule(node, ip)?;
    }
    delete_link(node, index, host)
}

/// The alias ADD writes on the host end: `<network>/<container id>/<CNI_IFNAME>`, what CNI GC's
/// `cni.dev/valid-attachments` name (the interface name is a hash of the workload, which for a Kubernetes
/// pod is its namespace and name, not its container id). Network names, container ids and interface
/// names contain no `/`.
pub fn owner_alias(network: &str, container_id: &str, ifname: &str) -> String {
    format!("{network}/{container_id}/{ifname}")
}

/// CNI GC for host-veth mode: delete the pairs of `network` (by the host end's alias) whose (container
/// id, CNI_IFNAME) is not in `valid`, with their rules. Pairs of other networks, and `mh*` interfaces
/// without such an alias (not margay's, or made before the alias existed), are left alone. Returns the
/// host ends deleted.
pub fn gc_host_veths(
    node_netns: Option<&Path>,
    network: &str,
    valid: &std::collections::BTreeSet<(String, String)>,
) -> Result<Vec<String>, DataplaneError> {
    let mut node = NlSocket::open(node_netns)?;
    let mut removed = Vec::new();
    for l in super::pod::list_links(&mut node)? {
        if !l.kind_veth || !l.name.starts_with(HOST_VETH_PREFIX) {
            continue;
        }
        let mut parts = l.alias.splitn(3, '/');
        let (Some(net), Some(cid), Some(ifname)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if net != network || valid.contains(&(cid.to_string(), ifname.to_string())) {
            continue;
        }
        del_pair(&mut node, l.index, &l.name)?;
        removed.push(l.name);
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_routes_per_family_via_the_node() {
        let spec = HostVethSpec {
            node_netns: None,
            pod_netns: PathBuf::from("/x"),
            workload_id: "w".into(),
            owner: owner_alias("n", "c", "eth0"),
            pod_ifname: "veth0".into(),
            mtu: 1500,
            pod_ips: vec!["10.99.0.200".parse().unwrap()],
            node_ips: vec!["10.99.0.11".parse().unwrap(), "fd00::11".parse().unwrap()],
            routes: vec![
                "10.96.0.0/12".parse().unwrap(),
                "fd00:96::/108".parse().unwrap(),
            ],
        };
        let r = spec.pod_routes();
        let src: IpAddr = "10.99.0.200".parse().unwrap();
        assert_eq!(
            r,
            vec![
                // The link route to the node first: the kernel needs it to accept the gateway.
                ("10.99.0.11/32".parse().unwrap(), None, src),
                (
                    "10.96.0.0/12".parse().unwrap(),
                    Some("10.99.0.11".parse().unwrap()),
                    src
                ),
            ]
        );
        assert!(host_veth_ifname("w").starts_with("mh") && host_veth_ifname("w").len() == 13);
    }
}
