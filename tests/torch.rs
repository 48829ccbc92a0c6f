//! `tch` learners in real jobs (the `torch` feature): FedAvg of libtorch networks on the
//! digits meets the pure-Rust MLP's bar; without the feature, their topologies say what to do.

use crate::cli::{cli, text, topology_file};

#[cfg(not(feature = "torch"))]
#[test]
fn a_tch_topology_without_the_torch_feature_names_the_feature() {
    let out = cli(&["sim", &topology_file("fedavg-digits-tch.toml")]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("learner.kind") && err.contains("--features torch") && err.contains("install-libtorch.sh"),
        "{err}"
    );
}

/// Runs `sim` on `topology` and checks the bar: the global model reaches 90 % test accuracy
/// and beats the mean of the members' local-only models; returns both.
#[cfg(feature = "torch")]
fn fedavg_meets_the_bar(topology: &str, learner: &str) -> (f64, f64) {
    let out = cli(&["sim", topology, "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = crate::cli::summary(&out);
    assert_eq!(s["learner"], learner);
    assert_eq!(s["clients"].as_array().map(Vec::len), Some(4));
    let global = s["global"].as_array().expect("per-round global metrics");
    assert_eq!(global.len(), 20);
    let last = global.last().and_then(|g| g["accuracy"].as_f64()).expect("accuracy");
    let local = s["local_only"]["mean_accuracy"].as_f64().expect("local-only accuracy");
    eprintln!("{learner}: global test accuracy {last:.4}, mean local-only {local:.4}");
    assert!(last >= 0.90, "global accuracy {last}");
    assert!(last > local, "global {last} vs mean local-only {local}");
    (last, local)
}

#[cfg(feature = "torch")]
#[test]
fn fedavg_of_tch_mlps_on_digits_reaches_90_percent_and_beats_local_only() {
    fedavg_meets_the_bar(&topology_file("fedavg-digits-tch.toml"), "tch-mlp");
}

#[cfg(feature = "torch")]
#[test]
fn fedavg_of_tch_cnns_on_digits_reaches_90_percent_and_beats_local_only() {
    let text = std::fs::read_to_string(topology_file("fedavg-digits-tch.toml")).expect("topology");
    let cnn = text
        .replace("kind = \"tch-mlp\"", "kind = \"tch-cnn\"")
        .replace("hidden = [32]\n", "channels = 16\n");
    assert_ne!(cnn, text);
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("fedavg-digits-tch-cnn.toml");
    std::fs::write(&path, cnn).expect("write");
    fedavg_meets_the_bar(path.to_str().expect("utf8"), "tch-cnn");
}

/// The shipped PEFT topology end to end through `sim`, against its full fine-tuning
/// counterpart (5 rounds each): LoRA exchanges only adapter tensors, each hospital sends
/// under a tenth of what full fine-tuning sends, and both start from the same frozen base and
/// beat it.
#[cfg(feature = "torch")]
#[test]
fn the_lora_topology_sends_a_fraction_of_full_fine_tuning_and_beats_its_base() {
    let shipped = std::fs::read_to_string(topology_file("fedavg-digits-tch-lora.toml")).expect("topology");
    let lora = shipped.replace("rounds = 20\n", "rounds = 5\n");
    let full: String = lora
        .replace("finetune = \"lora\"", "finetune = \"full\"")
        .lines()
        .filter(|l| !l.starts_with("lora_"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(lora != shipped && full != lora, "the edits apply");
    let dir = tempfile::tempdir().expect("tmp");
    let run = |name: &str, topology: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, topology).expect("write");
        let out = cli(&["sim", path.to_str().expect("utf8"), "--json"]);
        assert!(out.status.success(), "{}", text(&out.stderr));
        crate::cli::summary(&out)
    };
    let (l, f) = (run("lora.toml", &lora), run("full.toml", &full));
    let tensors = |s: &serde_json::Value| -> Vec<String> {
        s["finetune"]["exchanged_tensors"]
            .as_array()
            .expect("exchanged tensors")
            .iter()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect()
    };
    assert_eq!(l["finetune"]["method"], "lora");
    assert!(tensors(&l).iter().all(|t| t.contains(".lora_")), "{:?}", tensors(&l));
    assert!(tensors(&f).iter().any(|t| t == "fc0.weight"), "{:?}", tensors(&f));
    for h in 1..=4 {
        let name = format!("hospital-{h}");
        let sent = |s: &serde_json::Value| s["bytes_sent_per_member"][&name].as_f64().expect("bytes sent");
        assert!(
            sent(&l) * 10.0 < sent(&f),
            "{name}: LoRA {} vs full {}",
            sent(&l),
            sent(&f)
        );
    }
    let initial = l["initial"]["accuracy"].as_f64().expect("base accuracy");
    assert_eq!(f["initial"]["accuracy"].as_f64(), Some(initial), "the same base");
    for s in [&l, &f] {
        let last = s["global"]
            .as_array()
            .and_then(|g| g.last())
            .and_then(|g| g["accuracy"].as_f64());
        let last = last.expect("accuracy");
        eprintln!("{}: base {initial:.4} -> {last:.4}", s["finetune"]["method"]);
        assert!(last > initial + 0.1, "{}: {initial} -> {last}", s["finetune"]["method"]);
    }
}

/// LoRA fine-tuning in FedAvg over real nodes with disk stores: every blob any member holds
/// afterwards (all that was sent or received) is a model of exactly the adapter tensors, each
/// member sent far less than one full model per round, and the global model beats the frozen
/// base.
#[cfg(feature = "torch")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lora_fedavg_exchanges_only_the_adapters_and_beats_the_frozen_base() {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use flare_actors::job::{Communicator, Evaluator, FedAvgConfig, JobHost, fedavg};
    use flare_actors::learner::digits::DigitsFederation;
    use flare_actors::learner::recipe::DigitsRecipe;
    use flare_actors::learner::torch::{BaseSpec, FineTune, FineTuneSpec, TchArch, TchSpec};
    use flare_actors::{BlobStore, Member, Node};
    use flare_protocols::blob_id::{BlobId, DEFAULT_CHUNK_SIZE};
    use flare_protocols::ctl::JobId;
    use flare_protocols::model::Model;

    use crate::util::{start_nodes, within};

    within(600, async {
        let full = TchSpec {
            arch: TchArch::Mlp { hidden: vec![256, 256] },
            lr: 0.1,
            batch_size: 32,
            epochs: 2,
            seed: 1,
            finetune: Some(FineTuneSpec {
                method: FineTune::Full,
                base: BaseSpec::digits_0_to_4(0, 0.2),
            }),
            trainable: None,
        };
        let lora = TchSpec {
            finetune: Some(FineTuneSpec {
                method: FineTune::Lora { rank: 4, alpha: 8.0 },
                base: BaseSpec::digits_0_to_4(0, 0.2),
            }),
            ..full.clone()
        };
        let adapters = lora.trainable_names().expect("names");
        let initial = lora.initial_model().expect("adapters");
        let adapter_bytes = initial.data_bytes();
        let full_bytes = full.initial_model().expect("base").data_bytes();
        let fed = Arc::new(DigitsFederation::deal(3, 0.5, 0.2, 0).expect("deal"));
        let (base_accuracy, _) = lora.evaluate(&initial, &fed.test).expect("evaluate");

        let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().expect("tmp")).collect();
        let stores = dirs.iter().map(|d| BlobStore::open(d.path()).expect("store")).collect();
        let nodes: Vec<Arc<Node>> = start_nodes(stores).await.into_iter().map(Arc::new).collect();
        let members: Vec<Member> = nodes
            .iter()
            .enumerate()
            .map(|(i, n)| n.as_member(&format!("site-{i}")))
            .collect();
        let hosts: Vec<JobHost> = nodes.iter().map(|n| JobHost::start(n.clone()).expect("host")).collect();
        let job = JobId("lora".into());
        for (i, h) in hosts.iter().enumerate().skip(1) {
            let learner = lora.learner(fed.shards[i - 1].clone(), i - 1).expect("learner");
            h.join_as_executor(job.clone(), Some(members[0].peer_id), &members[i].name, learner)
                .await
                .expect("executor");
        }
        let (recipe, test) = (lora.clone(), fed.clone());
        let evaluate: Evaluator = Arc::new(move |m: &Model| {
            let (accuracy, _) = recipe.evaluate(m, &test.test)?;
            Ok(BTreeMap::from([("accuracy".to_owned(), accuracy)]))
        });
        let rounds = 5;
        let cfg = FedAvgConfig {
            rounds,
            min_clients: 3,
            round_timeout: Duration::from_secs(120),
            clients: members[1..].iter().map(|m| m.peer_id).collect(),
            checkpoint_dir: None,
            checkpoint_policy: Default::default(),
            sample: None,
            evaluate: Some(evaluate),
            share_upload: false,
        };
        let comm = Communicator::new(&hosts[0], job, members.clone(), DEFAULT_CHUNK_SIZE, [0; 32]);
        let out = fedavg::run(&comm, &cfg, initial).await.expect("job");

        // What crossed the wire: the controller's models are in its store, adapters only; the
        // clients' results are transient (served from memory, never stored), and the mean
        // folds a result only if its header (tensor names and shapes) is the global's.
        for r in &out.rounds {
            assert_eq!(r.contributors.len(), 3, "round {}: every result folded", r.round);
        }
        let mut blobs = 0;
        for (node, m) in nodes.iter().zip(&members) {
            let dir = node.store().dir().expect("disk store");
            for entry in std::fs::read_dir(dir).expect("blobs") {
                let path = entry.expect("entry").path();
                let Some(hex) = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .and_then(|n| n.strip_suffix(".manifest"))
                else {
                    continue;
                };
                let id = BlobId::from_hex(hex).expect("blob id");
                let model = Model::from_safetensors_vec(node.store().read_all(&id).expect("blob")).expect("a model");
                let names: Vec<&str> = model.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, adapters, "{}: blob {hex}", m.name);
                assert_eq!(model.data_bytes(), adapter_bytes);
                blobs += 1;
            }
        }
        // The final global: the initial model and each earlier global were released once
        // the next was out (the clients pulled them through, storing nothing).
        assert_eq!(blobs, 1, "{blobs} blobs");
        for (node, m) in nodes.iter().zip(&members) {
            let per_round = node.traffic().total() / u64::from(rounds);
            eprintln!(
                "{}: {per_round} B/round; adapters {adapter_bytes} B, full model {full_bytes} B",
                m.name
            );
            assert!(per_round < full_bytes / 2, "{}: {per_round} B per round", m.name);
        }
        assert!(adapter_bytes * 15 < full_bytes, "{adapter_bytes} vs {full_bytes}");
        let last = out
            .rounds
            .last()
            .and_then(|r| r.global.get("accuracy"))
            .copied()
            .expect("accuracy");
        eprintln!("frozen base {base_accuracy:.4}, LoRA FedAvg {last:.4}");
        assert!(last > base_accuracy + 0.15, "base {base_accuracy} -> {last}");
    })
    .await;
}
