//! Network definitions shared through etcd, so a network created on one Docker host is usable on all.
//!
//! Docker 20.10 keeps a local-scope network in each daemon's own store, under a NetworkID of its own, and
//! does not tell a driver the network's name. So this task, one per node, owns the link between the two:
//!
//! ```text
//!   plugin CreateNetwork(id) ──Created(id)──▶ [ docker-sync ] ──GET /networks/id──▶ local dockerd
//!   plugin DeleteNetwork(id) ──Deleted(id)──▶   owns id→name   ──create / delete──▶ /margay/docker/v1/networks/<name>
//!                       etcd watch (Put/Delete) ──────────▶    ──POST /networks/create, DELETE──▶ local dockerd
//! ```
//!
//! - A network of the `margay` driver created in a local Docker is published under its name (create if
//!   absent: the first definition wins; a host that made its copy from the definition publishes nothing new).
//! - A definition that appears (or is there at start) is created in the local Docker when it has no network
//!   of that name; one of another driver under that name is left alone, with a warning.
//! - `docker network rm` on any host deletes the definition; every other host then removes its copy (Docker
//!   refuses while containers are attached: retried until they are gone).
//!
//! Work that fails (dockerd not up yet, etcd down) is retried every [`RETRY`]; etcd is never re-listed on a
//! timer, only after a watch resync.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::engine::{Engine, NetworkInfo};
use super::DRIVER;
use crate::datastore::{Datastore, WatchEventKind, WatchMessage};

/// Where the definitions live: `/margay/docker/v1/networks/<network name>`, JSON [`NetworkDef`].
pub const NETWORKS_PREFIX: &str = "/margay/docker/v1/networks/";
/// How often failed work is tried again.
pub const RETRY: Duration = Duration::from_secs(2);
/// How long after CreateNetwork the local Docker may take to show the network (it commits after our reply).
const PUBLISH_WINDOW: Duration = Duration::from_secs(60);

/// A shared network definition: what `docker network create` needs on another host.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NetworkDef {
    pub name: String,
    /// `--ipam-opt` (only `pool=NAME` is accepted).
    #[serde(default)]
    pub ipam_options: BTreeMap<String, String>,
    /// `--subnet`s: IPPool CIDRs (the unspecified network Docker records for "the node's pools" is left out).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subnets: Vec<String>,
    #[serde(default)]
    pub enable_ipv6: bool,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// The node that published it (for the operator).
    #[serde(default)]
    pub created_by: String,
}

impl NetworkDef {
    pub fn from_info(info: &NetworkInfo, node: &str) -> NetworkDef {
        NetworkDef {
            name: info.name.clone(),
            ipam_options: info.ipam.options.clone().unwrap_or_default(),
            subnets: info
                .ipam
                .config
                .iter()
                .flatten()
                .map(|c| c.subnet.clone())
                .filter(|s| !s.is_empty() && s != "0.0.0.0/0" && s != "::/0")
                .collect(),
            enable_ipv6: info.enable_ipv6,
            labels: info.labels.clone().unwrap_or_default(),
            created_by: node.to_string(),
        }
    }

    /// The body of `POST /networks/create` that makes this network in a local Docker.
    pub fn create_spec(&self) -> Value {
        json!({
            "Name": self.name,
            "CheckDuplicate": true,
            "Driver": DRIVER,
            "EnableIPv6": self.enable_ipv6,
            "IPAM": {
                "Driver": DRIVER,
                "Options": self.ipam_options,
                "Config": self.subnets.iter().map(|s| json!({"Subnet": s})).collect::<Vec<_>>(),
            },
            "Labels": self.labels,
        })
    }

    pub fn key(name: &str) -> String {
        format!("{NETWORKS_PREFIX}{name}")
    }
}

/// What the plugin tells the sync.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyncEvent {
    Created(String),
    Deleted(String),
}

struct NetworkSync {
    ds: Arc<Datastore>,
    engine: Engine,
    node: String,
    /// Local Docker network id -> name, for the networks of our driver.
    names: HashMap<String, String>,
    /// The definitions in etcd.
    defs: BTreeMap<String, NetworkDef>,
    /// Created locally, not yet published: id -> give up after.
    to_publish: HashMap<String, Instant>,
    /// Names whose local network must be made to match `defs` (created, or removed).
    to_reconcile: BTreeSet<String>,
    /// Definitions to delete from etcd.
    to_unpublish: BTreeSet<String>,
    /// Failures already logged (not repeated on every retry).
    logged: BTreeSet<String>,
}

impl NetworkSync {
    fn warn_once(&mut self, key: String, msg: &str, err: &dyn std::fmt::Display) {
        if self.logged.insert(key.clone()) {
            tracing::warn!(what = %key, error = %err, "docker network sync: {msg}; retrying every {RETRY:?}");
        }
    }

    async fn list_defs(&mut self) -> Result<i64, crate::datastore::DatastoreError> {
        let (kvs, rev) = self.ds.list(NETWORKS_PREFIX).await?;
        let mut defs = BTreeMap::new();
        for kv in kvs {
            match serde_json::from_slice::<NetworkDef>(&kv.value) {
                Ok(d) => {
                    defs.insert(d.name.clone(), d);
                }
                Err(e) => {
                    tracing::warn!(key = %kv.key, error = %e, "unreadable docker network definition; ignored")
                }
            }
        }
        let gone: Vec<String> = self
            .defs
            .keys()
            .filter(|n| !defs.contains_key(*n))
            .cloned()
            .collect();
        self.to_reconcile.extend(gone);
        self.to_reconcile.extend(defs.keys().cloned());
        self.defs = defs;
        Ok(rev)
    }

    fn apply_watch(&mut self, msg: WatchMessage) -> bool {
        match msg {
            WatchMessage::Resync => return false,
            WatchMessage::Events(evs) => {
                for ev in evs {
                    let Some(name) = ev.key.strip_prefix(NETWORKS_PREFIX) else {
                        continue;
                    };
                    let name = name.to_string();
                    match ev.kind {
                        WatchEventKind::Put => {
                            match serde_json::from_slice::<NetworkDef>(&ev.value) {
                                Ok(d) => {
                                    self.defs.insert(name.clone(), d);
                                }
                                Err(e) => {
                                    tracing::warn!(key = %ev.key, error = %e, "unreadable docker network definition; ignored");
                                    continue;
                                }
                            }
                        }
                        WatchEventKind::Delete => {
                            self.defs.remove(&name);
                        }
                    }
                    self.logged.remove(&name);
                    self.to_reconcile.insert(name);
                }
            }
        }
        true
    }

    async fn publish(&mut self) {
        let ids: Vec<(String, Instant)> = self
            .to_publish
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect();
        for (id, until) in ids {
            match self.engine.network(&id).await {
                Ok(Some(info)) => {
                    self.names.insert(id.clone(), info.name.clone());
                    let def = NetworkDef::from_info(&info, &self.node);
                    let key = NetworkDef::key(&def.name);
                    match self
                        .ds
                        .create(&key, serde_json::to_vec(&def).unwrap_or_default())
                        .await
                    {
                        Ok(created) => {
                            tracing::info!(network = %def.name, id = %id, published = created.is_some(), key,
                                "docker network definition {}", if created.is_some() { "published" } else { "already shared" });
                            self.to_publish.remove(&id);
                        }
                        Err(e) => self.warn_once(
                            format!("publish {}", def.name),
                            "cannot write the definition to etcd",
                            &e,
                        ),
                    }
                }
                Ok(None) if Instant::now() < until => {}
                Ok(None) => {
                    tracing::warn!(id = %id, "docker network never appeared in the local Docker; not shared");
                    self.to_publish.remove(&id);
                }
                Err(e) => self.warn_once(
                    format!("inspect {id}"),
                    "cannot read the new network from Docker",
                    &e,
                ),
            }
        }
    }

    async fn unpublish(&mut self) {
        let names: Vec<String> = self.to_unpublish.iter().cloned().collect();
        for name in names {
            let key = NetworkDef::key(&name);
            let r = match self.ds.get(&key).await {
                Ok(Some(kv)) => self.ds.delete(&key, kv.mod_revision).await.map(|_| ()),
                Ok(None) => Ok(()),
                Err(e) => Err(e),
            };
            match r {
                Ok(()) => {
                    tracing::info!(network = %name, key, "docker network definition deleted");
                    self.to_unpublish.remove(&name);
                }
                Err(e) => self.warn_once(
                    format!("unpublish {name}"),
                    "cannot delete the definition from etcd",
                    &e,
                ),
            }
        }
    }

    async fn reconcile(&mut self) {
        let names: Vec<String> = self.to_reconcile.iter().cloned().collect();
        for name in names {
            let local = match self.engine.network(&name).await {
                Ok(l) => l,
                Err(e) => {
                    self.warn_once(
                        format!("reconcile {name}"),
                        "cannot reach the local Docker",
                        &e,
                    );
                    continue;
                }
            };
            let done = match (self.defs.get(&name).cloned(), local) {
                (Some(def), None) => match self.engine.create_network(&def.create_spec()).await {
                    Ok(_) => {
                        tracing::info!(network = %name, from = %def.created_by, "docker network created from its shared definition");
                        true
                    }
                    Err(e) => {
                        self.warn_once(
                            format!("create {name}"),
                            "cannot create the shared network in the local Docker",
                            &e,
                        );
                        false
                    }
                },
                (Some(_), Some(l)) if l.driver != DRIVER => {
                    tracing::warn!(network = %name, driver = %l.driver,
                        "a network of another driver has the name of a shared margay network; not created on this host");
                    true
                }
                (Some(_), Some(l)) => {
                    self.names.insert(l.id, name.clone());
                    true
                }
                (None, Some(l)) if l.driver == DRIVER => {
                    match self.engine.remove_network(&name).await {
                        Ok(_) => {
                            tracing::info!(network = %name, "docker network removed: its shared definition was deleted");
                            true
                        }
                        Err(e) => {
                            self.warn_once(format!("remove {name}"), "cannot remove the network whose definition was deleted (containers attached?)", &e);
                            false
                        }
                    }
                }
                (None, _) => true,
            };
            if done {
                self.to_reconcile.remove(&name);
                self.logged.remove(&format!("reconcile {name}"));
            }
        }
    }

    fn on_event(&mut self, ev: SyncEvent) {
        match ev {
            SyncEvent::Created(id) => {
                self.to_publish.insert(id, Instant::now() + PUBLISH_WINDOW);
            }
            SyncEvent::Deleted(id) => {
                self.to_publish.remove(&id);
                match self.names.remove(&id) {
                    Some(name) => {
                        // Deleting it here deletes it everywhere: never re-create it from the definition.
                        self.defs.remove(&name);
                        self.to_reconcile.remove(&name);
                        self.to_unpublish.insert(name);
                    }
                    None => {
                        tracing::warn!(id = %id, "deleted docker network was never shared; nothing to delete in etcd")
                    }
                }
            }
        }
    }

    fn busy(&self) -> bool {
        !self.to_publish.is_empty()
            || !self.to_reconcile.is_empty()
            || !self.to_unpublish.is_empty()
    }
}

/// Run the sync until `events` closes (the plugin stopped).
pub async fn run(
    ds: Arc<Datastore>,
    engine: Engine,
    node: String,
    mut events: mpsc::UnboundedReceiver<SyncEvent>,
) {
    let mut s = NetworkSync {
        ds,
        engine,
        node,
        names: HashMap::new(),
        defs: BTreeMap::new(),
        to_publish: HashMap::new(),
        to_reconcile: BTreeSet::new(),
        to_unpublish: BTreeSet::new(),
        logged: BTreeSet::new(),
    };
    'relist: loop {
        let rev = loop {
            match s.list_defs().await {
                Ok(rev) => break rev,
                Err(e) => {
                    s.warn_once("list".into(), "cannot list the shared docker networks", &e);
                    tokio::select! {
                        ev = events.recv() => match ev { Some(ev) => s.on_event(ev), None => return },
                        () = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        };
        s.logged.remove("list");
        let mut watch = s.ds.watch(NETWORKS_PREFIX, rev + 1);
        loop {
            s.unpublish().await;
            s.publish().await;
            s.reconcile().await;
            // Publishing races Docker's commit of the network (after our reply): poll briskly meanwhile.
            let retry = if !s.to_publish.is_empty() {
                Duration::from_millis(250)
            } else if s.busy() {
                RETRY
            } else {
                Duration::from_secs(3600)
            };
            tokio::select! {
                ev = events.recv() => match ev {
                    Some(ev) => s.on_event(ev),
                    None => return,
                },
                msg = watch.recv() => {
                    let live = match msg {
                        Some(m) => s.apply_watch(m),
                        None => false,
                    };
                    if !live {
                        continue 'relist;
                    }
                }
                () = tokio::time::sleep(retry) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definition_round_trip_and_create_spec() {
        let info: NetworkInfo = serde_json::from_str(
            r#"{"Name":"net1","Id":"abc","Driver":"margay","EnableIPv6":false,
                "IPAM":{"Driver":"margay","Options":{"pool":"p1"},
                        "Config":[{"Subnet":"10.65.0.0/16","Gateway":"0.0.0.0/0"},{"Subnet":"0.0.0.0/0"}]},
                "Options":{},"Labels":null}"#,
        )
        .unwrap();
        let d = NetworkDef::from_info(&info, "n1");
        assert_eq!(d.ipam_options["pool"], "p1");
        let text = serde_json::to_string(&d).unwrap();
        assert!(text.contains(r#""ipamOptions":{"pool":"p1"}"#), "{text}");
        assert_eq!(serde_json::from_str::<NetworkDef>(&text).unwrap(), d);
        let spec = d.create_spec();
        assert_eq!(spec["Driver"], "margay");
        assert_eq!(spec["IPAM"]["Driver"], "margay");
        assert_eq!(spec["IPAM"]["Options"]["pool"], "p1");
        assert_eq!(spec["IPAM"]["Config"], json!([{"Subnet": "10.65.0.0/16"}]));
        assert_eq!(NetworkDef::key("net1"), "/margay/docker/v1/networks/net1");
    }
}
