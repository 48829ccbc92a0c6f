//! What the split-learning steps put on the wire: task names, property keys and the byte
//! layouts of row ids, activations and gradients. Shared by the label party's workflow
//! ([`crate::job::split`], which specifies the exchange in prose) and the data party's learner.

use std::collections::BTreeMap;

use flare_protocols::ctl::{MAX_CTL_FRAME, Value};
use flare_protocols::model::{Model, Tensor};

/// The forward step: a data party runs its bottom on the named rows.
pub const FORWARD: &str = "split_forward";
/// The backward step: a data party applies the gradient of its last training forward.
pub const BACKWARD: &str = "split_backward";

/// Property: sample ids, `u32` little-endian each.
pub const ROWS: &str = "rows";
/// Property: the step number (a training forward and its backward share it).
pub const STEP: &str = "step";
/// Property: `true` for a training forward (keep what the backward needs), `false` to evaluate.
pub const TRAIN: &str = "train";
/// Property: the SGD step size for the backward.
pub const LR: &str = "lr";
/// Property: the largest payload, in bytes, a data party may put in its result message; a
/// larger one goes as a blob.
pub const INLINE_MAX: &str = "inline_max";
/// Property / tensor: the gradient w.r.t. a party's activations, `rows × width` `f32` LE.
pub const GRADIENT: &str = "gradient";
/// Value / tensor: a party's activations, `rows × width` `f32` LE.
pub const ACTIVATIONS: &str = "activations";

/// The most payload bytes a control message may carry inline: the frame cap less room for the
/// rest of the message (ids, props, CBOR framing).
pub const MAX_INLINE: usize = MAX_CTL_FRAME as usize - (64 << 10);
/// Default inline limit: payloads above it travel over `/flare/blob/1`.
pub const DEFAULT_INLINE_MAX: usize = 512 << 10;
/// Most rows one step may name (so the ids fit a control message with room to spare).
pub const MAX_ROWS: usize = 1 << 16;

/// `f32`s as little-endian bytes.
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

/// Sample ids as little-endian `u32` bytes; `None` when an id does not fit a `u32`.
pub fn id_bytes(ids: &[usize]) -> Option<Vec<u8>> {
    ids.iter()
        .map(|&i| u32::try_from(i).ok().map(u32::to_le_bytes))
        .collect::<Option<Vec<_>>>()
        .map(|v| v.concat())
}

/// Little-endian `u32` bytes as sample ids; `None` when the length is not a multiple of 4.
pub fn ids(bytes: &[u8]) -> Option<Vec<u32>> {
    let chunks = bytes.chunks_exact(4);
    if !chunks.remainder().is_empty() {
        return None;
    }
    Some(chunks.map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
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

/// Reads a non-negative integer property.
pub fn int_prop(props: &BTreeMap<String, Value>, key: &str) -> Result<u64, String> {
    match props.get(key) {
        Some(Value::Int(v)) => u64::try_from(*v).map_err(|_| format!("property {key:?} is negative")),
        Some(other) => Err(format!("property {key:?} is {other:?}, not an integer")),
        None => Err(format!("property {key:?} is missing")),
    }
}

/// Reads a bytes property.
pub fn bytes_prop<'a>(props: &'a BTreeMap<String, Value>, key: &str) -> Result<&'a [u8], String> {
    match props.get(key) {
        Some(Value::Bytes(b)) => Ok(b),
        Some(_) => Err(format!("property {key:?} is not bytes")),
        None => Err(format!("property {key:?} is missing")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_and_refuse_ragged_bytes() {
        let v = [1.5f32, -0.0, f32::MIN_POSITIVE];
        assert_eq!(f32s(&f32_bytes(&v)), Some(v.to_vec()));
        assert_eq!(f32s(&[0; 5]), None);
        assert_eq!(ids(&id_bytes(&[0, 7, 1796]).expect("ids")), Some(vec![0, 7, 1796]));
        assert_eq!(ids(&[1, 2, 3]), None);
        let m = matrix_model(GRADIENT, 2, 3, &[1.0; 6]).expect("model");
        assert_eq!(matrix_of(&m, GRADIENT, 2, 3).expect("matrix"), vec![1.0; 6]);
        assert!(matrix_of(&m, GRADIENT, 3, 2).is_err());
        assert!(matrix_of(&m, ACTIVATIONS, 2, 3).is_err());
    }
}
