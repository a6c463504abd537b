//! The detector users run: fit MSC on normal images, score new ones, pick a threshold, save
//! and load.
//!
//! ```no_run
//! use burn::tensor::Device;
//! use msad::data::{ImageFolder, ImageSource};
//! use msad::encoder::ResNet;
//! use msad::train::MscTrainerConfig;
//! use msad::Detector;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let normal = ImageFolder::open("good_parts/")?;
//! let encoder = ResNet::from_torchvision("resnet18-f37072fd.pth", &device)?;
//! let detector = Detector::fit(MscTrainerConfig::new().with_epochs(5), encoder, &normal, &device)?;
//! let held_out = ImageFolder::open("more_good_parts/")?;
//! let threshold = Detector::threshold_from_normal_scores(&detector.score_source(&held_out)?, 0.99)?;
//! let suspects = ImageFolder::open("new_parts/")?;
//! let flags = detector.predict_source(&suspects, threshold)?;
//! detector.save("detector/")?;
//! let again = Detector::load("detector/", &device)?;
//! # Ok(())
//! # }
//! ```

use std::path::{Path, PathBuf};

use burn::module::Module;
use burn::store::{ModuleSnapshot, SafetensorsStore};
use burn::tensor::{Device, Tensor};
use image::RgbImage;

use crate::augment::EvalTransform;
use crate::data::ImageSource;
use crate::encoder::{ResNet, ResNetConfig};
use crate::features::{embed_images, embed_source};
use crate::knn::KnnScorer;
use crate::train::{Control, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};
use crate::{Error, Result};

/// The version of the saved-detector format; files of another version are refused.
pub const FORMAT_VERSION: u32 = 1;
const MANIFEST: &str = "detector.json";
const WEIGHTS: &str = "encoder.safetensors";
const CENTER: &str = "center.npy";
const BANK: &str = "bank.npy";

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
}

/// A fitted anomaly detector: encoder, center, the kNN bank of normal features, and the
/// evaluation transform that made them.
#[derive(Debug)]
pub struct Detector {
    encoder: ResNet,
    center: Tensor<1>,
    bank: Tensor<2>,
    knn: KnnScorer,
    eval: EvalTransform,
    eval_batch_size: usize,
    trainer: Option<MscTrainerConfig>,
    device: Device,
}

impl Detector {
    /// Fine-tunes `encoder` with MSC on `normal` images, then builds the kNN bank from their
    /// fine-tuned features.
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
    /// the center and bank computed on `normal`.
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

    fn from_encoder(
        encoder: ResNet,
        center: Tensor<1>,
        normal: &dyn ImageSource,
        config: &MscTrainerConfig,
        device: &Device,
    ) -> Result<Self> {
        let device = device.clone().without_autodiff();
        let eval = config.eval_for(encoder.config());
        let bank = embed_source(&encoder, normal, &eval, config.eval_batch_size, &device)?;
        let knn = KnnScorer::new(bank.clone(), config.k.min(normal.len()))?;
        Ok(Self {
            encoder,
            center,
            bank,
            knn,
            eval,
            eval_batch_size: config.eval_batch_size,
            trainer: Some(config.clone()),
            device,
        })
    }

    /// The fine-tuned encoder.
    pub fn encoder(&self) -> &ResNet {
        &self.encoder
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

    /// Anomaly scores (sum of squared distances to the k nearest normal features) of images,
    /// in batches of the configured size.
    pub fn score(&self, images: &[RgbImage]) -> Result<Vec<f32>> {
        let phi = embed_images(
            &self.encoder,
            images,
            &self.eval,
            self.eval_batch_size,
            &self.device,
        )?;
        self.score_features(phi)
    }

    /// Anomaly scores of every image of `source` (decoded a batch at a time).
    pub fn score_source(&self, source: &dyn ImageSource) -> Result<Vec<f32>> {
        let phi = embed_source(
            &self.encoder,
            source,
            &self.eval,
            self.eval_batch_size,
            &self.device,
        )?;
        self.score_features(phi)
    }

    /// Anomaly scores of features already computed with this detector's encoder (N × D).
    pub fn score_features(&self, features: Tensor<2>) -> Result<Vec<f32>> {
        if features.dims()[0] == 0 {
            return Ok(Vec::new());
        }
        crate::host::vec_from_tensor(self.knn.score(features)?)
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
        let indices = indices
            .try_into_data()
            .map_err(|e| Error::Backend(e.to_string()))?
            .convert::<i64>()
            .try_into_vec::<i64>()
            .map_err(|e| Error::Backend(format!("{e:?}")))?;
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

    /// `score > threshold` per image.
    pub fn predict(&self, images: &[RgbImage], threshold: f32) -> Result<Vec<bool>> {
        Ok(self
            .score(images)?
            .into_iter()
            .map(|s| s > threshold)
            .collect())
    }

    /// `score > threshold` per image of `source`.
    pub fn predict_source(&self, source: &dyn ImageSource, threshold: f32) -> Result<Vec<bool>> {
        Ok(self
            .score_source(source)?
            .into_iter()
            .map(|s| s > threshold)
            .collect())
    }

    /// Writes the detector to the directory `dir` (created if needed): `detector.json` (format
    /// version, layout, transform, settings), `encoder.safetensors` (fine-tuned weights),
    /// `center.npy` and `bank.npy`.
    pub fn save(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let [rows, dim] = self.bank.dims();
        let manifest = Manifest {
            format: "msad-detector".into(),
            version: FORMAT_VERSION,
            msad_version: env!("CARGO_PKG_VERSION").into(),
            encoder: self.encoder.config().clone(),
            eval: self.eval.clone(),
            k: self.knn.k(),
            eval_batch_size: self.eval_batch_size,
            feature_dim: dim,
            bank_rows: rows,
            trainer: self.trainer.clone(),
        };
        let json =
            serde_json::to_string_pretty(&manifest).map_err(|e| Error::Backend(e.to_string()))?;
        let path = dir.join(MANIFEST);
        std::fs::write(&path, json).map_err(|e| Error::io(&path, e))?;
        let weights = dir.join(WEIGHTS);
        let mut store = SafetensorsStore::from_file(&weights).overwrite(true);
        self.encoder
            .save_into(&mut store)
            .map_err(|e| Error::Checkpoint {
                path: weights.clone(),
                reason: e.to_string(),
            })?;
        let center = crate::host::array_from_tensor(self.center.clone())?;
        crate::npy::write_f32(dir.join(CENTER), &center)?;
        crate::npy::write_f32(
            dir.join(BANK),
            &crate::host::array_from_tensor(self.bank.clone())?,
        )?;
        Ok(())
    }

    /// Reads a detector written by [`Detector::save`] onto `device`. A directory written by
    /// another format version, weights that do not fit the recorded layout, or a center or
    /// bank of the wrong size are errors, never a detector that answers wrongly.
    pub fn load(dir: impl AsRef<Path>, device: &Device) -> Result<Self> {
        let dir = dir.as_ref();
        let device = device.clone().without_autodiff();
        let path = dir.join(MANIFEST);
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |path: PathBuf, reason: String| Error::Checkpoint { path, reason };
        let value: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| bad(path.clone(), format!("not a detector manifest: {e}")))?;
        if value.get("format").and_then(|v| v.as_str()) != Some("msad-detector") {
            return Err(bad(path, "not an msad detector manifest".into()));
        }
        let version = value.get("version").and_then(|v| v.as_u64());
        if version != Some(FORMAT_VERSION as u64) {
            return Err(bad(
                path,
                format!("format version {version:?}; this msad reads version {FORMAT_VERSION}"),
            ));
        }
        let manifest: Manifest = serde_json::from_value(value)
            .map_err(|e| bad(path.clone(), format!("invalid manifest: {e}")))?;
        manifest
            .eval
            .check()
            .map_err(|e| bad(path.clone(), format!("evaluation transform: {e}")))?;
        if manifest.eval_batch_size == 0 || manifest.k == 0 {
            return Err(bad(path, "k and the batch size must be at least 1".into()));
        }
        if manifest.encoder.feature_dim() != manifest.feature_dim {
            return Err(bad(
                path,
                "the layout's feature size differs from the recorded one".into(),
            ));
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
        let center = crate::npy::read_f32(dir.join(CENTER))?;
        if center.shape() != [manifest.feature_dim] {
            return Err(Error::InvalidShape {
                what: dir.join(CENTER).display().to_string(),
                expected: format!("[{}]", manifest.feature_dim),
                found: center.shape().to_vec(),
            });
        }
        let bank = crate::npy::read_f32(dir.join(BANK))?;
        if bank.shape() != [manifest.bank_rows, manifest.feature_dim] {
            return Err(Error::InvalidShape {
                what: dir.join(BANK).display().to_string(),
                expected: format!("[{}, {}]", manifest.bank_rows, manifest.feature_dim),
                found: bank.shape().to_vec(),
            });
        }
        let center = crate::host::tensor_from_array::<1>(center, &device)?;
        let bank = crate::host::tensor_from_array::<2>(bank, &device)?;
        let knn = KnnScorer::new(bank.clone(), manifest.k)?;
        Ok(Self {
            encoder,
            center,
            bank,
            knn,
            eval: manifest.eval,
            eval_batch_size: manifest.eval_batch_size,
            trainer: manifest.trainer,
            device,
        })
    }
}
