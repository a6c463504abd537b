//! [`PreparedEncoder`]: a [`ResNet`] that owns its prepared inference engine.

use burn::tensor::{Device, Tensor};

use super::cpu_bridge::{
    CpuInference, forward_prepared, forward_with_stages_prepared, prepare_inference,
};
use super::{ResNet, Stage, l2_normalize};
use crate::Result;

/// A [`ResNet`] and its folded CPU engine, owned together: what a long-lived service keeps so
/// that every call runs on weights read and folded once. [`super::InferenceEncoder`] is the
/// borrowing form, for a model that stays elsewhere.
///
/// On CPU devices (without autodiff) the weights are folded into msad's CPU engine when the
/// encoder is prepared; elsewhere, and for a layout the engine does not cover (logged once), it
/// runs the module's tensor operations. Results equal [`ResNet::forward`]'s.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use msad::encoder::{Arch, PreparedEncoder, ResNetConfig};
///
/// # fn main() -> msad::Result<()> {
/// let device = Device::flex();
/// let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(8).with_widths([8, 8, 8, 8]);
/// let encoder = PreparedEncoder::new(config.try_init(&device)?, &device)?;
/// let images = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
/// assert_eq!(encoder.try_embed(images)?.dims(), [2, 8]);
/// assert_eq!(encoder.model().feature_dim(), 8);
/// # Ok(())
/// # }
/// ```
pub struct PreparedEncoder {
    model: ResNet,
    engine: Option<CpuInference>,
}

impl std::fmt::Debug for PreparedEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PreparedEncoder")
            .field("model", &self.model.config())
            .field("uses_host_engine", &self.uses_host_engine())
            .finish()
    }
}

impl PreparedEncoder {
    /// Prepares `model` for inputs on `device` (reads and folds its weights on CPU devices).
    ///
    /// Errors: a backend failure while reading the weights back.
    pub fn new(model: ResNet, device: &Device) -> Result<Self> {
        let engine = prepare_inference(&model, device)?;
        Ok(Self { model, engine })
    }

    /// The model.
    pub fn model(&self) -> &ResNet {
        &self.model
    }

    /// The model, giving up the prepared engine.
    pub fn into_model(self) -> ResNet {
        self.model
    }

    /// [`ResNet::try_forward`]: the pooled features, B × D.
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        forward_prepared(&self.model, self.engine.as_ref(), images)
    }

    /// [`ResNet::try_embed`]: φ, the L2-normalised features.
    pub fn try_embed(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        self.try_forward(images).map(l2_normalize)
    }

    /// [`ResNet::forward_with_stages_tensor_ops`] on the prepared engine: the pooled features
    /// and the maps after each of `stages`, from one forward pass.
    pub fn try_forward_with_stages(
        &self,
        images: Tensor<4>,
        stages: &[Stage],
    ) -> Result<(Tensor<2>, Vec<Tensor<4>>)> {
        forward_with_stages_prepared(&self.model, self.engine.as_ref(), images, stages)
    }

    /// Whether msad's CPU engine serves this encoder.
    pub fn uses_host_engine(&self) -> bool {
        self.engine.is_some()
    }
}
