//! Cross-site evaluation's step 2, the per-site scheduler: every (model, site) cell is a
//! `validate` task, at most [`CrossSiteConfig::concurrency`] in flight and one per site (an
//! executor runs its tasks in turn, so queueing more would only run down their timeouts);
//! each model is pulled from its owner or from a site that validated it already; a site that
//! fails to answer is given up with its remaining cells.

use std::collections::{BTreeMap, VecDeque};

use flare_protocols::ctl::{TaskStatus, Value};
use tokio::time::Instant;

use super::{Cell, CrossSiteConfig, Row};
use crate::job::communicator::{Communicator, Pending};
use crate::job::{Task, TaskKind};

/// Step 2: validates every row's model on every site; `cells[row][site]`.
pub(super) async fn fill_matrix(
    comm: &Communicator,
    cfg: &CrossSiteConfig,
    names: &[String],
    rows: &mut [Row],
    down: &mut [Option<String>],
) -> Vec<Vec<Cell>> {
    let job = comm.job().clone();
    let n_sites = cfg.sites.len();
    let mut cells: Vec<Vec<Cell>> = rows
        .iter()
        .map(|_| vec![Err("not evaluated".to_owned()); n_sites])
        .collect();
    // Per site, the rows it still has to validate.
    let mut queues: Vec<VecDeque<usize>> = vec![VecDeque::new(); n_sites];
    for (r, row) in rows.iter().enumerate() {
        for (c, queue) in queues.iter_mut().enumerate() {
            match (&row.blob, &down[c]) {
                (Err(why), _) => cells[r][c] = Err(why.clone()),
                (Ok(_), Some(why)) => cells[r][c] = Err(why.clone()),
                (Ok(_), None) => queue.push_back(r),
            }
        }
    }
    // Task id -> (row, site, deadline).
    let mut in_flight: BTreeMap<u64, (usize, usize, Instant)> = BTreeMap::new();
    let mut busy = vec![false; n_sites];
    let mut pending = Pending::default();
    loop {
        for c in 0..n_sites {
            if in_flight.len() >= cfg.concurrency {
                break;
            }
            if busy[c] || down[c].is_some() {
                continue;
            }
            let Some(r) = queues[c].pop_front() else { continue };
            let Ok(blob) = rows[r].blob else { continue };
            let task = Task {
                transient_output: false,
                input_shares: vec![],
                stream_output: false,
                kind: TaskKind::Validate,
                round: 0,
                input: Some(blob),
                input_from: rows[r].sources.clone(),
                props: BTreeMap::from([("model".to_owned(), Value::Str(rows[r].name.clone()))]),
            };
            let mut sent = comm.broadcast(&task, &[cfg.sites[c]]).await;
            if let Some((_, why)) = sent.refused.pop() {
                let why = format!("{} is unavailable: {why}", names[c]);
                tracing::warn!(job = %job, site = %names[c], reason = %why, "site unavailable");
                cells[r][c] = Err(why.clone());
                give_up_site(&mut cells, &mut queues[c], c, &why);
                down[c] = Some(why);
                continue;
            }
            for (id, m) in sent.waiting.drain() {
                pending.waiting.insert(id, m);
                in_flight.insert(id, (r, c, Instant::now() + cfg.task_timeout));
                busy[c] = true;
            }
        }
        let Some(deadline) = in_flight.values().map(|v| v.2).min() else {
            break;
        };
        match comm.next_result(&mut pending, deadline).await {
            Some(o) => {
                let Some((r, c, _)) = in_flight.remove(&o.task_id) else {
                    continue;
                };
                busy[c] = false;
                cells[r][c] = match o.status {
                    TaskStatus::Ok => {
                        // This site holds the model now: it can serve the sites after it.
                        rows[r].sources.push(cfg.sites[c]);
                        Ok(o.metrics)
                    }
                    _ => Err(format!("{} could not validate it: {}", names[c], o.failure())),
                };
                tracing::debug!(job = %job, model = %rows[r].name, site = %names[c], cell = ?cells[r][c], "cell done");
            }
            None => {
                let now = Instant::now();
                let expired: Vec<u64> = in_flight
                    .iter()
                    .filter(|(_, v)| v.2 <= now)
                    .map(|(id, _)| *id)
                    .collect();
                for id in expired {
                    pending.waiting.remove(&id);
                    let Some((r, c, _)) = in_flight.remove(&id) else {
                        continue;
                    };
                    busy[c] = false;
                    let why = format!("{} did not answer within {:?}", names[c], cfg.task_timeout);
                    tracing::warn!(job = %job, site = %names[c], model = %rows[r].name, "validation timed out");
                    cells[r][c] = Err(why.clone());
                    give_up_site(&mut cells, &mut queues[c], c, &why);
                    down[c] = Some(why);
                }
            }
        }
    }
    cells
}

/// Empties the cells a site still owed, with `why`.
fn give_up_site(cells: &mut [Vec<Cell>], queue: &mut VecDeque<usize>, site: usize, why: &str) {
    for r in queue.drain(..) {
        cells[r][site] = Err(why.to_owned());
    }
}
