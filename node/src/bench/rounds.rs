//! `flare-node bench rounds`: does a `sim` grow with the number of rounds? The add-one
//! FedAvg job (4 clients, a `--model-mib` model) in `sim`, once for each `--rounds` count,
//! each in a child process; prints each run's peak resident set and the ratio of the last
//! to the first. A store that kept every round's model would grow by a model a round.

use anyhow::{Context, ensure};
use clap::Args;
use serde_json::json;

/// Arguments of `flare-node bench rounds`.
#[derive(Args)]
pub struct RoundsArgs {
    /// Round counts to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "30,600")]
    rounds: Vec<u32>,
    /// Model size in MiB (4 f32 tensors).
    #[arg(long, default_value_t = 4.0)]
    model_mib: f64,
    /// Clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on each job, in seconds.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
}

/// Runs the benchmark.
pub async fn run(a: RoundsArgs) -> anyhow::Result<()> {
    ensure!(
        !a.rounds.is_empty() && a.rounds.iter().all(|&r| r >= 1),
        "--rounds must be positive"
    );
    ensure!(a.clients >= 1, "--clients must be at least 1");
    ensure!(
        a.model_mib.is_finite() && a.model_mib > 0.0,
        "--model-mib must be positive"
    );
    let elements = ((a.model_mib * (1 << 20) as f64 / 16.0).round() as usize).max(1);
    let tmp = tempfile::Builder::new()
        .prefix("flare-bench-rounds-")
        .tempdir()
        .context("temporary directory")?;
    let mut runs = Vec::new();
    for &r in &a.rounds {
        let file = tmp.path().join(format!("rounds-{r}.toml"));
        super::scale::AddOneJob {
            clients: a.clients,
            rounds: r,
            timeout_secs: 120,
            tensors: 4,
            elements,
        }
        .write(&file)?;
        eprintln!("sim of the add-one job, {} clients, {r} rounds ...", a.clients);
        let (summary, wall) = super::scale::sim_child(&file, a.timeout_secs).await?;
        let rss = summary["peak_rss_bytes"].as_u64().unwrap_or(0);
        eprintln!(
            "{r} rounds: peak RSS {:.1} MiB, {wall:.1} s, verified {}",
            rss as f64 / (1 << 20) as f64,
            summary["verified"]
        );
        runs.push(json!({
            "rounds": r,
            "peak_rss_bytes": rss,
            "wall_secs": wall,
            "verified": summary["verified"],
        }));
    }
    let first = runs
        .first()
        .and_then(|r| r["peak_rss_bytes"].as_f64())
        .unwrap_or(f64::NAN);
    let last = runs
        .last()
        .and_then(|r| r["peak_rss_bytes"].as_f64())
        .unwrap_or(f64::NAN);
    let verified = runs.iter().all(|r| r["verified"] == true);
    let out = json!({
        "bench": "rounds",
        "model_bytes": elements * 16,
        "clients": a.clients,
        "runs": runs,
        "rss_ratio_last_to_first": last / first,
        "verified": verified,
    });
    if a.json {
        println!("{out}");
    } else {
        println!(
            "rounds: peak RSS ratio {:.3} (last run to first), verified {verified}",
            last / first
        );
    }
    ensure!(verified, "an add-one result is wrong");
    Ok(())
}
