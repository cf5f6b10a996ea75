//! Long-lived graceful restart, helper side (RFC 9494 4.2-4.5), on the Sans-IO RIB: when the restart time of
//! an LLGR peer ends its routes stay, marked LLGR_STALE, least preferred, still in the FIB while nothing better
//! exists, re-advertised with the community to LLGR peers and withdrawn from the others; NO_LLGR routes go;
//! they are swept at the peer's End-of-RIB after it returns or when the Long-Lived Stale Time runs out.
//!
//! ```text
//!   peer 1 (AS 65001, GR 60 s + LLGR 1000 s) ──▶ RIB ──▶ peer 2 (iBGP, LLGR)      gets LLGR_STALE routes
//!   peer 4 (AS 65004, longer path, optional) ──▶     ──▶ peer 3 (iBGP, no LLGR)   gets withdrawals
//! ```

use crate::rib_common;

use std::time::Duration;

use margay::bgp::rib::{FibEvent, PeerId, PeerInfo, RibInput};
use margay::bgp::wire::{Family, PathAttributes, LLGR_STALE, NO_LLGR};
use rib_common::*;

const RESTART: u64 = 60;
const STALE: u64 = 1000;

fn llgr_peer(n: u8, asn: u32, restart: u64) -> PeerInfo {
    PeerInfo {
        graceful_restart: llgr(restart, STALE),
        ..peer(n, asn)
    }
}

/// Peer 1 (the LLGR source), peer 2 (iBGP, LLGR) and peer 3 (iBGP, GR only), peer 1 announcing `prefixes`.
fn setup(restart: u64, prefixes: &[&str]) -> Harness {
    let mut h = Harness::new();
    h.up(1, llgr_peer(1, 65001, restart));
    h.up(2, llgr_peer(2, LOCAL_AS, 120));
    h.up(
        3,
        PeerInfo {
            graceful_restart: gr(120),
            ..peer(3, LOCAL_AS)
        },
    );
    h.announce(1, prefixes, attrs(&[65001], "10.0.0.1"));
    h.rib.take_fib_events();
    h
}

fn marked(a: &PathAttributes) -> bool {
    a.communities.contains(&LLGR_STALE)
}

fn counters(h: &Harness, id: u32) -> Option<(bool, u64, u64)> {
    h.rib
        .summary()
        .peers
        .into_iter()
        .find(|p| p.peer == Some(PeerId(id)))
        .map(|p| (p.up, p.stale, p.llgr_stale))
}

#[test]
fn after_the_restart_time_routes_stay_marked_llgr_stale_in_the_fib() {
    let mut h = setup(RESTART, &["10.1.0.0/24", "10.2.0.0/24"]);
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART - 1));
    let b = h.best("10.1.0.0/24").expect("kept in the GR phase");
    assert!(b.stale && !b.llgr_stale, "GR phase: stale, not yet LLGR");
    assert!(!marked(
        &h.holds(2, "10.1.0.0/24").expect("peer 2 holds it")
    ));

    h.advance(Duration::from_secs(2));
    let b = h.best("10.1.0.0/24").expect("kept past the restart time");
    assert!(b.stale && b.llgr_stale && marked(&b.attrs), "{b:?}");
    assert_eq!(counters(&h, 1), Some((false, 2, 2)));
    assert!(
        h.rib.take_fib_events().is_empty(),
        "the FIB keeps the route: nothing better exists"
    );
    // RFC 9494 4.5: re-advertised with LLGR_STALE to the LLGR peer, withdrawn from the other.
    let to_llgr = h.holds(2, "10.1.0.0/24").expect("LLGR peer keeps it");
    assert!(marked(&to_llgr), "sent with LLGR_STALE: {to_llgr:?}");
    assert!(
        h.holds(3, "10.1.0.0/24").is_none() && h.holds(3, "10.2.0.0/24").is_none(),
        "withdrawn from the peer without LLGR"
    );
}

#[test]
fn no_llgr_routes_are_dropped_instead_of_kept() {
    let mut h = setup(RESTART, &["10.1.0.0/24"]);
    let mut a = attrs(&[65001], "10.0.0.1");
    a.communities = vec![NO_LLGR];
    h.announce(1, &["10.9.0.0/24"], a);
    h.rib.take_fib_events();
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 1));
    assert!(h.best("10.9.0.0/24").is_none(), "NO_LLGR: dropped");
    assert!(h.holds(2, "10.9.0.0/24").is_none());
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Remove {
            prefix: net("10.9.0.0/24")
        }]
    );
    assert!(h.best("10.1.0.0/24").is_some_and(|b| b.llgr_stale));
}

#[test]
fn llgr_stale_routes_lose_to_any_other_route() {
    let mut h = setup(RESTART, &["10.1.0.0/24"]);
    // Worse on every step but one: a longer AS path from another peer.
    h.up(4, peer(4, 65004));
    h.announce(4, &["10.1.0.0/24"], attrs(&[65004, 1, 2, 3], "10.0.0.4"));
    assert_eq!(h.best_from("10.1.0.0/24"), Some(ip("10.0.0.1")));
    h.rib.take_fib_events();
    h.down(1, true);
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        Some(ip("10.0.0.1")),
        "GR phase: the stale path keeps its rank (RFC 4724)"
    );
    h.advance(Duration::from_secs(RESTART + 1));
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        Some(ip("10.0.0.4")),
        "RFC 9494 4.3: LLGR_STALE is least preferred"
    );
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec![ip("10.0.0.4")],
        }]
    );
    // The better route goes; the stale one is installed again (the only one left).
    h.withdraw(4, &["10.1.0.0/24"]);
    assert_eq!(h.best_from("10.1.0.0/24"), Some(ip("10.0.0.1")));
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec![ip("10.0.0.1")],
        }]
    );
}

#[test]
fn received_llgr_stale_routes_are_least_preferred_and_not_sent_to_peers_without_llgr() {
    let mut h = setup(RESTART, &[]);
    // A reflector re-advertising a route it keeps long-lived stale (RFC 9494 4.5).
    let mut a = attrs(&[65001], "10.0.0.1");
    a.communities = vec![LLGR_STALE];
    h.announce(1, &["10.5.0.0/24"], a);
    assert!(h.holds(2, "10.5.0.0/24").is_some_and(|a| marked(&a)));
    assert!(h.holds(3, "10.5.0.0/24").is_none(), "never sent to peer 3");
    h.up(4, peer(4, 65004));
    h.announce(4, &["10.5.0.0/24"], attrs(&[65004, 1, 2, 3], "10.0.0.4"));
    assert_eq!(h.best_from("10.5.0.0/24"), Some(ip("10.0.0.4")));
    assert!(
        h.holds(3, "10.5.0.0/24").is_some(),
        "the fresh path goes to everyone"
    );
}

#[test]
fn zero_restart_time_goes_straight_to_llgr() {
    let mut h = setup(0, &["10.1.0.0/24"]);
    h.down(1, true);
    let b = h.best("10.1.0.0/24").expect("kept at once, long-lived");
    assert!(b.llgr_stale);
    assert!(h.holds(3, "10.1.0.0/24").is_none());
    assert!(h.rib.take_fib_events().is_empty());
}

#[test]
fn the_long_lived_stale_time_ends_it() {
    let mut h = setup(RESTART, &["10.1.0.0/24"]);
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + STALE - 1));
    assert!(h.best("10.1.0.0/24").is_some_and(|b| b.llgr_stale));
    h.advance(Duration::from_secs(2));
    assert!(h.best("10.1.0.0/24").is_none(), "swept at the stale time");
    assert!(h.holds(2, "10.1.0.0/24").is_none());
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Remove {
            prefix: net("10.1.0.0/24")
        }]
    );
    assert_eq!(counters(&h, 1), None, "peer forgotten");
    assert_eq!(h.rib.next_deadline(), None);
}

#[test]
fn the_peer_returns_refreshed_routes_lose_the_mark_the_rest_go_at_end_of_rib() {
    let mut h = setup(RESTART, &["10.1.0.0/24", "10.2.0.0/24"]);
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 100));
    h.up(1, llgr_peer(1, 65001, RESTART));
    assert!(
        h.best("10.1.0.0/24").is_some_and(|b| b.llgr_stale),
        "still stale until re-announced"
    );
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    let b = h.best("10.1.0.0/24").expect("refreshed");
    assert!(!b.stale && !b.llgr_stale && !marked(&b.attrs));
    assert!(h.holds(2, "10.1.0.0/24").is_some_and(|a| !marked(&a)));
    assert!(
        h.holds(3, "10.1.0.0/24").is_some(),
        "fresh again: back to the peer without LLGR"
    );
    h.input(RibInput::EndOfRib {
        peer: PeerId(1),
        family: Family::IPV4_UNICAST,
    });
    assert!(h.best("10.2.0.0/24").is_none(), "not refreshed: swept");
    assert_eq!(counters(&h, 1), Some((true, 0, 0)));
    assert_eq!(h.rib.next_deadline(), None);
}

#[test]
fn a_return_without_the_llgr_f_bit_sweeps_at_once() {
    let mut h = setup(RESTART, &["10.1.0.0/24"]);
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 1));
    let mut info = llgr_peer(1, 65001, RESTART);
    if let Some(l) = info
        .graceful_restart
        .as_mut()
        .and_then(|g| g.long_lived.as_mut())
    {
        l.forwarding_preserved.clear();
    }
    h.up(1, info);
    assert!(h.best("10.1.0.0/24").is_none(), "RFC 9494 4.2: F bit clear");

    // And a return whose session has no LLGR at all.
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 1));
    h.up(
        1,
        PeerInfo {
            graceful_restart: gr(RESTART),
            ..peer(1, 65001)
        },
    );
    assert!(
        h.best("10.1.0.0/24").is_none(),
        "no LLGR on the new session"
    );
}

#[test]
fn flaps_do_not_restart_the_long_lived_stale_time() {
    let mut h = setup(RESTART, &["10.1.0.0/24"]);
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 500));
    // Back, but down again before End-of-RIB: the running stale time goes on.
    h.up(1, llgr_peer(1, 65001, RESTART));
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 1));
    assert!(h.best("10.1.0.0/24").is_some_and(|b| b.llgr_stale));
    h.advance(Duration::from_secs(STALE - 500 - RESTART));
    assert!(
        h.best("10.1.0.0/24").is_none(),
        "swept at the first outage's stale time, not a fresh one"
    );
}

#[test]
fn without_llgr_on_the_session_the_restart_time_still_ends_everything() {
    let mut h = Harness::new();
    h.up(
        1,
        PeerInfo {
            graceful_restart: gr(RESTART),
            ..peer(1, 65001)
        },
    );
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.down(1, true);
    h.advance(Duration::from_secs(RESTART + 1));
    assert!(h.best("10.1.0.0/24").is_none());
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("ip")
}
