//! [`HostKnnScorer`]: the exact kNN search of msad's CPU engine (`crate::cpu::knn`) for
//! features already in host memory, with its input checked.

use ndarray::{Array2, ArrayView2};

use super::{DEFAULT_TILE_BYTES, check_bank, check_finite};
use crate::cpu::knn::ExactSearch;
use crate::{Error, Result};

/// The k nearest bank rows of every query, by squared L2 distance, for features held in host
/// memory. Same semantics as [`KnnScorer`](super::KnnScorer), which runs on any device.
///
/// On x86-64 CPUs with AVX2, a search of at least 6 queries per rayon thread (12 on two) is
/// *screened*: every row is quantised to 16-bit integers with its own scale, the integer dot
/// products (exact, and about 1.4x as fast as f32 ones; one `vpdpwssd` per pair of
/// multiply-adds on CPUs with AVX-512 VNNI) bound each squared distance within a
/// proven margin, and only the bank rows whose lower bound is within a query's k-th smallest
/// upper bound are measured exactly, as Σ (q − b)² in f64. The k nearest are then exact (equal
/// distances ordered by index). The first such search quantises and packs the bank once (half
/// the bank's size, kept with the scorer); each task quantises a block of up to 192 queries,
/// and each tile of dot products (up to 192 × 128) is screened while still in cache.
///
/// Otherwise the search runs on f32 products: for fewer queries, on other CPUs, for D above
/// 2²⁴ or a bank with a row of squared norm above 10³⁰, and for a query of such a norm or
/// one whose candidates outgrow its share of the memory budget (rows nearly equidistant from
/// it: thousands on a few threads under the default budget, fewer on many). Distances are
/// estimated as ‖q‖² + ‖b‖² − 2 q·b in tiles (one sgemm per tile, as faiss's
/// `IndexFlatL2`), the k smallest estimates kept per query without sorting whole rows, and the
/// k winners' distances recomputed exactly in f64. There, rows whose distances differ by less
/// than the estimate's f32 rounding (which grows with D and ‖q‖² + ‖b‖²) may be chosen in
/// either order.
///
/// Memory beyond the bank, the quantised bank, the output and the quantised block of queries
/// of each task is bounded by the tile budget ([`HostKnnScorer::with_tile_bytes`]).
///
/// ```
/// use ndarray::array;
/// use msad::knn::HostKnnScorer;
///
/// # fn main() -> msad::Result<()> {
/// let bank = array![[0.0f32, 0.0], [1.0, 0.0], [0.0, 2.0]];
/// let knn = HostKnnScorer::new(bank.view(), 2)?;
/// let scores = knn.score(array![[0.0f32, 0.5]].view())?;
/// assert_eq!(scores, vec![0.25 + 1.25]); // (0,0) at 0.25, (1,0) at 1.25
/// # Ok(())
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct HostKnnScorer {
    search: ExactSearch,
}

impl HostKnnScorer {
    /// A scorer over `bank` (N × D) returning the `k` nearest rows. Errors: an empty bank,
    /// D = 0, k = 0 or k > N, a non-finite value (naming its row and column).
    pub fn new(bank: ArrayView2<'_, f32>, k: usize) -> Result<Self> {
        let (n, d) = bank.dim();
        check_bank(n, d, k)?;
        let bank: Vec<f32> = bank.iter().copied().collect();
        check_finite("bank", &bank, d)?;
        Ok(Self::from_checked(bank, n, d, k))
    }

    /// [`HostKnnScorer::new`] from a row-major slice of `n` rows.
    pub fn from_slice(bank: &[f32], n: usize, k: usize) -> Result<Self> {
        if n == 0 || !bank.len().is_multiple_of(n) {
            return Err(Error::InvalidShape {
                what: "bank".into(),
                expected: format!("{n} rows of equal length"),
                found: vec![bank.len()],
            });
        }
        let d = bank.len() / n;
        check_bank(n, d, k)?;
        check_finite("bank", bank, d)?;
        Ok(Self::from_checked(bank.to_vec(), n, d, k))
    }

    /// A scorer over a bank its caller has checked ([`check_bank`], [`check_finite`]).
    pub(crate) fn from_checked(bank: Vec<f32>, n: usize, d: usize, k: usize) -> Self {
        Self {
            search: ExactSearch::new(bank, (n, d), k, DEFAULT_TILE_BYTES),
        }
    }

    /// Caps the memory of the distance tiles in flight and (half each) of the screen's
    /// candidate lists, in bytes, all threads together. Default [`DEFAULT_TILE_BYTES`]. Below
    /// the cap, at least one bank row per query tile is always used (one 6 × 16 tile on the
    /// screen's micro-kernel), and a screen may always hold 2k + 320 candidates per query.
    pub fn with_tile_bytes(self, bytes: usize) -> Self {
        Self {
            search: self.search.with_tile_bytes(bytes),
        }
    }

    /// Neighbours per query.
    pub fn k(&self) -> usize {
        self.search.k()
    }

    /// Bank rows N.
    pub fn len(&self) -> usize {
        self.search.shape().0
    }

    /// Whether the bank is empty (never: [`HostKnnScorer::new`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Feature dimension D.
    pub fn dim(&self) -> usize {
        self.search.shape().1
    }

    /// The bank, row-major N × D.
    pub fn bank(&self) -> &[f32] {
        self.search.bank()
    }

    /// Sum of the squared distances to the k nearest bank rows, per query row.
    pub fn score(&self, queries: ArrayView2<'_, f32>) -> Result<Vec<f32>> {
        let (dist, _) = self.neighbours(queries)?;
        Ok(dist.rows().into_iter().map(|r| r.sum()).collect())
    }

    /// The k nearest bank rows per query, nearest first: (Q × k squared distances,
    /// Q × k bank indices). Equal distances are ordered by index.
    pub fn neighbours(&self, queries: ArrayView2<'_, f32>) -> Result<(Array2<f32>, Array2<usize>)> {
        let (q, d) = queries.dim();
        let k = self.k();
        if d != self.dim() {
            return Err(Error::InvalidShape {
                what: "queries".into(),
                expected: format!("[Q, {}] (the bank's feature dimension)", self.dim()),
                found: vec![q, d],
            });
        }
        let owned;
        let queries: &[f32] = match queries.as_slice() {
            Some(contiguous) => contiguous,
            None => {
                owned = queries.iter().copied().collect::<Vec<f32>>();
                &owned
            }
        };
        check_finite("queries", queries, d)?;
        let found = self.search.search(queries, q);
        let mut dist = Array2::zeros((q, k));
        let mut idx = Array2::zeros((q, k));
        for (row, list) in found.into_iter().enumerate() {
            for (j, (dd, ii)) in list.into_iter().enumerate() {
                dist[[row, j]] = dd;
                idx[[row, j]] = ii;
            }
        }
        Ok((dist, idx))
    }

    /// Per query: the k nearest (exact distance, index), nearest first (input checked by
    /// the caller).
    pub(crate) fn search(&self, queries: &[f32], q: usize) -> Vec<Vec<(f32, usize)>> {
        self.search.search(queries, q)
    }
}
