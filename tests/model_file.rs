//! The initial model from a file (`[model] file`) or from a member's script (`[model] from`):
//! it is the global model FedAvg, swarm and cyclic start from, the add-one arithmetic holds
//! from it, and a result whose tensors do not fit it is left out of its round, naming the
//! member, the tensor and both shapes, while the round goes on with the others.

use std::path::Path;
use std::time::Duration;

use flare_actors::job::{AddOne, FedAvgConfig, Learner, TaskContext, TrainOutput, fedavg};
use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
use flare_protocols::model::{Model, Tensor};

use crate::cli::{cli, summary, text};
use crate::util::{Federation, within};

/// Two f32 tensors of different shapes, with fractional values (so exactness means
/// something).
fn init() -> Model {
    let w: Vec<f32> = (0..6).map(|i| i as f32 * 0.37 - 1.1).collect();
    Model::from_tensors([
        ("w", Tensor::from_f32(vec![2, 3], &w).expect("w")),
        ("b", Tensor::from_f32(vec![3], &[0.25, -3.5, 1000.125]).expect("b")),
    ])
}

/// `init()` after `rounds` add-one rounds, added in f32 one round at a time.
fn after(rounds: u32) -> Model {
    let mut m = init();
    for _ in 0..rounds {
        m.map_f32(|v| v + 1.0);
    }
    m
}

const MEMBERS: &str = "[[member]]\nname = \"server\"\n[[member]]\nname = \"a\"\n[[member]]\nname = \"b\"\n";

/// `workflow`'s add-one job of 3 rounds from `init.safetensors`, with `extra` members.
fn topology(workflow: &str, extra: &str) -> String {
    let (controller, table) = match workflow {
        "fedavg" => ("controller = \"server\"\n", "[fedavg]\nrounds = 3\nmin_clients = 2\n"),
        "swarm" => ("", "[swarm]\nrounds = 3\nmin_clients = 2\n"),
        _ => ("controller = \"server\"\n", "[cyclic]\nrounds = 3\n"),
    };
    format!(
        "[job]\nname = \"from-file-{workflow}\"\nworkflow = \"{workflow}\"\n{controller}\n{table}\n\
         [learner]\nkind = \"add-one\"\n\n[model]\nfile = \"init.safetensors\"\n\n{MEMBERS}{extra}"
    )
}

/// Runs `sim` on `text` in `dir` (beside `init.safetensors`): the summary and `results.json`.
pub(crate) fn sim(dir: &Path, text_: &str) -> (serde_json::Value, serde_json::Value) {
    std::fs::write(dir.join("job.toml"), text_).expect("write");
    let out_dir = dir.join("out");
    let out = cli(&[
        "sim",
        dir.join("job.toml").to_str().expect("utf8"),
        "--json",
        "--out",
        out_dir.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let results = std::fs::read(out_dir.join("results.json")).expect("results.json");
    (summary(&out), serde_json::from_slice(&results).expect("json"))
}

#[test]
fn a_model_file_starts_fedavg_swarm_and_cyclic_and_add_one_stays_exact() {
    for workflow in ["fedavg", "swarm", "cyclic"] {
        let dir = tempfile::tempdir().expect("tmp");
        init().save(&dir.path().join("init.safetensors")).expect("save");
        let (s, _) = sim(dir.path(), &topology(workflow, ""));
        assert_eq!(s["verified"], serde_json::Value::Bool(true), "{workflow}: {s}");
        let steps = s["add_one_steps"].as_u64().expect("steps") as u32;
        let global = Model::load(&dir.path().join("out/global.safetensors")).expect("global");
        assert!(
            global == after(steps),
            "{workflow}: every weight is the file's + {steps}"
        );
        assert!(steps >= 3, "{workflow}: {steps} steps");
    }
}

/// A Client API script that adds one, then sends `w` transposed.
const TRANSPOSES: &str = r#"
import flare_client as flare
from flare_client.tensors import Tensor

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={}))
        continue
    params = {name: t + 1.0 for name, t in model.params.items()}
    w = params["w"]
    params["w"] = Tensor(list(reversed(w.shape)), w.dtype, w.values)
    flare.send(flare.FLModel(params=params, meta={"num_samples": 1}))
"#;

#[test]
fn a_python_client_sending_a_tensor_of_the_wrong_shape_is_named_and_the_rounds_go_on() {
    if !crate::external::python_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    init().save(&dir.path().join("init.safetensors")).expect("save");
    let script = dir.path().join("transposes.py");
    std::fs::write(&script, TRANSPOSES).expect("script");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let c = format!(
        "[[member]]\nname = \"c\"\ncommand = [\"python3\", {:?}]\nenv = {{ PYTHONPATH = {:?} }}\n",
        script.to_str().expect("utf8"),
        python.to_str().expect("utf8")
    );
    let (s, results) = sim(dir.path(), &topology("fedavg", &c));
    // The other two still make every round, exactly.
    assert_eq!(s["verified"], serde_json::Value::Bool(true), "{s}");
    let rounds = results["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        assert_eq!(r["contributors"], serde_json::json!(["a", "b"]), "{r}");
        let missing = r["missing"].as_array().expect("missing");
        assert_eq!(missing.len(), 1, "{r}");
        let (who, why) = (&missing[0][0], missing[0][1].as_str().expect("why"));
        assert_eq!(who, "c");
        assert!(
            why.contains("\"w\"") && why.contains("[3, 2]") && why.contains("[2, 3]"),
            "{why}"
        );
    }
}

/// Adds one, then hands back `w` reshaped (or, with `extra`, an extra tensor instead): a client
/// that skips the executor's own checks, as a modified one could.
struct Misshapen {
    extra: bool,
}

impl Learner for Misshapen {
    fn train(&mut self, mut global: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        global.map_f32(|v| v + 1.0);
        let mut tensors: Vec<(String, Tensor)> = global
            .iter()
            .map(|(name, t)| {
                let shape = if name == "w" && !self.extra {
                    vec![3, 2]
                } else {
                    t.shape().to_vec()
                };
                (
                    name.clone(),
                    Tensor::new(t.dtype(), shape, t.data().to_vec()).expect("tensor"),
                )
            })
            .collect();
        if self.extra {
            tensors.push((
                "extra.bias".into(),
                Tensor::from_f32(vec![4], &[0.0; 4]).expect("extra"),
            ));
        }
        Ok(TrainOutput {
            model: Model::from_tensors(tensors),
            num_samples: 1,
            metrics: Default::default(),
        })
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<std::collections::BTreeMap<String, f64>, String> {
        Ok(Default::default())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_result_of_another_layout_is_left_out_by_the_controller_naming_tensor_and_shapes() {
    within(120, async {
        let names = ["server", "good-1", "good-2", "reshaped", "extended"].map(String::from);
        let f = Federation::start("misshapen", &names[0], names[1..].iter().cloned()).await;
        f.join_all(|i| -> Box<dyn Learner> {
            match i {
                3 => Box::new(Misshapen { extra: false }),
                4 => Box::new(Misshapen { extra: true }),
                _ => Box::new(AddOne { num_samples: 1 }),
            }
        })
        .await;
        let cfg = FedAvgConfig {
            rounds: 2,
            min_clients: 2,
            round_timeout: Duration::from_secs(60),
            clients: f.clients(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: None,
            share_upload: false,
        };
        let out = fedavg::run(&f.comm(DEFAULT_CHUNK_SIZE), &cfg, init()).await.expect("job");
        assert!(out.model == after(2), "the good clients' rounds, exactly");
        for r in &out.rounds {
            assert_eq!(r.contributors, ["good-1", "good-2"], "round {}", r.round);
            assert_eq!(
                r.missing,
                [
                    (
                        "extended".to_owned(),
                        "its result does not fit the global model: tensor \"extra.bias\" (F32 [4]) is not in the global model"
                            .to_owned()
                    ),
                    (
                        "reshaped".to_owned(),
                        "its result does not fit the global model: tensor \"w\" has shape [3, 2], expected [2, 3]"
                            .to_owned()
                    ),
                ],
                "round {}",
                r.round
            );
        }
    })
    .await;
}

/// A Client API script that adds one; with `INIT` set, it gives that file's tensors as the
/// job's initial model when asked (`[model] from`).
pub(crate) const ADDS_ONE: &str = r#"
import os
import flare_client as flare

init = os.environ.get("INIT")
flare.init(model=(lambda: flare.load_safetensors(init, "raw")) if init else None)
while flare.is_running():
    model = flare.receive()
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={}))
        continue
    flare.send(flare.FLModel(params={n: t + 1.0 for n, t in model.params.items()}, meta={"num_samples": 1}))
"#;

/// `workflow`'s add-one job of 3 rounds whose initial model comes from member `c`, a Python
/// script (`init` names the file it gives, if any) beside two built-in add-one members.
fn from_c(dir: &Path, workflow: &str, init: Option<&Path>) -> String {
    let script = dir.join("adds_one.py");
    std::fs::write(&script, ADDS_ONE).expect("script");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let env = match init {
        Some(p) => format!(", INIT = {:?}", p.to_str().expect("utf8")),
        None => String::new(),
    };
    let c = format!(
        "[[member]]\nname = \"c\"\ncommand = [\"python3\", {:?}]\nenv = {{ PYTHONPATH = {:?}{env} }}\n",
        script.to_str().expect("utf8"),
        python.to_str().expect("utf8")
    );
    topology(workflow, &c).replace("file = \"init.safetensors\"", "from = \"c\"")
}

#[test]
fn a_model_from_a_members_script_starts_fedavg_swarm_and_cyclic_exactly() {
    if !crate::external::python_ok() {
        return;
    }
    for workflow in ["fedavg", "swarm", "cyclic"] {
        let dir = tempfile::tempdir().expect("tmp");
        // The file is the script's, not the job's: the job names no file.
        let init_file = dir.path().join("script-init.safetensors");
        init().save(&init_file).expect("save");
        let text_ = from_c(dir.path(), workflow, Some(&init_file));
        assert!(text_.contains("from = \"c\"") && !text_.contains("file ="), "{text_}");
        let (s, _) = sim(dir.path(), &text_);
        // The runtime never saw the initial model before the job ran: nothing to verify
        // against in the summary; the global model says it all.
        assert!(s.get("verified").is_none(), "{workflow}: {s}");
        let global = Model::load(&dir.path().join("out/global.safetensors")).expect("global");
        let steps = (1..=12)
            .find(|&n| global == after(n))
            .unwrap_or_else(|| panic!("{workflow}: the global model is the script's initial model plus whole rounds"));
        assert!(steps >= 3, "{workflow}: {steps} steps");
    }
}

#[test]
fn a_model_from_a_script_that_registered_none_fails_the_job_saying_what_to_do() {
    if !crate::external::python_ok() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    std::fs::write(dir.path().join("job.toml"), from_c(dir.path(), "fedavg", None)).expect("write");
    let out = cli(&["sim", dir.path().join("job.toml").to_str().expect("utf8"), "--json"]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("c (named by [model] from) could not give the initial model")
            && err.contains("flare.init(model=net)"),
        "{err}"
    );
}

/// Gives a different model each time it is asked for its starting parameters (its count),
/// as a learner that trained in between would.
struct Drifting {
    asked: u32,
}

impl Learner for Drifting {
    fn train(&mut self, global: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        Ok(TrainOutput {
            model: global,
            num_samples: 1,
            metrics: Default::default(),
        })
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<std::collections::BTreeMap<String, f64>, String> {
        Ok(Default::default())
    }

    fn run_task(&mut self, _: Option<Model>, ctx: &TaskContext) -> Result<flare_actors::job::TaskReply, String> {
        assert_eq!(ctx.task, flare_actors::job::TaskKind::InitModel);
        self.asked += 1;
        Ok(flare_actors::job::TaskReply {
            model: Some(Model::from_tensors([(
                "w",
                Tensor::from_f32(vec![1], &[self.asked as f32]).expect("w"),
            )])),
            ..Default::default()
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_asked_for_the_initial_model_twice_gives_its_first_answer_both_times() {
    use flare_actors::job::initial::initial_from;
    within(60, async {
        let f = Federation::start("init-twice", "server", ["giver".to_owned()]).await;
        f.join_all(|_| -> Box<dyn Learner> { Box::new(Drifting { asked: 0 }) })
            .await;
        let comm = f.comm(DEFAULT_CHUNK_SIZE);
        let giver = f.clients()[0];
        let t = Duration::from_secs(20);
        let first = initial_from(&comm, giver, t, t).await.expect("first");
        let second = initial_from(&comm, giver, t, t).await.expect("second");
        let one = Model::from_tensors([("w", Tensor::from_f32(vec![1], &[1.0]).expect("w"))]);
        assert!(first == one && second == one, "the learner's first answer, both times");
    })
    .await;
}
