//! Graceful restart under traffic: a ping at 1000 packets per second runs between pods on two nodes while
//! one node's daemon is restarted (SIGTERM, start); the loss is counted, printed, and must be 0 (the
//! kernel keeps every route: the stopping daemon never flushes, the peer keeps its routes under RFC 4724,
//! the starting daemon adopts its routes and sweeps only what nobody re-announces).
//!
//! ```text
//!   netns <lab>-br: bridge 10.99.0.1/24, etcd 10.99.0.2
//!     n1 10.99.0.11 ◀──iBGP──▶ n2 10.99.0.12
//!     n1p1 ──ping -i 0.001 (20000 packets)──▶ n2p1      while n2's daemon restarts
//! ```
//!
//! Needs root, etcd, iproute2 and ping; SKIP otherwise (a failure under CI=true).

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::Lab;
use common::{have, is_root, require};

const MARGAY: &str = env!("CARGO_BIN_EXE_margay");
const _CNI: &str = env!("CARGO_BIN_EXE_margay-cni");
/// 20 s of flood: the restart and the convergence after it happen well inside it (checked below).
const PACKETS: u32 = 20000;

/// (transmitted, received) from ping's summary line.
fn ping_counts(out: &str) -> Option<(u32, u32)> {
    let line = out.lines().find(|l| l.contains("packets transmitted"))?;
    let n: Vec<u32> = line
        .split(',')
        .filter_map(|part| part.split_whitespace().next()?.parse().ok())
        .collect();
    Some((*n.first()?, *n.get(1)?))
}

#[test]
fn daemon_restart_under_1000_pps_loses_nothing() {
    const T: &str = "daemon_restart_under_1000_pps_loses_nothing";
    if !(require(is_root(), T, "needs root for network namespaces")
        && require(
            have("etcd"),
            T,
            "etcd is not installed (scripts/install-deps.sh)",
        )
        && require(have("ip"), T, "iproute2 is not installed")
        && require(have("ping"), T, "ping is not installed (iputils-ping)"))
    {
        return;
    }
    let lab = Lab::up(MARGAY, "mgp", 2, 1, &[]);
    let (n2, _) = lab.nodes[1].clone();
    let (p1, _, _) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == lab.nodes[0].0)
        .cloned()
        .expect("pod on n1");
    let (_, _, ip2) = lab
        .pods
        .iter()
        .find(|(_, n, _)| *n == n2)
        .cloned()
        .expect("pod on n2");
    lab.wait_ready(&n2);

    let count = PACKETS.to_string();
    let mut ping = Command::new("ip")
        .args([
            "netns", "exec", &p1, "ping", "-q", "-i", "0.001", "-W", "1", "-c", &count,
        ])
        .arg(ip2.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping");
    // Let the flood run a moment, then restart the receiving node's daemon in the middle of it.
    std::thread::sleep(Duration::from_millis(1000));
    lab.restart_node(&n2);
    lab.wait_ready(&n2);
    // The restarted daemon converged while the flood was still running, so the count covers it all.
    assert!(
        matches!(ping.try_wait(), Ok(None)),
        "the ping ended before {n2}'s restart had converged; raise PACKETS"
    );
    let out = ping.wait_with_output().expect("ping output");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let (sent, received) = ping_counts(&text).unwrap_or_else(|| panic!("no ping summary: {text}"));
    let lost = sent - received;
    println!("restart of {n2} under 1000 pps: {sent} sent, {received} received, {lost} lost");
    assert_eq!(sent, PACKETS, "{text}");
    assert_eq!(
        lost,
        0,
        "packets lost across {n2}'s restart: {text}\n{}",
        lab.node_logs(&n2)
    );
    // The restart really happened while the ping ran.
    let logs = lab.node_logs(&n2);
    assert!(logs.matches("margay node running").count() >= 2, "{logs}");
}
