//! margay: one binary that replaces calico-node + BIRD + confd on a Kubernetes node.
//!
//! The parts below are composed by `node` (the DaemonSet daemon) and `reflector` (the standalone route
//! reflector). Arrows point down only: parts never reach up into the composers. docs/architecture.md is the map.

pub mod api;
pub mod bfd;
pub mod bgp;
pub mod cli;

pub mod cni;
pub mod config;
pub mod dataplane;
pub mod datastore;
pub mod docker;
pub mod feed;
pub mod ipam;
pub mod lab;
pub mod node;
pub mod peering;
pub mod reflector;
pub mod task;
