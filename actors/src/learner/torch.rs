//! `tch` (libtorch) networks on the digits data: an MLP and a small CNN, as workflow learners.
//!
//! [`TchSpec`] describes the network and its training, and builds without libtorch (topology
//! files name it whatever the build); the learner itself, [`TchSpec`]'s [`DigitsRecipe`] and
//! [`TchDigitsLearner`] need the `torch` feature. Members cut their shard as the pure-Rust
//! learner does ([`LocalData::split`](super::digits::LocalData::split)), and the initial
//! weights come from the spec's seed, not from libtorch's global generator, so every process
//! builds the same initial model.
//!
//! [`DigitsRecipe`]: super::recipe::DigitsRecipe

/// Which `tch` network.
#[derive(Clone, Debug, PartialEq)]
pub enum TchArch {
    /// Fully connected layers `fc0`, `fc1`, ... with ReLU between; `hidden` sizes between
    /// the 64 pixels and the 10 classes.
    Mlp {
        /// Hidden layer sizes.
        hidden: Vec<usize>,
    },
    /// The 8x8 image through `conv1` (3x3, `channels` filters, ReLU, 2x2 max-pool) and `fc`
    /// (to the 10 classes).
    Cnn {
        /// Filters of the convolution.
        channels: usize,
    },
}

/// How a `tch` digits network is built and trained (plain SGD, cross-entropy).
#[derive(Clone, Debug, PartialEq)]
pub struct TchSpec {
    /// The network.
    pub arch: TchArch,
    /// SGD learning rate.
    pub lr: f64,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Local epochs per round.
    pub epochs: u32,
    /// Seed of the initial weights and the batch order.
    pub seed: u64,
}

#[cfg(feature = "torch")]
pub use imp::TchDigitsLearner;

#[cfg(feature = "torch")]
mod imp {
    use std::collections::BTreeMap;

    use flare_protocols::model::Model;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tch::nn::{self, Module, OptimizerConfig};
    use tch::{Device, Tensor};

    use super::{TchArch, TchSpec};
    use crate::client::torch::{load_into, model_of_vars};
    use crate::data::{DIGITS_CLASSES, DIGITS_DIM, Dataset};
    use crate::job::{Learner, TaskContext, TrainOutput};
    use crate::learner::LearnerError;
    use crate::learner::digits::{DigitsFederation, LocalData};
    use crate::learner::recipe::DigitsRecipe;

    const CLASSES: i64 = DIGITS_CLASSES as i64;
    const DIM: i64 = DIGITS_DIM as i64;

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    /// A built network: its variables and its forward pass.
    struct Net {
        vs: nn::VarStore,
        forward: Box<dyn Module>,
        cnn: bool,
    }

    impl Net {
        fn new(spec: &TchSpec) -> Result<Self, String> {
            if spec.batch_size == 0 || !(spec.lr.is_finite() && spec.lr > 0.0) {
                return Err(LearnerError::InvalidConfig("batch size and learning rate must be > 0".into()).to_string());
            }
            let vs = nn::VarStore::new(Device::cuda_if_available());
            let root = vs.root();
            let (forward, cnn): (Box<dyn Module>, bool) = match &spec.arch {
                TchArch::Mlp { hidden } => {
                    let mut seq = nn::seq();
                    let mut width = DIM;
                    for (i, &h) in hidden.iter().enumerate() {
                        let h = i64::try_from(h).map_err(err)?;
                        seq = seq
                            .add(nn::linear(&root / format!("fc{i}"), width, h, Default::default()))
                            .add_fn(|x| x.relu());
                        width = h;
                    }
                    let last = nn::linear(
                        &root / format!("fc{}", hidden.len()),
                        width,
                        CLASSES,
                        Default::default(),
                    );
                    (Box::new(seq.add(last)), false)
                }
                TchArch::Cnn { channels } => {
                    let c = i64::try_from(*channels).map_err(err)?;
                    let conv_cfg = nn::ConvConfig {
                        padding: 1,
                        ..Default::default()
                    };
                    let conv = nn::conv2d(&root / "conv1", 1, c, 3, conv_cfg);
                    let fc = nn::linear(&root / "fc", c * 16, CLASSES, Default::default());
                    let seq = nn::seq()
                        .add(conv)
                        .add_fn(|x| x.relu().max_pool2d_default(2).flatten(1, -1))
                        .add(fc);
                    (Box::new(seq), true)
                }
            };
            let mut net = Self { vs, forward, cnn };
            net.seed_weights(spec.seed)?;
            Ok(net)
        }

        /// Uniform(±1/sqrt(fan-in)) weights and zero biases from `seed` (PyTorch's default
        /// range), independent of libtorch's global generator.
        fn seed_weights(&mut self, seed: u64) -> Result<(), String> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            tch::no_grad(|| {
                for (name, var) in &vars {
                    let size = var.size();
                    let n: i64 = size.iter().product();
                    let fan_in: i64 = size.iter().skip(1).product();
                    let values: Vec<f32> = if name.ends_with("bias") {
                        vec![0.0; usize::try_from(n).map_err(err)?]
                    } else {
                        let b = 1.0 / (fan_in.max(1) as f32).sqrt();
                        (0..n).map(|_| rng.random_range(-b..b)).collect()
                    };
                    let src = Tensor::f_from_slice(&values)
                        .and_then(|t| t.f_reshape(&size))
                        .and_then(|t| t.f_to_device(var.device()))
                        .map_err(err)?;
                    var.shallow_clone().f_copy_(&src).map_err(err)?;
                }
                Ok(())
            })
        }

        /// Features and labels on the network's device, shaped for it.
        fn batch(&self, data: &Dataset) -> Result<(Tensor, Tensor), String> {
            let n = i64::try_from(data.len()).map_err(err)?;
            let x = Tensor::f_from_slice(data.features()).map_err(err)?;
            let x = if self.cnn {
                x.f_reshape([n, 1, 8, 8])
            } else {
                x.f_reshape([n, DIM])
            }
            .map_err(err)?;
            let labels: Vec<i64> = data.labels().iter().map(|&l| i64::from(l)).collect();
            let y = Tensor::f_from_slice(&labels).map_err(err)?;
            let d = self.vs.device();
            Ok((x.to_device(d), y.to_device(d)))
        }

        /// `epochs` of mini-batch SGD over `data` in an order drawn from `rng`; the mean loss.
        fn train(&mut self, spec: &TchSpec, data: &Dataset, epochs: u32, rng: &mut ChaCha8Rng) -> Result<f64, String> {
            if data.is_empty() {
                return Err(LearnerError::DataMismatch("no training rows".into()).to_string());
            }
            let (x, y) = self.batch(data)?;
            let mut opt = nn::Sgd::default().build(&self.vs, spec.lr).map_err(err)?;
            let mut order: Vec<i64> = (0..i64::try_from(data.len()).map_err(err)?).collect();
            let (mut sum, mut batches) = (0.0, 0u64);
            for _ in 0..epochs {
                order.shuffle(rng);
                for chunk in order.chunks(spec.batch_size) {
                    let idx = Tensor::f_from_slice(chunk).map_err(err)?.to_device(x.device());
                    let logits = self.forward.forward(&x.index_select(0, &idx));
                    let loss = logits.cross_entropy_for_logits(&y.index_select(0, &idx));
                    opt.backward_step(&loss);
                    sum += loss.double_value(&[]);
                    batches += 1;
                }
            }
            Ok(sum / batches.max(1) as f64)
        }

        /// Accuracy and mean loss on `data`.
        fn evaluate(&self, data: &Dataset) -> Result<(f64, f64), String> {
            if data.is_empty() {
                return Err(LearnerError::DataMismatch("no rows to evaluate on".into()).to_string());
            }
            let (x, y) = self.batch(data)?;
            tch::no_grad(|| {
                let logits = self.forward.forward(&x);
                let loss = logits.cross_entropy_for_logits(&y).double_value(&[]);
                let acc = logits.accuracy_for_logits(&y).double_value(&[]);
                Ok((acc, loss))
            })
        }

        fn load(&mut self, model: &Model) -> Result<(), String> {
            load_into(&self.vs, model).map_err(err)
        }

        fn model(&self) -> Result<Model, String> {
            model_of_vars(&self.vs).map_err(err)
        }
    }

    /// A member's `tch` network on its shard: trains on the training rows, validates on the
    /// held-out rows, keeps its last trained model for cross-site evaluation.
    pub struct TchDigitsLearner {
        net: Net,
        data: LocalData,
        spec: TchSpec,
        member_index: u64,
        last: Option<Model>,
    }

    impl TchDigitsLearner {
        /// The learner of the member at `member_index`, cutting `shard` as
        /// [`LocalData::split`] does.
        pub fn new(spec: TchSpec, shard: &Dataset, member_index: usize) -> Result<Self, String> {
            Ok(Self {
                net: Net::new(&spec)?,
                data: LocalData::split(shard, spec.seed, member_index).map_err(err)?,
                spec,
                member_index: member_index as u64,
                last: None,
            })
        }
    }

    impl Learner for TchDigitsLearner {
        fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
            self.net.load(&global)?;
            // Seeded by member and round, as the pure-Rust learner is.
            let seed = self.spec.seed ^ (u64::from(ctx.round) << 32) ^ (self.member_index << 16);
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let loss = self
                .net
                .train(&self.spec, &self.data.train, self.spec.epochs, &mut rng)?;
            let model = self.net.model()?;
            self.last = Some(model.clone());
            Ok(TrainOutput {
                model,
                num_samples: self.data.train.len() as u64,
                metrics: BTreeMap::from([("train_loss".to_owned(), loss)]),
            })
        }

        /// Accuracy and loss of `model` on this member's held-out rows, and their count.
        fn validate(&mut self, model: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
            self.net.load(model)?;
            let (accuracy, loss) = self.net.evaluate(&self.data.validation)?;
            Ok(BTreeMap::from([
                ("accuracy".to_owned(), accuracy),
                ("loss".to_owned(), loss),
                ("rows".to_owned(), self.data.validation.len() as f64),
            ]))
        }

        fn local_model(&self) -> Option<Model> {
            self.last.clone()
        }
    }

    impl DigitsRecipe for TchSpec {
        fn name(&self) -> &'static str {
            match self.arch {
                TchArch::Mlp { .. } => "tch-mlp",
                TchArch::Cnn { .. } => "tch-cnn",
            }
        }

        fn epochs(&self) -> u32 {
            self.epochs
        }

        fn initial_model(&self) -> Result<Model, String> {
            Net::new(self)?.model()
        }

        fn evaluate(&self, model: &Model, data: &Dataset) -> Result<(f64, f64), String> {
            let mut net = Net::new(self)?;
            net.load(model)?;
            net.evaluate(data)
        }

        fn local_only(&self, fed: &DigitsFederation, epochs: u32) -> Result<Vec<(f64, f64)>, String> {
            (0..fed.shards.len())
                .map(|i| {
                    let data = LocalData::split(&fed.shards[i], self.seed, i).map_err(err)?;
                    let mut net = Net::new(self)?;
                    let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x10ca1 ^ i as u64);
                    net.train(self, &data.train, epochs, &mut rng)?;
                    net.evaluate(&fed.test)
                })
                .collect()
        }

        fn learner(&self, shard: Dataset, member_index: usize) -> Result<Box<dyn Learner>, String> {
            Ok(Box::new(TchDigitsLearner::new(self.clone(), &shard, member_index)?))
        }
    }
}

#[cfg(all(test, feature = "torch"))]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::job::TaskContext;
    use crate::learner::digits::DigitsFederation;
    use crate::learner::recipe::DigitsRecipe;

    #[test]
    fn tch_learners_start_alike_everywhere_and_train_on_their_shard() {
        let fed = DigitsFederation::deal(2, 0.5, 0.2, 0).expect("deal");
        for arch in [TchArch::Mlp { hidden: vec![32] }, TchArch::Cnn { channels: 4 }] {
            let spec = TchSpec {
                arch,
                lr: 0.1,
                batch_size: 32,
                epochs: 2,
                seed: 1,
            };
            let initial = spec.initial_model().expect("initial");
            assert!(
                initial == spec.initial_model().expect("again"),
                "seeded, not libtorch's generator"
            );
            let (before, _) = spec.evaluate(&initial, &fed.test).expect("evaluate");
            let mut l = spec.learner(fed.shards[0].clone(), 0).expect("learner");
            let ctx = TaskContext {
                job: flare_protocols::ctl::JobId("j".into()),
                member: "m0".into(),
                task: "train".into(),
                round: 0,
                props: BTreeMap::new(),
            };
            let out = l.train(initial.clone(), &ctx).expect("train");
            assert_eq!(
                out.model
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shape().to_vec()))
                    .collect::<Vec<_>>(),
                initial
                    .iter()
                    .map(|(n, t)| (n.clone(), t.shape().to_vec()))
                    .collect::<Vec<_>>()
            );
            let (after, _) = spec.evaluate(&out.model, &fed.test).expect("evaluate");
            assert!(after > before, "{}: {before} -> {after}", spec.name());
            let m = l.validate(&out.model, &ctx).expect("validate");
            assert!((0.0..=1.0).contains(&m["accuracy"]) && m["rows"] > 0.0);
            assert!(l.local_model() == Some(out.model));
            let wrong = TchSpec {
                arch: TchArch::Mlp { hidden: vec![8] },
                ..spec.clone()
            };
            assert!(l.train(wrong.initial_model().expect("other"), &ctx).is_err());
        }
    }
}
