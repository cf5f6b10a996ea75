//! Pod plumbing and the FIB together, two nodes on one bridge, against the real kernel.
//!
//! ```text
//!                        netns LAN: bridge br0
//!                  ┌──────────┴──────────┐
//!   netns A: eth0 192.168.77.1/24          netns B: eth0 192.168.77.2/24
//!            fd77::1/64                             fd77::2/64
//!     FIB: 10.77.2.0/24 via 192.168.77.2     FIB: 10.77.1.0/24 via 192.168.77.1
//!          fd77:2::/64 via fd77::2                fd77:1::/64 via fd77::1
//!          blackhole 10.77.1.0/24                 blackhole 10.77.2.0/24
//!     mgXXX ─ pod A1 10.77.1.2 fd77:1::2     mgXXX ─ pod B1 10.77.2.2 fd77:2::2
//!     mgXXX ─ pod A2 10.77.1.3 fd77:1::3     mgXXX ─ pod B2 10.77.2.3 fd77:2::3
//! ```
//! Each node has a default route (towards a router that is not there), as real nodes do: the host veth
//! answers a pod's ARP for 169.254.1.1 by proxy ARP, which the kernel does only for an address it has a
//! route to (Calico relies on the same).
//! Expect: every pod pings every other pod (same node and across), over IPv4 and IPv6; DEL leaves no
//! interface, route or address behind.

use crate::common;

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use common::dataplane::{ns_path, runtime};
use common::{have, is_root, require, sh, try_sh, unique, Netns};
use margay::dataplane::fib::{Fib, FibConfig, NextHop, Route};
use margay::dataplane::pod::{add_pod, check_pod, del_pod, host_ifname, list_pods, PodSpec};
use margay::dataplane::{sysctl, DataplaneError};

fn prereq(test: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(have("ip") && have("ping"), test, "needs iproute2 and ping")
}

fn spec(node: &str, pod: &str, id: &str, v4: Ipv4Addr, v6: Option<Ipv6Addr>) -> PodSpec {
    PodSpec {
        node_netns: Some(ns_path(node)),
        pod_netns: ns_path(pod),
        workload_id: id.to_string(),
        ifname: "eth0".to_string(),
        mtu: 1450,
        ipv4: Some(v4),
        ipv6: v6,
    }
}

fn ping(from: &str, to: &str) -> bool {
    let six = if to.contains(':') { "-6" } else { "" };
    // A first packet can be lost while neighbours resolve; a few tries, each bounded by -W1.
    (0..5).any(|_| try_sh(&format!("ip netns exec {from} ping {six} -c1 -W1 {to}")).0)
}

/// Everything in a node namespace that mentions pods.
fn node_state(node: &str) -> String {
    sh(&format!(
        "ip -n {node} -o link show; ip -n {node} route show; ip -n {node} -6 route show; ip -n {node} -o addr show"
    ))
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn two_nodes_two_pods_each_ping_across_and_del_leaves_nothing() {
    if !prereq("two_nodes_two_pods_each_ping_across_and_del_leaves_nothing") {
        return;
    }
    let lan = unique("lan");
    let (a, b) = (unique("na"), unique("nb"));
    let pods = [unique("pa1"), unique("pa2"), unique("pb1"), unique("pb2")];
    let mut names: Vec<&str> = vec![&lan, &a, &b];
    names.extend(pods.iter().map(|s| s.as_str()));
    let _ns = Netns::new(&names);
    sh(&format!(
        "ip -n {lan} link add br0 type bridge && ip -n {lan} link set br0 up"
    ));
    for (i, node) in [&a, &b].iter().enumerate() {
        let n = i + 1;
        sh(&format!(
            "ip -n {lan} link add p{n} type veth peer name eth0 netns {node} \
             && ip -n {lan} link set p{n} master br0 up \
             && ip -n {node} link set eth0 up \
             && ip -n {node} addr add 192.168.77.{n}/24 dev eth0 \
             && ip -n {node} addr add fd77::{n}/64 dev eth0 nodad \
             && ip -n {node} route add default via 192.168.77.254 dev eth0"
        ));
    }
    let report = sysctl::ensure_node(Some(&ns_path(&a))).expect("node sysctls");
    assert!(report
        .iter()
        .any(|s| s.key == "net/ipv4/ip_forward" && s.after.as_deref() == Some("1")));
    sysctl::ensure_node(Some(&ns_path(&b))).expect("node sysctls");

    let v6 = |s: &str| -> Option<Ipv6Addr> { Some(s.parse().expect("v6")) };
    let specs = [
        spec(
            &a,
            &pods[0],
            "default.a1",
            Ipv4Addr::new(10, 77, 1, 2),
            v6("fd77:1::2"),
        ),
        spec(
            &a,
            &pods[1],
            "default.a2",
            Ipv4Addr::new(10, 77, 1, 3),
            v6("fd77:1::3"),
        ),
        spec(
            &b,
            &pods[2],
            "default.b1",
            Ipv4Addr::new(10, 77, 2, 2),
            v6("fd77:2::2"),
        ),
        spec(
            &b,
            &pods[3],
            "default.b2",
            Ipv4Addr::new(10, 77, 2, 3),
            v6("fd77:2::3"),
        ),
    ];
    for s in &specs {
        let r = add_pod(s).expect("ADD");
        assert_eq!(r.host_ifname, host_ifname(&s.workload_id));
        assert_eq!(r.pod_ifname, "eth0");
        check_pod(s).expect("CHECK right after ADD");
        // ADD again for the same workload: the same result, nothing rebuilt.
        let again = add_pod(s).expect("ADD again");
        assert_eq!(again, r);
    }
    let host = host_ifname("default.a1");
    let link = sh(&format!("ip -n {a} link show {host}"));
    assert!(
        link.contains("link/ether ee:ee:ee:ee:ee:ee") && link.contains("mtu 1450"),
        "{link}"
    );
    let pod_routes = sh(&format!("ip -n {} route show", pods[0]));
    assert!(
        pod_routes.contains("default via 169.254.1.1 dev eth0"),
        "{pod_routes}"
    );
    assert!(pod_routes.contains("169.254.1.1 dev eth0"), "{pod_routes}");
    let pod6 = sh(&format!("ip -n {} -6 route show", pods[0]));
    assert!(
        pod6.contains("default via fe80::ecee:eeff:feee:eeee dev eth0"),
        "{pod6}"
    );
    let host_routes = sh(&format!("ip -n {a} route show dev {host}"));
    assert!(
        host_routes.contains("10.77.1.2 proto 78 scope link"),
        "{host_routes}"
    );
    let proxy_arp = sh(&format!(
        "ip netns exec {a} cat /proc/sys/net/ipv4/conf/{host}/proxy_arp"
    ));
    assert_eq!(proxy_arp.trim(), "1");

    let listed = list_pods(Some(&ns_path(&a))).expect("list");
    assert_eq!(listed.len(), 2, "{listed:?}");
    let a1 = listed
        .iter()
        .find(|p| p.workload_id == "default.a1")
        .expect("a1 listed");
    assert_eq!(a1.host_ifname, host);
    assert!(a1.ips.contains(&"10.77.1.2".parse().expect("ip")), "{a1:?}");
    assert!(a1.ips.contains(&"fd77:1::2".parse().expect("ip")), "{a1:?}");

    let rt = runtime();
    rt.block_on(async {
        let fa = Fib::spawn(FibConfig {
            netns: Some(ns_path(&a)),
            ..FibConfig::default()
        })
        .await
        .expect("FIB A");
        let fb = Fib::spawn(FibConfig {
            netns: Some(ns_path(&b)),
            ..FibConfig::default()
        })
        .await
        .expect("FIB B");
        let n = |s: &str| s.parse().expect("net");
        let i = |s: &str| s.parse().expect("ip");
        fa.sync(vec![
            Route::blackhole(n("10.77.1.0/24")),
            Route::via(n("10.77.2.0/24"), vec![NextHop::via(i("192.168.77.2"))]),
            Route::via(n("fd77:2::/64"), vec![NextHop::via(i("fd77::2"))]),
        ])
        .await
        .expect("sync A");
        fb.sync(vec![
            Route::blackhole(n("10.77.2.0/24")),
            Route::via(n("10.77.1.0/24"), vec![NextHop::via(i("192.168.77.1"))]),
            Route::via(n("fd77:1::/64"), vec![NextHop::via(i("fd77::1"))]),
        ])
        .await
        .expect("sync B");
        for f in [&fa, &fb] {
            let st = f.settle().await.expect("settle");
            assert!(st.failed.is_empty() && st.conflicts.is_empty(), "{st:?}");
            assert_eq!(st.installed, 3);
        }
        // Pings run while the FIB tasks are alive (they would repair anything that went missing).
        for (from, to) in [
            (&pods[0], "10.77.1.3"), // same node
            (&pods[0], "10.77.2.2"), // across
            (&pods[1], "10.77.2.3"),
            (&pods[3], "10.77.1.2"),
            (&pods[2], "10.77.2.3"),
            (&pods[0], "fd77:2::2"),
            (&pods[3], "fd77:1::3"),
            (&pods[0], "fd77:1::3"),
        ] {
            assert!(
                ping(from, to),
                "{from} cannot ping {to}\n{}",
                node_state(&a)
            );
        }
        // A blackholed address of the node's own block that no pod holds goes nowhere.
        assert!(
            !try_sh(&format!(
                "ip netns exec {} ping -c1 -W1 10.77.1.99",
                pods[2]
            ))
            .0
        );
    });

    // DEL every pod: nothing of theirs is left in the nodes.
    let before_a = list_pods(Some(&ns_path(&a))).expect("list");
    assert_eq!(before_a.len(), 2);
    for s in &specs {
        assert!(del_pod(s.node_netns.as_deref(), &s.workload_id).expect("DEL"));
        // DEL again (already gone) is success.
        assert!(!del_pod(s.node_netns.as_deref(), &s.workload_id).expect("DEL again"));
    }
    for node in [&a, &b] {
        let st = node_state(node);
        for s in &specs {
            let h = host_ifname(&s.workload_id);
            assert!(!st.contains(&h), "interface {h} is left:\n{st}");
        }
        assert!(!st.contains("proto 78"), "a pod route is left:\n{st}");
        assert!(
            !st.contains("10.77.1.2") && !st.contains("10.77.2.2"),
            "{st}"
        );
        assert!(list_pods(Some(&ns_path(node))).expect("list").is_empty());
    }
    for p in &pods {
        let st = sh(&format!(
            "ip -n {p} -o link show; ip -n {p} -o addr show; ip -n {p} route show"
        ));
        assert!(!st.contains("eth0"), "pod {p} keeps its side:\n{st}");
    }
    // DEL with the pod's namespace already gone is success too.
    assert!(!del_pod(Some(&ns_path(&a)), "default.gone").expect("DEL of a gone pod"));
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn bad_input_names_the_object_and_leaves_nothing() {
    if !prereq("bad_input_names_the_object_and_leaves_nothing") {
        return;
    }
    let (node, pod) = (unique("nx"), unique("px"));
    let _ns = Netns::new(&[&node, &pod]);
    let n = |s: &PodSpec| {
        sh(&format!("ip -n {} -o link show", node)).contains(&host_ifname(&s.workload_id))
    };

    // An invalid pod netns path.
    let mut s = spec(
        &node,
        &pod,
        "default.bad1",
        Ipv4Addr::new(10, 9, 0, 2),
        None,
    );
    s.pod_netns = PathBuf::from(format!("/var/run/netns/{pod}-nope"));
    let err = add_pod(&s).expect_err("missing netns");
    assert!(matches!(err, DataplaneError::Netns { .. }), "{err}");
    assert!(err.to_string().contains(&format!("{pod}-nope")), "{err}");
    assert!(!n(&s));
    // An invalid node netns path.
    let mut s = spec(
        &node,
        &pod,
        "default.bad1",
        Ipv4Addr::new(10, 9, 0, 2),
        None,
    );
    s.node_netns = Some(PathBuf::from("/proc/self/ns/nonexistent"));
    let err = add_pod(&s).expect_err("missing node netns");
    assert!(
        err.to_string().contains("/proc/self/ns/nonexistent"),
        "{err}"
    );
    // A file that is not a namespace.
    let mut s = spec(
        &node,
        &pod,
        "default.bad1",
        Ipv4Addr::new(10, 9, 0, 2),
        None,
    );
    s.pod_netns = PathBuf::from("/etc/hostname");
    let err = add_pod(&s).expect_err("not a netns");
    assert!(err.to_string().contains("/etc/hostname"), "{err}");
    assert!(!n(&s));

    // A name collision: the pod already has an eth0 that is not ours.
    sh(&format!(
        "ip -n {pod} link add eth0 type veth peer name other0"
    ));
    let s = spec(
        &node,
        &pod,
        "default.bad2",
        Ipv4Addr::new(10, 9, 0, 3),
        None,
    );
    let err = add_pod(&s).expect_err("collision");
    assert!(matches!(err, DataplaneError::NameCollision { .. }), "{err}");
    assert!(err.to_string().contains("eth0"), "{err}");
    assert!(!n(&s), "half-made host interface left");
    assert!(
        sh(&format!("ip -n {pod} -o link show")).contains("other0"),
        "their interface was touched"
    );
    sh(&format!("ip -n {pod} link del eth0"));

    // Bad fields are refused before anything is made.
    let mut s = spec(
        &node,
        &pod,
        "default.bad3",
        Ipv4Addr::new(10, 9, 0, 4),
        None,
    );
    s.ifname = "this-name-is-too-long".into();
    let err = add_pod(&s).expect_err("long name");
    assert!(err.to_string().contains("this-name-is-too-long"), "{err}");
    assert!(!n(&s));

    // CHECK of a pod that was never plumbed says what is missing; DEL of it is success.
    let s = spec(
        &node,
        &pod,
        "default.never",
        Ipv4Addr::new(10, 9, 0, 5),
        None,
    );
    let err = check_pod(&s).expect_err("nothing there");
    assert!(err.to_string().contains("is missing"), "{err}");
    assert!(!del_pod(s.node_netns.as_deref(), &s.workload_id).expect("DEL"));

    // A stale interface of the same name (another sandbox) is replaced; CHECK sees a change by hand.
    let s = spec(&node, &pod, "default.ok", Ipv4Addr::new(10, 9, 0, 6), None);
    add_pod(&s).expect("ADD");
    let host = host_ifname("default.ok");
    sh(&format!("ip -n {node} route del 10.9.0.6 dev {host}"));
    let err = check_pod(&s).expect_err("route removed by hand");
    assert!(err.to_string().contains("host route 10.9.0.6/32"), "{err}");
    add_pod(&s).expect("ADD repairs");
    check_pod(&s).expect("CHECK after repair");
    assert!(del_pod(s.node_netns.as_deref(), &s.workload_id).expect("DEL"));
    let st = sh(&format!(
        "ip -n {node} -o link show; ip -n {node} route show"
    ));
    assert!(!st.contains(&host) && !st.contains("10.9.0.6"), "{st}");
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn a_new_sandbox_for_the_same_workload_replaces_the_stale_veth() {
    if !prereq("a_new_sandbox_for_the_same_workload_replaces_the_stale_veth") {
        return;
    }
    // node N; the workload's first sandbox S1, then (after a crash, no DEL) a new sandbox S2.
    let (node, s1, s2) = (unique("ns"), unique("s1"), unique("s2"));
    let _ns = Netns::new(&[&node, &s1, &s2]);
    let first = spec(
        &node,
        &s1,
        "default.web-0",
        Ipv4Addr::new(10, 9, 1, 2),
        None,
    );
    let r1 = add_pod(&first).expect("ADD in S1");
    let mut second = first.clone();
    second.pod_netns = ns_path(&s2);
    second.ipv4 = Some(Ipv4Addr::new(10, 9, 1, 3));
    let err = check_pod(&second).expect_err("S2 has nothing yet");
    assert!(err.to_string().contains("is missing"), "{err}");
    let r2 = add_pod(&second).expect("ADD in S2");
    assert_eq!(
        r2.host_ifname, r1.host_ifname,
        "the name is stable per workload"
    );
    check_pod(&second).expect("CHECK S2");
    assert!(
        check_pod(&first).is_err(),
        "the old sandbox is no longer plumbed"
    );
    let s1_links = sh(&format!("ip -n {s1} -o link show"));
    assert!(!s1_links.contains("eth0"), "{s1_links}");
    let routes = sh(&format!("ip -n {node} route show"));
    assert!(
        !routes.contains("10.9.1.2"),
        "the old host route is left: {routes}"
    );
    assert!(
        routes.contains(&format!("10.9.1.3 dev {}", r2.host_ifname)),
        "{routes}"
    );
    assert_eq!(list_pods(Some(&ns_path(&node))).expect("list").len(), 1);
    assert!(del_pod(Some(&ns_path(&node)), "default.web-0").expect("DEL"));
}
