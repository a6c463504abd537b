//! torchvision's residual blocks: `BasicBlock`, `Bottleneck` (ResNet v1.5, stride on the 3x3
//! conv) and the `downsample` shortcut, plus the stage that chains them.
//!
//! BatchNorm always normalises with its running statistics, whatever the module's training
//! flags say: the reference keeps the encoder in eval mode for the whole run, fine-tuning
//! included (METHOD.md in the repository, Encoder).

use core::f64::consts::SQRT_2;

use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{BatchNorm, BatchNormConfig, Initializer, PaddingConfig2d};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Tensor};

/// BatchNorm with running statistics (PyTorch's eval mode), on any device, autodiff included:
/// `x · s + (β − μ · s)` with the per-channel `s = γ / sqrt(σ² + eps)` computed on the C
/// channel values, so the activations are read twice rather than four times.
pub(crate) fn batch_norm_eval(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    let [c] = bn.gamma.dims();
    let scale = bn.gamma.val() / (bn.running_var.value() + bn.epsilon).sqrt();
    let shift = bn.beta.val() - bn.running_mean.value() * scale.clone();
    x * scale.reshape([1, c, 1, 1]) + shift.reshape([1, c, 1, 1])
}

/// A conv without bias, initialised as torchvision does (Kaiming normal, fan-out, ReLU gain).
pub(crate) fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    device: &Device,
) -> Conv2d {
    let pad = kernel / 2;
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(false)
        .with_initializer(Initializer::KaimingNormal {
            gain: SQRT_2,
            fan_out_only: true,
        })
        .init(device)
}

/// BatchNorm (eps 1e-5) with torchvision's initial values: weight 1, bias 0.
pub(crate) fn batch_norm(channels: usize, device: &Device) -> BatchNorm {
    BatchNormConfig::new(channels).init(device)
}

/// The shortcut of a block that changes resolution or width: 1x1 conv (stride of the block),
/// then BatchNorm. torchvision keys: `downsample.0.*` (conv) and `downsample.1.*` (BatchNorm).
#[derive(Module, Debug)]
pub struct Downsample {
    /// `downsample.0`.
    pub conv: Conv2d,
    /// `downsample.1`.
    pub bn: BatchNorm,
}

impl Downsample {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        Self {
            conv: conv(in_channels, out_channels, 1, stride, device),
            bn: batch_norm(out_channels, device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        batch_norm_eval(&self.bn, self.conv.forward(x))
    }
}

/// torchvision's `BasicBlock` (ResNet-18/34): two 3x3 convs, expansion 1.
#[derive(Module, Debug)]
pub struct BasicBlock {
    /// 3x3 conv with the block's stride.
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 conv, stride 1.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// The projection shortcut, when the block changes resolution or width.
    pub downsample: Option<Downsample>,
}

impl BasicBlock {
    fn new(in_channels: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || in_channels != planes)
            .then(|| Downsample::new(in_channels, planes, stride, device));
        Self {
            conv1: conv(in_channels, planes, 3, stride, device),
            bn1: batch_norm(planes, device),
            conv2: conv(planes, planes, 3, 1, device),
            bn2: batch_norm(planes, device),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(downsample) => downsample.forward(x.clone()),
            None => x.clone(),
        };
        let out = relu(batch_norm_eval(&self.bn1, self.conv1.forward(x)));
        let out = batch_norm_eval(&self.bn2, self.conv2.forward(out));
        relu(out + identity)
    }
}

/// torchvision's `Bottleneck` (ResNet-50/101/152): 1x1, 3x3 (with the stride, v1.5), 1x1,
/// expansion 4.
#[derive(Module, Debug)]
pub struct Bottleneck {
    /// 1x1 conv reducing to `planes`.
    pub conv1: Conv2d,
    /// BatchNorm after `conv1`.
    pub bn1: BatchNorm,
    /// 3x3 conv with the block's stride.
    pub conv2: Conv2d,
    /// BatchNorm after `conv2`.
    pub bn2: BatchNorm,
    /// 1x1 conv expanding to `4 * planes`.
    pub conv3: Conv2d,
    /// BatchNorm after `conv3`.
    pub bn3: BatchNorm,
    /// The projection shortcut, when the block changes resolution or width.
    pub downsample: Option<Downsample>,
}

impl Bottleneck {
    fn new(in_channels: usize, planes: usize, stride: usize, device: &Device) -> Self {
        let out_channels = planes * BlockKind::Bottleneck.expansion();
        let downsample = (stride != 1 || in_channels != out_channels)
            .then(|| Downsample::new(in_channels, out_channels, stride, device));
        Self {
            conv1: conv(in_channels, planes, 1, 1, device),
            bn1: batch_norm(planes, device),
            conv2: conv(planes, planes, 3, stride, device),
            bn2: batch_norm(planes, device),
            conv3: conv(planes, out_channels, 1, 1, device),
            bn3: batch_norm(out_channels, device),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let identity = match &self.downsample {
            Some(downsample) => downsample.forward(x.clone()),
            None => x.clone(),
        };
        let out = relu(batch_norm_eval(&self.bn1, self.conv1.forward(x)));
        let out = relu(batch_norm_eval(&self.bn2, self.conv2.forward(out)));
        let out = batch_norm_eval(&self.bn3, self.conv3.forward(out));
        relu(out + identity)
    }
}

/// The two residual block designs of torchvision's ResNets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum BlockKind {
    /// Two 3x3 convs (ResNet-18/34).
    Basic,
    /// 1x1, 3x3, 1x1 convs with expansion 4 (ResNet-50/101/152).
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes`: 1 for [`BlockKind::Basic`], 4 for [`BlockKind::Bottleneck`].
    ///
    /// ```
    /// assert_eq!(msad::encoder::BlockKind::Bottleneck.expansion(), 4);
    /// ```
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One residual block of either design.
#[derive(Module, Debug)]
#[allow(clippy::large_enum_variant)]
pub enum ResidualBlock {
    /// A [`BasicBlock`].
    Basic(BasicBlock),
    /// A [`Bottleneck`].
    Bottleneck(Bottleneck),
}

impl ResidualBlock {
    /// The (conv, BatchNorm) pairs of the main path in forward order, and the shortcut's.
    #[allow(clippy::type_complexity)]
    pub(crate) fn conv_bn_pairs(
        &self,
    ) -> (Vec<(&Conv2d, &BatchNorm)>, Option<(&Conv2d, &BatchNorm)>) {
        let (main, downsample) = match self {
            Self::Basic(b) => (vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2)], &b.downsample),
            Self::Bottleneck(b) => (
                vec![(&b.conv1, &b.bn1), (&b.conv2, &b.bn2), (&b.conv3, &b.bn3)],
                &b.downsample,
            ),
        };
        (main, downsample.as_ref().map(|d| (&d.conv, &d.bn)))
    }

    pub(crate) fn new(
        kind: BlockKind,
        in_channels: usize,
        planes: usize,
        stride: usize,
        device: &Device,
    ) -> Self {
        match kind {
            BlockKind::Basic => Self::Basic(BasicBlock::new(in_channels, planes, stride, device)),
            BlockKind::Bottleneck => {
                Self::Bottleneck(Bottleneck::new(in_channels, planes, stride, device))
            }
        }
    }

    /// Applies the block.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        match self {
            Self::Basic(block) => block.forward(x),
            Self::Bottleneck(block) => block.forward(x),
        }
    }
}
