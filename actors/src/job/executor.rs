//! The Executor: a ractor actor that runs a job's tasks on this member.
//!
//! A task arrives (routed by the [`super::JobHost`]), the executor fetches its input model from
//! the controller, hands it to the [`Learner`] on a blocking thread, stores the output model
//! as a blob and reports a `TaskResult` to the controller, which then pulls the blob. Tasks run
//! one at a time, in arrival order (the mailbox is the queue).

use std::collections::BTreeMap;
use std::sync::Arc;

use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request, TaskStatus, Value};
use flare_protocols::model::Model;
use flare_protocols::{BlobRef, blob_id::DEFAULT_CHUNK_SIZE};
use libp2p::PeerId;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::Node;
use crate::blob::FetchOptions;
use crate::lock;

/// What a learner knows about the task it runs.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The job.
    pub job: JobId,
    /// This member's name.
    pub member: String,
    /// Task name (`train`, `validate`).
    pub task: String,
    /// Workflow round.
    pub round: u32,
    /// Task parameters.
    pub props: BTreeMap<String, Value>,
}

/// What one training task produced.
#[derive(Clone, Debug)]
pub struct TrainOutput {
    /// The new local model.
    pub model: Model,
    /// Samples it was trained on (its aggregation weight).
    pub num_samples: u64,
    /// Metrics to report (loss, accuracy, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// Local training code behind one interface, so every workflow can drive any learner.
/// Runs on a blocking thread: it may take as long as training takes.
pub trait Learner: Send + 'static {
    /// Trains from `global` and returns the local result.
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String>;

    /// Measures `model` on local validation data.
    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String>;
}

/// Adds 1.0 to every f32 weight: the exact-arithmetic check of every workflow.
#[derive(Clone, Debug)]
pub struct AddOne {
    /// The weight this member reports (its "sample count").
    pub num_samples: u64,
}

impl Learner for AddOne {
    fn train(&mut self, mut global: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        global.map_f32(|v| v + 1.0);
        Ok(TrainOutput {
            model: global,
            num_samples: self.num_samples,
            metrics: BTreeMap::new(),
        })
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        Ok(BTreeMap::new())
    }
}

/// Messages of the executor actor.
pub enum ExecutorMsg {
    /// Run a task for the controller at `from`.
    Run {
        /// The job.
        job: JobId,
        /// The controller's peer.
        from: PeerId,
        /// The task id to answer with.
        task_id: u64,
        /// The task.
        task: super::Task,
    },
}

/// The executor actor (see the module doc).
pub struct Executor;

/// What the executor actor holds.
pub struct ExecutorState {
    node: Arc<Node>,
    member: String,
    learner: Option<Box<dyn Learner>>,
}

/// What the executor actor starts with.
pub struct ExecutorArgs {
    /// The node it runs on.
    pub node: Arc<Node>,
    /// Its member name.
    pub member: String,
    /// Its learner.
    pub learner: Box<dyn Learner>,
}

impl Actor for Executor {
    type Msg = ExecutorMsg;
    type State = ExecutorState;
    type Arguments = ExecutorArgs;

    async fn pre_start(&self, _: ActorRef<Self::Msg>, args: ExecutorArgs) -> Result<ExecutorState, ActorProcessingErr> {
        Ok(ExecutorState {
            node: args.node,
            member: args.member,
            learner: Some(args.learner),
        })
    }

    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        msg: ExecutorMsg,
        state: &mut ExecutorState,
    ) -> Result<(), ActorProcessingErr> {
        let ExecutorMsg::Run {
            job,
            from,
            task_id,
            task,
        } = msg;
        let ctx = TaskContext {
            job: job.clone(),
            member: state.member.clone(),
            task: task.name.clone(),
            round: task.round,
            props: task.props.clone(),
        };
        let span = tracing::info_span!("task", job = %job, round = task.round, task = %task.name, peer = %from);
        let (status, output, metrics, num_samples) = match run(state, &ctx, &task, from).instrument(span.clone()).await
        {
            Ok((output, metrics, n)) => (TaskStatus::Ok, output, metrics, n),
            Err(e) => {
                tracing::warn!(error = %e, "task failed");
                (TaskStatus::Failed, None, BTreeMap::new(), 0)
            }
        };
        let report = CtlRequest {
            job,
            body: Request::TaskResult {
                task_id,
                status,
                output,
                metrics,
                num_samples,
            },
        };
        let reported = state.node.net().request(from, report).instrument(span.clone()).await;
        span.in_scope(|| match reported {
            Ok(CtlResponse::Ack) => {}
            Ok(other) => tracing::warn!(?other, "controller did not take the result"),
            Err(e) => tracing::warn!(error = %e, "cannot report the result"),
        });
        Ok(())
    }
}

type RunOutput = (Option<BlobRef>, BTreeMap<String, f64>, u64);

/// Largest input model an executor accepts (the controller names it; a bound keeps a bad
/// reference from exhausting memory).
pub const MAX_INPUT_MODEL: u64 = 1 << 40;

/// Pulls a model into the store and into memory at once: chunks are copied into the buffer
/// as they arrive (no read back from disk); chunks the store already held are read from it.
async fn fetch_model(node: &Node, blob: BlobRef, from: PeerId) -> Result<Vec<u8>, String> {
    let len = usize::try_from(blob.len).map_err(|_| "input model too large for this machine".to_owned())?;
    let cs = blob.chunk_size as usize;
    let n = blob.chunk_count().map_err(|e| e.to_string())? as usize;
    let buf = Arc::new(std::sync::Mutex::new((vec![0u8; len], vec![false; n])));
    let sink = buf.clone();
    let opts = FetchOptions {
        max_len: MAX_INPUT_MODEL,
        on_chunk: Some(Arc::new(move |i: u64, bytes: &[u8]| {
            let mut b = lock(&sink);
            let at = i as usize * cs;
            if let Some(dst) = b.0.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
                b.1[i as usize] = true;
            }
        })),
        ..FetchOptions::default()
    };
    node.fetch(blob, &[from], &opts)
        .await
        .map_err(|e| format!("fetching the input model: {e}"))?;
    drop(opts);
    let (mut bytes, got) = Arc::try_unwrap(buf)
        .map_err(|_| "input buffer still shared".to_owned())?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || {
        for (i, _) in got.iter().enumerate().filter(|(_, g)| !**g) {
            let chunk = store
                .read_chunk(&blob.id, i as u64)
                .map_err(|e| e.to_string())?
                .ok_or("chunk missing after the fetch")?;
            bytes[i * cs..i * cs + chunk.len()].copy_from_slice(&chunk);
        }
        Ok(bytes)
    })
    .await
    .map_err(|e| e.to_string())?
}

async fn run(
    state: &mut ExecutorState,
    ctx: &TaskContext,
    task: &super::Task,
    from: PeerId,
) -> Result<RunOutput, String> {
    let input = match task.input {
        Some(blob) => {
            let bytes = fetch_model(&state.node, blob, from).await?;
            Some(Model::from_safetensors_vec(bytes).map_err(|e| format!("input model: {e}"))?)
        }
        None => None,
    };
    let mut learner = state.learner.take().ok_or("learner lost by an earlier task")?;
    let ctx2 = ctx.clone();
    let name = task.name.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let r = match (name.as_str(), input) {
            ("train", Some(m)) => learner.train(m, &ctx2).map(Some),
            ("validate", Some(m)) => learner.validate(&m, &ctx2).map(|metrics| {
                Some(TrainOutput {
                    model: Model::new(),
                    num_samples: 0,
                    metrics,
                })
            }),
            (other, _) => Err(format!("unknown task {other:?} or missing input")),
        };
        (learner, r)
    })
    .await;
    let (learner, r) = joined.map_err(|e| format!("learner panicked: {e}"))?;
    state.learner = Some(learner);
    let Some(out) = r? else {
        return Ok((None, BTreeMap::new(), 0));
    };
    if task.name != "train" {
        return Ok((None, out.metrics, 0));
    }
    let store = state.node.store().clone();
    let bytes = out.model.into_safetensors();
    let manifest = tokio::task::spawn_blocking(move || store.import_bytes(&bytes, DEFAULT_CHUNK_SIZE))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("storing the output model: {e}"))?;
    Ok((Some(manifest.blob_ref()), out.metrics, out.num_samples))
}
