//! The desired peer set of one node, derived from a validated [`ConfigSet`] exactly as Calico's confd does it
//! (Calico's confd peering rules): the node-to-node mesh with its passive side chosen by comparing the two IPs as
//! strings, global peers, `node` / `nodeSelector` peers, `peerSelector` expansion with automatic reverse
//! peerings, route-reflector client marking, and every per-peer knob (next-hop mode, timers, password,
//! ttlSecurity, port, source address).
//!
//! Pure: the speaker diffs two results of [`desired_peers`] (keyed by [`DesiredPeer::key`]) to add, remove or
//! update sessions without touching unchanged ones.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use super::bgp::{
    BgpConfiguration, BgpPeer, ConfigSet, NextHopMode, Node, ReversePeering, SourceAddress,
    KIND_BGP_PEER, KIND_NODE,
};
use super::meta::ConfigError;
use super::selector::Selector;

/// Which rule produced a peer; named as `calicoctl node status` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerType {
    /// `Mesh_<ip>`: "node-to-node mesh".
    Mesh,
    /// `Global_<ip>`: "global".
    Global,
    /// `Node_<ip>`: "node specific".
    Node,
}

impl PeerType {
    pub fn as_status(self) -> &'static str {
        match self {
            PeerType::Mesh => "node-to-node mesh",
            PeerType::Global => "global",
            PeerType::Node => "node specific",
        }
    }
}

/// One BGP session this node should have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Calico's protocol name: `Mesh_10_0_0_2`, `Global_10_0_0_9`, `Global_10_0_0_9_port_1790`, `Node_fd00__3`.
    pub name: String,
    pub peer_type: PeerType,
    pub address: IpAddr,
    pub port: u16,
    pub peer_as: u32,
    pub local_as: u32,
    /// Bind the outgoing connection to this address (`sourceAddress: UseNodeIP`, the default).
    pub source_address: Option<IpAddr>,
    /// Only accept, never connect: the peer is a Calico node whose IP sorts after ours as a string.
    pub passive: bool,
    /// TCP MD5 password (resolved from its Secret).
    pub password: Option<String>,
    /// GTSM hop count (`ttlSecurity`); None = `ttl security off; multihop` (Calico makes every session multihop).
    pub ttl_security: Option<u8>,
    pub keepalive_time: Option<Duration>,
    /// Graceful-restart time we advertise / wait (`maxRestartTime`, `nodeMeshMaxRestartTime`), default 120 s.
    pub max_restart_time: Duration,
    pub next_hop_mode: NextHopMode,
    /// We are a route reflector and this iBGP peer is our client.
    pub rr_client: bool,
    /// Our cluster id, when we reflect.
    pub cluster_id: Option<Ipv4Addr>,
    /// `numAllowedLocalASNumbers`.
    pub num_allowed_local_as: Option<u32>,
    /// The Calico node behind this address, when it is one.
    pub peer_node: Option<String>,
    /// The BGPPeer resource that produced it (None for the mesh).
    pub from_resource: Option<String>,
    /// Long-Lived Stale Time (RFC 9494) advertised and accepted on this session; zero = LLGR off. See
    /// [`llgr_stale_time`].
    pub llgr_stale_time: Duration,
    /// BFD for this session (annotations on the BGPPeer, or on the default BGPConfiguration for the mesh).
    pub bfd: Option<super::bfd::BfdConfig>,
}

impl DesiredPeer {
    /// Identity of a session: one per (address, port).
    pub fn key(&self) -> (IpAddr, u16) {
        (self.address, self.port)
    }

    pub fn is_ibgp(&self) -> bool {
        self.peer_as == self.local_as
    }
}

/// Calico's name suffix for an IP: separators become `_`.
fn ip_name(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "_")
}

struct Local {
    ip4: Option<IpAddr>,
    ip6: Option<IpAddr>,
    asn: u32,
    cluster_id: Option<Ipv4Addr>,
}

impl Local {
    fn ip_for(&self, peer: &IpAddr) -> Option<IpAddr> {
        if peer.is_ipv4() {
            self.ip4
        } else {
            self.ip6
        }
    }
}

/// The peers `node_name` should have. Errors name the resource that cannot be applied to this node.
pub fn desired_peers(set: &ConfigSet, node_name: &str) -> Result<Vec<DesiredPeer>, ConfigError> {
    let global = set.default_bgp();
    let global_as = global.as_number();
    let node = set.nodes.get(node_name).ok_or_else(|| {
        ConfigError::new(
            KIND_NODE,
            node_name,
            "metadata.name",
            node_name,
            "this node has no Node resource",
        )
    })?;
    let me = Local {
        ip4: node.ipv4(),
        ip6: node.ipv6(),
        asn: node.as_number().unwrap_or(global_as),
        cluster_id: node.cluster_id(),
    };
    // Nodes by each of their addresses, to recognise Calico nodes among peer IPs.
    let mut node_by_ip: BTreeMap<IpAddr, &Node> = BTreeMap::new();
    for n in set.nodes.values() {
        for ip in [n.ipv4(), n.ipv6()].into_iter().flatten() {
            node_by_ip.insert(ip, n);
        }
    }

    let mut out: BTreeMap<(IpAddr, u16), DesiredPeer> = BTreeMap::new();
    let mut explicit: Vec<DesiredPeer> = Vec::new();

    // Explicit BGPPeers: global ones first so node-specific duplicates of the same IP:port are dropped
    // (Calico's confd peering rules).
    let mut peers: Vec<&BgpPeer> = set.bgp_peers.values().collect();
    peers.sort_by_key(|p| (is_node_specific(p), p.metadata.name.clone()));
    for p in peers {
        let err = |field: &str, v: &str, r: &str| {
            ConfigError::new(KIND_BGP_PEER, &p.metadata.name, field, v, r)
        };
        let node_sel = match &p.spec.node_selector {
            Some(s) => {
                Some(Selector::parse(s).map_err(|e| err("spec.nodeSelector", s, &e.to_string()))?)
            }
            None => None,
        };
        let peer_sel = match &p.spec.peer_selector {
            Some(s) => {
                Some(Selector::parse(s).map_err(|e| err("spec.peerSelector", s, &e.to_string()))?)
            }
            None => None,
        };
        let applies_to = |n: &Node| match (&p.spec.node, &node_sel) {
            (Some(name), _) if !name.is_empty() => *name == n.metadata.name,
            (_, Some(sel)) => sel.matches(&n.metadata.labels),
            _ => true,
        };
        let peer_type = if is_node_specific(p) {
            PeerType::Node
        } else {
            PeerType::Global
        };
        let bfd = super::bfd::BfdConfig::from_meta(KIND_BGP_PEER, &p.metadata)?;
        let first_new = explicit.len();

        // Forward: this node is selected by node / nodeSelector (or the peer is global).
        if applies_to(node) {
            if let Some(addr) = p.peer_address() {
                let asn = p.spec.as_number.map(|a| a.0).unwrap_or(global_as);
                explicit.push(build(
                    set,
                    &me,
                    p,
                    peer_type,
                    addr.ip,
                    addr.port,
                    asn,
                    node_by_ip.get(&addr.ip).copied(),
                ));
            } else if let Some(sel) = &peer_sel {
                for other in set
                    .nodes
                    .values()
                    .filter(|n| n.metadata.name != node_name && sel.matches(&n.metadata.labels))
                {
                    for ip in [other.ipv4(), other.ipv6()].into_iter().flatten() {
                        let asn = other.as_number().unwrap_or(global_as);
                        explicit.push(build(set, &me, p, peer_type, ip, None, asn, Some(other)));
                    }
                }
            }
        }
        // Reverse: this node is selected by peerSelector; peer with every node the resource applies to.
        if let Some(sel) = &peer_sel {
            let reverse = p.spec.reverse_peering.unwrap_or_default() == ReversePeering::Auto;
            if reverse && sel.matches(&node.metadata.labels) {
                for other in set
                    .nodes
                    .values()
                    .filter(|n| n.metadata.name != node_name && applies_to(n))
                {
                    for ip in [other.ipv4(), other.ipv6()].into_iter().flatten() {
                        let asn = other.as_number().unwrap_or(global_as);
                        explicit.push(build(set, &me, p, peer_type, ip, None, asn, Some(other)));
                    }
                }
            }
        }
        for d in &mut explicit[first_new..] {
            d.bfd = bfd;
        }
    }
    for d in explicit {
        // Never peer with ourselves, and only over a family we have an address in.
        if Some(d.address) == me.ip4 || Some(d.address) == me.ip6 {
            continue;
        }
        out.entry(d.key()).or_insert(d);
    }

    // The mesh (Calico's confd peering rules): only on nodes that are not route reflectors, to every other node that is not
    // one either; explicit peerings to the same address win.
    if global.mesh_enabled() && me.cluster_id.is_none() {
        let mesh_bfd =
            super::bfd::BfdConfig::from_meta(super::bgp::KIND_BGP_CONFIGURATION, &global.metadata)?;
        let password = global
            .spec
            .node_mesh_password
            .as_ref()
            .and_then(|p| p.secret_key_ref.as_ref())
            .and_then(|r| set.resolve_secret(r))
            .map(str::to_string);
        for other in set.nodes.values() {
            if other.metadata.name == node_name || other.cluster_id().is_some() {
                continue;
            }
            for ip in [other.ipv4(), other.ipv6()].into_iter().flatten() {
                let Some(local_ip) = me.ip_for(&ip) else {
                    continue;
                };
                let port = set.listen_port(&other.metadata.name);
                if out.contains_key(&(ip, port)) {
                    continue;
                }
                let d = DesiredPeer {
                    name: format!("Mesh_{}", ip_name(&ip)),
                    peer_type: PeerType::Mesh,
                    address: ip,
                    port,
                    peer_as: other.as_number().unwrap_or(global_as),
                    local_as: me.asn,
                    source_address: Some(local_ip),
                    passive: ip.to_string() > local_ip.to_string(),
                    password: password.clone(),
                    ttl_security: None,
                    keepalive_time: None,
                    max_restart_time: global.node_mesh_max_restart_time(),
                    next_hop_mode: NextHopMode::Auto,
                    rr_client: false,
                    cluster_id: None,
                    num_allowed_local_as: None,
                    peer_node: Some(other.metadata.name.clone()),
                    from_resource: None,
                    llgr_stale_time: llgr_stale_time(&global, None, true),
                    bfd: mesh_bfd,
                };
                out.insert(d.key(), d);
            }
        }
    }
    Ok(out.into_values().collect())
}

fn is_node_specific(p: &BgpPeer) -> bool {
    p.spec.node.as_deref().is_some_and(|n| !n.is_empty()) || p.spec.node_selector.is_some()
}

#[allow(clippy::too_many_arguments)]
fn build(
    set: &ConfigSet,
    me: &Local,
    p: &BgpPeer,
    peer_type: PeerType,
    ip: IpAddr,
    port: Option<u16>,
    peer_as: u32,
    peer_node: Option<&Node>,
) -> DesiredPeer {
    let local_as = p.spec.local_as_number.map(|a| a.0).unwrap_or(me.asn);
    let local_ip = me.ip_for(&ip);
    // A Calico node listens on its own listenPort; anything else on the port given, or 179.
    let port = port.unwrap_or_else(|| match peer_node {
        Some(n) => set.listen_port(&n.metadata.name),
        None => super::bgp::DEFAULT_LISTEN_PORT,
    });
    let name = match (peer_type, port) {
        (PeerType::Global, p) if p != super::bgp::DEFAULT_LISTEN_PORT => {
            format!("Global_{}_port_{p}", ip_name(&ip))
        }
        (PeerType::Global, _) => format!("Global_{}", ip_name(&ip)),
        (_, p) if p != super::bgp::DEFAULT_LISTEN_PORT => format!("Node_{}_port_{p}", ip_name(&ip)),
        _ => format!("Node_{}", ip_name(&ip)),
    };
    let ibgp = peer_as == local_as;
    // RR client: we have a cluster id and the iBGP peer has none or another one (Calico's confd peering rules).
    let rr_client =
        me.cluster_id.is_some() && ibgp && peer_node.and_then(|n| n.cluster_id()) != me.cluster_id;
    // keepOriginalNextHop (deprecated) is rendered for eBGP peers only.
    let next_hop_mode = match (p.spec.next_hop_mode, p.spec.keep_original_next_hop) {
        (Some(m), _) => m,
        (None, Some(true)) if !ibgp => NextHopMode::Keep,
        _ => NextHopMode::Auto,
    };
    DesiredPeer {
        name,
        peer_type,
        address: ip,
        port,
        peer_as,
        local_as,
        source_address: match p.spec.source_address.unwrap_or_default() {
            SourceAddress::UseNodeIP => local_ip,
            SourceAddress::None => None,
        },
        // Calico nodes among explicit peers are passive by the same string comparison as the mesh.
        passive: peer_node.is_some() && local_ip.is_some_and(|l| ip.to_string() > l.to_string()),
        password: p
            .spec
            .password
            .as_ref()
            .and_then(|pw| pw.secret_key_ref.as_ref())
            .and_then(|r| set.resolve_secret(r))
            .map(str::to_string),
        ttl_security: p.spec.ttl_security,
        keepalive_time: p.spec.keepalive_time.map(|d| d.0),
        max_restart_time: p.max_restart_time(),
        next_hop_mode,
        rr_client,
        cluster_id: me.cluster_id,
        num_allowed_local_as: p.spec.num_allowed_local_as_numbers,
        peer_node: peer_node.map(|n| n.metadata.name.clone()),
        from_resource: Some(p.metadata.name.clone()),
        llgr_stale_time: llgr_stale_time(&set.default_bgp(), Some(p), peer_node.is_some()),
        bfd: None,
    }
}

/// The Long-Lived Stale Time of a session: the BGPPeer's `margay.io/llgr-stale-time` annotation when it has
/// one; else, towards a Calico node (mesh, route reflector), the default BGPConfiguration's annotation or a
/// day; else (an external router) off, as RFC 9494 section 5 asks of a session nobody configured for it.
fn llgr_stale_time(global: &BgpConfiguration, p: Option<&BgpPeer>, to_node: bool) -> Duration {
    match p.and_then(BgpPeer::llgr_stale_time) {
        Some(d) => d,
        None if to_node => global.node_llgr_stale_time(),
        None => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_calico() {
        assert_eq!(ip_name(&"10.0.0.2".parse().expect("ip")), "10_0_0_2");
        assert_eq!(ip_name(&"fd00::3".parse().expect("ip")), "fd00__3");
        assert_eq!(PeerType::Mesh.as_status(), "node-to-node mesh");
    }
}
