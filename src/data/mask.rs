//! Ground-truth defect masks: reading one against its image, and a folder of images paired
//! with a folder of masks ([`MaskedFolder`]).

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageReader, Limits, RgbImage};
use ndarray::Array2;

use super::{ImageFolder, ImageSource};
use crate::{Error, Result};

/// The mask of the image at `image` (`[row, column]`, the image's height × width, `true`
/// where a mask pixel is above 0), read from `mask`; all `false` when `mask` is `None`. The
/// image's header is read for its size (refused above `max_pixels`), the mask decoded only
/// when its header has that size.
pub(crate) fn read_mask(
    image: &Path,
    mask: Option<PathBuf>,
    max_pixels: u64,
) -> Result<Array2<bool>> {
    let (width, height) = dimensions(image)?;
    let pixels = u64::from(width) * u64::from(height);
    if pixels > max_pixels {
        return Err(Error::Image {
            path: image.to_path_buf(),
            reason: format!(
                "{width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels an \
                 image (FolderOptions::with_max_pixels raises the limit)"
            ),
        });
    }
    let shape = (height as usize, width as usize);
    let Some(path) = mask else {
        return Ok(Array2::from_elem(shape, false));
    };
    let (mask_width, mask_height) = dimensions(&path)?;
    if (mask_width, mask_height) != (width, height) {
        return Err(Error::Dataset {
            path,
            record: None,
            reason: format!(
                "the mask is {mask_width}x{mask_height} but its image {} is {width}x{height}",
                image.display()
            ),
        });
    }
    let mut reader = open_image(&path)?;
    let mut limits = Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    reader.limits(limits);
    let mask = reader
        .decode()
        .map_err(|e| image_error(&path, e))
        .map(DynamicImage::into_luma8)?;
    let anomalous = mask.pixels().map(|p| p.0[0] > 0).collect();
    Array2::from_shape_vec(shape, anomalous).map_err(|e| Error::Dataset {
        path,
        record: None,
        reason: format!("decoded mask does not fill {width}x{height}: {e}"),
    })
}

/// Where the mask of `image` (a file under `images`) lies under `masks`: the same relative
/// folder, named `<stem><suffix>.png`.
pub(crate) fn mask_path_of(image: &Path, images: &Path, masks: &Path, suffix: &str) -> PathBuf {
    let relative = image.strip_prefix(images).unwrap_or(image);
    let stem = relative
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut path = masks.to_path_buf();
    if let Some(parent) = relative.parent().filter(|p| !p.as_os_str().is_empty()) {
        path.push(parent);
    }
    path.push(format!("{stem}{suffix}.png"));
    path
}

/// An image reader for `path`, its format guessed from the contents.
fn open_image(path: &Path) -> Result<ImageReader<std::io::BufReader<std::fs::File>>> {
    ImageReader::open(path)
        .map_err(|e| Error::io(path, e))?
        .with_guessed_format()
        .map_err(|e| Error::io(path, e))
}

/// A decoding error on `path` as an [`Error::Image`] naming it.
fn image_error(path: &Path, error: image::ImageError) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        reason: error.to_string(),
    }
}

/// (width, height) of the image file at `path`, from its header.
fn dimensions(path: &Path) -> Result<(u32, u32)> {
    open_image(path)?
        .into_dimensions()
        .map_err(|e| image_error(path, e))
}

/// A folder of images paired with a folder of masks: the image `<images>/a/b.png` has the mask
/// `<masks>/a/b<suffix>.png` (suffix `_mask` by default, MVTec AD's naming), and an image with
/// no mask file is all normal. It is an [`ImageSource`] of the images; [`MaskedFolder::mask`]
/// reads a mask, for [`crate::metrics::pixel_roc_auc`] and [`crate::metrics::pro_auc`].
///
/// ```no_run
/// use msad::data::{ImageFolder, ImageSource, MaskedFolder};
///
/// # fn main() -> msad::Result<()> {
/// let test = MaskedFolder::new(ImageFolder::open("inspection/images")?, "inspection/masks")?;
/// for i in 0..test.len() {
///     let mask = test.mask(i)?; // height × width, true on the defect
///     println!("{}: {} defect pixels", test.name(i), mask.iter().filter(|&&m| m).count());
/// }
/// # Ok(())
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct MaskedFolder {
    images: ImageFolder,
    masks: PathBuf,
    suffix: String,
}

impl MaskedFolder {
    /// `images` paired with the masks under the directory `masks`, named `<stem>_mask.png`.
    ///
    /// Errors: [`Error::Dataset`] naming `masks` when it is not a directory (a mistyped path
    /// would otherwise make every mask all normal).
    pub fn new(images: ImageFolder, masks: impl AsRef<Path>) -> Result<Self> {
        let masks = masks.as_ref().to_path_buf();
        if !masks.is_dir() {
            return Err(Error::Dataset {
                path: masks,
                record: None,
                reason: "the masks directory does not exist (or is not a directory)".into(),
            });
        }
        Ok(Self {
            images,
            masks,
            suffix: "_mask".into(),
        })
    }

    /// With mask names `<stem><suffix>.png` (`""`: the image's own stem).
    ///
    /// ```no_run
    /// # fn main() -> msad::Result<()> {
    /// let same_names = msad::data::MaskedFolder::new(msad::data::ImageFolder::open("img")?, "gt")?
    ///     .with_suffix("");
    /// # Ok(())
    /// # }
    /// ```
    pub fn with_suffix(mut self, suffix: impl Into<String>) -> Self {
        self.suffix = suffix.into();
        self
    }

    /// The images.
    pub fn images(&self) -> &ImageFolder {
        &self.images
    }

    /// Where the mask of image `index` is looked for.
    ///
    /// Errors: [`Error::InvalidArgument`] for an index out of range.
    pub fn mask_path(&self, index: usize) -> Result<PathBuf> {
        let image = self.images.path(index)?;
        Ok(mask_path_of(
            image,
            self.images.root(),
            &self.masks,
            &self.suffix,
        ))
    }

    /// The mask of image `index`: `[row, column]` of the image's height × width, `true` where
    /// the mask is above 0; all `false` when there is no mask file.
    ///
    /// Errors: [`Error::Dataset`] naming the mask file and both sizes when its size differs
    /// from its image's; [`Error::Image`] naming the file that cannot be decoded (or an image
    /// over the folder's pixel limit); [`Error::InvalidArgument`] for an index out of range.
    pub fn mask(&self, index: usize) -> Result<Array2<bool>> {
        let path = self.mask_path(index)?;
        let mask = path.is_file().then_some(path);
        read_mask(
            self.images.path(index)?,
            mask,
            self.images.max_pixels(index),
        )
    }
}

impl ImageSource for MaskedFolder {
    fn len(&self) -> usize {
        self.images.len()
    }

    fn get(&self, index: usize) -> Result<RgbImage> {
        self.images.get(index)
    }

    fn name(&self, index: usize) -> String {
        self.images.name(index)
    }
}
