//! `flare-node abort JOB` and `flare-node download JOB --out DIR`: stop a job on every member
//! (each checks the signed order against its own policy), and fetch a job's outputs.

use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use flare_actors::BlobStore;
use flare_actors::blob::FetchOptions;
use flare_protocols::ctl::{CtlResponse, JobId, Request};
use flare_protocols::job::{JobView, SignedAbort};

use super::query::job_views;
use super::submit::SiteArgs;

/// Arguments of `flare-node abort`.
#[derive(Args)]
pub struct AbortArgs {
    /// The job's id.
    job: String,
    #[command(flatten)]
    site: SiteArgs,
    /// Why (recorded by every member).
    #[arg(long, default_value = "")]
    reason: String,
}

/// Arguments of `flare-node download`.
#[derive(Args)]
pub struct DownloadArgs {
    /// The job's id.
    job: String,
    #[command(flatten)]
    site: SiteArgs,
    /// Where the outputs go (created if missing).
    #[arg(long)]
    out: PathBuf,
}

/// Signs the order to stop the job and gives it to the site, which hands it to every other
/// member; prints where the job stands on each afterwards.
pub async fn abort(a: AbortArgs) -> anyhow::Result<()> {
    let key = crate::keys::load_key(&a.site.key_path())?;
    let id = JobId(a.job.clone());
    let order = SignedAbort::sign(id.clone(), a.reason.clone(), &key, super::records::now_ms())?;
    let answer = a.site.ask(id, Request::AbortJob(Box::new(order))).await?;
    for v in job_views(answer, a.site.site())? {
        println!("{:<16} {:<10} {}", v.site, v.state, v.reason);
    }
    Ok(())
}

/// Finds the member that holds the job's outputs (its controller; in a swarm, the site
/// asked, or another member that finished), pulls them into `--out`, and writes the
/// learning curve as `curve.csv`.
pub async fn download(a: DownloadArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let pulled = tempfile::tempdir_in(&a.out).context("a scratch store in the output directory")?;
    let session = a.site.session(BlobStore::open(pulled.path())?).await?;
    let id = JobId(a.job.clone());
    let views = job_views(
        session.ask(a.site.site(), id.clone(), Request::Jobs).await?,
        a.site.site(),
    )?;
    let from = holder(&views, a.site.site())
        .with_context(|| format!("no member of job {} has its outputs yet: {}", a.job, states(&views)))?;
    let files = match session.ask(&from, id, Request::Download).await? {
        CtlResponse::Files(f) => f,
        CtlResponse::Rejected { reason } => bail!("{reason}"),
        other => bail!("{from} answered {other:?}"),
    };
    let peer = session.peer(&from)?;
    for (name, blob) in &files {
        // Only plain names the site may give: never a path out of `--out`.
        let file = std::path::Path::new(name);
        if file.is_absolute() || file.components().any(|c| !matches!(c, std::path::Component::Normal(_))) {
            bail!("{from} named an output {name:?} that is not a plain relative path");
        }
        session
            .node()
            .fetch(*blob, &[peer], &FetchOptions::default())
            .await
            .with_context(|| format!("pulling {name} from {from}"))?;
        let path = a.out.join(file.file_name().context("an output without a name")?);
        let mut f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        session.node().store().export(&blob.id, &mut f)?;
        eprintln!("{name}: {} bytes from {from}", blob.len);
    }
    session.close();
    if let Some(curve) = curve(&a.out.join("results.json"))? {
        let path = a.out.join("curve.csv");
        std::fs::write(&path, curve).with_context(|| format!("writing {}", path.display()))?;
    }
    println!("{}", a.out.display());
    Ok(())
}

/// The member to download from: the controller when it finished its part; otherwise the
/// site asked, else any member, whose part finished.
fn holder(views: &[JobView], asked: &str) -> Option<String> {
    use flare_protocols::job::JobState::Finished;
    let done = |v: &&JobView| v.state == Finished;
    views
        .iter()
        .filter(done)
        .find(|v| v.part.starts_with("controller"))
        .or_else(|| {
            views
                .iter()
                .filter(done)
                .find(|v| v.part == "member" && v.site == asked)
        })
        .or_else(|| views.iter().filter(done).find(|v| v.part == "member"))
        .map(|v| v.site.clone())
}

fn states(views: &[JobView]) -> String {
    let s: Vec<String> = views.iter().map(|v| format!("{} {}", v.site, v.state)).collect();
    s.join(", ")
}

/// The learning curve from a job's results.json: one row per round with its seconds and
/// the global model's metrics (where measured).
fn curve(results: &std::path::Path) -> anyhow::Result<Option<String>> {
    let Ok(text) = std::fs::read_to_string(results) else {
        return Ok(None);
    };
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", results.display()))?;
    let summary = &v["summary"];
    let secs = summary["round_secs"].as_array().cloned().unwrap_or_default();
    let global = summary["global"].as_array().cloned().unwrap_or_default();
    let mut out = String::from("round,secs,accuracy,loss\n");
    for (r, s) in secs.iter().enumerate() {
        let g = global.get(r);
        let metric = |k: &str| g.and_then(|g| g[k].as_f64()).map(|x| x.to_string()).unwrap_or_default();
        out.push_str(&format!(
            "{r},{},{},{}\n",
            s.as_f64().unwrap_or(f64::NAN),
            metric("accuracy"),
            metric("loss")
        ));
    }
    Ok(Some(out))
}
