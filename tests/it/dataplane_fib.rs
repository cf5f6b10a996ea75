//! The FIB task against the real kernel, in a namespace each test creates (and deletes on drop).
//!
//! ```text
//!   netns N:  v0 192.168.1.1/24, fd01::1/64  ◀─veth─▶ v1 (down side, only there so v0 has a link)
//!   margay's routes: proto 77 metric 77, via 192.168.1.2 / .3 (fd01::2 / ::3), blackholes, ECMP
//!   someone else's routes: proto static on some of the same prefixes
//! ```

use crate::common;
use common::eventually;

use std::collections::BTreeSet;
use std::time::Duration;

use common::dataplane::{ns_path, runtime, RouteMonitor};
use common::{is_root, require, sh, unique, Netns};
use ipnetwork::IpNetwork;
use margay::dataplane::fib::{Fib, FibConfig, NextHop, Route};
use margay::dataplane::DataplaneError;

fn net(s: &str) -> IpNetwork {
    s.parse().expect("prefix")
}

fn ip(s: &str) -> std::net::IpAddr {
    s.parse().expect("address")
}

/// A namespace with a veth whose near end has an IPv4 and an IPv6 subnet.
fn node(tag: &str) -> (Netns, String) {
    let name = unique(tag);
    let ns = Netns::new(&[&name]);
    // No IPv6 duplicate address detection: its completion adds local routes at an unpredictable moment.
    sh(&format!(
        "ip netns exec {name} sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0"
    ));
    sh(&format!(
        "ip -n {name} link add v0 type veth peer name v1 && ip -n {name} link set v0 up && ip -n {name} link set v1 up \
         && ip -n {name} addr add 192.168.1.1/24 dev v0 && ip -n {name} addr add fd01::1/64 dev v0 nodad"
    ));
    (ns, name)
}

fn config(name: &str) -> FibConfig {
    FibConfig {
        netns: Some(ns_path(name)),
        // Small chunks, so a 200-route table takes the pipelined (writer thread) path several times over.
        batch: 64,
        ..FibConfig::default()
    }
}

fn routes_of(name: &str, sel: &str) -> String {
    sh(&format!(
        "ip -n {name} route show {sel}; ip -n {name} -6 route show {sel}"
    ))
}

fn prereq(test: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(common::have("ip"), test, "needs iproute2")
}

fn table_a() -> Vec<Route> {
    let mut v = Vec::new();
    for i in 0..200u32 {
        v.push(Route::via(
            net(&format!("10.100.{}.0/24", i)),
            vec![NextHop::via(ip("192.168.1.2"))],
        ));
    }
    v.push(Route::blackhole(net("10.99.0.0/26")));
    v.push(Route::via(
        net("fd10::/64"),
        vec![NextHop::via(ip("fd01::2"))],
    ));
    v.push(Route::via(
        net("10.98.0.0/24"),
        vec![
            NextHop::via(ip("192.168.1.2")),
            NextHop::via(ip("192.168.1.3")),
        ],
    ));
    v.push(Route::via(
        net("10.97.0.0/24"),
        vec![NextHop::onlink(ip("172.16.0.1"), "v0")],
    ));
    v
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn restart_adopts_with_zero_changes_then_converges_by_difference() {
    if !prereq("restart_adopts_with_zero_changes_then_converges_by_difference") {
        return;
    }
    let (_ns, name) = node("fa");
    let rt = runtime();
    rt.block_on(async {
        let fib = Fib::spawn(config(&name)).await.expect("spawn");
        fib.sync(table_a()).await.expect("sync");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.installed, table_a().len(), "{st:?}");
        assert!(st.failed.is_empty() && st.conflicts.is_empty(), "{st:?}");
        assert_eq!(st.stats.created as usize, table_a().len());
    });
    let before = routes_of(&name, "proto 77");
    assert_eq!(
        before.lines().filter(|l| l.starts_with("10.100.")).count(),
        200
    );
    assert!(
        before.contains("10.97.0.0/24 via 172.16.0.1 dev v0 metric 77 onlink"),
        "{before}"
    );

    // "Restart": a new task over the same table (the old one dropped, its routes stay).
    let mut mon = RouteMonitor::start(&name);
    rt.block_on(async {
        let fib = Fib::spawn(config(&name)).await.expect("spawn again");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.stats.adopted as usize, table_a().len(), "adopted {st:?}");
        // The daemon then tells it the same desired set: nothing to do.
        fib.sync(table_a()).await.expect("sync");
        let st = fib.settle().await.expect("settle");
        assert_eq!(
            (
                st.stats.created,
                st.stats.replaced,
                st.stats.deleted,
                st.stats.writes
            ),
            (0, 0, 0, 0),
            "{st:?}"
        );
        // Only margay's routes count: the kernel may add its own (link-local, multicast) at any time.
        let ours = |ev: Vec<String>| -> Vec<String> {
            ev.into_iter().filter(|l| l.contains("proto 77")).collect()
        };
        let events = ours(mon.fence());
        assert!(
            events.is_empty(),
            "adoption caused route events: {events:?}"
        );
        assert_eq!(routes_of(&name, "proto 77"), before);

        // Converge a changed set: 10 removed, 5 added, 3 changed; exactly those writes and events.
        let mut b: Vec<Route> = table_a().into_iter().skip(10).collect();
        for i in 0..5 {
            b.push(Route::via(
                net(&format!("10.101.{i}.0/24")),
                vec![NextHop::via(ip("192.168.1.2"))],
            ));
        }
        for r in b.iter_mut().take(3) {
            r.next_hops = margay::dataplane::NextHops::Via(vec![NextHop::via(ip("192.168.1.3"))]);
        }
        fib.sync(b).await.expect("sync b");
        let st = fib.settle().await.expect("settle");
        assert_eq!(
            (st.stats.created, st.stats.replaced, st.stats.deleted),
            (5, 3, 10),
            "{st:?}"
        );
        let events = ours(mon.fence());
        assert_eq!(events.len(), 18, "events: {events:#?}");
        assert_eq!(
            events.iter().filter(|l| l.starts_with("Deleted")).count(),
            10
        );
    });
    let after = routes_of(&name, "proto 77");
    assert!(!after.contains("10.100.0.0/24"));
    assert!(after.contains("10.100.10.0/24 via 192.168.1.3"), "{after}");
    assert!(after.contains("10.101.4.0/24 via 192.168.1.2"));
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn deleted_or_changed_route_is_put_back_and_other_protocols_are_never_touched() {
    if !prereq("deleted_or_changed_route_is_put_back_and_other_protocols_are_never_touched") {
        return;
    }
    let (_ns, name) = node("fb");
    // Someone else's routes: one on our exact key (same metric), one on our prefix at its own metric.
    sh(&format!(
        "ip -n {name} route add 10.201.0.0/24 via 192.168.1.3 proto static metric 77 \
         && ip -n {name} route add 10.202.0.0/24 via 192.168.1.3 proto static \
         && ip -n {name} -6 route add fd20::/64 via fd01::3 proto static"
    ));
    let statics = || routes_of(&name, "proto static");
    let statics_before = statics();
    let rt = runtime();
    rt.block_on(async {
        let fib = Fib::spawn(config(&name)).await.expect("spawn");
        fib.replace_many(vec![
            Route::via(net("10.200.0.0/24"), vec![NextHop::via(ip("192.168.1.2"))]),
            Route::via(net("10.201.0.0/24"), vec![NextHop::via(ip("192.168.1.2"))]),
            Route::via(net("10.202.0.0/24"), vec![NextHop::via(ip("192.168.1.2"))]),
            Route::via(net("fd20::/64"), vec![NextHop::via(ip("fd01::2"))]),
        ])
        .await
        .expect("replace");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.installed, 3, "{st:?}");
        assert_eq!(st.conflicts.len(), 1, "{st:?}");
        assert_eq!(st.conflicts[0].0, net("10.201.0.0/24"));
        assert!(st.conflicts[0].1.contains("another protocol"), "{st:?}");
        assert_eq!(statics(), statics_before, "a static route was touched");

        // Someone deletes ours with `ip route del`: back within a second (polled with a generous bound).
        sh(&format!("ip -n {name} route del 10.202.0.0/24 proto 77"));
        sh(&format!("ip -n {name} -6 route del fd20::/64 proto 77"));
        assert!(
            eventually(Duration::from_secs(10), || {
                routes_of(&name, "proto 77").contains("10.202.0.0/24 via 192.168.1.2")
                    && routes_of(&name, "proto 77").contains("fd20::/64 via fd01::2")
            }),
            "route not restored: {}",
            routes_of(&name, "")
        );
        // Someone changes ours: changed back.
        sh(&format!(
            "ip -n {name} route replace 10.200.0.0/24 via 192.168.1.3 proto 77 metric 77"
        ));
        assert!(
            eventually(Duration::from_secs(10), || routes_of(&name, "proto 77")
                .contains("10.200.0.0/24 via 192.168.1.2")),
            "route not restored: {}",
            routes_of(&name, "")
        );
        let st = fib.settle().await.expect("settle");
        assert!(st.stats.repaired >= 3, "{st:?}");
        assert_eq!(statics(), statics_before, "a static route was touched");

        // Removing ours leaves theirs.
        fib.remove_many(vec![
            net("10.200.0.0/24"),
            net("10.201.0.0/24"),
            net("10.202.0.0/24"),
            net("fd20::/64"),
        ])
        .await
        .expect("remove");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.installed, 0, "{st:?}");
    });
    assert_eq!(routes_of(&name, "proto 77").trim(), "");
    assert_eq!(statics(), statics_before, "a static route was touched");
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn ecmp_is_one_multipath_route_and_losing_a_hop_keeps_the_other() {
    if !prereq("ecmp_is_one_multipath_route_and_losing_a_hop_keeps_the_other") {
        return;
    }
    let (_ns, name) = node("fc");
    let rt = runtime();
    rt.block_on(async {
        let fib = Fib::spawn(config(&name)).await.expect("spawn");
        fib.replace_many(vec![
            Route::via(
                net("10.210.0.0/24"),
                vec![
                    NextHop::via(ip("192.168.1.2")),
                    NextHop::via(ip("192.168.1.3")),
                ],
            ),
            Route::via(
                net("fd30::/64"),
                vec![NextHop::via(ip("fd01::2")), NextHop::via(ip("fd01::3"))],
            ),
        ])
        .await
        .expect("replace");
        let st = fib.settle().await.expect("settle");
        assert!(st.failed.is_empty(), "{st:?}");
        let v4 = sh(&format!("ip -n {name} route show 10.210.0.0/24"));
        assert_eq!(
            v4.lines()
                .filter(|l| l.starts_with("10.210.0.0/24"))
                .count(),
            1,
            "{v4}"
        );
        assert!(
            v4.contains("nexthop via 192.168.1.2") && v4.contains("nexthop via 192.168.1.3"),
            "{v4}"
        );
        let v6 = sh(&format!("ip -n {name} -6 route show fd30::/64"));
        assert!(
            v6.contains("nexthop via fd01::2") && v6.contains("nexthop via fd01::3"),
            "{v6}"
        );

        fib.replace_many(vec![
            Route::via(net("10.210.0.0/24"), vec![NextHop::via(ip("192.168.1.3"))]),
            Route::via(net("fd30::/64"), vec![NextHop::via(ip("fd01::3"))]),
        ])
        .await
        .expect("replace");
        let st = fib.settle().await.expect("settle");
        assert!(st.failed.is_empty(), "{st:?}");
        let v4 = sh(&format!("ip -n {name} route show 10.210.0.0/24"));
        assert!(
            v4.contains("10.210.0.0/24 via 192.168.1.3 dev v0 proto 77 metric 77"),
            "{v4}"
        );
        assert!(!v4.contains("192.168.1.2"), "{v4}");
        let v6 = sh(&format!("ip -n {name} -6 route show fd30::/64"));
        assert!(
            v6.contains("fd30::/64 via fd01::3 dev v0 proto 77 metric 77"),
            "{v6}"
        );
        assert!(!v6.contains("fd01::2"), "{v6}");
        // A second task adopts the multipath-then-single route as equal: no writes.
        drop(fib);
        let fib = Fib::spawn(config(&name)).await.expect("spawn again");
        fib.sync(vec![
            Route::via(net("10.210.0.0/24"), vec![NextHop::via(ip("192.168.1.3"))]),
            Route::via(net("fd30::/64"), vec![NextHop::via(ip("fd01::3"))]),
        ])
        .await
        .expect("sync");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.stats.writes, 0, "{st:?}");
    });
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bad_input_is_a_clear_error_and_leaves_nothing() {
    if !prereq("bad_input_is_a_clear_error_and_leaves_nothing") {
        return;
    }
    let (_ns, name) = node("fd");
    let rt = runtime();
    rt.block_on(async {
        // A namespace path that does not exist.
        let bad = FibConfig {
            netns: Some(ns_path(&format!("{name}-missing"))),
            ..FibConfig::default()
        };
        let err = Fib::spawn(bad).await.err().expect("must fail");
        assert!(matches!(err, DataplaneError::Netns { .. }), "{err}");
        assert!(
            err.to_string().contains(&format!("{name}-missing")),
            "{err}"
        );

        let fib = Fib::spawn(config(&name)).await.expect("spawn");
        // Host bits set: refused before it reaches the task.
        let err = fib
            .replace(Route::blackhole("10.1.2.3/24".parse().expect("net")))
            .await
            .expect_err("host bits");
        assert!(err.to_string().contains("10.1.2.3/24"), "{err}");
        // A device that does not exist: reported per prefix, nothing installed, the rest goes in.
        fib.replace_many(vec![
            Route::via(
                net("10.220.0.0/24"),
                vec![NextHop::onlink(ip("10.0.0.1"), "nosuch0")],
            ),
            Route::via(net("10.221.0.0/24"), vec![NextHop::via(ip("192.168.1.2"))]),
        ])
        .await
        .expect("queued");
        let st = fib.settle().await.expect("settle");
        assert_eq!(st.installed, 1, "{st:?}");
        assert_eq!(st.failed.len(), 1, "{st:?}");
        assert!(st.failed[0].1.contains("nosuch0"), "{st:?}");
        // A gateway the kernel cannot reach: the kernel's reason, per prefix.
        fib.replace(Route::via(
            net("10.222.0.0/24"),
            vec![NextHop::via(ip("172.31.0.1"))],
        ))
        .await
        .expect("queued");
        let st = fib.settle().await.expect("settle");
        let f: BTreeSet<_> = st.failed.iter().map(|(p, _)| *p).collect();
        assert!(f.contains(&net("10.222.0.0/24")), "{st:?}");
    });
    let ours = routes_of(&name, "proto 77");
    assert!(
        !ours.contains("10.220.") && !ours.contains("10.222."),
        "{ours}"
    );
    assert!(ours.contains("10.221.0.0/24"), "{ours}");
}
