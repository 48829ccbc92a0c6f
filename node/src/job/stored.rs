//! A job's model when it may be too large for memory: in memory, or a blob in the node's
//! store that is read and written tensor by tensor, never whole (see
//! [`flare_actors::BlobStore::streams`]). The add-one job's seeded initial model is written
//! straight to disk here when it is that large, and its exactness check reads it back the
//! same way.

use std::path::Path;

use anyhow::Context;
use flare_actors::BlobStore;
use flare_actors::job::Communicator;
use flare_actors::job::fedavg::GlobalModel;
use flare_actors::store::{ChunkWriter, DIRECT_ALIGN, aligned_buffer};
use flare_protocols::BlobRef;
use flare_protocols::model::{DType, Layout, Model};

use super::setup::{add_one_values, plus_ones};
use crate::topology::ModelSpec;

/// A job's final model (see the module doc).
pub enum JobModel {
    /// In memory.
    Memory(Model),
    /// In the store.
    Stored {
        /// The store holding it.
        store: BlobStore,
        /// The blob.
        blob: BlobRef,
        /// Its layout, read from its header.
        layout: Layout,
    },
}

impl From<Model> for JobModel {
    fn from(m: Model) -> Self {
        Self::Memory(m)
    }
}

impl JobModel {
    /// The outcome of a workflow that may have kept its model on disk.
    pub async fn of(comm: &Communicator, model: GlobalModel) -> anyhow::Result<Self> {
        Ok(match model {
            GlobalModel::Memory(m) => Self::Memory(m),
            GlobalModel::Stored(blob) => Self::Stored {
                store: comm.node().store().clone(),
                blob,
                layout: comm.layout_of(blob).await?,
            },
        })
    }

    /// Bytes of tensor data (the header left out).
    pub fn data_bytes(&self) -> u64 {
        match self {
            Self::Memory(m) => m.data_bytes(),
            Self::Stored { layout, .. } => layout.regions.iter().map(|r| r.bytes.end - r.bytes.start).sum(),
        }
    }

    /// The model in memory, for what needs all of it at once (cross-site evaluation, a
    /// fine-tuning summary); a model on disk is refused rather than read whole.
    pub fn memory(&self) -> anyhow::Result<&Model> {
        match self {
            Self::Memory(m) => Ok(m),
            Self::Stored { blob, .. } => anyhow::bail!(
                "the final model ({} bytes) lives on disk, above this node's --stream-above: this step needs it in memory",
                blob.len
            ),
        }
    }

    /// Whether two members' final models are the same bytes.
    pub fn same_as(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Memory(a), Self::Memory(b)) => a.as_safetensors() == b.as_safetensors(),
            (Self::Stored { blob: a, .. }, Self::Stored { blob: b, .. }) => a == b,
            (Self::Memory(m), Self::Stored { blob, .. }) | (Self::Stored { blob, .. }, Self::Memory(m)) => {
                flare_protocols::Manifest::of_bytes(m.as_safetensors(), blob.chunk_size)
                    .is_ok_and(|x| x.blob_ref() == *blob)
            }
        }
    }

    /// Writes the model to a `.safetensors` file: a hard link to the store's file where it
    /// can be (no copy of a large model), else a copy chunk by chunk.
    pub fn save(&self, path: &Path) -> anyhow::Result<()> {
        match self {
            Self::Memory(m) => Ok(m.save(path)?),
            Self::Stored { store, blob, .. } => {
                let _ = std::fs::remove_file(path);
                if let Some(src) = store.data_path(&blob.id)
                    && std::fs::hard_link(&src, path).is_ok()
                {
                    return Ok(());
                }
                let mut out = std::io::BufWriter::new(
                    std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
                );
                store
                    .export(&blob.id, &mut out)
                    .with_context(|| format!("writing {}", path.display()))?;
                Ok(())
            }
        }
    }
}

/// The add-one job's seeded initial model, made chunk by chunk (the bytes
/// [`super::setup::add_one_model`] makes in memory) and written past the page cache into a
/// scratch file of `store` by a [`ChunkWriter`], which hashes each chunk on its way, then
/// filed as a blob of the job: no page cache filled (a swarm member capped below the model's
/// size makes it too), no pass over the file to hash it.
pub async fn add_one_on_disk(comm: &Communicator, spec: &ModelSpec) -> anyhow::Result<BlobRef> {
    let store = comm.node().store().clone();
    let spec = spec.clone();
    let cs = comm.chunk_size();
    let (file, hashes) = tokio::task::spawn_blocking(move || {
        let layout = add_one_layout(&spec)?;
        let writer = ChunkWriter::new(store.scratch(layout.len)?, cs, 4)?;
        let mut chunks = Chunks::new(&writer, cs as usize);
        chunks.push(&layout.header)?;
        let mut next = add_one_values(spec.seed);
        let mut buf = Vec::with_capacity(PIECE_BYTES);
        let mut at = layout.header.len() as u64;
        for r in &layout.regions {
            // A canonical blob has no gaps; zeros where one would be.
            chunks.push(&vec![0; r.bytes.start.saturating_sub(at) as usize])?;
            for (_, len) in pieces(r) {
                buf.clear();
                for _ in 0..len / 4 {
                    buf.extend_from_slice(&next().to_le_bytes());
                }
                chunks.push(&buf)?;
            }
            at = r.bytes.end;
        }
        chunks.finish()?;
        Ok::<_, anyhow::Error>(writer.finish()?)
    })
    .await
    .context("writing the initial model")??;
    Ok(comm.publish_hashed(file, cs, hashes).await?)
}

/// Bytes cut into chunks as they come, each handed to a [`ChunkWriter`] once full.
struct Chunks<'a> {
    writer: &'a ChunkWriter,
    size: usize,
    index: u64,
    storage: Vec<u8>,
    filled: usize,
}

impl<'a> Chunks<'a> {
    fn new(writer: &'a ChunkWriter, size: usize) -> Self {
        Self {
            writer,
            size,
            index: 0,
            storage: writer.storage(),
            filled: 0,
        }
    }

    /// The next `bytes` of the blob.
    fn push(&mut self, mut bytes: &[u8]) -> anyhow::Result<()> {
        while !bytes.is_empty() {
            let at = self.storage.as_ptr().align_offset(DIRECT_ALIGN) + self.filled;
            let n = (self.size - self.filled).min(bytes.len());
            self.storage[at..at + n].copy_from_slice(&bytes[..n]);
            (self.filled, bytes) = (self.filled + n, &bytes[n..]);
            if self.filled == self.size {
                self.send()?;
            }
        }
        Ok(())
    }

    fn send(&mut self) -> anyhow::Result<()> {
        let full = std::mem::replace(&mut self.storage, self.writer.storage());
        self.writer.send(self.index, full)?;
        (self.index, self.filled) = (self.index + 1, 0);
        Ok(())
    }

    /// The last, shorter chunk handed over too.
    fn finish(mut self) -> anyhow::Result<()> {
        if self.filled > 0 {
            self.send()?;
        }
        Ok(())
    }
}

/// The layout of the add-one job's seeded model.
pub fn add_one_layout(spec: &ModelSpec) -> anyhow::Result<Layout> {
    Ok(Layout::of_tensors(
        (0..spec.tensors).map(|t| (format!("tensor.{t:04}"), DType::F32, vec![spec.elements])),
    )?)
}

/// Whether the stored model is the seeded add-one model with every weight `rounds` more,
/// read in block-aligned pieces past the page cache (a member capped below the model's size
/// checks it too).
pub fn add_one_exact_stored(store: &BlobStore, blob: BlobRef, layout: &Layout, spec: &ModelSpec, rounds: u32) -> bool {
    let Ok(expected) = add_one_layout(spec) else {
        return false;
    };
    // The values follow one another from the first tensor on, 4 bytes each, in pieces cut at
    // multiples of 4 bytes (a safetensors header is padded to 8).
    let first = layout.regions.first().map_or(layout.len, |r| r.bytes.start);
    let contiguous = layout.regions.windows(2).all(|w| w[0].bytes.end == w[1].bytes.start);
    if expected != *layout || !contiguous || !first.is_multiple_of(4) {
        return false;
    }
    let mut next = add_one_values(spec.seed);
    let (mut storage, at) = aligned_buffer(PIECE_BYTES);
    (0..layout.len).step_by(PIECE_BYTES).all(|off| {
        let len = (layout.len - off).min(PIECE_BYTES as u64) as usize;
        let buf = &mut storage[at..at + len];
        let values = (first.saturating_sub(off) as usize).min(len);
        store.read_once_at(&blob.id, buf, off).is_ok()
            && buf[values..]
                .chunks_exact(4)
                .all(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() == plus_ones(next(), rounds).to_bits())
    })
}

/// How much of a tensor is made or checked at once: memory stays this, whatever the model.
const PIECE_BYTES: usize = 4 << 20;

/// A tensor's bytes in pieces of at most [`PIECE_BYTES`]: (offset, length).
fn pieces(r: &flare_protocols::model::Region) -> impl Iterator<Item = (u64, usize)> + '_ {
    (r.bytes.start..r.bytes.end)
        .step_by(PIECE_BYTES)
        .map(move |at| (at, (r.bytes.end - at).min(PIECE_BYTES as u64) as usize))
}
