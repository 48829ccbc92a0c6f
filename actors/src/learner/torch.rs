//! `tch` (libtorch) networks on the digits data: an MLP and a small CNN, as workflow learners.
//!
//! [`TchSpec`] describes the network and its training, and builds without libtorch (topology
//! files name it whatever the build); the learner itself, [`TchSpec`]'s [`DigitsRecipe`] and
//! [`TchDigitsLearner`] need the `torch` feature. Members cut their shard as the pure-Rust
//! learner does ([`LocalData::split`](super::digits::LocalData::split)), and the initial
//! weights come from the spec's seed, not from libtorch's global generator, so every process
//! builds the same initial model.
//!
//! # Fine-tuning and PEFT
//!
//! With [`TchSpec::finetune`] the network starts from a *pretrained base* instead of random
//! weights, and only its *trainable* tensors ([`TchSpec::trainable_names`]) train, cross the
//! wire and are averaged: the model the workflow sees (initial model, task inputs, results)
//! holds those tensors alone, and each member keeps the frozen rest in memory and merges the
//! two by name. No pretrained model is shipped, so the base stands in for a downloaded one:
//! every member pretrains it identically ([`BaseSpec`]: seeded weights and batch order, one
//! libtorch thread, on the CPU) on a fixed public slice of the data, the digits of the
//! first classes in the training rows of the topology's split; the held-out test rows are
//! never seen. [`FineTune::Lora`] adds LoRA adapters to every linear layer (`fc*.lora_a`
//! `[rank, in]`, seeded, and `fc*.lora_b` `[out, rank]`, zeros, so training starts at the
//! base): `W x + (alpha / rank) B A x`, and by default only the adapters train.
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
    /// Fine-tune a pretrained base instead of training from the seeded weights.
    pub finetune: Option<FineTuneSpec>,
    /// Glob patterns (`*`, `?`) naming the tensors that train and travel; `None`: the
    /// default of the fine-tuning method (all tensors, or LoRA's adapters).
    pub trainable: Option<Vec<String>>,
}

/// Fine-tuning: which method, on which pretrained base.
#[derive(Clone, Debug, PartialEq)]
pub struct FineTuneSpec {
    /// The method.
    pub method: FineTune,
    /// How every member builds the pretrained base.
    pub base: BaseSpec,
}

/// How a pretrained base is fine-tuned.
#[derive(Clone, Debug, PartialEq)]
pub enum FineTune {
    /// Every tensor trains and travels (unless [`TchSpec::trainable`] narrows them).
    Full,
    /// Low-rank adapters on every linear layer; by default only they train and travel.
    Lora {
        /// Rank of the adapters.
        rank: usize,
        /// Scale numerator: the adapters' output is multiplied by `alpha / rank`.
        alpha: f64,
    },
}

/// Largest LoRA rank a topology may ask for (the layers here are at most a few hundred wide).
pub const MAX_LORA_RANK: usize = 64;

/// The pretrained base: the spec's network pretrained from its seeded weights on the
/// training rows (of the split `data_seed`, `test_fraction`) whose label is below `classes`,
/// the same on every member; it stands in for a downloaded pretrained model.
#[derive(Clone, Debug, PartialEq)]
pub struct BaseSpec {
    /// The base learns the labels below this; the others are new to it.
    pub classes: u8,
    /// Pretraining epochs.
    pub epochs: u32,
    /// Seed of the train/test split (the topology's data seed).
    pub data_seed: u64,
    /// Held-out share of the split (the topology's test fraction): never pretrained on.
    pub test_fraction: f64,
}

impl BaseSpec {
    /// The base of a topology's data split: digits 0-4 for 20 epochs.
    pub fn digits_0_to_4(data_seed: u64, test_fraction: f64) -> Self {
        Self {
            classes: 5,
            epochs: 20,
            data_seed,
            test_fraction,
        }
    }
}

/// Whether `name` matches the glob `pattern`: `*` is any run of characters, `?` any one.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

impl TchSpec {
    /// Every tensor of the network, sorted (what the `torch` build's variable store holds),
    /// computed without libtorch so topology files are checked in any build.
    pub fn tensor_names(&self) -> Vec<String> {
        let lora = matches!(
            self.finetune,
            Some(FineTuneSpec {
                method: FineTune::Lora { .. },
                ..
            })
        );
        let layers: Vec<String> = match &self.arch {
            TchArch::Mlp { hidden } => (0..=hidden.len()).map(|i| format!("fc{i}")).collect(),
            TchArch::Cnn { .. } => vec!["fc".into()],
        };
        let mut names: Vec<String> = layers
            .iter()
            .flat_map(|l| {
                let mut v = vec![format!("{l}.weight"), format!("{l}.bias")];
                if lora {
                    v.extend([format!("{l}.lora_a"), format!("{l}.lora_b")]);
                }
                v
            })
            .collect();
        if matches!(self.arch, TchArch::Cnn { .. }) {
            names.extend(["conv1.weight".into(), "conv1.bias".into()]);
        }
        names.sort();
        names
    }

    /// The tensors that train and travel, sorted: those [`TchSpec::trainable`] names, or by
    /// default every tensor (LoRA: the adapters). A pattern that matches no tensor, or an
    /// empty list, is an error (a typo would otherwise freeze the whole network).
    pub fn trainable_names(&self) -> Result<Vec<String>, String> {
        let all = self.tensor_names();
        let Some(patterns) = &self.trainable else {
            return Ok(match &self.finetune {
                Some(FineTuneSpec {
                    method: FineTune::Lora { .. },
                    ..
                }) => all
                    .into_iter()
                    .filter(|n| n.ends_with(".lora_a") || n.ends_with(".lora_b"))
                    .collect(),
                _ => all,
            });
        };
        if patterns.is_empty() {
            return Err("the list is empty: nothing would train".into());
        }
        if let Some(p) = patterns.iter().find(|p| !all.iter().any(|n| glob_match(p, n))) {
            return Err(format!("{p:?} matches no tensor of the network (tensors: {all:?})"));
        }
        Ok(all
            .into_iter()
            .filter(|n| patterns.iter().any(|p| glob_match(p, n)))
            .collect())
    }
}

#[cfg(feature = "torch")]
pub use imp::TchDigitsLearner;

#[cfg(feature = "torch")]
mod imp {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use flare_protocols::model::Model;
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use tch::nn::{self, OptimizerConfig};
    use tch::{Device, Tensor};

    use super::{BaseSpec, FineTune, FineTuneSpec, MAX_LORA_RANK, TchArch, TchSpec};
    use crate::data::{DIGITS_CLASSES, DIGITS_DIM, Dataset, digits, train_test_split};
    use crate::learner::LearnerError;
    use crate::learner::digits::{DigitsFederation, LocalData};
    use crate::learner::recipe::DigitsRecipe;
    use crate::learner::tch_model::{load_named, model_of_named};
    use crate::learner::{Learner, TaskContext, TrainOutput};

    const CLASSES: i64 = DIGITS_CLASSES as i64;
    const DIM: i64 = DIGITS_DIM as i64;

    fn err(e: impl std::fmt::Display) -> String {
        e.to_string()
    }

    /// A built network: its variables, its layers and which variables train and travel.
    struct Net {
        vs: nn::VarStore,
        /// The CNN's convolution.
        conv: Option<nn::Conv2D>,
        /// The linear layers, input side first, each with its LoRA adapters `(A, B)`.
        layers: Vec<(nn::Linear, Option<(Tensor, Tensor)>)>,
        /// LoRA's `alpha / rank`.
        scale: f64,
        /// The variables that train, load and travel, sorted.
        trainable: Vec<String>,
    }

    /// Salt of the adapters' seed, so adding adapters leaves the base weights as they were.
    const LORA_SALT: u64 = 0x104a_ada9;
    /// Salt of the pretraining batch order.
    const PRETRAIN_SALT: u64 = 0x9e7a_1ead;

    impl Net {
        fn new(spec: &TchSpec) -> Result<Self, String> {
            Self::on(spec, Device::cuda_if_available())
        }

        fn on(spec: &TchSpec, device: Device) -> Result<Self, String> {
            if spec.batch_size == 0 || !(spec.lr.is_finite() && spec.lr > 0.0) {
                return Err(LearnerError::InvalidConfig("batch size and learning rate must be > 0".into()).to_string());
            }
            let (rank, scale) = match &spec.finetune {
                Some(FineTuneSpec {
                    method: FineTune::Lora { rank, alpha },
                    ..
                }) => {
                    if *rank == 0 || *rank > MAX_LORA_RANK || !alpha.is_finite() {
                        return Err(LearnerError::InvalidConfig(format!(
                            "LoRA rank {rank} is not between 1 and {MAX_LORA_RANK}, or alpha {alpha} is not finite"
                        ))
                        .to_string());
                    }
                    (Some(i64::try_from(*rank).map_err(err)?), *alpha / *rank as f64)
                }
                _ => (None, 1.0),
            };
            let vs = nn::VarStore::new(device);
            let root = vs.root();
            let linear = |name: String, inp: i64, out: i64| {
                let p = &root / name;
                let lin = nn::linear(&p, inp, out, Default::default());
                let lora = rank.map(|r| {
                    (
                        p.var("lora_a", &[r, inp], nn::Init::Const(0.0)),
                        p.var("lora_b", &[out, r], nn::Init::Const(0.0)),
                    )
                });
                (lin, lora)
            };
            let (conv, layers) = match &spec.arch {
                TchArch::Mlp { hidden } => {
                    let mut layers = Vec::new();
                    let mut width = DIM;
                    for (i, &h) in hidden.iter().enumerate() {
                        let h = i64::try_from(h).map_err(err)?;
                        layers.push(linear(format!("fc{i}"), width, h));
                        width = h;
                    }
                    layers.push(linear(format!("fc{}", hidden.len()), width, CLASSES));
                    (None, layers)
                }
                TchArch::Cnn { channels } => {
                    let c = i64::try_from(*channels).map_err(err)?;
                    let conv_cfg = nn::ConvConfig {
                        padding: 1,
                        ..Default::default()
                    };
                    let conv = nn::conv2d(&root / "conv1", 1, c, 3, conv_cfg);
                    (Some(conv), vec![linear("fc".into(), c * 16, CLASSES)])
                }
            };
            let trainable = spec.trainable_names()?;
            let mut net = Self {
                vs,
                conv,
                layers,
                scale,
                trainable,
            };
            net.seed_weights(spec.seed)?;
            if let Some(ft) = &spec.finetune {
                let base = pretrained(spec, &ft.base)?;
                let names: Vec<String> = base.iter().map(|(n, _)| n.clone()).collect();
                load_named(&net.vs, &base, &names).map_err(err)?;
            }
            // Frozen variables get no gradient, so SGD leaves them as they are.
            for (name, var) in net.vs.variables() {
                if !net.trainable.contains(&name) {
                    let _ = var.set_requires_grad(false);
                }
            }
            Ok(net)
        }

        /// Uniform(±1/sqrt(fan-in)) weights and zero biases from `seed` (PyTorch's default
        /// range), independent of libtorch's global generator; LoRA's `A` from another
        /// stream of the seed (so the base weights do not depend on the adapters), its `B`
        /// zeros.
        fn seed_weights(&mut self, seed: u64) -> Result<(), String> {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let mut lora_rng = ChaCha8Rng::seed_from_u64(seed ^ LORA_SALT);
            let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
            vars.sort_by(|a, b| a.0.cmp(&b.0));
            tch::no_grad(|| {
                for (name, var) in &vars {
                    let size = var.size();
                    let n: i64 = size.iter().product();
                    let fan_in: i64 = size.iter().skip(1).product();
                    let rng = if name.ends_with(".lora_a") {
                        &mut lora_rng
                    } else {
                        &mut rng
                    };
                    let values: Vec<f32> = if name.ends_with("bias") || name.ends_with(".lora_b") {
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

        /// The forward pass: logits of `x`.
        fn forward(&self, x: &Tensor) -> Tensor {
            let mut x = match &self.conv {
                Some(conv) => x.apply(conv).relu().max_pool2d_default(2).flatten(1, -1),
                None => x.shallow_clone(),
            };
            let last = self.layers.len().saturating_sub(1);
            for (i, (lin, lora)) in self.layers.iter().enumerate() {
                let y = match lora {
                    Some((a, b)) => x.apply(lin) + x.matmul(&a.tr()).matmul(&b.tr()) * self.scale,
                    None => x.apply(lin),
                };
                x = if i < last { y.relu() } else { y };
            }
            x
        }

        /// Features and labels on the network's device, shaped for it.
        fn batch(&self, data: &Dataset) -> Result<(Tensor, Tensor), String> {
            let n = i64::try_from(data.len()).map_err(err)?;
            let x = Tensor::f_from_slice(data.features()).map_err(err)?;
            let x = if self.conv.is_some() {
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
                    let logits = self.forward(&x.index_select(0, &idx));
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
                let logits = self.forward(&x);
                let loss = logits.cross_entropy_for_logits(&y).double_value(&[]);
                let acc = logits.accuracy_for_logits(&y).double_value(&[]);
                Ok((acc, loss))
            })
        }

        /// Loads the trainable variables (exactly those) from `model`.
        fn load(&mut self, model: &Model) -> Result<(), String> {
            load_named(&self.vs, model, &self.trainable).map_err(err)
        }

        /// The trainable variables: what travels.
        fn model(&self) -> Result<Model, String> {
            model_of_named(&self.vs, &self.trainable).map_err(err)
        }
    }

    /// The pretrained bases built in this process, by spec: every learner, evaluation and
    /// baseline of a job needs the same one.
    static BASES: Mutex<Vec<(String, Model)>> = Mutex::new(Vec::new());

    /// The pretrained base of `spec` (all of its base tensors): see [`BaseSpec`]; built once
    /// per process.
    fn pretrained(spec: &TchSpec, base: &BaseSpec) -> Result<Model, String> {
        let key = format!(
            "{:?} {:?} {} {} {} {base:?}",
            spec.arch, spec.lr, spec.batch_size, spec.epochs, spec.seed
        );
        let mut cache = BASES.lock().map_err(err)?;
        if let Some((_, m)) = cache.iter().find(|(k, _)| *k == key) {
            return Ok(m.clone());
        }
        let model = pretrain(spec, base)?;
        cache.push((key, model.clone()));
        Ok(model)
    }

    /// Pretrains the base of `spec` afresh: on the CPU with one libtorch thread, so every
    /// member gets the same bytes.
    fn pretrain(spec: &TchSpec, base: &BaseSpec) -> Result<Model, String> {
        let plain = TchSpec {
            finetune: None,
            trainable: None,
            ..spec.clone()
        };
        let data = digits().map_err(err)?;
        let (train, _) = train_test_split(&data, base.test_fraction, base.data_seed).map_err(err)?;
        let rows: Vec<usize> = (0..train.len()).filter(|&i| train.labels()[i] < base.classes).collect();
        let public = train.subset(&rows).map_err(err)?;
        let mut net = Net::on(&plain, Device::Cpu)?;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ PRETRAIN_SALT);
        let threads = tch::get_num_threads();
        tch::set_num_threads(1);
        let trained = net.train(&plain, &public, base.epochs, &mut rng);
        tch::set_num_threads(threads);
        trained?;
        net.model()
    }

    /// [`pretrain`], uncached, for tests of its reproducibility.
    #[cfg(test)]
    pub(super) fn pretrain_afresh(spec: &TchSpec, base: &BaseSpec) -> Result<Model, String> {
        pretrain(spec, base)
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
    use crate::learner::TaskContext;
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
                finetune: None,
                trainable: None,
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
                task: flare_protocols::ctl::TaskKind::Train,
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

    fn ctx(round: u32) -> TaskContext {
        TaskContext {
            job: flare_protocols::ctl::JobId("j".into()),
            member: "m0".into(),
            task: flare_protocols::ctl::TaskKind::Train,
            round,
            props: BTreeMap::new(),
        }
    }

    #[test]
    fn the_pretrained_base_is_the_same_bytes_every_time() {
        let spec = TchSpec {
            arch: TchArch::Mlp { hidden: vec![32] },
            lr: 0.1,
            batch_size: 32,
            epochs: 1,
            seed: 3,
            finetune: None,
            trainable: None,
        };
        let base = BaseSpec::digits_0_to_4(0, 0.2);
        let a = imp::pretrain_afresh(&spec, &base).expect("pretrain");
        let b = imp::pretrain_afresh(&spec, &base).expect("pretrain");
        assert!(a.as_safetensors() == b.as_safetensors(), "bit-reproducible");
        assert!(
            a != spec.initial_model().expect("seeded"),
            "pretraining moved the weights"
        );
        // It knows the digits 0-4 and none of the others.
        let fed = DigitsFederation::deal(2, 0.5, 0.2, 0).expect("deal");
        let (acc, _) = spec.evaluate(&a, &fed.test).expect("evaluate");
        assert!((0.4..0.6).contains(&acc), "about half the test set: {acc}");
    }

    #[test]
    fn lora_sends_only_adapters_starts_at_the_base_and_leaves_the_base_alone() {
        // Nearly IID shards, so one member's training helps on the whole test set.
        let fed = DigitsFederation::deal(2, 100.0, 0.2, 0).expect("deal");
        for arch in [TchArch::Mlp { hidden: vec![32] }, TchArch::Cnn { channels: 4 }] {
            let full = TchSpec {
                arch,
                lr: 0.1,
                batch_size: 32,
                epochs: 5,
                seed: 1,
                finetune: Some(FineTuneSpec {
                    method: FineTune::Full,
                    base: BaseSpec::digits_0_to_4(0, 0.2),
                }),
                trainable: None,
            };
            let lora = TchSpec {
                finetune: Some(FineTuneSpec {
                    method: FineTune::Lora { rank: 4, alpha: 4.0 },
                    base: BaseSpec::digits_0_to_4(0, 0.2),
                }),
                ..full.clone()
            };
            let base = full.initial_model().expect("base");
            let adapters = lora.initial_model().expect("adapters");
            let names: Vec<&str> = adapters.iter().map(|(n, _)| n.as_str()).collect();
            assert_eq!(names, lora.trainable_names().expect("names"));
            assert!(names.iter().all(|n| n.contains(".lora_")), "{names:?}");
            assert!(
                adapters.data_bytes() * 2 < base.data_bytes(),
                "{} vs {}",
                adapters.data_bytes(),
                base.data_bytes()
            );
            // B is zero: the adapted network is the base.
            let (base_acc, _) = full.evaluate(&base, &fed.test).expect("evaluate");
            let (start_acc, _) = lora.evaluate(&adapters, &fed.test).expect("evaluate");
            assert_eq!(base_acc, start_acc);
            // Training moves the adapters only, and lifts the accuracy above the base's.
            let mut l = lora.learner(fed.shards[0].clone(), 0).expect("learner");
            let out = l.train(adapters.clone(), &ctx(0)).expect("train");
            assert_eq!(out.model.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), names);
            let (after, _) = lora.evaluate(&out.model, &fed.test).expect("evaluate");
            assert!(after > base_acc, "{}: {base_acc} -> {after}", lora.name());
            // A model with the base's tensors is refused: they never travel.
            assert!(l.train(base.clone(), &ctx(1)).is_err());
            // The learner's frozen base did not move: the same adapters give the same result.
            let again = l.train(adapters.clone(), &ctx(0)).expect("train");
            assert!(again.model == out.model);
        }
    }
}

#[cfg(test)]
mod trainable_tests {
    use super::*;

    fn spec(arch: TchArch, method: Option<FineTune>, trainable: Option<Vec<&str>>) -> TchSpec {
        TchSpec {
            arch,
            lr: 0.1,
            batch_size: 32,
            epochs: 1,
            seed: 1,
            finetune: method.map(|method| FineTuneSpec {
                method,
                base: BaseSpec::digits_0_to_4(0, 0.2),
            }),
            trainable: trainable.map(|t| t.into_iter().map(str::to_owned).collect()),
        }
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("*.lora_?", "fc0.lora_a"));
        assert!(glob_match("fc*", "fc1.bias") && glob_match("*", "x") && glob_match("a*b*c", "aXbYc"));
        assert!(!glob_match("fc0.*", "fc1.bias") && !glob_match("*.bias", "fc0.bias_x"));
        assert!(!glob_match("?", "") && glob_match("", ""));
    }

    #[test]
    fn lora_trains_the_adapters_by_default_and_patterns_must_match() {
        let mlp = TchArch::Mlp { hidden: vec![32] };
        let lora = FineTune::Lora { rank: 4, alpha: 4.0 };
        assert_eq!(
            spec(mlp.clone(), None, None).trainable_names().expect("names"),
            ["fc0.bias", "fc0.weight", "fc1.bias", "fc1.weight"]
        );
        assert_eq!(
            spec(mlp.clone(), Some(lora.clone()), None)
                .trainable_names()
                .expect("names"),
            ["fc0.lora_a", "fc0.lora_b", "fc1.lora_a", "fc1.lora_b"]
        );
        assert_eq!(
            spec(mlp.clone(), Some(lora.clone()), Some(vec!["*.lora_*", "fc1.bias"]))
                .trainable_names()
                .expect("names"),
            ["fc0.lora_a", "fc0.lora_b", "fc1.bias", "fc1.lora_a", "fc1.lora_b"]
        );
        assert_eq!(
            spec(TchArch::Cnn { channels: 4 }, Some(lora.clone()), None)
                .trainable_names()
                .expect("names"),
            ["fc.lora_a", "fc.lora_b"]
        );
        let e = spec(mlp.clone(), Some(FineTune::Full), Some(vec!["fc9.*"]))
            .trainable_names()
            .expect_err("no match");
        assert!(e.contains("\"fc9.*\" matches no tensor"), "{e}");
        let e = spec(mlp.clone(), None, Some(vec!["*.lora_a"]))
            .trainable_names()
            .expect_err("no LoRA");
        assert!(e.contains("matches no tensor"), "{e}");
        assert!(spec(mlp, None, Some(vec![])).trainable_names().is_err());
    }
}
