//! The backbone: torchvision's ResNet-18/34/50/101/152 without `fc`.
//!
//! [`ResNet::forward`] returns the globally average-pooled features (B × 512 for the basic-block
//! nets, B × 2048 for the bottleneck nets); [`ResNet::embed`] returns them L2-normalised as
//! `F.normalize` does (eps 1e-12): the φ(x) of the paper. BatchNorm always normalises with its
//! running statistics, also on an autodiff device, as the reference keeps the model in eval mode.
//!
//! Weights come from torchvision checkpoints ([`ResNet::from_torchvision`], [`weights`]); which
//! parameters train is set by a [`FreezePolicy`]. On CPU devices, inference runs msad's CPU
//! engine (BatchNorm folded into the convs, im2col + sgemm; see ARCHITECTURE.md); an
//! [`InferenceEncoder`] prepares it once for many batches.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use msad::encoder::{Arch, ResNetConfig};
//!
//! let device = Device::flex();
//! // torchvision's resnet18 layout with reduced widths (a small, fast net for the example).
//! let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(8).with_widths([8, 8, 16, 16]);
//! let encoder = config.init(&device);
//! let images = Tensor::<4>::zeros([2, 3, 32, 32], &device);
//! let phi = encoder.embed(images);
//! assert_eq!(phi.dims(), [2, 16]);
//! ```

mod block;
mod cpu_bridge;
mod freeze;
mod prepared;
#[cfg(feature = "pretrained")]
mod pretrained;
pub mod weights;

pub use block::{BasicBlock, BlockKind, Bottleneck, Downsample, ResidualBlock};
pub use freeze::{FreezePolicy, Stage};
pub use prepared::PreparedEncoder;
#[cfg(feature = "pretrained")]
pub use pretrained::{TORCHVISION_WEIGHTS, WeightFile, Weights};

use std::fmt;
use std::str::FromStr;

use burn::config::Config;
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::activation::relu;
use burn::tensor::module::max_pool2d;
use burn::tensor::ops::MaxPoolOptions;
use burn::tensor::{Device, Tensor};

use crate::device::{Route, Work, route};
use crate::{Error, NORM_EPS, Result};

use cpu_bridge::{CpuInference, forward_prepared, prepare_inference, unsupported_falls_back};
pub(crate) use cpu_bridge::{HostTraining, Sgd, cpu_training_covers};

/// The torchvision ResNets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Arch {
    /// `resnet18`: basic blocks 2-2-2-2, 512 features.
    Resnet18,
    /// `resnet34`: basic blocks 3-4-6-3, 512 features.
    Resnet34,
    /// `resnet50`: bottlenecks 3-4-6-3, 2048 features.
    Resnet50,
    /// `resnet101`: bottlenecks 3-4-23-3, 2048 features.
    Resnet101,
    /// `resnet152`: bottlenecks 3-8-36-3, 2048 features.
    Resnet152,
}

impl Arch {
    /// All five, smallest first.
    pub const ALL: [Arch; 5] = [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Resnet101,
        Arch::Resnet152,
    ];

    /// torchvision's name (`resnet18`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
            Arch::Resnet101 => "resnet101",
            Arch::Resnet152 => "resnet152",
        }
    }

    /// The block design.
    pub fn block(self) -> BlockKind {
        match self {
            Arch::Resnet18 | Arch::Resnet34 => BlockKind::Basic,
            _ => BlockKind::Bottleneck,
        }
    }

    /// Blocks per stage.
    pub fn layers(self) -> [usize; 4] {
        match self {
            Arch::Resnet18 => [2, 2, 2, 2],
            Arch::Resnet34 | Arch::Resnet50 => [3, 4, 6, 3],
            Arch::Resnet101 => [3, 4, 23, 3],
            Arch::Resnet152 => [3, 8, 36, 3],
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Arch {
    type Err = Error;

    /// Parses `resnet18` ... `resnet152` (case-insensitive, `resnet-18` accepted).
    fn from_str(s: &str) -> Result<Self> {
        let norm: String = s
            .trim()
            .to_ascii_lowercase()
            .chars()
            .filter(|c| *c != '-' && *c != '_')
            .collect();
        Arch::ALL
            .into_iter()
            .find(|a| a.name() == norm)
            .ok_or_else(|| {
                Error::invalid(
                    "architecture",
                    format!("`{s}`; expected resnet18, resnet34, resnet50, resnet101 or resnet152"),
                )
            })
    }
}

/// Most blocks a stage may have ([`ResNetConfig::validate`]): torchvision's deepest stage is
/// ResNet-152's `layer3` with 36 (ResNet-200's has 36 too).
const MAX_BLOCKS_PER_STAGE: usize = 64;

/// Largest stem width or `planes` of a stage ([`ResNetConfig::validate`]): torchvision's widest
/// is 512 (2048 channels out of a bottleneck stage); 16 times that.
const MAX_WIDTH: usize = 8192;

/// Most parameters a layout may have ([`ResNetConfig::validate`]): 2³⁰ (4 GiB of f32 weights),
/// 17 times ResNet-152's 60 million.
const MAX_PARAMETERS: usize = 1 << 30;

/// The layout of a torchvision-style ResNet.
///
/// The presets ([`ResNetConfig::from_arch`]) are torchvision's; the widths are configurable so
/// that small test nets keep the same key names and structure.
#[derive(Config, Debug, PartialEq)]
pub struct ResNetConfig {
    /// Block design.
    pub block: BlockKind,
    /// Number of blocks in `layer1` .. `layer4`.
    pub layers: [usize; 4],
    /// Output channels of the stem conv (`conv1`). Default: 64 (torchvision).
    #[config(default = 64)]
    pub stem_width: usize,
    /// `planes` of each stage; a stage outputs `planes * expansion` channels.
    /// Default: `[64, 128, 256, 512]` (torchvision).
    #[config(default = "[64, 128, 256, 512]")]
    pub widths: [usize; 4],
}

impl ResNetConfig {
    /// torchvision's layout for `arch`.
    ///
    /// ```
    /// use msad::encoder::{Arch, ResNetConfig};
    /// assert_eq!(ResNetConfig::from_arch(Arch::Resnet50).feature_dim(), 2048);
    /// ```
    pub fn from_arch(arch: Arch) -> Self {
        Self::new(arch.block(), arch.layers())
    }

    /// The torchvision architecture this config is, if it is one (widths included).
    pub fn arch(&self) -> Option<Arch> {
        Arch::ALL.into_iter().find(|a| Self::from_arch(*a) == *self)
    }

    /// Length of the feature vector: `widths[3] * expansion` (saturating, for a config that
    /// [`ResNetConfig::validate`] would refuse).
    pub fn feature_dim(&self) -> usize {
        self.widths[3].saturating_mul(self.block.expansion())
    }

    /// Checks that every width and block count is non-zero and within bounds generous for
    /// real nets: at most 64 blocks per stage (torchvision's deepest stage has 36), widths
    /// (stem and `planes`) at most 8192 (torchvision's widest is 512), and at most 2³⁰
    /// parameters in all (4 GiB; ResNet-152 has 60 million). Every path that builds a
    /// [`ResNet`] from a config checks it first, so that a layout read from a file cannot make
    /// msad loop or allocate without bound.
    pub fn validate(&self) -> Result<()> {
        let bad = |reason: String| Err(Error::invalid("ResNetConfig", reason));
        if self.stem_width == 0 || self.widths.contains(&0) {
            return bad(format!(
                "widths must be non-zero (stem {}, stages {:?})",
                self.stem_width, self.widths
            ));
        }
        if self.stem_width > MAX_WIDTH || self.widths.iter().any(|&w| w > MAX_WIDTH) {
            return bad(format!(
                "widths must be at most {MAX_WIDTH} (stem {}, stages {:?})",
                self.stem_width, self.widths
            ));
        }
        if self.layers.contains(&0) {
            return bad(format!(
                "every stage needs a block (layers {:?})",
                self.layers
            ));
        }
        if self.layers.iter().any(|&l| l > MAX_BLOCKS_PER_STAGE) {
            return bad(format!(
                "at most {MAX_BLOCKS_PER_STAGE} blocks per stage (layers {:?})",
                self.layers
            ));
        }
        let parameters = self.parameter_count();
        if parameters > MAX_PARAMETERS {
            return bad(format!(
                "{parameters} parameters; at most {MAX_PARAMETERS} (2^30) are supported \
                 (layers {:?}, stem {}, stages {:?})",
                self.layers, self.stem_width, self.widths
            ));
        }
        Ok(())
    }

    /// The number of floats of [`ResNetConfig::torchvision_keys`], computed without listing
    /// them; only for a config within the width and block caps (no overflow there: every
    /// term is below 2⁴⁰ and there are at most 4 · 64 blocks).
    fn parameter_count(&self) -> usize {
        let expansion = self.block.expansion();
        let bn = |c: usize| 4 * c;
        let mut total = self.stem_width * 3 * 7 * 7 + bn(self.stem_width);
        let mut in_channels = self.stem_width;
        for (i, (&blocks, &planes)) in self.layers.iter().zip(&self.widths).enumerate() {
            let out = planes * expansion;
            for b in 0..blocks {
                total += match self.block {
                    BlockKind::Basic => {
                        planes * in_channels * 9 + planes * planes * 9 + 2 * bn(planes)
                    }
                    BlockKind::Bottleneck => {
                        planes * in_channels
                            + planes * planes * 9
                            + out * planes
                            + 2 * bn(planes)
                            + bn(out)
                    }
                };
                if (i > 0 && b == 0) || in_channels != out {
                    total += out * in_channels + bn(out);
                }
                in_channels = out;
            }
        }
        total
    }

    /// Builds the network with torchvision's initialisation (Kaiming-normal convs, BatchNorm 1/0).
    ///
    /// # Panics
    /// On a config [`ResNetConfig::validate`] refuses (a zero or oversized width or block
    /// count); use [`ResNetConfig::try_init`] for user-supplied configs.
    pub fn init(&self, device: &Device) -> ResNet {
        self.try_init(device).expect("invalid ResNetConfig")
    }

    /// [`ResNetConfig::init`] that returns an error on an invalid config
    /// ([`ResNetConfig::validate`]), before anything is allocated.
    ///
    /// The random weights are drawn here, in the module's order, from the device's RNG: after
    /// `device.seed(s)`, the same config gives the same network whichever path (or thread)
    /// reads it first.
    pub fn try_init(&self, device: &Device) -> Result<ResNet> {
        let model = self.build(device)?;
        initialise_in_order(&model);
        Ok(model)
    }

    /// The network with burn's lazily initialised parameters (nothing drawn yet): for loaders,
    /// which replace every weight. Validates the config first.
    pub(crate) fn build(&self, device: &Device) -> Result<ResNet> {
        self.validate()?;
        let expansion = self.block.expansion();
        let mut in_channels = self.stem_width;
        let mut stages = Vec::with_capacity(4);
        for (i, (&blocks, &planes)) in self.layers.iter().zip(&self.widths).enumerate() {
            let stride = if i == 0 { 1 } else { 2 };
            let stage: Vec<ResidualBlock> = (0..blocks)
                .map(|b| {
                    let block = ResidualBlock::new(
                        self.block,
                        in_channels,
                        planes,
                        if b == 0 { stride } else { 1 },
                        device,
                    );
                    in_channels = planes * expansion;
                    block
                })
                .collect();
            stages.push(stage);
        }
        let [layer1, layer2, layer3, layer4]: [Vec<ResidualBlock>; 4] =
            stages.try_into().expect("four stages");
        Ok(ResNet {
            conv1: block::conv(3, self.stem_width, 7, 2, device),
            bn1: block::batch_norm(self.stem_width, device),
            layer1,
            layer2,
            layer3,
            layer4,
            config: self.clone(),
        })
    }

    /// Every tensor of a torchvision `state_dict` for this layout, with its shape, in
    /// torchvision's key names (`fc.*` and `num_batches_tracked` excluded). The list has a
    /// few entries per block: [`ResNetConfig::validate`] a config read from a file first.
    ///
    /// ```
    /// use msad::encoder::{Arch, ResNetConfig};
    /// let keys = ResNetConfig::from_arch(Arch::Resnet18).torchvision_keys();
    /// assert!(keys.iter().any(|(k, s)| k == "layer2.0.downsample.0.weight" && s == &[128, 64, 1, 1]));
    /// ```
    pub fn torchvision_keys(&self) -> Vec<(String, Vec<usize>)> {
        let mut keys = Vec::new();
        let bn = |keys: &mut Vec<(String, Vec<usize>)>, prefix: &str, c: usize| {
            for name in ["weight", "bias", "running_mean", "running_var"] {
                keys.push((format!("{prefix}.{name}"), vec![c]));
            }
        };
        keys.push(("conv1.weight".into(), vec![self.stem_width, 3, 7, 7]));
        bn(&mut keys, "bn1", self.stem_width);
        let expansion = self.block.expansion();
        let mut in_channels = self.stem_width;
        for (i, (&blocks, &planes)) in self.layers.iter().zip(&self.widths).enumerate() {
            let out = planes * expansion;
            for b in 0..blocks {
                let p = format!("layer{}.{b}", i + 1);
                let stride = if i > 0 && b == 0 { 2 } else { 1 };
                match self.block {
                    BlockKind::Basic => {
                        keys.push((format!("{p}.conv1.weight"), vec![planes, in_channels, 3, 3]));
                        bn(&mut keys, &format!("{p}.bn1"), planes);
                        keys.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
                        bn(&mut keys, &format!("{p}.bn2"), planes);
                    }
                    BlockKind::Bottleneck => {
                        keys.push((format!("{p}.conv1.weight"), vec![planes, in_channels, 1, 1]));
                        bn(&mut keys, &format!("{p}.bn1"), planes);
                        keys.push((format!("{p}.conv2.weight"), vec![planes, planes, 3, 3]));
                        bn(&mut keys, &format!("{p}.bn2"), planes);
                        keys.push((format!("{p}.conv3.weight"), vec![out, planes, 1, 1]));
                        bn(&mut keys, &format!("{p}.bn3"), out);
                    }
                }
                if stride != 1 || in_channels != out {
                    keys.push((
                        format!("{p}.downsample.0.weight"),
                        vec![out, in_channels, 1, 1],
                    ));
                    bn(&mut keys, &format!("{p}.downsample.1"), out);
                }
                in_channels = out;
            }
        }
        keys
    }
}

/// torchvision's ResNet with `fc` removed: stem, four stages, global average pooling.
#[derive(Module, Debug)]
pub struct ResNet {
    /// 7x7 stride-2 stem conv.
    pub conv1: Conv2d,
    /// Stem BatchNorm.
    pub bn1: BatchNorm,
    /// Stage 1 (stride 1).
    pub layer1: Vec<ResidualBlock>,
    /// Stage 2 (stride 2).
    pub layer2: Vec<ResidualBlock>,
    /// Stage 3 (stride 2).
    pub layer3: Vec<ResidualBlock>,
    /// Stage 4 (stride 2).
    pub layer4: Vec<ResidualBlock>,
    /// The layout this net was built from.
    #[module(skip)]
    config: ResNetConfig,
}

impl ResNet {
    /// Pooled features, B × [`ResNet::feature_dim`], from images B × 3 × H × W (normalised
    /// with the ImageNet mean and std). Any H, W ≥ 1 works; torchvision's nets expect ≥ 32.
    ///
    /// On CPU devices without autodiff this runs msad's CPU engine, folding the weights for
    /// this one call ([`InferenceEncoder`] folds them once for many calls); elsewhere, and for
    /// a layout the engine does not cover, [`ResNet::forward_tensor_ops`].
    ///
    /// # Panics
    /// If `images` does not have 3 channels, or the backend fails to read the weights back;
    /// use [`ResNet::try_forward`] for unchecked input.
    pub fn forward(&self, images: Tensor<4>) -> Tensor<2> {
        match self.forward_routed(images) {
            Ok(features) => features,
            Err(err) => panic!("ResNet::forward: {err}"),
        }
    }

    /// The forward on the path [`crate::device::route`] picks.
    fn forward_routed(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        if route(&images.device(), Work::Inference) == Route::Cpu
            && let Some(engine) = unsupported_falls_back(CpuInference::new(self))?
        {
            return engine.forward(images);
        }
        Ok(self.forward_tensor_ops(images))
    }

    /// [`ResNet::forward`] as a chain of backend tensor operations on any device, also where
    /// `forward` would use the CPU engine (CPU devices without autodiff). The specification
    /// the CPU engine is tested against.
    pub fn forward_tensor_ops(&self, images: Tensor<4>) -> Tensor<2> {
        let x = self.stem_tensor_ops(images);
        let x = [&self.layer1, &self.layer2, &self.layer3, &self.layer4]
            .into_iter()
            .flatten()
            .fold(x, |x, block| block.forward(x));
        let [b, c, _, _] = x.dims();
        // Adaptive average pooling to 1x1, then flatten.
        x.mean_dim(3).mean_dim(2).reshape([b, c])
    }

    /// [`ResNet::forward_tensor_ops`] that also returns the spatial maps after each of
    /// `stages` (B × C × h × w, in the order given): the intermediate features that anomaly
    /// maps are made of. Only `layer1` .. `layer4` have maps; [`Stage::Stem`] is an error, as
    /// are images that are not B × 3 × H × W with B, H, W ≥ 1.
    ///
    /// ```
    /// use burn::tensor::{Device, Tensor};
    /// use msad::encoder::{Arch, ResNetConfig, Stage};
    ///
    /// # fn main() -> msad::Result<()> {
    /// let device = Device::flex();
    /// let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(4).with_widths([4, 4, 8, 8]);
    /// let model = config.try_init(&device)?;
    /// let images = Tensor::<4>::random([1, 3, 64, 64], burn::tensor::Distribution::Default, &device);
    /// let (pooled, maps) = model.forward_with_stages_tensor_ops(images, &[Stage::Layer3, Stage::Layer2])?;
    /// assert_eq!(pooled.dims(), [1, 8]);
    /// assert_eq!(maps[0].dims(), [1, 8, 4, 4]); // layer3: stride 16
    /// assert_eq!(maps[1].dims(), [1, 4, 8, 8]); // layer2: stride 8
    /// # Ok(())
    /// # }
    /// ```
    pub fn forward_with_stages_tensor_ops(
        &self,
        images: Tensor<4>,
        stages: &[Stage],
    ) -> Result<(Tensor<2>, Vec<Tensor<4>>)> {
        check_images(&images)?;
        let taps = self.stage_taps(stages)?;
        let mut x = self.stem_tensor_ops(images);
        let mut kept: Vec<Option<Tensor<4>>> = vec![None; taps.len()];
        let blocks = [&self.layer1, &self.layer2, &self.layer3, &self.layer4];
        for (i, block) in blocks.into_iter().flatten().enumerate() {
            x = block.forward(x);
            for (slot, &tap) in kept.iter_mut().zip(&taps) {
                if tap == i + 1 {
                    *slot = Some(x.clone());
                }
            }
        }
        let [b, c, _, _] = x.dims();
        let pooled = x.mean_dim(3).mean_dim(2).reshape([b, c]);
        Ok((pooled, kept.into_iter().flatten().collect()))
    }

    /// `conv1`, `bn1`, ReLU and the max-pool, as tensor operations.
    fn stem_tensor_ops(&self, images: Tensor<4>) -> Tensor<4> {
        let x = self.conv1.forward(images);
        let x = relu(block::batch_norm_eval(&self.bn1, x));
        max_pool2d(
            x,
            MaxPoolOptions::new([3, 3])
                .with_stride([2, 2])
                .with_padding([1, 1]),
        )
    }

    /// The number of blocks run at the end of each of `stages` (1-based), as the engines tap
    /// them; [`Stage::Stem`] is an error.
    pub(crate) fn stage_taps(&self, stages: &[Stage]) -> Result<Vec<usize>> {
        let layers = self.config.layers;
        stages
            .iter()
            .map(|stage| {
                let through = match stage {
                    Stage::Stem => {
                        return Err(Error::invalid(
                            "feature stage",
                            "the stem has no map of its own; choose layer1 .. layer4",
                        ));
                    }
                    Stage::Layer1 => 1,
                    Stage::Layer2 => 2,
                    Stage::Layer3 => 3,
                    Stage::Layer4 => 4,
                };
                Ok(layers[..through].iter().sum())
            })
            .collect()
    }

    /// [`ResNet::forward`] after checking the input is B × 3 × H × W with B, H, W ≥ 1; a
    /// backend failure is an error here, not a panic.
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        check_images(&images)?;
        self.forward_routed(images)
    }

    /// φ(x): the pooled features divided by `max(‖·‖₂, 1e-12)` (`F.normalize`).
    ///
    /// # Panics
    /// As [`ResNet::forward`].
    pub fn embed(&self, images: Tensor<4>) -> Tensor<2> {
        l2_normalize(self.forward(images))
    }

    /// [`ResNet::embed`] after checking the input shape.
    pub fn try_embed(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        self.try_forward(images).map(l2_normalize)
    }

    /// Length of the feature vector (512 or 2048 for torchvision's nets).
    pub fn feature_dim(&self) -> usize {
        self.config.feature_dim()
    }

    /// The layout this net was built from.
    pub fn config(&self) -> &ResNetConfig {
        &self.config
    }
}

/// A [`ResNet`] prepared for many forward passes with the same weights: on CPU devices
/// (without autodiff) the weights are read back and folded into msad's CPU engine once, here,
/// instead of on every [`ResNet::forward`] call. Elsewhere, and for a layout the engine does
/// not cover (logged once as a warning), it runs the module itself. Results equal
/// [`ResNet::forward`]'s; build a new one after the weights change.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// use msad::encoder::{Arch, InferenceEncoder, ResNetConfig};
///
/// # fn main() -> msad::Result<()> {
/// let device = Device::flex();
/// let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(8).with_widths([8, 8, 8, 8]);
/// let model = config.try_init(&device)?;
/// let encoder = InferenceEncoder::new(&model, &device);
/// for _ in 0..3 {
///     let images = Tensor::<4>::random([2, 3, 32, 32], burn::tensor::Distribution::Default, &device);
///     assert_eq!(encoder.try_embed(images)?.dims(), [2, 8]);
/// }
/// # Ok(())
/// # }
/// ```
pub struct InferenceEncoder<'a> {
    model: &'a ResNet,
    engine: Option<CpuInference>,
}

impl<'a> InferenceEncoder<'a> {
    /// `model` prepared for inputs on `device`.
    ///
    /// Where the weights cannot be read back (a backend failure), the encoder runs the module
    /// itself and logs the error; [`InferenceEncoder::try_new`] returns it instead.
    pub fn new(model: &'a ResNet, device: &Device) -> Self {
        Self::try_new(model, device).unwrap_or_else(|err| {
            log::warn!("InferenceEncoder: {err}; running the module's tensor operations");
            Self {
                model,
                engine: None,
            }
        })
    }

    /// [`InferenceEncoder::new`] that returns a backend failure as an error.
    pub fn try_new(model: &'a ResNet, device: &Device) -> Result<Self> {
        let engine = prepare_inference(model, device)?;
        Ok(Self { model, engine })
    }

    /// [`ResNet::try_forward`]: the pooled features, B × D.
    pub fn try_forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        forward_prepared(self.model, self.engine.as_ref(), images)
    }

    /// [`ResNet::try_embed`]: φ, the L2-normalised features.
    pub fn try_embed(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        self.try_forward(images).map(l2_normalize)
    }

    /// Whether msad's CPU engine serves this encoder (CPU devices, layouts it covers).
    pub fn uses_host_engine(&self) -> bool {
        self.engine.is_some()
    }
}

/// Rows divided by `max(‖row‖₂, 1e-12)`, as PyTorch's `F.normalize(x, dim=1)`.
///
/// ```
/// use burn::tensor::{Device, Tensor};
/// let x = Tensor::<2>::from_floats([[3.0, 4.0], [0.0, 0.0]], &Device::flex());
/// let y = msad::encoder::l2_normalize(x).into_data().try_into_vec_as::<f32>().unwrap();
/// assert_eq!(y, vec![0.6, 0.8, 0.0, 0.0]);
/// ```
pub fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt().clamp_min(NORM_EPS);
    x / norm
}

fn check_images(images: &Tensor<4>) -> Result<()> {
    let dims = images.dims();
    if dims[1] != 3 || dims[0] == 0 || dims[2] == 0 || dims[3] == 0 {
        return Err(Error::InvalidShape {
            what: "images".into(),
            expected: "[B, 3, H, W] with B, H, W ≥ 1".into(),
            found: dims.to_vec(),
        });
    }
    Ok(())
}

/// Reads every parameter of `model` that burn has not initialised yet, in the module's order,
/// so that random draws from the device's RNG do not depend on which thread reads a weight
/// first (the CPU engines read the blocks in parallel).
pub(crate) fn initialise_in_order<M: Module>(model: &M) {
    struct InOrder;
    impl ModuleVisitor for InOrder {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_initialized() {
                let _ = param.val();
            }
        }
    }
    model.visit(&mut InOrder);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts the float parameters of a module and those burn has initialised.
    #[derive(Default)]
    struct Initialised {
        params: usize,
        initialised: usize,
    }

    impl ModuleVisitor for Initialised {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            self.params += 1;
            self.initialised += usize::from(param.is_initialized());
        }
    }

    /// `try_init` draws every weight itself, in order: none is left for a later (possibly
    /// parallel) first read to draw. `build` draws none (loaders replace them all).
    #[test]
    fn try_init_draws_every_weight_and_build_none() {
        let config = ResNetConfig::from_arch(Arch::Resnet18)
            .with_stem_width(4)
            .with_widths([4, 4, 4, 8]);
        let device = Device::flex();
        let mut eager = Initialised::default();
        config.try_init(&device).unwrap().visit(&mut eager);
        assert!(eager.params > 60, "{}", eager.params);
        assert_eq!(eager.initialised, eager.params);
        let mut lazy = Initialised::default();
        config.build(&device).unwrap().visit(&mut lazy);
        assert_eq!(lazy.params, eager.params);
        // BatchNorm's running statistics are built initialised; no conv weight is.
        assert!(lazy.initialised < lazy.params);
    }

    #[test]
    fn arch_names_round_trip() {
        for arch in Arch::ALL {
            assert_eq!(arch.name().parse::<Arch>().unwrap(), arch);
            assert_eq!(ResNetConfig::from_arch(arch).arch(), Some(arch));
        }
        assert_eq!("ResNet-152".parse::<Arch>().unwrap(), Arch::Resnet152);
        assert!("resnet19".parse::<Arch>().is_err());
    }

    #[test]
    fn feature_dims_match_torchvision() {
        let dims: Vec<usize> = Arch::ALL
            .iter()
            .map(|a| ResNetConfig::from_arch(*a).feature_dim())
            .collect();
        assert_eq!(dims, [512, 512, 2048, 2048, 2048]);
    }

    #[test]
    fn torchvision_key_counts_match_the_official_state_dicts() {
        // len(torchvision.models.resnetXX().state_dict()) minus fc (2) and one
        // num_batches_tracked per BatchNorm.
        let expected = [
            (Arch::Resnet18, 122 - 2 - 20),
            (Arch::Resnet50, 320 - 2 - 53),
            (Arch::Resnet152, 932 - 2 - 155),
        ];
        for (arch, n) in expected {
            assert_eq!(
                ResNetConfig::from_arch(arch).torchvision_keys().len(),
                n,
                "{arch}"
            );
        }
    }

    #[test]
    fn zero_widths_are_rejected() {
        let config = ResNetConfig::from_arch(Arch::Resnet18).with_widths([8, 0, 8, 8]);
        let err = config.try_init(&Device::flex()).unwrap_err();
        assert!(err.to_string().contains("widths"), "{err}");
    }

    /// The caps admit every torchvision net and refuse oversized layouts by what is wrong.
    #[test]
    fn oversized_layouts_are_rejected_by_what_is_too_large() {
        for arch in Arch::ALL {
            ResNetConfig::from_arch(arch).validate().unwrap();
        }
        let resnet152 = ResNetConfig::from_arch(Arch::Resnet152);
        let expected: usize = resnet152
            .torchvision_keys()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum();
        assert_eq!(resnet152.parameter_count(), expected);
        let basic = ResNetConfig::from_arch(Arch::Resnet18).with_widths([8, 16, 32, 64]);
        assert_eq!(
            basic.parameter_count(),
            basic
                .torchvision_keys()
                .iter()
                .map(|(_, s)| s.iter().product::<usize>())
                .sum::<usize>()
        );
        let device = Device::flex();
        for (config, words) in [
            (
                ResNetConfig::new(BlockKind::Basic, [100_000_000, 2, 2, 2]),
                "blocks per stage",
            ),
            (
                ResNetConfig::new(BlockKind::Basic, [2, 2, 2, 65]),
                "blocks per stage",
            ),
            (
                ResNetConfig::new(BlockKind::Basic, [2, 2, 2, 2]).with_stem_width(1 << 40),
                "at most 8192",
            ),
            (
                ResNetConfig::new(BlockKind::Bottleneck, [2, 2, 2, 2]).with_widths([
                    64,
                    128,
                    256,
                    usize::MAX,
                ]),
                "at most 8192",
            ),
            (
                ResNetConfig::new(BlockKind::Bottleneck, [64, 64, 64, 64]).with_widths([8192; 4]),
                "parameters",
            ),
        ] {
            for err in [
                config.validate().unwrap_err(),
                config.try_init(&device).unwrap_err(),
                config.build(&device).unwrap_err(),
            ] {
                assert!(err.to_string().contains(words), "{err}");
            }
        }
    }
}
