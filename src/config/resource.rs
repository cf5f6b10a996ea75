//! What every stored resource kind has in common, and the registry of the kinds margay reads and writes.
//!
//! [`Resource`] is implemented by IPPool, IPAMConfiguration, BGPConfiguration, BGPPeer and Node: its kind,
//! where it is stored ([`Storage`], the plural of its etcd key), its defaults and validation, the strict
//! decode of what an operator writes and the tolerant decode of what the datastore holds, and its stored
//! form. The generic datastore operations (`datastore::resources::{get, list, create, update_with, delete}`)
//! and the CLI's `apply`/`get`/`delete` are written once over it; [`KINDS`] is the same set for code that
//! only knows a kind by name (the CLI, the daemon's config feed).
//!
//! Knows nothing of etcd: the key layout is `datastore::keys`, which builds keys from [`Storage`].

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use super::bgp::{
    BgpConfiguration, BgpPeer, Node, BGP_CONFIGURATION_PLURAL, BGP_PEER_PLURAL,
    KIND_BGP_CONFIGURATION, KIND_BGP_PEER, KIND_NODE, NODE_PLURAL,
};
use super::ipam_config::{self, IpamConfiguration, StoredIpamConfig};
use super::ippool::{self, IpPool};
use super::meta::{ConfigError, ObjectMeta, API_VERSION};
use super::tolerant;

/// Where a kind's objects are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    /// One object per name under `/calico/resources/v3/projectcalico.org/<plural>/<name>`.
    Resources { plural: &'static str },
    /// A single object at a fixed key, whatever its name (IPAMConfiguration at `/calico/ipam/v2/config`).
    Singleton {
        key: &'static str,
        name: &'static str,
    },
}

/// A document that cannot be turned into its stored form, or stored bytes that cannot be read back.
#[derive(Debug, thiserror::Error)]
pub enum DocumentError {
    /// The document decodes but is not valid (names the resource, field and value).
    #[error(transparent)]
    Invalid(#[from] ConfigError),
    /// Not JSON of the expected shape.
    #[error("{what}: {reason}")]
    Json { what: String, reason: String },
}

impl DocumentError {
    fn json(what: impl Into<String>, e: impl std::fmt::Display) -> DocumentError {
        DocumentError::Json {
            what: what.into(),
            reason: e.to_string(),
        }
    }
}

/// A `projectcalico.org/v3` resource kind.
pub trait Resource: Serialize + DeserializeOwned + Sized {
    /// `kind:` as written in documents.
    const KIND: &'static str;
    /// Where its objects are stored.
    const STORAGE: Storage;

    fn meta(&self) -> &ObjectMeta;
    fn meta_mut(&mut self) -> &mut ObjectMeta;

    /// The object's name.
    fn name(&self) -> &str {
        &self.meta().name
    }

    /// Fill in what calicoctl fills in before storing (a no-op for most kinds).
    fn with_defaults(self) -> Self {
        self
    }

    /// Errors name the resource, the field and the bad value.
    fn validate(&self) -> Result<(), ConfigError>;

    /// [`Resource::validate`], and check against the other stored objects of the kind (read tolerantly).
    fn validate_against(&self, _others: &[Self]) -> Result<(), ConfigError> {
        self.validate()
    }

    /// What an operator wrote: a field margay does not know is refused with its path.
    fn strict(doc: &Value) -> Result<Self, ConfigError> {
        tolerant::strict(Self::KIND, doc)
    }

    /// What the datastore holds: fields a newer Calico wrote are skipped and reported.
    fn from_stored(bytes: &[u8]) -> Result<Self, ConfigError> {
        tolerant::tolerant_slice(Self::KIND, bytes)
    }

    /// The bytes to store.
    fn to_stored(&self) -> Result<Vec<u8>, DocumentError> {
        serde_json::to_vec(self).map_err(|e| DocumentError::json(Self::KIND, e))
    }

    /// Stored bytes -> the v3 document as `get` shows it: the stored JSON itself (so fields margay does
    /// not know are shown too), with `apiVersion` and `kind` filled in when the writer left them out.
    fn stored_document(bytes: &[u8]) -> Result<Value, DocumentError> {
        let mut v: Value = serde_json::from_slice(bytes)
            .map_err(|e| DocumentError::json(format!("stored {}", Self::KIND), e))?;
        if let Some(o) = v.as_object_mut() {
            o.entry("apiVersion").or_insert_with(|| API_VERSION.into());
            o.entry("kind").or_insert_with(|| Self::KIND.into());
        }
        Ok(v)
    }
}

/// Operator document `doc` of kind `R` -> (name, stored bytes): strict decode, defaults, validation against
/// the other stored objects of the kind (`others`, v3 documents), `resourceVersion` dropped.
pub fn encode<R: Resource>(
    doc: &Value,
    others: &[Value],
) -> Result<(String, Vec<u8>), DocumentError> {
    let mut r = R::strict(doc)?.with_defaults();
    // The stored objects were written by whoever: read them as the daemon does.
    let others: Vec<R> = others
        .iter()
        .filter_map(|o| tolerant::tolerant(R::KIND, o.clone()).ok())
        .collect();
    r.validate_against(&others)?;
    r.meta_mut().resource_version = None;
    Ok((r.name().to_string(), r.to_stored()?))
}

impl Resource for IpPool {
    const KIND: &'static str = ippool::KIND;
    const STORAGE: Storage = Storage::Resources {
        plural: ippool::PLURAL,
    };
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
    fn with_defaults(self) -> Self {
        IpPool::with_defaults(self)
    }
    fn validate(&self) -> Result<(), ConfigError> {
        IpPool::validate(self)
    }
    fn validate_against(&self, others: &[Self]) -> Result<(), ConfigError> {
        ippool::validate_against(self, others)
    }
}

impl Resource for IpamConfiguration {
    const KIND: &'static str = ipam_config::KIND;
    const STORAGE: Storage = Storage::Singleton {
        key: ipam_config::STORED_KEY,
        name: ipam_config::NAME,
    };
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
    fn validate(&self) -> Result<(), ConfigError> {
        IpamConfiguration::validate(self)
    }
    /// Stored as Calico's v1 model (snake_case, no metadata), not as the v3 document.
    fn from_stored(bytes: &[u8]) -> Result<Self, ConfigError> {
        let s: StoredIpamConfig = tolerant::tolerant_slice(Self::KIND, bytes)?;
        Ok(IpamConfiguration::new(s.into()))
    }
    fn to_stored(&self) -> Result<Vec<u8>, DocumentError> {
        serde_json::to_vec(&StoredIpamConfig::from(self.spec))
            .map_err(|e| DocumentError::json(Self::KIND, e))
    }
    fn stored_document(bytes: &[u8]) -> Result<Value, DocumentError> {
        serde_json::to_value(Self::from_stored(bytes)?)
            .map_err(|e| DocumentError::json(Self::KIND, e))
    }
}

macro_rules! bgp_resource {
    ($t:ty, $kind:expr, $plural:expr) => {
        impl Resource for $t {
            const KIND: &'static str = $kind;
            const STORAGE: Storage = Storage::Resources { plural: $plural };
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
            fn validate(&self) -> Result<(), ConfigError> {
                <$t>::validate(self)
            }
        }
    };
}

bgp_resource!(
    BgpConfiguration,
    KIND_BGP_CONFIGURATION,
    BGP_CONFIGURATION_PLURAL
);
bgp_resource!(BgpPeer, KIND_BGP_PEER, BGP_PEER_PLURAL);
bgp_resource!(Node, KIND_NODE, NODE_PLURAL);

/// Operator document and the other stored objects of its kind (v3 documents) -> (name, stored bytes).
pub type EncodeFn = fn(&Value, &[Value]) -> Result<(String, Vec<u8>), DocumentError>;

/// One kind for code that knows it by name: [`Resource`]'s operations as plain functions.
pub struct KindInfo {
    pub kind: &'static str,
    /// Names accepted on the command line (lower case): `ippool`, `ippools`, `pool`, ...
    pub aliases: &'static [&'static str],
    pub storage: Storage,
    /// Part of the BGP configuration a node loads, and refuses, as one set.
    pub bgp_set: bool,
    /// [`encode`] for this kind.
    pub encode: EncodeFn,
    /// [`Resource::stored_document`] for this kind.
    pub decode: fn(&[u8]) -> Result<Value, DocumentError>,
}

impl KindInfo {
    const fn of<R: Resource>(aliases: &'static [&'static str], bgp_set: bool) -> KindInfo {
        KindInfo {
            kind: R::KIND,
            aliases,
            storage: R::STORAGE,
            bgp_set,
            encode: encode::<R>,
            decode: R::stored_document,
        }
    }

    /// The plural of a kind stored one object per name (None for a singleton).
    pub fn plural(&self) -> Option<&'static str> {
        match self.storage {
            Storage::Resources { plural } => Some(plural),
            Storage::Singleton { .. } => None,
        }
    }
}

/// Every kind margay stores.
pub static KINDS: &[KindInfo] = &[
    KindInfo::of::<IpPool>(&["ippool", "ippools", "pool", "pools", "ipp"], false),
    KindInfo::of::<IpamConfiguration>(
        &[
            "ipamconfiguration",
            "ipamconfigurations",
            "ipamconfig",
            "ipamconfigs",
        ],
        false,
    ),
    KindInfo::of::<BgpConfiguration>(
        &[
            "bgpconfiguration",
            "bgpconfigurations",
            "bgpconfig",
            "bgpconfigs",
        ],
        true,
    ),
    KindInfo::of::<BgpPeer>(&["bgppeer", "bgppeers", "bgpp", "peer", "peers"], true),
    KindInfo::of::<Node>(&["node", "nodes", "no"], true),
];

/// A kind by its `kind:` or an alias (case-insensitive).
pub fn kind(name: &str) -> Option<&'static KindInfo> {
    KINDS.iter().find(|k| {
        k.kind.eq_ignore_ascii_case(name) || k.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_kind_and_alias() {
        assert_eq!(kind("ippools").map(|k| k.kind), Some(ippool::KIND));
        assert_eq!(kind("BGPPeer").map(|k| k.kind), Some(KIND_BGP_PEER));
        assert_eq!(kind("IPAMConfig").map(|k| k.kind), Some(ipam_config::KIND));
        assert!(kind("bgpfilter").is_none());
        assert_eq!(kind("nodes").and_then(KindInfo::plural), Some(NODE_PLURAL));
        assert!(kind("ipamconfig").is_some_and(|k| k.plural().is_none()));
    }

    #[test]
    fn encode_validates_and_drops_resource_version() {
        let doc = serde_json::json!({"apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": "p", "resourceVersion": "7"}, "spec": {"cidr": "10.0.0.0/16"}});
        let (name, bytes) = encode::<IpPool>(&doc, &[]).expect("valid pool");
        assert_eq!(name, "p");
        let stored: Value = serde_json::from_slice(&bytes).expect("json");
        assert!(stored.pointer("/metadata/resourceVersion").is_none());
        // Defaults are written out, as calicoctl does.
        assert_eq!(stored.pointer("/spec/blockSize"), Some(&Value::from(26)));
        let overlap = serde_json::json!({"apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": "q"}, "spec": {"cidr": "10.0.1.0/24"}});
        let e = encode::<IpPool>(&overlap, &[stored]).expect_err("overlaps p");
        assert!(matches!(e, DocumentError::Invalid(_)), "{e}");
        let typo = serde_json::json!({"apiVersion": API_VERSION, "kind": "IPPool",
            "metadata": {"name": "q"}, "spec": {"cidr": "10.1.0.0/24", "cidrr": 1}});
        assert!(encode::<IpPool>(&typo, &[]).is_err());
    }
}
