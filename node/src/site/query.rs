//! `flare-node jobs` and `flare-node status JOB`: what a running site (and, for one job,
//! every member of it) says about its jobs, as a table or as JSON.

use anyhow::bail;
use clap::Args;
use flare_protocols::ctl::{CtlResponse, JobId, Request};
use flare_protocols::job::{JobState, JobView};

use super::submit::SiteArgs;

/// Arguments of `flare-node jobs`.
#[derive(Args)]
pub struct JobsArgs {
    #[command(flatten)]
    site: SiteArgs,
    /// Print `{"jobs": [...]}` as the last line of stdout instead of a table.
    #[arg(long)]
    json: bool,
}

/// Arguments of `flare-node status`.
#[derive(Args)]
pub struct StatusArgs {
    /// The job's id (as `submit` and `jobs` print it).
    job: String,
    #[command(flatten)]
    site: SiteArgs,
    /// Print the job's views as JSON (last line of stdout) instead of text.
    #[arg(long)]
    json: bool,
}

async fn views(site: &SiteArgs, job: JobId) -> anyhow::Result<Vec<JobView>> {
    job_views(site.ask(job, Request::Jobs).await?, site.site())
}

/// The job views in `site`'s answer (to `Jobs`, or to `AbortJob`); its refusal as the error.
pub(super) fn job_views(answer: CtlResponse, site: &str) -> anyhow::Result<Vec<JobView>> {
    match answer {
        CtlResponse::Jobs(v) => Ok(v),
        CtlResponse::Rejected { reason } => bail!("{reason}"),
        other => bail!("{site} answered {other:?}"),
    }
}

/// Lists the site's jobs: id, name, workflow, state, rounds done, members.
pub async fn jobs(a: JobsArgs) -> anyhow::Result<()> {
    let views = views(&a.site, JobId(String::new())).await?;
    if a.json {
        println!("{}", serde_json::json!({ "jobs": views }));
        return Ok(());
    }
    println!(
        "{:<18} {:<16} {:<22} {:<10} {:>9}  members",
        "id", "name", "workflow", "state", "round"
    );
    for v in &views {
        println!(
            "{:<18} {:<16} {:<22} {:<10} {:>9}  {}",
            v.id.0,
            v.name,
            v.workflow,
            v.state,
            format!("{}/{}", v.round, v.rounds),
            v.members.join(",")
        );
        if !v.reason.is_empty() {
            println!("{:<18} {}", "", v.reason);
        }
    }
    Ok(())
}

/// Shows one job as every member of it sees it, with the learning curve where a member
/// measured it and why it failed where it did.
pub async fn status(a: StatusArgs) -> anyhow::Result<()> {
    let views = views(&a.site, JobId(a.job.clone())).await?;
    let Some(first) = views.first() else {
        bail!("{} knows no job {}", a.site.site(), a.job);
    };
    let silent: Vec<&String> = first
        .members
        .iter()
        .filter(|m| !views.iter().any(|v| v.site == **m))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::json!({ "job": a.job, "state": overall(&views).as_str(), "views": views, "silent": silent })
        );
        return Ok(());
    }
    println!(
        "job {} ({:?}, {}): {}; submitted by {}",
        first.id,
        first.name,
        first.workflow,
        overall(&views),
        first.submitter
    );
    for v in &views {
        let reason = if v.reason.is_empty() {
            String::new()
        } else {
            format!(": {}", v.reason)
        };
        println!(
            "  {:<16} {:<18} {:<10} round {}/{}{reason}",
            v.site, v.part, v.state, v.round, v.rounds
        );
    }
    for m in silent {
        println!("  {m:<16} did not answer");
    }
    if let Some(v) = views.iter().find(|v| v.metrics.iter().any(|m| !m.is_empty())) {
        println!("global model after each round ({}):", v.site);
        for (r, m) in v.metrics.iter().enumerate() {
            let m: Vec<String> = m.iter().map(|(k, x)| format!("{k} {x:.4}")).collect();
            println!("  round {r}: {}", m.join(", "));
        }
    }
    Ok(())
}

/// The job's state from its members' views: the controller's where it has one; otherwise
/// running while any member runs it, failed if any failed, else what the first says.
fn overall(views: &[JobView]) -> JobState {
    if let Some(c) = views.iter().find(|v| v.part.starts_with("controller")) {
        return c.state;
    }
    [
        JobState::Running,
        JobState::Failed,
        JobState::Aborted,
        JobState::Finished,
    ]
    .into_iter()
    .find(|s| views.iter().any(|v| v.state == *s))
    .unwrap_or_else(|| views.first().map_or(JobState::Refused, |v| v.state))
}
