//! φ over a whole image source: decode, evaluation transform, encoder, in batches.
//!
//! ```
//! use burn::tensor::Device;
//! use image::RgbImage;
//! use msad::augment::EvalTransform;
//! use msad::data::ImageSource;
//! use msad::encoder::{Arch, ResNetConfig};
//!
//! struct Gradients(usize);
//! impl ImageSource for Gradients {
//!     fn len(&self) -> usize { self.0 }
//!     fn get(&self, i: usize) -> msad::Result<RgbImage> {
//!         Ok(RgbImage::from_fn(20, 20, |x, y| image::Rgb([x as u8 * 9, y as u8 * 9, i as u8])))
//!     }
//!     fn name(&self, i: usize) -> String { format!("gradient:{i}") }
//! }
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let encoder = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(4).with_widths([4, 4, 4, 8]).init(&device);
//! let phi = msad::features::embed_source(&encoder, &Gradients(5), &EvalTransform::new(32, 32), 2, &device)?;
//! assert_eq!(phi.dims(), [5, 8]);
//! # Ok(())
//! # }
//! ```

use burn::tensor::{Device, Tensor};
use image::RgbImage;
use rayon::prelude::*;

use crate::augment::{EvalTransform, check_image_named};
use crate::data::ImageSource;
use crate::encoder::{InferenceEncoder, ResNet};
use crate::{Error, Result};

/// Decodes `indices` of `source` in parallel. An unreadable or zero-sized image is an error
/// naming it (one of them, when several fail).
pub fn load_images(source: &dyn ImageSource, indices: &[usize]) -> Result<Vec<RgbImage>> {
    indices
        .par_iter()
        .map(|&i| {
            let image = source.get(i)?;
            check_image_named(&image, || source.name(i))?;
            Ok(image)
        })
        .collect()
}

/// φ (L2-normalised features, N × D) of every image of `source`, `batch_size` at a time, with
/// the evaluation transform. The encoder runs as is (use `encoder.valid()` for a copy without
/// autodiff); only one batch of decoded images is held at a time.
pub fn embed_source(
    encoder: &ResNet,
    source: &dyn ImageSource,
    eval: &EvalTransform,
    batch_size: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let embedder = InferenceEncoder::new(encoder, device);
    embed_source_with(
        |images| embedder.try_embed(images),
        encoder.feature_dim(),
        source,
        eval,
        batch_size,
        device,
    )
}

/// φ of in-memory images, `batch_size` at a time. A zero-sized image is an error naming its
/// index.
pub fn embed_images(
    encoder: &ResNet,
    images: &[RgbImage],
    eval: &EvalTransform,
    batch_size: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let embedder = InferenceEncoder::new(encoder, device);
    embed_images_with(
        |images| embedder.try_embed(images),
        encoder.feature_dim(),
        images,
        eval,
        batch_size,
        device,
    )
}

/// φ of in-memory images through `embed` (a prepared encoder's `try_embed`), with the same
/// batching and errors as [`embed_images`].
pub(crate) fn embed_images_with(
    embed: impl Fn(Tensor<4>) -> Result<Tensor<2>>,
    feature_dim: usize,
    images: &[RgbImage],
    eval: &EvalTransform,
    batch_size: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    if let Some(empty) = nothing_to_embed(feature_dim, images.len(), batch_size, device)? {
        return Ok(empty);
    }
    // Named by position in `images` (the batches below would name it within its batch).
    for (i, image) in images.iter().enumerate() {
        check_image_named(image, || format!("image {i}"))?;
    }
    let parts = images
        .chunks(batch_size)
        .map(|chunk| embed(eval.try_batch(chunk, device)?))
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(parts, 0))
}

/// φ of every image of `source` through `embed` (a prepared encoder's `try_embed`), with the
/// same batching and errors as [`embed_source`].
pub(crate) fn embed_source_with(
    embed: impl Fn(Tensor<4>) -> Result<Tensor<2>>,
    feature_dim: usize,
    source: &dyn ImageSource,
    eval: &EvalTransform,
    batch_size: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let n = source.len();
    if let Some(empty) = nothing_to_embed(feature_dim, n, batch_size, device)? {
        return Ok(empty);
    }
    let mut parts = Vec::with_capacity(n.div_ceil(batch_size));
    for start in (0..n).step_by(batch_size) {
        let indices: Vec<usize> = (start..(start + batch_size).min(n)).collect();
        let images = load_images(source, &indices)?;
        parts.push(embed(eval.try_batch(&images, device)?)?);
    }
    Ok(Tensor::cat(parts, 0))
}

/// The batch size check, and the 0 × D result when there are no images.
fn nothing_to_embed(
    feature_dim: usize,
    images: usize,
    batch_size: usize,
    device: &Device,
) -> Result<Option<Tensor<2>>> {
    if batch_size == 0 {
        return Err(Error::invalid("batch size", "must be at least 1"));
    }
    Ok((images == 0).then(|| Tensor::zeros([0, feature_dim], device)))
}
