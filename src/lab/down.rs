//! `margay lab down`: stop what the lab started and delete its namespaces, also after a crash.

#[allow(unused_imports)]
use super::*;

/// Stop the lab's processes (by the PIDs it recorded, then any process left in its namespaces) and delete
/// its namespaces and state. Works on a half-built lab too.
pub(super) fn down(args: &LabArgs) -> anyhow::Result<()> {
    let state = args.state();
    let prefix = format!("{}-", args.name);
    let namespaces: Vec<String> = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default();
    let mut pids: Vec<i32> = Vec::new();
    if let Ok(d) = std::fs::read_dir(&state) {
        for e in d.flatten() {
            if e.path().extension().is_some_and(|x| x == "pid") {
                if let Ok(p) = std::fs::read_to_string(e.path()) {
                    pids.extend(p.trim().parse::<i32>().ok());
                }
            }
        }
    }
    for ns in &namespaces {
        if let Ok(o) = Command::new("ip").args(["netns", "pids", ns]).output() {
            pids.extend(
                String::from_utf8_lossy(&o.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<i32>().ok()),
            );
        }
    }
    pids.sort_unstable();
    pids.dedup();
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGTERM);
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3)
        && pids.iter().any(|p| kill(Pid::from_raw(*p), None).is_ok())
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    for p in &pids {
        let _ = kill(Pid::from_raw(*p), Signal::SIGKILL);
    }
    let mut errors = Vec::new();
    for ns in &namespaces {
        if let Err(e) = ip(&["netns", "del", ns]) {
            errors.push(e.to_string());
        }
    }
    if state.exists() {
        if let Err(e) = std::fs::remove_dir_all(&state) {
            errors.push(format!("removing {}: {e}", state.display()));
        }
    }
    println!(
        "lab {:?} down: {} processes stopped, {} namespaces deleted",
        args.name,
        pids.len(),
        namespaces.len()
    );
    if !errors.is_empty() {
        bail!("{}", errors.join("; "));
    }
    Ok(())
}
