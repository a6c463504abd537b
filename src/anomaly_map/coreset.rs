//! Greedy coreset selection (PatchCore's "approximate greedy coreset"): the patch bank kept to
//! a budget by farthest-point (k-center) selection, which keeps rare patches that a random
//! sample would drop.
//!
//! Written here because no maintained Rust crate offers it: it is twenty lines of
//! farthest-point iteration over host memory, parallel over rows with rayon.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rayon::prelude::*;

/// Features are projected to this many dimensions (a seeded Gaussian random projection) for
/// the selection when they have more, as PatchCore does: distances are preserved closely
/// enough to choose far-apart rows, at a fraction of the cost.
const PROJECTED_DIM: usize = 128;

/// Rows per rayon task in the distance update.
const ROWS_PER_TASK: usize = 4096;

/// The indices (ascending) of `budget` rows of `rows` (n × d, row-major) chosen greedily: start
/// from a seeded random row, then repeatedly take the row farthest from those chosen. All rows
/// when `budget ≥ n`. Costs n · budget · min(d, 128) multiply-adds.
///
/// ```ignore
/// let rows = [0.0, 0.0, 0.1, 0.0, 10.0, 0.0];
/// assert_eq!(greedy_coreset(&rows, 2, 2, 0).len(), 2);
/// ```
pub(crate) fn greedy_coreset(rows: &[f32], d: usize, budget: usize, seed: u64) -> Vec<usize> {
    let n = rows.len().checked_div(d).unwrap_or(0);
    if budget >= n {
        return (0..n).collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let projected = project(rows, n, d, &mut rng);
    let pd = projected.len() / n;
    let row = |i: usize| &projected[i * pd..(i + 1) * pd];
    let mut nearest = vec![f32::INFINITY; n];
    let mut chosen = Vec::with_capacity(budget);
    let mut next = rng.random_range(0..n);
    while chosen.len() < budget {
        chosen.push(next);
        let center = row(next).to_vec();
        // Update each row's distance to its nearest chosen row; find the farthest row.
        let (far, _) = nearest
            .par_chunks_mut(ROWS_PER_TASK)
            .enumerate()
            .map(|(chunk, dist)| {
                let mut best = (usize::MAX, f32::NEG_INFINITY);
                for (j, slot) in dist.iter_mut().enumerate() {
                    let i = chunk * ROWS_PER_TASK + j;
                    let d2: f32 = row(i)
                        .iter()
                        .zip(&center)
                        .map(|(a, b)| (a - b) * (a - b))
                        .sum();
                    if d2 < *slot {
                        *slot = d2;
                    }
                    if *slot > best.1 {
                        best = (i, *slot);
                    }
                }
                best
            })
            .reduce(
                || (usize::MAX, f32::NEG_INFINITY),
                |a, b| {
                    if b.1 > a.1 || (b.1 == a.1 && b.0 < a.0) {
                        b
                    } else {
                        a
                    }
                },
            );
        if far == usize::MAX {
            break;
        }
        next = far;
    }
    chosen.sort_unstable();
    chosen.dedup();
    chosen
}

/// `rows` projected to [`PROJECTED_DIM`] dimensions by a Gaussian random matrix scaled by
/// 1/√dim, or copied when d is not larger.
fn project(rows: &[f32], n: usize, d: usize, rng: &mut StdRng) -> Vec<f32> {
    if d <= PROJECTED_DIM {
        return rows.to_vec();
    }
    let scale = 1.0 / (PROJECTED_DIM as f32).sqrt();
    // Box–Muller normals.
    let matrix: Vec<f32> = (0..d * PROJECTED_DIM)
        .map(|_| {
            let u1: f32 = rng.random_range(f32::EPSILON..1.0);
            let u2: f32 = rng.random();
            (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos() * scale
        })
        .collect();
    let mut out = vec![0f32; n * PROJECTED_DIM];
    out.par_chunks_mut(PROJECTED_DIM)
        .enumerate()
        .for_each(|(i, dst)| {
            for (x, weights) in rows[i * d..(i + 1) * d]
                .iter()
                .zip(matrix.chunks_exact(PROJECTED_DIM))
            {
                for (o, w) in dst.iter_mut().zip(weights) {
                    *o += x * w;
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two tight clusters and one outlier: a budget of 3 takes one row of each cluster and the
    /// outlier, which a random sample of 3 would usually miss.
    #[test]
    fn the_coreset_keeps_the_outlier_and_covers_every_cluster() {
        let mut rows = Vec::new();
        for i in 0..50 {
            rows.extend([i as f32 * 1e-3, 0.0]);
            rows.extend([5.0 + i as f32 * 1e-3, 5.0]);
        }
        rows.extend([-20.0, 30.0]);
        let outlier = 100;
        for seed in 0..5 {
            let chosen = greedy_coreset(&rows, 2, 3, seed);
            assert_eq!(chosen.len(), 3);
            assert!(chosen.contains(&outlier), "seed {seed}: {chosen:?}");
            let in_first = chosen.iter().filter(|&&i| i < 100 && i % 2 == 0).count();
            let in_second = chosen.iter().filter(|&&i| i < 100 && i % 2 == 1).count();
            assert_eq!((in_first, in_second), (1, 1), "seed {seed}: {chosen:?}");
        }
    }

    #[test]
    fn a_budget_at_least_the_rows_keeps_them_all_and_projection_keeps_distances_roughly() {
        let rows: Vec<f32> = (0..40).map(|i| i as f32).collect();
        assert_eq!(greedy_coreset(&rows, 4, 10, 1), (0..10).collect::<Vec<_>>());
        assert_eq!(greedy_coreset(&rows, 4, 99, 1).len(), 10);
        assert!(greedy_coreset(&[], 4, 3, 1).is_empty());
        // 256 → 128 dimensions: distances within 30% (Johnson–Lindenstrauss at this size).
        let d = 256;
        let mut rng = StdRng::seed_from_u64(7);
        let rows: Vec<f32> = (0..4 * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let p = project(&rows, 4, d, &mut StdRng::seed_from_u64(3));
        let dist = |v: &[f32], w: usize, a: usize, b: usize| -> f32 {
            (0..w).map(|j| (v[a * w + j] - v[b * w + j]).powi(2)).sum()
        };
        for (a, b) in [(0, 1), (1, 2), (2, 3)] {
            let ratio = dist(&p, PROJECTED_DIM, a, b) / dist(&rows, d, a, b);
            assert!((0.7..1.3).contains(&ratio), "{ratio}");
        }
    }
}
