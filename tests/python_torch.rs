//! Users' own PyTorch models through the Python Client API (issue 18): a CNN that exists only
//! in the sites' script, plain PyTorch and as a LightningModule, starts from the weights one
//! site's script gives (`[model] from`) and beats each site's local-only training on the same
//! rows; an NVIDIA FLARE-style script with only its import changed runs as it is.
//!
//! They need a `python3` with torch and lightning on `PATH` (`scripts/install-libtorch.sh`,
//! then `scripts/install-python-extras.sh`), which CI has where it runs the `torch` feature's
//! tests: they run with that feature.
#![cfg(feature = "torch")]

use std::path::{Path, PathBuf};
use std::process::Command;

use flare_actors::learner::digits::DigitsFederation;

use crate::cli::{text, topology_file};

/// The repository root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `topology` (a shipped file) with its paths made absolute (the tests run from `tests/`)
/// and `rounds` rounds.
fn shipped(name: &str, rounds: u32) -> String {
    let root = root();
    let r = root.to_str().expect("utf8");
    let t = std::fs::read_to_string(topology_file(name)).expect("topology");
    let edited = t
        .replace("\"python/examples/", &format!("\"{r}/python/examples/"))
        .replace("PYTHONPATH = \"python\"", &format!("PYTHONPATH = \"{r}/python\""))
        .replace("rounds = 10\n", &format!("rounds = {rounds}\n"));
    assert!(edited.contains(&format!("{r}/python/examples/")) && edited.contains(&format!("rounds = {rounds}\n")));
    edited
}

/// Writes `rows` as the CSV the example scripts read (64 features, then the label).
fn write_rows(rows: &flare_actors::data::Dataset, path: &Path) {
    let mut csv = String::new();
    for (row, label) in rows.features().chunks(rows.dim()).zip(rows.labels()) {
        for v in row {
            csv.push_str(&format!("{v},"));
        }
        csv.push_str(&format!("{label}\n"));
    }
    std::fs::write(path, csv).expect("write rows");
}

/// The last stdout line of a Python example, as JSON.
fn python_json(args: &[&str], env: &[(&str, &Path)], extra: &[(&str, &str)]) -> serde_json::Value {
    let mut c = Command::new("python3");
    c.args(args).env("PYTHONPATH", root().join("python"));
    for (k, v) in env {
        c.env(k, v);
    }
    for (k, v) in extra {
        c.env(k, v);
    }
    let out = c.output().expect("python3");
    assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
    crate::cli::summary(&out)
}

/// Runs the shipped `topology` (3 sites, `rounds` rounds of 2 epochs), then measures its final
/// global model and each site's local-only training (the same script without the Client API,
/// `rounds` × 2 epochs on the same shard) on the common test rows; returns both.
fn beats_local_only(topology: &str, federated: &str, local: &str, rounds: u32) -> (f64, Vec<f64>) {
    let dir = tempfile::tempdir().expect("tmp");
    let (s, _) = crate::model_file::sim(dir.path(), &shipped(topology, rounds));
    assert_eq!(s["clients"].as_array().map(Vec::len), Some(3), "{s}");

    // The same deal `[data]` made (alpha 0.5, seed 0, a fifth held out).
    let fed = DigitsFederation::deal(3, 0.5, 0.2, 0).expect("deal");
    let test = dir.path().join("test.csv");
    write_rows(&fed.test, &test);
    let examples = root().join("python/examples");
    let script = |name: &str| examples.join(name).to_str().expect("utf8").to_owned();
    let global = dir.path().join("out/global.safetensors");
    let g = python_json(
        &[
            &script(federated),
            "--evaluate",
            global.to_str().expect("utf8"),
            test.to_str().expect("utf8"),
        ],
        &[],
        &[],
    )["accuracy"]
        .as_f64()
        .expect("accuracy");
    let rounds_ = rounds.to_string();
    let locals: Vec<f64> = fed
        .shards
        .iter()
        .enumerate()
        .map(|(i, shard)| {
            let csv = dir.path().join(format!("shard-{i}.csv"));
            write_rows(shard, &csv);
            python_json(
                &[&script(local)],
                &[("DIGITS_CSV", &csv), ("DIGITS_TEST_CSV", &test)],
                &[("DIGITS_EPOCHS", "2"), ("DIGITS_ROUNDS", &rounds_)],
            )["accuracy"]
                .as_f64()
                .expect("local accuracy")
        })
        .collect();
    eprintln!("{topology}: global {g:.4}, local-only {locals:?}");
    (g, locals)
}

#[test]
fn a_pytorch_cnn_defined_only_in_the_script_starts_from_a_site_and_beats_local_only() {
    let (global, locals) = beats_local_only("fedavg-python-cnn.toml", "digits_cnn.py", "digits_cnn_local.py", 8);
    let mean = locals.iter().sum::<f64>() / locals.len() as f64;
    assert!(global > mean, "global {global} vs mean local-only {mean}");
    assert!(global >= 0.85, "global {global}");
}

#[test]
fn a_lightning_module_with_a_patched_trainer_starts_from_a_site_and_beats_local_only() {
    let (global, locals) = beats_local_only(
        "fedavg-python-lightning.toml",
        "digits_lightning.py",
        "digits_lightning_local.py",
        8,
    );
    let mean = locals.iter().sum::<f64>() / locals.len() as f64;
    assert!(global > mean, "global {global} vs mean local-only {mean}");
    assert!(global >= 0.85, "global {global}");
}

/// python/examples/digits_torch.py is written as NVIDIA FLARE's Client API examples are, with
/// only its import changed; it runs as it is, from an initial model written with the
/// documented one-liner from its own network.
#[test]
fn an_nvflare_style_pytorch_script_with_only_its_import_changed_runs_unmodified() {
    let dir = tempfile::tempdir().expect("tmp");
    let examples = root().join("python/examples");
    let script = examples.join("digits_torch.py");
    let source = std::fs::read_to_string(&script).expect("script");
    assert!(source.contains("import flare_client as flare  # was: import nvflare.client as flare"));
    let init = dir.path().join("init.safetensors");
    // The documented one-liner, with the script's own network.
    let write = format!(
        "import flare_client; from digits_torch import Net; flare_client.save_safetensors(Net().state_dict(), {:?})",
        init.to_str().expect("utf8")
    );
    let out = Command::new("python3")
        .args(["-c", &write])
        .env(
            "PYTHONPATH",
            format!("{}:{}", root().join("python").display(), examples.display()),
        )
        .output()
        .expect("python3");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let topology = shipped("fedavg-python-cnn.toml", 3)
        .replace("digits_cnn.py", "digits_torch.py")
        .replace("from = \"hospital-1\"", "file = \"init.safetensors\"");
    let (_, results) = crate::model_file::sim(dir.path(), &topology);
    let rounds = results["rounds"].as_array().expect("rounds");
    assert_eq!(rounds.len(), 3);
    for r in rounds {
        assert_eq!(r["contributors"].as_array().map(Vec::len), Some(3), "{r}");
    }
}
