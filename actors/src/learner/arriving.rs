//! A streaming learner run over a model *while it arrives*: the received model is never
//! written to disk and read back. Each chunk a fetch hands over (verified) is updated in
//! memory by the learner ([`TensorStream`]), hashed as a chunk of the result, and written to
//! the result's file past the page cache; when the last chunk is in, the result's manifest
//! is known without another pass over the file.
//!
//! Chunks must reach the learner in blob order. A fetch from one source hands them over in
//! order; chunks that come early (several sources, a retried range) are parked in the file
//! until their turn. Where a model cannot be cut at chunk boundaries (a learner that wants
//! whole tensors, an element that straddles two chunks, a header longer than a chunk), every
//! chunk is parked and the pass runs over the whole file once it is in, as
//! [`super::stream::stream_in_place`] does.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

use flare_protocols::BlobRef;
use flare_protocols::blob_id::ChunkHash;
use flare_protocols::model::Layout;

use super::stream::{piece_len, stream_file};
use super::{Learner, TaskContext};
use crate::blob::PendingOutput;
use crate::lock;
use crate::store::{ChunkWriter, DIRECT_ALIGN, Scratch};

/// See the module doc. Fed by a fetch's chunk callback ([`Self::chunk`]), then
/// [`Self::finish`]ed.
pub struct Arriving {
    state: Mutex<State>,
}

/// What [`Arriving::finish`] gives back besides the learner.
pub struct Trained {
    /// The result, in place in the file the model arrived into.
    pub file: Scratch,
    /// The result's chunk hashes, for chunks of the input's chunk size (the first field), when
    /// the pass went chunk by chunk; `None` when it ran over the whole file at the end (the
    /// result is then to be hashed from the file).
    pub hashes: Option<(u32, Vec<ChunkHash>)>,
    /// The learner's aggregation weight.
    pub samples: u64,
    /// The learner's metrics.
    pub metrics: BTreeMap<String, f64>,
}

enum Plan {
    /// Chunk 0 has not come yet.
    Undecided,
    /// Chunk by chunk, in pieces of at most `piece` bytes.
    ByChunk { layout: Layout, piece: u64 },
    /// Over the whole file once every chunk is in.
    Whole,
}

struct State {
    learner: Box<dyn Learner>,
    ctx: TaskContext,
    /// Hashes and writes the trained chunks while the next ones train; `None` once finished.
    writer: Option<ChunkWriter>,
    blob: BlobRef,
    plan: Plan,
    /// The next chunk the learner takes.
    next: u64,
    /// Chunks written to the file as they came, not yet through the learner.
    parked: BTreeSet<u64>,
    failed: Option<String>,
    /// Where each trained chunk also goes, for a puller that takes the result as it is made
    /// (see [`crate::blob::pending`]); `None` once that stopped.
    output: Option<Arc<PendingOutput>>,
}

/// Chunks trained and not yet written that the writer holds.
const WRITE_DEPTH: usize = 4;

impl Arriving {
    /// Runs `learner` (which must stream: [`Learner::streaming`]) over blob `blob`, whose
    /// chunks will be handed to [`Self::chunk`], into `file` (a scratch of the blob's length),
    /// and each trained chunk into `output` as well, when given (abandoned if the pass cannot
    /// go chunk by chunk or fails). The learner comes back with the error when the file's
    /// writer cannot start.
    pub fn new(
        learner: Box<dyn Learner>,
        ctx: TaskContext,
        file: Scratch,
        blob: BlobRef,
        output: Option<Arc<PendingOutput>>,
    ) -> Result<Self, (Box<dyn Learner>, String)> {
        let writer = match ChunkWriter::new(file, blob.chunk_size, WRITE_DEPTH) {
            Ok(w) => w,
            Err(e) => {
                if let Some(o) = output {
                    o.abandon();
                }
                return Err((learner, format!("starting the result's writer: {e}")));
            }
        };
        Ok(Self {
            state: Mutex::new(State {
                learner,
                ctx,
                writer: Some(writer),
                blob,
                plan: Plan::Undecided,
                next: 0,
                parked: BTreeSet::new(),
                failed: None,
                output,
            }),
        })
    }

    /// Takes chunk `index` (verified): through the learner now if it is its turn, else
    /// parked. An error is kept for [`Self::finish`].
    pub fn chunk(&self, index: u64, bytes: &[u8]) {
        let mut s = lock(&self.state);
        if s.failed.is_some() {
            return;
        }
        if let Err(e) = s.take(index, bytes) {
            s.failed = Some(e);
            s.stop_output();
        }
    }

    /// Once every chunk has been handed over: the rest of the pass, the learner's weight and
    /// metrics. The learner comes back whatever happened.
    pub fn finish(self) -> (Box<dyn Learner>, Result<Trained, String>) {
        let mut s = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        let r = s.finish();
        match (&r, s.output.take()) {
            (Ok(_), Some(o)) => o.finish(),
            (Err(_), Some(o)) => o.abandon(),
            (_, None) => {}
        }
        (
            s.learner,
            r.map(|(file, hashes, samples, metrics)| Trained {
                file,
                hashes: hashes.map(|h| (s.blob.chunk_size, h)),
                samples,
                metrics,
            }),
        )
    }

    /// Feeds the learner the model already in the file it writes to (this member's last
    /// result, its next input), chunk by chunk as if it arrived, each read past the page cache
    /// before its place is written over. An error is kept for [`Self::finish`].
    pub fn feed_from_file(&self) {
        let mut s = lock(&self.state);
        let cs = s.chunk_size();
        let (mut buf, at) = crate::store::aligned_buffer(cs as usize);
        for i in 0..s.chunk_count() {
            if s.failed.is_some() {
                return;
            }
            let len = s.chunk_len(i);
            let read = s.writer().and_then(|w| {
                w.file()
                    .read_once_at(&mut buf[at..at + len], i * cs)
                    .map_err(|e| format!("reading the input model: {e}"))
            });
            if let Err(e) = read.and_then(|()| s.take(i, &buf[at..at + len])) {
                s.failed = Some(e);
                s.stop_output();
            }
        }
    }

    /// The learner back, after a fetch that failed.
    pub fn into_learner(self) -> Box<dyn Learner> {
        let mut s = self.state.into_inner().unwrap_or_else(|p| p.into_inner());
        s.stop_output();
        s.learner
    }
}

/// What [`State::finish`] gives: the result's file, its hashes (when by chunk), weight and
/// metrics.
type Finished = (Scratch, Option<Vec<ChunkHash>>, u64, BTreeMap<String, f64>);

impl State {
    fn chunk_size(&self) -> u64 {
        u64::from(self.blob.chunk_size)
    }

    fn chunk_count(&self) -> u64 {
        self.blob.len.div_ceil(self.chunk_size().max(1))
    }

    fn chunk_len(&self, index: u64) -> usize {
        let start = index * self.chunk_size();
        (self.blob.len - start).min(self.chunk_size()) as usize
    }

    /// No more chunks go to the output's puller (it pulls the stored result instead).
    fn stop_output(&mut self) {
        if let Some(o) = self.output.take() {
            o.abandon();
        }
    }

    fn writer(&self) -> Result<&ChunkWriter, String> {
        self.writer
            .as_ref()
            .ok_or_else(|| "internal error: a chunk after the end".to_owned())
    }

    fn take(&mut self, index: u64, bytes: &[u8]) -> Result<(), String> {
        if index >= self.chunk_count() || bytes.len() != self.chunk_len(index) {
            return Err(format!("chunk {index} of {} bytes does not fit the model", bytes.len()));
        }
        if index == 0 && matches!(self.plan, Plan::Undecided) {
            self.plan = self.plan_from(bytes);
            if !matches!(self.plan, Plan::ByChunk { .. }) {
                // The result is made at the end, over the whole file: nothing to stream.
                self.stop_output();
            }
        }
        if index != self.next || !matches!(self.plan, Plan::ByChunk { .. }) {
            self.writer()?
                .file()
                .write_fresh_at(bytes, index * self.chunk_size())
                .map_err(|e| format!("writing the input model: {e}"))?;
            self.parked.insert(index);
            return Ok(());
        }
        let mut storage = self.writer()?.storage();
        let at = storage.as_ptr().align_offset(DIRECT_ALIGN);
        storage[at..at + bytes.len()].copy_from_slice(bytes);
        self.train_next(storage)?;
        self.drain_parked()
    }

    /// Chunk by chunk when the learner takes pieces, the header fits in chunk 0 and every
    /// tensor's elements lie whole within chunks; else over the whole file at the end.
    fn plan_from(&mut self, chunk0: &[u8]) -> Plan {
        let Some(piece) = self.learner.streaming().and_then(|s| piece_len(s)) else {
            return Plan::Whole;
        };
        let read = |buf: &mut [u8]| match chunk0.get(..buf.len()) {
            Some(b) => {
                buf.copy_from_slice(b);
                Ok(())
            }
            None => Err(crate::store::StoreError::Corrupt {
                path: "<first chunk>".into(),
                reason: "header longer than a chunk".into(),
            }),
        };
        let Ok(layout) = crate::store::read_layout(self.blob.len, read) else {
            return Plan::Whole;
        };
        let cs = self.chunk_size();
        let whole_elements = layout.regions.iter().all(|r| {
            let size = r.dtype.size() as u64;
            size > 0 && cs.is_multiple_of(size) && r.bytes.start.is_multiple_of(size)
        });
        if !whole_elements {
            return Plan::Whole;
        }
        Plan::ByChunk { layout, piece }
    }

    /// Runs the learner over chunk `next` (in `storage`, at its aligned offset), hands it to
    /// the writer (which hashes and writes it), moves on.
    fn train_next(&mut self, mut storage: Vec<u8>) -> Result<(), String> {
        let Plan::ByChunk { layout, piece } = &self.plan else {
            return Err("internal error: a chunk trained without a plan".into());
        };
        let index = self.next;
        let len = self.chunk_len(index);
        let start = index * self.chunk_size();
        let end = start + len as u64;
        let last = index + 1 == self.chunk_count();
        let at = storage.as_ptr().align_offset(DIRECT_ALIGN);
        let work = &mut storage[at..at + len];
        let learner = self.learner.streaming().ok_or("the learner stopped streaming")?;
        for r in &layout.regions {
            if r.bytes.is_empty() {
                // Handed over once, by the chunk it starts in (the last, at the blob's end).
                if (start..end).contains(&r.bytes.start) || (last && r.bytes.start == end) {
                    learner.tensor(&r.name, r.dtype, &mut [], &self.ctx)?;
                }
                continue;
            }
            let (from, to) = (r.bytes.start.max(start), r.bytes.end.min(end));
            let mut p = from;
            while p < to {
                let n = (*piece).min(to - p);
                let bytes = &mut work[(p - start) as usize..(p - start + n) as usize];
                learner
                    .tensor(&r.name, r.dtype, bytes, &self.ctx)
                    .map_err(|e| format!("tensor {:?}: {e}", r.name))?;
                p += n;
            }
        }
        if let Some(o) = &self.output
            && !o.put_copy(index, &storage[at..at + len])
        {
            self.output = None;
        }
        self.writer()?
            .send(index, storage)
            .map_err(|e| format!("writing the result: {e}"))?;
        self.next += 1;
        Ok(())
    }

    /// Trains the parked chunks whose turn has come.
    fn drain_parked(&mut self) -> Result<(), String> {
        while self.parked.remove(&self.next) {
            let (len, off) = (self.chunk_len(self.next), self.next * self.chunk_size());
            let writer = self.writer()?;
            let mut storage = writer.storage();
            let at = storage.as_ptr().align_offset(DIRECT_ALIGN);
            // Written past the page cache when it was parked: read back past it.
            writer
                .file()
                .read_once_at(&mut storage[at..at + len], off)
                .map_err(|e| format!("reading the input model: {e}"))?;
            self.train_next(storage)?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<Finished, String> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        if matches!(self.plan, Plan::ByChunk { .. }) {
            self.drain_parked()?;
            if self.next != self.chunk_count() {
                return Err(format!("chunk {} of the input model never came", self.next));
            }
        }
        let writer = self.writer.take().ok_or("internal error: finished twice")?;
        let written = |e| format!("writing the result: {e}");
        let stream = self.learner.streaming().ok_or("the learner stopped streaming")?;
        if matches!(self.plan, Plan::ByChunk { .. }) {
            let (file, hashes) = writer.finish().map_err(written)?;
            let (samples, metrics) = stream.finish(&self.ctx)?;
            return Ok((file, Some(hashes), samples, metrics));
        }
        // Every chunk was parked: the pass runs over the file, which is hashed after.
        let file = writer.into_file().map_err(written)?;
        let (samples, metrics) = stream_file(stream, &file, &self.ctx)?;
        Ok((file, None, samples, metrics))
    }
}

#[cfg(test)]
mod tests {
    use flare_protocols::Manifest;
    use flare_protocols::model::{DType, Model, Tensor};

    use super::*;
    use crate::BlobStore;
    use crate::learner::stream::tests::ctx;
    use crate::learner::{AddOne, TensorStream};

    fn model() -> Model {
        let a: Vec<f32> = (0..3000).map(|i| i as f32 * 0.5).collect();
        Model::from_tensors([
            ("a", Tensor::from_f32(vec![3000], &a).expect("t")),
            ("b", Tensor::new(DType::I64, vec![2], vec![7; 16]).expect("t")),
            ("e", Tensor::from_f32(vec![0], &[]).expect("t")),
            ("z", Tensor::from_f32(vec![1500], &a[..1500]).expect("t")),
        ])
    }

    /// Feeds `bytes` cut in chunks of `cs` to a fresh `Arriving` in `order`, in `store`.
    fn feed(
        learner: Box<dyn Learner>,
        store: &BlobStore,
        bytes: &[u8],
        cs: u32,
        order: &[u64],
    ) -> (Box<dyn Learner>, Result<Trained, String>) {
        feed_to(learner, store, bytes, cs, order, None)
    }

    /// As `feed`, each trained chunk going to `output` too.
    fn feed_to(
        learner: Box<dyn Learner>,
        store: &BlobStore,
        bytes: &[u8],
        cs: u32,
        order: &[u64],
        output: Option<Arc<PendingOutput>>,
    ) -> (Box<dyn Learner>, Result<Trained, String>) {
        let blob = BlobStore::memory().import_bytes(bytes, cs).expect("import").blob_ref();
        let file = store.scratch(blob.len).expect("scratch");
        let Ok(arriving) = Arriving::new(learner, ctx(), file, blob, output) else {
            panic!("the writer starts");
        };
        for &i in order {
            let at = (i * u64::from(cs)) as usize;
            arriving.chunk(i, &bytes[at..(at + cs as usize).min(bytes.len())]);
        }
        arriving.finish()
    }

    fn content(file: &Scratch) -> Vec<u8> {
        let mut out = vec![0; file.len() as usize];
        file.read_at(&mut out, 0).expect("read");
        out
    }

    #[test]
    fn chunks_in_any_order_give_add_ones_result_and_its_hashes() {
        let m = model();
        let expected = AddOne { num_samples: 3 }.train(m.clone(), &ctx()).expect("train").model;
        let expected = expected.as_safetensors();
        let dir = tempfile::tempdir().expect("tmp");
        let stores = [BlobStore::memory(), BlobStore::open(dir.path()).expect("open")];
        for cs in [4096u32, 64] {
            let n = m.as_safetensors().len().div_ceil(cs as usize) as u64;
            let in_order: Vec<u64> = (0..n).collect();
            let reversed: Vec<u64> = (0..n).rev().collect();
            let interleaved: Vec<u64> = (0..n).step_by(2).chain((1..n).step_by(2)).collect();
            for store in &stores {
                for order in [&in_order, &reversed, &interleaved] {
                    let (_, r) = feed(
                        Box::new(AddOne { num_samples: 3 }),
                        store,
                        m.as_safetensors(),
                        cs,
                        order,
                    );
                    let t = r.expect("trained");
                    assert_eq!(t.samples, 3);
                    assert_eq!(content(&t.file), expected, "chunk {cs}, order {order:?}");
                    // Chunks of 64 bytes cannot hold the header: the pass then runs at the end.
                    let Some((hashed_cs, hashes)) = t.hashes else {
                        assert_eq!(cs, 64, "trained chunk by chunk");
                        continue;
                    };
                    assert_eq!(hashed_cs, cs, "hashed in the input's chunks");
                    let want = BlobStore::memory().import_bytes(expected, cs).expect("import");
                    let got = Manifest::new(t.file.len(), cs, hashes).expect("manifest");
                    assert_eq!(got.id(), want.id(), "the hashes are the result's");
                }
            }
        }
    }

    /// Doubles every f32 and wants each tensor whole.
    struct WholeDoubler(Vec<String>);

    impl TensorStream for WholeDoubler {
        fn tensor(&mut self, name: &str, dtype: DType, data: &mut [u8], _: &TaskContext) -> Result<(), String> {
            self.0.push(name.to_owned());
            if dtype == DType::F32 {
                for b in data.chunks_exact_mut(4) {
                    let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]) * 2.0;
                    b.copy_from_slice(&v.to_le_bytes());
                }
            }
            match name {
                "fail" => Err("refused".into()),
                _ => Ok(()),
            }
        }

        fn finish(&mut self, _: &TaskContext) -> Result<(u64, BTreeMap<String, f64>), String> {
            Ok((1, BTreeMap::new()))
        }
    }

    impl Learner for WholeDoubler {
        fn train(&mut self, _: Model, _: &TaskContext) -> Result<crate::learner::TrainOutput, String> {
            Err("streams only".into())
        }

        fn validate(&mut self, _: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
            Err("streams only".into())
        }

        fn streaming(&mut self) -> Option<&mut dyn TensorStream> {
            Some(self)
        }
    }

    #[tokio::test]
    async fn trained_chunks_go_to_the_output_in_order_whatever_order_they_came_in() {
        let m = model();
        let bytes = m.as_safetensors();
        let n = bytes.len().div_ceil(4096) as u64;
        let handle = flare_protocols::BlobRef {
            id: flare_protocols::BlobId([1; 32]),
            len: bytes.len() as u64,
            chunk_size: 4096,
        };
        let output = PendingOutput::new(handle);
        let reversed: Vec<u64> = (0..n).rev().collect();
        let (_, r) = feed_to(
            Box::new(AddOne { num_samples: 3 }),
            &BlobStore::memory(),
            bytes,
            4096,
            &reversed,
            Some(output.clone()),
        );
        let t = r.expect("trained");
        let result = content(&t.file);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        let mut streamed = Vec::new();
        for i in 0..n {
            streamed.extend(output.take(i, deadline).await.expect("chunk streamed"));
        }
        assert_eq!(streamed, result, "the output's chunks are the result's");
        assert_eq!(output.take(n, deadline).await, None, "finished after the last");

        // A learner that wants whole tensors makes its result at the end: nothing streams.
        let output = PendingOutput::new(handle);
        let (_, r) = feed_to(
            Box::new(WholeDoubler(Vec::new())),
            &BlobStore::memory(),
            bytes,
            4096,
            &(0..n).collect::<Vec<_>>(),
            Some(output.clone()),
        );
        r.expect("trained");
        assert!(!output.started().await, "abandoned before its first chunk");
    }

    #[test]
    fn a_learner_that_wants_whole_tensors_runs_over_the_whole_file_at_the_end() {
        let m = model();
        let n = m.as_safetensors().len().div_ceil(4096) as u64;
        let (_, r) = feed(
            Box::new(WholeDoubler(Vec::new())),
            &BlobStore::memory(),
            m.as_safetensors(),
            4096,
            &(0..n).collect::<Vec<_>>(),
        );
        let t = r.expect("trained");
        assert!(t.hashes.is_none(), "to be hashed from the file");
        let out = Model::from_safetensors(&content(&t.file)).expect("model");
        let a = m.f32("a").expect("a");
        assert_eq!(out.f32("a").expect("a"), a.iter().map(|v| v * 2.0).collect::<Vec<_>>());
    }

    #[test]
    fn a_missing_chunk_or_a_failing_learner_is_an_error_and_the_learner_comes_back() {
        let m = model();
        let n = m.as_safetensors().len().div_ceil(4096) as u64;
        let (_, r) = feed(
            Box::new(AddOne { num_samples: 1 }),
            &BlobStore::memory(),
            m.as_safetensors(),
            4096,
            &(0..n - 1).collect::<Vec<_>>(),
        );
        let e = r.err().expect("a chunk never came");
        assert!(e.contains("never came"), "{e}");

        let failing = Model::from_tensors([("fail", Tensor::from_f32(vec![4], &[1.0; 4]).expect("t"))]);
        let (learner, r) = feed(
            Box::new(WholeDoubler(Vec::new())),
            &BlobStore::memory(),
            failing.as_safetensors(),
            4096,
            &[0],
        );
        assert!(r.err().expect("the learner refused").contains("refused"));
        let mut learner = learner;
        assert!(learner.streaming().is_some(), "the same learner is handed back");
    }
}
