//! The Executor: a ractor actor that runs a job's tasks on this member.
//!
//! A task arrives (routed by the [`super::JobHost`]), the executor fetches its input model from
//! the controller, hands it to the [`Learner`] on a blocking thread, stores the output model
//! as a blob and reports a `TaskResult` to the controller, which then pulls the blob. Tasks run
//! one at a time, in arrival order (the mailbox is the queue).

use std::collections::BTreeMap;
use std::sync::Arc;

use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Request, TaskKind, TaskStatus, Value};
use flare_protocols::model::Model;
use flare_protocols::{BlobId, BlobRef, blob_id::DEFAULT_CHUNK_SIZE};
use libp2p::PeerId;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tracing::Instrument;

use crate::Node;
use crate::blob::{FetchOptions, PendingGuard, PendingOutput};
use crate::learner::arriving::{Arriving, Trained};
use crate::learner::{Learner, TaskContext, TaskReply};
use crate::lock;

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
    /// The blob of the last `Train` output: what a `Submit` task hands over when the
    /// learner keeps no model of its own (no second copy in memory).
    last_output: Option<BlobRef>,
    /// The bytes of the last output model, shared with the store so that whoever pulls the
    /// result soon after the task (the controller, the next member) reads it from memory;
    /// released when the next task needs the memory.
    held_output: Option<HeldOutput>,
    /// What this executor holds in the node's store (see [`Kept`]).
    kept: Kept,
    /// The last output served while it was produced ([`crate::blob::pending`]), until the
    /// next task: its controller may still be taking the last chunks when the result goes.
    streamed: Option<PendingGuard>,
    /// The announcement of `streamed` to its controller, awaited before the result is
    /// reported: a result that came first would have the controller pull the stored copy and
    /// fold again when the announcement came after (a learner faster than one request, as
    /// a controller's own executor can be).
    announcing: Option<tokio::task::JoinHandle<()>>,
}

/// Inputs kept in the store for others to pull from here, and the last output stored: held
/// (see [`crate::BlobStore::retain`]) while the job may still ask for them, released after,
/// so the store does not grow with the rounds. The inputs of the last [`KEPT_INPUTS`] tasks
/// that kept theirs stay (a member passing a model on, or serving a round's model to the
/// others, is asked for it during that task's round or the next); the stored output stays
/// until a newer one replaces it (a `Submit` task may hand it over at the end of the job).
#[derive(Default)]
struct Kept {
    inputs: std::collections::VecDeque<flare_protocols::BlobId>,
    output: Option<flare_protocols::BlobId>,
    /// The learner's starting parameters, once asked ([`TaskKind::InitModel`]), kept for the
    /// job's whole life: every later ask gets the same blob (a swarm's members each ask, and
    /// the learner may have trained since the first).
    initial: Option<BlobRef>,
}

/// Kept inputs held at once (see [`Kept`]).
const KEPT_INPUTS: usize = 2;

impl Kept {
    fn input(&mut self, store: &crate::BlobStore, id: flare_protocols::BlobId) {
        store.retain(&id);
        self.inputs.push_back(id);
        while self.inputs.len() > KEPT_INPUTS {
            if let Some(old) = self.inputs.pop_front() {
                store.release(&old);
            }
        }
    }

    /// The output just stored, with the hold the store took as it stored it (a hold taken
    /// after could come too late: another job's last release of the same content may remove
    /// it in between).
    fn output_held(&mut self, store: &crate::BlobStore, id: flare_protocols::BlobId) {
        if let Some(old) = self.output.replace(id) {
            store.release(&old);
        }
    }

    fn release_all(&mut self, store: &crate::BlobStore) {
        for id in self
            .inputs
            .drain(..)
            .chain(self.output.take())
            .chain(self.initial.take().map(|b| b.id))
        {
            store.release(&id);
        }
    }
}

/// The last output model, in memory.
struct HeldOutput {
    blob: BlobRef,
    bytes: Arc<Vec<u8>>,
    /// Served from these bytes only, never stored ([`super::Task::transient_output`]): gone
    /// from the store once they are reused.
    transient: bool,
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
            last_output: None,
            held_output: None,
            kept: Kept::default(),
            streamed: None,
            announcing: None,
        })
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut ExecutorState) -> Result<(), ActorProcessingErr> {
        // The job is over for this member: what it kept for the job goes.
        let store = state.node.store().clone();
        state.kept.release_all(&store);
        Ok(())
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
            task: task.kind.clone(),
            round: task.round,
            props: task.props.clone(),
        };
        // Named by this member (a sim runs many); the sender's peer id is for DEBUG.
        let span =
            tracing::info_span!("task", job = %job, round = task.round, task = %task.kind, member = %state.member);
        tracing::debug!(parent: &span, from = %from, "task received");
        let (status, out) = match run(state, &ctx, &task, (from, task_id)).instrument(span.clone()).await {
            Ok(out) => (TaskStatus::Ok, out),
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "task failed"));
                let mut out = RunOutput::default();
                out.values.insert("error".into(), Value::Str(e));
                (TaskStatus::Failed, out)
            }
        };
        if let Some(announcing) = state.announcing.take() {
            if status != TaskStatus::Ok {
                // Ends the output, so an announcement still waiting for its first chunk ends.
                state.streamed = None;
            }
            let _ = announcing.await;
        }
        let report = CtlRequest {
            job,
            body: Request::TaskResult {
                task_id,
                status,
                output: out.output,
                metrics: out.metrics,
                num_samples: out.num_samples,
                values: out.values,
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

/// What a task hands back in its result message.
#[derive(Default)]
struct RunOutput {
    output: Option<BlobRef>,
    metrics: BTreeMap<String, f64>,
    num_samples: u64,
    values: BTreeMap<String, Value>,
}

/// Largest input model an executor accepts (the controller names it; a bound keeps a bad
/// reference from exhausting memory).
pub const MAX_INPUT_MODEL: u64 = 1 << 40;

/// Pulls a model into the store and into memory at once: chunks are copied into the buffer
/// as they arrive (no read back from disk); chunks the store already held are read from it.
///
/// `spare` (the last output, when nothing else holds it any more) becomes the buffer if it
/// has about the right size: every byte of it is overwritten, and a model's worth of fresh
/// pages (a tenth of a second per 256 MiB on a small machine) is not faulted in again.
///
/// `keep: false` pulls the chunks through (verified, copied into the buffer) without writing
/// them to the store: for an input that nobody will ask this member for, writing it cost a
/// model's worth of page cache, filled and flushed, every round.
async fn fetch_model(
    node: &Node,
    blob: BlobRef,
    from: &[PeerId],
    spare: Option<Vec<u8>>,
    keep: bool,
) -> Result<Vec<u8>, String> {
    let len = usize::try_from(blob.len).map_err(|_| "input model too large for this machine".to_owned())?;
    let cs = blob.chunk_size as usize;
    blob.chunk_count().map_err(|e| e.to_string())?;
    let bytes = match spare {
        Some(mut v) if v.len() >= len && v.len() - len <= len / 8 => {
            v.truncate(len);
            v
        }
        _ => vec![0u8; len],
    };
    let buf = Arc::new(std::sync::Mutex::new(bytes));
    let sink = buf.clone();
    let opts = FetchOptions {
        max_len: MAX_INPUT_MODEL,
        keep,
        on_chunk: Some(Arc::new(move |i: u64, bytes: &[u8]| {
            let mut b = lock(&sink);
            let at = i as usize * cs;
            if let Some(dst) = b.get_mut(at..at + bytes.len()) {
                dst.copy_from_slice(bytes);
            }
        })),
        ..FetchOptions::default()
    };
    node.fetch(blob, from, &opts)
        .await
        .map_err(|e| format!("fetching the input model: {e}"))?;
    drop(opts);
    // Every chunk came through `on_chunk`, those the store held included.
    Ok(Arc::try_unwrap(buf)
        .map_err(|_| "input buffer still shared".to_owned())?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner()))
}

/// Stores a transient last output after all, before a task that is not a round of training
/// reuses its memory: what comes next (cross-site evaluation, say) may still ask for the
/// member's last model.
async fn keep_transient_output(state: &mut ExecutorState) -> Result<(), String> {
    let Some(h) = state.held_output.as_mut().filter(|h| h.transient) else {
        return Ok(());
    };
    let (store, bytes) = (state.node.store().clone(), h.bytes.clone());
    tokio::task::spawn_blocking(move || store.import_shared_held(bytes, DEFAULT_CHUNK_SIZE, true))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("storing the last output model: {e}"))?;
    h.transient = false;
    let id = h.blob.id;
    state.kept.output_held(state.node.store(), id);
    Ok(())
}

/// Runs one task: its input into memory, the learner on a blocking thread, its output model
/// published for the requester to pull.
async fn run(
    state: &mut ExecutorState,
    ctx: &TaskContext,
    task: &super::Task,
    (from, task_id): (PeerId, u64),
) -> Result<RunOutput, String> {
    let started = std::time::Instant::now();
    if task.input.is_some() && task.kind != TaskKind::Train {
        keep_transient_output(state).await?;
    }
    if let Some(blob) = task
        .input
        .filter(|b| task.kind == TaskKind::Train && state.node.store().streams(b.len))
        && state.learner.as_mut().is_some_and(|l| l.streaming().is_some())
    {
        return train_streaming(state, ctx, task, blob, (from, task_id)).await;
    }
    let input = match task.input {
        Some(blob) => {
            let model = input_model(state, task, blob, from).await?;
            tracing::debug!(secs = started.elapsed().as_secs_f64(), "input model in memory");
            Some(model)
        }
        None => None,
    };
    if let (TaskKind::InitModel, Some(initial)) = (&task.kind, state.kept.initial) {
        return Ok(RunOutput {
            output: Some(initial),
            ..RunOutput::default()
        });
    }
    if task.kind == TaskKind::Submit {
        let learner = state.learner.as_ref().ok_or("learner lost by an earlier task")?;
        if learner.local_model().is_none() {
            let output = state.last_output.ok_or("this member has no local model to submit")?;
            return Ok(RunOutput {
                output: Some(output),
                ..RunOutput::default()
            });
        }
    }
    let mut learner = state.learner.take().ok_or("learner lost by an earlier task")?;
    let ctx2 = ctx.clone();
    let joined = tokio::task::spawn_blocking(move || {
        let r = dispatch(learner.as_mut(), &ctx2, input);
        (learner, r)
    })
    .await;
    let (learner, r) = joined.map_err(|e| format!("learner panicked: {e}"))?;
    state.learner = Some(learner);
    let reply = r?;
    tracing::debug!(secs = started.elapsed().as_secs_f64(), "learner done");
    let output = match reply.model {
        Some(model) => {
            let blob = publish_output(state, model, task.transient_output).await?;
            tracing::debug!(
                secs = started.elapsed().as_secs_f64(),
                transient = task.transient_output,
                "output model published"
            );
            Some(blob)
        }
        None => None,
    };
    if task.kind == TaskKind::Train && output.is_some() {
        state.last_output = output;
    }
    if let (TaskKind::InitModel, Some(blob)) = (&task.kind, output) {
        // A hold of its own: the output's is let go when the next output replaces it.
        state.node.store().retain(&blob.id);
        state.kept.initial = Some(blob);
    }
    Ok(RunOutput {
        output,
        metrics: reply.metrics,
        num_samples: reply.num_samples,
        values: reply.values,
    })
}

/// A `train` task whose model is too large for memory ([`crate::BlobStore::streams`]), run by
/// a learner that trains tensor by tensor ([`crate::learner::TensorStream`]): the learner runs
/// over the input as it arrives, into a scratch file that becomes the output blob, hashed as
/// it was written ([`crate::learner::arriving`]; the input goes into the store as well when
/// others may pull it from here); an input that is this member's last result is updated in
/// place instead. Memory: the largest tensor and the transfer's window, whatever the model's
/// size.
async fn train_streaming(
    state: &mut ExecutorState,
    ctx: &TaskContext,
    task: &super::Task,
    blob: BlobRef,
    (from, task_id): (PeerId, u64),
) -> Result<RunOutput, String> {
    let started = std::time::Instant::now();
    state.held_output = None;
    state.streamed = None;
    let store = state.node.store().clone();
    // As in `input_model`: an input others may pull from here is kept in the store.
    let shared = !task.input_shares.is_empty();
    let keep = !task.input_from.is_empty() || shared;
    let sources = match task.input_from.is_empty() {
        true => vec![from],
        false => task.input_from.clone(),
    };
    // A result pulled once, by its controller during its round (a FedAvg round's), is needed
    // no more: it goes before the next is written, so a member's disk holds one model. When
    // it is this task's input too (every add-one result is), its file becomes the scratch.
    let mut reused = None;
    if task.transient_output
        && let Some(old) = state.kept.output.take()
    {
        if state.last_output.is_some_and(|b| b.id == old) {
            state.last_output = None;
        }
        if old == blob.id && !keep {
            reused = store.take_as_scratch(&old);
        }
        if reused.is_none() {
            store.release(&old);
        }
    }
    let mut learner = state.learner.take().ok_or("learner lost by an earlier task")?;
    // Its output goes to the controller as it comes out of the learner, where the controller
    // asked and the weight is known ahead.
    let ahead = learner.streaming().and_then(|s| s.samples_ahead());
    let output = match ahead {
        Some(samples) if task.stream_output && blob.chunk_size == DEFAULT_CHUNK_SIZE => {
            let guard = state.node.pending_outputs().register(PendingOutput::new(BlobRef {
                id: BlobId(rand::random()),
                ..blob
            }));
            state.announcing = Some(announce_streaming(
                &state.node,
                ctx,
                guard.output().clone(),
                (from, task_id),
                samples,
            ));
            let out = guard.output().clone();
            state.streamed = Some(guard);
            Some(out)
        }
        _ => None,
    };
    let trained = match reused {
        Some(file) => {
            tracing::debug!("the input is this member's last result: updated in place");
            // Chunk by chunk, as if it arrived: read past the page cache, trained, hashed
            // and written back in place, and streamed.
            let arriving = match Arriving::new(learner, ctx.clone(), file, blob, output) {
                Ok(a) => a,
                Err((learner, e)) => {
                    state.learner = Some(learner);
                    return Err(e);
                }
            };
            tokio::task::spawn_blocking(move || {
                arriving.feed_from_file();
                arriving.finish()
            })
            .await
            .map_err(|e| format!("learner panicked: {e}"))?
        }
        None => {
            let file = store
                .scratch(blob.len)
                .map_err(|e| format!("a scratch file for the input model: {e}"))?;
            if keep {
                state.kept.input(&store, blob.id);
            }
            // The learner runs over the model as it arrives (`keep`: it is stored as well,
            // for the peers that pull it from here).
            let arriving = match Arriving::new(learner, ctx.clone(), file, blob, output) {
                Ok(a) => Arc::new(a),
                Err((learner, e)) => {
                    state.learner = Some(learner);
                    return Err(e);
                }
            };
            let feed = arriving.clone();
            let opts = FetchOptions {
                max_len: MAX_INPUT_MODEL,
                keep,
                on_chunk: Some(Arc::new(move |i: u64, bytes: &[u8]| feed.chunk(i, bytes))),
                ..FetchOptions::default()
            };
            let fetched = match shared {
                true => state.node.fetch_shared(blob, &sources, &task.input_shares, &opts).await,
                false => state.node.fetch(blob, &sources, &opts).await,
            };
            drop(opts);
            let Ok(arriving) = Arc::try_unwrap(arriving) else {
                return Err("internal error: the input model's chunks still being handed over".into());
            };
            if let Err(e) = fetched {
                state.learner = Some(arriving.into_learner());
                return Err(format!("fetching the input model: {e}"));
            }
            tracing::debug!(
                secs = started.elapsed().as_secs_f64(),
                "input model in, trained as it came"
            );
            // A panic loses the learner: later tasks say so.
            tokio::task::spawn_blocking(move || arriving.finish())
                .await
                .map_err(|e| format!("learner panicked: {e}"))?
        }
    };
    let (learner, r) = trained;
    state.learner = Some(learner);
    let Trained {
        file,
        hashes,
        samples: num_samples,
        metrics,
    } = r?;
    // Outputs are cut in the default chunks: hashes taken in the input's other chunks do not
    // name it, and it is hashed from the file instead.
    let manifest = tokio::task::spawn_blocking(move || match hashes {
        Some((cs, hashes)) if cs == DEFAULT_CHUNK_SIZE => store.adopt_hashed(file, cs, hashes),
        _ => store.adopt_held(file, DEFAULT_CHUNK_SIZE),
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("storing the output model: {e}"))?;
    let output = manifest.blob_ref();
    state.kept.output_held(state.node.store(), output.id);
    state.last_output = Some(output);
    tracing::debug!(secs = started.elapsed().as_secs_f64(), "output model stored, streamed");
    Ok(RunOutput {
        output: Some(output),
        metrics,
        num_samples,
        values: BTreeMap::new(),
    })
}

/// Tells the controller, once the learner has produced the first chunk of `output`, that it
/// may pull it now ([`Request::TaskStreaming`]); nothing when the learner cannot go chunk by
/// chunk (the output is abandoned before its first chunk) or the controller does not take
/// the word (it pulls the output after the result, as always). The handle ends with the
/// word's answer.
fn announce_streaming(
    node: &Arc<Node>,
    ctx: &TaskContext,
    output: Arc<PendingOutput>,
    (from, task_id): (PeerId, u64),
    num_samples: u64,
) -> tokio::task::JoinHandle<()> {
    let (node, job) = (node.clone(), ctx.job.clone());
    tokio::spawn(
        async move {
            if !output.started().await {
                return;
            }
            let word = CtlRequest {
                job,
                body: Request::TaskStreaming {
                    task_id,
                    output: output.blob(),
                    num_samples,
                },
            };
            match node.net().request(from, word).await {
                Ok(CtlResponse::Ack) => {
                    tracing::debug!(task = task_id, "output streamed to the controller as it is made")
                }
                Ok(other) => {
                    tracing::debug!(?other, "the controller did not take the streamed output");
                    output.abandon();
                }
                Err(e) => {
                    tracing::debug!(error = %e, "cannot announce the streamed output");
                    output.abandon();
                }
            }
        }
        .instrument(tracing::Span::current()),
    )
}

/// What the learner is asked, by the task's kind.
fn dispatch(learner: &mut dyn Learner, ctx: &TaskContext, input: Option<Model>) -> Result<TaskReply, String> {
    match (&ctx.task, input) {
        (TaskKind::Train, Some(m)) => learner.train(m, ctx).map(|out| TaskReply {
            model: Some(out.model),
            num_samples: out.num_samples,
            metrics: out.metrics,
            values: BTreeMap::new(),
        }),
        (TaskKind::Train | TaskKind::Validate, None) => Err(format!("task {:?} needs an input model", ctx.task.name())),
        (TaskKind::Validate, Some(m)) => learner.validate(&m, ctx).map(|metrics| TaskReply {
            metrics,
            ..TaskReply::default()
        }),
        (TaskKind::Submit, _) => match learner.local_model() {
            Some(model) => Ok(TaskReply {
                model: Some(model),
                ..TaskReply::default()
            }),
            None => Err("this member has no local model to submit".into()),
        },
        (TaskKind::Embed | TaskKind::SplitForward(_) | TaskKind::SplitBackward(_), input) => {
            learner.run_task(input, ctx)
        }
        (TaskKind::InitModel, Some(_)) => Err("task \"init_model\" takes no input model".into()),
        (TaskKind::InitModel, None) => learner.run_task(None, ctx).and_then(|r| match r.model {
            Some(_) => Ok(r),
            None => Err("the learner answered \"init_model\" without a model".into()),
        }),
    }
}

/// The task's input model in memory: this member's own last output when it is the input,
/// else pulled (into the last output's memory when nothing else holds it any more).
async fn input_model(
    state: &mut ExecutorState,
    task: &super::Task,
    blob: BlobRef,
    from: PeerId,
) -> Result<Model, String> {
    let held = state.held_output.take();
    // A transient output whose memory is reused is gone: a later `Submit` task must not hand
    // it over (a train task sets a new one).
    if let Some(h) = held.as_ref().filter(|h| h.transient)
        && state.last_output.is_some_and(|b| b.id == h.blob.id)
    {
        state.last_output = None;
    }
    let bytes = match held {
        // The input is this member's own last output (e.g. the only result of a round, or
        // every result the same): no pull, and no copy when the store is done with it.
        Some(h) if h.blob.id == blob.id => Arc::try_unwrap(h.bytes).unwrap_or_else(|b| (*b).clone()),
        held => {
            // The store is done with the last output once it is on disk (or at once, for a
            // transient one that has been pulled).
            let spare = held.and_then(|h| Arc::try_unwrap(h.bytes).ok());
            tracing::debug!(reused = spare.is_some(), "pulling the input model");
            // A task that names where to pull from passes models member to member (relays,
            // swarm rounds, cross-site validation), so others may pull this input from here
            // next: it is kept in the store. An input pulled from the task's sender (a FedAvg
            // round) is held by that controller already.
            // An input shared with the round's other clients is served from here too.
            let shared = !task.input_shares.is_empty();
            let keep = !task.input_from.is_empty() || shared;
            let sources = match task.input_from.is_empty() {
                true => vec![from],
                false => task.input_from.clone(),
            };
            // Held before it is looked for: another job's last release of the same content
            // must not remove it between the pull and the hold.
            if keep {
                state.kept.input(state.node.store(), blob.id);
            }
            match shared {
                true => fetch_shared_model(&state.node, blob, &sources, &task.input_shares).await?,
                false => fetch_model(&state.node, blob, &sources, spare, keep).await?,
            }
        }
    };
    Model::from_safetensors_vec(bytes).map_err(|e| format!("input model: {e}"))
}

/// Pulls a model that the task's other members pull at the same moment, sharing the upload
/// ([`super::Task::input_shares`]), into the store, then reads it into memory.
async fn fetch_shared_model(node: &Node, blob: BlobRef, from: &[PeerId], owners: &[PeerId]) -> Result<Vec<u8>, String> {
    let opts = FetchOptions {
        max_len: MAX_INPUT_MODEL,
        ..FetchOptions::default()
    };
    node.fetch_shared(blob, from, owners, &opts)
        .await
        .map_err(|e| format!("fetching the input model: {e}"))?;
    let store = node.store().clone();
    tokio::task::spawn_blocking(move || store.read_all(&blob.id))
        .await
        .map_err(|e| format!("reading the input model: {e}"))?
        .map_err(|e| format!("reading the input model: {e}"))
}

/// Stores an output model as a blob (or, `transient`, only serves it from memory) and keeps
/// its bytes as the held output.
async fn publish_output(state: &mut ExecutorState, model: Model, transient: bool) -> Result<BlobRef, String> {
    state.held_output = None;
    let store = state.node.store().clone();
    let bytes = Arc::new(model.into_safetensors());
    let shared = bytes.clone();
    let manifest = tokio::task::spawn_blocking(move || {
        if transient {
            store.import_transient(&shared, DEFAULT_CHUNK_SIZE)
        } else {
            // Held as it is stored (see `Kept::output_held`).
            store
                .import_shared_held(shared, DEFAULT_CHUNK_SIZE, true)
                .map(|(m, _written)| m)
        }
    })
    .await
    .map_err(|e| e.to_string())?
    .map_err(|e| format!("storing the output model: {e}"))?;
    let blob = manifest.blob_ref();
    if !transient {
        state.kept.output_held(state.node.store(), blob.id);
    }
    state.held_output = Some(HeldOutput { blob, bytes, transient });
    Ok(blob)
}
