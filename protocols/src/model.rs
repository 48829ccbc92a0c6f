//! Models: ordered maps `name -> tensor`, encoded as safetensors with a canonical layout.
//!
//! # Encoding
//! A model blob is a safetensors file, so PyTorch (`safetensors.torch.load_file`) and Hugging
//! Face tools read it directly:
//!
//! ```text
//! header_len:u64le  header:JSON (padded with spaces to a multiple of 8)  data
//! ```
//! Tensors are laid out by descending dtype alignment, then by name (the `safetensors`
//! crate's order), and the header carries no `__metadata__`. So two models of the same
//! architecture (same names, dtypes and shapes) have byte-identical headers and every tensor at
//! the same offset, whatever their values: chunk `i` of one client's model covers exactly the
//! same tensor elements as chunk `i` of another's, and an aggregator can average them chunk
//! by chunk without ever holding a whole model per client. The data section starts at a
//! multiple of 8, so with a chunk size that is a multiple of 8 no element straddles two chunks.
//!
//! [`Layout`] reads that structure back from a header alone.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Largest header a peer's model may announce (the safetensors crate's own limit is 100 MB).
pub const MAX_HEADER: u64 = 100_000_000;

/// Element type of a tensor (the safetensors dtypes that federated models use).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub enum DType {
    /// 32-bit float.
    F32,
    /// 64-bit float.
    F64,
    /// 16-bit float.
    F16,
    /// bfloat16.
    BF16,
    /// 64-bit signed integer.
    I64,
    /// 32-bit signed integer.
    I32,
    /// 8-bit unsigned integer.
    U8,
    /// Boolean (one byte).
    Bool,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F64 | DType::I64 => 8,
            DType::F32 | DType::I32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::U8 | DType::Bool => 1,
        }
    }

    fn to_st(self) -> safetensors::Dtype {
        use safetensors::Dtype as S;
        match self {
            DType::F32 => S::F32,
            DType::F64 => S::F64,
            DType::F16 => S::F16,
            DType::BF16 => S::BF16,
            DType::I64 => S::I64,
            DType::I32 => S::I32,
            DType::U8 => S::U8,
            DType::Bool => S::BOOL,
        }
    }

    fn from_st(d: safetensors::Dtype) -> Option<Self> {
        use safetensors::Dtype as S;
        Some(match d {
            S::F32 => DType::F32,
            S::F64 => DType::F64,
            S::F16 => DType::F16,
            S::BF16 => DType::BF16,
            S::I64 => DType::I64,
            S::I32 => DType::I32,
            S::U8 => DType::U8,
            S::BOOL => DType::Bool,
            _ => return None,
        })
    }
}

/// Why a model could not be built, read or written.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// Data length does not match dtype and shape.
    #[error("tensor {name:?}: {got} bytes of data, {dtype:?} {shape:?} needs {expected}")]
    WrongLength {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
        /// Its shape.
        shape: Vec<usize>,
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        expected: usize,
    },
    /// The tensor is not of the dtype asked for.
    #[error("tensor {name:?} is {got:?}, not {want:?}")]
    WrongDType {
        /// Tensor name.
        name: String,
        /// Its dtype.
        got: DType,
        /// The dtype asked for.
        want: DType,
    },
    /// The bytes are not a valid safetensors model (truncated, corrupt, unsupported dtype).
    #[error("not a valid safetensors model: {0}")]
    Format(String),
    /// A DIFF result does not apply to the model it was taken from (see [`Model::add_diff`]).
    #[error("a DIFF result: tensor {name:?} {reason}")]
    Diff {
        /// The tensor.
        name: String,
        /// What does not fit.
        reason: String,
    },
    /// Reading or writing a model file failed; the message names the file.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong (including format errors).
        reason: String,
    },
}

/// One named tensor's element type, shape and little-endian bytes.
#[derive(Clone, PartialEq, Debug)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    data: Vec<u8>,
}

fn element_count(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

impl Tensor {
    /// A tensor from raw little-endian bytes; the length must match dtype and shape.
    pub fn new(dtype: DType, shape: Vec<usize>, data: Vec<u8>) -> Result<Self, ModelError> {
        let expected = element_count(&shape).and_then(|n| n.checked_mul(dtype.size()));
        if expected != Some(data.len()) {
            return Err(ModelError::WrongLength {
                name: String::new(),
                dtype,
                shape,
                got: data.len(),
                expected: expected.unwrap_or(usize::MAX),
            });
        }
        Ok(Self { dtype, shape, data })
    }

    /// An f32 tensor.
    pub fn from_f32(shape: Vec<usize>, values: &[f32]) -> Result<Self, ModelError> {
        Self::new(DType::F32, shape, values.iter().flat_map(|v| v.to_le_bytes()).collect())
    }

    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Little-endian bytes.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len() / self.dtype.size()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
}

impl safetensors::View for &Tensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype.to_st()
    }

    fn shape(&self) -> &[usize] {
        &self.shape
    }

    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }

    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A tensor inside a [`Model`]: its dtype, shape and bytes, borrowed from the model's buffer.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct TensorRef<'a> {
    dtype: DType,
    shape: &'a [usize],
    data: &'a [u8],
}

impl TensorRef<'_> {
    /// Element type.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Shape.
    pub fn shape(&self) -> &[usize] {
        self.shape
    }

    /// Little-endian bytes.
    pub fn data(&self) -> &[u8] {
        self.data
    }

    /// The values of an f32 tensor.
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == DType::F32).then(|| {
            self.data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        })
    }
}

#[derive(Clone, PartialEq, Debug)]
struct Entry {
    dtype: DType,
    shape: Vec<usize>,
    range: Range<usize>,
}

/// A model: named tensors, held as their canonical safetensors encoding.
///
/// The encoding *is* the storage: one buffer, so sending a model, storing it as a blob and
/// decoding a received one cost no copy, and equal models are equal bytes.
#[derive(Clone, PartialEq)]
pub struct Model {
    bytes: Vec<u8>,
    index: BTreeMap<String, Entry>,
}

impl Default for Model {
    fn default() -> Self {
        Self::from_tensors(std::iter::empty::<(String, Tensor)>())
    }
}

impl std::fmt::Debug for Model {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.index.iter().map(|(n, e)| (n, (e.dtype, &e.shape))))
            .finish()
    }
}

impl Model {
    /// An empty model.
    pub fn new() -> Self {
        Self::default()
    }

    /// A model of these tensors (a later duplicate name replaces an earlier one).
    pub fn from_tensors<S: Into<String>>(tensors: impl IntoIterator<Item = (S, Tensor)>) -> Self {
        let tensors: BTreeMap<String, Tensor> = tensors.into_iter().map(|(n, t)| (n.into(), t)).collect();
        let bytes = match safetensors::serialize(tensors.iter(), None) {
            Ok(b) => b,
            // Only a header that fails to encode as JSON could fail; ours are plain.
            Err(e) => unreachable!("safetensors encoding of a valid model failed: {e}"),
        };
        match Self::indexed(bytes) {
            Ok(m) => m,
            Err(e) => unreachable!("a freshly encoded model failed to index: {e}"),
        }
    }

    /// A model of zero-filled tensors, built straight into its encoding (fill it with
    /// [`Model::map_f32`]): a large model costs one buffer, not two.
    pub fn zeros<S: Into<String>>(
        tensors: impl IntoIterator<Item = (S, DType, Vec<usize>)>,
    ) -> Result<Self, ModelError> {
        let shapes = shape_only(tensors)?;
        let mut bytes = safetensors::serialize(shapes.iter().map(|(n, t)| (n, EmptyView(t))), None)
            .map_err(|e| ModelError::Format(e.to_string()))?;
        let data: usize = shapes
            .values()
            .map(|t| safetensors::View::data_len(&EmptyView(t)))
            .sum();
        bytes.resize(bytes.len() + data, 0);
        Self::indexed(bytes)
    }

    /// Indexes a buffer already known to be a canonical encoding.
    fn indexed(bytes: Vec<u8>) -> Result<Self, ModelError> {
        let layout = Layout::parse(&bytes)?;
        if layout.len != bytes.len() as u64 {
            return Err(ModelError::Format(format!(
                "{} bytes after the last tensor",
                bytes.len() as u64 - layout.len.min(bytes.len() as u64)
            )));
        }
        let json: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&layout.header[8..]).map_err(|e| ModelError::Format(format!("header: {e}")))?;
        let mut index = BTreeMap::new();
        for r in layout.regions {
            let shape = json
                .get(&r.name)
                .and_then(|v| serde_json::from_value::<safetensors::tensor::TensorInfo>(v.clone()).ok())
                .map(|i| i.shape)
                .ok_or_else(|| ModelError::Format(format!("tensor {:?} has no shape", r.name)))?;
            index.insert(
                r.name,
                Entry {
                    dtype: r.dtype,
                    shape,
                    range: r.bytes.start as usize..r.bytes.end as usize,
                },
            );
        }
        Ok(Self { bytes, index })
    }

    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<TensorRef<'_>> {
        self.index.get(name).map(|e| self.tensor_ref(e))
    }

    fn tensor_ref<'a>(&'a self, e: &'a Entry) -> TensorRef<'a> {
        TensorRef {
            dtype: e.dtype,
            shape: &e.shape,
            data: &self.bytes[e.range.clone()],
        }
    }

    /// Tensors by name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, TensorRef<'_>)> {
        self.index.iter().map(|(n, e)| (n, self.tensor_ref(e)))
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether the model has no tensors.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Bytes of tensor data (without the header).
    pub fn data_bytes(&self) -> u64 {
        self.index.values().map(|e| e.range.len() as u64).sum()
    }

    /// The f32 values of tensor `name`, or why not.
    pub fn f32(&self, name: &str) -> Result<Vec<f32>, ModelError> {
        let t = self
            .get(name)
            .ok_or_else(|| ModelError::Format(format!("no tensor named {name:?}")))?;
        t.to_f32().ok_or_else(|| ModelError::WrongDType {
            name: name.to_owned(),
            got: t.dtype,
            want: DType::F32,
        })
    }

    /// The one DIFF rule, NVIDIA FLARE's `ParamsType.DIFF`: a learner that sends a difference
    /// sends `local − global`, and the receiver adds it to the model it sent (`self`), tensor
    /// by tensor in that tensor's own dtype. Both models must hold the same tensors with the
    /// same dtypes and shapes; only F32 and F64 tensors can be added (any other dtype is
    /// refused rather than taken as a new value, so a result is never half a difference).
    pub fn add_diff(&self, diff: &Model) -> Result<Model, ModelError> {
        let bad = |name: &str, reason: String| ModelError::Diff {
            name: name.to_owned(),
            reason,
        };
        if let Some((name, _)) = diff.iter().find(|(n, _)| self.get(n).is_none()) {
            return Err(bad(name, "is not in the received model".into()));
        }
        let mut out = Vec::with_capacity(self.len());
        for (name, b) in self.iter() {
            let d = diff.get(name).ok_or_else(|| bad(name, "is missing".into()))?;
            if d.dtype() != b.dtype() || d.shape() != b.shape() {
                return Err(bad(
                    name,
                    format!(
                        "is {:?} {:?}, the received model's is {:?} {:?}",
                        d.dtype(),
                        d.shape(),
                        b.dtype(),
                        b.shape()
                    ),
                ));
            }
            let data: Vec<u8> = match b.dtype() {
                DType::F32 => b
                    .data()
                    .chunks_exact(4)
                    .zip(d.data().chunks_exact(4))
                    .flat_map(|(x, y)| {
                        let x = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                        let y = f32::from_le_bytes([y[0], y[1], y[2], y[3]]);
                        (x + y).to_le_bytes()
                    })
                    .collect(),
                DType::F64 => b
                    .data()
                    .chunks_exact(8)
                    .zip(d.data().chunks_exact(8))
                    .flat_map(|(x, y)| {
                        let x = f64::from_le_bytes(x.try_into().unwrap_or([0; 8]));
                        let y = f64::from_le_bytes(y.try_into().unwrap_or([0; 8]));
                        (x + y).to_le_bytes()
                    })
                    .collect(),
                other => return Err(bad(name, format!("is {other:?}: a DIFF can only add F32 or F64"))),
            };
            out.push((name.clone(), Tensor::new(b.dtype(), b.shape().to_vec(), data)?));
        }
        Ok(Model::from_tensors(out))
    }

    /// Applies `f` to every f32 value of every f32 tensor, in place.
    pub fn map_f32(&mut self, mut f: impl FnMut(f32) -> f32) {
        for e in self.index.values().filter(|e| e.dtype == DType::F32) {
            for b in self.bytes[e.range.clone()].chunks_exact_mut(4) {
                let v = f(f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
                b.copy_from_slice(&v.to_le_bytes());
            }
        }
    }

    /// The canonical safetensors encoding (see the module doc), borrowed.
    pub fn as_safetensors(&self) -> &[u8] {
        &self.bytes
    }

    /// The canonical safetensors encoding, copied.
    pub fn to_safetensors(&self) -> Vec<u8> {
        self.bytes.clone()
    }

    /// The canonical safetensors encoding, without a copy.
    pub fn into_safetensors(self) -> Vec<u8> {
        self.bytes
    }

    /// Decodes a safetensors model; corrupt, truncated or unsupported input is a typed error.
    pub fn from_safetensors(bytes: &[u8]) -> Result<Self, ModelError> {
        Self::from_safetensors_vec(bytes.to_vec())
    }

    /// Decodes a safetensors model, keeping the buffer when it is already canonical (files
    /// written by other tools are re-encoded once).
    pub fn from_safetensors_vec(bytes: Vec<u8>) -> Result<Self, ModelError> {
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format(e.to_string()))?;
        let mut tensors = Vec::new();
        for (name, view) in st.tensors() {
            let dtype = DType::from_st(view.dtype())
                .ok_or_else(|| ModelError::Format(format!("tensor {name:?} has unsupported dtype {}", view.dtype())))?;
            tensors.push((name, dtype, view.shape().to_vec()));
        }
        drop(st);
        // Canonical iff re-encoding the same names, dtypes and shapes gives the same header.
        let shape_only: Vec<(String, Tensor)> = tensors
            .iter()
            .map(|(n, d, s)| {
                (
                    n.clone(),
                    Tensor {
                        dtype: *d,
                        shape: s.clone(),
                        data: Vec::new(),
                    },
                )
            })
            .collect();
        let expected = safetensors::serialize(shape_only.iter().map(|(n, t)| (n, EmptyView(t))), None)
            .map_err(|e| ModelError::Format(e.to_string()))?;
        let header_len = Layout::header_len(
            expected[..8]
                .try_into()
                .map_err(|_| ModelError::Format("header".into()))?,
        )? as usize;
        if bytes.get(..header_len) == Some(&expected[..header_len]) {
            return Self::indexed(bytes);
        }
        let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Format(e.to_string()))?;
        let mut owned = Vec::new();
        for (name, view) in st.tensors() {
            let dtype = DType::from_st(view.dtype())
                .ok_or_else(|| ModelError::Format(format!("tensor {name:?} has unsupported dtype {}", view.dtype())))?;
            owned.push((name, Tensor::new(dtype, view.shape().to_vec(), view.data().to_vec())?));
        }
        Ok(Self::from_tensors(owned))
    }

    /// Writes the model to a `.safetensors` file.
    pub fn save(&self, path: &Path) -> Result<(), ModelError> {
        std::fs::write(path, &self.bytes).map_err(|e| ModelError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// Reads a `.safetensors` file; the error names the file and what is wrong with it.
    pub fn load(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Self::from_safetensors_vec(bytes).map_err(|e| ModelError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })
    }

    /// The byte layout of this model's encoding.
    pub fn layout(&self) -> Layout {
        match Layout::parse(&self.bytes) {
            Ok(l) => l,
            Err(e) => unreachable!("layout of a valid model failed: {e}"),
        }
    }
}

/// Tensors with names, dtypes and shapes but no data, in name order; a shape whose byte size
/// overflows is an error.
fn shape_only<S: Into<String>>(
    tensors: impl IntoIterator<Item = (S, DType, Vec<usize>)>,
) -> Result<BTreeMap<String, Tensor>, ModelError> {
    tensors
        .into_iter()
        .map(|(n, dtype, shape)| {
            let name = n.into();
            if element_count(&shape)
                .and_then(|c| c.checked_mul(dtype.size()))
                .is_none()
            {
                return Err(ModelError::Format(format!(
                    "tensor {name:?}: shape {shape:?} is too large"
                )));
            }
            Ok((
                name,
                Tensor {
                    dtype,
                    shape,
                    data: Vec::new(),
                },
            ))
        })
        .collect()
}

/// A view with a tensor's dtype and shape but no data, so a header costs no copy of the data.
struct EmptyView<'a>(&'a Tensor);

impl safetensors::View for EmptyView<'_> {
    fn dtype(&self) -> safetensors::Dtype {
        self.0.dtype.to_st()
    }
    fn shape(&self) -> &[usize] {
        &self.0.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&[])
    }
    fn data_len(&self) -> usize {
        element_count(&self.0.shape).map_or(0, |n| n.saturating_mul(self.0.dtype.size()))
    }
}

/// Where each tensor's bytes lie in a model blob, read from the header alone.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Layout {
    /// The header bytes, length prefix included: identical in every copy of the architecture.
    pub header: Vec<u8>,
    /// Blob byte ranges of the tensors, in blob order, with name and dtype.
    pub regions: Vec<Region>,
    /// Total blob length.
    pub len: u64,
}

/// One tensor's place in a blob.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Region {
    /// Tensor name.
    pub name: String,
    /// Element type.
    pub dtype: DType,
    /// Byte range in the blob.
    pub bytes: Range<u64>,
}

impl Layout {
    /// Length of the header (prefix included) announced by a blob's first 8 bytes.
    pub fn header_len(prefix: [u8; 8]) -> Result<u64, ModelError> {
        let n = u64::from_le_bytes(prefix);
        if n > MAX_HEADER {
            return Err(ModelError::Format(format!("header of {n} bytes exceeds {MAX_HEADER}")));
        }
        Ok(8 + n)
    }

    /// The layout of the canonical encoding of tensors with these names, dtypes and shapes
    /// (the one [`Model::zeros`] would make), without their data: so a model too large for
    /// memory can be written straight to a file, tensor by tensor, into the same bytes.
    pub fn of_tensors<S: Into<String>>(
        tensors: impl IntoIterator<Item = (S, DType, Vec<usize>)>,
    ) -> Result<Self, ModelError> {
        let shapes = shape_only(tensors)?;
        let header = safetensors::serialize(shapes.iter().map(|(n, t)| (n, EmptyView(t))), None)
            .map_err(|e| ModelError::Format(e.to_string()))?;
        Self::parse(&header)
    }

    /// Reads the layout from the start of a blob (at least the whole header).
    pub fn parse(start: &[u8]) -> Result<Self, ModelError> {
        let prefix: [u8; 8] = start
            .get(..8)
            .and_then(|p| p.try_into().ok())
            .ok_or_else(|| ModelError::Format("shorter than the 8-byte header length".into()))?;
        let header_len = Self::header_len(prefix)?;
        let header = start
            .get(..header_len as usize)
            .ok_or_else(|| ModelError::Format("truncated header".into()))?;
        let json: BTreeMap<String, serde_json::Value> =
            serde_json::from_slice(&header[8..]).map_err(|e| ModelError::Format(format!("header: {e}")))?;
        let mut regions = Vec::new();
        for (name, info) in json {
            if name == "__metadata__" {
                continue;
            }
            let info: safetensors::tensor::TensorInfo =
                serde_json::from_value(info).map_err(|e| ModelError::Format(format!("tensor {name:?}: {e}")))?;
            let dtype = DType::from_st(info.dtype)
                .ok_or_else(|| ModelError::Format(format!("tensor {name:?} has unsupported dtype {}", info.dtype)))?;
            let (s, e) = info.data_offsets;
            let expected = element_count(&info.shape).and_then(|n| n.checked_mul(dtype.size()));
            if e < s || expected != Some(e - s) {
                return Err(ModelError::Format(format!("tensor {name:?} has inconsistent offsets")));
            }
            regions.push(Region {
                name,
                dtype,
                bytes: header_len + s as u64..header_len + e as u64,
            });
        }
        regions.sort_by_key(|r| r.bytes.start);
        let mut at = header_len;
        for r in &regions {
            if r.bytes.start != at {
                return Err(ModelError::Format(format!(
                    "tensor {:?} leaves a gap or overlaps",
                    r.name
                )));
            }
            at = r.bytes.end;
        }
        Ok(Self {
            header: header.to_vec(),
            regions,
            len: at,
        })
    }
}

/// Whether a model carries whole parameters or a difference from the global model.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum ParamsType {
    /// Full parameters.
    Full,
    /// Difference from the parameters the task carried.
    Diff,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(seed: f32) -> Model {
        Model::from_tensors([
            ("b.weight", Tensor::from_f32(vec![2, 3], &[seed; 6]).expect("t")),
            ("a.bias", Tensor::from_f32(vec![3], &[seed + 1.0; 3]).expect("t")),
            (
                "steps",
                Tensor::new(DType::I64, vec![1], 7i64.to_le_bytes().to_vec()).expect("t"),
            ),
        ])
    }

    #[test]
    fn a_diff_is_added_to_the_received_model_in_its_own_dtype() {
        let global = Model::from_tensors([
            ("w", Tensor::from_f32(vec![2], &[1.0, 2.0]).expect("t")),
            (
                "d",
                Tensor::new(DType::F64, vec![1], 0.5f64.to_le_bytes().to_vec()).expect("t"),
            ),
        ]);
        let diff = Model::from_tensors([
            ("w", Tensor::from_f32(vec![2], &[0.5, -2.0]).expect("t")),
            (
                "d",
                Tensor::new(DType::F64, vec![1], 1.25f64.to_le_bytes().to_vec()).expect("t"),
            ),
        ]);
        let sum = global.add_diff(&diff).expect("add");
        assert_eq!(sum.f32("w").expect("w"), [1.5, 0.0]);
        assert_eq!(sum.get("d").expect("d").data(), 1.75f64.to_le_bytes());
        // Another layout, an extra or a missing tensor, and a dtype that cannot be added are
        // refused.
        let wide = Model::from_tensors([("w", Tensor::from_f32(vec![3], &[0.0; 3]).expect("t"))]);
        assert!(matches!(global.add_diff(&wide), Err(ModelError::Diff { .. })));
        let extra = Model::from_tensors([
            ("w", Tensor::from_f32(vec![2], &[0.0; 2]).expect("t")),
            ("d", Tensor::new(DType::F64, vec![1], vec![0; 8]).expect("t")),
            ("x", Tensor::from_f32(vec![1], &[0.0]).expect("t")),
        ]);
        assert!(diff.add_diff(&global).is_ok());
        assert!(matches!(global.add_diff(&extra), Err(ModelError::Diff { .. })));
        let ints = model(1.0);
        let e = ints.add_diff(&ints).expect_err("I64");
        assert!(e.to_string().contains("F32 or F64"), "{e}");
    }

    #[test]
    fn a_layout_of_tensors_is_the_layout_of_their_model() {
        let specs = || {
            [
                ("b", DType::F32, vec![2, 3]),
                ("a", DType::F64, vec![4]),
                ("c", DType::I64, vec![1]),
            ]
        };
        let z = Model::zeros(specs()).expect("zeros");
        assert_eq!(Layout::of_tensors(specs()).expect("layout"), z.layout());
        assert!(Layout::of_tensors([("x", DType::F32, vec![usize::MAX, 2])]).is_err());
    }

    #[test]
    fn zeros_match_an_encoded_model_of_zeros() {
        let z = Model::zeros([("b", DType::F32, vec![2, 3]), ("a", DType::F64, vec![4])]).expect("zeros");
        let m = Model::from_tensors([
            ("b", Tensor::from_f32(vec![2, 3], &[0.0; 6]).expect("t")),
            ("a", Tensor::new(DType::F64, vec![4], vec![0; 32]).expect("t")),
        ]);
        assert_eq!(z, m);
        assert!(Model::zeros([("x", DType::F32, vec![usize::MAX, 2])]).is_err());
    }

    #[test]
    fn foreign_layouts_are_made_canonical() {
        // The same tensors written with metadata (as other tools may) decode to the canonical
        // model.
        let m = model(1.5);
        let owned: Vec<(String, Tensor)> = m
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    Tensor::new(t.dtype(), t.shape().to_vec(), t.data().to_vec()).expect("t"),
                )
            })
            .collect();
        let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
        let with_meta = safetensors::serialize(owned.iter().map(|(n, t)| (n, t)), Some(meta)).expect("encode");
        assert_ne!(with_meta, m.to_safetensors());
        assert_eq!(Model::from_safetensors(&with_meta).expect("decode"), m);
        assert_eq!(Model::from_safetensors_vec(m.to_safetensors()).expect("decode"), m);
    }

    #[test]
    fn round_trips_and_layout_is_value_independent() {
        let a = model(1.0);
        let b = model(-3.5);
        let (ea, eb) = (a.to_safetensors(), b.to_safetensors());
        assert_eq!(Model::from_safetensors(&ea).expect("decode"), a);
        let (la, lb) = (Layout::parse(&ea).expect("layout"), Layout::parse(&eb).expect("layout"));
        assert_eq!(la, lb, "same architecture, same layout");
        assert_eq!(la, a.layout());
        assert_eq!(la.len, ea.len() as u64);
        assert_eq!(la.header.len() % 8, 0, "data starts 8-aligned");
        // Within one dtype, names are sorted.
        let f32_names: Vec<_> = la
            .regions
            .iter()
            .filter(|r| r.dtype == DType::F32)
            .map(|r| &r.name)
            .collect();
        assert_eq!(f32_names, ["a.bias", "b.weight"]);
    }

    #[test]
    fn corrupt_and_truncated_models_are_typed_errors() {
        let e = model(2.0).to_safetensors();
        for cut in [0, 4, 8, 20, e.len() - 1] {
            assert!(
                matches!(Model::from_safetensors(&e[..cut]), Err(ModelError::Format(_))),
                "cut {cut}"
            );
        }
        let mut bad = e.clone();
        bad[8] = b'#'; // the header's opening brace
        assert!(matches!(Model::from_safetensors(&bad), Err(ModelError::Format(_))));
        let mut huge = e;
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Model::from_safetensors(&huge).is_err());
        assert!(Layout::parse(&huge).is_err());
    }

    #[test]
    fn files_name_themselves_in_errors() {
        let dir = std::env::temp_dir().join(format!("flare-model-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("m.safetensors");
        model(0.5).save(&p).expect("save");
        assert_eq!(Model::load(&p).expect("load"), model(0.5));
        let bytes = std::fs::read(&p).expect("read");
        std::fs::write(&p, &bytes[..bytes.len() / 2]).expect("truncate");
        let e = Model::load(&p).expect_err("truncated");
        assert!(e.to_string().contains("m.safetensors"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wrong_lengths_are_refused() {
        assert!(Tensor::from_f32(vec![2, 2], &[1.0; 3]).is_err());
        assert!(Tensor::new(DType::F32, vec![usize::MAX, 2], vec![]).is_err());
        let mut m = model(1.0);
        m.map_f32(|v| v + 1.0);
        assert_eq!(m.f32("b.weight").expect("f32"), vec![2.0; 6]);
        assert!(matches!(m.f32("steps"), Err(ModelError::WrongDType { .. })));
    }
}
