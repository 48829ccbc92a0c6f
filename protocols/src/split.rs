//! Split learning's messages, carried inside `/flare/ctl/1` tasks and task results.
//!
//! # Wire format
//! The label party (which holds the labels and the top of the network) drives the exchange;
//! each data party holds a band of feature columns and the bottom. Per training batch (step
//! `s` of epoch `e`; `e` is the task's round):
//!
//! ```text
//! label -> every data party   TaskKind::SplitForward(Forward { rows, step: s, train: true, inline_max })
//! data party -> label         TaskResult   values["activations"] = Bytes(rows × cut f32 LE)
//!                                          (or, above inline_max, an output blob holding the
//!                                          one-tensor model "activations" [rows, cut])
//! label -> data party p       TaskKind::SplitBackward(Backward { step: s, lr, gradient })
//!                                          gradient = rows × cut f32 inline, or absent and the
//!                                          task's input blob holds the one-tensor model
//!                                          "gradient" [rows, cut] (above the label party's
//!                                          inline limit)
//! data party -> label         TaskResult   (empty: the bottom took its step)
//! ```
//!
//! After each epoch the held-out samples are measured the same way: a forward with
//! `train: false` over the test ids, in batches, and no backward.
//!
//! What crosses the wire: the data parties receive sample ids, step numbers, the step size and
//! the gradient w.r.t. their own activations, never a label; the label party receives
//! activations, never features. Control frames are capped at [`MAX_CTL_FRAME`], so a step names
//! at most [`MAX_ROWS`] rows and payloads above the inline limit (at most [`MAX_INLINE`]) travel
//! over `/flare/blob/1` as one-tensor models. A forward and its backward share the step number:
//! a data party refuses a gradient for any step but its last training forward.

use serde::{Deserialize, Serialize};

use crate::frame::MAX_CTL_FRAME;
use crate::model::{Model, Tensor};

/// Result value / tensor name: a party's activations, `rows × width` `f32` LE.
pub const ACTIVATIONS: &str = "activations";
/// Tensor name: the gradient w.r.t. a party's activations, `rows × width` `f32`.
pub const GRADIENT: &str = "gradient";

/// The most payload bytes a control message may carry inline: the frame cap less room for the
/// rest of the message (ids, props, CBOR framing).
pub const MAX_INLINE: usize = MAX_CTL_FRAME as usize - (64 << 10);
/// Default inline limit: payloads above it travel over `/flare/blob/1`.
pub const DEFAULT_INLINE_MAX: usize = 512 << 10;
/// Most rows one step may name (so the ids fit a control message with room to spare).
pub const MAX_ROWS: usize = 1 << 16;

/// The forward step: a data party runs its bottom on the named rows and answers with the
/// activations.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Forward {
    /// Sample ids, 1 to [`MAX_ROWS`] of them.
    pub rows: Vec<u32>,
    /// The step number (a training forward and its backward share it).
    pub step: u64,
    /// A training forward: the party keeps what the backward needs. `false` evaluates.
    pub train: bool,
    /// The largest payload, in bytes, the party may put in its result message; a larger one
    /// goes as a blob. Capped at [`MAX_INLINE`] by the receiver.
    pub inline_max: u64,
}

/// The backward step: a data party applies the gradient of its last training forward.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct Backward {
    /// The step of the training forward this gradient answers.
    pub step: u64,
    /// The SGD step size (positive and finite, or the party refuses the step).
    pub lr: f64,
    /// The gradient, `rows × width`, inline; `None` when it is the task's input blob.
    pub gradient: Option<Vec<f32>>,
}

/// `f32`s as little-endian bytes (the inline activations' layout).
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Little-endian bytes as `f32`s; `None` when the length is not a multiple of 4.
pub fn f32s(bytes: &[u8]) -> Option<Vec<f32>> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return None;
    }
    Some(chunks.map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Sample ids as the `u32`s a [`Forward`] carries; `None` when an id does not fit a `u32`.
pub fn row_ids(ids: &[usize]) -> Option<Vec<u32>> {
    ids.iter().map(|&i| u32::try_from(i).ok()).collect()
}

/// A `rows × width` matrix as a one-tensor model named `name` (the blob form of a payload).
pub fn matrix_model(name: &str, rows: usize, width: usize, values: &[f32]) -> Result<Model, String> {
    let t = Tensor::from_f32(vec![rows, width], values).map_err(|e| e.to_string())?;
    Ok(Model::from_tensors([(name.to_owned(), t)]))
}

/// The `rows × width` matrix `name` of a one-tensor model, checked against the shape expected.
pub fn matrix_of(model: &Model, name: &str, rows: usize, width: usize) -> Result<Vec<f32>, String> {
    if model.len() != 1 {
        return Err(format!("expected one tensor {name:?}, got {}", model.len()));
    }
    let t = model.get(name).ok_or_else(|| format!("no tensor {name:?}"))?;
    if t.shape() != [rows, width] {
        return Err(format!("{name} has shape {:?}, expected [{rows}, {width}]", t.shape()));
    }
    t.to_f32().ok_or_else(|| format!("{name} is {:?}, not F32", t.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_refuse_ragged_bytes() {
        let v = [1.5f32, -0.0, f32::MIN_POSITIVE];
        assert_eq!(f32s(&f32_bytes(&v)), Some(v.to_vec()));
        assert_eq!(f32s(&[0; 5]), None);
        assert_eq!(row_ids(&[0, 7, 1796]), Some(vec![0, 7, 1796]));
        assert_eq!(row_ids(&[u32::MAX as usize + 1]), None);
        let m = matrix_model(GRADIENT, 2, 3, &[1.0; 6]).expect("model");
        assert_eq!(matrix_of(&m, GRADIENT, 2, 3).expect("matrix"), vec![1.0; 6]);
        assert!(matrix_of(&m, GRADIENT, 3, 2).is_err());
        assert!(matrix_of(&m, ACTIVATIONS, 2, 3).is_err());
    }
}
