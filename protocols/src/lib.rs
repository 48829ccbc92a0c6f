//! What crosses the wire between flare-node peers, and nothing else.
//!
//! - [`blob_id`]: how a blob is named and verified (chunk hashes, blob ids, manifests).
//! - [`frame`]: the length-prefixed frame both protocols are built from, with its caps.
//! - [`ctl`]: the control protocol `/flare/ctl/1` (request-response, CBOR).
//! - [`blob`]: the chunked-stream protocol `/flare/blob/1` (pull-based, windowed, resumable).
//! - [`bulk`]: its bulk channel, a stream's chunks sealed over a TCP connection of their own.
//! - [`job`]: a submitted job, its spec signed by the submitter, and its id.
//! - [`split`]: split learning's steps and payloads, carried inside control tasks.
//! - [`client_api`]: the Client API, executor <-> external learner process over a local socket.
//! - [`model`]: models as named tensors in a canonical safetensors layout, and the one DIFF rule.
//!
//! Each protocol module starts with its wire specification in prose.

pub mod blob;
pub mod blob_id;
pub mod bulk;
pub mod client_api;
pub mod ctl;
pub mod frame;
pub mod job;
pub mod model;
pub mod split;

pub use blob_id::{BlobId, BlobRef, ChunkHash, Manifest, ManifestBuilder};
