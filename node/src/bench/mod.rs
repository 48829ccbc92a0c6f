//! `flare-node bench`: placeholder, replaced by the benchmark module.

use clap::{Args, Subcommand};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Blob transfer between two processes.
    Blob,
}

/// One process of a benchmark.
#[derive(Args)]
pub struct PeerArgs {}

pub async fn run(_cmd: BenchCmd) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}

pub async fn peer(_args: PeerArgs) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
