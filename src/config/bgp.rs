//! Calico's BGP resources (`projectcalico.org/v3` BGPConfiguration, BGPPeer, Node `spec.bgp`) with Calico's
//! field names and defaults, their validation, and loading a multi-document YAML file into one validated
//! [`ConfigSet`].
//!
//! Parse, then validate, then hand over: [`ConfigSet::from_yaml`] either returns a complete set in which every
//! document is valid (and cross-references, such as password secrets, resolve), or one [`LoadError`] naming the
//! document, the resource, the field and the bad value. Nothing is ever half-applied, because nothing is applied
//! here at all: the caller swaps its whole set only on success. Which peers a node should have is derived from
//! a set in `config::peers`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::meta::{ConfigError, ObjectMeta, API_VERSION};
use super::selector::Selector;

/// Calico's default AS number (`confd` globalDefaults).
pub const DEFAULT_AS_NUMBER: u32 = 64512;
/// Default BGP port.
pub const DEFAULT_LISTEN_PORT: u16 = 179;
/// BIRD's default graceful-restart time, which Calico inherits when `maxRestartTime` is unset.
pub const DEFAULT_MAX_RESTART_TIME: Duration = Duration::from_secs(120);

pub const KIND_BGP_CONFIGURATION: &str = "BGPConfiguration";
pub const KIND_BGP_PEER: &str = "BGPPeer";
pub const KIND_NODE: &str = "Node";
/// Plurals in the etcd keys (`/calico/resources/v3/projectcalico.org/<plural>/<name>`).
pub const BGP_CONFIGURATION_PLURAL: &str = "bgpconfigurations";
pub const BGP_PEER_PLURAL: &str = "bgppeers";
pub const NODE_PLURAL: &str = "nodes";

// ----- small value types -----

/// An AS number as Calico accepts it (`numorstring.ASNumber`): an integer, a decimal string, or asdot
/// notation `"1.10"` (= 1 * 65536 + 10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AsNumber(pub u32);

impl FromStr for AsNumber {
    type Err = String;
    fn from_str(s: &str) -> Result<AsNumber, String> {
        let s = s.trim();
        if let Some((hi, lo)) = s.split_once('.') {
            let hi: u16 = hi
                .parse()
                .map_err(|_| format!("{s:?} is not an AS number (asdot high part)"))?;
            let lo: u16 = lo
                .parse()
                .map_err(|_| format!("{s:?} is not an AS number (asdot low part)"))?;
            return Ok(AsNumber((u32::from(hi) << 16) | u32::from(lo)));
        }
        s.parse::<u32>()
            .map(AsNumber)
            .map_err(|_| format!("{s:?} is not an AS number (0..4294967295 or asdot a.b)"))
    }
}

impl<'de> Deserialize<'de> for AsNumber {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<AsNumber, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = AsNumber;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an AS number (0..4294967295, or asdot \"a.b\")")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<AsNumber, E> {
                u32::try_from(n)
                    .map(AsNumber)
                    .map_err(|_| E::custom(format!("AS number {n} does not fit in 32 bits")))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<AsNumber, E> {
                u32::try_from(n)
                    .map(AsNumber)
                    .map_err(|_| E::custom(format!("AS number {n} is out of range 0..4294967295")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<AsNumber, E> {
                s.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

impl Serialize for AsNumber {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

/// A Go duration (`15m`, `90s`, `1m30s`) for a flag.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    s.parse::<GoDuration>().map(|d| d.0)
}

/// A Go `time.Duration` string as Kubernetes `metav1.Duration` carries it: `"120s"`, `"1m30s"`, `"500ms"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GoDuration(pub Duration);

impl FromStr for GoDuration {
    type Err = String;
    fn from_str(text: &str) -> Result<GoDuration, String> {
        let bad = || {
            format!("{text:?} is not a duration (examples: \"120s\", \"2m\", \"1m30s\", \"500ms\")")
        };
        let s = text.trim();
        if s == "0" {
            return Ok(GoDuration(Duration::ZERO));
        }
        if s.is_empty() {
            return Err(bad());
        }
        let mut total = 0f64;
        let mut rest = s;
        while !rest.is_empty() {
            let num_end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(bad)?;
            if num_end == 0 {
                return Err(bad());
            }
            let value: f64 = rest[..num_end].parse().map_err(|_| bad())?;
            rest = &rest[num_end..];
            let unit_end = rest
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(rest.len());
            let scale = match &rest[..unit_end] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 1e-3,
                "us" | "µs" => 1e-6,
                "ns" => 1e-9,
                _ => return Err(bad()),
            };
            total += value * scale;
            rest = &rest[unit_end..];
        }
        Ok(GoDuration(Duration::from_secs_f64(total)))
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<GoDuration, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", self.0.as_secs_f64()))
    }
}

/// A reference to a key of a Kubernetes Secret (BGPPeer `password.secretKeyRef`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub optional: Option<bool>,
}

/// BGP password source (`BGPPassword`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPassword {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_key_ref: Option<SecretKeyRef>,
}

/// BGPPeer `nextHopMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub enum NextHopMode {
    #[default]
    Auto,
    #[serde(rename = "Self")]
    SelfAddr,
    Keep,
}

/// BGPPeer `sourceAddress`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum SourceAddress {
    #[default]
    UseNodeIP,
    None,
}

/// BGPPeer `reversePeering`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ReversePeering {
    #[default]
    Auto,
    Manual,
}

/// BGPConfiguration `bindMode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum BindMode {
    #[default]
    None,
    NodeIP,
}

/// `{cidr: ...}` entries of the service IP lists.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CidrEntry {
    pub cidr: String,
}

/// A named community (`communities[]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Community {
    pub name: String,
    pub value: String,
}

/// `prefixAdvertisements[]`: communities to attach to routes inside `cidr`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixAdvertisement {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<String>,
}

// ----- BGPConfiguration -----

/// `BGPConfiguration.spec`. Every field is optional, as in Calico; the accessors on [`BgpConfiguration`]
/// apply Calico's defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfigurationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_severity_screen: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_to_node_mesh_enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen_port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_password: Option<BgpPassword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_mesh_max_restart_time: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bind_mode: Option<BindMode>,
    #[serde(
        rename = "serviceClusterIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_cluster_ips: Vec<CidrEntry>,
    #[serde(
        rename = "serviceExternalIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_external_ips: Vec<CidrEntry>,
    #[serde(
        rename = "serviceLoadBalancerIPs",
        default,
        skip_serializing_if = "Vec::is_empty"
    )]
    pub service_load_balancer_ips: Vec<CidrEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_load_balancer_aggregation: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub communities: Vec<Community>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub prefix_advertisements: Vec<PrefixAdvertisement>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ignored_interfaces: Vec<String>,
    #[serde(
        rename = "localWorkloadPeeringIPV4",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub local_workload_peering_ipv4: Option<String>,
    #[serde(
        rename = "localWorkloadPeeringIPV6",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub local_workload_peering_ipv6: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub program_cluster_routes: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_normal_route_priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6_normal_route_priority: Option<u32>,
}

/// A BGPConfiguration: `default` (cluster-wide) or `node.<nodename>` (per node: listenPort,
/// logSeverityScreen and prefixAdvertisements only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpConfiguration {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BgpConfigurationSpec,
}

impl BgpConfiguration {
    /// `asNumber`, default 64512.
    pub fn as_number(&self) -> u32 {
        self.spec.as_number.map_or(DEFAULT_AS_NUMBER, |a| a.0)
    }
    /// `nodeToNodeMeshEnabled`, default true.
    pub fn mesh_enabled(&self) -> bool {
        self.spec.node_to_node_mesh_enabled.unwrap_or(true)
    }
    /// `listenPort`, default 179.
    pub fn listen_port(&self) -> u16 {
        self.spec.listen_port.unwrap_or(DEFAULT_LISTEN_PORT)
    }
    /// `logSeverityScreen`, default Info.
    pub fn log_severity_screen(&self) -> &str {
        self.spec.log_severity_screen.as_deref().unwrap_or("Info")
    }
    /// `nodeMeshMaxRestartTime`, default 120 s.
    pub fn node_mesh_max_restart_time(&self) -> Duration {
        self.spec
            .node_mesh_max_restart_time
            .map_or(DEFAULT_MAX_RESTART_TIME, |d| d.0)
    }
    /// `serviceLoadBalancerAggregation`, default Enabled.
    pub fn service_load_balancer_aggregation(&self) -> &str {
        self.spec
            .service_load_balancer_aggregation
            .as_deref()
            .unwrap_or("Enabled")
    }
    /// `programClusterRoutes`, default EnabledNoEncapOnly.
    pub fn program_cluster_routes(&self) -> &str {
        self.spec
            .program_cluster_routes
            .as_deref()
            .unwrap_or("EnabledNoEncapOnly")
    }
    /// `ipv4NormalRoutePriority`, default 1024.
    pub fn ipv4_normal_route_priority(&self) -> u32 {
        self.spec.ipv4_normal_route_priority.unwrap_or(1024)
    }

    /// The node a `node.<name>` object applies to.
    pub fn node_name(&self) -> Option<&str> {
        self.metadata.name.strip_prefix("node.")
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = self.metadata.name.as_str();
        let err = |field: &str, value: &dyn fmt::Display, reason: &str| {
            ConfigError::new(KIND_BGP_CONFIGURATION, name, field, value, reason)
        };
        check_header(
            KIND_BGP_CONFIGURATION,
            &self.api_version,
            &self.kind,
            &self.metadata,
        )?;
        let s = &self.spec;
        if let Some(node) = self.node_name() {
            if node.is_empty() {
                return Err(err(
                    "metadata.name",
                    &name,
                    "a per-node configuration is named node.<nodename>",
                ));
            }
            // Calico: per-node objects may set only listenPort, logSeverityScreen and prefixAdvertisements.
            let cluster_only: [(&str, bool); 11] = [
                (
                    "nodeToNodeMeshEnabled",
                    s.node_to_node_mesh_enabled.is_some(),
                ),
                ("asNumber", s.as_number.is_some()),
                ("nodeMeshPassword", s.node_mesh_password.is_some()),
                (
                    "nodeMeshMaxRestartTime",
                    s.node_mesh_max_restart_time.is_some(),
                ),
                ("serviceClusterIPs", !s.service_cluster_ips.is_empty()),
                ("serviceExternalIPs", !s.service_external_ips.is_empty()),
                (
                    "serviceLoadBalancerIPs",
                    !s.service_load_balancer_ips.is_empty(),
                ),
                ("communities", !s.communities.is_empty()),
                ("ignoredInterfaces", !s.ignored_interfaces.is_empty()),
                ("bindMode", s.bind_mode.is_some()),
                ("programClusterRoutes", s.program_cluster_routes.is_some()),
            ];
            if let Some((field, _)) = cluster_only.iter().find(|(_, set)| *set) {
                return Err(err(
                    &format!("spec.{field}"),
                    &"(set)",
                    "only the cluster-wide BGPConfiguration \"default\" may set this; per-node objects may set \
                     listenPort, logSeverityScreen and prefixAdvertisements",
                ));
            }
        } else if name != "default" {
            return Err(err(
                "metadata.name",
                &name,
                "a BGPConfiguration is named \"default\" (cluster-wide) or \"node.<nodename>\"",
            ));
        }
        if let Some(AsNumber(0)) = s.as_number {
            return Err(err("spec.asNumber", &0, "AS 0 is reserved (RFC 7607)"));
        }
        if s.listen_port == Some(0) {
            return Err(err("spec.listenPort", &0, "must be 1..65535"));
        }
        if s.node_to_node_mesh_enabled == Some(false) {
            if s.node_mesh_password.is_some() {
                return Err(err(
                    "spec.nodeMeshPassword",
                    &"(set)",
                    "requires nodeToNodeMeshEnabled: true (it is the mesh's password)",
                ));
            }
            if let Some(d) = s.node_mesh_max_restart_time {
                return Err(err(
                    "spec.nodeMeshMaxRestartTime",
                    &format!("{:?}", d.0),
                    "requires nodeToNodeMeshEnabled: true",
                ));
            }
        }
        if let Some(p) = &s.node_mesh_password {
            check_password(p)
                .map_err(|(f, v, r)| err(&format!("spec.nodeMeshPassword.{f}"), &v, &r))?;
        }
        if let Some(sev) = &s.log_severity_screen {
            const OK: [&str; 7] = [
                "Trace", "Debug", "Info", "Warning", "Error", "Fatal", "None",
            ];
            if !OK.iter().any(|o| o.eq_ignore_ascii_case(sev)) {
                return Err(err(
                    "spec.logSeverityScreen",
                    sev,
                    "one of Trace, Debug, Info, Warning, Error, Fatal, None",
                ));
            }
        }
        for (field, list) in [
            ("serviceClusterIPs", &s.service_cluster_ips),
            ("serviceExternalIPs", &s.service_external_ips),
            ("serviceLoadBalancerIPs", &s.service_load_balancer_ips),
        ] {
            for (i, c) in list.iter().enumerate() {
                parse_cidr(&c.cidr)
                    .map_err(|r| err(&format!("spec.{field}[{i}].cidr"), &c.cidr, &r))?;
            }
        }
        if s.communities.len() > 500 {
            return Err(err(
                "spec.communities",
                &s.communities.len(),
                "at most 500 communities",
            ));
        }
        for (i, c) in s.communities.iter().enumerate() {
            if c.name.is_empty() {
                return Err(err(
                    &format!("spec.communities[{i}].name"),
                    &"",
                    "a community needs a name",
                ));
            }
            parse_community(&c.value)
                .map_err(|r| err(&format!("spec.communities[{i}].value"), &c.value, &r))?;
        }
        for (i, pa) in s.prefix_advertisements.iter().enumerate() {
            parse_cidr(&pa.cidr).map_err(|r| {
                err(
                    &format!("spec.prefixAdvertisements[{i}].cidr"),
                    &pa.cidr,
                    &r,
                )
            })?;
            for (j, c) in pa.communities.iter().enumerate() {
                let named = s.communities.iter().any(|n| &n.name == c);
                if !named && parse_community(c).is_err() {
                    return Err(err(
                        &format!("spec.prefixAdvertisements[{i}].communities[{j}]"),
                        c,
                        "neither a community defined in spec.communities nor a literal aa:nn / aa:nn:mm",
                    ));
                }
            }
        }
        for (field, v) in [
            ("localWorkloadPeeringIPV4", &s.local_workload_peering_ipv4),
            ("localWorkloadPeeringIPV6", &s.local_workload_peering_ipv6),
        ] {
            if let Some(v) = v {
                v.parse::<IpAddr>()
                    .map_err(|_| err(&format!("spec.{field}"), v, "not an IP address"))?;
            }
        }
        Ok(())
    }
}

// ----- BGPPeer -----

/// `BGPPeer.spec`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeerSpec {
    /// The node this peering applies to (empty/absent with no nodeSelector = every node: a global peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    /// `IP`, `IP:port` or `[IPv6]:port`.
    #[serde(rename = "peerIP", default, skip_serializing_if = "Option::is_none")]
    pub peer_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    #[serde(
        rename = "localASNumber",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub local_as_number: Option<AsNumber>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_original_next_hop: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_hop_mode: Option<NextHopMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<BgpPassword>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_address: Option<SourceAddress>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_restart_time: Option<GoDuration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keepalive_time: Option<GoDuration>,
    #[serde(
        rename = "numAllowedLocalASNumbers",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub num_allowed_local_as_numbers: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_security: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reachable_by: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_workload_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_peering: Option<ReversePeering>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BgpPeer {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: BgpPeerSpec,
}

/// A parsed `peerIP`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerAddress {
    pub ip: IpAddr,
    pub port: Option<u16>,
}

/// Parse Calico's `peerIP`: `10.0.0.1`, `10.0.0.1:1790`, `fd00::1`, `[fd00::1]:1790`.
pub fn parse_peer_ip(s: &str) -> Result<PeerAddress, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(PeerAddress { ip, port: None });
    }
    match s.parse::<std::net::SocketAddr>() {
        Ok(sa) if sa.port() != 0 => Ok(PeerAddress {
            ip: sa.ip(),
            port: Some(sa.port()),
        }),
        Ok(_) => Err("port 0 is not a BGP port".into()),
        Err(_) => Err("not an IP address, IP:port or [IPv6]:port".into()),
    }
}

impl BgpPeer {
    pub fn peer_address(&self) -> Option<PeerAddress> {
        self.spec
            .peer_ip
            .as_deref()
            .and_then(|s| parse_peer_ip(s).ok())
    }

    /// `nextHopMode`, with the deprecated `keepOriginalNextHop: true` meaning Keep (Calico renders it for eBGP
    /// peers only; the caller knows which kind the session is).
    pub fn next_hop_mode(&self) -> NextHopMode {
        match (self.spec.next_hop_mode, self.spec.keep_original_next_hop) {
            (Some(m), _) => m,
            (None, Some(true)) => NextHopMode::Keep,
            _ => NextHopMode::Auto,
        }
    }

    /// `maxRestartTime`, default 120 s.
    pub fn max_restart_time(&self) -> Duration {
        self.spec
            .max_restart_time
            .map_or(DEFAULT_MAX_RESTART_TIME, |d| d.0)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = self.metadata.name.as_str();
        let err = |field: &str, value: &dyn fmt::Display, reason: &str| {
            ConfigError::new(KIND_BGP_PEER, name, field, value, reason)
        };
        check_header(KIND_BGP_PEER, &self.api_version, &self.kind, &self.metadata)?;
        let s = &self.spec;
        if s.node.as_deref().is_some_and(|n| !n.is_empty()) && s.node_selector.is_some() {
            return Err(err(
                "spec.nodeSelector",
                &s.node_selector.as_deref().unwrap_or(""),
                "node and nodeSelector are mutually exclusive",
            ));
        }
        for (field, sel) in [
            ("nodeSelector", &s.node_selector),
            ("peerSelector", &s.peer_selector),
            ("localWorkloadSelector", &s.local_workload_selector),
        ] {
            if let Some(sel) = sel {
                Selector::parse(sel)
                    .map_err(|e| err(&format!("spec.{field}"), sel, &e.to_string()))?;
            }
        }
        match (&s.peer_ip, &s.peer_selector, &s.local_workload_selector) {
            (Some(ip), Some(_), _) => {
                return Err(err(
                    "spec.peerIP",
                    ip,
                    "peerIP and peerSelector are mutually exclusive",
                ));
            }
            (Some(ip), None, _) => {
                parse_peer_ip(ip).map_err(|r| err("spec.peerIP", ip, &r))?;
                if s.as_number.is_none() {
                    return Err(err(
                        "spec.asNumber",
                        &"(missing)",
                        "a peer given by peerIP needs asNumber",
                    ));
                }
            }
            (None, Some(_), _) => {
                if let Some(asn) = s.as_number {
                    return Err(err(
                        "spec.asNumber",
                        &asn.0,
                        "peerSelector peers take each selected node's AS; asNumber cannot be set with it",
                    ));
                }
            }
            (None, None, Some(_)) => {
                if s.as_number.is_none() {
                    return Err(err(
                        "spec.asNumber",
                        &"(missing)",
                        "localWorkloadSelector peers need asNumber",
                    ));
                }
            }
            (None, None, None) => {
                return Err(err(
                    "spec.peerIP",
                    &"(missing)",
                    "set peerIP (with asNumber) or peerSelector",
                ));
            }
        }
        if let Some(AsNumber(0)) = s.as_number {
            return Err(err("spec.asNumber", &0, "AS 0 is reserved (RFC 7607)"));
        }
        if let Some(AsNumber(0)) = s.local_as_number {
            return Err(err("spec.localASNumber", &0, "AS 0 is reserved (RFC 7607)"));
        }
        if s.keep_original_next_hop == Some(true) && s.next_hop_mode.is_some() {
            return Err(err(
                "spec.keepOriginalNextHop",
                &true,
                "deprecated; cannot be combined with nextHopMode (use nextHopMode: Keep)",
            ));
        }
        if s.ttl_security == Some(0) {
            return Err(err("spec.ttlSecurity", &0, "hop count must be 1..255"));
        }
        if let Some(p) = &s.password {
            check_password(p).map_err(|(f, v, r)| err(&format!("spec.password.{f}"), &v, &r))?;
        }
        if let Some(d) = s.keepalive_time {
            if d.0.is_zero() {
                return Err(err("spec.keepaliveTime", &"0s", "must be positive"));
            }
        }
        if let Some(d) = s.max_restart_time {
            // RFC 4724 3: the Restart Time field has 12 bits.
            if d.0.as_secs() > 4095 {
                return Err(err(
                    "spec.maxRestartTime",
                    &format!("{}s", d.0.as_secs()),
                    "at most 4095 s (RFC 4724)",
                ));
            }
        }
        if let Some(r) = &s.reachable_by {
            r.parse::<IpAddr>()
                .map_err(|_| err("spec.reachableBy", r, "not an IP address"))?;
        }
        Ok(())
    }
}

// ----- Node -----

/// `Node.spec.bgp`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeBgpSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub as_number: Option<AsNumber>,
    /// CIDR form (`10.0.0.1/24`; a bare address is accepted too).
    #[serde(
        rename = "ipv4Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_address: Option<String>,
    #[serde(
        rename = "ipv6Address",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv6_address: Option<String>,
    #[serde(
        rename = "ipv4IPIPTunnelAddr",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub ipv4_ipip_tunnel_addr: Option<String>,
    #[serde(
        rename = "routeReflectorClusterID",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub route_reflector_cluster_id: Option<String>,
}

/// `Node.spec`: the BGP part is typed; everything else Calico keeps there (addresses, orchRefs, tunnel
/// addresses, wireguard) is carried as is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<NodeBgpSpec>,
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_yaml_ng::Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Node {
    pub api_version: String,
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_yaml_ng::Value>,
}

/// Address part of a CIDR-or-address string.
fn addr_of(s: &str) -> Option<IpAddr> {
    s.split('/').next().and_then(|a| a.trim().parse().ok())
}

impl Node {
    pub fn bgp(&self) -> Option<&NodeBgpSpec> {
        self.spec.bgp.as_ref()
    }
    pub fn ipv4(&self) -> Option<IpAddr> {
        self.bgp()
            .and_then(|b| b.ipv4_address.as_deref())
            .and_then(addr_of)
            .filter(IpAddr::is_ipv4)
    }
    pub fn ipv6(&self) -> Option<IpAddr> {
        self.bgp()
            .and_then(|b| b.ipv6_address.as_deref())
            .and_then(addr_of)
            .filter(IpAddr::is_ipv6)
    }
    pub fn as_number(&self) -> Option<u32> {
        self.bgp().and_then(|b| b.as_number).map(|a| a.0)
    }
    pub fn cluster_id(&self) -> Option<Ipv4Addr> {
        self.bgp()
            .and_then(|b| b.route_reflector_cluster_id.as_deref())
            .and_then(|c| c.parse().ok())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = self.metadata.name.as_str();
        let err = |field: &str, value: &dyn fmt::Display, reason: &str| {
            ConfigError::new(KIND_NODE, name, field, value, reason)
        };
        check_header(KIND_NODE, &self.api_version, &self.kind, &self.metadata)?;
        let Some(b) = self.bgp() else { return Ok(()) };
        if let Some(v4) = &b.ipv4_address {
            let ok = if v4.contains('/') {
                v4.parse::<IpNetwork>().is_ok_and(|n| n.is_ipv4())
            } else {
                v4.parse::<Ipv4Addr>().is_ok()
            };
            if !ok {
                return Err(err(
                    "spec.bgp.ipv4Address",
                    v4,
                    "not an IPv4 address in CIDR form (e.g. 10.0.0.1/24)",
                ));
            }
        }
        if let Some(v6) = &b.ipv6_address {
            let ok = if v6.contains('/') {
                v6.parse::<IpNetwork>().is_ok_and(|n| n.is_ipv6())
            } else {
                v6.parse::<std::net::Ipv6Addr>().is_ok()
            };
            if !ok {
                return Err(err(
                    "spec.bgp.ipv6Address",
                    v6,
                    "not an IPv6 address in CIDR form (e.g. fd00::1/64)",
                ));
            }
        }
        if let Some(t) = &b.ipv4_ipip_tunnel_addr {
            t.parse::<Ipv4Addr>()
                .map_err(|_| err("spec.bgp.ipv4IPIPTunnelAddr", t, "not an IPv4 address"))?;
        }
        if let Some(c) = &b.route_reflector_cluster_id {
            c.parse::<Ipv4Addr>().map_err(|_| {
                err(
                    "spec.bgp.routeReflectorClusterID",
                    c,
                    "a cluster ID is written as an IPv4 address (e.g. 244.0.0.1)",
                )
            })?;
        }
        if let Some(AsNumber(0)) = b.as_number {
            return Err(err("spec.bgp.asNumber", &0, "AS 0 is reserved (RFC 7607)"));
        }
        Ok(())
    }
}

// ----- shared checks -----

fn check_header(
    kind: &str,
    api_version: &str,
    got_kind: &str,
    meta: &ObjectMeta,
) -> Result<(), ConfigError> {
    if api_version != API_VERSION {
        return Err(ConfigError::new(
            kind,
            &meta.name,
            "apiVersion",
            api_version,
            format!("expected {API_VERSION}"),
        ));
    }
    if got_kind != kind {
        return Err(ConfigError::new(
            kind,
            &meta.name,
            "kind",
            got_kind,
            format!("expected {kind}"),
        ));
    }
    let n = &meta.name;
    let valid = !n.is_empty()
        && n.len() <= 253
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && n.starts_with(|c: char| c.is_ascii_alphanumeric())
        && n.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !valid {
        return Err(ConfigError::new(
            kind,
            n,
            "metadata.name",
            n,
            "names are lowercase letters, digits, '-' and '.', starting and ending alphanumeric (RFC 1123)",
        ));
    }
    Ok(())
}

fn check_password(p: &BgpPassword) -> Result<(), (String, String, String)> {
    match &p.secret_key_ref {
        None => Err((
            "secretKeyRef".into(),
            "(missing)".into(),
            "a password comes from secretKeyRef {name, key}".into(),
        )),
        Some(r) if r.name.is_empty() => Err((
            "secretKeyRef.name".into(),
            String::new(),
            "the Secret's name is empty".into(),
        )),
        Some(r) if r.key.is_empty() => Err((
            "secretKeyRef.key".into(),
            String::new(),
            "the Secret's key is empty".into(),
        )),
        Some(_) => Ok(()),
    }
}

fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    s.parse::<IpNetwork>()
        .map_err(|_| "not a CIDR (e.g. 10.96.0.0/12)".to_string())
}

/// A community literal: `aa:nn` (RFC 1997, 16-bit parts) or `aa:nn:mm` (RFC 8092 large, 32-bit parts).
pub fn parse_community(s: &str) -> Result<Vec<u32>, String> {
    let parts: Vec<&str> = s.split(':').collect();
    match parts.len() {
        2 => parts
            .iter()
            .map(|p| {
                p.parse::<u16>()
                    .map(u32::from)
                    .map_err(|_| format!("{p:?} is not 0..65535"))
            })
            .collect(),
        3 => parts
            .iter()
            .map(|p| {
                p.parse::<u32>()
                    .map_err(|_| format!("{p:?} is not 0..4294967295"))
            })
            .collect(),
        _ => Err("a community is aa:nn (standard) or aa:nn:mm (large)".into()),
    }
}

// ----- Secrets (for passwords) -----

/// A Kubernetes Secret as the file datastore carries it (`v1` `Secret` with `data` (base64) or `stringData`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Secret {
    pub namespace: Option<String>,
    pub name: String,
    pub data: BTreeMap<String, String>,
}

// ----- loading -----

/// Why a file of resources was refused. `document` counts from 1 in file order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {reason}")]
    Io { path: String, reason: String },
    #[error("document {document}: not valid YAML: {reason}")]
    Yaml { document: usize, reason: String },
    #[error("document {document}: {error}")]
    Invalid {
        document: usize,
        error: Box<ConfigError>,
    },
    #[error("document {document}: {kind} {name:?} is defined twice (first in document {first})")]
    Duplicate {
        document: usize,
        first: usize,
        kind: String,
        name: String,
    },
}

/// Every resource of one source (file or datastore snapshot), validated together.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConfigSet {
    /// By name: `default` and `node.<name>`.
    pub bgp_configurations: BTreeMap<String, BgpConfiguration>,
    pub bgp_peers: BTreeMap<String, BgpPeer>,
    pub nodes: BTreeMap<String, Node>,
    /// By (namespace, name); namespace "" when none was given.
    pub secrets: BTreeMap<(String, String), Secret>,
    /// Documents of other `projectcalico.org/v3` kinds (IPPool, IPAMConfiguration, ...), kept as parsed YAML
    /// for the parts that own them.
    pub other: Vec<serde_yaml_ng::Value>,
}

fn field_path(path: &serde_path_to_error::Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        p
    }
}

/// The value at a serde path inside a document, rendered for an error message.
fn value_at(v: &serde_yaml_ng::Value, path: &serde_path_to_error::Path) -> String {
    use serde_path_to_error::Segment;
    let mut cur = Some(v);
    for seg in path.iter() {
        cur = match (seg, cur) {
            (Segment::Map { key }, Some(c)) => c.get(key.as_str()),
            (Segment::Seq { index }, Some(c)) => c.get(*index),
            _ => None,
        };
    }
    match cur {
        Some(serde_yaml_ng::Value::String(s)) => s.clone(),
        Some(serde_yaml_ng::Value::Number(n)) => n.to_string(),
        Some(serde_yaml_ng::Value::Bool(b)) => b.to_string(),
        Some(other) => serde_yaml_ng::to_string(other)
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        None => String::new(),
    }
}

/// How [`ConfigSet`] treats fields margay does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fields {
    /// Refuse them (operator files, `margay apply`): a typo must not pass silently.
    Strict,
    /// Ignore them, warned once and counted (the datastore, where a newer Calico may have written them).
    Tolerant,
}

fn typed<T: serde::de::DeserializeOwned>(
    doc: usize,
    kind: &str,
    name: &str,
    v: serde_yaml_ng::Value,
    fields: Fields,
) -> Result<T, LoadError> {
    let decoded = match fields {
        Fields::Strict => serde_path_to_error::deserialize::<_, T>(v.clone()),
        Fields::Tolerant => super::tolerant::tolerant_yaml(kind, name, v.clone()),
    };
    decoded.map_err(|e| {
        let field = field_path(e.path());
        let value = value_at(&v, e.path());
        // serde's message says what was expected ("unknown field `asnumber`, expected one of ...").
        let reason = e.into_inner().to_string();
        LoadError::Invalid {
            document: doc,
            error: Box::new(ConfigError::new(kind, name, &field, value, reason)),
        }
    })
}

impl ConfigSet {
    /// The cluster-wide BGPConfiguration (Calico's defaults when there is none).
    pub fn default_bgp(&self) -> BgpConfiguration {
        self.bgp_configurations
            .get("default")
            .cloned()
            .unwrap_or_else(|| BgpConfiguration {
                api_version: API_VERSION.into(),
                kind: KIND_BGP_CONFIGURATION.into(),
                metadata: ObjectMeta {
                    name: "default".into(),
                    ..Default::default()
                },
                spec: BgpConfigurationSpec::default(),
            })
    }

    /// The BGP port `node` listens on: its `node.<name>` object, else the cluster-wide one, else 179.
    pub fn listen_port(&self, node: &str) -> u16 {
        self.bgp_configurations
            .get(&format!("node.{node}"))
            .and_then(|c| c.spec.listen_port)
            .unwrap_or_else(|| self.default_bgp().listen_port())
    }

    /// Resolve a password reference against the Secrets of the set. Calico reads BGP secrets from its own
    /// namespace; a Secret given without a namespace matches any.
    pub fn resolve_secret(&self, r: &SecretKeyRef) -> Option<&str> {
        self.secrets
            .iter()
            .find(|((_, name), _)| *name == r.name)
            .and_then(|(_, s)| s.data.get(&r.key))
            .map(String::as_str)
    }

    /// Read, parse and validate a multi-document YAML file (`margay reflector --config FILE`). All or nothing.
    pub fn from_file(path: &std::path::Path) -> Result<ConfigSet, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::Io {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        ConfigSet::from_yaml(&text)
    }

    /// Parse and validate a multi-document YAML stream. All or nothing; a field margay does not know is
    /// refused (this is what operators write).
    pub fn from_yaml(text: &str) -> Result<ConfigSet, LoadError> {
        ConfigSet::parse(text, Fields::Strict)
    }

    /// [`ConfigSet::from_yaml`] for resources read from the datastore: fields margay does not know (a newer
    /// Calico wrote them) are ignored, warned about once per kind and field and counted (see
    /// [`super::tolerant`]); everything else is validated as strictly.
    pub fn from_datastore_yaml(text: &str) -> Result<ConfigSet, LoadError> {
        ConfigSet::parse(text, Fields::Tolerant)
    }

    fn parse(text: &str, fields: Fields) -> Result<ConfigSet, LoadError> {
        let mut set = ConfigSet::default();
        let mut seen: BTreeMap<(String, String), usize> = BTreeMap::new();
        for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let doc = i + 1;
            let value = serde_yaml_ng::Value::deserialize(de).map_err(|e| LoadError::Yaml {
                document: doc,
                reason: e.to_string(),
            })?;
            if value.is_null() {
                continue; // an empty document (`---` at the end)
            }
            let get = |k: &str| value.get(k).and_then(|v| v.as_str()).map(str::to_string);
            let kind = get("kind").unwrap_or_default();
            let api = get("apiVersion").unwrap_or_default();
            let name = value
                .get("metadata")
                .and_then(|m| m.get("name"))
                .and_then(|n| n.as_str())
                .unwrap_or("")
                .to_string();
            let invalid = |field: &str, v: &str, reason: &str| LoadError::Invalid {
                document: doc,
                error: Box::new(ConfigError::new(
                    if kind.is_empty() { "(no kind)" } else { &kind },
                    &name,
                    field,
                    v,
                    reason,
                )),
            };
            if kind.is_empty() {
                return Err(invalid(
                    "kind",
                    "",
                    "every document needs apiVersion, kind and metadata.name",
                ));
            }
            if name.is_empty() {
                return Err(invalid("metadata.name", "", "every resource needs a name"));
            }
            let key = (kind.clone(), name.clone());
            if let Some(first) = seen.insert(key, doc) {
                return Err(LoadError::Duplicate {
                    document: doc,
                    first,
                    kind,
                    name,
                });
            }
            let checked = |r: Result<(), ConfigError>| {
                r.map_err(|error| LoadError::Invalid {
                    document: doc,
                    error: Box::new(error),
                })
            };
            match (api.as_str(), kind.as_str()) {
                (API_VERSION, KIND_BGP_CONFIGURATION) => {
                    let c: BgpConfiguration = typed(doc, &kind, &name, value, fields)?;
                    checked(c.validate())?;
                    set.bgp_configurations.insert(name, c);
                }
                (API_VERSION, KIND_BGP_PEER) => {
                    let p: BgpPeer = typed(doc, &kind, &name, value, fields)?;
                    checked(p.validate())?;
                    set.bgp_peers.insert(name, p);
                }
                (API_VERSION, KIND_NODE) => {
                    let n: Node = typed(doc, &kind, &name, value, fields)?;
                    checked(n.validate())?;
                    set.nodes.insert(name, n);
                }
                ("v1", "Secret") => {
                    let s = parse_secret(&value, &name).map_err(|(f, v, r)| invalid(&f, &v, &r))?;
                    set.secrets
                        .insert((s.namespace.clone().unwrap_or_default(), name), s);
                }
                (API_VERSION, _) => set.other.push(value),
                _ => {
                    return Err(invalid(
                        "apiVersion",
                        &api,
                        &format!("unsupported apiVersion/kind {api}/{kind}: expected {API_VERSION} resources or v1 Secrets"),
                    ));
                }
            }
        }
        set.validate_references(&seen)?;
        Ok(set)
    }

    /// Checks that span documents: password secrets exist (unless `optional`).
    pub(crate) fn validate_references(
        &self,
        docs: &BTreeMap<(String, String), usize>,
    ) -> Result<(), LoadError> {
        let mut refs: Vec<(&str, &str, &str, &SecretKeyRef)> = Vec::new();
        for (name, c) in &self.bgp_configurations {
            if let Some(r) = c
                .spec
                .node_mesh_password
                .as_ref()
                .and_then(|p| p.secret_key_ref.as_ref())
            {
                refs.push((
                    KIND_BGP_CONFIGURATION,
                    name,
                    "spec.nodeMeshPassword.secretKeyRef",
                    r,
                ));
            }
        }
        for (name, p) in &self.bgp_peers {
            if let Some(r) = p
                .spec
                .password
                .as_ref()
                .and_then(|p| p.secret_key_ref.as_ref())
            {
                refs.push((KIND_BGP_PEER, name, "spec.password.secretKeyRef", r));
            }
        }
        for (kind, name, field, r) in refs {
            if r.optional != Some(true) && self.resolve_secret(r).is_none() {
                return Err(LoadError::Invalid {
                    document: docs
                        .get(&(kind.to_string(), name.to_string()))
                        .copied()
                        .unwrap_or(0),
                    error: Box::new(ConfigError::new(
                        kind,
                        name,
                        field,
                        format!("{}/{}", r.name, r.key),
                        "no Secret with that name and key in the file (add a v1 Secret document)",
                    )),
                });
            }
        }
        Ok(())
    }
}

fn parse_secret(v: &serde_yaml_ng::Value, name: &str) -> Result<Secret, (String, String, String)> {
    let mut s = Secret {
        namespace: v
            .get("metadata")
            .and_then(|m| m.get("namespace"))
            .and_then(|n| n.as_str())
            .map(str::to_string),
        name: name.to_string(),
        data: BTreeMap::new(),
    };
    if let Some(m) = v.get("data").and_then(|d| d.as_mapping()) {
        for (k, val) in m {
            let k = k.as_str().unwrap_or_default().to_string();
            let raw = val.as_str().unwrap_or_default();
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(raw.trim())
                .map_err(|_| {
                    (
                        format!("data.{k}"),
                        raw.to_string(),
                        "not base64".to_string(),
                    )
                })?;
            let text = String::from_utf8(bytes).map_err(|_| {
                (
                    format!("data.{k}"),
                    raw.to_string(),
                    "not UTF-8 text".to_string(),
                )
            })?;
            s.data.insert(k, text);
        }
    }
    if let Some(m) = v.get("stringData").and_then(|d| d.as_mapping()) {
        for (k, val) in m {
            s.data.insert(
                k.as_str().unwrap_or_default().to_string(),
                val.as_str().unwrap_or_default().to_string(),
            );
        }
    }
    Ok(s)
}
