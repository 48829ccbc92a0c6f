//! The digits split vertically: each data party holds a band of image columns for every
//! sample, the label party holds every sample's label and which samples train and which test.
//!
//! Sample ids are shared (vertical federated learning with aligned ids): the label party names
//! rows by id, a data party looks its features up by id.

use crate::data::{DIGITS_DIM, DataError, Dataset, digits, split_indices};

/// Width (and height) of a digit image.
const SIDE: usize = 8;

/// One data party's share of the data: its columns of every sample.
#[derive(Clone, Debug, PartialEq)]
pub struct PartyFeatures {
    /// Which pixels of the 8 × 8 image (row-major index) this party holds, ascending.
    pub pixels: Vec<usize>,
    /// `samples × pixels.len()` values, row-major, by sample id.
    features: Vec<f32>,
}

impl PartyFeatures {
    /// Features per sample.
    pub fn width(&self) -> usize {
        self.pixels.len()
    }

    /// Samples held.
    pub fn samples(&self) -> usize {
        self.features.len().checked_div(self.width()).unwrap_or(0)
    }

    /// The features of the samples `ids`, in that order (`ids.len() × width`); `None` when an
    /// id is out of range (ids come from the network).
    pub fn rows(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let w = self.width();
        let mut out = Vec::with_capacity(ids.len() * w);
        for &id in ids {
            let start = (id as usize).checked_mul(w)?;
            out.extend_from_slice(self.features.get(start..start + w)?);
        }
        Some(out)
    }
}

/// The label party's share: labels and the train/test ids.
#[derive(Clone, Debug, PartialEq)]
pub struct LabelData {
    /// Every sample's label, by id.
    pub labels: Vec<u8>,
    /// Ids to train on, ascending.
    pub train: Vec<usize>,
    /// Held-out ids that measure the model, ascending.
    pub test: Vec<usize>,
}

impl LabelData {
    /// The labels of `ids`; `None` when an id is out of range.
    pub fn labels_of(&self, ids: &[usize]) -> Option<Vec<u8>> {
        ids.iter().map(|&i| self.labels.get(i).copied()).collect()
    }
}

/// The shipped digits split over one label party and `parties` data parties.
#[derive(Clone, Debug, PartialEq)]
pub struct VerticalDigits {
    /// What the label party holds.
    pub label: LabelData,
    /// What each data party holds, in party order (left band first).
    pub parties: Vec<PartyFeatures>,
}

impl VerticalDigits {
    /// Deals the digits: image column `c` goes to party `c × parties / 8` (so 2 parties get the
    /// left and right halves, 1 party everything), `test_fraction` of the samples (stratified,
    /// from `seed`) are held out. Every member calls this and keeps only its own share.
    pub fn deal(parties: usize, test_fraction: f64, seed: u64) -> Result<Self, DataError> {
        if !(1..=SIDE).contains(&parties) {
            return Err(DataError::InvalidParameter(format!(
                "{parties} data parties: the 8 image columns split over 1 to 8"
            )));
        }
        let data = digits()?;
        let split = split_indices(&data, test_fraction, seed)?;
        Ok(Self {
            label: LabelData {
                labels: data.labels().to_vec(),
                train: split.train,
                test: split.test,
            },
            parties: (0..parties).map(|p| band(&data, p, parties)).collect(),
        })
    }

    /// All features of `ids`, party by party: `parts[p]` is `ids.len() × parties[p].width()`.
    pub fn features_of(&self, ids: &[u32]) -> Option<Vec<Vec<f32>>> {
        self.parties.iter().map(|p| p.rows(ids)).collect()
    }
}

fn band(data: &Dataset, party: usize, parties: usize) -> PartyFeatures {
    let pixels: Vec<usize> = (0..DIGITS_DIM)
        .filter(|&i| (i % SIDE) * parties / SIDE == party)
        .collect();
    let features = data
        .features()
        .chunks_exact(DIGITS_DIM)
        .flat_map(|row| pixels.iter().map(move |&i| row[i]))
        .collect();
    PartyFeatures { pixels, features }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_parties_get_the_left_and_right_halves() {
        let v = VerticalDigits::deal(2, 0.2, 0).expect("deal");
        assert_eq!(v.parties.len(), 2);
        assert_eq!(&v.parties[0].pixels[..5], &[0, 1, 2, 3, 8]);
        assert_eq!(&v.parties[1].pixels[..5], &[4, 5, 6, 7, 12]);
        assert_eq!(v.parties[0].width() + v.parties[1].width(), 64);
        assert_eq!(v.parties[0].samples(), 1797);
        let all = digits().expect("digits");
        let row = all.row(5).expect("row");
        let got = v.parties[1].rows(&[5]).expect("rows");
        assert_eq!(got, v.parties[1].pixels.iter().map(|&i| row[i]).collect::<Vec<_>>());
        assert!(v.parties[0].rows(&[1797]).is_none());
        assert_eq!(v.label.train.len() + v.label.test.len(), 1797);
        assert_eq!(VerticalDigits::deal(1, 0.2, 0).expect("deal").parties[0].width(), 64);
        assert!(VerticalDigits::deal(0, 0.2, 0).is_err());
        assert!(VerticalDigits::deal(9, 0.2, 0).is_err());
    }
}
