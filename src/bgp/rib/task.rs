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
    let mut rib = Rib::new(cfg, policy, fib.is_some());
    // The direct writes' helper (`flush.rs`) is a thread, not a task: a task woken by the RIB's task
    // waits on the same worker thread until the RIB's task yields (tokio runs it next there, and nobody
    // can steal it), so the writes would not overlap at all.
    let q = Arc::new(super::flush::FlushQueue::default());
    let helper = q.clone();
    match std::thread::Builder::new()
        .name("rib-flush".into())
        .spawn(move || helper.help())
    {
        Ok(_) => rib.set_flusher(q),
        Err(e) => {
            tracing::warn!("cannot start the RIB's flusher thread ({e}); the RIB writes alone")
        }
    }
    let task = crate::task::spawn("rib", run(rib, rx, fib));
    RibHandle { tx, task }
}

async fn run(
    mut rib: Rib,
    mut rx: mpsc::Receiver<RibInput>,
    fib: Option<mpsc::Sender<Vec<FibEvent>>>,
) -> Rib {
    let mut fib = fib;
    let bell = rib.room_bell();
    loop {
        let deadline = rib.next_deadline();
        // A session owed changes its channel had no room for rings the bell when it has room again.
        let dirty = rib.has_dirty();
        let input = tokio::select! {
            input = rx.recv() => match input {
                Some(i) => Tick::Input(i),
                None => break,
            },
            _ = sleep_until(deadline) => Tick::Timer,
            _ = bell.wait() => Tick::Ready,
            _ = tokio::time::sleep(DIRTY_BACKSTOP), if dirty => Tick::Drain,
        };
        // tokio's clock, so deadlines and `now` agree also when a test pauses time.
        let now = tokio::time::Instant::now().into_std();
        match input {
            Tick::Input(i) => {
                // What else is already waiting is applied with it, and the sessions are served once.
                let mut batch = vec![i];
                while batch.len() < INPUT_BATCH {
                    match rx.try_recv() {
                        Ok(i) => batch.push(i),
                        Err(_) => break,
                    }
                }
                rib.handle_batch(batch, now)
            }
            Tick::Timer => rib.on_timer(now),
            Tick::Ready => {
                // Taken also when nothing is owed, so the rung tokens never pile up. `dirty` is still
                // true to the RIB: only this task changes it.
                let ready = bell.take();
                if dirty {
                    rib.drain_ready(ready);
                }
            }
            Tick::Drain => rib.drain_dirty(),
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

/// Most inputs applied before the sessions are served (bounds the delay a burst adds to the first change).
const INPUT_BATCH: usize = 64;

/// How soon a session that was behind is looked at again if its bell never rang: only a backstop (a
/// channel closed while full never rings; its PeerDown is on the way).
const DIRTY_BACKSTOP: std::time::Duration = std::time::Duration::from_millis(100);

// One lives on the stack per loop turn; boxing the input would cost an allocation per RIB input.
#[allow(clippy::large_enum_variant)]
enum Tick {
    Input(RibInput),
    Timer,
    /// Sessions that were behind have room again.
    Ready,
    Drain,
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(tokio::time::Instant::from_std(d)).await,
        None => std::future::pending().await,
    }
}
