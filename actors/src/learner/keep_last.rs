//! A wrapper that lets a learner which keeps no model of its own take part in workflows that
//! ask members for their own models (cross-site evaluation's `submit`).

use std::collections::BTreeMap;

use flare_protocols::model::Model;

use super::{Learner, TaskContext, TaskReply, TrainOutput};

/// Wraps a learner that does not keep its own model so it can take part in cross-site
/// evaluation: remembers the model of its last `train` task and submits that (the inner
/// learner's own [`Learner::local_model`] wins when it has one).
pub struct KeepLastModel<L> {
    inner: L,
    last: Option<Model>,
}

impl<L> KeepLastModel<L> {
    /// `inner`, remembering its trained models.
    pub fn new(inner: L) -> Self {
        Self { inner, last: None }
    }
}

impl<L: Learner> Learner for KeepLastModel<L> {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let out = self.inner.train(global, ctx)?;
        self.last = Some(out.model.clone());
        Ok(out)
    }

    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        self.inner.validate(model, ctx)
    }

    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        self.inner.run_task(input, ctx)
    }

    fn local_model(&self) -> Option<Model> {
        self.inner.local_model().or_else(|| self.last.clone())
    }
}
