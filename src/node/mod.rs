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

/// Where Calico keeps Node resources (`/calico/resources/v3/projectcalico.org/nodes/<name>`).
/// How often the mounted password Secrets are compared with what the peers use (local files, no etcd).
const SECRETS_POLL: Duration = Duration::from_secs(10);
/// How often the node's blocks are compared with what it advertises (ADD and DEL also trigger it).
const BLOCK_POLL: Duration = Duration::from_secs(1);

/// `margay node run` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// This node's name (default: the host name).
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// Network namespace of the dataplane (a path like /var/run/netns/NODE; default: the current one).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// The node's IPv4 address, or `autodetect` (as Calico's IP; the default): found by
    /// --ip-autodetection-method and re-checked every --ip-recheck-interval.
    #[arg(long, env = "IP", value_parser = parse_node_ip)]
    pub ip: Option<NodeIp>,
    /// The node's IPv6 address: the next hop of its IPv6 routes (pod blocks of IPv6 pools), carried over the
    /// IPv4 sessions (MP-BGP). Without it, IPv6 blocks are blackholed locally but not advertised.
    /// `autodetect` finds it with --ip6-autodetection-method and re-checks it every --ip-recheck-interval, as
    /// Calico's IP6=autodetect; `none` or unset: no IPv6 address.
    #[arg(long, env = "IP6", value_parser = parse_node_ip6)]
    pub ip6: Option<NodeIp6>,
    /// How IP6=autodetect finds the address (Calico's IP6_AUTODETECTION_METHOD): first-found,
    /// interface=REGEX[,REGEX] or skip-interface=REGEX[,REGEX].
    #[arg(long, env = "IP6_AUTODETECTION_METHOD", default_value = "first-found", value_parser = crate::dataplane::autodetect::parse_method)]
    pub ip6_autodetection_method: crate::dataplane::autodetect::Method,
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
    /// MTU of pod interfaces when the CNI configuration gives none. Unset or 0: detected as Calico does,
    /// the smallest MTU of the up interfaces matching --mtu-iface-pattern minus the encapsulation overhead
    /// of the pools (VXLAN 50, VXLAN IPv6 70, IPIP 20), re-detected every 30 s and on pool changes.
    #[arg(long, env = "MARGAY_POD_MTU")]
    pub pod_mtu: Option<u32>,
    /// The interfaces whose MTU bounds the pod MTU (Felix's MTUIfacePattern).
    #[arg(long, env = "FELIX_MTUIFACEPATTERN", default_value = crate::dataplane::mtu::DEFAULT_IFACE_PATTERN)]
    pub mtu_iface_pattern: String,
    /// A default IPv6 pool, created when the variable is set and no IPv6 pool exists (Calico:
    /// CALICO_IPV6POOL_CIDR). Pods then get an IPv6 address beside their IPv4 one (dual stack); set IP6 so
    /// the node's IPv6 blocks are advertised.
    #[arg(long, env = "MARGAY_IPV6POOL_CIDR")]
    pub ipv6_pool_cidr: Option<ipnetwork::Ipv6Network>,
    /// Block size of the default IPv6 pool.
    #[arg(long, env = "MARGAY_IPV6POOL_BLOCK_SIZE", default_value_t = 122)]
    pub ipv6_pool_block_size: u8,
    /// After a start, how long (seconds) to wait for configured peers that are not Established before
    /// judging convergence on the Established ones alone.
    #[arg(long, env = "MARGAY_CONVERGE_MIN_WAIT", default_value_t = restart::CONVERGE_MIN_WAIT.as_secs())]
    pub converge_min_wait: u64,
    /// The bound (seconds) on the wait for End-of-RIB after a start; then stale routes are swept anyway.
    #[arg(long, env = "MARGAY_CONVERGE_MAX_WAIT", default_value_t = restart::CONVERGE_MAX_WAIT.as_secs())]
    pub converge_max_wait: u64,
    /// BGP password Secrets (BGPPeer/BGPConfiguration `secretKeyRef {name, key}`) as files
    /// `<dir>/<name>/<key>`: mount each Secret at `<dir>/<name>`. Re-read on every configuration change.
    #[arg(
        long,
        env = "MARGAY_BGP_SECRETS_DIR",
        default_value = "/etc/margay/bgp-secrets"
    )]
    pub bgp_secrets_dir: PathBuf,
    /// Calico's `natOutgoingAddress` (IPv4): traffic of natOutgoing pools leaving for outside every pool is
    /// SNATed to this address instead of masqueraded to the outgoing interface's address.
    #[arg(long, env = "FELIX_NATOUTGOINGADDRESS")]
    pub nat_outgoing_address: Option<Ipv4Addr>,
    /// How pod routes travel (Calico's CALICO_NETWORKING_BACKEND): `bird` (BGP, the default) or `vxlan` (no
    /// BGP session at all: routes from the IPAM blocks' affinities, through VXLAN; pools need vxlanMode).
    #[arg(long, env = "CALICO_NETWORKING_BACKEND", default_value = "bird", value_parser = ["bird", "bgp", "vxlan"])]
    pub networking_backend: String,
    /// Where the node keeps its run marker (default: the directory of --cni-socket, a hostPath that
    /// survives a daemon restart but not a reboot). When an earlier run's marker is there at start, the
    /// node announces itself as restarting (graceful restart R bit, RFC 4724 3), as the reflector does.
    #[arg(long, env = "MARGAY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// With an autodetected address (no --ip), detect it again this often (seconds; 0: never), as Calico
    /// does every 60 s: on a change the Node resource is updated, the other nodes re-peer with the new
    /// address and this node announces its routes with it as next hop.
    #[arg(long, env = "MARGAY_IP_RECHECK_INTERVAL", default_value_t = 60)]
    pub ip_recheck_interval: u64,
    /// How long an affine IPAM block must stay empty before this node releases it (Go duration; the node
    /// keeps one block per pool). IPAMConfiguration `emptyBlockGracePeriod` overrides it.
    #[arg(long, env = "MARGAY_IPAM_EMPTY_BLOCK_GRACE", default_value = "15m", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_empty_block_grace: Duration,
    /// How long a released address is not handed out again unless the pools have nothing else (Go
    /// duration). IPAMConfiguration `releasedAddressCooldown` overrides it.
    #[arg(long, env = "MARGAY_IPAM_RELEASE_COOLDOWN", default_value = "30s", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_release_cooldown: Duration,
    /// TTL of the node's liveness lease in etcd (`margay ipam gc` releases nodes whose lease is gone).
    #[arg(long, env = "MARGAY_LIVENESS_TTL", default_value = "15s", value_parser = crate::config::bgp::parse_duration)]
    pub liveness_ttl: Duration,
    /// Take part in electing (through etcd) the one node that runs `ipam gc --release` on its own every
    /// minute, for nodes whose liveness has been gone longer than --ipam-gc-grace. Off by default.
    #[arg(long, env = "MARGAY_IPAM_GC_LEADER")]
    pub ipam_gc_leader: bool,
    /// With --ipam-gc-leader: how long a node must have been seen missing before it is released.
    #[arg(long, env = "MARGAY_IPAM_GC_GRACE", default_value = "15m", value_parser = crate::config::bgp::parse_duration)]
    pub ipam_gc_grace: Duration,
}

/// `--ip` / `IP` as Calico takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIp {
    Address(Ipv4Addr),
    /// Found by the autodetection method (and re-checked).
    Autodetect,
    /// `none`: an IPv6-only node (IP6 gives its address). Its BGP router id is derived from the node name
    /// as Calico's `CALICO_ROUTER_ID=hash` does.
    None,
}

impl NodeIp {
    /// The fixed address, or `None` when it is autodetected or absent.
    pub fn fixed(self) -> Option<Ipv4Addr> {
        match self {
            NodeIp::Address(a) => Some(a),
            NodeIp::Autodetect | NodeIp::None => None,
        }
    }
}

/// Calico's router id for nodes without an IPv4 address (`CALICO_ROUTER_ID=hash`, confd's util.go): the
/// first four octets of sha256(node name), the first one lowered by 32 when it is above 223 (so the id is
/// never a multicast or reserved address).
pub fn router_id_from_name(name: &str) -> Ipv4Addr {
    use sha2::Digest;
    let h = sha2::Sha256::digest(name.as_bytes());
    let mut o = [h[0], h[1], h[2], h[3]];
    if o[0] > 223 {
        o[0] -= 32;
    }
    Ipv4Addr::from(o)
}

/// `--ip6` / `IP6` as Calico takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeIp6 {
    Address(std::net::Ipv6Addr),
    /// Found by the IPv6 autodetection method (and re-checked).
    Autodetect,
    /// `none`: the node has no IPv6 address.
    None,
}

/// `fd00::1`, `fd00::1/64`, `autodetect` or `none` (an empty value is `none`).
pub fn parse_node_ip6(s: &str) -> Result<NodeIp6, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("autodetect") {
        return Ok(NodeIp6::Autodetect);
    }
    if t.is_empty() || t.eq_ignore_ascii_case("none") {
        return Ok(NodeIp6::None);
    }
    t.split('/')
        .next()
        .unwrap_or(t)
        .parse::<std::net::Ipv6Addr>()
        .map(NodeIp6::Address)
        .map_err(|_| format!("{s:?} is not an IPv6 address, \"autodetect\" or \"none\""))
}

/// `10.0.0.1`, `10.0.0.1/24` (Calico accepts the CIDR form; the prefix length is read from the interface)
/// `autodetect` or `none` (an IPv6-only node, which then needs IP6).
pub fn parse_node_ip(s: &str) -> Result<NodeIp, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("autodetect") || t.is_empty() {
        return Ok(NodeIp::Autodetect);
    }
    if t.eq_ignore_ascii_case("none") {
        return Ok(NodeIp::None);
    }
    t.split('/')
        .next()
        .unwrap_or(t)
        .parse::<Ipv4Addr>()
        .map(NodeIp::Address)
        .map_err(|_| format!("{s:?} is not an IPv4 address, \"autodetect\" or \"none\""))
}

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

/// Create or update this node's Node resource so that `spec.bgp.ipv4Address` (and the AS, if given) are
/// what this daemon runs with. Other fields written by operators are kept.
pub async fn register_node(
    ds: &Datastore,
    name: &str,
    ipv4: Ipv4Addr,
    prefix_len: u8,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    register_node_with(ds, name, Some((ipv4, prefix_len)), None, asn).await
}

/// [`register_node`], also writing `spec.bgp.ipv6Address` (`<address>/<prefix length>`) when given; without
/// it a stored ipv6Address is left as it is. `ipv4` None (an IPv6-only node, IP=none) removes a stored
/// ipv4Address, so no node peers with an address this one no longer has.
pub async fn register_node_with(
    ds: &Datastore,
    name: &str,
    ipv4: Option<(Ipv4Addr, u8)>,
    ipv6: Option<(std::net::Ipv6Addr, u8)>,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    let updated = resources::patch_node(ds, name, true, |spec| {
        let bgp = resources::bgp_of(spec);
        match ipv4 {
            Some((a, len)) => {
                bgp.insert("ipv4Address".into(), format!("{a}/{len}").into());
            }
            None => {
                bgp.remove("ipv4Address");
            }
        }
        if let Some(a) = asn {
            bgp.insert("asNumber".into(), a.into());
        }
        if let Some((v6, len)) = ipv6 {
            bgp.insert("ipv6Address".into(), format!("{v6}/{len}").into());
        }
    })
    .await?;
    if updated != Updated::Unchanged {
        tracing::info!(node = name, address = ?ipv4.map(|a| a.0), ipv6 = ?ipv6.map(|a| a.0), "Node resource registered");
    }
    Ok(())
}

/// Create the default IPv4 pool when the datastore has no pool at all (as calico-node does at start).
pub async fn ensure_default_pool(
    ds: &Datastore,
    cidr: ipnetwork::Ipv4Network,
    block_size: u8,
) -> anyhow::Result<()> {
    if !resources::list_pools(ds).await?.is_empty() {
        return Ok(());
    }
    let mut pool = IpPool::new("default-ipv4-ippool", cidr.into());
    pool.spec.block_size = Some(block_size);
    pool.spec.nat_outgoing = true;
    create_default_pool(ds, pool, |pools| !pools.is_empty()).await
}

/// Create the default IPv6 pool when no IPv6 pool exists (Calico creates each family's default pool on its
/// own). natOutgoing is off, as in Calico's default IPv6 pool.
pub async fn ensure_default_ipv6_pool(
    ds: &Datastore,
    cidr: ipnetwork::Ipv6Network,
    block_size: u8,
) -> anyhow::Result<()> {
    let has_v6 = |pools: &[IpPool]| pools.iter().any(|p| p.spec.cidr.is_ipv6());
    if has_v6(&resources::list_pools(ds).await?) {
        return Ok(());
    }
    let mut pool = IpPool::new("default-ipv6-ippool", cidr.into());
    pool.spec.block_size = Some(block_size);
    create_default_pool(ds, pool, has_v6).await
}

/// Create a default pool. Nodes starting together race to create it: when our create-only write loses,
/// or fails, and `present` now finds a pool that does the job, another node made it: success.
async fn create_default_pool(
    ds: &Datastore,
    pool: IpPool,
    present: impl Fn(&[IpPool]) -> bool,
) -> anyhow::Result<()> {
    let (name, cidr, block_size) = (pool.name().to_string(), pool.spec.cidr, pool.block_size());
    match resources::create_pool(ds, pool).await {
        Ok(true) => {
            tracing::info!(pool = name, %cidr, block_size, "created the default pool");
            Ok(())
        }
        Ok(false) => Ok(()),
        Err(_) if present(&resources::list_pools(ds).await?) => {
            tracing::info!(%cidr, "the default pool was created by another node meanwhile");
            Ok(())
        }
        Err(e) => Err(anyhow::anyhow!("creating the default pool {cidr}: {e}")),
    }
}

/// The IP pools in the datastore (for the export policy).
pub async fn load_pools(ds: &Datastore) -> anyhow::Result<Vec<IpPool>> {
    Ok(resources::list_pools(ds).await?)
}

/// The BGP resources in the datastore, validated together (a bad set is refused as a whole).
pub async fn load_config(ds: &Datastore) -> anyhow::Result<ConfigSet> {
    load_config_with(ds, None).await
}

/// [`load_config`], plus the BGP password Secrets found under `secrets_dir` (see [`secrets_from_dir`]),
/// read again on every load so that a rotated Secret applies without a restart.
pub async fn load_config_with(
    ds: &Datastore,
    secrets_dir: Option<&std::path::Path>,
) -> anyhow::Result<ConfigSet> {
    let snapshot = crate::feed::list_snapshot(ds).await?;
    Ok(snapshot.config_set(secrets_in(secrets_dir)?)?)
}

/// The password Secrets mounted under `dir` (none without a directory).
fn secrets_in(
    dir: Option<&std::path::Path>,
) -> anyhow::Result<std::collections::BTreeMap<(String, String), crate::config::bgp::Secret>> {
    let Some(dir) = dir else {
        return Ok(Default::default());
    };
    let text = secrets_from_dir(dir)?;
    Ok(ConfigSet::from_yaml(&text)
        .map_err(|e| anyhow::anyhow!("BGP secrets in {}: {e}", dir.display()))?
        .secrets)
}

/// BGP password Secrets mounted as files, as v1 Secret documents for [`ConfigSet`]: `<dir>/<secret>/<key>`
/// holds the value of `secretKeyRef {name: <secret>, key: <key>}` (a Kubernetes Secret volume mounted at
/// `<dir>/<secret>` has exactly this layout; its `..data` bookkeeping entries are skipped). A missing `dir`
/// means no Secrets; an unreadable one is an error naming it. Values are used byte for byte, as Calico does.
pub fn secrets_from_dir(dir: &std::path::Path) -> anyhow::Result<String> {
    let mut text = String::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(text),
        Err(e) => anyhow::bail!("BGP secrets directory {}: {e}", dir.display()),
    };
    let mut secrets =
        std::collections::BTreeMap::<String, serde_json::Map<String, serde_json::Value>>::new();
    for secret in entries {
        let secret = secret.with_context(|| format!("reading {}", dir.display()))?;
        let name = secret.file_name().to_string_lossy().to_string();
        if name.starts_with('.') || !secret.path().is_dir() {
            continue;
        }
        let data = secrets.entry(name.clone()).or_default();
        for key in std::fs::read_dir(secret.path())
            .with_context(|| format!("reading {}", secret.path().display()))?
        {
            let key = key.with_context(|| format!("reading {}", secret.path().display()))?;
            let k = key.file_name().to_string_lossy().to_string();
            if k.starts_with('.') || key.path().is_dir() {
                continue;
            }
            let value = std::fs::read_to_string(key.path()).with_context(|| {
                format!("BGP secret {name:?} key {k:?} ({})", key.path().display())
            })?;
            data.insert(k, serde_json::Value::String(value));
        }
    }
    for (name, data) in secrets {
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "stringData": data,
        });
        text.push_str("---\n");
        text.push_str(&serde_json::to_string(&doc)?);
        text.push('\n');
    }
    Ok(text)
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
    let adverts = task::spawn(
        "advertise",
        advertise_blocks(
            ipam.clone(),
            fib.clone(),
            spk.rib(),
            addr_rx.clone(),
            refresh.clone(),
        ),
    );
    let (applied_tx, applied_rx) = watch::channel(false);
    let peers = if args.networking_backend == "vxlan" {
        // No BGP session at all (Calico's vxlan backend): nothing to wait for before readiness.
        tracing::info!(
            "networking backend vxlan: no BGP peers; routes from block affinities through VXLAN"
        );
        applied_tx.send_replace(true);
        task::spawn(
            "vxlan-routes",
            encap::route_by_affinities_all(
                name.clone(),
                ipam.subscribe_affinities(),
                tunnel_routing,
                affinity_routes_tx,
            ),
        )
    } else {
        drop(affinity_routes_tx);
        task::spawn(
            "peer-loop",
            peer_loop(feed, id.clone(), spk.clone(), applied_tx, addr_rx, addr6_rx),
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
    let backend = Arc::new(NodeBackend {
        ipam: ipam.clone(),
        netns: netns.clone(),
        mtu: pod_mtu,
        refresh: refresh.clone(),
        spool_socket: Some(args.cni_socket.clone()),
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
    let status_id = id.clone();
    let (status_ipam, status_fib, status_ds) = (ipam.clone(), fib.clone(), ds.clone());
    let status_dp = dp_status.clone();
    let status_source = move || {
        let spk = status_spk.clone();
        let id = status_id.clone();
        let (ipam, fib, ds) = (status_ipam.clone(), status_fib.clone(), status_ds.clone());
        let dataplane = Some(status_dp.borrow().clone());
        // Ready once the datastore is synced (IPAM view loaded before this endpoint starts, peers derived
        // and applied) and BGP has converged (End-of-RIB from the Established peers, bounded wait). Not
        // tied to every peer being Established.
        let reason = ready_rx.borrow().reason();
        async move {
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
    ] {
        sup.watch(w);
    }
    for t in cluster_tasks
        .iter()
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
            .chain(mtu_task)
            .chain(monitor)
            .chain(monitor6)
        {
            t.stop().await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), cni.join()).await;
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

/// `a, b, c` (or `none`) for a log line.
pub(crate) fn prefix_list(prefixes: &[IpNetwork]) -> String {
    if prefixes.is_empty() {
        return "none".into();
    }
    prefixes
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Keep the RIB's local routes and the blackhole routes equal to the node's blocks (exact prefix) and
/// borrowed addresses (/32).
async fn advertise_blocks(
    ipam: Arc<NodeIpam>,
    fib: FibHandle,
    rib: mpsc::Sender<RibInput>,
    mut addr: watch::Receiver<Ipv4Addr>,
    refresh: Arc<Notify>,
) {
    let mut attrs = Arc::new(PathAttributes {
        next_hop: Some(*addr.borrow_and_update()),
        ..Default::default()
    });
    let mut blocks: BTreeSet<IpNetwork> = BTreeSet::new();
    let mut hosts: BTreeSet<IpNetwork> = BTreeSet::new();
    loop {
        if addr.has_changed().unwrap_or(false) {
            // The node's address changed: announce everything again with the new next hop.
            attrs = Arc::new(PathAttributes {
                next_hop: Some(*addr.borrow_and_update()),
                ..Default::default()
            });
            blocks.clear();
            hosts.clear();
        }
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
                    tracing::info!(prefixes = %prefix_list(&new), "advertising");
                    let input = RibInput::Originate {
                        prefixes: new,
                        attrs: attrs.clone(),
                    };
                    if !to_rib(&rib, input, "advertise").await {
                        return;
                    }
                }
                if !gone.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&gone), "withdrawing");
                    let input = RibInput::WithdrawLocal {
                        prefixes: gone.clone(),
                    };
                    if !to_rib(&rib, input, "advertise").await {
                        return;
                    }
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
            _ = addr.changed() => {}
            _ = tokio::time::sleep(BLOCK_POLL) => {}
        }
    }
}

/// Hand `input` to the RIB task. False when its inbox is closed: the RIB task has ended, which the supervisor
/// reports before it stops the daemon; the calling task (`task`) logs that it stops too and returns.
async fn to_rib(rib: &mpsc::Sender<RibInput>, input: RibInput, task: &str) -> bool {
    if rib.send(input).await.is_err() {
        tracing::error!(
            task,
            "the RIB task is gone: this task stops too (the supervisor stops the daemon)"
        );
        return false;
    }
    true
}

/// Re-derive the peers and the service prefixes from every snapshot the configuration feed publishes (and
/// when a mounted password Secret changes); apply only what changed. No etcd request is made here.
async fn peer_loop(
    feed: ConfigFeed,
    mut id: Identity,
    spk: Arc<SpeakerHandle>,
    applied: watch::Sender<bool>,
    mut addr: watch::Receiver<Ipv4Addr>,
    mut addr6: watch::Receiver<Option<std::net::Ipv6Addr>>,
) {
    let mut current: Option<Vec<DesiredPeer>> = None;
    let mut services: BTreeSet<IpNetwork> = BTreeSet::new();
    let mut policy: Option<Policy> = None;
    let mut last_error: Option<String> = None;
    let mut cluster_id = id.cluster_id;
    let mut snapshots = feed.subscribe();
    let rib = spk.rib();
    let mut attrs = Arc::new(PathAttributes {
        next_hop: Some(id.ip),
        ..Default::default()
    });
    loop {
        // The address monitor found a new node address (and wrote it to our Node resource): sessions and
        // the service routes follow it.
        if addr.has_changed().unwrap_or(false) {
            id.ip = *addr.borrow_and_update();
            attrs = Arc::new(PathAttributes {
                next_hop: Some(id.ip),
                ..Default::default()
            });
            services.clear();
        }
        // The same for the IPv6 address: the peers' IPv6 next hop (and so the sessions) follow it; the
        // other nodes re-peer with it from our Node resource.
        if addr6.has_changed().unwrap_or(false) {
            id.ip6 = *addr6.borrow_and_update();
        }
        let snapshot = snapshots.borrow_and_update().clone();
        let secrets_text = secrets_from_dir(&id.secrets_dir).unwrap_or_default();
        let derived = async {
            let set = snapshot.config_set(secrets_in(Some(&id.secrets_dir))?)?;
            let peers: Vec<DesiredPeer> = desired_peers(&set, &id.name)?
                .iter()
                .map(|p| {
                    let mut d = crate::peering::speaker_peer(p, id.ip);
                    d.next_hop_v6 = id.ip6;
                    // Between nodes that both have an IPv6 address each family rides on its own transport, as
                    // in Calico's BIRD; otherwise IPv6 routes ride on the IPv4 session (MP-BGP, next hop IP6).
                    let peer_has_v6 = p
                        .peer_node
                        .as_ref()
                        .and_then(|n| set.nodes.get(n))
                        .and_then(Node::ipv6)
                        .is_some();
                    if p.address.is_ipv6() {
                        d.session.families = vec![crate::bgp::wire::Family::IPV6_UNICAST];
                    } else if peer_has_v6 && id.ip6.is_some() {
                        d.session.families = vec![crate::bgp::wire::Family::IPV4_UNICAST];
                    }
                    // RFC 4724 3: after a daemon restart the kernel still forwards on the adopted routes (the
                    // FIB never flushes), so peers may keep ours until End-of-RIB; after a reboot nothing
                    // was preserved and they should not.
                    if let Some(gr) = d.session.graceful_restart.as_mut() {
                        gr.forwarding_preserved = id.forwarding_preserved;
                        gr.restarting = id.restarting;
                    }
                    d
                })
                .collect();
            let pools = snapshot.pools()?;
            anyhow::Ok((set, peers, pools))
        };
        match derived.await {
            Ok((set, peers, pools)) => {
                last_error = None;
                cluster::report_unsupported(
                    &set,
                    &pools,
                    &id.name,
                    id.kernel_has_ipip,
                    id.ip6.is_some(),
                    &id.dp_status,
                );
                // routeReflectorClusterID changed live (a node made a reflector or no longer one): the RIB takes
                // the new id before the apply below restarts the sessions whose client role changed.
                let want_cluster_id = set.nodes.get(&id.name).and_then(Node::cluster_id);
                if want_cluster_id != cluster_id {
                    tracing::info!(from = ?cluster_id, to = ?want_cluster_id, "route-reflector cluster id changed");
                    if !to_rib(&rib, RibInput::SetClusterId(want_cluster_id), "peer-loop").await {
                        return;
                    }
                    cluster_id = want_cluster_id;
                }
                // Service CIDRs (Calico's confd `routes.go`): originated by every node, next hop self.
                let want = service_prefixes(&set, &id.name);
                let new: Vec<IpNetwork> = want.difference(&services).copied().collect();
                let gone: Vec<IpNetwork> = services.difference(&want).copied().collect();
                if !new.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&new), "advertising service CIDRs");
                    let input = RibInput::Originate {
                        prefixes: new,
                        attrs: attrs.clone(),
                    };
                    if !to_rib(&rib, input, "peer-loop").await {
                        return;
                    }
                }
                if !gone.is_empty() {
                    tracing::info!(prefixes = %prefix_list(&gone), "withdrawing service CIDRs");
                    if !to_rib(
                        &rib,
                        RibInput::WithdrawLocal { prefixes: gone },
                        "peer-loop",
                    )
                    .await
                    {
                        return;
                    }
                }
                services = want;
                // Before the first apply, so no session ever sees a wider export than Calico's.
                let want_policy = export_policy(&pools, &services);
                if policy.as_ref() != Some(&want_policy) {
                    let input = RibInput::SetPolicy(Arc::new(want_policy.clone()));
                    if !to_rib(&rib, input, "peer-loop").await {
                        return;
                    }
                    policy = Some(want_policy);
                }
                if current.as_ref() != Some(&peers) {
                    match spk.apply(peers.clone()).await {
                        // The speaker logs what the apply changed.
                        Ok(_) => {
                            applied.send_replace(true);
                            current = Some(peers);
                        }
                        Err(e) => tracing::error!(error = %e, "applying BGP peers"),
                    }
                }
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if last_error.as_ref() != Some(&msg) {
                    tracing::error!(error = %msg, "BGP configuration refused; running peers unchanged");
                    last_error = Some(msg);
                }
            }
        }
        // Wait for a new snapshot, or a rotated Secret file.
        loop {
            tokio::select! {
                changed = snapshots.changed() => {
                    if changed.is_err() {
                        return; // the feed is gone: the daemon is stopping
                    }
                    // Let a burst of writes (a node registering, an operator's apply) land together.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    break;
                }
                changed = addr.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                changed = addr6.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    break;
                }
                _ = tokio::time::sleep(SECRETS_POLL) => {
                    if secrets_from_dir(&id.secrets_dir).unwrap_or_default() != secrets_text {
                        break;
                    }
                }
            }
        }
    }
}

/// The IPv6 twin of [`monitor_address`] for IP6=autodetect: on a change the Node resource's `ipv6Address`
/// is rewritten and the peer loop follows through `tx`.
async fn monitor_address6(
    ds: Arc<Datastore>,
    name: String,
    method: crate::dataplane::autodetect::Method,
    netns: Option<PathBuf>,
    every: Duration,
    tx: watch::Sender<Option<std::net::Ipv6Addr>>,
) {
    let mut current = *tx.borrow();
    loop {
        tokio::time::sleep(every).await;
        let (m, ns) = (method.clone(), netns.clone());
        let detected = tokio::task::spawn_blocking(move || {
            crate::dataplane::autodetect::detect_ipv6(&m, ns.as_deref())
        })
        .await;
        let (ip, prefix_len) = match detected {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, address = ?current, "IPv6 address re-detection failed; keeping the current address");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "IPv6 address re-detection did not finish");
                continue;
            }
        };
        if Some(ip) == current {
            continue;
        }
        match register_node_ipv6(&ds, &name, ip, prefix_len).await {
            Ok(()) => {
                tracing::info!(from = ?current, to = %ip, "node IPv6 address changed: Node resource updated; sessions and routes follow");
                current = Some(ip);
                tx.send_replace(current);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), to = %ip, "node IPv6 address changed but the Node resource could not be updated; retrying")
            }
        }
    }
}

/// Write `spec.bgp.ipv6Address` of this node's Node resource, keeping everything else (compare-and-swap).
/// The Node must exist: a node whose resource was deleted under it registers again when restarted.
async fn register_node_ipv6(
    ds: &Datastore,
    name: &str,
    ipv6: std::net::Ipv6Addr,
    prefix_len: u8,
) -> anyhow::Result<()> {
    resources::patch_node(ds, name, false, |spec| {
        resources::bgp_of(spec).insert("ipv6Address".into(), format!("{ipv6}/{prefix_len}").into());
    })
    .await
    .with_context(|| format!("updating the IPv6 address of Node {name:?}"))?;
    Ok(())
}

/// Detect the node's address again every `every` (Calico re-checks every 60 s). On a change: write it to
/// the Node resource (the other nodes re-derive their peers from it), then tell the peer loop and the
/// block advertiser through `tx`. A failed detection or write keeps the current address and is retried.
async fn monitor_address(
    ds: Arc<Datastore>,
    name: String,
    method: crate::dataplane::autodetect::Method,
    netns: Option<PathBuf>,
    asn: Option<u32>,
    every: Duration,
    tx: watch::Sender<Ipv4Addr>,
) {
    let mut current = *tx.borrow();
    loop {
        tokio::time::sleep(every).await;
        let (m, ns) = (method.clone(), netns.clone());
        let detected = tokio::task::spawn_blocking(move || {
            crate::dataplane::autodetect::detect_ipv4(&m, ns.as_deref())
        })
        .await;
        let (ip, prefix_len) = match detected {
            Ok(Ok(d)) => d,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, address = %current, "address re-detection failed; keeping the current address");
                continue;
            }
            Err(e) => {
                tracing::warn!(error = %e, "address re-detection did not finish");
                continue;
            }
        };
        if ip == current {
            continue;
        }
        match register_node(&ds, &name, ip, prefix_len, asn).await {
            Ok(()) => {
                tracing::info!(from = %current, to = %ip, "node address changed: Node resource updated; sessions and routes follow");
                current = ip;
                tx.send_replace(ip);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), to = %ip, "node address changed but the Node resource could not be updated; retrying")
            }
        }
    }
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
        assert_eq!(a.ips[0].prefix, 32);
        assert_eq!(a.routes.len(), 1);
        assert_eq!(a.routes[0].dst.prefix, 0);
        assert_eq!(a.routes[0].gw, Some(IpAddr::V4(POD_GATEWAY_V4)));
        let r = a.to_result("/var/run/netns/p");
        assert_eq!(r.interfaces[0].sandbox, None);
        assert_eq!(r.interfaces[1].sandbox.as_deref(), Some("/var/run/netns/p"));
    }
}
