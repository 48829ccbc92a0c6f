//! A site's own rules, `site.toml`: who may submit jobs and which workflows, the learners and
//! datasets this site offers by name, and its limits. They are local and final: a job names a
//! learner or a dataset, never a command or a path, and can never override them.
//!
//! Errors name the file, the line and the field, as a topology file's do.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;
use toml::Spanned;

use crate::topology::line_of;

/// The built-in learners a job may name (their `kind` in a topology file).
pub const BUILTIN_LEARNERS: [&str; 5] = ["add-one", "mlp", "tch-mlp", "tch-cnn", "split"];

/// The workflows a job may name.
pub const WORKFLOWS: [&str; 5] = ["fedavg", "cyclic", "swarm", "split", "inference-then-fedavg"];

/// What a submitter may do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Submit jobs, and see and abort its own.
    Researcher,
    /// Also see and abort any job.
    Admin,
}

/// One peer allowed to submit jobs to this site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitter {
    /// A name for logs and refusals.
    pub name: String,
    /// Its key's peer id.
    pub peer_id: PeerId,
    /// What it may do.
    pub role: Role,
    /// The workflows it may submit (`None`: all).
    pub workflows: Option<BTreeSet<String>>,
}

/// Training code registered on this site under a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalLearner {
    /// The command and its arguments.
    pub command: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// Rows this site holds under a name, as CSV files (features, then the label): what a job
/// naming the dataset trains on here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalDataset {
    /// The rows this site's member trains on.
    pub path: PathBuf,
    /// Held-out rows the global model is measured on when this site hosts the controller.
    pub test: Option<PathBuf>,
}

impl LocalDataset {
    /// Where a job's part on this site finds its rows.
    pub fn site_data(&self) -> crate::topology::SiteData {
        crate::topology::SiteData {
            train: self.path.clone(),
            test: self.test.clone(),
        }
    }
}

/// How much this site gives to jobs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Jobs this site takes part in at once.
    pub concurrent_jobs: usize,
    /// Largest model (bytes) a job may move through this site.
    pub max_model_bytes: u64,
    /// Disk a job's data may take here (bytes).
    pub job_disk_bytes: u64,
    /// Bytes a second this site uploads at most as model chunks, to all peers together
    /// (`None`: no cap): a site's uplink is shared with everything else it does.
    pub max_upload_bytes_per_sec: Option<u64>,
    /// Models larger than this live on disk in this site's jobs, not in memory (`run
    /// --stream-above`; `None`: the node's default, 512 MiB).
    pub stream_above_bytes: Option<u64>,
}

/// A site's policy (see the module doc).
#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    /// The site's member name.
    pub name: String,
    /// Where the site listens.
    pub listen: Vec<Multiaddr>,
    /// Who may submit jobs.
    pub submitters: Vec<Submitter>,
    /// The built-in learners this site runs.
    pub builtin_learners: BTreeSet<String>,
    /// Training code registered here, by name.
    pub learners: BTreeMap<String, LocalLearner>,
    /// Data on this site, by name.
    pub datasets: BTreeMap<String, LocalDataset>,
    /// Limits.
    pub limits: Limits,
}

/// What a job asks of this site, as far as its policy is concerned.
#[derive(Clone, Debug)]
pub struct Ask<'a> {
    /// Who submitted it (its signature checked).
    pub submitter: PeerId,
    /// Its workflow.
    pub workflow: &'a str,
    /// The learner it names.
    pub learner: &'a str,
    /// The dataset it names, if any.
    pub dataset: Option<&'a str>,
    /// Its model's size, when known.
    pub model_bytes: Option<u64>,
    /// Models' worth of disk the job's data takes here at most (checkpoints kept, the
    /// round's model and result), to weigh against `limits.job_disk_bytes`.
    pub models_on_disk: u64,
    /// Jobs this site runs now.
    pub running: usize,
}

/// Why this site will not take part in a job: said to the submitter as it is.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The submitter is not in this site's policy.
    #[error("{site}: submitter {peer} is not allowed to submit jobs here")]
    NotASubmitter {
        /// This site.
        site: String,
        /// The submitter.
        peer: PeerId,
    },
    /// The submitter may not submit this workflow.
    #[error("{site}: submitter {name} may not submit {workflow} jobs here")]
    Workflow {
        /// This site.
        site: String,
        /// The submitter's name.
        name: String,
        /// The workflow.
        workflow: String,
    },
    /// The learner is not registered (or not allowed) here.
    #[error("{site}: learner {learner:?} is not registered here")]
    Learner {
        /// This site.
        site: String,
        /// The learner named.
        learner: String,
    },
    /// The dataset is not on this site.
    #[error("{site}: no dataset {dataset:?} here")]
    Dataset {
        /// This site.
        site: String,
        /// The dataset named.
        dataset: String,
    },
    /// The model is larger than this site takes.
    #[error("{site}: a model of {bytes} bytes is over this site's limit of {max}")]
    ModelTooLarge {
        /// This site.
        site: String,
        /// The model's size.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// The job's data would take more disk than this site gives a job.
    #[error("{site}: the job's data would take about {bytes} bytes of disk, over this site's limit of {max}")]
    Disk {
        /// This site.
        site: String,
        /// The estimate.
        bytes: u64,
        /// The limit.
        max: u64,
    },
    /// This site runs as many jobs as it allows.
    #[error("{site}: already running {running} jobs, this site's limit")]
    Busy {
        /// This site.
        site: String,
        /// Jobs running.
        running: usize,
    },
}

/// Why `site.toml` was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct PolicyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with the line and field.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    site: RawSite,
    #[serde(default)]
    submitter: Vec<Spanned<RawSubmitter>>,
    #[serde(default)]
    learners: Option<RawLearners>,
    #[serde(default)]
    learner: BTreeMap<String, Spanned<RawLearner>>,
    #[serde(default)]
    dataset: BTreeMap<String, Spanned<RawDataset>>,
    #[serde(default)]
    limits: Option<RawLimits>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSite {
    name: Spanned<String>,
    #[serde(default)]
    listen: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSubmitter {
    name: String,
    peer_id: Spanned<String>,
    #[serde(default)]
    role: Option<Spanned<String>>,
    #[serde(default)]
    workflows: Option<Vec<Spanned<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearners {
    builtin: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearner {
    command: Spanned<Vec<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    path: Spanned<String>,
    #[serde(default)]
    test: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default = "default_concurrent")]
    concurrent_jobs: Spanned<usize>,
    #[serde(default = "default_max_model")]
    max_model_bytes: u64,
    #[serde(default = "default_job_disk")]
    job_disk_bytes: u64,
    #[serde(default)]
    max_upload_bytes_per_sec: Option<Spanned<u64>>,
    #[serde(default)]
    stream_above_bytes: Option<u64>,
}

fn default_concurrent() -> Spanned<usize> {
    Spanned::new(0..0, 4)
}
fn default_max_model() -> u64 {
    4 << 30
}
fn default_job_disk() -> u64 {
    16 << 30
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            concurrent_jobs: 4,
            max_model_bytes: default_max_model(),
            job_disk_bytes: default_job_disk(),
            max_upload_bytes_per_sec: None,
            stream_above_bytes: None,
        }
    }
}

impl Policy {
    /// Reads and checks `site.toml`; relative dataset paths are taken from its directory.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path).map_err(|e| PolicyError {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Checks the text of `site.toml` (read from `path`).
    pub fn parse(path: &Path, text: &str) -> Result<Self, PolicyError> {
        let fail = |at: usize, field: &str, msg: String| PolicyError {
            path: path.to_owned(),
            message: format!("line {}: field `{field}`: {msg}", line_of(text, at)),
        };
        let raw: Raw = toml::from_str(text).map_err(|e| PolicyError {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let name = raw.site.name.get_ref().trim().to_owned();
        if name.is_empty() {
            return Err(fail(raw.site.name.span().start, "site.name", "is empty".into()));
        }
        let listen = raw
            .site
            .listen
            .iter()
            .map(|a| {
                a.get_ref()
                    .parse::<Multiaddr>()
                    .map_err(|e| fail(a.span().start, "site.listen", format!("{:?}: {e}", a.get_ref())))
            })
            .collect::<Result<_, _>>()?;
        let mut submitters: Vec<Submitter> = Vec::new();
        for s in &raw.submitter {
            let at = s.span().start;
            let s = s.get_ref();
            let peer_id = s
                .peer_id
                .get_ref()
                .parse::<PeerId>()
                .map_err(|e| fail(s.peer_id.span().start, "submitter.peer_id", format!("{e}")))?;
            if submitters.iter().any(|o| o.peer_id == peer_id) {
                return Err(fail(at, "submitter.peer_id", format!("{peer_id} is listed twice")));
            }
            let role = match s.role.as_ref().map(|r| (r.get_ref().as_str(), r.span().start)) {
                None | Some(("researcher", _)) => Role::Researcher,
                Some(("admin", _)) => Role::Admin,
                Some((other, at)) => {
                    return Err(fail(
                        at,
                        "submitter.role",
                        format!("{other:?} is neither \"researcher\" nor \"admin\""),
                    ));
                }
            };
            let workflows = match &s.workflows {
                None => None,
                Some(w) => {
                    let mut set = BTreeSet::new();
                    for x in w {
                        if !WORKFLOWS.contains(&x.get_ref().as_str()) {
                            return Err(fail(
                                x.span().start,
                                "submitter.workflows",
                                format!("unknown workflow {:?} (known: {})", x.get_ref(), WORKFLOWS.join(", ")),
                            ));
                        }
                        set.insert(x.get_ref().clone());
                    }
                    Some(set)
                }
            };
            submitters.push(Submitter {
                name: s.name.clone(),
                peer_id,
                role,
                workflows,
            });
        }
        let builtin_learners = match &raw.learners {
            None => BUILTIN_LEARNERS.iter().map(|s| (*s).to_owned()).collect(),
            Some(l) => {
                let mut set = BTreeSet::new();
                for b in &l.builtin {
                    if !BUILTIN_LEARNERS.contains(&b.get_ref().as_str()) {
                        return Err(fail(
                            b.span().start,
                            "learners.builtin",
                            format!(
                                "unknown built-in learner {:?} (known: {})",
                                b.get_ref(),
                                BUILTIN_LEARNERS.join(", ")
                            ),
                        ));
                    }
                    set.insert(b.get_ref().clone());
                }
                set
            }
        };
        let mut learners = BTreeMap::new();
        for (name, l) in &raw.learner {
            let field = format!("learner.{name}.command");
            if BUILTIN_LEARNERS.contains(&name.as_str()) {
                return Err(fail(
                    l.span().start,
                    &format!("learner.{name}"),
                    "is the name of a built-in learner".into(),
                ));
            }
            let l = l.get_ref();
            if l.command.get_ref().first().is_none_or(|c| c.trim().is_empty()) {
                return Err(fail(l.command.span().start, &field, "is empty".into()));
            }
            learners.insert(
                name.clone(),
                LocalLearner {
                    command: l.command.get_ref().clone(),
                    env: l.env.clone(),
                },
            );
        }
        let base = path.parent().unwrap_or(Path::new("."));
        let mut datasets = BTreeMap::new();
        for (name, d) in &raw.dataset {
            let file = |p: &Spanned<String>, key: &str| {
                if p.get_ref().trim().is_empty() {
                    return Err(fail(
                        p.span().start,
                        &format!("dataset.{name}.{key}"),
                        "is empty".into(),
                    ));
                }
                Ok(base.join(p.get_ref()))
            };
            let d = d.get_ref();
            let dataset = LocalDataset {
                path: file(&d.path, "path")?,
                test: d.test.as_ref().map(|t| file(t, "test")).transpose()?,
            };
            datasets.insert(name.clone(), dataset);
        }
        let limits = match raw.limits {
            None => Limits::default(),
            Some(l) => {
                if *l.concurrent_jobs.get_ref() == 0 {
                    return Err(fail(
                        l.concurrent_jobs.span().start,
                        "limits.concurrent_jobs",
                        "must be at least 1".into(),
                    ));
                }
                if let Some(r) = l.max_upload_bytes_per_sec.as_ref().filter(|r| *r.get_ref() == 0) {
                    return Err(fail(
                        r.span().start,
                        "limits.max_upload_bytes_per_sec",
                        "must be at least 1 (leave it out for no cap)".into(),
                    ));
                }
                Limits {
                    concurrent_jobs: *l.concurrent_jobs.get_ref(),
                    max_model_bytes: l.max_model_bytes,
                    job_disk_bytes: l.job_disk_bytes,
                    max_upload_bytes_per_sec: l.max_upload_bytes_per_sec.map(|r| r.into_inner()),
                    stream_above_bytes: l.stream_above_bytes,
                }
            }
        };
        Ok(Self {
            name,
            listen,
            submitters,
            builtin_learners,
            learners,
            datasets,
            limits,
        })
    }

    /// Whether this site takes part in a job asking `ask`; the refusal says why.
    pub fn admit(&self, ask: &Ask<'_>) -> Result<(), Refusal> {
        let site = || self.name.clone();
        let s = self
            .submitters
            .iter()
            .find(|s| s.peer_id == ask.submitter)
            .ok_or_else(|| Refusal::NotASubmitter {
                site: site(),
                peer: ask.submitter,
            })?;
        if s.workflows.as_ref().is_some_and(|w| !w.contains(ask.workflow)) {
            return Err(Refusal::Workflow {
                site: site(),
                name: s.name.clone(),
                workflow: ask.workflow.to_owned(),
            });
        }
        if !self.builtin_learners.contains(ask.learner) && !self.learners.contains_key(ask.learner) {
            return Err(Refusal::Learner {
                site: site(),
                learner: ask.learner.to_owned(),
            });
        }
        if let Some(d) = ask.dataset.filter(|d| !self.datasets.contains_key(*d)) {
            return Err(Refusal::Dataset {
                site: site(),
                dataset: d.to_owned(),
            });
        }
        if let Some(bytes) = ask.model_bytes.filter(|&b| b > self.limits.max_model_bytes) {
            return Err(Refusal::ModelTooLarge {
                site: site(),
                bytes,
                max: self.limits.max_model_bytes,
            });
        }
        if let Some(bytes) = ask
            .model_bytes
            .map(|b| b.saturating_mul(ask.models_on_disk))
            .filter(|&b| b > self.limits.job_disk_bytes)
        {
            return Err(Refusal::Disk {
                site: site(),
                bytes,
                max: self.limits.job_disk_bytes,
            });
        }
        if ask.running >= self.limits.concurrent_jobs {
            return Err(Refusal::Busy {
                site: site(),
                running: ask.running,
            });
        }
        Ok(())
    }

    /// The commented `site.toml` that `flare-node init` writes: it names the site and lets
    /// the site's own key submit jobs as an admin; everything else is shown commented out.
    pub fn template(name: &str, me: &PeerId, listen: &[Multiaddr]) -> String {
        let listen: Vec<String> = listen.iter().map(|a| format!("{:?}", a.to_string())).collect();
        format!(
            r#"# flare-node site policy: this site's own rules. A job can never override them.
# Read by `flare-node serve`; see the README's "Run a consortium".

[site]
name = {name:?}                  # this site's member name in the consortium's members.toml
listen = [{listen}]

# Who may submit jobs here (peer ids, as `flare-node init` and `keygen` print them).
# role = "researcher": submit jobs, see and abort its own; "admin": see and abort any job.
[[submitter]]
name = {name:?}
peer_id = "{me}"                 # this site's own key
role = "admin"
# workflows = ["fedavg", "swarm"]   # default: every workflow

# [[submitter]]
# name = "alice"
# peer_id = "12D3KooW..."
# role = "researcher"

# Built-in learners this site runs (default: all of them).
[learners]
builtin = ["add-one", "mlp", "tch-mlp", "tch-cnn", "split"]

# Training code registered on this site: a job names it, never a command.
# [learner.pytorch-cnn]
# command = ["python3", "/opt/flare/train.py"]
# env = {{ CUDA_VISIBLE_DEVICES = "0" }}

# Data on this site: a job says `dataset = "digits"` in its [data] table and each site
# trains on its own rows, which never leave it. CSV, one row per line: the features, then
# the label (the digits learners read 64 features in [0, 1] and labels 0..=9); a first line
# that does not start with a number is a header. Relative paths start at this file.
# `test` (optional): held-out rows the global model is measured on when this site hosts
# the job's controller.
# [dataset.digits]
# path = "data/digits-train.csv"
# test = "data/digits-test.csv"

[limits]
concurrent_jobs = 4
max_model_bytes = 4294967296     # 4 GiB
job_disk_bytes = 17179869184     # 16 GiB
# max_upload_bytes_per_sec = 209715200   # 200 MiB/s: what this site sends as model chunks,
#                                        # to all peers together (default: no cap)
# stream_above_bytes = 536870912         # 512 MiB: larger models live on disk, not in memory
"#,
            listen = listen.join(", ")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(text: &str) -> Result<Policy, String> {
        Policy::parse(Path::new("/site/site.toml"), text).map_err(|e| e.to_string())
    }

    #[test]
    fn the_template_parses_and_admits_the_site_itself() {
        let me = PeerId::random();
        let p = policy(&Policy::template(
            "lab-a",
            &me,
            &["/ip4/127.0.0.1/tcp/4100".parse().expect("addr")],
        ))
        .expect("template");
        assert_eq!(p.name, "lab-a");
        assert_eq!(p.listen.len(), 1);
        assert_eq!(p.submitters[0].role, Role::Admin);
        let ask = Ask {
            submitter: me,
            workflow: "fedavg",
            learner: "mlp",
            dataset: None,
            model_bytes: Some(1000),
            models_on_disk: 5,
            running: 0,
        };
        assert_eq!(p.admit(&ask), Ok(()));
        let stranger = PeerId::random();
        assert!(matches!(
            p.admit(&Ask { submitter: stranger, ..ask.clone() }),
            Err(Refusal::NotASubmitter { peer, .. }) if peer == stranger
        ));
    }

    #[test]
    fn a_job_is_refused_for_each_rule_with_the_reason() {
        let alice = PeerId::random();
        let p = policy(&format!(
            "[site]\nname = \"lab-b\"\n\n[[submitter]]\nname = \"alice\"\npeer_id = \"{alice}\"\nworkflows = [\"fedavg\"]\n\n\
             [learners]\nbuiltin = [\"mlp\"]\n\n[learner.cnn]\ncommand = [\"python3\", \"train.py\"]\n\n\
             [dataset.digits]\npath = \"data/digits.csv\"\ntest = \"/held/out.csv\"\n\n[dataset.xray]\npath = \"xray.csv\"\n\n[limits]\nconcurrent_jobs = 2\nmax_model_bytes = 1000\nmax_upload_bytes_per_sec = 209715200\nstream_above_bytes = 0\n"
        ))
        .expect("policy");
        assert_eq!(p.limits.max_upload_bytes_per_sec, Some(200 << 20));
        assert_eq!(p.limits.stream_above_bytes, Some(0));
        let digits = &p.datasets["digits"];
        assert_eq!(digits.path, Path::new("/site/data/digits.csv"));
        assert_eq!(digits.test.as_deref(), Some(Path::new("/held/out.csv")));
        assert_eq!(p.datasets["xray"].test, None);
        let files = digits.site_data();
        assert_eq!((files.train, files.test), (digits.path.clone(), digits.test.clone()));
        let ok = Ask {
            submitter: alice,
            workflow: "fedavg",
            learner: "cnn",
            dataset: Some("digits"),
            model_bytes: Some(1000),
            models_on_disk: 5,
            running: 1,
        };
        assert_eq!(p.admit(&ok), Ok(()));
        let refused = |a: Ask<'_>| p.admit(&a).expect_err("refused").to_string();
        assert_eq!(
            refused(Ask {
                workflow: "swarm",
                ..ok.clone()
            }),
            "lab-b: submitter alice may not submit swarm jobs here"
        );
        assert_eq!(
            refused(Ask {
                learner: "add-one",
                ..ok.clone()
            }),
            "lab-b: learner \"add-one\" is not registered here"
        );
        assert_eq!(
            refused(Ask {
                dataset: Some("mri"),
                ..ok.clone()
            }),
            "lab-b: no dataset \"mri\" here"
        );
        assert!(
            refused(Ask {
                model_bytes: Some(1001),
                ..ok.clone()
            })
            .contains("over this site's limit of 1000")
        );
        assert!(
            refused(Ask {
                running: 2,
                ..ok.clone()
            })
            .contains("already running 2 jobs")
        );
        assert!(
            refused(Ask {
                models_on_disk: 20_000_000_000,
                ..ok.clone()
            })
            .contains("bytes of disk, over this site's limit of 17179869184")
        );
    }

    #[test]
    fn bad_files_name_the_line_and_field() {
        for (text, says) in [
            ("[site]\nname = \"\"\n", "field `site.name`: is empty"),
            ("[site]\nname = \"a\"\nlisten = [\"nowhere\"]\n", "field `site.listen`"),
            (
                "[site]\nname = \"a\"\n[[submitter]]\nname = \"x\"\npeer_id = \"bad\"\n",
                "field `submitter.peer_id`",
            ),
            (
                "[site]\nname = \"a\"\n[[submitter]]\nname = \"x\"\npeer_id = \"12D3KooWRBy97UB99e3J6hiPesre1MZeuNQvfan4gBziswrRJsNK\"\nrole = \"boss\"\n",
                "neither \"researcher\" nor \"admin\"",
            ),
            (
                "[site]\nname = \"a\"\n[learners]\nbuiltin = [\"magic\"]\n",
                "unknown built-in learner \"magic\"",
            ),
            (
                "[site]\nname = \"a\"\n[learner.mlp]\ncommand = [\"x\"]\n",
                "is the name of a built-in learner",
            ),
            (
                "[site]\nname = \"a\"\n[learner.x]\ncommand = []\n",
                "field `learner.x.command`: is empty",
            ),
            (
                "[site]\nname = \"a\"\n[limits]\nconcurrent_jobs = 0\n",
                "must be at least 1",
            ),
            (
                "[site]\nname = \"a\"\n[limits]\nmax_upload_bytes_per_sec = 0\n",
                "line 4: field `limits.max_upload_bytes_per_sec`: must be at least 1",
            ),
            ("[site]\nname = \"a\"\nsecret = 1\n", "unknown field"),
            (
                "[site]\nname = \"a\"\n[dataset.x]\npath = \"x.csv\"\ntest = \"\"\n",
                "line 5: field `dataset.x.test`: is empty",
            ),
            (
                "[site]\nname = \"a\"\n[dataset.x]\ntest = \"t.csv\"\n",
                "missing field `path`",
            ),
        ] {
            let e = policy(text).expect_err(text);
            assert!(e.contains(says) && e.contains("site.toml"), "{text:?}: {e}");
        }
    }
}
