//! The `flare-node` CLI as a user meets it: run in a child process (this test binary again,
//! calling the same `main_with_args` as the real binary), with real files and signals.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const ENV: &str = "FLARE_TEST_CLI_ARGS";

/// The child's side: run the CLI with the arguments in the environment.
#[test]
#[ignore = "run by the CLI tests as a child process"]
fn cli_in_child() {
    let Ok(args) = std::env::var(ENV) else {
        return;
    };
    let args = std::iter::once("flare-node".into()).chain(args.split('\u{1f}').map(Into::into));
    let code = flare_node::main_with_args(args);
    // Report the CLI's exit code as the process's own.
    std::process::exit(if code == std::process::ExitCode::SUCCESS { 0 } else { 1 });
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("exe"));
    c.args([
        "--ignored",
        "--exact",
        "cli::cli_in_child",
        "--nocapture",
        "--test-threads=1",
        "-q",
    ])
    .env(ENV, args.join("\u{1f}"))
    .env(
        "RUST_LOG",
        std::env::var("FLARE_TEST_LOG").unwrap_or_else(|_| "info".into()),
    )
    .stdin(Stdio::null());
    c
}

pub(crate) fn cli(args: &[&str]) -> Output {
    command(args).output().expect("run child")
}

pub(crate) fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The peer id printed by `keygen` (libtest may print around it).
pub(crate) fn peer_id_in(out: &Output) -> String {
    text(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("12D3KooW"))
        .unwrap_or_else(|| panic!("no peer id in {:?}", text(&out.stdout)))
        .to_owned()
}

#[test]
fn keygen_prints_the_peer_id_and_refuses_to_overwrite_without_force() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("a.key");
    let k = key.to_str().expect("utf8");
    let first = cli(&["keygen", "--out", k]);
    assert!(first.status.success(), "{}", text(&first.stderr));
    let id = peer_id_in(&first);
    let bytes = std::fs::read(&key).expect("key written");

    let again = cli(&["keygen", "--out", k]);
    assert!(!again.status.success());
    assert!(text(&again.stderr).contains("--force"), "{}", text(&again.stderr));
    assert_eq!(std::fs::read(&key).expect("key"), bytes, "key untouched");

    let forced = cli(&["keygen", "--out", k, "--force"]);
    assert!(forced.status.success());
    assert_ne!(peer_id_in(&forced), id);
}

#[test]
fn run_with_a_bad_members_file_names_file_line_and_field() {
    let dir = tempfile::tempdir().expect("tmp");
    let key = dir.path().join("a.key");
    assert!(cli(&["keygen", "--out", key.to_str().expect("utf8")]).status.success());
    let members = dir.path().join("members.toml");
    std::fs::write(&members, "[[member]]\nname = \"a\"\npeer_id = \"not-a-peer-id\"\n").expect("write");
    let out = cli(&[
        "run",
        "--key",
        key.to_str().expect("utf8"),
        "--members",
        members.to_str().expect("utf8"),
        "--data-dir",
        dir.path().join("data").to_str().expect("utf8"),
    ]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("members.toml") && err.contains("line 3") && err.contains("peer_id"),
        "{err}"
    );
}

/// A running child whose stderr lines are collected.
pub(crate) struct Running {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Running {
    pub(crate) fn start(args: &[&str]) -> Self {
        let mut child = command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        let err = child.stderr.take().expect("stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Self {
            child,
            lines,
            seen: Vec::new(),
        }
    }

    /// Waits (bounded) for a log line containing every one of `words`.
    pub(crate) fn wait_for(&mut self, words: &[&str]) -> String {
        self.wait_for_within(words, 60)
    }

    /// [`Self::wait_for`], waiting at most `secs`.
    pub(crate) fn wait_for_within(&mut self, words: &[&str], secs: u64) -> String {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if words.iter().all(|w| l.contains(w)) {
                        return l;
                    }
                }
                Err(_) => break,
            }
        }
        panic!("no log line with {words:?}; saw:\n{}", self.seen.join("\n"));
    }

    /// Sends SIGINT, as Ctrl-C in its terminal would.
    pub(crate) fn ctrl_c(&self) {
        let pid = self.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .expect("kill")
                .success()
        );
    }

    /// Sends SIGINT (Ctrl-C) and waits (bounded) for a clean exit.
    fn interrupt(mut self) {
        self.ctrl_c();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                assert!(status.success(), "exit after Ctrl-C: {status}");
                break;
            }
            assert!(Instant::now() < deadline, "no exit within 20 s of Ctrl-C");
            std::thread::sleep(Duration::from_millis(50));
        }
        self.wait_for(&["shutting down"]);
    }
}

fn members_file(path: &Path, entries: &[(&str, &str, Option<&str>)]) {
    let mut s = String::new();
    for (name, id, addr) in entries {
        let addrs = addr.map(|a| format!("\"{a}\"")).unwrap_or_default();
        s.push_str(&format!(
            "[[member]]\nname = \"{name}\"\npeer_id = \"{id}\"\naddrs = [{addrs}]\n\n"
        ));
    }
    std::fs::write(path, s).expect("write members");
}

#[test]
fn run_logs_its_address_dials_members_and_stops_cleanly_on_ctrl_c() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    let a = peer_id_in(&cli(&["keygen", "--out", &p("a.key")]));
    let b = peer_id_in(&cli(&["keygen", "--out", &p("b.key")]));
    members_file(&dir.path().join("a.toml"), &[("a", &a, None), ("b", &b, None)]);
    let listen = "/ip4/127.0.0.1/tcp/0";
    let mut node_a = Running::start(&[
        "run",
        "--key",
        &p("a.key"),
        "--members",
        &p("a.toml"),
        "--listen",
        listen,
        "--data-dir",
        &p("a-data"),
    ]);
    let line = node_a.wait_for(&["listening", "/ip4/127.0.0.1/tcp/"]);
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .expect("address in the log line")
        .to_owned();

    // b learns a's address from its members file and dials it.
    members_file(&dir.path().join("b.toml"), &[("a", &a, Some(&addr)), ("b", &b, None)]);
    let mut node_b = Running::start(&[
        "run",
        "--key",
        &p("b.key"),
        "--members",
        &p("b.toml"),
        "--listen",
        listen,
        "--data-dir",
        &p("b-data"),
    ]);
    node_b.wait_for(&["connected", "member=a"]);
    node_a.wait_for(&["connected", "member=b"]);
    node_b.interrupt();
    node_a.wait_for(&["disconnected", "member=b"]);
    node_a.interrupt();
}

impl Running {
    /// Waits (bounded) for the process to exit; returns whether it succeeded.
    /// Kills the process outright (SIGKILL: no chance to say goodbye), and reaps it.
    pub(crate) fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Every log line seen so far, and any waiting.
    pub(crate) fn log(&mut self) -> String {
        while let Ok(l) = self.lines.try_recv() {
            self.seen.push(l);
        }
        self.seen.join("\n")
    }

    /// Like [`Self::wait_exit`], with every log line the process wrote.
    pub(crate) fn finish(mut self, secs: u64) -> (bool, String) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                // Its stderr is at EOF now, or soon: collect the rest.
                while let Ok(l) = self.lines.recv_timeout(Duration::from_secs(2)) {
                    self.seen.push(l);
                }
                return (status.success(), self.seen.join("\n"));
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                return (false, format!("no exit within {secs} s\n{}", self.log()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn wait_exit(mut self, secs: u64) -> bool {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                while let Ok(l) = self.lines.try_recv() {
                    self.seen.push(l);
                }
                panic!("no exit within {secs} s; saw:\n{}", self.seen.join("\n"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

const ADD_ONE_JOB: &str = "[job]\nname = \"mp-addone\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
     [fedavg]\nrounds = 5\nmin_clients = 3\nround_timeout_secs = 60\n\n\
     [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 3\nelements = 300000\nseed = 9\n\n";

const DIGITS_JOB: &str = "[job]\nname = \"mp-digits\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
     [fedavg]\nrounds = 10\nmin_clients = 3\nround_timeout_secs = 60\n\n\
     [learner]\nkind = \"mlp\"\nhidden = [32]\nepochs = 2\n\n[model]\nseed = 1\n\n\
     [data]\nalpha = 0.5\nseed = 3\n\n";

fn topology(path: &Path, job: &str, members: &[(&str, &str, Option<&str>)]) {
    let mut s = job.to_owned();
    for (name, id, addr) in members {
        let addrs = addr.map(|a| format!("\"{a}\"")).unwrap_or_default();
        s.push_str(&format!(
            "[[member]]\nname = \"{name}\"\npeer_id = \"{id}\"\naddrs = [{addrs}]\n\n"
        ));
    }
    std::fs::write(path, s).expect("write topology");
}

/// Runs `job` with one `flare-node run` process per member (a server and three sites) in
/// `dir`; the controller's outputs land in `dir/server-data`, and `dir/clients.toml` is the
/// topology with every member's peer id (and the server's address).
fn run_per_process(dir: &Path, job: &str, last_round: u32) {
    run_per_process_with(dir, job, last_round, &[], 60);
}

/// `args` then `extra`.
fn joined<'a>(args: &[&'a str], extra: &[&'a str]) -> Vec<&'a str> {
    args.iter().chain(extra).copied().collect()
}

/// [`run_per_process`], with `extra` arguments for every member's `run` and a job that may
/// take up to `secs`; returns each member's whole log, the server's first.
pub(crate) fn run_per_process_with(dir: &Path, job: &str, last_round: u32, extra: &[&str], secs: u64) -> Vec<String> {
    let p = |n: &str| dir.join(n).to_str().expect("utf8").to_owned();
    let names = ["server", "site-1", "site-2", "site-3"];
    let ids: Vec<String> = names
        .iter()
        .map(|n| peer_id_in(&cli(&["keygen", "--out", &p(&format!("{n}.key"))])))
        .collect();
    let no_addr: Vec<(&str, &str, Option<&str>)> =
        names.iter().zip(&ids).map(|(n, i)| (*n, i.as_str(), None)).collect();
    topology(&dir.join("server.toml"), job, &no_addr);
    let listen = "/ip4/127.0.0.1/tcp/0";

    let mut server = Running::start(&joined(
        &[
            "run",
            "--topology",
            &p("server.toml"),
            "--name",
            "server",
            "--key",
            &p("server.key"),
            "--listen",
            listen,
            "--data-dir",
            &p("server-data"),
        ],
        extra,
    ));
    let line = server.wait_for(&["listening", "/ip4/127.0.0.1/tcp/"]);
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("address="))
        .expect("address")
        .to_owned();
    let mut with_addr = no_addr.clone();
    with_addr[0].2 = Some(&addr);
    topology(&dir.join("clients.toml"), job, &with_addr);
    let clients: Vec<Running> = names[1..]
        .iter()
        .map(|n| {
            Running::start(&joined(
                &[
                    "run",
                    "--topology",
                    &p("clients.toml"),
                    "--name",
                    n,
                    "--key",
                    &p(&format!("{n}.key")),
                    "--listen",
                    listen,
                    "--data-dir",
                    &p(&format!("{n}-data")),
                ],
                extra,
            ))
        })
        .collect();
    server.wait_for_within(&["round done", &format!("round={last_round}")], secs);
    let mut logs = Vec::new();
    let (ok, log) = server.finish(120);
    assert!(ok, "the controller finished the job:\n{log}");
    logs.push(log);
    for c in clients {
        let (ok, log) = c.finish(120);
        assert!(ok, "a client exits once the job is over:\n{log}");
        logs.push(log);
    }
    logs
}

#[test]
fn fedavg_add_one_in_one_process_per_member_matches_sim_bit_for_bit() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    run_per_process(dir.path(), ADD_ONE_JOB, 4);

    // The same topology in one process.
    let sim = cli(&["sim", &p("clients.toml"), "--out", &p("sim-out")]);
    assert!(sim.status.success(), "{}", text(&sim.stderr));
    let multi = std::fs::read(dir.path().join("server-data/global.safetensors")).expect("run's model");
    let single = std::fs::read(dir.path().join("sim-out/global.safetensors")).expect("sim's model");
    assert!(multi == single, "run and sim give the same model, bit for bit");
    let results = std::fs::read_to_string(dir.path().join("server-data/results.json")).expect("results");
    assert!(results.contains("\"verified\": true"), "{results}");
}

pub(crate) fn topology_file(name: &str) -> String {
    format!("{}/../topologies/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// The summary JSON a command printed as its last line of stdout.
pub(crate) fn summary(out: &Output) -> serde_json::Value {
    let stdout = text(&out.stdout);
    let last = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .unwrap_or("");
    serde_json::from_str(last).unwrap_or_else(|e| panic!("no summary JSON ({e}) in {stdout:?}"))
}

#[test]
fn fedavg_on_digits_beats_local_only_training_and_reaches_90_percent() {
    let out = cli(&["sim", &topology_file("fedavg-digits.toml"), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["clients"].as_array().map(Vec::len), Some(4));
    let global = s["global"].as_array().expect("per-round global metrics");
    assert_eq!(global.len(), 20);
    let last = global.last().and_then(|g| g["accuracy"].as_f64()).expect("accuracy");
    let local = s["local_only"]["mean_accuracy"].as_f64().expect("local-only accuracy");
    assert!(last >= 0.90, "global accuracy {last}");
    assert!(last > local, "global {last} vs mean local-only {local}");
}

#[test]
fn sim_json_reports_the_exact_add_one_result() {
    let out = cli(&["sim", &topology_file("fedavg-addone.toml"), "--json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let s = summary(&out);
    assert_eq!(s["verified"], serde_json::Value::Bool(true));
    assert_eq!(s["round_secs"].as_array().map(Vec::len), Some(5));
}

#[test]
fn fedavg_on_digits_in_one_process_per_member_matches_sim_within_half_a_point() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    run_per_process(dir.path(), DIGITS_JOB, 9);
    let results: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("server-data/results.json")).expect("results"))
            .expect("json");
    let multi = results["summary"]["global"][9]["accuracy"].as_f64().expect("accuracy");
    let sim = cli(&["sim", &p("clients.toml"), "--json"]);
    assert!(sim.status.success(), "{}", text(&sim.stderr));
    let single = summary(&sim)["global"][9]["accuracy"].as_f64().expect("accuracy");
    assert!((multi - single).abs() <= 0.005, "run {multi} vs sim {single}");
    assert!(multi > 0.85, "the federated model learned: {multi}");
}

#[test]
fn a_controller_stopped_with_ctrl_c_ends_the_job_on_every_client_with_that_reason() {
    let dir = tempfile::tempdir().expect("tmp");
    // Far more rounds than the test waits for.
    let job = "[job]\nname = \"interrupted\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
         [fedavg]\nrounds = 100000\nmin_clients = 2\nround_timeout_secs = 60\n\n\
         [learner]\nkind = \"add-one\"\ndelay_secs = 0.05\n\n[model]\ntensors = 2\nelements = 1000\nseed = 1\n\n";
    let c = crate::util::Cluster::new(dir.path(), job, &["server", "site-1", "site-2"]);
    let mut members = c.start_all().into_iter();
    let mut server = members.next().expect("server");
    server.wait_for(&["round done", "round=1"]);
    server.ctrl_c();
    let (ok, log) = server.finish(60);
    assert!(!ok, "an interrupted job is not a success:\n{log}");
    assert!(
        log.contains("job aborted: the controller was interrupted (Ctrl-C)"),
        "{log}"
    );
    for site in members {
        let (ok, log) = site.finish(60);
        assert!(!ok, "a client of an interrupted job exits with an error:\n{log}");
        assert!(
            log.contains("the job ended before it finished: the controller was interrupted (Ctrl-C)"),
            "the client exits, saying why:\n{log}"
        );
    }
}

/// Distinct files (by inode) holding a model under `dir`: blobs in the store and
/// `.safetensors` files anywhere below.
fn models_on_disk(dir: &Path) -> usize {
    use std::os::unix::fs::MetadataExt;
    let mut inodes = std::collections::HashSet::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("read dir") {
            let path = e.expect("entry").path();
            let meta = std::fs::metadata(&path).expect("meta");
            if meta.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|x| x == "data" || x == "safetensors") {
                inodes.insert((meta.dev(), meta.ino()));
            }
        }
    }
    inodes.len()
}

#[test]
fn a_data_dir_after_300_rounds_holds_the_last_k_checkpoints_and_little_else() {
    let dir = tempfile::tempdir().expect("tmp");
    let job = "[job]\nname = \"long\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
         [fedavg]\nrounds = 300\nmin_clients = 2\nround_timeout_secs = 60\nkeep_checkpoints = 2\n\n\
         [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 2\nelements = 1000\nseed = 1\n\n";
    let c = crate::util::Cluster::new(dir.path(), job, &["server", "site-1", "site-2"]);
    crate::util::wait_all(c.start_all());
    assert_eq!(c.results("server")["verified"], true);
    let server = dir.path().join("server-data");
    let record = std::fs::read_to_string(server.join("checkpoints/checkpoint.json")).expect("record");
    let record: serde_json::Value = serde_json::from_str(&record).expect("json");
    assert_eq!(record["kept"], serde_json::json!([298, 299]));
    let on_disk = models_on_disk(&server);
    // K checkpoints (the newest the store's own file), the final model written out, and at
    // most one more in passing.
    assert!(on_disk <= 2 + 2, "{on_disk} models in the controller's data dir");
    for site in ["site-1", "site-2"] {
        let n = models_on_disk(&dir.path().join(format!("{site}-data")));
        assert!(n <= 2, "{n} models in {site}'s data dir");
    }
}

#[test]
fn a_thousand_clients_in_sim_all_contribute_and_the_result_is_exact() {
    let dir = tempfile::tempdir().expect("tmp");
    let mut job = "[job]\nname = \"thousand\"\nworkflow = \"fedavg\"\ncontroller = \"server\"\n\n\
         [fedavg]\nrounds = 3\nmin_clients = 1000\nround_timeout_secs = 300\n\n\
         [learner]\nkind = \"add-one\"\n\n[model]\ntensors = 1\nelements = 1000\nseed = 1\n\n\
         [[member]]\nname = \"server\"\n"
        .to_owned();
    for i in 0..1000 {
        job.push_str(&format!("[[member]]\nname = \"c{i}\"\n"));
    }
    let file = dir.path().join("thousand.toml");
    std::fs::write(&file, job).expect("write");
    let out = cli(&["sim", file.to_str().expect("utf8"), "--json"]);
    let log = text(&out.stderr);
    assert!(out.status.success(), "{log}");
    let s = summary(&out);
    assert_eq!(s["verified"], true, "every weight = initial + 3");
    assert_eq!(s["contributors_per_round"], serde_json::json!([1000, 1000, 1000]));
    // Waits on busy peers are tallied, a line per period, never a line per refusal.
    let busy_lines = log.lines().filter(|l| l.contains("busy")).count();
    assert!(busy_lines <= 20, "{busy_lines} lines about busy peers:\n{log}");
}
