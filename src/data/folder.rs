//! Directories of image files, decoded lazily.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::{ImageReader, RgbImage};
use rayon::prelude::*;

use super::{ImageSource, OneClassSplit};
use crate::{Error, Result};

/// File extensions read as images (compared case-insensitively).
pub const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// How a folder reader treats files it cannot decode.
///
/// The default is strict: every file with an image extension is listed, and one that cannot
/// be decoded is an [`Error::Image`] (or [`Error::Io`]) naming it when it is read.
///
/// ```
/// use msad::data::FolderOptions;
///
/// assert!(!FolderOptions::default().lenient);
/// assert!(FolderOptions::lenient().lenient);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FolderOptions {
    /// Decode every file once at open (in parallel; the pixels are dropped right away) and
    /// leave out, and report in [`ImageFolder::skipped`], those that fail.
    pub lenient: bool,
}

impl FolderOptions {
    /// Strict reading (the default): unreadable files are errors when read.
    pub fn strict() -> Self {
        Self { lenient: false }
    }

    /// Lenient reading: unreadable files are found at open, skipped and reported.
    pub fn lenient() -> Self {
        Self { lenient: true }
    }
}

/// A file a lenient reader left out, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    /// The file.
    pub path: PathBuf,
    /// What the decoder (or the file system) reported.
    pub reason: String,
}

/// The image files under a directory, recursively, in sorted path order.
///
/// Files whose extension is one of [`IMAGE_EXTENSIONS`] (any case) are listed; names starting
/// with `.` (hidden files, macOS `._*` resource forks) are not. Grayscale, RGBA and 16-bit
/// images come back as 8-bit RGB ([`image::DynamicImage::to_rgb8`]); the format is taken
/// from the file's contents, its extension deciding only when the contents do not.
///
/// Memory: opening lists paths only; [`ImageSource::get`] reads and decodes one file each
/// time it is called and keeps nothing, so a folder of 10,000 large JPEGs costs 10,000
/// paths, plus whatever images the caller holds. A lenient open decodes every file once (in
/// parallel, one image per worker thread at a time) and drops the pixels at once.
///
/// ```no_run
/// use msad::data::{FolderOptions, ImageFolder, ImageSource};
///
/// # fn main() -> msad::Result<()> {
/// let folder = ImageFolder::open("photos")?;
/// let first = folder.get(0)?; // decoded now
/// println!("{} is {}x{}", folder.name(0), first.width(), first.height());
///
/// let lenient = ImageFolder::open_with("photos", FolderOptions::lenient())?;
/// for skipped in lenient.skipped() {
///     eprintln!("skipped {}: {}", skipped.path.display(), skipped.reason);
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct ImageFolder {
    root: PathBuf,
    paths: Vec<PathBuf>,
    skipped: Vec<Skipped>,
}

impl ImageFolder {
    /// The image files under `dir`, strict (see [`FolderOptions`]).
    ///
    /// Errors: [`Error::Io`] naming `dir` (or a subdirectory) when it cannot be listed.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Self::open_with(dir, FolderOptions::default())
    }

    /// The image files under `dir`, read as `options` says. In lenient mode every file is
    /// decoded once now, and those that fail are left out and listed in
    /// [`ImageFolder::skipped`].
    ///
    /// Errors: [`Error::Io`] naming `dir` (or a subdirectory) when it cannot be listed.
    pub fn open_with(dir: impl AsRef<Path>, options: FolderOptions) -> Result<Self> {
        let root = dir.as_ref().to_path_buf();
        let mut paths = Vec::new();
        let mut visited = HashSet::new();
        collect_images(&root, &mut paths, &mut visited)?;
        paths.sort();
        let mut skipped = Vec::new();
        if options.lenient {
            let failures: Vec<Option<String>> = paths
                .par_iter()
                .map(|path| decode(path).err().map(failure_reason))
                .collect();
            let mut kept = Vec::with_capacity(paths.len());
            for (path, failure) in paths.into_iter().zip(failures) {
                match failure {
                    None => kept.push(path),
                    Some(reason) => skipped.push(Skipped { path, reason }),
                }
            }
            paths = kept;
        }
        Ok(Self {
            root,
            paths,
            skipped,
        })
    }

    /// The directory that was opened.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The listed image files, sorted.
    pub fn paths(&self) -> &[PathBuf] {
        &self.paths
    }

    /// The files a lenient open left out, with reasons (empty when strict).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The one-class split of folders: train = `train` (normal images), test = the images of
    /// `test_normal` (normal) followed by those of `test_anomalous` (anomalous), if given.
    ///
    /// Open each folder first with the options you want, and look at its
    /// [`ImageFolder::skipped`] list before handing it over.
    ///
    /// ```no_run
    /// use msad::data::{FolderOptions, ImageFolder};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let options = FolderOptions::lenient();
    /// let train = ImageFolder::open_with("screws/train", options)?;
    /// let normal = ImageFolder::open_with("screws/test/ok", options)?;
    /// let anomalous = ImageFolder::open_with("screws/test/defect", options)?;
    /// let split = ImageFolder::one_class(train, normal, Some(anomalous))?;
    /// println!("{}: {} test images", split.description, split.test_anomalous.len());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: [`Error::Dataset`] naming the folder when `train` or the test images are empty.
    pub fn one_class(
        train: ImageFolder,
        test_normal: ImageFolder,
        test_anomalous: Option<ImageFolder>,
    ) -> Result<OneClassSplit> {
        let description = match &test_anomalous {
            Some(anomalous) => format!(
                "folders train {}, test normal {}, test anomalous {}",
                train.root.display(),
                test_normal.root.display(),
                anomalous.root.display()
            ),
            None => format!(
                "folders train {}, test normal {}",
                train.root.display(),
                test_normal.root.display()
            ),
        };
        let root = test_normal.root.clone();
        let mut groups = vec![(test_normal, false)];
        groups.extend(test_anomalous.map(|folder| (folder, true)));
        let (test, test_anomalous) = ImageFolder::concat(root, groups);
        Self::split(train, test, test_anomalous, description)
    }

    /// A split from a training folder and labelled test images; both must be non-empty.
    pub(crate) fn split(
        train: ImageFolder,
        test: ImageFolder,
        test_anomalous: Vec<bool>,
        description: String,
    ) -> Result<OneClassSplit> {
        for (folder, what) in [(&train, "training"), (&test, "test")] {
            if folder.paths.is_empty() {
                return Err(Error::Dataset {
                    path: folder.root.clone(),
                    record: None,
                    reason: format!(
                        "no {what} images ({} files; {} skipped)",
                        IMAGE_EXTENSIONS.join(", "),
                        folder.skipped.len()
                    ),
                });
            }
        }
        Ok(OneClassSplit {
            train: Box::new(train),
            test: Box::new(test),
            test_anomalous,
            description,
        })
    }

    /// The folders' files one after another, rooted at `root`, with each file's flag.
    pub(crate) fn concat(
        root: PathBuf,
        groups: impl IntoIterator<Item = (ImageFolder, bool)>,
    ) -> (ImageFolder, Vec<bool>) {
        let mut joined = ImageFolder {
            root,
            paths: Vec::new(),
            skipped: Vec::new(),
        };
        let mut flags = Vec::new();
        for (folder, flag) in groups {
            flags.extend(std::iter::repeat_n(flag, folder.paths.len()));
            joined.paths.extend(folder.paths);
            joined.skipped.extend(folder.skipped);
        }
        (joined, flags)
    }
}

impl ImageSource for ImageFolder {
    fn len(&self) -> usize {
        self.paths.len()
    }

    /// Reads and decodes the file at `index`, as 8-bit RGB.
    ///
    /// Errors: [`Error::Image`] naming the file when it cannot be decoded (corrupt,
    /// truncated, not an image); [`Error::Io`] when it cannot be opened;
    /// [`Error::InvalidArgument`] for an index out of range.
    fn get(&self, index: usize) -> Result<RgbImage> {
        let path = self.paths.get(index).ok_or_else(|| {
            Error::invalid(
                "image index",
                format!(
                    "{index} is out of range for the {} images under {}",
                    self.paths.len(),
                    self.root.display()
                ),
            )
        })?;
        decode(path)
    }

    fn name(&self, index: usize) -> String {
        match self.paths.get(index) {
            Some(path) => path.display().to_string(),
            None => format!("{}:<index {index} out of range>", self.root.display()),
        }
    }
}

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] and is not hidden.
fn is_image_file(path: &Path) -> bool {
    // Names need not be UTF-8: a file named in another encoding is listed like any other.
    let hidden = path
        .file_name()
        .is_none_or(|n| n.as_encoded_bytes().starts_with(b"."));
    let known = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
    known && !hidden
}

/// Appends the image files under `dir` (following symbolic links, each directory once).
fn collect_images(
    dir: &Path,
    out: &mut Vec<PathBuf>,
    visited: &mut HashSet<PathBuf>,
) -> Result<()> {
    let canonical = dir.canonicalize().map_err(|e| Error::io(dir, e))?;
    if !visited.insert(canonical) {
        return Ok(());
    }
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let hidden = entry.file_name().as_encoded_bytes().starts_with(b".");
        // `metadata` follows links; a dangling link is listed if it looks like an image, so
        // that reading it reports the problem.
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => {
                if !hidden {
                    collect_images(&path, out, visited)?;
                }
            }
            _ => {
                if is_image_file(&path) {
                    out.push(path);
                }
            }
        }
    }
    Ok(())
}

/// Why a file could not be read, without its path (which [`Skipped`] holds).
fn failure_reason(error: Error) -> String {
    match error {
        Error::Image { reason, .. } => format!("cannot decode image: {reason}"),
        Error::Io { source, .. } => source.to_string(),
        other => other.to_string(),
    }
}

/// Reads and decodes one image file as 8-bit RGB.
fn decode(path: &Path) -> Result<RgbImage> {
    let reader = ImageReader::open(path).map_err(|e| Error::io(path, e))?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    let image = reader.decode().map_err(|e| Error::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    Ok(image.to_rgb8())
}
