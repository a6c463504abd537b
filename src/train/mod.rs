//! Fine-tuning an encoder on normal images with the mean-shifted contrastive loss.
//!
//! The loop of the reference code (METHOD.md in the repository, Optimisation): the center is computed once from
//! the pretrained features (evaluation transform), then every epoch visits the normal images in
//! shuffled batches of two MoCo v2 views each, computes the mean-shifted loss and takes an SGD
//! step on the trainable parameters only; BatchNorm stays on its running statistics. After each
//! epoch, when a labelled test set is given, the features are re-extracted and the kNN ROC-AUC
//! reported, as the reference prints it. [`TrainingSession`] runs the steps one at a time; on
//! CPU devices each step's forward and backward run on host memory rather than through
//! autodiff (same gradients, 1.5-2x faster).
//!
//! ```no_run
//! use burn::tensor::Device;
//! use msad::data::Digits;
//! use msad::encoder::{Arch, ResNetConfig};
//! use msad::train::{Control, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let split = Digits::load().one_class(3)?;
//! let encoder = ResNetConfig::from_arch(Arch::Resnet18).try_init(&device)?;
//! let trainer = MscTrainer::new(MscTrainerConfig::new().with_epochs(2))?;
//! let test = Evaluation { images: split.test.as_ref(), anomalous: &split.test_anomalous };
//! let outcome = trainer.fit(encoder, split.train.as_ref(), Some(test), &device, |event: &TrainEvent| {
//!     if let TrainEvent::Epoch(report) = event {
//!         println!("epoch {}: loss {:?}, ROC-AUC {:?}", report.epoch, report.mean_loss, report.auroc);
//!     }
//!     Control::Continue
//! })?;
//! println!("{} epochs", outcome.history.len() - 1);
//! # Ok(())
//! # }
//! ```

use burn::config::Config;
use burn::module::Module;
use burn::tensor::{Device, Tensor};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};

use crate::augment::{EvalTransform, TrainAugmentConfig};
use crate::data::ImageSource;
use crate::encoder::{Arch, FreezePolicy, ResNet, ResNetConfig};
use crate::features::{embed_source, load_images};
use crate::knn::KnnScorer;
use crate::loss::MeanShiftedContrastiveLossConfig;
use crate::{Error, Result};

mod session;

pub use session::TrainingSession;

/// Settings of [`MscTrainer`]; defaults are the reference's.
#[derive(Config, Debug)]
pub struct MscTrainerConfig {
    /// Passes over the normal images. Default: 20.
    #[config(default = 20)]
    pub epochs: usize,
    /// Images per step (two views each); the last partial batch is kept. Default: 64.
    #[config(default = 64)]
    pub batch_size: usize,
    /// SGD learning rate. Default: 1e-5.
    #[config(default = 1e-5)]
    pub lr: f64,
    /// SGD weight decay (added to the gradient, as PyTorch). Default: 5e-5.
    #[config(default = 5e-5)]
    pub weight_decay: f64,
    /// Loss temperature. Default: 0.25.
    #[config(default = 0.25)]
    pub temperature: f64,
    /// Add the angular center loss (and normalise the center). Default: false.
    #[config(default = false)]
    pub angular: bool,
    /// Neighbours of the kNN score. Default: 2.
    #[config(default = 2)]
    pub k: usize,
    /// Which stages do not train. Default: `None`, the reference's choice for the encoder's
    /// architecture (ResNet-152 through `layer2`, nothing otherwise).
    #[config(default = "None")]
    pub freeze: Option<FreezePolicy>,
    /// Seed of the shuffling and of the augmentations. Default: 0.
    #[config(default = 0)]
    pub seed: u64,
    /// The training views. Default: MoCo v2 at 224 px.
    #[config(default = "TrainAugmentConfig::new()")]
    pub augment: TrainAugmentConfig,
    /// The transform for the center, the bank and test images. Default: `None`, the
    /// reference's choice for the encoder's architecture ([`MscTrainerConfig::eval_for`]).
    #[config(default = "None")]
    pub eval: Option<EvalTransform>,
    /// Images per batch when extracting features. Default: 64.
    #[config(default = 64)]
    pub eval_batch_size: usize,
}

impl MscTrainerConfig {
    /// The same settings with training and evaluation images of `size` pixels (the training
    /// crop, and a bicubic resize and crop to `size`, as the reference's ResNet-18 path
    /// resamples): what 32 px runs on CPUs use. Set [`MscTrainerConfig::eval`] afterwards for
    /// another filter.
    pub fn with_image_size(self, size: u32) -> Self {
        let augment = self.augment.clone().with_size(size);
        let eval = EvalTransform::new(size, size);
        self.with_augment(augment).with_eval(Some(eval))
    }

    /// The evaluation transform used with `encoder`: the configured one, or the reference's
    /// for its architecture: Resize(256, bilinear) + CenterCrop(224) for ResNet-152, and
    /// Resize(224, bicubic) + CenterCrop(224) for every other network (the reference's
    /// `backbone == 152` test).
    ///
    /// ```
    /// use msad::encoder::{Arch, ResNetConfig};
    /// use msad::train::MscTrainerConfig;
    ///
    /// let config = MscTrainerConfig::new();
    /// let r152 = config.eval_for(&ResNetConfig::from_arch(Arch::Resnet152));
    /// assert_eq!((r152.resize, r152.crop), (256, 224));
    /// let r18 = config.eval_for(&ResNetConfig::from_arch(Arch::Resnet18));
    /// assert_eq!((r18.resize, r18.crop), (224, 224));
    /// let small = config.with_image_size(32).eval_for(&ResNetConfig::from_arch(Arch::Resnet152));
    /// assert_eq!((small.resize, small.crop), (32, 32));
    /// ```
    pub fn eval_for(&self, encoder: &ResNetConfig) -> EvalTransform {
        match (&self.eval, encoder.arch()) {
            (Some(eval), _) => eval.clone(),
            (None, Some(Arch::Resnet152)) => EvalTransform::resnet152(),
            (None, _) => EvalTransform::resnet18(),
        }
    }
}

/// An error unless every test image has a label.
fn check_labels(test: Evaluation<'_>) -> Result<()> {
    if test.images.len() != test.anomalous.len() {
        return Err(Error::invalid(
            "test labels",
            format!(
                "{} images but {} labels",
                test.images.len(),
                test.anomalous.len()
            ),
        ));
    }
    Ok(())
}

/// Labelled test images for the per-epoch ROC-AUC.
#[derive(Clone, Copy)]
pub struct Evaluation<'a> {
    /// The test images.
    pub images: &'a dyn ImageSource,
    /// Per test image: `true` when anomalous.
    pub anomalous: &'a [bool],
}

/// What the trainer reports.
#[derive(Clone, Debug)]
pub enum TrainEvent {
    /// After each optimisation step.
    Step(StepReport),
    /// Before training (epoch 0, the pretrained features) and after each epoch.
    Epoch(EpochReport),
}

/// One optimisation step.
#[derive(Clone, Debug, PartialEq)]
pub struct StepReport {
    /// Epoch, from 1.
    pub epoch: usize,
    /// Step within the epoch, from 1.
    pub step: usize,
    /// Steps per epoch.
    pub steps: usize,
    /// Images in the batch.
    pub batch: usize,
    /// The batch's loss.
    pub loss: f32,
}

/// One epoch: the mean loss per image and, with a test set, the kNN ROC-AUC after it.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EpochReport {
    /// 0 for the pretrained features, then 1, 2, ...
    pub epoch: usize,
    /// Mean loss per image (`None` for epoch 0).
    pub mean_loss: Option<f64>,
    /// ROC-AUC of the kNN score on the test set, if one was given.
    pub auroc: Option<f64>,
}

/// The observer's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Control {
    /// Keep training.
    Continue,
    /// Stop now (early stopping, cancellation): the encoder is returned as it is.
    Stop,
}

/// What [`MscTrainer::fit`] returns.
#[derive(Debug)]
pub struct TrainOutcome {
    /// The fine-tuned encoder, on the plain (non-autodiff) device.
    pub encoder: ResNet,
    /// The center c (unit-norm with the angular option).
    pub center: Tensor<1>,
    /// Epoch 0 and every completed epoch.
    pub history: Vec<EpochReport>,
    /// Whether the observer stopped the run.
    pub stopped: bool,
}

/// The MSC fine-tuning loop (see the [module docs](self)).
#[derive(Clone, Debug)]
pub struct MscTrainer {
    config: MscTrainerConfig,
}

impl MscTrainer {
    /// A trainer, after checking the settings (batch ≥ 2, positive learning rate,
    /// non-negative weight decay, positive temperature, k ≥ 1, augmentation ranges, evaluation
    /// transform). Zero epochs is allowed: the pretrained baseline.
    pub fn new(config: MscTrainerConfig) -> Result<Self> {
        if config.batch_size < 2 {
            return Err(Error::invalid(
                "batch size",
                format!("{}; the loss needs at least 2 images", config.batch_size),
            ));
        }
        if !(config.lr.is_finite() && config.lr > 0.0) {
            return Err(Error::invalid(
                "learning rate",
                format!("{}; must be positive", config.lr),
            ));
        }
        if !(config.weight_decay.is_finite() && config.weight_decay >= 0.0) {
            return Err(Error::invalid(
                "weight decay",
                format!("{}; must be ≥ 0", config.weight_decay),
            ));
        }
        if config.k == 0 {
            return Err(Error::invalid("k", "0; must be at least 1"));
        }
        if config.eval_batch_size == 0 {
            return Err(Error::invalid("eval batch size", "0; must be at least 1"));
        }
        MeanShiftedContrastiveLossConfig::new()
            .with_temperature(config.temperature)
            .try_init()?;
        config.augment.try_init()?;
        if let Some(eval) = &config.eval {
            eval.check()?;
        }
        Ok(Self { config })
    }

    /// Its settings.
    pub fn config(&self) -> &MscTrainerConfig {
        &self.config
    }

    /// The center: mean of φ over `train` (evaluation transform), unit-norm with `angular`.
    pub fn center(
        &self,
        encoder: &ResNet,
        train: &dyn ImageSource,
        device: &Device,
    ) -> Result<Tensor<1>> {
        Ok(self.center_of(self.train_features(encoder, train, device)?))
    }

    /// φ of the training images (evaluation transform): the center's input and the kNN bank.
    fn train_features(
        &self,
        encoder: &ResNet,
        train: &dyn ImageSource,
        device: &Device,
    ) -> Result<Tensor<2>> {
        if train.is_empty() {
            return Err(Error::invalid("training images", "none given"));
        }
        let eval = self.config.eval_for(encoder.config());
        embed_source(encoder, train, &eval, self.config.eval_batch_size, device)
    }

    /// The mean of `phi`'s rows, unit-norm with `angular`.
    fn center_of(&self, phi: Tensor<2>) -> Tensor<1> {
        let d = phi.dims()[1];
        let center = phi.mean_dim(0).reshape([d]);
        if self.config.angular {
            let norm = center.clone().square().sum().sqrt().clamp_min(1e-12);
            center / norm
        } else {
            center
        }
    }

    /// A run fine-tuning `encoder` around `center` (from [`MscTrainer::center`]) on `device`,
    /// one [`TrainingSession::step`] at a time: what [`MscTrainer::fit`] runs, for custom loops.
    /// The freeze policy, optimiser and loss follow the settings. Errors: a center whose length
    /// is not the encoder's feature dimension.
    pub fn session(
        &self,
        encoder: ResNet,
        center: Tensor<1>,
        device: &Device,
    ) -> Result<TrainingSession> {
        TrainingSession::new(&self.config, encoder, center, device)
    }

    /// kNN ROC-AUC of `test` against the features of `train`, with `encoder` as it is.
    pub fn evaluate(
        &self,
        encoder: &ResNet,
        train: &dyn ImageSource,
        test: Evaluation<'_>,
        device: &Device,
    ) -> Result<f64> {
        check_labels(test)?;
        let bank = self.train_features(encoder, train, device)?;
        self.auroc_against(encoder, bank, test, device)
    }

    /// kNN ROC-AUC of `test` (labels already checked) against the features `bank`.
    fn auroc_against(
        &self,
        encoder: &ResNet,
        bank: Tensor<2>,
        test: Evaluation<'_>,
        device: &Device,
    ) -> Result<f64> {
        let rows = bank.dims()[0];
        let knn = KnnScorer::new(bank, self.config.k.min(rows))?;
        let eval = self.config.eval_for(encoder.config());
        let queries = embed_source(
            encoder,
            test.images,
            &eval,
            self.config.eval_batch_size,
            device,
        )?;
        let scores = crate::host::vec_from_tensor(knn.score(queries)?)?;
        crate::metrics::roc_auc(&scores, test.anomalous)
    }

    /// Fine-tunes `encoder` on `train` (normal images only). `observer` sees every step and
    /// epoch and may stop the run. Reproducible for a seed on a given backend.
    pub fn fit(
        &self,
        encoder: ResNet,
        train: &dyn ImageSource,
        test: Option<Evaluation<'_>>,
        device: &Device,
        mut observer: impl FnMut(&TrainEvent) -> Control,
    ) -> Result<TrainOutcome> {
        let c = &self.config;
        let n = train.len();
        if n < 2 {
            return Err(Error::invalid(
                "training images",
                format!("{n}; at least 2 are needed"),
            ));
        }
        let plain = device.clone().without_autodiff();
        let encoder = encoder.valid().to_device(&plain);
        if let Some(t) = test {
            check_labels(t)?;
        }
        // The pretrained features give both the center and the epoch-0 bank.
        let phi = self.train_features(&encoder, train, &plain)?;
        let center = self.center_of(phi.clone());
        let mut history = Vec::new();
        let auroc = test
            .map(|t| self.auroc_against(&encoder, phi, t, &plain))
            .transpose()?;
        history.push(EpochReport {
            epoch: 0,
            mean_loss: None,
            auroc,
        });
        if observer(&TrainEvent::Epoch(history[0].clone())) == Control::Stop || c.epochs == 0 {
            return Ok(TrainOutcome {
                encoder,
                center,
                history,
                stopped: c.epochs > 0,
            });
        }

        let mut session = self.session(encoder, center.clone(), &plain)?;
        let mut rng = StdRng::seed_from_u64(c.seed);
        let mut order: Vec<usize> = (0..n).collect();
        // A last batch of one image has no negative pair: the reference's loss is 0 there and
        // only weight decay would move the weights; it is skipped.
        let batches = |order: &[usize]| -> Vec<Vec<usize>> {
            order
                .chunks(c.batch_size)
                .filter(|b| b.len() >= 2)
                .map(<[usize]>::to_vec)
                .collect()
        };
        let mut stopped = false;
        'epochs: for epoch in 1..=c.epochs {
            order.shuffle(&mut rng);
            let epoch_batches = batches(&order);
            let steps = epoch_batches.len();
            let (mut total, mut seen) = (0.0f64, 0usize);
            for (step, indices) in epoch_batches.iter().enumerate() {
                let images = load_images(train, indices)?;
                let mut view_rng = StdRng::seed_from_u64(rng.random());
                let b = images.len();
                let value = session.step(&images, &mut view_rng)?;
                if !value.is_finite() {
                    return Err(Error::Backend(format!(
                        "the loss became {value} at epoch {epoch}, step {}",
                        step + 1
                    )));
                }
                total += value as f64 * b as f64;
                seen += b;
                let report = StepReport {
                    epoch,
                    step: step + 1,
                    steps,
                    batch: b,
                    loss: value,
                };
                if observer(&TrainEvent::Step(report)) == Control::Stop {
                    stopped = true;
                    break 'epochs;
                }
            }
            let current = session.encoder();
            let auroc = test
                .map(|t| self.evaluate(&current, train, t, &plain))
                .transpose()?;
            let report = EpochReport {
                epoch,
                mean_loss: (seen > 0).then(|| total / seen as f64),
                auroc,
            };
            history.push(report.clone());
            if observer(&TrainEvent::Epoch(report)) == Control::Stop {
                stopped = epoch < c.epochs;
                break;
            }
        }
        Ok(TrainOutcome {
            encoder: session.into_encoder(),
            center,
            history,
            stopped,
        })
    }
}
