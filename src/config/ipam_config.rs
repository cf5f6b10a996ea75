//! The `IPAMConfiguration` resource (projectcalico.org/v3, always named `default`) and its stored form.
//!
//! Calico keeps this resource in etcd not under `/calico/resources/v3/...` but as the v1 model `IPAMConfig` at
//! `/calico/ipam/v2/config` with snake_case fields (`strict_affinity`, `auto_allocate_blocks`,
//! `maxBlocksPerHost`, all `omitempty`); [`StoredIpamConfig`] is that JSON, so calicoctl and margay share it.
//!
//! margay adds two fields Calico does not have, stored beside Calico's (Go's JSON decoder, hence calicoctl and
//! calico-node, ignores fields it does not know): `emptyBlockGracePeriod` (how long an affine block stays empty
//! before its node releases it; Calico's 15 minutes when unset) and `releasedAddressCooldown` (how long a
//! released address is not handed out again unless the pool would otherwise be exhausted; 30 s when unset).
//! Unset, the node's flags decide (`--ipam-empty-block-grace`, `--ipam-release-cooldown`).

use serde::{Deserialize, Serialize};

use super::bgp::GoDuration;
use super::meta::{ConfigError, ObjectMeta, API_VERSION};

/// Calico's grace before an empty affine block is released (its IPAM GC's 15 minutes).
pub const DEFAULT_EMPTY_BLOCK_GRACE: std::time::Duration = std::time::Duration::from_secs(15 * 60);
/// How long a released address rests before it is handed out again (as other IPAMs do, e.g. 30 s).
pub const DEFAULT_RELEASE_COOLDOWN: std::time::Duration = std::time::Duration::from_secs(30);

pub const KIND: &str = "IPAMConfiguration";
/// The only name Calico accepts.
pub const NAME: &str = "default";
/// Where Calico stores it (its v1 model `IPAMConfig`); `datastore::keys::IPAM_CONFIG_KEY`.
pub const STORED_KEY: &str = "/calico/ipam/v2/config";

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
    /// margay: how long an affine block must have been empty before its node releases it (the node keeps at
    /// least one block per pool it uses). Unset: the node's flag, default 15m.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub empty_block_grace_period: Option<GoDuration>,
    /// margay: how long a released address is not handed out again unless the pool would otherwise be
    /// exhausted. Unset: the node's flag, default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_address_cooldown: Option<GoDuration>,
}

impl Default for IpamConfigSpec {
    fn default() -> Self {
        IpamConfigSpec {
            strict_affinity: false,
            auto_allocate_blocks: true,
            max_blocks_per_host: 0,
            empty_block_grace_period: None,
            released_address_cooldown: None,
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
    #[serde(
        default,
        rename = "emptyBlockGracePeriod",
        skip_serializing_if = "Option::is_none"
    )]
    pub empty_block_grace_period: Option<GoDuration>,
    #[serde(
        default,
        rename = "releasedAddressCooldown",
        skip_serializing_if = "Option::is_none"
    )]
    pub released_address_cooldown: Option<GoDuration>,
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
            empty_block_grace_period: s.empty_block_grace_period,
            released_address_cooldown: s.released_address_cooldown,
        }
    }
}

impl From<StoredIpamConfig> for IpamConfigSpec {
    fn from(s: StoredIpamConfig) -> Self {
        IpamConfigSpec {
            strict_affinity: s.strict_affinity,
            auto_allocate_blocks: s.auto_allocate_blocks,
            max_blocks_per_host: s.max_blocks_per_host,
            empty_block_grace_period: s.empty_block_grace_period,
            released_address_cooldown: s.released_address_cooldown,
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
        // margay's additive fields: camelCase in both forms, Go durations, absent when unset.
        let r: IpamConfiguration = serde_yaml_ng::from_str(
            "apiVersion: projectcalico.org/v3\nkind: IPAMConfiguration\nmetadata: {name: default}\nspec: {emptyBlockGracePeriod: 2m, releasedAddressCooldown: 500ms}\n",
        )
        .unwrap();
        let stored = serde_json::to_string(&StoredIpamConfig::from(r.spec)).unwrap();
        assert_eq!(
            stored,
            r#"{"auto_allocate_blocks":true,"emptyBlockGracePeriod":"120s","releasedAddressCooldown":"0.5s"}"#
        );
        let back: StoredIpamConfig = serde_json::from_str(&stored).unwrap();
        assert_eq!(
            IpamConfigSpec::from(back).released_address_cooldown,
            Some(GoDuration(std::time::Duration::from_millis(500)))
        );
    }
}
