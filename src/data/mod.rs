//! Datasets: files → images and labels, and the one-class splits of the paper's protocol.
//!
//! Every reader yields 8-bit RGB images ([`image::RgbImage`]); grayscale, RGBA and 16-bit files
//! are converted. A [`OneClassSplit`] holds the normal training images and the test images with
//! their anomaly labels (`true` = anomalous).
//!
//! - [`Cifar10`], [`Cifar100`]: the binary or python (torchvision's) versions, read whole into
//!   memory at open; `Cifar10::download` fetches torchvision's archive (feature `pretrained`).
//! - [`ImageFolder`]: a directory of PNG, JPEG, BMP or TIFF files, decoded one at a time on
//!   [`ImageSource::get`]; [`FolderOptions`] chooses strict (the default) or lenient reading.
//! - [`MvtecAd`]: the MVTec AD category layout, on top of [`ImageFolder`].
//! - [`Digits`]: the UCI handwritten digits, embedded in the crate (no files needed).
//!
//! Errors name what is wrong: a missing file, a file that is not a whole number of records or a
//! label out of range is an [`Error::Dataset`](crate::Error::Dataset) naming the file (and the
//! record); an image that cannot be decoded is an [`Error::Image`](crate::Error::Image) naming
//! it.
//!
//! ```
//! use msad::data::{Digits, ImageSource};
//!
//! # fn main() -> msad::Result<()> {
//! let split = Digits::load().one_class(7)?;
//! let image = split.train.get(0)?;
//! assert_eq!(image.dimensions(), (8, 8));
//! let anomalies = split.test_anomalous.iter().filter(|&&a| a).count();
//! println!("{}: {} train, {anomalies} of {} test images anomalous",
//!     split.description, split.train.len(), split.test.len());
//! # Ok(())
//! # }
//! ```
//!
//! With files on disk:
//!
//! ```no_run
//! use msad::data::{Cifar10, FolderOptions, ImageFolder, MvtecAd};
//!
//! # fn main() -> msad::Result<()> {
//! let cifar = Cifar10::open("data/cifar-10-batches-bin")?.one_class(0)?;
//! let screws = MvtecAd::one_class("data/mvtec_ad", "screw", FolderOptions::default())?;
//! let folders = ImageFolder::one_class(
//!     ImageFolder::open("parts/train")?,
//!     ImageFolder::open("parts/test/ok")?,
//!     Some(ImageFolder::open("parts/test/defect")?),
//! )?;
//! # Ok(())
//! # }
//! ```

mod cifar;
#[cfg(feature = "pretrained")]
mod cifar_download;
mod cifar_format;
mod cifar_pickle;
mod digits;
mod folder;
mod mask;
mod mvtec;
mod subset;

pub use cifar::{Cifar10, Cifar100};
#[cfg(feature = "pretrained")]
pub use cifar_download::{CIFAR10_PYTHON_ARCHIVE, CIFAR100_PYTHON_ARCHIVE, DatasetArchive};
pub use digits::Digits;
pub use folder::{FolderOptions, IMAGE_EXTENSIONS, ImageFolder, Skipped};
pub use mask::MaskedFolder;
pub use mvtec::MvtecAd;

use image::RgbImage;

use crate::Result;

/// A sequence of images that can be read by index, possibly lazily (decoding on demand).
///
/// Implementations are `Sync` so that batches are decoded in parallel.
pub trait ImageSource: Send + Sync {
    /// Number of images.
    fn len(&self) -> usize;

    /// Whether there are no images.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The image at `index` (decoded now for file-backed sources). An index out of range or an
    /// unreadable file is an error naming it.
    fn get(&self, index: usize) -> Result<RgbImage>;

    /// A name for the image at `index`: its path for files, `<dataset>:<split>:<index>` for
    /// records.
    fn name(&self, index: usize) -> String;
}

/// Images already in memory are a source as they are, so they can be fitted on and scored
/// directly.
///
/// ```
/// use image::RgbImage;
/// use msad::data::ImageSource;
///
/// let images = vec![RgbImage::new(4, 4), RgbImage::new(8, 6)];
/// let source: &dyn ImageSource = &images;
/// assert_eq!(source.len(), 2);
/// assert_eq!(source.get(1).unwrap().dimensions(), (8, 6));
/// assert_eq!(source.name(1), "memory:1");
/// assert!(source.get(2).is_err());
/// ```
impl ImageSource for Vec<RgbImage> {
    fn len(&self) -> usize {
        self.as_slice().len()
    }

    fn get(&self, index: usize) -> Result<RgbImage> {
        self.as_slice().get(index).cloned().ok_or_else(|| {
            crate::Error::invalid(
                "image index",
                format!(
                    "{index} is out of range for {} images in memory",
                    self.len()
                ),
            )
        })
    }

    fn name(&self, index: usize) -> String {
        format!("memory:{index}")
    }
}

/// The one-class protocol: train on normal images only, test on everything.
pub struct OneClassSplit {
    /// Normal training images.
    pub train: Box<dyn ImageSource>,
    /// Test images, normal and anomalous.
    pub test: Box<dyn ImageSource>,
    /// Per test image: `true` when anomalous.
    pub test_anomalous: Vec<bool>,
    /// A short description (`cifar10 class 3 (cat)`).
    pub description: String,
}
