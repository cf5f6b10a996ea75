//! The RIB's helper for direct writes: sessions whose bytes the RIB has queued ([`DirectOut::try_queue`])
//! wait here in chunks until someone writes them ([`DirectOut::flush`]). Two take from the front: the
//! RIB itself, and one helper thread that runs when a core is free. The RIB leaves the newest chunk for
//! the helper while it queues the next, and writes whatever is left when its change is done, so no
//! session ever waits for the helper: on a busy machine the RIB writes everything, on an idle core the
//! helper takes about half.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use super::DirectOut;

/// One chunk: sessions with queued bytes.
pub type Chunk = Vec<Arc<dyn DirectOut>>;

/// The chunks nobody has taken yet, oldest first.
#[derive(Default)]
pub struct FlushQueue {
    state: Mutex<State>,
    wake: Condvar,
}

#[derive(Default)]
struct State {
    chunks: VecDeque<Chunk>,
    closed: bool,
}

impl std::fmt::Debug for FlushQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlushQueue").finish_non_exhaustive()
    }
}

impl FlushQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock leaves a plain queue behind: still usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a chunk; returns how many wait now.
    pub fn push(&self, chunk: Chunk) -> usize {
        let n = {
            let mut s = self.lock();
            s.chunks.push_back(chunk);
            s.chunks.len()
        };
        self.wake.notify_one();
        n
    }

    /// Take the oldest chunk if more than `keep` wait.
    pub fn take_beyond(&self, keep: usize) -> Option<Chunk> {
        let mut s = self.lock();
        if s.chunks.len() > keep {
            s.chunks.pop_front()
        } else {
            None
        }
    }

    /// Write every chunk that waits, here and now.
    pub fn drain(&self) {
        while let Some(chunk) = self.take_beyond(0) {
            flush_now(&chunk);
        }
    }

    /// Stop the helper (it ends after the chunk it is writing, if any).
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The helper thread's loop: take the oldest chunk and write it, until [`FlushQueue::close`].
    pub fn help(&self) {
        loop {
            let chunk = {
                let mut s = self.lock();
                loop {
                    if s.closed {
                        return;
                    }
                    if let Some(c) = s.chunks.pop_front() {
                        break c;
                    }
                    s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
                }
            };
            flush_now(&chunk);
        }
    }
}

/// Write every session of `chunk`.
pub fn flush_now(chunk: &Chunk) {
    for d in chunk {
        d.flush();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering::SeqCst};

    use bytes::Bytes;

    use super::*;
    use crate::bgp::wire::EncodeCtx;

    /// A session that counts its flushes.
    #[derive(Default)]
    struct Counted {
        ctx: EncodeCtx,
        flushed: AtomicU64,
    }

    impl DirectOut for Counted {
        fn ctx(&self) -> &EncodeCtx {
            &self.ctx
        }
        fn done(&self) -> u64 {
            0
        }
        fn try_queue(&self, _: &Bytes) -> bool {
            true
        }
        fn flush(&self) {
            self.flushed.fetch_add(1, SeqCst);
        }
    }

    fn chunk(n: usize) -> (Chunk, Vec<Arc<Counted>>) {
        let sessions: Vec<Arc<Counted>> = (0..n).map(|_| Arc::default()).collect();
        let chunk = sessions
            .iter()
            .map(|s| s.clone() as Arc<dyn DirectOut>)
            .collect();
        (chunk, sessions)
    }

    /// The helper writes the chunks it finds, each once, and ends when the queue is closed; the RIB's
    /// own takes leave it the newest chunk.
    #[test]
    fn the_helper_writes_each_chunk_once_and_ends_when_closed() {
        let q = Arc::new(FlushQueue::default());
        let (a, a_s) = chunk(3);
        let (b, b_s) = chunk(2);
        assert_eq!(q.push(a), 1);
        assert!(
            q.take_beyond(1).is_none(),
            "the newest waits for the helper"
        );
        assert_eq!(q.push(b), 2);
        let older = q.take_beyond(1).expect("the oldest is the RIB's");
        flush_now(&older);
        assert!(a_s.iter().all(|s| s.flushed.load(SeqCst) == 1));
        let helper = {
            let q = q.clone();
            std::thread::spawn(move || q.help())
        };
        // The helper takes the chunk left to it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while b_s.iter().any(|s| s.flushed.load(SeqCst) == 0) {
            assert!(
                std::time::Instant::now() < deadline,
                "the helper never wrote"
            );
            std::thread::yield_now();
        }
        q.close();
        helper.join().expect("the helper ends");
        assert!(a_s.iter().chain(&b_s).all(|s| s.flushed.load(SeqCst) == 1));
        // After the close, what is pushed is the RIB's to write.
        let (c, c_s) = chunk(1);
        q.push(c);
        q.drain();
        assert_eq!(c_s[0].flushed.load(SeqCst), 1);
    }
}
