//! Built-in pure-Rust learners and the model representation they exchange.
//!
//! - [`NamedTensor`]: one named `f32` tensor; a model is a list of them sorted by name, the same
//!   canonical order the safetensors encoding uses.
//! - [`Learner`]: the trait every learner implements and the executor drives, with what
//!   crosses it ([`TaskContext`], [`TrainOutput`], [`TaskReply`]) and [`AddOne`], the
//!   exact-arithmetic check learner (every weight + 1.0 per round).
//! - [`KeepLastModel`]: remembers a learner's last trained model, for workflows that ask a
//!   member for its own model.
//! - [`Mlp`]: a multi-layer perceptron classifier trained with mini-batch SGD.
//! - [`digits`]: the MLP on the digits data as a workflow `Learner`, and the data dealt over
//!   the members.
//! - [`external`]: a learner that is a separate process (any language) speaking the Client API.
//! - [`inference`]: federated inference with a frozen network, then FedAvg of a head on the
//!   embeddings each member keeps.
//! - [`recipe`]: what a kind of digits model gives the runtime (MLP here, `tch` networks in
//!   [`torch`]).
//! - `tch_model` (the `torch` feature): models to and from `tch` tensors, by name.
//! - [`stream`]: learners that update a model tensor by tensor ([`TensorStream`]), for
//!   models larger than memory.
//! - [`split`]: split learning on vertically split digits (data parties' bottoms, the label
//!   party's top, the central baseline).

mod api;
pub mod arriving;
pub mod digits;
pub mod external;
pub mod inference;
mod keep_last;
mod mlp;
mod paced;
pub mod recipe;
pub mod split;
pub mod stream;
#[cfg(feature = "torch")]
pub mod tch_model;
pub mod torch;

pub use api::{AddOne, Learner, TaskContext, TaskReply, TrainOutput};
pub use keep_last::KeepLastModel;
pub use mlp::{Eval, Mlp, MlpConfig, TrainStats};
pub use paced::Paced;
pub use stream::TensorStream;

/// A named, shaped `f32` tensor: the unit a model is made of and the unit aggregation averages.
///
/// Kept free of any tensor library so that workflows, aggregators and the safetensors encoding
/// can handle models from any learner the same way.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Parameter name, e.g. `layers.0.weight`.
    pub name: String,
    /// Dimensions, outermost first (PyTorch order: a linear weight is `[out, in]`).
    pub shape: Vec<usize>,
    /// The values, row-major; `values.len()` is the product of `shape`.
    pub values: Vec<f32>,
}

impl NamedTensor {
    /// A tensor of zeros, e.g. for an aggregation accumulator or a synthetic test model.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self {
            name: name.into(),
            shape,
            values: vec![0.0; n],
        }
    }

    /// Number of elements the shape calls for (the product of its dimensions), saturating at
    /// `usize::MAX` so that a hostile shape read from the network cannot overflow.
    pub fn numel(&self) -> usize {
        self.shape
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(d))
            .unwrap_or(usize::MAX)
    }
}

/// Why a learner refused a model, a configuration or a data set.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LearnerError {
    /// A parameter the model needs was not in the tensors given.
    #[error("parameter {name:?} is missing")]
    MissingParam {
        /// The missing name.
        name: String,
    },
    /// A tensor's name is not one of the model's parameters (another architecture?).
    #[error("parameter {name:?} is not part of this model")]
    UnknownParam {
        /// The unexpected name.
        name: String,
    },
    /// The same name was given twice.
    #[error("parameter {name:?} is given more than once")]
    DuplicateParam {
        /// The repeated name.
        name: String,
    },
    /// A tensor has the right name but the wrong shape.
    #[error("parameter {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The parameter.
        name: String,
        /// The model's shape for it.
        expected: Vec<usize>,
        /// The shape given.
        found: Vec<usize>,
    },
    /// A tensor's value count does not match its own shape.
    #[error("parameter {name:?} holds {len} values but its shape {shape:?} needs {needed}")]
    ValueCount {
        /// The parameter.
        name: String,
        /// Its declared shape.
        shape: Vec<usize>,
        /// Values the shape needs.
        needed: usize,
        /// Values present.
        len: usize,
    },
    /// The data set does not fit the model (feature dimension or class count).
    #[error("data set does not fit the model: {0}")]
    DataMismatch(String),
    /// The learner's configuration is unusable (zero-width layer, zero batch size, bad rate, ...).
    #[error("invalid learner configuration: {0}")]
    InvalidConfig(String),
}

/// Adds 1.0 to every value of every tensor: the add-one learner, whose result after R rounds of any
/// workflow is exactly `initial + R` (small integers are exact in `f32`), so it checks the plumbing
/// and the aggregation arithmetic without any learning noise.
pub fn add_one(params: &mut [NamedTensor]) {
    for t in params {
        for v in &mut t.values {
            *v += 1.0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_one_adds_exactly_one() {
        let mut p = vec![NamedTensor::zeros("a", vec![2, 3]), NamedTensor::zeros("b", vec![1])];
        p[1].values[0] = 41.5;
        for _ in 0..5 {
            add_one(&mut p);
        }
        assert!(p[0].values.iter().all(|&v| v == 5.0));
        assert_eq!(p[1].values, vec![46.5]);
        assert_eq!(p[0].numel(), 6);
        let hostile = NamedTensor {
            name: "x".into(),
            shape: vec![usize::MAX, 2],
            values: vec![],
        };
        assert_eq!(hostile.numel(), usize::MAX);
    }
}
