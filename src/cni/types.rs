//! CNI data model shared by the `margay-cni` shim and the daemon: spec versions, the network configuration a
//! runtime passes on stdin, `CNI_ARGS`, results in every version margay answers, and CNI error objects.
//!
//! This file must depend on nothing but `std`, `serde` and `serde_json`: the shim links it and must stay
//! small (no tokio, no etcd, no netlink). Everything here is pure data and parsing.
//!
//! References are to the CNI specification (`SPEC.md` of containernetworking/cni): section "Execution
//! Protocol" for the environment, "Section 1: Network configuration format", "Section 5: Result Types".

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

/// Where the daemon listens unless the network configuration says otherwise.
pub const DEFAULT_SOCKET: &str = "/var/run/margay/cni.sock";
/// The plugin `type` margay answers to. The runtime executes the file named by `type` in its CNI bin
/// directory, so the shim is installed there as `margay` (install-cni copies `margay-cni` to that name);
/// `margay-cni` is accepted too, for setups that install the binary under its own name.
pub const PLUGIN_TYPE: &str = "margay";
const PLUGIN_TYPE_ALIAS: &str = "margay-cni";

/// The CNI spec versions margay speaks. Results are encoded in the version of the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum CniVersion {
    V0_3_0,
    V0_3_1,
    V0_4_0,
    V1_0_0,
    V1_1_0,
}

impl CniVersion {
    /// Every version `VERSION` reports, oldest first.
    pub const ALL: [CniVersion; 5] = [
        CniVersion::V0_3_0,
        CniVersion::V0_3_1,
        CniVersion::V0_4_0,
        CniVersion::V1_0_0,
        CniVersion::V1_1_0,
    ];
    /// The newest version: used for errors when the configuration's own version is unknown.
    pub const LATEST: CniVersion = CniVersion::V1_1_0;

    pub fn as_str(self) -> &'static str {
        match self {
            CniVersion::V0_3_0 => "0.3.0",
            CniVersion::V0_3_1 => "0.3.1",
            CniVersion::V0_4_0 => "0.4.0",
            CniVersion::V1_0_0 => "1.0.0",
            CniVersion::V1_1_0 => "1.1.0",
        }
    }

    /// CHECK exists since spec 0.4.0.
    pub fn has_check(self) -> bool {
        self >= CniVersion::V0_4_0
    }

    /// STATUS and GC exist since spec 1.1.0.
    pub fn has_status_and_gc(self) -> bool {
        self >= CniVersion::V1_1_0
    }

    /// Results before 1.0.0 carry `"version": "4"|"6"` in each `ips[]` entry.
    fn ips_carry_version(self) -> bool {
        self < CniVersion::V1_0_0
    }
}

impl fmt::Display for CniVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for CniVersion {
    type Err = CniError;
    fn from_str(s: &str) -> Result<Self, CniError> {
        CniVersion::ALL
            .iter()
            .copied()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| {
                CniError::new(
                    codes::INCOMPATIBLE_CNI_VERSION,
                    format!("incompatible CNI version {s:?}"),
                    format!("margay-cni supports {}", supported_versions().join(", ")),
                )
            })
    }
}

/// The `supportedVersions` list of the VERSION answer.
pub fn supported_versions() -> Vec<&'static str> {
    CniVersion::ALL.iter().map(|v| v.as_str()).collect()
}

/// The spec's well-known error codes (section "Error"), plus margay's own from 100 up.
pub mod codes {
    pub const INCOMPATIBLE_CNI_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODING_FAILURE: u32 = 6;
    pub const INVALID_NETWORK_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    /// STATUS: the plugin cannot serve ADD now (spec 1.1).
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    /// STATUS: not available, and existing containers may have limited connectivity (spec 1.1).
    pub const PLUGIN_NOT_AVAILABLE_LIMITED: u32 = 51;
    /// margay: an internal failure in the daemon (the message says which part).
    pub const INTERNAL: u32 = 100;
    /// margay: the shim and the daemon speak different socket protocol versions.
    pub const PROTOCOL_MISMATCH: u32 = 101;
    /// margay: CHECK found the pod's network different from what ADD made.
    pub const CHECK_FAILED: u32 = 102;
    /// margay: no address left in the pools this pod may use.
    pub const IPAM_EXHAUSTED: u32 = 103;
}

/// A CNI error object: what the plugin prints on stdout when it fails (spec section "Error").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub details: String,
}

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// Code 7: the configuration is wrong; `msg` names the field and the value.
    pub fn invalid_config(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_NETWORK_CONFIG, msg, "")
    }

    /// Code 4: a CNI_* variable is missing or wrong; `msg` names it.
    pub fn invalid_env(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INVALID_ENVIRONMENT, msg, "")
    }

    /// Code 11: a transient condition; the runtime should retry.
    pub fn try_again(msg: impl Into<String>, details: impl Into<String>) -> CniError {
        CniError::new(codes::TRY_AGAIN_LATER, msg, details)
    }

    /// Code 100: the daemon failed; `msg` says where.
    pub fn internal(msg: impl Into<String>) -> CniError {
        CniError::new(codes::INTERNAL, msg, "")
    }

    /// The JSON object a plugin prints, `cniVersion` first.
    pub fn to_json(&self, version: &str) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(version.to_string()));
        m.insert("code".into(), Value::from(self.code));
        m.insert("msg".into(), Value::String(self.msg.clone()));
        if !self.details.is_empty() {
            m.insert("details".into(), Value::String(self.details.clone()));
        }
        Value::Object(m)
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// An address with a prefix length, as CNI writes them (`10.65.0.7/32`, `fd00::5/128`). Host bits may be set
/// (an interface address); [`Cidr::is_network`] tells whether it is a clean prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Cidr, String> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(format!("prefix length {prefix} is longer than {max}"));
        }
        Ok(Cidr { addr, prefix })
    }

    /// A host route / single address: /32 or /128.
    pub fn host(addr: IpAddr) -> Cidr {
        Cidr {
            addr,
            prefix: if addr.is_ipv4() { 32 } else { 128 },
        }
    }

    /// True when no host bits are set (a pool or route destination).
    pub fn is_network(&self) -> bool {
        match self.addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u32::MAX << (32 - self.prefix)
                };
                bits & !mask == 0
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = if self.prefix == 0 {
                    0
                } else {
                    u128::MAX << (128 - self.prefix)
                };
                bits & !mask == 0
            }
        }
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not ADDRESS/PREFIX"))?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| format!("{s:?}: {a:?} is not an IP address"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| format!("{s:?}: {p:?} is not a prefix length"))?;
        Cidr::new(addr, prefix).map_err(|e| format!("{s:?}: {e}"))
    }
}

impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Cidr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(D::Error::custom)
    }
}

/// A pool a pod may draw from: a CIDR, or the name of an IPPool resource (as Calico's `ipv4_pools` allows).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PoolRef {
    Cidr(Cidr),
    Name(String),
}

impl PoolRef {
    /// Parse one entry of `ipv4_pools` / `ipv6_pools`; `v6` says which list it came from.
    fn parse(field: &str, s: &str, v6: bool) -> Result<PoolRef, CniError> {
        if s.contains('/') {
            let c: Cidr = s
                .parse()
                .map_err(|e| CniError::invalid_config(format!("{field}: {e}")))?;
            if c.addr.is_ipv6() != v6 {
                return Err(CniError::invalid_config(format!(
                    "{field}: {s:?} is an IPv{} CIDR in the IPv{} list",
                    if v6 { 4 } else { 6 },
                    if v6 { 6 } else { 4 }
                )));
            }
            if !c.is_network() {
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
fn is_resource_name(s: &str) -> bool {
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
}

/// Longest `timeout_seconds` accepted: kubelet's own runtime request timeout is 2 minutes.
const MAX_TIMEOUT_SECONDS: u64 = 600;

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
        Ok(NetConf {
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

/// A network interface in a result. `sandbox` is the netns path for interfaces inside the container, and
/// absent for host interfaces: chained plugins (bandwidth, portmap) rely on that distinction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// Spec 1.1 only; dropped when encoding older versions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
}

/// An address in a result; `interface` indexes `interfaces`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    pub address: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: Cidr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<IpAddr>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

/// A CNI result in margay's version-neutral model (the 1.x shape). [`CniResult::encode`] writes it in any
/// supported version; [`CniResult::decode`] reads a `prevResult` of any supported version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResult {
    #[serde(default)]
    pub interfaces: Vec<Interface>,
    #[serde(default)]
    pub ips: Vec<IpConfig>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub dns: Dns,
}

impl CniResult {
    /// The result JSON in `version` (spec section 5). Before 1.0.0 each `ips[]` entry also says
    /// `"version": "4"|"6"`; interface `mtu` exists only from 1.1.0.
    pub fn encode(&self, version: CniVersion) -> Value {
        let mut m = Map::new();
        m.insert("cniVersion".into(), Value::String(version.as_str().into()));
        if !self.interfaces.is_empty() {
            let ifs = self
                .interfaces
                .iter()
                .map(|i| {
                    let mut i = i.clone();
                    if version < CniVersion::V1_1_0 {
                        i.mtu = None;
                    }
                    to_value(&i)
                })
                .collect();
            m.insert("interfaces".into(), Value::Array(ifs));
        }
        if !self.ips.is_empty() {
            let ips = self
                .ips
                .iter()
                .map(|ip| {
                    let mut o = Map::new();
                    if version.ips_carry_version() {
                        let fam = if ip.address.addr.is_ipv4() { "4" } else { "6" };
                        o.insert("version".into(), Value::String(fam.into()));
                    }
                    if let Some(i) = ip.interface {
                        o.insert("interface".into(), Value::from(i));
                    }
                    o.insert("address".into(), Value::String(ip.address.to_string()));
                    if let Some(g) = ip.gateway {
                        o.insert("gateway".into(), Value::String(g.to_string()));
                    }
                    Value::Object(o)
                })
                .collect();
            m.insert("ips".into(), Value::Array(ips));
        }
        if !self.routes.is_empty() {
            m.insert(
                "routes".into(),
                Value::Array(self.routes.iter().map(to_value).collect()),
            );
        }
        m.insert("dns".into(), to_value(&self.dns));
        Value::Object(m)
    }

    /// Read a result (a `prevResult`) of any supported version. Results of 0.1/0.2 (`ip4`/`ip6` keys) are
    /// refused: no runtime that speaks 0.3+ to margay can hold one.
    pub fn decode(v: &Value) -> Result<CniResult, String> {
        let obj = v.as_object().ok_or("a result must be a JSON object")?;
        if let Some(ver) = obj.get("cniVersion").and_then(Value::as_str) {
            ver.parse::<CniVersion>()
                .map_err(|_| format!("result version {ver:?} is not supported"))?;
        }
        if obj.contains_key("ip4") || obj.contains_key("ip6") {
            return Err("result in the 0.2 format (ip4/ip6) is not supported".into());
        }
        // "version" inside ips[] (0.3.x/0.4.0) is implied by the address; serde ignores it.
        let r: CniResult = serde_json::from_value(v.clone()).map_err(|e| e.to_string())?;
        for ip in &r.ips {
            if let Some(i) = ip.interface {
                if i >= r.interfaces.len() {
                    return Err(format!(
                        "ips entry {} points at interface {i}, but there are {} interfaces",
                        ip.address,
                        r.interfaces.len()
                    ));
                }
            }
        }
        Ok(r)
    }

    /// Append `other` (our own result) after the entries of `self` (a `prevResult` from earlier plugins),
    /// shifting `other`'s interface indices.
    pub fn merged_with(mut self, other: CniResult) -> CniResult {
        let shift = self.interfaces.len();
        self.interfaces.extend(other.interfaces);
        self.ips.extend(other.ips.into_iter().map(|mut ip| {
            ip.interface = ip.interface.map(|i| i + shift);
            ip
        }));
        self.routes.extend(other.routes);
        if self.dns == Dns::default() {
            self.dns = other.dns;
        }
        self
    }
}

/// serde_json::to_value for our own plain types, which cannot fail (string keys, no maps with non-string
/// keys); a failure would be a bug in this file, so it degrades to null rather than panicking.
fn to_value<T: Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap_or(Value::Null)
}

/// The answer to VERSION (spec section "VERSION").
pub fn version_info(version: CniVersion) -> Value {
    serde_json::json!({
        "cniVersion": version.as_str(),
        "supportedVersions": supported_versions(),
    })
}

/// The spec's rules for `CNI_CONTAINERID`: non-empty, alphanumerics plus `_ . -`, starting alphanumeric.
pub fn validate_container_id(id: &str) -> Result<(), CniError> {
    let ok = id.as_bytes().first().is_some_and(u8::is_ascii_alphanumeric)
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_CONTAINERID {id:?} is invalid: use letters, digits, '_', '.', '-', starting with a letter or digit"
        )))
    }
}

/// The spec's rules for `CNI_IFNAME`: 1..15 bytes (IFNAMSIZ), not `.`/`..`, no `/`, `:` or whitespace.
pub fn validate_ifname(name: &str) -> Result<(), CniError> {
    let ok = !name.is_empty()
        && name.len() <= 15
        && name != "."
        && name != ".."
        && !name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace());
    if ok {
        Ok(())
    } else {
        Err(CniError::invalid_env(format!(
            "CNI_IFNAME {name:?} is invalid: 1 to 15 characters, not '.' or '..', without '/', ':' or spaces"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(extra: Value) -> Vec<u8> {
        let mut base = json!({"cniVersion": "1.0.0", "name": "k8s-pod-network", "type": "margay"});
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        serde_json::to_vec(&base).unwrap()
    }

    #[test]
    fn versions_parse_order_and_features() {
        for v in CniVersion::ALL {
            assert_eq!(v.as_str().parse::<CniVersion>().unwrap(), v);
        }
        assert!(!CniVersion::V0_3_1.has_check());
        assert!(CniVersion::V0_4_0.has_check());
        assert!(!CniVersion::V1_0_0.has_status_and_gc());
        assert!(CniVersion::V1_1_0.has_status_and_gc());
        let e = "0.2.0".parse::<CniVersion>().unwrap_err();
        assert_eq!(e.code, codes::INCOMPATIBLE_CNI_VERSION);
        assert!(e.details.contains("1.0.0"), "{e}");
        let vi = version_info(CniVersion::V1_1_0);
        assert_eq!(
            vi["supportedVersions"],
            json!(["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"])
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = NetConf::parse(&conf(json!({}))).unwrap();
        assert_eq!(c.cni_version, CniVersion::V1_0_0);
        assert_eq!(c.name, "k8s-pod-network");
        assert_eq!(c.socket, DEFAULT_SOCKET);
        assert_eq!(c.mtu, None);
        assert!(c.ipv4_pools.is_empty() && c.ipv6_pools.is_empty());
        assert_eq!(c.log_level, LogLevel::Info);
        assert!(c.prev_result.is_none() && c.runtime_config.is_none());
    }

    #[test]
    fn full_config_parses() {
        let c = NetConf::parse(&conf(json!({
            "mtu": 1440, "socket": "/run/x.sock", "log_file": "/tmp/l", "log_level": "debug",
            "ipv4_pools": ["10.65.0.0/16", "pool-a"], "ipam": {"ipv6_pools": ["fd00:65::/48"]},
            "timeout_seconds": 5, "runtimeConfig": {"portMappings": []}, "unknownField": 1,
            "cni.dev/valid-attachments": [{"containerID": "abc", "ifname": "eth0"}]
        })))
        .unwrap();
        assert_eq!(c.mtu, Some(1440));
        assert_eq!(c.socket, "/run/x.sock");
        assert_eq!(c.log_level, LogLevel::Debug);
        assert_eq!(c.timeout_seconds, Some(5));
        assert_eq!(
            c.ipv4_pools,
            vec![
                PoolRef::Cidr("10.65.0.0/16".parse().unwrap()),
                PoolRef::Name("pool-a".into())
            ]
        );
        assert_eq!(
            c.ipv6_pools,
            vec![PoolRef::Cidr("fd00:65::/48".parse().unwrap())]
        );
        assert_eq!(c.runtime_config, Some(json!({"portMappings": []})));
        assert_eq!(c.valid_attachments.unwrap()[0].container_id, "abc");
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases: Vec<(Vec<u8>, u32, &str)> = vec![
            (b"{not json".to_vec(), codes::DECODING_FAILURE, "not JSON"),
            (
                b"[1]".to_vec(),
                codes::DECODING_FAILURE,
                "not a JSON object",
            ),
            (conf(json!({"type": "bridge"})), 7, "\"bridge\""),
            (conf(json!({"name": ""})), 7, "\"name\""),
            (conf(json!({"cniVersion": "0.2.0"})), 1, "0.2.0"),
            (conf(json!({"cniVersion": 1})), 7, "cniVersion"),
            (conf(json!({"mtu": 20})), 7, "mtu"),
            (conf(json!({"mtu": "1500"})), 7, "mtu"),
            (conf(json!({"socket": "rel.sock"})), 7, "absolute"),
            (conf(json!({"ipv4_pools": ["10.0.0.1/16"]})), 7, "host bits"),
            (
                conf(json!({"ipv4_pools": ["fd00::/48"]})),
                7,
                "IPv6 CIDR in the IPv4",
            ),
            (conf(json!({"ipv6_pools": ["Bad_Name"]})), 7, "neither"),
            (conf(json!({"ipv4_pools": "10.0.0.0/8"})), 7, "list"),
            (conf(json!({"log_level": "loud"})), 7, "log_level"),
            (conf(json!({"timeout_seconds": 0})), 7, "timeout_seconds"),
            (conf(json!({"prevResult": {"ip4": {}}})), 6, "0.2"),
        ];
        for (bytes, code, needle) in cases {
            let e = NetConf::parse(&bytes).unwrap_err();
            assert_eq!(e.code, code, "{e} for {}", String::from_utf8_lossy(&bytes));
            assert!(
                e.msg.contains(needle) || e.details.contains(needle),
                "{e:?} lacks {needle:?}"
            );
        }
    }

    #[test]
    fn mtu_zero_means_auto() {
        assert_eq!(NetConf::parse(&conf(json!({"mtu": 0}))).unwrap().mtu, None);
    }

    #[test]
    fn cni_args_known_unknown_and_ignore_unknown() {
        let a = CniArgs::parse(
            "K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=u1",
        )
        .unwrap();
        assert_eq!(a.k8s_pod_namespace.as_deref(), Some("default"));
        assert_eq!(a.k8s_pod_name.as_deref(), Some("web-0"));
        assert_eq!(a.k8s_pod_infra_container_id.as_deref(), Some("abc"));
        assert_eq!(a.k8s_pod_uid.as_deref(), Some("u1"));
        assert_eq!(CniArgs::parse("").unwrap(), CniArgs::default());

        let e = CniArgs::parse("K8S_POD_NAME=x;FOO=bar").unwrap_err();
        assert_eq!(e.code, codes::INVALID_ENVIRONMENT);
        assert!(e.msg.contains("FOO"), "{e}");

        // IgnoreUnknown works wherever it sits and in both spellings.
        for s in ["FOO=bar;IgnoreUnknown=1", "IgnoreUnknown=true;FOO=bar;"] {
            let a = CniArgs::parse(s).unwrap();
            assert_eq!(a.ignored.get("FOO").map(String::as_str), Some("bar"));
        }
        assert!(CniArgs::parse("IgnoreUnknown=0;FOO=bar").is_err());
        assert!(CniArgs::parse("IgnoreUnknown=maybe").is_err());
        assert!(CniArgs::parse("novalue").is_err());
        assert!(CniArgs::parse("a=b=c").is_err());
    }

    fn sample() -> CniResult {
        CniResult {
            interfaces: vec![
                Interface {
                    name: "mg0123456789a".into(),
                    mac: Some("ee:ee:ee:ee:ee:ee".into()),
                    mtu: None,
                    sandbox: None,
                },
                Interface {
                    name: "eth0".into(),
                    mac: Some("0a:58:0a:41:00:07".into()),
                    mtu: Some(1440),
                    sandbox: Some("/var/run/netns/p1".into()),
                },
            ],
            ips: vec![
                IpConfig {
                    address: "10.65.0.7/32".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
                IpConfig {
                    address: "fd00:65::7/128".parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                dst: "0.0.0.0/0".parse().unwrap(),
                gw: Some("169.254.1.1".parse().unwrap()),
            }],
            dns: Dns::default(),
        }
    }

    #[test]
    fn result_encodes_per_version() {
        let r = sample();
        let v1 = r.encode(CniVersion::V1_0_0);
        assert_eq!(v1["cniVersion"], "1.0.0");
        assert!(v1["ips"][0].get("version").is_none());
        assert_eq!(v1["ips"][0]["address"], "10.65.0.7/32");
        assert_eq!(v1["ips"][1]["interface"], 1);
        assert!(v1["interfaces"][0].get("sandbox").is_none());
        assert_eq!(v1["interfaces"][1]["sandbox"], "/var/run/netns/p1");
        assert!(v1["interfaces"][1].get("mtu").is_none(), "mtu is 1.1 only");
        assert_eq!(v1["routes"][0]["gw"], "169.254.1.1");

        let v11 = r.encode(CniVersion::V1_1_0);
        assert_eq!(v11["interfaces"][1]["mtu"], 1440);

        for v in [CniVersion::V0_3_1, CniVersion::V0_4_0] {
            let old = r.encode(v);
            assert_eq!(old["cniVersion"], v.as_str());
            assert_eq!(old["ips"][0]["version"], "4");
            assert_eq!(old["ips"][1]["version"], "6");
        }
        // Every encoding reads back to the same model (mtu aside before 1.1).
        for v in CniVersion::ALL {
            let mut want = r.clone();
            if v < CniVersion::V1_1_0 {
                want.interfaces[1].mtu = None;
            }
            assert_eq!(CniResult::decode(&r.encode(v)).unwrap(), want, "{v}");
        }
    }

    #[test]
    fn decode_rejects_dangling_interface_index() {
        let mut v = sample().encode(CniVersion::V1_0_0);
        v["ips"][0]["interface"] = json!(7);
        assert!(CniResult::decode(&v).unwrap_err().contains("interface 7"));
    }

    #[test]
    fn merge_shifts_interface_indices() {
        let prev = CniResult {
            interfaces: vec![Interface {
                name: "other0".into(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let m = prev.merged_with(sample());
        assert_eq!(m.interfaces.len(), 3);
        assert_eq!(m.ips[0].interface, Some(2));
    }

    #[test]
    fn error_object_shape() {
        let e = CniError::new(11, "try later", "");
        assert_eq!(
            e.to_json("0.4.0"),
            json!({"cniVersion": "0.4.0", "code": 11, "msg": "try later"})
        );
        let e = CniError::new(7, "bad", "why");
        assert_eq!(e.to_json("1.0.0")["details"], "why");
    }

    #[test]
    fn container_id_and_ifname_rules() {
        assert!(validate_container_id("a1b2_c.d-e").is_ok());
        for bad in ["", "-abc", "a/b", "a b"] {
            assert_eq!(validate_container_id(bad).unwrap_err().code, 4);
        }
        assert!(validate_ifname("eth0").is_ok());
        for bad in ["", ".", "..", "a/b", "a:b", "a b", "sixteen-chars-xx"] {
            assert_eq!(validate_ifname(bad).unwrap_err().code, 4, "{bad}");
        }
    }

    #[test]
    fn cidr_parse_and_network_check() {
        let c: Cidr = "10.65.0.0/26".parse().unwrap();
        assert!(c.is_network());
        assert!(!"10.65.0.1/26".parse::<Cidr>().unwrap().is_network());
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().is_network());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/129".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        assert_eq!(
            Cidr::host("fd00::1".parse().unwrap()).to_string(),
            "fd00::1/128"
        );
    }
}
