//! `flare-node bench scale`: the add-one FedAvg job (a model of 1,000 floats) with many
//! members, in `sim` (every member in one process) for each `--members` count, and with one
//! process per member for `--processes` members.
//!
//! Each `sim` runs as a child process (`flare-node sim FILE --json`), so its peak resident set
//! (`peak_rss_bytes`, the child's own `VmHWM`) is that job's alone. Round 0 is reported apart
//! from the later rounds: it includes every member's first connection to the controller.
//! The per-process figures come from `bench fedavg` (the controller's and the largest
//! client's peak).

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use tokio::process::Command;

/// Arguments of `flare-node bench scale`.
#[derive(Args)]
pub struct ScaleArgs {
    /// Member counts to run in `sim`, comma-separated (the controller is one more).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,5000")]
    members: Vec<usize>,
    /// Members of the one-process-per-member run (0: skip it).
    #[arg(long, default_value_t = 64)]
    processes: usize,
    /// Rounds of each job.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on each job, in seconds.
    #[arg(long, default_value_t = 900)]
    timeout_secs: u64,
}

/// The add-one FedAvg job a `sim` benchmark runs: a controller and `clients` clients, all of
/// which every round needs, with a model of `tensors` f32 tensors of `elements` values.
pub(super) struct AddOneJob {
    /// Clients (`c0`, `c1`, ...; the controller is `server`).
    pub clients: usize,
    /// Rounds.
    pub rounds: u32,
    /// Round timeout, in seconds.
    pub timeout_secs: u64,
    /// Tensors of the model.
    pub tensors: usize,
    /// Values per tensor.
    pub elements: usize,
}

impl AddOneJob {
    /// Writes the job as a topology file.
    pub(super) fn write(&self, path: &std::path::Path) -> anyhow::Result<()> {
        let Self {
            clients,
            rounds,
            timeout_secs,
            tensors,
            elements,
        } = self;
        let mut s = format!(
            "[job]\nname = \"addone-{clients}x{rounds}\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
             [fedavg]\nrounds = {rounds}\nmin_clients = {clients}\nround_timeout_secs = {timeout_secs}\n\n\
             [learner]\nkind = \"add-one\"\n\n[model]\ntensors = {tensors}\nelements = {elements}\nseed = 1\n\n\
             [[member]]\nname = \"server\"\n"
        );
        for i in 0..*clients {
            s.push_str(&format!("[[member]]\nname = \"c{i}\"\n"));
        }
        std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
    }
}

/// Round 0, the mean of the later rounds, and that mean per member.
fn rounds(round_secs: &Value, members: usize) -> (f64, f64, f64) {
    let r: Vec<f64> = round_secs
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let first = r.first().copied().unwrap_or(f64::NAN);
    let later = &r[r.len().min(1)..];
    let mean = if later.is_empty() {
        first
    } else {
        later.iter().sum::<f64>() / later.len() as f64
    };
    (first, mean, mean / members.max(1) as f64)
}

/// Runs `flare-node sim FILE --json` in a child process (so its peak resident set is the
/// job's alone); returns its summary and the wall-clock seconds it took.
pub(super) async fn sim_child(file: &std::path::Path, timeout_secs: u64) -> anyhow::Result<(Value, f64)> {
    let exe = std::env::current_exe().context("locating flare-node")?;
    let started = std::time::Instant::now();
    let child = Command::new(exe)
        .arg("sim")
        .arg(file)
        .arg("--json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting sim")?;
    let out = tokio::time::timeout(Duration::from_secs(timeout_secs), child.wait_with_output())
        .await
        .with_context(|| format!("sim of {} did not finish in {timeout_secs} s", file.display()))??;
    let wall = started.elapsed().as_secs_f64();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = err.lines().rev().take(5).collect();
        bail!(
            "sim of {} failed ({}): {}",
            file.display(),
            out.status,
            tail.join(" | ")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .context("sim printed no summary JSON")?;
    Ok((summary, wall))
}

/// One `sim` of `n` clients.
async fn sim(dir: &std::path::Path, n: usize, a: &ScaleArgs) -> anyhow::Result<Value> {
    let file = dir.join(format!("scale-{n}.toml"));
    AddOneJob {
        clients: n,
        rounds: a.rounds,
        timeout_secs: a.timeout_secs,
        tensors: 1,
        elements: 1000,
    }
    .write(&file)?;
    let (summary, wall) = sim_child(&file, a.timeout_secs).await?;
    let (first, mean, per_member) = rounds(&summary["round_secs"], n);
    let rss = summary["peak_rss_bytes"].as_u64().unwrap_or(0);
    let row = json!({
        "members": n,
        "round0_secs": first,
        "round_secs": summary["round_secs"],
        "mean_round_secs": mean,
        "round_secs_per_member": per_member,
        "peak_rss_bytes": rss,
        "rss_per_member_bytes": rss / n.max(1) as u64,
        "wall_secs": wall,
        "verified": summary["verified"],
    });
    eprintln!(
        "sim, {n} members: round 0 {first:.3} s, later rounds {mean:.3} s ({:.3} ms a member), peak RSS {:.1} MiB ({:.0} KiB a member), verified {}",
        per_member * 1e3,
        rss as f64 / (1 << 20) as f64,
        rss as f64 / 1024.0 / n.max(1) as f64,
        summary["verified"]
    );
    Ok(row)
}

/// Runs the benchmark.
pub async fn run(a: ScaleArgs) -> anyhow::Result<()> {
    ensure!(a.rounds >= 2, "--rounds must be at least 2 (round 0 is reported apart)");
    ensure!(a.members.iter().all(|&n| n >= 1), "--members must be positive");
    ensure!(a.processes <= 64, "--processes must be at most 64");
    let tmp = tempfile::Builder::new()
        .prefix("flare-bench-scale-")
        .tempdir()
        .context("temporary directory")?;
    let mut sims = Vec::new();
    for &n in &a.members {
        eprintln!("sim of the add-one job, {n} members, {} rounds ...", a.rounds);
        sims.push(sim(tmp.path(), n, &a).await?);
    }
    let processes = if a.processes > 0 {
        eprintln!("the same job, {} members, one process each ...", a.processes);
        let f =
            super::fedavg::measure(&super::fedavg::FedAvgArgs::small(a.processes, a.rounds, a.timeout_secs)).await?;
        let (first, mean, per_member) = rounds(&f["round_secs"], a.processes);
        eprintln!(
            "processes, {} members: round 0 {first:.3} s, later rounds {mean:.3} s, controller peak {:.1} MiB, client peak {:.1} MiB, verified {}",
            a.processes,
            f["controller_peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            f["client_peak_rss_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
            f["verified"]
        );
        json!({
            "members": a.processes,
            "round0_secs": first,
            "round_secs": f["round_secs"],
            "mean_round_secs": mean,
            "round_secs_per_member": per_member,
            "controller_peak_rss_bytes": f["controller_peak_rss_bytes"],
            "client_peak_rss_bytes": f["client_peak_rss_bytes"],
            "verified": f["verified"],
        })
    } else {
        Value::Null
    };
    let verified = sims.iter().all(|s| s["verified"] == true) && (processes.is_null() || processes["verified"] == true);
    let out = json!({
        "bench": "scale",
        "model_bytes": 4000,
        "rounds": a.rounds,
        "sim": sims,
        "processes": processes,
        "verified": verified,
    });
    if a.json {
        println!("{out}");
    } else {
        println!("scale: verified {verified} (figures above, on stderr)");
    }
    ensure!(verified, "an add-one result is wrong");
    Ok(())
}
