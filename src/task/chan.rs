//! Small bounded channels for the queues a daemon keeps per peer: one receiver, any number of senders,
//! at most `bound` items waiting, and memory only for what is waiting.
//!
//! Why not tokio's `mpsc`: it allocates its slots in blocks of 32 the moment the channel is made and keeps
//! the block for the channel's life, so every idle session of a route reflector paid about 2 KB per
//! channel, times three channels, times thousands of clients. Here the items wait in a `VecDeque` that
//! grows with what is queued and is given back when the queue runs empty, so an idle channel costs its
//! small shared header. Use it where there is one channel per peer; tokio's channels stay where there are
//! a few (the RIB's inbox, the FIB's).
//!
//! A sender may also hand the channel a [`Bell`] and a token to ring whenever the receiver has drained
//! the queue to half its bound: the side that fills many such channels (the RIB) and stops at a full one
//! waits on that one bell and learns which of its channels have room again, instead of polling each.

use std::collections::VecDeque;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;

/// A queue that has run empty keeps at most this many slots (a trickle of single items must not
/// reallocate every time); a larger one is given back.
const KEEP_SLOTS: usize = 4;

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Wakes the receiver: an item arrived or the last sender left.
    items: Notify,
    /// Wakes one waiting sender: an item was taken, or the receiver left.
    room: Notify,
    bound: usize,
}

struct State<T> {
    queue: VecDeque<T>,
    senders: usize,
    receiver: bool,
    /// Rung with its token when the receiver drains the queue to half its bound (see the module doc).
    on_room: Option<(Arc<Bell>, usize)>,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // Nothing panics while holding the lock; a poisoned queue is still a consistent queue.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Rung by the channels that were full and have room again, each with the token it was given.
#[derive(Debug, Default)]
pub struct Bell {
    rung: Mutex<Vec<usize>>,
    notify: Notify,
}

impl Bell {
    pub fn new() -> Bell {
        Bell::default()
    }

    /// Wait until a channel rang since the last [`Bell::take`] (at once if one has).
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// The tokens of the channels that rang since the last call (a channel may be listed more than once).
    pub fn take(&self) -> Vec<usize> {
        std::mem::take(&mut *self.rung.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn ring(&self, token: usize) {
        self.rung
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(token);
        self.notify.notify_one();
    }
}

/// Make a channel that holds at most `bound` items (at least one).
pub fn channel<T>(bound: usize) -> (Sender<T>, Receiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: VecDeque::new(),
            senders: 1,
            receiver: true,
            on_room: None,
        }),
        items: Notify::new(),
        room: Notify::new(),
        bound: bound.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
    )
}

/// The sending side; clone it for each producer.
pub struct Sender<T> {
    shared: Arc<Shared<T>>,
}

/// The receiving side.
pub struct Receiver<T> {
    shared: Arc<Shared<T>>,
}

/// The receiver is gone; the item comes back.
#[derive(PartialEq, Eq)]
pub struct SendError<T>(pub T);

/// Why [`Sender::try_send`] did not queue the item; the item comes back.
#[derive(PartialEq, Eq)]
pub enum TrySendError<T> {
    Full(T),
    Closed(T),
}

/// Why [`Receiver::try_recv`] returned nothing.
#[derive(Debug, PartialEq, Eq)]
pub enum TryRecvError {
    Empty,
    /// Empty, and every sender is gone.
    Disconnected,
}

impl<T> fmt::Debug for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("SendError(..)")
    }
}

impl<T> fmt::Display for SendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("the receiving task has stopped")
    }
}

impl<T> std::error::Error for SendError<T> {}

impl<T> fmt::Debug for TrySendError<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TrySendError::Full(_) => f.write_str("Full(..)"),
            TrySendError::Closed(_) => f.write_str("Closed(..)"),
        }
    }
}

impl<T> Sender<T> {
    /// Queue `item`, waiting while the channel is full. Cancel-safe: dropped while waiting, nothing
    /// was queued.
    pub async fn send(&self, item: T) -> Result<(), SendError<T>> {
        let mut item = item;
        loop {
            let room = self.shared.room.notified();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Closed(i)) => return Err(SendError(i)),
                Err(TrySendError::Full(i)) => item = i,
            }
            room.await;
        }
    }

    /// Queue `item` if there is room now.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        {
            let mut s = self.shared.lock();
            if !s.receiver {
                return Err(TrySendError::Closed(item));
            }
            if s.queue.len() >= self.shared.bound {
                return Err(TrySendError::Full(item));
            }
            s.queue.push_back(item);
        }
        self.shared.items.notify_one();
        Ok(())
    }

    /// How many more items fit now (0 once the receiver is gone).
    pub fn capacity(&self) -> usize {
        let s = self.shared.lock();
        if s.receiver {
            self.shared.bound - s.queue.len()
        } else {
            0
        }
    }

    /// Ring `bell` with `token` whenever the receiver drains the queue to half its bound (the filler
    /// that stopped at a full channel waits on it).
    pub fn ring_on_room(&self, bell: Arc<Bell>, token: usize) {
        self.shared.lock().on_room = Some((bell, token));
    }

    /// The receiver is gone: nothing sent will be read.
    pub fn is_closed(&self) -> bool {
        !self.shared.lock().receiver
    }
}

impl<T> Clone for Sender<T> {
    fn clone(&self) -> Self {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl<T> Drop for Sender<T> {
    fn drop(&mut self) {
        let last = {
            let mut s = self.shared.lock();
            s.senders -= 1;
            s.senders == 0
        };
        if last {
            self.shared.items.notify_one();
        }
    }
}

impl<T> fmt::Debug for Sender<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("chan::Sender").finish_non_exhaustive()
    }
}

impl<T> Receiver<T> {
    /// The next item, waiting for one; None once the queue is empty and every sender is gone.
    /// Cancel-safe: dropped while waiting, nothing was taken.
    pub async fn recv(&mut self) -> Option<T> {
        loop {
            let items = self.shared.items.notified();
            match self.pop() {
                Ok(item) => return Some(item),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) => {}
            }
            items.await;
        }
    }

    /// The next item if one is waiting.
    pub fn try_recv(&mut self) -> Result<T, TryRecvError> {
        self.pop()
    }

    /// How many items are waiting.
    pub fn len(&self) -> usize {
        self.shared.lock().queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn pop(&self) -> Result<T, TryRecvError> {
        let (item, bell) = {
            let mut s = self.shared.lock();
            // The bell rings when the queue drains to half its bound: a queue left full reaches that
            // point on its way down, and the filler then has half a queue of room to fill at once
            // (ringing at the first item taken would wake it for one slot at a time).
            let ring = s.queue.len() == self.shared.bound / 2 + 1;
            let Some(item) = s.queue.pop_front() else {
                return Err(if s.senders == 0 {
                    TryRecvError::Disconnected
                } else {
                    TryRecvError::Empty
                });
            };
            if s.queue.is_empty() && s.queue.capacity() > KEEP_SLOTS {
                s.queue = VecDeque::new();
            }
            (item, ring.then(|| s.on_room.clone()).flatten())
        };
        self.shared.room.notify_one();
        if let Some((bell, token)) = bell {
            bell.ring(token);
        }
        Ok(item)
    }
}

impl<T> Drop for Receiver<T> {
    /// Senders learn at once that nobody reads; what was queued is dropped with the channel.
    fn drop(&mut self) {
        let queued = {
            let mut s = self.shared.lock();
            s.receiver = false;
            std::mem::take(&mut s.queue)
        };
        drop(queued);
        // Every waiting sender, also one whose wait has not been polled yet, learns it now.
        self.shared.room.notify_waiters();
    }
}

impl<T> fmt::Debug for Receiver<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("chan::Receiver").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn items_arrive_in_order_and_the_bound_holds() {
        let (tx, mut rx) = channel(2);
        tx.try_send(1).unwrap();
        tx.send(2).await.unwrap();
        assert_eq!(tx.capacity(), 0);
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        // A sender waiting for room gets in once an item is taken.
        let tx2 = tx.clone();
        let waiting = tokio::spawn(async move { tx2.send(3).await });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert_eq!(rx.recv().await, Some(1));
        waiting.await.unwrap().unwrap();
        assert_eq!(rx.recv().await, Some(2));
        assert_eq!(rx.recv().await, Some(3));
        assert_eq!(rx.try_recv(), Err(TryRecvError::Empty));
    }

    #[tokio::test]
    async fn the_receiver_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = channel(4);
        let tx2 = tx.clone();
        tx.send("a").await.unwrap();
        drop(tx);
        let late = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            tx2.send("b").await.unwrap();
        });
        assert_eq!(rx.recv().await, Some("a"));
        assert_eq!(rx.recv().await, Some("b"));
        late.await.unwrap();
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.try_recv(), Err(TryRecvError::Disconnected));
    }

    #[tokio::test]
    async fn senders_learn_that_the_receiver_is_gone() {
        let (tx, rx) = channel::<u32>(1);
        tx.try_send(1).unwrap();
        let tx2 = tx.clone();
        let blocked = tokio::spawn(async move { tx2.send(2).await });
        tokio::task::yield_now().await;
        drop(rx);
        assert_eq!(blocked.await.unwrap(), Err(SendError(2)));
        assert!(tx.is_closed());
        assert_eq!(tx.capacity(), 0);
        assert!(matches!(tx.try_send(5), Err(TrySendError::Closed(5))));
    }

    #[tokio::test]
    async fn an_emptied_queue_gives_its_memory_back() {
        let (tx, mut rx) = channel(64);
        for i in 0..64 {
            tx.try_send(i).unwrap();
        }
        assert!(rx.shared.lock().queue.capacity() >= 64);
        while rx.try_recv().is_ok() {}
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
        // A trickle keeps its few slots.
        tx.try_send(1).unwrap();
        rx.try_recv().unwrap();
        assert!(rx.shared.lock().queue.capacity() <= KEEP_SLOTS);
    }

    #[tokio::test]
    async fn the_bell_rings_when_a_full_queue_gets_room() {
        let (tx, mut rx) = channel(2);
        let (other, mut other_rx) = channel(1);
        let bell = Arc::new(Bell::new());
        tx.ring_on_room(bell.clone(), 7);
        other.ring_on_room(bell.clone(), 9);
        tx.try_send(1).unwrap();
        // Taken from below half the bound: no ring.
        rx.try_recv().unwrap();
        assert!(bell.take().is_empty());
        tx.try_send(2).unwrap();
        tx.try_send(3).unwrap();
        other.try_send(4).unwrap();
        // From full to half: ring.
        rx.try_recv().unwrap();
        other_rx.try_recv().unwrap();
        tokio::time::timeout(Duration::from_secs(1), bell.wait())
            .await
            .expect("the bell rang");
        assert_eq!(bell.take(), [7, 9], "each channel rang with its token");
        assert!(bell.take().is_empty());
    }
}
