//! The topology file's schema as serde reads it (`Raw*`), with the defaults of optional
//! fields. Spans are kept so that every error can name its line; the checks that turn these
//! into a [`Topology`](super::Topology) are in the section validators beside this file.

use serde::Deserialize;
use toml::Spanned;

use super::{DataSpec, ModelSpec};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Raw {
    pub(super) job: Spanned<RawJob>,
    #[serde(default)]
    pub(super) fedavg: Option<Spanned<RawFedAvg>>,
    #[serde(default)]
    pub(super) cyclic: Option<Spanned<RawCyclic>>,
    #[serde(default)]
    pub(super) swarm: Option<Spanned<RawSwarm>>,
    #[serde(default)]
    pub(super) learner: Option<Spanned<RawLearner>>,
    #[serde(default)]
    pub(super) split: Option<Spanned<RawSplit>>,
    #[serde(default)]
    pub(super) inference: Option<Spanned<RawInference>>,
    #[serde(default)]
    pub(super) cross_site: Option<Spanned<RawCrossSite>>,
    #[serde(default)]
    pub(super) model: Option<RawModel>,
    #[serde(default)]
    pub(super) data: Option<RawData>,
    #[serde(default)]
    pub(super) member: Vec<Spanned<RawMember>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawJob {
    pub(super) name: String,
    pub(super) workflow: Spanned<String>,
    #[serde(default)]
    pub(super) controller: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) clients: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawFedAvg {
    pub(super) rounds: Spanned<u32>,
    pub(super) min_clients: Spanned<usize>,
    #[serde(default = "default_timeout")]
    pub(super) round_timeout_secs: Spanned<f64>,
    #[serde(default)]
    pub(super) clients_per_round: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) fraction: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) sample_seed: Option<Spanned<u64>>,
    #[serde(default)]
    pub(super) keep_checkpoints: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) best_metric: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) best_mode: Option<Spanned<String>>,
    /// The clients share the upload of each round's global model.
    #[serde(default)]
    pub(super) share_upload: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSplit {
    #[serde(default = "default_bottom")]
    pub(super) bottom: Vec<usize>,
    #[serde(default)]
    pub(super) top: Vec<usize>,
    #[serde(default = "default_lr")]
    pub(super) lr: f32,
    #[serde(default = "default_batch")]
    pub(super) batch_size: usize,
    pub(super) epochs: Spanned<u32>,
    #[serde(default)]
    pub(super) seed: u64,
    #[serde(default = "default_timeout")]
    pub(super) step_timeout_secs: Spanned<f64>,
}

pub(super) fn default_bottom() -> Vec<usize> {
    vec![16]
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawInference {
    #[serde(default = "default_embed_dim")]
    pub(super) embed_dim: Spanned<usize>,
    #[serde(default)]
    pub(super) seed: u64,
}

pub(super) fn default_embed_dim() -> Spanned<usize> {
    Spanned::new(0..0, 128)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCrossSite {
    #[serde(default = "default_timeout")]
    pub(super) task_timeout_secs: Spanned<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSwarm {
    pub(super) rounds: Spanned<u32>,
    pub(super) min_clients: Spanned<usize>,
    #[serde(default = "default_timeout")]
    pub(super) round_timeout_secs: Spanned<f64>,
    #[serde(default)]
    pub(super) crash_aggregator_in_round: Option<u32>,
    /// The members share the upload of each round's new model.
    #[serde(default)]
    pub(super) share_upload: Option<bool>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawCyclic {
    pub(super) rounds: Spanned<u32>,
    #[serde(default)]
    pub(super) order: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) shuffle_seed: Option<u64>,
    #[serde(default = "default_timeout")]
    pub(super) task_timeout_secs: Spanned<f64>,
}

pub(super) fn default_timeout() -> Spanned<f64> {
    Spanned::new(0..0, 120.0)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLearner {
    pub(super) kind: Spanned<String>,
    #[serde(default)]
    pub(super) hidden: Vec<usize>,
    #[serde(default = "default_lr")]
    pub(super) lr: f32,
    #[serde(default = "one")]
    pub(super) epochs: u32,
    #[serde(default = "default_batch")]
    pub(super) batch_size: usize,
    #[serde(default)]
    pub(super) delay_secs: Option<Spanned<f64>>,
    #[serde(default = "default_channels")]
    pub(super) channels: usize,
    #[serde(default)]
    pub(super) finetune: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) lora_rank: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) lora_alpha: Option<Spanned<f64>>,
    #[serde(default)]
    pub(super) trainable: Option<Spanned<Vec<String>>>,
    /// A learner each site registered under this name (its own command), run instead of the
    /// built-in `kind` on standing sites.
    #[serde(default)]
    pub(super) registered: Option<Spanned<String>>,
}

pub(super) fn default_channels() -> usize {
    16
}

pub(super) fn default_lr() -> f32 {
    0.1
}
pub(super) fn one() -> u32 {
    1
}
pub(super) fn default_batch() -> usize {
    32
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawModel {
    #[serde(default)]
    pub(super) tensors: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) elements: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) seed: Option<Spanned<u64>>,
    /// A safetensors file, relative to the topology file's directory: the initial model.
    #[serde(default)]
    pub(super) file: Option<Spanned<String>>,
    /// A client whose learner gives the initial model before round 0.
    #[serde(default)]
    pub(super) from: Option<Spanned<String>>,
}

pub(super) fn default_tensors() -> usize {
    4
}
pub(super) fn default_elements() -> usize {
    1024
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawData {
    #[serde(default = "default_alpha")]
    pub(super) alpha: f64,
    #[serde(default)]
    pub(super) seed: u64,
    #[serde(default = "default_test_fraction")]
    pub(super) test_fraction: f64,
    #[serde(default)]
    pub(super) dataset: Option<Spanned<String>>,
}

pub(super) fn default_alpha() -> f64 {
    0.5
}
pub(super) fn default_test_fraction() -> f64 {
    0.2
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMember {
    pub(super) name: String,
    #[serde(default)]
    pub(super) peer_id: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) addrs: Vec<Spanned<String>>,
    #[serde(default)]
    pub(super) command: Option<Spanned<Vec<String>>>,
    #[serde(default)]
    pub(super) env: std::collections::BTreeMap<String, String>,
}

impl Default for ModelSpec {
    fn default() -> Self {
        Self {
            tensors: default_tensors(),
            elements: default_elements(),
            seed: 0,
            file: None,
            from: None,
        }
    }
}

impl Default for DataSpec {
    fn default() -> Self {
        Self {
            alpha: default_alpha(),
            seed: 0,
            test_fraction: default_test_fraction(),
            dataset: None,
            local: None,
            deal_to_scripts: false,
        }
    }
}
