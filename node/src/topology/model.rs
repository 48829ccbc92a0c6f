//! `[model]`: the initial global model of the learners whose network is not fixed by their
//! code (the add-one learner, and the external learners a job runs with it): either seeded
//! f32 tensors (`tensors`, `elements`, `seed`) or the tensors of a safetensors `file`.
//!
//! A file is read here, when the topology is, so that a wrong one is refused before any
//! member starts, naming the file, the line and the field; its hash goes into the job's
//! [`spec_hash`](super::Topology::spec_hash).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use flare_protocols::ChunkHash;
use flare_protocols::model::Model;

use super::schema::{RawModel, default_elements, default_tensors};
use super::{ExternalSpec, Fail, LearnerSpec, ModelFile, ModelSpec, TopologyError};

/// Who in the job could give the initial model (`[model] from`): a client that runs its own
/// code, a command of the topology or the learner each site registered.
pub(super) struct Givers<'a> {
    /// The job's clients.
    pub clients: &'a [String],
    /// The members with a command of their own.
    pub external: &'a BTreeMap<String, ExternalSpec>,
    /// Every client runs the learner its site registered.
    pub registered: bool,
}

/// Checks `[model]`; `dir` is the topology file's directory (none for a submitted job).
pub(super) fn model(
    m: Option<RawModel>,
    learner: &LearnerSpec,
    givers: &Givers<'_>,
    dir: Option<&Path>,
    fail: &Fail<'_>,
) -> Result<ModelSpec, TopologyError> {
    let Some(m) = m else {
        return Ok(ModelSpec::default());
    };
    let seeded = [
        ("model.tensors", m.tensors.as_ref().map(|t| t.span().start)),
        ("model.elements", m.elements.as_ref().map(|e| e.span().start)),
        ("model.seed", m.seed.as_ref().map(|s| s.span().start)),
    ];
    let (given, field) = match (m.file, m.from) {
        (None, None) => {
            return Ok(ModelSpec {
                tensors: m.tensors.map_or_else(default_tensors, |t| t.into_inner()),
                elements: m.elements.map_or_else(default_elements, |e| e.into_inner()),
                seed: m.seed.map_or(0, |s| s.into_inner()),
                file: None,
                from: None,
            });
        }
        (Some(_), Some(from)) => {
            return Err(fail(
                from.span().start,
                "model.from",
                "does not apply with `file`: the initial model comes from one or the other".into(),
            ));
        }
        (Some(file), None) => (file, "model.file"),
        (None, Some(from)) => (from, "model.from"),
    };
    let with = if field == "model.file" { "file" } else { "from" };
    if let Some((seeded_field, Some(at))) = seeded.into_iter().find(|(_, at)| at.is_some()) {
        return Err(fail(
            at,
            seeded_field,
            format!("does not apply with `{with}`: the {with} gives the whole initial model"),
        ));
    }
    let at = given.span().start;
    let fixed = match learner {
        LearnerSpec::AddOne { .. } => None,
        LearnerSpec::Mlp { .. } => Some("the \"mlp\" learner's network"),
        LearnerSpec::Tch { .. } => Some("the \"tch-mlp\" and \"tch-cnn\" learners' networks"),
        LearnerSpec::Split => Some("split learning's networks"),
    };
    if let Some(what) = fixed {
        return Err(fail(
            at,
            field,
            format!(
                "{what} is fixed by its code: `{with}` gives the initial model of the \"add-one\" learner and of external learners (members with a `command`, or a registered learner) in a job of kind \"add-one\""
            ),
        ));
    }
    if field == "model.from" {
        return from(given.into_inner(), at, givers, fail);
    }
    let file = given;
    let Some(dir) = dir else {
        return Err(fail(
            at,
            "model.file",
            "a submitted job cannot name a file (it has no directory of its own, and a site reads no file the submitter names): use `[model] from = \"MEMBER\"`, or run the job from its topology file (flare-node sim or run)".into(),
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
    flare_actors::job::initial::averageable(&model)
        .map_err(|e| fail(at, "model.file", format!("{}: {e}", path.display())))?;
    Ok(ModelSpec {
        file: Some(ModelFile { path, hash }),
        ..ModelSpec::default()
    })
}

/// `[model] from = "MEMBER"`: a client whose own code gives the initial model.
fn from(name: String, at: usize, givers: &Givers<'_>, fail: &Fail<'_>) -> Result<ModelSpec, TopologyError> {
    if !givers.clients.contains(&name) {
        return Err(fail(
            at,
            "model.from",
            format!(
                "{name:?} is not a client of this job (clients: {})",
                givers.clients.join(", ")
            ),
        ));
    }
    if !givers.registered && !givers.external.contains_key(&name) {
        return Err(fail(
            at,
            "model.from",
            format!(
                "{name:?} runs the built-in \"add-one\" learner, which has no model of its own: give {name:?} a `command` whose script registers its network (flare.init(model=net))"
            ),
        ));
    }
    Ok(ModelSpec {
        from: Some(name),
        ..ModelSpec::default()
    })
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
        flare_actors::job::initial::averageable(&model).map_err(|e| anyhow::anyhow!("{}: {e}", self.path.display()))?;
        Ok(model)
    }
}

#[cfg(test)]
mod tests {
    use flare_protocols::model::{DType, Tensor};

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
            e.contains("has tensor \"steps\" of I64: flare-node averages F32 and F64 tensors only"),
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

    /// `JOB` with its model from `from`, member `a` running a script and `b` the built-in
    /// add-one learner; `extra` goes into `[model]`.
    fn from_job(from: &str, extra: &str) -> String {
        JOB.replace(
            "file = \"init.safetensors\"\n",
            &format!("from = {from:?}\n{extra}\n[[member]]\nname = \"b\"\n"),
        )
        .replace(
            "name = \"a\"\n",
            "name = \"a\"\ncommand = [\"python3\", \"train.py\"]\n",
        )
    }

    #[test]
    fn a_model_from_a_member_names_a_client_that_runs_its_own_code() {
        let parse = |text: &str| Topology::parse(Path::new("j"), text).map_err(|e| e.to_string());
        let t = parse(&from_job("a", "")).expect("from a script");
        assert_eq!(t.model.from.as_deref(), Some("a"));
        assert!(t.model.file.is_none());
        // Part of the job: another giver is another job.
        let b_scripted = from_job("b", "").replace("name = \"b\"\n", "name = \"b\"\ncommand = [\"x\"]\n");
        assert_ne!(
            parse(&b_scripted).expect("b").spec_hash(),
            parse(&b_scripted.replace("from = \"b\"", "from = \"a\""))
                .expect("a")
                .spec_hash()
        );
        // A submitted job may take its model from a member (the sites' registered learner).
        let registered = JOB
            .replace("file = \"init.safetensors\"", "from = \"a\"")
            .replace("kind = \"add-one\"", "kind = \"add-one\"\nregistered = \"py\"");
        assert_eq!(parse(&registered).expect("registered").model.from.as_deref(), Some("a"));

        let e = parse(&from_job("s", "")).expect_err("the controller");
        assert!(
            e.contains("field `model.from`: \"s\" is not a client of this job (clients: a, b)"),
            "{e}"
        );
        let e = parse(&from_job("nobody", "")).expect_err("unknown");
        assert!(e.contains("\"nobody\" is not a client"), "{e}");
        let e = parse(&from_job("b", "")).expect_err("built-in");
        assert!(
            e.contains("\"b\" runs the built-in \"add-one\" learner, which has no model of its own"),
            "{e}"
        );
        let e = parse(&from_job("a", "tensors = 3\n")).expect_err("seeded");
        assert!(e.contains("field `model.tensors`: does not apply with `from`"), "{e}");
        let e = parse(&from_job("a", "file = \"x.safetensors\"\n")).expect_err("both");
        assert!(e.contains("field `model.from`: does not apply with `file`"), "{e}");
        let e = parse(&from_job("a", "").replace("kind = \"add-one\"", "kind = \"mlp\"")).expect_err("mlp");
        assert!(
            e.contains("field `model.from`: the \"mlp\" learner's network is fixed by its code"),
            "{e}"
        );
    }
}
