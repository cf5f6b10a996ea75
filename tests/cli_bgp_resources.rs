//! `margay apply -f / get / delete` for the BGP kinds (BGPConfiguration, BGPPeer, Node) against a real etcd:
//! calicoctl-shaped tables, YAML/JSON output, refusals that name the field, a peer whose password comes
//! from a Secret (accepted: Secrets are the nodes' files), and the node's own loader reading what apply wrote.

mod common;

use std::process::Command;
use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::datastore::{Datastore, DatastoreConfig};

fn margay(endpoint: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_margay"))
        .args(args)
        .env("ETCD_ENDPOINTS", endpoint)
        .output()
        .expect("run margay");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const GOOD: &str = "\
apiVersion: projectcalico.org/v3
kind: BGPConfiguration
metadata: {name: default}
spec:
  nodeToNodeMeshEnabled: false
  asNumber: 64513
  serviceClusterIPs: [{cidr: 10.96.0.0/12}]
---
apiVersion: projectcalico.org/v3
kind: Node
metadata: {name: rr1, labels: {route-reflector: \"true\"}}
spec:
  bgp: {ipv4Address: 10.0.0.9/24, routeReflectorClusterID: 224.0.0.1}
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: peer-with-rr}
spec:
  nodeSelector: all()
  peerSelector: has(route-reflector)
---
apiVersion: projectcalico.org/v3
kind: BGPPeer
metadata: {name: tor}
spec:
  peerIP: 10.0.0.1
  asNumber: 65001
";

#[tokio::test]
async fn bgp_kinds_apply_get_delete() {
    if !etcd_available("bgp_kinds_apply_get_delete") {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bgp.yaml");
    std::fs::write(&file, GOOD).unwrap();
    let f = file.to_str().unwrap();

    let (ok, out, err) = margay(&ep, &["apply", "-f", f]);
    assert!(ok, "{err}");
    for line in [
        "Successfully applied 1 'BGPConfiguration' resource(s): default",
        "Successfully applied 1 'Node' resource(s): rr1",
        "Successfully applied 1 'BGPPeer' resource(s): peer-with-rr",
        "Successfully applied 1 'BGPPeer' resource(s): tor",
    ] {
        assert!(out.contains(line), "{line:?} missing in {out}");
    }
    // Applying the same file again replaces (idempotent).
    let (ok, _, err) = margay(&ep, &["apply", "-f", f]);
    assert!(ok, "{err}");

    let (ok, out, _) = margay(&ep, &["get", "bgppeers"]);
    assert!(ok, "{out}");
    assert!(
        out.contains("NAME") && out.contains("PEERIP") && out.contains("ASN"),
        "{out}"
    );
    assert!(
        out.contains("(global)") && out.contains("10.0.0.1") && out.contains("65001"),
        "{out}"
    );
    assert!(out.contains("all()"), "{out}");
    let (ok, out, _) = margay(&ep, &["get", "bgpconfig", "-o", "wide"]);
    assert!(
        ok && out.contains("false") && out.contains("64513") && out.contains("10.96.0.0/12"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "node", "rr1", "-o", "wide"]);
    assert!(
        ok && out.contains("10.0.0.9/24") && out.contains("224.0.0.1") && out.contains("(64512)"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "node", "rr1", "-o", "yaml"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_yaml_ng::from_str(&out).unwrap();
    assert_eq!(v["kind"], "Node");
    assert_eq!(v["metadata"]["labels"]["route-reflector"], "true");
    assert!(v["metadata"]["resourceVersion"].as_str().is_some(), "{out}");

    // The node daemon's loader reads exactly what apply wrote, as one valid set.
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).unwrap());
    let set = margay::node::load_config(&ds)
        .await
        .expect("the node accepts the applied set");
    assert!(!set.default_bgp().mesh_enabled());
    assert_eq!(set.default_bgp().as_number(), 64513);
    assert_eq!(set.bgp_peers.len(), 2);
    assert!(set.nodes.get("rr1").and_then(|n| n.cluster_id()).is_some());

    // Refusals name the field and store nothing.
    for (doc, want) in [
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: bad1}\nspec: {peerIP: 10.0.0.300, asNumber: 65001}\n",
            "peerIP",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: bad2}\nspec: {peerIP: 10.0.0.2, asNumbr: 65001}\n",
            "asNumbr",
        ),
        (
            "apiVersion: projectcalico.org/v3\nkind: BGPPeer\nmetadata: {name: bad3}\nspec: {peerIP: 10.0.0.3, asNumber: 65001, password: {secretKeyRef: {name: bgp-secrets}}}\n",
            "missing field `key`",
        ),
    ] {
        std::fs::write(&file, doc).unwrap();
        let (ok, _, err) = margay(&ep, &["apply", "-f", f]);
        assert!(!ok, "must be refused: {doc}");
        assert!(err.contains(want), "error should name {want:?}: {err}");
    }
    let (ok, out, _) = margay(&ep, &["get", "bgppeer", "-o", "json"]);
    assert!(
        ok && !out.contains("bad1") && !out.contains("bad2") && !out.contains("bad3"),
        "{out}"
    );

    let (ok, out, err) = margay(&ep, &["delete", "bgppeer", "tor"]);
    assert!(
        ok && out.contains("Successfully deleted 1 'BGPPeer' resource(s): tor"),
        "{out}{err}"
    );
    let (ok, _, err) = margay(&ep, &["delete", "bgppeer", "tor"]);
    assert!(!ok && err.contains("not found"), "{err}");
    let set = margay::node::load_config(&ds).await.unwrap();
    assert_eq!(set.bgp_peers.len(), 1);
}
