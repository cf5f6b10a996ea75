//! The RIB task: owns the [`Rib`], reads [`RibInput`] from one bounded channel, fires the graceful-restart
//! timers, and forwards ECMP changes to the FIB consumer. Thin on purpose: every rule lives in `core.rs`.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::{FibEvent, Policy, Rib, RibConfig, RibInput};

/// The running RIB: the input sender, and the task, aborted when the handle is dropped.
pub struct RibHandle {
    pub tx: mpsc::Sender<RibInput>,
    task: crate::task::Task<Rib>,
}

impl std::fmt::Debug for RibHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RibHandle").finish_non_exhaustive()
    }
}

impl RibHandle {
    /// Close the input side and wait for the task to drain it; returns the final RIB (tests, benchmarks).
    pub async fn shutdown(self) -> Option<Rib> {
        let RibHandle { tx, task } = self;
        drop(tx);
        task.join().await.ok()
    }

    /// Observer of the RIB task's end, for the daemon's supervisor.
    pub fn watch(&self) -> crate::task::TaskWatch {
        self.task.watch()
    }
}

/// Start the RIB task. `capacity` bounds the input channel (backpressure onto the sessions); `fib` receives
/// batches of ECMP changes (None on a reflector). The task ends when every input sender is dropped.
pub fn spawn(
    cfg: RibConfig,
    policy: Arc<Policy>,
    capacity: usize,
    fib: Option<mpsc::Sender<Vec<FibEvent>>>,
) -> RibHandle {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let rib = Rib::new(cfg, policy, fib.is_some());
    let task = crate::task::spawn("rib", run(rib, rx, fib));
    RibHandle { tx, task }
}

async fn run(
    mut rib: Rib,
    mut rx: mpsc::Receiver<RibInput>,
    fib: Option<mpsc::Sender<Vec<FibEvent>>>,
) -> Rib {
    let mut fib = fib;
    loop {
        let deadline = rib.next_deadline();
        let input = tokio::select! {
            input = rx.recv() => match input {
                Some(i) => Some(i),
                None => break,
            },
            _ = sleep_until(deadline) => None,
        };
        // tokio's clock, so deadlines and `now` agree also when a test pauses time.
        let now = tokio::time::Instant::now().into_std();
        match input {
            Some(i) => rib.handle(i, now),
            None => rib.on_timer(now),
        }
        let events = rib.take_fib_events();
        if !events.is_empty() {
            if let Some(tx) = &fib {
                // The FIB consumer is slower than the RIB at a full-table load: waiting here is the backpressure
                // that keeps memory bounded. It never sends back to us, so this cannot deadlock.
                if tx.send(events).await.is_err() {
                    tracing::warn!("FIB consumer gone: no more FIB events");
                    fib = None;
                }
            }
        }
    }
    rib
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
