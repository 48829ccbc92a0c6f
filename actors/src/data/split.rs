//! Seeded splits: the held-out test set, and the Dirichlet(α) non-IID partition over members.
//!
//! Both use ChaCha8 seeded from a `u64` (not `StdRng`, whose algorithm rand may change between
//! versions), so a topology's seed gives the same split in `sim`, in `run` and in every test.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Gamma};

use super::{DataError, Dataset};

/// How many times [`dirichlet_partition`] redraws before it tops up small members by hand.
const MAX_DRAWS: usize = 100;

/// Row indices of a train/test split, each list sorted ascending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    /// Rows to train on (to be partitioned over members).
    pub train: Vec<usize>,
    /// Held-out rows that measure every model.
    pub test: Vec<usize>,
}

/// Indices of `items` grouped by label, ascending within each class.
fn by_class(labels: &[u8], classes: usize) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); classes];
    for (i, &l) in labels.iter().enumerate() {
        if let Some(g) = groups.get_mut(usize::from(l)) {
            g.push(i);
        }
    }
    groups
}

/// A seeded stratified split of `data`'s rows: in each class, `round(test_fraction × count)` rows,
/// chosen at random, go to the test set and the rest to training.
///
/// Stratifying keeps the held-out set's class mix equal to the whole's, so accuracy on it compares
/// models fairly however skewed the members' shards are.
pub fn split_indices(data: &Dataset, test_fraction: f64, seed: u64) -> Result<Split, DataError> {
    if !(test_fraction > 0.0 && test_fraction < 1.0) {
        return Err(DataError::InvalidParameter(format!(
            "test fraction {test_fraction} is not in (0, 1)"
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut train = Vec::with_capacity(data.len());
    let mut test = Vec::new();
    for mut group in by_class(data.labels(), data.classes()) {
        group.shuffle(&mut rng);
        let n_test = ((group.len() as f64) * test_fraction).round() as usize;
        let (t, rest) = group.split_at(n_test.min(group.len()));
        test.extend_from_slice(t);
        train.extend_from_slice(rest);
    }
    train.sort_unstable();
    test.sort_unstable();
    Ok(Split { train, test })
}

/// [`split_indices`] applied: the `(train, test)` data sets.
pub fn train_test_split(data: &Dataset, test_fraction: f64, seed: u64) -> Result<(Dataset, Dataset), DataError> {
    let split = split_indices(data, test_fraction, seed)?;
    Ok((data.subset(&split.train)?, data.subset(&split.test)?))
}

/// The standard non-IID federated split: partitions the rows of `data` (usually the training set)
/// over `members`, returning each member's row indices into `data`, sorted ascending.
///
/// For each class in turn, its rows are shuffled, proportions `p ~ Dirichlet(α·1_members)` are
/// drawn (as normalised Gamma(α, 1) draws), and the rows are dealt out in contiguous runs of
/// `round(cumsum(p) × count)`. Small α gives each member a few dominant classes; large α gives
/// every member nearly the class mix of the whole. Every row goes to exactly one member.
///
/// Minimum size rule: if some member gets fewer than `min_rows` rows, the whole deal is drawn
/// again from the same random stream, up to 100 times; if that still fails, rows are moved one at
/// a time from the currently largest member (its last-dealt row) to the smallest until every
/// member has `min_rows`. The result depends only on the arguments (the seed included).
///
/// Errors: no members, α not finite and positive, or `members × min_rows` above the row count.
pub fn dirichlet_partition(
    data: &Dataset,
    members: usize,
    alpha: f64,
    min_rows: usize,
    seed: u64,
) -> Result<Vec<Vec<usize>>, DataError> {
    if members == 0 {
        return Err(DataError::InvalidParameter(
            "a partition needs at least one member".into(),
        ));
    }
    if !(alpha.is_finite() && alpha > 0.0) {
        return Err(DataError::InvalidParameter(format!(
            "Dirichlet α must be finite and positive, got {alpha}"
        )));
    }
    if members.saturating_mul(min_rows) > data.len() {
        return Err(DataError::TooFewRows {
            members,
            min: min_rows,
            rows: data.len(),
        });
    }
    let gamma = Gamma::new(alpha, 1.0).map_err(|e| DataError::InvalidParameter(format!("Gamma({alpha}, 1): {e}")))?;
    let groups = by_class(data.labels(), data.classes());
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut parts = deal(&groups, members, &gamma, &mut rng);
    for _ in 1..MAX_DRAWS {
        if parts.iter().all(|p| p.len() >= min_rows) {
            break;
        }
        parts = deal(&groups, members, &gamma, &mut rng);
    }
    top_up(&mut parts, min_rows);
    for p in &mut parts {
        p.sort_unstable();
    }
    Ok(parts)
}

/// One Dirichlet deal of every class's rows over the members (rows in dealing order).
fn deal(groups: &[Vec<usize>], members: usize, gamma: &Gamma<f64>, rng: &mut ChaCha8Rng) -> Vec<Vec<usize>> {
    let mut parts = vec![Vec::new(); members];
    let mut weights = vec![0.0f64; members];
    for group in groups {
        let mut rows = group.clone();
        rows.shuffle(rng);
        for w in &mut weights {
            *w = gamma.sample(rng);
        }
        let total: f64 = weights.iter().sum();
        if !(total.is_finite() && total > 0.0) {
            // Every draw underflowed (only for tiny α): the limit of Dir(α→0) is one member taking all.
            let m = rng.random_range(0..members);
            parts[m].extend_from_slice(&rows);
            continue;
        }
        let n = rows.len();
        let mut start = 0;
        let mut cumulative = 0.0;
        for (m, w) in weights.iter().enumerate() {
            cumulative += w / total;
            let end = if m + 1 == members {
                n
            } else {
                ((cumulative * n as f64).round() as usize).clamp(start, n)
            };
            parts[m].extend_from_slice(&rows[start..end]);
            start = end;
        }
    }
    parts
}

/// Moves rows from the largest member to the smallest until all have `min_rows`.
///
/// Terminates because the caller checked `members × min_rows ≤ rows`: while a member is short,
/// some other member holds more than `min_rows`.
fn top_up(parts: &mut [Vec<usize>], min_rows: usize) {
    loop {
        let Some((small, _)) = parts.iter().enumerate().min_by_key(|(_, p)| p.len()) else {
            return;
        };
        if parts[small].len() >= min_rows {
            return;
        }
        // Largest member, lowest index on ties (max_by_key would pick the last).
        let Some((large, _)) = parts.iter().enumerate().min_by_key(|(_, p)| std::cmp::Reverse(p.len())) else {
            return;
        };
        if parts[large].len() <= min_rows {
            return;
        }
        if let Some(row) = parts[large].pop() {
            parts[small].push(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::digits;

    fn digits_train() -> Dataset {
        let d = digits().expect("digits");
        train_test_split(&d, 0.2, 7).expect("train_test_split").0
    }

    /// Largest share of one class in a member's shard, averaged over members.
    fn mean_max_class_share(data: &Dataset, parts: &[Vec<usize>]) -> f64 {
        let shares: Vec<f64> = parts
            .iter()
            .map(|p| {
                let counts = data.subset(p).expect("subset").class_counts();
                *counts.iter().max().expect("non-empty") as f64 / p.len() as f64
            })
            .collect();
        shares.iter().sum::<f64>() / shares.len() as f64
    }

    #[test]
    fn split_is_stratified_disjoint_and_seeded() {
        let d = digits().expect("digits");
        let s = split_indices(&d, 0.2, 1).expect("split_indices");
        assert_eq!(s.train.len() + s.test.len(), d.len());
        // Rounded per class: 36+36+35+37+36+36+36+36+35+36.
        assert_eq!(s.test.len(), 359);
        let mut all: Vec<usize> = s.train.iter().chain(&s.test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..d.len()).collect::<Vec<_>>());
        let test = d.subset(&s.test).expect("subset");
        for (c, n) in test.class_counts().into_iter().enumerate() {
            let expected = (d.class_counts()[c] as f64 * 0.2).round() as usize;
            assert_eq!(n, expected, "class {c}");
        }
        assert_eq!(split_indices(&d, 0.2, 1).expect("split_indices"), s);
        assert_ne!(split_indices(&d, 0.2, 2).expect("split_indices"), s);
        assert!(split_indices(&d, 0.0, 1).is_err());
        assert!(split_indices(&d, 1.0, 1).is_err());
        assert!(split_indices(&d, f64::NAN, 1).is_err());
    }

    #[test]
    fn partition_covers_every_row_exactly_once() {
        let train = digits_train();
        for &(members, alpha) in &[(1, 0.5), (4, 0.5), (8, 0.1), (3, 100.0)] {
            let parts = dirichlet_partition(&train, members, alpha, 10, 42).expect("dirichlet_partition");
            assert_eq!(parts.len(), members);
            let mut all: Vec<usize> = parts.iter().flatten().copied().collect();
            all.sort_unstable();
            assert_eq!(all, (0..train.len()).collect::<Vec<_>>(), "members {members} α {alpha}");
            assert!(parts.iter().all(|p| p.len() >= 10));
            assert!(parts.iter().all(|p| p.windows(2).all(|w| w[0] < w[1])));
        }
    }

    #[test]
    fn partition_is_deterministic_per_seed() {
        let train = digits_train();
        let a = dirichlet_partition(&train, 4, 0.5, 10, 3).expect("dirichlet_partition");
        assert_eq!(
            a,
            dirichlet_partition(&train, 4, 0.5, 10, 3).expect("dirichlet_partition")
        );
        assert_ne!(
            a,
            dirichlet_partition(&train, 4, 0.5, 10, 4).expect("dirichlet_partition")
        );
    }

    #[test]
    fn small_alpha_skews_large_alpha_balances() {
        let train = digits_train();
        let skewed = mean_max_class_share(
            &train,
            &dirichlet_partition(&train, 4, 0.1, 10, 5).expect("dirichlet_partition"),
        );
        let balanced = mean_max_class_share(
            &train,
            &dirichlet_partition(&train, 4, 100.0, 10, 5).expect("dirichlet_partition"),
        );
        // Whole set: every class is about 10%.
        assert!(balanced < 0.15, "α=100: mean max class share {balanced}");
        assert!(skewed > 0.35, "α=0.1: mean max class share {skewed}");
    }

    #[test]
    fn minimum_rows_are_guaranteed_or_refused() {
        let train = digits_train();
        // Very small α makes near-empty members likely; the rule must still hold.
        for seed in 0..5 {
            let parts = dirichlet_partition(&train, 8, 0.01, 100, seed).expect("dirichlet_partition");
            assert!(parts.iter().all(|p| p.len() >= 100), "seed {seed}");
            assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), train.len());
        }
        let n = train.len();
        assert_eq!(
            dirichlet_partition(&train, 4, 0.5, n / 4 + 1, 0),
            Err(DataError::TooFewRows {
                members: 4,
                min: n / 4 + 1,
                rows: n
            })
        );
        assert!(dirichlet_partition(&train, 0, 0.5, 0, 0).is_err());
        assert!(dirichlet_partition(&train, 4, 0.0, 0, 0).is_err());
        assert!(dirichlet_partition(&train, 4, f64::INFINITY, 0, 0).is_err());
    }

    #[test]
    fn top_up_moves_from_largest_to_smallest() {
        let mut parts = vec![vec![1, 2, 3, 4, 5, 6], vec![], vec![7]];
        top_up(&mut parts, 2);
        assert_eq!(parts.iter().map(Vec::len).collect::<Vec<_>>(), vec![3, 2, 2]);
    }
}
