//! A test backend that really plumbs a pod with `ip`: a veth from the node namespace into the pod's, the
//! pod's /32 and its routes via 169.254.1.1, the host /32 route. One pod address (10.78.0.1) per backend.
#![allow(dead_code)]

use std::path::Path;

use margay::cni::backend::{
    Attachment, CniBackend, DelRequest, GcRequest, PodRequest, StatusRequest,
};
use margay::cni::types::{cidr, CniError, Dns, Route};
use serde_json::Value;

use crate::common::try_sh;

/// A backend that really plumbs the pod, with `ip`, in the node namespace.
pub struct VethBackend {
    pub node: String,
}

fn ip(args: &str) -> Result<String, CniError> {
    let (ok, out) = try_sh(&format!("ip {args}"));
    if ok {
        Ok(out)
    } else {
        Err(CniError::internal(format!("ip {args}: {out}")))
    }
}

impl VethBackend {
    pub fn host_if(container: &str) -> String {
        // Short, unique per test process and container: names stay under IFNAMSIZ.
        let tag: String = container.chars().take(4).collect();
        format!("mgt{}{tag}", std::process::id() % 100000)
    }

    fn attachment(&self, req: &PodRequest, netns_name: &str) -> Result<Attachment, CniError> {
        let host = Self::host_if(&req.container_id);
        let mac = |ns: &str, dev: &str| -> Result<String, CniError> {
            let j: Value = serde_json::from_str(&ip(&format!("-n {ns} -j link show {dev}"))?)
                .map_err(|e| CniError::internal(e.to_string()))?;
            Ok(j[0]["address"].as_str().unwrap_or_default().to_string())
        };
        Ok(Attachment {
            host_ifname: host.clone(),
            host_mac: Some(mac(&self.node, &host)?),
            pod_ifname: req.ifname.clone(),
            pod_mac: Some(mac(netns_name, &req.ifname)?),
            mtu: Some(1500),
            ips: vec![cidr::host("10.78.0.1".parse().unwrap())],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        })
    }
}

fn netns_name(path: &Path) -> String {
    path.file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default()
}

impl CniBackend for VethBackend {
    async fn add(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let pod = netns_name(&req.netns);
        let host = Self::host_if(&req.container_id);
        let n = &self.node;
        ip(&format!(
            "-n {n} link add {host} type veth peer name {} netns {pod}",
            req.ifname
        ))?;
        ip(&format!("-n {n} link set {host} up"))?;
        ip(&format!("-n {pod} link set {} up", req.ifname))?;
        ip(&format!(
            "-n {pod} addr add 10.78.0.1/32 dev {}",
            req.ifname
        ))?;
        ip(&format!(
            "-n {pod} route add 169.254.1.1 dev {} scope link",
            req.ifname
        ))?;
        ip(&format!("-n {pod} route add default via 169.254.1.1"))?;
        ip(&format!(
            "-n {n} route add 10.78.0.1/32 dev {host} scope link"
        ))?;
        self.attachment(&req, &pod)
    }

    async fn del(&self, req: DelRequest) -> Result<(), CniError> {
        let host = Self::host_if(&req.container_id);
        // Already gone is fine: DEL is idempotent.
        let _ = ip(&format!("-n {} link del {host}", self.node));
        Ok(())
    }

    async fn check(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let pod = netns_name(&req.netns);
        self.attachment(&req, &pod)
    }

    async fn status(&self, _req: StatusRequest) -> Result<(), CniError> {
        Ok(())
    }

    async fn gc(&self, _req: GcRequest) -> Result<(), CniError> {
        Ok(())
    }
}
