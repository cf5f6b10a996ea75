//! The FIB task itself: its inbox, the writer thread, and the loop that reconciles desired and kernel routes.

#[allow(unused_imports)]
use super::*;

/// The writer thread: one `sendmsg` per chunk, then its acks, in order.
pub(super) fn writer_loop(
    sock: &mut NlSocket,
    rx: std::sync::mpsc::Receiver<Chunk>,
    tx: std::sync::mpsc::Sender<ChunkResult>,
) {
    for chunk in rx {
        let mut errors = Vec::new();
        let r = sock.send_and_ack(&chunk.bytes, chunk.count, |seq, err| {
            if let Some(e) = err {
                errors.push((seq.wrapping_sub(chunk.first_seq) as usize, e));
            }
        });
        let failed = r.is_err();
        if tx.send(r.map(|()| errors)).is_err() || failed {
            return;
        }
    }
}

/// Apply `reqs` and bring the kernel to the desired state. Runs on a blocking thread.
pub(super) fn process(
    state: &mut State,
    socks: &mut Sockets,
    reqs: Vec<FibRequest>,
    replies: &mut Vec<Reply>,
) -> Result<(), DataplaneError> {
    state.ifindex.clear();
    let volume: usize = state.dirty.len()
        + reqs
            .iter()
            .map(|r| match r {
                FibRequest::Replace(v) | FibRequest::Sync(v) => v.len(),
                FibRequest::Remove(v) => v.len(),
                _ => 0,
            })
            .sum::<usize>();
    let Sockets { writer, query } = socks;
    let io_error = if volume > state.cfg.batch {
        std::thread::scope(|s| {
            // Two chunks queued ahead of the writer are enough to keep the kernel busy.
            let (ctx, crx) = std::sync::mpsc::sync_channel::<Chunk>(2);
            let (rtx, rrx) = std::sync::mpsc::channel::<ChunkResult>();
            let w: &mut NlSocket = writer;
            s.spawn(move || writer_loop(w, crx, rtx));
            let mut pump = Pump::new(
                Lane::Threaded {
                    tx: Some(ctx),
                    rx: rrx,
                },
                state.cfg.batch,
            );
            for req in reqs {
                state.apply(query, req, replies, &mut pump);
            }
            pump.finish(state)
        })
    } else {
        let mut pump = Pump::new(Lane::Direct(writer), state.cfg.batch);
        for req in reqs {
            state.apply(query, req, replies, &mut pump);
        }
        pump.finish(state)
    };
    if let Some(e) = io_error {
        // A write failed part-way: we no longer know what the kernel holds. Re-read it and write again.
        tracing::error!(netns = %state.netns, error = %e, "netlink write failed; re-reading our routes");
        state.resync(query)?;
        let mut pump = Pump::new(Lane::Direct(writer), state.cfg.batch);
        if let Some(e) = pump.finish(state) {
            tracing::error!(netns = %state.netns, error = %e, "netlink write failed again; will retry");
        }
    }
    Ok(())
}

pub(super) async fn run(
    mut state: State,
    mut socks: Sockets,
    monitor: AsyncFd<Socket>,
    mut rx: mpsc::Receiver<FibRequest>,
) {
    let mut buf = vec![0u8; 1 << 20];
    let mut retry = tokio::time::interval(state.cfg.retry);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let portid = socks.writer.portid();
    loop {
        let mut reqs = Vec::new();
        tokio::select! {
            req = rx.recv() => {
                let Some(req) = req else { break };
                reqs.push(req);
                // Take whatever else is already queued so one pass covers it.
                while let Ok(req) = rx.try_recv() {
                    reqs.push(req);
                }
            }
            ready = monitor.readable() => {
                let Ok(mut guard) = ready else { break };
                loop {
                    match recv_into(guard.get_inner().as_raw_fd(), &mut buf, libc::MSG_DONTWAIT) {
                        Ok(0) => break,
                        Ok(n) => {
                            for (sender, msg) in decode_all(&buf[..n]) {
                                if sender != portid {
                                    state.on_event(sender, msg);
                                }
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            guard.clear_ready();
                            break;
                        }
                        Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                            tracing::warn!(netns = %state.netns, "route notifications overflowed; re-reading our routes");
                            if let Err(e) = state.resync(&mut socks.query) {
                                tracing::error!(netns = %state.netns, error = %e, "re-reading routes failed");
                            }
                        }
                        Err(e) => {
                            tracing::error!(netns = %state.netns, error = %e, "route notification socket failed");
                            guard.clear_ready();
                            break;
                        }
                    }
                }
            }
            _ = retry.tick() => {
                let again: Vec<IpNetwork> = state.failed.keys().chain(state.conflicts.keys()).copied().collect();
                for p in again {
                    if state.routes.get(&p).map(|e| e.desired.is_some()).unwrap_or(false) {
                        state.mark_prefix(p);
                    }
                }
                // Routes whose device was missing: try them again (the device may exist now).
                let retry_unresolved: Vec<Route> = state.unresolved.values().cloned().collect();
                if !retry_unresolved.is_empty() {
                    reqs.push(FibRequest::Replace(retry_unresolved));
                }
            }
        }
        if reqs.is_empty() && state.dirty.is_empty() && state.strays.is_empty() {
            continue;
        }
        let netns = state.netns.clone();
        let joined = tokio::task::spawn_blocking(move || {
            let mut replies = Vec::new();
            let r = process(&mut state, &mut socks, reqs, &mut replies);
            (state, socks, replies, r)
        })
        .await;
        let replies = match joined {
            Ok((s, k, replies, r)) => {
                state = s;
                socks = k;
                if let Err(e) = r {
                    tracing::error!(%netns, error = %e, "FIB task stops");
                    return;
                }
                replies
            }
            Err(e) => {
                tracing::error!(%netns, error = %e, "FIB task stops");
                return;
            }
        };
        for r in replies {
            match r {
                // A dropped receiver only means the asker went away.
                Reply::Settle(tx) => {
                    let _ = tx.send(state.status());
                }
                Reply::Desired(tx) => {
                    let _ = tx.send(state.desired_routes());
                }
            }
        }
    }
}
