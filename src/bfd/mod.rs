//! BFD, Bidirectional Forwarding Detection (RFC 5880 asynchronous mode, RFC 5881 single hop, RFC 5883
//! multihop): notices a dead BGP peer in a fraction of a second instead of at hold-timer expiry.
//!
//! ```text
//!   owner (node / reflector) ──BfdHandle::apply(Vec<BfdPeer>) / status──▶ ┌── bfd task (runner.rs) ──────────┐
//!                                                                         │ sessions: discriminator -> Session│
//!   UDP 3784/4784 (rx, one socket per family) ─────────────────────────▶  │ deadlines: BTreeSet<(Instant, d)> │
//!   UDP 49152-65535 -> peer:3784 (tx, one socket per session) ◀─────────  │ session.rs: pure state machine    │
//!                                                                         └──────────────┬───────────────────┘
//!   owner ◀── mpsc<BfdEvent::{Up, Down}> ──────────────────────────────────────────────┘
//!   (the owner turns a Down into an immediate reset of that peer's BGP session)
//! ```
//!
//! Owns the BFD sessions and their sockets; knows nothing of BGP (the owner wires a Down to the speaker).

pub mod packet;
pub mod runner;
pub mod session;

pub use packet::{ControlPacket, Diag, PacketError, State};
pub use runner::{spawn, BfdError, BfdEvent, BfdHandle, BfdPeer, BfdPorts, BfdReport};
pub use session::{Output, Session, Timers};
