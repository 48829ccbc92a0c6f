//! Which blobs a job still needs: counted holds, so that a store does not grow with the
//! rounds. A workflow or an executor holds each blob it stores for the job
//! ([`BlobStore::retain`]) and lets go once no round, checkpoint or member needs it
//! ([`BlobStore::release`]); the last release removes the blob, from memory and from disk.
//! Holds are counted because one node can need the same blob twice (in a swarm, a member's
//! controller side publishes the model its executor then trains on; content addressing gives
//! both the same id). A blob nobody ever held (imported by hand, a benchmark's) is never
//! removed by this.

use flare_protocols::BlobId;

use super::BlobStore;
use super::disk::remove_files;
use crate::lock;

impl BlobStore {
    /// Takes a hold on blob `id` (held or about to be): it stays until every hold is released.
    pub fn retain(&self, id: &BlobId) {
        *lock(&self.inner.holds).entry(*id).or_insert(0) += 1;
    }

    /// Releases one hold on blob `id`; the last one removes the blob (its bytes in memory,
    /// its files on disk). Returns whether it was removed. Readers that already have a chunk
    /// or an open file keep what they have; later readers find the blob absent.
    pub fn release(&self, id: &BlobId) -> bool {
        {
            let mut holds = lock(&self.inner.holds);
            match holds.get_mut(id) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    return false;
                }
                Some(_) => {
                    holds.remove(id);
                }
                None => return false,
            }
        }
        self.remove_unless_held(id)
    }

    /// Holds on blob `id` now.
    pub fn holds_on(&self, id: &BlobId) -> usize {
        lock(&self.inner.holds).get(id).copied().unwrap_or(0)
    }

    /// Removes blob `id` whole or partial, unless a hold was taken on it since its last
    /// release (another job storing the same content: content addressing gives both one id);
    /// whether it was removed. Checked and done under the lock that imports take their holds
    /// under (see `import_reader_held`), files included, so an import of the same content
    /// either holds the blob before this looks or finds it gone and stores it anew.
    fn remove_unless_held(&self, id: &BlobId) -> bool {
        let mut blobs = lock(&self.inner.blobs);
        if lock(&self.inner.holds).contains_key(id) {
            return false;
        }
        let removed = super::residency::unfile(&mut blobs, id);
        if let Some(dir) = &self.inner.dir {
            // A shared import still being written finds its entry gone and removes what it
            // wrote itself (see `persist_shared`).
            if let Err(e) = remove_files(dir, id) {
                tracing::warn!(blob = %id, error = %e, "removing a released blob's files failed");
            }
        }
        removed
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::bytes;
    use super::*;

    fn files(dir: &std::path::Path) -> usize {
        std::fs::read_dir(dir.join("blobs")).map_or(0, |d| d.count())
    }

    #[test]
    fn a_held_import_holds_the_blob_whether_it_stored_it_or_found_it() {
        let dir = tempfile::tempdir().expect("tmp");
        for store in [BlobStore::memory(), BlobStore::open(dir.path()).expect("open")] {
            // Two jobs store the same content; the first lets go: the second still has it.
            let a = store.import_bytes_held(&bytes(1000), 100).expect("import");
            let (b, _) = store
                .import_shared_held(std::sync::Arc::new(bytes(1000)), 100, true)
                .expect("import");
            assert_eq!(a.id(), b.id());
            assert_eq!(store.holds_on(&a.id()), 2);
            assert!(!store.release(&a.id()));
            assert!(store.is_complete(&a.id()), "the other job's hold keeps it");
            assert!(store.release(&a.id()));
            assert!(!store.is_complete(&a.id()));
        }
    }

    #[test]
    fn the_last_release_removes_a_blob_from_memory_and_disk() {
        let dir = tempfile::tempdir().expect("tmp");
        for store in [BlobStore::memory(), BlobStore::open(dir.path()).expect("open")] {
            let m = store.import_bytes(&bytes(1000), 100).expect("import");
            let id = m.id();
            store.retain(&id);
            store.retain(&id);
            assert!(!store.release(&id), "one hold is left");
            assert!(store.is_complete(&id));
            assert!(store.release(&id), "the last hold removes it");
            assert!(store.manifest(&id).is_none());
            assert!(!store.release(&id), "released blobs are not held");
            // Never held: releasing does nothing.
            let other = store.import_bytes(&bytes(10), 100).expect("import").id();
            assert!(!store.release(&other));
            assert!(store.is_complete(&other));
        }
        assert_eq!(files(dir.path()), 2, "only the unheld blob's data and manifest remain");
    }

    #[tokio::test]
    async fn a_shared_import_released_before_its_write_ends_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = std::sync::Arc::new(bytes(1 << 20));
        let (m, written) = store.import_shared(data, 4096).expect("import");
        store.retain(&m.id());
        store.release(&m.id());
        written.wait().await;
        assert!(store.manifest(&m.id()).is_none());
        assert_eq!(files(dir.path()), 0);
        let reopened = BlobStore::open(dir.path()).expect("reopen");
        assert!(reopened.manifest(&m.id()).is_none());
    }
}
