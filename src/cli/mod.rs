//! The operator CLI (`calicoctl`-like) against the datastore: `ipam show/check/release`, `node remove`,
//! `apply -f`, `get`, `delete`. main.rs only parses and dispatches here; every command returns the text to
//! print, so tests call the same functions the binary does.

pub mod ipam;
pub mod resources;
pub mod routes;
pub use crate::api::table;

use std::path::PathBuf;

use crate::config::ConfigError;
pub use crate::datastore::EtcdArgs;
use crate::datastore::{Datastore, DatastoreError};
use crate::ipam::IpamError;

pub use resources::Output;
pub use routes::{RoutesArgs, RoutesFormat};

/// What a CLI command can fail with.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Datastore(#[from] DatastoreError),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{0}")]
    NotFound(String),
    /// `apply -f`: which document of the file was refused (counting from 1).
    #[error("document {document}: {source}")]
    Document {
        document: usize,
        source: Box<CliError>,
    },
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl CliError {
    /// The error without the document it came from (`apply -f` names the document).
    pub fn inner(&self) -> &CliError {
        match self {
            CliError::Document { source, .. } => source.inner(),
            e => e,
        }
    }
}

/// `margay ipam ...`
#[derive(Debug, Clone, clap::Subcommand)]
pub enum IpamCmd {
    /// Pool (and block) usage.
    Show {
        /// A row per block under each pool.
        #[arg(long)]
        show_blocks: bool,
        /// Addresses borrowed from other nodes' blocks.
        #[arg(long)]
        show_borrowed: bool,
        /// One address: whether it is in use, its block, handle and attributes (as `calicoctl ipam show --ip`).
        #[arg(long, conflicts_with_all = ["show_blocks", "show_borrowed"])]
        ip: Option<std::net::IpAddr>,
    },
    /// Look for inconsistencies; ends with "found N problems".
    Check {
        /// File listing handle ids of live containers (one per line): other allocations are reported as
        /// allocated but not in use.
        #[arg(long)]
        live_handles: Option<PathBuf>,
        /// With --live-handles: release the handles found allocated but not in use (leaked).
        #[arg(long, requires = "live_handles")]
        release: bool,
    },
    /// Nodes whose liveness lease is gone: list them (the first run stamps them missing) and, with
    /// --release, free what those missing for longer than --grace held, as `node remove` does. A node that
    /// still renews its lease is never touched; nodes that never registered liveness are only listed.
    Gc {
        /// Release the nodes missing for longer than the grace period.
        #[arg(long)]
        release: bool,
        /// How long a node must have been seen missing before it is released (Go duration: 15m, 90s).
        #[arg(long, default_value = "15m", value_parser = parse_duration)]
        grace: std::time::Duration,
    },
    /// Release an address or everything a handle owns.
    Release {
        #[arg(long, conflicts_with = "handle", required_unless_present = "handle")]
        ip: Option<std::net::IpAddr>,
        #[arg(long)]
        handle: Option<String>,
    },
}

/// `margay node ...` (datastore side).
#[derive(Debug, Clone, clap::Subcommand)]
pub enum NodeCmd {
    /// Run the node daemon: IPAM + BGP + kernel FIB + CNI server + HTTP status.
    Run(Box<crate::node::NodeArgs>),
    /// Remove a node: its affinities, its blocks (releasing their addresses) and handles, then its Node
    /// resource (so its BGP sessions are removed from the other nodes and reflectors).
    Remove { name: String },
}

/// Run an `ipam` command; returns the text to print.
pub async fn run_ipam(etcd: &EtcdArgs, cmd: &IpamCmd) -> Result<String, CliError> {
    let ds = etcd.datastore()?;
    match cmd {
        IpamCmd::Show { ip: Some(ip), .. } => ipam::show_ip(&ds, *ip).await,
        IpamCmd::Show {
            show_blocks,
            show_borrowed,
            ip: None,
        } => ipam::show(&ds, *show_blocks, *show_borrowed).await,
        IpamCmd::Gc { release, grace } => ipam::gc(&ds, *grace, *release).await,
        IpamCmd::Check {
            live_handles,
            release,
        } => {
            let live = match live_handles {
                Some(p) => Some(
                    read(p)?
                        .lines()
                        .map(|l| l.trim().to_string())
                        .filter(|l| !l.is_empty())
                        .collect(),
                ),
                None => None,
            };
            let (_, mut out) = ipam::check(&ds, live.as_ref()).await?;
            if let (true, Some(live)) = (*release, &live) {
                out.push_str(&ipam::release_leaked(&ds, live).await?);
            }
            Ok(out)
        }
        IpamCmd::Release { ip, handle } => ipam::release(&ds, *ip, handle.as_deref()).await,
    }
}

pub use crate::config::bgp::parse_duration;

/// Run a `node` command.
pub async fn run_node(etcd: &EtcdArgs, cmd: &NodeCmd) -> Result<String, CliError> {
    let ds = etcd.datastore()?;
    match cmd {
        NodeCmd::Remove { name } => {
            let r = crate::ipam::ops::remove_node(&ds, name).await?;
            let mut out = format!(
                "Removed node {name:?} from IPAM: {} affinities, {} blocks deleted, {} blocks kept for other nodes' addresses, {} blocks kept unheld while their addresses cool down, {} addresses released\n",
                r.affinities_deleted, r.blocks_deleted, r.blocks_released, r.blocks_cooling, r.addresses_released
            );
            out.push_str(&remove_node_resource(&ds, name).await?);
            Ok(out)
        }
        NodeCmd::Run(_) => Err(CliError::Usage(
            "`node run` is a daemon: call crate::node::run".into(),
        )),
    }
}

/// Delete the Node resource (after its IPAM): the other nodes and reflectors derive their BGP peers from
/// it, so its sessions (and the routes learned over them) go as soon as their watches see the delete.
async fn remove_node_resource(ds: &Datastore, name: &str) -> Result<String, CliError> {
    match crate::datastore::resources::delete_node(ds, name).await {
        Ok(true) => Ok(format!("Removed Node resource {name:?}\n")),
        Ok(false) => Ok(format!("No Node resource {name:?} (already gone)\n")),
        Err(crate::datastore::resources::ResourceError::Contended(why)) => Err(CliError::Usage(
            format!("Node {name:?}: {why} (is its daemon still running? stop it first)"),
        )),
        Err(crate::datastore::resources::ResourceError::Datastore(e)) => Err(e.into()),
        Err(e) => Err(CliError::Usage(e.to_string())),
    }
}

/// `routes --via ...`: the text to print and the notes (for stderr). With `--watch` it runs until
/// interrupted, printing each change as it happens, and returns no text.
pub async fn run_routes(
    etcd: &EtcdArgs,
    args: &RoutesArgs,
) -> Result<(String, Vec<String>), CliError> {
    let ds = etcd.datastore()?;
    if args.watch {
        let mut out = std::io::stdout();
        routes::watch(ds, args, &mut out).await?;
        return Ok((String::new(), Vec::new()));
    }
    routes::print(&ds, args).await
}

/// `apply -f FILE` (`-` = stdin).
pub async fn run_apply(etcd: &EtcdArgs, file: &std::path::Path) -> Result<String, CliError> {
    let text = read(file)?;
    let ds = etcd.datastore()?;
    Ok(resources::apply(&ds, &text).await?.join("\n") + "\n")
}

/// `get KIND [NAME] [-o ...]`.
pub async fn run_get(
    etcd: &EtcdArgs,
    kind: &str,
    name: Option<&str>,
    output: Output,
) -> Result<String, CliError> {
    let ds = etcd.datastore()?;
    resources::get(&ds, kind, name, output).await
}

/// `delete KIND NAME` or `delete -f FILE`.
pub async fn run_delete(
    etcd: &EtcdArgs,
    kind: Option<&str>,
    name: Option<&str>,
    file: Option<&std::path::Path>,
) -> Result<String, CliError> {
    let ds = etcd.datastore()?;
    let targets = match (kind, name, file) {
        (_, _, Some(f)) => resources::names_in(&read(f)?)?,
        (Some(k), Some(n), None) => vec![(k.to_string(), n.to_string())],
        (Some(k), None, None) if resources::kind(k)?.kind == crate::config::ipam_config::KIND => {
            vec![(k.to_string(), crate::config::ipam_config::NAME.to_string())]
        }
        _ => {
            return Err(CliError::Usage(
                "delete KIND NAME, or delete -f FILE".into(),
            ))
        }
    };
    let mut out = String::new();
    for (k, n) in targets {
        out.push_str(&resources::delete(&ds, &k, &n).await?);
    }
    Ok(out)
}

fn read(p: &std::path::Path) -> Result<String, CliError> {
    let r = if p.as_os_str() == "-" {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(p)
    };
    r.map_err(|source| CliError::Io {
        path: p.display().to_string(),
        source,
    })
}
