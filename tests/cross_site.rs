//! Cross-site evaluation over real nodes: the matrix has one row per model and one column per
//! site, add-one values are exact, the best model is the one with the best mean, and a site
//! that is down leaves empty cells that name it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flare_actors::job::cross_site::{self, CrossSiteConfig, GLOBAL};
use flare_actors::job::{
    AddOne, Communicator, FedAvgConfig, KeepLastModel, Learner, Task, TaskContext, TaskKind, TrainOutput, fedavg,
};
use flare_actors::learner::digits::{DigitsFederation, DigitsLearner, MlpSpec, model_of};
use flare_node::render::CrossSiteReport;
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};

use crate::util::{Federation, within};

/// Small chunks for what the controller publishes, so the global model spans many.
const CHUNK: u32 = 64 * 1024;

/// Member 0 hosts the controller; member `i` (1..) is `site-i` with `learner(i)`.
async fn federation(sites: usize, job: &str, learner: impl Fn(usize) -> Box<dyn Learner>) -> Federation {
    let f = Federation::start(job, "controller", (1..=sites).map(|i| format!("site-{i}"))).await;
    f.join_all(learner).await;
    f
}

/// Add-one learners of weight 10 x i that keep their last trained model.
fn add_one(i: usize) -> Box<dyn Learner> {
    Box::new(KeepLastModel::new(AddOne {
        num_samples: 10 * i as u64,
    }))
}

/// Every weight `v`: 3 tensors, 400 000 values in all (members store it in 2 chunks).
fn constant(v: f32) -> Model {
    Model::from_tensors(
        [("a.weight", 300_000), ("a.bias", 1000), ("b.weight", 99_000)]
            .map(|(name, n)| (name, Tensor::from_f32(vec![n], &vec![v; n]).expect("tensor"))),
    )
}

/// Trains site `i` once from a model of all `10 x i`: its local model is all `10 x i + 1`.
async fn train_add_one(comm: &Communicator, f: &Federation, sites: &[usize]) {
    for &i in sites {
        let input = comm
            .publish(Arc::new(constant(10.0 * i as f32)))
            .await
            .expect("publish");
        let task = Task {
            transient_output: false,
            input_shares: vec![],
            stream_output: false,
            kind: TaskKind::Train,
            round: 0,
            input: Some(input),
            input_from: vec![],
            props: BTreeMap::new(),
        };
        let o = comm
            .send_and_wait(&task, f.members[i].peer_id, Duration::from_secs(30))
            .await
            .expect("train");
        assert!(o.output.is_some(), "site-{i} trained");
    }
}

fn add_one_config(f: &Federation, global: flare_protocols::BlobRef) -> CrossSiteConfig {
    let mut cfg = CrossSiteConfig::new(f.clients(), Some(global));
    cfg.metric = "mean_weight".into();
    cfg.concurrency = 4;
    cfg.task_timeout = Duration::from_secs(10);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_matrix_has_one_row_per_model_and_one_column_per_site() {
    within(120, async {
        let f = federation(3, "xsite-add-one", add_one).await;
        let comm = f.comm(CHUNK);
        train_add_one(&comm, &f, &[1, 2, 3]).await;
        let global = comm.publish(Arc::new(constant(5.0))).await.expect("publish");
        let mut cfg = add_one_config(&f, global);
        cfg.concurrency = 2;
        let out = cross_site::run(&comm, &cfg).await.expect("cross-site");
        println!("{}", out.table());
        assert_eq!(out.models, [GLOBAL, "site-1", "site-2", "site-3"]);
        assert_eq!(out.sites, ["site-1", "site-2", "site-3"]);
        assert_eq!(out.cells.len(), 4);
        // Model m on site s: m's mean weight, and s's own weight: each site measured the
        // model of the right owner.
        let weights = [5.0, 11.0, 21.0, 31.0];
        for (r, row) in out.cells.iter().enumerate() {
            assert_eq!(row.len(), 3);
            for (c, cell) in row.iter().enumerate() {
                let m = cell.as_ref().expect("every cell filled");
                assert_eq!(m["mean_weight"], weights[r], "{} on {}", out.models[r], out.sites[c]);
                assert_eq!(m["samples"], 10.0 * (c + 1) as f64);
            }
            assert_eq!(out.mean(r), Some(weights[r]));
        }
        let best = out.best.as_ref().expect("a best model");
        assert_eq!((best.name.as_str(), best.score), ("site-3", 31.0));
        assert!(best.model == constant(31.0), "site-3's model, pulled to the controller");
        assert!(comm.node().store().is_complete(&best.blob.id));
        let j = out.to_json();
        assert_eq!(j["best"], "site-3");
        assert_eq!(j["mean_weight"][2], serde_json::json!([21.0, 21.0, 21.0]));
        assert!(out.table().contains("* site-3"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_after_fedavg_on_digits_selects_the_model_with_the_best_mean_accuracy() {
    within(180, async {
        let spec = MlpSpec {
            hidden: vec![32],
            lr: 0.1,
            batch_size: 32,
            epochs: 2,
            seed: 1,
        };
        let fed = Arc::new(DigitsFederation::deal(3, 0.5, 0.2, 0).expect("deal"));
        let (s, d) = (spec.clone(), fed.clone());
        let f = federation(3, "xsite-digits", move |i| {
            Box::new(DigitsLearner::new(s.clone(), d.shards[i - 1].clone(), i - 1).expect("learner"))
        })
        .await;
        // FedAvg averages only results of the global model's chunk size.
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let cfg = FedAvgConfig {
            rounds: 8,
            min_clients: 3,
            round_timeout: Duration::from_secs(60),
            clients: f.clients(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: None,
            share_upload: false,
        };
        let initial = model_of(&spec.build().expect("mlp").params()).expect("model");
        let trained = fedavg::run(&comm, &cfg, initial).await.expect("fedavg");
        let global = comm.publish(Arc::new(trained.model.clone())).await.expect("publish");
        let out = cross_site::run(&comm, &CrossSiteConfig::new(f.clients(), Some(global)))
            .await
            .expect("cross-site");
        println!("{}", out.table());
        assert_eq!(out.models, [GLOBAL, "site-1", "site-2", "site-3"]);
        assert_eq!(out.sites, ["site-1", "site-2", "site-3"]);
        for (r, row) in out.cells.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let m = cell.as_ref().expect("every cell filled");
                assert!((0.0..=1.0).contains(&m["accuracy"]), "{m:?}");
                assert!(m["loss"].is_finite());
                // Each site measures on its own held-out rows.
                let rows = fed.local_data(&spec, c).expect("local data").validation.len();
                assert_eq!(m["rows"], rows as f64, "{} on {}", out.models[r], out.sites[c]);
            }
        }
        let means: Vec<f64> = (0..4).map(|r| out.mean(r).expect("mean")).collect();
        let top = means.iter().copied().fold(f64::MIN, f64::max);
        let best = out.best.as_ref().expect("a best model");
        let at = out.models.iter().position(|m| *m == best.name).expect("best is a row");
        assert_eq!(best.score, top, "the best model has the highest mean: {means:?}");
        assert_eq!(
            means.iter().position(|&m| m == top),
            Some(at),
            "ties go to the earlier row"
        );
        if best.name == GLOBAL {
            assert!(best.model == trained.model);
        }
        assert!(means[0] > 0.8, "the global model learned: {means:?}");
        assert_eq!(out.to_json()["accuracy"].as_array().map(Vec::len), Some(4));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_with_a_site_down_leaves_empty_cells_naming_it_and_fills_the_rest() {
    within(120, async {
        let f = federation(4, "xsite-down", add_one).await;
        let comm = f.comm(CHUNK);
        // site-4 never trains: it has no model of its own, but still validates the others'.
        train_add_one(&comm, &f, &[1, 2, 3]).await;
        // site-3's node goes away.
        f.hosts[3].node().net().shutdown();
        let global = comm.publish(Arc::new(constant(5.0))).await.expect("publish");
        let out = cross_site::run(&comm, &add_one_config(&f, global))
            .await
            .expect("cross-site");
        println!("{}", out.table());
        assert_eq!(out.models, [GLOBAL, "site-1", "site-2", "site-3", "site-4"]);
        assert_eq!(out.sites, ["site-1", "site-2", "site-3", "site-4"]);
        let weights = [5.0, 11.0, 21.0];
        for (r, row) in out.cells.iter().enumerate() {
            for (c, cell) in row.iter().enumerate() {
                let (model, site) = (&out.models[r], &out.sites[c]);
                match (model.as_str(), site.as_str()) {
                    ("site-4", _) => {
                        let why = cell.as_ref().expect_err("site-4 has no model");
                        assert!(why.contains("site-4") && why.contains("no model"), "{why}");
                    }
                    ("site-3", _) | (_, "site-3") => {
                        let why = cell.as_ref().expect_err("site-3 is down");
                        assert!(why.contains("site-3"), "{model} on {site}: {why}");
                    }
                    _ => {
                        let m = cell.as_ref().expect("filled");
                        assert_eq!(m["mean_weight"], weights[r], "{model} on {site}");
                    }
                }
            }
        }
        let best = out.best.as_ref().expect("a best model");
        assert_eq!(best.name, "site-2");
        assert!(best.model == constant(21.0));
        let j = out.to_json();
        assert!(j["cells"][3][0]["error"].as_str().is_some_and(|e| e.contains("site-3")));
        assert_eq!(j["mean_weight"][0][2], serde_json::Value::Null);
    })
    .await;
}

/// Add-one whose validation takes longer than the evaluation waits.
struct SlowValidate(AddOne);

impl Learner for SlowValidate {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        self.0.train(global, ctx)
    }

    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        std::thread::sleep(Duration::from_secs(3));
        self.0.validate(model, ctx)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_site_gives_up_on_a_site_that_does_not_answer_in_time() {
    within(120, async {
        let f = federation(3, "xsite-slow", |i| {
            if i == 3 {
                Box::new(KeepLastModel::new(SlowValidate(AddOne { num_samples: 30 })))
            } else {
                add_one(i)
            }
        })
        .await;
        let comm = f.comm(CHUNK);
        train_add_one(&comm, &f, &[1, 2, 3]).await;
        let global = comm.publish(Arc::new(constant(5.0))).await.expect("publish");
        let mut cfg = add_one_config(&f, global);
        cfg.task_timeout = Duration::from_secs(1);
        let out = cross_site::run(&comm, &cfg).await.expect("cross-site");
        println!("{}", out.table());
        for (r, model) in out.models.iter().enumerate() {
            for (c, site) in out.sites.iter().enumerate() {
                let cell = &out.cells[r][c];
                if site == "site-3" {
                    let why = cell.as_ref().expect_err("site-3 is too slow");
                    assert!(
                        why.contains("site-3 did not answer within 1s"),
                        "{model} on {site}: {why}"
                    );
                } else {
                    // site-3's own model still travels from its node and is measured.
                    assert!(cell.is_ok(), "{model} on {site}: {cell:?}");
                }
            }
        }
        assert_eq!(out.best.as_ref().map(|b| b.name.as_str()), Some("site-3"));
    })
    .await;
}
