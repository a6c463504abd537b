//! The kernels: matrix products and the micro-kernels under them, on slices of host memory.
//!
//! The bottom of the CPU layer: nothing here knows of convolutions, networks, kNN or burn.
//!
//! - [`sgemm`]: general f32 products (the `gemm` crate, or OpenBLAS with the `openblas`
//!   feature), threaded or on the calling thread.
//! - [`tile`]: msad's own 6 × 16 f32 micro-kernel and the packing of its left operand.
//! - [`prepacked`]: products whose left operand (a conv's weights) is packed once, on 8 × 32
//!   AVX-512 tiles or the 6 × 16 AVX2 ones, with the right operand read in place.
//! - [`gram`]: u uᵀ of a few long rows, read in place.
//! - [`int16`]: the 16-bit integer micro-kernel of the kNN screen, exact in `i32`.
//!
//! Every kernel written with intrinsics takes an instruction-set token ([`super::isa`]) and has
//! a plain-Rust twin that its unit test compares it with, against an f64 reference.

pub(crate) mod gram;
pub(crate) mod int16;
pub(crate) mod prepacked;
pub(crate) mod sgemm;
pub(crate) mod tile;

/// Σ a·b in 8 independent lanes, so that it vectorises (the lengths must be equal; the
/// shorter one bounds the sum otherwise).
pub(crate) fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for ((l, p), q) in lanes.iter_mut().zip(x).zip(y) {
            *l += p * q;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

#[cfg(test)]
mod tests {
    #[test]
    fn dot_matches_a_double_precision_sum() {
        for len in [0, 1, 7, 8, 9, 100] {
            let a: Vec<f32> = (0..len).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..len).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
            assert!((super::dot(&a, &b) as f64 - want).abs() < 1e-5, "len {len}");
        }
    }
}
