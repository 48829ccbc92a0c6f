//! External-process learners over the Client API: a Python script using `flare_client` takes
//! part in FedAvg next to Rust learners, and a script that crashes, hangs or speaks garbage
//! fails only its own task, with an error that says which.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use flare_actors::job::{AddOne, FedAvgConfig, FedAvgOutcome, Learner, fedavg};
use flare_actors::learner::digits::{self, DigitsFederation, DigitsLearner, MlpSpec, model_of};
use flare_actors::learner::external::{ExternalConfig, ExternalLearner};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};

use crate::util::{Federation, within};

/// The Python package and examples.
pub(crate) fn python_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../python")
}

/// Whether python3 runs here; the tests are skipped (loudly) where it does not.
pub(crate) fn python_ok() -> bool {
    let ok = std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED: python3 is not available");
    }
    ok
}

/// A few f32 tensors with fractional values (one of them 2-D).
fn initial_model() -> Model {
    let mut x = 0x9e37_79b9_7f4a_7c15_u64;
    let mut values = |n: usize| -> Vec<f32> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x % 2_000_001) as f32 / 1000.0 - 1000.0
            })
            .collect()
    };
    Model::from_tensors([
        ("fc1.weight", Tensor::from_f32(vec![40, 25], &values(1000)).expect("t")),
        ("fc1.bias", Tensor::from_f32(vec![40], &values(40)).expect("t")),
        ("fc2.weight", Tensor::from_f32(vec![3000], &values(3000)).expect("t")),
    ])
}

/// Member 0 hosts the controller; sites 1 and 2 run Rust add-one learners; site 3 runs
/// `script` (a file in `dir`, or a path) as an external learner with `timeout` per task.
async fn federation(job: &str, dir: &Path, script: &Path, timeout: Duration) -> Federation {
    let add_one = |i: usize| -> Box<dyn Learner> {
        Box::new(AddOne {
            num_samples: 10 * i as u64,
        })
    };
    federation_with(job, dir, script, timeout, add_one, &[]).await
}

/// The external learner's work dir (its socket, model files, and what test scripts write).
fn work_dir(dir: &Path) -> PathBuf {
    dir.join("site-3")
}

/// Like [`federation`], with other learners on sites 1 and 2 and extra environment for the
/// script.
async fn federation_with(
    job: &str,
    dir: &Path,
    script: &Path,
    timeout: Duration,
    rust: impl Fn(usize) -> Box<dyn Learner>,
    env: &[(&str, String)],
) -> Federation {
    let f = Federation::start(job, "site-0", (1..=3).map(|i| format!("site-{i}"))).await;
    for i in 1..=2 {
        f.join(i, rust(i)).await;
    }
    let mut cfg = ExternalConfig::new(
        vec!["python3".into(), script.to_string_lossy().into_owned()],
        work_dir(dir),
        "site-3",
    );
    cfg.task_timeout = timeout;
    cfg.env
        .insert("PYTHONPATH".into(), python_dir().to_string_lossy().into_owned());
    for (k, v) in env {
        cfg.env.insert((*k).to_owned(), v.clone());
    }
    let learner = ExternalLearner::new(cfg).expect("external learner");
    f.join(3, Box::new(learner)).await;
    f
}

async fn run_fedavg(f: &Federation, rounds: u32, min_clients: usize) -> FedAvgOutcome {
    run_fedavg_from(f, rounds, min_clients, initial_model()).await
}

async fn run_fedavg_from(f: &Federation, rounds: u32, min_clients: usize, initial: Model) -> FedAvgOutcome {
    let cfg = FedAvgConfig {
        rounds,
        min_clients,
        round_timeout: Duration::from_secs(30),
        clients: f.clients(),
        checkpoint_dir: None,
        checkpoint_policy: Default::default(),
        sample: None,
        evaluate: None,
        share_upload: false,
    };
    fedavg::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, initial)
        .await
        .expect("job")
}

fn plus(n: u32) -> Model {
    let mut m = initial_model();
    for _ in 0..n {
        m.map_f32(|v| v + 1.0);
    }
    m
}

/// Writes a test script into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("script");
    p
}

/// Whether process `pid` still exists (Linux).
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_python_learner_joins_fedavg_and_add_one_is_exact() {
    if !python_ok() {
        return;
    }
    within(120, async {
        let dir = tempfile::tempdir().expect("tmp");
        let add_one = python_dir().join("examples/add_one.py");
        let f = federation("ext-add-one", dir.path(), &add_one, Duration::from_secs(30)).await;
        let out = run_fedavg(&f, 3, 3).await;
        for r in &out.rounds {
            assert_eq!(
                r.contributors,
                ["site-1", "site-2", "site-3"],
                "round {}: {:?}",
                r.round,
                r.missing
            );
        }
        assert!(out.model == plus(3), "every weight equals initial + 3, exactly");
        // The script's metric travelled back (weighted by its 7 samples among 10 + 20 + 7).
        let m = out.rounds[2].metrics.get("round").copied().expect("metric");
        assert!((m - 2.0 * 7.0 / 37.0).abs() < 1e-9, "{m}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_learner_crash_fails_its_task_and_the_next_round_starts_a_fresh_process() {
    if !python_ok() {
        return;
    }
    within(120, async {
        let dir = tempfile::tempdir().expect("tmp");
        // Crashes on its first task only; every process it runs as records its pid.
        let crash = script(
            dir.path(),
            "crash_once.py",
            r#"
import os, sys
import flare_client as flare
work = os.environ["FLARE_WORK_DIR"]
with open(os.path.join(work, "pids"), "a") as f:
    f.write("%d\n" % os.getpid())
flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    marker = os.path.join(work, "crashed")
    if not os.path.exists(marker):
        open(marker, "w").close()
        print("boom: simulated crash in round %d" % model.current_round, file=sys.stderr)
        sys.exit(1)
    flare.send(flare.FLModel(params={k: v + 1.0 for k, v in model.params.items()}))
"#,
        );
        let f = federation("ext-crash", dir.path(), &crash, Duration::from_secs(30)).await;
        let out = run_fedavg(&f, 2, 2).await;
        let r0 = &out.rounds[0];
        assert_eq!(r0.contributors, ["site-1", "site-2"]);
        assert_eq!(r0.missing.len(), 1, "{:?}", r0.missing);
        let (who, why) = &r0.missing[0];
        assert_eq!(who, "site-3");
        assert!(
            why.contains("learner process exited with status 1") && why.contains("boom: simulated crash in round 0"),
            "{why}"
        );
        assert_eq!(out.rounds[1].contributors, ["site-1", "site-2", "site-3"]);
        assert!(out.model == plus(2));
        let pids = std::fs::read_to_string(work_dir(dir.path()).join("pids")).expect("pids");
        let pids: Vec<&str> = pids.lines().collect();
        assert_eq!(pids.len(), 2, "a fresh process for the second round: {pids:?}");
        assert_ne!(pids[0], pids[1]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_learner_that_hangs_is_killed_at_the_task_timeout() {
    if !python_ok() {
        return;
    }
    within(60, async {
        let dir = tempfile::tempdir().expect("tmp");
        let hang = script(
            dir.path(),
            "hang.py",
            r#"
import os, time
import flare_client as flare
with open(os.path.join(os.environ["FLARE_WORK_DIR"], "pid"), "w") as f:
    f.write(str(os.getpid()))
flare.init()
flare.receive()
time.sleep(300)
"#,
        );
        let f = federation("ext-hang", dir.path(), &hang, Duration::from_secs(2)).await;
        let started = Instant::now();
        let out = run_fedavg(&f, 1, 2).await;
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(out.rounds[0].contributors, ["site-1", "site-2"]);
        let (who, why) = &out.rounds[0].missing[0];
        assert_eq!(who, "site-3");
        assert!(why.contains("learner process did not answer within 2s"), "{why}");
        assert!(why.contains("killed"), "{why}");
        assert!(
            secs < 20.0,
            "the round ended at the task timeout, not the round timeout ({secs} s)"
        );
        let pid: u32 = std::fs::read_to_string(work_dir(dir.path()).join("pid"))
            .expect("pid")
            .trim()
            .parse()
            .expect("a pid");
        assert!(!alive(pid), "the hung process {pid} was killed");
        assert!(out.model == plus(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_learner_that_speaks_garbage_fails_with_malformed_message() {
    if !python_ok() {
        return;
    }
    within(60, async {
        let dir = tempfile::tempdir().expect("tmp");
        // Connects without the package and writes a well-framed body of junk.
        let garbage = script(
            dir.path(),
            "garbage.py",
            r#"
import os, socket, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(os.environ["FLARE_CLIENT_SOCKET"])
junk = bytes([0xff, 0x13, 0x9c, 0x00, 0xe7, 0x42, 0x5a, 0xc3, 0x01, 0x88, 0xfe, 0x7d, 0x2b, 0x91, 0x06, 0xd4])
s.sendall(len(junk).to_bytes(4, "big") + junk)
time.sleep(300)
"#,
        );
        let f = federation("ext-garbage", dir.path(), &garbage, Duration::from_secs(10)).await;
        let out = run_fedavg(&f, 1, 2).await;
        assert_eq!(out.rounds[0].contributors, ["site-1", "site-2"]);
        let (who, why) = &out.rounds[0].missing[0];
        assert_eq!(who, "site-3");
        assert!(why.contains("malformed message from the learner process"), "{why}");
        assert!(out.model == plus(1));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_python_digits_learner_trains_with_rust_learners_past_the_accuracy_bar() {
    if !python_ok() {
        return;
    }
    within(180, async {
        let dir = tempfile::tempdir().expect("tmp");
        // Softmax regression: the model the pure-Python script trains.
        let spec = MlpSpec {
            hidden: vec![],
            lr: 0.1,
            batch_size: 32,
            epochs: 2,
            seed: 1,
        };
        let fed = Arc::new(DigitsFederation::deal(3, 0.5, 0.2, 0).expect("deal"));
        // Site 3's training rows, as its DigitsLearner would cut them, in a CSV for the script.
        let rows = fed.local_data(&spec, 2).expect("local data").train;
        let mut csv = String::new();
        for i in 0..rows.len() {
            let x = rows.row(i).expect("row");
            for v in x {
                csv.push_str(&format!("{v},"));
            }
            csv.push_str(&format!("{}\n", rows.labels()[i]));
        }
        let data = dir.path().join("site-3.csv");
        std::fs::write(&data, csv).expect("csv");
        let (s, d) = (spec.clone(), fed.clone());
        let rust = move |i: usize| -> Box<dyn Learner> {
            Box::new(DigitsLearner::new(s.clone(), d.shards[i - 1].clone(), i - 1).expect("learner"))
        };
        let script = python_dir().join("examples/digits_mlp.py");
        let env = [("DIGITS_CSV", data.to_string_lossy().into_owned())];
        let f = federation_with("ext-digits", dir.path(), &script, Duration::from_secs(60), rust, &env).await;
        let initial = model_of(&spec.build().expect("mlp").params()).expect("model");
        let started = Instant::now();
        let out = run_fedavg_from(&f, 8, 3, initial).await;
        let secs = started.elapsed().as_secs_f64();
        for r in &out.rounds {
            assert_eq!(
                r.contributors,
                ["site-1", "site-2", "site-3"],
                "round {}: {:?}",
                r.round,
                r.missing
            );
        }
        let (accuracy, loss) = digits::evaluate(&spec, &out.model, &fed.test).expect("evaluate");
        println!("digits with a Python site: test accuracy {accuracy:.3}, loss {loss:.3}, {secs:.1} s for 8 rounds");
        assert!(accuracy > 0.85, "the global model learned: accuracy {accuracy}");
    })
    .await;
}
