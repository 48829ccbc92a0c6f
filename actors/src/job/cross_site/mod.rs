//! Cross-site evaluation: every member's own model, and the global one, measured on every
//! member's local validation data. The result is a matrix (rows: models, columns: sites) and
//! the model it selects, so a federation can keep the model that does best across all sites.
//!
//! 1. **Models**: every site is asked for its local model (`submit_model`); the model stays
//!    on the site, only its `BlobRef` comes back. The global model, if any, is a blob in the
//!    controller's store.
//! 2. **Matrix**: for each (model, site) pair a `validate` task goes to the site, naming the
//!    model's owner, then the sites that already validated it, as where to pull it from
//!    (`input_from`): models travel member to member, and the controller uploads only the
//!    global one. At most [`CrossSiteConfig::concurrency`] tasks are in flight, and one per
//!    site (an executor runs its tasks in turn: queueing more would only run down their
//!    timeouts).
//! 3. **Faults**: a task that fails leaves its cell empty with the reason. A site that cannot
//!    be reached, refuses, or does not answer within [`CrossSiteConfig::task_timeout`] is not
//!    asked again: its remaining cells, and its model's row if it never submitted one, are
//!    empty with the reason. The job fails only on a bad configuration.
//! 4. **Selection**: see [`CrossSiteOutcome::ranking`]; the best model is pulled into the
//!    controller's store and returned.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use flare_protocols::BlobRef;
use flare_protocols::ctl::TaskStatus;
use flare_protocols::model::Model;
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::Communicator;
use super::executor::MAX_INPUT_MODEL;
use super::{Task, TaskKind};
use matrix::fill_matrix;

mod matrix;

/// Row name of the global model.
pub const GLOBAL: &str = "global";

/// What a cross-site evaluation measures, and how patiently.
#[derive(Clone, Debug)]
pub struct CrossSiteConfig {
    /// The members: each submits its model (a row) and validates every model (a column).
    pub sites: Vec<PeerId>,
    /// The global model, a blob in the controller's store (one more row, named [`GLOBAL`]).
    pub global: Option<BlobRef>,
    /// The metric that ranks the models (and fills the printed table), e.g. `accuracy`.
    pub metric: String,
    /// Whether a larger value of `metric` is better (`false` for a loss).
    pub higher_is_better: bool,
    /// Most `validate` tasks in flight at once (over all sites).
    pub concurrency: usize,
    /// How long a site may take to answer one task (submit or validate), from when it is sent.
    pub task_timeout: Duration,
}

impl CrossSiteConfig {
    /// Evaluation of `sites`' models (and `global`) by `accuracy`, higher is better, 8 tasks
    /// in flight, 60 s per task.
    pub fn new(sites: Vec<PeerId>, global: Option<BlobRef>) -> Self {
        Self {
            sites,
            global,
            metric: "accuracy".into(),
            higher_is_better: true,
            concurrency: 8,
            task_timeout: Duration::from_secs(60),
        }
    }
}

/// One cell of the matrix: the metrics a site measured for a model, or why there are none.
pub type Cell = Result<BTreeMap<String, f64>, String>;

/// The selected model, now in the controller's store.
#[derive(Clone, Debug)]
pub struct BestModel {
    /// Its row name: a member name or [`GLOBAL`].
    pub name: String,
    /// Its mean of the ranking metric (see [`CrossSiteOutcome::ranking`]).
    pub score: f64,
    /// Its blob in the controller's store.
    pub blob: BlobRef,
    /// The model.
    pub model: Model,
}

/// The end of a cross-site evaluation.
#[derive(Clone, Debug)]
pub struct CrossSiteOutcome {
    /// Row names: [`GLOBAL`] first when there is a global model, then the members in
    /// [`CrossSiteConfig::sites`] order.
    pub models: Vec<String>,
    /// Column names: the members in [`CrossSiteConfig::sites`] order.
    pub sites: Vec<String>,
    /// `cells[model][site]`.
    pub cells: Vec<Vec<Cell>>,
    /// The ranking metric.
    pub metric: String,
    /// Whether a larger `metric` is better.
    pub higher_is_better: bool,
    /// The best model, pulled into the controller's store; `None` when no model has a value,
    /// or none of those that do could be pulled.
    pub best: Option<BestModel>,
}

/// Why a cross-site evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum CrossSiteError {
    /// The configuration cannot work.
    #[error("bad cross-site configuration: {0}")]
    Config(String),
}

impl CrossSiteOutcome {
    /// The ranking metric's value in a cell, when it was measured and is a finite number.
    pub fn value(&self, model: usize, site: usize) -> Option<f64> {
        let cell = self.cells.get(model)?.get(site)?.as_ref().ok()?;
        cell.get(&self.metric).copied().filter(|v| v.is_finite())
    }

    /// The cell of the model and site named so.
    pub fn cell(&self, model: &str, site: &str) -> Option<&Cell> {
        let r = self.models.iter().position(|m| m == model)?;
        let c = self.sites.iter().position(|s| s == site)?;
        self.cells.get(r)?.get(c)
    }

    /// A model's mean of the ranking metric over the sites that measured it (missing cells
    /// are left out, not counted as zero); `None` when no site did.
    pub fn mean(&self, model: usize) -> Option<f64> {
        let values: Vec<f64> = (0..self.sites.len()).filter_map(|c| self.value(model, c)).collect();
        (!values.is_empty()).then(|| values.iter().sum::<f64>() / values.len() as f64)
    }

    /// The selection rule, as `(row, mean)` pairs: models ranked by [`Self::mean`] (highest
    /// first, or lowest when `higher_is_better` is false), models without a mean left out,
    /// ties kept in row order (so the global model wins a tie). The best model is the first
    /// of them that could be pulled.
    pub fn ranking(&self) -> Vec<(usize, f64)> {
        let mut ranked: Vec<(usize, f64)> = (0..self.models.len())
            .filter_map(|r| self.mean(r).map(|m| (r, m)))
            .collect();
        ranked.sort_by(|a, b| {
            let order = a.1.total_cmp(&b.1);
            if self.higher_is_better { order.reverse() } else { order }
        });
        ranked
    }
}

/// A model to evaluate: where it lives and who can serve it.
pub(super) struct Row {
    pub(super) name: String,
    /// The model, or why there is none.
    pub(super) blob: Result<BlobRef, String>,
    /// Its owner first, then the sites that pulled it (and so hold it too).
    pub(super) sources: Vec<PeerId>,
}

/// Runs a cross-site evaluation of `cfg.sites`' models and `cfg.global` on every site (see
/// the module doc).
pub async fn run(comm: &Communicator, cfg: &CrossSiteConfig) -> Result<CrossSiteOutcome, CrossSiteError> {
    check(comm, cfg)?;
    let job = comm.job().clone();
    let names: Vec<String> = cfg.sites.iter().map(|p| comm.name_of(p)).collect();
    tracing::info!(job = %job, sites = ?names, global = cfg.global.is_some(), "cross-site evaluation starts");
    // A site that is gone, with why: it is not asked again.
    let mut down: Vec<Option<String>> = vec![None; cfg.sites.len()];
    let mut rows = Vec::new();
    if let Some(global) = cfg.global {
        rows.push(Row {
            name: GLOBAL.into(),
            blob: Ok(global),
            sources: vec![comm.me()],
        });
    }
    rows.extend(collect_models(comm, cfg, &names, &mut down).await);
    let cells = fill_matrix(comm, cfg, &names, &mut rows, &mut down).await;
    let mut outcome = CrossSiteOutcome {
        models: rows.iter().map(|r| r.name.clone()).collect(),
        sites: names,
        cells,
        metric: cfg.metric.clone(),
        higher_is_better: cfg.higher_is_better,
        best: None,
    };
    for (r, score) in outcome.ranking() {
        let row = &rows[r];
        let Ok(blob) = row.blob else { continue };
        match pull(comm, blob, &row.sources).await {
            Ok(model) => {
                outcome.best = Some(BestModel {
                    name: row.name.clone(),
                    score,
                    blob,
                    model,
                });
                break;
            }
            Err(why) => {
                tracing::warn!(job = %job, model = %row.name, error = %why, "cannot pull a candidate best model")
            }
        }
    }
    let filled = outcome.cells.iter().flatten().filter(|c| c.is_ok()).count();
    tracing::info!(
        job = %job,
        models = outcome.models.len(),
        sites = outcome.sites.len(),
        filled,
        best = ?outcome.best.as_ref().map(|b| (&b.name, b.score)),
        "cross-site evaluation done"
    );
    Ok(outcome)
}

fn check(comm: &Communicator, cfg: &CrossSiteConfig) -> Result<(), CrossSiteError> {
    let bad = |why: String| Err(CrossSiteError::Config(why));
    if cfg.sites.is_empty() {
        return bad("no sites".into());
    }
    if cfg.sites.iter().collect::<HashSet<_>>().len() != cfg.sites.len() {
        return bad("a site is listed twice".into());
    }
    if cfg.concurrency == 0 {
        return bad("concurrency is 0".into());
    }
    if cfg.task_timeout.is_zero() {
        return bad("the task timeout is 0".into());
    }
    if let Some(g) = cfg.global
        && !comm.holds(&g.id)
    {
        return bad(format!("the global model {} is not in this node's store", g.id));
    }
    Ok(())
}

/// Step 1: every site's model reference, in site order; marks sites that are gone.
async fn collect_models(
    comm: &Communicator,
    cfg: &CrossSiteConfig,
    names: &[String],
    down: &mut [Option<String>],
) -> Vec<Row> {
    let job = comm.job();
    let deadline = Instant::now() + cfg.task_timeout;
    let task = Task {
        transient_output: false,
        input_shares: vec![],
        stream_output: false,
        kind: TaskKind::Submit,
        round: 0,
        input: None,
        input_from: vec![],
        props: BTreeMap::new(),
    };
    let index = |peer: &PeerId| cfg.sites.iter().position(|p| p == peer);
    let mut blobs: Vec<Result<BlobRef, String>> =
        names.iter().map(|n| Err(format!("{n} submitted no model"))).collect();
    let mut pending = comm.broadcast(&task, &cfg.sites).await;
    for (m, why) in std::mem::take(&mut pending.refused) {
        if let Some(i) = index(&m.peer_id) {
            tracing::warn!(job = %job, site = %names[i], reason = %why, "site unavailable");
            down[i] = Some(format!("{} is unavailable: {why}", names[i]));
        }
    }
    while let Some(o) = comm.next_result(&mut pending, deadline).await {
        let Some(i) = index(&o.peer) else { continue };
        blobs[i] = match (o.status, o.output) {
            (TaskStatus::Ok, Some(blob)) => Ok(blob),
            (TaskStatus::Ok, None) => Err(format!("{} submitted no model", names[i])),
            _ => Err(format!("{} has no model: {}", names[i], o.failure())),
        };
    }
    for m in pending.waiting.values() {
        if let Some(i) = index(&m.peer_id) {
            tracing::warn!(job = %job, site = %names[i], "no model within the task timeout");
            down[i] = Some(format!("{} did not answer within {:?}", names[i], cfg.task_timeout));
        }
    }
    blobs
        .into_iter()
        .enumerate()
        .map(|(i, blob)| Row {
            name: names[i].clone(),
            blob: match &down[i] {
                Some(why) => Err(why.clone()),
                None => blob,
            },
            sources: vec![cfg.sites[i]],
        })
        .collect()
}

/// Pulls a model into the local store (a no-op for one already there) and decodes it.
async fn pull(comm: &Communicator, blob: BlobRef, sources: &[PeerId]) -> Result<Model, String> {
    let bytes = comm
        .pull_bytes(blob, sources, MAX_INPUT_MODEL)
        .await
        .map_err(|e| e.to_string())?;
    Model::from_safetensors_vec(bytes).map_err(|e| e.to_string())
}

/// Moved to the learner layer; re-exported so `job::cross_site::KeepLastModel` still works.
pub use crate::learner::KeepLastModel;

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(cells: Vec<Vec<Cell>>, higher: bool) -> CrossSiteOutcome {
        CrossSiteOutcome {
            models: vec![GLOBAL.into(), "a".into(), "b".into()],
            sites: vec!["a".into(), "b".into()],
            cells,
            metric: "accuracy".into(),
            higher_is_better: higher,
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
    fn ranking_ignores_missing_cells_and_keeps_row_order_on_ties() {
        let o = outcome(
            vec![
                vec![acc(0.5), acc(1.0)],
                vec![acc(0.75), Err("b is down".into())],
                vec![acc(1.0), acc(0.25)],
            ],
            true,
        );
        assert_eq!(o.mean(1), Some(0.75));
        // global and a tie at 0.75: the earlier row (global) comes first.
        let ranked: Vec<usize> = o.ranking().into_iter().map(|(r, _)| r).collect();
        assert_eq!(ranked, [0, 1, 2]);
        let o = outcome(
            vec![
                vec![Err("x".into()), Err("y".into())],
                vec![acc(0.5), Ok(BTreeMap::from([("accuracy".to_owned(), f64::NAN)]))],
                vec![acc(0.75), acc(0.5)],
            ],
            true,
        );
        assert_eq!(o.mean(0), None, "a row without values has no mean");
        assert_eq!(o.mean(1), Some(0.5), "a non-finite value counts as missing");
        assert_eq!(o.ranking(), vec![(2, 0.625), (1, 0.5)]);
        let mut low = o.clone();
        low.higher_is_better = false;
        assert_eq!(low.ranking(), vec![(1, 0.5), (2, 0.625)]);
    }
}
