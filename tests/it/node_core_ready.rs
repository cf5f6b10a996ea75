//! /readyz follows BGP convergence after a start: not ready, with a reason naming the peer it waits for,
//! while a configured peer has not delivered its table; ready once it has (End-of-RIB), without a restart.
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24 (+ BIRD 2, AS 65001, started late)    etcd 10.99.0.2
//!     n1 10.99.0.11 ◀──mesh──▶ n2 10.99.0.12        BGPPeer tor: 10.99.0.1 AS 65001 (global)
//!
//!   1. n1 restarted with MARGAY_CONVERGE_MIN_WAIT=600 (so it waits for down peers instead of judging
//!      on the Established ones after 5 s): mesh with n2 Established, tor down
//!      ─▶ `margay status`: ready false, reason names 10.99.0.1
//!   2. BIRD starts in <lab>-br: session up, BIRD sends End-of-RIB ─▶ n1 ready
//! ```
//!
//! Needs root, etcd, etcdctl, iproute2 and BIRD 2; SKIP otherwise (a failure under CI=true).

use crate::common;

use std::time::Duration;

use common::bgp_peers::{have_bird, Bird};
use common::lab::{eventually, in_ns, Lab, ETCD};
use common::{have, is_root, require};

const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");

#[test]
#[ignore = "needs root for network namespaces; needs etcd: scripts/test.sh runs it (--include-ignored)"]
fn readiness_waits_for_end_of_rib_and_names_what_it_waits_for() {
    const T: &str = "readiness_waits_for_end_of_rib_and_names_what_it_waits_for";
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
    let lab = Lab::with("mgy", 2, 1, &[]);
    let (n1, ip1) = lab.nodes[0].clone();
    let (_, ip2) = lab.nodes[1].clone();
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "put",
            "/calico/resources/v3/projectcalico.org/bgppeers/tor",
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"tor"},"spec":{"peerIP":"10.99.0.1","asNumber":65001}}"#,
        ],
    );
    assert!(ok, "etcdctl put: {out}");

    // 1. Restarted, waiting for the ToR that is not there.
    lab.restart_node_with_env(
        &n1,
        &[
            ("MARGAY_CONVERGE_MIN_WAIT", "600"),
            ("MARGAY_CONVERGE_MAX_WAIT", "900"),
        ],
    );
    let mut last = None;
    let waiting = eventually(Duration::from_secs(30), || {
        last = lab.status(&n1);
        last.as_ref().is_some_and(|s| {
            s["ready"]["ready"] == false
                && s["ready"]["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("10.99.0.1") && !r.contains(&ip2.to_string()))
                && s["peers"]
                    .as_array()
                    .is_some_and(|p| p.iter().any(|p| p["fsmState"] == "Established"))
        })
    });
    assert!(
        waiting,
        "{n1} should be not ready, waiting for 10.99.0.1 only (its mesh peer done): {last:?}\n{}",
        lab.node_logs(&n1)
    );

    // 2. The ToR arrives and delivers its (empty) table: ready, no restart.
    let conf = format!(
        "router id 10.99.0.1;\nprotocol device {{}}\nprotocol bgp n1 {{\n  local 10.99.0.1 as 65001;\n  neighbor {ip1} as 64512;\n  ipv4 {{ import all; export none; }};\n}}\n"
    );
    let bird = Bird::start(&format!("{}-br", lab.name), &conf);
    let status = lab.wait_ready(&n1);
    assert!(status["ready"]["reason"].is_null(), "{status}");
    let tor = status["peers"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["address"] == "10.99.0.1").cloned())
        .unwrap_or_default();
    assert_eq!(tor["fsmState"], "Established", "{status}\n{}", bird.log());
    let logs = lab.node_logs(&n1);
    assert!(logs.contains("BGP converged"), "{logs}");
}

/// ADD-PATH receive (RFC 7911), offered by default as Calico's BIRD has `add paths on`: a ToR BIRD with
/// `add paths tx` sends two paths of one prefix (two static routes, different gateways, `next hop keep`);
/// the node keeps both and its FIB gets the ECMP set.
///
/// ```text
///   netns <lab>-br: bridge 10.99.0.1/24, BIRD 2 AS 65001 (BGPPeer tor), etcd 10.99.0.2
///     BIRD: 10.244.250.0/26 via 10.99.0.50 and via 10.99.0.51 ──eBGP, ADD-PATH──▶ n1 10.99.0.11
///     n1's FIB: 10.244.250.0/26 proto 77 nexthop via 10.99.0.50 nexthop via 10.99.0.51
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn add_path_from_the_tor_gives_the_fib_the_ecmp_set() {
    const T: &str = "add_path_from_the_tor_gives_the_fib_the_ecmp_set";
    if !(common::lab::lab_prerequisites(T)
        && require(have_bird(), T, "BIRD 2 is not installed (bird2)"))
    {
        return;
    }
    let lab = Lab::with("mgq", 1, 0, &[]);
    let (n1, ip1) = lab.nodes[0].clone();
    let (ok, out) = in_ns(
        &format!("{}-etcd", lab.name),
        &[
            "etcdctl",
            "--endpoints",
            ETCD,
            "put",
            "/calico/resources/v3/projectcalico.org/bgppeers/tor",
            r#"{"apiVersion":"projectcalico.org/v3","kind":"BGPPeer","metadata":{"name":"tor"},"spec":{"peerIP":"10.99.0.1","asNumber":65001}}"#,
        ],
    );
    assert!(ok, "etcdctl put: {out}");
    let conf = format!(
        "router id 10.99.0.1;\nprotocol device {{}}\n\
         protocol static s1 {{ ipv4; route 10.244.250.0/26 via 10.99.0.50; }}\n\
         protocol static s2 {{ ipv4; route 10.244.250.0/26 via 10.99.0.51; }}\n\
         protocol bgp n1 {{\n  local 10.99.0.1 as 65001;\n  neighbor {ip1} as 64512;\n  \
         ipv4 {{ import none; export all; add paths tx; next hop keep; }};\n}}\n"
    );
    let bird = Bird::start(&format!("{}-br", lab.name), &conf);
    let mut route = String::new();
    let ecmp = eventually(Duration::from_secs(60), || {
        route = in_ns(&n1, &["ip", "route", "show", "10.244.250.0/26"]).1;
        route.contains("via 10.99.0.50") && route.contains("via 10.99.0.51")
    });
    assert!(
        ecmp,
        "{n1} has no ECMP route to 10.244.250.0/26: {route:?}\n{}\n{}\n{}",
        bird.birdc("show protocols all n1"),
        bird.log(),
        lab.node_logs(&n1)
    );
    assert!(route.contains("proto 77"), "{route}");
}

/// `node::run_with` runs a node inside the test's process (as mini-redis's `server::run`), here on a thread
/// inside a lab node's namespace (so its netlink and sockets are the lab node's), on BGP and HTTP listeners
/// the test bound to port 0, until a shutdown future the test completes: it registers, becomes ready, and
/// completing the future ends the run cleanly.
#[test]
#[ignore = "needs root (network namespaces) and etcd: scripts/test.sh runs it (--include-ignored)"]
fn a_node_runs_in_process_on_given_listeners_until_shut_down() {
    const T: &str = "a_node_runs_in_process_on_given_listeners_until_shut_down";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgz", 1, 0, &[]);
    let (n1, ip) = lab.nodes[0].clone();
    lab.stop_daemon(&n1, nix::sys::signal::Signal::SIGTERM);
    let sock = lab.state.join("in-process.sock");
    let netns = format!("/run/netns/{n1}");
    let name = n1.clone();
    let result = common::bgp_peers::in_netns(&n1, move || async move {
        use clap::Parser;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            etcd: margay::cli::EtcdArgs,
            #[command(flatten)]
            node: margay::node::NodeArgs,
        }
        let cli = Cli::parse_from([
            "node",
            "--node-name",
            &name,
            "--ip",
            &ip.to_string(),
            "--netns",
            &netns,
            "--etcd-endpoints",
            ETCD,
            "--cni-socket",
            sock.to_str().expect("utf-8 path"),
        ]);
        let bgp = margay::bgp::session::Listener::bind(&["127.0.0.1:0".parse().expect("addr")])
            .await
            .expect("BGP listener");
        let http = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("HTTP listener");
        let http_addr = http.local_addr().expect("HTTP address");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let run = tokio::spawn(margay::node::run_with(
            cli.etcd,
            cli.node,
            margay::node::Listeners {
                bgp: Some(bgp),
                http: Some(http),
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let mut last = None;
        for _ in 0..300 {
            if run.is_finished() {
                break;
            }
            let got = async {
                let mut s = tokio::net::TcpStream::connect(http_addr).await.ok()?;
                s.write_all(b"GET /readyz HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n")
                    .await
                    .ok()?;
                let mut out = String::new();
                s.read_to_string(&mut out).await.ok()?;
                Some(out)
            }
            .await;
            let ready = got
                .as_deref()
                .is_some_and(|r| r.starts_with("HTTP/1.1 200"));
            last = got;
            if ready {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop_tx.send(());
        let ended = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .map_err(|_| "the run did not end after its shutdown future".to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
        (last, ended.map(|r| r.map_err(|e| format!("{e:#}"))))
    });
    let (last, ended) = result;
    assert!(
        last.as_deref()
            .is_some_and(|r| r.starts_with("HTTP/1.1 200")),
        "/readyz on the given listener: {last:?} (run: {ended:?})"
    );
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
}

/// /readyz follows the configuration feed: with the lab's etcd stopped the node's watch is lost, so the
/// node is not ready (its peers may be stale) and says why, while its sessions stay up; with etcd back the
/// watch resumes and the node is ready again, without a restart.
///
/// ```text
///   netns <lab>-br: bridge 10.99.0.1     etcd 10.99.0.2 (stopped, then started again)
///     n1 10.99.0.11 ◀──mesh──▶ n2 10.99.0.12
///   etcd down ─▶ n1 /readyz 503 "configuration feed not following etcd: ...", mesh session Established
///   etcd up   ─▶ n1 /readyz 200
/// ```
#[test]
#[ignore = "needs root (network namespaces), etcd and iproute2: scripts/test.sh runs it (--include-ignored)"]
fn readiness_goes_false_while_the_configuration_watch_is_lost_and_comes_back() {
    const T: &str = "readiness_goes_false_while_the_configuration_watch_is_lost_and_comes_back";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("fdl", 2, 0, &[]);
    let n1 = lab.node(0).to_string();
    lab.wait_ready(&n1);
    let (ok, out) = lab.margay_lab("etcd", &["stop"]);
    assert!(ok, "etcd stop: {out}");
    let mut last = None;
    let unready = eventually(Duration::from_secs(30), || {
        last = common::lab::http_get(&n1, "127.0.0.1:9190", "/readyz").ok();
        last.as_ref().is_some_and(|(code, body)| {
            *code == 503 && body.contains("configuration feed not following etcd")
        })
    });
    assert!(
        unready,
        "{n1} /readyz with etcd stopped: {last:?}\n{}",
        lab.node_logs(&n1)
    );
    let status = lab.status(&n1).expect("status with etcd down");
    assert_eq!(status["ready"]["ready"], false, "{status}");
    assert!(
        status["peers"]
            .as_array()
            .is_some_and(|p| p.iter().all(|p| p["fsmState"] == "Established")),
        "the mesh session must stay up while etcd is away: {status}"
    );
    let (ok, out) = lab.margay_lab("etcd", &["start"]);
    assert!(ok, "etcd start: {out}");
    let ready = eventually(Duration::from_secs(30), || {
        last = common::lab::http_get(&n1, "127.0.0.1:9190", "/readyz").ok();
        last.as_ref().is_some_and(|(code, _)| *code == 200)
    });
    assert!(
        ready,
        "{n1} /readyz after etcd came back: {last:?}\n{}",
        lab.node_logs(&n1)
    );
}
