//! The write pump: dirty prefixes turned into netlink requests, written in chunks by a writer thread
//! while the next chunk is prepared, acks matched by sequence number.

#[allow(unused_imports)]
use super::*;

/// What to do with one dirty prefix.
pub(super) enum Plan {
    Nothing,
    Write(Op),
    /// A write for it is in flight.
    Wait,
}

pub(super) enum Reply {
    Settle(oneshot::Sender<FibStatus>),
    Desired(oneshot::Sender<Vec<Route>>),
}

/// The task's two sockets: `writer` carries route writes (the monitor filters out its port id); `query`
/// does dumps and device lookups, so they never interleave with a write burst's acks.
pub(super) struct Sockets {
    pub(super) writer: NlSocket,
    pub(super) query: NlSocket,
}

/// One chunk of encoded requests for the writer thread.
pub(super) struct Chunk {
    pub(super) bytes: Vec<u8>,
    pub(super) count: usize,
    pub(super) first_seq: u32,
}

/// The writer's answer for one chunk: (index in chunk, error) for each refused request.
pub(super) type ChunkResult = io::Result<Vec<(usize, NlError)>>;

/// Where encoded chunks go: straight to the socket (small work), or to a writer thread so the kernel
/// processes chunk k while chunk k+1 is planned and encoded (bulk work).
pub(super) enum Lane<'a> {
    Direct(&'a mut NlSocket),
    Threaded {
        tx: Option<std::sync::mpsc::SyncSender<Chunk>>,
        rx: std::sync::mpsc::Receiver<ChunkResult>,
    },
}

/// Turns dirty prefixes into kernel writes, `batch` requests per write, and records the answers.
pub(super) struct Pump<'a> {
    pub(super) lane: Lane<'a>,
    pub(super) batch: usize,
    pub(super) seq: u32,
    pub(super) inflight: std::collections::VecDeque<Vec<Op>>,
    pub(super) io_error: Option<io::Error>,
}

pub(super) fn op_prefix(op: &Op) -> IpNetwork {
    match op {
        Op::Create(r) | Op::Replace(r) => r.prefix,
        Op::Delete(p, _) => *p,
    }
}

impl<'a> Pump<'a> {
    pub(super) fn new(lane: Lane<'a>, batch: usize) -> Pump<'a> {
        Pump {
            lane,
            batch: batch.max(1),
            // Sequence numbers only need to be unique per chunk; start high to stay clear of the
            // socket's own synchronous requests in logs.
            seq: 0x4000_0000,
            inflight: Default::default(),
            io_error: None,
        }
    }

    /// Plan every dirty prefix, encode and send the writes, `batch` per write.
    pub(super) fn send_dirty(&mut self, state: &mut State) {
        while !state.dirty.is_empty() {
            let dirty = std::mem::take(&mut state.dirty);
            let mut waiting = Vec::new();
            let mut ops = Vec::with_capacity(self.batch.min(dirty.len()));
            let mut bytes = Vec::with_capacity(self.batch.min(dirty.len()) * 80);
            let mut first_seq = self.seq.wrapping_add(1);
            for p in dirty {
                match state.plan_one(p) {
                    Plan::Nothing => {}
                    Plan::Wait => waiting.push(p),
                    Plan::Write(op) => {
                        self.seq = self.seq.wrapping_add(1);
                        encode_op(&state.cfg, &op, self.seq, &mut bytes);
                        ops.push(op);
                        if ops.len() >= self.batch {
                            let next = self.seq.wrapping_add(1);
                            self.push(
                                std::mem::take(&mut ops),
                                std::mem::take(&mut bytes),
                                first_seq,
                                state,
                            );
                            first_seq = next;
                        }
                    }
                }
            }
            if !ops.is_empty() {
                self.push(ops, bytes, first_seq, state);
            }
            if waiting.is_empty() {
                break;
            }
            // Prefixes whose earlier write is still in flight: take the answers, then plan them again.
            self.wait_all(state);
            state.dirty.extend(waiting);
            if self.io_error.is_some() {
                break;
            }
        }
    }

    /// Write one encoded chunk.
    pub(super) fn push(&mut self, ops: Vec<Op>, bytes: Vec<u8>, first_seq: u32, state: &mut State) {
        if self.io_error.is_some() {
            // The socket already failed this round; the caller re-reads the kernel afterwards.
            for op in &ops {
                if let Some(e) = state.routes.get_mut(&op_prefix(op)) {
                    e.inflight = false;
                }
            }
            return;
        }
        state.stats.writes += 1;
        let count = ops.len();
        match &mut self.lane {
            Lane::Direct(sock) => {
                let mut results: Vec<Option<NlError>> = vec![None; count];
                let r = sock.send_and_ack(&bytes, count, |seq, err| {
                    let i = seq.wrapping_sub(first_seq) as usize;
                    if i < count {
                        results[i] = err;
                    }
                });
                match r {
                    Ok(()) => {
                        for (op, res) in ops.iter().zip(results) {
                            state.record(op, res);
                        }
                    }
                    Err(e) => {
                        for op in &ops {
                            if let Some(en) = state.routes.get_mut(&op_prefix(op)) {
                                en.inflight = false;
                            }
                        }
                        self.io_error = Some(e);
                    }
                }
            }
            Lane::Threaded { tx, .. } => {
                let sent = tx.as_ref().map(|tx| {
                    tx.send(Chunk {
                        bytes,
                        count,
                        first_seq,
                    })
                });
                self.inflight.push_back(ops);
                if !matches!(sent, Some(Ok(()))) {
                    self.io_error = Some(io::Error::other("netlink writer thread stopped"));
                }
                self.drain(state, false);
            }
        }
    }

    /// Record the writer's answers: those ready (`wait` false) or all outstanding (`wait` true).
    pub(super) fn drain(&mut self, state: &mut State, wait: bool) {
        let Lane::Threaded { rx, .. } = &self.lane else {
            return;
        };
        while !self.inflight.is_empty() {
            let next = if wait || self.io_error.is_some() {
                rx.recv().ok()
            } else {
                match rx.try_recv() {
                    Ok(r) => Some(r),
                    Err(std::sync::mpsc::TryRecvError::Empty) => return,
                    Err(std::sync::mpsc::TryRecvError::Disconnected) => None,
                }
            };
            let Some(ops) = self.inflight.pop_front() else {
                return;
            };
            match next {
                Some(Ok(errors)) => {
                    let mut results: Vec<Option<NlError>> = vec![None; ops.len()];
                    for (i, e) in errors {
                        if let Some(slot) = results.get_mut(i) {
                            *slot = Some(e);
                        }
                    }
                    for (op, res) in ops.iter().zip(results) {
                        state.record(op, res);
                    }
                }
                other => {
                    for op in &ops {
                        if let Some(e) = state.routes.get_mut(&op_prefix(op)) {
                            e.inflight = false;
                        }
                    }
                    self.io_error = Some(match other {
                        Some(Err(e)) => e,
                        _ => io::Error::other("netlink writer thread stopped"),
                    });
                }
            }
        }
    }

    pub(super) fn wait_all(&mut self, state: &mut State) {
        self.drain(state, true);
    }

    /// Send what is still dirty and the strays, wait for every answer, and stop the writer.
    pub(super) fn finish(&mut self, state: &mut State) -> Option<io::Error> {
        self.send_dirty(state);
        if !state.strays.is_empty() {
            let ops: Vec<Op> = state
                .strays
                .iter()
                .map(|(p, m)| Op::Delete(*p, *m))
                .collect();
            for chunk in ops.chunks(self.batch) {
                let first_seq = self.seq.wrapping_add(1);
                let mut bytes = Vec::new();
                for op in chunk {
                    self.seq = self.seq.wrapping_add(1);
                    encode_op(&state.cfg, op, self.seq, &mut bytes);
                }
                self.push(chunk.to_vec(), bytes, first_seq, state);
            }
        }
        self.wait_all(state);
        if let Lane::Threaded { tx, .. } = &mut self.lane {
            tx.take();
        }
        self.io_error.take()
    }
}
