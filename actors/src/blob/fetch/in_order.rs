//! Hands a blob's chunks to a consumer in blob order while several pulls bring them in out of
//! order: the shares of [`super::Fetcher::fetch_shared`], dealt round the owners a few chunks
//! at a time, land a stripe at a time. A learner that trains the model as it arrives then
//! runs beside the transfer instead of after it.
//!
//! Each landed chunk near the consumer's turn (within [`WINDOW`] chunks) is copied into
//! memory as it lands; one further ahead, and one the store held before, is read back from
//! the store when its turn comes (a chunk that came only for the consumer is filed into the
//! store then, by the [`Spill`] it was given). One thread hands them over, so the consumer
//! sees each chunk once, in order, as [`super::FetchOptions::on_chunk`] promises.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use flare_protocols::BlobId;

use super::{ChunkFn, CreditGate, FetchError};
use crate::lock;
use crate::store::{BlobStore, StoreError};

/// Chunks kept in memory ahead of the consumer's turn (a chunk each: 1 MiB by default).
pub(super) const WINDOW: u64 = 16;

/// Files a landed chunk that the store may not hold (one pulled for the consumer only) into
/// the store, for the consumer to read back at its turn; whether the store holds it now.
pub(super) type Spill = Box<dyn Fn(u64, &[u8]) -> bool + Send + Sync>;

/// See the module doc. Chunks land through [`Self::landed`] (the pulls' `on_chunk`); the
/// transfer's end is told by [`Self::end`] (or by dropping the [`Ending`] guard).
pub(super) struct InOrder {
    state: Mutex<State>,
    changed: Condvar,
    spill: Option<Spill>,
}

struct State {
    /// The next chunk the consumer takes.
    next: u64,
    /// Chunks landed within the window, not handed over yet.
    kept: BTreeMap<u64, Vec<u8>>,
    /// Chunks to read from the store at their turn: held before, or landed too far ahead.
    stored: Vec<bool>,
    /// Buffers handed over, for the next landed chunks.
    spare: Vec<Vec<u8>>,
    /// `Some(true)`: every chunk is in the store; `Some(false)`: the transfer failed or was
    /// dropped, nothing more will land.
    end: Option<bool>,
}

/// Ends an [`InOrder`] as failed when dropped before [`Self::done`] (a transfer that failed
/// or whose future was dropped), so its consumer thread never waits for chunks that will
/// not come.
pub(super) struct Ending(Arc<InOrder>);

impl Ending {
    /// The transfer brought every chunk into the store.
    pub(super) fn done(self) {
        self.0.end(true);
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.end(false);
    }
}

impl InOrder {
    /// For a blob of `n` chunks; `held` says which the store holds already, `spill` files
    /// a chunk landing too far ahead that may not be in the store (`None`: every chunk that
    /// lands is stored already).
    pub(super) fn new(n: u64, held: impl Fn(u64) -> bool, spill: Option<Spill>) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(State {
                next: 0,
                kept: BTreeMap::new(),
                stored: (0..n).map(held).collect(),
                spare: Vec::new(),
                end: None,
            }),
            changed: Condvar::new(),
            spill,
        })
    }

    /// The guard that ends this when the transfer is over.
    pub(super) fn ending(self: &Arc<Self>) -> Ending {
        Ending(self.clone())
    }

    /// Tells the consumer what the transfer came to: after `true` it reads whatever it did
    /// not keep from the store; after `false` it stops. The first word counts.
    fn end(&self, ok: bool) {
        let mut s = lock(&self.state);
        s.end.get_or_insert(ok);
        drop(s);
        self.changed.notify_all();
    }

    /// Chunk `index` (verified; stored unless it came for the consumer only) has landed.
    pub(super) fn landed(&self, index: u64, bytes: &[u8]) {
        let mut s = lock(&self.state);
        if index < s.next || s.kept.contains_key(&index) {
            return;
        }
        if index < s.next + WINDOW {
            let mut buf = s.spare.pop().unwrap_or_default();
            buf.clear();
            buf.extend_from_slice(bytes);
            s.kept.insert(index, buf);
        } else {
            // Filed (if need be) outside the lock: the consumer goes on meanwhile, and cannot
            // pass this chunk, which it has not got.
            drop(s);
            if !self.spill.as_ref().is_none_or(|spill| spill(index, bytes)) {
                // Not filed: it counts as not landed, and the pull from the origin that ends
                // a shared fetch brings it again.
                return;
            }
            s = lock(&self.state);
            if let Some(slot) = s.stored.get_mut(index as usize) {
                *slot = true;
            }
        }
        drop(s);
        self.changed.notify_all();
    }

    /// Which chunks have landed (handed over, kept, or in the store): what a last pull
    /// need not bring again.
    pub(super) fn landed_chunks(&self) -> Arc<[bool]> {
        let s = lock(&self.state);
        (0..s.stored.len() as u64)
            .map(|i| i < s.next || s.kept.contains_key(&i) || s.stored[i as usize])
            .collect()
    }

    /// Hands chunks `0..n` to `f` in order, each once its turn comes and it has landed (on
    /// the calling thread: a blocking one), paced by `gate` as a pull's chunks are. Returns
    /// when all are handed over, or [`FetchError::Incomplete`] when the transfer ended without
    /// them (the transfer's own error says why).
    pub(super) fn hand_over(
        &self,
        store: &BlobStore,
        id: &BlobId,
        n: u64,
        f: &ChunkFn,
        gate: Option<&CreditGate>,
        runtime: &tokio::runtime::Handle,
    ) -> Result<(), FetchError> {
        let mut buf = Vec::new();
        for i in 0..n {
            let kept = {
                let mut s = lock(&self.state);
                let kept = loop {
                    if let Some(b) = s.kept.remove(&i) {
                        break Some(b);
                    }
                    match s.end {
                        Some(false) => {
                            return Err(FetchError::Incomplete {
                                blob: *id,
                                missing: n - i,
                                errors: Vec::new(),
                            });
                        }
                        Some(true) => break None,
                        None if s.stored.get(i as usize).copied().unwrap_or(false) => break None,
                        // Bounded, though every landing and the end notify: a missed word
                        // costs a second, not a hang.
                        None => {
                            s = self
                                .changed
                                .wait_timeout(s, Duration::from_secs(1))
                                .map(|(g, _)| g)
                                .unwrap_or_else(|p| p.into_inner().0);
                        }
                    }
                };
                // Under the same lock: a copy of chunk `i` landing now is not kept again.
                s.next = i + 1;
                kept
            };
            match kept {
                Some(b) => {
                    f(i, &b);
                    lock(&self.state).spare.push(b);
                }
                None => {
                    let chunk = store
                        .read_chunk_to_send(id, i, std::mem::take(&mut buf))?
                        .ok_or(StoreError::NotFound(*id))?;
                    f(i, &chunk);
                    buf = chunk.into_buffer().unwrap_or_default();
                }
            }
            if let Some(gate) = gate {
                runtime.block_on(gate());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::Manifest;

    fn store_with(data: &[u8], cs: u32) -> (BlobStore, Manifest) {
        let store = BlobStore::memory();
        let m = store.import_bytes(data, cs).expect("import");
        (store, m)
    }

    /// The chunks a consumer got, in the order it got them.
    type Got = Arc<Mutex<Vec<(u64, Vec<u8>)>>>;

    fn recorder() -> (ChunkFn, Got) {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let f: ChunkFn = Arc::new(move |i: u64, b: &[u8]| lock(&sink).push((i, b.to_vec())));
        (f, got)
    }

    /// Chunks landing out of order, some far ahead of the window and some held before, reach
    /// the consumer once each, in order, with their bytes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_landing_out_of_order_are_handed_over_in_order() {
        let n = 2 * WINDOW + 5;
        let data: Vec<u8> = (0..n * 4).map(|i| (i * 7 % 251) as u8).collect();
        let (store, m) = store_with(&data, 4);
        let order = InOrder::new(n, |i| i == 1, None);
        let (f, got) = recorder();
        let (o, s, id, rt) = (order.clone(), store.clone(), m.id(), tokio::runtime::Handle::current());
        let consumer = tokio::task::spawn_blocking(move || o.hand_over(&s, &id, n, &f, None, &rt));
        let ending = order.ending();
        // Last chunks first (beyond the window: read back from the store), then the rest
        // backwards, one twice.
        for i in (0..n).rev().filter(|&i| i != 1) {
            order.landed(i, &data[i as usize * 4..i as usize * 4 + 4]);
        }
        order.landed(3, &data[12..16]);
        ending.done();
        consumer.await.expect("join").expect("handed over");
        let got = lock(&got).clone();
        assert_eq!(got.len() as u64, n);
        for (k, (i, b)) in got.iter().enumerate() {
            assert_eq!(*i, k as u64);
            assert!(m.verify_chunk(*i, b), "chunk {i}");
        }
    }

    /// Chunks pulled for the consumer only (a store that holds none of them) stay out of the
    /// store but for those that land too far ahead, which are filed and read back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chunks_for_the_consumer_only_are_filed_when_they_land_too_far_ahead() {
        let n = 2 * WINDOW + 5;
        let data: Vec<u8> = (0..n * 4).map(|i| (i * 3 % 251) as u8).collect();
        let m = Manifest::of_bytes(&data, 4).expect("m");
        let store = BlobStore::memory();
        store.begin(m.clone()).expect("begin");
        let (s, id) = (store.clone(), m.id());
        let spill: Spill = Box::new(move |i, b| s.put_chunk(&id, i, b).is_ok());
        let order = InOrder::new(n, |_| false, Some(spill));
        let (f, got) = recorder();
        let (o, s, rt) = (order.clone(), store.clone(), tokio::runtime::Handle::current());
        let consumer = tokio::task::spawn_blocking(move || o.hand_over(&s, &id, n, &f, None, &rt));
        let ending = order.ending();
        // The last chunk first (far ahead: filed), then the rest in order, each once the
        // consumer has taken the one before (so none lands beyond the window).
        order.landed(n - 1, &data[(n as usize - 1) * 4..]);
        assert!(order.landed_chunks()[n as usize - 1]);
        assert!(!order.landed_chunks()[0]);
        for i in 0..n - 1 {
            order.landed(i, &data[i as usize * 4..i as usize * 4 + 4]);
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while (lock(&got).len() as u64) <= i && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        ending.done();
        consumer.await.expect("join").expect("handed over");
        let got: Vec<u8> = lock(&got).iter().flat_map(|(_, b)| b.clone()).collect();
        assert_eq!(got, data);
        assert!(order.landed_chunks().iter().all(|&l| l));
        assert_eq!(
            store.missing(&m.blob_ref()).expect("missing").len() as u64,
            n - 1,
            "only the far one filed"
        );
    }

    /// A transfer that fails (its guard dropped) stops a consumer waiting for a chunk.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_transfer_stops_the_consumer() {
        let data = vec![5u8; 40];
        let (store, m) = store_with(&data, 4);
        let order = InOrder::new(10, |_| false, None);
        let (f, got) = recorder();
        let (o, s, id, rt) = (order.clone(), store.clone(), m.id(), tokio::runtime::Handle::current());
        let consumer = tokio::task::spawn_blocking(move || o.hand_over(&s, &id, 10, &f, None, &rt));
        let ending = order.ending();
        order.landed(0, &data[..4]);
        drop(ending);
        let r = consumer.await.expect("join");
        assert!(matches!(r, Err(FetchError::Incomplete { missing: 9, .. })), "{r:?}");
        assert_eq!(lock(&got).len(), 1);
    }
}
