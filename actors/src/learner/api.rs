//! The interface between a workflow's tasks and local training code: the [`Learner`] trait and
//! what crosses it. It lives below `job/` so that learners depend on nothing that runs jobs;
//! the executor drives any learner through it.

use std::collections::BTreeMap;

use flare_protocols::ctl::{JobId, TaskKind, Value};
use flare_protocols::model::{DType, Model};

use super::stream::TensorStream;

/// What a learner knows about the task it runs.
#[derive(Clone, Debug)]
pub struct TaskContext {
    /// The job.
    pub job: JobId,
    /// This member's name.
    pub member: String,
    /// What the task asks, with its typed parameters.
    pub task: TaskKind,
    /// Workflow round.
    pub round: u32,
    /// Task parameters.
    pub props: BTreeMap<String, Value>,
}

/// What one training task produced.
#[derive(Clone, Debug)]
pub struct TrainOutput {
    /// The new local model.
    pub model: Model,
    /// Samples it was trained on (its aggregation weight).
    pub num_samples: u64,
    /// Metrics to report (loss, accuracy, ...).
    pub metrics: BTreeMap<String, f64>,
}

/// What a task other than `train` and `validate` produced (see [`Learner::run_task`]).
#[derive(Clone, Debug, Default)]
pub struct TaskReply {
    /// An output model, stored as a blob for the requester to pull.
    pub model: Option<Model>,
    /// Its aggregation weight.
    pub num_samples: u64,
    /// Metrics to report.
    pub metrics: BTreeMap<String, f64>,
    /// Small named outputs carried in the result message itself.
    pub values: BTreeMap<String, Value>,
}

/// Local training code behind one interface, so every workflow can drive any learner.
/// Runs on a blocking thread: it may take as long as training takes.
pub trait Learner: Send + 'static {
    /// Trains from `global` and returns the local result.
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String>;

    /// Measures `model` on local validation data.
    fn validate(&mut self, model: &Model, ctx: &TaskContext) -> Result<BTreeMap<String, f64>, String>;

    /// Runs a workflow-specific task (`ctx.task` says which; e.g. embedding, or split
    /// learning's forward and backward steps). Learners that only train and validate refuse it.
    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        let _ = input;
        Err(format!("this learner cannot run task {:?}", ctx.task.name()))
    }

    /// The model this member holds now (its latest local state), for workflows that
    /// evaluate or share members' own models; `None` when it has none yet.
    fn local_model(&self) -> Option<Model> {
        None
    }

    /// This learner's tensor-at-a-time training step, when it has one: a `train` task whose
    /// model is too large for memory ([`crate::BlobStore::streams`]) then runs through it,
    /// never holding the whole model (see [`super::stream`]).
    fn streaming(&mut self) -> Option<&mut dyn TensorStream> {
        None
    }
}

impl TensorStream for AddOne {
    fn tensor(&mut self, _: &str, dtype: DType, data: &mut [u8], _: &TaskContext) -> Result<(), String> {
        if dtype == DType::F32 {
            for b in data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) + 1.0;
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
        Ok(())
    }

    fn finish(&mut self, _: &TaskContext) -> Result<(u64, BTreeMap<String, f64>), String> {
        Ok((self.num_samples, BTreeMap::new()))
    }

    fn piece_bytes(&self) -> Option<usize> {
        Some(PIECE_BYTES)
    }

    fn samples_ahead(&mut self) -> Option<u64> {
        Some(self.num_samples)
    }
}

/// How much of a tensor an element-by-element learner is handed at once.
const PIECE_BYTES: usize = 4 << 20;

/// Adds 1.0 to every f32 weight: the exact-arithmetic check of every workflow.
#[derive(Clone, Debug)]
pub struct AddOne {
    /// The weight this member reports (its "sample count").
    pub num_samples: u64,
}

impl Learner for AddOne {
    fn train(&mut self, mut global: Model, _: &TaskContext) -> Result<TrainOutput, String> {
        global.map_f32(|v| v + 1.0);
        Ok(TrainOutput {
            model: global,
            num_samples: self.num_samples,
            metrics: BTreeMap::new(),
        })
    }

    fn streaming(&mut self) -> Option<&mut dyn TensorStream> {
        Some(self)
    }

    /// The model's mean f32 weight (`mean_weight`, exact for small integers, so a cross-site
    /// matrix of add-one models can be checked to the bit) and this member's weight
    /// (`samples`, which tells the sites apart).
    fn validate(&mut self, model: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        let (mut sum, mut n) = (0.0f64, 0u64);
        for (name, t) in model.iter() {
            let values = t
                .to_f32()
                .ok_or_else(|| format!("tensor {name:?} is {:?}, not F32", t.dtype()))?;
            sum += values.iter().map(|&v| f64::from(v)).sum::<f64>();
            n += values.len() as u64;
        }
        if n == 0 {
            return Err("the model has no weights".into());
        }
        Ok(BTreeMap::from([
            ("mean_weight".to_owned(), sum / n as f64),
            ("samples".to_owned(), self.num_samples as f64),
        ]))
    }
}
