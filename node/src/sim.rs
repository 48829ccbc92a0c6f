//! `flare-node sim FILE`: every member of a topology as a node in this process, each with its
//! own libp2p swarm on 127.0.0.1, running the topology's job to the end.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Args;
use flare_actors::job::{Communicator, JobHost};
use flare_actors::{BlobStore, Member, Members, Node, NodeConfig};
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

/// Runs the topology's job on a local swarm.
pub async fn run(args: SimArgs) -> anyhow::Result<()> {
    let topo = Topology::load(&args.file)?;
    let setup = crate::job::Setup::new(&topo)?;
    eprintln!(
        "sim {}: {} members, controller {}, {} rounds of fedavg",
        topo.path.display(),
        topo.members.len(),
        topo.controller,
        topo.rounds
    );

    // One node per member, each on its own ephemeral loopback port.
    let keys: Vec<Keypair> = topo.members.iter().map(|_| Keypair::generate_ed25519()).collect();
    let names: Vec<String> = topo.members.iter().map(|(n, _)| n.clone()).collect();
    let table = Members::from_members(names.iter().zip(&keys).map(|(n, k)| Member {
        name: n.clone(),
        peer_id: k.public().to_peer_id(),
        addrs: vec![],
    }));
    let mut nodes = Vec::new();
    for key in keys {
        let node = Node::start(NodeConfig {
            keypair: key,
            members: table.clone(),
            listen: vec!["/ip4/127.0.0.1/tcp/0".parse()?],
            store: BlobStore::memory(),
        })
        .await?;
        nodes.push(Arc::new(node));
    }
    let members: Vec<Member> = nodes.iter().zip(&names).map(|(n, name)| n.as_member(name)).collect();
    for n in &nodes {
        for m in &members {
            n.net().add_member(m.clone())?;
        }
    }
    let hosts: Vec<JobHost> = nodes
        .iter()
        .map(|n| JobHost::start(n.clone()))
        .collect::<Result<_, _>>()?;
    let index = |name: &str| names.iter().position(|n| n == name).context("member vanished");
    let job = JobId(topo.job.clone());
    let controller = index(&topo.controller)?;
    for client in &topo.clients {
        let i = index(client)?;
        let learner = setup.learner(&topo, client)?;
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
    let (outcome, summary) = crate::job::control(&comm, &topo, &setup, clients, checkpoints.as_deref()).await?;
    if let Some(dir) = &args.out {
        crate::job::write_outputs(dir, &outcome, &summary)?;
        eprintln!("wrote {} and results.json", dir.join("global.safetensors").display());
    }
    if let Some(path) = &args.svg {
        crate::job::draw(&topo, &summary, path)?;
        eprintln!("wrote {}", path.display());
    }
    drop(hosts);
    crate::job::report(&summary, args.json)
}
