//! The node parts that make margay fit a real cluster rather than one flat L2: outgoing NAT kept in step
//! with the IP pools, the node's own labels fed to IPAM (pools' `nodeSelector`), and the dataplane summary
//! `margay status` shows (NAT, pod MTU, unresolved next hops, what is not supported).
//!
//! ```text
//!   NodeIpam ──subscribe_pools (watch, no etcd read)──▶ follow_nat ──nft -f (in the node's netns)──▶ table inet margay
//!   etcd Node/<me> ──watch──▶ follow_labels ──set_labels──▶ NodeIpam (claims, releases of empty blocks)
//!   NodeIpam pools + node interfaces (every 30 s) ──▶ follow_mtu ──▶ PodMtu (read by every CNI ADD)
//!   every task here ──send_modify──▶ DataplaneStatus ──▶ /status
//! ```
//!
//! Each follower owns nothing but its last applied state; a failure is logged, shown in the status and
//! retried, never dropped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::DataplaneSummary;
use crate::config::ippool::{EncapMode, IpPool};
use crate::dataplane::mtu::{self, Encaps, PodMtu};
use crate::dataplane::nat::{self, NatOptions, NatPool};
use crate::datastore::{keys, Datastore, WatchEventKind, WatchMessage};
use crate::ipam::NodeIpam;

use crate::config::bgp::NODE_PLURAL;

/// The dataplane part of the status report, written by the followers here and read by `/status`.
pub type DataplaneStatus = Arc<watch::Sender<DataplaneSummary>>;

/// A fresh, empty [`DataplaneStatus`].
pub fn dataplane_status() -> DataplaneStatus {
    Arc::new(watch::channel(DataplaneSummary::default()).0)
}

/// Report the Calico settings margay does not act on (see [`crate::config::unsupported`]): each new one
/// is logged once (an error with its fix, or a warning), and all are listed in the status.
pub fn report_unsupported(
    set: &crate::config::bgp::ConfigSet,
    pools: &[IpPool],
    me: &str,
    kernel_has_ipip: bool,
    node_has_ipv6: bool,
    status: &DataplaneStatus,
) {
    use crate::config::unsupported::{scan, Severity};
    let found = scan(set, pools, me, kernel_has_ipip, node_has_ipv6);
    let errors: Vec<String> = found
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(ToString::to_string)
        .collect();
    let ignored: Vec<String> = found
        .iter()
        .filter(|f| f.severity == Severity::NotSupported)
        .map(ToString::to_string)
        .collect();
    status.send_if_modified(|s| {
        if s.errors == errors && s.not_supported == ignored {
            return false;
        }
        for e in errors.iter().filter(|e| !s.errors.contains(e)) {
            tracing::error!("{e}");
        }
        for n in ignored.iter().filter(|n| !s.not_supported.contains(n)) {
            tracing::warn!("not supported: {n}");
        }
        s.errors = errors;
        s.not_supported = ignored;
        true
    });
}

/// How long a failed NAT program waits before it is tried again.
const NAT_RETRY: Duration = Duration::from_secs(2);
/// How often the kernel is checked for margay's table (a kernel read, no datastore access).
const NAT_RECHECK: Duration = Duration::from_secs(5);

/// The pools as outgoing NAT sees them: every pool (disabled ones included, as Calico's `all-ipam-pools`
/// set: a disabled pool is the documented way to reach a CIDR without NAT) with its `natOutgoing` flag.
pub fn nat_pools(pools: &[IpPool]) -> Vec<NatPool> {
    let mut v: Vec<NatPool> = pools
        .iter()
        .map(|p| NatPool {
            cidr: p.spec.cidr,
            nat_outgoing: p.spec.nat_outgoing,
        })
        .collect();
    v.sort_by_key(|p| (p.cidr, p.nat_outgoing));
    v
}

/// Keep margay's nftables table equal to what the pools ask for: re-programmed (atomically, the whole table)
/// whenever a pool is added, deleted or its `natOutgoing` flips, and retried after a failure. Runs until
/// the pool feed closes.
pub async fn follow_nat(
    mut pools: watch::Receiver<Vec<IpPool>>,
    netns: Option<PathBuf>,
    opts: NatOptions,
    status: DataplaneStatus,
) {
    let mut applied: Option<Vec<NatPool>> = None;
    loop {
        let want = nat_pools(&pools.borrow_and_update());
        let mut failed = false;
        if applied.as_ref() != Some(&want) {
            let (ns, w, o) = (netns.clone(), want.clone(), opts.clone());
            let res =
                tokio::task::spawn_blocking(move || nat::apply_with(ns.as_deref(), &w, &o)).await;
            let res = match res {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(format!("NAT task: {e}")),
            };
            match res {
                Ok(()) => {
                    let on: Vec<String> = want
                        .iter()
                        .filter(|p| p.nat_outgoing)
                        .map(|p| p.cidr.to_string())
                        .collect();
                    tracing::info!(nat_pools = %if on.is_empty() { "none".to_string() } else { on.join(", ") },
                        "outgoing NAT programmed (table inet {})", nat::TABLE);
                    status.send_modify(|s| {
                        s.nat_pools = on;
                        s.nat_outgoing_address = opts.outgoing_address_v4.map(|a| a.to_string());
                        s.nat_error = None;
                    });
                    applied = Some(want);
                }
                Err(e) => {
                    // Logged when the failure is new or different; retried quietly meanwhile.
                    status.send_modify(|s| {
                        if s.nat_error.as_ref() != Some(&e) {
                            tracing::error!(error = %e, "outgoing NAT not programmed; retrying every {}s", NAT_RETRY.as_secs());
                        }
                        s.nat_error = Some(e);
                    });
                    failed = true;
                }
            }
        }
        let wait = if failed { NAT_RETRY } else { NAT_RECHECK };
        tokio::select! {
            r = pools.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(wait) => {
                // Someone else removed margay's table (`nft flush ruleset`, a firewall reload): put it back.
                if !failed {
                    let ns = netns.clone();
                    let present = tokio::task::spawn_blocking(move || nat::show(ns.as_deref()))
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .map(|t| t.is_some());
                    if present == Some(false) {
                        tracing::warn!("nftables table inet {} was removed by someone else; restoring it", nat::TABLE);
                        applied = None;
                    }
                }
            }
        }
    }
}

/// How often the node's interfaces are looked at again for the pod MTU (Felix: 30 s).
pub const MTU_RECHECK: Duration = Duration::from_secs(30);

/// The encapsulations the pools enable (Calico: any pool whose mode is not Never).
pub fn encaps_of(pools: &[IpPool]) -> Encaps {
    let on = |m: Option<EncapMode>| m.is_some_and(|m| m != EncapMode::Never);
    let mut e = Encaps::default();
    for p in pools {
        let v4 = p.spec.cidr.is_ipv4();
        e.ipip |= v4 && on(p.spec.ipip_mode);
        e.vxlan_v4 |= v4 && on(p.spec.vxlan_mode);
        e.vxlan_v6 |= !v4 && on(p.spec.vxlan_mode);
    }
    e
}

/// The pod MTU now: the node's interfaces matching `pattern`, minus the pools' encapsulation overhead.
pub async fn detect_pod_mtu(
    netns: Option<PathBuf>,
    pattern: regex::Regex,
    pools: &[IpPool],
) -> Result<(u32, String), crate::dataplane::DataplaneError> {
    let host = tokio::task::spawn_blocking(move || mtu::host_mtu(netns.as_deref(), &pattern))
        .await
        .map_err(|e| crate::dataplane::DataplaneError::Invalid {
            what: "MTU detection",
            value: String::new(),
            reason: e.to_string(),
        })??;
    if host.iface.is_none() {
        tracing::warn!(
            fallback = host.mtu,
            "no up interface matches the MTU interface pattern; using the fallback host MTU"
        );
    }
    Ok(mtu::pod_mtu(&host, encaps_of(pools)))
}

/// Keep the detected pod MTU current: on every pool change (an encapsulation switched on or off) and every
/// [`MTU_RECHECK`] (an interface's MTU changed). New pods get the new value; running pods keep theirs, as
/// with Calico.
pub async fn follow_mtu(
    mut pools: watch::Receiver<Vec<IpPool>>,
    netns: Option<PathBuf>,
    pattern: regex::Regex,
    pod_mtu: PodMtu,
    status: DataplaneStatus,
) {
    loop {
        tokio::select! {
            r = pools.changed() => if r.is_err() { return },
            _ = tokio::time::sleep(MTU_RECHECK) => {}
        }
        let current = pools.borrow_and_update().clone();
        match detect_pod_mtu(netns.clone(), pattern.clone(), &current).await {
            Ok((m, why)) => {
                if m != pod_mtu.get() {
                    tracing::info!(from = pod_mtu.get(), to = m, source = %why, "pod MTU changed (new pods get it)");
                    pod_mtu.set(m);
                }
                status.send_if_modified(|s| {
                    let changed =
                        s.pod_mtu != Some(m) || s.pod_mtu_source.as_deref() != Some(why.as_str());
                    s.pod_mtu = Some(m);
                    s.pod_mtu_source = Some(why);
                    changed
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "pod MTU not re-detected; keeping {}", pod_mtu.get())
            }
        }
    }
}

/// `metadata.labels` of a stored Node (read leniently: only the labels matter here).
fn labels_of(value: &[u8]) -> Option<BTreeMap<String, String>> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let labels = v.get("metadata")?.get("labels");
    Some(match labels {
        Some(serde_json::Value::Object(m)) => m
            .iter()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect(),
        _ => BTreeMap::new(),
    })
}

/// This node's labels from its Node resource and the revision they were read at (empty when it has none).
pub async fn node_labels(
    ds: &Datastore,
    name: &str,
) -> anyhow::Result<(BTreeMap<String, String>, i64)> {
    let key = keys::resource_key(NODE_PLURAL, name);
    let (kvs, rev) = ds.list(&key).await?;
    let labels = kvs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| labels_of(&kv.value))
        .unwrap_or_default();
    Ok((labels, rev))
}

/// Follow this node's Node resource and hand its labels to IPAM whenever they change (pools'
/// `nodeSelector` is evaluated with them). `from` is the revision the starting labels were read at.
pub async fn follow_labels(ds: Arc<Datastore>, name: String, ipam: Arc<NodeIpam>, from: i64) {
    let key = keys::resource_key(NODE_PLURAL, &name);
    let mut rev = from;
    loop {
        let mut w = ds.watch(&key, rev + 1);
        // Until the watch is compacted or breaks (Resync or None).
        while let Some(WatchMessage::Events(evs)) = w.recv().await {
            // The watch is on a prefix: `nodes/n1` also sees `nodes/n10`.
            let Some(ev) = evs.iter().rev().find(|e| e.key == key) else {
                continue;
            };
            let labels = match ev.kind {
                WatchEventKind::Put => labels_of(&ev.value),
                WatchEventKind::Delete => Some(BTreeMap::new()),
            };
            match labels {
                Some(l) => {
                    if let Err(e) = ipam.set_labels(l).await {
                        tracing::warn!(error = %e, "node labels not handed to IPAM");
                        return;
                    }
                }
                None => {
                    tracing::warn!(key = %key, "Node resource does not parse; labels unchanged")
                }
            }
        }
        // Compacted or broken: read again, then watch from there.
        loop {
            match node_labels(&ds, &name).await {
                Ok((labels, r)) => {
                    rev = r;
                    if ipam.set_labels(labels).await.is_err() {
                        return;
                    }
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "re-reading the node's labels; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_read_from_metadata() {
        let l = labels_of(br#"{"metadata":{"name":"n1","labels":{"rack":"a","n":"1"}},"spec":{}}"#)
            .expect("parses");
        assert_eq!(l.get("rack").map(String::as_str), Some("a"));
        assert_eq!(l.len(), 2);
        assert_eq!(
            labels_of(br#"{"metadata":{"name":"n1"}}"#),
            Some(BTreeMap::new())
        );
        assert_eq!(labels_of(b"not json"), None);
    }

    #[test]
    fn disabled_pools_stay_in_the_all_pools_set() {
        let mut a = IpPool::new("a", "10.1.0.0/16".parse().unwrap());
        a.spec.nat_outgoing = true;
        let mut b = IpPool::new("b", "10.2.0.0/16".parse().unwrap());
        b.spec.disabled = true;
        let n = nat_pools(&[b, a]);
        assert_eq!(n.len(), 2);
        assert!(n[0].nat_outgoing && !n[1].nat_outgoing);
    }
}
