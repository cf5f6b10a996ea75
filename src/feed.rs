//! The configuration feed: one etcd watch on the `projectcalico.org/v3` resources that BGP and the export
//! policy need (BGPConfiguration, BGPPeer, Node, IPPool), kept as an in-memory [`Snapshot`] and published to
//! every subscriber through a `tokio::sync::watch` channel. `margay node` and `margay reflector` both derive
//! their peers from it.
//!
//! ```text
//!   etcd ──list ×4 at one revision (start, compaction, lost watch, slow resync)──▶ ┐
//!   etcd ──one prefix watch (events from revision+1, progress notifications)────▶ feed task ──Arc<Snapshot>──▶ subscribers
//! ```
//!
//! Cost model (the reason this exists): with a re-list every few seconds each of N nodes reads N Node
//! resources, O(N²) reads cluster-wide. Here a quiet cluster reads nothing (the watch stream is pushed by
//! etcd, no request is sent), a node joining costs every other node one watch event, and a full re-list
//! happens only at start, after the watch's history was compacted away, when the watch ends for good, and
//! on a slow safety resync (minutes).
//!
//! Resources are parsed from their stored JSON straight into the typed `config` structs and validated one by
//! one; a resource that does not parse or validate is kept in the snapshot as a [`FeedError`] naming its key,
//! kind, field and value, and [`Snapshot::config_set`] refuses the set while it is there (the running peers
//! stay as they were, as with a file). This module never writes to etcd and never touches BGP.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::sync::watch;

use crate::config::bgp::{
    BgpConfiguration, BgpPeer, ConfigSet, LoadError, Node, Secret, BGP_CONFIGURATION_PLURAL,
    BGP_PEER_PLURAL, KIND_BGP_CONFIGURATION, KIND_BGP_PEER, KIND_NODE, NODE_PLURAL,
};
use crate::config::ippool::{self, IpPool};
use crate::config::{ConfigError, API_VERSION};
use crate::datastore::{
    keys, Datastore, DatastoreError, WatchEvent, WatchEventKind, WatchHealth, WatchMessage, Watcher,
};

/// The resource kinds the feed follows: (plural in the key, kind).
const WATCHED: [(&str, &str); 4] = [
    (BGP_CONFIGURATION_PLURAL, KIND_BGP_CONFIGURATION),
    (BGP_PEER_PLURAL, KIND_BGP_PEER),
    (NODE_PLURAL, KIND_NODE),
    (ippool::PLURAL, ippool::KIND),
];

/// Why the feed, or a set derived from it, cannot be used.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FeedError {
    /// etcd could not be read (start-up list; later lists are retried by the feed itself).
    #[error("{0}")]
    Datastore(Arc<DatastoreError>),
    /// A stored value is not JSON of the resource's shape.
    #[error("stored {kind} at {key}: {error}")]
    Invalid {
        kind: &'static str,
        key: String,
        error: Box<ConfigError>,
    },
    /// The resources reference something that is not there (a password Secret).
    #[error("{0}")]
    Reference(Box<ConfigError>),
}

impl From<DatastoreError> for FeedError {
    fn from(e: DatastoreError) -> FeedError {
        FeedError::Datastore(Arc::new(e))
    }
}

/// One parsed resource.
#[derive(Debug, Clone, PartialEq)]
enum Resource {
    BgpConfiguration(Arc<BgpConfiguration>),
    BgpPeer(Arc<BgpPeer>),
    Node(Arc<Node>),
    IpPool(Arc<IpPool>),
}

/// The watched resources at one etcd revision. Cheap to clone behind its `Arc`; every resource is shared.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// The etcd revision this snapshot reflects (every change up to it is in).
    pub revision: i64,
    pub bgp_configurations: BTreeMap<String, Arc<BgpConfiguration>>,
    pub bgp_peers: BTreeMap<String, Arc<BgpPeer>>,
    pub nodes: BTreeMap<String, Arc<Node>>,
    pub ip_pools: BTreeMap<String, Arc<IpPool>>,
    /// Resources that do not parse or validate, by key.
    pub invalid: BTreeMap<String, FeedError>,
}

impl PartialEq for FeedError {
    fn eq(&self, other: &FeedError) -> bool {
        self.to_string() == other.to_string()
    }
}

impl Snapshot {
    /// Build from a full list (every watched key with its value).
    fn from_list<'a>(
        revision: i64,
        kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Snapshot {
        let mut s = Snapshot {
            revision,
            ..Default::default()
        };
        for (key, value) in kvs {
            s.put(key, value);
        }
        s
    }

    /// Apply one watch event. Returns false when the key is not one the feed follows.
    fn apply(&mut self, ev: &WatchEvent) -> bool {
        self.revision = self.revision.max(ev.mod_revision);
        match ev.kind {
            WatchEventKind::Put => self.put(&ev.key, &ev.value),
            WatchEventKind::Delete => self.delete(&ev.key),
        }
    }

    fn put(&mut self, key: &str, value: &[u8]) -> bool {
        let Some((kind, name)) = watched_key(key) else {
            return false;
        };
        self.remove_name(kind, name);
        self.invalid.remove(key);
        match parse(kind, key, value) {
            Ok(Resource::BgpConfiguration(r)) => {
                self.bgp_configurations.insert(name.to_string(), r);
            }
            Ok(Resource::BgpPeer(r)) => {
                self.bgp_peers.insert(name.to_string(), r);
            }
            Ok(Resource::Node(r)) => {
                self.nodes.insert(name.to_string(), r);
            }
            Ok(Resource::IpPool(r)) => {
                self.ip_pools.insert(name.to_string(), r);
            }
            Err(e) => {
                self.invalid.insert(key.to_string(), e);
            }
        }
        true
    }

    fn delete(&mut self, key: &str) -> bool {
        let Some((kind, name)) = watched_key(key) else {
            return false;
        };
        self.remove_name(kind, name);
        self.invalid.remove(key);
        true
    }

    fn remove_name(&mut self, kind: &str, name: &str) {
        match kind {
            KIND_BGP_CONFIGURATION => {
                self.bgp_configurations.remove(name);
            }
            KIND_BGP_PEER => {
                self.bgp_peers.remove(name);
            }
            KIND_NODE => {
                self.nodes.remove(name);
            }
            _ => {
                self.ip_pools.remove(name);
            }
        }
    }

    /// The BGP resources as a validated [`ConfigSet`], with the given password Secrets (from files; etcd has
    /// none). Refused as a whole while a BGP resource is invalid or a password reference does not resolve.
    pub fn config_set(
        &self,
        secrets: BTreeMap<(String, String), Secret>,
    ) -> Result<ConfigSet, FeedError> {
        if let Some(e) = self
            .invalid
            .iter()
            .find(|(k, _)| !is_pool_key(k))
            .map(|(_, e)| e)
        {
            return Err(e.clone());
        }
        let set = ConfigSet {
            bgp_configurations: unshare(&self.bgp_configurations),
            bgp_peers: unshare(&self.bgp_peers),
            nodes: unshare(&self.nodes),
            secrets,
            other: Vec::new(),
        };
        set.validate_references(&BTreeMap::new())
            .map_err(|e| match e {
                LoadError::Invalid { mut error, .. } => {
                    error.reason =
                        "no Secret with that name and key (margay node reads Secrets mounted under --bgp-secrets-dir)"
                            .into();
                    FeedError::Reference(error)
                }
                other => FeedError::Reference(Box::new(ConfigError::new(
                    "(set)",
                    "",
                    "",
                    "",
                    other.to_string(),
                ))),
            })?;
        Ok(set)
    }

    /// The IP pools (for the export policy), refused while one of them is invalid.
    pub fn pools(&self) -> Result<Vec<IpPool>, FeedError> {
        if let Some(e) = self
            .invalid
            .iter()
            .find(|(k, _)| is_pool_key(k))
            .map(|(_, e)| e)
        {
            return Err(e.clone());
        }
        Ok(self.ip_pools.values().map(|p| (**p).clone()).collect())
    }
}

fn unshare<T: Clone>(m: &BTreeMap<String, Arc<T>>) -> BTreeMap<String, T> {
    m.iter().map(|(k, v)| (k.clone(), (**v).clone())).collect()
}

fn is_pool_key(key: &str) -> bool {
    key.starts_with(&keys::resource_prefix(ippool::PLURAL))
}

/// The kind and name of a key the feed follows.
fn watched_key(key: &str) -> Option<(&'static str, &str)> {
    let rest = key.strip_prefix(keys::RESOURCES_PREFIX)?;
    let (plural, name) = rest.split_once('/')?;
    let kind = WATCHED.iter().find(|(p, _)| *p == plural)?.1;
    // Cluster-scoped kinds only: a deeper path is not one of ours.
    (!name.is_empty() && !name.contains('/')).then_some((kind, name))
}

/// Parse one stored resource of `kind`: JSON into the typed resource, then its own validation. Calico may
/// omit apiVersion and kind in stored values; the key says what it is.
fn parse(kind: &'static str, key: &str, value: &[u8]) -> Result<Resource, FeedError> {
    let invalid = |field: &str, value: &str, reason: String| FeedError::Invalid {
        kind,
        key: key.to_string(),
        error: Box::new(ConfigError::new(
            kind,
            key.rsplit('/').next().unwrap_or(""),
            field,
            value,
            reason,
        )),
    };
    let mut v: serde_json::Value =
        serde_json::from_slice(value).map_err(|e| invalid("", "", format!("not JSON: {e}")))?;
    if let Some(o) = v.as_object_mut() {
        o.entry("apiVersion").or_insert_with(|| API_VERSION.into());
        o.entry("kind").or_insert_with(|| kind.into());
    }
    let checked = |r: Result<(), ConfigError>| {
        r.map_err(|error| FeedError::Invalid {
            kind,
            key: key.to_string(),
            error: Box::new(error),
        })
    };
    Ok(match kind {
        KIND_BGP_CONFIGURATION => {
            let r: BgpConfiguration = typed(kind, key, v)?;
            checked(r.validate())?;
            Resource::BgpConfiguration(Arc::new(r))
        }
        KIND_BGP_PEER => {
            let r: BgpPeer = typed(kind, key, v)?;
            checked(r.validate())?;
            Resource::BgpPeer(Arc::new(r))
        }
        KIND_NODE => {
            let r: Node = typed(kind, key, v)?;
            checked(r.validate())?;
            Resource::Node(Arc::new(r))
        }
        // Pools are validated when written (`margay apply`, the IPAM); the export policy needs only their
        // CIDR and flags, as before.
        _ => Resource::IpPool(Arc::new(typed(kind, key, v)?)),
    })
}

/// Decode as calico-node does: fields margay does not know (a newer Calico wrote them) are ignored, warned
/// once per kind and field and counted; any other error names the field path and its value.
fn typed<T: DeserializeOwned>(
    kind: &'static str,
    key: &str,
    v: serde_json::Value,
) -> Result<T, FeedError> {
    crate::config::tolerant::tolerant(kind, v).map_err(|error| FeedError::Invalid {
        kind,
        key: key.to_string(),
        error: Box::new(error),
    })
}

/// List every watched kind at one revision: a consistent snapshot. Four requests.
pub async fn list_snapshot(ds: &Datastore) -> Result<Snapshot, DatastoreError> {
    let mut iter = WATCHED.iter();
    let (first, _) = iter.next().expect("WATCHED is not empty");
    let (mut kvs, revision) = ds.list(&keys::resource_prefix(first)).await?;
    for (plural, _) in iter {
        kvs.extend(ds.list_at(&keys::resource_prefix(plural), revision).await?);
    }
    Ok(Snapshot::from_list(
        revision,
        kvs.iter().map(|kv| (kv.key.as_str(), kv.value.as_slice())),
    ))
}

/// Tuning of the feed.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// A full re-list this often even when the watch is healthy: a safety net against a bug of ours or
    /// etcd's, not the way changes arrive. Jittered by up to a tenth so that nodes started together spread.
    pub resync: Duration,
    /// Wait between failed re-lists.
    pub retry: Duration,
}

impl Default for FeedOptions {
    fn default() -> FeedOptions {
        FeedOptions {
            resync: Duration::from_secs(10 * 60),
            retry: Duration::from_secs(1),
        }
    }
}

/// What the feed has done, as Prometheus counters (shared with the registry the daemon serves).
#[derive(Debug, Clone, Default)]
pub struct FeedCounters {
    /// Full lists of the watched kinds (the start included).
    pub lists: Counter,
    /// Watch events applied.
    pub events: Counter,
    /// Re-lists because the watch's history was compacted away or the watch ended.
    pub watch_lost: Counter,
    /// Slow resyncs that found something the watch had not delivered (should stay 0).
    pub resync_repairs: Counter,
}

impl FeedCounters {
    /// Register under `margay_config_feed_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "margay_config_feed_lists",
            "Full lists of the BGP resources from etcd (start, lost watch, slow resync)",
            self.lists.clone(),
        );
        registry.register(
            "margay_config_feed_events",
            "etcd watch events applied to the configuration snapshot",
            self.events.clone(),
        );
        registry.register(
            "margay_config_feed_watch_lost",
            "Re-lists after the watch's history was compacted or the watch ended",
            self.watch_lost.clone(),
        );
        registry.register(
            "margay_config_feed_resync_repairs",
            "Slow resyncs that found a change the watch had not delivered",
            self.resync_repairs.clone(),
        );
    }
}

/// Whether a feed follows etcd, shared with a readiness report. Survives the re-lists: the feed hands the
/// same health to every watch it starts.
#[derive(Debug, Clone)]
pub struct FeedHealth(Arc<WatchHealth>);

impl FeedHealth {
    /// None while the snapshots follow etcd; why not otherwise.
    pub fn down(&self) -> Option<String> {
        self.0.down()
    }
}

/// The running feed. Dropping it stops the task and its watch.
pub struct ConfigFeed {
    rx: watch::Receiver<Arc<Snapshot>>,
    counters: FeedCounters,
    health: Arc<WatchHealth>,
    _task: crate::task::AbortOnDrop,
}

impl ConfigFeed {
    /// List once (an error here is the caller's: etcd is unreachable at start) and follow from there.
    pub async fn start(ds: Arc<Datastore>, opts: FeedOptions) -> Result<ConfigFeed, FeedError> {
        let counters = FeedCounters::default();
        let first = list_snapshot(&ds).await?;
        counters.lists.inc();
        let health = Arc::new(WatchHealth::default());
        let watcher =
            ds.watch_reporting(keys::RESOURCES_PREFIX, first.revision + 1, health.clone());
        let (tx, rx) = watch::channel(Arc::new(first));
        let task = tokio::spawn(run(ds, opts, tx, watcher, counters.clone(), health.clone()));
        Ok(ConfigFeed {
            rx,
            counters,
            health,
            _task: crate::task::AbortOnDrop(task),
        })
    }

    /// None while the snapshots follow etcd; why not otherwise (the watch is down, or a re-list fails).
    /// The newest snapshot stays available either way: it may be stale.
    pub fn down(&self) -> Option<String> {
        self.health.down()
    }

    /// A handle that answers [`ConfigFeed::down`] after the feed itself has been handed to its consumer (the
    /// node's peer loop owns the feed; its readiness report keeps this).
    pub fn health(&self) -> FeedHealth {
        FeedHealth(self.health.clone())
    }

    /// A receiver of every new snapshot; the current one is marked seen.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        let mut rx = self.rx.clone();
        rx.borrow_and_update();
        rx
    }

    /// The newest snapshot.
    pub fn current(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    pub fn counters(&self) -> &FeedCounters {
        &self.counters
    }
}

fn jittered(d: Duration) -> Duration {
    let tenth = d.as_millis() as u64 / 10;
    d + Duration::from_millis(if tenth == 0 {
        0
    } else {
        rand::random::<u64>() % tenth
    })
}

async fn run(
    ds: Arc<Datastore>,
    opts: FeedOptions,
    tx: watch::Sender<Arc<Snapshot>>,
    mut watcher: Watcher,
    counters: FeedCounters,
    health: Arc<WatchHealth>,
) {
    let mut snapshot: Snapshot = (**tx.borrow()).clone();
    let mut resync = Box::pin(tokio::time::sleep(jittered(opts.resync)));
    loop {
        let relist = tokio::select! {
            msg = watcher.recv() => match msg {
                Some(WatchMessage::Events(events)) => {
                    // Drain what else is already there: one snapshot for a burst.
                    let mut changed = apply_all(&mut snapshot, &events, &counters);
                    let mut lost = false;
                    while let Some(m) = watcher.try_recv() {
                        match m {
                            WatchMessage::Events(ev) => changed |= apply_all(&mut snapshot, &ev, &counters),
                            WatchMessage::Resync => lost = true,
                        }
                    }
                    if changed {
                        tx.send_replace(Arc::new(snapshot.clone()));
                    }
                    if lost {
                        counters.watch_lost.inc();
                    }
                    lost
                }
                Some(WatchMessage::Resync) | None => {
                    tracing::info!("config feed: watch history compacted or watch ended; listing again");
                    counters.watch_lost.inc();
                    true
                }
            },
            _ = &mut resync => true,
            _ = tx.closed() => return,
        };
        if !relist {
            continue;
        }
        // A full list, then a new watch from just after it: nothing between the two is missed.
        let fresh = loop {
            match list_snapshot(&ds).await {
                Ok(s) => break s,
                Err(e) => {
                    tracing::warn!(error = %e, "config feed: listing the BGP resources failed; retrying");
                    health.set_down(Some(format!("listing the BGP resources: {e}")));
                    tokio::time::sleep(opts.retry).await;
                }
            }
        };
        counters.lists.inc();
        health.set_down(None);
        watcher = ds.watch_reporting(keys::RESOURCES_PREFIX, fresh.revision + 1, health.clone());
        resync = Box::pin(tokio::time::sleep(jittered(opts.resync)));
        let same = fresh.bgp_configurations == snapshot.bgp_configurations
            && fresh.bgp_peers == snapshot.bgp_peers
            && fresh.nodes == snapshot.nodes
            && fresh.ip_pools == snapshot.ip_pools
            && fresh.invalid == snapshot.invalid;
        snapshot = fresh;
        if !same {
            counters.resync_repairs.inc();
            tx.send_replace(Arc::new(snapshot.clone()));
        }
    }
}

fn apply_all(snapshot: &mut Snapshot, events: &[WatchEvent], counters: &FeedCounters) -> bool {
    let mut changed = false;
    for ev in events {
        if snapshot.apply(ev) {
            counters.events.inc();
            changed = true;
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(kind: WatchEventKind, key: &str, value: &str, rev: i64) -> WatchEvent {
        WatchEvent {
            kind,
            key: key.into(),
            value: value.as_bytes().to_vec(),
            mod_revision: rev,
        }
    }

    #[test]
    fn events_put_and_delete_typed_resources_and_ignore_other_kinds() {
        let mut s = Snapshot::default();
        let node = keys::resource_key("nodes", "a");
        assert!(s.apply(&ev(
            WatchEventKind::Put,
            &node,
            r#"{"metadata":{"name":"a"},"spec":{"bgp":{"ipv4Address":"10.0.0.1/24"}}}"#,
            5
        )));
        assert_eq!(s.nodes.len(), 1);
        assert_eq!(s.revision, 5);
        // Kinds the feed does not follow and namespaced paths are ignored.
        assert!(!s.apply(&ev(
            WatchEventKind::Put,
            &keys::resource_key("felixconfigurations", "default"),
            "{}",
            6
        )));
        assert!(!s.apply(&ev(
            WatchEventKind::Put,
            "/calico/resources/v3/projectcalico.org/networkpolicies/ns/p",
            "{}",
            7
        )));
        assert!(s.apply(&ev(WatchEventKind::Delete, &node, "", 8)));
        assert!(s.nodes.is_empty());
    }

    #[test]
    fn an_invalid_resource_names_its_key_and_field_and_refuses_the_set_until_fixed() {
        let mut s = Snapshot::default();
        let key = keys::resource_key("bgppeers", "tor");
        s.apply(&ev(
            WatchEventKind::Put,
            &key,
            r#"{"metadata":{"name":"tor"},"spec":{"peerIP":"10.0.0.300","asNumber":65001}}"#,
            2,
        ));
        let e = s.config_set(BTreeMap::new()).expect_err("invalid peer");
        let msg = e.to_string();
        assert!(
            msg.contains(&key) && msg.contains("spec.peerIP") && msg.contains("10.0.0.300"),
            "{msg}"
        );
        // Pools stay usable: the bad resource is a BGPPeer.
        assert!(s.pools().is_ok());
        s.apply(&ev(
            WatchEventKind::Put,
            &key,
            r#"{"metadata":{"name":"tor"},"spec":{"peerIP":"10.0.0.30","asNumber":65001}}"#,
            3,
        ));
        let set = s.config_set(BTreeMap::new()).expect("fixed");
        assert_eq!(set.bgp_peers.len(), 1);
        assert!(s.invalid.is_empty());
    }

    #[test]
    fn a_wrong_type_names_the_field_path() {
        let mut s = Snapshot::default();
        let key = keys::resource_key("bgpconfigurations", "default");
        s.apply(&ev(
            WatchEventKind::Put,
            &key,
            r#"{"metadata":{"name":"default"},"spec":{"nodeToNodeMeshEnabled":"yes"}}"#,
            2,
        ));
        let msg = s.config_set(BTreeMap::new()).unwrap_err().to_string();
        assert!(
            msg.contains("spec.nodeToNodeMeshEnabled") && msg.contains("yes"),
            "{msg}"
        );
    }
}
