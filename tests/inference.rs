//! Federated inference, then FedAvg of a head (`topologies/inference-then-fedavg.toml`), as
//! users run it: `sim` with `--json`, and one `flare-node run` process per member.

use std::time::Instant;

use flare_actors::learner::digits::DigitsFederation;
use flare_protocols::model::Model;

use crate::cli::{cli, summary, text, topology_file};
use crate::util::{Cluster, bytes_sent, job_of, wait_all};

const HOSPITALS: [&str; 4] = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"];

/// FedAvg rounds in the topology.
const ROUNDS: u64 = 20;

#[test]
fn federated_head_on_frozen_embeddings_beats_local_only_and_keeps_the_rows_home() {
    let out = cli(&["sim", &topology_file("inference-then-fedavg.toml"), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["workflow"], "inference-then-fedavg");
    assert_eq!(s["learner"], "mlp-head");
    assert_eq!(s["embedding_dim"], 128);
    let global = s["global"].as_array().expect("per-round global metrics");
    assert_eq!(global.len(), 20);
    let last = global.last().and_then(|g| g["accuracy"].as_f64()).expect("accuracy");
    let local = s["local_only"]["mean_accuracy"].as_f64().expect("local-only accuracy");
    // Measured: 0.955 for the federated head, 0.696 for the mean local-only head.
    assert!(last >= 0.90, "global accuracy {last}");
    assert!(last > local + 0.1, "global {last} vs mean local-only {local}");
    // Every member embedded its whole shard (training and validation rows), and the shards
    // together are the training rows of the dealt data (the topology's [data] table).
    let fed = DigitsFederation::deal(4, 0.5, 0.2, 0).expect("deal");
    let rows = s["embedded_rows_per_member"].as_object().expect("rows per member");
    for (i, name) in HOSPITALS.iter().enumerate() {
        assert_eq!(rows[*name].as_u64(), Some(fed.shards[i].len() as u64), "{name}");
    }
    let total: u64 = rows.values().filter_map(serde_json::Value::as_u64).sum();
    let train_rows: usize = fed.shards.iter().map(|d| d.len()).sum();
    assert_eq!(total, train_rows as u64);
    // Only the frozen network went out; no model came back from the embed task, and the
    // model FedAvg trained is the head, smaller than the frozen network.
    assert_eq!(s["embed_returned_bytes"], 0);
    let frozen = s["frozen_model_bytes"].as_u64().expect("frozen bytes");
    let head = s["model_bytes"].as_u64().expect("head bytes");
    assert!(frozen > 128 * 64 * 4 && head < frozen, "frozen {frozen} head {head}");
}

#[test]
fn inference_then_fedavg_in_one_process_per_member_matches_sim_and_keeps_the_embeddings_home() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut names = vec!["server"];
    names.extend(HOSPITALS);
    let c = Cluster::new(dir.path(), &job_of("inference-then-fedavg.toml"), &names);
    let (s, sim_model) = c.sim();
    let started = Instant::now();
    let logs = wait_all(c.start_all());
    eprintln!("one process per member: {:.1} s", started.elapsed().as_secs_f64());
    let r = c.results("server");
    assert_eq!(r["workflow"], "inference-then-fedavg", "{r}");

    // Not bit for bit: FedAvg folds each head into a running mean as it arrives
    // (`flare_actors::aggregate`), and the arrival order of four heads changes the float
    // rounding, so two runs of `sim` itself end with models a few ulps apart (the same
    // accuracy, a loss equal to eight digits). The same accuracy within half a point and the
    // same weights within rounding, then, and the parts of the job that do not depend on that
    // order, exactly.
    assert_eq!(r["global"].as_array().map(Vec::len), Some(ROUNDS as usize), "{r}");
    let accuracy = |v: &serde_json::Value| v["global"][ROUNDS as usize - 1]["accuracy"].as_f64().expect("accuracy");
    let (run, sim) = (accuracy(&r), accuracy(&s));
    assert!((run - sim).abs() <= 0.005, "run {run} vs sim {sim}");
    assert!(run >= 0.90, "the federated head learned: {run}");
    for key in [
        "embedding_dim",
        "embedded_rows_per_member",
        "frozen_model_bytes",
        "model_bytes",
    ] {
        assert_eq!(r[key], s[key], "{key}: run {r} vs sim {s}");
    }
    assert_eq!(r["embed_returned_bytes"], 0, "{r}");
    // The same head, a few rounding steps apart.
    let head_of = |bytes: &[u8]| Model::from_safetensors(bytes).expect("a model");
    let (run_head, sim_head) = (head_of(&c.model("server")), head_of(&sim_model));
    let mut gap = 0f32;
    for ((name, a), (other, b)) in run_head.iter().zip(sim_head.iter()) {
        assert_eq!((name, a.shape()), (other, b.shape()), "the same layout");
        let (a, b) = (a.to_f32().expect("f32"), b.to_f32().expect("f32"));
        gap = a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(gap, f32::max);
    }
    assert_eq!(run_head.len(), sim_head.len());
    // Measured: at most 4e-7 over three runs.
    assert!(gap <= 1e-4, "run and sim heads differ by {gap}, more than rounding");

    // The embeddings stayed home. Each hospital sent, over the whole job, its 20 heads and
    // some control messages (measured: 11 kB); had its embeddings (rows x 128 f32, 124 to
    // 241 kB) left too, they would come on top. The lower bound shows the counter sees what a
    // member sends.
    let head = r["model_bytes"].as_u64().expect("model bytes");
    let dim = r["embedding_dim"].as_u64().expect("embedding dim");
    for (name, log) in names.iter().zip(&logs).skip(1) {
        let sent = bytes_sent(log);
        let rows = r["embedded_rows_per_member"][name].as_u64().expect("rows");
        let embeddings = rows * dim * 4;
        eprintln!("{name}: sent {sent} B, {ROUNDS} heads of {head} B, embeddings {embeddings} B");
        assert!(sent >= ROUNDS * head, "{name} sent {sent} B, less than its heads");
        assert!(
            sent - ROUNDS * head < embeddings / 4,
            "{name} sent {sent} B: beyond its {ROUNDS} heads of {head} B, more than a quarter of its \
             embeddings ({embeddings} B)"
        );
    }
}
