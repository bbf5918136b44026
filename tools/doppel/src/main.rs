//! `doppel`: the dom0 replication tool.
use clap::Parser;

/// Doppel keeps a running VM replicated to a backup host.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("no subcommand is available yet; see `doppel --help`")
}
