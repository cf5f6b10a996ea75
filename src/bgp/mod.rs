//! The embedded BGP speaker. `wire` is the pure codec; sessions, RIB and policy are built on it.
//!
//! The tasks and the channels between them, as the code makes them:
//!
//! ```text
//!   owner (node / reflector) ──SpeakerCommand (mpsc 16: Apply, Status, Sync, Shutdown)──▶ speaker task
//!     │                                                                     │ spawn / Reconfigure / stop
//!     │ RibInput (Originate, SetPolicy, ...)                                 ▼ (lifecycle only, no routes)
//!     │                      SessionEvent (mpsc 1024, shared: Established, EndOfRib, Down)
//!     │               speaker ◀───────────────────────────────────────────────┐
//!     │                                                                        │
//!     │     listener task ──TcpStream──▶ peer task (one per peer, session/peer.rs) ◀──▶ reader / writer task per TCP connection
//!     │                                   │ ▲                       (write queue: control first, then about 32 KiB of UPDATE
//!     │                                   │ │                        pieces, written vectored: shared pieces are never copied;
//!     │                                   │ │                        the peer task writes itself while the queue is empty)
//!     │   RibInput::Session{generation,   │ │ PeerCommand (chan 64: Stop, Reconfigure, SendRouteRefresh, ...)
//!     │   PeerUp | Routes | Withdraw |    │ │
//!     │   EndOfRib | RouteRefresh |       │ │ RibOutput (chan 16 per Established session: the peer task encodes it,
//!     │   PeerDown}                       │ │   session/rib_link.rs, straight into the connection's write queue)
//!     ▼                                   ▼ │
//!   RIB task (rib/task.rs, bounded mpsc rib_capacity) fills each session's RibOutput channel from the session's
//!     │     cursor in the RIB's change log (rib/core/log.rs); a channel it left full rings the RIB's
//!     │     bell when it has drained to half, and the RIB serves just those sessions
//!     │──the fan-out case (rib::DirectOut): a session that holds nothing the RIB sent it and has nothing
//!     │     queued for its socket gets the group's shared UPDATE queued by the RIB itself, no task woken;
//!     │     the RIB and its rib-flush helper thread write the queued sockets in chunks, oldest first;
//!     │     the RIB writes what is left at the end of the change (rib/flush.rs)
//!     └──Vec<FibEvent> (mpsc, node only)──▶ FIB consumer
//! ```
//!
//! "chan" is `task::chan`: per-peer channels that hold no slots while empty (a reflector has thousands of
//! mostly idle sessions).
//!
//! Every UPDATE goes peer task → RIB task in one hop. The generation in `RibInput::Session` numbers a
//! peer's sessions, so the RIB drops a late batch of a session that has been replaced. The speaker starts and
//! stops peer tasks and keeps the per-peer bookkeeping the owner asks about (End-of-RIB seen, for convergence).
//! Unbounded queues left: the control half of a connection's write queue (OPEN, KEEPALIVE, NOTIFICATION: a
//! few small messages per session, which must never wait behind UPDATE data).

pub mod converge;
pub mod policy;
pub mod rib;
pub mod session;
pub mod speaker;
pub mod wire;
