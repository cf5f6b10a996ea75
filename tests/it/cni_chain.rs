//! margay-cni first in a chain with the reference plugins (tuning, bandwidth, portmap from Debian's
//! containernetworking-plugins), each run exactly as libcni runs a conflist: the previous plugin's result is
//! the next one's `prevResult`; DEL in reverse order; CHECK on the chain without portmap (upstream bug 819).
//!
//! ```text
//!   node netns (mgt<pid>cn)                       pod netns (mgt<pid>cp)
//!   ┌──────────────────────────────┐              ┌───────────────────────────┐
//!   │ mgt<hex>  ─────── veth ──────┼──────────────┼─ eth0 10.78.0.1/32         │
//!   │   10.78.0.1/32 dev mgt<hex>  │              │   169.254.1.1 dev eth0     │
//!   │   tbf (bandwidth), bwp* ifb  │              │   default via 169.254.1.1  │
//!   │   iptables CNI-HOSTPORT-DNAT │              │   net.core.somaxconn=1024  │
//!   └──────────────────────────────┘              └───────────────────────────┘
//!   the plugins run inside the node netns (ip netns exec), as a runtime on that node would;
//!   margay-cni talks to the test's CniServer, whose backend builds the veth with `ip`.
//! ```

use crate::cni_common;
use crate::common;

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;

use cni_common::veth::VethBackend;
use common::{require, try_sh, unique, Netns};
use margay::cni::{CniServer, ServerConfig};
use serde_json::{json, Value};
use tokio::io::AsyncWriteExt;

/// Run one plugin inside the node namespace as libcni would. Returns (success, stdout).
async fn run_plugin(
    node: &str,
    bin: &str,
    command: &str,
    container: &str,
    netns: &str,
    conf: &Value,
) -> (bool, String) {
    let mut cmd = tokio::process::Command::new("ip");
    cmd.args(["netns", "exec", node, bin])
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/usr/lib/cni")
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=chain",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn plugin");
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(conf.to_string().as_bytes()).await;
    drop(stdin);
    let out = child.wait_with_output().await.expect("plugin output");
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root for network namespaces: scripts/test.sh runs it (--include-ignored)"]
async fn margay_first_in_a_chain_with_tuning_bandwidth_portmap() {
    let test = "margay_first_in_a_chain_with_tuning_bandwidth_portmap";
    if !require(common::is_root(), test, "needs root for network namespaces") {
        return;
    }
    let plugins_present = ["tuning", "bandwidth", "portmap"]
        .iter()
        .all(|p| Path::new("/usr/lib/cni").join(p).exists());
    if !require(
        plugins_present && common::have("iptables") && common::have("tc"),
        test,
        "needs containernetworking-plugins in /usr/lib/cni, iptables and tc",
    ) {
        return;
    }
    let node = unique("cn");
    let pod = unique("cp");
    let _ns = Netns::new(&[&node, &pod]);
    let netns = format!("/var/run/netns/{pod}");
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("cni.sock");
    let server = CniServer::bind(
        ServerConfig {
            socket: socket.clone(),
            ..Default::default()
        },
        Arc::new(VethBackend { node: node.clone() }),
    )
    .unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = stopped.await;
    }));

    let data = dir.path().join("cni-data");
    let chain = [
        (
            env!("CARGO_BIN_EXE_margay-cni").to_string(),
            json!({"type": "margay", "socket": socket.to_string_lossy(), "timeout_seconds": 30}),
        ),
        (
            "/usr/lib/cni/tuning".into(),
            json!({"type": "tuning", "sysctl": {"net.core.somaxconn": "1024"},
                   "dataDir": data.join("tuning").to_string_lossy()}),
        ),
        (
            "/usr/lib/cni/bandwidth".into(),
            json!({"type": "bandwidth", "ingressRate": 8_000_000, "ingressBurst": 1_000_000,
                   "egressRate": 8_000_000, "egressBurst": 1_000_000}),
        ),
        (
            "/usr/lib/cni/portmap".into(),
            json!({"type": "portmap", "snat": true, "capabilities": {"portMappings": true},
                   "runtimeConfig": {"portMappings": [
                       {"hostPort": 18080, "containerPort": 80, "protocol": "tcp"}]}}),
        ),
    ];
    let conf = |plugin: &Value, prev: Option<&Value>| {
        let mut c = plugin.clone();
        c["name"] = json!("chain-net");
        c["cniVersion"] = json!("1.0.0");
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    };
    let cid = "ab12cd34";

    // ADD through the chain, each result feeding the next plugin.
    let mut prev: Option<Value> = None;
    for (bin, plugin) in &chain {
        let (ok, out) =
            run_plugin(&node, bin, "ADD", cid, &netns, &conf(plugin, prev.as_ref())).await;
        assert!(ok, "{bin} ADD failed: {out}");
        prev = Some(serde_json::from_str(out.trim()).expect("result JSON"));
    }
    let result = prev.clone().unwrap();
    let host = VethBackend::host_if(cid);
    assert_eq!(result["interfaces"][0]["name"], host.as_str());
    assert_eq!(result["ips"][0]["address"], "10.78.0.1/32");

    // Each plugin did its job where it should.
    let (_, somax) = try_sh(&format!(
        "ip netns exec {pod} cat /proc/sys/net/core/somaxconn"
    ));
    assert_eq!(somax.trim(), "1024", "tuning in the pod");
    let (_, qdisc) = try_sh(&format!("tc -n {node} qdisc show dev {host}"));
    assert!(
        qdisc.contains("tbf"),
        "bandwidth shaped the host veth: {qdisc}"
    );
    let (_, links) = try_sh(&format!("ip -n {node} -o link show type ifb"));
    assert!(links.contains("bwp"), "bandwidth's ifb for egress: {links}");
    let (_, nat) = try_sh(&format!("ip netns exec {node} iptables -t nat -S"));
    assert!(
        nat.contains("CNI-HOSTPORT-DNAT") && nat.contains("18080"),
        "portmap: {nat}"
    );
    assert!(
        nat.contains("10.78.0.1"),
        "portmap DNATs to the pod's address: {nat}"
    );

    // CHECK with the cached result, on the chain without portmap (its CHECK is broken upstream).
    for (bin, plugin) in &chain[..3] {
        let (ok, out) = run_plugin(
            &node,
            bin,
            "CHECK",
            cid,
            &netns,
            &conf(plugin, Some(&result)),
        )
        .await;
        assert!(ok, "{bin} CHECK failed: {out}");
    }

    // DEL in reverse order; everything margay and the others made is gone.
    for (bin, plugin) in chain.iter().rev() {
        let (ok, out) =
            run_plugin(&node, bin, "DEL", cid, &netns, &conf(plugin, Some(&result))).await;
        assert!(ok, "{bin} DEL failed: {out}");
    }
    let (_, nat) = try_sh(&format!("ip netns exec {node} iptables -t nat -S"));
    assert!(!nat.contains("18080"), "portmap rules left: {nat}");
    let (exists, _) = try_sh(&format!("ip -n {node} link show {host}"));
    assert!(!exists, "host veth left behind");
    let (_, links) = try_sh(&format!("ip -n {node} -o link show type ifb"));
    assert!(!links.contains("bwp"), "ifb left behind: {links}");

    let _ = stop.send(());
    task.await.unwrap().unwrap();
}
