//! The anomaly score: squared L2 distances to the k nearest normal features.
//!
//! MSC scores a test image by the sum of squared L2 distances from φ(test) to its k = 2 nearest
//! φ(train) (faiss `IndexFlatL2` in the reference; see the paper's evaluation section). [`KnnScorer`] does this
//! exactly on any device, in chunks so that no intermediate exceeds a memory budget (wgpu limits
//! a storage buffer to 128 MiB); [`HostKnnScorer`] does the same for features in host memory.
//! [`KnnScorer::compressed`] replaces the bank by k-means centroids, the paper's speed-up.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use msad::knn::KnnScorer;
//!
//! # fn main() -> msad::Result<()> {
//! let device = Device::flex();
//! let bank = Tensor::<2>::from_floats([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]], &device);
//! let knn = KnnScorer::new(bank, 2)?;
//! let scores = knn.score(Tensor::<2>::from_floats([[0.0, 0.5]], &device))?;
//! assert_eq!(msad::host::vec_from_tensor(scores)?, vec![1.5]);
//! # Ok(())
//! # }
//! ```

mod host_scorer;
mod kmeans;

pub use host_scorer::HostKnnScorer;
pub use kmeans::KMeansConfig;

use burn::tensor::{Int, Tensor, TensorData};

use crate::cpu::knn::ExactSearch;
use crate::device::{Route, Work, route};
use crate::{Error, Result};

/// Default budget for the distance tiles in flight: 64 MiB, half of wgpu's default 128 MiB
/// storage-buffer limit.
pub const DEFAULT_TILE_BYTES: usize = 64 << 20;

/// Exact kNN over a bank of features on any device (see the [module docs](self)).
///
/// On CPU devices (flex, ndarray) the search runs on the host, as [`HostKnnScorer`] (its
/// integer screen on AVX2 CPUs). Elsewhere the bank is held in chunks of rows; each
/// (query chunk, bank chunk) tile computes ‖q‖² + ‖b‖² − 2 q·bᵀ with one matrix product, keeps
/// the k smallest per row (burn's `topk`, no full sort) and recomputes their distances exactly
/// as Σ (q − b)²; the per-chunk winners are then merged.
#[derive(Clone, Debug)]
pub struct KnnScorer {
    engine: Engine,
    n: usize,
    d: usize,
    k: usize,
    tile_bytes: usize,
}

/// How the search runs ([`crate::device::route`]): msad's CPU engine for CPU devices (flex,
/// ndarray), whose memory is the host's, and as tensor operations in chunks elsewhere.
#[derive(Clone, Debug)]
enum Engine {
    Cpu(ExactSearch),
    Tiles(Vec<BankChunk>),
}

#[derive(Clone, Debug)]
struct BankChunk {
    rows: Tensor<2>,
    /// 1 × rows: squared norms.
    sq: Tensor<2>,
    offset: usize,
}

impl KnnScorer {
    /// A scorer over `bank` (N × D) returning the `k` nearest rows, with the default tile budget.
    /// Errors: an empty bank, k = 0 or k > N, a non-finite value in the bank.
    pub fn new(bank: Tensor<2>, k: usize) -> Result<Self> {
        Self::with_tile_bytes(bank, k, DEFAULT_TILE_BYTES)
    }

    /// [`KnnScorer::new`] with a budget, in bytes, for any one intermediate tensor (a distance
    /// tile, a bank chunk or a query chunk).
    pub fn with_tile_bytes(bank: Tensor<2>, k: usize, tile_bytes: usize) -> Result<Self> {
        let bank = bank.without_autodiff();
        let [n, d] = bank.dims();
        check_bank(n, d, k)?;
        if route(&bank.device(), Work::Knn) == Route::Cpu {
            let values = crate::host::vec_from_tensor(bank)?;
            check_finite("bank", &values, d)?;
            let engine = ExactSearch::new(values, (n, d), k, tile_bytes);
            return Ok(Self {
                engine: Engine::Cpu(engine),
                n,
                d,
                k,
                tile_bytes,
            });
        }
        Self::with_tensor_ops(bank, k, tile_bytes)
    }

    /// The tensor-operation engine on any device: what [`KnnScorer::new`] uses on GPUs, here
    /// also on CPU devices (where `new` runs msad's faster CPU engine, as [`HostKnnScorer`]).
    pub fn with_tensor_ops(bank: Tensor<2>, k: usize, tile_bytes: usize) -> Result<Self> {
        let bank = bank.without_autodiff();
        let [n, d] = bank.dims();
        check_bank(n, d, k)?;
        check_finite_tensor("bank", &bank)?;
        let elems = (tile_bytes / 4).max(1);
        // Bank chunks: at most `elems` floats each, and small enough that a tile with a few
        // hundred queries fits the budget.
        let rows_per_chunk = (elems / d).min(elems / 64).clamp(1, n);
        let chunks = (0..n)
            .step_by(rows_per_chunk)
            .map(|offset| {
                let end = (offset + rows_per_chunk).min(n);
                let rows = bank.clone().slice([offset..end, 0..d]);
                let sq = rows.clone().square().sum_dim(1).transpose();
                BankChunk { rows, sq, offset }
            })
            .collect();
        Ok(Self {
            engine: Engine::Tiles(chunks),
            n,
            d,
            k,
            tile_bytes,
        })
    }

    /// Replaces the bank by `clusters` k-means centroids (k-means++ seeding with seed 0,
    /// 25 Lloyd iterations) and scores against those: faster by N / clusters, at some cost in
    /// accuracy (see the README's measured example).
    pub fn compressed(bank: Tensor<2>, clusters: usize, k: usize) -> Result<Self> {
        Self::compressed_with(bank, &KMeansConfig::new(clusters), k)
    }

    /// [`KnnScorer::compressed`] with explicit k-means settings.
    pub fn compressed_with(bank: Tensor<2>, config: &KMeansConfig, k: usize) -> Result<Self> {
        let bank = bank.without_autodiff();
        let device = bank.device();
        let [n, d] = bank.dims();
        check_bank(n, d, k.min(n).max(1))?;
        let values = crate::host::vec_from_tensor(bank)?;
        check_finite("bank", &values, d)?;
        let centroids = kmeans::kmeans(&values, n, d, config)?;
        let c = config.clusters;
        Self::new(
            Tensor::from_data(TensorData::new(centroids, [c, d]), &device),
            k,
        )
    }

    /// Neighbours per query.
    pub fn k(&self) -> usize {
        self.k
    }

    /// Bank rows N.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the bank is empty (never: [`KnnScorer::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    /// Feature dimension D.
    pub fn dim(&self) -> usize {
        self.d
    }

    /// Sum of squared distances to the k nearest bank rows, per query (Q).
    pub fn score(&self, queries: Tensor<2>) -> Result<Tensor<1>> {
        let (dist, _) = self.neighbours(queries)?;
        let q = dist.dims()[0];
        Ok(dist.sum_dim(1).reshape([q]))
    }

    /// The k nearest bank rows per query, nearest first: (Q × k squared distances, Q × k
    /// indices into the bank). Errors: a dimension mismatch, a non-finite query value.
    pub fn neighbours(&self, queries: Tensor<2>) -> Result<(Tensor<2>, Tensor<2, Int>)> {
        let queries = queries.without_autodiff();
        let [q, d] = queries.dims();
        if d != self.d {
            return Err(Error::InvalidShape {
                what: "queries".into(),
                expected: format!("[Q, {}] (the bank's feature dimension)", self.d),
                found: vec![q, d],
            });
        }
        let device = queries.device();
        let chunks = match &self.engine {
            Engine::Tiles(chunks) => chunks,
            Engine::Cpu(engine) => {
                let values = crate::host::vec_from_tensor(queries)?;
                check_finite("queries", &values, d)?;
                let found = engine.search(&values, q);
                let dist: Vec<f32> = found.iter().flatten().map(|(dd, _)| *dd).collect();
                let idx: Vec<i64> = found.iter().flatten().map(|(_, i)| *i as i64).collect();
                return Ok((
                    Tensor::from_data(TensorData::new(dist, [q, self.k]), &device),
                    Tensor::from_data(TensorData::new(idx, [q, self.k]), &device),
                ));
            }
        };
        check_finite_tensor("queries", &queries)?;
        if q == 0 {
            return Ok((
                Tensor::zeros([0, self.k], &device),
                Tensor::zeros([0, self.k], &device),
            ));
        }
        let elems = (self.tile_bytes / 4).max(1);
        let widest = chunks.iter().map(|c| c.rows.dims()[0]).max().unwrap_or(1);
        let rows_per_query_chunk = (elems / widest).min(elems / d).clamp(1, q);
        let mut dist = Vec::new();
        let mut idx = Vec::new();
        for start in (0..q).step_by(rows_per_query_chunk) {
            let end = (start + rows_per_query_chunk).min(q);
            let (dd, ii) = self.search_chunk(chunks, queries.clone().slice([start..end, 0..d]));
            dist.push(dd);
            idx.push(ii);
        }
        Ok((Tensor::cat(dist, 0), Tensor::cat(idx, 0)))
    }

    fn search_chunk(
        &self,
        chunks: &[BankChunk],
        queries: Tensor<2>,
    ) -> (Tensor<2>, Tensor<2, Int>) {
        let [m, d] = queries.dims();
        let q_sq = queries.clone().square().sum_dim(1); // m × 1
        let mut cand_dist = Vec::with_capacity(chunks.len());
        let mut cand_idx = Vec::with_capacity(chunks.len());
        for chunk in chunks {
            let rows = chunk.rows.dims()[0];
            let kk = self.k.min(rows);
            let dots = queries.clone().matmul(chunk.rows.clone().transpose());
            let approx = (q_sq.clone() + chunk.sq.clone() - dots * 2.0).clamp_min(0.0);
            let (_, local) = approx.neg().topk_with_indices(kk, 1); // m × kk
            // Exact distances of the winners: Σ (q − b)².
            let picked = chunk
                .rows
                .clone()
                .select(0, local.clone().reshape([m * kk]))
                .reshape([m, kk, d]);
            let diff = picked - queries.clone().unsqueeze_dim::<3>(1);
            let exact = diff.square().sum_dim(2).reshape([m, kk]);
            cand_dist.push(exact);
            cand_idx.push(local + chunk.offset as i64);
        }
        let (dist, idx) = if cand_dist.len() == 1 {
            (cand_dist.remove(0), cand_idx.remove(0))
        } else {
            (Tensor::cat(cand_dist, 1), Tensor::cat(cand_idx, 1))
        };
        // Merge (and order) the winners of every chunk.
        let (neg, pos) = dist.neg().topk_with_indices(self.k, 1);
        (neg.neg(), idx.gather(1, pos))
    }
}

fn check_finite_tensor(what: &str, x: &Tensor<2>) -> Result<()> {
    let bad = x.clone().is_finite().bool_not().any().into_scalar::<bool>();
    if !bad {
        return Ok(());
    }
    // Rare path: read back to name the first offending value.
    let d = x.dims()[1];
    let values = crate::host::vec_from_tensor(x.clone())?;
    check_finite(what, &values, d)?;
    Err(Error::invalid(what, "non-finite values"))
}

/// Checks a bank's shape and k: N, D ≥ 1 and 1 ≤ k ≤ N.
pub(crate) fn check_bank(n: usize, d: usize, k: usize) -> Result<()> {
    if n == 0 || d == 0 {
        return Err(Error::InvalidShape {
            what: "bank".into(),
            expected: "[N, D] with N ≥ 1 and D ≥ 1".into(),
            found: vec![n, d],
        });
    }
    if k == 0 || k > n {
        return Err(Error::invalid(
            "k",
            format!("{k}; must be between 1 and the bank size {n}"),
        ));
    }
    Ok(())
}

/// Checks that every value of `values` (rows of `d`) is finite, naming the first that is not.
pub(crate) fn check_finite(what: &str, values: &[f32], d: usize) -> Result<()> {
    match values.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(Error::invalid(
            what,
            format!(
                "non-finite value {} at row {}, column {}",
                values[i],
                i / d,
                i % d
            ),
        )),
    }
}
