//! `flare-node submit JOB.toml`: sign a job file with the submitter's key and hand it to a
//! running site, which checks it and says whether it takes the job, and if not, why.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use flare_actors::{BlobStore, Members, Node, NodeConfig};
use flare_protocols::ctl::{CtlRequest, CtlResponse, Request};
use flare_protocols::job::SignedJob;

use crate::topology::Topology;

/// Arguments of `flare-node submit`.
#[derive(Args)]
pub struct SubmitArgs {
    /// The job file (a topology file naming members, not their keys or addresses).
    job: PathBuf,
    /// The submitter's key (made by `keygen` or `init`); the sites' policies name its peer id.
    #[arg(long)]
    key: PathBuf,
    /// The consortium's member table, where the site to submit to is found.
    #[arg(long)]
    members: PathBuf,
    /// The member (a running `flare-node serve`) to submit to.
    #[arg(long)]
    to: String,
    /// How long to wait for the site's answer, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

/// Signs and submits the job; prints its id on stdout once the site has taken it.
pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    // A malformed job is refused here, naming the file, the line and the field.
    let topo = Topology::load(&a.job)?;
    if let Err(why) = crate::site::admit::learner_name(&topo) {
        bail!("{}: {why}", a.job.display());
    }
    let spec = std::fs::read(&a.job).with_context(|| format!("reading {}", a.job.display()))?;
    let key = crate::keys::load_key(&a.key)?;
    let members = Members::load(&a.members)?;
    let site = members
        .by_name(&a.to)
        .cloned()
        .with_context(|| format!("{}: no member named {:?}", a.members.display(), a.to))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let signed = SignedJob::sign(spec, &key, now)?;
    let id = signed.id();
    let node = Node::start(NodeConfig {
        keypair: key,
        members: members.into(),
        listen: vec!["/ip4/0.0.0.0/tcp/0".parse()?],
        store: BlobStore::memory(),
        max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
    })
    .await?;
    let ask = node.net().request(
        site.peer_id,
        CtlRequest {
            job: id.clone(),
            body: Request::Submit(Box::new(signed)),
        },
    );
    let answer = tokio::time::timeout(Duration::from_secs(a.timeout_secs), ask)
        .await
        .with_context(|| format!("{} did not answer within {} s", a.to, a.timeout_secs))?;
    node.net().shutdown();
    match answer.with_context(|| format!("submitting to {}", a.to))? {
        CtlResponse::Taken { refused } => {
            for why in &refused {
                eprintln!("refused by a member, the job goes on without it: {why}");
            }
            eprintln!("{} took job {id} ({:?}, {})", a.to, topo.job, topo.workflow.name());
            println!("{id}");
            Ok(())
        }
        CtlResponse::Rejected { reason } => bail!("job {id} refused: {reason}"),
        other => bail!("{} answered {other:?}", a.to),
    }
}
