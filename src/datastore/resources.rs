//! Typed access to the stored `projectcalico.org/v3` resources, generic over [`Resource`]: [`get`], [`list`],
//! [`create`], [`update_with`] and [`delete`] for code that knows its kind at compile time (the daemons'
//! own Node resource and default pools), and [`list_documents`], [`put_document`], [`delete_document`] for
//! code that knows a kind only by name through the registry `config::resource::KINDS` (the CLI's
//! `apply`/`get`/`delete`). Reads are tolerant (a field written by a newer Calico is kept and warned about,
//! see `config::tolerant`); [`update_with`] goes through [`Datastore::update_with`], the one CAS retry loop,
//! and patches the stored JSON rather than re-encoding it, so fields margay does not know survive.

use serde_json::{Map, Value};

use super::{
    keys, Datastore, DatastoreError, Edit, Guard, TxnOutcome, UpdateError, Updated, Write,
};
use crate::config::bgp::{Node, NodeSpec, KIND_NODE};
use crate::config::ippool::IpPool;
use crate::config::resource::{DocumentError, KindInfo, Resource, Storage};
use crate::config::{ObjectMeta, API_VERSION};

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
    /// A stored object that cannot be shown as a document (for code that knows the kind by name).
    #[error(transparent)]
    Document(#[from] DocumentError),
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

/// The key of `R`'s object `name`.
pub fn key<R: Resource>(name: &str) -> String {
    keys::storage_key(&R::STORAGE, name)
}

fn invalid<R: Resource>(name: &str, key: &str, reason: impl ToString) -> ResourceError {
    ResourceError::Invalid {
        kind: R::KIND,
        name: name.to_string(),
        key: key.to_string(),
        reason: reason.to_string(),
    }
}

/// The stored object `name` (read tolerantly) and its mod_revision; None when absent.
pub async fn get<R: Resource>(
    ds: &Datastore,
    name: &str,
) -> Result<Option<(R, i64)>, ResourceError> {
    let key = key::<R>(name);
    match ds.get(&key).await? {
        Some(kv) => R::from_stored(&kv.value)
            .map(|r| Some((r, kv.mod_revision)))
            .map_err(|e| invalid::<R>(name, &key, e)),
        None => Ok(None),
    }
}

/// Every stored object of kind `R` (read tolerantly).
pub async fn list<R: Resource>(ds: &Datastore) -> Result<Vec<R>, ResourceError> {
    let kvs = match R::STORAGE {
        Storage::Resources { plural } => ds.list(&keys::resource_prefix(plural)).await?.0,
        Storage::Singleton { key, .. } => ds.get(key).await?.into_iter().collect(),
    };
    kvs.iter()
        .map(|kv| {
            let name = kv.key.rsplit('/').next().unwrap_or_default();
            R::from_stored(&kv.value).map_err(|e| invalid::<R>(name, &kv.key, e))
        })
        .collect()
}

/// Create `r` (defaults filled in, validated, `resourceVersion` dropped) unless an object of that name
/// exists. Ok(true) when this call created it. Checks against the other stored objects (pool overlaps)
/// are the caller's.
pub async fn create<R: Resource>(ds: &Datastore, r: R) -> Result<bool, ResourceError> {
    let mut r = r.with_defaults();
    r.meta_mut().resource_version = None;
    let key = key::<R>(r.name());
    r.validate().map_err(|e| invalid::<R>(r.name(), &key, e))?;
    let bytes = r.to_stored().map_err(|e| invalid::<R>(r.name(), &key, e))?;
    Ok(ds.create(&key, bytes).await?.is_some())
}

/// Patch the stored object `name` of kind `R`: `edit` gets the stored JSON document and changes what it
/// owns. A missing object is created from `create` first when given, else the call fails with
/// [`ResourceError::Missing`]. The document must decode as `R` (unknown fields tolerated) before and after
/// the edit; `metadata.resourceVersion` is dropped, as calicoctl does. Retried by compare-and-swap.
pub async fn update_with<R: Resource>(
    ds: &Datastore,
    name: &str,
    create: Option<R>,
    mut edit: impl FnMut(&mut Map<String, Value>),
) -> Result<Updated, ResourceError> {
    let key = key::<R>(name);
    let invalid = |reason: String| invalid::<R>(name, &key, reason);
    ds.update_with(&key, |stored| {
        let mut doc: Value = match (stored, &create) {
            (Some(bytes), _) => {
                let doc = serde_json::from_slice(bytes).map_err(|e| invalid(e.to_string()))?;
                R::from_stored(bytes).map_err(|e| invalid(e.to_string()))?;
                doc
            }
            (None, Some(new)) => serde_json::to_value(new).map_err(|e| invalid(e.to_string()))?,
            (None, None) => {
                return Err(ResourceError::Missing {
                    kind: R::KIND,
                    name: name.to_string(),
                })
            }
        };
        let obj = doc
            .as_object_mut()
            .ok_or_else(|| invalid(format!("a {} is a JSON object", R::KIND)))?;
        if let Some(m) = obj.get_mut("metadata").and_then(|m| m.as_object_mut()) {
            m.remove("resourceVersion");
        }
        edit(obj);
        let bytes = serde_json::to_vec(&doc).map_err(|e| invalid(e.to_string()))?;
        R::from_stored(&bytes).map_err(|e| invalid(format!("after our edit: {e}")))?;
        Ok(Edit::Put(bytes))
    })
    .await
    .map_err(ResourceError::from_update)
}

/// Delete the stored object `name` of kind `R`, whatever its revision. Ok(false) when there was none.
pub async fn delete<R: Resource>(ds: &Datastore, name: &str) -> Result<bool, ResourceError> {
    match ds
        .update_with(&key::<R>(name), |_| Ok::<_, ResourceError>(Edit::Delete))
        .await
        .map_err(ResourceError::from_update)?
    {
        Updated::Deleted => Ok(true),
        _ => Ok(false),
    }
}

/// One stored object of a kind known by name.
#[derive(Debug, Clone)]
pub struct StoredDocument {
    pub name: String,
    pub mod_revision: i64,
    /// The v3 document (`KindInfo::decode`).
    pub doc: Value,
}

/// Every stored object of kind `k`, as v3 documents.
pub async fn list_documents(
    ds: &Datastore,
    k: &KindInfo,
) -> Result<Vec<StoredDocument>, ResourceError> {
    let mut out = Vec::new();
    match k.storage {
        Storage::Resources { plural } => {
            let prefix = keys::resource_prefix(plural);
            for kv in ds.list(&prefix).await?.0 {
                out.push(StoredDocument {
                    name: kv.key.trim_start_matches(&prefix).to_string(),
                    mod_revision: kv.mod_revision,
                    doc: (k.decode)(&kv.value)?,
                });
            }
        }
        Storage::Singleton { key, name } => {
            if let Some(kv) = ds.get(key).await? {
                out.push(StoredDocument {
                    name: name.to_string(),
                    mod_revision: kv.mod_revision,
                    doc: (k.decode)(&kv.value)?,
                });
            }
        }
    }
    Ok(out)
}

/// Write `bytes` (from `KindInfo::encode`) as the object `name` of kind `k`, if it is still as read:
/// absent (`mod_revision` None) or last written at `mod_revision`. Ok(false) when someone wrote it since.
pub async fn put_document(
    ds: &Datastore,
    k: &KindInfo,
    name: &str,
    bytes: Vec<u8>,
    mod_revision: Option<i64>,
) -> Result<bool, ResourceError> {
    let key = keys::storage_key(&k.storage, name);
    let guard = match mod_revision {
        Some(rev) => Guard::ModRevision(key.clone(), rev),
        None => Guard::Absent(key.clone()),
    };
    Ok(matches!(
        ds.txn(&[guard], &[Write::Put(key, bytes)]).await?,
        TxnOutcome::Committed { .. }
    ))
}

/// Delete the object `name` of kind `k` if it was last written at `mod_revision`. Ok(false) when someone
/// wrote or deleted it since.
pub async fn delete_document(
    ds: &Datastore,
    k: &KindInfo,
    name: &str,
    mod_revision: i64,
) -> Result<bool, ResourceError> {
    let key = keys::storage_key(&k.storage, name);
    Ok(ds.delete(&key, mod_revision).await?.is_some())
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

/// Patch the Node resource `name` ([`update_with`]): `edit` gets its `spec` as JSON (an empty object when it
/// has none) and changes what it owns. With `create`, a missing Node is created from [`new_node`] first;
/// without, a missing Node is [`ResourceError::Missing`].
pub async fn patch_node(
    ds: &Datastore,
    name: &str,
    create: bool,
    mut edit: impl FnMut(&mut Map<String, Value>),
) -> Result<Updated, ResourceError> {
    update_with::<Node>(ds, name, create.then(|| new_node(name)), |doc| {
        let spec = doc
            .entry("spec")
            .or_insert_with(|| Value::Object(Map::new()));
        if !spec.is_object() {
            *spec = Value::Object(Map::new());
        }
        if let Value::Object(spec) = spec {
            edit(spec);
        }
    })
    .await
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
    delete::<Node>(ds, name).await
}

/// Every IP pool in the datastore (read tolerantly).
pub async fn list_pools(ds: &Datastore) -> Result<Vec<IpPool>, ResourceError> {
    list::<IpPool>(ds).await
}

/// Create `pool` (Calico's defaults filled in, validated) unless a pool of that name exists. Ok(true) when
/// this call created it. Overlaps with other pools are the caller's to rule out (the daemons create their
/// default pool only when there is none of its family).
pub async fn create_pool(ds: &Datastore, pool: IpPool) -> Result<bool, ResourceError> {
    create(ds, pool).await
}
