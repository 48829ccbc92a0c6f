//! What `sim` and `run` share to drive a topology's job: the initial model, the learners,
//! the controller's run of the workflow, and its outputs.

use std::path::Path;

use anyhow::Context;
use flare_actors::job::{AddOne, Communicator, FedAvgConfig, FedAvgOutcome, Learner, fedavg};
use flare_protocols::model::{Model, Tensor};
use libp2p::PeerId;
use serde_json::{Value, json};

use crate::topology::{LearnerSpec, ModelSpec, Topology};

/// The add-one job's initial model: seeded fractional values, so exactness means something.
pub fn initial_model(spec: &ModelSpec) -> anyhow::Result<Model> {
    let mut m = Model::new();
    let mut x = spec.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for t in 0..spec.tensors {
        let values: Vec<f32> = (0..spec.elements)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2_000_001) as f32 / 1000.0 - 1000.0
            })
            .collect();
        m.insert(
            format!("tensor.{t:04}"),
            Tensor::from_f32(vec![spec.elements], &values)?,
        );
    }
    Ok(m)
}

/// The learner of client `member`.
pub fn learner(topo: &Topology, _member: &str) -> anyhow::Result<Box<dyn Learner>> {
    match &topo.learner {
        LearnerSpec::AddOne => Ok(Box::new(AddOne { num_samples: 1 })),
        other => anyhow::bail!(
            "{}: learner {other:?} is not available yet (only \"add-one\")",
            topo.path.display()
        ),
    }
}

/// Runs the workflow as the controller, tells the clients the job is over, and returns the
/// outcome with its JSON summary.
pub async fn control(
    comm: &Communicator,
    topo: &Topology,
    clients: Vec<PeerId>,
    checkpoint_dir: Option<&Path>,
) -> anyhow::Result<(FedAvgOutcome, Value)> {
    let initial = initial_model(&topo.model)?;
    let cfg = FedAvgConfig {
        rounds: topo.rounds,
        min_clients: topo.min_clients,
        round_timeout: topo.round_timeout,
        clients,
        checkpoint_dir: checkpoint_dir.map(Path::to_owned),
    };
    let outcome = fedavg::run(comm, &cfg, initial.clone()).await;
    comm.end_job(
        &cfg.clients,
        if outcome.is_ok() { "job finished" } else { "job failed" },
    )
    .await;
    let outcome = outcome?;
    let mut expected = initial;
    for _ in 0..topo.rounds {
        expected.map_f32(|v| v + 1.0);
    }
    let round_secs: Vec<f64> = outcome.rounds.iter().map(|r| r.secs).collect();
    let summary = json!({
        "workflow": "fedavg",
        "job": topo.job,
        "learner": "add-one",
        "controller": topo.controller,
        "clients": topo.clients,
        "rounds": topo.rounds,
        "round_secs": round_secs,
        "contributors_per_round": outcome.rounds.iter().map(|r| r.contributors.len()).collect::<Vec<_>>(),
        "model_bytes": outcome.model.data_bytes(),
        "verified": outcome.model == expected,
    });
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
    let verified = summary["verified"].as_bool() == Some(true);
    eprintln!(
        "done: {} rounds, {:.3} s per round on average; add-one result {}",
        secs.len(),
        secs.iter().sum::<f64>() / secs.len().max(1) as f64,
        if verified {
            "exact (every weight = initial + rounds)"
        } else {
            "WRONG"
        }
    );
    if json {
        println!("{summary}");
    }
    anyhow::ensure!(verified, "the add-one result is not initial + rounds");
    Ok(())
}
