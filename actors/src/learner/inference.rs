//! Federated inference, then FedAvg of a head: a frozen network runs over each member's
//! local data and the embeddings stay on that member; FedAvg then trains an MLP head on them.
//!
//! The frozen network stands in for a pretrained foundation model (none is shipped): a seeded
//! dense ReLU layer with random weights (random features), `frozen.0.weight` `[embed_dim, 64]`
//! and `frozen.0.bias` `[embed_dim]`. The controller ships it to every member once, as the
//! input of the `embed` task; it is never trained. The `embed` task answers with counts only:
//! the embeddings never leave the member. Then only the head crosses the wire, as in FedAvg.

use std::collections::BTreeMap;

use flare_protocols::ctl::{TaskKind, Value};
use flare_protocols::model::Model;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::digits::{DigitsFederation, LocalData, MlpSpec, model_of, params_of, train_from, validate_on};
use super::recipe::DigitsRecipe;
use super::{LearnerError, Mlp, MlpConfig, NamedTensor};
use crate::data::{DIGITS_CLASSES, DIGITS_DIM, Dataset};
use crate::learner::{Learner, TaskContext, TaskReply, TrainOutput};

/// Widest embedding a topology may ask for (keeps a typo from allocating gigabytes per row).
pub const MAX_EMBED_DIM: usize = 4096;

/// The frozen network: its width and the seed of its (never trained) weights.
#[derive(Clone, Debug, PartialEq)]
pub struct FrozenSpec {
    /// Embedding width (outputs of the frozen layer).
    pub embed_dim: usize,
    /// Seed of the frozen weights, so the controller can rebuild what it shipped.
    pub seed: u64,
}

impl FrozenSpec {
    /// The frozen network as a model blob, the same on every call: He-uniform weights and small
    /// biases (random ReLU features of the 64 pixels).
    pub fn model(&self) -> Result<Model, String> {
        if self.embed_dim == 0 || self.embed_dim > MAX_EMBED_DIM {
            return Err(format!(
                "embed_dim {} is not between 1 and {MAX_EMBED_DIM}",
                self.embed_dim
            ));
        }
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0xf202_e11e);
        let a = (6.0 / DIGITS_DIM as f32).sqrt();
        let weight = (0..self.embed_dim * DIGITS_DIM)
            .map(|_| rng.random_range(-a..a))
            .collect();
        let bias = (0..self.embed_dim).map(|_| rng.random_range(-0.1..0.1)).collect();
        model_of(&[
            NamedTensor {
                name: "frozen.0.bias".into(),
                shape: vec![self.embed_dim],
                values: bias,
            },
            NamedTensor {
                name: "frozen.0.weight".into(),
                shape: vec![self.embed_dim, DIGITS_DIM],
                values: weight,
            },
        ])
    }
}

/// A frozen network read from a model blob: dense ReLU layers `frozen.{i}.weight`/`.bias`.
#[derive(Clone, Debug)]
pub struct FrozenNet {
    /// `(weight [out, in] row-major, bias [out], out, in)`, input side first.
    layers: Vec<(Vec<f32>, Vec<f32>, usize, usize)>,
}

impl FrozenNet {
    /// Reads and checks the layers of `model` (it comes over the network: every shape is
    /// checked against the next layer and `inputs`).
    pub fn from_model(model: &Model, inputs: usize) -> Result<Self, String> {
        let params = params_of(model)?;
        let get = |name: &str| params.iter().find(|p| p.name == name);
        let mut layers = Vec::new();
        let mut width = inputs;
        while let Some(w) = get(&format!("frozen.{}.weight", layers.len())) {
            let i = layers.len();
            let b = get(&format!("frozen.{i}.bias")).ok_or_else(|| format!("frozen.{i}.bias is missing"))?;
            let out = match w.shape[..] {
                [out, inp] if inp == width && out > 0 && out <= MAX_EMBED_DIM => out,
                _ => {
                    return Err(format!(
                        "frozen.{i}.weight has shape {:?}, expected [_, {width}]",
                        w.shape
                    ));
                }
            };
            if b.shape != [out] || w.values.len() != out * width || b.values.len() != out {
                return Err(format!("frozen.{i}.bias has shape {:?}, expected [{out}]", b.shape));
            }
            layers.push((w.values.clone(), b.values.clone(), out, width));
            width = out;
        }
        if layers.is_empty() || params.len() != 2 * layers.len() {
            return Err(format!(
                "not a frozen network: expected tensors frozen.0.weight, frozen.0.bias, ...; got {:?}",
                params.iter().map(|p| p.name.as_str()).collect::<Vec<_>>()
            ));
        }
        Ok(Self { layers })
    }

    /// Embedding width (outputs of the last layer).
    pub fn dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.2)
    }

    /// Runs the network over every row of `data`: the embeddings, with the same labels.
    pub fn embed(&self, data: &Dataset) -> Result<Dataset, String> {
        let first = self.layers.first().map_or(0, |l| l.3);
        if data.dim() != first {
            return Err(format!(
                "data has {} features, the frozen network takes {first}",
                data.dim()
            ));
        }
        let mut out = Vec::with_capacity(data.len() * self.dim());
        for row in data.features().chunks_exact(data.dim()) {
            let mut x = row.to_vec();
            for (w, b, n_out, n_in) in &self.layers {
                x = (0..*n_out)
                    .map(|j| {
                        let dot: f32 = w[j * n_in..(j + 1) * n_in].iter().zip(&x).map(|(a, v)| a * v).sum();
                        (dot + b[j]).max(0.0)
                    })
                    .collect();
            }
            out.extend_from_slice(&x);
        }
        Dataset::new(out, data.labels().to_vec(), self.dim(), data.classes()).map_err(|e| e.to_string())
    }
}

/// The job's models: the frozen network and the MLP head trained on its embeddings.
#[derive(Clone, Debug, PartialEq)]
pub struct InferenceSpec {
    /// The head: hidden sizes, SGD settings, epochs per round and the seed of its weights
    /// (and of each member's training/validation cut, as in [`super::digits::DigitsLearner`]).
    pub head: MlpSpec,
    /// The frozen network.
    pub frozen: FrozenSpec,
}

impl InferenceSpec {
    /// A fresh head (embedding in, 10 classes out), the same on every member.
    pub fn build_head(&self) -> Result<Mlp, LearnerError> {
        let mut cfg = MlpConfig::new(self.frozen.embed_dim, self.head.hidden.clone(), DIGITS_CLASSES);
        cfg.learning_rate = self.head.lr;
        cfg.batch_size = self.head.batch_size;
        Mlp::new(cfg, self.head.seed)
    }

    /// The frozen network as the controller rebuilds it (the one it ships).
    pub fn frozen_net(&self) -> Result<FrozenNet, String> {
        FrozenNet::from_model(&self.frozen.model()?, DIGITS_DIM)
    }
}

impl DigitsRecipe for InferenceSpec {
    fn name(&self) -> &'static str {
        "mlp-head"
    }

    fn epochs(&self) -> u32 {
        self.head.epochs
    }

    fn initial_model(&self) -> Result<Model, String> {
        model_of(&self.build_head().map_err(|e| e.to_string())?.params())
    }

    /// The head on `data` passed through the same frozen network the members ran.
    fn evaluate(&self, model: &Model, data: &Dataset) -> Result<(f64, f64), String> {
        let embedded = self.frozen_net()?.embed(data)?;
        let mut head = self.build_head().map_err(|e| e.to_string())?;
        head.set_params(&params_of(model)?).map_err(|e| e.to_string())?;
        let e = head.evaluate(&embedded).map_err(|e| e.to_string())?;
        Ok((e.accuracy, e.loss))
    }

    /// Each member's head trained on its own embedded training rows alone.
    fn local_only(&self, fed: &DigitsFederation, epochs: u32) -> Result<Vec<(f64, f64)>, String> {
        let net = self.frozen_net()?;
        let test = net.embed(&fed.test)?;
        (0..fed.shards.len())
            .map(|i| {
                let data = fed.local_data(&self.head, i).map_err(|e| e.to_string())?;
                let train = net.embed(&data.train)?;
                let mut head = self.build_head().map_err(|e| e.to_string())?;
                let mut rng = ChaCha8Rng::seed_from_u64(self.head.seed ^ 0x10ca1 ^ i as u64);
                head.train(&train, epochs as usize, &mut rng)
                    .map_err(|e| e.to_string())?;
                let e = head.evaluate(&test).map_err(|e| e.to_string())?;
                Ok((e.accuracy, e.loss))
            })
            .collect()
    }

    fn learner(&self, shard: Dataset, member_index: usize) -> Result<Box<dyn Learner>, String> {
        Ok(Box::new(
            InferenceLearner::new(self.clone(), shard, member_index).map_err(|e| e.to_string())?,
        ))
    }
}

/// A member's learner: runs the frozen network over its rows once (the `embed` task), keeps
/// the embeddings in memory, then trains and validates the head on them.
pub struct InferenceLearner {
    spec: InferenceSpec,
    data: LocalData,
    embedded: Option<LocalData>,
    head: Mlp,
    member_index: u64,
    last: Option<Model>,
}

impl InferenceLearner {
    /// The learner of the member at `member_index`, cutting `shard` as
    /// [`LocalData::split`] does (seeded by the head's seed).
    pub fn new(spec: InferenceSpec, shard: Dataset, member_index: usize) -> Result<Self, LearnerError> {
        Ok(Self {
            head: spec.build_head()?,
            data: LocalData::split(&shard, spec.head.seed, member_index)?,
            spec,
            embedded: None,
            member_index: member_index as u64,
            last: None,
        })
    }

    /// The embeddings this member holds (none before the `embed` task).
    pub fn embeddings(&self) -> Option<&LocalData> {
        self.embedded.as_ref()
    }
}

fn embedded(e: &Option<LocalData>) -> Result<&LocalData, String> {
    e.as_ref()
        .ok_or_else(|| "no embeddings on this member: the \"embed\" task must run first".to_owned())
}

impl Learner for InferenceLearner {
    fn train(&mut self, global: Model, ctx: &TaskContext) -> Result<TrainOutput, String> {
        let train = &embedded(&self.embedded)?.train;
        let out = train_from(
            &mut self.head,
            &global,
            train,
            &self.spec.head,
            self.member_index,
            ctx.round,
        )?;
        self.last = Some(out.model.clone());
        Ok(out)
    }

    /// The head's accuracy and loss on this member's embedded validation rows.
    fn validate(&mut self, model: &Model, _: &TaskContext) -> Result<BTreeMap<String, f64>, String> {
        validate_on(&mut self.head, model, &embedded(&self.embedded)?.validation)
    }

    /// The `embed` task: runs the input frozen network over the training and validation rows
    /// and keeps the result here; answers with counts and the width only (no model).
    fn run_task(&mut self, input: Option<Model>, ctx: &TaskContext) -> Result<TaskReply, String> {
        if ctx.task != TaskKind::Embed {
            return Err(format!("this learner cannot run task {:?}", ctx.task.name()));
        }
        let frozen = input.ok_or("the embed task needs the frozen network as its input model")?;
        let net = FrozenNet::from_model(&frozen, self.data.train.dim())?;
        if net.dim() != self.spec.frozen.embed_dim {
            return Err(format!(
                "the frozen network embeds in {} dimensions, the head takes {}",
                net.dim(),
                self.spec.frozen.embed_dim
            ));
        }
        let embedded = LocalData {
            train: net.embed(&self.data.train)?,
            validation: net.embed(&self.data.validation)?,
        };
        let count = |n: usize| Value::Int(i64::try_from(n).unwrap_or(i64::MAX));
        let reply = TaskReply {
            model: None,
            num_samples: embedded.train.len() as u64,
            metrics: BTreeMap::new(),
            values: BTreeMap::from([
                ("train_rows".to_owned(), count(embedded.train.len())),
                ("validation_rows".to_owned(), count(embedded.validation.len())),
                ("dim".to_owned(), count(net.dim())),
            ]),
        };
        self.embedded = Some(embedded);
        Ok(reply)
    }

    /// The head of the last `train` task (`None` before the first).
    fn local_model(&self) -> Option<Model> {
        self.last.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> InferenceSpec {
        InferenceSpec {
            head: MlpSpec {
                hidden: vec![16],
                lr: 0.1,
                batch_size: 32,
                epochs: 1,
                seed: 1,
            },
            frozen: FrozenSpec { embed_dim: 32, seed: 7 },
        }
    }

    fn ctx(task: TaskKind) -> TaskContext {
        TaskContext {
            job: flare_protocols::ctl::JobId("j".into()),
            member: "m0".into(),
            task,
            round: 0,
            props: BTreeMap::new(),
        }
    }

    #[test]
    fn embed_task_returns_no_model_and_keeps_the_rows_on_the_member() {
        let spec = spec();
        let fed = DigitsFederation::deal(2, 0.5, 0.2, 0).expect("deal");
        let mut l = InferenceLearner::new(spec.clone(), fed.shards[0].clone(), 0).expect("learner");
        let head = spec.initial_model().expect("head");
        let e = l
            .train(head.clone(), &ctx(TaskKind::Train))
            .expect_err("no embeddings yet");
        assert!(e.contains("embed"), "{e}");
        assert!(
            l.run_task(None, &ctx(TaskKind::Embed)).is_err(),
            "needs the frozen network"
        );
        let frozen = spec.frozen.model().expect("frozen");
        assert_eq!(
            frozen,
            spec.frozen.model().expect("frozen"),
            "seeded: the same every time"
        );
        let reply = l.run_task(Some(frozen), &ctx(TaskKind::Embed)).expect("embed");
        assert!(reply.model.is_none(), "the embeddings stay on the member");
        let kept = l.embeddings().expect("kept");
        let local = fed.local_data(&spec.head, 0).expect("local data");
        assert_eq!(kept.train.len() + kept.validation.len(), fed.shards[0].len());
        assert_eq!((kept.train.len(), kept.train.dim()), (local.train.len(), 32));
        assert_eq!(kept.train.labels(), local.train.labels());
        assert_eq!(reply.values["train_rows"], Value::Int(local.train.len() as i64));
        assert_eq!(
            reply.values["validation_rows"],
            Value::Int(local.validation.len() as i64)
        );
        assert_eq!(reply.values["dim"], Value::Int(32));
        assert_eq!(reply.num_samples as usize, local.train.len());
        // Now the head trains on the embeddings and validates on the embedded held-out rows.
        let out = l.train(head, &ctx(TaskKind::Train)).expect("train");
        assert_eq!(out.num_samples as usize, local.train.len());
        let m = l.validate(&out.model, &ctx(TaskKind::Validate)).expect("validate");
        assert_eq!(m["rows"] as usize, local.validation.len());
        // A network of the wrong width, or something that is not a frozen network, is refused.
        let wide = FrozenSpec { embed_dim: 8, seed: 7 }.model().expect("frozen");
        assert!(l.run_task(Some(wide), &ctx(TaskKind::Embed)).is_err());
        assert!(l.run_task(Some(out.model), &ctx(TaskKind::Embed)).is_err());
        let forward = flare_protocols::split::Forward {
            rows: vec![0],
            step: 0,
            train: false,
            inline_max: 0,
        };
        assert!(l.run_task(None, &ctx(TaskKind::SplitForward(forward))).is_err());
    }
}
