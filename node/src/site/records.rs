//! A site's job records: every job handed to the site, its signed spec and where it stands,
//! in an embedded transactional database (redb) at `SITE_DIR/jobs.redb`. A record changes
//! in one transaction, so a crash mid-update leaves the old record or the new one, never half
//! of each, and `flare-node jobs` is a read of the table.

use std::path::{Path, PathBuf};

use flare_protocols::job::{JobView, SignedJob};
use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

/// Job id → CBOR of [`Record`].
const JOBS: TableDefinition<&str, &[u8]> = TableDefinition::new("jobs");

/// What a site keeps of one job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// Where the job stands here.
    pub view: JobView,
    /// The job as submitted: a restarted site runs its part again from it.
    pub signed: SignedJob,
}

/// The site's job records.
pub struct Records {
    db: redb::Database,
    path: PathBuf,
}

/// Why the job records cannot be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordsError {
    /// The database failed.
    #[error("{path}: {source}")]
    Db {
        /// The database file.
        path: PathBuf,
        /// What failed.
        source: Box<redb::Error>,
    },
    /// A record does not decode (written by another version, or damaged).
    #[error("{path}: the record of job {job} does not decode: {message}")]
    Decode {
        /// The database file.
        path: PathBuf,
        /// The job.
        job: String,
        /// What is wrong.
        message: String,
    },
}

impl Records {
    /// Opens the records at `path`, creating the file if there is none.
    pub fn open(path: &Path) -> Result<Self, RecordsError> {
        let db = redb::Database::create(path).map_err(|e| db_error(path, e))?;
        let records = Self {
            db,
            path: path.to_owned(),
        };
        // The table exists from the start, so reads never meet a missing table.
        records.write(|_| Ok(()))?;
        Ok(records)
    }

    /// The record of job `id`.
    pub fn get(&self, id: &str) -> Result<Option<Record>, RecordsError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
        let bytes = table.get(id).map_err(|e| self.error(e))?;
        bytes.map(|b| self.decode(id, b.value())).transpose()
    }

    /// Every record, oldest submission first.
    pub fn all(&self) -> Result<Vec<Record>, RecordsError> {
        let txn = self.db.begin_read().map_err(|e| self.error(e))?;
        let table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
        let mut out = Vec::new();
        for entry in table.iter().map_err(|e| self.error(e))? {
            let (k, v) = entry.map_err(|e| self.error(e))?;
            out.push(self.decode(k.value(), v.value())?);
        }
        out.sort_by_key(|r| (r.view.submitted_at_ms, r.view.id.0.clone()));
        Ok(out)
    }

    /// Writes `record` as it is (a new job, or one replaced whole).
    pub fn put(&self, record: &Record) -> Result<(), RecordsError> {
        let mut bytes = Vec::new();
        ciborium::into_writer(record, &mut bytes).map_err(|e| RecordsError::Decode {
            path: self.path.clone(),
            job: record.view.id.0.clone(),
            message: e.to_string(),
        })?;
        self.write(|t| {
            t.insert(record.view.id.0.as_str(), bytes.as_slice())?;
            Ok(())
        })
    }

    /// Changes the view of job `id` with `change`, read and written in one transaction;
    /// gives the new view (`None`: no such job).
    pub fn update(&self, id: &str, change: impl FnOnce(&mut JobView)) -> Result<Option<JobView>, RecordsError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        let view = {
            let mut table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
            let old = table.get(id).map_err(|e| self.error(e))?.map(|b| b.value().to_vec());
            let Some(old) = old else { return Ok(None) };
            let mut record = self.decode(id, &old)?;
            change(&mut record.view);
            record.view.updated_at_ms = now_ms();
            let mut bytes = Vec::new();
            ciborium::into_writer(&record, &mut bytes).map_err(|e| RecordsError::Decode {
                path: self.path.clone(),
                job: id.to_owned(),
                message: e.to_string(),
            })?;
            table.insert(id, bytes.as_slice()).map_err(|e| self.error(e))?;
            record.view
        };
        txn.commit().map_err(|e| self.error(e))?;
        Ok(Some(view))
    }

    fn write(
        &self,
        f: impl FnOnce(&mut redb::Table<&str, &[u8]>) -> Result<(), redb::Error>,
    ) -> Result<(), RecordsError> {
        let txn = self.db.begin_write().map_err(|e| self.error(e))?;
        {
            let mut table = txn.open_table(JOBS).map_err(|e| self.error(e))?;
            f(&mut table).map_err(|e| self.error(e))?;
        }
        txn.commit().map_err(|e| self.error(e))
    }

    fn decode(&self, id: &str, bytes: &[u8]) -> Result<Record, RecordsError> {
        ciborium::from_reader(bytes).map_err(|e| RecordsError::Decode {
            path: self.path.clone(),
            job: id.to_owned(),
            message: e.to_string(),
        })
    }

    fn error(&self, e: impl Into<redb::Error>) -> RecordsError {
        db_error(&self.path, e)
    }
}

fn db_error(path: &Path, e: impl Into<redb::Error>) -> RecordsError {
    RecordsError::Db {
        path: path.to_owned(),
        source: Box::new(e.into()),
    }
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use flare_protocols::ctl::JobId;
    use flare_protocols::job::JobState;

    fn record(at: u64) -> Record {
        let key = libp2p::identity::Keypair::generate_ed25519();
        let signed = SignedJob::sign(b"[job]\nname = \"x\"\n".to_vec(), &key, at).expect("sign");
        Record {
            view: JobView {
                id: signed.id(),
                name: "x".into(),
                workflow: "swarm".into(),
                site: "lab-a".into(),
                part: "member".into(),
                state: JobState::Offered,
                reason: String::new(),
                round: 0,
                rounds: 3,
                members: vec!["lab-a".into(), "lab-b".into()],
                submitter: key.public().to_peer_id().to_string(),
                submitted_at_ms: at,
                updated_at_ms: at,
                metrics: vec![],
            },
            signed,
        }
    }

    #[test]
    fn records_survive_reopening_and_update_in_place() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("jobs.redb");
        let (a, b) = (record(2), record(1));
        {
            let db = Records::open(&path).expect("open");
            db.put(&a).expect("put");
            db.put(&b).expect("put");
            let v = db
                .update(&a.view.id.0, |v| {
                    v.state = JobState::Running;
                    v.round = 2;
                })
                .expect("update")
                .expect("exists");
            assert_eq!((v.state, v.round), (JobState::Running, 2));
            assert_eq!(db.update("j-none", |_| {}).expect("update"), None);
        }
        let db = Records::open(&path).expect("reopen");
        let all = db.all().expect("all");
        assert_eq!(all.len(), 2);
        assert_eq!(all[0], b, "oldest submission first");
        assert_eq!(all[1].view.state, JobState::Running);
        assert_eq!(all[1].signed, a.signed);
        assert_eq!(db.get(&JobId("j-none".into()).0).expect("get"), None);
    }
}
