//! MVTec AD: per-category folders of good training images and labelled test images.
//!
//! The layout of the MVTec Anomaly Detection dataset (Bergmann et al., CVPR 2019):
//!
//! ```text
//! <root>/<category>/train/good/*.png         normal training images
//! <root>/<category>/test/good/*.png          normal test images
//! <root>/<category>/test/<defect>/*.png      anomalous test images, one folder per defect type
//! <root>/<category>/ground_truth/...         defect masks (ignored)
//! ```

use std::path::{Path, PathBuf};

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
