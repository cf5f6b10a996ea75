//! What happens to the RIB when a peer comes, goes, sends routes, End-of-RIB or a refresh request, and
//! when local routes are originated: the per-peer lifecycle of [`Rib`], and the table edits it makes
//! (stale marking, upserts, removals, the FIB's next hops).

#[allow(unused_imports)]
use super::*;

impl Rib {
    pub(super) fn up_slot(&self, peer: PeerId) -> Option<u16> {
        self.st
            .by_id
            .get(&peer)
            .copied()
            .filter(|&s| self.st.slots[s as usize].up)
    }

    // ----- peers -----

    pub(super) fn peer_up(
        &mut self,
        peer: PeerId,
        info: PeerInfo,
        out: chan::Sender<RibOutput>,
        direct: Option<Arc<dyn DirectOut>>,
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
                    self.st.slots[slot as usize].llgr_until.clear();
                }
                slot
            }
            None => self.st.alloc_slot(peer, info.clone(), kind),
        };
        let group = self.st.group_for(kind, &info);
        out.ring_on_room(self.room.clone(), usize::from(slot));
        {
            let s = &mut self.st.slots[slot as usize];
            s.info = info;
            s.kind = kind;
            s.group = group;
            s.generation = 0;
            s.up = true;
            s.out = Some(Out {
                tx: out,
                sent: 0,
                direct,
            });
            s.cursor = 0;
            s.walk = None;
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
        // routes at once; the rest wait for End-of-RIB, bounded by the stale-routes time. A family in the
        // long-lived phase is judged by the F bit of the new session's LLGR capability, and goes at once when
        // the new session has no LLGR for it (RFC 9494 4.2).
        let stale_families = self.st.slots[slot as usize].stale_families.clone();
        let mut waiting = Vec::new();
        for f in stale_families {
            let s = &self.st.slots[slot as usize];
            let long_lived = s.llgr_until.iter().any(|(g, _)| *g == f);
            let preserved = s.info.graceful_restart.as_ref().is_some_and(|gr| {
                if long_lived {
                    gr.long_lived.as_ref().is_some_and(|l| {
                        l.forwarding_preserved.contains(&f)
                            && l.families.iter().any(|(g, _)| *g == f)
                    })
                } else {
                    gr.forwarding_preserved.contains(&f)
                }
            });
            if preserved {
                waiting.push(f);
            } else {
                self.st.slots[slot as usize]
                    .llgr_until
                    .retain(|(g, _)| *g != f);
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
    pub(super) fn dump_table(&mut self, slot: u16) {
        if self.st.reads_log(slot) {
            // Walked by the session's pump as its channel has room (also once a deferral ends: nothing is
            // pumped before), then it reads the log from here.
            let s = &mut self.st.slots[slot as usize];
            s.counters.advertised = 0;
            s.walk = Some(Walk {
                families: s.info.families.iter().map(|f| (*f, true)).collect(),
                next: None,
                from: self.st.log.head(),
                done: false,
            });
            return;
        }
        if self.st.deferring.is_some() {
            // Sent when the deferral ends (`end_deferral`).
            return;
        }
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
    pub(super) fn route_refresh(&mut self, peer: PeerId, family: Family) {
        let Some(slot) = self.up_slot(peer) else {
            return;
        };
        if !self.st.slots[slot as usize].info.families.contains(&family) {
            // RFC 2918 4: a refresh for a family not negotiated is ignored.
            return;
        }
        if self.st.reads_log(slot) {
            // Walked again by the pump, then the log from where the session is now.
            let s = &mut self.st.slots[slot as usize];
            match s.walk.as_mut() {
                Some(w) => w.add(family, false),
                None => {
                    s.walk = Some(Walk {
                        families: vec![(family, false)],
                        next: None,
                        from: s.cursor,
                        done: false,
                    })
                }
            }
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

    pub(super) fn peer_down(&mut self, peer: PeerId, graceful: bool, now: Instant) {
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
        s.walk = None;
        s.cursor = 0;
        s.dirty = HashSet::new();
        s.dirty_tail = Vec::new();
        s.pending = Pending::default();
        s.counters.advertised = 0;
        self.st.recount_add_path();
        let s = &self.st.slots[slot as usize];
        let restart = s.info.graceful_restart.as_ref().map(|g| g.restart_time);
        // RFC 9494 4.2: with LLGR a zero restart time goes straight to the long-lived phase.
        let long_lived = s.info.graceful_restart.as_ref().is_some_and(|g| {
            g.long_lived
                .as_ref()
                .is_some_and(|l| l.families.iter().any(|(_, t)| !t.is_zero()))
        });
        let has_routes = s.counters.accepted > 0;
        self.st.clear_caches();
        match restart {
            Some(restart_time)
                if graceful && has_routes && (!restart_time.is_zero() || long_lived) =>
            {
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
                tracing::info!(
                    ?peer,
                    stale = n,
                    restart_time = ?restart_time,
                    "graceful restart: keeping routes of peer as stale"
                );
                if restart_time.is_zero() {
                    self.enter_long_lived(slot, now);
                    let s = &self.st.slots[slot as usize];
                    if s.llgr_until.is_empty() {
                        self.sweep_stale(slot, None);
                        self.st.free_slot(slot);
                    }
                } else {
                    s.deadline = Some(now + restart_time);
                }
            }
            _ => {
                self.remove_all(slot);
                self.st.free_slot(slot);
            }
        }
    }

    /// The restart time of a down peer has ended (at `at`): RFC 9494 4.2. Each stale family the peer
    /// negotiated LLGR for stays, its routes carrying NO_LLGR dropped and the others marked LLGR_STALE (least
    /// preferred from now on, re-advertised with the community to LLGR peers and withdrawn from the rest),
    /// until its Long-Lived Stale Time runs out; a family whose timer already runs from an earlier outage
    /// keeps it. Every other family is swept (RFC 4724 4.2).
    pub(super) fn enter_long_lived(&mut self, slot: u16, at: Instant) {
        let s = &self.st.slots[slot as usize];
        let gr = s.info.graceful_restart.clone();
        let address = s.info.address;
        let families = s.stale_families.clone();
        let mut keep = Vec::new();
        for f in families {
            match gr.as_ref().and_then(|g| g.long_lived_time(f)) {
                Some(t) => {
                    let (dropped, kept) = self.mark_long_lived(slot, f);
                    let s = &mut self.st.slots[slot as usize];
                    if !s.llgr_until.iter().any(|(g, _)| *g == f) {
                        s.llgr_until.push((f, at + t));
                    }
                    tracing::warn!(peer = %address, family = %f, kept, dropped_no_llgr = dropped, stale_time = ?t,
                        "long-lived graceful restart: restart time over, keeping the peer's routes as LLGR_STALE (least preferred)");
                    keep.push(f);
                }
                None => {
                    tracing::info!(peer = %address, family = %f, "graceful restart: restart time over, sweeping stale routes");
                    self.sweep_stale(slot, Some(f));
                }
            }
        }
        self.st.slots[slot as usize].stale_families = keep;
    }

    /// Mark the stale paths of `slot` in `family` long-lived stale (RFC 9494 4.2): drop those carrying
    /// NO_LLGR, add LLGR_STALE to the others. Returns (dropped, marked).
    pub(super) fn mark_long_lived(&mut self, slot: u16, family: Family) -> (u64, u64) {
        let mut n = (0, 0);
        let mut cache = HashMap::default();
        if family == Family::IPV4_UNICAST {
            long_lived_in(&mut self.tables.v4, &mut self.st, slot, &mut cache, &mut n);
        } else if family == Family::IPV6_UNICAST {
            long_lived_in(&mut self.tables.v6, &mut self.st, slot, &mut cache, &mut n);
        }
        n
    }

    pub(super) fn end_of_rib(&mut self, peer: PeerId, family: Family) {
        let Some(slot) = self.up_slot(peer) else {
            return;
        };
        let s = &mut self.st.slots[slot as usize];
        // RFC 9494 4.2: synchronised again, so a later outage starts a fresh Long-Lived Stale Time.
        s.llgr_until.retain(|(f, _)| *f != family);
        if let Some(i) = s.stale_families.iter().position(|f| *f == family) {
            s.stale_families.remove(i);
            if s.stale_families.is_empty() {
                s.deadline = None;
            }
            self.sweep_stale(slot, Some(family));
        }
    }

    // ----- routes -----

    pub(super) fn routes(
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

    pub(super) fn originate(&mut self, prefixes: Vec<IpNetwork>, attrs: Arc<PathAttributes>) {
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
    pub(super) fn upsert(&mut self, prefix: IpNetwork, path: Path, allow_new: bool) -> bool {
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

    pub(super) fn remove_path(&mut self, slot: u16, prefix: IpNetwork, path_id: u32) {
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
    pub(super) fn remove_all(&mut self, slot: u16) {
        let pred = move |p: &Path| p.slot == slot;
        retain_paths(&mut self.tables.v4, &mut self.st, pred);
        retain_paths(&mut self.tables.v6, &mut self.st, pred);
    }

    /// Remove the stale paths of `slot` (of one family, or all).
    pub(super) fn sweep_stale(&mut self, slot: u16, family: Option<Family>) {
        let pred = move |p: &Path| p.slot == slot && p.stale();
        if family.is_none_or(|f| f == Family::IPV4_UNICAST) {
            retain_paths(&mut self.tables.v4, &mut self.st, pred);
        }
        if family.is_none_or(|f| f == Family::IPV6_UNICAST) {
            retain_paths(&mut self.tables.v6, &mut self.st, pred);
        }
    }

    pub(super) fn set_policy(&mut self, policy: Arc<Policy>) {
        let old = std::mem::replace(&mut self.st.policy, policy.clone());
        let st = &mut self.st;
        for slot in 0..st.slots.len() as u16 {
            if !st.slots[slot as usize].up {
                continue;
            }
            for (k, d) in self.tables.v4.iter_mut() {
                d.log = st.policy_diff(slot, k.to_net(), d, &old, &policy);
            }
            for (k, d) in self.tables.v6.iter_mut() {
                d.log = st.policy_diff(slot, k.to_net(), d, &old, &policy);
            }
        }
    }
}

/// Flag every path of `slot` in `d` stale; returns how many were marked.
pub(super) fn mark_stale(
    d: &mut Dest,
    slot: u16,
    families: &mut Vec<Family>,
    family: Family,
) -> u64 {
    let mut n = 0;
    let mark = |p: &mut Path| {
        if p.slot == slot {
            p.flags |= FLAG_STALE;
            n += 1;
        }
    };
    d.paths_mut().iter_mut().for_each(mark);
    if n > 0 && !families.contains(&family) {
        families.push(family);
    }
    n
}

pub(super) fn remove_in<K: PrefixKey>(
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

pub(super) fn upsert_in<K: PrefixKey>(
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
            path.flags = crate::bgp::rib::table::FLAG_ECMP;
            let at = st.log.revive(&prefix);
            let pos = map.insert_at(pos, key, Dest::one(path, at));
            let d = map.at_mut(pos);
            d.log = st.settle(
                prefix,
                None,
                &[],
                st.fib_enabled.then(Vec::new),
                Some(d),
                at,
            );
            true
        }
        Ok(pos) => {
            let dest = map.at_mut(pos);
            // Fast path: the only path of the prefix replaced by the same peer.
            if let Some(p) = dest.only_mut() {
                if p.slot == path.slot && p.path_id == path.path_id {
                    if Arc::ptr_eq(&p.attrs, &path.attrs) && !p.stale() {
                        return true;
                    }
                    let old_nh = st.fib_enabled.then(|| fib_next_hops(prefix, dest));
                    let Some(p) = dest.only_mut() else {
                        return true;
                    };
                    if p.stale() {
                        st.slots[p.slot as usize].counters.stale -= 1;
                    }
                    if p.llgr() {
                        st.slots[p.slot as usize].counters.llgr_stale -= 1;
                    }
                    path.flags = crate::bgp::rib::table::FLAG_ECMP;
                    let old = std::mem::replace(p, path);
                    dest.log = st.settle(
                        prefix,
                        Some(&old),
                        std::slice::from_ref(&old),
                        old_nh,
                        Some(dest),
                        dest.log,
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
                    if v[i].llgr() {
                        st.slots[path.slot as usize].counters.llgr_stale -= 1;
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

/// Long-lived stale marking of `slot`'s stale paths in one table (see [`Rib::mark_long_lived`]). `cache`
/// maps an attribute set to its LLGR_STALE twin, so a million routes sharing a few sets intern a few.
type LongLivedCache = HashMap<usize, (Arc<PathAttributes>, Arc<PathAttributes>), FastHash>;

pub(super) fn long_lived_in<K: PrefixKey>(
    map: &mut ChunkMap<K, Dest>,
    st: &mut State,
    slot: u16,
    cache: &mut LongLivedCache,
    n: &mut (u64, u64),
) {
    let due = move |p: &Path| p.slot == slot && p.stale() && !p.llgr();
    map.retain(|k, d| {
        if !d.paths().iter().any(due) {
            return true;
        }
        modify(st, k.to_net(), d, |st, v| {
            v.retain(|p| {
                let drop = due(p) && p.attrs.communities.contains(&NO_LLGR);
                if drop {
                    st.path_gone(p);
                    n.0 += 1;
                }
                !drop
            });
            for p in v.iter_mut().filter(|p| due(p)) {
                let key = Arc::as_ptr(&p.attrs) as usize;
                let marked = match cache.get(&key) {
                    Some((_, m)) => m.clone(),
                    None => {
                        let mut a = (*p.attrs).clone();
                        if !a.communities.contains(&LLGR_STALE) {
                            a.communities.push(LLGR_STALE);
                        }
                        let m = st.intern(Arc::new(a));
                        cache.insert(key, (p.attrs.clone(), m.clone()));
                        m
                    }
                };
                p.attrs = marked;
                p.flags |= FLAG_LLGR;
                st.slots[slot as usize].counters.llgr_stale += 1;
                n.1 += 1;
            }
            true
        })
    });
}

/// Remove the paths matching `pred` from every prefix of `map`, re-deciding and propagating each touched prefix.
pub(super) fn retain_paths<K: PrefixKey>(
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
pub(super) fn modify(
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
        // The caller removes the prefix; the log keeps its position (`ChangeLog::forget`).
        st.settle(prefix, Some(&old_best), &old_all, old_nh, None, dest.log);
        return false;
    }
    decision::select(&mut v, &|s| st.meta(s));
    dest.set_paths(v);
    dest.log = st.settle(
        prefix,
        Some(&old_best),
        &old_all,
        old_nh,
        Some(dest),
        dest.log,
    );
    true
}

/// The path id a path goes out under on ADD-PATH send sessions (RFC 7911 3): stable for as long as the
/// path exists, since it is made of what identifies the path here, its peer slot (low 16 bits) and the id
/// the peer gave it (high 16 bits; 0 for a peer without ADD-PATH, so a plain peer's path is its slot).
/// Two paths of one prefix from one ADD-PATH peer whose ids agree in the low 16 bits would collide;
/// `export_all` then sends the better one only.
pub(super) fn tx_path_id(p: &Path) -> u32 {
    (p.path_id << 16) | u32::from(p.slot)
}

/// Did anything an ADD-PATH send session could see change between two path lists of one prefix?
pub(super) fn paths_changed(old: &[Path], new: &[Path]) -> bool {
    old.len() != new.len() || old.iter().any(|o| !new.iter().any(|n| n.same(o)))
}

/// The sorted next hops of the ECMP set, for the FIB (learned routes only).
pub(super) fn fib_next_hops(prefix: IpNetwork, d: &Dest) -> Vec<IpAddr> {
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
