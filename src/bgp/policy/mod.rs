//! Import and export rules the RIB applies per prefix: Calico's export logic (Calico's BIRD export filter) as far as a RIB
//! can express it, pool-only import, and the "export everything" rule of a plain route reflector.
//! Max-prefix is per peer and lives in `rib::PeerInfo::max_prefixes`.
//!
//! It owns no state and does no I/O: the node builds a [`Policy`] from its IP pools and service ranges and
//! hands it to the RIB (`RibInput::SetPolicy`). Interface-based rules of Calico's filter (rejecting `*.cali`
//! device routes towards iBGP peers) have no meaning here: the RIB only sees prefixes the node chose to
//! originate.

use ipnetwork::IpNetwork;

/// Is `inner` entirely inside `outer` (same family, at least as long)?
pub fn within(inner: &IpNetwork, outer: &IpNetwork) -> bool {
    match (inner, outer) {
        (IpNetwork::V4(i), IpNetwork::V4(o)) => o.prefix() <= i.prefix() && o.contains(i.network()),
        (IpNetwork::V6(i), IpNetwork::V6(o)) => o.prefix() <= i.prefix() && o.contains(i.network()),
        _ => false,
    }
}

/// One IP pool as export needs it (Calico IPPool `cidr`, `disabled`, `disableBGPExport`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolExport {
    pub cidr: IpNetwork,
    pub disabled: bool,
    pub disable_bgp_export: bool,
}

/// Which routes may be sent to peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ExportRule {
    /// Send every best path (subject to reflection rules): `margay reflector`, BIRD's `export all`.
    #[default]
    All,
    /// Calico's `calico_export_to_bgp_peers` (Calico's BIRD export filter), in order:
    /// 1. reject anything inside a pool with `disableBGPExport`;
    /// 2. accept locally originated routes (affine blocks, borrowed /32s, service CIDRs: the node originates
    ///    exactly what Calico's static protocol and aggregation rules would export);
    /// 3. accept anything inside `extra_accept` (service cluster/external/LB ranges, so an RR reflects the
    ///    Local-policy /32s, step 7);
    /// 4. accept anything inside an enabled pool (reflected blocks and borrowed /32s, step 8);
    /// 5. reject the rest.
    Calico {
        pools: Vec<PoolExport>,
        extra_accept: Vec<IpNetwork>,
    },
}

/// The RIB's import and export policy.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Policy {
    /// Pool-only import: when set, accept only prefixes inside one of these CIDRs. None = import everything
    /// (Calico's default: its import filter accepts all).
    pub import_only_within: Option<Vec<IpNetwork>>,
    pub export: ExportRule,
}

impl Policy {
    /// Export everything, import everything: the standalone route reflector.
    pub fn accept_all() -> Policy {
        Policy::default()
    }

    /// May a route for `prefix` received from a peer enter the RIB?
    pub fn import_allowed(&self, prefix: &IpNetwork) -> bool {
        match &self.import_only_within {
            None => true,
            Some(cidrs) => cidrs.iter().any(|c| within(prefix, c)),
        }
    }

    /// May the best path for `prefix` be sent to peers? `local`: originated by this speaker.
    pub fn export_allowed(&self, prefix: &IpNetwork, local: bool) -> bool {
        match &self.export {
            ExportRule::All => true,
            ExportRule::Calico {
                pools,
                extra_accept,
            } => {
                if pools
                    .iter()
                    .any(|p| p.disable_bgp_export && within(prefix, &p.cidr))
                {
                    return false;
                }
                if local || extra_accept.iter().any(|c| within(prefix, c)) {
                    return true;
                }
                pools.iter().any(|p| !p.disabled && within(prefix, &p.cidr))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> IpNetwork {
        s.parse().expect("test prefix")
    }

    #[test]
    fn pool_only_import() {
        let p = Policy {
            import_only_within: Some(vec![n("10.10.0.0/16")]),
            ..Policy::default()
        };
        assert!(p.import_allowed(&n("10.10.3.0/26")));
        assert!(p.import_allowed(&n("10.10.0.0/16")));
        assert!(
            !p.import_allowed(&n("10.0.0.0/8")),
            "a supernet of the pool is outside it"
        );
        assert!(!p.import_allowed(&n("192.168.0.0/24")));
        assert!(!p.import_allowed(&n("fd00::/64")));
        assert!(Policy::accept_all().import_allowed(&n("0.0.0.0/0")));
    }

    #[test]
    fn calico_export_rules() {
        let p = Policy {
            import_only_within: None,
            export: ExportRule::Calico {
                pools: vec![
                    PoolExport {
                        cidr: n("10.10.0.0/16"),
                        disabled: false,
                        disable_bgp_export: false,
                    },
                    PoolExport {
                        cidr: n("10.20.0.0/16"),
                        disabled: false,
                        disable_bgp_export: true,
                    },
                    PoolExport {
                        cidr: n("10.30.0.0/16"),
                        disabled: true,
                        disable_bgp_export: false,
                    },
                ],
                extra_accept: vec![n("10.96.0.0/12")],
            },
        };
        // Reflected block inside an enabled pool: accepted (step 8).
        assert!(p.export_allowed(&n("10.10.1.0/26"), false));
        // disableBGPExport wins over everything, local routes included (step 1).
        assert!(!p.export_allowed(&n("10.20.1.0/26"), false));
        assert!(!p.export_allowed(&n("10.20.1.0/26"), true));
        // Disabled pool: its reflected routes are not re-exported, our own blocks still are.
        assert!(!p.export_allowed(&n("10.30.1.0/26"), false));
        assert!(p.export_allowed(&n("10.30.1.0/26"), true));
        // Service range (step 7) and anything else (step 9).
        assert!(p.export_allowed(&n("10.96.0.10/32"), false));
        assert!(!p.export_allowed(&n("8.8.8.0/24"), false));
        assert!(p.export_allowed(&n("8.8.8.0/24"), true));
    }
}
