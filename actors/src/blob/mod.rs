//! Blob transfers over `/flare/blob/1` (wire format: `flare_protocols::blob`).
//!
//! - [`serve`]: answers other peers' pulls from the local store.
//! - [`fetch`]: pulls a blob from one or more sources into the local store, verifying every
//!   chunk, resuming from what is already held, and moving work away from sources that fail
//!   (a scheduler over one receiver state machine per stream).
//! - [`bulk`]: the sockets of the bulk channel, a stream's chunks over a connection of their
//!   own.
//! - [`pending`]: outputs served while their learner produces them.
//! - [`pace`]: a node's upload cap, one schedule for every chunk it serves.
//! - [`recent`]: chunks read lately, for the other streams serving the same blob in step.
//! - [`faults`]: switches that make a source misbehave, for tests of the above.

pub mod bulk;
pub mod faults;
pub mod fetch;
pub mod pace;
pub mod pending;
pub mod recent;
pub mod serve;

pub use faults::{FaultPlan, ServeFaults};
pub use fetch::{ChunkFn, CreditGate, FetchError, FetchOptions, FetchReport, Part, Progress, SourceError};
pub use pace::UploadPace;
pub use pending::{PendingGuard, PendingOutput, PendingOutputs};
pub use serve::ServeStats;
