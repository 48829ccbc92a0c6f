//! The UCI optical digits, embedded in the binary so every member can load its data offline.

use super::{DataError, Dataset};

/// The shipped CSV (`actors/data/digits.csv`, see its README for source and licence), embedded so
/// that tests and `sim` need no file or network at run time.
pub const DIGITS_CSV: &str = include_str!("../../data/digits.csv");

/// Pixels per digit image (8 × 8).
pub const DIGITS_DIM: usize = 64;

/// Number of digit classes (0..=9).
pub const DIGITS_CLASSES: usize = 10;

/// Largest raw pixel value (a count of "on" pixels in a 4 × 4 block); features are divided by it.
pub const DIGITS_MAX_PIXEL: u64 = 16;

/// The 1797 shipped digit images, pixels scaled to `[0, 1]`.
///
/// Parses [`DIGITS_CSV`] on every call (about a millisecond); keep the result if it is needed often.
pub fn digits() -> Result<Dataset, DataError> {
    parse_digits_csv(DIGITS_CSV)
}

/// Parses text in the digits format: per line, 64 integer pixels in `0..=16` then a label in
/// `0..=9`, comma-separated; pixels are divided by 16.
///
/// Blank lines are skipped. Any other malformed line gives an error naming its 1-based line (and
/// column), so a hand-edited or truncated file is easy to fix.
pub fn parse_digits_csv(text: &str) -> Result<Dataset, DataError> {
    let columns = DIGITS_DIM + 1;
    let mut features = Vec::new();
    let mut labels = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let found = raw.split(',').count();
        if found != columns {
            return Err(DataError::Columns {
                line,
                expected: columns,
                found,
            });
        }
        for (j, field) in raw.split(',').enumerate() {
            let column = j + 1;
            let field = field.trim();
            let value: u64 = field.parse().map_err(|_| DataError::NotANumber {
                line,
                column,
                value: field.chars().take(32).collect(),
            })?;
            if j < DIGITS_DIM {
                if value > DIGITS_MAX_PIXEL {
                    return Err(DataError::PixelOutOfRange {
                        line,
                        column,
                        value,
                        max: DIGITS_MAX_PIXEL,
                    });
                }
                features.push(value as f32 / DIGITS_MAX_PIXEL as f32);
            } else {
                let label = u8::try_from(value)
                    .ok()
                    .filter(|&l| usize::from(l) < DIGITS_CLASSES)
                    .ok_or(DataError::LabelOutOfRange {
                        line,
                        value,
                        classes: DIGITS_CLASSES,
                    })?;
                labels.push(label);
            }
        }
    }
    if labels.is_empty() {
        return Err(DataError::Empty);
    }
    Dataset::new(features, labels, DIGITS_DIM, DIGITS_CLASSES)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(pixels: &str, label: &str) -> String {
        format!("{pixels},{label}")
    }

    fn zeros(n: usize) -> String {
        vec!["0"; n].join(",")
    }

    #[test]
    fn shipped_digits_have_the_documented_shape() {
        let d = digits().expect("digits");
        assert_eq!(d.len(), 1797);
        assert_eq!(d.dim(), 64);
        assert_eq!(d.classes(), 10);
        assert_eq!(d.class_counts(), vec![178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
        assert!(d.features().iter().all(|&x| (0.0..=1.0).contains(&x)));
        assert!(d.features().contains(&1.0));
        // First row of the file: 0,0,5,13,9,1,... label 0.
        assert_eq!(&d.row(0).expect("row")[..4], &[0.0, 0.0, 5.0 / 16.0, 13.0 / 16.0]);
        assert_eq!(d.labels()[0], 0);
    }

    #[test]
    fn parses_good_lines_and_skips_blank_ones() {
        let text = format!(
            "{}\n\n{}\r\n",
            line(&zeros(64), "3"),
            line(&vec!["16"; 64].join(","), "9")
        );
        let d = parse_digits_csv(&text).expect("parse_digits_csv");
        assert_eq!(d.labels(), &[3, 9]);
        assert!(d.row(1).expect("row").iter().all(|&x| x == 1.0));
    }

    #[test]
    fn wrong_column_count_names_the_line() {
        let text = format!("{}\n{}\n", line(&zeros(64), "1"), line(&zeros(63), "1"));
        let err = parse_digits_csv(&text).expect_err("parse_digits_csv must fail");
        assert_eq!(
            err,
            DataError::Columns {
                line: 2,
                expected: 65,
                found: 64
            }
        );
        assert!(err.to_string().contains("line 2"));
    }

    #[test]
    fn non_number_names_line_and_column() {
        let mut fields = vec!["0"; 64];
        fields[9] = "x7";
        let text = format!(
            "{}\n{}\n{}\n",
            line(&zeros(64), "0"),
            line(&zeros(64), "0"),
            line(&fields.join(","), "2")
        );
        let err = parse_digits_csv(&text).expect_err("parse_digits_csv must fail");
        assert_eq!(
            err,
            DataError::NotANumber {
                line: 3,
                column: 10,
                value: "x7".into()
            }
        );
        assert!(err.to_string().contains("line 3, column 10"));
        let err = parse_digits_csv(&line(&zeros(64), "-1")).expect_err("zeros must fail");
        assert!(matches!(
            err,
            DataError::NotANumber {
                line: 1,
                column: 65,
                ..
            }
        ));
    }

    #[test]
    fn label_and_pixel_out_of_range_are_errors() {
        let err = parse_digits_csv(&line(&zeros(64), "10")).expect_err("zeros must fail");
        assert_eq!(
            err,
            DataError::LabelOutOfRange {
                line: 1,
                value: 10,
                classes: 10
            }
        );
        assert!(err.to_string().contains("line 1: label 10"));
        let err = parse_digits_csv(&line(&zeros(64), "300")).expect_err("zeros must fail");
        assert!(matches!(err, DataError::LabelOutOfRange { value: 300, .. }));
        let mut fields = vec!["0"; 64];
        fields[0] = "17";
        let err = parse_digits_csv(&line(&fields.join(","), "0")).expect_err("join must fail");
        assert_eq!(
            err,
            DataError::PixelOutOfRange {
                line: 1,
                column: 1,
                value: 17,
                max: 16
            }
        );
    }

    #[test]
    fn empty_text_is_an_error() {
        assert_eq!(parse_digits_csv(""), Err(DataError::Empty));
        assert_eq!(parse_digits_csv("\n  \n"), Err(DataError::Empty));
    }
}
