//! Restart rebuilds state before trusting its routes: a node that was down while another node left the
//! cluster comes back, keeps forwarding on the routes it adopted, and sweeps the departed node's block once
//! BGP has converged.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
//!     A = n1 10.99.0.11   B = n2 10.99.0.12   C = n3 10.99.0.13     full iBGP mesh, 2 pods per node
//!
//!   1. SIGTERM A's daemon: A's kernel keeps its proto-77 routes (B's and C's blocks, its blackhole)
//!   2. SIGKILL C's daemon; `margay node remove C` (Node resource + IPAM): B drops C's block;
//!      A, being down, still holds "C's block via 10.99.0.13"
//!   3. start A: it adopts its routes, meshes with B only, B sends End-of-RIB ─▶ A converges and sweeps:
//!        A's FIB:  C's block        gone
//!                  B's block        via 10.99.0.12   (re-learned, never removed)
//!                  A's block        blackhole        (IPAM says it is A's)
//!      /readyz on A: ready; A's pods ping B's pods.
//! ```
//!
//! Needs root, etcd, iproute2 and ping; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::time::Duration;

use common::lab::{eventually, in_ns, own_block, proto77, Lab};
use nix::sys::signal::Signal;

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
// Cargo builds margay-cni beside margay for integration tests; `lab up` finds it there.
const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn restarted_node_sweeps_the_block_of_a_node_removed_while_it_was_down() {
    const T: &str = "restarted_node_sweeps_the_block_of_a_node_removed_while_it_was_down";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgr", 3, 2, &[]);
    let (a, _) = lab.nodes[0].clone();
    let (b, b_ip) = lab.nodes[1].clone();
    let (c, c_ip) = lab.nodes[2].clone();
    let (block_a, block_b, block_c) = (own_block(&a), own_block(&b), own_block(&c));
    assert!(
        proto77(&a).contains(&(block_c, Some(c_ip))),
        "before: {a} has no route to {c}'s block: {:?}",
        proto77(&a)
    );
    lab.wait_ready(&a);

    // 1. A stops (as a DaemonSet update stops it).
    lab.stop_daemon(&a, Signal::SIGTERM);
    // 2. C dies and is removed from the cluster.
    lab.stop_daemon(&c, Signal::SIGKILL);
    let (ok, out) = lab.margay_in(&b, &["node", "remove", &c]);
    assert!(ok, "margay node remove {c}: {out}");
    assert!(out.contains("Removed Node resource"), "{out}");
    assert!(
        eventually(Duration::from_secs(30), || !proto77(&b)
            .iter()
            .any(|(p, _)| *p == block_c)),
        "{b} still routes {c}'s block {block_c}: {:?}\n{}",
        proto77(&b),
        lab.node_logs(&b)
    );
    // A was down: its kernel still has the departed node's block (and everything else).
    let before = proto77(&a);
    assert!(before.contains(&(block_c, Some(c_ip))), "{before:?}");
    assert!(before.contains(&(block_b, Some(b_ip))), "{before:?}");
    assert!(before.contains(&(block_a, None)), "{before:?}");

    // 3. A starts again.
    lab.restart_node(&a);
    let status = lab.wait_ready(&a);
    let peers = status["peers"].as_array().cloned().unwrap_or_default();
    assert_eq!(peers.len(), 1, "{a} should mesh with {b} only: {status}");
    let after = proto77(&a);
    assert!(
        !after.iter().any(|(p, _)| *p == block_c),
        "{a} still routes removed {c}'s block {block_c} after converging: {after:?}\n{}",
        lab.node_logs(&a)
    );
    assert!(after.contains(&(block_b, Some(b_ip))), "{after:?}");
    assert!(after.contains(&(block_a, None)), "{after:?}");
    let logs = lab.node_logs(&a);
    assert!(
        logs.contains("swept routes nobody re-announced") && logs.contains(&block_c.to_string()),
        "{a}'s log does not show the sweep of {block_c}:\n{logs}"
    );
    assert!(
        logs.contains("pod veths reconciled with IPAM"),
        "{a}'s log does not show the pod reconciliation:\n{logs}"
    );

    // A's pods still reach B's pods, both ways.
    let mut failed = Vec::new();
    for (pa, na, ipa) in lab.pods.iter().filter(|(_, n, _)| *n == a) {
        for (pb, nb, ipb) in lab.pods.iter().filter(|(_, n, _)| *n == b) {
            for (from, to, ip) in [(pa, pb, ipb), (pb, pa, ipa)] {
                let (ok, _) = in_ns(from, &["ping", "-c", "1", "-W", "2", &ip.to_string()]);
                if !ok {
                    failed.push(format!("{from} ({na}/{nb}) -> {to} ({ip})"));
                }
            }
        }
    }
    assert!(
        failed.is_empty(),
        "pings failed: {failed:?}\n{}",
        lab.logs()
    );
}

/// Both daemons of a two-node lab stop (a rolling update taking two at once); A starts first. A converges
/// on its own (its configured peer B is down) and is ready, but keeps B's block (held for B: B's kernel still
/// forwards) instead of sweeping it; when B is back and re-announces it, the route simply stays. The pods
/// ping across the whole time.
///
/// ```text
///   n1 = A 10.99.0.11   n2 = B 10.99.0.12        both SIGTERM; A started (MARGAY_CONVERGE_MIN_WAIT=1)
///   A's FIB: B's block via 10.99.0.12  held (log: "held"), A ready
///   B started: the mesh is back, B's block still via 10.99.0.12 in A's FIB, pods ping
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn routes_of_a_peer_not_back_yet_are_held_not_swept() {
    const T: &str = "routes_of_a_peer_not_back_yet_are_held_not_swept";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgh", 2, 1, &[]);
    let (a, _) = lab.nodes[0].clone();
    let (b, b_ip) = lab.nodes[1].clone();
    let block_b = own_block(&b);
    lab.wait_ready(&a);
    lab.stop_daemon(&a, Signal::SIGTERM);
    lab.stop_daemon(&b, Signal::SIGTERM);

    lab.restart_node_with_env(&a, &[("MARGAY_CONVERGE_MIN_WAIT", "1")]);
    lab.wait_ready(&a);
    assert!(
        eventually(Duration::from_secs(30), || lab
            .node_logs(&a)
            .contains(&format!("held={block_b}"))),
        "{a} does not report holding {block_b}:\n{}",
        lab.node_logs(&a)
    );
    assert!(
        proto77(&a).contains(&(block_b, Some(b_ip))),
        "{a} swept {b}'s block while {b} was down: {:?}",
        proto77(&a)
    );
    let ping = |from: &str, to: std::net::Ipv4Addr| {
        in_ns(from, &["ping", "-c", "1", "-W", "2", &to.to_string()]).0
    };
    let (pa, _, ipa) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == a)
        .cloned()
        .expect("pod on A");
    let (pb, _, ipb) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == b)
        .cloned()
        .expect("pod on B");
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping while {b} is down"
    );

    lab.restart_node(&b);
    lab.wait_ready(&b);
    assert!(
        eventually(Duration::from_secs(30), || lab
            .status(&a)
            .and_then(|s| s["peers"].as_array().cloned())
            .is_some_and(
                |p| p.iter().all(|p| p["fsmState"] == "Established") && !p.is_empty()
            )),
        "the mesh did not come back: {:?}",
        lab.status(&a)
    );
    assert!(
        proto77(&a).contains(&(block_b, Some(b_ip))),
        "{:?}",
        proto77(&a)
    );
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping after {b} is back"
    );
}

/// `GET /healthz` on 127.0.0.1:9190 from a thread that has entered `node`'s network namespace, every 10 ms
/// until `stop` is set: (when the first 503 after a 200 came and its body) and whether a 200 was seen;
/// `seen_ok` is set as soon as one is.
fn poll_healthz(
    node: &str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    seen_ok: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(Option<(std::time::Instant, String)>, bool)> {
    let ns = std::fs::File::open(format!("/var/run/netns/{node}")).expect("netns file");
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        let mut failed = None;
        let mut ok = false;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let answer = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:9190".parse().expect("addr"),
                Duration::from_millis(200),
            )
            .ok()
            .and_then(|mut s| {
                s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).ok()?;
                Some(out)
            });
            match answer {
                Some(a) if a.starts_with("HTTP/1.0 200") || a.starts_with("HTTP/1.1 200") => {
                    ok = true;
                    seen_ok.store(true, std::sync::atomic::Ordering::Relaxed);
                }
                Some(a) if ok && failed.is_none() && a.contains(" 503 ") => {
                    failed = Some((std::time::Instant::now(), a))
                }
                _ => {}
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (failed, ok)
    })
}

/// A dead task is loud: the RIB task, then the FIB task, is killed through the test-only fault hook
/// (MARGAY_TEST_FAULT_TASK + SIGUSR1). Each time /healthz answers 503 naming the task, then the daemon
/// exits non-zero within a second of the kill; meanwhile the pods keep pinging on the kernel routes, and a
/// restarted daemon is healthy and ready again.
///
/// ```text
///   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
///     A = n1 10.99.0.11 (daemon run by the test, fault hook armed)   B = n2 10.99.0.12    1 pod each
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn a_killed_rib_or_fib_task_fails_healthz_and_exits_nonzero() {
    const T: &str = "a_killed_rib_or_fib_task_fails_healthz_and_exits_nonzero";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgk", 2, 1, &[]);
    let (a, a_ip) = lab.nodes[0].clone();
    let (b, _) = lab.nodes[1].clone();
    lab.wait_ready(&a);
    let pod = |n: &str| {
        lab.pods
            .iter()
            .find(|(_, node, _)| node == n)
            .cloned()
            .expect("pod")
    };
    let ((pa, _, ipa), (pb, _, ipb)) = (pod(&a), pod(&b));
    let ping = |from: &str, to: std::net::Ipv4Addr| {
        in_ns(from, &["ping", "-c", "1", "-W", "2", &to.to_string()]).0
    };
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping at start"
    );

    for task in ["rib", "fib"] {
        lab.stop_daemon(&a, Signal::SIGTERM);
        // The daemon as our child (same flags as the lab's), so its exit status is ours to read.
        let log = lab.state.join(format!("{a}-fault-{task}.log"));
        let sock = lab.state.join(format!("{a}-fault.sock"));
        let mut child = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                MARGAY,
                "node",
                "run",
                "--node-name",
                &a,
            ])
            .args([
                "--ip",
                &a_ip.to_string(),
                "--etcd-endpoints",
                common::lab::ETCD,
            ])
            .arg("--cni-socket")
            .arg(&sock)
            .args(["--http-listen", "127.0.0.1:9190"])
            .env("MARGAY_TEST_FAULT_TASK", task)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start margay node");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen_ok = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let poller = poll_healthz(&a, stop.clone(), seen_ok.clone());
        // Healthy first (every task answering its heartbeat).
        assert!(
            eventually(Duration::from_secs(60), || seen_ok
                .load(std::sync::atomic::Ordering::Relaxed)),
            "never healthy:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(200));
        let killed = std::time::Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            Signal::SIGUSR1,
        )
        .expect("SIGUSR1");
        let status = loop {
            if let Some(s) = child.try_wait().expect("wait") {
                break s;
            }
            assert!(
                killed.elapsed() < Duration::from_secs(10),
                "the daemon did not exit after its {task} task was killed:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let exited = std::time::Instant::now();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (failed, was_ok) = poller.join().expect("poller");
        let logs = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            !status.success(),
            "exit status {status} must be non-zero:\n{logs}"
        );
        assert!(
            exited - killed < Duration::from_secs(1),
            "exited {:?} after the kill (limit 1 s):\n{logs}",
            exited - killed
        );
        assert!(was_ok, "the poller never saw a healthy daemon");
        let (when, body) = failed.unwrap_or_else(|| panic!("/healthz never failed:\n{logs}"));
        assert!(
            when < exited && when >= killed,
            "/healthz failed at the wrong time"
        );
        assert!(body.contains(&format!("task {task}: ended")), "{body}");
        assert!(
            logs.contains(&format!("task {task} ended unexpectedly")),
            "{logs}"
        );
        eprintln!(
            "{task}: /healthz 503 after {:?}, exit after {:?} ({status})",
            when - killed,
            exited - killed
        );
        // No daemon on A now: its kernel routes keep forwarding.
        assert!(
            ping(&pa, ipb) && ping(&pb, ipa),
            "pods cannot ping with A's daemon dead: A {:?} B {:?}\n{logs}\n--- B\n{}",
            proto77(&a),
            proto77(&b),
            lab.node_logs(&b)
        );
        // Back to a lab-run daemon for the next round (the lab's stop wants its PID file).
        lab.restart_node(&a);
        lab.wait_ready(&a);
    }
    assert!(
        ping(&pa, ipb) && ping(&pb, ipa),
        "pods cannot ping after the restarts"
    );
}

/// After a daemon restart the node announces the graceful restart Restart State bit (RFC 4724 3), as the
/// reflector does, from the run marker it keeps beside its CNI socket; on its first start it does not.
/// Seen from BIRD, the ToR of the lab (a global BGPPeer): "Restart recovery" among margay's capabilities.
///
/// ```text
///   netns <lab>-br: bridge 10.99.0.1/24, BIRD 2 AS 65001 (BGPPeer tor), etcd 10.99.0.2
///     n1 10.99.0.11 AS 64512: first start (no R) ─▶ SIGTERM, start again (R)
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn node_sets_the_restart_bit_after_a_restart_not_on_first_start() {
    const T: &str = "node_sets_the_restart_bit_after_a_restart_not_on_first_start";
    if !(common::lab::lab_prerequisites(T)
        && common::require(
            common::bgp_peers::have_bird(),
            T,
            "BIRD 2 is not installed (bird2)",
        ))
    {
        return;
    }
    let lab = Lab::with("mgb", 1, 0, &[]);
    let (n1, ip1) = lab.nodes[0].clone();
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            common::lab::ETCD,
            "put",
            "/calico/resources/v3/projectcalico.org/bgppeers/tor",
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"tor"},"spec":{"peerIP":"10.99.0.1","asNumber":65001}}"#,
        ],
    );
    assert!(ok, "etcdctl put: {out}");
    let conf = format!(
        "router id 10.99.0.1;\nprotocol device {{}}\nprotocol bgp n1 {{\n  local 10.99.0.1 as 65001;\n  neighbor {ip1} as 64512;\n  graceful restart on;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    let bird = common::bgp_peers::Bird::start(&format!("{}-br", lab.name), &conf);
    let established = |bird: &common::bgp_peers::Bird| {
        let mut last = String::new();
        let ok = eventually(Duration::from_secs(60), || {
            last = bird.birdc("show protocols all n1");
            last.contains("Established") && last.contains("Neighbor capabilities")
        });
        assert!(
            ok,
            "BIRD never Established with {n1}:\n{last}\n{}",
            bird.log()
        );
        last
    };
    // What BIRD says about margay's OPEN (its own capabilities come first).
    let neighbor = |s: &str| {
        s.split("Neighbor capabilities")
            .nth(1)
            .unwrap_or("")
            .to_string()
    };
    let first = established(&bird);
    assert!(neighbor(&first).contains("Graceful restart"), "{first}");
    assert!(
        !neighbor(&first).contains("Restart recovery"),
        "no R bit on a first start:\n{first}"
    );

    lab.stop_daemon(&n1, Signal::SIGTERM);
    lab.restart_node(&n1);
    // The new session (the old one went down when the daemon stopped).
    let mut again = String::new();
    assert!(
        eventually(Duration::from_secs(60), || {
            again = bird.birdc("show protocols all n1");
            again.contains("Established") && neighbor(&again).contains("Restart recovery")
        }),
        "no R bit after the restart:\n{again}\n{}",
        lab.node_logs(&n1)
    );
    assert!(
        lab.node_logs(&n1).contains("announcing a graceful restart"),
        "{}",
        lab.node_logs(&n1)
    );
}

/// Kills a daemon the test started itself, by PID, on drop (also on panic).
struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

/// The node's address is detected again (here every second; Calico's 60 s by default): when it changes,
/// the Node resource gets the new address, the other node re-peers with it and routes A's block via it,
/// and the pods ping across.
///
/// ```text
///   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
///     A = n1 10.99.0.11 (autodetected: cidr=10.99.0.0/24) ─▶ 10.99.0.31      B = n2 10.99.0.12
///     expect: Node A ipv4Address 10.99.0.31/<the lab's prefix, 16>; B: peer 10.99.0.31 Established, A's block via 10.99.0.31
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn a_changed_node_address_is_followed_by_the_node_resource_and_the_peers() {
    const T: &str = "a_changed_node_address_is_followed_by_the_node_resource_and_the_peers";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mga", 2, 1, &[]);
    let (a, a_ip) = lab.nodes[0].clone();
    let (b, _) = lab.nodes[1].clone();
    let block_a = own_block(&a);
    lab.wait_ready(&a);
    lab.stop_daemon(&a, Signal::SIGTERM);

    // A's daemon with IP=autodetect: the address comes from autodetection and is re-checked every second.
    let log = lab.state.join(format!("{a}-monitor.log"));
    let sock = lab.state.join(format!("{a}-monitor.sock"));
    let _daemon = Child(
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &a,
                MARGAY,
                "node",
                "run",
                "--node-name",
                &a,
            ])
            .args(["--ip-autodetection-method", "cidr=10.99.0.0/24"])
            .args(["--etcd-endpoints", common::lab::ETCD])
            .arg("--cni-socket")
            .arg(&sock)
            // Calico's way of saying it.
            .env("IP", "autodetect")
            .env("MARGAY_IP_RECHECK_INTERVAL", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("start margay node"),
    );
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    let peer_up = |addr: &str| {
        lab.status(&b)
            .and_then(|s| s["peers"].as_array().cloned())
            .is_some_and(|p| {
                p.iter()
                    .any(|p| p["address"] == addr && p["fsmState"] == "Established")
            })
    };
    assert!(
        eventually(Duration::from_secs(60), || peer_up(&a_ip.to_string())),
        "B never peered with A's autodetected address:\n{}",
        logs()
    );

    // The address changes (promote_secondaries keeps the new one when the old primary goes).
    let (_, out) = in_ns(&a, &["ip", "-4", "-o", "addr", "show"]);
    let line = out
        .lines()
        .find(|l| l.contains(&format!(" {a_ip}/")))
        .unwrap_or_else(|| panic!("no interface with {a_ip} in {a}: {out}"));
    let dev = line
        .split_whitespace()
        .nth(1)
        .unwrap_or_else(|| panic!("no device in {line}"))
        .to_string();
    // The lab's prefix length (its segment is a /16), kept for the new address.
    let plen = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{a_ip}/")))
        .unwrap_or_else(|| panic!("no prefix length in {line}"))
        .to_string();
    let new_ip = "10.99.0.31";
    for cmd in [
        vec![
            "sysctl".to_string(),
            "-qw".into(),
            format!("net.ipv4.conf.{dev}.promote_secondaries=1"),
        ],
        [
            "ip",
            "addr",
            "add",
            &format!("{new_ip}/{plen}"),
            "dev",
            &dev,
        ]
        .map(String::from)
        .to_vec(),
        ["ip", "addr", "del", &format!("{a_ip}/{plen}"), "dev", &dev]
            .map(String::from)
            .to_vec(),
    ] {
        let args: Vec<&str> = cmd.iter().map(String::as_str).collect();
        let (ok, out) = in_ns(&a, &args);
        assert!(ok, "{cmd:?}: {out}");
    }

    let node_key = format!("/calico/resources/v3/projectcalico.org/nodes/{a}");
    let mut stored = String::new();
    assert!(
        eventually(Duration::from_secs(30), || {
            stored = in_ns(
                &format!("{}-etcd", lab.name),
                &[
                    "etcdctl",
                    "--endpoints",
                    common::lab::ETCD,
                    "get",
                    &node_key,
                    "--print-value-only",
                ],
            )
            .1;
            stored.contains(&format!("\"ipv4Address\":\"{new_ip}/{plen}\""))
        }),
        "Node {a} not updated: {stored}\n{}",
        logs()
    );
    assert!(logs().contains("node address changed"), "{}", logs());
    assert!(
        eventually(Duration::from_secs(60), || peer_up(new_ip)
            && !peer_up(&a_ip.to_string())),
        "B did not re-peer with {new_ip}: {:?}\n{}",
        lab.status(&b),
        logs()
    );
    let want: std::net::Ipv4Addr = new_ip.parse().expect("ip");
    assert!(
        eventually(Duration::from_secs(30), || proto77(&b)
            .contains(&(block_a, Some(want)))),
        "B does not route {block_a} via {new_ip}: {:?}",
        proto77(&b)
    );
    let pod = |n: &str| {
        lab.pods
            .iter()
            .find(|(_, node, _)| node == n)
            .cloned()
            .expect("pod")
    };
    let ((pa, _, ipa), (pb, _, ipb)) = (pod(&a), pod(&b));
    let ping = |from: &str, to: std::net::Ipv4Addr| {
        in_ns(from, &["ping", "-c", "1", "-W", "2", &to.to_string()]).0
    };
    assert!(
        eventually(Duration::from_secs(20), || ping(&pa, ipb) && ping(&pb, ipa)),
        "pods cannot ping after the address change"
    );
}
