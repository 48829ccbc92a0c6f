//! `FLModel`s to and from `tch` tensors, by name (the `torch` feature).
//!
//! The conversion itself lives in [`crate::learner::tch_model`] (the `tch` learners use it
//! too) and is re-exported here, where a training loop written against the Client API finds it.

use tch::nn::VarStore;

use super::FLModel;
pub use crate::learner::tch_model::{
    ConvertError, load_into, load_named, model_of_named, model_of_tensors, model_of_vars, tensors_of,
};

impl FLModel {
    /// The parameters as CPU f32 `tch` tensors, by name.
    pub fn to_tensors(&self) -> Result<Vec<(String, tch::Tensor)>, ConvertError> {
        tensors_of(&self.params)
    }

    /// A result of full parameters from named `tch` tensors (weight 1; see [`FLModel::new`]).
    pub fn from_tensors<S: AsRef<str>>(tensors: &[(S, tch::Tensor)]) -> Result<Self, ConvertError> {
        Ok(Self::new(model_of_tensors(tensors)?))
    }

    /// A result of full parameters: the network's variables.
    pub fn from_vars(vs: &VarStore) -> Result<Self, ConvertError> {
        Ok(Self::new(model_of_vars(vs)?))
    }

    /// Loads the parameters into the network's variables (see [`load_into`]).
    pub fn load_into(&self, vs: &VarStore) -> Result<(), ConvertError> {
        load_into(vs, &self.params)
    }
}
