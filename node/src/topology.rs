//! Topology files: who the members are, which one hosts the controller, which workflow runs
//! with which learner and data. The format is documented in `topologies/README.md`.
//!
//! Errors name the file, the line and the field.

use std::path::{Path, PathBuf};
use std::time::Duration;

use flare_actors::{Member, Members};
use libp2p::{Multiaddr, PeerId};
use serde::Deserialize;
use toml::Spanned;

/// Why a topology file was refused.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct TopologyError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong, with line and field.
    pub message: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    job: Spanned<RawJob>,
    #[serde(default)]
    fedavg: Option<Spanned<RawFedAvg>>,
    #[serde(default)]
    cyclic: Option<Spanned<RawCyclic>>,
    #[serde(default)]
    swarm: Option<Spanned<RawSwarm>>,
    #[serde(default)]
    learner: Option<Spanned<RawLearner>>,
    #[serde(default)]
    split: Option<Spanned<RawSplit>>,
    #[serde(default)]
    inference: Option<Spanned<RawInference>>,
    #[serde(default)]
    cross_site: Option<Spanned<RawCrossSite>>,
    #[serde(default)]
    model: Option<RawModel>,
    #[serde(default)]
    data: Option<RawData>,
    #[serde(default)]
    member: Vec<Spanned<RawMember>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJob {
    name: String,
    workflow: Spanned<String>,
    #[serde(default)]
    controller: Option<Spanned<String>>,
    #[serde(default)]
    clients: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFedAvg {
    rounds: Spanned<u32>,
    min_clients: Spanned<usize>,
    #[serde(default = "default_timeout")]
    round_timeout_secs: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplit {
    #[serde(default = "default_bottom")]
    bottom: Vec<usize>,
    #[serde(default)]
    top: Vec<usize>,
    #[serde(default = "default_lr")]
    lr: f32,
    #[serde(default = "default_batch")]
    batch_size: usize,
    epochs: Spanned<u32>,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_timeout")]
    step_timeout_secs: Spanned<f64>,
}

fn default_bottom() -> Vec<usize> {
    vec![16]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInference {
    #[serde(default = "default_embed_dim")]
    embed_dim: Spanned<usize>,
    #[serde(default)]
    seed: u64,
}

fn default_embed_dim() -> Spanned<usize> {
    Spanned::new(0..0, 128)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCrossSite {
    #[serde(default = "default_timeout")]
    task_timeout_secs: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSwarm {
    rounds: Spanned<u32>,
    min_clients: Spanned<usize>,
    #[serde(default = "default_timeout")]
    round_timeout_secs: Spanned<f64>,
    #[serde(default)]
    crash_aggregator_in_round: Option<u32>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCyclic {
    rounds: Spanned<u32>,
    #[serde(default)]
    order: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    shuffle_seed: Option<u64>,
    #[serde(default = "default_timeout")]
    task_timeout_secs: Spanned<f64>,
}

fn default_timeout() -> Spanned<f64> {
    Spanned::new(0..0, 120.0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLearner {
    kind: Spanned<String>,
    #[serde(default)]
    hidden: Vec<usize>,
    #[serde(default = "default_lr")]
    lr: f32,
    #[serde(default = "one")]
    epochs: u32,
    #[serde(default = "default_batch")]
    batch_size: usize,
    #[serde(default)]
    delay_secs: Option<Spanned<f64>>,
    #[serde(default = "default_channels")]
    channels: usize,
    #[serde(default)]
    finetune: Option<Spanned<String>>,
    #[serde(default)]
    lora_rank: Option<Spanned<usize>>,
    #[serde(default)]
    lora_alpha: Option<Spanned<f64>>,
    #[serde(default)]
    trainable: Option<Spanned<Vec<String>>>,
}

fn default_channels() -> usize {
    16
}

fn default_lr() -> f32 {
    0.1
}
fn one() -> u32 {
    1
}
fn default_batch() -> usize {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    #[serde(default = "default_tensors")]
    tensors: usize,
    #[serde(default = "default_elements")]
    elements: usize,
    #[serde(default)]
    seed: u64,
}

fn default_tensors() -> usize {
    4
}
fn default_elements() -> usize {
    1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawData {
    #[serde(default = "default_alpha")]
    alpha: f64,
    #[serde(default)]
    seed: u64,
    #[serde(default = "default_test_fraction")]
    test_fraction: f64,
}

fn default_alpha() -> f64 {
    0.5
}
fn default_test_fraction() -> f64 {
    0.2
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMember {
    name: String,
    #[serde(default)]
    peer_id: Option<Spanned<String>>,
    #[serde(default)]
    addrs: Vec<Spanned<String>>,
    #[serde(default)]
    command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
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

/// The initial model of the add-one job: `tensors` f32 tensors of `elements` values.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelSpec {
    /// Number of tensors.
    pub tensors: usize,
    /// Elements per tensor.
    pub elements: usize,
    /// Seed of the values.
    pub seed: u64,
}

/// How the data is dealt to members.
#[derive(Clone, Debug, PartialEq)]
pub struct DataSpec {
    /// Dirichlet concentration of the label split (small: very non-IID).
    pub alpha: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Share of the data held out as the common test set.
    pub test_fraction: f64,
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
    /// The learner.
    pub learner: LearnerSpec,
    /// The add-one initial model.
    pub model: ModelSpec,
    /// The data split.
    pub data: DataSpec,
}

/// The federated-inference workflow's name.
const INFERENCE: &str = "inference-then-fedavg";

fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes().iter().take(at).filter(|&&b| b == b'\n').count() + 1
}

/// The `[learner]` table of a training workflow.
fn learner_spec(
    l: RawLearner,
    fail: &dyn Fn(usize, &str, String) -> TopologyError,
) -> Result<LearnerSpec, TopologyError> {
    if !matches!(l.kind.get_ref().as_str(), "tch-mlp" | "tch-cnn") {
        let set = [
            ("learner.finetune", l.finetune.as_ref().map(|v| v.span().start)),
            ("learner.lora_rank", l.lora_rank.as_ref().map(|v| v.span().start)),
            ("learner.lora_alpha", l.lora_alpha.as_ref().map(|v| v.span().start)),
            ("learner.trainable", l.trainable.as_ref().map(|v| v.span().start)),
        ];
        if let Some((field, Some(at))) = set.into_iter().find(|(_, at)| at.is_some()) {
            return Err(fail(
                at,
                field,
                format!(
                    "fine-tuning is for the \"tch-mlp\" and \"tch-cnn\" learners, not {:?}",
                    l.kind.get_ref()
                ),
            ));
        }
    }
    Ok(match l.kind.get_ref().as_str() {
        "add-one" => LearnerSpec::AddOne {
            delay: match &l.delay_secs {
                None => Duration::ZERO,
                Some(d) if d.get_ref().is_finite() && *d.get_ref() >= 0.0 => Duration::from_secs_f64(*d.get_ref()),
                Some(d) => {
                    return Err(fail(
                        d.span().start,
                        "learner.delay_secs",
                        format!("{} is not a number of seconds >= 0", d.get_ref()),
                    ));
                }
            },
        },
        "mlp" => LearnerSpec::Mlp {
            hidden: l.hidden,
            lr: l.lr,
            epochs: l.epochs,
            batch_size: l.batch_size,
        },
        "tch-mlp" => tch_learner(false, l, fail)?,
        "tch-cnn" => tch_learner(true, l, fail)?,
        other => {
            return Err(fail(
                l.kind.span().start,
                "learner.kind",
                format!("unknown learner {other:?} (known: \"add-one\", \"mlp\", \"tch-mlp\", \"tch-cnn\")"),
            ));
        }
    })
}

/// The `[learner]` table of a `tch` learner: the network, and how it is fine-tuned.
fn tch_learner(
    cnn: bool,
    l: RawLearner,
    fail: &dyn Fn(usize, &str, String) -> TopologyError,
) -> Result<LearnerSpec, TopologyError> {
    use flare_actors::learner::torch::{BaseSpec, FineTune, FineTuneSpec, MAX_LORA_RANK, TchArch, TchSpec};
    let kind = if cnn { "tch-cnn" } else { "tch-mlp" };
    let arch = if cnn {
        TchArch::Cnn { channels: l.channels }
    } else {
        TchArch::Mlp { hidden: l.hidden }
    };
    let finetune = match &l.finetune {
        None => None,
        Some(f) => Some(match f.get_ref().as_str() {
            "full" => FineTune::Full,
            "lora" => {
                let rank = l.lora_rank.as_ref().map_or(4, |r| *r.get_ref());
                if rank == 0 || rank > MAX_LORA_RANK {
                    let at = l.lora_rank.as_ref().map_or(f.span().start, |r| r.span().start);
                    return Err(fail(
                        at,
                        "learner.lora_rank",
                        format!("{rank} is not between 1 and {MAX_LORA_RANK}"),
                    ));
                }
                let alpha = match &l.lora_alpha {
                    None => rank as f64,
                    Some(a) if a.get_ref().is_finite() && *a.get_ref() > 0.0 => *a.get_ref(),
                    Some(a) => {
                        return Err(fail(
                            a.span().start,
                            "learner.lora_alpha",
                            format!("{} is not a number > 0", a.get_ref()),
                        ));
                    }
                };
                FineTune::Lora { rank, alpha }
            }
            other => {
                return Err(fail(
                    f.span().start,
                    "learner.finetune",
                    format!("unknown fine-tuning {other:?} (known: \"full\", \"lora\")"),
                ));
            }
        }),
    };
    let lora = matches!(finetune, Some(FineTune::Lora { .. }));
    for (field, set) in [
        ("learner.lora_rank", l.lora_rank.as_ref().map(|v| v.span().start)),
        ("learner.lora_alpha", l.lora_alpha.as_ref().map(|v| v.span().start)),
    ] {
        if let (false, Some(at)) = (lora, set) {
            return Err(fail(at, field, "LoRA options need finetune = \"lora\"".into()));
        }
    }
    let trainable = l.trainable.map(|t| (t.span().start, t.into_inner()));
    // The patterns must name tensors of this network (the names need no libtorch).
    let probe = TchSpec {
        arch: arch.clone(),
        lr: f64::from(l.lr),
        batch_size: l.batch_size,
        epochs: l.epochs,
        seed: 0,
        finetune: finetune.clone().map(|method| FineTuneSpec {
            method,
            base: BaseSpec::digits_0_to_4(0, 0.2),
        }),
        trainable: trainable.as_ref().map(|(_, t)| t.clone()),
    };
    if let (Some((at, _)), Err(e)) = (&trainable, probe.trainable_names()) {
        return Err(fail(*at, "learner.trainable", e));
    }
    if !cfg!(feature = "torch") {
        return Err(fail(
            l.kind.span().start,
            "learner.kind",
            format!("learner {kind:?} needs a build with `--features torch` (see scripts/install-libtorch.sh)"),
        ));
    }
    Ok(LearnerSpec::Tch {
        arch,
        lr: f64::from(l.lr),
        epochs: l.epochs,
        batch_size: l.batch_size,
        finetune,
        trainable: trainable.map(|(_, t)| t),
    })
}

impl Topology {
    /// Reads and checks a topology file.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Self::parse(path, &text)
    }

    /// Parses and checks topology text (`path` names it in errors).
    pub fn parse(path: &Path, text: &str) -> Result<Self, TopologyError> {
        let fail = |at: usize, field: &str, msg: String| TopologyError {
            path: path.to_owned(),
            message: format!("line {}: field `{field}`: {msg}", line_of(text, at)),
        };
        let raw: Raw = toml::from_str(text).map_err(|e| TopologyError {
            path: path.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        })?;
        let job_span = raw.job.span();
        let job = raw.job.into_inner();
        let workflow_at = job.workflow.span().start;
        let kind = job.workflow.get_ref().as_str();
        if !matches!(kind, "fedavg" | "cyclic" | "swarm" | "split" | INFERENCE) {
            return Err(fail(
                workflow_at,
                "job.workflow",
                format!(
                    "unknown workflow {kind:?} (known: \"fedavg\", \"cyclic\", \"swarm\", \"split\", \"{INFERENCE}\")"
                ),
            ));
        }
        let mut members = Vec::new();
        let mut external = std::collections::BTreeMap::new();
        for m in raw.member {
            let at = m.span().start;
            let m = m.into_inner();
            if members.iter().any(|(n, _): &(String, Option<Member>)| *n == m.name) {
                return Err(fail(at, "member.name", format!("member {:?} is listed twice", m.name)));
            }
            let full =
                match &m.peer_id {
                    None => None,
                    Some(p) => {
                        let peer_id: PeerId = p
                            .get_ref()
                            .parse()
                            .map_err(|e| fail(p.span().start, "member.peer_id", format!("{:?}: {e}", p.get_ref())))?;
                        let mut addrs = Vec::new();
                        for a in &m.addrs {
                            addrs.push(a.get_ref().parse::<Multiaddr>().map_err(|e| {
                                fail(a.span().start, "member.addrs", format!("{:?}: {e}", a.get_ref()))
                            })?);
                        }
                        Some(Member {
                            name: m.name.clone(),
                            peer_id,
                            addrs,
                        })
                    }
                };
            if let Some(c) = &m.command {
                if c.get_ref().is_empty() {
                    return Err(fail(c.span().start, "member.command", "is empty".into()));
                }
                external.insert(
                    m.name.clone(),
                    ExternalSpec {
                        command: c.get_ref().clone(),
                        env: m.env.clone(),
                    },
                );
            }
            members.push((m.name, full));
        }
        if members.len() < 2 {
            return Err(fail(
                job_span.start,
                "member",
                "a job needs at least two members".into(),
            ));
        }
        let known = |n: &str| members.iter().any(|(m, _)| m == n);
        let controller = match (kind, job.controller) {
            ("swarm", Some(c)) => {
                return Err(fail(
                    c.span().start,
                    "job.controller",
                    "a swarm has no controller: each round's aggregator is chosen among the live members".into(),
                ));
            }
            ("swarm", None) => None,
            (_, None) => {
                return Err(fail(
                    job_span.start,
                    "job.controller",
                    format!("workflow {kind:?} needs a controller member"),
                ));
            }
            (_, Some(c)) => {
                if !known(c.get_ref()) {
                    return Err(fail(
                        c.span().start,
                        "job.controller",
                        format!("{:?} is not a member", c.get_ref()),
                    ));
                }
                Some(c.into_inner())
            }
        };
        let clients = match job.clients {
            Some(c) => {
                for n in c.get_ref() {
                    if !known(n) {
                        return Err(fail(c.span().start, "job.clients", format!("{n:?} is not a member")));
                    }
                }
                let mut seen = std::collections::HashSet::new();
                if let Some(n) = c.get_ref().iter().find(|n| !seen.insert(n.as_str())) {
                    return Err(fail(c.span().start, "job.clients", format!("{n:?} is listed twice")));
                }
                c.into_inner()
            }
            None => members
                .iter()
                .map(|(n, _)| n.clone())
                .filter(|n| Some(n) != controller.as_ref())
                .collect(),
        };
        if clients.is_empty() {
            return Err(fail(job_span.start, "job.clients", "no member trains".into()));
        }
        // Exactly the table of the chosen workflow.
        for (table, at) in [
            ("fedavg", raw.fedavg.as_ref().map(|t| t.span().start)),
            ("cyclic", raw.cyclic.as_ref().map(|t| t.span().start)),
            ("swarm", raw.swarm.as_ref().map(|t| t.span().start)),
            ("split", raw.split.as_ref().map(|t| t.span().start)),
            ("inference", raw.inference.as_ref().map(|t| t.span().start)),
        ] {
            // Federated inference takes an [inference] table and FedAvg's for the head.
            let applies = table == kind || (kind == INFERENCE && matches!(table, "fedavg" | "inference"));
            if let Some(at) = at
                && !applies
            {
                return Err(fail(
                    at,
                    table,
                    format!("a [{table}] table does not apply to workflow {kind:?}"),
                ));
            }
        }
        let check_rounds = |r: &Spanned<u32>, table: &str| {
            if *r.get_ref() == 0 {
                Err(fail(
                    r.span().start,
                    &format!("{table}.rounds"),
                    "must be at least 1".into(),
                ))
            } else {
                Ok(*r.get_ref())
            }
        };
        let check_timeout = |t: &Spanned<f64>, field: &str| {
            let v = *t.get_ref();
            if v.is_finite() && v > 0.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(fail(
                    t.span().start,
                    field,
                    format!("{v} is not a positive number of seconds"),
                ))
            }
        };
        let check_min = |m: &Spanned<usize>, table: &str| {
            let min = *m.get_ref();
            // The rule is FedAvg's own; the file only adds where it stands.
            match flare_actors::job::fedavg::check_min_clients(min, clients.len()) {
                Ok(()) => Ok(min),
                Err(why) => Err(fail(m.span().start, &format!("{table}.min_clients"), why)),
            }
        };
        let mut crash = None;
        let (workflow, rounds, min_clients, round_timeout) = match kind {
            "cyclic" => {
                let Some(c) = raw.cyclic else {
                    return Err(fail(
                        job_span.start,
                        "cyclic",
                        "the cyclic workflow needs a [cyclic] table".into(),
                    ));
                };
                let c = c.into_inner();
                let rounds = check_rounds(&c.rounds, "cyclic")?;
                let timeout = check_timeout(&c.task_timeout_secs, "cyclic.task_timeout_secs")?;
                let order = match (c.order, c.shuffle_seed) {
                    (Some(o), Some(_)) => {
                        return Err(fail(
                            o.span().start,
                            "cyclic.order",
                            "give either `order` or `shuffle_seed`, not both".into(),
                        ));
                    }
                    (Some(o), None) => {
                        let mut seen = std::collections::HashSet::new();
                        for n in o.get_ref() {
                            if !clients.contains(n) {
                                return Err(fail(o.span().start, "cyclic.order", format!("{n:?} is not a client")));
                            }
                            if !seen.insert(n.clone()) {
                                return Err(fail(o.span().start, "cyclic.order", format!("{n:?} is listed twice")));
                            }
                        }
                        CyclicOrder::Fixed(o.into_inner())
                    }
                    (None, Some(seed)) => CyclicOrder::Shuffled(seed),
                    (None, None) => CyclicOrder::Fixed(clients.clone()),
                };
                (Workflow::Cyclic(order), rounds, 1, timeout)
            }
            "split" => {
                let Some(t) = raw.split else {
                    return Err(fail(
                        job_span.start,
                        "split",
                        "the split workflow needs a [split] table".into(),
                    ));
                };
                let at = t.span().start;
                let t = t.into_inner();
                let rounds = check_rounds(&t.epochs, "split")?;
                let timeout = check_timeout(&t.step_timeout_secs, "split.step_timeout_secs")?;
                let spec = flare_actors::learner::split::SplitSpec {
                    parties: clients.len(),
                    bottom: t.bottom,
                    top: t.top,
                    lr: t.lr,
                    batch_size: t.batch_size,
                    epochs: rounds,
                    seed: t.seed,
                };
                spec.validate().map_err(|e| fail(at, "split", e.to_string()))?;
                (Workflow::Split(spec), rounds, clients.len(), timeout)
            }
            "swarm" => {
                let Some(f) = raw.swarm else {
                    return Err(fail(
                        job_span.start,
                        "swarm",
                        "the swarm workflow needs a [swarm] table".into(),
                    ));
                };
                let f = f.into_inner();
                let rounds = check_rounds(&f.rounds, "swarm")?;
                let min = check_min(&f.min_clients, "swarm")?;
                let timeout = check_timeout(&f.round_timeout_secs, "swarm.round_timeout_secs")?;
                crash = f.crash_aggregator_in_round;
                (Workflow::Swarm, rounds, min, timeout)
            }
            _ => {
                let Some(f) = raw.fedavg else {
                    return Err(fail(
                        job_span.start,
                        "fedavg",
                        format!("the {kind} workflow needs a [fedavg] table"),
                    ));
                };
                let f = f.into_inner();
                let rounds = check_rounds(&f.rounds, "fedavg")?;
                let min = check_min(&f.min_clients, "fedavg")?;
                let timeout = check_timeout(&f.round_timeout_secs, "fedavg.round_timeout_secs")?;
                if kind != INFERENCE {
                    (Workflow::FedAvg, rounds, min, timeout)
                } else {
                    let i = raw.inference.map(Spanned::into_inner).unwrap_or(RawInference {
                        embed_dim: default_embed_dim(),
                        seed: 0,
                    });
                    let dim = *i.embed_dim.get_ref();
                    if dim == 0 || dim > flare_actors::learner::inference::MAX_EMBED_DIM {
                        return Err(fail(
                            i.embed_dim.span().start,
                            "inference.embed_dim",
                            format!(
                                "{dim} is not between 1 and {}",
                                flare_actors::learner::inference::MAX_EMBED_DIM
                            ),
                        ));
                    }
                    let frozen = flare_actors::learner::inference::FrozenSpec {
                        embed_dim: dim,
                        seed: i.seed,
                    };
                    (Workflow::InferenceThenFedAvg(frozen), rounds, min, timeout)
                }
            }
        };
        let cross_site = match raw.cross_site {
            None => None,
            Some(c) if matches!(kind, "fedavg" | "cyclic") => Some(check_timeout(
                &c.get_ref().task_timeout_secs,
                "cross_site.task_timeout_secs",
            )?),
            Some(c) => {
                return Err(fail(
                    c.span().start,
                    "cross_site",
                    format!("cross-site evaluation follows a fedavg or cyclic job, not {kind:?}"),
                ));
            }
        };
        let learner = match (kind, raw.learner) {
            ("split", None) => LearnerSpec::Split,
            ("split", Some(l)) => {
                return Err(fail(
                    l.span().start,
                    "learner",
                    "split learning's networks are set in [split], not [learner]".into(),
                ));
            }
            (_, None) => return Err(fail(job_span.start, "learner", "missing [learner] table".into())),
            (INFERENCE, Some(l)) if l.get_ref().kind.get_ref() != "mlp" => {
                return Err(fail(
                    l.get_ref().kind.span().start,
                    "learner.kind",
                    format!(
                        "federated inference trains an \"mlp\" head, not {:?}",
                        l.get_ref().kind.get_ref()
                    ),
                ));
            }
            (_, Some(l)) => learner_spec(l.into_inner(), &fail)?,
        };
        let model = raw.model.map_or(
            ModelSpec {
                tensors: default_tensors(),
                elements: default_elements(),
                seed: 0,
            },
            |m| ModelSpec {
                tensors: m.tensors,
                elements: m.elements,
                seed: m.seed,
            },
        );
        let data = raw.data.map_or(
            DataSpec {
                alpha: default_alpha(),
                seed: 0,
                test_fraction: default_test_fraction(),
            },
            |d| DataSpec {
                alpha: d.alpha,
                seed: d.seed,
                test_fraction: d.test_fraction,
            },
        );
        Ok(Self {
            path: path.to_owned(),
            job: job.name,
            members,
            external,
            controller,
            clients,
            workflow,
            rounds,
            min_clients,
            round_timeout,
            cross_site,
            crash_aggregator_in_round: crash,
            learner,
            model,
            data,
        })
    }

    /// A hash of everything that defines the job (not the members' addresses), exchanged at
    /// `Join` so a member can tell that it runs the same job as its controller.
    pub fn spec_hash(&self) -> [u8; 32] {
        let spec = format!(
            "{}|{:?}|{:?}|{:?}|{:?}|{}|{}|{:?}|{:?}|{:?}|{:?}",
            self.job,
            self.external,
            self.controller,
            self.clients,
            self.workflow,
            self.rounds,
            self.min_clients,
            self.round_timeout,
            self.learner,
            self.model,
            self.data
        );
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
