//! A prefix watch that survives endpoint failures: one task per watch, resuming from the revision after the
//! last one it delivered, handing events to its owner over a bounded channel. The task dies with the
//! [`Watcher`].

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, WatchOptions};
use tokio::sync::mpsc;

use super::{convert, describe, Datastore};

/// What happened to a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchEventKind {
    Put,
    Delete,
}

/// One change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchEvent {
    pub kind: WatchEventKind,
    pub key: String,
    /// Empty for deletes.
    pub value: Vec<u8>,
    /// The revision of this change.
    pub mod_revision: i64,
}

/// What a watch delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchMessage {
    /// Changes, in revision order.
    Events(Vec<WatchEvent>),
    /// The history the watch needed was compacted: the owner must re-list (and start a new watch).
    Resync,
}

/// Whether a watch stream is up, shared with whoever reports readiness. A watch that is down delivers
/// nothing and says nothing on its channel, so without this a quiet watch and a dead one look the same.
#[derive(Debug, Default)]
pub struct WatchHealth {
    down: std::sync::Mutex<Option<String>>,
}

impl WatchHealth {
    /// None while the stream is up (or being set up the first time); why it is down otherwise.
    pub fn down(&self) -> Option<String> {
        self.down.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Record why the stream is down (None: up again).
    pub fn set_down(&self, why: Option<String>) {
        *self.down.lock().unwrap_or_else(|p| p.into_inner()) = why;
    }
}

/// The receiving end of a watch. Dropping it stops the watch task.
pub struct Watcher {
    rx: mpsc::Receiver<WatchMessage>,
    _task: crate::task::AbortOnDrop,
}

impl Watcher {
    /// The next message; None once the watch has stopped for good (after a Resync).
    pub async fn recv(&mut self) -> Option<WatchMessage> {
        self.rx.recv().await
    }

    /// A message already delivered, without waiting (to drain a burst before acting on it).
    pub fn try_recv(&mut self) -> Option<WatchMessage> {
        self.rx.try_recv().ok()
    }
}

pub(super) fn spawn(
    ds: Arc<Datastore>,
    prefix: String,
    from_revision: i64,
    health: Arc<WatchHealth>,
) -> Watcher {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(run(ds, prefix, from_revision, tx, health));
    Watcher {
        rx,
        _task: crate::task::AbortOnDrop(task),
    }
}

async fn run(
    ds: Arc<Datastore>,
    prefix: String,
    mut next: i64,
    tx: mpsc::Sender<WatchMessage>,
    health: Arc<WatchHealth>,
) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut client = match ds.watch_client().await {
            Ok(c) => c,
            Err(tried) => {
                tracing::debug!(prefix, ?tried, "watch: no etcd endpoint; retrying");
                health.set_down(Some(format!(
                    "etcd watch on {prefix} down: {}",
                    super::fmt_tried(&tried)
                )));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        // Progress notifications (etcd sends one when a watch has been quiet for its progress interval,
        // 10 min by default) move the resume point forward while nothing under the prefix changes, so a
        // stream lost after a long quiet spell resumes instead of finding its revision compacted.
        let opts = WatchOptions::new()
            .with_prefix()
            .with_progress_notify()
            .with_start_revision(next.max(1));
        let mut stream = match client.watch(prefix.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(prefix, error = %describe(&e), "watch: cannot start; retrying");
                health.set_down(Some(format!(
                    "etcd watch on {prefix} cannot start: {}",
                    describe(&e)
                )));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        health.set_down(None);
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = Duration::from_millis(50);
                    if resp.compact_revision() > 0 && resp.compact_revision() >= next {
                        // A closed channel: the watcher's owner is gone, and so is the need to resync.
                        let _ = tx.send(WatchMessage::Resync).await;
                        return;
                    }
                    if resp.canceled() {
                        tracing::debug!(
                            prefix,
                            reason = resp.cancel_reason(),
                            "watch canceled by etcd; restarting"
                        );
                        break;
                    }
                    if resp.events().is_empty() && !resp.created() {
                        // A progress notification: every change up to the header's revision was delivered.
                        if let Some(h) = resp.header() {
                            next = next.max(h.revision() + 1);
                        }
                        continue;
                    }
                    let mut events = Vec::with_capacity(resp.events().len());
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let Ok(kv) = convert(kv) else { continue };
                        next = next.max(kv.mod_revision + 1);
                        events.push(WatchEvent {
                            kind: match ev.event_type() {
                                EventType::Put => WatchEventKind::Put,
                                EventType::Delete => WatchEventKind::Delete,
                            },
                            key: kv.key,
                            value: kv.value,
                            mod_revision: kv.mod_revision,
                        });
                    }
                    if !events.is_empty() && tx.send(WatchMessage::Events(events)).await.is_err() {
                        return;
                    }
                }
                Ok(None) => {
                    health.set_down(Some(format!("etcd watch on {prefix} closed by etcd")));
                    break;
                }
                Err(e) => {
                    tracing::debug!(prefix, error = %describe(&e), "watch stream failed; resuming");
                    health.set_down(Some(format!(
                        "etcd watch on {prefix} lost: {}",
                        describe(&e)
                    )));
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
