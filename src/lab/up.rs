//! `margay lab up`: the bridge (or the router of `--subnets 2`), etcd, the nodes, the optional reflector,
//! the pods.

#[allow(unused_imports)]
use super::*;

pub(super) fn up(
    args: &LabArgs,
    n_nodes: usize,
    n_pods: usize,
    reflectors: usize,
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
    // A unix socket path holds at most 107 bytes (sun_path): say so before anything is built.
    let longest = state
        .join(format!("{p}-n{n_nodes}"))
        .join("cni.sock")
        .as_os_str()
        .len();
    if longest > 107 {
        bail!(
            "the CNI socket paths under {} would be {longest} bytes, over the 107 a unix socket path may hold: use a shorter --state-dir or --name",
            state.display()
        );
    }
    let t0 = Instant::now();
    std::fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    // The CNI bin dir: the runtime executes the plugin named by the configuration's `type`.
    let bin_dir = state.join("cni-bin");
    std::fs::create_dir_all(&bin_dir)?;
    std::os::unix::fs::symlink(&cni, bin_dir.join("margay"))
        .with_context(|| format!("linking {} into {}", cni.display(), bin_dir.display()))?;

    let br = format!("{p}-br");
    BIG_LAB_NO_IPV6.store(n_nodes > IPV6_NODES, std::sync::atomic::Ordering::Relaxed);
    // One segment is a /16 (room for MAX_NODES); two segments are /24s routed by the bridge namespace.
    let plen = if subnets > 1 { 24 } else { 16 };
    ip(&["netns", "add", &br])?;
    if n_nodes > IPV6_NODES {
        ipv6_off(&br)?;
    }
    ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
    ip(&[
        "-n",
        &br,
        "addr",
        "add",
        &format!("{BRIDGE_IP}/{plen}"),
        "dev",
        "br0",
    ])?;
    ip(&[
        "-n",
        &br,
        "link",
        "set",
        "br0",
        "address",
        &mac_of(BRIDGE_IP.parse()?),
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
        ip(&[
            "-n",
            &br,
            "link",
            "set",
            "br1",
            "address",
            &mac_of(BRIDGE_IP_B.parse()?),
        ])?;
        ip(&["-n", &br, "link", "set", "br1", "up"])?;
        crate::dataplane::sysctl::ensure_node(Some(Path::new(&format!("/var/run/netns/{br}"))))?;
    }
    let attach = |ns: &str, port: &str, addr: Ipv4Addr| attach_to(&br, ns, port, addr, plen, 0);

    let etcd_ns = format!("{p}-etcd");
    attach(&etcd_ns, "etcd", ETCD_IP.parse()?)?;
    start_etcd(&state, &etcd_ns)?;

    let mut lab = LabState::default();
    if reflectors > 0 {
        let rrs: Vec<(String, Ipv4Addr)> = (0..reflectors)
            .map(|k| (reflector_name(p, k), reflector_ip(k)))
            .collect();
        for (k, (rr, addr)) in rrs.iter().enumerate() {
            let port = if k == 0 {
                "rr".to_string()
            } else {
                format!("rr{}", k + 1)
            };
            attach(rr, &port, *addr)?;
        }
        write_reflector_resources(&state, &etcd_ns, &rrs, plen)?;
        for (rr, addr) in &rrs {
            start_reflector(&state, rr, *addr)?;
        }
        lab.reflector = rrs.first().map(|(n, _)| n.clone());
        lab.reflectors = rrs.into_iter().map(|(n, _)| n).collect();
        save(&state, &lab)?;
    }
    if subnets > 1 {
        write_crosssubnet_pool(&state, &etcd_ns)?;
    }
    if outside_router {
        // The peer first, so every node starts with it; BIRD before the nodes, so their sessions come up
        // at the first attempt.
        write_router_peer(&state, &etcd_ns)?;
        let ips: Vec<Ipv4Addr> = (1..=n_nodes).map(|i| node_addr(i, subnets).0).collect();
        lab.router = Some(start_router(&state, p, &ips, &attach)?);
        save(&state, &lab)?;
    }
    // Every node's namespace (in parallel: a few `ip` calls each), then every daemon, then one bounded
    // wait for all of them: no per-node sleep, and a slow node does not hold up the start of the others.
    let planned: Vec<(usize, String, Ipv4Addr, usize)> = (1..=n_nodes)
        .map(|i| {
            let (addr, _) = node_addr(i, subnets);
            (i, format!("{p}-n{i}"), addr, (i - 1) % subnets)
        })
        .collect();
    let attached = parallel(&planned, WORKERS, |(i, name, addr, segment)| {
        let plen = node_addr(*i, subnets).1;
        attach_to(&br, name, &format!("n{i}"), *addr, plen, *segment)
    });
    for (r, (_, name, _, _)) in attached.into_iter().zip(&planned) {
        r.with_context(|| format!("building {name}'s namespace"))?;
    }
    let mut members: Vec<(String, Ipv4Addr)> = vec![(etcd_ns.clone(), ETCD_IP.parse()?)];
    members.extend(
        lab.reflector_names()
            .into_iter()
            .enumerate()
            .map(|(k, n)| (n, reflector_ip(k))),
    );
    members.extend(planned.iter().map(|(_, n, a, _)| (n.clone(), *a)));
    pin_neighbours(&br, &members, &members, subnets)?;
    let t_ns = t0.elapsed();
    for (_, name, addr, _) in &planned {
        let socket = state.join(name).join("cni.sock");
        start_node(&state, name, *addr, &socket, "")?;
        lab.nodes.push(LabNode {
            name: name.clone(),
            ip: *addr,
            socket,
        });
    }
    save(&state, &lab)?;
    let bound = Duration::from_secs(60) + Duration::from_millis(500) * n_nodes as u32;
    wait_sockets(&state, &lab.nodes, bound)?;
    let t_nodes = t0.elapsed();

    let conf_for = |node: &LabNode| {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": NETWORK,
            "type": "margay",
            "socket": node.socket,
            "log_file": state.join(format!("{}-cni.log", node.name)),
        })
    };
    if let Some(last) = lab.nodes.last() {
        // What a runtime on a node would read (the last node's; each node's differs only in its socket).
        let conf_path = state.join("10-margay.conf");
        std::fs::write(&conf_path, serde_json::to_vec_pretty(&conf_for(last))?)?;
    }
    // Each node's pods in order, nodes in parallel (as kubelets on different machines would).
    let added = parallel(&lab.nodes, WORKERS, |node| {
        let conf = conf_for(node);
        let mut pods = Vec::new();
        for j in 1..=n_pods {
            let pod = format!("{}p{j}", node.name);
            if let Err(e) = ip(&["netns", "add", &pod]) {
                return (pods, Some(e));
            }
            match cni_add(&node.name, &pod, &bin_dir, &conf) {
                Ok(a) => pods.push(LabPod {
                    name: pod,
                    node: node.name.clone(),
                    ip: Some(a),
                }),
                Err(e) => return (pods, Some(e)),
            }
        }
        (pods, None)
    });
    let mut failed = None;
    for (pods, err) in added {
        lab.pods.extend(pods);
        failed = failed.or(err);
    }
    save(&state, &lab)?;
    if let Some(e) = failed {
        return Err(e);
    }
    let t_pods = t0.elapsed();
    // Converged when the pods reach each other (routes travel over BGP): every pair in a small lab, a
    // ring (each pod to the next node's) in a big one.
    let pods = lab.pods.clone();
    if pods.len() > 1 {
        let _ = wait_until(
            "the pods to reach each other",
            Duration::from_secs(30) + Duration::from_millis(300) * n_nodes as u32,
            || reach(&pods).iter().all(|(_, ok)| *ok),
        );
    }
    let not_ready = wait_ready(&lab, bound);
    println!(
        "lab {p:?}: {n_nodes} nodes, {} reflectors, {} pods; namespaces {:.1} s, every CNI socket {:.1} s, pods {:.1} s, ready {:.1} s after the start",
        reflectors,
        lab.pods.len(),
        t_ns.as_secs_f64(),
        t_nodes.as_secs_f64(),
        t_pods.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
    if !not_ready.is_empty() {
        eprintln!(
            "margay lab: {} of {n_nodes} nodes not ready after {bound:?}:\n{}",
            not_ready.len(),
            not_ready.join("\n")
        );
    }
    Ok(())
}

/// Worker threads for the lab's parallel set-up steps (each step mostly waits for `ip` or the kernel).
const WORKERS: usize = 8;

/// `f` over `items` on up to `workers` threads; the results in the items' order.
pub(super) fn parallel<T: Sync, R: Send>(
    items: &[T],
    workers: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<R> {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let next = AtomicUsize::new(0);
    let mut out: Vec<(usize, R)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers.clamp(1, items.len().max(1)))
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(item) = items.get(i) else { break };
                        mine.push((i, f(item)));
                    }
                    mine
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(v) => v,
                Err(p) => std::panic::resume_unwind(p),
            })
            .collect()
    });
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// A namespace `ns` on the lab's bridge (`br0`, or `br1` for segment 1) through the veth `port`, with
/// `addr/plen` and a default route via the bridge.
pub(super) fn attach_to(
    br: &str,
    ns: &str,
    port: &str,
    addr: Ipv4Addr,
    plen: u8,
    segment: usize,
) -> anyhow::Result<()> {
    let (bridge, gateway) = if segment == 0 {
        ("br0", BRIDGE_IP)
    } else {
        ("br1", BRIDGE_IP_B)
    };
    ip(&["netns", "add", ns])?;
    if BIG_LAB_NO_IPV6.load(std::sync::atomic::Ordering::Relaxed) {
        ipv6_off(ns)?;
    }
    let mac = mac_of(addr);
    ip(&[
        "-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "address", &mac,
        "netns", ns,
    ])?;
    ip(&["-n", br, "link", "set", port, "master", bridge, "up"])?;
    ip(&[
        "-n",
        ns,
        "addr",
        "add",
        &format!("{addr}/{plen}"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", ns, "link", "set", "lo", "up"])?;
    ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    // A default route: proxy ARP for the pods' gateway 169.254.1.1 needs a route covering it.
    ip(&["-n", ns, "route", "add", "default", "via", gateway])?;
    Ok(())
}

/// Set by `up` for a big lab (more than [`IPV6_NODES`] nodes): its namespaces run without IPv6.
pub(super) static BIG_LAB_NO_IPV6: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// Above this many nodes the lab's namespaces (bridge, etcd, reflectors, nodes; not the pods) run without
/// IPv6: every interface's IPv6 (link-local addresses, router solicitations, multicast listener reports)
/// fills the kernel's one neighbour-discovery table for the whole machine (`net.ipv6.neigh.default.
/// gc_thresh3`, 1,024) with a few entries per interface, and a big lab is IPv4 only anyway.
pub(super) const IPV6_NODES: usize = 20;

/// IPv6 off in namespace `ns` (its own sysctls, before any interface exists there), for a big lab.
fn ipv6_off(ns: &str) -> anyhow::Result<()> {
    for key in [
        "net.ipv6.conf.default.disable_ipv6=1",
        "net.ipv6.conf.all.disable_ipv6=1",
    ] {
        let out = ns_exec(ns, &["sysctl", "-qw", key])?;
        if !out.status.success() {
            bail!(
                "sysctl -w {key} in {ns}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    Ok(())
}

/// The MAC address of a lab member's `eth0` (and of the bridges): fixed by its IPv4 address
/// (locally administered 02:6d:67 + the address's last three octets), so neighbours can be pinned.
pub(super) fn mac_of(addr: Ipv4Addr) -> String {
    let o = addr.octets();
    format!("02:6d:67:{:02x}:{:02x}:{:02x}", o[1], o[2], o[3])
}

/// Which segment an address is on (`--subnets 2`: 10.99.1.0/24 is the second).
fn segment_of(addr: Ipv4Addr, subnets: usize) -> usize {
    if subnets > 1 {
        addr.octets()[2] as usize
    } else {
        0
    }
}

/// Permanent neighbour entries (the fixed MACs of [`mac_of`]) for the lab's members. The kernel's
/// neighbour table is one for all namespaces, and its learned (ARP) entries are bounded by the host's
/// `net.ipv4.neigh.default.gc_thresh3` (1,024 by default): a mesh of N nodes needs about N^2 of them, so
/// from about 30 nodes ARP fails with ENOBUFS and sessions stay in Connect. Permanent entries are exempt
/// from that bound (Linux 4.19 and later), so the lab pins them instead of touching the host's sysctl.
/// Every namespace in `targets` learns every member of its segment (and the bridge its members); one
/// `ip -batch` per namespace, namespaces in parallel.
pub(super) fn pin_neighbours(
    br: &str,
    targets: &[(String, Ipv4Addr)],
    members: &[(String, Ipv4Addr)],
    subnets: usize,
) -> anyhow::Result<()> {
    let gateway = |seg: usize| -> Ipv4Addr {
        let g = if seg == 0 { BRIDGE_IP } else { BRIDGE_IP_B };
        g.parse().unwrap_or(Ipv4Addr::UNSPECIFIED)
    };
    let mut jobs: Vec<(String, String)> = targets
        .iter()
        .map(|(ns, addr)| {
            let seg = segment_of(*addr, subnets);
            let g = gateway(seg);
            let mut batch = format!(
                "neigh replace {g} lladdr {} dev eth0 nud permanent\n",
                mac_of(g)
            );
            for (_, m) in members {
                if m != addr && segment_of(*m, subnets) == seg {
                    batch.push_str(&format!(
                        "neigh replace {m} lladdr {} dev eth0 nud permanent\n",
                        mac_of(*m)
                    ));
                }
            }
            (ns.clone(), batch)
        })
        .collect();
    let mut bridge_batch = String::new();
    for (_, m) in targets {
        let dev = if segment_of(*m, subnets) == 0 {
            "br0"
        } else {
            "br1"
        };
        bridge_batch.push_str(&format!(
            "neigh replace {m} lladdr {} dev {dev} nud permanent\n",
            mac_of(*m)
        ));
    }
    jobs.push((br.to_string(), bridge_batch));
    let results = parallel(&jobs, WORKERS, |(ns, batch)| ip_batch(ns, batch));
    for (r, (ns, _)) in results.into_iter().zip(&jobs) {
        r.with_context(|| format!("pinning the lab's neighbours in {ns}"))?;
    }
    Ok(())
}

/// `ip -n NS -batch -` with `batch` on stdin.
fn ip_batch(ns: &str, batch: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-n", ns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `ip` (install iproute2)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(batch.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -n {ns} -batch: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The last non-empty line of a log (what a node said before it died or while it waits).
fn last_log_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| {
            t.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "(empty log)".into())
}

/// Whether the process in `<state>/<name>.pid` is alive.
pub(super) fn alive(state: &Path, name: &str) -> bool {
    std::fs::read_to_string(state.join(format!("{name}.pid")))
        .ok()
        .and_then(|p| p.trim().parse::<i32>().ok())
        .is_some_and(|p| nix::sys::signal::kill(nix::unistd::Pid::from_raw(p), None).is_ok())
}

/// Wait (up to `bound` in all) until every node has opened its CNI socket. A node whose daemon died fails
/// the wait at once; at the bound, every node still missing is named with its log's last line.
pub(super) fn wait_sockets(state: &Path, nodes: &[LabNode], bound: Duration) -> anyhow::Result<()> {
    let t = Instant::now();
    let mut pending: Vec<&LabNode> = nodes.iter().collect();
    loop {
        pending.retain(|n| !n.socket.exists());
        if pending.is_empty() {
            return Ok(());
        }
        let dead: Vec<String> = pending
            .iter()
            .filter(|n| !alive(state, &n.name))
            .map(|n| {
                let log = state.join(format!("{}.log", n.name));
                format!(
                    "  {}: daemon exited ({}: {})",
                    n.name,
                    log.display(),
                    last_log_line(&log)
                )
            })
            .collect();
        if !dead.is_empty() {
            bail!(
                "{} of {} nodes stopped before opening their CNI socket:\n{}",
                dead.len(),
                nodes.len(),
                dead.join("\n")
            );
        }
        if t.elapsed() > bound {
            let list: Vec<String> = pending
                .iter()
                .map(|n| {
                    let log = state.join(format!("{}.log", n.name));
                    format!(
                        "  {}: no CNI socket {} yet; log {}: {}",
                        n.name,
                        n.socket.display(),
                        log.display(),
                        last_log_line(&log)
                    )
                })
                .collect();
            bail!(
                "{} of {} nodes not serving CNI after {bound:?}:\n{}",
                list.len(),
                nodes.len(),
                list.join("\n")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A daemon's /status, read from inside its namespace on a short-lived thread (the lab process itself
/// never changes namespace).
pub(super) fn status_in(ns: &str, listen: &str) -> anyhow::Result<crate::api::StatusReport> {
    let addr: std::net::SocketAddr = listen.parse()?;
    let path = PathBuf::from(format!("/var/run/netns/{ns}"));
    let r = crate::dataplane::netns::in_netns(Some(&path), || {
        Ok(crate::api::fetch_status(addr, Duration::from_secs(2)))
    })?;
    Ok(r?)
}

/// Wait (up to `bound`) until every node reports ready on /status; the nodes that do not, with their
/// reason (or why their status cannot be read).
pub(super) fn wait_ready(lab: &LabState, bound: Duration) -> Vec<String> {
    let t = Instant::now();
    let mut pending: Vec<&LabNode> = lab.nodes.iter().collect();
    loop {
        let reasons = parallel(&pending, WORKERS, |n| {
            match status_in(&n.name, crate::api::DEFAULT_LISTEN) {
                Ok(s) if s.ready.ready => None,
                Ok(s) => Some(format!(
                    "  {}: not ready: {}",
                    n.name,
                    s.ready.reason.unwrap_or_else(|| "starting".into())
                )),
                Err(e) => Some(format!("  {}: status unavailable: {e:#}", n.name)),
            }
        });
        let mut still = Vec::new();
        let mut why = Vec::new();
        for (n, r) in pending.iter().zip(reasons) {
            if let Some(r) = r {
                still.push(*n);
                why.push(r);
            }
        }
        pending = still;
        if pending.is_empty() || t.elapsed() > bound {
            return why;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `margay lab add-node`: the next node joins the running lab (no pods).
pub(super) fn add_node(args: &LabArgs) -> anyhow::Result<()> {
    let state = args.state();
    let mut lab = load(&state)?;
    let p = &args.name;
    let i = (1..)
        .find(|i| !Path::new(&format!("/var/run/netns/{p}-n{i}")).exists())
        .unwrap_or(1);
    if i > MAX_NODES {
        bail!("lab {p:?} already has {MAX_NODES} nodes");
    }
    // A lab of two segments has its second bridge; the new node alternates as `up` places them.
    let subnets = if ns_exec(&format!("{p}-br"), &["ip", "link", "show", "br1"])
        .map(|o| o.status.success())
        .unwrap_or(false)
    {
        2
    } else {
        1
    };
    let (addr, plen) = node_addr(i, subnets);
    let name = format!("{p}-n{i}");
    BIG_LAB_NO_IPV6.store(
        lab.nodes.len() + 1 > IPV6_NODES,
        std::sync::atomic::Ordering::Relaxed,
    );
    attach_to(
        &format!("{p}-br"),
        &name,
        &format!("n{i}"),
        addr,
        plen,
        (i - 1) % subnets,
    )?;
    let mut members: Vec<(String, Ipv4Addr)> = vec![(format!("{p}-etcd"), ETCD_IP.parse()?)];
    members.extend(
        lab.reflector_names()
            .into_iter()
            .enumerate()
            .map(|(k, n)| (n, reflector_ip(k))),
    );
    members.extend(lab.nodes.iter().map(|n| (n.name.clone(), n.ip)));
    // The newcomer learns everybody; everybody (and the bridge) learns the newcomer.
    let newcomer = [(name.clone(), addr)];
    members.push(newcomer[0].clone());
    pin_neighbours(&format!("{p}-br"), &newcomer, &members, subnets)?;
    let others: Vec<(String, Ipv4Addr)> = members[..members.len() - 1].to_vec();
    let results = parallel(&others, WORKERS, |(ns, a)| {
        if segment_of(*a, subnets) != segment_of(addr, subnets) {
            return Ok(());
        }
        ip_batch(
            ns,
            &format!(
                "neigh replace {addr} lladdr {} dev eth0 nud permanent\n",
                mac_of(addr)
            ),
        )
    });
    for r in results {
        r?;
    }
    let socket = state.join(&name).join("cni.sock");
    let node = LabNode {
        name: name.clone(),
        ip: addr,
        socket: socket.clone(),
    };
    start_node(&state, &name, addr, &socket, "")?;
    lab.nodes.push(node.clone());
    save(&state, &lab)?;
    wait_sockets(&state, std::slice::from_ref(&node), Duration::from_secs(60))?;
    println!("{name} joined lab {p:?} at {addr}");
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

/// `margay apply -f <state>/<file>` inside the etcd namespace (the file stays for the operator to read).
pub(super) fn apply_file(state: &Path, etcd_ns: &str, file: &str, doc: &str) -> anyhow::Result<()> {
    let file = state.join(file);
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
    apply_file(state, etcd_ns, "pool.yaml", &doc)
}

pub(super) fn write_reflector_resources(
    state: &Path,
    etcd_ns: &str,
    reflectors: &[(String, Ipv4Addr)],
    plen: u8,
) -> anyhow::Result<()> {
    let api = crate::config::API_VERSION;
    let mut doc = format!(
        "apiVersion: {api}
kind: BGPConfiguration
metadata:
  name: default
spec:
  asNumber: 64512
  nodeToNodeMeshEnabled: false
"
    );
    // Redundant reflectors share one cluster id (RFC 4456 7): a route one of them reflected is not
    // reflected again by the other.
    for (rr, addr) in reflectors {
        doc.push_str(&format!(
            "---
apiVersion: {api}
kind: Node
metadata:
  name: {rr}
  labels:
    {RR_LABEL}: \"true\"
spec:
  bgp:
    ipv4Address: {addr}/{plen}
    routeReflectorClusterID: {CLUSTER_ID}
"
        ));
    }
    doc.push_str(&format!(
        "---
apiVersion: {api}
kind: BGPPeer
metadata:
  name: peer-with-route-reflectors
spec:
  nodeSelector: all()
  peerSelector: has({RR_LABEL})
"
    ));
    apply_file(state, etcd_ns, "reflector-resources.yaml", &doc)
}

/// Start `margay reflector` in its namespace against the lab's etcd.
pub(super) fn start_reflector(state: &Path, rr: &str, router_id: Ipv4Addr) -> anyhow::Result<u32> {
    let margay = std::env::current_exe()?.to_string_lossy().to_string();
    let client = format!("http://{ETCD_IP}:2379");
    let rr_state = state.join(rr).to_string_lossy().to_string();
    let router_id = router_id.to_string();
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
            &router_id,
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
