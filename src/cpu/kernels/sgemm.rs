//! Single-precision matrix products on host memory, for the CPU kernels: the training
//! engine's weight gradients and strided convs' input gradients, the kNN scorer's f32
//! products, the loss where the CPU lacks AVX2 and FMA, and the convs where the CPU runs no
//! panel kernel ([`super::prepacked`], which takes the convs' products wherever it runs).
//!
//! By default the products run on the pure-Rust `gemm` crate. With the `openblas` feature they
//! run on the system's OpenBLAS (`cblas_sgemm`; Debian: `apt install libopenblas-dev`), which
//! is faster on this kind of machine for most shapes the crate uses (see the README's figures).
//! Both give the same results to float rounding; the tests below compare them.

/// A row-major operand: `data` with rows `stride` floats apart, read either as it is or, when
/// `transposed`, as its transpose.
#[derive(Clone, Copy)]
pub(crate) struct Operand<'a> {
    data: &'a [f32],
    stride: usize,
    transposed: bool,
}

impl<'a> Operand<'a> {
    /// The matrix held row-major in `data`, rows `stride` apart.
    pub(crate) fn rows(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            stride,
            transposed: false,
        }
    }

    /// The transpose of the matrix held row-major in `data`, rows `stride` apart.
    pub(crate) fn transposed(data: &'a [f32], stride: usize) -> Self {
        Self {
            data,
            stride,
            transposed: true,
        }
    }

    /// Whether it holds an r × c matrix.
    fn fits(&self, r: usize, c: usize) -> bool {
        let (held_rows, held_cols) = if self.transposed { (c, r) } else { (r, c) };
        self.stride >= held_cols && self.data.len() >= (held_rows - 1) * self.stride + held_cols
    }
}

/// `c` (m × n, rows `ldc` apart) = A·B, or `c` + A·B when `accumulate`, with A m × k and
/// B k × n. Runs on all threads.
///
/// # Panics
/// When a slice is too short for the shape and strides (a bug in the caller, never user input).
pub(crate) fn sgemm(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if check((m, n, k), a, b, c, ldc, accumulate) {
        backend::sgemm((m, n, k), a, b, c, ldc, accumulate);
    }
}

/// [`sgemm`] on the calling thread only, for callers that spread independent products over
/// rayon themselves. Always the `gemm` crate: OpenBLAS's thread count is process-wide.
///
/// # Panics
/// As [`sgemm`].
pub(crate) fn sgemm_serial(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    if check((m, n, k), a, b, c, ldc, accumulate) {
        portable_sgemm((m, n, k), a, b, c, ldc, accumulate, gemm::Parallelism::None);
    }
}

/// Checks the slices against the shape; handles the empty cases. True when there is a
/// product left to compute.
fn check(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) -> bool {
    if m == 0 || n == 0 {
        return false;
    }
    assert!(
        k == 0 || (a.fits(m, k) && b.fits(k, n)),
        "sgemm: operands too short"
    );
    assert!(
        ldc >= n && c.len() >= (m - 1) * ldc + n,
        "sgemm: output too short"
    );
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return false;
    }
    true
}

/// The libraries that can run [`sgemm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Library {
    /// The pure-Rust `gemm` crate (the default).
    Gemm,
    /// The system's OpenBLAS (the `openblas` feature).
    #[cfg_attr(not(feature = "openblas"), allow(dead_code))]
    OpenBlas,
}

#[cfg(test)]
impl Library {
    /// Its name in test output (`gemm`, `openblas`).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Library::Gemm => "gemm",
            Library::OpenBlas => "openblas",
        }
    }
}

/// Which library runs [`sgemm`] in this build.
pub(crate) const LIBRARY: Library = backend::LIBRARY;

#[cfg(feature = "openblas")]
mod backend {
    use cblas_sys::{CBLAS_LAYOUT, CBLAS_TRANSPOSE, cblas_sgemm};

    use super::Operand;

    #[link(name = "openblas")]
    unsafe extern "C" {}

    pub(super) const LIBRARY: super::Library = super::Library::OpenBlas;

    pub(super) fn sgemm(
        (m, n, k): (usize, usize, usize),
        a: Operand<'_>,
        b: Operand<'_>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        let dim = |v: usize| i32::try_from(v).expect("sgemm: dimension exceeds i32");
        let trans = |o: &Operand<'_>| match o.transposed {
            true => CBLAS_TRANSPOSE::CblasTrans,
            false => CBLAS_TRANSPOSE::CblasNoTrans,
        };
        // SAFETY: `super::check` checked every slice against the shape and strides; the
        // dimensions fit an i32 (`dim` panics otherwise, before the call).
        unsafe {
            cblas_sgemm(
                CBLAS_LAYOUT::CblasRowMajor,
                trans(&a),
                trans(&b),
                dim(m),
                dim(n),
                dim(k),
                1.0,
                a.data.as_ptr(),
                dim(a.stride),
                b.data.as_ptr(),
                dim(b.stride),
                if accumulate { 1.0 } else { 0.0 },
                c.as_mut_ptr(),
                dim(ldc),
            );
        }
    }
}

#[cfg(not(feature = "openblas"))]
mod backend {
    use super::Operand;

    pub(super) const LIBRARY: super::Library = super::Library::Gemm;

    pub(super) fn sgemm(
        shape: (usize, usize, usize),
        a: Operand<'_>,
        b: Operand<'_>,
        c: &mut [f32],
        ldc: usize,
        accumulate: bool,
    ) {
        super::portable_sgemm(shape, a, b, c, ldc, accumulate, gemm::Parallelism::Rayon(0));
    }
}

/// [`sgemm`] on the `gemm` crate (also the reference the OpenBLAS path is tested against).
fn portable_sgemm(
    (m, n, k): (usize, usize, usize),
    a: Operand<'_>,
    b: Operand<'_>,
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    // The gemm crate takes (column stride, row stride) of the matrix as it is read.
    let strides = |o: &Operand<'_>| match o.transposed {
        true => (o.stride as isize, 1),
        false => (1, o.stride as isize),
    };
    let ((a_cs, a_rs), (b_cs, b_rs)) = (strides(&a), strides(&b));
    // SAFETY: `check` checked every slice against the shape and strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            ldc as isize,
            accumulate,
            a.data.as_ptr(),
            a_cs,
            a_rs,
            b.data.as_ptr(),
            b_cs,
            b_rs,
            if accumulate { 1.0 } else { 0.0 },
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    /// A (m × k) · B (k × n) in f64, the operands read as `sgemm` reads them.
    fn naive((m, n, k): (usize, usize, usize), a: Operand<'_>, b: Operand<'_>) -> Vec<f64> {
        let at = |o: &Operand<'_>, r: usize, c: usize| match o.transposed {
            true => o.data[c * o.stride + r] as f64,
            false => o.data[r * o.stride + c] as f64,
        };
        let mut out = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| at(&a, i, p) * at(&b, p, j)).sum();
            }
        }
        out
    }

    fn op(data: &[f32], stride: usize, transposed: bool) -> Operand<'_> {
        if transposed {
            Operand::transposed(data, stride)
        } else {
            Operand::rows(data, stride)
        }
    }

    /// Every layout, odd sizes, strided operands, overwrite and accumulate: the active library
    /// (and the portable one on one thread) match an f64 reference.
    #[test]
    fn matches_a_double_precision_reference() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut random =
            |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1.0..1.0)).collect() };
        for &(m, n, k, at, bt, acc) in &[
            (1, 1, 1, false, false, false),
            (7, 5, 3, false, true, false),
            (33, 65, 130, true, false, true),
            (64, 300, 27, false, false, true),
            (128, 128, 520, true, true, false),
            (3, 1000, 64, false, true, true),
        ] {
            // Held shapes, with two floats of padding per row.
            let (a_rows, a_cols) = if at { (k, m) } else { (m, k) };
            let (b_rows, b_cols) = if bt { (n, k) } else { (k, n) };
            let (lda, ldb, ldc) = (a_cols + 2, b_cols + 2, n + 1);
            let a_data = random(a_rows * lda);
            let b_data = random(b_rows * ldb);
            let start = random(m * ldc);
            let (a, b) = (op(&a_data, lda, at), op(&b_data, ldb, bt));
            let want = naive((m, n, k), a, b);
            for serial in [false, true] {
                let mut c = start.clone();
                if serial {
                    sgemm_serial((m, n, k), a, b, &mut c, ldc, acc);
                } else {
                    sgemm((m, n, k), a, b, &mut c, ldc, acc);
                }
                for i in 0..m {
                    for j in 0..n {
                        let base = if acc { start[i * ldc + j] as f64 } else { 0.0 };
                        let (got, want) = (c[i * ldc + j] as f64, base + want[i * n + j]);
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + k as f64),
                            "{} {m}x{n}x{k} at={at} bt={bt} acc={acc} at ({i},{j}): {got} vs {want}",
                            if serial {
                                "gemm (serial)"
                            } else {
                                LIBRARY.name()
                            }
                        );
                    }
                    // The padding between rows is left alone.
                    assert_eq!(
                        c[i * ldc + n..(i + 1) * ldc],
                        start[i * ldc + n..(i + 1) * ldc]
                    );
                }
            }
        }
    }

    #[test]
    fn empty_inner_dimension_overwrites_or_keeps() {
        let mut c = vec![5.0f32; 4];
        let empty = Operand::rows(&[], 2);
        sgemm((2, 2, 0), empty, empty, &mut c, 2, true);
        assert_eq!(c, [5.0; 4]);
        sgemm((2, 2, 0), empty, empty, &mut c, 2, false);
        assert_eq!(c, [0.0; 4]);
    }
}
