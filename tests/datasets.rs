//! Datasets by name: a job says `dataset = "digits"`, and each standing site trains on its own
//! rows registered under that name in its policy; the rows never leave their site.

use std::path::Path;

use flare_node::sample_data::{digits_shards, write_csv};

use crate::cli::{cli, text};
use crate::consortium::{Consortium, stop, swarm_job};

/// Deals the shipped digits to `sites` as `flare-node sample-data` does: the held-out rows
/// as `digits-test.csv` at the first site, and one non-overlapping `digits.csv` per site
/// (every other one with a header line), registered as `[dataset.digits]` in each site's
/// policy.
fn give_each_site_its_rows(dir: &Path, sites: &[&str]) {
    let (shards, test) = digits_shards(sites.len()).expect("shards");
    for (i, (site, shard)) in sites.iter().zip(&shards).enumerate() {
        let at = dir.join(site);
        write_csv(&at.join("digits.csv"), shard, i % 2 == 1).expect("write CSV");
        let mut entry = "\n[dataset.digits]\npath = \"digits.csv\"\n".to_owned();
        if i == 0 {
            write_csv(&at.join("digits-test.csv"), &test, false).expect("write CSV");
            entry.push_str("test = \"digits-test.csv\"\n");
        }
        let policy = at.join("site.toml");
        let text = std::fs::read_to_string(&policy).expect("site.toml") + &entry;
        std::fs::write(policy, text).expect("site.toml");
    }
}

/// A FedAvg job of the pure-Rust MLP on the sites' `dataset`, the first site the controller.
fn digits_job(sites: &[&str], dataset: &str) -> String {
    let names: Vec<String> = sites.iter().map(|n| format!("{n:?}")).collect();
    let mut s = format!(
        "[job]\nname = \"digits-on-sites\"\nworkflow = \"fedavg\"\ncontroller = {:?}\nclients = [{}]\n\n\
         [fedavg]\nrounds = 15\nmin_clients = {}\n\n\
         [learner]\nkind = \"mlp\"\nhidden = [32]\nlr = 0.1\nepochs = 4\nbatch_size = 32\n\n\
         [data]\ndataset = {dataset:?}\n\n",
        sites[0],
        names.join(", "),
        sites.len()
    );
    for n in sites {
        s.push_str(&format!("[[member]]\nname = \"{n}\"\n"));
    }
    s
}

#[test]
fn sites_train_a_named_dataset_on_their_own_rows_beside_a_swarm_job_and_a_site_without_it_refuses() {
    let sites = ["lab-a", "lab-b", "lab-c", "lab-d"];
    let c = Consortium::new(&sites, &["alice"]);
    give_each_site_its_rows(c.dir(), &sites);
    let running = c.serve(&sites);
    let (digits, swarm) = (
        c.job("digits.toml", &digits_job(&sites, "digits")),
        c.job("swarm.toml", &swarm_job(&sites, 10)),
    );
    // A FedAvg digits job and a swarm add-one job, submitted at the same time.
    let (digits, swarm) = std::thread::scope(|s| {
        let a = s.spawn(|| c.submit(&digits, "alice", "lab-a"));
        let b = s.spawn(|| c.submit(&swarm, "alice", "lab-b"));
        (a.join().expect("submit"), b.join().expect("submit"))
    });
    let refused = c.ask(
        "submit",
        &c.job("nope.toml", &digits_job(&sites, "nope")),
        "alice",
        "lab-a",
        &[],
    );
    let err = text(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("lab-a: no dataset \"nope\" here"),
        "{err}"
    );
    c.wait_finished(&digits, "lab-b", "alice", 4);
    c.wait_finished(&swarm, "lab-c", "alice", 4);
    let results = c.results("lab-a", &digits);
    let summary = &results["summary"];
    let global = summary["global"].as_array().expect("global metrics per round");
    assert_eq!(global.len(), 15, "{summary}");
    let last = global.last().and_then(|g| g["accuracy"].as_f64()).expect("accuracy");
    assert!(last >= 0.90, "final global accuracy {last}: {summary}");
    assert_eq!(summary["dataset"], "digits", "{summary}");
    // Without every site's rows the controller has no local-only baseline, and says none.
    assert!(summary.get("local_only").is_none(), "{summary}");
    for s in sites {
        assert_eq!(c.results(s, &swarm)["summary"]["verified"], true, "{s}");
    }
    stop(running);
}

#[test]
fn sim_refuses_a_job_naming_a_dataset_and_says_to_submit_it() {
    let dir = tempfile::tempdir().expect("tmp");
    let job = dir.path().join("named.toml");
    std::fs::write(&job, digits_job(&["lab-a", "lab-b"], "digits")).expect("job");
    let out = cli(&["sim", job.to_str().expect("utf8")]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains(
            "dataset digits is read from each site's policy: submit this job to standing sites (flare-node submit)"
        ),
        "{err}"
    );
}
