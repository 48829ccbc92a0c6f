//! Where a job's initial model comes from: made from the topology alone (seeded tensors, a
//! model file, a digits network), or, for `[model] from = "MEMBER"`, asked of that member's
//! learner once the workflow runs (its executor must be up to answer).

use anyhow::Context;
use flare_actors::job::Communicator;
use flare_actors::job::initial::initial_from;
use flare_protocols::model::Model;

use super::Setup;
use super::setup::add_one_model;
use super::stored::{add_one_layout, add_one_on_disk};
use crate::topology::{ModelSpec, Topology};
use flare_actors::job::fedavg::GlobalModel;

/// A workflow's initial model, or who to ask for it.
pub enum Initial {
    /// Made already.
    Ready(Model),
    /// The add-one job's seeded model, made when asked for: on disk when it is too large
    /// for memory ([`Initial::get_global`]).
    Seeded(ModelSpec),
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
            None if setup.digits.is_none() && setup.split.is_none() && topo.model.file.is_none() => {
                Self::Seeded(topo.model.clone())
            }
            None => Self::Ready(setup.initial_model(topo)?),
        })
    }

    /// The model, for a workflow that can keep it on disk: a seeded model too large for
    /// memory ([`flare_actors::BlobStore::streams`]) is written there, tensor by tensor.
    pub async fn get_global(self, comm: &Communicator) -> anyhow::Result<GlobalModel> {
        if let Self::Seeded(spec) = &self
            && comm.node().store().streams(add_one_layout(spec)?.len)
        {
            return Ok(GlobalModel::Stored(add_one_on_disk(comm, spec).await?));
        }
        Ok(GlobalModel::Memory(self.get(comm).await?))
    }

    /// The model: the one made, or the named member's answer.
    pub async fn get(self, comm: &Communicator) -> anyhow::Result<Model> {
        match self {
            Self::Ready(model) => Ok(model),
            Self::Seeded(spec) => add_one_model(&spec),
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
