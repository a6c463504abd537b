//! NT-Xent value and closed-form gradient on host memory, for features on a CPU device.
//!
//! With u = x − c (the 2B rows of both views, shifted), everything the loss needs from the D
//! feature columns is the Gram matrix G = u uᵀ: its diagonal holds ‖uᵢ‖², and its entries
//! scaled by the norms are the cosine similarities (the same as normalising first, to float
//! rounding). The gradient with respect to u is again a product, M u, with a 2B × 2B matrix M
//! built from G. So the feature columns are split between the threads, and
//!
//! 1. each thread shifts its columns and computes their part of G ([`gram`](super::kernels::gram): dot-product
//!    tiles on and above the diagonal, reading the rows where they lie);
//! 2. the parts are summed and G is turned into the value and M (a few passes over 2B × 2B
//!    matrices, their rows split between the threads);
//! 3. each thread writes M u for its columns ([`tile`](super::kernels::tile)'s 6 × 16 micro-kernel,
//!    its panels of u read in place).
//!
//! All of it runs on rayon's pool, entered once per call: the threads join after the products
//! of step 1 and after each pass of step 2, and no thread pool inside a product has to be
//! woken and joined. CPUs without AVX2 and FMA (and other architectures) run the same passes
//! with the `gemm` crate's serial products.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::kernels::dot;
use super::kernels::gram::gram;
use super::kernels::sgemm::{Operand, sgemm_serial};
use super::kernels::tile::{MR, NR, TileKernel, pack_a};
use crate::NORM_EPS;

/// The loss and, when asked, dL/dx for the 2B rows (x₁ then x₂; 2B × D, row-major).
pub(crate) struct Output {
    pub value: f64,
    pub grad: Option<Vec<f32>>,
}

/// Fewest rows of the 2B × 2B matrices per task.
const ROWS_PER_TASK: usize = 32;

/// Fewest feature columns per thread: below this, waking another thread costs more than the
/// products it takes over.
const MIN_COLUMNS_PER_THREAD: usize = 128;

/// NT-Xent over θ = normalize(x − c) for the 2B rows of `views` (the first view's B rows,
/// then the second's, each B × D row-major), plus Σ‖x − c‖² / B when `angular`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn nt_xent(
    views: [&[f32]; 2],
    center: Option<&[f32]>,
    b: usize,
    d: usize,
    inv_tau: f32,
    angular: bool,
    with_grad: bool,
) -> Output {
    assert!(
        b > 0 && d > 0 && views.iter().all(|v| v.len() == b * d),
        "loss kernel: {} and {} floats for 2 × {b} rows of {d} (callers check the shapes)",
        views[0].len(),
        views[1].len()
    );
    assert!(
        center.is_none_or(|c| c.len() == d),
        "loss kernel: a center of {} floats for {d} columns",
        center.map_or(0, <[f32]>::len)
    );
    let products = Products::detect();
    // On a pool thread from the start, so that the caller sleeps once instead of at every
    // join, and the first slice of each phase does not contend with the pool's threads.
    rayon::scope(|_| compute(products, views, center, b, d, inv_tau, angular, with_grad))
}

#[allow(clippy::too_many_arguments)]
fn compute(
    products: Products,
    views: [&[f32]; 2],
    center: Option<&[f32]>,
    b: usize,
    d: usize,
    inv_tau: f32,
    angular: bool,
    with_grad: bool,
) -> Output {
    let n = 2 * b;
    let parts = column_parts(d, rayon::current_num_threads());

    // 1. Per slice of columns: u = x − c there and its part of G.
    let (slices, grams): (Vec<Shifted>, Vec<Vec<f32>>) = on_threads(parts.clone(), |cols| {
        let u = Shifted::new(views, center, b, d, cols);
        let gram = products.gram(&u);
        (u, gram)
    })
    .into_iter()
    .unzip();
    // The parts summed into the first, the others freed.
    let mut grams = grams.into_iter();
    let mut gram = grams.next().unwrap_or_else(|| vec![0f32; n * n]);
    for part in grams {
        gram.iter_mut().zip(part).for_each(|(g, p)| *g += p);
    }

    // 2. The value, and M.
    let softmax = Softmax::new(&gram, b, inv_tau);
    let mut value = softmax.terms.iter().sum::<f64>() / n as f64;
    if angular {
        value += softmax.squares.iter().map(|&s| s as f64).sum::<f64>() / b as f64;
    }
    if !with_grad {
        return Output { value, grad: None };
    }
    let m = softmax.gradient_matrix(if angular { 2.0 / b as f32 } else { 0.0 });
    let left = products.left(&m, n);

    // 3. dL/dx = dL/du = M u, each slice of columns written in place. Every element is
    // written, so the buffer is not zeroed first (that was 4% of the call at B 64, D 2048).
    let mut grad: Vec<f32> = Vec::with_capacity(n * d);
    let mut outputs: Vec<Vec<&mut [MaybeUninit<f32>]>> =
        parts.iter().map(|_| Vec::with_capacity(n)).collect();
    for row in grad.spare_capacity_mut()[..n * d].chunks_exact_mut(d) {
        let mut rest = row;
        for (out, cols) in outputs.iter_mut().zip(&parts) {
            let (head, tail) = rest.split_at_mut(cols.len());
            out.push(head);
            rest = tail;
        }
    }
    let work: Vec<_> = outputs.into_iter().zip(&slices).collect();
    on_threads(work, |(mut out, u)| left.multiply(u, &mut out));
    // SAFETY: the n rows were split into the parts' column ranges, which cover 0..d
    // (`column_parts`), and `multiply` writes every element of the n rows it is given.
    unsafe { grad.set_len(n * d) };
    Output {
        value,
        grad: Some(grad),
    }
}

/// `work` on every item, the results in order: the first item on the calling thread, the
/// others spawned for the pool's other threads to take (or for this one, when none does).
fn on_threads<I: Send, T: Send>(items: Vec<I>, work: impl Fn(I) -> T + Sync) -> Vec<T> {
    let mut results: Vec<Option<T>> = items.iter().map(|_| None).collect();
    let mut items = items.into_iter();
    if let (Some(first), Some((head, rest))) = (items.next(), results.split_first_mut()) {
        let work = &work;
        rayon::in_place_scope(|scope| {
            for (item, slot) in items.zip(rest) {
                scope.spawn(move |_| *slot = Some(work(item)));
            }
            *head = Some(work(first));
        });
    }
    results.into_iter().flatten().collect()
}

/// Splits `0..d` into at most `threads` contiguous slices of at least
/// [`MIN_COLUMNS_PER_THREAD`] columns, in multiples of the micro-kernel's 16 where possible.
fn column_parts(d: usize, threads: usize) -> Vec<Range<usize>> {
    let count = threads.min(d / MIN_COLUMNS_PER_THREAD).max(1);
    let width = d.div_ceil(count).next_multiple_of(NR);
    (0..d)
        .step_by(width.max(1))
        .map(|start| start..(start + width).min(d))
        .collect()
}

/// The per-row softmax of the scaled cosine similarities, from the Gram matrix of u.
struct Softmax {
    n: usize,
    b: usize,
    inv_tau: f32,
    /// ‖uᵢ‖².
    squares: Vec<f32>,
    /// 1 / max(‖uᵢ‖, eps), as `F.normalize`.
    inv_norms: Vec<f32>,
    /// Cosine similarities Sᵢⱼ = Gᵢⱼ / (‖uᵢ‖ ‖uⱼ‖) (n × n).
    cosines: Vec<f32>,
    /// Pᵢⱼ: the softmax of Sᵢⱼ / τ over j ≠ i, 0 on the diagonal (n × n).
    probabilities: Vec<f32>,
    /// Per row: log Σⱼ≠ᵢ exp(Sᵢⱼ / τ) − S(i, positive) / τ.
    terms: Vec<f64>,
}

impl Softmax {
    fn new(gram: &[f32], b: usize, inv_tau: f32) -> Self {
        let n = 2 * b;
        let squares: Vec<f32> = (0..n).map(|i| gram[i * n + i]).collect();
        let inv_norms: Vec<f32> = squares
            .iter()
            .map(|s| 1.0 / s.sqrt().max(NORM_EPS))
            .collect();
        let mut cosines = vec![0f32; n * n];
        let mut probabilities = vec![0f32; n * n];
        let rows = cosines
            .par_chunks_exact_mut(n)
            .zip(probabilities.par_chunks_exact_mut(n))
            .with_min_len(ROWS_PER_TASK);
        let terms = rows.enumerate().map(|(i, (s, p))| {
            let g = &gram[i * n..][..n];
            let scale = inv_norms[i];
            for (((s, p), g), inv) in s.iter_mut().zip(p.iter_mut()).zip(g).zip(&inv_norms) {
                *s = g * scale * inv;
                *p = *s * inv_tau;
            }
            let pos = p[(i + b) % n];
            // The diagonal is left out of the maximum and the sum.
            p[i] = f32::NEG_INFINITY;
            let max = in_lanes(p, f32::NEG_INFINITY, f32::max);
            p.iter_mut().for_each(|v| *v = exp_nonpositive(*v - max));
            p[i] = 0.0;
            let z = in_lanes(p, 0.0, |a, b| a + b);
            let inv_z = 1.0 / z;
            p.iter_mut().for_each(|v| *v *= inv_z);
            (max + z.ln()) as f64 - pos as f64
        });
        let terms = terms.collect();
        Self {
            n,
            b,
            inv_tau,
            squares,
            inv_norms,
            cosines,
            probabilities,
            terms,
        }
    }

    /// M (n × n) with dL/du = M u, plus `angular` · u (the angular term's 2u / B).
    ///
    /// With dL/dS = (P − Π) / 2B (Π the positive pairs), dL/dθ = A θ for the symmetric
    /// A = (dL/dS + dL/dSᵀ) / τ, and back through θ = u / ‖u‖:
    /// dL/duᵢ = (Σⱼ Aᵢⱼ uⱼ / ‖uⱼ‖ − θᵢ ⟨θᵢ, dL/dθᵢ⟩) / ‖uᵢ‖, where ⟨θᵢ, dL/dθᵢ⟩ = Σⱼ Aᵢⱼ Sᵢⱼ
    /// (the radial term is dropped where the norm was clamped). So Mᵢⱼ = Aᵢⱼ / (‖uᵢ‖ ‖uⱼ‖)
    /// off the diagonal, and the diagonal (where A is 0) carries the radial and angular terms.
    fn gradient_matrix(&self, angular: f32) -> Vec<f32> {
        let (n, b) = (self.n, self.b);
        let scale = self.inv_tau / n as f32;
        let mut m = vec![0f32; n * n];
        let p = &self.probabilities;
        let rows = m
            .par_chunks_exact_mut(n)
            .zip(self.cosines.par_chunks_exact(n))
            .with_min_len(ROWS_PER_TASK);
        rows.enumerate().for_each(|(i, (row, s))| {
            // Row i of A: (P + Pᵀ) · scale, less the positive pair.
            for (j, v) in row.iter_mut().enumerate() {
                *v = p[j * n + i];
            }
            for (v, p) in row.iter_mut().zip(&p[i * n..][..n]) {
                *v = (*v + p) * scale;
            }
            row[(i + b) % n] -= 2.0 * scale;
            let radial = dot(row, s);
            let inv = self.inv_norms[i];
            for (v, inv_j) in row.iter_mut().zip(&self.inv_norms) {
                *v *= inv * inv_j;
            }
            let live = self.squares[i].sqrt() > NORM_EPS;
            row[i] = if live { -radial * inv * inv } else { 0.0 } + angular;
        });
        m
    }
}

/// The reduction of `values` by `op` (associative and commutative: max, +) in 8 independent
/// lanes, so that it vectorises.
fn in_lanes(values: &[f32], identity: f32, op: impl Fn(f32, f32) -> f32) -> f32 {
    let mut lanes = [identity; 8];
    let chunks = values.chunks_exact(8);
    let tail = chunks.remainder().iter().fold(identity, |a, &b| op(a, b));
    for chunk in chunks {
        for (l, &v) in lanes.iter_mut().zip(chunk) {
            *l = op(*l, v);
        }
    }
    lanes.into_iter().fold(tail, op)
}

/// eˣ for the softmax's shifted logits (x ≤ 0), as Cephes' `expf`: x = n ln 2 + r with
/// |r| ≤ ln 2 / 2, a degree-7 polynomial for eʳ, and 2ⁿ put in the exponent bits; within 2 ulp
/// of the exact value. Branch-free, so that a loop over a row vectorises (libm's `expf` does
/// not). Below −87 (where eˣ < 2⁻¹²⁵, nothing next to the row's largest term, 1) it returns
/// e⁻⁸⁷.
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Adding and subtracting 1.5 · 2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 0.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let poly = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2)
        * r
        + 1.666_666_5e-1)
        * r
        + 0.5;
    let er = poly * r * r + r + 1.0;
    // n = `shifted`'s low mantissa bits, in −126..=0 here.
    let n_bits = shifted.to_bits().wrapping_sub(ROUND.to_bits()) as i32;
    er * f32::from_bits(((n_bits + 127) as u32) << 23)
}

/// Columns `cols` of x − c (n rows), row-major with the rows `stride` apart and zeros in
/// between: the stride is an odd number of 64-byte lines, at least the width rounded up to 16
/// floats, so that every 16-column panel lies inside a row and reading one down the rows walks
/// through all the L1 cache's sets (a stride of a multiple of 4 KiB would hit one set, 8 ways,
/// on every row).
struct Shifted {
    data: Vec<f32>,
    n: usize,
    width: usize,
    stride: usize,
}

impl Shifted {
    /// Columns `cols` of both views (B × D each) shifted by `center`, 2B rows.
    fn new(
        views: [&[f32]; 2],
        center: Option<&[f32]>,
        b: usize,
        d: usize,
        cols: Range<usize>,
    ) -> Self {
        let n = 2 * b;
        let width = cols.len();
        let lines = width.div_ceil(NR) | 1;
        let stride = lines * NR;
        let mut data = Vec::with_capacity(n * stride);
        for i in 0..n {
            let x = &views[i / b][(i % b) * d..][cols.clone()];
            match center {
                Some(c) => data.extend(x.iter().zip(&c[cols.clone()]).map(|(x, c)| x - c)),
                None => data.extend_from_slice(x),
            }
            data.resize((i + 1) * stride, 0.0);
        }
        Self {
            data,
            n,
            width,
            stride,
        }
    }
}

/// Where the products run: the crate's own kernels where the CPU has them, else the serial
/// general sgemm.
#[derive(Clone, Copy)]
enum Products {
    Own(TileKernel),
    Sgemm,
}

/// The left operand of the gradient product, prepared once for every slice of columns.
enum Left {
    /// Packed into panels of [`MR`] rows, for this kernel.
    Packed(TileKernel, Vec<f32>),
    /// Row-major, for the general sgemm.
    Plain(Vec<f32>),
}

impl Products {
    fn detect() -> Self {
        TileKernel::select().map_or(Self::Sgemm, Self::Own)
    }

    /// u uᵀ (n × n).
    fn gram(self, u: &Shifted) -> Vec<f32> {
        let (n, w, stride) = (u.n, u.width, u.stride);
        match self {
            Self::Own(kernel) => gram(&u.data, n, w, stride, kernel),
            Self::Sgemm => {
                let mut c = vec![0f32; n * n];
                sgemm_serial(
                    (n, n, w),
                    Operand::rows(&u.data, stride),
                    Operand::transposed(&u.data, stride),
                    &mut c,
                    n,
                    false,
                );
                c
            }
        }
    }

    /// `m` (n × n) as the left operand of [`Left::multiply`].
    fn left(self, m: &[f32], n: usize) -> Left {
        match self {
            Self::Own(kernel) => Left::Packed(kernel, pack_a(m, n, n)),
            Self::Sgemm => Left::Plain(m.to_vec()),
        }
    }
}

impl Left {
    /// `out[i]` = row i of M u (n rows of the slice's width): every element is written.
    fn multiply(&self, u: &Shifted, out: &mut [&mut [MaybeUninit<f32>]]) {
        let (n, w, stride) = (u.n, u.width, u.stride);
        assert!(
            out.len() == n && out.iter().all(|row| row.len() == w),
            "multiply: {} output rows for {n} rows of {w}",
            out.len()
        );
        match self {
            Self::Packed(kernel, a) => {
                // One 6 × 16 tile at a time into a buffer that stays in L1, then copied out:
                // the panel of u (n rows of 16 floats) is read by every row panel of M, from
                // L1 while n is at most a few hundred (batches up to about 250). The panels
                // of M cover the n rows (the last one padded), so every row is written.
                let mut tile = [0f32; MR * NR];
                for j0 in (0..w).step_by(NR) {
                    let cols = NR.min(w - j0);
                    for (ip, a) in a.chunks_exact(n * MR).enumerate() {
                        kernel.tile(n, a, (&u.data[j0..], stride), (&mut tile, NR), false);
                        for (out, values) in out[ip * MR..].iter_mut().zip(tile.chunks_exact(NR)) {
                            out[j0..j0 + cols].write_copy_of_slice(&values[..cols]);
                        }
                    }
                }
            }
            Self::Plain(a) => {
                let mut c = vec![0f32; n * w];
                sgemm_serial(
                    (n, w, n),
                    Operand::rows(a, n),
                    Operand::rows(&u.data, stride),
                    &mut c,
                    w,
                    false,
                );
                for (out, row) in out.iter_mut().zip(c.chunks_exact(w)) {
                    out.write_copy_of_slice(row);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn column_parts_cover_the_columns_in_order() {
        for (d, threads) in [(3, 2), (128, 8), (300, 2), (2048, 2), (2048, 3), (2049, 16)] {
            let parts = column_parts(d, threads);
            assert!(
                !parts.is_empty() && parts.len() <= threads,
                "{d} {threads}: {parts:?}"
            );
            assert_eq!(parts[0].start, 0);
            assert_eq!(parts[parts.len() - 1].end, d);
            for pair in parts.windows(2) {
                assert_eq!(pair[0].end, pair[1].start, "{d} {threads}: {parts:?}");
                assert_eq!(pair[0].len() % NR, 0, "{d} {threads}: {parts:?}");
            }
        }
    }

    #[test]
    fn shifted_rows_are_an_odd_number_of_cache_lines_apart() {
        for width in [1, 16, 17, 1000, 1008, 1024, 2048] {
            let (b, d) = (2, width + 5);
            let n = 2 * b;
            let x: Vec<f32> = (0..n * d).map(|i| i as f32).collect();
            let c = vec![1f32; d];
            let views = [&x[..b * d], &x[b * d..]];
            let u = Shifted::new(views, Some(&c), b, d, 2..2 + width);
            assert!(
                u.stride >= width.next_multiple_of(NR),
                "{width}: {}",
                u.stride
            );
            assert_eq!(u.stride % NR, 0, "{width}");
            assert_eq!((u.stride / NR) % 2, 1, "{width}: {}", u.stride);
            assert_eq!(u.data.len(), n * u.stride);
            for i in 0..n {
                let row = &u.data[i * u.stride..(i + 1) * u.stride];
                for (j, &v) in row.iter().enumerate() {
                    let want = if j < width {
                        x[i * d + 2 + j] - 1.0
                    } else {
                        0.0
                    };
                    assert_eq!(v, want, "{width}: row {i} column {j}");
                }
            }
        }
    }

    /// Within 2 ulp of the exact exponential over the softmax's whole range, 0 included.
    #[test]
    fn exp_nonpositive_is_within_two_ulp() {
        let mut worst = 0f64;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let want = (x as f64).exp();
            let got = exp_nonpositive(x) as f64;
            let ulp = (want as f32).next_up() as f64 - want as f32 as f64;
            worst = worst.max((got - want).abs() / ulp);
        }
        assert!(worst <= 2.0, "worst error {worst} ulp");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert!(exp_nonpositive(f32::NEG_INFINITY) < 1e-37);
    }

    /// The own kernels (AVX2 where the CPU has it, and the portable one) and the general
    /// sgemm give the same value and gradient, over several slices of columns, with and
    /// without the center and the angular term.
    #[test]
    fn every_product_path_agrees() {
        let (b, d) = (7, 301);
        let x: Vec<f32> = (0..2 * b * d)
            .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1 << 24) as f32 - 0.5)
            .collect();
        let c: Vec<f32> = (0..d).map(|i| (i % 5) as f32 * 0.02 - 0.04).collect();
        let mut paths = vec![Products::Sgemm];
        paths.extend(TileKernel::all().into_iter().map(Products::Own));
        for (center, angular) in [(Some(&c[..]), true), (None, false)] {
            let views = [&x[..b * d], &x[b * d..]];
            let run = |p: Products| compute(p, views, center, b, d, 4.0, angular, true);
            let want = run(Products::Sgemm);
            let want_grad = want.grad.expect("asked for");
            for &path in &paths {
                let got = run(path);
                let what = match path {
                    Products::Own(k) => format!("{k:?}"),
                    Products::Sgemm => "sgemm".into(),
                };
                assert!(
                    (got.value - want.value).abs() <= 1e-5 * want.value.abs(),
                    "{what}: value {} vs {}",
                    got.value,
                    want.value
                );
                let grad = got.grad.expect("asked for");
                let scale = want_grad.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (i, (g, w)) in grad.iter().zip(&want_grad).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-5 * scale,
                        "{what}: grad[{i}] {g} vs {w}"
                    );
                }
            }
        }
    }
}
