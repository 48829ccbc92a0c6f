//! One per node: routes inbound control requests to the jobs this node takes part in.
//!
//! `Task` goes to the executor of that job, `TaskResult` to the controller of that job; a
//! request for a job this node has not joined is answered `Rejected`, naming the job.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flare_protocols::ctl::{CtlResponse, JobId, Request};
use libp2p::PeerId;
use ractor::{Actor, ActorRef};
use tokio::sync::mpsc;

use super::executor::{Executor, ExecutorArgs, ExecutorMsg, Learner};
use super::{Task, TaskOutcome};
use crate::Node;
use crate::network::NetworkError;

/// A task result on its way to the controller of its job.
pub(crate) type Outcomes = mpsc::UnboundedSender<TaskOutcome>;

#[derive(Default)]
struct Routes {
    executors: HashMap<JobId, (ActorRef<ExecutorMsg>, PeerId)>,
    controllers: HashMap<JobId, Outcomes>,
}

/// The node's job table and the task that routes control requests by it.
pub struct JobHost {
    node: Arc<Node>,
    routes: Arc<Mutex<Routes>>,
    router: tokio::task::JoinHandle<()>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl JobHost {
    /// Takes over the node's inbound control requests.
    pub fn start(node: Arc<Node>) -> Result<Self, NetworkError> {
        let mut inbound = node.subscribe_ctl()?;
        let routes: Arc<Mutex<Routes>> = Arc::default();
        let r = routes.clone();
        let router = tokio::spawn(async move {
            while let Some(req) = inbound.recv().await {
                let job = req.request.job.clone();
                let response = route(&r, req.peer, job, req.request.body);
                let _ = req.reply.send(response);
            }
        });
        Ok(Self { node, routes, router })
    }

    /// The node.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// Joins `job` as an executor that takes tasks from the controller at `controller`.
    pub async fn join_as_executor(
        &self,
        job: JobId,
        controller: PeerId,
        member: &str,
        learner: Box<dyn Learner>,
    ) -> Result<ActorRef<ExecutorMsg>, ractor::SpawnErr> {
        let (actor, _) = Actor::spawn(
            None,
            Executor,
            ExecutorArgs {
                node: self.node.clone(),
                member: member.to_owned(),
                learner,
            },
        )
        .await?;
        lock(&self.routes).executors.insert(job, (actor.clone(), controller));
        Ok(actor)
    }

    /// Hosts the controller of `job`: results for it arrive on the returned receiver.
    pub(crate) fn host_controller(&self, job: JobId) -> mpsc::UnboundedReceiver<TaskOutcome> {
        let (tx, rx) = mpsc::unbounded_channel();
        lock(&self.routes).controllers.insert(job, tx);
        rx
    }

    /// Leaves `job`: its executor stops and its results are no longer taken.
    pub fn leave(&self, job: &JobId) {
        let mut r = lock(&self.routes);
        if let Some((actor, _)) = r.executors.remove(job) {
            actor.stop(None);
        }
        r.controllers.remove(job);
    }
}

impl Drop for JobHost {
    fn drop(&mut self) {
        self.router.abort();
        for (actor, _) in lock(&self.routes).executors.values() {
            actor.stop(None);
        }
    }
}

fn route(routes: &Mutex<Routes>, peer: PeerId, job: JobId, body: Request) -> CtlResponse {
    let not_joined = |job: &JobId| CtlResponse::Rejected {
        reason: format!("this node has not joined job {job}"),
    };
    let r = lock(routes);
    match body {
        Request::Task {
            task_id,
            name,
            round,
            input,
            props,
        } => match r.executors.get(&job) {
            Some((actor, controller)) if *controller == peer => {
                let task = Task {
                    name,
                    round,
                    input,
                    props,
                };
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
        } => match r.controllers.get(&job) {
            Some(tx) => {
                // The communicator names the member from its own table.
                let outcome = TaskOutcome {
                    peer,
                    member: String::new(),
                    task_id,
                    status,
                    output,
                    metrics,
                    num_samples,
                };
                match tx.send(outcome) {
                    Ok(()) => CtlResponse::Ack,
                    Err(_) => not_joined(&job),
                }
            }
            None => not_joined(&job),
        },
        Request::Heartbeat | Request::Join { .. } | Request::Abort { .. } => {
            if r.executors.contains_key(&job) || r.controllers.contains_key(&job) {
                CtlResponse::Ack
            } else {
                not_joined(&job)
            }
        }
    }
}
