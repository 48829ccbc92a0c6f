//! `flare-node sample-data digits --sites N --out DIR`: example rows for trying a consortium
//! without data of one's own.
//!
//! The shipped digits are split once (a seeded, stratified fifth held out) and the training
//! rows dealt round-robin into `N` non-overlapping shards: `DIR/site-1.csv .. site-N.csv`, one
//! per site, and `DIR/test.csv`, the held-out rows a controller's site measures the global
//! model on. The files are in the CSV format a site reads (`flare_actors::data::read_csv`),
//! with a header line. The same seed gives the same files on every machine.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use flare_actors::data::{Dataset, digits, train_test_split};

/// Share of the digits held out as `test.csv`.
pub const TEST_FRACTION: f64 = 0.2;
/// The seed of the held-out split (fixed: the same files everywhere).
pub const SEED: u64 = 7;
/// Fewest rows a site's shard may have: enough for its learner to cut training and
/// validation rows from it and still learn something.
pub const MIN_SHARD_ROWS: usize = 20;

/// The data sets `sample-data` can write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SampleSet {
    /// The shipped UCI optical digits: 64 pixels in [0, 1], then a label 0..=9.
    Digits,
}

/// Arguments of `flare-node sample-data`.
#[derive(Args)]
pub struct SampleDataArgs {
    /// Which data set.
    set: SampleSet,
    /// How many sites to deal the training rows to (one `site-K.csv` each).
    #[arg(long)]
    sites: usize,
    /// The directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Overwrite files of an earlier run.
    #[arg(long)]
    force: bool,
}

/// The digits dealt to `sites`: one non-overlapping shard of the training rows per site (in
/// site order, sizes differing by at most one row) and the held-out test rows.
pub fn digits_shards(sites: usize) -> anyhow::Result<(Vec<Dataset>, Dataset)> {
    let all = digits().context("reading the shipped digits")?;
    let (train, test) = train_test_split(&all, TEST_FRACTION, SEED).context("holding out the test rows")?;
    let most = train.len() / MIN_SHARD_ROWS;
    if sites == 0 || sites > most {
        bail!(
            "--sites {sites}: the digits have {} training rows, enough for 1 to {most} sites of at least \
             {MIN_SHARD_ROWS} rows each",
            train.len()
        );
    }
    let shards = (0..sites)
        .map(|i| {
            let mine: Vec<usize> = (i..train.len()).step_by(sites).collect();
            train.subset(&mine).context("cutting a shard")
        })
        .collect::<anyhow::Result<_>>()?;
    Ok((shards, test))
}

/// Writes `rows` to `path` as a site's CSV: per line the features, then the label; first a
/// header line (`f0,...,label`) when `header` is set.
pub fn write_csv(path: &Path, rows: &Dataset, header: bool) -> anyhow::Result<()> {
    let mut s = String::with_capacity(rows.len() * (rows.dim() * 4 + 3));
    if header {
        for i in 0..rows.dim() {
            let _ = write!(s, "f{i},");
        }
        s.push_str("label\n");
    }
    for (row, label) in rows.features().chunks(rows.dim()).zip(rows.labels()) {
        for v in row {
            let _ = write!(s, "{v},");
        }
        let _ = writeln!(s, "{label}");
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// The files `sample-data` writes for `sites` sites: each site's shard, then the test rows.
fn file_names(sites: usize) -> Vec<String> {
    (1..=sites)
        .map(|k| format!("site-{k}.csv"))
        .chain(["test.csv".to_owned()])
        .collect()
}

/// Writes the sample files into `out` and says what it wrote, one line per file.
pub fn sample_data(a: SampleDataArgs) -> anyhow::Result<()> {
    let (shards, test) = match a.set {
        SampleSet::Digits => digits_shards(a.sites)?,
    };
    let names = file_names(a.sites);
    let paths: Vec<PathBuf> = names.iter().map(|n| a.out.join(n)).collect();
    if !a.force
        && let Some(p) = paths.iter().find(|p| p.exists())
    {
        bail!("{} already exists; pass --force to overwrite", p.display());
    }
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let train_rows: usize = shards.iter().map(Dataset::len).sum();
    println!(
        "the digits ({} rows): {train_rows} training rows dealt to {} sites, {} held out, in {}",
        train_rows + test.len(),
        a.sites,
        test.len(),
        a.out.display()
    );
    for (i, (rows, path)) in shards.iter().chain([&test]).zip(&paths).enumerate() {
        write_csv(path, rows, true)?;
        let what = if i < shards.len() {
            "training rows"
        } else {
            "held-out test rows"
        };
        println!(
            "  {:<12} {:>5} {what}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("?"),
            rows.len()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use flare_actors::data::{RowShape, read_csv};

    use super::*;

    /// Every row of `d` as comparable text (features and label), sorted.
    fn rows_of(d: &Dataset) -> Vec<String> {
        let mut rows: Vec<String> = (0..d.len())
            .map(|i| format!("{:?} {}", d.row(i).unwrap_or_default(), d.labels()[i]))
            .collect();
        rows.sort_unstable();
        rows
    }

    #[test]
    fn the_files_deal_every_digit_once_and_read_back_as_site_rows() {
        let dir = tempfile::tempdir().expect("tmp");
        let out = dir.path().join("data");
        let args = |force| SampleDataArgs {
            set: SampleSet::Digits,
            sites: 3,
            out: out.clone(),
            force,
        };
        sample_data(args(false)).expect("written");
        let read = |n: &str| read_csv(&out.join(n), &RowShape::digits()).expect(n);
        let (shards, test) = digits_shards(3).expect("shards");
        let mut back = Vec::new();
        for (k, shard) in shards.iter().enumerate() {
            let rows = read(&format!("site-{}.csv", k + 1));
            assert_eq!(&rows, shard, "site-{} reads back as dealt", k + 1);
            back.extend(rows_of(&rows));
        }
        assert_eq!(read("test.csv"), test);
        back.extend(rows_of(&test));
        back.sort_unstable();
        // Shards and test rows together are the shipped digits, each row exactly once.
        assert_eq!(back, rows_of(&digits().expect("digits")));
        let sizes: Vec<usize> = shards.iter().map(Dataset::len).collect();
        assert!(
            sizes.iter().max().expect("max") - sizes.iter().min().expect("min") <= 1,
            "{sizes:?}"
        );
        let text = std::fs::read_to_string(out.join("site-1.csv")).expect("csv");
        assert!(text.starts_with("f0,f1,") && text.lines().next().is_some_and(|l| l.ends_with(",f63,label")));

        let again = sample_data(args(false)).expect_err("files exist");
        assert!(
            again.to_string().contains("site-1.csv already exists; pass --force"),
            "{again}"
        );
        sample_data(args(true)).expect("overwritten with --force");
    }

    #[test]
    fn too_few_or_too_many_sites_are_refused_saying_how_many_fit() {
        for sites in [0, 10_000] {
            let e = digits_shards(sites).expect_err("refused").to_string();
            assert!(
                e.starts_with(&format!(
                    "--sites {sites}: the digits have 1438 training rows, enough for 1 to 71 sites"
                )),
                "{e}"
            );
        }
        assert_eq!(digits_shards(71).expect("71 sites").0.len(), 71);
    }
}
