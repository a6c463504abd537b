//! The crate's own matrix product: a 6 × 16 register-blocked micro-kernel (AVX2 and FMA on
//! x86-64, detected at run time) on packed panels, run on the calling thread.
//!
//! - The kNN scorer packs its bank once (a general sgemm packs it again for every product),
//!   and each tile of dot products is small enough for the top-k pass to read while it is
//!   still in cache (a general sgemm writes the whole distance tile to memory first).
//! - The loss kernel gives each thread a slice of the feature columns and runs its gradient
//!   product there ([`Kernel::tile`] on panels of the slice read in place), with no thread
//!   pool inside the product to wake and join.
//!
//! The left operand A (m × k) is packed into ⌈m / 6⌉ panels of 6 rows ([`pack_a`]), the right
//! operand into ⌈n / 16⌉ panels of 16 output columns ([`PackedB`]), each stored k-major.

use rayon::prelude::*;

/// Rows of A per micro-tile.
pub(crate) const MR: usize = 6;
/// Output columns per micro-tile (two AVX registers of 8 lanes).
pub(crate) const NR: usize = 16;
/// Inner-dimension columns per pass over a micro-tile: one 16 × 256 panel of B (16 KiB) stays
/// in the L1 cache while the panels of A stream past it.
const KC: usize = 256;

/// Which micro-kernel computes the products.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kernel {
    /// AVX2 + FMA intrinsics (x86-64 CPUs that have both).
    Avx2Fma,
    /// Plain Rust, to test the fast kernel against.
    #[cfg_attr(not(test), allow(dead_code))]
    Portable,
}

impl Kernel {
    /// The fastest kernel this CPU runs, or `None` when only the portable one is available
    /// (the general sgemm path is faster than the portable kernel there).
    pub(crate) fn detect() -> Option<Self> {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return Some(Self::Avx2Fma);
        }
        None
    }
}

/// The right operand of C = A · B (k × n) as ⌈n / 16⌉ panels of 16 columns, each stored
/// k-major (k × 16), the last panel padded with zero columns.
#[derive(Clone, Debug)]
pub(crate) struct PackedB {
    panels: Vec<f32>,
    n: usize,
    k: usize,
    kernel: Kernel,
}

impl PackedB {
    /// B = xᵀ for `x` (n × k, row-major): the products become A · xᵀ (the kNN's dot products
    /// of queries with bank rows). [`Kernel::Avx2Fma`] must only be passed where
    /// [`Kernel::detect`] returned it.
    pub(crate) fn from_rows(x: &[f32], n: usize, k: usize, kernel: Kernel) -> Self {
        let mut panels = vec![0.0; n.div_ceil(NR) * k * NR];
        let pack = |(p, panel): (usize, &mut [f32])| pack_panel(x, n, k, p * NR, panel);
        if k > 0 && n * k >= 1 << 20 {
            // Large banks: one panel per task.
            panels
                .par_chunks_exact_mut(k * NR)
                .enumerate()
                .for_each(pack);
        } else if k > 0 {
            panels.chunks_exact_mut(k * NR).enumerate().for_each(pack);
        }
        Self {
            panels,
            n,
            k,
            kernel,
        }
    }

    /// Number of 16-column panels.
    pub(crate) fn panel_count(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// `c[r * ldc + j]` = (A · B)[r, 16·`p0` + j] for the rows of A packed in `a` ([`pack_a`],
    /// `a_panels` panels of 6) and the panels `p0..p0 + count` of B. Padding rows and columns
    /// get products with zeros.
    ///
    /// # Panics
    /// When `a` or `c` is too short for the shape (a bug in the caller, never user input).
    pub(crate) fn product(
        &self,
        a: &[f32],
        a_panels: usize,
        (p0, count): (usize, usize),
        c: &mut [f32],
        ldc: usize,
    ) {
        let k = self.k;
        assert!(
            p0 + count <= self.panel_count(),
            "packed product: panels of B"
        );
        assert!(a.len() >= a_panels * k * MR, "packed product: A too short");
        assert!(
            ldc >= count * NR && c.len() >= (a_panels * MR).saturating_sub(1) * ldc + count * NR,
            "packed product: output too short"
        );
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            for jp in 0..count {
                let b = &self.panels[((p0 + jp) * k + k0) * NR..][..kc * NR];
                for ip in 0..a_panels {
                    let a = &a[(ip * k + k0) * MR..][..kc * MR];
                    let out = &mut c[ip * MR * ldc + jp * NR..];
                    // Checked once above rather than per tile, as `Kernel::tile` does: this
                    // loop runs millions of tiles in a kNN search.
                    match self.kernel {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: `Avx2Fma` is only chosen where the CPU has AVX2 and FMA
                        // (`Kernel::detect`); the slices hold kc × 6, kc × 16 and 6 rows of
                        // `ldc` ≥ 16 floats (asserted above).
                        Kernel::Avx2Fma => unsafe {
                            avx2::kernel(kc, a, (b, NR), (out, ldc), k0 > 0)
                        },
                        _ => portable_kernel(kc, a, (b, NR), (out, ldc), k0 > 0),
                    }
                }
            }
        }
    }
}

impl Kernel {
    /// The 6 × 16 micro-tile `c` (+)= a · b over `kc` inner columns: `a` is one packed panel of
    /// A ([`pack_a`]; kc × 6), `b` = (data, ldb) holds kc rows of 16 columns `ldb` apart (one
    /// panel of [`PackedB`] with ldb = 16, or a row-major matrix), `c` = (data, ldc) six rows
    /// of 16 `ldc` apart. Adds to `c` when `accumulate`, else overwrites it.
    ///
    /// # Panics
    /// When a slice is too short for the shape (a bug in the caller, never user input).
    #[inline]
    pub(crate) fn tile(
        self,
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        (c, ldc): (&mut [f32], usize),
        accumulate: bool,
    ) {
        assert!(a.len() >= kc * MR, "micro-tile: A too short");
        assert!(
            ldb >= NR && (kc == 0 || b.len() >= (kc - 1) * ldb + NR),
            "micro-tile: B too short"
        );
        assert!(
            ldc >= NR && c.len() >= (MR - 1) * ldc + NR,
            "micro-tile: output too short"
        );
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Avx2Fma` is only chosen where the CPU has AVX2 and FMA
            // (`Kernel::detect`); the slices hold what the kernel reads and writes (asserted
            // above).
            Kernel::Avx2Fma => unsafe { avx2::kernel(kc, a, (b, ldb), (c, ldc), accumulate) },
            _ => portable_kernel(kc, a, (b, ldb), (c, ldc), accumulate),
        }
    }
}

/// `rows` (r × k, row-major) as the ⌈r / 6⌉ panels of a left operand, packed on the calling
/// thread.
pub(crate) fn pack_a(rows: &[f32], r: usize, k: usize) -> Vec<f32> {
    let mut out = vec![0.0; r.div_ceil(MR) * k * MR];
    if k > 0 {
        for (p, panel) in out.chunks_exact_mut(k * MR).enumerate() {
            pack_panel(rows, r, k, p * MR, panel);
        }
    }
    out
}

/// Rows `first..first + w` of `rows` (r × k, row-major; rows past r stay zero) into `panel`
/// (k × w, w = panel.len() / k): `panel[kk·w + lane] = rows[first + lane][kk]`. The inner
/// dimension goes in blocks of 8, so that each row is read 32 bytes at a time and each block
/// of the panel written whole.
fn pack_panel(rows: &[f32], r: usize, k: usize, first: usize, panel: &mut [f32]) {
    let w = panel.len() / k;
    let lanes = w.min(r - first);
    let rows = &rows[first * k..(first + lanes) * k];
    const BLOCK: usize = 8;
    for (b, block) in panel.chunks_mut(BLOCK * w).enumerate() {
        let k0 = b * BLOCK;
        let depth = block.len() / w;
        for (lane, row) in rows.chunks_exact(k).enumerate() {
            for (t, &v) in row[k0..k0 + depth].iter().enumerate() {
                block[t * w + lane] = v;
            }
        }
    }
}

/// The 6 × 16 micro-tile c (+)= a · b over `kc` columns, in plain Rust (b: kc rows of 16
/// floats `ldb` apart).
fn portable_kernel(
    kc: usize,
    a: &[f32],
    (b, ldb): (&[f32], usize),
    (c, ldc): (&mut [f32], usize),
    accumulate: bool,
) {
    let mut acc = [[0f32; NR]; MR];
    for (kk, ak) in a.chunks_exact(MR).take(kc).enumerate() {
        let bk = &b[kk * ldb..][..NR];
        for (row, &x) in acc.iter_mut().zip(ak) {
            for (v, &y) in row.iter_mut().zip(bk) {
                *v += x * y;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = &mut c[r * ldc..][..NR];
        for (o, v) in out.iter_mut().zip(row) {
            *o = if accumulate { *o + v } else { *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::{MR, NR};

    /// The 6 × 16 micro-tile c (+)= a · b over `kc` columns: twelve 8-lane accumulators, per
    /// column two loads of b, six broadcasts of a and twelve FMAs.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` must hold kc × 6 floats, `b` kc rows of 16 floats
    /// `ldb` apart, and `c` six rows of 16 floats `ldc` apart.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: &[f32],
        (b, ldb): (&[f32], usize),
        (c, ldc): (&mut [f32], usize),
        accumulate: bool,
    ) {
        debug_assert!(a.len() >= kc * MR && (kc == 0 || b.len() >= (kc - 1) * ldb + NR));
        debug_assert!(ldc >= NR && c.len() >= (MR - 1) * ldc + NR);
        let (mut pa, mut pb) = (a.as_ptr(), b.as_ptr());
        let mut acc: [[__m256; 2]; MR] = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY (whole body): the reads stay within kc × 6 floats of `a` and kc rows of 16
        // floats `ldb` apart in `b`, the writes within six rows of 16 floats `ldc` apart in `c`
        // (the caller's contract).
        unsafe {
            for _ in 0..kc {
                let b0 = _mm256_loadu_ps(pb);
                let b1 = _mm256_loadu_ps(pb.add(8));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*pa.add(r));
                    row[0] = _mm256_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm256_fmadd_ps(x, b1, row[1]);
                }
                pa = pa.add(MR);
                pb = pb.wrapping_add(ldb);
            }
            let pc = c.as_mut_ptr();
            for (r, row) in acc.iter().enumerate() {
                let (lo, hi) = (pc.add(r * ldc), pc.add(r * ldc + 8));
                if accumulate {
                    _mm256_storeu_ps(lo, _mm256_add_ps(_mm256_loadu_ps(lo), row[0]));
                    _mm256_storeu_ps(hi, _mm256_add_ps(_mm256_loadu_ps(hi), row[1]));
                } else {
                    _mm256_storeu_ps(lo, row[0]);
                    _mm256_storeu_ps(hi, row[1]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1 << 24) as f32 - 0.5)
            .collect()
    }

    /// Every kernel this CPU has equals the naive product, on shapes with partial panels on
    /// both sides and a partial last block of the inner dimension.
    #[test]
    fn products_equal_the_naive_product() {
        let kernels = [Some(Kernel::Portable), Kernel::detect()];
        for (m, n, k) in [
            (1, 1, 1),
            (13, 37, 300),
            (6, 16, 256),
            (20, 50, 520),
            (7, 700, 1500),
        ] {
            // A (m × k) and the rows of Bᵀ (n × k).
            let (a, bt) = (filled(m * k, 1), filled(n * k, 2));
            for kernel in kernels.into_iter().flatten() {
                let packed_a = pack_a(&a, m, k);
                let a_panels = m.div_ceil(MR);
                let packed = PackedB::from_rows(&bt, n, k, kernel);
                let panels = packed.panel_count();
                let ldc = panels * NR + 3;
                let mut c = vec![f32::NAN; a_panels * MR * ldc];
                packed.product(&packed_a, a_panels, (0, panels), &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let want: f64 = (0..k)
                            .map(|t| a[i * k + t] as f64 * bt[j * k + t] as f64)
                            .sum();
                        let got = c[i * ldc + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
                            "{kernel:?} {m}x{n}x{k} [{i}, {j}]: {got} vs {want}"
                        );
                    }
                }
                // A second call over the last panels only writes those columns.
                if panels > 1 {
                    let mut tail = vec![f32::NAN; a_panels * MR * NR];
                    packed.product(&packed_a, a_panels, (panels - 1, 1), &mut tail, NR);
                    for i in 0..m {
                        for j in 0..NR.min(n - (panels - 1) * NR) {
                            assert_eq!(tail[i * NR + j], c[i * ldc + (panels - 1) * NR + j]);
                        }
                    }
                }
            }
        }
    }
}
