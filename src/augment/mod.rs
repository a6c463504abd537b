//! Images to tensors: the evaluation transform and the MoCo v2 training views, as torchvision
//! computes them on PIL images.
//!
//! Images are [`image::RgbImage`] (8-bit RGB, HWC); load any file with the `image` crate and
//! call `.to_rgb8()` to convert grayscale, RGBA or 16-bit images, or wrap a raw HWC buffer with
//! `RgbImage::from_raw`. Every primitive is in [`ops`] with explicit parameters.
//!
//! ```
//! use burn::tensor::Device;
//! use image::RgbImage;
//! use msad::augment::{EvalTransform, TrainAugmentConfig};
//! use rand::SeedableRng;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let images: Vec<RgbImage> = (0..4)
//!     .map(|i| RgbImage::from_fn(48, 40, |x, y| image::Rgb([x as u8 * 5, y as u8 * 6, i * 60])))
//!     .collect();
//! let eval = EvalTransform::new(32, 32).try_batch(&images, &device)?; // 4 × 3 × 32 × 32
//! let augment = TrainAugmentConfig::new().with_size(32).try_init()?;
//! let mut rng = rand::rngs::StdRng::seed_from_u64(7);
//! let (v1, v2) = augment.views(&images, &mut rng, &device)?; // two 4 × 3 × 32 × 32 batches
//! assert_eq!(v1.dims(), [4, 3, 32, 32]);
//! # Ok(())
//! # }
//! ```

pub mod ops;

use burn::config::Config;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rand::rngs::StdRng;
use rand::{Rng, RngExt, SeedableRng};
use rayon::prelude::*;

pub use ops::{CropBox, Filter, IMAGENET_MEAN, IMAGENET_STD};

use crate::{Error, Result};

/// The largest output side a transform accepts (a 16384² RGB image is 768 MiB).
const MAX_SIDE: u32 = 16384;
/// The largest blur σ accepted (far beyond any image's size).
const MAX_SIGMA: f64 = 1000.0;

/// [`check_image_named`] as `image {index}`.
fn check_image(img: &RgbImage, index: usize) -> Result<()> {
    check_image_named(img, || format!("image {index}"))
}

/// An error naming the image (`what()`, called only on failure) when it has no pixels.
pub(crate) fn check_image_named(img: &RgbImage, what: impl FnOnce() -> String) -> Result<()> {
    if img.width() == 0 || img.height() == 0 {
        return Err(Error::InvalidShape {
            what: what(),
            expected: "at least 1 × 1 pixels".into(),
            found: vec![img.height() as usize, img.width() as usize],
        });
    }
    Ok(())
}

/// Normalised CHW batches, one image per `fill` call, written in parallel.
fn batch_tensor(
    n: usize,
    size: (u32, u32),
    device: &Device,
    fill: impl Fn(usize, &mut [f32]) -> Result<()> + Sync,
) -> Result<Tensor<4>> {
    let (w, h) = size;
    let per = 3 * w as usize * h as usize;
    let mut values = vec![0f32; n * per];
    values
        .par_chunks_mut(per.max(1))
        .enumerate()
        .try_for_each(|(i, out)| fill(i, out))?;
    Ok(Tensor::from_data(
        TensorData::new(values, [n, 3, h as usize, w as usize]),
        device,
    ))
}

/// The evaluation transform: resize the shorter side, center-crop, `ToTensor`, `Normalize`.
///
/// Presets: [`EvalTransform::resnet152`] (the reference's Resize(256) bilinear + CenterCrop(224))
/// and [`EvalTransform::resnet18`] (Resize(224) bicubic + CenterCrop(224)); any size with
/// [`EvalTransform::new`] (e.g. 32 px, where CPUs train fast).
#[derive(Config, Debug, PartialEq)]
pub struct EvalTransform {
    /// Shorter side after resizing.
    pub resize: u32,
    /// Side of the square center crop.
    pub crop: u32,
    /// Resampling filter. Default: bicubic.
    #[config(default = "Filter::Bicubic")]
    pub filter: Filter,
    /// Normalisation mean per channel. Default: ImageNet's.
    #[config(default = "IMAGENET_MEAN")]
    pub mean: [f32; 3],
    /// Normalisation standard deviation per channel. Default: ImageNet's.
    #[config(default = "IMAGENET_STD")]
    pub std: [f32; 3],
}

impl EvalTransform {
    /// The reference's ResNet-152 path: Resize(256, bilinear), CenterCrop(224).
    pub fn resnet152() -> Self {
        Self::new(256, 224).with_filter(Filter::Bilinear)
    }

    /// The reference's ResNet-18 path: Resize(224, bicubic), CenterCrop(224).
    pub fn resnet18() -> Self {
        Self::new(224, 224).with_filter(Filter::Bicubic)
    }

    /// Output side (the crop).
    pub fn size(&self) -> u32 {
        self.crop
    }

    pub(crate) fn check(&self) -> Result<()> {
        let valid = 1..=MAX_SIDE;
        if !valid.contains(&self.resize) || !valid.contains(&self.crop) {
            return Err(Error::invalid(
                "EvalTransform",
                format!(
                    "resize {} and crop {} must be in 1..={MAX_SIDE}",
                    self.resize, self.crop
                ),
            ));
        }
        check_mean_std(self.mean, self.std)
    }

    /// The resized and cropped image (before normalisation): [`ops::resize_and_center_crop`],
    /// which computes only the crop. Time and memory go with the crop, not with the image's
    /// shape: a 1 × 65535 image, 224 × 14.7 million pixels once resized to 224, costs one
    /// 224 × 224 crop.
    pub fn try_apply(&self, img: &RgbImage) -> Result<RgbImage> {
        self.check()?;
        check_image(img, 0)?;
        Ok(ops::resize_and_center_crop(
            img,
            self.resize,
            self.crop,
            self.crop,
            self.filter,
        ))
    }

    /// The batch as a B × 3 × crop × crop tensor on `device`, images transformed in parallel.
    /// A zero-sized image is an error naming its index.
    pub fn try_batch(&self, images: &[RgbImage], device: &Device) -> Result<Tensor<4>> {
        self.check()?;
        batch_tensor(images.len(), (self.crop, self.crop), device, |i, out| {
            check_image(&images[i], i)?;
            let img = self.try_apply(&images[i])?;
            ops::to_normalized_chw(&img, self.mean, self.std, out)
        })
    }
}

fn check_mean_std(mean: [f32; 3], std: [f32; 3]) -> Result<()> {
    if mean.iter().any(|m| !m.is_finite()) || std.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(Error::invalid(
            "normalisation",
            format!("mean {mean:?} must be finite and std {std:?} positive"),
        ));
    }
    Ok(())
}

/// The MoCo v2 augmentation MSC trains with (METHOD.md in the repository, Preprocessing); every probability
/// and range is configurable. Defaults are the reference's.
#[derive(Config, Debug, PartialEq)]
pub struct TrainAugmentConfig {
    /// Output side of RandomResizedCrop. Default: 224.
    #[config(default = 224)]
    pub size: u32,
    /// Range of the crop's area fraction. Default: [0.2, 1.0].
    #[config(default = "[0.2, 1.0]")]
    pub scale: [f64; 2],
    /// Range of the crop's aspect ratio. Default: [3/4, 4/3].
    #[config(default = "[3.0 / 4.0, 4.0 / 3.0]")]
    pub ratio: [f64; 2],
    /// Resampling filter of the crop. Default: bilinear.
    #[config(default = "Filter::Bilinear")]
    pub filter: Filter,
    /// Probability of ColorJitter. Default: 0.8.
    #[config(default = 0.8)]
    pub jitter_p: f64,
    /// Brightness jitter: factor uniform in [max(0, 1 − b), 1 + b]. Default: 0.4.
    #[config(default = 0.4)]
    pub brightness: f64,
    /// Contrast jitter. Default: 0.4.
    #[config(default = 0.4)]
    pub contrast: f64,
    /// Saturation jitter. Default: 0.4.
    #[config(default = 0.4)]
    pub saturation: f64,
    /// Hue jitter: shift uniform in [−h, h], h ≤ 0.5. Default: 0.1.
    #[config(default = 0.1)]
    pub hue: f64,
    /// Probability of grayscale. Default: 0.2.
    #[config(default = 0.2)]
    pub grayscale_p: f64,
    /// Probability of Gaussian blur. Default: 0.5.
    #[config(default = 0.5)]
    pub blur_p: f64,
    /// Range of the blur's σ (PIL radius). Default: [0.1, 2.0].
    #[config(default = "[0.1, 2.0]")]
    pub blur_sigma: [f64; 2],
    /// Probability of a horizontal flip. Default: 0.5.
    #[config(default = 0.5)]
    pub flip_p: f64,
    /// Normalisation mean. Default: ImageNet's.
    #[config(default = "IMAGENET_MEAN")]
    pub mean: [f32; 3],
    /// Normalisation standard deviation. Default: ImageNet's.
    #[config(default = "IMAGENET_STD")]
    pub std: [f32; 3],
}

impl TrainAugmentConfig {
    /// The augmentation, after checking every range: size > 0, 0 < scale₀ ≤ scale₁ ≤ 1,
    /// 0 < ratio₀ ≤ ratio₁, probabilities in [0, 1], jitter strengths ≥ 0, hue ≤ 0.5,
    /// 0 < σ₀ ≤ σ₁ ≤ 1000, size ≤ 16384.
    pub fn try_init(&self) -> Result<TrainAugment> {
        let bad = |what: &str, reason: String| Err(Error::invalid(what, reason));
        if !(1..=MAX_SIDE).contains(&self.size) {
            return bad("size", format!("{} must be in 1..={MAX_SIDE}", self.size));
        }
        let [s0, s1] = self.scale;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return bad(
                "scale",
                format!("{:?} must satisfy 0 < min ≤ max ≤ 1", self.scale),
            );
        }
        let [r0, r1] = self.ratio;
        if !(r0 > 0.0 && r0 <= r1 && r1.is_finite()) {
            return bad(
                "ratio",
                format!("{:?} must satisfy 0 < min ≤ max", self.ratio),
            );
        }
        for (name, p) in [
            ("jitter_p", self.jitter_p),
            ("grayscale_p", self.grayscale_p),
            ("blur_p", self.blur_p),
            ("flip_p", self.flip_p),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(name, format!("{p} is not a probability"));
            }
        }
        for (name, v) in [
            ("brightness", self.brightness),
            ("contrast", self.contrast),
            ("saturation", self.saturation),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return bad(name, format!("{v} must be finite and ≥ 0"));
            }
        }
        if !(0.0..=0.5).contains(&self.hue) {
            return bad("hue", format!("{} must be in [0, 0.5]", self.hue));
        }
        let [b0, b1] = self.blur_sigma;
        if !(b0 > 0.0 && b0 <= b1 && b1 <= MAX_SIGMA) {
            return bad(
                "blur_sigma",
                format!(
                    "{:?} must satisfy 0 < min ≤ max ≤ {MAX_SIGMA}",
                    self.blur_sigma
                ),
            );
        }
        check_mean_std(self.mean, self.std)?;
        Ok(TrainAugment {
            config: self.clone(),
        })
    }
}

/// One view's random choices, drawn by [`TrainAugment::sample`] and applied by
/// [`TrainAugment::apply`].
#[derive(Clone, Debug, PartialEq)]
pub struct ViewParams {
    /// The RandomResizedCrop box.
    pub crop: CropBox,
    /// ColorJitter, if applied.
    pub jitter: Option<JitterParams>,
    /// Whether the view is turned gray.
    pub grayscale: bool,
    /// Blur σ, if blurred.
    pub blur_sigma: Option<f32>,
    /// Whether the view is flipped.
    pub flip: bool,
}

/// ColorJitter's factors and the order in which its four operations run.
#[derive(Clone, Debug, PartialEq)]
pub struct JitterParams {
    /// A permutation of 0 = brightness, 1 = contrast, 2 = saturation, 3 = hue.
    pub order: [usize; 4],
    /// Brightness factor.
    pub brightness: f32,
    /// Contrast factor.
    pub contrast: f32,
    /// Saturation factor.
    pub saturation: f32,
    /// Hue shift.
    pub hue: f32,
}

/// The MoCo v2 training augmentation (see [`TrainAugmentConfig`]).
#[derive(Clone, Debug)]
pub struct TrainAugment {
    config: TrainAugmentConfig,
}

impl TrainAugment {
    /// Its configuration.
    pub fn config(&self) -> &TrainAugmentConfig {
        &self.config
    }

    /// torchvision's `RandomResizedCrop.get_params`: up to 10 draws of an area fraction and a
    /// log-uniform aspect ratio; the first box that fits wins, else a center crop clamped to
    /// the ratio range.
    pub fn sample_crop(&self, width: u32, height: u32, rng: &mut impl Rng) -> CropBox {
        let (w, h) = (width as f64, height as f64);
        let area = w * h;
        let [s0, s1] = self.config.scale;
        let [r0, r1] = self.config.ratio;
        let (l0, l1) = (r0.ln(), r1.ln());
        for _ in 0..10 {
            let target = area * uniform(rng, s0, s1);
            let aspect = uniform(rng, l0, l1).exp();
            let cw = ops::round_half_even((target * aspect).sqrt());
            let ch = ops::round_half_even((target / aspect).sqrt());
            if cw > 0.0 && cw <= w && ch > 0.0 && ch <= h {
                let (cw, ch) = (cw as u32, ch as u32);
                let top = rng.random_range(0..=height - ch);
                let left = rng.random_range(0..=width - cw);
                return CropBox {
                    top,
                    left,
                    height: ch,
                    width: cw,
                };
            }
        }
        let in_ratio = w / h;
        let (cw, ch) = if in_ratio < r0 {
            (
                width,
                (ops::round_half_even(w / r0) as u32).clamp(1, height),
            )
        } else if in_ratio > r1 {
            (
                (ops::round_half_even(h * r1) as u32).clamp(1, width),
                height,
            )
        } else {
            (width, height)
        };
        CropBox {
            top: (height - ch) / 2,
            left: (width - cw) / 2,
            height: ch,
            width: cw,
        }
    }

    /// All random choices for one view of a `width` × `height` image, in the pipeline's order.
    pub fn sample(&self, width: u32, height: u32, rng: &mut impl Rng) -> ViewParams {
        let c = &self.config;
        let crop = self.sample_crop(width, height, rng);
        let jitter = (rng.random::<f64>() < c.jitter_p).then(|| {
            let mut order = [0, 1, 2, 3];
            for i in (1..4).rev() {
                order.swap(i, rng.random_range(0..=i));
            }
            let factor = |rng: &mut _, s: f64| uniform(rng, (1.0 - s).max(0.0), 1.0 + s) as f32;
            JitterParams {
                order,
                brightness: factor(rng, c.brightness),
                contrast: factor(rng, c.contrast),
                saturation: factor(rng, c.saturation),
                hue: uniform(rng, -c.hue, c.hue) as f32,
            }
        });
        let grayscale = rng.random::<f64>() < c.grayscale_p;
        let blur_sigma = (rng.random::<f64>() < c.blur_p)
            .then(|| uniform(rng, c.blur_sigma[0], c.blur_sigma[1]) as f32);
        let flip = rng.random::<f64>() < c.flip_p;
        ViewParams {
            crop,
            jitter,
            grayscale,
            blur_sigma,
            flip,
        }
    }

    /// Applies one view's choices (before `ToTensor`/`Normalize`). A crop box outside the
    /// image is an error.
    pub fn apply(&self, img: &RgbImage, params: &ViewParams) -> Result<RgbImage> {
        let size = self.config.size;
        let mut out = ops::resize_region(img, params.crop, size, size, self.config.filter)?;
        if let Some(j) = &params.jitter {
            for op in j.order {
                out = match op {
                    0 => ops::adjust_brightness(&out, j.brightness),
                    1 => ops::adjust_contrast(&out, j.contrast),
                    2 => ops::adjust_saturation(&out, j.saturation),
                    _ => ops::adjust_hue(&out, j.hue),
                };
            }
        }
        if params.grayscale {
            out = ops::to_grayscale(&out);
        }
        if let Some(sigma) = params.blur_sigma {
            out = ops::gaussian_blur(&out, sigma);
        }
        if params.flip {
            out = ops::hflip(&out);
        }
        Ok(out)
    }

    /// The two batches of views for a training step (each B × 3 × size × size on `device`).
    ///
    /// Two seeds per image are drawn from `rng` in order, then every view is made from its own
    /// seeded generator on the rayon pool: the same `rng` state gives the same views whatever
    /// the number of threads. A zero-sized image is an error naming its index.
    pub fn views(
        &self,
        images: &[RgbImage],
        rng: &mut impl Rng,
        device: &Device,
    ) -> Result<(Tensor<4>, Tensor<4>)> {
        for (i, img) in images.iter().enumerate() {
            check_image(img, i)?;
        }
        let seeds: Vec<[u64; 2]> = images
            .iter()
            .map(|_| [rng.random(), rng.random()])
            .collect();
        let size = (self.config.size, self.config.size);
        let view = |which: usize| {
            batch_tensor(images.len(), size, device, |i, out| {
                let mut rng = StdRng::seed_from_u64(seeds[i][which]);
                let img = &images[i];
                let params = self.sample(img.width(), img.height(), &mut rng);
                let view = self.apply(img, &params)?;
                ops::to_normalized_chw(&view, self.config.mean, self.config.std, out)
            })
        };
        Ok((view(0)?, view(1)?))
    }
}

fn uniform(rng: &mut impl Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}
