//! The Sans-IO BGP finite state machine (RFC 4271 section 8) for one peer.
//!
//! `Session::handle(Event) -> Vec<Action>`: the peer task turns socket results, received messages and
//! timer expiries into [`Event`]s and performs the returned [`Action`]s (connect, send, close, arm a
//! timer). The FSM never does I/O, never sleeps and never panics, whatever the event sequence (a
//! proptest holds it to that).
//!
//! Connections are named by a [`ConnId`] chosen by the peer task. Besides the main connection the FSM
//! may hold one more while resolving a connection collision (RFC 4271 6.8): an incoming connection that
//! arrives while our own is in OpenSent or OpenConfirm. The collision is decided by BGP identifier as
//! soon as the peer's identifier is known. Events for a connection the FSM no longer holds are ignored,
//! so late socket events after a close are harmless.

use std::time::Duration;

use crate::bgp::wire::{Notification, Open};

use super::config::PeerConfig;
use super::open::{
    build_open, code, negotiate, notification_text, Negotiated, PeerGracefulRestart,
};

/// Names one TCP connection of this peer; chosen by the peer task, unique per peer.
pub type ConnId = u64;

/// The RFC 4271 8.2.2 states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    Idle,
    Connect,
    Active,
    OpenSent,
    OpenConfirm,
    Established,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Idle => "Idle",
            State::Connect => "Connect",
            State::Active => "Active",
            State::OpenSent => "OpenSent",
            State::OpenConfirm => "OpenConfirm",
            State::Established => "Established",
        })
    }
}

/// The FSM's timers (RFC 4271 8 and 8.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Timer {
    ConnectRetry,
    Hold,
    Keepalive,
    /// IdleHoldTimer: the backoff before an automatic restart after a failure (DampPeerOscillations).
    IdleHold,
}

/// A message the peer sent that could not be decoded and must reset the session: what to send back and
/// what to tell the operator. Built by the peer task from the codec's `DecodeError`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageError {
    pub notification: Notification,
    pub reason: String,
}

/// FSM input (RFC 4271 8.1; the event numbers are the RFC's).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Event 1 ManualStart, or Event 4 ManualStart_with_PassiveTcpEstablishment when the peer is passive.
    ManualStart,
    /// Event 2 ManualStop: the operator or the configuration removed or reset the peer.
    ManualStop,
    /// Event 8 AutomaticStop: the speaker stops the session itself, e.g. because its configuration
    /// changed; like ManualStop but with the given Cease subcode (RFC 4486: 6 = other configuration
    /// change, 3 = peer de-configured).
    AutomaticStop { cease_subcode: u8 },
    /// Event 9 ConnectRetryTimer_Expires.
    ConnectRetryTimerExpires,
    /// Event 10 HoldTimer_Expires.
    HoldTimerExpires,
    /// Event 11 KeepaliveTimer_Expires.
    KeepaliveTimerExpires,
    /// Event 13 IdleHoldTimer_Expires: the backoff after a failure is over; restart automatically
    /// (Event 3 AutomaticStart follows from it).
    IdleHoldTimerExpires,
    /// Event 16 Tcp_CR_Acked: our outgoing connection attempt succeeded.
    TcpCrAcked(ConnId),
    /// Event 17 TcpConnectionConfirmed: the listener handed us a connection the peer opened.
    TcpConnectionConfirmed(ConnId),
    /// Event 18 TcpConnectionFails: a connection (or a connection attempt) failed or was closed by the
    /// peer; `reason` is for the operator ("connect: connection refused").
    TcpConnectionFails { conn: ConnId, reason: String },
    /// Event 19 BGPOpen: a valid OPEN arrived (its contents are checked here, RFC 4271 6.2).
    BgpOpen(ConnId, Open),
    /// Event 21 BGPHeaderErr / Event 22 BGPOpenMsgErr: a message could not be decoded.
    BgpHeaderErr(ConnId, MessageError),
    /// Event 22 BGPOpenMsgErr: an OPEN could not be decoded.
    BgpOpenMsgErr(ConnId, MessageError),
    /// Event 25 NotifMsg (and Event 24 NotifMsgVerErr): the peer sent a NOTIFICATION.
    NotifMsg(ConnId, Notification),
    /// Event 26 KeepAliveMsg.
    KeepAliveMsg(ConnId),
    /// Event 27 UpdateMsg (also used for ROUTE-REFRESH: both only restart the hold timer here).
    UpdateMsg(ConnId),
    /// Event 28 UpdateMsgErr: an UPDATE error that RFC 7606 says resets the session.
    UpdateMsgErr(ConnId, MessageError),
    /// BFD declared the path down (RFC 5882 4.3; not one of RFC 4271's events): like a hold timer expiry
    /// but at once, and the peer's routes go now rather than being kept for graceful restart: the
    /// forwarding path itself failed, so stale routes would blackhole traffic.
    BfdDown { reason: String },
}

/// What the peer task must do (RFC 4271 8.2.2 "the local system ...").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Open a TCP connection to the peer, replacing any attempt in flight. Report the result with
    /// `TcpCrAcked` or `TcpConnectionFails`.
    Connect,
    /// Abandon the connection attempt in flight, if any.
    CancelConnect,
    SendOpen(ConnId, Open),
    SendKeepalive(ConnId),
    SendNotification(ConnId, Notification),
    /// Close the connection (after flushing what was queued on it).
    CloseConnection(ConnId),
    StartTimer(Timer, Duration),
    StopTimer(Timer),
    /// The session reached Established on this connection; hand `Negotiated` to the RIB.
    Established(ConnId, Box<Negotiated>),
    /// The Established session ended. `graceful_restart` is the peer's GR capability when its routes
    /// should be kept stale (RFC 4724 4.2: not after a NOTIFICATION or a manual stop).
    Down {
        reason: String,
        graceful_restart: Option<PeerGracefulRestart>,
    },
    /// A failure in plain words, for `margay status` ("hold timer expired").
    LastError(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Outbound,
    Inbound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Conn {
    id: ConnId,
    dir: Direction,
}

/// RFC 9384: Cease subcode "BFD Down".
pub const CEASE_BFD_DOWN: u8 = 10;

/// The FSM of one peer.
#[derive(Debug, Clone)]
pub struct Session {
    cfg: PeerConfig,
    state: State,
    /// Set by ManualStart, cleared by ManualStop: automatic restarts happen only while started.
    started: bool,
    main: Option<Conn>,
    /// The other connection during collision resolution, with the OPEN it sent once received.
    other: Option<(Conn, Option<Open>)>,
    negotiated: Option<Negotiated>,
    /// Current IdleHoldTimer backoff.
    backoff: Duration,
}

impl Session {
    pub fn new(cfg: PeerConfig) -> Session {
        let backoff = cfg.timers.error_wait_min;
        Session {
            cfg,
            state: State::Idle,
            started: false,
            main: None,
            other: None,
            negotiated: None,
            backoff,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn config(&self) -> &PeerConfig {
        &self.cfg
    }

    /// What was negotiated, from OpenConfirm on.
    pub fn negotiated(&self) -> Option<&Negotiated> {
        self.negotiated.as_ref()
    }

    /// The connection that carries (or is becoming) the session.
    pub fn main_conn(&self) -> Option<ConnId> {
        self.main.map(|c| c.id)
    }

    /// Feed one event; get the actions to perform, in order.
    pub fn handle(&mut self, ev: Event) -> Vec<Action> {
        let mut out = Vec::new();
        match ev {
            Event::ManualStart => self.manual_start(&mut out),
            Event::ManualStop => self.manual_stop(code::CEASE_ADMIN_SHUTDOWN, &mut out),
            Event::AutomaticStop { cease_subcode } => self.manual_stop(cease_subcode, &mut out),
            Event::IdleHoldTimerExpires => {
                if self.state == State::Idle && self.started {
                    self.start(&mut out);
                }
            }
            Event::ConnectRetryTimerExpires => self.connect_retry_expired(&mut out),
            Event::HoldTimerExpires => self.hold_expired(&mut out),
            Event::KeepaliveTimerExpires => self.keepalive_expired(&mut out),
            Event::TcpCrAcked(id) => self.connected(
                Conn {
                    id,
                    dir: Direction::Outbound,
                },
                &mut out,
            ),
            Event::TcpConnectionConfirmed(id) => self.connected(
                Conn {
                    id,
                    dir: Direction::Inbound,
                },
                &mut out,
            ),
            Event::TcpConnectionFails { conn, reason } => self.tcp_fails(conn, reason, &mut out),
            Event::BgpOpen(conn, open) => self.open_received(conn, open, &mut out),
            Event::BgpHeaderErr(conn, err)
            | Event::BgpOpenMsgErr(conn, err)
            | Event::UpdateMsgErr(conn, err) => self.message_error(conn, err, &mut out),
            Event::NotifMsg(conn, n) => self.notification_received(conn, n, &mut out),
            Event::KeepAliveMsg(conn) => self.keepalive_received(conn, &mut out),
            Event::UpdateMsg(conn) => self.update_received(conn, &mut out),
            Event::BfdDown { reason } => self.bfd_down(reason, &mut out),
        }
        out
    }

    // ----- starting and stopping -----

    fn manual_start(&mut self, out: &mut Vec<Action>) {
        if self.started && self.state != State::Idle {
            return; // RFC 4271 8.2.2: ManualStart outside Idle is ignored.
        }
        self.started = true;
        self.backoff = self.cfg.timers.error_wait_min;
        out.push(Action::StopTimer(Timer::IdleHold));
        if self.state == State::Idle {
            self.start(out);
        }
    }

    /// Idle -> Connect (or Active when passive): the common part of ManualStart and AutomaticStart.
    fn start(&mut self, out: &mut Vec<Action>) {
        out.push(Action::StartTimer(
            Timer::ConnectRetry,
            self.cfg.timers.connect_retry,
        ));
        if self.cfg.passive {
            self.state = State::Active;
        } else {
            out.push(Action::Connect);
            self.state = State::Connect;
        }
    }

    fn manual_stop(&mut self, subcode: u8, out: &mut Vec<Action>) {
        self.started = false;
        let n = Notification {
            code: code::CEASE,
            subcode,
            data: Vec::new(),
        };
        let was_established = self.state == State::Established;
        for id in self.conns() {
            // RFC 4271 8.2.2: a NOTIFICATION with Cease is sent when a connection exists past Connect.
            out.push(Action::SendNotification(id, n.clone()));
            out.push(Action::CloseConnection(id));
        }
        if was_established {
            out.push(Action::Down {
                reason: "stopped by configuration".into(),
                graceful_restart: None,
            });
        }
        self.enter_idle(out);
        out.push(Action::StopTimer(Timer::IdleHold));
    }

    fn conns(&self) -> Vec<ConnId> {
        self.main
            .iter()
            .map(|c| c.id)
            .chain(self.other.iter().map(|(c, _)| c.id))
            .collect()
    }

    /// Go to Idle without arming the backoff (manual stop).
    fn enter_idle(&mut self, out: &mut Vec<Action>) {
        out.push(Action::CancelConnect);
        for t in [Timer::ConnectRetry, Timer::Hold, Timer::Keepalive] {
            out.push(Action::StopTimer(t));
        }
        self.main = None;
        self.other = None;
        self.negotiated = None;
        self.state = State::Idle;
    }

    /// A failure: close everything, tell the RIB if we were Established, go Idle and arm the
    /// IdleHoldTimer with exponential backoff (RFC 4271 8.1.1 DampPeerOscillations) so a broken peer is
    /// not hammered.
    fn fail(
        &mut self,
        reason: String,
        notify: Option<Notification>,
        keep_routes: bool,
        out: &mut Vec<Action>,
    ) {
        for id in self.conns() {
            if let Some(n) = &notify {
                out.push(Action::SendNotification(id, n.clone()));
            }
            out.push(Action::CloseConnection(id));
        }
        if self.state == State::Established {
            let graceful_restart = if keep_routes {
                self.negotiated
                    .as_ref()
                    .and_then(|n| n.peer_graceful_restart.clone())
            } else {
                None
            };
            out.push(Action::Down {
                reason: reason.clone(),
                graceful_restart,
            });
        }
        out.push(Action::LastError(reason));
        self.enter_idle(out);
        if self.started {
            out.push(Action::StartTimer(Timer::IdleHold, self.backoff));
            self.backoff = self
                .backoff
                .saturating_mul(2)
                .min(self.cfg.timers.error_wait_max)
                .max(self.cfg.timers.error_wait_min);
        }
    }

    // ----- timers -----

    fn connect_retry_expired(&mut self, out: &mut Vec<Action>) {
        match self.state {
            // RFC 4271 8.2.2 Connect / Active: drop the attempt, restart the timer, connect again.
            State::Connect | State::Active => {
                if self.state == State::Connect {
                    // The attempt in flight got no answer (a silent peer, a firewall, or a TCP MD5
                    // mismatch: the kernel drops wrongly signed segments without a reply).
                    out.push(Action::LastError("connect: timed out".into()));
                }
                out.push(Action::StartTimer(
                    Timer::ConnectRetry,
                    self.cfg.timers.connect_retry,
                ));
                if !self.cfg.passive {
                    out.push(Action::Connect);
                    self.state = State::Connect;
                }
            }
            State::Idle => {}
            // The timer is stopped past Active; a stale expiry is an FSM error only for the RFC's
            // bookkeeping and harmless here.
            State::OpenSent | State::OpenConfirm | State::Established => {}
        }
    }

    fn hold_expired(&mut self, out: &mut Vec<Action>) {
        match self.state {
            State::OpenSent | State::OpenConfirm | State::Established => {
                let n = Notification {
                    code: code::HOLD_TIMER_EXPIRED,
                    subcode: 0,
                    data: Vec::new(),
                };
                // RFC 4724 4.2: a hold timer expiry is a session loss where GR applies.
                self.fail("hold timer expired".into(), Some(n), true, out);
            }
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn bfd_down(&mut self, reason: String, out: &mut Vec<Action>) {
        match self.state {
            State::OpenSent | State::OpenConfirm | State::Established => {
                // RFC 9384: Cease subcode 10, "BFD Down".
                let n = Notification {
                    code: code::CEASE,
                    subcode: CEASE_BFD_DOWN,
                    data: Vec::new(),
                };
                self.fail(format!("BFD session down: {reason}"), Some(n), false, out);
            }
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn keepalive_expired(&mut self, out: &mut Vec<Action>) {
        if let (State::OpenConfirm | State::Established, Some(main), Some(neg)) =
            (self.state, self.main, self.negotiated.as_ref())
        {
            if neg.keepalive > 0 {
                out.push(Action::SendKeepalive(main.id));
                out.push(Action::StartTimer(Timer::Keepalive, secs(neg.keepalive)));
            }
        }
    }

    // ----- connections -----

    fn send_open_on(&self, conn: Conn, out: &mut Vec<Action>) {
        out.push(Action::SendOpen(conn.id, build_open(&self.cfg)));
    }

    fn connected(&mut self, conn: Conn, out: &mut Vec<Action>) {
        if self.conns().contains(&conn.id) {
            return; // a duplicate report for a connection we already hold
        }
        match self.state {
            State::Idle if !self.started || conn.dir == Direction::Outbound => {
                // RFC 4271 8.2.2 Idle: refuse connections while stopped.
                out.push(Action::CloseConnection(conn.id));
            }
            State::Idle | State::Connect | State::Active => {
                // Idle here means "backing off after a failure" (IdleHoldTimer running). The backoff
                // only damps our own connection attempts: a peer that reconnects (e.g. after its
                // graceful restart, or with a long ConnectRetry like FRR's 120 s) is taken at once
                // instead of being refused until its next retry.
                out.push(Action::StopTimer(Timer::IdleHold));
                if self.cfg.passive && conn.dir == Direction::Outbound {
                    out.push(Action::CloseConnection(conn.id));
                    return;
                }
                // RFC 4271 8.2.2 Connect/Active + Event 16/17 (no DelayOpen): send OPEN, hold timer to a
                // large value, OpenSent.
                out.push(Action::CancelConnect);
                out.push(Action::StopTimer(Timer::ConnectRetry));
                self.main = Some(conn);
                self.send_open_on(conn, out);
                out.push(Action::StartTimer(Timer::Hold, self.cfg.timers.open_hold));
                self.state = State::OpenSent;
            }
            State::OpenSent => {
                // RFC 4271 6.8: keep both until one of them tells us the peer's identifier.
                if self.other.is_some() {
                    out.push(Action::CloseConnection(conn.id));
                } else {
                    self.other = Some((conn, None));
                    self.send_open_on(conn, out);
                }
            }
            State::OpenConfirm => {
                // RFC 4271 6.8: the peer's identifier is known, decide now.
                let Some(main) = self.main else {
                    out.push(Action::CloseConnection(conn.id));
                    return;
                };
                let Some(peer_id) = self.negotiated.as_ref().map(|n| n.peer_id) else {
                    out.push(Action::CloseConnection(conn.id));
                    return;
                };
                if conn.dir != main.dir && self.keep_direction(peer_id) == conn.dir {
                    out.push(Action::SendNotification(main.id, collision()));
                    out.push(Action::CloseConnection(main.id));
                    out.push(Action::StopTimer(Timer::Keepalive));
                    self.negotiated = None;
                    self.main = Some(conn);
                    self.send_open_on(conn, out);
                    out.push(Action::StartTimer(Timer::Hold, self.cfg.timers.open_hold));
                    self.state = State::OpenSent;
                } else {
                    out.push(Action::SendNotification(conn.id, collision()));
                    out.push(Action::CloseConnection(conn.id));
                }
            }
            State::Established => {
                let peer_gr = self
                    .negotiated
                    .as_ref()
                    .and_then(|n| n.peer_graceful_restart.clone());
                if peer_gr.is_some() && conn.dir == Direction::Inbound {
                    // RFC 4724 4.2: a GR-capable peer reconnecting means it restarted; the old session is
                    // gone (keep its routes stale) and the new connection is the restarted peer.
                    let reason = "peer restarted (graceful restart)".to_string();
                    if let Some(main) = self.main {
                        out.push(Action::CloseConnection(main.id));
                    }
                    out.push(Action::Down {
                        reason: reason.clone(),
                        graceful_restart: peer_gr,
                    });
                    out.push(Action::LastError(reason));
                    out.push(Action::StopTimer(Timer::Keepalive));
                    self.negotiated = None;
                    self.main = Some(conn);
                    self.send_open_on(conn, out);
                    out.push(Action::StartTimer(Timer::Hold, self.cfg.timers.open_hold));
                    self.state = State::OpenSent;
                } else {
                    // RFC 4271 6.8: collision with an Established session closes the new connection.
                    out.push(Action::SendNotification(conn.id, collision()));
                    out.push(Action::CloseConnection(conn.id));
                }
            }
        }
    }

    /// RFC 4271 6.8: the connection initiated by the side with the higher BGP identifier survives.
    fn keep_direction(&self, peer_id: std::net::Ipv4Addr) -> Direction {
        if u32::from(self.cfg.router_id) < u32::from(peer_id) {
            Direction::Inbound
        } else {
            Direction::Outbound
        }
    }

    fn is_main(&self, id: ConnId) -> bool {
        self.main.map(|c| c.id) == Some(id)
    }

    fn is_other(&self, id: ConnId) -> bool {
        self.other.as_ref().map(|(c, _)| c.id) == Some(id)
    }

    fn tcp_fails(&mut self, id: ConnId, reason: String, out: &mut Vec<Action>) {
        if self.is_other(id) {
            self.other = None;
            out.push(Action::CloseConnection(id));
            return;
        }
        match self.state {
            // A connection attempt failed (RFC 4271 8.2.2 Connect + Event 18): Idle, with backoff.
            State::Connect if self.main.is_none() => self.fail(reason, None, false, out),
            State::OpenSent if self.is_main(id) => {
                out.push(Action::CloseConnection(id));
                self.main = None;
                if let Some((other, open)) = self.other.take() {
                    // The collision partner carries on as the main connection.
                    self.main = Some(other);
                    if let Some(open) = open {
                        self.accept_open(other, open, out);
                    }
                } else {
                    // RFC 4271 8.2.2 OpenSent + Event 18: restart ConnectRetryTimer, Active.
                    out.push(Action::StopTimer(Timer::Hold));
                    out.push(Action::StartTimer(
                        Timer::ConnectRetry,
                        self.cfg.timers.connect_retry,
                    ));
                    out.push(Action::LastError(reason));
                    self.state = State::Active;
                }
            }
            State::OpenConfirm | State::Established if self.is_main(id) => {
                // RFC 4724 4.2: TCP loss is where a GR helper keeps the routes.
                self.fail(reason, None, true, out)
            }
            _ => {}
        }
    }

    // ----- messages -----

    fn open_received(&mut self, id: ConnId, open: Open, out: &mut Vec<Action>) {
        if self.is_other(id) {
            let Some((other, _)) = self.other else { return };
            match negotiate(&self.cfg, &open) {
                Err(e) => {
                    out.push(Action::SendNotification(id, e.notification));
                    out.push(Action::CloseConnection(id));
                    out.push(Action::LastError(e.reason));
                    self.other = None;
                }
                Ok(_) => {
                    let keep = self.keep_direction(open.bgp_id);
                    let main_dir = self.main.map(|m| m.dir);
                    if self.state == State::OpenSent
                        && main_dir != Some(other.dir)
                        && keep == other.dir
                    {
                        // The other connection wins: drop the main one and carry on with this OPEN.
                        if let Some(main) = self.main {
                            out.push(Action::SendNotification(main.id, collision()));
                            out.push(Action::CloseConnection(main.id));
                        }
                        self.other = None;
                        self.main = Some(other);
                        self.accept_open(other, open, out);
                    } else if self.state == State::OpenSent {
                        // The main connection wins; remember nothing of the loser.
                        out.push(Action::SendNotification(id, collision()));
                        out.push(Action::CloseConnection(id));
                        self.other = None;
                    } else {
                        self.other = Some((other, Some(open)));
                    }
                }
            }
            return;
        }
        if !self.is_main(id) {
            return;
        }
        match self.state {
            State::OpenSent => {
                if let Some(main) = self.main {
                    self.accept_open(main, open, out);
                }
            }
            State::OpenConfirm => self.fsm_error(code::FSM_UNEXPECTED_IN_OPENCONFIRM, "OPEN", out),
            State::Established => self.fsm_error(code::FSM_UNEXPECTED_IN_ESTABLISHED, "OPEN", out),
            State::Idle | State::Connect | State::Active => {}
        }
    }

    /// RFC 4271 8.2.2 OpenSent + Event 19: validate, negotiate, KEEPALIVE, OpenConfirm; then resolve a
    /// pending collision now that the peer's identifier is known.
    fn accept_open(&mut self, conn: Conn, open: Open, out: &mut Vec<Action>) {
        match negotiate(&self.cfg, &open) {
            Err(e) => {
                // A bad OPEN is a configuration problem, not a crash: no GR, and Idle with backoff.
                if let Some((other, _)) = self.other.take() {
                    out.push(Action::CloseConnection(other.id));
                }
                self.fail(e.reason, Some(e.notification), false, out);
            }
            Ok(neg) => {
                out.push(Action::StopTimer(Timer::ConnectRetry));
                out.push(Action::SendKeepalive(conn.id));
                if neg.hold_time > 0 {
                    out.push(Action::StartTimer(Timer::Hold, secs(neg.hold_time)));
                    out.push(Action::StartTimer(Timer::Keepalive, secs(neg.keepalive)));
                } else {
                    // RFC 4271 4.4: hold time 0 means no keepalives and no hold timer.
                    out.push(Action::StopTimer(Timer::Hold));
                    out.push(Action::StopTimer(Timer::Keepalive));
                }
                let peer_id = neg.peer_id;
                self.negotiated = Some(neg);
                self.state = State::OpenConfirm;
                if let Some((other, _)) = self.other.take() {
                    if other.dir != conn.dir && self.keep_direction(peer_id) == other.dir {
                        // The pending connection wins: restart on it from OpenSent.
                        out.push(Action::SendNotification(conn.id, collision()));
                        out.push(Action::CloseConnection(conn.id));
                        out.push(Action::StopTimer(Timer::Keepalive));
                        self.negotiated = None;
                        self.main = Some(other);
                        out.push(Action::StartTimer(Timer::Hold, self.cfg.timers.open_hold));
                        self.state = State::OpenSent;
                    } else {
                        out.push(Action::SendNotification(other.id, collision()));
                        out.push(Action::CloseConnection(other.id));
                    }
                }
            }
        }
    }

    fn message_error(&mut self, id: ConnId, err: MessageError, out: &mut Vec<Action>) {
        if self.is_other(id) {
            out.push(Action::SendNotification(id, err.notification));
            out.push(Action::CloseConnection(id));
            self.other = None;
            return;
        }
        if !self.is_main(id) {
            return;
        }
        match self.state {
            State::OpenSent | State::OpenConfirm | State::Established => {
                // RFC 4724 4.2 / RFC 8538: after a NOTIFICATION the routes go; no GR.
                self.fail(err.reason, Some(err.notification), false, out)
            }
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn notification_received(&mut self, id: ConnId, n: Notification, out: &mut Vec<Action>) {
        if self.is_other(id) {
            out.push(Action::CloseConnection(id));
            self.other = None;
            return;
        }
        if !self.is_main(id) {
            return;
        }
        let peer = self.cfg.peer_addr;
        match self.state {
            State::OpenSent | State::OpenConfirm | State::Established => self.fail(
                format!("NOTIFICATION from {peer}: {}", notification_text(&n)),
                None,
                false,
                out,
            ),
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn keepalive_received(&mut self, id: ConnId, out: &mut Vec<Action>) {
        if !self.is_main(id) {
            if self.is_other(id) {
                // A KEEPALIVE before the OPEN exchange on the collision partner is an FSM error there.
                out.push(Action::CloseConnection(id));
                self.other = None;
            }
            return;
        }
        match self.state {
            State::OpenSent => self.fsm_error(code::FSM_UNEXPECTED_IN_OPENSENT, "KEEPALIVE", out),
            State::OpenConfirm => {
                // RFC 4271 8.2.2 OpenConfirm + Event 26: restart the hold timer, Established.
                let Some(neg) = self.negotiated.clone() else {
                    return;
                };
                if neg.hold_time > 0 {
                    out.push(Action::StartTimer(Timer::Hold, secs(neg.hold_time)));
                }
                self.backoff = self.cfg.timers.error_wait_min;
                self.state = State::Established;
                // RFC 4724 3: the Restart State bit announces *this* restart; once a session is up again
                // later OPENs (after an unrelated session reset) must not claim a restart.
                if let Some(gr) = self.cfg.graceful_restart.as_mut() {
                    gr.restarting = false;
                }
                out.push(Action::Established(id, Box::new(neg)));
            }
            State::Established => self.restart_hold(out),
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn update_received(&mut self, id: ConnId, out: &mut Vec<Action>) {
        if !self.is_main(id) {
            if self.is_other(id) {
                out.push(Action::CloseConnection(id));
                self.other = None;
            }
            return;
        }
        match self.state {
            State::OpenSent => self.fsm_error(code::FSM_UNEXPECTED_IN_OPENSENT, "UPDATE", out),
            State::OpenConfirm => {
                self.fsm_error(code::FSM_UNEXPECTED_IN_OPENCONFIRM, "UPDATE", out)
            }
            State::Established => self.restart_hold(out),
            State::Idle | State::Connect | State::Active => {}
        }
    }

    fn restart_hold(&self, out: &mut Vec<Action>) {
        if let Some(neg) = &self.negotiated {
            if neg.hold_time > 0 {
                out.push(Action::StartTimer(Timer::Hold, secs(neg.hold_time)));
            }
        }
    }

    /// RFC 4271 8.2.2 "any other event" / RFC 6608: NOTIFICATION FSM error, Idle.
    fn fsm_error(&mut self, subcode: u8, what: &str, out: &mut Vec<Action>) {
        let peer = self.cfg.peer_addr;
        let reason = format!("{peer} sent an unexpected {what} in state {}", self.state);
        let n = Notification {
            code: code::FSM,
            subcode,
            data: Vec::new(),
        };
        self.fail(reason, Some(n), false, out);
    }
}

fn collision() -> Notification {
    Notification {
        code: code::CEASE,
        subcode: code::CEASE_COLLISION_RESOLUTION,
        data: Vec::new(),
    }
}

fn secs(s: u16) -> Duration {
    Duration::from_secs(u64::from(s))
}
