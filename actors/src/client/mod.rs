//! The Rust Client API: federate an existing training loop by inverting control around the
//! executor.
//!
//! The executor drives a [`Learner`]; training code written as a plain loop wants to drive
//! itself. [`ClientLearner`] is the learner that bridges the two: for each task it hands the
//! global model over a channel to the training code's [`Client`] and waits for the result
//! that code sends back (bounded by a timeout). The training code sees five calls:
//!
//! ```text
//! while let Some(input) = client.receive()? {   // blocks until the next task; None: job over
//!     load input.params, train ...
//!     client.send(FLModel::new(params))?;        // the result goes back to the controller
//! }
//! ```
//! plus [`Client::is_running`] and [`Client::system_info`]. `flare_node::client::init()`
//! starts a node for a topology member with a `ClientLearner` and returns its `Client`;
//! [`Client::attach`] does the same on a [`JobHost`] already running in this process.
//!
//! Validation tasks come through `receive()` too ([`Client::is_evaluate`]): the metrics sent
//! back are the result. Cross-site evaluation's `submit_model` is answered with the last
//! model sent, without involving the training code.
//!
//! With the `torch` feature, [`torch`] converts models to and from `tch` tensors by name.

#[cfg(feature = "torch")]
pub mod torch;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::time::Duration;

use flare_protocols::ctl::{JobId, Value};
use flare_protocols::model::{Model, ParamsType};
use libp2p::PeerId;

use crate::job::JobHost;
use crate::learner::{Learner, TaskContext, TrainOutput};
use crate::lock;

/// How long a [`ClientLearner`] waits for the training code's result by default.
pub const DEFAULT_TASK_TIMEOUT: Duration = Duration::from_secs(3600);

/// A model with what the training code needs around it (NVIDIA FLARE's `FLModel`): what the
/// training loop receives and sends back. The only `FLModel`: on the wire, a task's model
/// travels as a blob reference in [`flare_protocols::ctl::Task`].
#[derive(Clone, Debug, PartialEq)]
pub struct FLModel {
    /// The parameters, by name.
    pub params: Model,
    /// Whether `params` are whole parameters or a difference from the received ones.
    pub params_type: ParamsType,
    /// Named metrics (training loss, validation accuracy, ...).
    pub metrics: BTreeMap<String, f64>,
    /// Anything else; a received model carries the task's name under `task`.
    pub meta: BTreeMap<String, Value>,
    /// Samples behind a training result: its weight in the average.
    pub num_samples: u64,
    /// The round this model belongs to.
    pub current_round: u32,
    /// Rounds in the job (0 when the workflow does not say).
    pub total_rounds: u32,
}

impl FLModel {
    /// A result of full parameters with weight 1 and no metrics; set the fields for more.
    pub fn new(params: Model) -> Self {
        Self {
            params,
            params_type: ParamsType::Full,
            metrics: BTreeMap::new(),
            meta: BTreeMap::new(),
            num_samples: 1,
            current_round: 0,
            total_rounds: 0,
        }
    }

    /// The same model with these metrics (a builder step, so a result fits on one line).
    pub fn with_metrics(mut self, metrics: impl IntoIterator<Item = (String, f64)>) -> Self {
        self.metrics.extend(metrics);
        self
    }

    /// The same model with this aggregation weight.
    pub fn with_samples(mut self, num_samples: u64) -> Self {
        self.num_samples = num_samples;
        self
    }

    /// The task this model was received for (`train`, `validate`), if it was received.
    pub fn task(&self) -> Option<&str> {
        match self.meta.get("task") {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }
}

/// Where the training code stands in the federation, for logs and schedules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SystemInfo {
    /// This member's name.
    pub member: String,
    /// The job.
    pub job: JobId,
    /// Round of the task received last (0 before the first).
    pub round: u32,
    /// Rounds in the job (0 until a task says).
    pub total_rounds: u32,
}

/// Why a Client API call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The node behind the client failed (could not start, join, or run the job).
    #[error("the federated node failed: {0}")]
    Node(String),
    /// `send` without a task to answer (before the first `receive`, or twice for one task).
    #[error("no task to answer: call receive() first, and send() once per task")]
    NothingToAnswer,
    /// The task was given up before the result came (its timeout passed, or the job ended).
    #[error("the task is no longer waiting for a result (timed out or the job ended)")]
    TaskGone,
    /// `init` could not tell which job and member to run.
    #[error("client configuration: {0}")]
    Config(String),
}

/// What goes from the executor's side to the training code.
enum Handoff {
    /// A task's input, and where its result goes.
    Task { input: FLModel, reply: SyncSender<FLModel> },
    /// The job is over (`Some`: with this error).
    End(Option<String>),
}

struct ClientState {
    info: SystemInfo,
    reply: Option<SyncSender<FLModel>>,
    task: Option<String>,
    running: bool,
}

/// The training code's side of the Client API (see the module doc). Blocking calls: use it
/// from the thread that trains, not from async code.
pub struct Client {
    inbox: Mutex<Receiver<Handoff>>,
    state: Mutex<ClientState>,
}

/// A connected [`Client`] and [`ClientLearner`] for `member` of `job`: the learner goes to
/// the executor, the client to the training code. The learner gives up on a task when the
/// training code has not answered it within `task_timeout`.
pub fn client_pair(job: JobId, member: &str, task_timeout: Duration) -> (Client, ClientLearner) {
    let (tx, rx) = channel();
    let client = Client {
        inbox: Mutex::new(rx),
        state: Mutex::new(ClientState {
            info: SystemInfo {
                member: member.to_owned(),
                job,
                round: 0,
                total_rounds: 0,
            },
            reply: None,
            task: None,
            running: true,
        }),
    };
    let learner = ClientLearner {
        tx,
        timeout: task_timeout,
        last: None,
    };
    (client, learner)
}

impl Client {
    /// Joins `job` on a [`JobHost`] running in this process as `member`, taking tasks from
    /// `controller` (`None`: any member, as in swarm jobs); the job must be started by its
    /// controller as usual. `receive` returns `None` once the controller ends the job.
    pub async fn attach(
        host: &JobHost,
        job: JobId,
        controller: Option<PeerId>,
        member: &str,
        task_timeout: Duration,
    ) -> Result<Client, ClientError> {
        let (client, learner) = client_pair(job.clone(), member, task_timeout);
        host.join_as_executor(job, controller, member, Box::new(learner))
            .await
            .map_err(|e| ClientError::Node(format!("starting the executor: {e}")))?;
        Ok(client)
    }

    /// The next task's input model; `Ok(None)` once the job is over. Blocks until a task
    /// comes. A task received earlier and not answered with [`Client::send`] fails.
    pub fn receive(&self) -> Result<Option<FLModel>, ClientError> {
        {
            let mut s = lock(&self.state);
            if !s.running {
                return Ok(None);
            }
            if s.reply.take().is_some() {
                tracing::warn!(task = ?s.task, "a task was received and not answered; it fails");
            }
        }
        let next = lock(&self.inbox).recv();
        let mut s = lock(&self.state);
        match next {
            Ok(Handoff::Task { input, reply }) => {
                s.info.round = input.current_round;
                s.info.total_rounds = input.total_rounds;
                s.task = input.task().map(str::to_owned);
                s.reply = Some(reply);
                Ok(Some(input))
            }
            Ok(Handoff::End(error)) => {
                s.running = false;
                s.task = None;
                error.map_or(Ok(None), |e| Err(ClientError::Node(e)))
            }
            Err(_) => {
                s.running = false;
                s.task = None;
                Ok(None)
            }
        }
    }

    /// Sends the result of the task received last. With [`ParamsType::Diff`], `params` is
    /// added to the received model before it leaves ([`Model::add_diff`], the one DIFF rule).
    pub fn send(&self, output: FLModel) -> Result<(), ClientError> {
        let reply = lock(&self.state).reply.take().ok_or(ClientError::NothingToAnswer)?;
        reply.send(output).map_err(|_| ClientError::TaskGone)
    }

    /// Whether the job may still send tasks (false once `receive` has returned `None`).
    pub fn is_running(&self) -> bool {
        lock(&self.state).running
    }

    /// This member's name, the job, and the round and rounds of the task received last.
    pub fn system_info(&self) -> SystemInfo {
        lock(&self.state).info.clone()
    }

    /// Whether the task received last is a training task.
    pub fn is_train(&self) -> bool {
        lock(&self.state).task.as_deref() == Some("train")
    }

    /// Whether the task received last asks for metrics of the received model (`validate`).
    pub fn is_evaluate(&self) -> bool {
        lock(&self.state).task.as_deref() == Some("validate")
    }
}

/// The executor's side of the Client API: a [`Learner`] that hands each task to the
/// training code's [`Client`] and returns what it sends back.
pub struct ClientLearner {
    tx: Sender<Handoff>,
    timeout: Duration,
    last: Option<Model>,
}

/// Tells a [`Client`] that its job is over, for a driver that runs the job itself (such as
/// `flare_node::client::init`), so `receive` returns even if the executor outlives the job.
pub struct JobEnd {
    tx: Sender<Handoff>,
}

impl JobEnd {
    /// The job ended; `error` says why, if it failed (then `receive` returns it).
    pub fn finish(self, error: Option<String>) {
        let _ = self.tx.send(Handoff::End(error));
    }
}

impl ClientLearner {
    /// A handle that ends the client's job (see [`JobEnd`]).
    pub fn job_end(&self) -> JobEnd {
        JobEnd { tx: self.tx.clone() }
    }

    /// Hands `input` to the training code and waits for its answer.
    fn handoff(&self, input: FLModel) -> Result<FLModel, String> {
        let (reply, answer) = sync_channel(1);
        self.tx
            .send(Handoff::Task { input, reply })
            .map_err(|_| "the training code has stopped taking tasks".to_owned())?;
        answer.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => format!("the training code sent no result within {:?}", self.timeout),
            RecvTimeoutError::Disconnected => "the training code moved on without sending a result".to_owned(),
        })
    }
}

fn input_of(model: Model, ctx: &TaskContext) -> FLModel {
    let total_rounds = match ctx.props.get("total_rounds") {
        Some(Value::Int(n)) => u32::try_from(*n).unwrap_or(0),
        _ => 0,
    };
    FLModel {
        meta: BTreeMap::from([("task".to_owned(), Value::Str(ctx.task.name().to_owned()))]),
        current_round: ctx.round,
        total_rounds,
        ..FLModel::new(model)
    }
}

/// The full parameters of a result: `out` itself, or `out` added to `global` for a
/// difference; either way with the global model's tensors, so aggregation lines up.
fn full_params(global: &Model, out: FLModel) -> Result<Model, String> {
    let same_layout = out.params.len() == global.len()
        && global.iter().all(|(name, g)| {
            out.params
                .get(name)
                .is_some_and(|t| t.dtype() == g.dtype() && t.shape() == g.shape())
        });
    if !same_layout {
        let describe = |m: &Model| -> Vec<String> {
            m.iter()
                .map(|(n, t)| format!("{n} {:?} {:?}", t.dtype(), t.shape()))
                .collect()
        };
        return Err(format!(
            "the model sent back does not match the received one: sent {:?}, received {:?}",
            describe(&out.params),
            describe(global)
        ));
    }
    match out.params_type {
        ParamsType::Full => Ok(out.params),
        ParamsType::Diff => global.add_diff(&out.params).map_err(|e| e.to_string()),
    }
}

impl Learner for ClientLearner {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let out = self.handoff(input_of(global.clone(), ctx))?;
        let (num_samples, metrics) = (out.num_samples, out.metrics.clone());
        let model = full_params(&global, out)?;
        self.last = Some(model.clone());
        Ok(TrainOutput {
            model,
            num_samples,
            metrics,
        })
    }

    /// The metrics the training code sends back for the received model.
    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        Ok(self.handoff(input_of(model.clone(), ctx))?.metrics)
    }

    /// The last trained model the training code sent.
    fn local_model(&self) -> Option<Model> {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::ctl::TaskKind;
    use flare_protocols::model::Tensor;

    fn ctx(task: TaskKind, round: u32) -> TaskContext {
        TaskContext {
            job: JobId("j".into()),
            member: "m".into(),
            task,
            round,
            props: BTreeMap::from([("total_rounds".to_owned(), Value::Int(3))]),
        }
    }

    fn model(v: f32) -> Model {
        Model::from_tensors([("w", Tensor::from_f32(vec![2], &[v, v]).expect("tensor"))])
    }

    #[test]
    fn tasks_go_to_the_training_loop_and_results_come_back() {
        let (client, mut learner) = client_pair(JobId("j".into()), "m", Duration::from_secs(30));
        let trainer = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while let Some(input) = client.receive().expect("receive") {
                seen.push((client.system_info().round, client.is_train(), client.is_evaluate()));
                let w = input.params.f32("w").expect("w");
                let out = if client.is_train() {
                    // A difference of +1: the learner adds it to the received model.
                    let mut d = FLModel::new(model(1.0)).with_samples(7);
                    d.params_type = ParamsType::Diff;
                    d
                } else {
                    FLModel::new(input.params.clone()).with_metrics([("mean".to_owned(), f64::from(w[0]))])
                };
                client.send(out).expect("send");
                assert!(matches!(
                    client.send(FLModel::new(model(0.0))),
                    Err(ClientError::NothingToAnswer)
                ));
            }
            assert!(!client.is_running());
            (seen, client.system_info())
        });
        let out = learner.train(model(2.0), &ctx(TaskKind::Train, 1)).expect("train");
        assert_eq!(out.model, model(3.0));
        assert_eq!(out.num_samples, 7);
        assert_eq!(learner.local_model(), Some(model(3.0)));
        let m = learner
            .validate(&model(5.0), &ctx(TaskKind::Validate, 2))
            .expect("validate");
        assert_eq!(m["mean"], 5.0);
        drop(learner);
        let (seen, info) = trainer.join().expect("trainer");
        assert_eq!(seen, [(1, true, false), (2, false, true)]);
        assert_eq!((info.member.as_str(), info.round, info.total_rounds), ("m", 2, 3));
    }

    #[test]
    fn a_wrong_model_or_no_answer_fails_the_task_not_the_learner() {
        let (client, mut learner) = client_pair(JobId("j".into()), "m", Duration::from_millis(200));
        let end = learner.job_end();
        let trainer = std::thread::spawn(move || {
            let _ = client.receive().expect("first");
            let other = Model::from_tensors([("v", Tensor::from_f32(vec![1], &[0.0]).expect("t"))]);
            client.send(FLModel::new(other)).expect("send");
            // The second task is never answered: it times out.
            let _ = client.receive().expect("second");
            std::thread::sleep(Duration::from_millis(400));
            assert!(matches!(
                client.send(FLModel::new(model(0.0))),
                Err(ClientError::TaskGone)
            ));
            let r = client.receive();
            assert!(matches!(r, Err(ClientError::Node(ref e)) if e == "boom"), "{r:?}");
            assert!(client.receive().expect("after the end").is_none());
        });
        let e = learner
            .train(model(1.0), &ctx(TaskKind::Train, 0))
            .expect_err("wrong layout");
        assert!(e.contains("does not match"), "{e}");
        let e = learner
            .train(model(1.0), &ctx(TaskKind::Train, 1))
            .expect_err("timeout");
        assert!(e.contains("no result within"), "{e}");
        end.finish(Some("boom".into()));
        trainer.join().expect("trainer");
    }
}
