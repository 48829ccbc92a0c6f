//! What every member derives from a topology alone, identically: the learner each member
//! runs, the initial model, the dealt data, and the add-one check. A job on standing sites
//! that names a dataset is the exception: each site reads its own rows of it instead.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use flare_actors::data::{Dataset, RowShape, read_csv};
use flare_actors::job::{AddOne, Learner};
use flare_actors::learner::Paced;
use flare_actors::learner::digits::{DigitsFederation, MlpSpec};
use flare_actors::learner::external::{ExternalConfig, ExternalLearner};
use flare_actors::learner::inference::InferenceSpec;
use flare_actors::learner::recipe::DigitsRecipe;
use flare_actors::learner::split::{SplitDataParty, SplitSpec, VerticalDigits};
use flare_protocols::model::{DType, Model};

use crate::topology::{ExternalSpec, LearnerSpec, ModelSpec, SiteData, Topology, Workflow};

/// The add-one job's values: seeded fractional numbers, so exactness means something.
pub(super) fn add_one_values(seed: u64) -> impl FnMut() -> f32 {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        (x % 2_000_001) as f32 / 1000.0 - 1000.0
    }
}

/// The add-one job's initial model, built in place (one buffer however large).
pub fn add_one_model(spec: &ModelSpec) -> anyhow::Result<Model> {
    let mut m = Model::zeros((0..spec.tensors).map(|t| (format!("tensor.{t:04}"), DType::F32, vec![spec.elements])))?;
    let mut next = add_one_values(spec.seed);
    m.map_f32(|_| next());
    Ok(m)
}

/// Whether every weight of `model` is the initial value plus `rounds`, computed as the
/// clients do (adding 1.0 in f32, round after round), without a second copy of the model
/// (but for a model file, which is read again).
pub(crate) fn add_one_exact(model: &super::JobModel, spec: &ModelSpec, rounds: u32) -> bool {
    let model = match model {
        super::JobModel::Memory(m) => m,
        super::JobModel::Stored { store, blob, layout } => {
            // A model file's job is read into memory; only a seeded one is this large.
            return spec.file.is_none() && super::stored::add_one_exact_stored(store, *blob, layout, spec, rounds);
        }
    };
    if let Some(file) = &spec.file {
        return file.load().is_ok_and(|initial| added(&initial, model, rounds));
    }
    let names: Vec<String> = (0..spec.tensors).map(|t| format!("tensor.{t:04}")).collect();
    if model.len() != names.len() {
        return false;
    }
    let mut next = add_one_values(spec.seed);
    names.iter().all(|name| {
        model.get(name).is_some_and(|t| {
            t.shape() == [spec.elements]
                && t.data().chunks_exact(4).all(|b| {
                    f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() == plus_ones(next(), rounds).to_bits()
                })
        })
    })
}

/// `v` after `rounds` add-one rounds, added one at a time in f32 as the clients do (not
/// `v + rounds`, which rounds differently for large values).
pub(super) fn plus_ones(v: f32, rounds: u32) -> f32 {
    (0..rounds).fold(v, |w, _| w + 1.0)
}

/// Whether `model` has the tensors of `initial` with every f32 weight `rounds` more (added
/// one at a time, in f32), and the weights of other dtypes as they were (the add-one learner
/// adds to f32 weights only).
fn added(initial: &Model, model: &Model, rounds: u32) -> bool {
    model.len() == initial.len()
        && initial.iter().all(|(name, t)| {
            model.get(name).is_some_and(|m| {
                m.dtype() == t.dtype()
                    && m.shape() == t.shape()
                    && match t.dtype() {
                        DType::F32 => t.data().chunks_exact(4).zip(m.data().chunks_exact(4)).all(|(a, b)| {
                            let start = f32::from_le_bytes([a[0], a[1], a[2], a[3]]);
                            f32::from_le_bytes([b[0], b[1], b[2], b[3]]).to_bits() == plus_ones(start, rounds).to_bits()
                        }),
                        _ => m.data() == t.data(),
                    }
            })
        })
}

/// The rows a digits job learns from, as this process holds them.
#[derive(Clone, Debug)]
pub enum DigitsData {
    /// The shipped digits dealt over every client, the same in every process (`sim`, `run`):
    /// every shard and the common test set.
    Dealt(DigitsFederation),
    /// One site's own rows of a named dataset (a job on standing sites): its member's whole
    /// shard, and its held-out test rows when it has some. The other sites' rows are not here.
    Site {
        /// The rows this site's member trains on (and cuts its validation rows from).
        shard: Dataset,
        /// The rows the global model is measured on here, if any.
        test: Option<Dataset>,
    },
}

impl DigitsData {
    /// Client `i`'s shard: its share of the deal, or this site's rows (a site runs one
    /// member, its own).
    pub fn shard(&self, i: usize) -> Option<&Dataset> {
        match self {
            DigitsData::Dealt(fed) => fed.shards.get(i),
            DigitsData::Site { shard, .. } => Some(shard),
        }
    }

    /// The rows the global model is measured on, when this process has some.
    pub fn test(&self) -> Option<&Dataset> {
        match self {
            DigitsData::Dealt(fed) => Some(&fed.test),
            DigitsData::Site { test, .. } => test.as_ref(),
        }
    }

    /// Every client's shard, which only a deal has (the local-only baseline trains on each).
    pub fn federation(&self) -> Option<&DigitsFederation> {
        match self {
            DigitsData::Dealt(fed) => Some(fed),
            DigitsData::Site { .. } => None,
        }
    }

    /// This site's rows of a named dataset, read as every digits learner needs them.
    fn site(topo: &Topology, files: &SiteData) -> anyhow::Result<Self> {
        let shape = RowShape::digits();
        let name = topo.data.dataset.as_deref().unwrap_or("?");
        let read = |path: &Path| read_csv(path, &shape).with_context(|| format!("reading dataset {name:?}"));
        Ok(DigitsData::Site {
            shard: read(&files.train)?,
            test: files.test.as_deref().map(read).transpose()?,
        })
    }
}

/// Everything every member derives from the topology alone, identically.
#[derive(Clone)]
pub struct Setup {
    /// The kind of digits model (pure-Rust MLP or `tch`) and its rows.
    pub digits: Option<(Arc<dyn DigitsRecipe>, Arc<DigitsData>)>,
    /// The vertically split data, for split learning.
    pub split: Option<(SplitSpec, Arc<VerticalDigits>)>,
    /// The shipped digits dealt to the members' own code in a job of kind "add-one"
    /// ([`crate::topology::DataSpec::deal_to_scripts`]).
    pub scripts: Option<Arc<DigitsData>>,
}

impl Setup {
    /// Builds the setup of `topo` (deals the data for the digits learner, or reads this
    /// site's rows of the dataset the job names).
    pub fn new(topo: &Topology) -> anyhow::Result<Self> {
        if let (Some(name), None) = (&topo.data.dataset, &topo.data.local) {
            anyhow::bail!(
                "{}: dataset {name} is read from each site's policy: submit this job to standing sites (flare-node submit)",
                topo.path.display()
            );
        }
        match &topo.learner {
            LearnerSpec::AddOne { .. } => Ok(Self {
                digits: None,
                split: None,
                scripts: match topo.data.deal_to_scripts {
                    true => Some(Arc::new(Self::deal(topo)?)),
                    false => None,
                },
            }),
            LearnerSpec::Split => {
                let Workflow::Split(spec) = &topo.workflow else {
                    anyhow::bail!("{}: the split learner needs the split workflow", topo.path.display());
                };
                let d = &topo.data;
                let data = VerticalDigits::deal(spec.parties, d.test_fraction, d.seed)
                    .with_context(|| format!("{}: dealing the digits data", topo.path.display()))?;
                Ok(Self {
                    digits: None,
                    split: Some((spec.clone(), Arc::new(data))),
                    scripts: None,
                })
            }
            LearnerSpec::Mlp {
                hidden,
                lr,
                epochs,
                batch_size,
            } => {
                let mlp = MlpSpec {
                    hidden: hidden.clone(),
                    lr: *lr,
                    batch_size: *batch_size,
                    epochs: *epochs,
                    seed: topo.model.seed,
                };
                match &topo.workflow {
                    // The MLP is the head on the frozen network's embeddings.
                    Workflow::InferenceThenFedAvg(frozen) => Self::digits(
                        topo,
                        Arc::new(InferenceSpec {
                            head: mlp,
                            frozen: frozen.clone(),
                        }),
                    ),
                    _ => Self::digits(topo, Arc::new(mlp)),
                }
            }
            LearnerSpec::Tch { .. } => Self::digits(topo, crate::torch::recipe(topo)?),
        }
    }

    /// The rows of a digits model `recipe`: this site's own when the job names a dataset,
    /// else the shipped digits dealt over the clients.
    fn digits(topo: &Topology, recipe: Arc<dyn DigitsRecipe>) -> anyhow::Result<Self> {
        let data = match &topo.data.local {
            Some(files) => DigitsData::site(topo, files)?,
            None => Self::deal(topo)?,
        };
        Ok(Self {
            digits: Some((recipe, Arc::new(data))),
            split: None,
            scripts: None,
        })
    }

    /// The shipped digits dealt over the clients as `[data]` says.
    fn deal(topo: &Topology) -> anyhow::Result<DigitsData> {
        let d = &topo.data;
        Ok(DigitsData::Dealt(
            DigitsFederation::deal(topo.clients.len(), d.alpha, d.test_fraction, d.seed)
                .with_context(|| format!("{}: dealing the digits data", topo.path.display()))?,
        ))
    }

    /// The initial global model (made afresh on each call, so nobody holds a spare copy): the
    /// topology's model file, the add-one job's seeded tensors, or the digits recipe's network.
    pub fn initial_model(&self, topo: &Topology) -> anyhow::Result<Model> {
        anyhow::ensure!(self.split.is_none(), "split learning starts from no shared model");
        match &self.digits {
            None => match &topo.model.file {
                Some(file) => file.load(),
                None => add_one_model(&topo.model),
            },
            Some((recipe, _)) => recipe.initial_model().map_err(anyhow::Error::msg),
        }
    }

    /// The learner of client `member`.
    /// `work_dir` is where an external learner's socket and model files go (one per member
    /// and job; keep its path short: a Unix socket path has at most ~100 bytes).
    pub fn learner(&self, topo: &Topology, member: &str, work_dir: &Path) -> anyhow::Result<Box<dyn Learner>> {
        if let (Some(name), None) = (&topo.registered_learner, &topo.site_learner) {
            anyhow::bail!(
                "{}: learner {name:?} is registered at each site: submit this job to standing sites (flare-node submit)",
                topo.path.display()
            );
        }
        if let Some(ext) = topo.external.get(member).or(topo.site_learner.as_ref()) {
            return self.external_learner(topo, member, ext, work_dir);
        }
        if let Some((spec, data)) = &self.split {
            let p = topo
                .clients
                .iter()
                .position(|c| c == member)
                .with_context(|| format!("{member} is not a data party"))?;
            let features = data.parties.get(p).context("no features for this party")?.clone();
            return Ok(Box::new(SplitDataParty::new(spec, p, features)?));
        }
        let Some((recipe, fed)) = &self.digits else {
            let delay = match topo.learner {
                LearnerSpec::AddOne { delay } => delay,
                LearnerSpec::Mlp { .. } | LearnerSpec::Split | LearnerSpec::Tch { .. } => std::time::Duration::ZERO,
            };
            // Cross-site evaluation gets its last output from the executor's store.
            return Ok(Box::new(Paced::new(AddOne { num_samples: 1 }, delay)));
        };
        let i = topo
            .clients
            .iter()
            .position(|c| c == member)
            .with_context(|| format!("{member} is not a client"))?;
        let shard = fed.shard(i).context("no shard for this client")?.clone();
        recipe.learner(shard, i).map_err(anyhow::Error::msg)
    }
}

impl Setup {
    /// The external learner of `member`: the command of its topology entry, run with the
    /// job's round timeout per task; with the digits learner it gets its training shard as a
    /// CSV (64 features in [0, 1], then the label) named by `DIGITS_CSV`; on a standing site,
    /// `DIGITS_CSV` and `FLARE_DATASET` name the site's own file for the job's dataset (and
    /// `FLARE_DATASET_TEST` its test rows, when the site has them). Test rows, where there are
    /// some (the common test set of a deal, the site's own), are also named by
    /// `DIGITS_TEST_CSV`. An add-one job's scripts get a deal when it has a `[data]` table.
    fn external_learner(
        &self,
        topo: &Topology,
        member: &str,
        ext: &ExternalSpec,
        work_dir: &Path,
    ) -> anyhow::Result<Box<dyn Learner>> {
        std::fs::create_dir_all(work_dir).with_context(|| format!("creating {}", work_dir.display()))?;
        let mut cfg = ExternalConfig::new(ext.command.clone(), work_dir, member);
        cfg.task_timeout = topo.round_timeout;
        cfg.env = ext.env.clone();
        // On a site, the learner is told where the site's own rows are (it reads them itself).
        if let Some(files) = &topo.data.local {
            cfg.env
                .insert("DIGITS_CSV".into(), files.train.to_string_lossy().into_owned());
            cfg.env
                .insert("FLARE_DATASET".into(), files.train.to_string_lossy().into_owned());
            if let Some(test) = &files.test {
                cfg.env
                    .insert("FLARE_DATASET_TEST".into(), test.to_string_lossy().into_owned());
                cfg.env
                    .insert("DIGITS_TEST_CSV".into(), test.to_string_lossy().into_owned());
            }
        } else if let Some(fed) = self.digits.as_ref().map(|(_, d)| d).or(self.scripts.as_ref()) {
            let i = topo
                .clients
                .iter()
                .position(|c| c == member)
                .with_context(|| format!("{member} is not a client"))?;
            let shard = fed.shard(i).context("no shard for this client")?;
            let path = work_dir.join("train.csv");
            write_csv(shard, &path)?;
            cfg.env.insert("DIGITS_CSV".into(), path.to_string_lossy().into_owned());
            if let Some(test) = fed.test() {
                let path = work_dir.join("test.csv");
                write_csv(test, &path)?;
                cfg.env
                    .insert("DIGITS_TEST_CSV".into(), path.to_string_lossy().into_owned());
            }
        }
        Ok(Box::new(ExternalLearner::new(cfg)?))
    }
}

/// Writes `rows` as the CSV external learners read: 64 features in [0, 1], then the label;
/// no header.
fn write_csv(rows: &Dataset, path: &Path) -> anyhow::Result<()> {
    let mut csv = String::new();
    for (row, label) in rows.features().chunks(rows.dim()).zip(rows.labels()) {
        for v in row {
            csv.push_str(&format!("{v},"));
        }
        csv.push_str(&format!("{label}\n"));
    }
    std::fs::write(path, csv).with_context(|| format!("writing {}", path.display()))
}

pub(crate) fn learner_name(topo: &Topology, setup: &Setup) -> &'static str {
    if let Some((recipe, _)) = &setup.digits {
        return recipe.name();
    }
    match topo.learner {
        LearnerSpec::AddOne { .. } => "add-one",
        LearnerSpec::Split => "split",
        LearnerSpec::Mlp { .. } | LearnerSpec::Tch { .. } => "mlp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = "[job]\nname = \"d\"\nworkflow = \"fedavg\"\ncontroller = \"a\"\nclients = [\"a\", \"b\"]\n\n\
        [fedavg]\nrounds = 1\nmin_clients = 1\n\n[learner]\nkind = \"mlp\"\n\n[data]\ndataset = \"digits\"\n\n\
        [[member]]\nname = \"a\"\n[[member]]\nname = \"b\"\n";

    /// `rows` of the shipped digits as a CSV with a header.
    fn csv(rows: std::ops::Range<usize>) -> String {
        let d = flare_actors::data::digits().expect("digits");
        let mut s = String::from("features...,label\n");
        for r in rows {
            for v in d.row(r).expect("row") {
                s.push_str(&format!("{v},"));
            }
            s.push_str(&format!("{}\n", d.labels()[r]));
        }
        s
    }

    #[test]
    fn a_named_dataset_without_a_site_says_where_it_comes_from() {
        let topo = Topology::parse(Path::new("d.toml"), JOB).expect("job");
        let e = Setup::new(&topo).err().expect("no site data").to_string();
        assert_eq!(
            e,
            "d.toml: dataset digits is read from each site's policy: submit this job to standing sites (flare-node submit)"
        );
    }

    #[test]
    fn a_site_trains_on_its_own_rows_and_measures_on_its_test_rows() {
        let dir = tempfile::tempdir().expect("tmp");
        let (train, test) = (dir.path().join("train.csv"), dir.path().join("test.csv"));
        std::fs::write(&train, csv(0..40)).expect("write");
        std::fs::write(&test, csv(100..130)).expect("write");
        let mut topo = Topology::parse(Path::new("d.toml"), JOB).expect("job");
        topo.data.local = Some(SiteData {
            train: train.clone(),
            test: None,
        });
        let setup = Setup::new(&topo).expect("site rows");
        let (_, data) = setup.digits.as_ref().expect("digits");
        assert!(data.federation().is_none() && data.test().is_none());
        // Whichever client this site is, its learner trains on this site's rows.
        assert_eq!(data.shard(1).map(Dataset::len), Some(40));
        setup.learner(&topo, "b", dir.path()).expect("learner");
        topo.data.local = Some(SiteData {
            train: train.clone(),
            test: Some(test),
        });
        let setup = Setup::new(&topo).expect("site rows");
        assert_eq!(
            setup.digits.as_ref().and_then(|(_, d)| d.test()).map(Dataset::len),
            Some(30)
        );
        std::fs::write(&train, "0,0,1\n").expect("write");
        let e = format!("{:#}", Setup::new(&topo).err().expect("narrow rows"));
        assert!(
            e.contains("reading dataset \"digits\"")
                && e.contains(&format!("{}: line 1: 2 features then a label", train.display()))
                && e.contains("reads 64 features per row"),
            "{e}"
        );
    }
}
