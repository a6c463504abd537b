//! im2col and its adjoint col2im: a conv's input positions laid out as the columns of a
//! matrix product, for the output rows of one chunk at a time.

use rayon::prelude::*;

use super::geometry::{Chunk, ConvPlan, ConvShape};
use super::maps::Maps;
#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::{Avx2, Token};

/// `cols` = rows (ci, kh, kw) × columns (the chunk's output rows of all images, `wo`
/// positions each), for the conv `shape` of `x` planned as `plan`.
pub(crate) fn im2col(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    cols: &mut [f32],
) {
    cols.par_chunks_mut(chunk.width())
        .enumerate()
        .for_each(|(row, dst)| im2col_row(x, shape, plan, chunk, row, dst));
}

/// Rows `rows` of [`im2col`] on the calling thread (row `rows.start` first in `cols`), for
/// callers that spread blocks of columns or rows over rayon themselves.
///
/// Compiled a second time for AVX2, taken where the CPU has it: the copies and masks are
/// then 256 bits wide instead of the baseline's 128.
pub(crate) fn im2col_serial(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    rows: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    #[cfg(target_arch = "x86_64")]
    if Avx2::detect().is_some() {
        // SAFETY: the token proves the CPU has AVX2; the body is safe code.
        return unsafe { im2col_serial_avx2(x, shape, plan, chunk, rows, cols) };
    }
    im2col_serial_body(x, shape, plan, chunk, rows, cols)
}

/// [`im2col_serial`]'s body compiled for AVX2.
///
/// # Safety
/// The CPU must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn im2col_serial_avx2(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    rows: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    im2col_serial_body(x, shape, plan, chunk, rows, cols)
}

/// [`im2col_serial`]'s work, inlined into each instruction set's copy.
#[inline(always)]
fn im2col_serial_body(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    rows: std::ops::Range<usize>,
    cols: &mut [f32],
) {
    let width = chunk.width();
    let (k, p) = (shape.k, shape.pad);
    let cols = &mut cols[..rows.len() * width];
    if !(shape.stride == 1 && plan.ho == x.h && plan.wo == x.w) || width == 0 {
        cols.chunks_mut(width.max(1))
            .zip(rows)
            .for_each(|(dst, row)| im2col_row(x, shape, plan, chunk, row, dst));
        return;
    }
    // A same-size conv: each row is its channel shifted by one offset per tap (see
    // `same_size_row`), with the positions that read outside their image set to zero. Those
    // positions depend on the tap alone, so they are found once per tap, as a mask of bits,
    // and each row is one pass that vectorises: a copy and an AND (which keeps NaN where it
    // is read, and reads none where it is not), instead of a copy and a loop over image rows.
    let (h, w, r0) = (x.h, x.w, chunk.rows.start);
    let mut masks = vec![0u32; k * k * width];
    for (tap, mask) in masks.chunks_exact_mut(width).enumerate() {
        let (dy, dx) = (
            (tap / k) as isize - p as isize,
            (tap % k) as isize - p as isize,
        );
        let mut oy = r0 % h;
        for line in mask.chunks_exact_mut(w) {
            if (0..h as isize).contains(&(oy as isize + dy)) {
                for (ox, m) in line.iter_mut().enumerate() {
                    let inside = (0..w as isize).contains(&(ox as isize + dx));
                    *m = if inside { u32::MAX } else { 0 };
                }
            }
            oy += 1;
            if oy == h {
                oy = 0;
            }
        }
    }
    let plane = x.plane();
    for (dst, row) in cols.chunks_mut(width).zip(rows) {
        let (ci, tap) = (row / (k * k), row % (k * k));
        let src = &x.data[ci * plane..(ci + 1) * plane];
        let mask = &masks[tap * width..][..width];
        let offset = (r0 * w + (tap / k) * w + tap % k) as isize - (p * w + p) as isize;
        let len = width as isize;
        let start = (-offset).clamp(0, len) as usize;
        let end = (src.len() as isize - offset).clamp(start as isize, len) as usize;
        dst[..start].fill(0.0);
        dst[end..].fill(0.0);
        if end > start {
            let from = (start as isize + offset) as usize;
            let inputs = &src[from..from + (end - start)];
            for ((v, x), m) in dst[start..end]
                .iter_mut()
                .zip(inputs)
                .zip(&mask[start..end])
            {
                *v = f32::from_bits(x.to_bits() & m);
            }
        }
    }
}

/// Row `row` = (ci, kh, kw) of [`im2col`]: `dst` holds the chunk's columns.
#[inline(always)]
fn im2col_row(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    row: usize,
    dst: &mut [f32],
) {
    let (k, s, p) = (shape.k, shape.stride, shape.pad);
    let (ho, wo, r0) = (plan.ho, plan.wo, chunk.rows.start);
    let plane = x.plane();
    let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
    let src = &x.data[ci * plane..(ci + 1) * plane];
    if s == 1 && ho == x.h && wo == x.w {
        return same_size_row(src, dst, (ky, kx, p), (x.h, x.w), r0);
    }
    // The same output columns read inside the input on every row of this (ci, ky, kx).
    let (lo, hi) = inside_columns(kx, s, p, x.w, wo);
    // Where hi > lo, lo·s + kx ≥ p.
    let first = (lo * s + kx).saturating_sub(p);
    let (mut img, mut oy) = (r0 / ho, r0 % ho);
    for out_row in dst.chunks_exact_mut(wo) {
        let iy = (oy * s + ky).wrapping_sub(p);
        if iy >= x.h {
            out_row.fill(0.0);
        } else {
            let line = &src[(img * x.h + iy) * x.w..][..x.w];
            out_row[..lo].fill(0.0);
            out_row[hi..].fill(0.0);
            // Input column of output column ox: ox·s + kx − p. An element-wise loop rather
            // than `copy_from_slice`: the runs are short on small maps, where a call to
            // memmove per run cost more than the copy.
            if hi > lo {
                if s == 1 {
                    let inputs = &line[first..first + hi - lo];
                    out_row[lo..hi]
                        .iter_mut()
                        .zip(inputs)
                        .for_each(|(v, x)| *v = *x);
                } else if s == 2 {
                    // Every other input: the first of each pair, so that it vectorises (with
                    // shuffles) where a strided loop runs element by element.
                    let dst = &mut out_row[lo..hi];
                    let pairs = line[first..].chunks_exact(2);
                    let paired = pairs.len().min(dst.len());
                    for (v, pair) in dst[..paired].iter_mut().zip(pairs) {
                        *v = pair[0];
                    }
                    if paired < dst.len() {
                        dst[paired] = line[first + 2 * paired];
                    }
                } else {
                    let inputs = line[first..].iter().step_by(s);
                    for (v, x) in out_row[lo..hi].iter_mut().zip(inputs) {
                        *v = *x;
                    }
                }
            }
        }
        oy += 1;
        if oy == ho {
            (img, oy) = (img + 1, 0);
        }
    }
}

/// One row (ci, ky, kx) of im2col for a stride-1 conv whose output has its input's size
/// (h × w, padding p): `src` is channel ci of all images (B·h·w), `dst` the output rows from
/// `r0` on (of all images, w positions each).
///
/// With w = wo and h = ho, output position j of the chunk reads input position
/// r0·w + j + (ky − p)·w + (kx − p) of the channel, the same offset for every position of every
/// image. So the row is one contiguous copy, after which the positions that read outside
/// their image (top or bottom rows for ky ≠ p, side columns for kx ≠ p) are set to zero. On
/// small maps this replaced a loop over output rows whose per-row work cost more than the
/// copying (a fifth of a ResNet-18 forward at 32 px).
#[inline(always)]
fn same_size_row(
    src: &[f32],
    dst: &mut [f32],
    (ky, kx, p): (usize, usize, usize),
    (h, w): (usize, usize),
    r0: usize,
) {
    // dst[j] = src[j + offset], offset = r0·w + (ky − p)·w + (kx − p), where inside src.
    let offset = (r0 * w + ky * w + kx) as isize - (p * w + p) as isize;
    let len = dst.len() as isize;
    let start = (-offset).clamp(0, len);
    let end = (src.len() as isize - offset).clamp(start, len);
    let (start, end) = (start as usize, end as usize);
    dst[..start].fill(0.0);
    dst[end..].fill(0.0);
    if end > start {
        let from = (start as isize + offset) as usize;
        dst[start..end].copy_from_slice(&src[from..from + (end - start)]);
    }
    // Output rows (global over images: r = img·h + oy) reading outside their image.
    let (dy, dx) = (ky as isize - p as isize, kx as isize - p as isize);
    // The rows oy (of h) that read inside: oy + dy in 0..h.
    let (top, bottom) = (
        (-dy).max(0) as usize,
        (h as isize - dy.max(0)).max(0) as usize,
    );
    let mut oy = r0 % h;
    for line in dst.chunks_exact_mut(w) {
        if oy < top || oy >= bottom {
            line.fill(0.0);
        } else if dx < 0 {
            line[..((-dx) as usize).min(w)].fill(0.0);
        } else if dx > 0 {
            line[w.saturating_sub(dx as usize)..].fill(0.0);
        }
        oy += 1;
        if oy == h {
            oy = 0;
        }
    }
}

/// The output columns `lo..hi` whose input column ox·s + kx − p lies inside 0..w.
pub(crate) fn inside_columns(kx: usize, s: usize, p: usize, w: usize, wo: usize) -> (usize, usize) {
    let lo = p.saturating_sub(kx).div_ceil(s).min(wo);
    // The largest ox with ox·s + kx − p ≤ w − 1, plus one.
    let hi = if w + p > kx {
        ((w - 1 + p - kx) / s + 1).min(wo)
    } else {
        0
    };
    (lo, hi.max(lo))
}

/// Adds the columns (rows (ci, kh, kw) × the chunk's output rows) back onto the input
/// positions of `dx` they were read from: the adjoint of [`im2col`].
pub(crate) fn col2im(
    cols: &[f32],
    dx: &mut Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
) {
    let (k, s, p) = (shape.k, shape.stride, shape.pad);
    let (ho, wo, r0) = (plan.ho, plan.wo, chunk.rows.start);
    let width = chunk.width();
    let (h, w) = (dx.h, dx.w);
    let plane = dx.plane();
    dx.data
        .par_chunks_mut(plane)
        .enumerate()
        .for_each(|(ci, dst)| {
            for ky in 0..k {
                for kx in 0..k {
                    let row = &cols[((ci * k + ky) * k + kx) * width..][..width];
                    // The same output columns land inside the input on every row.
                    let (lo, hi) = inside_columns(kx, s, p, w, wo);
                    if hi == lo {
                        continue;
                    }
                    let first = lo * s + kx - p;
                    let (mut img, mut oy) = (r0 / ho, r0 % ho);
                    for src in row.chunks_exact(wo) {
                        let iy = (oy * s + ky).wrapping_sub(p);
                        if iy < h {
                            let line = &mut dst[(img * h + iy) * w..][..w];
                            if s == 1 {
                                line[first..first + hi - lo]
                                    .iter_mut()
                                    .zip(&src[lo..hi])
                                    .for_each(|(t, v)| *t += v);
                            } else {
                                let targets = line[first..].iter_mut().step_by(s);
                                for (t, v) in targets.zip(&src[lo..hi]) {
                                    *t += v;
                                }
                            }
                        }
                        oy += 1;
                        if oy == ho {
                            (img, oy) = (img + 1, 0);
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// im2col by its definition, element by element: the reference.
    fn naive(x: &Maps, shape: &ConvShape, plan: &ConvPlan, chunk: &Chunk) -> Vec<f32> {
        let (k, s, p) = (shape.k, shape.stride, shape.pad);
        let mut out = Vec::new();
        for ci in 0..x.c {
            for ky in 0..k {
                for kx in 0..k {
                    for r in chunk.rows.clone() {
                        let (img, oy) = (r / plan.ho, r % plan.ho);
                        for ox in 0..plan.wo {
                            let (iy, ix) = (
                                (oy * s + ky) as isize - p as isize,
                                (ox * s + kx) as isize - p as isize,
                            );
                            let inside =
                                (0..x.h as isize).contains(&iy) && (0..x.w as isize).contains(&ix);
                            out.push(if inside {
                                x.data[((ci * x.b + img) * x.h + iy as usize) * x.w + ix as usize]
                            } else {
                                0.0
                            });
                        }
                    }
                }
            }
        }
        out
    }

    /// Both paths (stride 1 on maps of the output's size, and the general one), threaded and
    /// serial, equal the definition, for chunks that start and end inside an image.
    #[test]
    fn im2col_equals_its_definition() {
        for (k, s) in [(1, 1), (3, 1), (3, 2), (5, 1), (7, 2), (7, 1)] {
            for (h, w) in [(1, 1), (2, 2), (2, 5), (4, 3), (9, 7)] {
                let (c, b) = (2, 3);
                let shape = ConvShape {
                    cin: c,
                    cout: 1,
                    k,
                    stride: s,
                    pad: k / 2,
                };
                let x = Maps {
                    data: (0..c * b * h * w).map(|i| i as f32 + 1.0).collect(),
                    c,
                    b,
                    h,
                    w,
                };
                let plan = shape.plan(&x);
                for per in [1, 2, plan.rows_total] {
                    let plan = ConvPlan {
                        rows_per_chunk: per,
                        ..plan
                    };
                    for chunk in plan.chunks() {
                        let want = naive(&x, &shape, &plan, &chunk);
                        let mut cols = vec![f32::NAN; shape.patch() * chunk.width()];
                        im2col(&x, &shape, &plan, &chunk, &mut cols);
                        assert_eq!(cols, want, "k {k} s {s} {h}x{w} chunk {:?}", chunk.rows);
                        let mut serial = vec![f32::NAN; shape.patch() * chunk.width()];
                        let all = 0..shape.patch();
                        im2col_serial(&x, &shape, &plan, &chunk, all, &mut serial);
                        assert_eq!(serial, want, "serial: k {k} s {s} {h}x{w} {:?}", chunk.rows);
                        // A range of rows alone: those rows of the whole.
                        let (width, some) = (chunk.width(), 1..shape.patch().min(4));
                        let mut part = vec![f32::NAN; some.len() * width];
                        im2col_serial(&x, &shape, &plan, &chunk, some.clone(), &mut part);
                        assert_eq!(part, want[some.start * width..some.end * width]);
                    }
                }
            }
        }
    }

    #[test]
    fn inside_columns_are_exactly_the_in_bounds_ones() {
        for k in [1, 3, 7] {
            let p = k / 2;
            for s in [1, 2, 3] {
                for w in 1..12 {
                    let wo = (w + 2 * p - k) / s + 1;
                    for kx in 0..k {
                        let inside: Vec<usize> = (0..wo)
                            .filter(|ox| (ox * s + kx) >= p && ox * s + kx - p < w)
                            .collect();
                        let (lo, hi) = super::inside_columns(kx, s, p, w, wo);
                        assert_eq!(
                            (lo..hi).collect::<Vec<_>>(),
                            inside,
                            "k{k} s{s} w{w} kx{kx}"
                        );
                    }
                }
            }
        }
    }
}
