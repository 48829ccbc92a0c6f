//! A site directory: what a standing peer of a consortium keeps, all in one place.
//!
//! ```text
//! SITE_DIR/key           the site's identity (ed25519, mode 0600)
//! SITE_DIR/site.toml     the site's own policy (see `policy`): local and final
//! SITE_DIR/members.toml  the consortium's member table (every site's name, peer id, address)
//! SITE_DIR/store/        blobs
//! SITE_DIR/jobs.redb     the site's job records (see `records`)
//! SITE_DIR/jobs/<id>/    each job's data: checkpoints, the final model, results.json
//! ```
//! `flare-node init` writes the first three; `flare-node serve` runs the standing peer.

pub mod admit;
pub mod desk;
pub mod manage;
pub mod policy;
pub mod query;
pub mod records;
pub mod submit;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;
use flare_actors::{Member, Members};
use libp2p::Multiaddr;
use libp2p::identity::Keypair;

use policy::Policy;

/// Arguments of `flare-node init`.
#[derive(Args)]
pub struct InitArgs {
    /// The site directory to create.
    dir: PathBuf,
    /// This site's member name in the consortium.
    #[arg(long)]
    name: String,
    /// Where the site will listen (repeatable); written to site.toml and, as this site's
    /// address, to members.toml.
    #[arg(long, default_value = "/ip4/127.0.0.1/tcp/4100")]
    listen: Vec<Multiaddr>,
    /// Overwrite the files of an existing site directory (a new key: a new identity).
    #[arg(long)]
    force: bool,
}

/// Arguments of `flare-node serve`.
#[derive(Args)]
pub struct ServeArgs {
    /// The site directory (made by `flare-node init`).
    dir: PathBuf,
}

/// A site directory, read and checked.
pub struct Site {
    /// Where it is.
    pub dir: PathBuf,
    /// The site's key.
    pub key: Keypair,
    /// Its policy.
    pub policy: Policy,
    /// The consortium's member table.
    pub members: Members,
}

const KEY: &str = "key";
const POLICY: &str = "site.toml";
const MEMBERS: &str = "members.toml";

/// Writes a new site directory and prints the site's peer id and what to do next.
pub fn init(a: InitArgs) -> anyhow::Result<()> {
    let name = a.name.trim();
    if name.is_empty() {
        bail!("--name is empty");
    }
    let files = [KEY, POLICY, MEMBERS].map(|f| a.dir.join(f));
    if !a.force
        && let Some(f) = files.iter().find(|f| f.exists())
    {
        bail!("{} already exists; pass --force to overwrite the site", f.display());
    }
    std::fs::create_dir_all(&a.dir).with_context(|| format!("creating {}", a.dir.display()))?;
    let key = Keypair::generate_ed25519();
    let me = key.public().to_peer_id();
    crate::keys::write_key(&files[0], &key)?;
    let write =
        |path: &Path, text: String| std::fs::write(path, text).with_context(|| format!("writing {}", path.display()));
    write(&files[1], Policy::template(name, &me, &a.listen))?;
    let table = Members::from_members([Member {
        name: name.to_owned(),
        peer_id: me,
        addrs: a.listen.clone(),
    }]);
    write(
        &files[2],
        format!(
            "# The consortium's member table: every site's name, peer id and reachable address.\n\
             # Add the other sites' entries (each site's `flare-node init` prints its own).\n\n{}",
            table.to_toml()
        ),
    )?;
    println!("{me}");
    eprintln!(
        "site {name:?} in {}: edit site.toml (who may submit, learners, datasets), add the other sites to \
         members.toml, then `flare-node serve {}`",
        a.dir.display(),
        a.dir.display()
    );
    Ok(())
}

impl Site {
    /// Reads and checks a site directory: the key, the policy, and a member table that lists
    /// this site under its name and key.
    pub fn open(dir: &Path) -> anyhow::Result<Self> {
        let key = crate::keys::load_key(&dir.join(KEY))?;
        let policy = Policy::load(&dir.join(POLICY))?;
        let members = Members::load(&dir.join(MEMBERS))?;
        let me = key.public().to_peer_id();
        match members.by_name(&policy.name) {
            Some(m) if m.peer_id == me => {}
            Some(m) => bail!(
                "{} lists {:?} as {}, but this site's key is {me}",
                dir.join(MEMBERS).display(),
                policy.name,
                m.peer_id
            ),
            None => bail!(
                "{} does not list this site ({:?}, {me})",
                dir.join(MEMBERS).display(),
                policy.name
            ),
        }
        Ok(Self {
            dir: dir.to_owned(),
            key,
            policy,
            members,
        })
    }
}

/// Runs the site's standing peer until Ctrl-C: it listens where site.toml says, admits and
/// dials the members of members.toml, and keeps its blobs in the site's store.
pub async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let site = Site::open(&a.dir)?;
    tracing::info!(
        site = %site.policy.name,
        submitters = site.policy.submitters.len(),
        learners = site.policy.builtin_learners.len() + site.policy.learners.len(),
        datasets = site.policy.datasets.len(),
        "site policy loaded"
    );
    let records = records::Records::open(&site.dir.join("jobs.redb"))?;
    let (policy, members, dir) = (site.policy.clone(), site.members.clone(), site.dir.clone());
    let desk: crate::run::MakeDesk = Box::new(move |node, host| {
        let desk = desk::Desk::new(policy, members, dir, records, node, host);
        if let Err(e) = desk.resume() {
            tracing::error!(error = %e, "cannot read the job records to resume the site's jobs");
        }
        desk.serve()
    });
    // Submitters may connect (to submit) without being members of the consortium.
    let mut gate = site.members.clone();
    for s in &site.policy.submitters {
        if !gate.contains(&s.peer_id) {
            gate.insert(flare_actors::Member {
                name: s.name.clone(),
                peer_id: s.peer_id,
                addrs: vec![],
            });
        }
    }
    let limits = &site.policy.limits;
    let (cap, stream_above) = (limits.max_upload_bytes_per_sec, limits.stream_above_bytes);
    crate::run::standing(
        site.key,
        gate,
        site.policy.listen,
        &site.dir.join("store"),
        cap,
        stream_above,
        desk,
    )
    .await
}
