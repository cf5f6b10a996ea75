//! VXLAN for pools with `vxlanMode: Always | CrossSubnet`, as Calico builds it (see
//! [`crate::dataplane::vxlan`]), one instance per family: the node's VTEP (`vxlan.calico` /
//! `vxlan-v6.calico`), its tunnel address from IPAM (handle `vxlan-tunnel-addr-<node>` /
//! `vxlan-v6-tunnel-addr-<node>`, attribute `type: vxlanTunnelAddress` / `vxlanV6TunnelAddress`) written to its
//! Node resource (`spec.ipv4VXLANTunnelAddr` / `spec.ipv6VXLANTunnelAddr`, so calicoctl and Calico nodes see
//! it), and the neighbour/FDB entries of every other node that has a VTEP of that family. Pod routes still come over BGP; [`super::nexthop`] sends those of VXLAN pools
//! through the tunnel (`<block> via <tunnel address> dev vxlan.calico onlink`) using the [`VxlanRouting`]
//! published here; CrossSubnet only towards nodes outside the local subnet.
//!
//! ```text
//!   NodeIpam pools ─┐
//!   etcd nodes/ ────┼─▶ follow_vxlan ──▶ tunnel address (IPAM) + Node.spec.ipv4VXLANTunnelAddr
//!   (watch)         │                └─▶ vxlan.calico, neighbour + FDB per remote VTEP (netlink)
//!                   └──────────────────▶ watch<VxlanRouting> ──▶ nexthop::learned_routes
//! ```
//!
//! With `CALICO_NETWORKING_BACKEND=vxlan` there is no BGP: [`route_by_affinities`] routes every other node's
//! block (and every address another node borrowed) from the IPAM blocks, as Felix does.

use anyhow::Context;
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::sync::watch;

use crate::config::ippool::{EncapMode, IpPool};
use crate::dataplane::vxlan::{self, LocalVtep, RemoteVtep};
use crate::datastore::{keys, Datastore, WatchMessage};
use crate::ipam::{AssignRequest, Family, NodeIpam};

use crate::config::bgp::NODE_PLURAL;
use crate::datastore::resources;

/// Felix re-checks its VXLAN device this often; so do we (kernel only, no datastore read).
const RECONCILE: Duration = Duration::from_secs(10);

/// Which VXLAN: IPv4 (`vxlan.calico`) or IPv6 (`vxlan-v6.calico`), with Calico's names for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VxlanFamily {
    pub v6: bool,
}

impl VxlanFamily {
    pub const V4: VxlanFamily = VxlanFamily { v6: false };
    pub const V6: VxlanFamily = VxlanFamily { v6: true };
    fn device(self) -> &'static str {
        vxlan::device(self.v6)
    }
    fn handle(self, me: &str) -> String {
        if self.v6 {
            format!("vxlan-v6-tunnel-addr-{me}")
        } else {
            format!("vxlan-tunnel-addr-{me}")
        }
    }
    fn attr_type(self) -> &'static str {
        if self.v6 {
            "vxlanV6TunnelAddress"
        } else {
            "vxlanTunnelAddress"
        }
    }
    fn tunnel_field(self) -> &'static str {
        if self.v6 {
            "ipv6VXLANTunnelAddr"
        } else {
            "ipv4VXLANTunnelAddr"
        }
    }
    fn address_field(self) -> &'static str {
        if self.v6 {
            "ipv6Address"
        } else {
            "ipv4Address"
        }
    }
    fn mac_field(self) -> &'static str {
        if self.v6 {
            "vxlanTunnelMACAddrV6"
        } else {
            "vxlanTunnelMACAddr"
        }
    }
    fn mac(self, node: &str) -> [u8; 6] {
        if self.v6 {
            vxlan::vtep_mac_v6(node)
        } else {
            vxlan::vtep_mac(node)
        }
    }
    fn overhead(self) -> u32 {
        if self.v6 {
            crate::dataplane::mtu::VXLAN_V6_OVERHEAD
        } else {
            crate::dataplane::mtu::VXLAN_V4_OVERHEAD
        }
    }
    fn of(self, net: &IpNetwork) -> bool {
        net.is_ipv6() == self.v6
    }
}

/// What route computation needs to know about VXLAN (of one family).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanRouting {
    /// Pools of the family with VXLAN on, and their mode (empty: VXLAN off).
    pub pools: Vec<(IpNetwork, EncapMode)>,
    /// The local node address's subnet (CrossSubnet: same subnet goes unencapsulated).
    pub local_subnet: Option<IpNetwork>,
    /// Remote node address -> its tunnel address, for every node with a VTEP.
    pub tunnels: BTreeMap<IpAddr, IpAddr>,
    /// Remote node name -> its node address, for every node with a VTEP (routing by block affinity).
    pub hosts: BTreeMap<String, IpAddr>,
    /// The local VTEP is up (routes through it can be installed).
    pub ready: bool,
}

/// Where a learned route of a VXLAN pool goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encap {
    /// Not a VXLAN pool, or CrossSubnet towards the local subnet: route as usual.
    No,
    /// Through the tunnel to this tunnel address.
    Tunnel(IpAddr),
    /// Should be encapsulated but cannot be yet (why).
    Missing(String),
}

impl VxlanRouting {
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
        if !self.ready {
            return Encap::Missing("the local VXLAN device is not ready".into());
        }
        match self.tunnels.get(&nh) {
            Some(t) => Encap::Tunnel(*t),
            None => Encap::Missing(format!("node {nh} has no VXLAN tunnel address yet")),
        }
    }
}

/// The pools of the family with VXLAN on.
fn vxlan_pools(pools: &[IpPool], fam: VxlanFamily) -> Vec<(IpNetwork, EncapMode)> {
    pools
        .iter()
        .filter(|p| fam.of(&p.spec.cidr))
        .filter_map(|p| match p.spec.vxlan_mode.unwrap_or_default() {
            EncapMode::Never => None,
            m => Some((p.spec.cidr, m)),
        })
        .collect()
}

/// Every other node's VTEP, from the Node resources (tunnel address, node address, MAC override).
async fn remote_vteps(
    ds: &Datastore,
    me: &str,
    fam: VxlanFamily,
) -> anyhow::Result<(BTreeMap<String, RemoteVtep>, i64)> {
    let prefix = keys::resource_prefix(NODE_PLURAL);
    let (kvs, rev) = ds.list(&prefix).await?;
    let mut out = BTreeMap::new();
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
                .filter(|a| a.is_ipv6() == fam.v6)
        };
        let tunnel = addr(&spec[fam.tunnel_field()]);
        let node_ip = addr(&spec["bgp"][fam.address_field()]);
        let mac = spec[fam.mac_field()]
            .as_str()
            .and_then(parse_mac)
            .unwrap_or_else(|| fam.mac(name));
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
/// IPv6 also `spec.bgp.ipv6Address` (the other nodes' FDB destination) when it is missing.
async fn set_node_tunnel(
    ds: &Datastore,
    me: &str,
    fam: VxlanFamily,
    addr: Option<IpAddr>,
    node_cidr: &str,
) -> anyhow::Result<()> {
    let want = addr.map(|a| serde_json::Value::String(a.to_string()));
    let field = fam.tunnel_field();
    // An unchanged document is not written (update_with compares the bytes).
    resources::patch_node(ds, me, false, |spec| {
        if fam.v6 && addr.is_some() {
            resources::bgp_of(spec)
                .entry("ipv6Address")
                .or_insert_with(|| node_cidr.into());
        }
        match &want {
            Some(w) => spec.insert(field.into(), w.clone()),
            None => spec.remove(field),
        };
    })
    .await
    .with_context(|| format!("writing the VXLAN tunnel address of Node {me:?}"))?;
    Ok(())
}

/// This node's tunnel address: the one its handle holds, else a new one from a VXLAN pool that selects
/// the node (normally the first free address of its own block, as with Calico).
async fn tunnel_address(
    ipam: &NodeIpam,
    me: &str,
    pools: &[IpPool],
    fam: VxlanFamily,
) -> anyhow::Result<Option<IpAddr>> {
    let usable = ipam
        .usable_pools(if fam.v6 { Family::V6 } else { Family::V4 })
        .await?;
    let eligible: Vec<String> = pools
        .iter()
        .filter(|p| {
            fam.of(&p.spec.cidr) && p.spec.vxlan_mode.unwrap_or_default() != EncapMode::Never
        })
        .filter(|p| p.allows(crate::config::ippool::AllowedUse::Tunnel))
        .map(|p| p.name().to_string())
        .filter(|n| usable.contains(n))
        .collect();
    let handle = fam.handle(me);
    if eligible.is_empty() {
        ipam.release_handle(&handle).await?;
        return Ok(None);
    }
    let a = ipam
        .assign(AssignRequest {
            handle_id: handle,
            ipv4: !fam.v6,
            ipv6: fam.v6,
            pools: Some(eligible),
            attributes: [("type".to_string(), fam.attr_type().to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await?;
    Ok(a.ips.iter().map(|i| i.ip).find(|ip| ip.is_ipv6() == fam.v6))
}

/// Keep the VTEP, the tunnel address and the remote entries in step with the pools and the Node
/// resources; publish what route computation needs.
#[allow(clippy::too_many_arguments)]
pub async fn follow_vxlan(
    ds: Arc<Datastore>,
    ipam: Arc<NodeIpam>,
    mut pools: watch::Receiver<Vec<IpPool>>,
    me: String,
    node_ip: IpAddr,
    prefix_len: u8,
    netns: Option<PathBuf>,
    out: watch::Sender<VxlanRouting>,
    status: super::cluster::DataplaneStatus,
    fam: VxlanFamily,
) {
    let local_subnet = IpNetwork::new(node_ip, prefix_len)
        .ok()
        .and_then(|n| IpNetwork::new(n.network(), prefix_len).ok());
    let node_cidr = format!("{node_ip}/{prefix_len}");
    let mut remotes: BTreeMap<String, RemoteVtep> = BTreeMap::new();
    let mut node_watch = None;
    let mut built = false;
    // Felix sizes the VXLAN device from the host MTU (its default interface pattern).
    let mtu_pattern = match regex::Regex::new(crate::dataplane::mtu::DEFAULT_IFACE_PATTERN) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "MTU interface pattern; VXLAN disabled");
            return;
        }
    };
    // The datastore is consulted only when the pools changed (or after a failure), never on the tick.
    let mut pools_dirty = true;
    let mut tunnel: Option<IpAddr> = None;
    let mut last_error: Option<String> = None;
    loop {
        let current = pools.borrow_and_update().clone();
        let vx = vxlan_pools(&current, fam);
        let res: anyhow::Result<VxlanRouting> = async {
            if vx.is_empty() {
                if built {
                    let ns = netns.clone();
                    tokio::task::spawn_blocking(move || vxlan::remove_device(ns.as_deref(), fam.v6))
                        .await??;
                    tracing::info!("no pool uses VXLAN: {} removed", fam.device());
                    built = false;
                }
                if pools_dirty {
                    let _ = tunnel_address(&ipam, &me, &current, fam).await?;
                    set_node_tunnel(&ds, &me, fam, None, &node_cidr).await?;
                    pools_dirty = false;
                }
                tunnel = None;
                node_watch = None;
                remotes.clear();
                return Ok(VxlanRouting::default());
            }
            if pools_dirty || tunnel.is_none() {
                let t = tunnel_address(&ipam, &me, &current, fam)
                    .await?
                    .ok_or_else(|| {
                        anyhow::anyhow!("no VXLAN pool selects this node: no tunnel address")
                    })?;
                set_node_tunnel(&ds, &me, fam, Some(t), &node_cidr).await?;
                tunnel = Some(t);
                pools_dirty = false;
            }
            let Some(tunnel) = tunnel else {
                anyhow::bail!("no tunnel address");
            };
            if node_watch.is_none() {
                let (r, rev) = remote_vteps(&ds, &me, fam).await?;
                node_watch = Some(ds.watch(&keys::resource_prefix(NODE_PLURAL), rev + 1));
                remotes = r;
            }
            let host = {
                let (ns, re) = (netns.clone(), mtu_pattern.clone());
                tokio::task::spawn_blocking(move || crate::dataplane::mtu::host_mtu(ns.as_deref(), &re))
                    .await??
            };
            let local = LocalVtep {
                node_ip,
                tunnel_ip: tunnel,
                mac: fam.mac(&me),
                mtu: host.mtu.saturating_sub(fam.overhead()),
            };
            let (ns, want) = (
                netns.clone(),
                remotes.values().cloned().collect::<BTreeSet<_>>(),
            );
            tokio::task::spawn_blocking(move || {
                let index = vxlan::ensure_device(ns.as_deref(), &local)?;
                vxlan::sync_remotes(ns.as_deref(), index, &want, &BTreeSet::new())
            })
            .await??;
            if !built {
                tracing::info!(tunnel = %tunnel, mac = %vxlan::mac_string(&fam.mac(&me)), remotes = remotes.len(),
                    "VXLAN: {} up", fam.device());
                built = true;
            }
            Ok(VxlanRouting {
                pools: vx,
                local_subnet,
                tunnels: remotes
                    .values()
                    .map(|r| (r.node_ip, r.tunnel_ip))
                    .collect(),
                hosts: remotes
                    .iter()
                    .map(|(n, r)| (n.clone(), r.node_ip))
                    .collect(),
                ready: true,
            })
        }
        .await;
        let line = match &res {
            Ok(r) if r.pools.is_empty() => None,
            Ok(r) => Some(format!(
                "{} up, tunnel address {}, MAC {}, {} remote VTEPs",
                fam.device(),
                tunnel.map(|t| t.to_string()).unwrap_or_default(),
                vxlan::mac_string(&fam.mac(&me)),
                r.tunnels.len()
            )),
            Err(e) => Some(format!("not ready: {e:#}")),
        };
        status.send_if_modified(|s| {
            let slot = if fam.v6 {
                &mut s.vxlan_v6
            } else {
                &mut s.vxlan
            };
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
                    tracing::error!(error = %msg, device = fam.device(), "VXLAN not ready; retrying every 2s");
                    last_error = Some(msg);
                }
                out.send_modify(|o| o.ready = false);
                pools_dirty = true;
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
                    if let Ok((r, _)) = remote_vteps(&ds, &me, fam).await {
                        let now: BTreeSet<&RemoteVtep> = r.values().collect();
                        let gone: BTreeSet<RemoteVtep> = remotes
                            .values()
                            .filter(|v| !now.contains(v))
                            .cloned()
                            .collect();
                        if !gone.is_empty() {
                            let ns = netns.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                match vxlan::device_index(ns.as_deref(), fam.v6)? {
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
pub async fn route_by_affinities(
    me: String,
    mut affinities: watch::Receiver<BTreeMap<IpNetwork, String>>,
    mut vxlan: watch::Receiver<VxlanRouting>,
    out: tokio::sync::mpsc::Sender<Vec<crate::bgp::rib::FibEvent>>,
) {
    use crate::bgp::rib::FibEvent;
    let mut current: BTreeMap<IpNetwork, IpAddr> = BTreeMap::new();
    loop {
        let want: BTreeMap<IpNetwork, IpAddr> = {
            let a = affinities.borrow_and_update();
            let v = vxlan.borrow_and_update();
            a.iter()
                .filter(|(_, host)| **host != me)
                .filter(|(b, _)| v.pools.iter().any(|(p, _)| p.contains(b.network())))
                .filter_map(|(b, host)| Some((*b, *v.hosts.get(host)?)))
                .collect()
        };
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
        tokio::select! {
            r = affinities.changed() => if r.is_err() { return },
            r = vxlan.changed() => if r.is_err() { return },
        }
    }
}

/// Both families' route computation without BGP, joined (one task).
pub async fn route_by_affinities_all(
    me: String,
    affinities: watch::Receiver<BTreeMap<IpNetwork, String>>,
    routing: [Option<watch::Receiver<VxlanRouting>>; 2],
    out: tokio::sync::mpsc::Sender<Vec<crate::bgp::rib::FibEvent>>,
) {
    let [v4, v6] = routing;
    let a = async {
        if let Some(v) = v4 {
            route_by_affinities(me.clone(), affinities.clone(), v, out.clone()).await
        }
    };
    let b = async {
        if let Some(v) = v6 {
            route_by_affinities(me.clone(), affinities.clone(), v, out.clone()).await
        }
    };
    futures::join!(a, b);
}

/// Start one VXLAN follower per family the node has an address of (IPv6 only with `--ip6`); the routing
/// pictures for [`super::nexthop::learned_routes`] and [`route_by_affinities_all`].
#[allow(clippy::type_complexity)]
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
    [Option<watch::Receiver<VxlanRouting>>; 2],
) {
    let mut tasks = Vec::new();
    let mut routing = [None, None];
    let v6 = v6.map(|a| {
        (
            IpAddr::V6(a),
            crate::dataplane::autodetect::prefix_len_on_interfaces(netns.as_deref(), a.into()),
        )
    });
    for (i, (addr, fam)) in [
        Some(((IpAddr::V4(v4.0), v4.1), VxlanFamily::V4)),
        v6.map(|a| (a, VxlanFamily::V6)),
    ]
    .into_iter()
    .enumerate()
    .filter_map(|(i, x)| Some((i, x?)))
    {
        let (tx, rx) = watch::channel(VxlanRouting::default());
        routing[i] = Some(rx);
        tasks.push(crate::task::spawn(
            if fam.v6 { "vxlan-v6" } else { "vxlan" },
            follow_vxlan(
                ds.clone(),
                ipam.clone(),
                ipam.subscribe_pools(),
                me.to_string(),
                addr.0,
                addr.1,
                netns.clone(),
                tx,
                status.clone(),
                fam,
            ),
        ));
    }
    (tasks, routing)
}
