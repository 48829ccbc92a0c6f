//! The node's supervisor of its job actors (DESIGN §6's node supervisor). Every executor and
//! every controller is spawned linked to it. When an executor stops, whether it failed or was
//! stopped from outside, the supervisor ends that member's part of the job at once: whoever
//! waits on the job ([`JobHost::job_ended`](super::JobHost::job_ended), e.g. `flare-node run`)
//! learns why, and later tasks of the job are refused naming the stopped executor. A
//! controller that fails has told its members already (see [`super::controller`]); the
//! supervisor logs it.
//!
//! It does not restart the executor. A learner holds the member's data and model; a fresh
//! one mid-job would train from the wrong state. The job's controller leaves the member out
//! of the rounds that follow, as it does for a member that died.

use std::sync::{Arc, Mutex};

use ractor::{Actor, ActorProcessingErr, ActorRef, SupervisionEvent};

use super::routes::Routes;
use crate::lock;

/// The supervisor actor; it takes no messages, only its children's lifecycle events.
pub(crate) struct Supervisor;

impl Actor for Supervisor {
    type Msg = ();
    type State = Arc<Mutex<Routes>>;
    type Arguments = Arc<Mutex<Routes>>;

    async fn pre_start(&self, _: ActorRef<()>, routes: Self::Arguments) -> Result<Self::State, ActorProcessingErr> {
        Ok(routes)
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<()>,
        event: SupervisionEvent,
        routes: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure, why) = match event {
            SupervisionEvent::ActorFailed(cell, e) => (cell, true, format!("the executor failed: {e}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let reason = reason.map(|r| format!(": {r}")).unwrap_or_default();
                (cell, false, format!("the executor stopped{reason}"))
            }
            _ => return Ok(()),
        };
        let r = lock(routes);
        let mut executor = false;
        for (job, route) in r.executors.iter().filter(|(_, e)| e.actor.get_id() == cell.get_id()) {
            executor = true;
            if route.ended.borrow().is_none() {
                tracing::warn!(job = %job, reason = %why, "executor gone: this member's part of the job ends");
                route.ended.send_replace(Some(super::Ending::failed(why.clone())));
            }
        }
        if failure && !executor {
            tracing::warn!(actor = %cell.get_id(), "a controller failed; it told its members");
        }
        Ok(())
    }
}
