//! The RIB's output side: peer slots and update groups, attribute interning, export decisions per target,
//! the change log and the pump that fills each session's channel from its cursor (table walk, then log),
//! and the per-peer queues kept for ADD-PATH send sessions (bounded, coalescing into a dirty set when full)
//! and their flushing.

#[allow(unused_imports)]
use super::*;
use crate::bgp::rib::flush::flush_now;

impl State {
    pub(super) fn meta(&self, slot: u16) -> SourceMeta {
        let s = &self.slots[slot as usize];
        SourceMeta {
            kind: s.kind,
            router_id: s.info.router_id,
            address: s.info.address,
        }
    }

    pub(super) fn alloc_slot(&mut self, peer: PeerId, info: PeerInfo, kind: Kind) -> u16 {
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

    pub(super) fn free_slot(&mut self, slot: u16) {
        let s = &mut self.slots[slot as usize];
        if s.behind {
            s.behind = false;
            self.behind -= 1;
        }
        if let Some(id) = s.id.take() {
            self.by_id.remove(&id);
        }
        s.in_use = false;
        s.up = false;
        s.out = None;
        s.walk = None;
        s.cursor = 0;
        s.dirty = HashSet::new();
        s.dirty_tail = Vec::new();
        s.deadline = None;
        s.counters = PeerCounters::default();
        self.free.push(slot);
        self.recount_add_path();
        self.clear_caches();
    }

    /// Write `msg` to `t`'s socket here ([`DirectOut`]) if its session holds nothing the RIB sent it and
    /// nothing is queued for its socket: one member of an update group costs one write, not a wake-up of
    /// its task. The bytes are the group's shared encoding when its context matches. Returns the message
    /// when it must go through the channel instead.
    pub(super) fn write_direct(&mut self, t: u16, msg: RibOutput) -> Option<RibOutput> {
        let Some(d) = self.slots[t as usize].out.as_ref().and_then(Out::direct_ok) else {
            return Some(msg);
        };
        let ctx = d.ctx();
        let encoded = match &msg {
            RibOutput::Updates {
                family,
                attrs,
                nlri,
                wire,
            } => wire.get_or_encode(ctx, |b| {
                encode_updates(attrs, *family, nlri, ctx, b).map(|_| ())
            }),
            RibOutput::Withdraw { family, nlri, wire } => wire.get_or_encode(ctx, |b| {
                encode_withdrawals(*family, nlri, ctx, b).map(|_| ())
            }),
            _ => return Some(msg),
        };
        // An encoding error is the session's to report: it gets the message.
        let Ok(bytes) = encoded else {
            return Some(msg);
        };
        if !d.try_queue(&bytes) {
            return Some(msg);
        }
        // Alone, the RIB writes it at once; with a helper, by chunks.
        if self.flusher.is_none() {
            d.flush();
            return None;
        }
        let d = d.clone();
        self.flushes.push(d);
        if self.flushes.len() >= FLUSH_CHUNK {
            self.hand_flushes(false);
        }
        None
    }

    /// Put what [`State::write_direct`] queued in the flush queue, and write its older chunks here,
    /// leaving the newest to the helper thread; at the end of a change (`last`), write every chunk
    /// left, so nothing waits for the helper.
    pub(super) fn hand_flushes(&mut self, last: bool) {
        let Some(q) = &self.flusher else {
            return;
        };
        let chunk = std::mem::take(&mut self.flushes);
        if last {
            q.drain();
            flush_now(&chunk);
        } else {
            q.push(chunk);
            if let Some(older) = q.take_beyond(1) {
                flush_now(&older);
            }
        }
    }

    pub(super) fn recount_add_path(&mut self) {
        self.add_path_peers = self
            .slots
            .iter()
            .filter(|s| s.up && !s.info.add_path_tx.is_empty())
            .count();
    }

    pub(super) fn clear_caches(&mut self) {
        for g in &mut self.groups {
            g.cache.clear();
        }
    }

    /// The update group of a target with these settings, made on first use. Groups are never removed: there
    /// are as many as distinct settings (a handful), not peers.
    pub(super) fn group_for(&mut self, kind: Kind, info: &PeerInfo) -> usize {
        let key = GroupKey::of(kind, info);
        if let Some(g) = self.group_ids.get(&key) {
            return *g;
        }
        self.groups.push(Group::default());
        let g = self.groups.len() - 1;
        self.group_ids.insert(key, g);
        g
    }

    pub(super) fn path_added(&mut self, p: &Path) {
        self.slots[p.slot as usize].counters.accepted += 1;
    }

    pub(super) fn path_gone(&mut self, p: &Path) {
        let c = &mut self.slots[p.slot as usize].counters;
        c.accepted = c.accepted.saturating_sub(1);
        if p.stale() {
            c.stale = c.stale.saturating_sub(1);
        }
        if p.llgr() {
            c.llgr_stale = c.llgr_stale.saturating_sub(1);
        }
    }

    /// RFC 4271 9.1.2 AS loop (eBGP) and RFC 4456 8 ORIGINATOR_ID / CLUSTER_LIST loops (iBGP).
    pub(super) fn import_loop(&self, slot: u16, attrs: &PathAttributes) -> bool {
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
    pub(super) fn intern(&mut self, attrs: Arc<PathAttributes>) -> Arc<PathAttributes> {
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
    pub(super) fn maybe_gc(&mut self) {
        if self.interner.len() <= self.gc_threshold {
            return;
        }
        self.clear_caches();
        self.interner.retain(|a| Arc::strong_count(a) > 1);
        self.gc_threshold = (self.interner.len() * 2).max(1024);
    }

    pub(super) fn view(&self, p: &Path, best: bool) -> PathView {
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
            llgr_stale: p.attrs.communities.contains(&LLGR_STALE),
        }
    }

    /// What target `t` receives for `path` as best of `prefix`, under `policy`.
    pub(super) fn export(
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
        // RFC 9494 4.5: a long-lived stale route goes only to peers that negotiated LLGR; the others get a
        // withdrawal (the optional NO_EXPORT + LOCAL_PREF 0 variant for iBGP is not done).
        if path.attrs.communities.contains(&LLGR_STALE) && !llgr_aware(&ts.info) {
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
        if let Some((_, out)) = self.groups[group].cache.get(&key) {
            return out.clone();
        }
        let rewritten = export::rewrite(path, &src, &tgt, family, self.cfg.effective_cluster_id());
        let out = rewritten.map(|a| self.intern(Arc::new(a)));
        self.groups[group]
            .cache
            .insert(key, (path.attrs.clone(), out.clone()));
        out
    }

    /// Propagate a change of `prefix` to every established peer and to the FIB: a best-path change to every
    /// session, any path change to the ADD-PATH send sessions. `old_all` is every path before the change
    /// (needed only while `add_path_peers > 0`). `at` is the prefix's change-log position (`Dest::log`);
    /// returns it as it is after the change, for the caller to store in the prefix's table entry (a prefix
    /// that leaves the table, `new` None, has it kept by the log).
    pub(super) fn settle(
        &mut self,
        prefix: IpNetwork,
        old: Option<&Path>,
        old_all: &[Path],
        old_nh: Option<Vec<IpAddr>>,
        new: Option<&Dest>,
        at: u64,
    ) -> u64 {
        let mut at = at;
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
            // The peer the route came from is usually not sent it before or after (it is the source):
            // the log entry says so, and that member sends no withdrawal for it.
            let quiet = match new_best.or(old) {
                Some(p) if changed && self.reads_log(p.slot) && !self.multi(p.slot, family) => {
                    let t = p.slot;
                    let before = old.and_then(|p| self.export(t, &prefix, p, &policy));
                    let after = new_best.and_then(|p| self.export(t, &prefix, p, &policy));
                    if before.is_none() && after.is_none() {
                        t
                    } else {
                        NO_QUIET
                    }
                }
                _ => NO_QUIET,
            };
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
                    self.diff(t, prefix, e_old, e_new, quiet, &mut at);
                }
            }
        }
        if new.is_none() {
            self.log.forget(prefix, at);
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
        at
    }

    /// What target `t` is owed for a change of `prefix` from export `old` to `new`. `quiet`: the
    /// member the change does not concern, for the log entry (see `log::Quiet`); `at`: the prefix's
    /// change-log position, updated.
    pub(super) fn diff(
        &mut self,
        t: u16,
        prefix: IpNetwork,
        old: Option<Arc<PathAttributes>>,
        new: Option<Arc<PathAttributes>>,
        quiet: Quiet,
        at: &mut u64,
    ) {
        match (old, new) {
            (Some(o), Some(n)) if Arc::ptr_eq(&o, &n) => {}
            (o, Some(n)) => {
                if o.is_none() && self.counted(t, &prefix) {
                    self.slots[t as usize].counters.advertised += 1;
                }
                if self.reads_log(t) {
                    let g = group_bit(self.slots[t as usize].group);
                    self.log.push(prefix, at, g, quiet);
                } else {
                    self.queue_announce(t, prefix, 0, n);
                }
            }
            (Some(_), None) => {
                if self.counted(t, &prefix) {
                    let c = &mut self.slots[t as usize].counters;
                    c.advertised = c.advertised.saturating_sub(1);
                }
                if self.reads_log(t) {
                    let g = group_bit(self.slots[t as usize].group);
                    self.log.push(prefix, at, g, quiet);
                } else {
                    self.queue_withdraw(t, prefix, 0);
                }
            }
            (None, None) => {}
        }
    }

    /// The ADD-PATH send version of [`State::diff`]: withdraw the path ids that are gone, announce the new
    /// ones and those whose attributes changed (RFC 7911 3: a path id identifies the path to be replaced or
    /// withdrawn).
    pub(super) fn diff_multi(
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
    pub(super) fn multi(&self, t: u16, family: Family) -> bool {
        self.slots[t as usize].info.add_path_tx.contains(&family)
    }

    /// What an ADD-PATH send target `t` holds for `paths` of `prefix`: (path id, attributes) for each path
    /// export allows, best first. Two paths that would share an id (see [`tx_path_id`]) are cut to the
    /// better one, so a path id never stands for two paths at once.
    pub(super) fn export_all(
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

    /// What target `t` is owed for `d`'s prefix when the export policy changes from `old` to `new`;
    /// returns the prefix's change-log position as it is after (`Dest::log`).
    pub(super) fn policy_diff(
        &mut self,
        t: u16,
        prefix: IpNetwork,
        d: &Dest,
        old: &Policy,
        new: &Policy,
    ) -> u64 {
        if self.multi(t, family_of(&prefix)) {
            let e_old = self.export_all(t, &prefix, d.paths(), old);
            let e_new = self.export_all(t, &prefix, d.paths(), new);
            self.diff_multi(t, prefix, e_old, e_new);
            return d.log;
        }
        let e_old = self.export(t, &prefix, d.best(), old);
        let e_new = self.export(t, &prefix, d.best(), new);
        let mut at = d.log;
        self.diff(t, prefix, e_old, e_new, NO_QUIET, &mut at);
        at
    }

    /// Queue what target `t` holds for `prefix` (a table dump, a route refresh): the best path, or every
    /// path on an ADD-PATH send session.
    pub(super) fn announce(&mut self, t: u16, prefix: IpNetwork, d: &Dest, policy: &Policy) {
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

    pub(super) fn queue_announce(
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
                wire: SharedWire::none(),
            };
            self.send(t, msg);
        }
    }

    pub(super) fn queue_withdraw(&mut self, t: u16, prefix: IpNetwork, path_id: u32) {
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
            self.send(
                t,
                RibOutput::Withdraw {
                    family,
                    nlri,
                    wire: SharedWire::none(),
                },
            );
        }
    }

    /// Hand `msg` to the peer's session, or, when its channel is full (or already has a backlog here),
    /// fold it into the peer's dirty set: the RIB never buffers a table for a slow peer.
    pub(super) fn send(&mut self, t: u16, msg: RibOutput) {
        if self.deferring.is_some() {
            // RFC 4724 4.1: nothing leaves while selection is deferred; the whole table goes when it ends.
            return;
        }
        let s = &mut self.slots[t as usize];
        let Some(out) = &mut s.out else { return };
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

    /// Hand every peer what this step queued for it. Messages that several peers get unchanged (the same
    /// attribute set and prefixes: a route reflected to a whole update group) carry one [`SharedWire`],
    /// so the UPDATE is encoded once for all of them.
    pub(super) fn flush_all(&mut self) {
        let mut shared = WireShare {
            enabled: true,
            ..Default::default()
        };
        for t in 0..self.slots.len() as u16 {
            if !self.slots[t as usize].pending.is_empty() {
                self.flush_into(t, &mut shared);
            }
        }
    }

    /// Hand one peer what is queued for it (a table dump or a route refresh: nobody else gets the same).
    pub(super) fn flush(&mut self, t: u16) {
        self.flush_into(t, &mut WireShare::default());
    }

    fn flush_into(&mut self, t: u16, shared: &mut WireShare) {
        let p = std::mem::take(&mut self.slots[t as usize].pending);
        for (family, nlri) in p.withdrawn {
            if !nlri.is_empty() {
                let wire = shared.wire(family, 0, &nlri);
                self.send(t, RibOutput::Withdraw { family, nlri, wire });
            }
        }
        for (family, attrs, nlri) in p.groups {
            if !nlri.is_empty() {
                let wire = shared.wire(family, Arc::as_ptr(&attrs) as usize, &nlri);
                self.send(
                    t,
                    RibOutput::Updates {
                        family,
                        attrs,
                        nlri,
                        wire,
                    },
                );
            }
        }
    }
}

/// How many sessions' direct writes make one chunk of the flush queue ([`State::hand_flushes`]): small
/// enough that the first sessions' bytes leave while the RIB still queues for the others and that the
/// RIB and its helper end a change close together, large enough that a chunk's lock and wake-up cost
/// little beside its writes. At 2,000 clients 32 was a little faster than 64 and no slower than 16
/// (BENCHMARKS.md, session 12).
const FLUSH_CHUNK: usize = 32;

/// The messages of one flush, by content, so equal messages to different peers share their encoding.
/// Only small messages are compared (a route or a few changing, the fan-out case); a table dump goes
/// to one peer at a time and is not worth hashing.
#[derive(Default)]
struct WireShare {
    enabled: bool,
    seen: HashMap<(Family, usize, Vec<Nlri>), SharedWire>,
    /// The last message asked for: members read in turn, so in the fan-out case every member after the
    /// first asks for the same one (no key to build, nothing to hash).
    last: Option<(Family, usize, Vec<Nlri>, SharedWire)>,
}

impl WireShare {
    /// Most prefixes in a message that is looked up for sharing.
    const MAX_PREFIXES: usize = 64;

    /// `attrs`: the interned attribute set's address (0 for a withdrawal); interning makes equal sets
    /// the same allocation.
    fn wire(&mut self, family: Family, attrs: usize, nlri: &[Nlri]) -> SharedWire {
        if !self.enabled || nlri.len() > Self::MAX_PREFIXES {
            return SharedWire::none();
        }
        if let Some((f, a, n, w)) = &self.last {
            if *f == family && *a == attrs && n[..] == *nlri {
                return w.clone();
            }
        }
        let w = self
            .seen
            .entry((family, attrs, nlri.to_vec()))
            .or_insert_with(SharedWire::shared)
            .clone();
        self.last = Some((family, attrs, nlri.to_vec(), w.clone()));
        w
    }
}

/// Did the peer negotiate long-lived graceful restart (so it may receive LLGR_STALE routes)?
pub(super) fn llgr_aware(info: &PeerInfo) -> bool {
    info.graceful_restart
        .as_ref()
        .is_some_and(|g| g.long_lived.is_some())
}

/// Is `a` before `b` in table order (the order a walk visits prefixes in)?
fn table_before(a: &IpNetwork, b: &IpNetwork) -> bool {
    match (a, b) {
        (IpNetwork::V4(a), IpNetwork::V4(b)) => V4Key::new(*a) < V4Key::new(*b),
        (IpNetwork::V6(a), IpNetwork::V6(b)) => V6Key::new(*a) < V6Key::new(*b),
        _ => false,
    }
}

/// Export, whether two messages' attributes are the same (both withdrawals, or the same interned set).
fn same_attrs(a: &Option<Arc<PathAttributes>>, b: &Option<Arc<PathAttributes>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

impl State {
    /// Does target `t` read its output from the change log? Every established session does except those
    /// with ADD-PATH send: what such a peer holds is a set of path ids per prefix, which
    /// "send the current export of this prefix" cannot withdraw correctly without knowing the ids sent
    /// before, so they keep the per-peer queue (`pending`, then the dirty set).
    pub(super) fn reads_log(&self, t: u16) -> bool {
        let s = &self.slots[t as usize];
        t != LOCAL_SLOT && s.up && s.info.add_path_tx.is_empty()
    }

    /// Whether a change of `prefix` for `t` moves its `advertised` counter now: not while `t`'s initial
    /// walk has still to reach the prefix (the walk counts what it sends).
    pub(super) fn counted(&self, t: u16, prefix: &IpNetwork) -> bool {
        let Some(w) = &self.slots[t as usize].walk else {
            return true;
        };
        let family = family_of(prefix);
        match w.families.iter().position(|(f, _)| *f == family) {
            // Not walked, or walked for a route refresh (which keeps the counter as it is).
            None => true,
            Some(i) if !w.families[i].1 => true,
            Some(0) => w.done || w.next.is_some_and(|n| table_before(prefix, &n)),
            Some(_) => false,
        }
    }

    /// Some log-reading member has not read the log to the end, or is walking the table. A count kept
    /// by every pump ([`State::mark_behind`]), not a look at every session: the RIB task asks after each
    /// bell, and at thousands of sessions the look cost more than serving the sessions that rang.
    pub(super) fn log_backlog(&self) -> bool {
        // While deferring nothing is pumped: no reason to look again before the deferral ends.
        if self.deferring.is_some() {
            return false;
        }
        debug_assert_eq!(
            self.behind,
            (1..self.slots.len() as u16)
                .filter(|t| self.is_behind(*t))
                .count(),
            "the count of sessions behind in the log is out of step"
        );
        self.behind > 0
    }

    fn is_behind(&self, t: u16) -> bool {
        self.reads_log(t) && {
            let s = &self.slots[t as usize];
            s.walk.is_some() || s.cursor < self.log.head()
        }
    }

    /// Note whether `t` is behind in the log (or walking) after a pump: `State::behind` counts them.
    pub(super) fn mark_behind(&mut self, t: u16) {
        let now = self.is_behind(t);
        let s = &mut self.slots[t as usize];
        if s.behind != now {
            s.behind = now;
            if now {
                self.behind += 1;
            } else {
                self.behind -= 1;
            }
        }
    }

    /// Drop the log entries every member has read (all of them when no member reads: a member that joins
    /// walks the table).
    pub(super) fn trim_logs(&mut self) {
        let mut low: Option<u64> = None;
        for t in 1..self.slots.len() as u16 {
            if !self.reads_log(t) {
                continue;
            }
            let s = &self.slots[t as usize];
            let pos = s.walk.as_ref().map_or(s.cursor, |w| w.from);
            low = Some(low.map_or(pos, |l| l.min(pos)));
        }
        self.log.trim(low.unwrap_or(u64::MAX));
    }
}

impl Rib {
    /// Hand every log-reading session what its channel has room for: first the rest of its table walk
    /// (then End-of-RIB), then the log entries for its group after its cursor, each as the prefix's
    /// export is now. Sessions at the same place get equal messages, which share one encoding
    /// ([`SharedWire`]). Nothing leaves while route selection is deferred (RFC 4724 4.1).
    pub(super) fn pump_logs(&mut self) {
        if self.st.deferring.is_some() {
            return;
        }
        self.pump_slots(1..self.st.slots.len() as u16);
        self.st.trim_logs();
    }

    /// [`Rib::pump_logs`] for the given slots only, without trimming the logs (the next full pump does).
    pub(super) fn pump_slots(&mut self, slots: impl Iterator<Item = u16>) {
        if self.st.deferring.is_some() {
            return;
        }
        let mut share = WireShare {
            enabled: true,
            ..Default::default()
        };
        let policy = self.st.policy.clone();
        self.st.log.expose();
        for t in slots {
            if usize::from(t) >= self.st.slots.len() {
                continue;
            }
            if self.st.reads_log(t) {
                self.pump(t, &policy, &mut share);
            }
            self.st.mark_behind(t);
        }
        self.st.hand_flushes(true);
    }

    fn pump(&mut self, t: u16, policy: &Policy, share: &mut WireShare) {
        let max = self.st.cfg.max_batch.max(1);
        loop {
            let s = &self.st.slots[t as usize];
            // The RIB is the channel's only sender: room seen here is still there at `try_send`. A
            // session that has taken everything sent to it has an empty channel (no lock to look).
            let room = match &s.out {
                Some(out) if s.dirty_tail.is_empty() => {
                    if out.direct_ok().is_some() {
                        usize::MAX
                    } else {
                        out.capacity()
                    }
                }
                _ => 0,
            };
            if room == 0 {
                return;
            }
            let msg = if s.walk.is_some() {
                match self.walk_step(t, policy, max, share) {
                    Some(m) => m,
                    None => continue,
                }
            } else {
                let Some(m) = self.log_step(t, policy, max, share) else {
                    return;
                };
                // The fan-out case: the member has read the whole log, and this is all it gets now.
                let last = self.st.slots[t as usize].cursor == self.st.log.head();
                match if last {
                    self.st.write_direct(t, m)
                } else {
                    Some(m)
                } {
                    Some(m) => m,
                    None => return,
                }
            };
            if let Some(out) = &mut self.st.slots[t as usize].out {
                // Closed: the session is gone and its PeerDown is on the way.
                let _ = out.try_send(msg);
            }
        }
    }

    /// The next message of `t`'s table walk: a run of prefixes sharing one attribute set, or End-of-RIB.
    /// None when the walk is over (the member then reads the log from where the walk began).
    fn walk_step(
        &mut self,
        t: u16,
        policy: &Policy,
        max: usize,
        share: &mut WireShare,
    ) -> Option<RibOutput> {
        loop {
            let s = &mut self.st.slots[t as usize];
            let w = s.walk.as_mut()?;
            let Some(&(family, eor)) = w.families.first() else {
                s.cursor = w.from;
                s.walk = None;
                return None;
            };
            if w.done {
                w.families.remove(0);
                w.next = None;
                w.done = false;
                if eor {
                    return Some(RibOutput::EndOfRib(family));
                }
                continue;
            }
            let start = w.next;
            let count = eor;
            let st = &mut self.st;
            let (run, resume) = if family == Family::IPV4_UNICAST {
                let from = match start {
                    Some(IpNetwork::V4(n)) => Some(V4Key::new(n)),
                    _ => None,
                };
                walk_run(&self.tables.v4, from, st, t, policy, max)
            } else if family == Family::IPV6_UNICAST {
                let from = match start {
                    Some(IpNetwork::V6(n)) => Some(V6Key::new(n)),
                    _ => None,
                };
                walk_run(&self.tables.v6, from, st, t, policy, max)
            } else {
                (None, None)
            };
            let s = &mut self.st.slots[t as usize];
            if let Some(w) = s.walk.as_mut() {
                w.next = resume;
                w.done = resume.is_none();
            }
            let Some((attrs, nlri)) = run else { continue };
            if count {
                s.counters.advertised += nlri.len() as u64;
            }
            let wire = share.wire(family, Arc::as_ptr(&attrs) as usize, &nlri);
            return Some(RibOutput::Updates {
                family,
                attrs,
                nlri,
                wire,
            });
        }
    }

    /// The next message from the log for `t`: the entries after its cursor that concern its update group
    /// and whose current export is the same (one attribute set, or withdrawals of one family), at most
    /// `max`. None when it has read all.
    fn log_step(
        &mut self,
        t: u16,
        policy: &Policy,
        max: usize,
        share: &mut WireShare,
    ) -> Option<RibOutput> {
        let bit = group_bit(self.st.slots[t as usize].group);
        let mut cursor = self.st.slots[t as usize].cursor;
        let mut run: Option<(Family, Option<Arc<PathAttributes>>, Vec<Nlri>)> = None;
        let mut entries = std::mem::take(&mut self.st.log_read);
        // Read in growing chunks: a run of one prefix (the fan-out case) copies a few entries, a run of
        // `max` (a table load) a few chunks.
        let mut chunk = 2usize;
        'read: loop {
            self.st.log.entries_after(cursor, chunk, &mut entries);
            if entries.is_empty() {
                break;
            }
            chunk = chunk.saturating_mul(2).min(max.saturating_add(1));
            for e in &entries {
                let Some(prefix) = e.prefix else { continue };
                let family = family_of(&prefix);
                // Not for its group, or a change that did not concern it (nothing before, nothing
                // now: no withdrawal of a prefix it was never sent), or a family it does not carry.
                if e.groups & bit == 0
                    || e.quiet == t
                    || !self.st.slots[t as usize].info.families.contains(&family)
                {
                    cursor = e.seq;
                    continue;
                }
                let st = &mut self.st;
                let attrs = self
                    .tables
                    .get(&prefix)
                    .and_then(|d| st.export(t, &prefix, d.best(), policy));
                let nlri = Nlri { prefix, path_id: 0 };
                match &mut run {
                    None => run = Some((family, attrs, vec![nlri])),
                    Some((f, a, v)) if *f == family && same_attrs(a, &attrs) && v.len() < max => {
                        v.push(nlri)
                    }
                    Some(_) => break 'read,
                }
                cursor = e.seq;
            }
        }
        self.st.log_read = entries;
        self.st.slots[t as usize].cursor = cursor;
        let (family, attrs, nlri) = run?;
        let wire = share.wire(
            family,
            attrs.as_ref().map_or(0, |a| Arc::as_ptr(a) as usize),
            &nlri,
        );
        Some(match attrs {
            Some(attrs) => RibOutput::Updates {
                family,
                attrs,
                nlri,
                wire,
            },
            // RFC 4271 3.1: withdrawing a prefix the peer may not hold is allowed; the log does not keep
            // what each member was sent, so a member unaffected by a change other than the entry's quiet
            // one (usually the route's source) can get one.
            None => RibOutput::Withdraw { family, nlri, wire },
        })
    }
}

/// Prefixes that go out together: one attribute set, in table order.
type Run = (Arc<PathAttributes>, Vec<Nlri>);

/// One run of a table walk from `from` (None: the start): the prefixes `t` gets, in order, while they
/// share one attribute set, at most `max`; and where the walk resumes (None: the table is done).
fn walk_run<K: PrefixKey>(
    map: &ChunkMap<K, Dest>,
    from: Option<K>,
    st: &mut State,
    t: u16,
    policy: &Policy,
    max: usize,
) -> (Option<Run>, Option<IpNetwork>) {
    let iter: Box<dyn Iterator<Item = (&K, &Dest)>> = match from {
        Some(k) => Box::new(map.iter_from(&k)),
        None => Box::new(map.iter()),
    };
    let mut run: Option<Run> = None;
    for (k, d) in iter {
        let prefix = k.to_net();
        let Some(a) = st.export(t, &prefix, d.best(), policy) else {
            continue;
        };
        let nlri = Nlri { prefix, path_id: 0 };
        match &mut run {
            None => run = Some((a, vec![nlri])),
            Some((r, v)) if Arc::ptr_eq(r, &a) && v.len() < max => v.push(nlri),
            Some(_) => return (run, Some(prefix)),
        }
    }
    (run, None)
}
