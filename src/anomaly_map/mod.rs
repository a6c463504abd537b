//! Anomaly maps: where in an image the anomaly is, from the detector's own fine-tuned encoder.
//!
//! # Method
//!
//! PatchCore-style patch kNN (Roth et al., CVPR 2022) on the intermediate maps of the
//! detector's fine-tuned ResNet, with no extra training and no labels:
//!
//! 1. **Patch features.** The maps after `layer2` and `layer3` (strides 8 and 16; chosen by
//!    [`PatchMapConfig::stages`]) are averaged over each position's 3 × 3 neighbourhood
//!    (zero-padded), `layer3` is upsampled bilinearly to `layer2`'s grid (half-pixel centres, as
//!    PatchCore and anomalib do, which places it about 4 px off at 224 px), each stage's
//!    channels are averaged in groups down to [`PatchMapConfig::channels_per_stage`], and the
//!    stages are concatenated: one feature per position of a 28 × 28 grid at 224 px.
//! 2. **Bank.** The patch features of the normal training images, a uniform random sample of
//!    at most 8 × [`PatchMapConfig::max_patches`] of them kept as they stream (reservoir
//!    sampling, seeded), then `max_patches` of those chosen by PatchCore's greedy coreset
//!    (farthest-point selection on a 128-dimensional random projection).
//! 3. **Map.** Each patch of a new image scores its Euclidean distance to the nearest normal
//!    patch. The grid is upsampled bilinearly to the crop (each cell placed at the centre of
//!    its receptive field), smoothed by a Gaussian of σ = 4 px
//!    at 224 px (anomalib's), and placed back on the image through the inverse of the
//!    evaluation transform (resize, center crop), so the map has the input image's size;
//!    outside the crop the nearest edge of the map is extended.
//! 4. **Units.** [`AnomalyMap::values`] is that map scaled so that its maximum equals the
//!    image's normalised score ([`crate::Scored::normalized`]): the map's maximum *is* the
//!    image-level score, above 0.5 exactly when the image is anomalous, and
//!    [`AnomalyMap::segmentation`] (pixels above 0.5) is empty for every image the detector
//!    calls normal. [`AnomalyMap::distances`] keeps the unscaled map.
//!
//! The image score still comes from the MSC features (the pooled output of `layer4`, kNN to
//! the normal images); the map says where, not whether. Both come out of one forward pass.
//!
//! # Cost
//!
//! One forward pass (the image score's), the patch features (cheap tensor operations), and a
//! 1-nearest-neighbour search of h·w patches (784 at 224 px) against the bank: 784 ×
//! `max_patches` × D multiply-adds, D = 2 × 128 by default, about 2 GFLOP for the default
//! bank of 5,000 patches. The bank holds `max_patches` × D floats (5 MB by default). Fitting
//! the bank runs the encoder once more over the normal images, and the coreset costs
//! (8 · `max_patches`) · `max_patches` · 128 multiply-adds. README gives measured times.
//!
//! ```
//! use burn::tensor::Device;
//! use image::RgbImage;
//! use msad::anomaly_map::PatchMapConfig;
//! use msad::augment::EvalTransform;
//! use msad::data::ImageSource;
//! use msad::encoder::{Arch, ResNetConfig};
//! use msad::train::MscTrainerConfig;
//!
//! struct Tiles(usize);
//! impl ImageSource for Tiles {
//!     fn len(&self) -> usize { self.0 }
//!     fn get(&self, i: usize) -> msad::Result<RgbImage> {
//!         Ok(RgbImage::from_fn(64, 64, |x, y| image::Rgb([((x + y + i as u32) % 7 * 30) as u8, 90, 120])))
//!     }
//!     fn name(&self, i: usize) -> String { format!("tile:{i}") }
//! }
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let encoder = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(4).with_widths([4, 8, 8, 8]).try_init(&device)?;
//! let config = MscTrainerConfig::new().with_image_size(64);
//! let mut detector = msad::Detector::without_training(config, encoder, &Tiles(6), &device)?;
//! detector.fit_anomaly_maps(&Tiles(6), &PatchMapConfig::new().with_max_patches(100))?;
//! let mut image = Tiles(1).get(0)?;
//! for y in 20..30 { for x in 40..50 { image.put_pixel(x, y, image::Rgb([255, 0, 0])); } }
//! let map = detector.anomaly_map(&image)?;
//! assert_eq!(map.values.dim(), (64, 64)); // (height, width): the input image's size
//! assert_eq!(map.max(), map.score.normalized);
//! # Ok(())
//! # }
//! ```

mod coreset;
mod patches;
mod resample;

pub(crate) use patches::{PatchBank, patch_features};

use burn::config::Config;
use image::RgbImage;
use ndarray::Array2;

use crate::augment::EvalTransform;
use crate::augment::ops::source_to_crop;
use crate::encoder::{ResNetConfig, Stage};
use crate::{Error, Result, Scored};

/// The largest side, in pixels, at which a crop's map is smoothed (larger crops are smoothed
/// at this resolution and sampled up): bounds the blur's cost whatever the crop.
const MAX_SMOOTHED_SIDE: usize = 512;

/// How anomaly maps are made (see the [module docs](self) for the method).
///
/// ```
/// use msad::anomaly_map::PatchMapConfig;
/// use msad::encoder::Stage;
///
/// let config = PatchMapConfig::new();
/// assert_eq!(config.stages, vec![Stage::Layer2, Stage::Layer3]);
/// assert_eq!((config.neighbourhood, config.channels_per_stage, config.max_patches), (3, 128, 5000));
/// ```
#[derive(Config, Debug, PartialEq)]
pub struct PatchMapConfig {
    /// The stages whose maps make the patch features (`layer1` .. `layer4`); the finest sets
    /// the grid. Default: `layer2` and `layer3`, as PatchCore.
    #[config(default = "vec![Stage::Layer2, Stage::Layer3]")]
    pub stages: Vec<Stage>,
    /// Side of the (odd) neighbourhood averaged around each position. Default: 3.
    #[config(default = 3)]
    pub neighbourhood: usize,
    /// Channels kept per stage, by averaging groups of channels (all when the stage has
    /// fewer). Default: 128.
    #[config(default = 128)]
    pub channels_per_stage: usize,
    /// Most normal patches kept in the bank (greedy coreset beyond it). Default: 5,000.
    #[config(default = 5000)]
    pub max_patches: usize,
    /// Standard deviation of the Gaussian smoothing, in pixels of a 224 px crop (scaled with
    /// the crop). Default: 4, as anomalib.
    #[config(default = 4.0)]
    pub sigma: f32,
    /// Seed of the random draws (subsampling, coreset start, projection). Default: 0.
    #[config(default = 0)]
    pub seed: u64,
}

impl PatchMapConfig {
    /// The length of a patch feature for a net of layout `encoder`: per stage, its channels
    /// or `channels_per_stage`, whichever is fewer.
    ///
    /// ```
    /// use msad::anomaly_map::PatchMapConfig;
    /// use msad::encoder::{Arch, ResNetConfig};
    ///
    /// let config = PatchMapConfig::new();
    /// assert_eq!(config.patch_dim(&ResNetConfig::from_arch(Arch::Resnet18)), 128 + 128);
    /// ```
    pub fn patch_dim(&self, encoder: &ResNetConfig) -> usize {
        let expansion = encoder.block.expansion();
        self.stages
            .iter()
            .map(|stage| {
                let planes = match stage {
                    Stage::Stem => 0,
                    Stage::Layer1 => encoder.widths[0],
                    Stage::Layer2 => encoder.widths[1],
                    Stage::Layer3 => encoder.widths[2],
                    Stage::Layer4 => encoder.widths[3],
                };
                planes
                    .saturating_mul(expansion)
                    .min(self.channels_per_stage)
            })
            .sum()
    }

    /// The stride, in input pixels, of the finest chosen stage: the patch grid's spacing
    /// (4, 8, 16, 32 for `layer1` .. `layer4`).
    pub fn grid_stride(&self) -> usize {
        self.stages
            .iter()
            .map(|stage| match stage {
                Stage::Stem | Stage::Layer1 => 4,
                Stage::Layer2 => 8,
                Stage::Layer3 => 16,
                Stage::Layer4 => 32,
            })
            .min()
            .unwrap_or(8)
    }

    /// [`Error::InvalidArgument`] for settings no map can be made with.
    pub(crate) fn check(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("PatchMapConfig", reason));
        let mut distinct = self.stages.clone();
        distinct.sort();
        distinct.dedup();
        if self.stages.is_empty()
            || self.stages.contains(&Stage::Stem)
            || distinct.len() != self.stages.len()
        {
            return bad(format!(
                "stages {:?}: choose one or more of layer1 .. layer4, each once",
                self.stages
            ));
        }
        if self.neighbourhood == 0
            || self.neighbourhood.is_multiple_of(2)
            || self.neighbourhood > 15
        {
            return bad(format!(
                "neighbourhood {} must be odd, 1 ..= 15",
                self.neighbourhood
            ));
        }
        if self.channels_per_stage == 0 || self.max_patches == 0 {
            return bad("channels_per_stage and max_patches must be at least 1".into());
        }
        if !(self.sigma >= 0.0 && self.sigma <= 64.0) {
            return bad(format!("sigma {} must be in 0 ..= 64", self.sigma));
        }
        Ok(())
    }
}

/// Where one image is anomalous: a map at the image's resolution and the image's score.
///
/// ```
/// use msad::anomaly_map::AnomalyMap;
/// use msad::Scored;
///
/// let distances = ndarray::array![[1.0, 7.0], [2.0, 3.0]];
/// let map = AnomalyMap::new(distances, Scored { raw: 2.0, normalized: 0.7, anomalous: true });
/// assert_eq!(map.max(), 0.7);
/// assert!((map.values[[1, 0]] - 0.2).abs() < 1e-6);
/// assert_eq!(map.segmentation().iter().filter(|&&m| m).count(), 1);
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct AnomalyMap {
    /// Height × width (the input image's), larger = more anomalous, in the units of
    /// normalised scores: `distances` scaled so that the maximum equals `score.normalized`.
    /// 0.5 is the detector's threshold; an image scored 0 (far below it) has a map of zeros.
    pub values: Array2<f32>,
    /// Height × width: the smoothed Euclidean distance of each pixel's patch to its nearest
    /// normal patch, comparable across images and kept whatever the image's score.
    pub distances: Array2<f32>,
    /// The image's score (from the pooled MSC features, as [`crate::Detector::score_image`]).
    pub score: Scored,
}

impl AnomalyMap {
    /// The map of patch `distances` (height × width) for an image scored `score`: `values`
    /// are the distances scaled so that their maximum is `score.normalized` exactly (all
    /// `score.normalized` where every distance is 0).
    pub fn new(distances: Array2<f32>, score: Scored) -> Self {
        let peak = distances.iter().copied().fold(0.0f32, f32::max);
        let target = score.normalized;
        let values = if peak > 0.0 {
            let scale = target / peak;
            let mut values = distances.mapv(|v| (v * scale).min(target));
            // The maximum is the score exactly, not to within a rounding.
            if let Some(top) = distances.iter().position(|&v| v == peak)
                && let Some(slot) = values.iter_mut().nth(top)
            {
                *slot = target;
            }
            values
        } else {
            distances.mapv(|_| target)
        };
        Self {
            values,
            distances,
            score,
        }
    }

    /// The largest value (the image's normalised score for a detector's map).
    pub fn max(&self) -> f32 {
        self.values
            .iter()
            .copied()
            .fold(f32::NEG_INFINITY, f32::max)
    }

    /// The pixels above the threshold (0.5): the predicted defect, empty for an image the
    /// detector calls normal.
    pub fn segmentation(&self) -> Array2<bool> {
        self.values.mapv(|v| v > 0.5)
    }
}

/// The map of `image` from its patch distances (`grid` h × w) and its score.
pub(crate) fn map_from_distances(
    distances: &[f32],
    (gh, gw): (usize, usize),
    image: &RgbImage,
    eval: &EvalTransform,
    config: &PatchMapConfig,
    score: Scored,
) -> Result<AnomalyMap> {
    if let Some(v) = distances.iter().find(|v| !v.is_finite()) {
        return Err(Error::NonFinite {
            what: "the patch distances of the image".into(),
            detail: format!("{v} (the image or the detector's weights hold non-finite values)"),
        });
    }
    let crop = f64::from(eval.crop);
    // The crop's map is smoothed at no more than MAX_SMOOTHED_SIDE pixels a side (`unit`
    // crop pixels per pixel): the cost of the blur stays bounded for any crop size.
    let side = (eval.crop as usize).min(MAX_SMOOTHED_SIDE);
    let unit = crop / side as f64;
    let euclidean: Vec<f32> = distances.iter().map(|d| d.max(0.0).sqrt()).collect();
    // Grid cell i's receptive field is centred on crop pixel stride · i (every stride-2 conv
    // and pool of a ResNet centres output i on input 2i), not on the half-pixel centre
    // stride · (i + ½) a plain resize would assume: that would shift the map by 3.5 px at
    // layer2.
    let stride = config.grid_stride() as f64;
    let on_crop = resample::sample_grid(&euclidean, (gh, gw), (side, side), |x, y| {
        (
            ((x + 0.5) * unit - 0.5) / stride,
            ((y + 0.5) * unit - 0.5) / stride,
        )
    });
    let sigma = config.sigma * side as f32 / 224.0;
    let on_crop = resample::gaussian_blur(&on_crop, (side, side), sigma);
    let (width, height) = image.dimensions();
    let [(sx, tx), (sy, ty)] = source_to_crop(width, height, eval.resize, eval.crop);
    let (w, h) = (width as usize, height as usize);
    let on_image = resample::sample_grid(&on_crop, (side, side), (h, w), |x, y| {
        (
            ((x + 0.5) * sx + tx) / unit - 0.5,
            ((y + 0.5) * sy + ty) / unit - 0.5,
        )
    });
    let distances = Array2::from_shape_vec((h, w), on_image)
        .map_err(|e| Error::Backend(format!("anomaly map shape: {e}")))?;
    Ok(AnomalyMap::new(distances, score))
}
