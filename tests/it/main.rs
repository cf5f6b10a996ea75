//! margay's integration tests, linked once into one binary (`cargo test --test it`): one module per area,
//! named `<area>_<what>`, and the support code they share (`common`: prerequisites, namespaces that clean
//! up after themselves, etcd and BIRD/GoBGP/FRR launchers, the lab handles; `cni_common`, `rib_common`).
//!
//! Tests that need root, network namespaces, etcd or a daemon are `#[ignore]`d with their reason, so a
//! plain `cargo test` reports them as ignored; `scripts/test.sh` runs them with `--include-ignored`.
//! Every module runs in the same process: names of namespaces, labs and interfaces come from
//! `common::unique` and the lab handles, which keep them distinct across modules.

#![allow(clippy::unwrap_used)] // test code: a panic is the failure report

mod cni_common;
mod common;
mod rib_common;

mod bfd_interop;
mod cli_bgp_resources;
mod cli_routes;
mod cni_chain;
mod cni_host_veth;
mod cni_manifest;
mod cni_podman;
mod cni_shim;
mod config_bgp;
mod config_peers;
mod dataplane_fib;
mod dataplane_nat;
mod dataplane_pods;
mod datastore_etcd;
mod docker_plugin;
mod house_layering;
mod image;
mod ipam_cli;
mod ipam_compat;
mod ipam_concurrency;
mod ipam_etcd;
mod ipam_proptest;
mod lab_cni;
mod lab_llgr;
mod lab_outside_router;
mod lab_reflector;
mod node_autodetect;
mod node_cluster;
mod node_core_backend;
mod node_core_dualstack;
mod node_core_pools;
mod node_core_ready;
mod node_core_reflector;
mod node_core_restart;
mod node_core_restart_ping;
mod node_core_services;
mod node_datastore;
mod node_lab_e2e;
mod reflector_interop;
mod reflector_malformed;
mod reflector_scale;
mod rib_decision;
mod rib_graceful_restart;
mod rib_llgr;
mod rib_proptest;
mod rib_reflection;
mod rib_task;
mod session_fsm;
mod session_interop;
mod session_malformed;
mod session_sockopt;
mod wire_differential;
mod wire_proptest;
mod wire_vectors;
