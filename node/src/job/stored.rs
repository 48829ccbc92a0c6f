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

/// The add-one job's seeded initial model, written tensor by tensor into a scratch file of
/// `store` (the bytes [`super::setup::add_one_model`] makes in memory), then filed as a blob
/// of the job.
pub async fn add_one_on_disk(comm: &Communicator, spec: &ModelSpec) -> anyhow::Result<BlobRef> {
    let store = comm.node().store().clone();
    let spec = spec.clone();
    let file = tokio::task::spawn_blocking(move || {
        let layout = add_one_layout(&spec)?;
        let file = store.scratch(layout.len)?;
        file.write_at(&layout.header, 0)?;
        let mut next = add_one_values(spec.seed);
        let mut buf = Vec::with_capacity(PIECE_BYTES);
        for r in &layout.regions {
            for (at, len) in pieces(r) {
                buf.clear();
                for _ in 0..len / 4 {
                    buf.extend_from_slice(&next().to_le_bytes());
                }
                file.write_at(&buf, at)?;
            }
        }
        Ok::<_, anyhow::Error>(file)
    })
    .await
    .context("writing the initial model")??;
    Ok(comm.publish_scratch(file).await?)
}

/// The layout of the add-one job's seeded model.
pub fn add_one_layout(spec: &ModelSpec) -> anyhow::Result<Layout> {
    Ok(Layout::of_tensors(
        (0..spec.tensors).map(|t| (format!("tensor.{t:04}"), DType::F32, vec![spec.elements])),
    )?)
}

/// Whether the stored model is the seeded add-one model with every weight `rounds` more,
/// read tensor by tensor.
pub fn add_one_exact_stored(store: &BlobStore, blob: BlobRef, layout: &Layout, spec: &ModelSpec, rounds: u32) -> bool {
    let Ok(expected) = add_one_layout(spec) else {
        return false;
    };
    if expected != *layout {
        return false;
    }
    let mut next = add_one_values(spec.seed);
    let mut buf = Vec::with_capacity(PIECE_BYTES);
    layout.regions.iter().flat_map(pieces).all(|(at, len)| {
        buf.resize(len, 0);
        store.read_at(&blob.id, &mut buf, at).is_ok()
            && buf
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
