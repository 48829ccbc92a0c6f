//! Where a held blob's bytes live, and the policy that lets the store serve bytes it does not
//! own: a blob lent by a caller that holds it in memory anyway, a shared import served from
//! its producer's memory at once and written to disk behind, a transient result served only
//! while its producer holds it.
//!
//! Kept apart from the on-disk format ([`super::disk`]) because this is a memory policy, not
//! storage: each path here exists to save a copy or a disk read on a hot path (see
//! docs/benchmarks.md), and reads hand out views ([`ChunkBytes::Held`]) of those bytes.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock, Weak};

use flare_protocols::{BlobId, Manifest};

use super::disk::{DataFile, Have, aligned_buffer};
use super::{BlobStore, ChunkBytes, StoreError};
use crate::lock;

/// Where a blob's bytes are.
pub(super) enum Data {
    /// In a memory store.
    Memory(RwLock<Vec<u8>>),
    /// A whole blob whose bytes its producer shares ([`BlobStore::import_shared`]): in a disk
    /// store only until the background write has put it on disk.
    Shared(Arc<Vec<u8>>),
    /// A whole blob the store serves but does not keep ([`BlobStore::import_transient`]):
    /// there while one of the producers that offered it ([`Entry::offered`]) holds the
    /// bytes, gone after.
    Transient,
    /// In its `.data` file.
    Disk(DataFile),
}

/// The producers that offered a blob as transient ([`BlobStore::import_transient`]): every
/// one that offered the same content (two jobs on one node whose learners produce the same
/// model, as every add-one round does), whatever else holds the blob. It is served while any
/// of them holds its bytes, however the store came to keep it too and let go of it after:
/// had a later offer, or a kept copy's last release, dropped the others, the blob would leave
/// the store while a producer still reported it as here.
#[derive(Clone, Default)]
pub(super) struct Producers(Vec<Weak<Vec<u8>>>);

impl Producers {
    /// The bytes of a producer that still holds them.
    pub(super) fn bytes(&self) -> Option<Arc<Vec<u8>>> {
        self.0.iter().find_map(Weak::upgrade)
    }

    fn is_gone(&self) -> bool {
        self.0.iter().all(|w| w.strong_count() == 0)
    }

    /// Adds the producer of `bytes`, forgetting those that let go.
    fn add(&mut self, bytes: &Arc<Vec<u8>>) {
        self.0.retain(|w| w.strong_count() > 0);
        self.0.push(Arc::downgrade(bytes));
    }
}

/// One blob the store holds, whole or in part.
pub(super) struct Entry {
    pub(super) manifest: Arc<Manifest>,
    pub(super) data: Data,
    pub(super) have: Mutex<Have>,
    /// The blob's bytes in memory while their producer still holds them (a shared import
    /// written to disk, or a blob [`BlobStore::lend`] was called for): reads come from there
    /// rather than the disk.
    hot: Mutex<Weak<Vec<u8>>>,
    /// Producers that offered the blob as transient: it stays served from their bytes when
    /// the store lets go of its own copy ([`unfile`]).
    offered: Mutex<Producers>,
}

impl Entry {
    pub(super) fn new(data: Data, have: Have, manifest: Manifest) -> Self {
        Self {
            manifest: Arc::new(manifest),
            data,
            have: Mutex::new(have),
            hot: Mutex::new(Weak::new()),
            offered: Mutex::default(),
        }
    }

    /// A blob held whole from the start.
    pub(super) fn complete(manifest: Manifest, data: Data) -> Self {
        let n = manifest.chunk_count() as usize;
        Self::new(data, Have::whole(n), manifest)
    }

    /// A transient blob whose producers have let go of its bytes: no longer held.
    pub(super) fn is_gone(&self) -> bool {
        matches!(self.data, Data::Transient) && lock(&self.offered).is_gone()
    }

    /// Held by the store itself (in memory or on disk, or being written), not only lent to it
    /// for a while.
    pub(super) fn is_kept(&self) -> bool {
        !matches!(self.data, Data::Transient)
    }

    /// The bytes of a producer that offered the blob and still holds them.
    pub(super) fn offered_bytes(&self) -> Option<Arc<Vec<u8>>> {
        lock(&self.offered).bytes()
    }

    /// Held whole by the store itself: importing the same bytes again is a no-op.
    pub(super) fn is_kept_whole(&self) -> bool {
        self.is_kept() && lock(&self.have).present == self.manifest.chunk_count()
    }

    /// Chunk `index` as a view of the blob's bytes in memory (shared, transient, or lent to
    /// a disk blob), if they are there. The caller has checked that the chunk is held.
    pub(super) fn view(&self, index: u64) -> Option<ChunkBytes> {
        let bytes = match &self.data {
            Data::Shared(bytes) => bytes.clone(),
            Data::Transient => self.offered_bytes()?,
            Data::Disk(_) => lock(&self.hot).upgrade().or_else(|| self.offered_bytes())?,
            Data::Memory(_) => return None,
        };
        let off = index as usize * self.manifest.chunk_size as usize;
        Some(ChunkBytes::Held {
            bytes,
            range: off..off + self.manifest.chunk_len(index),
        })
    }

    /// Whether chunk `index` is present.
    pub(super) fn has_chunk(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| lock(&self.have).bits.get(i).copied())
            .is_some_and(|b| b != 0)
    }
}

/// Files `entry` as blob `id`, in place of the entry there (if any), whose producers it takes
/// over (see [`Producers`]).
pub(super) fn file(blobs: &mut HashMap<BlobId, Arc<Entry>>, id: BlobId, entry: Entry) -> Arc<Entry> {
    if let Some(old) = blobs.get(&id) {
        *lock(&entry.offered) = lock(&old.offered).clone();
    }
    let entry = Arc::new(entry);
    blobs.insert(id, entry.clone());
    entry
}

/// Takes blob `id` out of `blobs`; whether the store held it. A blob that producers still
/// offer stays as theirs: transient, served from their bytes.
pub(super) fn unfile(blobs: &mut HashMap<BlobId, Arc<Entry>>, id: &BlobId) -> bool {
    let Some(old) = blobs.remove(id) else {
        return false;
    };
    let offered = lock(&old.offered).clone();
    if !offered.is_gone() {
        let left = match old.is_kept() {
            true => {
                let entry = Entry::complete((*old.manifest).clone(), Data::Transient);
                *lock(&entry.offered) = offered;
                Arc::new(entry)
            }
            false => old,
        };
        blobs.insert(*id, left);
    }
    true
}

/// Resolves when a [`BlobStore::import_shared`] no longer needs its bytes in memory.
///
/// The FedAvg controller waits for it before it fills the next accumulator, so that the
/// previous global model and the new mean are never both in memory while the disk catches up.
#[derive(Clone, Debug)]
pub struct Written(tokio::sync::watch::Receiver<bool>);

impl Written {
    /// Already resolved: nothing is being written.
    pub fn done() -> Self {
        Self(tokio::sync::watch::channel(true).1)
    }

    /// Waits until the write has ended (done or failed; a failure is logged where it happens).
    pub async fn wait(mut self) {
        // An error means the writer is gone, which also ends the wait.
        let _ = self.0.wait_for(|done| *done).await;
    }
}

impl BlobStore {
    /// Stores a whole in-memory blob that its producer goes on holding, without waiting for
    /// the disk: it is hashed, served from `bytes` at once, and written to disk on a
    /// background thread. Once written, reads still come from memory for as long as anyone
    /// else holds `bytes`, and from disk after that.
    ///
    /// For a task's result: the member can report it (and serve it) as soon as it is hashed,
    /// not after the disk write, and its first reader does not read it back from disk. A
    /// process that ends before the write is done leaves no trace of the blob on disk (only a
    /// temporary file that the next [`BlobStore::open`] ignores).
    ///
    /// The returned [`Written`] resolves once the store holds `bytes` no more: the write is
    /// done (or failed, and the blob stays in memory for the life of the process).
    pub fn import_shared(&self, bytes: Arc<Vec<u8>>, chunk_size: u32) -> Result<(Manifest, Written), StoreError> {
        self.import_shared_held(bytes, chunk_size, false)
    }

    /// [`Self::import_shared`], taking a hold on the blob when `hold` under the lock that
    /// finds or inserts it (see [`Self::import_bytes_held`]).
    pub fn import_shared_held(
        &self,
        bytes: Arc<Vec<u8>>,
        chunk_size: u32,
        hold: bool,
    ) -> Result<(Manifest, Written), StoreError> {
        let manifest = Manifest::of_bytes(&bytes, chunk_size)?;
        let written = self.share(manifest.clone(), bytes, hold);
        Ok((manifest, written))
    }

    /// [`Self::import_shared_held`] of bytes whose manifest is known.
    fn share(&self, manifest: Manifest, bytes: Arc<Vec<u8>>, hold: bool) -> Written {
        let id = manifest.id();
        let entry = {
            let mut blobs = lock(&self.inner.blobs);
            if hold {
                self.retain(&id);
            }
            if blobs.get(&id).is_some_and(|e| e.is_kept_whole()) {
                return Written::done();
            }
            file(
                &mut blobs,
                id,
                Entry::complete(manifest.clone(), Data::Shared(bytes.clone())),
            )
        };
        let Some(dir) = self.inner.dir.clone() else {
            return Written::done();
        };
        let (done, written) = tokio::sync::watch::channel(false);
        let store = self.clone();
        let spawned = std::thread::Builder::new().name("blob-write".into()).spawn(move || {
            if let Err(e) = store.persist_shared(&dir, &entry, bytes) {
                // The blob stays served from memory for the life of the process.
                tracing::warn!(blob = %entry.manifest.id(), error = %e, "writing a shared blob to disk failed");
            }
            // This thread's hold on the bytes ends before anyone is told it has.
            drop(entry);
            let _ = done.send(true);
        });
        if let Err(e) = spawned {
            tracing::warn!(blob = %id, error = %e, "no thread to write a shared blob; it stays in memory");
            return Written::done();
        }
        Written(written)
    }

    /// Serves a whole in-memory blob for as long as its producer holds `bytes`, without
    /// keeping it: nothing is written, and once the producer lets go (drops or takes back its
    /// last reference) the blob is gone from the store. Returns its manifest. A blob the store
    /// already keeps stays as it is (one it is still receiving is completed from `bytes`); a
    /// blob another producer offered as transient stays while either holds its bytes.
    ///
    /// For a result that one peer pulls once, soon (a FedAvg client's update, which the
    /// controller folds and forgets): writing it would cost the member a model's worth of
    /// copying and disk I/O in the middle of the transfer, for a copy nobody reads.
    pub fn import_transient(&self, bytes: &Arc<Vec<u8>>, chunk_size: u32) -> Result<Manifest, StoreError> {
        let manifest = Manifest::of_bytes(bytes, chunk_size)?;
        let id = manifest.id();
        let mut blobs = lock(&self.inner.blobs);
        let Some(e) = blobs.get(&id).filter(|e| !e.is_gone()).cloned() else {
            let entry = file(&mut blobs, id, Entry::complete(manifest.clone(), Data::Transient));
            lock(&entry.offered).add(bytes);
            return Ok(manifest);
        };
        lock(&e.offered).add(bytes);
        drop(blobs);
        // Being received (another job pulls the same content): completed from these bytes,
        // so that neither this result nor that pull waits on the other.
        if !e.is_kept_whole() && e.is_kept() {
            self.complete_from(&e, bytes)?;
        }
        Ok(manifest)
    }

    /// Writes the chunks of partial blob `e` that it lacks from `bytes`, its whole content.
    fn complete_from(&self, e: &Entry, bytes: &[u8]) -> Result<(), StoreError> {
        let id = e.manifest.id();
        for (i, chunk) in bytes.chunks(e.manifest.chunk_size as usize).enumerate() {
            if !e.has_chunk(i as u64) {
                self.put_chunk(&id, i as u64, chunk)?;
            }
        }
        Ok(())
    }

    /// Makes blob `id` the store's own when it is only lent to it by a producer
    /// ([`Self::import_transient`]): it is then written to disk behind, served from memory
    /// meanwhile, and stays once the producer lets go. For a pull that keeps what it pulls
    /// (the job holds it and others pull it from here) and finds it held already, as another
    /// job's transient result of the same content: without this, it would leave the store
    /// with that result. Returns whether the blob is now kept (`false`: not held, or gone).
    pub fn make_kept(&self, id: &BlobId) -> bool {
        let Some(e) = self.entry(id) else {
            return false;
        };
        let bytes = match &e.data {
            Data::Transient => e.offered_bytes(),
            _ => return true,
        };
        match bytes {
            Some(bytes) => {
                self.share(e.manifest.as_ref().clone(), bytes, false);
                true
            }
            None => false,
        }
    }

    /// Lets reads of blob `id` come from `bytes` (the blob's content, which the caller holds in
    /// memory anyway) for as long as the caller holds them, instead of from disk. For a model
    /// that is about to be pulled by many peers at once: serving it from memory saves a disk
    /// read per peer. Returns whether the store holds the blob whole and `bytes` match its
    /// length (nothing is lent otherwise).
    pub fn lend(&self, id: &BlobId, bytes: &Arc<Vec<u8>>) -> bool {
        let Some(e) = self.entry(id) else {
            return false;
        };
        if e.manifest.len != bytes.len() as u64 || lock(&e.have).present != e.manifest.chunk_count() {
            return false;
        }
        *lock(&e.hot) = Arc::downgrade(bytes);
        true
    }

    /// Ends what [`Self::lend`] (or [`Self::import_shared`], once written) started: reads of
    /// blob `id` come from disk again, even while someone still holds the bytes. So that an
    /// owner that lets go of a lent model can reuse its memory, or free it, without the
    /// chunks being sent at that moment (each holds the bytes until it is out) handing the
    /// bytes on to the next ones.
    pub fn end_lend(&self, id: &BlobId) {
        if let Some(e) = self.entry(id) {
            *lock(&e.hot) = Weak::new();
        }
    }

    /// Writes a shared blob's bytes to disk, then files it as a disk blob whose reads come
    /// from `bytes` while someone else holds them.
    fn persist_shared(&self, dir: &Path, shared: &Arc<Entry>, bytes: Arc<Vec<u8>>) -> Result<(), StoreError> {
        let manifest = &shared.manifest;
        let id = manifest.id();
        let tmp = DataFile::create_temp(dir)?;
        let written = (|| {
            let cs = manifest.chunk_size as usize;
            let (mut storage, off) = aligned_buffer(cs);
            for (i, chunk) in bytes.chunks(cs).enumerate() {
                let at = (i * cs) as u64;
                if tmp.takes_direct(chunk.len(), at) {
                    // Copied into an aligned buffer so the write skips the page cache.
                    let buf = &mut storage[off..off + chunk.len()];
                    buf.copy_from_slice(chunk);
                    tmp.write_at(buf, at)?;
                } else {
                    tmp.write_at(chunk, at)?;
                }
            }
            Ok::<_, StoreError>(())
        })();
        if let Err(e) = written {
            tmp.discard();
            return Err(e);
        }
        let file = tmp.install_whole(dir, manifest)?;
        let disk = Entry::complete((**manifest).clone(), Data::Disk(file));
        *lock(&disk.hot) = Arc::downgrade(&bytes);
        let mut blobs = lock(&self.inner.blobs);
        match blobs.get(&id) {
            Some(e) if Arc::ptr_eq(e, shared) => {
                self::file(&mut blobs, id, disk);
            }
            // Released while it was being written (only producers' offers left of it, if
            // anything): what was written goes too.
            Some(e) if e.is_kept() => {}
            _ => {
                drop(disk);
                super::disk::remove_files(dir, &id)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::bytes;
    use super::*;

    #[test]
    fn shared_import_is_served_at_once_then_written_and_read_from_memory_while_held() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        // 4096-byte chunks take the O_DIRECT path where the file system allows it; the short
        // last chunk takes the ordinary one.
        let data = Arc::new(bytes(3 * 4096 + 10));
        let (m, written) = store.import_shared(data.clone(), 4096).expect("import");
        assert_eq!(m, Manifest::of_bytes(&data, 4096).expect("m"));
        assert!(store.is_complete(&m.id()));
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        futures::executor::block_on(written.wait());
        assert_eq!(
            Arc::strong_count(&data),
            1,
            "once written, the store holds the bytes no more"
        );
        let path = store.data_path(&m.id()).expect("on disk once written");
        assert_eq!(std::fs::read(&path).expect("file"), *data, "the file holds the blob");
        // While the producer holds the bytes, reads come from memory: spoil the file to tell.
        std::fs::write(&path, vec![0u8; data.len()]).expect("spoil");
        assert_eq!(
            store.read_chunk(&m.id(), 1).expect("read"),
            Some(data[4096..8192].to_vec())
        );
        drop(data);
        assert_eq!(
            store.read_chunk(&m.id(), 1).expect("read"),
            Some(vec![0u8; 4096]),
            "released: read from disk"
        );
        // A reopened store finds it whole.
        let again = BlobStore::open(dir.path()).expect("reopen");
        assert!(again.is_complete(&m.id()));
    }

    #[test]
    fn a_chunk_read_from_disk_goes_into_the_callers_buffer_and_one_held_in_memory_is_a_view() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = bytes(3 * 4096);
        let m = store.import_bytes(&data, 4096).expect("import");
        // The buffer is allocated by the caller (on its thread) and comes back holding the chunk.
        // With room to start the chunk at a block boundary.
        let buf = vec![0u8; 4096 + crate::store::DIRECT_ALIGN];
        let at = buf.as_ptr();
        match store.read_chunk_to_send(&m.id(), 1, buf).expect("read") {
            Some(ChunkBytes::Read { buf, start, len }) => {
                assert_eq!(buf.as_ptr(), at, "read into the buffer given");
                assert_eq!(buf[start..start + len], data[4096..8192]);
                assert!((buf[start..].as_ptr() as usize).is_multiple_of(crate::store::DIRECT_ALIGN));
            }
            other => panic!("expected a chunk read into the buffer, got {other:?}"),
        }
        assert!(store.chunk_in_memory(&m.id(), 1).is_none(), "on disk only: no view");
        let held = Arc::new(data.clone());
        assert!(store.lend(&m.id(), &held));
        match store.chunk_in_memory(&m.id(), 2) {
            Some(ChunkBytes::Held { bytes, range }) => {
                assert!(Arc::ptr_eq(&bytes, &held));
                assert_eq!(range, 8192..12288);
            }
            other => panic!("expected a view, got {other:?}"),
        }
        store.end_lend(&m.id());
        assert!(store.chunk_in_memory(&m.id(), 2).is_none());
    }

    #[test]
    fn transient_import_is_served_while_held_never_written_and_gone_once_let_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096 + 10));
        let m = store.import_transient(&data, 4096).expect("import");
        assert_eq!(m, Manifest::of_bytes(&data, 4096).expect("m"));
        assert!(store.is_complete(&m.id()));
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        assert_eq!(Arc::strong_count(&data), 1, "the store keeps no reference of its own");
        assert_eq!(store.data_path(&m.id()), None, "nothing on disk");
        let on_disk: Vec<_> = std::fs::read_dir(dir.path().join("blobs")).expect("dir").collect();
        assert!(on_disk.is_empty(), "no file written: {on_disk:?}");
        // The producer takes its bytes back (e.g. to reuse the memory): the blob is gone,
        // and is not found complete where a fetch would look.
        let mine = Arc::try_unwrap(data).expect("sole owner");
        assert_eq!(store.read_chunk(&m.id(), 0).expect("read"), None);
        assert!(!store.is_complete(&m.id()));
        assert_eq!(store.missing(&m.blob_ref()).expect("missing").len(), 4);

        // Kept after all: importing it for real replaces the transient entry.
        let data = Arc::new(mine);
        store.import_transient(&data, 4096).expect("again");
        let (_, written) = store.import_shared(data.clone(), 4096).expect("shared");
        futures::executor::block_on(written.wait());
        drop(data);
        assert!(store.is_complete(&m.id()), "written, so held without its producer");
        assert!(store.data_path(&m.id()).is_some());
        // And a blob the store keeps stays kept when offered as transient.
        let copy = Arc::new(store.read_all(&m.id()).expect("read"));
        store.import_transient(&copy, 4096).expect("transient of a kept blob");
        drop(copy);
        assert!(store.is_complete(&m.id()));
    }

    #[test]
    fn a_transient_blob_offered_by_two_producers_stays_while_either_holds_it() {
        let store = BlobStore::memory();
        let (a, b) = (Arc::new(bytes(3 * 4096)), Arc::new(bytes(3 * 4096)));
        let m = store.import_transient(&a, 4096).expect("a");
        store.import_transient(&b, 4096).expect("b");
        // The first producer takes its bytes back (a next round updating them in place).
        drop(a);
        assert!(store.is_complete(&m.id()), "the second producer still serves it");
        assert_eq!(
            store.read_chunk(&m.id(), 2).expect("read"),
            Some(bytes(3 * 4096)[8192..].to_vec())
        );
        drop(b);
        assert!(!store.is_complete(&m.id()));
        // And the other way round: the later one goes first.
        let (a, b) = (Arc::new(bytes(3 * 4096)), Arc::new(bytes(3 * 4096)));
        store.import_transient(&a, 4096).expect("a");
        store.import_transient(&b, 4096).expect("b");
        drop(b);
        assert!(store.is_complete(&m.id()));
        drop(a);
        assert!(!store.is_complete(&m.id()));
    }

    #[test]
    fn a_kept_blob_released_while_a_producer_offers_it_stays_served_from_the_producer() {
        let dir = tempfile::tempdir().expect("tmp");
        for store in [BlobStore::memory(), BlobStore::open(dir.path()).expect("open")] {
            // One job publishes a model (held); another's learner offers the same content as
            // its transient result, before or after.
            for offered_first in [false, true] {
                let result = Arc::new(bytes(3 * 4096));
                if offered_first {
                    store.import_transient(&result, 4096).expect("transient");
                }
                let m = store.import_bytes_held(&bytes(3 * 4096), 4096).expect("publish");
                if !offered_first {
                    store.import_transient(&result, 4096).expect("transient");
                }
                // The first job lets go of its model: the result is still served.
                assert!(store.release(&m.id()));
                assert!(store.is_complete(&m.id()), "offered first: {offered_first}");
                assert_eq!(
                    store.read_chunk(&m.id(), 1).expect("read"),
                    Some(bytes(3 * 4096)[4096..8192].to_vec())
                );
                drop(result);
                assert!(!store.is_complete(&m.id()));
            }
        }
        assert_eq!(
            std::fs::read_dir(dir.path().join("blobs")).expect("dir").count(),
            0,
            "no file left"
        );
    }

    #[test]
    fn a_transient_result_completes_the_same_blob_being_received_which_stays_kept() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096 + 10));
        let m = Manifest::of_bytes(&data, 4096).expect("m");
        store.begin(m.clone()).expect("begin");
        store.put_chunk(&m.id(), 1, &data[4096..8192]).expect("put");
        store.import_transient(&data, 4096).expect("transient");
        drop(data);
        assert!(store.is_complete(&m.id()), "completed, and kept without its producer");
        assert_eq!(store.read_all(&m.id()).expect("read"), bytes(3 * 4096 + 10));
        assert!(store.data_path(&m.id()).is_some());
    }

    #[test]
    fn a_blob_about_to_be_received_that_a_producer_offers_meanwhile_is_kept_whole_at_once() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096));
        let m = Manifest::of_bytes(&data, 4096).expect("m");
        // A pull found no manifest, asked a source for it; meanwhile the same content is
        // offered here as a transient result.
        store.import_transient(&data, 4096).expect("transient");
        store.begin(m.clone()).expect("begin");
        drop(data);
        assert!(store.is_complete(&m.id()), "kept whole, without the producer");
        assert_eq!(store.read_all(&m.id()).expect("read"), bytes(3 * 4096));
    }

    #[test]
    fn a_transient_blob_made_kept_stays_once_its_producer_lets_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096));
        let m = store.import_transient(&data, 4096).expect("transient");
        assert!(store.make_kept(&m.id()));
        drop(data);
        assert!(store.is_complete(&m.id()), "kept: its producer's letting go leaves it");
        assert_eq!(store.read_all(&m.id()).expect("read"), bytes(3 * 4096));
        // Written behind (bounded wait).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while store.data_path(&m.id()).is_none() && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(store.data_path(&m.id()).is_some(), "on disk");
        assert!(store.make_kept(&m.id()), "kept already");
        assert!(!store.make_kept(&BlobId([7; 32])), "not held");
    }

    /// A disk store holding a blob of three 4 KiB chunks, lent from the returned bytes, whose
    /// file is then zeroed: a read that returns the real bytes came from memory.
    fn lent_blob_on_a_spoiled_file() -> (tempfile::TempDir, BlobStore, Arc<Vec<u8>>, Manifest) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096));
        let m = store.import_bytes(&data, 4096).expect("import");
        assert!(!store.lend(&m.id(), &Arc::new(bytes(10))), "not the blob's length");
        assert!(store.lend(&m.id(), &data));
        let path = store.data_path(&m.id()).expect("on disk");
        std::fs::write(&path, vec![0u8; data.len()]).expect("spoil");
        (dir, store, data, m)
    }

    #[test]
    fn a_lent_blob_is_read_from_memory_while_the_lender_holds_it() {
        let (_dir, store, data, m) = lent_blob_on_a_spoiled_file();
        assert_eq!(store.read_chunk(&m.id(), 2).expect("read"), Some(data[8192..].to_vec()));
        drop(data);
        assert_eq!(store.read_chunk(&m.id(), 2).expect("read"), Some(vec![0u8; 4096]));
    }

    #[test]
    fn a_chunk_to_send_is_a_view_of_a_lent_blob_until_the_lend_ends() {
        let (_dir, store, data, m) = lent_blob_on_a_spoiled_file();
        let view = store
            .read_chunk_to_send(&m.id(), 1, Vec::new())
            .expect("read")
            .expect("held");
        assert!(matches!(view, ChunkBytes::Held { .. }), "no copy of a lent blob");
        assert_eq!(*view, data[4096..8192]);
        // The lender lets go; the view being sent still holds the bytes, but the next read
        // no longer gets them from it: the lend is over.
        store.end_lend(&m.id());
        drop(data);
        assert_eq!(view[..4], bytes(3 * 4096)[4096..4100], "a view outlives its lender");
        let next = store
            .read_chunk_to_send(&m.id(), 2, Vec::new())
            .expect("read")
            .expect("chunk");
        assert!(matches!(next, ChunkBytes::Read { .. }), "read from disk");
        assert_eq!(*next, [0u8; 4096]);
        drop(view);
        assert_eq!(store.read_chunk(&m.id(), 1).expect("read"), Some(vec![0u8; 4096]));
    }

    #[test]
    fn shared_import_into_a_memory_store_and_of_a_blob_already_held() {
        let store = BlobStore::memory();
        let data = Arc::new(bytes(1000));
        let (m, written) = store.import_shared(data.clone(), 100).expect("import");
        futures::executor::block_on(written.wait());
        assert_eq!(store.import_shared(data.clone(), 100).expect("again").0, m);
        assert_eq!(store.import_bytes(&data, 100).expect("bytes"), m);
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        assert!(
            !store.put_chunk(&m.id(), 0, &data[..100]).expect("put"),
            "already whole"
        );
    }
}
