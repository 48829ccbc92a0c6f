//! Streaming weighted averaging (FedAvg) over model blobs, chunk by chunk.
//!
//! Every client's model blob has the same layout (see `flare_protocols::model`), so chunk `i`
//! of every blob holds the same tensor elements. The [`Accumulator`] keeps one running
//! weighted mean in that layout and folds each client's chunk into it as it arrives, in any
//! order across clients and chunks: memory is one model, whatever the number of clients.
//!
//! Per element, adding value `x` with weight `w` to a mean `m` of total weight `W` gives
//! `m + (x - m) · w / (W + w)`. That is the weighted mean at every step, and it is exact when
//! every client sends the same value (the add-one check). A contribution can be taken out
//! again ([`Accumulator::remove_chunk`]) when a client fails mid-round after some of its
//! chunks were folded in.

mod window;

use std::ops::Range;

use flare_protocols::blob_id::ChunkHash;
use flare_protocols::model::{DType, Layout, Region};

use self::window::DiskMean;
pub use self::window::WINDOW_BYTES;
use crate::store::{Scratch, StoreError};

/// Why a chunk could not be folded in, or the result is not ready.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AggregateError {
    /// The mean's file could not be read or written.
    #[error("the mean on disk: {0}")]
    Disk(String),
    /// Chunk sizes must keep elements whole (the data section starts 8-aligned).
    #[error("chunk size {0} is not a positive multiple of 8")]
    ChunkSize(u32),
    /// Only floating-point tensors are averaged.
    #[error("tensor {name:?} is {dtype:?}; only F32 and F64 tensors can be averaged")]
    Unsupported {
        /// Tensor name.
        name: String,
        /// Its dtype.
        dtype: DType,
    },
    /// The chunk's header bytes differ from the layout: another architecture.
    #[error("chunk {0} does not match the model layout (different architecture)")]
    LayoutMismatch(u64),
    /// The chunk has the wrong length for its index.
    #[error("chunk {index} has {got} bytes, expected {expected}")]
    WrongLength {
        /// Chunk index.
        index: u64,
        /// Bytes given.
        got: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// Weights must be positive and finite.
    #[error("weight {0} is not positive and finite")]
    BadWeight(f64),
    /// Taking out more weight than was added.
    #[error("chunk {0} cannot lose weight it does not have")]
    Underflow(u64),
    /// A value to fold in is NaN or infinite: one such value would make that weight of the
    /// mean NaN for every member, so the whole contribution is refused instead.
    #[error("tensor {name:?} holds a NaN or infinite value (chunk {index}): a diverged or broken result")]
    NonFinite {
        /// Chunk index.
        index: u64,
        /// The first tensor found with one.
        name: String,
    },
    /// Chunks carry different total weights: some client's contribution is partial.
    #[error("chunk {index} has weight {got}, chunk 0 has {expected}: a contribution is incomplete")]
    Incomplete {
        /// Chunk index.
        index: u64,
        /// Its total weight.
        got: f64,
        /// Chunk 0's total weight.
        expected: f64,
    },
}

/// A running weighted mean of model blobs of one layout.
#[derive(Debug)]
pub struct Accumulator {
    layout: Layout,
    chunk_size: u32,
    mean: Vec<u8>,
    /// The mean on disk instead of in `mean` (see [`Accumulator::on_disk`]).
    file: Option<DiskMean>,
    weights: Vec<f64>,
}

/// A finished mean: in memory, or in the scratch file it was folded into.
pub enum Mean {
    /// The averaged blob's bytes.
    Bytes(Vec<u8>),
    /// The averaged blob, to be filed in the store under the hashes of its chunks (cut in
    /// the accumulator's chunk size), taken as they were written
    /// ([`crate::BlobStore::adopt_hashed`]).
    Scratch(Scratch, Vec<ChunkHash>),
}

impl Accumulator {
    /// An empty accumulator for blobs of `layout` cut into chunks of `chunk_size`.
    pub fn new(layout: Layout, chunk_size: u32) -> Result<Self, AggregateError> {
        Self::check_shape(&layout, chunk_size)?;
        let mut mean = vec![0u8; layout.len as usize];
        mean[..layout.header.len()].copy_from_slice(&layout.header);
        let chunks = layout.len.div_ceil(u64::from(chunk_size)) as usize;
        Ok(Self {
            layout,
            chunk_size,
            mean,
            file: None,
            weights: vec![0.0; chunks],
        })
    }

    /// An empty accumulator whose mean lives in `file` (a scratch of the layout's length)
    /// rather than in memory: the chunks being folded wait in a window of [`WINDOW_BYTES`],
    /// and each is written once, past the page cache, when the window moves on (see
    /// `window.rs`), so memory is the window whatever the model's size, and the finished mean
    /// is filed as a blob without a copy or a pass to hash it.
    pub fn on_disk(layout: Layout, chunk_size: u32, file: Scratch) -> Result<Self, AggregateError> {
        let capacity = DiskMean::default_capacity(chunk_size);
        Self::on_disk_with_window(layout, chunk_size, file, capacity)
    }

    /// [`Self::on_disk`] with a window of `chunks` chunks.
    pub(crate) fn on_disk_with_window(
        layout: Layout,
        chunk_size: u32,
        file: Scratch,
        chunks: usize,
    ) -> Result<Self, AggregateError> {
        if file.len() != layout.len {
            return Err(AggregateError::Disk(format!(
                "a scratch of {} bytes for a mean of {}",
                file.len(),
                layout.len
            )));
        }
        Self::check_shape(&layout, chunk_size)?;
        // No header written here: chunk 0's first contribution carries it (`check`).
        let n = layout.len.div_ceil(u64::from(chunk_size)) as usize;
        Ok(Self {
            layout,
            chunk_size,
            mean: Vec::new(),
            file: Some(DiskMean::new(file, chunk_size, chunks)?),
            weights: vec![0.0; n],
        })
    }

    /// Takes `buf` (a model-sized buffer its owner is done with, e.g. the previous global
    /// model) as the mean's memory, and gives back the buffer it no longer needs. Chunks
    /// folded in so far are copied over; every other chunk's first contribution is copied in
    /// whole, so the old contents never show; what is not a tensor is set here. Saves
    /// faulting in and zeroing a model's worth of fresh pages, a tenth of a second per
    /// 256 MiB on a small machine.
    pub fn reuse(&mut self, mut buf: Vec<u8>) -> Vec<u8> {
        if self.file.is_some() {
            return buf;
        }
        buf.resize(self.layout.len as usize, 0);
        let header = self.layout.header.len();
        buf[..header].copy_from_slice(&self.layout.header);
        let mut at = header;
        for r in &self.layout.regions {
            buf[at..r.bytes.start as usize].fill(0);
            at = r.bytes.end as usize;
        }
        buf[at..].fill(0);
        let old = std::mem::replace(&mut self.mean, buf);
        let cs = self.chunk_size as u64;
        for (i, _) in self.weights.iter().enumerate().filter(|(_, w)| **w != 0.0) {
            let start = i as u64 * cs;
            let range = start as usize..(start + cs).min(self.layout.len) as usize;
            copy_tensors(&self.layout, &mut self.mean, range.clone(), &old[range]);
        }
        old
    }

    /// What an accumulator needs of its layout and chunk size, in memory or on disk.
    fn check_shape(layout: &Layout, chunk_size: u32) -> Result<(), AggregateError> {
        if chunk_size == 0 || !chunk_size.is_multiple_of(8) {
            return Err(AggregateError::ChunkSize(chunk_size));
        }
        match layout
            .regions
            .iter()
            .find(|r| !matches!(r.dtype, DType::F32 | DType::F64))
        {
            Some(r) => Err(AggregateError::Unsupported {
                name: r.name.clone(),
                dtype: r.dtype,
            }),
            None => Ok(()),
        }
    }

    /// The layout of the blobs this accumulator averages (the global model's).
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// How many chunks of a mean on disk are held in memory; `None` for a mean in memory.
    pub fn window_chunks(&self) -> Option<usize> {
        self.file.as_ref().map(DiskMean::capacity)
    }

    /// The chunk size of the blobs it folds.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Number of chunks of a blob of this layout.
    pub fn chunk_count(&self) -> u64 {
        self.weights.len() as u64
    }

    /// Total weight folded into chunk `index` so far.
    pub fn chunk_weight(&self, index: u64) -> f64 {
        self.weights.get(index as usize).copied().unwrap_or(0.0)
    }

    fn check(&self, index: u64, bytes: &[u8], weight: f64) -> Result<Range<usize>, AggregateError> {
        if !(weight.is_finite() && weight > 0.0) {
            return Err(AggregateError::BadWeight(weight));
        }
        let start = index.saturating_mul(u64::from(self.chunk_size));
        let end = (start + u64::from(self.chunk_size)).min(self.layout.len);
        let expected = end.saturating_sub(start) as usize;
        if index >= self.chunk_count() || bytes.len() != expected {
            return Err(AggregateError::WrongLength {
                index,
                got: bytes.len(),
                expected,
            });
        }
        let (start, end) = (start as usize, end as usize);
        let header = &self.layout.header;
        if start < header.len() && bytes[..header.len().min(end) - start] != header[start..header.len().min(end)] {
            return Err(AggregateError::LayoutMismatch(index));
        }
        Ok(start..end)
    }

    /// Folds chunk `index` of one client's blob in with `weight` (e.g. its sample count).
    /// A chunk with a NaN or infinite value is refused whole, before any of it is folded.
    pub fn add_chunk(&mut self, index: u64, bytes: &[u8], weight: f64) -> Result<(), AggregateError> {
        let range = self.check(index, bytes, weight)?;
        if let Some(name) = self.first_non_finite(range.clone(), bytes) {
            return Err(AggregateError::NonFinite { index, name });
        }
        let total = self.weights[index as usize];
        if total == 0.0 {
            // The first contribution is the mean: copied, not folded. Besides skipping the
            // arithmetic, the copy only writes the accumulator's fresh pages; a fold reads
            // them first, which maps the zero page and then faults again (with a TLB flush
            // on every core) when it writes.
            match &mut self.file {
                // `check` found the chunk's header bytes to be the layout's, and a canonical
                // blob has nothing but header and tensors: the chunk is the mean's chunk.
                Some(mean) => mean.put(index, bytes)?,
                None => copy_tensors(&self.layout, &mut self.mean, range, bytes),
            }
        } else {
            let share = weight / (total + weight);
            self.fold(range, bytes, |m, x| m + (x - m) * share)?;
        }
        self.weights[index as usize] = total + weight;
        Ok(())
    }

    /// Takes chunk `index` of a client's blob back out (it was added with `weight`).
    pub fn remove_chunk(&mut self, index: u64, bytes: &[u8], weight: f64) -> Result<(), AggregateError> {
        let range = self.check(index, bytes, weight)?;
        let total = self.weights[index as usize];
        let left = total - weight;
        if left < -1e-9 * total.max(1.0) {
            return Err(AggregateError::Underflow(index));
        }
        if left <= 1e-12 * total.max(1.0) {
            self.fold(range, bytes, |_, _| 0.0)?;
            self.weights[index as usize] = 0.0;
        } else {
            self.fold(range, bytes, |m, x| (m * total - x * weight) / left)?;
            self.weights[index as usize] = left;
        }
        Ok(())
    }

    /// The first tensor whose part in this chunk holds a NaN or an infinity. An IEEE float is
    /// one of those exactly when its exponent bits are all ones; the test on the bits alone
    /// keeps this scan far cheaper than the fold.
    fn first_non_finite(&self, range: Range<usize>, bytes: &[u8]) -> Option<String> {
        let base = range.start;
        parts(&self.layout, range).find_map(|(r, part)| {
            let xs = &bytes[part.start - base..part.end - base];
            let bad = match r.dtype {
                DType::F32 => xs.chunks_exact(4).fold(false, |bad, x| {
                    let bits = u32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    bad | (bits & 0x7f80_0000 == 0x7f80_0000)
                }),
                DType::F64 => xs.chunks_exact(8).fold(false, |bad, x| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(x);
                    bad | (u64::from_le_bytes(a) & 0x7ff0_0000_0000_0000 == 0x7ff0_0000_0000_0000)
                }),
                _ => false,
            };
            bad.then(|| r.name.clone())
        })
    }

    /// Applies `f(mean, x)` to every element of the chunk's tensor bytes (header left alone),
    /// in memory or through the chunk's part of the file.
    fn fold(&mut self, range: Range<usize>, bytes: &[u8], f: impl Fn(f64, f64) -> f64) -> Result<(), StoreError> {
        match &mut self.file {
            None => fold_into(&self.layout, &mut self.mean, 0, range, bytes, f),
            Some(mean) => {
                let index = (range.start / self.chunk_size as usize) as u64;
                let layout = &self.layout;
                mean.update(index, |work| fold_into(layout, work, range.start, range, bytes, f))?;
            }
        }
        Ok(())
    }

    /// The averaged blob, once every chunk carries the same total weight.
    pub fn finish(self) -> Result<Vec<u8>, AggregateError> {
        match self.finish_mean()? {
            Mean::Bytes(b) => Ok(b),
            Mean::Scratch(file, _) => {
                let len = usize::try_from(file.len())
                    .map_err(|_| AggregateError::Disk("a mean too large for memory".into()))?;
                let mut bytes = vec![0; len];
                file.read_at(&mut bytes, 0)?;
                Ok(bytes)
            }
        }
    }

    /// The averaged blob, once every chunk carries the same total weight, where it was folded:
    /// in memory, or in its scratch file.
    pub fn finish_mean(self) -> Result<Mean, AggregateError> {
        let expected = self.weights.first().copied().unwrap_or(0.0);
        for (i, &w) in self.weights.iter().enumerate() {
            if (w - expected).abs() > 1e-9 * expected.max(1.0) || w == 0.0 {
                return Err(AggregateError::Incomplete {
                    index: i as u64,
                    got: w,
                    expected,
                });
            }
        }
        Ok(match self.file {
            Some(mean) => {
                let (file, hashes) = mean.finish()?;
                Mean::Scratch(file, hashes)
            }
            None => Mean::Bytes(self.mean),
        })
    }
}

/// Applies `f(mean, x)` to every element of the tensor bytes of blob range `range`, where
/// `mean` holds the mean's bytes from blob offset `base` on and `bytes` that range's content.
fn fold_into(
    layout: &Layout,
    mean: &mut [u8],
    base: usize,
    range: Range<usize>,
    bytes: &[u8],
    f: impl Fn(f64, f64) -> f64,
) {
    let start = range.start;
    for (r, part) in parts(layout, range) {
        let xs = &bytes[part.start - start..part.end - start];
        let mean = &mut mean[part.start - base..part.end - base];
        match r.dtype {
            DType::F32 => {
                for (m, x) in mean.chunks_exact_mut(4).zip(xs.chunks_exact(4)) {
                    let mv = f32::from_le_bytes([m[0], m[1], m[2], m[3]]);
                    let xv = f32::from_le_bytes([x[0], x[1], x[2], x[3]]);
                    let v = if mv == xv {
                        mv
                    } else {
                        f(f64::from(mv), f64::from(xv)) as f32
                    };
                    m.copy_from_slice(&v.to_le_bytes());
                }
            }
            DType::F64 => {
                for (m, x) in mean.chunks_exact_mut(8).zip(xs.chunks_exact(8)) {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(m);
                    let mut b = [0u8; 8];
                    b.copy_from_slice(x);
                    let (mv, xv) = (f64::from_le_bytes(a), f64::from_le_bytes(b));
                    let v = if mv == xv { mv } else { f(mv, xv) };
                    m.copy_from_slice(&v.to_le_bytes());
                }
            }
            // `new` admits only F32 and F64.
            _ => {}
        }
    }
}

impl From<StoreError> for AggregateError {
    fn from(e: StoreError) -> Self {
        Self::Disk(e.to_string())
    }
}

/// The tensors that blob range `range` overlaps, each with its part inside the range: only
/// tensor bytes are folded, checked or copied, never the header.
fn parts(layout: &Layout, range: Range<usize>) -> impl Iterator<Item = (&Region, Range<usize>)> {
    layout.regions.iter().filter_map(move |r| {
        let part = (r.bytes.start as usize).max(range.start)..(r.bytes.end as usize).min(range.end);
        (part.start < part.end).then_some((r, part))
    })
}

/// Copies the tensor bytes of blob range `range` from `bytes` (that range's content) into
/// `mean`; the header, and anything between tensors, stay as they are.
fn copy_tensors(layout: &Layout, mean: &mut [u8], range: Range<usize>, bytes: &[u8]) {
    let base = range.start;
    for (_, part) in parts(layout, range) {
        let from = part.start - base..part.end - base;
        mean[part].copy_from_slice(&bytes[from]);
    }
}

/// How a result whose blob starts with `start` (its header at least, else `None`) differs
/// from models of `expected`: the tensors it lacks or adds, and those of another shape or
/// dtype, the first few of each, with what the global model has. `None` when the headers
/// cannot be read or name the same tensors alike.
pub fn layout_difference(expected: &Layout, start: &[u8]) -> Option<String> {
    let want = tensor_shapes(&expected.header)?;
    let got = tensor_shapes(start)?;
    let mut diffs: Vec<String> = Vec::new();
    for (name, (dtype, shape)) in &want {
        match got.get(name) {
            None => diffs.push(format!("tensor {name:?} ({dtype} {shape:?}) is missing")),
            Some((_, s)) if s != shape => diffs.push(format!("tensor {name:?} has shape {s:?}, expected {shape:?}")),
            Some((d, _)) if d != dtype => diffs.push(format!("tensor {name:?} is {d}, expected {dtype}")),
            Some(_) => {}
        }
    }
    for (name, (dtype, shape)) in &got {
        if !want.contains_key(name) {
            diffs.push(format!(
                "tensor {name:?} ({dtype} {shape:?}) is not in the global model"
            ));
        }
    }
    const SHOWN: usize = 3;
    let more = diffs.len().saturating_sub(SHOWN);
    diffs.truncate(SHOWN);
    match (diffs.is_empty(), more) {
        (true, _) => None,
        (false, 0) => Some(diffs.join("; ")),
        (false, n) => Some(format!("{}; and {n} more", diffs.join("; "))),
    }
}

/// The tensors a safetensors header names, with dtype and shape, read from the start of a
/// blob (`None` if it does not hold the whole header, or the header does not parse).
fn tensor_shapes(start: &[u8]) -> Option<std::collections::BTreeMap<String, (String, Vec<u64>)>> {
    let header_len = Layout::header_len(start.get(..8)?.try_into().ok()?).ok()?;
    let json = start.get(8..usize::try_from(header_len).ok()?)?;
    let map: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    map.into_iter()
        .filter(|(name, _)| name != "__metadata__")
        .map(|(name, info)| {
            let dtype = info.get("dtype")?.as_str()?.to_owned();
            let shape = info
                .get("shape")?
                .as_array()?
                .iter()
                .map(serde_json::Value::as_u64)
                .collect::<Option<Vec<u64>>>()?;
            Some((name, (dtype, shape)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::Manifest;
    use flare_protocols::model::{Model, Tensor};
    use proptest::prelude::*;

    fn model(shapes: &[Vec<usize>], values: &[f32]) -> Model {
        let mut at = 0;
        Model::from_tensors(shapes.iter().enumerate().map(|(i, s)| {
            let n: usize = s.iter().product();
            at += n;
            (
                format!("t{i}"),
                Tensor::from_f32(s.clone(), &values[at - n..at]).expect("tensor"),
            )
        }))
    }

    fn chunks(bytes: &[u8], cs: u32) -> Vec<&[u8]> {
        bytes.chunks(cs as usize).collect()
    }

    #[test]
    fn a_result_of_another_layout_is_described_tensor_by_tensor() {
        let global = model(&[vec![2, 3], vec![3]], &[0.0; 9]).layout();
        let same = model(&[vec![2, 3], vec![3]], &[1.0; 9]);
        assert_eq!(layout_difference(&global, same.as_safetensors()), None);
        let reshaped = model(&[vec![3, 2], vec![3]], &[0.0; 9]);
        assert_eq!(
            layout_difference(&global, reshaped.as_safetensors()).as_deref(),
            Some("tensor \"t0\" has shape [3, 2], expected [2, 3]")
        );
        let fewer = model(&[vec![2, 3]], &[0.0; 6]);
        assert_eq!(
            layout_difference(&global, fewer.as_safetensors()).as_deref(),
            Some("tensor \"t1\" (F32 [3]) is missing")
        );
        let more = model(&[vec![2, 3], vec![3], vec![1]], &[0.0; 10]);
        assert_eq!(
            layout_difference(&global, more.as_safetensors()).as_deref(),
            Some("tensor \"t2\" (F32 [1]) is not in the global model")
        );
        // Only the header is read: a prefix that holds it is enough, a shorter one is not.
        let header = reshaped.layout().header.len();
        assert!(layout_difference(&global, &reshaped.as_safetensors()[..header]).is_some());
        assert_eq!(
            layout_difference(&global, &reshaped.as_safetensors()[..header - 1]),
            None
        );
        let many = model(&[vec![1], vec![1], vec![1], vec![1], vec![1]], &[0.0; 5]);
        let d = layout_difference(&global, many.as_safetensors()).expect("differs");
        assert!(d.ends_with("; and 2 more"), "{d}");
    }

    proptest! {
        #[test]
        fn equals_the_in_memory_weighted_mean(
            shapes in proptest::collection::vec(proptest::collection::vec(1usize..5, 1..3), 1..4),
            clients in 1usize..5,
            cs8 in 1u32..40,
            seed: u64,
        ) {
            let cs = cs8 * 8;
            let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
            let mut rng = seed;
            let mut next = || { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; rng };
            let mut blobs = Vec::new();
            let mut weights = Vec::new();
            let mut values = Vec::new();
            for _ in 0..clients {
                let v: Vec<f32> = (0..n).map(|_| (next() % 20001) as f32 / 100.0 - 100.0).collect();
                blobs.push(model(&shapes, &v).to_safetensors());
                weights.push((next() % 1000 + 1) as f64);
                values.push(v);
            }
            let layout = Layout::parse(&blobs[0]).expect("layout");
            let mut acc = Accumulator::new(layout, cs).expect("acc");
            // Every (client, chunk) pair, in a shuffled order.
            let mut order: Vec<(usize, usize)> = (0..clients)
                .flat_map(|c| (0..chunks(&blobs[c], cs).len()).map(move |i| (c, i)))
                .collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (next() % (i as u64 + 1)) as usize);
            }
            for (c, i) in order {
                acc.add_chunk(i as u64, chunks(&blobs[c], cs)[i], weights[c]).expect("add");
            }
            let got = Model::from_safetensors(&acc.finish().expect("finish")).expect("decode");
            let total: f64 = weights.iter().sum();
            let mut at = 0;
            for (t, s) in shapes.iter().enumerate() {
                let got = got.f32(&format!("t{t}")).expect("f32");
                for (k, g) in got.iter().enumerate() {
                    let want: f64 = (0..clients).map(|c| f64::from(values[c][at + k]) * weights[c]).sum::<f64>() / total;
                    prop_assert!((f64::from(*g) - want).abs() <= 1e-4 * want.abs().max(1.0), "{g} vs {want}");
                }
                at += s.iter().product::<usize>();
            }
        }
    }

    #[test]
    fn identical_inputs_give_exactly_that_input() {
        let v: Vec<f32> = (0..100).map(|i| i as f32 * 0.1 + 1.0 / 3.0).collect();
        let blob = model(&[vec![10, 10]], &v).to_safetensors();
        let mut acc = Accumulator::new(Layout::parse(&blob).expect("layout"), 64).expect("acc");
        for w in [3.0, 7.0, 11.0, 1.0] {
            for (i, c) in chunks(&blob, 64).iter().enumerate() {
                acc.add_chunk(i as u64, c, w).expect("add");
            }
        }
        assert_eq!(acc.finish().expect("finish"), blob);
    }

    #[test]
    fn a_reused_buffer_gives_the_same_mean_as_a_fresh_one() {
        let a = model(&[vec![3], vec![2, 5]], &[1.5; 13]).to_safetensors();
        let b = model(&[vec![3], vec![2, 5]], &[-4.25; 13]).to_safetensors();
        let layout = Layout::parse(&a).expect("layout");
        let mean = |junk: Option<Vec<u8>>| {
            let mut acc = Accumulator::new(layout.clone(), 16).expect("acc");
            if let Some(j) = junk {
                acc.reuse(j);
            }
            // b's chunks first for half of them: either model may be a chunk's first.
            for (i, c) in chunks(&b, 16).iter().enumerate().filter(|(i, _)| i % 2 == 0) {
                acc.add_chunk(i as u64, c, 3.0).expect("b");
            }
            for (i, c) in chunks(&a, 16).iter().enumerate() {
                acc.add_chunk(i as u64, c, 1.0).expect("a");
            }
            for (i, c) in chunks(&b, 16).iter().enumerate().filter(|(i, _)| i % 2 == 1) {
                acc.add_chunk(i as u64, c, 3.0).expect("b");
            }
            acc.finish().expect("finish")
        };
        let fresh = mean(None);
        assert_eq!(mean(Some(vec![0xAB; a.len() * 2])), fresh, "longer junk buffer");
        assert_eq!(mean(Some(vec![0xCD; 5])), fresh, "shorter junk buffer");

        // Taken midway, after some chunks were folded: those are carried over.
        let mut acc = Accumulator::new(layout, 16).expect("acc");
        for (i, c) in chunks(&b, 16).iter().enumerate().filter(|(i, _)| i % 2 == 0) {
            acc.add_chunk(i as u64, c, 3.0).expect("b");
        }
        for (i, c) in chunks(&a, 16).iter().enumerate().take(3) {
            acc.add_chunk(i as u64, c, 1.0).expect("a");
        }
        acc.reuse(vec![0xEF; a.len()]);
        for (i, c) in chunks(&a, 16).iter().enumerate().skip(3) {
            acc.add_chunk(i as u64, c, 1.0).expect("a");
        }
        for (i, c) in chunks(&b, 16).iter().enumerate().filter(|(i, _)| i % 2 == 1) {
            acc.add_chunk(i as u64, c, 3.0).expect("b");
        }
        assert_eq!(acc.finish().expect("finish"), fresh, "reused midway");
    }

    /// The accumulators a test runs on: in memory, and on disk in `dir`'s store, with a
    /// window that holds every chunk and with one that holds a single chunk (so chunks
    /// leave it and are read back from the file).
    fn accumulators(layout: &Layout, cs: u32, dir: &std::path::Path) -> Vec<Accumulator> {
        let store = crate::BlobStore::open(dir).expect("store");
        let file = || store.scratch(layout.len).expect("scratch");
        vec![
            Accumulator::new(layout.clone(), cs).expect("acc"),
            Accumulator::on_disk(layout.clone(), cs, file()).expect("acc on disk"),
            Accumulator::on_disk_with_window(layout.clone(), cs, file(), 1).expect("acc, window of 1"),
        ]
    }

    #[test]
    fn a_mean_on_disk_is_the_mean_in_memory_to_the_bit() {
        let dir = tempfile::tempdir().expect("tmp");
        let shapes = [vec![3, 5], vec![7], vec![2, 2, 2]];
        let blobs: Vec<Vec<u8>> = (0..3)
            .map(|c| {
                let v: Vec<f32> = (0..30).map(|i| (i * 7 + c * 13) as f32 / 3.0 - 5.0).collect();
                model(&shapes, &v).to_safetensors()
            })
            .collect();
        let layout = Layout::parse(&blobs[0]).expect("layout");
        let means: Vec<Vec<u8>> = accumulators(&layout, 24, dir.path())
            .into_iter()
            .map(|mut acc| {
                // Chunks in reverse, clients interleaved; the last client's first chunk twice,
                // once taken back out.
                for (c, b) in blobs.iter().enumerate() {
                    for (i, ch) in chunks(b, 24).iter().enumerate().rev() {
                        acc.add_chunk(i as u64, ch, 1.0 + c as f64).expect("add");
                    }
                }
                acc.add_chunk(0, chunks(&blobs[2], 24)[0], 9.0).expect("add");
                acc.remove_chunk(0, chunks(&blobs[2], 24)[0], 9.0).expect("remove");
                acc.finish().expect("finish")
            })
            .collect();
        assert_eq!(means[0], means[1]);
        assert_eq!(means[0], means[2]);
        assert_eq!(Layout::parse(&means[1]).expect("layout"), layout);
    }

    #[test]
    fn a_mean_through_a_small_window_is_filed_under_the_hashes_of_its_bytes() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = crate::BlobStore::open(dir.path()).expect("store");
        // Chunks of whole blocks, so the window writes and reads them past the page cache.
        let cs = 2 * crate::store::DIRECT_ALIGN as u32;
        let shapes = [vec![3000], vec![50, 41]];
        let blobs: Vec<Vec<u8>> = (0..3)
            .map(|c| {
                let v: Vec<f32> = (0..5050).map(|i| (i % 97 + c * 5) as f32 * 0.25).collect();
                model(&shapes, &v).to_safetensors()
            })
            .collect();
        let layout = Layout::parse(&blobs[0]).expect("layout");
        let mut mem = Accumulator::new(layout.clone(), cs).expect("acc");
        let file = store.scratch(layout.len).expect("scratch");
        let mut disk = Accumulator::on_disk_with_window(layout.clone(), cs, file, 2).expect("acc");
        // Two results in step, then a third that comes after every chunk has left the window.
        let (a, b, c) = (chunks(&blobs[0], cs), chunks(&blobs[1], cs), chunks(&blobs[2], cs));
        for acc in [&mut mem, &mut disk] {
            for i in 0..a.len() {
                acc.add_chunk(i as u64, a[i], 2.0).expect("a");
                acc.add_chunk(i as u64, b[i], 1.0).expect("b");
            }
            for (i, ch) in c.iter().enumerate() {
                acc.add_chunk(i as u64, ch, 3.0).expect("c");
            }
        }
        let want = mem.finish().expect("mean");
        let Ok(Mean::Scratch(file, hashes)) = disk.finish_mean() else {
            panic!("a mean on disk finishes in its file");
        };
        let manifest = store.adopt_hashed(file, cs, hashes).expect("adopt");
        assert_eq!(manifest, Manifest::of_bytes(&want, cs).expect("manifest"));
        let mut got = vec![0; want.len()];
        store.read_at(&manifest.id(), &mut got, 0).expect("read");
        assert_eq!(got, want);
    }

    #[test]
    fn a_partial_contribution_can_be_taken_back_out() {
        let dir = tempfile::tempdir().expect("tmp");
        let a = model(&[vec![40]], &[2.0; 40]).to_safetensors();
        for acc in accumulators(&Layout::parse(&a).expect("layout"), 32, dir.path()) {
            partial_contribution_taken_out(acc);
        }
    }

    fn partial_contribution_taken_out(mut acc: Accumulator) {
        let a = model(&[vec![40]], &[2.0; 40]).to_safetensors();
        let b = model(&[vec![40]], &[4.0; 40]).to_safetensors();
        let c = model(&[vec![40]], &[100.0; 40]).to_safetensors();
        for (i, ch) in chunks(&a, 32).iter().enumerate() {
            acc.add_chunk(i as u64, ch, 1.0).expect("a");
        }
        // c fails after two chunks.
        for (i, ch) in chunks(&c, 32).iter().enumerate().take(2) {
            acc.add_chunk(i as u64, ch, 5.0).expect("c");
        }
        assert!(acc.chunk_count() > 2, "c's contribution really is partial");
        for (i, ch) in chunks(&c, 32).iter().enumerate().take(2) {
            acc.remove_chunk(i as u64, ch, 5.0).expect("remove c");
        }
        for (i, ch) in chunks(&b, 32).iter().enumerate() {
            acc.add_chunk(i as u64, ch, 3.0).expect("b");
        }
        let m = Model::from_safetensors(&acc.finish().expect("finish")).expect("decode");
        for v in m.f32("t0").expect("f32") {
            assert!((v - 3.5).abs() < 1e-5, "{v}");
        }
    }

    #[test]
    fn mismatches_and_partial_results_are_errors() {
        let a = model(&[vec![8]], &[1.0; 8]).to_safetensors();
        let other = model(&[vec![2, 4]], &[1.0; 8]).to_safetensors();
        let layout = Layout::parse(&a).expect("layout");
        assert_eq!(
            Accumulator::new(layout.clone(), 12).err(),
            Some(AggregateError::ChunkSize(12))
        );
        let mut acc = Accumulator::new(layout, 16).expect("acc");
        assert_eq!(
            acc.add_chunk(0, chunks(&other, 16)[0], 1.0),
            Err(AggregateError::LayoutMismatch(0))
        );
        assert!(matches!(
            acc.add_chunk(0, &[0; 3], 1.0),
            Err(AggregateError::WrongLength { .. })
        ));
        assert_eq!(
            acc.add_chunk(0, chunks(&a, 16)[0], 0.0),
            Err(AggregateError::BadWeight(0.0))
        );
        acc.add_chunk(0, chunks(&a, 16)[0], 1.0).expect("add");
        assert!(matches!(acc.finish(), Err(AggregateError::Incomplete { .. })));
    }

    #[test]
    fn a_chunk_with_a_nan_or_an_infinity_is_refused_whole_and_folds_nothing() {
        let good = model(&[vec![4], vec![60]], &[1.0; 64]).to_safetensors();
        let mut acc = Accumulator::new(Layout::parse(&good).expect("layout"), 64).expect("acc");
        for (i, c) in chunks(&good, 64).iter().enumerate() {
            acc.add_chunk(i as u64, c, 2.0).expect("good");
        }
        for bad_value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![5.0f32; 64];
            v[63] = bad_value;
            let bad = model(&[vec![4], vec![60]], &v).to_safetensors();
            let cs = chunks(&bad, 64);
            let last = cs.len() - 1;
            // The chunk holding the bad value is refused, and its weight stays the good one's.
            let r = acc.add_chunk(last as u64, cs[last], 1.0);
            assert_eq!(
                r,
                Err(AggregateError::NonFinite {
                    index: last as u64,
                    name: "t1".into()
                }),
                "{bad_value}"
            );
            assert_eq!(acc.chunk_weight(last as u64), 2.0, "nothing of it was folded");
        }
        // f64 too.
        let data: Vec<u8> = [1.0f64, f64::NAN].iter().flat_map(|v| v.to_le_bytes()).collect();
        let t = Tensor::new(DType::F64, vec![2], data).expect("tensor");
        let blob = Model::from_tensors([("x".to_owned(), t)]).to_safetensors();
        let mut acc = Accumulator::new(Layout::parse(&blob).expect("layout"), 8).expect("acc");
        let errs: Vec<_> = chunks(&blob, 8)
            .iter()
            .enumerate()
            .filter_map(|(i, c)| acc.add_chunk(i as u64, c, 1.0).err())
            .collect();
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(matches!(&errs[0], AggregateError::NonFinite { name, .. } if name == "x"));
        // The finite values are not mistaken for bad ones.
        let edge = model(&[vec![4]], &[f32::MAX, f32::MIN, f32::MIN_POSITIVE, -0.0]).to_safetensors();
        let mut acc = Accumulator::new(Layout::parse(&edge).expect("layout"), 8).expect("acc");
        for (i, c) in chunks(&edge, 8).iter().enumerate() {
            acc.add_chunk(i as u64, c, 1.0).expect("finite extremes fold");
        }
    }
}
