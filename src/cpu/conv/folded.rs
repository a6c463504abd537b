//! A conv with its BatchNorm folded in (running statistics, as msad always normalises), and
//! its forward: im2col + one product per column chunk, or F(2×2, 3×3) Winograd where it pays.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::geometry::{Chunk, ConvShape};
use super::im2col::im2col;
use super::maps::Maps;
use super::scratch::ColsBuffer;
use super::winograd::{self, WinogradFilter};
use crate::cpu::kernels::sgemm::{Operand, sgemm};

/// A conv and its BatchNorm as plain values, as a model holds them.
#[derive(Clone, Debug)]
pub(crate) struct ConvBnWeights {
    /// The conv's layout.
    pub(crate) shape: ConvShape,
    /// The conv's weights, C_out × C_in·k·k row-major.
    pub(crate) weight: Vec<f32>,
    /// The conv's bias, if it has one.
    pub(crate) conv_bias: Option<Vec<f32>>,
    /// BatchNorm γ.
    pub(crate) gamma: Vec<f32>,
    /// BatchNorm β.
    pub(crate) beta: Vec<f32>,
    /// BatchNorm running mean.
    pub(crate) mean: Vec<f32>,
    /// BatchNorm running variance.
    pub(crate) var: Vec<f32>,
    /// BatchNorm eps.
    pub(crate) eps: f32,
}

/// A conv with its BatchNorm folded in: `w` is C_out × (C_in·k·k) scaled per output channel
/// by `scale`, `bias` the BatchNorm shift.
pub(crate) struct FoldedConv {
    /// The folded weights W·s.
    pub(crate) w: Vec<f32>,
    /// s = γ / sqrt(σ² + eps) per output channel.
    pub(crate) scale: Vec<f32>,
    /// `w` transformed for F(2×2, 3×3), made on first use by a map where it pays.
    winograd: OnceLock<WinogradFilter>,
    bias: Vec<f32>,
    /// The conv's layout.
    pub(crate) shape: ConvShape,
}

impl FoldedConv {
    /// Folds the BatchNorm of `weights` into its conv (the conv's weights are scaled in
    /// place).
    pub(crate) fn fold(weights: ConvBnWeights) -> Self {
        let ConvBnWeights {
            shape,
            weight,
            conv_bias,
            gamma,
            beta,
            mean,
            var,
            eps,
        } = weights;
        let cout = shape.cout;
        let per = shape.patch();
        let mut w = weight;
        let mut bias = vec![0f32; cout];
        let mut scale = vec![0f32; cout];
        for o in 0..cout {
            // Computed as the tensor path does: s = γ / sqrt(σ² + eps), shift = β − μ·s.
            let s = gamma[o] / (var[o] + eps).sqrt();
            w[o * per..(o + 1) * per].iter_mut().for_each(|v| *v *= s);
            let b = conv_bias.as_ref().map_or(0.0, |b| b[o]);
            bias[o] = (b - mean[o]) * s + beta[o];
            scale[o] = s;
        }
        Self {
            w,
            scale,
            winograd: OnceLock::new(),
            bias,
            shape,
        }
    }

    /// For each column chunk of the conv of `x`: the chunk and its input columns (the im2col
    /// of `x` for its output rows, or `x` itself for a direct conv), with their row stride.
    pub(crate) fn for_each_chunk(&self, x: &Maps, mut f: impl FnMut(&Chunk, &[f32], usize)) {
        let plan = self.shape.plan(x);
        let mut cols = ColsBuffer::take();
        for chunk in plan.chunks() {
            if plan.direct {
                f(&chunk, &x.data, plan.columns());
            } else {
                cols.resize(self.shape.patch() * chunk.width(), 0.0);
                im2col(x, &self.shape, &plan, &chunk, &mut cols);
                f(&chunk, &cols, chunk.width());
            }
        }
    }

    /// `out` (C_out × B·H·W) += the conv of `x`, as im2col + one product per column chunk.
    fn accumulate_im2col(&self, x: &Maps, out: &mut [f32]) {
        let n = self.shape.plan(x).columns();
        let kk = self.shape.patch();
        self.for_each_chunk(x, |chunk, rhs, rhs_stride| {
            // out[:, chunk] += W (C_out × kk) · cols (kk × width)
            sgemm(
                (self.shape.cout, chunk.width(), kk),
                Operand::rows(&self.w, kk),
                Operand::rows(rhs, rhs_stride),
                &mut out[chunk.first_column()..],
                n,
                true,
            );
        });
    }

    /// Whether the conv of `x` runs as F(2×2, 3×3) rather than im2col.
    pub(crate) fn uses_winograd(&self, x: &Maps) -> bool {
        let s = &self.shape;
        s.k == 3 && s.stride == 1 && s.pad == 1 && winograd::pays(x.h, x.w)
    }

    /// The conv of `x` plus bias, optionally followed by `+ residual` and ReLU.
    pub(crate) fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        let plan = self.shape.plan(x);
        let n = plan.columns();
        // The output starts as bias (+ residual); the products accumulate onto it.
        let mut out = vec![0f32; self.shape.cout * n];
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
                .get_or_init(|| WinogradFilter::new(&self.w, self.shape.cout, self.shape.cin));
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
            c: self.shape.cout,
            b: x.b,
            h: plan.ho,
            w: plan.wo,
        }
    }
}
