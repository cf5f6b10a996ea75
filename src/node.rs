//! `margay node run`: the per-node daemon, composed from the parts that own the work.
//!
//! ```text
//!   etcd ──Node/BGPConfiguration/BGPPeer (watch + 2 s poll)──▶ desired_peers ──apply──▶ speaker ◀──▶ peers (TCP 179)
//!     │                                                                          │   ▲
//!     │                                                         FibEvent (learned)│   │ Originate/WithdrawLocal
//!     ▼                                                                          ▼   │   (own blocks, borrowed /32)
//!   NodeIpam ◀──assign/release── CNI server (unix socket) ──add/del_pod──▶ kernel  FIB task (proto 77)
//!     │                                                                          ▲
//!     └──routes() (on every ADD/DEL and every second) ──blocks──▶ blackhole routes┘
//!
//!   HTTP /status /healthz /readyz /metrics ◀── speaker status
//! ```
//!
//! This module owns the composition only: registering the Node resource, creating the default pool, the
//! peer refresh loop, the advertisement of the node's blocks, and the [`NodeBackend`] behind the CNI socket.
//! Peers are re-derived whenever a watch on the v3 resources reports a change (and every 2 seconds as a
//! safety net); the speaker's `apply` only touches sessions whose settings changed, so unchanged sessions
//! stay up.
//!
//! BGP sockets and the HTTP endpoint live in the namespace the process runs in; `--netns` points the
//! dataplane (FIB, pod plumbing, sysctls) at another namespace. The lab runs each node inside its namespace,
//! so both are the same there.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use futures::FutureExt;
use ipnetwork::IpNetwork;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, Notify};

use crate::api::{self, ReadyState, StatusReport};
use crate::bgp::policy::Policy;
use crate::bgp::rib::{FibEvent, RibInput};
use crate::bgp::speaker::{self, DesiredPeer, SpeakerConfig, SpeakerHandle};
use crate::bgp::wire::types::PathAttributes;
use crate::cli::EtcdArgs;
use crate::cni::backend::{
    Attachment, CniBackend, DelRequest, GcRequest, PodRequest, StatusRequest,
};
use crate::cni::server::{CniServer, ServerConfig};
use crate::cni::types::{codes, Cidr, CniError, Dns, Route as CniRoute, DEFAULT_SOCKET};
use crate::config::bgp::{AsNumber, ConfigSet, Node, NodeBgpSpec, NodeSpec, KIND_NODE};
use crate::config::peers::desired_peers;
use crate::config::{ObjectMeta, API_VERSION};
use crate::dataplane::fib::{Fib, FibConfig, FibHandle, NextHop, Route};
use crate::dataplane::pod::{self, PodSpec, POD_GATEWAY_V4};
use crate::datastore::{keys, Datastore, WatchMessage, Watcher};
use crate::ipam::{AssignRequest, IpamError, NodeInfo, NodeIpam};

/// Where Calico keeps Node resources (`/calico/resources/v3/projectcalico.org/nodes/<name>`).
pub const NODES_PLURAL: &str = "nodes";
const BGPCONFIG_PLURAL: &str = "bgpconfigurations";
const BGPPEER_PLURAL: &str = "bgppeers";
/// How often the peer set is re-derived from the datastore.
const PEER_POLL: Duration = Duration::from_secs(2);
/// How often the node's blocks are compared with what it advertises (ADD and DEL also trigger it).
const BLOCK_POLL: Duration = Duration::from_secs(1);

/// Interface name prefixes first-found autodetection skips (Calico's list plus margay's pod veths).
const SKIP_IFACES: &[&str] = &[
    "lo",
    "mg",
    "docker",
    "cbr",
    "dummy",
    "virbr",
    "lxcbr",
    "veth",
    "cali",
    "tunl",
    "flannel",
    "kube-ipvs",
    "cni",
    "vxlan",
    "wireguard",
    "nodelocaldns",
    "br-",
];

/// `margay node run` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's name (default: the host name).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// Network namespace of the dataplane (a path like /var/run/netns/NODE; default: the current one).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The node's IPv4 address (default: first found, skipping lo, pod and virtual interfaces).
    #[arg(long, env = "IP")]
    pub ip: Option<Ipv4Addr>,
    /// How to find the node address when --ip is not given (Calico's IP_AUTODETECTION_METHOD): first-found,
    /// interface=REGEX[,REGEX], skip-interface=REGEX[,REGEX], can-reach=IP|HOSTNAME or cidr=CIDR[,CIDR].
    #[arg(long, env = "MARGAY_IP_AUTODETECTION_METHOD", default_value = "first-found", value_parser = crate::dataplane::autodetect::parse_method)]
    pub ip_autodetection_method: crate::dataplane::autodetect::Method,
    /// The CNI socket margay-cni connects to.
    #[arg(long, env = "MARGAY_CNI_SOCKET", default_value = DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    /// Local HTTP endpoint for /status, /healthz, /readyz and /metrics.
    #[arg(long, env = "MARGAY_HTTP_LISTEN", default_value = api::DEFAULT_LISTEN)]
    pub http_listen: SocketAddr,
    /// The default IPv4 pool, created when no pool exists.
    #[arg(long, env = "MARGAY_IPV4POOL_CIDR", default_value = "192.168.0.0/16")]
    pub ipv4_pool_cidr: ipnetwork::Ipv4Network,
    /// Block size of the default pool.
    #[arg(long, env = "MARGAY_IPV4POOL_BLOCK_SIZE", default_value_t = 26)]
    pub ipv4_pool_block_size: u8,
    /// This node's AS number (written to its Node resource; default: BGPConfiguration's, else 64512).
    #[arg(long, env = "AS")]
    pub as_number: Option<u32>,
    /// MTU of pod interfaces when the CNI configuration gives none.
    #[arg(long, default_value_t = 1500)]
    pub pod_mtu: u32,
}

/// Run the node daemon until SIGTERM/SIGINT.
pub fn run(etcd: EtcdArgs, args: NodeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(etcd, args))
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

/// Calico's first-found method: the first IPv4 address on an interface whose name is not a loopback, pod
/// or virtual interface. Logs the choice and the other candidates.
pub fn autodetect_ipv4(netns: Option<&std::path::Path>) -> anyhow::Result<(Ipv4Addr, u8)> {
    let found = crate::dataplane::netns::in_netns(netns, || {
        let mut out = Vec::new();
        let addrs =
            nix::ifaddrs::getifaddrs().map_err(|e| crate::dataplane::DataplaneError::Invalid {
                what: "interface addresses",
                value: String::new(),
                reason: e.to_string(),
            })?;
        for a in addrs {
            let (Some(addr), Some(mask)) = (a.address, a.netmask) else {
                continue;
            };
            let (Some(sin), Some(m)) = (addr.as_sockaddr_in(), mask.as_sockaddr_in()) else {
                continue;
            };
            out.push((
                a.interface_name.clone(),
                sin.ip(),
                u32::from(m.ip()).count_ones() as u8,
            ));
        }
        Ok(out)
    })
    .context("listing the node's addresses for autodetection")?;
    let usable: Vec<&(String, Ipv4Addr, u8)> = found
        .iter()
        .filter(|(name, ip, _)| {
            !SKIP_IFACES.iter().any(|p| name.starts_with(p))
                && !ip.is_loopback()
                && !ip.is_link_local()
        })
        .collect();
    match usable.first() {
        Some((name, ip, len)) => {
            tracing::info!(interface = %name, address = %ip, prefix = len,
                other_candidates = ?usable.iter().skip(1).map(|(n, a, _)| format!("{n}:{a}")).collect::<Vec<_>>(),
                "node address autodetected (first-found)");
            Ok((*ip, *len))
        }
        None => anyhow::bail!(
            "no node IPv4 address found (interfaces seen: {:?}); pass --ip or set IP",
            found
                .iter()
                .map(|(n, a, _)| format!("{n}:{a}"))
                .collect::<Vec<_>>()
        ),
    }
}

/// Whether first-found may pick `ip` on interface `name`: not loopback, link-local, a pod veth (`mg...`) or
/// a known virtual/tunnel interface.
pub fn first_found_candidate(name: &str, ip: Ipv4Addr) -> bool {
    !SKIP_IFACES.iter().any(|p| name.starts_with(p)) && !ip.is_loopback() && !ip.is_link_local()
}

/// Prefix length of `ip` on the node's interfaces (for the Node resource's `ipv4Address`), /32 if unknown.
fn prefix_len_of(netns: Option<&std::path::Path>, ip: Ipv4Addr) -> u8 {
    crate::dataplane::netns::in_netns(netns, || {
        let addrs =
            nix::ifaddrs::getifaddrs().map_err(|e| crate::dataplane::DataplaneError::Invalid {
                what: "interface addresses",
                value: String::new(),
                reason: e.to_string(),
            })?;
        Ok(addrs
            .filter_map(|a| {
                let sin = a.address?.as_sockaddr_in().map(|s| s.ip())?;
                let m = a.netmask?.as_sockaddr_in().map(|s| s.ip())?;
                (sin == ip).then(|| u32::from(m).count_ones() as u8)
            })
            .next())
    })
    .ok()
    .flatten()
    .unwrap_or(32)
}

/// Create or update this node's Node resource so that `spec.bgp.ipv4Address` (and the AS, if given) are
/// what this daemon runs with. Other fields written by operators are kept.
pub async fn register_node(
    ds: &Datastore,
    name: &str,
    ipv4: Ipv4Addr,
    prefix_len: u8,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    let key = keys::resource_key(NODES_PLURAL, name);
    for _ in 0..10 {
        let existing = ds.get(&key).await?;
        let mut node: Node = match &existing {
            Some(kv) => serde_json::from_slice(&kv.value)
                .with_context(|| format!("stored Node {name:?} at {key} is not valid"))?,
            None => Node {
                api_version: API_VERSION.into(),
                kind: KIND_NODE.into(),
                metadata: ObjectMeta {
                    name: name.to_string(),
                    ..Default::default()
                },
                spec: NodeSpec::default(),
                status: None,
            },
        };
        let bgp = node.spec.bgp.get_or_insert_with(NodeBgpSpec::default);
        bgp.ipv4_address = Some(format!("{ipv4}/{prefix_len}"));
        if let Some(a) = asn {
            bgp.as_number = Some(AsNumber(a));
        }
        node.metadata.resource_version = None;
        let bytes = serde_json::to_vec(&node)?;
        let done = match &existing {
            Some(kv) if kv.value == bytes => return Ok(()),
            Some(kv) => ds.update(&key, bytes, kv.mod_revision).await?.is_some(),
            None => ds.create(&key, bytes).await?.is_some(),
        };
        if done {
            tracing::info!(node = name, address = %ipv4, "Node resource registered");
            return Ok(());
        }
    }
    anyhow::bail!("Node {name:?} kept changing under us while registering it; try again")
}

/// Create the default IPv4 pool when the datastore has no pool at all (as calico-node does at start).
pub async fn ensure_default_pool(
    ds: &Datastore,
    cidr: ipnetwork::Ipv4Network,
    block_size: u8,
) -> anyhow::Result<()> {
    let (pools, _) = ds
        .list(&keys::resource_prefix(crate::config::ippool::PLURAL))
        .await?;
    if !pools.is_empty() {
        return Ok(());
    }
    let doc = format!(
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: default-ipv4-ippool\nspec:\n  cidr: {cidr}\n  blockSize: {block_size}\n  natOutgoing: true\n  nodeSelector: all()\n"
    );
    match crate::cli::resources::apply(ds, &doc).await {
        Ok(_) => {
            tracing::info!(%cidr, block_size, "created the default IPv4 pool");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!(
            "creating the default IPv4 pool {cidr}: {e}"
        )),
    }
}

/// The BGP resources in the datastore, validated together (a bad set is refused as a whole).
pub async fn load_config(ds: &Datastore) -> anyhow::Result<ConfigSet> {
    let mut text = String::new();
    for (plural, kind) in [
        (BGPCONFIG_PLURAL, "BGPConfiguration"),
        (BGPPEER_PLURAL, "BGPPeer"),
        (NODES_PLURAL, KIND_NODE),
    ] {
        let (kvs, _) = ds.list(&keys::resource_prefix(plural)).await?;
        for kv in kvs {
            let mut v: serde_json::Value = serde_json::from_slice(&kv.value)
                .with_context(|| format!("stored {kind} at {} is not JSON", kv.key))?;
            if let Some(o) = v.as_object_mut() {
                o.entry("apiVersion").or_insert_with(|| API_VERSION.into());
                o.entry("kind").or_insert_with(|| kind.into());
            }
            // JSON is YAML: one document per resource.
            text.push_str("---\n");
            text.push_str(&serde_json::to_string(&v)?);
            text.push('\n');
        }
    }
    ConfigSet::from_yaml(&text).map_err(|e| anyhow::anyhow!("BGP resources in etcd: {e}"))
}

/// Who this node is, once flags and the datastore are combined.
#[derive(Debug, Clone)]
struct Identity {
    name: String,
    ip: Ipv4Addr,
    asn: u32,
    port: u16,
}

async fn derive_peers(ds: &Datastore, id: &Identity) -> anyhow::Result<Vec<DesiredPeer>> {
    let set = load_config(ds).await?;
    Ok(desired_peers(&set, &id.name)?
        .iter()
        .map(|p| DesiredPeer::from_config(p, id.ip))
        .collect())
}

async fn run_async(etcd: EtcdArgs, args: NodeArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let started = Instant::now();
    let name = node_name(&args)?;
    let netns = args.netns.clone();
    let (ip, prefix_len) = match args.ip {
        Some(ip) => (ip, prefix_len_of(netns.as_deref(), ip)),
        None => crate::dataplane::autodetect::detect_ipv4(
            &args.ip_autodetection_method,
            netns.as_deref(),
        )?,
    };
    let endpoints = etcd.etcd_endpoints.join(",");
    let ds = etcd
        .datastore()
        .map_err(|e| anyhow::anyhow!("etcd at {endpoints}: {e}"))?;
    let on_etcd = |e: anyhow::Error| anyhow::anyhow!("etcd at {endpoints}: {e:#}");
    register_node(&ds, &name, ip, prefix_len, args.as_number)
        .await
        .map_err(on_etcd)?;
    ensure_default_pool(&ds, args.ipv4_pool_cidr, args.ipv4_pool_block_size)
        .await
        .map_err(on_etcd)?;
    let set = load_config(&ds).await.map_err(on_etcd)?;
    let asn = args
        .as_number
        .or_else(|| set.nodes.get(&name).and_then(Node::as_number))
        .unwrap_or_else(|| set.default_bgp().as_number());
    let id = Identity {
        port: set.listen_port(&name),
        name: name.clone(),
        ip,
        asn,
    };

    // ensure_node logs what it changed.
    crate::dataplane::sysctl::ensure_node(netns.as_deref())?;
    let ipam = Arc::new(
        NodeIpam::start(ds.clone(), NodeInfo::new(&name))
            .await
            .map_err(|e| anyhow::anyhow!("IPAM for node {name:?} (etcd at {endpoints}): {e}"))?,
    );
    let fib = Fib::spawn(FibConfig {
        netns: netns.clone(),
        ..Default::default()
    })
    .await
    .context("starting the FIB task")?;
    let (fib_tx, fib_rx) = mpsc::channel::<Vec<FibEvent>>(256);
    let spk = speaker::spawn(
        SpeakerConfig {
            local_asn: asn,
            router_id: ip,
            cluster_id: None,
            listen: vec![SocketAddr::from((Ipv4Addr::UNSPECIFIED, id.port))],
            rib_capacity: 1024,
        },
        Arc::new(Policy::default()),
        Some(fib_tx),
    )
    .await
    .with_context(|| format!("starting the BGP speaker on port {}", id.port))?;
    let spk = Arc::new(spk);
    let learned = tokio::spawn(learned_routes(fib_rx, fib.clone()));

    let refresh = Arc::new(Notify::new());
    let adverts = tokio::spawn(advertise_blocks(
        ipam.clone(),
        fib.clone(),
        spk.rib(),
        ip,
        refresh.clone(),
    ));
    let peers_applied = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peers = tokio::spawn(peer_loop(
        ds.clone(),
        id.clone(),
        spk.clone(),
        peers_applied.clone(),
    ));

    let backend = Arc::new(NodeBackend {
        ipam: ipam.clone(),
        netns: netns.clone(),
        mtu: args.pod_mtu,
        refresh: refresh.clone(),
    });
    let mut registry = Registry::default();
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
    let mut cni = tokio::spawn(server.run(async move {
        let _ = stop_rx.await;
    }));

    let status_spk = spk.clone();
    let status_id = id.clone();
    let (status_ipam, status_fib, status_ds) = (ipam.clone(), fib.clone(), ds.clone());
    let status_source = move || {
        let spk = status_spk.clone();
        let id = status_id.clone();
        let (ipam, fib, ds) = (status_ipam.clone(), status_fib.clone(), status_ds.clone());
        // Ready once the peers have been derived from the datastore and applied (IPAM, the FIB and the
        // CNI socket are up before the endpoint starts). Not tied to every peer being Established.
        let ready = peers_applied.load(std::sync::atomic::Ordering::Relaxed);
        async move {
            StatusReport {
                role: "node".into(),
                node_name: id.name.clone(),
                version: env!("CARGO_PKG_VERSION").into(),
                asn: id.asn,
                router_id: id.ip.to_string(),
                uptime_seconds: started.elapsed().as_secs(),
                ready: ReadyState {
                    ready,
                    reason: (!ready).then(|| {
                        "BGP peers not yet derived from the datastore (see the log)".to_string()
                    }),
                },
                peers: spk.status().await.unwrap_or_default(),
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
                }),
                datastore: Some(datastore_summary(&ds)),
            }
        }
        .boxed()
    };
    let mut http = tokio::spawn(api::serve(
        args.http_listen,
        status_source,
        Arc::new(registry),
    ));
    tracing::info!(node = %name, address = %ip, asn, cni_socket = %args.cni_socket.display(),
        http = %args.http_listen, etcd = %endpoints, "margay node running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut check = tokio::time::interval(Duration::from_millis(500));
    let outcome: anyhow::Result<()> = loop {
        tokio::select! {
            _ = term.recv() => break Ok(()),
            _ = int.recv() => break Ok(()),
            _ = check.tick() => {
                if http.is_finished() {
                    break match (&mut http).await {
                        Ok(Err(e)) => Err(anyhow::anyhow!("HTTP endpoint: {e}")),
                        _ => Err(anyhow::anyhow!("HTTP endpoint stopped")),
                    };
                }
                if cni.is_finished() {
                    break match (&mut cni).await {
                        Ok(Err(e)) => Err(anyhow::anyhow!("CNI server: {e}")),
                        _ => Err(anyhow::anyhow!("CNI server stopped")),
                    };
                }
            }
        }
    };
    let _ = stop_tx.send(());
    // Wait for the aborted tasks to drop what they hold, so the speaker handle is ours alone again.
    for t in [peers, adverts, learned] {
        t.abort();
        let _ = t.await;
    }
    // On a signal the HTTP and CNI tasks are still running (on an error one of them was already awaited).
    if outcome.is_ok() {
        http.abort();
        let _ = http.await;
        let _ = tokio::time::timeout(Duration::from_secs(5), cni).await;
    }
    // Close sessions without a NOTIFICATION so peers keep our routes while we restart (RFC 4724 4.1); the
    // kernel routes stay too (the FIB never flushes).
    match Arc::try_unwrap(spk) {
        Ok(spk) => spk.shutdown(true).await,
        Err(_) => {
            tracing::warn!("BGP speaker still shared at shutdown; sessions close with the process")
        }
    }
    tracing::info!("margay node stopped");
    outcome
}

/// The datastore's request counters as `/status` and `/metrics` show them.
pub fn datastore_summary(ds: &Datastore) -> api::DatastoreSummary {
    let st = ds.stats();
    api::DatastoreSummary {
        requests: st.round_trips,
        errors: st.errors,
        unreachable: st.unreachable,
    }
}

/// Routes learned over BGP into the kernel: each ECMP set as one route via its next hops.
async fn learned_routes(mut rx: mpsc::Receiver<Vec<FibEvent>>, fib: FibHandle) {
    while let Some(events) = rx.recv().await {
        let mut replace = Vec::new();
        let mut remove = Vec::new();
        for ev in events {
            match ev {
                FibEvent::Set { prefix, next_hops } => replace.push(Route::via(
                    prefix,
                    next_hops.into_iter().map(NextHop::via).collect(),
                )),
                FibEvent::Remove { prefix } => remove.push(prefix),
            }
        }
        if !remove.is_empty() {
            if let Err(e) = fib.remove_many(remove).await {
                tracing::error!(error = %e, "FIB remove");
            }
        }
        if !replace.is_empty() {
            if let Err(e) = fib.replace_many(replace).await {
                tracing::error!(error = %e, "FIB replace");
            }
        }
    }
}

/// Keep the RIB's local routes and the blackhole routes equal to the node's blocks (exact prefix) and
/// borrowed addresses (/32).
async fn advertise_blocks(
    ipam: Arc<NodeIpam>,
    fib: FibHandle,
    rib: mpsc::Sender<RibInput>,
    ip: Ipv4Addr,
    refresh: Arc<Notify>,
) {
    let attrs = Arc::new(PathAttributes {
        next_hop: Some(ip),
        ..Default::default()
    });
    let mut blocks: BTreeSet<IpNetwork> = BTreeSet::new();
    let mut hosts: BTreeSet<IpNetwork> = BTreeSet::new();
    loop {
        match ipam.routes().await {
            Ok(r) => {
                let want_blocks: BTreeSet<IpNetwork> = r.blocks.iter().copied().collect();
                let want_hosts: BTreeSet<IpNetwork> = r
                    .borrowed
                    .iter()
                    .filter_map(|(a, _)| {
                        IpNetwork::new(*a, if a.is_ipv4() { 32 } else { 128 }).ok()
                    })
                    .collect();
                let gone: Vec<IpNetwork> = blocks
                    .difference(&want_blocks)
                    .chain(hosts.difference(&want_hosts))
                    .copied()
                    .collect();
                let new_blocks: Vec<IpNetwork> = want_blocks.difference(&blocks).copied().collect();
                let new: Vec<IpNetwork> = new_blocks
                    .iter()
                    .copied()
                    .chain(want_hosts.difference(&hosts).copied())
                    .collect();
                // Blackhole first, then advertise: traffic for a free address of the block is dropped here
                // instead of looping back to a peer.
                if !new_blocks.is_empty() {
                    if let Err(e) = fib
                        .replace_many(new_blocks.iter().map(|b| Route::blackhole(*b)).collect())
                        .await
                    {
                        tracing::error!(error = %e, "blackhole routes for the node's blocks");
                    }
                }
                if !new.is_empty() {
                    tracing::info!(prefixes = ?new, "advertising");
                    let _ = rib
                        .send(RibInput::Originate {
                            prefixes: new,
                            attrs: attrs.clone(),
                        })
                        .await;
                }
                if !gone.is_empty() {
                    tracing::info!(prefixes = ?gone, "withdrawing");
                    let _ = rib
                        .send(RibInput::WithdrawLocal {
                            prefixes: gone.clone(),
                        })
                        .await;
                    let gone_blocks: Vec<IpNetwork> =
                        gone.into_iter().filter(|g| blocks.contains(g)).collect();
                    if !gone_blocks.is_empty() {
                        if let Err(e) = fib.remove_many(gone_blocks).await {
                            tracing::error!(error = %e, "removing blackhole routes");
                        }
                    }
                }
                blocks = want_blocks;
                hosts = want_hosts;
            }
            Err(e) => tracing::warn!(error = %e, "reading the node's blocks"),
        }
        tokio::select! {
            _ = refresh.notified() => {}
            _ = tokio::time::sleep(BLOCK_POLL) => {}
        }
    }
}

/// Re-derive the peers from the datastore on every change the watch reports and every [`PEER_POLL`];
/// apply only when the set changed.
async fn peer_loop(
    ds: Arc<Datastore>,
    id: Identity,
    spk: Arc<SpeakerHandle>,
    applied: Arc<std::sync::atomic::AtomicBool>,
) {
    let mut current: Option<Vec<DesiredPeer>> = None;
    let mut last_error: Option<String> = None;
    let mut watcher: Option<Watcher> = None;
    loop {
        // Watch every v3 resource from before the read below, so no change between the read and the watch
        // is missed. A failed or compacted watch is re-created on the next round; the poll stays as a net.
        if watcher.is_none() {
            if let Ok((_, rev)) = ds.list(&keys::resource_prefix(NODES_PLURAL)).await {
                watcher = Some(ds.watch(keys::RESOURCES_PREFIX, rev + 1));
            }
        }
        match derive_peers(&ds, &id).await {
            Ok(peers) if current.as_ref() != Some(&peers) => match spk.apply(peers.clone()).await {
                // The speaker logs what the apply changed.
                Ok(_) => {
                    applied.store(true, std::sync::atomic::Ordering::Relaxed);
                    current = Some(peers);
                    last_error = None;
                }
                Err(e) => tracing::error!(error = %e, "applying BGP peers"),
            },
            Ok(_) => {}
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "BGP configuration refused; running peers unchanged");
                    last_error = Some(msg);
                }
            }
        }
        let event = async {
            match watcher.as_mut() {
                Some(w) => w.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            msg = event => match msg {
                Some(WatchMessage::Events(_)) => {
                    // Let a burst of writes (a node registering, an operator's apply) land together.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Some(WatchMessage::Resync) | None => watcher = None,
            },
            _ = tokio::time::sleep(PEER_POLL) => {}
        }
    }
}

/// The CNI backend of a node: IPAM in etcd + pod plumbing in the kernel + a nudge to the advertiser.
pub struct NodeBackend {
    pub ipam: Arc<NodeIpam>,
    pub netns: Option<PathBuf>,
    pub mtu: u32,
    pub refresh: Arc<Notify>,
}

fn ipam_error(what: &str, e: IpamError) -> CniError {
    if e.is_unreachable() {
        CniError::try_again(format!("{what}: {e}"), "etcd is not reachable; retry")
    } else {
        CniError::new(codes::INTERNAL, format!("{what}: {e}"), "")
    }
}

fn attachment(
    host_ifname: String,
    pod_ifname: String,
    pod_mac: Option<String>,
    mtu: u32,
    ip: Ipv4Addr,
) -> Attachment {
    Attachment {
        host_ifname,
        host_mac: Some("ee:ee:ee:ee:ee:ee".into()),
        pod_ifname,
        pod_mac,
        mtu: Some(mtu),
        ips: vec![Cidr {
            addr: IpAddr::V4(ip),
            prefix: 32,
        }],
        routes: vec![CniRoute {
            dst: Cidr {
                addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
                prefix: 0,
            },
            gw: Some(IpAddr::V4(POD_GATEWAY_V4)),
        }],
        dns: Dns::default(),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::dataplane::DataplaneError> + Send + 'static,
) -> Result<T, CniError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(CniError::new(codes::INTERNAL, e.to_string(), "")),
        Err(e) => Err(CniError::new(
            codes::INTERNAL,
            format!("dataplane task: {e}"),
            "",
        )),
    }
}

impl NodeBackend {
    /// The pod's IPv4 address as the kernel holds it (the host route through its veth).
    async fn plumbed_ipv4(&self, workload_id: &str) -> Result<Option<Ipv4Addr>, CniError> {
        let netns = self.netns.clone();
        let pods = blocking(move || pod::list_pods(netns.as_deref())).await?;
        Ok(pods
            .into_iter()
            .find(|p| p.workload_id == workload_id)
            .and_then(|p| {
                p.ips.into_iter().find_map(|a| match a {
                    IpAddr::V4(v) => Some(v),
                    IpAddr::V6(_) => None,
                })
            }))
    }
}

impl CniBackend for NodeBackend {
    async fn add(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let handle = req.handle_id();
        let mut ask = AssignRequest::v4(&handle);
        if let Some(p) = &req.pod {
            ask.attributes
                .insert("namespace".into(), p.namespace.clone());
            ask.attributes.insert("pod".into(), p.name.clone());
        }
        if !req.ipv4_pools.is_empty() {
            return Err(CniError::invalid_config(
                "ipv4_pools overrides are not supported by this margay node yet; remove them from the CNI configuration",
            ));
        }
        let assigned = self
            .ipam
            .assign(ask)
            .await
            .map_err(|e| ipam_error("IPAM assign", e))?;
        let Some(ip) = assigned.ips.iter().find_map(|a| match a.ip {
            IpAddr::V4(v) => Some(v),
            IpAddr::V6(_) => None,
        }) else {
            let _ = self.ipam.release_handle(&handle).await;
            return Err(CniError::new(
                codes::IPAM_EXHAUSTED,
                "no IPv4 address available for this node",
                "",
            ));
        };
        // The block may be new: advertise it before the pod sends its first packet.
        self.refresh.notify_one();
        let mtu = req.mtu.unwrap_or(self.mtu);
        let spec = PodSpec {
            node_netns: self.netns.clone(),
            pod_netns: req.netns.clone(),
            workload_id: req.workload_id(),
            ifname: req.ifname.clone(),
            mtu,
            ipv4: Some(ip),
            ipv6: None,
        };
        match blocking(move || pod::add_pod(&spec)).await {
            Ok(r) => Ok(attachment(
                r.host_ifname,
                r.pod_ifname,
                Some(r.pod_mac),
                mtu,
                ip,
            )),
            Err(e) => {
                // Roll back: the address goes back to the pool (add_pod removes what it half built).
                if let Err(re) = self.ipam.release_handle(&handle).await {
                    tracing::error!(handle, error = %re, "rollback: releasing the address failed");
                }
                self.refresh.notify_one();
                Err(e)
            }
        }
    }

    async fn del(&self, req: DelRequest) -> Result<(), CniError> {
        let netns = self.netns.clone();
        let wid = req.workload_id();
        blocking(move || pod::del_pod(netns.as_deref(), &wid)).await?;
        self.ipam
            .release_handle(&req.handle_id())
            .await
            .map_err(|e| ipam_error("IPAM release", e))?;
        self.refresh.notify_one();
        Ok(())
    }

    async fn check(&self, req: PodRequest) -> Result<Attachment, CniError> {
        let wid = req.workload_id();
        let Some(ip) = self.plumbed_ipv4(&wid).await? else {
            return Err(CniError::new(
                codes::CHECK_FAILED,
                format!("no pod interface for workload {wid:?} on this node"),
                "",
            ));
        };
        let mtu = req.mtu.unwrap_or(self.mtu);
        let spec = PodSpec {
            node_netns: self.netns.clone(),
            pod_netns: req.netns.clone(),
            workload_id: wid.clone(),
            ifname: req.ifname.clone(),
            mtu,
            ipv4: Some(ip),
            ipv6: None,
        };
        let host = pod::host_ifname(&wid);
        blocking(move || pod::check_pod(&spec)).await?;
        Ok(attachment(host, req.ifname, None, mtu, ip))
    }

    async fn status(&self, _req: StatusRequest) -> Result<(), CniError> {
        self.ipam
            .routes()
            .await
            .map(|_| ())
            .map_err(|e| ipam_error("IPAM", e))
    }

    async fn gc(&self, _req: GcRequest) -> Result<(), CniError> {
        Err(CniError::new(
            codes::INTERNAL,
            "GC is not supported by this margay node yet",
            "use `margay ipam check` to find leaked addresses",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_found_skips_pod_virtual_and_loopback_interfaces() {
        let a = Ipv4Addr::new(10, 0, 0, 5);
        assert!(first_found_candidate("eth0", a));
        assert!(first_found_candidate("ens3", a));
        assert!(first_found_candidate("bond0", a));
        for skipped in [
            "lo",
            "mg0123456789a",
            "docker0",
            "veth12",
            "cali123",
            "tunl0",
            "cni0",
            "br-abc",
        ] {
            assert!(!first_found_candidate(skipped, a), "{skipped}");
        }
        assert!(!first_found_candidate("eth0", Ipv4Addr::LOCALHOST));
        assert!(!first_found_candidate(
            "eth0",
            Ipv4Addr::new(169, 254, 1, 1)
        ));
    }

    #[test]
    fn attachment_is_a_calico_shaped_result() {
        let a = attachment(
            "mgabc".into(),
            "eth0".into(),
            None,
            1500,
            Ipv4Addr::new(10, 244, 0, 1),
        );
        assert_eq!(a.ips.len(), 1);
        assert_eq!(a.ips[0].prefix, 32);
        assert_eq!(a.routes.len(), 1);
        assert_eq!(a.routes[0].dst.prefix, 0);
        assert_eq!(a.routes[0].gw, Some(IpAddr::V4(POD_GATEWAY_V4)));
        let r = a.to_result("/var/run/netns/p");
        assert_eq!(r.interfaces[0].sandbox, None);
        assert_eq!(r.interfaces[1].sandbox.as_deref(), Some("/var/run/netns/p"));
    }
}
