//! Learners that work on a model one tensor at a time, so that a model larger than memory
//! can be trained: the executor hands such a learner each tensor of the received model in
//! turn, read from a file on disk and written back in place, and never holds the whole model
//! (its memory is the largest tensor). An add-one step, a quantiser, a LoRA merge or a
//! learner that trains one layer group at a time fit this shape; a learner that needs every
//! tensor at once does not, and gets the whole model in memory as before.
//!
//! The model's layout cannot change on this path: every tensor keeps its name, dtype and size.

use std::collections::BTreeMap;

use flare_protocols::model::{DType, Layout};

use super::TaskContext;
use crate::store::Scratch;

/// A learner's tensor-at-a-time training step (see the module doc).
pub trait TensorStream {
    /// Updates tensor `name` (`data`: its little-endian elements of `dtype`) in place.
    fn tensor(&mut self, name: &str, dtype: DType, data: &mut [u8], ctx: &TaskContext) -> Result<(), String>;

    /// Ends the pass over the model: the result's aggregation weight and its metrics.
    fn finish(&mut self, ctx: &TaskContext) -> Result<(u64, BTreeMap<String, f64>), String>;
}

/// Runs `learner` over the model in `file` (laid out as `layout`), tensor by tensor, in
/// place; returns what [`TensorStream::finish`] says.
pub fn stream_in_place(
    learner: &mut dyn TensorStream,
    file: &Scratch,
    layout: &Layout,
    ctx: &TaskContext,
) -> Result<(u64, BTreeMap<String, f64>), String> {
    let mut buf = Vec::new();
    for r in &layout.regions {
        let len = usize::try_from(r.bytes.end - r.bytes.start)
            .map_err(|_| format!("tensor {:?} is too large for this machine", r.name))?;
        buf.resize(len, 0);
        file.read_at(&mut buf, r.bytes.start)
            .map_err(|e| format!("reading tensor {:?}: {e}", r.name))?;
        learner.tensor(&r.name, r.dtype, &mut buf, ctx)?;
        file.write_at(&buf, r.bytes.start)
            .map_err(|e| format!("writing tensor {:?}: {e}", r.name))?;
    }
    learner.finish(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::learner::{AddOne, Learner};
    use flare_protocols::ctl::{JobId, TaskKind};
    use flare_protocols::model::{Model, Tensor};

    fn ctx() -> TaskContext {
        TaskContext {
            job: JobId("j".into()),
            member: "m".into(),
            task: TaskKind::Train,
            round: 0,
            props: BTreeMap::new(),
        }
    }

    #[test]
    fn streaming_add_one_equals_add_one_in_memory() {
        let model = Model::from_tensors([
            (
                "a",
                Tensor::from_f32(vec![2, 3], &[0.5, 1.0, -2.0, 3.0, 4.0, 1e7]).expect("t"),
            ),
            ("b", Tensor::new(DType::I64, vec![2], vec![7; 16]).expect("t")),
            ("c", Tensor::from_f32(vec![1], &[41.0]).expect("t")),
        ]);
        let mut learner = AddOne { num_samples: 3 };
        let expected = learner.train(model.clone(), &ctx()).expect("train");
        let store = crate::BlobStore::memory();
        let file = store.scratch(model.as_safetensors().len() as u64).expect("scratch");
        file.write_at(model.as_safetensors(), 0).expect("write");
        let stream = learner.streaming().expect("add-one streams");
        let (samples, _) = stream_in_place(stream, &file, &model.layout(), &ctx()).expect("stream");
        assert_eq!(samples, 3);
        let mut out = vec![0; file.len() as usize];
        file.read_at(&mut out, 0).expect("read");
        assert_eq!(out, expected.model.as_safetensors());
    }
}
