//! Federated inference, then FedAvg of a head (`topologies/inference-then-fedavg.toml`), as
//! users run it: `sim` with `--json`.

use flare_actors::learner::digits::DigitsFederation;

use crate::cli::{cli, summary, text, topology_file};

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
    for (i, name) in ["hospital-1", "hospital-2", "hospital-3", "hospital-4"]
        .iter()
        .enumerate()
    {
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
