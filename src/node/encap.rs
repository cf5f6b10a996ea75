//! Encapsulated pools, as Calico builds them, one follower per tunnel kind: VXLAN for pools with `vxlanMode:
//! Always | CrossSubnet` (IPv4 `vxlan.calico`, IPv6 `vxlan-v6.calico`, see [`crate::dataplane::vxlan`]) and
//! IPIP for `ipipMode: Always | CrossSubnet` (`tunl0`, IPv4 only, see [`crate::dataplane::ipip`]). Each
//! follower keeps the node's tunnel device, its tunnel address from IPAM (handle `vxlan-tunnel-addr-<node>`
//! / `vxlan-v6-tunnel-addr-<node>` / `ipip-tunnel-addr-<node>`, attribute `type: vxlanTunnelAddress` /
//! `vxlanV6TunnelAddress` / `ipipTunnelAddress`) written to its Node resource (`spec.ipv4VXLANTunnelAddr` /
//! `spec.ipv6VXLANTunnelAddr` / `spec.bgp.ipv4IPIPTunnelAddr`, so calicoctl and Calico nodes see it) and, for
//! VXLAN, the neighbour/FDB entries of every other node that has a VTEP of that family.
//!
//! Pod routes still come over BGP; [`super::nexthop`] sends those of encapsulated pools through the tunnel
//! using the [`EncapRouting`] published here: VXLAN `<block> via <remote tunnel address> dev vxlan.calico
//! onlink`, IPIP `<block> via <remote node address> dev tunl0 onlink`; CrossSubnet only towards nodes
//! outside the local subnet. When the tunnel cannot be built (no ipip module, no tunnel address yet) the
//! routes that need it are withheld and reported, never installed unencapsulated.
//!
//! ```text
//!   NodeIpam pools ─┐
//!   etcd nodes/ ────┼─▶ follow_tunnel(kind) ──▶ tunnel address (IPAM) + the Node's tunnel address field
//!   (watch, VXLAN)  │                       └─▶ device (+ VXLAN: neighbour + FDB per remote VTEP, netlink)
//!                   └─────────────────────────▶ watch<EncapRouting> ──▶ nexthop::learned_routes
//! ```
//!
//! With `CALICO_NETWORKING_BACKEND=vxlan` there is no BGP: [`route_by_affinities`] routes every other node's
//! block (and every address another node borrowed) from the IPAM blocks, as Felix does.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use ipnetwork::IpNetwork;
use tokio::sync::watch;

use crate::config::ippool::{EncapMode, IpPool};
use crate::dataplane::fib::NextHop;
use crate::dataplane::vxlan::{self, LocalVtep, RemoteVtep};
use crate::dataplane::{ipip, mtu};
use crate::datastore::resources;
use crate::datastore::{keys, Datastore, WatchMessage};
use crate::ipam::{AssignRequest, Family, NodeIpam};

use crate::config::bgp::NODE_PLURAL;

/// Felix re-checks its tunnel devices this often; so do we (kernel only, no datastore read).
const RECONCILE: Duration = Duration::from_secs(10);

/// One kind of tunnel, with Calico's names for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash, PartialOrd, Ord)]
pub enum Tunnel {
    /// `vxlan.calico`, IPv4 pools with `vxlanMode`.
    #[default]
    VxlanV4,
    /// `vxlan-v6.calico`, IPv6 pools with `vxlanMode`.
    VxlanV6,
    /// `tunl0`, IPv4 pools with `ipipMode`.
    Ipip,
}

impl Tunnel {
    /// The tunnel carries IPv6 pools (and its outer packets are IPv6).
    pub fn v6(self) -> bool {
        self == Tunnel::VxlanV6
    }
    /// VXLAN (per-remote neighbour and FDB entries, a remote tunnel address as gateway).
    pub fn is_vxlan(self) -> bool {
        self != Tunnel::Ipip
    }
    /// The kernel device.
    pub fn device(self) -> &'static str {
        match self {
            Tunnel::VxlanV4 => vxlan::DEVICE,
            Tunnel::VxlanV6 => vxlan::DEVICE_V6,
            Tunnel::Ipip => ipip::DEVICE,
        }
    }
    /// How `margay status` names it.
    pub fn label(self) -> &'static str {
        match self {
            Tunnel::VxlanV4 | Tunnel::VxlanV6 => "VXLAN",
            Tunnel::Ipip => "IPIP",
        }
    }
    fn handle(self, me: &str) -> String {
        match self {
            Tunnel::VxlanV4 => format!("vxlan-tunnel-addr-{me}"),
            Tunnel::VxlanV6 => format!("vxlan-v6-tunnel-addr-{me}"),
            Tunnel::Ipip => format!("ipip-tunnel-addr-{me}"),
        }
    }
    fn attr_type(self) -> &'static str {
        match self {
            Tunnel::VxlanV4 => "vxlanTunnelAddress",
            Tunnel::VxlanV6 => "vxlanV6TunnelAddress",
            Tunnel::Ipip => "ipipTunnelAddress",
        }
    }
    /// Where the Node resource keeps the tunnel address: (inside `spec.bgp`?, field).
    fn tunnel_field(self) -> (bool, &'static str) {
        match self {
            Tunnel::VxlanV4 => (false, "ipv4VXLANTunnelAddr"),
            Tunnel::VxlanV6 => (false, "ipv6VXLANTunnelAddr"),
            Tunnel::Ipip => (true, "ipv4IPIPTunnelAddr"),
        }
    }
    fn address_field(self) -> &'static str {
        if self.v6() {
            "ipv6Address"
        } else {
            "ipv4Address"
        }
    }
    fn mac_field(self) -> &'static str {
        if self.v6() {
            "vxlanTunnelMACAddrV6"
        } else {
            "vxlanTunnelMACAddr"
        }
    }
    fn mac(self, node: &str) -> [u8; 6] {
        if self.v6() {
            vxlan::vtep_mac_v6(node)
        } else {
            vxlan::vtep_mac(node)
        }
    }
    fn overhead(self) -> u32 {
        match self {
            Tunnel::VxlanV4 => mtu::VXLAN_V4_OVERHEAD,
            Tunnel::VxlanV6 => mtu::VXLAN_V6_OVERHEAD,
            Tunnel::Ipip => mtu::IPIP_OVERHEAD,
        }
    }
    /// The pool's mode for this tunnel (Never for a pool of the other family).
    fn mode(self, p: &IpPool) -> EncapMode {
        if p.spec.cidr.is_ipv6() != self.v6() {
            return EncapMode::Never;
        }
        match self {
            Tunnel::VxlanV4 | Tunnel::VxlanV6 => p.spec.vxlan_mode,
            Tunnel::Ipip => p.spec.ipip_mode,
        }
        .unwrap_or_default()
    }
    fn status_slot(self, s: &mut crate::api::DataplaneSummary) -> &mut Option<String> {
        match self {
            Tunnel::VxlanV4 => &mut s.vxlan,
            Tunnel::VxlanV6 => &mut s.vxlan_v6,
            Tunnel::Ipip => &mut s.ipip,
        }
    }
}

/// What route computation needs to know about one tunnel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncapRouting {
    pub tunnel: Tunnel,
    /// Pools with this encapsulation on, and their mode (empty: the tunnel is off).
    pub pools: Vec<(IpNetwork, EncapMode)>,
    /// The local node address's subnet (CrossSubnet: same subnet goes unencapsulated).
    pub local_subnet: Option<IpNetwork>,
    /// VXLAN: remote node address -> its tunnel address, for every node with a VTEP.
    pub tunnels: BTreeMap<IpAddr, IpAddr>,
    /// VXLAN: remote node name -> its node address, for every node with a VTEP (routing by block affinity).
    pub hosts: BTreeMap<String, IpAddr>,
    /// The local tunnel device is up (routes through it can be installed).
    pub ready: bool,
    /// Why it is not, when it is not (shown with each withheld route).
    pub not_ready: Option<String>,
}

/// Where a learned route of an encapsulated pool goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encap {
    /// Not a pool of this tunnel, or CrossSubnet towards the local subnet: route as usual.
    No,
    /// Through the tunnel, by this next hop (`via ... dev <tunnel> onlink`).
    Tunnel(NextHop),
    /// Should be encapsulated but cannot be (why): the route is withheld, never sent unencapsulated.
    Missing(String),
}

impl EncapRouting {
    /// Does `prefix` belong to a pool of this tunnel?
    pub fn covers(&self, prefix: &IpNetwork) -> bool {
        self.pools
            .iter()
            .any(|(cidr, _)| cidr.contains(prefix.network()))
    }

    /// How `prefix` learned with next hop `nh` (the remote node's address) must be routed.
    pub fn encap(&self, prefix: &IpNetwork, nh: IpAddr) -> Encap {
        let Some((_, mode)) = self
            .pools
            .iter()
            .find(|(cidr, _)| cidr.contains(prefix.network()))
        else {
            return Encap::No;
        };
        if *mode == EncapMode::CrossSubnet {
            if let Some(net) = self.local_subnet {
                if net.is_ipv4() == nh.is_ipv4() && net.contains(nh) {
                    return Encap::No;
                }
            }
        }
        let dev = self.tunnel.device();
        if !self.ready {
            return Encap::Missing(match &self.not_ready {
                Some(why) => format!("{dev} is not ready: {why}"),
                None => format!("{dev} is not ready yet"),
            });
        }
        match self.tunnel {
            // The outer destination is the route's gateway: the remote node itself.
            Tunnel::Ipip if nh.is_ipv4() => Encap::Tunnel(NextHop::onlink(nh, dev)),
            Tunnel::Ipip => Encap::Missing(format!("{dev} carries IPv4 only; next hop {nh}")),
            Tunnel::VxlanV4 | Tunnel::VxlanV6 => match self.tunnels.get(&nh) {
                Some(t) => Encap::Tunnel(NextHop::onlink(*t, dev)),
                None => Encap::Missing(format!("node {nh} has no VXLAN tunnel address yet")),
            },
        }
    }
}

/// The pools with this tunnel on.
fn encap_pools(pools: &[IpPool], kind: Tunnel) -> Vec<(IpNetwork, EncapMode)> {
    pools
        .iter()
        .filter_map(|p| match kind.mode(p) {
            EncapMode::Never => None,
            m => Some((p.spec.cidr, m)),
        })
        .collect()
}

/// Every other node's VTEP, from the Node resources (tunnel address, node address, MAC override).
async fn remote_vteps(
    ds: &Datastore,
    me: &str,
    kind: Tunnel,
) -> anyhow::Result<(BTreeMap<String, RemoteVtep>, i64)> {
    let prefix = keys::resource_prefix(NODE_PLURAL);
    let (kvs, rev) = ds.list(&prefix).await?;
    let mut out = BTreeMap::new();
    let (_, field) = kind.tunnel_field();
    for kv in kvs {
        let Some(name) = kv.key.strip_prefix(&prefix) else {
            continue;
        };
        if name == me {
            continue;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&kv.value) else {
            continue;
        };
        let spec = &v["spec"];
        let addr = |v: &serde_json::Value| {
            v.as_str()
                .and_then(|s| s.split('/').next()?.parse::<IpAddr>().ok())
                .filter(|a| a.is_ipv6() == kind.v6())
        };
        let tunnel = addr(&spec[field]);
        let node_ip = addr(&spec["bgp"][kind.address_field()]);
        let mac = spec[kind.mac_field()]
            .as_str()
            .and_then(parse_mac)
            .unwrap_or_else(|| kind.mac(name));
        // A VTEP is usable only with both addresses (Felix withdraws it otherwise).
        if let (Some(tunnel_ip), Some(node_ip)) = (tunnel, node_ip) {
            out.insert(
                name.to_string(),
                RemoteVtep {
                    node_ip,
                    tunnel_ip,
                    mac,
                },
            );
        }
    }
    Ok((out, rev))
}

fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).ok())
        .collect::<Option<_>>()?;
    v.try_into().ok()
}

/// Write (or clear) the tunnel address field of this node's Node resource, keeping everything else; for
/// IPv6 VXLAN also `spec.bgp.ipv6Address` (the other nodes' FDB destination) when it is missing.
async fn set_node_tunnel(
    ds: &Datastore,
    me: &str,
    kind: Tunnel,
    addr: Option<IpAddr>,
    node_cidr: &str,
) -> anyhow::Result<()> {
    let (in_bgp, field) = kind.tunnel_field();
    let want = addr.map(|a| serde_json::Value::String(a.to_string()));
    // An unchanged document is not written (update_with compares the bytes).
    resources::patch_node(ds, me, false, |spec| {
        if kind.v6() && addr.is_some() {
            resources::bgp_of(spec)
                .entry("ipv6Address")
                .or_insert_with(|| node_cidr.into());
        }
        let holder = if in_bgp {
            if want.is_none() && !spec.get("bgp").is_some_and(|b| b.is_object()) {
                return; // nothing to clear
            }
            resources::bgp_of(spec)
        } else {
            spec
        };
        match &want {
            Some(w) => holder.insert(field.into(), w.clone()),
            None => holder.remove(field),
        };
    })
    .await
    .with_context(|| format!("writing the {} tunnel address of Node {me:?}", kind.label()))?;
    Ok(())
}

/// This node's tunnel address: the one its handle holds, else a new one from a pool of this tunnel that
/// selects the node (normally the first free address of its own block, as with Calico).
async fn tunnel_address(
    ipam: &NodeIpam,
    me: &str,
    pools: &[IpPool],
    kind: Tunnel,
) -> anyhow::Result<Option<IpAddr>> {
    let usable = ipam
        .usable_pools(if kind.v6() { Family::V6 } else { Family::V4 })
        .await?;
    let eligible: Vec<String> = pools
        .iter()
        .filter(|p| kind.mode(p) != EncapMode::Never)
        .filter(|p| p.allows(crate::config::ippool::AllowedUse::Tunnel))
        .map(|p| p.name().to_string())
        .filter(|n| usable.contains(n))
        .collect();
    let handle = kind.handle(me);
    if eligible.is_empty() {
        ipam.release_handle(&handle).await?;
        return Ok(None);
    }
    let a = ipam
        .assign(AssignRequest {
            handle_id: handle,
            ipv4: !kind.v6(),
            ipv6: kind.v6(),
            pools: Some(eligible),
            attributes: [("type".to_string(), kind.attr_type().to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await?;
    Ok(a.ips
        .iter()
        .map(|i| i.ip)
        .find(|ip| ip.is_ipv6() == kind.v6()))
}

/// Build (or rebuild) the device with `tunnel` as its address and the remote entries of `remotes` (VXLAN).
/// Blocking netlink: call from `spawn_blocking`.
fn build_device(
    netns: Option<&std::path::Path>,
    kind: Tunnel,
    local: LocalVtep,
    remotes: &BTreeSet<RemoteVtep>,
) -> Result<(), crate::dataplane::DataplaneError> {
    match (kind, local.tunnel_ip) {
        (Tunnel::Ipip, IpAddr::V4(t)) => ipip::ensure_device(netns, t, local.mtu).map(|_| ()),
        (Tunnel::Ipip, IpAddr::V6(t)) => Err(crate::dataplane::DataplaneError::Invalid {
            what: "IPIP tunnel address",
            value: t.to_string(),
            reason: "IPIP is IPv4 only".into(),
        }),
        _ => {
            let index = vxlan::ensure_device(netns, &local)?;
            vxlan::sync_remotes(netns, index, remotes, &BTreeSet::new())
        }
    }
}

/// No pool uses the tunnel any more: VXLAN devices are deleted, `tunl0` loses its address and goes down.
fn remove_device(
    netns: Option<&std::path::Path>,
    kind: Tunnel,
) -> Result<(), crate::dataplane::DataplaneError> {
    match kind {
        Tunnel::Ipip => ipip::release_device(netns),
        _ => vxlan::remove_device(netns, kind.v6()),
    }
}

/// Keep one tunnel (device, tunnel address, VXLAN remote entries) in step with the pools and the Node
/// resources; publish what route computation needs. A failure (no ipip module, etcd down) is published as
/// "not ready, because ..." with the pools, so their routes are withheld rather than sent unencapsulated,
/// shown in the status, logged once, and retried every 2 s.
#[allow(clippy::too_many_arguments)]
pub async fn follow_tunnel(
    ds: Arc<Datastore>,
    ipam: Arc<NodeIpam>,
    mut pools: watch::Receiver<Vec<IpPool>>,
    me: String,
    node_ip: IpAddr,
    prefix_len: u8,
    netns: Option<PathBuf>,
    out: watch::Sender<EncapRouting>,
    status: super::cluster::DataplaneStatus,
    kind: Tunnel,
) {
    let local_subnet = IpNetwork::new(node_ip, prefix_len)
        .ok()
        .and_then(|n| IpNetwork::new(n.network(), prefix_len).ok());
    let node_cidr = format!("{node_ip}/{prefix_len}");
    let mut remotes: BTreeMap<String, RemoteVtep> = BTreeMap::new();
    let mut node_watch = None;
    let mut built = false;
    // Felix sizes the tunnel device from the host MTU (its default interface pattern).
    let mtu_pattern = match regex::Regex::new(mtu::DEFAULT_IFACE_PATTERN) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "MTU interface pattern; {} disabled", kind.device());
            return;
        }
    };
    // The datastore is consulted only when the pools changed (or after a failure), never on the tick.
    let mut pools_dirty = true;
    let mut tunnel: Option<IpAddr> = None;
    let mut last_error: Option<String> = None;
    loop {
        let current = pools.borrow_and_update().clone();
        let wanted = encap_pools(&current, kind);
        let res: anyhow::Result<EncapRouting> = async {
            if wanted.is_empty() {
                if built {
                    let ns = netns.clone();
                    tokio::task::spawn_blocking(move || remove_device(ns.as_deref(), kind))
                        .await??;
                    tracing::info!("no pool uses {}: {} released", kind.label(), kind.device());
                    built = false;
                }
                if pools_dirty {
                    let _ = tunnel_address(&ipam, &me, &current, kind).await?;
                    set_node_tunnel(&ds, &me, kind, None, &node_cidr).await?;
                    pools_dirty = false;
                }
                tunnel = None;
                node_watch = None;
                remotes.clear();
                return Ok(EncapRouting {
                    tunnel: kind,
                    ..Default::default()
                });
            }
            if pools_dirty || tunnel.is_none() {
                let t = tunnel_address(&ipam, &me, &current, kind)
                    .await?
                    .ok_or_else(|| {
                        anyhow::anyhow!(
                            "no {} pool selects this node: no tunnel address",
                            kind.label()
                        )
                    })?;
                set_node_tunnel(&ds, &me, kind, Some(t), &node_cidr).await?;
                tunnel = Some(t);
                pools_dirty = false;
            }
            let Some(tunnel) = tunnel else {
                anyhow::bail!("no tunnel address");
            };
            if kind.is_vxlan() && node_watch.is_none() {
                let (r, rev) = remote_vteps(&ds, &me, kind).await?;
                node_watch = Some(ds.watch(&keys::resource_prefix(NODE_PLURAL), rev + 1));
                remotes = r;
            }
            let host = {
                let (ns, re) = (netns.clone(), mtu_pattern.clone());
                tokio::task::spawn_blocking(move || mtu::host_mtu(ns.as_deref(), &re)).await??
            };
            let local = LocalVtep {
                node_ip,
                tunnel_ip: tunnel,
                mac: kind.mac(&me),
                mtu: host.mtu.saturating_sub(kind.overhead()),
            };
            let (ns, want) = (
                netns.clone(),
                remotes.values().cloned().collect::<BTreeSet<_>>(),
            );
            tokio::task::spawn_blocking(move || build_device(ns.as_deref(), kind, local, &want))
                .await??;
            if !built {
                tracing::info!(tunnel = %tunnel, remotes = remotes.len(),
                    "{}: {} up", kind.label(), kind.device());
                built = true;
            }
            Ok(EncapRouting {
                tunnel: kind,
                pools: wanted.clone(),
                local_subnet,
                tunnels: remotes.values().map(|r| (r.node_ip, r.tunnel_ip)).collect(),
                hosts: remotes
                    .iter()
                    .map(|(n, r)| (n.clone(), r.node_ip))
                    .collect(),
                ready: true,
                not_ready: None,
            })
        }
        .await;
        let line = match &res {
            Ok(r) if r.pools.is_empty() => None,
            Ok(r) if kind.is_vxlan() => Some(format!(
                "{} up, tunnel address {}, MAC {}, {} remote VTEPs",
                kind.device(),
                tunnel.map(|t| t.to_string()).unwrap_or_default(),
                vxlan::mac_string(&kind.mac(&me)),
                r.tunnels.len()
            )),
            Ok(_) => Some(format!(
                "{} up, tunnel address {}",
                kind.device(),
                tunnel.map(|t| t.to_string()).unwrap_or_default(),
            )),
            Err(e) => Some(format!(
                "{} not ready (routes of its pools are withheld): {e:#}",
                kind.device()
            )),
        };
        status.send_if_modified(|s| {
            let slot = kind.status_slot(s);
            if *slot == line {
                return false;
            }
            *slot = line;
            true
        });
        let failed = match res {
            Ok(r) => {
                last_error = None;
                out.send_if_modified(|o| {
                    if *o == r {
                        return false;
                    }
                    *o = r;
                    true
                });
                false
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, device = kind.device(), "{} not ready: routes of its pools are withheld; retrying every 2s", kind.label());
                    last_error = Some(msg.clone());
                }
                // The pools stay in the picture, not ready: their routes are withheld (and reported),
                // never installed unencapsulated.
                out.send_if_modified(|o| {
                    let before = o.clone();
                    o.tunnel = kind;
                    o.pools = wanted.clone();
                    o.local_subnet = local_subnet;
                    o.ready = false;
                    o.not_ready = Some(msg);
                    *o != before
                });
                // What failed is retried; the datastore only if the pools step itself failed (then
                // `pools_dirty` is still set): a kernel that cannot build the device costs no etcd reads.
                true
            }
        };
        // Wait for a pool change, a Node change (remote VTEPs), or the reconcile tick.
        let node_event = async {
            match node_watch.as_mut() {
                Some(w) => w.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = pools.changed() => {
                if r.is_err() {
                    return;
                }
                pools_dirty = true;
            }
            m = node_event => match m {
                Some(WatchMessage::Events(_)) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    if let Ok((r, _)) = remote_vteps(&ds, &me, kind).await {
                        let now: BTreeSet<&RemoteVtep> = r.values().collect();
                        let gone: BTreeSet<RemoteVtep> = remotes
                            .values()
                            .filter(|v| !now.contains(v))
                            .cloned()
                            .collect();
                        if !gone.is_empty() {
                            let ns = netns.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                match vxlan::device_index(ns.as_deref(), kind.v6())? {
                                    Some(i) => vxlan::sync_remotes(ns.as_deref(), i, &BTreeSet::new(), &gone),
                                    None => Ok(()),
                                }
                            })
                            .await;
                        }
                        remotes = r;
                    }
                }
                Some(WatchMessage::Resync) | None => node_watch = None,
            },
            _ = tokio::time::sleep(if failed { Duration::from_secs(2) } else { RECONCILE }) => {}
        }
    }
}

/// `CALICO_NETWORKING_BACKEND=vxlan`: no BGP. Every other node's block of a VXLAN pool is routed towards that
/// node, and every address borrowed by another node towards that node (/32), as Felix derives routes from
/// the IPAM blocks; fed into the same route path as BGP
/// would (`FibEvent`s into [`super::nexthop::learned_routes`], which sends them through the tunnel).
///
/// The prefixes it routes are published in `owned` (this family's share of the set) before they are sent,
/// so the restart sweep never takes one for an orphan; `first_round` is told once the first set is out.
pub async fn route_by_affinities(
    me: String,
    mut affinities: watch::Receiver<BTreeMap<IpNetwork, String>>,
    mut vxlan: watch::Receiver<EncapRouting>,
    out: tokio::sync::mpsc::Sender<Vec<crate::bgp::rib::FibEvent>>,
    owned: watch::Sender<BTreeSet<IpNetwork>>,
    first_round: tokio::sync::oneshot::Sender<()>,
) {
    use crate::bgp::rib::FibEvent;
    let mut current: BTreeMap<IpNetwork, IpAddr> = BTreeMap::new();
    let mut first_round = Some(first_round);
    loop {
        let want: BTreeMap<IpNetwork, IpAddr> = {
            let a = affinities.borrow_and_update();
            let v = vxlan.borrow_and_update();
            a.iter()
                .filter(|(_, host)| **host != me)
                .filter(|(b, _)| v.covers(b))
                .filter_map(|(b, host)| Some((*b, *v.hosts.get(host)?)))
                .collect()
        };
        // `current` is this task's share of the set (the other family's task owns the rest).
        owned.send_if_modified(|set| {
            let before = set.len();
            set.retain(|p| !current.contains_key(p) || want.contains_key(p));
            let removed = set.len() != before;
            let mut added = false;
            for p in want.keys() {
                added |= set.insert(*p);
            }
            removed || added
        });
        let mut events = Vec::new();
        for p in current.keys().filter(|p| !want.contains_key(p)) {
            events.push(FibEvent::Remove { prefix: *p });
        }
        for (p, nh) in &want {
            if current.get(p) != Some(nh) {
                events.push(FibEvent::Set {
                    prefix: *p,
                    next_hops: vec![*nh],
                });
            }
        }
        if !events.is_empty() {
            tracing::info!(
                routes = want.len(),
                changes = events.len(),
                "VXLAN-only: routes from block affinities"
            );
            if out.send(events).await.is_err() {
                return;
            }
        }
        current = want;
        if let Some(tx) = first_round.take() {
            // Nobody waiting any more: the daemon is stopping.
            let _ = tx.send(());
        }
        tokio::select! {
            r = affinities.changed() => if r.is_err() { return },
            r = vxlan.changed() => if r.is_err() { return },
        }
    }
}

/// Both VXLAN families' route computation without BGP, joined (one task). IPIP needs BGP (as in Calico's
/// BIRD backend): it is not part of the VXLAN-only mode.
/// `applied` turns true once every family has published and sent its first set of routes: the restart
/// sweep waits for it, so it never removes an adopted route the affinity path is about to own.
pub async fn route_by_affinities_all(
    me: String,
    affinities: watch::Receiver<BTreeMap<IpNetwork, String>>,
    routing: Vec<watch::Receiver<EncapRouting>>,
    out: tokio::sync::mpsc::Sender<Vec<crate::bgp::rib::FibEvent>>,
    owned: watch::Sender<BTreeSet<IpNetwork>>,
    applied: watch::Sender<bool>,
) {
    let mut firsts = Vec::new();
    let tasks: Vec<_> = routing
        .into_iter()
        .filter(|r| r.borrow().tunnel.is_vxlan())
        .map(|v| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            firsts.push(rx);
            route_by_affinities(
                me.clone(),
                affinities.clone(),
                v,
                out.clone(),
                owned.clone(),
                tx,
            )
        })
        .collect();
    let ready = async move {
        for rx in firsts {
            // A task that ended before its first round has nothing to own.
            let _ = rx.await;
        }
        applied.send_replace(true);
        std::future::pending::<()>().await
    };
    // `ready` first: with no VXLAN family at all it still says "applied" before the (empty) join ends.
    tokio::select! {
        biased;
        _ = ready => {}
        _ = futures::future::join_all(tasks) => {}
    }
}

/// Start one follower per tunnel the node can have: VXLAN for each family it has an address of (IPv6 only
/// with `--ip6`) and IPIP (IPv4); the routing pictures for [`super::nexthop::learned_routes`] and
/// [`route_by_affinities_all`].
pub fn spawn(
    ds: Arc<Datastore>,
    ipam: Arc<NodeIpam>,
    me: &str,
    v4: (std::net::Ipv4Addr, u8),
    v6: Option<std::net::Ipv6Addr>,
    netns: Option<PathBuf>,
    status: super::cluster::DataplaneStatus,
) -> (
    Vec<crate::task::Task<()>>,
    Vec<watch::Receiver<EncapRouting>>,
) {
    let mut tasks = Vec::new();
    let mut routing = Vec::new();
    let v4 = (IpAddr::V4(v4.0), v4.1);
    let v6 = v6.map(|a| {
        (
            IpAddr::V6(a),
            crate::dataplane::autodetect::prefix_len_on_interfaces(netns.as_deref(), a.into()),
        )
    });
    for (addr, kind) in [
        Some((v4, Tunnel::VxlanV4)),
        v6.map(|a| (a, Tunnel::VxlanV6)),
        Some((v4, Tunnel::Ipip)),
    ]
    .into_iter()
    .flatten()
    {
        let (tx, rx) = watch::channel(EncapRouting {
            tunnel: kind,
            ..Default::default()
        });
        routing.push(rx);
        tasks.push(crate::task::spawn(
            match kind {
                Tunnel::VxlanV4 => "vxlan",
                Tunnel::VxlanV6 => "vxlan-v6",
                Tunnel::Ipip => "ipip",
            },
            follow_tunnel(
                ds.clone(),
                ipam.clone(),
                ipam.subscribe_pools(),
                me.to_string(),
                addr.0,
                addr.1,
                netns.clone(),
                tx,
                status.clone(),
                kind,
            ),
        ));
    }
    (tasks, routing)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().expect("test prefix")
    }
    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    fn picture(tunnel: Tunnel, mode: EncapMode) -> EncapRouting {
        EncapRouting {
            tunnel,
            pools: vec![(net("10.244.0.0/16"), mode)],
            local_subnet: Some(net("10.99.0.0/24")),
            tunnels: [(ip("10.99.1.12"), ip("10.244.9.0"))].into_iter().collect(),
            hosts: BTreeMap::new(),
            ready: true,
            not_ready: None,
        }
    }

    #[test]
    fn ipip_always_goes_through_tunl0_via_the_remote_node() {
        let p = picture(Tunnel::Ipip, EncapMode::Always);
        let block = net("10.244.9.0/26");
        // Same subnet or not: Always encapsulates, the gateway is the remote node's own address.
        for nh in ["10.99.0.13", "10.99.1.12"] {
            assert_eq!(
                p.encap(&block, ip(nh)),
                Encap::Tunnel(NextHop::onlink(ip(nh), "tunl0"))
            );
        }
        // Outside the pool: not this tunnel's business.
        assert_eq!(p.encap(&net("10.50.0.0/26"), ip("10.99.1.12")), Encap::No);
    }

    #[test]
    fn crosssubnet_encapsulates_only_outside_the_local_subnet() {
        for kind in [Tunnel::Ipip, Tunnel::VxlanV4] {
            let p = picture(kind, EncapMode::CrossSubnet);
            let block = net("10.244.9.0/26");
            assert_eq!(p.encap(&block, ip("10.99.0.13")), Encap::No, "{kind:?}");
            let want = match kind {
                Tunnel::Ipip => NextHop::onlink(ip("10.99.1.12"), "tunl0"),
                _ => NextHop::onlink(ip("10.244.9.0"), "vxlan.calico"),
            };
            assert_eq!(p.encap(&block, ip("10.99.1.12")), Encap::Tunnel(want));
        }
    }

    #[test]
    fn a_tunnel_that_is_not_ready_withholds_the_route_with_the_reason() {
        let mut p = picture(Tunnel::Ipip, EncapMode::Always);
        p.ready = false;
        p.not_ready = Some("this kernel has no ipip module".into());
        match p.encap(&net("10.244.9.0/26"), ip("10.99.1.12")) {
            Encap::Missing(why) => {
                assert!(
                    why.contains("tunl0") && why.contains("no ipip module"),
                    "{why}"
                )
            }
            other => panic!("routed unencapsulated or through a dead tunnel: {other:?}"),
        }
        // CrossSubnet towards the local subnet needs no tunnel: still routed.
        p.pools[0].1 = EncapMode::CrossSubnet;
        assert_eq!(p.encap(&net("10.244.9.0/26"), ip("10.99.0.13")), Encap::No);
    }

    #[test]
    fn tunnel_kinds_use_calicos_names() {
        let mut p = IpPool::new("p", net("10.244.0.0/16"));
        p.spec.ipip_mode = Some(EncapMode::CrossSubnet);
        assert_eq!(Tunnel::Ipip.mode(&p), EncapMode::CrossSubnet);
        assert_eq!(Tunnel::VxlanV4.mode(&p), EncapMode::Never);
        assert_eq!(Tunnel::Ipip.handle("n1"), "ipip-tunnel-addr-n1");
        assert_eq!(Tunnel::Ipip.attr_type(), "ipipTunnelAddress");
        assert_eq!(Tunnel::Ipip.tunnel_field(), (true, "ipv4IPIPTunnelAddr"));
        assert_eq!(Tunnel::Ipip.overhead(), 20);
        assert_eq!(Tunnel::VxlanV6.handle("n1"), "vxlan-v6-tunnel-addr-n1");
        let mut v6 = IpPool::new("v6", net("fd00:244::/48"));
        v6.spec.vxlan_mode = Some(EncapMode::Always);
        assert_eq!(Tunnel::VxlanV6.mode(&v6), EncapMode::Always);
        assert_eq!(Tunnel::VxlanV4.mode(&v6), EncapMode::Never);
    }
}
