//! What a node exports: the service CIDRs of the cluster's BGPConfiguration that every node originates, and
//! the export policy (Calico's BIRD export filter `calico_export_to_bgp_peers`) the node's RIB applies.
//!
//! Calico (confd's `routes.go`) advertises `serviceClusterIPs` and `serviceExternalIPs` from
//! every node, and `serviceLoadBalancerIPs` too while `serviceLoadBalancerAggregation` is Enabled (the
//! default); with aggregation Disabled it advertises a /32 per LoadBalancer service, which needs the
//! Kubernetes Services API that margay does not watch, so nothing is advertised for them (logged).
//! A node labelled `node.kubernetes.io/exclude-from-external-load-balancers=true` advertises none of them
//! (Calico's reject routes have no counterpart here: margay writes no kernel route for services).
//! The prefixes go to the RIB as local routes with the node as next hop; kube-proxy owns the forwarding,
//! so no kernel route is written here.

use std::collections::BTreeSet;

use ipnetwork::IpNetwork;

use crate::bgp::policy::{ExportRule, Policy, PoolExport};
use crate::config::bgp::{CidrEntry, ConfigSet};
use crate::config::ippool::IpPool;

/// The node's RIB policy: import everything (Calico's import filter accepts all); export what Calico's
/// filter exports: nothing inside a pool with `disableBGPExport`, then the node's own originated routes
/// (blocks, borrowed /32s, service CIDRs), anything inside the service ranges, anything inside an enabled
/// pool (what a reflecting node passes on); nothing else (no transit of a ToR's routes into the mesh).
pub fn export_policy(pools: &[IpPool], services: &BTreeSet<IpNetwork>) -> Policy {
    Policy {
        import_only_within: None,
        export: ExportRule::Calico {
            pools: pools
                .iter()
                .map(|p| PoolExport {
                    cidr: p.spec.cidr,
                    disabled: p.spec.disabled,
                    disable_bgp_export: p.spec.disable_bgp_export,
                })
                .collect(),
            extra_accept: services.iter().copied().collect(),
        },
    }
}

/// The label that keeps a node from advertising service addresses (as in Calico and Kubernetes).
pub const EXCLUDE_LABEL: &str = "node.kubernetes.io/exclude-from-external-load-balancers";

/// The service prefixes the cluster's `default` BGPConfiguration asks node `node` to originate.
pub fn service_prefixes(set: &ConfigSet, node: &str) -> BTreeSet<IpNetwork> {
    let excluded = set
        .nodes
        .get(node)
        .and_then(|n| n.metadata.labels.get(EXCLUDE_LABEL))
        .is_some_and(|v| v == "true");
    if excluded {
        return BTreeSet::new();
    }
    let bgp = set.default_bgp();
    let s = &bgp.spec;
    let mut lists: Vec<(&str, &[CidrEntry])> = vec![
        ("serviceClusterIPs", &s.service_cluster_ips),
        ("serviceExternalIPs", &s.service_external_ips),
    ];
    if bgp.service_load_balancer_aggregation() == "Enabled" {
        lists.push(("serviceLoadBalancerIPs", &s.service_load_balancer_ips));
    }
    let mut out = BTreeSet::new();
    for (field, entries) in lists {
        for e in entries {
            match e.cidr.parse::<IpNetwork>() {
                // Normalised to the network address, as BIRD's static route would be.
                Ok(n) => match IpNetwork::new(n.network(), n.prefix()) {
                    Ok(n) => {
                        out.insert(n);
                    }
                    Err(_) => {
                        tracing::warn!(field, cidr = %e.cidr, "service CIDR not advertised: bad prefix")
                    }
                },
                // Validation of the BGPConfiguration refuses these; kept as a guard.
                Err(err) => {
                    tracing::warn!(field, cidr = %e.cidr, error = %err, "service CIDR not advertised")
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(yaml: &str) -> ConfigSet {
        ConfigSet::from_yaml(yaml).expect("valid set")
    }

    #[test]
    fn cluster_external_and_aggregated_load_balancer_cidrs() {
        let s = set("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceClusterIPs:\n  - cidr: 10.96.0.0/12\n  serviceExternalIPs:\n  - cidr: 192.0.2.0/24\n  serviceLoadBalancerIPs:\n  - cidr: 198.51.100.0/24\n");
        let p: Vec<String> = service_prefixes(&s, "n1")
            .iter()
            .map(|n| n.to_string())
            .collect();
        assert_eq!(p, ["10.96.0.0/12", "192.0.2.0/24", "198.51.100.0/24"]);
    }

    #[test]
    fn load_balancer_cidrs_only_while_aggregated() {
        let s = set("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceLoadBalancerIPs:\n  - cidr: 198.51.100.0/24\n  serviceLoadBalancerAggregation: Disabled\n");
        assert!(service_prefixes(&s, "n1").is_empty());
    }

    #[test]
    fn an_excluded_node_advertises_no_service_addresses() {
        let s = set("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceClusterIPs:\n  - cidr: 10.96.0.0/12\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: n1\n  labels:\n    node.kubernetes.io/exclude-from-external-load-balancers: \"true\"\n---\napiVersion: projectcalico.org/v3\nkind: Node\nmetadata:\n  name: n2\n");
        assert!(service_prefixes(&s, "n1").is_empty());
        assert_eq!(service_prefixes(&s, "n2").len(), 1);
    }

    #[test]
    fn export_policy_is_calicos_filter() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let mut off = IpPool::new("off", n("10.70.0.0/16"));
        off.spec.disable_bgp_export = true;
        let pools = [IpPool::new("pods", n("10.244.0.0/16")), off];
        let services: BTreeSet<IpNetwork> = [n("10.96.0.0/12")].into_iter().collect();
        let p = export_policy(&pools, &services);
        // Own routes and what lies in an enabled pool or a service range.
        assert!(p.export_allowed(&n("10.244.1.0/26"), true));
        assert!(p.export_allowed(&n("10.244.2.0/26"), false));
        assert!(p.export_allowed(&n("10.96.0.10/32"), false));
        // Not transit, not a pool with disableBGPExport (even our own block).
        assert!(!p.export_allowed(&n("0.0.0.0/0"), false));
        assert!(!p.export_allowed(&n("10.70.1.0/26"), true));
        assert!(p.import_allowed(&n("0.0.0.0/0")));
    }

    #[test]
    fn no_configuration_no_services() {
        assert!(service_prefixes(&ConfigSet::default(), "n1").is_empty());
    }
}
