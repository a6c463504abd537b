//! Exact dot products of rows quantised to 16-bit integers: a 6 × 16 register-blocked
//! micro-kernel on AVX2's `vpmaddwd` (16 multiply-adds per instruction, twice the 8 of an f32
//! FMA), with 32-bit accumulators.
//!
//! The values come as *pair words*: one `i32` holds two consecutive `i16` of a row (the even
//! dimension in the low half), as `vpmaddwd` reads them. A row of D values is ⌈D / 2⌉ words,
//! the last one padded with a zero. The quantiser (`cpu::knn::screen`) bounds every row's L2 norm
//! below 46 340, so that by Cauchy–Schwarz no dot product, nor any partial sum of one, leaves
//! the `i32` range: the integer products are exact.
//!
//! The left operand A (queries) is packed into panels of 6 rows ([`pack_a`], shared with the
//! f32 kernel), the right operand (the bank) into panels of 16 rows ([`PackedBank`]), each
//! stored word-major.

use super::tile::{MR, NR, pack_panel};
#[cfg(test)]
use crate::cpu::isa::Level;
use crate::cpu::isa::{Avx2, Avx512Vnni, Kernel, Token};

/// Which integer micro-kernel computes the products: AVX-512 VNNI's `vpdpwssd`, AVX2's
/// `vpmaddwd` (FMA is not needed), or plain Rust. Where none is selected ([`Kernel::select`]),
/// the kNN search runs on f32 products alone.
pub(crate) type Int16Kernel = Kernel<Int16Isa>;

/// The instruction sets the integer kernel has intrinsics for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Int16Isa {
    /// `vpdpwssd` (AVX-512 VNNI, on 256-bit registers): a multiply-add of pairs in one
    /// instruction.
    Avx512Vnni(Avx512Vnni),
    /// `vpmaddwd` then `vpaddd` (AVX2).
    Avx2(Avx2),
}

impl Token for Int16Isa {
    fn detect() -> Option<Self> {
        Avx512Vnni::detect()
            .map(Self::Avx512Vnni)
            .or_else(|| Avx2::detect().map(Self::Avx2))
    }

    #[cfg(test)]
    fn all_detected() -> Vec<Self> {
        let avx2 = Avx2::detect().map(Self::Avx2);
        avx2.into_iter()
            .chain(Avx512Vnni::detect().map(Self::Avx512Vnni))
            .collect()
    }

    #[cfg(test)]
    fn level(self) -> Level {
        match self {
            Self::Avx512Vnni(token) => token.level(),
            Self::Avx2(token) => token.level(),
        }
    }
}

/// Pair words per pass over a micro-tile: one 16 × 256-word panel of B (16 KiB) stays in the
/// L1 cache while the panels of A stream past it.
const KC: usize = 256;

/// Packs two quantised values into one pair word (`a` in the low half).
#[inline]
pub(crate) fn pair(a: i16, b: i16) -> i32 {
    (a as u16 as u32 | ((b as u16 as u32) << 16)) as i32
}

/// The bank's quantised rows (n rows of `words` pair words) as ⌈n / 16⌉ panels of 16 rows,
/// each stored word-major (words × 16), the last panel padded with zero rows.
#[derive(Clone, Debug)]
pub(crate) struct PackedBank {
    panels: Vec<i32>,
    n: usize,
    words: usize,
    kernel: Int16Kernel,
}

impl PackedBank {
    /// Packs `rows` (n × `words` pair words, row-major) on the calling thread (the scorer
    /// packs its bank inside a `OnceLock` initialiser, where waiting on rayon tasks could let
    /// the thread pick up another search of the same scorer and re-enter it).
    pub(crate) fn from_rows(rows: &[i32], n: usize, words: usize, kernel: Int16Kernel) -> Self {
        let mut panels = vec![0; n.div_ceil(NR) * words * NR];
        if words > 0 {
            for (p, panel) in panels.chunks_exact_mut(words * NR).enumerate() {
                pack_panel(rows, n, words, p * NR, panel);
            }
        }
        Self {
            panels,
            n,
            words,
            kernel,
        }
    }

    /// Number of 16-row panels.
    pub(crate) fn panel_count(&self) -> usize {
        self.n.div_ceil(NR)
    }

    /// `c[r * ldc + j]` = (A · Bᵀ)[r, 16·`p0` + j] for the query rows packed in `a`
    /// ([`pack_a`], `a_panels` panels of 6) and the bank panels `p0..p0 + count`. Padding rows
    /// get products with zeros.
    ///
    /// # Panics
    /// When `a` or `c` is too short for the shape (a bug in the caller, never user input).
    pub(crate) fn product(
        &self,
        a: &[i32],
        a_panels: usize,
        (p0, count): (usize, usize),
        c: &mut [i32],
        ldc: usize,
    ) {
        let words = self.words;
        assert!(
            p0 + count <= self.panel_count(),
            "quantised product: panels of B"
        );
        assert!(
            a.len() >= a_panels * words * MR,
            "quantised product: A too short"
        );
        assert!(
            ldc >= count * NR && c.len() >= (a_panels * MR).saturating_sub(1) * ldc + count * NR,
            "quantised product: output too short"
        );
        for k0 in (0..words).step_by(KC) {
            let kc = KC.min(words - k0);
            for jp in 0..count {
                let b = &self.panels[((p0 + jp) * words + k0) * NR..][..kc * NR];
                for ip in 0..a_panels {
                    let a = &a[(ip * words + k0) * MR..][..kc * MR];
                    let out = &mut c[ip * MR * ldc + jp * NR..];
                    let acc = k0 > 0;
                    match self.kernel {
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: the token proves the CPU has AVX-512 VNNI and VL (and AVX2);
                        // the slices hold kc × 6, kc × 16 and 6 rows of `ldc` ≥ 16 words
                        // (asserted above).
                        Int16Kernel::Fast(Int16Isa::Avx512Vnni(_)) => unsafe {
                            x86::avx512_vnni(kc, a, b, (out, ldc), acc)
                        },
                        #[cfg(target_arch = "x86_64")]
                        // SAFETY: the token proves the CPU has AVX2; the slices as above.
                        Int16Kernel::Fast(Int16Isa::Avx2(_)) => unsafe {
                            x86::avx2(kc, a, b, (out, ldc), acc)
                        },
                        _ => portable_kernel(kc, a, b, (out, ldc), acc),
                    }
                }
            }
        }
    }
}

/// The two halves of a pair word.
#[inline]
fn halves(word: i32) -> [i32; 2] {
    [word as i16 as i32, (word >> 16) as i16 as i32]
}

/// The 6 × 16 micro-tile c (+)= a · b over `kc` pair words, in plain Rust.
fn portable_kernel(
    kc: usize,
    a: &[i32],
    b: &[i32],
    (c, ldc): (&mut [i32], usize),
    accumulate: bool,
) {
    let mut acc = [[0i32; NR]; MR];
    for (ak, bk) in a.chunks_exact(MR).zip(b.chunks_exact(NR)).take(kc) {
        for (row, &x) in acc.iter_mut().zip(ak) {
            let [x0, x1] = halves(x);
            for (v, &y) in row.iter_mut().zip(bk) {
                let [y0, y1] = halves(y);
                *v = v.wrapping_add(x0 * y0 + x1 * y1);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        let out = &mut c[r * ldc..][..NR];
        for (o, v) in out.iter_mut().zip(row) {
            *o = if accumulate { o.wrapping_add(*v) } else { *v };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::{
        __m256i, _mm256_add_epi32, _mm256_broadcast_ss, _mm256_castps_si256, _mm256_dpwssd_epi32,
        _mm256_loadu_si256, _mm256_madd_epi16, _mm256_setzero_si256, _mm256_storeu_si256,
    };

    use super::{MR, NR};

    /// The 6 × 16 micro-tile c (+)= a · b over `kc` pair words with twelve 8-lane
    /// accumulators (per word two loads of b, six broadcasts of a, twelve multiply-adds of
    /// pairs `acc + x · b`), for the target features given, the multiply-add written as the
    /// closure-like `|acc, x, b| expr`.
    macro_rules! tile_kernel {
        ($(#[$doc:meta])* $name:ident, $features:literal, |$acc:ident, $x:ident, $b:ident| $madd:expr) => {
            $(#[$doc])*
            ///
            /// # Safety
            /// The CPU must have the target features; `a` must hold kc × 6 words, `b`
            /// kc × 16 words, and `c` six rows of 16 words `ldc` apart.
            #[target_feature(enable = $features)]
            pub(super) unsafe fn $name(
                kc: usize,
                a: &[i32],
                b: &[i32],
                (c, ldc): (&mut [i32], usize),
                accumulate: bool,
            ) {
                debug_assert!(a.len() >= kc * MR && b.len() >= kc * NR);
                debug_assert!(ldc >= NR && c.len() >= (MR - 1) * ldc + NR);
                let (mut pa, mut pb) = (a.as_ptr(), b.as_ptr());
                let mut acc: [[__m256i; 2]; MR] = [[_mm256_setzero_si256(); 2]; MR];
                // SAFETY: (the whole body) the reads stay within kc × 6 words of `a` and
                // kc × 16 words of `b`, the writes within six rows of 16 words `ldc` apart in
                // `c` (the caller's contract). The broadcast reads a word through an f32
                // pointer: a plain 4-byte load, whose bits are only ever used as integers.
                unsafe {
                    for _ in 0..kc {
                        let b0 = _mm256_loadu_si256(pb.cast::<__m256i>());
                        let b1 = _mm256_loadu_si256(pb.add(8).cast::<__m256i>());
                        for (r, row) in acc.iter_mut().enumerate() {
                            let x = _mm256_castps_si256(_mm256_broadcast_ss(
                                &*pa.add(r).cast::<f32>(),
                            ));
                            for (half, b) in [b0, b1].into_iter().enumerate() {
                                let ($acc, $x, $b) = (row[half], x, b);
                                row[half] = $madd;
                            }
                        }
                        pa = pa.add(MR);
                        pb = pb.add(NR);
                    }
                    let pc = c.as_mut_ptr();
                    for (r, row) in acc.iter().enumerate() {
                        for (half, v) in row.iter().enumerate() {
                            let out = pc.add(r * ldc + 8 * half).cast::<__m256i>();
                            let v = if accumulate {
                                _mm256_add_epi32(_mm256_loadu_si256(out), *v)
                            } else {
                                *v
                            };
                            _mm256_storeu_si256(out, v);
                        }
                    }
                }
            }
        };
    }

    tile_kernel!(
        /// On AVX2: a `vpmaddwd` and an add per multiply-add.
        avx2,
        "avx2",
        |acc, x, b| _mm256_add_epi32(acc, _mm256_madd_epi16(x, b))
    );

    tile_kernel!(
        /// On AVX-512 VNNI (256-bit forms, AVX-512 VL): one `vpdpwssd` per multiply-add.
        avx512_vnni,
        "avx2,avx512f,avx512vl,avx512vnni",
        |acc, x, b| _mm256_dpwssd_epi32(acc, x, b)
    );
}

#[cfg(test)]
mod tests {
    use super::super::tile::pack_a;
    use super::*;
    use crate::cpu::isa::report_tested;

    /// Pair words whose halves are spread over the whole i16 range (but never −32768, which
    /// the quantiser does not produce).
    fn filled(len: usize, seed: u32) -> Vec<i32> {
        let half = |i: u32| {
            let v = (i.wrapping_mul(2654435761).wrapping_add(seed) >> 16) as i32 % 32768;
            (v - 16384) as i16
        };
        (0..len as u32)
            .map(|i| pair(half(2 * i), half(2 * i + 1)))
            .collect()
    }

    #[test]
    fn pair_words_round_trip() {
        for (a, b) in [(0, 0), (1, -1), (-32767, 32767), (12345, -2)] {
            assert_eq!(halves(pair(a, b)), [a as i32, b as i32]);
        }
    }

    /// Every kernel this CPU has equals the naive product exactly, on shapes with partial
    /// panels on both sides and a partial last block of pair words.
    #[test]
    fn products_equal_the_naive_product() {
        let kernels = Int16Kernel::all();
        report_tested("int16 kernel", &kernels);
        for (m, n, words) in [(1, 1, 1), (13, 37, 300), (6, 16, 256), (7, 70, 600)] {
            // Small enough values that no sum leaves the i32 range.
            let shrink = |v: Vec<i32>| -> Vec<i32> {
                v.into_iter()
                    .map(|w| {
                        let [x, y] = halves(w);
                        pair((x / 16) as i16, (y / 16) as i16)
                    })
                    .collect()
            };
            let a = shrink(filled(m * words, 1));
            let bt = shrink(filled(n * words, 2));
            for &kernel in &kernels {
                let packed_a = pack_a(&a, m, words);
                let a_panels = m.div_ceil(MR);
                let packed = PackedBank::from_rows(&bt, n, words, kernel);
                let panels = packed.panel_count();
                let ldc = panels * NR + 3;
                let mut c = vec![i32::MIN; a_panels * MR * ldc];
                packed.product(&packed_a, a_panels, (0, panels), &mut c, ldc);
                for i in 0..m {
                    for j in 0..n {
                        let want: i64 = (0..words)
                            .map(|t| {
                                let [x0, x1] = halves(a[i * words + t]);
                                let [y0, y1] = halves(bt[j * words + t]);
                                x0 as i64 * y0 as i64 + x1 as i64 * y1 as i64
                            })
                            .sum();
                        assert_eq!(
                            c[i * ldc + j] as i64,
                            want,
                            "{kernel:?} {m}x{n}x{words} [{i}, {j}]"
                        );
                    }
                }
                // A second call over the last panel only writes those columns.
                if panels > 1 {
                    let mut tail = vec![i32::MIN; a_panels * MR * NR];
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
