//! `[fedavg]`'s optional keys on which clients a round asks and which checkpoints stay:
//! `clients_per_round` or `fraction` (with `sample_seed`), `keep_checkpoints`, and
//! `best_metric` with `best_mode`.

use flare_actors::job::{Best, CheckpointPolicy, DEFAULT_KEEP, Sampling};

use super::schema::RawFedAvg;
use super::{Fail, TopologyError};

/// The sample of clients each round asks, if the table asks for one.
pub(super) fn sampling(
    f: &RawFedAvg,
    clients: usize,
    min_clients: usize,
    fail: &Fail<'_>,
) -> Result<Option<Sampling>, TopologyError> {
    let per_round = match (&f.clients_per_round, &f.fraction) {
        (Some(n), Some(_)) => {
            return Err(fail(
                n.span().start,
                "fedavg.clients_per_round",
                "give either `clients_per_round` or `fraction`, not both".into(),
            ));
        }
        (Some(n), None) => {
            let k = *n.get_ref();
            if k == 0 || k > clients {
                return Err(fail(
                    n.span().start,
                    "fedavg.clients_per_round",
                    format!("{k} is not between 1 and the {clients} clients"),
                ));
            }
            (k, n.span().start, "fedavg.clients_per_round")
        }
        (None, Some(fr)) => {
            let v = *fr.get_ref();
            if !(v > 0.0 && v <= 1.0) {
                return Err(fail(
                    fr.span().start,
                    "fedavg.fraction",
                    format!("{v} is not a fraction in (0, 1]"),
                ));
            }
            // At least one client; a share of clients rounds up, as Flower's does.
            let k = ((v * clients as f64).ceil() as usize).clamp(1, clients);
            (k, fr.span().start, "fedavg.fraction")
        }
        (None, None) => {
            if let Some(s) = &f.sample_seed {
                return Err(fail(
                    s.span().start,
                    "fedavg.sample_seed",
                    "a seed needs `clients_per_round` or `fraction`".into(),
                ));
            }
            return Ok(None);
        }
    };
    let (k, at, field) = per_round;
    if k < min_clients {
        return Err(fail(
            at,
            field,
            format!("asks {k} clients a round, fewer than min_clients = {min_clients}"),
        ));
    }
    Ok(Some(Sampling {
        clients_per_round: k,
        seed: f.sample_seed.as_ref().map_or(0, |s| *s.get_ref()),
    }))
}

/// Which checkpoints stay.
pub(super) fn checkpoints(f: &RawFedAvg, fail: &Fail<'_>) -> Result<CheckpointPolicy, TopologyError> {
    let keep = match &f.keep_checkpoints {
        Some(k) if *k.get_ref() == 0 => {
            return Err(fail(
                k.span().start,
                "fedavg.keep_checkpoints",
                "must be at least 1 (the last round's model)".into(),
            ));
        }
        Some(k) => *k.get_ref(),
        None => DEFAULT_KEEP,
    };
    let higher_is_better = match &f.best_mode {
        None => true,
        Some(m) => match m.get_ref().as_str() {
            "max" => true,
            "min" => false,
            other => {
                return Err(fail(
                    m.span().start,
                    "fedavg.best_mode",
                    format!("{other:?} is neither \"max\" nor \"min\""),
                ));
            }
        },
    };
    let best = match (&f.best_metric, &f.best_mode) {
        (Some(m), _) => Some(Best {
            metric: m.get_ref().clone(),
            higher_is_better,
        }),
        (None, Some(m)) => {
            return Err(fail(
                m.span().start,
                "fedavg.best_mode",
                "a mode needs `best_metric`".into(),
            ));
        }
        (None, None) => None,
    };
    Ok(CheckpointPolicy { keep, best })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::super::Topology;

    /// A FedAvg job of ten clients with `extra` in its `[fedavg]` table.
    fn with(extra: &str) -> Result<Topology, String> {
        let mut t = format!(
            "[job]\nname = \"t\"\nworkflow = \"fedavg\"\ncontroller = \"s\"\n\n\
             [fedavg]\nrounds = 2\nmin_clients = 2\n{extra}\n\n[learner]\nkind = \"add-one\"\n\n\
             [[member]]\nname = \"s\"\n"
        );
        for i in 0..10 {
            t.push_str(&format!("[[member]]\nname = \"c{i}\"\n"));
        }
        Topology::parse(Path::new("t.toml"), &t).map_err(|e| e.to_string())
    }

    #[test]
    fn sampling_takes_a_count_or_a_fraction_rounded_up() {
        assert_eq!(with("").expect("plain").sample, None);
        let s = with("clients_per_round = 3\nsample_seed = 9")
            .expect("count")
            .sample
            .expect("sample");
        assert_eq!((s.clients_per_round, s.seed), (3, 9));
        let s = with("fraction = 0.25").expect("fraction").sample.expect("sample");
        assert_eq!((s.clients_per_round, s.seed), (3, 0));
    }

    #[test]
    fn bad_sampling_and_checkpoint_keys_are_named() {
        for (extra, says) in [
            ("clients_per_round = 3\nfraction = 0.5", "not both"),
            ("clients_per_round = 11", "between 1 and the 10 clients"),
            ("clients_per_round = 1", "fewer than min_clients = 2"),
            ("fraction = 1.5", "not a fraction"),
            ("fraction = 0.1", "fewer than min_clients"),
            ("sample_seed = 3", "needs `clients_per_round` or `fraction`"),
            ("keep_checkpoints = 0", "at least 1"),
            ("best_mode = \"min\"", "needs `best_metric`"),
            (
                "best_metric = \"loss\"\nbest_mode = \"lowest\"",
                "neither \"max\" nor \"min\"",
            ),
        ] {
            let e = with(extra).expect_err(extra);
            assert!(e.contains(says) && e.contains("line "), "{extra}: {e}");
        }
    }

    #[test]
    fn checkpoints_default_to_the_last_three_and_take_a_best_metric() {
        let p = with("").expect("plain").checkpoints;
        assert_eq!((p.keep, p.best), (3, None));
        let p = with("keep_checkpoints = 5\nbest_metric = \"loss\"\nbest_mode = \"min\"")
            .expect("best")
            .checkpoints;
        let best = p.best.expect("best");
        assert_eq!(
            (p.keep, best.metric.as_str(), best.higher_is_better),
            (5, "loss", false)
        );
    }
}
