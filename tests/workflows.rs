//! The workflows beyond a dedicated server, as users run them: `sim` in one process, and one
//! `flare-node run` process per member (every member listed with its loopback address, so
//! any member can reach any other directly).

use std::path::Path;
use std::time::Duration;

use crate::cli::{Running, cli, summary, text, topology_file};
use crate::util::{Cluster, job_of, wait_all};

const FEDAVG_ON_A_CLIENT: &str = "[job]\nname = \"fedavg-on-a-client\"\nworkflow = \"fedavg\"\n\
     controller = \"site-1\"\nclients = [\"site-1\", \"site-2\", \"site-3\"]\n\n\
     [fedavg]\nrounds = 4\nmin_clients = 3\nround_timeout_secs = 60\n\n\
     [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 3\nelements = 300000\nseed = 5\n\n";

#[test]
fn fedavg_with_the_controller_on_a_training_member_equals_a_dedicated_controller() {
    let dir = tempfile::tempdir().expect("tmp");
    let on_client = Cluster::new(dir.path(), FEDAVG_ON_A_CLIENT, &["site-1", "site-2", "site-3"]);
    let (s, sim_model) = on_client.sim();
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["contributors_per_round"], serde_json::json!([3, 3, 3, 3]), "{s}");

    // The same job with a dedicated controller gives the same bits.
    let dedicated_dir = tempfile::tempdir().expect("tmp");
    let job = FEDAVG_ON_A_CLIENT
        .replace("controller = \"site-1\"", "controller = \"server\"")
        .replace("fedavg-on-a-client", "fedavg-dedicated");
    let dedicated = Cluster::new(dedicated_dir.path(), &job, &["server", "site-1", "site-2", "site-3"]);
    let (d, dedicated_model) = dedicated.sim();
    assert_eq!(d["verified"], true);
    assert!(
        sim_model == dedicated_model,
        "controller on a client and on a server: same model"
    );

    // And one process per member gives the same bits again.
    wait_all(on_client.start_all());
    assert!(on_client.model("site-1") == sim_model, "run and sim agree bit for bit");
    assert_eq!(on_client.results("site-1")["verified"], true);
}

const CYCLIC: &str = "[job]\nname = \"cyclic-mp\"\nworkflow = \"cyclic\"\ncontroller = \"coordinator\"\n\n\
     [cyclic]\nrounds = 3\norder = [\"site-3\", \"site-1\", \"site-2\"]\ntask_timeout_secs = 20\n\n\
     [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 3\nelements = 300000\nseed = 6\n\n";

#[test]
fn cyclic_add_one_is_exact_in_sim_and_in_one_process_per_member() {
    let dir = tempfile::tempdir().expect("tmp");
    let c = Cluster::new(dir.path(), CYCLIC, &["coordinator", "site-1", "site-2", "site-3"]);
    let (s, sim_model) = c.sim();
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["add_one_steps"], 9, "3 rounds x 3 members: {s}");
    assert_eq!(
        s["visited_per_round"][0],
        serde_json::json!(["site-3", "site-1", "site-2"])
    );
    // The model goes member to member: the coordinator sends it once and pulls it once, so
    // it sends about one model (the initial one) in the whole job; each site about one per
    // round (to the next site).
    let model_bytes = s["model_bytes"].as_u64().expect("model bytes");
    let per_round = |m: &str| s["bytes_sent_per_member"][m].as_u64().expect("traffic");
    assert!(per_round("coordinator") * 3 < model_bytes * 3 / 2, "{s}");
    for site in ["site-1", "site-2", "site-3"] {
        assert!(
            per_round(site) >= model_bytes && per_round(site) < model_bytes * 3 / 2,
            "{s}"
        );
    }

    wait_all(c.start_all());
    assert!(c.model("coordinator") == sim_model, "run and sim agree bit for bit");
    assert_eq!(c.results("coordinator")["verified"], true);
}

#[test]
fn cyclic_skips_a_member_that_was_killed_and_says_so() {
    let dir = tempfile::tempdir().expect("tmp");
    // site-2 is in the middle of the order, so the model never sits only on it between rounds.
    let job = CYCLIC
        .replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 0.3")
        .replace(
            "[\"site-3\", \"site-1\", \"site-2\"]",
            "[\"site-1\", \"site-2\", \"site-3\"]",
        );
    let c = Cluster::new(dir.path(), &job, &["coordinator", "site-1", "site-2", "site-3"]);
    let mut coordinator = c.start("coordinator");
    let sites: Vec<Running> = ["site-1", "site-2", "site-3"].iter().map(|n| c.start(n)).collect();
    coordinator.wait_for(&["round done", "round=0"]);
    let mut sites = sites.into_iter();
    let (s1, s2, s3) = (sites.next(), sites.next(), sites.next());
    s2.expect("site-2").kill();
    let (ok, log) = coordinator.finish(120);
    assert!(ok, "the job finishes without site-2:\n{log}");
    for s in [s1, s3].into_iter().flatten() {
        assert!(s.wait_exit(60));
    }
    let r = c.results("coordinator");
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["add_one_steps"], 3 + 2 + 2, "{r}");
    for round in [1, 2] {
        let skipped = r["skipped_per_round"][round].to_string();
        assert!(
            skipped.contains("site-2"),
            "round {round} names the skipped member: {r}"
        );
        assert_eq!(
            r["visited_per_round"][round],
            serde_json::json!(["site-1", "site-3"]),
            "{r}"
        );
    }
}

#[test]
fn swarm_sim_fails_over_when_its_aggregator_crashes_and_stays_exact() {
    let out = cli(&["sim", &topology_file("swarm-addone.toml"), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["aggregator_per_round"].as_array().map(Vec::len), Some(5), "{s}");
    // lab-c is round 2's first choice and crashes after sending the tasks: lab-d takes over.
    assert_eq!(
        s["failovers"],
        serde_json::json!([{ "round": 2, "dead": "lab-c", "successor": "lab-d" }])
    );
    assert_eq!(s["aggregator_per_round"][2], "lab-d");
    assert_eq!(
        s["contributors_per_round"][2],
        serde_json::json!(["lab-a", "lab-b", "lab-d"]),
        "{s}"
    );
    let log = text(&out.stderr);
    assert!(
        log.contains("aggregator is gone") && log.contains("dead=lab-c") && log.contains("successor=lab-d"),
        "the failover is logged with both names"
    );
}

#[test]
fn a_swarm_whose_members_share_the_pull_of_each_model_learns_and_ends_in_agreement() {
    // The digits MLP (every member's result differs, so every round's model travels), with
    // the pull of each announced model shared: relays between members, as fetch_shared does.
    let dir = tempfile::tempdir().expect("tmp");
    let original = std::fs::read_to_string(topology_file("swarm-digits.toml")).expect("topology");
    let shared = original
        .replace("rounds = 20", "rounds = 6")
        .replace("crash_aggregator_in_round = 6", "share_upload = true");
    let path = dir.path().join("swarm-shared.toml");
    std::fs::write(&path, shared).expect("write");
    let out = cli(&["sim", path.to_str().expect("utf8"), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["aggregator_per_round"].as_array().map(Vec::len), Some(6), "{s}");
    assert_eq!(s["failovers"], serde_json::json!([]), "{s}");
    let accuracy = s["global"][5]["accuracy"].as_f64().expect("accuracy");
    let local = s["local_only"]["mean_accuracy"].as_f64().expect("local-only");
    assert!(accuracy > local, "the shared swarm beats local-only training: {s}");
}

const SWARM: &str = "[job]\nname = \"swarm-mp\"\nworkflow = \"swarm\"\n\n\
     [swarm]\nrounds = 5\nmin_clients = 2\nround_timeout_secs = 30\n\n\
     [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 3\nelements = 300000\nseed = 8\n\n";

#[test]
fn swarm_add_one_is_exact_in_sim_and_in_one_process_per_member() {
    let dir = tempfile::tempdir().expect("tmp");
    let names = ["lab-a", "lab-b", "lab-c"];
    let c = Cluster::new(dir.path(), SWARM, &names);
    let (s, sim_model) = c.sim();
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(
        s["aggregator_per_round"],
        serde_json::json!(["lab-a", "lab-b", "lab-c", "lab-a", "lab-b"]),
        "the aggregator rotates: {s}"
    );
    wait_all(c.start_all());
    for n in names {
        assert!(c.model(n) == sim_model, "{n}: run and sim agree bit for bit");
        assert_eq!(c.results(n)["verified"], true);
    }
}

#[test]
fn swarm_finishes_exactly_when_its_aggregator_process_is_killed_mid_round() {
    let dir = tempfile::tempdir().expect("tmp");
    let names = ["lab-a", "lab-b", "lab-c", "lab-d"];
    // Training takes a second, so the kill lands while round 2 is under way.
    let job = SWARM.replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 1.0");
    let c = Cluster::new(dir.path(), &job, &names);
    let mut members = c.start_all();
    // Round 2's aggregator is lab-c (the rotation starts at member 2 mod 4).
    let mut lab_c = members.remove(2);
    lab_c.wait_for(&["aggregating this round", "round=2"]);
    lab_c.kill();
    for (m, n) in members.into_iter().zip(["lab-a", "lab-b", "lab-d"]) {
        let (ok, log) = m.finish(120);
        assert!(ok, "{n} finishes:\n{log}");
    }
    // The rule: a round's model is the mean of the results its (last) aggregator collected;
    // results sent to the dead aggregator die with it. For add-one every result is the
    // round's input plus one, so the survivors end exactly at initial + rounds.
    for n in ["lab-a", "lab-b", "lab-d"] {
        let r = c.results(n);
        assert_eq!(r["verified"], true, "{n}: {r}");
        assert_eq!(r["aggregator_per_round"][2], "lab-d", "{n}: {r}");
        assert_eq!(
            r["contributors_per_round"][2],
            serde_json::json!(["lab-a", "lab-b", "lab-d"]),
            "{n}: {r}"
        );
    }
    assert!(c.model("lab-a") == c.model("lab-b") && c.model("lab-b") == c.model("lab-d"));
    let failovers = c.results("lab-a")["failovers"].to_string();
    assert!(
        failovers.contains("lab-c") && failovers.contains("lab-d"),
        "the failover is recorded: {failovers}"
    );
}

#[test]
fn split_learning_in_sim_and_one_process_per_member_matches_the_central_network() {
    let dir = tempfile::tempdir().expect("tmp");
    let job = job_of("split-digits.toml");
    let c = Cluster::new(dir.path(), &job, &["lab", "hospital-left", "hospital-right"]);
    let (s, _) = c.sim();
    let split = s["test_accuracy"].as_f64().expect("split accuracy");
    let central = s["central_accuracy"].as_f64().expect("central accuracy");
    assert!((split - central).abs() <= 0.02, "split {split} vs central {central}");
    assert!(split >= 0.85, "split learning learned: {split}");
    assert!(s["activation_bytes"].as_u64() > Some(0) && s["gradient_bytes"].as_u64() > Some(0));

    wait_all(c.start_all());
    let r = c.results("lab");
    assert_eq!(
        r["test_accuracy"], s["test_accuracy"],
        "run and sim train the same network: {r}"
    );
}

#[test]
fn cross_site_evaluation_has_a_row_per_model_and_a_column_per_site_and_saves_the_best() {
    let dir = tempfile::tempdir().expect("tmp");
    let out = dir.path().join("out");
    let run = cli(&[
        "sim",
        &topology_file("cross-site-digits.toml"),
        "--json",
        "--out",
        out.to_str().expect("utf8"),
    ]);
    assert!(run.status.success(), "{}", text(&run.stderr));
    let s = summary(&run);
    let m = &s["cross_site"];
    let sites = ["hospital-1", "hospital-2", "hospital-3", "hospital-4"];
    assert_eq!(m["sites"], serde_json::json!(sites), "{m}");
    assert_eq!(
        m["models"],
        serde_json::json!(["global", "hospital-1", "hospital-2", "hospital-3", "hospital-4"]),
        "{m}"
    );
    let rows = m["accuracy"].as_array().expect("matrix");
    assert_eq!(rows.len(), 5);
    let mut best = (f64::MIN, String::new());
    for (row, name) in rows.iter().zip(m["models"].as_array().expect("models")) {
        let cells: Vec<f64> = row.as_array().expect("row").iter().filter_map(|v| v.as_f64()).collect();
        assert_eq!(cells.len(), sites.len(), "every cell filled: {m}");
        assert!(cells.iter().all(|a| (0.0..=1.0).contains(a)));
        let mean = cells.iter().sum::<f64>() / cells.len() as f64;
        if mean > best.0 {
            best = (mean, name.as_str().expect("name").to_owned());
        }
    }
    assert_eq!(m["best"], best.1.as_str(), "the best model is the best mean: {m}");
    assert!(out.join("best.safetensors").is_file(), "the best model is saved");
    assert!(
        text(&run.stderr).contains("cross-site accuracy"),
        "the table is printed"
    );
}

/// A relay whose newest model died with its holder goes back to the previous copy, asks the
/// member again, and counts only the training steps behind the model it ends with.
#[tokio::test]
async fn relay_falls_back_when_the_newest_model_died_with_its_holder() {
    use std::sync::Arc;

    use flare_actors::job::{AddOne, Link, Task, TaskKind};
    use flare_protocols::blob_id::DEFAULT_CHUNK_SIZE;
    use flare_protocols::model::{DType, Model};

    use crate::util::{Federation, within};

    let f = Federation::start("relay-fallback", "n0", (1..3).map(|i| format!("n{i}"))).await;
    f.join(1, Box::new(AddOne { num_samples: 1 })).await;
    let (members, n2) = (&f.members, f.hosts[2].node());
    let comm = f.comm(DEFAULT_CHUNK_SIZE);
    let mut model = Model::zeros([("w".to_owned(), DType::F32, vec![1000])]).expect("model");
    model.map_f32(|_| 0.5);
    let start = comm.publish(Arc::new(model.clone())).await.expect("publish");
    // The newest link: a later model, held only by n2, which is now gone.
    model.map_f32(|v| v + 7.0);
    let later = n2
        .store()
        .import_bytes(model.as_safetensors(), DEFAULT_CHUNK_SIZE)
        .expect("import");
    n2.net().shutdown();
    let mut chain = vec![
        Link {
            model: start,
            holder: members[0].peer_id,
            steps: 0,
        },
        Link {
            model: later.blob_ref(),
            holder: members[2].peer_id,
            steps: 7,
        },
    ];
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
    let out = within(
        60,
        comm.relay_and_wait(&task, &[members[1].peer_id], Duration::from_secs(20), &mut chain),
    )
    .await
    .expect("relay");
    assert_eq!(out.lost, ["n2"], "the lost model is reported with its holder");
    assert_eq!(out.visits.len(), 1, "n1 was asked again and trained: {out:?}");
    let newest = *chain.last().expect("a model");
    assert_eq!((newest.holder, newest.steps), (members[1].peer_id, 1));
    let result = comm.pull_model(newest.model, &[newest.holder]).await.expect("pull");
    let t = result.get("w").expect("tensor").to_f32().expect("f32");
    assert!(t.iter().all(|v| *v == 1.5), "trained from the previous copy (0.5 + 1)");
}

/// A shipped topology with its relative `python/...` paths made absolute (tests do not run
/// from the repository root).
fn with_repo_paths(name: &str, dir: &Path) -> String {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let repo = repo.canonicalize().expect("repo root");
    let text = std::fs::read_to_string(topology_file(name))
        .expect("topology")
        .replace("\"python/", &format!("\"{}/python/", repo.display()))
        .replace("\"python\"", &format!("\"{}/python\"", repo.display()));
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write topology");
    path.to_str().expect("utf8").to_owned()
}

#[test]
fn python_learners_take_part_in_fedavg_next_to_rust_learners() {
    if std::process::Command::new("python3").arg("--version").output().is_err() {
        eprintln!("SKIPPED: no python3 on this machine");
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let out = cli(&[
        "sim",
        &with_repo_paths("fedavg-python-addone.toml", dir.path()),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(
        s["contributors_per_round"],
        serde_json::json!([3, 3, 3]),
        "the Python site counted: {s}"
    );

    let out = cli(&[
        "sim",
        &with_repo_paths("fedavg-python-digits.toml", dir.path()),
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    let last = s["global"][7]["accuracy"].as_f64().expect("accuracy");
    let local = s["local_only"]["mean_accuracy"].as_f64().expect("local-only");
    assert!(last >= 0.90 && last > local, "global {last} vs local-only {local}");
    assert_eq!(s["contributors_per_round"][7], 3, "{s}");
}

#[test]
fn a_swarm_member_that_comes_back_picks_up_at_the_current_round() {
    let dir = tempfile::tempdir().expect("tmp");
    let names = ["lab-a", "lab-b", "lab-c"];
    let job = SWARM
        .replace("rounds = 5", "rounds = 8")
        .replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 0.4");
    let c = Cluster::new(dir.path(), &job, &names);
    let mut members = c.start_all();
    let mut lab_b = members.remove(1);
    // lab-b aggregates round 1; it hears of round 2 from lab-c.
    lab_b.wait_for(&["round announced", "round=2"]);
    lab_b.kill();
    // Back on the same data dir a moment later, as after a crash and a restart.
    let mut lab_b = c.start("lab-b");
    lab_b.wait_for(&["picking up where the job stands"]);
    let (ok, log) = lab_b.finish(120);
    assert!(ok, "lab-b finishes after coming back:\n{log}");
    for (m, n) in members.into_iter().zip(["lab-a", "lab-c"]) {
        let (ok, log) = m.finish(120);
        assert!(ok, "{n} finishes:\n{log}");
    }
    let back = c.results("lab-b");
    assert_eq!(back["verified"], true, "{back}");
    assert!(
        c.model("lab-b") == c.model("lab-a"),
        "every member ends with the same model"
    );
    // It saw only the rounds after its return, and trained again in the last ones.
    let seen = back["aggregator_per_round"].as_array().map_or(0, Vec::len);
    assert!(seen < 8, "lab-b missed rounds while away: {back}");
    let full = c.results("lab-a");
    let last = full["contributors_per_round"][7].to_string();
    assert!(last.contains("lab-b"), "lab-b contributes again: {full}");
}
