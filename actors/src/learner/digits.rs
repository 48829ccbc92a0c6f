//! The MLP on the digits data as a [`Learner`]: what a member runs in the `fedavg-digits` job.
//!
//! [`DigitsFederation`] deals the data once, the same way on every member and on the
//! controller (same seed, same split), so `sim` and one-process-per-member `run` give the same
//! model: each member trains on its Dirichlet shard; the common held-out test set measures the
//! global model and the local-only baselines.

use std::collections::BTreeMap;

use flare_protocols::model::{Model, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{LearnerError, Mlp, MlpConfig, NamedTensor};
use crate::data::{DIGITS_CLASSES, DIGITS_DIM, DataError, Dataset, digits, dirichlet_partition, train_test_split};
use crate::job::{Learner, TaskContext, TrainOutput};

/// Fewest training rows a member gets from the Dirichlet split.
pub const MIN_ROWS: usize = 10;

/// A model as named tensors (f32 only).
pub fn params_of(model: &Model) -> Result<Vec<NamedTensor>, String> {
    model
        .iter()
        .map(|(name, t)| {
            let values = t
                .to_f32()
                .ok_or_else(|| format!("tensor {name:?} is {:?}, not F32", t.dtype()))?;
            Ok(NamedTensor {
                name: name.clone(),
                shape: t.shape().to_vec(),
                values,
            })
        })
        .collect()
}

/// Named tensors as a model.
pub fn model_of(params: &[NamedTensor]) -> Result<Model, String> {
    let tensors = params
        .iter()
        .map(|p| {
            Ok((
                p.name.clone(),
                Tensor::from_f32(p.shape.clone(), &p.values).map_err(|e| e.to_string())?,
            ))
        })
        .collect::<Result<Vec<_>, String>>()?;
    Ok(Model::from_tensors(tensors))
}

/// How the MLP is built and trained.
#[derive(Clone, Debug, PartialEq)]
pub struct MlpSpec {
    /// Hidden layer sizes (empty: softmax regression).
    pub hidden: Vec<usize>,
    /// SGD learning rate.
    pub lr: f32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Local epochs per round.
    pub epochs: u32,
    /// Seed of the initial weights (the same on every member).
    pub seed: u64,
}

impl MlpSpec {
    /// A fresh network, the same on every member.
    pub fn build(&self) -> Result<Mlp, LearnerError> {
        let mut cfg = MlpConfig::new(DIGITS_DIM, self.hidden.clone(), DIGITS_CLASSES);
        cfg.learning_rate = self.lr;
        cfg.batch_size = self.batch_size;
        Mlp::new(cfg, self.seed)
    }
}

/// The digits data dealt over the members: a held-out test set and one shard per member.
#[derive(Clone, Debug)]
pub struct DigitsFederation {
    /// The common held-out test set.
    pub test: Dataset,
    /// Each member's training shard, in client order.
    pub shards: Vec<Dataset>,
}

impl DigitsFederation {
    /// Splits the shipped digits: `test_fraction` held out, the rest dealt to `members` by
    /// Dirichlet(`alpha`), all from `seed`.
    pub fn deal(members: usize, alpha: f64, test_fraction: f64, seed: u64) -> Result<Self, DataError> {
        let data = digits()?;
        let (train, test) = train_test_split(&data, test_fraction, seed)?;
        let parts = dirichlet_partition(&train, members, alpha, MIN_ROWS, seed)?;
        let shards = parts.iter().map(|p| train.subset(p)).collect::<Result<_, _>>()?;
        Ok(Self { test, shards })
    }

    /// Each member's model trained on its shard alone for `epochs` epochs, measured on the
    /// test set: the baseline federated learning has to beat.
    pub fn local_only(&self, spec: &MlpSpec, epochs: u32) -> Result<Vec<(f64, f64)>, LearnerError> {
        self.shards
            .iter()
            .enumerate()
            .map(|(i, shard)| {
                let mut mlp = spec.build()?;
                let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x10ca1 ^ i as u64);
                mlp.train(shard, epochs as usize, &mut rng)?;
                let e = mlp.evaluate(&self.test)?;
                Ok((e.accuracy, e.loss))
            })
            .collect()
    }
}

/// A member's MLP learner on its shard.
pub struct DigitsLearner {
    mlp: Mlp,
    shard: Dataset,
    spec: MlpSpec,
    member_index: u64,
}

impl DigitsLearner {
    /// The learner of the member at `member_index` (its position among the clients).
    pub fn new(spec: MlpSpec, shard: Dataset, member_index: usize) -> Result<Self, LearnerError> {
        Ok(Self {
            mlp: spec.build()?,
            shard,
            spec,
            member_index: member_index as u64,
        })
    }
}

impl Learner for DigitsLearner {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        self.mlp.set_params(&params_of(&global)?).map_err(|e| e.to_string())?;
        // Seeded by member and round, so every run of the same topology trains the same.
        let seed = self.spec.seed ^ (u64::from(ctx.round) << 32) ^ (self.member_index << 16);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let stats = self
            .mlp
            .train(&self.shard, self.spec.epochs as usize, &mut rng)
            .map_err(|e| e.to_string())?;
        Ok(TrainOutput {
            model: model_of(&self.mlp.params())?,
            num_samples: stats.samples as u64,
            metrics: BTreeMap::from([("train_loss".to_owned(), stats.loss)]),
        })
    }

    fn validate(&mut self, model: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        self.mlp.set_params(&params_of(model)?).map_err(|e| e.to_string())?;
        let e = self.mlp.evaluate(&self.shard).map_err(|e| e.to_string())?;
        Ok(BTreeMap::from([
            ("accuracy".to_owned(), e.accuracy),
            ("loss".to_owned(), e.loss),
        ]))
    }
}

/// Measures a model on a data set (the controller's view of the global model).
pub fn evaluate(spec: &MlpSpec, model: &Model, data: &Dataset) -> Result<(f64, f64), String> {
    let mut mlp = spec.build().map_err(|e| e.to_string())?;
    mlp.set_params(&params_of(model)?).map_err(|e| e.to_string())?;
    let e = mlp.evaluate(data).map_err(|e| e.to_string())?;
    Ok((e.accuracy, e.loss))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_and_models_convert_both_ways() {
        let spec = MlpSpec {
            hidden: vec![8],
            lr: 0.1,
            batch_size: 16,
            epochs: 1,
            seed: 3,
        };
        let p = spec.build().expect("mlp").params();
        let m = model_of(&p).expect("model");
        assert_eq!(params_of(&m).expect("params"), p);
        // The encoding round-trips too, so what travels is what was trained.
        let back = Model::from_safetensors(&m.to_safetensors()).expect("decode");
        assert_eq!(params_of(&back).expect("params"), p);
    }
}
