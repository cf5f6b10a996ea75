//! `margay reflector`: the BGP speaker alone, as a standalone RFC 4456 route reflector. No dataplane, no
//! IPAM: it reflects routes between its clients and reports its peers on the status endpoint.
//!
//! ```text
//!   config source (YAML file; SIGHUP re-reads) ──desired peers──▶ speaker task ──▶ peer tasks ◀──▶ TCP
//!                                                                     │  ▲
//!   HTTP /status /readyz /metrics ◀──StatusReport (oneshot query)─────┘  └── RIB task (reflection)
//! ```
//!
//! The configuration source is pluggable ([`ConfigSource`]): a multi-document YAML file today, the etcd
//! datastore once the node daemon composes it. A bad document set is refused as a whole: the running peers
//! stay as they were and the error names the document, the field and the value.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use futures::FutureExt;
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, oneshot};

use crate::api::{self, ReadyState, StatusReport};
use crate::bgp::policy::Policy;
use crate::bgp::speaker::{self, DesiredPeer, SpeakerConfig, SpeakerHandle};
use crate::config::bgp::{ConfigSet, Node, NodeBgpSpec, NodeSpec, KIND_NODE};
use crate::config::peers::desired_peers;
use crate::config::{ObjectMeta, API_VERSION};

/// `margay reflector` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct ReflectorArgs {
    /// Multi-document YAML with projectcalico.org/v3 BGPConfiguration, BGPPeer and Node resources.
    /// SIGHUP re-reads it and applies only what changed.
    #[arg(long)]
    pub config: PathBuf,
    /// This reflector's Node name in the configuration (its spec.bgp gives address, AS, cluster id).
    /// Default: the host name.
    #[arg(long, env = "NODENAME")]
    pub node_name: Option<String>,
    /// BGP router id (default: the Node's spec.bgp.ipv4Address).
    #[arg(long)]
    pub router_id: Option<Ipv4Addr>,
    /// Route-reflector cluster id (default: the Node's routeReflectorClusterID, else the router id).
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
}

/// Where the reflector's resources come from: a multi-document YAML file today, the etcd datastore once the
/// node daemon composes it. `load` returns a complete validated set or an error; never part of one.
pub trait ConfigSource: Send + Sync + 'static {
    fn load(&self) -> anyhow::Result<ConfigSet>;
    /// For logs: "file /etc/margay/rr.yaml".
    fn describe(&self) -> String;
}

/// A multi-document YAML file.
pub struct FileSource(pub PathBuf);

impl ConfigSource for FileSource {
    fn load(&self) -> anyhow::Result<ConfigSet> {
        let text = std::fs::read_to_string(&self.0)
            .map_err(|e| anyhow::anyhow!("reading {}: {e}", self.0.display()))?;
        ConfigSet::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", self.0.display()))
    }
    fn describe(&self) -> String {
        format!("file {}", self.0.display())
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
    let node = set.nodes.entry(name.clone()).or_insert_with(|| Node {
        api_version: API_VERSION.into(),
        kind: KIND_NODE.into(),
        metadata: ObjectMeta {
            name: name.clone(),
            ..Default::default()
        },
        spec: NodeSpec::default(),
        status: None,
    });
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
fn load_peers(
    args: &ReflectorArgs,
    source: &dyn ConfigSource,
    restarting: bool,
) -> anyhow::Result<(Identity, Vec<DesiredPeer>)> {
    let mut set = source.load()?;
    let id = identity(args, &mut set, &source.describe())?;
    let peers = desired_peers(&set, &id.name)?
        .iter()
        .map(|p| {
            let mut d = DesiredPeer::from_config(p, id.router_id);
            if let Some(gr) = d.session.graceful_restart.as_mut() {
                // A reflector forwards nothing: it never claims preserved forwarding state.
                gr.restarting = restarting;
                gr.forwarding_preserved = false;
            }
            d
        })
        .collect();
    Ok((id, peers))
}

enum Control {
    Status(oneshot::Sender<StatusReport>),
}

/// Run the reflector until SIGTERM/SIGINT.
pub fn run(args: ReflectorArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: ReflectorArgs) -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};

    let source = FileSource(args.config.clone());
    let marker = args.state_dir.join("reflector.running");
    let restarting = marker.exists();
    let (id, peers) = load_peers(&args, &source, restarting)?;
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
    let spk = speaker::spawn(
        SpeakerConfig {
            local_asn: id.asn,
            router_id: id.router_id,
            cluster_id: Some(id.cluster_id),
            listen,
            rib_capacity: 1024,
        },
        Arc::new(Policy::default()),
        None,
    )
    .await?;
    let started = Instant::now();
    let report = spk.apply(peers.clone()).await?;
    tracing::info!(
        source = %source.describe(), router_id = %id.router_id, cluster_id = %id.cluster_id, asn = id.asn,
        peers = report.added.len(), "route reflector running"
    );

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
    let http = tokio::spawn(api::serve(
        args.http_listen,
        status_source,
        Arc::new(Registry::default()),
    ));

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut current: Vec<DesiredPeer> = peers;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match load_peers(&args, &source, restarting) {
                    Ok((id2, peers)) => {
                        if id2 != id {
                            tracing::warn!(running = ?id, file = ?id2, "a new router id, cluster id, AS or port needs a restart; peers are applied with the running identity");
                        }
                        let report = spk.apply(peers.clone()).await?;
                        current = peers;
                        tracing::info!(?report, "configuration re-read on SIGHUP");
                    }
                    Err(e) => tracing::error!(error = %e, "SIGHUP: configuration refused, running peers unchanged"),
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            Some(Control::Status(reply)) = ctl_rx.recv() => {
                let _ = reply.send(status_report(&spk, &id, started, current.len()).await);
            }
        }
        if http.is_finished() {
            break;
        }
    }
    http.abort();
    // SIGTERM is how a DaemonSet or systemd restarts us: close every session without a NOTIFICATION so
    // peers that negotiated graceful restart keep our routes while we are away (RFC 4724 4.1). The run
    // marker stays, so the next start announces the restart.
    spk.shutdown(true).await;
    tracing::info!("route reflector stopped; peers keep its routes for the graceful restart time");
    Ok(())
}

async fn status_report(
    spk: &SpeakerHandle,
    id: &Identity,
    started: Instant,
    _configured: usize,
) -> StatusReport {
    let peers = spk.status().await.unwrap_or_default();
    StatusReport {
        role: "reflector".into(),
        node_name: id.name.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        asn: id.asn,
        router_id: id.router_id.to_string(),
        uptime_seconds: started.elapsed().as_secs(),
        ready: ReadyState {
            ready: true,
            reason: None,
        },
        peers,
        ..Default::default()
    }
}
