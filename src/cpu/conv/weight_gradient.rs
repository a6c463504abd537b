//! The weight gradient of an im2col conv whose weights are small (a ResNet's stem, the 1 × 1
//! and first 3 × 3 downsampling convs): G = g · colsᵀ as one parallel region of column blocks.
//!
//! G is C_out × C_in·k·k, small, and its inner dimension is every output position of the batch
//! (401,408 for the stem of 32 images of 224 px): `sgemm` on all threads split that small
//! output among them and ran one im2col chunk at a time, and the stem's gradient alone took
//! about a twentieth of a 224 px training step. Here each task takes a block of output rows
//! from im2col to its product on one thread, its columns in cache, and adds to its split's G
//! (at most two splits per thread); the splits' G are summed at the end.

use rayon::prelude::*;

use super::folded::FoldedConv;
use super::geometry::Chunk;
use super::im2col::im2col_serial;
use super::maps::Maps;
use super::scratch::ColsBuffer;
use crate::cpu::kernels::sgemm::{Operand, sgemm_serial};

/// Weights (C_out × C_in·k·k floats) at most this many (1 MiB) take this path: each split
/// holds one G, and larger ones are better split by output than summed.
pub(crate) const SMALL_WEIGHTS: usize = 1 << 18;

/// Floats of im2col per task (1 MiB): they stay in a core's L2 cache.
const BLOCK_FLOATS: usize = 1 << 18;

/// Splits (each with its own G) per thread at most.
const SPLITS_PER_THREAD: usize = 2;

/// G (C_out × C_in·k·k) = `dz` (C_out × B·ho·wo) · colsᵀ for the conv's input `x`, where the
/// weights are at most [`SMALL_WEIGHTS`] floats; `None` otherwise.
pub(crate) fn small_weights(conv: &FoldedConv, x: &Maps, dz: &[f32]) -> Option<Vec<f32>> {
    let shape = &conv.shape;
    let (cout, kk) = (shape.cout, shape.patch());
    if cout * kk > SMALL_WEIGHTS {
        return None;
    }
    let plan = shape.plan(x);
    let (n, wo) = (plan.columns(), plan.wo.max(1));
    assert_eq!(dz.len(), cout * n, "weight gradient: output gradient size");
    let threads = rayon::current_num_threads().max(1);
    let output_rows = n / wo;
    let rows_per_block = (BLOCK_FLOATS / (kk * wo).max(1))
        .min(output_rows.div_ceil(SPLITS_PER_THREAD * threads))
        .max(1);
    let blocks = output_rows.div_ceil(rows_per_block);
    let per_split = blocks.div_ceil(SPLITS_PER_THREAD * threads).max(1);
    let g = (0..blocks)
        .into_par_iter()
        .with_min_len(per_split)
        .fold(
            || vec![0f32; cout * kk],
            |mut g, block| {
                let rows = block * rows_per_block..((block + 1) * rows_per_block).min(output_rows);
                let chunk = Chunk { index: 0, rows, wo };
                let (first, width) = (chunk.first_column(), chunk.width());
                let dz = Operand::rows(&dz[first..], n);
                if plan.direct {
                    // x itself is the column matrix (C_in × n).
                    let cols = Operand::transposed(&x.data[first..], n);
                    sgemm_serial((cout, kk, width), dz, cols, &mut g, kk, true);
                } else {
                    let mut cols = ColsBuffer::take();
                    cols.resize(kk * width, 0.0);
                    im2col_serial(x, shape, &plan, &chunk, 0..kk, &mut cols);
                    let cols = Operand::transposed(&cols, width);
                    sgemm_serial((cout, kk, width), dz, cols, &mut g, kk, true);
                }
                g
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0f32; cout * kk]);
    Some(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::conv::folded::tests::{folded, values};

    /// The blocked gradient equals the chunked `sgemm` one (`FoldedConv::for_each_chunk`) for
    /// a stride-2 stem-like conv, a 3 × 3 one, a direct 1 × 1 and a strided 1 × 1, in pools
    /// of 1, 2 and 7 threads; weights over the limit are left to the caller.
    #[test]
    fn blocked_gradient_equals_the_chunked_product() {
        for (k, stride, cin, cout, b, h, w) in [
            (7, 2, 3, 16, 2, 23, 19),
            (3, 1, 8, 12, 3, 9, 7),
            (1, 1, 16, 24, 2, 5, 6),
            (1, 2, 8, 16, 1, 9, 9),
        ] {
            let conv = folded(k, stride, cin, cout);
            let x = Maps {
                data: values(cin * b * h * w, 8),
                c: cin,
                b,
                h,
                w,
            };
            let n = conv.shape.plan(&x).columns();
            let kk = conv.shape.patch();
            let dz = values(cout * n, 9);
            let mut want = vec![0f32; cout * kk];
            conv.for_each_chunk(&x, |chunk, rhs, stride| {
                crate::cpu::kernels::sgemm::sgemm(
                    (cout, kk, chunk.width()),
                    Operand::rows(&dz[chunk.first_column()..], n),
                    Operand::transposed(rhs, stride),
                    &mut want,
                    kk,
                    chunk.index > 0,
                );
            });
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                let got = pool
                    .install(|| small_weights(&conv, &x, &dz))
                    .expect("small weights");
                for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (g - w).abs() <= 1e-4 * (1.0 + w.abs()) * (n as f32).sqrt(),
                        "k {k} stride {stride}, {threads} threads, at {i}: {g} vs {w}"
                    );
                }
            }
        }
        let big = folded(3, 1, 256, 256);
        let x = Maps {
            data: vec![0.0; 256 * 4],
            c: 256,
            b: 1,
            h: 2,
            w: 2,
        };
        assert!(small_weights(&big, &x, &vec![0.0; 256 * 4]).is_none());
    }
}
