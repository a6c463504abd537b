//! The encoder's bridge to the CPU engines ([`crate::cpu::resnet`]): reads a [`ResNet`]'s
//! weights as plain values, runs the engines on host memory, and hands the results back as
//! tensors (features) or as burn's gradients (training).
//!
//! Which path runs is decided by [`crate::device::route`]. Where it picks the CPU engines but
//! the net has a layout they do not cover (a conv whose padding is not k / 2, a dilated or
//! grouped conv; in training also a conv with a bias or a layer only partly frozen), the
//! engines refuse it with [`Error::Unsupported`] when they are built, and the callers fall back
//! to the tensor path: the one fallback, logged once per process as a warning. Any other error
//! is returned.

use std::sync::Once;

use burn::module::ParamId;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use super::{ResNet, Stage, check_images};
use crate::cpu::conv::{ConvBnWeights, ConvLayout, ConvShape};
use crate::cpu::resnet::{
    Block, InferenceEngine, LayerWeights, Net, NetWeights, Tape, TrainingEngine,
};
use crate::device::{Route, Work, route};
use crate::host::vec_from_tensor;
use crate::{Error, Result};

/// A conv + BatchNorm pair of the model with its torchvision name (`layer1.0.conv2`).
struct NamedLayer<'a> {
    name: String,
    conv: &'a Conv2d,
    bn: &'a BatchNorm,
}

/// The model's conv + BatchNorm pairs in the engines' layer order.
fn layers(model: &ResNet) -> Net<NamedLayer<'_>> {
    let stages = [&model.layer1, &model.layer2, &model.layer3, &model.layer4];
    let blocks = stages
        .into_iter()
        .enumerate()
        .flat_map(|(s, stage)| stage.iter().enumerate().map(move |(i, b)| (s + 1, i, b)))
        .map(|(s, i, block)| {
            let (main, shortcut) = block.conv_bn_pairs();
            Block {
                convs: main
                    .into_iter()
                    .enumerate()
                    .map(|(j, (conv, bn))| NamedLayer {
                        name: format!("layer{s}.{i}.conv{}", j + 1),
                        conv,
                        bn,
                    })
                    .collect(),
                downsample: shortcut.map(|(conv, bn)| NamedLayer {
                    name: format!("layer{s}.{i}.downsample.0"),
                    conv,
                    bn,
                }),
            }
        })
        .collect();
    Net {
        stem: NamedLayer {
            name: "conv1".into(),
            conv: &model.conv1,
            bn: &model.bn1,
        },
        blocks,
    }
}

impl NamedLayer<'_> {
    /// The conv's shape, or [`Error::Unsupported`] naming the layer.
    fn shape(&self) -> Result<ConvShape> {
        let padding = match self.conv.padding {
            PaddingConfig2d::Explicit(t, l, b, r) => Some([t, l, b, r]),
            _ => None,
        };
        ConvShape::new(
            &self.name,
            ConvLayout {
                weight_dims: self.conv.weight.dims(),
                stride: self.conv.stride,
                padding,
                dilation: self.conv.dilation,
                groups: self.conv.groups,
            },
        )
    }

    /// [`Error::Unsupported`] for a layer only partly frozen: the training engine trains or
    /// freezes a conv and its BatchNorm together.
    fn check_trains_whole(&self) -> Result<()> {
        let trains = [
            self.conv.weight.is_require_grad(),
            self.bn.gamma.is_require_grad(),
            self.bn.beta.is_require_grad(),
        ];
        if trains.iter().any(|t| *t != trains[0]) {
            return Err(Error::Unsupported {
                engine: "cpu",
                what: self.name.clone(),
                reason: "a layer partly frozen in training".into(),
            });
        }
        Ok(())
    }

    /// The layer's values (read back from the device).
    fn read(&self) -> Result<LayerWeights> {
        let (conv, bn) = (self.conv, self.bn);
        let conv_bn = ConvBnWeights {
            shape: self.shape()?,
            weight: vec_from_tensor(conv.weight.val())?,
            conv_bias: conv
                .bias
                .as_ref()
                .map(|b| vec_from_tensor(b.val()))
                .transpose()?,
            gamma: vec_from_tensor(bn.gamma.val())?,
            beta: vec_from_tensor(bn.beta.val())?,
            mean: vec_from_tensor(bn.running_mean.value())?,
            var: vec_from_tensor(bn.running_var.value())?,
            eps: bn.epsilon as f32,
        };
        Ok(LayerWeights {
            conv_bn,
            trains: conv.weight.is_require_grad(),
        })
    }
}

/// Whether the CPU engines cover every conv of `model`, for inference or (`training`) also
/// for the training engine; no weight is read. [`Error::Unsupported`] names the first layer
/// they do not cover.
fn check_layout(model: &ResNet, training: bool) -> Result<()> {
    layers(model)
        .try_map(|_, layer| {
            layer.shape()?;
            if training {
                layer.check_trains_whole()?;
            }
            Ok(())
        })
        .map(drop)
}

/// Whether the CPU training engine covers `model` (no weight is read): `Ok(false)`, with the
/// documented fallback's warning, where it does not.
pub(crate) fn cpu_training_covers(model: &ResNet) -> Result<bool> {
    unsupported_falls_back(check_layout(model, true)).map(|covered| covered.is_some())
}

/// Every layer's values, one block per rayon task.
fn read(model: &ResNet) -> Result<NetWeights> {
    layers(model).try_map(|_, layer| layer.read())
}

/// The documented fallback: `Ok(None)` (and a warning, once per process) for
/// [`Error::Unsupported`], the error itself otherwise.
pub(crate) fn unsupported_falls_back<T>(result: Result<T>) -> Result<Option<T>> {
    static WARNED: Once = Once::new();
    match result {
        Ok(engine) => Ok(Some(engine)),
        Err(err @ Error::Unsupported { .. }) => {
            WARNED.call_once(|| log::warn!("{err}; using the backend's tensor operations"));
            Ok(None)
        }
        Err(err) => Err(err),
    }
}

/// The folded CPU engine for `model` where `device` routes inference to it, else `None`: the
/// module's tensor operations (also for a layout the engine does not cover, logged once).
pub(crate) fn prepare_inference(model: &ResNet, device: &Device) -> Result<Option<CpuInference>> {
    match route(device, Work::Inference) {
        Route::Cpu => unsupported_falls_back(CpuInference::new(model)),
        Route::TensorOps => Ok(None),
    }
}

/// `model`'s pooled features, B × D: through `engine` when there is one and `images` is not
/// tracked by autodiff, else the module's tensor operations.
pub(crate) fn forward_prepared(
    model: &ResNet,
    engine: Option<&CpuInference>,
    images: Tensor<4>,
) -> Result<Tensor<2>> {
    check_images(&images)?;
    match engine {
        Some(engine) if !images.is_autodiff() => engine.forward(images),
        _ => Ok(model.forward_tensor_ops(images)),
    }
}

/// [`forward_prepared`] that also returns the spatial maps (B × C × h × w) after each of
/// `stages` (`layer1` .. `layer4`), in the order given.
pub(crate) fn forward_with_stages_prepared(
    model: &ResNet,
    engine: Option<&CpuInference>,
    images: Tensor<4>,
    stages: &[Stage],
) -> Result<(Tensor<2>, Vec<Tensor<4>>)> {
    check_images(&images)?;
    match engine {
        Some(engine) if !images.is_autodiff() => {
            engine.forward_with_taps(images, &model.stage_taps(stages)?)
        }
        _ => model.forward_with_stages_tensor_ops(images, stages),
    }
}

/// A [`ResNet`] folded into the CPU inference engine.
pub(crate) struct CpuInference {
    engine: InferenceEngine,
}

impl CpuInference {
    /// Reads and folds `model`'s weights; [`Error::Unsupported`] for a layout the engine
    /// does not cover.
    pub(crate) fn new(model: &ResNet) -> Result<Self> {
        check_layout(model, false)?;
        Ok(Self {
            engine: InferenceEngine::new(read(model)?),
        })
    }

    /// `ResNet::forward` on host memory: B × 3 × H × W images to B × D pooled features, on
    /// the images' device.
    pub(crate) fn forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        Ok(self.forward_with_taps(images, &[])?.0)
    }

    /// [`CpuInference::forward`] that also returns the maps after the blocks `taps`
    /// ([`ResNet::stage_taps`]), each B × C × h × w on the images' device.
    pub(crate) fn forward_with_taps(
        &self,
        images: Tensor<4>,
        taps: &[usize],
    ) -> Result<(Tensor<2>, Vec<Tensor<4>>)> {
        let dims = images.dims();
        let device = images.device();
        let (pooled, d, maps) =
            self.engine
                .forward_with_taps(&vec_from_tensor(images)?, dims, taps)?;
        let maps = maps
            .iter()
            .map(|m| Tensor::from_data(TensorData::new(m.to_nchw(), [m.b, m.c, m.h, m.w]), &device))
            .collect();
        Ok((
            Tensor::from_data(TensorData::new(pooled, [dims[0], d]), &device),
            maps,
        ))
    }
}

/// A [`ResNet`] on the CPU training engine, for one step: φ with a tape, then the gradients
/// as burn's optimisers take them.
pub(crate) struct CpuTraining {
    engine: TrainingEngine,
    /// Per layer index: (conv weight, γ, β) ids and the weight's dimensions.
    params: Vec<([ParamId; 3], [usize; 4])>,
}

impl CpuTraining {
    /// The engine with `model`'s current weights; [`Error::Unsupported`] for a layout the
    /// engine does not cover.
    pub(crate) fn new(model: &ResNet) -> Result<Self> {
        check_layout(model, true)?;
        let params = layers(model)
            .layers()
            .map(|l| {
                let (conv, bn) = (l.conv, l.bn);
                (
                    [conv.weight.id, bn.gamma.id, bn.beta.id],
                    conv.weight.dims(),
                )
            })
            .collect();
        Ok(Self {
            engine: TrainingEngine::new(read(model)?)?,
            params,
        })
    }

    /// φ (B × D, row-major) of `images` (B × 3 × H × W, row-major) and the tape.
    pub(crate) fn embed(&self, images: &[f32], dims: [usize; 4]) -> Result<(Vec<f32>, Tape)> {
        self.engine.embed(images, dims)
    }

    /// The gradients of the trainable parameters from the loss's gradient with respect to φ,
    /// as tensors on `device` by parameter id.
    pub(crate) fn backward(&self, tape: Tape, d_phi: &[f32], device: &Device) -> GradientsParams {
        let mut params = GradientsParams::new();
        for g in self.engine.backward(tape, d_phi) {
            let ([weight, gamma, beta], dims) = self.params[g.layer];
            let c = g.gamma.len();
            params.register(
                weight,
                Tensor::<4>::from_data(TensorData::new(g.weight, dims), device),
            );
            params.register(
                gamma,
                Tensor::<1>::from_data(TensorData::new(g.gamma, [c]), device),
            );
            params.register(
                beta,
                Tensor::<1>::from_data(TensorData::new(g.beta, [c]), device),
            );
        }
        params
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, ModuleVisitor, Param};
    use burn::tensor::{Distribution, Tensor};

    use super::*;
    use crate::encoder::{Arch, FreezePolicy, ResNetConfig, Stage};

    /// Calls back with every float parameter's id and rank.
    struct Ids<'a>(&'a mut dyn FnMut(ParamId, usize));

    impl ModuleVisitor for Ids<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            (self.0)(param.id, D)
        }
    }

    /// Every trainable parameter's gradient from the CPU training engine equals burn's autodiff
    /// through the tensor path, for
    /// basic blocks and bottlenecks, strides, downsampling, odd sizes, frozen stages, and
    /// convs on im2col and on F(2×2, 3×3).
    #[test]
    fn gradients_equal_autodiff() {
        let plain = Device::flex();
        let ad = plain.clone().autodiff();
        for (net, freeze, [b, h, w]) in [
            ("narrow18", FreezePolicy::NONE, [3, 37, 29]),
            ("narrow50", FreezePolicy::NONE, [2, 20, 17]),
            (
                "narrow152",
                FreezePolicy::through(Stage::Layer2),
                [2, 16, 16],
            ),
            ("narrow18", FreezePolicy::through(Stage::Stem), [2, 9, 9]),
            // Large enough (15 × 13 after the stem) for layer1's convs to run as F(2×2, 3×3).
            ("narrow18", FreezePolicy::NONE, [2, 57, 51]),
            ("narrow50", FreezePolicy::NONE, [1, 57, 51]),
        ] {
            // torchvision-layout fixtures with non-trivial BatchNorm statistics.
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join(format!("tests/fixtures/encoder/{net}.pth"));
            let model = ResNet::from_torchvision(&path, &plain).unwrap();
            let model = freeze.apply(model.fork(&ad).train());
            let arch = format!("{net} frozen {freeze:?} at {b}x{h}x{w}");
            // Seeded. Unseeded, about one run in ten failed by ~1% of a gradient's scale once
            // the 57 × 51 cases ran on F(2×2, 3×3) (none in 16 runs with it off), at varying
            // parameters: most likely a pre-activation within the two paths' rounding of 0,
            // where they take different sides of a ReLU.
            plain.seed(7);
            let x = Tensor::<4>::random([b, 3, h, w], Distribution::Normal(0.0, 1.0), &plain);
            let d = model.feature_dim();
            let df = Tensor::<2>::random([b, d], Distribution::Normal(0.0, 1.0), &plain);

            let engine = CpuTraining::new(&model).unwrap();
            let xs = vec_from_tensor(x.clone()).unwrap();
            let (features, tape) = engine.embed(&xs, [b, 3, h, w]).unwrap();
            let dfs = vec_from_tensor(df.clone()).unwrap();
            let mut host = engine.backward(tape, &dfs, &plain);

            let reference = crate::encoder::l2_normalize(model.forward_tensor_ops(x.fork(&ad)));
            let ref_features = vec_from_tensor(reference.clone()).unwrap();
            for (a, r) in features.iter().zip(&ref_features) {
                assert!((a - r).abs() <= 1e-5, "{arch:?} φ: {a} vs {r}");
            }
            let surrogate = (reference * df.fork(&ad)).sum();
            let mut auto = GradientsParams::from_grads(surrogate.backward(), &model);
            let expected = host.len();
            assert_eq!(expected, auto.len(), "{arch:?}: number of gradients");
            let mut checked = 0;
            model.visit(&mut Ids(&mut |id, rank| {
                let (a, h) = match rank {
                    4 => (
                        auto.remove::<4>(id).map(|t| vec_from_tensor(t).unwrap()),
                        host.remove::<4>(id).map(|t| vec_from_tensor(t).unwrap()),
                    ),
                    _ => (
                        auto.remove::<1>(id).map(|t| vec_from_tensor(t).unwrap()),
                        host.remove::<1>(id).map(|t| vec_from_tensor(t).unwrap()),
                    ),
                };
                match (a, h) {
                    (None, None) => {}
                    (Some(a), Some(h)) => {
                        let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
                        let err = a
                            .iter()
                            .zip(&h)
                            .fold(0f32, |m, (a, h)| m.max((a - h).abs()));
                        assert!(
                            err <= 1e-4 * scale,
                            "{arch:?} param {id}: {err} (scale {scale})"
                        );
                        checked += 1;
                    }
                    (a, h) => panic!(
                        "{arch:?} param {id}: autodiff {} vs host {}",
                        a.is_some(),
                        h.is_some()
                    ),
                }
            }));
            assert!(
                checked > 0 && checked == expected,
                "{arch:?}: {checked} of {expected}"
            );
        }
    }

    /// The training engine's forward keeps NaN where the tensor path does (flex's relu and
    /// max-pool, as PyTorch's): φ of an image with a NaN pixel is NaN, and of one with an
    /// infinite pixel NaN where the tensor path's is, while a clean image beside them keeps
    /// its φ. Its normalisation keeps a NaN norm, as `l2_normalize`'s `clamp_min`.
    #[test]
    fn the_training_forward_keeps_nan_as_the_tensor_path() {
        let device = Device::flex();
        for arch in [Arch::Resnet18, Arch::Resnet50] {
            let model = narrow(arch, &device);
            let [b, h, w] = [3, 40, 36];
            let mut xs = vec![0.5f32; b * 3 * h * w];
            for (i, v) in xs.iter_mut().enumerate() {
                *v = ((i * 7919) % 113) as f32 / 56.0 - 1.0;
            }
            xs[3 * h * w + 5 * w + 7] = f32::NAN;
            xs[2 * 3 * h * w + h * w + 20 * w + 30] = f32::INFINITY;
            let engine = CpuTraining::new(&model).unwrap();
            let (phi, _) = engine.embed(&xs, [b, 3, h, w]).unwrap();
            let x = Tensor::<4>::from_data(TensorData::new(xs, [b, 3, h, w]), &device);
            let reference =
                vec_from_tensor(crate::encoder::l2_normalize(model.forward_tensor_ops(x))).unwrap();
            let d = model.feature_dim();
            assert!(reference[..d].iter().all(|v| v.is_finite()), "{arch:?}");
            assert!(reference[d..2 * d].iter().all(|v| v.is_nan()), "{arch:?}");
            for (i, (a, r)) in phi.iter().zip(&reference).enumerate() {
                assert_eq!(a.is_nan(), r.is_nan(), "{arch:?} φ {i}: {a} vs {r}");
                if !r.is_nan() {
                    assert!((a - r).abs() <= 1e-5, "{arch:?} φ {i}: {a} vs {r}");
                }
            }
        }
    }

    fn narrow(arch: Arch, device: &Device) -> ResNet {
        ResNetConfig::from_arch(arch)
            .with_stem_width(4)
            .with_widths([4, 4, 8, 8])
            .init(device)
    }

    /// The inference engine equals the tensor path (the specification) on both block designs.
    #[test]
    fn every_torchvision_layout_runs_on_the_inference_engine() {
        let device = Device::flex();
        for arch in [Arch::Resnet18, Arch::Resnet50] {
            let model = narrow(arch, &device);
            let x = Tensor::<4>::random([2, 3, 20, 17], Distribution::Default, &device);
            let engine = CpuInference::new(&model).expect("the engine covers torchvision's nets");
            let fast = engine.forward(x.clone()).unwrap();
            assert_eq!(fast.dims(), [2, model.feature_dim()]);
            let plain = model.forward_tensor_ops(x);
            let scale = plain.clone().abs().max().into_scalar::<f32>().max(1.0);
            let diff = (fast - plain).abs().max().into_scalar::<f32>();
            assert!(diff <= 1e-5 * scale, "{arch:?}: {diff} (scale {scale})");
        }
    }

    #[test]
    fn empty_batches_are_refused_not_panicked_on() {
        let device = Device::flex();
        let engine = CpuInference::new(&narrow(Arch::Resnet18, &device)).unwrap();
        let err = engine
            .forward(Tensor::<4>::zeros([0, 3, 8, 8], &device))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidShape { .. }), "{err}");
    }

    /// A conv the engines do not cover is refused by name when an engine is built, and
    /// `ResNet::forward` then takes the tensor path (the one documented fallback).
    #[test]
    fn an_uncovered_layout_is_refused_by_name_and_falls_back() {
        use burn::nn::conv::Conv2dConfig;

        let device = Device::flex();
        let mut model = narrow(Arch::Resnet18, &device);
        model.conv1 = Conv2dConfig::new([3, 4], [7, 7])
            .with_stride([2, 2])
            .with_padding(PaddingConfig2d::Valid)
            .with_bias(false)
            .init(&device);
        for err in [
            CpuInference::new(&model).err().expect("refused"),
            CpuTraining::new(&model).err().expect("refused"),
        ] {
            assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            assert!(err.to_string().contains("conv1"), "{err}");
        }
        assert!(
            unsupported_falls_back(CpuInference::new(&model))
                .unwrap()
                .is_none()
        );
        let x = Tensor::<4>::random([2, 3, 24, 24], Distribution::Default, &device);
        let (a, b) = (model.forward(x.clone()), model.forward_tensor_ops(x));
        assert_eq!(a.into_data(), b.into_data());
    }
}
