//! Service CIDR export (Calico's confd `routes.go`): every node originates the BGPConfiguration's serviceClusterIPs,
//! serviceExternalIPs and (aggregated) serviceLoadBalancerIPs; a real BIRD 2 global peer (a BGPPeer
//! without node selector) learns them from every node, and loses them when they leave the configuration,
//! live, without a restart.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24 + BIRD 2 (AS 65001)  ◀──eBGP──  n1 10.99.0.11 (AS 64512)
//!                                                           ◀──eBGP──  n2 10.99.0.12 (AS 64512)
//!   BGPConfiguration default: serviceClusterIPs 10.96.0.0/12, serviceExternalIPs 192.0.2.0/24,
//!                             serviceLoadBalancerIPs 198.51.100.0/24
//!   BGPPeer tor: peerIP 10.99.0.1, asNumber 65001 (global)
//!
//!   BIRD's table: each CIDR via 10.99.0.11 and via 10.99.0.12
//!   then serviceExternalIPs removed, serviceLoadBalancerAggregation Disabled:
//!                 192.0.2.0/24 and 198.51.100.0/24 withdrawn by both; 10.96.0.0/12 stays
//! ```
//!
//! Needs root, etcd, etcdctl, iproute2 and BIRD 2; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::time::Duration;

use common::bgp_peers::{have_bird, Bird};
use common::lab::{eventually, in_ns, Lab, ETCD};
use common::{have, is_root, require};

const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

/// Put a v3 resource straight into the lab's etcd (the CLI's apply knows pools and IPAM configuration only).
fn put(lab: &Lab, plural: &str, name: &str, json: &str) {
    let key = format!("/calico/resources/v3/projectcalico.org/{plural}/{name}");
    let ns = format!("{}-etcd", lab.name);
    let (ok, out) = in_ns(&ns, &["etcdctl", "--endpoints", ETCD, "put", &key, json]);
    assert!(ok, "etcdctl put {key}: {out}");
}

/// BIRD's routes for `prefix`: the gateways it holds them via (empty when it has none).
fn bird_gateways(bird: &Bird, prefix: &str) -> Vec<String> {
    let out = bird.birdc(&format!("show route for {prefix} all"));
    let mut gws: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let via = w.iter().position(|x| *x == "via")?;
            Some(w.get(via + 1)?.to_string())
        })
        .collect();
    // Only exact matches: "show route for" also answers with a covering prefix.
    if !out.contains(prefix) {
        gws.clear();
    }
    gws.sort();
    gws
}

#[test]
#[ignore = "needs root for network namespaces; needs etcd: scripts/test.sh runs it (--include-ignored)"]
fn service_cidrs_are_originated_by_every_node_and_withdrawn_live() {
    const T: &str = "service_cidrs_are_originated_by_every_node_and_withdrawn_live";
    if !(require(is_root(), T, "needs root for network namespaces")
        && require(
            have("etcd"),
            T,
            "etcd is not installed (scripts/install-deps.sh)",
        )
        && require(have("etcdctl"), T, "etcdctl is not installed (etcd-client)")
        && require(have("ip"), T, "iproute2 is not installed")
        && require(have_bird(), T, "BIRD 2 is not installed (bird2)"))
    {
        return;
    }
    let lab = Lab::with("mgs", 2, 1, &[]);
    let br = format!("{}-br", lab.name);
    let mut conf = String::from("router id 10.99.0.1;\nprotocol device {}\n");
    for (i, (_, ip)) in lab.nodes.iter().enumerate() {
        conf.push_str(&format!(
            "protocol bgp node{i} {{\n  local 10.99.0.1 as 65001;\n  neighbor {ip} as 64512;\n  ipv4 {{ import all; export none; }};\n}}\n"
        ));
    }
    let bird = Bird::start(&br, &conf);

    put(
        &lab,
        "bgpconfigurations",
        "default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"serviceClusterIPs":[{"cidr":"10.96.0.0/12"}],"serviceExternalIPs":[{"cidr":"192.0.2.0/24"}],"serviceLoadBalancerIPs":[{"cidr":"198.51.100.0/24"}]}}"#,
    );
    put(
        &lab,
        "bgppeers",
        "tor",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"tor"},"spec":{"peerIP":"10.99.0.1","asNumber":65001}}"#,
    );
    let every_node: Vec<String> = lab.nodes.iter().map(|(_, ip)| ip.to_string()).collect();
    for prefix in ["10.96.0.0/12", "192.0.2.0/24", "198.51.100.0/24"] {
        assert!(
            eventually(Duration::from_secs(30), || bird_gateways(&bird, prefix) == every_node),
            "BIRD does not hold {prefix} via every node {every_node:?}: {:?}\n{}\n{}\nBIRD log:\n{}",
            bird_gateways(&bird, prefix),
            bird.birdc("show protocols all"),
            lab.logs(),
            bird.log()
        );
    }

    // Live change: external IPs gone, load balancer ranges no longer aggregated.
    put(
        &lab,
        "bgpconfigurations",
        "default",
        r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"serviceClusterIPs":[{"cidr":"10.96.0.0/12"}],"serviceLoadBalancerIPs":[{"cidr":"198.51.100.0/24"}],"serviceLoadBalancerAggregation":"Disabled"}}"#,
    );
    for prefix in ["192.0.2.0/24", "198.51.100.0/24"] {
        assert!(
            eventually(Duration::from_secs(30), || bird_gateways(&bird, prefix)
                .is_empty()),
            "BIRD still holds {prefix}: {:?}\n{}",
            bird_gateways(&bird, prefix),
            lab.logs()
        );
    }
    assert_eq!(bird_gateways(&bird, "10.96.0.0/12"), every_node);
    // The sessions were not reset by the change (no restart, unchanged peers untouched).
    let protocols = bird.birdc("show protocols");
    assert_eq!(
        protocols.matches("Established").count(),
        lab.nodes.len(),
        "{protocols}"
    );
}
