//! The Sans-IO RIB: every route margay knows and every rule that moves them, with no task, socket or clock of
//! its own. [`Rib::handle`] applies one [`RibInput`]; outputs go to the per-peer senders given at `PeerUp` and to
//! [`Rib::take_fib_events`]; timers are [`Rib::next_deadline`] / [`Rib::on_timer`]. `task.rs` drives it.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Arc;
use std::time::Instant;

use ipnetwork::IpNetwork;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::chunkmap::ChunkMap;
use super::decision::{self, Kind, SourceMeta};
use super::export::{self, ExportSource, ExportTarget};
use super::table::{Dest, Path, PrefixKey, Tables, V4Key, V6Key, FLAG_STALE, LOCAL_SLOT};
use super::{
    family_of, FibEvent, NextHopMode, PathSource, PathView, PeerCounters, PeerId, PeerInfo, Policy,
    Query, RibConfig, RibInput, RibOutput, RibSummary, RouteView,
};
use crate::bgp::wire::{AsPath, AsSegment, Family, Nlri, Origin, PathAttributes};

type ExportKey = (usize, u16, bool);
type ExportCache = HashMap<
    ExportKey,
    (Arc<PathAttributes>, Option<Arc<PathAttributes>>),
    BuildHasherDefault<PtrHasher>,
>;

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

/// A multiplicative hasher for the keys of the hot per-prefix maps (pointers and small integers): SipHash's
/// DoS resistance buys nothing for keys the RIB makes itself, and costs a third of an export.
#[derive(Default)]
struct PtrHasher(u64);

impl Hasher for PtrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u16(&mut self, n: u16) {
        self.write_u64(u64::from(n));
    }
    fn write_u8(&mut self, n: u8) {
        self.write_u64(u64::from(n));
    }
}

/// Per-peer output collected while one input is applied, grouped by (rewritten) attribute set.
#[derive(Debug, Default)]
struct Pending {
    groups: Vec<(Family, Arc<PathAttributes>, Vec<Nlri>)>,
    index: HashMap<usize, usize, BuildHasherDefault<PtrHasher>>,
    /// The group the previous prefix went to: consecutive prefixes of one UPDATE share it.
    last: Option<(usize, usize)>,
    withdrawn: Vec<(Family, Vec<Nlri>)>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.groups.is_empty() && self.withdrawn.is_empty()
    }
}

#[derive(Debug)]
struct Slot {
    id: Option<PeerId>,
    in_use: bool,
    info: PeerInfo,
    kind: Kind,
    up: bool,
    out: Option<mpsc::Sender<RibOutput>>,
    /// Prefixes whose current export this peer still has to get: filled instead of the channel once the
    /// channel is full (a slow session), drained when it has room. A prefix that changes ten times while
    /// the peer is slow is sent once, as it is then, so a stalled peer costs at most one entry per prefix.
    /// Keyed by prefix and the path id it goes out under (0 unless ADD-PATH send is negotiated).
    dirty: HashSet<Nlri>,
    /// End-of-RIB markers and the max-prefix signal held back until `dirty` is drained, to keep their order.
    dirty_tail: Vec<RibOutput>,
    /// Index into `State::groups`: the update group whose export cache this peer uses (0: none yet).
    group: usize,
    /// The session generation of the last `PeerUp` (0 when it came without one).
    generation: u64,
    counters: PeerCounters,
    /// Restart timer while down, stale-routes timer while up and waiting for End-of-RIB (RFC 4724 4.2).
    deadline: Option<Instant>,
    stale_families: Vec<Family>,
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
            generation: 0,
            counters: PeerCounters::default(),
            deadline: None,
            stale_families: Vec::new(),
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
    /// Export caches, one per update group (index 0 is unused: the local slot never receives).
    groups: Vec<ExportCache>,
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
}

/// The RIB. One owner (the RIB task); see the module docs of `bgp::rib`.
#[derive(Debug)]
pub struct Rib {
    tables: Tables,
    st: State,
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
                groups: vec![ExportCache::default()],
                group_ids: HashMap::new(),
                dirty_slots: Vec::new(),
                by_id: HashMap::new(),
                free: Vec::new(),
                interner: HashSet::new(),
                gc_threshold: 1024,
                fib_enabled: fib,
                fib: Vec::new(),
                add_path_peers: 0,
            },
        }
    }

    /// Apply one input. `now` drives the graceful-restart timers.
    pub fn handle(&mut self, input: RibInput, now: Instant) {
        self.apply(input, now);
        self.st.flush_all();
        if self.has_dirty() {
            self.drain_dirty();
        }
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
            RibInput::PeerUp { peer, info, out } => self.peer_up(peer, info, out, now),
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
            RibInput::Query(q) => self.query(q),
        }
    }

    /// The earliest graceful-restart timer, if any.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.st
            .slots
            .iter()
            .filter(|s| s.in_use)
            .filter_map(|s| s.deadline)
            .min()
    }

    /// Fire the graceful-restart timers due at `now`: sweep the stale routes of those peers (RFC 4724 4.2).
    pub fn on_timer(&mut self, now: Instant) {
        let due: Vec<u16> = (0..self.st.slots.len() as u16)
            .filter(|&s| {
                self.st.slots[s as usize].in_use
                    && self.st.slots[s as usize].deadline.is_some_and(|d| d <= now)
            })
            .collect();
        for slot in due {
            let s = &mut self.st.slots[slot as usize];
            s.deadline = None;
            s.stale_families.clear();
            tracing::info!(peer = ?s.info.address, "graceful restart: timer expired, sweeping stale routes");
            self.sweep_stale(slot, None);
            if !self.st.slots[slot as usize].up {
                self.st.free_slot(slot);
            }
        }
        self.st.flush_all();
        self.st.maybe_gc();
    }

    /// True while some peer has changes waiting for room in its channel ([`Rib::drain_dirty`]).
    pub fn has_dirty(&self) -> bool {
        !self.st.dirty_slots.is_empty()
    }

    /// Send what slow peers are owed, as far as their channels have room: for each dirty prefix its export
    /// as of now (an announcement, or a withdrawal when there is nothing to send any more), grouped by
    /// attribute set; then the held-back End-of-RIB markers. The RIB task calls this after every input and
    /// on a short tick while [`Rib::has_dirty`].
    pub fn drain_dirty(&mut self) {
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
                        let Some(out) = &s.out else { break };
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
                let mut groups: HashMap<usize, usize, BuildHasherDefault<PtrHasher>> =
                    HashMap::default();
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
                    let full = match (&s.out, m) {
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

    fn up_slot(&self, peer: PeerId) -> Option<u16> {
        self.st
            .by_id
            .get(&peer)
            .copied()
            .filter(|&s| self.st.slots[s as usize].up)
    }

    // ----- peers -----

    fn peer_up(
        &mut self,
        peer: PeerId,
        info: PeerInfo,
        out: mpsc::Sender<RibOutput>,
        now: Instant,
    ) {
        if self.up_slot(peer).is_some() {
            tracing::warn!(
                ?peer,
                "PeerUp for a peer that is up: treating it as a new session"
            );
            self.peer_down(peer, false, now);
        }
        let kind = if info.is_ibgp() {
            Kind::Ibgp
        } else {
            Kind::Ebgp
        };
        let slot = match self.st.by_id.get(&peer).copied() {
            Some(slot) => {
                // Back from a graceful restart with stale routes. If what the routes were judged by changed,
                // sweep them under the old settings first so exports stay consistent.
                let s = &self.st.slots[slot as usize];
                if s.info.asn != info.asn
                    || s.info.local_asn != info.local_asn
                    || s.info.rr_client != info.rr_client
                {
                    self.sweep_stale(slot, None);
                    self.st.slots[slot as usize].stale_families.clear();
                }
                slot
            }
            None => self.st.alloc_slot(peer, info.clone(), kind),
        };
        let group = self.st.group_for(kind, &info);
        {
            let s = &mut self.st.slots[slot as usize];
            s.info = info;
            s.kind = kind;
            s.group = group;
            s.generation = 0;
            s.up = true;
            s.out = Some(out);
            s.dirty.clear();
            s.dirty_tail.clear();
            s.counters.received = 0;
            s.counters.rejected = 0;
            s.counters.advertised = 0;
            s.max_prefix_signalled = false;
            s.deadline = None;
        }
        self.st.recount_add_path();
        self.st.clear_caches();

        // RFC 4724 4.2: families the restarted peer no longer preserves forwarding state for lose their stale
        // routes at once; the rest wait for End-of-RIB, bounded by the stale-routes time.
        let stale_families = self.st.slots[slot as usize].stale_families.clone();
        let mut waiting = Vec::new();
        for f in stale_families {
            let preserved = self.st.slots[slot as usize]
                .info
                .graceful_restart
                .as_ref()
                .is_some_and(|gr| gr.forwarding_preserved.contains(&f));
            if preserved {
                waiting.push(f);
            } else {
                self.sweep_stale(slot, Some(f));
            }
        }
        let s = &mut self.st.slots[slot as usize];
        if !waiting.is_empty() {
            s.deadline = Some(now + self.st.cfg.stale_routes_time);
        }
        s.stale_families = waiting;

        self.dump_table(slot);
    }

    /// Send the whole Loc-RIB to a newly established peer, then End-of-RIB per family (RFC 4724 2).
    fn dump_table(&mut self, slot: u16) {
        let policy = self.st.policy.clone();
        let families = self.st.slots[slot as usize].info.families.clone();
        for family in &families {
            let st = &mut self.st;
            if *family == Family::IPV4_UNICAST {
                for (k, d) in self.tables.v4.iter() {
                    st.announce(slot, k.to_net(), d, &policy);
                }
            } else if *family == Family::IPV6_UNICAST {
                for (k, d) in self.tables.v6.iter() {
                    st.announce(slot, k.to_net(), d, &policy);
                }
            }
            st.flush(slot);
            st.send(slot, RibOutput::EndOfRib(*family));
        }
    }

    /// RFC 2918 4: re-advertise the Adj-RIB-Out of `family` to a peer that asked. The Adj-RIB-Out is the
    /// export of the Loc-RIB, so walking the Loc-RIB again yields exactly what the peer already holds; the
    /// advertised counter is kept as it was (the same prefixes, sent again).
    fn route_refresh(&mut self, peer: PeerId, family: Family) {
        let Some(slot) = self.up_slot(peer) else {
            return;
        };
        if !self.st.slots[slot as usize].info.families.contains(&family) {
            // RFC 2918 4: a refresh for a family not negotiated is ignored.
            return;
        }
        let advertised = self.st.slots[slot as usize].counters.advertised;
        let policy = self.st.policy.clone();
        let st = &mut self.st;
        if family == Family::IPV4_UNICAST {
            for (k, d) in self.tables.v4.iter() {
                st.announce(slot, k.to_net(), d, &policy);
            }
        } else if family == Family::IPV6_UNICAST {
            for (k, d) in self.tables.v6.iter() {
                st.announce(slot, k.to_net(), d, &policy);
            }
        }
        st.flush(slot);
        st.slots[slot as usize].counters.advertised = advertised;
    }

    fn peer_down(&mut self, peer: PeerId, graceful: bool, now: Instant) {
        let Some(slot) = self.st.by_id.get(&peer).copied() else {
            return;
        };
        let s = &mut self.st.slots[slot as usize];
        if !s.up {
            // Already down (in graceful restart): a second non-graceful loss ends the wait.
            if !graceful {
                self.sweep_stale(slot, None);
                self.st.free_slot(slot);
            }
            return;
        }
        s.up = false;
        s.out = None;
        s.dirty = HashSet::new();
        s.dirty_tail = Vec::new();
        s.pending = Pending::default();
        s.counters.advertised = 0;
        self.st.recount_add_path();
        let s = &self.st.slots[slot as usize];
        let restart = s
            .info
            .graceful_restart
            .as_ref()
            .map(|g| g.restart_time)
            .filter(|t| !t.is_zero());
        let has_routes = s.counters.accepted > 0;
        self.st.clear_caches();
        match restart {
            Some(restart_time) if graceful && has_routes => {
                // RFC 4724 4.2: keep the routes, marked stale, for the restart time.
                let mut families = Vec::new();
                let mut n = 0u64;
                for d in self.tables.v4.values_mut() {
                    n += mark_stale(d, slot, &mut families, Family::IPV4_UNICAST);
                }
                for d in self.tables.v6.values_mut() {
                    n += mark_stale(d, slot, &mut families, Family::IPV6_UNICAST);
                }
                let s = &mut self.st.slots[slot as usize];
                s.counters.stale = n;
                s.stale_families = families;
                s.deadline = Some(now + restart_time);
                tracing::info!(
                    ?peer,
                    stale = n,
                    "graceful restart: keeping routes of peer as stale"
                );
            }
            _ => {
                self.remove_all(slot);
                self.st.free_slot(slot);
            }
        }
    }

    fn end_of_rib(&mut self, peer: PeerId, family: Family) {
        let Some(slot) = self.up_slot(peer) else {
            return;
        };
        let s = &mut self.st.slots[slot as usize];
        if let Some(i) = s.stale_families.iter().position(|f| *f == family) {
            s.stale_families.remove(i);
            if s.stale_families.is_empty() {
                s.deadline = None;
            }
            self.sweep_stale(slot, Some(family));
        }
    }

    // ----- routes -----

    fn routes(
        &mut self,
        peer: PeerId,
        announced: Vec<Nlri>,
        attrs: Arc<PathAttributes>,
        mut withdrawn: Vec<Nlri>,
    ) {
        let Some(slot) = self.up_slot(peer) else {
            tracing::debug!(?peer, "routes from a peer that is not up: ignored");
            return;
        };
        if !announced.is_empty() && !withdrawn.is_empty() {
            // A prefix in both fields: the announcement wins (RFC 7606 5.3), so each prefix changes at most once
            // per input and the grouped output never reorders two changes of one prefix.
            let ann: HashSet<Nlri> = announced.iter().copied().collect();
            withdrawn.retain(|n| !ann.contains(n));
        }
        for n in withdrawn {
            self.remove_path(slot, n.prefix, n.path_id);
        }
        if announced.is_empty() {
            return;
        }
        self.st.slots[slot as usize].counters.received += announced.len() as u64;

        let looped = self.st.import_loop(slot, &attrs);
        let attrs = self.st.intern(attrs);
        for n in announced {
            let s = &self.st.slots[slot as usize];
            let family_ok = s.info.families.contains(&family_of(&n.prefix));
            if looped || !family_ok || !self.st.policy.import_allowed(&n.prefix) {
                // Rejected: it replaces (withdraws) whatever the peer sent before for it.
                self.st.slots[slot as usize].counters.rejected += 1;
                self.remove_path(slot, n.prefix, n.path_id);
                continue;
            }
            let allow_new = s
                .info
                .max_prefixes
                .is_none_or(|m| s.counters.accepted < u64::from(m));
            let path = Path {
                attrs: attrs.clone(),
                path_id: n.path_id,
                slot,
                flags: 0,
            };
            if !self.upsert(n.prefix, path, allow_new) {
                let s = &mut self.st.slots[slot as usize];
                s.counters.rejected += 1;
                if !s.max_prefix_signalled {
                    s.max_prefix_signalled = true;
                    let limit = s.info.max_prefixes.unwrap_or(0);
                    tracing::warn!(
                        ?peer,
                        limit,
                        "max-prefix reached: rejecting further prefixes"
                    );
                    self.st.send(slot, RibOutput::MaxPrefixExceeded { limit });
                }
            }
        }
    }

    fn originate(&mut self, prefixes: Vec<IpNetwork>, attrs: Arc<PathAttributes>) {
        let attrs = if attrs.origin.is_none() || attrs.as_path.is_none() {
            let mut a = (*attrs).clone();
            a.origin.get_or_insert(Origin::Igp);
            a.as_path.get_or_insert_with(AsPath::default);
            Arc::new(a)
        } else {
            attrs
        };
        let attrs = self.st.intern(attrs);
        for p in prefixes {
            self.upsert(
                p,
                Path {
                    attrs: attrs.clone(),
                    path_id: 0,
                    slot: LOCAL_SLOT,
                    flags: 0,
                },
                true,
            );
        }
    }

    /// Insert or replace the path (slot, path_id) of `prefix`. Returns false when it would be a new path
    /// and `allow_new` is false (max-prefix).
    fn upsert(&mut self, prefix: IpNetwork, path: Path, allow_new: bool) -> bool {
        match prefix {
            IpNetwork::V4(n) => upsert_in(
                &mut self.tables.v4,
                V4Key::new(n),
                prefix,
                path,
                allow_new,
                &mut self.st,
            ),
            IpNetwork::V6(n) => upsert_in(
                &mut self.tables.v6,
                V6Key::new(n),
                prefix,
                path,
                allow_new,
                &mut self.st,
            ),
        }
    }

    fn remove_path(&mut self, slot: u16, prefix: IpNetwork, path_id: u32) {
        let st = &mut self.st;
        let edit = |st: &mut State, v: &mut Vec<Path>| {
            let before = v.len();
            v.retain(|p| {
                let hit = p.slot == slot && p.path_id == path_id;
                if hit {
                    st.path_gone(p);
                }
                !hit
            });
            v.len() != before
        };
        match prefix {
            IpNetwork::V4(n) => remove_in(&mut self.tables.v4, V4Key::new(n), prefix, st, edit),
            IpNetwork::V6(n) => remove_in(&mut self.tables.v6, V6Key::new(n), prefix, st, edit),
        }
    }

    /// Remove every path of `slot` (session lost without graceful restart).
    fn remove_all(&mut self, slot: u16) {
        let pred = move |p: &Path| p.slot == slot;
        retain_paths(&mut self.tables.v4, &mut self.st, pred);
        retain_paths(&mut self.tables.v6, &mut self.st, pred);
    }

    /// Remove the stale paths of `slot` (of one family, or all).
    fn sweep_stale(&mut self, slot: u16, family: Option<Family>) {
        let pred = move |p: &Path| p.slot == slot && p.stale();
        if family.is_none_or(|f| f == Family::IPV4_UNICAST) {
            retain_paths(&mut self.tables.v4, &mut self.st, pred);
        }
        if family.is_none_or(|f| f == Family::IPV6_UNICAST) {
            retain_paths(&mut self.tables.v6, &mut self.st, pred);
        }
    }

    fn set_policy(&mut self, policy: Arc<Policy>) {
        let old = std::mem::replace(&mut self.st.policy, policy.clone());
        let st = &mut self.st;
        for slot in 0..st.slots.len() as u16 {
            if !st.slots[slot as usize].up {
                continue;
            }
            for (k, d) in self.tables.v4.iter() {
                st.policy_diff(slot, k.to_net(), d, &old, &policy);
            }
            for (k, d) in self.tables.v6.iter() {
                st.policy_diff(slot, k.to_net(), d, &old, &policy);
            }
        }
    }
}

/// Flag every path of `slot` in `d` stale; returns how many were marked.
fn mark_stale(d: &mut Dest, slot: u16, families: &mut Vec<Family>, family: Family) -> u64 {
    let mut n = 0;
    let mut mark = |p: &mut Path| {
        if p.slot == slot {
            p.flags |= FLAG_STALE;
            n += 1;
        }
    };
    match d {
        Dest::One(p) => mark(p),
        Dest::Many(v) => v.iter_mut().for_each(mark),
    }
    if n > 0 && !families.contains(&family) {
        families.push(family);
    }
    n
}

fn remove_in<K: PrefixKey>(
    map: &mut ChunkMap<K, Dest>,
    key: K,
    prefix: IpNetwork,
    st: &mut State,
    edit: impl FnOnce(&mut State, &mut Vec<Path>) -> bool,
) {
    if let Ok(pos) = map.find(&key) {
        if !modify(st, prefix, map.at_mut(pos), edit) {
            map.remove_at(pos);
        }
    }
}

fn upsert_in<K: PrefixKey>(
    map: &mut ChunkMap<K, Dest>,
    key: K,
    prefix: IpNetwork,
    mut path: Path,
    allow_new: bool,
    st: &mut State,
) -> bool {
    match map.find(&key) {
        Err(pos) => {
            if !allow_new {
                return false;
            }
            st.path_added(&path);
            path.flags = super::table::FLAG_ECMP;
            let pos = map.insert_at(pos, key, Dest::One(path));
            let d = map.at_mut(pos);
            st.settle(prefix, None, &[], st.fib_enabled.then(Vec::new), Some(d));
            true
        }
        Ok(pos) => {
            let dest = map.at_mut(pos);
            // Fast path: the only path of the prefix replaced by the same peer.
            if let Dest::One(p) = dest {
                if p.slot == path.slot && p.path_id == path.path_id {
                    if Arc::ptr_eq(&p.attrs, &path.attrs) && !p.stale() {
                        return true;
                    }
                    let old_nh = st.fib_enabled.then(|| fib_next_hops(prefix, dest));
                    let Dest::One(p) = dest else { return true };
                    if p.stale() {
                        st.slots[p.slot as usize].counters.stale -= 1;
                    }
                    path.flags = super::table::FLAG_ECMP;
                    let old = std::mem::replace(p, path);
                    st.settle(
                        prefix,
                        Some(&old),
                        std::slice::from_ref(&old),
                        old_nh,
                        Some(dest),
                    );
                    return true;
                }
            }
            let exists = dest
                .paths()
                .iter()
                .any(|p| p.slot == path.slot && p.path_id == path.path_id);
            if !exists && !allow_new {
                return false;
            }
            modify(st, prefix, dest, |st, v| {
                if let Some(i) = v
                    .iter()
                    .position(|p| p.slot == path.slot && p.path_id == path.path_id)
                {
                    if v[i].stale() {
                        st.slots[path.slot as usize].counters.stale -= 1;
                    }
                    v[i] = path;
                } else {
                    st.path_added(&path);
                    v.push(path);
                }
                true
            });
            true
        }
    }
}

/// Remove the paths matching `pred` from every prefix of `map`, re-deciding and propagating each touched prefix.
fn retain_paths<K: PrefixKey>(
    map: &mut ChunkMap<K, Dest>,
    st: &mut State,
    pred: impl Fn(&Path) -> bool,
) {
    map.retain(|k, d| {
        if !d.paths().iter().any(&pred) {
            return true;
        }
        modify(st, k.to_net(), d, |st, v| {
            v.retain(|p| {
                let hit = pred(p);
                if hit {
                    st.path_gone(p);
                }
                !hit
            });
            true
        })
    });
}

/// Apply `edit` to the paths of `dest`, re-run the decision process and propagate the change. Returns false
/// when no path is left (the caller removes the prefix).
fn modify(
    st: &mut State,
    prefix: IpNetwork,
    dest: &mut Dest,
    edit: impl FnOnce(&mut State, &mut Vec<Path>) -> bool,
) -> bool {
    let old_best = dest.best().clone();
    // Every old path, for the ADD-PATH send sessions' diff; nobody needs them when there are none.
    let old_all = if st.add_path_peers > 0 {
        dest.to_vec()
    } else {
        Vec::new()
    };
    let old_nh = st.fib_enabled.then(|| fib_next_hops(prefix, dest));
    let mut v = dest.to_vec();
    if !edit(st, &mut v) {
        return true;
    }
    if v.is_empty() {
        st.settle(prefix, Some(&old_best), &old_all, old_nh, None);
        return false;
    }
    decision::select(&mut v, &|s| st.meta(s));
    let Some(new) = Dest::from_vec(v) else {
        return false;
    };
    *dest = new;
    st.settle(prefix, Some(&old_best), &old_all, old_nh, Some(dest));
    true
}

/// The path id a path goes out under on ADD-PATH send sessions (RFC 7911 3): stable for as long as the
/// path exists, since it is made of what identifies the path here, its peer slot (low 16 bits) and the id
/// the peer gave it (high 16 bits; 0 for a peer without ADD-PATH, so a plain peer's path is its slot).
/// Two paths of one prefix from one ADD-PATH peer whose ids agree in the low 16 bits would collide;
/// `export_all` then sends the better one only.
fn tx_path_id(p: &Path) -> u32 {
    (p.path_id << 16) | u32::from(p.slot)
}

/// Did anything an ADD-PATH send session could see change between two path lists of one prefix?
fn paths_changed(old: &[Path], new: &[Path]) -> bool {
    old.len() != new.len() || old.iter().any(|o| !new.iter().any(|n| n.same(o)))
}

/// The sorted next hops of the ECMP set, for the FIB (learned routes only).
fn fib_next_hops(prefix: IpNetwork, d: &Dest) -> Vec<IpAddr> {
    let family = family_of(&prefix);
    let mut v: Vec<IpAddr> = d
        .paths()
        .iter()
        .take_while(|p| p.ecmp())
        .filter(|p| p.slot != LOCAL_SLOT)
        .filter_map(|p| export::received_next_hop(&p.attrs, family))
        .collect();
    // Our own route wins the decision outright: nothing to install from peers then.
    if d.best().slot == LOCAL_SLOT {
        v.clear();
    }
    v.sort();
    v.dedup();
    v
}

impl State {
    fn meta(&self, slot: u16) -> SourceMeta {
        let s = &self.slots[slot as usize];
        SourceMeta {
            kind: s.kind,
            router_id: s.info.router_id,
            address: s.info.address,
        }
    }

    fn alloc_slot(&mut self, peer: PeerId, info: PeerInfo, kind: Kind) -> u16 {
        let mut s = Slot::new(info, kind);
        s.id = Some(peer);
        let slot = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = s;
                i
            }
            None => {
                self.slots.push(s);
                (self.slots.len() - 1) as u16
            }
        };
        self.by_id.insert(peer, slot);
        slot
    }

    fn free_slot(&mut self, slot: u16) {
        let s = &mut self.slots[slot as usize];
        if let Some(id) = s.id.take() {
            self.by_id.remove(&id);
        }
        s.in_use = false;
        s.up = false;
        s.out = None;
        s.dirty = HashSet::new();
        s.dirty_tail = Vec::new();
        s.deadline = None;
        s.counters = PeerCounters::default();
        self.free.push(slot);
        self.recount_add_path();
        self.clear_caches();
    }

    fn recount_add_path(&mut self) {
        self.add_path_peers = self
            .slots
            .iter()
            .filter(|s| s.up && !s.info.add_path_tx.is_empty())
            .count();
    }

    fn clear_caches(&mut self) {
        for g in &mut self.groups {
            g.clear();
        }
    }

    /// The update group of a target with these settings, made on first use. Groups are never removed: there
    /// are as many as distinct settings (a handful), not peers.
    fn group_for(&mut self, kind: Kind, info: &PeerInfo) -> usize {
        let key = GroupKey::of(kind, info);
        if let Some(g) = self.group_ids.get(&key) {
            return *g;
        }
        self.groups.push(ExportCache::default());
        let g = self.groups.len() - 1;
        self.group_ids.insert(key, g);
        g
    }

    fn path_added(&mut self, p: &Path) {
        self.slots[p.slot as usize].counters.accepted += 1;
    }

    fn path_gone(&mut self, p: &Path) {
        let c = &mut self.slots[p.slot as usize].counters;
        c.accepted = c.accepted.saturating_sub(1);
        if p.stale() {
            c.stale = c.stale.saturating_sub(1);
        }
    }

    /// RFC 4271 9.1.2 AS loop (eBGP) and RFC 4456 8 ORIGINATOR_ID / CLUSTER_LIST loops (iBGP).
    fn import_loop(&self, slot: u16, attrs: &PathAttributes) -> bool {
        let s = &self.slots[slot as usize];
        match s.kind {
            Kind::Ebgp => attrs.as_path.as_ref().is_some_and(|p| {
                let own: usize = p
                    .segments
                    .iter()
                    .map(|seg| match seg {
                        AsSegment::Sequence(v)
                        | AsSegment::Set(v)
                        | AsSegment::ConfedSequence(v)
                        | AsSegment::ConfedSet(v) => {
                            v.iter().filter(|a| **a == s.info.local_asn).count()
                        }
                    })
                    .sum();
                own > s.info.allow_local_as as usize
            }),
            _ => {
                attrs.originator_id == Some(self.cfg.router_id)
                    || attrs
                        .cluster_list
                        .contains(&self.cfg.effective_cluster_id())
            }
        }
    }

    /// Intern an attribute set: equal sets share one allocation. MP NLRI fields are cleared first so sets that
    /// differ only in the prefixes they once carried are equal.
    fn intern(&mut self, attrs: Arc<PathAttributes>) -> Arc<PathAttributes> {
        let attrs = if attrs.mp_unreach.is_some()
            || attrs.mp_reach.as_ref().is_some_and(|m| !m.nlri.is_empty())
        {
            let mut a = (*attrs).clone();
            a.mp_unreach = None;
            if let Some(m) = a.mp_reach.as_mut() {
                m.nlri.clear();
            }
            Arc::new(a)
        } else {
            attrs
        };
        if let Some(existing) = self.interner.get(&attrs) {
            return existing.clone();
        }
        self.interner.insert(attrs.clone());
        attrs
    }

    /// Drop interned sets nobody uses any more (only the interner holds them). Amortised: runs when the set
    /// has doubled since the last collection. Export caches hold references too, so they are cleared first.
    fn maybe_gc(&mut self) {
        if self.interner.len() <= self.gc_threshold {
            return;
        }
        self.clear_caches();
        self.interner.retain(|a| Arc::strong_count(a) > 1);
        self.gc_threshold = (self.interner.len() * 2).max(1024);
    }

    fn view(&self, p: &Path, best: bool) -> PathView {
        let s = &self.slots[p.slot as usize];
        let local = p.slot == LOCAL_SLOT;
        PathView {
            source: match s.id {
                Some(id) if !local => PathSource::Peer(id),
                _ => PathSource::Local,
            },
            peer_address: (!local).then_some(s.info.address),
            path_id: p.path_id,
            attrs: p.attrs.clone(),
            best,
            ecmp: p.ecmp(),
            stale: p.stale(),
        }
    }

    /// What target `t` receives for `path` as best of `prefix`, under `policy`.
    fn export(
        &mut self,
        t: u16,
        prefix: &IpNetwork,
        path: &Path,
        policy: &Policy,
    ) -> Option<Arc<PathAttributes>> {
        let family = family_of(prefix);
        let ts = &self.slots[t as usize];
        if !ts.info.families.contains(&family) {
            return None;
        }
        let ss = &self.slots[path.slot as usize];
        let src = ExportSource {
            slot: path.slot,
            kind: ss.kind,
            router_id: ss.info.router_id,
            rr_client: ss.info.rr_client,
        };
        let tgt = ExportTarget {
            slot: t,
            kind: ts.kind,
            info: &ts.info,
        };
        if !export::may_send(&src, &tgt) || !policy.export_allowed(prefix, src.kind == Kind::Local)
        {
            return None;
        }
        let key = (
            Arc::as_ptr(&path.attrs) as usize,
            path.slot,
            family != Family::IPV4_UNICAST,
        );
        let group = ts.group;
        if let Some((_, out)) = self.groups[group].get(&key) {
            return out.clone();
        }
        let rewritten = export::rewrite(path, &src, &tgt, family, self.cfg.effective_cluster_id());
        let out = rewritten.map(|a| self.intern(Arc::new(a)));
        self.groups[group].insert(key, (path.attrs.clone(), out.clone()));
        out
    }

    /// Propagate a change of `prefix` to every established peer and to the FIB: a best-path change to every
    /// session, any path change to the ADD-PATH send sessions. `old_all` is every path before the change
    /// (needed only while `add_path_peers > 0`).
    fn settle(
        &mut self,
        prefix: IpNetwork,
        old: Option<&Path>,
        old_all: &[Path],
        old_nh: Option<Vec<IpAddr>>,
        new: Option<&Dest>,
    ) {
        let new_best = new.map(|d| d.best());
        let new_all = new.map_or(&[][..], |d| d.paths());
        let changed = match (old, new_best) {
            (Some(o), Some(n)) => !o.same(n),
            (None, None) => false,
            _ => true,
        };
        let any_changed = self.add_path_peers > 0 && paths_changed(old_all, new_all);
        if changed || any_changed {
            let family = family_of(&prefix);
            let policy = self.policy.clone();
            for t in 0..self.slots.len() as u16 {
                if !self.slots[t as usize].up {
                    continue;
                }
                if self.multi(t, family) {
                    if any_changed {
                        let e_old = self.export_all(t, &prefix, old_all, &policy);
                        let e_new = self.export_all(t, &prefix, new_all, &policy);
                        self.diff_multi(t, prefix, e_old, e_new);
                    }
                } else if changed {
                    let e_old = old.and_then(|p| self.export(t, &prefix, p, &policy));
                    let e_new = new_best.and_then(|p| self.export(t, &prefix, p, &policy));
                    self.diff(t, prefix, e_old, e_new);
                }
            }
        }
        if let Some(old_nh) = old_nh {
            let new_nh = new.map(|d| fib_next_hops(prefix, d)).unwrap_or_default();
            if new_nh != old_nh {
                self.fib.push(if new_nh.is_empty() {
                    FibEvent::Remove { prefix }
                } else {
                    FibEvent::Set {
                        prefix,
                        next_hops: new_nh,
                    }
                });
            }
        }
    }

    fn diff(
        &mut self,
        t: u16,
        prefix: IpNetwork,
        old: Option<Arc<PathAttributes>>,
        new: Option<Arc<PathAttributes>>,
    ) {
        match (old, new) {
            (Some(o), Some(n)) if Arc::ptr_eq(&o, &n) => {}
            (o, Some(n)) => {
                if o.is_none() {
                    self.slots[t as usize].counters.advertised += 1;
                }
                self.queue_announce(t, prefix, 0, n);
            }
            (Some(_), None) => {
                let c = &mut self.slots[t as usize].counters;
                c.advertised = c.advertised.saturating_sub(1);
                self.queue_withdraw(t, prefix, 0);
            }
            (None, None) => {}
        }
    }

    /// The ADD-PATH send version of [`State::diff`]: withdraw the path ids that are gone, announce the new
    /// ones and those whose attributes changed (RFC 7911 3: a path id identifies the path to be replaced or
    /// withdrawn).
    fn diff_multi(
        &mut self,
        t: u16,
        prefix: IpNetwork,
        old: Vec<(u32, Arc<PathAttributes>)>,
        new: Vec<(u32, Arc<PathAttributes>)>,
    ) {
        for (id, _) in &old {
            if !new.iter().any(|(n, _)| n == id) {
                let c = &mut self.slots[t as usize].counters;
                c.advertised = c.advertised.saturating_sub(1);
                self.queue_withdraw(t, prefix, *id);
            }
        }
        for (id, a) in new {
            match old.iter().find(|(o, _)| *o == id) {
                Some((_, o)) if Arc::ptr_eq(o, &a) => {}
                Some(_) => self.queue_announce(t, prefix, id, a),
                None => {
                    self.slots[t as usize].counters.advertised += 1;
                    self.queue_announce(t, prefix, id, a);
                }
            }
        }
    }

    /// Does target `t` get every path of `family` (ADD-PATH send negotiated) rather than the best one?
    fn multi(&self, t: u16, family: Family) -> bool {
        self.slots[t as usize].info.add_path_tx.contains(&family)
    }

    /// What an ADD-PATH send target `t` holds for `paths` of `prefix`: (path id, attributes) for each path
    /// export allows, best first. Two paths that would share an id (see [`tx_path_id`]) are cut to the
    /// better one, so a path id never stands for two paths at once.
    fn export_all(
        &mut self,
        t: u16,
        prefix: &IpNetwork,
        paths: &[Path],
        policy: &Policy,
    ) -> Vec<(u32, Arc<PathAttributes>)> {
        let mut out: Vec<(u32, Arc<PathAttributes>)> = Vec::with_capacity(paths.len());
        for p in paths {
            let id = tx_path_id(p);
            if out.iter().any(|(i, _)| *i == id) {
                continue;
            }
            if let Some(a) = self.export(t, prefix, p, policy) {
                out.push((id, a));
            }
        }
        out
    }

    fn policy_diff(&mut self, t: u16, prefix: IpNetwork, d: &Dest, old: &Policy, new: &Policy) {
        if self.multi(t, family_of(&prefix)) {
            let e_old = self.export_all(t, &prefix, d.paths(), old);
            let e_new = self.export_all(t, &prefix, d.paths(), new);
            self.diff_multi(t, prefix, e_old, e_new);
            return;
        }
        let e_old = self.export(t, &prefix, d.best(), old);
        let e_new = self.export(t, &prefix, d.best(), new);
        self.diff(t, prefix, e_old, e_new);
    }

    /// Queue what target `t` holds for `prefix` (a table dump, a route refresh): the best path, or every
    /// path on an ADD-PATH send session.
    fn announce(&mut self, t: u16, prefix: IpNetwork, d: &Dest, policy: &Policy) {
        if self.multi(t, family_of(&prefix)) {
            for (id, a) in self.export_all(t, &prefix, d.paths(), policy) {
                self.slots[t as usize].counters.advertised += 1;
                self.queue_announce(t, prefix, id, a);
            }
        } else if let Some(a) = self.export(t, &prefix, d.best(), policy) {
            self.slots[t as usize].counters.advertised += 1;
            self.queue_announce(t, prefix, 0, a);
        }
    }

    fn queue_announce(
        &mut self,
        t: u16,
        prefix: IpNetwork,
        path_id: u32,
        attrs: Arc<PathAttributes>,
    ) {
        let max = self.cfg.max_batch.max(1);
        let family = family_of(&prefix);
        let s = &mut self.slots[t as usize];
        let key = Arc::as_ptr(&attrs) as usize;
        let p = &mut s.pending;
        let i = match p.last {
            Some((k, i)) if k == key => i,
            _ => {
                let i = *p.index.entry(key).or_insert_with(|| {
                    p.groups.push((family, attrs, Vec::new()));
                    p.groups.len() - 1
                });
                p.last = Some((key, i));
                i
            }
        };
        let g = &mut p.groups[i];
        g.2.push(Nlri { prefix, path_id });
        if g.2.len() >= max {
            // Each prefix changes at most once per input, so sending a full group early cannot reorder two
            // changes of one prefix.
            let nlri = std::mem::take(&mut g.2);
            let msg = RibOutput::Updates {
                family: g.0,
                attrs: g.1.clone(),
                nlri,
            };
            self.send(t, msg);
        }
    }

    fn queue_withdraw(&mut self, t: u16, prefix: IpNetwork, path_id: u32) {
        let max = self.cfg.max_batch.max(1);
        let family = family_of(&prefix);
        let p = &mut self.slots[t as usize].pending;
        let i = match p.withdrawn.iter().position(|(f, _)| *f == family) {
            Some(i) => i,
            None => {
                p.withdrawn.push((family, Vec::new()));
                p.withdrawn.len() - 1
            }
        };
        let w = &mut p.withdrawn[i].1;
        w.push(Nlri { prefix, path_id });
        if w.len() >= max {
            let nlri = std::mem::take(w);
            self.send(t, RibOutput::Withdraw { family, nlri });
        }
    }

    /// Hand `msg` to the peer's session, or, when its channel is full (or already has a backlog here),
    /// fold it into the peer's dirty set: the RIB never buffers a table for a slow peer.
    fn send(&mut self, t: u16, msg: RibOutput) {
        let s = &mut self.slots[t as usize];
        let Some(out) = &s.out else { return };
        let msg = if s.dirty.is_empty() && s.dirty_tail.is_empty() {
            match out.try_send(msg) {
                Ok(()) => return,
                // A closed channel means the session is gone; its PeerDown is on the way.
                Err(TrySendError::Closed(_)) => return,
                Err(TrySendError::Full(msg)) => msg,
            }
        } else {
            msg
        };
        if s.dirty.is_empty() && s.dirty_tail.is_empty() {
            self.dirty_slots.push(t);
        }
        match msg {
            RibOutput::Updates { nlri, .. } | RibOutput::Withdraw { nlri, .. } => {
                s.dirty.extend(nlri);
            }
            other => s.dirty_tail.push(other),
        }
    }

    fn flush(&mut self, t: u16) {
        let p = std::mem::take(&mut self.slots[t as usize].pending);
        for (family, nlri) in p.withdrawn {
            if !nlri.is_empty() {
                self.send(t, RibOutput::Withdraw { family, nlri });
            }
        }
        for (family, attrs, nlri) in p.groups {
            if !nlri.is_empty() {
                self.send(
                    t,
                    RibOutput::Updates {
                        family,
                        attrs,
                        nlri,
                    },
                );
            }
        }
    }

    fn flush_all(&mut self) {
        for t in 0..self.slots.len() as u16 {
            if !self.slots[t as usize].pending.is_empty() {
                self.flush(t);
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

    fn held_after(rx: &mut mpsc::Receiver<RibOutput>, held: &mut BTreeMap<IpNetwork, u32>) -> bool {
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

    /// A peer whose channel is full gets, once it reads again, exactly the current state: every prefix with
    /// its last attributes, withdrawn ones gone, without the RIB ever queueing more than the channel holds.
    #[test]
    fn a_slow_peer_is_coalesced_to_the_current_state() {
        let mut cfg = RibConfig::new(65000, Ipv4Addr::new(10, 0, 0, 254));
        cfg.cluster_id = Some(Ipv4Addr::new(1, 1, 1, 1));
        let mut rib = Rib::new(cfg, Arc::new(Policy::accept_all()), false);
        let now = Instant::now();
        let (fast_tx, mut fast_rx) = mpsc::channel(1 << 16);
        let (slow_tx, mut slow_rx) = mpsc::channel(2);
        let (src_tx, _src_rx) = mpsc::channel(1 << 16);
        for (id, out) in [(1, src_tx), (2, fast_tx), (3, slow_tx)] {
            rib.handle(
                RibInput::PeerUp {
                    peer: PeerId(id),
                    info: client(id as u8),
                    out,
                },
                now,
            );
        }
        let prefix = |k: u32| {
            IpNetwork::V4(
                ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0a64_0000 + (k << 8)), 24).unwrap(),
            )
        };
        // Ten rounds over 500 prefixes, each with its own MED: nothing groups, every change is a message.
        for round in 0..10u32 {
            for k in 0..500u32 {
                let attrs = PathAttributes {
                    origin: Some(Origin::Igp),
                    as_path: Some(AsPath::default()),
                    next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                    med: Some(round * 1000 + k),
                    local_pref: Some(100),
                    ..Default::default()
                };
                rib.handle(
                    RibInput::Routes {
                        peer: PeerId(1),
                        announced: vec![Nlri {
                            prefix: prefix(k),
                            path_id: 0,
                        }],
                        attrs: Arc::new(attrs),
                        withdrawn: Vec::new(),
                    },
                    now,
                );
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

    /// The same for ADD-PATH send sessions: the dirty set keeps (prefix, path id), so a slow peer ends with
    /// exactly the paths, ids and attributes a fast one holds, withdrawn paths gone.
    #[test]
    fn a_slow_add_path_peer_is_coalesced_to_the_current_paths() {
        let mut cfg = RibConfig::new(65000, Ipv4Addr::new(10, 0, 0, 254));
        cfg.cluster_id = Some(Ipv4Addr::new(1, 1, 1, 1));
        let mut rib = Rib::new(cfg, Arc::new(Policy::accept_all()), false);
        let now = Instant::now();
        let multi = |n: u8| PeerInfo {
            add_path_tx: vec![Family::IPV4_UNICAST],
            ..client(n)
        };
        let (fast_tx, mut fast_rx) = mpsc::channel(1 << 16);
        let (slow_tx, mut slow_rx) = mpsc::channel(2);
        let (a_tx, _a_rx) = mpsc::channel(1 << 16);
        let (b_tx, _b_rx) = mpsc::channel(1 << 16);
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
                },
                now,
            );
        }
        let prefix = |k: u32| {
            IpNetwork::V4(
                ipnetwork::Ipv4Network::new(Ipv4Addr::from(0x0a64_0000 + (k << 8)), 24).unwrap(),
            )
        };
        // Two origins per prefix, three rounds of changes each, then origin 1 withdraws half.
        for round in 0..3u32 {
            for src in [1u32, 2] {
                for k in 0..200u32 {
                    let attrs = PathAttributes {
                        origin: Some(Origin::Igp),
                        as_path: Some(AsPath::default()),
                        next_hop: Some(Ipv4Addr::new(10, 0, 0, src as u8)),
                        med: Some(round * 1000 + k),
                        local_pref: Some(100),
                        ..Default::default()
                    };
                    rib.handle(
                        RibInput::Routes {
                            peer: PeerId(src),
                            announced: vec![Nlri {
                                prefix: prefix(k),
                                path_id: 0,
                            }],
                            attrs: Arc::new(attrs),
                            withdrawn: Vec::new(),
                        },
                        now,
                    );
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
            |rx: &mut mpsc::Receiver<RibOutput>,
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
