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
use super::{Ending, StreamingOutput, TaskOutcome};

/// What the controller of a job receives from its members.
pub(crate) struct ControllerInbox {
    /// Task results.
    pub outcomes: mpsc::Receiver<TaskOutcome>,
    /// Outputs being produced, that may be pulled before their results.
    pub streaming: mpsc::Receiver<StreamingOutput>,
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
    pub(crate) streaming: mpsc::Sender<StreamingOutput>,
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
    /// What answers a site's requests (a standing peer); none: they are refused.
    pub(crate) desk: Option<SiteDesk>,
}

/// Answers the requests only a site's standing peer takes (submitted and offered jobs,
/// launches, withdrawals, queries: see [`SiteRequest::is_for_site`]): the answer goes back to
/// the sender as it is. Runs on a task of its own: it may ask other members first.
pub type SiteDesk = std::sync::Arc<
    dyn Fn(SiteRequest) -> futures::future::BoxFuture<'static, flare_protocols::ctl::CtlResponse> + Send + Sync,
>;

/// A request for a site's standing peer, and who sent it.
pub struct SiteRequest {
    /// The peer that sent it (a submitter, or another member).
    pub from: libp2p::PeerId,
    /// The job it is about (empty: all of them).
    pub job: JobId,
    /// What it asks.
    pub body: flare_protocols::ctl::Request,
}

impl SiteRequest {
    /// Whether a request is for a site's standing peer rather than for a job's actors.
    pub fn is_for_site(body: &flare_protocols::ctl::Request) -> bool {
        use flare_protocols::ctl::Request;
        matches!(
            body,
            Request::Submit(_)
                | Request::Offer(_)
                | Request::Launch { .. }
                | Request::Withdraw { .. }
                | Request::Jobs
                | Request::AbortJob(_)
                | Request::Download
        )
    }
}
