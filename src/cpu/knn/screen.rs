//! Exact kNN by screening: integer dot products of quantised rows bound every distance within a
//! proven margin, and only the bank rows that can still be among the k nearest are measured
//! exactly.
//!
//! Each row x (query or bank) gets its own scale s and is rounded to 16-bit integers
//! x' = round(s·x), with s = min(32 767 / max|xᵢ|, (46 340 − √D/2 − 1) / ‖x‖): every value fits
//! an `i16` and ‖x'‖ < 46 340, so that every integer dot product (and partial sum) fits an
//! `i32` and is exact ([`crate::cpu::kernels::int16`]). With x̂ = x'·(1/s) and e = x − x̂,
//!
//! |q·b − q̂·b̂| = |e_q·b + q̂·e_b| ≤ ‖e_q‖ ‖b‖ + ‖q̂‖ ‖e_b‖,
//!
//! so the estimate ã = ‖q‖² + ‖b‖² − 2 q̂·b̂ of a squared distance a lies within the row's margin
//! w = 2 (‖e_q‖ ‖b‖ + ‖q̂‖ ‖e_b‖), widened by a slack for the f32 arithmetic of both: every row
//! gets the bounds ã − w ≤ a ≤ ã + w. If t is the k-th smallest upper bound of a query, k rows
//! have a ≤ t, so every one of the k nearest has a lower bound ≤ t: the rows above that are
//! passed over, the others (the *candidates*) measured exactly. For unit rows at D = 2048,
//! w ≈ 10⁻³ against a spread of distances of ≈ 0.04, so a query has a handful of candidates.
//! A query whose candidates outgrow its share of the memory budget (rows nearly equidistant
//! from it: thousands on a few threads under the default budget) is searched again with the
//! f32 product.

use crate::cpu::kernels::int16::{Int16Kernel, PackedBank, pair};
use crate::cpu::kernels::tile::NR;

/// Bound on the L2 norm of a quantised row: 46 340² < 2³¹.
const NORM_LIMIT: f64 = 46_340.0;
/// Largest value of a quantised row (−32 768 is never produced).
const VALUE_LIMIT: f64 = 32_767.0;
/// Relative slack for the f32 evaluation of the estimates (a handful of roundings of 2⁻²⁴
/// each, against the magnitude of the terms).
const ARITHMETIC_SLACK: f64 = 4e-6;
/// Added to every margin: f32 values below `f32::MIN_POSITIVE` round by an absolute 2⁻¹⁵⁰, not
/// by a relative 2⁻²⁴, which the relative slack does not cover.
const ABSOLUTE_SLACK: f32 = f32::MIN_POSITIVE;
/// Rows with a larger squared norm are not screened: their estimates would near f32's range.
const MAX_SQUARED_NORM: f32 = 1e30;

/// The integer nearest to `v` (ties to even) for |v| < 2⁵¹, by adding and removing 1.5·2⁵²:
/// plain arithmetic that vectorises, where `f64::round` is a library call.
#[inline]
fn round_to_integer(v: f64) -> f64 {
    const SHIFT: f64 = 6_755_399_441_055_744.0;
    (v + SHIFT) - SHIFT
}

/// Whether rows of `d` values can be screened: the quantiser's norm limit leaves room for
/// the rounding of up to 2²⁴ values.
pub(crate) fn supports(d: usize) -> bool {
    d <= 1 << 24
}

/// Rows quantised to pair words, with what the bound needs of each.
pub(crate) struct QuantizedRows {
    /// rows × `words` pair words.
    pub(crate) words: Vec<i32>,
    /// ⌈D / 2⌉.
    pub(crate) words_per_row: usize,
    /// 1 / s per row.
    pub(crate) inv_scale: Vec<f32>,
    /// ‖x‖² per row, rounded from f64.
    pub(crate) sq: Vec<f32>,
    /// ‖x‖ per row.
    pub(crate) norm: Vec<f64>,
    /// ‖x̂‖ per row, x̂ = x' · `inv_scale`.
    pub(crate) quantized_norm: Vec<f64>,
    /// ‖x − x̂‖ per row (x̂ as above).
    pub(crate) error: Vec<f64>,
}

impl QuantizedRows {
    /// Quantises `rows` (row-major, `d` values each; finite).
    pub(crate) fn new(rows: &[f32], d: usize) -> Self {
        let count = rows.len() / d;
        let words_per_row = d.div_ceil(2);
        let mut out = Self {
            words: vec![0; count * words_per_row],
            words_per_row,
            inv_scale: Vec::with_capacity(count),
            sq: Vec::with_capacity(count),
            norm: Vec::with_capacity(count),
            quantized_norm: Vec::with_capacity(count),
            error: Vec::with_capacity(count),
        };
        let norm_target = NORM_LIMIT - (d as f64).sqrt() / 2.0 - 1.0;
        for (x, words) in rows
            .chunks_exact(d)
            .zip(out.words.chunks_exact_mut(words_per_row))
        {
            // Four partial sums and maxima, so that the passes vectorise.
            let (mut sq4, mut max4) = ([0f64; 4], [0f64; 4]);
            let fours = x.chunks_exact(4);
            let tail = fours.remainder();
            for c in fours {
                for ((s, m), &v) in sq4.iter_mut().zip(max4.iter_mut()).zip(c) {
                    let v = v as f64;
                    *s += v * v;
                    *m = if v.abs() > *m { v.abs() } else { *m };
                }
            }
            for (l, &v) in tail.iter().enumerate() {
                let v = v as f64;
                sq4[l] += v * v;
                max4[l] = max4[l].max(v.abs());
            }
            let sq = (sq4[0] + sq4[1]) + (sq4[2] + sq4[3]);
            let max = max4[0].max(max4[1]).max(max4[2].max(max4[3]));
            let scale = if max > 0.0 {
                (VALUE_LIMIT / max).min(norm_target / sq.sqrt())
            } else {
                1.0
            };
            // x̂ = x' · (1 / s rounded to f32), the value the estimates use.
            let inv_scale = (1.0 / scale) as f32;
            let inv = inv_scale as f64;
            // Per value: x' = round(s·x), and the sums of x'² and (x − x'/s)², two lanes each.
            let (mut q_sq, mut e_sq) = ([0f64; 2], [0f64; 2]);
            let mut quantize = |v: f32, lane: usize| -> i16 {
                let r = round_to_integer(v as f64 * scale);
                q_sq[lane] += r * r;
                let e = v as f64 - r * inv;
                e_sq[lane] += e * e;
                r as i16
            };
            let pairs = x.chunks_exact(2);
            let last = pairs.remainder().first().copied();
            for (w, p) in words.iter_mut().zip(pairs) {
                *w = pair(quantize(p[0], 0), quantize(p[1], 1));
            }
            if let Some(v) = last {
                words[words_per_row - 1] = pair(quantize(v, 0), 0);
            }
            let (q_sq, e_sq) = (q_sq[0] + q_sq[1], e_sq[0] + e_sq[1]);
            out.inv_scale.push(inv_scale);
            out.sq.push(sq as f32);
            out.norm.push(sq.sqrt());
            out.quantized_norm.push(q_sq.sqrt() * inv);
            out.error.push(e_sq.sqrt());
        }
        out
    }

    /// Number of rows.
    pub(crate) fn len(&self) -> usize {
        self.inv_scale.len()
    }
}

/// The bank as the screen reads it: packed quantised rows and the per-row terms of the
/// estimate and of its bound.
#[derive(Clone, Debug)]
pub(crate) struct ScreenBank {
    pub(crate) packed: PackedBank,
    /// The terms of [`Candidates::offer`]'s estimate and margin, 8 rows per block, up to the
    /// packed panels' padded row count (padding rows give NaN bounds, which are never kept).
    terms: Vec<TermBlock>,
}

/// Eight bank rows' shares of the estimate ã = (‖q‖² + ‖b‖²) − (2/s_q)·(q'·b')·(1/s_b) and of
/// its margin w = ‖e_q‖·2‖b‖ + ‖q̂‖·(2‖e_b‖ + 2σ‖b̂‖) + σ(‖q‖² + ‖b‖²) + `ABSOLUTE_SLACK`,
/// σ the arithmetic slack.
#[derive(Clone, Copy, Debug)]
struct TermBlock {
    /// 1 / s.
    inv_scale: [f32; 8],
    /// ‖b‖².
    sq: [f32; 8],
    /// 2‖b‖, rounded up.
    norm2: [f32; 8],
    /// 2‖e_b‖ + 2σ‖b̂‖, rounded up.
    error2: [f32; 8],
    /// σ‖b‖², rounded up.
    slack: [f32; 8],
}

/// An f64 bound as an f32 no smaller: f64 → f32 rounds to nearest, one part in 2²⁴ at most
/// down to `f32::MIN_POSITIVE`, below which positive values become that.
fn up(v: f64) -> f32 {
    let rounded = (v * (1.0 + 1e-6)) as f32;
    if v > 0.0 {
        rounded.max(f32::MIN_POSITIVE)
    } else {
        rounded
    }
}

impl ScreenBank {
    /// Quantises and packs `bank` (n × d, finite), or `None` where the screen does not apply
    /// (D beyond [`supports`], or a squared norm too large for the f32 estimates).
    pub(crate) fn new(bank: &[f32], d: usize, kernel: Int16Kernel) -> Option<Self> {
        if !supports(d) {
            return None;
        }
        let q = QuantizedRows::new(bank, d);
        if q.sq.iter().any(|&s| s > MAX_SQUARED_NORM) {
            return None;
        }
        let packed = PackedBank::from_rows(&q.words, q.len(), q.words_per_row, kernel);
        let padding = TermBlock {
            inv_scale: [0.0; 8],
            sq: [f32::NAN; 8],
            norm2: [0.0; 8],
            error2: [0.0; 8],
            slack: [0.0; 8],
        };
        let mut terms = vec![padding; packed.panel_count() * NR / 8];
        for j in 0..q.len() {
            let (block, l) = (&mut terms[j / 8], j % 8);
            block.inv_scale[l] = q.inv_scale[j];
            block.sq[l] = q.sq[j];
            block.norm2[l] = up(2.0 * q.norm[j]);
            block.error2[l] = up(2.0 * q.error[j] + 2.0 * ARITHMETIC_SLACK * q.quantized_norm[j]);
            block.slack[l] = up(ARITHMETIC_SLACK * q.sq[j] as f64);
        }
        Some(Self { packed, terms })
    }

    /// The screen of query `r` of `queries` for its `k` nearest. It holds up to 2k + 256 rows
    /// between compactions, doubles that when a compaction frees less than half, and gives up
    /// (overflows) when that would pass `max_candidates`; it is overflowed from the start when
    /// the query's squared norm is too large for the f32 estimates. Its list never holds more
    /// than max(`max_candidates`, 2k + 256) + 64 rows.
    pub(crate) fn query(
        &self,
        queries: &QuantizedRows,
        r: usize,
        k: usize,
        max_candidates: usize,
    ) -> Candidates {
        let cap = 2 * k + 256;
        Candidates {
            items: Vec::with_capacity(cap + 64),
            threshold: f32::INFINITY,
            query: QueryTerms {
                sq: queries.sq[r],
                factor: 2.0 * queries.inv_scale[r],
                error: up(queries.error[r]),
                quantized_norm: up(queries.quantized_norm[r]),
                slack: up(ARITHMETIC_SLACK * queries.sq[r] as f64),
            },
            k,
            cap,
            max_cap: max_candidates.max(cap),
            // Such a query is searched with the f32 product.
            overflowed: queries.sq[r] > MAX_SQUARED_NORM,
        }
    }
}

/// The query's share of the estimate and its margin (see [`TermBlock`]).
#[derive(Clone, Copy)]
struct QueryTerms {
    sq: f32,
    /// 2 / s_q.
    factor: f32,
    /// ‖e_q‖, rounded up.
    error: f32,
    /// ‖q̂‖, rounded up.
    quantized_norm: f32,
    /// σ‖q‖², rounded up.
    slack: f32,
}

/// One query's screen: the bank rows whose lower bound is within the k-th smallest upper bound
/// seen so far.
pub(crate) struct Candidates {
    /// (lower bound, upper bound, bank row).
    items: Vec<(f32, f32, usize)>,
    /// Rows whose lower bound exceeds this cannot be among the k nearest (∞ until k are seen).
    threshold: f32,
    query: QueryTerms,
    k: usize,
    /// Rows held before the next compaction; doubled when a compaction frees less than half.
    cap: usize,
    /// The most `cap` may grow to.
    max_cap: usize,
    overflowed: bool,
}

impl Candidates {
    /// Offers bank rows `b0..b0 + dots.len()`, given their integer dot products with the
    /// query; `b0` and `dots.len()` are multiples of 16 (whole packed panels: rows past the
    /// bank are never kept). Blocks of 64 whose least lower bound exceeds the threshold are
    /// passed over after one vectorised pass.
    pub(crate) fn offer(&mut self, bank: &ScreenBank, dots: &[i32], b0: usize) {
        debug_assert!(b0.is_multiple_of(NR) && dots.len().is_multiple_of(NR));
        if self.overflowed {
            return;
        }
        debug_assert!(b0 / 8 + dots.len() / 8 <= bank.terms.len());
        let q = self.query;
        // (estimate, margin) of lane `l` of a block of 8 rows.
        let bounds = |dot: i32, t: &TermBlock, l: usize| {
            let estimate = (q.sq + t.sq[l]) - q.factor * (dot as f32 * t.inv_scale[l]);
            let margin = (q.error * t.norm2[l] + q.quantized_norm * t.error2[l])
                + ((q.slack + t.slack[l]) + ABSOLUTE_SLACK);
            (estimate, margin)
        };
        let terms = &bank.terms[b0 / 8..];
        let mut lower = [0f32; 64];
        for (block, (dots, terms)) in dots.chunks(64).zip(terms.chunks(8)).enumerate() {
            let mut lanes = [f32::INFINITY; 8];
            for ((d8, t), lo8) in dots
                .chunks_exact(8)
                .zip(terms)
                .zip(lower.chunks_exact_mut(8))
            {
                for (l, (lo, lane)) in lo8.iter_mut().zip(lanes.iter_mut()).enumerate() {
                    let (estimate, margin) = bounds(d8[l], t, l);
                    *lo = estimate - margin;
                    *lane = if *lo < *lane { *lo } else { *lane };
                }
            }
            let least = lanes.iter().fold(f32::INFINITY, |m, &v| m.min(v));
            if least > self.threshold {
                continue;
            }
            for (c, &lo) in lower[..dots.len()].iter().enumerate() {
                if lo <= self.threshold {
                    let (estimate, margin) = bounds(dots[c], &terms[c / 8], c % 8);
                    self.items
                        .push((lo, estimate + margin, b0 + block * 64 + c));
                }
            }
            if self.items.len() >= self.cap {
                self.compact();
                if self.items.len() > self.cap / 2 {
                    if self.cap >= self.max_cap {
                        self.overflowed = true;
                        self.items = Vec::new();
                        return;
                    }
                    self.cap = (2 * self.cap).min(self.max_cap);
                    // A block of 64 may be pushed before the next check.
                    let room = self.cap + 64 - self.items.len();
                    self.items.reserve_exact(room);
                }
            }
        }
        if self.threshold == f32::INFINITY && self.items.len() >= self.k {
            self.compact();
        }
    }

    /// Lowers the threshold to the k-th smallest upper bound and drops the rows whose lower
    /// bound is above it.
    fn compact(&mut self) {
        if self.items.len() < self.k {
            return;
        }
        let (_, kth, _) = self
            .items
            .select_nth_unstable_by(self.k - 1, |a, b| a.1.total_cmp(&b.1));
        self.threshold = self.threshold.min(kth.1);
        let threshold = self.threshold;
        self.items.retain(|item| item.0 <= threshold);
    }

    /// The bank rows to measure exactly, or `None` when the screen overflowed.
    pub(crate) fn finish(mut self) -> Option<Vec<usize>> {
        self.compact();
        (!self.overflowed).then(|| self.items.into_iter().map(|(_, _, i)| i).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::kernels::tile::MR;

    /// The integer dot products of every quantised query with every bank row: (query-major
    /// rows of `ldc`, ldc = the bank's padded row count).
    fn dots_with_every_row(screen: &ScreenBank, queries: &QuantizedRows) -> (Vec<i32>, usize) {
        let words = queries.words_per_row;
        let a = crate::cpu::kernels::tile::pack_a(&queries.words, queries.len(), words);
        let a_panels = queries.len().div_ceil(MR);
        let panels = screen.packed.panel_count();
        let ldc = panels * NR;
        let mut dots = vec![0; a_panels * MR * ldc];
        screen
            .packed
            .product(&a, a_panels, (0, panels), &mut dots, ldc);
        (dots, ldc)
    }

    /// Rows of varied norms and shapes: unit-ish, large, tiny, one spike, all zero.
    fn awkward_rows(d: usize) -> Vec<f32> {
        let mut rows = Vec::new();
        for r in 0..6u32 {
            for i in 0..d as u32 {
                let v = ((i.wrapping_mul(2654435761) ^ r.wrapping_mul(40503)) >> 8) as f32
                    / (1 << 24) as f32
                    - 0.5;
                rows.push(match r {
                    0 => v,
                    1 => v * 1e4,
                    2 => v * 1e-6,
                    3 => {
                        if i == 1 {
                            3.0
                        } else {
                            v * 1e-3
                        }
                    }
                    4 => 0.0,
                    _ => v + 0.5,
                });
            }
        }
        rows
    }

    #[test]
    fn quantised_rows_keep_their_limits_and_errors() {
        for d in [1, 2, 7, 512, 2049] {
            let rows = awkward_rows(d);
            let q = QuantizedRows::new(&rows, d);
            assert_eq!(q.len(), 6);
            for r in 0..6 {
                let x = &rows[r * d..(r + 1) * d];
                let words = &q.words[r * q.words_per_row..(r + 1) * q.words_per_row];
                let values: Vec<i64> = words
                    .iter()
                    .flat_map(|&w| [w as i16 as i64, (w >> 16) as i16 as i64])
                    .collect();
                let norm_sq: i64 = values.iter().map(|v| v * v).sum();
                assert!(norm_sq < 46_340 * 46_340, "d {d} row {r}: {norm_sq}");
                assert!(values.iter().all(|v| v.abs() <= 32_767));
                // The padding value is zero.
                assert!(values[d..].iter().all(|&v| v == 0));
                // The recorded error is the error of x̂ = x' / s.
                let inv = q.inv_scale[r] as f64;
                let err: f64 = x
                    .iter()
                    .zip(&values)
                    .map(|(&v, &w)| (v as f64 - w as f64 * inv).powi(2))
                    .sum::<f64>()
                    .sqrt();
                let tolerance = 1e-6 * q.norm[r] + 1e-30;
                assert!((err - q.error[r]).abs() <= tolerance, "d {d} row {r}");
                // Rounding to 16 bits leaves at most half a step per value.
                assert!(q.error[r] <= 0.51 * (d as f64).sqrt() * inv);
            }
            // The all-zero row quantises to zeros with no error.
            assert_eq!(q.error[4], 0.0);
            assert_eq!(q.quantized_norm[4], 0.0);
        }
    }

    /// Every row of a screen is either dropped with a proof or kept: the k nearest by exact
    /// distance are always among the candidates.
    #[test]
    fn candidates_always_hold_the_k_nearest() {
        for (kernel, d) in Int16Kernel::all()
            .into_iter()
            .flat_map(|k| [3, 64, 513].map(|d| (k, d)))
        {
            let bank = awkward_rows(d)
                .into_iter()
                .chain(
                    (0..200 * d as u32)
                        .map(|i| ((i.wrapping_mul(2246822519) >> 9) as f32) / 8e6 - 0.5),
                )
                .collect::<Vec<f32>>();
            let n = bank.len() / d;
            let screen = ScreenBank::new(&bank, d, kernel).unwrap();
            let queries: Vec<f32> = bank[..6 * d]
                .iter()
                .chain(&bank[50 * d..60 * d])
                .map(|v| v * 0.999 + 1e-4)
                .collect();
            let quantized = QuantizedRows::new(&queries, d);
            let (dots, ldc) = dots_with_every_row(&screen, &quantized);
            let exact = crate::cpu::knn::brute_force(&bank, &queries, d);
            for k in [1, 2, 5] {
                for r in 0..quantized.len() {
                    let mut candidates = screen.query(&quantized, r, k, 0);
                    // Offered in two parts of whole panels, as tiles do.
                    let row = &dots[r * ldc..(r + 1) * ldc];
                    candidates.offer(&screen, &row[..32], 0);
                    candidates.offer(&screen, &row[32..], 32);
                    let kept = candidates.finish().expect("no overflow here");
                    for &(_, j) in &exact[r][..k] {
                        assert!(kept.contains(&j), "d {d} k {k} query {r}: row {j} dropped");
                    }
                    assert!(kept.len() < n, "d {d} k {k} query {r}: nothing dropped");
                }
            }
        }
    }

    /// Values from 10⁻⁴⁴ to 10⁻¹⁸ give squared norms (and, below about 10⁻³⁴, scales) in or
    /// under f32's subnormal range, where roundings are absolute: the bounds must still hold
    /// (random small cases, the k nearest by f64 distance always kept).
    #[test]
    fn tiny_values_keep_the_bounds_sound() {
        use rand::rngs::StdRng;
        use rand::{RngExt, SeedableRng};
        let mut rng = StdRng::seed_from_u64(3);
        for trial in 0..3000 {
            let d = [1, 2, 3, 8][trial % 4];
            let n = 2 + trial % 7;
            let k = if rng.random::<bool>() { 2 } else { 1 };
            // Down to where 1 / s underflows f32 (max |x| below about 4e-34) and beyond.
            let scale = 10f32.powf(-44.0 + 26.0 * rng.random::<f32>());
            let mut value = || (rng.random::<f32>() * 2.0 - 1.0) * scale;
            let bank: Vec<f32> = (0..n * d).map(|_| value()).collect();
            let query: Vec<f32> = (0..d).map(|_| value()).collect();
            let screen = ScreenBank::new(&bank, d, Int16Kernel::Portable).unwrap();
            let quantized = QuantizedRows::new(&query, d);
            let (dots, ldc) = dots_with_every_row(&screen, &quantized);
            let mut candidates = screen.query(&quantized, 0, k, 0);
            candidates.offer(&screen, &dots[..ldc], 0);
            let kept = candidates.finish().unwrap();
            let exact = crate::cpu::knn::brute_force(&bank, &query, d);
            for &(_, j) in &exact[0][..k] {
                assert!(kept.contains(&j), "trial {trial}: row {j} dropped");
            }
        }
    }

    #[test]
    fn many_equidistant_rows_overflow_the_screen() {
        let d = 8;
        let bank = vec![0.25f32; 400 * d];
        let screen = ScreenBank::new(&bank, d, Int16Kernel::Portable).unwrap();
        let quantized = QuantizedRows::new(&[0.5f32; 8], d);
        let mut candidates = screen.query(&quantized, 0, 2, 0);
        let (dots, ldc) = dots_with_every_row(&screen, &quantized);
        assert_eq!(ldc, 400);
        candidates.offer(&screen, &dots[..ldc], 0);
        assert!(candidates.finish().is_none());
    }
}
