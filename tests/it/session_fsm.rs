//! The Sans-IO FSM (RFC 4271 8) driven by hand: every state against the events that matter there, OPEN
//! validation and capability negotiation, collision detection (6.8), backoff, graceful restart, and a
//! property that no event sequence panics or breaks the FSM's invariants.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Duration;

use margay::bgp::session::open::{build_open, negotiate};
use margay::bgp::session::{Action, Event, MessageError, PeerConfig, Session, State, Timer};
use margay::bgp::wire::{
    AddPathMode, Capability, Family, GracefulRestartFamily, Notification, Open, AS_TRANS,
};
use proptest::prelude::*;

const PEER: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
const LOCAL_ID: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);

fn cfg() -> PeerConfig {
    PeerConfig::new(PEER, 65000, 65000, LOCAL_ID)
}

/// The OPEN a well-behaved peer with identifier `id` sends.
fn peer_open(asn: u32, id: Ipv4Addr) -> Open {
    Open {
        version: 4,
        my_as: u16::try_from(asn).unwrap_or(AS_TRANS),
        hold_time: 90,
        bgp_id: id,
        capabilities: vec![
            Capability::Multiprotocol(Family::IPV4_UNICAST),
            Capability::Multiprotocol(Family::IPV6_UNICAST),
            Capability::RouteRefresh,
            Capability::FourOctetAs(asn),
            Capability::GracefulRestart {
                restarting: false,
                notification: false,
                restart_time: 120,
                families: vec![GracefulRestartFamily {
                    family: Family::IPV4_UNICAST,
                    forwarding_preserved: true,
                }],
            },
        ],
    }
}

fn has(actions: &[Action], f: impl Fn(&Action) -> bool) -> bool {
    actions.iter().any(f)
}

fn notification_of(actions: &[Action]) -> Option<(u8, u8)> {
    actions.iter().find_map(|a| match a {
        Action::SendNotification(_, n) => Some((n.code, n.subcode)),
        _ => None,
    })
}

fn last_error(actions: &[Action]) -> Option<String> {
    actions.iter().rev().find_map(|a| match a {
        Action::LastError(s) => Some(s.clone()),
        _ => None,
    })
}

/// Drive a fresh session to Established on outbound connection 1.
fn established() -> Session {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    let a = s.handle(Event::KeepAliveMsg(1));
    assert!(has(&a, |a| matches!(a, Action::Established(1, _))), "{a:?}");
    assert_eq!(s.state(), State::Established);
    s
}

// ---------- Idle ----------

#[test]
fn idle_manual_start_connects() {
    let mut s = Session::new(cfg());
    let a = s.handle(Event::ManualStart);
    assert_eq!(s.state(), State::Connect);
    assert!(has(&a, |a| *a == Action::Connect));
    assert!(has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::ConnectRetry, _)
    )));
}

#[test]
fn idle_passive_start_waits_in_active() {
    let mut c = cfg();
    c.passive = true;
    let mut s = Session::new(c);
    let a = s.handle(Event::ManualStart);
    assert_eq!(s.state(), State::Active);
    assert!(!has(&a, |a| *a == Action::Connect));
    // ConnectRetry expiring in passive mode never connects.
    let a = s.handle(Event::ConnectRetryTimerExpires);
    assert_eq!(s.state(), State::Active);
    assert!(!has(&a, |a| *a == Action::Connect));
}

#[test]
fn idle_refuses_incoming_connections_and_ignores_messages() {
    let mut s = Session::new(cfg());
    let a = s.handle(Event::TcpConnectionConfirmed(7));
    assert_eq!(a, vec![Action::CloseConnection(7)]);
    for ev in [
        Event::KeepAliveMsg(7),
        Event::UpdateMsg(7),
        Event::HoldTimerExpires,
        Event::KeepaliveTimerExpires,
        Event::ConnectRetryTimerExpires,
        Event::IdleHoldTimerExpires,
    ] {
        assert!(s.handle(ev).is_empty());
        assert_eq!(s.state(), State::Idle);
    }
}

// ---------- Connect / Active ----------

#[test]
fn connect_refused_goes_idle_with_backoff_then_retries() {
    let mut c = cfg();
    c.timers.error_wait_min = Duration::from_secs(2);
    c.timers.error_wait_max = Duration::from_secs(5);
    let mut s = Session::new(c);
    s.handle(Event::ManualStart);
    let a = s.handle(Event::TcpConnectionFails {
        conn: 1,
        reason: "connect: connection refused".into(),
    });
    assert_eq!(s.state(), State::Idle);
    assert_eq!(
        last_error(&a).as_deref(),
        Some("connect: connection refused")
    );
    assert!(has(&a, |a| *a
        == Action::StartTimer(Timer::IdleHold, Duration::from_secs(2))));
    // Backoff doubles, capped at the maximum.
    let mut waits = Vec::new();
    for i in 0..3 {
        let a = s.handle(Event::IdleHoldTimerExpires);
        assert!(has(&a, |a| *a == Action::Connect));
        assert_eq!(s.state(), State::Connect);
        let a = s.handle(Event::TcpConnectionFails {
            conn: 2 + i,
            reason: "x".into(),
        });
        waits.extend(a.iter().filter_map(|a| match a {
            Action::StartTimer(Timer::IdleHold, d) => Some(d.as_secs()),
            _ => None,
        }));
    }
    assert_eq!(waits, vec![4, 5, 5]);
}

#[test]
fn incoming_connection_during_backoff_is_taken() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpConnectionFails {
        conn: 1,
        reason: "connect: connection refused".into(),
    });
    assert_eq!(s.state(), State::Idle);
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert!(has(&a, |a| *a == Action::StopTimer(Timer::IdleHold)));
    assert!(has(&a, |a| matches!(a, Action::SendOpen(2, _))));
    assert_eq!(s.state(), State::OpenSent);
}

#[test]
fn connect_retry_expiry_reconnects() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    let a = s.handle(Event::ConnectRetryTimerExpires);
    assert!(has(&a, |a| *a == Action::Connect));
    assert_eq!(last_error(&a).as_deref(), Some("connect: timed out"));
    assert_eq!(s.state(), State::Connect);
}

#[test]
fn connect_success_sends_open() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    let a = s.handle(Event::TcpCrAcked(1));
    assert_eq!(s.state(), State::OpenSent);
    let open = a.iter().find_map(|a| match a {
        Action::SendOpen(1, o) => Some(o.clone()),
        _ => None,
    });
    let open = open.expect("OPEN sent");
    assert_eq!(open.bgp_id, LOCAL_ID);
    assert!(has(&a, |a| matches!(a, Action::StartTimer(Timer::Hold, _))));
    assert!(has(&a, |a| *a == Action::StopTimer(Timer::ConnectRetry)));
}

#[test]
fn incoming_connection_in_connect_or_active_is_taken() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    let a = s.handle(Event::TcpConnectionConfirmed(9));
    assert_eq!(s.state(), State::OpenSent);
    assert!(has(&a, |a| *a == Action::CancelConnect));
    assert!(has(&a, |a| matches!(a, Action::SendOpen(9, _))));

    let mut c = cfg();
    c.passive = true;
    let mut s = Session::new(c);
    s.handle(Event::ManualStart);
    s.handle(Event::TcpConnectionConfirmed(3));
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.main_conn(), Some(3));
}

#[test]
fn manual_stop_from_every_state_goes_idle_quietly() {
    let mut s = established();
    let a = s.handle(Event::ManualStop);
    assert_eq!(s.state(), State::Idle);
    assert_eq!(notification_of(&a), Some((6, 2)));
    assert!(has(&a, |a| matches!(
        a,
        Action::Down {
            graceful_restart: None,
            ..
        }
    )));
    assert!(!has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::IdleHold, _)
    )));
    // No automatic restart after a manual stop.
    assert!(s.handle(Event::IdleHoldTimerExpires).is_empty());

    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    let a = s.handle(Event::ManualStop);
    assert_eq!(s.state(), State::Idle);
    assert!(has(&a, |a| *a == Action::CancelConnect));
}

// ---------- OpenSent ----------

#[test]
fn open_sent_good_open_goes_open_confirm_with_negotiated_timers() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert_eq!(s.state(), State::OpenConfirm);
    assert!(has(&a, |a| *a == Action::SendKeepalive(1)));
    // min(240, 90) = 90; keepalive a third.
    assert!(has(&a, |a| *a
        == Action::StartTimer(Timer::Hold, Duration::from_secs(90))));
    assert!(has(&a, |a| *a
        == Action::StartTimer(
            Timer::Keepalive,
            Duration::from_secs(30)
        )));
}

#[test]
fn open_sent_bad_peer_as_is_refused_in_plain_words() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::BgpOpen(
        1,
        peer_open(65001, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert_eq!(s.state(), State::Idle);
    assert_eq!(notification_of(&a), Some((2, 2)));
    assert_eq!(
        last_error(&a).as_deref(),
        Some("OPEN from 10.0.0.2: bad peer AS 65001, expected 65000")
    );
    assert!(has(&a, |a| *a == Action::CloseConnection(1)));
    assert!(
        !has(&a, |a| matches!(a, Action::Down { .. })),
        "never Established: no Down"
    );
}

#[test]
fn open_sent_hold_expiry_and_unexpected_messages() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::HoldTimerExpires);
    assert_eq!(notification_of(&a), Some((4, 0)));
    assert_eq!(last_error(&a).as_deref(), Some("hold timer expired"));
    assert_eq!(s.state(), State::Idle);

    for (ev, sub) in [(Event::KeepAliveMsg(1), 1), (Event::UpdateMsg(1), 1)] {
        let mut s = Session::new(cfg());
        s.handle(Event::ManualStart);
        s.handle(Event::TcpCrAcked(1));
        let a = s.handle(ev);
        assert_eq!(notification_of(&a), Some((5, sub)));
        assert_eq!(s.state(), State::Idle);
    }
}

#[test]
fn open_sent_tcp_failure_goes_active() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::TcpConnectionFails {
        conn: 1,
        reason: "connection reset by peer".into(),
    });
    assert_eq!(s.state(), State::Active);
    assert!(has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::ConnectRetry, _)
    )));
    // A stale event for the closed connection changes nothing.
    assert!(s.handle(Event::KeepAliveMsg(1)).is_empty());
    assert_eq!(s.state(), State::Active);
}

#[test]
fn open_sent_notification_and_decode_errors() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::NotifMsg(
        1,
        Notification {
            code: 2,
            subcode: 2,
            data: vec![],
        },
    ));
    assert_eq!(s.state(), State::Idle);
    assert_eq!(
        last_error(&a).as_deref(),
        Some("NOTIFICATION from 10.0.0.2: OPEN message error / bad peer AS (2/2)")
    );
    assert_eq!(
        notification_of(&a),
        None,
        "no NOTIFICATION in answer to one"
    );

    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let err = MessageError {
        notification: Notification {
            code: 1,
            subcode: 1,
            data: vec![],
        },
        reason: "bad marker".into(),
    };
    let a = s.handle(Event::BgpHeaderErr(1, err));
    assert_eq!(notification_of(&a), Some((1, 1)));
    assert_eq!(s.state(), State::Idle);
}

// ---------- OpenConfirm ----------

#[test]
fn open_confirm_keepalive_establishes_and_timers_keep_it() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    let a = s.handle(Event::KeepaliveTimerExpires);
    assert!(has(&a, |a| *a == Action::SendKeepalive(1)));
    assert_eq!(s.state(), State::OpenConfirm);
    let a = s.handle(Event::UpdateMsg(1));
    assert_eq!(notification_of(&a), Some((5, 2)));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn open_confirm_hold_expiry_and_notification() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    let a = s.handle(Event::HoldTimerExpires);
    assert_eq!(notification_of(&a), Some((4, 0)));
    assert_eq!(s.state(), State::Idle);
}

// ---------- Established ----------

#[test]
fn established_keepalives_and_updates_restart_hold_timer() {
    let mut s = established();
    for ev in [Event::KeepAliveMsg(1), Event::UpdateMsg(1)] {
        let a = s.handle(ev);
        assert_eq!(
            a,
            vec![Action::StartTimer(Timer::Hold, Duration::from_secs(90))]
        );
    }
    let a = s.handle(Event::KeepaliveTimerExpires);
    assert_eq!(
        a,
        vec![
            Action::SendKeepalive(1),
            Action::StartTimer(Timer::Keepalive, Duration::from_secs(30))
        ]
    );
    assert_eq!(s.state(), State::Established);
}

#[test]
fn established_hold_expiry_keeps_routes_for_gr_peer() {
    let mut s = established();
    let a = s.handle(Event::HoldTimerExpires);
    assert_eq!(notification_of(&a), Some((4, 0)));
    let gr = a.iter().find_map(|a| match a {
        Action::Down {
            reason,
            graceful_restart,
        } => Some((reason.clone(), graceful_restart.clone())),
        _ => None,
    });
    let (reason, gr) = gr.expect("Down");
    assert_eq!(reason, "hold timer expired");
    let gr = gr.expect("peer is GR capable: keep routes stale");
    assert_eq!(gr.restart_time, 120);
    assert!(gr.forwarding_preserved(Family::IPV4_UNICAST));
    assert!(has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::IdleHold, _)
    )));
}

#[test]
fn established_notification_or_update_error_flushes_routes() {
    let mut s = established();
    let a = s.handle(Event::NotifMsg(
        1,
        Notification {
            code: 6,
            subcode: 2,
            data: vec![5, b'b', b'y', b'e', b'!', b'!'],
        },
    ));
    let down = a.iter().find_map(|a| match a {
        Action::Down {
            reason,
            graceful_restart,
        } => Some((reason.clone(), graceful_restart.is_some())),
        _ => None,
    });
    assert_eq!(
        down,
        Some((
            "NOTIFICATION from 10.0.0.2: cease / administrative shutdown (6/2): \"bye!!\""
                .to_string(),
            false
        ))
    );

    let mut s = established();
    let err = MessageError {
        notification: Notification {
            code: 3,
            subcode: 1,
            data: vec![],
        },
        reason: "UPDATE from 10.0.0.2: malformed attribute list".into(),
    };
    let a = s.handle(Event::UpdateMsgErr(1, err));
    assert_eq!(notification_of(&a), Some((3, 1)));
    assert!(has(&a, |a| matches!(
        a,
        Action::Down {
            graceful_restart: None,
            ..
        }
    )));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn established_tcp_loss_is_graceful() {
    let mut s = established();
    let a = s.handle(Event::TcpConnectionFails {
        conn: 1,
        reason: "connection closed by peer".into(),
    });
    assert!(has(&a, |a| matches!(
        a,
        Action::Down {
            graceful_restart: Some(_),
            ..
        }
    )));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn established_unexpected_open_is_fsm_error() {
    let mut s = established();
    let a = s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert_eq!(notification_of(&a), Some((5, 3)));
    assert_eq!(s.state(), State::Idle);
}

#[test]
fn established_gr_peer_reconnecting_replaces_the_session() {
    let mut s = established();
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert!(has(&a, |a| matches!(
        a,
        Action::Down {
            graceful_restart: Some(_),
            ..
        }
    )));
    assert!(has(&a, |a| *a == Action::CloseConnection(1)));
    assert!(has(&a, |a| matches!(a, Action::SendOpen(2, _))));
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.main_conn(), Some(2));
}

#[test]
fn established_collision_without_gr_closes_new_connection() {
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.capabilities
        .retain(|c| !matches!(c, Capability::GracefulRestart { .. }));
    s.handle(Event::BgpOpen(1, o));
    s.handle(Event::KeepAliveMsg(1));
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert_eq!(
        a,
        vec![
            Action::SendNotification(
                2,
                Notification {
                    code: 6,
                    subcode: 7,
                    data: vec![]
                }
            ),
            Action::CloseConnection(2)
        ]
    );
    assert_eq!(s.state(), State::Established);
}

// ---------- Collision detection (RFC 4271 6.8) ----------

#[test]
fn collision_in_open_confirm_higher_peer_id_wins_with_its_connection() {
    // Our id 10.0.0.1 < peer 10.0.0.2: the connection the peer opened survives.
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert!(has(&a, |a| *a == Action::CloseConnection(1)));
    assert!(has(&a, |a| matches!(a, Action::SendOpen(2, _))));
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.main_conn(), Some(2));
    s.handle(Event::BgpOpen(
        2,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    let a = s.handle(Event::KeepAliveMsg(2));
    assert!(has(&a, |a| matches!(a, Action::Established(2, _))));
}

#[test]
fn collision_in_open_confirm_lower_peer_id_loses_its_connection() {
    // Peer 9.9.9.9 < our 10.0.0.1: our outbound connection survives.
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(9, 9, 9, 9)),
    ));
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert_eq!(notification_of(&a), Some((6, 7)));
    assert!(has(&a, |a| *a == Action::CloseConnection(2)));
    assert_eq!(s.state(), State::OpenConfirm);
    assert_eq!(s.main_conn(), Some(1));
}

#[test]
fn collision_in_open_sent_resolved_by_first_open() {
    // Both connections in OpenSent; the OPEN arrives on the incoming one first, peer id higher:
    // the incoming one wins and our outbound one is closed.
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::TcpConnectionConfirmed(2));
    assert!(has(&a, |a| matches!(a, Action::SendOpen(2, _))));
    assert_eq!(s.state(), State::OpenSent);
    let a = s.handle(Event::BgpOpen(
        2,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert!(has(&a, |a| *a == Action::CloseConnection(1)));
    assert_eq!(s.state(), State::OpenConfirm);
    assert_eq!(s.main_conn(), Some(2));

    // Same, but the peer's id is lower: the incoming one is closed, we stay on ours.
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::TcpConnectionConfirmed(2));
    let a = s.handle(Event::BgpOpen(
        2,
        peer_open(65000, Ipv4Addr::new(9, 9, 9, 9)),
    ));
    assert!(has(&a, |a| *a == Action::CloseConnection(2)));
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.main_conn(), Some(1));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(9, 9, 9, 9)),
    ));
    assert_eq!(s.state(), State::OpenConfirm);
}

#[test]
fn collision_open_on_main_first_with_pending_incoming() {
    // OPEN on our outbound connection first; the pending incoming one wins (peer id higher).
    let mut s = Session::new(cfg());
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    s.handle(Event::TcpConnectionConfirmed(2));
    let a = s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert!(has(&a, |a| *a == Action::CloseConnection(1)));
    assert_eq!(s.state(), State::OpenSent);
    assert_eq!(s.main_conn(), Some(2));
}

// ---------- OPEN validation and negotiation ----------

#[test]
fn open_validation_errors_name_the_problem() {
    let c = cfg();
    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.hold_time = 2;
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (2, 6));
    assert_eq!(
        e.reason,
        "OPEN from 10.0.0.2: unsupported hold time 2 s (must be 0 or at least 3)"
    );

    let o = peer_open(65000, Ipv4Addr::new(0, 0, 0, 0));
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (2, 3));
    assert_eq!(e.reason, "OPEN from 10.0.0.2: bad BGP identifier 0.0.0.0");

    let o = peer_open(65000, LOCAL_ID);
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (2, 3));

    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.version = 3;
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!(
        (
            e.notification.code,
            e.notification.subcode,
            e.notification.data
        ),
        (2, 1, vec![0, 4])
    );

    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.capabilities = vec![Capability::Multiprotocol(Family {
        afi: margay::bgp::wire::Afi::Other(25),
        safi: margay::bgp::wire::Safi::Other(65),
    })];
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!((e.notification.code, e.notification.subcode), (2, 7));
    assert!(
        e.reason.contains("no address family in common"),
        "{}",
        e.reason
    );
}

#[test]
fn four_octet_as_both_ways() {
    let mut c = cfg();
    c.local_as = 4200000001;
    c.peer_as = 4200000002;
    let ours = build_open(&c);
    assert_eq!(ours.my_as, AS_TRANS);
    assert!(ours
        .capabilities
        .contains(&Capability::FourOctetAs(4200000001)));
    let n = negotiate(&c, &peer_open(4200000002, Ipv4Addr::new(10, 0, 0, 2))).expect("negotiates");
    assert!(n.four_octet_as);
    assert_eq!(n.peer_as, 4200000002);
    // A 2-octet-only peer claiming AS_TRANS does not match a 4-octet expectation.
    let mut o = peer_open(4200000002, Ipv4Addr::new(10, 0, 0, 2));
    o.capabilities
        .retain(|c| !matches!(c, Capability::FourOctetAs(_)));
    let e = negotiate(&c, &o).unwrap_err();
    assert_eq!(
        e.reason,
        "OPEN from 10.0.0.2: bad peer AS 23456, expected 4200000002"
    );
}

#[test]
fn families_add_path_hold_zero_and_gr_negotiation() {
    let mut c = cfg();
    c.add_path = vec![
        (Family::IPV4_UNICAST, AddPathMode::Receive),
        (Family::IPV6_UNICAST, AddPathMode::Both),
    ];
    c.timers.hold_time = 0;
    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.capabilities
        .retain(|c| *c != Capability::Multiprotocol(Family::IPV6_UNICAST));
    o.capabilities.push(Capability::AddPath(vec![(
        Family::IPV4_UNICAST,
        AddPathMode::Both,
    )]));
    o.capabilities.push(Capability::ExtendedMessage);
    let n = negotiate(&c, &o).expect("negotiates");
    assert_eq!(n.families, vec![Family::IPV4_UNICAST]);
    assert_eq!(n.add_path_rx, vec![Family::IPV4_UNICAST]);
    assert!(n.add_path_tx.is_empty(), "we only receive on IPv4");
    assert_eq!((n.hold_time, n.keepalive), (0, 0));
    assert!(n.extended_message && n.route_refresh);
    let gr = n.peer_graceful_restart.expect("peer GR");
    assert_eq!(gr.families.len(), 1);

    // No MP capability at all means IPv4 unicast only (RFC 4760 8).
    let mut o = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    o.capabilities
        .retain(|c| !matches!(c, Capability::Multiprotocol(_)));
    let n = negotiate(&cfg(), &o).expect("negotiates");
    assert_eq!(n.families, vec![Family::IPV4_UNICAST]);
}

#[test]
fn hold_time_zero_session_runs_without_timers() {
    let mut c = cfg();
    c.timers.hold_time = 0;
    let mut s = Session::new(c);
    s.handle(Event::ManualStart);
    s.handle(Event::TcpCrAcked(1));
    let a = s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    assert!(has(&a, |a| *a == Action::StopTimer(Timer::Hold)));
    assert!(!has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::Keepalive, _)
    )));
    s.handle(Event::KeepAliveMsg(1));
    assert_eq!(s.state(), State::Established);
    assert!(s.handle(Event::KeepaliveTimerExpires).is_empty());
    assert!(s.handle(Event::UpdateMsg(1)).is_empty());
}

#[test]
fn restart_bit_only_until_the_first_established_session() {
    let mut c = cfg();
    c.graceful_restart = Some(margay::bgp::session::GracefulRestartConfig {
        restart_time: 120,
        restarting: true,
        forwarding_preserved: true,
        ..Default::default()
    });
    let r_bit = |a: &[Action]| {
        a.iter().find_map(|a| match a {
            Action::SendOpen(_, o) => o.capabilities.iter().find_map(|c| match c {
                Capability::GracefulRestart { restarting, .. } => Some(*restarting),
                _ => None,
            }),
            _ => None,
        })
    };
    let mut s = Session::new(c);
    s.handle(Event::ManualStart);
    let a = s.handle(Event::TcpCrAcked(1));
    assert_eq!(r_bit(&a), Some(true));
    s.handle(Event::BgpOpen(
        1,
        peer_open(65000, Ipv4Addr::new(10, 0, 0, 2)),
    ));
    s.handle(Event::KeepAliveMsg(1));
    s.handle(Event::TcpConnectionFails {
        conn: 1,
        reason: "reset".into(),
    });
    s.handle(Event::IdleHoldTimerExpires);
    let a = s.handle(Event::TcpCrAcked(2));
    assert_eq!(r_bit(&a), Some(false));
}

#[test]
fn our_open_carries_gr_bits_and_families() {
    let mut c = cfg();
    c.graceful_restart = Some(margay::bgp::session::GracefulRestartConfig {
        restart_time: 300,
        restarting: true,
        forwarding_preserved: true,
        ..Default::default()
    });
    let o = build_open(&c);
    let gr = o.capabilities.iter().find_map(|c| match c {
        Capability::GracefulRestart {
            restarting,
            restart_time,
            families,
            ..
        } => Some((*restarting, *restart_time, families.clone())),
        _ => None,
    });
    let (r, t, fams) = gr.expect("GR capability");
    assert!(r);
    assert_eq!(t, 300);
    assert_eq!(fams.len(), 2);
    assert!(fams.iter().all(|f| f.forwarding_preserved));
    assert_eq!(o.hold_time, 240);
    assert_eq!(o.my_as, 65000);
}

// ---------- The FSM never panics ----------

fn arb_open() -> impl Strategy<Value = Open> {
    (
        prop_oneof![Just(4u8), any::<u8>()],
        prop_oneof![
            Just(65000u32),
            Just(65001u32),
            Just(4200000001u32),
            any::<u32>()
        ],
        prop_oneof![
            Just(90u16),
            Just(0u16),
            Just(1u16),
            Just(3u16),
            any::<u16>()
        ],
        prop_oneof![
            Just(Ipv4Addr::new(10, 0, 0, 2)),
            Just(Ipv4Addr::new(9, 9, 9, 9)),
            Just(LOCAL_ID),
            any::<u32>().prop_map(Ipv4Addr::from)
        ],
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(version, asn, hold, id, gr, v6)| {
            let mut o = peer_open(asn, id);
            o.version = version;
            o.hold_time = hold;
            if !gr {
                o.capabilities
                    .retain(|c| !matches!(c, Capability::GracefulRestart { .. }));
            }
            if !v6 {
                o.capabilities
                    .retain(|c| *c != Capability::Multiprotocol(Family::IPV6_UNICAST));
            }
            o
        })
}

#[test]
fn established_bfd_down_resets_at_once_without_keeping_routes() {
    let mut s = established();
    let a = s.handle(Event::BfdDown {
        reason: "control detection time expired".into(),
    });
    // RFC 9384: Cease / BFD Down.
    assert_eq!(notification_of(&a), Some((6, 10)));
    let down = a.iter().find_map(|a| match a {
        Action::Down {
            reason,
            graceful_restart,
        } => Some((reason.clone(), graceful_restart.clone())),
        _ => None,
    });
    let (reason, gr) = down.expect("Down");
    assert_eq!(reason, "BFD session down: control detection time expired");
    assert!(gr.is_none(), "the path failed: routes go now, not after GR");
    assert_eq!(s.state(), State::Idle);
    // A fresh reconnect follows, as after any failure.
    assert!(has(&a, |a| matches!(
        a,
        Action::StartTimer(Timer::IdleHold, _)
    )));
    // Outside a session it changes nothing.
    let mut idle = Session::new(cfg());
    idle.handle(Event::ManualStart);
    assert!(idle
        .handle(Event::BfdDown { reason: "x".into() })
        .is_empty());
}

fn arb_event() -> impl Strategy<Value = Event> {
    let conn = 0u64..4;
    let notif = (
        any::<u8>(),
        any::<u8>(),
        proptest::collection::vec(any::<u8>(), 0..8),
    )
        .prop_map(|(code, subcode, data)| Notification {
            code,
            subcode,
            data,
        });
    let err = notif.clone().prop_map(|n| MessageError {
        notification: n,
        reason: "bad".into(),
    });
    prop_oneof![
        Just(Event::ManualStart),
        Just(Event::ManualStop),
        Just(Event::AutomaticStop { cease_subcode: 6 }),
        Just(Event::ConnectRetryTimerExpires),
        Just(Event::HoldTimerExpires),
        Just(Event::KeepaliveTimerExpires),
        Just(Event::IdleHoldTimerExpires),
        Just(Event::BfdDown {
            reason: "detection time expired".into()
        }),
        conn.clone().prop_map(Event::TcpCrAcked),
        conn.clone().prop_map(Event::TcpConnectionConfirmed),
        conn.clone().prop_map(|c| Event::TcpConnectionFails {
            conn: c,
            reason: "gone".into()
        }),
        (conn.clone(), arb_open()).prop_map(|(c, o)| Event::BgpOpen(c, o)),
        (conn.clone(), err.clone()).prop_map(|(c, e)| Event::BgpHeaderErr(c, e)),
        (conn.clone(), err.clone()).prop_map(|(c, e)| Event::BgpOpenMsgErr(c, e)),
        (conn.clone(), notif).prop_map(|(c, n)| Event::NotifMsg(c, n)),
        conn.clone().prop_map(Event::KeepAliveMsg),
        conn.clone().prop_map(Event::UpdateMsg),
        (conn, err).prop_map(|(c, e)| Event::UpdateMsgErr(c, e)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    /// Any event sequence: no panic, and the invariants the peer task relies on hold after every step.
    #[test]
    fn fsm_never_panics_on_any_event_sequence(
        passive in any::<bool>(),
        hold in prop_oneof![Just(0u16), Just(3u16), Just(240u16)],
        events in proptest::collection::vec(arb_event(), 0..60),
    ) {
        let mut c = cfg();
        c.passive = passive;
        c.timers.hold_time = hold;
        let mut s = Session::new(c);
        let mut up = false;
        for ev in events {
            let actions = s.handle(ev);
            for a in &actions {
                match a {
                    Action::Established(..) => { prop_assert!(!up, "Established twice without Down"); up = true; }
                    Action::Down { .. } => { prop_assert!(up, "Down without Established"); up = false; }
                    Action::Connect => prop_assert!(!passive, "a passive peer connected"),
                    _ => {}
                }
            }
            prop_assert_eq!(up, s.state() == State::Established);
            match s.state() {
                State::Idle | State::Connect | State::Active => prop_assert!(s.main_conn().is_none()),
                _ => prop_assert!(s.main_conn().is_some()),
            }
            prop_assert_eq!(s.negotiated().is_some(), matches!(s.state(), State::OpenConfirm | State::Established));
        }
    }
}

/// RFC 9494 3.1: the LLGR capability goes out only next to graceful restart and only when a stale time is
/// configured; it is in force when the peer sent it with graceful restart (alone it is ignored), for the
/// negotiated families, with the peer's stale time shortened to ours.
#[test]
fn long_lived_graceful_restart_is_offered_and_negotiated() {
    use margay::bgp::wire::LongLivedFamily;
    let llgr_of = |o: &Open| {
        o.capabilities.iter().find_map(|c| match c {
            Capability::LongLivedGracefulRestart(v) => Some(v.clone()),
            _ => None,
        })
    };
    let mut c = cfg();
    assert_eq!(llgr_of(&build_open(&c)), None, "off unless configured");
    if let Some(gr) = c.graceful_restart.as_mut() {
        gr.long_lived_stale_time = 3600;
        gr.long_lived_forwarding_preserved = true;
    }
    let ours = llgr_of(&build_open(&c)).expect("offered");
    assert_eq!(ours.len(), 2, "one tuple per family: {ours:?}");
    assert!(ours
        .iter()
        .all(|l| l.stale_time == 3600 && l.forwarding_preserved));

    let mut theirs = peer_open(65000, Ipv4Addr::new(10, 0, 0, 2));
    theirs
        .capabilities
        .push(Capability::LongLivedGracefulRestart(vec![
            LongLivedFamily {
                family: Family::IPV4_UNICAST,
                forwarding_preserved: true,
                stale_time: 86_400,
            },
            LongLivedFamily {
                family: Family {
                    afi: margay::bgp::wire::Afi::Ipv4,
                    safi: margay::bgp::wire::Safi::Other(128),
                },
                forwarding_preserved: true,
                stale_time: 86_400,
            },
        ]));
    let n = negotiate(&c, &theirs).expect("negotiated");
    let ll = n
        .peer_graceful_restart
        .as_ref()
        .and_then(|g| g.long_lived.clone())
        .expect("LLGR in force");
    assert_eq!(
        ll,
        vec![LongLivedFamily {
            family: Family::IPV4_UNICAST,
            forwarding_preserved: true,
            stale_time: 3600,
        }],
        "negotiated families only, capped by ours"
    );

    // Without graceful restart the LLGR capability is ignored; with ours off, too.
    let mut alone = theirs.clone();
    alone
        .capabilities
        .retain(|c| !matches!(c, Capability::GracefulRestart { .. }));
    let n = negotiate(&c, &alone).expect("negotiated");
    assert!(n.peer_graceful_restart.is_none());
    let n = negotiate(&cfg(), &theirs).expect("negotiated");
    assert_eq!(
        n.peer_graceful_restart.and_then(|g| g.long_lived),
        None,
        "we did not offer it"
    );
}
