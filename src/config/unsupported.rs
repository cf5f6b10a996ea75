//! Calico settings margay parses but does not act on, found in the resources a node runs with. Each finding
//! names the resource, the field and the value, and says what margay does instead; the node logs each one
//! once when it first appears and lists them in `margay status`.
//!
//! Two grades: [`Severity::Error`] where ignoring the setting breaks pod connectivity (an encapsulation
//! margay cannot build: traffic would leave unencapsulated), [`Severity::NotSupported`] where margay
//! behaves as if the field were at its default. Pure: the caller says whether the kernel has ipip (IPIP
//! pools are built where it has, and are an error with the fix where it has not).

use super::bgp::{BindMode, ConfigSet};
use super::ippool::{EncapMode, IpPool};

/// How bad ignoring a setting is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    /// Pod traffic breaks (or would, across subnets).
    Error,
    /// margay behaves as if the field were unset.
    NotSupported,
}

/// One setting margay does not honour.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Finding {
    pub severity: Severity,
    pub kind: &'static str,
    pub name: String,
    pub field: &'static str,
    pub value: String,
    /// What margay does instead, and the fix where there is one.
    pub note: String,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {:?}: {} = {}: {}",
            self.kind, self.name, self.field, self.value, self.note
        )
    }
}

/// The exact command that switches `pool` from IPIP to VXLAN (same mode), everything else kept.
pub fn switch_to_vxlan_command(pool: &IpPool) -> String {
    let mut p = pool.clone();
    p.spec.vxlan_mode = p.spec.ipip_mode;
    p.spec.ipip_mode = Some(EncapMode::Never);
    p.metadata.resource_version = None;
    p.metadata.uid = None;
    p.metadata.creation_timestamp = None;
    let yaml = serde_yaml_ng::to_string(&p).unwrap_or_default();
    format!("margay apply -f - <<'EOF'\n{}EOF", yaml)
}

/// Everything in `pools`, the BGP resources of `set` and this node's (`me`) Node resource that margay does
/// not act on.
pub fn scan(
    set: &ConfigSet,
    pools: &[IpPool],
    me: &str,
    kernel_has_ipip: bool,
    node_has_ipv6: bool,
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |severity, kind, name: &str, field, value: String, note: &str| {
        out.push(Finding {
            severity,
            kind,
            name: name.to_string(),
            field,
            value,
            note: note.to_string(),
        })
    };
    for p in pools {
        let name = p.name();
        let ipip = p.spec.ipip_mode.unwrap_or_default();
        // margay builds tunl0 where the kernel can; where it cannot, the pool's routes that need the tunnel
        // are withheld (never sent unencapsulated) and this says why and how to get them back.
        if ipip != EncapMode::Never && !kernel_has_ipip {
            let lost = match ipip {
                EncapMode::CrossSubnet => "routes to its blocks on nodes in other subnets",
                _ => "routes to its blocks on other nodes",
            };
            add(
                Severity::Error,
                "IPPool",
                name,
                "spec.ipipMode",
                format!("{ipip:?}"),
                &format!(
                    "this kernel has no ipip module, so this node cannot build tunl0: the pool's {lost} \
                     are not installed (see the unresolved routes) rather than sent unencapsulated. Load the \
                     module (modprobe ipip) on every node, or switch the pool to VXLAN (same mode, pods keep \
                     their addresses):\n{}",
                    switch_to_vxlan_command(p)
                ),
            );
        }
        let vxlan = p.spec.vxlan_mode.unwrap_or_default();
        if vxlan != EncapMode::Never && p.spec.cidr.is_ipv6() && !node_has_ipv6 {
            add(
                Severity::Error,
                "IPPool",
                name,
                "spec.vxlanMode",
                format!("{vxlan:?}"),
                "this node has no IPv6 address (set IP6 / --ip6), so it builds no vxlan-v6.calico: its IPv6 \
                 pod traffic is not encapsulated",
            );
        }
        if let Some(sel) = p.spec.namespace_selector.as_deref() {
            if !matches!(sel.trim(), "" | "all()") {
                add(
                    Severity::NotSupported,
                    "IPPool",
                    name,
                    "spec.namespaceSelector",
                    sel.to_string(),
                    "ignored: pods of every namespace may get addresses from this pool",
                );
            }
        }
        if let Some(m) = p.spec.assignment_mode.as_deref() {
            if m != "Automatic" {
                add(
                    Severity::NotSupported,
                    "IPPool",
                    name,
                    "spec.assignmentMode",
                    m.to_string(),
                    "ignored: the pool is used for automatic assignment",
                );
            }
        }
    }
    for (name, c) in &set.bgp_configurations {
        let s = &c.spec;
        let k = "BGPConfiguration";
        if s.bind_mode == Some(BindMode::NodeIP) {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.bindMode",
                "NodeIP".into(),
                "ignored: BGP listens on every address",
            );
        }
        if !s.ignored_interfaces.is_empty() {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.ignoredInterfaces",
                s.ignored_interfaces.join(", "),
                "ignored (margay does not import interface routes)",
            );
        }
        if !s.communities.is_empty() {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.communities",
                s.communities
                    .iter()
                    .map(|c| c.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                "ignored: no communities are attached",
            );
        }
        if !s.prefix_advertisements.is_empty() {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.prefixAdvertisements",
                s.prefix_advertisements
                    .iter()
                    .map(|p| p.cidr.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
                "ignored: these prefixes are advertised without communities",
            );
        }
        for (field, v) in [
            (
                "spec.localWorkloadPeeringIPV4",
                &s.local_workload_peering_ipv4,
            ),
            (
                "spec.localWorkloadPeeringIPV6",
                &s.local_workload_peering_ipv6,
            ),
            ("spec.programClusterRoutes", &s.program_cluster_routes),
            ("spec.logSeverityScreen", &s.log_severity_screen),
        ] {
            if let Some(v) = v {
                let note = if field == "spec.logSeverityScreen" {
                    "ignored: margay's log level is RUST_LOG"
                } else {
                    "ignored"
                };
                add(Severity::NotSupported, k, name, field, v.clone(), note);
            }
        }
        for (field, v) in [
            ("spec.ipv4NormalRoutePriority", s.ipv4_normal_route_priority),
            ("spec.ipv6NormalRoutePriority", s.ipv6_normal_route_priority),
        ] {
            if let Some(v) = v {
                add(
                    Severity::NotSupported,
                    k,
                    name,
                    field,
                    v.to_string(),
                    "ignored: margay's routes use its own metric (77)",
                );
            }
        }
    }
    for (name, p) in &set.bgp_peers {
        let s = &p.spec;
        let k = "BGPPeer";
        if let Some(r) = &s.reachable_by {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.reachableBy",
                r.clone(),
                "ignored: no static route to the peer is added",
            );
        }
        if !s.filters.is_empty() {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.filters",
                s.filters.join(", "),
                "ignored: only margay's built-in import/export policy applies (BGPFilter is not supported)",
            );
        }
        if let Some(sel) = &s.local_workload_selector {
            add(
                Severity::NotSupported,
                k,
                name,
                "spec.localWorkloadSelector",
                sel.clone(),
                "ignored: no sessions to local workloads",
            );
        }
    }
    if let Some(node) = set.nodes.get(me) {
        let s = &node.spec;
        // The VXLAN and IPIP tunnel address fields are used (written by the tunnel followers).
        for field in ["wireguard"] {
            if let Some(v) = s.other.get(field) {
                let value = serde_yaml_ng::to_string(v)
                    .unwrap_or_default()
                    .trim()
                    .to_string();
                add(
                    Severity::NotSupported,
                    "Node",
                    me,
                    "spec.wireguard",
                    value,
                    "ignored: margay builds no WireGuard tunnel",
                );
            }
        }
    }
    out.sort();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipip_without_the_module_is_an_error_with_the_exact_fix() {
        let mut p = IpPool::new("calico", "10.244.0.0/16".parse().unwrap());
        p.spec.ipip_mode = Some(EncapMode::Always);
        p.spec.nat_outgoing = true;
        let f = scan(&ConfigSet::default(), &[p], "n1", false, false);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].severity, Severity::Error);
        assert_eq!(f[0].field, "spec.ipipMode");
        let text = f[0].to_string();
        assert!(
            text.contains("IPPool \"calico\": spec.ipipMode = Always"),
            "{text}"
        );
        assert!(text.contains("no ipip module"), "{text}");
        assert!(text.contains("not installed"), "{text}");
        assert!(text.contains("margay apply -f - <<'EOF'"), "{text}");
        assert!(text.contains("vxlanMode: Always"), "{text}");
        assert!(text.contains("ipipMode: Never"), "{text}");
        assert!(text.contains("natOutgoing: true"), "{text}");
        // The command's YAML is a valid pool with the switch made.
        let yaml = text
            .split("<<'EOF'\n")
            .nth(1)
            .and_then(|t| t.split("EOF").next())
            .unwrap();
        let back: IpPool = serde_yaml_ng::from_str(yaml).unwrap();
        assert_eq!(back.spec.vxlan_mode, Some(EncapMode::Always));
        assert_eq!(back.spec.ipip_mode, Some(EncapMode::Never));
        back.validate().unwrap();
    }

    #[test]
    fn ipip_with_the_module_is_built_not_reported() {
        let mut p = IpPool::new("calico", "10.244.0.0/16".parse().unwrap());
        p.spec.ipip_mode = Some(EncapMode::CrossSubnet);
        assert!(scan(&ConfigSet::default(), &[p.clone()], "n1", true, false).is_empty());
        let f = scan(&ConfigSet::default(), &[p], "n1", false, false);
        assert!(
            f[0].note.contains("nodes in other subnets")
                && f[0].note.contains("vxlanMode: CrossSubnet"),
            "{}",
            f[0]
        );
    }

    #[test]
    fn defaults_report_nothing_and_set_fields_are_named() {
        let p = IpPool::new("p", "10.1.0.0/16".parse().unwrap());
        assert!(scan(&ConfigSet::default(), &[p], "n1", true, false).is_empty());
        let set = ConfigSet::from_yaml(
            "apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  \
             bindMode: NodeIP\n  ignoredInterfaces: [\"kube-ipvs0\"]\n---\napiVersion: projectcalico.org/v3\n\
             kind: BGPPeer\nmetadata:\n  name: tor\nspec:\n  peerIP: 10.0.0.1\n  asNumber: 65001\n  \
             filters: [\"f1\"]\n  reachableBy: 10.0.0.254\n",
        )
        .unwrap();
        let f: Vec<String> = scan(&set, &[], "n1", true, false)
            .iter()
            .map(|f| format!("{} {} {}", f.kind, f.name, f.field))
            .collect();
        assert_eq!(
            f,
            [
                "BGPConfiguration default spec.bindMode",
                "BGPConfiguration default spec.ignoredInterfaces",
                "BGPPeer tor spec.filters",
                "BGPPeer tor spec.reachableBy",
            ]
        );
    }
}
