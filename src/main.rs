//! `margay`: clap dispatch only.

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "margay", version, about = "Kubernetes node networking: etcd IPAM, embedded BGP, kernel FIB, CNI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the version and the features built in.
    Version,
    /// IP address management: usage, consistency check, release.
    Ipam {
        #[command(flatten)]
        etcd: margay::cli::EtcdArgs,
        #[command(subcommand)]
        cmd: margay::cli::IpamCmd,
    },
    /// Node administration in the datastore (`node remove NAME`).
    Node {
        #[command(flatten)]
        etcd: margay::cli::EtcdArgs,
        #[command(subcommand)]
        cmd: margay::cli::NodeCmd,
    },
    /// Create or replace the resources in a YAML/JSON file (`-` for stdin).
    Apply {
        #[command(flatten)]
        etcd: margay::cli::EtcdArgs,
        #[arg(short = 'f', long = "filename")]
        file: std::path::PathBuf,
    },
    /// Show resources: ippool, ipamconfiguration.
    Get {
        #[command(flatten)]
        etcd: margay::cli::EtcdArgs,
        kind: String,
        name: Option<String>,
        #[arg(short = 'o', long = "output", value_enum, default_value = "table")]
        output: margay::cli::Output,
    },
    /// Delete resources by kind and name, or those in a file.
    Delete {
        #[command(flatten)]
        etcd: margay::cli::EtcdArgs,
        kind: Option<String>,
        name: Option<String>,
        #[arg(short = 'f', long = "filename")]
        file: Option<std::path::PathBuf>,
    },
}

/// Run a datastore command on a small runtime and print what it returns.
fn print_async(
    f: impl std::future::Future<Output = Result<String, margay::cli::CliError>>,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    match rt.block_on(f) {
        Ok(text) => {
            print!("{text}");
            Ok(())
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1)
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("margay {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
        Command::Ipam { etcd, cmd } => print_async(margay::cli::run_ipam(&etcd, &cmd)),
        Command::Node { etcd, cmd } => print_async(margay::cli::run_node(&etcd, &cmd)),
        Command::Apply { etcd, file } => print_async(margay::cli::run_apply(&etcd, &file)),
        Command::Get { etcd, kind, name, output } => {
            print_async(margay::cli::run_get(&etcd, &kind, name.as_deref(), output))
        }
        Command::Delete { etcd, kind, name, file } => print_async(margay::cli::run_delete(
            &etcd,
            kind.as_deref(),
            name.as_deref(),
            file.as_deref(),
        )),
    }
}
