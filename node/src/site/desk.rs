//! A site's standing peer at work: it answers submitted and offered jobs, runs its parts of
//! the jobs it took, and says where each stands.
//!
//! A job submitted here is checked ([`admit`]), then offered to every other member it names;
//! each decides by its own policy and keeps the job as `offered`. If enough took it for its
//! workflow to run, this site tells each of them to launch it with exactly the members that
//! took it (so every member runs the same job, whoever refused), and starts its own part;
//! otherwise it withdraws the offers and refuses the job, naming who refused and why. Every
//! step is a record in the site's database ([`Records`]), so `flare-node jobs` is a read of
//! it and a restart loses nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use flare_actors::job::{JobHost, SiteDesk, SiteRequest};
use flare_actors::{Members, Node};
use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request};
use flare_protocols::job::{JobState, JobView, SignedAbort, SignedJob};
use futures::FutureExt;
use libp2p::PeerId;
use tracing::Instrument;

use super::admit::{OFFER_TIMEOUT, admit, enough};
use super::policy::{Policy, Role};
use super::records::{Record, Records, now_ms};
use crate::topology::Topology;

/// A job's outputs a site hands out (`download`), as the job's directory names them.
const OUTPUTS: [&str; 4] = [
    "global.safetensors",
    "best.safetensors",
    "results.json",
    "checkpoints/checkpoint.json",
];
/// How long a site holds a job's outputs in its store for the asker to pull.
const DOWNLOAD_HOLD: std::time::Duration = std::time::Duration::from_secs(600);

/// How long a member keeps a job it took on offer before it gives up waiting for the launch.
const LAUNCH_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

/// A site's standing peer: its policy, the consortium, its records and the job parts it runs.
pub struct Desk {
    policy: Policy,
    members: Members,
    /// The site directory (job data goes in `jobs/<id>/`).
    dir: PathBuf,
    records: Records,
    node: Arc<Node>,
    host: Arc<JobHost>,
    /// The parts of jobs running here, each with what stops it.
    running: Mutex<HashMap<String, tokio::sync::watch::Sender<Option<String>>>>,
}

/// A refusal or failure, said to the asker as it is (it names this site).
type Answer = Result<CtlResponse, String>;

impl Desk {
    /// The desk of a site whose node and job host are up.
    pub fn new(
        policy: Policy,
        members: Members,
        dir: PathBuf,
        records: Records,
        node: Arc<Node>,
        host: Arc<JobHost>,
    ) -> Arc<Self> {
        Arc::new(Self {
            policy,
            members,
            dir,
            records,
            node,
            host,
            running: Mutex::default(),
        })
    }

    /// Picks up, after a restart, the jobs this site had taken: a part that was running
    /// runs again (a FedAvg controller from its last checkpoint, a client or swarm member
    /// rejoins), and an offer still waits for its launch.
    pub fn resume(self: &Arc<Self>) -> Result<(), super::records::RecordsError> {
        for r in self.records.all()? {
            let id = r.view.id.clone();
            match r.view.state {
                JobState::Running => match parse(&r.signed) {
                    Ok(topo) => {
                        tracing::info!(job = %id, name = %r.view.name, "resuming this site's part of the job");
                        if let Err(why) = self.start(&id, topo, &r.view.members, true) {
                            tracing::warn!(job = %id, %why, "cannot resume the job");
                        }
                    }
                    Err(why) => self.settle(&id, JobState::Running, JobState::Failed, &why),
                },
                JobState::Offered => self.expire_offer(id),
                _ => {}
            }
        }
        Ok(())
    }

    /// An offer nobody launches (its sender died) does not stay `offered` for ever.
    fn expire_offer(self: &Arc<Self>, id: JobId) {
        let desk = self.clone();
        tokio::spawn(async move {
            tokio::time::sleep(LAUNCH_WAIT).await;
            let reason = format!("no member launched it within {} s of the offer", LAUNCH_WAIT.as_secs());
            desk.settle(&id, JobState::Offered, JobState::Withdrawn, &reason);
        });
    }

    /// What the job host calls with each site request.
    pub fn serve(self: Arc<Self>) -> SiteDesk {
        Arc::new(move |r: SiteRequest| {
            let desk = self.clone();
            async move { desk.answer(r).await }.boxed()
        })
    }

    async fn answer(self: Arc<Self>, r: SiteRequest) -> CtlResponse {
        let (id, from) = (r.job, r.from);
        let answer = match r.body {
            Request::Submit(j) => self.submitted(*j).await,
            Request::Offer(j) => self.offered(from, *j),
            Request::Launch { members } => self.launch(from, &id, &members),
            Request::Withdraw { reason } => self.withdraw(from, &id, &reason),
            Request::Jobs => self.jobs(from, &id).await,
            Request::AbortJob(order) => self.abort(from, &id, *order).await,
            Request::Download => self.download(from, &id).await,
            other => Err(format!("{}: not a site request: {other:?}", self.policy.name)),
        };
        answer.unwrap_or_else(|reason| {
            tracing::warn!(job = %id, from = %self.name_of(&from), %reason, "job refused");
            CtlResponse::Rejected { reason }
        })
    }

    /// A job submitted here: checked, offered to the other members, then launched with those
    /// that took it, or refused naming who refused and why.
    async fn submitted(self: &Arc<Self>, signed: SignedJob) -> Answer {
        let id = signed.id();
        let site = &self.policy.name;
        if self.record(&id)?.is_some() {
            return Err(format!("{site}: job {id} was submitted here already"));
        }
        let topo = self.check(&signed)?;
        let offer = Request::Offer(Box::new(signed.clone()));
        let others: Vec<String> = topo
            .members
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| n != site)
            .collect();
        let mut took = HashSet::from([site.clone()]);
        let mut refused = Vec::new();
        for (name, answer) in self.ask_each(&id, &others, offer).await {
            match answer {
                Ok(CtlResponse::Taken { .. } | CtlResponse::Accepted) => {
                    took.insert(name);
                }
                Ok(CtlResponse::Rejected { reason }) => refused.push(reason),
                Ok(other) => refused.push(format!("{name}: answered {other:?}")),
                Err(e) => refused.push(format!("{name}: {e}")),
            }
        }
        if !enough(&topo, &took) {
            let reason = format!(
                "job {id} cannot run without the members that refused it: {}",
                refused.join("; ")
            );
            let taken: Vec<String> = others.into_iter().filter(|n| took.contains(n)).collect();
            let withdraw = Request::Withdraw { reason: reason.clone() };
            for (name, answer) in self.ask_each(&id, &taken, withdraw).await {
                if let Err(e) = answer {
                    tracing::warn!(job = %id, member = %name, error = %e, "could not withdraw the offer");
                }
            }
            self.put(&signed, &topo, JobState::Refused, &reason, all_members(&topo))?;
            return Err(reason);
        }
        let members: Vec<String> = all_members(&topo).into_iter().filter(|n| took.contains(n)).collect();
        self.put(&signed, &topo, JobState::Running, "", members.clone())?;
        // This site's part first: when it hosts the controller, the clients launched next
        // find it there at their first join.
        self.start(&id, topo.clone(), &members, false)?;
        let launch = Request::Launch {
            members: members.clone(),
        };
        let launched: Vec<String> = members.iter().filter(|n| *n != site).cloned().collect();
        for (name, answer) in self.ask_each(&id, &launched, launch).await {
            match answer {
                Ok(CtlResponse::Accepted) => {}
                Ok(CtlResponse::Rejected { reason }) => refused.push(reason),
                Ok(other) => refused.push(format!("{name}: answered the launch with {other:?}")),
                Err(e) => refused.push(format!("{name}: did not start: {e}")),
            }
        }
        tracing::info!(
            job = %id,
            name = %topo.job,
            workflow = topo.workflow.name(),
            members = members.len(),
            refused = refused.len(),
            "job taken"
        );
        for reason in &refused {
            tracing::warn!(job = %id, %reason, "a member refused the job; it goes on without it");
        }
        Ok(CtlResponse::Taken { refused })
    }

    /// A job another member took and offers here: checked the same way, then kept until that
    /// member launches or withdraws it.
    fn offered(self: &Arc<Self>, from: PeerId, signed: SignedJob) -> Answer {
        let id = signed.id();
        let site = &self.policy.name;
        if let Some(r) = self.record(&id)? {
            return match r.view.state {
                JobState::Offered => Ok(CtlResponse::Taken { refused: vec![] }),
                state => Err(format!("{site}: job {id} is {state} here already")),
            };
        }
        let topo = self.check(&signed)?;
        let by = self.members.get(&from).map(|m| m.name.clone());
        if !by.as_ref().is_some_and(|n| topo.members.iter().any(|(m, _)| m == n)) {
            return Err(format!(
                "{site}: job {id} was offered by {from}, who is not one of its members"
            ));
        }
        self.put(&signed, &topo, JobState::Offered, "", all_members(&topo))?;
        tracing::info!(job = %id, name = %topo.job, by = by.as_deref().unwrap_or("?"), "job offered and taken");
        self.expire_offer(id);
        Ok(CtlResponse::Taken { refused: vec![] })
    }

    /// The member that offered a job tells this site to start its part, with the members
    /// that took the job.
    fn launch(self: &Arc<Self>, from: PeerId, id: &JobId, members: &[String]) -> Answer {
        let site = &self.policy.name;
        let record = self
            .record(id)?
            .ok_or_else(|| format!("{site}: job {id} was never offered here"))?;
        if record.view.state != JobState::Offered {
            return Err(format!(
                "{site}: job {id} is {} here, not waiting to start",
                record.view.state
            ));
        }
        let topo = parse(&record.signed).map_err(|e| format!("{site}: {e}"))?;
        let by = self.name_of(&from);
        if !topo.members.iter().any(|(n, _)| *n == by) {
            return Err(format!("{site}: {by} is not a member of job {id} and cannot launch it"));
        }
        if let Some(n) = members.iter().find(|n| !topo.members.iter().any(|(m, _)| m == *n)) {
            return Err(format!(
                "{site}: the launch of job {id} names {n:?}, who is not one of its members"
            ));
        }
        if !members.contains(site) {
            return Err(format!("{site}: the launch of job {id} leaves this site out"));
        }
        let members: Vec<String> = all_members(&topo).into_iter().filter(|n| members.contains(n)).collect();
        self.records
            .update(&id.0, |v| {
                v.state = JobState::Running;
                v.members.clone_from(&members);
            })
            .map_err(|e| format!("{site}: {e}"))?;
        self.start(id, topo, &members, false)?;
        Ok(CtlResponse::Accepted)
    }

    /// The member that offered a job says it will not run after all.
    fn withdraw(&self, from: PeerId, id: &JobId, reason: &str) -> Answer {
        let by = self.name_of(&from);
        let record = self.record(id)?;
        if !record.is_some_and(|r| r.view.members.contains(&by)) {
            return Err(format!("{}: {by} cannot withdraw job {id}", self.policy.name));
        }
        self.settle(id, JobState::Offered, JobState::Withdrawn, reason);
        Ok(CtlResponse::Ack)
    }

    /// This site's jobs (or one job, with every member's view when a user asks), as far as
    /// the asker may see them: members of the consortium and admins see all, researchers
    /// their own.
    async fn jobs(&self, from: PeerId, id: &JobId) -> Answer {
        let site = &self.policy.name;
        let member = self.members.contains(&from);
        let answer = self.jobs_here(from, id).await?;
        let CtlResponse::Jobs(mut views) = answer else {
            return Ok(answer);
        };
        let Some(own) = views.first().cloned().filter(|_| !id.0.is_empty()) else {
            return Ok(CtlResponse::Jobs(views));
        };
        if !member {
            // A user asks: every other member of the job says where it stands there.
            let others: Vec<String> = own.members.iter().filter(|n| *n != site).cloned().collect();
            for (name, answer) in self.ask_each(id, &others, Request::Jobs).await {
                match answer {
                    Ok(CtlResponse::Jobs(v)) => views.extend(v.into_iter().filter(|v| v.id == *id)),
                    Ok(other) => tracing::debug!(member = %name, ?other, "no view of the job"),
                    Err(e) => tracing::debug!(member = %name, error = %e, "no view of the job"),
                }
            }
        }
        Ok(CtlResponse::Jobs(views))
    }

    /// This site's own views of its jobs (all, or job `id`) that `from` may see, a running
    /// part's as it stands now (see [`Self::live`]).
    async fn jobs_here(&self, from: PeerId, id: &JobId) -> Answer {
        let site = &self.policy.name;
        let member = self.members.contains(&from);
        let submitter = self.policy.submitters.iter().find(|s| s.peer_id == from);
        if !member && submitter.is_none() {
            return Err(format!("{site}: {from} may not see this site's jobs"));
        }
        let all = member || submitter.is_some_and(|s| s.role == Role::Admin);
        let visible = |r: &Record| all || r.view.submitter == from.to_string();
        let records = if id.0.is_empty() {
            self.records.all().map_err(|e| format!("{site}: {e}"))?
        } else {
            self.record(id)?.into_iter().collect()
        };
        let records: Vec<Record> = records.into_iter().filter(visible).collect();
        if !id.0.is_empty() && records.is_empty() {
            return Err(format!("{site}: no job {id} here"));
        }
        let connected: HashSet<PeerId> = self
            .node
            .net()
            .connected_peers()
            .await
            .unwrap_or_default()
            .into_iter()
            .collect();
        let listing = id.0.is_empty();
        Ok(CtlResponse::Jobs(
            records
                .into_iter()
                .map(|r| {
                    let mut v = self.live(r, &connected);
                    // The list shows no curves: a curve per job would make the answer grow
                    // with every round of every job (`status JOB` has it).
                    if listing {
                        v.metrics.clear();
                    }
                    v
                })
                .collect(),
        ))
    }

    /// A record's view with what this site sees now, while its part runs: the rounds its
    /// controller has checkpointed, and what the part waits for when the members it needs
    /// cannot be reached (so a job whose members vanished never just shows `running`).
    fn live(&self, r: Record, connected: &HashSet<PeerId>) -> JobView {
        let mut v = r.view;
        if v.state != JobState::Running {
            return v;
        }
        let Ok(topo) = parse(&r.signed) else { return v };
        let site = &self.policy.name;
        let reachable =
            |n: &String| n == site || self.members.by_name(n).is_some_and(|m| connected.contains(&m.peer_id));
        let need = topo.min_clients.max(1);
        let waiting = match &topo.controller {
            Some(c) if c == site => {
                if let Some((round, metrics)) = checkpointed(&self.dir.join("jobs").join(&v.id.0)) {
                    (v.round, v.metrics) = (round, metrics);
                }
                let clients = topo
                    .clients
                    .iter()
                    .filter(|n| v.members.contains(n))
                    .filter(|n| reachable(n))
                    .count();
                (clients < need)
                    .then(|| format!("waiting: {clients} of the {need} clients a round needs can be reached"))
            }
            Some(c) => (!reachable(c)).then(|| format!("waiting: the controller ({c}) cannot be reached")),
            None => {
                let members = v.members.iter().filter(|n| reachable(n)).count();
                (members < need)
                    .then(|| format!("waiting: {members} of the {need} members a round needs can be reached"))
            }
        };
        if let Some(w) = waiting {
            v.reason = w;
        }
        v
    }

    /// Stops job `id` here if the order's signer may (the job's submitter, or an admin in
    /// this site's policy); a user's order goes to every other member of the job first, so
    /// that each records the abort rather than the failure a stopped controller would cause.
    async fn abort(self: &Arc<Self>, from: PeerId, id: &JobId, order: SignedAbort) -> Answer {
        let site = &self.policy.name;
        if order.job != *id {
            return Err(format!("{site}: the order is about job {}, not {id}", order.job));
        }
        let signer = order
            .verify()
            .map_err(|e| format!("{site}: refused an abort whose signature does not hold: {e}"))?;
        let record = self.record(id)?.ok_or_else(|| format!("{site}: no job {id} here"))?;
        let admin = self
            .policy
            .submitters
            .iter()
            .any(|s| s.peer_id == signer && s.role == Role::Admin);
        let by = self.name_of(&signer);
        if record.view.submitter != signer.to_string() && !admin {
            return Err(format!(
                "{site}: {by} may not abort job {id} (its submitter or an admin of this site may)"
            ));
        }
        let reason = if order.reason.is_empty() {
            format!("aborted by {by}")
        } else {
            format!("aborted by {by}: {}", order.reason)
        };
        let mut views = Vec::new();
        if !self.members.contains(&from) {
            let others: Vec<String> = record.view.members.iter().filter(|n| *n != site).cloned().collect();
            let relay = Request::AbortJob(Box::new(order.clone()));
            for (name, answer) in self.ask_each(id, &others, relay).await {
                match answer {
                    Ok(CtlResponse::Jobs(v)) => views.extend(v.into_iter().filter(|v| v.id == *id)),
                    Ok(CtlResponse::Rejected { reason }) => {
                        tracing::warn!(job = %id, member = %name, %reason, "a member refused the abort");
                    }
                    Ok(other) => tracing::warn!(job = %id, member = %name, ?other, "odd answer to the abort"),
                    Err(e) => tracing::warn!(job = %id, member = %name, error = %e, "the abort did not reach a member"),
                }
            }
        }
        // A part that already failed because the controller stopped for this very abort
        // ended aborted, not failed.
        let view = self
            .records
            .update(&id.0, |v| {
                if !v.state.is_over() || (v.state == JobState::Failed && v.reason.contains(&reason)) {
                    v.state = JobState::Aborted;
                    v.reason.clone_from(&reason);
                }
            })
            .map_err(|e| format!("{site}: {e}"))?;
        if let Some(tx) = self.running().get(&id.0) {
            tx.send_replace(Some(reason.clone()));
        }
        tracing::info!(job = %id, %reason, "job aborted");
        views.splice(0..0, view);
        Ok(CtlResponse::Jobs(views))
    }

    /// A job's outputs on this site (its final model, results and checkpoint record), put in
    /// the store for the asker to pull; held for [`DOWNLOAD_HOLD`].
    async fn download(&self, from: PeerId, id: &JobId) -> Answer {
        let site = self.policy.name.clone();
        let CtlResponse::Jobs(views) = self.jobs_here(from, id).await? else {
            return Err(format!("{site}: no job {id} here"));
        };
        let Some(view) = views.into_iter().next() else {
            return Err(format!("{site}: no job {id} here"));
        };
        let dir = self.dir.join("jobs").join(&id.0);
        let store = self.node.store().clone();
        let files = tokio::task::spawn_blocking(move || -> Result<Vec<(String, flare_protocols::BlobRef)>, String> {
            let mut out = Vec::new();
            for name in OUTPUTS {
                let path = dir.join(name);
                let Ok(mut f) = std::fs::File::open(&path) else {
                    continue;
                };
                let manifest = store
                    .import_reader(&mut f, flare_protocols::blob_id::DEFAULT_CHUNK_SIZE)
                    .map_err(|e| format!("{site}: reading {}: {e}", path.display()))?;
                let blob = manifest.blob_ref();
                store.retain(&blob.id);
                out.push((name.to_string(), blob));
            }
            Ok(out)
        })
        .await
        .map_err(|e| format!("{}: {e}", self.policy.name))??;
        if files.is_empty() {
            return Err(format!(
                "{}: job {id} has no outputs here ({}, {} part)",
                self.policy.name, view.state, view.part
            ));
        }
        let (store, held) = (
            self.node.store().clone(),
            files.iter().map(|(_, b)| b.id).collect::<Vec<_>>(),
        );
        tokio::spawn(async move {
            tokio::time::sleep(DOWNLOAD_HOLD).await;
            for id in held {
                store.release(&id);
            }
        });
        Ok(CtlResponse::Files(files))
    }

    /// Starts this site's part of job `id` with `members` (those that took it); its record
    /// follows the part to its end.
    fn start(self: &Arc<Self>, id: &JobId, mut topo: Topology, members: &[String], resume: bool) -> Result<(), String> {
        let site = self.policy.name.clone();
        topo.members.retain(|(n, _)| members.contains(n));
        topo.clients.retain(|n| members.contains(n));
        for (name, m) in &mut topo.members {
            *m = self.members.by_name(name).cloned();
        }
        topo.job = id.0.clone();
        // A job names its data; this site's policy alone says where its own rows are. The
        // admission refused a site without them, so a miss here fails the part, saying why.
        if let Some(name) = &topo.data.dataset {
            let Some(rows) = self.policy.datasets.get(name) else {
                let why = format!("{site}: no dataset {name:?} here");
                self.ended(id, Err(anyhow::anyhow!(why.clone())));
                return Err(why);
            };
            topo.data.local = Some(rows.site_data());
        }
        // A job names a registered learner; this site's policy alone says what it runs.
        if let Some(name) = &topo.registered_learner {
            let Some(l) = self.policy.learners.get(name) else {
                let why = format!("{site}: learner {name:?} is not registered here");
                self.ended(id, Err(anyhow::anyhow!(why.clone())));
                return Err(why);
            };
            topo.site_learner = Some(crate::topology::ExternalSpec {
                command: l.command.clone(),
                env: l.env.clone(),
            });
        }
        let dir = self.dir.join("jobs").join(&id.0);
        let (tx, mut rx) = tokio::sync::watch::channel(None::<String>);
        self.running().insert(id.0.clone(), tx);
        let stop: crate::Stop = async move {
            let why = rx
                .wait_for(Option::is_some)
                .await
                .map(|w| w.clone().unwrap_or_default());
            match why {
                Ok(why) => why,
                // The desk is gone: nothing stops the part but its own end.
                Err(_) => std::future::pending().await,
            }
        }
        .boxed()
        .shared();
        let (desk, id) = (self.clone(), id.clone());
        let span = tracing::info_span!("job", job = %id, site = %site);
        tokio::spawn(
            async move {
                let part = crate::run::Part {
                    node: &desk.node,
                    host: &desk.host,
                    name: &site,
                    data_dir: &dir,
                    stop,
                    resume,
                };
                let ended = crate::run::member_of_job(part, topo, &mut None).await;
                desk.ended(&id, ended);
            }
            .instrument(span),
        );
        Ok(())
    }

    /// Records how this site's part of job `id` ended.
    fn ended(&self, id: &JobId, ended: anyhow::Result<Option<serde_json::Value>>) {
        let stopped = self.running().remove(&id.0).and_then(|tx| tx.borrow().clone());
        let (state, reason, summary) = match (ended, stopped) {
            (_, Some(why)) => (JobState::Aborted, why, None),
            (Ok(Some(s)), None) if s["verified"].as_bool() == Some(false) => (
                JobState::Failed,
                "the add-one result is not initial + the number of training steps".to_owned(),
                Some(s),
            ),
            (Ok(s), None) => (JobState::Finished, String::new(), s),
            (Err(e), None) => (JobState::Failed, format!("{e:#}"), None),
        };
        tracing::info!(job = %id, %state, %reason, "this site's part of the job ended");
        let done = self.records.update(&id.0, |v| {
            // An abort recorded first stays the record's state.
            if v.state != JobState::Aborted {
                v.state = state;
                v.reason = reason;
            }
            match &summary {
                Some(s) => {
                    v.round = s["round_secs"].as_array().map_or(v.round, |r| r.len() as u32);
                    v.metrics = global_metrics(s);
                }
                // A client's part ends finished when the controller finished every round.
                None if state == JobState::Finished => v.round = v.rounds,
                None => {}
            }
            // A controller's checkpoint record has every round it finished, however the part
            // ended, a resumed run's rounds too.
            if let Some((round, metrics)) = checkpointed(&self.dir.join("jobs").join(&id.0)) {
                (v.round, v.metrics) = (round, metrics);
            }
        });
        if let Err(e) = done {
            tracing::error!(job = %id, error = %e, "cannot record the job's end");
        }
    }

    /// Moves job `id` from `from` to `to` with `reason`, if it is still at `from`.
    fn settle(&self, id: &JobId, from: JobState, to: JobState, reason: &str) {
        let r = self.records.update(&id.0, |v| {
            if v.state == from {
                v.state = to;
                reason.clone_into(&mut v.reason);
            }
        });
        if let Err(e) = r {
            tracing::error!(job = %id, error = %e, "cannot record the job's state");
        }
    }

    /// [`admit`], with the jobs this site has taken and not finished; a job refused here is
    /// recorded (with why) once its signature holds.
    fn check(&self, signed: &SignedJob) -> Result<Topology, String> {
        let site = &self.policy.name;
        let taken = self
            .records
            .all()
            .map_err(|e| format!("{site}: {e}"))?
            .iter()
            .filter(|r| !r.view.state.is_over())
            .count();
        admit(&self.policy, &self.members, signed, taken).inspect_err(|why| {
            if signed.verify().is_ok()
                && let Ok(topo) = parse(signed)
                && let Err(e) = self.put(signed, &topo, JobState::Refused, why, all_members(&topo))
            {
                tracing::error!(error = %e, "cannot record a refused job");
            }
        })
    }

    /// Writes a new record of `signed` (this site's view of it).
    fn put(
        &self,
        signed: &SignedJob,
        topo: &Topology,
        state: JobState,
        reason: &str,
        members: Vec<String>,
    ) -> Result<(), String> {
        let site = &self.policy.name;
        let part = match (&topo.controller, topo.clients.contains(site)) {
            (None, _) => "member",
            (Some(c), true) if c == site => "controller+client",
            (Some(c), false) if c == site => "controller",
            _ => "client",
        };
        let record = Record {
            view: JobView {
                id: signed.id(),
                name: topo.job.clone(),
                workflow: topo.workflow.name().to_owned(),
                site: site.clone(),
                part: part.to_owned(),
                state,
                reason: reason.to_owned(),
                round: 0,
                rounds: topo.rounds,
                members,
                submitter: signed.verify().map(|p| p.to_string()).unwrap_or_default(),
                submitted_at_ms: signed.submitted_at_ms,
                updated_at_ms: now_ms(),
                metrics: vec![],
            },
            signed: signed.clone(),
        };
        self.records.put(&record).map_err(|e| format!("{site}: {e}"))
    }

    fn record(&self, id: &JobId) -> Result<Option<Record>, String> {
        self.records
            .get(&id.0)
            .map_err(|e| format!("{}: {e}", self.policy.name))
    }

    /// Sends `body` about job `id` to each named member at once; each answer (or why there
    /// is none) with the member's name.
    async fn ask_each(
        &self,
        id: &JobId,
        names: &[String],
        body: Request,
    ) -> Vec<(String, Result<CtlResponse, String>)> {
        let asks = names.iter().map(|name| {
            let req = CtlRequest {
                job: id.clone(),
                body: body.clone(),
            };
            let peer = self.members.by_name(name).map(|m| m.peer_id);
            async move {
                let Some(peer) = peer else {
                    return (name.clone(), Err("not in this consortium".to_owned()));
                };
                let answer = match tokio::time::timeout(OFFER_TIMEOUT, self.node.net().request(peer, req)).await {
                    Ok(Ok(r)) => Ok(r),
                    Ok(Err(e)) => Err(format!("cannot be reached: {e}")),
                    Err(_) => Err(format!("no answer within {} s", OFFER_TIMEOUT.as_secs())),
                };
                (name.clone(), answer)
            }
        });
        futures::future::join_all(asks).await
    }

    fn running(&self) -> std::sync::MutexGuard<'_, HashMap<String, tokio::sync::watch::Sender<Option<String>>>> {
        // Nothing is left half-changed under this lock: a poisoned one is still good.
        self.running.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn name_of(&self, peer: &PeerId) -> String {
        self.members
            .get(peer)
            .map(|m| m.name.clone())
            .or_else(|| {
                self.policy
                    .submitters
                    .iter()
                    .find(|s| s.peer_id == *peer)
                    .map(|s| s.name.clone())
            })
            .unwrap_or_else(|| peer.to_string())
    }
}

/// The job file, parsed (its signature checked by whoever calls this).
fn parse(signed: &SignedJob) -> Result<Topology, String> {
    let text = std::str::from_utf8(&signed.spec).map_err(|_| "the job spec is not UTF-8 text".to_owned())?;
    Topology::parse(std::path::Path::new(&format!("job {}", signed.id())), text).map_err(|e| e.to_string())
}

/// The members a job names, in its file's order.
fn all_members(topo: &Topology) -> Vec<String> {
    topo.members.iter().map(|(n, _)| n.clone()).collect()
}

/// The rounds a controller has checkpointed in job directory `dir`, and each round's
/// metrics (the global model's where measured, else the clients' weighted mean).
fn checkpointed(dir: &std::path::Path) -> Option<(u32, Vec<BTreeMap<String, f64>>)> {
    let bytes = std::fs::read(dir.join("checkpoints/checkpoint.json")).ok()?;
    let c: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let round = u32::try_from(c["round"].as_u64()? + 1).ok()?;
    let numbers = |m: &serde_json::Value| -> BTreeMap<String, f64> {
        m.as_object()
            .map(|o| {
                o.iter()
                    .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                    .collect()
            })
            .unwrap_or_default()
    };
    let metrics = c["rounds"]
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .map(|r| {
                    let global = numbers(&r["global"]);
                    if global.is_empty() {
                        numbers(&r["metrics"])
                    } else {
                        global
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    Some((round, metrics))
}

/// The global model's metrics after each round, from a job's summary.
fn global_metrics(summary: &serde_json::Value) -> Vec<BTreeMap<String, f64>> {
    summary["global"]
        .as_array()
        .map(|rounds| {
            rounds
                .iter()
                .map(|r| {
                    r.as_object()
                        .map(|o| {
                            o.iter()
                                .filter(|(k, _)| *k != "round")
                                .filter_map(|(k, v)| v.as_f64().map(|f| (k.clone(), f)))
                                .collect()
                        })
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default()
}
