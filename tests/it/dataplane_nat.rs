//! Outgoing NAT through margay's nftables table, seen from the far end.
//!
//! ```text
//!   netns EXT: x0 203.0.113.2/24            UDP echo: replies with the source address it saw
//!       route 10.81.0.0/24 via 203.0.113.1   (so the non-NAT pool's replies come back)
//!        │ veth
//!   netns NODE: x1 203.0.113.1/24, default via 203.0.113.2
//!       pools: 10.80.0.0/24 natOutgoing, 10.81.0.0/24 not
//!       table inet margay (masquerade 10.80/24 -> outside every pool); table ip other (someone else's)
//!     mgXXX ─ pod P1 10.80.0.2 (NAT pool)      mgXXX ─ pod P2 10.81.0.2 (non-NAT pool, runs an echo too)
//! ```
//! Expect: P1 → EXT is seen as 203.0.113.1 (the node); P2 → EXT as 10.81.0.2; P1 → P2 (inside the pools)
//! as 10.80.0.2; with the table emptied or removed, P1 keeps its own address; `table ip other` never changes.

use crate::common;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use common::dataplane::ns_path;
use common::{have, is_root, require, sh, unique, Netns};
use margay::dataplane::nat::{self, NatPool};
use margay::dataplane::pod::{add_pod, PodSpec};
use margay::dataplane::{in_netns, sysctl, DataplaneError};

/// A UDP echo server bound inside `ns`: answers each datagram with the sender's IP as text.
fn echo_server(ns: &str, addr: &str) -> (SocketAddr, std::thread::JoinHandle<()>) {
    let addr: SocketAddr = addr.parse().expect("addr");
    let sock = in_netns(Some(&ns_path(ns)), || {
        UdpSocket::bind(addr).map_err(|e| DataplaneError::Invalid {
            what: "bind",
            value: addr.to_string(),
            reason: e.to_string(),
        })
    })
    .expect("bind echo server");
    let local = sock.local_addr().expect("local addr");
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            if &buf[..n] == b"quit" {
                break;
            }
            let _ = sock.send_to(peer.ip().to_string().as_bytes(), peer);
        }
    });
    (local, h)
}

/// From inside `ns`, ask the echo server at `to` which source address it sees.
fn seen_from(ns: &str, to: SocketAddr) -> Option<String> {
    in_netns(Some(&ns_path(ns)), || {
        let s = UdpSocket::bind("0.0.0.0:0").map_err(|e| DataplaneError::Invalid {
            what: "bind",
            value: "0.0.0.0:0".into(),
            reason: e.to_string(),
        })?;
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        for _ in 0..5 {
            if s.send_to(b"who", to).is_err() {
                continue;
            }
            let mut buf = [0u8; 64];
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                return Ok(Some(String::from_utf8_lossy(&buf[..n]).into_owned()));
            }
        }
        Ok(None)
    })
    .expect("client")
}

fn stop(to: SocketAddr, from_ns: &str) {
    let _ = in_netns(Some(&ns_path(from_ns)), || {
        if let Ok(s) = UdpSocket::bind("0.0.0.0:0") {
            let _ = s.send_to(b"quit", to);
        }
        Ok(())
    });
}

#[test]
#[ignore = "needs root for network namespaces; needs nftables and iproute2: scripts/test.sh runs it (--include-ignored)"]
fn nat_pool_leaves_with_the_node_address_and_other_pools_keep_their_own() {
    let t = "nat_pool_leaves_with_the_node_address_and_other_pools_keep_their_own";
    if !(require(is_root(), t, "needs root for network namespaces")
        && require(have("nft") && have("ip"), t, "needs nftables and iproute2"))
    {
        return;
    }
    let (ext, node, p1, p2) = (unique("ext"), unique("nn"), unique("p1"), unique("p2"));
    let _ns = Netns::new(&[&ext, &node, &p1, &p2]);
    sh(&format!(
        "ip -n {ext} link add x0 type veth peer name x1 netns {node} \
         && ip -n {ext} link set x0 up && ip -n {node} link set x1 up \
         && ip -n {ext} addr add 203.0.113.2/24 dev x0 && ip -n {node} addr add 203.0.113.1/24 dev x1 \
         && ip -n {node} route add default via 203.0.113.2 \
         && ip -n {ext} route add 10.81.0.0/24 via 203.0.113.1"
    ));
    // Someone else's nftables table in the node: must never change.
    sh(&format!(
        "ip netns exec {node} nft add table ip other && ip netns exec {node} nft add chain ip other c && \
         ip netns exec {node} nft add rule ip other c counter"
    ));
    let other = || sh(&format!("ip netns exec {node} nft list table ip other"));
    let other_before = other();
    sysctl::ensure_node(Some(&ns_path(&node))).expect("sysctls");
    for (pod, id, ip) in [
        (&p1, "nat.p1", [10, 80, 0, 2]),
        (&p2, "nat.p2", [10, 81, 0, 2]),
    ] {
        add_pod(&PodSpec {
            node_netns: Some(ns_path(&node)),
            pod_netns: ns_path(pod),
            workload_id: id.into(),
            ifname: "eth0".into(),
            mtu: 1500,
            ipv4: Some(Ipv4Addr::from(ip)),
            ipv6: None,
        })
        .expect("ADD");
    }
    let pools = vec![
        NatPool {
            cidr: "10.80.0.0/24".parse().expect("net"),
            nat_outgoing: true,
        },
        NatPool {
            cidr: "10.81.0.0/24".parse().expect("net"),
            nat_outgoing: false,
        },
    ];
    let node_ns = ns_path(&node);
    nat::apply(Some(&node_ns), &pools).expect("apply NAT");
    // Applying the same again replaces the table as a whole, with the same result.
    nat::apply(Some(&node_ns), &pools).expect("apply NAT again");
    let table = nat::show(Some(&node_ns))
        .expect("show")
        .expect("table exists");
    assert!(table.contains("masquerade"), "{table}");

    let (outside, h1) = echo_server(&ext, "203.0.113.2:0");
    let (inpool, h2) = echo_server(&p2, "10.81.0.2:0");
    assert_eq!(
        seen_from(&p1, outside).as_deref(),
        Some("203.0.113.1"),
        "NAT pool not masqueraded"
    );
    assert_eq!(
        seen_from(&p2, outside).as_deref(),
        Some("10.81.0.2"),
        "non-NAT pool was masqueraded"
    );
    assert_eq!(
        seen_from(&p1, inpool).as_deref(),
        Some("10.80.0.2"),
        "pool-to-pool traffic was masqueraded"
    );

    // The pool loses natOutgoing: the table is replaced as a whole and P1 now leaves with its own address
    // (the outside gets a route back to it so the reply can arrive).
    nat::apply(
        Some(&node_ns),
        &[NatPool {
            cidr: "10.80.0.0/24".parse().expect("net"),
            nat_outgoing: false,
        }],
    )
    .expect("apply without NAT");
    sh(&format!(
        "ip -n {ext} route add 10.80.0.0/24 via 203.0.113.1"
    ));
    // conntrack remembers the old flow's mapping: use a new source port (a new socket per call does).
    assert_eq!(
        seen_from(&p1, outside).as_deref(),
        Some("10.80.0.2"),
        "masqueraded without natOutgoing"
    );

    nat::remove(Some(&node_ns)).expect("remove");
    assert!(nat::show(Some(&node_ns)).expect("show").is_none());
    nat::remove(Some(&node_ns)).expect("remove twice is fine");
    assert_eq!(
        other(),
        other_before,
        "someone else's nftables table changed"
    );

    stop(outside, &ext);
    stop(inpool, &p2);
    let _ = h1.join();
    let _ = h2.join();
}
