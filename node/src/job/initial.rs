//! Where a job's initial model comes from: made from the topology alone (seeded tensors, a
//! model file, a digits network), or, for `[model] from = "MEMBER"`, asked of that member's
//! learner once the workflow runs (its executor must be up to answer).

use anyhow::Context;
use flare_actors::job::Communicator;
use flare_actors::job::initial::initial_from;
use flare_protocols::model::Model;

use super::Setup;
use crate::topology::Topology;

/// A workflow's initial model, or who to ask for it.
pub enum Initial {
    /// Made already.
    Ready(Model),
    /// Asked of this member's learner by [`Initial::get`].
    From {
        /// The member `[model] from` names.
        member: String,
        /// How long it may take to join and to answer (the job's round timeout).
        timeout: std::time::Duration,
    },
}

impl Initial {
    /// The topology's initial model, made now unless a member gives it.
    pub fn of(topo: &Topology, setup: &Setup) -> anyhow::Result<Self> {
        Ok(match &topo.model.from {
            Some(member) => Self::From {
                member: member.clone(),
                timeout: topo.round_timeout,
            },
            None => Self::Ready(setup.initial_model(topo)?),
        })
    }

    /// The model: the one made, or the named member's answer.
    pub async fn get(self, comm: &Communicator) -> anyhow::Result<Model> {
        match self {
            Self::Ready(model) => Ok(model),
            Self::From { member, timeout } => {
                let peer = comm
                    .peers()
                    .iter()
                    .find(|m| m.name == member)
                    .map(|m| m.peer_id)
                    .with_context(|| format!("[model] from names {member:?}, who is not a member of the job"))?;
                Ok(initial_from(comm, peer, timeout, timeout).await?)
            }
        }
    }
}
