//! `flare-node sim FILE`: every member of a topology as a node in this process, each with its
//! own libp2p swarm on 127.0.0.1, running the topology's job to the end.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use flare_actors::job::{Communicator, JobHost};
use flare_actors::{BlobStore, Member, MemberTable, Members, Node, NodeConfig};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::ctl::JobId;
use libp2p::identity::Keypair;

use crate::topology::Topology;

/// Arguments of `flare-node sim`.
#[derive(Args)]
pub struct SimArgs {
    /// Topology file (see topologies/README.md).
    file: PathBuf,
    /// Print a summary JSON object as the last line of stdout.
    #[arg(long)]
    json: bool,
    /// Where to write the final model, the results and the controller's checkpoints.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Draw the global model's test accuracy per round against local-only training (SVG;
    /// learners with a test set only).
    #[arg(long)]
    svg: Option<PathBuf>,
}

/// A swarm job: every member runs the same loop; the summary comes from the first member
/// (in topology order) that finishes, and every finisher must hold the same final model.
async fn swarm(
    args: &SimArgs,
    topo: &Topology,
    setup: &crate::job::Setup,
    hosts: Vec<JobHost>,
    members: &[Member],
    nodes: &[Arc<Node>],
    work: &std::path::Path,
) -> anyhow::Result<()> {
    let job = JobId(topo.job.clone());
    let mut runs = Vec::new();
    for (host, m) in hosts.into_iter().zip(members) {
        host.join_as_executor(
            job.clone(),
            None,
            &m.name,
            setup.learner(topo, &m.name, &work.join(&m.name))?,
        )
        .await
        .with_context(|| format!("starting the executor of {}", m.name))?;
        let comm = Communicator::new(
            &host,
            job.clone(),
            members.to_vec(),
            DEFAULT_CHUNK_SIZE,
            topo.spec_hash(),
        );
        let mut cfg = crate::job::swarm_config(topo, setup, members, &m.name);
        cfg.crash_in_round = topo.crash_aggregator_in_round;
        let initial = crate::job::Initial::of(topo, setup)?;
        let job = job.clone();
        // Each member runs the swarm workflow in its own controller (telling no one when it
        // stops: the others fail over).
        let mut ctl = host
            .start_controller(comm, vec![], move |comm| async move {
                crate::job::run_swarm(&comm, &cfg, initial).await
            })
            .await
            .with_context(|| format!("starting the controller of {}", m.name))?;
        runs.push(tokio::spawn(async move {
            let r = ctl.outcome().await;
            // A member that stopped, for whatever reason, stops answering for the job, so
            // the others fail over instead of waiting for it.
            host.leave(&job);
            r
        }));
    }
    let started = std::time::Instant::now();
    let mut finished = Vec::new();
    for (run, m) in runs.into_iter().zip(members) {
        match run.await.context("swarm member task")? {
            Ok(Ok(o)) => finished.push((m.name.clone(), o)),
            Ok(Err(e)) => eprintln!("{}: {e}", m.name),
            Err(e) => eprintln!("{}: {e}", m.name),
        }
    }
    let total_secs = started.elapsed().as_secs_f64();
    let Some((reporter, first)) = finished.first() else {
        anyhow::bail!("no member finished the swarm job");
    };
    let agree = finished.iter().all(|(_, o)| o.model.same_as(&first.model));
    anyhow::ensure!(agree, "the members that finished hold different final models");
    let finishers: Vec<String> = finished.iter().map(|(n, _)| n.clone()).collect();
    let reporter = reporter.clone();
    let outcome = finished.swap_remove(0).1;
    let mut summary = crate::render::summarize(topo, setup, &outcome, total_secs).await?;
    summary["reporter"] = serde_json::json!(reporter);
    summary["finished"] = serde_json::json!(finishers);
    let names: Vec<String> = members.iter().map(|m| m.name.clone()).collect();
    summary["bytes_sent_per_member"] = bytes_per_round(&names, nodes, topo.rounds);
    summary["peak_rss_bytes"] = serde_json::json!(crate::bench::peak_rss_bytes().ok());
    if let Some(dir) = &args.out {
        crate::render::write_outputs(dir, &outcome, &summary)?;
        eprintln!("wrote {} and results.json", dir.join("global.safetensors").display());
    }
    if let Some(path) = &args.svg {
        crate::render::draw(topo, &summary, path)?;
        eprintln!("wrote {}", path.display());
    }
    crate::render::report(&summary, args.json)
}

/// Each member's traffic over the job, per round on average, from its node's own counters.
fn bytes_per_round(names: &[String], nodes: &[Arc<Node>], rounds: u32) -> serde_json::Value {
    let per: serde_json::Map<String, serde_json::Value> = names
        .iter()
        .zip(nodes)
        .map(|(n, node)| {
            (
                n.clone(),
                serde_json::json!(node.traffic().total() / u64::from(rounds.max(1))),
            )
        })
        .collect();
    serde_json::Value::Object(per)
}

/// Runs the topology's job on a local swarm.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let topo = Topology::load(&args.file)?;
    let setup = crate::job::Setup::new(&topo)?;
    if matches!(topo.learner, crate::topology::LearnerSpec::Tch { .. })
        && let Some(n) = crate::torch::share_threads(topo.members.len())
    {
        tracing::info!(threads = n, "libtorch threads per operation, shared among the members");
    }
    // External learners' work dirs (sockets, model files), gone when the job is.
    let work = tempfile::Builder::new()
        .prefix("flare-sim-")
        .tempdir()
        .context("creating a work directory")?;
    eprintln!(
        "sim {}: {} members, {}, {} {} of {}",
        topo.path.display(),
        topo.members.len(),
        topo.controller
            .as_ref()
            .map_or_else(|| "no controller".to_owned(), |c| format!("controller {c}")),
        topo.rounds,
        if matches!(topo.workflow, crate::topology::Workflow::Split(_)) {
            "epochs"
        } else {
            "rounds"
        },
        topo.workflow.name()
    );

    // One node per member, each on its own ephemeral loopback port.
    let keys: Vec<Keypair> = topo.members.iter().map(|_| Keypair::generate_ed25519()).collect();
    let names: Vec<String> = topo.members.iter().map(|(n, _)| n.clone()).collect();
    // One table for every node: a copy each would grow with the square of the members.
    let table = MemberTable::new(Members::from_members(names.iter().zip(&keys).map(|(n, k)| Member {
        name: n.clone(),
        peer_id: k.public().to_peer_id(),
        addrs: vec![],
    })));
    let mut nodes = Vec::new();
    for key in keys {
        let node = Node::start(NodeConfig {
            keypair: key,
            members: table.clone(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            store: BlobStore::memory(),
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        })
        .await?;
        nodes.push(Arc::new(node));
    }
    let members: Vec<Member> = nodes.iter().zip(&names).map(|(n, name)| n.as_member(name)).collect();
    for m in &members {
        table.insert(m.clone());
    }
    let hosts: Vec<JobHost> = nodes
        .iter()
        .map(|n| JobHost::start(n.clone()))
        .collect::<Result<_, _>>()?;
    let index = |name: &str| names.iter().position(|n| n == name).context("member vanished");
    let job = JobId(topo.job.clone());
    let Some(controller) = &topo.controller else {
        return swarm(&args, &topo, &setup, hosts, &members, &nodes, work.path()).await;
    };
    let controller = index(controller)?;
    for client in &topo.clients {
        let i = index(client)?;
        let learner = setup.learner(&topo, client, &work.path().join(client))?;
        hosts[i]
            .join_as_executor(job.clone(), Some(members[controller].peer_id), client, learner)
            .await
            .with_context(|| format!("starting the executor of {client}"))?;
    }

    let clients = topo
        .clients
        .iter()
        .map(|c| index(c).map(|i| members[i].peer_id))
        .collect::<Result<_, _>>()?;
    let comm = Communicator::new(
        &hosts[controller],
        job,
        members.clone(),
        DEFAULT_CHUNK_SIZE,
        topo.spec_hash(),
    );
    let checkpoints = args.out.as_ref().map(|d| d.join("checkpoints"));
    let (outcome, mut summary) = crate::job::control(
        &hosts[controller],
        comm,
        &topo,
        &setup,
        clients,
        checkpoints.as_deref(),
        crate::on_ctrl_c(),
        false,
    )
    .await?;
    summary["bytes_sent_per_member"] = bytes_per_round(&names, &nodes, topo.rounds);
    // The whole simulation's peak resident set: every member's share of it.
    summary["peak_rss_bytes"] = serde_json::json!(crate::bench::peak_rss_bytes().ok());
    if let Some(dir) = &args.out {
        crate::render::write_outputs(dir, &outcome, &summary)?;
        eprintln!("wrote {} and results.json", dir.join("global.safetensors").display());
    }
    if let Some(path) = &args.svg {
        crate::render::draw(&topo, &summary, path)?;
        eprintln!("wrote {}", path.display());
    }
    drop(hosts);
    crate::render::report(&summary, args.json)
}
