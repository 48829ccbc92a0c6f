//! Cross-site evaluation's matrix for people and tools: the JSON object the summary carries
//! and the text table `sim` and `run` print. The workflow (`flare_actors::job::cross_site`)
//! computes the matrix; how it is shown lives here.

use flare_actors::job::CrossSiteOutcome;
use serde_json::json;

/// How a [`CrossSiteOutcome`] is shown: a trait so callers keep writing `outcome.table()`.
pub trait CrossSiteReport {
    /// The matrix as JSON: `models`, `sites`, the ranking metric's values under its own name
    /// (e.g. `accuracy`, `null` for an empty cell) and under `values`, each row's `mean`,
    /// every cell's metrics (or `{"error": reason}`) under `cells`, and the `best` model's name.
    fn to_json(&self) -> serde_json::Value;

    /// The matrix as an aligned text table of the ranking metric, each row's mean, the best
    /// model marked `*`, and the reasons for the empty cells below it.
    fn table(&self) -> String;
}

impl CrossSiteReport for CrossSiteOutcome {
    fn to_json(&self) -> serde_json::Value {
        let values: Vec<Vec<Option<f64>>> = (0..self.models.len())
            .map(|r| (0..self.sites.len()).map(|c| self.value(r, c)).collect())
            .collect();
        let cells: Vec<Vec<serde_json::Value>> = self
            .cells
            .iter()
            .map(|row| {
                row.iter()
                    .map(|cell| match cell {
                        Ok(metrics) => json!(metrics),
                        Err(reason) => json!({ "error": reason }),
                    })
                    .collect()
            })
            .collect();
        let means: Vec<Option<f64>> = (0..self.models.len()).map(|r| self.mean(r)).collect();
        let mut out = json!({
            "metric": self.metric,
            "higher_is_better": self.higher_is_better,
            "models": self.models,
            "sites": self.sites,
            "values": values,
            "mean": means,
            "cells": cells,
            "best": self.best.as_ref().map(|b| &b.name),
            "best_mean": self.best.as_ref().map(|b| b.score),
        });
        if let Some(map) = out.as_object_mut() {
            map.entry(self.metric.clone()).or_insert_with(|| json!(values));
        }
        out
    }

    fn table(&self) -> String {
        let best = self.best.as_ref().map(|b| b.name.as_str());
        let num = |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |v| format!("{v:.4}"));
        // Rows of text: the header, then one per model; the last column is the mean.
        let mut grid: Vec<Vec<String>> = vec![
            std::iter::once("model".to_owned())
                .chain(self.sites.iter().cloned())
                .chain(std::iter::once("mean".to_owned()))
                .collect(),
        ];
        for (r, m) in self.models.iter().enumerate() {
            let mark = if Some(m.as_str()) == best { "* " } else { "  " };
            grid.push(
                std::iter::once(format!("{mark}{m}"))
                    .chain((0..self.sites.len()).map(|c| num(self.value(r, c))))
                    .chain(std::iter::once(num(self.mean(r))))
                    .collect(),
            );
        }
        let widths: Vec<usize> = (0..self.sites.len() + 2)
            .map(|c| grid.iter().map(|row| row[c].len()).max().unwrap_or(0))
            .collect();
        let mut out = format!(
            "cross-site {} ({}; rows: models, columns: sites, * best by mean)\n",
            self.metric,
            if self.higher_is_better {
                "higher is better"
            } else {
                "lower is better"
            }
        );
        for row in &grid {
            for (c, (cell, w)) in row.iter().zip(&widths).enumerate() {
                out += &if c == 0 {
                    format!("{cell:<w$}")
                } else {
                    format!("  {cell:>w$}")
                };
            }
            out.push('\n');
        }
        let missing: Vec<String> = self
            .cells
            .iter()
            .enumerate()
            .flat_map(|(r, row)| {
                row.iter().enumerate().filter_map(move |(c, cell)| {
                    let why = cell.as_ref().err()?;
                    Some(format!("  {} on {}: {why}", self.models[r], self.sites[c]))
                })
            })
            .collect();
        if !missing.is_empty() {
            out += "empty cells:\n";
            out += &missing.join("\n");
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use flare_actors::job::cross_site::{Cell, GLOBAL};

    use super::*;

    fn outcome(cells: Vec<Vec<Cell>>) -> CrossSiteOutcome {
        CrossSiteOutcome {
            models: vec![GLOBAL.into(), "a".into(), "b".into()],
            sites: vec!["a".into(), "b".into()],
            cells,
            metric: "accuracy".into(),
            higher_is_better: true,
            best: None,
        }
    }

    fn acc(v: f64) -> Cell {
        Ok(BTreeMap::from([
            ("accuracy".to_owned(), v),
            ("loss".to_owned(), 1.0 - v),
        ]))
    }

    #[test]
    fn json_and_table_show_every_row_and_column() {
        let o = outcome(vec![
            vec![acc(0.75), acc(1.0)],
            vec![acc(0.5), Err("b is unavailable: gone".into())],
            vec![acc(0.25), acc(0.5)],
        ]);
        let j = o.to_json();
        assert_eq!(j["models"], json!(["global", "a", "b"]));
        assert_eq!(j["sites"], json!(["a", "b"]));
        assert_eq!(j["accuracy"], json!([[0.75, 1.0], [0.5, null], [0.25, 0.5]]));
        assert_eq!(j["values"], j["accuracy"]);
        assert_eq!(j["mean"], json!([0.875, 0.5, 0.375]));
        assert_eq!(j["cells"][1][1], json!({ "error": "b is unavailable: gone" }));
        assert_eq!(j["cells"][0][0]["loss"], json!(0.25));
        let t = o.table();
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[1].starts_with("model") && lines[1].ends_with("mean"), "{t}");
        assert!(lines[2].contains("global") && lines[2].contains("0.8750"), "{t}");
        assert!(lines[3].contains("  -  "), "{t}");
        assert!(t.contains("a on b: b is unavailable: gone"), "{t}");
        // Columns line up: every row of the matrix is as wide as the header.
        assert!(lines[1..5].iter().all(|l| l.len() == lines[1].len()), "{t}");
    }
}
