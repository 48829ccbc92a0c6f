//! What `sim` and `run` share to drive a topology's job: the initial model, the learners,
//! the controller's run of the workflow, and its outputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flare_actors::Member;
use flare_actors::job::CrossSiteConfig;
use flare_actors::job::cross_site;

use crate::render::CrossSiteReport;
use flare_actors::job::cyclic::{self, CyclicConfig};
use flare_actors::job::split::{self, SplitConfig};
use flare_actors::job::swarm::{SwarmConfig, SwarmOutcome};
use flare_actors::job::{AddOne, Communicator, Ending, Evaluator, FedAvgConfig, JobHost, Learner, embed, fedavg};
use flare_actors::learner::Paced;
use flare_actors::learner::digits::{DigitsFederation, MlpSpec, model_of};
use flare_actors::learner::external::{ExternalConfig, ExternalLearner};
use flare_actors::learner::inference::{FrozenSpec, InferenceSpec};
use flare_actors::learner::recipe::DigitsRecipe;
use flare_actors::learner::split::{SplitDataParty, SplitSpec, VerticalDigits};
use flare_protocols::model::{DType, Model};
use libp2p::PeerId;
use serde_json::{Value, json};

use crate::topology::{CyclicOrder, ExternalSpec, LearnerSpec, ModelSpec, Topology, Workflow};

/// The add-one job's values: seeded fractional numbers, so exactness means something.
fn add_one_values(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 2_000_001) as f32 / 1000.0 - 1000.0
    }
}

/// The add-one job's initial model, built in place (one buffer however large).
pub fn add_one_model(spec: &ModelSpec) -> anyhow::Result<Model> {
    let mut m = Model::zeros((0..spec.tensors).map(|t| (format!("tensor.{t:04}"), DType::F32, vec![spec.elements])))?;
    let mut next = add_one_values(spec.seed);
    m.map_f32(|_| next());
    Ok(m)
}

/// Whether every weight of `model` is the initial value plus `rounds`, computed as the
/// clients do (adding 1.0 in f32, round after round), without a second copy of the model.
fn add_one_exact(model: &Model, spec: &ModelSpec, rounds: u32) -> bool {
    let names: Vec<String> = (0..spec.tensors).map(|t| format!("tensor.{t:04}")).collect();
    if model.len() != names.len() {
        return false;
    }
    let mut next = add_one_values(spec.seed);
    names.iter().all(|name| {
        model.get(name).is_some_and(|t| {
            t.shape() == [spec.elements]
                && t.data().chunks_exact(4).all(|b| {
                    let mut want = next();
                    for _ in 0..rounds {
                        want += 1.0;
                    }
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() == want.to_bits()
                })
        })
    })
}

/// Everything every member derives from the topology alone, identically.
#[derive(Clone)]
pub struct Setup {
    /// The kind of digits model (pure-Rust MLP or `tch`) and the dealt data.
    pub digits: Option<(Arc<dyn DigitsRecipe>, Arc<DigitsFederation>)>,
    /// The vertically split data, for split learning.
    pub split: Option<(SplitSpec, Arc<VerticalDigits>)>,
}

impl Setup {
    /// Builds the setup of `topo` (deals the data for the digits learner).
    pub fn new(topo: &Topology) -> anyhow::Result<Self> {
        match &topo.learner {
            LearnerSpec::AddOne { .. } => Ok(Self {
                digits: None,
                split: None,
            }),
            LearnerSpec::Split => {
                let Workflow::Split(spec) = &topo.workflow else {
                    anyhow::bail!("{}: the split learner needs the split workflow", topo.path.display());
                };
                let d = &topo.data;
                let data = VerticalDigits::deal(spec.parties, d.test_fraction, d.seed)
                    .with_context(|| format!("{}: dealing the digits data", topo.path.display()))?;
                Ok(Self {
                    digits: None,
                    split: Some((spec.clone(), Arc::new(data))),
                })
            }
            LearnerSpec::Mlp {
                hidden,
                lr,
                epochs,
                batch_size,
            } => {
                let mlp = MlpSpec {
                    hidden: hidden.clone(),
                    lr: *lr,
                    batch_size: *batch_size,
                    epochs: *epochs,
                    seed: topo.model.seed,
                };
                match &topo.workflow {
                    // The MLP is the head on the frozen network's embeddings.
                    Workflow::InferenceThenFedAvg(frozen) => Self::digits(
                        topo,
                        Arc::new(InferenceSpec {
                            head: mlp,
                            frozen: frozen.clone(),
                        }),
                    ),
                    _ => Self::digits(topo, Arc::new(mlp)),
                }
            }
            LearnerSpec::Tch { .. } => Self::digits(topo, crate::torch::recipe(topo)?),
        }
    }

    /// Deals the digits data for a digits model `recipe`.
    fn digits(topo: &Topology, recipe: Arc<dyn DigitsRecipe>) -> anyhow::Result<Self> {
        let d = &topo.data;
        let fed = DigitsFederation::deal(topo.clients.len(), d.alpha, d.test_fraction, d.seed)
            .with_context(|| format!("{}: dealing the digits data", topo.path.display()))?;
        Ok(Self {
            digits: Some((recipe, Arc::new(fed))),
            split: None,
        })
    }

    /// The initial global model (made afresh on each call, so nobody holds a spare copy).
    pub fn initial_model(&self, topo: &Topology) -> anyhow::Result<Model> {
        anyhow::ensure!(self.split.is_none(), "split learning starts from no shared model");
        match &self.digits {
            None => add_one_model(&topo.model),
            Some((recipe, _)) => recipe.initial_model().map_err(anyhow::Error::msg),
        }
    }

    /// The learner of client `member`.
    /// `work_dir` is where an external learner's socket and model files go (one per member
    /// and job; keep its path short: a Unix socket path has at most ~100 bytes).
    pub fn learner(&self, topo: &Topology, member: &str, work_dir: &Path) -> anyhow::Result<Box<dyn Learner>> {
        if let Some(ext) = topo.external.get(member) {
            return self.external_learner(topo, member, ext, work_dir);
        }
        if let Some((spec, data)) = &self.split {
            let p = topo
                .clients
                .iter()
                .position(|c| c == member)
                .with_context(|| format!("{member} is not a data party"))?;
            let features = data.parties.get(p).context("no features for this party")?.clone();
            return Ok(Box::new(SplitDataParty::new(spec, p, features)?));
        }
        let Some((recipe, fed)) = &self.digits else {
            let delay = match topo.learner {
                LearnerSpec::AddOne { delay } => delay,
                LearnerSpec::Mlp { .. } | LearnerSpec::Split | LearnerSpec::Tch { .. } => std::time::Duration::ZERO,
            };
            // Cross-site evaluation gets its last output from the executor's store.
            return Ok(Box::new(Paced::new(AddOne { num_samples: 1 }, delay)));
        };
        let i = topo
            .clients
            .iter()
            .position(|c| c == member)
            .with_context(|| format!("{member} is not a client"))?;
        let shard = fed.shards.get(i).context("no shard for this client")?.clone();
        recipe.learner(shard, i).map_err(anyhow::Error::msg)
    }
}

impl Setup {
    /// The external learner of `member`: the command of its topology entry, run with the
    /// job's round timeout per task; with the digits learner it gets its training shard as a
    /// CSV (64 features in [0, 1], then the label) named by `DIGITS_CSV`.
    fn external_learner(
        &self,
        topo: &Topology,
        member: &str,
        ext: &ExternalSpec,
        work_dir: &Path,
    ) -> anyhow::Result<Box<dyn Learner>> {
        std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        let mut cfg = ExternalConfig::new(ext.command.clone(), work_dir, member);
        cfg.task_timeout = topo.round_timeout;
        cfg.env = ext.env.clone();
        if let Some((_, fed)) = &self.digits {
            let i = topo
                .clients
                .iter()
                .position(|c| c == member)
                .with_context(|| format!("{member} is not a client"))?;
            let shard = fed.shards.get(i).context("no shard for this client")?;
            let path = work_dir.join("train.csv");
            let mut csv = String::new();
            for (row, label) in shard.features().chunks(shard.dim()).zip(shard.labels()) {
                for v in row {
                    csv.push_str(&format!("{v},"));
                }
                csv.push_str(&format!("{label}\n"));
            }
            std::fs::write(&path, csv).with_context(|| format!("writing {}", path.display()))?;
            cfg.env.insert("DIGITS_CSV".into(), path.to_string_lossy().into_owned());
        }
        Ok(Box::new(ExternalLearner::new(cfg)?))
    }
}

fn learner_name(topo: &Topology, setup: &Setup) -> &'static str {
    if let Some((recipe, _)) = &setup.digits {
        return recipe.name();
    }
    match topo.learner {
        LearnerSpec::AddOne { .. } => "add-one",
        LearnerSpec::Split => "split",
        LearnerSpec::Mlp { .. } | LearnerSpec::Tch { .. } => "mlp",
    }
}

/// What any workflow's run leaves behind, in the shape the summary and outputs need.
pub struct JobOutcome {
    /// The final model.
    pub model: Model,
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

fn evaluator(setup: &Setup) -> Option<Evaluator> {
    setup.digits.as_ref().map(|(recipe, fed)| {
        let (recipe, fed) = (recipe.clone(), fed.clone());
        let f: Evaluator = Arc::new(move |m: &Model| {
            let (accuracy, loss) = recipe.evaluate(m, &fed.test)?;
            Ok(BTreeMap::from([
                ("accuracy".to_owned(), accuracy),
                ("loss".to_owned(), loss),
            ]))
        });
        f
    })
}

/// Runs the topology's workflow as its controller.
async fn run_workflow(
    comm: &Communicator,
    topo: &Topology,
    setup: &Setup,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
) -> anyhow::Result<JobOutcome> {
    let evaluate = evaluator(setup);
    match &topo.workflow {
        Workflow::FedAvg | Workflow::InferenceThenFedAvg(_) => {
            let embedded = match &topo.workflow {
                Workflow::InferenceThenFedAvg(frozen) => Some(embed(comm, topo, frozen, &clients).await?),
                _ => None,
            };
            let initial = setup.initial_model(topo)?;
            let cfg = FedAvgConfig {
                rounds: topo.rounds,
                min_clients: topo.min_clients,
                round_timeout: topo.round_timeout,
                clients,
                checkpoint_dir: checkpoint_dir.map(Path::to_owned),
                evaluate,
            };
            let o = fedavg::run(comm, &cfg, initial).await?;
            let mut extra = serde_json::Map::new();
            extra.insert(
                "contributors_per_round".into(),
                json!(o.rounds.iter().map(|r| r.contributors.len()).collect::<Vec<_>>()),
            );
            extra.extend(embedded.unwrap_or_default());
            Ok(JobOutcome {
                round_secs: o.rounds.iter().map(|r| r.secs).collect(),
                global: o.rounds.iter().map(|r| r.global.clone()).collect(),
                train_steps: topo.rounds,
                rounds: json!(o.rounds),
                extra,
                model: o.model,
                best: None,
            })
        }
        Workflow::Cyclic(order) => {
            let initial = setup.initial_model(topo)?;
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
                model: o.model,
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
                model: model_of(&o.top.params("top")).map_err(anyhow::Error::msg)?,
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
    }
}

/// One member's swarm run in the shape of any job's outcome.
pub fn swarm_outcome(o: SwarmOutcome, members: &[Member]) -> JobOutcome {
    let name = |p: &PeerId| {
        members
            .iter()
            .find(|m| m.peer_id == *p)
            .map_or_else(|| p.to_string(), |m| m.name.clone())
    };
    let mut extra = serde_json::Map::new();
    extra.insert(
        "aggregator_per_round".into(),
        json!(o.rounds.iter().map(|r| name(&r.aggregator)).collect::<Vec<_>>()),
    );
    extra.insert(
        "contributors_per_round".into(),
        json!(
            o.rounds
                .iter()
                .map(|r| r.contributors.iter().map(name).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        ),
    );
    extra.insert(
        "failovers".into(),
        json!(
            o.rounds
                .iter()
                .flat_map(|r| r.passed_over.iter().map(move |dead| {
                    json!({ "round": r.round, "dead": name(dead), "successor": name(&r.aggregator) })
                }))
                .collect::<Vec<_>>()
        ),
    );
    let rounds = json!(
        o.rounds
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
        round_secs: o.rounds.iter().map(|r| r.secs).collect(),
        global: o.rounds.iter().map(|r| r.global.clone()).collect(),
        train_steps: o.completed,
        rounds,
        extra,
        model: o.model,
        best: None,
    }
}

/// Runs the topology's job as its controller: the workflow (then cross-site evaluation, when
/// asked) in a [`Controller`](flare_actors::job::controller::Controller) actor, and the
/// summary. Ctrl-C aborts the job: every client is told why, and this returns the error.
pub async fn control(
    host: &JobHost,
    comm: Communicator,
    topo: &Topology,
    setup: &Setup,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
) -> anyhow::Result<(JobOutcome, Value)> {
    let (t, s, c) = (topo.clone(), setup.clone(), clients.clone());
    let dir = checkpoint_dir.map(Path::to_owned);
    let workflow = move |comm: Arc<Communicator>| async move {
        let started = std::time::Instant::now();
        let mut outcome = run_workflow(&comm, &t, &s, c.clone(), dir.as_deref()).await;
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
        outcome.map(|o| (o, matrix, total_secs))
    };
    let mut ctl = host
        .start_controller(comm, clients, workflow)
        .await
        .context("starting the controller")?;
    let (outcome, matrix, total_secs) = ctl
        .outcome_unless(crate::ctrl_c(), "the controller was interrupted (Ctrl-C)")
        .await??;
    let mut summary = summarize(topo, setup, &outcome, total_secs).await?;
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
    let global = comm.publish(Arc::new(outcome.model.clone())).await?;
    let mut cfg = CrossSiteConfig::new(sites, Some(global));
    cfg.task_timeout = timeout;
    metric.clone_into(&mut cfg.metric);
    let m = cross_site::run(comm, &cfg).await?;
    eprintln!("{}", m.table());
    outcome.best = m.best.as_ref().map(|b| (b.name.clone(), b.model.clone()));
    Ok(m.to_json())
}

/// The job's summary JSON: timing, the global model's metrics per round, and the baseline
/// (local-only training for the MLP, exactness for add-one).
pub async fn summarize(topo: &Topology, setup: &Setup, outcome: &JobOutcome, total_secs: f64) -> anyhow::Result<Value> {
    let mut summary = json!({
        "workflow": topo.workflow.name(),
        "job": topo.job,
        "learner": learner_name(topo, setup),
        "controller": topo.controller,
        "clients": topo.clients,
        "rounds": topo.rounds,
        "round_secs": outcome.round_secs,
        "total_secs": total_secs,
        "model_bytes": outcome.model.data_bytes(),
    });
    for (k, v) in &outcome.extra {
        summary[k] = v.clone();
    }
    if let LearnerSpec::Tch {
        finetune, trainable, ..
    } = &topo.learner
        && (finetune.is_some() || trainable.is_some())
    {
        // What crossed the wire: the trainable tensors, nothing of the frozen rest.
        use flare_actors::learner::torch::FineTune;
        summary["finetune"] = json!({
            "method": match finetune {
                None => "none",
                Some(FineTune::Full) => "full",
                Some(FineTune::Lora { .. }) => "lora",
            },
            "exchanged_tensors": outcome.model.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        });
    }
    let global = json!(
        outcome
            .global
            .iter()
            .enumerate()
            .map(|(round, g)| json!({ "round": round, "accuracy": g.get("accuracy"), "loss": g.get("loss") }))
            .collect::<Vec<_>>()
    );
    if setup.split.is_some() {
        // Split learning's baseline is the central network, in the workflow's own fields.
        summary["global"] = global;
        return Ok(summary);
    }
    match &setup.digits {
        None => {
            summary["verified"] = json!(add_one_exact(&outcome.model, &topo.model, outcome.train_steps));
            summary["add_one_steps"] = json!(outcome.train_steps);
        }
        Some((recipe, fed)) => {
            summary["global"] = global;
            // The baseline, in the same run: each client's model trained on its shard alone
            // for as many epochs as it trained in the whole job.
            let (recipe, fed) = (recipe.clone(), fed.clone());
            let epochs = recipe.epochs() * topo.rounds;
            let (initial, local) = tokio::task::spawn_blocking(move || {
                let initial = recipe.evaluate(&recipe.initial_model()?, &fed.test)?;
                Ok::<_, String>((initial, recipe.local_only(&fed, epochs)?))
            })
            .await
            .context("local-only training")?
            .map_err(anyhow::Error::msg)?;
            // Where training started (for fine-tuning: the pretrained base's accuracy).
            summary["initial"] = json!({ "accuracy": initial.0, "loss": initial.1 });
            let per_member: serde_json::Map<String, Value> = topo
                .clients
                .iter()
                .zip(&local)
                .map(|(n, (acc, loss))| (n.clone(), json!({ "accuracy": acc, "loss": loss })))
                .collect();
            let mean = local.iter().map(|(a, _)| a).sum::<f64>() / local.len().max(1) as f64;
            summary["local_only"] = json!({ "epochs": epochs, "members": per_member, "mean_accuracy": mean });
        }
    }
    Ok(summary)
}

/// Writes `global.safetensors` and `results.json` into `dir`.
pub fn write_outputs(dir: &Path, outcome: &JobOutcome, summary: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    outcome.model.save(&dir.join("global.safetensors"))?;
    if let Some((_, best)) = &outcome.best {
        best.save(&dir.join("best.safetensors"))?;
    }
    let results = json!({ "summary": summary, "rounds": outcome.rounds });
    let path = dir.join("results.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&results)?).with_context(|| format!("writing {}", path.display()))
}

/// Prints the end of a job: a line on stderr, and the summary on stdout with `--json`.
pub fn report(summary: &Value, json: bool) -> anyhow::Result<()> {
    let secs: Vec<f64> = summary["round_secs"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let mean_secs = secs.iter().sum::<f64>() / secs.len().max(1) as f64;
    if let Some(acc) = summary["test_accuracy"].as_f64() {
        eprintln!(
            "done: {} epochs of split learning, {mean_secs:.3} s per epoch; test accuracy {acc:.4}; the same network \
             trained centrally: {:.4}",
            secs.len(),
            summary["central_accuracy"].as_f64().unwrap_or(f64::NAN)
        );
    } else {
        report_training(summary, &secs, mean_secs);
    }
    if json {
        println!("{summary}");
    }
    anyhow::ensure!(
        summary["verified"].as_bool() != Some(false),
        "the add-one result is not initial + the number of training steps"
    );
    Ok(())
}

fn report_training(summary: &Value, secs: &[f64], mean_secs: f64) {
    match summary["verified"].as_bool() {
        Some(verified) => eprintln!(
            "done: {} rounds, {mean_secs:.3} s per round on average; add-one result {} (every weight = initial + {} \
             training steps)",
            secs.len(),
            if verified { "exact" } else { "WRONG" },
            summary["add_one_steps"]
        ),
        None => {
            let last = summary["global"]
                .as_array()
                .and_then(|g| g.last())
                .cloned()
                .unwrap_or_default();
            eprintln!(
                "done: {} rounds, {mean_secs:.3} s per round on average; global model: test accuracy {:.4}, loss {:.4}; \
                 local-only training: mean test accuracy {:.4}",
                secs.len(),
                last["accuracy"].as_f64().unwrap_or(f64::NAN),
                last["loss"].as_f64().unwrap_or(f64::NAN),
                summary["local_only"]["mean_accuracy"].as_f64().unwrap_or(f64::NAN)
            );
        }
    }
}

/// Draws the global model's test accuracy per round against the local-only baselines.
pub fn draw(topo: &Topology, summary: &Value, path: &Path) -> anyhow::Result<()> {
    use crate::plot::{Series, chart};
    let global: Vec<f64> = summary["global"]
        .as_array()
        .context("this job has no test-set metrics to draw")?
        .iter()
        .filter_map(|g| g["accuracy"].as_f64())
        .collect();
    let mean = summary["local_only"]["mean_accuracy"]
        .as_f64()
        .context("no local-only baseline")?;
    let members: Vec<(String, f64)> = summary["local_only"]["members"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.clone(), v["accuracy"].as_f64()?)))
                .collect()
        })
        .unwrap_or_default();
    let flat = |v: f64| vec![v; global.len()];
    let mean_line = flat(mean);
    let colors = ["#bbb", "#999", "#777", "#555", "#333"];
    let member_lines: Vec<(String, Vec<f64>)> = members
        .iter()
        .map(|(n, a)| (format!("{n} alone ({a:.2})"), flat(*a)))
        .collect();
    let fl_label = format!("federated ({:.2})", global.last().copied().unwrap_or(f64::NAN));
    let mean_label = format!("local-only mean ({mean:.2})");
    let mut series = vec![
        Series {
            label: &fl_label,
            values: &global,
            color: "#d62728",
            dashed: false,
        },
        Series {
            label: &mean_label,
            values: &mean_line,
            color: "#1f77b4",
            dashed: true,
        },
    ];
    for (i, (label, values)) in member_lines.iter().enumerate() {
        series.push(Series {
            label,
            values,
            color: colors[i % colors.len()],
            dashed: true,
        });
    }
    let title = format!("{}: test accuracy of the global model per round", topo.job);
    let svg = chart(&title, "round", "test accuracy", 0.3, &series);
    std::fs::write(path, svg).with_context(|| format!("writing {}", path.display()))
}
