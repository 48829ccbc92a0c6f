//! Training data for the built-in learners: a small in-memory classification data set, the
//! shipped UCI digits, a seeded train/test split and the seeded Dirichlet(α) partition that gives
//! each federation member its own non-IID shard.
//!
//! - [`Dataset`]: rows of `f32` features with a class label each.
//! - [`digits`]: the UCI optical digits shipped in `actors/data/digits.csv`.
//! - [`train_test_split`] / [`split_indices`]: a seeded, stratified held-out split.
//! - [`dirichlet_partition`]: the seeded non-IID split of training rows over members.
//! - [`read_csv`]: a site's own rows from a CSV file (features, then the label).

mod csv;
mod digits;
mod split;

pub use csv::{CsvError, RowShape, parse_csv, read_csv};
pub use digits::{DIGITS_CLASSES, DIGITS_CSV, DIGITS_DIM, DIGITS_MAX_PIXEL, digits, parse_digits_csv};
pub use split::{Split, dirichlet_partition, split_indices, train_test_split};

/// Why a data set could not be read, built, split or partitioned.
///
/// Parse errors name the 1-based line (and column) of the offending text so a bad file can be fixed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DataError {
    /// A line did not hold the expected number of comma-separated values.
    #[error("line {line}: expected {expected} comma-separated values, found {found}")]
    Columns {
        /// 1-based line number.
        line: usize,
        /// How many values a line must hold.
        expected: usize,
        /// How many it held.
        found: usize,
    },
    /// A value was not a non-negative integer.
    #[error("line {line}, column {column}: {value:?} is not a non-negative integer")]
    NotANumber {
        /// 1-based line number.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// The offending text (truncated to 32 characters).
        value: String,
    },
    /// A pixel value was above the format's maximum.
    #[error("line {line}, column {column}: pixel value {value} is outside 0..={max}")]
    PixelOutOfRange {
        /// 1-based line number.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// The value found.
        value: u64,
        /// The largest value allowed.
        max: u64,
    },
    /// A label was not one of the data set's classes.
    #[error("line {line}: label {value} is outside 0..{classes}")]
    LabelOutOfRange {
        /// 1-based line number.
        line: usize,
        /// The label found.
        value: u64,
        /// The number of classes.
        classes: usize,
    },
    /// A row's width is not what the learner reads (the label not counted).
    #[error("line {line}: {found} features then a label, but the learner reads {expected} features per row")]
    Dimension {
        /// 1-based line number.
        line: usize,
        /// Features the line holds.
        found: usize,
        /// Features the learner reads.
        expected: usize,
    },
    /// A feature was not a finite decimal number.
    #[error("line {line}, column {column}: {value:?} is not a finite number")]
    NotAFeature {
        /// 1-based line number.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// The offending text (truncated to 32 characters).
        value: String,
    },
    /// A feature lay outside the range the learner expects.
    #[error(
        "line {line}, column {column}: feature {value} is outside {min}..={max} (scale the features to that range)"
    )]
    FeatureOutOfRange {
        /// 1-based line number.
        line: usize,
        /// 1-based column number.
        column: usize,
        /// The value found.
        value: f32,
        /// The least value allowed.
        min: f32,
        /// The largest value allowed.
        max: f32,
    },
    /// A label (the last column) was not an integer below the number of classes.
    #[error("line {line}: label {value:?} is not an integer in 0..{classes}")]
    BadLabel {
        /// 1-based line number.
        line: usize,
        /// The offending text (truncated to 32 characters).
        value: String,
        /// The number of classes.
        classes: usize,
    },
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(String),
    /// The text held no rows.
    #[error("the data set holds no rows")]
    Empty,
    /// Features, labels and dimension do not agree.
    #[error("{features} feature values do not make {rows} rows of dimension {dim}")]
    Shape {
        /// Number of feature values given.
        features: usize,
        /// Number of labels given.
        rows: usize,
        /// Declared feature dimension.
        dim: usize,
    },
    /// A label given to [`Dataset::new`] was not one of its classes.
    #[error("row {row}: label {label} is outside 0..{classes}")]
    Label {
        /// 0-based row.
        row: usize,
        /// The label.
        label: u8,
        /// The number of classes.
        classes: usize,
    },
    /// A feature given to [`Dataset::new`] was NaN or infinite.
    #[error("row {row}: a feature is not a finite number")]
    NonFinite {
        /// 0-based row.
        row: usize,
    },
    /// A row index was past the end of the data set.
    #[error("row index {index} is out of range for a data set of {len} rows")]
    IndexOutOfRange {
        /// The index asked for.
        index: usize,
        /// The number of rows.
        len: usize,
    },
    /// A split or partition parameter was unusable (e.g. α ≤ 0, no members, fraction outside 0..1).
    #[error("invalid parameter: {0}")]
    InvalidParameter(String),
    /// There are not enough rows to give every member its minimum.
    #[error("cannot give {members} members at least {min} rows each from {rows} rows")]
    TooFewRows {
        /// Number of members.
        members: usize,
        /// Minimum rows per member.
        min: usize,
        /// Rows available.
        rows: usize,
    },
}

/// A labelled classification data set held in memory: `len() × dim` features, row-major, and one
/// class label per row.
///
/// Row-major contiguous `f32` is the layout the MLP consumes without copying a row apart, and the
/// invariants (sizes agree, labels below `classes`) are checked once here so learners can trust them.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    labels: Vec<u8>,
    dim: usize,
    classes: usize,
}

impl Dataset {
    /// Builds a data set, checking that `features.len() == labels.len() * dim`, `dim > 0`, that
    /// every label is below `classes` and every feature is finite (a NaN would poison training).
    pub fn new(features: Vec<f32>, labels: Vec<u8>, dim: usize, classes: usize) -> Result<Self, DataError> {
        if dim == 0 || features.len() != labels.len().saturating_mul(dim) {
            return Err(DataError::Shape {
                features: features.len(),
                rows: labels.len(),
                dim,
            });
        }
        if let Some((row, &label)) = labels.iter().enumerate().find(|&(_, &l)| usize::from(l) >= classes) {
            return Err(DataError::Label { row, label, classes });
        }
        if let Some(i) = features.iter().position(|x| !x.is_finite()) {
            return Err(DataError::NonFinite { row: i / dim });
        }
        Ok(Self {
            features,
            labels,
            dim,
            classes,
        })
    }

    /// Number of rows (samples); also the `num_samples` a member reports for FedAvg weighting.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when the data set has no rows.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Number of features per row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of classes; labels lie in `0..classes`.
    pub fn classes(&self) -> usize {
        self.classes
    }

    /// All features, row-major (`len() × dim()`).
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// All labels, one per row.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// The features of row `i`, or `None` past the end.
    pub fn row(&self, i: usize) -> Option<&[f32]> {
        let start = i.checked_mul(self.dim)?;
        self.features.get(start..start.checked_add(self.dim)?)
    }

    /// How many rows each class has (index = class), e.g. to measure how skewed a shard is.
    pub fn class_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.classes];
        for &l in &self.labels {
            counts[usize::from(l)] += 1;
        }
        counts
    }

    /// A new data set made of the given rows, in the given order (repeats allowed); how a member's
    /// shard or the train/test sets are cut out of the whole.
    pub fn subset(&self, indices: &[usize]) -> Result<Self, DataError> {
        let mut features = Vec::with_capacity(indices.len() * self.dim);
        let mut labels = Vec::with_capacity(indices.len());
        for &index in indices {
            let row = self
                .row(index)
                .ok_or(DataError::IndexOutOfRange { index, len: self.len() })?;
            features.extend_from_slice(row);
            labels.push(self.labels[index]);
        }
        Ok(Self {
            features,
            labels,
            dim: self.dim,
            classes: self.classes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_checks_shape_and_labels() {
        assert!(Dataset::new(vec![0.0; 6], vec![0, 1, 2], 2, 3).is_ok());
        assert_eq!(
            Dataset::new(vec![0.0; 5], vec![0, 1, 2], 2, 3),
            Err(DataError::Shape {
                features: 5,
                rows: 3,
                dim: 2
            })
        );
        assert_eq!(
            Dataset::new(vec![0.0; 6], vec![0, 3, 2], 2, 3),
            Err(DataError::Label {
                row: 1,
                label: 3,
                classes: 3
            })
        );
        assert!(Dataset::new(vec![], vec![], 0, 3).is_err());
        assert_eq!(
            Dataset::new(vec![0.0, 1.0, f32::NAN, 0.0], vec![0, 1], 2, 3),
            Err(DataError::NonFinite { row: 1 })
        );
    }

    #[test]
    fn subset_picks_rows_in_order() {
        let d = Dataset::new(vec![0.0, 0.5, 1.0, 1.5, 2.0, 2.5], vec![0, 1, 2], 2, 3).expect("new");
        let s = d.subset(&[2, 0]).expect("subset");
        assert_eq!(s.len(), 2);
        assert_eq!(s.features(), &[2.0, 2.5, 0.0, 0.5]);
        assert_eq!(s.labels(), &[2, 0]);
        assert_eq!(s.class_counts(), vec![1, 0, 1]);
        assert_eq!(d.subset(&[3]), Err(DataError::IndexOutOfRange { index: 3, len: 3 }));
        assert_eq!(
            d.subset(&[usize::MAX]),
            Err(DataError::IndexOutOfRange {
                index: usize::MAX,
                len: 3
            })
        );
    }
}
