//! The node's job table, shared by the [`JobHost`](super::JobHost) that routes control
//! requests by it, the supervisor that ends a member's part when its executor stops, and the
//! [`Communicator`](super::Communicator) that reads a controller's inbox. Its own file so
//! that those three point at it and not at each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use flare_protocols::ctl::{JobId, Progress};
use libp2p::PeerId;
use ractor::ActorRef;
use tokio::sync::{mpsc, watch};

use super::executor::ExecutorMsg;
use super::{Ending, TaskOutcome};

/// What the controller of a job receives from its members.
pub(crate) struct ControllerInbox {
    /// Task results.
    pub outcomes: mpsc::Receiver<TaskOutcome>,
    /// Members that joined (sent `Join`).
    pub joins: mpsc::UnboundedReceiver<PeerId>,
    /// Progress announced by other members (jobs without a fixed controller).
    pub progress: mpsc::Receiver<(PeerId, Progress)>,
    /// Where this member says the job stands, told to members that join.
    pub state: Arc<Mutex<Option<Progress>>>,
}

/// Where a job's controller side takes its members' messages.
pub(crate) struct ControllerRoute {
    pub(crate) outcomes: mpsc::Sender<TaskOutcome>,
    pub(crate) joins: mpsc::UnboundedSender<PeerId>,
    pub(crate) progress: mpsc::Sender<(PeerId, Progress)>,
    pub(crate) state: Arc<Mutex<Option<Progress>>>,
    pub(crate) spec_hash: [u8; 32],
}

/// Where a job's executor takes its tasks, and who may send them.
pub(crate) struct ExecutorRoute {
    pub(crate) actor: ActorRef<ExecutorMsg>,
    /// Who may send tasks and end the job; `None`: any member (swarm jobs, where the
    /// aggregator changes from round to round).
    pub(crate) controller: Option<PeerId>,
    /// Set to the controller's end when it ends the job (or to the supervisor's, when the
    /// executor stops).
    pub(crate) ended: watch::Sender<Option<Ending>>,
}

/// The node's job table: which jobs it runs an executor or a controller side of.
#[derive(Default)]
pub(crate) struct Routes {
    pub(crate) executors: HashMap<JobId, ExecutorRoute>,
    pub(crate) controllers: HashMap<JobId, ControllerRoute>,
    /// How each job this node was an executor of ended, for whoever asks after the end.
    pub(crate) ended: HashMap<JobId, Ending>,
    /// What decides on submitted jobs (a site's standing peer); none: they are refused.
    pub(crate) admission: Option<Admission>,
}

/// Decides on a job submitted or offered to this node: the answer goes back to the sender
/// as it is (`Taken`, or `Rejected` with why). Runs on a task of its own: it may ask other
/// members first.
pub type Admission = std::sync::Arc<
    dyn Fn(Submission) -> futures::future::BoxFuture<'static, flare_protocols::ctl::CtlResponse> + Send + Sync,
>;

/// A job handed to this node, and by whom.
pub struct Submission {
    /// The peer that sent it (the submitter, or the member that offers it).
    pub from: libp2p::PeerId,
    /// The job.
    pub job: flare_protocols::job::SignedJob,
    /// Offered by a member that took it already (not submitted here).
    pub offered: bool,
}
