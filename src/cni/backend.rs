//! The contract between the CNI socket server and the parts that do the work (IPAM, pod plumbing, route
//! advertisement): the [`CniBackend`] trait and its typed requests and answers.
//!
//! The server has already validated the CNI environment, parsed `CNI_ARGS`, serialized requests for the same
//! container, and applied the per-request deadline; a backend only does the work. The server, not the
//! backend, turns an [`Attachment`] into the CNI result (so the result always has the shape chained plugins
//! need) and compares CHECK's `prevResult` against it.

use std::future::Future;
use std::net::IpAddr;
use std::path::PathBuf;

use serde_json::Value;

use super::proto::Request;
use super::types::{
    codes, CniError, CniResult, Dns, Interface, IpConfig, PoolRef, Route, ValidAttachment,
};

/// The Kubernetes pod a request is for (from `CNI_ARGS`); absent for runtimes outside Kubernetes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: Option<String>,
    pub infra_container_id: Option<String>,
}

/// ADD and CHECK: one interface of one container.
#[derive(Debug, Clone, PartialEq)]
pub struct PodRequest {
    /// CNI_CONTAINERID.
    pub container_id: String,
    /// CNI_NETNS: `/var/run/netns/NAME` or `/proc/PID/ns/net`.
    pub netns: PathBuf,
    /// CNI_IFNAME: the interface to create inside the pod (usually `eth0`).
    pub ifname: String,
    /// The network name of the configuration.
    pub network: String,
    pub pod: Option<PodRef>,
    /// The configuration's MTU; `None`: the backend chooses (host MTU minus encapsulation).
    pub mtu: Option<u32>,
    /// Pools overriding the node's defaults; empty: the defaults.
    pub ipv4_pools: Vec<PoolRef>,
    pub ipv6_pools: Vec<PoolRef>,
    /// `runtimeConfig` as the runtime sent it (capability arguments such as `ips` or `mac`).
    pub runtime_config: Option<Value>,
}

/// DEL: release everything of one interface of one container. Must succeed when there is nothing to do.
#[derive(Debug, Clone, PartialEq)]
pub struct DelRequest {
    pub container_id: String,
    /// Absent when the runtime has already removed the namespace.
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub network: String,
    pub pod: Option<PodRef>,
}

/// STATUS (spec 1.1): can the node serve ADD now?
#[derive(Debug, Clone, PartialEq)]
pub struct StatusRequest {
    pub network: String,
}

/// GC (spec 1.1): release every attachment of `network` that is not in `valid_attachments`.
#[derive(Debug, Clone, PartialEq)]
pub struct GcRequest {
    pub network: String,
    pub valid_attachments: Vec<ValidAttachment>,
}

/// What ADD built (and what CHECK finds): the veth pair and the pod's addresses and routes.
#[derive(Debug, Clone, PartialEq)]
pub struct Attachment {
    /// The host side of the veth, e.g. `mg0123456789a`.
    pub host_ifname: String,
    pub host_mac: Option<String>,
    /// The pod side, named as the request's `ifname`.
    pub pod_ifname: String,
    pub pod_mac: Option<String>,
    pub mtu: Option<u32>,
    /// The pod's addresses with their prefix length as configured on the interface (`/32`, `/128`).
    pub ips: Vec<ipnetwork::IpNetwork>,
    /// Routes inside the pod (e.g. `0.0.0.0/0 via 169.254.1.1`).
    pub routes: Vec<Route>,
    pub dns: Dns,
}

impl Attachment {
    /// The CNI result: `interfaces[0]` the host veth (no sandbox), `interfaces[1]` the pod interface with
    /// `sandbox` = the netns path, every `ips[]` entry pointing at index 1. portmap needs an address on the
    /// sandbox interface; bandwidth needs the host peer listed without a sandbox.
    pub fn to_result(&self, netns: &str) -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: self.host_ifname.clone(),
                    mac: self.host_mac.clone(),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: self.pod_ifname.clone(),
                    mac: self.pod_mac.clone(),
                    mtu: self.mtu,
                    sandbox: Some(netns.to_string()),
                },
            ],
            ips: self
                .ips
                .iter()
                .map(|a| IpConfig {
                    address: *a,
                    gateway: None,
                    interface: Some(1),
                })
                .collect(),
            routes: self.routes.clone(),
            dns: self.dns.clone(),
        }
    }

    /// The pod's addresses without prefix lengths.
    pub fn addresses(&self) -> Vec<IpAddr> {
        self.ips.iter().map(|c| c.ip()).collect()
    }
}

/// Host-veth mode (a later plugin in a chain after macvlan/ipvlan), ADD and CHECK: the veth to build or
/// verify for one container. The pod's addresses are the previous plugin's (from `prevResult`).
#[derive(Debug, Clone, PartialEq)]
pub struct HostVethRequest {
    pub container_id: String,
    pub netns: PathBuf,
    /// CNI_IFNAME: the previous plugin's interface (left alone).
    pub ifname: String,
    pub network: String,
    pub pod: Option<PodRef>,
    /// The pod's addresses on `ifname`, from `prevResult`.
    pub pod_ips: Vec<IpAddr>,
    pub conf: super::types::HostVethConf,
    pub mtu: Option<u32>,
}

impl HostVethRequest {
    /// Names the host end of the veth (as for primary pods, plus the veth's name inside the pod).
    pub fn workload_id(&self) -> String {
        format!(
            "{}.hv.{}",
            workload_id(self.pod.as_ref(), &self.container_id, &self.ifname),
            self.conf.veth_name
        )
    }
}

/// Host-veth mode, DEL: remove the veth of one container (and the host routes through it).
#[derive(Debug, Clone, PartialEq)]
pub struct HostVethDel {
    pub del: DelRequest,
    pub veth_name: String,
}

impl HostVethDel {
    pub fn workload_id(&self) -> String {
        format!("{}.hv.{}", self.del.workload_id(), self.veth_name)
    }
}

/// What host-veth ADD built (and CHECK found): the two ends of the veth and the routes through it.
#[derive(Debug, Clone, PartialEq)]
pub struct HostVethAttachment {
    pub host_ifname: String,
    pub host_mac: Option<String>,
    pub pod_ifname: String,
    pub pod_mac: Option<String>,
    /// Destinations routed through the veth inside the pod (node addresses, service CIDRs, extras).
    pub pod_routes: Vec<Route>,
}

/// The work behind the CNI socket, implemented by the node (IPAM + dataplane + BGP) and by tests.
///
/// Contract:
/// - ADD is idempotent for the same `container_id` + `ifname` (a retried ADD returns the same attachment),
///   and on failure leaves nothing behind (addresses released, veth removed).
/// - DEL releases everything for `container_id` + `ifname` and succeeds when there is nothing to release.
/// - CHECK verifies the kernel and the datastore still hold what ADD made and returns it; the server then
///   compares it with `prevResult`.
/// - Calls for the same container never overlap (the server serializes them); GC never overlaps anything.
/// - A call that outlives the server's `abandon_after` is dropped at an `.await`: keep state consistent at
///   every await point (a later DEL must be able to clean up).
///
/// Errors are CNI errors: use the spec's codes where one fits (11 for a transient condition such as etcd
/// unreachable, 7 for a bad pool override) and [`codes`] from 100 up for margay's own.
pub trait CniBackend: Send + Sync + 'static {
    fn add(&self, req: PodRequest) -> impl Future<Output = Result<Attachment, CniError>> + Send;
    fn del(&self, req: DelRequest) -> impl Future<Output = Result<(), CniError>> + Send;
    fn check(&self, req: PodRequest) -> impl Future<Output = Result<Attachment, CniError>> + Send;
    fn status(&self, req: StatusRequest) -> impl Future<Output = Result<(), CniError>> + Send;
    fn gc(&self, req: GcRequest) -> impl Future<Output = Result<(), CniError>> + Send;

    /// Host-veth mode ADD: idempotent; on failure nothing of it is left.
    fn host_veth_add(
        &self,
        req: HostVethRequest,
    ) -> impl Future<Output = Result<HostVethAttachment, CniError>> + Send {
        async move { Err(host_veth_unsupported(&req.container_id)) }
    }
    /// Host-veth mode DEL: removes exactly the veth (and its routes); succeeds when it is already gone.
    fn host_veth_del(&self, req: HostVethDel) -> impl Future<Output = Result<(), CniError>> + Send {
        async move { Err(host_veth_unsupported(&req.del.container_id)) }
    }
    /// Host-veth mode CHECK: the veth and every route of it are in place.
    fn host_veth_check(
        &self,
        req: HostVethRequest,
    ) -> impl Future<Output = Result<HostVethAttachment, CniError>> + Send {
        async move { Err(host_veth_unsupported(&req.container_id)) }
    }
}

fn host_veth_unsupported(container: &str) -> CniError {
    CniError::invalid_config(format!(
        "container {container:?}: this margay backend does not implement \"mode\": \"host-veth\""
    ))
}

impl PodRef {
    fn from_request(req: &Request) -> Option<PodRef> {
        match (&req.args.k8s_pod_namespace, &req.args.k8s_pod_name) {
            (Some(ns), Some(name)) if !ns.is_empty() && !name.is_empty() => Some(PodRef {
                namespace: ns.clone(),
                name: name.clone(),
                uid: req.args.k8s_pod_uid.clone(),
                infra_container_id: req.args.k8s_pod_infra_container_id.clone(),
            }),
            _ => None,
        }
    }
}

/// A required CNI variable, re-checked on the daemon side (anything may connect to the socket).
fn required(v: &Option<String>, name: &str, cmd: &str) -> Result<String, CniError> {
    match v {
        Some(s) if !s.is_empty() => Ok(s.clone()),
        _ => Err(CniError::new(
            codes::INVALID_ENVIRONMENT,
            format!("{cmd} needs {name}"),
            "",
        )),
    }
}

impl PodRequest {
    /// From a wire request (ADD or CHECK).
    pub fn from_request(req: &Request) -> Result<PodRequest, CniError> {
        let cmd = req.command.as_str();
        Ok(PodRequest {
            container_id: required(&req.container_id, "CNI_CONTAINERID", cmd)?,
            netns: PathBuf::from(required(&req.netns, "CNI_NETNS", cmd)?),
            ifname: required(&req.ifname, "CNI_IFNAME", cmd)?,
            network: req.network.clone(),
            pod: PodRef::from_request(req),
            mtu: req.mtu,
            ipv4_pools: req.ipv4_pools.clone(),
            ipv6_pools: req.ipv6_pools.clone(),
            runtime_config: req.runtime_config.clone(),
        })
    }

    /// The IPAM handle, as Calico names it: `<network>.<container id>`.
    pub fn handle_id(&self) -> String {
        handle_id(&self.network, &self.container_id)
    }

    /// The stable workload id the host veth name is derived from: `<namespace>.<pod>` for a Kubernetes pod's
    /// `eth0` (as Calico: the name survives sandbox re-creation), with `.<ifname>` appended for other
    /// interfaces; `<container id>.<ifname>` outside Kubernetes.
    pub fn workload_id(&self) -> String {
        workload_id(self.pod.as_ref(), &self.container_id, &self.ifname)
    }
}

impl DelRequest {
    pub fn from_request(req: &Request) -> Result<DelRequest, CniError> {
        Ok(DelRequest {
            container_id: required(&req.container_id, "CNI_CONTAINERID", "DEL")?,
            netns: req
                .netns
                .as_ref()
                .filter(|n| !n.is_empty())
                .map(PathBuf::from),
            ifname: required(&req.ifname, "CNI_IFNAME", "DEL")?,
            network: req.network.clone(),
            pod: PodRef::from_request(req),
        })
    }

    pub fn handle_id(&self) -> String {
        handle_id(&self.network, &self.container_id)
    }

    pub fn workload_id(&self) -> String {
        workload_id(self.pod.as_ref(), &self.container_id, &self.ifname)
    }
}

fn handle_id(network: &str, container_id: &str) -> String {
    format!("{network}.{container_id}")
}

fn workload_id(pod: Option<&PodRef>, container_id: &str, ifname: &str) -> String {
    match pod {
        Some(p) if ifname == "eth0" => format!("{}.{}", p.namespace, p.name),
        Some(p) => format!("{}.{}.{ifname}", p.namespace, p.name),
        None => format!("{container_id}.{ifname}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cni::proto::Command;
    use crate::cni::types::{CniArgs, CniVersion, NetConf};

    fn wire(cmd: Command, args: &str) -> Request {
        let conf =
            NetConf::parse(br#"{"cniVersion":"1.0.0","name":"net1","type":"margay"}"#).unwrap();
        Request::new(
            cmd,
            Some("c1".into()),
            Some("/var/run/netns/p".into()),
            Some("eth0".into()),
            CniArgs::parse(args).unwrap(),
            &conf,
        )
    }

    #[test]
    fn ids_follow_calico() {
        let r =
            PodRequest::from_request(&wire(Command::Add, "K8S_POD_NAMESPACE=ns;K8S_POD_NAME=web"))
                .unwrap();
        assert_eq!(r.handle_id(), "net1.c1");
        assert_eq!(r.workload_id(), "ns.web");
        let r = PodRequest::from_request(&wire(Command::Add, "")).unwrap();
        assert_eq!(r.workload_id(), "c1.eth0");
    }

    #[test]
    fn missing_fields_are_code_4() {
        let mut w = wire(Command::Add, "");
        w.netns = None;
        let e = PodRequest::from_request(&w).unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_NETNS"));
        // DEL may come without a netns.
        let mut w = wire(Command::Del, "");
        w.netns = Some(String::new());
        assert_eq!(DelRequest::from_request(&w).unwrap().netns, None);
    }

    #[test]
    fn attachment_result_has_the_chain_shape() {
        let a = Attachment {
            host_ifname: "mgabc".into(),
            host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
            pod_ifname: "eth0".into(),
            pod_mac: Some("02:00:00:00:00:01".into()),
            mtu: Some(1500),
            ips: vec!["10.65.0.2/32".parse().unwrap()],
            routes: vec![],
            dns: Dns::default(),
        };
        let r = a.to_result("/var/run/netns/p").encode(CniVersion::V1_0_0);
        assert!(r["interfaces"][0].get("sandbox").is_none());
        assert_eq!(r["interfaces"][1]["sandbox"], "/var/run/netns/p");
        assert_eq!(r["ips"][0]["interface"], 1);
    }
}
