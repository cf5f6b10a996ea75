//! Restart: what a node rebuilds from the kernel and the datastore, and when its routes are trusted again.
//!
//! ```text
//!   start ─▶ FIB task adopts its proto-77 routes (forwarding continues, nothing written)
//!         ─▶ reconcile_pods: pod veths (kernel) vs this node's IPAM allocations (log what disagrees)
//!         ─▶ CNI socket opens
//!         ─▶ the node's blocks in the RIB (peer_loop waits for them, bounded: a peer that kept our routes
//!            sweeps at our End-of-RIB whatever the initial table lacked)
//!         ─▶ peers applied ─▶ converge(): poll the speaker's PeerSync every CONVERGE_POLL
//!                                   every Established peer sent End-of-RIB (or the bounded wait ran out)
//!                             ─▶ sweep(): adopted routes nobody re-announced leave the FIB, except
//!                                those via a configured peer not back yet (held until it is, or max wait)
//!                             ─▶ Readiness::Converged (/readyz)
//! ```
//!
//! RFC 4724 section 4.2 asks the restarting speaker to defer its route selection until End-of-RIB has
//! arrived from its peers; margay selects at once (the kernel keeps the adopted routes meanwhile, and a
//! re-learned route replaces its adopted copy in place), and defers only the *removal* of what was not
//! re-learned. The wait is bounded, so a peer that never comes back cannot hold the node's FIB stale.
//! This module never removes a route that has a live owner: a peer's path in the Loc-RIB, one of the
//! node's own blocks in IPAM, or (with the `vxlan` networking backend, no BGP) a route the block-affinity
//! path wants ([`super::encap::route_by_affinities`] publishes its set before it sends the routes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ipnetwork::IpNetwork;
use tokio::sync::{mpsc, oneshot, watch};

use super::backend::blocking;
use crate::bgp::converge::convergence;
use crate::bgp::rib::{PathSource, Query, RibInput};
use crate::bgp::speaker::{PeerSync, SpeakerHandle};
use crate::bgp::wire::Family;
use crate::dataplane::fib::{FibHandle, NextHops, Route};
use crate::dataplane::pod;
use crate::ipam::NodeIpam;

/// How long convergence waits at least for configured peers that are not Established yet (a restarted
/// node's passive mesh sessions need the other side to reconnect), unless every peer is already done.
pub const CONVERGE_MIN_WAIT: Duration = Duration::from_secs(5);
/// The bound on the wait for End-of-RIB: the graceful-restart time margay advertises and Calico's
/// default `nodeMeshMaxRestartTime` (120 s); peers keep our routes no longer than this either.
pub const CONVERGE_MAX_WAIT: Duration = Duration::from_secs(120);
const CONVERGE_POLL: Duration = Duration::from_millis(100);

/// Where the node is on its way to serving with trusted routes (what /readyz reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readiness {
    /// Peers not yet derived from the datastore and applied.
    Syncing(String),
    /// Peers applied; waiting for End-of-RIB.
    Converging(String),
    /// BGP converged and stale routes swept.
    Converged,
}

impl Readiness {
    /// None when ready; otherwise why not.
    pub fn reason(&self) -> Option<String> {
        match self {
            Readiness::Syncing(r) | Readiness::Converging(r) => Some(r.clone()),
            Readiness::Converged => None,
        }
    }
}

/// What the kernel's pod veths and the node's IPAM allocations agree and disagree on.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodReconcile {
    /// Veths whose every address is allocated in IPAM.
    pub matched: usize,
    /// (veth, workload id, address) for addresses on a veth that IPAM does not hold for this node.
    pub kernel_only: Vec<(String, String, IpAddr)>,
    /// (address, handle) allocated to this node without a veth holding it.
    pub ipam_only: Vec<(IpAddr, String)>,
    /// Veths with no host route (an ADD that died half way, or someone removed the route).
    pub without_address: Vec<String>,
}

/// Compare the pod veths in the kernel with this node's IPAM allocations and log every disagreement.
/// Nothing is changed: CNI DEL and GC (driven by the runtime, which knows which pods exist) repair.
pub async fn reconcile_pods(
    ipam: &NodeIpam,
    netns: Option<PathBuf>,
) -> anyhow::Result<PodReconcile> {
    let pods = blocking(move || pod::list_pods(netns.as_deref()))
        .await
        .map_err(|e| anyhow::anyhow!("listing pod veths: {}", e.msg))?;
    let allocs = ipam
        .allocations()
        .await
        .map_err(|e| anyhow::anyhow!("reading this node's IPAM allocations: {e}"))?;
    let owner: BTreeMap<IpAddr, String> = allocs
        .iter()
        .map(|a| (a.ip, a.handle_id.clone().unwrap_or_default()))
        .collect();
    let mut report = PodReconcile::default();
    let mut plumbed = BTreeSet::new();
    for p in &pods {
        if p.ips.is_empty() {
            tracing::warn!(veth = %p.host_ifname, workload = %p.workload_id,
                "restart: pod veth without a host route; a CNI DEL or GC will remove it");
            report.without_address.push(p.host_ifname.clone());
            continue;
        }
        let mut all = true;
        for ip in &p.ips {
            plumbed.insert(*ip);
            if !owner.contains_key(ip) {
                all = false;
                tracing::warn!(veth = %p.host_ifname, workload = %p.workload_id, address = %ip,
                    "restart: pod address not allocated to this node in IPAM; another workload may get it");
                report
                    .kernel_only
                    .push((p.host_ifname.clone(), p.workload_id.clone(), *ip));
            }
        }
        if all {
            report.matched += 1;
        }
    }
    for a in &allocs {
        if !plumbed.contains(&a.ip) {
            let handle = a.handle_id.clone().unwrap_or_default();
            tracing::warn!(address = %a.ip, handle = %handle,
                "restart: address allocated to this node has no pod veth; CNI GC or `margay ipam release` frees it");
            report.ipam_only.push((a.ip, handle));
        }
    }
    tracing::info!(
        veths = pods.len(),
        matched = report.matched,
        kernel_only = report.kernel_only.len(),
        ipam_only = report.ipam_only.len(),
        "restart: pod veths reconciled with IPAM"
    );
    Ok(report)
}

/// Wait for convergence (see [`convergence`]), publishing the reason on `ready` meanwhile.
pub async fn converge(
    spk: &SpeakerHandle,
    ready: &watch::Sender<Readiness>,
    min_wait: Duration,
    max_wait: Duration,
) {
    let start = Instant::now();
    loop {
        let peers = spk.sync_state().await.unwrap_or_default();
        match convergence(&peers, start.elapsed(), min_wait, max_wait) {
            None => {
                let timed_out = peers.iter().any(|p| p.established && !p.end_of_rib);
                tracing::info!(
                    elapsed_ms = start.elapsed().as_millis() as u64,
                    peers = peers.len(),
                    established = peers.iter().filter(|p| p.established).count(),
                    timed_out,
                    "BGP converged"
                );
                return;
            }
            Some(reason) => {
                ready.send_if_modified(|r| {
                    let new = Readiness::Converging(reason.clone());
                    let changed = *r != new;
                    *r = new;
                    changed
                });
            }
        }
        tokio::time::sleep(CONVERGE_POLL).await;
    }
}

/// Prefixes the RIB holds a peer's path for (the routes that own a FIB entry).
async fn learned_prefixes(rib: &mpsc::Sender<RibInput>) -> anyhow::Result<BTreeSet<IpNetwork>> {
    let mut out = BTreeSet::new();
    for family in [Family::IPV4_UNICAST, Family::IPV6_UNICAST] {
        let (reply, rx) = oneshot::channel();
        rib.send(RibInput::Query(Query::LocRib { family, reply }))
            .await
            .map_err(|_| anyhow::anyhow!("the RIB task has stopped"))?;
        let routes = rx
            .await
            .map_err(|_| anyhow::anyhow!("the RIB task has stopped"))?;
        out.extend(
            routes
                .into_iter()
                .filter(|r| matches!(r.best.source, PathSource::Peer(_)))
                .map(|r| r.prefix),
        );
    }
    Ok(out)
}

/// What a sweep removed, and what it kept for peers that are not back yet.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Learned routes nobody re-announced.
    pub routes: Vec<IpNetwork>,
    /// Blackholes of blocks this node no longer holds.
    pub blackholes: Vec<IpNetwork>,
    /// Not re-announced, but via a configured peer that has not sent its table yet (kept for now).
    pub held: Vec<IpNetwork>,
}

/// Decide, without I/O, what a sweep removes: a gateway route whose prefix is not `learned`, unless one of
/// its gateways is in `hold` (a configured peer whose table has not arrived: as RFC 4724 4.2 keeps a
/// restarting peer's routes, its forwarding state is kept until it is back or the wait is over); a
/// blackhole whose prefix is not one of the node's `blocks`.
pub fn classify(
    desired: &[Route],
    learned: &BTreeSet<IpNetwork>,
    blocks: &BTreeSet<IpNetwork>,
    hold: &BTreeSet<IpAddr>,
) -> SweepReport {
    let mut report = SweepReport::default();
    for r in desired {
        match &r.next_hops {
            NextHops::Blackhole if !blocks.contains(&r.prefix) => report.blackholes.push(r.prefix),
            NextHops::Blackhole => {}
            _ if learned.contains(&r.prefix) => {}
            NextHops::Via(hops)
                if hops
                    .iter()
                    .any(|h| h.gateway.is_some_and(|g| hold.contains(&g))) =>
            {
                report.held.push(r.prefix)
            }
            _ => report.routes.push(r.prefix),
        }
    }
    report
}

/// Remove the FIB routes that have no owner any more (see [`classify`]). The order of the reads (FIB, then
/// RIB, the affinity routes and IPAM) means a route added meanwhile is either not seen or seen with its
/// owner: every owner records a route before it sends it to the FIB.
pub async fn sweep(
    fib: &FibHandle,
    rib: &mpsc::Sender<RibInput>,
    affinity_routes: &watch::Receiver<BTreeSet<IpNetwork>>,
    ipam: &NodeIpam,
    hold: &BTreeSet<IpAddr>,
) -> anyhow::Result<SweepReport> {
    let desired = fib
        .desired()
        .await
        .map_err(|e| anyhow::anyhow!("reading the FIB: {e}"))?;
    let mut learned = learned_prefixes(rib).await?;
    learned.extend(affinity_routes.borrow().iter().copied());
    let blocks: BTreeSet<IpNetwork> = ipam
        .routes()
        .await
        .map_err(|e| anyhow::anyhow!("reading the node's blocks: {e}"))?
        .blocks
        .into_iter()
        .collect();
    let report = classify(&desired, &learned, &blocks, hold);
    let gone: Vec<IpNetwork> = report
        .routes
        .iter()
        .chain(&report.blackholes)
        .copied()
        .collect();
    if !gone.is_empty() {
        fib.remove_many(gone)
            .await
            .map_err(|e| anyhow::anyhow!("removing stale routes: {e}"))?;
    }
    Ok(report)
}

/// Configured peers whose table is not complete: not Established, or no End-of-RIB yet.
fn pending_peers(peers: &[PeerSync]) -> BTreeSet<IpAddr> {
    peers
        .iter()
        .filter(|p| !(p.established && p.end_of_rib))
        .map(|p| p.address)
        .collect()
}

/// The restart task: wait for the peers to be applied, converge (bounded by `min_wait` / `max_wait`, see
/// [`convergence`]), sweep, report ready; then keep sweeping, once a second, the routes held for peers
/// that were not back, as they come back, and all of them when `max_wait` is over. `affinity_routes`: the
/// routes the `vxlan` backend derives from block affinities (always empty with BGP).
pub async fn run(
    spk: Arc<SpeakerHandle>,
    fib: FibHandle,
    affinity_routes: watch::Receiver<BTreeSet<IpNetwork>>,
    ipam: Arc<NodeIpam>,
    mut peers_applied: watch::Receiver<bool>,
    ready: watch::Sender<Readiness>,
    (min_wait, max_wait): (Duration, Duration),
) {
    if peers_applied.wait_for(|a| *a).await.is_err() {
        return;
    }
    let start = Instant::now();
    converge(&spk, &ready, min_wait, max_wait).await;
    let rib = spk.rib();
    let mut first = true;
    let mut last_held: Vec<IpNetwork> = Vec::new();
    loop {
        let hold = if start.elapsed() >= max_wait {
            BTreeSet::new()
        } else {
            pending_peers(&spk.sync_state().await.unwrap_or_default())
        };
        match sweep(&fib, &rib, &affinity_routes, &ipam, &hold).await {
            Ok(r) => {
                if first || !r.routes.is_empty() || !r.blackholes.is_empty() || r.held != last_held
                {
                    tracing::info!(routes = %super::prefix_list(&r.routes),
                        blackholes = %super::prefix_list(&r.blackholes),
                        held = %super::prefix_list(&r.held),
                        "restart: swept routes nobody re-announced after convergence (held: via peers not back yet)");
                }
                if first {
                    // With every readiness receiver gone (the daemon is stopping) there is nobody to tell.
                    let _ = ready.send(Readiness::Converged);
                    first = false;
                }
                if r.held.is_empty() {
                    return;
                }
                last_held = r.held;
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "restart: sweeping stale routes failed; they stay until the next restart");
                // As above: no receiver left means the daemon is stopping.
                let _ = ready.send(Readiness::Converged);
                return;
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn via(prefix: &str, gw: &str) -> Route {
        Route::via(
            prefix.parse().unwrap(),
            vec![crate::dataplane::fib::NextHop::via(gw.parse().unwrap())],
        )
    }

    #[test]
    fn sweep_keeps_owned_routes_and_holds_those_of_peers_not_back() {
        let n = |s: &str| s.parse::<IpNetwork>().unwrap();
        let desired = [
            Route::blackhole(n("10.244.1.0/26")),
            Route::blackhole(n("10.244.9.0/26")),
            via("10.244.2.0/26", "10.0.0.2"),
            via("10.244.3.0/26", "10.0.0.3"),
            via("10.244.4.0/26", "10.0.0.4"),
        ];
        let learned: BTreeSet<IpNetwork> = [n("10.244.2.0/26")].into_iter().collect();
        let blocks: BTreeSet<IpNetwork> = [n("10.244.1.0/26")].into_iter().collect();
        let hold: BTreeSet<IpAddr> = ["10.0.0.4".parse().unwrap()].into_iter().collect();
        let r = classify(&desired, &learned, &blocks, &hold);
        assert_eq!(r.blackholes, [n("10.244.9.0/26")]);
        assert_eq!(r.routes, [n("10.244.3.0/26")]);
        assert_eq!(r.held, [n("10.244.4.0/26")]);
        // Nothing held any more (the wait is over): the route of the peer that never came back goes too.
        let r = classify(&desired, &learned, &blocks, &BTreeSet::new());
        assert_eq!(r.routes, [n("10.244.3.0/26"), n("10.244.4.0/26")]);
        assert!(r.held.is_empty());
    }
}
