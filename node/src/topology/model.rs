//! `[model]`: the initial global model of the learners whose network is not fixed by their
//! code (the add-one learner, and the external learners a job runs with it): either seeded
//! f32 tensors (`tensors`, `elements`, `seed`) or the tensors of a safetensors `file`.
//!
//! A file is read here, when the topology is, so that a wrong one is refused before any
//! member starts, naming the file, the line and the field; its hash goes into the job's
//! [`spec_hash`](super::Topology::spec_hash).

use std::path::Path;

use anyhow::Context;
use flare_protocols::ChunkHash;
use flare_protocols::model::{DType, Model};

use super::schema::{RawModel, default_elements, default_tensors};
use super::{Fail, LearnerSpec, ModelFile, ModelSpec, TopologyError};

/// Checks `[model]`; `dir` is the topology file's directory (none for a submitted job).
pub(super) fn model(
    m: Option<RawModel>,
    learner: &LearnerSpec,
    dir: Option<&Path>,
    fail: &Fail<'_>,
) -> Result<ModelSpec, TopologyError> {
    let Some(m) = m else {
        return Ok(ModelSpec::default());
    };
    let Some(file) = m.file else {
        return Ok(ModelSpec {
            tensors: m.tensors.map_or_else(default_tensors, |t| t.into_inner()),
            elements: m.elements.map_or_else(default_elements, |e| e.into_inner()),
            seed: m.seed.map_or(0, |s| s.into_inner()),
            file: None,
        });
    };
    let seeded = [
        ("model.tensors", m.tensors.map(|t| t.span().start)),
        ("model.elements", m.elements.map(|e| e.span().start)),
        ("model.seed", m.seed.map(|s| s.span().start)),
    ];
    if let Some((field, Some(at))) = seeded.into_iter().find(|(_, at)| at.is_some()) {
        return Err(fail(
            at,
            field,
            "does not apply with `file`: the file gives the whole initial model".into(),
        ));
    }
    let at = file.span().start;
    let fixed = match learner {
        LearnerSpec::AddOne { .. } => None,
        LearnerSpec::Mlp { .. } => Some("the \"mlp\" learner's network"),
        LearnerSpec::Tch { .. } => Some("the \"tch-mlp\" and \"tch-cnn\" learners' networks"),
        LearnerSpec::Split => Some("split learning's networks"),
    };
    if let Some(what) = fixed {
        return Err(fail(
            at,
            "model.file",
            format!(
                "{what} is fixed by its code: `file` gives the initial model of the \"add-one\" learner and of external learners (members with a `command`) in a job of kind \"add-one\""
            ),
        ));
    }
    let Some(dir) = dir else {
        return Err(fail(
            at,
            "model.file",
            "a submitted job cannot name a file (it has no directory of its own, and a site reads no file the submitter names): use `[model] from = \"MEMBER\"` (coming), or run the job from its topology file (flare-node sim or run)".into(),
        ));
    };
    if file.get_ref().trim().is_empty() {
        return Err(fail(at, "model.file", "is empty".into()));
    }
    let path = dir.join(file.get_ref());
    let bytes = std::fs::read(&path).map_err(|e| fail(at, "model.file", format!("{}: {e}", path.display())))?;
    let hash = ChunkHash::of(&bytes).0;
    let model = Model::from_safetensors_vec(bytes).map_err(|e| {
        fail(
            at,
            "model.file",
            format!("{}: not a safetensors model: {e}", path.display()),
        )
    })?;
    checked(&model).map_err(|e| fail(at, "model.file", format!("{}: {e}", path.display())))?;
    Ok(ModelSpec {
        file: Some(ModelFile { path, hash }),
        ..ModelSpec::default()
    })
}

/// Whether the runtime can average `model`: some tensors, all of them F32 or F64.
fn checked(model: &Model) -> Result<(), String> {
    if model.is_empty() {
        return Err("holds no tensors".into());
    }
    match model
        .iter()
        .find(|(_, t)| !matches!(t.dtype(), DType::F32 | DType::F64))
    {
        Some((name, t)) => Err(format!(
            "tensor {name:?} is {:?}: flare-node averages F32 and F64 tensors only",
            t.dtype()
        )),
        None => Ok(()),
    }
}

impl ModelFile {
    /// Reads the model, refusing a file whose bytes changed since the topology was read.
    pub fn load(&self) -> anyhow::Result<Model> {
        let bytes = std::fs::read(&self.path).with_context(|| format!("reading {}", self.path.display()))?;
        anyhow::ensure!(
            ChunkHash::of(&bytes).0 == self.hash,
            "{} changed since the topology was read",
            self.path.display()
        );
        let model = Model::from_safetensors_vec(bytes).with_context(|| format!("reading {}", self.path.display()))?;
        checked(&model).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use flare_protocols::model::Tensor;

    use super::super::Topology;
    use super::*;

    const JOB: &str = "[job]\nname = \"f\"\nworkflow = \"fedavg\"\ncontroller = \"s\"\n\n\
        [fedavg]\nrounds = 2\nmin_clients = 1\n\n[learner]\nkind = \"add-one\"\n\n\
        [[member]]\nname = \"s\"\n[[member]]\nname = \"a\"\n\n[model]\nfile = \"init.safetensors\"\n";

    /// Writes `model` as `init.safetensors` and `text` as `t.toml` in `dir`, and loads it.
    fn load(dir: &Path, text: &str, model: &Model) -> Result<Topology, String> {
        model.save(&dir.join("init.safetensors")).expect("save");
        std::fs::write(dir.join("t.toml"), text).expect("write");
        Topology::load(&dir.join("t.toml")).map_err(|e| e.to_string())
    }

    fn two() -> Model {
        Model::from_tensors([
            (
                "w",
                Tensor::from_f32(vec![2, 3], &[0.5, 1.5, 2.5, 3.5, 4.5, 5.5]).expect("w"),
            ),
            ("b", Tensor::from_f32(vec![3], &[-1.0, 0.0, 1.0]).expect("b")),
        ])
    }

    #[test]
    fn a_model_file_beside_the_topology_is_the_initial_model_and_part_of_the_job() {
        let dir = tempfile::tempdir().expect("tmp");
        let t = load(dir.path(), JOB, &two()).expect("file");
        let f = t.model.file.as_ref().expect("a file");
        assert_eq!(f.path, dir.path().join("init.safetensors"));
        assert_eq!(f.load().expect("load"), two());

        // The same file elsewhere is the same job; other values are another.
        let other = tempfile::tempdir().expect("tmp");
        let same = load(other.path(), JOB, &two()).expect("file");
        assert_eq!(same.spec_hash(), t.spec_hash());
        let mut m = two();
        m.map_f32(|v| v + 1.0);
        let changed = load(other.path(), JOB, &m).expect("file");
        assert_ne!(changed.spec_hash(), t.spec_hash());
        // A file changed after the topology was read is refused when the model is read.
        m.map_f32(|v| v + 1.0);
        m.save(&other.path().join("init.safetensors")).expect("save");
        let e = changed.model.file.as_ref().expect("file").load().expect_err("changed");
        assert!(e.to_string().contains("changed since the topology was read"), "{e}");
    }

    #[test]
    fn a_model_file_is_refused_naming_line_and_field() {
        let dir = tempfile::tempdir().expect("tmp");
        let p = dir.path();
        let e = load(p, &JOB.replace("file = ", "seed = 3\nfile = "), &two()).expect_err("seed");
        assert!(
            e.contains("line 19: field `model.seed`: does not apply with `file`"),
            "{e}"
        );
        let e = load(p, &JOB.replace("\"add-one\"", "\"mlp\""), &two()).expect_err("mlp");
        assert!(
            e.contains("line 19: field `model.file`: the \"mlp\" learner's network is fixed by its code"),
            "{e}"
        );
        let e = load(p, &JOB.replace("init.safetensors", "nothing.safetensors"), &two()).expect_err("absent");
        assert!(
            e.contains("field `model.file`") && e.contains("nothing.safetensors"),
            "{e}"
        );
        std::fs::write(p.join("init.safetensors"), b"not a model").expect("write");
        std::fs::write(p.join("t.toml"), JOB).expect("write");
        let e = Topology::load(&p.join("t.toml")).expect_err("garbage").to_string();
        assert!(
            e.contains("field `model.file`") && e.contains("not a safetensors model"),
            "{e}"
        );
        let ints = Model::from_tensors([("steps", Tensor::new(DType::I64, vec![1], vec![0; 8]).expect("i64"))]);
        let e = load(p, JOB, &ints).expect_err("i64");
        assert!(
            e.contains("tensor \"steps\" is I64: flare-node averages F32 and F64 tensors only"),
            "{e}"
        );
        // A submitted job has no directory: it cannot name a file.
        let e = Topology::parse(Path::new("job 7"), JOB)
            .expect_err("submitted")
            .to_string();
        assert!(
            e.starts_with("job 7: line 19: field `model.file`: a submitted job cannot name a file"),
            "{e}"
        );
    }
}
