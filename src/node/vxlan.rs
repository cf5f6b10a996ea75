//! VXLAN for IPv4 pools with `vxlanMode: Always | CrossSubnet`, as Calico builds it (see
//! [`crate::dataplane::vxlan`]): the node's VTEP, its tunnel address from IPAM (handle
//! `vxlan-tunnel-addr-<node>`, attribute `type: vxlanTunnelAddress`) written to its Node resource
//! (`spec.ipv4VXLANTunnelAddr`, so calicoctl and Calico nodes see it), and the neighbour/FDB entries of every
//! other node that has a VTEP. Pod routes still come over BGP; [`super::nexthop`] sends those of VXLAN pools
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
//! Not built yet: IPv6 VXLAN, and the VXLAN-only mode without BGP (routes from block affinities).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::{IpNetwork, Ipv4Network};
use tokio::sync::watch;

use crate::config::ippool::{EncapMode, IpPool};
use crate::dataplane::vxlan::{self, LocalVtep, RemoteVtep};
use crate::datastore::{keys, Datastore, WatchMessage};
use crate::ipam::{AssignRequest, Family, NodeIpam};

use super::NODES_PLURAL;

/// Felix re-checks its VXLAN device this often; so do we (kernel only, no datastore read).
const RECONCILE: Duration = Duration::from_secs(10);

/// What route computation needs to know about VXLAN.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VxlanRouting {
    /// IPv4 pools with VXLAN on, and their mode (empty: VXLAN off).
    pub pools: Vec<(IpNetwork, EncapMode)>,
    /// The local node address's subnet (CrossSubnet: same subnet goes unencapsulated).
    pub local_subnet: Option<Ipv4Network>,
    /// Remote node address -> its tunnel address, for every node with a VTEP.
    pub tunnels: BTreeMap<IpAddr, Ipv4Addr>,
    /// The local VTEP is up (routes through it can be installed).
    pub ready: bool,
}

/// Where a learned route of a VXLAN pool goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Encap {
    /// Not a VXLAN pool, or CrossSubnet towards the local subnet: route as usual.
    No,
    /// Through the tunnel to this tunnel address.
    Tunnel(Ipv4Addr),
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
            if let (Some(net), IpAddr::V4(v4)) = (self.local_subnet, nh) {
                if net.contains(v4) {
                    return Encap::No;
                }
            }
        }
        if !self.ready {
            return Encap::Missing("the local VXLAN device is not ready".into());
        }
        match self.tunnels.get(&nh) {
            Some(t) => Encap::Tunnel(*t),
            None => Encap::Missing(format!(
                "node {nh} has no VXLAN tunnel address (spec.ipv4VXLANTunnelAddr) yet"
            )),
        }
    }
}

/// The IPv4 pools with VXLAN on.
fn vxlan_pools(pools: &[IpPool]) -> Vec<(IpNetwork, EncapMode)> {
    pools
        .iter()
        .filter(|p| p.spec.cidr.is_ipv4())
        .filter_map(|p| match p.spec.vxlan_mode.unwrap_or_default() {
            EncapMode::Never => None,
            m => Some((p.spec.cidr, m)),
        })
        .collect()
}

/// Every other node's VTEP, from the Node resources (tunnel address, node address, MAC override).
async fn remote_vteps(ds: &Datastore, me: &str) -> anyhow::Result<(BTreeSet<RemoteVtep>, i64)> {
    let prefix = keys::resource_prefix(NODES_PLURAL);
    let (kvs, rev) = ds.list(&prefix).await?;
    let mut out = BTreeSet::new();
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
        let tunnel = spec["ipv4VXLANTunnelAddr"]
            .as_str()
            .and_then(|s| s.split('/').next()?.parse::<Ipv4Addr>().ok());
        let node_ip = spec["bgp"]["ipv4Address"]
            .as_str()
            .and_then(|s| s.split('/').next()?.parse::<Ipv4Addr>().ok());
        let mac = spec["vxlanTunnelMACAddr"]
            .as_str()
            .and_then(parse_mac)
            .unwrap_or_else(|| vxlan::vtep_mac(name));
        // A VTEP is usable only with both addresses (Felix withdraws it otherwise).
        if let (Some(tunnel_ip), Some(node_ip)) = (tunnel, node_ip) {
            out.insert(RemoteVtep {
                node_ip,
                tunnel_ip,
                mac,
            });
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

/// Write (or clear) `spec.ipv4VXLANTunnelAddr` of this node's Node resource, keeping everything else.
async fn set_node_tunnel(ds: &Datastore, me: &str, addr: Option<Ipv4Addr>) -> anyhow::Result<()> {
    let key = keys::resource_key(NODES_PLURAL, me);
    for _ in 0..10 {
        let Some(kv) = ds.get(&key).await? else {
            anyhow::bail!("Node {me:?} is not registered");
        };
        let mut v: serde_json::Value = serde_json::from_slice(&kv.value)?;
        let spec = v
            .get_mut("spec")
            .and_then(|s| s.as_object_mut())
            .ok_or_else(|| anyhow::anyhow!("Node {me:?} has no spec"))?;
        let want = addr.map(|a| serde_json::Value::String(a.to_string()));
        if spec.get("ipv4VXLANTunnelAddr") == want.as_ref() {
            return Ok(());
        }
        match want {
            Some(w) => spec.insert("ipv4VXLANTunnelAddr".into(), w),
            None => spec.remove("ipv4VXLANTunnelAddr"),
        };
        if ds
            .update(&key, serde_json::to_vec(&v)?, kv.mod_revision)
            .await?
            .is_some()
        {
            return Ok(());
        }
    }
    anyhow::bail!("Node {me:?} kept changing while writing its VXLAN tunnel address")
}

/// This node's tunnel address: the one its handle holds, else a new one from a VXLAN pool that selects
/// the node (normally the first free address of its own block, as with Calico).
async fn tunnel_address(
    ipam: &NodeIpam,
    me: &str,
    pools: &[IpPool],
) -> anyhow::Result<Option<Ipv4Addr>> {
    let usable = ipam.usable_pools(Family::V4).await?;
    let eligible: Vec<String> = pools
        .iter()
        .filter(|p| {
            p.spec.cidr.is_ipv4() && p.spec.vxlan_mode.unwrap_or_default() != EncapMode::Never
        })
        .filter(|p| p.allows(crate::config::ippool::AllowedUse::Tunnel))
        .map(|p| p.name().to_string())
        .filter(|n| usable.contains(n))
        .collect();
    let handle = format!("vxlan-tunnel-addr-{me}");
    if eligible.is_empty() {
        ipam.release_handle(&handle).await?;
        return Ok(None);
    }
    let a = ipam
        .assign(AssignRequest {
            handle_id: handle,
            ipv4: true,
            pools: Some(eligible),
            attributes: [("type".to_string(), "vxlanTunnelAddress".to_string())]
                .into_iter()
                .collect(),
            ..Default::default()
        })
        .await?;
    Ok(a.ips.iter().find_map(|i| match i.ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }))
}

/// Keep the VTEP, the tunnel address and the remote entries in step with the pools and the Node
/// resources; publish what route computation needs.
#[allow(clippy::too_many_arguments)]
pub async fn follow_vxlan(
    ds: Arc<Datastore>,
    ipam: Arc<NodeIpam>,
    mut pools: watch::Receiver<Vec<IpPool>>,
    me: String,
    node_ip: Ipv4Addr,
    prefix_len: u8,
    netns: Option<PathBuf>,
    out: watch::Sender<VxlanRouting>,
) {
    let local_subnet = Ipv4Network::new(node_ip, prefix_len)
        .ok()
        .and_then(|n| Ipv4Network::new(n.network(), prefix_len).ok());
    let mut remotes: BTreeSet<RemoteVtep> = BTreeSet::new();
    let mut node_watch = None;
    let mut built = false;
    // The datastore is consulted only when the pools changed (or after a failure), never on the tick.
    let mut pools_dirty = true;
    let mut tunnel: Option<Ipv4Addr> = None;
    loop {
        let current = pools.borrow_and_update().clone();
        let vx = vxlan_pools(&current);
        let res: anyhow::Result<VxlanRouting> = async {
            if vx.is_empty() {
                if built {
                    let ns = netns.clone();
                    tokio::task::spawn_blocking(move || vxlan::remove_device(ns.as_deref()))
                        .await??;
                    tracing::info!("no pool uses VXLAN: {} removed", vxlan::DEVICE);
                    built = false;
                }
                if pools_dirty {
                    let _ = tunnel_address(&ipam, &me, &current).await?;
                    set_node_tunnel(&ds, &me, None).await?;
                    pools_dirty = false;
                }
                tunnel = None;
                node_watch = None;
                remotes.clear();
                return Ok(VxlanRouting::default());
            }
            if pools_dirty || tunnel.is_none() {
                let t = tunnel_address(&ipam, &me, &current).await?.ok_or_else(|| {
                    anyhow::anyhow!("no VXLAN pool selects this node: no tunnel address")
                })?;
                set_node_tunnel(&ds, &me, Some(t)).await?;
                tunnel = Some(t);
                pools_dirty = false;
            }
            let Some(tunnel) = tunnel else {
                anyhow::bail!("no tunnel address");
            };
            if node_watch.is_none() {
                let (r, rev) = remote_vteps(&ds, &me).await?;
                node_watch = Some(ds.watch(&keys::resource_prefix(NODES_PLURAL), rev + 1));
                remotes = r;
            }
            let host = {
                let ns = netns.clone();
                tokio::task::spawn_blocking(move || {
                    let re = regex::Regex::new(crate::dataplane::mtu::DEFAULT_IFACE_PATTERN)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    anyhow::Ok(crate::dataplane::mtu::host_mtu(ns.as_deref(), &re)?)
                })
                .await??
            };
            let local = LocalVtep {
                node_ip,
                tunnel_ip: tunnel,
                mac: vxlan::vtep_mac(&me),
                mtu: host.mtu.saturating_sub(crate::dataplane::mtu::VXLAN_V4_OVERHEAD),
            };
            let (ns, want) = (netns.clone(), remotes.clone());
            tokio::task::spawn_blocking(move || {
                let index = vxlan::ensure_device(ns.as_deref(), &local)?;
                vxlan::sync_remotes(ns.as_deref(), index, &want, &BTreeSet::new())
            })
            .await??;
            if !built {
                tracing::info!(tunnel = %tunnel, mac = %vxlan::mac_string(&vxlan::vtep_mac(&me)), remotes = remotes.len(),
                    "VXLAN: {} up", vxlan::DEVICE);
                built = true;
            }
            Ok(VxlanRouting {
                pools: vx,
                local_subnet,
                tunnels: remotes
                    .iter()
                    .map(|r| (IpAddr::V4(r.node_ip), r.tunnel_ip))
                    .collect(),
                ready: true,
            })
        }
        .await;
        let failed = match res {
            Ok(r) => {
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
                tracing::error!(error = %format!("{e:#}"), "VXLAN not ready; retrying");
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
                    if let Ok((r, _)) = remote_vteps(&ds, &me).await {
                        let gone: BTreeSet<RemoteVtep> = remotes.difference(&r).cloned().collect();
                        if !gone.is_empty() {
                            let ns = netns.clone();
                            let _ = tokio::task::spawn_blocking(move || {
                                match vxlan::device_index(ns.as_deref())? {
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
