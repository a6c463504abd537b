//! The crate's own f32 micro-kernel: a 6 × 16 register-blocked tile (AVX2 and FMA on x86-64,
//! chosen by an instruction-set token), run on the calling thread.
//!
//! The loss kernel gives each thread a slice of the feature columns and runs its gradient
//! product there ([`TileKernel::tile`] on panels of the slice read in place), with no thread
//! pool inside the product to wake and join. The left operand A (m × k) is packed into
//! ⌈m / 6⌉ panels of 6 rows ([`pack_a`]), stored k-major. The kNN screen's integer kernel
//! ([`super::int16`]) uses the same tile shape and packing, and the conv products
//! ([`super::prepacked`]) this kernel where the CPU has AVX2 but not AVX-512.

use crate::cpu::isa::{Avx2Fma, Kernel};

/// Rows of A per micro-tile.
pub(crate) const MR: usize = 6;
/// Output columns per micro-tile (two AVX registers of 8 lanes).
pub(crate) const NR: usize = 16;
/// Which f32 micro-kernel computes the products (also the Gram tiles, [`super::gram`]):
/// AVX2 + FMA intrinsics, or plain Rust.
pub(crate) type TileKernel = Kernel<Avx2Fma>;

impl TileKernel {
    /// The 6 × 16 micro-tile `c` (+)= a · b over `kc` inner columns: `a` is one packed panel of
    /// A ([`pack_a`]; kc × 6), `b` = (data, ldb) holds kc rows of 16 columns `ldb` apart (a
    /// row-major matrix with ldb ≥ 16, such as the loss kernel's slice of columns), `c` = (data, ldc) six rows
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
            // SAFETY: the token proves the CPU has AVX2 and FMA; the slices hold what the
            // kernel reads and writes (asserted above).
            Self::Fast(_) => unsafe {
                avx2::kernel(
                    kc,
                    a.as_ptr(),
                    (b.as_ptr(), ldb),
                    (c.as_mut_ptr(), ldc),
                    accumulate,
                )
            },
            _ => portable_kernel(kc, a, (b, ldb), (c, ldc), accumulate),
        }
    }
}

/// `rows` (r × k, row-major) as the ⌈r / 6⌉ panels of a left operand, packed on the calling
/// thread (f32 values here, the kNN screen's pair words in [`super::int16`]).
pub(crate) fn pack_a<T: Copy + Default>(rows: &[T], r: usize, k: usize) -> Vec<T> {
    let mut out = vec![T::default(); r.div_ceil(MR) * k * MR];
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
pub(crate) fn pack_panel<T: Copy>(rows: &[T], r: usize, k: usize, first: usize, panel: &mut [T]) {
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
pub(crate) mod avx2 {
    use std::arch::x86_64::{
        __m256, _mm256_add_ps, _mm256_broadcast_ss, _mm256_fmadd_ps, _mm256_loadu_ps,
        _mm256_setzero_ps, _mm256_storeu_ps,
    };

    use super::MR;

    /// The 6 × 16 micro-tile c (+)= a · b over `kc` columns: twelve 8-lane accumulators, per
    /// column two loads of b, six broadcasts of a and twelve FMAs.
    ///
    /// Raw pointers, so that callers whose threads share one output matrix (each writing its
    /// own tiles) can pass their tile without a `&mut` slice over other threads' elements.
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA; `a` must point to kc × 6 floats, `b` to kc rows of 16
    /// floats `ldb` apart, and `c` to six rows of 16 floats `ldc` apart that no other thread
    /// touches during the call.
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn kernel(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        accumulate: bool,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [[__m256; 2]; MR] = [[_mm256_setzero_ps(); 2]; MR];
        // SAFETY: (the whole body) the reads stay within kc × 6 floats from `a` and kc rows of
        // 16 floats `ldb` apart from `b`, the writes within six rows of 16 floats `ldc` apart
        // from `c` (the caller's contract).
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
            let pc = c;
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
pub(super) mod tests {
    use super::*;
    use crate::cpu::isa::report_tested;

    /// `len` values in [−0.5, 0.5), a hash of their index and `seed` (the f32 kernels' tests).
    pub(crate) fn filled(len: usize, seed: u32) -> Vec<f32> {
        (0..len)
            .map(|i| ((i as u32).wrapping_mul(2654435761).wrapping_add(seed) >> 8) as f32)
            .map(|v| v / (1 << 24) as f32 - 0.5)
            .collect()
    }

    /// Every kernel this CPU has equals the naive product on one micro-tile: A packed, B read
    /// in place from a row-major matrix wider than the tile, written over or added to C.
    #[test]
    fn tiles_equal_the_naive_product() {
        let kernels = TileKernel::all();
        report_tested("f32 tile kernel", &kernels);
        for kc in [0, 1, 7, 256, 300] {
            let (ldb, ldc) = (NR + 5, NR + 3);
            let a = filled(MR * kc, 1);
            let b = filled(kc * ldb, 2);
            let c0 = filled(MR * ldc, 3);
            let packed = pack_a(&a, MR, kc);
            for &kernel in &kernels {
                for accumulate in [false, true] {
                    let mut c = c0.clone();
                    kernel.tile(kc, &packed, (&b, ldb), (&mut c, ldc), accumulate);
                    for i in 0..MR {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            if j >= NR {
                                assert_eq!(got, c0[i * ldc + j] as f64, "column {j} written");
                                continue;
                            }
                            let base = if accumulate {
                                c0[i * ldc + j] as f64
                            } else {
                                0.0
                            };
                            let want: f64 = base
                                + (0..kc)
                                    .map(|t| a[i * kc + t] as f64 * b[t * ldb + j] as f64)
                                    .sum::<f64>();
                            assert!(
                                (got - want).abs() <= 1e-5 * (kc.max(1) as f64).sqrt(),
                                "{kernel:?} kc {kc} accumulate {accumulate} [{i}, {j}]"
                            );
                        }
                    }
                }
            }
        }
    }
}
