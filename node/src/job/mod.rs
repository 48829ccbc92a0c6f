//! What `sim` and `run` share to drive a topology's job: the initial model, the learners,
//! the controller's run of the workflow, and its outputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flare_actors::Member;
use flare_actors::job::CrossSiteConfig;
use flare_actors::job::cross_site;

use crate::render::{CrossSiteReport, summarize};
use flare_actors::job::cyclic::{self, CyclicConfig};
use flare_actors::job::split::{self, SplitConfig};
use flare_actors::job::swarm::{self, SwarmConfig, SwarmOutcome, SwarmRound};
use flare_actors::job::{Communicator, Ending, Evaluator, FedAvgConfig, JobHost, RoundReport, embed, fedavg};
use flare_actors::learner::digits::model_of;
use flare_actors::learner::inference::FrozenSpec;
use flare_protocols::model::Model;
use libp2p::PeerId;
use serde_json::{Value, json};

use crate::topology::{CyclicOrder, Topology, Workflow};

mod initial;
mod setup;
mod stored;

pub use initial::Initial;
pub use setup::{DigitsData, Setup};
pub(crate) use setup::{add_one_exact, learner_name};
pub use stored::JobModel;

/// What any workflow's run leaves behind, in the shape the summary and outputs need.
pub struct JobOutcome {
    /// The final model (on disk when too large for memory).
    pub model: JobModel,
    /// Seconds per round.
    pub round_secs: Vec<f64>,
    /// The model's test-set metrics after each round (empty maps without a test set).
    pub global: Vec<BTreeMap<String, f64>>,
    /// How many training steps the add-one check expects (rounds for averaging workflows,
    /// successful visits for cyclic).
    pub train_steps: u32,
    /// The workflow's own per-round records, for results.json.
    pub rounds: Value,
    /// Workflow-specific summary fields.
    pub extra: serde_json::Map<String, Value>,
    /// The best model by cross-site evaluation, when it ran: its name and the model.
    pub best: Option<(String, Model)>,
}

/// How the global model is measured: on the test rows this process has (the common test set
/// of a deal; on standing sites, the test rows of this site's dataset), else not at all.
fn evaluator(setup: &Setup) -> Option<Evaluator> {
    let (recipe, data) = setup.digits.as_ref()?;
    data.test()?;
    let (recipe, data) = (recipe.clone(), data.clone());
    let f: Evaluator = Arc::new(move |m: &Model| {
        let test = data.test().ok_or("no test rows")?;
        let (accuracy, loss) = recipe.evaluate(m, test)?;
        Ok(BTreeMap::from([
            ("accuracy".to_owned(), accuracy),
            ("loss".to_owned(), loss),
        ]))
    });
    Some(f)
}

/// Where a restarted FedAvg controller goes on from: the round after the last one its
/// checkpoint directory records, from that round's model; `None` when no round finished.
fn resume_from(dir: &Path) -> anyhow::Result<Option<fedavg::Start>> {
    #[derive(serde::Deserialize)]
    struct Checkpoint {
        round: u32,
        rounds: Vec<RoundReport>,
    }
    let record = dir.join("checkpoint.json");
    let text = match std::fs::read_to_string(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", record.display())),
    };
    let c: Checkpoint =
        serde_json::from_str(&text).with_context(|| format!("{} is not a checkpoint record", record.display()))?;
    // That round's own file, not `global.safetensors`: a controller killed between linking
    // the global model to a newer round and writing that round's record would otherwise
    // resume one round ahead of its record, and run that round twice.
    let model = Model::load(&dir.join(flare_actors::job::round_file(c.round)))?;
    Ok(Some(fedavg::Start {
        model,
        next_round: c.round + 1,
        reports: c.rounds,
    }))
}

/// Runs the topology's workflow as its controller.
async fn run_workflow(
    comm: &Communicator,
    topo: &Topology,
    setup: &Setup,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
    resume: bool,
) -> anyhow::Result<JobOutcome> {
    let evaluate = evaluator(setup);
    match &topo.workflow {
        Workflow::FedAvg | Workflow::InferenceThenFedAvg(_) => {
            let embedded = match &topo.workflow {
                Workflow::InferenceThenFedAvg(frozen) => Some(embed(comm, topo, frozen, &clients).await?),
                _ => None,
            };
            let cfg = FedAvgConfig {
                rounds: topo.rounds,
                min_clients: topo.min_clients,
                round_timeout: topo.round_timeout,
                clients,
                checkpoint_dir: checkpoint_dir.map(Path::to_owned),
                checkpoint_policy: topo.checkpoints.clone(),
                sample: topo.sample.clone(),
                evaluate,
                share_upload: topo.share_upload,
            };
            let start = match checkpoint_dir.filter(|_| resume) {
                Some(dir) => resume_from(dir)?,
                None => None,
            };
            let (model, rounds) = match start {
                Some(start) => {
                    tracing::info!(round = start.next_round, "resuming from the last checkpoint");
                    let o = fedavg::run_from(comm, &cfg, start).await?;
                    (JobModel::Memory(o.model), o.rounds)
                }
                None => {
                    let initial = Initial::of(topo, setup)?.get_global(comm).await?;
                    let o = fedavg::run_global(comm, &cfg, initial).await?;
                    (JobModel::of(comm, o.model).await?, o.rounds)
                }
            };
            let mut extra = serde_json::Map::new();
            extra.insert(
                "contributors_per_round".into(),
                json!(rounds.iter().map(|r| r.contributors.len()).collect::<Vec<_>>()),
            );
            extra.extend(embedded.unwrap_or_default());
            Ok(JobOutcome {
                round_secs: rounds.iter().map(|r| r.secs).collect(),
                global: rounds.iter().map(|r| r.global.clone()).collect(),
                train_steps: topo.rounds,
                rounds: json!(rounds),
                extra,
                model,
                best: None,
            })
        }
        Workflow::Cyclic(order) => {
            let initial = Initial::of(topo, setup)?.get(comm).await?;
            let cfg = CyclicConfig {
                rounds: topo.rounds,
                order: match order {
                    CyclicOrder::Fixed(names) => names
                        .iter()
                        .map(|n| {
                            let i = topo
                                .clients
                                .iter()
                                .position(|c| c == n)
                                .context("order names a non-client")?;
                            clients.get(i).copied().context("client vanished")
                        })
                        .collect::<anyhow::Result<_>>()?,
                    CyclicOrder::Shuffled(_) => clients,
                },
                shuffle_seed: match order {
                    CyclicOrder::Shuffled(seed) => Some(*seed),
                    CyclicOrder::Fixed(_) => None,
                },
                task_timeout: topo.round_timeout,
                evaluate,
            };
            let o = cyclic::run(comm, &cfg, initial).await?;
            let mut extra = serde_json::Map::new();
            extra.insert(
                "visited_per_round".into(),
                json!(o.rounds.iter().map(|r| r.visited.clone()).collect::<Vec<_>>()),
            );
            extra.insert(
                "skipped_per_round".into(),
                json!(o.rounds.iter().map(|r| r.skipped.clone()).collect::<Vec<_>>()),
            );
            extra.insert(
                "lost_per_round".into(),
                json!(o.rounds.iter().map(|r| r.lost.clone()).collect::<Vec<_>>()),
            );
            Ok(JobOutcome {
                round_secs: o.rounds.iter().map(|r| r.secs).collect(),
                global: o.rounds.iter().map(|r| r.global.clone()).collect(),
                train_steps: o.steps,
                rounds: json!(o.rounds),
                extra,
                model: o.model.into(),
                best: None,
            })
        }
        Workflow::Split(spec) => {
            let (_, data) = setup.split.as_ref().context("no split data dealt")?;
            let mut cfg = SplitConfig::new(spec.clone(), clients);
            cfg.step_timeout = topo.round_timeout;
            // The label party here deals the same public data set the parties do, so it can
            // train the central baseline alongside (a simulation's privilege).
            cfg.baseline = Some(data.clone());
            let o = split::run(comm, &cfg, &data.label).await?;
            let mut extra = serde_json::Map::new();
            extra.insert("epochs".into(), json!(o.epochs));
            extra.insert("central".into(), json!(o.central));
            extra.insert("test_accuracy".into(), json!(o.test_accuracy()));
            extra.insert("central_accuracy".into(), json!(o.central_accuracy()));
            extra.insert("activation_bytes".into(), json!(o.activation_bytes));
            extra.insert("gradient_bytes".into(), json!(o.gradient_bytes));
            extra.insert("parties".into(), json!(spec.parties));
            Ok(JobOutcome {
                round_secs: o.epochs.iter().map(|e| e.secs).collect(),
                global: o
                    .epochs
                    .iter()
                    .map(|e| BTreeMap::from([("accuracy".into(), e.test_accuracy), ("loss".into(), e.test_loss)]))
                    .collect(),
                train_steps: 0,
                rounds: json!(o.epochs),
                extra,
                model: model_of(&o.top.params("top")).map_err(anyhow::Error::msg)?.into(),
                best: None,
            })
        }
        Workflow::Swarm => anyhow::bail!("a swarm job has no controller"),
    }
}

/// Federated inference: ships the frozen network to every client as the input of the
/// `embed` task and waits until each has embedded its rows (kept there). Returns the summary
/// fields: the embedding width, rows embedded per member, and the bytes that crossed the wire
/// (the frozen network out; what came back, which must be no model).
async fn embed(
    comm: &Communicator,
    topo: &Topology,
    frozen: &FrozenSpec,
    clients: &[PeerId],
) -> anyhow::Result<serde_json::Map<String, Value>> {
    let cfg = embed::EmbedConfig {
        clients: clients.to_vec(),
        embed_dim: frozen.embed_dim,
        timeout: topo.round_timeout,
    };
    let o = embed::run(comm, &cfg, frozen.model().map_err(anyhow::Error::msg)?).await?;
    let rows: serde_json::Map<String, Value> = o.rows_per_member.into_iter().map(|(m, n)| (m, json!(n))).collect();
    let mut extra = serde_json::Map::new();
    extra.insert("embedding_dim".into(), json!(frozen.embed_dim));
    extra.insert("embedded_rows_per_member".into(), Value::Object(rows));
    extra.insert("frozen_model_bytes".into(), json!(o.frozen_model_bytes));
    extra.insert("embed_returned_bytes".into(), json!(o.returned_bytes));
    Ok(extra)
}

/// A swarm member's configuration, from the topology; `members` in topology order.
pub fn swarm_config(topo: &Topology, setup: &Setup, members: &[Member], name: &str) -> SwarmConfig {
    SwarmConfig {
        rounds: topo.rounds,
        min_clients: topo.min_clients,
        round_timeout: topo.round_timeout,
        members: members.iter().map(|m| m.peer_id).collect(),
        name: name.to_owned(),
        spec_hash: topo.spec_hash(),
        heartbeat: std::time::Duration::from_millis(500),
        evaluate: evaluator(setup),
        crash_in_round: None,
        share_upload: topo.share_upload,
    }
}

/// This member's part of a swarm job from `initial`, in the shape of any job's outcome. The
/// final model is moved into it, not copied, and stays on disk when too large for memory.
pub async fn run_swarm(comm: &Communicator, cfg: &SwarmConfig, initial: Initial) -> anyhow::Result<JobOutcome> {
    let initial = initial.get_global(comm).await?;
    let SwarmOutcome {
        model,
        rounds,
        completed,
    } = swarm::run(comm, cfg, initial).await?;
    let model = JobModel::of(comm, model).await?;
    Ok(swarm_outcome(&rounds, completed, model, comm.peers()))
}

/// A swarm run's rounds (`completed` of them behind `model`) in the shape of any job's outcome.
fn swarm_outcome(rounds: &[SwarmRound], completed: u32, model: JobModel, members: &[Member]) -> JobOutcome {
    let name = |p: &PeerId| {
        members
            .iter()
            .find(|m| m.peer_id == *p)
            .map_or_else(|| p.to_string(), |m| m.name.clone())
    };
    let mut extra = serde_json::Map::new();
    extra.insert(
        "aggregator_per_round".into(),
        json!(rounds.iter().map(|r| name(&r.aggregator)).collect::<Vec<_>>()),
    );
    extra.insert(
        "contributors_per_round".into(),
        json!(
            rounds
                .iter()
                .map(|r| r.contributors.iter().map(name).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        ),
    );
    extra.insert(
        "failovers".into(),
        json!(
            rounds
                .iter()
                .flat_map(|r| r.passed_over.iter().map(move |dead| {
                    json!({ "round": r.round, "dead": name(dead), "successor": name(&r.aggregator) })
                }))
                .collect::<Vec<_>>()
        ),
    );
    let per_round = json!(
        rounds
            .iter()
            .map(|r| json!({
                "round": r.round,
                "aggregator": name(&r.aggregator),
                "contributors": r.contributors.iter().map(name).collect::<Vec<_>>(),
                "secs": r.secs,
                "global": r.global,
            }))
            .collect::<Vec<_>>()
    );
    JobOutcome {
        round_secs: rounds.iter().map(|r| r.secs).collect(),
        global: rounds.iter().map(|r| r.global.clone()).collect(),
        train_steps: completed,
        rounds: per_round,
        extra,
        model,
        best: None,
    }
}

/// Runs the topology's job as its controller: the workflow (then cross-site evaluation, when
/// asked) in a [`Controller`](flare_actors::job::controller::Controller) actor, and the
/// summary. Ctrl-C aborts the job: every client is told why, and this returns the error.
#[allow(clippy::too_many_arguments)] // two callers (sim, run), each argument a different thing
pub async fn control(
    host: &JobHost,
    comm: Communicator,
    topo: &Topology,
    setup: &Setup,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
    stop: crate::Stop,
    resume: bool,
) -> anyhow::Result<(JobOutcome, Value)> {
    let (t, s, c) = (topo.clone(), setup.clone(), clients.clone());
    let dir = checkpoint_dir.map(Path::to_owned);
    let workflow = move |comm: Arc<Communicator>| async move {
        let started = std::time::Instant::now();
        // When round 0 began, by the wall clock: what `bench consortium` times a submission to.
        let started_at_ms = crate::site::records::now_ms();
        let mut outcome = run_workflow(&comm, &t, &s, c.clone(), dir.as_deref(), resume).await;
        // The workflow's own time, without the cross-site evaluation after it.
        let total_secs = started.elapsed().as_secs_f64();
        let mut matrix = None;
        if let (Ok(o), Some(timeout)) = (&mut outcome, t.cross_site) {
            // Add-one has no accuracy to rank by: its validation reports the mean weight.
            let metric = if s.digits.is_some() { "accuracy" } else { "mean_weight" };
            match cross_site_eval(&comm, o, c.clone(), timeout, metric).await {
                Ok(m) => matrix = Some(m),
                Err(e) => outcome = Err(e),
            }
        }
        let end = match &outcome {
            Ok(_) => Ending::finished("job finished"),
            Err(e) => Ending::failed(format!("job failed: {e:#}")),
        };
        comm.end_job(&c, &end).await;
        outcome.map(|o| (o, matrix, total_secs, started_at_ms))
    };
    let mut ctl = host
        .start_controller(comm, clients, workflow)
        .await
        .context("starting the controller")?;
    // Members are told the controller stopped, and why (e.g. "interrupted (Ctrl-C)").
    let stopped = async { format!("the controller was {}", stop.await) };
    let (outcome, matrix, total_secs, started_at_ms) = ctl.outcome_unless(stopped).await??;
    let mut summary = summarize(topo, setup, &outcome, total_secs).await?;
    summary["started_at_ms"] = serde_json::json!(started_at_ms);
    if let Some(m) = matrix {
        summary["cross_site"] = m;
    }
    Ok((outcome, summary))
}

/// Cross-site evaluation after training: every client's latest model and the final one on
/// every client's validation data; prints the table and keeps the best model.
async fn cross_site_eval(
    comm: &Communicator,
    outcome: &mut JobOutcome,
    sites: Vec<PeerId>,
    timeout: std::time::Duration,
    metric: &str,
) -> anyhow::Result<Value> {
    let global = comm.publish(Arc::new(outcome.model.memory()?.clone())).await?;
    let mut cfg = CrossSiteConfig::new(sites, Some(global));
    cfg.task_timeout = timeout;
    metric.clone_into(&mut cfg.metric);
    let m = cross_site::run(comm, &cfg).await?;
    eprintln!("{}", m.table());
    outcome.best = m.best.as_ref().map(|b| (b.name.clone(), b.model.clone()));
    Ok(m.to_json())
}
