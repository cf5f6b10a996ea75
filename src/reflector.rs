//! `margay reflector`: the BGP speaker alone, as a standalone RFC 4456 route reflector. No dataplane, no
//! IPAM: it reflects routes between its clients and reports its peers on the status endpoint.
//!
//! ```text
//!   config source ──▶ loader task ──(identity, peers)──▶ main loop ──apply──▶ speaker task ──▶ peer tasks ◀──▶ TCP
//!     file: SIGHUP        ▲                                 │                      │  ▲
//!     etcd: feed.rs       └──── triggers ───────────────────┘                      │  └── RIB task (reflection)
//!       snapshots (one watch, no polling)                                          │
//!   HTTP /status /readyz /metrics ◀──StatusReport (oneshot query via the main loop)─┘
//! ```
//!
//! The configuration source is pluggable ([`ConfigSource`]): a multi-document YAML file (`--config`), or the
//! etcd datastore (the default without `--config`), followed by the configuration feed `margay node` uses
//! ([`crate::feed`]: one watch, snapshots in memory, no re-listing). With etcd the reflector identifies itself as a Node resource (`--node-name`)
//! and writes its cluster id and address there, so the nodes' BGPPeer selectors find it; every change under
//! the v3 resources re-derives the peers and only sessions whose settings changed are touched. A bad
//! document set is refused as a whole: the running peers stay as they were and the error names the
//! document, the field and the value.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::FutureExt;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, ReadyState, StatusReport};
use crate::bgp::converge::convergence;
use crate::bgp::policy::Policy;
use crate::bgp::rib::RibInput;
use crate::bgp::speaker::{self, DesiredPeer, SpeakerConfig, SpeakerHandle};
use crate::config::bgp::{ConfigSet, NodeBgpSpec};
use crate::config::peers::desired_peers;
use crate::datastore::resources;
use crate::datastore::EtcdArgs;
use crate::datastore::{Datastore, Updated};
use crate::feed::{ConfigFeed, FeedOptions, Snapshot};

/// Route-selection deferral after a restart (RFC 4724 4.1): every configured client Established with its
/// End-of-RIB ends it; after `DEFERRAL_MIN_WAIT` the clients that are not back are no longer waited for
/// (a Node that is gone for good must not hold every other client's updates), and `DEFERRAL_MAX_WAIT`
/// bounds the wait for a client that is back but never sends End-of-RIB. Clients keep the routes they
/// had from us meanwhile (our F bit), so the wait costs only the delay of changes made during it.
const DEFERRAL_MIN_WAIT: Duration = Duration::from_secs(5);
const DEFERRAL_MAX_WAIT: Duration = Duration::from_secs(60);
const DEFERRAL_POLL: Duration = Duration::from_millis(100);

/// `margay reflector` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReflectorArgs {
    /// Multi-document YAML with projectcalico.org/v3 BGPConfiguration, BGPPeer and Node resources.
    /// SIGHUP re-reads it and applies only what changed. Without it the reflector reads the same resources
    /// from etcd (`--etcd-endpoints`) and follows them with a watch.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// This reflector's Node name in the configuration (its spec.bgp gives address, AS, cluster id).
    /// Default: the host name.
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// BGP router id (default: the Node's spec.bgp.ipv4Address).
    #[arg(long)]
    pub router_id: Option<Ipv4Addr>,
    /// Route-reflector cluster id (default: the Node's routeReflectorClusterID, else the router id).
    /// With etcd it is written to the Node resource, so that the nodes see this Node as a reflector.
    #[arg(long)]
    pub cluster_id: Option<Ipv4Addr>,
    /// AS number (default: the Node's asNumber, else BGPConfiguration default asNumber, else 64512).
    #[arg(long)]
    pub as_number: Option<u32>,
    /// Addresses to listen on for BGP (repeatable; default: every IPv4 and IPv6 address).
    #[arg(long)]
    pub listen: Vec<IpAddr>,
    /// BGP port (default: BGPConfiguration listenPort, else 179).
    #[arg(long)]
    pub port: Option<u16>,
    /// Local HTTP endpoint for /status, /healthz, /readyz and /metrics.
    #[arg(long, default_value = api::DEFAULT_LISTEN)]
    pub http_listen: SocketAddr,
    /// Where the reflector keeps its run marker. When the marker of an earlier run is there at start, the
    /// reflector announces itself as restarting (graceful restart R bit, RFC 4724) so peers keep its routes
    /// until its End-of-RIB.
    #[arg(long, default_value = "/var/run/margay")]
    pub state_dir: PathBuf,
    /// Long-lived graceful restart (RFC 9494) on every session of this reflector: the Long-Lived Stale
    /// Time advertised to and accepted from its clients, as a duration ("24h", "3600s"; "0" = off). It
    /// wins over the `margay.io/llgr-stale-time` annotations. Default: the annotations, else a day towards
    /// Calico nodes (docs/reflector.md).
    #[arg(long, value_parser = crate::config::bgp::parse_llgr_stale_time)]
    pub llgr_stale_time: Option<Duration>,
}

/// Where the reflector's resources come from: a multi-document YAML file, or the etcd datastore (the same
/// loader `margay node` uses). `load` returns a complete validated set or an error; never part of one.
pub trait ConfigSource: Send + Sync + 'static {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigSet>>;
    /// For logs: "file /etc/margay/rr.yaml", "etcd http://10.0.0.2:2379".
    fn describe(&self) -> String;
}

/// A multi-document YAML file.
pub struct FileSource(pub PathBuf);

impl ConfigSource for FileSource {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigSet>> {
        let r = std::fs::read_to_string(&self.0)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.0.display()))
            .and_then(|text| {
                ConfigSet::from_yaml(&text)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", self.0.display()))
            });
        futures::future::ready(r).boxed()
    }
    fn describe(&self) -> String {
        format!("file {}", self.0.display())
    }
}

/// The etcd datastore: BGPConfiguration, BGPPeer and Node resources in Calico's v3 layout, as the
/// configuration feed's newest snapshot holds them (loading reads memory, not etcd).
pub struct EtcdSource {
    pub ds: Arc<Datastore>,
    pub feed: Arc<ConfigFeed>,
}

impl ConfigSource for EtcdSource {
    fn load(&self) -> BoxFuture<'_, anyhow::Result<ConfigSet>> {
        let r = self
            .feed
            .current()
            .config_set(Default::default())
            .map_err(|e| anyhow::anyhow!("etcd at {}: {e}", self.ds.endpoints().join(",")));
        futures::future::ready(r).boxed()
    }
    fn describe(&self) -> String {
        format!("etcd {}", self.ds.endpoints().join(","))
    }
}

/// The reflector's identity after flags and resources are combined.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Identity {
    name: String,
    router_id: Ipv4Addr,
    cluster_id: Ipv4Addr,
    asn: u32,
    port: u16,
}

/// Work out who we are and make sure the set holds our Node with that identity, so that the peer derivation
/// (`config::peers`) treats us as the route reflector we are: iBGP peers without our cluster id are clients.
fn identity(args: &ReflectorArgs, set: &mut ConfigSet, source: &str) -> anyhow::Result<Identity> {
    let name = args
        .node_name
        .clone()
        .or_else(|| nix::unistd::gethostname().ok()?.into_string().ok())
        .unwrap_or_else(|| "margay-reflector".to_string());
    let node = set
        .nodes
        .entry(name.clone())
        .or_insert_with(|| resources::new_node(&name));
    let router_id = match args.router_id.or_else(|| match node.ipv4() {
        Some(IpAddr::V4(a)) => Some(a),
        _ => None,
    }) {
        Some(r) => r,
        None => anyhow::bail!(
            "no BGP router id for reflector {name:?}: pass --router-id, or give Node {name:?} spec.bgp.ipv4Address in {source}"
        ),
    };
    // A standalone reflector always reflects: without a configured cluster id it uses its router id
    // (RFC 4456 7).
    let cluster_id = args.cluster_id.or(node.cluster_id()).unwrap_or(router_id);
    let global_as = set.default_bgp().as_number();
    let node = set.nodes.get_mut(&name).expect("inserted above");
    let asn = args.as_number.or(node.as_number()).unwrap_or(global_as);
    let bgp = node.spec.bgp.get_or_insert_with(NodeBgpSpec::default);
    // The router id stands in for the node address only when the Node has none (CALICO_ROUTER_ID keeps
    // the two apart too): sessions source from the node address.
    if bgp.ipv4_address.is_none() {
        bgp.ipv4_address = Some(router_id.to_string());
    }
    bgp.route_reflector_cluster_id = Some(cluster_id.to_string());
    if args.as_number.is_some() {
        bgp.as_number = Some(crate::config::bgp::AsNumber(asn));
    }
    let port = args.port.unwrap_or_else(|| set.listen_port(&name));
    Ok(Identity {
        name,
        router_id,
        cluster_id,
        asn,
        port,
    })
}

/// Load, settle the identity, derive the peers: all or nothing.
async fn load_peers(
    args: &ReflectorArgs,
    source: &dyn ConfigSource,
    restarting: bool,
) -> anyhow::Result<(Identity, Vec<DesiredPeer>, Vec<crate::bfd::BfdPeer>)> {
    let mut set = source.load().await?;
    let id = identity(args, &mut set, &source.describe())?;
    let wanted = desired_peers(&set, &id.name)?;
    // BFD from the same BGPPeer annotations the nodes read (a reverse peering gives both ends BFD).
    let bfd = crate::peering::bfd_peers(&wanted);
    let peers = wanted
        .iter()
        .map(|p| {
            let mut d = crate::peering::speaker_peer(p, id.router_id);
            if let Some(gr) = d.session.graceful_restart.as_mut() {
                // The F bit (RFC 4724 3): the forwarding of every route we reflect survives our restart,
                // because those routes point at their originating nodes, not at us. With it clear, a client
                // must delete our routes the moment the new session comes up (4.2) and re-learn them from
                // our table a moment later: a gap in the client's kernel on every reflector restart.
                gr.restarting = restarting;
                gr.forwarding_preserved = true;
                // But for LLGR the F bit is what lets a client keep its long-lived stale routes until our
                // End-of-RIB after we return (RFC 9494 4.2) instead of sweeping them at once: the routes we
                // reflect point at their originating nodes, so no forwarding anywhere depends on us.
                gr.long_lived_forwarding_preserved = true;
                if let Some(t) = args.llgr_stale_time {
                    gr.long_lived_stale_time = t.as_secs() as u32;
                }
            }
            d
        })
        .collect();
    Ok((id, peers, bfd))
}

/// Make the reflector's Node resource in etcd say what it runs with: its address (the router id when the
/// Node has none), its cluster id and, when given as a flag, its AS. Labels and everything else an
/// operator wrote are kept. The nodes derive their peers from this resource (as in Calico: a route
/// reflector is a Node with `routeReflectorClusterID`, usually selected by a label).
pub async fn register_reflector_node(
    ds: &Datastore,
    name: &str,
    router_id: Ipv4Addr,
    cluster_id: Ipv4Addr,
    asn: Option<u32>,
) -> anyhow::Result<()> {
    let updated = resources::patch_node(ds, name, true, |spec| {
        let bgp = resources::bgp_of(spec);
        bgp.entry("ipv4Address")
            .or_insert_with(|| format!("{router_id}/32").into());
        bgp.insert(
            "routeReflectorClusterID".into(),
            cluster_id.to_string().into(),
        );
        if let Some(a) = asn {
            bgp.insert("asNumber".into(), a.into());
        }
    })
    .await?;
    if updated != Updated::Unchanged {
        tracing::info!(node = name, %cluster_id, "reflector's Node resource registered");
    }
    Ok(())
}

/// Turn every new snapshot of the feed into a nudge of the loader (coalesced: a full channel drops it, the
/// pending nudge loads the newest snapshot anyway).
async fn follow_feed(
    mut snapshots: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    nudge: mpsc::Sender<&'static str>,
) {
    while snapshots.changed().await.is_ok() {
        if nudge.is_closed() {
            return;
        }
        // Full: a load is already queued and will read the newest snapshot.
        let _ = nudge.try_send(WATCH_TRIGGER);
    }
}

/// The trigger name of a watch event (the loader lets a burst of writes land before it reads).
const WATCH_TRIGGER: &str = "etcd watch";

/// What the loader hands back: its trigger and the loaded identity and peers, or why it could not.
type Loaded = (
    &'static str,
    anyhow::Result<(Identity, Vec<DesiredPeer>, Vec<crate::bfd::BfdPeer>)>,
);

/// Load on every trigger, one at a time, and send the result to the main loop.
async fn loader(
    args: ReflectorArgs,
    source: Arc<dyn ConfigSource>,
    restarting: bool,
    mut trigger: mpsc::Receiver<&'static str>,
    out: mpsc::Sender<Loaded>,
) {
    while let Some(why) = trigger.recv().await {
        if why == WATCH_TRIGGER {
            // Let a burst of writes (a node registering, an operator's apply) land together.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let loaded = load_peers(&args, source.as_ref(), restarting).await;
        if out.send((why, loaded)).await.is_err() {
            return;
        }
    }
}

enum Control {
    Status(oneshot::Sender<StatusReport>),
}

/// The reflector's own Prometheus metrics. Sessions by state, prefixes per peer and etcd requests are
/// derived from the status report at scrape time (`api::metrics`); this adds what only the loader knows.
#[derive(Clone, Default)]
struct Metrics {
    config_errors: Counter,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let m = Metrics::default();
        registry.register(
            "margay_config_errors",
            "Failed reads or refused configurations from the datastore or file (running peers kept)",
            m.config_errors.clone(),
        );
        m
    }
}

/// Run the reflector until SIGTERM/SIGINT.
pub fn run(args: ReflectorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

/// Sockets a reflector serves on, bound by its caller; `None` binds from the flags and the configuration
/// (the BGP port from the reflector's Node, `--http-listen`).
#[derive(Default)]
pub struct Listeners {
    pub bgp: Option<crate::bgp::session::Listener>,
    pub http: Option<tokio::net::TcpListener>,
}

async fn run_async(args: ReflectorArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let stop = async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    };
    run_with(args, Listeners::default(), stop).await
}

/// The reflector until `shutdown` completes (as mini-redis's `server::run`): `margay reflector` passes
/// SIGTERM/SIGINT, a test a oneshot and listeners on port 0, so a reflector runs in the test's process.
/// Shutdown is the same either way: sessions closed without NOTIFICATION (graceful restart, RFC 4724 4.1).
pub async fn run_with(
    args: ReflectorArgs,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut shutdown = std::pin::pin!(shutdown);

    let mut feed: Option<Arc<ConfigFeed>> = None;
    let (source, ds): (Arc<dyn ConfigSource>, Option<Arc<Datastore>>) = match &args.config {
        Some(path) => (Arc::new(FileSource(path.clone())), None),
        None => {
            let at = || args.etcd.etcd_endpoints.join(",");
            let ds = args
                .etcd
                .datastore()
                .map_err(|e| anyhow::anyhow!("etcd at {}: {e}", at()))?;
            let f = Arc::new(
                ConfigFeed::start(ds.clone(), FeedOptions::default())
                    .await
                    .map_err(|e| anyhow::anyhow!("etcd at {}: {e}", at()))?,
            );
            feed = Some(f.clone());
            (
                Arc::new(EtcdSource {
                    ds: ds.clone(),
                    feed: f,
                }),
                Some(ds),
            )
        }
    };
    let marker = args.state_dir.join("reflector.running");
    let restarting = marker.exists();
    let (id, peers, bfd_peers) = load_peers(&args, source.as_ref(), restarting).await?;
    if let Some(ds) = &ds {
        register_reflector_node(ds, &id.name, id.router_id, id.cluster_id, args.as_number)
            .await
            .map_err(|e| anyhow::anyhow!("etcd at {}: {e:#}", ds.endpoints().join(",")))?;
    }
    if let Err(e) = std::fs::create_dir_all(&args.state_dir)
        .and_then(|()| std::fs::write(&marker, std::process::id().to_string()))
    {
        tracing::warn!(path = %marker.display(), error = %e, "cannot write the run marker: a restart will not be announced as graceful");
    }
    let listen: Vec<SocketAddr> = if args.listen.is_empty() {
        vec![
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, id.port)),
            SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, id.port)),
        ]
    } else {
        args.listen
            .iter()
            .map(|a| SocketAddr::new(*a, id.port))
            .collect()
    };
    let speaker_cfg = SpeakerConfig {
        local_asn: id.asn,
        router_id: id.router_id,
        cluster_id: Some(id.cluster_id),
        listen,
        rib_capacity: 1024,
    };
    let spk = match listeners.bgp {
        Some(l) => speaker::spawn_on(speaker_cfg, Some(l), Arc::new(Policy::default()), None),
        None => speaker::spawn(speaker_cfg, Arc::new(Policy::default()), None).await?,
    };
    let started = Instant::now();
    // One BFD task for the reflector's BFD sessions; a Down resets that client's BGP session.
    let (bfd_events_tx, bfd_events_rx) = mpsc::channel(256);
    let bfd = crate::bfd::spawn(crate::bfd::BfdPorts::default(), bfd_events_tx);
    let bfd_link = crate::task::spawn(
        "bfd-link",
        crate::peering::bfd_to_speaker(bfd_events_rx, spk.bfd_link()),
    );
    bfd.apply(bfd_peers.clone()).await?;
    let mut current_bfd = bfd_peers;
    // After a restart, route selection towards the clients is deferred (RFC 4724 4.1) until every client
    // is back and has sent End-of-RIB (bounded, see `DEFERRAL_*`): a client that got our End-of-RIB on a
    // table still missing the routes of clients not yet back would sweep those routes from its kernel.
    let mut deferring = restarting;
    if restarting {
        spk.rib()
            .send(RibInput::DeferSelection {
                until: Instant::now() + DEFERRAL_MAX_WAIT,
            })
            .await
            .map_err(|_| anyhow::anyhow!("the RIB task has stopped"))?;
    }
    let mut deferral_poll = tokio::time::interval(DEFERRAL_POLL);
    let report = spk.apply(peers.clone()).await?;
    tracing::info!(
        source = %source.describe(), router_id = %id.router_id, cluster_id = %id.cluster_id, asn = id.asn,
        peers = report.added.len(), "route reflector running"
    );

    let mut registry = Registry::default();
    let metrics = Metrics::register(&mut registry);
    if let Some(f) = &feed {
        f.counters().register(&mut registry);
    }
    let (ctl_tx, mut ctl_rx) = mpsc::channel::<Control>(16);
    let status_source = move || {
        let ctl = ctl_tx.clone();
        async move {
            let (tx, rx) = oneshot::channel();
            if ctl.send(Control::Status(tx)).await.is_err() {
                return StatusReport::default();
            }
            rx.await.unwrap_or_default()
        }
        .boxed()
    };
    // Every long-lived task is supervised: one ending makes /healthz fail and the reflector exit non-zero.
    let mut sup = crate::task::Supervisor::new();
    for w in spk.tasks() {
        sup.watch(w);
    }
    sup.watch(bfd.watch());
    sup.watch(bfd_link.watch());
    let rib_tx = spk.rib();
    sup.probe("rib", move || {
        let rib_tx = rib_tx.clone();
        async move { crate::bgp::rib::heartbeat(&rib_tx).await }
    });
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
    let http = crate::task::spawn("http", async move {
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

    // Loading runs in its own task so that a slow or unreachable etcd never stalls the status endpoint or
    // signal handling. Triggers: the feed's snapshots, or SIGHUP for a file.
    let (trigger_tx, trigger_rx) = mpsc::channel::<&'static str>(1);
    let (loaded_tx, mut loaded_rx) = mpsc::channel::<Loaded>(1);
    let loader_task = crate::task::spawn(
        "loader",
        loader(
            args.clone(),
            source.clone(),
            restarting,
            trigger_rx,
            loaded_tx,
        ),
    );
    sup.watch(loader_task.watch());
    let watcher = feed.as_ref().map(|f| {
        crate::task::spawn(
            "feed-follow",
            follow_feed(f.subscribe(), trigger_tx.clone()),
        )
    });
    if let Some(w) = &watcher {
        sup.watch(w.watch());
    }
    let mut supervised = Box::pin(sup.run());
    let mut outcome = Ok(());

    let mut hup = signal(SignalKind::hangup())?;
    let mut current: Vec<DesiredPeer> = peers;
    let mut last_error: Option<String> = None;
    loop {
        tokio::select! {
            // A full trigger queue already holds a load that will read the newest state.
            _ = hup.recv() => { let _ = trigger_tx.try_send("SIGHUP"); }
            Some((why, loaded)) = loaded_rx.recv() => match loaded {
                Ok((id2, peers, bfd_peers)) => {
                    last_error = None;
                    if id2 != id {
                        tracing::warn!(running = ?id, configured = ?id2, "a new router id, cluster id, AS or port needs a restart; peers are applied with the running identity");
                    }
                    if bfd_peers != current_bfd {
                        bfd.apply(bfd_peers.clone()).await?;
                        current_bfd = bfd_peers;
                    }
                    if peers != current {
                        let report = spk.apply(peers.clone()).await?;
                        current = peers;
                        tracing::info!(?report, trigger = why, "configuration re-read");
                    }
                }
                Err(e) => {
                    metrics.config_errors.inc();
                    let msg = format!("{e:#}");
                    if last_error.as_ref() != Some(&msg) {
                        tracing::error!(error = %msg, trigger = why, "configuration refused, running peers unchanged");
                    }
                    last_error = Some(msg);
                }
            },
            _ = deferral_poll.tick(), if deferring => {
                let peers = spk.sync_state().await.unwrap_or_default();
                if let Some(why) = convergence(&peers, started.elapsed(), DEFERRAL_MIN_WAIT, DEFERRAL_MAX_WAIT) {
                    tracing::debug!(%why, "route selection still deferred");
                } else {
                    deferring = false;
                    // The RIB ends the deferral itself at DEFERRAL_MAX_WAIT should this never arrive.
                    let _ = spk.rib().send(RibInput::EndDeferral).await;
                }
            }
            () = &mut shutdown => break,
            ended = &mut supervised => {
                tracing::error!(task = ended.name, why = %ended.why,
                    "a task of the reflector ended unexpectedly: /healthz fails and the reflector exits so that it is restarted");
                tokio::time::sleep(crate::task::FAILED_HEALTH_GRACE).await;
                outcome = Err(anyhow::anyhow!("{ended}"));
                break;
            }
            Some(Control::Status(reply)) = ctl_rx.recv() => {
                // A feed that lost etcd keeps its last snapshot: the peers may be stale, as with a failed read.
                let lost = feed.as_ref().and_then(|f| f.down());
                let why = last_error.as_deref().or(lost.as_deref());
                // The HTTP handler that asked may have timed out: nobody to answer.
                let mut report = status_report(&spk, &id, started, why, ds.as_deref()).await;
                report.bfd = bfd.status().await.unwrap_or_default();
                let _ = reply.send(report);
            }
        }
    }
    drop(supervised);
    loader_task.stop().await;
    http.stop().await;
    if let Some(w) = watcher {
        w.stop().await;
    }
    // SIGTERM is how a DaemonSet or systemd restarts us: close every session without a NOTIFICATION so
    // peers that negotiated graceful restart keep our routes while we are away (RFC 4724 4.1). The run
    // marker stays, so the next start announces the restart. BFD says AdminDown first, which peers' BGP
    // must not act on (RFC 5882 3.2).
    bfd.shutdown().await;
    bfd_link.stop().await;
    spk.shutdown(true).await;
    tracing::info!("route reflector stopped; peers keep its routes for the graceful restart time");
    outcome
}

async fn status_report(
    spk: &SpeakerHandle,
    id: &Identity,
    started: Instant,
    last_error: Option<&str>,
    ds: Option<&Datastore>,
) -> StatusReport {
    let peers = spk.status().await.unwrap_or_default();
    StatusReport {
        role: "reflector".into(),
        node_name: id.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        asn: id.asn,
        router_id: id.router_id.to_string(),
        uptime_seconds: started.elapsed().as_secs(),
        bfd: Vec::new(),
        // Not ready while the configuration cannot be read: the peers may be stale.
        ready: ReadyState {
            ready: last_error.is_none(),
            reason: last_error.map(|e| format!("configuration not readable: {e}")),
        },
        peers,
        datastore: ds.map(api::DatastoreSummary::of),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: ReflectorArgs,
    }

    fn args(flags: &[&str]) -> ReflectorArgs {
        Cli::try_parse_from(std::iter::once("margay-reflector").chain(flags.iter().copied()))
            .expect("flags parse")
            .args
    }

    #[test]
    fn identity_from_flags_when_the_datastore_has_no_node_yet() {
        let a = args(&[
            "--node-name",
            "rr1",
            "--router-id",
            "10.0.0.3",
            "--cluster-id",
            "244.0.0.1",
        ]);
        assert!(a.config.is_none(), "without --config the source is etcd");
        let mut set = ConfigSet::default();
        let id = identity(&a, &mut set, "etcd test").expect("identity");
        assert_eq!(id.name, "rr1");
        assert_eq!(id.router_id, Ipv4Addr::new(10, 0, 0, 3));
        assert_eq!(id.cluster_id, Ipv4Addr::new(244, 0, 0, 1));
        assert_eq!(id.asn, 64512);
        assert_eq!(id.port, 179);
        // The set now holds our Node as a reflector, so peer derivation makes iBGP peers our clients.
        let node = &set.nodes["rr1"];
        assert_eq!(node.cluster_id(), Some(Ipv4Addr::new(244, 0, 0, 1)));
        assert_eq!(node.ipv4(), Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3))));
    }

    #[test]
    fn identity_without_a_router_id_says_how_to_give_one() {
        let a = args(&["--node-name", "rr1"]);
        let mut set = ConfigSet::default();
        let e = identity(&a, &mut set, "etcd http://10.0.0.2:2379")
            .expect_err("no router id")
            .to_string();
        assert!(
            e.contains("--router-id") && e.contains("etcd http://10.0.0.2:2379"),
            "{e}"
        );
    }

    #[test]
    fn cluster_id_defaults_to_the_router_id() {
        let a = args(&["--node-name", "rr1", "--router-id", "10.0.0.3"]);
        let id = identity(&a, &mut ConfigSet::default(), "test").expect("identity");
        assert_eq!(id.cluster_id, id.router_id);
    }

    #[test]
    fn metrics_add_config_errors_to_the_report_metrics() {
        let mut registry = Registry::default();
        let m = Metrics::register(&mut registry);
        m.config_errors.inc();
        let report = StatusReport {
            role: "reflector".into(),
            peers: vec![api::PeerStatus {
                address: "10.0.0.11".into(),
                fsm_state: "Established".into(),
                prefixes_received: 3,
                ..Default::default()
            }],
            ..Default::default()
        };
        let out = api::metrics::encode(&registry, &report).expect("encode");
        assert!(out.contains("margay_config_errors_total 1"), "{out}");
        assert!(
            out.contains("margay_bgp_sessions{state=\"Established\"} 1"),
            "{out}"
        );
        assert_eq!(out.matches("# EOF").count(), 1, "{out}");
    }
}
