//! Directories of image files, decoded lazily.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use image::error::LimitErrorKind;
use image::{DynamicImage, ImageDecoder, ImageReader, Limits, RgbImage};
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
/// Images larger than [`FolderOptions::max_pixels`] (default
/// [`FolderOptions::DEFAULT_MAX_PIXELS`]) are refused the same way, an [`Error::Image`] naming
/// the file, its size and the limit.
///
/// ```
/// use msad::data::FolderOptions;
///
/// assert!(!FolderOptions::default().lenient);
/// assert!(FolderOptions::lenient().lenient);
/// assert_eq!(FolderOptions::default().max_pixels, FolderOptions::DEFAULT_MAX_PIXELS);
/// let gigapixel = FolderOptions::strict().with_max_pixels(1 << 30);
/// assert_eq!(gigapixel.max_pixels, 1 << 30);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FolderOptions {
    /// Decode every file once at open (in parallel; the pixels are dropped right away) and
    /// leave out, and report in [`ImageFolder::skipped`], those that fail.
    pub lenient: bool,
    /// The most pixels (width × height) an image may have; a file whose header claims more is
    /// an [`Error::Image`] before its pixels are decoded (lenient: skipped and reported).
    /// Also bounds each side, and the decoder's allocations to 8 bytes a pixel (16-bit RGBA)
    /// or 512 MiB, whichever is larger. Default: [`FolderOptions::DEFAULT_MAX_PIXELS`]; must
    /// be at least 1.
    ///
    /// A decoded image costs 3 bytes a pixel as 8-bit RGB, more while it is converted, on
    /// each thread that decodes one.
    pub max_pixels: u64,
}

impl Default for FolderOptions {
    fn default() -> Self {
        Self::strict()
    }
}

impl FolderOptions {
    /// The default largest image a folder reader decodes, in pixels: 2²⁷ = 134,217,728 (e.g.
    /// 16384 × 8192 or 11585²), 384 MiB as 8-bit RGB.
    ///
    /// It admits every camera and scanner image in common use (a 100-megapixel medium-format
    /// frame is 11648 × 8736 = 102 M; MVTec AD's largest are 1024²) and sits between Pillow's
    /// decompression-bomb warning (89.5 M pixels) and its error (179 M). A file claiming more is
    /// refused from its header, before any pixel buffer is allocated: a few hundred bytes of PNG
    /// can claim 100000 × 100000 pixels (30 GB). Raise it with [`FolderOptions::with_max_pixels`].
    pub const DEFAULT_MAX_PIXELS: u64 = 1 << 27;

    /// Strict reading (the default): unreadable files are errors when read.
    pub fn strict() -> Self {
        Self {
            lenient: false,
            max_pixels: Self::DEFAULT_MAX_PIXELS,
        }
    }

    /// Lenient reading: unreadable files are found at open, skipped and reported.
    pub fn lenient() -> Self {
        Self {
            lenient: true,
            ..Self::strict()
        }
    }

    /// The same options with at most `max_pixels` pixels an image (see
    /// [`FolderOptions::max_pixels`]; 0 is refused when a folder is opened).
    #[must_use]
    pub fn with_max_pixels(self, max_pixels: u64) -> Self {
        Self { max_pixels, ..self }
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
    /// (first index, pixel limit) per run of paths opened with the same options, by index:
    /// one run, unless folders were joined.
    limits: Vec<(usize, u64)>,
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
    /// Errors: [`Error::Io`] naming `dir` (or a subdirectory) when it cannot be listed;
    /// [`Error::InvalidArgument`] when `options.max_pixels` is 0.
    pub fn open_with(dir: impl AsRef<Path>, options: FolderOptions) -> Result<Self> {
        let max_pixels = options.max_pixels;
        if max_pixels == 0 {
            return Err(Error::invalid(
                "FolderOptions::max_pixels",
                "0 would refuse every image; it must be at least 1",
            ));
        }
        let root = dir.as_ref().to_path_buf();
        let mut paths = Vec::new();
        let mut visited = HashSet::new();
        collect_images(&root, &mut paths, &mut visited)?;
        paths.sort();
        let mut skipped = Vec::new();
        if options.lenient {
            let failures: Vec<Option<String>> = paths
                .par_iter()
                .map(|path| decode(path, max_pixels).err().map(failure_reason))
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
            limits: vec![(0, max_pixels)],
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

    /// The file of image `index`; [`Error::InvalidArgument`] for an index out of range.
    pub(crate) fn path(&self, index: usize) -> Result<&Path> {
        self.paths.get(index).map(PathBuf::as_path).ok_or_else(|| {
            Error::invalid(
                "image index",
                format!(
                    "{index} is out of range for the {} images under {}",
                    self.paths.len(),
                    self.root.display()
                ),
            )
        })
    }

    /// The files a lenient open left out, with reasons (empty when strict).
    pub fn skipped(&self) -> &[Skipped] {
        &self.skipped
    }

    /// The pixel limit of the image at `index` (that of the options its folder was opened
    /// with).
    pub(crate) fn max_pixels(&self, index: usize) -> u64 {
        let run = self.limits.partition_point(|&(first, _)| first <= index);
        run.checked_sub(1)
            .and_then(|run| self.limits.get(run))
            .map_or(FolderOptions::DEFAULT_MAX_PIXELS, |&(_, limit)| limit)
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
            limits: Vec::new(),
        };
        let mut flags = Vec::new();
        for (folder, flag) in groups {
            // Each part keeps the pixel limits it was opened with.
            let offset = joined.paths.len();
            for (first, limit) in folder.limits {
                if joined.limits.last().is_none_or(|&(_, last)| last != limit) {
                    joined.limits.push((offset + first, limit));
                }
            }
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
    /// truncated, not an image) or has more pixels than [`FolderOptions::max_pixels`];
    /// [`Error::Io`] when it cannot be opened; [`Error::InvalidArgument`] for an index out of
    /// range.
    fn get(&self, index: usize) -> Result<RgbImage> {
        decode(self.path(index)?, self.max_pixels(index))
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

/// The decoder's limits for images of at most `max_pixels` pixels: each side at most
/// `max_pixels`, allocations at most 8 bytes a pixel (16-bit RGBA) or image's default of
/// 512 MiB, whichever is larger.
fn decoder_limits(max_pixels: u64) -> Limits {
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(
        max_pixels
            .saturating_mul(8)
            .max(limits.max_alloc.unwrap_or(0)),
    );
    limits
}

/// Reads and decodes one image file as 8-bit RGB, refusing from its header one of more than
/// `max_pixels` pixels.
fn decode(path: &Path, max_pixels: u64) -> Result<RgbImage> {
    let image_error = |reason: String| Error::Image {
        path: path.to_path_buf(),
        reason,
    };
    let limits = decoder_limits(max_pixels);
    let max_alloc = limits.max_alloc.unwrap_or(u64::MAX);
    let side = limits.max_image_width.unwrap_or(u32::MAX);
    let too_large = |what: String| {
        image_error(format!(
            "{what} (FolderOptions::with_max_pixels raises the limit)"
        ))
    };
    let decode_error = |e: image::ImageError| match e {
        image::ImageError::Limits(limit) => too_large(match limit.kind() {
            LimitErrorKind::DimensionError => format!(
                "a side is longer than {side} pixels ({limit}), over the limit of \
                 {max_pixels} pixels an image"
            ),
            _ => format!(
                "the decoder needs more than the {max_alloc} bytes allowed for images of at \
                 most {max_pixels} pixels (it says: {limit})"
            ),
        }),
        other => image_error(other.to_string()),
    };
    let mut reader = ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))?;
    reader.limits(limits);
    // The decoder has read the header only: its size is checked before any pixel buffer.
    let decoder = reader.into_decoder().map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(too_large(format!(
            "{width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels an image"
        )));
    }
    // As `ImageReader::decode` does: the pixel buffer counts against the allocation limit.
    let bytes = decoder.total_bytes();
    if bytes > max_alloc {
        return Err(too_large(format!(
            "{width}x{height} pixels of {:?} take {bytes} bytes, more than the {max_alloc} \
             bytes allowed for images of at most {max_pixels} pixels",
            decoder.color_type()
        )));
    }
    let image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    Ok(image.to_rgb8())
}
