//! Reading resources as the datastore holds them: strict for what operators write, tolerant for what a newer
//! Calico wrote.
//!
//! The resource types refuse fields they do not know (`deny_unknown_fields`), so there is one definition of
//! what margay knows. `margay apply` decodes with [`strict`]: a field margay does not know is refused with the
//! resource, the field path and the value named, because a typo must not be stored silently (calicoctl does
//! the same). Reading the datastore uses [`tolerant`] instead: a newer calicoctl or calico-node may have
//! written fields this version does not know into an adopted datastore, and calico-node ignores what it does
//! not know. A node that refused them would refuse its whole BGP configuration, fatally at start.
//!
//! Tolerance is implemented by decoding strictly and, while the error is "unknown field", removing that one
//! field from the document and decoding again. Each removal is reported once per (kind, field) as a warning
//! and counted per resource in `margay_datastore_unknown_fields_total{kind, field}` (see [`unknown_fields`]).
//! Other errors (a wrong type, an unknown enum value) stay errors.
//!
//! This module never writes: a caller that writes a resource back (the node registering its address) must
//! patch the stored JSON rather than re-encode the typed value, so the unknown fields survive.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Mutex;

use serde::de::DeserializeOwned;
use serde_path_to_error::{Path, Segment};

use super::meta::ConfigError;

/// At most this many unknown fields are removed from one document before giving up (a bound, not a limit
/// anyone should meet: every removal makes the document smaller).
const MAX_REMOVALS: usize = 256;

/// (kind, field path) -> names of the resources seen carrying it.
type Seen = BTreeMap<(String, String), BTreeSet<String>>;

static SEEN: Mutex<Seen> = Mutex::new(BTreeMap::new());

fn seen() -> std::sync::MutexGuard<'static, Seen> {
    SEEN.lock().unwrap_or_else(|p| p.into_inner())
}

/// Record that resource `kind`/`name` carries the unknown `field`: warn the first time this (kind, field)
/// is seen in this process, count each resource once.
fn note(kind: &str, name: &str, field: &str) {
    let mut seen = seen();
    let names = seen
        .entry((kind.to_string(), field.to_string()))
        .or_default();
    if names.is_empty() {
        tracing::warn!(
            kind,
            name,
            field,
            "the datastore holds a field margay does not know (written by a newer Calico?); it is ignored. \
             Reported once per kind and field; margay_datastore_unknown_fields_total counts the resources"
        );
    }
    names.insert(name.to_string());
}

/// Every unknown field read so far: (kind, field path, number of resources seen carrying it).
pub fn unknown_fields() -> Vec<(String, String, u64)> {
    seen()
        .iter()
        .map(|((k, f), names)| (k.clone(), f.clone(), names.len() as u64))
        .collect()
}

fn field_path(path: &Path) -> String {
    let p = path.to_string();
    if p == "." {
        String::new()
    } else {
        p
    }
}

fn is_unknown_field<E: fmt::Display>(e: &E) -> bool {
    e.to_string().starts_with("unknown field")
}

/// A document tree the unknown fields can be removed from (JSON from etcd, YAML from a snapshot).
trait Doc: Clone {
    fn child(&mut self, seg: &Segment) -> Option<&mut Self>;
    fn remove_key(&mut self, key: &str) -> bool;
}

impl Doc for serde_json::Value {
    fn child(&mut self, seg: &Segment) -> Option<&mut Self> {
        match seg {
            Segment::Map { key } => self.get_mut(key.as_str()),
            Segment::Seq { index } => self.get_mut(*index),
            _ => None,
        }
    }
    fn remove_key(&mut self, key: &str) -> bool {
        self.as_object_mut().and_then(|o| o.remove(key)).is_some()
    }
}

impl Doc for serde_yaml_ng::Value {
    fn child(&mut self, seg: &Segment) -> Option<&mut Self> {
        match seg {
            Segment::Map { key } => self.get_mut(key.as_str()),
            Segment::Seq { index } => self.get_mut(*index),
            _ => None,
        }
    }
    fn remove_key(&mut self, key: &str) -> bool {
        self.as_mapping_mut().and_then(|m| m.remove(key)).is_some()
    }
}

/// Remove the map entry `path` points at; false when the path does not lead to one.
fn remove_at<V: Doc>(doc: &mut V, path: &Path) -> bool {
    let segs: Vec<&Segment> = path.iter().collect();
    let Some((Segment::Map { key }, parents)) = segs.split_last() else {
        return false;
    };
    let mut cur = doc;
    for s in parents {
        match cur.child(s) {
            Some(c) => cur = c,
            None => return false,
        }
    }
    cur.remove_key(key)
}

/// Decode, removing unknown fields one at a time. Returns the value and the removed field paths, or the first
/// error that is not an unknown field.
fn decode_removing<V: Doc, T, E: fmt::Display>(
    mut doc: V,
    decode: impl Fn(V) -> Result<T, serde_path_to_error::Error<E>>,
) -> Result<(T, Vec<String>), serde_path_to_error::Error<E>> {
    let mut removed = Vec::new();
    loop {
        match decode(doc.clone()) {
            Ok(t) => return Ok((t, removed)),
            Err(e) => {
                if removed.len() >= MAX_REMOVALS
                    || !is_unknown_field(e.inner())
                    || !remove_at(&mut doc, e.path())
                {
                    return Err(e);
                }
                removed.push(field_path(e.path()));
            }
        }
    }
}

/// The value at a serde path inside a JSON document, rendered for an error message.
fn json_value_at(v: &serde_json::Value, path: &Path) -> String {
    let mut cur = Some(v);
    for seg in path.iter() {
        cur = match (seg, cur) {
            (Segment::Map { key }, Some(c)) => c.get(key.as_str()),
            (Segment::Seq { index }, Some(c)) => c.get(*index),
            _ => None,
        };
    }
    match cur {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(serde_json::Value::Null) | None => String::new(),
        Some(other) => other.to_string(),
    }
}

fn config_error<E: fmt::Display>(
    kind: &str,
    name: &str,
    doc: &serde_json::Value,
    e: serde_path_to_error::Error<E>,
) -> ConfigError {
    let field = field_path(e.path());
    let value = json_value_at(doc, e.path());
    let mut reason = e.inner().to_string();
    if is_unknown_field(e.inner()) {
        reason.push_str(
            " (margay does not know this field: check its spelling, or remove it if a newer Calico added it)",
        );
    }
    ConfigError::new(kind, name, &field, value, reason)
}

fn name_of(doc: &serde_json::Value) -> String {
    doc.pointer("/metadata/name")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default()
        .to_string()
}

/// Decode an operator's document: every field must be known. The error names the resource, the field path
/// and the value.
pub fn strict<T: DeserializeOwned>(kind: &str, doc: &serde_json::Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(doc.clone())
        .map_err(|e| config_error(kind, &name_of(doc), doc, e))
}

/// Decode a document read from the datastore: fields margay does not know are ignored (warned once per kind
/// and field, counted); any other error names the resource, the field path and the value.
pub fn tolerant<T: DeserializeOwned>(kind: &str, doc: serde_json::Value) -> Result<T, ConfigError> {
    let name = name_of(&doc);
    match decode_removing(doc.clone(), serde_path_to_error::deserialize) {
        Ok((t, removed)) => {
            for field in removed {
                note(kind, &name, &field);
            }
            Ok(t)
        }
        Err(e) => Err(config_error(kind, &name, &doc, e)),
    }
}

/// [`tolerant`] over stored bytes (JSON).
pub fn tolerant_slice<T: DeserializeOwned>(kind: &str, bytes: &[u8]) -> Result<T, ConfigError> {
    let doc: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| {
        ConfigError::new(
            kind,
            "",
            "",
            String::from_utf8_lossy(&bytes[..bytes.len().min(80)]),
            format!("not JSON: {e}"),
        )
    })?;
    tolerant(kind, doc)
}

/// [`tolerant`] for a YAML value (the datastore snapshot [`super::bgp::ConfigSet`] reads). Returns the
/// serde error of the first non-unknown-field problem so the caller can name the document.
pub(crate) fn tolerant_yaml<T: DeserializeOwned>(
    kind: &str,
    name: &str,
    doc: serde_yaml_ng::Value,
) -> Result<T, serde_path_to_error::Error<serde_yaml_ng::Error>> {
    let (t, removed) = decode_removing(doc, serde_path_to_error::deserialize)?;
    for field in removed {
        note(kind, name, &field);
    }
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields, rename_all = "camelCase")]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Outer {
        metadata: serde_json::Value,
        spec: Inner,
        #[serde(default)]
        list: Vec<Inner>,
    }

    #[test]
    fn strict_names_the_unknown_field_and_its_value() {
        let doc = serde_json::json!({"metadata": {"name": "x"}, "spec": {"a": 1, "newKnob": "on"}});
        let e = strict::<Outer>("Test", &doc).unwrap_err();
        assert_eq!(e.field, "spec.newKnob");
        assert_eq!(e.value, "on");
        assert_eq!(e.name, "x");
        assert!(e.reason.contains("unknown field `newKnob`"), "{e}");
    }

    #[test]
    fn tolerant_drops_unknown_fields_everywhere_and_counts_each_resource_once() {
        let doc = serde_json::json!({"metadata": {"name": "t1"}, "top": 1,
            "spec": {"a": 1, "k1": true, "k2": [1]}, "list": [{"a": 2, "k3": {}}]});
        let o: Outer = tolerant("TolerantTest", doc.clone()).unwrap();
        assert_eq!(o.spec, Inner { a: 1 });
        assert_eq!(o.list, vec![Inner { a: 2 }]);
        // Read again (a reload): the count of resources stays 1.
        let _: Outer = tolerant("TolerantTest", doc).unwrap();
        let mine: Vec<_> = unknown_fields()
            .into_iter()
            .filter(|(k, _, _)| k == "TolerantTest")
            .collect();
        let fields: Vec<&str> = mine.iter().map(|(_, f, _)| f.as_str()).collect();
        assert_eq!(fields, ["list[0].k3", "spec.k1", "spec.k2", "top"]);
        assert!(mine.iter().all(|(_, _, n)| *n == 1), "{mine:?}");
    }

    #[test]
    fn tolerant_keeps_other_errors() {
        let doc = serde_json::json!({"metadata": {"name": "t2"}, "spec": {"a": "x", "k": 1}});
        let e = tolerant::<Outer>("TolerantTest2", doc).unwrap_err();
        assert_eq!(e.field, "spec.a");
        assert_eq!(e.value, "x");
    }

    #[test]
    fn tolerant_yaml_drops_unknown_fields() {
        let doc: serde_yaml_ng::Value =
            serde_yaml_ng::from_str("metadata: {name: y}\nspec: {a: 3, b: 4}\n").unwrap();
        let o: Outer = tolerant_yaml("TolerantYaml", "y", doc).unwrap();
        assert_eq!(o.spec.a, 3);
    }
}
