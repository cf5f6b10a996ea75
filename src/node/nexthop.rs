//! Routes learned over BGP into the kernel, each next hop resolved recursively through the node's own
//! routes first ([`crate::dataplane::resolve`], BIRD's `gateway recursive`).
//!
//! ```text
//!   RIB ──Vec<FibEvent>──▶ learned_routes ──replace/remove──▶ FIB task
//!   kernel route changes (not proto 77) ──▶ re-dump, re-resolve the next hops, rewrite what changed
//! ```
//!
//! One task owns the learned routes and their resolutions. A route whose next hops all fail to resolve is
//! not installed (rather than failing in the kernel or going to a wrong place): it is logged once per next
//! hop, listed in `margay status` (`unresolvedRoutes`, metric `margay_unresolved_routes`), and resolved
//! again on every change of the node's routes and every [`RETRY`].

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Duration;

use ipnetwork::IpNetwork;
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc;

use crate::bgp::rib::FibEvent;
use crate::dataplane::fib::{FibHandle, NextHop, Route, DEFAULT_PROTOCOL, MAIN_TABLE};
use crate::dataplane::resolve::{drain_changes, route_monitor, Igp, Resolution};

use super::cluster::DataplaneStatus;
use super::vxlan::{Encap, VxlanRouting};

/// How often unresolved next hops are tried again even without a route change.
pub const RETRY: Duration = Duration::from_secs(5);
/// Let a burst of route changes (an interface going down takes many) land before re-resolving.
const SETTLE: Duration = Duration::from_millis(50);
/// At most this many unresolved routes are listed in the status (the count is always exact).
const STATUS_LIST: usize = 100;

struct Resolver {
    netns: Option<PathBuf>,
    /// Prefix → the BGP next hops of its ECMP set.
    learned: HashMap<IpNetwork, Vec<IpAddr>>,
    /// The node's routes, when they could be read (None: resolve nothing, install `via` as learned).
    igp: Option<Igp>,
    resolved: HashMap<IpAddr, Resolution>,
    unresolved: BTreeMap<IpNetwork, String>,
    /// VXLAN pools and remote VTEPs: learned routes of VXLAN pools go through the tunnel.
    vxlan: VxlanRouting,
}

/// An IPv6 link-local next hop cannot be looked up without its interface: it goes as learned.
fn is_link_local(a: &IpAddr) -> bool {
    matches!(a, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80)
}

impl Resolver {
    fn resolution(&mut self, nh: IpAddr) -> Resolution {
        if let Some(r) = self.resolved.get(&nh) {
            return r.clone();
        }
        let r = match &self.igp {
            Some(igp) if !is_link_local(&nh) => igp.resolve(nh),
            _ => Resolution::OnLink,
        };
        if let Resolution::Unresolved(why) = &r {
            tracing::warn!(next_hop = %nh, reason = %why, "BGP next hop unresolved: its routes are not installed until it resolves");
        }
        self.resolved.insert(nh, r.clone());
        r
    }

    /// The kernel route for a learned prefix, or why there is none.
    fn route(&mut self, prefix: IpNetwork, nhs: &[IpAddr]) -> Result<Route, String> {
        let mut hops: Vec<NextHop> = Vec::new();
        let mut why = Vec::new();
        for &nh in nhs {
            if !self.vxlan.pools.is_empty() {
                match self.vxlan.encap(&prefix, nh) {
                    Encap::No => {}
                    Encap::Tunnel(t) => {
                        hops.push(NextHop::onlink(
                            IpAddr::V4(t),
                            crate::dataplane::vxlan::DEVICE,
                        ));
                        continue;
                    }
                    Encap::Missing(w) => {
                        why.push(w);
                        continue;
                    }
                }
            }
            match self.resolution(nh) {
                Resolution::OnLink => hops.push(NextHop::via(nh)),
                Resolution::Via(h) => hops.extend(h),
                Resolution::Unresolved(w) => why.push(w),
            }
        }
        hops.sort();
        hops.dedup();
        if hops.is_empty() {
            return Err(why.join("; "));
        }
        Ok(Route::via(prefix, hops))
    }

    fn publish(&self, status: &DataplaneStatus) {
        let list: Vec<String> = self
            .unresolved
            .iter()
            .take(STATUS_LIST)
            .map(|(p, w)| format!("{p}: {w}"))
            .collect();
        let total = self.unresolved.len();
        status.send_if_modified(|s| {
            let mut list = list;
            if total > STATUS_LIST {
                list.push(format!("... and {} more", total - STATUS_LIST));
            }
            if s.unresolved_routes == list && s.unresolved_total == total as u64 {
                return false;
            }
            s.unresolved_routes = list;
            s.unresolved_total = total as u64;
            true
        });
    }

    /// Turn RIB events into FIB writes.
    async fn on_events(&mut self, events: Vec<FibEvent>, fib: &FibHandle) {
        let mut replace = Vec::new();
        let mut remove = Vec::new();
        for ev in events {
            match ev {
                FibEvent::Set { prefix, next_hops } => {
                    match self.route(prefix, &next_hops) {
                        Ok(r) => {
                            self.unresolved.remove(&prefix);
                            replace.push(r);
                        }
                        Err(why) => {
                            // Whatever was there for it is wrong now.
                            if self.unresolved.insert(prefix, why).is_none() {
                                remove.push(prefix);
                            }
                        }
                    }
                    self.learned.insert(prefix, next_hops);
                }
                FibEvent::Remove { prefix } => {
                    self.learned.remove(&prefix);
                    self.unresolved.remove(&prefix);
                    remove.push(prefix);
                }
            }
        }
        write(fib, replace, remove).await;
    }

    /// The node's routes changed (or the retry timer fired): read them again and rewrite the learned routes
    /// whose next hops now resolve differently.
    async fn reresolve(&mut self, fib: &FibHandle) {
        let ns = self.netns.clone();
        let igp = tokio::task::spawn_blocking(move || {
            Igp::dump(ns.as_deref(), MAIN_TABLE, DEFAULT_PROTOCOL)
        })
        .await;
        let igp = match igp {
            Ok(Ok(i)) => i,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "reading the node's routes for next-hop resolution; keeping the last");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "next-hop resolution task");
                return;
            }
        };
        if self.igp.as_ref() == Some(&igp) && self.unresolved.is_empty() {
            return;
        }
        self.igp = Some(igp);
        let old = std::mem::take(&mut self.resolved);
        let mut changed: Vec<IpAddr> = Vec::new();
        for (nh, before) in &old {
            if &self.resolution(*nh) != before {
                changed.push(*nh);
                if matches!(before, Resolution::Unresolved(_)) {
                    tracing::info!(next_hop = %nh, "BGP next hop resolves again");
                }
            }
        }
        if changed.is_empty() {
            return;
        }
        let affected: Vec<(IpNetwork, Vec<IpAddr>)> = self
            .learned
            .iter()
            .filter(|(_, nhs)| nhs.iter().any(|n| changed.contains(n)))
            .map(|(p, n)| (*p, n.clone()))
            .collect();
        let mut replace = Vec::new();
        let mut remove = Vec::new();
        for (prefix, nhs) in affected {
            match self.route(prefix, &nhs) {
                Ok(r) => {
                    self.unresolved.remove(&prefix);
                    replace.push(r);
                }
                Err(why) => {
                    if self.unresolved.insert(prefix, why).is_none() {
                        remove.push(prefix);
                    }
                }
            }
        }
        tracing::info!(
            next_hops = changed.len(),
            rewritten = replace.len(),
            withdrawn = remove.len(),
            "node routes changed: learned routes re-resolved"
        );
        write(fib, replace, remove).await;
    }
}

impl Resolver {
    /// The VXLAN picture changed: every learned route is computed again (the FIB writes only differences).
    async fn rewrite_all(&mut self, fib: &FibHandle) {
        let all: Vec<(IpNetwork, Vec<IpAddr>)> =
            self.learned.iter().map(|(p, n)| (*p, n.clone())).collect();
        let mut replace = Vec::new();
        let mut remove = Vec::new();
        for (prefix, nhs) in all {
            match self.route(prefix, &nhs) {
                Ok(r) => {
                    self.unresolved.remove(&prefix);
                    replace.push(r);
                }
                Err(why) => {
                    if self.unresolved.insert(prefix, why).is_none() {
                        remove.push(prefix);
                    }
                }
            }
        }
        write(fib, replace, remove).await;
    }
}

async fn write(fib: &FibHandle, replace: Vec<Route>, remove: Vec<IpNetwork>) {
    if !remove.is_empty() {
        if let Err(e) = fib.remove_many(remove).await {
            tracing::error!(error = %e, "FIB remove");
        }
    }
    if !replace.is_empty() {
        if let Err(e) = fib.replace_many(replace).await {
            tracing::error!(error = %e, "FIB replace");
        }
    }
}

/// Routes learned over BGP into the kernel: each ECMP set as one route via its resolved next hops.
pub async fn learned_routes(
    mut rx: mpsc::Receiver<Vec<FibEvent>>,
    fib: FibHandle,
    netns: Option<PathBuf>,
    status: DataplaneStatus,
    vxlan: Option<tokio::sync::watch::Receiver<VxlanRouting>>,
) {
    let mut vxlan = vxlan;
    let mut r = Resolver {
        vxlan: VxlanRouting::default(),
        netns: netns.clone(),
        learned: HashMap::new(),
        igp: None,
        resolved: HashMap::new(),
        unresolved: BTreeMap::new(),
    };
    // Subscribe before the first dump, so no change between the two is missed.
    let monitor = match route_monitor(netns.as_deref()).and_then(|s| {
        // SAFETY: the Socket owns its fd, which stays open and the same until the AsyncFd drops it.
        unsafe { AsyncFd::register_with_interest(s, tokio::io::Interest::READABLE) }.map_err(|e| {
            crate::dataplane::DataplaneError::Socket {
                netns: crate::dataplane::error::ns_label(netns.as_deref()),
                source: std::io::Error::other(e.to_string()),
            }
        })
    }) {
        Ok(m) => Some(m),
        Err(e) => {
            tracing::warn!(error = %e, "no route-change socket: next hops are re-resolved every {}s only", RETRY.as_secs());
            None
        }
    };
    r.reresolve(&fib).await;
    let mut buf = vec![0u8; 1 << 16];
    let mut retry = tokio::time::interval(RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let changed = async {
            match &monitor {
                Some(m) => {
                    let Ok(mut guard) = m.readable().await else {
                        return std::future::pending::<bool>().await;
                    };
                    let res = drain_changes(
                        guard.get_inner().as_raw_fd(),
                        &mut buf,
                        MAIN_TABLE,
                        DEFAULT_PROTOCOL,
                    );
                    guard.clear_ready();
                    res.unwrap_or(true)
                }
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            events = rx.recv() => {
                let Some(events) = events else { return };
                r.on_events(events, &fib).await;
            }
            c = changed => {
                if c {
                    tokio::time::sleep(SETTLE).await;
                    r.reresolve(&fib).await;
                }
            }
            c = async {
                match vxlan.as_mut() {
                    Some(v) => v.changed().await,
                    None => std::future::pending().await,
                }
            } => {
                match (c, vxlan.as_mut()) {
                    (Ok(()), Some(v)) => {
                        r.vxlan = v.borrow_and_update().clone();
                        r.rewrite_all(&fib).await;
                    }
                    _ => vxlan = None,
                }
            }
            _ = retry.tick() => {
                if !r.unresolved.is_empty() {
                    r.reresolve(&fib).await;
                }
            }
        }
        r.publish(&status);
    }
}
