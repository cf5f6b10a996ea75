//! BGP sessions: one tokio task per peer around a Sans-IO RFC 4271 FSM, and one shared listener that
//! hands incoming connections to the peer they come from.
//!
//! This module owns the TCP connections, the FSM and its timers, OPEN validation and capability
//! negotiation, graceful restart capability exchange and End-of-RIB framing. It never holds routes: a peer
//! task spawned with a [`RibLink`] sends decoded UPDATEs straight to the RIB (`RibInput::Session`) and
//! encodes what the RIB gives it to advertise; its owner hears only the lifecycle as [`SessionEvent`]s.
//! Without a link (tests) the UPDATEs go to the owner as `SessionEvent::Updates`.
//!
//! ```text
//!                       Listener task (one per listen address set)
//!   TCP :179  ──accept──►  match source address ──► peer task's own inbox     (unknown: NOTIFICATION Cease/5, close)
//!                                                        │
//!   ┌────────────────────────── peer task (one per peer) ▼ ────────────────────────────────┐
//!   │  select! { socket reads, connect, FSM timers, PeerCommand, RibOutput, incoming conns }  │
//!   │       │ events                          ▲ actions                                       │
//!   │       ▼                                 │                                               │
//!   │  fsm::Session::handle(Event) -> Vec<Action>   (pure: no I/O, no clock)                  │
//!   └───────┬──────────────────────────────────────────────────▲─────────────────────────────┘
//!     │     │ mpsc<SessionEvent> (shared by all peers)    │ mpsc<PeerCommand> (per peer)
//!     │     ▼                                             │
//!     │  owner (speaker): Established / EndOfRib / Down   Stop, Reconfigure, SendRouteRefresh (and, without a
//!     │                                                    RIB link: SendUpdates, SendEndOfRib)
//!     │ RibInput::Session { generation, PeerUp / Routes / EndOfRib / RouteRefresh / PeerDown }
//!     ▼
//!   RIB task ──RibOutput (bounded, per session)──▶ peer task: encoded (rib_link.rs) and written to the
//!     │ socket at once while nothing is queued and the writer is idle, else into the write queue
//!     └──shared UPDATE, queued and written by the RIB itself (peer::DirectSink: on the RIB's thread or
//!        its helper's) while the peer task holds nothing the RIB sent and nothing is queued; what the
//!        socket does not take is left to the writer
//!   status: PeerStatus per peer behind a lock (state, since, last error in plain words, counters), read
//!     by the owner when asked
//! ```

pub mod config;
pub mod fsm;
pub mod listener;
pub mod open;
pub mod peer;
pub mod rib_link;
pub mod sockopt;

use std::net::IpAddr;
use std::time::SystemTime;

use bytes::Bytes;

use crate::bgp::wire::{Family, Update};

pub use config::{GracefulRestartConfig, Password, PeerConfig, Timers};
pub use fsm::{Action, ConnId, Event, MessageError, Session, State, Timer};
pub use listener::{Listener, ListenerError, ListenerHandle};
pub use open::{Negotiated, OpenError, PeerGracefulRestart};
pub use peer::{spawn_peer, spawn_peer_with_rib, PeerHandle};
pub use rib_link::{RibLink, RibRole};

/// Identifies one Established session of a peer. It changes every time the session comes up again, so
/// the RIB can tell which session a batch of pre-encoded UPDATEs was built for: bytes encoded for an
/// older session (other negotiated ADD-PATH / 4-octet AS) are dropped, never sent on a new one.
pub type SessionId = u64;

/// What a peer task tells the RIB. All peers share one channel; `peer` says who.
#[derive(Debug, Clone)]
pub enum SessionEvent {
    /// The session is up. The RIB now sends the initial table for `negotiated.families`, then
    /// `PeerCommand::SendEndOfRib` for each family.
    Established {
        peer: IpAddr,
        session: SessionId,
        negotiated: Box<Negotiated>,
    },
    /// UPDATEs received, in order, as decoded (End-of-RIB markers are reported as `EndOfRib` instead).
    /// RFC 7606 treat-as-withdraw and attribute-discard are already applied by the codec.
    Updates {
        peer: IpAddr,
        session: SessionId,
        updates: Vec<Update>,
    },
    /// The peer finished sending its initial table for `family` (RFC 4724 2).
    EndOfRib {
        peer: IpAddr,
        session: SessionId,
        family: Family,
    },
    /// The peer asked for our routes again (RFC 2918).
    RouteRefresh {
        peer: IpAddr,
        session: SessionId,
        family: Family,
    },
    /// The Established session ended. With `graceful_restart` set, keep the peer's routes marked stale
    /// for `restart_time` or until its End-of-RIB after it comes back (RFC 4724 4.2); otherwise remove
    /// them now.
    Down {
        peer: IpAddr,
        session: SessionId,
        reason: String,
        graceful_restart: Option<PeerGracefulRestart>,
    },
}

/// What the RIB (or the speaker) tells one peer task.
#[derive(Debug)]
pub enum PeerCommand {
    /// Complete UPDATE messages, encoded with `Negotiated`'s parameters for session `session`, back to
    /// back in one buffer (large buffers are the fast path). Dropped if that session is no longer up.
    SendUpdates { session: SessionId, bytes: Bytes },
    /// UPDATEs to encode here (convenient for small numbers of updates).
    SendUpdateList {
        session: SessionId,
        updates: Vec<Update>,
    },
    /// Send the End-of-RIB marker for `family` (after the initial table, RFC 4724 2).
    SendEndOfRib { session: SessionId, family: Family },
    /// Ask the peer to re-send its routes for `family` (RFC 2918), if it supports route refresh.
    SendRouteRefresh { session: SessionId, family: Family },
    /// Apply a new configuration; the session is reset only if something it uses changed.
    Reconfigure(Box<PeerConfig>),
    /// Close the session with Cease / administrative shutdown and stay Idle until `Start`.
    Stop,
    /// Start again after `Stop`.
    Start,
    /// BFD declared the path to the peer down (RFC 5882 4.3): reset the session now, without graceful
    /// restart retention, and reconnect as after any failure.
    BfdDown { reason: String },
}

/// Counters of one peer, since the task started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages_in: u64,
    pub messages_out: u64,
    pub updates_in: u64,
    pub updates_out: u64,
    pub keepalives_in: u64,
    pub keepalives_out: u64,
    pub notifications_in: u64,
    pub notifications_out: u64,
    /// Prefixes announced / withdrawn by the peer (all families).
    pub prefixes_in: u64,
    pub withdrawals_in: u64,
    /// Times the session reached Established.
    pub established: u64,
    /// Bytes of UPDATE data written.
    pub update_bytes_out: u64,
}

/// One peer as `margay status` shows it: published by the peer task on a watch channel.
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub peer: IpAddr,
    pub peer_as: u32,
    pub state: State,
    /// When `state` was entered.
    pub since: SystemTime,
    /// The last failure in plain words ("connect: connection refused", "hold timer expired",
    /// "OPEN from 10.0.0.2: bad peer AS 65001, expected 65000").
    pub last_error: Option<String>,
    pub negotiated: Option<Negotiated>,
    pub counters: Counters,
}

/// Errors of the session layer that reach a caller (most failures are reported as status instead,
/// because a peer that misbehaves must never take anything else down).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("peer {peer}: the peer task has stopped")]
    TaskGone { peer: IpAddr },
}
