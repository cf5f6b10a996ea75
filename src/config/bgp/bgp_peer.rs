//! The `BGPPeer` resource: spec, peer address parsing and validation.

#[allow(unused_imports)]
use super::*;

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
        crate::config::bfd::BfdConfig::from_meta(KIND_BGP_PEER, &self.metadata)?;
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
        llgr_annotation(KIND_BGP_PEER, &self.metadata)?;
        Ok(())
    }
}

// ----- Node -----
