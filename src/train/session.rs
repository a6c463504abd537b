//! One fine-tuning run, one optimisation step at a time.

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::{Device, Tensor};
use image::RgbImage;
use rand::Rng;

use super::MscTrainerConfig;
use crate::augment::TrainAugment;
use crate::device::{Route, Work, route};
use crate::encoder::{FreezePolicy, HostTraining, ResNet, Sgd, cpu_training_covers};
use crate::loss::{MeanShiftedContrastiveLoss, MeanShiftedContrastiveLossConfig};
use crate::{Error, Result};

/// A fine-tuning run in progress (from [`MscTrainer::session`](super::MscTrainer::session)):
/// each [`TrainingSession::step`] draws two MoCo v2 views of every image of a batch, computes
/// the mean-shifted loss around the fixed center and takes one SGD step on the trainable
/// parameters. [`MscTrainer::fit`](super::MscTrainer::fit) is a loop over these steps.
///
/// On CPU devices (flex, ndarray) the step runs the encoder's forward and backward on host
/// memory (msad's CPU engines, 1.5-2x faster than autodiff through the backends'
/// convolutions), the weights kept there between steps and updated by the same SGD as
/// burn's (to the bit); [`TrainingSession::encoder`] writes them back into the encoder.
/// Elsewhere the step runs through burn's autodiff. Both compute the same gradients.
///
/// ```
/// use burn::tensor::Device;
/// use image::RgbImage;
/// use msad::encoder::{Arch, ResNetConfig};
/// use msad::train::{MscTrainer, MscTrainerConfig};
/// use rand::SeedableRng;
///
/// # fn main() -> msad::Result<()> {
/// let device = Device::flex();
/// let encoder = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(8).with_widths([8, 8, 8, 8]).try_init(&device)?;
/// let trainer = MscTrainer::new(MscTrainerConfig::new().with_lr(1e-3).with_image_size(32))?;
/// let images: Vec<RgbImage> = (0..4u8).map(|i| RgbImage::from_fn(32, 32, |x, y| image::Rgb([x as u8 * i, y as u8, 7]))).collect();
/// let center = trainer.center(&encoder, &images, &device)?;
/// let mut session = trainer.session(encoder, center, &device)?;
/// let mut rng = rand::rngs::StdRng::seed_from_u64(0);
/// let loss = session.step(&images, &mut rng)?;
/// assert!(loss.is_finite());
/// let fine_tuned = session.into_encoder();
/// # Ok(())
/// # }
/// ```
pub struct TrainingSession {
    /// The encoder on the autodiff device, frozen stages marked (taken only inside a step).
    model: Option<ResNet>,
    optim: ModuleOptimizer,
    loss: MeanShiftedContrastiveLoss,
    augment: TrainAugment,
    center: Tensor<1>,
    center_host: Vec<f32>,
    plain: Device,
    train_device: Device,
    /// The weights on host memory where steps run on msad's CPU training engine (CPU devices,
    /// layouts it covers): updated there step by step, `model` left as it was until
    /// [`TrainingSession::encoder`] writes them back.
    host: Option<HostTraining>,
    /// The SGD update the host steps apply (burn's, as `optim` on the tensor path).
    sgd: Sgd,
    lr: f64,
}

impl TrainingSession {
    pub(super) fn new(
        config: &MscTrainerConfig,
        encoder: ResNet,
        center: Tensor<1>,
        device: &Device,
    ) -> Result<Self> {
        let d = encoder.feature_dim();
        if center.dims() != [d] {
            return Err(Error::InvalidShape {
                what: "center".into(),
                expected: format!("[{d}] (the encoder's feature dimension)"),
                found: center.dims().to_vec(),
            });
        }
        let plain = device.clone().without_autodiff();
        let train_device = plain.clone().autodiff();
        let freeze = config.freeze.unwrap_or_else(|| {
            encoder
                .config()
                .arch()
                .map_or(FreezePolicy::NONE, FreezePolicy::reference)
        });
        // `valid()` switches gradients off everywhere; `train()` restores them on the autodiff
        // device, and the policy then freezes its stages.
        let model = freeze.apply(encoder.valid().fork(&train_device).train());
        let center = center.to_device(&plain);
        let center_host = crate::host::vec_from_tensor(center.clone())?;
        let loss = MeanShiftedContrastiveLossConfig::new()
            .with_temperature(config.temperature)
            .with_angular(config.angular)
            .try_init()?;
        let optim = SgdConfig::new()
            .with_weight_decay(
                (config.weight_decay > 0.0)
                    .then(|| WeightDecayConfig::new(config.weight_decay as f32)),
            )
            .init();
        // Decided once: the CPU engine where the rule routes training there and it covers the
        // layout (checked without reading a weight), else autodiff through the tensor path.
        let host =
            match route(&plain, Work::TrainingStep) == Route::Cpu && cpu_training_covers(&model)? {
                true => Some(HostTraining::new(&model)?),
                false => None,
            };
        Ok(Self {
            model: Some(model),
            optim,
            loss,
            augment: config.augment.try_init()?,
            center,
            center_host,
            host,
            plain,
            train_device,
            sgd: Sgd {
                lr: config.lr as f32,
                weight_decay: (config.weight_decay > 0.0).then_some(config.weight_decay as f32),
            },
            lr: config.lr,
        })
    }

    /// One SGD step on two augmented views of each of `images` (at least 2), the views drawn
    /// from `rng`; returns the batch's loss. A non-finite loss is returned without updating
    /// the weights. Errors: fewer than 2 images, an unusable image (naming its index), a
    /// backend failure.
    pub fn step(&mut self, images: &[RgbImage], rng: &mut impl Rng) -> Result<f32> {
        let b = images.len();
        if b < 2 {
            return Err(Error::invalid(
                "batch",
                format!("{b} images; the loss needs at least 2"),
            ));
        }
        if let Some(host) = &mut self.host {
            let (v1, v2) = self.augment.views(images, rng, &self.plain)?;
            let x = Tensor::cat(vec![v1, v2], 0);
            let dims = x.dims();
            let images = crate::host::vec_from_tensor(x)?;
            let (loss, center) = (&self.loss, &self.center_host);
            let value = host.step(&images, dims, self.sgd, |phi| {
                let d = phi.len() / (2 * b);
                loss.value_and_grad_host(phi, center, b, d)
            })?;
            return Ok(value as f32);
        }
        let model = self
            .model
            .as_ref()
            .expect("the model is back after every step");
        let (v1, v2) = self.augment.views(images, rng, &self.train_device)?;
        // BatchNorm runs on running statistics, so both views go through in one batch.
        let phi = model.try_embed(Tensor::cat(vec![v1, v2], 0))?;
        let d = phi.dims()[1];
        let phi1 = phi.clone().slice([0..b, 0..d]);
        let phi2 = phi.slice([b..2 * b, 0..d]);
        let center = self.center.clone().to_device(&self.train_device);
        let loss = self.loss.try_forward(phi1, phi2, center)?;
        let value = crate::host::vec_from_tensor(loss.clone())?[0];
        if value.is_finite() {
            let grads = GradientsParams::from_grads(loss.backward(), model);
            let model = self
                .model
                .take()
                .expect("the model is back after every step");
            self.model = Some(self.optim.step(self.lr, model, grads));
        }
        Ok(value)
    }

    /// The encoder as it is now, on the plain (non-autodiff) device.
    pub fn encoder(&self) -> ResNet {
        let model = self
            .model
            .as_ref()
            .expect("the model is back after every step")
            .valid();
        match &self.host {
            Some(host) => host.write_back(model),
            None => model,
        }
    }

    /// The fine-tuned encoder, on the plain (non-autodiff) device.
    pub fn into_encoder(self) -> ResNet {
        self.encoder()
    }

    /// Whether steps run on msad's CPU training engine (CPU devices and layouts it covers)
    /// rather than through autodiff.
    pub fn runs_on_host(&self) -> bool {
        self.host.is_some()
    }
}
