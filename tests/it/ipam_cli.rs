//! The `margay` binary's datastore commands end to end against a real etcd: apply -f, get -o, delete,
//! ipam show/check/release, node remove, and the error an operator sees when etcd is down.

use crate::common;

use std::process::Command;
use std::sync::Arc;

use common::etcd::{etcd_available, Etcd};
use margay::datastore::{Datastore, DatastoreConfig};
use margay::ipam::{AssignRequest, NodeInfo, NodeIpam};

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

#[tokio::test]
#[ignore = "needs etcd: scripts/test.sh runs it (--include-ignored)"]
async fn operator_commands_against_etcd() {
    if !etcd_available("operator_commands_against_etcd") {
        return;
    }
    let etcd = Etcd::start();
    let ep = etcd.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pools.yaml");
    std::fs::write(
        &file,
        "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: pods}\nspec: {cidr: 10.60.0.0/24, natOutgoing: true}\n",
    )
    .unwrap();
    let f = file.to_str().unwrap();

    let (ok, out, err) = margay(&ep, &["apply", "-f", f]);
    assert!(ok, "{err}");
    assert!(
        out.contains("Successfully applied 1 'IPPool' resource(s): pods"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "ippool", "-o", "wide"]);
    assert!(
        ok && out.contains("10.60.0.0/24") && out.contains("| true"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["get", "ippool", "pods", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(ok);
    assert_eq!(v["spec"]["blockSize"], 26);

    // A pod on node-a, through the library (the daemon's path).
    let ds = Arc::new(Datastore::new(DatastoreConfig::new(std::slice::from_ref(&ep))).unwrap());
    let n = NodeIpam::start(ds.clone(), NodeInfo::new("node-a"))
        .await
        .unwrap();
    let a = n
        .assign(AssignRequest::v4("k8s-pod-network.c1"))
        .await
        .unwrap();
    let b = n
        .assign(AssignRequest::v4("k8s-pod-network.c2"))
        .await
        .unwrap();
    drop(n);

    let (ok, out, _) = margay(&ep, &["ipam", "show", "--show-blocks"]);
    assert!(
        ok && out.contains("IP Pool") && out.contains("Block") && out.contains("2 (3%)"),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["ipam", "check"]);
    assert!(
        ok && out.ends_with("Check complete; found 0 problems.\n"),
        "{out}"
    );
    let ip = a.ips[0].ip.to_string();
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--ip", &ip]);
    assert!(
        ok && out.contains(&format!("Successfully released IP address {ip}")),
        "{out}"
    );
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--ip", &ip]);
    assert!(ok && out.contains("not allocated"), "{out}");
    let (ok, out, _) = margay(&ep, &["ipam", "release", "--handle", "k8s-pod-network.c2"]);
    assert!(ok && out.contains(&b.ips[0].ip.to_string()), "{out}");
    let (ok, out, _) = margay(&ep, &["node", "remove", "node-a"]);
    assert!(ok && out.contains("Removed node \"node-a\""), "{out}");
    let (ok, out, _) = margay(&ep, &["delete", "-f", f]);
    assert!(
        ok && out.contains("Successfully deleted 1 'IPPool' resource(s): pods"),
        "{out}"
    );
    let (ok, _, err) = margay(&ep, &["get", "ippool", "pods"]);
    assert!(!ok && err.contains("not found"), "{err}");

    // Refused resources name the field; an unreachable etcd says so and what was tried.
    std::fs::write(&file, "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata: {name: bad}\nspec: {cidr: 10.61.0.0/16, blockSize: 40}\n").unwrap();
    let (ok, _, err) = margay(&ep, &["apply", "-f", f]);
    assert!(!ok && err.contains("spec.blockSize"), "{err}");
    let dead = format!("127.0.0.1:{}", common::free_port());
    let (ok, _, err) = margay(&dead, &["ipam", "check", "--etcd-timeout", "1"]);
    assert!(!ok, "must fail");
    assert!(
        err.contains(&format!(
            "etcd unreachable: tried {dead} (connection refused)"
        )) && err.contains("--etcd-endpoints"),
        "{err}"
    );
}
