//! Split learning's configuration, what it reports and how it fails: the types around the
//! workflow in `mod.rs`, so that file reads as the exchange itself.

use crate::job::communicator::CommError;
use crate::learner::LearnerError;
use crate::learner::split::{EpochEval, SplitSpec, Stack, VerticalDigits};
use flare_protocols::ctl::Value;
use flare_protocols::model::Model;
use flare_protocols::split::{self as wire};
use libp2p::PeerId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// Test rows per evaluation step unless configured otherwise.
pub const DEFAULT_EVAL_BATCH: usize = 512;

/// What the label party received from a data party in one forward result, as it arrived:
/// handed to [`SplitConfig::audit`] before it is checked or used.
#[derive(Clone, Debug)]
pub struct Received {
    /// The data party's index (its column band).
    pub party: usize,
    /// Its member name.
    pub member: String,
    /// The step.
    pub step: u64,
    /// The sample ids the forward named.
    pub rows: Vec<usize>,
    /// The values of the result message.
    pub values: BTreeMap<String, Value>,
    /// The model pulled over `/flare/blob/1`, when the payload came that way.
    pub pulled: Option<Model>,
}

/// Sees every forward result the label party receives (to audit what crosses the wire).
pub type Audit = Arc<dyn Fn(&Received) + Send + Sync>;

/// Parameters of a split-learning job.
#[derive(Clone)]
pub struct SplitConfig {
    /// The network and its training settings (the data parties build theirs from the same).
    pub spec: SplitSpec,
    /// The data parties, in band order: `parties[p]` holds band `p`.
    pub parties: Vec<PeerId>,
    /// How long one exchange (forward or backward, all parties) may take.
    pub step_timeout: Duration,
    /// Largest payload sent inline in a control message (bytes); larger ones go as blobs. At
    /// most [`wire::MAX_INLINE`]; 0 sends every payload as a blob. Blob payloads stay in the
    /// stores of both sides until those are cleared (one per step and party).
    pub inline_max: usize,
    /// Test rows per evaluation forward.
    pub eval_batch: usize,
    /// All the data, to train the central baseline alongside (sim and tests only: a real label
    /// party holds no features).
    pub baseline: Option<Arc<VerticalDigits>>,
    /// Called with every forward result as it arrives.
    pub audit: Option<Audit>,
}

impl SplitConfig {
    /// A configuration with default limits: 60 s a step, payloads up to 512 KiB inline, test
    /// rows 512 at a time, no baseline, no audit.
    pub fn new(spec: SplitSpec, parties: Vec<PeerId>) -> Self {
        Self {
            spec,
            parties,
            step_timeout: Duration::from_secs(60),
            inline_max: wire::DEFAULT_INLINE_MAX,
            eval_batch: DEFAULT_EVAL_BATCH,
            baseline: None,
            audit: None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), SplitError> {
        self.spec.validate()?;
        let bad = |m: String| Err(SplitError::Config(m));
        if self.parties.len() != self.spec.parties {
            return bad(format!(
                "{} data parties named, the spec has {}",
                self.parties.len(),
                self.spec.parties
            ));
        }
        if self.inline_max > wire::MAX_INLINE {
            return bad(format!(
                "inline limit {} is above the control-message room of {} bytes",
                self.inline_max,
                wire::MAX_INLINE
            ));
        }
        if self.eval_batch == 0 || self.eval_batch > wire::MAX_ROWS {
            return bad(format!(
                "eval batch {} is not in 1..={}",
                self.eval_batch,
                wire::MAX_ROWS
            ));
        }
        Ok(())
    }
}

/// One epoch of the split model.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct EpochReport {
    /// Epoch, from 0.
    pub epoch: u32,
    /// Mean cross-entropy over the epoch's training batches, as measured while training.
    pub train_loss: f64,
    /// Accuracy on the held-out samples after the epoch.
    pub test_accuracy: f64,
    /// Mean cross-entropy on them.
    pub test_loss: f64,
    /// Wall-clock seconds of the epoch, evaluation included.
    pub secs: f64,
}

/// The end of a split-learning job.
#[derive(Clone, Debug)]
pub struct SplitOutcome {
    /// One report per epoch.
    pub epochs: Vec<EpochReport>,
    /// The central baseline's epochs (empty without [`SplitConfig::baseline`]).
    pub central: Vec<EpochEval>,
    /// Activation bytes received from the data parties (payload only).
    pub activation_bytes: u64,
    /// Gradient bytes sent to them (payload only).
    pub gradient_bytes: u64,
    /// Payloads (either way) that went as blobs because they were above the inline limit.
    pub blob_payloads: u64,
    /// The trained top (the bottoms stay with their data parties).
    pub top: Stack,
}

impl SplitOutcome {
    /// The split model's final test accuracy.
    pub fn test_accuracy(&self) -> Option<f64> {
        self.epochs.last().map(|e| e.test_accuracy)
    }

    /// The central baseline's final test accuracy.
    pub fn central_accuracy(&self) -> Option<f64> {
        self.central.last().map(|e| e.test_accuracy)
    }
}

/// Why a split-learning job stopped.
#[derive(Debug, thiserror::Error)]
pub enum SplitError {
    /// The configuration cannot work.
    #[error("bad split-learning configuration: {0}")]
    Config(String),
    /// The network could not be built or a batch did not fit it.
    #[error(transparent)]
    Learner(#[from] LearnerError),
    /// Publishing or pulling a payload failed locally.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A data party refused or failed a step, or answered with a bad payload.
    #[error("{member}, step {step}: {reason}")]
    Party {
        /// The member.
        member: String,
        /// The step.
        step: u64,
        /// What went wrong.
        reason: String,
    },
    /// Some data parties did not answer a step in time.
    #[error("step {step}: no result within the step timeout from {}", missing.join(", "))]
    Timeout {
        /// The step.
        step: u64,
        /// Who did not answer.
        missing: Vec<String>,
    },
    /// The central baseline failed.
    #[error("central baseline: {0}")]
    Baseline(String),
}
