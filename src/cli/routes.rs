//! `margay routes`: the static routes a host outside the cluster needs to reach every pod block and the
//! service CIDRs through one gateway node, computed from the datastore (IPAM blocks, IP pools, Node
//! resources, the `default` BGPConfiguration), printed in one of four formats, or (`--watch`) kept in step
//! with block claims and releases in a network namespace under margay's outside-route protocol number.
//!
//! ```text
//!   etcd ──list blocks + resources at one revision──▶ plan (pure: blocks, pools, services, gateway) ──▶ text
//!   etcd ──watch blocks / resources──▶ --watch loop ──sync(desired)──▶ FIB task (proto 79) ──▶ target netns
//! ```
//!
//! This module reads etcd and, with `--watch`, writes routes of its own protocol number only (through the
//! FIB task, which adopts what it finds at start and never flushes). It never writes to etcd.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnetwork::IpNetwork;
use serde::Serialize;

use super::table::Table;
use super::CliError;
use crate::config::bgp::ConfigSet;
use crate::config::ippool::IpPool;
use crate::dataplane::{Fib, FibConfig, FibHandle, NextHop, Route};
use crate::datastore::{keys, Datastore, WatchEventKind, WatchMessage};
use crate::ipam::block::Block;

/// The route protocol number of outside-host routes (`ip route ... proto 79`): neither margay node's FIB (77)
/// nor its pod routes (78), unassigned in `/etc/iproute2/rt_protos` (BIRD 12, Felix 80, `ip route add` 3/4).
pub const OUTSIDE_PROTOCOL: u8 = 79;
/// Their metric: its own value, so a hand-written route on the same prefix (metric 0) neither collides
/// with ours nor loses to it silently: the hand-written one wins and ours stays as the fallback.
pub const OUTSIDE_METRIC: u32 = 79;

/// How `margay routes` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RoutesFormat {
    /// Shell commands: `ip route replace PREFIX via GW proto 79 metric 79`.
    Commands,
    /// `ip -batch -` input: `route replace PREFIX via GW proto 79 metric 79`.
    Batch,
    /// A human-readable route table (destination, gateway, what it reaches).
    Table,
    /// JSON: gateway, protocol, metric, routes (prefix, via, kind, pool, node), notes.
    Json,
}

/// `margay routes ...`
#[derive(Debug, Clone, clap::Args)]
pub struct RoutesArgs {
    /// The gateway node: a Node name (its BGP address from the Node resource: spec.bgp.ipv4Address and
    /// ipv6Address) or an IP address of the gateway.
    #[arg(long)]
    pub via: String,
    #[arg(long, value_enum, default_value = "commands")]
    pub format: RoutesFormat,
    /// One route per IP pool instead of one per claimed block, for every enabled pool whose blocks the
    /// gateway learns by BGP (not disabled, no disableBGPExport); other blocks keep their own routes. Off by
    /// default: an aggregate also sends the pool's unclaimed addresses to the gateway, which has no route
    /// for them and sends them on along its default route.
    #[arg(long)]
    pub aggregate: bool,
    /// Leave out the service CIDRs (BGPConfiguration default: serviceClusterIPs, serviceExternalIPs,
    /// serviceLoadBalancerIPs).
    #[arg(long)]
    pub no_services: bool,
    /// Keep installing the routes (and removing those no longer needed) in a network namespace as blocks
    /// are claimed and released, until interrupted. Only routes of --protocol are touched.
    #[arg(long)]
    pub watch: bool,
    /// With --watch: the network namespace to keep the routes in (a name under /var/run/netns or a path);
    /// default the namespace margay runs in.
    #[arg(long, requires = "watch")]
    pub netns: Option<String>,
    /// The route protocol number the routes carry (and --watch owns).
    #[arg(long, default_value_t = OUTSIDE_PROTOCOL)]
    pub protocol: u8,
    /// The metric of the routes.
    #[arg(long, default_value_t = OUTSIDE_METRIC)]
    pub metric: u32,
}

/// What a route reaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteKind {
    /// A whole IP pool (`--aggregate`).
    Pool,
    /// One IPAM block.
    Block,
    /// A service CIDR of the BGPConfiguration.
    Service,
}

/// One route of an outside host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct OutsideRoute {
    pub prefix: IpNetwork,
    pub via: IpAddr,
    pub kind: RouteKind,
    /// The pool the prefix belongs to (name), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// The node a block is affine to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// The gateway the routes point at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gateway {
    /// The Node name when `--via` named one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<IpAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<IpAddr>,
}

impl Gateway {
    fn for_family(&self, v4: bool) -> Option<IpAddr> {
        if v4 {
            self.ipv4
        } else {
            self.ipv6
        }
    }
}

/// What the plan is computed from (read from the datastore).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub pools: Vec<IpPool>,
    /// Every IPAM block, with the node it is affine to.
    pub blocks: BTreeMap<IpNetwork, Option<String>>,
    pub services: BTreeSet<IpNetwork>,
    /// Node name -> (BGP IPv4 address, BGP IPv6 address).
    pub nodes: BTreeMap<String, (Option<IpAddr>, Option<IpAddr>)>,
}

/// The routes, and what the operator should know about them (families without a gateway address, pools
/// routed block by block).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Plan {
    pub routes: Vec<OutsideRoute>,
    pub notes: Vec<String>,
}

/// `--via NODE|IP` against the Node resources. A node must exist and have a BGP address.
pub fn resolve_gateway(inputs: &Inputs, via: &str) -> Result<Gateway, CliError> {
    if let Ok(ip) = via.parse::<IpAddr>() {
        return Ok(Gateway {
            node: None,
            ipv4: ip.is_ipv4().then_some(ip),
            ipv6: ip.is_ipv6().then_some(ip),
        });
    }
    let Some((v4, v6)) = inputs.nodes.get(via) else {
        let known: Vec<&str> = inputs.nodes.keys().map(String::as_str).collect();
        return Err(CliError::NotFound(format!(
            "--via {via:?}: no Node of that name in the datastore (nodes: {}); give a node name or the gateway's IP address",
            if known.is_empty() { "none".to_string() } else { known.join(", ") }
        )));
    };
    if v4.is_none() && v6.is_none() {
        return Err(CliError::NotFound(format!(
            "--via {via:?}: Node {via} has no BGP address (spec.bgp.ipv4Address / ipv6Address); give the gateway's IP address instead"
        )));
    }
    Ok(Gateway {
        node: Some(via.to_string()),
        ipv4: *v4,
        ipv6: *v6,
    })
}

/// A pool's blocks may be covered by one route when the gateway knows a route for every block of the
/// pool: the pool is in use (not disabled) and its blocks are exported over BGP (Calico's export filter
/// drops everything inside a pool with disableBGPExport, so the gateway has only its own blocks of it).
fn aggregatable(p: &IpPool) -> bool {
    !p.spec.disabled && !p.spec.disable_bgp_export
}

/// The most specific pool containing `block`.
fn pool_of<'a>(pools: &'a [IpPool], block: &IpNetwork) -> Option<&'a IpPool> {
    pools
        .iter()
        .filter(|p| {
            p.spec.cidr.is_ipv4() == block.is_ipv4()
                && p.spec.cidr.prefix() <= block.prefix()
                && p.spec.cidr.contains(block.network())
        })
        .max_by_key(|p| p.spec.cidr.prefix())
}

/// The routes an outside host needs (pure).
pub fn plan(inputs: &Inputs, gw: &Gateway, aggregate: bool, services: bool) -> Plan {
    let mut routes = BTreeSet::new();
    let mut notes = BTreeSet::new();
    let no_gateway = |family: &str, what: String, notes: &mut BTreeSet<String>| {
        notes.insert(format!(
            "no route for {what}: the gateway has no {family} address"
        ));
    };
    if aggregate {
        for p in &inputs.pools {
            if !aggregatable(p) {
                notes.insert(format!(
                    "pool {} ({}) is routed block by block: it is {}",
                    p.metadata.name,
                    p.spec.cidr,
                    if p.spec.disabled {
                        "disabled"
                    } else {
                        "disableBGPExport (the gateway learns only its own blocks of it)"
                    }
                ));
                continue;
            }
            match gw.for_family(p.spec.cidr.is_ipv4()) {
                Some(via) => {
                    routes.insert(OutsideRoute {
                        prefix: p.spec.cidr,
                        via,
                        kind: RouteKind::Pool,
                        pool: Some(p.metadata.name.clone()),
                        node: None,
                    });
                }
                None => no_gateway(
                    family(&p.spec.cidr),
                    format!("pool {}", p.spec.cidr),
                    &mut notes,
                ),
            }
        }
    }
    for (block, owner) in &inputs.blocks {
        let pool = pool_of(&inputs.pools, block);
        if aggregate && pool.is_some_and(aggregatable) {
            continue;
        }
        if let Some(p) = pool.filter(|p| p.spec.disable_bgp_export && !aggregate) {
            notes.insert(format!(
                "pool {} ({}) has disableBGPExport: the gateway reaches only its own blocks of it",
                p.metadata.name, p.spec.cidr
            ));
        }
        match gw.for_family(block.is_ipv4()) {
            Some(via) => {
                routes.insert(OutsideRoute {
                    prefix: *block,
                    via,
                    kind: RouteKind::Block,
                    pool: pool.map(|p| p.metadata.name.clone()),
                    node: owner.clone(),
                });
            }
            None => no_gateway(family(block), format!("block {block}"), &mut notes),
        }
    }
    if services {
        for s in &inputs.services {
            match gw.for_family(s.is_ipv4()) {
                Some(via) => {
                    routes.insert(OutsideRoute {
                        prefix: *s,
                        via,
                        kind: RouteKind::Service,
                        pool: None,
                        node: None,
                    });
                }
                None => no_gateway(family(s), format!("service CIDR {s}"), &mut notes),
            }
        }
    }
    // One route per prefix (a service range equal to a pool, say): the first kind wins.
    let mut seen = BTreeSet::new();
    let routes = routes
        .into_iter()
        .filter(|r| seen.insert(r.prefix))
        .collect();
    Plan {
        routes,
        notes: notes.into_iter().collect(),
    }
}

fn family(n: &IpNetwork) -> &'static str {
    if n.is_ipv4() {
        "IPv4"
    } else {
        "IPv6"
    }
}

/// Render a plan in `format`.
pub fn render(
    plan: &Plan,
    gw: &Gateway,
    format: RoutesFormat,
    protocol: u8,
    metric: u32,
) -> String {
    let line = |r: &OutsideRoute| {
        format!(
            "route replace {} via {} proto {protocol} metric {metric}",
            r.prefix, r.via
        )
    };
    match format {
        RoutesFormat::Commands => plan
            .routes
            .iter()
            .map(|r| format!("ip {}\n", line(r)))
            .collect(),
        RoutesFormat::Batch => plan.routes.iter().map(|r| line(r) + "\n").collect(),
        RoutesFormat::Table => {
            let mut t = Table::new(&["DESTINATION", "GATEWAY", "PROTO", "METRIC", "REACHES"]);
            for r in &plan.routes {
                let reaches = match r.kind {
                    RouteKind::Pool => format!("pool {}", r.pool.as_deref().unwrap_or("-")),
                    RouteKind::Block => format!(
                        "block of {} (pool {})",
                        r.node.as_deref().unwrap_or("no node"),
                        r.pool.as_deref().unwrap_or("none")
                    ),
                    RouteKind::Service => "service CIDR".to_string(),
                };
                t.row(vec![
                    r.prefix.to_string(),
                    r.via.to_string(),
                    protocol.to_string(),
                    metric.to_string(),
                    reaches,
                ]);
            }
            t.render()
        }
        RoutesFormat::Json => {
            let v = serde_json::json!({
                "gateway": gw,
                "protocol": protocol,
                "metric": metric,
                "routes": plan.routes,
                "notes": plan.notes,
            });
            serde_json::to_string_pretty(&v).unwrap_or_default() + "\n"
        }
    }
}

/// Whether a stored block needs a route, and the node it is affine to (`host:NAME`). An empty block held by
/// no node (left cooling after its node was removed) has nothing behind it: no route. A value that does not
/// parse is routed (the gateway decides), without an owner.
fn block_entry(value: &[u8]) -> Option<Option<String>> {
    match serde_json::from_slice::<Block>(value) {
        Ok(b) if b.host().is_none() && b.is_empty() => None,
        Ok(b) => Some(b.host().map(str::to_string)),
        Err(_) => Some(None),
    }
}

/// Read everything the plan needs at one revision; returns the revision.
pub async fn read_inputs(ds: &Datastore) -> Result<(Inputs, i64), CliError> {
    let snap = crate::feed::list_snapshot(ds).await?;
    let mut inputs = inputs_from(&snap)?;
    for kv in ds.list_at(keys::BLOCKS_PREFIX, snap.revision).await? {
        if let (Some(cidr), Some(owner)) = (keys::parse_block_key(&kv.key), block_entry(&kv.value))
        {
            inputs.blocks.insert(cidr, owner);
        }
    }
    Ok((inputs, snap.revision))
}

fn inputs_from(snap: &crate::feed::Snapshot) -> Result<Inputs, CliError> {
    let pools = snap
        .pools()
        .map_err(|e| CliError::Usage(format!("reading the IP pools: {e}")))?;
    let set = ConfigSet {
        bgp_configurations: snap
            .bgp_configurations
            .iter()
            .map(|(k, v)| (k.clone(), (**v).clone()))
            .collect(),
        ..Default::default()
    };
    // No node name: a gateway labelled exclude-from-external-load-balancers stops advertising services
    // over BGP, but its kube-proxy still answers for them, so the outside host's static route stays.
    let services = crate::node::services::service_prefixes(&set, "");
    let nodes = snap
        .nodes
        .iter()
        .map(|(name, n)| (name.clone(), (n.ipv4(), n.ipv6())))
        .collect();
    Ok(Inputs {
        pools,
        blocks: BTreeMap::new(),
        services,
        nodes,
    })
}

fn check_protocol(args: &RoutesArgs) -> Result<(), CliError> {
    match args.protocol {
        0..=4 => Err(CliError::Usage(format!(
            "--protocol {}: 0-4 are the kernel's own (unspec, redirect, kernel, boot, static); pick an unused number (default {OUTSIDE_PROTOCOL})",
            args.protocol
        ))),
        p if p == crate::dataplane::fib::DEFAULT_PROTOCOL
            || p == crate::dataplane::pod::POD_ROUTE_PROTOCOL =>
        {
            Err(CliError::Usage(format!(
                "--protocol {p} is one of margay node's own (77 its FIB, 78 its pod routes): on a node the two would remove each other's routes; pick another (default {OUTSIDE_PROTOCOL})"
            )))
        }
        _ => Ok(()),
    }
}

/// `margay routes` without `--watch`: the routes as text (notes go to stderr).
pub async fn print(ds: &Datastore, args: &RoutesArgs) -> Result<(String, Vec<String>), CliError> {
    check_protocol(args)?;
    let (inputs, _) = read_inputs(ds).await?;
    let gw = resolve_gateway(&inputs, &args.via)?;
    let plan = plan(&inputs, &gw, args.aggregate, !args.no_services);
    if plan.routes.is_empty() {
        return Err(CliError::NotFound(format!(
            "no routes to print: {} IPAM blocks (no pod has an address yet?){}{}; --aggregate routes whole pools, --watch follows claims as they come",
            inputs.blocks.len(),
            if args.no_services { "" } else { " and no service CIDRs in BGPConfiguration default" },
            if plan.notes.is_empty() { String::new() } else { format!(" ({})", plan.notes.join("; ")) }
        )));
    }
    Ok((
        render(&plan, &gw, args.format, args.protocol, args.metric),
        plan.notes,
    ))
}

fn kernel_routes(plan: &Plan) -> Vec<Route> {
    plan.routes
        .iter()
        .map(|r| Route::via(r.prefix, vec![NextHop::via(r.via)]))
        .collect()
}

/// `--netns NAME|PATH` -> the namespace file.
fn netns_path(netns: &Option<String>) -> Option<PathBuf> {
    netns.as_ref().map(|n| {
        if n.contains('/') {
            PathBuf::from(n)
        } else {
            PathBuf::from("/var/run/netns").join(n)
        }
    })
}

/// `margay routes --watch`: install the plan in the target namespace, then follow the datastore until
/// SIGINT/SIGTERM. Prints one line per route added or removed. The routes stay when it stops (the host keeps
/// reaching the pods while the watcher restarts); a restart adopts them and converges by difference.
pub async fn watch(
    ds: Arc<Datastore>,
    args: &RoutesArgs,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    check_protocol(args)?;
    let netns = netns_path(&args.netns);
    if let Some(p) = &netns {
        crate::dataplane::netns::open_netns(p).map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let fib = Fib::spawn(FibConfig {
        netns: netns.clone(),
        protocol: args.protocol,
        metric: args.metric,
        ..Default::default()
    })
    .await
    .map_err(|e| CliError::Usage(format!("--watch: {e}")))?;
    let target = args
        .netns
        .as_deref()
        .unwrap_or("this namespace")
        .to_string();
    let mut current: BTreeSet<OutsideRoute> = BTreeSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|source| CliError::Io {
            path: "SIGTERM handler".into(),
            source,
        })?;
    loop {
        // (Re)start: a consistent read, then watches from the revision after it.
        let (mut inputs, rev) = read_inputs(&ds).await?;
        let gw = resolve_gateway(&inputs, &args.via)?;
        apply(
            &fib,
            &plan(&inputs, &gw, args.aggregate, !args.no_services),
            &mut current,
            &target,
            out,
        )
        .await?;
        let mut blocks = ds.watch(keys::BLOCKS_PREFIX, rev + 1);
        let mut resources = ds.watch(keys::RESOURCES_PREFIX, rev + 1);
        let relist = loop {
            let msg = tokio::select! {
                m = blocks.recv() => m,
                m = resources.recv() => match m {
                    // A resource changed (pool, node, BGPConfiguration): rare; read them all again.
                    Some(WatchMessage::Events(_)) => {
                        let snap = crate::feed::list_snapshot(&ds).await?;
                        let fresh = inputs_from(&snap)?;
                        inputs = Inputs { blocks: std::mem::take(&mut inputs.blocks), ..fresh };
                        Some(WatchMessage::Events(Vec::new()))
                    }
                    other => other,
                },
                _ = tokio::signal::ctrl_c() => return Ok(()),
                _ = term.recv() => return Ok(()),
            };
            match msg {
                Some(WatchMessage::Events(evs)) => {
                    for ev in evs {
                        let Some(cidr) = keys::parse_block_key(&ev.key) else {
                            continue;
                        };
                        match ev.kind {
                            WatchEventKind::Put => match block_entry(&ev.value) {
                                Some(owner) => {
                                    inputs.blocks.insert(cidr, owner);
                                }
                                None => {
                                    inputs.blocks.remove(&cidr);
                                }
                            },
                            WatchEventKind::Delete => {
                                inputs.blocks.remove(&cidr);
                            }
                        }
                    }
                    // A gateway node that is gone keeps its last address: the routes stay until it is back
                    // or the operator points --via elsewhere.
                    let gw = resolve_gateway(&inputs, &args.via).unwrap_or(gw.clone());
                    let p = plan(&inputs, &gw, args.aggregate, !args.no_services);
                    apply(&fib, &p, &mut current, &target, out).await?;
                }
                Some(WatchMessage::Resync) | None => break true,
            }
        };
        if relist {
            writeln!(
                out,
                "# watch history compacted: reading the datastore again"
            )
            .ok();
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Sync the FIB to `plan` and print what changed (and what the kernel refused).
async fn apply(
    fib: &FibHandle,
    plan: &Plan,
    current: &mut BTreeSet<OutsideRoute>,
    target: &str,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let next: BTreeSet<OutsideRoute> = plan.routes.iter().cloned().collect();
    if next == *current && !current.is_empty() {
        return Ok(());
    }
    let fib_err = |e: crate::dataplane::DataplaneError| CliError::Usage(format!("--watch: {e}"));
    fib.sync(kernel_routes(plan)).await.map_err(fib_err)?;
    let status = fib.settle().await.map_err(fib_err)?;
    for r in current.difference(&next) {
        writeln!(out, "- {} via {} ({target})", r.prefix, r.via).ok();
    }
    for r in next.difference(current) {
        writeln!(out, "+ {} via {} ({target})", r.prefix, r.via).ok();
    }
    for (p, why) in status.conflicts.iter().chain(&status.failed) {
        writeln!(out, "! {p}: {why} (retried)").ok();
    }
    for n in &plan.notes {
        writeln!(out, "# {n}").ok();
    }
    out.flush().ok();
    *current = next;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn inputs() -> Inputs {
        let mut pool = IpPool::new("default-ipv4-ippool", net("10.244.0.0/16"));
        pool.spec.disabled = false;
        let mut quiet = IpPool::new("quiet", net("10.250.0.0/16"));
        quiet.spec.disable_bgp_export = true;
        let mut blocks = BTreeMap::new();
        blocks.insert(net("10.244.0.0/26"), Some("n1".to_string()));
        blocks.insert(net("10.244.0.64/26"), Some("n2".to_string()));
        blocks.insert(net("10.250.0.0/26"), Some("n1".to_string()));
        blocks.insert(net("10.9.0.0/26"), None);
        blocks.insert(net("fd00::/122"), Some("n1".to_string()));
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "n1".to_string(),
            (Some("10.99.0.11".parse().unwrap()), None),
        );
        nodes.insert("n2".to_string(), (None, None));
        Inputs {
            pools: vec![pool, quiet],
            blocks,
            services: [net("10.96.0.0/12")].into(),
            nodes,
        }
    }

    fn prefixes(p: &Plan) -> Vec<String> {
        p.routes.iter().map(|r| r.prefix.to_string()).collect()
    }

    #[test]
    fn per_block_by_default_with_services() {
        let i = inputs();
        let gw = resolve_gateway(&i, "n1").unwrap();
        let p = plan(&i, &gw, false, true);
        assert_eq!(
            prefixes(&p),
            [
                "10.9.0.0/26",
                "10.96.0.0/12",
                "10.244.0.0/26",
                "10.244.0.64/26",
                "10.250.0.0/26"
            ]
        );
        assert!(p.routes.iter().all(|r| r.via.to_string() == "10.99.0.11"));
        assert!(
            p.notes.iter().any(|n| n.contains("block fd00::/122")),
            "{:?}",
            p.notes
        );
        assert!(p.notes.iter().any(|n| n.contains("disableBGPExport")));
        assert_eq!(prefixes(&plan(&i, &gw, false, false)).len(), 4);
    }

    #[test]
    fn aggregate_only_safe_pools() {
        let i = inputs();
        let gw = resolve_gateway(&i, "10.99.0.11").unwrap();
        let p = plan(&i, &gw, true, true);
        // The exported pool is one route; the disableBGPExport pool and the pool-less block stay per block.
        assert_eq!(
            prefixes(&p),
            [
                "10.9.0.0/26",
                "10.96.0.0/12",
                "10.244.0.0/16",
                "10.250.0.0/26"
            ]
        );
        assert_eq!(p.routes[2].kind, RouteKind::Pool);
    }

    #[test]
    fn gateway_errors_name_the_fix() {
        let i = inputs();
        let e = resolve_gateway(&i, "n9").unwrap_err().to_string();
        assert!(e.contains("n9") && e.contains("nodes: n1, n2"), "{e}");
        let e = resolve_gateway(&i, "n2").unwrap_err().to_string();
        assert!(e.contains("no BGP address"), "{e}");
    }

    #[test]
    fn formats() {
        let i = inputs();
        let gw = resolve_gateway(&i, "n1").unwrap();
        let p = plan(&i, &gw, true, false);
        let b = render(&p, &gw, RoutesFormat::Batch, 79, 79);
        assert!(
            b.lines()
                .any(|l| l == "route replace 10.244.0.0/16 via 10.99.0.11 proto 79 metric 79"),
            "{b}"
        );
        let c = render(&p, &gw, RoutesFormat::Commands, 79, 79);
        assert!(c.lines().all(|l| l.starts_with("ip route replace ")), "{c}");
        let j: serde_json::Value =
            serde_json::from_str(&render(&p, &gw, RoutesFormat::Json, 79, 79)).unwrap();
        assert_eq!(j["gateway"]["node"], "n1");
        assert_eq!(j["routes"][1]["kind"], "pool");
        let t = render(&p, &gw, RoutesFormat::Table, 79, 79);
        assert!(
            t.contains("DESTINATION") && t.contains("pool default-ipv4-ippool"),
            "{t}"
        );
    }
}
