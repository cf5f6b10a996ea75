//! Calico `projectcalico.org/v3` resources: serde types, defaults and validation. Knows nothing of etcd.
//!
//! Parse, then validate, then apply: the serde types mirror Calico's YAML/JSON; `validate()` on each
//! resource returns a [`ConfigError`] naming the resource, the field and the bad value.

pub mod bfd;
pub mod bgp;
pub mod meta;
pub mod peers;
pub mod resource;
pub mod selector;
pub mod tolerant;
pub mod unsupported;

pub use meta::{ConfigError, ObjectMeta, API_VERSION};
pub use resource::{Resource, Storage, KINDS};
pub use selector::{Selector, SelectorError};
pub mod ipam_config;
pub mod ippool;
