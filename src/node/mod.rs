//! `margay node run`: the per-node daemon, composed from the parts that own the work.
//!
//! ```text
//!   etcd ──Node/BGPConfiguration/BGPPeer/IPPool (feed.rs: one watch)──▶ peer_loop ──apply──▶ speaker ◀──▶ peers (TCP 179)
//!     │                                    desired_peers, service CIDRs, │ Originate/WithdrawLocal│ ▲      │
//!     │                                    export policy ────────────────┴─ SetPolicy ──▶ RIB ◀─┘ │      │ PeerSync
//!     │                                                                          │  FibEvent     │      ▼
//!     │                                                              nexthop::learned_routes  │   restart::run: End-of-RIB
//!   NodeIpam ◀──assign/release/GC── CNI server ──add/del_pod──▶ kernel    FIB task (proto 77) ◀─┼── sweep (adopted, not re-learned)
//!     │         (backend.rs)     (unix socket)                               ▲                  │      │ Readiness
//!     └──routes() (on every ADD/DEL and every second) ──blocks──▶ blackhole ─┘  advertise_blocks ┘      ▼
//!                                                                                        HTTP /status /healthz /readyz /metrics
//!   NodeIpam ──pools (watch)──▶ cluster::follow_nat ──▶ nft table inet margay (natOutgoing)
//!   etcd Node/<me> labels ──▶ cluster::follow_labels ──set_labels──▶ NodeIpam (pools' nodeSelector)
//!   NodeIpam pools + interfaces ──▶ cluster::follow_mtu ──▶ PodMtu (CNI ADDs without an mtu)
//!   NodeIpam pools + etcd nodes/ ──▶ encap::follow_tunnel (VXLAN v4, VXLAN v6, IPIP) ──▶ vxlan.calico /
//!        vxlan-v6.calico (+ neighbour, FDB entries) / tunl0; EncapRouting ──▶ nexthop::learned_routes
//!        (encapsulated pools via their tunnel, withheld while it cannot be built)
//!   CALICO_NETWORKING_BACKEND=vxlan: NodeIpam affinities ──▶ encap::route_by_affinities ──FibEvent──▶ (same path)
//! ```
//!
//! Files: `args` (flags and environment), `store` (what the node reads and writes in etcd at start),
//! `peers` (the peer loop), `advertise` (blocks into the RIB), `address` (address re-detection), `encap`
//! (VXLAN and IPIP), `nexthop` (learned routes into the FIB), `cluster` (labels, NAT, MTU), `services`,
//! `restart` (convergence and sweep), `backend` (the CNI backend); `run_with` here wires them together.
//!
//! This module owns the composition only: registering the Node resource, creating the default pools, the
//! peer refresh loop (peers, service CIDRs and the export policy, see [`services`]), the advertisement of the
//! node's blocks, and the order of the start: the FIB adopts its routes, the pod veths are reconciled with
//! IPAM, then the CNI socket ([`NodeBackend`]) opens; [`restart`] decides when BGP has converged, sweeps
//! what nobody re-announced and sets the readiness. Peers are re-derived in memory whenever the
//! configuration feed ([`crate::feed`]: one etcd watch, no polling) publishes a new snapshot, or a mounted
//! password Secret changes; the speaker's `apply` only touches sessions whose settings changed, so unchanged
//! sessions stay up.
//!
//! Every long-lived task (speaker, RIB, FIB, IPAM, fib-feed, advertise, peer-loop, CNI, HTTP) is spawned
//! through [`crate::task`] and watched by one supervisor that also heartbeats the RIB, FIB, IPAM and speaker
//! through their inboxes: a task that ends makes `/healthz` fail and the daemon exit non-zero (the kubelet
//! restarts it; kernel routes and the peers' graceful restart keep forwarding meanwhile); a task that does
//! not answer its heartbeat makes `/healthz` fail until it answers again.
//!
//! BGP sockets and the HTTP endpoint live in the namespace the process runs in; `--netns` points the
//! dataplane (FIB, pod plumbing, sysctls) at another namespace. The lab runs each node inside its namespace,
//! so both are the same there.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use ipnetwork::IpNetwork;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch, Notify};

use crate::api::{self, ReadyState, StatusReport};
use crate::bgp::policy::Policy;
use crate::bgp::rib::{FibEvent, RibInput};
use crate::bgp::speaker::{self, DesiredPeer, SpeakerConfig, SpeakerHandle};
use crate::bgp::wire::types::PathAttributes;
use crate::cni::server::{CniServer, ServerConfig};
use crate::cni::types::DEFAULT_SOCKET;
use crate::config::bgp::{ConfigSet, Node};
use crate::config::ippool::IpPool;
use crate::config::peers::desired_peers;
use crate::dataplane::autodetect::prefix_len_on_interfaces;
use crate::dataplane::fib::{Fib, FibConfig, FibHandle, Route};
use crate::datastore::resources;
use crate::datastore::EtcdArgs;
use crate::datastore::{Datastore, Updated};
use crate::feed::{ConfigFeed, FeedOptions};
use crate::ipam::{NodeInfo, NodeIpam};
use crate::task;

mod backend;
pub mod cluster;
pub mod encap;
pub mod nexthop;
pub mod restart;
pub mod services;

pub use backend::{attachment, resolve_pools, NodeBackend};
pub use restart::{reconcile_pods, PodReconcile, Readiness};
pub use services::{export_policy, service_prefixes};

mod address;
mod advertise;
mod args;
mod peers;
mod store;

use address::*;
use advertise::*;
pub use args::*;
use peers::*;
pub use store::*;

/// Where Calico keeps Node resources (`/calico/resources/v3/projectcalico.org/nodes/<name>`).
/// How often the mounted password Secrets are compared with what the peers use (local files, no etcd).
const SECRETS_POLL: Duration = Duration::from_secs(10);
/// How often the node's blocks are compared with what it advertises (ADD and DEL also trigger it).
const BLOCK_POLL: Duration = Duration::from_secs(1);
/// How long the first BGP sessions wait for the node's blocks to be in the RIB (see `peer_loop`).
const ORIGINATE_WAIT: Duration = Duration::from_secs(10);

/// Run the node daemon until SIGTERM/SIGINT.
pub fn run(etcd: EtcdArgs, args: NodeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let r = rt.block_on(run_async(etcd, args));
    // Do not wait for blocking work (a netlink call in flight) on the way out.
    rt.shutdown_timeout(Duration::from_millis(500));
    r
}

fn node_name(args: &NodeArgs) -> anyhow::Result<String> {
    match args.node_name.clone().or_else(|| {
        nix::unistd::gethostname()
            .ok()?
            .into_string()
            .ok()
            .filter(|s| !s.is_empty())
    }) {
        Some(n) => Ok(n),
        None => anyhow::bail!("no node name: set NODENAME or --node-name"),
    }
}

/// Whether an earlier run left its marker in the state directory (then this start is a restart), and leave
/// ours. The marker stays on exit: the next start is a restart too. A reboot clears it (/var/run is tmpfs).
fn run_marker(args: &NodeArgs) -> bool {
    let dir = args.state_dir.clone().unwrap_or_else(|| {
        args.cni_socket
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."))
    });
    let marker = dir.join("node.running");
    let restarting = marker.exists();
    if restarting {
        tracing::info!(marker = %marker.display(), "an earlier run's marker is there: announcing a graceful restart (R bit, RFC 4724)");
    }
    if let Err(e) = std::fs::create_dir_all(&dir)
        .and_then(|()| std::fs::write(&marker, std::process::id().to_string()))
    {
        tracing::warn!(path = %marker.display(), error = %e, "cannot write the run marker: a restart will not be announced as graceful");
    }
    restarting
}

/// Who this node is, once flags and the datastore are combined.
#[derive(Debug, Clone)]
struct Identity {
    name: String,
    ip: Ipv4Addr,
    asn: u32,
    port: u16,
    /// routeReflectorClusterID of this node's Node resource, as the speaker was started with.
    cluster_id: Option<Ipv4Addr>,
    /// Next hop of the node's IPv6 routes.
    ip6: Option<std::net::Ipv6Addr>,
    /// The FIB found routes of margay's protocol at start (a daemon restart, not a reboot): the graceful
    /// restart F bit (RFC 4724 3) is true only then.
    forwarding_preserved: bool,
    /// Where BGP password Secrets are mounted.
    secrets_dir: PathBuf,
    /// The dataplane part of the status (unsupported settings are reported there on every load).
    dp_status: cluster::DataplaneStatus,
    /// The node's kernel can build ipip devices.
    kernel_has_ipip: bool,
    /// An earlier run's marker was found: the graceful restart R bit (RFC 4724 3) is set in our OPENs.
    restarting: bool,
}

/// Sockets the node serves on, bound by its caller; `None` binds from the flags and the configuration
/// (BGP on 0.0.0.0 and [::] at the node's port, `--http-listen`). The CNI socket is a path (`--cni-socket`).
#[derive(Default)]
pub struct Listeners {
    pub bgp: Option<crate::bgp::session::Listener>,
    pub http: Option<tokio::net::TcpListener>,
}

async fn run_async(etcd: EtcdArgs, args: NodeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    run_with(etcd, args, Listeners::default(), stop).await
}

/// The node daemon until `shutdown` completes (as mini-redis's `server::run`): `margay node run` passes
/// SIGTERM/SIGINT, a test a oneshot and listeners on port 0, so a node can run in the test's process. The
/// way out is the same either way (sessions closed for graceful restart, kernel routes kept).
pub async fn run_with(
    etcd: EtcdArgs,
    args: NodeArgs,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut shutdown = std::pin::pin!(shutdown);

    let started = Instant::now();
    let name = node_name(&args)?;
    let netns = args.netns.clone();
    let ipv4 = match args.ip {
        Some(NodeIp::None) => None,
        Some(NodeIp::Address(ip)) => {
            Some((ip, prefix_len_on_interfaces(netns.as_deref(), ip.into())))
        }
        Some(NodeIp::Autodetect) | None => Some(crate::dataplane::autodetect::detect_ipv4(
            &args.ip_autodetection_method,
            netns.as_deref(),
        )?),
    };
    if ipv4.is_none() && matches!(args.ip6, None | Some(NodeIp6::None)) {
        anyhow::bail!(
            "IP=none (an IPv6-only node) needs IP6: the node's IPv6 address or autodetect"
        );
    }
    // An IPv6-only node still needs a BGP identifier, a 4-octet number (RFC 6286): Calico's hash of the name.
    // It is never used as an address: the node has no IPv4 session, pool or route of its own.
    let (ip, prefix_len) = ipv4.unwrap_or_else(|| (router_id_from_name(&name), 32));
    let endpoints = etcd.etcd_endpoints.join(",");
    let ds = etcd
        .datastore()
        .map_err(|e| anyhow::anyhow!("etcd at {endpoints}: {e}"))?;
    let on_etcd = |e: anyhow::Error| anyhow::anyhow!("etcd at {endpoints}: {e:#}");
    let ip6_autodetected = args.ip6 == Some(NodeIp6::Autodetect);
    let ipv6 = match args.ip6 {
        Some(NodeIp6::Address(a)) => {
            Some((a, prefix_len_on_interfaces(netns.as_deref(), a.into())))
        }
        Some(NodeIp6::Autodetect) => Some(
            crate::dataplane::autodetect::detect_ipv6(
                &args.ip6_autodetection_method,
                netns.as_deref(),
            )
            .context("IP6=autodetect")?,
        ),
        Some(NodeIp6::None) | None => None,
    };
    let ip6 = ipv6.map(|(a, _)| a);
    register_node_with(&ds, &name, ipv4, ipv6, args.as_number)
        .await
        .map_err(on_etcd)?;
    if ipv4.is_some() {
        ensure_default_pool(&ds, args.ipv4_pool_cidr, args.ipv4_pool_block_size)
            .await
            .map_err(on_etcd)?;
    } else {
        tracing::info!(router_id = %ip, "IPv6-only node (IP=none): no IPv4 address, default IPv4 pool or IPv4 session; BGP router id from the node name (Calico's CALICO_ROUTER_ID=hash)");
    }
    if let Some(v6) = args.ipv6_pool_cidr {
        ensure_default_ipv6_pool(&ds, v6, args.ipv6_pool_block_size)
            .await
            .map_err(on_etcd)?;
    }
    // One watch from here on: peers are re-derived from its snapshots, never by re-listing.
    let feed = ConfigFeed::start(ds.clone(), FeedOptions::default())
        .await
        .map_err(|e| on_etcd(e.into()))?;
    let feed_counters = feed.counters().clone();
    let feed_health = feed.health();
    let feed_for_cni = feed.subscribe();
    let set = feed
        .current()
        .config_set(secrets_in(Some(&args.bgp_secrets_dir))?)
        .map_err(|e| on_etcd(e.into()))?;
    let asn = args
        .as_number
        .or_else(|| set.nodes.get(&name).and_then(Node::as_number))
        .unwrap_or_else(|| set.default_bgp().as_number());
    // A node with routeReflectorClusterID reflects for its clients (RFC 4456); desired_peers marks them.
    let cluster_id = set.nodes.get(&name).and_then(Node::cluster_id);
    let dp_status = cluster::dataplane_status();
    let probe_ns = netns.clone();
    let kernel_has_ipip = tokio::task::spawn_blocking(move || {
        crate::dataplane::encap::ipip_supported(probe_ns.as_deref())
    })
    .await
    .map_err(anyhow::Error::from)
    .and_then(|r| r.map_err(anyhow::Error::from))
    .unwrap_or_else(|e| {
        tracing::warn!(error = %format!("{e:#}"), "cannot tell whether the kernel has ipip; assuming not");
        false
    });
    cluster::report_unsupported(
        &set,
        &load_pools(&ds).await.map_err(on_etcd)?,
        &name,
        kernel_has_ipip,
        ip6.is_some(),
        &dp_status,
    );
    let id = Identity {
        dp_status: dp_status.clone(),
        kernel_has_ipip,
        port: set.listen_port(&name),
        name: name.clone(),
        ip,
        asn,
        cluster_id,
        ip6,
        forwarding_preserved: false,
        secrets_dir: args.bgp_secrets_dir.clone(),
        restarting: run_marker(&args),
    };
    if ip6.is_none() && args.ipv6_pool_cidr.is_some() {
        tracing::warn!(
            "an IPv6 pool without --ip6/IP6: IPv6 pod blocks are not advertised to peers"
        );
    }

    // ensure_node logs what it changed.
    crate::dataplane::sysctl::ensure_node(netns.as_deref())?;
    // Pools' nodeSelector is evaluated with the Node resource's labels, followed live below.
    let (labels, labels_rev) = cluster::node_labels(&ds, &name).await.map_err(on_etcd)?;
    // Liveness first: a node that is serving addresses always holds its lease (ipam gc never touches it).
    let _liveness = crate::ipam::liveness::Liveness::start(ds.clone(), &name, args.liveness_ttl)
        .await
        .map_err(|e| {
            anyhow::anyhow!("liveness lease for node {name:?} (etcd at {endpoints}): {e}")
        })?;
    let ipam = Arc::new(
        NodeIpam::start_with(
            ds.clone(),
            NodeInfo {
                name: name.clone(),
                labels,
            },
            crate::ipam::IpamOptions {
                empty_block_grace: args.ipam_empty_block_grace,
                release_cooldown: args.ipam_release_cooldown,
            },
        )
        .await
        .map_err(|e| anyhow::anyhow!("IPAM for node {name:?} (etcd at {endpoints}): {e}"))?,
    );
    let _gc_leader = args.ipam_gc_leader.then(|| {
        task::spawn(
            "ipam-gc-leader",
            crate::ipam::liveness::run_gc_leader(
                ds.clone(),
                name.clone(),
                args.liveness_ttl,
                Duration::from_secs(60),
                args.ipam_gc_grace,
            ),
        )
    });
    let cluster_tasks = [
        task::spawn(
            "labels",
            cluster::follow_labels(ds.clone(), name.clone(), ipam.clone(), labels_rev),
        ),
        task::spawn(
            "nat",
            cluster::follow_nat(
                ipam.subscribe_pools(),
                netns.clone(),
                crate::dataplane::nat::NatOptions {
                    outgoing_address_v4: args.nat_outgoing_address,
                },
                dp_status.clone(),
            ),
        ),
    ];
    // The FIB adopts the routes of margay's protocol it finds (a restart keeps forwarding on them); what
    // nobody re-announces is swept after BGP has converged (restart::run).
    let fib = Fib::spawn(FibConfig {
        netns: netns.clone(),
        ..Default::default()
    })
    .await
    .context("starting the FIB task")?;
    let mut id = id;
    id.forwarding_preserved = fib
        .settle()
        .await
        .map(|s| s.stats.adopted > 0)
        .unwrap_or(false);
    let (fib_tx, fib_rx) = mpsc::channel::<Vec<FibEvent>>(256);
    let affinity_routes_tx = fib_tx.clone();
    let speaker_cfg = |listen: Vec<SocketAddr>| SpeakerConfig {
        local_asn: asn,
        router_id: ip,
        cluster_id,
        listen,
        rib_capacity: 1024,
    };
    // IPv4 and IPv6 transport: nodes with an ipv6Address peer over IPv6 as well (Calico's mesh does).
    let any4 = SocketAddr::from((Ipv4Addr::UNSPECIFIED, id.port));
    let any6 = SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, id.port));
    let given = listeners.bgp.map(|l| {
        speaker::spawn_on(
            speaker_cfg(Vec::new()),
            Some(l),
            Arc::new(Policy::default()),
            Some(fib_tx.clone()),
        )
    });
    let spk = match given {
        Some(s) => s,
        None => match speaker::spawn(
            speaker_cfg(vec![any4, any6]),
            Arc::new(Policy::default()),
            Some(fib_tx.clone()),
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for BGP on [::] (IPv6 disabled?): listening on IPv4 only");
                speaker::spawn(
                    speaker_cfg(vec![any4]),
                    Arc::new(Policy::default()),
                    Some(fib_tx),
                )
                .await
                .with_context(|| format!("starting the BGP speaker on port {}", id.port))?
            }
        },
    };
    if let Some(c) = cluster_id {
        tracing::info!(cluster_id = %c, "route reflector: reflecting for this node's route-reflector clients");
    }
    let spk = Arc::new(spk);
    // One BFD task for every BFD session of the node; a Down resets that peer's BGP session.
    let (bfd_events_tx, bfd_events_rx) = mpsc::channel(256);
    let bfd = Arc::new(crate::bfd::spawn(
        crate::bfd::BfdPorts::default(),
        bfd_events_tx,
    ));
    let bfd_link = task::spawn(
        "bfd-link",
        crate::peering::bfd_to_speaker(bfd_events_rx, spk.bfd_link()),
    );
    // Next hops resolved recursively through the node's routes (BIRD `gateway recursive`).
    let (tunnel_tasks, tunnel_routing) = encap::spawn(
        ds.clone(),
        ipam.clone(),
        &name,
        (ip, prefix_len),
        ip6,
        netns.clone(),
        dp_status.clone(),
    );
    let learned = task::spawn(
        "fib-feed",
        nexthop::learned_routes(
            fib_rx,
            fib.clone(),
            netns.clone(),
            dp_status.clone(),
            tunnel_routing.clone(),
        ),
    );

    let refresh = Arc::new(Notify::new());
    // The node's address as the address monitor last found it (fixed with --ip).
    let (addr_tx, addr_rx) = watch::channel(ip);
    let (addr6_tx, addr6_rx) = watch::channel(ip6);
    // Set once the node's blocks are in the RIB: the first sessions wait for it (see peer_loop).
    let (originated_tx, originated_rx) = watch::channel(false);
    let adverts = task::spawn(
        "advertise",
        advertise_blocks(
            ipam.clone(),
            fib.clone(),
            spk.rib(),
            addr_rx.clone(),
            refresh.clone(),
            originated_tx,
        ),
    );
    let (applied_tx, applied_rx) = watch::channel(false);
    // The routes the vxlan backend derives from block affinities (the restart sweep keeps them).
    let (affinity_owned_tx, affinity_owned_rx) = watch::channel(BTreeSet::new());
    let peers = if args.networking_backend == "vxlan" {
        // No BGP session at all (Calico's vxlan backend): readiness waits only for the first routes
        // derived from block affinities (`applied_tx` turns true once they are out).
        tracing::info!(
            "networking backend vxlan: no BGP peers; routes from block affinities through VXLAN"
        );
        task::spawn(
            "vxlan-routes",
            encap::route_by_affinities_all(
                name.clone(),
                ipam.subscribe_affinities(),
                tunnel_routing,
                affinity_routes_tx,
                affinity_owned_tx,
                applied_tx,
            ),
        )
    } else {
        drop(affinity_routes_tx);
        drop(affinity_owned_tx);
        task::spawn(
            "peer-loop",
            peer_loop(
                feed,
                id.clone(),
                spk.clone(),
                bfd.clone(),
                applied_tx,
                originated_rx,
                NodeAddresses {
                    v4: addr_rx,
                    v6: addr6_rx,
                },
            ),
        )
    };
    // IP6=autodetect is re-checked as IP=autodetect is; a fixed (or no) IPv6 address keeps the sender.
    let (monitor6, _fixed_addr6) = if ip6_autodetected && args.ip_recheck_interval > 0 {
        let m = task::spawn(
            "address-monitor-v6",
            monitor_address6(
                ds.clone(),
                name.clone(),
                args.ip6_autodetection_method.clone(),
                netns.clone(),
                Duration::from_secs(args.ip_recheck_interval),
                addr6_tx,
            ),
        );
        (Some(m), None)
    } else {
        (None, Some(addr6_tx))
    };
    // Without the monitor the sender is kept, so the receivers' `changed()` waits instead of failing.
    let autodetected = matches!(args.ip, None | Some(NodeIp::Autodetect));
    let (monitor, _fixed_addr) = if autodetected && args.ip_recheck_interval > 0 {
        let m = task::spawn(
            "address-monitor",
            monitor_address(
                ds.clone(),
                name.clone(),
                args.ip_autodetection_method.clone(),
                netns.clone(),
                args.as_number,
                Duration::from_secs(args.ip_recheck_interval),
                addr_tx,
            ),
        );
        (Some(m), None)
    } else {
        (None, Some(addr_tx))
    };
    let (ready_tx, ready_rx) = watch::channel(Readiness::Syncing(
        "BGP peers not yet derived from the datastore (see the log)".to_string(),
    ));
    // Not supervised: it ends by design once BGP has converged and the stale routes are swept.
    let converging = task::spawn(
        "converge",
        restart::run(
            spk.clone(),
            fib.clone(),
            affinity_owned_rx,
            ipam.clone(),
            applied_rx,
            ready_tx,
            (
                Duration::from_secs(args.converge_min_wait),
                Duration::from_secs(args.converge_max_wait.max(args.converge_min_wait)),
            ),
        ),
    );

    // Before the first ADD: the pods the kernel holds, compared with what IPAM says this node owns.
    if let Err(e) = reconcile_pods(&ipam, netns.clone()).await {
        tracing::warn!(error = %format!("{e:#}"), "restart: pod veths not reconciled with IPAM");
    }
    let pod_mtu = start_pod_mtu(&args, &ipam, &dp_status).await?;
    let mtu_task = match (args.pod_mtu, regex::Regex::new(&args.mtu_iface_pattern)) {
        (None | Some(0), Ok(pattern)) => Some(task::spawn(
            "mtu",
            cluster::follow_mtu(
                ipam.subscribe_pools(),
                netns.clone(),
                pattern,
                pod_mtu.clone(),
                dp_status.clone(),
            ),
        )),
        _ => None,
    };
    // The Docker plugin (optional) draws on the same IPAM task and pod plumbing as the CNI socket.
    let docker_tasks = match &args.docker_plugin {
        Some(path) => {
            let listener = crate::docker::bind(path)?;
            let (sync_tx, sync_rx) = tokio::sync::mpsc::unbounded_channel();
            let plugin = crate::docker::Plugin {
                backend: crate::docker::NodeDocker {
                    ipam: ipam.clone(),
                    netns: netns.clone(),
                    mtu: pod_mtu.clone(),
                    refresh: refresh.clone(),
                    sync: sync_tx,
                },
                node: name.clone(),
            };
            let path = path.clone();
            tracing::info!(socket = %path.display(), docker_host = %args.docker_host, "serving the Docker network and IPAM plugin");
            let server = task::spawn("docker-plugin", async move {
                if let Err(e) = crate::docker::serve(listener, path, plugin).await {
                    tracing::error!(error = %e, "Docker plugin");
                }
            });
            let sync = task::spawn(
                "docker-sync",
                crate::docker::sync::run(
                    ds.clone(),
                    crate::docker::engine::Engine::new(&args.docker_host),
                    name.clone(),
                    sync_rx,
                ),
            );
            vec![server, sync]
        }
        None => Vec::new(),
    };
    let backend = Arc::new(NodeBackend {
        ipam: ipam.clone(),
        netns: netns.clone(),
        mtu: pod_mtu,
        refresh: refresh.clone(),
        spool_socket: Some(args.cni_socket.clone()),
        host_veth: backend::HostVethContext {
            node_ips: ipv4
                .map(|(a, _)| std::net::IpAddr::V4(a))
                .into_iter()
                .chain(ip6.map(std::net::IpAddr::V6))
                .collect(),
            feed: Some(feed_for_cni),
        },
    });
    let mut registry = Registry::default();
    feed_counters.register(&mut registry);
    let cni_metrics = crate::cni::server::CniMetrics::register(&mut registry);
    let server = CniServer::bind(
        ServerConfig {
            socket: args.cni_socket.clone(),
            ..Default::default()
        },
        backend,
    )
    .with_context(|| format!("CNI socket {}", args.cni_socket.display()))?
    .with_metrics(cni_metrics);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let cni = task::spawn("cni", async move {
        let r = server
            .run(async move {
                let _ = stop_rx.await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "CNI server");
        }
    });

    let status_spk = spk.clone();
    let status_bfd = bfd.clone();
    let status_id = id.clone();
    let (status_ipam, status_fib, status_ds) = (ipam.clone(), fib.clone(), ds.clone());
    let status_dp = dp_status.clone();
    let gateway_netns = args.gateway.then(|| args.netns.clone());
    let status_source = move || {
        let spk = status_spk.clone();
        let bfd = status_bfd.clone();
        let id = status_id.clone();
        let (ipam, fib, ds) = (status_ipam.clone(), status_fib.clone(), status_ds.clone());
        let dataplane = Some(status_dp.borrow().clone());
        // Ready once the datastore is synced (IPAM view loaded before this endpoint starts, peers derived
        // and applied) and BGP has converged (End-of-RIB from the Established peers, bounded wait). Not
        // tied to every peer being Established.
        // And not ready while the configuration feed does not follow etcd (its watch is lost, or a re-list
        // fails): the peers may then be stale, as the reflector reports too. It comes back by itself once
        // the watch resumes (or the re-list succeeds).
        let reason = ready_rx.borrow().reason().or_else(|| {
            feed_health
                .down()
                .map(|why| format!("configuration feed not following etcd: {why}"))
        });
        let gateway_netns = gateway_netns.clone();
        async move {
            // Read at every request (a few /proc reads on a blocking thread: the netns switch is per thread),
            // so a setting changed by hand shows at once.
            let gateway = match gateway_netns {
                Some(ns) => Some(
                    tokio::task::spawn_blocking(
                        move || match crate::dataplane::sysctl::read_gateway(ns.as_deref()) {
                            Ok(s) => api::GatewaySummary {
                                interfaces: s.rp_filter.iter().map(|(i, _)| i.clone()).collect(),
                                problems: crate::dataplane::sysctl::gateway_findings(&s),
                            },
                            Err(e) => api::GatewaySummary {
                                interfaces: Vec::new(),
                                problems: vec![format!("cannot read the node's sysctls: {e}")],
                            },
                        },
                    )
                    .await
                    .unwrap_or_default(),
                ),
                None => None,
            };
            StatusReport {
                role: "node".into(),
                node_name: id.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                asn: id.asn,
                router_id: id.ip.to_string(),
                uptime_seconds: started.elapsed().as_secs(),
                ready: ReadyState {
                    ready: reason.is_none(),
                    reason,
                },
                peers: spk.status().await.unwrap_or_default(),
                bfd: bfd.status().await.unwrap_or_default(),
                fib: tokio::time::timeout(Duration::from_secs(1), fib.settle())
                    .await
                    .ok()
                    .and_then(Result::ok)
                    .map(|f| api::FibSummary {
                        routes: f.installed as u64,
                    }),
                ipam: ipam.routes().await.ok().map(|r| api::IpamSummary {
                    blocks: r.blocks.len() as u64,
                    addresses_total: r.addresses_total,
                    addresses_allocated: r.addresses_allocated,
                    addresses_borrowed: r.borrowed.len() as u64,
                    blocks_empty: r.blocks_empty,
                    addresses_cooling: r.addresses_cooling,
                    blocks_reclaimed: r.counters.blocks_reclaimed,
                    blocks_released_empty: r.counters.blocks_released,
                    addresses_cooling_handed_out: r.counters.cooling_handed_out,
                }),
                datastore: Some(api::DatastoreSummary::of(&ds)),
                dataplane,
                gateway,
            }
        }
        .boxed()
    };
    // Every task that must live as long as the daemon, and a heartbeat through each owner's inbox.
    let mut sup = task::Supervisor::new();
    for w in spk.tasks() {
        sup.watch(w);
    }
    for w in [
        fib.task_watch(),
        ipam.task_watch(),
        learned.watch(),
        adverts.watch(),
        peers.watch(),
        cni.watch(),
        bfd.watch(),
        bfd_link.watch(),
    ] {
        sup.watch(w);
    }
    for t in cluster_tasks
        .iter()
        .chain(docker_tasks.iter())
        .chain(mtu_task.iter())
        .chain(tunnel_tasks.iter())
    {
        sup.watch(t.watch());
    }
    for m in monitor.iter().chain(monitor6.iter()) {
        sup.watch(m.watch());
    }
    let rib_tx = spk.rib();
    sup.probe("rib", move || {
        let rib_tx = rib_tx.clone();
        async move { crate::bgp::rib::heartbeat(&rib_tx).await }
    });
    let probe_fib = fib.clone();
    sup.probe("fib", move || {
        let fib = probe_fib.clone();
        async move { fib.settle().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
    let probe_ipam = ipam.clone();
    sup.probe("ipam", move || {
        let ipam = probe_ipam.clone();
        async move { ipam.routes().await.map(|_| ()).map_err(|e| e.to_string()) }
    });
    let probe_spk = spk.clone();
    sup.probe("speaker", move || {
        let spk = probe_spk.clone();
        async move {
            spk.sync_state()
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    });
    // Installed before /healthz answers. Test-only fault hook (never set in a deployment): with MARGAY_TEST_FAULT_TASK=<task>, SIGUSR1 kills
    // that supervised task as a crash would, so tests can prove the daemon notices and exits.
    let fault = std::env::var("MARGAY_TEST_FAULT_TASK")
        .ok()
        .and_then(|n| sup.find(&n));
    let mut usr1 = match &fault {
        Some(_) => Some(signal(SignalKind::user_defined1())?),
        None => None,
    };
    let http_listener = match listeners.http {
        Some(l) => l,
        None => tokio::net::TcpListener::bind(args.http_listen)
            .await
            .map_err(|e| api::ApiError::Bind {
                addr: args.http_listen,
                source: e,
            })?,
    };
    let health = sup.health();
    let http = task::spawn("http", async move {
        let r = api::serve_supervised(
            http_listener,
            status_source,
            Arc::new(registry),
            Some(health),
        )
        .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP endpoint");
        }
    });
    sup.watch(http.watch());
    tracing::info!(node = %name, address = %ip, asn, cni_socket = %args.cni_socket.display(),
        http = %args.http_listen, etcd = %endpoints, "margay node running");

    // Boxed so it can be dropped before the cleanup: its heartbeats hold clones of the speaker handle.
    let mut supervised = Box::pin(sup.run());
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            () = &mut shutdown => break Ok(()),
            ended = &mut supervised => {
                tracing::error!(task = ended.name, why = %ended.why,
                    "a task of the daemon ended unexpectedly: /healthz fails and margay exits so that it is restarted \
                     (kernel routes stay; peers keep ours through graceful restart)");
                // Let /healthz report it (a probe, an operator's curl) before the process goes.
                tokio::time::sleep(task::FAILED_HEALTH_GRACE).await;
                break Err(anyhow::anyhow!("{ended}"));
            }
            Some(_) = async { match usr1.as_mut() { Some(s) => s.recv().await, None => std::future::pending().await } } => {
                if let Some(f) = &fault {
                    tracing::warn!(task = f.name(), "test fault hook: killing the task");
                    f.kill_for_test();
                }
            }
        }
    };
    drop(supervised);
    let cleanup = async move {
        // Nobody listening for the stop means the HTTP server has already ended: nothing to stop.
        let _ = stop_tx.send(());
        // Wait for the aborted tasks to drop what they hold, so the speaker handle is ours alone again.
        for t in [peers, adverts, learned, converging, http]
            .into_iter()
            .chain(tunnel_tasks)
            .chain(cluster_tasks)
            .chain(docker_tasks)
            .chain(mtu_task)
            .chain(monitor)
            .chain(monitor6)
        {
            t.stop().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), cni.join()).await;
        // AdminDown first (RFC 5880 6.8.16): peers' BGP must not react to our BFD going quiet (RFC 5882
        // 3.2), so their graceful restart keeps our routes while we restart.
        bfd.shutdown().await;
        bfd_link.stop().await;
        shutdown_speaker(spk).await;
    };
    if outcome.is_err() {
        // Something is broken: exit promptly; the kernel routes and the peers' graceful restart carry the
        // traffic until the restarted daemon is back.
        let _ = tokio::time::timeout(Duration::from_millis(500), cleanup).await;
    } else {
        cleanup.await;
    }
    tracing::info!("margay node stopped");
    outcome
}

/// Close sessions without a NOTIFICATION so peers keep our routes while we restart (RFC 4724 4.1); the
/// kernel routes stay too (the FIB never flushes).
async fn shutdown_speaker(spk: Arc<SpeakerHandle>) {
    match Arc::try_unwrap(spk) {
        Ok(spk) => spk.shutdown(true).await,
        Err(_) => {
            tracing::warn!("BGP speaker still shared at shutdown; sessions close with the process")
        }
    }
}

/// The pod MTU to start with: the flag, or detected (Calico's rule) before the first ADD.
async fn start_pod_mtu(
    args: &NodeArgs,
    ipam: &NodeIpam,
    status: &cluster::DataplaneStatus,
) -> anyhow::Result<crate::dataplane::mtu::PodMtu> {
    let (mtu, source) = match args.pod_mtu {
        Some(m) if m > 0 => (m, "--pod-mtu / MARGAY_POD_MTU".to_string()),
        _ => {
            let pattern = regex::Regex::new(&args.mtu_iface_pattern).with_context(|| {
                format!(
                    "--mtu-iface-pattern / FELIX_MTUIFACEPATTERN {:?} is not a regular expression",
                    args.mtu_iface_pattern
                )
            })?;
            let pools = ipam.pools().await.unwrap_or_default();
            cluster::detect_pod_mtu(args.netns.clone(), pattern, &pools)
                .await
                .context("detecting the pod MTU (set --pod-mtu to skip detection)")?
        }
    };
    tracing::info!(pod_mtu = mtu, source = %source, "pod MTU");
    status.send_modify(|s| {
        s.pod_mtu = Some(mtu);
        s.pod_mtu_source = Some(source);
    });
    Ok(mtu.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_ip_takes_calicos_forms() {
        assert_eq!(parse_node_ip("autodetect"), Ok(NodeIp::Autodetect));
        assert_eq!(parse_node_ip("AUTODETECT"), Ok(NodeIp::Autodetect));
        let a = NodeIp::Address(Ipv4Addr::new(10, 0, 0, 1));
        assert_eq!(parse_node_ip("10.0.0.1"), Ok(a));
        assert_eq!(parse_node_ip("10.0.0.1/24"), Ok(a));
        assert_eq!(parse_node_ip("none"), Ok(NodeIp::None));
        assert_eq!(parse_node_ip6("autodetect"), Ok(NodeIp6::Autodetect));
        assert_eq!(parse_node_ip6("none"), Ok(NodeIp6::None));
        assert_eq!(
            parse_node_ip6("fd00::1/64"),
            Ok(NodeIp6::Address("fd00::1".parse().unwrap()))
        );
        assert!(parse_node_ip6("10.0.0.1").unwrap_err().contains("IPv6"));
        assert!(parse_node_ip("10.0.0.300")
            .unwrap_err()
            .contains("10.0.0.300"));
    }
    /// Calico's CALICO_ROUTER_ID=hash: sha256 of the name, first four octets, minus 32 above 223.
    #[test]
    fn router_id_from_the_node_name_as_calico_hashes_it() {
        assert_eq!(
            router_id_from_name("node1"),
            Ipv4Addr::new(202, 18, 243, 27)
        );
        assert_eq!(
            router_id_from_name("node16"),
            Ipv4Addr::new(200, 251, 245, 244)
        );
    }

    use crate::dataplane::pod::POD_GATEWAY_V4;
    use std::net::IpAddr;

    #[test]
    fn attachment_is_a_calico_shaped_result() {
        let a = attachment(
            "mgabc".into(),
            "eth0".into(),
            None,
            1500,
            Some(Ipv4Addr::new(10, 244, 0, 1)),
            None,
        );
        assert_eq!(a.ips.len(), 1);
        assert_eq!(a.ips[0].prefix(), 32);
        assert_eq!(a.routes.len(), 1);
        assert_eq!(a.routes[0].dst.prefix(), 0);
        assert_eq!(a.routes[0].gw, Some(IpAddr::V4(POD_GATEWAY_V4)));
        let r = a.to_result("/var/run/netns/p");
        assert_eq!(r.interfaces[0].sandbox, None);
        assert_eq!(r.interfaces[1].sandbox.as_deref(), Some("/var/run/netns/p"));
    }
}
