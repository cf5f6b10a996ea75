//! `margay lab status`: every node's status, the blocks, the pods and the ping matrix.

#[allow(unused_imports)]
use super::*;

/// (from pod, to pod) -> reachable, every ordered pair of distinct pods, pinged in parallel.
pub(super) fn ping_matrix(pods: &[LabPod]) -> BTreeMap<(String, String), bool> {
    let mut children = Vec::new();
    for a in pods {
        for b in pods.iter().filter(|b| b.name != a.name) {
            children.push(((a.name.clone(), b.name.clone()), ping_once(a, b)));
        }
    }
    collect_pings(children)
}

/// One ping from pod `a` to pod `b`, started and not waited for (None: `b` has no address, or no ping).
fn ping_once(a: &LabPod, b: &LabPod) -> Option<std::process::Child> {
    let dst = b.ip?;
    Command::new("ip")
        .args(["netns", "exec", &a.name, "ping", "-c", "1", "-W", "1", "-q"])
        .arg(dst.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()
}

/// Wait for every ping started by [`ping_once`]: (from, to) -> answered.
fn collect_pings(
    children: Vec<((String, String), Option<std::process::Child>)>,
) -> BTreeMap<(String, String), bool> {
    children
        .into_iter()
        .map(|(k, c)| {
            let ok = c
                .and_then(|mut c| c.wait().ok())
                .map(|s| s.success())
                .unwrap_or(false);
            (k, ok)
        })
        .collect()
}

/// Above this many pods the lab checks a ring instead of every pair (100 pods would be 9,900 pings).
const FULL_MATRIX_PODS: usize = 12;

/// Reachability the lab checks: every ordered pair in a small lab; in a big one, each pod to the next
/// pod in the list that lives on another node (a ring through every node, O(pods) pings).
pub(super) fn reach(pods: &[LabPod]) -> BTreeMap<(String, String), bool> {
    if pods.len() <= FULL_MATRIX_PODS {
        return ping_matrix(pods);
    }
    let mut children = Vec::new();
    for (i, a) in pods.iter().enumerate() {
        let b = (1..pods.len())
            .map(|d| &pods[(i + d) % pods.len()])
            .find(|b| b.node != a.node)
            .unwrap_or(&pods[(i + 1) % pods.len()]);
        children.push(((a.name.clone(), b.name.clone()), ping_once(a, b)));
    }
    collect_pings(children)
}

/// Print the lab; true when every pod reaches every other pod.
pub(super) fn status(args: &LabArgs) -> anyhow::Result<bool> {
    let state = args.state();
    let lab = load(&state)?;
    let margay = std::env::current_exe()?;
    let margay_s = margay.to_string_lossy().to_string();
    println!("== nodes");
    println!(
        "{:<14} {:<12} {:<8} {:<11} {:<9} ready",
        "NODE", "ADDRESS", "PID", "PROCESS", "BGP UP"
    );
    let reports = super::up::parallel(&lab.nodes, 8, |n| {
        super::up::status_in(&n.name, crate::api::DEFAULT_LISTEN)
    });
    for (n, report) in lab.nodes.iter().zip(reports) {
        let pid =
            std::fs::read_to_string(state.join(format!("{}.pid", n.name))).unwrap_or_default();
        let alive = pid
            .trim()
            .parse::<i32>()
            .map(|p| Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(false);
        let (bgp, ready) = match report {
            Ok(r) => (
                format!(
                    "{}/{}",
                    r.peers
                        .iter()
                        .filter(|p| p.fsm_state == "Established")
                        .count(),
                    r.peers.len()
                ),
                match r.ready.reason {
                    None if r.ready.ready => "yes".to_string(),
                    reason => format!("no: {}", reason.unwrap_or_else(|| "starting".into())),
                },
            ),
            Err(e) => ("-".into(), format!("status unavailable: {e:#}")),
        };
        println!(
            "{:<14} {:<12} {:<8} {:<11} {:<9} {ready}",
            n.name,
            n.ip,
            pid.trim(),
            if alive { "running" } else { "NOT RUNNING" },
            bgp
        );
    }
    println!();
    for (k, rr) in lab.reflector_names().iter().enumerate() {
        println!(
            "== route reflector {rr} ({}, cluster id {CLUSTER_ID}; margay status)",
            reflector_ip(k)
        );
        print_output(ns_exec(rr, &[&margay_s, "status", "--endpoint", RR_HTTP]));
        println!();
    }
    if let Some(rtr) = &lab.router {
        println!("== outside router {rtr} ({ROUTER_IP}, AS {ROUTER_AS}; birdc show route)");
        let ctl = router_ctl(&args.state(), &args.name);
        print_output(
            Command::new("birdc")
                .arg("-s")
                .arg(&ctl)
                .args(["show", "route"])
                .output(),
        );
        println!();
    }
    // A big lab's peer tables (N x N lines in a mesh) would bury the rest: the table above counts them.
    for n in lab.nodes.iter().take(if lab.nodes.len() > 10 {
        0
    } else {
        lab.nodes.len()
    }) {
        println!("== BGP peers of {} (margay status)", n.name);
        print_output(ns_exec(&n.name, &[&margay_s, "status"]));
        println!();
    }
    if let Some(n) = lab.nodes.first() {
        println!("== IPAM blocks");
        let client = format!("http://{ETCD_IP}:2379");
        match ns_exec(
            &n.name,
            &[
                &margay_s,
                "ipam",
                "show",
                "--show-blocks",
                "--etcd-endpoints",
                &client,
            ],
        ) {
            Ok(o) => print!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => println!("  unavailable: {e}"),
        }
        println!();
    }
    println!("== pods");
    println!("{:<16} {:<14} ADDRESS", "POD", "NODE");
    for p in &lab.pods {
        println!(
            "{:<16} {:<14} {}",
            p.name,
            p.node,
            p.ip.map(|a| a.to_string()).unwrap_or_else(|| "-".into())
        );
    }
    println!();
    let matrix = reach(&lab.pods);
    if lab.pods.len() > FULL_MATRIX_PODS {
        let failed: Vec<String> = matrix
            .iter()
            .filter(|(_, ok)| !**ok)
            .map(|((a, b), _)| format!("  {a} -> {b}: FAIL"))
            .collect();
        println!(
            "== pings around a ring of the {} pods (each to the next pod on another node)",
            lab.pods.len()
        );
        for f in &failed {
            println!("{f}");
        }
        println!(
            "\n{} of {} ring pings answered",
            matrix.len() - failed.len(),
            matrix.len()
        );
        return Ok(failed.is_empty());
    }
    println!("== ping matrix (row pings column; ok / FAIL)");
    print!("{:<16}", "");
    for b in &lab.pods {
        print!(" {:>12}", b.name);
    }
    println!();
    for a in &lab.pods {
        print!("{:<16}", a.name);
        for b in &lab.pods {
            let cell = if a.name == b.name {
                "-"
            } else if matrix.get(&(a.name.clone(), b.name.clone())) == Some(&true) {
                "ok"
            } else {
                "FAIL"
            };
            print!(" {cell:>12}");
        }
        println!();
    }
    let failed = matrix.values().filter(|ok| !**ok).count();
    println!(
        "\n{} of {} pod pairs reachable",
        matrix.len() - failed,
        matrix.len()
    );
    Ok(failed == 0)
}

/// A command's output, or why it is unavailable (its stderr, or the error starting it).
fn print_output(out: std::io::Result<std::process::Output>) {
    match out {
        Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
        Ok(o) => println!(
            "  unavailable: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => println!("  unavailable: {e}"),
    }
}
