//! The control protocol `/flare/ctl/1`.
//!
//! # Wire format
//! libp2p request-response: one request and one response per substream. Each is one frame:
//!
//! ```text
//! frame    = length:u32be  body            (length <= MAX_CTL_FRAME = 1 MiB)
//! body     = version:u16be cbor            (version = CTL_VERSION = 1)
//! cbor     = CtlRequest | CtlResponse      (serde's default CBOR layout, via ciborium)
//! ```
//!
//! Control messages are small by design: models never travel here, only [`BlobRef`]s, which
//! peers then fetch over `/flare/blob/1`. The cap is checked before allocating; an unknown
//! version, an oversize frame, malformed CBOR or trailing bytes is a typed [`FrameError`]
//! (surfaced through libp2p as an `io::Error` of kind `InvalidData` that wraps it), never a
//! panic.
//!
//! Every message names the job it belongs to; a node answers messages for jobs it has not
//! joined with [`CtlResponse::Rejected`]. A node whose queues are full answers
//! [`CtlResponse::Busy`]: the sender waits and asks again, and a busy controller never loses
//! a member's result.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::{AsyncRead, AsyncWrite, AsyncWriteExt};
use libp2p::{PeerId, StreamProtocol};
use serde::{Deserialize, Serialize};

use crate::BlobRef;
use crate::frame::{FrameError, encode_versioned, read_message, write_frame};
use crate::split::{Backward, Forward};

/// Protocol name negotiated on the substream.
pub const CTL_PROTOCOL: StreamProtocol = StreamProtocol::new("/flare/ctl/1");
/// Version field of every control frame.
pub const CTL_VERSION: u16 = 1;
/// Largest control frame, request or response (defined with the framing, so that the
/// messages that ride in control frames, such as split learning's, can size themselves by it).
pub use crate::frame::MAX_CTL_FRAME;

/// Names a federated job; every control message carries one.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Debug, Serialize, Deserialize)]
pub struct JobId(pub String);

impl std::fmt::Display for JobId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// A small, self-describing value for task properties and metadata.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum Value {
    /// A boolean.
    Bool(bool),
    /// A signed integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A UTF-8 string.
    Str(String),
    /// Raw bytes (small; large data goes in a blob).
    Bytes(Vec<u8>),
}

/// How a task ended on the executor.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum TaskStatus {
    /// The task produced its output.
    Ok,
    /// The task failed; details are in the result's metrics or logs.
    Failed,
    /// The executor gave up before finishing (abort, shutdown).
    Aborted,
}

/// What a task asks an executor to do: the executor dispatches on it, and each step that
/// needs parameters of its own carries them typed (split learning's, specified in
/// [`crate::split`]).
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum TaskKind {
    /// Train from the input model; the output is the local update.
    Train,
    /// Measure the input model on local validation data; metrics only.
    Validate,
    /// Hand over this member's own model (its learner's, or its last training output).
    Submit,
    /// Run the frozen input network over local data and keep the embeddings (the inference
    /// workflow's first step).
    Embed,
    /// Split learning: run the bottom on the named rows.
    SplitForward(Forward),
    /// Split learning: apply the gradient of the last training forward.
    SplitBackward(Backward),
    /// Hand over the learner's starting parameters: the job's initial model when its
    /// `[model] from` names this member, so a network defined only in the member's own code
    /// (a Python script) defines the model. Asked once, before round 0; no input.
    InitModel,
}

impl TaskKind {
    /// The task's name as learners outside this process know it (the Client API's `task`
    /// field and an `FLModel`'s `task` meta carry it; kept as it was before tasks were typed).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Train => "train",
            Self::Validate => "validate",
            Self::Submit => "submit_model",
            Self::Embed => "embed",
            Self::SplitForward(_) => "split_forward",
            Self::SplitBackward(_) => "split_backward",
            Self::InitModel => "init_model",
        }
    }
}

impl std::fmt::Display for TaskKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A unit of work a controller hands to executors: built once by the workflow and carried
/// whole in [`Request::Task`].
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Task {
    /// What to do.
    pub kind: TaskKind,
    /// Workflow round the task belongs to.
    pub round: u32,
    /// Input model, fetched by the executor over `/flare/blob/1`.
    pub input: Option<BlobRef>,
    /// Where the input is pulled from; empty means the sender of the task. Lets a model go
    /// from member to member directly (cyclic, swarm) instead of through the sender.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_from: Vec<PeerId>,
    /// Parameters every learner may read (`total_rounds`, the `model` a validation measures);
    /// handed to external learners as they are.
    pub props: BTreeMap<String, Value>,
    /// The output model is pulled once, by the task's sender, before the next task: the
    /// executor serves it from memory and does not store it (a FedAvg update, which the
    /// controller folds and forgets). Absent means it is stored, for anyone to pull later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub transient_output: bool,
    /// The members that pull this input at the same moment, sharing the upload: its chunks
    /// are cut into one contiguous share per entry, in order; each pulls its own share from
    /// the input's source and every other share from its owner, which relays it as it
    /// arrives (so the source sends the model about once, whatever their number). Empty: every
    /// member pulls the whole input from the source.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_shares: Vec<PeerId>,
    /// The sender folds the output as it is produced: an executor whose learner trains the
    /// input as it arrives, chunk by chunk, may say so with [`Request::TaskStreaming`] and
    /// serve the output's chunks as they come out of the learner
    /// ([`crate::blob::BlobRequest::pending`]), before its `TaskResult` names the output.
    /// Absent: the output is pulled once the result names it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stream_output: bool,
}

impl Task {
    /// A task of `kind` for `round` with no input, parameters or sources: the fields a
    /// workflow does not set keep their plain meaning.
    pub fn new(kind: TaskKind, round: u32) -> Self {
        Self {
            kind,
            round,
            input: None,
            input_from: Vec::new(),
            props: BTreeMap::new(),
            transient_output: false,
            input_shares: vec![],
            stream_output: false,
        }
    }
}

/// A control request: the job it belongs to and what is asked.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct CtlRequest {
    /// The job this message belongs to.
    pub job: JobId,
    /// What is asked.
    pub body: Request,
}

/// What a control request asks.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum Request {
    /// A member asks to take part in a job.
    Join {
        /// The member's name in the topology.
        member: String,
    },
    /// A controller hands a task to an executor.
    Task {
        /// Unique within the job.
        task_id: u64,
        /// The task, as the controller built it.
        task: Task,
    },
    /// An executor reports a finished task.
    TaskResult {
        /// The task this result answers.
        task_id: u64,
        /// How it ended.
        status: TaskStatus,
        /// Output model, fetched by the controller over `/flare/blob/1`.
        output: Option<BlobRef>,
        /// Named scalar metrics (loss, accuracy, ...).
        metrics: BTreeMap<String, f64>,
        /// Number of training samples behind the output (aggregation weight).
        num_samples: u64,
        /// Small named outputs that are not a model (e.g. split learning's activations);
        /// large data goes in a blob.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        values: BTreeMap<String, Value>,
    },
    /// An executor tells the controller that the output of a task that asked for it
    /// ([`Task::stream_output`]) is being produced and may be pulled now: its chunks as
    /// `pending` blob `output` (an id of the executor's choosing, not a content hash: the
    /// puller hashes what it receives and checks it against the output the `TaskResult`
    /// names). `num_samples` is the weight the result will carry; a result that then
    /// reports another weight or another output is not taken as streamed.
    TaskStreaming {
        /// The task.
        task_id: u64,
        /// The output's handle, length and chunk size.
        output: BlobRef,
        /// The aggregation weight the result will report.
        num_samples: u64,
    },
    /// The job is over for the receiver: finished, or stopped early.
    Abort {
        /// Why, in words (shown to the member's operator).
        reason: String,
        /// The job did not finish (aborted, or its workflow failed), so a member's process
        /// exits with an error rather than as after a finished job. Absent means finished.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        failed: bool,
    },
    /// Liveness probe within a job.
    Heartbeat,
    /// A peer tells the job's members where the job stands: used where no fixed
    /// controller keeps that state (swarm learning).
    Progress(Box<Progress>),
    /// A submitter hands a signed job to a standing site (`flare-node serve`); the request's
    /// `job` is the job's id ([`SignedJob::id`](crate::job::SignedJob::id)). The site checks
    /// the signature and its own policy and answers `Accepted` or `Rejected` with why.
    Submit(Box<crate::job::SignedJob>),
    /// A site that took a submitted job offers it to each other member the job names; the
    /// member checks the signature and its own policy as the first site did, and answers
    /// `Accepted` or `Rejected` with why.
    Offer(Box<crate::job::SignedJob>),
    /// The site that took a submitted job tells each member that took its offer to start its
    /// part. The job runs with `members` only (those that took it, in the job file's order),
    /// so every member runs the same job whoever refused.
    Launch {
        /// The job's members that took it.
        members: Vec<String>,
    },
    /// The site that was submitted a job tells the members that took its offer that the job
    /// will not run (too many others refused it), with why.
    Withdraw {
        /// Why, naming who refused.
        reason: String,
    },
    /// Asks a site for what it knows of its jobs (the request's `job` empty) or of one job,
    /// answered [`CtlResponse::Jobs`]. Asked of one site about one job, the site asks the
    /// job's other members too, so the answer has every member's view.
    Jobs,
    /// Stops a job (the request's `job`) on every member, if the signer may: each member
    /// checks the signature and its own policy. Answered [`CtlResponse::Jobs`] with the
    /// members' views after the abort.
    AbortJob(Box<crate::job::SignedAbort>),
    /// Asks a site for a job's outputs (final model, results), answered
    /// [`CtlResponse::Files`]; the asker pulls them over `/flare/blob/1`.
    Download,
}

/// Where a job without a fixed controller stands: `round` rounds are done and their model is
/// `model`, held by `holders`.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Progress {
    /// Rounds completed.
    pub round: u32,
    /// The model after them.
    pub model: BlobRef,
    /// Peers that hold it.
    pub holders: Vec<PeerId>,
    /// Who aggregated the last round.
    pub aggregator: PeerId,
    /// Members whose results went into the last round.
    pub contributors: Vec<PeerId>,
    /// The model's metrics (e.g. on a test set), if measured.
    pub metrics: BTreeMap<String, f64>,
    /// Members that were due to aggregate the last round before `aggregator` but did not
    /// answer (a failover, when one of them died mid-round).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passed_over: Vec<PeerId>,
}

/// The answer to a [`CtlRequest`].
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub enum CtlResponse {
    /// The join is accepted; `spec_hash` lets the member check it runs the same job spec.
    Welcome {
        /// The job.
        job: JobId,
        /// blake3 of the job specification.
        spec_hash: [u8; 32],
        /// Where the job stands, when the member answering keeps that (swarm learning): a
        /// member that comes back picks up from there.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        progress: Option<Box<Progress>>,
    },
    /// The task was taken.
    Accepted,
    /// The request was refused, with a reason for the logs.
    Rejected {
        /// Why.
        reason: String,
    },
    /// Received (results, aborts, heartbeats).
    Ack,
    /// A submitted job was taken; these members refused it, each saying why (the job goes
    /// on without them).
    Taken {
        /// One line per member that refused, naming it.
        refused: Vec<String>,
    },
    /// The node cannot take the request now (its queues are full): send it again after at
    /// least `retry_after_ms`. Unlike `Rejected`, nothing is wrong with the request.
    Busy {
        /// The least time to wait before asking again.
        retry_after_ms: u32,
    },
    /// What sites know of their jobs (the answer to [`Request::Jobs`]): one entry per job
    /// and site that reports it.
    Jobs(Vec<crate::job::JobView>),
    /// A job's outputs, by file name, each a blob the asker pulls from the answering site.
    Files(Vec<(String, BlobRef)>),
}

/// ciborium codec for libp2p request-response, with a hard frame cap. Counts the bytes it
/// writes (requests and responses), so a node can report its control traffic.
#[derive(Clone, Debug, Default)]
pub struct CtlCodec {
    /// Bytes written, shared by every clone of the codec.
    pub sent: Arc<AtomicU64>,
}

impl libp2p::request_response::Codec for CtlCodec {
    type Protocol = StreamProtocol;
    type Request = CtlRequest;
    type Response = CtlResponse;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<CtlRequest>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(read_message(io, CTL_VERSION, MAX_CTL_FRAME).await?)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> std::io::Result<CtlResponse>
    where
        T: AsyncRead + Unpin + Send,
    {
        Ok(read_message(io, CTL_VERSION, MAX_CTL_FRAME).await?)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: CtlRequest) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let n = write_capped(io, &req).await?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: CtlResponse) -> std::io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        let n = write_capped(io, &res).await?;
        self.sent.fetch_add(n, Ordering::Relaxed);
        Ok(())
    }
}

/// Refuses to send what the peer would refuse to read; returns the bytes written.
async fn write_capped<W: AsyncWrite + Unpin, T: Serialize>(io: &mut W, msg: &T) -> std::io::Result<u64> {
    let body = encode_versioned(CTL_VERSION, msg);
    if body.len() > MAX_CTL_FRAME as usize {
        return Err(FrameError::TooLarge {
            len: body.len() as u64,
            max: MAX_CTL_FRAME.into(),
        }
        .into());
    }
    write_frame(io, &body).await?;
    io.flush().await?;
    Ok(body.len() as u64 + 4)
}

/// Recovers our typed decode error from the `io::Error` libp2p hands back, when it is one.
pub fn frame_error(e: &std::io::Error) -> Option<&FrameError> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<FrameError>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobId;
    use futures::executor::block_on;
    use libp2p::request_response::Codec;
    use proptest::prelude::*;

    fn value() -> impl Strategy<Value = Value> {
        prop_oneof![
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::Int),
            (-1e9f64..1e9).prop_map(Value::Float),
            ".{0,12}".prop_map(Value::Str),
            proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
        ]
    }

    /// A peer id from 32 seed bytes (an ed25519 key, so the id is a real one).
    fn peer(seed: [u8; 32]) -> PeerId {
        let key = libp2p::identity::Keypair::ed25519_from_bytes(seed).expect("32 bytes");
        key.public().to_peer_id()
    }

    fn blob_ref() -> impl Strategy<Value = BlobRef> {
        (any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(|(id, len, chunk_size)| BlobRef {
            id: BlobId(id),
            len,
            chunk_size,
        })
    }

    fn task_kind() -> impl Strategy<Value = TaskKind> {
        prop_oneof![
            Just(TaskKind::Train),
            Just(TaskKind::Validate),
            Just(TaskKind::Submit),
            Just(TaskKind::Embed),
            Just(TaskKind::InitModel),
            (
                proptest::collection::vec(any::<u32>(), 0..8),
                any::<u64>(),
                any::<bool>(),
                any::<u64>()
            )
                .prop_map(|(rows, step, train, inline_max)| TaskKind::SplitForward(Forward {
                    rows,
                    step,
                    train,
                    inline_max
                })),
            (
                any::<u64>(),
                -1e3f64..1e3,
                proptest::option::of(proptest::collection::vec(-1e6f32..1e6, 0..8))
            )
                .prop_map(|(step, lr, gradient)| TaskKind::SplitBackward(Backward { step, lr, gradient })),
        ]
    }

    fn request() -> impl Strategy<Value = CtlRequest> {
        let body = prop_oneof![
            ".{0,16}".prop_map(|member| Request::Join { member }),
            (proptest::collection::vec(any::<u8>(), 0..64), any::<u64>()).prop_map(|(spec, at)| {
                let key = libp2p::identity::Keypair::ed25519_from_bytes([7; 32]).expect("key");
                Request::Submit(Box::new(crate::job::SignedJob::sign(spec, &key, at).expect("sign")))
            }),
            (proptest::collection::vec(any::<u8>(), 0..64), any::<u64>()).prop_map(|(spec, at)| {
                let key = libp2p::identity::Keypair::ed25519_from_bytes([9; 32]).expect("key");
                Request::Offer(Box::new(crate::job::SignedJob::sign(spec, &key, at).expect("sign")))
            }),
            (
                any::<u64>(),
                task_kind(),
                any::<u32>(),
                proptest::option::of(blob_ref()),
                proptest::collection::vec(any::<[u8; 32]>(), 0..3),
                proptest::collection::btree_map(".{0,6}", value(), 0..4),
                any::<bool>(),
                any::<bool>()
            )
                .prop_map(
                    |(task_id, kind, round, input, from, props, transient_output, stream_output)| Request::Task {
                        task_id,
                        task: Task {
                            kind,
                            round,
                            input,
                            input_shares: from.iter().rev().copied().map(peer).collect(),
                            input_from: from.into_iter().map(peer).collect(),
                            props,
                            transient_output,
                            stream_output
                        }
                    }
                ),
            (
                any::<u64>(),
                prop_oneof![
                    Just(TaskStatus::Ok),
                    Just(TaskStatus::Failed),
                    Just(TaskStatus::Aborted)
                ],
                proptest::option::of(blob_ref()),
                proptest::collection::btree_map(".{0,6}", -1e6f64..1e6, 0..4),
                any::<u64>(),
                proptest::collection::btree_map(".{0,6}", value(), 0..3)
            )
                .prop_map(
                    |(task_id, status, output, metrics, num_samples, values)| Request::TaskResult {
                        task_id,
                        status,
                        output,
                        metrics,
                        num_samples,
                        values
                    }
                ),
            (any::<u64>(), blob_ref(), any::<u64>()).prop_map(|(task_id, output, num_samples)| {
                Request::TaskStreaming {
                    task_id,
                    output,
                    num_samples,
                }
            }),
            (".{0,16}", any::<bool>()).prop_map(|(reason, failed)| Request::Abort { reason, failed }),
            Just(Request::Heartbeat),
            proptest::collection::vec(".{0,8}", 0..4).prop_map(|members| Request::Launch { members }),
            ".{0,16}".prop_map(|reason| Request::Withdraw { reason }),
            Just(Request::Jobs),
            Just(Request::Download),
            (".{0,16}", ".{0,16}", any::<u64>()).prop_map(|(job, reason, at)| {
                let key = libp2p::identity::Keypair::ed25519_from_bytes([5; 32]).expect("key");
                Request::AbortJob(Box::new(
                    crate::job::SignedAbort::sign(JobId(job), reason, &key, at).expect("sign"),
                ))
            }),
            (
                any::<u32>(),
                blob_ref(),
                any::<[u8; 32]>(),
                proptest::collection::btree_map(".{0,6}", -1e6f64..1e6, 0..3)
            )
                .prop_map(|(round, model, seed, metrics)| Request::Progress(Box::new(Progress {
                    round,
                    model,
                    holders: vec![peer(seed)],
                    aggregator: peer(seed),
                    contributors: vec![peer(seed)],
                    metrics,
                    passed_over: vec![peer(seed)],
                }))),
        ];
        (".{0,16}", body).prop_map(|(job, body)| CtlRequest { job: JobId(job), body })
    }

    fn response() -> impl Strategy<Value = CtlResponse> {
        prop_oneof![
            (".{0,8}", any::<[u8; 32]>(), any::<bool>(), blob_ref()).prop_map(|(j, spec_hash, with, model)| {
                CtlResponse::Welcome {
                    job: JobId(j),
                    spec_hash,
                    progress: with.then(|| {
                        Box::new(Progress {
                            round: 3,
                            model,
                            holders: vec![peer(spec_hash)],
                            aggregator: peer(spec_hash),
                            contributors: vec![],
                            metrics: BTreeMap::new(),
                            passed_over: vec![],
                        })
                    }),
                }
            }),
            Just(CtlResponse::Accepted),
            ".{0,16}".prop_map(|reason| CtlResponse::Rejected { reason }),
            Just(CtlResponse::Ack),
            proptest::collection::vec(".{0,8}", 0..3).prop_map(|refused| CtlResponse::Taken { refused }),
            any::<u32>().prop_map(|retry_after_ms| CtlResponse::Busy { retry_after_ms }),
            (
                ".{0,8}",
                any::<u32>(),
                any::<u64>(),
                proptest::collection::btree_map(".{0,6}", -1e6f64..1e6, 0..3)
            )
                .prop_map(
                    |(name, round, at, metrics)| CtlResponse::Jobs(vec![crate::job::JobView {
                        id: JobId(format!("j{at:016x}")),
                        name: name.clone(),
                        workflow: "fedavg".into(),
                        site: name,
                        part: "client".into(),
                        state: crate::job::JobState::Running,
                        reason: String::new(),
                        round,
                        rounds: round.saturating_add(1),
                        members: vec!["a".into(), "b".into()],
                        submitter: "12D3KooW".into(),
                        submitted_at_ms: at,
                        updated_at_ms: at,
                        metrics: vec![metrics],
                    }])
                ),
        ]
    }

    proptest! {
        #[test]
        fn requests_round_trip(req in request()) {
            let mut buf = Vec::new();
            block_on(CtlCodec::default().write_request(&CTL_PROTOCOL, &mut buf, req.clone())).expect("write");
            let back = block_on(CtlCodec::default().read_request(&CTL_PROTOCOL, &mut buf.as_slice())).expect("read");
            prop_assert_eq!(back, req);
        }

        #[test]
        fn responses_round_trip(res in response()) {
            let mut buf = Vec::new();
            block_on(CtlCodec::default().write_response(&CTL_PROTOCOL, &mut buf, res.clone())).expect("write");
            let back = block_on(CtlCodec::default().read_response(&CTL_PROTOCOL, &mut buf.as_slice())).expect("read");
            prop_assert_eq!(back, res);
        }

        #[test]
        fn truncated_frames_are_errors(req in request(), cut in 0usize..1000) {
            let mut buf = Vec::new();
            block_on(CtlCodec::default().write_request(&CTL_PROTOCOL, &mut buf, req)).expect("write");
            let cut = cut % buf.len();
            let r = block_on(CtlCodec::default().read_request(&CTL_PROTOCOL, &mut &buf[..cut]));
            prop_assert!(r.is_err());
        }

        #[test]
        fn random_bodies_are_typed_errors(body in proptest::collection::vec(any::<u8>(), 0..256)) {
            // A well-framed but random body: always a typed error or (rarely) a valid message.
            let mut buf = (body.len() as u32).to_be_bytes().to_vec();
            buf.extend_from_slice(&body);
            if let Err(e) = block_on(CtlCodec::default().read_request(&CTL_PROTOCOL, &mut buf.as_slice())) {
                prop_assert!(frame_error(&e).is_some(), "untyped error: {e}");
            }
        }
    }

    #[test]
    fn oversize_and_wrong_version_are_typed() {
        let mut big = (MAX_CTL_FRAME + 1).to_be_bytes().to_vec();
        big.extend_from_slice(&[0; 16]);
        let e = block_on(CtlCodec::default().read_request(&CTL_PROTOCOL, &mut big.as_slice())).expect_err("big");
        assert!(matches!(frame_error(&e), Some(FrameError::TooLarge { .. })));

        let mut buf = Vec::new();
        let req = CtlRequest {
            job: JobId("j".into()),
            body: Request::Heartbeat,
        };
        block_on(CtlCodec::default().write_request(&CTL_PROTOCOL, &mut buf, req)).expect("write");
        buf[5] = 9; // version low byte
        let e = block_on(CtlCodec::default().read_request(&CTL_PROTOCOL, &mut buf.as_slice())).expect_err("version");
        assert!(matches!(
            frame_error(&e),
            Some(FrameError::UnsupportedVersion { got: 9, .. })
        ));

        let huge = CtlRequest {
            job: JobId("j".into()),
            body: Request::Abort {
                reason: "x".repeat(MAX_CTL_FRAME as usize),
                failed: false,
            },
        };
        let e = block_on(CtlCodec::default().write_request(&CTL_PROTOCOL, &mut Vec::new(), huge)).expect_err("cap");
        assert!(matches!(frame_error(&e), Some(FrameError::TooLarge { .. })));
    }
}
