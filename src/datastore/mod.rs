//! The only code that talks to etcd: Calico's etcdv3 key layout ([`keys`]), typed get / list-by-prefix /
//! create (txn guarded by `version == 0`) / update and delete (txn guarded by `mod_revision`) / multi-key
//! transactions / watch resuming from a revision.
//!
//! Failover is ours, not etcd-client's: its balanced channel keeps sending a share of calls to a dead member, so
//! we hold one client per endpoint, send each call to the endpoint that last answered, and on `Unavailable`,
//! a timeout or a transport error move to the next endpoint, dropping the failed client so it reconnects from
//! scratch. After every endpoint failed once we back off and go round again until the retry budget is spent;
//! the error then names every endpoint tried and what each answered.
//!
//! Retrying a write is safe because every write here is a compare-and-swap transaction: if a transaction was
//! applied but its answer was lost, the retry's compare fails and the caller re-reads and sees its own write.
//!
//! This module never interprets values: callers hand it bytes and get bytes back. It counts every round trip
//! ([`Datastore::stats`]) so the benchmark and tests can report etcd requests per IPAM operation.

mod args;
pub mod keys;
pub mod resources;
mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, PutOptions,
    TlsOptions, Txn, TxnOp, TxnOpResponse,
};

pub use args::EtcdArgs;
pub use watch::{WatchEvent, WatchEventKind, WatchHealth, WatchMessage, Watcher};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct DatastoreConfig {
    /// `host:port`, `http://host:port` or `https://host:port`; several for a cluster.
    pub endpoints: Vec<String>,
    /// Client TLS (etcd run with `--client-cert-auth`): CA, client certificate, client key (PEM files).
    pub tls: Option<TlsFiles>,
    /// Deadline of one request to one endpoint.
    pub request_timeout: Duration,
    /// Deadline of establishing a connection to one endpoint.
    pub connect_timeout: Duration,
    /// How long a call keeps going round the endpoints (with backoff) before it reports etcd unreachable.
    pub retry_for: Duration,
}

impl DatastoreConfig {
    /// Defaults for the given endpoints: 5 s per request, 2 s to connect, 10 s of retries.
    pub fn new<S: AsRef<str>>(endpoints: &[S]) -> DatastoreConfig {
        DatastoreConfig {
            endpoints: endpoints.iter().map(|e| e.as_ref().to_string()).collect(),
            tls: None,
            request_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retry_for: Duration::from_secs(10),
        }
    }
}

/// PEM files for TLS. The client certificate and key are needed when etcd runs with `--client-cert-auth`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

/// What went wrong talking to etcd.
#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// No endpoint answered within the retry budget.
    #[error("etcd unreachable: tried {}: is etcd running? check --etcd-endpoints", fmt_tried(.tried))]
    Unreachable { tried: Vec<(String, String)> },
    /// An endpoint answered with an error that retrying cannot fix (permission, bad request, ...).
    #[error("etcd {endpoint}: {op} {key}: {reason}")]
    Rejected {
        endpoint: String,
        op: &'static str,
        key: String,
        reason: String,
    },
    /// The configuration cannot be used (bad URL, unreadable certificate).
    #[error("etcd configuration: {0}")]
    Config(String),
    /// A key holds something that is not the expected UTF-8 key.
    #[error("etcd key is not UTF-8: {0:?}")]
    BadKey(Vec<u8>),
}

impl DatastoreError {
    /// True when the error means etcd could not be reached (as opposed to a refused request).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, DatastoreError::Unreachable { .. })
    }
}

fn fmt_tried(tried: &[(String, String)]) -> String {
    let parts: Vec<String> = tried
        .iter()
        .map(|(e, why)| format!("{e} ({why})"))
        .collect();
    parts.join(", ")
}

/// One key as etcd holds it.
/// How many times [`Datastore::update_with`] reads and tries again when its write loses a race.
const UPDATE_ATTEMPTS: u32 = 10;

/// What an edit in [`Datastore::update_with`] wants done with the value it was shown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Edit {
    /// Nothing to write (already as wanted).
    Keep,
    /// Write these bytes (create the key when absent).
    Put(Vec<u8>),
    /// Delete the key.
    Delete,
}

/// What [`Datastore::update_with`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Updated {
    Unchanged,
    Created,
    Written,
    Deleted,
    /// Asked to delete a key that was not there.
    Absent,
}

/// Why [`Datastore::update_with`] failed: etcd, the edit itself, or a key that kept changing under us.
#[derive(Debug, thiserror::Error)]
pub enum UpdateError<E> {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error("{0}")]
    Edit(E),
    #[error("{key} kept changing under us ({attempts} attempts to write it); is another writer looping? try again")]
    Contended { key: String, attempts: u32 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the last write to this key: the guard of update and delete.
    pub mod_revision: i64,
    /// Number of writes since creation (0 = absent).
    pub version: i64,
}

/// A guard of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guard {
    /// The key does not exist (`version == 0`): create.
    Absent(String),
    /// The key was last written at this revision: update / delete.
    ModRevision(String, i64),
}

impl Guard {
    fn key(&self) -> &str {
        match self {
            Guard::Absent(k) | Guard::ModRevision(k, _) => k,
        }
    }
}

/// A write inside a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    Put(String, Vec<u8>),
    /// Put bound to an etcd lease: the key is deleted when the lease expires or is revoked.
    PutLeased(String, Vec<u8>, i64),
    Delete(String),
}

/// Outcome of a guarded transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Every guard held; the writes are applied at this revision (the new `mod_revision` of the keys put).
    Committed { revision: i64 },
    /// A guard failed; nothing was written. Holds the current value of every guarded key (None = absent),
    /// read in the same transaction, so the caller can retry without another round trip.
    Conflict {
        current: Vec<(String, Option<KeyValue>)>,
        /// The store revision the keys were read at (an absent key was absent at this revision).
        revision: i64,
    },
}

/// Counters of requests sent to etcd.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DatastoreStats {
    /// Every request sent to an endpoint (including failed attempts).
    pub round_trips: u64,
    /// Of those, transactions.
    pub txns: u64,
    /// Attempts that failed: an endpoint unreachable or timing out, or etcd refusing the request.
    pub errors: u64,
    /// Calls that gave up after trying every endpoint for the whole retry budget.
    pub unreachable: u64,
}

struct Endpoint {
    /// As the operator wrote it (used in messages).
    name: String,
    /// With scheme.
    url: String,
    client: Mutex<Option<Client>>,
}

/// A connection to an etcd cluster. Cheap to share behind an `Arc`; every method takes `&self`.
pub struct Datastore {
    cfg: DatastoreConfig,
    options: ConnectOptions,
    endpoints: Vec<Endpoint>,
    preferred: AtomicUsize,
    round_trips: AtomicU64,
    txns: AtomicU64,
    errors: AtomicU64,
    unreachable: AtomicU64,
}

impl std::fmt::Debug for Datastore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datastore")
            .field("endpoints", &self.cfg.endpoints)
            .finish()
    }
}

impl Datastore {
    /// Prepare clients for every endpoint. Connections are made on first use, so this does not fail when etcd
    /// is down; the first call then reports which endpoints it tried.
    pub fn new(cfg: DatastoreConfig) -> Result<Datastore, DatastoreError> {
        if cfg.endpoints.is_empty() {
            return Err(DatastoreError::Config(
                "no etcd endpoints given (--etcd-endpoints)".into(),
            ));
        }
        let mut options = ConnectOptions::new()
            .with_timeout(cfg.request_timeout)
            .with_connect_timeout(cfg.connect_timeout)
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5));
        if let Some(tls) = &cfg.tls {
            let read = |p: &PathBuf| {
                std::fs::read(p).map_err(|e| {
                    DatastoreError::Config(format!("cannot read {}: {e}", p.display()))
                })
            };
            let mut t = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
            match (&tls.cert, &tls.key) {
                (Some(c), Some(k)) => t = t.identity(Identity::from_pem(read(c)?, read(k)?)),
                (None, None) => {}
                _ => {
                    return Err(DatastoreError::Config(
                        "a client certificate needs its key and a key its certificate (--etcd-cert, --etcd-key)"
                            .into(),
                    ))
                }
            }
            options = options.with_tls(t);
        }
        let scheme = if cfg.tls.is_some() { "https" } else { "http" };
        let endpoints = cfg
            .endpoints
            .iter()
            .map(|e| {
                let name = e
                    .trim_start_matches("http://")
                    .trim_start_matches("https://")
                    .to_string();
                let url = if e.contains("://") {
                    e.clone()
                } else {
                    format!("{scheme}://{e}")
                };
                Endpoint {
                    name,
                    url,
                    client: Mutex::new(None),
                }
            })
            .collect();
        Ok(Datastore {
            cfg,
            options,
            endpoints,
            preferred: AtomicUsize::new(0),
            round_trips: AtomicU64::new(0),
            txns: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            unreachable: AtomicU64::new(0),
        })
    }

    /// The endpoints, as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.cfg.endpoints
    }

    /// Requests sent so far.
    pub fn stats(&self) -> DatastoreStats {
        DatastoreStats {
            round_trips: self.round_trips.load(Ordering::Relaxed),
            txns: self.txns.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            unreachable: self.unreachable.load(Ordering::Relaxed),
        }
    }

    async fn client(&self, idx: usize) -> Result<Client, String> {
        let ep = &self.endpoints[idx];
        if let Some(c) = lock(&ep.client).clone() {
            return Ok(c);
        }
        let c = Client::connect([ep.url.as_str()], Some(self.options.clone()))
            .await
            .map_err(|e| describe(&e))?;
        *lock(&ep.client) = Some(c.clone());
        Ok(c)
    }

    /// `describe`, plus a hint when a TLS connection is closed under us (etcd refusing our certificate shows
    /// up only as a closed connection on the client side).
    fn reason(&self, e: &etcd_client::Error) -> String {
        let r = describe(e);
        let closed = [
            "broken pipe",
            "connection reset",
            "operation was canceled",
            "transport error",
        ];
        if self.cfg.tls.is_some() && closed.iter().any(|c| r.contains(c)) {
            let cert = self.cfg.tls.as_ref().is_some_and(|t| t.cert.is_some());
            format!(
                "{r}: the TLS connection was closed; {}",
                if cert {
                    "does etcd trust our client certificate (--etcd-ca, --etcd-cert, --etcd-key)?"
                } else {
                    "etcd may require a client certificate (--etcd-cert, --etcd-key)"
                }
            )
        } else {
            r
        }
    }

    fn forget(&self, idx: usize) {
        *lock(&self.endpoints[idx].client) = None;
    }

    /// Run `f` against the endpoints, with failover and backoff, until it answers or the budget is spent.
    async fn call<T, F, Fut>(&self, op: &'static str, key: &str, f: F) -> Result<T, DatastoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.cfg.retry_for;
        let mut backoff = Duration::from_millis(50);
        let n = self.endpoints.len();
        loop {
            let mut tried = Vec::with_capacity(n);
            let start = self.preferred.load(Ordering::Relaxed);
            for i in 0..n {
                let idx = (start + i) % n;
                let ep = &self.endpoints[idx];
                let client = match self.client(idx).await {
                    Ok(c) => c,
                    Err(why) => {
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        tried.push((ep.name.clone(), why));
                        continue;
                    }
                };
                self.round_trips.fetch_add(1, Ordering::Relaxed);
                if op == "txn" {
                    self.txns.fetch_add(1, Ordering::Relaxed);
                }
                match f(client).await {
                    Ok(v) => {
                        self.preferred.store(idx, Ordering::Relaxed);
                        return Ok(v);
                    }
                    Err(e) if retryable(&e) => {
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(endpoint = %ep.name, op, key, error = %e, "etcd endpoint failed; trying the next");
                        tried.push((ep.name.clone(), self.reason(&e)));
                        self.forget(idx);
                    }
                    Err(e) => {
                        self.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(DatastoreError::Rejected {
                            endpoint: ep.name.clone(),
                            op,
                            key: key.to_string(),
                            reason: describe(&e),
                        });
                    }
                }
            }
            let now = Instant::now();
            if now >= deadline {
                self.unreachable.fetch_add(1, Ordering::Relaxed);
                return Err(DatastoreError::Unreachable { tried });
            }
            tokio::time::sleep(backoff.min(deadline - now)).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One key, or None when absent.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>, DatastoreError> {
        let resp = self
            .call("get", key, |mut c| async move { c.get(key, None).await })
            .await?;
        match resp.kvs().first() {
            Some(kv) => Ok(Some(convert(kv)?)),
            None => Ok(None),
        }
    }

    /// Every key under `prefix`, sorted by key, and the store revision they were read at (watch from
    /// `revision + 1` to see every later change).
    pub async fn list(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64), DatastoreError> {
        let resp = self
            .call("list", prefix, |mut c| async move {
                c.get(prefix, Some(GetOptions::new().with_prefix())).await
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let kvs = resp.kvs().iter().map(convert).collect::<Result<_, _>>()?;
        Ok((kvs, revision))
    }

    /// Every key under `prefix` as the store held it at `revision` (several prefixes read at one revision
    /// form one consistent snapshot). Fails with `Rejected` when `revision` was compacted away.
    pub async fn list_at(
        &self,
        prefix: &str,
        revision: i64,
    ) -> Result<Vec<KeyValue>, DatastoreError> {
        let resp = self
            .call("list", prefix, |mut c| async move {
                c.get(
                    prefix,
                    Some(GetOptions::new().with_prefix().with_revision(revision)),
                )
                .await
            })
            .await?;
        resp.kvs().iter().map(convert).collect()
    }

    /// A transaction: if every guard holds, apply every write; otherwise read back the guarded keys.
    /// Exactly one round trip when an endpoint answers.
    pub async fn txn(
        &self,
        guards: &[Guard],
        writes: &[Write],
    ) -> Result<TxnOutcome, DatastoreError> {
        let compares: Vec<Compare> = guards
            .iter()
            .map(|g| match g {
                Guard::Absent(k) => Compare::version(k.as_str(), CompareOp::Equal, 0),
                Guard::ModRevision(k, r) => Compare::mod_revision(k.as_str(), CompareOp::Equal, *r),
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|w| match w {
                Write::Put(k, v) => TxnOp::put(k.as_str(), v.clone(), None),
                Write::PutLeased(k, v, lease) => TxnOp::put(
                    k.as_str(),
                    v.clone(),
                    Some(PutOptions::new().with_lease(*lease)),
                ),
                Write::Delete(k) => TxnOp::delete(k.as_str(), None),
            })
            .collect();
        let reads: Vec<TxnOp> = guards.iter().map(|g| TxnOp::get(g.key(), None)).collect();
        let first_key = guards
            .first()
            .map(|g| g.key().to_string())
            .or_else(|| {
                writes.first().map(|w| match w {
                    Write::Put(k, _) | Write::PutLeased(k, _, _) | Write::Delete(k) => k.clone(),
                })
            })
            .unwrap_or_default();
        let resp = self
            .call("txn", &first_key, |mut c| {
                let txn = Txn::new()
                    .when(compares.clone())
                    .and_then(ops.clone())
                    .or_else(reads.clone());
                async move { c.txn(txn).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        if resp.succeeded() {
            return Ok(TxnOutcome::Committed { revision });
        }
        let mut current = Vec::with_capacity(guards.len());
        for (g, r) in guards.iter().zip(resp.op_responses()) {
            let kv = match r {
                TxnOpResponse::Get(g) => match g.kvs().first() {
                    Some(kv) => Some(convert(kv)?),
                    None => None,
                },
                _ => None,
            };
            current.push((g.key().to_string(), kv));
        }
        Ok(TxnOutcome::Conflict { current, revision })
    }

    /// Grant a lease of `ttl` seconds; returns its id. Keys put with it vanish when it is not kept alive.
    pub async fn lease_grant(&self, ttl: i64) -> Result<i64, DatastoreError> {
        let resp = self
            .call("lease grant", "", |mut c| async move {
                c.lease_grant(ttl, None).await
            })
            .await?;
        Ok(resp.id())
    }

    /// Renew a lease once. Returns the remaining TTL in seconds; 0 means the lease is gone (expired or
    /// revoked: its keys are deleted, a new lease is needed).
    pub async fn lease_keep_alive(&self, id: i64) -> Result<i64, DatastoreError> {
        self.call("lease keepalive", "", |mut c| async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(id).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map(|r| r.ttl()).unwrap_or(0))
        })
        .await
    }

    /// Revoke a lease: its keys are deleted at once.
    pub async fn lease_revoke(&self, id: i64) -> Result<(), DatastoreError> {
        match self
            .call("lease revoke", "", |mut c| async move {
                c.lease_revoke(id).await
            })
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: what revoking wanted.
            Err(DatastoreError::Rejected { reason, .. }) if reason.contains("not found") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Create `key` if it does not exist. Returns the new mod_revision, or None if the key already existed.
    pub async fn create(&self, key: &str, value: Vec<u8>) -> Result<Option<i64>, DatastoreError> {
        committed(
            self.txn(
                &[Guard::Absent(key.into())],
                &[Write::Put(key.into(), value)],
            )
            .await?,
        )
    }

    /// Replace `key` if it was last written at `mod_revision`. Returns the new mod_revision, or None on conflict.
    pub async fn update(
        &self,
        key: &str,
        value: Vec<u8>,
        mod_revision: i64,
    ) -> Result<Option<i64>, DatastoreError> {
        committed(
            self.txn(
                &[Guard::ModRevision(key.into(), mod_revision)],
                &[Write::Put(key.into(), value)],
            )
            .await?,
        )
    }

    /// Delete `key` if it was last written at `mod_revision`. Returns Some(revision) when deleted, None on
    /// conflict (including when it is already gone).
    pub async fn delete(
        &self,
        key: &str,
        mod_revision: i64,
    ) -> Result<Option<i64>, DatastoreError> {
        committed(
            self.txn(
                &[Guard::ModRevision(key.into(), mod_revision)],
                &[Write::Delete(key.into())],
            )
            .await?,
        )
    }

    /// Read-modify-write `key` by compare-and-swap: `edit` sees the stored value (None when absent) and says
    /// what to write; when someone else wrote the key between our read and our write, it is read again and
    /// `edit` runs again on the new value. The one CAS retry loop of the crate for single keys (IPAM's
    /// multi-key transactions have their own). Gives up with [`UpdateError::Contended`] after a few rounds.
    pub async fn update_with<E>(
        &self,
        key: &str,
        mut edit: impl FnMut(Option<&[u8]>) -> Result<Edit, E>,
    ) -> Result<Updated, UpdateError<E>> {
        for _ in 0..UPDATE_ATTEMPTS {
            let stored = self.get(key).await?;
            let edit = edit(stored.as_ref().map(|kv| &kv.value[..])).map_err(UpdateError::Edit)?;
            let done = match (edit, &stored) {
                (Edit::Keep, _) => return Ok(Updated::Unchanged),
                (Edit::Put(bytes), Some(kv)) if kv.value == bytes => return Ok(Updated::Unchanged),
                (Edit::Put(bytes), Some(kv)) => self
                    .update(key, bytes, kv.mod_revision)
                    .await?
                    .map(|_| Updated::Written),
                (Edit::Put(bytes), None) => {
                    self.create(key, bytes).await?.map(|_| Updated::Created)
                }
                (Edit::Delete, None) => return Ok(Updated::Absent),
                (Edit::Delete, Some(kv)) => self
                    .delete(key, kv.mod_revision)
                    .await?
                    .map(|_| Updated::Deleted),
            };
            if let Some(done) = done {
                return Ok(done);
            }
        }
        Err(UpdateError::Contended {
            key: key.to_string(),
            attempts: UPDATE_ATTEMPTS,
        })
    }

    /// Watch every key under `prefix` from `from_revision` on (inclusive). The watch survives endpoint
    /// failures by resuming from the last revision it delivered; if that revision was compacted away it
    /// sends [`WatchMessage::Resync`] so the owner re-lists. The watch task stops when the [`Watcher`] drops.
    pub fn watch(self: &std::sync::Arc<Self>, prefix: &str, from_revision: i64) -> Watcher {
        self.watch_reporting(prefix, from_revision, Default::default())
    }

    /// [`Datastore::watch`], recording in `health` whether its stream is up (for a readiness report).
    pub fn watch_reporting(
        self: &std::sync::Arc<Self>,
        prefix: &str,
        from_revision: i64,
        health: std::sync::Arc<WatchHealth>,
    ) -> Watcher {
        watch::spawn(self.clone(), prefix.to_string(), from_revision, health)
    }

    /// A client of its own for one watch task: the preferred endpoint first, else the next that connects.
    ///
    /// Watches never share the connection of requests: HTTP/2 flow control is per connection, so a watch whose
    /// owner is busy (and has stopped reading) would otherwise stall the very request the owner is waiting for.
    async fn watch_client(&self) -> Result<Client, Vec<(String, String)>> {
        let n = self.endpoints.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut tried = Vec::new();
        for i in 0..n {
            let ep = &self.endpoints[(start + i) % n];
            match Client::connect([ep.url.as_str()], Some(self.options.clone())).await {
                Ok(c) => return Ok(c),
                Err(e) => tried.push((ep.name.clone(), describe(&e))),
            }
        }
        Err(tried)
    }
}

fn committed(outcome: TxnOutcome) -> Result<Option<i64>, DatastoreError> {
    Ok(match outcome {
        TxnOutcome::Committed { revision } => Some(revision),
        TxnOutcome::Conflict { .. } => None,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding this lock cannot leave the Option half-written; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn convert(kv: &etcd_client::KeyValue) -> Result<KeyValue, DatastoreError> {
    let key = kv
        .key_str()
        .map_err(|_| DatastoreError::BadKey(kv.key().to_vec()))?
        .to_string();
    Ok(KeyValue {
        key,
        value: kv.value().to_vec(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
    })
}

/// Errors that say "this endpoint did not answer" rather than "etcd said no".
fn retryable(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Unknown
                | Code::Aborted
        ),
        etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

/// The most specific message in an error chain, e.g. "connection refused" rather than "transport error".
pub(crate) fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = vec![e.to_string()];
    if let Some(etcd_client::Error::GRpcStatus(s)) = e.downcast_ref::<etcd_client::Error>() {
        if s.code() == tonic::Code::DeadlineExceeded {
            return "timed out".to_string();
        }
        chain.push(s.message().to_string());
    }
    let mut cur = e.source();
    while let Some(s) = cur {
        chain.push(s.to_string());
        cur = s.source();
    }
    let all = chain.join(": ").to_lowercase();
    tracing::trace!(error = %all, "etcd error chain");
    for known in [
        "connection refused",
        "timed out",
        "connection reset",
        "broken pipe",
        "no route to host",
        "certificate required",
        "unknown ca",
        "bad certificate",
        "invalid peer certificate",
        "handshake",
    ] {
        if all.contains(known) {
            return known.to_string();
        }
    }
    chain
        .into_iter()
        .rev()
        .find(|m| !m.is_empty())
        .unwrap_or_else(|| "no answer".to_string())
}
