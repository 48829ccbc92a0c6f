//! The Communicator: the only way a workflow talks to peers, so a workflow is plain async
//! code that runs on any peer.
//!
//! It sends tasks over `/flare/ctl/1`, hands results over as they arrive (so aggregation can
//! start with the first), publishes models into the local blob store for executors to pull,
//! and pulls output models from executors over `/flare/blob/1`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use flare_protocols::ctl::{CtlRequest, CtlResponse, JobId, Progress, Request};
use flare_protocols::model::Model;
use flare_protocols::{BlobId, BlobRef};
use libp2p::PeerId;
use tokio::sync::{Mutex, mpsc};
use tokio::time::Instant;

use super::routes::ControllerInbox;
use super::{Ending, StreamingOutput, Task, TaskEvent, TaskOutcome};
use crate::Node;
use crate::blob::{FetchError, FetchOptions, FetchReport};
use crate::membership::Member;
use crate::store::{StoreError, Written};

/// Why the communicator could not do what a workflow asked.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Pulling a model failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A single-target task did not come back in time or was refused.
    #[error("{member}: {reason}")]
    Task {
        /// The member.
        member: String,
        /// What happened.
        reason: String,
    },
}

/// The tasks of one broadcast still owed a result.
#[derive(Debug, Default)]
pub struct Pending {
    /// Task id -> the member it was sent to.
    pub waiting: HashMap<u64, Member>,
    /// Members that refused the task or could not be reached, with why.
    pub refused: Vec<(Member, String)>,
}

/// One link of a relay's chain: a model, the member holding it, and how many training steps
/// it is from the start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    /// The model.
    pub model: BlobRef,
    /// Who holds it.
    pub holder: PeerId,
    /// Training steps behind it.
    pub steps: u32,
}

/// What a relay did: each member's turn, who was skipped, and models lost with their holder.
#[derive(Debug, Default)]
pub struct RelayOutcome {
    /// The members' results, in the order they ran.
    pub visits: Vec<TaskOutcome>,
    /// Members skipped, with why.
    pub skipped: Vec<(String, String)>,
    /// Members that died holding the newest model: work since the previous copy is lost.
    pub lost: Vec<String>,
}

/// A workflow's view of the job's members.
pub struct Communicator {
    node: Arc<Node>,
    job: JobId,
    members: Vec<Member>,
    /// Where each member is in `members`: results name their member by a lookup, not a scan
    /// (a round of 5,000 results would otherwise compare 25 million peer ids).
    index: HashMap<PeerId, usize>,
    results: Mutex<mpsc::Receiver<TaskOutcome>>,
    streaming: Mutex<mpsc::Receiver<StreamingOutput>>,
    joins: Mutex<mpsc::UnboundedReceiver<PeerId>>,
    progress: Mutex<mpsc::Receiver<(PeerId, Progress)>>,
    state: Arc<std::sync::Mutex<Option<Progress>>>,
    next_task: AtomicU64,
    chunk_size: u32,
    /// The holds this job took on blobs in the node's store (see [`Self::release`]).
    held: std::sync::Mutex<std::collections::HashSet<BlobId>>,
}

impl Communicator {
    /// A communicator that reads `inbox`, the controller side of `job` on `node` (see
    /// `Communicator::new`, which the [`JobHost`](super::JobHost) defines).
    pub(crate) fn from_inbox(
        node: Arc<Node>,
        job: JobId,
        members: Vec<Member>,
        chunk_size: u32,
        inbox: ControllerInbox,
    ) -> Self {
        Self {
            node,
            job,
            index: members.iter().enumerate().map(|(i, m)| (m.peer_id, i)).collect(),
            members,
            results: Mutex::new(inbox.outcomes),
            streaming: Mutex::new(inbox.streaming),
            joins: Mutex::new(inbox.joins),
            progress: Mutex::new(inbox.progress),
            state: inbox.state,
            // From a random start: a controller restarted mid-job never takes a late result
            // of its earlier run for one of its own tasks.
            next_task: AtomicU64::new(rand::random::<u64>() >> 2),
            chunk_size,
            held: std::sync::Mutex::default(),
        }
    }

    /// The chunk size of the blobs this job publishes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// The job.
    pub fn job(&self) -> &JobId {
        &self.job
    }

    /// The job's members.
    pub fn peers(&self) -> &[Member] {
        &self.members
    }

    /// The node this controller runs on: for the machinery behind the communicator (folds,
    /// checkpoints, fault injection), never for a workflow.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// This member's own peer id.
    pub fn me(&self) -> PeerId {
        self.node.peer_id()
    }

    /// Whether this node holds `blob` whole.
    pub fn holds(&self, blob: &BlobId) -> bool {
        self.node.store().is_complete(blob)
    }

    /// The member name of `peer` (its peer id when it is not a member), for logs and reports.
    pub fn name_of(&self, peer: &PeerId) -> String {
        self.member(peer).name
    }

    fn member(&self, peer: &PeerId) -> Member {
        self.index
            .get(peer)
            .and_then(|&i| self.members.get(i))
            .cloned()
            .unwrap_or_else(|| Member {
                name: peer.to_string(),
                peer_id: *peer,
                addrs: vec![],
            })
    }

    /// Stores `model` locally so executors can pull it; returns its reference.
    pub async fn publish(&self, model: Arc<Model>) -> Result<BlobRef, CommError> {
        let store = self.node.store().clone();
        let cs = self.chunk_size;
        // Held as it is stored: another job's last release of the same content must not
        // remove it in between.
        self.stored(move || store.import_bytes_held(model.as_safetensors(), cs))
            .await
    }

    /// Runs `store` (an import that holds what it stores) on a blocking thread and counts
    /// its hold as the job's.
    async fn stored(
        &self,
        store: impl FnOnce() -> Result<flare_protocols::Manifest, StoreError> + Send + 'static,
    ) -> Result<BlobRef, CommError> {
        let m = tokio::task::spawn_blocking(store).await.map_err(|e| StoreError::Io {
            path: "<publish>".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        self.kept(&m.id());
        Ok(m.blob_ref())
    }

    /// Stores `model` like [`Self::publish`], but without waiting for the disk: it is hashed,
    /// then served from memory at once and for as long as the caller holds the returned bytes
    /// (see [`crate::BlobStore::import_shared`]), while a background thread writes it. For a
    /// model that many executors are about to pull at once: the round starts one disk write
    /// sooner, and the pulls read no disk. [`Written`] says when the store lets go of the
    /// bytes.
    pub async fn publish_lent(&self, model: Model) -> Result<(BlobRef, Arc<Vec<u8>>, Written), CommError> {
        let store = self.node.store().clone();
        let cs = self.chunk_size;
        let bytes = Arc::new(model.into_safetensors());
        let lent = bytes.clone();
        let (m, written) = tokio::task::spawn_blocking(move || {
            let (m, written) = store.import_shared_held(lent.clone(), cs, true)?;
            // Held already (the same model again): serve it from these bytes all the same.
            store.lend(&m.id(), &lent);
            Ok::<_, StoreError>((m, written))
        })
        .await
        .map_err(|e| StoreError::Io {
            path: "<publish>".into(),
            source: std::io::Error::other(e.to_string()),
        })??;
        self.kept(&m.id());
        Ok((m.blob_ref(), bytes, written))
    }

    /// Sends `task` to every target at once; results then come from [`Self::next_result`].
    pub async fn broadcast(&self, task: &Task, targets: &[PeerId]) -> Pending {
        let sends = targets.iter().map(|&peer| {
            let task_id = self.next_task.fetch_add(1, Ordering::Relaxed);
            let req = CtlRequest {
                job: self.job.clone(),
                body: Request::Task {
                    task_id,
                    task: task.clone(),
                },
            };
            async move { (peer, task_id, self.node.net().request(peer, req).await) }
        });
        let mut pending = Pending::default();
        for (peer, task_id, r) in futures::future::join_all(sends).await {
            let member = self.member(&peer);
            match r {
                Ok(CtlResponse::Accepted) => {
                    pending.waiting.insert(task_id, member);
                }
                Ok(CtlResponse::Rejected { reason }) => pending.refused.push((member, reason)),
                Ok(other) => pending.refused.push((member, format!("unexpected answer {other:?}"))),
                Err(e) => pending.refused.push((member, e.to_string())),
            }
        }
        pending
    }

    /// The next result of `pending` to arrive before `deadline`; `None` at the deadline or
    /// when nothing is owed. Results of other (earlier) tasks are dropped.
    pub async fn next_result(&self, pending: &mut Pending, deadline: Instant) -> Option<TaskOutcome> {
        let mut rx = self.results.lock().await;
        while !pending.waiting.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(mut outcome)) => {
                    if let Some(member) = pending.waiting.remove(&outcome.task_id)
                        && member.peer_id == outcome.peer
                    {
                        outcome.member = member.name;
                        return Some(outcome);
                    }
                    tracing::debug!(job = %self.job, task = outcome.task_id, "late or unknown result dropped");
                }
                Ok(None) | Err(_) => return None,
            }
        }
        None
    }

    /// As [`Self::next_result`], and also the word of a task of `pending` whose output is
    /// being produced and may be pulled before its result ([`Task::stream_output`]).
    pub async fn next_event(&self, pending: &mut Pending, deadline: Instant) -> Option<TaskEvent> {
        let mut rx = self.results.lock().await;
        let mut streaming = self.streaming.lock().await;
        while !pending.waiting.is_empty() {
            tokio::select! {
                r = tokio::time::timeout_at(deadline, rx.recv()) => match r {
                    Ok(Some(mut outcome)) => {
                        if let Some(member) = pending.waiting.remove(&outcome.task_id)
                            && member.peer_id == outcome.peer
                        {
                            outcome.member = member.name;
                            return Some(TaskEvent::Result(outcome));
                        }
                        tracing::debug!(job = %self.job, task = outcome.task_id, "late or unknown result dropped");
                    }
                    Ok(None) | Err(_) => return None,
                },
                Some(mut s) = streaming.recv() => match pending.waiting.get(&s.task_id) {
                    Some(member) if member.peer_id == s.peer => {
                        s.member = member.name.clone();
                        return Some(TaskEvent::Streaming(s));
                    }
                    _ => tracing::debug!(job = %self.job, task = s.task_id, "late or unknown streaming output dropped"),
                },
            }
        }
        None
    }

    /// Sends `task` to one member and waits for its result.
    pub async fn send_and_wait(
        &self,
        task: &Task,
        target: PeerId,
        timeout: Duration,
    ) -> Result<TaskOutcome, CommError> {
        let deadline = Instant::now() + timeout;
        let mut pending = self.broadcast(task, &[target]).await;
        if let Some((m, reason)) = pending.refused.pop() {
            return Err(CommError::Task { member: m.name, reason });
        }
        self.next_result(&mut pending, deadline)
            .await
            .ok_or_else(|| CommError::Task {
                member: self.member(&target).name,
                reason: format!("no result within {timeout:?}"),
            })
    }

    /// Hands a model along `order`: each member gets `task` with the newest model of `chain`
    /// as input, pulled straight from the member holding it, and its output becomes the
    /// newest link. A member that refuses, fails or takes longer than `timeout` is skipped.
    /// If the member holding the newest model is gone, that model is lost: the chain falls
    /// back to the previous copy (its holder still alive) and the member is asked again.
    pub async fn relay_and_wait(
        &self,
        task: &Task,
        order: &[PeerId],
        timeout: Duration,
        chain: &mut Vec<Link>,
    ) -> Result<RelayOutcome, CommError> {
        let mut out = RelayOutcome::default();
        let mut step = task.clone();
        for &peer in order {
            loop {
                let Some(&newest) = chain.last() else {
                    return Err(CommError::Task {
                        member: self.member(&peer).name,
                        reason: "no model left to hand on".into(),
                    });
                };
                step.input = Some(newest.model);
                step.input_from = vec![newest.holder];
                let why = match self.send_and_wait(&step, peer, timeout).await {
                    Ok(o) if o.status == super::TaskStatus::Ok && o.output.is_some() => {
                        if let Some(model) = o.output {
                            chain.push(Link {
                                model,
                                holder: peer,
                                steps: newest.steps + 1,
                            });
                        }
                        out.visits.push(o);
                        break;
                    }
                    Ok(o) => o.failure(),
                    Err(CommError::Task { reason, .. }) => reason,
                    Err(e) => return Err(e),
                };
                let holder_gone = newest.holder != peer
                    && newest.holder != self.node.peer_id()
                    && chain.len() > 1
                    && !self.is_alive(newest.holder).await;
                if holder_gone {
                    let name = self.member(&newest.holder).name;
                    tracing::warn!(job = %self.job, holder = %name, "the newest model died with its holder; going back one step");
                    out.lost.push(name);
                    chain.pop();
                    continue;
                }
                let member = self.member(&peer).name;
                tracing::warn!(job = %self.job, %member, %why, "skipped");
                out.skipped.push((member, why));
                break;
            }
        }
        Ok(out)
    }

    /// Waits until every peer of `expected` has joined, or `timeout` has passed; returns
    /// those that joined, in the order of `expected`.
    pub async fn wait_for_joins(&self, expected: &[PeerId], timeout: Duration) -> Vec<PeerId> {
        let deadline = Instant::now() + timeout;
        let mut joined = std::collections::HashSet::new();
        let mut rx = self.joins.lock().await;
        while !expected.iter().all(|p| joined.contains(p)) {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(peer)) => {
                    if joined.insert(peer) {
                        tracing::info!(job = %self.job, member = %self.name_of(&peer), "member joined");
                    }
                }
                Ok(None) | Err(_) => break,
            }
        }
        expected.iter().copied().filter(|p| joined.contains(p)).collect()
    }

    /// Records where the job stands, as this member sees it: members that join are told.
    pub fn set_progress(&self, p: Progress) {
        *crate::lock(&self.state) = Some(p);
    }

    /// Tells `targets` where the job stands; returns those that could not be told, with why.
    pub async fn announce(&self, targets: &[PeerId], p: &Progress) -> Vec<(PeerId, String)> {
        let sends = targets.iter().map(|&peer| {
            let req = CtlRequest {
                job: self.job.clone(),
                body: Request::Progress(Box::new(p.clone())),
            };
            async move { (peer, self.node.net().request(peer, req).await) }
        });
        let mut failed = Vec::new();
        for (peer, r) in futures::future::join_all(sends).await {
            match r {
                Ok(CtlResponse::Ack) => {}
                Ok(other) => failed.push((peer, format!("answered {other:?}"))),
                Err(e) => failed.push((peer, e.to_string())),
            }
        }
        failed
    }

    /// The next progress another member announced, before `deadline`.
    pub async fn next_progress(&self, deadline: Instant) -> Option<(PeerId, Progress)> {
        let mut rx = self.progress.lock().await;
        tokio::time::timeout_at(deadline, rx.recv()).await.ok().flatten()
    }

    /// Asks `peer` to admit this member to the job; returns where the job stands by its
    /// account (`Ok(None)`: it keeps no progress), or why it did not answer `Welcome`.
    pub async fn join(&self, peer: PeerId, member: &str, spec_hash: [u8; 32]) -> Result<Option<Progress>, String> {
        let req = CtlRequest {
            job: self.job.clone(),
            body: Request::Join {
                member: member.to_owned(),
            },
        };
        match self.node.net().request(peer, req).await {
            Ok(CtlResponse::Welcome {
                spec_hash: theirs,
                progress,
                ..
            }) if theirs == spec_hash => Ok(progress.map(|p| *p)),
            Ok(CtlResponse::Welcome { .. }) => Err("runs a different specification of the job".into()),
            Ok(other) => Err(format!("answered {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Whether `peer` answers a heartbeat for this job.
    pub async fn is_alive(&self, peer: PeerId) -> bool {
        let req = CtlRequest {
            job: self.job.clone(),
            body: Request::Heartbeat,
        };
        matches!(self.node.net().request(peer, req).await, Ok(CtlResponse::Ack))
    }

    /// Tells `targets` the job is over, and how (best effort: an unreachable member is only
    /// logged).
    pub async fn end_job(&self, targets: &[PeerId], end: &Ending) {
        let sends = targets.iter().map(|&peer| {
            let req = CtlRequest {
                job: self.job.clone(),
                body: Request::Abort {
                    reason: end.reason.clone(),
                    failed: end.failed,
                },
            };
            async move { (peer, self.node.net().request(peer, req).await) }
        });
        for (peer, r) in futures::future::join_all(sends).await {
            if let Err(e) = r {
                tracing::debug!(job = %self.job, %peer, error = %e, "could not tell a member the job ended");
            }
        }
    }

    /// Files `file`, a model written on disk (a mean folded there, a model made there), as a
    /// blob the job holds, like [`Self::publish`] without reading it into memory.
    pub async fn publish_scratch(&self, file: crate::store::Scratch) -> Result<BlobRef, CommError> {
        let store = self.node.store().clone();
        let cs = self.chunk_size;
        self.stored(move || store.adopt_held(file, cs)).await
    }

    /// [`Self::publish_scratch`] for a model whose chunk hashes were taken as it was written
    /// (a mean, [`crate::aggregate::Mean::Scratch`]), cut in chunks of `chunk_size`: no pass
    /// over the file to hash it, unless the job cuts its blobs otherwise.
    pub async fn publish_hashed(
        &self,
        file: crate::store::Scratch,
        chunk_size: u32,
        hashes: Vec<flare_protocols::blob_id::ChunkHash>,
    ) -> Result<BlobRef, CommError> {
        if chunk_size != self.chunk_size {
            return self.publish_scratch(file).await;
        }
        let store = self.node.store().clone();
        self.stored(move || store.adopt_hashed(file, chunk_size, hashes)).await
    }

    /// The layout of a model this node's store holds whole, read from its header alone.
    pub async fn layout_of(&self, blob: BlobRef) -> Result<flare_protocols::model::Layout, CommError> {
        let store = self.node.store().clone();
        let bad = move |reason: String| CommError::Task {
            member: String::new(),
            reason: format!("model {}: {reason}", blob.id),
        };
        let read = tokio::task::spawn_blocking(move || {
            crate::store::read_layout(blob.len, |buf| store.read_at(&blob.id, buf, 0))
        })
        .await
        .map_err(|e| e.to_string());
        read.and_then(|r| r).map_err(bad)
    }

    /// A model this node's store holds, read into memory.
    pub async fn model_of(&self, blob: BlobRef) -> Result<Model, CommError> {
        self.pull_model(blob, &[]).await
    }

    /// Pulls a model from `from` (unless held already) and reads it into memory.
    pub async fn pull_model(&self, blob: BlobRef, from: &[PeerId]) -> Result<Model, CommError> {
        let bytes = self.pull_bytes(blob, from, FetchOptions::default().max_len).await?;
        Model::from_safetensors_vec(bytes).map_err(|e| CommError::Task {
            member: from.first().map_or_else(String::new, |p| self.member(p).name),
            reason: format!("its model: {e}"),
        })
    }

    /// Pulls `blob` into the local store from `from` (nothing to pull when it is held whole
    /// already), accepting at most `max_len` bytes, and reads it into memory: the one way a
    /// workflow takes a model or other blob in.
    pub async fn pull_bytes(&self, blob: BlobRef, from: &[PeerId], max_len: u64) -> Result<Vec<u8>, CommError> {
        // Held before it is looked for: see `publish`.
        self.keep(&blob.id);
        if !self.holds(&blob.id) {
            let opts = FetchOptions {
                max_len,
                ..FetchOptions::default()
            };
            self.node.fetch(blob, from, &opts).await?;
        }
        let store = self.node.store().clone();
        let bytes = tokio::task::spawn_blocking(move || store.read_all(&blob.id))
            .await
            .map_err(|e| StoreError::Io {
                path: "<pull>".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        Ok(bytes)
    }

    /// Pulls `blob` into the local store from `from`, so that other members can pull it
    /// from here too.
    pub async fn hold(&self, blob: BlobRef, from: &[PeerId]) -> Result<(), CommError> {
        // Held before it is looked for: see `publish`.
        self.keep(&blob.id);
        self.node.fetch(blob, from, &FetchOptions::default()).await?;
        Ok(())
    }

    /// [`Self::hold`], sharing the pull with `owners`, the members pulling `blob` at the same
    /// moment (every one of them lists the same owners, in the same order): each pulls its
    /// share from `from` and the rest from the others ([`Node::fetch_shared`]).
    pub async fn hold_shared(&self, blob: BlobRef, from: &[PeerId], owners: &[PeerId]) -> Result<(), CommError> {
        self.keep(&blob.id);
        self.node
            .fetch_shared(blob, from, owners, &FetchOptions::default())
            .await?;
        Ok(())
    }

    /// Lets go of a blob this job stored (published, pulled or held) once no round, checkpoint
    /// or member needs it: the node's store removes it when nothing else holds it either, so
    /// the store does not grow with the rounds. A blob this job did not store is left alone.
    pub fn release(&self, blob: &BlobRef) {
        if crate::lock(&self.held).remove(&blob.id) {
            self.node.store().release(&blob.id);
        }
    }

    /// Takes the job's hold on a blob it stored (one, however often it is stored), for
    /// [`Self::release`].
    fn keep(&self, id: &BlobId) {
        if crate::lock(&self.held).insert(*id) {
            self.node.store().retain(id);
        }
    }

    /// Counts a hold the store took for the job as it stored the blob (`*_held` imports) as
    /// the job's one hold on it, letting go of it when the job held the blob already.
    fn kept(&self, id: &BlobId) {
        if !crate::lock(&self.held).insert(*id) {
            self.node.store().release(id);
        }
    }

    /// Pulls an executor's output model into the local store.
    pub async fn fetch(&self, blob: BlobRef, from: PeerId, opts: &FetchOptions) -> Result<FetchReport, CommError> {
        Ok(self.node.fetch(blob, &[from], opts).await?)
    }
}
