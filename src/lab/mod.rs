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
//!   --outside-router: mgl-rtr 10.99.0.10, BIRD 2 in AS 64567, every node peering with it by one global
//!   BGPPeer; mgl-ext 10.97.0.2 behind it on its own segment (see `router`)
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

mod down;
mod ops;
mod process;
mod router;
mod status;
mod up;

use down::*;
use ops::*;
use process::*;
use router::*;
use status::*;
use up::*;

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
        /// Route reflectors (0 to 7; `--reflector` is `--reflectors 1`): `<lab>-rr`, `<lab>-rr2`, ... at
        /// 10.99.0.3, .4, ..., each `margay reflector` in its own namespace with the same cluster id; every
        /// node peers with all of them (one BGPPeer, as Calico's redundant reflectors do).
        #[arg(long, default_value_t = 0)]
        reflectors: usize,
        /// L2 segments (1 or 2). With 2, the bridge namespace becomes a router between 10.99.0.0/24 and
        /// 10.99.1.0/24 that knows no pod route; nodes alternate between the segments (n1 on the first, n2
        /// on the second, ...), and the default pool gets `vxlanMode: CrossSubnet` so pods reach each other.
        #[arg(long, default_value_t = 1)]
        subnets: usize,
        /// A router outside the cluster (BIRD 2, AS 64567, `<lab>-rtr` at 10.99.0.10) that every node peers
        /// with through one global BGPPeer, and a host behind it (`<lab>-ext`, 10.97.0.2 on the router's
        /// own segment). The router learns the nodes' blocks and service CIDRs into its kernel and sends
        /// them a default route and its segment. One segment only (not with --subnets 2).
        #[arg(long)]
        outside_router: bool,
        #[command(flatten)]
        common: LabArgs,
    },
    /// Print nodes, peers, blocks, pods and the ping matrix. Exits non-zero if a ping fails.
    Status {
        #[command(flatten)]
        common: LabArgs,
    },
    /// Stop one node's daemon with SIGTERM and start it again (its pods and kernel routes stay); the
    /// reflector's name (`<lab>-rr`) restarts the reflector, also one that was killed.
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
    /// One more node joins a running lab (namespace, address, `margay node run`; no pods): the next free
    /// `<lab>-nK`. Prints its name.
    AddNode {
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
/// Reflectors fit between the reflector address and the first node (.11).
const MAX_REFLECTORS: usize = 7;
/// One L2 segment (`--subnets 1`) is 10.99.0.0/16 and one bridge: the kernel's limit of ports per bridge
/// (BR_MAX_PORTS, 1024) minus etcd and the reflectors bounds it; the pod pool's 1,024 /26 blocks too.
const MAX_NODES: usize = 1000;
/// The most learned (ARP / neighbour-discovery) entries a lab may hold, per address family: below the
/// kernel's `gc_thresh2` (512), from which it starts evicting entries of every namespace on the machine.
/// Node-to-node entries are pinned (permanent, not counted: see `up::pin_neighbours`); what is left is
/// learned per pod and per namespace.
const NEIGHBOUR_BUDGET: usize = 450;

/// The learned neighbour entries a lab of `nodes` nodes with `pods` pods each holds, per family, as
/// measured in a 100-node lab with one pod per node (about 400 IPv4 entries): per node its loopback's
/// and its eth0's (2), per pod the node's entry for the pod and the pod's for its gateway (2), and a few for
/// etcd, the reflectors and the bridge.
fn learned_neighbours(nodes: usize, pods: usize) -> usize {
    2 * nodes + 2 * nodes * pods + 10
}

/// With two segments each is a /24 (10.99.0.0/24, 10.99.1.0/24), nodes from host .11: 244 fit.
const MAX_NODES_TWO_SEGMENTS: usize = 244;
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
    /// The first route reflector's namespace (also its Node name), when the lab runs with `--reflector`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reflector: Option<String>,
    /// The outside router's namespace, when the lab runs with `--outside-router`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    router: Option<String>,
    /// Every reflector's namespace, in order (the k-th at [`reflector_ip`]`(k)`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    reflectors: Vec<String>,
}

impl LabState {
    /// The reflectors' namespaces (a state written before `reflectors` existed has only `reflector`).
    fn reflector_names(&self) -> Vec<String> {
        if self.reflectors.is_empty() {
            self.reflector.iter().cloned().collect()
        } else {
            self.reflectors.clone()
        }
    }
}

/// The address of reflector `k` (0-based): 10.99.0.3, .4, ... (between etcd and the first node).
fn reflector_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 3 + k.min(MAX_REFLECTORS) as u8)
}

/// The namespace (and Node name) of reflector `k`: `<lab>-rr`, `<lab>-rr2`, ...
fn reflector_name(lab: &str, k: usize) -> String {
    if k == 0 {
        format!("{lab}-rr")
    } else {
        format!("{lab}-rr{}", k + 1)
    }
}

/// Node `i`'s (1-based) address and prefix length. One segment: host number 10 + i in 10.99.0.0/16
/// (10.99.0.11 ... 10.99.0.255, 10.99.1.0, ...; the first 244 as before). Two segments: alternating
/// between 10.99.0.0/24 and 10.99.1.0/24, host .10 + i.
fn node_addr(i: usize, subnets: usize) -> (Ipv4Addr, u8) {
    if subnets > 1 {
        let segment = ((i - 1) % subnets) as u8;
        (Ipv4Addr::new(10, 99, segment, (10 + i) as u8), 24)
    } else {
        let host = (10 + i) as u32;
        (
            Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 99, 0, 0)) + host),
            16,
        )
    }
}

/// Run a lab command.
pub fn run(cmd: LabCmd) -> anyhow::Result<()> {
    match cmd {
        LabCmd::Up {
            nodes,
            pods,
            reflector,
            reflectors,
            subnets,
            outside_router,
            common,
        } => {
            let reflectors = reflectors.max(usize::from(reflector));
            if reflectors > MAX_REFLECTORS {
                bail!("--reflectors {reflectors}: at most {MAX_REFLECTORS} (they take 10.99.0.3 to 10.99.0.9)");
            }
            let max = if subnets > 1 {
                MAX_NODES_TWO_SEGMENTS
            } else {
                MAX_NODES
            };
            if !(1..=max).contains(&nodes) {
                bail!("--nodes {nodes}: must be between 1 and {max} (with --subnets {subnets})");
            }
            let learned = learned_neighbours(nodes, pods);
            if learned > NEIGHBOUR_BUDGET {
                bail!(
                    "--nodes {nodes} --pods {pods}: the lab would hold about {learned} learned neighbour entries, over its budget of {NEIGHBOUR_BUDGET}: \
                     the kernel's neighbour table is one for every namespace of this machine (the host's too), bounded by \
                     net.ipv4.neigh.default.gc_thresh3 (1,024; from gc_thresh2, 512, it evicts), and a lab that fills it breaks \
                     every other user of the machine; use fewer pods per node (--pods 0 or 1 for a big lab) or fewer nodes"
                );
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
            if outside_router && subnets > 1 {
                bail!("--outside-router needs --subnets 1: the router peers with the nodes on the lab's one segment");
            }
            if let Err(e) = up(&common, nodes, pods, reflectors, subnets, outside_router) {
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
        LabCmd::AddNode { common } => add_node(&common),
        LabCmd::Down { common } => down(&common),
    }
}
