//! A node whose Node resource gets `routeReflectorClusterID` (live, while it runs) reflects (RFC 4456) for the
//! nodes that peer with it, so the mesh can be switched off.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
//!                n1 10.99.0.11  route-reflector=true, routeReflectorClusterID 224.0.0.1
//!               ╱  ╲            (set live: no restart)
//!     iBGP client    iBGP client
//!             ╱        ╲
//!   n2 10.99.0.12      n3 10.99.0.13          BGPConfiguration: nodeToNodeMeshEnabled false
//!                                              BGPPeer rr: nodeSelector all(), peerSelector route-reflector == 'true'
//!   n3's FIB: n2's block via 10.99.0.12 (reflected, next hop unchanged), and the reverse; pods ping.
//!   n2 and n3 each have one session (n1); n1 has two.
//! ```
//!
//! Needs root, etcd, etcdctl, iproute2 and ping; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::time::Duration;

use common::lab::{eventually, in_ns, own_block, proto77, Lab, ETCD};
use common::{have, is_root, require};
use serde_json::{json, Value};

const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

fn key(plural: &str, name: &str) -> String {
    format!("/calico/resources/v3/projectcalico.org/{plural}/{name}")
}

fn etcdctl(lab: &Lab, args: &[&str]) -> String {
    let ns = format!("{}-etcd", lab.name);
    let mut all = vec!["etcdctl", "--endpoints", ETCD];
    all.extend_from_slice(args);
    let (ok, out) = in_ns(&ns, &all);
    assert!(ok, "etcdctl {args:?}: {out}");
    out
}

/// Session addresses in `margay status` of `node`, sorted, once every one of them is Established.
fn established(lab: &Lab, node: &str) -> Option<Vec<String>> {
    let s = lab.status(node)?;
    let peers = s["peers"].as_array()?;
    if !peers.iter().all(|p| p["fsmState"] == "Established") {
        return None;
    }
    let mut a: Vec<String> = peers
        .iter()
        .filter_map(|p| p["address"].as_str().map(str::to_string))
        .collect();
    a.sort();
    Some(a)
}

#[test]
#[ignore = "needs root for network namespaces; needs etcd: scripts/test.sh runs it (--include-ignored)"]
fn node_with_cluster_id_reflects_for_its_clients_with_the_mesh_off() {
    const T: &str = "node_with_cluster_id_reflects_for_its_clients_with_the_mesh_off";
    if !(require(is_root(), T, "needs root for network namespaces")
        && require(
            have("etcd"),
            T,
            "etcd is not installed (scripts/install-deps.sh)",
        )
        && require(have("etcdctl"), T, "etcdctl is not installed (etcd-client)")
        && require(have("ip"), T, "iproute2 is not installed")
        && require(have("ping"), T, "ping is not installed (iputils-ping)"))
    {
        return;
    }
    let lab = Lab::with("mgf", 3, 1, &[]);
    let (n1, ip1) = lab.nodes[0].clone();
    let (n2, ip2) = lab.nodes[1].clone();
    let (n3, ip3) = lab.nodes[2].clone();

    // n1 becomes a route reflector: label + cluster id on its Node resource (operator fields the daemon keeps).
    let node_key = key("nodes", &n1);
    let raw = etcdctl(&lab, &["get", &node_key, "--print-value-only"]);
    let mut node: Value = serde_json::from_str(raw.trim()).expect("Node JSON");
    node["metadata"]["labels"] = json!({"route-reflector": "true"});
    node["spec"]["bgp"]["routeReflectorClusterID"] = json!("224.0.0.1");
    etcdctl(&lab, &["put", &node_key, &node.to_string()]);
    etcdctl(
        &lab,
        &[
            "put",
            &key("bgppeers", "rr"),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"rr"},"spec":{"nodeSelector":"all()","peerSelector":"route-reflector == 'true'"}}"#,
        ],
    );
    etcdctl(
        &lab,
        &[
            "put",
            &key("bgpconfigurations", "default"),
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPConfiguration","metadata":{"name":"default"},"spec":{"nodeToNodeMeshEnabled":false}}"#,
        ],
    );
    // Live: no restart; n1's peer loop hands the RIB the cluster id and restarts the client sessions.
    let logs_have = |what: &[&str]| {
        let l = lab.node_logs(&n1);
        what.iter().all(|w| l.contains(w))
    };
    assert!(
        eventually(Duration::from_secs(30), || logs_have(&[
            "route-reflector cluster id changed",
            "224.0.0.1"
        ])),
        "{n1} did not take the cluster id:\n{}",
        lab.node_logs(&n1)
    );

    // Sessions: the clients with the reflector only.
    let want1 = {
        let mut v = vec![ip2.to_string(), ip3.to_string()];
        v.sort();
        v
    };
    for (node, want) in [
        (&n1, want1),
        (&n2, vec![ip1.to_string()]),
        (&n3, vec![ip1.to_string()]),
    ] {
        assert!(
            eventually(Duration::from_secs(30), || established(&lab, node).as_ref()
                == Some(&want)),
            "{node}: sessions {:?}, want {want:?} Established\n{}",
            lab.status(node),
            lab.logs()
        );
    }

    // Reflected routes: each client holds the other's block via the other (next hop unchanged).
    let (b2, b3) = (own_block(&n2), own_block(&n3));
    for (node, block, via) in [(&n3, b2, ip2), (&n2, b3, ip3)] {
        assert!(
            eventually(Duration::from_secs(30), || proto77(node)
                .contains(&(block, Some(via)))),
            "{node} has no reflected route {block} via {via}: {:?}\n{}",
            proto77(node),
            lab.logs()
        );
    }
    // And the pods of the two clients reach each other through those routes.
    let pod_of = |n: &str| {
        lab.pods
            .iter()
            .find(|(_, node, _)| node == n)
            .cloned()
            .expect("a pod on the node")
    };
    let (p2, _, a2) = pod_of(&n2);
    let (p3, _, a3) = pod_of(&n3);
    for (from, ip) in [(&p2, a3), (&p3, a2)] {
        let (ok, out) = in_ns(from, &["ping", "-c", "1", "-W", "2", &ip.to_string()]);
        assert!(ok, "{from} cannot ping {ip}: {out}");
    }
}
