//! `margay routes`: hosts outside the cluster reach pods on every node and a service cluster IP through a
//! gateway node. Host 1 sits on the lab's segment and takes printed routes (`--format batch` fed to
//! `ip -batch`); host 2 sits on a separate segment behind the gateway (a second link of n1) and is kept by
//! `--watch --netns`, which follows a block claimed later and a block released by a node leaving, touches
//! no route of another protocol, and adopts its own routes when restarted. The service IP is a DNAT rule in
//! every node's nftables (standing in for kube-proxy), not an address. The gateway runs with `--gateway`:
//! `margay status` says so and names each wrong forwarding sysctl with its fix.
//!
//! ```text
//!   netns <lab>-br: bridge br0 10.99.0.1/24, knows no pod route; 10.98.0.0/24 via 10.99.0.11 (the segment
//!     |                                      behind the gateway, as the nodes' router would know it)
//!     |-- <lab>-etcd  10.99.0.2    etcd; `margay routes` runs here (it reaches etcd)
//!     |-- <lab>-n1    10.99.0.11   gateway (--gateway); eth1 10.98.0.1/24 ──┐
//!     |-- <lab>-n2    10.99.0.12   pod n2p1; later pod n2x from pool 10.245.0.0/16 (a new block)
//!     |-- <lab>-n3    10.99.0.13   pod n3p1 (the service's backend); removed later (its block goes)
//!     `-- <lab>-out   10.99.0.50   outside host 1: `margay routes --via n1 --format batch | ip -batch -`
//!   <lab>-out2  eth0 10.98.0.51/24 ─────────────────────────────────────────┘ outside host 2, its own segment:
//!               `margay routes --via 10.98.0.1 --watch --netns <lab>-out2`
//!   every node: nft table kubeproxy: 10.96.0.10 -> DNAT n3p1 (masquerade when the source is outside the pool)
//!   expected on the outside hosts: every block and 10.96.0.0/12 via the gateway, proto 79 metric 79
//! ```

use crate::common;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::lab::{
    eventually, http_get, in_ns, kube_proxy_dnat, lab_prerequisites, Lab, ETCD, MARGAY,
};
use common::{sh, try_sh};

/// The routes of `margay routes`' protocol in `ns`, as `ip route` prints them.
fn proto79(ns: &str) -> Vec<String> {
    sh(&format!("ip -n {ns} route show proto 79"))
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

fn pings(ns: &str, ip: &str) -> bool {
    try_sh(&format!("ip netns exec {ns} ping -c1 -W1 {ip}")).0
}

/// An outside host on the lab's bridge: a namespace under the lab's prefix (so `lab down` removes it too).
fn outside_host(lab: &Lab, suffix: &str, addr: &str) -> String {
    let ns = format!("{}-{suffix}", lab.name);
    let br = format!("{}-br", lab.name);
    sh(&format!(
        "ip netns add {ns} && ip -n {br} link add {suffix} type veth peer name eth0 netns {ns} && \
         ip -n {br} link set {suffix} master br0 up && ip -n {ns} addr add {addr}/24 dev eth0 && \
         ip -n {ns} link set lo up && ip -n {ns} link set eth0 up"
    ));
    ns
}

/// An outside host on a segment of its own behind the gateway `gw` (a veth from the gateway's namespace:
/// gateway eth1 10.98.0.1/24, host eth0 10.98.0.51/24), and the nodes' router (the bridge namespace)
/// told that segment is behind the gateway, as a data centre's router would be. The host gets no route to
/// the pods or services: those come from `margay routes`.
fn behind_gateway(lab: &Lab, gw: &str) -> String {
    let ns = format!("{}-out2", lab.name);
    let br = format!("{}-br", lab.name);
    sh(&format!(
        "ip netns add {ns} && ip -n {gw} link add eth1 type veth peer name eth0 netns {ns} && \
         ip -n {gw} addr add 10.98.0.1/24 dev eth1 && ip -n {gw} link set eth1 up && \
         ip -n {ns} addr add 10.98.0.51/24 dev eth0 && ip -n {ns} link set lo up && ip -n {ns} link set eth0 up && \
         ip netns exec {br} sysctl -qw net.ipv4.ip_forward=1 && ip -n {br} route add 10.98.0.0/24 via {}",
        lab.nodes[0].1
    ));
    ns
}

/// `margay status` on the gateway (restarted with MARGAY_GATEWAY=true) reports it, with no problem while
/// the settings are right and with the exact fix for each wrong one; another node reports no gateway.
fn gateway_status(lab: &Lab, n1: &str, n2: &str) {
    lab.restart_node_with_env(n1, &[("MARGAY_GATEWAY", "true")]);
    let st = lab.wait_ready(n1);
    assert_eq!(st["gateway"]["problems"], serde_json::json!([]), "{st}");
    let ifs = st["gateway"]["interfaces"].to_string();
    assert!(ifs.contains("eth0") && ifs.contains("eth1"), "{st}");
    assert!(lab.status(n2).expect("n2 status")["gateway"].is_null());
    sh(&format!(
        "ip netns exec {n1} sysctl -qw net.ipv4.ip_forward=0 net.ipv4.conf.eth1.rp_filter=1"
    ));
    let st = lab.status(n1).expect("n1 status");
    let problems: Vec<String> = st["gateway"]["problems"]
        .as_array()
        .expect("problems")
        .iter()
        .filter_map(|p| p.as_str().map(str::to_string))
        .collect();
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(
        problems[0].ends_with("fix: sysctl -w net.ipv4.ip_forward=1"),
        "{problems:?}"
    );
    assert!(
        problems[1].starts_with("eth1:")
            && problems[1].ends_with("fix: sysctl -w net.ipv4.conf.eth1.rp_filter=2"),
        "{problems:?}"
    );
    let (ok, table) = in_ns(n1, &[MARGAY, "status"]);
    assert!(ok, "{table}");
    println!("margay status on the gateway with two wrong settings:\n{table}");
    assert!(
        table.contains("Gateway: this node forwards for outside hosts")
            && table.contains("ERROR: gateway: eth1: strict reverse-path filtering"),
        "{table}"
    );
    let (code, metrics) = http_get(n1, "127.0.0.1:9190", "/metrics").expect("/metrics");
    assert!(
        code == 200 && metrics.contains("margay_gateway_problems 2"),
        "{metrics}"
    );
    // The fixes as printed, and the report is clean again.
    for p in &problems {
        let fix = p.rsplit("fix: ").next().expect("fix");
        sh(&format!("ip netns exec {n1} {fix}"));
    }
    let st = lab.status(n1).expect("n1 status");
    assert_eq!(st["gateway"]["problems"], serde_json::json!([]), "{st}");
}

/// `margay routes --watch` as a child; SIGTERM (by PID) on drop.
struct Watcher {
    child: Child,
    log: std::path::PathBuf,
}

impl Watcher {
    fn start(etcd_ns: &str, args: &[&str], log: std::path::PathBuf) -> Watcher {
        let file = std::fs::File::create(&log).expect("watch log");
        let child = Command::new("ip")
            .args(["netns", "exec", etcd_ns, MARGAY, "routes"])
            .args(args)
            .args(["--watch", "--etcd-endpoints", ETCD])
            .stdout(Stdio::from(file.try_clone().expect("dup")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn margay routes --watch");
        Watcher { child, log }
    }
    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
    fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop();
    }
}

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn routes_reach_pods_from_an_outside_host() {
    const T: &str = "routes_reach_pods_from_an_outside_host";
    if !lab_prerequisites(T) {
        return;
    }
    let mut lab = Lab::with("rt", 3, 1, &[]);
    let etcd_ns = format!("{}-etcd", lab.name);
    let (n1, n2, n3) = (
        lab.node(0).to_string(),
        lab.node(1).to_string(),
        lab.node(2).to_string(),
    );
    let gw = lab.nodes[0].1.to_string();
    let margay = |args: &[&str]| lab.margay_in(&etcd_ns, args);
    let apply = |yaml: &str| {
        let (ok, out) = try_sh(&format!(
            "printf '%s' '{yaml}' | ip netns exec {etcd_ns} {MARGAY} apply -f - --etcd-endpoints {ETCD}"
        ));
        assert!(ok, "margay apply: {out}");
    };
    apply("apiVersion: projectcalico.org/v3\nkind: BGPConfiguration\nmetadata:\n  name: default\nspec:\n  serviceClusterIPs:\n  - cidr: 10.96.0.0/12\n");
    let pods: Vec<String> = lab.pods.iter().map(|(_, _, ip)| ip.to_string()).collect();
    assert_eq!(pods.len(), 3);
    // kube-proxy's stand-in on every node: the service 10.96.0.10 is n3's pod.
    for n in [&n1, &n2, &n3] {
        kube_proxy_dnat(n, "10.96.0.10", &pods[2], "10.244.0.0/16");
    }

    // Errors first: they name what is wrong.
    let (ok, out) = margay(&["routes", "--via", "nosuch"]);
    assert!(!ok && out.contains("nosuch") && out.contains(&n1), "{out}");
    let (ok, out) = in_ns(
        &etcd_ns,
        &[
            MARGAY,
            "routes",
            "--via",
            &n1,
            "--etcd-endpoints",
            "127.0.0.1:1",
            "--etcd-timeout",
            "1",
        ],
    );
    assert!(!ok && out.contains("etcd unreachable"), "{out}");
    let (ok, out) = margay(&["routes", "--via", &n1, "--protocol", "77"]);
    assert!(!ok && out.contains("margay node's own"), "{out}");

    // 1. Printed routes, applied by hand on outside host 1.
    let out1 = outside_host(&lab, "out", "10.99.0.50");
    assert!(
        !pings(&out1, &pods[1]),
        "{out1} reaches a pod before it has any route"
    );
    let (ok, batch) = margay(&["routes", "--via", &n1, "--format", "batch"]);
    assert!(ok, "{batch}");
    println!("margay routes --via {n1} --format batch:\n{batch}");
    for n in [&n1, &n2, &n3] {
        let block = lab.own_block(n);
        let want = format!("route replace {block} via {gw} proto 79 metric 79");
        assert!(
            batch.lines().any(|l| l == want),
            "missing {want:?} in\n{batch}"
        );
    }
    assert!(batch.contains("route replace 10.96.0.0/12 via"), "{batch}");
    let (ok, out) = try_sh(&format!("printf '%s' '{batch}' | ip -n {out1} -batch -"));
    assert!(ok, "ip -batch: {out}");
    for p in &pods {
        assert!(
            pings(&out1, p),
            "{out1} does not reach pod {p}: {:?}",
            proto79(&out1)
        );
    }
    assert!(
        pings(&out1, "10.96.0.10"),
        "{out1} does not reach the service cluster IP (DNAT to {})",
        pods[2]
    );
    let (ok, json) = margay(&["routes", "--via", &n1, "--format", "json", "--aggregate"]);
    assert!(ok, "{json}");
    let v: serde_json::Value = serde_json::from_str(&json).expect("json");
    assert!(
        v["routes"]
            .as_array()
            .expect("routes")
            .iter()
            .any(|r| r["prefix"] == "10.244.0.0/16" && r["kind"] == "pool"),
        "{json}"
    );

    // 2. --watch on outside host 2, beside a route of another protocol it must leave alone.
    let out2 = behind_gateway(&lab, &n1);
    sh(&format!(
        "ip -n {out2} route add 192.0.2.0/24 via 10.98.0.1"
    ));
    assert!(
        !pings(&out2, &pods[1]),
        "{out2} reaches a pod before it has any route"
    );
    let gw = "10.98.0.1".to_string();
    let ns_arg = ["--via", gw.as_str(), "--netns", out2.as_str()];
    let mut w = Watcher::start(&etcd_ns, &ns_arg, lab.state_path("routes-watch.log"));
    let blocks: Vec<String> = [&n1, &n2, &n3]
        .iter()
        .map(|n| lab.own_block(n).to_string())
        .collect();
    let has = |ns: &str, prefix: &str| {
        proto79(ns)
            .iter()
            .any(|l| l.starts_with(&format!("{prefix} via {gw}")))
    };
    assert!(
        eventually(Duration::from_secs(10), || blocks
            .iter()
            .all(|b| has(&out2, b))
            && has(&out2, "10.96.0.0/12")),
        "the watch did not install the routes: {:?}\n{}",
        proto79(&out2),
        w.output()
    );
    for p in &pods {
        assert!(pings(&out2, p), "{out2} does not reach pod {p}");
    }
    assert!(
        pings(&out2, "10.96.0.10"),
        "{out2} does not reach the service cluster IP through the gateway"
    );

    // The gateway says it is one, and names every wrong forwarding setting with its fix.
    gateway_status(&lab, &n1, &n2);

    // A block claimed later: a second pool, and a pod on n2 drawing from it.
    apply("apiVersion: projectcalico.org/v3\nkind: IPPool\nmetadata:\n  name: second\nspec:\n  cidr: 10.245.0.0/16\n  blockSize: 26\n");
    let pod = format!("{}-n2x", lab.name);
    sh(&format!("ip netns add {pod} && ip -n {pod} link set lo up"));
    let mut conf = lab.cni_conf(&n2);
    conf["ipv4_pools"] = serde_json::json!(["10.245.0.0/16"]);
    let claimed = std::time::Instant::now();
    let (ok, out) = lab.cni(&n2, &pod, "ADD", &conf.to_string(), &[]);
    assert!(ok, "ADD from the second pool: {out}");
    let res: serde_json::Value = serde_json::from_str(&out).expect("CNI result");
    let new_ip = res["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .expect("address")
        .to_string();
    assert!(new_ip.starts_with("10.245."), "{res}");
    let new_block = sh(&format!("ip -n {n2} route show proto 77 type blackhole"))
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .find(|p| p.starts_with("10.245."))
        .expect("n2's blackhole for the new block")
        .to_string();
    assert!(
        eventually(Duration::from_secs(10), || has(&out2, &new_block)),
        "the watch did not follow the claim of {new_block}: {:?}\n{}",
        proto79(&out2),
        w.output()
    );
    // A figure for the report, not a limit (timing targets live in benchmarks).
    println!(
        "ADD claiming {new_block} -> its route in {out2}: {:?} (polled every 50 ms, each poll an `ip route` run)",
        claimed.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(10), || pings(&out2, &new_ip)),
        "{out2} does not reach the new pod {new_ip}"
    );

    // Restart: the routes stay while no watcher runs, and the new watcher adopts them (no duplicate).
    w.stop();
    let before = proto79(&out2);
    assert!(
        before.iter().any(|l| l.starts_with(&new_block)),
        "{before:?}"
    );
    let mut w = Watcher::start(&etcd_ns, &ns_arg, lab.state_path("routes-watch2.log"));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(proto79(&out2), before, "{}", w.output());

    // A release: n3 leaves (its block is deleted) and its route goes; nothing else changes.
    let (ok, out) = lab.margay_lab("remove-node", &[&n3]);
    assert!(ok, "lab remove-node: {out}");
    lab.reload();
    assert!(
        eventually(Duration::from_secs(10), || !has(&out2, &blocks[2])),
        "the watch did not remove n3's block {}: {:?}\n{}",
        blocks[2],
        proto79(&out2),
        w.output()
    );
    assert!(has(&out2, &blocks[0]) && has(&out2, &blocks[1]) && has(&out2, &new_block));
    let other = sh(&format!("ip -n {out2} route show 192.0.2.0/24"));
    assert!(
        other.contains("via 10.98.0.1"),
        "the watch touched a route not its own: {other:?}"
    );
    w.stop();
    println!("watch log:\n{}", w.output());
}
