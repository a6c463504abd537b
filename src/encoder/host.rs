//! ResNet inference on host memory, for CPU devices without autodiff: each conv + BatchNorm
//! pair folded into one conv with bias, computed as im2col + one sgemm (`crate::sgemm`) over
//! the whole batch, activations kept channel-major (C × B·H·W) so that a conv's output is
//! directly the next conv's input. It replaces a chain of backend operations (each a fresh
//! tensor and a pass over memory) where the backend's own convolutions are slow on small
//! images; the results equal the tensor path's to float rounding (tests/encoder.rs checks both
//! against torchvision).

use std::cell::Cell;
use std::ops::{Deref, DerefMut};
use std::sync::OnceLock;

use burn::nn::BatchNorm;
use burn::nn::conv::Conv2d;
use burn::tensor::{Tensor, TensorData};
use rayon::prelude::*;

use super::ResNet;
use super::block::ResidualBlock;
use super::winograd::{self, WinogradFilter};
use crate::host::vec_from_tensor;
use crate::sgemm::{Operand, sgemm};
use crate::{Error, Result};

/// Largest im2col buffer, in floats (32 MiB): wider convs are computed in column chunks.
const IM2COL_FLOATS: usize = 8 << 20;

thread_local! {
    /// The im2col buffer, kept between convs and calls so that every conv does not fault in
    /// fresh pages (at most `IM2COL_FLOATS` floats per thread that ran a conv).
    static COLS: Cell<Vec<f32>> = const { Cell::new(Vec::new()) };
}

/// The calling thread's im2col buffer, handed back when dropped (a nested user gets a fresh
/// one; the larger is kept).
pub(super) struct ColsBuffer(Vec<f32>);

impl ColsBuffer {
    pub(super) fn take() -> Self {
        Self(COLS.take())
    }
}

impl Deref for ColsBuffer {
    type Target = Vec<f32>;

    fn deref(&self) -> &Vec<f32> {
        &self.0
    }
}

impl DerefMut for ColsBuffer {
    fn deref_mut(&mut self) -> &mut Vec<f32> {
        &mut self.0
    }
}

impl Drop for ColsBuffer {
    fn drop(&mut self) {
        let mine = std::mem::take(&mut self.0);
        let other = COLS.take();
        COLS.set(if other.capacity() > mine.capacity() {
            other
        } else {
            mine
        });
    }
}

/// Activations: `c` channels × `b` images × `h` × `w`, channel-major.
pub(super) struct Maps {
    pub(super) data: Vec<f32>,
    pub(super) c: usize,
    pub(super) b: usize,
    pub(super) h: usize,
    pub(super) w: usize,
}

impl Maps {
    /// Positions per channel: B·H·W.
    pub(super) fn plane(&self) -> usize {
        self.b * self.h * self.w
    }

    /// From B × C × H × W row-major values (`dims` checked by the caller).
    pub(super) fn from_nchw(nchw: &[f32], dims: [usize; 4]) -> Self {
        let [b, c, h, w] = dims;
        let plane = h * w;
        let mut data = vec![0f32; c * b * plane];
        for img in 0..b {
            for ch in 0..c {
                data[(ch * b + img) * plane..][..plane]
                    .copy_from_slice(&nchw[(img * c + ch) * plane..][..plane]);
            }
        }
        Self { data, c, b, h, w }
    }

    /// Global average pooling: B × C, row-major.
    pub(super) fn global_average(&self) -> Vec<f32> {
        let hw = self.h * self.w;
        let mut pooled = vec![0f32; self.b * self.c];
        for ch in 0..self.c {
            for img in 0..self.b {
                let s: f32 = self.data[(ch * self.b + img) * hw..][..hw].iter().sum();
                pooled[img * self.c + ch] = s / hw as f32;
            }
        }
        pooled
    }

    /// The gradient with respect to these maps of a loss whose gradient with respect to
    /// [`Maps::global_average`] is `d` (B × C).
    pub(super) fn global_average_backward(&self, d: &[f32]) -> Vec<f32> {
        let hw = self.h * self.w;
        let mut out = vec![0f32; self.data.len()];
        out.par_chunks_mut(hw).enumerate().for_each(|(i, dst)| {
            let (ch, img) = (i / self.b, i % self.b);
            dst.fill(d[img * self.c + ch] / hw as f32);
        });
        out
    }
}

/// A conv with its BatchNorm folded in: `w` is Cout × (Cin·k·k) scaled per output channel,
/// `bias` the BatchNorm shift.
pub(super) struct FoldedConv {
    pub(super) w: Vec<f32>,
    /// `w` transformed for F(2×2, 3×3), made on first use by a map where it pays.
    winograd: OnceLock<WinogradFilter>,
    bias: Vec<f32>,
    pub(super) cin: usize,
    pub(super) cout: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) pad: usize,
}

impl FoldedConv {
    pub(super) fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        Self::fold(conv, bn, vec_from_tensor(conv.weight.val())?)
    }

    /// [`FoldedConv::new`] with the conv's weights `w` already read.
    pub(super) fn fold(conv: &Conv2d, bn: &BatchNorm, mut w: Vec<f32>) -> Result<Self> {
        let (cin, cout, kh, stride, pad) = geometry(conv)?;
        let kw = kh;
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
            winograd: OnceLock::new(),
            bias,
            cin,
            cout,
            k: kh,
            stride,
            pad,
        })
    }

    /// For input `x`: output rows (one image row of `wo` positions each) per im2col chunk,
    /// the output height and width, and whether the conv reads `x` directly (1x1, stride 1,
    /// no padding: no im2col).
    pub(super) fn chunking(&self, x: &Maps) -> (usize, usize, usize, bool) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let ho = (x.h + 2 * p - k) / s + 1;
        let wo = (x.w + 2 * p - k) / s + 1;
        let kk = self.cin * k * k;
        let direct = k == 1 && s == 1 && p == 0;
        let rows_total = x.b * ho;
        let rows = if direct {
            rows_total
        } else {
            (IM2COL_FLOATS / (kk * wo).max(1)).clamp(1, rows_total)
        };
        (rows, ho, wo, direct)
    }

    /// `out` (C_out × B·H·W) += the conv of `x`, as im2col + one product per column chunk
    /// (whole output rows, one image row of `wo` positions, at a time).
    fn accumulate_im2col(&self, x: &Maps, out: &mut [f32]) {
        let (k, s, p) = (self.k, self.stride, self.pad);
        let (rows_per_chunk, ho, wo, direct) = self.chunking(x);
        let n = x.b * ho * wo;
        let kk = self.cin * k * k;
        let rows_total = x.b * ho;
        let mut cols = ColsBuffer::take();
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
            // out[:, r0·wo .. r1·wo] += W (Cout × kk) · cols (kk × width)
            sgemm(
                (self.cout, width, kk),
                Operand::rows(&self.w, kk),
                Operand::rows(rhs, rhs_stride),
                &mut out[r0 * wo..],
                n,
                true,
            );
        }
    }

    /// Whether the conv of `x` runs as F(2×2, 3×3) rather than im2col.
    pub(super) fn uses_winograd(&self, x: &Maps) -> bool {
        self.k == 3 && self.stride == 1 && self.pad == 1 && winograd::pays(x.h, x.w)
    }

    /// The conv of `x` plus bias, optionally followed by `+ residual` and ReLU.
    pub(super) fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        let (_, ho, wo, _) = self.chunking(x);
        let n = x.b * ho * wo;
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
        if self.uses_winograd(x) {
            let filter = self
                .winograd
                .get_or_init(|| WinogradFilter::new(&self.w, self.cout, self.cin));
            winograd::accumulate(&x.data, winograd::Shape::of(x), filter, &mut out);
        } else {
            self.accumulate_im2col(x, &mut out);
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

/// (C_in, C_out, k, stride, padding) of a conv the host engines cover: square kernel,
/// torchvision's padding k / 2 on every side, no dilation or groups.
fn geometry(conv: &Conv2d) -> Result<(usize, usize, usize, usize, usize)> {
    let [cout, cin, kh, kw] = conv.weight.dims();
    let pad = match conv.padding {
        burn::nn::PaddingConfig2d::Explicit(t, l, b, r) if t == l && l == b && b == r => t,
        _ => return Err(Error::Backend("host conv: unsupported padding".into())),
    };
    // Padding k / 2 keeps every output at least 1 × 1 for inputs of 1 × 1 or more.
    if kh != kw
        || pad != kh / 2
        || conv.stride[0] != conv.stride[1]
        || conv.dilation != [1, 1]
        || conv.groups != 1
    {
        return Err(Error::Backend("host conv: unsupported layout".into()));
    }
    Ok((cin, cout, kh, conv.stride[0], pad))
}

/// Rows (ci, kh, kw) × columns (output rows r0..r1 of all images, `wo` positions each).
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col(
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
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let src = &x.data[ci * plane..(ci + 1) * plane];
            // The same output columns read inside the input on every row of this (ci, ky, kx).
            let (lo, hi) = inside_columns(kx, s, p, x.w, wo);
            // Where hi > lo, lo·s + kx ≥ p.
            let first = (lo * s + kx).saturating_sub(p);
            let (mut img, mut oy) = (r0 / ho, r0 % ho);
            for out_row in dst.chunks_exact_mut(wo) {
                let iy = (oy * s + ky).wrapping_sub(p);
                if iy >= x.h {
                    out_row.fill(0.0);
                } else {
                    let line = &src[(img * x.h + iy) * x.w..][..x.w];
                    out_row[..lo].fill(0.0);
                    out_row[hi..].fill(0.0);
                    // Input column of output column ox: ox·s + kx − p. An element-wise loop
                    // rather than `copy_from_slice`: the runs are short on small maps, where a
                    // call to memmove per run cost more than the copy.
                    if hi > lo {
                        if s == 1 {
                            let inputs = &line[first..first + hi - lo];
                            out_row[lo..hi]
                                .iter_mut()
                                .zip(inputs)
                                .for_each(|(v, x)| *v = *x);
                        } else {
                            let inputs = line[first..].iter().step_by(s);
                            for (v, x) in out_row[lo..hi].iter_mut().zip(inputs) {
                                *v = *x;
                            }
                        }
                    }
                }
                oy += 1;
                if oy == ho {
                    (img, oy) = (img + 1, 0);
                }
            }
        });
}

/// The output columns `lo..hi` whose input column ox·s + kx − p lies inside 0..w.
pub(super) fn inside_columns(kx: usize, s: usize, p: usize, w: usize, wo: usize) -> (usize, usize) {
    let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
    // The largest ox with ox·s + kx − p ≤ w − 1, plus one.
    let hi = if w + p > kx {
        ((w - 1 + p - kx) / s + 1).min(wo)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// The taps k (of 0..3) of output position o whose input position 2·o + k − 1 lies in 0..len.
fn taps(o: usize, len: usize) -> std::ops::Range<usize> {
    let start = usize::from(o == 0);
    start..3.min(len + 1 - 2 * o).max(start)
}

/// 3x3 stride-2 max pooling with padding 1 (padding never wins: `-inf`), with the position of
/// each maximum in its input plane (the first one on ties) for the backward.
pub(super) fn max_pool(x: &Maps) -> (Maps, Vec<u32>) {
    let ho = (x.h + 2 - 3) / 2 + 1;
    let wo = (x.w + 2 - 3) / 2 + 1;
    let mut out = vec![0f32; x.c * x.b * ho * wo];
    let mut idx = vec![0u32; out.len()];
    out.par_chunks_mut(ho * wo)
        .zip(idx.par_chunks_mut(ho * wo))
        .enumerate()
        .for_each(|(plane, (dst, at))| {
            let src = &x.data[plane * x.h * x.w..(plane + 1) * x.h * x.w];
            for oy in 0..ho {
                // The taps inside the input: rows 2·oy − 1 + ky, columns 2·ox − 1 + kx.
                let ky = taps(oy, x.h);
                let (dst, at) = (&mut dst[oy * wo..][..wo], &mut at[oy * wo..][..wo]);
                for (ox, (d, a)) in dst.iter_mut().zip(at.iter_mut()).enumerate() {
                    let kx = taps(ox, x.w);
                    let (mut m, mut best) = (f32::NEG_INFINITY, 0usize);
                    for iy in (2 * oy + ky.start - 1)..(2 * oy + ky.end - 1) {
                        let row = iy * x.w;
                        for ix in (2 * ox + kx.start - 1)..(2 * ox + kx.end - 1) {
                            if src[row + ix] > m {
                                (m, best) = (src[row + ix], row + ix);
                            }
                        }
                    }
                    *d = m;
                    *a = best as u32;
                }
            }
        });
    let pooled = Maps {
        data: out,
        c: x.c,
        b: x.b,
        h: ho,
        w: wo,
    };
    (pooled, idx)
}

/// A conv with its BatchNorm as the host engines compute it.
pub(super) trait HostLayer: Sized + Send {
    /// The layer, or an error for layouts the engines do not cover.
    fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self>;
    /// BN(conv(x)) (+ residual) (then ReLU).
    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps;
}

impl HostLayer for FoldedConv {
    fn new(conv: &Conv2d, bn: &BatchNorm) -> Result<Self> {
        FoldedConv::new(conv, bn)
    }

    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        FoldedConv::forward(self, x, residual, relu)
    }
}

/// A residual block on the host: its convs in order, then the shortcut (if any).
pub(super) struct HostBlock<L> {
    pub(super) convs: Vec<L>,
    pub(super) downsample: Option<L>,
}

impl<L: HostLayer> HostBlock<L> {
    pub(super) fn new(block: &ResidualBlock) -> Result<Self> {
        let (main, shortcut) = block.conv_bn_pairs();
        Ok(Self {
            convs: main
                .into_iter()
                .map(|(c, b)| L::new(c, b))
                .collect::<Result<_>>()?,
            downsample: shortcut.map(|(c, b)| L::new(c, b)).transpose()?,
        })
    }

    /// The block's output and, when `keep`, the outputs (after ReLU) of all but its last conv
    /// (a backward pass needs them); otherwise each is dropped once used.
    pub(super) fn forward(&self, x: &Maps, keep: bool) -> (Maps, Vec<Maps>) {
        let shortcut = self.downsample.as_ref().map(|d| d.forward(x, None, false));
        let (last, first) = self.convs.split_last().expect("blocks have convs");
        let mut inner: Vec<Maps> = Vec::with_capacity(first.len());
        for conv in first {
            let y = conv.forward(inner.last().unwrap_or(x), None, true);
            if !keep {
                inner.clear();
            }
            inner.push(y);
        }
        let out = last.forward(
            inner.last().unwrap_or(x),
            Some(shortcut.as_ref().unwrap_or(x)),
            true,
        );
        if !keep {
            inner.clear();
        }
        (out, inner)
    }
}

/// A ResNet's layers as a host engine computes them: the stem, then every block in order.
pub(super) struct HostNet<L> {
    pub(super) stem: L,
    pub(super) blocks: Vec<HostBlock<L>>,
}

impl<L: HostLayer> HostNet<L> {
    /// The net's layers, or an error for layouts the engines do not cover.
    pub(super) fn new(model: &ResNet) -> Result<Self> {
        // Reading and folding the weights is a pass over all of them: one block per task.
        let blocks: Vec<&ResidualBlock> =
            [&model.layer1, &model.layer2, &model.layer3, &model.layer4]
                .into_iter()
                .flatten()
                .collect();
        let blocks = blocks
            .into_par_iter()
            .map(HostBlock::new)
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            stem: L::new(&model.conv1, &model.bn1)?,
            blocks,
        })
    }
}

/// The whole net folded for host inference: build once, run on many batches.
pub(crate) struct HostEngine {
    net: HostNet<FoldedConv>,
}

impl HostEngine {
    /// The folded net, or an error for layouts the engine does not cover.
    pub(crate) fn new(model: &ResNet) -> Result<Self> {
        Ok(Self {
            net: HostNet::new(model)?,
        })
    }

    /// `ResNet::forward` on host memory: B × 3 × H × W images to B × D pooled features.
    pub(crate) fn forward(&self, images: Tensor<4>) -> Result<Tensor<2>> {
        let [b, c, h, w] = images.dims();
        if b == 0 || h == 0 || w == 0 || c != self.net.stem.cin {
            return Err(Error::InvalidShape {
                what: "images".into(),
                expected: format!("[B, {}, H, W] with B, H, W ≥ 1", self.net.stem.cin),
                found: vec![b, c, h, w],
            });
        }
        let device = images.device();
        let x = Maps::from_nchw(&vec_from_tensor(images)?, [b, c, h, w]);
        let x = self.net.stem.forward(&x, None, true);
        let x = self
            .net
            .blocks
            .iter()
            .fold(max_pool(&x).0, |x, block| block.forward(&x, false).0);
        let pooled = x.global_average();
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
    fn inside_columns_are_exactly_the_in_bounds_ones() {
        for k in [1, 3, 7] {
            let p = k / 2;
            for s in [1, 2, 3] {
                for w in 1..12 {
                    let wo = (w + 2 * p - k) / s + 1;
                    for kx in 0..k {
                        let inside: Vec<usize> = (0..wo)
                            .filter(|ox| (ox * s + kx) >= p && ox * s + kx - p < w)
                            .collect();
                        let (lo, hi) = super::inside_columns(kx, s, p, w, wo);
                        assert_eq!(
                            (lo..hi).collect::<Vec<_>>(),
                            inside,
                            "k{k} s{s} w{w} kx{kx}"
                        );
                    }
                }
            }
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
