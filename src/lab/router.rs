//! `margay lab up --outside-router`: the fabric's router outside the cluster, and a host behind it.
//!
//! ```text
//!   <lab>-br: bridge br0 10.99.0.1/24
//!     |-- <lab>-n1 .. nN   margay nodes (AS 64512), each with a session to the router: one global BGPPeer
//!     `-- <lab>-rtr  eth0 10.99.0.10   BIRD 2, AS 64567: learns the nodes' blocks and service CIDRs into
//!            |                        its kernel (ECMP where several nodes send one prefix), sends the
//!            |                        nodes everything (next hop itself): a default route, its outside
//!            |                        segment, and the blocks back (which the nodes refuse: AS loop)
//!         eth1 10.97.0.1/24
//!            `-- <lab>-ext  eth0 10.97.0.2/24, default via 10.97.0.1: a host that is not in the cluster
//! ```
//!
//! The router is plain BIRD with a ToR's usual configuration (import all, export its own routes only),
//! started like the lab's other processes (PID and log in the state directory, `lab down` stops it).

#[allow(unused_imports)]
use super::*;

/// The router's address on the nodes' segment (the global BGPPeer's peerIP).
pub(super) const ROUTER_IP: &str = "10.99.0.10";
/// The router's AS (an external AS: eBGP to the nodes).
pub(super) const ROUTER_AS: u32 = 64567;
/// The router's address on the outside segment, and the outside host's.
const OUTSIDE_GW: &str = "10.97.0.1";
const OUTSIDE_HOST: &str = "10.97.0.2";

/// How long the router keeps a node's routes after its session drops without a NOTIFICATION (the node's
/// graceful restart time, from the BGPPeer's `maxRestartTime`): long enough for `lab restart-node`, short
/// enough that a node leaving (`lab remove-node`) leaves the router's table within seconds.
pub(super) const ROUTER_RESTART_TIME: &str = "5s";

/// The BGPPeer that makes every node peer with the router (no `node`, no `nodeSelector`: global).
pub(super) fn write_router_peer(state: &Path, etcd_ns: &str) -> anyhow::Result<()> {
    let api = crate::config::API_VERSION;
    let doc = format!(
        "apiVersion: {api}
kind: BGPPeer
metadata:
  name: outside-router
spec:
  peerIP: {ROUTER_IP}
  asNumber: {ROUTER_AS}
  maxRestartTime: {ROUTER_RESTART_TIME}
"
    );
    apply_file(state, etcd_ns, "outside-router.yaml", &doc)
}

/// BIRD's configuration: one eBGP session per node; everything learned goes to the kernel (ECMP); the
/// nodes get everything the router has, as a ToR sends it: its default route and outside segment, and the
/// other nodes' blocks and the service CIDRs back with AS path `64567 64512`, which the nodes must refuse
/// (their own AS in the path, RFC 4271 9.1.2), or a block would loop between router and nodes.
pub(super) fn bird_conf(nodes: &[Ipv4Addr]) -> String {
    let mut c = format!(
        "router id {ROUTER_IP};
protocol device {{ }}
protocol direct outside {{ ipv4; interface \"eth1\"; }}
protocol static default_route {{ ipv4; route 0.0.0.0/0 blackhole; }}
protocol kernel {{
  ipv4 {{ import none; export where source = RTS_BGP; }};
  merge paths on;
}}
template bgp node {{
  local {ROUTER_IP} as {ROUTER_AS};
  ipv4 {{
    import all;
    export all;
    next hop self;
  }};
}}
"
    );
    for (i, ip) in nodes.iter().enumerate() {
        c.push_str(&format!(
            "protocol bgp node{} from node {{ neighbor {ip} as 64512; }}\n",
            i + 1
        ));
    }
    c
}

/// Build the router and the host behind it, and start BIRD. `attach` puts a namespace on the lab bridge.
pub(super) fn start_router(
    state: &Path,
    p: &str,
    nodes: &[Ipv4Addr],
    attach: &dyn Fn(&str, &str, Ipv4Addr) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    if !which("bird") || !which("birdc") {
        bail!("--outside-router needs BIRD 2 (bird, birdc): apt-get install bird2 (scripts/install-deps.sh)");
    }
    let rtr = format!("{p}-rtr");
    let ext = format!("{p}-ext");
    attach(&rtr, "rtr", ROUTER_IP.parse()?)?;
    crate::dataplane::sysctl::ensure_node(Some(Path::new(&format!("/var/run/netns/{rtr}"))))?;
    ip(&["netns", "add", &ext])?;
    ip(&[
        "-n", &rtr, "link", "add", "eth1", "type", "veth", "peer", "name", "eth0", "netns", &ext,
    ])?;
    ip(&[
        "-n",
        &rtr,
        "addr",
        "add",
        &format!("{OUTSIDE_GW}/24"),
        "dev",
        "eth1",
    ])?;
    ip(&["-n", &rtr, "link", "set", "eth1", "up"])?;
    ip(&[
        "-n",
        &ext,
        "addr",
        "add",
        &format!("{OUTSIDE_HOST}/24"),
        "dev",
        "eth0",
    ])?;
    ip(&["-n", &ext, "link", "set", "lo", "up"])?;
    ip(&["-n", &ext, "link", "set", "eth0", "up"])?;
    ip(&["-n", &ext, "route", "add", "default", "via", OUTSIDE_GW])?;
    let conf = state.join(format!("{rtr}-bird.conf"));
    std::fs::write(&conf, bird_conf(nodes))
        .with_context(|| format!("writing {}", conf.display()))?;
    let ctl = router_ctl(state, p);
    let (conf_s, ctl_s) = (
        conf.to_string_lossy().to_string(),
        ctl.to_string_lossy().to_string(),
    );
    spawn_in(
        state,
        &rtr,
        &rtr,
        &["bird", "-f", "-c", &conf_s, "-s", &ctl_s],
        &[],
    )?;
    wait_until(
        "the outside router's BIRD to answer",
        Duration::from_secs(20),
        || {
            Command::new("birdc")
                .args(["-s", &ctl_s, "show", "status"])
                .output()
                .map(|o| o.status.success())
                .unwrap_or(false)
        },
    )?;
    Ok(rtr)
}

/// The control socket of the lab's router BIRD.
pub(super) fn router_ctl(state: &Path, p: &str) -> PathBuf {
    state.join(format!("{p}-rtr-bird.ctl"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bird_conf_has_a_session_per_node() {
        let c = bird_conf(&["10.99.0.11".parse().unwrap(), "10.99.0.12".parse().unwrap()]);
        assert!(c.contains("protocol bgp node1 from node { neighbor 10.99.0.11 as 64512; }"));
        assert!(c.contains("protocol bgp node2 from node { neighbor 10.99.0.12 as 64512; }"));
        assert!(c.contains("local 10.99.0.10 as 64567;"));
    }
}
