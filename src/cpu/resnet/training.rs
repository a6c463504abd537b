//! ResNet forward and backward on host memory, for fine-tuning on CPU devices: φ of a batch
//! and, given the loss's gradient with respect to φ, the gradient of every trainable parameter
//! (conv weights, BatchNorm γ and β; BatchNorm on its running statistics, as everywhere in
//! msad), named by layer index ([`super::Net`]).
//!
//! Activations are channel-major (C × B·H·W) as in the inference engine. A conv's forward is
//! the inference engine's (blocked im2col on packed weights, fused F(2×2, 3×3) or F(4×4,
//! 3×3), or one product with unrolled weights on maps the kernel covers); its weight and
//! BatchNorm gradients come from one product g · colsᵀ (F(2×2, 3×3)'s adjoint in the kernels
//! where the forward used Winograd; g · xᵀ summed onto the taps where it was unrolled; one
//! parallel region of column blocks where the weights are small, `conv::weight_gradient`),
//! and its input gradient is the adjoint conv on the panel kernel where the conv keeps the
//! map's size (Uᵀ · g where unrolled), else (W·s)ᵀ · g scattered back onto the input (col2im), with g the gradient with respect to the BatchNorm's output (see `ConvBn`). This replaces burn's
//! autodiff on CPU backends, whose conv weight gradient (a convolution with the output
//! gradient as its kernel) dominates a training step. Stages frozen at the bottom of the net
//! get neither parameter gradients nor an input gradient.

use rayon::prelude::*;

use super::{Block, Layer, LayerWeights, Net, NetWeights, check_images};
use crate::cpu::conv::weight_gradient;
use crate::cpu::conv::winograd::{self, Shape, Tile, WinogradFilter};
use crate::cpu::conv::{
    ColsBuffer, ConvMethod, FoldedConv, Maps, col2im, max_pool, max_pool_backward,
};
use crate::cpu::kernels::sgemm::{Operand, sgemm};
use crate::{Error, NORM_EPS, Result};

/// A conv and its BatchNorm (running statistics).
///
/// The forward is the inference engine's folded conv: W·s as weights, the BatchNorm shift as
/// bias, residual and ReLU fused. The backward needs no pre-BatchNorm activations: with
/// G = g · colsᵀ (g the gradient with respect to the BatchNorm's output),
/// dW = s ⊙ G, dβ = Σ g, dγ = (Σₖ W ⊙ G − μ·dβ) / sqrt(σ² + eps) (as Σ g·Z = Σₖ W ⊙ G), and the
/// input gradient is (W·s)ᵀ · g scattered back.
struct ConvBn {
    folded: FoldedConv,
    /// The raw conv weights W (C_out × C_in·k·k), for dγ.
    w: Vec<f32>,
    mean: Vec<f32>,
    inv_std: Vec<f32>,
    /// The layer index, when the layer trains.
    trains: Option<usize>,
}

/// The gradients of one trainable layer.
pub(crate) struct LayerGrads {
    /// Its layer index ([`super::Net`]).
    pub(crate) layer: usize,
    /// dL/dW, C_out × C_in·k·k row-major (the conv weight's layout).
    pub(crate) weight: Vec<f32>,
    /// dL/dγ.
    pub(crate) gamma: Vec<f32>,
    /// dL/dβ.
    pub(crate) beta: Vec<f32>,
}

impl ConvBn {
    /// Layer `layer` of a net, or [`Error::Unsupported`] for a conv with a bias (torchvision's
    /// ResNets have none; dγ below assumes it).
    fn new(layer: usize, weights: LayerWeights) -> Result<Self> {
        let LayerWeights { conv_bn, trains } = weights;
        if conv_bn.conv_bias.is_some() {
            return Err(Error::Unsupported {
                engine: "cpu",
                what: format!("layer {layer}"),
                reason: "a conv with a bias in training".into(),
            });
        }
        let w = conv_bn.weight.clone();
        let mean = conv_bn.mean.clone();
        let eps = conv_bn.eps;
        let inv_std: Vec<f32> = conv_bn.var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
        Ok(Self {
            folded: FoldedConv::fold(conv_bn),
            w,
            mean,
            inv_std,
            trains: trains.then_some(layer),
        })
    }

    /// Backward from `g`, the gradient with respect to the BatchNorm's output
    /// (C_out × B·H·W): the layer's parameter gradients (if it trains) and, if asked, the
    /// gradient with respect to `x`.
    fn backward(&self, x: &Maps, g: &[f32], need_dx: bool) -> (Option<LayerGrads>, Option<Maps>) {
        let cout = self.folded.shape.cout;
        let n = g.len() / cout;
        let grads = self.trains.map(|layer| {
            let beta: Vec<f32> = g
                .par_chunks(n)
                .map(|row| row.iter().map(|v| *v as f64).sum::<f64>() as f32)
                .collect();
            let mut weight = self.weight_grad(x, g);
            let kk = weight.len() / cout;
            let gamma = weight
                .par_chunks_mut(kk)
                .zip(self.w.par_chunks(kk))
                .enumerate()
                .map(|(o, (gw, w))| {
                    let gz: f64 = gw
                        .iter()
                        .zip(w)
                        .map(|(a, b)| (*a as f64) * (*b as f64))
                        .sum();
                    // G becomes dW = s ⊙ G.
                    gw.iter_mut().for_each(|v| *v *= self.folded.scale[o]);
                    ((gz - self.mean[o] as f64 * beta[o] as f64) * self.inv_std[o] as f64) as f32
                })
                .collect();
            LayerGrads {
                layer,
                weight,
                gamma,
                beta,
            }
        });
        let dx = need_dx.then(|| self.input_grad(x, g));
        (grads, dx)
    }

    /// G (C_out × C_in·k·k) = g · colsᵀ (`dz` is g), accumulated over column chunks.
    fn weight_grad(&self, x: &Maps, dz: &[f32]) -> Vec<f32> {
        let shape = &self.folded.shape;
        let kk = shape.patch();
        let n = dz.len() / shape.cout;
        let mut dw = vec![0f32; shape.cout * kk];
        match self.folded.method(x) {
            ConvMethod::Unrolled => {
                return self.folded.with_unrolled(x, |u| u.weight_gradient(x, dz));
            }
            ConvMethod::Winograd => {
                return winograd::kernel_gradient(&x.data, Shape::of(x), dz, shape.cout);
            }
            ConvMethod::Im2col => {
                if let Some(g) = weight_gradient::small_weights(&self.folded, x, dz) {
                    return g;
                }
                self.folded.for_each_chunk(x, |chunk, rhs, stride| {
                    sgemm(
                        (shape.cout, kk, chunk.width()),
                        Operand::rows(&dz[chunk.first_column()..], n),
                        Operand::transposed(rhs, stride),
                        &mut dw,
                        kk,
                        chunk.index > 0,
                    );
                })
            }
        }
        dw
    }

    /// dX: (W·s)ᵀ · g, scattered back onto the input positions (col2im); for stride-1 convs
    /// that keep the map's size, the adjoint conv on the panel kernel instead
    /// ([`FoldedConv::adjoint_forward`]), and F(2×2, 3×3) with the kernels turned over.
    fn input_grad(&self, x: &Maps, dz: &[f32]) -> Maps {
        let shape = &self.folded.shape;
        let kk = shape.patch();
        let n = dz.len() / shape.cout;
        let plan = shape.plan(x);
        let method = self.folded.method(x);
        if method == ConvMethod::Unrolled {
            let w = &self.folded.w;
            return self
                .folded
                .with_unrolled(x, |u| u.input_gradient(w, dz, x.b));
        }
        if method != ConvMethod::Winograd
            && let Some(dx) = self.folded.adjoint_forward(x, dz)
        {
            return dx;
        }
        let maps = |data| Maps {
            data,
            c: x.c,
            b: x.b,
            h: x.h,
            w: x.w,
        };
        if method == ConvMethod::Winograd {
            // A 3x3 stride-1 padding-1 conv's input gradient is the conv of g with the
            // kernels turned over and the channels swapped: F(2×2, 3×3) again, fused where
            // this CPU runs the panel kernel.
            let g = Shape {
                c: shape.cout,
                ..Shape::of(x)
            };
            let zeros = vec![0f32; shape.cin];
            let adjoint =
                |tile| WinogradFilter::adjoint(&self.folded.w, shape.cout, shape.cin, tile);
            let four = self.folded.winograd_tile(x) == Tile::Four;
            // F(4×4, 3×3) declines gradients holding NaN or infinities; F(2×2, 3×3) takes them.
            if four
                && let Some(dx) =
                    winograd::forward(dz, g, &adjoint(Tile::Four), &zeros, None, false)
            {
                return maps(dx);
            }
            let adjoint = adjoint(Tile::Two);
            if let Some(dx) = winograd::forward(dz, g, &adjoint, &zeros, None, false) {
                return maps(dx);
            }
            let mut dx = vec![0f32; x.data.len()];
            winograd::accumulate(dz, g, &adjoint, &mut dx);
            return maps(dx);
        }
        let mut dx = Maps {
            data: vec![0f32; x.data.len()],
            c: x.c,
            b: x.b,
            h: x.h,
            w: x.w,
        };
        if plan.direct {
            sgemm(
                (kk, n, shape.cout),
                Operand::transposed(&self.folded.w, kk),
                Operand::rows(dz, n),
                &mut dx.data,
                n,
                false,
            );
            return dx;
        }
        let mut cols = ColsBuffer::take();
        for chunk in plan.chunks() {
            let width = chunk.width();
            cols.resize(kk * width, 0.0);
            sgemm(
                (kk, width, shape.cout),
                Operand::transposed(&self.folded.w, kk),
                Operand::rows(&dz[chunk.first_column()..], n),
                &mut cols,
                width,
                false,
            );
            col2im(&cols, &mut dx, shape, &plan, &chunk);
        }
        dx
    }
}

/// The gradient through a ReLU whose output was `y`: `g`, zeroed where `y ≤ 0` (kept where `y`
/// is NaN, as burn's `relu_backward`).
fn relu_backward(mut g: Vec<f32>, y: &[f32]) -> Vec<f32> {
    g.par_chunks_mut(1 << 14)
        .zip(y.par_chunks(1 << 14))
        .for_each(|(g, y)| {
            for (g, y) in g.iter_mut().zip(y) {
                if *y <= 0.0 {
                    *g = 0.0;
                }
            }
        });
    g
}

/// What a block's backward needs from its forward (its input and output are kept by the
/// caller): the outputs (after ReLU) of all but the last conv.
struct BlockTape {
    inner: Vec<Maps>,
}

impl Layer for ConvBn {
    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        self.folded.forward(x, residual, relu)
    }
}

impl Block<ConvBn> {
    fn trains(&self) -> bool {
        self.convs
            .iter()
            .chain(&self.downsample)
            .any(|l| l.trains.is_some())
    }

    /// From the gradient with respect to the block's output `out`, given its input `x`.
    fn backward(
        &self,
        x: &Maps,
        out: &Maps,
        tape: BlockTape,
        d_out: Vec<f32>,
        need_dx: bool,
        grads: &mut Vec<LayerGrads>,
    ) -> Option<Vec<f32>> {
        let g = relu_backward(d_out, &out.data);
        let BlockTape { mut inner } = tape;
        // The shortcut.
        let dx_shortcut = match &self.downsample {
            Some(d) => {
                let (p, dx) = d.backward(x, &g, need_dx);
                grads.extend(p);
                dx.map(|m| m.data)
            }
            None => need_dx.then(|| g.clone()),
        };
        // The main path, last conv first.
        let mut g = g;
        let mut dx_main = None;
        for (i, conv) in self.convs.iter().enumerate().rev() {
            let input = if i == 0 { x } else { &inner[i - 1] };
            let (p, d) = conv.backward(input, &g, i > 0 || need_dx);
            grads.extend(p);
            match d {
                Some(d) if i > 0 => {
                    let y = inner.pop().expect("one output per inner conv");
                    g = relu_backward(d.data, &y.data);
                }
                d => dx_main = d.map(|m| m.data),
            }
        }
        match (dx_main, dx_shortcut) {
            (Some(mut a), Some(b)) => {
                a.par_chunks_mut(1 << 14)
                    .zip(b.par_chunks(1 << 14))
                    .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, b)| *a += b));
                Some(a)
            }
            _ => None,
        }
    }
}

/// The net on host memory for one training step: built from the current weights, then
/// [`TrainingEngine::embed`] and [`TrainingEngine::backward`] once each.
pub(crate) struct TrainingEngine {
    net: Net<ConvBn>,
}

/// The activations a backward pass needs.
pub(crate) struct Tape {
    images: Maps,
    stem_out: Maps,
    pool_idx: Vec<u32>,
    /// The max-pool output, then each block's output.
    acts: Vec<Maps>,
    blocks: Vec<BlockTape>,
    /// φ (B × D) and the norms it was divided by (`None` where clamped to eps).
    phi: Vec<f32>,
    norms: Vec<Option<f32>>,
}

impl TrainingEngine {
    /// The net with its current weights, or [`Error::Unsupported`] for a layout the engine
    /// does not cover.
    pub(crate) fn new(weights: NetWeights) -> Result<Self> {
        Ok(Self {
            net: weights.try_map(ConvBn::new)?,
        })
    }

    /// φ, the L2-normalised pooled features (B × D, row-major), of `images`
    /// (B × 3 × H × W, row-major), and the tape for [`TrainingEngine::backward`].
    pub(crate) fn embed(&self, images: &[f32], dims: [usize; 4]) -> Result<(Vec<f32>, Tape)> {
        check_images(images, dims, self.net.stem.folded.shape.cin)?;
        let b = dims[0];
        let images = Maps::from_nchw(images, dims);
        let stem_out = self.net.stem.forward(&images, None, true);
        let (pooled, pool_idx) = max_pool(&stem_out);
        let mut acts = vec![pooled];
        let mut tapes = Vec::with_capacity(self.net.blocks.len());
        for block in &self.net.blocks {
            let (out, inner) = block.forward(acts.last().expect("the pooled input"), true);
            acts.push(out);
            tapes.push(BlockTape { inner });
        }
        let mut phi = acts.last().expect("the pooled input").global_average();
        let d = phi.len() / b;
        // F.normalize: f / max(‖f‖, 1e-12), a NaN norm kept (as the tensor path's
        // `clamp_min`: the whole row becomes NaN).
        let norms = phi
            .chunks_exact_mut(d)
            .map(|row| {
                let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                let live = norm > NORM_EPS || norm.is_nan();
                let inv = 1.0 / if live { norm } else { NORM_EPS };
                row.iter_mut().for_each(|v| *v *= inv);
                live.then_some(norm)
            })
            .collect();
        let tape = Tape {
            images,
            stem_out,
            pool_idx,
            acts,
            blocks: tapes,
            phi: phi.clone(),
            norms,
        };
        Ok((phi, tape))
    }

    /// The gradients of the trainable layers from `d_phi`, the loss's gradient with respect
    /// to φ (B × D, row-major), last layer first.
    pub(crate) fn backward(&self, mut tape: Tape, d_phi: &[f32]) -> Vec<LayerGrads> {
        // Back through the normalisation: (g − φ⟨φ, g⟩) / ‖f‖, or g / eps where clamped.
        let d = tape.phi.len() / tape.norms.len().max(1);
        let mut d_features = d_phi.to_vec();
        for ((g, phi), norm) in d_features
            .chunks_exact_mut(d)
            .zip(tape.phi.chunks_exact(d))
            .zip(&tape.norms)
        {
            match norm {
                Some(norm) => {
                    let radial: f32 = g.iter().zip(phi).map(|(g, p)| g * p).sum();
                    g.iter_mut()
                        .zip(phi)
                        .for_each(|(g, p)| *g = (*g - p * radial) / norm);
                }
                None => g.iter_mut().for_each(|g| *g /= NORM_EPS),
            }
        }
        let d_features = &d_features;
        let mut grads = Vec::new();
        // The lowest unit (0 the stem, i + 1 block i) that trains: nothing below it needs a
        // gradient.
        let lowest = if self.net.stem.trains.is_some() {
            Some(0)
        } else {
            self.net
                .blocks
                .iter()
                .position(Block::trains)
                .map(|i| i + 1)
        };
        if let Some(lowest) = lowest {
            let last = tape.acts.last().expect("the pooled input");
            let mut d = last.global_average_backward(d_features);
            for (i, block) in self.net.blocks.iter().enumerate().rev() {
                if i + 1 < lowest {
                    break;
                }
                let out = tape.acts.pop().expect("one output per block");
                let block_tape = tape.blocks.pop().expect("one tape per block");
                let x = tape.acts.last().expect("the block's input");
                match block.backward(x, &out, block_tape, d, i + 1 > lowest, &mut grads) {
                    Some(dx) => d = dx,
                    None => {
                        d = Vec::new();
                        break;
                    }
                }
            }
            if lowest == 0 {
                let pooled = tape.acts.pop().expect("the pooled input");
                let d = max_pool_backward(&d, &tape.pool_idx, &tape.stem_out, pooled.h * pooled.w);
                let g = relu_backward(d, &tape.stem_out.data);
                let (p, _) = self.net.stem.backward(&tape.images, &g, false);
                grads.extend(p);
            }
        }
        grads
    }
}
