//! Split learning on vertically split data: each data party holds some feature columns of every
//! sample and the bottom of the network over them; the label party holds the labels and the top,
//! which takes the data parties' bottom outputs (the cut-layer activations) side by side.
//!
//! - [`SplitSpec`]: the architecture and training settings every party agrees on.
//! - [`data`]: the digits split into column bands ([`VerticalDigits`]).
//! - [`net`]: [`Stack`], a dense stack that runs forward and backward on blocks of rows.
//! - [`party`]: [`SplitDataParty`], the data party's [`crate::learner::Learner`].
//! - [`wire`]: the exchange's messages and payload layouts, specified in [`flare_protocols::split`].
//! - [`Top`] and [`CentralSplit`]: the label party's half, and the whole network in one process
//!   (the central baseline, trained on the same batches from the same start).
//!
//! The split model and the central baseline run the same `f32` code on the same values (the wire
//! carries `f32` bits unchanged), so in one run their weights agree to the bit.

pub mod data;
pub mod net;
pub mod party;
pub use flare_protocols::split as wire;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

pub use data::{LabelData, PartyFeatures, VerticalDigits};
pub use net::{Stack, Trace};
pub use party::SplitDataParty;

use super::LearnerError;
use crate::data::DIGITS_CLASSES;

/// The split network and how it is trained; every party builds its part from the same spec.
#[derive(Clone, Debug, PartialEq)]
pub struct SplitSpec {
    /// Data parties (each holds a band of image columns).
    pub parties: usize,
    /// Each data party's layer widths over its own features; the last is its cut layer (ReLU).
    pub bottom: Vec<usize>,
    /// The label party's hidden widths between the joined cut layers and the classes.
    pub top: Vec<usize>,
    /// SGD step size, for the bottoms and the top alike.
    pub lr: f32,
    /// Samples per batch.
    pub batch_size: usize,
    /// Passes over the training samples.
    pub epochs: u32,
    /// Seed of the initial weights and of the batch order.
    pub seed: u64,
}

impl SplitSpec {
    /// Refuses settings that cannot train (no parties, no cut layer, a bad step size, a batch whose
    /// row ids would not fit a control message).
    pub fn validate(&self) -> Result<(), LearnerError> {
        let bad = |m: String| Err(LearnerError::InvalidConfig(m));
        if self.parties == 0 {
            return bad("split learning needs at least one data party".into());
        }
        if self.bottom.is_empty() {
            return bad("the bottom needs at least one layer (the cut layer)".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("learning rate {} must be finite and positive", self.lr));
        }
        if self.batch_size == 0 || self.batch_size > wire::MAX_ROWS {
            return bad(format!(
                "batch size {} is not in 1..={}",
                self.batch_size,
                wire::MAX_ROWS
            ));
        }
        Ok(())
    }

    /// Width of one party's cut layer.
    pub fn cut_width(&self) -> usize {
        self.bottom.last().copied().unwrap_or(0)
    }

    /// Party `party`'s bottom over `inputs` features, seeded per party.
    pub fn bottom_net(&self, party: usize, inputs: usize) -> Result<Stack, LearnerError> {
        self.validate()?;
        let widths: Vec<usize> = std::iter::once(inputs).chain(self.bottom.iter().copied()).collect();
        Stack::new(&widths, true, self.seed ^ ((party as u64 + 1) << 32))
    }

    /// The label party's top.
    pub fn top_net(&self) -> Result<Top, LearnerError> {
        self.validate()?;
        let joined = self.parties.checked_mul(self.cut_width()).ok_or_else(|| {
            LearnerError::InvalidConfig(format!("{} parties × {} cut units", self.parties, self.cut_width()))
        })?;
        let widths: Vec<usize> = std::iter::once(joined)
            .chain(self.top.iter().copied())
            .chain([DIGITS_CLASSES])
            .collect();
        Ok(Top {
            net: Stack::new(&widths, false, self.seed)?,
            cut: self.cut_width(),
            parties: self.parties,
        })
    }

    /// The sample ids of each batch of `epoch`, the same on every party and in the baseline.
    pub fn epoch_batches(&self, train: &[usize], epoch: u32) -> Vec<Vec<usize>> {
        let mut order = train.to_vec();
        let seed = self.seed ^ 0xba7c_4e50_0000_0000 ^ u64::from(epoch);
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        order.chunks(self.batch_size.max(1)).map(<[usize]>::to_vec).collect()
    }
}

/// The label party's half: the top over the data parties' activations placed side by side.
#[derive(Clone, Debug)]
pub struct Top {
    net: Stack,
    cut: usize,
    parties: usize,
}

/// Loss and hits of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BatchScore {
    /// Summed cross-entropy over the batch.
    pub loss: f64,
    /// Rows whose most probable class is the label.
    pub correct: usize,
}

impl Top {
    /// The top network (to compare or save it).
    pub fn net(&self) -> &Stack {
        &self.net
    }

    /// Places each party's `rows × cut` activations side by side: `rows × (parties · cut)`.
    fn join(&self, parts: &[Vec<f32>], rows: usize) -> Result<Vec<f32>, LearnerError> {
        if parts.len() != self.parties || parts.iter().any(|p| p.len() != rows * self.cut) {
            return Err(LearnerError::DataMismatch(format!(
                "expected {} parties' activations of {rows} × {}",
                self.parties, self.cut
            )));
        }
        let mut joined = Vec::with_capacity(rows * self.cut * self.parties);
        for r in 0..rows {
            for p in parts {
                joined.extend_from_slice(&p[r * self.cut..(r + 1) * self.cut]);
            }
        }
        Ok(joined)
    }

    /// One training step on a batch: forward the joined activations, take a step down the loss,
    /// and return each party's activation gradient (`rows × cut`), in party order.
    pub fn train_batch(
        &mut self,
        parts: &[Vec<f32>],
        labels: &[u8],
        lr: f32,
    ) -> Result<(BatchScore, Vec<Vec<f32>>), LearnerError> {
        let rows = labels.len();
        let trace = self.net.forward(self.join(parts, rows)?)?;
        let (loss, correct, grad) = net::softmax_xent(trace.output(), labels, DIGITS_CLASSES);
        let back = self.net.backward(&trace, &grad, lr)?;
        let width = self.cut * self.parties;
        let grads = (0..self.parties)
            .map(|p| {
                back.chunks_exact(width)
                    .flat_map(|row| &row[p * self.cut..(p + 1) * self.cut])
                    .copied()
                    .collect()
            })
            .collect();
        Ok((BatchScore { loss, correct }, grads))
    }

    /// Loss and hits of a batch, without training.
    pub fn score(&self, parts: &[Vec<f32>], labels: &[u8]) -> Result<BatchScore, LearnerError> {
        let trace = self.net.forward(self.join(parts, labels.len())?)?;
        let (loss, correct, _) = net::softmax_xent(trace.output(), labels, DIGITS_CLASSES);
        Ok(BatchScore { loss, correct })
    }
}

/// One epoch's numbers.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct EpochEval {
    /// Epoch, from 0.
    pub epoch: u32,
    /// Mean cross-entropy over the epoch's training batches, as measured while training.
    pub train_loss: f64,
    /// Accuracy on the held-out test samples after the epoch.
    pub test_accuracy: f64,
    /// Mean cross-entropy on them.
    pub test_loss: f64,
}

/// The whole split network in one process, on all the features: the central baseline that split
/// learning has to match.
#[derive(Clone, Debug)]
pub struct CentralSplit {
    /// One bottom per data party.
    pub bottoms: Vec<Stack>,
    /// The top.
    pub top: Top,
}

impl CentralSplit {
    /// The network of `spec` over `data`'s parties, from the same start as the split parties.
    pub fn new(spec: &SplitSpec, data: &VerticalDigits) -> Result<Self, LearnerError> {
        if data.parties.len() != spec.parties {
            return Err(LearnerError::DataMismatch(format!(
                "{} parties in the data, {} in the spec",
                data.parties.len(),
                spec.parties
            )));
        }
        let bottoms = data
            .parties
            .iter()
            .enumerate()
            .map(|(p, f)| spec.bottom_net(p, f.width()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            bottoms,
            top: spec.top_net()?,
        })
    }

    /// One SGD step on the samples `ids`.
    pub fn train_batch(&mut self, data: &VerticalDigits, ids: &[usize], lr: f32) -> Result<BatchScore, LearnerError> {
        let (x, labels) = gather(data, ids)?;
        let traces = self
            .bottoms
            .iter()
            .zip(x)
            .map(|(b, x)| b.forward(x))
            .collect::<Result<Vec<_>, _>>()?;
        let acts: Vec<Vec<f32>> = traces.iter().map(|t| t.output().to_vec()).collect();
        let (score, grads) = self.top.train_batch(&acts, &labels, lr)?;
        for ((b, t), g) in self.bottoms.iter_mut().zip(&traces).zip(grads) {
            b.backward(t, &g, lr)?;
        }
        Ok(score)
    }

    /// Loss and hits on the samples `ids`.
    pub fn score(&self, data: &VerticalDigits, ids: &[usize]) -> Result<BatchScore, LearnerError> {
        let (x, labels) = gather(data, ids)?;
        let acts = self
            .bottoms
            .iter()
            .zip(x)
            .map(|(b, x)| b.forward(x).map(|t| t.output().to_vec()))
            .collect::<Result<Vec<_>, _>>()?;
        self.top.score(&acts, &labels)
    }
}

fn gather(data: &VerticalDigits, ids: &[usize]) -> Result<(Vec<Vec<f32>>, Vec<u8>), LearnerError> {
    let out_of_range = || LearnerError::DataMismatch("a sample id is out of range".into());
    let wire_ids: Vec<u32> = ids
        .iter()
        .map(|&i| u32::try_from(i).map_err(|_| out_of_range()))
        .collect::<Result<_, _>>()?;
    let x = data.features_of(&wire_ids).ok_or_else(out_of_range)?;
    let labels = data.label.labels_of(ids).ok_or_else(out_of_range)?;
    Ok((x, labels))
}

/// Trains [`CentralSplit`] on the same batches as split learning and measures it on the test
/// samples after every epoch (in batches of `eval_batch`, like the split run).
pub fn central_baseline(
    spec: &SplitSpec,
    data: &VerticalDigits,
    eval_batch: usize,
) -> Result<Vec<EpochEval>, LearnerError> {
    let mut net = CentralSplit::new(spec, data)?;
    let test = &data.label.test;
    let mut out = Vec::new();
    for epoch in 0..spec.epochs {
        let mut loss = 0.0;
        for ids in spec.epoch_batches(&data.label.train, epoch) {
            loss += net.train_batch(data, &ids, spec.lr)?.loss;
        }
        let (mut test_loss, mut correct) = (0.0, 0);
        for ids in test.chunks(eval_batch.max(1)) {
            let s = net.score(data, ids)?;
            test_loss += s.loss;
            correct += s.correct;
        }
        out.push(EpochEval {
            epoch,
            train_loss: loss / data.label.train.len().max(1) as f64,
            test_accuracy: correct as f64 / test.len().max(1) as f64,
            test_loss: test_loss / test.len().max(1) as f64,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests;
