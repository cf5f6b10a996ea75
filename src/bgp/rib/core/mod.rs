//! The Sans-IO RIB: every route margay knows and every rule that moves them, with no task, socket or clock of
//! its own. [`Rib::handle`] applies one [`RibInput`]; outputs go to the per-peer senders given at `PeerUp` (or,
//! for an idle session, through its [`DirectOut`], the session's own code) and to
//! [`Rib::take_fib_events`]; timers are [`Rib::next_deadline`] / [`Rib::on_timer`]. `task.rs` drives it.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use crate::task::chan::{self, TrySendError};
use ipnetwork::IpNetwork;

use super::chunkmap::ChunkMap;
use super::decision::{self, Kind, SourceMeta};
use super::export::{self, ExportSource, ExportTarget};
use super::table::{
    Dest, Path, PrefixKey, Tables, V4Key, V6Key, FLAG_LLGR, FLAG_STALE, LOCAL_SLOT,
};
use super::{
    family_of, DirectOut, FibEvent, NextHopMode, PathSource, PathView, PeerCounters, PeerId,
    PeerInfo, Policy, Query, RibConfig, RibInput, RibOutput, RibSummary, RouteView, SharedWire,
};
use crate::bgp::wire::{
    encode_updates, encode_withdrawals, AsPath, AsSegment, Family, Nlri, Origin, PathAttributes,
    LLGR_STALE, NO_LLGR,
};

mod log;
mod output;
mod peers;

use log::{group_bit, ChangeLog, Entry, Quiet, Walk, NO_QUIET};

#[allow(unused_imports)]
use peers::*;

type ExportKey = (usize, u16, bool);
type ExportCache = HashMap<ExportKey, (Arc<PathAttributes>, Option<Arc<PathAttributes>>), FastHash>;

/// What decides the attributes a target receives for a path (`export::rewrite`): targets that agree on
/// these form one update group and share one export cache, so a reflector with a thousand clients rewrites
/// each (attribute set, source) once, not once per client (FRR's and GoBGP's update groups). Whether a path
/// goes to a target at all (split horizon, RFC 4456 6) is still decided per target: it is cheap.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct GroupKey {
    kind: Kind,
    local_asn: u32,
    next_hop_mode: NextHopMode,
    local_v4: Option<Ipv4Addr>,
    local_v6: Option<Ipv6Addr>,
}

impl GroupKey {
    fn of(kind: Kind, info: &PeerInfo) -> GroupKey {
        GroupKey {
            kind,
            local_asn: info.local_asn,
            next_hop_mode: info.next_hop_mode,
            local_v4: info.local_v4,
            local_v6: info.local_v6,
        }
    }
}

/// One update group: the rewritten attribute sets its members share. Its members read their output from
/// the RIB's change log, whose entries name the groups they concern (a peer with ADD-PATH send is in a
/// group for the cache but keeps its own queue).
#[derive(Debug, Default)]
struct Group {
    cache: ExportCache,
}

/// The hasher of the hot per-prefix maps (keys are pointers and small integers the RIB makes itself):
/// SipHash's DoS resistance buys nothing here and costs a third of an export; foldhash is the crate's fast
/// hasher (the FIB uses it too).
type FastHash = foldhash::fast::FixedState;

/// Per-peer output collected while one input is applied, grouped by (rewritten) attribute set.
#[derive(Debug, Default)]
struct Pending {
    groups: Vec<(Family, Arc<PathAttributes>, Vec<Nlri>)>,
    index: HashMap<usize, usize, FastHash>,
    /// The group the previous prefix went to: consecutive prefixes of one UPDATE share it.
    last: Option<(usize, usize)>,
    withdrawn: Vec<(Family, Vec<Nlri>)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.withdrawn.is_empty()
    }
}

/// An Established session's output channel, the number of messages sent into it, and the session's
/// socket for the RIB's own writes ([`DirectOut`]).
#[derive(Debug)]
struct Out {
    tx: chan::Sender<RibOutput>,
    sent: u64,
    direct: Option<Arc<dyn DirectOut>>,
}

impl Out {
    fn try_send(&mut self, msg: RibOutput) -> Result<(), TrySendError<RibOutput>> {
        self.tx.try_send(msg)?;
        self.sent += 1;
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.tx.capacity()
    }

    /// The session holds nothing the RIB sent it: a message written to its socket now goes out after
    /// everything before it.
    fn direct_ok(&self) -> Option<&Arc<dyn DirectOut>> {
        self.direct.as_ref().filter(|d| d.done() == self.sent)
    }
}

#[derive(Debug)]
struct Slot {
    id: Option<PeerId>,
    in_use: bool,
    info: PeerInfo,
    kind: Kind,
    up: bool,
    out: Option<Out>,
    /// Prefixes whose current export this peer still has to get: filled instead of the channel once the
    /// channel is full (a slow session), drained when it has room. A prefix that changes ten times while
    /// the peer is slow is sent once, as it is then, so a stalled peer costs at most one entry per prefix.
    /// Keyed by prefix and the path id it goes out under (0 unless ADD-PATH send is negotiated).
    dirty: HashSet<Nlri>,
    /// End-of-RIB markers and the max-prefix signal held back until `dirty` is drained, to keep their order.
    dirty_tail: Vec<RibOutput>,
    /// Index into `State::groups`: the update group whose export cache this peer uses and whose log
    /// entries it reads (0: none yet).
    group: usize,
    /// How far this peer has read the change log (see `log.rs`); meaningful while `up` and not
    /// walking. Unused on an ADD-PATH send session, which keeps the per-peer queue (`pending`, `dirty`).
    cursor: u64,
    /// The table walk of a new session or a route refresh, while it lasts.
    walk: Option<Walk>,
    /// Behind in the log or walking, as of its last pump (counted in `State::behind`).
    behind: bool,
    /// The session generation of the last `PeerUp` (0 when it came without one).
    generation: u64,
    counters: PeerCounters,
    /// Restart timer while down, stale-routes timer while up and waiting for End-of-RIB (RFC 4724 4.2).
    deadline: Option<Instant>,
    stale_families: Vec<Family>,
    /// Long-Lived Stale Time timers, one per family in the long-lived phase (RFC 9494 4.2). They run
    /// whether the peer is up or down and are not restarted by further flaps: a family leaves this list
    /// only at its End-of-RIB (the peer is synchronised again) or when its time runs out.
    llgr_until: Vec<(Family, Instant)>,
    pending: Pending,
    max_prefix_signalled: bool,
}

impl Slot {
    fn new(info: PeerInfo, kind: Kind) -> Slot {
        Slot {
            id: None,
            in_use: true,
            info,
            kind,
            up: false,
            out: None,
            dirty: HashSet::new(),
            dirty_tail: Vec::new(),
            group: 0,
            cursor: 0,
            walk: None,
            behind: false,
            generation: 0,
            counters: PeerCounters::default(),
            deadline: None,
            stale_families: Vec::new(),
            llgr_until: Vec::new(),
            pending: Pending::default(),
            max_prefix_signalled: false,
        }
    }
}

/// Everything but the tables, so table iteration and state updates borrow disjoint fields.
#[derive(Debug)]
struct State {
    cfg: RibConfig,
    policy: Arc<Policy>,
    slots: Vec<Slot>,
    /// Update groups (index 0 is unused: the local slot never receives).
    groups: Vec<Group>,
    /// The change log every log-reading session reads its output from (`log.rs`).
    log: ChangeLog,
    /// Slots with `behind` set: sessions with more to read than their channels took.
    behind: usize,
    /// Sessions with bytes the RIB queued itself, not yet flushed ([`State::hand_flushes`]).
    flushes: Vec<Arc<dyn DirectOut>>,
    /// Chunks of `flushes` shared with the helper thread (none: the RIB writes at once, alone).
    flusher: Option<Arc<super::flush::FlushQueue>>,
    group_ids: HashMap<GroupKey, usize>,
    /// Slots with a non-empty `dirty` set or `dirty_tail`.
    dirty_slots: Vec<u16>,
    by_id: HashMap<PeerId, u16>,
    free: Vec<u16>,
    interner: HashSet<Arc<PathAttributes>>,
    gc_threshold: usize,
    fib_enabled: bool,
    fib: Vec<FibEvent>,
    /// Up sessions with ADD-PATH send negotiated for some family: while there are none, a change that
    /// leaves the best path alone is nobody's business and `settle` returns early.
    add_path_peers: usize,
    /// Route selection deferred towards peers until then (RFC 4724 4.1): nothing is sent to any peer.
    deferring: Option<Instant>,
    /// Log entries a member is reading (`Rib::log_step`), kept between reads so reading costs no
    /// allocation per message.
    log_read: Vec<Entry>,
}

/// The RIB. One owner (the RIB task); see the module docs of `bgp::rib`.
#[derive(Debug)]
pub struct Rib {
    tables: Tables,
    st: State,
    /// Rung by a session's output channel, with its slot, when its receiver has drained it to half: a
    /// session the RIB left behind has room again ([`Rib::room_bell`]).
    room: Arc<chan::Bell>,
}

fn local_info(cfg: &RibConfig) -> PeerInfo {
    PeerInfo {
        asn: cfg.local_asn,
        local_asn: cfg.local_asn,
        router_id: cfg.router_id,
        address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        local_v4: None,
        local_v6: None,
        rr_client: false,
        next_hop_mode: Default::default(),
        graceful_restart: None,
        families: Vec::new(),
        add_path_rx: Vec::new(),
        add_path_tx: Vec::new(),
        max_prefixes: None,
        allow_local_as: 0,
    }
}

impl Drop for State {
    /// The flusher thread ends with the RIB.
    fn drop(&mut self) {
        if let Some(q) = &self.flusher {
            q.close();
        }
    }
}

impl Rib {
    /// A RIB with no peers. `fib`: whether to compute [`FibEvent`]s (a reflector has no FIB).
    pub fn new(cfg: RibConfig, policy: Arc<Policy>, fib: bool) -> Rib {
        let local = Slot::new(local_info(&cfg), Kind::Local);
        Rib {
            tables: Tables::default(),
            st: State {
                cfg,
                policy,
                slots: vec![local],
                groups: vec![Group::default()],
                group_ids: HashMap::new(),
                dirty_slots: Vec::new(),
                by_id: HashMap::new(),
                free: Vec::new(),
                interner: HashSet::new(),
                gc_threshold: 1024,
                fib_enabled: fib,
                fib: Vec::new(),
                add_path_peers: 0,
                deferring: None,
                log_read: Vec::new(),
                log: ChangeLog::default(),
                behind: 0,
                flushes: Vec::new(),
                flusher: None,
            },
            room: Arc::new(chan::Bell::new()),
        }
    }

    /// The queue the RIB shares with its helper thread for direct writes (`flush.rs`); without one, the
    /// RIB flushes each session as soon as it has queued it.
    pub fn set_flusher(&mut self, q: Arc<super::flush::FlushQueue>) {
        self.st.flusher = Some(q);
    }

    /// What the RIB task waits on: sessions that were behind have room again; it hands their tokens
    /// to [`Rib::drain_ready`].
    pub fn room_bell(&self) -> Arc<chan::Bell> {
        self.room.clone()
    }

    /// Apply one input. `now` drives the graceful-restart timers.
    pub fn handle(&mut self, input: RibInput, now: Instant) {
        self.apply(input, now);
        self.st.flush_all();
        self.drain_dirty();
        self.st.maybe_gc();
    }

    /// Apply several inputs, then hand the sessions their output once: a session that has room gets the
    /// changes of the whole batch in one go (one wake-up of its writer, one batch of UPDATEs) instead of
    /// one message per input. The RIB task passes what is waiting in its inbox.
    pub fn handle_batch(&mut self, inputs: impl IntoIterator<Item = RibInput>, now: Instant) {
        for input in inputs {
            self.apply(input, now);
            // Per input: the ADD-PATH send queues group by attribute set within one input.
            self.st.flush_all();
        }
        self.drain_dirty();
        self.st.maybe_gc();
    }

    fn apply(&mut self, input: RibInput, now: Instant) {
        match input {
            RibInput::Session { generation, input } => {
                let Some(peer) = input.session_peer() else {
                    return;
                };
                if matches!(*input, RibInput::PeerUp { .. }) {
                    self.apply(*input, now);
                    if let Some(slot) = self.st.by_id.get(&peer).copied() {
                        self.st.slots[slot as usize].generation = generation;
                    }
                    return;
                }
                let current = self
                    .st
                    .by_id
                    .get(&peer)
                    .map(|s| self.st.slots[*s as usize].generation);
                if current == Some(generation) {
                    self.apply(*input, now);
                } else {
                    tracing::debug!(
                        ?peer,
                        generation,
                        ?current,
                        "input of an earlier session: dropped"
                    );
                }
            }
            RibInput::PeerUp {
                peer,
                info,
                out,
                direct,
            } => self.peer_up(peer, info, out, direct, now),
            RibInput::Routes {
                peer,
                announced,
                attrs,
                withdrawn,
            } => self.routes(peer, announced, attrs, withdrawn),
            RibInput::Withdraw { peer, withdrawn } => {
                if let Some(slot) = self.up_slot(peer) {
                    for n in withdrawn {
                        self.remove_path(slot, n.prefix, n.path_id);
                    }
                }
            }
            RibInput::EndOfRib { peer, family } => self.end_of_rib(peer, family),
            RibInput::RouteRefresh { peer, family } => self.route_refresh(peer, family),
            RibInput::PeerDown { peer, graceful } => self.peer_down(peer, graceful, now),
            RibInput::Originate { prefixes, attrs } => self.originate(prefixes, attrs),
            RibInput::WithdrawLocal { prefixes } => {
                for p in prefixes {
                    self.remove_path(LOCAL_SLOT, p, 0);
                }
            }
            RibInput::SetPolicy(policy) => self.set_policy(policy),
            RibInput::SetClusterId(id) => self.st.cfg.cluster_id = id,
            RibInput::DeferSelection { until } => {
                tracing::info!(
                    in_ms = until.saturating_duration_since(now).as_millis() as u64,
                    "graceful restart: route selection deferred until the peers have sent End-of-RIB"
                );
                self.st.deferring = Some(until);
            }
            RibInput::EndDeferral => self.end_deferral("every peer is back"),
            RibInput::Query(q) => self.query(q),
        }
    }

    /// The earliest graceful-restart timer (restart time, stale-routes time, Long-Lived Stale Time), if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.st
            .slots
            .iter()
            .filter(|s| s.in_use)
            .flat_map(|s| {
                s.deadline
                    .into_iter()
                    .chain(s.llgr_until.iter().map(|(_, t)| *t))
            })
            .chain(self.st.deferring)
            .min()
    }

    /// Whether route selection is still deferred towards peers (RFC 4724 4.1).
    pub fn deferring(&self) -> bool {
        self.st.deferring.is_some()
    }

    /// End the deferral: every Established peer gets the whole table and End-of-RIB, as a new session would.
    fn end_deferral(&mut self, why: &str) {
        if self.st.deferring.take().is_none() {
            return;
        }
        let mut sent = 0;
        for slot in 1..self.st.slots.len() as u16 {
            let s = &self.st.slots[slot as usize];
            if s.in_use && s.up && slot != LOCAL_SLOT {
                self.dump_table(slot);
                sent += 1;
            }
        }
        tracing::info!(
            peers = sent,
            "graceful restart: route selection deferral over ({why}): tables and End-of-RIB sent"
        );
    }

    /// Fire the graceful-restart timers due at `now`. A down peer's restart time ending starts the
    /// long-lived phase for its families that negotiated it and sweeps the others (RFC 4724 4.2, RFC 9494
    /// 4.2); a Long-Lived Stale Time ending sweeps that family; the stale-routes time of a peer that came
    /// back without sending End-of-RIB sweeps all of its stale routes.
    pub fn on_timer(&mut self, now: Instant) {
        if self.st.deferring.is_some_and(|d| d <= now) {
            self.end_deferral("the deferral time ran out");
        }
        for slot in 0..self.st.slots.len() as u16 {
            let s = &mut self.st.slots[slot as usize];
            let fired =
                s.deadline.is_some_and(|d| d <= now) || s.llgr_until.iter().any(|(_, t)| *t <= now);
            if !s.in_use || slot == LOCAL_SLOT || !fired {
                continue;
            }
            if let Some(due) = s.deadline.filter(|d| *d <= now) {
                s.deadline = None;
                if s.up {
                    s.stale_families.clear();
                    s.llgr_until.clear();
                    tracing::info!(peer = ?s.info.address, "graceful restart: no End-of-RIB within the stale-routes time, sweeping stale routes");
                    self.sweep_stale(slot, None);
                } else {
                    // Timed from when the restart time ended, not from when the timer was looked at.
                    self.enter_long_lived(slot, due);
                }
            }
            let s = &mut self.st.slots[slot as usize];
            let expired: Vec<Family> = s
                .llgr_until
                .iter()
                .filter(|(_, t)| *t <= now)
                .map(|(f, _)| *f)
                .collect();
            for f in expired {
                let s = &mut self.st.slots[slot as usize];
                s.llgr_until.retain(|(g, _)| *g != f);
                s.stale_families.retain(|g| *g != f);
                tracing::info!(peer = ?s.info.address, family = %f, "long-lived graceful restart: stale time over, sweeping the long-lived stale routes");
                self.sweep_stale(slot, Some(f));
            }
            let s = &self.st.slots[slot as usize];
            if !s.up && s.deadline.is_none() && s.llgr_until.is_empty() {
                // Nothing keeps the peer's routes any more.
                self.sweep_stale(slot, None);
                self.st.free_slot(slot);
            }
        }
        self.st.flush_all();
        self.drain_dirty();
        self.st.maybe_gc();
    }

    /// True while some peer is owed output its channel had no room for: a session behind in the change
    /// log or walking the table, or an ADD-PATH send session with a dirty set
    /// ([`Rib::drain_dirty`]).
    pub fn has_dirty(&self) -> bool {
        !self.st.dirty_slots.is_empty() || self.st.log_backlog()
    }

    /// Send what peers are owed, as far as their channels have room: each session its table walk and the
    /// change log after its cursor (`log.rs`); each ADD-PATH send session its dirty prefixes, as of
    /// now (an announcement, or a withdrawal when there is nothing to send any more), grouped by attribute
    /// set, then its held-back markers. The RIB task calls this after every input and, while
    /// [`Rib::has_dirty`], whenever the [`Rib::room_bell`] rings.
    pub fn drain_dirty(&mut self) {
        if !self.st.dirty_slots.is_empty() {
            self.drain_queues();
        }
        self.pump_logs();
    }

    /// Serve the sessions whose channels rang the [`Rib::room_bell`] (their tokens, in any order, maybe
    /// repeated): the ADD-PATH queues and these sessions' walks and logs, as far as they have room. Only
    /// these: a session that catches up costs the RIB its own work, not a look at every session.
    pub fn drain_ready(&mut self, mut tokens: Vec<usize>) {
        if !self.st.dirty_slots.is_empty() {
            self.drain_queues();
        }
        tokens.sort_unstable();
        tokens.dedup();
        self.pump_slots(tokens.into_iter().filter_map(|t| u16::try_from(t).ok()));
    }

    fn drain_queues(&mut self) {
        let slots = std::mem::take(&mut self.st.dirty_slots);
        let policy = self.st.policy.clone();
        let max = self.st.cfg.max_batch.max(1);
        for t in slots {
            loop {
                let s = &mut self.st.slots[t as usize];
                let room = match &s.out {
                    Some(out) if s.up => out.capacity(),
                    _ => {
                        s.dirty.clear();
                        s.dirty_tail.clear();
                        break;
                    }
                };
                if room == 0 {
                    break;
                }
                if s.dirty.is_empty() {
                    // Markers go out in order once every prefix before them is out.
                    while let Some(m) = s.dirty_tail.first() {
                        let Some(out) = &mut s.out else { break };
                        match out.try_send(m.clone()) {
                            Ok(()) => {
                                s.dirty_tail.remove(0);
                            }
                            Err(_) => break,
                        }
                    }
                    break;
                }
                // Fill at most the room there is: one message per attribute set, at most `max` prefixes.
                let batch: Vec<Nlri> = s.dirty.iter().take(max * room).copied().collect();
                for n in &batch {
                    s.dirty.remove(n);
                }
                let mut msgs: Vec<RibOutput> = Vec::new();
                let mut groups: HashMap<usize, usize, FastHash> = HashMap::default();
                let mut withdrawn: HashMap<Family, usize> = HashMap::new();
                for nlri in batch {
                    let prefix = nlri.prefix;
                    let family = family_of(&prefix);
                    let attrs = match self.tables.get(&prefix) {
                        None => None,
                        // ADD-PATH send: the path going out under this id, if it still exists.
                        Some(d) if self.st.multi(t, family) => self
                            .st
                            .export_all(t, &prefix, d.paths(), &policy)
                            .into_iter()
                            .find(|(id, _)| *id == nlri.path_id)
                            .map(|(_, a)| a),
                        Some(d) => self.st.export(t, &prefix, d.best(), &policy),
                    };
                    match attrs {
                        Some(a) => {
                            let i = *groups.entry(Arc::as_ptr(&a) as usize).or_insert_with(|| {
                                msgs.push(RibOutput::Updates {
                                    family,
                                    attrs: a.clone(),
                                    nlri: Vec::new(),
                                    wire: SharedWire::none(),
                                });
                                msgs.len() - 1
                            });
                            if let RibOutput::Updates { nlri: v, .. } = &mut msgs[i] {
                                v.push(nlri);
                            }
                        }
                        None => {
                            let i = *withdrawn.entry(family).or_insert_with(|| {
                                msgs.push(RibOutput::Withdraw {
                                    family,
                                    nlri: Vec::new(),
                                    wire: SharedWire::none(),
                                });
                                msgs.len() - 1
                            });
                            if let RibOutput::Withdraw { nlri: v, .. } = &mut msgs[i] {
                                v.push(nlri);
                            }
                        }
                    }
                }
                let s = &mut self.st.slots[t as usize];
                for m in msgs {
                    let full = match (&mut s.out, m) {
                        (Some(out), m) => match out.try_send(m) {
                            Ok(()) => None,
                            Err(TrySendError::Full(m)) => Some(m),
                            Err(TrySendError::Closed(_)) => None,
                        },
                        (None, _) => None,
                    };
                    if let Some(
                        RibOutput::Updates { nlri, .. } | RibOutput::Withdraw { nlri, .. },
                    ) = full
                    {
                        s.dirty.extend(nlri);
                    }
                }
            }
            let s = &self.st.slots[t as usize];
            if !s.dirty.is_empty() || !s.dirty_tail.is_empty() {
                self.st.dirty_slots.push(t);
            }
        }
        // A peer that went down and came back while dirty may be listed twice.
        self.st.dirty_slots.sort_unstable();
        self.st.dirty_slots.dedup();
    }

    /// ECMP next-hop changes since the last call (only when created with `fib = true`).
    pub fn take_fib_events(&mut self) -> Vec<FibEvent> {
        std::mem::take(&mut self.st.fib)
    }

    /// Answer a query synchronously (also reachable as `RibInput::Query`).
    pub fn summary(&self) -> RibSummary {
        let peers = self
            .st
            .slots
            .iter()
            .filter(|s| s.in_use && s.id.is_some())
            .map(|s| PeerCounters {
                peer: s.id,
                address: Some(s.info.address),
                up: s.up,
                ..s.counters.clone()
            })
            .collect();
        RibSummary {
            ipv4_prefixes: self.tables.v4.len(),
            ipv6_prefixes: self.tables.v6.len(),
            attribute_sets: self.st.interner.len(),
            local_prefixes: self.st.slots[LOCAL_SLOT as usize].counters.accepted as usize,
            peers,
        }
    }

    /// Every path of `prefix`, best first.
    pub fn lookup(&self, prefix: &IpNetwork) -> Vec<PathView> {
        let Some(dest) = self.tables.get(prefix) else {
            return Vec::new();
        };
        dest.paths()
            .iter()
            .enumerate()
            .map(|(i, p)| self.st.view(p, i == 0))
            .collect()
    }

    /// The best path of every prefix of `family`, in prefix order.
    pub fn loc_rib(&self, family: Family) -> Vec<RouteView> {
        let mk = |prefix: IpNetwork, d: &Dest| RouteView {
            prefix,
            best: self.st.view(d.best(), true),
            ecmp_paths: d.paths().iter().filter(|p| p.ecmp()).count(),
        };
        if family == Family::IPV4_UNICAST {
            self.tables
                .v4
                .iter()
                .map(|(k, d)| mk(k.to_net(), d))
                .collect()
        } else if family == Family::IPV6_UNICAST {
            self.tables
                .v6
                .iter()
                .map(|(k, d)| mk(k.to_net(), d))
                .collect()
        } else {
            Vec::new()
        }
    }

    /// What `peer` holds from us for `family` (Adj-RIB-Out), derived from the Loc-RIB.
    pub fn adj_rib_out(
        &mut self,
        peer: PeerId,
        family: Family,
    ) -> Vec<(IpNetwork, Arc<PathAttributes>)> {
        let Some(slot) = self.up_slot(peer) else {
            return Vec::new();
        };
        let policy = self.st.policy.clone();
        let mut out = Vec::new();
        let st = &mut self.st;
        let multi = st.multi(slot, family);
        let mut each = |prefix: IpNetwork, d: &Dest| {
            if multi {
                for (_, a) in st.export_all(slot, &prefix, d.paths(), &policy) {
                    out.push((prefix, a));
                }
            } else if let Some(a) = st.export(slot, &prefix, d.best(), &policy) {
                out.push((prefix, a));
            }
        };
        if family == Family::IPV4_UNICAST {
            self.tables.v4.iter().for_each(|(k, d)| each(k.to_net(), d));
        } else if family == Family::IPV6_UNICAST {
            self.tables.v6.iter().for_each(|(k, d)| each(k.to_net(), d));
        }
        out
    }

    fn query(&mut self, q: Query) {
        // A dropped receiver only means the asker went away.
        match q {
            Query::Summary(reply) => {
                let _ = reply.send(self.summary());
            }
            Query::Prefix { prefix, reply } => {
                let _ = reply.send(self.lookup(&prefix));
            }
            Query::LocRib { family, reply } => {
                let _ = reply.send(self.loc_rib(family));
            }
            Query::AdjRibOut {
                peer,
                family,
                reply,
            } => {
                let _ = reply.send(self.adj_rib_out(peer, family));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn client(n: u8) -> PeerInfo {
        PeerInfo {
            asn: 65000,
            local_asn: 65000,
            router_id: Ipv4Addr::new(10, 0, 0, n),
            address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
            local_v4: Some(Ipv4Addr::new(10, 0, 0, 254)),
            local_v6: None,
            rr_client: true,
            next_hop_mode: NextHopMode::Auto,
            graceful_restart: None,
            families: vec![Family::IPV4_UNICAST],
            add_path_rx: Vec::new(),
            add_path_tx: Vec::new(),
            max_prefixes: None,
            allow_local_as: 0,
        }
    }

    /// One route from `peer` with its own next hop (10.0.0.`peer`) and `med`, as a session delivers it.
    /// Client `id` (see [`client`]) comes up with output channel `out`.
    fn peer_up(
        id: u8,
        out: chan::Sender<RibOutput>,
        direct: Option<Arc<dyn DirectOut>>,
    ) -> RibInput {
        RibInput::PeerUp {
            peer: PeerId(u32::from(id)),
            info: client(id),
            out,
            direct,
        }
    }

    fn one_route(peer: u32, prefix: IpNetwork, med: u32) -> RibInput {
        let attrs = PathAttributes {
            origin: Some(Origin::Igp),
            as_path: Some(AsPath::default()),
            next_hop: Some(Ipv4Addr::new(10, 0, 0, peer as u8)),
            med: Some(med),
            local_pref: Some(100),
            ..Default::default()
        };
        RibInput::Routes {
            peer: PeerId(peer),
            announced: vec![Nlri { prefix, path_id: 0 }],
            attrs: Arc::new(attrs),
            withdrawn: Vec::new(),
        }
    }

    fn held_after(rx: &mut chan::Receiver<RibOutput>, held: &mut BTreeMap<IpNetwork, u32>) -> bool {
        let mut any = false;
        while let Ok(m) = rx.try_recv() {
            any = true;
            match m {
                RibOutput::Updates { attrs, nlri, .. } => {
                    for n in nlri {
                        held.insert(n.prefix, attrs.med.unwrap_or(0));
                    }
                }
                RibOutput::Withdraw { nlri, .. } => {
                    for n in nlri {
                        held.remove(&n.prefix);
                    }
                }
                _ => {}
            }
        }
        any
    }

    /// A route reflector's RIB (cluster id 1.1.1.1, AS 65000) that accepts everything.
    fn reflector_rib() -> Rib {
        let mut cfg = RibConfig::new(65000, Ipv4Addr::new(10, 0, 0, 254));
        cfg.cluster_id = Some(Ipv4Addr::new(1, 1, 1, 1));
        Rib::new(cfg, Arc::new(Policy::accept_all()), false)
    }

    /// The k-th test /24 (10.100.k.0/24 onwards).
    fn prefix(k: u32) -> IpNetwork {
        IpNetwork::V4(
            ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0a64_0000 + (k << 8)), 24).unwrap(),
        )
    }

    /// A peer whose channel is full gets, once it reads again, exactly the current state: every prefix with
    /// its last attributes, withdrawn ones gone, without the RIB ever queueing more than the channel holds.
    #[test]
    fn a_slow_peer_is_coalesced_to_the_current_state() {
        let mut rib = reflector_rib();
        let now = Instant::now();
        let (fast_tx, mut fast_rx) = chan::channel(1 << 16);
        let (slow_tx, mut slow_rx) = chan::channel(2);
        let (src_tx, _src_rx) = chan::channel(1 << 16);
        for (id, out) in [(1, src_tx), (2, fast_tx), (3, slow_tx)] {
            rib.handle(peer_up(id, out, None), now);
        }
        // Ten rounds over 500 prefixes, each with its own MED: nothing groups, every change is a message.
        for round in 0..10u32 {
            for k in 0..500u32 {
                rib.handle(one_route(1, prefix(k), round * 1000 + k), now);
            }
        }
        // Withdraw the last 100.
        rib.handle(
            RibInput::Withdraw {
                peer: PeerId(1),
                withdrawn: (400..500)
                    .map(|k| Nlri {
                        prefix: prefix(k),
                        path_id: 0,
                    })
                    .collect(),
            },
            now,
        );
        assert!(rib.has_dirty(), "the slow peer's channel of 2 overflowed");
        assert!(slow_rx.len() <= 2);
        let mut fast = BTreeMap::new();
        held_after(&mut fast_rx, &mut fast);
        let mut slow = BTreeMap::new();
        for _ in 0..10_000 {
            let got = held_after(&mut slow_rx, &mut slow);
            rib.drain_dirty();
            if !got && !rib.has_dirty() && slow_rx.is_empty() {
                break;
            }
        }
        assert_eq!(fast.len(), 400);
        assert_eq!(
            slow, fast,
            "the slow peer ends with what the fast one holds"
        );
        assert!((0..400).all(|k| fast[&prefix(k)] == 9000 + k));
    }

    /// A session's socket as a test sees it: what the RIB wrote, and whether it may write.
    #[derive(Default)]
    struct FakeDirect {
        ctx: crate::bgp::wire::EncodeCtx,
        done: std::sync::atomic::AtomicU64,
        refuse: std::sync::atomic::AtomicBool,
        written: std::sync::Mutex<Vec<bytes::Bytes>>,
        queued: std::sync::atomic::AtomicU64,
        /// Queued, not yet flushed.
        pending: std::sync::Mutex<Vec<bytes::Bytes>>,
    }

    impl DirectOut for FakeDirect {
        fn ctx(&self) -> &crate::bgp::wire::EncodeCtx {
            &self.ctx
        }
        fn done(&self) -> u64 {
            self.done.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn try_queue(&self, bytes: &bytes::Bytes) -> bool {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                return false;
            }
            self.queued
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.pending.lock().unwrap().push(bytes.clone());
            true
        }
        fn flush(&self) {
            let mut pending = self.pending.lock().unwrap();
            self.written.lock().unwrap().append(&mut pending);
        }
    }

    /// The prefixes of the UPDATEs the RIB wrote itself.
    fn written_prefixes(d: &FakeDirect) -> Vec<IpNetwork> {
        let ctx = crate::bgp::wire::DecodeCtx::default();
        let mut out = Vec::new();
        for b in d.written.lock().unwrap().drain(..) {
            match crate::bgp::wire::decode(&b, &ctx).expect("a whole UPDATE") {
                crate::bgp::wire::Message::Update(u) => {
                    out.extend(u.nlri.iter().map(|n| n.prefix));
                    out.extend(u.withdrawn.iter().map(|n| n.prefix));
                }
                m => panic!("expected an UPDATE, got {m:?}"),
            }
        }
        out
    }

    /// The fan-out case: the RIB writes a member's one new message to its socket itself, but only while
    /// the session has taken and queued everything the RIB sent through its channel; otherwise (and
    /// when the socket has something queued) the message goes through the channel, so order is kept.
    #[test]
    fn the_rib_writes_to_an_idle_session_itself_and_keeps_order_otherwise() {
        use std::sync::atomic::Ordering::SeqCst;
        let mut rib = reflector_rib();
        let now = Instant::now();
        let (src_tx, _src_rx) = chan::channel(64);
        let (tx, mut rx) = chan::channel(64);
        let direct = Arc::new(FakeDirect::default());
        rib.handle(peer_up(1, src_tx, None), now);
        rib.handle(one_route(1, prefix(0), 0), now);
        rib.handle(
            peer_up(2, tx, Some(direct.clone() as Arc<dyn DirectOut>)),
            now,
        );
        // The table walk and End-of-RIB go through the channel.
        let mut taken = 0;
        let mut held = BTreeMap::new();
        while let Ok(m) = rx.try_recv() {
            taken += 1;
            if let RibOutput::Updates { nlri, .. } = m {
                held.extend(nlri.iter().map(|n| (n.prefix, 0)));
            }
        }
        assert!(taken >= 2, "the walk and End-of-RIB");
        assert!(held.contains_key(&prefix(0)));
        // The session has not said it queued them: a change waits behind them in the channel.
        rib.handle(one_route(1, prefix(1), 1), now);
        assert!(
            matches!(rx.try_recv(), Ok(RibOutput::Updates { nlri, .. }) if nlri[0].prefix == prefix(1))
        );
        taken += 1;
        assert!(written_prefixes(&direct).is_empty());
        // Everything taken and queued: the next change is written, nothing goes through the channel.
        direct.done.store(taken, SeqCst);
        rib.handle(one_route(1, prefix(2), 2), now);
        assert_eq!(written_prefixes(&direct), [prefix(2)]);
        assert!(
            direct.pending.lock().unwrap().is_empty(),
            "without a helper, queued and flushed at once"
        );
        assert_eq!(rx.try_recv(), Err(chan::TryRecvError::Empty));
        // The socket has something queued: the channel again ...
        direct.refuse.store(true, SeqCst);
        rib.handle(one_route(1, prefix(3), 3), now);
        assert!(
            matches!(rx.try_recv(), Ok(RibOutput::Updates { nlri, .. }) if nlri[0].prefix == prefix(3))
        );
        // ... and while that message is not queued by the session, the channel, whatever the socket says.
        direct.refuse.store(false, SeqCst);
        rib.handle(
            RibInput::Withdraw {
                peer: PeerId(1),
                withdrawn: vec![Nlri {
                    prefix: prefix(3),
                    path_id: 0,
                }],
            },
            now,
        );
        assert!(
            matches!(rx.try_recv(), Ok(RibOutput::Withdraw { nlri, .. }) if nlri[0].prefix == prefix(3))
        );
        assert!(written_prefixes(&direct).is_empty());
        direct.done.store(taken + 2, SeqCst);
        rib.handle(
            RibInput::Withdraw {
                peer: PeerId(1),
                withdrawn: vec![Nlri {
                    prefix: prefix(2),
                    path_id: 0,
                }],
            },
            now,
        );
        assert_eq!(
            written_prefixes(&direct),
            [prefix(2)],
            "a withdrawal, written"
        );
        assert_eq!(rx.try_recv(), Err(chan::TryRecvError::Empty));
    }

    /// With a helper thread that never runs (a busy machine), the RIB still writes every idle member
    /// of a change before it is done with it: it queues them in chunks, leaves only the newest chunk
    /// for the helper while it queues the next, and writes every chunk left at the end.
    #[test]
    fn the_rib_writes_every_chunk_itself_when_its_helper_never_runs() {
        use std::sync::atomic::Ordering::SeqCst;
        let mut rib = reflector_rib();
        let q = Arc::new(super::super::flush::FlushQueue::default());
        rib.set_flusher(q.clone());
        let now = Instant::now();
        let (src_tx, _src_rx) = chan::channel(64);
        rib.handle(peer_up(1, src_tx, None), now);
        // More members than two chunks hold.
        let mut members = Vec::new();
        for id in 2..=200u8 {
            let (tx, mut rx) = chan::channel(64);
            let direct = Arc::new(FakeDirect::default());
            rib.handle(
                peer_up(id, tx, Some(direct.clone() as Arc<dyn DirectOut>)),
                now,
            );
            // End-of-RIB went through the channel; the session has taken it.
            let mut taken = 0;
            while rx.try_recv().is_ok() {
                taken += 1;
            }
            direct.done.store(taken, SeqCst);
            members.push((direct, rx));
        }
        rib.handle(one_route(1, prefix(7), 7), now);
        for (direct, rx) in &mut members {
            assert_eq!(direct.queued.load(SeqCst), 1, "queued by the RIB");
            assert!(direct.pending.lock().unwrap().is_empty(), "and written");
            assert_eq!(written_prefixes(direct), [prefix(7)]);
            assert_eq!(rx.try_recv(), Err(chan::TryRecvError::Empty));
        }
        assert!(q.take_beyond(0).is_none(), "nothing left for the helper");
    }

    /// A member that stops reading in the middle of its table walk holds the log from being
    /// trimmed; a prefix announced and then withdrawn while it is stalled must still reach the others
    /// both times (the withdrawal's entry goes after what they have read).
    #[test]
    fn a_stalled_walk_does_not_hide_later_changes_from_the_others() {
        let mut rib = reflector_rib();
        let now = Instant::now();
        let announce = |rib: &mut Rib, peer: u32, k: u32| {
            rib.handle(one_route(peer, prefix(k), k), now);
        };
        let (src_tx, _src_rx) = chan::channel(1 << 10);
        let (fast_tx, mut fast_rx) = chan::channel(1 << 10);
        rib.handle(peer_up(1, src_tx, None), now);
        for k in 0..10 {
            announce(&mut rib, 1, k);
        }
        rib.handle(peer_up(2, fast_tx, None), now);
        // Peer 3 takes one message of its walk and never reads again.
        let (slow_tx, _slow_rx) = chan::channel(1);
        rib.handle(peer_up(3, slow_tx, None), now);
        let mut fast = BTreeMap::new();
        held_after(&mut fast_rx, &mut fast);
        assert_eq!(fast.len(), 10);
        announce(&mut rib, 1, 50);
        held_after(&mut fast_rx, &mut fast);
        assert!(fast.contains_key(&prefix(50)));
        rib.handle(
            RibInput::Withdraw {
                peer: PeerId(1),
                withdrawn: vec![Nlri {
                    prefix: prefix(50),
                    path_id: 0,
                }],
            },
            now,
        );
        held_after(&mut fast_rx, &mut fast);
        assert!(
            !fast.contains_key(&prefix(50)),
            "the withdrawal reached the reading member"
        );
        assert!(rib.has_dirty(), "the stalled member is still owed its walk");
    }

    /// The same for ADD-PATH send sessions: the dirty set keeps (prefix, path id), so a slow peer ends with
    /// exactly the paths, ids and attributes a fast one holds, withdrawn paths gone.
    #[test]
    fn a_slow_add_path_peer_is_coalesced_to_the_current_paths() {
        let mut rib = reflector_rib();
        let now = Instant::now();
        let multi = |n: u8| PeerInfo {
            add_path_tx: vec![Family::IPV4_UNICAST],
            ..client(n)
        };
        let (fast_tx, mut fast_rx) = chan::channel(1 << 16);
        let (slow_tx, mut slow_rx) = chan::channel(2);
        let (a_tx, _a_rx) = chan::channel(1 << 16);
        let (b_tx, _b_rx) = chan::channel(1 << 16);
        for (id, info, out) in [
            (1, client(1), a_tx),
            (2, client(2), b_tx),
            (3, multi(3), fast_tx),
            (4, multi(4), slow_tx),
        ] {
            rib.handle(
                RibInput::PeerUp {
                    peer: PeerId(id),
                    info,
                    out,
                    direct: None,
                },
                now,
            );
        }
        // Two origins per prefix, three rounds of changes each, then origin 1 withdraws half.
        for round in 0..3u32 {
            for src in [1u32, 2] {
                for k in 0..200u32 {
                    rib.handle(one_route(src, prefix(k), round * 1000 + k), now);
                }
            }
        }
        rib.handle(
            RibInput::Withdraw {
                peer: PeerId(1),
                withdrawn: (100..200)
                    .map(|k| Nlri {
                        prefix: prefix(k),
                        path_id: 0,
                    })
                    .collect(),
            },
            now,
        );
        assert!(rib.has_dirty(), "the slow peer's channel of 2 overflowed");
        let held =
            |rx: &mut chan::Receiver<RibOutput>,
             h: &mut BTreeMap<(IpNetwork, u32), (Option<Ipv4Addr>, u32)>| {
                let mut any = false;
                while let Ok(m) = rx.try_recv() {
                    any = true;
                    match m {
                        RibOutput::Updates { attrs, nlri, .. } => {
                            for n in nlri {
                                h.insert(
                                    (n.prefix, n.path_id),
                                    (attrs.next_hop, attrs.med.unwrap_or(0)),
                                );
                            }
                        }
                        RibOutput::Withdraw { nlri, .. } => {
                            for n in nlri {
                                h.remove(&(n.prefix, n.path_id));
                            }
                        }
                        _ => {}
                    }
                }
                any
            };
        let mut fast = BTreeMap::new();
        held(&mut fast_rx, &mut fast);
        let mut slow = BTreeMap::new();
        for _ in 0..10_000 {
            let got = held(&mut slow_rx, &mut slow);
            rib.drain_dirty();
            if !got && !rib.has_dirty() && slow_rx.is_empty() {
                break;
            }
        }
        assert_eq!(fast.len(), 300, "200 paths of origin 2, 100 of origin 1");
        assert_eq!(
            slow, fast,
            "the slow peer ends with what the fast one holds"
        );
    }
}
