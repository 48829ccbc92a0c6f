//! FedAvg over real nodes: exact add-one arithmetic, clients that vanish, too few clients.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use flare_actors::BlobStore;
use flare_actors::blob::FaultPlan;
use flare_actors::job::{
    AddOne, Communicator, FedAvgConfig, FedAvgError, JobHost, Learner, Task, TaskContext, TaskKind, TrainOutput, fedavg,
};
use flare_actors::learner::TensorStream;
use flare_protocols::Manifest;
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{DType, Model, Tensor};

use crate::util::{Federation, memory_stores, start_nodes, within};

/// What add-one makes of `initial` in `rounds` rounds: one added per round, in f32, the way
/// the clients add it (so the comparison can be exact).
fn after_rounds(mut initial: Model, rounds: u32) -> Model {
    for _ in 0..rounds {
        initial.map_f32(|v| v + 1.0);
    }
    initial
}

/// A model of a few f32 tensors with fractional values, spanning several chunks.
fn initial_model() -> Model {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    Model::from_tensors(
        [
            ("layer.0.weight", 300_000),
            ("layer.0.bias", 1000),
            ("layer.1.weight", 400_000),
        ]
        .map(|(name, n)| {
            let v: Vec<f32> = (0..n)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 2_000_001) as f32 / 1000.0 - 1000.0
                })
                .collect();
            (name, Tensor::from_f32(vec![n], &v).expect("tensor"))
        }),
    )
}

/// Node 0 hosts the controller; `site-1`.. are clients with add-one learners of weights
/// 10, 20, 30, ...
async fn federation(clients: usize, job: &str) -> Federation {
    federation_on(job, memory_stores(clients + 1)).await
}

/// [`federation`] with member `i` on `stores[i]` (the controller first).
async fn federation_on(job: &str, stores: Vec<BlobStore>) -> Federation {
    let names = (0..stores.len()).map(|i| format!("site-{i}")).collect();
    let f = Federation::start_with(job, names, stores).await;
    f.join_all(|i| {
        Box::new(AddOne {
            num_samples: 10 * i as u64,
        })
    })
    .await;
    f
}

fn config(f: &Federation, rounds: u32, min_clients: usize, timeout: Duration) -> FedAvgConfig {
    FedAvgConfig {
        rounds,
        min_clients,
        round_timeout: timeout,
        clients: f.clients(),
        checkpoint_dir: None,
        checkpoint_policy: Default::default(),
        sample: None,
        evaluate: None,
        share_upload: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedavg_add_one_with_three_clients_and_five_rounds_is_exact() {
    within(120, async {
        let f = federation(3, "add-one").await;
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = config(&f, 5, 3, Duration::from_secs(60));
        cfg.checkpoint_dir = Some(dir.path().to_owned());
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        assert_eq!(out.rounds.len(), 5);
        for r in &out.rounds {
            assert_eq!(r.contributors, ["site-1", "site-2", "site-3"], "round {}", r.round);
        }
        let expected = after_rounds(initial, 5);
        assert!(out.model == expected, "every weight equals initial + 5, exactly");
        let saved = Model::load(&dir.path().join("global.safetensors")).expect("checkpoint");
        assert!(saved == expected);
        let record = std::fs::read_to_string(dir.path().join("checkpoint.json")).expect("record");
        assert!(record.contains("\"round\": 4"), "{record}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_serving_four_streams_at_once_still_gets_every_client_in_every_round() {
    within(300, async {
        let names = (0..=32).map(|i| format!("site-{i}")).collect();
        let f = Federation::start_limited("busy", names, memory_stores(33), 4).await;
        f.join_all(|i| {
            Box::new(AddOne {
                num_samples: 10 * i as u64,
            })
        })
        .await;
        let cfg = config(&f, 3, 32, Duration::from_secs(240));
        // The 32 pulls of a round's model (3 chunks) start together: most are answered busy.
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        for r in &out.rounds {
            assert_eq!(r.contributors.len(), 32, "round {}: missing {:?}", r.round, r.missing);
        }
        assert!(
            out.model == after_rounds(initial, 3),
            "every weight equals initial + 3, exactly"
        );
        let stats = f.hosts[0].node().serve_stats();
        let busy = stats.busy_streams.load(std::sync::atomic::Ordering::Relaxed);
        assert!(busy > 0, "the stream limit was never reached: the test shows nothing");
        assert_eq!(stats.failed_streams.load(std::sync::atomic::Ordering::Relaxed), 0);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_disk_links_each_checkpoint_to_the_model_its_store_wrote_in_the_background() {
    within(120, async {
        // The controller publishes each round's model before it is on disk, and writes the
        // checkpoint once it is: the checkpoint must be the store's own file, whole.
        let store_dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(store_dir.path()).expect("store");
        let mut stores = vec![store.clone()];
        stores.extend(memory_stores(2));
        let f = federation_on("on-disk", stores).await;
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = config(&f, 3, 2, Duration::from_secs(60));
        cfg.checkpoint_dir = Some(dir.path().to_owned());
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        let expected = after_rounds(initial, 3);
        assert!(out.model == expected, "every weight equals initial + 3, exactly");
        let saved = dir.path().join("global.safetensors");
        assert!(Model::load(&saved).expect("checkpoint") == expected);
        let id = Manifest::of_bytes(expected.as_safetensors(), DEFAULT_CHUNK_SIZE)
            .expect("manifest")
            .id();
        let blob = store.data_path(&id).expect("the final model is on the store's disk");
        use std::os::unix::fs::MetadataExt;
        let (a, b) = (
            std::fs::metadata(&saved).expect("meta"),
            std::fs::metadata(&blob).expect("meta"),
        );
        assert_eq!(
            (a.dev(), a.ino()),
            (b.dev(), b.ino()),
            "the checkpoint is the store's file, linked"
        );
        let record = std::fs::read_to_string(dir.path().join("checkpoint.json")).expect("record");
        assert!(record.contains("\"round\": 2"), "{record}");
    })
    .await;
}

/// Adds `k` to every weight: members that add different amounts return models that differ
/// from the next global model, so every member pulls that model every round.
struct AddK(f32);

impl Learner for AddK {
    fn train(&mut self, mut global: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        global.map_f32(|v| v + self.0);
        Ok(TrainOutput {
            model: global,
            num_samples: 10,
            metrics: Default::default(),
        })
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<std::collections::BTreeMap<String, f64>, String> {
        Ok(Default::default())
    }

    fn streaming(&mut self) -> Option<&mut dyn TensorStream> {
        Some(self)
    }
}

/// The same, a tensor at a time, for models that live on disk.
impl TensorStream for AddK {
    fn tensor(&mut self, _: &str, dtype: DType, data: &mut [u8], _: &TaskContext) -> Result<(), String> {
        if dtype == DType::F32 {
            for b in data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + self.0;
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    fn finish(&mut self, _: &TaskContext) -> Result<(u64, std::collections::BTreeMap<String, f64>), String> {
        Ok((10, Default::default()))
    }

    fn piece_bytes(&self) -> Option<usize> {
        Some(64 << 10)
    }

    fn samples_ahead(&mut self) -> Option<u64> {
        Some(10)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_disk_pull_each_new_model_into_the_memory_of_their_last_result_and_write_nothing() {
    within(120, async {
        // A FedAvg result is transient: once the controller has pulled it, the client pulls
        // the next round's model into that result's buffer: every byte must be the new
        // model's. Integer weights keep the mean of +1 and +3 exact in any order: +2 a round.
        let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().expect("tmp")).collect();
        let stores = dirs.iter().map(|d| BlobStore::open(d.path()).expect("store")).collect();
        let names = (0..3).map(|i| format!("site-{i}")).collect();
        let f = Federation::start_with("reuse", names, stores).await;
        f.join(1, Box::new(AddK(1.0))).await;
        f.join(2, Box::new(AddK(3.0))).await;
        let cfg = config(&f, 4, 2, Duration::from_secs(60));
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let integers = |add: f32| {
            let v: Vec<f32> = (0..700_000).map(|i| (i % 5000) as f32 - 2500.0 + add).collect();
            Model::from_tensors([("w", Tensor::from_f32(vec![700_000], &v).expect("tensor"))])
        };
        let out = fedavg::run(&comm, &cfg, integers(0.0)).await.expect("job");
        assert!(
            out.model == integers(8.0),
            "every weight equals initial + 4 x 2, exactly"
        );
        // Neither the inputs (pulled from the controller, which holds them) nor the results
        // (pulled once by the controller) were written to a client's disk.
        for d in &dirs[1..] {
            let files: Vec<_> = std::fs::read_dir(d.path().join("blobs")).expect("blobs dir").collect();
            assert!(files.is_empty(), "a client wrote {files:?}");
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_that_breaks_off_midway_is_left_out_wholly() {
    within(120, async {
        let f = federation(3, "broken-pull").await;
        // site-3 serves its result with chunk 1 corrupted: the controller folds chunk 0, then
        // the pull fails. Results are not stored, so the round must fold the others again.
        f.hosts[3].node().faults().arm(FaultPlan {
            corrupt_chunk: Some(1),
            ..FaultPlan::default()
        });
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        assert!(
            initial.as_safetensors().len() > 2 * DEFAULT_CHUNK_SIZE as usize,
            "several chunks"
        );
        let out = fedavg::run(&comm, &config(&f, 2, 2, Duration::from_secs(60)), initial.clone())
            .await
            .expect("the rounds complete without site-3");
        for r in &out.rounds {
            assert_eq!(r.contributors, ["site-1", "site-2"], "round {}", r.round);
            assert_eq!(r.missing.len(), 1, "round {}", r.round);
            assert_eq!(r.missing[0].0, "site-3");
            assert!(r.missing[0].1.contains("wrong hash"), "{:?}", r.missing[0]);
        }
        let mut expected = initial;
        expected.map_f32(|v| v + 2.0);
        assert!(out.model == expected, "every weight equals initial + 2, exactly");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_folded_while_their_clients_make_them_are_exact_and_one_that_breaks_off_is_folded_again() {
    // The controller keeps its mean in memory (the default threshold), so it pulls two
    // results at once and streams those two: site-3's is pulled once stored.
    streamed_results(false, 2, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_streamed_into_a_mean_on_disk_all_stream_and_one_that_breaks_off_is_folded_again() {
    // A mean on disk pulls (and streams) up to 8 at once: every result streams.
    streamed_results(true, 3, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_that_trains_too_folds_its_own_result_as_it_is_made() {
    // As a swarm's aggregator does: its own result streams first, from its learner.
    streamed_results(true, 3, true).await;
}

/// Three clients train a model as it arrives (each streams it through disk) and the
/// controller takes the first `streamed` results chunk by chunk as they come out of the
/// learner, its mean on disk or in memory; site-2 breaks off after one chunk a round. With
/// `controller_trains`, site-0 (the controller's node) is a client too and takes its own
/// result from its learner: whole in round 0, breaking off after one chunk in round 1.
async fn streamed_results(mean_on_disk: bool, streamed: usize, controller_trains: bool) {
    within(180, async {
        let dirs: Vec<_> = (0..4).map(|_| tempfile::tempdir().expect("tmp")).collect();
        let stores: Vec<BlobStore> = dirs.iter().map(|d| BlobStore::open(d.path()).expect("store")).collect();
        let members = if mean_on_disk { &stores[..] } else { &stores[1..] };
        for s in members {
            s.set_stream_above(0);
        }
        let names = (0..4).map(|i| format!("site-{i}")).collect();
        let f = Federation::start_with("streamed", names, stores).await;
        // Different results of equal weight: +1, +3, +5 make +3 a round, and a mean missing any
        // part of one of them is wrong there. The mean is a running one, kept in f32: it is
        // exact in any order of arrival only when the mean of every subset of the results is an
        // integer, so four results add 1, 7, 13 and 19 (+10 a round).
        let adds = match controller_trains {
            true => [1.0, 7.0, 13.0, 19.0],
            false => [0.0, 1.0, 3.0, 5.0],
        };
        for (i, &k) in adds.iter().enumerate().skip(usize::from(!controller_trains)) {
            f.join(i, Box::new(AddK(k))).await;
        }
        // site-2 stops streaming after the first chunk of each result: that chunk is in the
        // mean, the rest never comes that way, and the round folds the stored results again.
        f.hosts[2].node().faults().arm(FaultPlan {
            drop_pending_after: Some(1),
            ..FaultPlan::default()
        });
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let integers = |add: f32| {
            let v: Vec<f32> = (0..900_000).map(|i| (i % 5000) as f32 - 2500.0 + add).collect();
            Model::from_tensors([("w", Tensor::from_f32(vec![900_000], &v).expect("tensor"))])
        };
        let chunks = integers(0.0)
            .as_safetensors()
            .len()
            .div_ceil(DEFAULT_CHUNK_SIZE as usize) as u64;
        assert!(chunks > 2, "several chunks");
        let mut cfg = config(&f, 2, 3, Duration::from_secs(90));
        let mut who_all = vec!["site-1", "site-2", "site-3"];
        let mut each_round = 3.0;
        if controller_trains {
            cfg.clients.insert(0, f.members[0].peer_id);
            who_all.insert(0, "site-0");
            each_round = 10.0;
            f.hosts[0].node().faults().arm(FaultPlan {
                drop_pending_after: Some(chunks + 1),
                ..FaultPlan::default()
            });
        }
        let out = fedavg::run(&comm, &cfg, integers(0.0)).await.expect("job");
        for r in &out.rounds {
            let mut who = r.contributors.clone();
            who.sort();
            assert_eq!(who, who_all, "round {}: {:?}", r.round, r.missing);
        }
        assert!(
            out.model == integers(2.0 * each_round),
            "every weight equals initial + 2 rounds x the mean, exactly"
        );
        let mine = f.hosts[0].node().serve_stats();
        assert_eq!(
            mine.pending_chunks_here.load(Ordering::Relaxed),
            if controller_trains { chunks + 1 } else { 0 },
            "site-0's own result taken from its learner: whole in round 0, one chunk in round 1"
        );
        assert_eq!(
            mine.pending_chunks.load(Ordering::Relaxed),
            0,
            "and none over the network"
        );
        for i in 1..4 {
            let chunks_streamed = f.hosts[i].node().serve_stats().pending_chunks.load(Ordering::Relaxed);
            assert_eq!(
                chunks_streamed > 0,
                i <= streamed,
                "site-{i} streamed its results: {chunks_streamed} chunks"
            );
        }
        // site-2's results were pulled once more each, whole, from its store.
        let stats = f.hosts[2].node().serve_stats();
        assert_eq!(
            stats.pending_chunks.load(Ordering::Relaxed),
            2,
            "one chunk streamed a round"
        );
        assert_eq!(
            stats.chunks.load(Ordering::Relaxed),
            2 + 2 * chunks,
            "and each result pulled whole from the store"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_client_is_left_out_when_min_clients_still_holds() {
    within(120, async {
        let f = federation(3, "vanish").await;
        // site-3 leaves the job before the first round: its tasks are refused.
        f.hosts[3].leave(&f.job);
        let cfg = config(&f, 2, 2, Duration::from_secs(30));
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        for r in &out.rounds {
            assert_eq!(r.contributors, ["site-1", "site-2"]);
            assert_eq!(r.missing.len(), 1);
            assert_eq!(r.missing[0].0, "site-3");
        }
        let expected = after_rounds(initial, 2);
        assert!(out.model == expected);
    })
    .await;
}

/// Adds one like [`AddOne`], then spoils the last weight: a client whose training diverged.
struct Diverged;

impl Learner for Diverged {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let mut out = AddOne { num_samples: 30 }.train(global, ctx)?;
        // The data section ends with the last tensor's last element.
        let mut bytes = out.model.into_safetensors();
        let n = bytes.len();
        bytes[n - 4..].copy_from_slice(&f32::NAN.to_le_bytes());
        out.model = Model::from_safetensors_vec(bytes).map_err(|e| e.to_string())?;
        Ok(out)
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<std::collections::BTreeMap<String, f64>, String> {
        Ok(Default::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_holding_a_nan_is_left_out_and_does_not_poison_the_mean() {
    within(120, async {
        let f = Federation::start("nan", "site-0", (1..=3).map(|i| format!("site-{i}"))).await;
        f.join(1, Box::new(AddOne { num_samples: 10 })).await;
        f.join(2, Box::new(AddOne { num_samples: 20 })).await;
        f.join(3, Box::new(Diverged)).await;
        let cfg = config(&f, 2, 2, Duration::from_secs(30));
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        for r in &out.rounds {
            assert_eq!(r.contributors, ["site-1", "site-2"], "round {}", r.round);
            assert_eq!(r.missing.len(), 1, "{:?}", r.missing);
            assert_eq!(r.missing[0].0, "site-3");
            assert!(r.missing[0].1.contains("NaN"), "{}", r.missing[0].1);
        }
        let expected = after_rounds(initial, 2);
        assert!(
            out.model == expected,
            "the mean of the others, exactly: nothing of site-3 in it"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_few_clients_fail_the_job_naming_the_missing_members() {
    within(60, async {
        let f = federation(3, "too-few").await;
        f.hosts[2].leave(&f.job);
        // site-3's node goes away altogether.
        f.hosts[3].node().net().shutdown();
        let cfg = config(&f, 1, 2, Duration::from_secs(3));
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let e = fedavg::run(&comm, &cfg, initial_model()).await.expect_err("too few");
        match &e {
            FedAvgError::TooFewClients { got, need, missing, .. } => {
                assert_eq!((*got, *need), (1, 2));
                let names: Vec<&str> = missing.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["site-2", "site-3"], "{e}");
            }
            other => panic!("unexpected error: {other}"),
        }
        assert!(e.to_string().contains("site-2") && e.to_string().contains("site-3"));
    })
    .await;
}

/// Add-one that tells the test when it starts, then takes a while.
struct SlowAddOne {
    started: std::sync::mpsc::Sender<()>,
}

impl Learner for SlowAddOne {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let _ = self.started.send(());
        std::thread::sleep(Duration::from_millis(500));
        AddOne { num_samples: 5 }.train(global, ctx)
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<std::collections::BTreeMap<String, f64>, String> {
        Ok(Default::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_killed_mid_round_is_left_out_and_the_round_completes() {
    within(120, async {
        let f = federation(2, "killed").await;
        // A third client that is killed while it trains.
        let extra = Arc::new(start_nodes(memory_stores(1)).await.remove(0));
        let extra_member = extra.as_member("site-3");
        for h in &f.hosts {
            h.node().net().add_member(extra_member.clone()).expect("admit");
        }
        for m in &f.members {
            extra.net().add_member(m.clone()).expect("admit");
        }
        let extra_host = JobHost::start(extra.clone()).expect("host");
        let (tx, started) = std::sync::mpsc::channel();
        extra_host
            .join_as_executor(
                f.job.clone(),
                Some(f.members[0].peer_id),
                "site-3",
                Box::new(SlowAddOne { started: tx }),
            )
            .await
            .expect("executor");
        let mut members = f.members.clone();
        members.push(extra_member.clone());
        let mut cfg = config(&f, 1, 2, Duration::from_secs(5));
        cfg.clients.push(extra_member.peer_id);
        let comm = Communicator::new(&f.hosts[0], f.job.clone(), members, DEFAULT_CHUNK_SIZE, [0; 32]);
        let killer = tokio::task::spawn_blocking(move || {
            started
                .recv_timeout(Duration::from_secs(30))
                .expect("site-3 starts training");
            extra.net().shutdown();
        });
        let initial = initial_model();
        let out = fedavg::run(&comm, &cfg, initial.clone())
            .await
            .expect("round completes");
        killer.await.expect("killer");
        assert_eq!(out.rounds[0].contributors, ["site-1", "site-2"]);
        assert_eq!(out.rounds[0].missing.len(), 1);
        assert_eq!(out.rounds[0].missing[0].0, "site-3");
        let expected = after_rounds(initial, 1);
        assert!(out.model == expected);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_executor_ends_its_members_part_and_its_tasks_are_refused() {
    within(60, async {
        let f = Federation::start("stopped", "site-0", ["site-1".to_owned()]).await;
        let actor = f.hosts[1]
            .join_as_executor(
                f.job.clone(),
                Some(f.members[0].peer_id),
                "site-1",
                Box::new(AddOne { num_samples: 1 }),
            )
            .await
            .expect("executor");
        actor.stop(Some("stopped by the test".into()));
        // The supervisor tells whoever waits on the job (`flare-node run` does) at once.
        let end = f.hosts[1].job_ended(&f.job).await.expect("the job ends for site-1");
        assert!(end.failed, "a stopped executor did not finish its job");
        let why = end.reason;
        assert!(
            why.contains("executor stopped") && why.contains("stopped by the test"),
            "{why}"
        );
        let task = Task {
            transient_output: false,
            input_shares: vec![],
            stream_output: false,
            kind: TaskKind::Train,
            round: 0,
            input: None,
            input_from: vec![],
            props: Default::default(),
        };
        let pending = f.comm(DEFAULT_CHUNK_SIZE).broadcast(&task, &f.clients()).await;
        assert_eq!(pending.refused.len(), 1, "the task is refused, not lost");
        assert!(
            pending.refused[0].1.contains("executor stopped"),
            "{:?}",
            pending.refused
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_keep_the_last_k_rounds_and_the_best_and_the_store_keeps_one_model() {
    within(120, async {
        let store_dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(store_dir.path()).expect("store");
        let mut stores = vec![store.clone()];
        stores.extend(memory_stores(2));
        let f = federation_on("keep", stores).await;
        let dir = tempfile::tempdir().expect("tmp");
        let mut cfg = config(&f, 8, 2, Duration::from_secs(60));
        cfg.checkpoint_dir = Some(dir.path().to_owned());
        cfg.checkpoint_policy = flare_actors::job::CheckpointPolicy {
            keep: 2,
            best: Some(flare_actors::job::Best {
                metric: "distance".into(),
                higher_is_better: false,
            }),
        };
        // After round r every weight is initial + r + 1: the distance from initial + 4 is
        // least after round 3.
        let initial = initial_model();
        let first = initial.get("layer.0.bias").expect("tensor").to_f32().expect("f32")[0];
        cfg.evaluate = Some(Arc::new(move |m: &Model| {
            let v = m.get("layer.0.bias").ok_or("no bias")?.to_f32().ok_or("not f32")?[0];
            Ok([("distance".to_owned(), f64::from((v - first - 4.0).abs()))].into())
        }));
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let out = fedavg::run(&comm, &cfg, initial.clone()).await.expect("job");
        assert!(out.model == after_rounds(initial.clone(), 8));
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "best.safetensors",
                "checkpoint.json",
                "global.safetensors",
                "round-000006.safetensors",
                "round-000007.safetensors"
            ]
        );
        let best = Model::load(&dir.path().join("best.safetensors")).expect("best");
        assert!(best == after_rounds(initial, 4), "the best is round 3's model");
        let record = std::fs::read_to_string(dir.path().join("checkpoint.json")).expect("record");
        assert!(
            record.contains("\"round\": 3") && record.contains("\"metric\": \"distance\""),
            "{record}"
        );
        // Between rounds the controller's store holds the newest model only.
        let blobs = std::fs::read_dir(store_dir.path().join("blobs"))
            .expect("blobs")
            .filter(|e| {
                e.as_ref()
                    .is_ok_and(|e| e.path().extension().is_some_and(|x| x == "data"))
            })
            .count();
        assert_eq!(blobs, 1, "the store keeps one model, not one per round");
    })
    .await;
}
