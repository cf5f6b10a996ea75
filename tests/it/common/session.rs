//! Waiting on a BGP peer task in the session tests (`session_interop`, `session_malformed`): its events,
//! its status, and a passive listener on loopback for scripted peers to connect to.

use std::net::SocketAddr;
use std::time::Duration;

use margay::bgp::session::{Listener, Negotiated, PeerHandle, PeerStatus, SessionEvent, SessionId};
use tokio::sync::mpsc;

/// How long a wait may take before the test fails (generous: daemons start in the same time).
pub const LIMIT: Duration = Duration::from_secs(60);

/// The next event matching `pred`, skipping (and dropping) the others.
pub async fn next_matching(
    rx: &mut mpsc::Receiver<SessionEvent>,
    what: &str,
    pred: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    loop {
        let ev = tokio::time::timeout(LIMIT, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("no {what} within {LIMIT:?}"))
            .expect("events channel open");
        if pred(&ev) {
            return ev;
        }
    }
}

/// The first event matching `pred`, from `seen` (events received earlier) or from `rx`; the events
/// received meanwhile that do not match are kept in `seen` for a later wait.
pub async fn expect_event(
    rx: &mut mpsc::Receiver<SessionEvent>,
    seen: &mut Vec<SessionEvent>,
    what: &str,
    pred: impl Fn(&SessionEvent) -> bool,
) -> SessionEvent {
    if let Some(i) = seen.iter().position(&pred) {
        return seen.remove(i);
    }
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(ev)) => seen.push(ev),
            Ok(None) => panic!("event channel closed while waiting for {what}; seen: {seen:#?}"),
            Err(_) => panic!("no {what} within {LIMIT:?}; seen: {seen:#?}"),
        }
    }
}

/// Wait until the peer's status satisfies `pred`.
pub async fn status_until(h: &PeerHandle, what: &str, pred: impl Fn(&PeerStatus) -> bool) {
    // The status is published, not announced: look every few milliseconds.
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !pred(&h.status()) {
        if tokio::time::Instant::now() >= deadline {
            panic!(
                "peer {} never reached {what}; status: {:#?}",
                h.peer(),
                h.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A listener for passive peers on 127.0.0.1 (a free port) and its address.
pub async fn loopback_listener() -> (Listener, SocketAddr) {
    let listener = Listener::bind(&[SocketAddr::from(([127, 0, 0, 1], 0))])
        .await
        .expect("listener");
    let addr = listener.local_addrs()[0];
    (listener, addr)
}

/// The next Established event ([`expect_event`]): its session id and what was negotiated.
pub async fn established(
    rx: &mut mpsc::Receiver<SessionEvent>,
    seen: &mut Vec<SessionEvent>,
    what: &str,
) -> (SessionId, Box<Negotiated>) {
    match expect_event(rx, seen, what, |e| {
        matches!(e, SessionEvent::Established { .. })
    })
    .await
    {
        SessionEvent::Established {
            session,
            negotiated,
            ..
        } => (session, negotiated),
        other => unreachable!("expect_event returned {other:?}"),
    }
}

/// The next Established event ([`next_matching`]): its session id and what was negotiated.
pub async fn next_established(
    rx: &mut mpsc::Receiver<SessionEvent>,
    what: &str,
) -> (SessionId, Box<Negotiated>) {
    match next_matching(rx, what, |e| matches!(e, SessionEvent::Established { .. })).await {
        SessionEvent::Established {
            session,
            negotiated,
            ..
        } => (session, negotiated),
        other => unreachable!("next_matching returned {other:?}"),
    }
}

/// Poll `read` (a daemon's CLI, e.g. `birdc show protocols`) until its output satisfies `ok`, letting
/// margay's tasks run meanwhile; the output that did.
pub async fn output_until(
    what: &str,
    mut read: impl FnMut() -> String,
    ok: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        last = read();
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("gave up waiting for {what}; last seen:\n{last}");
}
