//! ResNet inference on host memory, for CPU devices without autodiff: each conv + BatchNorm
//! pair folded into one conv with bias, computed as im2col + one sgemm (the `gemm` crate) over
//! the whole batch, activations kept channel-major (C × B·H·W) so that a conv's output is
//! directly the next conv's input. It replaces a chain of backend operations (each a fresh
//! tensor and a pass over memory) where the backend's own convolutions are slow on small
//! images; the results equal the tensor path's to float rounding (tests/encoder.rs checks both
//! against torchvision).

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::ResNet;
use super::block::ResidualBlock;
use crate::host::vec_from_tensor;
use crate::{Error, Result};

/// Largest im2col buffer, in floats (32 MiB): wider convs are computed in column chunks.
const IM2COL_FLOATS: usize = 8 << 20;

/// Activations: `c` channels × `b` images × `h` × `w`, channel-major.
struct Maps {
    data: Vec<f32>,
    c: usize,
    b: usize,
    h: usize,
    w: usize,
}

impl Maps {
    fn plane(&self) -> usize {
        self.b * self.h * self.w
    }
}

/// A conv with its BatchNorm folded in: `w` is Cout × (Cin·k·k) scaled per output channel,
/// `bias` the BatchNorm shift.
struct FoldedConv {
    w: Vec<f32>,
    bias: Vec<f32>,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

impl FoldedConv {
    fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        let [cout, cin, kh, kw] = conv.weight.dims();
        let pad = match conv.padding {
            burn::nn::PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
            _ => return Err(Error::Backend("host conv: unsupported padding".into())),
        };
        // Padding k / 2 (torchvision's) keeps every output at least 1 × 1 for inputs of 1 × 1
        // or more.
        if kh != kw
            || pad != kh / 2
            || conv.stride[0] != conv.stride[1]
            || conv.dilation != [1, 1]
            || conv.groups != 1
        {
            return Err(Error::Backend("host conv: unsupported layout".into()));
        }
        let mut w = vec_from_tensor(conv.weight.val())?;
        let conv_bias = match &conv.bias {
            Some(b) => vec_from_tensor(b.val())?,
            None => vec![0.0; cout],
        };
        let gamma = vec_from_tensor(bn.gamma.val())?;
        let beta = vec_from_tensor(bn.beta.val())?;
        let mean = vec_from_tensor(bn.running_mean.value())?;
        let var = vec_from_tensor(bn.running_var.value())?;
        let per = cin * kh * kw;
        let mut bias = vec![0f32; cout];
        for o in 0..cout {
            // Computed as the tensor path does: s = γ / sqrt(σ² + eps), shift = β − μ·s.
            let s = gamma[o] / (var[o] + bn.epsilon as f32).sqrt();
            w[o * per..(o + 1) * per].iter_mut().for_each(|v| *v *= s);
            bias[o] = (conv_bias[o] - mean[o]) * s + beta[o];
        }
        Ok(Self {
            w,
            bias,
            cin,
            cout,
            k: kh,
            stride: conv.stride[0],
            pad,
        })
    }

    /// The conv of `x` plus bias, optionally followed by `+ residual` and ReLU.
    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let ho = (x.h + 2 * p - k) / s + 1;
        let wo = (x.w + 2 * p - k) / s + 1;
        let n = x.b * ho * wo;
        let kk = self.cin * k * k;
        // The output starts as bias (+ residual); the products accumulate onto it.
        let mut out = vec![0f32; self.cout * n];
        out.par_chunks_mut(n).enumerate().for_each(|(o, row)| {
            let b = self.bias[o];
            match residual {
                Some(r) => {
                    let res = &r.data[o * n..(o + 1) * n];
                    row.iter_mut().zip(res).for_each(|(v, r)| *v = b + r);
                }
                None => row.fill(b),
            }
        });
        let direct = k == 1 && s == 1 && p == 0;
        // Columns per chunk, whole output rows (one image row of `wo` positions) at a time.
        let rows_total = x.b * ho;
        let rows_per_chunk = if direct {
            rows_total
        } else {
            (IM2COL_FLOATS / (kk * wo).max(1)).clamp(1, rows_total)
        };
        let mut cols = Vec::new();
        for r0 in (0..rows_total).step_by(rows_per_chunk) {
            let r1 = (r0 + rows_per_chunk).min(rows_total);
            let width = (r1 - r0) * wo;
            let (rhs, rhs_stride): (&[f32], usize) = if direct {
                (&x.data, n)
            } else {
                cols.resize(kk * width, 0.0);
                im2col(x, k, s, p, ho, wo, r0, r1, &mut cols);
                (&cols, width)
            };
            // out[:, r0·wo .. r1·wo] = W (Cout × kk) · cols (kk × width)
            // SAFETY: W is cout × kk row-major; rhs holds kk rows of `rhs_stride` floats of
            // which the first `width` are read; dst rows of `n` floats, columns from r0·wo.
            unsafe {
                gemm::gemm(
                    self.cout,
                    width,
                    kk,
                    out.as_mut_ptr().add(r0 * wo),
                    1,
                    n as isize,
                    true,
                    self.w.as_ptr(),
                    1,
                    kk as isize,
                    rhs.as_ptr(),
                    1,
                    rhs_stride as isize,
                    1.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::Rayon(0),
                );
            }
        }
        if relu {
            out.par_chunks_mut(n.max(1))
                .for_each(|row| row.iter_mut().for_each(|v| *v = v.max(0.0)));
        }
        Maps {
            data: out,
            c: self.cout,
            b: x.b,
            h: ho,
            w: wo,
        }
    }
}

/// Rows (ci, kh, kw) × columns (output rows r0..r1 of all images, `wo` positions each).
#[allow(clippy::too_many_arguments)]
fn im2col(
    x: &Maps,
    k: usize,
    s: usize,
    p: usize,
    ho: usize,
    wo: usize,
    r0: usize,
    r1: usize,
    cols: &mut [f32],
) {
    let width = (r1 - r0) * wo;
    let plane = x.plane();
    cols.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, dst)| {
            let ci = row / (k * k);
            let ky = (row / k) % k;
            let kx = row % k;
            let src = &x.data[ci * plane..(ci + 1) * plane];
            for (r, out_row) in (r0..r1).zip(dst.chunks_exact_mut(wo)) {
                let (img, oy) = (r / ho, r % ho);
                let iy = (oy * s + ky) as isize - p as isize;
                if iy < 0 || iy >= x.h as isize {
                    out_row.fill(0.0);
                    continue;
                }
                let line = &src[(img * x.h + iy as usize) * x.w..][..x.w];
                for (ox, v) in out_row.iter_mut().enumerate() {
                    let ix = (ox * s + kx) as isize - p as isize;
                    *v = if ix >= 0 && (ix as usize) < x.w {
                        line[ix as usize]
                    } else {
                        0.0
                    };
                }
            }
        });
}

/// 3x3 stride-2 max pooling with padding 1 (padding never wins: `-inf`).
fn max_pool(x: &Maps) -> Maps {
    let ho = (x.h + 2 - 3) / 2 + 1;
    let wo = (x.w + 2 - 3) / 2 + 1;
    let mut out = vec![0f32; x.c * x.b * ho * wo];
    out.par_chunks_mut(ho * wo)
        .enumerate()
        .for_each(|(plane, dst)| {
            let src = &x.data[plane * x.h * x.w..(plane + 1) * x.h * x.w];
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut m = f32::NEG_INFINITY;
                    for ky in 0..3 {
                        let iy = (oy * 2 + ky) as isize - 1;
                        if iy < 0 || iy >= x.h as isize {
                            continue;
                        }
                        for kx in 0..3 {
                            let ix = (ox * 2 + kx) as isize - 1;
                            if ix >= 0 && (ix as usize) < x.w {
                                m = m.max(src[iy as usize * x.w + ix as usize]);
                            }
                        }
                    }
                    dst[oy * wo + ox] = m;
                }
            }
        });
    Maps {
        data: out,
        c: x.c,
        b: x.b,
        h: ho,
        w: wo,
    }
}

/// A residual block with its convs folded: main path, then the shortcut (if any).
struct FoldedBlock {
    convs: Vec<FoldedConv>,
    downsample: Option<FoldedConv>,
}

impl FoldedBlock {
    fn new(block: &ResidualBlock) -> Result<Self> {
        let fold_ds = |ds: &Option<super::block::Downsample>| {
            ds.as_ref()
                .map(|d| FoldedConv::new(&d.conv, &d.bn))
                .transpose()
        };
        Ok(match block {
            ResidualBlock::Basic(b) => Self {
                convs: vec![
                    FoldedConv::new(&b.conv1, &b.bn1)?,
                    FoldedConv::new(&b.conv2, &b.bn2)?,
                ],
                downsample: fold_ds(&b.downsample)?,
            },
            ResidualBlock::Bottleneck(b) => Self {
                convs: vec![
                    FoldedConv::new(&b.conv1, &b.bn1)?,
                    FoldedConv::new(&b.conv2, &b.bn2)?,
                    FoldedConv::new(&b.conv3, &b.bn3)?,
                ],
                downsample: fold_ds(&b.downsample)?,
            },
        })
    }

    fn forward(&self, x: Maps) -> Maps {
        let shortcut = self.downsample.as_ref().map(|d| d.forward(&x, None, false));
        let (last, inner) = self.convs.split_last().expect("blocks have convs");
        let mut out = None;
        for conv in inner {
            out = Some(conv.forward(out.as_ref().unwrap_or(&x), None, true));
        }
        let input = out.as_ref().unwrap_or(&x);
        last.forward(input, Some(shortcut.as_ref().unwrap_or(&x)), true)
    }
}

/// The whole net folded for host inference: build once, run on many batches.
pub(crate) struct HostEngine {
    stem: FoldedConv,
    blocks: Vec<FoldedBlock>,
}

impl HostEngine {
    /// The folded net, or an error for layouts the engine does not cover.
    pub(crate) fn new(model: &ResNet) -> Result<Self> {
        let blocks = [&model.layer1, &model.layer2, &model.layer3, &model.layer4]
            .into_iter()
            .flatten()
            .map(FoldedBlock::new)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: FoldedConv::new(&model.conv1, &model.bn1)?,
            blocks,
        })
    }

    /// `ResNet::forward` on host memory: B × 3 × H × W images to B × D pooled features.
    pub(crate) fn forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let [b, c, h, w] = images.dims();
        if b == 0 || h == 0 || w == 0 || c != self.stem.cin {
            return Err(Error::InvalidShape {
                what: "images".into(),
                expected: format!("[B, {}, H, W] with B, H, W ≥ 1", self.stem.cin),
                found: vec![b, c, h, w],
            });
        }
        let device = images.device();
        let nchw = vec_from_tensor(images)?;
        // B × C × H × W → C × B × H × W.
        let plane = h * w;
        let mut data = vec![0f32; c * b * plane];
        for img in 0..b {
            for ch in 0..c {
                data[(ch * b + img) * plane..][..plane]
                    .copy_from_slice(&nchw[(img * c + ch) * plane..][..plane]);
            }
        }
        let x = Maps { data, c, b, h, w };
        let x = self.stem.forward(&x, None, true);
        let x = self
            .blocks
            .iter()
            .fold(max_pool(&x), |x, block| block.forward(x));
        // Global average pooling, to B × C.
        let hw = x.h * x.w;
        let mut pooled = vec![0f32; x.b * x.c];
        for ch in 0..x.c {
            for img in 0..x.b {
                let s: f32 = x.data[(ch * x.b + img) * hw..][..hw].iter().sum();
                pooled[img * x.c + ch] = s / hw as f32;
            }
        }
        Ok(Tensor::from_data(
            TensorData::new(pooled, [x.b, x.c]),
            &device,
        ))
    }
}

/// Whether the host engine serves `device`: a CPU device without autodiff.
pub(crate) fn serves(device: &burn::tensor::Device) -> bool {
    !device.is_autodiff() && crate::device::is_host(device)
}

/// `ResNet::forward` on host memory, folding the weights for this one call.
pub(crate) fn forward(model: &ResNet, images: Tensor<4>) -> Result<Tensor<2>> {
    HostEngine::new(model)?.forward(images)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    use crate::encoder::{Arch, ResNetConfig};

    #[test]
    fn every_torchvision_layout_runs_on_the_host_engine() {
        let device = Device::flex();
        for arch in [Arch::Resnet18, Arch::Resnet50] {
            let model = ResNetConfig::from_arch(arch)
                .with_stem_width(4)
                .with_widths([4, 4, 8, 8])
                .init(&device);
            let x = Tensor::<4>::random([2, 3, 20, 17], Distribution::Default, &device);
            let fast = super::forward(&model, x.clone()).expect("the host engine takes it");
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
        let model = ResNetConfig::from_arch(Arch::Resnet18)
            .with_stem_width(4)
            .with_widths([4, 4, 4, 4])
            .init(&device);
        let empty = Tensor::<4>::zeros([0, 3, 8, 8], &device);
        assert!(super::forward(&model, empty).is_err());
    }
}
