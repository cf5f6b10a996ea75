//! The `IPAMConfiguration` resource (projectcalico.org/v3, always named `default`) and its stored form.
//!
//! Calico keeps this resource in etcd not under `/calico/resources/v3/...` but as the v1 model `IPAMConfig` at
//! `/calico/ipam/v2/config` with snake_case fields (`strict_affinity`, `auto_allocate_blocks`,
//! `maxBlocksPerHost`, all `omitempty`); [`StoredIpamConfig`] is that JSON, so calicoctl and margay share it.

use serde::{Deserialize, Serialize};

use super::meta::{ConfigError, ObjectMeta, API_VERSION};

pub const KIND: &str = "IPAMConfiguration";
/// The only name Calico accepts.
pub const NAME: &str = "default";

/// The v3 resource as operators write it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfiguration {
    #[serde(default = "kind")]
    pub kind: String,
    #[serde(default = "api_version")]
    pub api_version: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: IpamConfigSpec,
}

fn kind() -> String {
    KIND.to_string()
}

fn api_version() -> String {
    API_VERSION.to_string()
}

fn yes() -> bool {
    true
}

/// `spec` of IPAMConfiguration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IpamConfigSpec {
    /// Never borrow addresses from blocks affine to other nodes.
    #[serde(default)]
    pub strict_affinity: bool,
    /// May a node claim new blocks at all?
    #[serde(default = "yes")]
    pub auto_allocate_blocks: bool,
    /// Most blocks one node may hold; 0 means unlimited (really: Calico silently used 20).
    #[serde(default)]
    pub max_blocks_per_host: u32,
}

impl Default for IpamConfigSpec {
    fn default() -> Self {
        IpamConfigSpec {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: 0,
        }
    }
}

/// The JSON at `/calico/ipam/v2/config` (Calico's `model.IPAMConfig`). Go's `omitempty` means an absent bool is
/// false, so a stored object without `auto_allocate_blocks` disables claiming, exactly as Calico reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StoredIpamConfig {
    #[serde(default, skip_serializing_if = "is_false")]
    pub strict_affinity: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub auto_allocate_blocks: bool,
    #[serde(default, rename = "maxBlocksPerHost", skip_serializing_if = "is_zero")]
    pub max_blocks_per_host: u32,
}

fn is_false(b: &bool) -> bool {
    !*b
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl From<IpamConfigSpec> for StoredIpamConfig {
    fn from(s: IpamConfigSpec) -> Self {
        StoredIpamConfig {
            strict_affinity: s.strict_affinity,
            auto_allocate_blocks: s.auto_allocate_blocks,
            max_blocks_per_host: s.max_blocks_per_host,
        }
    }
}

impl From<StoredIpamConfig> for IpamConfigSpec {
    fn from(s: StoredIpamConfig) -> Self {
        IpamConfigSpec {
            strict_affinity: s.strict_affinity,
            auto_allocate_blocks: s.auto_allocate_blocks,
            max_blocks_per_host: s.max_blocks_per_host,
        }
    }
}

impl IpamConfiguration {
    /// The resource for a spec.
    pub fn new(spec: IpamConfigSpec) -> IpamConfiguration {
        IpamConfiguration {
            kind: kind(),
            api_version: api_version(),
            metadata: ObjectMeta {
                name: NAME.to_string(),
                ..Default::default()
            },
            spec,
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.metadata.name != NAME {
            return Err(ConfigError::new(
                KIND,
                &self.metadata.name,
                "metadata.name",
                &self.metadata.name,
                "the IPAM configuration must be named \"default\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_form_matches_calico_model() {
        let s: StoredIpamConfig =
            serde_json::from_str(r#"{"strict_affinity":true,"maxBlocksPerHost":4}"#).unwrap();
        assert!(s.strict_affinity && !s.auto_allocate_blocks);
        assert_eq!(s.max_blocks_per_host, 4);
        let out =
            serde_json::to_string(&StoredIpamConfig::from(IpamConfigSpec::default())).unwrap();
        assert_eq!(out, r#"{"auto_allocate_blocks":true}"#);
        let r: IpamConfiguration = serde_yaml_ng::from_str(
            "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {strictAffinity: true}\n",
        )
        .unwrap();
        assert!(r.spec.strict_affinity && r.spec.auto_allocate_blocks);
        r.validate().unwrap();
        let mut bad = r.clone();
        bad.metadata.name = "x".into();
        assert_eq!(bad.validate().unwrap_err().field, "metadata.name");
    }
}
