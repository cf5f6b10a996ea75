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

use crate::common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::lab::Lab;

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
#[ignore = "needs root (network namespaces), etcd, iproute2 and ping: scripts/test.sh runs it (--include-ignored)"]
fn daemon_restart_under_1000_pps_loses_nothing() {
    const T: &str = "daemon_restart_under_1000_pps_loses_nothing";
    if !common::lab::lab_prerequisites(T) {
        return;
    }
    let lab = Lab::with("mgp", 2, 1, &[]);
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

    // Route, neighbour and link events of both nodes with timestamps, printed when a packet is lost, so a
    // loss can be placed against what changed in either kernel.
    let monitors: Vec<(String, std::process::Child)> = [lab.nodes[0].0.clone(), n2.clone()]
        .into_iter()
        .filter_map(|ns| {
            Command::new("ip")
                .args([
                    "-n", &ns, "-ts", "monitor", "route", "neigh", "link", "address",
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .ok()
                .map(|c| (ns, c))
        })
        .collect();
    let count = PACKETS.to_string();
    // -D stamps every reply, so a loss can be placed against the restart window; a reader thread drains the
    // output as it comes (a full pipe would stall the ping).
    let mut ping = Command::new("ip")
        .args([
            "netns", "exec", &p1, "ping", "-D", "-i", "0.001", "-W", "1", "-c", &count,
        ])
        .arg(ip2.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ping");
    let stdout = ping.stdout.take().expect("ping stdout");
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<String>>()
    });
    // Let the flood run a moment, then restart the receiving node's daemon in the middle of it.
    std::thread::sleep(Duration::from_millis(1000));
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let restart_from = now();
    lab.restart_node(&n2);
    lab.wait_ready(&n2);
    let restart_to = now();
    // The restarted daemon converged while the flood was still running, so the count covers it all.
    assert!(
        matches!(ping.try_wait(), Ok(None)),
        "the ping ended before {n2}'s restart had converged; raise PACKETS"
    );
    let status = ping.wait().expect("ping exit");
    let lines = reader.join().expect("ping reader");
    let text = lines.join("\n");
    let (sent, received) =
        ping_counts(&text).unwrap_or_else(|| panic!("no ping summary ({status}): {text}"));
    let lost = sent - received;
    let mut events = String::new();
    for (ns, mut child) in monitors {
        let _ = child.kill();
        let out = child
            .wait_with_output()
            .map(|o| o.stdout)
            .unwrap_or_default();
        events.push_str(&format!(
            "--- {ns}: ip monitor\n{}",
            String::from_utf8_lossy(&out)
        ));
        let (_, snmp) = common::lab::in_ns(&ns, &["cat", "/proc/net/snmp"]);
        events.push_str(&format!("--- {ns}: /proc/net/snmp\n{snmp}\n"));
    }
    println!(
        "restart of {n2} under 1000 pps: {sent} sent, {received} received, {lost} lost \
         (restart from {restart_from:.3} to ready at {restart_to:.3})"
    );
    assert_eq!(
        sent,
        PACKETS,
        "{}",
        lines.last().cloned().unwrap_or_default()
    );
    if lost > 0 {
        // Where the lost sequence numbers were sent: the stamp of the reply before each gap.
        let mut seen = std::collections::BTreeMap::new();
        for l in &lines {
            let stamp = l
                .strip_prefix('[')
                .and_then(|r| r.split(']').next())
                .and_then(|t| t.parse::<f64>().ok());
            let seq = l
                .split("icmp_seq=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .and_then(|n| n.parse::<u32>().ok());
            if let (Some(t), Some(q), true) = (stamp, seq, l.contains("bytes from")) {
                seen.insert(q, t);
            }
        }
        let gaps: Vec<String> = (1..=sent)
            .filter(|q| !seen.contains_key(q))
            .map(|q| {
                let before = seen.range(..q).next_back().map(|(_, t)| *t).unwrap_or(0.0);
                format!("seq {q} (after {before:.3})")
            })
            .collect();
        panic!(
            "{lost} packets lost across {n2}'s restart (restart {restart_from:.3} .. ready {restart_to:.3}): {gaps:?}\n{events}\n{}",
            lab.logs()
        );
    }
    // The restart really happened while the ping ran.
    let logs = lab.node_logs(&n2);
    assert!(logs.matches("margay node running").count() >= 2, "{logs}");
    // The order that makes the loss 0 by construction, not by luck: the restarted daemon put its block in
    // the RIB before its first session came up, so its End-of-RIB to n1 followed the block (n1 sweeps at
    // End-of-RIB whatever was not re-announced, and would drop the route to n2's pods until it came).
    // `lab restart-node` logs the new daemon to `<node>.restart-<secs>.log`.
    let second: String = std::fs::read_dir(&lab.state)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let f = e.file_name().to_string_lossy().to_string();
            f.starts_with(&format!("{n2}.restart-")) && f.ends_with(".log")
        })
        .map(|e| std::fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let advertised = second.find("advertising prefixes");
    let applied = second.find("BGP peers applied");
    assert!(
        matches!((advertised, applied), (Some(a), Some(p)) if a < p),
        "after the restart the block must be advertised before the peers are applied:\n{second}"
    );
}
