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

    /// `Some(n)` when this learner updates each element on its own (add-one, a quantiser):
    /// it is then handed each tensor in pieces of at most `n` bytes (whole elements), and
    /// its memory stays `n` however large the tensors are. `None`: whole tensors.
    fn piece_bytes(&self) -> Option<usize> {
        None
    }

    /// The weight [`Self::finish`] will report, when it is known before the pass (a learner
    /// whose sample count is its data set's size): a controller may then fold the output
    /// while it is produced (see [`crate::blob::pending`]). `None`: the output is pulled
    /// once the pass is over.
    fn samples_ahead(&mut self) -> Option<u64> {
        None
    }
}

/// Runs `learner` over the model in `file`, its layout read from the file's header (see
/// [`stream_in_place`]).
pub fn stream_file(
    learner: &mut dyn TensorStream,
    file: &Scratch,
    ctx: &TaskContext,
) -> Result<(u64, BTreeMap<String, f64>), String> {
    let layout =
        crate::store::read_layout(file.len(), |buf| file.read_at(buf, 0)).map_err(|e| format!("input model: {e}"))?;
    stream_in_place(learner, file, &layout, ctx)
}

/// The length of the pieces `learner` takes ([`TensorStream::piece_bytes`]), cut to whole
/// elements of any dtype (8 bytes at most); `None`: whole tensors.
pub(super) fn piece_len(learner: &dyn TensorStream) -> Option<u64> {
    learner.piece_bytes().map(|n| (n.max(8) / 8 * 8) as u64)
}

/// Runs `learner` over the model in `file` (laid out as `layout`), tensor by tensor (or piece
/// by piece, see [`TensorStream::piece_bytes`]), in place; returns what
/// [`TensorStream::finish`] says.
pub fn stream_in_place(
    learner: &mut dyn TensorStream,
    file: &Scratch,
    layout: &Layout,
    ctx: &TaskContext,
) -> Result<(u64, BTreeMap<String, f64>), String> {
    let piece = piece_len(learner);
    let mut buf = Vec::new();
    for r in &layout.regions {
        let step = piece.unwrap_or(r.bytes.end - r.bytes.start);
        let mut at = r.bytes.start;
        while at < r.bytes.end || (at == r.bytes.start && r.bytes.is_empty()) {
            let len = usize::try_from(step.min(r.bytes.end - at))
                .map_err(|_| format!("tensor {:?} is too large for this machine", r.name))?;
            buf.resize(len, 0);
            file.read_at(&mut buf, at)
                .map_err(|e| format!("reading tensor {:?}: {e}", r.name))?;
            learner.tensor(&r.name, r.dtype, &mut buf, ctx)?;
            file.write_at(&buf, at)
                .map_err(|e| format!("writing tensor {:?}: {e}", r.name))?;
            if len == 0 {
                break;
            }
            at += len as u64;
        }
    }
    learner.finish(ctx)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::learner::{AddOne, Learner};
    use flare_protocols::ctl::{JobId, TaskKind};
    use flare_protocols::model::{Model, Tensor};

    /// A train task's context, for learners' tests.
    pub(crate) fn ctx() -> TaskContext {
        TaskContext {
            job: JobId("j".into()),
            member: "m".into(),
            task: TaskKind::Train,
            round: 0,
            props: BTreeMap::new(),
        }
    }

    /// Doubles every f32, element by element, counting the pieces it is handed.
    struct Doubler(Vec<usize>);

    impl TensorStream for Doubler {
        fn tensor(&mut self, _: &str, _: DType, data: &mut [u8], _: &TaskContext) -> Result<(), String> {
            self.0.push(data.len());
            for b in data.chunks_exact_mut(4) {
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 2.0;
                b.copy_from_slice(&v.to_le_bytes());
            }
            Ok(())
        }

        fn finish(&mut self, _: &TaskContext) -> Result<(u64, BTreeMap<String, f64>), String> {
            Ok((1, BTreeMap::new()))
        }

        fn piece_bytes(&self) -> Option<usize> {
            Some(13)
        }
    }

    #[test]
    fn an_elementwise_learner_gets_tensors_in_pieces_of_whole_elements() {
        let values: Vec<f32> = (0..7).map(|i| i as f32).collect();
        let model = Model::from_tensors([
            ("a", Tensor::from_f32(vec![7], &values).expect("t")),
            ("e", Tensor::from_f32(vec![0], &[]).expect("t")),
        ]);
        let file = crate::BlobStore::memory()
            .scratch(model.as_safetensors().len() as u64)
            .expect("scratch");
        file.write_at(model.as_safetensors(), 0).expect("write");
        let mut learner = Doubler(Vec::new());
        stream_in_place(&mut learner, &file, &model.layout(), &ctx()).expect("stream");
        // 13 bytes round down to 8: 28 bytes of "a" in 8 + 8 + 8 + 4, and the empty "e" once.
        assert_eq!(
            learner.0.iter().filter(|&&n| n > 0).copied().collect::<Vec<_>>(),
            [8, 8, 8, 4]
        );
        let mut out = vec![0; file.len() as usize];
        file.read_at(&mut out, 0).expect("read");
        let doubled = Model::from_safetensors(&out).expect("model");
        assert_eq!(
            doubled.f32("a").expect("a"),
            values.iter().map(|v| v * 2.0).collect::<Vec<_>>()
        );
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
        assert!(learner.piece_bytes().is_some(), "add-one takes its tensors in pieces");
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
