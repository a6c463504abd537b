//! Convs on maps the kernel covers whole from every output position (2 × 2 and 1 × 1 maps
//! under a 3 × 3 kernel: ResNet's last two stages on 32 px images) as one dense product over
//! the batch.
//!
//! On such a map most of im2col's rows read padding: on a 2 × 2 map a 3 × 3 kernel reaches 4
//! of its 9 taps from each output position, on a 1 × 1 map only the center one. Laying every
//! output position's weights out against every input position instead gives the conv as one
//! product
//!
//! ```text
//! out (C_out·n_out × B) = U (C_out·n_out × C_in·n_in) · x (C_in·n_in × B)
//! ```
//!
//! with rows (channel, position) and the B images as columns: n_in / k² of im2col's arithmetic
//! (4/9 on 2 × 2 maps, 1/9 on 1 × 1 maps), and the columns are the maps transposed instead of
//! an im2col. Every entry of U is a weight (no structural zero that would turn a NaN or an
//! infinite input into NaN where the conv does not read it), so it computes the same terms as
//! the conv, in another order. The input gradient is the same product with Uᵀ; the weight
//! gradient is g · xᵀ, summed back onto the taps.

use std::borrow::Cow;

use rayon::prelude::*;

use super::blocked::{self, Columns};
use super::geometry::ConvShape;
use super::maps::Maps;
use crate::cpu::kernels::prepacked::{PackedLhs, PanelKernel};
use crate::cpu::kernels::sgemm::{Operand, sgemm};

/// Largest U, in floats (64 MiB; U is at most (k − k / 2)⁴ / k² times a conv's weights, 16/9
/// for 3 × 3 kernels).
const MAX_FLOATS: usize = 1 << 24;

/// Whether the conv `shape` of an h × w map is computed unrolled: a kernel larger than 1 × 1
/// that reaches every input position from every output position, U of bounded size.
pub(crate) fn pays(shape: &ConvShape, h: usize, w: usize) -> bool {
    if h == 0 || w == 0 {
        return false;
    }
    let (ho, wo) = shape.output_size(h, w);
    // Along one axis: the first output reaches the last input, and the last output the first.
    let covers =
        |n: usize, no: usize| n + shape.pad <= shape.k && (no - 1) * shape.stride <= shape.pad;
    shape.k > 1
        && covers(h, ho)
        && covers(w, wo)
        && [ho, wo, shape.cin, shape.cout]
            .into_iter()
            .try_fold(h * w, usize::checked_mul)
            .is_some_and(|floats| floats <= MAX_FLOATS)
}

/// A conv's weights unrolled for one input size ([`pays`]), and packed for the panel kernel
/// where this CPU runs one.
pub(crate) struct Unrolled {
    shape: ConvShape,
    /// Input map size.
    h: usize,
    w: usize,
    /// Output map size.
    ho: usize,
    wo: usize,
    /// The tap linking output position p to input position q, at p·n_in + q
    /// ([`Unrolled::tap`]).
    links: Vec<Option<usize>>,
    /// U: rows (o, p), columns (i, q), o and i channels, p and q output and input positions.
    weights: Vec<f32>,
    packed: Option<PackedLhs>,
}

impl Unrolled {
    /// The weights `w` (C_out × C_in·k·k) of the conv `shape` unrolled for h × w input maps.
    pub(crate) fn new(w: &[f32], shape: &ConvShape, h: usize, width: usize) -> Self {
        let (ho, wo) = shape.output_size(h, width);
        let mut unrolled = Self {
            shape: *shape,
            h,
            w: width,
            ho,
            wo,
            links: Vec::new(),
            weights: Vec::new(),
            packed: None,
        };
        let (n_in, n_out) = (unrolled.n_in(), unrolled.n_out());
        unrolled.links = (0..n_out * n_in)
            .map(|pq| unrolled.tap(pq / n_in, pq % n_in))
            .collect();
        let u = unrolled.weights_of(w, false);
        let (m, k) = (shape.cout * unrolled.n_out(), shape.cin * unrolled.n_in());
        unrolled.packed = PanelKernel::select().map(|kernel| PackedLhs::new(kernel, &u, m, k));
        unrolled.weights = u;
        unrolled
    }

    /// U for the weights `w` (C_out × C_in·k·k), or with `transposed` Uᵀ: rows (i, q),
    /// columns (o, p). Either is written row by row, each row's kernels read where they lie.
    fn weights_of(&self, w: &[f32], transposed: bool) -> Vec<f32> {
        let s = &self.shape;
        let (n_in, n_out, taps) = (self.n_in(), self.n_out(), s.k * s.k);
        let mut u = vec![0f32; s.cout * n_out * s.cin * n_in];
        if transposed {
            let cols = s.cout * n_out;
            u.par_chunks_mut(n_in * cols)
                .enumerate()
                .for_each(|(i, rows)| {
                    for (q, row) in rows.chunks_exact_mut(cols).enumerate() {
                        for (o, dst) in row.chunks_exact_mut(n_out).enumerate() {
                            let kernel = &w[(o * s.cin + i) * taps..][..taps];
                            for (p, v) in dst.iter_mut().enumerate() {
                                if let Some(t) = self.links[p * n_in + q] {
                                    *v = kernel[t];
                                }
                            }
                        }
                    }
                });
        } else {
            let cols = s.cin * n_in;
            u.par_chunks_mut(n_out * cols)
                .zip(w.par_chunks(s.cin * taps))
                .for_each(|(rows, kernels)| {
                    for (p, row) in rows.chunks_exact_mut(cols).enumerate() {
                        for (i, kernel) in kernels.chunks_exact(taps).enumerate() {
                            for (q, v) in row[i * n_in..][..n_in].iter_mut().enumerate() {
                                if let Some(t) = self.links[p * n_in + q] {
                                    *v = kernel[t];
                                }
                            }
                        }
                    }
                });
        }
        u
    }

    /// Whether it was unrolled for h × w maps.
    pub(crate) fn fits(&self, h: usize, w: usize) -> bool {
        (self.h, self.w) == (h, w)
    }

    fn n_in(&self) -> usize {
        self.h * self.w
    }

    fn n_out(&self) -> usize {
        self.ho * self.wo
    }

    /// The tap (ky·k + kx) linking output position `p` to input position `q` (always one where
    /// [`pays`] holds; `None` only for maps it refuses).
    fn tap(&self, p: usize, q: usize) -> Option<usize> {
        let s = &self.shape;
        let (oy, ox) = (p / self.wo, p % self.wo);
        let (iy, ix) = (q / self.w, q % self.w);
        let ky = (iy + s.pad).checked_sub(oy * s.stride)?;
        let kx = (ix + s.pad).checked_sub(ox * s.stride)?;
        (ky < s.k && kx < s.k).then_some(ky * s.k + kx)
    }

    /// The conv of `x` plus `bias` (per output channel), plus `residual` where given, then
    /// ReLU (keeping NaN) where asked.
    pub(crate) fn forward(
        &self,
        x: &Maps,
        bias: &[f32],
        residual: Option<&Maps>,
        relu: bool,
    ) -> Maps {
        let (b, n_out, cout) = (x.b, self.n_out(), self.shape.cout);
        let columns = positions_major(&x.data, x.c, b, self.n_in());
        let bias: Vec<f32> = bias
            .iter()
            .flat_map(|v| std::iter::repeat_n(*v, n_out))
            .collect();
        let residual = residual.map(|r| positions_major(&r.data, cout, b, n_out));
        let out = product(
            (&self.weights, self.packed.as_ref(), false),
            (cout * n_out, self.shape.cin * self.n_in()),
            &columns,
            b,
            &bias,
            residual.as_deref(),
            relu,
        );
        Maps {
            data: images_major(out, cout, b, n_out),
            c: cout,
            b,
            h: self.ho,
            w: self.wo,
        }
    }

    /// The gradient with respect to the conv's input (C_in × B·h·w) for the gradient `g`
    /// (C_out × B·ho·wo) of its output, for a batch of `b` images: Uᵀ · g, with U made of
    /// `w`, the weights it was unrolled from.
    pub(crate) fn input_gradient(&self, w: &[f32], g: &[f32], b: usize) -> Maps {
        let s = &self.shape;
        let (n_in, n_out) = (self.n_in(), self.n_out());
        let (m, k) = (s.cin * n_in, s.cout * n_out);
        let columns = positions_major(g, s.cout, b, n_out);
        let zeros = vec![0f32; m];
        let dx = match &self.packed {
            Some(packed) => {
                let transposed = self.weights_of(w, true);
                let packed = PackedLhs::new(packed.kernel(), &transposed, m, k);
                product(
                    (&transposed, Some(&packed), false),
                    (m, k),
                    &columns,
                    b,
                    &zeros,
                    None,
                    false,
                )
            }
            None => product(
                (&self.weights, None, true),
                (m, k),
                &columns,
                b,
                &zeros,
                None,
                false,
            ),
        };
        Maps {
            data: images_major(dx, s.cin, b, n_in),
            c: s.cin,
            b,
            h: self.h,
            w: self.w,
        }
    }

    /// G = g · colsᵀ (C_out × C_in·k·k, the layout of the conv's weights) for the input `x`
    /// and the gradient `g` of the output: g · xᵀ in the unrolled layout, each (p, q) entry
    /// added onto its tap.
    pub(crate) fn weight_gradient(&self, x: &Maps, g: &[f32]) -> Vec<f32> {
        let s = &self.shape;
        let (b, n_in, n_out, taps) = (x.b, self.n_in(), self.n_out(), s.k * s.k);
        let (m, k) = (s.cout * n_out, s.cin * n_in);
        let xs = positions_major(&x.data, s.cin, b, n_in);
        let gs = positions_major(g, s.cout, b, n_out);
        let mut du = vec![0f32; m * k];
        sgemm(
            (m, k, b),
            Operand::rows(&gs, b),
            Operand::transposed(&xs, b),
            &mut du,
            k,
            false,
        );
        let mut dw = vec![0f32; s.cout * s.cin * taps];
        dw.par_chunks_mut(s.cin * taps)
            .zip(du.par_chunks(n_out * k))
            .for_each(|(kernels, rows)| {
                for (p, row) in rows.chunks_exact(k).enumerate() {
                    for q in 0..n_in {
                        if let Some(t) = self.links[p * n_in + q] {
                            for (i, kernel) in kernels.chunks_exact_mut(taps).enumerate() {
                                kernel[t] += row[i * n_in + q];
                            }
                        }
                    }
                }
            });
        dw
    }
}

/// `lhs` (m × k; with `transposed`, the k × m matrix it holds read as its transpose) times
/// `columns` (k × n) plus `bias` per row, plus `residual` (m × n) where given, ReLU (keeping
/// NaN) where asked: on the panel kernel where `lhs` comes packed, else [`sgemm`].
fn product(
    (lhs, packed, transposed): (&[f32], Option<&PackedLhs>, bool),
    (m, k): (usize, usize),
    columns: &[f32],
    n: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    if let Some(packed) = packed {
        return blocked::forward(packed, Columns::Direct(columns), n, bias, residual, relu);
    }
    let mut out: Vec<f32> = bias
        .iter()
        .flat_map(|v| std::iter::repeat_n(*v, n))
        .collect();
    if let Some(r) = residual {
        out.iter_mut().zip(r).for_each(|(v, r)| *v += r);
    }
    let a = match transposed {
        true => Operand::transposed(lhs, m),
        false => Operand::rows(lhs, k),
    };
    sgemm((m, n, k), a, Operand::rows(columns, n), &mut out, n, true);
    if relu {
        out.iter_mut()
            .for_each(|v| *v = if *v < 0.0 { 0.0 } else { *v });
    }
    out
}

/// Channel-major maps (C × B·n, n positions per image) as rows (channel, position) of B
/// columns, one per image.
/// One position per image (1 × 1 maps): the same layout, borrowed.
fn positions_major(data: &[f32], c: usize, b: usize, n: usize) -> Cow<'_, [f32]> {
    if n == 1 {
        return Cow::Borrowed(data);
    }
    let mut out = vec![0f32; c * n * b];
    out.par_chunks_mut((n * b).max(1))
        .zip(data.par_chunks((b * n).max(1)))
        .for_each(|(dst, src)| {
            for (image, positions) in src.chunks_exact(n).enumerate() {
                for (q, v) in positions.iter().enumerate() {
                    dst[q * b + image] = *v;
                }
            }
        });
    Cow::Owned(out)
}

/// The inverse of [`positions_major`] (`rows` itself for one position per image).
fn images_major(rows: Vec<f32>, c: usize, b: usize, n: usize) -> Vec<f32> {
    if n == 1 {
        return rows;
    }
    let mut out = vec![0f32; c * b * n];
    out.par_chunks_mut((b * n).max(1))
        .zip(rows.par_chunks((n * b).max(1)))
        .for_each(|(dst, src)| {
            for (q, images) in src.chunks_exact(b).enumerate() {
                for (image, v) in images.iter().enumerate() {
                    dst[image * n + q] = *v;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::folded::tests::{folded, values};
    use crate::cpu::conv::im2col::col2im;

    /// The unrolled input and weight gradients equal im2col's ((W·s)ᵀ · g scattered back by
    /// col2im; g · colsᵀ), on 1 × 1, 2 × 2, 1 × 2 and 4 × 4 maps at strides 1 and 2, in pools
    /// of 1, 2 and 7 threads.
    #[test]
    fn unrolled_gradients_equal_im2col_s() {
        for (k, stride, cin, cout, b, h, w) in [
            (3, 1, 5, 4, 3, 1, 1),
            (3, 2, 6, 10, 3, 2, 2),
            (3, 1, 6, 10, 3, 2, 2),
            (3, 1, 4, 5, 2, 1, 2),
            (7, 2, 3, 6, 2, 4, 4),
        ] {
            let conv = folded(k, stride, cin, cout);
            let shape = conv.shape;
            assert!(pays(&shape, h, w));
            let x = Maps {
                data: values(cin * b * h * w, 6),
                c: cin,
                b,
                h,
                w,
            };
            let plan = shape.plan(&x);
            let n = plan.columns();
            let g = values(cout * n, 8);
            let (kk, mut want_dw) = (shape.patch(), vec![0f32; cout * shape.patch()]);
            let mut want_dx = Maps {
                data: vec![0f32; x.data.len()],
                ..x.clone()
            };
            let mut chunks = 0;
            conv.for_each_chunk(&x, |chunk, cols, stride| {
                chunks += 1;
                sgemm(
                    (cout, kk, chunk.width()),
                    Operand::rows(&g[chunk.first_column()..], n),
                    Operand::transposed(cols, stride),
                    &mut want_dw,
                    kk,
                    chunk.index > 0,
                );
            });
            assert_eq!(chunks, 1);
            let mut cols = vec![0f32; kk * n];
            sgemm(
                (kk, n, cout),
                Operand::transposed(&conv.w, kk),
                Operand::rows(&g, n),
                &mut cols,
                n,
                false,
            );
            let chunk = plan.chunks().next().unwrap();
            col2im(&cols, &mut want_dx, &shape, &plan, &chunk);
            let close = |got: &[f32], want: &[f32], what: &str| {
                assert_eq!(got.len(), want.len(), "{what}");
                for (i, (a, r)) in got.iter().zip(want).enumerate() {
                    assert!(
                        (a - r).abs() <= 1e-4 * (1.0 + r.abs()),
                        "{what} k {k} s {stride} {h} × {w} [{i}]: {a} vs {r}"
                    );
                }
            };
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let unrolled = pool.install(|| Unrolled::new(&conv.w, &shape, h, w));
                let dx = pool.install(|| unrolled.input_gradient(&conv.w, &g, b));
                assert_eq!((dx.c, dx.b, dx.h, dx.w), (cin, b, h, w));
                close(&dx.data, &want_dx.data, "dx");
                let dw = pool.install(|| unrolled.weight_gradient(&x, &g));
                close(&dw, &want_dw, "dw");
            }
        }
    }

    /// Unrolled exactly where the kernel covers the map from every output position (and U is
    /// bounded): never for 1 × 1 kernels, nor for empty maps.
    #[test]
    fn pays_where_the_kernel_covers_the_map() {
        let shape = |k, stride, c| ConvShape {
            cin: c,
            cout: c,
            k,
            stride,
            pad: k / 2,
        };
        assert!(pays(&shape(3, 1, 512), 1, 1) && pays(&shape(3, 1, 256), 2, 2));
        assert!(pays(&shape(3, 2, 256), 2, 2) && pays(&shape(7, 2, 3), 4, 4));
        assert!(!pays(&shape(3, 1, 8), 3, 3) && !pays(&shape(3, 2, 8), 3, 3));
        assert!(!pays(&shape(3, 1, 8), 2, 3) && !pays(&shape(7, 2, 3), 5, 4));
        assert!(!pays(&shape(1, 1, 8), 1, 1) && !pays(&shape(3, 1, 8), 0, 1));
        // 4 · 4 · 2048² floats: over the bound.
        assert!(!pays(&shape(3, 1, 2048), 2, 2) && pays(&shape(3, 1, 2048), 1, 1));
    }
}
