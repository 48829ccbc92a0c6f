//! [`DigitsRecipe`]: what the runtime needs from a kind of model on the digits data, so the
//! pure-Rust MLP and the `tch` networks run the same jobs, summaries and baselines.

use flare_protocols::model::Model;

use super::digits::{DigitsFederation, DigitsLearner, MlpSpec, evaluate, model_of};
use crate::data::Dataset;
use crate::learner::Learner;

/// How one kind of digits model is built, trained alone and measured: the controller
/// needs the initial model and the test-set metric, the summary the local-only baseline,
/// each member its learner. Errors are messages, as the [`Learner`] trait's are.
pub trait DigitsRecipe: Send + Sync + 'static {
    /// The learner kind's name in summaries (`mlp`, `tch-mlp`, ...).
    fn name(&self) -> &'static str;

    /// Local epochs per round (the local-only baseline trains this times the rounds).
    fn epochs(&self) -> u32;

    /// The initial global model, the same on every call and every machine.
    fn initial_model(&self) -> Result<Model, String>;

    /// Test accuracy and mean loss of `model` on `data`.
    fn evaluate(&self, model: &Model, data: &Dataset) -> Result<(f64, f64), String>;

    /// Each member's model trained on its own training rows alone for `epochs`, measured on
    /// the federation's test set: the baseline federated training has to beat.
    fn local_only(&self, fed: &DigitsFederation, epochs: u32) -> Result<Vec<(f64, f64)>, String>;

    /// The learner of the member at `member_index`, training on `shard`.
    fn learner(&self, shard: Dataset, member_index: usize) -> Result<Box<dyn Learner>, String>;
}

impl DigitsRecipe for MlpSpec {
    fn name(&self) -> &'static str {
        "mlp"
    }

    fn epochs(&self) -> u32 {
        self.epochs
    }

    fn initial_model(&self) -> Result<Model, String> {
        model_of(&self.build().map_err(|e| e.to_string())?.params())
    }

    fn evaluate(&self, model: &Model, data: &Dataset) -> Result<(f64, f64), String> {
        evaluate(self, model, data)
    }

    fn local_only(&self, fed: &DigitsFederation, epochs: u32) -> Result<Vec<(f64, f64)>, String> {
        fed.local_only(self, epochs).map_err(|e| e.to_string())
    }

    fn learner(&self, shard: Dataset, member_index: usize) -> Result<Box<dyn Learner>, String> {
        Ok(Box::new(
            DigitsLearner::new(self.clone(), shard, member_index).map_err(|e| e.to_string())?,
        ))
    }
}
