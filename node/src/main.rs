//! `flare-node`: one binary for every member of a federated-learning consortium.

mod bench;
mod keys;
mod run;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "flare-node", version, about = "Peer-to-peer federated-learning runtime")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a new ed25519 identity key and print its PeerId.
    Keygen {
        /// Where to write the key (protobuf-encoded libp2p keypair, mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// Overwrite an existing file.
        #[arg(long)]
        force: bool,
    },
    /// Run one long-lived peer until Ctrl-C.
    Run(run::RunArgs),
    /// Measure the runtime against baselines; prints one JSON object on the last line.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Internal: one process of a multi-process benchmark.
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,libp2p_swarm=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_tracing();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Keygen { out, force } => keys::keygen(&out, force),
            Command::Run(args) => run::run(args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::BenchPeer(args) => bench::peer(args).await,
        }
    })
}
