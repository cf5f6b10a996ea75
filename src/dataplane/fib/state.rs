//! The FIB task's state: the desired routes, what the kernel holds, the dirty set between them, and the
//! plan for each dirty prefix.

#[allow(unused_imports)]
use super::*;

/// One kernel write the task decided on.
#[derive(Debug, Clone)]
pub(super) enum Op {
    /// New prefix: NLM_F_EXCL, so a foreign route holding the key makes it fail instead of being replaced.
    Create(Arc<Route>),
    /// Our route is there (or was, and someone touched it): NLM_F_REPLACE.
    Replace(Arc<Route>),
    /// Delete our route at (prefix, metric).
    Delete(IpNetwork, u32),
}

/// Fast, randomly seeded hashing for the per-prefix maps (100k+ entries, several lookups per route on the
/// hot path); SipHash's DoS resistance buys nothing for prefixes margay itself computed.
pub(super) type Hasher = foldhash::fast::RandomState;
pub(super) type Map<K, V> = HashMap<K, V, Hasher>;
pub(super) type Set<K> = HashSet<K, Hasher>;

/// What the task knows about one prefix.
#[derive(Debug, Default)]
pub(super) struct Entry {
    /// The route margay wants (devices resolved), if any.
    pub(super) desired: Option<Arc<Route>>,
    /// Our route in the kernel at our metric, as the kernel reported or acknowledged it.
    pub(super) installed: Option<Arc<Route>>,
    /// The `Sync` generation that last named this prefix.
    pub(super) generation: u64,
    /// Listed in `State::dirty`.
    pub(super) dirty: bool,
    /// Someone else touched it: the kernel may differ from `installed`; write with replace.
    pub(super) suspect: bool,
    /// A write for it is with the kernel and not yet acknowledged.
    pub(super) inflight: bool,
}

/// Everything the task owns. One map entry per prefix keeps the hot path to a few lookups per route.
pub(super) struct State {
    pub(super) cfg: FibConfig,
    pub(super) netns: String,
    pub(super) routes: Map<IpNetwork, Entry>,
    /// Prefixes to look at in the next pass (each once: `Entry::dirty`).
    pub(super) dirty: Vec<IpNetwork>,
    pub(super) generation: u64,
    /// Routes with our protocol at another metric: not ours to keep.
    pub(super) strays: Set<(IpNetwork, u32)>,
    pub(super) conflicts: Map<IpNetwork, String>,
    pub(super) failed: Map<IpNetwork, String>,
    /// Requested routes whose device could not be resolved yet: tried again with the retry timer.
    pub(super) unresolved: Map<IpNetwork, Route>,
    /// Interface name → index cache for one round of requests.
    pub(super) ifindex: HashMap<String, u32>,
    pub(super) stats: FibStats,
}

/// Mark one entry dirty (once).
pub(super) fn mark(dirty: &mut Vec<IpNetwork>, p: IpNetwork, e: &mut Entry) {
    if !e.dirty {
        e.dirty = true;
        dirty.push(p);
    }
}

impl State {
    pub(super) fn new(cfg: FibConfig) -> State {
        State {
            netns: ns_label(cfg.netns.as_deref()),
            cfg,
            routes: Map::default(),
            dirty: Vec::new(),
            generation: 0,
            strays: Set::default(),
            conflicts: Map::default(),
            failed: Map::default(),
            unresolved: Map::default(),
            ifindex: HashMap::new(),
            stats: FibStats::default(),
        }
    }

    pub(super) fn mark_prefix(&mut self, p: IpNetwork) {
        let e = self.routes.entry(p).or_default();
        mark(&mut self.dirty, p, e);
    }

    /// Dump our routes (strict check: the kernel filters by protocol and table) into `installed`.
    pub(super) fn dump_ours(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
        for e in self.routes.values_mut() {
            e.installed = None;
            e.suspect = false;
        }
        self.strays.clear();
        for family in [AddressFamily::Inet, AddressFamily::Inet6] {
            let mut msg = RouteMessage::default();
            msg.header.address_family = family;
            msg.header.protocol = RouteProtocol::from(self.cfg.protocol);
            msg.header.table = table_byte(self.cfg.table);
            msg.attributes.push(RouteAttribute::Table(self.cfg.table));
            let replies = sock
                .dump(RouteNetlinkMessage::GetRoute(msg))
                .map_err(|source| DataplaneError::Netlink {
                    op: "dump routes",
                    object: format!("of protocol {}", self.cfg.protocol),
                    netns: self.netns.clone(),
                    source,
                })?;
            for reply in replies {
                if let RouteNetlinkMessage::NewRoute(m) = reply {
                    // The kernel filters; check again in case an old kernel ignored the filter.
                    if let Some(k) = parse_route(&m) {
                        if k.protocol == self.cfg.protocol && k.table == self.cfg.table {
                            if k.metric == self.cfg.metric {
                                let p = k.route.prefix;
                                self.routes.entry(p).or_default().installed =
                                    Some(Arc::new(k.route));
                            } else {
                                self.strays.insert((k.route.prefix, k.metric));
                            }
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Start-up: take what the kernel holds as the desired state, touching nothing.
    pub(super) fn adopt(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
        self.dump_ours(sock)?;
        let mut n = 0;
        for e in self.routes.values_mut() {
            e.desired = e.installed.clone();
            n += usize::from(e.desired.is_some());
        }
        self.stats.adopted = n as u64;
        Ok(())
    }

    /// After the notification socket overflowed: re-read the kernel and look at everything again.
    pub(super) fn resync(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
        self.stats.resyncs += 1;
        self.dump_ours(sock)?;
        let State { routes, dirty, .. } = self;
        for (p, e) in routes.iter_mut() {
            mark(dirty, *p, e);
        }
        Ok(())
    }

    pub(super) fn status(&self) -> FibStatus {
        let desired = self.routes.values().filter(|e| e.desired.is_some()).count();
        let installed = self
            .routes
            .values()
            .filter(|e| e.installed.is_some())
            .count();
        FibStatus {
            desired,
            installed,
            conflicts: self
                .conflicts
                .iter()
                .map(|(p, s)| (*p, s.clone()))
                .collect(),
            failed: self.failed.iter().map(|(p, s)| (*p, s.clone())).collect(),
            stats: self.stats.clone(),
        }
    }

    pub(super) fn desired_routes(&self) -> Vec<Route> {
        let mut v: Vec<Route> = self
            .routes
            .values()
            .filter_map(|e| e.desired.as_ref().map(|r| (**r).clone()))
            .collect();
        v.sort_by_key(|r| r.prefix);
        v
    }

    /// Resolve device names to indexes in our namespace. A missing device makes the route fail (retried).
    pub(super) fn resolve(
        &mut self,
        sock: &mut NlSocket,
        mut route: Route,
    ) -> Result<Route, (Route, String)> {
        if let NextHops::Via(hops) = &mut route.next_hops {
            let needs = hops.iter().any(|h| matches!(h.dev, Some(Dev::Name(_))));
            if needs {
                let original = route.clone();
                if let NextHops::Via(hops) = &mut route.next_hops {
                    for h in hops.iter_mut() {
                        if let Some(Dev::Name(name)) = &h.dev {
                            let idx = match self.ifindex.get(name) {
                                Some(i) => *i,
                                None => match link_index(sock, name) {
                                    Ok(i) => {
                                        self.ifindex.insert(name.clone(), i);
                                        i
                                    }
                                    Err(e) => {
                                        let why = format!(
                                            "device {name} not found in {}: {e}",
                                            self.netns
                                        );
                                        return Err((original, why));
                                    }
                                },
                            };
                            h.dev = Some(Dev::Index(idx));
                        }
                    }
                }
            }
            if let NextHops::Via(hops) = &mut route.next_hops {
                if hops.len() > 1 {
                    hops.sort();
                    hops.dedup();
                }
            }
        }
        Ok(route)
    }

    /// Make `route` desired (in Sync generation `generation`); mark it dirty when that changes anything.
    /// Failed and conflicting prefixes are retried by the timer; routes someone else touched are marked by
    /// the monitor.
    pub(super) fn set_desired(&mut self, sock: &mut NlSocket, route: Route, generation: u64) {
        let prefix = route.prefix;
        match self.resolve(sock, route) {
            Ok(r) => {
                if !self.unresolved.is_empty() {
                    self.unresolved.remove(&prefix);
                }
                let e = self.routes.entry(prefix).or_default();
                e.generation = generation;
                if e.desired.as_deref() != Some(&r) {
                    e.desired = Some(Arc::new(r));
                    mark(&mut self.dirty, prefix, e);
                }
            }
            Err((original, why)) => {
                tracing::warn!(netns = %self.netns, %prefix, error = %why, "route not installed");
                let e = self.routes.entry(prefix).or_default();
                e.generation = generation;
                e.desired = None;
                mark(&mut self.dirty, prefix, e);
                self.failed.insert(prefix, why);
                self.unresolved.insert(prefix, original);
            }
        }
    }

    /// Apply one request to the desired state. Large requests stream: every `batch` dirty prefixes go to
    /// the pump, so the kernel works on one chunk while the next is being prepared.
    pub(super) fn apply(
        &mut self,
        sock: &mut NlSocket,
        req: FibRequest,
        replies: &mut Vec<Reply>,
        pump: &mut Pump<'_>,
    ) {
        let batch = self.cfg.batch.max(1);
        match req {
            FibRequest::Replace(routes) => {
                let generation = self.generation;
                for r in routes {
                    self.set_desired(sock, r, generation);
                    if self.dirty.len() >= batch {
                        pump.send_dirty(self);
                    }
                }
            }
            FibRequest::Remove(prefixes) => {
                for p in prefixes {
                    if let Some(e) = self.routes.get_mut(&p) {
                        e.desired = None;
                        mark(&mut self.dirty, p, e);
                    }
                    if !self.failed.is_empty() {
                        self.failed.remove(&p);
                    }
                    if !self.conflicts.is_empty() {
                        self.conflicts.remove(&p);
                    }
                    if !self.unresolved.is_empty() {
                        self.unresolved.remove(&p);
                    }
                    if self.dirty.len() >= batch {
                        pump.send_dirty(self);
                    }
                }
            }
            FibRequest::Sync(routes) => {
                self.generation += 1;
                let generation = self.generation;
                self.routes
                    .reserve(routes.len().saturating_sub(self.routes.len()));
                for r in routes {
                    self.set_desired(sock, r, generation);
                    if self.dirty.len() >= batch {
                        pump.send_dirty(self);
                    }
                }
                // Everything of ours not named by this generation goes.
                let State { routes, dirty, .. } = self;
                for (p, e) in routes.iter_mut() {
                    if e.generation != generation && (e.desired.is_some() || e.installed.is_some())
                    {
                        e.desired = None;
                        mark(dirty, *p, e);
                    }
                }
                if !self.failed.is_empty()
                    || !self.conflicts.is_empty()
                    || !self.unresolved.is_empty()
                {
                    let routes = &self.routes;
                    let named = |p: &IpNetwork| {
                        routes
                            .get(p)
                            .map(|e| e.generation == generation)
                            .unwrap_or(false)
                    };
                    self.failed.retain(|p, _| named(p));
                    self.conflicts.retain(|p, _| named(p));
                    self.unresolved.retain(|p, _| named(p));
                }
            }
            FibRequest::Settle(tx) => replies.push(Reply::Settle(tx)),
            FibRequest::Desired(tx) => replies.push(Reply::Desired(tx)),
        }
    }

    /// The write (if any) that brings one dirty prefix to its desired state. `None` with the entry left
    /// dirty means "in flight: wait for its answer first".
    pub(super) fn plan_one(&mut self, p: IpNetwork) -> Plan {
        let metric = self.cfg.metric;
        let Some(e) = self.routes.get_mut(&p) else {
            return Plan::Nothing;
        };
        if e.inflight {
            return Plan::Wait;
        }
        e.dirty = false;
        let op = match (&e.desired, &e.installed) {
            (None, None) => None,
            (None, Some(_)) => Some(Op::Delete(p, metric)),
            (Some(d), Some(k)) => {
                if e.suspect || !matches(d, k) {
                    Some(Op::Replace(d.clone()))
                } else {
                    None
                }
            }
            (Some(d), None) => Some(Op::Create(d.clone())),
        };
        match op {
            Some(op) => {
                e.inflight = true;
                Plan::Write(op)
            }
            None => {
                if e.desired.is_none() && e.installed.is_none() {
                    self.routes.remove(&p);
                }
                Plan::Nothing
            }
        }
    }

    /// Record the kernel's answer to one op.
    pub(super) fn record(&mut self, op: &Op, result: Option<NlError>) {
        let p = op_prefix(op);
        if let Op::Delete(_, m) = op {
            if *m != self.cfg.metric {
                let ok = result
                    .as_ref()
                    .map(|e| e.errno == libc::ESRCH || e.errno == libc::ENOENT)
                    .unwrap_or(true);
                if ok {
                    self.strays.remove(&(p, *m));
                    if result.is_none() {
                        self.stats.deleted += 1;
                    }
                }
                return;
            }
        }
        let Some(e) = self.routes.get_mut(&p) else {
            return;
        };
        e.inflight = false;
        match (op, result) {
            (Op::Create(r), None) | (Op::Replace(r), None) => {
                if matches!(op, Op::Create(_)) {
                    self.stats.created += 1;
                } else {
                    self.stats.replaced += 1;
                }
                e.installed = Some(r.clone());
                e.suspect = false;
                // The side maps are almost always empty: skip hashing into them then.
                if !self.conflicts.is_empty() {
                    self.conflicts.remove(&p);
                }
                if !self.failed.is_empty() {
                    self.failed.remove(&p);
                }
            }
            (Op::Create(r), Some(err)) if err.errno == libc::EEXIST => {
                let why = format!(
                    "a route of another protocol holds {} (table {}, metric {}); margay leaves it alone",
                    r.prefix, self.cfg.table, self.cfg.metric
                );
                if !self.conflicts.contains_key(&p) {
                    tracing::warn!(netns = %self.netns, prefix = %p, "{why}");
                }
                self.conflicts.insert(p, why);
            }
            (Op::Create(_), Some(err)) | (Op::Replace(_), Some(err)) => {
                let why = err.to_string();
                if self.failed.get(&p) != Some(&why) {
                    tracing::warn!(netns = %self.netns, prefix = %p, error = %why, "kernel refused route; will retry");
                }
                self.failed.insert(p, why);
            }
            (Op::Delete(..), res) => {
                let ok = match &res {
                    None => true,
                    Some(err) => err.errno == libc::ESRCH || err.errno == libc::ENOENT,
                };
                if ok {
                    if res.is_none() {
                        self.stats.deleted += 1;
                    }
                    e.installed = None;
                    e.suspect = false;
                    if e.desired.is_none() && !e.dirty {
                        self.routes.remove(&p);
                    }
                } else if let Some(err) = res {
                    tracing::warn!(netns = %self.netns, prefix = %p, error = %err, "kernel refused delete; will retry");
                    self.failed.insert(p, err.to_string());
                }
            }
        }
    }

    /// A notification from someone else's write.
    pub(super) fn on_event(&mut self, sender: u32, msg: RouteNetlinkMessage) {
        let (deleted, m) = match msg {
            RouteNetlinkMessage::NewRoute(m) => (false, m),
            RouteNetlinkMessage::DelRoute(m) => (true, m),
            _ => return,
        };
        let Some(k) = parse_route(&m) else { return };
        if k.table != self.cfg.table {
            return;
        }
        let p = k.route.prefix;
        let who = describe_sender(sender);
        if k.protocol != self.cfg.protocol {
            // Another protocol took our exact key: our route is gone. Never fight it; record the conflict.
            if !deleted && k.metric == self.cfg.metric {
                if let Some(e) = self.routes.get_mut(&p) {
                    if e.installed.is_some() {
                        tracing::warn!(netns = %self.netns, prefix = %p, protocol = k.protocol, by = %who,
                            "margay's route was replaced by a route of another protocol; leaving it alone");
                        e.installed = None;
                        e.suspect = false;
                        mark(&mut self.dirty, p, e);
                    }
                }
            }
            return;
        }
        if k.metric != self.cfg.metric {
            if deleted {
                self.strays.remove(&(p, k.metric));
            } else {
                self.strays.insert((p, k.metric));
            }
            return;
        }
        let netns = &self.netns;
        let e = self.routes.entry(p).or_default();
        match (deleted, e.desired.clone()) {
            (true, Some(_)) => {
                tracing::warn!(%netns, prefix = %p, by = %who, "margay's route was deleted by someone else; restoring it");
                self.stats.repaired += 1;
                e.suspect = true;
                mark(&mut self.dirty, p, e);
            }
            (true, None) => {
                e.installed = None;
                e.suspect = false;
            }
            (false, Some(d)) => {
                if !matches(&d, &k.route) {
                    tracing::warn!(%netns, prefix = %p, by = %who, "margay's route was changed by someone else; restoring it");
                    self.stats.repaired += 1;
                    e.suspect = true;
                    mark(&mut self.dirty, p, e);
                }
                e.installed = Some(Arc::new(k.route));
            }
            (false, None) => {
                // A route with our protocol we did not ask for: ours to remove.
                e.installed = Some(Arc::new(k.route));
                mark(&mut self.dirty, p, e);
            }
        }
    }
}
