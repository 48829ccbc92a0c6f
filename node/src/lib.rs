//! The `flare-node` process: CLI, process wiring, benchmarks. `main.rs` only calls
//! [`main_with_args`], so tests can run the real CLI in a child process.
//!
//! [`client`] is the Rust Client API: a training loop in this process as a job's member.

mod bench;
pub mod client;
mod job;
mod keys;
pub mod render;
mod run;
pub mod sample_data;
mod sim;
pub mod site;
mod topology;
mod torch;

use std::ffi::OsString;
use std::process::ExitCode;

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
    /// Create a site directory: the site's key, its policy (site.toml) and the
    /// consortium's member table (members.toml); prints the site's PeerId.
    Init(site::InitArgs),
    /// Run a site's standing peer (made by `init`) until Ctrl-C.
    Serve(site::ServeArgs),
    /// Sign a job file with your key and submit it to a running site; prints the job's id.
    Submit(site::submit::SubmitArgs),
    /// List a running site's jobs: id, name, workflow, state, round, members.
    Jobs(site::query::JobsArgs),
    /// Show one job as each of its members sees it, with the learning curve and why it
    /// failed where it did.
    Status(site::query::StatusArgs),
    /// Stop a job on every member that lets you (its submitter, or a site's admin).
    Abort(site::manage::AbortArgs),
    /// Fetch a job's outputs (final model, results.json, the learning curve) into a
    /// directory.
    Download(site::manage::DownloadArgs),
    /// Write example data for trying a consortium: one CSV of rows per site, and held-out
    /// test rows.
    SampleData(sample_data::SampleDataArgs),
    /// Run one long-lived peer until Ctrl-C.
    Run(run::RunArgs),
    /// Run a topology's whole job on a local swarm in this process.
    Sim(sim::SimArgs),
    /// Measure the runtime against baselines; prints one JSON object on the last line.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Internal: one process of a multi-process benchmark.
    #[command(hide = true)]
    BenchPeer(bench::PeerArgs),
}

/// What `RUST_LOG` defaults to: one line per event a user cares about. ractor wraps every
/// actor in an INFO span (`Actor{id=..}`) that would prefix each line; its warnings stay.
const DEFAULT_LOG_FILTER: &str = "info,libp2p_swarm=warn,ractor=warn";
/// `sim`'s default: its members' listening addresses and connections to each other are the
/// simulation's plumbing, one line per member or pair, so they are left out too.
const SIM_LOG_FILTER: &str = "info,libp2p_swarm=warn,ractor=warn,flare_actors::network=warn";

pub(crate) fn init_tracing(default_filter: &str) {
    // `try_init`: a second call (tests) keeps the first subscriber.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// Runs the CLI on `args` (the first is the program name): errors are printed as one line on
/// stderr and give exit code 1; usage errors are clap's (exit code 2).
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    init_tracing(match cli.command {
        Command::Sim(_) => SIM_LOG_FILTER,
        _ => DEFAULT_LOG_FILTER,
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        match cli.command {
            Command::Keygen { out, force } => keys::keygen(&out, force),
            Command::Init(args) => site::init(args),
            Command::Serve(args) => site::serve(args).await,
            Command::Submit(args) => site::submit::submit(args).await,
            Command::Jobs(args) => site::query::jobs(args).await,
            Command::Status(args) => site::query::status(args).await,
            Command::Abort(args) => site::manage::abort(args).await,
            Command::Download(args) => site::manage::download(args).await,
            Command::SampleData(args) => sample_data::sample_data(args),
            Command::Run(args) => run::run(args).await,
            Command::Sim(args) => sim::run(args).await,
            Command::Bench(cmd) => bench::run(cmd).await,
            Command::BenchPeer(args) => bench::peer(args).await,
        }
    })
}

/// Resolves at the first Ctrl-C (SIGINT). A failure to listen is logged and never resolves:
/// the job then runs to its end rather than stopping at once.
pub(crate) async fn ctrl_c() {
    if let Err(e) = tokio::signal::ctrl_c().await {
        tracing::warn!(error = %e, "cannot listen for Ctrl-C");
        std::future::pending::<()>().await;
    }
}

/// Resolves, with why, when a member's part of a job must end early: Ctrl-C for `run` and
/// `sim`, an abort for a site's job. Clones share it.
pub(crate) type Stop = futures::future::Shared<futures::future::BoxFuture<'static, String>>;

/// A [`Stop`] at the first Ctrl-C.
pub(crate) fn on_ctrl_c() -> Stop {
    use futures::FutureExt;
    async {
        ctrl_c().await;
        "interrupted (Ctrl-C)".to_owned()
    }
    .boxed()
    .shared()
}
