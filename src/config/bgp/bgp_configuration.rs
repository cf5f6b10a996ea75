//! The `BGPConfiguration` resource: spec, Calico's defaults and validation.

#[allow(unused_imports)]
use super::*;

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
        llgr_annotation(KIND_BGP_CONFIGURATION, &self.metadata)?;
        crate::config::bfd::BfdConfig::from_meta(KIND_BGP_CONFIGURATION, &self.metadata)?;
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
