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

/// The receiving end of a watch. Dropping it stops the watch task.
pub struct Watcher {
    rx: mpsc::Receiver<WatchMessage>,
    task: tokio::task::JoinHandle<()>,
}

impl Watcher {
    /// The next message; None once the watch has stopped for good (after a Resync).
    pub async fn recv(&mut self) -> Option<WatchMessage> {
        self.rx.recv().await
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(super) fn spawn(ds: Arc<Datastore>, prefix: String, from_revision: i64) -> Watcher {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(run(ds, prefix, from_revision, tx));
    Watcher { rx, task }
}

async fn run(ds: Arc<Datastore>, prefix: String, mut next: i64, tx: mpsc::Sender<WatchMessage>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        let mut client = match ds.watch_client().await {
            Ok(c) => c,
            Err(tried) => {
                tracing::debug!(prefix, ?tried, "watch: no etcd endpoint; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(next.max(1));
        let mut stream = match client.watch(prefix.as_str(), Some(opts)).await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(prefix, error = %describe(&e), "watch: cannot start; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            match stream.message().await {
                Ok(Some(resp)) => {
                    backoff = Duration::from_millis(50);
                    if resp.compact_revision() > 0 && resp.compact_revision() >= next {
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
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(prefix, error = %describe(&e), "watch stream failed; resuming");
                    break;
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}
