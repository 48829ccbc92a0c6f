//! A submitted job: the spec's exact bytes, signed by whoever submits it, so that every
//! member checks for itself who asked for the job and that nobody changed a byte on the way.
//!
//! # Format
//! ```text
//! SignedJob { spec: bytes, submitter: bytes, submitted_at_ms: u64, signature: bytes }
//! signed bytes = "flare-job/1" 0x00  len(spec):u64be  spec  submitted_at_ms:u64be
//! ```
//! `spec` is the job file as the submitter wrote it (TOML; this crate does not read it).
//! `submitter` is the submitter's libp2p public key, protobuf-encoded (its peer id is the
//! submitter's name in site policies); `signature` is that key's signature (ed25519) over the
//! signed bytes. The domain tag keeps a job signature from being taken for any other
//! signature made with the same key.
//!
//! A job's id is derived from the signed bytes and the signature: the same submission has the
//! same id on every member, and a resubmission (a new time) is another job.

use libp2p::PeerId;
use libp2p::identity::{Keypair, PublicKey};
use serde::{Deserialize, Serialize};

use crate::ctl::JobId;

/// Largest job spec accepted (a job file names members and settings, never data).
pub const MAX_SPEC_BYTES: usize = 256 << 10;

/// What the signature covers, ahead of the spec.
const DOMAIN: &[u8] = b"flare-job/1\0";

/// A job as submitted (see the module doc).
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedJob {
    /// The job file's exact bytes.
    #[serde(with = "serde_bytes_vec")]
    pub spec: Vec<u8>,
    /// The submitter's public key, protobuf-encoded.
    #[serde(with = "serde_bytes_vec")]
    pub submitter: Vec<u8>,
    /// When it was submitted (milliseconds since the Unix epoch, the submitter's clock).
    pub submitted_at_ms: u64,
    /// The submitter's signature over the signed bytes.
    #[serde(with = "serde_bytes_vec")]
    pub signature: Vec<u8>,
}

/// Why a submitted job is not what it claims to be.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobSignatureError {
    /// The spec is larger than [`MAX_SPEC_BYTES`].
    #[error("the job spec is {0} bytes, more than the {MAX_SPEC_BYTES} accepted")]
    TooLarge(usize),
    /// The submitter field is not a public key.
    #[error("the submitter is not a public key: {0}")]
    BadKey(String),
    /// The signature does not match the spec, the time and the key.
    #[error("the signature does not match the job spec (changed after it was signed, or signed by another key)")]
    BadSignature,
    /// The key cannot sign (not a key pair that signs).
    #[error("cannot sign: {0}")]
    Signing(String),
}

impl SignedJob {
    /// Signs `spec`, submitted at `submitted_at_ms`, with `key`.
    pub fn sign(spec: Vec<u8>, key: &Keypair, submitted_at_ms: u64) -> Result<Self, JobSignatureError> {
        if spec.len() > MAX_SPEC_BYTES {
            return Err(JobSignatureError::TooLarge(spec.len()));
        }
        let (submitter, signature) = sign_with(key, &signed_bytes(&spec, submitted_at_ms))?;
        Ok(Self {
            spec,
            submitter,
            submitted_at_ms,
            signature,
        })
    }

    /// Checks the signature; returns the submitter's peer id.
    pub fn verify(&self) -> Result<PeerId, JobSignatureError> {
        if self.spec.len() > MAX_SPEC_BYTES {
            return Err(JobSignatureError::TooLarge(self.spec.len()));
        }
        verify_by(
            &self.submitter,
            &signed_bytes(&self.spec, self.submitted_at_ms),
            &self.signature,
        )
    }

    /// The job's id: the first 8 bytes, in hex, of the hash of what was signed and the
    /// signature. The same on every member; another submission is another id.
    pub fn id(&self) -> JobId {
        let mut h = blake3::Hasher::new();
        h.update(&signed_bytes(&self.spec, self.submitted_at_ms));
        h.update(&self.submitter);
        h.update(&self.signature);
        JobId(format!("j{}", hex::encode(&h.finalize().as_bytes()[..8])))
    }
}

/// An order to stop a job, signed by whoever gives it, so that every member checks by itself
/// that the signer may (the job's submitter, or an admin in that member's own policy) and
/// that nobody changed the order on the way.
///
/// ```text
/// signed bytes = "flare-abort/1" 0x00  len(job):u64be job  len(reason):u64be reason  at_ms:u64be
/// ```
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct SignedAbort {
    /// The job to stop.
    pub job: JobId,
    /// Why, in the signer's words (shown in every member's record of the job).
    pub reason: String,
    /// The signer's public key, protobuf-encoded.
    #[serde(with = "serde_bytes_vec")]
    pub by: Vec<u8>,
    /// When it was signed (milliseconds since the Unix epoch, the signer's clock).
    pub at_ms: u64,
    /// The signer's signature over the signed bytes.
    #[serde(with = "serde_bytes_vec")]
    pub signature: Vec<u8>,
}

/// What an abort's signature covers, ahead of the rest.
const ABORT_DOMAIN: &[u8] = b"flare-abort/1\0";

impl SignedAbort {
    /// Signs the order to stop `job` for `reason` with `key`.
    pub fn sign(job: JobId, reason: String, key: &Keypair, at_ms: u64) -> Result<Self, JobSignatureError> {
        if reason.len() > MAX_SPEC_BYTES {
            return Err(JobSignatureError::TooLarge(reason.len()));
        }
        let (by, signature) = sign_with(key, &abort_bytes(&job, &reason, at_ms))?;
        Ok(Self {
            job,
            reason,
            by,
            at_ms,
            signature,
        })
    }

    /// Checks the signature; returns the signer's peer id.
    pub fn verify(&self) -> Result<PeerId, JobSignatureError> {
        if self.reason.len() > MAX_SPEC_BYTES {
            return Err(JobSignatureError::TooLarge(self.reason.len()));
        }
        verify_by(
            &self.by,
            &abort_bytes(&self.job, &self.reason, self.at_ms),
            &self.signature,
        )
    }
}

/// Signs `bytes` (which start with their domain tag) with `key`: the key's public half,
/// protobuf-encoded, and the signature.
fn sign_with(key: &Keypair, bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), JobSignatureError> {
    let signature = key.sign(bytes).map_err(|e| JobSignatureError::Signing(e.to_string()))?;
    Ok((key.public().encode_protobuf(), signature))
}

/// Checks `signature` over `bytes` by the protobuf-encoded public key `by`; the signer.
fn verify_by(by: &[u8], bytes: &[u8], signature: &[u8]) -> Result<PeerId, JobSignatureError> {
    let key = PublicKey::try_decode_protobuf(by).map_err(|e| JobSignatureError::BadKey(e.to_string()))?;
    if !key.verify(bytes, signature) {
        return Err(JobSignatureError::BadSignature);
    }
    Ok(key.to_peer_id())
}

fn abort_bytes(job: &JobId, reason: &str, at_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(ABORT_DOMAIN.len() + 24 + job.0.len() + reason.len());
    b.extend_from_slice(ABORT_DOMAIN);
    for part in [job.0.as_bytes(), reason.as_bytes()] {
        b.extend_from_slice(&(part.len() as u64).to_be_bytes());
        b.extend_from_slice(part);
    }
    b.extend_from_slice(&at_ms.to_be_bytes());
    b
}

/// Where a job stands at one site.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// The site took another site's offer and waits to be told to start.
    Offered,
    /// The site runs its part.
    Running,
    /// Its part ended with the job finished.
    Finished,
    /// Its part ended with the job failed (the reason says why).
    Failed,
    /// Stopped by someone with the right to (the reason says who).
    Aborted,
    /// The site, or enough of the job's members, refused it (the reason says who and why).
    Refused,
    /// Offered and taken here, but the job did not start (too many others refused it).
    Withdrawn,
}

impl JobState {
    /// Whether the state is final.
    pub fn is_over(self) -> bool {
        !matches!(self, Self::Offered | Self::Running)
    }

    /// The state as `jobs` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Offered => "offered",
            Self::Running => "running",
            Self::Finished => "finished",
            Self::Failed => "failed",
            Self::Aborted => "aborted",
            Self::Refused => "refused",
            Self::Withdrawn => "withdrawn",
        }
    }
}

impl std::fmt::Display for JobState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One site's view of one job: what `flare-node jobs` and `status` print, and what a site
/// keeps of each job it was handed.
#[derive(Clone, PartialEq, Debug, Serialize, Deserialize)]
pub struct JobView {
    /// The job.
    pub id: JobId,
    /// Its name in the job file.
    pub name: String,
    /// Its workflow.
    pub workflow: String,
    /// The site that reports this view.
    pub site: String,
    /// That site's part: "controller", "client", "controller+client" or "member" (swarm).
    pub part: String,
    /// Where the job stands there.
    pub state: JobState,
    /// Why it failed, was refused or withdrawn, or what it waits for; empty when nothing
    /// needs saying.
    pub reason: String,
    /// Rounds completed, as far as that site knows.
    pub round: u32,
    /// Rounds the job runs.
    pub rounds: u32,
    /// The members it runs with (all it names until it starts).
    pub members: Vec<String>,
    /// The submitter's peer id.
    pub submitter: String,
    /// When it was submitted (milliseconds since the Unix epoch, the submitter's clock).
    pub submitted_at_ms: u64,
    /// When this view last changed (the reporting site's clock).
    pub updated_at_ms: u64,
    /// The global model's metrics after each round, where that site measures them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<std::collections::BTreeMap<String, f64>>,
}

fn signed_bytes(spec: &[u8], submitted_at_ms: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(DOMAIN.len() + 16 + spec.len());
    b.extend_from_slice(DOMAIN);
    b.extend_from_slice(&(spec.len() as u64).to_be_bytes());
    b.extend_from_slice(spec);
    b.extend_from_slice(&submitted_at_ms.to_be_bytes());
    b
}

/// Byte strings as CBOR byte strings, not arrays of integers.
mod serde_bytes_vec {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
                Ok(v)
            }
        }
        d.deserialize_bytes(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn job(spec: &str) -> (Keypair, SignedJob) {
        let key = Keypair::generate_ed25519();
        let j = SignedJob::sign(spec.as_bytes().to_vec(), &key, 1_700_000_000_000).expect("sign");
        (key, j)
    }

    #[test]
    fn a_signed_job_verifies_as_its_submitter() {
        let (key, j) = job("[job]\nname = \"x\"\n");
        assert_eq!(j.verify(), Ok(key.public().to_peer_id()));
        assert_eq!(j.id(), j.clone().id(), "the id is a function of the submission");
        assert!(j.id().0.starts_with('j') && j.id().0.len() == 17);
    }

    #[test]
    fn any_change_breaks_the_signature() {
        let (_, j) = job("[job]\nname = \"x\"\nrounds = 5\n");
        let mut spec = j.clone();
        let at = spec.spec.len() - 2;
        spec.spec[at] = b'6';
        assert_eq!(spec.verify(), Err(JobSignatureError::BadSignature));
        let mut time = j.clone();
        time.submitted_at_ms += 1;
        assert_eq!(time.verify(), Err(JobSignatureError::BadSignature));
        let mut other = j.clone();
        other.submitter = Keypair::generate_ed25519().public().encode_protobuf();
        assert_eq!(other.verify(), Err(JobSignatureError::BadSignature));
        let mut garbage = j;
        garbage.submitter = vec![1, 2, 3];
        assert!(matches!(garbage.verify(), Err(JobSignatureError::BadKey(_))));
    }

    #[test]
    fn resubmitting_the_same_spec_is_another_job_and_oversize_specs_are_refused() {
        let key = Keypair::generate_ed25519();
        let a = SignedJob::sign(b"spec".to_vec(), &key, 1).expect("sign");
        let b = SignedJob::sign(b"spec".to_vec(), &key, 2).expect("sign");
        assert_ne!(a.id(), b.id());
        assert_eq!(
            SignedJob::sign(vec![b' '; MAX_SPEC_BYTES + 1], &key, 1),
            Err(JobSignatureError::TooLarge(MAX_SPEC_BYTES + 1))
        );
    }

    #[test]
    fn an_abort_verifies_as_its_signer_and_any_change_breaks_it() {
        let key = Keypair::generate_ed25519();
        let a = SignedAbort::sign(JobId("j1".into()), "wrong data".into(), &key, 7).expect("sign");
        assert_eq!(a.verify(), Ok(key.public().to_peer_id()));
        let mut other_job = a.clone();
        other_job.job = JobId("j2".into());
        assert_eq!(other_job.verify(), Err(JobSignatureError::BadSignature));
        let mut reason = a.clone();
        reason.reason.push('!');
        assert_eq!(reason.verify(), Err(JobSignatureError::BadSignature));
        let mut moved = a;
        // The same bytes, split differently between the fields, are another order.
        moved.job = JobId("j1w".into());
        moved.reason = "rong data".into();
        assert_eq!(moved.verify(), Err(JobSignatureError::BadSignature));
    }

    proptest! {
        #[test]
        fn cbor_round_trips(spec in proptest::collection::vec(any::<u8>(), 0..512), at in any::<u64>()) {
            let key = Keypair::generate_ed25519();
            let j = SignedJob::sign(spec, &key, at).expect("sign");
            let mut buf = Vec::new();
            ciborium::into_writer(&j, &mut buf).expect("encode");
            let back: SignedJob = ciborium::from_reader(buf.as_slice()).expect("decode");
            prop_assert_eq!(back.verify(), Ok(key.public().to_peer_id()));
            prop_assert_eq!(back, j);
        }
    }
}
