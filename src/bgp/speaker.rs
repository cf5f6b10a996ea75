//! The speaker: turns a desired peer set into running sessions and wires them to the RIB.
//!
//! ```text
//!   owner (reflector / node) ──SpeakerCommand::{Apply, Status}──▶ ┌── speaker task ──────────────────┐
//!                                                                 │ peers: addr -> (PeerId, handle)  │
//!   peer tasks ──SessionEvent (one shared mpsc)─────────────────▶ │ SessionEvent -> RibInput         │──▶ RIB task
//!        ▲                                                        └──────────────────────────────────┘
//!        │ PeerCommand::SendUpdates (pre-encoded, ≤1 MiB per batch)
//!   writer task per Established session ◀──RibOutput (bounded; then a dirty set in the RIB)── RIB task
//! ```
//!
//! It owns the set of peer tasks and the mapping between session addresses and RIB peer ids; it never
//! holds routes (the RIB does) and never touches sockets (the peer tasks do). `apply` changes only what
//! differs: an unchanged peer is not touched, a changed transport/session setting goes to the peer as
//! `Reconfigure` (the session decides whether it must reset), a changed RIB role (route-reflector client,
//! next-hop mode, max-prefix) restarts that one peer, removed peers are stopped.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::{mpsc, oneshot};

use crate::bgp::rib::{
    self, FibEvent, NextHopMode, PeerId, Policy, Query, RibConfig, RibHandle, RibInput,
};
use crate::bgp::session::{
    spawn_peer_with_rib, Listener, ListenerError, ListenerHandle, PeerCommand, PeerConfig,
    PeerHandle, RibLink, RibRole, SessionEvent, SessionId, State,
};
use crate::bgp::wire::Family;

/// One peer the configuration asks for: the session settings plus what the RIB needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredPeer {
    /// Calico's words for where the peer comes from: "node-to-node mesh", "global", "node specific".
    pub peer_type: String,
    pub session: PeerConfig,
    /// The peer is our route-reflector client (RFC 4456).
    pub rr_client: bool,
    pub next_hop_mode: NextHopMode,
    pub max_prefixes: Option<u32>,
    /// BGPPeer `numAllowedLocalASNumbers`.
    pub allow_local_as: u32,
    /// Our IPv6 next hop for IPv6 routes on this session when its transport is IPv4 (MP-BGP, RFC 4760 3:
    /// the next hop of a family need not be of the transport's family). None: the session's own IPv6 source.
    pub next_hop_v6: Option<Ipv6Addr>,
}

/// One BGP peer as the operator sees it (`margay status`, `/metrics`): what the speaker reports.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PeerReport {
    pub address: String,
    pub port: u16,
    /// "node-to-node mesh", "global", "node specific" (Calico's words), or "route reflector client".
    pub peer_type: String,
    pub asn: u32,
    /// RFC 4271 state in Calico's words: "up" when Established, otherwise "start"/"connect"/"active"/...
    pub state: String,
    /// The FSM state name (Idle, Connect, Active, OpenSent, OpenConfirm, Established).
    pub fsm_state: String,
    /// When the session entered its current state, RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// "Established", or the last failure in plain words ("connect: connection refused").
    pub info: String,
    pub prefixes_received: u64,
    pub prefixes_accepted: u64,
    pub prefixes_advertised: u64,
    /// Of the accepted prefixes, those kept stale through a graceful restart of the peer.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefixes_stale: u64,
    /// Of the stale prefixes, those in the long-lived phase, marked LLGR_STALE (RFC 9494).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub prefixes_llgr_stale: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The speaker's identity and listening sockets.
#[derive(Debug, Clone)]
pub struct SpeakerConfig {
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    /// Our route-reflector cluster id, when we reflect (Node `routeReflectorClusterID`).
    pub cluster_id: Option<Ipv4Addr>,
    /// Addresses to accept BGP connections on (port included). Empty: no listener (active only).
    pub listen: Vec<SocketAddr>,
    /// Bound of the RIB's input queue (backpressure onto the sessions).
    pub rib_capacity: usize,
}

/// What `apply` changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyReport {
    pub added: Vec<IpAddr>,
    pub removed: Vec<IpAddr>,
    /// Session settings changed: sent to the peer task as Reconfigure.
    pub reconfigured: Vec<IpAddr>,
    /// RIB role changed: the peer was restarted.
    pub restarted: Vec<IpAddr>,
    pub unchanged: Vec<IpAddr>,
}

/// Errors starting the speaker.
#[derive(Debug, thiserror::Error)]
pub enum SpeakerError {
    #[error("BGP listener: {0}")]
    Listen(#[from] ListenerError),
    #[error("the BGP speaker task has stopped")]
    Gone,
}

enum SpeakerCommand {
    Apply(Vec<DesiredPeer>, oneshot::Sender<ApplyReport>),
    Status(oneshot::Sender<Vec<PeerReport>>),
    Sync(oneshot::Sender<Vec<PeerSync>>),
    BfdDown(IpAddr, String),
    Shutdown {
        for_restart: bool,
        reply: oneshot::Sender<()>,
    },
}

/// How far one configured peer is in sending us its table (for convergence after a restart and /readyz).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerSync {
    pub address: IpAddr,
    pub established: bool,
    /// The peer sent End-of-RIB (RFC 4724 section 2) for every family negotiated on its current session.
    pub end_of_rib: bool,
}

/// Resets a peer's session when BFD says its path failed; cloned from [`SpeakerHandle::bfd_link`].
#[derive(Clone)]
pub struct BfdLink(mpsc::Sender<SpeakerCommand>);

impl BfdLink {
    /// BFD saw the path to `peer` fail: reset its session now (routes withdrawn from the RIB and the FIB,
    /// then a fresh reconnect). An address the speaker has no peer for is ignored.
    pub async fn bfd_down(&self, peer: IpAddr, reason: String) -> Result<(), SpeakerError> {
        self.0
            .send(SpeakerCommand::BfdDown(peer, reason))
            .await
            .map_err(|_| SpeakerError::Gone)
    }
}

/// The owner's handle. Dropping it stops the speaker, its peers and the RIB.
pub struct SpeakerHandle {
    tx: mpsc::Sender<SpeakerCommand>,
    rib: mpsc::Sender<RibInput>,
    local_addrs: Vec<SocketAddr>,
    /// Aborted when the handle is dropped.
    task: crate::task::Task<()>,
    rib_task: crate::task::TaskWatch,
}

impl SpeakerHandle {
    /// Observers of the speaker task and the RIB task, for the daemon's supervisor.
    pub fn tasks(&self) -> Vec<crate::task::TaskWatch> {
        vec![self.task.watch(), self.rib_task.clone()]
    }

    /// Make the running peer set equal to `desired` (keyed by peer address).
    pub async fn apply(&self, desired: Vec<DesiredPeer>) -> Result<ApplyReport, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(SpeakerCommand::Apply(desired, tx))
            .await
            .map_err(|_| SpeakerError::Gone)?;
        rx.await.map_err(|_| SpeakerError::Gone)
    }

    /// Every peer as `margay status` shows it.
    pub async fn status(&self) -> Result<Vec<PeerReport>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(SpeakerCommand::Status(tx))
            .await
            .map_err(|_| SpeakerError::Gone)?;
        rx.await.map_err(|_| SpeakerError::Gone)
    }

    /// Per configured peer: Established, and whether its initial table is complete (End-of-RIB received).
    /// The RIB has been handed every UPDATE that preceded those End-of-RIB markers.
    pub async fn sync_state(&self) -> Result<Vec<PeerSync>, SpeakerError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(SpeakerCommand::Sync(tx))
            .await
            .map_err(|_| SpeakerError::Gone)?;
        rx.await.map_err(|_| SpeakerError::Gone)
    }

    /// A cheap handle that resets sessions on BFD's word (for the task that listens to BFD).
    pub fn bfd_link(&self) -> BfdLink {
        BfdLink(self.tx.clone())
    }

    /// Stop every session and the speaker. `for_restart`: close without a NOTIFICATION so peers that
    /// negotiated graceful restart keep our routes until we are back (RFC 4724 4.1); otherwise Cease.
    pub async fn shutdown(self, for_restart: bool) {
        let (reply, done) = oneshot::channel();
        if self
            .tx
            .send(SpeakerCommand::Shutdown { for_restart, reply })
            .await
            .is_ok()
        {
            let _ = done.await;
        }
    }

    /// The RIB's input, for locally originated routes and queries.
    pub fn rib(&self) -> mpsc::Sender<RibInput> {
        self.rib.clone()
    }

    /// The addresses the listener is bound to (port 0 resolved).
    pub fn local_addrs(&self) -> &[SocketAddr] {
        &self.local_addrs
    }
}

/// Start the listener, the RIB and the speaker task. `fib` receives ECMP changes for the kernel (None on a
/// reflector).
pub async fn spawn(
    cfg: SpeakerConfig,
    policy: Arc<Policy>,
    fib: Option<mpsc::Sender<Vec<FibEvent>>>,
) -> Result<SpeakerHandle, SpeakerError> {
    let listener = if cfg.listen.is_empty() {
        None
    } else {
        Some(Listener::bind(&cfg.listen).await?)
    };
    Ok(spawn_on(cfg, listener, policy, fib))
}

/// [`spawn`] on a listener the caller has bound (`cfg.listen` is not used): tests bind port 0 and read
/// the port back from [`SpeakerHandle::local_addrs`].
pub fn spawn_on(
    cfg: SpeakerConfig,
    listener: Option<Listener>,
    policy: Arc<Policy>,
    fib: Option<mpsc::Sender<Vec<FibEvent>>>,
) -> SpeakerHandle {
    let local_addrs = listener
        .as_ref()
        .map(|l| l.local_addrs().to_vec())
        .unwrap_or_default();
    let mut rib_cfg = RibConfig::new(cfg.local_asn, cfg.router_id);
    rib_cfg.cluster_id = cfg.cluster_id;
    let rib = rib::spawn(rib_cfg, policy, cfg.rib_capacity, fib);
    let rib_tx = rib.tx.clone();
    let (tx, rx) = mpsc::channel(16);
    let (events_tx, events_rx) = mpsc::channel(1024);
    let task = Speaker {
        listener,
        rib,
        events_tx,
        peers: BTreeMap::new(),
        next_id: 1,
        deferred: Vec::new(),
    };
    let rib_task = task.rib.watch();
    let join = crate::task::spawn("speaker", task.run(rx, events_rx));
    SpeakerHandle {
        tx,
        rib: rib_tx,
        local_addrs,
        task: join,
        rib_task,
    }
}

struct RunningPeer {
    id: PeerId,
    desired: DesiredPeer,
    handle: PeerHandle,
    /// The Established session, if any (the peer task feeds the RIB and encodes its output itself).
    session: Option<SessionId>,
    /// Families negotiated on the current session, and those the peer has sent End-of-RIB for.
    families: Vec<Family>,
    end_of_rib: Vec<Family>,
}

/// Wait for `stopping` (peer tasks being stopped) while handing every session event that arrives
/// meanwhile to `take`. A stopping peer task reports on the event channel; without this, when more
/// sessions go down at once than the channel holds (a reflector told to stop while its clients vanish, or
/// a change that removes its 2,000 clients), a peer task waits for room in the channel, the speaker waits
/// for that peer task, and each of the rest costs its join's 5-s timeout: minutes.
async fn taking_events(
    stopping: impl std::future::Future<Output = ()>,
    events: &mut mpsc::Receiver<SessionEvent>,
    mut take: impl FnMut(SessionEvent),
) {
    tokio::pin!(stopping);
    loop {
        tokio::select! {
            () = &mut stopping => return,
            Some(ev) = events.recv() => take(ev),
        }
    }
}

/// Stop every peer task, one after the other; the events they send meanwhile are dropped (the speaker is
/// going away).
async fn stop_all(
    peers: BTreeMap<IpAddr, RunningPeer>,
    for_restart: bool,
    events: &mut mpsc::Receiver<SessionEvent>,
) {
    let stopping = async move {
        for (_, p) in peers {
            if for_restart {
                p.handle.shutdown_for_restart().await;
            } else {
                p.handle.shutdown().await;
            }
        }
    };
    taking_events(stopping, events, drop).await;
}

struct Speaker {
    listener: Option<Listener>,
    rib: RibHandle,
    events_tx: mpsc::Sender<SessionEvent>,
    peers: BTreeMap<IpAddr, RunningPeer>,
    next_id: u32,
    /// Session events taken while `apply` waited for peers to stop (see [`Speaker::stop_peer`]), handled
    /// when it is done.
    deferred: Vec<SessionEvent>,
}

impl Speaker {
    async fn run(
        mut self,
        mut cmds: mpsc::Receiver<SpeakerCommand>,
        mut events: mpsc::Receiver<SessionEvent>,
    ) {
        loop {
            tokio::select! {
                cmd = cmds.recv() => match cmd {
                    // Replies: a dropped receiver only means the asker went away (the work is done).
                    Some(SpeakerCommand::Apply(desired, reply)) => {
                        let report = self.apply(desired, &mut events).await;
                        let _ = reply.send(report);
                        // What arrived while peers were stopping, in the order it arrived.
                        for ev in std::mem::take(&mut self.deferred) {
                            self.on_event(ev).await;
                        }
                    }
                    Some(SpeakerCommand::Status(reply)) => {
                        let _ = reply.send(self.status().await);
                    }
                    Some(SpeakerCommand::Sync(reply)) => {
                        let _ = reply.send(self.sync_state());
                    }
                    Some(SpeakerCommand::BfdDown(addr, reason)) => {
                        if let Some(p) = self.peers.get(&addr) {
                            if p.handle.send(PeerCommand::BfdDown { reason }).await.is_err() {
                                tracing::warn!(peer = %addr, "BFD down: the peer task has stopped");
                            }
                        }
                    }
                    Some(SpeakerCommand::Shutdown { for_restart, reply }) => {
                        let peers = std::mem::take(&mut self.peers);
                        stop_all(peers, for_restart, &mut events).await;
                        let _ = reply.send(());
                        return;
                    }
                    None => break,
                },
                Some(ev) = events.recv() => self.on_event(ev).await,
            }
        }
        stop_all(std::mem::take(&mut self.peers), false, &mut events).await;
    }

    fn listener(&self) -> Option<ListenerHandle> {
        self.listener.as_ref().map(|l| l.handle())
    }

    async fn apply(
        &mut self,
        desired: Vec<DesiredPeer>,
        events: &mut mpsc::Receiver<SessionEvent>,
    ) -> ApplyReport {
        let mut report = ApplyReport::default();
        let mut want: BTreeMap<IpAddr, DesiredPeer> = desired
            .into_iter()
            .map(|d| (d.session.peer_addr, d))
            .collect();
        let existing: Vec<IpAddr> = self.peers.keys().copied().collect();
        for addr in existing {
            match want.remove(&addr) {
                None => {
                    self.stop_peer(addr, events).await;
                    report.removed.push(addr);
                }
                Some(d) => {
                    let Some(p) = self.peers.get_mut(&addr) else {
                        continue;
                    };
                    if p.desired == d {
                        report.unchanged.push(addr);
                    } else if p.desired.rr_client != d.rr_client
                        || p.desired.next_hop_mode != d.next_hop_mode
                        || p.desired.max_prefixes != d.max_prefixes
                        || p.desired.allow_local_as != d.allow_local_as
                        || p.desired.next_hop_v6 != d.next_hop_v6
                    {
                        // The RIB learns a peer's role at PeerUp: restart this one peer.
                        self.stop_peer(addr, events).await;
                        self.start_peer(d);
                        report.restarted.push(addr);
                    } else {
                        let cfg = Box::new(d.session.clone());
                        p.desired = d;
                        if p.handle.send(PeerCommand::Reconfigure(cfg)).await.is_err() {
                            tracing::warn!(peer = %addr, "peer task gone while reconfiguring");
                        }
                        report.reconfigured.push(addr);
                    }
                }
            }
        }
        for (addr, d) in want {
            self.start_peer(d);
            report.added.push(addr);
        }
        tracing::info!(
            added = ?report.added, removed = ?report.removed, reconfigured = ?report.reconfigured,
            restarted = ?report.restarted, unchanged = report.unchanged.len(),
            "BGP peers applied"
        );
        report
    }

    fn start_peer(&mut self, d: DesiredPeer) {
        let id = PeerId(self.next_id);
        self.next_id += 1;
        let addr = d.session.peer_addr;
        let link = RibLink {
            tx: self.rib.tx.clone(),
            peer: id,
            role: RibRole {
                rr_client: d.rr_client,
                next_hop_mode: d.next_hop_mode,
                max_prefixes: d.max_prefixes,
                allow_local_as: d.allow_local_as,
                next_hop_v6: d.next_hop_v6,
            },
        };
        let handle = spawn_peer_with_rib(
            d.session.clone(),
            self.listener(),
            self.events_tx.clone(),
            link,
        );
        self.peers.insert(
            addr,
            RunningPeer {
                id,
                desired: d,
                handle,
                session: None,
                families: Vec::new(),
                end_of_rib: Vec::new(),
            },
        );
    }

    /// Stop one peer and tell the RIB. The session events that arrive meanwhile are kept for after `apply`
    /// (`deferred`; see [`taking_events`] for why they must be taken).
    async fn stop_peer(&mut self, addr: IpAddr, events: &mut mpsc::Receiver<SessionEvent>) {
        if let Some(p) = self.peers.remove(&addr) {
            let deferred = &mut self.deferred;
            taking_events(p.handle.shutdown(), events, |ev| deferred.push(ev)).await;
            // Removed by configuration: its routes go now, no graceful restart. Also when its session is
            // already down in graceful restart: the RIB still holds its routes as stale, and a peer that
            // is no longer configured is not coming back (RFC 4724 4.2 leaves the local policy to us). The
            // RIB ignores a PeerDown for a peer it never saw.
            self.to_rib(RibInput::PeerDown {
                peer: p.id,
                graceful: false,
            })
            .await;
        }
    }

    async fn to_rib(&self, input: RibInput) {
        if self.rib.tx.send(input).await.is_err() {
            tracing::error!("the RIB task has stopped");
        }
    }

    async fn on_event(&mut self, ev: SessionEvent) {
        match ev {
            SessionEvent::Established {
                peer,
                session,
                negotiated,
            } => {
                // Lifecycle only: the peer task has told the RIB (PeerUp with this session's generation).
                let Some(p) = self.peers.get_mut(&peer) else {
                    return;
                };
                p.session = Some(session);
                p.families = negotiated.families.clone();
                p.end_of_rib.clear();
            }
            // Spawned with a RIB link, peer tasks send routes and refresh requests to the RIB themselves.
            SessionEvent::Updates { .. } | SessionEvent::RouteRefresh { .. } => {}
            SessionEvent::EndOfRib {
                peer,
                session,
                family,
            } => {
                // The peer task gave it to the RIB; we track it for convergence (`sync_state`).
                if self.live_id(peer, session).is_some() {
                    if let Some(p) = self.peers.get_mut(&peer) {
                        if !p.end_of_rib.contains(&family) {
                            p.end_of_rib.push(family);
                        }
                    }
                }
            }
            SessionEvent::Down {
                peer,
                session,
                reason,
                graceful_restart,
            } => {
                if self.live_id(peer, session).is_none() {
                    return;
                }
                // The peer task told the RIB (PeerDown with this session's generation).
                if let Some(p) = self.peers.get_mut(&peer) {
                    p.session = None;
                    p.end_of_rib.clear();
                }
                tracing::info!(%peer, %reason, graceful = graceful_restart.is_some(), "BGP session down");
            }
        }
    }

    /// The RIB id of `peer` if `session` is its current Established session (events of older sessions
    /// of the same address are ignored).
    fn live_id(&self, peer: IpAddr, session: SessionId) -> Option<PeerId> {
        let p = self.peers.get(&peer)?;
        match p.session {
            Some(s) if s == session => Some(p.id),
            _ => None,
        }
    }

    fn sync_state(&self) -> Vec<PeerSync> {
        self.peers
            .iter()
            .map(|(addr, p)| {
                let established = p.session.is_some();
                PeerSync {
                    address: *addr,
                    established,
                    end_of_rib: established && p.families.iter().all(|f| p.end_of_rib.contains(f)),
                }
            })
            .collect()
    }

    async fn status(&self) -> Vec<PeerReport> {
        let (tx, rx) = oneshot::channel();
        let summary = if self
            .rib
            .tx
            .send(RibInput::Query(Query::Summary(tx)))
            .await
            .is_ok()
        {
            rx.await.ok()
        } else {
            None
        };
        self.peers
            .values()
            .map(|p| {
                let s = p.handle.status();
                let counters = summary
                    .as_ref()
                    .and_then(|sm| sm.peers.iter().find(|c| c.peer == Some(p.id)));
                let established = s.state == State::Established;
                PeerReport {
                    address: s.peer.to_string(),
                    port: p.desired.session.peer_port,
                    peer_type: p.desired.peer_type.clone(),
                    asn: s.peer_as,
                    state: calico_state(s.state).to_string(),
                    fsm_state: s.state.to_string(),
                    since: Some(rfc3339(s.since)),
                    info: stale_info(
                        if established {
                            "Established".to_string()
                        } else {
                            s.last_error.clone().unwrap_or_else(|| s.state.to_string())
                        },
                        counters.map_or((0, 0), |c| (c.stale, c.llgr_stale)),
                    ),
                    prefixes_stale: counters.map_or(0, |c| c.stale),
                    prefixes_llgr_stale: counters.map_or(0, |c| c.llgr_stale),
                    prefixes_received: counters.map_or(s.counters.prefixes_in, |c| c.received),
                    prefixes_accepted: counters.map_or(0, |c| c.accepted),
                    prefixes_advertised: counters.map_or(0, |c| c.advertised),
                }
            })
            .collect()
    }
}

/// The INFO column with the routes kept through a restart of the peer: "hold timer expired; 12 routes
/// kept long-lived stale (LLGR)".
fn stale_info(info: String, (stale, llgr): (u64, u64)) -> String {
    if llgr > 0 {
        format!("{info}; {llgr} routes kept long-lived stale (LLGR)")
    } else if stale > 0 {
        format!("{info}; {stale} routes kept stale (graceful restart)")
    } else {
        info
    }
}

/// Calico's `calicoctl node status` words for BIRD's protocol states.
fn calico_state(s: State) -> &'static str {
    match s {
        State::Established => "up",
        State::Idle => "start",
        State::Connect => "connect",
        State::Active => "active",
        State::OpenSent => "opensent",
        State::OpenConfirm => "openconfirm",
    }
}

/// Seconds-precision RFC 3339 UTC time without a date library.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bgp::wire::{Nlri, Update};

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_404_012);
        assert_eq!(rfc3339(t), "2026-11-23T03:20:12Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn update_becomes_one_rib_input() {
        use crate::bgp::wire::{MpReach, MpUnreach, PathAttributes};
        let n = |s: &str| Nlri {
            prefix: s.parse().unwrap(),
            path_id: 0,
        };
        let u = Update {
            withdrawn: vec![n("10.0.1.0/24")],
            nlri: vec![n("10.0.0.0/24")],
            attributes: PathAttributes {
                next_hop: Some("192.0.2.1".parse().unwrap()),
                mp_reach: Some(MpReach {
                    family: Family::IPV6_UNICAST,
                    next_hop: vec!["2001:db8::1".parse().unwrap()],
                    nlri: vec![n("2001:db8:1::/64")],
                }),
                mp_unreach: Some(MpUnreach {
                    family: Family::IPV6_UNICAST,
                    withdrawn: vec![n("2001:db8:2::/64")],
                }),
                ..Default::default()
            },
        };
        match RibInput::from_received(PeerId(7), u) {
            Some(RibInput::Routes {
                peer,
                announced,
                attrs,
                withdrawn,
            }) => {
                assert_eq!(peer, PeerId(7));
                assert_eq!(announced, vec![n("10.0.0.0/24"), n("2001:db8:1::/64")]);
                assert_eq!(withdrawn, vec![n("10.0.1.0/24"), n("2001:db8:2::/64")]);
                assert!(attrs.mp_reach.as_ref().unwrap().nlri.is_empty());
                assert!(attrs.mp_unreach.is_none());
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(RibInput::from_received(PeerId(1), Update::default()).is_none());
    }
}
