//! Graceful restart, helper side (RFC 4724 4.2): a GR-capable peer's routes stay, stale, when its session
//! drops; they are swept after its End-of-RIB (keeping what it re-announced) or when the restart time runs
//! out; a non-graceful loss removes them at once.

use crate::rib_common;

use std::time::Duration;

use margay::bgp::rib::{PeerGracefulRestart, PeerId, PeerInfo, RibInput, RibOutput};
use margay::bgp::wire::Family;
use rib_common::*;

fn gr_peer(n: u8, restart: u64) -> PeerInfo {
    PeerInfo {
        graceful_restart: gr(restart),
        ..peer(n, 65001)
    }
}

fn stale(h: &Harness, p: &str) -> Option<bool> {
    h.best(p).map(|v| v.stale)
}

#[test]
fn stale_routes_survive_the_drop_and_are_swept_after_end_of_rib() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 120));
    h.up(2, peer(2, LOCAL_AS));
    h.announce(
        1,
        &["10.1.0.0/24", "10.2.0.0/24"],
        attrs(&[65001], "10.0.0.1"),
    );
    h.rib.take_fib_events();

    h.down(1, true);
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(true));
    assert!(
        h.holds(2, "10.1.0.0/24").is_some(),
        "other peers keep the route through the restart"
    );
    assert!(
        h.rib.take_fib_events().is_empty(),
        "the FIB keeps forwarding"
    );
    let c = h
        .rib
        .summary()
        .peers
        .into_iter()
        .find(|p| p.peer == Some(PeerId(1)))
        .expect("peer kept");
    assert_eq!((c.up, c.stale, c.accepted), (false, 2, 2));

    // Back up: re-announces one of the two, then End-of-RIB.
    h.advance(Duration::from_secs(30));
    h.up(1, gr_peer(1, 120));
    assert_eq!(
        stale(&h, "10.1.0.0/24"),
        Some(true),
        "still stale until re-announced"
    );
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(false));
    h.input(RibInput::EndOfRib {
        peer: PeerId(1),
        family: Family::IPV4_UNICAST,
    });
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(false));
    assert!(
        h.best("10.2.0.0/24").is_none(),
        "not re-announced before End-of-RIB: swept"
    );
    assert!(
        h.holds(2, "10.2.0.0/24").is_none(),
        "and withdrawn from the other peers"
    );
    assert!(h.holds(2, "10.1.0.0/24").is_some());
    assert_eq!(h.rib.next_deadline(), None);
}

#[test]
fn restart_time_expiry_sweeps_everything() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 60));
    h.up(2, peer(2, LOCAL_AS));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.down(1, true);
    h.advance(Duration::from_secs(59));
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(true));
    h.advance(Duration::from_secs(2));
    assert!(h.best("10.1.0.0/24").is_none());
    assert!(h.holds(2, "10.1.0.0/24").is_none());
    assert!(
        h.rib
            .summary()
            .peers
            .iter()
            .all(|p| p.peer != Some(PeerId(1))),
        "peer forgotten"
    );
}

#[test]
fn no_end_of_rib_after_return_bounded_by_stale_time() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 60));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.down(1, true);
    h.up(1, gr_peer(1, 60));
    h.advance(Duration::from_secs(359));
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(true));
    h.advance(Duration::from_secs(2));
    assert!(
        h.best("10.1.0.0/24").is_none(),
        "stale-routes time (360 s) elapsed"
    );
}

#[test]
fn non_graceful_loss_and_peers_without_gr_drop_routes_at_once() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 120));
    h.up(3, peer(3, 65003));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.announce(3, &["10.3.0.0/24"], attrs(&[65003], "10.0.0.3"));
    h.down(1, false);
    assert!(
        h.best("10.1.0.0/24").is_none(),
        "NOTIFICATION / admin down: no GR"
    );
    h.down(3, true);
    assert!(
        h.best("10.3.0.0/24").is_none(),
        "peer 3 never advertised GR"
    );
}

#[test]
fn forwarding_state_not_preserved_sweeps_on_return() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 120));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.announce(1, &["fd01::/64"], attrs6(&[65001], "fd00::1"));
    h.down(1, true);
    // Back, but the F bit is set for IPv6 only: IPv4 stale routes go at once (RFC 4724 4.2).
    let info = PeerInfo {
        graceful_restart: Some(PeerGracefulRestart {
            restart_time: Duration::from_secs(120),
            forwarding_preserved: vec![Family::IPV6_UNICAST],
            long_lived: None,
        }),
        ..peer(1, 65001)
    };
    h.up(1, info);
    assert!(h.best("10.1.0.0/24").is_none());
    assert_eq!(stale(&h, "fd01::/64"), Some(true));
    h.input(RibInput::EndOfRib {
        peer: PeerId(1),
        family: Family::IPV6_UNICAST,
    });
    assert!(h.best("fd01::/64").is_none());
}

#[test]
fn stale_paths_lose_nothing_in_the_decision_and_are_replaced_by_fresh_ones() {
    let mut h = Harness::new();
    h.up(1, gr_peer(1, 120));
    h.up(2, peer(2, 65002));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.announce(2, &["10.1.0.0/24"], attrs(&[65002, 1], "10.0.0.2"));
    h.down(1, true);
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        Some("10.0.0.1".parse().expect("ip")),
        "stale path still best"
    );
    // A second graceful loss while already down is ignored; a non-graceful one ends the wait.
    h.down(1, true);
    assert_eq!(stale(&h, "10.1.0.0/24"), Some(true));
    h.down(1, false);
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        Some("10.0.0.2".parse().expect("ip"))
    );
}

/// Restarting speaker (RFC 4724 4.1): with selection deferred, peers that come back get nothing, not
/// even End-of-RIB, until the deferral ends; then each gets the whole table (including what the peers
/// that came back later sent meanwhile) followed by End-of-RIB.
#[test]
fn deferred_selection_sends_nothing_until_it_ends_then_the_whole_table() {
    let mut h = Harness::new();
    let until = h.now + Duration::from_secs(60);
    h.input(RibInput::DeferSelection { until });
    assert!(h.rib.deferring());
    h.up(1, gr_peer(1, 120));
    h.announce(1, &["10.1.0.0/24"], attrs(&[], "10.0.0.1"));
    h.input(RibInput::EndOfRib {
        peer: PeerId(1),
        family: Family::IPV4_UNICAST,
    });
    h.up(2, gr_peer(2, 120));
    h.announce(2, &["10.2.0.0/24"], attrs(&[], "10.0.0.2"));
    h.advance(Duration::from_secs(5));
    for id in [1, 2] {
        assert!(
            h.take_log(id).is_empty(),
            "peer {id} got output while selection was deferred"
        );
    }
    // Routes are still selected meanwhile (only the sending waits).
    assert!(h.best("10.2.0.0/24").is_some());

    h.input(RibInput::EndDeferral);
    assert!(!h.rib.deferring());
    assert!(
        h.holds(1, "10.2.0.0/24").is_some(),
        "peer 1 gets peer 2's route"
    );
    assert!(
        h.holds(2, "10.1.0.0/24").is_some(),
        "peer 2 gets peer 1's route"
    );
    for id in [1, 2] {
        let log = h.take_log(id);
        assert!(
            table_then_end_of_rib(&log),
            "peer {id}: the table, then End-of-RIB: {log:?}"
        );
    }
    // After the deferral, changes flow at once again.
    h.announce(1, &["10.3.0.0/24"], attrs(&[], "10.0.0.1"));
    assert!(h.holds(2, "10.3.0.0/24").is_some());
    // A second EndDeferral does not send the table again.
    h.input(RibInput::EndDeferral);
    assert!(h
        .take_log(1)
        .iter()
        .all(|m| !matches!(m, RibOutput::EndOfRib(_))));
}

/// The deferral is bounded by its own deadline, whatever the owner does.
#[test]
fn deferred_selection_ends_at_its_deadline() {
    let mut h = Harness::new();
    h.input(RibInput::DeferSelection {
        until: h.now + Duration::from_secs(60),
    });
    h.up(1, gr_peer(1, 120));
    h.up(2, gr_peer(2, 120));
    h.announce(2, &["10.2.0.0/24"], attrs(&[], "10.0.0.2"));
    assert_eq!(h.rib.next_deadline(), Some(h.now + Duration::from_secs(60)));
    h.advance(Duration::from_secs(59));
    assert!(h.take_log(1).is_empty());
    h.advance(Duration::from_secs(2));
    assert!(!h.rib.deferring());
    assert!(h.holds(1, "10.2.0.0/24").is_some());
    let log = h.take_log(1);
    assert!(table_then_end_of_rib(&log), "{log:?}");
}

/// Updates first, then End-of-RIB for IPv4 (and nothing but End-of-RIB markers after it).
fn table_then_end_of_rib(log: &[RibOutput]) -> bool {
    let first_eor = log.iter().position(|m| matches!(m, RibOutput::EndOfRib(_)));
    first_eor.is_some_and(|i| {
        i > 0
            && log[i..].iter().all(|m| matches!(m, RibOutput::EndOfRib(_)))
            && log[i..]
                .iter()
                .any(|m| matches!(m, RibOutput::EndOfRib(Family::IPV4_UNICAST)))
    })
}
