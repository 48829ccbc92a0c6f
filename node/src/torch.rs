//! The `tch` learners of topologies (`kind = "tch-mlp"`, `"tch-cnn"`): present only in builds
//! with the `torch` feature, a clear error otherwise.

use std::sync::Arc;

use flare_actors::learner::recipe::DigitsRecipe;

use crate::topology::Topology;

/// The digits recipe of a topology whose learner is a `tch` network.
#[cfg(feature = "torch")]
pub fn recipe(topo: &Topology) -> anyhow::Result<Arc<dyn DigitsRecipe>> {
    use flare_actors::learner::torch::{BaseSpec, FineTuneSpec, TchSpec};

    use crate::topology::LearnerSpec;
    let LearnerSpec::Tch {
        arch,
        lr,
        epochs,
        batch_size,
        finetune,
        trainable,
    } = &topo.learner
    else {
        anyhow::bail!("{}: not a tch learner", topo.path.display());
    };
    Ok(Arc::new(TchSpec {
        arch: arch.clone(),
        lr: *lr,
        batch_size: *batch_size,
        epochs: *epochs,
        seed: topo.model.seed,
        // The base is pretrained on the training rows of the job's own split, so the test
        // rows stay unseen.
        finetune: finetune.clone().map(|method| FineTuneSpec {
            method,
            base: BaseSpec::digits_0_to_4(topo.data.seed, topo.data.test_fraction),
        }),
        trainable: trainable.clone(),
    }))
}

/// Without the `torch` feature there are no `tch` learners.
#[cfg(not(feature = "torch"))]
pub fn recipe(topo: &Topology) -> anyhow::Result<Arc<dyn DigitsRecipe>> {
    anyhow::bail!(
        "{}: tch learners need flare-node built with `--features torch` (see scripts/install-libtorch.sh)",
        topo.path.display()
    )
}

/// Shares the machine's cores among the members that `sim` trains at once in its one process:
/// each libtorch operation gets `cores / members` threads, at least one. With libtorch's default
/// (a thread per core for every operation) the members' operations spin against each other,
/// and the tch topologies ran 1.7-2.5 times slower (docs/client-api.md). An explicit
/// `OMP_NUM_THREADS` is left to rule. Returns the threads set, if any.
#[cfg(feature = "torch")]
pub fn share_threads(members: usize) -> Option<usize> {
    if std::env::var_os("OMP_NUM_THREADS").is_some() {
        return None;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cores / members.max(1)).max(1);
    tch::set_num_threads(i32::try_from(threads).unwrap_or(1));
    Some(threads)
}

/// Without the `torch` feature there is no libtorch to share.
#[cfg(not(feature = "torch"))]
pub fn share_threads(_members: usize) -> Option<usize> {
    None
}
