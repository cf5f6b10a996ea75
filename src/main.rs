//! `margay`: clap dispatch only.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "margay",
    version,
    about = "Kubernetes node networking: etcd IPAM, embedded BGP, kernel FIB, CNI"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version.
    Version,
    /// Run the BGP speaker alone as a standalone route reflector (no dataplane, no IPAM).
    Reflector(margay::reflector::ReflectorArgs),
    /// Show the BGP peers of the margay running on this host (like `calicoctl node status`).
    Status {
        /// The daemon's local status endpoint.
        #[arg(long, default_value = margay::api::DEFAULT_LISTEN)]
        endpoint: std::net::SocketAddr,
        /// Output format: table (default) or json.
        #[arg(short = 'o', long, default_value = "table", value_parser = ["table", "json"])]
        output: String,
    },
    /// IP address management: usage, consistency check, release.
    Ipam {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        #[command(subcommand)]
        cmd: margay::cli::IpamCmd,
    },
    /// The node daemon (`node run`) and node administration in the datastore (`node remove NAME`).
    Node {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        #[command(subcommand)]
        cmd: margay::cli::NodeCmd,
    },
    /// The local lab: nodes in network namespaces, etcd, pods through margay-cni, pings across nodes.
    Lab {
        #[command(subcommand)]
        cmd: margay::lab::LabCmd,
    },
    /// Create or replace the resources in a YAML/JSON file (`-` for stdin): IPPool, IPAMConfiguration,
    /// BGPConfiguration, BGPPeer, Node (projectcalico.org/v3, as calicoctl takes them).
    Apply {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// The routes a host outside the cluster needs to reach every pod block and the service CIDRs through a
    /// gateway node (`ip route` commands, `ip -batch` input, a table or JSON), or with --watch kept in a
    /// network namespace as blocks are claimed and released (route protocol 79).
    Routes {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        #[command(flatten)]
        args: margay::cli::RoutesArgs,
    },
    /// Show resources: ippool, ipamconfiguration, bgpconfiguration, bgppeer, node.
    Get {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: margay::cli::Output,
    },
    /// Delete resources by kind and name, or those in a file. Deleting a Node deletes the resource only;
    /// `margay node remove NAME` also releases its IPAM blocks and addresses.
    Delete {
        #[command(flatten)]
        etcd: margay::datastore::EtcdArgs,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<std::path::PathBuf>,
    },
}

/// Run a datastore command on a small runtime and print the text it returns.
fn print_async(
    f: impl std::future::Future<Output = Result<String, margay::cli::CliError>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    print!("{}", rt.block_on(f)?);
    Ok(())
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Print the chain once: our errors already embed their cause, so skip repeats.
            let mut msg = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !msg.contains(&c) {
                    msg.push_str(": ");
                    msg.push_str(&c);
                }
            }
            eprintln!("margay: {msg}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Version => {
            println!("margay {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Reflector(args) => {
            init_tracing();
            margay::reflector::run(args)
        }
        Command::Status { endpoint, output } => {
            let report = margay::api::fetch_status(endpoint, std::time::Duration::from_secs(5))?;
            if output == "json" {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", margay::api::render_status_table(&report));
            }
            Ok(())
        }
        Command::Ipam { etcd, cmd } => print_async(margay::cli::run_ipam(&etcd, &cmd)),
        Command::Node {
            etcd,
            cmd: margay::cli::NodeCmd::Run(args),
        } => {
            init_tracing();
            margay::node::run(etcd, *args)
        }
        Command::Node { etcd, cmd } => print_async(margay::cli::run_node(&etcd, &cmd)),
        Command::Lab { cmd } => margay::lab::run(cmd),
        Command::Routes { etcd, args } => print_async(async move {
            let (text, notes) = margay::cli::run_routes(&etcd, &args).await?;
            for n in notes {
                eprintln!("margay routes: note: {n}");
            }
            Ok(text)
        }),
        Command::Apply { etcd, file } => print_async(margay::cli::run_apply(&etcd, &file)),
        Command::Get {
            etcd,
            kind,
            name,
            output,
        } => print_async(margay::cli::run_get(&etcd, &kind, name.as_deref(), output)),
        Command::Delete {
            etcd,
            kind,
            name,
            file,
        } => print_async(margay::cli::run_delete(
            &etcd,
            kind.as_deref(),
            name.as_deref(),
            file.as_deref(),
        )),
    }
}

/// Logs to stderr; `RUST_LOG` (e.g. `margay=debug`) overrides the default `info`.
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        // No colour codes in log files (the lab and systemd redirect stderr).
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
