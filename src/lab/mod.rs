//! `margay lab up/status/restart-node/remove-node/etcd/down`: the local lab. Everything lives in network
//! namespaces named `<name>-*` (default `mgl`), and the PIDs and addresses in a state directory, so `down`
//! removes it all, also after a crash of `up`.
//!
//! ```text
//!   netns mgl-br: bridge br0 10.99.0.1/24
//!     |-- mgl-etcd  eth0 10.99.0.2   etcd (client port 2379)
//!     |-- mgl-rr    eth0 10.99.0.3   margay reflector (only with --reflector)
//!     |-- mgl-n1    eth0 10.99.0.11  margay node run ──CNI socket── margay-cni ──▶ pods mgl-n1p1, mgl-n1p2
//!     |-- mgl-n2    eth0 10.99.0.12  margay node run                                pods mgl-n2p1, ...
//!     `-- mgl-n3    eth0 10.99.0.13  margay node run                                pods mgl-n3p1, ...
//!   full iBGP mesh between the nodes (AS 64512); pod addresses from the pool 10.244.0.0/16 in /26 blocks
//!   --subnets 2: mgl-br also holds br1 10.99.1.1/24 and routes between the segments (no pod route);
//!   nodes alternate: n1 10.99.0.11, n2 10.99.1.12, n3 10.99.0.13, ...; pool vxlanMode CrossSubnet
//!   --reflector: mesh off, every node peers only with mgl-rr (Calico's resources, written into etcd:
//!   BGPConfiguration nodeToNodeMeshEnabled false, Node mgl-rr with routeReflectorClusterID 244.0.0.1 and
//!   label route-reflector, BGPPeer nodeSelector all() / peerSelector has(route-reflector))
//! ```
//!
//! Pods are plumbed by executing the real `margay-cni` binary, installed as `margay` in the lab's CNI bin
//! directory, with the CNI_* environment and the network configuration on stdin, inside the node's
//! namespace: exactly what a container runtime on that node does.

pub mod preflight;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// `margay lab ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum LabCmd {
    /// Bring the lab up, plumb the pods, print the status (and ping matrix); leaves it running.
    Up {
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        #[arg(long, default_value_t = 2)]
        pods: usize,
        /// Mesh off: a route reflector (`margay reflector` against the lab's etcd) in its own namespace, and
        /// every node peering only with it (BGPPeer nodeSelector all(), peerSelector has(route-reflector)).
        #[arg(long)]
        reflector: bool,
        /// L2 segments (1 or 2). With 2, the bridge namespace becomes a router between 10.99.0.0/24 and
        /// 10.99.1.0/24 that knows no pod route; nodes alternate between the segments (n1 on the first, n2
        /// on the second, ...), and the default pool gets `vxlanMode: CrossSubnet` so pods reach each other.
        #[arg(long, default_value_t = 1)]
        subnets: usize,
        #[command(flatten)]
        common: LabArgs,
    },
    /// Print nodes, peers, blocks, pods and the ping matrix. Exits non-zero if a ping fails.
    Status {
        #[command(flatten)]
        common: LabArgs,
    },
    /// Stop one node's daemon with SIGTERM and start it again (its pods and kernel routes stay).
    RestartNode {
        node: String,
        #[command(flatten)]
        common: LabArgs,
    },
    /// A node leaves: stop its daemon (SIGTERM) and remove it from the datastore (`margay node remove`:
    /// its Node resource, affinities, blocks and addresses). Its namespace and pods stay for inspection.
    RemoveNode {
        node: String,
        #[command(flatten)]
        common: LabArgs,
    },
    /// Stop (SIGTERM) or start the lab's etcd, to see how the nodes and margay-cni behave without it.
    Etcd {
        #[arg(value_parser = ["stop", "start"])]
        action: String,
        #[command(flatten)]
        common: LabArgs,
    },
    /// Remove every namespace and process of the lab.
    Down {
        #[command(flatten)]
        common: LabArgs,
    },
}

/// Options every lab command shares.
#[derive(Debug, Clone, clap::Args)]
pub struct LabArgs {
    /// Prefix of the lab's namespaces (several labs can run side by side with different names).
    #[arg(long, default_value = "mgl")]
    pub name: String,
    /// Where the lab keeps its state (PIDs, logs, etcd data); default /run/margay-lab/<name>.
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

impl LabArgs {
    fn state(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("/run/margay-lab").join(&self.name))
    }
}

const BRIDGE_IP: &str = "10.99.0.1";
/// The router's address on the second segment (`--subnets 2`).
const BRIDGE_IP_B: &str = "10.99.1.1";
const ETCD_IP: &str = "10.99.0.2";
const REFLECTOR_IP: &str = "10.99.0.3";
/// The reflector's cluster id (Calico's documentation uses this one too).
const CLUSTER_ID: &str = "244.0.0.1";
/// The label that makes a Node a route reflector for the lab's BGPPeer.
const RR_LABEL: &str = "route-reflector";
/// The reflector's HTTP endpoint, inside its namespace.
const RR_HTTP: &str = "127.0.0.1:9190";
const POOL: &str = "10.244.0.0/16";
const NETWORK: &str = "k8s-pod-network";

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabNode {
    name: String,
    ip: Ipv4Addr,
    socket: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct LabPod {
    name: String,
    node: String,
    ip: Option<Ipv4Addr>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LabState {
    nodes: Vec<LabNode>,
    pods: Vec<LabPod>,
    /// The route reflector's namespace (also its Node name), when the lab runs with `--reflector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reflector: Option<String>,
}

/// Run a lab command.
pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            nodes,
            pods,
            reflector,
            subnets,
            common,
        } => {
            if !(1..=50).contains(&nodes) {
                bail!("--nodes must be between 1 and 50");
            }
            // Before anything is built, so a machine that cannot run the lab is told why and left untouched.
            let missing = preflight::check(&format!("{}-pre", common.name));
            if !missing.is_empty() {
                let list: Vec<String> = missing.iter().map(|m| format!("  - {m}")).collect();
                bail!("this machine cannot run the lab:\n{}", list.join("\n"));
            }
            if !(1..=2).contains(&subnets) {
                bail!("--subnets must be 1 or 2");
            }
            if let Err(e) = up(&common, nodes, pods, reflector, subnets) {
                eprintln!("margay lab: bring-up failed; the lab is left as it is for inspection (logs in {}); `margay lab down --name {}` removes it", common.state().display(), common.name);
                return Err(e);
            }
            let ok = status(&common)?;
            if !ok {
                bail!("some pods cannot reach each other (see the ping matrix)");
            }
            Ok(())
        }
        LabCmd::Status { common } => {
            if !status(&common)? {
                bail!("some pods cannot reach each other (see the ping matrix)");
            }
            Ok(())
        }
        LabCmd::RestartNode { node, common } => restart_node(&common, &node),
        LabCmd::RemoveNode { node, common } => remove_node(&common, &node),
        LabCmd::Etcd { action, common } => {
            let state = common.state();
            if action == "stop" {
                stop_pid_file(&state.join("etcd.pid"), "etcd")?;
                println!("etcd of lab {:?} stopped", common.name);
            } else {
                start_etcd(&state, &format!("{}-etcd", common.name))?;
                println!("etcd of lab {:?} running", common.name);
            }
            Ok(())
        }
        LabCmd::Down { common } => down(&common),
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
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
fn ns_exec(ns: &str, cmd: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("ip")
        .args(["netns", "exec", ns])
        .args(cmd)
        .output()
}

fn sibling(bin: &str) -> anyhow::Result<PathBuf> {
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

fn which(bin: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(bin).is_file()))
        .unwrap_or(false)
}

/// Start a long-running process inside `ns` in its own process group (so the terminal's Ctrl-C of `lab up`
/// does not reach it), logging to `log`, and record its PID in `<state>/<tag>.pid`.
fn spawn_in(
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

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let t = Instant::now();
    while t.elapsed() < timeout {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn up(
    args: &LabArgs,
    n_nodes: usize,
    n_pods: usize,
    reflector: bool,
    subnets: usize,
) -> anyhow::Result<()> {
    for (bin, pkg) in [
        ("ip", "iproute2"),
        ("etcd", "etcd-server"),
        ("ping", "iputils-ping"),
    ] {
        if !which(bin) {
            bail!("{bin} not found on PATH: apt-get install {pkg} (scripts/install-deps.sh installs everything)");
        }
    }
    let cni = sibling("margay-cni")?;
    let p = &args.name;
    let state = args.state();
    if state.join("lab.json").exists() || Path::new(&format!("/var/run/netns/{p}-br")).exists() {
        bail!("lab {p:?} is already up (or left over): `margay lab down --name {p}` first");
    }
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    // The CNI bin dir: the runtime executes the plugin named by the configuration's `type`.
    let bin_dir = state.join("cni-bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::os::unix::fs::symlink(&cni, bin_dir.join("margay"))
        .with_context(|| format!("linking {} into {}", cni.display(), bin_dir.display()))?;

    let br = format!("{p}-br");
    ip(&["netns", "add", &br])?;
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &br,
        "addr",
        "add",
        &format!("{BRIDGE_IP}/24"),
        "dev",
        "br0",
    ])?;
    ip(&["-n", &br, "link", "set", "br0", "up"])?;
    if subnets > 1 {
        // The second segment: the bridge namespace routes between the two (and knows no pod route).
        ip(&["-n", &br, "link", "add", "br1", "type", "bridge"])?;
        ip(&[
            "-n",
            &br,
            "addr",
            "add",
            &format!("{BRIDGE_IP_B}/24"),
            "dev",
            "br1",
        ])?;
        ip(&["-n", &br, "link", "set", "br1", "up"])?;
        crate::dataplane::sysctl::ensure_node(Some(Path::new(&format!("/var/run/netns/{br}"))))?;
    }
    let attach_to = |ns: &str, port: &str, addr: &str, segment: usize| -> anyhow::Result<()> {
        let (bridge, gateway) = if segment == 0 {
            ("br0", BRIDGE_IP)
        } else {
            ("br1", BRIDGE_IP_B)
        };
        ip(&["netns", "add", ns])?;
        ip(&[
            "-n", &br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ])?;
        ip(&["-n", &br, "link", "set", port, "master", bridge, "up"])?;
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
        // A default route: proxy ARP for the pods' gateway 169.254.1.1 needs a route covering it.
        ip(&["-n", ns, "route", "add", "default", "via", gateway])?;
        Ok(())
    };
    let attach = |ns: &str, port: &str, addr: &str| attach_to(ns, port, addr, 0);

    let etcd_ns = format!("{p}-etcd");
    attach(&etcd_ns, "etcd", ETCD_IP)?;
    start_etcd(&state, &etcd_ns)?;

    let mut lab = LabState::default();
    if reflector {
        let rr = format!("{p}-rr");
        attach(&rr, "rr", REFLECTOR_IP)?;
        write_reflector_resources(&state, &etcd_ns, &rr)?;
        start_reflector(&state, &rr)?;
        lab.reflector = Some(rr);
        save(&state, &lab)?;
    }
    if subnets > 1 {
        write_crosssubnet_pool(&state, &etcd_ns)?;
    }
    for i in 1..=n_nodes {
        let name = format!("{p}-n{i}");
        let segment = (i - 1) % subnets;
        let addr: Ipv4Addr = format!("10.99.{segment}.{}", 10 + i).parse()?;
        attach_to(&name, &format!("n{i}"), &addr.to_string(), segment)?;
        let socket = state.join(&name).join("cni.sock");
        start_node(&state, &name, addr, &socket, "")?;
        lab.nodes.push(LabNode {
            name,
            ip: addr,
            socket,
        });
        save(&state, &lab)?;
    }
    for node in &lab.nodes {
        let log = state.join(format!("{}.log", node.name));
        wait_until(
            &format!("{}'s CNI socket (log: {})", node.name, log.display()),
            Duration::from_secs(30),
            || node.socket.exists(),
        )?;
    }

    let conf_path = state.join("10-margay.conf");
    for node in lab.nodes.clone() {
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "margay",
            "socket": node.socket,
            "log_file": state.join(format!("{}-cni.log", node.name)),
        });
        std::fs::write(&conf_path, serde_json::to_vec_pretty(&conf)?)?;
        for j in 1..=n_pods {
            let pod = format!("{}p{j}", node.name);
            ip(&["netns", "add", &pod])?;
            lab.pods.push(LabPod {
                name: pod.clone(),
                node: node.name.clone(),
                ip: None,
            });
            save(&state, &lab)?;
            let ip = cni_add(&node.name, &pod, &bin_dir, &conf)?;
            if let Some(last) = lab.pods.last_mut() {
                last.ip = Some(ip);
            }
            save(&state, &lab)?;
        }
    }
    // Converged when every pod reaches every other pod (routes travel over BGP).
    let pods = lab.pods.clone();
    if pods.len() > 1 {
        let _ = wait_until(
            "the pods to reach each other",
            Duration::from_secs(30),
            || ping_matrix(&pods).iter().all(|(_, ok)| *ok),
        );
    }
    Ok(())
}

/// Start `margay node run` for a lab node in its namespace; `log_suffix` keeps a restart's log apart.
fn start_node(
    state: &Path,
    name: &str,
    addr: Ipv4Addr,
    socket: &Path,
    log_suffix: &str,
) -> anyhow::Result<u32> {
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let socket_s = socket.to_string_lossy().to_string();
    let addr_s = addr.to_string();
    let pid = spawn_in(
        state,
        name,
        &format!("{name}{log_suffix}"),
        &[
            &margay,
            "node",
            "run",
            "--node-name",
            name,
            "--ip",
            &addr_s,
            "--etcd-endpoints",
            &client,
            "--cni-socket",
            &socket_s,
            "--http-listen",
            crate::api::DEFAULT_LISTEN,
        ],
        &[
            ("MARGAY_IPV4POOL_CIDR", POOL.to_string()),
            (
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            ),
        ],
    )?;
    if !log_suffix.is_empty() {
        // The PID file is named after the node, whatever the log.
        std::fs::rename(
            state.join(format!("{name}{log_suffix}.pid")),
            state.join(format!("{name}.pid")),
        )?;
    }
    Ok(pid)
}

/// Start the lab's etcd in its namespace (data in the state directory, so a restart keeps it) and wait
/// until it answers.
fn start_etcd(state: &Path, etcd_ns: &str) -> anyhow::Result<()> {
    let client = format!("http://{ETCD_IP}:2379");
    let data = state.join("etcd-data");
    let data_s = data.to_string_lossy().to_string();
    spawn_in(
        state,
        etcd_ns,
        "etcd",
        &[
            "etcd",
            "--name",
            "lab",
            "--data-dir",
            &data_s,
            "--listen-client-urls",
            &client,
            "--advertise-client-urls",
            &client,
            "--listen-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-advertise-peer-urls",
            "http://127.0.0.1:2380",
            "--initial-cluster",
            "lab=http://127.0.0.1:2380",
            "--initial-cluster-state",
            "new",
            "--log-level",
            "warn",
        ],
        &[],
    )?;
    wait_until("etcd to answer", Duration::from_secs(20), || {
        ns_exec(
            etcd_ns,
            &["etcdctl", "--endpoints", &client, "endpoint", "health"],
        )
        .map(|o| o.status.success())
        .unwrap_or(false)
    })
}

/// The Calico resources of a reflector topology (Calico's confd peering rules), applied with `margay apply` as an operator
/// would (the file stays in the state directory): the mesh off, the reflector's Node with its cluster id and
/// label, and one BGPPeer that makes every node peer with every labelled Node.
/// `--subnets 2`: the default pool, written before any node starts, with VXLAN across subnets (the router
/// between the segments knows no pod route).
fn write_crosssubnet_pool(state: &Path, etcd_ns: &str) -> anyhow::Result<()> {
    let api = crate::config::API_VERSION;
    let doc = format!(
        "apiVersion: {api}
kind: IPPool
metadata:
  name: default-ipv4-ippool
spec:
  cidr: {POOL}
  blockSize: 26
  natOutgoing: true
  vxlanMode: CrossSubnet
  nodeSelector: all()
"
    );
    let file = state.join("pool.yaml");
    std::fs::write(&file, doc).with_context(|| format!("writing {}", file.display()))?;
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let file_s = file.to_string_lossy().to_string();
    let out = ns_exec(
        etcd_ns,
        &[&margay, "apply", "-f", &file_s, "--etcd-endpoints", &client],
    )?;
    if !out.status.success() {
        bail!(
            "margay apply -f {file_s}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn write_reflector_resources(state: &Path, etcd_ns: &str, rr: &str) -> anyhow::Result<()> {
    let api = crate::config::API_VERSION;
    let doc = format!(
        "apiVersion: {api}
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
---
apiVersion: {api}
kind: Node
metadata:
  name: {rr}
  labels:
    {RR_LABEL}: \"true\"
spec:
  bgp:
    ipv4Address: {REFLECTOR_IP}/24
    routeReflectorClusterID: {CLUSTER_ID}
---
apiVersion: {api}
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: has({RR_LABEL})
"
    );
    let file = state.join("reflector-resources.yaml");
    std::fs::write(&file, doc).with_context(|| format!("writing {}", file.display()))?;
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let file_s = file.to_string_lossy().to_string();
    let out = ns_exec(
        etcd_ns,
        &[&margay, "apply", "-f", &file_s, "--etcd-endpoints", &client],
    )?;
    if !out.status.success() {
        bail!(
            "margay apply -f {file_s}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Start `margay reflector` in its namespace against the lab's etcd.
fn start_reflector(state: &Path, rr: &str) -> anyhow::Result<u32> {
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let rr_state = state.join(rr).to_string_lossy().to_string();
    spawn_in(
        state,
        rr,
        rr,
        &[
            &margay,
            "reflector",
            "--node-name",
            rr,
            "--etcd-endpoints",
            &client,
            "--router-id",
            REFLECTOR_IP,
            "--cluster-id",
            CLUSTER_ID,
            "--state-dir",
            &rr_state,
            "--http-listen",
            RR_HTTP,
        ],
        &[(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
        )],
    )
}

/// SIGTERM the process in a PID file and wait (bounded) until it is gone.
fn stop_pid_file(pid_file: &Path, what: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
    else {
        bail!("no PID for {what} in {}", pid_file.display());
    };
    let pid = Pid::from_raw(pid);
    if kill(pid, Signal::SIGTERM).is_ok() {
        wait_until(&format!("{what} to stop"), Duration::from_secs(10), || {
            kill(pid, None).is_err()
        })?;
    }
    Ok(())
}

/// A node leaves the lab: its daemon stops, then `margay node remove` (run in another node's namespace,
/// which reaches etcd) deletes it from the datastore.
fn remove_node(args: &LabArgs, node: &str) -> anyhow::Result<()> {
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
fn restart_node(args: &LabArgs, node: &str) -> anyhow::Result<()> {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let state = args.state();
    let lab = load(&state)?;
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

/// ADD one pod through margay-cni, run inside the node's namespace as the node's runtime would.
fn cni_add(
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

fn save(state: &Path, lab: &LabState) -> anyhow::Result<()> {
    std::fs::write(state.join("lab.json"), serde_json::to_vec_pretty(lab)?)?;
    Ok(())
}

fn load(state: &Path) -> anyhow::Result<LabState> {
    let p = state.join("lab.json");
    let text = std::fs::read(&p)
        .with_context(|| format!("no lab state at {} (is the lab up?)", p.display()))?;
    serde_json::from_slice(&text).with_context(|| format!("{} is damaged", p.display()))
}

/// (from pod, to pod) -> reachable, every ordered pair of distinct pods, pinged in parallel.
fn ping_matrix(pods: &[LabPod]) -> BTreeMap<(String, String), bool> {
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
fn status(args: &LabArgs) -> anyhow::Result<bool> {
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

/// Stop the lab's processes (by the PIDs it recorded, then any process left in its namespaces) and delete
/// its namespaces and state. Works on a half-built lab too.
fn down(args: &LabArgs) -> anyhow::Result<()> {
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
