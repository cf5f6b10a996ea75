//! The peer task: thin I/O around [`Session`]. It connects (source address, port, TTL / GTSM, TCP MD5),
//! takes connections the shared listener hands it, frames and decodes what the peer sends, runs the
//! FSM's timers, writes what the FSM and the RIB ask for, and publishes the peer's status.
//!
//! Per connection there is a reader task (reads large chunks, splits them into messages with
//! `peek_len`, passes whole batches on) and a writer task (control messages first, then UPDATE data,
//! written vectored so pieces an update group shares are never copied per session); both end with the
//! connection. The peer task encodes the RIB's output for its Established session itself, and writes it
//! to the socket itself when nothing is queued and the writer is idle (a reflector's fan-out then wakes
//! one task per client, not two); what the socket does not take at once is left to the writer. It never
//! blocks on a slow peer: RIB output and commands are only taken while the connection's data queue has
//! room, so reading (and the hold timer) go on.
//!
//! Its three channels (commands, what the connection tasks report, the RIB's output) are
//! [`crate::task::chan`] channels: a reflector has thousands of these sessions, mostly idle, and an
//! idle channel of that kind holds no slots.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::bgp::wire::{
    decode_full, encode, DecodeCtx, DecodeError, EncodeCtx, Family, Message, MpUnreach,
    Notification, PathAttributes, Rfc7606Action, Update, HEADER_LEN,
};

use super::config::PeerConfig;
use super::fsm::{Action, ConnId, Event, MessageError, Session, State, Timer};
use super::listener::{ConnInbox, ListenerError, ListenerHandle};
use super::open::{family_text, Negotiated};
use super::rib_link::{self, RibLink, RibOutputs};
use super::sockopt;
use super::{Counters, PeerCommand, PeerStatus, SessionError, SessionEvent, SessionId};
use crate::bgp::rib::{DirectOut, RibInput, RibOutput};
use crate::task::{chan, AbortOnDrop};

/// The status a peer task publishes on every turn of its loop (counters change with every UPDATE) and
/// its owner reads when asked: a plain lock, as nobody waits for a change (a watch channel would wake
/// its notifiers on each publish, thousands of times per change on a reflector).
type SharedStatus = Arc<StatusCell>;

struct StatusCell {
    status: std::sync::Mutex<PeerStatus>,
    /// The Established session's socket as the RIB writes to it ([`DirectSink`]): what the RIB wrote
    /// there is counted in the sink (the peer task does not run for it), added to the published counters
    /// when the status is read, and folded into them when the session ends. Locked after `status`.
    direct: std::sync::Mutex<Option<Arc<DirectSink>>>,
}

impl StatusCell {
    fn lock_direct(&self) -> std::sync::MutexGuard<'_, Option<Arc<DirectSink>>> {
        self.direct.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn lock_status(s: &SharedStatus) -> std::sync::MutexGuard<'_, PeerStatus> {
    // Nothing panics while holding it; a poisoned lock still holds a whole status.
    s.status.lock().unwrap_or_else(|e| e.into_inner())
}

/// Owner's handle on a peer task. Dropping it stops the session (NOTIFICATION Cease, then close) and
/// ends the task.
pub struct PeerHandle {
    peer: IpAddr,
    cmd: chan::Sender<PeerCommand>,
    status: SharedStatus,
    owner: Option<oneshot::Sender<StopMode>>,
    task: Option<JoinHandle<()>>,
}

impl PeerHandle {
    pub fn peer(&self) -> IpAddr {
        self.peer
    }

    /// A sender for commands.
    pub fn commands(&self) -> chan::Sender<PeerCommand> {
        self.cmd.clone()
    }

    pub async fn send(&self, c: PeerCommand) -> Result<(), SessionError> {
        self.cmd
            .send(c)
            .await
            .map_err(|_| SessionError::TaskGone { peer: self.peer })
    }

    /// The peer's current status.
    pub fn status(&self) -> PeerStatus {
        let locked = lock_status(&self.status);
        let mut s = locked.clone();
        if let Some(d) = self.status.lock_direct().as_ref() {
            d.add_to(&mut s.counters);
        }
        s
    }

    /// Stop the session cleanly (NOTIFICATION Cease / administrative shutdown, Down to the RIB) and
    /// wait for the task to end.
    pub async fn shutdown(mut self) {
        self.owner.take();
        self.join().await;
    }

    /// Stop for a graceful restart of margay itself (RFC 4724 4.1): close the connections *without* a
    /// NOTIFICATION, so GR-capable peers keep our routes (stale) until we are back and send
    /// End-of-RIB. The RIB hears nothing: the process is going away.
    pub async fn shutdown_for_restart(mut self) {
        if let Some(o) = self.owner.take() {
            // The task has already ended if nobody receives it: nothing left to stop.
            let _ = o.send(StopMode::ForRestart);
        }
        self.join().await;
    }

    async fn join(&mut self) {
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
    }
}

/// How the owner asked the task to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopMode {
    ForRestart,
}

impl Drop for PeerHandle {
    fn drop(&mut self) {
        // Dropping `owner` tells the task to stop cleanly; it ends on its own shortly after.
        self.owner.take();
    }
}

/// Start the task for one peer. `listener` (when given) delivers the connections the peer opens to us;
/// `events` is the RIB's inbox shared by all peers. The session starts right away (ManualStart).
pub fn spawn_peer(
    cfg: PeerConfig,
    listener: Option<ListenerHandle>,
    events: mpsc::Sender<SessionEvent>,
) -> PeerHandle {
    spawn(cfg, listener, events, None)
}

/// [`spawn_peer`] for a peer that feeds the RIB itself: `PeerUp` (with the session generation), routes,
/// End-of-RIB, route refresh and `PeerDown` go straight to `rib.tx`, and the task encodes the RIB's output
/// for its session. `events` then only tells the owner about the lifecycle (Established, End-of-RIB seen,
/// Down).
pub fn spawn_peer_with_rib(
    cfg: PeerConfig,
    listener: Option<ListenerHandle>,
    events: mpsc::Sender<SessionEvent>,
    rib: RibLink,
) -> PeerHandle {
    spawn(cfg, listener, events, Some(rib))
}

fn spawn(
    cfg: PeerConfig,
    listener: Option<ListenerHandle>,
    events: mpsc::Sender<SessionEvent>,
    rib: Option<RibLink>,
) -> PeerHandle {
    let peer = cfg.peer_addr;
    let (cmd_tx, cmd_rx) = chan::channel(64);
    let (owner_tx, owner_rx) = oneshot::channel();
    let status = PeerStatus {
        peer,
        peer_as: cfg.peer_as,
        state: State::Idle,
        since: SystemTime::now(),
        last_error: None,
        negotiated: None,
        counters: Counters::default(),
    };
    let status = Arc::new(StatusCell {
        status: std::sync::Mutex::new(status),
        direct: std::sync::Mutex::new(None),
    });
    let mut task = PeerTask::new(cfg, listener, events, status.clone());
    // Register with the listener before returning, so the peer's connections are never rejected
    // because the task had not run yet.
    let registration = task
        .listener
        .as_ref()
        .and_then(|l| l.register_now(task.cfg.peer_addr, task.cfg.password.clone(), task.inbox()));
    task.rib = rib;
    let join = tokio::spawn(Box::new(task).run(cmd_rx, owner_rx, registration));
    PeerHandle {
        peer,
        cmd: cmd_tx,
        status,
        owner: Some(owner_tx),
        task: Some(join),
    }
}

/// What the per-connection tasks and the listener report. The rare variants are boxed: the largest
/// variant is the size of every item queued.
enum Internal {
    /// The listener accepted a connection from the peer.
    Accepted(Box<TcpStream>),
    Connected(ConnId, Box<io::Result<TcpStream>>),
    Frames(ConnId, Vec<Bytes>),
    /// The connection ended or broke; `String` is the reason in plain words.
    Closed(ConnId, String),
    /// The byte stream is not BGP (bad marker, length or type): RFC 4271 6.1.
    HeaderError(ConnId, Box<DecodeError>),
}

/// The listener's way into a peer task: accepted connections arrive in the task's `Internal` channel.
struct PeerInbox(chan::Sender<Internal>);

impl ConnInbox for PeerInbox {
    fn deliver(&self, stream: TcpStream) -> Result<(), String> {
        match self.0.try_send(Internal::Accepted(Box::new(stream))) {
            Ok(()) => Ok(()),
            Err(chan::TrySendError::Full(msg)) => {
                // The task is busy with a burst from its connection: wait for room off the listener's
                // loop, which serves every other peer too.
                let tx = self.0.clone();
                tokio::spawn(async move {
                    // A task gone meanwhile drops the connection, which closes it.
                    let _ = tx.send(msg).await;
                });
                Ok(())
            }
            Err(chan::TrySendError::Closed(_)) => Err("the peer task has stopped".into()),
        }
    }
    fn is_closed(&self) -> bool {
        self.0.is_closed()
    }
}

/// What the peer task has queued for one connection's writer: control messages (OPEN, KEEPALIVE,
/// NOTIFICATION) are never refused and leave first, so a peer that stops reading cannot stop our
/// keepalives or our NOTIFICATION to it (a handful of small messages per session); UPDATE data waits for
/// room, at most about [`DATA_QUEUE_BYTES`]. The data is kept as the pieces it was encoded in: a piece an
/// update group shares is one buffer for all its members, however many of them have it queued.
///
/// Who writes: the writer task, except that [`WriteQueue::data`] writes itself, under the lock, when
/// nothing is queued and the writer holds nothing it took (`Pending::writing`). So bytes leave in the
/// order they were queued, and one party at a time writes.
#[derive(Default)]
struct WriteQueue {
    pending: std::sync::Mutex<Pending>,
    /// Wakes the writer: something was queued, or the connection is to be closed.
    wake: Notify,
    /// Wakes the peer task: the data queue has room again.
    room: Notify,
}

#[derive(Default)]
struct Pending {
    control: VecDeque<Bytes>,
    data: VecDeque<Bytes>,
    /// The bytes in `data`.
    data_bytes: usize,
    /// The writer holds something it took from the queue and has not finished writing it.
    writing: bool,
    close: bool,
}

/// A socket that takes what it can without waiting: the connection's write half (a fake in tests).
trait TryWrite {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// One buffer: a plain write (the kernel's vectored path costs more for one piece).
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[IoSlice::new(buf)])
    }
}

impl TryWrite for OwnedWriteHalf {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        OwnedWriteHalf::try_write_vectored(self, bufs)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        OwnedWriteHalf::try_write(self, buf)
    }
}

/// The RIB's way to a session's socket: one buffer goes to the descriptor with `send(2)` directly, not
/// through tokio, whose readiness state is one more cold cache line per session and change on a
/// reflector's fan-out. Tokio's readiness may then say "writable" after such a write met a full socket:
/// the writer's next write finds out and waits, as for any stale readiness.
struct RawSock<'a> {
    fd: std::os::fd::RawFd,
    /// Held for the call, so `fd` is this connection's open descriptor.
    wr: &'a OwnedWriteHalf,
}

impl<'a> RawSock<'a> {
    fn new(fd: std::os::fd::RawFd, wr: &'a OwnedWriteHalf) -> Self {
        debug_assert_eq!(fd, std::os::fd::AsRawFd::as_raw_fd(wr.as_ref()));
        RawSock { fd, wr }
    }
}

impl TryWrite for RawSock<'_> {
    fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.wr.try_write_vectored(bufs)
    }
    fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        // SAFETY: `fd` is open while `wr` is held (it owns the socket); `buf` is valid for its length.
        let n = unsafe {
            libc::send(
                self.fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

/// Write what `sock` takes of `pieces` now (at most [`WRITE_PIECES`] of them, one vectored write) and
/// drop that from `pieces`; an error writes nothing: the caller's next waiting write meets it again.
fn write_some(sock: &impl TryWrite, pieces: &mut VecDeque<Bytes>) -> io::Result<()> {
    let n = if pieces.len() == 1 {
        sock.try_write(&pieces[0])?
    } else {
        let slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .take(WRITE_PIECES)
            .map(|b| IoSlice::new(b))
            .collect();
        sock.try_write_vectored(&slices)?
    };
    if n == 0 {
        return Err(io::ErrorKind::WriteZero.into());
    }
    consume(pieces, n);
    Ok(())
}

/// Drop the first `n` bytes of `pieces`.
fn consume(pieces: &mut VecDeque<Bytes>, mut n: usize) {
    while n > 0 {
        let Some(front) = pieces.front_mut() else {
            break;
        };
        if n >= front.len() {
            n -= front.len();
            pieces.pop_front();
        } else {
            bytes::Buf::advance(front, n);
            n = 0;
        }
    }
}

/// What became of bytes handed to [`WriteQueue::try_queue`].
#[derive(Debug, PartialEq, Eq)]
enum Taken {
    /// Queued behind nothing, for [`WriteQueue::flush`].
    Queued,
    /// The connection is closing: dropped.
    Dropped,
}

/// What the writer does next.
enum Write {
    Control(Bytes),
    /// UPDATE data: pieces to write back to back.
    Data(Vec<Bytes>),
    Close,
}

impl WriteQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Nothing panics while holding the lock; a poisoned one still holds consistent queues.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control(&self, b: Bytes) {
        self.lock().control.push_back(b);
        self.wake.notify_one();
    }

    fn has_room(&self) -> bool {
        self.lock().data_bytes < DATA_QUEUE_BYTES
    }

    /// Send one batch of UPDATE data: written to `sock` at once if nothing is queued and the writer is
    /// idle (see [`WriteQueue`]); what is left is queued for the writer, waiting while
    /// [`DATA_QUEUE_BYTES`] are already queued.
    async fn data(&self, pieces: Vec<Bytes>, sock: &impl TryWrite) {
        let mut pieces = VecDeque::from(pieces);
        loop {
            let room = self.room.notified();
            {
                let mut p = self.lock();
                if p.close {
                    return;
                }
                if !p.writing && p.control.is_empty() && p.data.is_empty() {
                    // A full socket (or a failed one) leaves the rest to the writer, which waits for
                    // room in the socket or reports the error.
                    while !pieces.is_empty() && write_some(sock, &mut pieces).is_ok() {}
                    if pieces.is_empty() {
                        return;
                    }
                }
                if p.data_bytes < DATA_QUEUE_BYTES {
                    for b in pieces {
                        p.data_bytes += b.len();
                        p.data.push_back(b);
                    }
                    break;
                }
            }
            room.await;
        }
        self.wake.notify_one();
    }

    /// [`WriteQueue::data`] for the RIB's own output ([`DirectSink`]): queue `bytes` if nothing is queued
    /// and the writer is idle, without waking the writer: [`WriteQueue::flush`] writes them (or the
    /// writer, woken by whatever is queued next). None, and nothing done, if something is queued ahead.
    fn try_queue(&self, bytes: &Bytes) -> Option<Taken> {
        let mut p = self.lock();
        if p.close {
            // Closing: dropped, as `data` drops it.
            return Some(Taken::Dropped);
        }
        if p.writing || !p.control.is_empty() || !p.data.is_empty() {
            return None;
        }
        p.data_bytes += bytes.len();
        p.data.push_back(bytes.clone());
        Some(Taken::Queued)
    }

    /// Write the queued data to `sock` now, under the lock, unless the writer holds some (it writes the
    /// rest itself) or a control message waits (it must go first: the writer is woken for it). What the
    /// socket does not take is left to the writer.
    fn flush(&self, sock: &impl TryWrite) {
        let mut p = self.lock();
        if p.writing || p.close || p.data.is_empty() {
            return;
        }
        if p.control.is_empty() {
            let before: usize = p.data.iter().map(Bytes::len).sum();
            while !p.data.is_empty() && write_some(sock, &mut p.data).is_ok() {}
            let after: usize = p.data.iter().map(Bytes::len).sum();
            let was_full = p.data_bytes >= DATA_QUEUE_BYTES;
            p.data_bytes -= before - after;
            if was_full && p.data_bytes < DATA_QUEUE_BYTES {
                // One large UPDATE (extended messages) can fill the queue: the peer task may wait for room.
                self.room.notify_one();
            }
            if p.data.is_empty() {
                if p.data.capacity() > WRITE_PIECES {
                    p.data = VecDeque::new();
                }
                return;
            }
        }
        // A full (or failed) socket, or control first: the writer waits for room or reports the error.
        drop(p);
        self.wake.notify_one();
    }

    /// Flush what is queued (control first), then shut the connection.
    fn close(&self) {
        self.lock().close = true;
        self.wake.notify_one();
    }

    /// What the writer writes next; calling it says the writer finished what it took before.
    async fn next(&self) -> Write {
        loop {
            let wake = self.wake.notified();
            {
                let mut p = self.lock();
                p.writing = false;
                if let Some(b) = p.control.pop_front() {
                    p.writing = true;
                    return Write::Control(b);
                }
                if !p.data.is_empty() {
                    let take = p.data.len().min(WRITE_PIECES);
                    let pieces: Vec<Bytes> = p.data.drain(..take).collect();
                    p.data_bytes -= pieces.iter().map(Bytes::len).sum::<usize>();
                    if p.data.is_empty() && p.data.capacity() > WRITE_PIECES {
                        // A burst is over: an idle connection keeps no large queue.
                        p.data = VecDeque::new();
                    }
                    p.writing = true;
                    drop(p);
                    self.room.notify_one();
                    return Write::Data(pieces);
                }
                if p.close {
                    return Write::Close;
                }
            }
            wake.await;
        }
    }
}

/// The Established connection's socket as the RIB sees it ([`DirectOut`]): the RIB writes a shared
/// UPDATE here itself when the session holds nothing it sent (`done`, counted by the peer task after it
/// has queued what it took from the RIB's channel) and nothing is queued for the socket.
pub(crate) struct DirectSink {
    queue: Arc<WriteQueue>,
    /// Weak: the connection and its writer decide when the socket is shut, not the RIB.
    wr: std::sync::Weak<OwnedWriteHalf>,
    /// `wr`'s descriptor, used only while `wr` is held ([`RawSock`]).
    fd: std::os::fd::RawFd,
    ctx: EncodeCtx,
    done: AtomicU64,
    /// UPDATE messages and bytes the RIB wrote here (next to `done`: the cache line the RIB reads anyway).
    updates: AtomicU64,
    bytes: AtomicU64,
}

impl DirectSink {
    /// The peer task has queued (or dropped) `n` more messages it took from the RIB's channel.
    pub(super) fn taken(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Release);
    }

    /// Add what the RIB wrote here to `c`.
    fn add_to(&self, c: &mut Counters) {
        let updates = self.updates.load(Ordering::Relaxed);
        c.updates_out += updates;
        c.messages_out += updates;
        c.update_bytes_out += self.bytes.load(Ordering::Relaxed);
    }
}

impl DirectOut for DirectSink {
    fn ctx(&self) -> &EncodeCtx {
        &self.ctx
    }

    fn done(&self) -> u64 {
        self.done.load(Ordering::Acquire)
    }

    fn try_queue(&self, bytes: &Bytes) -> bool {
        self.count(self.queue.try_queue(bytes), bytes)
    }

    fn flush(&self) {
        // A connection that is gone has nothing to write to.
        if let Some(wr) = self.wr.upgrade() {
            self.queue.flush(&RawSock::new(self.fd, &wr));
        }
    }
}

impl DirectSink {
    /// Count what the queue took; whether it took it.
    fn count(&self, taken: Option<Taken>, bytes: &Bytes) -> bool {
        match taken {
            None => false,
            Some(Taken::Dropped) => true,
            Some(Taken::Queued) => {
                self.updates
                    .fetch_add(count_messages(bytes), Ordering::Relaxed);
                self.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
                true
            }
        }
    }
}

struct Conn {
    /// Our address on this connection (RFC 4271 6.3: a NEXT_HOP equal to it is semantically incorrect).
    local: Option<IpAddr>,
    /// Whether extended messages (RFC 8654) were negotiated on this connection: the reader frames the
    /// stream against the negotiated maximum, so an over-long header is answered at once (RFC 4271 6.1).
    extended: Arc<AtomicBool>,
    queue: Arc<WriteQueue>,
    /// The socket's write half, shared with the writer (see [`WriteQueue`] for who writes); the last
    /// of the two to let go shuts the socket for writing.
    wr: Arc<OwnedWriteHalf>,
    _reader: AbortOnDrop,
    writer: Option<JoinHandle<()>>,
}

/// A peer task's connections: one, two while a collision is being resolved. A short list, not a hash
/// map: the Established session's connection is looked up for every batch the peer task writes, and on
/// a reflector's fan-out each of thousands of sessions does that once per change, from a cold cache.
#[derive(Default)]
struct Conns(Vec<(ConnId, Conn)>);

impl Conns {
    fn get(&self, id: &ConnId) -> Option<&Conn> {
        self.0.iter().find(|(i, _)| i == id).map(|(_, c)| c)
    }
    fn contains_key(&self, id: &ConnId) -> bool {
        self.get(id).is_some()
    }
    fn insert(&mut self, id: ConnId, c: Conn) {
        // Connection ids are never reused; a replaced entry is dropped (and closed) as a map would.
        self.remove(&id);
        self.0.push((id, c));
    }
    fn remove(&mut self, id: &ConnId) -> Option<Conn> {
        let at = self.0.iter().position(|(i, _)| i == id)?;
        Some(self.0.swap_remove(at).1)
    }
    fn drain(&mut self) -> std::vec::Drain<'_, (ConnId, Conn)> {
        self.0.drain(..)
    }
}

impl Drop for Conn {
    /// A connection the task lets go of is closed: its writer flushes what is queued and shuts it.
    fn drop(&mut self) {
        self.queue.close();
    }
}

/// About how many bytes of UPDATE data may wait for the socket per connection (one more batch may go in
/// while fewer are queued). The kernel's send buffer is the real queue; this only keeps the writer fed.
const DATA_QUEUE_BYTES: usize = 32 * 1024;
/// Most pieces the writer takes (and hands to one vectored write) at a time.
const WRITE_PIECES: usize = 64;
/// How much one read takes from a socket: large, so a table dump arrives in few large batches. The
/// buffer is per worker thread (see [`reader`]), so its size costs nothing per session.
const READ_CHUNK: usize = 256 * 1024;

struct PeerTask {
    cfg: PeerConfig,
    session: Session,
    listener: Option<ListenerHandle>,
    events: mpsc::Sender<SessionEvent>,
    status: SharedStatus,
    internal_tx: chan::Sender<Internal>,
    internal_rx: chan::Receiver<Internal>,
    conns: Conns,
    next_conn: ConnId,
    connecting: Option<AbortOnDrop>,
    timers: [Option<Instant>; 4],
    session_id: SessionId,
    /// Codec contexts of the Established (or OpenConfirm) session.
    decode_ctx: DecodeCtx,
    encode_ctx: EncodeCtx,
    counters: Counters,
    last_error: Option<String>,
    /// The RIB this task feeds directly.
    rib: Option<RibLink>,
    /// The RIB's output for the Established session, encoded here.
    rib_out: Option<RibOutputs>,
}

fn timer_index(t: Timer) -> usize {
    match t {
        Timer::ConnectRetry => 0,
        Timer::Hold => 1,
        Timer::Keepalive => 2,
        Timer::IdleHold => 3,
    }
}

const TIMER_EVENTS: [Event; 4] = [
    Event::ConnectRetryTimerExpires,
    Event::HoldTimerExpires,
    Event::KeepaliveTimerExpires,
    Event::IdleHoldTimerExpires,
];

impl PeerTask {
    fn new(
        cfg: PeerConfig,
        listener: Option<ListenerHandle>,
        events: mpsc::Sender<SessionEvent>,
        status: SharedStatus,
    ) -> PeerTask {
        let (internal_tx, internal_rx) = chan::channel(64);
        PeerTask {
            session: Session::new(cfg.clone()),
            cfg,
            listener,
            events,
            status,
            internal_tx,
            internal_rx,
            conns: Conns::default(),
            next_conn: 1,
            connecting: None,
            timers: [None; 4],
            session_id: 0,
            decode_ctx: DecodeCtx::default(),
            encode_ctx: EncodeCtx::default(),
            counters: Counters::default(),
            last_error: None,
            rib: None,
            rib_out: None,
        }
    }

    /// Where the listener hands this peer's connections.
    fn inbox(&self) -> PeerInbox {
        PeerInbox(self.internal_tx.clone())
    }

    /// Send one input of the current session to the RIB (when this task feeds it).
    async fn to_rib(&self, input: RibInput) {
        if let Some(link) = &self.rib {
            let ev = RibInput::Session {
                generation: self.session_id,
                input: Box::new(input),
            };
            if link.tx.send(ev).await.is_err() {
                tracing::error!(peer = %self.cfg.peer_addr, "the RIB task has stopped");
            }
        }
    }

    /// The task's loop. The handlers are boxed where they are awaited: the task's own future stays a few
    /// hundred bytes per peer instead of the size of its deepest handler (kilobytes, times thousands of
    /// sessions on a reflector), and a handler's state exists only while it runs. The task's state comes
    /// boxed as well: an async fn keeps its arguments apart from its locals, so a `PeerTask` passed by value
    /// would be held twice in the future.
    async fn run(
        mut self: Box<Self>,
        mut cmds: chan::Receiver<PeerCommand>,
        mut owner: oneshot::Receiver<StopMode>,
        registration: Option<oneshot::Receiver<Result<(), ListenerError>>>,
    ) {
        let registered = match (registration, &self.listener) {
            (Some(rx), _) => Some(rx.await.unwrap_or(Err(ListenerError::Gone))),
            (None, Some(l)) => Some(
                l.register(self.cfg.peer_addr, self.cfg.password.clone(), self.inbox())
                    .await,
            ),
            (None, None) => None,
        };
        match registered {
            Some(Err(e)) => self.last_error = Some(e.to_string()),
            None if self.cfg.passive => {
                self.last_error = Some(
                    "passive peer without a BGP listener: nothing can accept its connection".into(),
                )
            }
            _ => {}
        }
        Box::pin(self.feed(Event::ManualStart)).await;
        let mut for_restart = false;
        // One timer for the task's life, moved when the earliest FSM timer changes (a fresh one per turn
        // of the loop would register and unregister itself with the runtime's timer wheel each time).
        let timer = tokio::time::sleep_until(Instant::now() + Duration::from_secs(86_400));
        tokio::pin!(timer);
        loop {
            self.publish();
            let next_timer = self.timers.iter().flatten().min().copied();
            if let Some(t) = next_timer {
                if timer.deadline() != t {
                    timer.as_mut().reset(t);
                }
            }
            // Take RIB output and commands only while the data queue has room (see the module doc).
            let can_take = self.main_conn().is_none_or(|c| c.queue.has_room());
            // ... and wake up when it has room again: with hold time 0 (no keepalives) and a quiet peer,
            // nothing else would, and a client that stopped reading for a while would never catch up.
            let data_room = (!can_take)
                .then(|| self.main_conn().map(|c| c.queue.clone()))
                .flatten();
            tokio::select! {
                _ = async {
                    if let Some(q) = &data_room {
                        q.room.notified().await;
                    }
                }, if data_room.is_some() => {}
                stop = &mut owner => {
                    for_restart = stop == Ok(StopMode::ForRestart);
                    break;
                }
                cmd = cmds.recv(), if can_take => match cmd {
                    Some(c) => Box::pin(self.command(c)).await,
                    None => break,
                },
                Some(out) = recv_some(self.rib_out.as_mut().map(|o| &mut o.rx)), if can_take => {
                    Box::pin(self.rib_output(out)).await
                }
                Some(msg) = self.internal_rx.recv() => Box::pin(self.internal(msg)).await,
                _ = &mut timer, if next_timer.is_some() => {
                    // Messages that arrived while we were busy (e.g. waiting on a slow RIB) come first:
                    // a KEEPALIVE sitting in the queue must restart the hold timer, not lose to it.
                    for _ in 0..64 {
                        match self.internal_rx.try_recv() {
                            Ok(msg) => Box::pin(self.internal(msg)).await,
                            Err(_) => break,
                        }
                    }
                    let now = Instant::now();
                    for (i, ev) in TIMER_EVENTS.iter().enumerate() {
                        if self.timers[i].is_some_and(|t| t <= now) {
                            self.timers[i] = None;
                            Box::pin(self.feed(ev.clone())).await;
                        }
                    }
                }
            }
        }
        if for_restart {
            // Flush what is queued and close; no NOTIFICATION (see `shutdown_for_restart`).
            for (_, mut c) in self.conns.drain() {
                c.queue.close();
                if let Some(w) = c.writer.take() {
                    // A writer that is gone has closed the socket already.
                    let _ = tokio::time::timeout(Duration::from_secs(2), w).await;
                }
            }
        } else {
            // Clean stop: Cease to the peer, Down to the RIB.
            Box::pin(self.feed(Event::ManualStop)).await;
        }
        self.publish();
        if let Some(l) = &self.listener {
            l.unregister(self.cfg.peer_addr);
        }
    }

    /// The session has ended: what the RIB wrote to its socket joins the task's own counters, in the
    /// published status too, at once (a reader never sees the counters go back).
    fn fold_direct(&mut self) {
        let mut s = lock_status(&self.status);
        if let Some(d) = self.status.lock_direct().take() {
            d.add_to(&mut self.counters);
            d.add_to(&mut s.counters);
        }
    }

    fn main_conn(&self) -> Option<&Conn> {
        self.session.main_conn().and_then(|id| self.conns.get(&id))
    }

    fn publish(&self) {
        let state = self.session.state();
        let neg = if state == State::Established {
            self.session.negotiated()
        } else {
            None
        };
        let mut s = lock_status(&self.status);
        if s.state != state {
            s.state = state;
            s.since = SystemTime::now();
            s.negotiated = neg.cloned();
        }
        if s.last_error != self.last_error {
            s.last_error.clone_from(&self.last_error);
        }
        if s.counters != self.counters {
            s.counters.clone_from(&self.counters);
        }
    }

    // ----- FSM plumbing -----

    async fn feed(&mut self, ev: Event) {
        let actions = self.session.handle(ev);
        for a in actions {
            self.act(a).await;
        }
    }

    async fn act(&mut self, a: Action) {
        match a {
            Action::Connect => self.connect(),
            Action::CancelConnect => self.connecting = None,
            Action::SendOpen(id, open) => self.send_control(id, &Message::Open(open)),
            Action::SendKeepalive(id) => {
                self.counters.keepalives_out += 1;
                self.send_control(id, &Message::Keepalive)
            }
            Action::SendNotification(id, n) => {
                self.counters.notifications_out += 1;
                self.send_control(id, &Message::Notification(n))
            }
            Action::CloseConnection(id) => {
                if let Some(mut c) = self.conns.remove(&id) {
                    // Dropping `c` asks the writer to flush and close. A peer that stopped reading must not
                    // keep the writer (and the socket) forever.
                    if let Some(writer) = c.writer.take() {
                        tokio::spawn(async move {
                            tokio::time::sleep(Duration::from_secs(3)).await;
                            writer.abort();
                        });
                    }
                }
            }
            Action::StartTimer(t, d) => self.timers[timer_index(t)] = Some(Instant::now() + d),
            Action::StopTimer(t) => self.timers[timer_index(t)] = None,
            Action::Established(_, neg) => {
                self.session_id += 1;
                self.counters.established += 1;
                self.last_error = None;
                self.set_contexts(&neg);
                if let Some(link) = &self.rib {
                    // The RIB hears of the session before any of its routes: both go down this channel.
                    let (out_tx, out_rx) = chan::channel(rib_link::RIB_OUTPUT_QUEUE);
                    let info = rib_link::peer_info(&self.cfg, &link.role, &neg);
                    let peer = link.peer;
                    let direct = self.main_conn().map(|c| {
                        Arc::new(DirectSink {
                            queue: c.queue.clone(),
                            wr: Arc::downgrade(&c.wr),
                            fd: std::os::fd::AsRawFd::as_raw_fd(c.wr.as_ref().as_ref()),
                            ctx: self.encode_ctx.clone(),
                            done: AtomicU64::new(0),
                            updates: AtomicU64::new(0),
                            bytes: AtomicU64::new(0),
                        })
                    });
                    {
                        let _status = lock_status(&self.status);
                        self.status.lock_direct().clone_from(&direct);
                    }
                    self.rib_out = Some(RibOutputs::new(
                        out_rx,
                        self.encode_ctx.clone(),
                        direct.clone(),
                    ));
                    self.to_rib(RibInput::PeerUp {
                        peer,
                        info,
                        out: out_tx,
                        direct: direct.map(|d| d as Arc<dyn DirectOut>),
                    })
                    .await;
                }
                let ev = SessionEvent::Established {
                    peer: self.cfg.peer_addr,
                    session: self.session_id,
                    negotiated: neg,
                };
                // Session events go to the speaker; when it is gone the daemon is stopping and this
                // task is about to be stopped with it (here and below).
                let _ = self.events.send(ev).await;
            }
            Action::Down {
                reason,
                graceful_restart,
            } => {
                self.rib_out = None;
                self.fold_direct();
                if let Some(link) = &self.rib {
                    let peer = link.peer;
                    self.to_rib(RibInput::PeerDown {
                        peer,
                        graceful: graceful_restart.is_some(),
                    })
                    .await;
                }
                let ev = SessionEvent::Down {
                    peer: self.cfg.peer_addr,
                    session: self.session_id,
                    reason,
                    graceful_restart,
                };
                // As above: no speaker, nobody to tell.
                let _ = self.events.send(ev).await;
            }
            Action::LastError(e) => {
                tracing::info!(peer = %self.cfg.peer_addr, "BGP session: {e}");
                self.last_error = Some(e);
            }
        }
    }

    fn set_contexts(&mut self, neg: &Negotiated) {
        self.decode_ctx = DecodeCtx {
            four_octet_as: neg.four_octet_as,
            add_path_rx: neg.add_path_rx.iter().copied().collect(),
            extended_message: neg.extended_message,
            ebgp_peer_as: (!neg.is_ibgp()).then_some(neg.peer_as),
        };
        if let Some(c) = self.session.main_conn().and_then(|id| self.conns.get(&id)) {
            c.extended.store(neg.extended_message, Ordering::Relaxed);
        }
        self.encode_ctx = EncodeCtx {
            four_octet_as: neg.four_octet_as,
            add_path_tx: neg.add_path_tx.iter().copied().collect(),
            extended_message: neg.extended_message,
        };
    }

    fn send_control(&mut self, id: ConnId, msg: &Message) {
        let Some(c) = self.conns.get(&id) else { return };
        let mut buf = BytesMut::with_capacity(64);
        match encode(msg, &EncodeCtx::default(), &mut buf) {
            Ok(()) => {
                self.counters.messages_out += 1;
                // A writer that is gone reports the connection's end through `Internal::Closed`.
                c.queue.control(buf.freeze());
            }
            Err(e) => tracing::error!(peer = %self.cfg.peer_addr, "cannot encode {msg:?}: {e}"),
        }
    }

    // ----- connections -----

    fn connect(&mut self) {
        let id = self.next_conn;
        self.next_conn += 1;
        let cfg = self.cfg.clone();
        let tx = self.internal_tx.clone();
        let task = tokio::spawn(async move {
            // No timeout here: the FSM's ConnectRetryTimer replaces an attempt that takes too long.
            let r = connect(&cfg).await;
            // The peer task is gone (and the stream with it) if nobody receives the result.
            let _ = tx.send(Internal::Connected(id, Box::new(r))).await;
        });
        self.connecting = Some(AbortOnDrop(task));
    }

    async fn accepted(&mut self, stream: TcpStream) {
        let v6 = stream.local_addr().map(|a| a.is_ipv6()).unwrap_or(false);
        if let Err(e) = sockopt::apply_ttl(&stream, v6, self.cfg.ttl, self.cfg.ttl_security_hops) {
            tracing::warn!(peer = %self.cfg.peer_addr, "TTL settings on accepted connection: {e}");
        }
        let id = self.next_conn;
        self.next_conn += 1;
        self.start_io(id, stream);
        self.feed(Event::TcpConnectionConfirmed(id)).await;
    }

    fn start_io(&mut self, id: ConnId, stream: TcpStream) {
        // Best effort: Nagle only delays our small control messages, it breaks nothing.
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().map(|a| a.ip().to_canonical());
        let (rd, wr) = stream.into_split();
        let wr = Arc::new(wr);
        let queue = Arc::new(WriteQueue::default());
        let extended = Arc::new(AtomicBool::new(false));
        let reader = tokio::spawn(reader(id, rd, extended.clone(), self.internal_tx.clone()));
        let writer = tokio::spawn(writer(
            id,
            wr.clone(),
            queue.clone(),
            self.internal_tx.clone(),
        ));
        self.conns.insert(
            id,
            Conn {
                local,
                extended,
                queue,
                wr,
                _reader: AbortOnDrop(reader),
                writer: Some(writer),
            },
        );
    }

    async fn internal(&mut self, msg: Internal) {
        match msg {
            Internal::Accepted(stream) => self.accepted(*stream).await,
            Internal::Connected(id, r) => {
                self.connecting = None;
                match *r {
                    Ok(stream) => {
                        self.start_io(id, stream);
                        self.feed(Event::TcpCrAcked(id)).await;
                    }
                    Err(e) => {
                        let reason = format!("connect: {}", sockopt::io_text(&e));
                        self.feed(Event::TcpConnectionFails { conn: id, reason })
                            .await;
                    }
                }
            }
            Internal::Closed(id, reason) => {
                if self.conns.remove(&id).is_some() {
                    self.feed(Event::TcpConnectionFails { conn: id, reason })
                        .await;
                }
            }
            Internal::HeaderError(id, e) => {
                let (code, subcode, data) = e.notification();
                let err = MessageError {
                    notification: Notification {
                        code,
                        subcode,
                        data,
                    },
                    reason: format!("message from {}: {e}", self.cfg.peer_addr),
                };
                self.feed(Event::BgpHeaderErr(id, err)).await;
            }
            Internal::Frames(id, frames) => self.frames(id, frames).await,
        }
    }

    /// Decode and act on a batch of whole messages from one connection. UPDATEs go to the RIB as one
    /// `Updates` event per batch, in order with the other events.
    async fn frames(&mut self, id: ConnId, frames: Vec<Bytes>) {
        let mut batch: Vec<Update> = Vec::new();
        let mut saw_update = false;
        for frame in frames {
            if !self.conns.contains_key(&id) {
                break; // closed while handling an earlier message of the batch
            }
            self.counters.messages_in += 1;
            let is_main = self.session.main_conn() == Some(id);
            let established = is_main && self.session.state() == State::Established;
            let ctx = if is_main
                && matches!(
                    self.session.state(),
                    State::OpenConfirm | State::Established
                ) {
                &self.decode_ctx
            } else {
                &DecodeCtx::default()
            };
            match decode_full(&frame, ctx) {
                Ok(d) => {
                    for e in &d.discarded {
                        tracing::warn!(peer = %self.cfg.peer_addr, "UPDATE attribute discarded (RFC 7606): {e}");
                    }
                    match d.message {
                        Message::Open(o) => {
                            self.feed(Event::BgpOpen(id, o)).await;
                            if let Some(neg) = self.session.negotiated().cloned() {
                                if self.session.main_conn() == Some(id) {
                                    self.set_contexts(&neg);
                                }
                            }
                        }
                        Message::Keepalive => {
                            self.counters.keepalives_in += 1;
                            self.feed(Event::KeepAliveMsg(id)).await;
                        }
                        Message::Notification(n) => {
                            self.counters.notifications_in += 1;
                            self.flush_updates(&mut batch).await;
                            self.feed(Event::NotifMsg(id, n)).await;
                        }
                        Message::Update(u) => {
                            self.counters.updates_in += 1;
                            if !established {
                                self.feed(Event::UpdateMsg(id)).await;
                                continue;
                            }
                            saw_update = true;
                            if let Some(family) = u.end_of_rib() {
                                self.flush_updates(&mut batch).await;
                                if let Some(peer) = self.rib.as_ref().map(|l| l.peer) {
                                    self.to_rib(RibInput::EndOfRib { peer, family }).await;
                                }
                                // The owner tracks End-of-RIB for convergence (restart handling).
                                let ev = SessionEvent::EndOfRib {
                                    peer: self.cfg.peer_addr,
                                    session: self.session_id,
                                    family,
                                };
                                // No speaker: the daemon is stopping.
                                let _ = self.events.send(ev).await;
                            } else {
                                self.count_prefixes(&u);
                                let mut u = u;
                                let local = self.conns.get(&id).and_then(|c| c.local);
                                for (family, nlri) in own_next_hop(&mut u, local) {
                                    // RFC 4271 6.3: "the route SHOULD be ignored", no NOTIFICATION.
                                    // Withdrawn, so an earlier announcement of it goes as well.
                                    tracing::warn!(peer = %self.cfg.peer_addr, %family, prefixes = ?nlri.iter().map(|n| n.prefix).collect::<Vec<_>>(),
                                        "UPDATE with our own address as next hop: routes ignored (RFC 4271 6.3)");
                                    batch.push(withdraw_update(family, nlri));
                                }
                                batch.push(u);
                            }
                        }
                        Message::RouteRefresh(r) => {
                            if established {
                                saw_update = true;
                                self.flush_updates(&mut batch).await;
                                if let Some(peer) = self.rib.as_ref().map(|l| l.peer) {
                                    tracing::info!(peer = %self.cfg.peer_addr, family = %r.family, "route refresh requested by peer");
                                    self.to_rib(RibInput::RouteRefresh {
                                        peer,
                                        family: r.family,
                                    })
                                    .await;
                                    continue;
                                }
                                let ev = SessionEvent::RouteRefresh {
                                    peer: self.cfg.peer_addr,
                                    session: self.session_id,
                                    family: r.family,
                                };
                                // No speaker: the daemon is stopping.
                                let _ = self.events.send(ev).await;
                            } else {
                                self.feed(Event::UpdateMsg(id)).await;
                            }
                        }
                    }
                }
                Err(e) if e.action() == Rfc7606Action::TreatAsWithdraw && established => {
                    log_malformed(self.cfg.peer_addr, &e, &frame);
                    self.counters.updates_in += 1;
                    saw_update = true;
                    for (family, nlri) in e.withdrawals().unwrap_or_default() {
                        self.counters.withdrawals_in += nlri.len() as u64;
                        batch.push(withdraw_update(*family, nlri.clone()));
                    }
                }
                Err(e) if e.action() == Rfc7606Action::AttributeDiscard && established => {
                    // decode_full reports discards as Ok; an Err with this action is a codec oversight:
                    // keep the session (RFC 7606 says the rest of the UPDATE is fine) but drop it.
                    tracing::warn!(peer = %self.cfg.peer_addr, "UPDATE dropped: {e}");
                    saw_update = true;
                }
                Err(e) => {
                    self.flush_updates(&mut batch).await;
                    let (code, subcode, data) = e.notification();
                    let peer = self.cfg.peer_addr;
                    let t = frame.get(18).copied().unwrap_or(0);
                    if t == 2 && !e.is_header_error() {
                        log_malformed(peer, &e, &frame);
                    }
                    let (ev, what): (fn(ConnId, MessageError) -> Event, &str) =
                        if e.is_header_error() {
                            (Event::BgpHeaderErr, "message")
                        } else if t == 1 {
                            (Event::BgpOpenMsgErr, "OPEN")
                        } else if t == 2 {
                            (Event::UpdateMsgErr, "UPDATE")
                        } else {
                            (Event::BgpHeaderErr, "message")
                        };
                    let err = MessageError {
                        notification: Notification {
                            code,
                            subcode,
                            data,
                        },
                        reason: format!("{what} from {peer}: {e}"),
                    };
                    self.feed(ev(id, err)).await;
                }
            }
        }
        self.flush_updates(&mut batch).await;
        if saw_update && self.session.main_conn() == Some(id) {
            // One hold timer restart per batch is enough (RFC 4271 8.2.2 Established + Event 27).
            self.feed(Event::UpdateMsg(id)).await;
        }
    }

    fn count_prefixes(&mut self, u: &Update) {
        let a = &u.attributes;
        self.counters.prefixes_in +=
            (u.nlri.len() + a.mp_reach.as_ref().map_or(0, |m| m.nlri.len())) as u64;
        self.counters.withdrawals_in +=
            (u.withdrawn.len() + a.mp_unreach.as_ref().map_or(0, |m| m.withdrawn.len())) as u64;
    }

    async fn flush_updates(&mut self, batch: &mut Vec<Update>) {
        if batch.is_empty() {
            return;
        }
        let updates = std::mem::take(batch);
        if let Some(peer) = self.rib.as_ref().map(|l| l.peer) {
            for u in updates {
                if let Some(input) = RibInput::from_received(peer, u) {
                    self.to_rib(input).await;
                }
            }
            return;
        }
        let ev = SessionEvent::Updates {
            peer: self.cfg.peer_addr,
            session: self.session_id,
            updates,
        };
        // No speaker: the daemon is stopping.
        let _ = self.events.send(ev).await;
    }

    // ----- commands -----

    async fn command(&mut self, c: PeerCommand) {
        match c {
            PeerCommand::SendUpdates { session, bytes } => {
                self.send_data(session, vec![bytes]).await
            }
            PeerCommand::SendUpdateList { session, updates } => {
                let mut buf = BytesMut::new();
                for u in &updates {
                    if let Err(e) = encode(&Message::Update(u.clone()), &self.encode_ctx, &mut buf)
                    {
                        tracing::error!(peer = %self.cfg.peer_addr, "UPDATE not sent: {e}");
                    }
                }
                self.send_data(session, vec![buf.freeze()]).await;
            }
            PeerCommand::SendEndOfRib { session, family } => {
                let mut buf = BytesMut::new();
                let eor = Message::Update(Update::end_of_rib_for(family));
                match encode(&eor, &self.encode_ctx, &mut buf) {
                    Ok(()) => self.send_data(session, vec![buf.freeze()]).await,
                    Err(e) => {
                        tracing::error!(peer = %self.cfg.peer_addr, "End-of-RIB for {}: {e}", family_text(family))
                    }
                }
            }
            PeerCommand::SendRouteRefresh { session, family } => {
                let ok = session == self.session_id
                    && self.session.state() == State::Established
                    && self.session.negotiated().is_some_and(|n| n.route_refresh);
                if let (true, Some(id)) = (ok, self.session.main_conn()) {
                    let rr = crate::bgp::wire::RouteRefresh { family, subtype: 0 };
                    self.send_control(id, &Message::RouteRefresh(rr));
                }
            }
            PeerCommand::Stop => self.feed(Event::ManualStop).await,
            PeerCommand::Start => self.feed(Event::ManualStart).await,
            PeerCommand::BfdDown { reason } => self.feed(Event::BfdDown { reason }).await,
            PeerCommand::Reconfigure(new) => {
                if *new == self.cfg {
                    return;
                }
                let was_running = self.session.state() != State::Idle
                    || self.timers[timer_index(Timer::IdleHold)].is_some();
                self.feed(Event::AutomaticStop {
                    cease_subcode: super::open::code::CEASE_OTHER_CONFIG_CHANGE,
                })
                .await;
                if let Some(l) = &self.listener {
                    if new.password != self.cfg.password || new.peer_addr != self.cfg.peer_addr {
                        l.unregister(self.cfg.peer_addr);
                        if let Err(e) = l
                            .register(new.peer_addr, new.password.clone(), self.inbox())
                            .await
                        {
                            self.last_error = Some(e.to_string());
                        }
                    }
                }
                self.cfg = *new;
                let mut session_cfg = self.cfg.clone();
                if self.counters.established > 0 {
                    // The restart this task announced is over (see the FSM's Established).
                    if let Some(gr) = session_cfg.graceful_restart.as_mut() {
                        gr.restarting = false;
                    }
                }
                self.session = Session::new(session_cfg);
                if was_running {
                    self.feed(Event::ManualStart).await;
                }
            }
        }
    }

    /// Queue pre-encoded UPDATEs (pieces written back to back) on the Established connection of
    /// `session`; dropped otherwise.
    async fn send_data(&mut self, session: SessionId, pieces: Vec<Bytes>) {
        if session != self.session_id || self.session.state() != State::Established {
            return;
        }
        let pieces: Vec<Bytes> = pieces.into_iter().filter(|b| !b.is_empty()).collect();
        if pieces.is_empty() {
            return;
        }
        if self.main_conn().is_none() {
            return;
        }
        for b in &pieces {
            let n = count_messages(b);
            self.counters.updates_out += n;
            self.counters.messages_out += n;
            self.counters.update_bytes_out += b.len() as u64;
        }
        let Some(c) = self.main_conn() else { return };
        // The select loop only takes commands and RIB output when there is room, so this rarely waits. A
        // writer that is gone reports the connection's end through `Internal::Closed`.
        c.queue.data(pieces, &*c.wr).await;
    }

    /// Encode one batch of the RIB's output (`first` and what else waits) and queue it.
    async fn rib_output(&mut self, first: RibOutput) {
        let Some(out) = self.rib_out.as_mut() else {
            return;
        };
        let batch = out.batch(self.cfg.peer_addr, first);
        let direct = out.direct.clone();
        self.send_data(self.session_id, batch.pieces).await;
        if let Some(d) = direct {
            d.taken(batch.taken);
        }
        if batch.max_prefix_exceeded.is_some() {
            self.feed(Event::ManualStop).await;
        }
    }
}

/// The next item of an optional receiver; never, without one.
async fn recv_some<T>(rx: Option<&mut chan::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// The routes of `u` whose next hop is `local`, our own address on the session (RFC 4271 6.3 semantic
/// check (a)), taken out of `u`, per family.
fn own_next_hop(
    u: &mut Update,
    local: Option<IpAddr>,
) -> Vec<(Family, Vec<crate::bgp::wire::Nlri>)> {
    let Some(local) = local else {
        return Vec::new();
    };
    let mut out = Vec::new();
    if !u.nlri.is_empty() && u.attributes.next_hop.map(IpAddr::V4) == Some(local) {
        out.push((Family::IPV4_UNICAST, std::mem::take(&mut u.nlri)));
    }
    if let Some(r) = u.attributes.mp_reach.as_mut() {
        if !r.nlri.is_empty() && r.next_hop.first().map(|a| a.to_canonical()) == Some(local) {
            out.push((r.family, std::mem::take(&mut r.nlri)));
        }
    }
    out
}

/// RFC 7606 6: a malformed UPDATE is logged with the prefixes involved and the whole message, so the
/// cause can be traced to the router that built it.
fn log_malformed(peer: IpAddr, e: &crate::bgp::wire::DecodeError, frame: &[u8]) {
    let prefixes: Vec<String> = e
        .withdrawals()
        .unwrap_or_default()
        .iter()
        .flat_map(|(_, v)| v.iter().map(|n| n.prefix.to_string()))
        .collect();
    tracing::warn!(%peer, action = ?e.action(), ?prefixes, update = %hex::encode(frame), "malformed UPDATE: {e}");
}

fn withdraw_update(family: Family, nlri: Vec<crate::bgp::wire::Nlri>) -> Update {
    if family == Family::IPV4_UNICAST {
        Update {
            withdrawn: nlri,
            ..Default::default()
        }
    } else {
        Update {
            attributes: PathAttributes {
                mp_unreach: Some(MpUnreach {
                    family,
                    withdrawn: nlri,
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }
}

/// Messages in a buffer of whole, back-to-back BGP messages.
fn count_messages(mut b: &[u8]) -> u64 {
    let mut n = 0;
    while b.len() >= HEADER_LEN {
        let len = usize::from(u16::from_be_bytes([b[16], b[17]]));
        if len < HEADER_LEN || len > b.len() {
            break;
        }
        b = &b[len..];
        n += 1;
    }
    n
}

/// Open the TCP connection to the peer with its source address, MD5 key and TTL settings.
async fn connect(cfg: &PeerConfig) -> io::Result<TcpStream> {
    let dest = SocketAddr::new(cfg.peer_addr, cfg.peer_port);
    let v6 = dest.is_ipv6();
    let sock = if v6 {
        TcpSocket::new_v6()?
    } else {
        TcpSocket::new_v4()?
    };
    if let Some(src) = cfg.source_addr {
        sock.bind(SocketAddr::new(src, 0)).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("bind source address {src}: {}", sockopt::io_text(&e)),
            )
        })?;
    }
    if let Some(p) = &cfg.password {
        sockopt::set_md5(&sock, v6, cfg.peer_addr, Some(p.0.as_bytes())).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("set TCP MD5 password: {}", sockopt::io_text(&e)),
            )
        })?;
    }
    sockopt::apply_ttl(&sock, v6, cfg.ttl, cfg.ttl_security_hops)?;
    sock.connect(dest).await
}

thread_local! {
    /// The read buffer of the worker thread: every reader on the thread reads into it and copies the
    /// whole messages out before it awaits again, so no session holds a buffer while it waits for data.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// What one read produced.
enum ReadOutcome {
    /// Whole messages (possibly none), and a framing error after them.
    Frames(Vec<Bytes>, Option<DecodeError>),
    Closed(String),
    /// Nothing to read after all (readiness was spurious).
    WouldBlock,
}

/// Read what the socket has, split it into whole messages, pass each read's messages on as one batch.
///
/// A session waiting for data holds no buffer: the reader waits for readiness, then reads into its worker
/// thread's buffer ([`READ_CHUNK`], large, so a table dump arrives in few large batches) and copies the
/// whole messages out into one allocation of their own before it awaits again. Only the incomplete message
/// at the end of a read, if any, is kept with the session until the rest arrives (a thousand idle sessions
/// hold nothing; a frame the RIB still holds pins only its own batch).
async fn reader(
    id: ConnId,
    rd: OwnedReadHalf,
    extended: Arc<AtomicBool>,
    tx: chan::Sender<Internal>,
) {
    // The start of a message whose end has not arrived yet; empty between messages.
    let mut partial: Vec<u8> = Vec::new();
    loop {
        let outcome = match rd.readable().await {
            Err(e) => ReadOutcome::Closed(sockopt::io_text(&e)),
            Ok(()) => {
                // The negotiated maximum, not the largest any session may use: a header announcing more
                // than this session allows is a Bad Message Length now, not after waiting for a body that
                // may never come.
                let ctx = DecodeCtx {
                    extended_message: extended.load(Ordering::Relaxed),
                    ..Default::default()
                };
                READ_BUF.with(|b| read_frames(&rd, &mut b.borrow_mut(), &mut partial, &ctx))
            }
        };
        match outcome {
            ReadOutcome::WouldBlock => {}
            ReadOutcome::Closed(reason) => {
                // Reader to its peer task: a closed channel means the task (and its interest) is gone.
                let _ = tx.send(Internal::Closed(id, reason)).await;
                return;
            }
            ReadOutcome::Frames(frames, error) => {
                if let Some(e) = error {
                    // As above: no peer task, nobody to tell (both sends).
                    if !frames.is_empty() {
                        let _ = tx.send(Internal::Frames(id, frames)).await;
                    }
                    let _ = tx.send(Internal::HeaderError(id, Box::new(e))).await;
                    return;
                }
                if !frames.is_empty() && tx.send(Internal::Frames(id, frames)).await.is_err() {
                    return;
                }
            }
        }
    }
}

/// One read into `buf` (the thread's buffer), framed together with the `partial` message kept from the
/// read before. Whole messages are copied out; an incomplete one at the end goes back into `partial`.
fn read_frames(
    rd: &OwnedReadHalf,
    buf: &mut Vec<u8>,
    partial: &mut Vec<u8>,
    ctx: &DecodeCtx,
) -> ReadOutcome {
    if buf.len() < READ_CHUNK {
        // Zeroed by the allocator (fresh pages stay untouched until a read fills them), not written here.
        *buf = vec![0; READ_CHUNK];
    }
    let r = match rd.try_read(buf) {
        Ok(0) => return ReadOutcome::Closed("connection closed by peer".into()),
        Ok(r) => r,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => return ReadOutcome::WouldBlock,
        Err(e) => return ReadOutcome::Closed(sockopt::io_text(&e)),
    };
    let data: &[u8] = if partial.is_empty() {
        &buf[..r]
    } else {
        partial.extend_from_slice(&buf[..r]);
        partial
    };
    let mut ends = Vec::new();
    let mut off = 0usize;
    let mut error = None;
    loop {
        match ctx.peek_len(&data[off..]) {
            Ok(Some(l)) if data.len() - off >= l => {
                off += l;
                ends.push(off);
            }
            Ok(_) => break,
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }
    let mut frames = Vec::with_capacity(ends.len());
    if off > 0 {
        let whole = Bytes::copy_from_slice(&data[..off]);
        let mut start = 0;
        for end in ends {
            frames.push(whole.slice(start..end));
            start = end;
        }
    }
    if error.is_none() {
        let rest = data.len() - off;
        if partial.is_empty() {
            partial.extend_from_slice(&buf[off..r]);
        } else if rest == 0 {
            // Give the memory back: a quiet session keeps nothing.
            *partial = Vec::new();
        } else {
            partial.drain(..off);
        }
    }
    ReadOutcome::Frames(frames, error)
}

/// Write control messages first, then UPDATE data, until the close (by then everything queued has
/// been written: the queue hands out the close last). The socket is shut for writing when the last of
/// the writer and the connection's owner drops its write half.
async fn writer(
    id: ConnId,
    wr: Arc<OwnedWriteHalf>,
    queue: Arc<WriteQueue>,
    tx: chan::Sender<Internal>,
) {
    loop {
        let r = match queue.next().await {
            Write::Control(b) => write_pieces(&wr, vec![b]).await,
            Write::Data(pieces) => write_pieces(&wr, pieces).await,
            Write::Close => return,
        };
        if let Err(e) = r {
            // Writer to its peer task: no peer task, nobody to tell.
            let _ = tx
                .send(Internal::Closed(
                    id,
                    format!("write: {}", sockopt::io_text(&e)),
                ))
                .await;
            return;
        }
    }
}

/// Write `pieces` back to back, as many at a time as one vectored write takes, waiting for room in the
/// socket.
async fn write_pieces(wr: &OwnedWriteHalf, pieces: Vec<Bytes>) -> io::Result<()> {
    let mut pieces = VecDeque::from(pieces);
    while !pieces.is_empty() {
        match write_some(wr, &mut pieces) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => wr.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn keepalive() -> Vec<u8> {
        let mut b = BytesMut::new();
        encode(&Message::Keepalive, &EncodeCtx::default(), &mut b).expect("encode KEEPALIVE");
        b.to_vec()
    }

    /// A socket that takes at most `room` more bytes, and records them.
    #[derive(Default)]
    struct FakeSocket {
        room: std::cell::Cell<usize>,
        took: RefCell<Vec<u8>>,
    }

    impl TryWrite for FakeSocket {
        fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.room.get());
                if take == 0 {
                    break;
                }
                self.took.borrow_mut().extend_from_slice(&b[..take]);
                self.room.set(self.room.get() - take);
                n += take;
            }
            if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            Ok(n)
        }
    }

    #[tokio::test]
    async fn write_queue_sends_control_first_and_bounds_data() {
        let q = WriteQueue::default();
        let full = FakeSocket::default();
        let piece = |i: u8| Bytes::from(vec![i; DATA_QUEUE_BYTES / 4]);
        for i in 0..4 {
            q.data(vec![piece(i)], &full).await;
        }
        assert!(!q.has_room(), "{DATA_QUEUE_BYTES} bytes fill the queue");
        q.control(Bytes::from_static(b"ka"));
        match q.next().await {
            Write::Control(b) => assert_eq!(&b[..], b"ka", "control leaves before queued data"),
            _ => panic!("expected the control message"),
        }
        // Data waits for room, and gets in once the writer took what was queued.
        let waiting = q.data(
            vec![Bytes::from_static(b"late"), Bytes::from_static(b"r")],
            &full,
        );
        tokio::pin!(waiting);
        assert!(
            futures::poll!(waiting.as_mut()).is_pending(),
            "no room: the data waits"
        );
        match q.next().await {
            Write::Data(p) => {
                assert_eq!(p.len(), 4, "the writer takes every queued piece");
                assert!(
                    p.iter().enumerate().all(|(i, b)| b[0] == i as u8),
                    "in order"
                );
            }
            _ => panic!("expected data"),
        }
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("room after the writer took the data");
        assert!(q.has_room());
        q.close();
        let mut seen = Vec::new();
        loop {
            match q.next().await {
                Write::Data(p) => seen.extend(p),
                Write::Control(_) => panic!("no control was queued"),
                Write::Close => break,
            }
        }
        assert_eq!(
            seen,
            [&b"late"[..], &b"r"[..]],
            "what was queued is flushed before the close"
        );
        q.data(vec![Bytes::from_static(b"after")], &full).await;
        assert!(
            matches!(q.next().await, Write::Close),
            "nothing is queued after the close"
        );
    }

    /// The peer task writes itself only when nothing is queued and the writer holds nothing; what the
    /// socket does not take is queued whole and in order, after which the writer writes.
    #[tokio::test]
    async fn data_is_written_at_once_only_when_the_writer_is_idle() {
        let q = WriteQueue::default();
        let sock = FakeSocket::default();
        sock.room.set(5);
        q.data(
            vec![Bytes::from_static(b"abc"), Bytes::from_static(b"defg")],
            &sock,
        )
        .await;
        assert_eq!(
            &sock.took.borrow()[..],
            b"abcde",
            "the socket took what it had room for"
        );
        match q.next().await {
            Write::Data(p) => assert_eq!(p, [&b"fg"[..]], "the rest waits for the writer"),
            _ => panic!("expected the rest of the data"),
        }
        // The writer is busy with what it took: new data queues behind it, although the socket has room.
        sock.room.set(100);
        q.data(vec![Bytes::from_static(b"h")], &sock).await;
        assert_eq!(
            &sock.took.borrow()[..],
            b"abcde",
            "nothing written past the writer"
        );
        match q.next().await {
            Write::Data(p) => assert_eq!(p, [&b"h"[..]]),
            _ => panic!("expected the queued data"),
        }
        // A control message waiting for the writer goes first, too.
        let idle = q.next();
        tokio::pin!(idle);
        assert!(futures::poll!(idle.as_mut()).is_pending(), "nothing queued");
        q.control(Bytes::from_static(b"ka"));
        q.data(vec![Bytes::from_static(b"i")], &sock).await;
        assert_eq!(
            &sock.took.borrow()[..],
            b"abcde",
            "data waits behind control"
        );
        assert!(matches!(idle.await, Write::Control(b) if &b[..] == b"ka"));
        assert!(matches!(q.next().await, Write::Data(p) if p == [&b"i"[..]]));
        // Idle writer (waiting in `next`), nothing queued: written at once, nothing left for the writer.
        let idle = q.next();
        tokio::pin!(idle);
        assert!(futures::poll!(idle.as_mut()).is_pending(), "nothing queued");
        q.data(vec![Bytes::from_static(b"jk")], &sock).await;
        assert_eq!(&sock.took.borrow()[..], b"abcdejk");
        q.close();
        assert!(
            matches!(idle.await, Write::Close),
            "the direct write queued nothing"
        );
    }

    /// The RIB's raw write reaches the peer, and a full socket says "would block" (the writer's case),
    /// not an error that would end the session.
    #[tokio::test]
    async fn the_rib_raw_write_reaches_the_peer_and_would_block_when_full() {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) =
            tokio::join!(tokio::net::TcpStream::connect(addr), listener.accept());
        let (mut peer, _) = accepted.unwrap();
        let (_rd, wr) = client.unwrap().into_split();
        let sock = RawSock::new(std::os::fd::AsRawFd::as_raw_fd(wr.as_ref()), &wr);
        assert_eq!(sock.try_write(b"hello").unwrap(), 5);
        let mut got = [0u8; 5];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Nobody reads now: the socket fills, and then the write would block.
        let chunk = vec![0u8; 1 << 16];
        let mut full = None;
        for _ in 0..10_000 {
            match sock.try_write(&chunk) {
                Ok(_) => {}
                Err(e) => {
                    full = Some(e.kind());
                    break;
                }
            }
        }
        assert_eq!(full, Some(io::ErrorKind::WouldBlock));
    }

    /// The RIB queues its own output ([`WriteQueue::try_queue`]) only when nothing is queued and the
    /// writer holds nothing; [`WriteQueue::flush`] writes it, leaving what the socket does not take to the
    /// writer; a closing queue drops it.
    #[tokio::test]
    async fn the_rib_queues_only_behind_nothing_and_flushes() {
        let q = WriteQueue::default();
        let sock = FakeSocket::default();
        sock.room.set(1);
        assert_eq!(q.try_queue(&Bytes::from_static(b"ab")), Some(Taken::Queued));
        assert_eq!(q.try_queue(&Bytes::from_static(b"c")), None, "ab is queued");
        q.flush(&sock);
        assert_eq!(&sock.took.borrow()[..], b"a");
        // The rest is the writer's.
        sock.room.set(100);
        match q.next().await {
            Write::Data(p) => assert_eq!(p, [&b"b"[..]]),
            _ => panic!("expected the rest of the data"),
        }
        assert_eq!(
            q.try_queue(&Bytes::from_static(b"c")),
            None,
            "the writer holds b"
        );
        // The writer is done (back in `next`): idle again.
        let idle = q.next();
        tokio::pin!(idle);
        assert!(futures::poll!(idle.as_mut()).is_pending(), "nothing queued");
        q.control(Bytes::from_static(b"ka"));
        assert_eq!(
            q.try_queue(&Bytes::from_static(b"c")),
            None,
            "a control message waits"
        );
        assert!(matches!(idle.await, Write::Control(_)));
        let idle = q.next();
        tokio::pin!(idle);
        assert!(futures::poll!(idle.as_mut()).is_pending(), "nothing queued");
        assert_eq!(q.try_queue(&Bytes::from_static(b"cd")), Some(Taken::Queued));
        // Queued, not written, until flushed.
        assert_eq!(&sock.took.borrow()[..], b"a");
        q.flush(&sock);
        assert_eq!(&sock.took.borrow()[..], b"acd");
        q.close();
        assert_eq!(q.try_queue(&Bytes::from_static(b"e")), Some(Taken::Dropped));
        assert!(matches!(idle.await, Write::Close), "nothing queued");
        assert_eq!(&sock.took.borrow()[..], b"acd");
    }

    /// Pieces written vectored arrive whole and in order, also when the socket takes them in parts.
    #[tokio::test]
    async fn writer_writes_pieces_back_to_back() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (mut server, _) = l.accept().await.expect("accept");
        let (_rd, wr) = client.into_split();
        // More than a socket buffer, in pieces of many sizes, so writes end inside pieces.
        let pieces: Vec<Bytes> = (0..3000u32)
            .map(|i| Bytes::from(vec![(i % 251) as u8; (i as usize * 37) % 3000 + 1]))
            .collect();
        let want: Vec<u8> = pieces.iter().flat_map(|b| b.iter().copied()).collect();
        let writing = tokio::spawn(async move {
            write_pieces(&wr, pieces).await.expect("write");
            wr
        });
        let mut got = vec![0u8; want.len()];
        tokio::io::AsyncReadExt::read_exact(&mut server, &mut got)
            .await
            .expect("read");
        writing.await.expect("writer");
        assert!(got == want, "the bytes arrive as queued");
    }

    /// Messages split across reads (and several in one read) come out whole and in order, and a quiet
    /// connection keeps no partial buffer.
    #[tokio::test]
    async fn reader_frames_messages_split_across_reads() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let mut client = TcpStream::connect(addr).await.expect("connect");
        let (server, _) = l.accept().await.expect("accept");
        let (rd, _wr) = server.into_split();
        let (tx, mut rx) = chan::channel(64);
        let _reader = AbortOnDrop(tokio::spawn(reader(
            7,
            rd,
            Arc::new(AtomicBool::new(false)),
            tx,
        )));
        let ka = keepalive();
        let mut stream: Vec<u8> = Vec::new();
        for _ in 0..3 {
            stream.extend_from_slice(&ka);
        }
        // 1.5 messages, then the rest of the second and the third.
        client
            .write_all(&stream[..ka.len() + 10])
            .await
            .expect("write");
        client.flush().await.expect("flush");
        tokio::time::sleep(Duration::from_millis(50)).await;
        client
            .write_all(&stream[ka.len() + 10..])
            .await
            .expect("write");
        let mut frames = Vec::new();
        while frames.len() < 3 {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(Internal::Frames(7, f))) => frames.extend(f),
                _ => panic!("expected frames, got {} so far", frames.len()),
            }
        }
        assert!(frames.iter().all(|f| f[..] == ka[..]), "whole KEEPALIVEs");
        drop(client);
        match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
            Ok(Some(Internal::Closed(7, reason))) => assert!(reason.contains("closed"), "{reason}"),
            _ => panic!("expected the close to be reported"),
        }
    }

    /// Every session has a channel of these: a large variant would cost each item queued by each of a
    /// reflector's thousands of sessions its size.
    #[test]
    fn per_session_sizes_stay_small() {
        assert!(
            std::mem::size_of::<Internal>() <= 40,
            "Internal is {} bytes, and so is every item in a session's channel of them",
            std::mem::size_of::<Internal>()
        );
    }
}
