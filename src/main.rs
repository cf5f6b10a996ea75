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
    /// Print the version and the features built in.
    Version,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("margay {}", env!("CARGO_PKG_VERSION"));
            Ok(())
        }
    }
}
