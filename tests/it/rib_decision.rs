//! Every step of the RFC 4271 9.1.2.2 decision process (with RFC 4456 9's ORIGINATOR_ID / CLUSTER_LIST
//! tie-breaks) and the ECMP set handed to the FIB.

use crate::rib_common;

use std::net::IpAddr;

use margay::bgp::rib::{FibEvent, PathSource, PeerId};
use margay::bgp::wire::{AsPath, AsSegment, Origin};
use rib_common::*;

fn a(n: u8) -> Option<IpAddr> {
    Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, n)))
}

#[test]
fn higher_local_pref_wins_on_ibgp() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.up(2, peer(2, LOCAL_AS));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    h.announce(
        2,
        &["10.1.0.0/24"],
        PathAttributes {
            local_pref: Some(200),
            ..attrs(&[65001, 65002, 65003], "10.0.0.2")
        },
    );
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        a(2),
        "LOCAL_PREF 200 beats 100 despite a longer AS path"
    );
}

#[test]
fn local_pref_from_ebgp_is_ignored() {
    let mut h = Harness::new();
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    // An eBGP peer cannot raise its own preference (RFC 4271 5.1.5): 500 is ignored, the shorter path wins.
    h.announce(
        1,
        &["10.1.0.0/24"],
        PathAttributes {
            local_pref: Some(500),
            ..attrs(&[65001, 1, 2], "10.0.0.1")
        },
    );
    h.announce(2, &["10.1.0.0/24"], attrs(&[65002], "10.0.0.2"));
    assert_eq!(h.best_from("10.1.0.0/24"), a(2));
}

#[test]
fn shorter_as_path_wins_and_a_set_counts_one() {
    let mut h = Harness::new();
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001, 7, 8], "10.0.0.1"));
    h.announce(2, &["10.1.0.0/24"], attrs(&[65002, 7], "10.0.0.2"));
    assert_eq!(h.best_from("10.1.0.0/24"), a(2));
    // Peer 1's path becomes [65001] + SET{1,2,3,4}: length 2, equal to peer 2's; the tie then falls to router id.
    let set = PathAttributes {
        as_path: Some(AsPath {
            segments: vec![
                AsSegment::Sequence(vec![65001]),
                AsSegment::Set(vec![1, 2, 3, 4]),
            ],
        }),
        ..attrs(&[], "10.0.0.1")
    };
    h.announce(1, &["10.1.0.0/24"], set);
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        a(1),
        "equal length 2, lower router id 10.0.0.1 wins"
    );
}

#[test]
fn lowest_origin_wins() {
    let mut h = Harness::new();
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    h.up(3, peer(3, 65003));
    h.announce(
        1,
        &["10.1.0.0/24"],
        PathAttributes {
            origin: Some(Origin::Incomplete),
            ..attrs(&[65001], "10.0.0.1")
        },
    );
    h.announce(
        2,
        &["10.1.0.0/24"],
        PathAttributes {
            origin: Some(Origin::Egp),
            ..attrs(&[65002], "10.0.0.2")
        },
    );
    assert_eq!(h.best_from("10.1.0.0/24"), a(2), "EGP beats INCOMPLETE");
    h.announce(
        3,
        &["10.1.0.0/24"],
        PathAttributes {
            origin: Some(Origin::Igp),
            ..attrs(&[65003], "10.0.0.3")
        },
    );
    assert_eq!(h.best_from("10.1.0.0/24"), a(3), "IGP beats EGP");
}

#[test]
fn med_compared_only_within_the_same_neighbour_as() {
    let mut h = Harness::new();
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65001));
    h.up(3, peer(3, 65003));
    // Same neighbour AS 65001: lower MED wins even with the higher router id.
    h.announce(
        1,
        &["10.1.0.0/24"],
        PathAttributes {
            med: Some(50),
            ..attrs(&[65001], "10.0.0.1")
        },
    );
    h.announce(
        2,
        &["10.1.0.0/24"],
        PathAttributes {
            med: Some(10),
            ..attrs(&[65001], "10.0.0.2")
        },
    );
    assert_eq!(h.best_from("10.1.0.0/24"), a(2));
    // Peer 3's MED 0 is from another neighbour AS, so it is not compared: peer 1 is still eliminated by peer 2
    // (same AS, lower MED), and peer 2 vs peer 3 falls to the router id: peer 2.
    h.announce(
        3,
        &["10.1.0.0/24"],
        PathAttributes {
            med: Some(0),
            ..attrs(&[65003], "10.0.0.3")
        },
    );
    assert_eq!(h.best_from("10.1.0.0/24"), a(2));
    // A missing MED is the lowest value: peer 1 without MED now beats peer 2's MED 10.
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001], "10.0.0.1"));
    assert_eq!(h.best_from("10.1.0.0/24"), a(1));
}

#[test]
fn med_elimination_is_not_a_pairwise_sort() {
    // The classic non-transitive case: A (AS 1, MED 10, rid .3), B (AS 2, rid .1), C (AS 1, MED 5, rid .2).
    // Elimination removes A (C has lower MED in the same AS); between B and C, the router id picks B.
    let mut h = Harness::new();
    h.up(3, peer(3, 65001));
    h.up(1, peer(1, 65002));
    h.up(2, peer(2, 65001));
    h.announce(
        3,
        &["10.9.0.0/24"],
        PathAttributes {
            med: Some(10),
            ..attrs(&[65001], "10.0.0.3")
        },
    );
    h.announce(1, &["10.9.0.0/24"], attrs(&[65002], "10.0.0.1"));
    h.announce(
        2,
        &["10.9.0.0/24"],
        PathAttributes {
            med: Some(5),
            ..attrs(&[65001], "10.0.0.2")
        },
    );
    assert_eq!(h.best_from("10.9.0.0/24"), a(1));
    let paths = h.rib.lookup(&net("10.9.0.0/24"));
    let ecmp: Vec<_> = paths
        .iter()
        .filter(|p| p.ecmp)
        .map(|p| p.peer_address)
        .collect();
    assert_eq!(
        ecmp,
        vec![a(1), a(2)],
        "A is out of the ECMP set, B and C are in it"
    );
}

#[test]
fn ebgp_beats_ibgp() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.up(2, peer(2, 65002));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65002], "10.0.0.1"));
    h.announce(2, &["10.1.0.0/24"], attrs(&[65002], "10.0.0.2"));
    assert_eq!(h.best_from("10.1.0.0/24"), a(2));
}

#[test]
fn lowest_router_id_then_originator_id_stands_in() {
    let mut h = Harness::new();
    h.up(5, peer(5, LOCAL_AS));
    h.up(6, peer(6, LOCAL_AS));
    h.announce(5, &["10.1.0.0/24"], attrs(&[65009], "10.0.0.5"));
    h.announce(6, &["10.1.0.0/24"], attrs(&[65009], "10.0.0.6"));
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        a(5),
        "router id 10.0.0.5 < 10.0.0.6"
    );
    // RFC 4456 9: peer 6's route carries ORIGINATOR_ID 10.0.0.1, which replaces its router id in the comparison.
    h.announce(
        6,
        &["10.1.0.0/24"],
        PathAttributes {
            originator_id: Some(ip4("10.0.0.1")),
            ..attrs(&[65009], "10.0.0.6")
        },
    );
    assert_eq!(h.best_from("10.1.0.0/24"), a(6));
}

#[test]
fn shorter_cluster_list_wins() {
    let mut h = Harness::new();
    h.up(5, peer(5, LOCAL_AS));
    h.up(6, peer(6, LOCAL_AS));
    let o = ip4("10.9.9.9");
    h.announce(
        5,
        &["10.1.0.0/24"],
        PathAttributes {
            originator_id: Some(o),
            cluster_list: vec![ip4("1.1.1.1"), ip4("2.2.2.2")],
            ..attrs(&[65009], "10.0.0.5")
        },
    );
    h.announce(
        6,
        &["10.1.0.0/24"],
        PathAttributes {
            originator_id: Some(o),
            cluster_list: vec![ip4("3.3.3.3")],
            ..attrs(&[65009], "10.0.0.6")
        },
    );
    assert_eq!(
        h.best_from("10.1.0.0/24"),
        a(6),
        "same originator: CLUSTER_LIST of 1 beats 2"
    );
}

#[test]
fn lowest_peer_address_is_the_last_tie_break() {
    let mut h = Harness::new();
    let mut p7 = peer(7, LOCAL_AS);
    let mut p8 = peer(8, LOCAL_AS);
    // Same router id on both sessions (one router, two links): the peer address decides.
    p7.router_id = ip4("10.9.9.9");
    p8.router_id = ip4("10.9.9.9");
    h.up(8, p8);
    h.up(7, p7);
    h.announce(8, &["10.1.0.0/24"], attrs(&[65009], "10.0.0.8"));
    h.announce(7, &["10.1.0.0/24"], attrs(&[65009], "10.0.0.7"));
    assert_eq!(h.best_from("10.1.0.0/24"), a(7));
}

#[test]
fn local_routes_beat_learned_ones() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.announce(1, &["10.1.0.0/24"], attrs(&[], "10.0.0.1"));
    h.originate(&["10.1.0.0/24"], attrs(&[], "0.0.0.0"));
    let best = h.best("10.1.0.0/24").expect("route");
    assert_eq!(best.source, PathSource::Local);
}

#[test]
fn ecmp_set_add_and_remove_reach_the_fib() {
    let mut h = Harness::new();
    for n in 1..=3 {
        h.up(n as u32, peer(n, 65001));
    }
    h.rib.take_fib_events();
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001, 9], "10.0.0.1"));
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec!["10.0.0.1".parse().expect("ip")]
        }]
    );
    h.announce(2, &["10.1.0.0/24"], attrs(&[65001, 9], "10.0.0.2"));
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec![
                "10.0.0.1".parse().expect("ip"),
                "10.0.0.2".parse().expect("ip")
            ]
        }],
        "equal up to the router-id step: both next hops"
    );
    // A longer path is not in the set and changes nothing for the FIB.
    h.announce(3, &["10.1.0.0/24"], attrs(&[65001, 9, 9], "10.0.0.3"));
    assert!(h.rib.take_fib_events().is_empty());
    h.withdraw(1, &["10.1.0.0/24"]);
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec!["10.0.0.2".parse().expect("ip")]
        }]
    );
    h.withdraw(2, &["10.1.0.0/24"]);
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Set {
            prefix: net("10.1.0.0/24"),
            next_hops: vec!["10.0.0.3".parse().expect("ip")]
        }],
        "the longer path takes over"
    );
    h.withdraw(3, &["10.1.0.0/24"]);
    assert_eq!(
        h.rib.take_fib_events(),
        vec![FibEvent::Remove {
            prefix: net("10.1.0.0/24")
        }]
    );
    assert!(h.best("10.1.0.0/24").is_none());
    let _ = PeerId(0);
}

#[test]
fn add_path_keeps_several_paths_from_one_peer() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.announce_ids(1, &[("10.1.0.0/24", 1)], attrs(&[65009, 1], "10.0.0.11"));
    h.announce_ids(1, &[("10.1.0.0/24", 2)], attrs(&[65009], "10.0.0.12"));
    let paths = h.rib.lookup(&net("10.1.0.0/24"));
    assert_eq!(paths.len(), 2);
    assert_eq!(paths[0].path_id, 2, "the shorter path (id 2) is best");
    h.input(margay::bgp::rib::RibInput::Withdraw {
        peer: PeerId(1),
        withdrawn: vec![margay::bgp::wire::Nlri {
            prefix: net("10.1.0.0/24"),
            path_id: 2,
        }],
    });
    let paths = h.rib.lookup(&net("10.1.0.0/24"));
    assert_eq!(paths.len(), 1);
    assert_eq!(paths[0].path_id, 1);
}

use margay::bgp::wire::PathAttributes;
