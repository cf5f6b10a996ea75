//! The CNI backend of a node: IPAM in etcd + pod plumbing in the kernel + a nudge to the advertiser.
//!
//! ```text
//!   CniServer ──add/del/check/status/gc──▶ NodeBackend ──assign/release/allocations/pools──▶ NodeIpam task
//!                                              │ add_pod/del_pod/list_pods (blocking thread)  ──▶ kernel
//!                                              │ refresh.notify ──▶ advertise_blocks (node.rs)
//!                                              └ rollback release failed ──write_spool(DEL)──▶ the server's spool
//! ```
//!
//! It owns no state of its own: addresses live in the IPAM task, interfaces in the kernel. What it adds
//! is the order of the steps and their undo: an ADD that fails after the assign gives the address back,
//! and when even that fails (etcd down) the release is written to the server's DEL spool so it is retried,
//! never lost.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::Notify;

use crate::cni::backend::{
    Attachment, CniBackend, DelRequest, GcRequest, HostVethAttachment, HostVethDel,
    HostVethRequest, PodRequest, StatusRequest,
};
use crate::cni::proto::{write_spool, Command, Request, PROTOCOL_VERSION};
use crate::cni::types::{cidr, codes, CniArgs, CniError, Dns, PoolRef, Route as CniRoute};
use crate::config::ippool::AllowedUse;
use crate::dataplane::hostveth::{self, HostVethSpec};
use crate::dataplane::pod::{self, PodSpec, POD_GATEWAY_V4, POD_GATEWAY_V6};
use crate::ipam::{AssignRequest, Family, IpamError, NodeIpam};

/// The CNI backend of a node.
pub struct NodeBackend {
    pub ipam: Arc<NodeIpam>,
    /// The node's network namespace (None: the one the daemon runs in).
    pub netns: Option<PathBuf>,
    /// Pod MTU when the CNI configuration gives none (detected, or the flag; re-detected live).
    pub mtu: crate::dataplane::mtu::PodMtu,
    /// Woken after every change of the node's addresses, so a new block is advertised at once.
    pub refresh: Arc<Notify>,
    /// The CNI socket whose DEL spool takes a release that failed during an ADD's rollback (None: such a
    /// release is only logged).
    pub spool_socket: Option<PathBuf>,
    /// What the chained host-veth mode routes over the veth: the node's addresses and service CIDRs.
    pub host_veth: HostVethContext,
}

/// The node's side of host-veth mode: its own addresses (the pod's next hop over the veth) and the
/// configuration feed, whose `default` BGPConfiguration lists the service CIDRs.
#[derive(Debug, Clone, Default)]
pub struct HostVethContext {
    pub node_ips: Vec<IpAddr>,
    pub feed: Option<tokio::sync::watch::Receiver<Arc<crate::feed::Snapshot>>>,
}

impl HostVethContext {
    /// The service CIDRs of the cluster now (serviceClusterIPs, serviceExternalIPs, serviceLoadBalancerIPs).
    fn services(&self) -> Vec<ipnetwork::IpNetwork> {
        let Some(feed) = &self.feed else {
            return Vec::new();
        };
        let snap = feed.borrow().clone();
        let set = crate::config::bgp::ConfigSet {
            bgp_configurations: snap
                .bgp_configurations
                .iter()
                .map(|(k, v)| (k.clone(), (**v).clone()))
                .collect(),
            ..Default::default()
        };
        super::services::service_prefixes(&set, "")
            .into_iter()
            .collect()
    }
}

pub(crate) fn ipam_error(what: &str, e: IpamError) -> CniError {
    if e.is_unreachable() {
        CniError::try_again(format!("{what}: {e}"), "etcd is not reachable; retry")
    } else {
        CniError::new(codes::INTERNAL, format!("{what}: {e}"), "")
    }
}

/// The attachment ADD returns and CHECK compares: Calico's shape (a /32 and a default route via
/// 169.254.1.1, answered by proxy ARP on the host veth; for IPv6 a /128 and a default route via the host
/// veth's link-local address).
pub fn attachment(
    host_ifname: String,
    pod_ifname: String,
    pod_mac: Option<String>,
    mtu: u32,
    ipv4: Option<Ipv4Addr>,
    ipv6: Option<Ipv6Addr>,
) -> Attachment {
    let mut ips = Vec::new();
    let mut routes = Vec::new();
    if let Some(ip) = ipv4 {
        ips.push(cidr::host(IpAddr::V4(ip)));
        routes.push(CniRoute {
            dst: cidr::default_route(false),
            gw: Some(IpAddr::V4(POD_GATEWAY_V4)),
        });
    }
    if let Some(ip) = ipv6 {
        ips.push(cidr::host(IpAddr::V6(ip)));
        routes.push(CniRoute {
            dst: cidr::default_route(true),
            gw: Some(IpAddr::V6(POD_GATEWAY_V6)),
        });
    }
    Attachment {
        host_ifname,
        host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
        pod_ifname,
        pod_mac,
        mtu: Some(mtu),
        ips,
        routes,
        dns: Dns::default(),
    }
}

pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::dataplane::DataplaneError> + Send + 'static,
) -> Result<T, CniError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CniError::new(codes::INTERNAL, e.to_string(), "")),
        Err(e) => Err(CniError::new(
            codes::INTERNAL,
            format!("dataplane task: {e}"),
            "",
        )),
    }
}

/// The IPAM handle of a CNI attachment, as Calico names it (`<network>.<container id>`).
fn handle_of(network: &str, container_id: &str) -> String {
    crate::ipam::cni_handle_id(network, container_id)
}

/// The pool names an `ipv4_pools` / `ipv6_pools` override selects, checked against the pools the IPAM view
/// holds. Calico accepts a pool's name or its exact CIDR; an unknown, disabled, wrong-family or
/// non-workload pool is a configuration error (code 7) that names it and lists what exists.
pub fn resolve_pools(
    field: &str,
    refs: &[PoolRef],
    pools: &[crate::config::ippool::IpPool],
    v6: bool,
) -> Result<Vec<String>, CniError> {
    let mut names = Vec::new();
    for r in refs {
        let found = pools.iter().find(|p| match r {
            PoolRef::Name(n) => p.name() == n,
            PoolRef::Cidr(c) => p.spec.cidr == *c,
        });
        let Some(p) = found else {
            let known: Vec<String> = pools
                .iter()
                .map(|p| format!("{} ({})", p.name(), p.spec.cidr))
                .collect();
            return Err(CniError::new(
                codes::INVALID_NETWORK_CONFIG,
                format!("{field}: no IPPool {r}"),
                format!(
                    "IPPools in the datastore: {}; name one of them (or its CIDR) or create it",
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                ),
            ));
        };
        let bad = |why: &str| {
            CniError::new(
                codes::INVALID_NETWORK_CONFIG,
                format!("{field}: IPPool {} ({}) {why}", p.name(), p.spec.cidr),
                "",
            )
        };
        if p.spec.cidr.is_ipv6() != v6 {
            return Err(bad(&format!("is an IPv{} pool", if v6 { 4 } else { 6 })));
        }
        if p.spec.disabled {
            return Err(bad("is disabled"));
        }
        if !p.allows(AllowedUse::Workload) {
            return Err(bad("does not allow workload addresses (allowedUses)"));
        }
        if !names.iter().any(|n| n == p.name()) {
            names.push(p.name().to_string());
        }
    }
    Ok(names)
}

impl NodeBackend {
    /// The pod's addresses as the kernel holds them (the host routes through its veth): IPv4, IPv6.
    async fn plumbed(
        &self,
        workload_id: &str,
    ) -> Result<Option<(Option<Ipv4Addr>, Option<Ipv6Addr>)>, CniError> {
        let netns = self.netns.clone();
        let pods = blocking(move || pod::list_pods(netns.as_deref())).await?;
        Ok(pods
            .into_iter()
            .find(|p| p.workload_id == workload_id)
            .map(|p| {
                let v4 = p.ips.iter().find_map(|a| match a {
                    IpAddr::V4(v) => Some(*v),
                    IpAddr::V6(_) => None,
                });
                let v6 = p.ips.iter().find_map(|a| match a {
                    IpAddr::V6(v) => Some(*v),
                    IpAddr::V4(_) => None,
                });
                (v4, v6)
            })
            .filter(|(v4, v6)| v4.is_some() || v6.is_some()))
    }

    /// The pools an ADD draws from: None (every usable pool) without overrides; with an override for one
    /// family, its pools plus every usable pool of the other family (a pool list applies to both). And
    /// whether an IPv6 address is wanted: an `ipv6_pools` override, or a usable IPv6 pool (dual stack).
    async fn plan_pools(&self, req: &PodRequest) -> Result<(Option<Vec<String>>, bool), CniError> {
        let usable_v6 = self
            .ipam
            .usable_pools(Family::V6)
            .await
            .map_err(|e| ipam_error("IPAM pools", e))?;
        let want_v6 = !req.ipv6_pools.is_empty() || !usable_v6.is_empty();
        if req.ipv4_pools.is_empty() && req.ipv6_pools.is_empty() {
            return Ok((None, want_v6));
        }
        let pools = self
            .ipam
            .pools()
            .await
            .map_err(|e| ipam_error("IPAM pools", e))?;
        let mut names = if req.ipv4_pools.is_empty() {
            self.ipam
                .usable_pools(Family::V4)
                .await
                .map_err(|e| ipam_error("IPAM pools", e))?
        } else {
            resolve_pools("ipv4_pools", &req.ipv4_pools, &pools, false)?
        };
        if req.ipv6_pools.is_empty() {
            names.extend(usable_v6);
        } else {
            names.extend(resolve_pools("ipv6_pools", &req.ipv6_pools, &pools, true)?);
        }
        Ok((Some(names), want_v6))
    }

    /// Undo an ADD's assign: release the handle; if that fails (etcd unreachable), record a DEL for the
    /// attachment in the server's spool so the sweep retries it until it succeeds. Returns where it was
    /// spooled, if it was.
    pub async fn rollback(&self, req: &PodRequest) -> Option<PathBuf> {
        let handle = req.handle_id();
        let e = match self.ipam.release_handle(&handle).await {
            Ok(_) => {
                self.refresh.notify_one();
                return None;
            }
            Err(e) => e,
        };
        let Some(socket) = &self.spool_socket else {
            tracing::error!(handle, error = %e, "rollback: releasing the address failed and no DEL spool is configured; `margay ipam check` will show it");
            return None;
        };
        let del = Request {
            protocol: PROTOCOL_VERSION,
            command: Command::Del,
            container_id: Some(req.container_id.clone()),
            netns: None,
            ifname: Some(req.ifname.clone()),
            args: CniArgs {
                k8s_pod_namespace: req.pod.as_ref().map(|p| p.namespace.clone()),
                k8s_pod_name: req.pod.as_ref().map(|p| p.name.clone()),
                k8s_pod_infra_container_id: req
                    .pod
                    .as_ref()
                    .and_then(|p| p.infra_container_id.clone()),
                k8s_pod_uid: req.pod.as_ref().and_then(|p| p.uid.clone()),
                ..Default::default()
            },
            network: req.network.clone(),
            mtu: None,
            ipv4_pools: Vec::new(),
            ipv6_pools: Vec::new(),
            prev_result: None,
            runtime_config: None,
            valid_attachments: None,
            host_veth: None,
        };
        match write_spool(socket, &del) {
            Ok(path) => {
                tracing::warn!(handle, error = %e, spool = %path.display(),
                    "rollback: releasing the address failed; spooled a DEL, the sweep retries it");
                Some(path)
            }
            Err(io) => {
                tracing::error!(handle, error = %e, spool_error = %io,
                    "rollback: releasing the address failed and the DEL could not be spooled; `margay ipam check` will show it");
                None
            }
        }
    }
}

impl NodeBackend {
    fn host_veth_spec(&self, req: &HostVethRequest) -> HostVethSpec {
        let mut routes: Vec<ipnetwork::IpNetwork> = if req.conf.service_routes {
            self.host_veth.services()
        } else {
            Vec::new()
        };
        routes.extend(req.conf.extra_routes.iter().copied());
        HostVethSpec {
            node_netns: self.netns.clone(),
            pod_netns: req.netns.clone(),
            workload_id: req.workload_id(),
            owner: hostveth::owner_alias(&req.network, &req.container_id, &req.ifname),
            pod_ifname: req.conf.veth_name.clone(),
            mtu: req.mtu.unwrap_or_else(|| self.mtu.get()),
            pod_ips: req.pod_ips.clone(),
            node_ips: self.host_veth.node_ips.clone(),
            routes,
        }
    }
}

fn host_veth_attachment(spec: &HostVethSpec, r: hostveth::HostVethResult) -> HostVethAttachment {
    HostVethAttachment {
        host_ifname: r.host_ifname,
        host_mac: Some(r.host_mac),
        pod_ifname: r.pod_ifname,
        pod_mac: Some(r.pod_mac),
        pod_routes: spec
            .pod_routes()
            .into_iter()
            .map(|(dst, gw, _)| CniRoute {
                dst: ipnetwork::IpNetwork::new(dst.network(), dst.prefix()).unwrap_or(dst),
                gw,
            })
            .collect(),
    }
}

impl CniBackend for NodeBackend {
    async fn host_veth_add(&self, req: HostVethRequest) -> Result<HostVethAttachment, CniError> {
        let spec = self.host_veth_spec(&req);
        let s = spec.clone();
        let r = blocking(move || hostveth::add_host_veth(&s)).await?;
        Ok(host_veth_attachment(&spec, r))
    }

    async fn host_veth_check(&self, req: HostVethRequest) -> Result<HostVethAttachment, CniError> {
        let spec = self.host_veth_spec(&req);
        let s = spec.clone();
        let r = blocking(move || hostveth::check_host_veth(&s))
            .await
            .map_err(|mut e| {
                e.code = codes::CHECK_FAILED;
                e
            })?;
        Ok(host_veth_attachment(&spec, r))
    }

    async fn host_veth_del(&self, req: HostVethDel) -> Result<(), CniError> {
        let netns = self.netns.clone();
        let wid = req.workload_id();
        blocking(move || hostveth::del_host_veth(netns.as_deref(), &wid).map(|_| ())).await
    }

    async fn add(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let handle = req.handle_id();
        let mut ask = AssignRequest::v4(&handle);
        if let Some(p) = &req.pod {
            ask.attributes
                .insert("namespace".into(), p.namespace.clone());
            ask.attributes.insert("pod".into(), p.name.clone());
        }
        let (pools, want_v6) = self.plan_pools(&req).await?;
        ask.pools = pools;
        ask.ipv6 = want_v6;
        let assigned = self
            .ipam
            .assign(ask)
            .await
            .map_err(|e| ipam_error("IPAM assign", e))?;
        let ip = assigned.ips.iter().find_map(|a| match a.ip {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        });
        let ip6 = assigned.ips.iter().find_map(|a| match a.ip {
            IpAddr::V6(v) => Some(v),
            IpAddr::V4(_) => None,
        });
        let Some(ip) = ip else {
            self.rollback(&req).await;
            return Err(CniError::new(
                codes::IPAM_EXHAUSTED,
                "no IPv4 address available for this node",
                "",
            ));
        };
        if want_v6 && ip6.is_none() {
            self.rollback(&req).await;
            return Err(CniError::new(
                codes::IPAM_EXHAUSTED,
                "no IPv6 address available for this node",
                "",
            ));
        }
        // The block may be new: advertise it before the pod sends its first packet.
        self.refresh.notify_one();
        let mtu = req.mtu.unwrap_or_else(|| self.mtu.get());
        let spec = PodSpec {
            node_netns: self.netns.clone(),
            pod_netns: req.netns.clone(),
            workload_id: req.workload_id(),
            ifname: req.ifname.clone(),
            mtu,
            ipv4: Some(ip),
            ipv6: ip6,
        };
        match blocking(move || pod::add_pod(&spec)).await {
            Ok(r) => Ok(attachment(
                r.host_ifname,
                r.pod_ifname,
                Some(r.pod_mac),
                mtu,
                Some(ip),
                ip6,
            )),
            Err(e) => {
                // add_pod removes what it half built; the address goes back to the pool (or to the spool).
                self.rollback(&req).await;
                Err(e)
            }
        }
    }

    async fn del(&self, req: DelRequest) -> Result<(), CniError> {
        let netns = self.netns.clone();
        let wid = req.workload_id();
        blocking(move || pod::del_pod(netns.as_deref(), &wid)).await?;
        self.ipam
            .release_handle(&req.handle_id())
            .await
            .map_err(|e| ipam_error("IPAM release", e))?;
        self.refresh.notify_one();
        Ok(())
    }

    async fn check(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let wid = req.workload_id();
        let Some((ip, ip6)) = self.plumbed(&wid).await? else {
            return Err(CniError::new(
                codes::CHECK_FAILED,
                format!("no pod interface for workload {wid:?} on this node"),
                "",
            ));
        };
        let mtu = req.mtu.unwrap_or_else(|| self.mtu.get());
        let spec = PodSpec {
            node_netns: self.netns.clone(),
            pod_netns: req.netns.clone(),
            workload_id: wid.clone(),
            ifname: req.ifname.clone(),
            mtu,
            ipv4: ip,
            ipv6: ip6,
        };
        let host = pod::host_ifname(&wid);
        blocking(move || pod::check_pod(&spec)).await?;
        Ok(attachment(host, req.ifname, None, mtu, ip, ip6))
    }

    async fn status(&self, _req: StatusRequest) -> Result<(), CniError> {
        self.ipam
            .routes()
            .await
            .map(|_| ())
            .map_err(|e| ipam_error("IPAM", e))
    }

    /// CNI GC (spec 1.1, `cni.dev/valid-attachments`): release this node's handles of `network` that no
    /// valid attachment names, and delete the pod veths whose addresses belong to no handle any more (or
    /// to one just released). Veths holding an address of a valid handle, or of another network's handle,
    /// are kept. Idempotent: a second GC with the same list finds nothing to do.
    async fn gc(&self, req: GcRequest) -> Result<(), CniError> {
        let valid: BTreeSet<String> = req
            .valid_attachments
            .iter()
            .map(|a| handle_of(&req.network, &a.container_id))
            .collect();
        let prefix = format!("{}.", req.network);
        let allocs = self
            .ipam
            .allocations()
            .await
            .map_err(|e| ipam_error("IPAM (GC)", e))?;
        let owner: BTreeMap<IpAddr, Option<String>> =
            allocs.iter().map(|a| (a.ip, a.handle_id.clone())).collect();
        let stale: BTreeSet<String> = allocs
            .iter()
            .filter_map(|a| a.handle_id.clone())
            .filter(|h| h.starts_with(&prefix) && !valid.contains(h))
            .collect();
        // Veths first: a pod whose address is about to be released must not keep receiving its traffic.
        let netns = self.netns.clone();
        let pods = blocking(move || pod::list_pods(netns.as_deref())).await?;
        let mut removed = Vec::new();
        for p in pods {
            let keep = p.ips.iter().any(|ip| match owner.get(ip) {
                Some(Some(h)) => !stale.contains(h),
                // Allocated without a handle: not ours to judge.
                Some(None) => true,
                None => false,
            });
            if keep {
                continue;
            }
            let netns = self.netns.clone();
            let wid = p.workload_id.clone();
            // del_pod finds the veth by workload id (ADD writes it as the interface alias).
            if wid.is_empty() || pod::host_ifname(&wid) != p.host_ifname {
                tracing::warn!(veth = %p.host_ifname, alias = %wid,
                    "GC: pod veth without its workload id alias; left alone (delete it by hand)");
                continue;
            }
            if blocking(move || pod::del_pod(netns.as_deref(), &wid)).await? {
                removed.push(p.host_ifname);
            }
        }
        // Host-veth pairs (chained mode) of this network whose container the runtime no longer lists.
        let netns = self.netns.clone();
        let network = req.network.clone();
        let valid_pairs: BTreeSet<(String, String)> = req
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        removed.extend(
            blocking(move || hostveth::gc_host_veths(netns.as_deref(), &network, &valid_pairs))
                .await?,
        );
        let mut released = Vec::new();
        let mut first_error = None;
        for h in &stale {
            match self.ipam.release_handle(h).await {
                Ok(ips) => released.extend(ips),
                Err(e) => {
                    tracing::warn!(handle = %h, error = %e, "GC: releasing a handle failed");
                    first_error.get_or_insert(ipam_error(&format!("GC: releasing {h}"), e));
                }
            }
        }
        if !released.is_empty() || !removed.is_empty() {
            self.refresh.notify_one();
        }
        tracing::info!(network = %req.network, valid = valid.len(), handles = ?stale, addresses = ?released,
            veths = ?removed, "CNI GC");
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
