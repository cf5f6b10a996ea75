//! Typed access to the `projectcalico.org/v3` resources the daemons write themselves: their own Node
//! resource and the default IP pools. Reads are tolerant (a field written by a newer Calico is kept and
//! warned about, see `config::tolerant`); writes go through [`Datastore::update_with`], the one CAS retry
//! loop, and patch the stored JSON rather than re-encoding it, so fields margay does not know survive.
//! The operator's `apply`/`get`/`delete` over every kind is the CLI's (`cli::resources`).

use serde_json::{Map, Value};

use super::{keys, Datastore, DatastoreError, Edit, UpdateError, Updated};
use crate::config::bgp::{Node, NodeSpec, KIND_NODE, NODE_PLURAL};
use crate::config::ippool::{self, IpPool};
use crate::config::{tolerant, ObjectMeta, API_VERSION};

/// Why a typed read or write failed.
#[derive(Debug, thiserror::Error)]
pub enum ResourceError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    /// The stored document (or the one we were about to write) does not decode as its kind.
    #[error("{kind} {name:?} at {key} is not valid: {reason}")]
    Invalid {
        kind: &'static str,
        name: String,
        key: String,
        reason: String,
    },
    /// The resource must exist for this write and does not.
    #[error("{kind} {name:?} does not exist in the datastore")]
    Missing { kind: &'static str, name: String },
    /// Another writer kept changing the key while we tried to write it.
    #[error("{0}")]
    Contended(String),
}

impl ResourceError {
    fn from_update(e: UpdateError<ResourceError>) -> ResourceError {
        match e {
            UpdateError::Datastore(e) => ResourceError::Datastore(e),
            UpdateError::Edit(e) => e,
            c @ UpdateError::Contended { .. } => ResourceError::Contended(c.to_string()),
        }
    }
}

/// A Node resource with only its name: what a daemon registers when the operator wrote none.
pub fn new_node(name: &str) -> Node {
    Node {
        api_version: API_VERSION.into(),
        kind: KIND_NODE.into(),
        metadata: ObjectMeta {
            name: name.to_string(),
            ..Default::default()
        },
        spec: NodeSpec::default(),
        status: None,
    }
}

/// Patch the Node resource `name`: `edit` gets its `spec` as JSON (an empty object when it has none) and
/// changes what it owns. With `create`, a missing Node is created from [`new_node`] first; without, a
/// missing Node is [`ResourceError::Missing`]. The stored document must decode as a Node (unknown fields
/// tolerated) before and after the edit; `metadata.resourceVersion` is dropped, as calicoctl does.
pub async fn patch_node(
    ds: &Datastore,
    name: &str,
    create: bool,
    mut edit: impl FnMut(&mut Map<String, Value>),
) -> Result<Updated, ResourceError> {
    let key = keys::resource_key(NODE_PLURAL, name);
    let invalid = |reason: String| ResourceError::Invalid {
        kind: KIND_NODE,
        name: name.to_string(),
        key: key.clone(),
        reason,
    };
    ds.update_with(&key, |stored| {
        let mut doc: Value = match stored {
            Some(bytes) => {
                let doc: Value =
                    serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
                tolerant::tolerant::<Node>(KIND_NODE, doc.clone())
                    .map_err(|e| invalid(e.to_string()))?;
                doc
            }
            None if create => {
                serde_json::to_value(new_node(name)).map_err(|e| invalid(e.to_string()))?
            }
            None => {
                return Err(ResourceError::Missing {
                    kind: KIND_NODE,
                    name: name.to_string(),
                })
            }
        };
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| invalid("a Node is a JSON object".into()))?;
        if let Some(m) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("resourceVersion");
        }
        let spec = obj
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        if spec.is_null() {
            *spec = Value::Object(Map::new());
        }
        edit(
            spec.as_object_mut()
                .ok_or_else(|| invalid("a Node's spec is a JSON object".into()))?,
        );
        tolerant::tolerant::<Node>(KIND_NODE, doc.clone())
            .map_err(|e| invalid(format!("after our edit: {e}")))?;
        Ok(Edit::Put(
            serde_json::to_vec(&doc).map_err(|e| invalid(e.to_string()))?,
        ))
    })
    .await
    .map_err(ResourceError::from_update)
}

/// `spec.bgp` of a Node's spec as JSON, created empty when missing or null (for [`patch_node`] edits).
pub fn bgp_of(spec: &mut Map<String, Value>) -> &mut Map<String, Value> {
    let bgp = spec
        .entry("bgp")
        .or_insert_with(|| Value::Object(Map::new()));
    if !bgp.is_object() {
        *bgp = Value::Object(Map::new());
    }
    match bgp {
        Value::Object(m) => m,
        // Made an object just above.
        _ => unreachable!("spec.bgp was just made an object"),
    }
}

/// Delete the Node resource `name` (as `calicoctl delete node` does: the other nodes then drop it from
/// their mesh). Ok(false) when there was none.
pub async fn delete_node(ds: &Datastore, name: &str) -> Result<bool, ResourceError> {
    let key = keys::resource_key(NODE_PLURAL, name);
    match ds
        .update_with(&key, |_| Ok::<_, ResourceError>(Edit::Delete))
        .await
        .map_err(ResourceError::from_update)?
    {
        Updated::Deleted => Ok(true),
        _ => Ok(false),
    }
}

/// Every IP pool in the datastore (read tolerantly).
pub async fn list_pools(ds: &Datastore) -> Result<Vec<IpPool>, ResourceError> {
    let (kvs, _) = ds.list(&keys::resource_prefix(ippool::PLURAL)).await?;
    kvs.iter()
        .map(|kv| {
            tolerant::tolerant_slice(ippool::KIND, &kv.value).map_err(|e| ResourceError::Invalid {
                kind: ippool::KIND,
                name: kv.key.rsplit('/').next().unwrap_or_default().to_string(),
                key: kv.key.clone(),
                reason: e.to_string(),
            })
        })
        .collect()
}

/// Create `pool` (Calico's defaults filled in, validated) unless a pool of that name exists. Ok(true) when
/// this call created it. Overlaps with other pools are the caller's to rule out (the daemons create their
/// default pool only when there is none of its family).
pub async fn create_pool(ds: &Datastore, pool: IpPool) -> Result<bool, ResourceError> {
    let mut pool = pool.with_defaults();
    pool.metadata.resource_version = None;
    let key = keys::resource_key(ippool::PLURAL, pool.name());
    let invalid = |reason: String| ResourceError::Invalid {
        kind: ippool::KIND,
        name: pool.name().to_string(),
        key: key.clone(),
        reason,
    };
    pool.validate().map_err(|e| invalid(e.to_string()))?;
    let bytes = serde_json::to_vec(&pool).map_err(|e| invalid(e.to_string()))?;
    Ok(ds.create(&key, bytes).await?.is_some())
}
