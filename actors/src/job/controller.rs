//! The Controller actor (DESIGN §6): runs one job's workflow on this node, under the node's
//! supervisor.
//!
//! A workflow stays plain async code against a [`Communicator`]; the actor owns the task it
//! runs in, so that the job can be ended from outside ([`ControllerHandle::abort`], e.g.
//! Ctrl-C on `flare-node run`) and a workflow that panics fails this actor, not the process.
//! Either way every member named at the start is told why (`Abort`), so no executor is left
//! waiting on a controller that is gone. Task results do not pass through the mailbox: the
//! communicator hands them to the workflow as they arrive, and model bytes never go near it.

use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;

use libp2p::PeerId;
use ractor::{Actor, ActorCell, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use tokio::task::{AbortHandle, JoinError};

use super::Communicator;

/// Why a job's workflow gave no outcome.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ControllerError {
    /// Ended from outside; the members were told this reason.
    #[error("job aborted: {0}")]
    Aborted(String),
    /// The workflow panicked; the members were told.
    #[error("the workflow failed: {0}")]
    Panicked(String),
    /// The actor stopped before the workflow finished (its node or supervisor went away),
    /// or the outcome was already taken.
    #[error("the controller stopped before the workflow finished")]
    Stopped,
}

/// Messages of the controller actor.
pub enum ControllerMsg<R> {
    /// End the job now: the workflow is cancelled and the members are told `reason`.
    Abort(String),
    /// The workflow's task ended (sent by the actor's own watcher).
    Finished(Result<R, JoinError>),
}

/// The controller actor of one job; `R` is what its workflow returns.
pub struct Controller<R>(PhantomData<fn() -> R>);

type Work<R> = Pin<Box<dyn Future<Output = R> + Send>>;

/// What the controller actor starts with.
pub struct ControllerArgs<R> {
    comm: Arc<Communicator>,
    members: Vec<PeerId>,
    work: Work<R>,
    reply: oneshot::Sender<Result<R, ControllerError>>,
}

/// What the controller actor holds.
pub struct ControllerState<R> {
    comm: Arc<Communicator>,
    /// Who is told when the job ends early.
    members: Vec<PeerId>,
    /// The workflow's task until it is cancelled or has ended.
    task: Option<AbortHandle>,
    /// Why the job was cancelled: the outcome to give once the workflow is gone.
    cancelled: Option<ControllerError>,
    /// Where the outcome goes; taken when it is sent.
    reply: Option<oneshot::Sender<Result<R, ControllerError>>>,
}

impl<R> ControllerState<R> {
    /// Tells the members why the job ends early.
    async fn tell(&self, why: &str) {
        tracing::warn!(job = %self.comm.job(), reason = %why, "the job ends early");
        self.comm.end_job(&self.members, &super::Ending::failed(why)).await;
    }
}

impl<R: Send + 'static> Actor for Controller<R> {
    type Msg = ControllerMsg<R>;
    type State = ControllerState<R>;
    type Arguments = ControllerArgs<R>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: ControllerArgs<R>,
    ) -> Result<ControllerState<R>, ActorProcessingErr> {
        let task = tokio::spawn(args.work);
        let handle = task.abort_handle();
        // The mailbox keeps this until the actor has started.
        tokio::spawn(async move {
            let _ = myself.cast(ControllerMsg::Finished(task.await));
        });
        Ok(ControllerState {
            comm: args.comm,
            members: args.members,
            task: Some(handle),
            cancelled: None,
            reply: Some(args.reply),
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            // The outcome waits for `Finished`: the caller learns of the abort once the
            // workflow is gone, not while it may still be running.
            ControllerMsg::Abort(reason) => {
                if let Some(task) = state.task.take() {
                    task.abort();
                    state.tell(&reason).await;
                    state.cancelled = Some(ControllerError::Aborted(reason));
                }
            }
            ControllerMsg::Finished(result) => {
                state.task = None;
                let outcome = match (state.cancelled.take(), result) {
                    (Some(why), _) => Err(why),
                    (None, Ok(outcome)) => Ok(outcome),
                    (None, Err(e)) if e.is_panic() => {
                        let why = panic_message(e);
                        state.tell(&format!("the controller failed: {why}")).await;
                        if let Some(reply) = state.reply.take() {
                            let _ = reply.send(Err(ControllerError::Panicked(why.clone())));
                        }
                        // Failing (rather than stopping) tells the supervisor.
                        return Err(format!("workflow panicked: {why}").into());
                    }
                    (None, Err(_)) => Err(ControllerError::Stopped),
                };
                if let Some(reply) = state.reply.take() {
                    let _ = reply.send(outcome);
                }
                myself.stop(None);
            }
        }
        Ok(())
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, state: &mut Self::State) -> Result<(), ActorProcessingErr> {
        // Stopped from outside while the workflow ran (the node is going away); the caller
        // gets `Stopped` as the reply is dropped.
        if let Some(task) = state.task.take() {
            task.abort();
            state.tell("the controller stopped").await;
        }
        Ok(())
    }
}

fn panic_message(e: JoinError) -> String {
    let payload = e.into_panic();
    payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic without a message".into())
}

/// The caller's side of a running controller: the outcome, and a way to end the job early.
/// Dropping it aborts a job still running (its caller can no longer take the outcome).
pub struct ControllerHandle<R: Send + 'static> {
    actor: ActorRef<ControllerMsg<R>>,
    outcome: Option<oneshot::Receiver<Result<R, ControllerError>>>,
}

impl<R: Send + 'static> ControllerHandle<R> {
    /// Starts `workflow` as the controller of `comm`'s job, linked to `supervisor`.
    /// `members` are told why the job ends if it ends early (aborted, or the workflow
    /// panicked); on a normal finish the workflow tells them itself.
    pub(crate) async fn spawn<F, Fut>(
        comm: Communicator,
        members: Vec<PeerId>,
        workflow: F,
        supervisor: ActorCell,
    ) -> Result<Self, ractor::SpawnErr>
    where
        F: FnOnce(Arc<Communicator>) -> Fut,
        Fut: Future<Output = R> + Send + 'static,
    {
        let comm = Arc::new(comm);
        let (reply, outcome) = oneshot::channel();
        let args = ControllerArgs {
            work: Box::pin(workflow(comm.clone())),
            comm,
            members,
            reply,
        };
        let (actor, _) = Actor::spawn_linked(None, Controller(PhantomData), args, supervisor).await?;
        Ok(Self {
            actor,
            outcome: Some(outcome),
        })
    }

    /// Ends the job now: the workflow is cancelled, the members are told `reason`, and
    /// [`outcome`](Self::outcome) gives [`ControllerError::Aborted`]. Does nothing once the
    /// workflow has finished.
    pub fn abort(&self, reason: &str) {
        let _ = self.actor.cast(ControllerMsg::Abort(reason.to_owned()));
    }

    /// The workflow's outcome, once it ends. Cancel-safe: it can be polled again after a
    /// `select!` dropped it (the pattern for "abort on Ctrl-C, then wait").
    pub async fn outcome(&mut self) -> Result<R, ControllerError> {
        let Some(rx) = self.outcome.as_mut() else {
            return Err(ControllerError::Stopped);
        };
        let r = rx.await.unwrap_or(Err(ControllerError::Stopped));
        self.outcome = None;
        r
    }

    /// [`Self::outcome`], unless `stop` resolves first (e.g. Ctrl-C, or an abort): then the
    /// job is aborted with the reason it gives (the members are told) and this gives that
    /// outcome.
    pub async fn outcome_unless(&mut self, stop: impl Future<Output = String>) -> Result<R, ControllerError> {
        tokio::select! {
            r = self.outcome() => r,
            reason = stop => {
                self.abort(&reason);
                self.outcome().await
            }
        }
    }

    /// The actor, e.g. to watch it from a supervisor.
    pub fn actor(&self) -> &ActorRef<ControllerMsg<R>> {
        &self.actor
    }
}

impl<R: Send + 'static> Drop for ControllerHandle<R> {
    fn drop(&mut self) {
        if self.outcome.is_some() {
            self.abort("the job's caller went away");
        }
    }
}
