//! `margay lab status`: every node's status, the blocks, the pods and the ping matrix.

#[allow(unused_imports)]
use super::*;

/// (from pod, to pod) -> reachable, every ordered pair of distinct pods, pinged in parallel.
pub(super) fn ping_matrix(pods: &[LabPod]) -> BTreeMap<(String, String), bool> {
    let mut children = Vec::new();
    for a in pods {
        for b in pods {
            if a.name == b.name {
                continue;
            }
            let Some(dst) = b.ip else {
                children.push(((a.name.clone(), b.name.clone()), None));
                continue;
            };
            let c = Command::new("ip")
                .args(["netns", "exec", &a.name, "ping", "-c", "1", "-W", "1", "-q"])
                .arg(dst.to_string())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok();
            children.push(((a.name.clone(), b.name.clone()), c));
        }
    }
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

/// Print the lab; true when every pod reaches every other pod.
pub(super) fn status(args: &LabArgs) -> anyhow::Result<bool> {
    let state = args.state();
    let lab = load(&state)?;
    let margay = std::env::current_exe()?;
    let margay_s = margay.to_string_lossy().to_string();
    println!("== nodes");
    println!("{:<14} {:<12} {:<8} ready", "NODE", "ADDRESS", "PID");
    for n in &lab.nodes {
        let pid =
            std::fs::read_to_string(state.join(format!("{}.pid", n.name))).unwrap_or_default();
        let alive = pid
            .trim()
            .parse::<i32>()
            .map(|p| Path::new(&format!("/proc/{p}")).exists())
            .unwrap_or(false);
        println!(
            "{:<14} {:<12} {:<8} {}",
            n.name,
            n.ip,
            pid.trim(),
            if alive { "running" } else { "NOT RUNNING" }
        );
    }
    println!();
    if let Some(rr) = &lab.reflector {
        println!(
            "== route reflector {rr} ({REFLECTOR_IP}, cluster id {CLUSTER_ID}; margay status)"
        );
        match ns_exec(rr, &[&margay_s, "status", "--endpoint", RR_HTTP]) {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => println!(
                "  unavailable: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => println!("  unavailable: {e}"),
        }
        println!();
    }
    if let Some(rtr) = &lab.router {
        println!("== outside router {rtr} ({ROUTER_IP}, AS {ROUTER_AS}; birdc show route)");
        let ctl = router_ctl(&args.state(), &args.name);
        match Command::new("birdc")
            .arg("-s")
            .arg(&ctl)
            .args(["show", "route"])
            .output()
        {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => println!(
                "  unavailable: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => println!("  unavailable: {e}"),
        }
        println!();
    }
    for n in &lab.nodes {
        println!("== BGP peers of {} (margay status)", n.name);
        match ns_exec(&n.name, &[&margay_s, "status"]) {
            Ok(o) if o.status.success() => print!("{}", String::from_utf8_lossy(&o.stdout)),
            Ok(o) => println!(
                "  unavailable: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => println!("  unavailable: {e}"),
        }
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
    let matrix = ping_matrix(&lab.pods);
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
