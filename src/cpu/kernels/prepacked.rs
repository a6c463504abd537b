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

    /// The tile c = start + a · b over `kc` inner columns, then ReLU where `ends` asks: `a`
    /// one packed panel (kc × mr), `b` kc rows of `cols` floats `ldb` apart (1 ≤ cols ≤ nr),
    /// `c` mr rows of `cols` floats `ldc` apart; no other column is read or written. AVX-512
    /// does the ends in its stores (masked, in 256-bit vectors where 8 columns or fewer
    /// remain); the other kernels run whole tiles only (`cols == nr`) and get the ends as
    /// plain loops around their product.
    ///
    /// # Safety
    /// The pointers must be valid for those reads and writes, and those of `ends` (see
    /// [`TileEnds`]); no other thread may touch the tile of `c` during the call.
    unsafe fn tile(
        self,
        kc: usize,
        a: *const f32,
        b: (*const f32, usize),
        c: (*mut f32, usize),
        cols: usize,
        ends: TileEnds,
    ) {
        let mr = self.shape().mr;
        match self {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX-512 F; the pointers are the caller's contract.
            Self::Fast(F32Isa::Avx512(_)) => unsafe { avx512::kernel(kc, a, b, c, cols, ends) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the token proves AVX2 and FMA; the pointers are the caller's contract.
            Self::Fast(F32Isa::Avx2Fma(_)) => unsafe {
                debug_assert_eq!(cols, self.shape().nr);
                ends.start_plain(mr, cols, c);
                super::tile::avx2::kernel(kc, a, b, c, true);
                ends.relu_plain(mr, cols, c);
            },
            // SAFETY: the caller's contract.
            _ => unsafe {
                ends.start_plain(mr, cols, c);
                portable_kernel(mr, cols, kc, a, b, c);
                ends.relu_plain(mr, cols, c);
            },
        }
    }

    /// Whether [`PanelKernel::tile`] takes fewer than nr columns in place.
    fn has_narrow_tile(self) -> bool {
        matches!(self, Self::Fast(F32Isa::Avx512(_)))
    }
}

/// Where the sums of a product start: what [`PackedLhs::multiply`] adds its products to.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) enum Start<'a> {
    /// The output's contents: c += a · b.
    #[default]
    Output,
    /// Zero: c = 0 + a · b (the output may hold anything before).
    Zero,
    /// A bias per output row, plus a residual where given: c = (bias[i] + residual[i, j]) +
    /// a · b. `bias` is indexed by the output row; the residual's element (i, j) is at
    /// i · ld + j of its slice, aligned with the output's first element.
    Bias {
        /// One value per output row.
        bias: &'a [f32],
        /// The residual and its row stride.
        residual: Option<(&'a [f32], usize)>,
    },
}

/// What a product does besides adding up its products: where its sums start (on the first
/// pass over the inner dimension) and whether its final sums go through ReLU (`v < 0 ? 0 :
/// v`, which keeps NaN, as the backends' relu does), done in the micro-kernel's stores, so
/// that a conv's output is written once by its product instead of also by a pass that
/// initialises it and one that applies ReLU.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ends<'a> {
    /// Where the sums start.
    pub(crate) start: Start<'a>,
    /// ReLU on the final sums.
    pub(crate) relu: bool,
}

/// A tile's share of [`Ends`] for one pass over `kc` inner columns: pointers to the tile's
/// first row of bias and first element of residual.
#[derive(Clone, Copy, Debug)]
struct TileEnds {
    start: TileStart,
    relu: bool,
}

/// Where a tile's sums start: [`Start`] with pointers into the tile's rows.
#[derive(Clone, Copy, Debug)]
enum TileStart {
    Output,
    Zero,
    /// Row r's bias at `bias + r`; its residual (where `residual` is not null) from
    /// `residual + r · ld`.
    Bias {
        bias: *const f32,
        residual: *const f32,
        ld: usize,
    },
}

impl TileEnds {
    /// Accumulate into the output, no ReLU.
    const ACCUMULATE: Self = Self {
        start: TileStart::Output,
        relu: false,
    };

    /// Writes the start value into `rows` × `cols` of `c` (nothing for [`TileStart::Output`]).
    ///
    /// # Safety
    /// `c` must be valid for those writes, and `self`'s pointers for the reads of those rows
    /// and columns.
    unsafe fn start_plain(self, rows: usize, cols: usize, (c, ldc): (*mut f32, usize)) {
        if let TileStart::Output = self.start {
            return;
        }
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: the caller's contract.
                unsafe {
                    let v = match self.start {
                        TileStart::Output | TileStart::Zero => 0.0,
                        TileStart::Bias { bias, residual, .. } if residual.is_null() => {
                            *bias.add(r)
                        }
                        TileStart::Bias { bias, residual, ld } => {
                            *bias.add(r) + *residual.add(r * ld + j)
                        }
                    };
                    *c.add(r * ldc + j) = v;
                }
            }
        }
    }

    /// ReLU on `rows` × `cols` of `c`, where asked.
    ///
    /// # Safety
    /// `c` must be valid for those reads and writes.
    unsafe fn relu_plain(self, rows: usize, cols: usize, (c, ldc): (*mut f32, usize)) {
        if !self.relu {
            return;
        }
        for r in 0..rows {
            for j in 0..cols {
                // SAFETY: the caller's contract.
                unsafe {
                    let v = c.add(r * ldc + j);
                    if *v < 0.0 {
                        *v = 0.0;
                    }
                }
            }
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

    /// Inner columns per packed block (the kernel's kc): where [`PackedLhs::multiply_inner`]'s
    /// ranges may start.
    pub(crate) fn inner_block(&self) -> usize {
        self.kernel.shape().kc
    }

    /// Rows of A.
    pub(crate) fn rows(&self) -> usize {
        self.m
    }

    /// Columns of A (the product's inner dimension).
    pub(crate) fn inner(&self) -> usize {
        self.k
    }

    /// The kernel it was packed for.
    pub(crate) fn kernel(&self) -> PanelKernel {
        self.kernel
    }

    /// Panels of rows: ⌈m / mr⌉.
    pub(crate) fn panels(&self) -> usize {
        self.m.div_ceil(self.kernel.shape().mr)
    }

    /// C[rows of `panels`, 0..width] = start + A[those rows, ..] · B[.., 0..width], then
    /// ReLU where asked ([`Ends`]), on the calling thread. B is k rows of at least `width`
    /// floats, `ldb` apart, read in place (a last strip narrower than the tile is copied into
    /// a zero-padded one, except on AVX-512, and every strip where the rows are more than
    /// 16 KiB apart). C's rows are `ldc` apart from `c`, which points at row 0, column 0 of
    /// this block.
    ///
    /// # Safety
    /// `c` must be valid for reads and writes of rows `panels.start · mr .. min(panels.end ·
    /// mr, m)` and columns 0..width (row r at `c + r · ldc`), and no other thread may touch
    /// those elements during the call. They must be initialised where `ends` starts from
    /// [`Start::Output`].
    ///
    /// # Panics
    /// When `b` is too short for k rows of `width` floats `ldb` apart, `panels` reaches past
    /// the last panel, or the bias or residual of `ends` is too short for those rows and
    /// columns (bugs in the caller).
    pub(crate) unsafe fn multiply(
        &self,
        panels: std::ops::Range<usize>,
        b: (&[f32], usize),
        width: usize,
        c: (*mut f32, usize),
        ends: Ends<'_>,
    ) {
        // SAFETY: the caller's contract, over all k inner columns.
        unsafe { self.multiply_inner(panels, 0..self.k, b, width, c, ends) }
    }

    /// [`PackedLhs::multiply`] over the inner columns `inner` of A only, B holding just those
    /// rows (row t of B is inner column `inner.start + t`): a product whose B comes in groups
    /// of rows made by different tasks, summed group by group (the first with the ends'
    /// start, the others with [`Start::Output`]; ReLU on the last group only, or it would
    /// clip partial sums). `inner` must start on a multiple of
    /// [`PackedLhs::inner_block`] and end on one or at k, so that the sums run block by block
    /// exactly as in one call over all of k.
    ///
    /// # Safety
    /// As [`PackedLhs::multiply`].
    ///
    /// # Panics
    /// As [`PackedLhs::multiply`], and where `inner` is not so aligned or reaches past k.
    pub(crate) unsafe fn multiply_inner(
        &self,
        panels: std::ops::Range<usize>,
        inner: std::ops::Range<usize>,
        (b, ldb): (&[f32], usize),
        width: usize,
        (c, ldc): (*mut f32, usize),
        ends: Ends<'_>,
    ) {
        let TileShape { mr, nr, kc } = self.kernel.shape();
        assert!(
            inner.start.is_multiple_of(kc)
                && (inner.end.is_multiple_of(kc) || inner.end == self.k)
                && inner.start <= inner.end
                && inner.end <= self.k,
            "packed operand: inner columns {inner:?} not on blocks of {kc} within {}",
            self.k
        );
        let k = inner.len();
        assert!(
            panels.end <= self.panels(),
            "packed operand: panel out of range"
        );
        if width == 0 || panels.is_empty() {
            return;
        }
        let last_row = (panels.end * mr).min(self.m);
        if let Start::Bias { bias, residual } = ends.start {
            assert!(bias.len() >= last_row, "packed operand: bias too short");
            assert!(
                residual
                    .is_none_or(|(r, ld)| ld >= width && r.len() >= (last_row - 1) * ld + width),
                "packed operand: residual too short"
            );
        }
        // The tile (panel p, strip s)'s ends on a pass: its start on the first pass only,
        // ReLU on the last only.
        let tile_ends = |p: usize, s: usize, first: bool, last: bool| TileEnds {
            start: match ends.start {
                _ if !first => TileStart::Output,
                Start::Output => TileStart::Output,
                Start::Zero => TileStart::Zero,
                Start::Bias { bias, residual } => TileStart::Bias {
                    bias: bias[p * mr..].as_ptr(),
                    residual: residual.map_or(std::ptr::null(), |(r, ld)| {
                        r[p * mr * ld + s * nr..].as_ptr()
                    }),
                    ld: residual.map_or(0, |(_, ld)| ld),
                },
            },
            relu: last && ends.relu,
        };
        if k == 0 {
            // No products: the start, then ReLU, on every tile.
            for p in panels.clone() {
                let rows = mr.min(self.m - p * mr);
                for s in 0..width.div_ceil(nr) {
                    let cols = nr.min(width - s * nr);
                    let tile = tile_ends(p, s, true, true);
                    // SAFETY: rows × cols of the block at (p · mr, s · nr): the caller's.
                    unsafe {
                        let out = c.add(p * mr * ldc + s * nr);
                        tile.start_plain(rows, cols, (out, ldc));
                        tile.relu_plain(rows, cols, (out, ldc));
                    }
                }
            }
            return;
        }
        assert!(
            ldb >= width && b.len() >= (k - 1) * ldb + width,
            "packed operand: B too short"
        );
        let full_strips = width / nr;
        let tail = width % nr;
        let copy_strips = ldb > FAR_ROWS;
        let narrow = self.kernel.has_narrow_tile();
        let mut padded: Vec<f32> = Vec::new();
        let mut edge = [0f32; MAX_TILE];
        // Every block before `inner.start` is a whole kc deep.
        let mut a_at = inner.start * self.panels() * mr;
        for k0 in (0..k).step_by(kc) {
            let depth = kc.min(k - k0);
            let (first, last) = (k0 == 0, k0 + depth == k);
            let block = &self.data[a_at..a_at + self.panels() * depth * mr];
            a_at += block.len();
            let b_rows = &b[k0 * ldb..];
            for s in 0..full_strips + usize::from(tail > 0) {
                let cols = if s < full_strips { nr } else { tail };
                // A strip is read in place, unless it is a narrow one that the kernel cannot
                // mask, or its rows are far apart: then copied, zero-padded to nr columns.
                let (strip, strip_ld) = if (cols == nr || narrow) && !copy_strips {
                    (&b_rows[s * nr..], ldb)
                } else {
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
                    // SAFETY: the tile's first element, inside the caller's block.
                    let out = unsafe { c.add(p * mr * ldc + s * nr) };
                    let strip = (strip.as_ptr(), strip_ld);
                    let ends = tile_ends(p, s, first, last);
                    if rows == mr && (cols == nr || narrow) {
                        // SAFETY: the tile's rows and columns of C are the caller's; `a` is
                        // one packed panel of `depth` columns, `strip` depth rows of at least
                        // `cols` floats (of nr where copied); the ends' pointers are the
                        // tile's rows of bias and residual (their lengths asserted above).
                        unsafe { self.kernel.tile(depth, a, strip, (out, ldc), cols, ends) };
                    } else {
                        // An edge tile: the product into a zeroed stack tile, then the ends
                        // on the rows and columns that exist.
                        edge[..mr * nr].fill(0.0);
                        let (tile, accumulate) = (edge.as_mut_ptr(), TileEnds::ACCUMULATE);
                        // SAFETY: `edge` holds mr × nr floats; `a` and `strip` as above (a
                        // narrow strip is padded to nr columns unless the kernel masks).
                        unsafe {
                            let full = if narrow { cols } else { nr };
                            self.kernel
                                .tile(depth, a, strip, (tile, nr), full, accumulate);
                            ends.start_plain(rows, cols, (out, ldc));
                            for r in 0..rows {
                                for j in 0..cols {
                                    *out.add(r * ldc + j) += edge[r * nr + j];
                                }
                            }
                            ends.relu_plain(rows, cols, (out, ldc));
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
        _mm256_maskz_loadu_ps, _mm256_max_ps, _mm256_set1_ps, _mm256_setzero_ps, _mm512_add_ps,
        _mm512_castps512_ps256, _mm512_fmadd_ps, _mm512_loadu_ps, _mm512_mask_storeu_ps,
        _mm512_maskz_loadu_ps, _mm512_max_ps, _mm512_set1_ps, _mm512_setzero_ps,
    };

    use super::{TileEnds, TileStart};

    const MR: usize = 8;

    /// The 8 × 32 tile c = start + a · b over `kc` columns (then ReLU where `ends` asks), on
    /// its first `cols` columns only (1 ≤ cols ≤ 32), reading and writing no others. Full
    /// tiles: sixteen 16-lane accumulators, per column two loads of b, eight broadcasts of a
    /// and sixteen FMAs; narrower ones mask their loads and stores, in 256-bit vectors where
    /// 8 columns or fewer remain.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F and VL; `a` must point to kc × 8 floats, `b` to kc rows of
    /// `cols` floats `ldb` apart, `c` to eight rows of `cols` floats `ldc` apart that no other
    /// thread touches during the call, and `ends`' pointers to eight rows of bias and of
    /// `cols` residual floats.
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    pub(super) unsafe fn kernel(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        cols: usize,
        ends: TileEnds,
    ) {
        debug_assert!((1..=32).contains(&cols));
        let mask = |n: usize| -> __mmask16 { ((1u32 << n.min(16)) - 1) as __mmask16 };
        // SAFETY: the caller's contract, for `cols` columns.
        unsafe {
            match cols {
                1..=8 => eight_lanes(kc, a, (b, ldb), (c, ldc), mask(cols) as __mmask8, ends),
                9..=16 => sixteen_lanes(kc, a, (b, ldb), (c, ldc), mask(cols), ends),
                17..=24 => {
                    sixteen_and_eight(kc, a, (b, ldb), (c, ldc), mask(cols - 16) as __mmask8, ends)
                }
                _ => two_vectors(kc, a, (b, ldb), (c, ldc), mask(cols - 16), ends),
            }
        }
    }

    /// Stores row `r`'s sums `acc` (16 lanes, those of `m`) at `dst`, column `col` of the
    /// tile: start + acc, then ReLU where asked (`max(0, v)` returns v where v is NaN).
    ///
    /// # Safety
    /// `dst` valid for reads (where the start is the output) and writes of the lanes of `m`;
    /// `ends`' pointers for row r, those columns.
    #[inline(always)]
    unsafe fn store16(
        ends: TileEnds,
        r: usize,
        col: usize,
        dst: *mut f32,
        m: __mmask16,
        acc: __m512,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let start = match ends.start {
                TileStart::Output => _mm512_maskz_loadu_ps(m, dst),
                TileStart::Zero => _mm512_setzero_ps(),
                TileStart::Bias { bias, residual, .. } if residual.is_null() => {
                    _mm512_set1_ps(*bias.add(r))
                }
                TileStart::Bias { bias, residual, ld } => _mm512_add_ps(
                    _mm512_set1_ps(*bias.add(r)),
                    _mm512_maskz_loadu_ps(m, residual.add(r * ld + col)),
                ),
            };
            let sum = _mm512_add_ps(start, acc);
            let sum = if ends.relu {
                _mm512_max_ps(_mm512_setzero_ps(), sum)
            } else {
                sum
            };
            _mm512_mask_storeu_ps(dst, m, sum);
        }
    }

    /// [`store16`] on 8 lanes.
    ///
    /// # Safety
    /// As [`store16`].
    #[inline(always)]
    unsafe fn store8(
        ends: TileEnds,
        r: usize,
        col: usize,
        dst: *mut f32,
        m: __mmask8,
        acc: __m256,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let start = match ends.start {
                TileStart::Output => _mm256_maskz_loadu_ps(m, dst),
                TileStart::Zero => _mm256_setzero_ps(),
                TileStart::Bias { bias, residual, .. } if residual.is_null() => {
                    _mm256_set1_ps(*bias.add(r))
                }
                TileStart::Bias { bias, residual, ld } => _mm256_add_ps(
                    _mm256_set1_ps(*bias.add(r)),
                    _mm256_maskz_loadu_ps(m, residual.add(r * ld + col)),
                ),
            };
            let sum = _mm256_add_ps(start, acc);
            let sum = if ends.relu {
                _mm256_max_ps(_mm256_setzero_ps(), sum)
            } else {
                sum
            };
            _mm256_mask_storeu_ps(dst, m, sum);
        }
    }

    /// The 8 × 32 tile on its first 16 columns and, of the last 16, those `high` has on.
    ///
    /// # Safety
    /// As [`kernel`], the columns of the last 16 that `high` has off neither read nor written.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn two_vectors(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        high: __mmask16,
        ends: TileEnds,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [[__m512; 2]; MR] = [[_mm512_setzero_ps(); 2]; MR];
        // SAFETY: kc columns of `a` (8 floats each) and rows of `b` (16 floats and the lanes
        // of `high`), the eight rows of `c` and of `ends`: the caller's contract.
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
                store16(ends, r, 0, c.add(r * ldc), u16::MAX, row[0]);
                store16(ends, r, 16, c.add(r * ldc + 16), high, row[1]);
            }
        }
    }

    /// The tile on its first columns, those `m` has on (8 at most): 256-bit vectors.
    ///
    /// # Safety
    /// As [`kernel`], for the columns of `m`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn eight_lanes(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        m: __mmask8,
        ends: TileEnds,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [__m256; MR] = [_mm256_setzero_ps(); MR];
        // SAFETY: as in `two_vectors`, the columns of `m`.
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
                store8(ends, r, 0, c.add(r * ldc), m, *row);
            }
        }
    }

    /// The tile on its first columns, those `m` has on (16 at most): one 512-bit vector.
    ///
    /// # Safety
    /// As [`kernel`], for the columns of `m`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn sixteen_lanes(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        m: __mmask16,
        ends: TileEnds,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut acc: [__m512; MR] = [_mm512_setzero_ps(); MR];
        // SAFETY: as in `two_vectors`, the columns of `m`.
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
                store16(ends, r, 0, c.add(r * ldc), m, *row);
            }
        }
    }

    /// The tile on 16 columns and, of the next 8, those `high` has on: a 512-bit and a
    /// 256-bit vector per row.
    ///
    /// # Safety
    /// As [`kernel`], for 16 columns and those of `high`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    unsafe fn sixteen_and_eight(
        kc: usize,
        a: *const f32,
        (b, ldb): (*const f32, usize),
        (c, ldc): (*mut f32, usize),
        high: __mmask8,
        ends: TileEnds,
    ) {
        let (mut pa, mut pb) = (a, b);
        let mut wide: [__m512; MR] = [_mm512_setzero_ps(); MR];
        let mut narrow: [__m256; MR] = [_mm256_setzero_ps(); MR];
        // SAFETY: as in `two_vectors`, 16 columns and those of `high`.
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
                store16(ends, r, 0, c.add(r * ldc), u16::MAX, wide[r]);
                store8(ends, r, 16, c.add(r * ldc + 16), high, narrow[r]);
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
    /// place from a wider matrix; nothing outside the block is written. The same with each
    /// start (the output, zero, a bias, a bias and a residual) and ReLU, which keeps NaN.
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
                (9, 0, 20, false),
            ];
            for (m, k, width, far) in shapes {
                let ldb = if far { FAR_ROWS + 9 } else { width + 5 };
                let ldc = width + 3;
                let a = filled(m * k, 1);
                let b = filled(k * ldb, 2);
                let c0 = filled(m * ldc, 3);
                let bias = filled(m, 4);
                // A residual with its own stride, one NaN inside the block.
                let ldr = width + 1;
                let mut residual = filled(m * ldr, 5);
                residual[(m - 1) * ldr + width - 1] = f32::NAN;
                let starts = [
                    Start::Output,
                    Start::Zero,
                    Start::Bias {
                        bias: &bias,
                        residual: None,
                    },
                    Start::Bias {
                        bias: &bias,
                        residual: Some((&residual, ldr)),
                    },
                ];
                let packed = PackedLhs::new(kernel, &a, m, k);
                let panel_sets = [0..packed.panels(), packed.panels() / 2..packed.panels()];
                for (panels, start, relu) in panel_sets
                    .iter()
                    .flat_map(|p| starts.iter().map(move |s| (p.clone(), *s)))
                    .flat_map(|(p, s)| [(p.clone(), s, false), (p, s, true)])
                {
                    let mut c = c0.clone();
                    let first = panels.start * mr;
                    let ends = Ends { start, relu };
                    // SAFETY: `c` holds m rows of ldc ≥ width floats; one thread.
                    unsafe {
                        packed.multiply(
                            panels.clone(),
                            (&b, ldb),
                            width,
                            (c.as_mut_ptr(), ldc),
                            ends,
                        )
                    };
                    for i in 0..m {
                        for j in 0..ldc {
                            let got = c[i * ldc + j] as f64;
                            let before = c0[i * ldc + j] as f64;
                            if j >= width || i < first {
                                assert_eq!(got, before, "[{i}, {j}] outside the block written");
                                continue;
                            }
                            let base = match start {
                                Start::Output => before,
                                Start::Zero => 0.0,
                                Start::Bias { residual: None, .. } => bias[i] as f64,
                                Start::Bias { .. } => (bias[i] + residual[i * ldr + j]) as f64,
                            };
                            let sum = base
                                + (0..k)
                                    .map(|t| a[i * k + t] as f64 * b[t * ldb + j] as f64)
                                    .sum::<f64>();
                            let want = if relu && sum < 0.0 { 0.0 } else { sum };
                            let what = format!(
                                "{kernel:?} m {m} k {k} width {width} {start:?} relu {relu} \
                                 [{i}, {j}]: {got} vs {want}"
                            );
                            if want.is_nan() {
                                assert!(got.is_nan(), "{what}");
                            } else {
                                assert!((got - want).abs() <= 1e-5 * (k as f64).sqrt(), "{what}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// A product summed over groups of inner columns on the packed blocks
    /// ([`PackedLhs::multiply_inner`], B's rows of each group on their own) equals the product
    /// over all of them in one call, bit for bit; a range off the blocks is refused.
    #[test]
    fn products_over_groups_of_inner_columns_equal_one_product() {
        for kernel in PanelKernel::all() {
            let kc = kernel.shape().kc;
            let (m, k, width) = (24, 3 * kc + 5, 37);
            let a = filled(m * k, 6);
            let b = filled(k * width, 7);
            let bias = filled(m, 8);
            let packed = PackedLhs::new(kernel, &a, m, k);
            let ends = Ends {
                start: Start::Bias {
                    bias: &bias,
                    residual: None,
                },
                relu: true,
            };
            let mut whole = vec![0f32; m * width];
            // SAFETY: `whole` holds m rows of `width` floats; one thread.
            unsafe {
                packed.multiply(
                    0..packed.panels(),
                    (&b, width),
                    width,
                    (whole.as_mut_ptr(), width),
                    ends,
                )
            };
            // Groups kc, 2·kc and the rest (5 columns), each B on its own.
            let mut grouped = vec![f32::NAN; m * width];
            for (g, inner) in [0..kc, kc..3 * kc, 3 * kc..k].into_iter().enumerate() {
                let last = inner.end == k;
                let group_ends = Ends {
                    start: if g == 0 { ends.start } else { Start::Output },
                    relu: last,
                };
                let rows = b[inner.start * width..inner.end * width].to_vec();
                // SAFETY: as above.
                unsafe {
                    packed.multiply_inner(
                        0..packed.panels(),
                        inner,
                        (&rows, width),
                        width,
                        (grouped.as_mut_ptr(), width),
                        group_ends,
                    )
                };
            }
            assert_eq!(
                whole.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                grouped.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{kernel:?}"
            );
            let off_blocks = std::panic::catch_unwind(|| {
                let mut c = vec![0f32; m * width];
                // SAFETY: as above (it panics before touching `c`).
                unsafe {
                    packed.multiply_inner(
                        0..1,
                        1..kc,
                        (&b, width),
                        width,
                        (c.as_mut_ptr(), width),
                        ends,
                    )
                }
            });
            assert!(
                off_blocks.is_err(),
                "{kernel:?}: inner columns off the blocks"
            );
        }
    }
}
