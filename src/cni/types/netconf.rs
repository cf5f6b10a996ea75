//! The network configuration and `CNI_ARGS` the shim reads, parsed and validated (addresses, pool references,
//! log level, GC's valid attachments).

#[allow(unused_imports)]
use super::*;

/// Addresses with a prefix length, as CNI writes them (`10.65.0.7/32`, `fd00::5/128`), are
/// `ipnetwork::IpNetwork` (host bits may be set: an interface address; [`cidr::is_network`] tells whether
/// it is a clean prefix). What CNI needs beyond ipnetwork is here: a parser that insists on the prefix
/// length (ipnetwork reads a bare address as a host prefix, CNI's Go `ParseCIDR` refuses it) with messages
/// naming the bad part, and serde with that parser (`#[serde(with = "cidr")]`). Written with `Display`,
/// which is `ADDRESS/PREFIX` as before, so the JSON is unchanged.
pub mod cidr {
    use std::net::IpAddr;

    use ipnetwork::IpNetwork;
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    /// `ADDRESS/PREFIX`, both parts required.
    pub fn parse(s: &str) -> Result<IpNetwork, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        IpNetwork::new(addr, prefix)
            .map_err(|_| format!("{s:?}: prefix length {prefix} is longer than {max}"))
    }

    /// A host route / single address: /32 or /128.
    pub fn host(addr: IpAddr) -> IpNetwork {
        IpNetwork::from(addr)
    }

    /// The default route of a family: `0.0.0.0/0` or `::/0`.
    pub fn default_route(v6: bool) -> IpNetwork {
        let addr = if v6 {
            IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
        } else {
            IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
        };
        IpNetwork::new(addr, 0).expect("a prefix length of 0 is valid in both families")
    }

    /// True when no host bits are set (a pool or route destination).
    pub fn is_network(c: &IpNetwork) -> bool {
        c.network() == c.ip()
    }

    pub fn serialize<S: Serializer>(c: &IpNetwork, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(c)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<IpNetwork, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).map_err(D::Error::custom)
    }
}

/// A pool a pod may draw from: a CIDR, or the name of an IPPool resource (as Calico's `ipv4_pools` allows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolRef {
    Cidr(#[serde(with = "cidr")] IpNetwork),
    Name(String),
}

impl PoolRef {
    /// Parse one entry of `ipv4_pools` / `ipv6_pools`; `v6` says which list it came from.
    fn parse(field: &str, s: &str, v6: bool) -> Result<PoolRef, CniError> {
        if s.contains('/') {
            let c =
                cidr::parse(s).map_err(|e| CniError::invalid_config(format!("{field}: {e}")))?;
            if c.is_ipv6() != v6 {
                return Err(CniError::invalid_config(format!(
                    "{field}: {s:?} is an IPv{} CIDR in the IPv{} list",
                    if v6 { 4 } else { 6 },
                    if v6 { 6 } else { 4 }
                )));
            }
            if !cidr::is_network(&c) {
                return Err(CniError::invalid_config(format!(
                    "{field}: {s:?} has host bits set; write the pool's network address"
                )));
            }
            Ok(PoolRef::Cidr(c))
        } else if is_resource_name(s) {
            Ok(PoolRef::Name(s.to_string()))
        } else {
            Err(CniError::invalid_config(format!(
                "{field}: {s:?} is neither a CIDR nor an IPPool name"
            )))
        }
    }
}

impl fmt::Display for PoolRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PoolRef::Cidr(c) => c.fmt(f),
            PoolRef::Name(n) => f.write_str(n),
        }
    }
}

/// A Kubernetes object name (RFC 1123 subdomain): what an IPPool can be called.
pub(super) fn is_resource_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric()
}

/// Log levels of the shim's optional log file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Error,
    Warn,
    Info,
    Debug,
}

impl FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<LogLevel, String> {
        match s.to_ascii_lowercase().as_str() {
            "error" => Ok(LogLevel::Error),
            "warn" | "warning" => Ok(LogLevel::Warn),
            "info" => Ok(LogLevel::Info),
            "debug" => Ok(LogLevel::Debug),
            _ => Err(format!("{s:?} is not one of error, warn, info, debug")),
        }
    }
}

impl LogLevel {
    pub fn as_str(self) -> &'static str {
        match self {
            LogLevel::Error => "ERROR",
            LogLevel::Warn => "WARN",
            LogLevel::Info => "INFO",
            LogLevel::Debug => "DEBUG",
        }
    }
}

/// One attachment the runtime still uses (spec 1.1 GC: `cni.dev/valid-attachments`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidAttachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration margay reads from stdin, parsed and validated (spec section 1; the runtime has
/// already flattened the conflist into one plugin's configuration and added `name`, `cniVersion`,
/// `prevResult` and `runtimeConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    pub cni_version: CniVersion,
    /// The network name (the conflist's `name`).
    pub name: String,
    /// MTU of the pod interface; `None` lets the daemon choose.
    pub mtu: Option<u32>,
    /// The daemon's socket.
    pub socket: String,
    /// Pools this network draws from instead of the node's defaults (`ipv4_pools`, or Calico's
    /// `ipam.ipv4_pools`).
    pub ipv4_pools: Vec<PoolRef>,
    pub ipv6_pools: Vec<PoolRef>,
    /// The shim appends one line per call here when set.
    pub log_file: Option<String>,
    pub log_level: LogLevel,
    /// How long the shim waits for the daemon's answer.
    pub timeout_seconds: Option<u64>,
    /// `prevResult`, already converted to margay's version-neutral model.
    pub prev_result: Option<CniResult>,
    /// `runtimeConfig` (capability arguments such as `ips`, `mac`, `portMappings`), passed through as is.
    pub runtime_config: Option<Value>,
    /// GC only: the attachments the runtime still uses.
    pub valid_attachments: Option<Vec<ValidAttachment>>,
    /// `"mode": "host-veth"`: margay is a later plugin in a chain whose first plugin made the pod's
    /// interface (macvlan, ipvlan); it adds only a veth from the pod to the node. None: the usual mode.
    pub host_veth: Option<HostVethConf>,
}

/// The chained underlay mode (`"mode": "host-veth"`): a veth pair from the pod to the node, routes in the
/// pod for the node's addresses, the cluster's service CIDRs and `extra_routes` through it, a host route to
/// the pod's underlay address through it. No IPAM: the addresses are the previous plugin's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostVethConf {
    /// The veth's name inside the pod (`CNI_IFNAME` is the previous plugin's interface).
    pub veth_name: String,
    /// Destinations routed through the veth besides the node's addresses and the service CIDRs.
    #[serde(default, with = "cidrs")]
    pub extra_routes: Vec<IpNetwork>,
    /// Route the BGPConfiguration's service CIDRs through the veth (default true).
    #[serde(default = "yes")]
    pub service_routes: bool,
}

fn yes() -> bool {
    true
}

/// [`cidr`]'s serde for a list.
mod cidrs {
    use ipnetwork::IpNetwork;
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[IpNetwork], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for c in v {
            seq.serialize_element(&c.to_string())?;
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNetwork>, D::Error> {
        #[derive(Deserialize)]
        struct One(#[serde(with = "super::cidr")] IpNetwork);
        Ok(Vec::<One>::deserialize(d)?
            .into_iter()
            .map(|o| o.0)
            .collect())
    }
}

/// The veth's default name inside the pod in host-veth mode.
pub const DEFAULT_HOST_VETH_NAME: &str = "veth0";

impl HostVethConf {
    /// Parse the host-veth keys of a configuration object whose `mode` is `host-veth`.
    fn parse(obj: &Map<String, Value>) -> Result<HostVethConf, CniError> {
        let veth_name = match obj.get("veth_name") {
            None | Some(Value::Null) => DEFAULT_HOST_VETH_NAME.to_string(),
            Some(Value::String(n)) => n.clone(),
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"veth_name\" must be a string, not {other}"
                )))
            }
        };
        validate_ifname(&veth_name)
            .map_err(|e| CniError::invalid_config(format!("field \"veth_name\": {}", e.msg)))?;
        let extra_routes = match obj.get("extra_routes") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a
                .iter()
                .map(|e| {
                    let s = e.as_str().ok_or_else(|| {
                        CniError::invalid_config(format!(
                            "field \"extra_routes\": {e} is not a string"
                        ))
                    })?;
                    let c = cidr::parse(s).map_err(|e| {
                        CniError::invalid_config(format!("field \"extra_routes\": {e}"))
                    })?;
                    if !cidr::is_network(&c) {
                        return Err(CniError::invalid_config(format!(
                            "field \"extra_routes\": {s:?} has host bits set; write the network address"
                        )));
                    }
                    Ok(c)
                })
                .collect::<Result<_, _>>()?,
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"extra_routes\" must be a list of CIDR strings, not {other}"
                )))
            }
        };
        let service_routes = match obj.get("service_routes") {
            None | Some(Value::Null) => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"service_routes\" must be true or false, not {other}"
                )))
            }
        };
        Ok(HostVethConf {
            veth_name,
            extra_routes,
            service_routes,
        })
    }
}

/// Longest `timeout_seconds` accepted: kubelet's own runtime request timeout is 2 minutes.
pub(super) const MAX_TIMEOUT_SECONDS: u64 = 600;

impl NetConf {
    /// Parse stdin. Bad JSON is error 6, a wrong field error 7, an unknown `cniVersion` error 1. The spec says
    /// plugins ignore fields they do not know, so unknown keys pass.
    pub fn parse(bytes: &[u8]) -> Result<NetConf, CniError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| {
            CniError::new(
                codes::DECODING_FAILURE,
                format!("network configuration on stdin is not JSON: {e}"),
                "",
            )
        })?;
        let obj = v.as_object().ok_or_else(|| {
            CniError::new(
                codes::DECODING_FAILURE,
                "network configuration on stdin is not a JSON object",
                "",
            )
        })?;
        let s = |k: &str| -> Result<Option<&str>, CniError> {
            match obj.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s)),
                Some(other) => Err(CniError::invalid_config(format!(
                    "field {k:?} must be a string, not {other}"
                ))),
            }
        };
        let version_str = s("cniVersion")?
            .ok_or_else(|| CniError::invalid_config("field \"cniVersion\" is missing"))?;
        let cni_version: CniVersion = version_str.parse()?;
        let name = s("name")?
            .filter(|n| !n.is_empty())
            .ok_or_else(|| CniError::invalid_config("field \"name\" is missing or empty"))?
            .to_string();
        match s("type")? {
            Some(PLUGIN_TYPE | PLUGIN_TYPE_ALIAS) => {}
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"type\" is {other:?}; margay-cni handles type \"margay\""
                )))
            }
            None => return Err(CniError::invalid_config("field \"type\" is missing")),
        }
        let mtu = match obj.get("mtu") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                // 0 means "let the daemon choose", as Calico's veth_mtu "0" does.
                Some(0) => None,
                Some(m) if (576..=65535).contains(&m) => Some(m as u32),
                _ => {
                    return Err(CniError::invalid_config(format!(
                        "field \"mtu\" is {n}; use 576..65535, or 0 to let the daemon choose"
                    )))
                }
            },
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"mtu\" must be a number, not {other}"
                )))
            }
        };
        let socket = s("socket")?.unwrap_or(DEFAULT_SOCKET).to_string();
        if !socket.starts_with('/') {
            return Err(CniError::invalid_config(format!(
                "field \"socket\" is {socket:?}; it must be an absolute path"
            )));
        }
        let ipam = obj.get("ipam").and_then(Value::as_object);
        let pools = |key: &str, v6: bool| -> Result<Vec<PoolRef>, CniError> {
            let (field, list) = match (obj.get(key), ipam.and_then(|i| i.get(key))) {
                (Some(l), _) => (key.to_string(), l),
                (None, Some(l)) => (format!("ipam.{key}"), l),
                (None, None) => return Ok(Vec::new()),
            };
            let arr = list.as_array().ok_or_else(|| {
                CniError::invalid_config(format!("field {field:?} must be a list of strings"))
            })?;
            arr.iter()
                .map(|e| match e {
                    Value::String(s) => PoolRef::parse(&field, s, v6),
                    other => Err(CniError::invalid_config(format!(
                        "field {field:?}: {other} is not a string"
                    ))),
                })
                .collect()
        };
        let ipv4_pools = pools("ipv4_pools", false)?;
        let ipv6_pools = pools("ipv6_pools", true)?;
        let log_file = s("log_file")?.map(str::to_string);
        let log_level = match s("log_level")? {
            None => LogLevel::Info,
            Some(l) => l
                .parse()
                .map_err(|e| CniError::invalid_config(format!("field \"log_level\": {e}")))?,
        };
        let timeout_seconds = match obj.get("timeout_seconds") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_u64() {
                Some(t) if (1..=MAX_TIMEOUT_SECONDS).contains(&t) => Some(t),
                _ => {
                    return Err(CniError::invalid_config(format!(
                        "field \"timeout_seconds\" is {v}; use 1..{MAX_TIMEOUT_SECONDS}"
                    )))
                }
            },
        };
        let prev_result = match obj.get("prevResult") {
            None | Some(Value::Null) => None,
            Some(v) => Some(CniResult::decode(v).map_err(|e| {
                CniError::new(
                    codes::DECODING_FAILURE,
                    format!("field \"prevResult\": {e}"),
                    "",
                )
            })?),
        };
        let runtime_config = obj.get("runtimeConfig").cloned();
        let valid_attachments = match obj.get("cni.dev/valid-attachments") {
            None | Some(Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value::<Vec<ValidAttachment>>(v.clone()).map_err(|e| {
                    CniError::invalid_config(format!("field \"cni.dev/valid-attachments\": {e}"))
                })?,
            ),
        };
        let host_veth = match s("mode")? {
            None | Some("primary") => {
                for k in ["veth_name", "extra_routes", "service_routes"] {
                    if obj.contains_key(k) {
                        return Err(CniError::invalid_config(format!(
                            "field {k:?} belongs to \"mode\": \"host-veth\"; this configuration has no mode (margay as the primary plugin)"
                        )));
                    }
                }
                None
            }
            Some("host-veth") => {
                if !ipv4_pools.is_empty() || !ipv6_pools.is_empty() {
                    return Err(CniError::invalid_config(
                        "\"mode\": \"host-veth\" takes no ipv4_pools/ipv6_pools: the pod's addresses come from the previous plugin in the chain (margay does no IPAM in this mode)",
                    ));
                }
                Some(HostVethConf::parse(obj)?)
            }
            Some(other) => {
                return Err(CniError::invalid_config(format!(
                    "field \"mode\" is {other:?}; use \"host-veth\" (a later plugin in a chain after macvlan/ipvlan) or leave it out"
                )))
            }
        };
        Ok(NetConf {
            host_veth,
            cni_version,
            name,
            mtu,
            socket,
            ipv4_pools,
            ipv6_pools,
            log_file,
            log_level,
            timeout_seconds,
            prev_result,
            runtime_config,
            valid_attachments,
        })
    }
}

/// The keys of `CNI_ARGS` margay understands (set by kubelet/containerd/CRI-O/podman).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniArgs {
    pub k8s_pod_namespace: Option<String>,
    pub k8s_pod_name: Option<String>,
    pub k8s_pod_infra_container_id: Option<String>,
    pub k8s_pod_uid: Option<String>,
    /// Keys we did not know, kept (and otherwise ignored) because `IgnoreUnknown` was set.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ignored: BTreeMap<String, String>,
}

impl CniArgs {
    /// Parse `K1=V1;K2=V2`. As libcni's `LoadArgs` does: a pair without exactly one `=` is an error, and a
    /// key margay does not know is an error unless `IgnoreUnknown` is `1`/`true` (anywhere in the list).
    /// Empty segments (a trailing `;`) are skipped. Errors are code 4 and name the key.
    pub fn parse(s: &str) -> Result<CniArgs, CniError> {
        let mut pairs = Vec::new();
        for seg in s.split(';').filter(|seg| !seg.trim().is_empty()) {
            let mut it = seg.split('=');
            match (it.next(), it.next(), it.next()) {
                (Some(k), Some(v), None) if !k.is_empty() => pairs.push((k, v)),
                _ => {
                    return Err(CniError::invalid_env(format!(
                        "CNI_ARGS: invalid pair {seg:?}: expected KEY=VALUE"
                    )))
                }
            }
        }
        let mut ignore_unknown = false;
        for (k, v) in &pairs {
            if *k == "IgnoreUnknown" {
                ignore_unknown = match v.to_ascii_lowercase().as_str() {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => {
                        return Err(CniError::invalid_env(format!(
                            "CNI_ARGS: IgnoreUnknown={v:?} is not 1, 0, true or false"
                        )))
                    }
                };
            }
        }
        let mut args = CniArgs::default();
        let mut unknown = Vec::new();
        for (k, v) in pairs {
            let v = v.to_string();
            match k {
                "IgnoreUnknown" => {}
                "K8S_POD_NAMESPACE" => args.k8s_pod_namespace = Some(v),
                "K8S_POD_NAME" => args.k8s_pod_name = Some(v),
                "K8S_POD_INFRA_CONTAINER_ID" => args.k8s_pod_infra_container_id = Some(v),
                "K8S_POD_UID" => args.k8s_pod_uid = Some(v),
                other if ignore_unknown => {
                    args.ignored.insert(other.to_string(), v);
                }
                other => unknown.push(other.to_string()),
            }
        }
        if !unknown.is_empty() {
            return Err(CniError::new(
                codes::INVALID_ENVIRONMENT,
                format!("CNI_ARGS: unknown key(s) {}", unknown.join(", ")),
                "margay-cni knows K8S_POD_NAMESPACE, K8S_POD_NAME, K8S_POD_INFRA_CONTAINER_ID, \
                 K8S_POD_UID; add IgnoreUnknown=1 to CNI_ARGS to pass others",
            ));
        }
        Ok(args)
    }
}
