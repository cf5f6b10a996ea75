//! Object metadata shared by every resource, and the validation error type.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The apiVersion of every resource margay reads and writes.
pub const API_VERSION: &str = "projectcalico.org/v3";

/// Kubernetes-style object metadata, as Calico stores it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub creation_timestamp: Option<String>,
}

/// A resource that failed validation: which one, which field, what value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} {name:?}: field {field}: {reason} (got {value:?})")]
pub struct ConfigError {
    pub kind: String,
    pub name: String,
    pub field: String,
    pub value: String,
    pub reason: String,
}

impl ConfigError {
    pub fn new(
        kind: &str,
        name: &str,
        field: &str,
        value: impl ToString,
        reason: impl ToString,
    ) -> ConfigError {
        ConfigError {
            kind: kind.to_string(),
            name: name.to_string(),
            field: field.to_string(),
            value: value.to_string(),
            reason: reason.to_string(),
        }
    }
}
