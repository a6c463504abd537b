//! The UCI handwritten digits, embedded in the crate: a dataset that needs no download.
//!
//! The 1,797 8×8 images of scikit-learn's `load_digits()`, from E. Alpaydin and C. Kaynak,
//! *Optical Recognition of Handwritten Digits*, UCI Machine Learning Repository, 1998,
//! <https://doi.org/10.24432/C50P49>, licensed under CC BY 4.0. `scripts/make_digits.py`
//! wrote them to `data/digits.bin` (a 12-byte header, then per image one label byte and 64
//! pixel bytes 0..=16, row-major), which is compiled in with `include_bytes!` (117 KB).

use std::sync::Arc;

use image::{Rgb, RgbImage};

use super::OneClassSplit;
use super::subset::InMemorySubset;
use crate::{Error, Result};

/// The embedded file.
const DIGITS_BIN: &[u8] = include_bytes!("../../data/digits.bin");
/// Its first bytes.
const MAGIC: &[u8; 8] = b"MSADDIG1";
/// Magic and the little-endian `u32` record count.
const HEADER_BYTES: usize = 12;
/// Image side in pixels.
const SIDE: usize = 8;
/// A label byte and the pixels.
const RECORD_BYTES: usize = 1 + SIDE * SIDE;
/// Largest pixel value in the file.
const MAX_VALUE: u8 = 16;

/// Whether `bytes` is a well-formed digits file of [`Digits::LEN`] records: checked when the
/// crate is compiled, so decoding it at run time cannot fail.
const fn is_valid(bytes: &[u8]) -> bool {
    if bytes.len() != HEADER_BYTES + Digits::LEN * RECORD_BYTES {
        return false;
    }
    let mut i = 0;
    while i < MAGIC.len() {
        if bytes[i] != MAGIC[i] {
            return false;
        }
        i += 1;
    }
    let count = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
    if count as usize != Digits::LEN {
        return false;
    }
    let mut record = 0;
    while record < Digits::LEN {
        let start = HEADER_BYTES + record * RECORD_BYTES;
        if bytes[start] > 9 {
            return false;
        }
        let mut p = 1;
        while p < RECORD_BYTES {
            if bytes[start + p] > MAX_VALUE {
                return false;
            }
            p += 1;
        }
        record += 1;
    }
    true
}

const _: () = assert!(
    is_valid(DIGITS_BIN),
    "data/digits.bin is not a valid digits file"
);

/// The UCI handwritten digits (scikit-learn's `load_digits()`): 1,797 8×8 images of the
/// digits 0..=9, embedded in the crate.
///
/// Each image's values 0..=16 become the gray level `round(v × 255 / 16)`, replicated to RGB.
/// The one-class protocol uses a fixed split: image `i` is a test image when `i % 3 == 0`
/// (599 images) and a training image otherwise (1,198 images); see [`Digits::is_test`].
///
/// Source: E. Alpaydin and C. Kaynak, *Optical Recognition of Handwritten Digits*, UCI Machine
/// Learning Repository, 1998, <https://doi.org/10.24432/C50P49> (CC BY 4.0).
///
/// ```
/// use msad::data::{Digits, ImageSource};
///
/// # fn main() -> msad::Result<()> {
/// let digits = Digits::load();
/// assert_eq!(digits.images().len(), 1797);
/// assert_eq!(digits.images()[0].dimensions(), (8, 8));
///
/// let split = digits.one_class(3)?; // 3 is normal
/// assert!(split.train.len() > 100);
/// assert_eq!(split.test.len(), 599);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Digits {
    images: Arc<[RgbImage]>,
    labels: Vec<u8>,
}

impl Digits {
    /// Number of images.
    pub const LEN: usize = 1797;

    /// Decodes the embedded images (about 0.3 MB as RGB; fast).
    pub fn load() -> Self {
        let records = DIGITS_BIN[HEADER_BYTES..].chunks_exact(RECORD_BYTES);
        let labels = records.clone().map(|record| record[0]).collect();
        let images: Vec<RgbImage> = records
            .map(|record| {
                let pixels = &record[1..];
                RgbImage::from_fn(SIDE as u32, SIDE as u32, |x, y| {
                    let value = pixels[y as usize * SIDE + x as usize].min(MAX_VALUE);
                    Rgb([gray(value); 3])
                })
            })
            .collect();
        Self {
            images: images.into(),
            labels,
        }
    }

    /// The images, 8×8 RGB (gray), in scikit-learn's order.
    pub fn images(&self) -> &[RgbImage] {
        &self.images
    }

    /// The digit (0..=9) of each image.
    pub fn labels(&self) -> &[u8] {
        &self.labels
    }

    /// Whether image `index` belongs to the test side of the fixed split (`index % 3 == 0`).
    pub fn is_test(index: usize) -> bool {
        index.is_multiple_of(3)
    }

    /// The one-class split with `digit` (0..=9) normal: train = the training-side images of
    /// that digit, test = all test-side images (see [`Digits::is_test`]), anomalous when their
    /// digit differs. Names are `digits:train:<i>` and `digits:test:<i>`, `i` the index in
    /// [`Digits::images`].
    ///
    /// Errors: [`Error::InvalidArgument`] for a digit above 9.
    pub fn one_class(&self, digit: usize) -> Result<OneClassSplit> {
        if digit > 9 {
            return Err(Error::invalid("digit", format!("{digit} is not in 0..=9")));
        }
        let (test, train): (Vec<usize>, Vec<usize>) =
            (0..self.labels.len()).partition(|&i| Self::is_test(i));
        let train = train
            .into_iter()
            .filter(|&i| usize::from(self.labels[i]) == digit)
            .collect();
        let test_anomalous = test
            .iter()
            .map(|&i| usize::from(self.labels[i]) != digit)
            .collect();
        Ok(OneClassSplit {
            train: Box::new(InMemorySubset::new(
                "digits:train",
                Arc::clone(&self.images),
                train,
            )),
            test: Box::new(InMemorySubset::new(
                "digits:test",
                Arc::clone(&self.images),
                test,
            )),
            test_anomalous,
            description: format!("digits class {digit}"),
        })
    }
}

impl std::fmt::Debug for Digits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Digits")
            .field("images", &self.images.len())
            .finish_non_exhaustive()
    }
}

/// The gray level of a value 0..=16: `round(v × 255 / 16)`, halves rounded up.
fn gray(value: u8) -> u8 {
    ((u16::from(value) * 255 + 8) / 16) as u8
}
