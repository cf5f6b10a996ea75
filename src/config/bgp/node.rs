//! The `Node` resource as the BGP side reads it: `spec.bgp` (addresses, AS, reflector cluster id), tunnel
//! addresses and labels.

#[allow(unused_imports)]
use super::*;

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
pub(super) fn addr_of(s: &str) -> Option<IpAddr> {
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
