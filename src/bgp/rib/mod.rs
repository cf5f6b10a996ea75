//! The RIB: Adj-RIB-In per peer, the Loc-RIB with the RFC 4271 9.1 decision process and ECMP sets, and the
//! Adj-RIB-Out per peer, with route reflection (RFC 4456) and the graceful-restart helper's stale handling
//! (RFC 4724 4.2).
//!
//! ```text
//!   peer tasks ──RibInput::Session{generation, ..}──▶ ┌──── RIB task (task.rs) ──────────────┐
//!     (PeerUp, Routes, EndOfRib, PeerDown)  (bounded)  │ Rib (core.rs, Sans-IO, one owner)    │──RibOutput (16 per session, filled
//!   speaker  ──PeerDown (peer removed)───────────────▶ │  tables: prefix → paths, best first  │   from its cursor)──▶ peer task
//!   node     ──Originate/WithdrawLocal/SetPolicy─────▶ │  attrs interned (Arc, hashed)        │──Vec<FibEvent>──▶ FIB task
//!   status   ──Query (oneshot)───────────────────────▶ │  per update group: export cache      │
//!                                                      │  one change log; per member a cursor │
//!                                                      └──────────────────────────────────────┘
//! ```
//!
//! What it owns: every route margay knows, in one task. It never touches the kernel or etcd: sessions
//! feed it decoded routes, it hands back per-peer updates grouped by attribute set (so the encoder packs many
//! prefixes per UPDATE) and ECMP next-hop sets for the FIB. The one socket operation it makes is through
//! the sessions' own [`DirectOut`]: queueing a shared UPDATE for an idle session and flushing it.
//!
//! Adj-RIB-In is stored inside the Loc-RIB: each prefix keeps the accepted paths of every peer, best first.
//! Adj-RIB-Out is *derived*: what peer P holds for prefix X is `export(P, best(X))`, a pure function of the best
//! path, the peers and the policy (`export.rs`). Diffing `export(P, old best)` against `export(P, new best)` gives
//! exactly the announcements and withdrawals to send, without keeping a second copy of a million prefixes per
//! peer; `Query::AdjRibOut` materialises it on demand.
//!
//! Fan-out: peers whose export settings agree (AS, next-hop mode, our addresses) form an update group and
//! share one export cache, so a reflector rewrites each attribute set once per group, not once per client;
//! the rewritten sets are interned, so every member's UPDATE carries the same `Arc`. The output is one
//! change log (`core/log.rs`, as FRR's update groups and BIRD's exports do) holding each prefix whose
//! export changed at most once, at its last change, with the update groups the change concerns; the
//! prefix's table entry knows where its log entry is, and every member holds only a cursor. When
//! a session's small output channel has room, the RIB task reads on from the cursor and sends each prefix
//! as its export is *then* (so repeated changes coalesce, and a withdrawal goes out when there is nothing
//! left to send); entries every member has read are trimmed. A client that stops reading therefore costs
//! at most one log entry per prefix, shared with everyone, and holds back nobody else; members at the
//! same place get equal messages, encoded once ([`SharedWire`]). A new session (or a route refresh) walks
//! the table in prefix order, then reads the log from the position it took when the walk began (changes
//! behind the walk come through the log), with End-of-RIB after its initial walk. A member that has read
//! the whole log and whose session is idle gets its one new message queued for its socket by the RIB
//! itself and written in a chunk of sessions, by the RIB or by its helper thread when a core is free
//! (`flush.rs`, [`DirectOut`]): a change reaching thousands of clients costs one write each, not a
//! wake-up of each session's task.
//!
//! Why the RIB task pumps (rather than each session reading a shared log under a lock): the log is only
//! meaningful next to the table it indexes, which the RIB task alone owns; the sessions stay plain
//! channel readers, and "has room" is the channel's free capacity, seen by the RIB (its only sender),
//! which pumps every session after each batch of inputs. A session it left behind (its channel full)
//! rings the RIB's bell with its slot when its channel has drained to half, and the RIB then serves just
//! the sessions that rang (`task::chan::Bell`): a session catching up costs its own work, not a look at
//! every session. A log entry also names the member a change did not concern (the route's source): that
//! member sends no withdrawal of a prefix it was never sent. Sessions with
//! ADD-PATH send keep a per-peer queue and dirty set: what they hold is a set of path ids per prefix,
//! which the log (prefixes only) cannot withdraw without knowing what was sent before.

mod chunkmap;
mod core;
mod decision;
mod export;
mod flush;
mod table;
mod task;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use ipnetwork::IpNetwork;
use tokio::sync::{mpsc, oneshot};

use crate::bgp::wire::{EncodeCtx, Family, Nlri, PathAttributes};

pub use self::core::Rib;
pub use self::decision::DEFAULT_LOCAL_PREF;
pub use self::task::{spawn, RibHandle};
pub use crate::bgp::policy::Policy;

/// Identifies a peer towards the RIB. Chosen by the caller (the speaker), stable across session restarts of
/// the same configured peer so graceful restart can find the stale routes again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PeerId(pub u32);

/// How the next hop is set on routes sent to a peer (Calico BGPPeer `nextHopMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NextHopMode {
    /// Keep the received next hop on routes reflected between iBGP peers; next hop self for routes learned
    /// over eBGP, for locally originated routes and towards eBGP peers (BIRD's default, Calico's `Auto`).
    #[default]
    Auto,
    /// Always our own address.
    SelfAddr,
    /// Never change the next hop (locally originated routes still get ours: they have none).
    Keep,
}

/// Graceful restart as the peer advertised it in its OPEN (RFC 4724 section 3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerGracefulRestart {
    /// How long to keep the peer's routes after its session drops (Restart Time).
    pub restart_time: Duration,
    /// Families for which the peer said it kept its forwarding state (F bit). On re-establishment, stale routes
    /// of a family without the bit are swept at once (RFC 4724 4.2).
    pub forwarding_preserved: Vec<Family>,
    /// Long-lived graceful restart (RFC 9494), set only when both sides advertised it next to graceful
    /// restart. None: the routes go when the restart time ends, and LLGR_STALE routes are never sent to
    /// this peer (RFC 9494 4.5).
    pub long_lived: Option<PeerLongLived>,
}

/// Long-lived graceful restart as negotiated with a peer (RFC 9494 3.1, 4.2).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerLongLived {
    /// Families whose routes are kept, marked LLGR_STALE, once the restart time has run out, and for how
    /// long (the peer's Long-Lived Stale Time, capped by ours). A family missing here, or with a zero time,
    /// is swept when the restart time ends.
    pub families: Vec<(Family, Duration)>,
    /// Families whose F bit was set in the LLGR capability: on re-establishment, long-lived stale routes of
    /// the other families are swept at once (RFC 9494 4.2).
    pub forwarding_preserved: Vec<Family>,
}

impl PeerGracefulRestart {
    /// The Long-Lived Stale Time of `family`, when it is kept long-lived at all.
    pub fn long_lived_time(&self, family: Family) -> Option<Duration> {
        self.long_lived
            .as_ref()?
            .families
            .iter()
            .find(|(f, t)| *f == family && !t.is_zero())
            .map(|(_, t)| *t)
    }
}

/// Everything the RIB needs to know about an established session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerInfo {
    /// The peer's AS (from its OPEN).
    pub asn: u32,
    /// Our AS on this session (Calico `localASNumber`, else the node's / global AS).
    pub local_asn: u32,
    /// The peer's BGP identifier.
    pub router_id: Ipv4Addr,
    /// The peer's address (transport), used as the last tie-break (RFC 4271 9.1.2.2 (g)).
    pub address: IpAddr,
    /// Our IPv4 address for next hop self on IPv4 routes (the session's local address when it is IPv4).
    pub local_v4: Option<Ipv4Addr>,
    /// Our IPv6 address for next hop self on IPv6 routes.
    pub local_v6: Option<Ipv6Addr>,
    /// The peer is a route-reflector client of ours (RFC 4456 section 6).
    pub rr_client: bool,
    pub next_hop_mode: NextHopMode,
    /// Set when the peer advertised graceful restart; None = its routes go when the session goes.
    pub graceful_restart: Option<PeerGracefulRestart>,
    /// Families negotiated (multiprotocol capability): only these are sent and accepted.
    pub families: Vec<Family>,
    /// Families for which ADD-PATH receive was negotiated (we may receive several paths per prefix).
    pub add_path_rx: Vec<Family>,
    /// Families for which ADD-PATH send was negotiated (RFC 7911): the peer gets every path of a prefix
    /// that export allows, each under its own path id, instead of the best one alone.
    pub add_path_tx: Vec<Family>,
    /// Max-prefix: accept at most this many prefixes from the peer; beyond it the RIB rejects them and tells the
    /// session to close with Cease / Maximum Number of Prefixes Reached (RFC 4486).
    pub max_prefixes: Option<u32>,
    /// BGPPeer `numAllowedLocalASNumbers`: how many times our own AS may appear in an eBGP path before it is
    /// a loop (BIRD's `allow local as`); 0 = none (RFC 4271 9.1.2).
    pub allow_local_as: u32,
}

impl PeerInfo {
    /// iBGP when the peer's AS is ours on this session (RFC 4271 section 3: internal peer).
    pub fn is_ibgp(&self) -> bool {
        self.asn == self.local_asn
    }
}

/// Input to the RIB task. Every variant is applied in arrival order.
#[derive(Debug)]
pub enum RibInput {
    /// A session reached Established. `out` receives this peer's updates: first the full table, then one
    /// End-of-RIB per negotiated family, then incremental changes. A PeerUp for a peer that is already up is
    /// treated as a non-graceful PeerDown followed by this PeerUp.
    PeerUp {
        peer: PeerId,
        info: PeerInfo,
        /// Bounded: the RIB sends into it only as far as it has room, reading on in the change log from
        /// the session's cursor when it has room again (see [`Rib::drain_dirty`]).
        out: crate::task::chan::Sender<RibOutput>,
        /// The session's socket, for the fan-out case: see [`DirectOut`]. None: everything goes through `out`.
        direct: Option<Arc<dyn DirectOut>>,
    },
    /// Routes from one UPDATE (or several sharing one attribute set). `attrs` carries the next hop
    /// (`next_hop` for IPv4, `mp_reach.next_hop` for other families); the RIB ignores any NLRI inside
    /// `mp_reach`/`mp_unreach`: the prefixes travel in `announced` and `withdrawn`.
    Routes {
        peer: PeerId,
        announced: Vec<Nlri>,
        attrs: Arc<PathAttributes>,
        withdrawn: Vec<Nlri>,
    },
    /// Withdrawals only (an UPDATE without NLRI, or a treat-as-withdraw per RFC 7606).
    Withdraw { peer: PeerId, withdrawn: Vec<Nlri> },
    /// The peer sent End-of-RIB for `family` (RFC 4724 section 2): sweep its stale routes of that family.
    EndOfRib { peer: PeerId, family: Family },
    /// The peer asked for our routes of `family` again (ROUTE-REFRESH, RFC 2918 4): its Adj-RIB-Out for that
    /// family is sent once more. No End-of-RIB follows (that is RFC 7313's enhanced refresh, not negotiated).
    RouteRefresh { peer: PeerId, family: Family },
    /// The session left Established. `graceful`: the session dropped in a way that lets graceful restart keep
    /// the routes (TCP failure, hold timer, or a NOTIFICATION under RFC 8538) *and* the peer advertised GR.
    PeerDown { peer: PeerId, graceful: bool },
    /// Locally originated routes (e.g. the node's blocks). `attrs` may leave ORIGIN/AS_PATH empty: the RIB
    /// fills ORIGIN IGP and an empty AS_PATH.
    Originate {
        prefixes: Vec<IpNetwork>,
        attrs: Arc<PathAttributes>,
    },
    /// Withdraw locally originated routes.
    WithdrawLocal { prefixes: Vec<IpNetwork> },
    /// Replace the policy. Export changes are applied at once (the difference is announced/withdrawn to every
    /// peer); import changes apply to routes received from now on.
    SetPolicy(Arc<Policy>),
    /// Change the route-reflector cluster id (RFC 4456 section 7; None: the router id). Applies to routes
    /// reflected from now on; the owner restarts the sessions whose client role changed, which re-sends them.
    SetClusterId(Option<Ipv4Addr>),
    /// Defer route selection towards peers until `until` or [`RibInput::EndDeferral`], whichever comes
    /// first (RFC 4724 4.1, for a speaker that restarted): routes are received and selected as usual, but
    /// nothing is sent to any peer, not even the initial table or End-of-RIB, so no peer sweeps the stale
    /// routes it kept for us on a table that lacks what our other peers have not re-sent yet.
    DeferSelection { until: std::time::Instant },
    /// Deferral over: every Established peer gets the whole table, then End-of-RIB.
    EndDeferral,
    /// Read-only questions, answered through the oneshot.
    Query(Query),
    /// Input straight from one Established session of a peer (its peer task sends it; the speaker is not
    /// in the path). `generation` numbers the sessions of the peer: a `PeerUp` records it, anything else is
    /// applied only while it is the peer's current one, so a late batch of a session that has since gone
    /// down and come back is dropped, never mixed into the new session's routes.
    Session {
        generation: u64,
        input: Box<RibInput>,
    },
}

impl RibInput {
    /// The peer a session's input is about (None for inputs that are not a session's).
    pub fn session_peer(&self) -> Option<PeerId> {
        match self {
            RibInput::PeerUp { peer, .. }
            | RibInput::Routes { peer, .. }
            | RibInput::Withdraw { peer, .. }
            | RibInput::EndOfRib { peer, .. }
            | RibInput::RouteRefresh { peer, .. }
            | RibInput::PeerDown { peer, .. } => Some(*peer),
            _ => None,
        }
    }

    /// [`RibInput::from_update`], or nothing for an empty UPDATE, or a plain `Withdraw` when nothing is
    /// announced.
    pub fn from_received(peer: PeerId, update: crate::bgp::wire::Update) -> Option<RibInput> {
        match RibInput::from_update(peer, update) {
            RibInput::Routes {
                announced,
                withdrawn,
                ..
            } if announced.is_empty() && withdrawn.is_empty() => None,
            RibInput::Routes {
                announced,
                withdrawn,
                ..
            } if announced.is_empty() => Some(RibInput::Withdraw { peer, withdrawn }),
            other => Some(other),
        }
    }

    /// The RIB input for one decoded UPDATE: IPv4 NLRI and MP_REACH NLRI are announced with the UPDATE's
    /// attributes (each family finds its next hop there), withdrawn routes and MP_UNREACH NLRI are withdrawn.
    /// End-of-RIB markers should be sent as [`RibInput::EndOfRib`] instead.
    pub fn from_update(peer: PeerId, update: crate::bgp::wire::Update) -> RibInput {
        let crate::bgp::wire::Update {
            mut withdrawn,
            mut attributes,
            nlri,
        } = update;
        let mut announced = nlri;
        if let Some(m) = attributes.mp_reach.as_mut() {
            announced.append(&mut m.nlri);
        }
        if let Some(u) = attributes.mp_unreach.take() {
            withdrawn.extend(u.withdrawn);
        }
        RibInput::Routes {
            peer,
            announced,
            attrs: Arc::new(attributes),
            withdrawn,
        }
    }
}

/// Questions for the RIB (status, tests, the CLI).
#[derive(Debug)]
pub enum Query {
    /// Per-peer counters and table sizes.
    Summary(oneshot::Sender<RibSummary>),
    /// Every path held for one prefix, best first.
    Prefix {
        prefix: IpNetwork,
        reply: oneshot::Sender<Vec<PathView>>,
    },
    /// The best path of every prefix of a family.
    LocRib {
        family: Family,
        reply: oneshot::Sender<Vec<RouteView>>,
    },
    /// What the peer holds from us (Adj-RIB-Out) for a family: prefix and the attributes as sent.
    AdjRibOut {
        peer: PeerId,
        family: Family,
        reply: oneshot::Sender<Vec<(IpNetwork, Arc<PathAttributes>)>>,
    },
}

/// Output to one peer's session. Within one `Updates`, every prefix shares `attrs` (already rewritten for this
/// peer: AS prepended, next hop set, reflection attributes added), so the encoder can pack them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RibOutput {
    /// Announce `nlri` with `attrs`. The next hop is in `attrs.next_hop` (IPv4) or `attrs.mp_reach.next_hop`
    /// (other families; `mp_reach.nlri` is empty: the encoder moves `nlri` there).
    Updates {
        family: Family,
        attrs: Arc<PathAttributes>,
        nlri: Vec<Nlri>,
        /// The encoded UPDATEs, shared by every member of the update group that got this same message.
        wire: SharedWire,
    },
    /// Withdraw `nlri`.
    Withdraw {
        family: Family,
        nlri: Vec<Nlri>,
        /// As for `Updates`.
        wire: SharedWire,
    },
    /// The initial table of `family` has been sent in full (RFC 4724 section 2).
    EndOfRib(Family),
    /// The peer sent more prefixes than its `max_prefixes`; the session should send NOTIFICATION Cease /
    /// Maximum Number of Prefixes Reached (RFC 4486 subcode 1) and close.
    MaxPrefixExceeded { limit: u32 },
}

/// An Established session's socket, to which the RIB may hand one shared UPDATE itself: the fan-out
/// case, where a change reaches thousands of idle sessions and waking each one's task to copy the same
/// bytes to its socket costs more than the write. Order is kept by two counts: the RIB numbers the
/// messages it sends through the session's output channel, and the session counts those it has taken
/// and queued for its socket ([`DirectOut::done`]). The RIB queues itself only when the two agree (the
/// session holds nothing of ours) and [`DirectOut::try_queue`] finds nothing queued for the socket;
/// otherwise the message goes through the channel as usual. The RIB queues such sessions
/// ([`DirectOut::try_queue`]) in chunks of a few dozen, which it and a helper thread take oldest first
/// and write ([`DirectOut::flush`]); the RIB writes what is left when the change is done, so the writes
/// of one change use two cores when one is free and never wait for the helper. Without a helper the RIB
/// flushes each session as soon as it has queued it.
pub trait DirectOut: Send + Sync {
    /// The encoding the session negotiated.
    fn ctx(&self) -> &EncodeCtx;
    /// How many messages of the output channel the session has taken and queued (or dropped).
    fn done(&self) -> u64;
    /// Queue `bytes` (whole UPDATE messages) for the socket, for [`DirectOut::flush`], if nothing is
    /// queued ahead of them, without waking the session's writer. False: nothing done, something is
    /// queued; send it through the channel.
    fn try_queue(&self, bytes: &Bytes) -> bool;
    /// Write what is queued, unless the session's writer is at it (what the socket does not take is
    /// left to the writer).
    fn flush(&self);
}

impl std::fmt::Debug for dyn DirectOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectOut")
    }
}

/// The wire form of one [`RibOutput`], shared by the sessions that receive the same message from one RIB
/// step (a route reflected to every client of an update group): the first session writer that needs it
/// encodes it, every other one sends the same bytes (FRR's and GoBGP's update groups do the same). The
/// bytes are kept with the encoding context they were made for; a member that negotiated differently
/// (2-octet AS, ADD-PATH, extended messages) encodes its own. Not part of the message's value: `==`
/// ignores it, and [`SharedWire::none`] is a message of one peer.
#[derive(Clone, Default)]
pub struct SharedWire(Option<Arc<OnceLock<(EncodeCtx, Bytes)>>>);

impl SharedWire {
    /// Not shared: the session encodes it for itself.
    pub fn none() -> SharedWire {
        SharedWire(None)
    }

    /// A slot for bytes that several sessions will send.
    pub fn shared() -> SharedWire {
        SharedWire(Some(Arc::new(OnceLock::new())))
    }

    pub fn is_shared(&self) -> bool {
        self.0.is_some()
    }

    /// The bytes another member encoded under the same context, if any.
    pub fn get(&self, ctx: &EncodeCtx) -> Option<Bytes> {
        let (c, b) = self.0.as_ref()?.get()?;
        (c == ctx).then(|| b.clone())
    }

    /// The bytes another member encoded under `ctx`, or else `encode`'s, offered to the others.
    pub fn get_or_encode<E>(
        &self,
        ctx: &EncodeCtx,
        encode: impl FnOnce(&mut bytes::BytesMut) -> Result<(), E>,
    ) -> Result<Bytes, E> {
        if let Some(b) = self.get(ctx) {
            return Ok(b);
        }
        let mut own = bytes::BytesMut::new();
        encode(&mut own)?;
        let b = own.freeze();
        self.offer(ctx, &b);
        Ok(b)
    }

    /// Offer bytes encoded under `ctx` to the other members (the first offer wins).
    pub fn offer(&self, ctx: &EncodeCtx, bytes: &Bytes) {
        if let Some(cell) = &self.0 {
            // Already set by another member: theirs is kept, ours is sent by us alone.
            let _ = cell.set((ctx.clone(), bytes.clone()));
        }
    }
}

impl PartialEq for SharedWire {
    fn eq(&self, _: &SharedWire) -> bool {
        true
    }
}

impl Eq for SharedWire {}

impl std::fmt::Debug for SharedWire {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_shared() { "shared" } else { "own" })
    }
}

/// A change of the ECMP next-hop set of a prefix, for the FIB task. Only routes learned from peers appear:
/// locally originated routes are the node's own business.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FibEvent {
    /// Install or replace: `next_hops` is the sorted, deduplicated set of next hops of the ECMP set.
    Set {
        prefix: IpNetwork,
        next_hops: Vec<IpAddr>,
    },
    /// No route from a peer any more.
    Remove { prefix: IpNetwork },
}

/// Where a path came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathSource {
    Local,
    Peer(PeerId),
}

/// One path as a query sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathView {
    pub source: PathSource,
    /// The peer's address (None for local routes).
    pub peer_address: Option<IpAddr>,
    pub path_id: u32,
    pub attrs: Arc<PathAttributes>,
    pub best: bool,
    /// Member of the ECMP set (the best path is always a member).
    pub ecmp: bool,
    /// Kept across a graceful restart of its peer, waiting for End-of-RIB or the restart time.
    pub stale: bool,
    /// Carries the LLGR_STALE community (RFC 9494 4.3): kept by us, or by a peer, past a restart time;
    /// least preferred.
    pub llgr_stale: bool,
}

/// One Loc-RIB entry as a query sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteView {
    pub prefix: IpNetwork,
    pub best: PathView,
    /// Number of paths in the ECMP set (1 = no multipath).
    pub ecmp_paths: usize,
}

/// Counters per peer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerCounters {
    pub peer: Option<PeerId>,
    pub address: Option<IpAddr>,
    pub up: bool,
    /// Prefixes received in UPDATEs (announcements) since the session came up.
    pub received: u64,
    /// Paths held now (accepted by import policy), including stale ones.
    pub accepted: u64,
    /// Stale paths held now (graceful restart), including the long-lived stale ones.
    pub stale: u64,
    /// Of the stale paths, those in the long-lived phase, marked LLGR_STALE (RFC 9494 4.2).
    pub llgr_stale: u64,
    /// Prefixes the peer holds from us now (paths, on an ADD-PATH send session: one per path).
    pub advertised: u64,
    /// Announcements rejected by import rules (loops, policy, max-prefix).
    pub rejected: u64,
}

/// Table sizes and per-peer counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RibSummary {
    pub ipv4_prefixes: usize,
    pub ipv6_prefixes: usize,
    /// Distinct attribute sets held (interned).
    pub attribute_sets: usize,
    pub local_prefixes: usize,
    pub peers: Vec<PeerCounters>,
}

/// The node's (or reflector's) identity as the RIB needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RibConfig {
    /// Default local AS (each session may override it in `PeerInfo::local_asn`).
    pub local_asn: u32,
    /// Our BGP identifier (ORIGINATOR_ID loop check, RFC 4456 section 8).
    pub router_id: Ipv4Addr,
    /// Our cluster id (Calico `routeReflectorClusterID`); None = the router id (RFC 4456 section 7) when we
    /// reflect at all.
    pub cluster_id: Option<Ipv4Addr>,
    /// How long stale routes may wait for End-of-RIB after the restarting peer is back (RFC 4724 4.2 allows a
    /// local upper bound); FRR's stale-path time is 360 s.
    pub stale_routes_time: Duration,
    /// Maximum prefixes per `RibOutput` message; larger groups are split (bounds the size of each message).
    pub max_batch: usize,
}

impl RibConfig {
    pub fn new(local_asn: u32, router_id: Ipv4Addr) -> RibConfig {
        RibConfig {
            local_asn,
            router_id,
            cluster_id: None,
            stale_routes_time: Duration::from_secs(360),
            max_batch: 4096,
        }
    }

    /// The cluster id used in CLUSTER_LIST and its loop check.
    pub fn effective_cluster_id(&self) -> Ipv4Addr {
        self.cluster_id.unwrap_or(self.router_id)
    }
}

/// The family of a prefix (unicast).
pub fn family_of(prefix: &IpNetwork) -> Family {
    match prefix {
        IpNetwork::V4(_) => Family::IPV4_UNICAST,
        IpNetwork::V6(_) => Family::IPV6_UNICAST,
    }
}

/// The supervisor's heartbeat through the RIB task's inbox: a summary query answered means the task is alive
/// and not stuck. The error says which of the two failed.
pub async fn heartbeat(rib: &mpsc::Sender<RibInput>) -> Result<(), String> {
    let (tx, rx) = oneshot::channel();
    rib.send(RibInput::Query(Query::Summary(tx)))
        .await
        .map_err(|_| "inbox closed".to_string())?;
    rx.await.map(|_| ()).map_err(|_| "no answer".to_string())
}
