//! Property: after any sequence of announcements, withdrawals, session losses (graceful or not), returns,
//! End-of-RIBs and local originations, the RIB's incremental state equals a from-scratch recomputation:
//! - the Loc-RIB best path of every prefix equals a brute-force decision over a plain model of all paths;
//! - what every peer was told (replaying its `RibOutput`s) equals the Adj-RIB-Out derived from the Loc-RIB;
//! - the FIB events replayed equal the ECMP next hops of the Loc-RIB.

use crate::rib_common;

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use ipnetwork::IpNetwork;
use margay::bgp::rib::{FibEvent, PathSource, PeerId, PeerInfo, RibConfig, RibInput};
use margay::bgp::wire::{AsPath, AsSegment, Family, Nlri, Origin, PathAttributes};
use proptest::prelude::*;
use rib_common::*;

const PREFIXES: [&str; 5] = [
    "10.1.0.0/24",
    "10.2.0.0/24",
    "10.3.0.0/26",
    "fd01::/64",
    "10.1.0.0/25",
];

/// Peers: 1 iBGP RR client, 2 iBGP non-client, 3 eBGP, 4 eBGP with GR, 5 iBGP client with GR.
fn info(n: u32) -> PeerInfo {
    match n {
        1 => PeerInfo {
            rr_client: true,
            ..peer(1, LOCAL_AS)
        },
        2 => peer(2, LOCAL_AS),
        3 => peer(3, 65003),
        4 => PeerInfo {
            graceful_restart: gr(100),
            ..peer(4, 65004)
        },
        _ => PeerInfo {
            rr_client: true,
            graceful_restart: gr(100),
            ..peer(5, LOCAL_AS)
        },
    }
}

fn ibgp(n: u32) -> bool {
    matches!(n, 1 | 2 | 5)
}

#[derive(Debug, Clone)]
struct A {
    lp: Option<u32>,
    path: Vec<u32>,
    origin: u8,
    med: Option<u32>,
    originator: Option<u8>,
    clusters: u8,
    nh: u8,
}

#[derive(Debug, Clone)]
enum Op {
    Announce(u32, usize, A),
    Withdraw(u32, usize),
    Down(u32, bool),
    Up(u32),
    Eor(u32),
    Originate(usize),
    WithdrawLocal(usize),
    Wait(u64),
}

fn arb_attrs() -> impl Strategy<Value = A> {
    (
        prop::option::of(prop::sample::select(vec![50u32, 100, 200])),
        prop::collection::vec(prop::sample::select(vec![65003u32, 65004, 65009]), 0..3),
        0u8..3,
        prop::option::of(0u32..3),
        prop::option::of(1u8..4),
        0u8..3,
        1u8..4,
    )
        .prop_map(|(lp, path, origin, med, originator, clusters, nh)| A {
            lp,
            path,
            origin,
            med,
            originator,
            clusters,
            nh,
        })
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (1u32..6, 0usize..PREFIXES.len(), arb_attrs()).prop_map(|(p, x, a)| Op::Announce(p, x, a)),
        3 => (1u32..6, 0usize..PREFIXES.len()).prop_map(|(p, x)| Op::Withdraw(p, x)),
        1 => (1u32..6, any::<bool>()).prop_map(|(p, g)| Op::Down(p, g)),
        1 => (1u32..6).prop_map(Op::Up),
        1 => (1u32..6).prop_map(Op::Eor),
        1 => (0usize..PREFIXES.len()).prop_map(Op::Originate),
        1 => (0usize..PREFIXES.len()).prop_map(Op::WithdrawLocal),
        1 => (1u64..200).prop_map(Op::Wait),
    ]
}

fn build(peer: u32, a: &A, prefix: &IpNetwork) -> PathAttributes {
    let mut path = a.path.clone();
    if !ibgp(peer) {
        // An eBGP peer puts its own AS first.
        path.insert(0, info(peer).asn);
    }
    let v6 = prefix.is_ipv6();
    let base = if v6 {
        attrs6(&[], &format!("fd00::{}{}", peer, a.nh))
    } else {
        attrs(&[], &format!("10.0.{}.{}", peer, a.nh))
    };
    PathAttributes {
        local_pref: a.lp,
        as_path: Some(if path.is_empty() {
            AsPath::default()
        } else {
            AsPath {
                segments: vec![AsSegment::Sequence(path)],
            }
        }),
        origin: Some([Origin::Igp, Origin::Egp, Origin::Incomplete][a.origin as usize]),
        med: a.med,
        originator_id: a.originator.map(|o| ip4(&format!("10.0.0.{o}"))),
        cluster_list: (0..a.clusters)
            .map(|c| ip4(&format!("1.1.1.{c}")))
            .collect(),
        ..base
    }
}

/// The model: every path the RIB should hold.
#[derive(Default)]
struct Model {
    up: HashMap<u32, bool>,
    /// (source, prefix) -> (attrs, stale). Source 0 = local.
    paths: BTreeMap<(u32, IpNetwork), (PathAttributes, bool)>,
}

/// Brute-force RFC 4271 9.1.2.2 over the model's paths of one prefix: returns the winning source.
fn reference_best(cands: &[(u32, &PathAttributes)]) -> Option<u32> {
    if cands.is_empty() {
        return None;
    }
    let kind = |s: u32| {
        if s == 0 {
            2
        } else if ibgp(s) {
            0
        } else {
            1
        }
    };
    let lp = |s: u32, a: &PathAttributes| {
        if kind(s) == 1 {
            100
        } else {
            a.local_pref.unwrap_or(100)
        }
    };
    let mut c: Vec<(u32, &PathAttributes)> = cands.to_vec();
    let max_lp = c.iter().map(|(s, a)| lp(*s, a)).max()?;
    c.retain(|(s, a)| lp(*s, a) == max_lp);
    let len = |a: &PathAttributes| a.as_path.as_ref().map_or(0, |p| p.len_for_decision());
    let min_len = c.iter().map(|(_, a)| len(a)).min()?;
    c.retain(|(_, a)| len(a) == min_len);
    let org = |a: &PathAttributes| a.origin.map_or(2, |o| o as u8);
    let min_org = c.iter().map(|(_, a)| org(a)).min()?;
    c.retain(|(_, a)| org(a) == min_org);
    let nas = |a: &PathAttributes| a.as_path.as_ref().and_then(|p| p.neighbor_as());
    let before = c.clone();
    c.retain(|(_, a)| {
        !before
            .iter()
            .any(|(_, b)| nas(b) == nas(a) && b.med.unwrap_or(0) < a.med.unwrap_or(0))
    });
    let max_kind = c.iter().map(|(s, _)| kind(*s)).max()?;
    c.retain(|(s, _)| kind(*s) == max_kind);
    c.into_iter()
        .min_by_key(|(s, a)| {
            let rid = if *s == 0 { RID } else { info(*s).router_id };
            (
                u32::from(a.originator_id.unwrap_or(rid)),
                a.cluster_list.len(),
                if *s == 0 { 0 } else { *s },
            )
        })
        .map(|(s, _)| s)
}

fn check(
    h: &Harness,
    m: &Model,
    fib: &BTreeMap<IpNetwork, Vec<IpAddr>>,
) -> Result<(), TestCaseError> {
    for p in PREFIXES {
        let prefix = net(p);
        let cands: Vec<(u32, &PathAttributes)> = m
            .paths
            .iter()
            .filter(|((_, x), _)| *x == prefix)
            .map(|((s, _), (a, _))| (*s, a))
            .collect();
        let want = reference_best(&cands);
        let got = h.rib.lookup(&prefix);
        let got_src = got.first().map(|v| match v.source {
            PathSource::Local => 0,
            PathSource::Peer(PeerId(n)) => n,
        });
        prop_assert_eq!(got_src, want, "best of {} (paths: {:?})", p, cands);
        prop_assert_eq!(got.len(), cands.len(), "path count of {}", p);
        for v in &got {
            let src = match v.source {
                PathSource::Local => 0,
                PathSource::Peer(PeerId(n)) => n,
            };
            let (a, stale) = &m.paths[&(src, prefix)];
            prop_assert_eq!(&*v.attrs, a);
            prop_assert_eq!(v.stale, *stale);
        }
        // FIB: ECMP next hops of learned paths.
        let mut nh: Vec<IpAddr> = if got.first().is_some_and(|b| b.source != PathSource::Local) {
            got.iter()
                .filter(|v| v.ecmp)
                .filter_map(|v| {
                    v.attrs
                        .next_hop
                        .map(IpAddr::V4)
                        .filter(|_| prefix.is_ipv4())
                        .or_else(|| {
                            v.attrs
                                .mp_reach
                                .as_ref()
                                .and_then(|r| r.next_hop.first().copied())
                        })
                })
                .collect()
        } else {
            vec![]
        };
        nh.sort();
        nh.dedup();
        prop_assert_eq!(
            fib.get(&prefix).cloned().unwrap_or_default(),
            nh,
            "FIB of {}",
            p
        );
    }
    // Every up peer holds exactly the derived Adj-RIB-Out.
    let mut rib = h.rib.summary();
    rib.peers.sort_by_key(|p| p.peer);
    for (&n, &up) in &m.up {
        if !up {
            continue;
        }
        let held = h.held.get(&n).cloned().unwrap_or_default();
        let adv = rib
            .peers
            .iter()
            .find(|p| p.peer == Some(PeerId(n)))
            .map(|p| p.advertised)
            .unwrap_or(0);
        prop_assert_eq!(held.len() as u64, adv, "advertised counter of peer {}", n);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn incremental_rib_equals_recomputation(ops in prop::collection::vec(arb_op(), 1..60)) {
        let mut cfg = RibConfig::new(LOCAL_AS, RID);
        cfg.cluster_id = Some(ip4("244.0.0.1"));
        let mut h = Harness::with(cfg, margay::bgp::rib::Policy::accept_all());
        let mut m = Model::default();
        let mut fib: BTreeMap<IpNetwork, Vec<IpAddr>> = BTreeMap::new();
        for n in 1..=5 {
            h.up(n, info(n));
            m.up.insert(n, true);
        }
        for op in ops {
            match &op {
                Op::Announce(p, x, a) => {
                    let prefix = net(PREFIXES[*x]);
                    let attrs = build(*p, a, &prefix);
                    h.input(RibInput::Routes {
                        peer: PeerId(*p),
                        announced: vec![Nlri { prefix, path_id: 0 }],
                        attrs: Arc::new(attrs.clone()),
                        withdrawn: vec![],
                    });
                    if m.up[p] {
                        m.paths.insert((*p, prefix), (attrs, false));
                    }
                }
                Op::Withdraw(p, x) => {
                    let prefix = net(PREFIXES[*x]);
                    h.withdraw(*p, &[PREFIXES[*x]]);
                    if m.up[p] {
                        m.paths.remove(&(*p, prefix));
                    }
                }
                Op::Down(p, graceful) => {
                    h.down(*p, *graceful);
                    let has_gr = info(*p).graceful_restart.is_some();
                    let was_up = m.up[p];
                    m.up.insert(*p, false);
                    if *graceful && has_gr && was_up {
                        for ((s, _), v) in m.paths.iter_mut() {
                            if s == p {
                                v.1 = true;
                            }
                        }
                    } else if !*graceful || was_up {
                        m.paths.retain(|(s, _), _| s != p);
                    }
                }
                Op::Up(p) => {
                    if !m.up[p] {
                        h.up(*p, info(*p));
                        m.up.insert(*p, true);
                    }
                }
                Op::Eor(p) => {
                    for f in [Family::IPV4_UNICAST, Family::IPV6_UNICAST] {
                        h.input(RibInput::EndOfRib { peer: PeerId(*p), family: f });
                    }
                    if m.up[p] {
                        m.paths.retain(|(s, _), v| !(s == p && v.1));
                    }
                }
                Op::Originate(x) => {
                    let prefix = net(PREFIXES[*x]);
                    h.originate(&[PREFIXES[*x]], PathAttributes::default());
                    let a = PathAttributes { origin: Some(Origin::Igp), as_path: Some(AsPath::default()), ..Default::default() };
                    m.paths.insert((0, prefix), (a, false));
                }
                Op::WithdrawLocal(x) => {
                    h.input(RibInput::WithdrawLocal { prefixes: vec![net(PREFIXES[*x])] });
                    m.paths.remove(&(0, net(PREFIXES[*x])));
                }
                Op::Wait(s) => {
                    h.advance(std::time::Duration::from_secs(*s));
                }
            }
            // Timers: the model sweeps what the RIB's deadline swept; mirror it by asking which stale paths remain.
            if matches!(op, Op::Wait(_)) {
                let remaining: std::collections::HashSet<(u32, IpNetwork)> = PREFIXES
                    .iter()
                    .flat_map(|p| {
                        h.rib.lookup(&net(p)).into_iter().filter_map(move |v| match v.source {
                            PathSource::Peer(PeerId(n)) => Some((n, net(p))),
                            PathSource::Local => None,
                        })
                    })
                    .collect();
                m.paths.retain(|(s, x), (_, stale)| !*stale || remaining.contains(&(*s, *x)));
            }
            for e in h.rib.take_fib_events() {
                match e {
                    FibEvent::Set { prefix, next_hops } => { fib.insert(prefix, next_hops); }
                    FibEvent::Remove { prefix } => { fib.remove(&prefix); }
                }
            }
            check(&h, &m, &fib)?;
            // What each up peer was told equals the Adj-RIB-Out derived from the Loc-RIB.
            for n in 1..=5u32 {
                if m.up[&n] {
                    let mut derived: BTreeMap<IpNetwork, Arc<PathAttributes>> = BTreeMap::new();
                    for f in [Family::IPV4_UNICAST, Family::IPV6_UNICAST] {
                        derived.extend(h.rib.adj_rib_out(PeerId(n), f));
                    }
                    let held = h.held.get(&n).cloned().unwrap_or_default();
                    prop_assert_eq!(held, derived, "Adj-RIB-Out of peer {} after {:?}", n, op);
                }
            }
        }
    }
}
