//! A conv with its BatchNorm folded in (running statistics, as msad always normalises), and
//! its forward: blocks of im2col + a product on the weights packed once ([`blocked`], where
//! the CPU runs a panel kernel), else im2col + one [`sgemm`] per column chunk; or F(2×2, 3×3)
//! Winograd where it pays; or one dense product on maps the kernel covers ([`Unrolled`]).
//! Also the input gradient of stride-1 convs as the adjoint conv.

use std::sync::OnceLock;

use rayon::prelude::*;

use super::blocked::{self, Columns};
use super::geometry::{Chunk, ConvShape};
use super::im2col::im2col;
use super::maps::Maps;
use super::scratch::ColsBuffer;
use super::unrolled::{self, Unrolled};
use super::winograd::{self, Tile, WinogradFilter};
use crate::cpu::kernels::prepacked::{PackedLhs, PanelKernel};
use crate::cpu::kernels::sgemm::{Operand, sgemm};
use crate::cpu::lazy::get_or_make;

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

/// How a conv of one input is computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ConvMethod {
    /// A map the kernel covers whole from every output position (2 × 2 or 1 × 1 under a
    /// 3 × 3 kernel: ResNet's last stages on 32 px images; [`unrolled::pays`]): one dense
    /// product whose weights lay every output position against every input position
    /// ([`Unrolled`]), h·w / k² of im2col's work, which mostly multiplies padding there.
    Unrolled,
    /// Winograd F(2×2, 3×3), or F(4×4, 3×3) on large maps ([`FoldedConv::winograd_tile`]): a
    /// 3x3 stride-1 conv on a map where it pays ([`winograd::pays`]).
    Winograd,
    /// im2col + one product per column chunk.
    Im2col,
}

/// The adjoint's weights of a conv with weights `w` (C_out × C_in·taps): each kernel turned by
/// 180° and the channels swapped, C_in × C_out·taps with rows (o, tap) as im2col's:
/// W_adj\[i\]\[(o, t)\] = W\[o\]\[(i, taps − 1 − t)\]. With one tap, the transpose.
fn adjoint_weights(w: &[f32], cout: usize, cin: usize, taps: usize) -> Vec<f32> {
    let mut adjoint = vec![0f32; cin * cout * taps];
    for (o, kernels) in w.chunks_exact(cin * taps).take(cout).enumerate() {
        for (i, kernel) in kernels.chunks_exact(taps).enumerate() {
            let dst = &mut adjoint[(i * cout + o) * taps..][..taps];
            dst.iter_mut()
                .zip(kernel.iter().rev())
                .for_each(|(d, v)| *d = *v);
        }
    }
    adjoint
}

/// A conv with its BatchNorm folded in: `w` is C_out × (C_in·k·k) scaled per output channel
/// by `scale`, `bias` the BatchNorm shift.
pub(crate) struct FoldedConv {
    /// The folded weights W·s.
    pub(crate) w: Vec<f32>,
    /// s = γ / sqrt(σ² + eps) per output channel.
    pub(crate) scale: Vec<f32>,
    /// `w` transformed for F(2×2, 3×3) and for F(4×4, 3×3), each made on first use by a map
    /// where it runs.
    winograd: [OnceLock<WinogradFilter>; 2],
    /// `w` unrolled for the first map small enough ([`ConvMethod::Unrolled`]), made on first
    /// use.
    unrolled: OnceLock<Unrolled>,
    /// `w` packed for the panel kernel ([`blocked`]), made on first use; `None` where this CPU
    /// runs no panel kernel (then [`sgemm`]: the `gemm` crate, or OpenBLAS).
    packed: OnceLock<Option<PackedLhs>>,
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
            winograd: [OnceLock::new(), OnceLock::new()],
            unrolled: OnceLock::new(),
            packed: OnceLock::new(),
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

    /// How the conv of `x` is computed (the forward and the backward agree on it).
    pub(crate) fn method(&self, x: &Maps) -> ConvMethod {
        let s = &self.shape;
        if unrolled::pays(s, x.h, x.w) {
            ConvMethod::Unrolled
        } else if s.k == 3 && s.stride == 1 && s.pad == 1 && winograd::pays(x.b, x.h, x.w) {
            ConvMethod::Winograd
        } else {
            ConvMethod::Im2col
        }
    }

    /// How the forward computes the conv of `x`, and with which Winograd tile where it runs
    /// Winograd: as [`Self::method`] and [`Self::winograd_tile`], except on small batches
    /// (one image) of small maps, where the forward runs Winograd with each task on a group
    /// of output channels: F(4×4, 3×3) on maps of 12 × 12 to 23 × 23
    /// ([`winograd::pays_4x4_small_batch`]; the training passes keep F(2×2, 3×3) there), else
    /// F(2×2, 3×3) ([`winograd::pays_small_batch`]; the training passes keep im2col).
    pub(crate) fn forward_method(&self, x: &Maps) -> (ConvMethod, Tile) {
        let s = &self.shape;
        let method = self.method(x);
        let winograd_shape = s.k == 3 && s.stride == 1 && s.pad == 1;
        if method != ConvMethod::Unrolled && winograd_shape && PanelKernel::select().is_some() {
            if winograd::pays_4x4_small_batch(x.b, x.h, x.w) {
                return (ConvMethod::Winograd, Tile::Four);
            }
            if winograd::pays_small_batch(x.b, x.h, x.w) {
                return (ConvMethod::Winograd, Tile::Two);
            }
        }

        (method, self.winograd_tile(x))
    }

    /// `f` of the folded weights unrolled for the maps of `x` ([`ConvMethod::Unrolled`]):
    /// those made on first use if they fit `x`, else unrolled for this call.
    pub(crate) fn with_unrolled<R>(&self, x: &Maps, f: impl FnOnce(&Unrolled) -> R) -> R {
        let make = || Unrolled::new(&self.w, &self.shape, x.h, x.w);
        let kept = get_or_make(&self.unrolled, make);
        match kept.fits(x.h, x.w) {
            true => f(kept),
            false => f(&make()),
        }
    }

    /// Which Winograd algorithm runs on the maps of `x` (where [`ConvMethod::Winograd`] does):
    /// F(4×4, 3×3) on large maps where this CPU runs the panel kernel
    /// ([`winograd::pays_4x4`]), else F(2×2, 3×3).
    pub(crate) fn winograd_tile(&self, x: &Maps) -> Tile {
        match winograd::pays_4x4(x.h, x.w) && PanelKernel::select().is_some() {
            true => Tile::Four,
            false => Tile::Two,
        }
    }

    /// The folded weights transformed for `tile`, on first use.
    fn winograd(&self, tile: Tile) -> &WinogradFilter {
        get_or_make(&self.winograd[(tile == Tile::Four) as usize], || {
            WinogradFilter::new(&self.w, self.shape.cout, self.shape.cin, tile)
        })
    }

    /// The folded weights packed for the panel kernel, where this CPU runs one.
    fn packed(&self) -> Option<&PackedLhs> {
        get_or_make(&self.packed, || {
            PanelKernel::select()
                .map(|kernel| PackedLhs::new(kernel, &self.w, self.shape.cout, self.shape.patch()))
        })
        .as_ref()
    }

    /// The gradient with respect to the input `x` of this conv (its folded weights W·s), for
    /// the gradient `g` (C_out × B·H·W) of its output, where the conv keeps the map's size
    /// with stride 1 (or is 1 × 1 on a 1 × 1 map): the conv of `g` with each
    /// kernel turned by 180° and the channels swapped, run as a forward on the panel kernel
    /// (one parallel region, no col2im). `None` for other convs, and where this CPU runs no
    /// panel kernel.
    pub(crate) fn adjoint_forward(&self, x: &Maps, g: &[f32]) -> Option<Maps> {
        let s = &self.shape;
        let plan = s.plan(x);
        let kernel = PanelKernel::select()?;
        let (cin, cout, k) = (s.cin, s.cout, s.k);
        let n = plan.columns();
        let zeros = vec![0f32; cin];
        let maps = |data| Maps {
            data,
            c: cin,
            b: x.b,
            h: x.h,
            w: x.w,
        };
        match self.method(x) {
            ConvMethod::Im2col if plan.direct || (k == 1 && x.h * x.w == 1) => {
                // dX (C_in × n) = Wᵀ g: a 1 × 1 kernel (larger ones are unrolled on 1 × 1
                // maps), transposed.
                let transposed = adjoint_weights(&self.w, cout, cin, 1);
                let packed = PackedLhs::new(kernel, &transposed, cin, cout);
                let dx = blocked::forward(&packed, Columns::Direct(g), n, &zeros, None, false);
                Some(maps(dx))
            }
            ConvMethod::Im2col if s.stride == 1 && plan.ho == x.h && plan.wo == x.w => {
                let adjoint = adjoint_weights(&self.w, cout, cin, k * k);
                let packed = PackedLhs::new(kernel, &adjoint, cin, cout * k * k);
                let g = Maps {
                    data: g.to_vec(),
                    c: cout,
                    b: x.b,
                    h: x.h,
                    w: x.w,
                };
                let shape = ConvShape {
                    cin: cout,
                    cout: cin,
                    ..*s
                };
                let plan = shape.plan(&g);
                let columns = Columns::Im2col(&g, &shape, &plan);
                let dx = blocked::forward(&packed, columns, n, &zeros, None, false);
                Some(maps(dx))
            }
            _ => None,
        }
    }

    /// The conv of `x` plus bias, optionally followed by `+ residual` and ReLU.
    pub(crate) fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        let plan = self.shape.plan(x);
        let n = plan.columns();
        let (method, tile) = self.forward_method(x);
        let blocked = match method {
            ConvMethod::Unrolled => {
                return self.with_unrolled(x, |u| u.forward(x, &self.bias, residual, relu));
            }
            ConvMethod::Im2col if plan.direct => {
                self.packed().map(|w| (w, Columns::Direct(&x.data)))
            }
            ConvMethod::Im2col => self
                .packed()
                .map(|w| (w, Columns::Im2col(x, &self.shape, &plan))),
            ConvMethod::Winograd => None,
        };
        let maps = |data| Maps {
            data,
            c: self.shape.cout,
            b: x.b,
            h: plan.ho,
            w: plan.wo,
        };
        if let Some((weights, columns)) = blocked {
            let residual = residual.map(|r| &r.data[..]);
            return maps(blocked::forward(
                weights, columns, n, &self.bias, residual, relu,
            ));
        }
        if method == ConvMethod::Winograd {
            let residual = residual.map(|r| &r.data[..]);
            let shape = winograd::Shape::of(x);
            let run = |tile| {
                let filter = self.winograd(tile);
                winograd::forward(&x.data, shape, filter, &self.bias, residual, relu)
            };
            // F(4×4, 3×3) declines maps holding NaN, infinities or values beyond 10³⁶;
            // F(2×2, 3×3) takes them.
            let four = tile == Tile::Four;
            if let Some(out) = four
                .then(|| run(Tile::Four))
                .flatten()
                .or_else(|| run(Tile::Two))
            {
                return maps(out);
            }
        }
        // The output starts as bias (+ residual); the products accumulate onto it.
        // Written once, without zeroing first (a memset of every output cost ~3% of a
        // 32 px forward).
        let len = self.shape.cout * n;
        let mut out: Vec<f32> = Vec::with_capacity(len);
        out.spare_capacity_mut()[..len]
            .par_chunks_mut(n)
            .enumerate()
            .for_each(|(o, row)| {
                let b = self.bias[o];
                match residual {
                    Some(r) => {
                        let res = &r.data[o * n..(o + 1) * n];
                        row.iter_mut().zip(res).for_each(|(v, r)| {
                            v.write(b + r);
                        });
                    }
                    None => row.iter_mut().for_each(|v| {
                        v.write(b);
                    }),
                }
            });
        // SAFETY: the loop above wrote every one of the `len` = C_out rows of `n` elements
        // (`n` ≥ 1: every conv output has a position per image).
        unsafe { out.set_len(len) };
        match method {
            ConvMethod::Winograd => {
                let filter = self.winograd(Tile::Two);
                winograd::accumulate(&x.data, winograd::Shape::of(x), filter, &mut out);
            }
            _ => self.accumulate_im2col(x, &mut out),
        }
        if relu {
            // Not `v.max(0.0)`, which maps NaN to 0: NaN stays NaN, as in the backends' relu
            // (and PyTorch's). The comparison is one `maxps` with its operands in this order.
            out.par_chunks_mut(n.max(1)).for_each(|row| {
                row.iter_mut()
                    .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v })
            });
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::cpu::conv::ConvLayout;

    /// `len` hashed values in [−1, 1).
    pub(crate) fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32) / 8e6 - 1.0)
            .collect()
    }

    /// A k × k conv (padding k / 2) from `cin` to `cout` channels with hashed weights and
    /// BatchNorm statistics, folded.
    pub(crate) fn folded(k: usize, stride: usize, cin: usize, cout: usize) -> FoldedConv {
        let shape = ConvShape::new(
            "c",
            ConvLayout {
                weight_dims: [cout, cin, k, k],
                stride: [stride; 2],
                padding: Some([k / 2; 4]),
                dilation: [1, 1],
                groups: 1,
            },
        )
        .unwrap();
        FoldedConv::fold(ConvBnWeights {
            shape,
            weight: values(cout * cin * k * k, 1),
            conv_bias: None,
            gamma: values(cout, 2),
            beta: values(cout, 3),
            mean: values(cout, 4),
            var: values(cout, 5).iter().map(|v| v.abs() + 0.5).collect(),
            eps: 1e-5,
        })
    }

    /// A hashed residual for the conv of `x`, and the conv's output on `x` through im2col plus
    /// bias plus that residual, then ReLU (NaN kept): the reference of the fast forwards.
    fn im2col_reference(conv: &FoldedConv, x: &Maps) -> (Maps, Vec<f32>) {
        let plan = conv.shape.plan(x);
        let (n, cout) = (plan.columns(), conv.shape.cout);
        let residual = Maps {
            data: values(cout * n, 7),
            c: cout,
            b: x.b,
            h: plan.ho,
            w: plan.wo,
        };
        let mut want = vec![0f32; cout * n];
        conv.accumulate_im2col(x, &mut want);
        for (o, row) in want.chunks_exact_mut(n).enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                let y = *v + conv.bias[o] + residual.data[o * n + j];
                *v = if y < 0.0 { 0.0 } else { y };
            }
        }
        (residual, want)
    }

    /// The blocked forward (the product on the packed weights starting from bias + residual,
    /// ReLU in its stores, one task per block) equals bias + residual + the `sgemm` product +
    /// ReLU, on the panel kernel `PanelKernel::select` gives (`MSAD_CPU_ISA` picks others),
    /// for convs that are direct, same-size, strided and 7 × 7, on outputs narrower and wider
    /// than a tile, in pools of 1, 2 and 7 threads (more threads than column blocks: the
    /// output channels are split too).
    #[test]
    fn blocked_forward_equals_the_sgemm_path() {
        let Some(_) = PanelKernel::select() else {
            return;
        };
        for (k, stride, cin, cout, b, h, w) in [
            (1, 1, 5, 24, 2, 3, 3),
            (3, 1, 4, 13, 3, 5, 4),
            (3, 2, 6, 16, 2, 9, 7),
            (7, 2, 3, 64, 1, 17, 15),
            (3, 1, 8, 70, 4, 8, 8),
            // Four times more channels than columns: one block of columns, the channels split
            // (on 7 × 7 maps one image now takes Winograd: `forward_method`).
            (3, 1, 16, 128, 1, 5, 5),
            (3, 2, 8, 64, 1, 13, 13),
        ] {
            let conv = folded(k, stride, cin, cout);
            let x = Maps {
                data: values(cin * b * h * w, 6),
                c: cin,
                b,
                h,
                w,
            };
            assert_eq!(conv.forward_method(&x).0, ConvMethod::Im2col);
            let (residual, want) = im2col_reference(&conv, &x);
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool
                    .install(|| conv.forward(&x, Some(&residual), true))
                    .data;
                for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "k {k} s {stride} {threads} threads [{i}]: {g} vs {r}"
                    );
                }
            }
        }
    }

    /// One image on 7 × 7 maps: the forward runs F(2×2, 3×3) (with its tasks on groups of
    /// channels) and equals im2col's, NaN input included; the training passes (`method`)
    /// keep im2col, as does the forward on a batch of 32.
    #[test]
    fn one_image_on_seven_by_seven_maps_takes_winograd_in_the_forward() {
        let conv = folded(3, 1, 32, 64);
        let mut x = Maps {
            data: values(32 * 7 * 7, 9),
            c: 32,
            b: 1,
            h: 7,
            w: 7,
        };
        x.data[100] = f32::NAN;
        assert_eq!(conv.method(&x), ConvMethod::Im2col);
        let batch = Maps {
            data: vec![0.0; 32 * 32 * 7 * 7],
            b: 32,
            ..x.clone()
        };
        assert_eq!(conv.forward_method(&batch).0, ConvMethod::Im2col);
        if PanelKernel::select().is_none() {
            return;
        }
        assert_eq!(conv.forward_method(&x), (ConvMethod::Winograd, Tile::Two));
        let (residual, want) = im2col_reference(&conv, &x);
        let got = conv.forward(&x, Some(&residual), true).data;
        for (i, (g, r)) in got.iter().zip(&want).enumerate() {
            assert!(
                g.is_nan() == r.is_nan() && (r.is_nan() || (g - r).abs() <= 1e-4 * (1.0 + r.abs())),
                "[{i}]: {g} vs {r}"
            );
        }
        assert!(got.iter().any(|v| v.is_nan()) && got.iter().any(|v| v.is_finite()));
    }

    /// First forwards through one conv from several threads at once, each on the pool (as
    /// the inference engine runs them), all finish with the same output: the weights' lazily
    /// made forms are not made while their cell is held (`get_or_init` there deadlocked when
    /// a pool thread, waiting on the rayon tasks making them, picked up another caller's
    /// forward through the same conv). Bounded by a timeout, so that a deadlock fails.
    #[test]
    fn concurrent_first_forwards_on_the_pool_finish() {
        use std::sync::{Arc, mpsc};
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            for _ in 0..8 {
                // Fresh each round: its Winograd form is made by the first forward.
                let conv = Arc::new(folded(3, 1, 256, 256));
                let x = Arc::new(Maps {
                    data: values(256 * 14 * 14, 9),
                    c: 256,
                    b: 1,
                    h: 14,
                    w: 14,
                });
                let callers: Vec<_> = (0..4)
                    .map(|_| {
                        let (conv, x) = (Arc::clone(&conv), Arc::clone(&x));
                        std::thread::spawn(move || {
                            rayon::scope(|_| conv.forward(&x, None, true).data)
                        })
                    })
                    .collect();
                let outputs: Vec<Vec<f32>> = callers
                    .into_iter()
                    .map(|caller| caller.join().expect("a forward"))
                    .collect();
                assert!(outputs.windows(2).all(|pair| pair[0] == pair[1]));
            }
            done.send(()).expect("the test waits");
        });
        match finished.recv_timeout(std::time::Duration::from_secs(300)) {
            Ok(()) => {}
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("concurrent first forwards through one conv did not finish (deadlock)")
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => panic!("a forward failed (above)"),
        }
    }

    /// One image on 14 × 14 maps: the forward runs F(4×4, 3×3) (the training passes
    /// F(2×2, 3×3)) and equals im2col's; with a NaN or a value beyond F(4×4, 3×3)'s range in
    /// the input it falls back to F(2×2, 3×3), NaN where im2col puts it.
    #[test]
    fn one_image_on_fourteen_by_fourteen_maps_takes_winograd_4x4_in_the_forward() {
        let conv = folded(3, 1, 16, 24);
        let mut x = Maps {
            data: values(16 * 14 * 14, 9),
            c: 16,
            b: 1,
            h: 14,
            w: 14,
        };
        assert_eq!(conv.method(&x), ConvMethod::Winograd);
        if PanelKernel::select().is_none() {
            return;
        }
        assert_eq!(conv.winograd_tile(&x), Tile::Two);
        assert_eq!(conv.forward_method(&x), (ConvMethod::Winograd, Tile::Four));
        for bad in [None, Some(f32::NAN), Some(3e37)] {
            if let Some(bad) = bad {
                x.data[100] = bad;
            }
            let (residual, want) = im2col_reference(&conv, &x);
            let got = conv.forward(&x, Some(&residual), true).data;
            for (i, (g, r)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g.is_nan() == r.is_nan()
                        && (!r.is_finite() || (g - r).abs() <= 1e-4 * (1.0 + r.abs())),
                    "{bad:?} [{i}]: {g} vs {r}"
                );
            }
            assert!(bad.is_none() || got.iter().any(|v| !v.is_finite() || v.abs() > 1e30));
        }
    }

    /// Where the kernel covers the whole map from every output position (1 × 1 maps under k
    /// = 3, 5 and 7 at strides 1 and 2, 2 × 2, 1 × 2, 3 × 2 and 4 × 4 maps), the unrolled
    /// product plus bias, residual and ReLU equals im2col's, NaN input included (it reaches
    /// every output of its image in both), in pools of 1, 2 and 7 threads; on maps the kernel
    /// does not cover, im2col or Winograd runs.
    #[test]
    fn unrolled_convs_equal_im2col_where_the_kernel_covers_the_map() {
        for (k, stride, cin, cout, b, h, w) in [
            (3, 1, 5, 4, 3, 1, 1),
            (3, 2, 5, 4, 3, 1, 1),
            (7, 2, 3, 6, 2, 1, 1),
            (3, 1, 6, 10, 3, 2, 2),
            (3, 2, 6, 10, 3, 2, 2),
            (3, 1, 4, 5, 2, 1, 2),
            (3, 1, 4, 5, 2, 2, 1),
            (5, 1, 3, 4, 2, 3, 2),
            (7, 2, 3, 6, 2, 4, 4),
        ] {
            let conv = folded(k, stride, cin, cout);
            let mut x = Maps {
                data: values(cin * b * h * w, 6),
                c: cin,
                b,
                h,
                w,
            };
            assert_eq!(conv.method(&x), ConvMethod::Unrolled, "k {k} {h} × {w}");
            // The first image's first input position is NaN in channel 1.
            x.data[b * h * w] = f32::NAN;
            let (residual, want) = im2col_reference(&conv, &x);
            let plan = conv.shape.plan(&x);
            assert!(want[0].is_nan());
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let got = pool.install(|| conv.forward(&x, Some(&residual), true));
                assert_eq!((got.c, got.b, got.h, got.w), (cout, b, plan.ho, plan.wo));
                for (i, (g, r)) in got.data.iter().zip(&want).enumerate() {
                    assert!(
                        (g.is_nan() && r.is_nan()) || (g - r).abs() <= 1e-5 * (1.0 + r.abs()),
                        "k {k} s {stride} {h} × {w}, {threads} threads [{i}]: {g} vs {r}"
                    );
                }
            }
        }
        for (k, h, w) in [(3, 3, 3), (3, 2, 3), (1, 1, 1), (7, 5, 5)] {
            let conv = folded(k, 1, 2, 2);
            let x = Maps {
                data: values(2 * h * w, 6),
                c: 2,
                b: 1,
                h,
                w,
            };
            assert_ne!(conv.method(&x), ConvMethod::Unrolled, "k {k} {h} × {w}");
        }
    }
}
