//! 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 block
//! of outputs comes from a 4×4 block of inputs with 16 multiplications per channel pair
//! instead of 36, so the products ([`sgemm`], 16 of them, one per position of the 4×4
//! transformed block) are 2.25 times smaller than im2col's. The ResNet engines use it for a
//! ResNet's 3x3 stride-1 convs on maps of 12x12 and larger ([`pays`]): the forward pass, and in
//! training the input gradient (the kernels turned over, [`WinogradFilter::adjoint`]) and the
//! kernel gradient ([`kernel_gradient`], the adjoint in the kernels). Results equal im2col's to
//! float rounding (the tests below compare the two).
//!
//! With d a 4×4 input block and g a 3×3 kernel, the 2×2 output block is
//! Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A, with
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1] and
//! Aᵀ = [1 1 1 0; 0 1 −1 −1].

use rayon::prelude::*;

use super::blocked::{GridTask, SharedOutput, TaskGrid};
use super::maps::Maps;
use super::scratch::ColsBuffer;
use crate::cpu::kernels::prepacked::{PackedLhs, PanelKernel};
use crate::cpu::kernels::sgemm::{Operand, sgemm, sgemm_serial};

/// Largest transformed-input plus product buffer, in floats (32 MiB, as im2col's): wider
/// convs are computed in chunks of tiles.
const BUFFER_FLOATS: usize = 8 << 20;

/// A 3x3 kernel bank transformed for F(2×2, 3×3): U\[ξ\] (C_out × C_in) for each of the 16
/// positions ξ of the 4×4 block.
pub(crate) struct WinogradFilter {
    u: Vec<f32>,
    /// The 16 U\[ξ\] packed for the panel kernel, where this CPU runs one.
    packed: Option<Vec<PackedLhs>>,
    cout: usize,
    cin: usize,
}

impl WinogradFilter {
    /// From weights C_out × C_in × 3 × 3, row-major.
    pub(crate) fn new(w: &[f32], cout: usize, cin: usize) -> Self {
        Self::transform(cout, cin, |o, i, k| w[(o * cin + i) * 9 + k])
    }

    /// The filter of the convolution's adjoint (C_in outputs from C_out inputs): each kernel
    /// turned by 180°, input and output channels swapped. Its output is the gradient with
    /// respect to the input of the convolution that `w` (C_out × C_in × 3 × 3) defines.
    pub(crate) fn adjoint(w: &[f32], cout: usize, cin: usize) -> Self {
        Self::transform(cin, cout, |i, o, k| w[(o * cin + i) * 9 + 8 - k])
    }

    /// U = G g Gᵀ for every kernel g(o, i) of an `outs` × `ins` bank; `kernel(o, i, k)` is
    /// tap k (row-major 3×3) of the kernel from input i to output o.
    fn transform(
        outs: usize,
        ins: usize,
        kernel: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Self {
        let plane = outs * ins;
        // Kernel by kernel (16 values each) on every thread, then regrouped by ξ: a training
        // step transforms every filter anew, ResNet-18's last stage 4 M values per conv.
        let mut by_kernel = vec![0f32; 16 * plane];
        by_kernel
            .par_chunks_mut(16 * ins)
            .enumerate()
            .for_each(|(o, row)| {
                for (i, dst) in row.chunks_exact_mut(16).enumerate() {
                    let g: [f32; 9] = std::array::from_fn(|k| kernel(o, i, k));
                    // G g: 4 × 3.
                    let mut t = [[0f32; 3]; 4];
                    for c in 0..3 {
                        let (g0, g1, g2) = (g[c], g[3 + c], g[6 + c]);
                        t[0][c] = g0;
                        t[1][c] = 0.5 * (g0 + g1 + g2);
                        t[2][c] = 0.5 * (g0 - g1 + g2);
                        t[3][c] = g2;
                    }
                    // (G g) Gᵀ: 4 × 4.
                    for (r, row) in t.iter().enumerate() {
                        dst[r * 4] = row[0];
                        dst[r * 4 + 1] = 0.5 * (row[0] + row[1] + row[2]);
                        dst[r * 4 + 2] = 0.5 * (row[0] - row[1] + row[2]);
                        dst[r * 4 + 3] = row[2];
                    }
                }
            });
        let mut u = vec![0f32; 16 * plane];
        u.par_chunks_mut(plane).enumerate().for_each(|(xi, ui)| {
            for (v, kernel) in ui.iter_mut().zip(by_kernel.chunks_exact(16)) {
                *v = kernel[xi];
            }
        });
        let packed = PanelKernel::select().map(|kernel| {
            u.par_chunks_exact(plane)
                .map(|ui| PackedLhs::new(kernel, ui, outs, ins))
                .collect()
        });
        Self {
            u,
            packed,
            cout: outs,
            cin: ins,
        }
    }
}

/// Floats of M\[ξ\] per task of [`packed_products`] (1 MiB): they stay in a core's L2 cache.
const TASK_FLOATS: usize = 1 << 18;

/// M\[ξ\] (C_out × nt) = U\[ξ\] · V\[ξ\] (C_in × nt) for the 16 ξ, in one parallel region:
/// one task per ξ and block of tiles, each on the panel kernel with V read in place. `v` and
/// `m` hold their rows 16·nt apart, ξ's columns from ξ·nt.
fn packed_products(packed: &[PackedLhs], nt: usize, v: &[f32], m: &mut [f32]) {
    let cout = packed[0].rows();
    let nr = packed[0].kernel().shape().nr;
    let per_task = (TASK_FLOATS / cout.max(1) / nr * nr).clamp(nr, nt.next_multiple_of(nr));
    let blocks = nt.div_ceil(per_task);
    let ld = 16 * nt;
    assert!(m.len() >= cout * ld, "winograd: scratch size");
    let shared = SharedOutput(m.as_mut_ptr());
    (0..16 * blocks).into_par_iter().for_each(|task| {
        let (xi, block) = (task / blocks, task % blocks);
        let cols = block * per_task..((block + 1) * per_task).min(nt);
        // `m` holds cout rows of 16·nt floats; this task alone touches columns ξ·nt + `cols`
        // of every row (the tasks cut the 16 × nt columns without overlap).
        let at = shared.at(xi * nt + cols.start);
        for r in 0..cout {
            // SAFETY: row r, this task's columns.
            unsafe { std::ptr::write_bytes(at.add(r * ld), 0, cols.len()) };
        }
        let b = &v[xi * nt + cols.start..];
        // SAFETY: this task's columns of every row, zeroed above.
        unsafe { packed[xi].multiply(0..packed[xi].panels(), (b, ld), cols.len(), (at, ld)) };
    });
}

/// Whether F(2×2, 3×3) pays for a batch of `b` h × w maps: its 16 multiplications per 2×2
/// tile (tiles overhanging an odd map included) must be at most two thirds of im2col's 9 per
/// output, and the batch must hold enough tiles for the 16 products to be wide: 12 × 12 maps
/// and larger, or even maps with 256 tiles or more in the batch. Measured with
/// `examples/throughput` on a 2-core Zen 4: the 8 × 8 and 4 × 4 maps of 32 px images at batch
/// 64 gain 9% in inference. ResNet-18's 7 × 7 maps stay on im2col: at batch 32 they gain 7-10%
/// in inference, but lose 30% in a training step (which transforms its filters anew each
/// step, and whose kernel gradient pays for the overhanging tiles twice), and at batch 1 they
/// lose a quarter (the transformed weights, 16/9 of the conv's, read for 16 tiles).
pub(crate) fn pays(b: usize, h: usize, w: usize) -> bool {
    let tiles = h.div_ceil(2) * w.div_ceil(2);
    let even = h % 2 == 0 && w % 2 == 0;
    16 * tiles <= 6 * h * w && (h * w >= 144 || (even && b.saturating_mul(tiles) >= 256))
}

/// The shape of channel-major maps (C × B × H × W) read from a plain slice.
#[derive(Clone, Copy)]
pub(crate) struct Shape {
    pub(crate) c: usize,
    pub(crate) b: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

impl Shape {
    pub(crate) fn of(x: &Maps) -> Self {
        Self {
            c: x.c,
            b: x.b,
            h: x.h,
            w: x.w,
        }
    }

    fn plane(&self) -> usize {
        self.b * self.h * self.w
    }
}

/// `out` (C_out × B·H·W, channel-major like `x`) += the 3x3, stride-1, padding-1 convolution
/// of `x` (shape `x`, values `data`) with the filter (no bias).
pub(crate) fn accumulate(data: &[f32], x: Shape, f: &WinogradFilter, out: &mut [f32]) {
    assert_eq!(data.len(), x.c * x.plane(), "winograd: input size");
    assert_eq!(x.c, f.cin, "winograd: input channels");
    assert_eq!(out.len(), f.cout * x.plane(), "winograd: output size");
    by_chunks(data, x, f.cout, |rows, nt, v, m| {
        // M[ξ] (C_out × nt) = U[ξ] (C_out × C_in) · V[ξ] (C_in × nt)
        if let Some(packed) = &f.packed {
            packed_products(packed, nt, v, m);
            return transform_output(m, x, rows, out);
        }
        for xi in 0..16 {
            sgemm(
                (f.cout, nt, f.cin),
                Operand::rows(&f.u[xi * f.cout * f.cin..], f.cin),
                Operand::rows(&v[xi * nt..], 16 * nt),
                &mut m[xi * nt..],
                16 * nt,
                false,
            );
        }
        transform_output(m, x, rows, out);
    });
}

/// Floats of one task's transformed input and products in [`forward`] (1 MiB): they stay
/// in a core's L2 cache from the input transform to the output transform.
const FUSED_TASK_FLOATS: usize = 1 << 18;

/// Tasks per thread at least in [`forward`], where the map has that many tile rows.
const TASKS_PER_THREAD: usize = 2;

/// The 3x3, stride-1, padding-1 convolution of `x` (shape `x`, values `data`) with the filter,
/// plus `bias` per output channel, plus `residual` (C_out × B·H·W) where given, then ReLU
/// (NaN kept) where asked: the C_out × B·H·W output, in one parallel region. Each task owns a
/// block of tile rows and a group of output channels and takes them from the input transform
/// through the 16 products on the panel kernel to the output transform, its V and M in its
/// thread's buffer (in cache), writing its part of the output once. `None` where the filter
/// has no panel-kernel form (this CPU runs none): then [`accumulate`].
///
/// Before, the same work was five passes over the whole map (output initialisation, input
/// transform, products, output transform, ReLU), each a parallel region and each reading or
/// writing all of V or M (16 times the map) in memory: at batch 1 that cost about as much as
/// the products.
pub(crate) fn forward(
    data: &[f32],
    x: Shape,
    f: &WinogradFilter,
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Option<Vec<f32>> {
    let packed = f.packed.as_ref()?;
    let (cin, cout, plane) = (x.c, f.cout, x.plane());
    assert_eq!(data.len(), cin * plane, "winograd: input size");
    assert_eq!(cin, f.cin, "winograd: input channels");
    assert_eq!(bias.len(), cout, "winograd: bias size");
    if let Some(r) = residual {
        assert_eq!(r.len(), cout * plane, "winograd: residual size");
    }
    if plane == 0 {
        return Some(Vec::new());
    }
    let (tile_rows, per_task) = tile_rows_per_task(x, cout);
    let grid = TaskGrid::new(tile_rows, per_task, &packed[0], wanted_tasks());
    let len = cout * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedOutput(out.as_mut_ptr());
    (0..grid.count()).into_par_iter().for_each(|task| {
        let GridTask {
            items: rows,
            panels,
            rows: channels,
        } = grid.task(task);
        let tw = x.w.div_ceil(2);
        let nt = rows.len() * tw;
        let mut buffer = ColsBuffer::take();
        buffer.resize(16 * (cin + cout) * nt, 0.0);
        let (v, m) = buffer.split_at_mut(16 * cin * nt);
        // V (C_in × 16 × nt), then M[ξ] (C_out × nt, this task's channels) = U[ξ] · V[ξ].
        InputLines::new(x).transform_channels(data, x, rows.clone(), v);
        let ld = 16 * nt;
        m[channels.start * ld..channels.end * ld].fill(0.0);
        for (xi, u) in packed.iter().enumerate() {
            // SAFETY: `m` holds C_out rows of 16·nt floats; the panels' rows are `channels`,
            // columns ξ·nt .. ξ·nt + nt of each, all inside `m`, which this task owns.
            unsafe {
                u.multiply(
                    panels.clone(),
                    (&v[xi * nt..], ld),
                    nt,
                    (m[xi * nt..].as_mut_ptr(), ld),
                )
            };
        }
        // Aᵀ M A + bias (+ residual), ReLU, into this task's channels and output rows.
        let mut y = [vec![0f32; 2 * tw], vec![0f32; 2 * tw]];
        for o in channels {
            let mo = &m[o * ld..(o + 1) * ld];
            let b = bias[o];
            for (k, tile_row) in rows.clone().enumerate() {
                output_tile_row(mo, nt, k * tw, tw, &mut y);
                for (at, r) in output_lines(x, tile_row) {
                    let at = o * plane + at;
                    // Output row `at` of channel o: this task alone writes it (the tasks cut
                    // the channels × tile rows without overlap, and a tile row's output rows
                    // are its own); `out` has capacity C_out × plane.
                    // SAFETY: as said, x.w floats from `at` inside the output.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            shared.at(at).cast::<std::mem::MaybeUninit<f32>>(),
                            x.w,
                        )
                    };
                    let conv = &y[r][..x.w];
                    let finish = |v: f32| if relu && v < 0.0 { 0.0 } else { v };
                    match residual {
                        Some(res) => {
                            for ((d, c), r) in dst.iter_mut().zip(conv).zip(&res[at..at + x.w]) {
                                d.write(finish(b + r + c));
                            }
                        }
                        None => {
                            for (d, c) in dst.iter_mut().zip(conv) {
                                d.write(finish(b + c));
                            }
                        }
                    }
                }
            }
        }
    });
    // SAFETY: the tasks cover every channel and tile row, and a tile row's output rows cover
    // the map's rows (2·ty and 2·ty + 1 inside it): every element was written above.
    unsafe { out.set_len(len) };
    Some(out)
}

/// Tile rows per task of [`forward`] and [`kernel_gradient`]: their V and M (or Ŷ) fit
/// [`FUSED_TASK_FLOATS`], and there are [`TASKS_PER_THREAD`] blocks per thread where the map
/// has that many tile rows. At least one tile row: the callers return early on empty maps.
///
/// Blocks of tile rows (each task reads all of U): splitting the channels instead where the
/// tiles are few (a batch of one on 14 × 14 maps) was slower, each group then transforming all
/// of the input; [`forward`] splits them only where the blocks are fewer than the threads.
fn tile_rows_per_task(x: Shape, cout: usize) -> (usize, usize) {
    let tile_rows = (x.b * x.h.div_ceil(2)).max(1);
    let per_row = 16 * (x.c + cout) * x.w.div_ceil(2);
    let fits = (FUSED_TASK_FLOATS / per_row.max(1)).max(1);
    let per_task = tile_rows.div_ceil(wanted_tasks()).min(fits).max(1);
    (tile_rows, per_task)
}

/// Tasks wanted in one of this module's parallel regions.
fn wanted_tasks() -> usize {
    TASKS_PER_THREAD * rayon::current_num_threads().max(1)
}

/// Runs `each` over the tiles of `x` in chunks of whole tile rows (one image, one tile row:
/// ⌈w/2⌉ tiles each) sized to the buffer: with the tile rows, their number of tiles nt, V
/// (C_in × 16 × nt, the transformed input) and a C_out × 16 × nt scratch. Each channel's task
/// owns one contiguous slice of either; the products read and write them with a row stride of
/// 16·nt.
fn by_chunks(
    data: &[f32],
    x: Shape,
    cout: usize,
    mut each: impl FnMut(std::ops::Range<usize>, usize, &[f32], &mut [f32]),
) {
    let tw = x.w.div_ceil(2);
    let tile_rows = x.b * x.h.div_ceil(2);
    let rows_per_chunk = (BUFFER_FLOATS / (16 * (x.c + cout) * tw)).clamp(1, tile_rows);
    let mut buffer = ColsBuffer::take();
    for r0 in (0..tile_rows).step_by(rows_per_chunk) {
        let r1 = (r0 + rows_per_chunk).min(tile_rows);
        let nt = (r1 - r0) * tw;
        buffer.resize(16 * (x.c + cout) * nt, 0.0);
        let (v, scratch) = buffer.split_at_mut(16 * x.c * nt);
        transform_input(data, x, r0..r1, v);
        each(r0..r1, nt, v, scratch);
    }
}

/// V (C_in × 16 × nt): Bᵀ d B for every tile of the tile rows `rows` (image, tile row) of
/// every channel, d the 4×4 input block at rows 2·ty − 1.., columns 2·tx − 1.. (zero outside).
fn transform_input(data: &[f32], x: Shape, rows: std::ops::Range<usize>, v: &mut [f32]) {
    let nt = rows.len() * x.w.div_ceil(2);
    let plane = x.plane();
    v.par_chunks_mut(16 * nt).enumerate().for_each(|(ci, v)| {
        let mut lines = InputLines::new(x);
        lines.transform(&data[ci * plane..(ci + 1) * plane], x, rows.clone(), v);
    });
}

/// The rows one channel's input transform works on: four input rows padded with a zero
/// column on the left and enough on the right (padded column j holds input column j − 1),
/// and Bᵀ d of them.
struct InputLines {
    d: [Vec<f32>; 4],
    t: [Vec<f32>; 4],
}

impl InputLines {
    fn new(x: Shape) -> Self {
        let wp = 2 * x.w.div_ceil(2) + 2;
        Self {
            d: std::array::from_fn(|_| vec![0f32; wp]),
            t: std::array::from_fn(|_| vec![0f32; wp]),
        }
    }

    /// V (C_in × 16 × nt) of every channel of `data` (shape `x`) for the tile rows `rows`, on
    /// the calling thread.
    fn transform_channels(
        &mut self,
        data: &[f32],
        x: Shape,
        rows: std::ops::Range<usize>,
        v: &mut [f32],
    ) {
        let plane = x.plane();
        let nt = rows.len() * x.w.div_ceil(2);
        for (ci, v) in v.chunks_exact_mut(16 * nt).enumerate() {
            self.transform(&data[ci * plane..][..plane], x, rows.clone(), v);
        }
    }

    /// V of one channel (16 × nt, ξ's row nt floats long): Bᵀ d B for every tile of the tile
    /// rows `rows` of `src` (the channel's B × H × W values).
    fn transform(&mut self, src: &[f32], x: Shape, rows: std::ops::Range<usize>, v: &mut [f32]) {
        let (h, w) = (x.h, x.w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        let nt = rows.len() * tw;
        let (d, t) = (&mut self.d, &mut self.t);
        let wp = d[0].len();
        for (k, tile_row) in rows.enumerate() {
            let (img, ty) = (tile_row / th, tile_row % th);
            for (r, dr) in d.iter_mut().enumerate() {
                let iy = (2 * ty + r).wrapping_sub(1);
                if iy < h {
                    dr[1..=w].copy_from_slice(&src[(img * h + iy) * w..][..w]);
                } else {
                    dr[1..=w].fill(0.0);
                }
            }
            // Bᵀ d, along the rows, for every column at once.
            for j in 0..wp {
                let (d0, d1, d2, d3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
                t[0][j] = d0 - d2;
                t[1][j] = d1 + d2;
                t[2][j] = d2 - d1;
                t[3][j] = d1 - d3;
            }
            // (Bᵀ d) B, per tile: padded columns 2·tx .. 2·tx + 3.
            let at = k * tw;
            for (r, tr) in t.iter().enumerate() {
                let (o0, rest) = v[4 * r * nt + at..].split_at_mut(nt);
                let (o1, rest) = rest.split_at_mut(nt);
                let (o2, o3) = rest.split_at_mut(nt);
                for tx in 0..tw {
                    let c = &tr[2 * tx..2 * tx + 4];
                    o0[tx] = c[0] - c[2];
                    o1[tx] = c[1] + c[2];
                    o2[tx] = c[2] - c[1];
                    o3[tx] = c[1] - c[3];
                }
            }
        }
    }
}

/// `out` += Aᵀ m A for every tile of the tile rows `rows` of every output channel, the 2×2
/// blocks clipped to the map; `m` is C_out × 16 × nt.
fn transform_output(m: &[f32], x: Shape, rows: std::ops::Range<usize>, out: &mut [f32]) {
    let w = x.w;
    let tw = w.div_ceil(2);
    let nt = rows.len() * tw;
    out.par_chunks_mut(x.plane())
        .zip(m.par_chunks(16 * nt))
        .for_each(|(dst, m)| {
            let mut y = [vec![0f32; 2 * tw], vec![0f32; 2 * tw]];
            for (k, tile_row) in rows.clone().enumerate() {
                output_tile_row(m, nt, k * tw, tw, &mut y);
                for (oy, r) in output_lines(x, tile_row) {
                    let line = &mut dst[oy..][..w];
                    line.iter_mut().zip(&y[r]).for_each(|(o, v)| *o += v);
                }
            }
        });
}

/// The output rows of tile row `tile_row` inside the map: (offset of the row in a channel's
/// B × H × W values, which of the tile's two rows).
fn output_lines(x: Shape, tile_row: usize) -> impl Iterator<Item = (usize, usize)> {
    let th = x.h.div_ceil(2);
    let (img, ty) = (tile_row / th, tile_row % th);
    (0..2)
        .filter(move |r| 2 * ty + r < x.h)
        .map(move |r| ((img * x.h + 2 * ty + r) * x.w, r))
}

/// Aᵀ m A for the `tw` tiles from column `at` of one channel's M (16 rows `nt` apart): the
/// two output rows of those tiles, 2·tw values each, into `y`.
fn output_tile_row(m: &[f32], nt: usize, at: usize, tw: usize, y: &mut [Vec<f32>; 2]) {
    let row = |xi: usize| &m[xi * nt + at..xi * nt + at + tw];
    let (m0, m1, m2, m3) = (row(0), row(1), row(2), row(3));
    let (m4, m5, m6, m7) = (row(4), row(5), row(6), row(7));
    let (m8, m9, m10, m11) = (row(8), row(9), row(10), row(11));
    let (m12, m13, m14, m15) = (row(12), row(13), row(14), row(15));
    let (y0, y1) = y.split_at_mut(1);
    let (y0, y1) = (&mut y0[0], &mut y1[0]);
    for tx in 0..tw {
        let s = [
            m0[tx] + m4[tx] + m8[tx],
            m1[tx] + m5[tx] + m9[tx],
            m2[tx] + m6[tx] + m10[tx],
            m3[tx] + m7[tx] + m11[tx],
        ];
        let d = [
            m4[tx] - m8[tx] - m12[tx],
            m5[tx] - m9[tx] - m13[tx],
            m6[tx] - m10[tx] - m14[tx],
            m7[tx] - m11[tx] - m15[tx],
        ];
        y0[2 * tx] = s[0] + s[1] + s[2];
        y0[2 * tx + 1] = s[1] - s[2] - s[3];
        y1[2 * tx] = d[0] + d[1] + d[2];
        y1[2 * tx + 1] = d[1] - d[2] - d[3];
    }
}

/// The gradient of a 3x3, stride-1, padding-1 convolution with respect to its kernels:
/// C_out × C_in × 3 × 3 (row-major) for input `x` (shape `x`, values `data`) and the gradient
/// `dy` (C_out × B·H·W) of its output. The adjoint of F(2×2, 3×3) in the kernels: with
/// V = Bᵀ d B per tile and Ŷ = A dy Aᵀ (dy the 2×2 output block, zero outside the map),
/// dU\[ξ\] = Σ_tiles Ŷ\[ξ\] V\[ξ\]ᵀ (16 products, C_out × C_in each) and dg = Gᵀ dU G.
pub(crate) fn kernel_gradient(data: &[f32], x: Shape, dy: &[f32], cout: usize) -> Vec<f32> {
    assert_eq!(data.len(), x.c * x.plane(), "winograd: input size");
    assert_eq!(dy.len(), cout * x.plane(), "winograd: gradient size");
    let (cin, plane) = (x.c, x.plane());
    if plane == 0 {
        return vec![0f32; cout * cin * 9];
    }
    let tw = x.w.div_ceil(2);
    let (tile_rows, per_task) = tile_rows_per_task(x, cout);
    let grid = TaskGrid::blocks_only(tile_rows, per_task);
    // One parallel region: each task transforms the input and the output gradient of its
    // tile rows (in cache) and adds its 16 products to its split's dU, at most two splits per
    // thread (each holds a 16 × C_out × C_in dU); the splits' dU are summed at the end.
    // Before, the whole map's V and Ŷ were written to memory chunk by chunk, and each
    // product, small (64 × 64 on a ResNet's first layer) with a long inner dimension, ran on
    // all threads in turn: a quarter of a 224 px training step.
    let splits = 2 * rayon::current_num_threads().max(1);
    let du = (0..grid.count())
        .into_par_iter()
        .with_min_len(grid.count().div_ceil(splits).max(1))
        .fold(
            || vec![0f32; 16 * cout * cin],
            |mut du, task| {
                let rows = grid.task(task).items;
                let nt = rows.len() * tw;
                let mut buffer = ColsBuffer::take();
                buffer.resize(16 * (cin + cout) * nt, 0.0);
                let (v, yh) = buffer.split_at_mut(16 * cin * nt);
                InputLines::new(x).transform_channels(data, x, rows.clone(), v);
                let mut d = [vec![0f32; 2 * tw], vec![0f32; 2 * tw]];
                for (o, yh) in yh.chunks_exact_mut(16 * nt).enumerate() {
                    output_gradient_tiles(&dy[o * plane..][..plane], x, rows.clone(), yh, &mut d);
                }
                // dU[ξ] (C_out × C_in) += Ŷ[ξ] (C_out × nt) · V[ξ]ᵀ (nt × C_in)
                for (xi, du) in du.chunks_exact_mut(cout * cin).enumerate() {
                    sgemm_serial(
                        (cout, cin, nt),
                        Operand::rows(&yh[xi * nt..], 16 * nt),
                        Operand::transposed(&v[xi * nt..], 16 * nt),
                        du,
                        cin,
                        true,
                    );
                }
                du
            },
        )
        .reduce_with(|mut a, b| {
            a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
            a
        })
        .unwrap_or_else(|| vec![0f32; 16 * cout * cin]);
    // dg = Gᵀ dU G per kernel.
    let plane = cout * cin;
    let mut dg = vec![0f32; plane * 9];
    dg.par_chunks_mut(9).enumerate().for_each(|(k, g)| {
        let u = |r: usize, c: usize| du[(r * 4 + c) * plane + k];
        // Gᵀ dU: 3 × 4.
        let mut q = [[0f32; 4]; 3];
        for (c, col) in (0..4).map(|c| (c, [u(0, c), u(1, c), u(2, c), u(3, c)])) {
            q[0][c] = col[0] + 0.5 * (col[1] + col[2]);
            q[1][c] = 0.5 * (col[1] - col[2]);
            q[2][c] = 0.5 * (col[1] + col[2]) + col[3];
        }
        for (a, row) in q.iter().enumerate() {
            g[a * 3] = row[0] + 0.5 * (row[1] + row[2]);
            g[a * 3 + 1] = 0.5 * (row[1] - row[2]);
            g[a * 3 + 2] = 0.5 * (row[1] + row[2]) + row[3];
        }
    });
    dg
}

/// Ŷ of one channel (16 × nt, ξ's row nt floats long): A dy Aᵀ for every tile of the tile
/// rows `rows` of `src` (the channel's B × H × W output gradient), dy the 2×2 block at rows
/// 2·ty.., columns 2·tx.. (zero outside the map). `d` holds two map rows padded on the right
/// to 2·tw columns.
fn output_gradient_tiles(
    src: &[f32],
    x: Shape,
    rows: std::ops::Range<usize>,
    out: &mut [f32],
    d: &mut [Vec<f32>; 2],
) {
    let (h, w) = (x.h, x.w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let nt = rows.len() * tw;
    for (k, tile_row) in rows.enumerate() {
        let (img, ty) = (tile_row / th, tile_row % th);
        for (r, dr) in d.iter_mut().enumerate() {
            let oy = 2 * ty + r;
            if oy < h {
                dr[..w].copy_from_slice(&src[(img * h + oy) * w..][..w]);
            } else {
                dr[..w].fill(0.0);
            }
            dr[w..].fill(0.0);
        }
        let at = k * tw;
        for tx in 0..tw {
            let (a, b) = (d[0][2 * tx], d[0][2 * tx + 1]);
            let (c, e) = (d[1][2 * tx], d[1][2 * tx + 1]);
            // A dy: 4 × 2 (rows dy0, dy0 + dy1, dy0 − dy1, −dy1).
            let p = [[a, b], [a + c, b + e], [a - c, b - e], [-c, -e]];
            for (i, [p0, p1]) in p.into_iter().enumerate() {
                let row = [p0, p0 + p1, p0 - p1, -p1];
                for (j, value) in row.into_iter().enumerate() {
                    out[(i * 4 + j) * nt + at + tx] = value;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::super::geometry::{ConvPlan, ConvShape};
    use super::super::im2col::im2col;
    use super::*;

    /// The im2col matrix of the 3x3 stride-1 padding-1 conv of `x`, all columns in one chunk.
    fn im2col_all(x: &Maps) -> Vec<f32> {
        let shape = ConvShape {
            cin: x.c,
            cout: 1,
            k: 3,
            stride: 1,
            pad: 1,
        };
        let plan = ConvPlan {
            rows_per_chunk: x.b * x.h,
            ..shape.plan(x)
        };
        let chunk = plan.chunks().next().expect("one chunk");
        let mut cols = vec![0f32; shape.patch() * chunk.width()];
        im2col(x, &shape, &plan, &chunk, &mut cols);
        cols
    }

    fn random(rng: &mut StdRng, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0..1.0)).collect()
    }

    /// The 3x3 stride-1 padding-1 convolution through im2col and one product: the reference.
    fn direct(x: &Maps, w: &[f32], cout: usize) -> Vec<f32> {
        let n = x.plane();
        let kk = x.c * 9;
        let cols = im2col_all(x);
        let mut out = vec![0f32; cout * n];
        sgemm(
            (cout, n, kk),
            Operand::rows(w, kk),
            Operand::rows(&cols, n),
            &mut out,
            n,
            false,
        );
        out
    }

    /// Odd and even sizes, a map smaller than a tile row, several images: F(2×2, 3×3) equals
    /// im2col's convolution, and accumulates onto what `out` held.
    #[test]
    fn equals_the_im2col_convolution() {
        let mut rng = StdRng::seed_from_u64(11);
        for &(b, cin, cout, h, w) in &[
            (2, 3, 4, 8, 8),
            (3, 5, 2, 7, 5),
            (1, 2, 3, 1, 6),
            (2, 4, 4, 6, 9),
            (1, 1, 1, 2, 2),
        ] {
            let x = Maps {
                data: random(&mut rng, cin * b * h * w),
                c: cin,
                b,
                h,
                w,
            };
            let weights = random(&mut rng, cout * cin * 9);
            let want = direct(&x, &weights, cout);
            let start = random(&mut rng, want.len());
            let mut got = start.clone();
            let filter = WinogradFilter::new(&weights, cout, cin);
            accumulate(&x.data, Shape::of(&x), &filter, &mut got);
            for (i, ((g, s), w)) in got.iter().zip(&start).zip(&want).enumerate() {
                assert!(
                    (g - s - w).abs() <= 1e-5 * (1.0 + w.abs()) * (cin as f32).sqrt() * 4.0,
                    "{b}x{cin}x{h}x{w} -> {cout} at {i}: {} vs {w}",
                    g - s
                );
            }
        }
    }

    /// The fused forward equals im2col's convolution plus bias (plus residual), then ReLU,
    /// on odd and even maps, batches of one and several, channel counts that leave edge
    /// panels, in pools of 1, 2 and 7 threads (tile rows and channels cut differently); a NaN
    /// input stays NaN through the ReLU.
    #[test]
    fn fused_forward_equals_the_convolution_plus_bias_and_relu() {
        let mut rng = StdRng::seed_from_u64(14);
        for &(b, cin, cout, h, w) in &[
            (1, 16, 72, 14, 14),
            (2, 8, 16, 7, 9),
            (1, 3, 5, 1, 6),
            (3, 24, 40, 12, 13),
        ] {
            let mut x = Maps {
                data: random(&mut rng, cin * b * h * w),
                c: cin,
                b,
                h,
                w,
            };
            x.data[5] = f32::NAN;
            let weights = random(&mut rng, cout * cin * 9);
            let bias = random(&mut rng, cout);
            let residual = random(&mut rng, cout * x.plane());
            let conv = direct(&x, &weights, cout);
            let filter = WinogradFilter::new(&weights, cout, cin);
            if filter.packed.is_none() {
                eprintln!("no panel kernel on this CPU: the fused forward is not used");
                return;
            }
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                for (res, relu) in [(None, true), (Some(&residual[..]), true), (None, false)] {
                    let got = pool
                        .install(|| forward(&x.data, Shape::of(&x), &filter, &bias, res, relu))
                        .expect("a panel kernel");
                    for (i, (g, c)) in got.iter().zip(&conv).enumerate() {
                        let o = i / x.plane();
                        let pre = bias[o] + res.map_or(0.0, |r| r[i]) + c;
                        let want = if relu && pre < 0.0 { 0.0 } else { pre };
                        let tol = 1e-5 * (1.0 + want.abs()) * (cin as f32).sqrt() * 4.0;
                        assert!(
                            g.is_nan() == want.is_nan()
                                && (want.is_nan() || (g - want).abs() <= tol),
                            "{threads} threads, {b}x{cin}x{h}x{w} -> {cout} at {i}: {g} vs {want}"
                        );
                    }
                }
            }
        }
    }

    /// The adjoint filter gives the gradient with respect to the input: ⟨conv(x), y⟩ equals
    /// ⟨x, adjoint(y)⟩ for any x and y.
    #[test]
    fn adjoint_is_the_transpose() {
        let mut rng = StdRng::seed_from_u64(12);
        let (b, cin, cout, h, w) = (2, 3, 5, 7, 6);
        let weights = random(&mut rng, cout * cin * 9);
        let x = Maps {
            data: random(&mut rng, cin * b * h * w),
            c: cin,
            b,
            h,
            w,
        };
        let y = Maps {
            data: random(&mut rng, cout * b * h * w),
            c: cout,
            b,
            h,
            w,
        };
        let mut conv_x = vec![0f32; y.data.len()];
        let filter = WinogradFilter::new(&weights, cout, cin);
        accumulate(&x.data, Shape::of(&x), &filter, &mut conv_x);
        let mut adjoint_y = vec![0f32; x.data.len()];
        let adjoint = WinogradFilter::adjoint(&weights, cout, cin);
        accumulate(&y.data, Shape::of(&y), &adjoint, &mut adjoint_y);
        let dot = |a: &[f32], b: &[f32]| -> f64 {
            a.iter().zip(b).map(|(a, b)| *a as f64 * *b as f64).sum()
        };
        let (lhs, rhs) = (dot(&conv_x, &y.data), dot(&x.data, &adjoint_y));
        assert!(
            (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    /// The kernel gradient equals im2col's, G = dy · colsᵀ, on odd and even maps.
    #[test]
    fn kernel_gradient_equals_the_im2col_one() {
        let mut rng = StdRng::seed_from_u64(13);
        for &(b, cin, cout, h, w) in &[(2, 3, 4, 8, 8), (3, 2, 5, 7, 5), (1, 4, 2, 4, 6)] {
            let x = Maps {
                data: random(&mut rng, cin * b * h * w),
                c: cin,
                b,
                h,
                w,
            };
            let dy = random(&mut rng, cout * b * h * w);
            let n = x.plane();
            let cols = im2col_all(&x);
            let mut want = vec![0f32; cout * cin * 9];
            sgemm(
                (cout, cin * 9, n),
                Operand::rows(&dy, n),
                Operand::transposed(&cols, n),
                &mut want,
                cin * 9,
                false,
            );
            let got = kernel_gradient(&x.data, Shape::of(&x), &dy, cout);
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{b}x{cin}x{h}x{w} -> {cout} at {i}: {g} vs {w}"
                );
            }
        }
    }

    /// An empty batch: no output, a zero kernel gradient, no panic.
    #[test]
    fn empty_maps_give_empty_results() {
        let x = Shape {
            c: 4,
            b: 0,
            h: 6,
            w: 6,
        };
        let filter = WinogradFilter::new(&[0.5; 8 * 4 * 9], 8, 4);
        if filter.packed.is_some() {
            let out = forward(&[], x, &filter, &[0.0; 8], None, true).expect("a panel kernel");
            assert!(out.is_empty());
        }
        assert_eq!(kernel_gradient(&[], x, &[], 8), vec![0.0; 8 * 4 * 9]);
    }

    #[test]
    fn pays_only_where_tiles_fit() {
        assert!(pays(1, 56, 56) && pays(1, 14, 14) && pays(1, 13, 13) && pays(1, 28, 12));
        assert!(!pays(1, 8, 8) && !pays(1, 7, 7) && !pays(1, 1, 1) && !pays(64, 3, 3));
        assert!(pays(64, 8, 8) && pays(64, 4, 4) && !pays(32, 7, 7) && !pays(8, 4, 4));
    }
}
