//! `flare-node bench`: measure the runtime against baselines, between separate processes.
//!
//! # `bench blob`
//! Moves `--size` bytes from a sender process to a receiver process over 127.0.0.1, three
//! ways, each with a fresh pair of processes (this executable, run as the hidden
//! `flare-node bench-peer <role>`), one after the other:
//!
//! 1. **plain TCP** (`baseline_tcp_mib_per_s`): a tokio socket; the sender writes 1 MiB
//!    buffers, the receiver reads until EOF. Then **sealed TCP** (`baseline_bulk_mib_per_s`):
//!    the same with every 1 MiB sealed by the sender and opened by the receiver as the blob
//!    protocol's bulk channel does ([`flare_protocols::bulk`], AES-256-GCM), the bare
//!    transport of a blob sent over the bulk channel (the default), so `ratio_to_bulk` is
//!    the protocol's own cost on it.
//! 2. **bare libp2p** (`baseline_libp2p_mib_per_s`): two [`flare_actors::Node`]s with the
//!    node's own transport (TCP, TLS or Noise, Yamux), one stream of the private protocol
//!    `/flare/bench-raw/1`; the sender writes 1 MiB buffers and closes, the receiver reads
//!    until EOF. No framing, no hashing, no disk.
//! 3. **flare blob** (`mib_per_s`): the sender generates the bytes (seeded PRNG, streamed)
//!    into its disk blob store (a memory store with `--source memory`), then the receiver
//!    pulls the blob with `Node::fetch` into its own disk store (a memory store with `--dest
//!    memory`, every chunk still verified) over `/flare/blob/1`, and
//!    re-hashes what it stored (`verified`).
//! 4. **the disk** (`baseline_disk_mib_per_s`, in this process, after plain TCP): the same
//!    number of bytes copied from one scratch file to another past the page cache, the
//!    store's own reads and writes on two threads ([`disk`]): the ceiling of a transfer
//!    between two disk stores on one disk.
//!
//! With `--transports noise,tls` phases 2 and 3 run once per listed security (both children
//! restricted to it, [`flare_actors::network::Security`]), one after the other in every run,
//! so that the candidates are compared in the same sitting; the JSON's `transports` object has
//! each one's blob rate, bare-stream rate, ratio and CPU seconds per GiB on each side. The
//! top-level fields always describe the node's default (`default_transport`), which is measured
//! first even when not listed.
//!
//! Every time is taken **on the receiver, from the moment it has a connection to the moment
//! it holds the last byte**: TCP from `accept` to EOF; bare libp2p from the stream's accept to
//! EOF; blob from just before `fetch` (the connection already dialled) to `fetch`'s return,
//! which includes asking for the manifest, every chunk verified and written, and the stream
//! set-up of each unit of work. Data generation, import and the final re-hash are not timed.
//! Rates are in MiB/s (2^20 bytes); with `--runs N` each figure is the median of N runs.
//!
//! `sender_peak_rss_bytes` / `receiver_peak_rss_bytes` are the `VmHWM` (peak resident set)
//! of the two processes of phase 3, over their whole lives (the maximum over runs); page cache
//! is not counted. `*_cpu_user_secs` / `*_cpu_sys_secs` say where the time went: the
//! receiver's CPU time over its measured interval, the sender's from its `Ready` to its end.
//! A receiver whose system time far exceeds the bare-libp2p receiver's is paying for the page
//! cache: on virtual machines that hand freed memory back to the host (virtio-balloon free
//! page reporting), writing pages not touched for a few seconds costs several times a copy, so
//! the blob figure depends on how recently the machine's memory was used.
//!
//! Keys, stores and generated data live in one temporary directory removed at the end.
//! Children report on stdout and log on stderr (forwarded with a `[role]` prefix); they are
//! killed when the parent drops them and give up when their stdin closes, and every wait on
//! either side has a timeout (`--timeout-secs`).

mod cgroup;
mod child;
mod consortium;
mod disk;
mod fedavg;
mod peer;
mod rounds;
mod scale;
pub(crate) mod util;

pub use util::peak_rss_bytes;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, anyhow, bail, ensure};
use clap::{Args, Subcommand};
use flare_actors::network::Security;
use flare_protocols::blob::{DEFAULT_WINDOW, MAX_WINDOW};
use flare_protocols::blob_id::{MAX_CHUNK_SIZE, chunk_count};
use libp2p::PeerId;
use libp2p::identity::Keypair;
use serde_json::json;
use tokio::time::Instant;

use child::{ChildProc, Event, wait_received};
use util::{Cpu, fmt_bytes, median, mib_per_s, parse_size};

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Blob transfer between two processes, against plain-TCP and bare-libp2p baselines.
    Blob(BlobArgs),
    /// A FedAvg add-one job with every member in its own process.
    Fedavg(fedavg::FedAvgArgs),
    /// The add-one job with hundreds to thousands of members in `sim`, and with one process
    /// per member: round time and peak memory as the membership grows.
    Scale(scale::ScaleArgs),
    /// The add-one job in `sim` for a few round counts: peak memory as the rounds go on.
    Rounds(rounds::RoundsArgs),
    /// The add-one job submitted to a consortium of standing sites (`serve`), against `sim`
    /// in the same run: mean round, and the time from submission to round 0.
    Consortium(consortium::ConsortiumArgs),
}

/// Arguments of `flare-node bench blob`.
#[derive(Args)]
pub struct BlobArgs {
    /// Bytes to move: plain bytes or with a B/KiB/MiB/GiB suffix (e.g. 1GiB, 0.5MiB).
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    size: u64,
    /// Chunk size of the blob.
    #[arg(long, default_value = "1MiB", value_parser = parse_size)]
    chunk_size: u64,
    /// Chunks in flight per source during the fetch.
    #[arg(long, default_value_t = DEFAULT_WINDOW)]
    window: u32,
    /// Repeat everything this many times and report medians.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Print one JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Upper bound on any one wait, per phase, in seconds [default: 60 + 1 s per 4 MiB].
    #[arg(long)]
    timeout_secs: Option<u64>,
    /// Where to put the temporary directory [default: the system's temp dir].
    #[arg(long)]
    tmp_dir: Option<PathBuf>,
    /// Security protocols to measure, each with its own bare-stream baseline, in the same run
    /// (comma-separated: tls-or-noise, tls, noise) [default: the node's default only].
    #[arg(long, value_delimiter = ',')]
    transports: Vec<Security>,
    /// Where the sender holds the blob: `disk` (its disk store, read past the page cache as
    /// a node serves a model above `--stream-above`) or `memory` (a memory store, as a node
    /// serves a smaller model).
    #[arg(long, value_enum, default_value_t = SourceStore::Disk)]
    source: SourceStore,
    /// Where the receiver files the blob: `disk` (its disk store, written past the page
    /// cache) or `memory` (a memory store, every chunk still verified: no disk ceiling, but
    /// the receiver first-touches the blob's fresh memory as chunks land).
    #[arg(long, value_enum, default_value_t = SourceStore::Disk)]
    dest: SourceStore,
    /// The blob's chunks go over the libp2p stream, not a bulk connection (`run
    /// --no-bulk-channel`): the blob phase then compares with the bare libp2p stream.
    #[arg(long)]
    no_bulk_channel: bool,
}

/// Where `bench blob`'s sender holds the blob, or its receiver files it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SourceStore {
    /// A disk store.
    Disk,
    /// A memory store.
    Memory,
}

impl SourceStore {
    /// The name the JSON reports (the option's value).
    fn name(self) -> &'static str {
        match self {
            SourceStore::Disk => "disk",
            SourceStore::Memory => "memory",
        }
    }
}

/// One process of a benchmark (`flare-node bench-peer`).
#[derive(Args)]
pub struct PeerArgs {
    #[command(subcommand)]
    role: peer::Role,
}

/// Runs a benchmark.
pub async fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    let bench = async {
        match cmd {
            BenchCmd::Blob(args) => blob(args).await,
            BenchCmd::Fedavg(args) => fedavg::run(args).await,
            BenchCmd::Scale(args) => scale::run(args).await,
            BenchCmd::Rounds(args) => rounds::run(args).await,
            BenchCmd::Consortium(args) => consortium::run(args).await,
        }
    };
    // On Ctrl-C or SIGTERM, drop the benchmark so that its children are killed and its
    // temporary directory removed.
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing a SIGTERM handler")?;
    tokio::select! {
        r = bench => r,
        _ = tokio::signal::ctrl_c() => bail!("interrupted"),
        _ = term.recv() => bail!("terminated"),
    }
}

/// Runs one benchmark process.
pub async fn peer(args: PeerArgs) -> anyhow::Result<()> {
    peer::run(args.role).await
}

/// What the parent knows for every phase.
struct Setup {
    /// The securities measured, the node's default first.
    transports: Vec<Security>,
    size: u64,
    chunk_size: u32,
    window: u32,
    timeout: Duration,
    root: PathBuf,
    sender_key: PathBuf,
    sender_id: PeerId,
    receiver_key: PathBuf,
    receiver_id: PeerId,
    source: SourceStore,
    dest: SourceStore,
    no_bulk_channel: bool,
}

/// What one phase measured.
#[derive(Clone, Debug, Default)]
struct Phase {
    /// Measured seconds (on the receiver).
    secs: f64,
    /// The receiver's CPU time over the measured interval.
    receiver_cpu: Cpu,
    /// The sender's CPU time from its `Ready` to its end (sending or serving, plus idling).
    sender_cpu: Cpu,
    sender_peak_rss_bytes: u64,
    receiver_peak_rss_bytes: u64,
    /// Blob phase only.
    verified: bool,
    import_secs: f64,
    verify_secs: f64,
    source_errors: u64,
}

/// The figures of one run.
#[derive(Clone, Debug)]
struct RunResult {
    tcp: Phase,
    /// Plain TCP with the bulk channel's sealing.
    sealed: Phase,
    /// Seconds for the disk to copy the blob's bytes past the page cache ([`disk`]).
    disk_secs: f64,
    /// The default transport's (the first of `per_transport`).
    libp2p: Phase,
    blob: Phase,
    /// Bare stream and blob transfer per measured security, in `--transports` order.
    per_transport: Vec<(Phase, Phase)>,
}

async fn blob(args: BlobArgs) -> anyhow::Result<()> {
    ensure!(args.size > 0, "--size must be more than 0 bytes");
    let chunk_size = u32::try_from(args.chunk_size)
        .ok()
        .filter(|&c| c > 0 && c <= MAX_CHUNK_SIZE)
        .with_context(|| format!("--chunk-size must be 1 B to {}", fmt_bytes(MAX_CHUNK_SIZE.into())))?;
    chunk_count(args.size, chunk_size).context("--size in chunks of --chunk-size")?;
    ensure!(
        (1..=MAX_WINDOW).contains(&args.window),
        "--window must be 1 to {MAX_WINDOW} (a source honours no more)"
    );
    ensure!((1..=100).contains(&args.runs), "--runs must be 1 to 100");
    let timeout = Duration::from_secs(args.timeout_secs.unwrap_or(60 + args.size / (4 << 20)).max(1));

    let base = args.tmp_dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("flare-bench-")
        .tempdir_in(&base)
        .with_context(|| format!("creating a temporary directory in {}", base.display()))?;
    let (sender_key, sender_id) = write_key(tmp.path(), "sender.key")?;
    let (receiver_key, receiver_id) = write_key(tmp.path(), "receiver.key")?;
    let mut transports = vec![Security::default()];
    for t in &args.transports {
        if !transports.contains(t) {
            transports.push(*t);
        }
    }
    let setup = Setup {
        transports,
        size: args.size,
        chunk_size,
        window: args.window,
        timeout,
        root: tmp.path().to_owned(),
        sender_key,
        sender_id,
        receiver_key,
        receiver_id,
        source: args.source,
        dest: args.dest,
        no_bulk_channel: args.no_bulk_channel,
    };

    let mut results = Vec::new();
    for run in 1..=args.runs {
        eprintln!(
            "run {run}/{}: {} in chunks of {}, window {}",
            args.runs,
            fmt_bytes(args.size),
            fmt_bytes(chunk_size.into()),
            args.window
        );
        let r = one_run(&setup, run).await.with_context(|| format!("run {run}"))?;
        eprintln!(
            "run {run}: tcp {:.0} MiB/s, sealed tcp {:.0} MiB/s, disk copy {:.0} MiB/s",
            mib_per_s(args.size, r.tcp.secs),
            mib_per_s(args.size, r.sealed.secs),
            mib_per_s(args.size, r.disk_secs)
        );
        for (t, (bare, blob)) in setup.transports.iter().zip(&r.per_transport) {
            eprintln!(
                "run {run}: {t}: blob {:.0} MiB/s, bare libp2p {:.0} MiB/s",
                mib_per_s(args.size, blob.secs),
                mib_per_s(args.size, bare.secs)
            );
        }
        results.push(r);
    }
    tmp.close().context("removing the temporary directory")?;

    let med = |f: fn(&RunResult) -> f64| median(&results.iter().map(f).collect::<Vec<_>>());
    let secs = med(|r| r.blob.secs);
    let tcp_secs = med(|r| r.tcp.secs);
    let libp2p_secs = med(|r| r.libp2p.secs);
    let rate = mib_per_s(args.size, secs);
    let tcp_rate = mib_per_s(args.size, tcp_secs);
    let bulk_rate = mib_per_s(args.size, med(|r| r.sealed.secs));
    let libp2p_rate = mib_per_s(args.size, libp2p_secs);
    let disk_rate = mib_per_s(args.size, med(|r| r.disk_secs));
    let ratio = |base: f64| if base > 0.0 { rate / base } else { 0.0 };
    // CPU times come in 1/100 s ticks: keep two decimals.
    let cs = |x: f64| (x * 100.0).round() / 100.0;
    let sender_rss = results.iter().map(|r| r.blob.sender_peak_rss_bytes).max().unwrap_or(0);
    let receiver_rss = results
        .iter()
        .map(|r| r.blob.receiver_peak_rss_bytes)
        .max()
        .unwrap_or(0);
    let verified = results.iter().all(|r| r.blob.verified);
    let source_errors: u64 = results.iter().map(|r| r.blob.source_errors).sum();

    let gib = args.size as f64 / f64::from(1u32 << 30);
    let per_gib = |c: Cpu| cs((c.user + c.sys) / gib);
    let mut per_transport = serde_json::Map::new();
    for (i, t) in setup.transports.iter().enumerate() {
        let phase = |r: &RunResult, bare: bool| {
            let (b, f) = &r.per_transport[i];
            if bare { b.clone() } else { f.clone() }
        };
        let medp =
            |bare: bool, f: fn(&Phase) -> f64| median(&results.iter().map(|r| f(&phase(r, bare))).collect::<Vec<_>>());
        let cpu = |bare: bool, sender: bool| Cpu {
            user: medp(
                bare,
                if sender {
                    |p| p.sender_cpu.user
                } else {
                    |p| p.receiver_cpu.user
                },
            ),
            sys: medp(
                bare,
                if sender {
                    |p| p.sender_cpu.sys
                } else {
                    |p| p.receiver_cpu.sys
                },
            ),
        };
        let blob_rate = mib_per_s(args.size, medp(false, |p| p.secs));
        let bare_rate = mib_per_s(args.size, medp(true, |p| p.secs));
        per_transport.insert(
            t.name().into(),
            json!({
                "mib_per_s": blob_rate,
                "baseline_libp2p_mib_per_s": bare_rate,
                "ratio_to_libp2p": if bare_rate > 0.0 { blob_rate / bare_rate } else { 0.0 },
                "runs_mib_per_s": results.iter().map(|r| mib_per_s(args.size, phase(r, false).secs)).collect::<Vec<_>>(),
                "runs_baseline_libp2p_mib_per_s": results.iter().map(|r| mib_per_s(args.size, phase(r, true).secs)).collect::<Vec<_>>(),
                "sender_cpu_secs_per_gib": per_gib(cpu(false, true)),
                "receiver_cpu_secs_per_gib": per_gib(cpu(false, false)),
                "baseline_libp2p_sender_cpu_secs_per_gib": per_gib(cpu(true, true)),
                "baseline_libp2p_receiver_cpu_secs_per_gib": per_gib(cpu(true, false)),
                "verified": results.iter().all(|r| phase(r, false).verified),
            }),
        );
    }
    let verified = verified && results.iter().all(|r| r.per_transport.iter().all(|(_, b)| b.verified));

    if args.json {
        let out = json!({
            "bench": "blob",
            "default_transport": Security::default().name(),
            "transports": per_transport,
            "bytes": args.size,
            "secs": secs,
            "mib_per_s": rate,
            "baseline_tcp_mib_per_s": tcp_rate,
            "baseline_libp2p_mib_per_s": libp2p_rate,
            "baseline_disk_mib_per_s": disk_rate,
            "baseline_bulk_mib_per_s": bulk_rate,
            "ratio_to_bulk": ratio(bulk_rate),
            "bulk_channel": !args.no_bulk_channel,
            "runs_baseline_bulk_mib_per_s": results.iter().map(|r| mib_per_s(args.size, r.sealed.secs)).collect::<Vec<_>>(),
            "ratio_to_disk": ratio(disk_rate),
            "source": args.source.name(),
            "dest": args.dest.name(),
            "sender_peak_rss_bytes": sender_rss,
            "receiver_peak_rss_bytes": receiver_rss,
            "verified": verified,
            "ratio_to_libp2p": ratio(libp2p_rate),
            "ratio_to_tcp": ratio(tcp_rate),
            "baseline_tcp_secs": tcp_secs,
            "baseline_libp2p_secs": libp2p_secs,
            "chunk_size": chunk_size,
            "window": args.window,
            "runs": args.runs,
            "runs_mib_per_s": results.iter().map(|r| mib_per_s(args.size, r.blob.secs)).collect::<Vec<_>>(),
            "runs_baseline_disk_mib_per_s": results.iter().map(|r| mib_per_s(args.size, r.disk_secs)).collect::<Vec<_>>(),
            "import_secs": med(|r| r.blob.import_secs),
            "verify_secs": med(|r| r.blob.verify_secs),
            "source_errors": source_errors,
            "receiver_cpu_user_secs": cs(med(|r| r.blob.receiver_cpu.user)),
            "receiver_cpu_sys_secs": cs(med(|r| r.blob.receiver_cpu.sys)),
            "sender_cpu_user_secs": cs(med(|r| r.blob.sender_cpu.user)),
            "sender_cpu_sys_secs": cs(med(|r| r.blob.sender_cpu.sys)),
            "baseline_libp2p_receiver_cpu_user_secs": cs(med(|r| r.libp2p.receiver_cpu.user)),
            "baseline_libp2p_receiver_cpu_sys_secs": cs(med(|r| r.libp2p.receiver_cpu.sys)),
            "baseline_libp2p_sender_cpu_user_secs": cs(med(|r| r.libp2p.sender_cpu.user)),
            "baseline_libp2p_sender_cpu_sys_secs": cs(med(|r| r.libp2p.sender_cpu.sys)),
        });
        println!("{out}");
    } else {
        println!(
            "blob: {} in {secs:.3} s = {rate:.0} MiB/s ({:.2} x bare libp2p, {:.2} x plain TCP){}",
            fmt_bytes(args.size),
            ratio(libp2p_rate),
            ratio(tcp_rate),
            if args.runs > 1 {
                format!(", median of {} runs", args.runs)
            } else {
                String::new()
            }
        );
        println!(
            "  bare libp2p: {libp2p_rate:.0} MiB/s   plain TCP: {tcp_rate:.0} MiB/s   disk copy: {disk_rate:.0} MiB/s"
        );
        if setup.transports.len() > 1 {
            for (name, t) in &per_transport {
                println!(
                    "  {name}: blob {:.0} MiB/s, bare {:.0} MiB/s, ratio {:.2}; CPU-s per GiB: blob sender {} receiver {}, bare sender {} receiver {}",
                    t["mib_per_s"].as_f64().unwrap_or(0.0),
                    t["baseline_libp2p_mib_per_s"].as_f64().unwrap_or(0.0),
                    t["ratio_to_libp2p"].as_f64().unwrap_or(0.0),
                    t["sender_cpu_secs_per_gib"],
                    t["receiver_cpu_secs_per_gib"],
                    t["baseline_libp2p_sender_cpu_secs_per_gib"],
                    t["baseline_libp2p_receiver_cpu_secs_per_gib"],
                );
            }
        }
        println!(
            "  peak RSS: sender {}, receiver {}",
            fmt_bytes(sender_rss),
            fmt_bytes(receiver_rss)
        );
        println!("  received blob {}", if verified { "verified" } else { "NOT VERIFIED" });
    }
    if !verified {
        bail!("the received blob did not verify");
    }
    Ok(())
}

/// Writes a fresh identity key for one child (mode 0600).
pub(super) fn write_key(dir: &Path, name: &str) -> anyhow::Result<(PathBuf, PeerId)> {
    let key = Keypair::generate_ed25519();
    let path = dir.join(name);
    crate::keys::write_key(&path, &key)?;
    Ok((path, key.public().to_peer_id()))
}

async fn one_run(s: &Setup, run: u32) -> anyhow::Result<RunResult> {
    let tcp = tcp_phase(s, false).await.context("plain TCP baseline")?;
    let sealed = tcp_phase(s, true).await.context("sealed TCP baseline")?;
    let (dir, size, piece) = (s.root.join(format!("run{run}-disk")), s.size, s.chunk_size);
    let disk_secs = tokio::task::spawn_blocking(move || {
        let secs = disk::copy_secs(&dir, size, piece);
        let _ = std::fs::remove_dir_all(&dir);
        secs
    })
    .await
    .context("disk baseline task")?
    .context("disk baseline")?;
    let mut per_transport = Vec::new();
    for &t in &s.transports {
        let bare = libp2p_phase(s, t)
            .await
            .with_context(|| format!("bare libp2p baseline ({t})"))?;
        let blob = blob_phase(s, run, t)
            .await
            .with_context(|| format!("blob transfer ({t})"))?;
        per_transport.push((bare, blob));
    }
    let (libp2p, blob) = per_transport[0].clone();
    Ok(RunResult {
        tcp,
        sealed,
        disk_secs,
        libp2p,
        blob,
        per_transport,
    })
}

fn common_args(s: &Setup, role: &str) -> Vec<String> {
    vec![
        role.into(),
        "--size".into(),
        s.size.to_string(),
        "--timeout-secs".into(),
        s.timeout.as_secs().to_string(),
    ]
}

fn p2p_args(s: &Setup, role: &str, sender: bool, peer_addrs: &[String], security: Security) -> Vec<String> {
    let (key, peer) = if sender {
        (&s.sender_key, s.receiver_id)
    } else {
        (&s.receiver_key, s.sender_id)
    };
    let mut a = common_args(s, role);
    a.extend([
        "--key".into(),
        key.display().to_string(),
        "--peer".into(),
        peer.to_string(),
        "--security".into(),
        security.name().into(),
    ]);
    if s.no_bulk_channel {
        a.push("--no-bulk-channel".into());
    }
    for addr in peer_addrs {
        a.extend(["--peer-addr".into(), addr.clone()]);
    }
    a
}

/// The `Ready` event's addresses (and blob, for a source).
fn ready(ev: Event, who: &str) -> anyhow::Result<(Vec<String>, Option<child::BlobSpec>, Option<f64>)> {
    match ev {
        Event::Ready {
            addrs,
            blob,
            import_secs,
        } if !addrs.is_empty() => Ok((addrs, blob, import_secs)),
        other => Err(anyhow!("the {who} sent {other:?} instead of its listen addresses")),
    }
}

/// Waits for the receiver's result, stops both children, and puts the figures together.
async fn finish_phase(
    s: &Setup,
    mut sender: ChildProc,
    mut receiver: ChildProc,
    deadline: Instant,
) -> anyhow::Result<Phase> {
    let ev = wait_received(&mut receiver, &mut sender, deadline).await?;
    let Event::Received {
        bytes,
        secs,
        verified,
        verify_secs,
        source_errors,
        cpu,
    } = ev
    else {
        bail!("unexpected result {ev:?}");
    };
    ensure!(bytes == s.size, "the receiver got {bytes} of {} bytes", s.size);
    let (sent, recvd) = tokio::join!(sender.stop(deadline), receiver.stop(deadline));
    let ((sender_rss, sender_cpu), (receiver_rss, _)) = (sent?, recvd?);
    Ok(Phase {
        secs,
        receiver_cpu: cpu,
        sender_cpu,
        sender_peak_rss_bytes: sender_rss,
        receiver_peak_rss_bytes: receiver_rss,
        verified: verified.unwrap_or(false),
        import_secs: 0.0,
        verify_secs: verify_secs.unwrap_or(0.0),
        source_errors: source_errors.unwrap_or(0),
    })
}

/// Plain TCP, or `sealed` as the bulk channel seals.
async fn tcp_phase(s: &Setup, sealed: bool) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + s.timeout;
    let seal = |mut a: Vec<String>| {
        if sealed {
            a.push("--sealed".into());
        }
        a
    };
    let mut receiver = ChildProc::spawn("tcp receiver", seal(common_args(s, "tcp-recv")))?;
    let (addrs, _, _) = ready(receiver.event(deadline).await?, "tcp receiver")?;
    let mut a = seal(common_args(s, "tcp-send"));
    a.extend(["--connect".into(), addrs[0].clone()]);
    let sender = ChildProc::spawn("tcp sender", a)?;
    finish_phase(s, sender, receiver, deadline).await
}

async fn libp2p_phase(s: &Setup, t: Security) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + s.timeout;
    let mut receiver = ChildProc::spawn("libp2p receiver", p2p_args(s, "raw-recv", false, &[], t))?;
    let (addrs, _, _) = ready(receiver.event(deadline).await?, "libp2p receiver")?;
    let sender = ChildProc::spawn("libp2p sender", p2p_args(s, "raw-send", true, &addrs, t))?;
    finish_phase(s, sender, receiver, deadline).await
}

async fn blob_phase(s: &Setup, run: u32, t: Security) -> anyhow::Result<Phase> {
    let deadline = Instant::now() + s.timeout;
    let mut a = p2p_args(s, "blob-send", true, &[], t);
    a.extend([
        "--dir".into(),
        s.root.join(format!("run{run}-{t}-sender")).display().to_string(),
        "--chunk-size".into(),
        s.chunk_size.to_string(),
        "--seed".into(),
        rand::random::<u64>().to_string(),
    ]);
    if s.source == SourceStore::Memory {
        a.push("--in-memory".into());
    }
    let mut sender = ChildProc::spawn("blob sender", a)?;
    let (addrs, blob, import_secs) = ready(sender.event(deadline).await?, "blob sender")?;
    let blob = blob.context("the blob sender did not say which blob it holds")?;
    ensure!(
        blob.len == s.size && blob.chunk_size == s.chunk_size,
        "the blob sender holds {blob:?}"
    );

    let mut a = p2p_args(s, "blob-recv", false, &addrs, t);
    a.extend([
        "--dir".into(),
        s.root.join(format!("run{run}-{t}-receiver")).display().to_string(),
        "--blob-id".into(),
        blob.id.clone(),
        "--chunk-size".into(),
        blob.chunk_size.to_string(),
        "--window".into(),
        s.window.to_string(),
    ]);
    if s.dest == SourceStore::Memory {
        a.push("--in-memory".into());
    }
    let mut receiver = ChildProc::spawn("blob receiver", a)?;
    ready(receiver.event(deadline).await?, "blob receiver")?;
    let mut phase = finish_phase(s, sender, receiver, deadline).await?;
    phase.import_secs = import_secs.unwrap_or(0.0);
    Ok(phase)
}
