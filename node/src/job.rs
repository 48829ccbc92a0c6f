//! What `sim` and `run` share to drive a topology's job: the initial model, the learners,
//! the controller's run of the workflow, and its outputs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flare_actors::job::{AddOne, Communicator, Evaluator, FedAvgConfig, FedAvgOutcome, Learner, fedavg};
use flare_actors::learner::digits::{DigitsFederation, DigitsLearner, MlpSpec, evaluate, model_of};
use flare_protocols::model::{DType, Model};
use libp2p::PeerId;
use serde_json::{Value, json};

use crate::topology::{LearnerSpec, ModelSpec, Topology};

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
pub struct Setup {
    /// The MLP and the dealt data, for the digits learner.
    pub digits: Option<(MlpSpec, Arc<DigitsFederation>)>,
}

impl Setup {
    /// Builds the setup of `topo` (deals the data for the digits learner).
    pub fn new(topo: &Topology) -> anyhow::Result<Self> {
        match &topo.learner {
            LearnerSpec::AddOne => Ok(Self { digits: None }),
            LearnerSpec::Mlp {
                hidden,
                lr,
                epochs,
                batch_size,
            } => {
                let spec = MlpSpec {
                    hidden: hidden.clone(),
                    lr: *lr,
                    batch_size: *batch_size,
                    epochs: *epochs,
                    seed: topo.model.seed,
                };
                let d = &topo.data;
                let fed = DigitsFederation::deal(topo.clients.len(), d.alpha, d.test_fraction, d.seed)
                    .with_context(|| format!("{}: dealing the digits data", topo.path.display()))?;
                Ok(Self {
                    digits: Some((spec, Arc::new(fed))),
                })
            }
        }
    }

    /// The initial global model (made afresh on each call, so nobody holds a spare copy).
    pub fn initial_model(&self, topo: &Topology) -> anyhow::Result<Model> {
        match &self.digits {
            None => add_one_model(&topo.model),
            Some((spec, _)) => model_of(&spec.build()?.params()).map_err(anyhow::Error::msg),
        }
    }

    /// The learner of client `member`.
    pub fn learner(&self, topo: &Topology, member: &str) -> anyhow::Result<Box<dyn Learner>> {
        let Some((spec, fed)) = &self.digits else {
            return Ok(Box::new(AddOne { num_samples: 1 }));
        };
        let i = topo
            .clients
            .iter()
            .position(|c| c == member)
            .with_context(|| format!("{member} is not a client"))?;
        let shard = fed.shards.get(i).context("no shard for this client")?.clone();
        Ok(Box::new(DigitsLearner::new(spec.clone(), shard, i)?))
    }
}

fn learner_name(topo: &Topology) -> &'static str {
    match topo.learner {
        LearnerSpec::AddOne => "add-one",
        LearnerSpec::Mlp { .. } => "mlp",
    }
}

/// Runs the workflow as the controller, tells the clients the job is over, and returns the
/// outcome with its JSON summary.
pub async fn control(
    comm: &Communicator,
    topo: &Topology,
    setup: &Setup,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
) -> anyhow::Result<(FedAvgOutcome, Value)> {
    let evaluate: Option<Evaluator> = setup.digits.as_ref().map(|(spec, fed)| {
        let (spec, fed) = (spec.clone(), fed.clone());
        let f: Evaluator = Arc::new(move |m: &Model| {
            let (accuracy, loss) = evaluate(&spec, m, &fed.test)?;
            Ok(BTreeMap::from([
                ("accuracy".to_owned(), accuracy),
                ("loss".to_owned(), loss),
            ]))
        });
        f
    });
    let cfg = FedAvgConfig {
        rounds: topo.rounds,
        min_clients: topo.min_clients,
        round_timeout: topo.round_timeout,
        clients,
        checkpoint_dir: checkpoint_dir.map(Path::to_owned),
        evaluate,
    };
    let started = std::time::Instant::now();
    let outcome = fedavg::run(comm, &cfg, setup.initial_model(topo)?).await;
    let total_secs = started.elapsed().as_secs_f64();
    comm.end_job(
        &cfg.clients,
        if outcome.is_ok() { "job finished" } else { "job failed" },
    )
    .await;
    let outcome = outcome?;
    let round_secs: Vec<f64> = outcome.rounds.iter().map(|r| r.secs).collect();
    let mut summary = json!({
        "workflow": "fedavg",
        "job": topo.job,
        "learner": learner_name(topo),
        "controller": topo.controller,
        "clients": topo.clients,
        "rounds": topo.rounds,
        "round_secs": round_secs,
        "total_secs": total_secs,
        "contributors_per_round": outcome.rounds.iter().map(|r| r.contributors.len()).collect::<Vec<_>>(),
        "model_bytes": outcome.model.data_bytes(),
    });
    match &setup.digits {
        None => {
            summary["verified"] = json!(add_one_exact(&outcome.model, &topo.model, topo.rounds));
        }
        Some((spec, fed)) => {
            summary["global"] = json!(
                outcome
                    .rounds
                    .iter()
                    .map(|r| json!({ "round": r.round, "accuracy": r.global.get("accuracy"), "loss": r.global.get("loss") }))
                    .collect::<Vec<_>>()
            );
            // The baseline, in the same run: each client's model trained on its shard alone
            // for as many epochs as it trained in the whole job.
            let (spec, fed) = (spec.clone(), fed.clone());
            let epochs = spec.epochs * topo.rounds;
            let local = tokio::task::spawn_blocking(move || fed.local_only(&spec, epochs))
                .await
                .context("local-only training")??;
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
    Ok((outcome, summary))
}

/// Writes `global.safetensors` and `results.json` into `dir`.
pub fn write_outputs(dir: &Path, outcome: &FedAvgOutcome, summary: &Value) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    outcome.model.save(&dir.join("global.safetensors"))?;
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
    match summary["verified"].as_bool() {
        Some(verified) => eprintln!(
            "done: {} rounds, {mean_secs:.3} s per round on average; add-one result {}",
            secs.len(),
            if verified {
                "exact (every weight = initial + rounds)"
            } else {
                "WRONG"
            }
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
    if json {
        println!("{summary}");
    }
    anyhow::ensure!(
        summary["verified"].as_bool() != Some(false),
        "the add-one result is not initial + rounds"
    );
    Ok(())
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
