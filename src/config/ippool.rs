//! The `IPPool` resource (projectcalico.org/v3): serde type mirroring Calico's JSON/YAML, defaults as Calico
//! applies them (`clientv3/ippool.go`), and validation that names the field and the reason.

use std::collections::BTreeMap;

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use super::meta::{ConfigError, ObjectMeta, API_VERSION};
use super::selector::Selector;

pub const KIND: &str = "IPPool";
/// Plural used in the etcd key (`/calico/resources/v3/projectcalico.org/ippools/<name>`).
pub const PLURAL: &str = "ippools";

/// Default block size for IPv4 pools.
pub const DEFAULT_BLOCK_SIZE_V4: u8 = 26;
/// Default block size for IPv6 pools.
pub const DEFAULT_BLOCK_SIZE_V6: u8 = 122;

/// An IP pool. Unknown fields are refused here; the datastore reads it through `config::tolerant`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPool {
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    pub spec: IpPoolSpec,
}

fn kind() -> String {
    KIND.to_string()
}

fn api_version() -> String {
    API_VERSION.to_string()
}

/// Encapsulation mode of a pool (`ipipMode`, `vxlanMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum EncapMode {
    #[default]
    Never,
    Always,
    CrossSubnet,
}

/// What addresses from a pool may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum AllowedUse {
    Workload,
    Tunnel,
    LoadBalancer,
}

/// `spec` of an IPPool. Optional fields are written out by [`IpPool::with_defaults`], as calicoctl does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpPoolSpec {
    pub cidr: IpNetwork,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vxlan_mode: Option<EncapMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipip_mode: Option<EncapMode>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub nat_outgoing: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub disabled: bool,
    #[serde(default, rename = "disableBGPExport", skip_serializing_if = "is_false")]
    pub disable_bgp_export: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_uses: Option<Vec<AllowedUse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub assignment_mode: Option<String>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl IpPool {
    /// A pool with Calico's defaults for everything but the name and CIDR.
    pub fn new(name: &str, cidr: IpNetwork) -> IpPool {
        IpPool {
            kind: kind(),
            api_version: api_version(),
            metadata: ObjectMeta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: IpPoolSpec {
                cidr,
                vxlan_mode: None,
                ipip_mode: None,
                nat_outgoing: false,
                disabled: false,
                disable_bgp_export: false,
                block_size: None,
                node_selector: None,
                namespace_selector: None,
                allowed_uses: None,
                assignment_mode: None,
            },
        }
        .with_defaults()
    }

    /// Fill in what Calico fills in on create: block size, encapsulation Never, `all()`, `[Workload, Tunnel]`.
    pub fn with_defaults(mut self) -> IpPool {
        let s = &mut self.spec;
        s.block_size.get_or_insert(if s.cidr.is_ipv4() {
            DEFAULT_BLOCK_SIZE_V4
        } else {
            DEFAULT_BLOCK_SIZE_V6
        });
        s.ipip_mode.get_or_insert(EncapMode::Never);
        s.vxlan_mode.get_or_insert(EncapMode::Never);
        s.node_selector.get_or_insert_with(|| "all()".to_string());
        s.allowed_uses
            .get_or_insert_with(|| vec![AllowedUse::Workload, AllowedUse::Tunnel]);
        s.assignment_mode
            .get_or_insert_with(|| "Automatic".to_string());
        self
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    /// The block prefix length (default 26 / 122).
    pub fn block_size(&self) -> u8 {
        self.spec.block_size.unwrap_or(if self.spec.cidr.is_ipv4() {
            DEFAULT_BLOCK_SIZE_V4
        } else {
            DEFAULT_BLOCK_SIZE_V6
        })
    }

    /// May addresses from this pool go to workloads?
    pub fn allows(&self, usage: AllowedUse) -> bool {
        match &self.spec.allowed_uses {
            None => matches!(usage, AllowedUse::Workload | AllowedUse::Tunnel),
            Some(u) => u.contains(&usage),
        }
    }

    /// Does the pool's nodeSelector select a node with these labels? An empty selector selects all.
    /// A selector that does not parse selects nothing (validation refuses such pools on apply).
    pub fn selects_node(&self, labels: &BTreeMap<String, String>) -> bool {
        match self.spec.node_selector.as_deref().map(str::trim) {
            None | Some("") | Some("all()") => true,
            Some(sel) => Selector::parse(sel).is_ok_and(|s| s.matches(labels)),
        }
    }

    fn err(&self, field: &str, value: impl ToString, reason: impl ToString) -> ConfigError {
        ConfigError::new(KIND, self.name(), field, value, reason)
    }

    /// Check one pool on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.metadata.name.is_empty() {
            return Err(self.err("metadata.name", "", "a pool needs a name"));
        }
        let cidr = self.spec.cidr;
        if cidr.network() != cidr.ip() {
            return Err(self.err(
                "spec.cidr",
                cidr,
                format!(
                    "host bits are set; did you mean {}/{}?",
                    cidr.network(),
                    cidr.prefix()
                ),
            ));
        }
        let bs = self.block_size();
        let (lo, hi) = if cidr.is_ipv4() { (20, 32) } else { (116, 128) };
        if bs < lo || bs > hi {
            return Err(self.err(
                "spec.blockSize",
                bs,
                format!(
                    "must be between {lo} and {hi} for an IPv{} pool",
                    if cidr.is_ipv4() { 4 } else { 6 }
                ),
            ));
        }
        if bs < cidr.prefix() {
            return Err(self.err(
                "spec.blockSize",
                bs,
                format!("a block must fit in the pool: blockSize must be at least the pool's prefix length {}", cidr.prefix()),
            ));
        }
        let ipip = self.spec.ipip_mode.unwrap_or_default();
        let vxlan = self.spec.vxlan_mode.unwrap_or_default();
        if cidr.is_ipv6() && ipip != EncapMode::Never {
            return Err(self.err(
                "spec.ipipMode",
                format!("{ipip:?}"),
                "IPIP is IPv4 only; use Never for an IPv6 pool",
            ));
        }
        if ipip != EncapMode::Never && vxlan != EncapMode::Never {
            return Err(self.err(
                "spec.vxlanMode",
                format!("{vxlan:?}"),
                "ipipMode and vxlanMode cannot both be enabled",
            ));
        }
        if let Some(sel) = &self.spec.node_selector {
            if let Err(e) = Selector::parse(sel) {
                return Err(self.err("spec.nodeSelector", sel, e));
            }
        }
        if let Some(u) = &self.spec.allowed_uses {
            if u.is_empty() {
                return Err(self.err(
                    "spec.allowedUses",
                    "[]",
                    "must name at least one use (Workload, Tunnel, LoadBalancer)",
                ));
            }
        }
        Ok(())
    }
}

/// Check a pool against the pools already stored (other names): CIDRs must not overlap.
pub fn validate_against(pool: &IpPool, others: &[IpPool]) -> Result<(), ConfigError> {
    pool.validate()?;
    for o in others {
        if o.name() == pool.name() {
            if o.spec.cidr != pool.spec.cidr {
                return Err(pool.err(
                    "spec.cidr",
                    pool.spec.cidr,
                    format!("is immutable (stored: {})", o.spec.cidr),
                ));
            }
            if o.block_size() != pool.block_size() {
                return Err(pool.err(
                    "spec.blockSize",
                    pool.block_size(),
                    format!("is immutable (stored: {})", o.block_size()),
                ));
            }
            continue;
        }
        let (a, b) = (pool.spec.cidr, o.spec.cidr);
        if a.is_ipv4() == b.is_ipv4() && (a.contains(b.network()) || b.contains(a.network())) {
            return Err(pool.err(
                "spec.cidr",
                a,
                format!("overlaps pool {:?} ({b})", o.name()),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(cidr: &str) -> IpPool {
        IpPool::new("p", cidr.parse().unwrap())
    }

    #[test]
    fn defaults_and_json_field_names() {
        let p = pool("10.10.0.0/16");
        assert_eq!(p.block_size(), 26);
        assert_eq!(pool("fd00::/48").block_size(), 122);
        let v: serde_json::Value = serde_json::to_value(&p).unwrap();
        assert_eq!(v["kind"], "IPPool");
        assert_eq!(v["apiVersion"], "projectcalico.org/v3");
        assert_eq!(v["spec"]["blockSize"], 26);
        assert_eq!(v["spec"]["ipipMode"], "Never");
        assert_eq!(v["spec"]["vxlanMode"], "Never");
        assert_eq!(v["spec"]["nodeSelector"], "all()");
        assert_eq!(
            v["spec"]["allowedUses"],
            serde_json::json!(["Workload", "Tunnel"])
        );
        let calico = r#"{"kind":"IPPool","apiVersion":"projectcalico.org/v3","metadata":{"name":"default-ipv4-ippool","uid":"1f3c","creationTimestamp":"2024-01-01T00:00:00Z"},"spec":{"cidr":"192.168.0.0/16","vxlanMode":"Never","ipipMode":"Always","natOutgoing":true,"blockSize":26,"nodeSelector":"all()","allowedUses":["Workload","Tunnel"],"disableBGPExport":true}}"#;
        let p: IpPool = serde_json::from_str(calico).unwrap();
        assert!(p.spec.nat_outgoing && p.spec.disable_bgp_export);
        assert_eq!(p.spec.ipip_mode, Some(EncapMode::Always));
        p.validate().unwrap();
    }

    #[test]
    fn node_selector_uses_calico_syntax() {
        let mut p = pool("10.10.0.0/16");
        p.spec.node_selector = Some("has(zone) && zone in {'a', 'b'} && !(edge == 'true')".into());
        p.validate().unwrap();
        let labels = |z: &str| BTreeMap::from([("zone".to_string(), z.to_string())]);
        assert!(p.selects_node(&labels("a")));
        assert!(!p.selects_node(&labels("c")));
        assert!(!p.selects_node(&BTreeMap::new()));
        p.spec.node_selector = Some("zone ==".into());
        assert_eq!(p.validate().unwrap_err().field, "spec.nodeSelector");
        assert!(
            !p.selects_node(&labels("a")),
            "a selector that does not parse selects nothing"
        );
    }

    #[test]
    fn refuses_bad_pools_naming_field_and_reason() {
        let e = pool("10.10.0.1/16").validate().unwrap_err();
        assert_eq!(e.field, "spec.cidr");
        assert!(e.reason.contains("host bits"), "{e}");
        let mut p = pool("10.10.0.0/16");
        p.spec.block_size = Some(19);
        assert_eq!(p.validate().unwrap_err().field, "spec.blockSize");
        p.spec.block_size = Some(33);
        assert_eq!(p.validate().unwrap_err().field, "spec.blockSize");
        let mut p = pool("10.10.0.0/28");
        p.spec.block_size = Some(26);
        assert!(p.validate().unwrap_err().reason.contains("fit"));
        let mut p = pool("fd00::/48");
        p.spec.block_size = Some(115);
        assert_eq!(p.validate().unwrap_err().field, "spec.blockSize");
        p.spec.block_size = Some(128);
        p.validate().unwrap();
        p.spec.ipip_mode = Some(EncapMode::Always);
        assert_eq!(p.validate().unwrap_err().field, "spec.ipipMode");
        let a = IpPool::new("a", "10.0.0.0/16".parse().unwrap());
        let b = IpPool::new("b", "10.0.128.0/24".parse().unwrap());
        let e = validate_against(&b, std::slice::from_ref(&a)).unwrap_err();
        assert!(e.reason.contains("overlaps pool \"a\""), "{e}");
        let c = IpPool::new("c", "10.1.0.0/16".parse().unwrap());
        validate_against(&c, std::slice::from_ref(&a)).unwrap();
        let mut a2 = a.clone();
        a2.spec.block_size = Some(24);
        assert!(validate_against(&a2, &[a])
            .unwrap_err()
            .reason
            .contains("immutable"));
    }
}
