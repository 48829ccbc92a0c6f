use std::collections::BTreeMap;

use flare_protocols::ctl::{JobId, TaskKind, Value};
use flare_protocols::split::{Backward, Forward};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::*;
use crate::data::digits;
use crate::learner::{Learner, TaskContext};
use crate::learner::{Mlp, MlpConfig, NamedTensor};

fn spec(parties: usize, bottom: Vec<usize>, top: Vec<usize>) -> SplitSpec {
    SplitSpec {
        parties,
        bottom,
        top,
        lr: 0.3,
        batch_size: 24,
        epochs: 1,
        seed: 7,
    }
}

/// The split network as one dense [`Mlp`] on all 64 pixels: each bottom layer becomes a
/// block-diagonal layer (party `p`'s units see only party `p`'s inputs), the top is copied.
fn joined(net: &CentralSplit, data: &VerticalDigits, spec: &SplitSpec) -> Mlp {
    let p_count = spec.parties;
    let mut hidden: Vec<usize> = spec.bottom.iter().map(|w| w * p_count).collect();
    hidden.extend(&spec.top);
    let mut cfg = MlpConfig::new(64, hidden.clone(), 10);
    cfg.learning_rate = spec.lr;
    cfg.batch_size = spec.batch_size;
    let mut mlp = Mlp::new(cfg, 0).expect("mlp");
    let mut params = Vec::new();
    let mut inputs = 64;
    for (l, &w) in spec.bottom.iter().enumerate() {
        let (out, width_in) = (w * p_count, inputs);
        let mut weight = NamedTensor::zeros(format!("layers.{l}.weight"), vec![out, width_in]);
        let mut bias = NamedTensor::zeros(format!("layers.{l}.bias"), vec![out]);
        for (p, b) in net.bottoms.iter().enumerate() {
            let (bw, bb) = b.layer(l).expect("layer");
            let in_p = bw.len() / w;
            for j in 0..w {
                bias.values[p * w + j] = bb[j];
                for k in 0..in_p {
                    let col = if l == 0 {
                        data.parties[p].pixels[k]
                    } else {
                        p * spec.bottom[l - 1] + k
                    };
                    weight.values[(p * w + j) * width_in + col] = bw[j * in_p + k];
                }
            }
        }
        params.extend([weight, bias]);
        inputs = out;
    }
    let offset = spec.bottom.len();
    for t in net.top.net().params("") {
        let (i, rest) = t
            .name
            .strip_prefix("layers.")
            .and_then(|s| s.split_once('.'))
            .expect("name");
        let i: usize = i.parse().expect("index");
        params.push(NamedTensor {
            name: format!("layers.{}.{rest}", i + offset),
            ..t
        });
    }
    mlp.set_params(&params).expect("set_params");
    mlp
}

fn close(a: f32, b: f32) -> bool {
    (a - b).abs() <= 1e-5 * (1.0 + a.abs().max(b.abs()))
}

/// Whether the split network's weights equal the on-block weights of `mlp`.
fn same_weights(net: &CentralSplit, mlp: &Mlp, data: &VerticalDigits, spec: &SplitSpec) -> Result<(), String> {
    let expected = joined(net, data, spec).params();
    let got = mlp.params();
    for (e, g) in expected.iter().zip(&got) {
        assert_eq!(e.name, g.name);
        let l: usize = e.name["layers.".len()..]
            .split('.')
            .next()
            .and_then(|s| s.parse().ok())
            .expect("l");
        for (k, (&ev, &gv)) in e.values.iter().zip(&g.values).enumerate() {
            // Off-block weights of a bottom layer are not part of the split network.
            let off_block = l < spec.bottom.len() && e.name.ends_with("weight") && ev == 0.0;
            if !off_block && !close(ev, gv) {
                return Err(format!("{}[{k}]: split {ev}, joined {gv}", e.name));
            }
        }
    }
    Ok(())
}

#[test]
fn split_network_forward_and_sgd_step_equal_the_joined_mlp() {
    for (parties, bottom, top) in [(1, vec![12], vec![]), (2, vec![8], vec![]), (2, vec![8, 6], vec![7])] {
        let spec = spec(parties, bottom, top);
        let data = VerticalDigits::deal(parties, 0.2, 0).expect("deal");
        let mut net = CentralSplit::new(&spec, &data).expect("net");
        let ids: Vec<usize> = data.label.train[..spec.batch_size].to_vec();
        let rows = digits().expect("digits").subset(&ids).expect("subset");
        let mut mlp = joined(&net, &data, &spec);
        // Forward: the same loss on the same batch.
        let split_loss = net.score(&data, &ids).expect("score").loss / ids.len() as f64;
        let mlp_loss = mlp.evaluate(&rows).expect("evaluate").loss;
        assert!((split_loss - mlp_loss).abs() < 1e-5, "{split_loss} vs {mlp_loss}");
        // One SGD step on the whole batch: the same new weights.
        net.train_batch(&data, &ids, spec.lr).expect("step");
        let stats = mlp.train(&rows, 1, &mut ChaCha8Rng::seed_from_u64(1)).expect("train");
        assert_eq!(stats.steps, 1);
        same_weights(&net, &mlp, &data, &spec).expect("same weights after one step");
        // The comparison can fail: one more step on the split side alone is caught.
        net.train_batch(&data, &ids, spec.lr).expect("step");
        assert!(
            same_weights(&net, &mlp, &data, &spec).is_err(),
            "a second step went unnoticed"
        );
    }
}

fn ctx(task: TaskKind) -> TaskContext {
    TaskContext {
        job: JobId("split".into()),
        member: "data-0".into(),
        task,
        round: 0,
        props: BTreeMap::new(),
    }
}

fn forward(ids: &[usize], step: u64, train: bool, inline_max: u64) -> TaskContext {
    ctx(TaskKind::SplitForward(Forward {
        rows: wire::row_ids(ids).expect("ids"),
        step,
        train,
        inline_max,
    }))
}

fn backward(step: u64, lr: f64, gradient: Option<Vec<f32>>) -> TaskContext {
    ctx(TaskKind::SplitBackward(Backward { step, lr, gradient }))
}

/// Runs the exchange in one process, through the data parties' `run_task` and the wire
/// encodings, inline or as models: the weights equal the central network's to the bit.
#[test]
fn steps_through_the_data_party_learners_equal_the_central_steps_bit_for_bit() {
    for inline_max in [wire::DEFAULT_INLINE_MAX as u64, 0] {
        let spec = spec(2, vec![8], vec![6]);
        let data = VerticalDigits::deal(2, 0.2, 0).expect("deal");
        let mut central = CentralSplit::new(&spec, &data).expect("net");
        let mut top = spec.top_net().expect("top");
        let mut parties: Vec<SplitDataParty> = data
            .parties
            .iter()
            .enumerate()
            .map(|(p, f)| SplitDataParty::new(&spec, p, f.clone()).expect("party"))
            .collect();
        for (step, ids) in spec.epoch_batches(&data.label.train, 0).iter().take(5).enumerate() {
            let step = step as u64;
            let fwd = forward(ids, step, true, inline_max);
            let acts: Vec<Vec<f32>> = parties
                .iter_mut()
                .map(|p| {
                    let r = p.run_task(None, &fwd).expect("forward");
                    match (r.values.get(wire::ACTIVATIONS), r.model) {
                        (Some(Value::Bytes(b)), None) => wire::f32s(b).expect("f32s"),
                        (None, Some(m)) => wire::matrix_of(&m, wire::ACTIVATIONS, ids.len(), 8).expect("matrix"),
                        other => panic!("unexpected reply {other:?}"),
                    }
                })
                .collect();
            let labels = data.label.labels_of(ids).expect("labels");
            let (_, grads) = top.train_batch(&acts, &labels, spec.lr).expect("top");
            for (p, g) in parties.iter_mut().zip(grads) {
                let (input, inline) = if inline_max == 0 {
                    (
                        Some(wire::matrix_model(wire::GRADIENT, ids.len(), 8, &g).expect("model")),
                        None,
                    )
                } else {
                    (None, Some(g))
                };
                p.run_task(input, &backward(step, f64::from(spec.lr), inline))
                    .expect("backward");
            }
            central.train_batch(&data, ids, spec.lr).expect("central");
        }
        for (p, b) in parties.iter().zip(&central.bottoms) {
            assert_eq!(p.bottom(), b);
        }
        assert_eq!(top.net(), central.top.net());
    }
}

#[test]
fn the_data_party_refuses_bad_steps() {
    let spec = spec(2, vec![4], vec![]);
    let data = VerticalDigits::deal(2, 0.2, 0).expect("deal");
    let mut party = SplitDataParty::new(&spec, 0, data.parties[0].clone()).expect("party");
    // Ragged row ids or gradient bytes can no longer be sent: the typed steps carry `u32`s
    // and `f32`s, and a malformed message is refused by the control codec.
    let good = || Some(vec![0.0; 8]);
    let e = party
        .run_task(None, &backward(0, 0.1, good()))
        .expect_err("no forward yet");
    assert!(e.contains("without a training forward"), "{e}");
    let e = party
        .run_task(None, &forward(&[1797], 0, true, 1 << 20))
        .expect_err("id past the end");
    assert!(e.contains("past the end"), "{e}");
    assert!(
        party.run_task(None, &forward(&[], 0, true, 1 << 20)).is_err(),
        "no rows"
    );
    let too_many = vec![0; wire::MAX_ROWS + 1];
    assert!(
        party.run_task(None, &forward(&too_many, 0, true, 1 << 20)).is_err(),
        "too many rows"
    );
    for (step, lr, grad, why) in [
        (1, 0.1, good(), "step 1"),
        (0, 0.1, Some(vec![0.0; 7]), "7 values"),
        (0, 0.1, Some(vec![f32::NAN; 8]), "not finite"),
        (0, 0.1, None, "inline or as the input"),
        (0, -0.1, good(), "not a positive number"),
        (0, f64::NAN, good(), "not a positive number"),
    ] {
        party
            .run_task(None, &forward(&[1, 2], 0, true, 1 << 20))
            .expect("forward");
        let before = party.bottom().clone();
        let e = party.run_task(None, &backward(step, lr, grad)).expect_err(why);
        assert!(e.contains(why), "{e}");
        assert_eq!(party.bottom(), &before, "a refused gradient changes nothing");
    }
    assert!(
        party
            .train(flare_protocols::model::Model::new(), &ctx(TaskKind::Train))
            .is_err()
    );
    assert!(party.run_task(None, &ctx(TaskKind::Embed)).is_err());
    assert!(party.local_model().is_some());
}

#[test]
fn central_baseline_learns_the_vertically_split_digits() {
    let spec = SplitSpec {
        batch_size: 32,
        lr: 0.1,
        epochs: 8,
        ..spec(2, vec![16], vec![])
    };
    let data = VerticalDigits::deal(2, 0.2, 0).expect("deal");
    let evals = central_baseline(&spec, &data, 256).expect("baseline");
    let last = evals.last().expect("epochs");
    eprintln!("central split baseline: {evals:?}");
    assert!(last.test_accuracy >= 0.9, "{last:?}");
    assert!(last.test_loss < evals[0].test_loss);
}
