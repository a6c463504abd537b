//! The Gram matrix u uᵀ of a few long rows (the loss's 2B × D shifted features): tiles of
//! 3 × 4 dot products, each an 8-lane FMA accumulator running along the rows, on and above
//! the diagonal only. The rows are read where they lie, with no packing: seven loads feed
//! twelve FMAs (the outer-product kernel of [`super::tile`] needs eight, on packed panels).
//! The kernel is [`TileKernel`]: the same instruction sets as the tile.

use super::dot;
use super::tile::TileKernel;

/// Rows per tile (the left factors).
const TILE_ROWS: usize = 3;
/// Rows per tile on the right.
const TILE_COLS: usize = 4;
/// Columns per pass over the tiles: 4 KiB of each row. Shorter passes keep more of the rows
/// in the L2 cache but make each tile's horizontal sums more often, which cost more here
/// (measured on 128 rows of 1024 columns: ~310 µs in one pass, ~380 µs in two of 512).
const BLOCK: usize = 1024;

/// u uᵀ (n × n, row-major) for the n rows of `len` floats held `stride` apart in `u`.
///
/// # Panics
/// When `u` is too short for the shape (a bug in the caller, never user input).
pub(crate) fn gram(u: &[f32], n: usize, len: usize, stride: usize, kernel: TileKernel) -> Vec<f32> {
    assert!(
        stride >= len && u.len() >= n.saturating_sub(1) * stride + len,
        "gram: rows too short"
    );
    let mut c = vec![0f32; n * n];
    for k0 in (0..len).step_by(BLOCK) {
        let k1 = (k0 + BLOCK).min(len);
        for i0 in (0..n).step_by(TILE_ROWS) {
            let rows = TILE_ROWS.min(n - i0);
            // Column tiles from the one holding column i0: everything on and above the
            // diagonal.
            for j0 in (i0 / TILE_COLS * TILE_COLS..n).step_by(TILE_COLS) {
                let cols = TILE_COLS.min(n - j0);
                let tile = dot_tile(u, stride, (i0, rows), (j0, cols), k0..k1, kernel);
                for (r, values) in tile.iter().enumerate().take(rows) {
                    let out = &mut c[(i0 + r) * n + j0..][..cols];
                    out.iter_mut().zip(values).for_each(|(o, v)| *o += v);
                }
            }
        }
    }
    // The lower triangle from the upper one (tiles on the diagonal computed both).
    for i in 0..n {
        for j in 0..i {
            c[i * n + j] = c[j * n + i];
        }
    }
    c
}

/// Dot products of rows `i0..i0 + rows` with rows `j0..j0 + cols` over the columns `ks`.
fn dot_tile(
    u: &[f32],
    stride: usize,
    (i0, rows): (usize, usize),
    (j0, cols): (usize, usize),
    ks: std::ops::Range<usize>,
    kernel: TileKernel,
) -> [[f32; TILE_COLS]; TILE_ROWS] {
    let row = |i: usize| &u[i * stride + ks.start..i * stride + ks.end];
    let left: [&[f32]; TILE_ROWS] = std::array::from_fn(|r| row(i0 + r.min(rows - 1)));
    let right: [&[f32]; TILE_COLS] = std::array::from_fn(|c| row(j0 + c.min(cols - 1)));
    match kernel {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the token proves the CPU has AVX2 and FMA; `left` and `right` hold rows of
        // equal length (cut from the same column range above).
        TileKernel::Fast(_) => unsafe { avx2::dot_tile(left, right) },
        _ => portable_dot_tile(left, right),
    }
}

/// [`dot_tile`] in plain Rust.
fn portable_dot_tile(
    left: [&[f32]; TILE_ROWS],
    right: [&[f32]; TILE_COLS],
) -> [[f32; TILE_COLS]; TILE_ROWS] {
    std::array::from_fn(|r| std::array::from_fn(|c| dot(left[r], right[c])))
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::{
        _mm_add_ps, _mm_storeu_ps, _mm256_castps256_ps128, _mm256_extractf128_ps, _mm256_fmadd_ps,
        _mm256_hadd_ps, _mm256_loadu_ps, _mm256_setzero_ps,
    };

    use super::{TILE_COLS, TILE_ROWS};

    /// Twelve dot products of equally long rows: per 8 columns, seven loads and twelve FMAs
    /// (the accumulators are named one by one: held in an array, they were stored back to
    /// the stack on every step).
    ///
    /// # Safety
    /// The CPU must have AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot_tile(
        left: [&[f32]; TILE_ROWS],
        right: [&[f32]; TILE_COLS],
    ) -> [[f32; TILE_COLS]; TILE_ROWS] {
        let len = left[0].len();
        assert!(left.iter().chain(&right).all(|r| r.len() == len));
        let full = len / 8 * 8;
        let [l0, l1, l2] = left.map(<[f32]>::as_ptr);
        let [r0, r1, r2, r3] = right.map(<[f32]>::as_ptr);
        let z = _mm256_setzero_ps();
        let (mut c00, mut c01, mut c02, mut c03) = (z, z, z, z);
        let (mut c10, mut c11, mut c12, mut c13) = (z, z, z, z);
        let (mut c20, mut c21, mut c22, mut c23) = (z, z, z, z);
        // SAFETY: every load reads 8 floats at k < full ≤ len of a row of `len` floats
        // (asserted above).
        unsafe {
            for k in (0..full).step_by(8) {
                let (a0, a1, a2) = (
                    _mm256_loadu_ps(l0.add(k)),
                    _mm256_loadu_ps(l1.add(k)),
                    _mm256_loadu_ps(l2.add(k)),
                );
                let b = _mm256_loadu_ps(r0.add(k));
                c00 = _mm256_fmadd_ps(a0, b, c00);
                c10 = _mm256_fmadd_ps(a1, b, c10);
                c20 = _mm256_fmadd_ps(a2, b, c20);
                let b = _mm256_loadu_ps(r1.add(k));
                c01 = _mm256_fmadd_ps(a0, b, c01);
                c11 = _mm256_fmadd_ps(a1, b, c11);
                c21 = _mm256_fmadd_ps(a2, b, c21);
                let b = _mm256_loadu_ps(r2.add(k));
                c02 = _mm256_fmadd_ps(a0, b, c02);
                c12 = _mm256_fmadd_ps(a1, b, c12);
                c22 = _mm256_fmadd_ps(a2, b, c22);
                let b = _mm256_loadu_ps(r3.add(k));
                c03 = _mm256_fmadd_ps(a0, b, c03);
                c13 = _mm256_fmadd_ps(a1, b, c13);
                c23 = _mm256_fmadd_ps(a2, b, c23);
            }
        }
        // Per row, the four sums by a tree of horizontal adds, then the columns past the last
        // multiple of 8.
        let sums = |c0, c1, c2, c3| {
            let h = _mm256_hadd_ps(_mm256_hadd_ps(c0, c1), _mm256_hadd_ps(c2, c3));
            let mut out = [0f32; 4];
            let quad = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h));
            // SAFETY: `out` holds 4 floats.
            unsafe { _mm_storeu_ps(out.as_mut_ptr(), quad) };
            out
        };
        let mut out = [
            sums(c00, c01, c02, c03),
            sums(c10, c11, c12, c13),
            sums(c20, c21, c22, c23),
        ];
        if full < len {
            for (out, left) in out.iter_mut().zip(left) {
                for (o, right) in out.iter_mut().zip(right) {
                    *o += left[full..]
                        .iter()
                        .zip(&right[full..])
                        .map(|(x, y)| x * y)
                        .sum::<f32>();
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::report_tested;

    /// Every kernel this CPU has equals a double-precision Gram matrix, for sizes that leave
    /// partial tiles, a partial block and a tail shorter than 8 columns.
    #[test]
    fn gram_equals_the_naive_product() {
        let kernels = TileKernel::all();
        report_tested("gram tiles", &kernels);
        for (n, len, stride) in [(1, 1, 1), (4, 3, 5), (14, 1030, 1040), (13, 2048, 2048)] {
            let u: Vec<f32> = (0..n * stride)
                .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / (1 << 24) as f32 - 0.5)
                .collect();
            for &kernel in &kernels {
                let c = gram(&u, n, len, stride, kernel);
                for i in 0..n {
                    for j in 0..n {
                        let want: f64 = (0..len)
                            .map(|t| u[i * stride + t] as f64 * u[j * stride + t] as f64)
                            .sum();
                        let got = c[i * n + j] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (len as f64).sqrt(),
                            "{kernel:?} n {n} len {len} [{i}, {j}]: {got} vs {want}"
                        );
                        assert_eq!(c[i * n + j], c[j * n + i], "not symmetric");
                    }
                }
            }
        }
    }
}
