//! The CIFAR binary record format, bytes to labels and pixels.
//!
//! This file uses `std` only, so that the fuzz crate (`fuzz/`) can include it with
//! `#[path = "../../src/data/cifar_format.rs"] mod cifar_format;` without depending on `msad`.
//! [`crate::data::cifar`] reads the files and maps [`FormatError`] into `msad::Error`.
//!
//! A record is its label bytes followed by 3,072 pixel bytes: the 1,024 red values, then the
//! 1,024 green, then the 1,024 blue, each plane a 32×32 image in row-major order.
//! CIFAR-10 has one label byte (0..=9); CIFAR-100 has two, the coarse label (0..=19) and the
//! fine label (0..=99).
//!
//! [`from_planar`] builds the same [`Records`] from labels and planar pixel rows held apart, as
//! the python version of the archives stores them (parsed by `cifar_pickle`).

use std::fmt;

/// Image side in pixels.
pub const SIDE: usize = 32;

/// Pixels per image (one plane).
pub const PLANE_BYTES: usize = SIDE * SIDE;

/// Pixel bytes per record: three planes.
pub const IMAGE_BYTES: usize = 3 * PLANE_BYTES;

/// One label field of a record: its name and its number of classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabelField {
    /// What the byte is (`label`, `coarse label`, `fine label`).
    pub name: &'static str,
    /// Number of classes: valid values are `0..classes`.
    pub classes: u8,
}

/// The two record layouts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// One label byte (0..=9), then the pixels.
    Cifar10,
    /// A coarse label byte (0..=19), a fine label byte (0..=99), then the pixels.
    Cifar100,
}

impl Layout {
    /// The label fields, in file order.
    pub fn label_fields(self) -> &'static [LabelField] {
        match self {
            Layout::Cifar10 => &[LabelField {
                name: "label",
                classes: 10,
            }],
            Layout::Cifar100 => &[
                LabelField {
                    name: "coarse label",
                    classes: 20,
                },
                LabelField {
                    name: "fine label",
                    classes: 100,
                },
            ],
        }
    }

    /// Bytes per record: the label bytes and the pixels.
    pub fn record_bytes(self) -> usize {
        self.label_fields().len() + IMAGE_BYTES
    }
}

/// Why bytes are not a valid sequence of records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// No bytes at all.
    Empty,
    /// The length is not a whole number of records.
    PartialRecord {
        /// The length in bytes.
        len: usize,
        /// The record size in bytes.
        record_bytes: usize,
    },
    /// A label byte outside its range.
    LabelOutOfRange {
        /// The record index (0-based).
        record: usize,
        /// Which label field.
        field: &'static str,
        /// The byte found.
        value: u8,
        /// Number of classes (valid values are below it).
        classes: u8,
    },
}

impl FormatError {
    /// The record at fault, when one is.
    pub fn record(&self) -> Option<usize> {
        match self {
            FormatError::LabelOutOfRange { record, .. } => Some(*record),
            FormatError::Empty | FormatError::PartialRecord { .. } => None,
        }
    }
}

impl fmt::Display for FormatError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FormatError::Empty => write!(f, "empty file: no records"),
            FormatError::PartialRecord { len, record_bytes } => write!(
                f,
                "size {len} bytes is not a whole number of {record_bytes}-byte records \
                 ({} whole records and {} bytes left over)",
                len / record_bytes,
                len % record_bytes
            ),
            FormatError::LabelOutOfRange {
                record,
                field,
                value,
                classes,
            } => write!(
                f,
                "record {record}: {field} {value} is out of range 0..={}",
                classes.saturating_sub(1)
            ),
        }
    }
}

impl std::error::Error for FormatError {}

/// Parsed records: labels and interleaved RGB pixels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Records {
    layout: Layout,
    labels: Vec<u8>,
    pixels: Vec<u8>,
}

impl Records {
    /// Number of records.
    pub fn len(&self) -> usize {
        self.pixels.len() / IMAGE_BYTES
    }

    /// The label bytes of record `index`, one per [`Layout::label_fields`] entry, or `None`
    /// when `index` is out of range.
    pub fn labels(&self, index: usize) -> Option<&[u8]> {
        let width = self.layout.label_fields().len();
        let start = index.checked_mul(width)?;
        self.labels.get(start..start.checked_add(width)?)
    }

    /// The pixels of record `index` as 32×32 interleaved RGB (`[r, g, b, r, g, b, ...]`,
    /// row-major), or `None` when `index` is out of range.
    pub fn pixels(&self, index: usize) -> Option<&[u8]> {
        let start = index.checked_mul(IMAGE_BYTES)?;
        self.pixels.get(start..start.checked_add(IMAGE_BYTES)?)
    }
}

/// Parses `bytes` as a sequence of `layout` records.
///
/// Errors: [`FormatError::Empty`] for no bytes, [`FormatError::PartialRecord`] when the length
/// is not a multiple of [`Layout::record_bytes`], [`FormatError::LabelOutOfRange`] naming the
/// first record whose label is invalid.
pub fn parse(bytes: &[u8], layout: Layout) -> Result<Records, FormatError> {
    let record_bytes = layout.record_bytes();
    if bytes.is_empty() {
        return Err(FormatError::Empty);
    }
    if !bytes.len().is_multiple_of(record_bytes) {
        return Err(FormatError::PartialRecord {
            len: bytes.len(),
            record_bytes,
        });
    }
    let fields = layout.label_fields();
    let count = bytes.len() / record_bytes;
    let mut labels = Vec::with_capacity(count * fields.len());
    let mut pixels = vec![0u8; count * IMAGE_BYTES];
    for (record, (chunk, out)) in bytes
        .chunks_exact(record_bytes)
        .zip(pixels.chunks_exact_mut(IMAGE_BYTES))
        .enumerate()
    {
        let (label_bytes, planes) = chunk.split_at(fields.len());
        check_labels(fields, record, label_bytes)?;
        labels.extend_from_slice(label_bytes);
        planar_to_interleaved(planes, out);
    }
    Ok(Records {
        layout,
        labels,
        pixels,
    })
}

/// Records from labels and planar pixel rows, as the python version of CIFAR stores them.
///
/// `planes` holds the images one after the other, each as [`IMAGE_BYTES`] planar bytes
/// (`R…R G…G B…B`, what [`parse`] reads after a record's label bytes); `labels` holds, record by
/// record, one byte per [`Layout::label_fields`] entry (CIFAR-100: coarse, then fine). The pixels
/// are interleaved once, into the returned [`Records`]; `labels` is kept as it is.
///
/// Errors: [`FormatError::Empty`] for no images, [`FormatError::PartialRecord`] (with
/// `record_bytes` = [`IMAGE_BYTES`]) when `planes` is not a whole number of images,
/// [`FormatError::LabelOutOfRange`] naming the first record whose label is invalid.
///
/// # Panics
///
/// When `labels` does not hold exactly one byte per label field and image
/// (`labels.len() != planes.len() / IMAGE_BYTES * layout.label_fields().len()`): the caller
/// pairs the two, so a mismatch is its bug, not bad input.
pub fn from_planar(layout: Layout, labels: Vec<u8>, planes: &[u8]) -> Result<Records, FormatError> {
    if planes.is_empty() {
        return Err(FormatError::Empty);
    }
    if !planes.len().is_multiple_of(IMAGE_BYTES) {
        return Err(FormatError::PartialRecord {
            len: planes.len(),
            record_bytes: IMAGE_BYTES,
        });
    }
    let fields = layout.label_fields();
    let count = planes.len() / IMAGE_BYTES;
    assert_eq!(
        labels.len(),
        count * fields.len(),
        "from_planar: {count} images need {} label bytes",
        count * fields.len()
    );
    for (record, label_bytes) in labels.chunks_exact(fields.len()).enumerate() {
        check_labels(fields, record, label_bytes)?;
    }
    let mut pixels = vec![0u8; planes.len()];
    for (image, out) in planes
        .chunks_exact(IMAGE_BYTES)
        .zip(pixels.chunks_exact_mut(IMAGE_BYTES))
    {
        planar_to_interleaved(image, out);
    }
    Ok(Records {
        layout,
        labels,
        pixels,
    })
}

/// [`FormatError::LabelOutOfRange`] for the first label byte of `record` outside its field.
fn check_labels(
    fields: &[LabelField],
    record: usize,
    label_bytes: &[u8],
) -> Result<(), FormatError> {
    for (field, &value) in fields.iter().zip(label_bytes) {
        if value >= field.classes {
            return Err(FormatError::LabelOutOfRange {
                record,
                field: field.name,
                value,
                classes: field.classes,
            });
        }
    }
    Ok(())
}

/// Writes three consecutive planes (`R…R G…G B…B`) as interleaved pixels (`R G B R G B …`).
///
/// Both slices must be [`IMAGE_BYTES`] long; shorter ones are handled up to the shorter length.
pub fn planar_to_interleaved(planes: &[u8], out: &mut [u8]) {
    let (red, rest) = planes.split_at(PLANE_BYTES.min(planes.len()));
    let (green, blue) = rest.split_at(PLANE_BYTES.min(rest.len()));
    for (((pixel, &r), &g), &b) in out.chunks_exact_mut(3).zip(red).zip(green).zip(blue) {
        pixel[0] = r;
        pixel[1] = g;
        pixel[2] = b;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(labels: &[u8], fill: impl Fn(usize) -> u8) -> Vec<u8> {
        let mut bytes = labels.to_vec();
        bytes.extend((0..IMAGE_BYTES).map(fill));
        bytes
    }

    #[test]
    fn planes_become_interleaved_pixels() {
        // R plane all 1, G plane all 2, B plane the pixel index mod 251.
        let bytes = record(&[7], |i| match i / PLANE_BYTES {
            0 => 1,
            1 => 2,
            _ => ((i - 2 * PLANE_BYTES) % 251) as u8,
        });
        let records = parse(&bytes, Layout::Cifar10).unwrap();
        assert_eq!(records.len(), 1);
        assert_eq!(records.labels(0), Some(&[7u8][..]));
        let pixels = records.pixels(0).unwrap();
        assert_eq!(&pixels[..6], &[1, 2, 0, 1, 2, 1]);
        assert_eq!(pixels[3 * 1000 + 2], (1000 % 251) as u8);
        assert_eq!(records.pixels(1), None);
    }

    #[test]
    fn cifar100_has_two_label_bytes() {
        let mut bytes = record(&[19, 99], |_| 0);
        bytes.extend(record(&[3, 42], |_| 5));
        let records = parse(&bytes, Layout::Cifar100).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records.labels(0), Some(&[19u8, 99][..]));
        assert_eq!(records.labels(1), Some(&[3u8, 42][..]));
        assert_eq!(records.labels(2), None);
    }

    #[test]
    fn from_planar_matches_parse() {
        let mut bytes = record(&[19, 99], |i| (i % 251) as u8);
        bytes.extend(record(&[3, 42], |i| (i % 13) as u8));
        let parsed = parse(&bytes, Layout::Cifar100).unwrap();
        let record_bytes = Layout::Cifar100.record_bytes();
        let mut labels = Vec::new();
        let mut planes = Vec::new();
        for chunk in bytes.chunks_exact(record_bytes) {
            labels.extend_from_slice(&chunk[..2]);
            planes.extend_from_slice(&chunk[2..]);
        }
        assert_eq!(
            from_planar(Layout::Cifar100, labels, &planes).unwrap(),
            parsed
        );

        assert_eq!(
            from_planar(Layout::Cifar10, Vec::new(), &[]),
            Err(FormatError::Empty)
        );
        assert!(matches!(
            from_planar(Layout::Cifar10, vec![0], &[0; IMAGE_BYTES + 1]),
            Err(FormatError::PartialRecord { len, record_bytes: IMAGE_BYTES }) if len == IMAGE_BYTES + 1
        ));
        let err = from_planar(Layout::Cifar10, vec![9, 10], &[0; 2 * IMAGE_BYTES]).unwrap_err();
        assert_eq!(err.record(), Some(1));
    }

    #[test]
    #[should_panic(expected = "label bytes")]
    fn from_planar_panics_on_a_label_count_mismatch() {
        let _ = from_planar(Layout::Cifar100, vec![0], &[0; IMAGE_BYTES]);
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert_eq!(parse(&[], Layout::Cifar10), Err(FormatError::Empty));
        assert!(matches!(
            parse(&[0; 3074], Layout::Cifar10),
            Err(FormatError::PartialRecord { len: 3074, .. })
        ));
        let mut bytes = record(&[1, 1], |_| 0);
        bytes.extend(record(&[1, 100], |_| 0));
        let err = parse(&bytes, Layout::Cifar100).unwrap_err();
        assert_eq!(err.record(), Some(1));
        assert!(err.to_string().contains("fine label 100"));
    }
}
