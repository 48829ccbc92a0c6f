//! A site's own rows as CSV: what `[dataset.NAME] path = "..."` in a site's policy points at.
//!
//! The format, kept small on purpose so that any tool writes it (`pandas.to_csv`, a
//! spreadsheet, `printf`):
//! - one row per line, comma-separated: the features, then the label as the last column;
//! - features are decimal numbers, finite, within the range the learner expects (the digits
//!   learners take 64 values in `[0, 1]`);
//! - the label is a non-negative integer below the number of classes (`0..=9` for digits);
//! - blank lines are skipped, surrounding spaces and a trailing `\r` are ignored;
//! - an optional header: the first non-blank line is skipped when its first field is not a
//!   number (so `pixel_0,...,label` is a header, `0,0.25,...,3` is a row).
//!
//! Every fault is reported with its 1-based line (and column), and the file's path by
//! [`read_csv`], never as a panic: site data is written by hand and by other programs.

use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use super::{DIGITS_CLASSES, DIGITS_DIM, DataError, Dataset};

/// What a learner needs of the rows it reads: their width, their classes, and the range its
/// features must lie in (checked per value, so a file scaled the wrong way is named, not
/// trained on).
#[derive(Clone, Debug, PartialEq)]
pub struct RowShape {
    /// Features per row (the label not counted).
    pub dim: usize,
    /// Labels lie in `0..classes`.
    pub classes: usize,
    /// Every feature lies in this range.
    pub features: RangeInclusive<f32>,
}

impl RowShape {
    /// The rows every digits learner reads: 8 x 8 pixels scaled to `[0, 1]`, labels `0..=9`.
    pub fn digits() -> Self {
        Self {
            dim: DIGITS_DIM,
            classes: DIGITS_CLASSES,
            features: 0.0..=1.0,
        }
    }
}

/// A CSV file that could not be read as rows of the shape asked: the file and what is wrong
/// (with its line).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}: {fault}", path.display())]
pub struct CsvError {
    /// The file.
    pub path: PathBuf,
    /// What is wrong with it.
    pub fault: DataError,
}

/// Reads the CSV file at `path` (the format in the module doc) as rows of `shape`.
pub fn read_csv(path: &Path, shape: &RowShape) -> Result<Dataset, CsvError> {
    let fail = |fault| CsvError {
        path: path.to_owned(),
        fault,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(DataError::Read(e.to_string())))?;
    parse_csv(&text, shape).map_err(fail)
}

/// Parses CSV text (the format in the module doc) as rows of `shape`.
pub fn parse_csv(text: &str, shape: &RowShape) -> Result<Dataset, DataError> {
    let mut features = Vec::new();
    let mut labels = Vec::new();
    let mut first = true;
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let fields: Vec<&str> = raw.split(',').map(str::trim).collect();
        if std::mem::take(&mut first) && fields.first().is_some_and(|f| f.parse::<f64>().is_err()) {
            continue; // the header
        }
        row(&fields, line, shape, &mut features, &mut labels)?;
    }
    if labels.is_empty() {
        return Err(DataError::Empty);
    }
    Dataset::new(features, labels, shape.dim, shape.classes)
}

/// Checks one row's fields and appends its features and label.
fn row(
    fields: &[&str],
    line: usize,
    shape: &RowShape,
    features: &mut Vec<f32>,
    labels: &mut Vec<u8>,
) -> Result<(), DataError> {
    let Some((label, values)) = fields.split_last() else {
        return Err(DataError::Empty);
    };
    if values.len() != shape.dim {
        return Err(DataError::Dimension {
            line,
            found: values.len(),
            expected: shape.dim,
        });
    }
    for (j, field) in values.iter().enumerate() {
        let column = j + 1;
        let value = field
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| DataError::NotAFeature {
                line,
                column,
                value: field.chars().take(32).collect(),
            })?;
        if !shape.features.contains(&value) {
            return Err(DataError::FeatureOutOfRange {
                line,
                column,
                value,
                min: *shape.features.start(),
                max: *shape.features.end(),
            });
        }
        features.push(value);
    }
    let l = label
        .parse::<u8>()
        .ok()
        .filter(|&l| usize::from(l) < shape.classes)
        .ok_or_else(|| DataError::BadLabel {
            line,
            value: label.chars().take(32).collect(),
            classes: shape.classes,
        })?;
    labels.push(l);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> RowShape {
        RowShape {
            dim: 3,
            classes: 4,
            features: 0.0..=1.0,
        }
    }

    #[test]
    fn reads_rows_with_or_without_a_header() {
        let text = "f0, f1, f2, label\n0, 0.5, 1\t, 3\r\n\n1e-1,0.25,.75,0\n";
        let d = parse_csv(text, &small()).expect("parse");
        assert_eq!((d.len(), d.dim(), d.classes()), (2, 3, 4));
        assert_eq!(d.labels(), &[3, 0]);
        assert_eq!(d.row(1).expect("row"), &[0.1, 0.25, 0.75]);
        let bare = parse_csv("0,0,0,1\n", &small()).expect("no header");
        assert_eq!(bare.labels(), &[1]);
        assert_eq!(parse_csv("a,b,c,label\n\n", &small()), Err(DataError::Empty));
    }

    #[test]
    fn each_bad_line_is_named_with_its_line() {
        let bad = |text: &str| parse_csv(text, &small()).expect_err(text).to_string();
        let head = "x,y,z,label\n0,0,0,0\n";
        assert_eq!(
            bad(&format!("{head}0,0,0\n")),
            "line 3: 2 features then a label, but the learner reads 3 features per row"
        );
        assert_eq!(
            bad(&format!("{head}0,0,0,0,1\n")),
            "line 3: 4 features then a label, but the learner reads 3 features per row"
        );
        assert_eq!(
            bad(&format!("{head}0,oops,0,1\n")),
            "line 3, column 2: \"oops\" is not a finite number"
        );
        assert_eq!(
            bad(&format!("{head}0,0,NaN,1\n")),
            "line 3, column 3: \"NaN\" is not a finite number"
        );
        assert_eq!(
            bad(&format!("{head}0,16,0,1\n")),
            "line 3, column 2: feature 16 is outside 0..=1 (scale the features to that range)"
        );
        for label in ["4", "-1", "2.5", "cat", ""] {
            assert_eq!(
                bad(&format!("{head}\n0,0,0,{label}\n")),
                format!("line 4: label {label:?} is not an integer in 0..4")
            );
        }
        // Only the first line may be a header.
        assert_eq!(
            bad("0,0,0,0\nx,y,z,label\n"),
            "line 2, column 1: \"x\" is not a finite number"
        );
    }

    #[test]
    fn a_file_is_named_in_its_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("rows.csv");
        let e = read_csv(&path, &small()).expect_err("missing");
        assert!(
            e.to_string().starts_with(&format!("{}: cannot read:", path.display())),
            "{e}"
        );
        std::fs::write(&path, "0,0,0,1\n0,0,1\n").expect("write");
        let e = read_csv(&path, &small()).expect_err("short row");
        assert_eq!(
            e.to_string(),
            format!(
                "{}: line 2: 2 features then a label, but the learner reads 3 features per row",
                path.display()
            )
        );
    }

    #[test]
    fn the_shipped_digits_read_back_as_digits_rows() {
        let d = super::super::digits().expect("digits");
        let mut text = String::from("pixels...,label\n");
        for (r, l) in d.features().chunks(d.dim()).zip(d.labels()).take(50) {
            for v in r {
                text.push_str(&format!("{v},"));
            }
            text.push_str(&format!("{l}\n"));
        }
        let back = parse_csv(&text, &RowShape::digits()).expect("digits rows");
        assert_eq!(back, d.subset(&(0..50).collect::<Vec<_>>()).expect("subset"));
        let e = parse_csv("0,0,0,1\n", &RowShape::digits()).expect_err("narrow");
        assert_eq!(
            e.to_string(),
            "line 1: 3 features then a label, but the learner reads 64 features per row"
        );
    }
}
