//! `flare-node bench fedavg`: the add-one FedAvg job with every member in its own OS process
//! (`flare-node run --topology`), over 127.0.0.1.
//!
//! The parent writes keys and a topology (`--keys` f32 tensors making `--model-mib` MiB),
//! starts the controller, reads its listen address from its log, starts the clients, and
//! waits for everyone to finish. Figures: the controller's own per-round wall-clock times and
//! its check of the exact result (from its summary JSON), and each process's peak resident
//! set (`VmHWM`, logged by `run` as it exits).

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use clap::Args;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use super::child::{ChildProc, Event};

/// Arguments of `flare-node bench fedavg`.
#[derive(Args)]
pub struct FedAvgArgs {
    /// Model size in MiB (fractions allowed, e.g. 0.004).
    #[arg(long, default_value_t = 256.0)]
    model_mib: f64,
    /// Number of tensors the model is cut into.
    #[arg(long, default_value_t = 64)]
    keys: usize,
    /// Clients (each its own process; the controller is one more).
    #[arg(long, default_value_t = 2)]
    clients: usize,
    /// Rounds.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on the whole job, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Extra tracing directives for every member (e.g. `flare_actors=debug`, which logs
    /// when each step of a round ends); their whole logs are then echoed on stderr.
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// Caps the controller's upload (`run --max-upload`, e.g. `200MiB` a second): round 0
    /// then shows how many models the controller sends (`controller_models_sent_per_round`)
    /// against the time one copy takes at that rate (`round0_over_one_copy`).
    #[arg(long, value_parser = super::util::parse_size)]
    max_upload: Option<u64>,
    /// The clients share the upload of each round's model (`[fedavg] share_upload`): each
    /// pulls its share from the controller and the rest from the others. The clients then
    /// listen on fixed loopback ports, written in the topology, so they can reach each other.
    #[arg(long)]
    share_upload: bool,
    /// Models larger than this live on disk in every member (`run --stream-above`, e.g. `0`
    /// to stream every size) [default: run's].
    #[arg(long, value_parser = super::util::parse_size)]
    stream_above: Option<u64>,
    /// Every member sends and takes model chunks over libp2p streams only (`run
    /// --no-bulk-channel`), to compare with the bulk channel in one sitting.
    #[arg(long)]
    no_bulk_channel: bool,
    /// Runs the swarm workflow instead (`swarm`): every member, `server` included, trains,
    /// and each round's aggregator is the next in turn; every member listens on a fixed
    /// loopback port so they can reach each other.
    #[arg(long, value_enum, default_value_t = Workflow::Fedavg)]
    workflow: Workflow,
    /// Runs `site-1` in a memory cgroup with this limit (e.g. `1GiB`, page cache included),
    /// to show a member finishing with a model larger than its memory (needs root and a
    /// memory cgroup controller).
    #[arg(long, value_parser = super::util::parse_size)]
    memory_limit: Option<u64>,
}

/// Which workflow `bench fedavg` runs.
#[derive(Clone, Copy, PartialEq, Eq, Debug, clap::ValueEnum)]
pub enum Workflow {
    /// A controller (`server`) and its clients.
    Fedavg,
    /// Every member trains; the aggregator rotates.
    Swarm,
}

/// One child process and the lines of its stderr.
struct Proc {
    name: String,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    seen: Vec<String>,
    /// Every line is echoed as it comes (`--log`), not just the round reports.
    echo: bool,
}

impl Proc {
    /// Starts `flare-node ARGS`; in the cgroup whose `cgroup.procs` is `cgroup`, when given
    /// (through `sh`, which moves itself there and then becomes the process).
    fn spawn(
        name: &str,
        args: &[String],
        stdout: bool,
        log: Option<&str>,
        cgroup: Option<&Path>,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating flare-node")?;
        let filter = match log {
            Some(extra) => format!("info,libp2p_swarm=warn,{extra}"),
            None => "info,libp2p_swarm=warn".to_owned(),
        };
        let mut cmd = match cgroup {
            Some(procs) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg("echo $$ > \"$1\" && shift && exec \"$@\"")
                    .arg("sh")
                    .arg(procs)
                    .arg(exe);
                c
            }
            None => Command::new(exe),
        };
        let mut child = cmd
            .args(args)
            .env("RUST_LOG", filter)
            .stdin(Stdio::null())
            .stdout(if stdout { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let err = child.stderr.take().context("child stderr")?;
        let (tx, lines) = mpsc::unbounded_channel();
        let (echo, who) = (log.is_some(), name.to_owned());
        tokio::spawn(async move {
            let mut r = BufReader::new(err).lines();
            while let Ok(Some(l)) = r.next_line().await {
                if echo {
                    eprintln!("[{who}] {l}");
                }
                let _ = tx.send(l);
            }
        });
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
            seen: Vec::new(),
            echo: log.is_some(),
        })
    }

    /// Waits for a stderr line containing `word`, echoing progress lines.
    async fn wait_for(&mut self, word: &str, deadline: tokio::time::Instant) -> anyhow::Result<String> {
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(l)) => {
                    if !self.echo && l.contains("round done") {
                        eprintln!("[{}] {}", self.name, l);
                    }
                    self.seen.push(l.clone());
                    if l.contains(word) {
                        return Ok(l);
                    }
                }
                Ok(None) => bail!("{} ended before logging {word:?}:\n{}", self.name, self.tail()),
                Err(_) => bail!("{} did not log {word:?} in time:\n{}", self.name, self.tail()),
            }
        }
    }

    fn tail(&self) -> String {
        let from = self.seen.len().saturating_sub(15);
        self.seen[from..].join("\n")
    }

    /// Waits for the exit and returns the peak RSS the process logged.
    async fn finish(mut self, deadline: tokio::time::Instant) -> anyhow::Result<(u64, Option<String>)> {
        let mut stdout = self.child.stdout.take();
        let line = self.wait_for("peak_rss_bytes=", deadline).await?;
        let rss = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("peak_rss_bytes="))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("{}: no peak_rss_bytes in {line:?}", self.name))?;
        let status = tokio::time::timeout_at(deadline, self.child.wait())
            .await
            .map_err(|_| anyhow!("{} did not exit in time", self.name))??;
        let out = match stdout.as_mut() {
            Some(s) => {
                let mut text = String::new();
                tokio::io::AsyncReadExt::read_to_string(s, &mut text).await?;
                text.lines().last().map(str::to_owned)
            }
            None => None,
        };
        if !status.success() {
            // Why it failed comes after the peak line: take what it wrote before exiting.
            while let Ok(Some(l)) = tokio::time::timeout(Duration::from_secs(2), self.lines.recv()).await {
                self.seen.push(l);
            }
            bail!("{} failed ({status}):\n{}", self.name, self.tail());
        }
        Ok((rss, out))
    }
}

fn topology(
    path: &Path,
    a: &FedAvgArgs,
    elements: usize,
    members: &[(String, String, Option<String>)],
) -> anyhow::Result<()> {
    let workflow = match a.workflow {
        Workflow::Fedavg => format!(
            "[job]\nname = \"bench-fedavg\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
             [fedavg]\nrounds = {}\nmin_clients = {}\nround_timeout_secs = {}\nshare_upload = {}\n\n",
            a.rounds, a.clients, a.timeout_secs, a.share_upload
        ),
        Workflow::Swarm => format!(
            "[job]\nname = \"bench-swarm\"\nworkflow = \"swarm\"\n\n\
             [swarm]\nrounds = {}\nmin_clients = {}\nround_timeout_secs = {}\nshare_upload = {}\n\n",
            a.rounds,
            a.clients + 1,
            a.timeout_secs,
            a.share_upload
        ),
    };
    let mut s = format!(
        "{workflow}[learner]\nkind = \"add-one\"\n\n[model]\ntensors = {}\nelements = {elements}\nseed = 1\n\n",
        a.keys
    );
    for (name, id, addr) in members {
        let addrs = addr.as_ref().map(|x| format!("\"{x}\"")).unwrap_or_default();
        s.push_str(&format!(
            "[[member]]\nname = \"{name}\"\npeer_id = \"{id}\"\naddrs = [{addrs}]\n\n"
        ));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// A loopback TCP port free at the moment (the process that binds it next may lose a race to
/// another; the benchmark then fails to start, saying so).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr().context("finding a free port")?.port())
}

/// The transport's own cost of what round 0 moves: a bare libp2p stream (TCP + Noise +
/// Yamux, no hashing, storing or averaging) from a hub process to each of `clients` spoke
/// processes at once, `model_bytes` each, and as many back, every spoke sending once it has
/// received. Returns the seconds from the first stream to the last byte back. `sealed`: the
/// bytes go over TCP sealed as the blob protocol's bulk channel seals them (the hub tells
/// each spoke its port on the libp2p stream), the transport round 0 uses by default.
async fn bare_round(
    dir: &Path,
    model_bytes: u64,
    clients: usize,
    deadline: tokio::time::Instant,
    sealed: bool,
) -> anyhow::Result<f64> {
    let key = |name: &str| {
        super::write_key(dir, &format!("{name}.key")).map(|(path, id)| (path.display().to_string(), id.to_string()))
    };
    let common = |role: &str| {
        let mut v = vec![
            role.to_owned(),
            "--size".into(),
            model_bytes.to_string(),
            "--timeout-secs".into(),
            deadline
                .saturating_duration_since(tokio::time::Instant::now())
                .as_secs()
                .max(1)
                .to_string(),
        ];
        if sealed {
            v.push("--sealed".into());
        }
        v
    };
    let (hub_key, hub_id) = key("bare-hub")?;
    let spoke_keys = (0..clients)
        .map(|i| key(&format!("bare-spoke-{i}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut hub_args = common("round-hub");
    hub_args.extend(["--key".into(), hub_key]);
    for (_, id) in &spoke_keys {
        hub_args.extend(["--spoke".into(), id.clone()]);
    }
    let mut hub = ChildProc::spawn("bare hub", hub_args)?;
    let Event::Ready { addrs, .. } = hub.event(deadline).await? else {
        bail!("the bare hub did not report its addresses");
    };
    let mut spokes = Vec::new();
    for (k, _) in spoke_keys {
        let mut a = common("round-spoke");
        a.extend(["--key".into(), k, "--peer".into(), hub_id.clone()]);
        for addr in &addrs {
            a.extend(["--peer-addr".into(), addr.clone()]);
        }
        let mut spoke = ChildProc::spawn("bare spoke", a)?;
        match spoke.event(deadline).await? {
            Event::Ready { .. } => spokes.push(spoke),
            other => bail!("a bare spoke sent {other:?} instead of its addresses"),
        }
    }
    let secs = match hub.event(deadline).await? {
        Event::Received { secs, .. } => secs,
        other => bail!("the bare hub sent {other:?} instead of its result"),
    };
    hub.stop(deadline).await?;
    for s in spokes {
        s.stop(deadline).await?;
    }
    Ok(secs)
}

impl FedAvgArgs {
    /// The add-one job of `bench scale`: `clients` processes, a model of 1,000 floats.
    pub(super) fn small(clients: usize, rounds: u32, timeout_secs: u64) -> Self {
        Self {
            model_mib: 4000.0 / (1 << 20) as f64,
            keys: 1,
            clients,
            rounds,
            json: true,
            timeout_secs,
            log: None,
            max_upload: None,
            share_upload: false,
            stream_above: None,
            no_bulk_channel: false,
            workflow: Workflow::Fedavg,
            memory_limit: None,
        }
    }
}

/// Runs the benchmark.
pub async fn run(a: FedAvgArgs) -> anyhow::Result<()> {
    let out = measure(&a).await?;
    if a.json {
        println!("{out}");
    } else {
        println!(
            "fedavg: rounds {} (bare round {:.3} s), controller peak {:.2} x model, client peak {:.2} x model, verified {}",
            out["round_secs"],
            out["bare_round_secs"].as_f64().unwrap_or(f64::NAN),
            out["controller_rss_per_model"].as_f64().unwrap_or(f64::NAN),
            out["client_rss_per_model"].as_f64().unwrap_or(f64::NAN),
            out["verified"]
        );
    }
    ensure!(out["verified"].as_bool() == Some(true), "the add-one result is wrong");
    Ok(())
}

/// Runs the job and returns its figures (the JSON `bench fedavg` prints).
pub(super) async fn measure(a: &FedAvgArgs) -> anyhow::Result<Value> {
    ensure!(a.clients >= 1 && a.clients <= 64, "--clients must be 1 to 64");
    ensure!(a.keys >= 1, "--keys must be at least 1");
    ensure!(a.rounds >= 1, "--rounds must be at least 1");
    ensure!(
        a.model_mib.is_finite() && a.model_mib > 0.0,
        "--model-mib must be positive"
    );
    let elements = ((a.model_mib * 1024.0 * 1024.0 / 4.0 / a.keys as f64).round() as usize).max(1);
    let model_bytes = (elements * a.keys * 4) as u64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.timeout_secs);
    let tmp = tempfile::Builder::new()
        .prefix("flare-bench-fedavg-")
        .tempdir()
        .context("temporary directory")?;
    let dir = tmp.path();
    let names: Vec<String> = std::iter::once("server".to_owned())
        .chain((1..=a.clients).map(|i| format!("site-{i}")))
        .collect();
    let mut members = Vec::new();
    for (i, n) in names.iter().enumerate() {
        let (_, id) = super::write_key(dir, &format!("{n}.key"))?;
        // Clients that share the upload dial each other: they listen where the topology says.
        let addr = match (a.share_upload && i > 0) || a.workflow == Workflow::Swarm {
            true => Some(format!("/ip4/127.0.0.1/tcp/{}", free_port()?)),
            false => None,
        };
        members.push((n.clone(), id.to_string(), addr));
    }
    let listen: Vec<String> = members
        .iter()
        .map(|(_, _, addr)| addr.clone().unwrap_or_else(|| "/ip4/127.0.0.1/tcp/0".into()))
        .collect();
    eprintln!(
        "fedavg: {} MiB model in {} tensors, {} clients, {} rounds, one process per member",
        model_bytes as f64 / (1 << 20) as f64,
        a.keys,
        a.clients,
        a.rounds
    );
    let bare_libp2p = bare_round(dir, model_bytes, a.clients, deadline, false)
        .await
        .context("the bare libp2p round (baseline)")?;
    eprintln!(
        "bare libp2p round (round 0's bytes, {} MiB each way per client): {bare_libp2p:.3} s",
        model_bytes as f64 / (1 << 20) as f64
    );
    let bare_bulk = bare_round(dir, model_bytes, a.clients, deadline, true)
        .await
        .context("the bare sealed TCP round (baseline)")?;
    eprintln!("bare sealed TCP round (the bulk channel's transport): {bare_bulk:.3} s");
    // Round 0 is compared with the transport its models go over: the bulk channel's unless
    // it is off (models of 4 MiB and less go over libp2p streams either way).
    let bare = if a.no_bulk_channel || model_bytes <= flare_actors::blob::bulk::BULK_MIN_BYTES {
        bare_libp2p
    } else {
        bare_bulk
    };
    topology(&dir.join("server.toml"), a, elements, &members)?;
    let p = |s: &str| dir.join(s).display().to_string();
    let args = |name: &str, topo: &str| {
        let at = names.iter().position(|n| n == name).unwrap_or(0);
        let stream = a
            .stream_above
            .map(|b| vec!["--stream-above".to_owned(), b.to_string()])
            .unwrap_or_default();
        let mut v = vec![
            "run".to_owned(),
            "--topology".into(),
            p(topo),
            "--name".into(),
            name.into(),
            "--key".into(),
            p(&format!("{name}.key")),
            "--listen".into(),
            listen[at].clone(),
            "--data-dir".into(),
            p(&format!("{name}-data")),
        ];
        v.extend(stream);
        if a.no_bulk_channel {
            v.push("--no-bulk-channel".into());
        }
        v
    };
    let mut server_args = args("server", "server.toml");
    server_args.push("--json".into());
    if let Some(cap) = a.max_upload {
        server_args.extend(["--max-upload".to_owned(), cap.to_string()]);
        eprintln!(
            "the controller's upload is capped at {} a second",
            super::util::fmt_bytes(cap)
        );
    }
    let mut server = Proc::spawn("server", &server_args, true, a.log.as_deref(), None)?;
    let line = server.wait_for("listening", deadline).await?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .context("the controller logged no address")?
        .to_owned();
    members[0].2 = Some(addr);
    topology(&dir.join("clients.toml"), a, elements, &members)?;
    let capped = match a.memory_limit {
        Some(bytes) => {
            let group = super::cgroup::MemoryCgroup::create(&format!("flare-bench-{}", std::process::id()), bytes)?;
            eprintln!(
                "site-1 runs in a memory cgroup limited to {}",
                super::util::fmt_bytes(bytes)
            );
            Some(group)
        }
        None => None,
    };
    let clients: Vec<Proc> = names[1..]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let procs = capped.as_ref().filter(|_| i == 0).map(|g| g.procs_file());
            Proc::spawn(n, &args(n, "clients.toml"), false, a.log.as_deref(), procs.as_deref())
        })
        .collect::<anyhow::Result<_>>()?;
    let (server_rss, summary) = server.finish(deadline).await?;
    let mut client_rss = 0;
    let mut site1_rss = 0;
    for (i, c) in clients.into_iter().enumerate() {
        let rss = c.finish(deadline).await?.0;
        client_rss = client_rss.max(rss);
        if i == 0 {
            site1_rss = rss;
        }
    }
    let cgroup_peak = capped.as_ref().and_then(|g| g.peak_bytes());
    let limit_hits = capped.as_ref().and_then(|g| g.limit_hits());
    drop(capped);
    let summary: Value = serde_json::from_str(summary.as_deref().unwrap_or_default())
        .context("the controller printed no summary JSON")?;
    let round_secs = summary["round_secs"].clone();
    // The controller's own count: what it sent, a round on average (round 0 and the later
    // rounds move the same bytes: every round's global model is new).
    let sent = summary["bytes_sent_per_member"]["server"].as_u64();
    let one_copy = a.max_upload.map(|cap| model_bytes as f64 / cap as f64);
    let out = json!({
        "bench": "fedavg",
        "model_bytes": model_bytes,
        "keys": a.keys,
        "clients": a.clients,
        "rounds": a.rounds,
        "round_secs": round_secs,
        "total_secs": summary["total_secs"],
        "controller_peak_rss_bytes": server_rss,
        "client_peak_rss_bytes": client_rss,
        "controller_rss_per_model": server_rss as f64 / model_bytes as f64,
        "client_rss_per_model": client_rss as f64 / model_bytes as f64,
        "verified": summary["verified"],
        "bare_round_secs": bare,
        "bare_libp2p_round_secs": bare_libp2p,
        "bare_bulk_round_secs": bare_bulk,
        "round0_over_bare": summary["round_secs"][0].as_f64().map(|r| r / bare),
        "controller_max_upload": a.max_upload,
        "stream_above": a.stream_above,
        "bulk_channel": !a.no_bulk_channel,
        "workflow": format!("{:?}", a.workflow).to_lowercase(),
        "memory_limit": a.memory_limit,
        "capped_member_peak_rss_bytes": a.memory_limit.map(|_| site1_rss),
        "capped_member_cgroup_peak_bytes": cgroup_peak,
        "capped_member_limit_hits": limit_hits,
        "share_upload": a.share_upload,
        "controller_bytes_sent_per_round": sent,
        "controller_models_sent_per_round": sent.map(|b| b as f64 / model_bytes as f64),
        "one_copy_secs_at_cap": one_copy,
        "round0_over_one_copy": one_copy.and_then(|c| summary["round_secs"][0].as_f64().map(|r| r / c)),
    });
    Ok(out)
}
