//! Running things in the lab's namespaces: `ip`, commands inside a namespace, daemons started in one,
//! waiting for a condition.

#[allow(unused_imports)]
use super::*;

pub(super) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (install iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `ip netns exec NS cmd...`, captured.
pub(super) fn ns_exec(ns: &str, cmd: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
}

pub(super) fn sibling(bin: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the margay binary")?;
    let p = exe.with_file_name(bin);
    if !p.exists() {
        bail!(
            "{} not found beside {} (build it: cargo build --bins)",
            p.display(),
            exe.display()
        );
    }
    Ok(p)
}

pub(super) fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Start a long-running process inside `ns` in its own process group (so the terminal's Ctrl-C of `lab up`
/// does not reach it), logging to `log`, and record its PID in `<state>/<tag>.pid`.
pub(super) fn spawn_in(
    state: &Path,
    ns: &str,
    tag: &str,
    cmd: &[&str],
    env: &[(&str, String)],
) -> anyhow::Result<u32> {
    let log = std::fs::File::create(state.join(format!("{tag}.log")))?;
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns])
        .args(cmd)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0);
    for (k, v) in env {
        c.env(k, v);
    }
    let child = c
        .spawn()
        .with_context(|| format!("starting {} in {ns}", cmd[0]))?;
    // `ip netns exec` execs the command, so this PID is the process itself.
    std::fs::write(state.join(format!("{tag}.pid")), child.id().to_string())?;
    Ok(child.id())
}

pub(super) fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}
