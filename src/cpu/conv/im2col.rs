//! im2col and its adjoint col2im: a conv's input positions laid out as the columns of a
//! matrix product, for the output rows of one chunk at a time.

use rayon::prelude::*;

use super::geometry::{Chunk, ConvPlan, ConvShape};
use super::maps::Maps;

/// `cols` = rows (ci, kh, kw) × columns (the chunk's output rows of all images, `wo`
/// positions each), for the conv `shape` of `x` planned as `plan`.
pub(crate) fn im2col(
    x: &Maps,
    shape: &ConvShape,
    plan: &ConvPlan,
    chunk: &Chunk,
    cols: &mut [f32],
) {
    let (k, s, p) = (shape.k, shape.stride, shape.pad);
    let (ho, wo, r0) = (plan.ho, plan.wo, chunk.rows.start);
    let width = chunk.width();
    let plane = x.plane();
    cols.par_chunks_mut(width)
        .enumerate()
        .for_each(|(row, dst)| {
            let (ci, ky, kx) = (row / (k * k), (row / k) % k, row % k);
            let src = &x.data[ci * plane..(ci + 1) * plane];
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
                    // Input column of output column ox: ox·s + kx − p. An element-wise loop
                    // rather than `copy_from_slice`: the runs are short on small maps, where a
                    // call to memmove per run cost more than the copy.
                    if hi > lo {
                        if s == 1 {
                            let inputs = &line[first..first + hi - lo];
                            out_row[lo..hi]
                                .iter_mut()
                                .zip(inputs)
                                .for_each(|(v, x)| *v = *x);
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
        });
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
