//! A job's summary (the JSON object `--json` prints and `results.json` keeps) and the files
//! `--out` writes.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use flare_actors::learner::recipe::DigitsRecipe;

use serde_json::{Value, json};

use crate::topology::{LearnerSpec, Topology};

use crate::job::{DigitsData, JobOutcome, Setup, add_one_exact, learner_name};

/// The job's summary JSON: timing, the global model's metrics per round, and the baseline
/// (local-only training for the MLP, exactness for add-one). A job on a named dataset has no
/// local-only baseline: its rows stay at their sites.
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
            "exchanged_tensors": outcome.model.memory()?.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
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
        // The members' own code trains (on dealt rows, or from a model only it knows): there
        // is no add-one result to check.
        None if topo.model.from.is_some() || setup.scripts.is_some() => {}
        None => {
            summary["verified"] = json!(add_one_exact(&outcome.model, &topo.model, outcome.train_steps));
            summary["add_one_steps"] = json!(outcome.train_steps);
        }
        Some((recipe, data)) => {
            summary["global"] = global;
            if topo.data.dataset.is_some() {
                summary["dataset"] = json!(topo.data.dataset);
            }
            baseline(topo, recipe.clone(), data.clone(), &mut summary).await?;
        }
    }
    Ok(summary)
}

/// The baseline, in the same run: where training started (for fine-tuning: the pretrained
/// base's accuracy) on the test rows, when there are some here; and, for a deal, each client's
/// model trained on its shard alone for as many epochs as it trained in the whole job. A job on
/// a named dataset has no local-only baseline: it would need every site's rows, which never
/// leave their sites.
async fn baseline(
    topo: &Topology,
    recipe: Arc<dyn DigitsRecipe>,
    data: Arc<DigitsData>,
    summary: &mut Value,
) -> anyhow::Result<()> {
    let epochs = recipe.epochs() * topo.rounds;
    let (initial, local) = tokio::task::spawn_blocking(move || {
        let initial = match data.test() {
            Some(test) => Some(recipe.evaluate(&recipe.initial_model()?, test)?),
            None => None,
        };
        let local = match data.federation() {
            Some(fed) => Some(recipe.local_only(fed, epochs)?),
            None => None,
        };
        Ok::<_, String>((initial, local))
    })
    .await
    .context("local-only training")?
    .map_err(anyhow::Error::msg)?;
    if let Some((accuracy, loss)) = initial {
        summary["initial"] = json!({ "accuracy": accuracy, "loss": loss });
    }
    if let Some(local) = local {
        let per_member: serde_json::Map<String, Value> = topo
            .clients
            .iter()
            .zip(&local)
            .map(|(n, (acc, loss))| (n.clone(), json!({ "accuracy": acc, "loss": loss })))
            .collect();
        let mean = local.iter().map(|(a, _)| a).sum::<f64>() / local.len().max(1) as f64;
        summary["local_only"] = json!({ "epochs": epochs, "members": per_member, "mean_accuracy": mean });
    }
    Ok(())
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
