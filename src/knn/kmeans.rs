//! k-means (k-means++ seeding, Lloyd iterations) for bank compression.

use burn::config::Config;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use super::host_scorer::HostKnnScorer;
use crate::{Error, Result};

/// Settings of the k-means that compresses a kNN bank.
#[derive(Config, Debug, PartialEq)]
pub struct KMeansConfig {
    /// Number of centroids.
    pub clusters: usize,
    /// Lloyd iterations at most. Default: 25.
    #[config(default = 25)]
    pub iterations: usize,
    /// Seed of the k-means++ initialisation. Default: 0.
    #[config(default = 0)]
    pub seed: u64,
}

/// Centroids (clusters × d, row-major) of `data` (n × d, row-major).
pub(crate) fn kmeans(data: &[f32], n: usize, d: usize, config: &KMeansConfig) -> Result<Vec<f32>> {
    let c = config.clusters;
    if c == 0 || c > n {
        return Err(Error::invalid(
            "clusters",
            format!("{c}; must be between 1 and the bank size {n}"),
        ));
    }
    let row = |i: usize| &data[i * d..(i + 1) * d];
    let sq = |a: &[f32], b: &[f32]| -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
            .sum()
    };
    let mut rng = StdRng::seed_from_u64(config.seed);

    // k-means++: the first centroid uniformly, each next one with probability ∝ D(x)².
    let mut centroids: Vec<f32> = Vec::with_capacity(c * d);
    centroids.extend_from_slice(row(rng.random_range(0..n)));
    let mut nearest: Vec<f64> = (0..n).map(|i| sq(row(i), &centroids[..d])).collect();
    for _ in 1..c {
        let total: f64 = nearest.iter().sum();
        let pick = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            nearest
                .iter()
                .position(|w| {
                    target -= w;
                    target < 0.0
                })
                .unwrap_or(n - 1)
        } else {
            // Every point already sits on a centroid (duplicates): any row will do.
            rng.random_range(0..n)
        };
        let start = centroids.len();
        centroids.extend_from_slice(row(pick));
        for (i, w) in nearest.iter_mut().enumerate() {
            *w = w.min(sq(row(i), &centroids[start..start + d]));
        }
    }

    // Lloyd: assign with the exact kNN engine (k = 1), move centroids to their means.
    let mut assignment = vec![usize::MAX; n];
    for _ in 0..config.iterations {
        let index = HostKnnScorer::from_checked(centroids.clone(), c, d, 1);
        let found = index.search(data, n);
        let mut changed = false;
        for (a, list) in assignment.iter_mut().zip(&found) {
            let best = list[0].1;
            changed |= *a != best;
            *a = best;
        }
        if !changed {
            break;
        }
        let mut sums = vec![0.0f64; c * d];
        let mut counts = vec![0usize; c];
        for (i, &a) in assignment.iter().enumerate() {
            counts[a] += 1;
            for (s, v) in sums[a * d..(a + 1) * d].iter_mut().zip(row(i)) {
                *s += *v as f64;
            }
        }
        for j in 0..c {
            // An emptied cluster keeps its centroid.
            if counts[j] > 0 {
                for (dst, s) in centroids[j * d..(j + 1) * d]
                    .iter_mut()
                    .zip(&sums[j * d..(j + 1) * d])
                {
                    *dst = (*s / counts[j] as f64) as f32;
                }
            }
        }
    }
    Ok(centroids)
}
