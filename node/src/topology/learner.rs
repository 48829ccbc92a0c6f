//! The `[learner]` section: which learner every client runs, and for `tch` learners the
//! network and how it is fine-tuned.

use std::time::Duration;

use super::schema::RawLearner;
use super::{Fail, LearnerSpec, TopologyError};

/// The `[learner]` table of a training workflow.
pub(super) fn learner_spec(l: RawLearner, fail: &Fail<'_>) -> Result<LearnerSpec, TopologyError> {
    if !matches!(l.kind.get_ref().as_str(), "tch-mlp" | "tch-cnn") {
        let set = [
            ("learner.finetune", l.finetune.as_ref().map(|v| v.span().start)),
            ("learner.lora_rank", l.lora_rank.as_ref().map(|v| v.span().start)),
            ("learner.lora_alpha", l.lora_alpha.as_ref().map(|v| v.span().start)),
            ("learner.trainable", l.trainable.as_ref().map(|v| v.span().start)),
        ];
        if let Some((field, Some(at))) = set.into_iter().find(|(_, at)| at.is_some()) {
            return Err(fail(
                at,
                field,
                format!(
                    "fine-tuning is for the \"tch-mlp\" and \"tch-cnn\" learners, not {:?}",
                    l.kind.get_ref()
                ),
            ));
        }
    }
    Ok(match l.kind.get_ref().as_str() {
        "add-one" => LearnerSpec::AddOne {
            delay: match &l.delay_secs {
                None => Duration::ZERO,
                Some(d) if d.get_ref().is_finite() && *d.get_ref() >= 0.0 => Duration::from_secs_f64(*d.get_ref()),
                Some(d) => {
                    return Err(fail(
                        d.span().start,
                        "learner.delay_secs",
                        format!("{} is not a number of seconds >= 0", d.get_ref()),
                    ));
                }
            },
        },
        "mlp" => LearnerSpec::Mlp {
            hidden: l.hidden,
            lr: l.lr,
            epochs: l.epochs,
            batch_size: l.batch_size,
        },
        "tch-mlp" => tch_learner(false, l, fail)?,
        "tch-cnn" => tch_learner(true, l, fail)?,
        other => {
            return Err(fail(
                l.kind.span().start,
                "learner.kind",
                format!("unknown learner {other:?} (known: \"add-one\", \"mlp\", \"tch-mlp\", \"tch-cnn\")"),
            ));
        }
    })
}

/// The `[learner]` table of a `tch` learner: the network, and how it is fine-tuned.
fn tch_learner(cnn: bool, l: RawLearner, fail: &Fail<'_>) -> Result<LearnerSpec, TopologyError> {
    use flare_actors::learner::torch::{BaseSpec, FineTune, FineTuneSpec, MAX_LORA_RANK, TchArch, TchSpec};
    let kind = if cnn { "tch-cnn" } else { "tch-mlp" };
    let arch = if cnn {
        TchArch::Cnn { channels: l.channels }
    } else {
        TchArch::Mlp { hidden: l.hidden }
    };
    let finetune = match &l.finetune {
        None => None,
        Some(f) => Some(match f.get_ref().as_str() {
            "full" => FineTune::Full,
            "lora" => {
                let rank = l.lora_rank.as_ref().map_or(4, |r| *r.get_ref());
                if rank == 0 || rank > MAX_LORA_RANK {
                    let at = l.lora_rank.as_ref().map_or(f.span().start, |r| r.span().start);
                    return Err(fail(
                        at,
                        "learner.lora_rank",
                        format!("{rank} is not between 1 and {MAX_LORA_RANK}"),
                    ));
                }
                let alpha = match &l.lora_alpha {
                    None => rank as f64,
                    Some(a) if a.get_ref().is_finite() && *a.get_ref() > 0.0 => *a.get_ref(),
                    Some(a) => {
                        return Err(fail(
                            a.span().start,
                            "learner.lora_alpha",
                            format!("{} is not a number > 0", a.get_ref()),
                        ));
                    }
                };
                FineTune::Lora { rank, alpha }
            }
            other => {
                return Err(fail(
                    f.span().start,
                    "learner.finetune",
                    format!("unknown fine-tuning {other:?} (known: \"full\", \"lora\")"),
                ));
            }
        }),
    };
    let lora = matches!(finetune, Some(FineTune::Lora { .. }));
    for (field, set) in [
        ("learner.lora_rank", l.lora_rank.as_ref().map(|v| v.span().start)),
        ("learner.lora_alpha", l.lora_alpha.as_ref().map(|v| v.span().start)),
    ] {
        if let (false, Some(at)) = (lora, set) {
            return Err(fail(at, field, "LoRA options need finetune = \"lora\"".into()));
        }
    }
    let trainable = l.trainable.map(|t| (t.span().start, t.into_inner()));
    // The patterns must name tensors of this network (the names need no libtorch).
    let probe = TchSpec {
        arch: arch.clone(),
        lr: f64::from(l.lr),
        batch_size: l.batch_size,
        epochs: l.epochs,
        seed: 0,
        finetune: finetune.clone().map(|method| FineTuneSpec {
            method,
            base: BaseSpec::digits_0_to_4(0, 0.2),
        }),
        trainable: trainable.as_ref().map(|(_, t)| t.clone()),
    };
    if let (Some((at, _)), Err(e)) = (&trainable, probe.trainable_names()) {
        return Err(fail(*at, "learner.trainable", e));
    }
    if !cfg!(feature = "torch") {
        return Err(fail(
            l.kind.span().start,
            "learner.kind",
            format!("learner {kind:?} needs a build with `--features torch` (see scripts/install-libtorch.sh)"),
        ));
    }
    Ok(LearnerSpec::Tch {
        arch,
        lr: f64::from(l.lr),
        epochs: l.epochs,
        batch_size: l.batch_size,
        finetune,
        trainable: trainable.map(|(_, t)| t),
    })
}
