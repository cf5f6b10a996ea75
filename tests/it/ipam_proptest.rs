//! Property tests of the pure allocation logic (no etcd): for any sequence of assigns, specific assigns and
//! releases on a block, shadowed by a trivially correct model,
//! - an address is never handed out while it is allocated (never twice);
//! - every allocation belongs to exactly one handle, and the handle counts match the model;
//! - free + used = block size, and the block's own structural check finds nothing;
//! - the JSON round trip is lossless.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use margay::ipam::{Block, Handle};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Assign { handle: u8, count: u8 },
    AssignIp { handle: u8, ordinal: u8 },
    Release { ordinals: Vec<u8> },
    ReleaseHandle { handle: u8 },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..6, 1u8..5).prop_map(|(handle, count)| Op::Assign { handle, count }),
        (0u8..6, 0u8..32).prop_map(|(handle, ordinal)| Op::AssignIp { handle, ordinal }),
        proptest::collection::vec(0u8..32, 0..4).prop_map(|ordinals| Op::Release { ordinals }),
        (0u8..6).prop_map(|handle| Op::ReleaseHandle { handle }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn block_invariants_hold_for_any_sequence(ops in proptest::collection::vec(op(), 1..80), v6 in any::<bool>()) {
        let cidr = if v6 { "fd00:1::/123" } else { "10.1.2.0/27" }.parse().unwrap();
        let mut b = Block::for_node(cidr, "n", 0);
        let size = b.size();
        prop_assert_eq!(size, 32);
        // Model: address -> handle; handle documents as the datastore would hold them.
        let mut owner: BTreeMap<IpAddr, String> = BTreeMap::new();
        let mut handles: BTreeMap<String, Handle> = BTreeMap::new();
        let attrs = BTreeMap::from([("node".to_string(), "n".to_string())]);
        let ip_of = |o: u8| margay::ipam::block::nth_ip(&cidr, u128::from(o));
        for op in ops {
            match op {
                Op::Assign { handle, count } => {
                    let h = format!("h{handle}");
                    let free_before = b.free_count();
                    let got = b.assign(count as usize, &h, &attrs);
                    prop_assert_eq!(got.len(), (count as usize).min(free_before));
                    for ip in got {
                        prop_assert!(owner.insert(ip, h.clone()).is_none(), "{} handed out twice", ip);
                        handles.entry(h.clone()).or_default().add(&cidr, 1);
                    }
                }
                Op::AssignIp { handle, ordinal } => {
                    let h = format!("h{handle}");
                    let ip = ip_of(ordinal);
                    let r = b.assign_ip(ip, &h, &attrs);
                    prop_assert_eq!(r.is_ok(), !owner.contains_key(&ip));
                    if r.is_ok() {
                        owner.insert(ip, h.clone());
                        handles.entry(h).or_default().add(&cidr, 1);
                    }
                }
                Op::Release { ordinals } => {
                    let ips: Vec<IpAddr> = ordinals.iter().map(|o| ip_of(*o)).collect();
                    let freed = b.release(&ips);
                    let mut expect: BTreeMap<String, u64> = BTreeMap::new();
                    for ip in ips.iter().collect::<BTreeSet<_>>() {
                        if let Some(h) = owner.remove(ip) {
                            *expect.entry(h).or_default() += 1;
                        }
                    }
                    prop_assert_eq!(&freed, &expect);
                    for (h, n) in freed {
                        let doc = handles.get_mut(&h).unwrap();
                        doc.remove(&cidr, n);
                        if doc.is_empty() {
                            handles.remove(&h);
                        }
                    }
                }
                Op::ReleaseHandle { handle } => {
                    let h = format!("h{handle}");
                    let freed: BTreeSet<IpAddr> = b.release_handle(&h).into_iter().collect();
                    let expect: BTreeSet<IpAddr> = owner.iter().filter(|(_, o)| **o == h).map(|(ip, _)| *ip).collect();
                    prop_assert_eq!(&freed, &expect);
                    owner.retain(|_, o| *o != h);
                    handles.remove(&h);
                }
            }
            // Invariants after every step.
            prop_assert!(b.problems().is_empty(), "{:?}", b.problems());
            prop_assert_eq!(b.free_count() + b.in_use(), size);
            prop_assert_eq!(b.in_use(), owner.len());
            let stored: BTreeMap<IpAddr, String> =
                b.allocated().map(|(ip, a)| (ip, a.handle_id.clone().unwrap())).collect();
            prop_assert_eq!(&stored, &owner, "every allocation belongs to exactly its one handle");
            let counts: BTreeMap<String, u64> = handles
                .iter()
                .map(|(h, d)| (h.clone(), d.block[&cidr.to_string()]))
                .collect();
            prop_assert_eq!(b.handle_counts(), counts);
            let free: BTreeSet<usize> = b.unallocated.iter().copied().collect();
            prop_assert_eq!(free.len(), b.unallocated.len(), "a free ordinal listed twice");
        }
        let back: Block = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
        prop_assert_eq!(back, b);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// With a clock that only moves forward, `assign_avoiding` never hands out an address inside its cooldown
    /// unless asked to allow it, and then only when no other free address is left; nothing is ever handed out
    /// twice; the stamps survive the JSON round trip.
    #[test]
    fn cooldown_is_never_broken_unless_allowed(
        steps in proptest::collection::vec((0u8..3, 1u8..4, 0u16..400, any::<bool>()), 1..120),
    ) {
        use margay::ipam::block::Cooldown;
        let cidr = "10.3.0.0/28".parse().unwrap();
        let mut b = Block::for_node(cidr, "n", 0);
        let attrs = BTreeMap::from([("node".to_string(), "n".to_string())]);
        let mut now = 1_000u64;
        let mut live: BTreeSet<IpAddr> = BTreeSet::new();
        let mut released: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (i, (kind, count, dt, allow)) in steps.into_iter().enumerate() {
            now += u64::from(dt);
            let cd = Cooldown { now_ms: now, cooldown_ms: 250 };
            if kind < 2 {
                let ready = b.free_cool_count(&cd);
                let free = b.free_count();
                let got = b.assign_avoiding(count as usize, &format!("h{i}"), &attrs, &cd, allow);
                let want = if allow { (count as usize).min(free) } else { (count as usize).min(ready) };
                prop_assert_eq!(got.len(), want);
                let cooling_given = got
                    .iter()
                    .filter(|ip| released.get(ip).is_some_and(|t| now < t + 250))
                    .count();
                // Cooling addresses only when allowed, and only beyond the ready ones.
                prop_assert!(cooling_given == 0 || (allow && (count as usize) > ready));
                for ip in got {
                    prop_assert!(live.insert(ip), "{} handed out twice", ip);
                }
            } else if let Some(&ip) = live.iter().nth(usize::from(count) % live.len().max(1)) {
                b.release_at(&[ip], now);
                live.remove(&ip);
                released.insert(ip, now);
            }
            prop_assert!(b.problems().is_empty(), "{:?}", b.problems());
            prop_assert_eq!(b.free_count(), 16 - live.len());
        }
        let back: Block = serde_json::from_slice(&serde_json::to_vec(&b).unwrap()).unwrap();
        prop_assert_eq!(back, b);
    }
}
