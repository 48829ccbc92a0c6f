//! Models to and from `tch` tensors, by name (the `torch` feature).
//!
//! A [`Model`]'s tensors are named as a `tch` `VarStore` names its variables (`fc1.weight`),
//! so a training loop loads the global model into its network with [`load_into`] and sends
//! its network back with [`model_of_vars`]. Values travel as f32 on the CPU; the network's
//! device is kept. Lives in the learner layer, below both the `tch` learners and the Client
//! API's `FLModel` helpers, which use it.

use flare_protocols::model::{DType, Model, Tensor};
use tch::nn::VarStore;
use tch::{Device, Kind};

/// Why a model and a set of `tch` tensors do not fit together.
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The network has a variable the model lacks.
    #[error("the model has no tensor {0:?} (another architecture?)")]
    Missing(String),
    /// The model has a tensor the network lacks.
    #[error("the network has no variable {0:?} (another architecture?)")]
    Unknown(String),
    /// Same name, other shape.
    #[error("tensor {name:?} has shape {model:?} in the model, {network:?} in the network")]
    Shape {
        /// The tensor.
        name: String,
        /// Its shape in the model.
        model: Vec<usize>,
        /// Its shape in the network.
        network: Vec<i64>,
    },
    /// Only f32 tensors convert.
    #[error("tensor {name:?} is {dtype:?}; only F32 converts to and from tch")]
    DType {
        /// The tensor.
        name: String,
        /// Its type.
        dtype: DType,
    },
    /// libtorch refused an operation.
    #[error("tch: {0}")]
    Tch(#[from] tch::TchError),
    /// The values do not make a valid model tensor.
    #[error("{0}")]
    Model(#[from] flare_protocols::model::ModelError),
}

fn shape_i64(shape: &[usize]) -> Vec<i64> {
    shape.iter().map(|&d| i64::try_from(d).unwrap_or(i64::MAX)).collect()
}

/// Every tensor of `model` as a CPU f32 `tch` tensor, by name.
pub fn tensors_of(model: &Model) -> Result<Vec<(String, tch::Tensor)>, ConvertError> {
    model
        .iter()
        .map(|(name, t)| {
            let values = t.to_f32().ok_or_else(|| ConvertError::DType {
                name: name.clone(),
                dtype: t.dtype(),
            })?;
            let tensor = tch::Tensor::f_from_slice(&values)?.f_reshape(shape_i64(t.shape()))?;
            Ok((name.clone(), tensor))
        })
        .collect()
}

/// A model of these named `tch` tensors (any device and float kind; stored as f32).
pub fn model_of_tensors<S: AsRef<str>>(tensors: &[(S, tch::Tensor)]) -> Result<Model, ConvertError> {
    let tensors = tensors
        .iter()
        .map(|(name, t)| {
            let flat = t
                .f_detach()?
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_contiguous()?
                .f_reshape([-1i64])?;
            let values = Vec::<f32>::try_from(&flat)?;
            let shape = t.size().iter().map(|&d| usize::try_from(d).unwrap_or(0)).collect();
            Ok((name.as_ref().to_owned(), Tensor::from_f32(shape, &values)?))
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    Ok(Model::from_tensors(tensors))
}

/// Copies `model` into the network's variables, by name: every variable must be in the
/// model with its shape, and every tensor of the model must be a variable.
pub fn load_into(vs: &VarStore, model: &Model) -> Result<(), ConvertError> {
    let mut names: Vec<String> = vs.variables().into_keys().collect();
    names.sort();
    load_named(vs, model, &names)
}

/// Copies `model` into the variables called `names` and no others (a network whose frozen
/// part never travels loads only its trainable part): the model must hold exactly these
/// tensors, each with its variable's shape.
pub fn load_named(vs: &VarStore, model: &Model, names: &[String]) -> Result<(), ConvertError> {
    let vars = vs.variables();
    if let Some((name, _)) = model.iter().find(|(n, _)| !vars.contains_key(*n) || !names.contains(n)) {
        return Err(ConvertError::Unknown(name.clone()));
    }
    let device = vs.device();
    tch::no_grad(|| {
        for name in names {
            let var = vars.get(name).ok_or_else(|| ConvertError::Missing(name.clone()))?;
            let t = model.get(name).ok_or_else(|| ConvertError::Missing(name.clone()))?;
            if shape_i64(t.shape()) != var.size() {
                return Err(ConvertError::Shape {
                    name: name.clone(),
                    model: t.shape().to_vec(),
                    network: var.size(),
                });
            }
            let values = t.to_f32().ok_or_else(|| ConvertError::DType {
                name: name.clone(),
                dtype: t.dtype(),
            })?;
            let src = tch::Tensor::f_from_slice(&values)?
                .f_reshape(var.size())?
                .f_to_device(device)?
                .f_to_kind(var.kind())?;
            var.shallow_clone().f_copy_(&src)?;
        }
        Ok(())
    })
}

/// The network's variables as a model.
pub fn model_of_vars(vs: &VarStore) -> Result<Model, ConvertError> {
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    model_of_tensors(&vars)
}

/// The variables called `names` as a model (the part of a network that travels).
pub fn model_of_named(vs: &VarStore, names: &[String]) -> Result<Model, ConvertError> {
    let vars = vs.variables();
    let picked = names
        .iter()
        .map(|n| {
            let t = vars.get(n).ok_or_else(|| ConvertError::Missing(n.clone()))?;
            Ok((n.clone(), t.shallow_clone()))
        })
        .collect::<Result<Vec<_>, ConvertError>>()?;
    model_of_tensors(&picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::nn;

    #[test]
    fn models_and_varstores_convert_by_name() {
        let vs = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(vs.root() / "fc1", 3, 2, Default::default());
        let m = model_of_vars(&vs).expect("model");
        assert_eq!(
            m.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
            ["fc1.bias", "fc1.weight"]
        );
        assert_eq!(m.get("fc1.weight").expect("w").shape(), [2, 3]);
        let mut shifted = m.clone();
        shifted.map_f32(|v| v + 1.0);
        let other = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(other.root() / "fc1", 3, 2, Default::default());
        load_into(&other, &shifted).expect("load");
        assert_eq!(model_of_vars(&other).expect("model"), shifted);
        let back = model_of_tensors(&tensors_of(&shifted).expect("tensors")).expect("model");
        assert_eq!(back, shifted);
        // Another architecture is refused by name.
        let wide = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(wide.root() / "fc1", 4, 2, Default::default());
        assert!(matches!(load_into(&wide, &m), Err(ConvertError::Shape { .. })));
        let renamed = nn::VarStore::new(Device::Cpu);
        let _ = nn::linear(renamed.root() / "fc2", 3, 2, Default::default());
        assert!(matches!(load_into(&renamed, &m), Err(ConvertError::Unknown(_))));
        // A part of the network loads alone; a tensor outside the part is refused.
        let weight = vec!["fc1.weight".to_owned()];
        let part = model_of_named(&other, &weight).expect("part");
        assert_eq!(part.len(), 1);
        load_named(&vs, &part, &weight).expect("load part");
        let after = model_of_vars(&vs).expect("model");
        assert_eq!(after.f32("fc1.bias").expect("b"), m.f32("fc1.bias").expect("b"));
        assert_eq!(
            after.f32("fc1.weight").expect("w"),
            shifted.f32("fc1.weight").expect("w")
        );
        assert!(matches!(load_named(&vs, &m, &weight), Err(ConvertError::Unknown(_))));
        let bias = vec!["fc1.bias".to_owned()];
        assert!(matches!(load_named(&vs, &part, &bias), Err(ConvertError::Unknown(_))));
    }
}
