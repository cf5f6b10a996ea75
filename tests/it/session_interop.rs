//! margay's peer task against real BGP daemons in network namespaces: sessions establish with BIRD 2,
//! GoBGP and FRR (IPv4 and IPv6, 4-octet AS, TCP MD5), End-of-RIB both ways, the plain-words reasons a
//! session stays down (wrong AS, wrong password), and hold timer expiry against a frozen peer.
//!
//! ```text
//!   netns ..a: margay peer task(s)                       netns ..b: BIRD | GoBGP | FRR
//!   10.0.0.1  fd00::1  AS 4200000001 / 65001 / 65000 ── veth ── 10.0.0.2  fd00::2
//!   expects: Established, the daemon's routes as Updates + End-of-RIB, the daemon holding our route
//! ```
//!
//! The tests need root (namespaces) and the daemons; without them they SKIP (or fail under CI=true).

use crate::common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use common::bgp_peers::{have_bird, have_frr, have_gobgp, in_netns, Bird, Frr, GoBgp, Link};
use common::session::{established, expect_event, output_until, status_until, LIMIT};
use common::{is_root, require};
use ipnetwork::IpNetwork;
use margay::bgp::session::{
    spawn_peer, Listener, Password, PeerCommand, PeerConfig, PeerHandle, SessionEvent, State,
};
use margay::bgp::wire::{AsPath, AsSegment, Family, Nlri, Origin, PathAttributes, Update};
use tokio::sync::mpsc;

fn prereqs(test: &str, daemon_ok: bool, daemon: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(
            daemon_ok,
            test,
            &format!("{daemon} is not installed (scripts/install-deps.sh)"),
        )
}

fn ip(s: &str) -> IpAddr {
    IpAddr::from_str(s).expect("address literal")
}

/// A peer config with short timers so failures and retries show up quickly.
fn peer_cfg(peer: &str, peer_as: u32, local_as: u32) -> PeerConfig {
    let mut c = PeerConfig::new(ip(peer), peer_as, local_as, Ipv4Addr::new(10, 0, 0, 1));
    c.timers.connect_retry = Duration::from_secs(2);
    c.timers.error_wait_min = Duration::from_secs(1);
    c.timers.error_wait_max = Duration::from_secs(2);
    c
}

/// Poll a condition (e.g. a daemon's CLI) while letting margay's tasks run.
async fn eventually<T>(what: &str, mut f: impl FnMut() -> Result<T, String>) -> T {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match f() {
            Ok(v) => return v,
            Err(s) => last = s,
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    panic!("gave up waiting for {what}; last seen:\n{last}");
}

fn announced(ev: &SessionEvent) -> Vec<IpNetwork> {
    match ev {
        SessionEvent::Updates { updates, .. } => updates
            .iter()
            .flat_map(|u| {
                u.nlri
                    .iter()
                    .chain(u.attributes.mp_reach.iter().flat_map(|m| m.nlri.iter()))
                    .map(|n| n.prefix)
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn net(s: &str) -> IpNetwork {
    IpNetwork::from_str(s).expect("prefix literal")
}

fn bird_conf(hold: u16) -> String {
    bird_conf_v4(hold) + &bird_conf_v6(hold)
}

/// BIRD with only the IPv4 session (a restarting BIRD waits for every GR session it has).
fn bird_conf_v4(hold: u16) -> String {
    format!(
        r#"
router id 10.0.0.2;
log stderr all;
protocol device {{ }}
protocol static s4 {{ ipv4; route 192.0.2.0/24 blackhole; route 198.51.100.0/24 blackhole; }}
protocol static s6 {{ ipv6; route 2001:db8:1::/48 blackhole; }}
protocol bgp margay4 {{
  local 10.0.0.2 as 4200000002;
  neighbor 10.0.0.1 as 4200000001;
  hold time {hold};
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  graceful restart on;
  ipv4 {{ import all; export all; }};
}}
"#
    )
}

fn bird_conf_v6(hold: u16) -> String {
    format!(
        r#"
protocol bgp margay6 {{
  local fd00::2 as 4200000002;
  neighbor fd00::1 as 4200000001;
  hold time {hold};
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  graceful restart on;
  ipv6 {{ import all; export all; }};
}}
"#
    )
}

/// BIRD 2 over IPv4 and IPv6 transport, 4-octet ASes on both sides, both speakers connecting at once
/// (so RFC 4271 6.8 collision resolution runs for real), routes and End-of-RIB both ways.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_sessions_ipv4_ipv6_four_octet_as_and_end_of_rib() {
    let t = "bird_sessions_ipv4_ipv6_four_octet_as_and_end_of_rib";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sb");
    let bird = Bird::start(&link.peer_ns, &bird_conf(9));
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let p4 = spawn_peer(
            peer_cfg("10.0.0.2", 4200000002, 4200000001),
            None,
            tx.clone(),
        );
        let p6 = spawn_peer(peer_cfg("fd00::2", 4200000002, 4200000001), None, tx);
        let mut seen = Vec::new();
        let mut sessions = std::collections::HashMap::new();
        for peer in [ip("10.0.0.2"), ip("fd00::2")] {
            let ev = expect_event(
                &mut rx,
                &mut seen,
                "Established",
                |e| matches!(e, SessionEvent::Established { peer: p, .. } if *p == peer),
            )
            .await;
            let SessionEvent::Established {
                negotiated,
                session,
                ..
            } = ev
            else {
                unreachable!()
            };
            assert_eq!(negotiated.peer_as, 4200000002);
            assert!(negotiated.four_octet_as);
            assert_eq!(negotiated.hold_time, 9);
            assert!(
                negotiated.peer_graceful_restart.is_some(),
                "BIRD has graceful restart on"
            );
            let fam = if peer.is_ipv4() {
                Family::IPV4_UNICAST
            } else {
                Family::IPV6_UNICAST
            };
            assert_eq!(negotiated.families, vec![fam]);
            sessions.insert(peer, (session, fam));
        }
        // BIRD's routes arrive, then its End-of-RIB per family.
        for (peer, want) in [
            (ip("10.0.0.2"), vec!["192.0.2.0/24", "198.51.100.0/24"]),
            (ip("fd00::2"), vec!["2001:db8:1::/48"]),
        ] {
            let fam = sessions[&peer].1;
            let mut got = Vec::new();
            loop {
                let ev = expect_event(&mut rx, &mut seen, "Updates or End-of-RIB", |e| match e {
                    SessionEvent::Updates { peer: p, .. } => *p == peer,
                    SessionEvent::EndOfRib {
                        peer: p, family, ..
                    } => *p == peer && *family == fam,
                    _ => false,
                })
                .await;
                if matches!(ev, SessionEvent::EndOfRib { .. }) {
                    break;
                }
                got.extend(announced(&ev));
            }
            for w in want {
                assert!(
                    got.contains(&net(w)),
                    "{w} from {peer} before End-of-RIB; got {got:?}"
                );
            }
        }

        // Our route and End-of-RIB go the other way.
        let (s4, _) = sessions[&ip("10.0.0.2")];
        let update = Update {
            nlri: vec![Nlri {
                prefix: net("203.0.113.0/24"),
                path_id: 0,
            }],
            attributes: PathAttributes {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath {
                    segments: vec![AsSegment::Sequence(vec![4200000001])],
                }),
                next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Default::default()
            },
            ..Default::default()
        };
        p4.send(PeerCommand::SendUpdateList {
            session: s4,
            updates: vec![update],
        })
        .await
        .expect("send");
        p4.send(PeerCommand::SendEndOfRib {
            session: s4,
            family: Family::IPV4_UNICAST,
        })
        .await
        .expect("send");
        let route = output_until(
            "BIRD to hold 203.0.113.0/24 from margay",
            || bird.birdc("show route 203.0.113.0/24 all"),
            |out| out.contains("203.0.113.0/24") && out.contains("4200000001"),
        )
        .await;
        assert!(route.contains("10.0.0.1"), "next hop as sent: {route}");
        for proto in ["margay4", "margay6"] {
            let out = bird.birdc(&format!("show protocols all {proto}"));
            assert!(out.contains("Established"), "{proto}: {out}");
            assert!(out.contains("4200000001"), "{proto} shows our AS: {out}");
        }
        for p in [&p4, &p6] {
            let st = p.status();
            assert_eq!(st.state, State::Established);
            assert!(
                st.counters.updates_in >= 1 && st.counters.prefixes_in >= 1,
                "{st:#?}"
            );
        }
        p4.shutdown().await;
        p6.shutdown().await;
        // Cease / administrative shutdown reached BIRD.
        output_until(
            "BIRD to see our shutdown",
            || bird.birdc("show protocols all margay4"),
            |out| !out.contains("Established"),
        )
        .await;
    });
    drop(link);
}

/// A wrong peer AS keeps the session down and says why in plain words, on both sides.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_wrong_as_keeps_session_down_with_plain_reason() {
    let t = "bird_wrong_as_keeps_session_down_with_plain_reason";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sw");
    let bird = Bird::start(&link.peer_ns, &bird_conf(9));
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let p = spawn_peer(peer_cfg("10.0.0.2", 65099, 4200000001), None, tx);
        let want = "OPEN from 10.0.0.2: bad peer AS 4200000002, expected 65099";
        status_until(&p, want, |s| s.last_error.as_deref() == Some(want)).await;
        // BIRD got our NOTIFICATION (OPEN error / bad peer AS).
        output_until(
            "BIRD to report the bad peer AS NOTIFICATION",
            || bird.birdc("show protocols all margay4"),
            |out| out.to_lowercase().contains("bad peer as"),
        )
        .await;
        assert_ne!(p.status().state, State::Established);
        while let Ok(ev) = rx.try_recv() {
            assert!(
                !matches!(ev, SessionEvent::Established { .. }),
                "must never establish: {ev:?}"
            );
        }
        p.shutdown().await;
    });
    drop(link);
}

/// A peer that freezes (SIGSTOP) stops sending KEEPALIVEs: the hold timer expires, the RIB hears Down
/// with the peer's graceful restart parameters (it should keep the routes stale), and the status says
/// "hold timer expired".
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_hold_timer_expires_when_peer_is_stopped() {
    let t = "bird_hold_timer_expires_when_peer_is_stopped";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sh");
    // BIRD listens on a non-standard port here, so the peer's port setting is exercised too.
    let conf = bird_conf_v4(3).replace("local 10.0.0.2 as", "local 10.0.0.2 port 1790 as");
    let bird = Bird::start(&link.peer_ns, &conf);
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        cfg.peer_port = 1790;
        cfg.timers.hold_time = 3;
        let p = spawn_peer(cfg, None, tx);
        let mut seen = Vec::new();
        established(&mut rx, &mut seen, "Established").await;
        bird.stop_signal();
        let ev = expect_event(&mut rx, &mut seen, "Down", |e| {
            matches!(e, SessionEvent::Down { .. })
        })
        .await;
        bird.cont_signal();
        let SessionEvent::Down {
            reason,
            graceful_restart,
            ..
        } = ev
        else {
            unreachable!()
        };
        assert_eq!(reason, "hold timer expired");
        let gr = graceful_restart.expect("BIRD is GR-capable: routes kept stale");
        assert_eq!(gr.restart_time, 120, "BIRD's default restart time");
        assert_eq!(p.status().last_error.as_deref(), Some("hold timer expired"));
        p.shutdown().await;
    });
    drop(link);
}

fn gobgp_conf(password: &str) -> String {
    format!(
        r#"
[global.config]
  as = 4200000002
  router-id = "10.0.0.2"
  local-address-list = ["10.0.0.2"]
[[neighbors]]
  [neighbors.config]
    neighbor-address = "10.0.0.1"
    peer-as = 4200000001
    auth-password = "{password}"
  [neighbors.timers.config]
    connect-retry = 1
    hold-time = 9
    keepalive-interval = 3
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv4-unicast"
  [[neighbors.afi-safis]]
    [neighbors.afi-safis.config]
      afi-safi-name = "ipv6-unicast"
"#
    )
}

/// GoBGP (4-octet ASes) with a TCP MD5 password: the right password establishes (and GoBGP's route arrives); a wrong
/// one keeps the session down (the kernel drops unsigned or wrongly signed segments).
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn gobgp_md5_password_right_and_wrong() {
    let t = "gobgp_md5_password_right_and_wrong";
    if !prereqs(t, have_gobgp(), "gobgpd") {
        return;
    }
    let link = Link::new("sg");
    let gobgp = GoBgp::start(&link.peer_ns, &gobgp_conf("s3cret-md5"));
    common::sh(&format!(
        "ip netns exec {} gobgp -u 127.0.0.1 -p {} global rib add -a ipv4 10.10.0.0/24 nexthop 10.0.0.2",
        gobgp.ns, gobgp.api_port
    ));
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        cfg.password = Some(Password("s3cret-md5".into()));
        let p = spawn_peer(cfg.clone(), None, tx.clone());
        let mut seen = Vec::new();
        let (_, negotiated) = established(&mut rx, &mut seen, "Established").await;
        assert_eq!(
            negotiated.families,
            vec![Family::IPV4_UNICAST, Family::IPV6_UNICAST]
        );
        let mut got = Vec::new();
        while !got.contains(&net("10.10.0.0/24")) {
            let ev = expect_event(&mut rx, &mut seen, "GoBGP's route", |e| {
                matches!(e, SessionEvent::Updates { .. })
            })
            .await;
            got.extend(announced(&ev));
        }
        output_until(
            "gobgp to show the neighbor Established",
            || gobgp.gobgp("neighbor"),
            |out| out.contains("10.0.0.1") && out.contains("Establ"),
        )
        .await;
        p.shutdown().await;
        output_until(
            "gobgp to see the session go",
            || gobgp.gobgp("neighbor"),
            |out| !out.contains("Establ"),
        )
        .await;

        // Now the wrong password: our SYNs carry a signature GoBGP's kernel rejects.
        let (tx2, mut rx2) = mpsc::channel(1024);
        cfg.password = Some(Password("wrong-password".into()));
        let bad = spawn_peer(cfg, None, tx2);
        status_until(&bad, "a failed connect", |s| {
            s.last_error
                .as_deref()
                .is_some_and(|e| e.starts_with("connect: "))
        })
        .await;
        let st = bad.status();
        assert_ne!(st.state, State::Established, "{st:#?}");
        assert_eq!(st.counters.established, 0);
        while let Ok(ev) = rx2.try_recv() {
            assert!(
                !matches!(ev, SessionEvent::Established { .. }),
                "must never establish: {ev:?}"
            );
        }
        let out = gobgp.gobgp("neighbor");
        assert!(!out.contains("Establ"), "{out}");
        bad.shutdown().await;
    });
    drop(link);
}

/// FRR connects to margay over IPv6 (iBGP, AS 65000); margay is passive and gets the connection from
/// the shared listener, which also holds the TCP MD5 key for the peer.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn frr_ipv6_passive_session_through_listener_with_md5() {
    let t = "frr_ipv6_passive_session_through_listener_with_md5";
    if !prereqs(t, have_frr(), "frr") {
        return;
    }
    let link = Link::new("sf");
    let conf = r#"
hostname frr
log stdout debugging
router bgp 65000
 bgp router-id 10.0.0.2
 no bgp ebgp-requires-policy
 no bgp network import-check
 no bgp default ipv4-unicast
 neighbor fd00::1 remote-as 65000
 neighbor fd00::1 password frr-md5-key
 neighbor fd00::1 timers connect 1
 address-family ipv6 unicast
  network 2001:db8:2::/48
  neighbor fd00::1 activate
 exit-address-family
"#;
    let frr = Frr::start(&link.peer_ns, conf);
    in_netns(&link.margay_ns, move || async move {
        let listener = Listener::bind(&[SocketAddr::new(ip("fd00::1"), 179)])
            .await
            .expect("bind listener");
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("fd00::2", 65000, 65000);
        cfg.passive = true;
        cfg.password = Some(Password("frr-md5-key".into()));
        let p = spawn_peer(cfg, Some(listener.handle()), tx);
        let mut seen = Vec::new();
        let (_, negotiated) = established(&mut rx, &mut seen, "Established").await;
        assert!(negotiated.is_ibgp());
        assert_eq!(negotiated.families, vec![Family::IPV6_UNICAST]);
        let mut got = Vec::new();
        loop {
            let ev = expect_event(&mut rx, &mut seen, "FRR's route and End-of-RIB", |e| {
                matches!(
                    e,
                    SessionEvent::Updates { .. }
                        | SessionEvent::EndOfRib {
                            family: Family::IPV6_UNICAST,
                            ..
                        }
                )
            })
            .await;
            if matches!(ev, SessionEvent::EndOfRib { .. }) {
                break;
            }
            got.extend(announced(&ev));
        }
        assert!(got.contains(&net("2001:db8:2::/48")), "{got:?}");
        let summary = eventually("FRR to show fd00::1 Established", || {
            let out = frr.vtysh("show bgp summary json");
            let v: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| format!("{e}: {out}"))?;
            let state = v["ipv6Unicast"]["peers"]["fd00::1"]["state"]
                .as_str()
                .unwrap_or("")
                .to_string();
            if state == "Established" {
                Ok(v)
            } else {
                Err(out)
            }
        })
        .await;
        assert_eq!(summary["ipv6Unicast"]["as"].as_u64(), Some(65000));
        p.shutdown().await;
        drop(listener);
    });
    drop(link);
}

/// BIRD killed with SIGKILL: the kernel closes its connections, the RIB hears Down with BIRD's graceful
/// restart parameters (keep its routes stale). BIRD restarted in graceful restart recovery (`-R`)
/// comes back with the Restart State bit set and its End-of-RIB ends the stale period.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_killed_and_restarted_with_graceful_restart() {
    let t = "bird_killed_and_restarted_with_graceful_restart";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sk");
    let mut bird = Bird::start(&link.peer_ns, &bird_conf_v4(9));
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let p = spawn_peer(peer_cfg("10.0.0.2", 4200000002, 4200000001), None, tx);
        let mut seen = Vec::new();
        let (first, _) = established(&mut rx, &mut seen, "Established").await;
        expect_event(&mut rx, &mut seen, "End-of-RIB", |e| {
            matches!(e, SessionEvent::EndOfRib { .. })
        })
        .await;

        bird.kill();
        let ev = expect_event(&mut rx, &mut seen, "Down", |e| {
            matches!(e, SessionEvent::Down { .. })
        })
        .await;
        let SessionEvent::Down {
            session,
            reason,
            graceful_restart,
            ..
        } = ev
        else {
            unreachable!()
        };
        assert_eq!(session, first);
        assert!(
            graceful_restart.is_some(),
            "TCP loss of a GR peer keeps its routes ({reason})"
        );

        bird.restart_with_args(&["-R"]);
        let (second, negotiated) = established(&mut rx, &mut seen, "Established again").await;
        assert!(second > first, "a new session id for the new session");
        let gr = negotiated
            .peer_graceful_restart
            .clone()
            .expect("GR capability");
        assert!(gr.restarting, "BIRD in recovery sets the Restart State bit");
        // RFC 4724 4.1: the restarting speaker defers its route selection until its peers' End-of-RIB;
        // BIRD sends its table only once ours has arrived.
        p.send(PeerCommand::SendEndOfRib {
            session: second,
            family: Family::IPV4_UNICAST,
        })
        .await
        .expect("send");
        let ev = expect_event(&mut rx, &mut seen, "End-of-RIB after the restart", |e| {
            matches!(e, SessionEvent::EndOfRib { .. })
        })
        .await;
        let SessionEvent::EndOfRib {
            session, family, ..
        } = ev
        else {
            unreachable!()
        };
        assert_eq!((session, family), (second, Family::IPV4_UNICAST));
        // Whatever BIRD sent after the restart belongs to the new session.
        for ev in &seen {
            if let SessionEvent::Updates { session, .. } = ev {
                assert!(*session == first || *session == second);
            }
        }
        p.shutdown().await;
    });
    drop(link);
}

/// The listener refuses a speaker nobody configured with a NOTIFICATION (Cease / connection rejected),
/// and a peer that refuses connections shows "connect: connection refused".
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn listener_rejects_unknown_peer_and_refused_connect_is_reported() {
    let t = "listener_rejects_unknown_peer_and_refused_connect_is_reported";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sr");
    // BIRD only connects (passive margay is not configured for it), and does not listen on 179.
    let conf = r#"
router id 10.0.0.2;
protocol device { }
protocol bgp margay4 {
  local 10.0.0.2 port 1790 as 65002;
  neighbor 10.0.0.1 as 65001;
  connect delay time 1; connect retry time 1; error wait time 1, 2;
  ipv4 { import all; export all; };
}
"#;
    let bird = Bird::start(&link.peer_ns, conf);
    in_netns(&link.margay_ns, move || async move {
        let listener = Listener::bind(&[SocketAddr::new(ip("10.0.0.1"), 179)])
            .await
            .expect("bind listener");
        output_until(
            "BIRD to be rejected by margay's listener",
            || bird.birdc("show protocols all margay4"),
            |out| out.to_lowercase().contains("connection rejected"),
        )
        .await;
        let (tx, _rx) = mpsc::channel(16);
        let p = spawn_peer(peer_cfg("10.0.0.2", 65002, 65001), None, tx);
        status_until(&p, "connect: connection refused", |s| {
            s.last_error.as_deref() == Some("connect: connection refused")
        })
        .await;
        assert_eq!(
            p.status().state,
            State::Idle,
            "backing off after the refusal"
        );
        p.shutdown().await;
        drop(listener);
    });
    drop(link);
}

/// GTSM (BGPPeer ttlSecurity) and an explicit source address against BIRD's `ttl security on`.
/// (Without GTSM the outcome depends on whether our first segments beat BIRD's setsockopt(IP_MINTTL)
/// on the accepted socket, so the negative case is not asserted here; tests/session_sockopt.rs checks
/// the socket options themselves.)
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_ttl_security_and_source_address() {
    let t = "bird_ttl_security_and_source_address";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("st");
    let conf = r#"
router id 10.0.0.2;
protocol device { }
protocol bgp margay4 {
  local 10.0.0.2 as 65002;
  neighbor 10.0.0.1 as 65001;
  ttl security on;
  passive on;
  startup hold time 5; hold time 5; error wait time 1, 2;
  ipv4 { import all; export all; };
}
"#;
    let bird = Bird::start(&link.peer_ns, conf);
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("10.0.0.2", 65002, 65001);
        cfg.ttl_security_hops = Some(1);
        cfg.source_addr = Some(ip("10.0.0.1"));
        let p = spawn_peer(cfg, None, tx);
        let mut seen = Vec::new();
        established(&mut rx, &mut seen, "Established").await;
        let out = bird.birdc("show protocols all margay4");
        assert!(out.contains("Established"), "{out}");
        p.shutdown().await;
    });
    drop(link);
}

/// margay itself restarting with graceful restart (RFC 4724 4.1), seen from BIRD: the old session closes
/// without a NOTIFICATION, BIRD keeps margay's route while margay is away and after it comes back with the
/// Restart State bit, and sweeps it once margay's End-of-RIB arrives without it. Without the GR capability
/// the same close makes BIRD drop the route at once (the control case).
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn margay_graceful_restart_bird_keeps_routes_until_end_of_rib() {
    let t = "margay_graceful_restart_bird_keeps_routes_until_end_of_rib";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sm");
    let bird = Bird::start(&link.peer_ns, &bird_conf_v4(9));
    in_netns(&link.margay_ns, move || async move {
        let has_route = || {
            bird.birdc("show route 203.0.113.0/24")
                .contains("203.0.113.0/24")
        };
        let session_down = || {
            let out = bird.birdc("show protocols margay4");
            if out.contains("Established") {
                Err(out)
            } else {
                Ok(())
            }
        };
        let update = Update {
            nlri: vec![Nlri {
                prefix: net("203.0.113.0/24"),
                path_id: 0,
            }],
            attributes: PathAttributes {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath {
                    segments: vec![AsSegment::Sequence(vec![4200000001])],
                }),
                next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Default::default()
            },
            ..Default::default()
        };
        let (tx, mut rx) = mpsc::channel(1024);
        let mut seen = Vec::new();
        // Up, advertise, End-of-RIB; wait until BIRD holds the route.
        async fn up_and_advertise(
            cfg: PeerConfig,
            tx: mpsc::Sender<SessionEvent>,
            rx: &mut mpsc::Receiver<SessionEvent>,
            seen: &mut Vec<SessionEvent>,
            update: &Update,
        ) -> PeerHandle {
            let p = spawn_peer(cfg, None, tx);
            let (session, _) = established(rx, seen, "Established").await;
            let updates = vec![update.clone()];
            p.send(PeerCommand::SendUpdateList { session, updates })
                .await
                .expect("send");
            p.send(PeerCommand::SendEndOfRib {
                session,
                family: Family::IPV4_UNICAST,
            })
            .await
            .expect("send");
            p
        }

        // Control: no GR capability, so the close is a plain session loss for BIRD.
        let mut no_gr = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        no_gr.graceful_restart = None;
        let p = up_and_advertise(no_gr, tx.clone(), &mut rx, &mut seen, &update).await;
        eventually("BIRD to hold our route", || {
            if has_route() {
                Ok(())
            } else {
                Err("no route".into())
            }
        })
        .await;
        p.shutdown_for_restart().await;
        eventually("BIRD to drop the route of a non-GR peer", || {
            if has_route() {
                Err(bird.birdc("show route 203.0.113.0/24 all"))
            } else {
                Ok(())
            }
        })
        .await;

        // With GR (forwarding preserved): the route survives the restart.
        let mut gr = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        if let Some(g) = gr.graceful_restart.as_mut() {
            g.forwarding_preserved = true;
        }
        let p = up_and_advertise(gr.clone(), tx.clone(), &mut rx, &mut seen, &update).await;
        eventually("BIRD to hold our route", || {
            if has_route() {
                Ok(())
            } else {
                Err("no route".into())
            }
        })
        .await;
        p.shutdown_for_restart().await;
        eventually("BIRD to see the session go", session_down).await;
        assert!(
            has_route(),
            "BIRD keeps a GR peer's route while it restarts:\n{}",
            bird.birdc("show route all")
        );

        // Back with the Restart State bit; the route stays until our End-of-RIB, which comes without it.
        let mut restarted = gr;
        if let Some(g) = restarted.graceful_restart.as_mut() {
            g.restarting = true;
        }
        let p = spawn_peer(restarted, None, tx);
        let (session, _) = established(&mut rx, &mut seen, "Established after restart").await;
        assert!(has_route(), "still kept before our End-of-RIB");
        p.send(PeerCommand::SendEndOfRib {
            session,
            family: Family::IPV4_UNICAST,
        })
        .await
        .expect("send");
        eventually("BIRD to sweep the stale route after End-of-RIB", || {
            if has_route() {
                Err(bird.birdc("show route 203.0.113.0/24 all"))
            } else {
                Ok(())
            }
        })
        .await;
        p.shutdown().await;
    });
    drop(link);
}

/// ADD-PATH (RFC 7911) as Calico configures BIRD (`add paths on`): negotiated both ways, and BIRD's
/// UPDATEs, which then carry path identifiers, decode into the right prefixes; ours reach BIRD too.
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bird_add_path_negotiated_and_decoded() {
    let t = "bird_add_path_negotiated_and_decoded";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("sa");
    let conf = bird_conf_v4(9).replace(
        "ipv4 { import all; export all; };",
        "ipv4 { import all; export all; add paths on; };",
    );
    assert!(conf.contains("add paths on"), "{conf}");
    let bird = Bird::start(&link.peer_ns, &conf);
    in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        cfg.add_path = vec![(Family::IPV4_UNICAST, margay::bgp::wire::AddPathMode::Both)];
        let p = spawn_peer(cfg, None, tx);
        let mut seen = Vec::new();
        let (session, negotiated) = established(&mut rx, &mut seen, "Established").await;
        assert_eq!(negotiated.add_path_rx, vec![Family::IPV4_UNICAST]);
        assert_eq!(negotiated.add_path_tx, vec![Family::IPV4_UNICAST]);
        let mut got = Vec::new();
        let mut path_ids = Vec::new();
        loop {
            let ev = expect_event(&mut rx, &mut seen, "Updates or End-of-RIB", |e| {
                matches!(
                    e,
                    SessionEvent::Updates { .. } | SessionEvent::EndOfRib { .. }
                )
            })
            .await;
            if let SessionEvent::Updates { updates, .. } = &ev {
                path_ids.extend(
                    updates
                        .iter()
                        .flat_map(|u| u.nlri.iter().map(|n| n.path_id)),
                );
            }
            if matches!(ev, SessionEvent::EndOfRib { .. }) {
                break;
            }
            got.extend(announced(&ev));
        }
        got.sort();
        assert_eq!(got, vec![net("192.0.2.0/24"), net("198.51.100.0/24")]);
        assert!(
            path_ids.iter().all(|id| *id != 0),
            "BIRD numbers its paths: {path_ids:?}"
        );
        let update = Update {
            nlri: vec![Nlri {
                prefix: net("203.0.113.0/24"),
                path_id: 7,
            }],
            attributes: PathAttributes {
                origin: Some(Origin::Igp),
                as_path: Some(AsPath {
                    segments: vec![AsSegment::Sequence(vec![4200000001])],
                }),
                next_hop: Some(Ipv4Addr::new(10, 0, 0, 1)),
                ..Default::default()
            },
            ..Default::default()
        };
        p.send(PeerCommand::SendUpdateList {
            session,
            updates: vec![update],
        })
        .await
        .expect("send");
        output_until(
            "BIRD to hold our route sent with a path id",
            || bird.birdc("show route 203.0.113.0/24"),
            |out| out.contains("203.0.113.0/24"),
        )
        .await;
        p.shutdown().await;
    });
    drop(link);
}

/// RFC 9494 interop: BIRD 2 with `long lived graceful restart on` and margay with a Long-Lived Stale Time
/// negotiate LLGR both ways: margay sees BIRD's capability (its stale time capped by ours) and BIRD's
/// `show protocols all` lists the capability margay sent.
#[test]
#[ignore = "needs root (network namespaces) and BIRD 2: scripts/test.sh runs it (--include-ignored)"]
fn bird_negotiates_long_lived_graceful_restart() {
    let t = "bird_negotiates_long_lived_graceful_restart";
    if !prereqs(t, have_bird(), "bird2") {
        return;
    }
    let link = Link::new("ll");
    let conf = bird_conf_v4(9).replace(
        "graceful restart on;",
        "graceful restart on; long lived graceful restart on; long lived stale time 3600;",
    );
    let bird = Bird::start(&link.peer_ns, &conf);
    let (negotiated, out) = in_netns(&link.margay_ns, move || async move {
        let (tx, mut rx) = mpsc::channel(1024);
        let mut cfg = peer_cfg("10.0.0.2", 4200000002, 4200000001);
        cfg.families = vec![margay::bgp::wire::Family::IPV4_UNICAST];
        if let Some(gr) = cfg.graceful_restart.as_mut() {
            gr.long_lived_stale_time = 600;
            gr.long_lived_forwarding_preserved = true;
        }
        let p = spawn_peer(cfg, None, tx);
        let mut seen = Vec::new();
        let (_, negotiated) = established(&mut rx, &mut seen, "Established").await;
        // BIRD's view while the session is up (it may take a moment to reach Established itself).
        let mut out = String::new();
        for _ in 0..20 {
            out = bird.birdc("show protocols all margay4");
            if out.contains("Established") {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p.shutdown().await;
        (negotiated, out)
    });
    let ll = negotiated
        .peer_graceful_restart
        .as_ref()
        .and_then(|g| g.long_lived.clone())
        .expect("LLGR negotiated with BIRD");
    assert!(
        ll.iter()
            .any(|l| l.family == margay::bgp::wire::Family::IPV4_UNICAST && l.stale_time == 600),
        "BIRD's 3600 s capped to our 600 s: {ll:?}"
    );
    println!("{out}");
    // BIRD lists it under its own capabilities and under the neighbour's (what margay sent).
    assert!(
        out.matches("Long-lived graceful restart").count() >= 2,
        "BIRD does not list LLGR on both sides: {out}"
    );
    drop(link);
}
