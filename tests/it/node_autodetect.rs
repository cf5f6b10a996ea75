//! Node address autodetection against the real kernel: one node namespace with several interfaces, every
//! Calico method, in-process and through `margay node run`.
//!
//! ```text
//!   netns NODE                                         netns FAR
//!     lo       127.0.0.1/8
//!     docker0  172.17.0.1/16   (veth, up: skipped by name) ── fd
//!     eth2     10.3.0.2/24     (veth, DOWN) ─────────── f2 10.3.0.1/24
//!     eth0     10.1.0.2/24     (veth)       ─────────── f0 10.1.0.1/24
//!     eth1     10.2.0.2/24     (veth)       ─────────── f1 10.2.0.1/24
//!     routes: 203.0.113.0/24 via 10.2.0.1 (so can-reach=203.0.113.9 leaves by eth1); no default route
//! ```
//! Expect: first-found = eth0 (docker0 skipped, eth2 down), interface=^eth1$ = eth1, skip-interface=^eth0$
//! = eth1, can-reach=203.0.113.9 = eth1 and can-reach=10.1.0.1 = eth0, cidr=10.2.0.0/16 = eth1; a method
//! matching nothing fails listing every interface and address seen.

use crate::common;

use std::net::Ipv4Addr;
use std::process::Command;

use common::dataplane::ns_path;
use common::{is_root, require, sh, unique, Netns};
use margay::dataplane::autodetect::{detect, AutodetectError, Method};

struct Node {
    _ns: Netns,
    node: String,
}

fn setup(test: &str, tag: &str) -> Option<Node> {
    if !require(is_root(), test, "needs root for network namespaces") {
        return None;
    }
    let node = unique(&format!("{tag}n"));
    let far = unique(&format!("{tag}f"));
    let ns = Netns::new(&[&node, &far]);
    sh(&format!(
        "ip -n {far} link add fd type veth peer name docker0 netns {node} && ip -n {node} addr add 172.17.0.1/16 dev docker0 && ip -n {node} link set docker0 up"
    ));
    // eth2 first, so first-found meets a down interface before the right one.
    for (i, up) in [(2, false), (0, true), (1, true)] {
        sh(&format!(
            "ip -n {far} link add f{i} type veth peer name eth{i} netns {node} && \
             ip -n {far} addr add 10.{s}.0.1/24 dev f{i} && ip -n {far} link set f{i} up && \
             ip -n {node} addr add 10.{s}.0.2/24 dev eth{i}",
            s = i + 1
        ));
        if up {
            sh(&format!("ip -n {node} link set eth{i} up"));
        }
    }
    sh(&format!(
        "ip -n {node} route add 203.0.113.0/24 via 10.2.0.1"
    ));
    Some(Node { _ns: ns, node })
}

fn run(n: &Node, method: &str) -> Result<(String, Ipv4Addr, u8, Vec<String>), AutodetectError> {
    let m: Method = method.parse().expect("method parses");
    detect(&m, Some(&ns_path(&n.node))).map(|d| {
        (
            d.chosen.interface,
            d.chosen.address,
            d.chosen.prefix_len,
            d.others.iter().map(|o| o.interface.clone()).collect(),
        )
    })
}

const ETH0: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
const ETH1: Ipv4Addr = Ipv4Addr::new(10, 2, 0, 2);

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn first_found_skips_virtual_and_down_interfaces() {
    let Some(n) = setup("first_found_skips_virtual_and_down_interfaces", "ff") else {
        return;
    };
    let (iface, ip, len, others) = run(&n, "first-found").expect("first-found");
    assert_eq!((iface.as_str(), ip, len), ("eth0", ETH0, 24));
    assert_eq!(others, ["eth1"], "the other candidates");
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn interface_and_skip_interface_select_by_name() {
    let Some(n) = setup("interface_and_skip_interface_select_by_name", "if") else {
        return;
    };
    assert_eq!(run(&n, "interface=^eth1$").expect("interface=").1, ETH1);
    assert_eq!(run(&n, "interface=^nope,eth[01]").expect("list").0, "eth0");
    // interface= may pick what first-found skips by name.
    assert_eq!(
        run(&n, "interface=docker").expect("docker").1,
        Ipv4Addr::new(172, 17, 0, 1)
    );
    assert_eq!(run(&n, "skip-interface=^eth0$").expect("skip").1, ETH1);
    // eth2 is down: nothing to pick; the error lists every interface and address seen, and the fix.
    let e = run(&n, "interface=^eth2$")
        .expect_err("eth2 is down")
        .to_string();
    for want in [
        "interface=^eth2$",
        "eth2 10.3.0.2/24 (down)",
        "eth0 10.1.0.2/24",
        "docker0 172.17.0.1/16",
        "lo 127.0.0.1/8",
        "--ip",
    ] {
        assert!(e.contains(want), "{want:?} missing in: {e}");
    }
    let e = run(&n, "skip-interface=^eth")
        .expect_err("all skipped")
        .to_string();
    assert!(
        e.contains("no node IPv4 address matches skip-interface=^eth"),
        "{e}"
    );
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn can_reach_uses_the_kernels_source_address() {
    let Some(n) = setup("can_reach_uses_the_kernels_source_address", "cr") else {
        return;
    };
    assert_eq!(
        run(&n, "can-reach=203.0.113.9").expect("via eth1").0,
        "eth1"
    );
    assert_eq!(run(&n, "can-reach=10.1.0.1").expect("on eth0").0, "eth0");
    match run(&n, "can-reach=198.51.100.1") {
        Err(AutodetectError::Unreachable { dest, reason, .. }) => {
            assert_eq!(dest, Ipv4Addr::new(198, 51, 100, 1));
            assert!(!reason.is_empty());
        }
        other => panic!("no route there, got {other:?}"),
    }
    // A name resolving to the loopback address is not a node address (and where /etc/hosts maps
    // localhost to ::1 only, there is no IPv4 destination at all): an error either way.
    match run(&n, "can-reach=localhost") {
        Err(AutodetectError::NoMatch { detail, .. }) => {
            assert!(detail.contains("not a usable node address"), "{detail}")
        }
        Err(AutodetectError::Resolve { reason, .. }) => {
            assert!(reason.contains("only IPv6"), "{reason}")
        }
        other => panic!("can-reach=localhost must fail, got {other:?}"),
    }
}

#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn cidr_selects_by_range() {
    let Some(n) = setup("cidr_selects_by_range", "ci") else {
        return;
    };
    assert_eq!(run(&n, "cidr=10.2.0.0/16").expect("cidr").1, ETH1);
    assert_eq!(
        run(&n, "cidr=192.168.0.0/16,10.0.0.0/8")
            .expect("cidr list")
            .0,
        "eth0"
    );
    let e = run(&n, "cidr=10.3.0.0/24")
        .expect_err("only on a down interface")
        .to_string();
    assert!(e.contains("cidr=10.3.0.0/24"), "{e}");
}

/// `margay node run` parses the method, detects in its --netns and logs the choice before it needs etcd
/// (here unreachable, so it then stops with an etcd error).
#[test]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
fn node_run_logs_the_choice_and_rejects_bad_methods() {
    let Some(n) = setup("node_run_logs_the_choice_and_rejects_bad_methods", "nr") else {
        return;
    };
    let node = |method: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_margay"))
            .args(["node", "run", "--node-name", "t", "--netns"])
            .arg(ns_path(&n.node))
            .args([
                "--ip-autodetection-method",
                method,
                "--etcd-endpoints",
                "http://127.0.0.1:1",
                "--etcd-timeout",
                "1",
                "--cni-socket",
                "/nonexistent/margay-autodetect-test.sock",
            ])
            .env("RUST_LOG", "info")
            .env_remove("IP")
            .env_remove("MARGAY_IP_AUTODETECTION_METHOD")
            .output()
            .expect("run margay");
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text)
    };
    let (code, log) = node("can-reach=203.0.113.9");
    assert_ne!(code, Some(0), "etcd is unreachable: {log}");
    assert!(log.contains("node address autodetected"), "{log}");
    assert!(log.contains("10.2.0.2") && log.contains("eth1"), "{log}");

    let (code, log) = node("interface=^wlan");
    assert_ne!(code, Some(0), "{log}");
    assert!(
        log.contains("no node IPv4 address matches interface=^wlan"),
        "{log}"
    );
    assert!(log.contains("eth1 10.2.0.2/24"), "{log}");

    let (code, log) = node("cidr=10.0.0.0/99");
    assert_eq!(code, Some(2), "a usage error: {log}");
    assert!(log.contains("not an IPv4 CIDR"), "{log}");
}
