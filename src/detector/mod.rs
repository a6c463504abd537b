//! The detector users run: fit MSC on normal images, calibrate a threshold, score new images
//! one at a time or as a stream, save and load.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use msad::data::{ImageFolder, ImageSource};
//! use msad::encoder::{Arch, ResNet, Weights};
//! use msad::train::MscTrainerConfig;
//! use msad::Detector;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let normal = ImageFolder::open("good_parts/")?;
//! let encoder = ResNet::pretrained(Arch::Resnet18, Weights::ImagenetV1, &device)?;
//! // Fitting also calibrates the threshold (0.99 quantile of leave-one-out normal scores).
//! let detector = Detector::fit(MscTrainerConfig::new().with_epochs(5), encoder, &normal, &device)?;
//! for result in detector.score_each(&ImageFolder::open("new_parts/")?) {
//!     match result.outcome {
//!         Ok(s) => println!("{}: {:.3} {}", result.name, s.normalized, if s.anomalous { "ANOMALY" } else { "ok" }),
//!         Err(e) => eprintln!("{}: {e}", result.name), // one unreadable image, the rest go on
//!     }
//! }
//! detector.save("detector/")?; // threshold included; crash-safe
//! let again = Detector::load("detector/", &device)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Saved detectors
//!
//! [`Detector::save`] writes a directory: `detector.json` (format version, msad version, the
//! layout, transform, k, calibration, and the SHA-256 of every other file),
//! `encoder.safetensors`, `center.npy` and `bank.npy`. It writes them into a temporary sibling
//! directory, fsyncs them, and renames that directory into place; an existing detector there is
//! swapped out in one step on Linux (`renameat2` with `RENAME_EXCHANGE`) and deleted after. A
//! crash, a full disk or an error midway leaves the previous detector as it was. Elsewhere (or
//! on a file system without the exchange) the old one is moved aside first, and a crash in the
//! instant between the two renames leaves it under the sibling name `.<name>.old-*`.
//!
//! [`Detector::load`] checks every file's SHA-256 against the manifest before reading it (a
//! directory mixing the files of two saves, or a modified file, is refused naming the file),
//! checks every `.npy` header against the manifest's shapes and the file's length before
//! allocating, and refuses non-finite weights, center, bank or calibration.

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Int, Tensor};
use image::RgbImage;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::anomaly_map::{PatchBank, PatchMapConfig};
use crate::augment::{EvalTransform, check_image_named};
use crate::data::ImageSource;
use crate::encoder::{PreparedEncoder, ResNet, ResNetConfig};
use crate::features::{embed_images_with, embed_source_with};
use crate::knn::KnnScorer;
use crate::train::{Control, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};
use crate::{Error, Result};

/// The version of the saved-detector format. Version 1 (no file digests, no calibration) is
/// still read; other versions are refused.
pub const FORMAT_VERSION: u32 = 2;
const MANIFEST: &str = "detector.json";
const WEIGHTS: &str = "encoder.safetensors";
const CENTER: &str = "center.npy";
const BANK: &str = "bank.npy";
/// The normal patch features of the anomaly maps, when the detector has them.
const PATCHES: &str = "patches.npy";
/// The data files every detector has, in the order they are written.
const DATA_FILES: [&str; 3] = [WEIGHTS, CENTER, BANK];
/// The largest manifest read (a real one is a few kilobytes).
const MAX_MANIFEST_BYTES: u64 = 1 << 20;

/// What `detector.json` records.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
struct Manifest {
    format: String,
    version: u32,
    msad_version: String,
    encoder: ResNetConfig,
    eval: EvalTransform,
    k: usize,
    eval_batch_size: usize,
    feature_dim: usize,
    bank_rows: usize,
    trainer: Option<MscTrainerConfig>,
    #[serde(default)]
    calibration: Option<Calibration>,
    /// File name → SHA-256 (hex) of every data file (version 2).
    #[serde(default)]
    files: BTreeMap<String, String>,
    /// The anomaly maps' settings and the shape of `patches.npy`, when the detector has them.
    #[serde(default)]
    anomaly_maps: Option<PatchMapManifest>,
}

/// What `detector.json` records of the anomaly maps.
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone)]
struct PatchMapManifest {
    config: PatchMapConfig,
    rows: usize,
    dim: usize,
}

/// The threshold and the normalisation of scores, from the leave-one-out scores of the normal
/// training images ([`Detector::normal_scores`]).
///
/// The threshold is their `quantile`: a new normal image like the training ones scores above it
/// with probability about `1 − quantile` (0.99 → about 1 false alarm per 100 normal images), an
/// estimate that is as good as the training images are representative and numerous (with N
/// images, quantiles above `1 − 1/N` are extrapolations at the largest score).
///
/// Normalised scores follow anomalib: `clamp(0.5 + (raw − threshold) / (max − min), 0, 1)`
/// with `min` and `max` the smallest and largest leave-one-out score, so the threshold maps to
/// 0.5 and a score is anomalous exactly when its normalised score is above 0.5 (ties at the
/// clamps aside, the raw score decides).
///
/// ```
/// use msad::Calibration;
///
/// let c = Calibration::from_normal_scores(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.75)?;
/// assert_eq!(c.threshold, 4.0);
/// assert_eq!(c.normalize(4.0), 0.5);
/// assert_eq!(c.normalize(5.0), 0.75);
/// assert!(c.is_anomalous(4.5) && !c.is_anomalous(4.0));
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The quantile of the normal scores the threshold sits at, in [0, 1].
    pub quantile: f64,
    /// The raw-score threshold: an image scoring above it is anomalous.
    pub threshold: f32,
    /// The smallest leave-one-out normal score.
    pub normal_min: f32,
    /// The largest leave-one-out normal score.
    pub normal_max: f32,
}

impl Calibration {
    /// The calibration from scores of normal images at `quantile` (linear interpolation, as
    /// NumPy's default).
    ///
    /// Errors: [`Error::InvalidArgument`] for a quantile outside [0, 1], no scores, or a
    /// non-finite score.
    pub fn from_normal_scores(scores: &[f32], quantile: f64) -> Result<Self> {
        let threshold = Detector::threshold_from_normal_scores(scores, quantile)?;
        let (normal_min, normal_max) = scores
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &s| {
                (lo.min(s), hi.max(s))
            });
        Ok(Self {
            quantile,
            threshold,
            normal_min,
            normal_max,
        })
    }

    /// Whether a raw score is above the threshold. A NaN score is not compared: the callers
    /// that produce scores refuse it as [`Error::NonFinite`] first.
    pub fn is_anomalous(&self, raw: f32) -> bool {
        raw > self.threshold
    }

    /// The score normalised so that the threshold maps to 0.5, clamped to [0, 1].
    pub fn normalize(&self, raw: f32) -> f32 {
        let span = self.normal_max - self.normal_min;
        let span = if span > 0.0 && span.is_finite() {
            span
        } else {
            self.threshold.abs().max(f32::MIN_POSITIVE)
        };
        (0.5 + (raw - self.threshold) / span).clamp(0.0, 1.0)
    }

    /// [`Error::NonFinite`] unless every number is finite and the quantile in [0, 1].
    fn check(&self, what: &str) -> Result<()> {
        for (name, value) in [
            ("threshold", self.threshold),
            ("normal_min", self.normal_min),
            ("normal_max", self.normal_max),
        ] {
            if !value.is_finite() {
                return Err(Error::NonFinite {
                    what: what.to_string(),
                    detail: format!("{name} is {value}"),
                });
            }
        }
        if !(0.0..=1.0).contains(&self.quantile) {
            return Err(Error::invalid(
                what,
                format!("quantile {} is not in [0, 1]", self.quantile),
            ));
        }
        Ok(())
    }
}

/// One image's score: raw, normalised, and the decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scored {
    /// Sum of squared distances to the k nearest normal features.
    pub raw: f32,
    /// The score normalised so that the threshold maps to 0.5 ([`Calibration::normalize`]).
    pub normalized: f32,
    /// Whether the raw score is above the threshold.
    pub anomalous: bool,
}

/// The result for one image of a source ([`Detector::score_each`]).
#[derive(Debug)]
pub struct ImageResult {
    /// The image's index in the source.
    pub index: usize,
    /// The image's name in the source (its path, for folders).
    pub name: String,
    /// Its score, or why it has none (unreadable, empty, too large, non-finite).
    pub outcome: Result<Scored>,
}

/// A fitted anomaly detector: the encoder (with its prepared engine), the center, the kNN bank
/// of normal features, the evaluation transform that made them, and the calibration.
#[derive(Debug)]
pub struct Detector {
    encoder: PreparedEncoder,
    center: Tensor<1>,
    bank: Tensor<2>,
    knn: KnnScorer,
    eval: EvalTransform,
    eval_batch_size: usize,
    trainer: Option<MscTrainerConfig>,
    calibration: Option<Calibration>,
    /// The bank of normal patches, for anomaly maps ([`Detector::fit_anomaly_maps`]).
    patch_bank: Option<PatchBank>,
    device: Device,
}

mod maps;
mod report;
pub use maps::{MapResult, MapStream};

impl Detector {
    /// The quantile [`Detector::fit`] calibrates at: about 1 false alarm per 100 normal
    /// images.
    pub const DEFAULT_QUANTILE: f64 = 0.99;

    /// Fine-tunes `encoder` with MSC on `normal` images, builds the kNN bank from their
    /// fine-tuned features, and calibrates at [`Detector::DEFAULT_QUANTILE`] (skipped, with a
    /// warning, when there are no more than k normal images).
    pub fn fit(
        config: MscTrainerConfig,
        encoder: ResNet,
        normal: &dyn ImageSource,
        device: &Device,
    ) -> Result<Self> {
        Self::fit_with(config, encoder, normal, None, device, |_: &TrainEvent| {
            Control::Continue
        })
    }

    /// [`Detector::fit`] with a labelled test set for per-epoch ROC-AUC and an observer of the
    /// training (see [`crate::train`]).
    pub fn fit_with(
        config: MscTrainerConfig,
        encoder: ResNet,
        normal: &dyn ImageSource,
        test: Option<Evaluation<'_>>,
        device: &Device,
        observer: impl FnMut(&TrainEvent) -> Control,
    ) -> Result<Self> {
        let trainer = MscTrainer::new(config.clone())?;
        let outcome = trainer.fit(encoder, normal, test, device, observer)?;
        Self::from_encoder(outcome.encoder, outcome.center, normal, &config, device)
    }

    /// A detector from an encoder as it is (no fine-tuning: the paper's kNN baseline), with
    /// the center and bank computed on `normal`, calibrated as [`Detector::fit`] does.
    pub fn without_training(
        config: MscTrainerConfig,
        encoder: ResNet,
        normal: &dyn ImageSource,
        device: &Device,
    ) -> Result<Self> {
        let trainer = MscTrainer::new(config.clone())?;
        let plain = device.clone().without_autodiff();
        let encoder = encoder.valid().to_device(&plain);
        let center = trainer.center(&encoder, normal, &plain)?;
        Self::from_encoder(encoder, center, normal, &config, &plain)
    }

    /// A detector from parts computed elsewhere: an encoder, its center, a bank of normal
    /// features (N × D, unit rows as [`ResNet::embed`] gives), the evaluation transform they
    /// were computed with, and k. Calibrated at [`Detector::DEFAULT_QUANTILE`] when N > k.
    ///
    /// ```
    /// use burn::tensor::{Device, Int, Tensor};
    /// use msad::augment::EvalTransform;
    /// use msad::encoder::{Arch, ResNetConfig};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let device = Device::flex();
    /// let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(4).with_widths([4, 4, 4, 8]);
    /// let bank = msad::encoder::l2_normalize(Tensor::random([10, 8], burn::tensor::Distribution::Default, &device));
    /// let center = Tensor::zeros([8], &device);
    /// let detector = msad::Detector::from_parts(config.try_init(&device)?, center, bank, EvalTransform::new(32, 32), 2, &device)?;
    /// assert!(detector.calibration().is_some());
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// Errors: [`Error::InvalidShape`] for a center or bank whose width is not the encoder's
    /// feature size; [`Error::NonFinite`] for non-finite values; those of [`KnnScorer::new`].
    pub fn from_parts(
        encoder: ResNet,
        center: Tensor<1>,
        bank: Tensor<2>,
        eval: EvalTransform,
        k: usize,
        device: &Device,
    ) -> Result<Self> {
        let device = device.clone().without_autodiff();
        let dim = encoder.feature_dim();
        if center.dims() != [dim] || bank.dims()[1] != dim {
            return Err(Error::InvalidShape {
                what: "center and bank".into(),
                expected: format!("[{dim}] and [N, {dim}]"),
                found: [center.dims().to_vec(), bank.dims().to_vec()].concat(),
            });
        }
        eval.check()?;
        check_finite_tensor(center.clone(), "the center")?;
        check_finite_tensor(bank.clone(), "the bank of normal features")?;
        let rows = bank.dims()[0];
        let mut detector = Self {
            encoder: PreparedEncoder::new(encoder, &device)?,
            center,
            knn: KnnScorer::new(bank.clone(), k)?,
            bank,
            eval,
            eval_batch_size: MscTrainerConfig::new().eval_batch_size,
            trainer: None,
            calibration: None,
            patch_bank: None,
            device,
        };
        if rows > k {
            detector.calibrate(Self::DEFAULT_QUANTILE)?;
        }
        Ok(detector)
    }

    fn from_encoder(
        encoder: ResNet,
        center: Tensor<1>,
        normal: &dyn ImageSource,
        config: &MscTrainerConfig,
        device: &Device,
    ) -> Result<Self> {
        let device = device.clone().without_autodiff();
        let eval = config.eval_for(encoder.config());
        let encoder = PreparedEncoder::new(encoder, &device)?;
        let bank = embed_source_with(
            |images| encoder.try_embed(images),
            encoder.model().feature_dim(),
            normal,
            &eval,
            config.eval_batch_size,
            &device,
        )?;
        check_finite_tensor(bank.clone(), "the bank of normal features")?;
        let knn = KnnScorer::new(bank.clone(), config.k.min(normal.len()))?;
        let mut detector = Self {
            encoder,
            center,
            bank,
            knn,
            eval,
            eval_batch_size: config.eval_batch_size,
            trainer: Some(config.clone()),
            calibration: None,
            patch_bank: None,
            device,
        };
        if normal.len() > detector.knn.k() {
            detector.calibrate(Self::DEFAULT_QUANTILE)?;
        } else {
            log::warn!(
                "Detector: {} normal images, not more than k = {}: not calibrated (no threshold)",
                normal.len(),
                detector.knn.k()
            );
        }
        Ok(detector)
    }

    /// Sets the threshold to the `quantile` of the leave-one-out normal scores and the
    /// normalisation to their range (see [`Calibration`]), and returns it.
    ///
    /// Errors: those of [`Detector::normal_scores`] and [`Calibration::from_normal_scores`].
    pub fn calibrate(&mut self, quantile: f64) -> Result<Calibration> {
        let calibration = Calibration::from_normal_scores(&self.normal_scores()?, quantile)?;
        self.calibration = Some(calibration);
        Ok(calibration)
    }

    /// Sets the calibration (a threshold chosen on validation data, say).
    ///
    /// Errors: [`Error::NonFinite`] for a non-finite threshold or range.
    pub fn set_calibration(&mut self, calibration: Calibration) -> Result<()> {
        calibration.check("calibration")?;
        self.calibration = Some(calibration);
        Ok(())
    }

    /// The calibration, when there is one.
    pub fn calibration(&self) -> Option<&Calibration> {
        self.calibration.as_ref()
    }

    /// The fine-tuned encoder.
    pub fn encoder(&self) -> &ResNet {
        self.encoder.model()
    }

    /// The center c.
    pub fn center(&self) -> &Tensor<1> {
        &self.center
    }

    /// The bank of normal features (N × D).
    pub fn bank(&self) -> &Tensor<2> {
        &self.bank
    }

    /// The evaluation transform applied to every scored image.
    pub fn eval_transform(&self) -> &EvalTransform {
        &self.eval
    }

    /// Raw anomaly scores (sum of squared distances to the k nearest normal features) of
    /// images, in batches of the configured size. Strict: any bad image fails the call.
    pub fn score(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        let phi = embed_images_with(
            |images| self.embed(images),
            self.encoder.model().feature_dim(),
            images,
            &self.eval,
            self.eval_batch_size,
            &self.device,
        )?;
        self.finite_scores(phi)
    }

    /// One image's score, normalised and decided with the stored calibration: the call a
    /// service makes per request. The encoder's weights were folded when the detector was
    /// fitted or loaded, not here.
    ///
    /// Errors: the image's (empty, too large), [`Error::NonFinite`] for a non-finite score,
    /// [`Error::InvalidArgument`] when the detector is not calibrated.
    pub fn score_image(&self, image: &RgbImage) -> Result<Scored> {
        let phi = self.embed_image(image)?;
        let calibration = self.require_calibration()?;
        let raw = self
            .score_features(phi)?
            .first()
            .copied()
            .unwrap_or(f32::NAN);
        scored(raw, calibration, "the image's score")
    }

    /// Raw scores of every image of `source` (decoded a batch at a time). Strict: the first
    /// unreadable image fails the call; [`Detector::score_each`] goes on past it.
    pub fn score_source(&self, source: &dyn ImageSource) -> Result<Vec<f32>> {
        let phi = embed_source_with(
            |images| self.embed(images),
            self.encoder.model().feature_dim(),
            source,
            &self.eval,
            self.eval_batch_size,
            &self.device,
        )?;
        self.finite_scores(phi)
    }

    /// Every image of `source`, scored as a stream, in order: one [`ImageResult`] per image,
    /// where an unreadable, empty or too large image, or a non-finite score, is an error for
    /// that image only. Memory holds one batch of decoded images whatever the source's size.
    /// Without a calibration, every result is that error.
    pub fn score_each<'a>(&'a self, source: &'a dyn ImageSource) -> ScoreStream<'a> {
        BatchStream::new(self, source, Self::score_batch)
    }

    /// [`Detector::score_features`], every score checked finite (an error names the first
    /// image whose score is not).
    fn finite_scores(&self, phi: Tensor<2>) -> Result<Vec<f32>> {
        let scores = self.score_features(phi)?;
        check_finite_scores(&scores)?;
        Ok(scores)
    }

    /// Raw scores of features already computed with this detector's encoder (N × D).
    pub fn score_features(&self, features: Tensor<2>) -> Result<Vec<f32>> {
        if features.dims()[0] == 0 {
            return Ok(Vec::new());
        }
        crate::host::vec_from_tensor(self.knn.score(features)?)
    }

    /// A raw score normalised with the calibration (threshold → 0.5).
    ///
    /// Errors: [`Error::InvalidArgument`] when the detector is not calibrated.
    pub fn normalize(&self, raw: f32) -> Result<f32> {
        Ok(self.require_calibration()?.normalize(raw))
    }

    /// Leave-one-out scores of the detector's own normal images: each bank row scored against
    /// the other rows, i.e. what a new normal image like it would score. Scoring the training
    /// images with [`Detector::score`] instead finds each image itself at distance 0 and gives
    /// scores too low for a threshold. Needs more than k normal images.
    ///
    /// ```no_run
    /// # fn demo(detector: &msad::Detector) -> msad::Result<()> {
    /// let threshold = msad::Detector::threshold_from_normal_scores(&detector.normal_scores()?, 0.99)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn normal_scores(&self) -> Result<Vec<f32>> {
        let [rows, _] = self.bank.dims();
        let k = self.knn.k();
        if rows <= k {
            return Err(Error::invalid(
                "normal images",
                format!("leave-one-out scores need more than k = {k} images, the bank has {rows}"),
            ));
        }
        let scorer = KnnScorer::new(self.bank.clone(), k + 1)?;
        let (distances, indices) = scorer.neighbours(self.bank.clone())?;
        let distances = crate::host::vec_from_tensor(distances)?;
        let indices = indices_to_vec(indices)?;
        Ok((0..rows)
            .map(|row| {
                let d = &distances[row * (k + 1)..(row + 1) * (k + 1)];
                let i = &indices[row * (k + 1)..(row + 1) * (k + 1)];
                // Drop the row itself; when it is not among the k + 1 nearest, that many
                // duplicates sit at distance 0 and dropping the farthest is the same.
                let own = i.iter().position(|&j| j == row as i64).unwrap_or(k);
                d.iter()
                    .enumerate()
                    .filter(|&(n, _)| n != own)
                    .map(|(_, v)| v.max(0.0))
                    .sum()
            })
            .collect())
    }

    /// A threshold from scores of normal images only: their `quantile` (in [0, 1], linear
    /// interpolation as NumPy's default), so that about `1 − quantile` of normal images are
    /// flagged. For users with no anomalous examples to validate on.
    ///
    /// ```
    /// let t = msad::Detector::threshold_from_normal_scores(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.75)?;
    /// assert_eq!(t, 4.0);
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn threshold_from_normal_scores(scores: &[f32], quantile: f64) -> Result<f32> {
        if !(0.0..=1.0).contains(&quantile) {
            return Err(Error::invalid(
                "quantile",
                format!("{quantile} is not in [0, 1]"),
            ));
        }
        if scores.is_empty() {
            return Err(Error::invalid("scores", "no normal scores given"));
        }
        if let Some(i) = scores.iter().position(|s| !s.is_finite()) {
            return Err(Error::invalid("scores", format!("score {i} is not finite")));
        }
        let mut sorted = scores.to_vec();
        sorted.sort_by(f32::total_cmp);
        let pos = quantile * (sorted.len() - 1) as f64;
        let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
        let frac = (pos - lo as f64) as f32;
        Ok(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
    }

    /// Whether each image is anomalous, by the stored threshold.
    ///
    /// Errors: those of [`Detector::score`]; [`Error::InvalidArgument`] when the detector is
    /// not calibrated.
    pub fn predict(&self, images: &[RgbImage]) -> Result<Vec<bool>> {
        let threshold = self.require_calibration()?.threshold;
        self.predict_with_threshold(images, threshold)
    }

    /// `score > threshold` per image, with a threshold of the caller's.
    ///
    /// Errors: [`Error::NonFinite`] for a non-finite threshold; those of [`Detector::score`].
    pub fn predict_with_threshold(&self, images: &[RgbImage], threshold: f32) -> Result<Vec<bool>> {
        check_threshold(threshold)?;
        Ok(self
            .score(images)?
            .into_iter()
            .map(|s| s > threshold)
            .collect())
    }

    /// Whether each image of `source` is anomalous, by the stored threshold (strict).
    pub fn predict_source(&self, source: &dyn ImageSource) -> Result<Vec<bool>> {
        let threshold = self.require_calibration()?.threshold;
        self.predict_source_with_threshold(source, threshold)
    }

    /// `score > threshold` per image of `source`, with a threshold of the caller's (strict).
    pub fn predict_source_with_threshold(
        &self,
        source: &dyn ImageSource,
        threshold: f32,
    ) -> Result<Vec<bool>> {
        check_threshold(threshold)?;
        Ok(self
            .score_source(source)?
            .into_iter()
            .map(|s| s > threshold)
            .collect())
    }

    /// Writes the detector to the directory `dir`, crash-safely (see the module docs):
    /// `detector.json` (format version, msad version, layout, transform, settings,
    /// calibration, the SHA-256 of every other file), `encoder.safetensors` (fine-tuned
    /// weights), `center.npy` and `bank.npy`.
    ///
    /// Errors: [`Error::Io`] for a directory that cannot be written, or a `dir` that exists
    /// and is neither empty nor a saved detector (it is not replaced).
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_checked(dir.as_ref(), &mut |_| Ok(()))
    }

    /// [`Detector::save`], calling `after_file` after each data file is written (tests fail a
    /// save midway through it).
    fn save_checked(
        &self,
        dir: &Path,
        after_file: &mut dyn FnMut(&str) -> Result<()>,
    ) -> Result<()> {
        let name = dir
            .file_name()
            .ok_or_else(|| {
                Error::invalid(
                    "detector directory",
                    format!("{} has no name", dir.display()),
                )
            })?
            .to_string_lossy()
            .into_owned();
        let parent = match dir.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if dir.exists() && !is_replaceable(dir)? {
            return Err(Error::io(
                dir,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "exists and is neither empty nor a saved detector; not replaced",
                ),
            ));
        }
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
        let staging = tempfile::Builder::new()
            .prefix(&format!(".{name}.saving-"))
            .tempdir_in(&parent)
            .map_err(|e| Error::io(&parent, e))?;
        let mut files = BTreeMap::new();
        let data_files = self.data_files();
        for &file in &data_files {
            let path = staging.path().join(file);
            self.write_data_file(file, &path)?;
            files.insert(file.to_string(), sha256_of(&path)?);
            after_file(file)?;
        }
        let [rows, dim] = self.bank.dims();
        let manifest = Manifest {
            format: "msad-detector".into(),
            version: FORMAT_VERSION,
            msad_version: env!("CARGO_PKG_VERSION").into(),
            encoder: self.encoder().config().clone(),
            eval: self.eval.clone(),
            k: self.knn.k(),
            eval_batch_size: self.eval_batch_size,
            feature_dim: dim,
            bank_rows: rows,
            trainer: self.trainer.clone(),
            calibration: self.calibration,
            files,
            anomaly_maps: self.patch_bank.as_ref().map(|bank| {
                let [rows, dim] = bank.patches.dims();
                PatchMapManifest {
                    config: bank.config.clone(),
                    rows,
                    dim,
                }
            }),
        };
        let json =
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::Backend(e.to_string()))?;
        let path = staging.path().join(MANIFEST);
        fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        for file in data_files.iter().chain([&MANIFEST]) {
            let path = staging.path().join(file);
            File::open(&path)
                .and_then(|f| f.sync_all())
                .map_err(|e| Error::io(&path, e))?;
        }
        sync_dir(staging.path());
        after_file(MANIFEST)?;
        let staged = staging.keep();
        let result = replace_dir(&staged, dir, &parent, &name);
        if result.is_err() {
            let _ = fs::remove_dir_all(&staged);
        }
        sync_dir(&parent);
        result
    }

    /// Writes one data file.
    fn write_data_file(&self, file: &str, path: &Path) -> Result<()> {
        match file {
            WEIGHTS => {
                let mut store = SafetensorsStore::from_file(path).overwrite(true);
                self.encoder()
                    .save_into(&mut store)
                    .map_err(|e| Error::Checkpoint {
                        path: path.to_path_buf(),
                        reason: e.to_string(),
                    })
            }
            CENTER => {
                crate::npy::write_f32(path, &crate::host::array_from_tensor(self.center.clone())?)
            }
            PATCHES => match &self.patch_bank {
                Some(bank) => crate::npy::write_f32(
                    path,
                    &crate::host::array_from_tensor(bank.patches.clone())?,
                ),
                None => Ok(()),
            },
            _ => crate::npy::write_f32(path, &crate::host::array_from_tensor(self.bank.clone())?),
        }
    }

    /// The data files this detector saves, in order.
    fn data_files(&self) -> Vec<&'static str> {
        let patches = self.patch_bank.as_ref().map(|_| PATCHES);
        DATA_FILES.into_iter().chain(patches).collect()
    }

    /// Reads a detector written by [`Detector::save`] onto `device`, and prepares its engine.
    ///
    /// Refused, with an error naming the file: another format version; a data file whose
    /// SHA-256 differs from the manifest's (a directory mixing two saves, or a modified file);
    /// weights that do not fit the recorded layout; a `.npy` whose header differs from the
    /// recorded shape or from the file's length (checked before anything is allocated);
    /// non-finite weights, center, bank or calibration; a layout beyond
    /// [`ResNetConfig::validate`]'s caps.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let device = device.clone().without_autodiff();
        let path = dir.join(MANIFEST);
        let bad = |path: PathBuf, reason: String| Error::Checkpoint { path, reason };
        let len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(bad(
                path,
                format!("{len} bytes; a detector manifest has at most {MAX_MANIFEST_BYTES}"),
            ));
        }
        let text = fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(path.clone(), format!("not a detector manifest: {e}")))?;
        if value.get("format").and_then(|v| v.as_str()) != Some("msad-detector") {
            return Err(bad(path, "not an msad detector manifest".into()));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) && version != Some(1) {
            return Err(bad(
                path,
                format!(
                    "format version {version:?}; this msad reads versions 1 and {FORMAT_VERSION}"
                ),
            ));
        }
        // JSON has no NaN or infinity (serde_json writes them as null): name the field.
        if let Some(calibration) = value.get("calibration").filter(|c| !c.is_null()) {
            for field in ["quantile", "threshold", "normal_min", "normal_max"] {
                let number = calibration.get(field);
                if !number.is_some_and(|n| n.is_number()) {
                    return Err(Error::NonFinite {
                        what: format!("{}: calibration", path.display()),
                        detail: format!(
                            "{field} is {}, not a finite number",
                            number.map_or("missing".to_string(), |n| n.to_string())
                        ),
                    });
                }
            }
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| bad(path.clone(), format!("invalid manifest: {e}")))?;
        if manifest.version != FORMAT_VERSION && manifest.anomaly_maps.is_some() {
            return Err(bad(
                path,
                format!(
                    "format version {} records anomaly maps, which only version \
                     {FORMAT_VERSION} (with file digests) has",
                    manifest.version
                ),
            ));
        }
        if manifest.version == FORMAT_VERSION {
            let patches = manifest.anomaly_maps.as_ref().map(|_| PATCHES);
            let expected: Vec<&str> = DATA_FILES.into_iter().chain(patches).collect();
            verify_files(dir, &manifest.files, &expected)?;
        }
        manifest
            .eval
            .check()
            .map_err(|e| bad(path.clone(), format!("evaluation transform: {e}")))?;
        if manifest.eval_batch_size == 0 || manifest.k == 0 {
            return Err(bad(path, "k and the batch size must be at least 1".into()));
        }
        manifest
            .encoder
            .validate()
            .map_err(|e| bad(path.clone(), format!("encoder layout: {e}")))?;
        if manifest.encoder.feature_dim() != manifest.feature_dim {
            return Err(bad(
                path,
                "the layout's feature size differs from the recorded one".into(),
            ));
        }
        if let Some(calibration) = &manifest.calibration {
            calibration.check(&format!("{}: calibration", path.display()))?;
        }
        let mut encoder = manifest.encoder.build(&device)?;
        let weights = dir.join(WEIGHTS);
        let mut store = SafetensorsStore::from_file(&weights);
        let result = encoder
            .load_from(&mut store)
            .map_err(|e| bad(weights.clone(), e.to_string()))?;
        if let Some(e) = result.errors.first() {
            return Err(bad(weights, e.to_string()));
        }
        if let Some((missing, _)) = result.missing.first() {
            return Err(bad(
                weights,
                format!("tensor `{missing}` of the recorded layout is missing"),
            ));
        }
        if let Some(unused) = result.unused.first() {
            return Err(bad(
                weights,
                format!("tensor `{unused}` does not belong to the recorded layout"),
            ));
        }
        crate::encoder::weights::check_weight_values(&encoder, &weights)?;
        let center = crate::npy::read_f32_shaped(dir.join(CENTER), &[manifest.feature_dim])?;
        check_finite_values(center.iter().copied(), &dir.join(CENTER))?;
        let bank = crate::npy::read_f32_shaped(
            dir.join(BANK),
            &[manifest.bank_rows, manifest.feature_dim],
        )?;
        check_finite_values(bank.iter().copied(), &dir.join(BANK))?;
        let center = crate::host::tensor_from_array::<1>(center, &device)?;
        let bank = crate::host::tensor_from_array::<2>(bank, &device)?;
        let patch_bank = match &manifest.anomaly_maps {
            Some(maps) => Some(load_patch_bank(dir, maps, &manifest.encoder, &device)?),
            None => None,
        };
        let knn = KnnScorer::new(bank.clone(), manifest.k)?;
        let mut detector = Self {
            encoder: PreparedEncoder::new(encoder, &device)?,
            center,
            bank,
            knn,
            eval: manifest.eval,
            eval_batch_size: manifest.eval_batch_size,
            trainer: manifest.trainer,
            calibration: manifest.calibration,
            patch_bank,
            device,
        };
        // Version 1 recorded no calibration: compute it as fitting does.
        if detector.calibration.is_none() && manifest.bank_rows > manifest.k {
            detector.calibrate(Self::DEFAULT_QUANTILE)?;
        }
        Ok(detector)
    }

    /// φ of a batch through the prepared encoder.
    fn embed(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        self.encoder.try_embed(images)
    }

    /// φ of one image (1 × D), the image checked first.
    fn embed_image(&self, image: &RgbImage) -> Result<Tensor<2>> {
        check_image_named(image, || "image".into())?;
        self.embed(
            self.eval
                .try_batch(std::slice::from_ref(image), &self.device)?,
        )
    }

    /// The calibration, or an error saying how to get one.
    fn require_calibration(&self) -> Result<&Calibration> {
        self.calibration.as_ref().ok_or_else(|| {
            Error::invalid(
                "detector",
                "not calibrated (no threshold): fit on more than k normal images, or call \
                 calibrate or set_calibration",
            )
        })
    }

    /// The results of images `start..end` of `source`, in order.
    fn score_batch(&self, source: &dyn ImageSource, start: usize, end: usize) -> Vec<ImageResult> {
        let prepared = decode_each(source, start..end, |image| {
            self.eval
                .try_batch(std::slice::from_ref(&image), &self.device)
        });
        let calibration = self.require_calibration();
        let good: Vec<Tensor<4>> = prepared
            .iter()
            .filter_map(|(_, t)| t.as_ref().ok().cloned())
            .collect();
        let scores = match (&calibration, good.is_empty()) {
            (Err(_), _) | (_, true) => Ok(Vec::new()),
            (Ok(_), false) => self
                .embed(Tensor::cat(good, 0))
                .and_then(|phi| self.score_features(phi)),
        };
        let mut scores = match scores {
            Ok(scores) => Ok(scores.into_iter()),
            Err(e) => Err(e.to_string()),
        };
        prepared
            .into_iter()
            .enumerate()
            .map(|(offset, (name, tensor))| {
                let outcome = match (tensor, &calibration, &mut scores) {
                    (Err(e), _, _) => Err(e),
                    (Ok(_), Err(e), _) => Err(Error::invalid("detector", e.to_string())),
                    (Ok(_), Ok(_), Err(message)) => Err(Error::Backend(message.clone())),
                    (Ok(_), Ok(calibration), Ok(scores)) => {
                        let raw = scores.next().unwrap_or(f32::NAN);
                        scored(raw, calibration, &format!("the score of {name}"))
                    }
                };
                ImageResult {
                    index: start + offset,
                    name,
                    outcome,
                }
            })
            .collect()
    }
}

/// A stream of one result per image of a source, in order, a batch decoded and processed at a
/// time: [`ScoreStream`] ([`Detector::score_each`]) and [`MapStream`]
/// ([`Detector::anomaly_map_each`]). Its length is known ([`ExactSizeIterator`]).
///
/// ```no_run
/// # fn demo(detector: &msad::Detector, folder: &msad::data::ImageFolder) {
/// let stream = detector.score_each(folder);
/// println!("{} images to score", stream.len());
/// for result in stream {
///     println!("{}: {:?}", result.name, result.outcome.map(|s| s.normalized));
/// }
/// # }
/// ```
pub struct BatchStream<'a, R> {
    detector: &'a Detector,
    source: &'a dyn ImageSource,
    next: usize,
    ready: VecDeque<R>,
    /// The results of images `start..end` of the source, in order.
    batch: fn(&Detector, &dyn ImageSource, usize, usize) -> Vec<R>,
}

/// The stream of [`Detector::score_each`]: one [`ImageResult`] per image.
pub type ScoreStream<'a> = BatchStream<'a, ImageResult>;

impl<'a, R> BatchStream<'a, R> {
    fn new(
        detector: &'a Detector,
        source: &'a dyn ImageSource,
        batch: fn(&Detector, &dyn ImageSource, usize, usize) -> Vec<R>,
    ) -> Self {
        Self {
            detector,
            source,
            next: 0,
            ready: VecDeque::new(),
            batch,
        }
    }
}

impl<R> std::fmt::Debug for BatchStream<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchStream")
            .field("images", &self.source.len())
            .field("next", &self.next)
            .field("ready", &self.ready.len())
            .finish()
    }
}

impl<R> ExactSizeIterator for BatchStream<'_, R> {}

impl<R> Iterator for BatchStream<'_, R> {
    type Item = R;

    fn next(&mut self) -> Option<R> {
        if self.ready.is_empty() && self.next < self.source.len() {
            let end = (self.next + self.detector.eval_batch_size).min(self.source.len());
            self.ready = (self.batch)(self.detector, self.source, self.next, end).into();
            self.next = end;
        }
        self.ready.pop_front()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.ready.len() + self.source.len().saturating_sub(self.next);
        (left, Some(left))
    }
}

/// Images `range` of `source` decoded in parallel, each checked non-empty and passed to
/// `prepare` on its worker (so that only what `prepare` returns is kept): (name, result) per
/// image, in order; an unreadable image is an error for that image only.
fn decode_each<T: Send>(
    source: &dyn ImageSource,
    range: std::ops::Range<usize>,
    prepare: impl Fn(RgbImage) -> Result<T> + Sync,
) -> Vec<(String, Result<T>)> {
    range
        .into_par_iter()
        .map(|i| {
            let name = source.name(i);
            let prepared = source.get(i).and_then(|image| {
                check_image_named(&image, || name.clone())?;
                prepare(image)
            });
            (name, prepared)
        })
        .collect()
}

/// A [`Scored`] from a raw score, or [`Error::NonFinite`].
fn scored(raw: f32, calibration: &Calibration, what: &str) -> Result<Scored> {
    if !raw.is_finite() {
        return Err(Error::NonFinite {
            what: what.to_string(),
            detail: format!("{raw} (the image or the detector's weights hold non-finite values)"),
        });
    }
    Ok(Scored {
        raw,
        normalized: calibration.normalize(raw),
        anomalous: calibration.is_anomalous(raw),
    })
}

/// The values of an index tensor (kNN neighbours), read back to the host.
fn indices_to_vec(indices: Tensor<2, Int>) -> Result<Vec<i64>> {
    indices
        .try_into_data()
        .map_err(|e| Error::Backend(e.to_string()))?
        .convert::<i64>()
        .try_into_vec::<i64>()
        .map_err(|e| Error::Backend(format!("{e:?}")))
}

/// [`Error::NonFinite`] naming the first non-finite score.
fn check_finite_scores(scores: &[f32]) -> Result<()> {
    match first_non_finite(scores.iter().copied()) {
        Some((i, v)) => Err(Error::NonFinite {
            what: format!("the score of image {i}"),
            detail: format!("{v} (the image or the detector's weights hold non-finite values)"),
        }),
        None => Ok(()),
    }
}

/// The index and value of the first non-finite value.
fn first_non_finite(values: impl IntoIterator<Item = f32>) -> Option<(usize, f32)> {
    values.into_iter().enumerate().find(|(_, v)| !v.is_finite())
}

/// [`Error::NonFinite`] for a non-finite threshold.
fn check_threshold(threshold: f32) -> Result<()> {
    if threshold.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            what: "threshold".into(),
            detail: format!("{threshold}"),
        })
    }
}

/// [`Error::NonFinite`] naming the first non-finite value of a file.
fn check_finite_values(values: impl Iterator<Item = f32>, path: &Path) -> Result<()> {
    match first_non_finite(values) {
        Some((i, v)) => Err(Error::NonFinite {
            what: path.display().to_string(),
            detail: format!("value {i} (row-major) is {v}"),
        }),
        None => Ok(()),
    }
}

/// [`Error::NonFinite`] naming the first non-finite value of a tensor.
fn check_finite_tensor<const D: usize>(tensor: Tensor<D>, what: &str) -> Result<()> {
    match first_non_finite(crate::host::vec_from_tensor(tensor)?) {
        Some((i, v)) => Err(Error::NonFinite {
            what: what.to_string(),
            detail: format!(
                "value {i} (row-major) is {v}: a normal image or the weights hold non-finite values"
            ),
        }),
        None => Ok(()),
    }
}

/// The SHA-256 of a file, in hex.
fn sha256_of(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 16];
    loop {
        let read = file.read(&mut buffer).map_err(|e| Error::io(path, e))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// Checks that `files` names exactly the data files and that each has its recorded SHA-256.
fn verify_files(dir: &Path, files: &BTreeMap<String, String>, expected: &[&str]) -> Result<()> {
    for &file in expected {
        let path = dir.join(file);
        let Some(expected) = files.get(file) else {
            return Err(Error::Checkpoint {
                path: dir.join(MANIFEST),
                reason: format!("no SHA-256 recorded for `{file}`"),
            });
        };
        let found = sha256_of(&path)?;
        if !found.eq_ignore_ascii_case(expected) {
            return Err(Error::Checkpoint {
                path,
                reason: format!(
                    "SHA-256 {found} differs from the manifest's {expected}: the directory mixes \
                     files of two saves, or the file was modified"
                ),
            });
        }
    }
    if let Some(extra) = files.keys().find(|f| !expected.contains(&f.as_str())) {
        return Err(Error::Checkpoint {
            path: dir.join(MANIFEST),
            reason: format!("records a file `{extra}` that is not part of a detector"),
        });
    }
    Ok(())
}

/// The patch bank recorded in a manifest: settings checked, `patches.npy`'s header checked
/// against the recorded shape (and the shape against the layout) before reading, values
/// finite.
fn load_patch_bank(
    dir: &Path,
    maps: &PatchMapManifest,
    encoder: &ResNetConfig,
    device: &Device,
) -> Result<PatchBank> {
    let path = dir.join(PATCHES);
    let bad = |reason: String| Error::Checkpoint {
        path: dir.join(MANIFEST),
        reason,
    };
    maps.config
        .check()
        .map_err(|e| bad(format!("anomaly maps: {e}")))?;
    let dim = maps.config.patch_dim(encoder);
    if maps.dim != dim || maps.rows == 0 || maps.rows > maps.config.max_patches {
        return Err(bad(format!(
            "anomaly maps: {} × {} patches recorded; the settings give 1 ..= {} rows of {dim}",
            maps.rows, maps.dim, maps.config.max_patches
        )));
    }
    let patches = crate::npy::read_f32_shaped(&path, &[maps.rows, maps.dim])?;
    check_finite_values(patches.iter().copied(), &path)?;
    PatchBank::new(
        maps.config.clone(),
        crate::host::tensor_from_array::<2>(patches, device)?,
    )
}

/// Whether `dir` may be replaced by a save: empty, or holding a detector manifest.
fn is_replaceable(dir: &Path) -> Result<bool> {
    if !dir.is_dir() {
        return Ok(false);
    }
    if dir.join(MANIFEST).is_file() {
        return Ok(true);
    }
    let mut entries = fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    Ok(entries.next().is_none())
}

/// Moves `staged` to `dir`. An existing `dir` is swapped with it atomically where the
/// platform can (Linux), else moved aside first; either way the old one is removed after.
fn replace_dir(staged: &Path, dir: &Path, parent: &Path, name: &str) -> Result<()> {
    if !dir.exists() {
        return fs::rename(staged, dir).map_err(|e| Error::io(dir, e));
    }
    if exchange(staged, dir).map_err(|e| Error::io(dir, e))? {
        // `staged` now holds the previous detector.
        let _ = fs::remove_dir_all(staged);
        return Ok(());
    }
    let aside = tempfile::Builder::new()
        .prefix(&format!(".{name}.old-"))
        .tempdir_in(parent)
        .map_err(|e| Error::io(parent, e))?
        .keep();
    // `aside` is an empty directory: renaming a directory over an empty one replaces it.
    fs::rename(dir, &aside).map_err(|e| Error::io(dir, e))?;
    if let Err(e) = fs::rename(staged, dir) {
        // Put the previous detector back.
        let _ = fs::rename(&aside, dir);
        return Err(Error::io(dir, e));
    }
    let _ = fs::remove_dir_all(&aside);
    Ok(())
}

/// Swaps the directories `a` and `b` in one step (`renameat2` with `RENAME_EXCHANGE`), so that
/// `b` holds a complete detector at every instant. `Ok(false)` where the kernel or the file
/// system does not support it.
#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<bool> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let a = CString::new(a.as_os_str().as_bytes())?;
    let b = CString::new(b.as_os_str().as_bytes())?;
    // SAFETY: `a` and `b` are NUL-terminated strings that live until the call returns;
    // renameat2 only reads them, and AT_FDCWD makes relative paths resolve as `fs::rename`'s.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP) => Ok(false),
        _ => Err(error),
    }
}

/// Not available here: [`replace_dir`] moves the old directory aside instead.
#[cfg(not(target_os = "linux"))]
fn exchange(_a: &Path, _b: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// fsyncs a directory (its entries); where directories cannot be opened for that, the files
/// themselves were synced.
fn sync_dir(dir: &Path) {
    if let Ok(handle) = File::open(dir) {
        let _ = handle.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::Digits;
    use crate::encoder::{Arch, ResNetConfig};

    fn small_detector(device: &Device) -> Detector {
        let split = Digits::load().one_class(1).unwrap();
        let encoder = ResNetConfig::from_arch(Arch::Resnet18)
            .with_stem_width(4)
            .with_widths([4, 4, 4, 8])
            .init(device);
        let config = MscTrainerConfig::new()
            .with_image_size(16)
            .with_eval_batch_size(64);
        Detector::without_training(config, encoder, split.train.as_ref(), device).unwrap()
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn exchange_swaps_two_directories_in_one_step() {
        let tmp = tempfile::tempdir().unwrap();
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        fs::create_dir(&a).unwrap();
        fs::create_dir(&b).unwrap();
        fs::write(a.join("new"), b"").unwrap();
        fs::write(b.join("old"), b"").unwrap();
        if exchange(&a, &b).unwrap() {
            assert!(b.join("new").exists() && a.join("old").exists());
            assert!(!b.join("old").exists());
        } else {
            // A file system without the exchange (ext4, tmpfs and btrfs have it): nothing moved.
            eprintln!(
                "renameat2(RENAME_EXCHANGE) unsupported on {}",
                tmp.path().display()
            );
            assert!(a.join("new").exists() && b.join("old").exists());
        }
    }

    #[test]
    fn a_save_that_fails_halfway_leaves_the_previous_detector_loadable() {
        let device = Device::flex();
        let first = small_detector(&device);
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("det");
        first.save(&dir).unwrap();
        let before = fs::read(dir.join(BANK)).unwrap();

        let mut second = small_detector(&device);
        second.calibrate(0.5).unwrap();
        for fail_at in DATA_FILES.iter().chain([&MANIFEST]) {
            let err = second
                .save_checked(&dir, &mut |file| {
                    if file == *fail_at {
                        Err(Error::invalid("test", format!("disk full after {file}")))
                    } else {
                        Ok(())
                    }
                })
                .unwrap_err();
            assert!(err.to_string().contains("disk full"), "{err}");
            let loaded = Detector::load(&dir, &device).unwrap();
            assert_eq!(loaded.calibration(), first.calibration(), "after {fail_at}");
            assert_eq!(fs::read(dir.join(BANK)).unwrap(), before);
            // Nothing but the detector is left in the parent.
            let names: Vec<_> = fs::read_dir(tmp.path())
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                names,
                vec![std::ffi::OsString::from("det")],
                "after {fail_at}"
            );
        }
        second.save(&dir).unwrap();
        assert_eq!(
            Detector::load(&dir, &device).unwrap().calibration(),
            second.calibration()
        );
    }
}
