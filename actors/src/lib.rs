//! The behaviour of a flare-node peer.
//!
//! - [`aggregate`]: streaming weighted averaging of model blobs, chunk by chunk.
//! - [`membership`]: the consortium's member table (who may connect).
//! - [`network`]: the actor that owns the libp2p swarm, and its handle.
//! - [`store`]: content-addressed blobs in memory or on disk, whole or partial.
//! - [`blob`]: serving and fetching blobs over `/flare/blob/1`.
//! - [`node`]: one running peer with all of the above wired together.
//! - [`job`]: controllers, executors, the communicator and the workflows.
//! - [`data`]: the shipped digits data set, seeded train/test and Dirichlet(α) member splits.
//! - [`learner`]: built-in pure-Rust learners (add-one, MLP) and named-tensor models.
//! - [`client`]: the Rust Client API, training loops that drive themselves (`tch` with `torch`).

pub mod aggregate;
pub mod blob;
pub mod busy;
pub mod client;
pub mod data;
pub mod job;
pub mod learner;
mod lockstep;
pub mod membership;
pub mod network;
pub mod node;
pub mod store;

pub use membership::{Member, MemberTable, Members};

/// Locks a mutex, taking the data as it is if a thread panicked while holding it: every
/// mutex here guards state that stays consistent between statements (maps, bitmaps, an
/// accumulator), and losing the node would be worse than a poisoned flag.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
pub use node::{Node, NodeConfig, Traffic};
pub use store::{BlobStore, Written};
