//! CIFAR-10 and CIFAR-100, binary or python version, read whole into memory.
//!
//! The files are those of the archives of <https://www.cs.toronto.edu/~kriz/cifar.html>
//! (Krizhevsky, *Learning Multiple Layers of Features from Tiny Images*, 2009), either version:
//!
//! | | binary version | python version (torchvision's) |
//! |---|---|---|
//! | CIFAR-10 | `cifar-10-batches-bin/data_batch_{1..5}.bin`, `test_batch.bin` | `cifar-10-batches-py/data_batch_{1..5}`, `test_batch` |
//! | CIFAR-100 | `cifar-100-binary/train.bin`, `test.bin` | `cifar-100-python/train`, `test` |
//!
//! The binary records are parsed by [`super::cifar_format`], the pickles by
//! [`super::cifar_pickle`]; both give the same images and labels.
//!
//! Memory: all images are decoded at open and kept as [`RgbImage`]s, about 3 KB each
//! (CIFAR-10: 60,000 images, ~185 MB; CIFAR-100: 60,000 images, ~185 MB). One-class splits
//! share these pixels instead of copying them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use rayon::prelude::*;

use super::OneClassSplit;
use super::cifar_format::{self, FormatError, Layout, SIDE};
use super::cifar_pickle;
use super::subset::InMemorySubset;
use crate::{Error, Result};

/// Where one version of a dataset keeps its files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Files {
    /// Which version: the two are parsed differently.
    pub(crate) version: Version,
    /// The training files, in order.
    pub(crate) train: &'static [&'static str],
    /// The test file.
    pub(crate) test: &'static str,
    /// The folder the archive extracts to.
    pub(crate) folder: &'static str,
}

/// The two published versions of the CIFAR files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Version {
    /// Fixed-size records (`cifar-10-binary.tar.gz`, `cifar-100-binary.tar.gz`).
    Binary,
    /// Python 2 pickles (`cifar-10-python.tar.gz`, `cifar-100-python.tar.gz`), what
    /// torchvision and the authors' code download.
    Python,
}

/// CIFAR-10's two versions, the binary one first.
pub(crate) const CIFAR10_FILES: [Files; 2] = [
    Files {
        version: Version::Binary,
        train: &[
            "data_batch_1.bin",
            "data_batch_2.bin",
            "data_batch_3.bin",
            "data_batch_4.bin",
            "data_batch_5.bin",
        ],
        test: "test_batch.bin",
        folder: "cifar-10-batches-bin",
    },
    Files {
        version: Version::Python,
        train: &[
            "data_batch_1",
            "data_batch_2",
            "data_batch_3",
            "data_batch_4",
            "data_batch_5",
        ],
        test: "test_batch",
        folder: "cifar-10-batches-py",
    },
];

/// CIFAR-100's two versions, the binary one first.
pub(crate) const CIFAR100_FILES: [Files; 2] = [
    Files {
        version: Version::Binary,
        train: &["train.bin"],
        test: "test.bin",
        folder: "cifar-100-binary",
    },
    Files {
        version: Version::Python,
        train: &["train"],
        test: "test",
        folder: "cifar-100-python",
    },
];

/// CIFAR-10: 50,000 training and 10,000 test images, 32×32, in ten classes.
///
/// Labels index [`Cifar10::CLASSES`].
///
/// ```no_run
/// use msad::data::{Cifar10, ImageSource};
///
/// # fn main() -> msad::Result<()> {
/// let cifar = Cifar10::open("data/cifar-10-batches-bin")?;
/// assert_eq!(cifar.train_images().len(), 50_000);
/// let split = cifar.one_class(3)?; // cat is normal
/// assert_eq!(split.train.len(), 5_000);
/// assert_eq!(split.test_anomalous.iter().filter(|&&a| a).count(), 9_000);
/// # Ok(())
/// # }
/// ```
pub struct Cifar10 {
    dir: PathBuf,
    train_images: Arc<[RgbImage]>,
    train_labels: Vec<u8>,
    test_images: Arc<[RgbImage]>,
    test_labels: Vec<u8>,
}

impl Cifar10 {
    /// The class names, indexed by label.
    pub const CLASSES: [&'static str; 10] = [
        "airplane",
        "automobile",
        "bird",
        "cat",
        "deer",
        "dog",
        "frog",
        "horse",
        "ship",
        "truck",
    ];

    /// Reads the training batches (in order) and the test batch from `dir`, or from the
    /// folder its archive extracts to inside `dir`: the binary version
    /// (`data_batch_1.bin` .. `data_batch_5.bin`, `test_batch.bin`, folder
    /// `cifar-10-batches-bin`) or the python version (`data_batch_1` .. `data_batch_5`,
    /// `test_batch`, folder `cifar-10-batches-py`), whichever is there (binary first).
    ///
    /// Errors: [`Error::Dataset`] naming the files looked for when neither version is there, a
    /// missing file of a version partly there, a binary file whose size is not a whole number
    /// of 3,073-byte records, a pickle that is not CIFAR's (with the byte offset), or a label
    /// above 9 (with the record index); [`Error::Io`] when a file cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let (dir, files) = locate(dir.as_ref(), &CIFAR10_FILES, "CIFAR-10")?;
        let mut paths: Vec<PathBuf> = files.train.iter().map(|f| dir.join(f)).collect();
        paths.push(dir.join(files.test));
        // Report a missing file before spending time on the others.
        for file in &paths {
            require_file(file, "CIFAR-10 batch file")?;
        }
        let mut batches = paths
            .par_iter()
            .map(|file| read_batch(file, Layout::Cifar10, files.version))
            .collect::<Result<Vec<_>>>()?;
        let test = batches.pop().unwrap_or_default();
        let mut train = Batch::default();
        for batch in batches {
            train.append(batch);
        }
        Ok(Self {
            dir,
            train_images: train.images.into(),
            train_labels: train.labels.into_iter().map(|l| l[0]).collect(),
            test_images: test.images.into(),
            test_labels: test.labels.into_iter().map(|l| l[0]).collect(),
        })
    }

    /// The directory the files were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The training images, batch 1 first.
    pub fn train_images(&self) -> &[RgbImage] {
        &self.train_images
    }

    /// The training labels (0..=9), one per training image.
    pub fn train_labels(&self) -> &[u8] {
        &self.train_labels
    }

    /// The test images.
    pub fn test_images(&self) -> &[RgbImage] {
        &self.test_images
    }

    /// The test labels (0..=9), one per test image.
    pub fn test_labels(&self) -> &[u8] {
        &self.test_labels
    }

    /// The one-class split with `normal_class` (0..=9) normal: train = the training images of
    /// that class, test = all test images, anomalous when their class differs.
    ///
    /// Image names are `cifar10:train:<i>` and `cifar10:test:<i>`, `i` the index in the full
    /// training or test set. The pixels are shared with `self`, not copied.
    ///
    /// Errors: [`Error::InvalidArgument`] for a class above 9; [`Error::Dataset`] when no
    /// training image has that class.
    pub fn one_class(&self, normal_class: usize) -> Result<OneClassSplit> {
        let name = Self::CLASSES.get(normal_class).ok_or_else(|| {
            Error::invalid(
                "CIFAR-10 class",
                format!(
                    "{normal_class} is not in 0..=9 ({})",
                    Self::CLASSES.join(", ")
                ),
            )
        })?;
        one_class_split(
            &self.dir,
            "cifar10",
            format!("cifar10 class {normal_class} ({name})"),
            (&self.train_images, &self.train_labels),
            (&self.test_images, &self.test_labels),
            normal_class,
        )
    }
}

/// CIFAR-100: 50,000 training and 10,000 test images, 32×32, with a fine label (100 classes)
/// and a coarse label (20 superclasses, [`Cifar100::COARSE_CLASSES`]).
///
/// The one-class protocol uses the 20 superclasses, as the anomaly-detection literature does.
///
/// ```no_run
/// use msad::data::{Cifar100, ImageSource};
///
/// # fn main() -> msad::Result<()> {
/// let cifar = Cifar100::open("data/cifar-100-binary")?;
/// let split = cifar.one_class(4)?; // fruit_and_vegetables is normal
/// assert_eq!(split.train.len(), 2_500);
/// assert_eq!(split.test.len(), 10_000);
/// # Ok(())
/// # }
/// ```
pub struct Cifar100 {
    dir: PathBuf,
    train_images: Arc<[RgbImage]>,
    train_coarse: Vec<u8>,
    train_fine: Vec<u8>,
    test_images: Arc<[RgbImage]>,
    test_coarse: Vec<u8>,
    test_fine: Vec<u8>,
}

impl Cifar100 {
    /// The superclass names, indexed by coarse label (as in `coarse_label_names.txt`).
    pub const COARSE_CLASSES: [&'static str; 20] = [
        "aquatic_mammals",
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "insects",
        "large_carnivores",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "large_omnivores_and_herbivores",
        "medium_mammals",
        "non-insect_invertebrates",
        "people",
        "reptiles",
        "small_mammals",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ];

    /// Reads the training and test files from `dir`, or from the folder its archive extracts
    /// to inside `dir`: the binary version (`train.bin`, `test.bin`, folder
    /// `cifar-100-binary`) or the python version (`train`, `test`, folder
    /// `cifar-100-python`), whichever is there (binary first).
    ///
    /// Errors: [`Error::Dataset`] naming the files looked for when neither version is there, a
    /// missing file, a binary file whose size is not a whole number of 3,074-byte records, a
    /// pickle that is not CIFAR's (with the byte offset), or a record whose coarse label is
    /// above 19 or fine label above 99 (with the record index); [`Error::Io`] when a file
    /// cannot be read.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let (dir, files) = locate(dir.as_ref(), &CIFAR100_FILES, "CIFAR-100")?;
        let train_file = dir.join(files.train[0]);
        let test_file = dir.join(files.test);
        require_file(&train_file, "CIFAR-100 file")?;
        require_file(&test_file, "CIFAR-100 file")?;
        let (train, test) = rayon::join(
            || read_batch(&train_file, Layout::Cifar100, files.version),
            || read_batch(&test_file, Layout::Cifar100, files.version),
        );
        let (train, test) = (train?, test?);
        let (train_coarse, train_fine) = train.labels.iter().map(|l| (l[0], l[1])).unzip();
        let (test_coarse, test_fine) = test.labels.iter().map(|l| (l[0], l[1])).unzip();
        Ok(Self {
            dir,
            train_images: train.images.into(),
            train_coarse,
            train_fine,
            test_images: test.images.into(),
            test_coarse,
            test_fine,
        })
    }

    /// The directory the files were read from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The training images.
    pub fn train_images(&self) -> &[RgbImage] {
        &self.train_images
    }

    /// The training coarse labels (0..=19), one per training image.
    pub fn train_coarse_labels(&self) -> &[u8] {
        &self.train_coarse
    }

    /// The training fine labels (0..=99), one per training image.
    pub fn train_fine_labels(&self) -> &[u8] {
        &self.train_fine
    }

    /// The test images.
    pub fn test_images(&self) -> &[RgbImage] {
        &self.test_images
    }

    /// The test coarse labels (0..=19), one per test image.
    pub fn test_coarse_labels(&self) -> &[u8] {
        &self.test_coarse
    }

    /// The test fine labels (0..=99), one per test image.
    pub fn test_fine_labels(&self) -> &[u8] {
        &self.test_fine
    }

    /// The one-class split with superclass `normal_superclass` (0..=19) normal: train = the
    /// training images of that superclass, test = all test images, anomalous when their
    /// superclass differs.
    ///
    /// Image names are `cifar100:train:<i>` and `cifar100:test:<i>`. The pixels are shared
    /// with `self`, not copied.
    ///
    /// Errors: [`Error::InvalidArgument`] for a superclass above 19; [`Error::Dataset`] when
    /// no training image has that superclass.
    pub fn one_class(&self, normal_superclass: usize) -> Result<OneClassSplit> {
        let name = Self::COARSE_CLASSES.get(normal_superclass).ok_or_else(|| {
            Error::invalid(
                "CIFAR-100 superclass",
                format!("{normal_superclass} is not in 0..=19"),
            )
        })?;
        one_class_split(
            &self.dir,
            "cifar100",
            format!("cifar100 superclass {normal_superclass} ({name})"),
            (&self.train_images, &self.train_coarse),
            (&self.test_images, &self.test_coarse),
            normal_superclass,
        )
    }
}

impl std::fmt::Debug for Cifar10 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cifar10")
            .field("dir", &self.dir)
            .field("train_images", &self.train_images.len())
            .field("test_images", &self.test_images.len())
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Cifar100 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cifar100")
            .field("dir", &self.dir)
            .field("train_images", &self.train_images.len())
            .field("test_images", &self.test_images.len())
            .finish_non_exhaustive()
    }
}

/// The directory and version to read: the first of `versions` whose first training file is in
/// `dir` itself, else in `dir/<folder>`.
///
/// Errors: [`Error::Dataset`] on `dir` listing every file and folder looked for.
pub(crate) fn locate(dir: &Path, versions: &[Files], dataset: &str) -> Result<(PathBuf, Files)> {
    for files in versions {
        for candidate in [dir.to_path_buf(), dir.join(files.folder)] {
            if candidate.join(files.train[0]).is_file() {
                return Ok((candidate, *files));
            }
        }
    }
    let looked_for: Vec<String> = versions
        .iter()
        .map(|f| {
            let version = match f.version {
                Version::Binary => "binary version",
                Version::Python => "python version",
            };
            format!(
                "{} and {} ({version}), here or in {}/",
                f.train.join(", "),
                f.test,
                f.folder
            )
        })
        .collect();
    Err(Error::Dataset {
        path: dir.to_path_buf(),
        record: None,
        reason: format!(
            "no {dataset} files: looked for {}",
            looked_for.join("; or ")
        ),
    })
}

/// [`Error::Dataset`] unless `file` is an existing file.
fn require_file(file: &Path, what: &str) -> Result<()> {
    if file.is_file() {
        Ok(())
    } else {
        Err(Error::Dataset {
            path: file.to_path_buf(),
            record: None,
            reason: format!("missing {what}"),
        })
    }
}

/// Images and per-record label bytes of one file.
#[derive(Default)]
struct Batch {
    images: Vec<RgbImage>,
    labels: Vec<[u8; 2]>,
}

impl Batch {
    fn append(&mut self, other: Batch) {
        self.images.extend(other.images);
        self.labels.extend(other.labels);
    }
}

/// Reads and parses one file of either version.
fn read_batch(file: &Path, layout: Layout, version: Version) -> Result<Batch> {
    let bytes = std::fs::read(file).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Error::Dataset {
            path: file.to_path_buf(),
            record: None,
            reason: "missing file".into(),
        },
        _ => Error::io(file, e),
    })?;
    let records = match version {
        Version::Binary => cifar_format::parse(&bytes, layout).map_err(|e| format_error(file, &e)),
        Version::Python => cifar_pickle::parse(&bytes, layout).map_err(|e| Error::Dataset {
            path: file.to_path_buf(),
            record: None,
            reason: format!("CIFAR python-version file: {e}"),
        }),
    }?;
    drop(bytes);
    let mut batch = Batch {
        images: Vec::with_capacity(records.len()),
        labels: Vec::with_capacity(records.len()),
    };
    for index in 0..records.len() {
        let (Some(pixels), Some(labels)) = (records.pixels(index), records.labels(index)) else {
            return Err(internal(file, index));
        };
        let image = RgbImage::from_raw(SIDE as u32, SIDE as u32, pixels.to_vec())
            .ok_or_else(|| internal(file, index))?;
        let mut label = [0u8; 2];
        for (slot, &value) in label.iter_mut().zip(labels) {
            *slot = value;
        }
        batch.images.push(image);
        batch.labels.push(label);
    }
    Ok(batch)
}

/// A [`FormatError`] as an [`Error::Dataset`] naming `file` and the record.
fn format_error(file: &Path, error: &FormatError) -> Error {
    let reason = match error {
        FormatError::LabelOutOfRange {
            field,
            value,
            classes,
            ..
        } => format!(
            "{field} {value} is out of range 0..={}",
            classes.saturating_sub(1)
        ),
        other => other.to_string(),
    };
    Error::Dataset {
        path: file.to_path_buf(),
        record: error.record(),
        reason,
    }
}

/// A parsed record that could not be turned into an image (cannot happen for parsed input).
fn internal(file: &Path, index: usize) -> Error {
    Error::Dataset {
        path: file.to_path_buf(),
        record: Some(index),
        reason: "record has the wrong number of bytes".into(),
    }
}

/// The one-class split of a labelled train and test set.
fn one_class_split(
    dir: &Path,
    dataset: &str,
    description: String,
    (train_images, train_labels): (&Arc<[RgbImage]>, &[u8]),
    (test_images, test_labels): (&Arc<[RgbImage]>, &[u8]),
    normal: usize,
) -> Result<OneClassSplit> {
    let train: Vec<usize> = train_labels
        .iter()
        .enumerate()
        .filter(|&(_, &label)| usize::from(label) == normal)
        .map(|(i, _)| i)
        .collect();
    if train.is_empty() {
        return Err(Error::Dataset {
            path: dir.to_path_buf(),
            record: None,
            reason: format!("no training images for {description}"),
        });
    }
    let test_anomalous = test_labels
        .iter()
        .map(|&label| usize::from(label) != normal)
        .collect();
    Ok(OneClassSplit {
        train: Box::new(InMemorySubset::new(
            format!("{dataset}:train"),
            Arc::clone(train_images),
            train,
        )),
        test: Box::new(InMemorySubset::new(
            format!("{dataset}:test"),
            Arc::clone(test_images),
            (0..test_labels.len()).collect(),
        )),
        test_anomalous,
        description,
    })
}
