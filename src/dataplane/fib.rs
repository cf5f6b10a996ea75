//! The FIB task: the one owner of margay's kernel routes in one network namespace.
//!
//! ```text
//!   FibHandle ──(bounded mpsc: FibRequest)──▶ FIB task (tokio) ── state: one Entry per prefix
//!                                               │  a pass runs on a blocking thread:
//!                                               │  apply requests ─▶ plan dirty prefixes ─▶ encode
//!                                               │        (bulk: chunks of `batch` go to a writer thread,
//!                                               │         so the kernel works while the next is prepared)
//!                                               ▼
//!                              writer socket: RTM_NEWROUTE/DELROUTE, `batch` per sendmsg, 1 ack each ─▶ kernel
//!                              query socket: strict dumps, device lookups                              ─▶ kernel
//!   kernel ──(RTNLGRP_IPV4_ROUTE / IPV6_ROUTE, the writer's own changes dropped by a BPF filter)──▶ FIB task
//! ```
//!
//! Desired state in, differences out. A route is margay's when it carries margay's route protocol number
//! (default [`DEFAULT_PROTOCOL`]) in margay's table at margay's metric; routes of any other protocol are never
//! written, replaced or deleted, even on the same prefix: a new prefix is created with `NLM_F_EXCL` (the
//! kernel's `replace` matches on prefix, table, TOS and metric, not protocol) and deletes name our protocol,
//! which the kernel matches. At start the task dumps its routes (strict-checked, kernel-filtered dump) and
//! adopts them as the desired state without writing anything; a later [`FibHandle::sync`] converges by
//! difference. Someone else deleting or changing one of our routes is seen on the multicast socket, logged
//! with the sender's netlink port id, and put back. It never flushes.

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use netlink_packet_core::{NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE};
use netlink_packet_route::link::{LinkAttribute, LinkMessage};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteNextHop,
    RouteNextHopFlags, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::{mpsc, oneshot};

use super::error::{ns_label, DataplaneError, NlError};
use super::netns::in_netns;
use super::nl::{decode_all, grow_rcvbuf, recv_into, NlSocket};

/// margay's route protocol number (`ip route ... proto 77`). Unassigned in `/etc/iproute2/rt_protos`;
/// BIRD uses 12, Felix 80, `ip route add` uses 3 (boot) or 4 (static).
pub const DEFAULT_PROTOCOL: u8 = 77;
/// margay's route metric (priority). Its own value, so a static route on the same prefix with the usual
/// metric 0 (IPv4) / 1024 (IPv6) coexists with ours instead of colliding, and wins (lower is preferred).
pub const DEFAULT_METRIC: u32 = 77;
/// The main routing table.
pub const MAIN_TABLE: u32 = 254;

const RTNLGRP_IPV4_ROUTE: u32 = 7;
const RTNLGRP_IPV6_ROUTE: u32 = 11;

/// A device, by index or by name (resolved in the FIB's namespace when the request is applied).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dev {
    Index(u32),
    Name(String),
}

/// One next hop: a gateway, a device, or both; `onlink` tells the kernel the gateway is on the device's
/// link even without a covering connected route (needs `dev`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NextHop {
    pub gateway: Option<IpAddr>,
    pub dev: Option<Dev>,
    pub onlink: bool,
}

impl NextHop {
    /// `via gateway`.
    pub fn via(gateway: IpAddr) -> NextHop {
        NextHop {
            gateway: Some(gateway),
            dev: None,
            onlink: false,
        }
    }
    /// `via gateway dev name onlink`.
    pub fn onlink(gateway: IpAddr, dev: &str) -> NextHop {
        NextHop {
            gateway: Some(gateway),
            dev: Some(Dev::Name(dev.to_string())),
            onlink: true,
        }
    }
    /// `dev name` (a device route, scope link).
    pub fn dev(dev: &str) -> NextHop {
        NextHop {
            gateway: None,
            dev: Some(Dev::Name(dev.to_string())),
            onlink: false,
        }
    }
}

/// Where a prefix goes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHops {
    /// Drop silently (the node's own blocks: addresses not yet given to a pod go nowhere).
    Blackhole,
    /// Drop with ICMP unreachable.
    Unreachable,
    /// One next hop, or several as one ECMP (RTA_MULTIPATH) route.
    Via(Vec<NextHop>),
}

/// A route margay wants in the kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Route {
    pub prefix: IpNetwork,
    pub next_hops: NextHops,
}

impl std::fmt::Display for Dev {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dev::Index(i) => write!(f, "ifindex {i}"),
            Dev::Name(n) => write!(f, "{n}"),
        }
    }
}

impl std::fmt::Display for Route {
    /// `ip route` style: `10.0.0.0/24 via 10.1.0.1 dev eth0 onlink`, `nexthop via ... nexthop via ...`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.prefix)?;
        match &self.next_hops {
            NextHops::Blackhole => write!(f, " blackhole"),
            NextHops::Unreachable => write!(f, " unreachable"),
            NextHops::Via(hops) => {
                for h in hops {
                    if hops.len() > 1 {
                        write!(f, " nexthop")?;
                    }
                    if let Some(g) = h.gateway {
                        write!(f, " via {g}")?;
                    }
                    if let Some(d) = &h.dev {
                        write!(f, " dev {d}")?;
                    }
                    if h.onlink {
                        write!(f, " onlink")?;
                    }
                }
                Ok(())
            }
        }
    }
}

impl Route {
    pub fn blackhole(prefix: IpNetwork) -> Route {
        Route {
            prefix,
            next_hops: NextHops::Blackhole,
        }
    }
    pub fn via(prefix: IpNetwork, hops: Vec<NextHop>) -> Route {
        Route {
            prefix,
            next_hops: NextHops::Via(hops),
        }
    }

    /// Reject what the kernel would reject, with a message naming the route.
    pub fn validate(&self) -> Result<(), DataplaneError> {
        let bad = |reason: &str| DataplaneError::Invalid {
            what: "route",
            value: self.to_string(),
            reason: reason.to_string(),
        };
        if self.prefix.network() != self.prefix.ip() {
            return Err(bad("the prefix has host bits set"));
        }
        if let NextHops::Via(hops) = &self.next_hops {
            if hops.is_empty() {
                return Err(bad("no next hop"));
            }
            for h in hops {
                if h.gateway.is_none() && h.dev.is_none() {
                    return Err(bad("a next hop needs a gateway or a device"));
                }
                if let Some(gw) = h.gateway {
                    if gw.is_ipv4() != self.prefix.is_ipv4() {
                        return Err(bad(
                            "the gateway's address family differs from the prefix's",
                        ));
                    }
                    if let IpAddr::V6(v6) = gw {
                        if v6.segments()[0] & 0xffc0 == 0xfe80 && h.dev.is_none() {
                            return Err(bad("a link-local gateway needs a device"));
                        }
                    }
                }
                if h.onlink && (h.dev.is_none() || h.gateway.is_none()) {
                    return Err(bad("onlink needs both a gateway and a device"));
                }
                if let Some(Dev::Name(n)) = &h.dev {
                    if n.is_empty() || n.len() > 15 {
                        return Err(bad("device names are 1 to 15 bytes"));
                    }
                }
            }
        }
        Ok(())
    }
}

/// How the FIB task is set up.
#[derive(Debug, Clone)]
pub struct FibConfig {
    /// The node's network namespace (`None`: the one margay runs in).
    pub netns: Option<PathBuf>,
    /// Route protocol number margay owns.
    pub protocol: u8,
    /// Routing table.
    pub table: u32,
    /// Metric of margay's routes.
    pub metric: u32,
    /// Requests per netlink write.
    pub batch: usize,
    /// Depth of the request channel.
    pub queue: usize,
    /// How often failed or conflicting routes are tried again.
    pub retry: Duration,
}

impl Default for FibConfig {
    fn default() -> Self {
        FibConfig {
            netns: None,
            protocol: DEFAULT_PROTOCOL,
            table: MAIN_TABLE,
            metric: DEFAULT_METRIC,
            batch: 1000,
            queue: 1024,
            retry: Duration::from_secs(1),
        }
    }
}

/// Counters since the task started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FibStats {
    /// Routes found with our protocol at start and adopted as they were.
    pub adopted: u64,
    /// Netlink writes (each carries up to `batch` requests).
    pub writes: u64,
    pub created: u64,
    pub replaced: u64,
    pub deleted: u64,
    /// Routes put back after someone else deleted or changed them.
    pub repaired: u64,
    /// Full re-dumps after the notification socket overflowed.
    pub resyncs: u64,
}

/// A snapshot of the FIB task's state.
#[derive(Debug, Clone, Default)]
pub struct FibStatus {
    pub desired: usize,
    pub installed: usize,
    /// Prefixes where a route of another protocol holds our (prefix, table, metric): left alone, retried.
    pub conflicts: Vec<(IpNetwork, String)>,
    /// Prefixes the kernel refused for another reason (no route to the gateway, ...): retried.
    pub failed: Vec<(IpNetwork, String)>,
    pub stats: FibStats,
}

/// What the task is asked to do.
#[derive(Debug)]
pub enum FibRequest {
    /// Install or change these routes (replace semantics per prefix).
    Replace(Vec<Route>),
    /// Remove these prefixes (if they are ours).
    Remove(Vec<IpNetwork>),
    /// The desired set is exactly this: everything else of ours goes.
    Sync(Vec<Route>),
    /// Reply once every earlier request has been written to the kernel.
    Settle(oneshot::Sender<FibStatus>),
    /// The desired routes (devices resolved to indexes).
    Desired(oneshot::Sender<Vec<Route>>),
}

/// The handle the node daemon holds. Cloneable; the task stops when the last handle is dropped.
#[derive(Clone)]
pub struct FibHandle {
    tx: mpsc::Sender<FibRequest>,
    netns: String,
    /// Aborted when the last handle is dropped.
    task: Arc<crate::task::Task<()>>,
}

/// The FIB task's entry point.
pub struct Fib;

impl Fib {
    /// Open the sockets inside the namespace, subscribe to route notifications, dump and adopt our routes,
    /// then start the task. Writes nothing to the kernel.
    pub async fn spawn(config: FibConfig) -> Result<FibHandle, DataplaneError> {
        let cfg = config.clone();
        let (socks, monitor, state) = tokio::task::spawn_blocking(move || {
            let writer = NlSocket::open(cfg.netns.as_deref())?;
            let mut query = NlSocket::open(cfg.netns.as_deref())?;
            // Subscribe before the dump so no change between the two is missed.
            let monitor = open_monitor(cfg.netns.as_deref(), writer.portid())?;
            let mut state = State::new(cfg);
            state.adopt(&mut query)?;
            Ok::<_, DataplaneError>((Sockets { writer, query }, monitor, state))
        })
        .await
        .map_err(|e| DataplaneError::FibStopped {
            netns: format!("{} ({e})", ns_label(config.netns.as_deref())),
        })??;
        // SAFETY: the Socket owns its fd, which stays open and the same until the AsyncFd drops it.
        let monitor = unsafe { AsyncFd::register_with_interest(monitor, Interest::READABLE) }
            .map_err(|e| DataplaneError::Socket {
                netns: ns_label(config.netns.as_deref()),
                source: io::Error::other(e.to_string()),
            })?;
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let netns = ns_label(config.netns.as_deref());
        tracing::info!(%netns, adopted = state.stats.adopted, protocol = config.protocol, "FIB task started");
        let task = crate::task::spawn("fib", run(state, socks, monitor, rx));
        Ok(FibHandle {
            tx,
            netns,
            task: Arc::new(task),
        })
    }
}

impl FibHandle {
    /// Observer of the FIB task's end, for the daemon's supervisor.
    pub fn task_watch(&self) -> crate::task::TaskWatch {
        self.task.watch()
    }

    async fn send(&self, req: FibRequest) -> Result<(), DataplaneError> {
        self.tx
            .send(req)
            .await
            .map_err(|_| DataplaneError::FibStopped {
                netns: self.netns.clone(),
            })
    }

    /// Install or change one route.
    pub async fn replace(&self, route: Route) -> Result<(), DataplaneError> {
        self.replace_many(vec![route]).await
    }

    /// Install or change many routes (one request; the task batches the writes).
    pub async fn replace_many(&self, routes: Vec<Route>) -> Result<(), DataplaneError> {
        for r in &routes {
            r.validate()?;
        }
        self.send(FibRequest::Replace(routes)).await
    }

    /// Remove one prefix (ours only).
    pub async fn remove(&self, prefix: IpNetwork) -> Result<(), DataplaneError> {
        self.send(FibRequest::Remove(vec![prefix])).await
    }

    /// Remove many prefixes.
    pub async fn remove_many(&self, prefixes: Vec<IpNetwork>) -> Result<(), DataplaneError> {
        self.send(FibRequest::Remove(prefixes)).await
    }

    /// Make the desired set exactly `routes`.
    pub async fn sync(&self, routes: Vec<Route>) -> Result<(), DataplaneError> {
        for r in &routes {
            r.validate()?;
        }
        self.send(FibRequest::Sync(routes)).await
    }

    /// Wait until everything asked so far is in the kernel (or failed), and return the state.
    pub async fn settle(&self) -> Result<FibStatus, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        self.send(FibRequest::Settle(tx)).await?;
        rx.await.map_err(|_| DataplaneError::FibStopped {
            netns: self.netns.clone(),
        })
    }

    /// The desired routes.
    pub async fn desired(&self) -> Result<Vec<Route>, DataplaneError> {
        let (tx, rx) = oneshot::channel();
        self.send(FibRequest::Desired(tx)).await?;
        rx.await.map_err(|_| DataplaneError::FibStopped {
            netns: self.netns.clone(),
        })
    }
}

/// One kernel write the task decided on.
#[derive(Debug, Clone)]
enum Op {
    /// New prefix: NLM_F_EXCL, so a foreign route holding the key makes it fail instead of being replaced.
    Create(Arc<Route>),
    /// Our route is there (or was, and someone touched it): NLM_F_REPLACE.
    Replace(Arc<Route>),
    /// Delete our route at (prefix, metric).
    Delete(IpNetwork, u32),
}

/// Fast, randomly seeded hashing for the per-prefix maps (100k+ entries, several lookups per route on the
/// hot path); SipHash's DoS resistance buys nothing for prefixes margay itself computed.
type Hasher = foldhash::fast::RandomState;
type Map<K, V> = HashMap<K, V, Hasher>;
type Set<K> = HashSet<K, Hasher>;

/// What the task knows about one prefix.
#[derive(Debug, Default)]
struct Entry {
    /// The route margay wants (devices resolved), if any.
    desired: Option<Arc<Route>>,
    /// Our route in the kernel at our metric, as the kernel reported or acknowledged it.
    installed: Option<Arc<Route>>,
    /// The `Sync` generation that last named this prefix.
    generation: u64,
    /// Listed in `State::dirty`.
    dirty: bool,
    /// Someone else touched it: the kernel may differ from `installed`; write with replace.
    suspect: bool,
    /// A write for it is with the kernel and not yet acknowledged.
    inflight: bool,
}

/// Everything the task owns. One map entry per prefix keeps the hot path to a few lookups per route.
struct State {
    cfg: FibConfig,
    netns: String,
    routes: Map<IpNetwork, Entry>,
    /// Prefixes to look at in the next pass (each once: `Entry::dirty`).
    dirty: Vec<IpNetwork>,
    generation: u64,
    /// Routes with our protocol at another metric: not ours to keep.
    strays: Set<(IpNetwork, u32)>,
    conflicts: Map<IpNetwork, String>,
    failed: Map<IpNetwork, String>,
    /// Requested routes whose device could not be resolved yet: tried again with the retry timer.
    unresolved: Map<IpNetwork, Route>,
    /// Interface name → index cache for one round of requests.
    ifindex: HashMap<String, u32>,
    stats: FibStats,
}

/// Mark one entry dirty (once).
fn mark(dirty: &mut Vec<IpNetwork>, p: IpNetwork, e: &mut Entry) {
    if !e.dirty {
        e.dirty = true;
        dirty.push(p);
    }
}

impl State {
    fn new(cfg: FibConfig) -> State {
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

    fn mark_prefix(&mut self, p: IpNetwork) {
        let e = self.routes.entry(p).or_default();
        mark(&mut self.dirty, p, e);
    }

    /// Dump our routes (strict check: the kernel filters by protocol and table) into `installed`.
    fn dump_ours(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
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
    fn adopt(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
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
    fn resync(&mut self, sock: &mut NlSocket) -> Result<(), DataplaneError> {
        self.stats.resyncs += 1;
        self.dump_ours(sock)?;
        let State { routes, dirty, .. } = self;
        for (p, e) in routes.iter_mut() {
            mark(dirty, *p, e);
        }
        Ok(())
    }

    fn status(&self) -> FibStatus {
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

    fn desired_routes(&self) -> Vec<Route> {
        let mut v: Vec<Route> = self
            .routes
            .values()
            .filter_map(|e| e.desired.as_ref().map(|r| (**r).clone()))
            .collect();
        v.sort_by_key(|r| r.prefix);
        v
    }

    /// Resolve device names to indexes in our namespace. A missing device makes the route fail (retried).
    fn resolve(&mut self, sock: &mut NlSocket, mut route: Route) -> Result<Route, (Route, String)> {
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
    fn set_desired(&mut self, sock: &mut NlSocket, route: Route, generation: u64) {
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
    fn apply(
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
    fn plan_one(&mut self, p: IpNetwork) -> Plan {
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
    fn record(&mut self, op: &Op, result: Option<NlError>) {
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
    fn on_event(&mut self, sender: u32, msg: RouteNetlinkMessage) {
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

/// What to do with one dirty prefix.
enum Plan {
    Nothing,
    Write(Op),
    /// A write for it is in flight.
    Wait,
}

enum Reply {
    Settle(oneshot::Sender<FibStatus>),
    Desired(oneshot::Sender<Vec<Route>>),
}

/// The task's two sockets: `writer` carries route writes (the monitor filters out its port id); `query`
/// does dumps and device lookups, so they never interleave with a write burst's acks.
struct Sockets {
    writer: NlSocket,
    query: NlSocket,
}

/// One chunk of encoded requests for the writer thread.
struct Chunk {
    bytes: Vec<u8>,
    count: usize,
    first_seq: u32,
}

/// The writer's answer for one chunk: (index in chunk, error) for each refused request.
type ChunkResult = io::Result<Vec<(usize, NlError)>>;

/// Where encoded chunks go: straight to the socket (small work), or to a writer thread so the kernel
/// processes chunk k while chunk k+1 is planned and encoded (bulk work).
enum Lane<'a> {
    Direct(&'a mut NlSocket),
    Threaded {
        tx: Option<std::sync::mpsc::SyncSender<Chunk>>,
        rx: std::sync::mpsc::Receiver<ChunkResult>,
    },
}

/// Turns dirty prefixes into kernel writes, `batch` requests per write, and records the answers.
struct Pump<'a> {
    lane: Lane<'a>,
    batch: usize,
    seq: u32,
    inflight: std::collections::VecDeque<Vec<Op>>,
    io_error: Option<io::Error>,
}

fn op_prefix(op: &Op) -> IpNetwork {
    match op {
        Op::Create(r) | Op::Replace(r) => r.prefix,
        Op::Delete(p, _) => *p,
    }
}

impl<'a> Pump<'a> {
    fn new(lane: Lane<'a>, batch: usize) -> Pump<'a> {
        Pump {
            lane,
            batch: batch.max(1),
            // Sequence numbers only need to be unique per chunk; start high to stay clear of the
            // socket's own synchronous requests in logs.
            seq: 0x4000_0000,
            inflight: Default::default(),
            io_error: None,
        }
    }

    /// Plan every dirty prefix, encode and send the writes, `batch` per write.
    fn send_dirty(&mut self, state: &mut State) {
        while !state.dirty.is_empty() {
            let dirty = std::mem::take(&mut state.dirty);
            let mut waiting = Vec::new();
            let mut ops = Vec::with_capacity(self.batch.min(dirty.len()));
            let mut bytes = Vec::with_capacity(self.batch.min(dirty.len()) * 80);
            let mut first_seq = self.seq.wrapping_add(1);
            for p in dirty {
                match state.plan_one(p) {
                    Plan::Nothing => {}
                    Plan::Wait => waiting.push(p),
                    Plan::Write(op) => {
                        self.seq = self.seq.wrapping_add(1);
                        encode_op(&state.cfg, &op, self.seq, &mut bytes);
                        ops.push(op);
                        if ops.len() >= self.batch {
                            let next = self.seq.wrapping_add(1);
                            self.push(
                                std::mem::take(&mut ops),
                                std::mem::take(&mut bytes),
                                first_seq,
                                state,
                            );
                            first_seq = next;
                        }
                    }
                }
            }
            if !ops.is_empty() {
                self.push(ops, bytes, first_seq, state);
            }
            if waiting.is_empty() {
                break;
            }
            // Prefixes whose earlier write is still in flight: take the answers, then plan them again.
            self.wait_all(state);
            state.dirty.extend(waiting);
            if self.io_error.is_some() {
                break;
            }
        }
    }

    /// Write one encoded chunk.
    fn push(&mut self, ops: Vec<Op>, bytes: Vec<u8>, first_seq: u32, state: &mut State) {
        if self.io_error.is_some() {
            // The socket already failed this round; the caller re-reads the kernel afterwards.
            for op in &ops {
                if let Some(e) = state.routes.get_mut(&op_prefix(op)) {
                    e.inflight = false;
                }
            }
            return;
        }
        state.stats.writes += 1;
        let count = ops.len();
        match &mut self.lane {
            Lane::Direct(sock) => {
                let mut results: Vec<Option<NlError>> = vec![None; count];
                let r = sock.send_and_ack(&bytes, count, |seq, err| {
                    let i = seq.wrapping_sub(first_seq) as usize;
                    if i < count {
                        results[i] = err;
                    }
                });
                match r {
                    Ok(()) => {
                        for (op, res) in ops.iter().zip(results) {
                            state.record(op, res);
                        }
                    }
                    Err(e) => {
                        for op in &ops {
                            if let Some(en) = state.routes.get_mut(&op_prefix(op)) {
                                en.inflight = false;
                            }
                        }
                        self.io_error = Some(e);
                    }
                }
            }
            Lane::Threaded { tx, .. } => {
                let sent = tx.as_ref().map(|tx| {
                    tx.send(Chunk {
                        bytes,
                        count,
                        first_seq,
                    })
                });
                self.inflight.push_back(ops);
                if !matches!(sent, Some(Ok(()))) {
                    self.io_error = Some(io::Error::other("netlink writer thread stopped"));
                }
                self.drain(state, false);
            }
        }
    }

    /// Record the writer's answers: those ready (`wait` false) or all outstanding (`wait` true).
    fn drain(&mut self, state: &mut State, wait: bool) {
        let Lane::Threaded { rx, .. } = &self.lane else {
            return;
        };
        while !self.inflight.is_empty() {
            let next = if wait || self.io_error.is_some() {
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                }
            };
            let Some(ops) = self.inflight.pop_front() else {
                return;
            };
            match next {
                Some(Ok(errors)) => {
                    let mut results: Vec<Option<NlError>> = vec![None; ops.len()];
                    for (i, e) in errors {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(e);
                        }
                    }
                    for (op, res) in ops.iter().zip(results) {
                        state.record(op, res);
                    }
                }
                other => {
                    for op in &ops {
                        if let Some(e) = state.routes.get_mut(&op_prefix(op)) {
                            e.inflight = false;
                        }
                    }
                    self.io_error = Some(match other {
                        Some(Err(e)) => e,
                        _ => io::Error::other("netlink writer thread stopped"),
                    });
                }
            }
        }
    }

    fn wait_all(&mut self, state: &mut State) {
        self.drain(state, true);
    }

    /// Send what is still dirty and the strays, wait for every answer, and stop the writer.
    fn finish(&mut self, state: &mut State) -> Option<io::Error> {
        self.send_dirty(state);
        if !state.strays.is_empty() {
            let ops: Vec<Op> = state
                .strays
                .iter()
                .map(|(p, m)| Op::Delete(*p, *m))
                .collect();
            for chunk in ops.chunks(self.batch) {
                let first_seq = self.seq.wrapping_add(1);
                let mut bytes = Vec::new();
                for op in chunk {
                    self.seq = self.seq.wrapping_add(1);
                    encode_op(&state.cfg, op, self.seq, &mut bytes);
                }
                self.push(chunk.to_vec(), bytes, first_seq, state);
            }
        }
        self.wait_all(state);
        if let Lane::Threaded { tx, .. } = &mut self.lane {
            tx.take();
        }
        self.io_error.take()
    }
}

/// Append one op's request to `buf`. The common shapes (one next hop, blackhole, unreachable, delete) are
/// written directly, byte for byte what `netlink-packet-route` would emit for [`encode`]'s message (a
/// property test holds them equal); everything else goes through the crate.
fn encode_op(cfg: &FibConfig, op: &Op, seq: u32, buf: &mut Vec<u8>) {
    if !encode_fast(cfg, op, seq, buf) {
        let (msg, flags) = encode(cfg, op);
        super::nl::encode_into(buf, seq, msg, flags);
    }
}

const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;

fn put_attr(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    buf.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(value);
    // Addresses and u32s are multiples of 4: no padding needed.
}

fn put_addr(buf: &mut Vec<u8>, ty: u16, a: IpAddr) {
    match a {
        IpAddr::V4(v) => put_attr(buf, ty, &v.octets()),
        IpAddr::V6(v) => put_attr(buf, ty, &v.octets()),
    }
}

/// The hot path of [`encode_op`]; false when the op needs the general encoder (multipath).
fn encode_fast(cfg: &FibConfig, op: &Op, seq: u32, buf: &mut Vec<u8>) -> bool {
    const RTA_DST: u16 = 1;
    const RTA_OIF: u16 = 4;
    const RTA_GATEWAY: u16 = 5;
    const RTA_PRIORITY: u16 = 6;
    const RTA_TABLE: u16 = 15;
    let (prefix, ty, flags, scope, kind, rtm_flags, hop) = match op {
        Op::Delete(p, _) => (*p, RTM_DELROUTE, 0u16, 255u8, 0u8, 0u32, None),
        Op::Create(r) | Op::Replace(r) => {
            let flags = if matches!(op, Op::Create(_)) {
                NLM_F_CREATE | NLM_F_EXCL
            } else {
                NLM_F_CREATE | NLM_F_REPLACE
            };
            match &r.next_hops {
                NextHops::Blackhole => (r.prefix, RTM_NEWROUTE, flags, 0, 6, 0, None),
                NextHops::Unreachable => (r.prefix, RTM_NEWROUTE, flags, 0, 7, 0, None),
                NextHops::Via(hops) if hops.len() == 1 => {
                    let h = &hops[0];
                    let scope = if h.gateway.is_none() { 253 } else { 0 };
                    let onlink = if h.onlink { 4u32 } else { 0 };
                    (r.prefix, RTM_NEWROUTE, flags, scope, 1, onlink, Some(h))
                }
                NextHops::Via(_) => return false,
            }
        }
    };
    let metric = match op {
        Op::Delete(_, m) => *m,
        _ => cfg.metric,
    };
    let start = buf.len();
    // nlmsghdr; the length is patched below.
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(
        &(flags | netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK)
            .to_ne_bytes(),
    );
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    // rtmsg
    let family = if prefix.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    };
    buf.extend_from_slice(&[
        family,
        prefix.prefix(),
        0,
        0,
        table_byte(cfg.table),
        cfg.protocol,
        scope,
        kind,
    ]);
    buf.extend_from_slice(&rtm_flags.to_ne_bytes());
    put_addr(buf, RTA_DST, prefix.ip());
    put_attr(buf, RTA_TABLE, &cfg.table.to_ne_bytes());
    put_attr(buf, RTA_PRIORITY, &metric.to_ne_bytes());
    if let Some(h) = hop {
        if let Some(gw) = h.gateway {
            put_addr(buf, RTA_GATEWAY, gw);
        }
        let idx = dev_index(&h.dev);
        if idx != 0 {
            put_attr(buf, RTA_OIF, &idx.to_ne_bytes());
        }
    }
    let len = (buf.len() - start) as u32;
    buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
    true
}

/// The writer thread: one `sendmsg` per chunk, then its acks, in order.
fn writer_loop(
    sock: &mut NlSocket,
    rx: std::sync::mpsc::Receiver<Chunk>,
    tx: std::sync::mpsc::Sender<ChunkResult>,
) {
    for chunk in rx {
        let mut errors = Vec::new();
        let r = sock.send_and_ack(&chunk.bytes, chunk.count, |seq, err| {
            if let Some(e) = err {
                errors.push((seq.wrapping_sub(chunk.first_seq) as usize, e));
            }
        });
        let failed = r.is_err();
        if tx.send(r.map(|()| errors)).is_err() || failed {
            return;
        }
    }
}

/// Apply `reqs` and bring the kernel to the desired state. Runs on a blocking thread.
fn process(
    state: &mut State,
    socks: &mut Sockets,
    reqs: Vec<FibRequest>,
    replies: &mut Vec<Reply>,
) -> Result<(), DataplaneError> {
    state.ifindex.clear();
    let volume: usize = state.dirty.len()
        + reqs
            .iter()
            .map(|r| match r {
                FibRequest::Replace(v) | FibRequest::Sync(v) => v.len(),
                FibRequest::Remove(v) => v.len(),
                _ => 0,
            })
            .sum::<usize>();
    let Sockets { writer, query } = socks;
    let io_error = if volume > state.cfg.batch {
        std::thread::scope(|s| {
            // Two chunks queued ahead of the writer are enough to keep the kernel busy.
            let (ctx, crx) = std::sync::mpsc::sync_channel::<Chunk>(2);
            let (rtx, rrx) = std::sync::mpsc::channel::<ChunkResult>();
            let w: &mut NlSocket = writer;
            s.spawn(move || writer_loop(w, crx, rtx));
            let mut pump = Pump::new(
                Lane::Threaded {
                    tx: Some(ctx),
                    rx: rrx,
                },
                state.cfg.batch,
            );
            for req in reqs {
                state.apply(query, req, replies, &mut pump);
            }
            pump.finish(state)
        })
    } else {
        let mut pump = Pump::new(Lane::Direct(writer), state.cfg.batch);
        for req in reqs {
            state.apply(query, req, replies, &mut pump);
        }
        pump.finish(state)
    };
    if let Some(e) = io_error {
        // A write failed part-way: we no longer know what the kernel holds. Re-read it and write again.
        tracing::error!(netns = %state.netns, error = %e, "netlink write failed; re-reading our routes");
        state.resync(query)?;
        let mut pump = Pump::new(Lane::Direct(writer), state.cfg.batch);
        if let Some(e) = pump.finish(state) {
            tracing::error!(netns = %state.netns, error = %e, "netlink write failed again; will retry");
        }
    }
    Ok(())
}

async fn run(
    mut state: State,
    mut socks: Sockets,
    monitor: AsyncFd<Socket>,
    mut rx: mpsc::Receiver<FibRequest>,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut retry = tokio::time::interval(state.cfg.retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let portid = socks.writer.portid();
    loop {
        let mut reqs = Vec::new();
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break };
                reqs.push(req);
                // Take whatever else is already queued so one pass covers it.
                while let Ok(req) = rx.try_recv() {
                    reqs.push(req);
                }
            }
            ready = monitor.readable() => {
                let Ok(mut guard) = ready else { break };
                loop {
                    match recv_into(guard.get_inner().as_raw_fd(), &mut buf, libc::MSG_DONTWAIT) {
                        Ok(0) => break,
                        Ok(n) => {
                            for (sender, msg) in decode_all(&buf[..n]) {
                                if sender != portid {
                                    state.on_event(sender, msg);
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            tracing::warn!(netns = %state.netns, "route notifications overflowed; re-reading our routes");
                            if let Err(e) = state.resync(&mut socks.query) {
                                tracing::error!(netns = %state.netns, error = %e, "re-reading routes failed");
                            }
                        }
                        Err(e) => {
                            tracing::error!(netns = %state.netns, error = %e, "route notification socket failed");
                            guard.clear_ready();
                            break;
                        }
                    }
                }
            }
            _ = retry.tick() => {
                let again: Vec<IpNetwork> = state.failed.keys().chain(state.conflicts.keys()).copied().collect();
                for p in again {
                    if state.routes.get(&p).map(|e| e.desired.is_some()).unwrap_or(false) {
                        state.mark_prefix(p);
                    }
                }
                // Routes whose device was missing: try them again (the device may exist now).
                let retry_unresolved: Vec<Route> = state.unresolved.values().cloned().collect();
                if !retry_unresolved.is_empty() {
                    reqs.push(FibRequest::Replace(retry_unresolved));
                }
            }
        }
        if reqs.is_empty() && state.dirty.is_empty() && state.strays.is_empty() {
            continue;
        }
        let netns = state.netns.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut replies = Vec::new();
            let r = process(&mut state, &mut socks, reqs, &mut replies);
            (state, socks, replies, r)
        })
        .await;
        let replies = match joined {
            Ok((s, k, replies, r)) => {
                state = s;
                socks = k;
                if let Err(e) = r {
                    tracing::error!(%netns, error = %e, "FIB task stops");
                    return;
                }
                replies
            }
            Err(e) => {
                tracing::error!(%netns, error = %e, "FIB task stops");
                return;
            }
        };
        for r in replies {
            match r {
                // A dropped receiver only means the asker went away.
                Reply::Settle(tx) => {
                    let _ = tx.send(state.status());
                }
                Reply::Desired(tx) => {
                    let _ = tx.send(state.desired_routes());
                }
            }
        }
    }
}

/// The route-notification socket: IPv4 and IPv6 route groups, non-blocking, with a BPF filter that drops
/// notifications caused by our own write socket (port id `own_portid`) in the kernel, so a bulk install
/// does not flood it.
fn open_monitor(
    netns: Option<&std::path::Path>,
    own_portid: u32,
) -> Result<Socket, DataplaneError> {
    let label = ns_label(netns);
    in_netns(netns, || {
        let mk = || -> io::Result<Socket> {
            let mut s = Socket::new(NETLINK_ROUTE)?;
            s.bind_auto()?;
            attach_sender_filter(s.as_raw_fd(), own_portid)?;
            s.add_membership(RTNLGRP_IPV4_ROUTE)?;
            s.add_membership(RTNLGRP_IPV6_ROUTE)?;
            grow_rcvbuf(s.as_raw_fd(), 8 << 20)?;
            s.set_non_blocking(true)?;
            Ok(s)
        };
        mk().map_err(|source| DataplaneError::Socket {
            netns: label.clone(),
            source,
        })
    })
}

/// Classic BPF: accept unless nlmsghdr.nlmsg_pid (offset 12) equals `portid`. BPF loads words in network
/// byte order while the header is in host order, hence the byte swap of the constant.
fn attach_sender_filter(fd: RawFd, portid: u32) -> io::Result<()> {
    let k = u32::from_be_bytes(portid.to_ne_bytes());
    let code = [
        // ld [12]
        libc::sock_filter {
            code: (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16,
            jt: 0,
            jf: 0,
            k: 12,
        },
        // jeq #k, drop, accept
        libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 1,
            jf: 0,
            k,
        },
        // accept
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0xffff_ffff,
        },
        // drop
        libc::sock_filter {
            code: (libc::BPF_RET | libc::BPF_K) as u16,
            jt: 0,
            jf: 0,
            k: 0,
        },
    ];
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prog points at `code`, which outlives the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ATTACH_FILTER,
            &prog as *const libc::sock_fprog as *const libc::c_void,
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// "netlink port 1234 (ip)" — the sender of a notification, with the process name when the port id is a pid.
fn describe_sender(portid: u32) -> String {
    if portid == 0 {
        return "the kernel".to_string();
    }
    match std::fs::read_to_string(format!("/proc/{portid}/comm")) {
        Ok(comm) => format!("netlink port {portid} ({})", comm.trim()),
        Err(_) => format!("netlink port {portid}"),
    }
}

/// Look a device up by name with RTM_GETLINK.
pub(crate) fn link_index(sock: &mut NlSocket, name: &str) -> Result<u32, NlError> {
    let mut msg = LinkMessage::default();
    msg.attributes.push(LinkAttribute::IfName(name.to_string()));
    let replies = sock.get(RouteNetlinkMessage::GetLink(msg))?;
    for r in replies {
        if let RouteNetlinkMessage::NewLink(l) = r {
            return Ok(l.header.index);
        }
    }
    Err(NlError {
        errno: libc::ENODEV,
        message: None,
    })
}

pub(crate) fn table_byte(table: u32) -> u8 {
    if table < 256 {
        table as u8
    } else {
        // RT_TABLE_UNSPEC: the RTA_TABLE attribute carries the real id.
        0
    }
}

/// A route as the kernel reported it.
pub(crate) struct KernelRoute {
    pub(crate) route: Route,
    pub(crate) protocol: u8,
    pub(crate) table: u32,
    pub(crate) metric: u32,
}

fn addr_of(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(v4) => Some(IpAddr::V4(*v4)),
        RouteAddress::Inet6(v6) => Some(IpAddr::V6(*v6)),
        _ => None,
    }
}

pub(crate) fn parse_route(m: &RouteMessage) -> Option<KernelRoute> {
    let v4 = match m.header.address_family {
        AddressFamily::Inet => true,
        AddressFamily::Inet6 => false,
        _ => return None,
    };
    let mut dst: Option<IpAddr> = None;
    let mut table = u32::from(m.header.table);
    let mut metric = 0;
    let mut gateway = None;
    let mut oif = None;
    let mut multipath = None;
    for a in &m.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = addr_of(d),
            RouteAttribute::Table(t) => table = *t,
            RouteAttribute::Priority(p) => metric = *p,
            RouteAttribute::Gateway(g) => gateway = addr_of(g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            RouteAttribute::MultiPath(hops) => multipath = Some(hops),
            _ => {}
        }
    }
    let dst = dst.unwrap_or(if v4 {
        IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED)
    } else {
        IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED)
    });
    let prefix = IpNetwork::new(dst, m.header.destination_prefix_length).ok()?;
    let next_hops = match m.header.kind {
        RouteType::BlackHole => NextHops::Blackhole,
        RouteType::Unreachable => NextHops::Unreachable,
        RouteType::Unicast => {
            let mut hops = Vec::new();
            if let Some(mp) = multipath {
                for h in mp {
                    let gw = h.attributes.iter().find_map(|a| match a {
                        RouteAttribute::Gateway(g) => addr_of(g),
                        _ => None,
                    });
                    hops.push(NextHop {
                        gateway: gw,
                        dev: Some(Dev::Index(h.interface_index)),
                        onlink: h.flags.contains(RouteNextHopFlags::Onlink),
                    });
                }
            } else {
                hops.push(NextHop {
                    gateway,
                    dev: oif.map(Dev::Index),
                    onlink: m.header.flags.contains(RouteFlags::Onlink),
                });
            }
            hops.sort();
            NextHops::Via(hops)
        }
        // Other kinds (prohibit, throw, local...) never equal a desired route: replaced if ours.
        _ => NextHops::Via(Vec::new()),
    };
    Some(KernelRoute {
        route: Route { prefix, next_hops },
        protocol: m.header.protocol.into(),
        table,
        metric,
    })
}

/// Does the kernel's route satisfy the desired one? A desired next hop without a device accepts whatever
/// device the kernel resolved.
fn matches(desired: &Route, kernel: &Route) -> bool {
    match (&desired.next_hops, &kernel.next_hops) {
        (NextHops::Blackhole, NextHops::Blackhole) => true,
        (NextHops::Unreachable, NextHops::Unreachable) => true,
        (NextHops::Via(d), NextHops::Via(k)) => {
            if d.len() != k.len() {
                return false;
            }
            // Both sorted; a desired hop without a device may sort differently from the kernel's, so match
            // each desired hop against an unused kernel hop.
            let mut used = vec![false; k.len()];
            d.iter().all(|dh| {
                let found = k.iter().enumerate().position(|(i, kh)| {
                    !used[i]
                        && dh.gateway == kh.gateway
                        && dh.onlink == kh.onlink
                        && (dh.dev.is_none() || dh.dev == kh.dev)
                });
                match found {
                    Some(i) => {
                        used[i] = true;
                        true
                    }
                    None => false,
                }
            })
        }
        _ => false,
    }
}

fn family(prefix: &IpNetwork) -> AddressFamily {
    if prefix.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    }
}

fn base_header(cfg: &FibConfig, prefix: &IpNetwork) -> RouteHeader {
    RouteHeader {
        address_family: family(prefix),
        destination_prefix_length: prefix.prefix(),
        table: table_byte(cfg.table),
        protocol: RouteProtocol::from(cfg.protocol),
        ..Default::default()
    }
}

fn dev_index(d: &Option<Dev>) -> u32 {
    match d {
        Some(Dev::Index(i)) => *i,
        _ => 0,
    }
}

/// The netlink message and flags for one op.
fn encode(cfg: &FibConfig, op: &Op) -> (RouteNetlinkMessage, u16) {
    match op {
        Op::Delete(prefix, metric) => {
            let mut m = RouteMessage::default();
            m.header = base_header(cfg, prefix);
            // Match any scope and type: the kernel then matches on prefix, table, metric and protocol.
            m.header.scope = RouteScope::NoWhere;
            m.header.kind = RouteType::Unspec;
            m.attributes
                .push(RouteAttribute::Destination(prefix.ip().into()));
            m.attributes.push(RouteAttribute::Table(cfg.table));
            m.attributes.push(RouteAttribute::Priority(*metric));
            (RouteNetlinkMessage::DelRoute(m), 0)
        }
        Op::Create(r) | Op::Replace(r) => {
            let flags = if matches!(op, Op::Create(_)) {
                NLM_F_CREATE | NLM_F_EXCL
            } else {
                NLM_F_CREATE | NLM_F_REPLACE
            };
            let mut m = RouteMessage::default();
            m.header = base_header(cfg, &r.prefix);
            m.attributes
                .push(RouteAttribute::Destination(r.prefix.ip().into()));
            m.attributes.push(RouteAttribute::Table(cfg.table));
            m.attributes.push(RouteAttribute::Priority(cfg.metric));
            match &r.next_hops {
                NextHops::Blackhole => {
                    m.header.kind = RouteType::BlackHole;
                    m.header.scope = RouteScope::Universe;
                }
                NextHops::Unreachable => {
                    m.header.kind = RouteType::Unreachable;
                    m.header.scope = RouteScope::Universe;
                }
                NextHops::Via(hops) => {
                    m.header.kind = RouteType::Unicast;
                    m.header.scope = if hops.iter().all(|h| h.gateway.is_none()) {
                        RouteScope::Link
                    } else {
                        RouteScope::Universe
                    };
                    if hops.len() == 1 {
                        let h = &hops[0];
                        if let Some(gw) = h.gateway {
                            m.attributes.push(RouteAttribute::Gateway(gw.into()));
                        }
                        let idx = dev_index(&h.dev);
                        if idx != 0 {
                            m.attributes.push(RouteAttribute::Oif(idx));
                        }
                        if h.onlink {
                            m.header.flags |= RouteFlags::Onlink;
                        }
                    } else {
                        let mut nhs = Vec::with_capacity(hops.len());
                        for h in hops {
                            let mut nh = RouteNextHop::default();
                            nh.interface_index = dev_index(&h.dev);
                            if h.onlink {
                                nh.flags |= RouteNextHopFlags::Onlink;
                            }
                            if let Some(gw) = h.gateway {
                                nh.attributes.push(RouteAttribute::Gateway(gw.into()));
                            }
                            nhs.push(nh);
                        }
                        m.attributes.push(RouteAttribute::MultiPath(nhs));
                    }
                }
            }
            (RouteNetlinkMessage::NewRoute(m), flags)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> IpNetwork {
        s.parse().expect("prefix")
    }

    #[test]
    fn validate_rejects_host_bits_and_family_mix() {
        assert!(Route::blackhole(p("10.0.0.1/24")).validate().is_err());
        assert!(Route::via(
            p("10.0.0.0/24"),
            vec![NextHop::via("fd00::1".parse().unwrap())]
        )
        .validate()
        .is_err());
        assert!(Route::via(p("10.0.0.0/24"), vec![]).validate().is_err());
        assert!(Route::via(
            p("fd00::/64"),
            vec![NextHop::via("fe80::1".parse().unwrap())]
        )
        .validate()
        .is_err());
        assert!(Route::via(
            p("10.0.0.0/24"),
            vec![NextHop::via("10.1.0.1".parse().unwrap())]
        )
        .validate()
        .is_ok());
    }

    #[test]
    fn encode_then_parse_is_the_same_route() {
        let cfg = FibConfig::default();
        let routes = [
            Route::blackhole(p("10.244.1.0/26")),
            Route::via(
                p("10.244.2.0/26"),
                vec![NextHop {
                    gateway: Some("192.168.1.2".parse().unwrap()),
                    dev: Some(Dev::Index(3)),
                    onlink: true,
                }],
            ),
            Route::via(
                p("fd00:1::/120"),
                vec![
                    NextHop {
                        gateway: Some("fd00::2".parse().unwrap()),
                        dev: Some(Dev::Index(4)),
                        onlink: false,
                    },
                    NextHop {
                        gateway: Some("fd00::3".parse().unwrap()),
                        dev: Some(Dev::Index(4)),
                        onlink: false,
                    },
                ],
            ),
        ];
        for r in routes {
            let (msg, _) = encode(&cfg, &Op::Replace(Arc::new(r.clone())));
            let RouteNetlinkMessage::NewRoute(m) = msg else {
                panic!("not a NewRoute")
            };
            let k = parse_route(&m).expect("parses");
            assert_eq!(k.protocol, DEFAULT_PROTOCOL);
            assert_eq!(k.metric, DEFAULT_METRIC);
            assert_eq!(k.table, MAIN_TABLE);
            assert!(matches(&r, &k.route), "{r:?} vs {:?}", k.route);
        }
    }

    fn arb_route() -> impl proptest::strategy::Strategy<Value = Route> {
        use proptest::prelude::*;
        let v4 = (any::<u32>(), 0u8..=32).prop_map(|(a, l)| {
            let n = ipnetwork::Ipv4Network::new(std::net::Ipv4Addr::from(a), l).expect("len ok");
            IpNetwork::V4(ipnetwork::Ipv4Network::new(n.network(), l).expect("len ok"))
        });
        let hop = (
            any::<u32>(),
            proptest::option::of(1u32..1000),
            any::<bool>(),
        )
            .prop_map(|(g, dev, onlink)| NextHop {
                gateway: Some(IpAddr::V4(std::net::Ipv4Addr::from(g))),
                dev: dev.map(Dev::Index),
                onlink: onlink && dev.is_some(),
            });
        let hops = prop_oneof![
            Just(NextHops::Blackhole),
            Just(NextHops::Unreachable),
            proptest::collection::vec(hop, 1..4).prop_map(|mut v| {
                v.sort();
                v.dedup();
                NextHops::Via(v)
            }),
        ];
        (v4, hops).prop_map(|(prefix, next_hops)| Route { prefix, next_hops })
    }

    proptest::proptest! {
        /// What margay writes is what it reads back as equal (so adoption and repair never loop).
        #[test]
        fn encoded_routes_parse_back_equal(route in arb_route()) {
            let cfg = FibConfig { table: 1000, ..FibConfig::default() };
            let (msg, _) = encode(&cfg, &Op::Create(Arc::new(route.clone())));
            let mut buf = Vec::new();
            crate::dataplane::nl::encode_into(&mut buf, 1, msg, 0);
            let parsed = crate::dataplane::nl::decode_all(&buf);
            proptest::prop_assert_eq!(parsed.len(), 1);
            let RouteNetlinkMessage::NewRoute(m) = &parsed[0].1 else { panic!("not a route") };
            let k = parse_route(m).expect("parses");
            proptest::prop_assert_eq!(k.table, 1000);
            proptest::prop_assert!(matches(&route, &k.route), "{} vs {}", route, k.route);
        }
    }

    fn arb_op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        let v6 = (any::<u128>(), 0u8..=128, any::<u128>()).prop_map(|(a, l, g)| {
            let n = ipnetwork::Ipv6Network::new(std::net::Ipv6Addr::from(a), l).expect("len");
            Route::via(
                IpNetwork::V6(ipnetwork::Ipv6Network::new(n.network(), l).expect("len")),
                vec![NextHop::via(IpAddr::V6(std::net::Ipv6Addr::from(g)))],
            )
        });
        let route = prop_oneof![arb_route(), v6];
        prop_oneof![
            route.clone().prop_map(|r| Op::Create(Arc::new(r))),
            route.clone().prop_map(|r| Op::Replace(Arc::new(r))),
            (route, 0u32..5000).prop_map(|(r, m)| Op::Delete(r.prefix, m)),
        ]
    }

    proptest::proptest! {
        /// The hand-written hot path emits exactly what netlink-packet-route emits.
        #[test]
        fn fast_encoding_equals_the_crates(op in arb_op(), table in proptest::prop_oneof![proptest::strategy::Just(254u32), 1u32..100_000], seq in 1u32..) {
            let cfg = FibConfig { table, ..FibConfig::default() };
            let mut fast = Vec::new();
            if encode_fast(&cfg, &op, seq, &mut fast) {
                let (msg, flags) = encode(&cfg, &op);
                let mut slow = Vec::new();
                crate::dataplane::nl::encode_into(&mut slow, seq, msg, flags);
                proptest::prop_assert_eq!(fast, slow);
            }
        }
    }

    #[test]
    fn a_hop_without_device_matches_any_device() {
        let d = Route::via(
            p("10.0.0.0/24"),
            vec![NextHop::via("10.1.0.1".parse().unwrap())],
        );
        let k = Route::via(
            p("10.0.0.0/24"),
            vec![NextHop {
                gateway: Some("10.1.0.1".parse().unwrap()),
                dev: Some(Dev::Index(7)),
                onlink: false,
            }],
        );
        assert!(matches(&d, &k));
        let other = Route::via(
            p("10.0.0.0/24"),
            vec![NextHop::via("10.1.0.2".parse().unwrap())],
        );
        assert!(!matches(&other, &k));
        assert!(!matches(&Route::blackhole(p("10.0.0.0/24")), &k));
    }
}
