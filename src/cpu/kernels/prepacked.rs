//! Products whose left operand is packed once and multiplied many times: a conv's folded
//! weights (C_out × C_in·k·k) times blocks of its input columns, read in place.
//!
//! The `gemm` crate packs both operands on every call, and a conv called on small maps (32 px
//! images: 8 × 8 and smaller) paid that, plus a thread pool wake per product, for little
//! arithmetic. Here the left operand A is packed once ([`PackedLhs::new`]) into panels of
//! [`TileShape::mr`] rows, blocked by [`TileShape::kc`] inner columns, and the right operand B
//! is read where it lies, [`TileShape::nr`] columns at a time (one strip of kc × nr floats,
//! 16 KiB, stays in the L1 cache while the panels of A stream past it). [`PackedLhs::multiply`]
//! runs on the calling thread: the caller (`cpu::conv`) cuts the work into blocks and runs
//! them on rayon itself, so that one conv is one parallel region.
//!
//! Tiles by instruction set:
//!
//! | kernel | tile (rows × columns) | per inner step |
//! |---|---|---|
//! | AVX-512 F | 8 × 32 | 2 loads, 8 broadcasts, 16 FMAs on 16 lanes |
//! | AVX2 + FMA | 6 × 16 ([`super::tile`]'s) | 2 loads, 6 broadcasts, 12 FMAs on 8 lanes |
//! | portable | 6 × 16 | plain Rust, the reference the others are tested against |
//!
//! ResNet's channel counts (multiples of 64) fill the 8-row tile exactly.

#[cfg(test)]
use crate::cpu::isa::Level;
use crate::cpu::isa::{Avx2Fma, Avx512, Kernel, Token};

/// Which f32 micro-kernel multiplies a [`PackedLhs`]: AVX-512 F's 8 × 32 tile, AVX2 + FMA's
/// 6 × 16 one, or plain Rust (6 × 16).
pub(crate) type PanelKernel = Kernel<F32Isa>;

/// The instruction sets the f32 panel kernel has intrinsics for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum F32Isa {
    /// 8 × 32 tiles on 512-bit registers.
    Avx512(Avx512),
    /// 6 × 16 tiles on 256-bit registers ([`super::tile::avx2::kernel`]).
    Avx2Fma(Avx2Fma),
}

impl Token for F32Isa {
    fn detect() -> Option<Self> {
        Avx512::detect()
            .map(Self::Avx512)
            .or_else(|| Avx2Fma::detect().map(Self::Avx2Fma))
    }

    #[cfg(test)]
    fn all_detected() -> Vec<Self> {
        let avx2 = Avx2Fma::detect().map(Self::Avx2Fma);
        avx2.into_iter()
            .chain(Avx512::detect().map(Self::Avx512))
            .collect()
    }

    #[cfg(test)]
    fn level(self) -> Level {
        match self {
            Self::Avx512(token) => token.level(),
            Self::Avx2Fma(token) => token.level(),
        }
    }
}

/// A kernel's tile: `mr` rows of A by `nr` columns of B, over at most `kc` inner columns per
/// pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TileShape {
    /// Rows of A (and of the output) per tile.
    pub(crate) mr: usize,
    /// Columns of B (and of the output) per tile.
    pub(crate) nr: usize,
    /// Inner columns per pass: kc × nr floats of B (16 KiB) stay in the L1 cache.
    pub(crate) kc: usize,
}

/// Row stride of B, in floats (16 KiB), past which a strip's rows are copied together before
/// use (see [`PackedLhs::multiply`]).
const FAR_ROWS: usize = 4096;

/// The largest tile: the stack buffer of an edge tile holds this many floats.
const MAX_TILE: usize = 8 * 32;

impl PanelKernel {
    /// Its tile.
    pub(crate) fn shape(self) -> TileShape {
        match self {
            Self::Fast(F32Isa::Avx512(_)) => TileShape {
                mr: 8,
                nr: 32,
                kc: 128,
            },
            _ => TileShape {
                mr: super::tile::MR,
                nr: super::tile::NR,
                kc: 256,
            },
        }
    }

    /// The tile c += a · b over `kc` inner columns: `a` one packed panel (kc × mr), `b` kc rows
    /// of `nr` floats `ldb` apart, `c` mr rows of `nr` floats `ldc` apart.
    ///
    /// # Safety
    /// The pointers must be valid for those reads and writes, and no other thread may touch
    /// the tile of `c` during the call.
    unsafe fn tile(self, kc: usize, a: *const f32, b: (*const f32, usize), c: (*mut f32, usize)) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX-512 F; the pointers are the caller's contract.
            Self::Fast(F32Isa::Avx512(_)) => unsafe { avx512::kernel(kc, a, b, c) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX2 and FMA; the pointers are the caller's contract.
            Self::Fast(F32Isa::Avx2Fma(_)) => unsafe {
                super::tile::avx2::kernel(kc, a, b, c, true)
            },
            // SAFETY: the caller's contract.
            _ => unsafe {
                let TileShape { mr, nr, .. } = self.shape();
                portable_kernel(mr, nr, kc, a, b, c)
            },
        }
    }

    /// Whether [`PanelKernel::narrow_tile`] runs on this kernel.
    fn has_narrow_tile(self) -> bool {
        matches!(self, Self::Fast(F32Isa::Avx512(_)))
    }

    /// The tile c += a · b on its first `cols` columns only (1 ≤ cols < nr), reading and
    /// writing no others. AVX-512 masks its loads and stores, in 256-bit vectors where 8
    /// columns or fewer remain (`avx512::narrow_kernel`); other kernels have no such form
    /// ([`Self::has_narrow_tile`]) and get the plain Rust loop.
    ///
    /// # Safety
    /// As [`PanelKernel::tile`], for `cols` columns of `b` and `c` instead of nr.
    unsafe fn narrow_tile(
        self,
        kc: usize,
        a: *const f32,
        b: (*const f32, usize),
        c: (*mut f32, usize),
        cols: usize,
    ) {
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX-512 F; the pointers are the caller's contract.
            Self::Fast(F32Isa::Avx512(_)) => unsafe { avx512::narrow_kernel(kc, a, b, c, cols) },
            // SAFETY: the caller's contract.
            _ => unsafe { portable_kernel(self.shape().mr, cols, kc, a, b, c) },
        }
    }
}

/// The tile c += a · b in plain Rust, `mr` rows × `nr` columns, up to [`MAX_TILE`] floats.
///
/// # Safety
/// As [`PanelKernel::tile`], for `nr` columns of `b` and `c`.
unsafe fn portable_kernel(
    mr: usize,
    nr: usize,
    kc: usize,
    a: *const f32,
    (b, ldb): (*const f32, usize),
    (c, ldc): (*mut f32, usize),
) {
    let mut acc = [0f32; MAX_TILE];
    // SAFETY: the reads and writes stay within the caller's contract (kc × mr floats of `a`,
    // kc rows of nr floats of `b`, mr rows of nr floats of `c`).
    unsafe {
        for kk in 0..kc {
            for r in 0..mr {
                let x = *a.add(kk * mr + r);
                for j in 0..nr {
                    acc[r * nr + j] += x * *b.add(kk * ldb + j);
                }
            }
        }
        for r in 0..mr {
            for j in 0..nr {
                *c.add(r * ldc + j) += acc[r * nr + j];
            }
        }
    }
}

/// A left operand A (m × k), packed once for one kernel: for each block of `kc` inner columns,
/// ⌈m / mr⌉ panels of kc × mr floats (row r of the panel at lane r), rows past m zero.
#[derive(Clone, Debug)]
pub(crate) struct PackedLhs {
    data: Vec<f32>,
    m: usize,
    k: usize,
    kernel: PanelKernel,
}

impl PackedLhs {
    /// Packs `rows` (m × k, row-major) for `kernel`.
    ///
    /// # Panics
    /// When `rows` holds fewer than m × k floats (a bug in the caller).
    pub(crate) fn new(kernel: PanelKernel, rows: &[f32], m: usize, k: usize) -> Self {
        assert!(rows.len() >= m * k, "packed operand: rows too short");
        let TileShape { mr, kc, .. } = kernel.shape();
        let panels = m.div_ceil(mr);
        let mut data = vec![0f32; panels * mr * k];
        let mut at = 0;
        for k0 in (0..k).step_by(kc) {
            let depth = kc.min(k - k0);
            for p in 0..panels {
                let panel = &mut data[at..at + depth * mr];
                for r in 0..mr.min(m - p * mr) {
                    let row = &rows[(p * mr + r) * k + k0..][..depth];
                    for (t, &v) in row.iter().enumerate() {
                        panel[t * mr + r] = v;
                    }
                }
                at += depth * mr;
            }
        }
        Self { data, m, k, kernel }
    }

    /// Rows of A.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    /// The kernel it was packed for.
    pub(crate) fn kernel(&self) -> PanelKernel {
        self.kernel
    }

    /// Panels of rows: ⌈m / mr⌉.
    pub(crate) fn panels(&self) -> usize {
        self.m.div_ceil(self.kernel.shape().mr)
    }

    /// C[rows of `panels`, 0..width] += A[those rows, ..] · B[.., 0..width], on the calling
    /// thread. B is k rows of at least `width` floats, `ldb` apart, read in place (a last
    /// strip narrower than the tile is copied into a zero-padded one, and every strip where
    /// the rows are more than 16 KiB apart). C's rows are `ldc`
    /// apart from `c`, which points at row 0, column 0 of this block.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of rows `panels.start · mr .. min(panels.end ·
    /// mr, m)` and columns 0..width (row r at `c + r · ldc`), and no other thread may touch
    /// those elements during the call.
    ///
    /// # Panics
    /// When `b` is too short for k rows of `width` floats `ldb` apart, or `panels` reaches past
    /// the last panel (bugs in the caller).
    pub(crate) unsafe fn multiply(
        &self,
        panels: std::ops::Range<usize>,
        (b, ldb): (&[f32], usize),
        width: usize,
        (c, ldc): (*mut f32, usize),
    ) {
        let TileShape { mr, nr, kc } = self.kernel.shape();
        let k = self.k;
        assert!(
            panels.end <= self.panels(),
            "packed operand: panel out of range"
        );
        if width == 0 || k == 0 || panels.is_empty() {
            return;
        }
        assert!(
            ldb >= width && b.len() >= (k - 1) * ldb + width,
            "packed operand: B too short"
        );
        let full_strips = width / nr;
        let tail = width % nr;
        // Rows far apart lie in as many pages: each strip is then copied (as the tail is) into
        // one contiguous buffer before the panels read it.
        let copy_strips = ldb > FAR_ROWS;
        // A last strip narrower than a tile is read in place where the kernel has a narrow
        // (masked) form; otherwise copied into a zero-padded strip.
        let narrow = self.kernel.has_narrow_tile();
        let mut padded: Vec<f32> = Vec::new();
        let mut edge = [0f32; MAX_TILE];
        let mut a_at = 0;
        for k0 in (0..k).step_by(kc) {
            let depth = kc.min(k - k0);
            let block = &self.data[a_at..a_at + self.panels() * depth * mr];
            a_at += block.len();
            let b_rows = &b[k0 * ldb..];
            for s in 0..full_strips + usize::from(tail > 0) {
                let cols = if s < full_strips { nr } else { tail };
                let (strip, strip_ld) = if (cols == nr || narrow) && !copy_strips {
                    (&b_rows[s * nr..], ldb)
                } else {
                    // The strip's columns into a contiguous copy, zero-padded where the
                    // strip is narrower than a tile.
                    padded.clear();
                    padded.resize(depth * nr, 0.0);
                    for (t, dst) in padded.chunks_exact_mut(nr).enumerate() {
                        dst[..cols].copy_from_slice(&b_rows[t * ldb + s * nr..][..cols]);
                    }
                    (&padded[..], nr)
                };
                for p in panels.clone() {
                    let a = block[p * depth * mr..].as_ptr();
                    let rows = mr.min(self.m - p * mr);
                    // SAFETY: row p · mr, column s · nr of this block is inside the caller's
                    // region, and the strip holds `depth` rows of nr floats `strip_ld` apart
                    // (a full strip: column s · nr + nr ≤ width ≤ ldb; the padded copy: nr).
                    let out = unsafe { c.add(p * mr * ldc + s * nr) };
                    // A tile computed in place, or (edge rows, or a narrow strip the kernel
                    // reads padded) into a buffer whose inside is then added to C.
                    let in_place = rows == mr && (cols == nr || narrow);
                    let (dst, dst_ld) = if in_place {
                        (out, ldc)
                    } else {
                        edge[..mr * nr].fill(0.0);
                        (edge.as_mut_ptr(), nr)
                    };
                    let strip = (strip.as_ptr(), strip_ld);
                    // SAFETY: `dst` is the tile inside the caller's region (or `edge`, mr rows
                    // of nr floats); the strip holds `depth` rows of `cols` floats (in place,
                    // narrow) or nr (a full or padded strip).
                    unsafe {
                        if cols == nr || !narrow {
                            self.kernel.tile(depth, a, strip, (dst, dst_ld));
                        } else {
                            self.kernel
                                .narrow_tile(depth, a, strip, (dst, dst_ld), cols);
                        }
                    }
                    if !in_place {
                        for r in 0..rows {
                            for j in 0..cols {
                                // SAFETY: row r < rows, column j < cols: inside the region.
                                unsafe { *out.add(r * ldc + j) += edge[r * nr + j] };
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::{
        __m256, __m512, __mmask8, __mmask16, _mm256_add_ps, _mm256_fmadd_ps, _mm256_mask_storeu_ps,
        _mm256_maskz_loadu_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm512_add_ps,
        _mm512_castps512_ps256, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_set1_ps, _mm512_setzero_ps, _mm512_storeu_ps,
    };

    const MR: usize = 8;

    /// The 8 × 32 tile c += a · b over `kc` columns: sixteen 16-lane accumulators, per column
    /// two loads of b, eight broadcasts of a and sixteen FMAs.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `a` must point to kc × 8 floats, `b` to kc rows of 32
    /// floats `ldb` apart, and `c` to eight rows of 32 floats `ldc` apart that no other thread
    /// touches during the call.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: *const f32,
        b: (*const f32, usize),
        c: (*mut f32, usize),
    ) {
        // SAFETY: the caller's contract, all 32 columns.
        unsafe { two_vectors(kc, a, b, c, u16::MAX) }
    }

    /// The 8 × 32 tile on its first 16 columns and, of the last 16, those `high` has on.
    ///
    /// # Safety
    /// As [`kernel`], the columns of the last 16 that `high` has off neither read nor written.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn two_vectors(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        high: __mmask16,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [[__m512; 2]; MR] = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: (the whole body) masked-off lanes are neither read nor written (AVX-512
        // suppresses their faults); the reads stay within kc × 8 floats from `a` and kc rows of
        // the tile's columns `ldb` apart from `b`, the writes within eight rows of them `ldc`
        // apart from `c` (the caller's contract).
        unsafe {
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(pb);
                let b1 = _mm512_maskz_loadu_ps(high, pb.add(16));
                for (r, row) in acc.iter_mut().enumerate() {
                    let x = _mm512_set1_ps(*pa.add(r));
                    row[0] = _mm512_fmadd_ps(x, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(x, b1, row[1]);
                }
                pa = pa.add(MR);
                pb = pb.wrapping_add(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                let (lo, hi) = (c.add(r * ldc), c.add(r * ldc + 16));
                _mm512_storeu_ps(lo, _mm512_add_ps(_mm512_loadu_ps(lo), row[0]));
                let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(high, hi), row[1]);
                _mm512_mask_storeu_ps(hi, high, sum);
            }
        }
    }

    /// The tile c += a · b on the first `cols` columns (1 ≤ cols < 32) of the 8 × 32 tile,
    /// with masked loads and stores: no other column of `b` or `c` is read or written. The
    /// columns are covered by a 256-bit (8-lane) vector where that suffices: up to 8 columns,
    /// eight 256-bit accumulators; up to 16, eight 512-bit ones; up to 24, eight of each; past
    /// that the full tile. On CPUs that split a 512-bit FMA in two 256-bit halves (AMD Zen 4)
    /// a 256-bit FMA costs half a 512-bit one, so a tail costs its width rounded up to 8
    /// columns instead of 16 (a 7 × 7 map's 49 columns: 56 columns' work instead of 64).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and VL; `a` must point to kc × 8 floats, `b` to kc rows of
    /// `cols` floats `ldb` apart, and `c` to eight rows of `cols` floats `ldc` apart that no
    /// other thread touches during the call.
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    pub(super) unsafe fn narrow_kernel(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        cols: usize,
    ) {
        debug_assert!((1..32).contains(&cols));
        let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        // SAFETY: (the whole body) the callees' contracts are this function's, for the
        // columns their masks have on.
        unsafe {
            match cols {
                1..=8 => eight_lanes(kc, a, (b, ldb), (c, ldc), mask(cols) as __mmask8),
                9..=16 => sixteen_lanes(kc, a, (b, ldb), (c, ldc), mask(cols)),
                17..=24 => {
                    sixteen_and_eight(kc, a, (b, ldb), (c, ldc), mask(cols - 16) as __mmask8)
                }
                _ => two_vectors(kc, a, (b, ldb), (c, ldc), mask(cols - 16)),
            }
        }
    }

    /// The 8-row tile on the columns of its first 8 that `m` has on, in 256-bit vectors.
    ///
    /// # Safety
    /// As [`narrow_kernel`], for the columns `m` has on.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn eight_lanes(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        m: __mmask8,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [__m256; MR] = [_mm256_setzero_ps(); MR];
        // SAFETY: (the whole body) masked-off lanes are neither read nor written (AVX-512
        // suppresses their faults); the lanes on stay within the caller's contract.
        unsafe {
            for _ in 0..kc {
                let b0 = _mm256_maskz_loadu_ps(m, pb);
                for (r, row) in acc.iter_mut().enumerate() {
                    *row = _mm256_fmadd_ps(_mm256_set1_ps(*pa.add(r)), b0, *row);
                }
                pa = pa.add(MR);
                pb = pb.wrapping_add(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                let lo = c.add(r * ldc);
                let sum = _mm256_add_ps(_mm256_maskz_loadu_ps(m, lo), *row);
                _mm256_mask_storeu_ps(lo, m, sum);
            }
        }
    }

    /// The 8-row tile on the columns of its first 16 that `m` has on, in 512-bit vectors.
    ///
    /// # Safety
    /// As [`narrow_kernel`], for the columns `m` has on.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn sixteen_lanes(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        m: __mmask16,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [__m512; MR] = [_mm512_setzero_ps(); MR];
        // SAFETY: (the whole body) masked-off lanes are neither read nor written (AVX-512
        // suppresses their faults); the lanes on stay within the caller's contract.
        unsafe {
            for _ in 0..kc {
                let b0 = _mm512_maskz_loadu_ps(m, pb);
                for (r, row) in acc.iter_mut().enumerate() {
                    *row = _mm512_fmadd_ps(_mm512_set1_ps(*pa.add(r)), b0, *row);
                }
                pa = pa.add(MR);
                pb = pb.wrapping_add(ldb);
            }
            for (r, row) in acc.iter().enumerate() {
                let lo = c.add(r * ldc);
                let sum = _mm512_add_ps(_mm512_maskz_loadu_ps(m, lo), *row);
                _mm512_mask_storeu_ps(lo, m, sum);
            }
        }
    }

    /// The 8-row tile on its first 16 columns (512-bit vectors) and those of the next 8 that
    /// `high` has on (256-bit vectors).
    ///
    /// # Safety
    /// As [`narrow_kernel`], for the first 16 columns and those `high` has on of the next 8.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn sixteen_and_eight(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        high: __mmask8,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut wide: [__m512; MR] = [_mm512_setzero_ps(); MR];
        let mut narrow: [__m256; MR] = [_mm256_setzero_ps(); MR];
        // SAFETY: (the whole body) masked-off lanes are neither read nor written (AVX-512
        // suppresses their faults); the lanes on stay within the caller's contract.
        unsafe {
            for _ in 0..kc {
                let b0 = _mm512_loadu_ps(pb);
                let b1 = _mm256_maskz_loadu_ps(high, pb.add(16));
                for r in 0..MR {
                    let x = _mm512_set1_ps(*pa.add(r));
                    wide[r] = _mm512_fmadd_ps(x, b0, wide[r]);
                    narrow[r] = _mm256_fmadd_ps(_mm512_castps512_ps256(x), b1, narrow[r]);
                }
                pa = pa.add(MR);
                pb = pb.wrapping_add(ldb);
            }
            for r in 0..MR {
                let (lo, hi) = (c.add(r * ldc), c.add(r * ldc + 16));
                _mm512_storeu_ps(lo, _mm512_add_ps(_mm512_loadu_ps(lo), wide[r]));
                let sum = _mm256_add_ps(_mm256_maskz_loadu_ps(high, hi), narrow[r]);
                _mm256_mask_storeu_ps(hi, high, sum);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::isa::report_tested;
    use crate::cpu::kernels::tile::tests::filled;

    /// Every kernel this CPU has adds A·B to C as an f64 product does, on shapes with edge
    /// tiles in both directions, several inner blocks, a subset of the panels, and B read in
    /// place from a wider matrix; nothing outside the block is written.
    #[test]
    fn packed_products_equal_a_double_precision_product() {
        let kernels = PanelKernel::all();
        report_tested("f32 panel kernel", &kernels);
        for &kernel in &kernels {
            let TileShape { mr, .. } = kernel.shape();
            // (m, k, width, whether B's rows are far apart: strips copied before use)
            let shapes = [
                (1, 1, 1, false),
                (8, 300, 32, false),
                (13, 129, 45, false),
                (64, 576, 70, false),
                (20, 7, 3, false),
                (16, 64, 57, false),
                (8, 40, 17, false),
                (8, 50, 52, false),
                (16, 33, 24, false),
                (8, 20, 9, false),
                (24, 70, 8, false),
                (8, 9, 49, false),
                (9, 7, 40, true),
                (16, 130, 64, true),
            ];
            for (m, k, width, far) in shapes {
                let ldb = if far { FAR_ROWS + 9 } else { width + 5 };
                let ldc = width + 3;
                let a = filled(m * k, 1);
                let b = filled(k * ldb, 2);
                let c0 = filled(m * ldc, 3);
                let packed = PackedLhs::new(kernel, &a, m, k);
                let panel_sets = [0..packed.panels(), packed.panels() / 2..packed.panels()];
                for panels in panel_sets {
                    let mut c = c0.clone();
                    let first = panels.start * mr;
                    // SAFETY: `c` holds m rows of ldc ≥ width floats; one thread.
                    unsafe {
                        packed.multiply(panels.clone(), (&b, ldb), width, (c.as_mut_ptr(), ldc))
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            let base = c0[i * ldc + j] as f64;
                            if j >= width || i < first {
                                assert_eq!(got, base, "[{i}, {j}] outside the block written");
                                continue;
                            }
                            let want = base
                                + (0..k)
                                    .map(|t| a[i * k + t] as f64 * b[t * ldb + j] as f64)
                                    .sum::<f64>();
                            assert!(
                                (got - want).abs() <= 1e-5 * (k as f64).sqrt(),
                                "{kernel:?} m {m} k {k} width {width} [{i}, {j}]: {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }
}
