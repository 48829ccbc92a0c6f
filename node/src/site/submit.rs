//! `flare-node submit JOB.toml`: sign a job file with the submitter's key and hand it to a
//! running site, which checks it and says whether it takes the job, and if not, why.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Args;
use flare_actors::{BlobStore, Members, Node, NodeConfig};
use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request};
use flare_protocols::job::SignedJob;

use crate::topology::Topology;

/// Arguments of `flare-node submit`.
#[derive(Args)]
pub struct SubmitArgs {
    /// The job file (a topology file naming members, not their keys or addresses).
    job: PathBuf,
    #[command(flatten)]
    site: SiteArgs,
}

/// Which running site to ask, and as whom: shared by `submit`, `jobs` and `status`.
#[derive(Args)]
pub struct SiteArgs {
    /// Your key (made by `keygen` or `init`); the sites' policies name its peer id.
    #[arg(long)]
    key: PathBuf,
    /// The consortium's member table, where the site to ask is found.
    #[arg(long)]
    members: PathBuf,
    /// The member (a running `flare-node serve`) to ask.
    #[arg(long)]
    to: String,
    /// How long to wait for the site's answer, in seconds.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
}

impl SiteArgs {
    /// The asker's key file.
    pub fn key_path(&self) -> PathBuf {
        self.key.clone()
    }

    /// The site's name.
    pub fn site(&self) -> &str {
        &self.to
    }

    /// Sends `body` about `job` to the site as the key's owner; the site's answer.
    pub async fn ask(&self, job: JobId, body: Request) -> anyhow::Result<CtlResponse> {
        let session = self.session(BlobStore::memory()).await?;
        let answer = session.ask(&self.to, job, body).await;
        session.close();
        answer
    }

    /// A peer of the key's owner that can ask any site of the consortium, with `store` for
    /// what it pulls.
    pub async fn session(&self, store: BlobStore) -> anyhow::Result<Session> {
        let key = crate::keys::load_key(&self.key)?;
        let members = Members::load(&self.members)?;
        if members.by_name(&self.to).is_none() {
            bail!("{}: no member named {:?}", self.members.display(), self.to);
        }
        let node = Node::start(NodeConfig {
            keypair: key,
            members: members.clone().into(),
            listen: vec!["/ip4/0.0.0.0/tcp/0".parse()?],
            store,
            max_blob_streams: flare_actors::blob::serve::MAX_SERVING,
            max_upload: None,
            bulk_channel: true,
        })
        .await?;
        Ok(Session {
            node,
            members,
            timeout: Duration::from_secs(self.timeout_secs),
        })
    }
}

/// A short-lived peer that asks sites on its owner's behalf.
pub struct Session {
    node: Node,
    members: Members,
    timeout: Duration,
}

impl Session {
    /// Sends `body` about `job` to site `site`; its answer.
    pub async fn ask(&self, site: &str, job: JobId, body: Request) -> anyhow::Result<CtlResponse> {
        let peer = self.peer(site)?;
        let ask = self.node.net().request(peer, CtlRequest { job, body });
        tokio::time::timeout(self.timeout, ask)
            .await
            .with_context(|| format!("{site} did not answer within {} s", self.timeout.as_secs()))?
            .with_context(|| format!("asking {site}"))
    }

    /// Site `site`'s peer id.
    pub fn peer(&self, site: &str) -> anyhow::Result<libp2p::PeerId> {
        self.members
            .by_name(site)
            .map(|m| m.peer_id)
            .with_context(|| format!("no member named {site:?} in the member table"))
    }

    /// The peer.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Closes the peer's connections.
    pub fn close(self) {
        self.node.net().shutdown();
    }
}

/// Signs and submits the job; prints its id on stdout once the site has taken it.
pub async fn submit(a: SubmitArgs) -> anyhow::Result<()> {
    // A malformed job is refused here, naming the file, the line and the field.
    let topo = Topology::load(&a.job)?;
    if let Err(why) = crate::site::admit::learner_name(&topo) {
        bail!("{}: {why}", a.job.display());
    }
    // The sites read the job file alone: a model file beside it stays on this machine.
    if topo.model.file.is_some() {
        bail!(
            "{}: field `model.file`: a submitted job cannot name a file (the sites never see it);              run the job from its topology file",
            a.job.display()
        );
    }
    let spec = std::fs::read(&a.job).with_context(|| format!("reading {}", a.job.display()))?;
    let key = crate::keys::load_key(&a.site.key)?;
    let signed = SignedJob::sign(spec, &key, super::records::now_ms())?;
    let id = signed.id();
    match a.site.ask(id.clone(), Request::Submit(Box::new(signed))).await? {
        CtlResponse::Taken { refused } => {
            for why in &refused {
                eprintln!("refused by a member, the job goes on without it: {why}");
            }
            eprintln!("{} took job {id} ({:?}, {})", a.site.to, topo.job, topo.workflow.name());
            println!("{id}");
            Ok(())
        }
        CtlResponse::Rejected { reason } => bail!("job {id} refused: {reason}"),
        other => bail!("{} answered {other:?}", a.site.to),
    }
}
