//! Route reflection (RFC 4456), iBGP split horizon, eBGP export rewriting and next-hop modes, full-table dumps
//! with End-of-RIB, grouping by attribute set, max-prefix and policy, all through the RIB's public inputs and
//! the per-peer output channels.

use crate::rib_common;

use std::sync::Arc;

use margay::bgp::policy::{ExportRule, PoolExport};
use margay::bgp::rib::{NextHopMode, PeerId, Policy, RibConfig, RibInput, RibOutput};
use margay::bgp::wire::{AsPath, AsSegment, Family, PathAttributes};
use rib_common::*;

fn client(n: u8) -> margay::bgp::rib::PeerInfo {
    margay::bgp::rib::PeerInfo {
        rr_client: true,
        ..peer(n, LOCAL_AS)
    }
}

fn reflector() -> Harness {
    let mut cfg = RibConfig::new(LOCAL_AS, RID);
    cfg.cluster_id = Some(ip4("244.0.0.1"));
    Harness::with(cfg, Policy::accept_all())
}

#[test]
fn client_routes_reflect_to_clients_and_non_clients_with_originator_and_cluster_list() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    h.up(3, peer(3, LOCAL_AS)); // non-client
    h.announce(1, &["10.1.0.0/26"], attrs(&[], "10.0.0.1"));
    for to in [2, 3] {
        let got = h
            .holds(to, "10.1.0.0/26")
            .unwrap_or_else(|| panic!("peer {to} did not get the client route"));
        assert_eq!(
            got.originator_id,
            Some(ip4("10.0.0.1")),
            "ORIGINATOR_ID = the client's router id"
        );
        assert_eq!(
            got.cluster_list,
            vec![ip4("244.0.0.1")],
            "our cluster id in CLUSTER_LIST"
        );
        assert_eq!(
            got.next_hop,
            Some(ip4("10.0.0.1")),
            "reflected: next hop untouched (Auto)"
        );
        assert_eq!(got.local_pref, Some(100), "LOCAL_PREF sent to iBGP peers");
        assert_eq!(
            got.as_path,
            Some(AsPath::default()),
            "no AS prepended inside the AS"
        );
    }
    assert!(
        h.holds(1, "10.1.0.0/26").is_none(),
        "never back to the source"
    );
}

#[test]
fn non_client_routes_reflect_to_clients_only() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(3, peer(3, LOCAL_AS));
    h.up(4, peer(4, LOCAL_AS));
    h.announce(3, &["10.3.0.0/26"], attrs(&[], "10.0.0.3"));
    assert!(
        h.holds(1, "10.3.0.0/26").is_some(),
        "client gets the non-client route"
    );
    assert!(
        h.holds(4, "10.3.0.0/26").is_none(),
        "non-client to non-client: not reflected"
    );
}

#[test]
fn existing_originator_kept_and_cluster_id_prepended() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    let a = PathAttributes {
        originator_id: Some(ip4("10.7.7.7")),
        cluster_list: vec![ip4("244.0.0.9")],
        ..attrs(&[], "10.0.0.7")
    };
    h.announce(1, &["10.1.0.0/26"], a);
    let got = h.holds(2, "10.1.0.0/26").expect("reflected");
    assert_eq!(got.originator_id, Some(ip4("10.7.7.7")));
    assert_eq!(got.cluster_list, vec![ip4("244.0.0.1"), ip4("244.0.0.9")]);
}

#[test]
fn routes_looping_through_us_are_dropped_on_receipt() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    h.announce(
        1,
        &["10.1.0.0/26"],
        PathAttributes {
            originator_id: Some(RID),
            ..attrs(&[], "10.0.0.1")
        },
    );
    h.announce(
        1,
        &["10.2.0.0/26"],
        PathAttributes {
            cluster_list: vec![ip4("244.0.0.1")],
            ..attrs(&[], "10.0.0.1")
        },
    );
    assert!(
        h.best("10.1.0.0/26").is_none(),
        "ORIGINATOR_ID is our router id"
    );
    assert!(
        h.best("10.2.0.0/26").is_none(),
        "CLUSTER_LIST holds our cluster id"
    );
    let s = h.rib.summary();
    assert_eq!(
        s.peers
            .iter()
            .find(|p| p.peer == Some(PeerId(1)))
            .map(|p| p.rejected),
        Some(2)
    );
    // eBGP AS loop (RFC 4271 9.1.2): our AS in the path.
    h.up(5, peer(5, 65005));
    h.announce(
        5,
        &["10.5.0.0/24"],
        attrs(&[65005, LOCAL_AS, 7], "10.0.0.5"),
    );
    assert!(h.best("10.5.0.0/24").is_none());
}

#[test]
fn ibgp_split_horizon_without_clients() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.up(2, peer(2, LOCAL_AS));
    h.up(3, peer(3, 65003));
    h.announce(1, &["10.1.0.0/24"], attrs(&[], "10.0.0.1"));
    assert!(
        h.holds(2, "10.1.0.0/24").is_none(),
        "iBGP-learned routes are not sent to iBGP peers"
    );
    assert!(
        h.holds(3, "10.1.0.0/24").is_some(),
        "but are sent to eBGP peers"
    );
    h.announce(3, &["10.3.0.0/24"], attrs(&[65003], "10.0.0.3"));
    assert!(
        h.holds(1, "10.3.0.0/24").is_some() && h.holds(2, "10.3.0.0/24").is_some(),
        "eBGP-learned go to iBGP"
    );
}

#[test]
fn ebgp_export_prepends_sets_next_hop_self_and_strips_internal_attributes() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, peer(2, 65002));
    h.up(3, peer(3, 65003));
    h.announce(
        1,
        &["10.1.0.0/26"],
        PathAttributes {
            local_pref: Some(300),
            med: Some(7),
            ..attrs(&[], "10.0.0.1")
        },
    );
    let got = h.holds(2, "10.1.0.0/26").expect("exported to eBGP");
    assert_eq!(
        got.as_path,
        Some(AsPath {
            segments: vec![AsSegment::Sequence(vec![LOCAL_AS])]
        })
    );
    assert_eq!(got.local_pref, None);
    assert_eq!(got.originator_id, None);
    assert!(got.cluster_list.is_empty());
    assert_eq!(got.next_hop, Some(ip4("10.0.0.254")), "next hop self");
    assert_eq!(
        got.med,
        Some(7),
        "a MED set inside our AS may be sent to a neighbour AS"
    );
    // RFC 4271 5.1.4: a MED received from one neighbour AS is not passed to another.
    h.announce(
        3,
        &["10.3.0.0/24"],
        PathAttributes {
            med: Some(9),
            ..attrs(&[65003], "10.0.0.3")
        },
    );
    let got = h.holds(2, "10.3.0.0/24").expect("eBGP to eBGP");
    assert_eq!(got.med, None);
    assert_eq!(
        got.as_path,
        Some(AsPath {
            segments: vec![AsSegment::Sequence(vec![LOCAL_AS, 65003])]
        })
    );
}

#[test]
fn next_hop_modes() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2)); // Auto
    h.up(
        3,
        margay::bgp::rib::PeerInfo {
            next_hop_mode: NextHopMode::SelfAddr,
            ..client(3)
        },
    );
    h.up(
        4,
        margay::bgp::rib::PeerInfo {
            next_hop_mode: NextHopMode::Keep,
            ..peer(4, 65004)
        },
    );
    h.up(5, peer(5, 65005));
    h.announce(1, &["10.1.0.0/26"], attrs(&[], "10.0.0.1"));
    h.announce(5, &["10.5.0.0/24"], attrs(&[65005], "10.0.0.5"));
    h.originate(&["10.9.0.0/26"], PathAttributes::default());
    let nh = |h: &Harness, to: u32, p: &str| {
        h.holds(to, p)
            .and_then(|a| a.next_hop)
            .map(|n| n.to_string())
    };
    // Auto: keep on reflected iBGP routes, self for eBGP-learned and local routes.
    assert_eq!(nh(&h, 2, "10.1.0.0/26").as_deref(), Some("10.0.0.1"));
    assert_eq!(nh(&h, 2, "10.5.0.0/24").as_deref(), Some("10.0.0.254"));
    assert_eq!(nh(&h, 2, "10.9.0.0/26").as_deref(), Some("10.0.0.254"));
    // Self: always ours, reflected routes included.
    assert_eq!(nh(&h, 3, "10.1.0.0/26").as_deref(), Some("10.0.0.254"));
    // Keep towards eBGP: the received next hop survives; local routes still get ours.
    assert_eq!(nh(&h, 4, "10.5.0.0/24").as_deref(), Some("10.0.0.5"));
    assert_eq!(nh(&h, 4, "10.9.0.0/26").as_deref(), Some("10.0.0.254"));
    // Default eBGP: self.
    assert_eq!(nh(&h, 5, "10.1.0.0/26").as_deref(), Some("10.0.0.254"));
}

#[test]
fn ipv6_routes_carry_their_next_hop_in_mp_reach() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    h.up(
        3,
        margay::bgp::rib::PeerInfo {
            families: vec![Family::IPV4_UNICAST],
            ..client(3)
        },
    );
    h.announce(1, &["fd10::/122"], attrs6(&[], "fd00::1"));
    let got = h.holds(2, "fd10::/122").expect("v6 reflected");
    let mp = got.mp_reach.as_ref().expect("mp_reach");
    assert_eq!(mp.family, Family::IPV6_UNICAST);
    assert_eq!(
        mp.next_hop,
        vec!["fd00::1".parse::<std::net::IpAddr>().expect("ip")]
    );
    assert!(mp.nlri.is_empty());
    assert_eq!(got.next_hop, None);
    assert!(
        h.holds(3, "fd10::/122").is_none(),
        "IPv6 not negotiated with peer 3"
    );
}

#[test]
fn full_table_to_a_new_peer_grouped_by_attributes_then_end_of_rib() {
    let mut h = reflector();
    h.up(1, client(1));
    let first: Vec<String> = (0..1000)
        .map(|i| format!("10.{}.{}.0/24", 100 + i / 256, i % 256))
        .collect();
    let second: Vec<String> = (0..500)
        .map(|i| format!("10.{}.{}.0/24", 50 + i / 256, i % 256))
        .collect();
    h.announce(
        1,
        &first.iter().map(String::as_str).collect::<Vec<_>>(),
        attrs(&[], "10.0.0.1"),
    );
    h.announce(
        1,
        &second.iter().map(String::as_str).collect::<Vec<_>>(),
        attrs(&[], "10.0.0.11"),
    );
    h.up(2, client(2));
    let log = h.take_log(2);
    let updates: Vec<usize> = log
        .iter()
        .filter_map(|m| match m {
            RibOutput::Updates { nlri, .. } => Some(nlri.len()),
            _ => None,
        })
        .collect();
    assert_eq!(updates.iter().sum::<usize>(), 1500);
    assert_eq!(
        updates.len(),
        2,
        "two attribute sets, two groups: {updates:?}"
    );
    assert_eq!(log.last(), Some(&RibOutput::EndOfRib(Family::IPV6_UNICAST)));
    assert!(log.contains(&RibOutput::EndOfRib(Family::IPV4_UNICAST)));
    // Withdrawal on best-path loss.
    h.withdraw(1, &["10.100.0.0/24"]);
    assert_eq!(
        h.take_log(2),
        vec![RibOutput::Withdraw {
            family: Family::IPV4_UNICAST,
            nlri: vec![margay::bgp::wire::Nlri {
                prefix: net("10.100.0.0/24"),
                path_id: 0
            }],
            wire: margay::bgp::rib::SharedWire::none(),
        }]
    );
    // The derived Adj-RIB-Out agrees with what the peer was told.
    let adj = h.rib.adj_rib_out(PeerId(2), Family::IPV4_UNICAST);
    assert_eq!(adj.len(), 1499);
    for (p, a) in adj {
        assert_eq!(h.held[&2].get(&p), Some(&a));
    }
}

#[test]
fn large_groups_are_split_at_max_batch() {
    let mut cfg = RibConfig::new(LOCAL_AS, RID);
    cfg.max_batch = 100;
    let mut h = Harness::with(cfg, Policy::accept_all());
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    let ps: Vec<String> = (0..250).map(|i| format!("10.0.{i}.0/24")).collect();
    h.announce(
        1,
        &ps.iter().map(String::as_str).collect::<Vec<_>>(),
        attrs(&[65001], "10.0.0.1"),
    );
    let sizes: Vec<usize> = h
        .take_log(2)
        .iter()
        .filter_map(|m| match m {
            RibOutput::Updates { nlri, .. } => Some(nlri.len()),
            _ => None,
        })
        .collect();
    assert_eq!(sizes, vec![100, 100, 50]);
}

#[test]
fn best_path_change_replaces_and_loss_withdraws() {
    let mut h = Harness::new();
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    h.up(3, peer(3, LOCAL_AS));
    h.announce(1, &["10.1.0.0/24"], attrs(&[65001, 9, 9], "10.0.0.1"));
    assert_eq!(
        h.holds(3, "10.1.0.0/24")
            .and_then(|a| a.as_path.clone())
            .map(|p| p.len_for_decision()),
        Some(3)
    );
    h.announce(2, &["10.1.0.0/24"], attrs(&[65002, 9], "10.0.0.2"));
    assert_eq!(
        h.holds(3, "10.1.0.0/24")
            .and_then(|a| a.as_path.clone())
            .map(|p| p.len_for_decision()),
        Some(2)
    );
    // Peer 2 is now the best: peer 2 must not hold its own route back; peer 1 holds peer 2's.
    assert!(
        h.holds(2, "10.1.0.0/24").is_none(),
        "peer 2 had peer 1's route, now withdrawn"
    );
    assert!(h.holds(1, "10.1.0.0/24").is_some());
    h.down(2, false);
    assert_eq!(
        h.holds(3, "10.1.0.0/24")
            .and_then(|a| a.as_path.clone())
            .map(|p| p.len_for_decision()),
        Some(3)
    );
    assert!(
        h.holds(1, "10.1.0.0/24").is_none(),
        "best is peer 1's own route again: withdrawn from it"
    );
    h.down(1, false);
    assert!(h.holds(3, "10.1.0.0/24").is_none());
}

#[test]
fn max_prefix_rejects_the_excess_and_tells_the_session() {
    let mut h = Harness::new();
    h.up(
        1,
        margay::bgp::rib::PeerInfo {
            max_prefixes: Some(3),
            ..peer(1, 65001)
        },
    );
    h.take_log(1);
    h.announce(
        1,
        &[
            "10.0.1.0/24",
            "10.0.2.0/24",
            "10.0.3.0/24",
            "10.0.4.0/24",
            "10.0.5.0/24",
        ],
        attrs(&[65001], "10.0.0.1"),
    );
    assert!(h.best("10.0.3.0/24").is_some());
    assert!(h.best("10.0.4.0/24").is_none() && h.best("10.0.5.0/24").is_none());
    assert_eq!(
        h.take_log(1),
        vec![RibOutput::MaxPrefixExceeded { limit: 3 }],
        "signalled once"
    );
    // Replacing an accepted prefix is not a new one.
    h.announce(1, &["10.0.1.0/24"], attrs(&[65001, 2], "10.0.0.1"));
    assert_eq!(
        h.best("10.0.1.0/24")
            .and_then(|p| p.attrs.as_path.clone())
            .map(|p| p.len_for_decision()),
        Some(2)
    );
}

#[test]
fn pool_only_import_and_calico_export() {
    let policy = Policy {
        import_only_within: Some(vec![net("10.10.0.0/16"), net("10.20.0.0/16")]),
        export: ExportRule::Calico {
            pools: vec![
                PoolExport {
                    cidr: net("10.10.0.0/16"),
                    disabled: false,
                    disable_bgp_export: false,
                },
                PoolExport {
                    cidr: net("10.20.0.0/16"),
                    disabled: false,
                    disable_bgp_export: true,
                },
            ],
            extra_accept: vec![],
        },
    };
    let mut h = Harness::with(RibConfig::new(LOCAL_AS, RID), policy);
    h.up(1, peer(1, 65001));
    h.up(2, peer(2, 65002));
    h.announce(
        1,
        &["10.10.1.0/26", "10.20.1.0/26", "8.8.8.0/24"],
        attrs(&[65001], "10.0.0.1"),
    );
    assert!(
        h.best("8.8.8.0/24").is_none(),
        "outside every pool: not imported"
    );
    assert!(
        h.holds(2, "10.10.1.0/26").is_some(),
        "inside an exported pool"
    );
    assert!(
        h.holds(2, "10.20.1.0/26").is_none(),
        "disableBGPExport pool"
    );
    h.originate(&["10.10.5.0/26", "10.20.5.0/26"], PathAttributes::default());
    assert!(h.holds(1, "10.10.5.0/26").is_some());
    assert!(h.holds(1, "10.20.5.0/26").is_none());
    // Changing the policy re-exports the difference at once.
    h.input(RibInput::SetPolicy(Arc::new(Policy::accept_all())));
    assert!(h.holds(2, "10.20.1.0/26").is_some());
    assert!(h.holds(1, "10.20.5.0/26").is_some());
    h.input(RibInput::SetPolicy(Arc::new(Policy {
        import_only_within: None,
        export: ExportRule::Calico {
            pools: vec![],
            extra_accept: vec![],
        },
    })));
    assert!(
        h.holds(2, "10.20.1.0/26").is_none() && h.holds(2, "10.10.1.0/26").is_none(),
        "no pool: rejected"
    );
    assert!(
        h.holds(1, "10.10.5.0/26").is_some(),
        "local blocks are still exported"
    );
}

#[test]
fn withdraw_local() {
    let mut h = Harness::new();
    h.up(1, peer(1, LOCAL_AS));
    h.originate(&["10.9.0.0/26"], PathAttributes::default());
    assert!(h.holds(1, "10.9.0.0/26").is_some());
    h.input(RibInput::WithdrawLocal {
        prefixes: vec![net("10.9.0.0/26")],
    });
    assert!(h.holds(1, "10.9.0.0/26").is_none());
    assert_eq!(h.rib.summary().local_prefixes, 0);
}

#[test]
fn a_decoded_update_with_both_families_becomes_one_input() {
    use margay::bgp::wire::{MpReach, MpUnreach, Nlri, Update};
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    h.announce(1, &["10.8.0.0/24"], attrs(&[], "10.0.0.1"));
    h.announce(1, &["fd08::/64"], attrs6(&[], "fd00::1"));
    let mut a = attrs(&[], "10.0.0.1");
    a.mp_reach = Some(MpReach {
        family: Family::IPV6_UNICAST,
        next_hop: vec!["fd00::1".parse().expect("ip")],
        nlri: vec![Nlri {
            prefix: net("fd01::/64"),
            path_id: 0,
        }],
    });
    a.mp_unreach = Some(MpUnreach {
        family: Family::IPV6_UNICAST,
        withdrawn: vec![Nlri {
            prefix: net("fd08::/64"),
            path_id: 0,
        }],
    });
    let u = Update {
        withdrawn: vec![Nlri {
            prefix: net("10.8.0.0/24"),
            path_id: 0,
        }],
        attributes: a,
        nlri: vec![Nlri {
            prefix: net("10.1.0.0/24"),
            path_id: 0,
        }],
    };
    h.input(RibInput::from_update(PeerId(1), u));
    assert_eq!(
        h.holds(2, "10.1.0.0/24").and_then(|a| a.next_hop),
        Some(ip4("10.0.0.1"))
    );
    let v6 = h.holds(2, "fd01::/64").expect("v6 announced");
    assert_eq!(
        v6.mp_reach.as_ref().map(|m| m.next_hop.clone()),
        Some(vec!["fd00::1".parse().expect("ip")])
    );
    assert!(
        h.holds(2, "10.8.0.0/24").is_none() && h.holds(2, "fd08::/64").is_none(),
        "both withdrawals applied"
    );
}

/// What an ADD-PATH send peer holds, rebuilt from its outputs: (prefix, path id) → attributes.
fn fold_paths(
    held: &mut std::collections::BTreeMap<(String, u32), Arc<PathAttributes>>,
    log: Vec<RibOutput>,
) {
    for m in log {
        match m {
            RibOutput::Updates { attrs, nlri, .. } => {
                for n in nlri {
                    held.insert((n.prefix.to_string(), n.path_id), attrs.clone());
                }
            }
            RibOutput::Withdraw { nlri, .. } => {
                for n in nlri {
                    assert!(
                        held.remove(&(n.prefix.to_string(), n.path_id)).is_some(),
                        "withdrawal of a path id the peer never got: {n:?}"
                    );
                }
            }
            _ => {}
        }
    }
}

/// RFC 7911: two clients originate one prefix; the client with ADD-PATH send negotiated holds both paths
/// under two path ids, each id stable while its path lives (a changed attribute replaces it under the same
/// id, the other path is not re-sent), and the loss of one origin withdraws exactly its id. A client
/// without ADD-PATH holds the best path alone, as before.
#[test]
fn add_path_send_gives_every_path_with_stable_ids_and_plain_peers_the_best() {
    use std::collections::BTreeMap;
    let mut h = reflector();
    h.up(1, client(1));
    h.up(2, client(2));
    let multi = margay::bgp::rib::PeerInfo {
        add_path_tx: vec![Family::IPV4_UNICAST],
        ..client(3)
    };
    h.up(3, multi.clone());
    h.up(4, client(4));
    h.take_log(3);
    h.announce(1, &["10.9.0.0/24"], attrs(&[], "10.0.0.1"));
    h.announce(2, &["10.9.0.0/24"], attrs(&[], "10.0.0.2"));

    let mut held = BTreeMap::new();
    fold_paths(&mut held, h.take_log(3));
    let nh_of = |held: &BTreeMap<(String, u32), Arc<PathAttributes>>| {
        let mut v: Vec<(u32, String)> = held
            .iter()
            .map(|((_, id), a)| (*id, a.next_hop.map(|n| n.to_string()).unwrap_or_default()))
            .collect();
        v.sort();
        v
    };
    let two = nh_of(&held);
    assert_eq!(two.len(), 2, "both paths, under two ids: {two:?}");
    let mut nhs: Vec<&str> = two.iter().map(|(_, n)| n.as_str()).collect();
    nhs.sort();
    assert_eq!(nhs, ["10.0.0.1", "10.0.0.2"], "next hops kept (reflected)");
    let id_of = |v: &[(u32, String)], nh: &str| {
        v.iter()
            .find(|(_, n)| n == nh)
            .map(|(i, _)| *i)
            .expect("path present")
    };
    let (id1, id2) = (id_of(&two, "10.0.0.1"), id_of(&two, "10.0.0.2"));
    // The plain client holds one path: the best.
    let plain = h
        .holds(4, "10.9.0.0/24")
        .expect("plain client has the prefix");
    assert!(
        h.take_log(4).iter().all(|m| match m {
            RibOutput::Updates { nlri, .. } | RibOutput::Withdraw { nlri, .. } =>
                nlri.iter().all(|n| n.path_id == 0),
            _ => true,
        }),
        "no path ids towards a peer without ADD-PATH"
    );
    assert_eq!(
        plain.next_hop,
        Some(ip4("10.0.0.1")),
        "lower router id wins"
    );
    assert_eq!(
        h.rib.adj_rib_out(PeerId(3), Family::IPV4_UNICAST).len(),
        2,
        "Adj-RIB-Out lists both paths"
    );

    // Client 2's path changes (MED): replaced under its id; client 1's path is not sent again.
    let mut changed = attrs(&[], "10.0.0.2");
    changed.med = Some(7);
    h.announce(2, &["10.9.0.0/24"], changed);
    let log = h.take_log(3);
    let ids: Vec<u32> = log
        .iter()
        .flat_map(|m| match m {
            RibOutput::Updates { nlri, .. } => nlri.iter().map(|n| n.path_id).collect(),
            RibOutput::Withdraw { .. } => panic!("nothing to withdraw: {m:?}"),
            _ => Vec::new(),
        })
        .collect();
    assert_eq!(ids, vec![id2], "only the changed path, under its old id");
    fold_paths(&mut held, log);
    assert_eq!(held[&("10.9.0.0/24".to_string(), id2)].med, Some(7));

    // Client 1 withdraws: exactly its id goes.
    h.withdraw(1, &["10.9.0.0/24"]);
    let log = h.take_log(3);
    assert!(
        log.iter()
            .any(|m| matches!(m, RibOutput::Withdraw { nlri, .. }
            if nlri.iter().map(|n| n.path_id).collect::<Vec<_>>() == vec![id1])),
        "withdrawal of id {id1}: {log:?}"
    );
    fold_paths(&mut held, log);
    assert_eq!(nh_of(&held), vec![(id2, "10.0.0.2".to_string())]);
    assert_eq!(
        h.holds(4, "10.9.0.0/24").and_then(|a| a.next_hop),
        Some(ip4("10.0.0.2")),
        "the plain client moves to the remaining path"
    );

    // A client that comes up later gets every path in its table dump.
    h.announce(1, &["10.9.0.0/24"], attrs(&[], "10.0.0.1"));
    h.up(
        5,
        margay::bgp::rib::PeerInfo {
            add_path_tx: vec![Family::IPV4_UNICAST],
            ..client(5)
        },
    );
    let mut late = BTreeMap::new();
    fold_paths(&mut late, h.take_log(5));
    assert_eq!(nh_of(&late).len(), 2, "{late:?}");
}

/// Paths an ADD-PATH peer sent under two ids of its own stay two paths towards an ADD-PATH send client,
/// under two distinct ids of ours.
#[test]
fn add_path_send_keeps_two_paths_of_one_peer_apart() {
    let mut h = reflector();
    h.up(1, client(1));
    h.up(
        3,
        margay::bgp::rib::PeerInfo {
            add_path_tx: vec![Family::IPV4_UNICAST],
            ..client(3)
        },
    );
    h.take_log(3);
    h.announce_ids(1, &[("10.9.0.0/24", 1)], attrs(&[], "10.0.0.11"));
    h.announce_ids(1, &[("10.9.0.0/24", 2)], attrs(&[], "10.0.0.12"));
    let mut held = std::collections::BTreeMap::new();
    fold_paths(&mut held, h.take_log(3));
    assert_eq!(held.len(), 2, "{held:?}");
}

/// A Calico node with the full mesh and an eBGP ToR peer (Calico's BIRD export filter): every peer's BIRD export filter ends
/// in `calico_export_to_bgp_peers`, whose step 8 accepts anything inside an enabled pool, and BIRD offers an
/// eBGP peer its best route for each prefix whatever protocol it came from; Calico's sessions are all
/// multihop, and BIRD (`bgp_use_next_hop` in proto/bgp/attrs.c) keeps a next hop towards an eBGP peer only
/// between single-hop sessions on one interface, so it sends its own address. margay does the same: a block learned over the mesh goes to the ToR with our
/// AS prepended and next hop self (so the ToR may reach another rack's node through us: the reason Calico's ToR
/// designs turn the mesh off), a mesh-learned route outside every pool does not, and nothing learned over the
/// mesh goes back into the mesh (RFC 4271 9.2).
#[test]
fn node_exports_mesh_learned_pool_routes_to_an_ebgp_tor_as_calico_does() {
    let policy = Policy {
        import_only_within: None,
        export: ExportRule::Calico {
            pools: vec![PoolExport {
                cidr: net("10.244.0.0/16"),
                disabled: false,
                disable_bgp_export: false,
            }],
            extra_accept: vec![],
        },
    };
    let mut h = Harness::with(RibConfig::new(LOCAL_AS, RID), policy);
    h.up(1, peer(1, LOCAL_AS)); // mesh
    h.up(2, peer(2, LOCAL_AS)); // mesh
    h.up(3, peer(3, 65001)); // the ToR
    h.announce(
        1,
        &["10.244.3.0/26", "192.0.2.0/24"],
        attrs(&[], "10.0.0.1"),
    );
    let got = h
        .holds(3, "10.244.3.0/26")
        .expect("a mesh-learned block goes to the eBGP ToR (Calico step 8)");
    assert_eq!(
        got.as_path,
        Some(AsPath {
            segments: vec![AsSegment::Sequence(vec![LOCAL_AS])]
        })
    );
    assert_eq!(
        got.next_hop,
        Some(ip4("10.0.0.254")),
        "next hop self, as BIRD multihop"
    );
    assert!(
        h.holds(3, "192.0.2.0/24").is_none(),
        "outside every pool: rejected (step 9)"
    );
    assert!(h.holds(2, "10.244.3.0/26").is_none(), "iBGP split horizon");
}
