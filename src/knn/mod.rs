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

use crate::cpu::knn::{ExactSearch, is_huge};
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
///
/// Rows of a squared norm above 2¹²⁴ (features around 10¹⁸ and beyond, where the estimate
/// could overflow f32 and rank rows wrongly), bank rows or queries, never go through the
/// estimate: their distances are measured as Σ (q − b)² directly, on both engines. A distance
/// beyond f32's range is `inf`. Non-finite input (NaN, ±inf) is refused with an error naming
/// its row and column, never scored.
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
    Tiles(Tiles),
}

/// The bank for the tensor-operation engine.
#[derive(Clone, Debug)]
struct Tiles {
    /// The rows whose distances are estimated (all but the huge ones), in chunks.
    chunks: Vec<BankChunk>,
    /// The huge rows (`crate::cpu::knn::HUGE_SQUARED_NORM`), whose distances are always measured exactly;
    /// usually none.
    huge: Option<Box<Rows>>,
}

#[derive(Clone, Debug)]
struct BankChunk {
    rows: Rows,
    /// 1 × rows: squared norms.
    sq: Tensor<2>,
}

/// Bank rows with their indices in the bank.
#[derive(Clone, Debug)]
struct Rows {
    values: Tensor<2>,
    ids: RowIds,
}

#[derive(Clone, Debug)]
enum RowIds {
    /// Consecutive bank rows from this one.
    From(usize),
    /// The bank index of each row.
    Listed(Box<Tensor<1, Int>>),
}

impl Rows {
    /// Bank indices of `local` (m × kk positions in these rows).
    fn bank_ids(&self, local: Tensor<2, Int>) -> Tensor<2, Int> {
        match &self.ids {
            RowIds::From(offset) => local + *offset as i64,
            RowIds::Listed(ids) => {
                let [m, kk] = local.dims();
                ids.clone()
                    .select(0, local.reshape([m * kk]))
                    .reshape([m, kk])
            }
        }
    }
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
        // The huge rows (N squared norms read back): usually none.
        let sq = crate::host::vec_from_tensor(bank.clone().square().sum_dim(1))?;
        let (huge, estimated): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| is_huge(sq[i]));
        let device = bank.device();
        let listed = |ids: &[usize]| {
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let len = ids.len();
            Tensor::<1, Int>::from_data(TensorData::new(ids, [len]), &device)
        };
        let (estimated_rows, estimated_ids) = if huge.is_empty() {
            (bank.clone(), None)
        } else {
            let ids = listed(&estimated);
            (bank.clone().select(0, ids.clone()), Some(ids))
        };
        // Bank chunks: at most `elems` floats each, and small enough that a tile with a few
        // hundred queries fits the budget.
        let count = estimated.len();
        let rows_per_chunk = (elems / d).min(elems / 64).clamp(1, n);
        let chunks = (0..count)
            .step_by(rows_per_chunk)
            .map(|offset| {
                let end = (offset + rows_per_chunk).min(count);
                let values = estimated_rows.clone().slice([offset..end, 0..d]);
                let sq = values.clone().square().sum_dim(1).transpose();
                let ids = match &estimated_ids {
                    None => RowIds::From(offset),
                    Some(ids) => RowIds::Listed(Box::new(ids.clone().slice(offset..end))),
                };
                BankChunk {
                    rows: Rows { values, ids },
                    sq,
                }
            })
            .collect();
        let huge = (!huge.is_empty()).then(|| {
            let ids = listed(&huge);
            Box::new(Rows {
                values: bank.select(0, ids.clone()),
                ids: RowIds::Listed(Box::new(ids)),
            })
        });
        Ok(Self {
            engine: Engine::Tiles(Tiles { chunks, huge }),
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

    /// Sum of squared distances to the k nearest bank rows, per query (Q). Errors: a
    /// dimension mismatch, a non-finite query value (NaN or ±inf: an error naming its row and
    /// column, not a score).
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
        let tiles = match &self.engine {
            Engine::Tiles(tiles) => tiles,
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
        if q == 0 {
            check_finite_tensor("queries", &queries)?;
            return Ok((
                Tensor::zeros([0, self.k], &device),
                Tensor::zeros([0, self.k], &device),
            ));
        }
        // One read-back of the Q squared norms: all at most the huge limit means all finite
        // and none huge (a NaN or ±inf value makes its row's NaN or inf).
        let q_sq = queries.clone().square().sum_dim(1); // Q × 1
        let huge: Vec<usize> = crate::host::vec_from_tensor(q_sq.clone())?
            .iter()
            .enumerate()
            .filter_map(|(i, &s)| is_huge(s).then_some(i))
            .collect();
        if huge.is_empty() {
            return Ok(self.search_queries(tiles, queries, q_sq, false));
        }
        check_finite_tensor("queries", &queries)?;
        // Rare: queries too large for the estimate, measured exactly against every row.
        let normal: Vec<usize> = (0..q).filter(|i| huge.binary_search(i).is_err()).collect();
        let listed = |ids: &[usize]| {
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            let len = ids.len();
            Tensor::<1, Int>::from_data(TensorData::new(ids, [len]), &device)
        };
        let pick = |ids: &[usize]| {
            let ids = listed(ids);
            (
                queries.clone().select(0, ids.clone()),
                q_sq.clone().select(0, ids),
            )
        };
        let (mut dist, mut idx) = (Vec::new(), Vec::new());
        for (ids, exhaustive) in [(&normal, false), (&huge, true)] {
            if !ids.is_empty() {
                let (rows, sq) = pick(ids);
                let (dd, ii) = self.search_queries(tiles, rows, sq, exhaustive);
                dist.push(dd);
                idx.push(ii);
            }
        }
        // Back into the queries' order.
        let order: Vec<usize> = normal.iter().chain(&huge).copied().collect();
        let mut inverse = vec![0; q];
        for (at, &i) in order.iter().enumerate() {
            inverse[i] = at;
        }
        let inverse = listed(&inverse);
        Ok((
            Tensor::cat(dist, 0).select(0, inverse.clone()),
            Tensor::cat(idx, 0).select(0, inverse),
        ))
    }

    /// The k nearest of `queries` (finite, with their squared norms `q_sq`, Q × 1) in chunks
    /// of queries within the tile budget; with `exhaustive` (huge queries) every distance is
    /// measured exactly.
    fn search_queries(
        &self,
        tiles: &Tiles,
        queries: Tensor<2>,
        q_sq: Tensor<2>,
        exhaustive: bool,
    ) -> (Tensor<2>, Tensor<2, Int>) {
        let [q, d] = queries.dims();
        let elems = (self.tile_bytes / 4).max(1);
        let widest = tiles
            .chunks
            .iter()
            .map(|c| c.rows.values.dims()[0])
            .max()
            .unwrap_or(1);
        let rows_per_query_chunk = (elems / widest).min(elems / d).clamp(1, q);
        let mut dist = Vec::new();
        let mut idx = Vec::new();
        for start in (0..q).step_by(rows_per_query_chunk) {
            let end = (start + rows_per_query_chunk).min(q);
            let (dd, ii) = self.search_chunk(
                tiles,
                queries.clone().slice([start..end, 0..d]),
                q_sq.clone().slice([start..end, 0..1]),
                exhaustive,
            );
            dist.push(dd);
            idx.push(ii);
        }
        if dist.len() == 1 {
            (dist.remove(0), idx.remove(0))
        } else {
            (Tensor::cat(dist, 0), Tensor::cat(idx, 0))
        }
    }

    fn search_chunk(
        &self,
        tiles: &Tiles,
        queries: Tensor<2>,
        q_sq: Tensor<2>,
        exhaustive: bool,
    ) -> (Tensor<2>, Tensor<2, Int>) {
        let [m, d] = queries.dims();
        let mut cand_dist = Vec::with_capacity(tiles.chunks.len() + 1);
        let mut cand_idx = Vec::with_capacity(tiles.chunks.len() + 1);
        for chunk in &tiles.chunks {
            if exhaustive {
                let (dd, ii) = self.measure_all(&chunk.rows, &queries);
                cand_dist.push(dd);
                cand_idx.push(ii);
                continue;
            }
            let rows = chunk.rows.values.dims()[0];
            let kk = self.k.min(rows);
            let dots = queries
                .clone()
                .matmul(chunk.rows.values.clone().transpose());
            let approx = (q_sq.clone() + chunk.sq.clone() - dots * 2.0).clamp_min(0.0);
            let (_, local) = approx.neg().topk_with_indices(kk, 1); // m × kk
            // Exact distances of the winners: Σ (q − b)².
            let picked = chunk
                .rows
                .values
                .clone()
                .select(0, local.clone().reshape([m * kk]))
                .reshape([m, kk, d]);
            let diff = picked - queries.clone().unsqueeze_dim::<3>(1);
            let exact = diff.square().sum_dim(2).reshape([m, kk]);
            cand_dist.push(exact);
            cand_idx.push(chunk.rows.bank_ids(local));
        }
        if let Some(huge) = &tiles.huge {
            let (dd, ii) = self.measure_all(huge, &queries);
            cand_dist.push(dd);
            cand_idx.push(ii);
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

    /// The k (or fewer, as many as there are rows) nearest of `rows` to each query, every
    /// distance measured as Σ (q − b)², in slices of rows that keep the m × rows × D
    /// differences within the tile budget: (m × kk distances, m × kk bank indices).
    fn measure_all(&self, rows: &Rows, queries: &Tensor<2>) -> (Tensor<2>, Tensor<2, Int>) {
        let [m, d] = queries.dims();
        let n = rows.values.dims()[0];
        let elems = (self.tile_bytes / 4).max(1);
        let step = (elems / (m * d).max(1)).clamp(1, n);
        let mut best: Option<(Tensor<2>, Tensor<2, Int>)> = None;
        for start in (0..n).step_by(step) {
            let end = (start + step).min(n);
            let slice = rows.values.clone().slice([start..end, 0..d]);
            let diff = slice.unsqueeze_dim::<3>(0) - queries.clone().unsqueeze_dim::<3>(1);
            let exact = diff.square().sum_dim(2).reshape([m, end - start]);
            let kk = self.k.min(end - start);
            let (neg, local) = exact.neg().topk_with_indices(kk, 1);
            let ids = rows.bank_ids(local + start as i64);
            let found = (neg.neg(), ids);
            best = Some(match best {
                None => found,
                Some((dist, idx)) => {
                    let dist = Tensor::cat(vec![dist, found.0], 1);
                    let idx = Tensor::cat(vec![idx, found.1], 1);
                    let kk = self.k.min(dist.dims()[1]);
                    let (neg, pos) = dist.neg().topk_with_indices(kk, 1);
                    (neg.neg(), idx.gather(1, pos))
                }
            });
        }
        best.expect("at least one row")
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
