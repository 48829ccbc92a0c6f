//! The MLP on the digits data as a [`Learner`]: what a member runs in the `fedavg-digits` job.
//!
//! [`DigitsFederation`] deals the data once, the same way on every member and on the
//! controller (same seed, same split), so `sim` and one-process-per-member `run` give the same
//! model: each member trains on its Dirichlet shard less a seeded hold-out ([`LocalData`]), its
//! local validation data, which cross-site evaluation measures every model on; the common
//! held-out test set measures the global model and the local-only baselines.

use std::collections::BTreeMap;

use flare_protocols::model::{Model, Tensor};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;

use super::{LearnerError, Mlp, MlpConfig, NamedTensor};
use crate::data::{DIGITS_CLASSES, DIGITS_DIM, DataError, Dataset, digits, dirichlet_partition, train_test_split};
use crate::learner::{Learner, TaskContext, TrainOutput};

/// Fewest training rows a member gets from the Dirichlet split.
pub const MIN_ROWS: usize = 10;

/// Share of a member's shard it holds out as local validation data (never trained on).
pub const VALIDATION_FRACTION: f64 = 0.2;

/// Fewest rows a member holds out, so a small shard still measures something.
pub const MIN_VALIDATION_ROWS: usize = 3;

/// A member's shard cut in two: the rows it trains on and the rows it validates on, so a
/// model's accuracy on a site is never measured on rows that site trained on.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalData {
    /// Rows to train on.
    pub train: Dataset,
    /// Held-out rows: this member's local validation data.
    pub validation: Dataset,
}

impl LocalData {
    /// Holds out `round(VALIDATION_FRACTION x rows)` random rows of `shard`, at least
    /// [`MIN_VALIDATION_ROWS`] and at most all but one, seeded by `seed` and `member_index`,
    /// so every member and the controller cut the same shard the same way. Both parts keep the
    /// shard's row order.
    pub fn split(shard: &Dataset, seed: u64, member_index: usize) -> Result<Self, LearnerError> {
        let n = shard.len();
        if n < 2 {
            return Err(LearnerError::DataMismatch(format!(
                "a shard of {n} rows cannot be cut into training and validation rows"
            )));
        }
        let k = ((n as f64 * VALIDATION_FRACTION).round() as usize).clamp(MIN_VALIDATION_ROWS.min(n - 1), n - 1);
        let mut rows: Vec<usize> = (0..n).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x7a11_da7e ^ ((member_index as u64) << 24));
        rows.shuffle(&mut rng);
        let (validation, train) = rows.split_at_mut(k);
        validation.sort_unstable();
        train.sort_unstable();
        let cut = |rows: &[usize]| {
            shard
                .subset(rows)
                .map_err(|e| LearnerError::DataMismatch(e.to_string()))
        };
        Ok(Self {
            train: cut(train)?,
            validation: cut(validation)?,
        })
    }
}

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
    /// Each member's shard, in client order (its training and validation rows: see
    /// [`LocalData::split`]).
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

    /// Member `i`'s training and validation rows, as its [`DigitsLearner`] cuts them.
    pub fn local_data(&self, spec: &MlpSpec, i: usize) -> Result<LocalData, LearnerError> {
        let shard = self
            .shards
            .get(i)
            .ok_or_else(|| LearnerError::DataMismatch(format!("no shard for member {i}")))?;
        LocalData::split(shard, spec.seed, i)
    }

    /// Each member's model trained on its training rows alone (the same rows its
    /// [`DigitsLearner`] trains on) for `epochs` epochs, measured on the test set: the
    /// baseline federated learning has to beat.
    pub fn local_only(&self, spec: &MlpSpec, epochs: u32) -> Result<Vec<(f64, f64)>, LearnerError> {
        (0..self.shards.len())
            .map(|i| {
                let data = self.local_data(spec, i)?;
                let mut mlp = spec.build()?;
                let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x10ca1 ^ i as u64);
                mlp.train(&data.train, epochs as usize, &mut rng)?;
                let e = mlp.evaluate(&self.test)?;
                Ok((e.accuracy, e.loss))
            })
            .collect()
    }
}

/// A member's MLP learner on its shard: trains on the training rows, validates on the
/// held-out rows, and keeps its last trained model for cross-site evaluation.
pub struct DigitsLearner {
    mlp: Mlp,
    data: LocalData,
    spec: MlpSpec,
    member_index: u64,
    last: Option<Model>,
}

impl DigitsLearner {
    /// The learner of the member at `member_index` (its position among the clients), which
    /// cuts `shard` into training and validation rows with [`LocalData::split`].
    pub fn new(spec: MlpSpec, shard: Dataset, member_index: usize) -> Result<Self, LearnerError> {
        Ok(Self {
            mlp: spec.build()?,
            data: LocalData::split(&shard, spec.seed, member_index)?,
            spec,
            member_index: member_index as u64,
            last: None,
        })
    }

    /// The rows this member trains and validates on.
    pub fn local_data(&self) -> &LocalData {
        &self.data
    }
}

impl Learner for DigitsLearner {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let out = train_from(
            &mut self.mlp,
            &global,
            &self.data.train,
            &self.spec,
            self.member_index,
            ctx.round,
        )?;
        self.last = Some(out.model.clone());
        Ok(out)
    }

    /// Accuracy and loss of `model` on this member's held-out rows, plus their count.
    fn validate(&mut self, model: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        validate_on(&mut self.mlp, model, &self.data.validation)
    }

    /// The model of the last `train` task (`None` before the first).
    fn local_model(&self) -> Option<Model> {
        self.last.clone()
    }
}

/// One local training step of an MLP learner: `global`'s weights trained on `train` for
/// `spec.epochs`, seeded by member and round (so every run of a topology trains the same).
pub(crate) fn train_from(
    mlp: &mut Mlp,
    global: &Model,
    train: &Dataset,
    spec: &MlpSpec,
    member_index: u64,
    round: u32,
) -> Result<TrainOutput, String> {
    mlp.set_params(&params_of(global)?).map_err(|e| e.to_string())?;
    let seed = spec.seed ^ (u64::from(round) << 32) ^ (member_index << 16);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let stats = mlp
        .train(train, spec.epochs as usize, &mut rng)
        .map_err(|e| e.to_string())?;
    Ok(TrainOutput {
        model: model_of(&mlp.params())?,
        num_samples: stats.samples as u64,
        metrics: BTreeMap::from([("train_loss".to_owned(), stats.loss)]),
    })
}

/// An MLP learner's `validate`: accuracy and loss of `model` on `rows`, and their count.
pub(crate) fn validate_on(mlp: &mut Mlp, model: &Model, rows: &Dataset) -> Result<BTreeMap<String, f64>, String> {
    mlp.set_params(&params_of(model)?).map_err(|e| e.to_string())?;
    let e = mlp.evaluate(rows).map_err(|e| e.to_string())?;
    Ok(BTreeMap::from([
        ("accuracy".to_owned(), e.accuracy),
        ("loss".to_owned(), e.loss),
        ("rows".to_owned(), rows.len() as f64),
    ]))
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

    #[test]
    fn validation_rows_are_held_out_deterministically() {
        let fed = DigitsFederation::deal(4, 0.5, 0.2, 0).expect("deal");
        for (i, shard) in fed.shards.iter().enumerate() {
            let a = LocalData::split(shard, 1, i).expect("split");
            assert_eq!(a, LocalData::split(shard, 1, i).expect("split"), "same seed, same cut");
            assert_eq!(a.train.len() + a.validation.len(), shard.len());
            let want = ((shard.len() as f64 * VALIDATION_FRACTION).round() as usize).max(MIN_VALIDATION_ROWS);
            assert_eq!(a.validation.len(), want);
        }
        let small = fed.shards[0].subset(&(0..10).collect::<Vec<_>>()).expect("subset");
        let cut = LocalData::split(&small, 1, 0).expect("split");
        assert_eq!((cut.train.len(), cut.validation.len()), (7, 3));
        // Every row lands on exactly one side.
        let mut rows: Vec<&[f32]> = (0..7)
            .filter_map(|r| cut.train.row(r))
            .chain((0..3).filter_map(|r| cut.validation.row(r)))
            .collect();
        let mut all: Vec<&[f32]> = (0..10).filter_map(|r| small.row(r)).collect();
        rows.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        all.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        assert_eq!(rows, all);
        let one = small.subset(&[0]).expect("subset");
        assert!(LocalData::split(&one, 1, 0).is_err());
    }

    #[test]
    fn learner_validates_on_its_held_out_rows_and_keeps_its_last_model() {
        let spec = MlpSpec {
            hidden: vec![8],
            lr: 0.1,
            batch_size: 16,
            epochs: 1,
            seed: 3,
        };
        let fed = DigitsFederation::deal(2, 0.5, 0.2, 0).expect("deal");
        let mut l = DigitsLearner::new(spec.clone(), fed.shards[1].clone(), 1).expect("learner");
        assert_eq!(l.local_data(), &fed.local_data(&spec, 1).expect("local data"));
        assert!(l.local_model().is_none(), "nothing trained yet");
        let ctx = TaskContext {
            job: flare_protocols::ctl::JobId("j".into()),
            member: "m1".into(),
            task: flare_protocols::ctl::TaskKind::Train,
            round: 0,
            props: BTreeMap::new(),
        };
        let initial = model_of(&spec.build().expect("mlp").params()).expect("model");
        let out = l.train(initial, &ctx).expect("train");
        assert_eq!(out.num_samples as usize, l.local_data().train.len());
        assert!(l.local_model() == Some(out.model.clone()));
        let m = l.validate(&out.model, &ctx).expect("validate");
        assert_eq!(m["rows"] as usize, l.local_data().validation.len());
        assert!((0.0..=1.0).contains(&m["accuracy"]) && m["loss"].is_finite());
        // Validating another model leaves the member's own model as it was.
        l.validate(&model_of(&spec.build().expect("mlp").params()).expect("model"), &ctx)
            .expect("validate");
        assert!(l.local_model() == Some(out.model));
    }

    /// FedAvg of the `fedavg-digits` topology, in one process (no network): the weighted
    /// mean of the members' models after each round.
    #[test]
    fn in_process_fedavg_on_digits_beats_local_only() {
        let spec = MlpSpec {
            hidden: vec![32],
            lr: 0.1,
            batch_size: 32,
            epochs: 2,
            seed: 1,
        };
        let fed = DigitsFederation::deal(4, 0.5, 0.2, 0).expect("deal");
        let mut learners: Vec<DigitsLearner> = fed
            .shards
            .iter()
            .enumerate()
            .map(|(i, s)| DigitsLearner::new(spec.clone(), s.clone(), i).expect("learner"))
            .collect();
        let mut global = model_of(&spec.build().expect("mlp").params()).expect("model");
        for round in 0..20 {
            let mut sum: Option<Vec<NamedTensor>> = None;
            let mut total = 0.0f32;
            for (i, l) in learners.iter_mut().enumerate() {
                let ctx = TaskContext {
                    job: flare_protocols::ctl::JobId("digits".into()),
                    member: format!("m{i}"),
                    task: flare_protocols::ctl::TaskKind::Train,
                    round,
                    props: BTreeMap::new(),
                };
                let out = l.train(global.clone(), &ctx).expect("train");
                let w = out.num_samples as f32;
                total += w;
                let p = params_of(&out.model).expect("params");
                match &mut sum {
                    None => {
                        sum = Some(
                            p.into_iter()
                                .map(|mut t| {
                                    t.values.iter_mut().for_each(|v| *v *= w);
                                    t
                                })
                                .collect(),
                        )
                    }
                    Some(s) => {
                        for (a, b) in s.iter_mut().zip(&p) {
                            a.values.iter_mut().zip(&b.values).for_each(|(x, y)| *x += y * w);
                        }
                    }
                }
            }
            let mut mean = sum.expect("members");
            mean.iter_mut()
                .for_each(|t| t.values.iter_mut().for_each(|v| *v /= total));
            global = model_of(&mean).expect("model");
        }
        let (accuracy, _) = evaluate(&spec, &global, &fed.test).expect("evaluate");
        let local = fed.local_only(&spec, 40).expect("local only");
        let local_mean = local.iter().map(|(a, _)| a).sum::<f64>() / local.len() as f64;
        eprintln!("in-process FedAvg: global {accuracy:.4}; local-only {local:?}, mean {local_mean:.4}");
        assert!(accuracy >= 0.90, "global accuracy {accuracy}");
        assert!(
            accuracy > local_mean,
            "global {accuracy} vs local-only mean {local_mean}"
        );
    }
}
