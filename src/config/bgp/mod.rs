//! Calico's BGP resources (`projectcalico.org/v3` BGPConfiguration, BGPPeer, Node `spec.bgp`) with Calico's
//! field names and defaults, their validation, and loading a multi-document YAML file into one validated
//! [`ConfigSet`].
//!
//! Parse, then validate, then hand over: [`ConfigSet::from_yaml`] either returns a complete set in which every
//! document is valid (and cross-references, such as password secrets, resolve), or one [`LoadError`] naming the
//! document, the resource, the field and the bad value. Nothing is ever half-applied, because nothing is applied
//! here at all: the caller swaps its whole set only on success. Which peers a node should have is derived from
//! a set in `config::peers`.
//!
//! One file per resource kind (`bgp_configuration`, `bgp_peer`, `node`), the value types they share
//! (`values`) and the loader of a whole set (`loader`); everything is re-exported here.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use ipnetwork::IpNetwork;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::meta::{ConfigError, ObjectMeta, API_VERSION};
use super::selector::Selector;

mod bgp_configuration;
mod bgp_peer;
mod llgr;
mod loader;
mod node;
mod values;

pub use bgp_configuration::*;
pub use bgp_peer::*;
pub use llgr::*;
pub use loader::*;
pub use node::*;
pub use values::*;

/// Calico's default AS number (`confd` globalDefaults).
pub const DEFAULT_AS_NUMBER: u32 = 64512;
/// Default BGP port.
pub const DEFAULT_LISTEN_PORT: u16 = 179;
/// BIRD's default graceful-restart time, which Calico inherits when `maxRestartTime` is unset.
pub const DEFAULT_MAX_RESTART_TIME: Duration = Duration::from_secs(120);

pub const KIND_BGP_CONFIGURATION: &str = "BGPConfiguration";
pub const KIND_BGP_PEER: &str = "BGPPeer";
pub const KIND_NODE: &str = "Node";
/// Plurals in the etcd keys (`/calico/resources/v3/projectcalico.org/<plural>/<name>`).
pub const BGP_CONFIGURATION_PLURAL: &str = "bgpconfigurations";
pub const BGP_PEER_PLURAL: &str = "bgppeers";
pub const NODE_PLURAL: &str = "nodes";

// ----- small value types -----
