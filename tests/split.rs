//! Split learning over real nodes: it matches the central network trained in the same run, and
//! what crosses the wire is only ids, activations and gradients (no labels out, no features in).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_actors::job::split::{self, Received, SplitConfig, SplitError};
use flare_actors::job::{Learner, TaskContext, TaskReply, TrainOutput};
use flare_actors::learner::split::{PartyFeatures, SplitDataParty, SplitSpec, VerticalDigits, wire};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::ctl::{TaskKind, Value};
use flare_protocols::model::{DType, Model};

use crate::util::{Federation, within};

/// Member 0 is the label party (it hosts the workflow); `data-0`.. are the data parties,
/// party `p` with `learner(p)`.
async fn split_job(job: &str, parties: usize, learner: impl Fn(usize) -> Box<dyn Learner>) -> Federation {
    let f = Federation::start(job, "label", (0..parties).map(|p| format!("data-{p}"))).await;
    f.join_all(|i| learner(i - 1)).await;
    f
}

/// The job's configuration, with a step timeout that fails a stuck test in time.
fn config(f: &Federation, spec: SplitSpec) -> SplitConfig {
    let mut cfg = SplitConfig::new(spec, f.clients());
    cfg.step_timeout = Duration::from_secs(20);
    cfg
}

fn spec(parties: usize, cut: usize, epochs: u32) -> SplitSpec {
    SplitSpec {
        parties,
        bottom: vec![cut],
        top: vec![],
        lr: 0.1,
        batch_size: 32,
        epochs,
        seed: 11,
    }
}

fn party_learner(spec: &SplitSpec, data: &VerticalDigits) -> impl Fn(usize) -> Box<dyn Learner> {
    let (spec, data) = (spec.clone(), data.clone());
    move |p| Box::new(SplitDataParty::new(&spec, p, data.parties[p].clone()).expect("party")) as Box<dyn Learner>
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_learning_on_two_column_halves_matches_the_central_network() {
    within(120, async {
        let data = Arc::new(VerticalDigits::deal(2, 0.2, 0).expect("deal"));
        let spec = spec(2, 16, 8);
        let f = split_job("split", 2, party_learner(&spec, &data)).await;
        let mut cfg = config(&f, spec);
        cfg.baseline = Some(data.clone());
        let out = split::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, &data.label)
            .await
            .expect("split job");
        let split_acc = out.test_accuracy().expect("epochs");
        let central_acc = out.central_accuracy().expect("baseline");
        eprintln!(
            "split {:?}\ncentral {:?}\nactivations {} B, gradients {} B",
            out.epochs, out.central, out.activation_bytes, out.gradient_bytes
        );
        assert_eq!(out.epochs.len(), 8);
        assert!(split_acc >= 0.85, "split accuracy {split_acc}");
        assert!(
            (split_acc - central_acc).abs() <= 0.02,
            "split {split_acc} vs central {central_acc}"
        );
        // In fact the same: the same f32 code on the same bits, whether or not a wire is between.
        for (s, c) in out.epochs.iter().zip(&out.central) {
            assert_eq!(
                (s.train_loss, s.test_loss),
                (c.train_loss, c.test_loss),
                "epoch {}",
                s.epoch
            );
        }
        assert!(out.epochs[7].test_loss < out.epochs[0].test_loss);
        // Every training sample's activations came once per epoch and each test sample's once,
        // from each party; each training activation got its gradient back.
        let (train, test) = (data.label.train.len() as u64, data.label.test.len() as u64);
        assert_eq!(out.activation_bytes, 8 * 2 * (train + test) * 16 * 4);
        assert_eq!(out.gradient_bytes, 8 * 2 * train * 16 * 4);
        assert_eq!(out.blob_payloads, 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_above_the_inline_limit_go_as_blobs_with_the_same_result() {
    within(120, async {
        let data = Arc::new(VerticalDigits::deal(1, 0.2, 0).expect("deal"));
        let spec = spec(1, 24, 2);
        let mut results = Vec::new();
        for inline_max in [wire::DEFAULT_INLINE_MAX, 0] {
            let f = split_job(&format!("split-inline-{inline_max}"), 1, party_learner(&spec, &data)).await;
            let mut cfg = config(&f, spec.clone());
            cfg.inline_max = inline_max;
            results.push(
                split::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, &data.label)
                    .await
                    .expect("split job"),
            );
        }
        let (inline, blobs) = (&results[0], &results[1]);
        eprintln!("one party, all pixels: {:?}", inline.epochs);
        assert_eq!(inline.blob_payloads, 0);
        // Every activation and gradient matrix went as a blob: 45 batches and 1 test batch
        // forward, 45 backward, per epoch.
        assert_eq!(blobs.blob_payloads, 2 * (45 + 1 + 45));
        for (a, b) in inline.epochs.iter().zip(&blobs.epochs) {
            assert_eq!((a.test_accuracy, a.test_loss), (b.test_accuracy, b.test_loss));
        }
        assert_eq!(inline.top, blobs.top, "the same bits either way");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_job_names_a_data_party_that_is_gone() {
    within(60, async {
        let data = Arc::new(VerticalDigits::deal(2, 0.2, 0).expect("deal"));
        let spec = spec(2, 8, 1);
        let f = split_job("split-gone", 2, party_learner(&spec, &data)).await;
        f.hosts[2].leave(&f.job);
        let e = split::run(&f.comm(DEFAULT_CHUNK_SIZE), &config(&f, spec), &data.label)
            .await
            .expect_err("a party is gone");
        assert!(
            matches!(&e, SplitError::Party { member, step: 0, .. } if member == "data-1"),
            "{e}"
        );
    })
    .await;
}

// ---- what crosses the wire ----

/// A task as a data party received it.
#[derive(Clone, Debug)]
struct Seen {
    party: usize,
    task: TaskKind,
    props: BTreeMap<String, Value>,
    /// The input model's tensors: name, dtype, shape, bytes.
    input: Vec<(String, DType, Vec<usize>, Vec<u8>)>,
}

/// Records every task before its learner runs it.
struct Recording {
    party: usize,
    inner: Box<dyn Learner>,
    log: Arc<Mutex<Vec<Seen>>>,
}

impl Recording {
    fn record(&self, input: Option<&Model>, ctx: &TaskContext) {
        let input = input
            .map(|m| {
                m.iter()
                    .map(|(n, t)| (n.clone(), t.dtype(), t.shape().to_vec(), t.data().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        self.log.lock().expect("log").push(Seen {
            party: self.party,
            task: ctx.task.clone(),
            props: ctx.props.clone(),
            input,
        });
    }
}

impl Learner for Recording {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        self.record(Some(&global), ctx);
        self.inner.train(global, ctx)
    }

    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        self.record(Some(model), ctx);
        self.inner.validate(model, ctx)
    }

    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        self.record(input.as_ref(), ctx);
        self.inner.run_task(input, ctx)
    }
}

/// A dishonest data party: its "activations" are its raw features (its band is as wide as the
/// cut layer, so the shape gives nothing away).
struct Leaky {
    features: PartyFeatures,
}

impl Learner for Leaky {
    fn train(&mut self, _: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        Err("no".into())
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        Err("no".into())
    }

    fn run_task(&mut self, _: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        let mut reply = TaskReply::default();
        if let TaskKind::SplitForward(f) = &ctx.task {
            let x = self.features.rows(&f.rows).ok_or("rows")?;
            reply
                .values
                .insert(wire::ACTIVATIONS.into(), Value::Bytes(wire::f32_bytes(&x)));
        }
        Ok(reply)
    }
}

fn f32_bytes_of(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// The data parties' side: only forward/backward tasks with the expected properties; every
/// gradient is exactly `rows × cut` `f32`; no label of the batch appears anywhere.
fn check_data_side(seen: &[Seen], data: &VerticalDigits, cut: usize) -> Result<(), String> {
    let mut last_rows: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
    for (i, s) in seen.iter().enumerate() {
        // Split steps carry their parameters typed: nothing rides in the free-form properties.
        let keys: Vec<&str> = s.props.keys().map(String::as_str).collect();
        if !keys.is_empty() {
            return Err(format!("task {i}: carries properties {keys:?}"));
        }
        match &s.task {
            TaskKind::SplitForward(f) => {
                if !s.input.is_empty() {
                    return Err(format!("task {i}: forward carries {} tensors", s.input.len()));
                }
                if f.train {
                    last_rows.insert(s.party, f.rows.clone());
                }
            }
            TaskKind::SplitBackward(b) => {
                let rows = last_rows
                    .remove(&s.party)
                    .ok_or(format!("task {i}: backward without forward"))?;
                let expected = rows.len() * cut * 4;
                let g = match (&b.gradient, s.input.as_slice()) {
                    (Some(g), []) => f32_bytes_of(g),
                    (None, [(name, DType::F32, shape, bytes)])
                        if name == wire::GRADIENT && *shape == [rows.len(), cut] =>
                    {
                        bytes.clone()
                    }
                    _ => return Err(format!("task {i}: backward carries {:?}", s.input.len())),
                };
                if g.len() != expected {
                    return Err(format!("task {i}: gradient of {} bytes, expected {expected}", g.len()));
                }
                // No form of the batch's labels is in it.
                let ids: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
                let labels = data.label.labels_of(&ids).ok_or("ids out of range")?;
                let as_u32: Vec<u8> = labels.iter().flat_map(|&l| u32::from(l).to_le_bytes()).collect();
                let as_f32 = f32_bytes_of(&labels.iter().map(|&l| f32::from(l)).collect::<Vec<_>>());
                if [labels.clone(), as_u32, as_f32].iter().any(|l| contains(&g, l)) {
                    return Err(format!("task {i}: the batch's labels are in the gradient"));
                }
            }
            other => return Err(format!("task {i}: unexpected task {other:?}")),
        }
    }
    Ok(())
}

/// The label party's side: every result holds only a `rows × cut` `f32` matrix, and no row of it
/// is a run of raw pixels of that sample (of any party's band).
fn check_label_side(received: &[Received], data: &VerticalDigits, cut: usize) -> Result<(), String> {
    for r in received {
        let rows = r.rows.len();
        let payload: Vec<u8> = match (&r.pulled, r.values.get(wire::ACTIVATIONS), r.values.len()) {
            (None, Some(Value::Bytes(b)), 1) => b.clone(),
            (Some(m), None, 0) => {
                let t = m.get(wire::ACTIVATIONS).ok_or("pulled model without activations")?;
                if m.len() != 1 || t.dtype() != DType::F32 || t.shape() != [rows, cut] {
                    return Err(format!("step {}: pulled {:?} {:?}", r.step, t.dtype(), t.shape()));
                }
                t.data().to_vec()
            }
            _ => return Err(format!("step {}: result values {:?}", r.step, r.values.keys())),
        };
        if payload.len() != rows * cut * 4 {
            return Err(format!(
                "step {}: {} bytes for {rows} rows of {cut}",
                r.step,
                payload.len()
            ));
        }
        let ids: Vec<u32> = r.rows.iter().map(|&i| i as u32).collect();
        for (k, act) in payload.chunks_exact(cut * 4).enumerate() {
            for band in data.parties.iter() {
                let raw = f32_bytes_of(&band.rows(&ids[k..=k]).ok_or("ids out of range")?);
                let windows: Vec<&[u8]> = if raw.len() >= act.len() {
                    raw.chunks_exact(4)
                        .enumerate()
                        .filter_map(|(j, _)| raw.get(j * 4..j * 4 + act.len()))
                        .collect()
                } else {
                    vec![&raw[..]]
                };
                for w in windows {
                    let blank = w.iter().all(|&b| b == 0);
                    if !blank && contains(act, w) {
                        return Err(format!("step {}: row {k} carries raw features of its sample", r.step));
                    }
                }
            }
        }
    }
    Ok(())
}

async fn recorded_run(
    job: &str,
    spec: &SplitSpec,
    data: &Arc<VerticalDigits>,
    inline_max: usize,
    learner: impl Fn(usize) -> Box<dyn Learner>,
) -> (Result<split::SplitOutcome, SplitError>, Vec<Seen>, Vec<Received>) {
    let log: Arc<Mutex<Vec<Seen>>> = Arc::default();
    let l2 = log.clone();
    let f = split_job(job, spec.parties, move |p| {
        Box::new(Recording {
            party: p,
            inner: learner(p),
            log: l2.clone(),
        }) as Box<dyn Learner>
    })
    .await;
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let r2 = received.clone();
    let mut cfg = config(&f, spec.clone());
    cfg.inline_max = inline_max;
    cfg.audit = Some(Arc::new(move |r: &Received| r2.lock().expect("log").push(r.clone())));
    let out = split::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, &data.label).await;
    let seen = log.lock().expect("log").clone();
    let received = received.lock().expect("log").clone();
    (out, seen, received)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_label_reaches_a_data_party_and_no_feature_reaches_the_label_party() {
    within(120, async {
        let data = Arc::new(VerticalDigits::deal(2, 0.2, 0).expect("deal"));
        // The cut is as wide as a band (32 pixels), so shapes alone could not tell features
        // from activations; inline and blob payloads both.
        let spec = spec(2, 32, 1);
        for inline_max in [wire::DEFAULT_INLINE_MAX, 0] {
            let (out, seen, received) = recorded_run(
                &format!("private-{inline_max}"),
                &spec,
                &data,
                inline_max,
                party_learner(&spec, &data),
            )
            .await;
            let out = out.expect("split job");
            assert!(out.test_accuracy().expect("epoch") > 0.5);
            // 45 training batches and 1 test batch of forwards, 45 backwards, on both parties.
            assert_eq!(seen.len(), 2 * (45 + 1 + 45));
            assert_eq!(received.len(), 2 * (45 + 1));
            check_data_side(&seen, &data, 32).expect("data parties saw no labels");
            check_label_side(&received, &data, 32).expect("the label party saw no features");

            // The checks can fail: a gradient swapped for the batch's labels, a property
            // that names labels, and raw features in place of activations are all caught.
            let at = seen
                .iter()
                .position(|s| matches!(s.task, TaskKind::SplitBackward(_)))
                .expect("a backward");
            let rows = match seen[..at].iter().rev().find_map(|s| match &s.task {
                TaskKind::SplitForward(f) => Some(f.rows.clone()),
                _ => None,
            }) {
                Some(rows) => rows,
                None => panic!("no rows"),
            };
            let ids: Vec<usize> = rows.iter().map(|&r| r as usize).collect();
            let labels = data.label.labels_of(&ids).expect("labels");
            let mut tampered = seen.clone();
            tampered[at].props.insert("y".into(), Value::Bytes(labels.clone()));
            assert!(check_data_side(&tampered, &data, 32).is_err());
            let mut tampered = seen.clone();
            tampered[at].props.insert("labels".into(), Value::Int(0));
            assert!(check_data_side(&tampered, &data, 32).is_err());
            let mut tampered = received.clone();
            let raw = data.parties[1].rows(&rows).expect("rows");
            tampered[0].values = BTreeMap::from([(wire::ACTIVATIONS.into(), Value::Bytes(f32_bytes_of(&raw)))]);
            tampered[0].pulled = None;
            tampered[0].rows = ids;
            assert!(check_label_side(&tampered, &data, 32).is_err());
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_party_that_sends_its_raw_features_is_caught_on_the_wire() {
    within(120, async {
        let data = Arc::new(VerticalDigits::deal(2, 0.2, 0).expect("deal"));
        let spec = spec(2, 32, 1);
        let honest = party_learner(&spec, &data);
        let d2 = data.clone();
        let (out, seen, received) = recorded_run("leaky", &spec, &data, wire::DEFAULT_INLINE_MAX, move |p| {
            if p == 1 {
                Box::new(Leaky {
                    features: d2.parties[1].clone(),
                })
            } else {
                honest(p)
            }
        })
        .await;
        // The leak has the right shape, so the job itself runs through.
        out.expect("split job");
        check_data_side(&seen, &data, 32).expect("data side is clean");
        let e = check_label_side(&received, &data, 32).expect_err("the leak is caught");
        assert!(e.contains("raw features"), "{e}");
    })
    .await;
}
