//! The data party: a [`Learner`] that holds its feature columns and the bottom of the network,
//! answers a [`Forward`] with the bottom's activations for the rows named and a [`Backward`]
//! by stepping its bottom down the gradient it is given. Labels never reach it.

use std::collections::BTreeMap;

use flare_protocols::ctl::{TaskKind, Value};
use flare_protocols::model::Model;
use flare_protocols::split::{Backward, Forward};

use super::SplitSpec;
use super::data::PartyFeatures;
use super::net::{Stack, Trace};
use super::wire;
use crate::learner::LearnerError;
use crate::learner::digits::model_of;
use crate::learner::{Learner, TaskContext, TaskReply, TrainOutput};

/// The training forward whose gradient has not come back yet.
struct Pending {
    step: u64,
    trace: Trace,
}

/// A data party of split learning (see the module doc).
pub struct SplitDataParty {
    features: PartyFeatures,
    bottom: Stack,
    pending: Option<Pending>,
}

impl SplitDataParty {
    /// Party `party` of `spec` on its share of the features; its bottom starts from the spec's
    /// seed, as the label party's central baseline does.
    pub fn new(spec: &SplitSpec, party: usize, features: PartyFeatures) -> Result<Self, LearnerError> {
        Ok(Self {
            bottom: spec.bottom_net(party, features.width())?,
            features,
            pending: None,
        })
    }

    /// The bottom network (for tests that compare it with the central baseline's).
    pub fn bottom(&self) -> &Stack {
        &self.bottom
    }

    fn forward(&mut self, f: &Forward) -> Result<TaskReply, String> {
        let ids = &f.rows;
        if ids.is_empty() || ids.len() > wire::MAX_ROWS {
            return Err(format!("{} rows; a step takes 1 to {}", ids.len(), wire::MAX_ROWS));
        }
        let (step, train) = (f.step, f.train);
        let inline_max = usize::try_from(f.inline_max)
            .unwrap_or(usize::MAX)
            .min(wire::MAX_INLINE);
        let x = self
            .features
            .rows(ids)
            .ok_or("a row id is past the end of this party's data")?;
        let trace = self.bottom.forward(x).map_err(|e| e.to_string())?;
        let (rows, width) = (trace.rows(), self.bottom.outputs());
        let mut reply = TaskReply::default();
        if rows * width * 4 <= inline_max {
            reply
                .values
                .insert(wire::ACTIVATIONS.into(), Value::Bytes(wire::f32_bytes(trace.output())));
        } else {
            reply.model = Some(wire::matrix_model(wire::ACTIVATIONS, rows, width, trace.output())?);
        }
        if train {
            self.pending = Some(Pending { step, trace });
        }
        Ok(reply)
    }

    fn backward(&mut self, input: Option<Model>, b: &Backward) -> Result<TaskReply, String> {
        let step = b.step;
        let lr = match b.lr {
            v if v.is_finite() && v > 0.0 => v as f32,
            other => return Err(format!("learning rate {other:?} is not a positive number")),
        };
        let pending = self.pending.take().ok_or("backward without a training forward")?;
        if pending.step != step {
            return Err(format!(
                "gradient for step {step}, the last training forward was step {}",
                pending.step
            ));
        }
        let (rows, width) = (pending.trace.rows(), self.bottom.outputs());
        let grad = match (&input, &b.gradient) {
            (Some(m), None) => wire::matrix_of(m, wire::GRADIENT, rows, width)?,
            (None, Some(g)) => g.clone(),
            _ => return Err("a backward carries its gradient inline or as the input, once".into()),
        };
        if grad.len() != rows * width {
            return Err(format!("gradient of {} values for {rows} rows of {width}", grad.len()));
        }
        if grad.iter().any(|v| !v.is_finite()) {
            return Err("gradient holds a value that is not finite".into());
        }
        self.bottom
            .backward(&pending.trace, &grad, lr)
            .map_err(|e| e.to_string())?;
        Ok(TaskReply::default())
    }
}

impl Learner for SplitDataParty {
    fn train(&mut self, _: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        Err("a split-learning data party runs split_forward and split_backward, not train".into())
    }

    fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        Err("a split-learning data party holds no labels to validate with".into())
    }

    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        match &ctx.task {
            TaskKind::SplitForward(f) if input.is_none() => self.forward(f),
            TaskKind::SplitBackward(b) => self.backward(input, b),
            other => Err(format!(
                "a split-learning data party cannot run task {:?}",
                other.name()
            )),
        }
    }

    fn local_model(&self) -> Option<Model> {
        model_of(&self.bottom.params("bottom.")).ok()
    }
}
