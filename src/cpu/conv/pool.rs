//! The stem's 3x3 stride-2 max pooling (padding 1) and its backward.

use rayon::prelude::*;

use super::maps::Maps;

/// The taps k (of 0..3) of output position o whose input position 2·o + k − 1 lies in 0..len.
fn taps(o: usize, len: usize) -> std::ops::Range<usize> {
    let start = usize::from(o == 0);
    start..3.min(len + 1 - 2 * o).max(start)
}

/// 3x3 stride-2 max pooling with padding 1 (padding never takes part), with the position of
/// each maximum in its input plane (the first one on ties) for the backward. A NaN in a window
/// wins (the last NaN's position is kept), as in burn's flex backend and PyTorch.
pub(crate) fn max_pool(x: &Maps) -> (Maps, Vec<u32>) {
    let ho = (x.h + 2 - 3) / 2 + 1;
    let wo = (x.w + 2 - 3) / 2 + 1;
    let mut out = vec![0f32; x.c * x.b * ho * wo];
    let mut idx = vec![0u32; out.len()];
    out.par_chunks_mut(ho * wo)
        .zip(idx.par_chunks_mut(ho * wo))
        .enumerate()
        .for_each(|(plane, (dst, at))| {
            let src = &x.data[plane * x.h * x.w..(plane + 1) * x.h * x.w];
            for oy in 0..ho {
                // The taps inside the input: rows 2·oy − 1 + ky, columns 2·ox − 1 + kx.
                let ky = taps(oy, x.h);
                let (dst, at) = (&mut dst[oy * wo..][..wo], &mut at[oy * wo..][..wo]);
                for (ox, (d, a)) in dst.iter_mut().zip(at.iter_mut()).enumerate() {
                    let kx = taps(ox, x.w);
                    let (y0, x0) = (2 * oy + ky.start - 1, 2 * ox + kx.start - 1);
                    // Every window holds at least one input position: its first one starts.
                    let (mut m, mut best) = (src[y0 * x.w + x0], y0 * x.w + x0);
                    for iy in y0..(2 * oy + ky.end - 1) {
                        let row = iy * x.w;
                        for ix in x0..(2 * ox + kx.end - 1) {
                            let v = src[row + ix];
                            if v > m || v.is_nan() {
                                (m, best) = (v, row + ix);
                            }
                        }
                    }
                    *d = m;
                    *a = best as u32;
                }
            }
        });
    let pooled = Maps {
        data: out,
        c: x.c,
        b: x.b,
        h: ho,
        w: wo,
    };
    (pooled, idx)
}

/// [`max_pool`]'s values alone, for inference: the same maxima (NaN wins likewise; between
/// −0.0 and +0.0, and between NaN payloads, the pick may differ), without the positions, as a maximum of the window's rows and then of its columns, which vectorises
/// (the search for positions ran element by element: a tenth of a 32 px forward).
pub(crate) fn max_pool_values(x: &Maps) -> Maps {
    // The larger of two values, NaN where either is NaN.
    fn larger(a: f32, b: f32) -> f32 {
        if b > a || b.is_nan() { b } else { a }
    }
    let ho = (x.h + 2 - 3) / 2 + 1;
    let wo = (x.w + 2 - 3) / 2 + 1;
    let mut out = vec![0f32; x.c * x.b * ho * wo];
    // Per task: the maximum of the window's rows, and its even and odd columns apart.
    let scratch = || {
        (
            vec![0f32; x.w],
            vec![0f32; x.w.div_ceil(2)],
            vec![0f32; x.w / 2],
        )
    };
    out.par_chunks_mut(ho * wo).enumerate().for_each_init(
        scratch,
        |(rows_max, even, odd), (plane, dst)| {
            let src = &x.data[plane * x.h * x.w..(plane + 1) * x.h * x.w];
            for (oy, dst) in dst.chunks_exact_mut(wo).enumerate() {
                // Rows 2·oy − 1 + ky of the window that lie inside the input.
                let ky = taps(oy, x.h);
                let first = 2 * oy + ky.start - 1;
                rows_max.copy_from_slice(&src[first * x.w..][..x.w]);
                for iy in first + 1..2 * oy + ky.end - 1 {
                    let line = &src[iy * x.w..][..x.w];
                    rows_max
                        .iter_mut()
                        .zip(line)
                        .for_each(|(m, &v)| *m = larger(*m, v));
                }
                // Columns 2·ox − 1, 2·ox and 2·ox + 1 (those inside), in that order: odd
                // ox − 1, even ox and odd ox. Apart, they are three slices, and the interior
                // outputs one elementwise pass.
                for (i, pair) in rows_max.chunks(2).enumerate() {
                    even[i] = pair[0];
                    if let [_, v] = pair {
                        odd[i] = *v;
                    }
                }
                dst[0] = match x.w {
                    1 => even[0],
                    _ => larger(even[0], odd[0]),
                };
                // Outputs 1 .. w / 2 have all three columns; on an odd width the last one
                // has no column 2·ox + 1.
                let full = x.w / 2;
                if full > 1 {
                    let windows = odd[..full - 1]
                        .iter()
                        .zip(&even[1..full])
                        .zip(&odd[1..full]);
                    for (d, ((&a, &b), &c)) in dst[1..full].iter_mut().zip(windows) {
                        *d = larger(larger(a, b), c);
                    }
                }
                if x.w % 2 == 1 && wo > 1 {
                    dst[wo - 1] = larger(odd[wo - 2], even[wo - 1]);
                }
            }
        },
    );
    Maps {
        data: out,
        c: x.c,
        b: x.b,
        h: ho,
        w: wo,
    }
}

/// The gradient of the pooling's input: each output's gradient goes to its maximum.
pub(crate) fn max_pool_backward(
    d_out: &[f32],
    idx: &[u32],
    input: &Maps,
    out_plane: usize,
) -> Vec<f32> {
    let plane = input.h * input.w;
    let mut dx = vec![0f32; input.data.len()];
    dx.par_chunks_mut(plane)
        .zip(d_out.par_chunks(out_plane).zip(idx.par_chunks(out_plane)))
        .for_each(|(dst, (g, at))| {
            for (g, i) in g.iter().zip(at) {
                dst[*i as usize] += g;
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The values alone equal [`max_pool`]'s, NaN included, on odd and even sizes.
    #[test]
    fn pooled_values_equal_the_pooling_with_positions() {
        for (h, w) in [
            (1, 1),
            (2, 3),
            (7, 8),
            (16, 16),
            (5, 1),
            (3, 5),
            (4, 7),
            (6, 2),
            (9, 112),
        ] {
            let (c, b) = (3, 2);
            let mut data: Vec<f32> = (0..c * b * h * w)
                .map(|i| ((i as u32).wrapping_mul(2654435761) >> 8) as f32 / 1e6 - 8.0)
                .collect();
            data[h * w / 2] = f32::NAN;
            let x = Maps { data, c, b, h, w };
            let (want, _) = max_pool(&x);
            let got = max_pool_values(&x);
            assert_eq!((got.h, got.w), (want.h, want.w));
            for (g, v) in got.data.iter().zip(&want.data) {
                assert!(g == v || (g.is_nan() && v.is_nan()), "{h}x{w}: {g} vs {v}");
            }
        }
    }
}
