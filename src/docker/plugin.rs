//! The handlers of Docker's remote network driver and IPAM driver, over a [`Backend`] (the node's IPAM
//! and pod plumbing; a fake in the unit tests). What each call does, and why, in Docker's order:
//!
//! ```text
//!  docker network create --driver margay --ipam-driver margay [--ipam-opt pool=NAME] [--subnet CIDR] net1
//!    IpamDriver.RequestPool    pool by name / CIDR / the node's usable pools; replies gateway 0.0.0.0/0
//!                              so Docker asks no gateway address (containers route via 169.254.1.1)
//!    NetworkDriver.CreateNetwork   checks the network uses margay IPAM; the definition goes to etcd
//!  docker run --net net1 ...
//!    IpamDriver.RequestAddress     one address from the node's affine blocks, handle `docker.<random>`
//!    NetworkDriver.CreateEndpoint  the veth pair in the node's namespace, host side as a pod's
//!    NetworkDriver.Join            names the peer; Docker moves it into the container as eth0
//!  docker rm -f:  Leave, DeleteEndpoint (veth removed), IpamDriver.ReleaseAddress (address released)
//!  docker network rm:  DeleteNetwork (definition removed from etcd), ReleasePool (nothing to do)
//! ```
//!
//! Every handler either completes or changes nothing: an address is assigned in one IPAM transaction and
//! Docker releases it when a later step fails; the veth is removed again when its plumbing fails. Every
//! teardown call succeeds when there is nothing left to tear down.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use serde::de::DeserializeOwned;
use serde_json::{json, Value};

use super::proto::{self, *};
use crate::config::ippool::{AllowedUse, IpPool};
use crate::dataplane::pod::{host_ifname, peer_ifname, POD_GATEWAY_V4, POD_GATEWAY_V6};
use crate::dataplane::DataplaneError;
use crate::ipam::{AssignRequest, IpamError};

/// Why a call failed; the text is what `docker` prints after "Error response from daemon:".
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error("margay {method}: malformed request: {reason}")]
    Malformed { method: String, reason: String },
    /// The request asks for something margay does not do; the text names the field, the value and the fix.
    #[error("margay: {0}")]
    Refused(String),
    #[error("margay {what}: etcd is not reachable from this node ({source}); nothing was allocated or changed: retry when etcd is back")]
    EtcdDown { what: String, source: IpamError },
    #[error("margay {what}: no free address ({source}); free addresses (`margay ipam show`) or add an IPPool")]
    Exhausted { what: String, source: IpamError },
    #[error("margay {what}: {source}")]
    Ipam { what: String, source: IpamError },
    #[error("margay {what}: {source}")]
    Dataplane {
        what: String,
        source: DataplaneError,
    },
}

impl PluginError {
    /// Sort an IPAM error into what the operator must do about it.
    pub fn ipam(what: &str, e: IpamError) -> PluginError {
        let what = what.to_string();
        if e.is_unreachable() {
            PluginError::EtcdDown { what, source: e }
        } else if matches!(e, IpamError::NoAddress(_)) {
            PluginError::Exhausted { what, source: e }
        } else {
            PluginError::Ipam { what, source: e }
        }
    }
}

/// The work behind the plugin (implemented by the node over its IPAM task and the pod plumbing).
pub trait Backend: Send + Sync + 'static {
    /// Every IPPool the node's IPAM view holds.
    fn pools(&self) -> impl Future<Output = Result<Vec<IpPool>, PluginError>> + Send;
    /// [`Backend::pools`], including `name` if the datastore holds it (the view may be a moment behind a
    /// pool written just now).
    fn pools_naming(
        &self,
        name: &str,
    ) -> impl Future<Output = Result<Vec<IpPool>, PluginError>> + Send;
    /// The pools an assign without a pool list draws from (the node's selected, enabled pools).
    fn usable_pools(
        &self,
        v6: bool,
    ) -> impl Future<Output = Result<Vec<String>, PluginError>> + Send;
    /// Assign from the node's affine blocks (claiming one if needed), as a pod ADD does.
    fn assign(
        &self,
        req: AssignRequest,
    ) -> impl Future<Output = Result<Vec<IpAddr>, PluginError>> + Send;
    /// Release one address (already free: success).
    fn release(&self, ip: IpAddr) -> impl Future<Output = Result<(), PluginError>> + Send;
    /// Build the endpoint's veth pair (host side as a pod's); returns the peer's name.
    fn plumb(
        &self,
        workload_id: String,
        ipv4: Option<Ipv4Addr>,
        ipv6: Option<Ipv6Addr>,
    ) -> impl Future<Output = Result<String, PluginError>> + Send;
    /// Remove the endpoint's veth (absent: success).
    fn unplumb(&self, workload_id: String) -> impl Future<Output = Result<(), PluginError>> + Send;
    /// The addresses routed to the endpoint's host veth; None when the veth does not exist.
    fn plumbed(
        &self,
        workload_id: String,
    ) -> impl Future<Output = Result<Option<Vec<IpAddr>>, PluginError>> + Send;
    /// A network of ours was created / deleted in the local Docker (the definition sync takes it from here).
    fn network_created(&self, network_id: &str);
    fn network_deleted(&self, network_id: &str);
}

/// Which pool a Docker pool id stands for: one family, and one IPPool or every usable one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolId {
    pub v6: bool,
    pub pool: Option<String>,
}

impl PoolId {
    /// `margay-ipv4` (every usable pool) or `margay-ipv4:<IPPool name>`.
    pub fn encode(&self) -> String {
        let fam = if self.v6 {
            "margay-ipv6"
        } else {
            "margay-ipv4"
        };
        match &self.pool {
            Some(p) => format!("{fam}:{p}"),
            None => fam.to_string(),
        }
    }

    pub fn parse(s: &str) -> Option<PoolId> {
        let (fam, pool) = match s.split_once(':') {
            Some((f, p)) if !p.is_empty() => (f, Some(p.to_string())),
            Some(_) => return None,
            None => (s, None),
        };
        let v6 = match fam {
            "margay-ipv4" => false,
            "margay-ipv6" => true,
            _ => return None,
        };
        Some(PoolId { v6, pool })
    }
}

/// The workload id of a Docker endpoint: names its host veth (`mg` + hash) and is its interface alias.
pub fn workload_id(endpoint_id: &str) -> String {
    format!("docker.{endpoint_id}")
}

/// The unspecified network of a family: what we reply as the pool (without `--subnet`) and as the gateway.
fn any(v6: bool) -> &'static str {
    if v6 {
        "::/0"
    } else {
        "0.0.0.0/0"
    }
}

/// The plugin: one instance serves both interfaces.
pub struct Plugin<B> {
    pub backend: B,
    /// Names the node in the allocation attributes.
    pub node: String,
}

/// A handler's answer: HTTP status and JSON body.
pub type Reply = (u16, Value);

fn parse<T: DeserializeOwned + Default>(method: &str, body: &[u8]) -> Result<T, PluginError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| PluginError::Malformed {
        method: method.to_string(),
        reason: e.to_string(),
    })
}

fn parse_cidr_addr(field: &str, s: &str) -> Result<IpAddr, PluginError> {
    let ip = s.split('/').next().unwrap_or_default();
    ip.parse().map_err(|_| {
        PluginError::Refused(format!(
            "{field} {s:?} is not an address: the network must use margay IPAM (--ipam-driver margay)"
        ))
    })
}

impl<B: Backend> Plugin<B> {
    /// Answer `POST /<Interface>.<Method>`: 200 and the reply, 404 for a method we do not implement (Docker
    /// then skips optional calls), 400/500 and `{"Err": "..."}` for a failure (read by both interfaces).
    pub async fn handle(&self, method: &str, body: &[u8]) -> Reply {
        match self.dispatch(method, body).await {
            Ok(Some(v)) => (200, v),
            Ok(None) => (
                404,
                json!({"Err": format!("margay does not implement {method}")}),
            ),
            Err(e) => {
                let status = if matches!(e, PluginError::Malformed { .. }) {
                    400
                } else {
                    500
                };
                tracing::warn!(method, error = %e, "docker plugin call failed");
                (status, json!({"Err": e.to_string()}))
            }
        }
    }

    async fn dispatch(&self, method: &str, body: &[u8]) -> Result<Option<Value>, PluginError> {
        let v = match method {
            "Plugin.Activate" => proto::activate(),
            // Local: Docker 20.10 keeps global networks only in a cluster store (etcd v2, removed in 23.0).
            // Networks reach every host through margay's own etcd definitions instead.
            "NetworkDriver.GetCapabilities" => {
                json!({"Scope": "local", "ConnectivityScope": "global"})
            }
            "NetworkDriver.CreateNetwork" => self.create_network(parse(method, body)?)?,
            "NetworkDriver.DeleteNetwork" => {
                let r: EndpointRef = parse(method, body)?;
                self.backend.network_deleted(&r.network_id);
                json!({})
            }
            "NetworkDriver.CreateEndpoint" => self.create_endpoint(parse(method, body)?).await?,
            "NetworkDriver.Join" => self.join(parse(method, body)?).await?,
            "NetworkDriver.Leave" => json!({}),
            "NetworkDriver.DeleteEndpoint" => {
                let r: EndpointRef = parse(method, body)?;
                if r.endpoint_id.is_empty() {
                    return Err(PluginError::Malformed {
                        method: method.into(),
                        reason: "no EndpointID".into(),
                    });
                }
                self.backend.unplumb(workload_id(&r.endpoint_id)).await?;
                json!({})
            }
            "NetworkDriver.EndpointOperInfo" => {
                let r: EndpointRef = parse(method, body)?;
                json!({"Value": {"hostInterface": host_ifname(&workload_id(&r.endpoint_id))}})
            }
            "NetworkDriver.ProgramExternalConnectivity"
            | "NetworkDriver.RevokeExternalConnectivity"
            | "NetworkDriver.DiscoverNew"
            | "NetworkDriver.DiscoverDelete" => json!({}),
            "IpamDriver.GetCapabilities" => {
                json!({"RequiresMACAddress": false, "RequiresRequestReplay": false})
            }
            "IpamDriver.GetDefaultAddressSpaces" => json!({
                "LocalDefaultAddressSpace": LOCAL_ADDRESS_SPACE,
                "GlobalDefaultAddressSpace": GLOBAL_ADDRESS_SPACE,
            }),
            "IpamDriver.RequestPool" => self.request_pool(parse(method, body)?).await?,
            "IpamDriver.ReleasePool" => {
                let r: ReleasePool = parse(method, body)?;
                // Pools are IPPools (or all of them): nothing to give back, but refuse ids we never gave.
                if PoolId::parse(&r.pool_id).is_none() {
                    return Err(PluginError::Refused(format!(
                        "ReleasePool: PoolID {:?} was not handed out by margay",
                        r.pool_id
                    )));
                }
                json!({})
            }
            "IpamDriver.RequestAddress" => self.request_address(parse(method, body)?).await?,
            "IpamDriver.ReleaseAddress" => {
                let r: ReleaseAddress = parse(method, body)?;
                let ip = parse_cidr_addr("ReleaseAddress: Address", &r.address)?;
                self.backend.release(ip).await?;
                json!({})
            }
            _ => return Ok(None),
        };
        Ok(Some(v))
    }

    /// The IPPool named by `--ipam-opt pool=NAME` or equal to `--subnet`, checked usable for workloads.
    async fn find_pool(&self, req: &RequestPool) -> Result<Option<IpPool>, PluginError> {
        let by_name = req.options.get(POOL_OPTION).filter(|n| !n.is_empty());
        if by_name.is_none() && req.pool.is_empty() {
            return Ok(None);
        }
        let pools = match by_name {
            Some(n) => self.backend.pools_naming(n).await?,
            None => self.backend.pools().await?,
        };
        let known = || {
            let v: Vec<String> = pools
                .iter()
                .map(|p| format!("{} ({})", p.name(), p.spec.cidr))
                .collect();
            if v.is_empty() {
                "none".to_string()
            } else {
                v.join(", ")
            }
        };
        let found = match by_name {
            Some(n) => pools.iter().find(|p| p.name() == n).ok_or_else(|| {
                PluginError::Refused(format!(
                    "--ipam-opt pool={n}: there is no IPPool {n:?}; IPPools in the datastore: {}; \
                     name one of them or create it (margay apply -f)",
                    known()
                ))
            })?,
            None => pools
                .iter()
                .find(|p| p.spec.cidr.to_string() == req.pool)
                .ok_or_else(|| {
                    PluginError::Refused(format!(
                        "--subnet {}: no IPPool has this CIDR; IPPools in the datastore: {}; give a pool's \
                         exact CIDR, or --ipam-opt pool=NAME, or neither (the node's pools)",
                        req.pool,
                        known()
                    ))
                })?,
        };
        if !req.pool.is_empty() && found.spec.cidr.to_string() != req.pool {
            return Err(PluginError::Refused(format!(
                "--subnet {} is not the CIDR of IPPool {} ({}): give one of them, or both matching",
                req.pool,
                found.name(),
                found.spec.cidr
            )));
        }
        let bad = |why: &str| {
            PluginError::Refused(format!(
                "IPPool {} ({}) {why}",
                found.name(),
                found.spec.cidr
            ))
        };
        if found.spec.cidr.is_ipv6() != req.v6 {
            return Err(bad(&format!(
                "is an IPv{} pool but Docker asked for an IPv{} pool",
                if req.v6 { 4 } else { 6 },
                if req.v6 { 6 } else { 4 }
            )));
        }
        if found.spec.disabled {
            return Err(bad("is disabled"));
        }
        if !found.allows(AllowedUse::Workload) {
            return Err(bad("does not allow workload addresses (allowedUses)"));
        }
        Ok(Some(found.clone()))
    }

    async fn request_pool(&self, req: RequestPool) -> Result<Value, PluginError> {
        if !req.sub_pool.is_empty() {
            return Err(PluginError::Refused(format!(
                "--ip-range {} is not supported: addresses come from the node's IPAM blocks; leave it out \
                 (or put the range in an IPPool and use --ipam-opt pool=NAME)",
                req.sub_pool
            )));
        }
        if let Some(k) = req.options.keys().find(|k| k.as_str() != POOL_OPTION) {
            return Err(PluginError::Refused(format!(
                "unknown --ipam-opt {k:?}: margay IPAM takes only pool=<IPPool name>"
            )));
        }
        let (id, cidr) = match self.find_pool(&req).await? {
            Some(p) => (
                PoolId {
                    v6: req.v6,
                    pool: Some(p.name().to_string()),
                },
                p.spec.cidr.to_string(),
            ),
            None => {
                if self.backend.usable_pools(req.v6).await?.is_empty() {
                    return Err(PluginError::Refused(format!(
                        "no usable IPv{} IPPool for this node (none exists, all are disabled, or none selects \
                         the node): create one (margay apply -f) or name one with --ipam-opt pool=NAME",
                        if req.v6 { 6 } else { 4 }
                    )));
                }
                (
                    PoolId {
                        v6: req.v6,
                        pool: None,
                    },
                    any(req.v6).to_string(),
                )
            }
        };
        Ok(json!({
            "PoolID": id.encode(),
            "Pool": cidr,
            // Docker takes this as the gateway and asks for no gateway address: containers route through
            // 169.254.1.1, answered by proxy ARP on the host veth.
            "Data": {GATEWAY_DATA: any(req.v6)},
        }))
    }

    async fn request_address(&self, req: RequestAddress) -> Result<Value, PluginError> {
        if req.options.get(REQUEST_ADDRESS_TYPE).map(String::as_str) == Some(GATEWAY_DATA) {
            return Err(PluginError::Refused(
                "margay IPAM hands out no gateway address (containers route via 169.254.1.1): \
                 leave out --gateway"
                    .into(),
            ));
        }
        let id = PoolId::parse(&req.pool_id).ok_or_else(|| {
            PluginError::Refused(format!(
                "RequestAddress: PoolID {:?} was not handed out by margay (is the network's --ipam-driver margay?)",
                req.pool_id
            ))
        })?;
        // The handle owns the address until ReleaseAddress; Docker tells us no endpoint id here, so the
        // handle is unique by itself and the release goes by address.
        let handle = format!("docker.{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut ask = AssignRequest {
            handle_id: handle.clone(),
            ipv4: false,
            ipv6: false,
            pools: id.pool.clone().map(|p| vec![p]),
            attributes: BTreeMap::from([
                ("orchestrator".to_string(), "docker".to_string()),
                ("docker-pool".to_string(), req.pool_id.clone()),
            ]),
            ..Default::default()
        };
        if req.address.is_empty() {
            if id.v6 {
                ask.ipv6 = true;
            } else {
                ask.ipv4 = true;
            }
        } else {
            let ip = parse_cidr_addr("RequestAddress: Address", &req.address)?;
            if ip.is_ipv6() != id.v6 {
                return Err(PluginError::Refused(format!(
                    "--ip {ip} is not of the network's family"
                )));
            }
            ask.ips = vec![ip];
        }
        let ips = self.backend.assign(ask).await?;
        let ip = ips
            .into_iter()
            .find(|ip| ip.is_ipv6() == id.v6)
            .ok_or_else(|| {
                PluginError::Refused(format!(
                    "RequestAddress: no IPv{} address in {} for node {}: free addresses (`margay ipam show`) \
                     or add an IPPool",
                    if id.v6 { 6 } else { 4 },
                    id.pool.as_deref().unwrap_or("the node's pools"),
                    self.node
                ))
            })?;
        tracing::info!(%ip, handle, pool = %req.pool_id, "docker: address assigned");
        Ok(json!({"Address": format!("{ip}/{}", if id.v6 { 128 } else { 32 }), "Data": {}}))
    }

    fn create_network(&self, req: CreateNetwork) -> Result<Value, PluginError> {
        let opts = driver_options(&req.options);
        if let Some(k) = opts.keys().next() {
            return Err(PluginError::Refused(format!(
                "unknown driver option -o {k}: the margay driver takes none (choose the pool with \
                 --ipam-opt pool=NAME)"
            )));
        }
        for (v6, data) in [(false, &req.ipv4_data), (true, &req.ipv6_data)] {
            for d in data {
                let ours =
                    [LOCAL_ADDRESS_SPACE, GLOBAL_ADDRESS_SPACE].contains(&d.address_space.as_str());
                if !ours || d.gateway != any(v6) {
                    return Err(PluginError::Refused(format!(
                        "the network's IPAM is not margay's (address space {:?}, gateway {:?}): create it with \
                         --ipam-driver margay, without --gateway",
                        d.address_space, d.gateway
                    )));
                }
            }
        }
        self.backend.network_created(&req.network_id);
        Ok(json!({}))
    }

    async fn create_endpoint(&self, req: CreateEndpoint) -> Result<Value, PluginError> {
        if req.endpoint_id.is_empty() {
            return Err(PluginError::Malformed {
                method: "NetworkDriver.CreateEndpoint".into(),
                reason: "no EndpointID".into(),
            });
        }
        let iface = req.interface.unwrap_or_default();
        let mut v4 = None;
        let mut v6 = None;
        for (field, s) in [
            ("Address", &iface.address),
            ("AddressIPv6", &iface.address_ipv6),
        ] {
            if s.is_empty() {
                continue;
            }
            match parse_cidr_addr(field, s)? {
                IpAddr::V4(a) if field == "Address" => v4 = Some(a),
                IpAddr::V6(a) if field == "AddressIPv6" => v6 = Some(a),
                other => {
                    return Err(PluginError::Refused(format!(
                        "CreateEndpoint: {field} {other} is of the wrong family"
                    )))
                }
            }
        }
        if v4.is_none() && v6.is_none() {
            return Err(PluginError::Refused(
                "CreateEndpoint without an address: the network must use margay IPAM (--ipam-driver margay)"
                    .into(),
            ));
        }
        let wid = workload_id(&req.endpoint_id);
        let peer = self.backend.plumb(wid.clone(), v4, v6).await?;
        tracing::info!(endpoint = %req.endpoint_id, host = %host_ifname(&wid), %peer, ?v4, ?v6, "docker: endpoint plumbed");
        // Empty: Docker sent the addresses, and a non-empty Interface would make it roll back.
        Ok(json!({}))
    }

    async fn join(&self, req: Join) -> Result<Value, PluginError> {
        let wid = workload_id(&req.endpoint_id);
        let Some(ips) = self.backend.plumbed(wid.clone()).await? else {
            return Err(PluginError::Refused(format!(
                "Join: endpoint {} has no interface on this node ({} is missing; was it removed by hand?): \
                 remove the container and start it again",
                req.endpoint_id,
                host_ifname(&wid)
            )));
        };
        let mut reply = json!({
            "InterfaceName": {"SrcName": peer_ifname(&wid), "DstPrefix": "eth"},
            "StaticRoutes": [],
            // Never a docker_gwbridge second interface: the default route is ours.
            "DisableGatewayService": true,
        });
        // RouteType 1: connected, so a gateway outside every subnet is reachable on the link (as a pod's
        // `169.254.1.1 dev eth0 scope link`); the host veth answers for it by proxy ARP / its link-local.
        let mut routes = Vec::new();
        if ips.iter().any(IpAddr::is_ipv4) {
            reply["Gateway"] = json!(POD_GATEWAY_V4.to_string());
            routes.push(json!({"Destination": format!("{POD_GATEWAY_V4}/32"), "RouteType": 1}));
        }
        if ips.iter().any(IpAddr::is_ipv6) {
            reply["GatewayIPv6"] = json!(POD_GATEWAY_V6.to_string());
            routes.push(json!({"Destination": format!("{POD_GATEWAY_V6}/128"), "RouteType": 1}));
        }
        reply["StaticRoutes"] = Value::Array(routes);
        Ok(reply)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ippool::IpPool;
    use std::sync::Mutex;

    /// In-memory IPAM and "kernel": enough to check what each handler asks for and what it leaves.
    #[derive(Default)]
    struct Fake {
        pools: Vec<IpPool>,
        /// Free addresses, handed out in order.
        free: Mutex<Vec<IpAddr>>,
        /// handle -> address
        assigned: Mutex<BTreeMap<String, IpAddr>>,
        /// workload -> addresses
        veths: Mutex<BTreeMap<String, Vec<IpAddr>>>,
        etcd_down: bool,
        plumb_fails: bool,
        events: Mutex<Vec<String>>,
    }

    fn pool(name: &str, cidr: &str) -> IpPool {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "projectcalico.org/v3", "kind": "IPPool",
            "metadata": {"name": name}, "spec": {"cidr": cidr}
        }))
        .unwrap()
    }

    fn unreachable() -> IpamError {
        IpamError::Datastore(crate::datastore::DatastoreError::Unreachable { tried: vec![] })
    }

    impl Backend for Fake {
        async fn pools(&self) -> Result<Vec<IpPool>, PluginError> {
            if self.etcd_down {
                return Err(PluginError::ipam("IPAM pools", unreachable()));
            }
            Ok(self.pools.clone())
        }
        async fn pools_naming(&self, _: &str) -> Result<Vec<IpPool>, PluginError> {
            self.pools().await
        }
        async fn usable_pools(&self, v6: bool) -> Result<Vec<String>, PluginError> {
            Ok(self
                .pools
                .iter()
                .filter(|p| p.spec.cidr.is_ipv6() == v6)
                .map(|p| p.name().to_string())
                .collect())
        }
        async fn assign(&self, req: AssignRequest) -> Result<Vec<IpAddr>, PluginError> {
            if self.etcd_down {
                return Err(PluginError::ipam("IPAM assign", unreachable()));
            }
            let mut free = self.free.lock().unwrap();
            if free.is_empty() {
                return Err(PluginError::ipam(
                    "IPAM assign",
                    IpamError::NoAddress("pool p1 has no free address".into()),
                ));
            }
            let ip = free.remove(0);
            self.assigned.lock().unwrap().insert(req.handle_id, ip);
            Ok(vec![ip])
        }
        async fn release(&self, ip: IpAddr) -> Result<(), PluginError> {
            self.assigned.lock().unwrap().retain(|_, a| *a != ip);
            Ok(())
        }
        async fn plumb(
            &self,
            wid: String,
            v4: Option<Ipv4Addr>,
            v6: Option<Ipv6Addr>,
        ) -> Result<String, PluginError> {
            if self.plumb_fails {
                return Err(PluginError::Refused("netlink says no".into()));
            }
            let ips = v4
                .map(IpAddr::V4)
                .into_iter()
                .chain(v6.map(IpAddr::V6))
                .collect();
            self.veths.lock().unwrap().insert(wid.clone(), ips);
            Ok(peer_ifname(&wid))
        }
        async fn unplumb(&self, wid: String) -> Result<(), PluginError> {
            self.veths.lock().unwrap().remove(&wid);
            Ok(())
        }
        async fn plumbed(&self, wid: String) -> Result<Option<Vec<IpAddr>>, PluginError> {
            Ok(self.veths.lock().unwrap().get(&wid).cloned())
        }
        fn network_created(&self, id: &str) {
            self.events.lock().unwrap().push(format!("created {id}"));
        }
        fn network_deleted(&self, id: &str) {
            self.events.lock().unwrap().push(format!("deleted {id}"));
        }
    }

    fn plugin(f: Fake) -> Plugin<Fake> {
        Plugin {
            backend: f,
            node: "n1".into(),
        }
    }

    fn fake() -> Fake {
        Fake {
            pools: vec![pool("p1", "10.65.0.0/16")],
            free: Mutex::new(vec![
                "10.65.1.2".parse().unwrap(),
                "10.65.1.3".parse().unwrap(),
            ]),
            ..Default::default()
        }
    }

    async fn call(p: &Plugin<Fake>, method: &str, body: Value) -> Reply {
        p.handle(method, body.to_string().as_bytes()).await
    }

    #[tokio::test]
    async fn handshake_and_unknown_methods() {
        let p = plugin(fake());
        let (s, v) = p.handle("Plugin.Activate", b"").await;
        assert_eq!(s, 200);
        assert_eq!(v["Implements"], json!(["NetworkDriver", "IpamDriver"]));
        let (_, v) = p.handle("NetworkDriver.GetCapabilities", b"").await;
        assert_eq!(v["Scope"], "local");
        let (s, v) = p.handle("NetworkDriver.AllocateNetwork", b"{}").await;
        assert_eq!(s, 404, "{v}");
        let (s, v) = p.handle("IpamDriver.RequestPool", b"{not json").await;
        assert_eq!(s, 400);
        assert!(v["Err"].as_str().unwrap().contains("malformed"), "{v}");
    }

    #[tokio::test]
    async fn request_pool_default_named_and_refused() {
        let p = plugin(fake());
        let (s, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"AddressSpace": "MargayLocal"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["PoolID"], "margay-ipv4");
        assert_eq!(v["Pool"], "0.0.0.0/0");
        assert_eq!(v["Data"][GATEWAY_DATA], "0.0.0.0/0");
        let (s, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Options": {"pool": "p1"}}),
        )
        .await;
        assert_eq!((s, v["PoolID"].as_str()), (200, Some("margay-ipv4:p1")));
        assert_eq!(v["Pool"], "10.65.0.0/16");
        let (s, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Pool": "10.65.0.0/16"}),
        )
        .await;
        assert_eq!((s, v["PoolID"].as_str()), (200, Some("margay-ipv4:p1")));

        let (s, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Options": {"pool": "nope"}}),
        )
        .await;
        let err = v["Err"].as_str().unwrap();
        assert_eq!(s, 500);
        assert!(
            err.contains("no IPPool \"nope\"") && err.contains("p1 (10.65.0.0/16)"),
            "{err}"
        );
        let (_, v) = call(&p, "IpamDriver.RequestPool", json!({"Pool": "10.9.0.0/16"})).await;
        assert!(
            v["Err"].as_str().unwrap().contains("--subnet 10.9.0.0/16"),
            "{v}"
        );
        let (_, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Pool": "10.65.0.0/16", "SubPool": "10.65.1.0/24"}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("--ip-range"), "{v}");
        let (_, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Options": {"color": "red"}}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("\"color\""), "{v}");
        let (_, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Options": {"pool": "p1"}, "V6": true}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("IPv4 pool"), "{v}");
        let (_, v) = call(&p, "IpamDriver.RequestPool", json!({"V6": true})).await;
        assert!(
            v["Err"].as_str().unwrap().contains("no usable IPv6 IPPool"),
            "{v}"
        );
    }

    #[tokio::test]
    async fn addresses_come_and_go_by_handle() {
        let p = plugin(fake());
        let (s, v) = call(
            &p,
            "IpamDriver.RequestAddress",
            json!({"PoolID": "margay-ipv4:p1"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["Address"], "10.65.1.2/32");
        let assigned = p.backend.assigned.lock().unwrap().clone();
        let (handle, _) = assigned.iter().next().unwrap();
        assert!(handle.starts_with("docker."), "{handle}");
        // The gateway request is refused: Docker got the gateway from RequestPool.
        let (_, v) = call(
            &p,
            "IpamDriver.RequestAddress",
            json!({"PoolID": "margay-ipv4", "Options": {"RequestAddressType": GATEWAY_DATA}}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("--gateway"), "{v}");
        let (_, v) = call(
            &p,
            "IpamDriver.RequestAddress",
            json!({"PoolID": "default-pool"}),
        )
        .await;
        assert!(
            v["Err"]
                .as_str()
                .unwrap()
                .contains("not handed out by margay"),
            "{v}"
        );
        // Release is idempotent.
        for _ in 0..2 {
            let (s, _) = call(
                &p,
                "IpamDriver.ReleaseAddress",
                json!({"PoolID": "margay-ipv4:p1", "Address": "10.65.1.2"}),
            )
            .await;
            assert_eq!(s, 200);
        }
        assert!(p.backend.assigned.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn exhausted_and_etcd_down_say_so_and_keep_nothing() {
        let f = fake();
        f.free.lock().unwrap().clear();
        let p = plugin(f);
        let (s, v) = call(
            &p,
            "IpamDriver.RequestAddress",
            json!({"PoolID": "margay-ipv4"}),
        )
        .await;
        assert_eq!(s, 500);
        assert!(
            v["Err"].as_str().unwrap().contains("no free address"),
            "{v}"
        );
        let p = plugin(Fake {
            etcd_down: true,
            ..fake()
        });
        let (_, v) = call(
            &p,
            "IpamDriver.RequestAddress",
            json!({"PoolID": "margay-ipv4"}),
        )
        .await;
        let err = v["Err"].as_str().unwrap();
        assert!(
            err.contains("etcd is not reachable") && err.contains("nothing was allocated"),
            "{err}"
        );
        let (_, v) = call(
            &p,
            "IpamDriver.RequestPool",
            json!({"Options": {"pool": "p1"}}),
        )
        .await;
        assert!(
            v["Err"].as_str().unwrap().contains("etcd is not reachable"),
            "{v}"
        );
        assert!(p.backend.assigned.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn endpoint_lifecycle_is_pod_like_and_idempotent() {
        let p = plugin(fake());
        let ep = "0123456789abcdef0123456789abcdef";
        let (s, v) = call(
            &p,
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n", "EndpointID": ep, "Interface": {"Address": "10.65.1.2/32"}}),
        )
        .await;
        assert_eq!((s, &v), (200, &json!({})));
        let (s, v) = call(
            &p,
            "NetworkDriver.Join",
            json!({"NetworkID": "n", "EndpointID": ep, "SandboxKey": "/x"}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let wid = workload_id(ep);
        assert_eq!(v["InterfaceName"]["SrcName"], peer_ifname(&wid));
        assert_eq!(v["InterfaceName"]["DstPrefix"], "eth");
        assert_eq!(v["Gateway"], "169.254.1.1");
        assert!(v.get("GatewayIPv6").is_none(), "{v}");
        assert_eq!(
            v["StaticRoutes"],
            json!([{"Destination": "169.254.1.1/32", "RouteType": 1}])
        );
        assert_eq!(v["DisableGatewayService"], true);
        for m in [
            "NetworkDriver.Leave",
            "NetworkDriver.DeleteEndpoint",
            "NetworkDriver.DeleteEndpoint",
        ] {
            let (s, _) = call(&p, m, json!({"NetworkID": "n", "EndpointID": ep})).await;
            assert_eq!(s, 200, "{m}");
        }
        assert!(p.backend.veths.lock().unwrap().is_empty());
        // Join of an endpoint without a veth names the missing interface.
        let (s, v) = call(
            &p,
            "NetworkDriver.Join",
            json!({"NetworkID": "n", "EndpointID": ep}),
        )
        .await;
        assert_eq!(s, 500);
        assert!(
            v["Err"].as_str().unwrap().contains(&host_ifname(&wid)),
            "{v}"
        );
    }

    #[tokio::test]
    async fn endpoint_refusals_leave_no_veth() {
        let p = plugin(fake());
        let (_, v) = call(
            &p,
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n", "EndpointID": "e1", "Interface": {}}),
        )
        .await;
        assert!(
            v["Err"].as_str().unwrap().contains("--ipam-driver margay"),
            "{v}"
        );
        let p = plugin(Fake {
            plumb_fails: true,
            ..fake()
        });
        let (s, v) = call(
            &p,
            "NetworkDriver.CreateEndpoint",
            json!({"NetworkID": "n", "EndpointID": "e1", "Interface": {"Address": "10.65.1.2/32"}}),
        )
        .await;
        assert_eq!(s, 500);
        assert!(
            v["Err"].as_str().unwrap().contains("netlink says no"),
            "{v}"
        );
        assert!(p.backend.veths.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn networks_must_use_margay_ipam_and_are_announced() {
        let p = plugin(fake());
        let (s, v) = call(
            &p,
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "abc", "Options": {"com.docker.network.generic": {}},
                   "IPv4Data": [{"AddressSpace": "MargayLocal", "Pool": "0.0.0.0/0", "Gateway": "0.0.0.0/0"}]}),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let (_, v) = call(
            &p,
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "def", "IPv4Data": [{"AddressSpace": "LocalDefault", "Pool": "172.18.0.0/16", "Gateway": "172.18.0.1/16"}]}),
        )
        .await;
        assert!(
            v["Err"].as_str().unwrap().contains("--ipam-driver margay"),
            "{v}"
        );
        let (_, v) = call(
            &p,
            "NetworkDriver.CreateNetwork",
            json!({"NetworkID": "ghi", "Options": {"com.docker.network.generic": {"mtu": "1400"}}}),
        )
        .await;
        assert!(v["Err"].as_str().unwrap().contains("-o mtu"), "{v}");
        let (s, _) = call(
            &p,
            "NetworkDriver.DeleteNetwork",
            json!({"NetworkID": "abc"}),
        )
        .await;
        assert_eq!(s, 200);
        assert_eq!(
            *p.backend.events.lock().unwrap(),
            vec!["created abc", "deleted abc"]
        );
    }

    #[test]
    fn pool_ids_round_trip() {
        for id in [
            PoolId {
                v6: false,
                pool: None,
            },
            PoolId {
                v6: true,
                pool: Some("p-1".into()),
            },
        ] {
            assert_eq!(PoolId::parse(&id.encode()), Some(id));
        }
        assert_eq!(PoolId::parse("margay-ipv4:"), None);
        assert_eq!(PoolId::parse("CalicoPoolIPv4"), None);
    }
}
