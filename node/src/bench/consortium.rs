//! `flare-node bench consortium`: what standing sites cost a job, against `sim` in the same
//! run (issue 17).
//!
//! The parent makes a temporary consortium with `flare-node init`: a controller site `server`
//! that does not train and the clients `site-1` ... `site-N`, each on a port of its own on
//! 127.0.0.1, every site's `members.toml` the whole consortium, and a submitter key of the
//! benchmark's own in every site's policy. It starts each `flare-node serve` as a child
//! process (stderr to `logs/<site>.log`), waits until each says "Ctrl-C to stop", and checks
//! that each port has exactly one listener (libp2p reuses ports, so a bind that succeeded
//! proves nothing: another process could share the port).
//!
//! Each run then does two things, one after the other: `flare-node sim` of the add-one FedAvg
//! job (one tensor of `--elements` floats, every client needed every round) in a child
//! process, and the same job file signed and submitted to `server` with `flare-node submit`,
//! the very command a researcher runs. The job's figures come from the controller site's
//! `jobs/<id>/results.json`: its `round_secs`, and `started_at_ms`, the wall-clock moment its
//! workflow began (round 0's start). `submit_to_round0_secs` runs from just before the
//! submit command is started to that moment: the submitter's own peer coming up, the
//! signature, the site's admission, the offer to every member, the launch, and the clients
//! joining the controller.
//!
//! A round's mean is over rounds 1.. (round 0, which makes the connections and content
//! addresses of the job, is reported apart as `*_round0_secs`). With `--runs N` every figure
//! is the median over the runs, and `daemon_to_sim_ratio` the median of each run's ratio (the
//! two halves of a run are measured back to back, so the machine's drift cancels).
//!
//! Every site is stopped with SIGINT and must exit cleanly; on an error every child is killed,
//! the temporary directory is kept (its path is printed) and the failing site's log tail is
//! part of the error.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::util::median;
use crate::site::records::now_ms;

/// Arguments of `flare-node bench consortium`.
#[derive(Args)]
pub struct ConsortiumArgs {
    /// Client sites (the controller's site is one more, and does not train).
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// Rounds of the job.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
    /// Floats in the add-one model (one tensor).
    #[arg(long, default_value_t = 1000)]
    elements: usize,
    /// Runs (each a `sim` and a submitted job); with more than one, figures are medians
    /// (on a 2-core machine running nine processes, one run's ratio varies by ±20%).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on each wait (sites starting, a job, a sim), in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_secs: u64,
    /// Where to put the temporary directory [default: the system's temp dir].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
}

/// The controller's site.
const CONTROLLER: &str = "server";
/// The benchmark's submitter key, in the temporary directory.
const SUBMITTER_KEY: &str = "bench.key";
/// The job file, submitted to the sites and run by `sim`.
const JOB_FILE: &str = "addone.toml";
/// How often the parent looks at a log or for a result file.
const POLL: Duration = Duration::from_millis(50);

/// The add-one FedAvg job on `clients` client sites and the controller's site, as a job file
/// (members by name: the sites' tables say where each is; `sim` makes its own keys).
fn job_text(clients: usize, rounds: u32, elements: usize) -> String {
    let mut s = format!(
        "[job]\nname = \"bench-consortium\"\nworkflow = \"fedavg\"\ncontroller = \"{CONTROLLER}\"\n\n\
         [fedavg]\nrounds = {rounds}\nmin_clients = {clients}\nround_timeout_secs = 60\n\n\
         [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 1\nelements = {elements}\nseed = 1\n\n\
         [[member]]\nname = \"{CONTROLLER}\"\n"
    );
    for n in client_names(clients) {
        s.push_str(&format!("[[member]]\nname = \"{n}\"\n"));
    }
    s
}

fn client_names(clients: usize) -> impl Iterator<Item = String> {
    (1..=clients).map(|i| format!("site-{i}"))
}

/// Round 0 and the mean of rounds 1.. of a summary's `round_secs`, which must hold `rounds`.
fn round_figures(summary: &Value, rounds: u32) -> anyhow::Result<(f64, f64)> {
    let r: Vec<f64> = summary["round_secs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    ensure!(
        r.len() == rounds as usize && r.len() >= 2,
        "the summary has {} round times, not {rounds}: {}",
        r.len(),
        summary["round_secs"]
    );
    Ok((r[0], r[1..].iter().sum::<f64>() / (r.len() - 1) as f64))
}

/// What one run measured.
#[derive(Clone, Debug, PartialEq)]
struct RunFigures {
    sim_round0: f64,
    sim_mean: f64,
    daemon_round0: f64,
    daemon_mean: f64,
    /// From the submit command's start to round 0's start at the controller.
    submit_to_round0: f64,
    /// The submit command's run (every member took the job when it returns).
    submit_secs: f64,
    verified: bool,
}

impl RunFigures {
    fn ratio(&self) -> f64 {
        self.daemon_mean / self.sim_mean
    }
}

/// The benchmark's JSON object: each figure the median over `runs`.
fn report(clients: usize, rounds: u32, elements: usize, runs: &[RunFigures]) -> Value {
    let med = |f: fn(&RunFigures) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    json!({
        "bench": "consortium",
        "clients": clients,
        "rounds": rounds,
        "elements": elements,
        "runs": runs.len(),
        "daemon_mean_round_secs": med(|r| r.daemon_mean),
        "sim_mean_round_secs": med(|r| r.sim_mean),
        "daemon_to_sim_ratio": med(RunFigures::ratio),
        "submit_to_round0_secs": med(|r| r.submit_to_round0),
        "daemon_round0_secs": med(|r| r.daemon_round0),
        "sim_round0_secs": med(|r| r.sim_round0),
        "submit_secs": med(|r| r.submit_secs),
        "verified": !runs.is_empty() && runs.iter().all(|r| r.verified),
        "per_run": runs.iter().map(|r| json!({
            "daemon_mean_round_secs": r.daemon_mean,
            "sim_mean_round_secs": r.sim_mean,
            "daemon_to_sim_ratio": r.ratio(),
            "submit_to_round0_secs": r.submit_to_round0,
            "daemon_round0_secs": r.daemon_round0,
            "sim_round0_secs": r.sim_round0,
            "submit_secs": r.submit_secs,
        })).collect::<Vec<_>>(),
    })
}

/// Sockets listening on TCP port `port` in a `/proc/net/tcp` or `/proc/net/tcp6` table.
fn listeners(table: &str, port: u16) -> usize {
    let port = format!("{port:04X}");
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // `sl local_address rem_address st ...`; 0A is LISTEN.
            f.len() > 3 && f[3] == "0A" && f[1].rsplit_once(':').is_some_and(|(_, p)| p == port)
        })
        .count()
}

/// `n` distinct ports free a moment ago: all are held at once while they are picked.
fn free_ports(n: usize) -> anyhow::Result<Vec<u16>> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .context("picking free ports")?;
    held.iter()
        .map(|l| Ok(l.local_addr()?.port()))
        .collect::<std::io::Result<_>>()
        .context("picking free ports")
}

/// Runs this executable with `args` to its end (bounded); its stdout, or an error with its
/// stderr.
async fn cli(args: &[&str], what: &str, timeout: Duration) -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("locating flare-node")?;
    let child = Command::new(exe)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    let out = tokio::time::timeout(timeout, child.wait_with_output())
        .await
        .map_err(|_| anyhow!("{what} did not finish within {} s", timeout.as_secs()))?
        .with_context(|| format!("waiting for {what}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

/// One site of the temporary consortium, and its `serve` process once started.
struct Site {
    name: String,
    dir: PathBuf,
    log: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl Site {
    fn log_text(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The last lines of the site's log, for an error.
    fn tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "last lines of {} ({}):\n{}",
            self.name,
            self.log.display(),
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Whether its process has exited, and how.
    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut().and_then(|c| c.try_wait().ok().flatten())
    }

    /// The first line of the log with every one of `words`, waiting for it until `deadline`;
    /// fails at once if the process exits.
    async fn wait_for(&mut self, words: &[&str], deadline: Instant) -> anyhow::Result<String> {
        loop {
            if let Some(l) = self.log_text().lines().find(|l| words.iter().all(|w| l.contains(w))) {
                return Ok(l.to_owned());
            }
            if let Some(status) = self.exited() {
                bail!(
                    "{} exited ({status}) before logging {words:?}; {}",
                    self.name,
                    self.tail()
                );
            }
            if Instant::now() >= deadline {
                bail!("{} did not log {words:?} in time; {}", self.name, self.tail());
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The temporary consortium.
struct Consortium {
    root: PathBuf,
    sites: Vec<Site>,
}

impl Consortium {
    fn path(&self, name: &str) -> String {
        self.root.join(name).display().to_string()
    }

    /// Makes the sites with `init`, each listening on its own port; every members.toml is
    /// the whole consortium and every policy lets the benchmark's key submit.
    async fn make(root: &Path, clients: usize, timeout: Duration) -> anyhow::Result<Self> {
        let names: Vec<String> = std::iter::once(CONTROLLER.to_owned())
            .chain(client_names(clients))
            .collect();
        let ports = free_ports(names.len())?;
        std::fs::create_dir_all(root.join("logs")).context("creating the log directory")?;
        let (_, submitter) = super::write_key(root, SUBMITTER_KEY)?;
        let mut sites = Vec::new();
        let mut table = String::new();
        for (name, port) in names.into_iter().zip(ports) {
            let dir = root.join(&name);
            let d = dir.display().to_string();
            let listen = format!("/ip4/127.0.0.1/tcp/{port}");
            cli(
                &["init", &d, "--name", &name, "--listen", &listen],
                &format!("init of {name}"),
                timeout,
            )
            .await?;
            table.push_str(&std::fs::read_to_string(dir.join("members.toml")).context("members.toml")?);
            let policy = dir.join("site.toml");
            let mut text = std::fs::read_to_string(&policy).context("site.toml")?;
            text.push_str(&format!(
                "\n[[submitter]]\nname = \"bench\"\npeer_id = \"{submitter}\"\nrole = \"researcher\"\n"
            ));
            std::fs::write(&policy, text).with_context(|| format!("writing {}", policy.display()))?;
            let log = root.join("logs").join(format!("{name}.log"));
            sites.push(Site {
                name,
                dir,
                log,
                port,
                child: None,
            });
        }
        for s in &sites {
            let path = s.dir.join("members.toml");
            std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
        }
        Ok(Self {
            root: root.to_owned(),
            sites,
        })
    }

    /// Starts every site's `serve` and waits until each is up, alone on its port.
    async fn start(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("locating flare-node")?;
        for s in &mut self.sites {
            let log = std::fs::File::create(&s.log).with_context(|| format!("creating {}", s.log.display()))?;
            let child = Command::new(&exe)
                .arg("serve")
                .arg(&s.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::from(log))
                .kill_on_drop(true)
                .spawn()
                .with_context(|| format!("starting site {}", s.name))?;
            s.child = Some(child);
        }
        let deadline = Instant::now() + timeout;
        for s in &mut self.sites {
            let addr = format!("/ip4/127.0.0.1/tcp/{}", s.port);
            s.wait_for(&["Ctrl-C to stop", &addr], deadline).await?;
        }
        let tables: String = ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|p| std::fs::read_to_string(p).ok())
            .collect();
        for s in &self.sites {
            let n = listeners(&tables, s.port);
            ensure!(
                tables.is_empty() || n == 1,
                "port {} of site {} has {n} listeners: another process shares it; run again",
                s.port,
                s.name
            );
        }
        Ok(())
    }

    /// Submits the job as the benchmark's key, waits for its results at the controller's
    /// site and for every site's part to end; the run's daemon figures.
    async fn job(&mut self, rounds: u32, timeout: Duration) -> anyhow::Result<(f64, f64, f64, f64, bool)> {
        let (job, key, members) = (
            self.path(JOB_FILE),
            self.path(SUBMITTER_KEY),
            self.sites[0].dir.join("members.toml").display().to_string(),
        );
        let submitted_ms = now_ms();
        let clock = Instant::now();
        let out = cli(
            &["submit", &job, "--key", &key, "--members", &members, "--to", CONTROLLER],
            "flare-node submit",
            timeout,
        )
        .await
        .map_err(|e| anyhow!("{e:#}\n{}", self.sites[0].tail()))?;
        let submit_secs = clock.elapsed().as_secs_f64();
        let id = out
            .split_whitespace()
            .find(|w| w.starts_with('j') && w.len() == 17)
            .with_context(|| format!("submit printed no job id: {out:?}"))?
            .to_owned();
        eprintln!("job {id} taken by every site in {submit_secs:.3} s; waiting for its results ...");
        let results = self.sites[0].dir.join("jobs").join(&id).join("results.json");
        let deadline = Instant::now() + timeout;
        let ended = ["this site's part of the job ended", id.as_str()];
        let mut polls = 0u32;
        let summary = loop {
            // Written whole before the part's end is logged; a half-written file is read again.
            if let Some(v) = std::fs::read(&results)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            {
                break v["summary"].clone();
            }
            let server = &mut self.sites[0];
            if let Some(status) = server.exited() {
                bail!("{CONTROLLER} exited ({status}) during job {id}; {}", server.tail());
            }
            // The log (long under RUST_LOG=debug) is read twice a second, not at every poll.
            polls += 1;
            if polls.is_multiple_of(10)
                && let Some(l) = server.log_text().lines().find(|l| ended.iter().all(|w| l.contains(w)))
                && !results.exists()
            {
                bail!("job {id} ended at {CONTROLLER} without results: {l}\n{}", server.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "no {} within {} s of the submission; {}",
                    results.display(),
                    timeout.as_secs(),
                    server.tail()
                );
            }
            tokio::time::sleep(POLL).await;
        };
        // Every part ends before the next run: nothing of this job runs beside it.
        for s in &mut self.sites {
            s.wait_for(&ended, deadline).await?;
        }
        let (round0, mean) = round_figures(&summary, rounds).with_context(|| format!("job {id}'s results"))?;
        let started = summary["started_at_ms"]
            .as_u64()
            .with_context(|| format!("job {id}'s results have no started_at_ms"))?;
        let to_round0 = (started as f64 - submitted_ms as f64) / 1000.0;
        Ok((round0, mean, to_round0, submit_secs, summary["verified"] == true))
    }

    /// Stops every site with SIGINT and waits for each to exit; every one must exit cleanly.
    async fn stop(&mut self, timeout: Duration) -> anyhow::Result<()> {
        for s in &self.sites {
            if let Some(pid) = s.child.as_ref().and_then(Child::id) {
                // `kill`, as a user's Ctrl-C would: this crate has no unsafe code for libc.
                let sent = std::process::Command::new("kill")
                    .args(["-INT", &pid.to_string()])
                    .status();
                if !sent.is_ok_and(|s| s.success()) {
                    tracing::warn!(site = %s.name, pid, "could not send SIGINT");
                }
            }
        }
        let deadline = Instant::now() + timeout;
        let mut failed = Vec::new();
        for s in &mut self.sites {
            let Some(mut child) = s.child.take() else { continue };
            match tokio::time::timeout_at(deadline, child.wait()).await {
                Ok(Ok(status)) if status.success() => {}
                Ok(Ok(status)) => failed.push(format!("{} exited with {status}; {}", s.name, s.tail())),
                Ok(Err(e)) => failed.push(format!("waiting for {}: {e}", s.name)),
                Err(_) => {
                    let _ = child.kill().await;
                    failed.push(format!(
                        "{} did not stop within {} s of Ctrl-C; {}",
                        s.name,
                        timeout.as_secs(),
                        s.tail()
                    ));
                }
            }
        }
        ensure!(failed.is_empty(), "{}", failed.join("\n"));
        Ok(())
    }

    /// Kills every site still running and waits for it (no process outlives the benchmark);
    /// says on stderr which had already exited, with its log.
    async fn kill(&mut self) {
        for s in &mut self.sites {
            if let Some(status) = s.exited() {
                eprintln!("site {} had exited ({status}); {}", s.name, s.tail());
            }
            if let Some(mut child) = s.child.take() {
                let _ = child.kill().await;
            }
        }
    }
}

/// Runs the benchmark.
pub async fn run(a: ConsortiumArgs) -> anyhow::Result<()> {
    ensure!((1..=64).contains(&a.clients), "--clients must be 1 to 64");
    ensure!(a.rounds >= 2, "--rounds must be at least 2 (round 0 is reported apart)");
    ensure!(a.elements >= 1, "--elements must be at least 1");
    ensure!((1..=100).contains(&a.runs), "--runs must be 1 to 100");
    let timeout = Duration::from_secs(a.timeout_secs.max(1));
    let base = a.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("flare-bench-consortium-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temporary directory in {}", base.display()))?;
    std::fs::write(tmp.path().join(JOB_FILE), job_text(a.clients, a.rounds, a.elements)).context("writing the job")?;
    eprintln!(
        "consortium: {} client sites and {CONTROLLER}, each `flare-node serve` in {}",
        a.clients,
        tmp.path().display()
    );
    let mut c = Consortium::make(tmp.path(), a.clients, timeout).await?;
    let measured = async {
        c.start(timeout).await?;
        eprintln!("every site is up");
        let mut runs = Vec::new();
        for run in 1..=a.runs {
            runs.push(
                one_run(&mut c, &a, run, timeout)
                    .await
                    .with_context(|| format!("run {run}"))?,
            );
        }
        c.stop(timeout).await?;
        anyhow::Ok(runs)
    }
    .await;
    let runs = match measured {
        Ok(runs) => runs,
        Err(e) => {
            c.kill().await;
            let kept = tmp.keep();
            eprintln!("the consortium's files and logs are kept in {}", kept.display());
            return Err(e);
        }
    };
    tmp.close().context("removing the temporary directory")?;
    let out = report(a.clients, a.rounds, a.elements, &runs);
    if a.json {
        println!("{out}");
    } else {
        println!(
            "consortium: mean round {:.4} s on standing sites, {:.4} s in sim ({:.2} x); submission to round 0 {:.3} s; verified {}",
            out["daemon_mean_round_secs"].as_f64().unwrap_or(f64::NAN),
            out["sim_mean_round_secs"].as_f64().unwrap_or(f64::NAN),
            out["daemon_to_sim_ratio"].as_f64().unwrap_or(f64::NAN),
            out["submit_to_round0_secs"].as_f64().unwrap_or(f64::NAN),
            out["verified"]
        );
    }
    ensure!(out["verified"] == true, "an add-one result is wrong");
    Ok(())
}

/// One `sim` of the job, then the job submitted to the standing sites.
async fn one_run(c: &mut Consortium, a: &ConsortiumArgs, run: u32, timeout: Duration) -> anyhow::Result<RunFigures> {
    eprintln!("run {run}/{}: sim of the job ...", a.runs);
    let (sim, _) = super::scale::sim_child(&c.root.join(JOB_FILE), timeout.as_secs()).await?;
    let (sim_round0, sim_mean) = round_figures(&sim, a.rounds).context("the sim's summary")?;
    eprintln!(
        "run {run}: sim round 0 {sim_round0:.4} s, later rounds {sim_mean:.4} s, verified {}",
        sim["verified"]
    );
    eprintln!("run {run}/{}: the job submitted to {CONTROLLER} ...", a.runs);
    let (daemon_round0, daemon_mean, submit_to_round0, submit_secs, verified) = c.job(a.rounds, timeout).await?;
    eprintln!(
        "run {run}: standing sites round 0 {daemon_round0:.4} s, later rounds {daemon_mean:.4} s ({:.2} x sim), \
         submission to round 0 {submit_to_round0:.3} s, verified {verified}",
        daemon_mean / sim_mean
    );
    Ok(RunFigures {
        sim_round0,
        sim_mean,
        daemon_round0,
        daemon_mean,
        submit_to_round0,
        submit_secs,
        verified: verified && sim["verified"] == true,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_job_parses_with_a_controller_that_does_not_train_and_every_client_needed() -> anyhow::Result<()> {
        let topo = crate::topology::Topology::parse(Path::new("addone.toml"), &job_text(3, 5, 1000))?;
        assert_eq!(topo.controller.as_deref(), Some(CONTROLLER));
        assert_eq!(topo.clients, ["site-1", "site-2", "site-3"]);
        assert_eq!((topo.rounds, topo.min_clients), (5, 3));
        assert!(topo.members.iter().all(|(_, m)| m.is_none()), "members by name only");
        Ok(())
    }

    #[test]
    fn round_figures_keep_round_0_apart_and_want_every_round() -> anyhow::Result<()> {
        let s = json!({ "round_secs": [0.5, 0.01, 0.02, 0.03] });
        let (r0, mean) = round_figures(&s, 4)?;
        assert_eq!(r0, 0.5);
        assert!((mean - 0.02).abs() < 1e-12);
        assert!(round_figures(&s, 5).is_err());
        assert!(round_figures(&json!({}), 4).is_err());
        Ok(())
    }

    #[test]
    fn the_report_takes_medians_and_the_median_ratio() {
        let run = |daemon_mean: f64, sim_mean: f64, to0: f64| RunFigures {
            sim_round0: 0.2,
            sim_mean,
            daemon_round0: 0.3,
            daemon_mean,
            submit_to_round0: to0,
            submit_secs: 0.1,
            verified: true,
        };
        let runs = [run(0.012, 0.010, 0.6), run(0.010, 0.010, 0.9), run(0.030, 0.010, 0.7)];
        let r = report(8, 20, 1000, &runs);
        assert_eq!(
            (r["clients"].as_u64(), r["rounds"].as_u64(), r["elements"].as_u64()),
            (Some(8), Some(20), Some(1000))
        );
        assert_eq!(r["daemon_mean_round_secs"], 0.012);
        assert_eq!(r["sim_mean_round_secs"], 0.010);
        assert!((r["daemon_to_sim_ratio"].as_f64().unwrap_or_default() - 1.2).abs() < 1e-9);
        assert_eq!(r["submit_to_round0_secs"], 0.7);
        assert_eq!(r["verified"], true);
        assert_eq!(r["per_run"].as_array().map(Vec::len), Some(3));
        let mut wrong = runs.clone();
        wrong[1].verified = false;
        assert_eq!(report(8, 20, 1000, &wrong)["verified"], false);
        assert_eq!(report(8, 20, 1000, &[])["verified"], false);
    }

    #[test]
    fn listeners_are_counted_by_port_in_a_proc_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
              0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 1 1\n   \
              1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 2 1\n   \
              2: 0100007F:1F90 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 3 1\n   \
              3: 0100007F:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 4 1\n";
        assert_eq!(listeners(table, 8080), 2, "an established connection is no listener");
        assert_eq!(listeners(table, 80), 1);
        assert_eq!(listeners(table, 443), 0);
    }
}
