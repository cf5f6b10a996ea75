//! One task model for every long-lived task of the daemons: spawned with a name, owned by a [`Task`] that
//! aborts it when dropped, observed through [`TaskWatch`]es that learn when and why it ended, and
//! supervised by a [`Supervisor`] that also sends each task a heartbeat through its inbox.
//!
//! Why: a daemon whose RIB or FIB task died keeps answering `/healthz` and the kubelet keeps a node that no
//! longer routes. With this model an unexpected end is noticed at once: the [`Supervisor`] marks
//! [`Health`] failed (so `/healthz` answers 503 naming the task and why) and returns the ending, and the
//! daemon exits non-zero (the kubelet restarts it; the kernel routes stay and peers keep ours through
//! graceful restart meanwhile). A task that is alive but stuck is found by its heartbeat: a question sent
//! through the task's own inbox that must be answered within [`HEARTBEAT_TIMEOUT`].
//!
//! It owns no daemon state and never restarts a task: the process is the unit of restart.

pub mod chan;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::sync::watch;
use tokio::task::{AbortHandle, JoinError, JoinHandle};

/// How often each task gets a heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How long a task may take to answer its heartbeat before it counts as stuck.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a supervised task ended, how long the daemon keeps serving the failed `/healthz` before it exits.
pub const FAILED_HEALTH_GRACE: Duration = Duration::from_millis(300);

/// Written once by the task's end guard: why it ended.
type Ending = watch::Sender<Option<String>>;

/// Sets the ending when the task's future is dropped: returned, panicked (dropped while unwinding) or
/// aborted (dropped otherwise).
struct EndGuard {
    tx: Ending,
    returned: bool,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        let why = if self.returned {
            "returned"
        } else if std::thread::panicking() {
            "panicked"
        } else {
            "was aborted"
        };
        self.tx.send_replace(Some(why.to_string()));
    }
}

/// A plain task handle that aborts the task when dropped: helper tasks die with their owner. The one
/// abort-on-drop of the crate (long-lived daemon tasks use [`Task`], which also reports how they ended).
#[derive(Debug)]
pub struct AbortOnDrop<T = ()>(pub JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An owned long-lived task: aborted when dropped.
pub struct Task<T> {
    name: &'static str,
    handle: Option<JoinHandle<T>>,
    ending: watch::Receiver<Option<String>>,
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }
}

/// Spawn `fut` as the task `name` (a word an operator reads in the log: `rib`, `fib`, `ipam`).
pub fn spawn<T, F>(name: &'static str, fut: F) -> Task<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let (tx, ending) = watch::channel(None);
    // Built outside the future so that a task aborted before its first poll still reports its end.
    let guard = EndGuard {
        tx,
        returned: false,
    };
    let handle = tokio::spawn(async move {
        let mut guard = guard;
        let out = fut.await;
        guard.returned = true;
        out
    });
    Task {
        name,
        handle: Some(handle),
        ending,
    }
}

impl<T> Task<T> {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// An observer of this task's end, for a [`Supervisor`].
    pub fn watch(&self) -> TaskWatch {
        TaskWatch {
            name: self.name,
            ending: self.ending.clone(),
            abort: self.handle.as_ref().map(JoinHandle::abort_handle),
        }
    }

    /// Wait for the task's result (it must end by itself: close its inbox first).
    pub async fn join(mut self) -> Result<T, JoinError> {
        match self.handle.take() {
            Some(h) => h.await,
            None => unreachable!("a Task's handle is only taken by join or drop"),
        }
    }

    /// Abort the task and wait until it is gone, so that what it held is dropped.
    pub async fn stop(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
            let _ = h.await;
        }
    }

    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }
}

/// Observes one task's end. Cloneable; does not keep the task alive.
#[derive(Clone)]
pub struct TaskWatch {
    name: &'static str,
    ending: watch::Receiver<Option<String>>,
    abort: Option<AbortHandle>,
}

impl TaskWatch {
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Why the task ended, or `None` while it runs.
    pub fn ended_why(&self) -> Option<String> {
        self.ending.borrow().clone()
    }

    /// Wait until the task ends; why it did.
    pub async fn ended(&mut self) -> String {
        match self.ending.wait_for(Option::is_some).await {
            Ok(v) => v.clone().unwrap_or_default(),
            // The guard always writes before it drops the sender.
            Err(_) => "ended".to_string(),
        }
    }

    /// Kill the task as a fault would. Only the test-only fault hook of the daemons calls this.
    pub fn kill_for_test(&self) {
        if let Some(a) = &self.abort {
            a.abort();
        }
    }
}

/// The answer `/healthz` gives: every supervised task alive and answering its heartbeat.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<&'static str, String>>>);

impl Health {
    /// `Ok` when nothing is wrong, else one line per failing task ("rib: ended (panicked)").
    pub fn check(&self) -> Result<(), String> {
        let failing = self.lock();
        if failing.is_empty() {
            return Ok(());
        }
        Err(failing
            .iter()
            .map(|(n, why)| format!("task {n}: {why}"))
            .collect::<Vec<_>>()
            .join("; "))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<&'static str, String>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, name: &'static str, problem: Option<String>) {
        let mut m = self.lock();
        match problem {
            Some(p) => {
                m.insert(name, p);
            }
            None => {
                m.remove(name);
            }
        }
    }
}

/// A heartbeat: a question through the task's inbox; `Err` when the task cannot answer.
pub type Probe = Box<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// A task that ended although it never should.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskEnded {
    pub name: &'static str,
    pub why: String,
}

impl std::fmt::Display for TaskEnded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task {} ended unexpectedly ({})", self.name, self.why)
    }
}

/// Watches the tasks that must live as long as the daemon, and heartbeats them.
pub struct Supervisor {
    watches: Vec<TaskWatch>,
    probes: Vec<(&'static str, Probe)>,
    health: Health,
    interval: Duration,
    timeout: Duration,
}

impl Default for Supervisor {
    fn default() -> Supervisor {
        Supervisor::new()
    }
}

impl Supervisor {
    pub fn new() -> Supervisor {
        Supervisor::with_timing(HEARTBEAT_INTERVAL, HEARTBEAT_TIMEOUT)
    }

    /// A supervisor that heartbeats every `interval` and calls a task stuck after `timeout`.
    pub fn with_timing(interval: Duration, timeout: Duration) -> Supervisor {
        Supervisor {
            watches: Vec::new(),
            probes: Vec::new(),
            health: Health::default(),
            interval,
            timeout,
        }
    }

    /// Supervise a task that must never end while the daemon runs.
    pub fn watch(&mut self, w: TaskWatch) {
        self.watches.push(w);
    }

    /// Heartbeat `name` with `probe` every [`HEARTBEAT_INTERVAL`].
    pub fn probe<F, Fut>(&mut self, name: &'static str, probe: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        self.probes.push((
            name,
            Box::new(move || Box::pin(probe()) as BoxFuture<'static, _>),
        ));
    }

    /// What `/healthz` serves.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The supervised tasks by name, for the test-only fault hook.
    pub fn find(&self, name: &str) -> Option<TaskWatch> {
        self.watches.iter().find(|w| w.name == name).cloned()
    }

    /// Run until a supervised task ends; return which and why. Health is marked failed first. Meanwhile
    /// every task is heartbeated; a heartbeat that fails or times out marks health failed until one is
    /// answered again.
    pub async fn run(self) -> TaskEnded {
        let Supervisor {
            watches,
            probes,
            health,
            interval,
            timeout,
        } = self;
        let health2 = health.clone();
        let ended = async move {
            let waits = watches.into_iter().map(|mut w| {
                Box::pin(async move {
                    let why = w.ended().await;
                    TaskEnded { name: w.name, why }
                })
            });
            if waits.len() == 0 {
                return futures::future::pending().await;
            }
            let (e, _, _) = futures::future::select_all(waits).await;
            health2.set(e.name, Some(format!("ended ({})", e.why)));
            e
        };
        let beats = async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let rounds = probes.iter().map(|(name, p)| {
                    let health = health.clone();
                    let name = *name;
                    let fut = p();
                    async move {
                        let r = match tokio::time::timeout(timeout, fut).await {
                            Ok(Ok(())) => None,
                            Ok(Err(e)) => Some(format!("heartbeat failed: {e}")),
                            Err(_) => Some(format!(
                                "stuck: no answer to a heartbeat within {timeout:?}"
                            )),
                        };
                        if let Some(p) = &r {
                            tracing::warn!(task = name, "{p}");
                        }
                        // A task that ended keeps its "ended" entry.
                        if !health
                            .lock()
                            .get(name)
                            .is_some_and(|v| v.starts_with("ended"))
                        {
                            health.set(name, r);
                        }
                    }
                });
                futures::future::join_all(rounds).await;
            }
        };
        tokio::select! {
            e = ended => e,
            never = beats => never,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_ended_task_is_reported_with_why_and_health_fails() {
        let ok = spawn("forever", futures::future::pending::<()>());
        let short = spawn("short", async {});
        let mut sup = Supervisor::new();
        sup.watch(ok.watch());
        sup.watch(short.watch());
        let health = sup.health();
        let e = tokio::time::timeout(Duration::from_secs(5), sup.run())
            .await
            .expect("noticed");
        assert_eq!(
            e,
            TaskEnded {
                name: "short",
                why: "returned".into()
            }
        );
        let h = health.check().unwrap_err();
        assert!(h.contains("task short: ended (returned)"), "{h}");
    }

    #[tokio::test]
    async fn a_killed_task_and_a_panicked_one_say_so() {
        let victim = spawn("rib", futures::future::pending::<()>());
        let w = victim.watch();
        let mut sup = Supervisor::new();
        sup.watch(w.clone());
        w.kill_for_test();
        let e = sup.run().await;
        assert_eq!((e.name, e.why.as_str()), ("rib", "was aborted"));

        let p = spawn("fib", async { panic!("injected") });
        let mut w = p.watch();
        assert_eq!(w.ended().await, "panicked");
        assert!(p.join().await.is_err());
    }

    #[tokio::test]
    async fn a_stuck_task_fails_its_heartbeat() {
        let forever = spawn("stuck", futures::future::pending::<()>());
        let (every, limit) = (Duration::from_millis(20), Duration::from_millis(50));
        let mut sup = Supervisor::with_timing(every, limit);
        sup.watch(forever.watch());
        sup.probe("stuck", futures::future::pending::<Result<(), String>>);
        sup.probe("fine", || async { Ok(()) });
        let health = sup.health();
        let run = tokio::spawn(sup.run());
        assert!(health.check().is_ok());
        tokio::time::sleep(every + limit + Duration::from_millis(100)).await;
        let h = health.check().unwrap_err();
        assert!(
            h.contains("task stuck: stuck") && !h.contains("fine"),
            "{h}"
        );
        run.abort();
        drop(forever);
    }

    #[tokio::test]
    async fn dropping_the_task_aborts_it() {
        let t = spawn("x", futures::future::pending::<()>());
        let mut w = t.watch();
        drop(t);
        assert_eq!(w.ended().await, "was aborted");
    }
}
