//! The two-subnet lab as the encapsulation tests use it (`Lab::with(tag, 3, 1, &["--subnets", "2"])`):
//!
//! ```text
//!   netns <lab>-br: router (no pod route), br0 10.99.0.0/24 | br1 10.99.1.0/24
//!     n1 10.99.0.11 (pod p1)                 |  n2 10.99.1.12 (pod p2)
//!     n3 10.99.0.13 (pod p3)                 |
//! ```
//!
//! [`AcrossRouter`] names the nodes, pods and blocks, and checks what every pool mode (CrossSubnet, Always,
//! Never) must do to n1's routes and traffic, whichever tunnel device (`vxlan.calico`, `tunl0`) carries it.

use std::net::Ipv4Addr;
use std::time::Duration;

use super::lab::{in_ns, own_block, Lab};
use super::{eventually, sh};

/// A pod of the lab: (netns, node, address).
pub type Pod = (String, String, Ipv4Addr);

/// margay's routes in `ns` as `ip route` prints them.
pub fn proto77_text(ns: &str) -> String {
    sh(&format!("ip -n {ns} route show proto 77"))
}

/// TX packets of `dev` in `ns` (0 when it does not exist).
pub fn tx_packets(ns: &str, dev: &str) -> u64 {
    let (ok, out) = in_ns(ns, &["ip", "-s", "-j", "link", "show", dev]);
    if !ok {
        return 0;
    }
    let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    v[0]["stats64"]["tx"]["packets"].as_u64().unwrap_or(0)
}

/// The three nodes (ready), their pods and the blocks of n2 and n3, seen from n1.
pub struct AcrossRouter<'a> {
    pub lab: &'a Lab,
    pub n1: String,
    pub n2: String,
    pub n3: String,
    pub p1: Pod,
    pub p2: Pod,
    pub p3: Pod,
    pub b2: String,
    pub b3: String,
}

impl<'a> AcrossRouter<'a> {
    /// Wait for every node to be ready and name what the checks use.
    pub fn new(lab: &'a Lab) -> AcrossRouter<'a> {
        let node = |i: usize| lab.nodes[i].0.clone();
        let (n1, n2, n3) = (node(0), node(1), node(2));
        assert_eq!(lab.nodes[1].1.to_string(), "10.99.1.12");
        for n in [&n1, &n2, &n3] {
            lab.wait_ready(n);
        }
        let pod = |n: &str| {
            lab.pods
                .iter()
                .find(|(_, pn, _)| pn == n)
                .expect("pod")
                .clone()
        };
        let (p1, p2, p3) = (pod(&n1), pod(&n2), pod(&n3));
        let (b2, b3) = (own_block(&n2).to_string(), own_block(&n3).to_string());
        AcrossRouter {
            lab,
            n1,
            n2,
            n3,
            p1,
            p2,
            p3,
            b2,
            b3,
        }
    }

    /// p1 pings `to`.
    pub fn reach(&self, to: &Pod) -> bool {
        in_ns(
            &self.p1.0,
            &["ping", "-c", "3", "-i", "0.2", "-W", "2", &to.2.to_string()],
        )
        .0
    }

    /// n1's route to block `b` ("" when none).
    pub fn route_of(&self, b: &str) -> String {
        proto77_text(&self.n1)
            .lines()
            .find(|l| l.starts_with(&format!("{b} ")))
            .unwrap_or("")
            .to_string()
    }

    /// Wait until n1's routes to n2's and n3's blocks contain `to_n2` and `to_n3` (every part of each).
    pub fn wait_routes(&self, to_n2: &[&str], to_n3: &[&str]) {
        let has = |b: &str, want: &[&str]| {
            let r = self.route_of(b);
            want.iter().all(|w| r.contains(w))
        };
        assert!(
            eventually(Duration::from_secs(15), || has(&self.b2, to_n2)
                && has(&self.b3, to_n3)),
            "n2: {:?} n3: {:?}\n{}\n{}",
            self.route_of(&self.b2),
            self.route_of(&self.b3),
            proto77_text(&self.n1),
            self.lab.node_logs(&self.n1)
        );
    }

    /// CrossSubnet: p1 reaches p3 (same segment) without `dev`, p2 (across the router) through it, and
    /// p2 reaches p3.
    pub fn crosssubnet_traffic(&self, dev: &str) {
        let tx = || tx_packets(&self.n1, dev);
        let before = tx();
        assert!(self.reach(&self.p3), "p1 -> p3 (same segment)");
        assert_eq!(tx(), before, "same-segment traffic was encapsulated");
        assert!(self.reach(&self.p2), "p1 -> p2 (across the router, {dev})");
        assert!(
            tx() >= before + 3,
            "cross-segment traffic was not encapsulated"
        );
        assert!(
            in_ns(
                &self.p2.0,
                &["ping", "-c", "1", "-W", "2", &self.p3.2.to_string()]
            )
            .0,
            "p2 -> p3"
        );
    }

    /// Always: p1 reaches p3 through `dev` too.
    pub fn always_traffic(&self, dev: &str) {
        let before = tx_packets(&self.n1, dev);
        assert!(self.reach(&self.p3), "p1 -> p3 with Always");
        assert!(tx_packets(&self.n1, dev) >= before + 3);
    }

    /// Never: p3 is reached plainly; p2 is not (the router knows no pod route).
    pub fn never_traffic(&self) {
        assert!(self.reach(&self.p3), "p1 -> p3 without encapsulation");
        assert!(
            !self.reach(&self.p2),
            "p1 reached p2 through a router that knows no pod route"
        );
    }
}
