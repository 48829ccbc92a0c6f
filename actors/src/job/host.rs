//! One per node: routes inbound control requests to the jobs this node takes part in.
//!
//! `Task` goes to the executor of that job, `TaskResult` to the controller of that job; a
//! request for a job this node has not joined is answered `Rejected`, naming the job.

use std::future::Future;
use std::sync::{Arc, Mutex};

use flare_protocols::ctl::{CtlResponse, JobId, Progress, Request};
use libp2p::PeerId;
use ractor::{Actor, ActorRef};

use tokio::sync::{mpsc, watch};

use super::routes::{ControllerInbox, ControllerRoute, ExecutorRoute, Routes, SiteRequest};
use super::supervisor::Supervisor;

use super::communicator::Communicator;
use super::controller::ControllerHandle;
use super::executor::{Executor, ExecutorArgs, ExecutorMsg};
use super::{Ending, StreamingOutput, TaskOutcome};
use crate::Node;
use crate::learner::Learner;
use crate::lock;
use crate::membership::Member;
use crate::network::NetworkError;

/// Announcements a job's controller side holds before its workflow reads them.
const PROGRESS_QUEUE: usize = 64;
/// Site requests (submitted or offered jobs, queries) being answered at once.
const MAX_SITE_REQUESTS: usize = 16;
/// Task results it holds before its workflow reads them (far more than tasks in flight; a
/// member flooding results is answered `Busy` and waits, rather than queued without end).
const RESULT_QUEUE: usize = 4096;

/// The node's job table and the task that routes control requests by it.
pub struct JobHost {
    node: Arc<Node>,
    routes: Arc<Mutex<Routes>>,
    router: tokio::task::JoinHandle<()>,
    /// Spawned with the first executor.
    supervisor: tokio::sync::OnceCell<ActorRef<()>>,
}

impl JobHost {
    /// Takes over the node's inbound control requests.
    pub fn start(node: Arc<Node>) -> Result<Self, NetworkError> {
        let mut inbound = node.subscribe_ctl()?;
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let r = routes.clone();
        // Bounded: a peer flooding submissions is answered `Busy`, not given a task each.
        let answering = Arc::new(tokio::sync::Semaphore::new(MAX_SITE_REQUESTS));
        let router = tokio::spawn(async move {
            while let Some(req) = inbound.recv().await {
                let job = req.request.job.clone();
                let body = req.request.body;
                if !SiteRequest::is_for_site(&body) {
                    let _ = req.reply.send(route(&r, req.peer, job, body));
                    continue;
                }
                let desk = lock(&r).desk.clone();
                let (from, reply) = (req.peer, req.reply);
                match (desk, answering.clone().try_acquire_owned()) {
                    // Answered on a task of its own: the answer may ask other members.
                    (Some(desk), Ok(permit)) => {
                        tokio::spawn(async move {
                            let _ = reply.send(desk(SiteRequest { from, job, body }).await);
                            drop(permit);
                        });
                    }
                    (Some(_), Err(_)) => {
                        let _ = reply.send(crate::network::busy());
                    }
                    (None, _) => {
                        let _ = reply.send(CtlResponse::Rejected { reason: NO_SITE.into() });
                    }
                }
            }
        });
        Ok(Self {
            node,
            routes,
            router,
            supervisor: tokio::sync::OnceCell::new(),
        })
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Joins `job` as an executor that takes tasks from the controller at `controller`
    /// (`None`: from any member of the job).
    pub async fn join_as_executor(
        &self,
        job: JobId,
        controller: Option<PeerId>,
        member: &str,
        learner: Box<dyn Learner>,
    ) -> Result<ActorRef<ExecutorMsg>, ractor::SpawnErr> {
        let supervisor = self.supervisor().await?;
        let (actor, _) = Actor::spawn_linked(
            None,
            Executor,
            ExecutorArgs {
                node: self.node.clone(),
                member: member.to_owned(),
                learner,
            },
            supervisor.get_cell(),
        )
        .await?;
        let (ended, _) = watch::channel(None);
        lock(&self.routes).executors.insert(
            job,
            ExecutorRoute {
                actor: actor.clone(),
                controller,
                ended,
            },
        );
        Ok(actor)
    }

    /// The node's supervisor, spawned on first use.
    async fn supervisor(&self) -> Result<&ActorRef<()>, ractor::SpawnErr> {
        self.supervisor
            .get_or_try_init(|| async {
                Actor::spawn(None, Supervisor, self.routes.clone())
                    .await
                    .map(|(a, _)| a)
            })
            .await
    }

    /// Runs `workflow` as the controller of `comm`'s job: a [`Controller`](super::controller::Controller) actor linked to
    /// the node's supervisor. `members` are told why if the job ends early (aborted through
    /// the handle, or the workflow panicked); on a normal finish the workflow tells them.
    pub async fn start_controller<R, F, Fut>(
        &self,
        comm: Communicator,
        members: Vec<PeerId>,
        workflow: F,
    ) -> Result<ControllerHandle<R>, ractor::SpawnErr>
    where
        R: Send + 'static,
        F: FnOnce(Arc<Communicator>) -> Fut,
        Fut: Future<Output = R> + Send + 'static,
    {
        let supervisor = self.supervisor().await?;
        ControllerHandle::spawn(comm, members, workflow, supervisor.get_cell()).await
    }

    /// Resolves with the controller's reason once it ends `job` (`Abort`; at once if it has
    /// already), with why this member's part ended (its executor stopped, or the node's
    /// network did: no controller could reach it again), or `None` when this node is not an
    /// executor of `job` or leaves it first.
    pub async fn job_ended(&self, job: &JobId) -> Option<Ending> {
        let mut rx = {
            let r = lock(&self.routes);
            match r.executors.get(job) {
                Some(e) => e.ended.subscribe(),
                None => return r.ended.get(job).cloned(),
            }
        };
        tokio::select! {
            r = rx.wait_for(Option::is_some) => r.ok()?.clone(),
            () = self.node.network_stopped() => Some(Ending::failed("this node's network stopped")),
        }
    }

    /// Hosts the controller of `job`; members that join get `spec_hash` back in `Welcome`.
    pub(crate) fn host_controller(&self, job: JobId, spec_hash: [u8; 32]) -> ControllerInbox {
        let (outcomes_tx, outcomes) = mpsc::channel(RESULT_QUEUE);
        let (streaming_tx, streaming) = mpsc::channel(RESULT_QUEUE);
        let (joins_tx, joins) = mpsc::unbounded_channel();
        // Bounded: a member that floods announcements is refused, not queued without end.
        let (progress_tx, progress) = mpsc::channel(PROGRESS_QUEUE);
        let state: Arc<Mutex<Option<Progress>>> = Arc::default();
        lock(&self.routes).controllers.insert(
            job,
            ControllerRoute {
                outcomes: outcomes_tx,
                streaming: streaming_tx,
                joins: joins_tx,
                progress: progress_tx,
                state: state.clone(),
                spec_hash,
            },
        );
        ControllerInbox {
            outcomes,
            streaming,
            joins,
            progress,
            state,
        }
    }

    /// Answers site requests (submitted jobs, offers, queries) with `desk`: a site's
    /// standing peer.
    pub fn serve_site(&self, desk: super::routes::SiteDesk) {
        lock(&self.routes).desk = Some(desk);
    }

    /// Leaves `job`: its executor stops and its results are no longer taken.
    pub fn leave(&self, job: &JobId) {
        let mut r = lock(&self.routes);
        if let Some(e) = r.executors.remove(job) {
            e.actor.stop(None);
        }
        r.controllers.remove(job);
    }
}

impl Communicator {
    /// The controller side of `job` on `host`'s node, with the job's members. Members that
    /// join get `spec_hash` (a hash of the job's specification) back, to check they run the
    /// same job. (Defined here, beside the job table it registers in, so that the
    /// communicator does not point back at the host.)
    pub fn new(host: &JobHost, job: JobId, members: Vec<Member>, chunk_size: u32, spec_hash: [u8; 32]) -> Self {
        let inbox = host.host_controller(job.clone(), spec_hash);
        Self::from_inbox(host.node().clone(), job, members, chunk_size, inbox)
    }
}

impl Drop for JobHost {
    fn drop(&mut self) {
        self.router.abort();
        if let Some(s) = self.supervisor.get() {
            s.stop(None);
        }
        for e in lock(&self.routes).executors.values() {
            e.actor.stop(None);
        }
    }
}

/// The answer of a node that is not a site's standing peer to a site request.
const NO_SITE: &str = "this node takes no submitted jobs (a site's standing peer, `flare-node serve`, does)";

fn route(routes: &Mutex<Routes>, peer: PeerId, job: JobId, body: Request) -> CtlResponse {
    let not_joined = |job: &JobId| CtlResponse::Rejected {
        reason: format!("this node has not joined job {job}"),
    };
    let mut r = lock(routes);
    match body {
        Request::Task { task_id, task } => match r.executors.get(&job) {
            Some(ExecutorRoute { actor, controller, .. }) if controller.is_none_or(|c| c == peer) => {
                match actor.cast(ExecutorMsg::Run {
                    job,
                    from: peer,
                    task_id,
                    task,
                }) {
                    Ok(()) => CtlResponse::Accepted,
                    Err(e) => CtlResponse::Rejected {
                        reason: format!("executor stopped: {e}"),
                    },
                }
            }
            Some(_) => CtlResponse::Rejected {
                reason: format!("{peer} is not the controller of job {job}"),
            },
            None => not_joined(&job),
        },
        Request::TaskResult {
            task_id,
            status,
            output,
            metrics,
            num_samples,
            values,
        } => match r.controllers.get(&job) {
            Some(ControllerRoute { outcomes: tx, .. }) => {
                // The communicator names the member from its own table.
                let outcome = TaskOutcome {
                    peer,
                    member: String::new(),
                    task_id,
                    status,
                    output,
                    metrics,
                    num_samples,
                    values,
                };
                match tx.try_send(outcome) {
                    Ok(()) => CtlResponse::Ack,
                    Err(mpsc::error::TrySendError::Full(_)) => crate::network::busy(),
                    Err(mpsc::error::TrySendError::Closed(_)) => not_joined(&job),
                }
            }
            None => not_joined(&job),
        },
        Request::TaskStreaming {
            task_id,
            output,
            num_samples,
        } => match r.controllers.get(&job) {
            Some(ControllerRoute { streaming: tx, .. }) => {
                let s = StreamingOutput {
                    peer,
                    member: String::new(),
                    task_id,
                    output,
                    num_samples,
                };
                match tx.try_send(s) {
                    Ok(()) => CtlResponse::Ack,
                    Err(mpsc::error::TrySendError::Full(_)) => crate::network::busy(),
                    Err(mpsc::error::TrySendError::Closed(_)) => not_joined(&job),
                }
            }
            None => not_joined(&job),
        },
        Request::Join { member } => match r.controllers.get(&job) {
            Some(c) => {
                // At DEBUG: in a swarm every member hosts a controller side and would print
                // each join; a fixed controller's workflow logs it where it waits for joins.
                tracing::debug!(job = %job, %member, %peer, "member joined");
                let _ = c.joins.send(peer);
                CtlResponse::Welcome {
                    job,
                    spec_hash: c.spec_hash,
                    progress: lock(&c.state).clone().map(Box::new),
                }
            }
            None => not_joined(&job),
        },
        Request::Abort { reason, failed } => match r.executors.get(&job) {
            Some(e) if e.controller.is_none_or(|c| c == peer) => {
                // At DEBUG: every member of a sim would print it; `run` and `sim` report the end.
                tracing::debug!(job = %job, %reason, failed, "the controller ended the job");
                let end = Ending { reason, failed };
                e.ended.send_replace(Some(end.clone()));
                if let Some(e) = r.executors.remove(&job) {
                    e.actor.stop(None);
                }
                r.ended.insert(job, end);
                CtlResponse::Ack
            }
            Some(_) => CtlResponse::Rejected {
                reason: format!("{peer} is not the controller of job {job}"),
            },
            None => not_joined(&job),
        },
        Request::Progress(p) => match r.controllers.get(&job) {
            Some(c) => match c.progress.try_send((peer, *p)) {
                Ok(()) => CtlResponse::Ack,
                Err(mpsc::error::TrySendError::Full(_)) => crate::network::busy(),
                Err(mpsc::error::TrySendError::Closed(_)) => not_joined(&job),
            },
            None => not_joined(&job),
        },
        // Answered by the router (see `JobHost::start`), never routed to a job.
        Request::Submit(_)
        | Request::Offer(_)
        | Request::Launch { .. }
        | Request::Withdraw { .. }
        | Request::Jobs
        | Request::AbortJob(_)
        | Request::Download => CtlResponse::Rejected { reason: NO_SITE.into() },
        Request::Heartbeat => {
            if r.executors.contains_key(&job) || r.controllers.contains_key(&job) {
                CtlResponse::Ack
            } else {
                not_joined(&job)
            }
        }
    }
}
