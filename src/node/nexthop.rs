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
use super::encap::{Encap, EncapRouting};

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
    /// Next hops already reported unresolved (logged once until they resolve).
    reported: std::collections::HashSet<IpAddr>,
    unresolved: BTreeMap<IpNetwork, String>,
    /// One picture per tunnel (VXLAN v4, VXLAN v6, IPIP): learned routes of an encapsulated pool go through
    /// its tunnel, or are withheld while it cannot be built.
    encap: Vec<EncapRouting>,
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
        match &r {
            Resolution::Unresolved(why) => {
                if self.reported.insert(nh) {
                    tracing::warn!(next_hop = %nh, reason = %why, "BGP next hop unresolved: its routes are not installed until it resolves");
                }
            }
            _ => {
                if self.reported.remove(&nh) {
                    tracing::info!(next_hop = %nh, "BGP next hop resolves again");
                }
            }
        }
        self.resolved.insert(nh, r.clone());
        r
    }

    /// The kernel route for a learned prefix, or why there is none.
    fn route(&mut self, prefix: IpNetwork, nhs: &[IpAddr]) -> Result<Route, String> {
        let mut hops: Vec<NextHop> = Vec::new();
        let mut why = Vec::new();
        for &nh in nhs {
            // A pool has at most one encapsulation (validation refuses both modes on).
            match self
                .encap
                .iter()
                .find(|e| e.covers(&prefix))
                .map(|e| e.encap(&prefix, nh))
            {
                None | Some(Encap::No) => {}
                Some(Encap::Tunnel(hop)) => {
                    hops.push(hop);
                    continue;
                }
                Some(Encap::Missing(w)) => {
                    why.push(w);
                    continue;
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
    /// A tunnel's picture changed: every learned route is computed again (the FIB writes only differences).
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

/// The index of the next tunnel picture to change; None when one's sender is gone; never with none.
async fn any_changed(w: &mut [tokio::sync::watch::Receiver<EncapRouting>]) -> Option<usize> {
    if w.is_empty() {
        return std::future::pending().await;
    }
    let changes = w
        .iter_mut()
        .enumerate()
        .map(|(i, r)| Box::pin(async move { r.changed().await.ok().map(|()| i) }));
    futures::future::select_all(changes).await.0
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
    encap: Vec<tokio::sync::watch::Receiver<EncapRouting>>,
) {
    let mut encap = encap;
    let mut r = Resolver {
        encap: encap
            .iter_mut()
            .map(|w| w.borrow_and_update().clone())
            .collect(),
        netns: netns.clone(),
        learned: HashMap::new(),
        igp: None,
        resolved: HashMap::new(),
        reported: std::collections::HashSet::new(),
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
            i = any_changed(&mut encap) => {
                match i {
                    Some(i) => {
                        r.encap[i] = encap[i].borrow_and_update().clone();
                        r.rewrite_all(&fib).await;
                    }
                    // A follower ended (the node is shutting down): stop listening to all of them.
                    None => encap.clear(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ippool::EncapMode;
    use crate::node::encap::Tunnel;

    fn resolver(encap: Vec<EncapRouting>) -> Resolver {
        Resolver {
            netns: None,
            learned: HashMap::new(),
            // No IGP read: plain next hops go as learned (on-link).
            igp: None,
            resolved: HashMap::new(),
            reported: std::collections::HashSet::new(),
            unresolved: BTreeMap::new(),
            encap,
        }
    }

    fn ipip(ready: bool) -> EncapRouting {
        EncapRouting {
            tunnel: Tunnel::Ipip,
            pools: vec![("10.244.0.0/16".parse().unwrap(), EncapMode::CrossSubnet)],
            local_subnet: Some("10.99.0.0/24".parse().unwrap()),
            ready,
            not_ready: (!ready).then(|| "this kernel has no ipip module".to_string()),
            ..Default::default()
        }
    }

    /// The route plans of an IPIP pool: across subnets through tunl0 via the remote node, inside the subnet
    /// plain, an ECMP set split accordingly, other pools untouched; without the tunnel the route is withheld.
    #[test]
    fn ipip_route_plans() {
        let vx = EncapRouting {
            tunnel: Tunnel::VxlanV4,
            ..Default::default()
        };
        let mut r = resolver(vec![vx, ipip(true)]);
        let block: IpNetwork = "10.244.9.0/26".parse().unwrap();
        let far: IpAddr = "10.99.1.12".parse().unwrap();
        let near: IpAddr = "10.99.0.13".parse().unwrap();
        assert_eq!(
            r.route(block, &[far]).unwrap().to_string(),
            "10.244.9.0/26 via 10.99.1.12 dev tunl0 onlink"
        );
        assert_eq!(
            r.route(block, &[near]).unwrap().to_string(),
            "10.244.9.0/26 via 10.99.0.13"
        );
        let both = r.route(block, &[far, near]).unwrap().to_string();
        assert!(
            both.contains("via 10.99.1.12 dev tunl0 onlink") && both.contains("via 10.99.0.13"),
            "{both}"
        );
        // Not an IPIP pool: as learned.
        assert_eq!(
            r.route("10.50.0.0/26".parse().unwrap(), &[far])
                .unwrap()
                .to_string(),
            "10.50.0.0/26 via 10.99.1.12"
        );

        // No tunl0 (no ipip module): never unencapsulated; the reason travels to the status.
        let mut r = resolver(vec![ipip(false)]);
        let why = r.route(block, &[far]).unwrap_err();
        assert!(
            why.contains("tunl0") && why.contains("no ipip module"),
            "{why}"
        );
        // An ECMP set keeps only its same-subnet member.
        assert_eq!(
            r.route(block, &[far, near]).unwrap().to_string(),
            "10.244.9.0/26 via 10.99.0.13"
        );
    }
}
