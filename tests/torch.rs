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
