//! The node's CNI backend against a real etcd and the real kernel, driven through the real `margay-cni`
//! binary: CNI GC (spec 1.1), `ipv4_pools` overrides, and an ADD rollback whose release fails (etcd down)
//! landing in the server's DEL spool.
//!
//! ```text
//!   margay-cni ──unix socket──▶ CniServer ──▶ NodeBackend ──▶ NodeIpam ──▶ etcd (loopback, temporary)
//!                                                  │
//!                                                  └──veth──▶ netns <t>n (the node)
//!                                                               mgXXXXXXXXXXX ◀──▶ eth0 in <t>pa, <t>pb, ...
//!   pools: pool-a 10.81.0.0/24, pool-b 10.82.0.0/24, pool-off 10.83.0.0/24 (disabled)
//! ```
//!
//! Needs root (namespaces), etcd and iproute2; SKIP otherwise (a failure under CI=true).

use crate::cni_common;
use crate::common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use cni_common::{conf_for, shim, ShimOut};
use common::etcd::{etcd_available, Etcd};
use common::{have, is_root, require, try_sh, unique, Netns};
use margay::cni::backend::PodRequest;
use margay::cni::{CniServer, ServerConfig};
use margay::datastore::{keys, Datastore, DatastoreConfig};
use margay::ipam::{AssignRequest, NodeInfo, NodeIpam};
use margay::node::NodeBackend;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

const NODE: &str = "node-core-1";
const NET: &str = "k8s-pod-network";

fn prereq(test: &str) -> bool {
    require(is_root(), test, "needs root for network namespaces")
        && require(have("ip"), test, "iproute2 is not installed")
        && etcd_available(test)
}

/// etcd, the pools, the node's IPAM task, a backend plumbing into the node namespace, and the real server.
struct Node {
    etcd: Etcd,
    ds: Arc<Datastore>,
    ipam: Arc<NodeIpam>,
    backend: Arc<NodeBackend>,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<oneshot::Sender<()>>,
}

impl Node {
    async fn start(node_ns: &str) -> Node {
        let etcd = Etcd::start();
        let ds =
            Arc::new(Datastore::new(DatastoreConfig::new(&[etcd.endpoint()])).expect("datastore"));
        margay::cli::resources::apply(
            &ds,
            "apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool-a\nspec:\n  cidr: 10.81.0.0/24\n  blockSize: 28\n---\n\
             apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool-b\nspec:\n  cidr: 10.82.0.0/24\n  blockSize: 28\n---\n\
             apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: pool-off\nspec:\n  cidr: 10.83.0.0/24\n  blockSize: 28\n  disabled: true\n",
        )
        .await
        .expect("apply pools");
        let ipam = Arc::new(
            NodeIpam::start(ds.clone(), NodeInfo::new(NODE))
                .await
                .expect("node IPAM"),
        );
        let netns = PathBuf::from(format!("/var/run/netns/{node_ns}"));
        margay::dataplane::sysctl::ensure_node(Some(&netns)).expect("node sysctls");
        let dir = tempfile::tempdir().expect("tempdir");
        let socket = dir.path().join("run/margay/cni.sock");
        let backend = Arc::new(NodeBackend {
            ipam: ipam.clone(),
            netns: Some(netns),
            mtu: 1500.into(),
            refresh: Arc::new(Notify::new()),
            spool_socket: Some(socket.clone()),
            host_veth: Default::default(),
        });
        let mut n = Node {
            etcd,
            ds,
            ipam,
            backend,
            socket,
            _dir: dir,
            stop: None,
        };
        n.serve();
        n
    }

    /// Start the CNI server (it replays the DEL spool before its first accept).
    fn serve(&mut self) {
        let server = CniServer::bind(
            ServerConfig {
                socket: self.socket.clone(),
                spool_sweep_interval: Duration::from_millis(200),
                ..Default::default()
            },
            self.backend.clone(),
        )
        .expect("bind the CNI socket");
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        self.stop = Some(tx);
    }

    fn conf(&self, network: &str, extra: Value) -> String {
        let mut c: Value =
            serde_json::from_str(&conf_for(&self.socket, "1.1.0", extra)).expect("conf");
        c["name"] = json!(network);
        c.to_string()
    }

    /// ADD/DEL/CHECK for container `id` as pod `default/<id>` in namespace `pod_ns`.
    async fn cni(&self, cmd: &str, id: &str, pod_ns: &str, conf: &str) -> ShimOut {
        let netns = format!("/var/run/netns/{pod_ns}");
        let args = format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={id}");
        shim(
            &[
                ("CNI_COMMAND", cmd),
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", &netns),
                ("CNI_IFNAME", "eth0"),
                ("CNI_PATH", "/usr/lib/cni"),
                ("CNI_ARGS", &args),
            ],
            conf,
        )
        .await
    }

    /// Handles of this node's allocations, sorted.
    async fn handles(&self) -> Vec<String> {
        let mut h: Vec<String> = self
            .ipam
            .allocations()
            .await
            .expect("allocations")
            .into_iter()
            .filter_map(|a| a.handle_id)
            .collect();
        h.sort();
        h
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

fn address(out: &ShimOut) -> std::net::Ipv4Addr {
    out.json()["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {:?}", out.stdout))
}

/// The pod veths (`mg` + 11 hex) in the node namespace.
fn veths(node_ns: &str) -> Vec<String> {
    let (ok, out) = try_sh(&format!("ip -n {node_ns} -o link show type veth"));
    assert!(ok, "ip link: {out}");
    let mut v: Vec<String> = out
        .lines()
        .filter_map(|l| l.split(": ").nth(1))
        .map(|n| n.split('@').next().unwrap_or(n).to_string())
        .filter(|n| n.starts_with("mg") && n.len() == 13)
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn gc_releases_and_unplumbs_what_the_runtime_no_longer_lists() {
    const T: &str = "gc_releases_and_unplumbs_what_the_runtime_no_longer_lists";
    if !prereq(T) {
        return;
    }
    let (n, pa, pb, pc, pd) = (
        unique("gn"),
        unique("ga"),
        unique("gb"),
        unique("gc"),
        unique("gd"),
    );
    let _ns = Netns::new(&[&n, &pa, &pb, &pc, &pd]);
    let node = Node::start(&n).await;
    let conf = node.conf(NET, json!({}));
    for (id, ns) in [("keep", &pa), ("gone1", &pb), ("gone2", &pc)] {
        node.cni("ADD", id, ns, &conf).await.ok();
    }
    // Another network's attachment on the same node: GC of k8s-pod-network must not touch it.
    let other = node.conf("other-net", json!({}));
    node.cni("ADD", "elsewhere", &pd, &other).await.ok();
    // An address leaked without any veth (a crashed ADD of an older daemon).
    node.ipam
        .assign(AssignRequest::v4(&format!("{NET}.ghost")))
        .await
        .expect("assign ghost");
    assert_eq!(
        node.handles().await,
        [
            format!("{NET}.ghost"),
            format!("{NET}.gone1"),
            format!("{NET}.gone2"),
            format!("{NET}.keep"),
            "other-net.elsewhere".to_string()
        ]
    );
    assert_eq!(veths(&n).len(), 4);

    let gc_conf = node.conf(
        NET,
        json!({"cni.dev/valid-attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
    );
    let gc = node.cni_gc(&gc_conf).await;
    assert!(gc.ok().stdout.trim().is_empty(), "{gc:?}");
    let want = [format!("{NET}.keep"), "other-net.elsewhere".to_string()];
    assert_eq!(node.handles().await, want);
    let left = veths(&n);
    assert_eq!(left.len(), 2, "veths after GC: {left:?}");
    assert!(left.contains(&margay::dataplane::pod::host_ifname("default.keep")));
    assert!(left.contains(&margay::dataplane::pod::host_ifname("default.elsewhere")));
    // Released in etcd too, not only in the node's view.
    for h in ["gone1", "gone2", "ghost"] {
        assert!(
            node.ds
                .get(&keys::handle_key(&format!("{NET}.{h}")))
                .await
                .expect("get handle")
                .is_none(),
            "handle {h} still in etcd"
        );
    }
    // The kept pod still answers CHECK.
    node.cni("CHECK", "keep", &pa, &conf).await.ok();

    // Idempotent: the same GC again finds nothing to do.
    node.cni_gc(&gc_conf).await.ok();
    assert_eq!(node.handles().await, want);
    assert_eq!(veths(&n), left);
}

impl Node {
    async fn cni_gc(&self, conf: &str) -> ShimOut {
        shim(&[("CNI_COMMAND", "GC"), ("CNI_PATH", "/usr/lib/cni")], conf).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn ipv4_pools_override_by_name_or_cidr_and_clear_errors() {
    const T: &str = "ipv4_pools_override_by_name_or_cidr_and_clear_errors";
    if !prereq(T) {
        return;
    }
    let (n, pa, pb, pc) = (unique("pn"), unique("pa"), unique("pb"), unique("pc"));
    let _ns = Netns::new(&[&n, &pa, &pb, &pc]);
    let node = Node::start(&n).await;

    // By name (Calico's `ipam.ipv4_pools` place).
    let by_name = node.conf(NET, json!({"ipam": {"ipv4_pools": ["pool-b"]}}));
    let ip = address(node.cni("ADD", "byname", &pa, &by_name).await.ok());
    assert!(
        "10.82.0.0/24"
            .parse::<ipnetwork::Ipv4Network>()
            .unwrap()
            .contains(ip),
        "{ip} not from pool-b"
    );
    // By CIDR (top-level `ipv4_pools`).
    let by_cidr = node.conf(NET, json!({"ipv4_pools": ["10.81.0.0/24"]}));
    let ip = address(node.cni("ADD", "bycidr", &pb, &by_cidr).await.ok());
    assert!(
        "10.81.0.0/24"
            .parse::<ipnetwork::Ipv4Network>()
            .unwrap()
            .contains(ip),
        "{ip} not from pool-a"
    );

    // Unknown pool: code 7, names it and lists what exists.
    let unknown = node.conf(NET, json!({"ipv4_pools": ["pool-nope"]}));
    let out = node.cni("ADD", "unknown", &pc, &unknown).await;
    let e = out.error();
    assert_eq!(e["code"], 7, "{e}");
    assert!(e["msg"].as_str().unwrap_or("").contains("pool-nope"), "{e}");
    assert!(
        e["details"].as_str().unwrap_or("").contains("pool-a"),
        "{e}"
    );
    let unknown_cidr = node.conf(NET, json!({"ipv4_pools": ["10.99.0.0/24"]}));
    let e = node.cni("ADD", "unknown", &pc, &unknown_cidr).await.error();
    assert_eq!(e["code"], 7, "{e}");
    assert!(
        e["msg"].as_str().unwrap_or("").contains("10.99.0.0/24"),
        "{e}"
    );
    // Disabled pool: code 7, says so.
    let off = node.conf(NET, json!({"ipv4_pools": ["pool-off"]}));
    let e = node.cni("ADD", "off", &pc, &off).await.error();
    assert_eq!(e["code"], 7, "{e}");
    let msg = e["msg"].as_str().unwrap_or("");
    assert!(msg.contains("pool-off") && msg.contains("disabled"), "{e}");

    // The refused ADDs left nothing: no handle, no veth.
    assert_eq!(
        node.handles().await,
        [format!("{NET}.bycidr"), format!("{NET}.byname")]
    );
    assert_eq!(veths(&n).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn add_rollback_release_with_etcd_down_is_spooled_and_retried() {
    const T: &str = "add_rollback_release_with_etcd_down_is_spooled_and_retried";
    if !prereq(T) {
        return;
    }
    let n = unique("rn");
    let _ns = Netns::new(&[&n]);
    let mut node = Node::start(&n).await;
    let handle = format!("{NET}.rb1");
    node.ipam
        .assign(AssignRequest::v4(&handle))
        .await
        .expect("assign");
    let req = PodRequest {
        container_id: "rb1".into(),
        netns: PathBuf::from("/var/run/netns/none"),
        ifname: "eth0".into(),
        network: NET.into(),
        pod: None,
        mtu: None,
        ipv4_pools: vec![],
        ipv6_pools: vec![],
        runtime_config: None,
    };

    // etcd goes down between the assign and the rollback: the release fails and is spooled.
    node.etcd.kill9();
    let spooled = node
        .backend
        .rollback(&req)
        .await
        .expect("the failed release is spooled");
    assert!(spooled.exists(), "{}", spooled.display());
    let body: Value =
        serde_json::from_slice(&std::fs::read(&spooled).expect("read spool")).expect("JSON");
    assert_eq!(body["command"], "DEL", "{body}");
    assert_eq!(body["container_id"], "rb1", "{body}");
    assert_eq!(body["network"], NET, "{body}");

    // etcd back: the server's sweep replays the DEL, the handle is released and the spool entry is gone.
    node.etcd.restart();
    let mut released = false;
    for _ in 0..300 {
        let gone = matches!(node.ds.get(&keys::handle_key(&handle)).await, Ok(None));
        if gone && !spooled.exists() {
            released = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        released,
        "handle {handle} still held or spool entry {} still there",
        spooled.display()
    );
    // Restarting the server on the same socket finds an empty spool.
    if let Some(tx) = node.stop.take() {
        let _ = tx.send(());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.serve();
    assert!(node.handles().await.is_empty());
}

/// At start the daemon compares the pod veths in the kernel with the node's IPAM allocations and reports
/// each disagreement (before it serves an ADD): a veth whose address IPAM no longer holds, an allocation
/// without a veth. Nothing is changed by it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root (network namespaces) and the daemons this test starts: scripts/test.sh runs it (--include-ignored)"]
async fn restart_reconciliation_reports_kernel_and_ipam_disagreements() {
    const T: &str = "restart_reconciliation_reports_kernel_and_ipam_disagreements";
    if !prereq(T) {
        return;
    }
    let (n, pa, pb) = (unique("cn"), unique("ca"), unique("cb"));
    let _ns = Netns::new(&[&n, &pa, &pb]);
    let node = Node::start(&n).await;
    let conf = node.conf(NET, json!({}));
    node.cni("ADD", "fine", &pa, &conf).await.ok();
    let ip_b = address(node.cni("ADD", "orphan", &pb, &conf).await.ok());
    // Behind the daemon's back: the orphan's address released in IPAM only, an allocation with no veth.
    node.ipam
        .release_handle(&format!("{NET}.orphan"))
        .await
        .expect("release");
    let ghost = node
        .ipam
        .assign(AssignRequest::v4(&format!("{NET}.ghost")))
        .await
        .expect("assign ghost");
    let netns = Some(PathBuf::from(format!("/var/run/netns/{n}")));
    let r = margay::node::reconcile_pods(&node.ipam, netns)
        .await
        .expect("reconcile");
    assert_eq!(r.matched, 1, "{r:?}");
    assert_eq!(r.kernel_only.len(), 1, "{r:?}");
    assert_eq!(r.kernel_only[0].1, "default.orphan", "{r:?}");
    assert_eq!(r.kernel_only[0].2, std::net::IpAddr::V4(ip_b), "{r:?}");
    assert_eq!(
        r.ipam_only,
        [(ghost.ips[0].ip, format!("{NET}.ghost"))],
        "{r:?}"
    );
    assert!(r.without_address.is_empty(), "{r:?}");
    // Reporting changed nothing: both veths and the ghost allocation are still there.
    assert_eq!(veths(&n).len(), 2);
    assert_eq!(
        node.handles().await,
        [format!("{NET}.fine"), format!("{NET}.ghost")]
    );
}
