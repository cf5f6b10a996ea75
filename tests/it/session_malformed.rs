//! Malformed input from a peer, end to end through the peer task over loopback TCP: crafted UPDATEs get
//! the RFC 7606 treatment (treat-as-withdraw keeps the session; a broken NLRI or header resets it with
//! the right NOTIFICATION), the task never hangs, and a second session on the same listener is
//! untouched. Also: End-of-RIB detection, collision of a second connection, and Reconfigure.
//!
//! ```text
//!   scripted speaker 127.0.0.2 (AS 65002) ─┐
//!                                          ├─► margay listener 127.0.0.1:<port>, passive peers, AS 65001
//!   scripted speaker 127.0.0.3 (AS 65003) ─┘
//! ```
//! The scripted speakers write bytes we craft by hand; they are test peers, not a model of BGP.

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use bytes::BytesMut;
use common::session::{loopback_listener, next_established, next_matching, status_until, LIMIT};
use ipnetwork::IpNetwork;
use margay::bgp::session::{spawn_peer, PeerCommand, PeerConfig, SessionEvent, State};
use margay::bgp::wire::{
    decode, encode, peek_len, Capability, DecodeCtx, EncodeCtx, Family, Message, Nlri, Open,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::mpsc;

struct Scripted {
    stream: TcpStream,
    buf: BytesMut,
    ctx: DecodeCtx,
}

impl Scripted {
    /// Connect from `src` to margay's listener and run the OPEN exchange up to Established.
    async fn establish(src: Ipv4Addr, asn: u32, to: SocketAddr) -> Scripted {
        let sock = TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::new(IpAddr::V4(src), 0))
            .expect("bind source");
        let stream = sock.connect(to).await.expect("connect to margay");
        let mut s = Scripted {
            stream,
            buf: BytesMut::new(),
            ctx: DecodeCtx::default(),
        };
        let open = Open {
            version: 4,
            my_as: asn as u16,
            hold_time: 90,
            bgp_id: src,
            capabilities: vec![
                Capability::Multiprotocol(Family::IPV4_UNICAST),
                Capability::FourOctetAs(asn),
                Capability::RouteRefresh,
            ],
        };
        s.send(&Message::Open(open)).await;
        let theirs = s.recv().await;
        assert!(matches!(theirs, Message::Open(_)), "{theirs:?}");
        s.ctx.four_octet_as = true;
        s.send(&Message::Keepalive).await;
        let ka = s.recv().await;
        assert_eq!(ka, Message::Keepalive);
        s
    }

    async fn send(&mut self, m: &Message) {
        let mut out = BytesMut::new();
        let ctx = EncodeCtx {
            four_octet_as: self.ctx.four_octet_as,
            ..Default::default()
        };
        encode(m, &ctx, &mut out).expect("encode");
        self.stream.write_all(&out).await.expect("write");
    }

    async fn send_raw(&mut self, b: &[u8]) {
        self.stream.write_all(b).await.expect("write");
    }

    /// The next message other than KEEPALIVE... unless it is the one asked for.
    async fn recv(&mut self) -> Message {
        loop {
            if let Ok(Some(len)) = peek_len(&self.buf) {
                if self.buf.len() >= len {
                    let frame = self.buf.split_to(len);
                    return decode(&frame, &self.ctx).expect("margay sends valid messages");
                }
            }
            let n = tokio::time::timeout(LIMIT, self.stream.read_buf(&mut self.buf))
                .await
                .expect("margay answers")
                .expect("read");
            assert!(n > 0, "connection closed while waiting for a message");
        }
    }

    /// Read until a NOTIFICATION arrives (skipping KEEPALIVEs); its code, subcode and data.
    async fn expect_notification_data(&mut self) -> (u8, u8, Vec<u8>) {
        loop {
            match self.recv().await {
                Message::Notification(n) => return (n.code, n.subcode, n.data),
                Message::Keepalive => continue,
                other => panic!("expected a NOTIFICATION, got {other:?}"),
            }
        }
    }

    /// Read until a NOTIFICATION arrives (skipping KEEPALIVEs); then expect the close.
    async fn expect_notification(&mut self) -> (u8, u8) {
        loop {
            match self.recv().await {
                Message::Notification(n) => {
                    let mut rest = Vec::new();
                    let _ = tokio::time::timeout(LIMIT, self.stream.read_to_end(&mut rest)).await;
                    return (n.code, n.subcode);
                }
                Message::Keepalive => continue,
                other => panic!("expected a NOTIFICATION, got {other:?}"),
            }
        }
    }
}

/// A whole UPDATE message from its body.
fn update_msg(body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&((19 + body.len()) as u16).to_be_bytes());
    m.push(2);
    m.extend_from_slice(body);
    m
}

/// UPDATE body: no withdrawn routes, the given attributes, the given NLRI bytes.
fn body(attrs: &[&[u8]], nlri: &[u8]) -> Vec<u8> {
    let a: Vec<u8> = attrs.concat();
    let mut b = vec![0, 0];
    b.extend_from_slice(&(a.len() as u16).to_be_bytes());
    b.extend_from_slice(&a);
    b.extend_from_slice(nlri);
    b
}

const ORIGIN: &[u8] = &[0x40, 1, 1, 0];
const ORIGIN_BAD_LEN: &[u8] = &[0x40, 1, 2, 0, 0];
const AS_PATH: &[u8] = &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xea];
const NEXT_HOP: &[u8] = &[0x40, 3, 4, 127, 0, 0, 2];
/// MED marked transitive (flags must be optional non-transitive).
const MED_BAD_FLAGS: &[u8] = &[0xc0, 4, 4, 0, 0, 0, 5];

fn net(s: &str) -> IpNetwork {
    IpNetwork::from_str(s).expect("prefix")
}

fn passive(peer: &str, asn: u32) -> PeerConfig {
    let mut c = PeerConfig::new(
        IpAddr::from_str(peer).expect("ip"),
        asn,
        65001,
        Ipv4Addr::new(127, 0, 0, 1),
    );
    c.passive = true;
    c.families = vec![Family::IPV4_UNICAST];
    c.timers.error_wait_min = Duration::from_millis(100);
    c.timers.error_wait_max = Duration::from_millis(200);
    c
}

fn withdrawn_v4(ev: &SessionEvent) -> Vec<IpNetwork> {
    match ev {
        SessionEvent::Updates { updates, .. } => updates
            .iter()
            .flat_map(|u| u.withdrawn.iter().map(|n| n.prefix))
            .collect(),
        _ => Vec::new(),
    }
}

fn announced_v4(ev: &SessionEvent) -> Vec<IpNetwork> {
    match ev {
        SessionEvent::Updates { updates, .. } => updates
            .iter()
            .flat_map(|u| u.nlri.iter().map(|n| n.prefix))
            .collect(),
        _ => Vec::new(),
    }
}

#[tokio::test]
async fn malformed_updates_get_rfc7606_treatment_and_other_sessions_are_untouched() {
    let (listener, addr) = loopback_listener().await;
    let (tx, mut rx) = mpsc::channel(1024);
    let bad = spawn_peer(
        passive("127.0.0.2", 65002),
        Some(listener.handle()),
        tx.clone(),
    );
    let good = spawn_peer(passive("127.0.0.3", 65003), Some(listener.handle()), tx);

    let mut b = Scripted::establish(Ipv4Addr::new(127, 0, 0, 2), 65002, addr).await;
    let mut g = Scripted::establish(Ipv4Addr::new(127, 0, 0, 3), 65003, addr).await;
    for _ in 0..2 {
        next_established(&mut rx, "Established").await;
    }

    // A good UPDATE, then the same prefix with a bad ORIGIN length: RFC 7606 7.1 treat-as-withdraw.
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP],
        &[24, 10, 1, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "the good UPDATE", |e| !announced_v4(e).is_empty()).await;
    assert_eq!(announced_v4(&ev), vec![net("10.1.0.0/24")]);
    b.send_raw(&update_msg(&body(
        &[ORIGIN_BAD_LEN, AS_PATH, NEXT_HOP],
        &[24, 10, 1, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "treat-as-withdraw", |e| {
        !withdrawn_v4(e).is_empty()
    })
    .await;
    assert_eq!(withdrawn_v4(&ev), vec![net("10.1.0.0/24")]);

    // MED with bad flags (RFC 7606 3 (b)): treat-as-withdraw too, session stays.
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP, MED_BAD_FLAGS],
        &[24, 10, 2, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "treat-as-withdraw (flags)", |e| {
        !withdrawn_v4(e).is_empty()
    })
    .await;
    assert_eq!(withdrawn_v4(&ev), vec![net("10.2.0.0/24")]);
    assert_eq!(bad.status().state, State::Established);

    // End-of-RIB (an empty UPDATE) is reported as such.
    b.send_raw(&update_msg(&body(&[], &[]))).await;
    let ev = next_matching(&mut rx, "End-of-RIB", |e| {
        matches!(e, SessionEvent::EndOfRib { .. })
    })
    .await;
    assert!(matches!(
        ev,
        SessionEvent::EndOfRib {
            family: Family::IPV4_UNICAST,
            ..
        }
    ));

    // A truncated NLRI cannot be located (RFC 7606 5.3): session reset with UPDATE error 3/10.
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP],
        &[24, 10, 3],
    )))
    .await;
    assert_eq!(b.expect_notification().await, (3, 10));
    let ev = next_matching(&mut rx, "Down", |e| matches!(e, SessionEvent::Down { .. })).await;
    let SessionEvent::Down {
        peer,
        reason,
        graceful_restart,
        ..
    } = ev
    else {
        unreachable!()
    };
    assert_eq!(peer, IpAddr::from([127, 0, 0, 2]));
    assert!(reason.starts_with("UPDATE from 127.0.0.2: "), "{reason}");
    assert!(
        graceful_restart.is_none(),
        "after a NOTIFICATION routes are flushed"
    );

    // It comes back, and a broken header (bad marker) is a reset with 1/1.
    let mut b = Scripted::establish(Ipv4Addr::new(127, 0, 0, 2), 65002, addr).await;
    next_established(&mut rx, "Established again").await;
    let mut junk = update_msg(&body(&[], &[]));
    junk[3] = 0;
    b.send_raw(&junk).await;
    assert_eq!(b.expect_notification().await, (1, 1));
    status_until(&bad, "the header error in status", |s| {
        s.last_error
            .as_deref()
            .is_some_and(|e| e.contains("marker"))
    })
    .await;

    // The other session never noticed: still Established, still delivering.
    assert_eq!(good.status().state, State::Established);
    assert_eq!(good.status().counters.established, 1);
    g.send_raw(&update_msg(&body(
        &[
            ORIGIN,
            &[0x40, 2, 6, 2, 1, 0, 0, 0xfd, 0xeb],
            &[0x40, 3, 4, 127, 0, 0, 3],
        ],
        &[24, 10, 9, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "the other peer's UPDATE", |e| {
        matches!(e, SessionEvent::Updates { peer, .. } if *peer == IpAddr::from([127, 0, 0, 3]))
    })
    .await;
    assert_eq!(announced_v4(&ev), vec![net("10.9.0.0/24")]);
    good.shutdown().await;
    assert_eq!(
        g.expect_notification().await,
        (6, 2),
        "Cease / administrative shutdown on stop"
    );
    bad.shutdown().await;
}

#[tokio::test]
async fn end_of_rib_and_updates_flow_out_and_reconfigure_resets_only_on_change() {
    let (listener, addr) = loopback_listener().await;
    let (tx, mut rx) = mpsc::channel(1024);
    let cfg = passive("127.0.0.4", 65004);
    let p = spawn_peer(cfg.clone(), Some(listener.handle()), tx);
    let mut s = Scripted::establish(Ipv4Addr::new(127, 0, 0, 4), 65004, addr).await;
    let (session, negotiated) = next_established(&mut rx, "Established").await;
    assert!(negotiated.route_refresh);

    // Pre-encoded UPDATEs in one buffer, then End-of-RIB; bytes for an old session id are dropped.
    let mut buf = BytesMut::new();
    let attrs = margay::bgp::wire::PathAttributes {
        origin: Some(margay::bgp::wire::Origin::Igp),
        as_path: Some(margay::bgp::wire::AsPath {
            segments: vec![margay::bgp::wire::AsSegment::Sequence(vec![65001])],
        }),
        next_hop: Some(Ipv4Addr::new(127, 0, 0, 1)),
        ..Default::default()
    };
    let nlri: Vec<Nlri> = (0..2000u32)
        .map(|i| Nlri {
            prefix: IpNetwork::new(IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + (i << 8))), 24)
                .expect("prefix"),
            path_id: 0,
        })
        .collect();
    let ctx = EncodeCtx {
        four_octet_as: true,
        ..Default::default()
    };
    let msgs =
        margay::bgp::wire::encode_updates(&attrs, Family::IPV4_UNICAST, &nlri, &ctx, &mut buf)
            .expect("encode");
    assert!(msgs > 1);
    p.send(PeerCommand::SendUpdates {
        session: session + 100,
        bytes: buf.clone().freeze(),
    })
    .await
    .expect("send");
    p.send(PeerCommand::SendUpdates {
        session,
        bytes: buf.freeze(),
    })
    .await
    .expect("send");
    p.send(PeerCommand::SendEndOfRib {
        session,
        family: Family::IPV4_UNICAST,
    })
    .await
    .expect("send");
    let mut got = 0;
    loop {
        match s.recv().await {
            Message::Update(u) if u.end_of_rib() == Some(Family::IPV4_UNICAST) => break,
            Message::Update(u) => got += u.nlri.len(),
            Message::Keepalive => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        got, 2000,
        "every prefix once: the stale-session buffer was dropped"
    );
    assert_eq!(p.status().counters.updates_out, msgs as u64 + 1);

    // Same config: nothing happens. A changed one: Cease, and the session comes back.
    p.send(PeerCommand::Reconfigure(Box::new(cfg.clone())))
        .await
        .expect("send");
    let mut changed = cfg;
    changed.timers.hold_time = 30;
    p.send(PeerCommand::Reconfigure(Box::new(changed)))
        .await
        .expect("send");
    assert_eq!(
        s.expect_notification().await,
        (6, 6),
        "Cease / other configuration change"
    );
    let _s = Scripted::establish(Ipv4Addr::new(127, 0, 0, 4), 65004, addr).await;
    let (_, negotiated) = next_established(&mut rx, "Established after Reconfigure").await;
    assert_eq!(negotiated.hold_time, 30);
    assert_eq!(p.status().counters.established, 2);
    p.shutdown().await;
}

/// The three samples an outside malformed-message check found, live against the peer task (an external
/// peer, AS 65002, no extended messages):
/// - a malformed LOCAL_PREF from an external peer is discarded (RFC 7606 7.5): the route is announced;
/// - an attribute length running past the attributes in an UPDATE without NLRI resets the session with
///   3/1 (RFC 7606 4 and 5.2);
/// - a header announcing more than the negotiated 4096 octets is answered at once with 1/2 and the length
///   as data (RFC 4271 6.1), without waiting for the body (the hold timer is 90 s).
#[tokio::test]
async fn rfc7606_and_rfc4271_samples_over_a_live_session() {
    let (listener, addr) = loopback_listener().await;
    let (tx, mut rx) = mpsc::channel(1024);
    let peer = spawn_peer(passive("127.0.0.2", 65002), Some(listener.handle()), tx);
    let mut b = Scripted::establish(Ipv4Addr::new(127, 0, 0, 2), 65002, addr).await;
    next_established(&mut rx, "Established").await;

    const LOCAL_PREF_BAD_LEN: &[u8] = &[0x40, 5, 5, 0, 0, 0, 0, 100];
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP, LOCAL_PREF_BAD_LEN],
        &[24, 10, 5, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "the UPDATE with LOCAL_PREF discarded", |e| {
        !announced_v4(e).is_empty() || !withdrawn_v4(e).is_empty()
    })
    .await;
    assert_eq!(announced_v4(&ev), vec![net("10.5.0.0/24")], "{ev:?}");
    assert_eq!(peer.status().state, State::Established);

    // COMMUNITIES claiming 8 octets where 4 remain, and no NLRI.
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP, &[0xc0, 8, 8, 0, 0, 0, 1]],
        &[],
    )))
    .await;
    let (code, sub, _) = b.expect_notification_data().await;
    assert_eq!((code, sub), (3, 1), "Malformed Attribute List");
    next_matching(&mut rx, "Down", |e| matches!(e, SessionEvent::Down { .. })).await;

    let mut b = Scripted::establish(Ipv4Addr::new(127, 0, 0, 2), 65002, addr).await;
    next_established(&mut rx, "Established again").await;
    let mut header = vec![0xff; 16];
    header.extend_from_slice(&5000u16.to_be_bytes());
    header.push(2);
    b.send_raw(&header).await;
    let got = tokio::time::timeout(Duration::from_secs(5), b.expect_notification_data())
        .await
        .expect("Bad Message Length must be sent at once, not after the hold timer");
    assert_eq!(got, (1, 2, vec![0x13, 0x88]));
    peer.shutdown().await;
}

/// RFC 4271 6.3 NEXT_HOP, live: a NEXT_HOP that is no host address (0.0.0.0) is treat-as-withdraw
/// (RFC 7606 3 (e)); a NEXT_HOP that is margay's own address on the session (127.0.0.1) is semantically
/// incorrect: the route is ignored and an earlier announcement of it withdrawn, without a NOTIFICATION;
/// the session stays up and a good route after them is announced.
#[tokio::test]
async fn next_hop_semantics_over_a_live_session() {
    let (listener, addr) = loopback_listener().await;
    let (tx, mut rx) = mpsc::channel(1024);
    let peer = spawn_peer(passive("127.0.0.2", 65002), Some(listener.handle()), tx);
    let mut b = Scripted::establish(Ipv4Addr::new(127, 0, 0, 2), 65002, addr).await;
    next_established(&mut rx, "Established").await;
    let updates = |ev: &SessionEvent| !announced_v4(ev).is_empty() || !withdrawn_v4(ev).is_empty();

    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP],
        &[24, 10, 6, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "10.6.0.0/24 announced", updates).await;
    assert_eq!(announced_v4(&ev), vec![net("10.6.0.0/24")]);

    const NEXT_HOP_ZERO: &[u8] = &[0x40, 3, 4, 0, 0, 0, 0];
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP_ZERO],
        &[24, 10, 7, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "treat-as-withdraw of 10.7.0.0/24", updates).await;
    assert_eq!(withdrawn_v4(&ev), vec![net("10.7.0.0/24")], "{ev:?}");
    assert!(announced_v4(&ev).is_empty(), "{ev:?}");

    const NEXT_HOP_OURS: &[u8] = &[0x40, 3, 4, 127, 0, 0, 1];
    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP_OURS],
        &[24, 10, 6, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "10.6.0.0/24 ignored (withdrawn)", updates).await;
    assert_eq!(withdrawn_v4(&ev), vec![net("10.6.0.0/24")], "{ev:?}");
    assert!(announced_v4(&ev).is_empty(), "{ev:?}");

    b.send_raw(&update_msg(&body(
        &[ORIGIN, AS_PATH, NEXT_HOP],
        &[24, 10, 8, 0],
    )))
    .await;
    let ev = next_matching(&mut rx, "10.8.0.0/24 announced", updates).await;
    assert_eq!(announced_v4(&ev), vec![net("10.8.0.0/24")]);
    assert_eq!(peer.status().state, State::Established, "no NOTIFICATION");
    peer.shutdown().await;
}
