//! One validator per section of a topology file: `[job]` and `[[member]]`, the workflow's own
//! table (`[fedavg]`, `[cyclic]`, `[swarm]`, `[split]`, `[inference]`), `[cross_site]`, `[data]`. Each
//! rule is checked here once, in the order `parse` calls them (so a file with several faults
//! is refused for the first, as before); the `[learner]` section has a file of its own.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use flare_actors::Member;
use libp2p::{Multiaddr, PeerId};
use toml::Spanned;

use super::schema::{
    RawCrossSite, RawCyclic, RawData, RawFedAvg, RawInference, RawJob, RawLearner, RawMember, RawSplit, RawSwarm,
    default_embed_dim,
};
use super::{CyclicOrder, DataSpec, ExternalSpec, Fail, INFERENCE, LearnerSpec, TopologyError, Workflow};

/// The members in file order (with their peer ids and addresses when given), and those
/// whose learner is an external command.
pub(super) type MemberList = (Vec<(String, Option<Member>)>, BTreeMap<String, ExternalSpec>);

/// What the workflow's own table decides.
pub(super) struct WorkflowSection {
    pub(super) workflow: Workflow,
    pub(super) rounds: u32,
    pub(super) min_clients: usize,
    pub(super) round_timeout: Duration,
    pub(super) crash_aggregator_in_round: Option<u32>,
    /// FedAvg's sample of clients per round.
    pub(super) sample: Option<flare_actors::job::Sampling>,
    /// FedAvg's checkpoints that stay.
    pub(super) checkpoints: flare_actors::job::CheckpointPolicy,
    /// FedAvg's clients share the upload of each round's model.
    pub(super) share_upload: bool,
}

/// `job.workflow`: one of the known workflows.
pub(super) fn workflow_kind(job: &RawJob, fail: &Fail<'_>) -> Result<String, TopologyError> {
    let kind = job.workflow.get_ref().as_str();
    if !matches!(kind, "fedavg" | "cyclic" | "swarm" | "split" | INFERENCE) {
        return Err(fail(
            job.workflow.span().start,
            "job.workflow",
            format!("unknown workflow {kind:?} (known: \"fedavg\", \"cyclic\", \"swarm\", \"split\", \"{INFERENCE}\")"),
        ));
    }
    Ok(kind.to_owned())
}

/// `[[member]]`: unique names, parseable peer ids and addresses, non-empty commands, and at
/// least two members.
pub(super) fn members(
    raw: Vec<Spanned<RawMember>>,
    job_at: usize,
    fail: &Fail<'_>,
) -> Result<MemberList, TopologyError> {
    let mut members = Vec::new();
    let mut external = BTreeMap::new();
    for m in raw {
        let at = m.span().start;
        let m = m.into_inner();
        if members.iter().any(|(n, _): &(String, Option<Member>)| *n == m.name) {
            return Err(fail(at, "member.name", format!("member {:?} is listed twice", m.name)));
        }
        let full = match &m.peer_id {
            None => None,
            Some(p) => {
                let peer_id: PeerId = p
                    .get_ref()
                    .parse()
                    .map_err(|e| fail(p.span().start, "member.peer_id", format!("{:?}: {e}", p.get_ref())))?;
                let mut addrs = Vec::new();
                for a in &m.addrs {
                    addrs.push(
                        a.get_ref()
                            .parse::<Multiaddr>()
                            .map_err(|e| fail(a.span().start, "member.addrs", format!("{:?}: {e}", a.get_ref())))?,
                    );
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
        return Err(fail(job_at, "member", "a job needs at least two members".into()));
    }
    Ok((members, external))
}

/// `job.controller`: a member, required by every workflow but swarm, which has none.
pub(super) fn controller(
    kind: &str,
    c: Option<Spanned<String>>,
    members: &[(String, Option<Member>)],
    job_at: usize,
    fail: &Fail<'_>,
) -> Result<Option<String>, TopologyError> {
    match (kind, c) {
        ("swarm", Some(c)) => Err(fail(
            c.span().start,
            "job.controller",
            "a swarm has no controller: each round's aggregator is chosen among the live members".into(),
        )),
        ("swarm", None) => Ok(None),
        (_, None) => Err(fail(
            job_at,
            "job.controller",
            format!("workflow {kind:?} needs a controller member"),
        )),
        (_, Some(c)) => {
            if !members.iter().any(|(m, _)| m == c.get_ref()) {
                return Err(fail(
                    c.span().start,
                    "job.controller",
                    format!("{:?} is not a member", c.get_ref()),
                ));
            }
            Ok(Some(c.into_inner()))
        }
    }
}

/// `job.clients`: members, each once; by default every member but the controller.
pub(super) fn clients(
    c: Option<Spanned<Vec<String>>>,
    members: &[(String, Option<Member>)],
    controller: Option<&String>,
    job_at: usize,
    fail: &Fail<'_>,
) -> Result<Vec<String>, TopologyError> {
    let clients = match c {
        Some(c) => {
            for n in c.get_ref() {
                if !members.iter().any(|(m, _)| m == n) {
                    return Err(fail(c.span().start, "job.clients", format!("{n:?} is not a member")));
                }
            }
            let mut seen = HashSet::new();
            if let Some(n) = c.get_ref().iter().find(|n| !seen.insert(n.as_str())) {
                return Err(fail(c.span().start, "job.clients", format!("{n:?} is listed twice")));
            }
            c.into_inner()
        }
        None => members
            .iter()
            .map(|(n, _)| n.clone())
            .filter(|n| Some(n) != controller)
            .collect(),
    };
    if clients.is_empty() {
        return Err(fail(job_at, "job.clients", "no member trains".into()));
    }
    Ok(clients)
}

/// Exactly the table of the chosen workflow: `tables` gives where each workflow table starts,
/// if present.
pub(super) fn only_its_own_table(
    kind: &str,
    tables: [(&str, Option<usize>); 5],
    fail: &Fail<'_>,
) -> Result<(), TopologyError> {
    for (table, at) in tables {
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
    Ok(())
}

fn rounds(r: &Spanned<u32>, table: &str, fail: &Fail<'_>) -> Result<u32, TopologyError> {
    if *r.get_ref() == 0 {
        Err(fail(
            r.span().start,
            &format!("{table}.rounds"),
            "must be at least 1".into(),
        ))
    } else {
        Ok(*r.get_ref())
    }
}

fn timeout(t: &Spanned<f64>, field: &str, fail: &Fail<'_>) -> Result<Duration, TopologyError> {
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
}

fn min_clients(m: &Spanned<usize>, table: &str, clients: usize, fail: &Fail<'_>) -> Result<usize, TopologyError> {
    let min = *m.get_ref();
    // The rule is FedAvg's own; the file only adds where it stands.
    match flare_actors::job::fedavg::check_min_clients(min, clients) {
        Ok(()) => Ok(min),
        Err(why) => Err(fail(m.span().start, &format!("{table}.min_clients"), why)),
    }
}

/// The workflow tables a file may carry, as read.
pub(super) struct WorkflowTables {
    pub(super) fedavg: Option<Spanned<RawFedAvg>>,
    pub(super) cyclic: Option<Spanned<RawCyclic>>,
    pub(super) swarm: Option<Spanned<RawSwarm>>,
    pub(super) split: Option<Spanned<RawSplit>>,
    pub(super) inference: Option<Spanned<RawInference>>,
}

/// The chosen workflow's own table.
pub(super) fn workflow(
    kind: &str,
    t: WorkflowTables,
    clients: &[String],
    job_at: usize,
    fail: &Fail<'_>,
) -> Result<WorkflowSection, TopologyError> {
    let needs = |table: &str, what: String| fail(job_at, table, what);
    match kind {
        "cyclic" => {
            let c = t
                .cyclic
                .ok_or_else(|| needs("cyclic", "the cyclic workflow needs a [cyclic] table".into()))?;
            cyclic(c.into_inner(), clients, fail)
        }
        "split" => {
            let s = t
                .split
                .ok_or_else(|| needs("split", "the split workflow needs a [split] table".into()))?;
            split(s, clients.len(), fail)
        }
        "swarm" => {
            let s = t
                .swarm
                .ok_or_else(|| needs("swarm", "the swarm workflow needs a [swarm] table".into()))?;
            let s = s.into_inner();
            Ok(WorkflowSection {
                rounds: rounds(&s.rounds, "swarm", fail)?,
                min_clients: min_clients(&s.min_clients, "swarm", clients.len(), fail)?,
                round_timeout: timeout(&s.round_timeout_secs, "swarm.round_timeout_secs", fail)?,
                crash_aggregator_in_round: s.crash_aggregator_in_round,
                sample: None,
                checkpoints: Default::default(),
                share_upload: s.share_upload.unwrap_or(false),
                workflow: Workflow::Swarm,
            })
        }
        _ => {
            let f = t
                .fedavg
                .ok_or_else(|| needs("fedavg", format!("the {kind} workflow needs a [fedavg] table")))?;
            let f = f.into_inner();
            let min = min_clients(&f.min_clients, "fedavg", clients.len(), fail)?;
            let mut section = WorkflowSection {
                rounds: rounds(&f.rounds, "fedavg", fail)?,
                min_clients: min,
                round_timeout: timeout(&f.round_timeout_secs, "fedavg.round_timeout_secs", fail)?,
                crash_aggregator_in_round: None,
                workflow: Workflow::FedAvg,
                sample: super::keeping::sampling(&f, clients.len(), min, fail)?,
                checkpoints: super::keeping::checkpoints(&f, fail)?,
                share_upload: f.share_upload.unwrap_or(false),
            };
            if kind == INFERENCE {
                section.workflow = inference(t.inference, fail)?;
            }
            Ok(section)
        }
    }
}

/// `[cyclic]`: rounds, the task timeout, and a fixed order of clients or a shuffle seed.
fn cyclic(c: RawCyclic, clients: &[String], fail: &Fail<'_>) -> Result<WorkflowSection, TopologyError> {
    let r = rounds(&c.rounds, "cyclic", fail)?;
    let t = timeout(&c.task_timeout_secs, "cyclic.task_timeout_secs", fail)?;
    let order = match (c.order, c.shuffle_seed) {
        (Some(o), Some(_)) => {
            return Err(fail(
                o.span().start,
                "cyclic.order",
                "give either `order` or `shuffle_seed`, not both".into(),
            ));
        }
        (Some(o), None) => {
            let mut seen = HashSet::new();
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
        (None, None) => CyclicOrder::Fixed(clients.to_vec()),
    };
    Ok(WorkflowSection {
        workflow: Workflow::Cyclic(order),
        rounds: r,
        min_clients: 1,
        round_timeout: t,
        crash_aggregator_in_round: None,
        sample: None,
        checkpoints: Default::default(),
        share_upload: false,
    })
}

/// `[split]`: the networks of the parties, epochs and the step timeout.
fn split(s: Spanned<RawSplit>, parties: usize, fail: &Fail<'_>) -> Result<WorkflowSection, TopologyError> {
    let at = s.span().start;
    let s = s.into_inner();
    let r = rounds(&s.epochs, "split", fail)?;
    let t = timeout(&s.step_timeout_secs, "split.step_timeout_secs", fail)?;
    let spec = flare_actors::learner::split::SplitSpec {
        parties,
        bottom: s.bottom,
        top: s.top,
        lr: s.lr,
        batch_size: s.batch_size,
        epochs: r,
        seed: s.seed,
    };
    spec.validate().map_err(|e| fail(at, "split", e.to_string()))?;
    Ok(WorkflowSection {
        workflow: Workflow::Split(spec),
        rounds: r,
        min_clients: parties,
        round_timeout: t,
        crash_aggregator_in_round: None,
        sample: None,
        checkpoints: Default::default(),
        share_upload: false,
    })
}

/// `[inference]` (optional, before FedAvg's table for the head): the frozen network's width.
fn inference(i: Option<Spanned<RawInference>>, fail: &Fail<'_>) -> Result<Workflow, TopologyError> {
    use flare_actors::learner::inference::{FrozenSpec, MAX_EMBED_DIM};
    let i = i.map(Spanned::into_inner).unwrap_or(RawInference {
        embed_dim: default_embed_dim(),
        seed: 0,
    });
    let dim = *i.embed_dim.get_ref();
    if dim == 0 || dim > MAX_EMBED_DIM {
        return Err(fail(
            i.embed_dim.span().start,
            "inference.embed_dim",
            format!("{dim} is not between 1 and {MAX_EMBED_DIM}"),
        ));
    }
    Ok(Workflow::InferenceThenFedAvg(FrozenSpec {
        embed_dim: dim,
        seed: i.seed,
    }))
}

/// `[cross_site]`: after a fedavg or cyclic job only.
pub(super) fn cross_site(
    c: Option<Spanned<RawCrossSite>>,
    kind: &str,
    fail: &Fail<'_>,
) -> Result<Option<Duration>, TopologyError> {
    match c {
        None => Ok(None),
        Some(c) if matches!(kind, "fedavg" | "cyclic") => Ok(Some(timeout(
            &c.get_ref().task_timeout_secs,
            "cross_site.task_timeout_secs",
            fail,
        )?)),
        Some(c) => Err(fail(
            c.span().start,
            "cross_site",
            format!("cross-site evaluation follows a fedavg or cyclic job, not {kind:?}"),
        )),
    }
}

/// `[learner]`: required but for split learning (whose networks are in `[split]`); federated
/// inference trains an MLP head.
/// `learner.registered`: a non-empty name, in a job that gives no member a command of its
/// own (a job names registered learners or commands, not both).
pub(super) fn registered_learner(
    l: Option<&Spanned<RawLearner>>,
    external: &BTreeMap<String, ExternalSpec>,
    fail: &Fail<'_>,
) -> Result<Option<String>, TopologyError> {
    let Some(r) = l.and_then(|l| l.get_ref().registered.as_ref()) else {
        return Ok(None);
    };
    if r.get_ref().trim().is_empty() {
        return Err(fail(r.span().start, "learner.registered", "is empty".into()));
    }
    if let Some(m) = external.keys().next() {
        return Err(fail(
            r.span().start,
            "learner.registered",
            format!(
                "member {m:?} has a command of its own: a job names a registered learner or gives commands, not both"
            ),
        ));
    }
    Ok(Some(r.get_ref().clone()))
}

pub(super) fn learner(
    kind: &str,
    l: Option<Spanned<RawLearner>>,
    job_at: usize,
    fail: &Fail<'_>,
) -> Result<LearnerSpec, TopologyError> {
    match (kind, l) {
        ("split", None) => Ok(LearnerSpec::Split),
        ("split", Some(l)) => Err(fail(
            l.span().start,
            "learner",
            "split learning's networks are set in [split], not [learner]".into(),
        )),
        (_, None) => Err(fail(job_at, "learner", "missing [learner] table".into())),
        (INFERENCE, Some(l)) if l.get_ref().kind.get_ref() != "mlp" => Err(fail(
            l.get_ref().kind.span().start,
            "learner.kind",
            format!(
                "federated inference trains an \"mlp\" head, not {:?}",
                l.get_ref().kind.get_ref()
            ),
        )),
        (_, Some(l)) => super::learner::learner_spec(l.into_inner(), fail),
    }
}

/// `[data]`: how the shipped digits are dealt, or `dataset`, the name under which each site
/// holds its own rows; only learners that read rows take one: the digits learners, and in a
/// job of kind "add-one" the members' own code (`scripts`: members with a `command`, or a
/// registered learner), which is then handed the rows as CSV files.
pub(super) fn data(
    d: Option<RawData>,
    learner: &LearnerSpec,
    scripts: bool,
    fail: &Fail<'_>,
) -> Result<DataSpec, TopologyError> {
    let Some(d) = d else {
        return Ok(DataSpec::default());
    };
    let reads_none = match learner {
        LearnerSpec::AddOne { .. } if !scripts => Some("the \"add-one\" learner"),
        LearnerSpec::Split => Some("split learning (it deals the shipped digits by columns)"),
        LearnerSpec::AddOne { .. } | LearnerSpec::Mlp { .. } | LearnerSpec::Tch { .. } => None,
    };
    let dataset = match d.dataset {
        None => None,
        Some(n) => {
            let at = n.span().start;
            if let Some(who) = reads_none {
                return Err(fail(
                    at,
                    "data.dataset",
                    format!("{who} reads no dataset (\"mlp\", \"tch-mlp\", \"tch-cnn\" and members' own scripts do)"),
                ));
            }
            if n.get_ref().trim().is_empty() {
                return Err(fail(at, "data.dataset", "is empty".into()));
            }
            Some(n.into_inner())
        }
    };
    let deal_to_scripts = matches!(learner, LearnerSpec::AddOne { .. }) && scripts && dataset.is_none();
    Ok(DataSpec {
        alpha: d.alpha,
        seed: d.seed,
        test_fraction: d.test_fraction,
        dataset,
        local: None,
        deal_to_scripts,
    })
}
