//! Topology files: who the members are, which one hosts the controller, which workflow runs
//! with which learner and data. The format is documented in `topologies/README.md`.
//!
//! Errors name the file, the line and the field. `schema` is the file as read, `sections`
//! (and `learner`) check it, one validator per section, and `parse` calls them in order.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flare_actors::{Member, Members};

use schema::Raw;

mod keeping;
mod learner;
mod model;
mod schema;
mod sections;

/// Why a topology file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TopologyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with line and field.
    pub message: String,
}

/// A member whose learner is an external process (e.g. a Python script using the
/// `flare_client` package) instead of the job's built-in learner.
#[derive(Clone, Debug, PartialEq)]
pub struct ExternalSpec {
    /// Program and arguments, run from the node's working directory.
    pub command: Vec<String>,
    /// Extra environment for it (e.g. `PYTHONPATH = "python"`).
    pub env: std::collections::BTreeMap<String, String>,
}

/// The learner every client runs.
#[derive(Clone, Debug, PartialEq)]
pub enum LearnerSpec {
    /// Adds 1.0 to every weight (taking at least `delay` per step: slow training, to place a
    /// fault mid-round in demonstrations and tests).
    AddOne {
        /// Least time per training step.
        delay: Duration,
    },
    /// Split learning's data parties (the networks are set by the workflow).
    Split,
    /// The pure-Rust MLP on the digits data.
    Mlp {
        /// Hidden layer sizes (empty: softmax regression).
        hidden: Vec<usize>,
        /// SGD learning rate.
        lr: f32,
        /// Local epochs per round.
        epochs: u32,
        /// Mini-batch size.
        batch_size: usize,
    },
    /// A `tch` network on the digits data (`tch-mlp`, `tch-cnn`; the `torch` feature).
    Tch {
        /// The network.
        arch: flare_actors::learner::torch::TchArch,
        /// SGD learning rate.
        lr: f64,
        /// Local epochs per round.
        epochs: u32,
        /// Mini-batch size.
        batch_size: usize,
        /// Fine-tune a pretrained base (`finetune = "full" | "lora"`) instead of training
        /// from seeded weights.
        finetune: Option<flare_actors::learner::torch::FineTune>,
        /// Patterns naming the tensors that train and travel (`None`: the method's default).
        trainable: Option<Vec<String>>,
    },
}

/// The initial model of the add-one job: `tensors` f32 tensors of `elements` values, or the
/// tensors of a safetensors `file`.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Number of tensors.
    pub tensors: usize,
    /// Elements per tensor.
    pub elements: usize,
    /// Seed of the values (the `mlp` learner's weights too).
    pub seed: u64,
    /// `file = "..."`: the initial model is this file's tensors (then `tensors`, `elements`
    /// and `seed` do not apply).
    pub file: Option<ModelFile>,
    /// `from = "MEMBER"`: the initial model is what that client's learner gives before
    /// round 0 (its script's network); known only when the job runs.
    pub from: Option<String>,
}

/// A model file a topology names (`[model] file`), checked when the topology was read.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelFile {
    /// Where it is (the topology file's directory joined with the name given): it may differ
    /// per member, so [`Topology::spec_hash`] leaves it out.
    pub path: PathBuf,
    /// Hash of its bytes: two members whose files differ do not run the same job.
    pub hash: [u8; 32],
}

/// Which data the members learn from: a seeded deal of the shipped digits (`sim`, `run`), or
/// a dataset each site holds under a name (a job submitted to standing sites).
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// Dirichlet concentration of the label split (small: very non-IID).
    pub alpha: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Share of the data held out as the common test set.
    pub test_fraction: f64,
    /// `dataset = "NAME"`: each site trains on its own rows registered under this name in its
    /// policy (`[dataset.NAME]`), instead of a deal of the shipped digits; no site sees
    /// another's rows.
    pub dataset: Option<String>,
    /// This site's files of `dataset`. Only a site sets it, from its own policy, when it runs
    /// its part of a job (a job file cannot: it names data, never a path); it differs per site,
    /// so [`Topology::spec_hash`] leaves it out.
    pub local: Option<SiteData>,
    /// A job of kind "add-one" whose members run their own code has a `[data]` table: the
    /// shipped digits are dealt to those members as CSV files (`DIGITS_CSV`, and the common
    /// test rows as `DIGITS_TEST_CSV`).
    pub deal_to_scripts: bool,
}

/// Where one site keeps the rows of a named dataset (from its `[dataset.NAME]`).
#[derive(Clone, Debug, PartialEq)]
pub struct SiteData {
    /// The rows its member trains on (and cuts its validation rows from): a CSV file.
    pub train: PathBuf,
    /// Held-out rows the global model is measured on, when this site has some (what the
    /// controller's site reports as the global metrics).
    pub test: Option<PathBuf>,
}

/// How the model goes round the members of a cyclic job.
#[derive(Clone, Debug, PartialEq)]
pub enum CyclicOrder {
    /// The same order every round.
    Fixed(Vec<String>),
    /// The clients shuffled afresh each round, from this seed and the round number.
    Shuffled(u64),
}

/// Which way the members collaborate.
#[derive(Clone, Debug, PartialEq)]
pub enum Workflow {
    /// Server-centric FedAvg: the controller averages the clients' results each round.
    FedAvg,
    /// Cyclic weight transfer: the model visits the clients one after another, each
    /// handing it to the next directly.
    Cyclic(CyclicOrder),
    /// Swarm learning: no fixed controller; each round's aggregator is chosen from the
    /// live members, and another takes over if it dies.
    Swarm,
    /// Split learning: the controller holds the labels and the top of the network, the
    /// clients (in order) hold bands of feature columns and the bottoms.
    Split(flare_actors::learner::split::SplitSpec),
    /// Federated inference, then FedAvg: each client runs the frozen network over its own
    /// data and keeps the embeddings; FedAvg then trains an MLP head on them.
    InferenceThenFedAvg(flare_actors::learner::inference::FrozenSpec),
}

impl Workflow {
    /// The name used in topology files and summaries.
    pub fn name(&self) -> &'static str {
        match self {
            Workflow::FedAvg => "fedavg",
            Workflow::Cyclic(_) => "cyclic",
            Workflow::Swarm => "swarm",
            Workflow::Split(_) => "split",
            Workflow::InferenceThenFedAvg(_) => INFERENCE,
        }
    }
}

/// A parsed, checked topology.
#[derive(Clone, Debug)]
pub struct Topology {
    /// The file it came from.
    pub path: PathBuf,
    /// Job name.
    pub job: String,
    /// Members, in file order: (name, peer id and addresses when given).
    pub members: Vec<(String, Option<Member>)>,
    /// Members whose learner is an external process, by name.
    pub external: std::collections::BTreeMap<String, ExternalSpec>,
    /// The member that hosts the controller (none in a swarm: every member takes turns).
    pub controller: Option<String>,
    /// The members that train (the controller's member too when it is listed).
    pub clients: Vec<String>,
    /// The workflow.
    pub workflow: Workflow,
    /// Rounds to run.
    pub rounds: u32,
    /// Fewest results a round may finish with (cyclic: 1, a round needs one visit).
    pub min_clients: usize,
    /// How long a round waits (cyclic: how long one member's turn may take).
    pub round_timeout: Duration,
    /// After training, evaluate every member's model and the final one on every member's
    /// validation data, with this timeout per task.
    pub cross_site: Option<Duration>,
    /// Swarm fault injection (honoured by `sim`): the aggregator of this round drops off
    /// the network right after sending its tasks, to show the failover.
    pub crash_aggregator_in_round: Option<u32>,
    /// FedAvg: the seeded sample of clients each round asks (none: every client).
    pub sample: Option<flare_actors::job::Sampling>,
    /// FedAvg and swarm: the members pulling a round's model share the upload
    /// (`share_upload = true`), so its source sends about one model a round.
    pub share_upload: bool,
    /// FedAvg: which checkpoints stay in the controller's checkpoint directory.
    pub checkpoints: flare_actors::job::CheckpointPolicy,
    /// The learner.
    pub learner: LearnerSpec,
    /// The add-one initial model.
    pub model: ModelSpec,
    /// The data split.
    pub data: DataSpec,
    /// `[learner] registered`: the name of a learner each site registered in its policy
    /// (`[learner.NAME] command = [...]`); a job names it, never a command.
    pub registered_learner: Option<String>,
    /// The command this site runs for the registered learner: set by a standing site from
    /// its own policy, never by a job file, and left out of [`Self::spec_hash`].
    pub site_learner: Option<ExternalSpec>,
}

/// The federated-inference workflow's name.
pub(super) const INFERENCE: &str = "inference-then-fedavg";

/// The line (from 1) of byte offset `at` in `text`: how every file this binary reads names
/// where a fault is.
pub(crate) fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes().iter().take(at).filter(|&&b| b == b'\n').count() + 1
}

/// Builds the error for a field at a byte offset of the file: every validator reports
/// through one, so every message names the file, the line and the field alike.
type Fail<'a> = dyn Fn(usize, &str, String) -> TopologyError + 'a;

impl Topology {
    /// Reads and checks a topology file. A model file it names (`[model] file`) is read from
    /// the topology file's directory.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        let dir = path.parent().unwrap_or(Path::new(""));
        Self::parse_in(path, &text, Some(dir))
    }

    /// Parses and checks topology text (`path` names it in errors). The text has no directory
    /// of its own (a job submitted to standing sites), so it cannot name a model file.
    pub fn parse(path: &Path, text: &str) -> Result<Self, TopologyError> {
        Self::parse_in(path, text, None)
    }

    /// Parses and checks topology text whose files (`[model] file`) are in `dir`, if any.
    fn parse_in(path: &Path, text: &str, dir: Option<&Path>) -> Result<Self, TopologyError> {
        let fail = |at: usize, field: &str, msg: String| TopologyError {
            path: path.to_owned(),
            message: format!("line {}: field `{field}`: {msg}", line_of(text, at)),
        };
        let raw: Raw = toml::from_str(text).map_err(|e| TopologyError {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let job_at = raw.job.span().start;
        let job = raw.job.into_inner();
        let kind = sections::workflow_kind(&job, &fail)?;
        let (members, external) = sections::members(raw.member, job_at, &fail)?;
        let controller = sections::controller(&kind, job.controller, &members, job_at, &fail)?;
        let clients = sections::clients(job.clients, &members, controller.as_ref(), job_at, &fail)?;
        sections::only_its_own_table(
            &kind,
            [
                ("fedavg", raw.fedavg.as_ref().map(|t| t.span().start)),
                ("cyclic", raw.cyclic.as_ref().map(|t| t.span().start)),
                ("swarm", raw.swarm.as_ref().map(|t| t.span().start)),
                ("split", raw.split.as_ref().map(|t| t.span().start)),
                ("inference", raw.inference.as_ref().map(|t| t.span().start)),
            ],
            &fail,
        )?;
        let tables = sections::WorkflowTables {
            fedavg: raw.fedavg,
            cyclic: raw.cyclic,
            swarm: raw.swarm,
            split: raw.split,
            inference: raw.inference,
        };
        let section = sections::workflow(&kind, tables, &clients, job_at, &fail)?;
        let cross_site = sections::cross_site(raw.cross_site, &kind, &fail)?;
        let registered_learner = sections::registered_learner(raw.learner.as_ref(), &external, &fail)?;
        let learner = sections::learner(&kind, raw.learner, job_at, &fail)?;
        let scripts = !external.is_empty() || registered_learner.is_some();
        let data = sections::data(raw.data, &learner, scripts, &fail)?;
        let givers = model::Givers {
            clients: &clients,
            external: &external,
            registered: registered_learner.is_some(),
        };
        let model = model::model(raw.model, &learner, &givers, dir, &fail)?;
        Ok(Self {
            path: path.to_owned(),
            job: job.name,
            members,
            external,
            controller,
            clients,
            workflow: section.workflow,
            rounds: section.rounds,
            min_clients: section.min_clients,
            round_timeout: section.round_timeout,
            cross_site,
            crash_aggregator_in_round: section.crash_aggregator_in_round,
            sample: section.sample,
            share_upload: section.share_upload,
            checkpoints: section.checkpoints,
            learner,
            model,
            data,
            registered_learner,
            site_learner: None,
        })
    }

    /// A hash of everything that defines the job (not the members' addresses, nor where each
    /// site keeps its rows), exchanged at `Join` so a member can tell that it runs the same job
    /// as its controller.
    pub fn spec_hash(&self) -> [u8; 32] {
        let data = DataSpec {
            local: None,
            ..self.data.clone()
        };
        // The model file's bytes are part of the job, not where each member keeps it.
        let model = ModelSpec {
            file: self.model.file.as_ref().map(|f| ModelFile {
                path: PathBuf::new(),
                hash: f.hash,
            }),
            ..self.model.clone()
        };
        let spec = format!(
            "{}|{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}|{:?}",
            self.job,
            self.external,
            self.controller,
            self.clients,
            self.workflow,
            self.rounds,
            self.min_clients,
            self.round_timeout,
            self.learner,
            model,
            data,
            self.sample
        ) + &format!("|{:?}", self.registered_learner);
        flare_protocols::ChunkHash::of(spec.as_bytes()).0
    }

    /// The member table for `run`: every member must carry its peer id.
    pub fn member_table(&self) -> Result<Members, TopologyError> {
        let mut out = Vec::new();
        for (name, m) in &self.members {
            out.push(m.clone().ok_or_else(|| TopologyError {
                path: self.path.clone(),
                message: format!("member {name:?} has no `peer_id` (needed to run one member per process)"),
            })?);
        }
        Ok(Members::from_members(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[job]
name = "t"
workflow = "fedavg"
controller = "server"

[fedavg]
rounds = 2
min_clients = 2

[learner]
kind = "add-one"

[[member]]
name = "server"
[[member]]
name = "a"
[[member]]
name = "b"
"#;

    #[test]
    fn parses_a_good_file() {
        let t = Topology::parse(Path::new("t.toml"), GOOD).expect("parse");
        assert_eq!(t.clients, ["a", "b"]);
        assert_eq!(t.learner, LearnerSpec::AddOne { delay: Duration::ZERO });
        assert_eq!(t.round_timeout, Duration::from_secs(120));
    }

    fn err(text: &str) -> String {
        Topology::parse(Path::new("bad.toml"), text)
            .expect_err("bad")
            .to_string()
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e = err(&GOOD.replace("min_clients = 2", "min_clients = 5"));
        assert!(
            e.starts_with("bad.toml") && e.contains("line 9") && e.contains("fedavg.min_clients"),
            "{e}"
        );
        let e = err(&GOOD.replace("controller = \"server\"", "controller = \"nobody\""));
        assert!(e.contains("line 5") && e.contains("job.controller"), "{e}");
        let e = err(&GOOD.replace("kind = \"add-one\"", "kind = \"svm\""));
        assert!(e.contains("line 12") && e.contains("learner.kind"), "{e}");
        let e = err(&GOOD.replace("rounds = 2", "rounds = \"two\""));
        assert!(e.contains("bad.toml") && e.contains("line 8"), "{e}");
        let e = err(&GOOD.replace("name = \"b\"", "name = \"a\""));
        assert!(e.contains("member.name") && e.contains("listed twice"), "{e}");
        let e = err(&GOOD.replace(
            "[[member]]\nname = \"a\"",
            "[[member]]\nname = \"a\"\npeer_id = \"xyz\"",
        ));
        assert!(e.contains("member.peer_id"), "{e}");
    }

    #[test]
    fn a_dataset_is_named_for_the_learners_that_read_rows_and_refused_for_the_others() {
        let mlp = GOOD.replace("kind = \"add-one\"", "kind = \"mlp\"");
        let named = format!("{mlp}\n[data]\ndataset = \"digits\"\n");
        let t = Topology::parse(Path::new("d.toml"), &named).expect("dataset");
        assert_eq!((t.data.dataset.as_deref(), &t.data.local), (Some("digits"), &None));
        let dealt = Topology::parse(Path::new("d.toml"), &mlp).expect("dealt");
        assert_eq!(dealt.data.dataset, None);
        assert_ne!(t.spec_hash(), dealt.spec_hash(), "the dataset is part of the job");
        // Where each site keeps its rows is not: it differs per site.
        let mut here = t.clone();
        here.data.local = Some(SiteData {
            train: "/site/train.csv".into(),
            test: None,
        });
        assert_eq!(here.spec_hash(), t.spec_hash());

        let e = err(&format!("{GOOD}\n[data]\ndataset = \"digits\"\n"));
        assert!(
            e.starts_with("bad.toml: line 22: field `data.dataset`: the \"add-one\" learner reads no dataset"),
            "{e}"
        );
        let e = err(&named.replace("\"digits\"", "\" \""));
        assert!(e.contains("line 22: field `data.dataset`: is empty"), "{e}");
        let e = err(&named.replace("dataset = \"digits\"", "dataset = 3"));
        assert!(e.contains("bad.toml") && e.contains("line 22"), "{e}");
        // A job names data, never a path: only a site fills in where its rows are.
        let e = err(&named.replace("dataset = \"digits\"", "local = \"/etc/passwd\""));
        assert!(e.contains("unknown field `local`"), "{e}");
    }

    #[test]
    fn each_workflow_takes_its_own_table_and_refuses_the_others() {
        let cyclic = GOOD.replace("workflow = \"fedavg\"", "workflow = \"cyclic\"").replace(
            "[fedavg]\nrounds = 2\nmin_clients = 2",
            "[cyclic]\nrounds = 2\norder = [\"b\", \"a\"]",
        );
        let t = Topology::parse(Path::new("c.toml"), &cyclic).expect("cyclic");
        assert_eq!(
            t.workflow,
            Workflow::Cyclic(CyclicOrder::Fixed(vec!["b".into(), "a".into()]))
        );
        let e = err(&cyclic.replace("order = [\"b\", \"a\"]", "order = [\"b\", \"server\"]"));
        assert!(e.contains("cyclic.order") && e.contains("not a client"), "{e}");
        let e = err(&format!("{cyclic}\n[fedavg]\nrounds = 1\nmin_clients = 1\n"));
        assert!(e.contains("[fedavg] table does not apply"), "{e}");

        let swarm = GOOD
            .replace("workflow = \"fedavg\"", "workflow = \"swarm\"")
            .replace("[fedavg]", "[swarm]");
        let e = err(&swarm);
        assert!(e.contains("job.controller") && e.contains("no controller"), "{e}");
        let swarm = swarm.replace("controller = \"server\"\n", "");
        let t = Topology::parse(Path::new("s.toml"), &swarm).expect("swarm");
        assert_eq!((t.workflow, t.controller, t.clients.len()), (Workflow::Swarm, None, 3));
        let e = err(&format!("{swarm}\n[cross_site]\n"));
        assert!(
            e.contains("cross_site") && e.contains("follows a fedavg or cyclic job"),
            "{e}"
        );

        let split = GOOD
            .replace("workflow = \"fedavg\"", "workflow = \"split\"")
            .replace("[fedavg]\nrounds = 2\nmin_clients = 2", "[split]\nepochs = 3");
        let e = err(&split);
        assert!(e.contains("field `learner`") && e.contains("set in [split]"), "{e}");
        let split = split.replace("[learner]\nkind = \"add-one\"\n", "");
        let t = Topology::parse(Path::new("p.toml"), &split).expect("split");
        assert!(matches!(t.workflow, Workflow::Split(ref s) if s.parties == 2 && s.epochs == 3));
        let e = err(&split.replace("epochs = 3", "epochs = 3\nbottom = []"));
        assert!(e.contains("field `split`") && e.contains("cut layer"), "{e}");
        let e = err(&format!("{split}\n[data]\ndataset = \"digits\"\n"));
        assert!(e.contains("data.dataset") && e.contains("split learning"), "{e}");
    }

    #[test]
    fn inference_takes_its_table_and_fedavgs_and_an_mlp_head() {
        let inf = GOOD
            .replace("workflow = \"fedavg\"", "workflow = \"inference-then-fedavg\"")
            .replace("kind = \"add-one\"", "kind = \"mlp\"");
        let t = Topology::parse(Path::new("i.toml"), &inf).expect("defaults");
        let want = flare_actors::learner::inference::FrozenSpec {
            embed_dim: 128,
            seed: 0,
        };
        assert_eq!(t.workflow, Workflow::InferenceThenFedAvg(want));
        assert_eq!(t.workflow.name(), "inference-then-fedavg");
        let with = format!("{inf}\n[inference]\nembed_dim = 64\nseed = 3\n");
        let t = Topology::parse(Path::new("i.toml"), &with).expect("table");
        let want = flare_actors::learner::inference::FrozenSpec { embed_dim: 64, seed: 3 };
        assert_eq!((t.workflow, t.rounds), (Workflow::InferenceThenFedAvg(want), 2));
        let e = err(&with.replace("embed_dim = 64", "embed_dim = 0"));
        assert!(e.contains("inference.embed_dim") && e.contains("line 22"), "{e}");
        let e = err(&inf.replace("kind = \"mlp\"", "kind = \"add-one\""));
        assert!(e.contains("learner.kind") && e.contains("head"), "{e}");
        let e = err(&inf.replace("[fedavg]\nrounds = 2\nmin_clients = 2", ""));
        assert!(e.contains("needs a [fedavg] table"), "{e}");
        let e = err(&format!("{GOOD}\n[inference]\n"));
        assert!(e.contains("[inference] table does not apply"), "{e}");
    }

    #[test]
    fn fine_tuning_options_are_checked_naming_line_and_field() {
        let lora = GOOD.replace(
            "kind = \"add-one\"",
            "kind = \"tch-mlp\"\nhidden = [32]\nfinetune = \"lora\"\nlora_rank = 8",
        );
        match Topology::parse(Path::new("l.toml"), &lora) {
            Ok(t) => assert!(
                cfg!(feature = "torch")
                    && matches!(
                        t.learner,
                        LearnerSpec::Tch {
                            finetune: Some(flare_actors::learner::torch::FineTune::Lora { rank: 8, alpha: 8.0 }),
                            trainable: None,
                            ..
                        }
                    )
            ),
            Err(e) => assert!(
                !cfg!(feature = "torch") && e.to_string().contains("--features torch"),
                "{e}"
            ),
        }
        let e = err(&lora.replace("\"lora\"", "\"qlora\""));
        assert!(
            e.contains("line 14") && e.contains("learner.finetune") && e.contains("\"full\""),
            "{e}"
        );
        let e = err(&lora.replace("lora_rank = 8", "lora_rank = 0"));
        assert!(e.contains("line 15") && e.contains("learner.lora_rank"), "{e}");
        let e = err(&lora.replace("lora_rank = 8", "lora_alpha = -1.0"));
        assert!(e.contains("line 15") && e.contains("learner.lora_alpha"), "{e}");
        let e = err(&lora.replace("\"lora\"", "\"full\""));
        assert!(
            e.contains("line 15") && e.contains("learner.lora_rank") && e.contains("finetune = \"lora\""),
            "{e}"
        );
        let e = err(&lora.replace("lora_rank = 8", "trainable = [\"*.lora_a\", \"fc7.*\"]"));
        assert!(
            e.contains("line 15") && e.contains("learner.trainable") && e.contains("\"fc7.*\" matches no tensor"),
            "{e}"
        );
        let e = err(&lora.replace("lora_rank = 8", "trainable = []"));
        assert!(e.contains("learner.trainable") && e.contains("empty"), "{e}");
        let e = err(&GOOD.replace("kind = \"add-one\"", "kind = \"mlp\"\ntrainable = [\"*\"]"));
        assert!(
            e.contains("line 13") && e.contains("learner.trainable") && e.contains("tch-mlp"),
            "{e}"
        );
    }
}
