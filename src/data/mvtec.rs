//! MVTec AD: per-category folders of good training images and labelled test images.
//!
//! The layout of the MVTec Anomaly Detection dataset (Bergmann et al., CVPR 2019):
//!
//! ```text
//! <root>/<category>/train/good/*.png         normal training images
//! <root>/<category>/test/good/*.png          normal test images
//! <root>/<category>/test/<defect>/*.png      anomalous test images, one folder per defect type
//! <root>/<category>/ground_truth/<defect>/<stem>_mask.png
//!                                            the defect mask of test/<defect>/<stem>.png
//! ```
//!
//! The masks are read one at a time by [`MvtecAd::test_mask`], indexed like the test images of
//! [`MvtecAd::into_split`]; normal (`good`) images have no mask file and an all-normal mask.

use std::path::{Path, PathBuf};

use ndarray::Array2;

use super::mask::{mask_path_of, read_mask};
use super::{FolderOptions, ImageFolder, OneClassSplit, Skipped};
use crate::{Error, Result};

/// The test folder holding normal images.
const GOOD: &str = "good";

/// One MVTec AD category, opened: its training folder and its test folders.
///
/// The images are [`ImageFolder`]s, decoded lazily (see there for memory and for
/// [`FolderOptions`]).
///
/// ```no_run
/// use msad::data::{FolderOptions, ImageSource, MvtecAd};
///
/// # fn main() -> msad::Result<()> {
/// for category in MvtecAd::categories("mvtec_ad")? {
///     let mvtec = MvtecAd::open("mvtec_ad", &category, FolderOptions::lenient())?;
///     for skipped in mvtec.skipped() {
///         eprintln!("skipped {}: {}", skipped.path.display(), skipped.reason);
///     }
///     let split = mvtec.into_split()?;
///     println!("{}: {} train, {} test", split.description, split.train.len(), split.test.len());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MvtecAd {
    dir: PathBuf,
    category: String,
    train: ImageFolder,
    test: Vec<(String, ImageFolder)>,
    /// [`FolderOptions::max_pixels`] of the open, which bounds the masks too.
    max_pixels: u64,
}

impl MvtecAd {
    /// The categories under `root`: the subdirectories that have `train/good`, sorted.
    ///
    /// Errors: [`Error::Io`] naming `root` when it cannot be listed.
    pub fn categories(root: impl AsRef<Path>) -> Result<Vec<String>> {
        let root = root.as_ref();
        let mut categories = Vec::new();
        for (name, path) in subdirectories(root)? {
            if path.join("train").join(GOOD).is_dir() {
                categories.push(name);
            }
        }
        Ok(categories)
    }

    /// Opens `<root>/<category>`: lists `train/good` and every folder under `test/`, read as
    /// `options` says (lenient mode decodes every file now and reports failures in
    /// [`MvtecAd::skipped`]).
    ///
    /// Errors: [`Error::Dataset`] naming the path when the category, its `train/good` or its
    /// `test` folder is missing; [`Error::Io`] when a folder cannot be listed.
    pub fn open(root: impl AsRef<Path>, category: &str, options: FolderOptions) -> Result<Self> {
        let root = root.as_ref();
        let dir = root.join(category);
        if !dir.is_dir() {
            let found = MvtecAd::categories(root)
                .map(|c| format!("categories found: {}", c.join(", ")))
                .unwrap_or_else(|e| e.to_string());
            return Err(Error::Dataset {
                path: dir,
                record: None,
                reason: format!("no such MVTec AD category ({found})"),
            });
        }
        let train_dir = dir.join("train").join(GOOD);
        let test_dir = dir.join("test");
        for (path, what) in [(&train_dir, "training images"), (&test_dir, "test images")] {
            if !path.is_dir() {
                return Err(Error::Dataset {
                    path: path.clone(),
                    record: None,
                    reason: format!("missing folder of MVTec AD {what}"),
                });
            }
        }
        let train = ImageFolder::open_with(&train_dir, options)?;
        let test = subdirectories(&test_dir)?
            .into_iter()
            .map(|(name, path)| {
                let folder = ImageFolder::open_with(path, options)?;
                Ok((name, folder))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            dir,
            category: category.to_string(),
            train,
            test,
            max_pixels: options.max_pixels,
        })
    }

    /// The one-class split of `<root>/<category>` (see [`MvtecAd::open`] and
    /// [`MvtecAd::into_split`]). In lenient mode, skipped files are logged at `warn` level; call
    /// [`MvtecAd::open`] to get them as a list.
    pub fn one_class(
        root: impl AsRef<Path>,
        category: &str,
        options: FolderOptions,
    ) -> Result<OneClassSplit> {
        let mvtec = MvtecAd::open(root, category, options)?;
        for skipped in mvtec.skipped() {
            log::warn!("skipped {}: {}", skipped.path.display(), skipped.reason);
        }
        mvtec.into_split()
    }

    /// The category's folder, `<root>/<category>`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The category name.
    pub fn category(&self) -> &str {
        &self.category
    }

    /// The training images, `train/good`.
    pub fn train(&self) -> &ImageFolder {
        &self.train
    }

    /// The test folders (`good` and the defect types) sorted by name, each with its images.
    pub fn test_folders(&self) -> impl Iterator<Item = (&str, &ImageFolder)> {
        self.test
            .iter()
            .map(|(name, folder)| (name.as_str(), folder))
    }

    /// The number of test images, the length of [`MvtecAd::into_split`]'s `test`.
    ///
    /// ```no_run
    /// use msad::data::{FolderOptions, MvtecAd};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let mvtec = MvtecAd::open("mvtec_ad", "bottle", FolderOptions::default())?;
    /// println!("{} test images", mvtec.test_len());
    /// # Ok(())
    /// # }
    /// ```
    pub fn test_len(&self) -> usize {
        self.test
            .iter()
            .map(|(_, folder)| folder.paths().len())
            .sum()
    }

    /// The test folder name and image path of test image `index` (in split order).
    fn test_image(&self, index: usize) -> Result<(&str, &Path)> {
        let mut rest = index;
        for (name, folder) in &self.test {
            match folder.paths().get(rest) {
                Some(path) => return Ok((name, path)),
                None => rest -= folder.paths().len(),
            }
        }
        Err(Error::invalid(
            "test image index",
            format!(
                "{index} is out of range for the {} test images of {}",
                self.test_len(),
                self.dir.display()
            ),
        ))
    }

    /// The mask file of test image `index` (indexed like [`MvtecAd::into_split`]'s `test`):
    /// `<root>/<category>/ground_truth/<defect>/<stem>_mask.png` for the image
    /// `test/<defect>/<stem>.<ext>` (an image in a subfolder of `<defect>` has its mask in the
    /// same subfolder of `ground_truth/<defect>`); `None` for a `good` image, which has no mask.
    /// The file need not exist; [`MvtecAd::test_mask`] reads it.
    ///
    /// Errors: [`Error::InvalidArgument`] for an index out of range.
    ///
    /// ```no_run
    /// use msad::data::{FolderOptions, MvtecAd};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let mvtec = MvtecAd::open("mvtec_ad", "bottle", FolderOptions::default())?;
    /// // e.g. mvtec_ad/bottle/ground_truth/broken_large/000_mask.png
    /// println!("{:?}", mvtec.test_mask_path(0)?);
    /// # Ok(())
    /// # }
    /// ```
    pub fn test_mask_path(&self, index: usize) -> Result<Option<PathBuf>> {
        let (name, image) = self.test_image(index)?;
        if name == GOOD {
            return Ok(None);
        }
        Ok(Some(mask_path_of(
            image,
            &self.dir.join("test").join(name),
            &self.dir.join("ground_truth").join(name),
            "_mask",
        )))
    }

    /// The ground-truth mask of test image `index` (indexed like [`MvtecAd::into_split`]'s
    /// `test`), `[row, column]` of the image's height × width, `true` where the defect is
    /// (mask pixels above 0; MVTec AD's masks are 0 or 255). A `good` image's mask is all
    /// `false`. Decoded now and not kept, like the images: a mask costs one byte a pixel, and
    /// reading one costs decoding the mask and the image's header.
    ///
    /// The masks of a split's test images, for [`crate::metrics::pixel_roc_auc`] and
    /// [`crate::metrics::pro_auc`]:
    ///
    /// ```no_run
    /// use msad::data::{FolderOptions, MvtecAd};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let mvtec = MvtecAd::open("mvtec_ad", "bottle", FolderOptions::default())?;
    /// let masks = (0..mvtec.test_len())
    ///     .map(|i| mvtec.test_mask(i))
    ///     .collect::<msad::Result<Vec<_>>>()?;
    /// let split = mvtec.into_split()?;
    /// assert_eq!(masks.len(), split.test.len());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: [`Error::Dataset`] naming the expected mask file when an anomalous image has
    /// none, and naming the mask file and both sizes when the mask's size differs from its
    /// image's; [`Error::Image`] naming the file when the mask or the image header cannot be
    /// decoded (or is larger than the folder's [`FolderOptions::max_pixels`]); [`Error::Io`]
    /// when a file cannot be opened; [`Error::InvalidArgument`] for an index out of range.
    pub fn test_mask(&self, index: usize) -> Result<Array2<bool>> {
        let (_, image) = self.test_image(index)?;
        let mask = match self.test_mask_path(index)? {
            None => None,
            Some(path) if path.is_file() => Some(path),
            Some(path) => {
                return Err(Error::Dataset {
                    path,
                    record: None,
                    reason: format!(
                        "missing ground-truth mask of the anomalous test image {}",
                        image.display()
                    ),
                });
            }
        };
        read_mask(image, mask, self.max_pixels)
    }

    /// The files a lenient open left out, training folder first.
    pub fn skipped(&self) -> impl Iterator<Item = &Skipped> {
        self.train
            .skipped()
            .iter()
            .chain(self.test.iter().flat_map(|(_, folder)| folder.skipped()))
    }

    /// The one-class split: train = `train/good`; test = every image under `test/<folder>/`,
    /// normal in `good`, anomalous in every other folder (files directly in `test/` are not
    /// read). Test images are ordered by folder name, then path.
    ///
    /// Errors: [`Error::Dataset`] naming the folder when there are no training or no test
    /// images.
    pub fn into_split(self) -> Result<OneClassSplit> {
        let description = format!("mvtec {}", self.category);
        let groups = self.test.into_iter().map(|(name, folder)| {
            let anomalous = name != GOOD;
            (folder, anomalous)
        });
        let (test, test_anomalous) = ImageFolder::concat(self.dir.join("test"), groups);
        ImageFolder::split(self.train, test, test_anomalous, description)
    }
}

/// The subdirectories of `dir` (following links, leaving out hidden ones) as (name, path),
/// sorted by path. Names that are not UTF-8 are shown lossily.
fn subdirectories(dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if !name.starts_with('.') && path.is_dir() {
            found.push((name, path));
        }
    }
    found.sort_by(|a, b| a.1.cmp(&b.1));
    Ok(found)
}
