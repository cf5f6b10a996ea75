//! `margay lab up`: the bridge (or the router of `--subnets 2`), etcd, the nodes, the optional reflector,
//! the pods.

#[allow(unused_imports)]
use super::*;

pub(super) fn up(
    args: &LabArgs,
    n_nodes: usize,
    n_pods: usize,
    reflector: bool,
    subnets: usize,
    outside_router: bool,
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
    if outside_router {
        // The peer first, so every node starts with it; BIRD before the nodes, so their sessions come up
        // at the first attempt.
        write_router_peer(&state, &etcd_ns)?;
        let ips: Vec<Ipv4Addr> = (1..=n_nodes)
            .map(|i| Ipv4Addr::new(10, 99, 0, 10 + i as u8))
            .collect();
        lab.router = Some(start_router(&state, p, &ips, &attach)?);
        save(&state, &lab)?;
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
pub(super) fn start_node(
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
pub(super) fn start_etcd(state: &Path, etcd_ns: &str) -> anyhow::Result<()> {
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
pub(super) fn write_crosssubnet_pool(state: &Path, etcd_ns: &str) -> anyhow::Result<()> {
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

pub(super) fn write_reflector_resources(
    state: &Path,
    etcd_ns: &str,
    rr: &str,
) -> anyhow::Result<()> {
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
pub(super) fn start_reflector(state: &Path, rr: &str) -> anyhow::Result<u32> {
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
pub(super) fn stop_pid_file(pid_file: &Path, what: &str) -> anyhow::Result<()> {
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
