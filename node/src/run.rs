//! `flare-node run`: one long-lived peer; with `--topology`, one member of a job.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use flare_actors::job::{Communicator, JobHost, Learner};
use flare_actors::{BlobStore, Members, Node, NodeConfig};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request};
use libp2p::{Multiaddr, PeerId};

use crate::topology::Topology;

/// Arguments of `flare-node run`.
#[derive(Args)]
#[command(group = clap::ArgGroup::new("table").required(true).args(["members", "topology"]))]
pub struct RunArgs {
    /// Identity key written by `flare-node keygen`.
    #[arg(long)]
    key: PathBuf,
    /// Member table (TOML, `[[member]]` entries); only these peers may connect.
    #[arg(long)]
    members: Option<PathBuf>,
    /// Topology file: run this member's part of its job (the members come from it).
    #[arg(long, requires = "name")]
    topology: Option<PathBuf>,
    /// This member's name in the topology.
    #[arg(long)]
    name: Option<String>,
    /// Address to listen on (repeatable) [default: the member's addresses in the topology,
    /// else /ip4/0.0.0.0/tcp/0].
    #[arg(long)]
    listen: Vec<Multiaddr>,
    /// Where blobs, checkpoints and results live.
    #[arg(long)]
    data_dir: PathBuf,
    /// Print the job's summary JSON as the last line of stdout (controller only).
    #[arg(long)]
    json: bool,
    /// Most bytes a second this node uploads as model chunks, to all peers together (e.g.
    /// `200MiB`) [default: no cap].
    #[arg(long, value_parser = crate::bench::util::parse_size)]
    max_upload: Option<u64>,
    /// Models larger than this (e.g. `1GiB`; `0`: every model) live on disk, not in memory:
    /// the controller folds each round's mean in a file, and a client whose learner trains
    /// tensor by tensor (add-one) updates the received model in place on disk [default:
    /// 512MiB].
    #[arg(long, value_parser = crate::bench::util::parse_size)]
    stream_above: Option<u64>,
    /// Sends and takes every model chunk over libp2p streams, never over a bulk connection
    /// of its own (a TCP connection per large transfer, AES-256-GCM sealed under a key
    /// exchanged inside the libp2p stream; see docs/architecture.md). For a peer whose
    /// firewall lets only the libp2p port through, or to compare the two.
    #[arg(long)]
    no_bulk_channel: bool,
}

/// How often a running peer re-dials members it has no connection to.
const REDIAL_EVERY: Duration = Duration::from_secs(10);
/// How long a client keeps asking to join before it gives up.
const JOIN_FOR: Duration = Duration::from_secs(600);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    run_with(args, None).await
}

/// Builds a site's desk once its node and job host are up (the desk offers jobs to the
/// other members through the node and runs its parts of jobs on the host).
pub(crate) type MakeDesk = Box<dyn FnOnce(Arc<Node>, Arc<JobHost>) -> flare_actors::job::SiteDesk + Send>;

/// A standing peer with `key` and `members`, listening on `listen`, its blobs under
/// `data_dir`: what `flare-node serve` runs for a site.
pub(crate) async fn standing(
    key: libp2p::identity::Keypair,
    members: Members,
    listen: Vec<Multiaddr>,
    data_dir: &std::path::Path,
    max_upload: Option<u64>,
    stream_above: Option<u64>,
    desk: MakeDesk,
) -> anyhow::Result<()> {
    let me = key.public().to_peer_id();
    let name = members.get(&me).map(|m| m.name.clone());
    run_peer(
        key,
        RunArgs {
            key: PathBuf::new(),
            members: None,
            topology: None,
            name,
            listen,
            data_dir: data_dir.to_owned(),
            json: false,
            max_upload,
            stream_above,
            no_bulk_channel: false,
        },
        Some(members),
        None,
        None,
        Some(desk),
    )
    .await
}

/// [`run`], with `learner` (when given) in place of the one the topology names: how the
/// Client API's `init` puts the training code behind this member's executor.
pub async fn run_with(args: RunArgs, learner: Option<Box<dyn Learner>>) -> anyhow::Result<()> {
    let keypair = crate::keys::load_key(&args.key)?;
    let topo = args.topology.as_deref().map(Topology::load).transpose()?;
    let members = match (&topo, &args.members) {
        (Some(t), _) => t.member_table()?,
        (None, Some(path)) => Members::load(path)?,
        (None, None) => bail!("give --members or --topology"),
    };
    run_peer(keypair, args, Some(members), topo, learner, None).await
}

/// The peer itself, its key and member table read.
async fn run_peer(
    keypair: libp2p::identity::Keypair,
    args: RunArgs,
    members: Option<Members>,
    topo: Option<Topology>,
    mut learner: Option<Box<dyn Learner>>,
    desk: Option<MakeDesk>,
) -> anyhow::Result<()> {
    let me = keypair.public().to_peer_id();
    let members = members.unwrap_or_default();
    let mut listen = args.listen.clone();
    if let (Some(t), Some(name)) = (&topo, &args.name) {
        let m = members
            .by_name(name)
            .with_context(|| format!("{}: no member named {name:?}", t.path.display()))?;
        if m.peer_id != me {
            bail!(
                "{} is the key of {me}, but {} says member {name:?} is {}",
                args.key.display(),
                t.path.display(),
                m.peer_id
            );
        }
        if listen.is_empty() {
            listen = m.addrs.clone();
        }
    } else if !members.contains(&me) {
        tracing::warn!(peer = %me, "this node is not in its own member list");
    }
    if listen.is_empty() {
        listen.push("/ip4/0.0.0.0/tcp/0".parse()?);
    }
    let store = BlobStore::open(&args.data_dir).with_context(|| format!("opening {}", args.data_dir.display()))?;
    if let Some(bytes) = args.stream_above {
        store.set_stream_above(bytes);
    }
    let others: Vec<_> = members.iter().filter(|m| m.peer_id != me).cloned().collect();
    let node = Arc::new(
        Node::start(NodeConfig {
            keypair,
            members: members.into(),
            listen,
            store,
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: args.max_upload,
            bulk_channel: !args.no_bulk_channel,
        })
        .await?,
    );
    // Listening for Ctrl-C before saying so: a signal that came between the two would be lost.
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).context("listening for Ctrl-C")?;
    tracing::info!(peer = %me, addrs = ?node.listen_addrs(), "flare-node running; Ctrl-C to stop");
    let host = Arc::new(JobHost::start(node.clone())?);
    // A site's standing peer answers submitted jobs and queries, and runs its parts of jobs.
    if let Some(make) = desk {
        host.serve_site(make(node.clone(), host.clone()));
    }
    let name = args.name.clone().unwrap_or_default();
    let job = topo.map(|t| async {
        let part = Part {
            node: &node,
            host: &host,
            name: &name,
            data_dir: &args.data_dir,
            stop: crate::on_ctrl_c(),
            resume: false,
        };
        let summary = member_of_job(part, t, &mut learner).await?;
        summary.map_or(Ok(()), |s| crate::render::report(&s, args.json))
    });
    let mut redial = tokio::time::interval(REDIAL_EVERY);
    let result = match job {
        // The job takes Ctrl-C itself: a controller must tell its clients before it exits.
        Some(job) => job.await,
        None => loop {
            tokio::select! {
                _ = interrupt.recv() => break Ok(()),
                _ = redial.tick() => {
                    let connected = node.net().connected_peers().await.unwrap_or_default();
                    for m in others.iter().filter(|m| !m.addrs.is_empty() && !connected.contains(&m.peer_id)) {
                        tracing::debug!(member = %m.name, peer = %m.peer_id, "dialing member");
                        let _ = node.net().dial(m.peer_id);
                    }
                }
            }
        },
    };
    match crate::bench::peak_rss_bytes() {
        Ok(b) => tracing::info!(peak_rss_bytes = b, bytes_sent = node.traffic().total(), "shutting down"),
        Err(_) => tracing::info!(bytes_sent = node.traffic().total(), "shutting down"),
    }
    node.net().shutdown();
    result
}

/// Where and how a member runs its part of a job.
pub(crate) struct Part<'a> {
    /// The member's node.
    pub node: &'a Arc<Node>,
    /// Its job host.
    pub host: &'a JobHost,
    /// Its name in the job.
    pub name: &'a str,
    /// Where the part's files go (checkpoints, outputs, a learner's work files).
    pub data_dir: &'a std::path::Path,
    /// Resolves, with why, when the part must end early.
    pub stop: crate::Stop,
    /// The member ran this part before it restarted: a FedAvg controller goes on from its
    /// last checkpoint with the clients that joined its earlier run.
    pub resume: bool,
}

/// This member's part of the topology's job, on `host`: the controller runs the workflow
/// once its clients have joined; a client joins and works until the controller ends the job;
/// a swarm member runs the same loop as every other. Ends early when `stop` resolves. Gives
/// the job's summary where this member has one (controller, swarm member).
pub(crate) async fn member_of_job(
    part: Part<'_>,
    topo: Topology,
    given: &mut Option<Box<dyn Learner>>,
) -> anyhow::Result<Option<serde_json::Value>> {
    let Part {
        node,
        host,
        name,
        data_dir,
        stop,
        resume,
    } = part;
    let setup = crate::job::Setup::new(&topo)?;
    let table = topo.member_table()?;
    let peer = |n: &str| table.by_name(n).map(|m| m.peer_id).context("member vanished");
    let job = JobId(topo.job.clone());
    let Some(controller_name) = topo.controller.clone() else {
        return swarm_member(node, host, &topo, &setup, name, data_dir, given, stop)
            .await
            .map(Some);
    };
    let controller = peer(&controller_name)?;
    let is_client = topo.clients.iter().any(|c| c == name);
    let mut start_executor = async || {
        host.join_as_executor(
            job.clone(),
            Some(controller),
            name,
            learner_of(given, &setup, &topo, name, data_dir)?,
        )
        .await
        .context("starting the executor")
    };
    // A controller that trains needs its executor before the workflow starts; a plain client
    // joins below.
    if is_client && name == controller_name {
        start_executor().await?;
    }
    if name == controller_name {
        let members: Vec<_> = table.iter().cloned().collect();
        let comm = Communicator::new(host, job.clone(), members, DEFAULT_CHUNK_SIZE, topo.spec_hash());
        let clients: Vec<PeerId> = topo.clients.iter().map(|c| peer(c)).collect::<Result<_, _>>()?;
        tracing::info!(clients = clients.len(), "waiting for the clients to join");
        // The controller's own executor (when it trains too) is there already.
        let others: Vec<PeerId> = clients.iter().copied().filter(|p| *p != controller).collect();
        let arrived = if resume {
            // They joined the earlier run and wait for its tasks (from the same peer id).
            tracing::info!("resuming the job with the clients of its earlier run");
            others.clone()
        } else {
            tokio::select! {
                a = comm.wait_for_joins(&others, topo.round_timeout) => a,
                why = stop.clone() => bail!("{why} while waiting for the clients to join"),
            }
        };
        let joined: Vec<PeerId> = clients
            .iter()
            .copied()
            .filter(|p| *p == controller || arrived.contains(p))
            .collect();
        if joined.len() < topo.min_clients {
            let missing: Vec<&str> = topo
                .clients
                .iter()
                .zip(&clients)
                .filter(|(_, p)| !joined.contains(p))
                .map(|(n, _)| n.as_str())
                .collect();
            bail!(
                "only {} of the {} required clients joined within {:?}; missing: {}",
                joined.len(),
                topo.min_clients,
                topo.round_timeout,
                missing.join(", ")
            );
        }
        let checkpoints = data_dir.join("checkpoints");
        let (outcome, mut summary) =
            crate::job::control(host, comm, &topo, &setup, joined, Some(&checkpoints), stop, resume).await?;
        // Only this process's counters are known here; each member logs its own at exit.
        summary["bytes_sent_per_member"] =
            serde_json::json!({ name: node.traffic().total() / u64::from(topo.rounds.max(1)) });
        crate::render::write_outputs(data_dir, &outcome, &summary)?;
        return Ok(Some(summary));
    }
    if !is_client {
        bail!(
            "member {name:?} is neither the controller nor a client of job {}",
            topo.job
        );
    }
    let work = async {
        start_executor().await?;
        join(node, &job, controller, name, topo.spec_hash()).await?;
        match host.job_ended(&job).await {
            Some(end) if end.failed => bail!("the job ended before it finished: {end}"),
            Some(end) => tracing::info!(reason = %end, "job over"),
            None => tracing::info!("job over: this member left it"),
        }
        Ok(())
    };
    tokio::select! {
        r = work => r.map(|()| None),
        why = stop => {
            // The controller leaves this member out from now on, as it does a member that died.
            host.leave(&job);
            tracing::info!(reason = %why, "leaving the job");
            Ok(None)
        }
    }
}

/// This member's part of a swarm job: the same loop as every other member; each member
/// writes the final model and its view of the rounds to its data dir.
#[allow(clippy::too_many_arguments)] // one call site, each argument a different thing
async fn swarm_member(
    node: &Arc<Node>,
    host: &JobHost,
    topo: &Topology,
    setup: &crate::job::Setup,
    name: &str,
    data_dir: &std::path::Path,
    given: &mut Option<Box<dyn Learner>>,
    stop: crate::Stop,
) -> anyhow::Result<serde_json::Value> {
    let table = topo.member_table()?;
    // The rotation follows the topology's member order.
    let members: Vec<flare_actors::Member> = topo
        .members
        .iter()
        .map(|(n, _)| table.by_name(n).cloned().context("member vanished"))
        .collect::<Result<_, _>>()?;
    let job = JobId(topo.job.clone());
    host.join_as_executor(job.clone(), None, name, learner_of(given, setup, topo, name, data_dir)?)
        .await
        .context("starting the executor")?;
    let comm = Communicator::new(host, job.clone(), members.clone(), DEFAULT_CHUNK_SIZE, topo.spec_hash());
    let cfg = crate::job::swarm_config(topo, setup, &members, name);
    let started = std::time::Instant::now();
    let initial = crate::job::Initial::of(topo, setup)?;
    // Every member runs the swarm workflow in its own controller; none ends the job for the
    // others (they fail over), so it tells no one when it stops early.
    let mut ctl = host
        .start_controller(comm, vec![], move |comm| async move {
            crate::job::run_swarm(&comm, &cfg, initial).await
        })
        .await
        .context("starting the controller")?;
    let outcome = ctl.outcome_unless(stop).await;
    host.leave(&job);
    let outcome = outcome??;
    let mut summary = crate::render::summarize(topo, setup, &outcome, started.elapsed().as_secs_f64()).await?;
    summary["reporter"] = serde_json::json!(name);
    summary["bytes_sent_per_member"] =
        serde_json::json!({ name: node.traffic().total() / u64::from(topo.rounds.max(1)) });
    crate::render::write_outputs(data_dir, &outcome, &summary)?;
    Ok(summary)
}

/// The learner given to [`run_with`], else the topology's.
fn learner_of(
    given: &mut Option<Box<dyn Learner>>,
    setup: &crate::job::Setup,
    topo: &Topology,
    name: &str,
    data_dir: &std::path::Path,
) -> anyhow::Result<Box<dyn Learner>> {
    given
        .take()
        .map_or_else(|| setup.learner(topo, name, &data_dir.join("learner")), Ok)
}

/// Asks the controller to admit this member, until it answers (bounded by [`JOIN_FOR`]).
async fn join(node: &Node, job: &JobId, controller: PeerId, name: &str, spec: [u8; 32]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + JOIN_FOR;
    // A controller started a moment later (its site launched after this one) is there
    // within milliseconds: ask again soon, then less often.
    let mut pause = Duration::from_millis(10);
    loop {
        let req = CtlRequest {
            job: job.clone(),
            body: Request::Join {
                member: name.to_owned(),
            },
        };
        match node.net().request(controller, req).await {
            Ok(CtlResponse::Welcome { spec_hash, .. }) if spec_hash == spec => {
                tracing::info!(job = %job, "joined");
                return Ok(());
            }
            Ok(CtlResponse::Welcome { .. }) => {
                bail!("the controller runs a different specification of job {job}: check both use the same topology")
            }
            Ok(other) => tracing::debug!(?other, "controller not ready"),
            Err(e) => tracing::debug!(error = %e, "controller not reachable yet"),
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("the controller did not admit this member within {JOIN_FOR:?}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}
