//! What a person reads at the end of a job: the one-line report (or the summary as JSON)
//! and the learning-curve SVG.

use std::path::Path;

use anyhow::Context;

use serde_json::Value;

use crate::topology::Topology;

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
    use super::plot::{Series, chart};
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
