//! A standing consortium as its operators and researchers meet it: sites made by `init`,
//! run by `serve` (each its own process), jobs signed and sent by `submit`, watched with
//! `jobs` and `status`.

use std::path::Path;
use std::time::{Duration, Instant};

use std::process::Output;

use crate::cli::{Running, cli, peer_id_in, text};

#[test]
fn init_writes_a_site_that_serve_runs_until_ctrl_c() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("lab-a");
    let s = site.to_str().expect("utf8");
    let out = cli(&["init", s, "--name", "lab-a", "--listen", "/ip4/127.0.0.1/tcp/0"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let id = peer_id_in(&out);
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(site.join("key")).expect("key").permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the key is the site's alone");
    let policy = std::fs::read_to_string(site.join("site.toml")).expect("site.toml");
    assert!(policy.contains(&id) && policy.contains("role = \"admin\""), "{policy}");
    let members = std::fs::read_to_string(site.join("members.toml")).expect("members.toml");
    assert!(
        members.contains(&id) && members.contains("name = \"lab-a\""),
        "{members}"
    );
    let again = cli(&["init", s, "--name", "lab-a"]);
    assert!(!again.status.success());
    assert!(
        text(&again.stderr).contains("already exists; pass --force"),
        "{}",
        text(&again.stderr)
    );

    let mut serve = Running::start(&["serve", s]);
    serve.wait_for(&["site policy loaded", "site=lab-a"]);
    serve.wait_for(&["listening", "/ip4/127.0.0.1/tcp/"]);
    serve.wait_for(&["Ctrl-C to stop"]);
    serve.ctrl_c();
    let (ok, log) = serve.finish(30);
    assert!(ok, "serve stops cleanly on Ctrl-C:\n{log}");
    assert!(
        site.join("store/blobs").is_dir(),
        "the site keeps its blobs in its own store"
    );
}

#[test]
fn serve_refuses_a_bad_site_naming_the_file_and_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let site = dir.path().join("lab-b");
    let s = site.to_str().expect("utf8");
    assert!(cli(&["init", s, "--name", "lab-b"]).status.success());
    let policy = site.join("site.toml");
    let good = std::fs::read_to_string(&policy).expect("site.toml");
    std::fs::write(&policy, good.replace("concurrent_jobs = 4", "concurrent_jobs = 0")).expect("write");
    let out = cli(&["serve", s]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("site.toml: line") && err.contains("field `limits.concurrent_jobs`: must be at least 1"),
        "{err}"
    );
    std::fs::write(&policy, good.replace("name = \"lab-b\"", "name = \"lab-c\"")).expect("write");
    let out = cli(&["serve", s]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("members.toml does not list this site (\"lab-c\""), "{err}");
}

/// A FedAvg add-one job on the sites `names` (the first the controller), as a job file.
pub(crate) fn site_job(names: &[&str], learner: &str) -> String {
    let mut s = format!(
        "[job]\nname = \"on-sites\"\nworkflow = \"fedavg\"\ncontroller = \"{}\"\nclients = [{}]\n\n\
         [fedavg]\nrounds = 2\nmin_clients = 1\n\n[learner]\nkind = \"{learner}\"\n\n",
        names[0],
        names.iter().map(|n| format!("{n:?}")).collect::<Vec<_>>().join(", ")
    );
    for n in names {
        s.push_str(&format!("[[member]]\nname = \"{n}\"\n"));
    }
    s
}

#[test]
fn a_site_takes_a_signed_job_from_a_submitter_in_its_policy_and_refuses_others_saying_why() {
    let dir = tempfile::tempdir().expect("tmp");
    let p = |n: &str| dir.path().join(n).to_str().expect("utf8").to_owned();
    let addr = format!("/ip4/127.0.0.1/tcp/{}", crate::util::free_port());
    assert!(
        cli(&["init", &p("lab-a"), "--name", "lab-a", "--listen", &addr])
            .status
            .success()
    );
    let lab_b = peer_id_in(&cli(&["init", &p("lab-b"), "--name", "lab-b"]));
    let alice = peer_id_in(&cli(&["keygen", "--out", &p("alice.key")]));
    // lab-a lets alice submit, runs add-one but not the MLP, and knows lab-b as a member.
    let policy = std::fs::read_to_string(p("lab-a/site.toml")).expect("site.toml");
    let policy = policy.replace(
        "builtin = [\"add-one\", \"mlp\", \"tch-mlp\", \"tch-cnn\", \"split\"]",
        "builtin = [\"add-one\"]",
    ) + &format!("\n[[submitter]]\nname = \"alice\"\npeer_id = \"{alice}\"\nrole = \"researcher\"\n");
    std::fs::write(p("lab-a/site.toml"), policy).expect("write");
    let mut members = std::fs::OpenOptions::new()
        .append(true)
        .open(p("lab-a/members.toml"))
        .expect("members");
    std::io::Write::write_all(
        &mut members,
        format!("[[member]]\nname = \"lab-b\"\npeer_id = \"{lab_b}\"\naddrs = []\n").as_bytes(),
    )
    .expect("append");
    let ab = ["lab-a", "lab-b"];
    std::fs::write(p("addone.toml"), site_job(&ab, "add-one")).expect("job");
    std::fs::write(p("mlp.toml"), site_job(&ab, "mlp")).expect("job");
    std::fs::write(p("stranger.toml"), site_job(&["lab-a", "lab-b", "lab-x"], "add-one")).expect("job");
    std::fs::write(
        p("broken.toml"),
        site_job(&ab, "add-one").replace("rounds = 2", "rounds = 0"),
    )
    .expect("job");

    let mut site = Running::start(&["serve", &p("lab-a")]);
    site.wait_for(&["listening", &addr]);
    site.wait_for(&["Ctrl-C to stop"]);
    let submit = |job: &str, key: &str| {
        cli(&[
            "submit",
            &p(job),
            "--key",
            key,
            "--members",
            &p("lab-a/members.toml"),
            "--to",
            "lab-a",
        ])
    };
    let ok = submit("addone.toml", &p("alice.key"));
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    let id = text(&ok.stdout)
        .split_whitespace()
        .find(|w| w.starts_with('j') && w.len() == 17)
        .expect("the job id")
        .to_owned();
    site.wait_for(&["job taken", &id]);

    let refused = |job: &str, key: &str, says: &str| {
        let out = submit(job, key);
        let err = text(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{job}: {err}");
    };
    refused(
        "addone.toml",
        &p("lab-b/key"),
        &format!("lab-a: submitter {lab_b} is not allowed to submit jobs here"),
    );
    refused(
        "mlp.toml",
        &p("alice.key"),
        "lab-a: learner \"mlp\" is not registered here",
    );
    refused(
        "stranger.toml",
        &p("alice.key"),
        "lab-a: the job names member \"lab-x\", who is not in this consortium",
    );
    // A job changed after it was signed is refused: the site checks the signature itself.
    let tampered = send_tampered(
        &p("alice.key"),
        &p("lab-a/members.toml"),
        "lab-a",
        &std::fs::read_to_string(p("addone.toml")).expect("job"),
    );
    assert!(
        tampered.starts_with("lab-a: refused a job whose signature does not hold"),
        "{tampered}"
    );
    // A malformed job never leaves the submitter's machine: file, line and field are named.
    refused(
        "broken.toml",
        &p("alice.key"),
        "broken.toml: line 8: field `fedavg.rounds`: must be at least 1",
    );
    site.ctrl_c();
    let (ok, log) = site.finish(30);
    assert!(ok, "{log}");
    assert_eq!(log.matches("job refused").count(), 4, "{log}");
}

/// Signs `spec` with the key at `key`, changes a byte of it (as a man in the middle
/// would), submits it to `site` from a peer of its own, and returns the site's refusal.
fn send_tampered(key: &str, members: &str, site: &str, spec: &str) -> String {
    use flare_protocols::ctl::{CtlRequest, CtlResponse, Request};
    let bytes = std::fs::read(key).expect("key");
    let key = libp2p::identity::Keypair::from_protobuf_encoding(&bytes).expect("a key");
    let members = flare_actors::Members::load(Path::new(members)).expect("members");
    let to = members.by_name(site).expect("the site").peer_id;
    let mut signed = flare_protocols::job::SignedJob::sign(spec.as_bytes().to_vec(), &key, 1).expect("sign");
    signed.spec = spec.replace("rounds = 2", "rounds = 9").into_bytes();
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let node = flare_actors::Node::start(flare_actors::NodeConfig {
            keypair: key,
            members: members.into(),
            listen: vec![crate::util::loopback()],
            store: flare_actors::BlobStore::memory(),
            max_blob_streams: 4,
            max_upload: None,
            bulk_channel: true,
        })
        .await
        .expect("node");
        let req = CtlRequest {
            job: signed.id(),
            body: Request::Submit(Box::new(signed)),
        };
        let answer = tokio::time::timeout(Duration::from_secs(30), node.net().request(to, req)).await;
        node.net().shutdown();
        match answer {
            Ok(Ok(CtlResponse::Rejected { reason })) => reason,
            other => panic!("a tampered job was not refused: {other:?}"),
        }
    })
}

/// Sites in a temporary directory, each run by its own `serve` process, and the keys of the
/// researchers who use them (`NAME.key` beside the sites).
pub(crate) struct Consortium {
    dir: tempfile::TempDir,
}

impl Consortium {
    /// Initialises `sites`, each listening on a port of its own, every one's members.toml
    /// the whole consortium; and `researchers`, each allowed to submit at every site.
    pub(crate) fn new(sites: &[&str], researchers: &[&str]) -> Self {
        let c = Self {
            dir: tempfile::tempdir().expect("tmp"),
        };
        let mut table = String::new();
        for n in sites {
            let addr = format!("/ip4/127.0.0.1/tcp/{}", crate::util::free_port());
            let out = cli(&["init", &c.path(n), "--name", n, "--listen", &addr]);
            assert!(out.status.success(), "{}", text(&out.stderr));
            table.push_str(&std::fs::read_to_string(c.dir().join(n).join("members.toml")).expect("members"));
        }
        for n in sites {
            std::fs::write(c.dir().join(n).join("members.toml"), &table).expect("members");
        }
        for r in researchers {
            c.researcher(r, sites);
        }
        c
    }

    /// The directory.
    pub(crate) fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` in the directory, as a string for the CLI.
    pub(crate) fn path(&self, name: &str) -> String {
        self.dir().join(name).to_str().expect("utf8").to_owned()
    }

    /// Makes researcher `who` a key and lets it submit at `sites`; its peer id.
    pub(crate) fn researcher(&self, who: &str, sites: &[&str]) -> String {
        let key = self.path(&format!("{who}.key"));
        let peer = if Path::new(&key).exists() {
            peer_id_in(&cli(&["keygen", "--out", &key, "--force"]))
        } else {
            peer_id_in(&cli(&["keygen", "--out", &key]))
        };
        for s in sites {
            self.edit_policy(s, |p| {
                format!("{p}\n[[submitter]]\nname = \"{who}\"\npeer_id = \"{peer}\"\n")
            });
        }
        peer
    }

    /// Rewrites site `site`'s site.toml with `change`.
    pub(crate) fn edit_policy(&self, site: &str, change: impl FnOnce(String) -> String) {
        let path = self.dir().join(site).join("site.toml");
        let policy = std::fs::read_to_string(&path).expect("site.toml");
        std::fs::write(path, change(policy)).expect("write");
    }

    /// Starts `serve` for each of `sites`, once each says it runs.
    pub(crate) fn serve(&self, sites: &[&str]) -> Vec<Running> {
        let mut running: Vec<Running> = sites.iter().map(|n| self.serve_one(n)).collect();
        for r in &mut running {
            r.wait_for(&["Ctrl-C to stop"]);
        }
        running
    }

    /// Starts `serve` for `site` (not waiting for it).
    pub(crate) fn serve_one(&self, site: &str) -> Running {
        Running::start(&["serve", &self.path(site)])
    }

    /// Writes job file `name` and gives its path.
    pub(crate) fn job(&self, name: &str, spec: &str) -> String {
        std::fs::write(self.dir().join(name), spec).expect("job");
        self.path(name)
    }

    /// `flare-node CMD ARG.. --key WHO.key --members .. --to SITE EXTRA..`, as researcher `who`.
    pub(crate) fn ask(&self, cmd: &str, arg: &str, who: &str, site: &str, extra: &[&str]) -> Output {
        let (key, members) = (self.path(&format!("{who}.key")), self.path("lab-a/members.toml"));
        let mut args = vec![cmd];
        if !arg.is_empty() {
            args.push(arg);
        }
        args.extend(["--key", &key, "--members", &members, "--to", site]);
        args.extend(extra);
        cli(&args)
    }

    /// Submits job file `file` as `who` to `site`; its id.
    pub(crate) fn submit(&self, file: &str, who: &str, site: &str) -> String {
        job_id(&self.ask("submit", file, who, site, &[]))
    }

    /// `flare-node jobs --json` at `site`, as `who`.
    pub(crate) fn jobs(&self, site: &str, who: &str) -> Vec<serde_json::Value> {
        let v = last_json(&self.ask("jobs", "", who, site, &["--json"]));
        v["jobs"].as_array().cloned().unwrap_or_default()
    }

    /// `flare-node status JOB --json` at `site`, as `who`.
    pub(crate) fn status(&self, job: &str, site: &str, who: &str) -> serde_json::Value {
        last_json(&self.ask("status", job, who, site, &["--json"]))
    }

    /// Waits (bounded) until `job` shows `views` views at `site`, each finished; the status.
    pub(crate) fn wait_finished(&self, job: &str, site: &str, who: &str, views: usize) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let status = self.status(job, site, who);
            let all = status["views"].as_array().cloned().unwrap_or_default();
            if all.len() == views && all.iter().all(|v| v["state"] == "finished") {
                return status;
            }
            assert!(
                all.iter().all(|v| v["state"] == "running" || v["state"] == "finished"),
                "{status}"
            );
            assert!(Instant::now() < deadline, "not finished within 180 s: {status}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// The results.json of `job` at `site`.
    pub(crate) fn results(&self, site: &str, job: &str) -> serde_json::Value {
        let path = self.dir().join(site).join("jobs").join(job).join("results.json");
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).expect("results.json")
    }
}

/// Stops every site with Ctrl-C; each must exit cleanly. Their logs.
pub(crate) fn stop(running: Vec<Running>) -> Vec<String> {
    running
        .into_iter()
        .map(|r| {
            r.ctrl_c();
            let (ok, log) = r.finish(30);
            assert!(ok, "{log}");
            log
        })
        .collect()
}

/// The last JSON line of a successful command's stdout.
fn last_json(out: &Output) -> serde_json::Value {
    assert!(out.status.success(), "{}", text(&out.stderr));
    let last = text(&out.stdout)
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .map(str::to_owned);
    serde_json::from_str(&last.expect("a JSON line")).expect("JSON")
}

/// The job id `submit` printed.
pub(crate) fn job_id(out: &Output) -> String {
    text(&out.stdout)
        .split_whitespace()
        .find(|w| w.starts_with('j') && w.len() == 17)
        .unwrap_or_else(|| panic!("no job id in {:?} ({})", text(&out.stdout), text(&out.stderr)))
        .to_owned()
}

/// A swarm add-one job on the sites `names`, as a job file.
pub(crate) fn swarm_job(names: &[&str], rounds: u32) -> String {
    let mut s = format!(
        "[job]\nname = \"swarm-on-sites\"\nworkflow = \"swarm\"\n\n[swarm]\nrounds = {rounds}\nmin_clients = {}\n\n\
         [learner]\nkind = \"add-one\"\n\n",
        names.len()
    );
    for n in names {
        s.push_str(&format!("[[member]]\nname = \"{n}\"\n"));
    }
    s
}

#[test]
fn every_member_decides_on_a_job_by_its_own_policy_and_the_submitter_hears_who_refused_and_why() {
    let sites = ["lab-a", "lab-b", "lab-c"];
    let c = Consortium::new(&sites, &[]);
    // alice may submit at lab-a and lab-b, bob at lab-a only; lab-c takes neither.
    let alice = c.researcher("alice", &["lab-a", "lab-b"]);
    let bob = c.researcher("bob", &["lab-a"]);
    let running = c.serve(&sites);
    let job = |min: usize| site_job(&sites, "add-one").replace("min_clients = 1", &format!("min_clients = {min}"));
    let (one, three) = (c.job("one.toml", &job(1)), c.job("three.toml", &job(3)));
    let lab_c_says = format!("lab-c: submitter {alice} is not allowed to submit jobs here");
    // Enough members take it: it goes on, and the submitter hears who did not, and why.
    let out = c.ask("submit", &one, "alice", "lab-a", &[]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains(&format!(
            "refused by a member, the job goes on without it: {lab_c_says}"
        )),
        "{err}"
    );
    // Not enough: the job is refused, naming each site that refused and its reason.
    let out = c.ask("submit", &three, "alice", "lab-a", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("cannot run without the members that refused it") && err.contains(&lab_c_says),
        "{err}"
    );
    let out = c.ask("submit", &three, "bob", "lab-a", &[]);
    let err = text(&out.stderr);
    assert!(!out.status.success());
    for site in ["lab-b", "lab-c"] {
        assert!(
            err.contains(&format!("{site}: submitter {bob} is not allowed to submit jobs here")),
            "{err}"
        );
    }
    let logs = stop(running);
    assert_eq!(logs[1].matches("job offered and taken").count(), 2, "{}", logs[1]);
    assert_eq!(logs[2].matches("job refused").count(), 3, "{}", logs[2]);
}

#[test]
fn two_jobs_submitted_at_once_run_on_standing_sites_and_finish_exact() {
    let sites = ["lab-a", "lab-b", "lab-c", "lab-d"];
    let c = Consortium::new(&sites, &["alice"]);
    let mut running = c.serve(&sites);
    let fedavg = c.job(
        "fedavg.toml",
        &site_job(&sites, "add-one").replace("rounds = 2", "rounds = 3"),
    );
    // Both start from the same model, and every round's results have the same content in
    // both jobs (add-one): one id in each site's store, held and served for both at once.
    let swarm = c.job("swarm.toml", &swarm_job(&sites, 3));
    // Submitted at the same time, to two different sites.
    let (fedavg, swarm) = std::thread::scope(|s| {
        let a = s.spawn(|| c.submit(&fedavg, "alice", "lab-a"));
        let b = s.spawn(|| c.submit(&swarm, "alice", "lab-c"));
        (a.join().expect("submit"), b.join().expect("submit"))
    });
    // Both finish on every site (bounded: each is a few seconds of work): every member's
    // view, not only the one asked (a swarm member ends when it has the final model, which
    // the others may still be pulling).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (fa, sw) = (c.status(&fedavg, "lab-b", "alice"), c.status(&swarm, "lab-b", "alice"));
        let states = |s: &serde_json::Value| -> Vec<String> {
            let views = s["views"].as_array().cloned().unwrap_or_default();
            views
                .iter()
                .map(|v| v["state"].as_str().unwrap_or_default().to_owned())
                .collect()
        };
        let (a, b) = (states(&fa), states(&sw));
        let finished = |s: &[String]| s.len() == sites.len() && s.iter().all(|s| s == "finished");
        if finished(&a) && finished(&b) {
            break;
        }
        let over = |s: &[String]| {
            s.iter()
                .any(|s| matches!(s.as_str(), "failed" | "aborted" | "refused" | "withdrawn"))
        };
        if over(&a) || over(&b) {
            // Every member's view of each, with its reason, and every site's log, to tell
            // what went wrong where.
            let logs: Vec<String> = sites
                .iter()
                .zip(&mut running)
                .map(|(s, r)| format!("--- {s}:\n{}", r.log()))
                .collect();
            panic!("a job ended early:\nfedavg {fa}\nswarm {sw}\n{}", logs.join("\n"));
        }
        assert!(
            Instant::now() < deadline,
            "not finished within 120 s:\nfedavg {fa}\nswarm {sw}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // Each site keeps each job's outputs apart; the add-one results are exact.
    assert_eq!(c.results("lab-a", &fedavg)["summary"]["verified"], true);
    for s in sites {
        assert_eq!(c.results(s, &swarm)["summary"]["verified"], true, "{s}");
    }
    // `status` asked of one site gathers every member's view of the job.
    let status = c.status(&fedavg, "lab-d", "alice");
    assert_eq!(status["state"], "finished", "{status}");
    let views = status["views"].as_array().expect("views");
    assert_eq!(views.len(), 4, "{status}");
    for v in views {
        assert_eq!(v["state"], "finished", "{status}");
    }
    let controller = views
        .iter()
        .find(|v| v["site"] == "lab-a")
        .expect("the controller's view");
    assert_eq!(controller["round"], 3, "{status}");
    assert_eq!(
        controller["metrics"].as_array().map(Vec::len),
        Some(3),
        "a row per round: {status}"
    );
    // `download` finds the controller and brings the final model, results and curve.
    let out = c.path("out");
    let got = c.ask("download", &fedavg, "alice", "lab-c", &["--out", &out]);
    assert!(got.status.success(), "{}", text(&got.stderr));
    let model = std::fs::read(Path::new(&out).join("global.safetensors")).expect("the global model");
    assert_eq!(
        model,
        std::fs::read(c.dir().join("lab-a/jobs").join(&fedavg).join("global.safetensors")).expect("model"),
        "the controller's final model, byte for byte"
    );
    let curve = std::fs::read_to_string(Path::new(&out).join("curve.csv")).expect("curve.csv");
    assert_eq!(curve.lines().count(), 4, "a header and 3 rounds:\n{curve}");
    stop(running);
}

#[test]
fn a_job_aborted_by_its_submitter_stops_on_every_member_and_leaves_another_job_alone() {
    let sites = ["lab-a", "lab-b", "lab-c"];
    let c = Consortium::new(&sites, &["alice", "bob"]);
    let mut running = c.serve(&sites);
    // Far more rounds than the test waits for.
    let long = site_job(&sites, "add-one")
        .replace("rounds = 2", "rounds = 100000")
        .replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 0.02");
    let long = c.submit(&c.job("long.toml", &long), "alice", "lab-b");
    let swarm = c.submit(&c.job("swarm.toml", &swarm_job(&sites, 30)), "bob", "lab-a");
    running[0].wait_for(&["round done", "round=2"]);
    // Only its submitter (or an admin) may stop it.
    let no = c.ask("abort", &long, "bob", "lab-a", &[]);
    assert!(!no.status.success());
    assert!(
        text(&no.stderr).contains(&format!("lab-a: bob may not abort job {long}")),
        "{}",
        text(&no.stderr)
    );
    let yes = c.ask("abort", &long, "alice", "lab-c", &["--reason", "wrong data"]);
    assert!(yes.status.success(), "{}", text(&yes.stderr));
    // Every member records the abort and why; none is left running.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let status = c.status(&long, "lab-a", "alice");
        let views = status["views"].as_array().cloned().unwrap_or_default();
        let aborted = views
            .iter()
            .filter(|v| v["state"] == "aborted" && v["reason"] == "aborted by alice: wrong data")
            .count();
        if aborted == 3 {
            assert_eq!(status["state"], "aborted", "{status}");
            break;
        }
        assert!(
            views.iter().all(|v| v["state"] == "running" || v["state"] == "aborted"),
            "{status}"
        );
        assert!(
            Instant::now() < deadline,
            "not aborted everywhere within 60 s:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The other job on the same members goes on to its end, exact.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        // A researcher sees their own jobs only.
        let jobs = c.jobs("lab-c", "bob");
        assert!(jobs.iter().all(|j| j["id"] != long.as_str()), "{jobs:?}");
        let state = jobs
            .iter()
            .find(|j| j["id"] == swarm.as_str())
            .map(|j| j["state"].clone());
        if state == Some("finished".into()) {
            break;
        }
        assert_eq!(state, Some("running".into()), "{jobs:?}");
        assert!(Instant::now() < deadline, "the swarm job did not finish: {jobs:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    for s in sites {
        assert_eq!(c.results(s, &swarm)["summary"]["verified"], true, "{s}");
    }
    stop(running);
}

#[test]
fn a_controller_site_killed_mid_job_resumes_from_its_last_checkpoint_and_ends_exact() {
    let sites = ["lab-a", "lab-b", "lab-c"];
    let c = Consortium::new(&sites, &["alice"]);
    let mut running = c.serve(&sites);
    let job = site_job(&sites, "add-one")
        .replace("rounds = 2\nmin_clients = 1", "rounds = 30\nmin_clients = 3")
        .replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 0.05");
    let id = c.submit(&c.job("job.toml", &job), "alice", "lab-b");
    // lab-a runs the controller: kill it without warning mid-job, then start it again.
    let mut a = running.remove(0);
    a.wait_for(&["round done", "round=6"]);
    a.kill();
    // Meanwhile its clients do not just show `running`: they say what they wait for.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = c.status(&id, "lab-b", "alice");
        if status["views"][0]["reason"] == "waiting: the controller (lab-a) cannot be reached" {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut a = c.serve_one("lab-a");
    a.wait_for(&["resuming from the last checkpoint"]);
    let status = c.wait_finished(&id, "lab-b", "alice", 3);
    let results = c.results("lab-a", &id);
    assert_eq!(
        results["summary"]["verified"], true,
        "every weight = initial + 30: {status}"
    );
    assert_eq!(
        results["rounds"].as_array().map(Vec::len),
        Some(30),
        "every round's record"
    );
    running.push(a);
    stop(running);
}

#[test]
fn a_member_site_killed_mid_job_rejoins_when_started_again() {
    let sites = ["lab-a", "lab-b", "lab-c"];
    let c = Consortium::new(&sites, &["alice"]);
    let mut running = c.serve(&sites);
    let job = swarm_job(&sites, 20)
        .replace("min_clients = 3", "min_clients = 2\nround_timeout_secs = 10")
        .replace("kind = \"add-one\"", "kind = \"add-one\"\ndelay_secs = 0.3");
    let id = c.submit(&c.job("job.toml", &job), "alice", "lab-a");
    let mut lab_c = running.remove(2);
    // Killed while another member holds the newest model (lab-c's next turn to aggregate
    // is two rounds away): a swarm goes on without a member, and takes it back.
    lab_c.wait_for(&["round announced", "round=6", "aggregator=lab-a"]);
    lab_c.kill();
    let mut lab_c = c.serve_one("lab-c");
    lab_c.wait_for(&["resuming this site's part of the job"]);
    c.wait_finished(&id, "lab-a", "alice", 3);
    for s in sites {
        assert_eq!(c.results(s, &id)["summary"]["verified"], true, "{s}");
    }
    running.push(lab_c);
    stop(running);
}

#[test]
fn a_job_names_a_learner_each_site_registered_and_a_site_without_it_refuses_saying_so() {
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let sites = ["lab-a", "lab-b", "lab-c"];
    let c = Consortium::new(&sites, &["alice"]);
    // lab-a and lab-b run the Python add-one script under a name of their choosing; lab-c
    // registers nothing.
    let registered = format!(
        "\n[learner.py-addone]\ncommand = [\"python3\", {:?}]\nenv = {{ PYTHONPATH = {:?} }}\n",
        python.join("examples/add_one.py"),
        python
    );
    for s in ["lab-a", "lab-b"] {
        // Tables after `[limits]` would land in it: the learner goes before.
        c.edit_policy(s, |p| p.replace("[limits]", &format!("{registered}\n[limits]")));
    }
    let running = c.serve(&sites);
    let job = site_job(&sites, "add-one")
        .replace("min_clients = 1", "min_clients = 2")
        .replace("kind = \"add-one\"", "kind = \"add-one\"\nregistered = \"py-addone\"");
    let out = c.ask("submit", &c.job("job.toml", &job), "alice", "lab-a", &[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("lab-c: learner \"py-addone\" is not registered here"),
        "{}",
        text(&out.stderr)
    );
    let id = job_id(&out);
    let status = c.wait_finished(&id, "lab-a", "alice", 2);
    assert!(
        status["views"]
            .as_array()
            .is_some_and(|v| v.iter().all(|v| v["site"] != "lab-c")),
        "{status}"
    );
    let r = c.results("lab-a", &id);
    assert_eq!(r["summary"]["verified"], true, "{r}");
    // The script ran (it reports the round as a metric; the built-in learner reports none).
    assert!(r["rounds"][1]["metrics"]["round"].is_number(), "{r}");
    stop(running);
}

/// A submitted job takes its initial model from one site's registered script
/// (`[model] from`): the sites' registered learner gives the tensors of a file only that site
/// has, and the job ends with those tensors plus its rounds, exactly.
#[test]
fn a_submitted_job_starts_from_the_model_a_sites_registered_script_gives() {
    use flare_protocols::model::{Model, Tensor};
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join("../python");
    let sites = ["lab-a", "lab-b"];
    let c = Consortium::new(&sites, &["alice"]);
    let script = c.dir().join("adds_one.py");
    std::fs::write(&script, crate::model_file::ADDS_ONE).expect("script");
    let init = c.dir().join("lab-b-init.safetensors");
    let start = Model::from_tensors([("w", Tensor::from_f32(vec![3], &[0.5, -2.25, 7.0]).expect("w"))]);
    start.save(&init).expect("save");
    for s in sites {
        let env = match s {
            "lab-b" => format!(", INIT = {:?}", init.to_str().expect("utf8")),
            _ => String::new(),
        };
        let registered = format!(
            "\n[learner.py-addone]\ncommand = [\"python3\", {script:?}]\nenv = {{ PYTHONPATH = {python:?}{env} }}\n"
        );
        c.edit_policy(s, |p| p.replace("[limits]", &format!("{registered}\n[limits]")));
    }
    let running = c.serve(&sites);
    let job = site_job(&sites, "add-one")
        .replace("min_clients = 1", "min_clients = 2")
        .replace(
            "kind = \"add-one\"",
            "kind = \"add-one\"\nregistered = \"py-addone\"\n\n[model]\nfrom = \"lab-b\"",
        );
    let id = c.submit(&c.job("job.toml", &job), "alice", "lab-a");
    c.wait_finished(&id, "lab-a", "alice", 2);
    let global = Model::load(&c.dir().join("lab-a/jobs").join(&id).join("global.safetensors")).expect("global");
    let mut want = start;
    for _ in 0..2 {
        want.map_f32(|v| v + 1.0);
    }
    assert!(global == want, "lab-b's initial model plus two rounds");
    stop(running);
}

#[test]
fn the_shipped_cyclic_split_cross_site_and_inference_jobs_run_when_submitted_to_sites() {
    let sites = ["lab-a", "lab-b", "lab-c", "lab-d", "lab-e"];
    let c = Consortium::new(&sites, &["alice"]);
    let running = c.serve(&sites);
    // The shipped topology files name members, never their keys or addresses: each is a job
    // file as it is, once its members' names are the sites'.
    let jobs: Vec<String> = [
        "cyclic-addone",
        "split-digits",
        "cross-site-digits",
        "inference-then-fedavg",
    ]
    .iter()
    .map(|name| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../topologies/{name}.toml"));
        let mut spec = std::fs::read_to_string(&path).expect("topology");
        let names: Vec<String> = spec
            .lines()
            .filter_map(|l| l.trim().strip_prefix("name = \"").and_then(|n| n.split('"').next()))
            .skip(1) // the job's own name
            .map(str::to_owned)
            .collect();
        for (member, site) in names.iter().zip(sites) {
            spec = spec.replace(&format!("\"{member}\""), &format!("\"{site}\""));
        }
        c.submit(&c.job(&format!("{name}.toml"), &spec), "alice", "lab-a")
    })
    .collect();
    for id in &jobs {
        let status = c.status(id, "lab-a", "alice");
        let members = status["views"].as_array().map_or(0, Vec::len);
        let done = c.wait_finished(id, "lab-a", "alice", members);
        let controller = done["views"]
            .as_array()
            .and_then(|v| {
                v.iter()
                    .find(|v| v["part"].as_str().is_some_and(|p| p.starts_with("controller")))
            })
            .expect("the controller's view");
        let r = c.results(controller["site"].as_str().expect("site"), id);
        assert_ne!(r["summary"]["verified"], false, "{r}");
    }
    stop(running);
}
