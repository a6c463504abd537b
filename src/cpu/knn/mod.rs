//! Exact kNN on host memory, spread over rayon threads: the integer screen ([`screen`]) for
//! batches of queries where the CPU has AVX2, tiled sgemm with a top-k pass over each tile
//! otherwise. The public face is `crate::knn::HostKnnScorer`, which checks its input; the
//! search here assumes it checked.

mod screen;

use std::sync::OnceLock;

use rayon::prelude::*;

use super::kernels::int16::Int16Kernel;
use super::kernels::sgemm::{LIBRARY, Library, Operand, sgemm, sgemm_serial};
use super::kernels::tile::{MR, NR, pack_a};
use super::lazy::get_or_make;
use screen::{QuantizedRows, ScreenBank};

/// Rows (bank rows or queries) of a larger squared norm, or one that overflows f32, are
/// *huge*: their distances are never estimated as ‖q‖² + ‖b‖² − 2 q·b, which could overflow
/// (∞ − ∞ = NaN) and rank them wrongly, but measured directly as Σ (q − b)². Below it every
/// term of the estimate, the partial sums of q·b included (|q·b| ≤ ‖q‖‖b‖), is at most 2¹²⁴
/// in magnitude and the estimate at most 2¹²⁶, well inside f32's range (2¹²⁸). The tensor
/// path (`crate::knn::KnnScorer`) uses the same limit.
pub(crate) const HUGE_SQUARED_NORM: f32 = (1u128 << 124) as f32;

/// Whether a row of squared norm `sq` (as f32, possibly ∞) is huge ([`HUGE_SQUARED_NORM`]).
#[inline]
pub(crate) fn is_huge(sq: f32) -> bool {
    // Also true for NaN, which finite rows never give.
    sq.is_nan() || sq > HUGE_SQUARED_NORM
}

/// An exact search over a bank of N rows of D features (see `crate::knn::HostKnnScorer` for
/// what it does and guarantees).
#[derive(Clone, Debug)]
pub(crate) struct ExactSearch {
    bank: Vec<f32>,
    /// ‖b‖² per bank row; ∞ for the huge rows, whose products are then set to 0 so that
    /// their estimates are ∞ and never NaN.
    bank_sq: Vec<f32>,
    /// The huge bank rows ([`HUGE_SQUARED_NORM`]), ascending; usually none. Every query
    /// measures its distance to each of them exactly.
    huge: Vec<usize>,
    /// The micro-kernel the screen runs on, where the CPU has one.
    kernel: Option<Int16Kernel>,
    /// The bank quantised for the screen, made by the first search that uses it (`None`
    /// where the screen does not apply to this bank).
    screen: OnceLock<Option<ScreenBank>>,
    n: usize,
    d: usize,
    k: usize,
    tile_bytes: usize,
}

impl ExactSearch {
    /// A search for the `k` nearest of the `n` rows of `bank` (row-major, n × d), with a
    /// budget of `tile_bytes` for the tiles in flight. The caller has checked that n, d ≥ 1,
    /// 1 ≤ k ≤ n, `bank.len() == n·d` and every value is finite.
    pub(crate) fn new(bank: Vec<f32>, (n, d): (usize, usize), k: usize, tile_bytes: usize) -> Self {
        let mut bank_sq: Vec<f32> = bank.chunks_exact(d).map(dot_self).collect();
        let huge: Vec<usize> = (0..n).filter(|&i| is_huge(bank_sq[i])).collect();
        for &i in &huge {
            bank_sq[i] = f32::INFINITY;
        }
        Self {
            bank,
            bank_sq,
            huge,
            kernel: Int16Kernel::select(),
            screen: OnceLock::new(),
            n,
            d,
            k,
            tile_bytes: tile_bytes.max(4),
        }
    }

    /// The same search with another budget for the tiles in flight.
    pub(crate) fn with_tile_bytes(mut self, bytes: usize) -> Self {
        self.tile_bytes = bytes.max(4);
        self
    }

    /// The bank, row-major N × D.
    pub(crate) fn bank(&self) -> &[f32] {
        &self.bank
    }

    /// (N, D).
    pub(crate) fn shape(&self) -> (usize, usize) {
        (self.n, self.d)
    }

    /// Neighbours per query.
    pub(crate) fn k(&self) -> usize {
        self.k
    }

    /// Per query: the k nearest (exact distance, index), nearest first.
    pub(crate) fn search(&self, queries: &[f32], q: usize) -> Vec<Vec<(f32, usize)>> {
        if q == 0 {
            return Vec::new();
        }
        let threads = rayon::current_num_threads().max(1);
        // The screen made outside its cell: `ScreenBank::new` runs on rayon, and a pool
        // thread waiting there may take another search through this cell (`get_or_make`).
        let screen = self
            .kernel
            .filter(|_| q >= MR * threads)
            .and_then(|kernel| {
                get_or_make(&self.screen, || ScreenBank::new(&self.bank, self.d, kernel)).as_ref()
            });
        let Some(screen) = screen else {
            return self.search_dense(queries, q);
        };
        let (mut found, overflowed) = self.search_screened(screen, queries, q);
        if !overflowed.is_empty() {
            let d = self.d;
            let rows: Vec<f32> = overflowed
                .iter()
                .flat_map(|&i| &queries[i * d..(i + 1) * d])
                .copied()
                .collect();
            for (i, list) in overflowed
                .iter()
                .zip(self.search_dense(&rows, overflowed.len()))
            {
                found[*i] = list;
            }
        }
        found
    }

    /// The search on f32 products: tiles of dot products from sgemm, the k smallest estimates
    /// ‖q‖² + ‖b‖² − 2 q·b kept per query, and their distances then measured exactly, with
    /// those of the huge bank rows; a huge query ([`HUGE_SQUARED_NORM`]) is measured exactly
    /// against every row instead.
    fn search_dense(&self, queries: &[f32], q: usize) -> Vec<Vec<(f32, usize)>> {
        let d = self.d;
        let elems = (self.tile_bytes / 4).max(1);
        let q_sq: Vec<f32> = queries.chunks_exact(d).map(dot_self).collect();
        let mut merged: Vec<TopK> = (0..q).map(|_| TopK::new(self.k)).collect();
        let threads = rayon::current_num_threads().max(1);
        if LIBRARY != Library::OpenBlas || q < 16 * threads {
            // Tiles of up to 1024 × 1024, spread over the threads, each one product on its
            // thread (large enough to amortise the packing of both operands) whose 4 MiB of
            // distances are still in cache when the top-k pass reads them.
            let per_thread = (elems / threads).max(1);
            let qt = q.min(1024).min(per_thread);
            let q_tiles = q.div_ceil(qt);
            let mut nt = self.n.min(1024).min((per_thread / qt).max(1));
            if q_tiles < threads {
                // Few queries (single-query latency): split the bank across threads instead.
                let per_query_tile = threads.div_ceil(q_tiles);
                nt = nt.min(self.n.div_ceil(per_query_tile)).max(1);
            }
            let b_tiles = self.n.div_ceil(nt);
            let partial: Vec<(usize, Vec<TopK>)> = (0..q_tiles * b_tiles)
                .into_par_iter()
                .map(|item| {
                    let (qi, bi) = (item / b_tiles, item % b_tiles);
                    let (q0, m) = (qi * qt, qt.min(q - qi * qt));
                    let (b0, n) = (bi * nt, nt.min(self.n - bi * nt));
                    let mut dots = vec![0.0f32; m * n];
                    sgemm_serial(
                        (m, n, d),
                        Operand::rows(&queries[q0 * d..], d),
                        Operand::transposed(&self.bank[b0 * d..], d),
                        &mut dots,
                        n,
                        false,
                    );
                    self.clear_huge_products(&mut dots[..m * n], n, b0);
                    let tops = (0..m)
                        .map(|r| {
                            let mut top = TopK::new(self.k);
                            self.push_row(&mut top, q_sq[q0 + r], &dots[r * n..][..n], b0);
                            top
                        })
                        .collect();
                    (q0, tops)
                })
                .collect();
            merge(&mut merged, partial);
        } else {
            // With OpenBLAS, which threads one large product better than the per-thread tiles:
            // tiles of up to 2048 queries × as many bank rows as the budget allows, one product
            // each on all threads, then the top-k pass over the tile's rows in parallel.
            let qt = q.min(2048).min(elems);
            let nt = self.n.min((elems / qt).max(1));
            let mut dots = vec![0.0f32; qt * nt];
            for q0 in (0..q).step_by(qt) {
                let m = qt.min(q - q0);
                for b0 in (0..self.n).step_by(nt) {
                    let n = nt.min(self.n - b0);
                    // dots (m × n, row-major) = Q[q0..q0 + m] · B[b0..b0 + n]ᵀ
                    sgemm(
                        (m, n, d),
                        Operand::rows(&queries[q0 * d..], d),
                        Operand::transposed(&self.bank[b0 * d..], d),
                        &mut dots,
                        n,
                        false,
                    );
                    self.clear_huge_products(&mut dots[..m * n], n, b0);
                    merged[q0..q0 + m]
                        .par_iter_mut()
                        .zip(&q_sq[q0..q0 + m])
                        .zip(dots.par_chunks(n))
                        .for_each(|((top, &qs), row)| self.push_row(top, qs, row, b0));
                }
            }
        }
        merged
            .into_par_iter()
            .enumerate()
            .map(|(row, top)| {
                let query = &queries[row * d..(row + 1) * d];
                if is_huge(q_sq[row]) {
                    return self.search_exhaustive(query);
                }
                let mut exact: Vec<(f32, usize)> = top
                    .items
                    .into_iter()
                    .map(|(_, i)| (self.exact_distance(query, i), i))
                    .collect();
                for &i in &self.huge {
                    // A huge row may be among the k already, with its estimate of ∞.
                    if !exact.iter().any(|&(_, j)| j == i) {
                        exact.push((self.exact_distance(query, i), i));
                    }
                }
                exact.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
                exact.truncate(self.k);
                exact
            })
            .collect()
    }

    /// Sets the products of the huge bank rows within `b0..b0 + n` to 0, in a tile of rows of
    /// `n` products: with their ‖b‖² of ∞, their estimates are then ∞ (never NaN) and they
    /// reach the exact pass only through [`ExactSearch::huge`].
    fn clear_huge_products(&self, dots: &mut [f32], n: usize, b0: usize) {
        let first = self.huge.partition_point(|&i| i < b0);
        let last = self.huge.partition_point(|&i| i < b0 + n);
        for &i in &self.huge[first..last] {
            dots.iter_mut()
                .skip(i - b0)
                .step_by(n)
                .for_each(|v| *v = 0.0);
        }
    }

    /// The k nearest of a huge query: every bank row measured exactly.
    fn search_exhaustive(&self, query: &[f32]) -> Vec<(f32, usize)> {
        let mut top = TopK::new(self.k);
        for i in 0..self.n {
            top.push(self.exact_distance(query, i), i);
        }
        top.items
    }

    /// The screened search ([`screen`]): each task quantises and packs a block of up
    /// to 192 queries, walks its share of the packed bank in tiles of up to 128 rows whose
    /// integer dot products are offered to the queries' screens while still in cache, and
    /// measures its candidates exactly. With fewer query blocks than threads (few queries),
    /// the bank is split across threads. Returns the k nearest per query and the queries whose
    /// screen overflowed (their lists are incomplete, to be replaced).
    fn search_screened(
        &self,
        screen: &ScreenBank,
        queries: &[f32],
        q: usize,
    ) -> (Vec<Vec<(f32, usize)>>, Vec<usize>) {
        const TILE_QUERIES: usize = 192;
        const TILE_BANK_ROWS: usize = 128;
        let d = self.d;
        let threads = rayon::current_num_threads().max(1);
        // Each thread's share of the budget: half for its tile of dot products, half for its
        // queries' candidate lists.
        let share = self.tile_bytes / threads;
        let per_thread = (share / 2 / 4).max(1);
        let panels = screen.packed.panel_count();
        // Tile sizes in panels: at least one of each.
        let mut cols = (TILE_BANK_ROWS / NR).min(panels);
        let rows = (TILE_QUERIES / MR)
            .min(q.div_ceil(MR))
            .min(per_thread / (MR * NR * cols))
            .max(1);
        cols = cols.min(per_thread / (MR * NR * rows)).max(1);
        let q_blocks = q.div_ceil(rows * MR);
        let splits = if q_blocks < threads {
            threads.div_ceil(q_blocks).min(panels.div_ceil(cols))
        } else {
            1
        };
        let per_split = panels.div_ceil(splits);
        let ldc = cols * NR;
        let item = std::mem::size_of::<(f32, f32, usize)>();
        let max_candidates = share / 2 / (rows * MR * item);
        let partial: Vec<ScreenedPart> = (0..q_blocks * splits)
            .into_par_iter()
            .map(|item| {
                let (qi, si) = (item / splits, item % splits);
                let q0 = qi * rows * MR;
                let m = (rows * MR).min(q - q0);
                let (s0, s1) = (si * per_split, ((si + 1) * per_split).min(panels));
                let block = &queries[q0 * d..(q0 + m) * d];
                let quantized = QuantizedRows::new(block, d);
                let a = pack_a(&quantized.words, m, quantized.words_per_row);
                let a_panels = m.div_ceil(MR);
                let mut dots = vec![0i32; a_panels * MR * ldc];
                let mut screens: Vec<_> = (0..m)
                    .map(|r| screen.query(&quantized, r, self.k, max_candidates))
                    .collect();
                for p0 in (s0..s1).step_by(cols) {
                    let count = cols.min(s1 - p0);
                    screen
                        .packed
                        .product(&a, a_panels, (p0, count), &mut dots, ldc);
                    for (r, candidates) in screens.iter_mut().enumerate() {
                        candidates.offer(screen, &dots[r * ldc..][..count * NR], p0 * NR);
                    }
                }
                let mut overflowed = Vec::new();
                let mut tops = Vec::with_capacity(m);
                for (r, (candidates, query)) in
                    screens.into_iter().zip(block.chunks_exact(d)).enumerate()
                {
                    let mut top = TopK::new(self.k);
                    match candidates.finish() {
                        Some(kept) => {
                            for i in kept {
                                top.push(self.exact_distance(query, i), i);
                            }
                        }
                        None => overflowed.push(q0 + r),
                    }
                    tops.push(top);
                }
                ((q0, tops), overflowed)
            })
            .collect();
        let (partial, overflowed): (Vec<_>, Vec<_>) = partial.into_iter().unzip();
        let mut merged: Vec<TopK> = (0..q).map(|_| TopK::new(self.k)).collect();
        merge(&mut merged, partial);
        // A query that overflowed in any part of a split bank is searched again whole.
        let mut overflowed: Vec<usize> = overflowed.into_iter().flatten().collect();
        overflowed.sort_unstable();
        overflowed.dedup();
        (
            merged.into_iter().map(|top| top.items).collect(),
            overflowed,
        )
    }

    /// Offers the bank rows `b0..b0 + row.len()` to `top`, given their dot products with a
    /// query of squared norm `qs`. Blocks of 64 whose least distance cannot enter a full `top`
    /// are passed over after one vectorised pass; the distance is the same expression in both
    /// passes, so the skip is exact.
    fn push_row(&self, top: &mut TopK, qs: f32, row: &[f32], b0: usize) {
        let distance = |dot: f32, bs: f32| (qs + bs - 2.0 * dot).max(0.0);
        let bank_sq = &self.bank_sq[b0..b0 + row.len()];
        for (block, (dots, sq)) in row.chunks(64).zip(bank_sq.chunks(64)).enumerate() {
            if let Some(worst) = top.worst() {
                let mut lanes = [f32::INFINITY; 8];
                let (d8, s8) = (dots.chunks_exact(8), sq.chunks_exact(8));
                let tail = d8
                    .remainder()
                    .iter()
                    .zip(s8.remainder())
                    .fold(f32::INFINITY, |m, (&dot, &bs)| m.min(distance(dot, bs)));
                for (d8, s8) in d8.zip(s8) {
                    for ((lane, &dot), &bs) in lanes.iter_mut().zip(d8).zip(s8) {
                        let v = distance(dot, bs);
                        *lane = if v < *lane { v } else { *lane };
                    }
                }
                if lanes.iter().fold(tail, |m, &v| m.min(v)) > worst {
                    continue;
                }
            }
            let first = b0 + block * 64;
            for (c, (&dot, &bs)) in dots.iter().zip(sq).enumerate() {
                top.push(distance(dot, bs), first + c);
            }
        }
    }

    /// Σ (q − b)² against bank row `row`, in f64 (four partial sums, which pipeline).
    fn exact_distance(&self, query: &[f32], row: usize) -> f32 {
        let b = &self.bank[row * self.d..(row + 1) * self.d];
        let square = |x: f32, y: f32| {
            let t = x as f64 - y as f64;
            t * t
        };
        let (q4, b4) = (query.chunks_exact(4), b.chunks_exact(4));
        let tail: f64 = q4
            .remainder()
            .iter()
            .zip(b4.remainder())
            .map(|(&x, &y)| square(x, y))
            .sum();
        let mut acc = [0f64; 4];
        for (x, y) in q4.zip(b4) {
            for (l, a) in acc.iter_mut().enumerate() {
                *a += square(x[l], y[l]);
            }
        }
        (((acc[0] + acc[1]) + (acc[2] + acc[3])) + tail) as f32
    }
}

/// One task of the screened search: its per-query top-k (with its first query) and the
/// queries whose screen overflowed.
type ScreenedPart = ((usize, Vec<TopK>), Vec<usize>);

/// Folds each task's per-query top-k (`(first query, tops)`) into `merged`.
fn merge(merged: &mut [TopK], partial: Vec<(usize, Vec<TopK>)>) {
    for (q0, tops) in partial {
        for (target, top) in merged[q0..].iter_mut().zip(tops) {
            for (dist, i) in top.items {
                target.push(dist, i);
            }
        }
    }
}

fn dot_self(row: &[f32]) -> f32 {
    row.iter().map(|v| v * v).sum()
}

/// The k smallest (distance, index) pairs seen, ascending, ties by index.
struct TopK {
    k: usize,
    items: Vec<(f32, usize)>,
}

impl TopK {
    fn new(k: usize) -> Self {
        Self {
            k,
            items: Vec::with_capacity(k + 1),
        }
    }

    /// The largest distance kept, once `k` are kept.
    #[inline]
    fn worst(&self) -> Option<f32> {
        (self.items.len() == self.k).then(|| self.items[self.k - 1].0)
    }

    #[inline]
    fn push(&mut self, dist: f32, index: usize) {
        let worse = |a: &(f32, usize), b: &(f32, usize)| a.0 > b.0 || (a.0 == b.0 && a.1 > b.1);
        if self.items.len() == self.k {
            let last = self.items[self.k - 1];
            if !worse(&last, &(dist, index)) {
                return;
            }
            self.items.pop();
        }
        let pos = self
            .items
            .partition_point(|item| !worse(item, &(dist, index)));
        self.items.insert(pos, (dist, index));
    }
}

/// Per query: every bank row by exact f64 squared distance to it, nearest first (equal
/// distances by index): the reference the searches are tested against.
#[cfg(test)]
pub(crate) fn brute_force(bank: &[f32], queries: &[f32], d: usize) -> Vec<Vec<(f64, usize)>> {
    queries
        .chunks_exact(d)
        .map(|q| {
            let mut all: Vec<(f64, usize)> = bank
                .chunks_exact(d)
                .enumerate()
                .map(|(j, b)| {
                    let dist = q
                        .iter()
                        .zip(b)
                        .map(|(&x, &y)| (x as f64 - y as f64).powi(2))
                        .sum();
                    (dist, j)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    const DEFAULT_TILE_BYTES: usize = crate::knn::DEFAULT_TILE_BYTES;

    fn random_rows(rng: &mut StdRng, rows: usize, d: usize) -> Vec<f32> {
        (0..rows * d)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect()
    }

    /// The screened search alone, on every int16 kernel this CPU runs, on every shape, in pools of 1, 2 and 7 threads: k = N, N below one panel, few queries (the bank
    /// split across threads), a tight budget, crowded banks. Its neighbours are the exact
    /// ones; a tight budget makes crowded queries overflow, and only those.
    #[test]
    fn screened_search_is_exact() {
        for threads in [1, 2, 7] {
            rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap()
                .install(screened_search_is_exact_on_this_pool);
        }
    }

    fn screened_search_is_exact_on_this_pool() {
        let kernels = Int16Kernel::all();
        let mut rng = StdRng::seed_from_u64(11);
        let threads = rayon::current_num_threads();
        // (n, q, d, k, tile bytes, equal leading bank rows). The crowd of 1900 stays above
        // the 2k + 320 rows a screen may hold in each part of a bank split in two.
        let shapes = [
            (17, 9, 8, 17, DEFAULT_TILE_BYTES, 0),
            (5, 3, 4, 2, DEFAULT_TILE_BYTES, 0),
            (300, 1, 33, 3, DEFAULT_TILE_BYTES, 0),
            (300, 40, 64, 2, 4 * 16 * 6, 0),
            (2000, 30, 20, 2, DEFAULT_TILE_BYTES, 1900),
            (2000, 30, 20, 2, 4 * 16 * 6, 1900),
        ];
        for (n, q, d, k, tile_bytes, equal) in shapes {
            let mut bank = random_rows(&mut rng, n, d);
            let first = bank[..d].to_vec();
            for row in bank.chunks_exact_mut(d).take(equal) {
                row.copy_from_slice(&first);
            }
            let mut queries = random_rows(&mut rng, q, d);
            if equal > 0 {
                // Every query nearest to the equal rows.
                for row in queries.chunks_exact_mut(d) {
                    for (v, &c) in row.iter_mut().zip(&first) {
                        *v = c + 1e-3 * *v;
                    }
                }
            }
            let knn = ExactSearch::new(bank.clone(), (n, d), k, tile_bytes);
            for &kernel in &kernels {
                let screen = ScreenBank::new(&bank, d, kernel).unwrap();
                let (found, overflowed) = knn.search_screened(&screen, &queries, q);
                let what = format!(
                    "n {n} q {q} d {d} k {k} budget {tile_bytes} threads {threads} {}",
                    kernel.level()
                );
                if equal > 0 && tile_bytes < 1000 {
                    assert_eq!(overflowed.len(), q, "{what}: every query overflows");
                    continue;
                }
                assert!(overflowed.is_empty(), "{what}: {overflowed:?}");
                for (i, (got, all)) in found
                    .iter()
                    .zip(brute_force(&bank, &queries, d))
                    .enumerate()
                {
                    assert_eq!(got.len(), k, "{what}: query {i}");
                    for (rank, &(dist, index)) in got.iter().enumerate() {
                        let (want, want_index) = all[rank];
                        assert!(
                            (dist as f64 - want).abs() <= 1e-6 * want.max(1e-3),
                            "{what}: query {i} rank {rank}: {dist} vs {want}"
                        );
                        // Equal rows tie exactly and are ordered by index.
                        assert_eq!(index, want_index, "{what}: query {i} rank {rank}");
                    }
                }
            }
        }
    }

    #[test]
    fn top_k_keeps_the_smallest_in_order() {
        let mut top = TopK::new(3);
        for (i, d) in [5.0, 1.0, 4.0, 1.0, 3.0, 0.5].into_iter().enumerate() {
            top.push(d, i);
        }
        assert_eq!(top.items, vec![(0.5, 5), (1.0, 1), (1.0, 3)]);
    }
}
