//! What `margay lab` does to a running lab: remove or restart a node, add a pod through the real
//! `margay-cni`, and the state file that remembers it all.

#[allow(unused_imports)]
use super::*;

/// A node leaves the lab: its daemon stops, then `margay node remove` (run in another node's namespace,
/// which reaches etcd) deletes it from the datastore.
pub(super) fn remove_node(args: &LabArgs, node: &str) -> anyhow::Result<()> {
    let state = args.state();
    let mut lab = load(&state)?;
    if !lab.nodes.iter().any(|n| n.name == node) {
        bail!("no node {node:?} in lab {:?}", args.name);
    }
    stop_pid_file(
        &state.join(format!("{node}.pid")),
        &format!("{node}'s daemon"),
    )?;
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let out = ns_exec(
        &format!("{}-etcd", args.name),
        &[&margay, "node", "remove", node, "--etcd-endpoints", &client],
    )?;
    if !out.status.success() {
        bail!(
            "margay node remove {node}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    print!("{}", String::from_utf8_lossy(&out.stdout));
    let _ = std::fs::remove_file(state.join(format!("{node}.pid")));
    lab.nodes.retain(|n| n.name != node);
    lab.pods.retain(|p| p.node != node);
    save(&state, &lab)?;
    Ok(())
}

/// Stop a node's daemon with SIGTERM (as a DaemonSet update does) and start it again.
pub(super) fn restart_node(args: &LabArgs, node: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let state = args.state();
    let lab = load(&state)?;
    if let Some(k) = lab.reflector_names().iter().position(|r| r == node) {
        return restart_reflector(&state, node, reflector_ip(k));
    }
    let Some(n) = lab.nodes.iter().find(|n| n.name == node) else {
        bail!(
            "no node {node:?} in lab {:?} (nodes: {})",
            args.name,
            lab.nodes
                .iter()
                .map(|n| n.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    let pid_file = state.join(format!("{node}.pid"));
    if let Some(pid) = std::fs::read_to_string(&pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    {
        let pid = Pid::from_raw(pid);
        if kill(pid, Signal::SIGTERM).is_ok() {
            wait_until(
                &format!("{node}'s daemon to stop"),
                Duration::from_secs(10),
                || kill(pid, None).is_err(),
            )?;
        }
    }
    let suffix = format!(
        ".restart-{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    );
    let pid = start_node(&state, &n.name, n.ip, &n.socket, &suffix)?;
    println!(
        "{node}: daemon restarted (pid {pid}, log {}{suffix}.log)",
        state.join(node).display()
    );
    Ok(())
}

/// `restart-node` for the lab's route reflector: stop it (if it still runs), keep its log under a
/// timestamped name, start it again (it finds its run marker and announces the restart, RFC 4724 R bit).
fn restart_reflector(state: &Path, rr: &str, router_id: Ipv4Addr) -> anyhow::Result<()> {
    stop_pid_file(&state.join(format!("{rr}.pid")), &format!("reflector {rr}"))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    // Best effort: a missing log only means nothing to keep.
    let _ = std::fs::rename(
        state.join(format!("{rr}.log")),
        state.join(format!("{rr}.before-{stamp}.log")),
    );
    let pid = start_reflector(state, rr, router_id)?;
    println!("{rr}: reflector restarted (pid {pid})");
    Ok(())
}

/// ADD one pod through margay-cni, run inside the node's namespace as the node's runtime would.
pub(super) fn cni_add(
    node: &str,
    pod: &str,
    bin_dir: &Path,
    conf: &serde_json::Value,
) -> anyhow::Result<Ipv4Addr> {
    let plugin = bin_dir.join("margay");
    let mut child = Command::new("ip")
        .args(["netns", "exec", node])
        .arg(&plugin)
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", pod)
        .env("CNI_NETNS", format!("/var/run/netns/{pod}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_dir)
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=lab;K8S_POD_NAME={pod}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(&serde_json::to_vec(conf)?)?;
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "margay-cni ADD for pod {pod} on {node} failed: {} {}",
            text.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let result: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("margay-cni printed {text:?}"))?;
    let addr = result
        .pointer("/ips/0/address")
        .and_then(|a| a.as_str())
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse::<Ipv4Addr>().ok());
    match addr {
        Some(a) => Ok(a),
        None => bail!("margay-cni ADD for pod {pod} returned no IPv4 address: {text}"),
    }
}

pub(super) fn save(state: &Path, lab: &LabState) -> anyhow::Result<()> {
    std::fs::write(state.join("lab.json"), serde_json::to_vec_pretty(lab)?)?;
    Ok(())
}

pub(super) fn load(state: &Path) -> anyhow::Result<LabState> {
    let p = state.join("lab.json");
    let text = std::fs::read(&p)
        .with_context(|| format!("no lab state at {} (is the lab up?)", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is damaged", p.display()))
}
