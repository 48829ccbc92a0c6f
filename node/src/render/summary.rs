//! A job's summary (the JSON object `--json` prints and `results.json` keeps) and the files
//! `--out` writes.

use std::path::Path;

use anyhow::Context;

use serde_json::{Value, json};

use crate::topology::{LearnerSpec, Topology};

use crate::job::{JobOutcome, Setup, add_one_exact, learner_name};

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
