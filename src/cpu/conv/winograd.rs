//! 3x3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks", 2016): each 2×2 block
//! of outputs comes from a 4×4 block of inputs with 16 multiplications per channel pair
//! instead of 36, so the products ([`sgemm`], 16 of them, one per position of the 4×4
//! transformed block) are 2.25 times smaller than im2col's. The ResNet engines use it for a
//! ResNet's 3x3 stride-1 convs on maps of 12x12 and larger, and on smaller even maps where the
//! batch holds enough tiles ([`pays`]): the forward pass, and in training the input gradient
//! (the kernels turned over, [`WinogradFilter::adjoint`]) and the kernel gradient
//! ([`kernel_gradient`], the adjoint in the kernels). On maps of 24x24 and larger the fused
//! forward runs F(4×4, 3×3) instead ([`Tile::Four`], [`pays_4x4`]): 36 multiplications per 4×4
//! outputs, 6×6 input blocks. Results equal im2col's to float rounding (the tests below compare
//! the two).
//!
//! With d a 4×4 input block and g a 3×3 kernel, the 2×2 output block is
//! Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A, with
//! Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1] and
//! Aᵀ = [1 1 1 0; 0 1 −1 −1].

use rayon::prelude::*;

use super::blocked::{GridTask, SharedOutput, TaskGrid};
use super::maps::Maps;
use super::scratch::ColsBuffer;
#[cfg(target_arch = "x86_64")]
use crate::cpu::isa::{Avx512, Token};
use crate::cpu::kernels::prepacked::{Ends, PackedLhs, PanelKernel, Start};
use crate::cpu::kernels::sgemm::{Operand, sgemm, sgemm_serial};

/// Largest transformed-input plus product buffer, in floats (32 MiB, as im2col's): wider
/// convs are computed in chunks of tiles.
const BUFFER_FLOATS: usize = 8 << 20;

/// The minimal filtering algorithm: F(2×2, 3×3) (16 multiplications per 2 × 2 outputs) or
/// F(4×4, 3×3) (36 per 4 × 4: 2.25 per output instead of 4, with larger transforms whose
/// constants, up to 8 in Aᵀ and 1/24 in G, cost a little float precision).
///
/// F(4×4, 3×3) runs only in the fused [`forward`] (where this CPU runs the panel kernel);
/// [`accumulate`] and [`kernel_gradient`] are F(2×2, 3×3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Tile {
    /// F(2×2, 3×3): 4 × 4 input blocks.
    Two,
    /// F(4×4, 3×3): 6 × 6 input blocks, Lavin & Gray's points 0, ±1, ±2.
    Four,
}

impl Tile {
    /// Outputs per tile side, m.
    pub(crate) fn m(self) -> usize {
        match self {
            Tile::Two => 2,
            Tile::Four => 4,
        }
    }

    /// Inputs per tile side, α = m + 2.
    fn alpha(self) -> usize {
        self.m() + 2
    }

    /// Positions ξ of a transformed block, α².
    fn positions(self) -> usize {
        self.alpha() * self.alpha()
    }

    /// G g for one row or column g of a kernel: α values (then zeros).
    fn filter(self, [g0, g1, g2]: [f32; 3]) -> [f32; 6] {
        match self {
            Tile::Two => [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2, 0.0, 0.0],
            Tile::Four => [
                g0 / 4.0,
                -(g0 + g1 + g2) / 6.0,
                -(g0 - g1 + g2) / 6.0,
                g0 / 24.0 + g1 / 12.0 + g2 / 6.0,
                g0 / 24.0 - g1 / 12.0 + g2 / 6.0,
                g2,
            ],
        }
    }
}

/// F(4×4, 3×3)'s Bᵀ d for one column or row d of a 6 × 6 input block.
#[inline(always)]
fn input_4x4([d0, d1, d2, d3, d4, d5]: [f32; 6]) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * d1 - 4.0 * d2 + d3 + d4,
        4.0 * d1 - 4.0 * d2 - d3 + d4,
        -2.0 * d1 - d2 + 2.0 * d3 + d4,
        2.0 * d1 - d2 - 2.0 * d3 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// F(4×4, 3×3)'s Aᵀ m for one column or row m of a 6 × 6 product block.
#[inline(always)]
fn output_4x4([m0, m1, m2, m3, m4, m5]: [f32; 6]) -> [f32; 4] {
    [
        m0 + m1 + m2 + m3 + m4,
        m1 - m2 + 2.0 * (m3 - m4),
        m1 + m2 + 4.0 * (m3 + m4),
        m1 - m2 + 8.0 * (m3 - m4) + m5,
    ]
}

/// A 3x3 kernel bank transformed for F(m×m, 3×3): U\[ξ\] (C_out × C_in) for each of the α²
/// positions ξ of the transformed block.
pub(crate) struct WinogradFilter {
    /// The U\[ξ\] one after another, kept only where there is no panel kernel.
    u: Vec<f32>,
    /// The U\[ξ\] packed for the panel kernel, where this CPU runs one.
    packed: Option<Vec<PackedLhs>>,
    tile: Tile,
    cout: usize,
    cin: usize,
}

impl WinogradFilter {
    /// From weights C_out × C_in × 3 × 3, row-major.
    pub(crate) fn new(w: &[f32], cout: usize, cin: usize, tile: Tile) -> Self {
        Self::transform(cout, cin, tile, |o, i, k| w[(o * cin + i) * 9 + k])
    }

    /// The filter of the convolution's adjoint (C_in outputs from C_out inputs): each kernel
    /// turned by 180°, input and output channels swapped. Its output is the gradient with
    /// respect to the input of the convolution that `w` (C_out × C_in × 3 × 3) defines.
    pub(crate) fn adjoint(w: &[f32], cout: usize, cin: usize, tile: Tile) -> Self {
        Self::transform(cin, cout, tile, |i, o, k| w[(o * cin + i) * 9 + 8 - k])
    }

    /// U = G g Gᵀ for every kernel g(o, i) of an `outs` × `ins` bank; `kernel(o, i, k)` is
    /// tap k (row-major 3×3) of the kernel from input i to output o.
    fn transform(
        outs: usize,
        ins: usize,
        tile: Tile,
        kernel: impl Fn(usize, usize, usize) -> f32 + Sync,
    ) -> Self {
        let plane = outs * ins;
        let (alpha, positions) = (tile.alpha(), tile.positions());
        let mut u = vec![0f32; positions * plane];
        // Output channels on every thread (a training step transforms every filter anew), each
        // task writing its rows of every U[ξ] directly: the slices of one output channel o
        // are row o of each plane.
        let mut rows: Vec<Vec<&mut [f32]>> = (0..outs).map(|_| Vec::new()).collect();
        for ui in u.chunks_mut(plane) {
            for (o, row) in ui.chunks_mut(ins).enumerate() {
                rows[o].push(row);
            }
        }
        rows.into_par_iter()
            .enumerate()
            .for_each(|(o, mut planes)| {
                // `i` picks the kernel and the element of every plane that it fills.
                #[allow(clippy::needless_range_loop)]
                for i in 0..ins {
                    let g: [f32; 9] = std::array::from_fn(|k| kernel(o, i, k));
                    // G g: α × 3, column by column.
                    let columns: [[f32; 6]; 3] =
                        std::array::from_fn(|c| tile.filter([g[c], g[3 + c], g[6 + c]]));
                    // (G g) Gᵀ: α × α, row by row; value (r, c) is U[r·α + c].
                    for r in 0..alpha {
                        let row = tile.filter([columns[0][r], columns[1][r], columns[2][r]]);
                        for (c, v) in row.into_iter().take(alpha).enumerate() {
                            planes[r * alpha + c][i] = v;
                        }
                    }
                }
            });
        let packed: Option<Vec<PackedLhs>> = PanelKernel::select().map(|kernel| {
            u.par_chunks_exact(plane)
                .map(|ui| PackedLhs::new(kernel, ui, outs, ins))
                .collect()
        });
        Self {
            // Read only by `accumulate` where there is no panel kernel.
            u: if packed.is_some() { Vec::new() } else { u },
            packed,
            tile,
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
        let b = &v[xi * nt + cols.start..];
        let ends = Ends {
            start: Start::Zero,
            relu: false,
        };
        // SAFETY: this task's columns of every row; the sums start from zero, so the product
        // writes each element before reading it.
        unsafe { packed[xi].multiply(0..packed[xi].panels(), (b, ld), cols.len(), (at, ld), ends) };
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
/// lost a quarter with the tasks on blocks of tile rows (each read all the transformed
/// weights, 16/9 of the conv's, for a few tiles): there the inference forward runs them with
/// its tasks on groups of channels instead ([`pays_small_batch`]).
pub(crate) fn pays(b: usize, h: usize, w: usize) -> bool {
    let tiles = h.div_ceil(2) * w.div_ceil(2);
    let even = h.is_multiple_of(2) && w.is_multiple_of(2);
    16 * tiles <= 6 * h * w && (h * w >= 144 || (even && b.saturating_mul(tiles) >= 256))
}

/// Whether F(4×4, 3×3) runs instead of F(2×2, 3×3) on an h × w map (where Winograd pays):
/// maps of 24 × 24 and larger. Measured per conv on a 2-core Zen 4 (ResNet-18, 224 px): 28 × 28
/// maps take 0.68-0.77 of F(2×2, 3×3)'s time, 56 × 56 maps 0.65-0.9, at batch 32 and at batch
/// 1; 14 × 14 maps twice as long at batch 1 with blocks of tile rows (16 tiles, and 36
/// transformed kernels instead of 16 to read by every task); with the tasks on groups of
/// channels instead, they pay at small batches ([`pays_4x4_small_batch`]).
pub(crate) fn pays_4x4(h: usize, w: usize) -> bool {
    h.min(w) >= 24
}

/// Tiles in a batch at most where [`forward`] gives every task all the tiles and a group of
/// the output channels (one group per thread), instead of a block of tile rows and, where
/// the blocks are few, a group of channels. Each task then reads only its channels'
/// transformed kernels, and the input transform (small there) is made once for all of them
/// ([`shared_input`]) or, where the channels do not split on the panel kernel's blocks,
/// repeated by every task.
///
/// With blocks of tile rows, a batch of one on 7 × 7 maps (16 tiles, 4 tile rows) had every
/// task read all 16 transformed kernels (512 × 512 each, 16 MiB) for 4 columns: a quarter
/// slower than im2col. Split by channels it takes 1.04-1.06 ms per conv against im2col's
/// 1.64-1.68 (2-core Zen 4, ResNet-18's layer4 at 224 px). On 14 × 14 maps (49 tiles) and on
/// 28 × 28 maps with F(4×4, 3×3) (49 tiles) the split by channels was slower (0.83 → 1.0 and
/// 0.73 → 0.79-0.91 ms): those keep blocks of tile rows.
const FEW_TILES: usize = 48;

/// Whether a batch of `b` h × w maps has at most [`FEW_TILES`] tiles of `tile`.
pub(crate) fn few_tiles(b: usize, h: usize, w: usize, tile: Tile) -> bool {
    let m = tile.m();
    b.saturating_mul(h.div_ceil(m) * w.div_ceil(m)) <= FEW_TILES
}

/// Whether the inference forward runs F(2×2, 3×3) on a batch too small for [`pays`] (where
/// the training passes keep im2col): maps of 6 × 6 and larger whose overhanging tiles cost
/// at most two thirds of im2col, in a batch of at most [`FEW_TILES`] tiles. [`forward`] then
/// gives each task a group of output channels. ResNet's 7 × 7 maps at batch 1: see
/// [`FEW_TILES`].
pub(crate) fn pays_small_batch(b: usize, h: usize, w: usize) -> bool {
    let tiles = h.div_ceil(2) * w.div_ceil(2);
    h.min(w) >= 6 && 16 * tiles <= 6 * h * w && few_tiles(b, h, w, Tile::Two)
}

/// Whether the inference forward runs F(4×4, 3×3) on a batch of `b` h × w maps smaller than
/// [`pays_4x4`] takes: maps of 12 × 12 and larger in a batch of at most [`FEW_TILES`] tiles
/// of 4 × 4 outputs. [`forward`] then gives each task a group of output channels and all the
/// tiles: on ResNet's 14 × 14 maps at batch 1, 16 tiles, one full 16-lane vector, where
/// F(2×2, 3×3) has 49 tiles and 16/9 times the multiplications of the 14 × 14 outputs
/// covered (F(4×4, 3×3): 36/16 per output on 16 × 16 covered, 1.3 times).
///
/// Measured on a 2-core Zen 4 (ResNet-152's 35 such convs, 256 channels, one 224 px image,
/// interleaved runs): 0.76-0.79 ms per conv with F(2×2, 3×3) on blocks of tile rows, 0.59-0.66
/// ms with this. Before the transforms below ran whole (the output's tile rows in one call,
/// the input's transformed blocks an odd number of cache lines apart) it was 0.74-0.76 ms.
pub(crate) fn pays_4x4_small_batch(b: usize, h: usize, w: usize) -> bool {
    h.min(w) >= 12 && few_tiles(b, h, w, Tile::Four)
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
    assert_eq!(
        f.tile,
        Tile::Two,
        "winograd: accumulate runs F(2×2, 3×3) only"
    );
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
/// through the α² products (16 or 36) on the panel kernel to the output transform, its V and M in its
/// thread's buffer (in cache), writing its part of the output once. Where the tiles are few
/// (every task takes them all), V is made before, once, in a parallel pass of its own
/// ([`shared_input`]), in the calling thread's shared buffer. `None` where the filter
/// has no panel-kernel form (this CPU runs none): then [`accumulate`]; and for an F(4×4, 3×3)
/// filter where `data` holds NaN, an infinity or a value beyond 10³⁶: then F(2×2, 3×3).
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
    let tile = f.tile;
    // F(4×4, 3×3)'s dense transforms would spread a NaN input over its whole tile (and turn
    // an infinity into NaN where the convolution keeps it infinite): it declines such maps,
    // and maps whose transformed input could overflow ([`within_4x4_range`]). F(2×2, 3×3)'s
    // sparse ones keep a NaN where the convolution puts it.
    if tile == Tile::Four && !within_4x4_range(data) {
        return None;
    }
    let (m_side, positions) = (tile.m(), tile.positions());
    let tw = x.w.div_ceil(m_side);
    let all_rows = x.b * x.h.div_ceil(m_side);
    // With few tiles, every task takes them all and a group of the output channels (one
    // group per thread: [`FEW_TILES`]), and the input is transformed once, before the tasks,
    // in a parallel pass of its own ([`shared_input`]) where its channels split into a group
    // per thread on the panel kernel's blocks of inner columns; otherwise each task
    // transforms all of it itself. (Transformed once channel-major, which the products then
    // read rows kilobytes apart, it was slower: 14 × 14 maps 0.60 → 0.64-0.68 ms, 7 × 7 maps
    // 0.80 → 0.84-0.96 ms, 2-core Zen 4.)
    let few = few_tiles(x.b, x.h, x.w, tile);
    let grid = match few {
        true => {
            let threads = rayon::current_num_threads().max(1);
            TaskGrid::new(all_rows, all_rows, &packed[0], threads)
        }
        false => {
            let (tile_rows, per_task) = tile_rows_per_task(x, cout, tile);
            TaskGrid::new(tile_rows, per_task, &packed[0], wanted_tasks()).even()
        }
    };
    let shared = few
        .then(|| shared_input(data, x, tile, all_rows, packed[0].inner_block()))
        .flatten();
    let len = cout * plane;
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let out_at = SharedOutput(out.as_mut_ptr());
    (0..grid.count()).into_par_iter().for_each(|task| {
        let GridTask {
            items: rows,
            panels,
            rows: channels,
        } = grid.task(task);
        let nt = rows.len() * tw;
        let ld = positions * nt;
        let mut buffer = ColsBuffer::take();
        // V (α² × C_in × nt), V[ξ] from ξ·stride, where the task makes it itself; then M
        // (C_out × α²·nt).
        let stride = odd_lines(cin * nt);
        let own_v = if shared.is_some() {
            0
        } else {
            positions * stride
        };
        buffer.resize(own_v + cout * ld, 0.0);
        let (v, m) = buffer.split_at_mut(own_v);
        let groups: Vec<InputGroup<'_>> = match &shared {
            Some(shared) => shared.groups().collect(),
            None => {
                let layout = Layout::PositionMajor { stride };
                InputLines::new(x, tile).transform_channels(
                    data,
                    x,
                    rows.clone(),
                    v,
                    layout,
                    0..cin,
                );
                vec![InputGroup {
                    v,
                    stride,
                    channels: 0..cin,
                }]
            }
        };
        // M[ξ] (C_out × nt, this task's channels) = U[ξ] · V[ξ], summed over the groups of
        // input channels in order (the panel kernel's blocks of inner columns, as one product
        // over all of them would).
        for (xi, u) in packed.iter().enumerate() {
            for (g, group) in groups.iter().enumerate() {
                let ends = Ends {
                    start: if g == 0 { Start::Zero } else { Start::Output },
                    relu: false,
                };
                // SAFETY: `m` holds C_out rows of α²·nt floats; the panels' rows are
                // `channels`, columns ξ·nt .. ξ·nt + nt of each, all inside `m`, which this
                // task owns (the first group's sums start from zero, the others add to them).
                // The group's V[ξ] is its channels' rows of nt floats from ξ·stride.
                unsafe {
                    u.multiply_inner(
                        panels.clone(),
                        group.channels.clone(),
                        (&group.v[xi * group.stride..], nt),
                        nt,
                        (m[xi * nt..].as_mut_ptr(), ld),
                        ends,
                    )
                };
            }
        }
        // Aᵀ M A + bias (+ residual), ReLU, into this task's channels and output rows.
        // All the task's tiles in one call, as one row of nt tiles (full vectors where the
        // map's tile rows are short): line r holds output row r of each tile row in turn,
        // tile row k's m·tw values from k·m·tw.
        let mut y = vec![vec![0f32; m_side * nt]; m_side];
        for o in channels {
            let mo = &m[o * ld..(o + 1) * ld];
            let b = bias[o];
            output_tile_row(tile, mo, nt, 0, nt, &mut y);
            for (k, tile_row) in rows.clone().enumerate() {
                for (at, r) in output_lines(x, tile_row, m_side) {
                    let at = o * plane + at;
                    // Output row `at` of channel o: this task alone writes it (the tasks cut
                    // the channels × tile rows without overlap, and a tile row's output rows
                    // are its own); `out` has capacity C_out × plane.
                    // SAFETY: as said, x.w floats from `at` inside the output.
                    let dst = unsafe {
                        std::slice::from_raw_parts_mut(
                            out_at.at(at).cast::<std::mem::MaybeUninit<f32>>(),
                            x.w,
                        )
                    };
                    let conv = &y[r][k * m_side * tw..][..x.w];
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
    // the map's rows (m·ty .. m·ty + m inside it): every element was written above.
    unsafe { out.set_len(len) };
    Some(out)
}

/// The transformed input of a conv whose tasks all take every tile ([`forward`] on few
/// tiles), made once for all of them: V of each group of input channels (α² × C_in/G × nt,
/// position-major, V[ξ] from ξ·stride) one after another in the calling thread's shared
/// buffer.
struct SharedInput {
    buffer: ColsBuffer,
    groups: usize,
    stride: usize,
    positions: usize,
    per_group: usize,
}

/// One group of input channels of a conv's transformed input: V[ξ] (its channels' rows of nt
/// floats) from ξ·stride of `v`.
struct InputGroup<'a> {
    v: &'a [f32],
    stride: usize,
    channels: std::ops::Range<usize>,
}

impl SharedInput {
    /// Its groups, in order of their channels.
    fn groups(&self) -> impl Iterator<Item = InputGroup<'_>> {
        let len = self.positions * self.stride;
        (0..self.groups).map(move |g| InputGroup {
            v: &self.buffer[g * len..][..len],
            stride: self.stride,
            channels: g * self.per_group..(g + 1) * self.per_group,
        })
    }
}

/// The input of `data` (shape `x`) transformed for every tile (`tile_rows` rows of them) in
/// one parallel pass, a group of input channels per thread, where the channels split into
/// such groups on whole blocks of `inner_block` inner columns of the panel kernel (ResNet's
/// 256 and 512 channels on two threads, AVX-512's blocks of 128); `None` where they do not
/// (then each task transforms the input itself).
///
/// The tasks that split a conv's output channels each read all of V; made by each, it was
/// made once per thread (ResNet-152's 14 × 14 convs: 0.09 ms per task of 0.55 ms).
fn shared_input(
    data: &[f32],
    x: Shape,
    tile: Tile,
    tile_rows: usize,
    inner_block: usize,
) -> Option<SharedInput> {
    let groups = rayon::current_num_threads().max(1);
    if groups < 2 || !x.c.is_multiple_of(groups * inner_block) {
        return None;
    }
    let per_group = x.c / groups;
    let nt = tile_rows * x.w.div_ceil(tile.m());
    let (positions, stride) = (tile.positions(), odd_lines(per_group * nt));
    let mut buffer = ColsBuffer::take_shared();
    buffer.resize(groups * positions * stride, 0.0);
    let layout = Layout::PositionMajor { stride };
    buffer
        .par_chunks_mut(positions * stride)
        .enumerate()
        .for_each(|(g, v)| {
            let channels = g * per_group..(g + 1) * per_group;
            InputLines::new(x, tile).transform_channels(data, x, 0..tile_rows, v, layout, channels);
        });
    Some(SharedInput {
        buffer,
        groups,
        stride,
        positions,
        per_group,
    })
}

/// Magnitude bits (sign cleared) of the largest input F(4×4, 3×3) takes: 10³⁶. Each row
/// of its Bᵀ sums to at most 10 in magnitude, so Bᵀ d B stays under 100·10³⁶, inside
/// `f32::MAX` (3.4·10³⁸); NaN and infinities lie above it too.
const LARGEST_4X4_INPUT_BITS: u32 = 0x7b40_97ce;

/// Whether every value of `data` is within F(4×4, 3×3)'s range ([`LARGEST_4X4_INPUT_BITS`]):
/// an integer maximum of the magnitude bits, which vectorises (`all(is_finite)` ran one
/// float at a time and took a fifth of a task), over blocks of the input in parallel.
fn within_4x4_range(data: &[f32]) -> bool {
    data.par_chunks(1 << 16)
        .map(|block| block.iter().map(|v| v.to_bits() & 0x7fff_ffff).max())
        .max()
        .flatten()
        .is_none_or(|bits| bits <= LARGEST_4X4_INPUT_BITS)
}

/// Tile rows per task of [`forward`] and [`kernel_gradient`]: their V and M (or Ŷ) fit
/// [`FUSED_TASK_FLOATS`], and there are [`TASKS_PER_THREAD`] blocks per thread where the map
/// has that many tile rows. At least one tile row: the callers return early on empty maps.
///
/// Blocks of tile rows (each task reads all of U): splitting the channels instead where the
/// tiles are few (a batch of one on 14 × 14 maps) was slower, each group then transforming all
/// of the input; [`forward`] splits them only where the blocks are fewer than the threads.
fn tile_rows_per_task(x: Shape, cout: usize, tile: Tile) -> (usize, usize) {
    let tile_rows = (x.b * x.h.div_ceil(tile.m())).max(1);
    let per_row = tile.positions() * (x.c + cout) * x.w.div_ceil(tile.m());
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
        let mut lines = InputLines::new(x, Tile::Two);
        lines.transform(&data[ci * plane..(ci + 1) * plane], x, rows.clone(), v, nt);
    });
}

/// How V, the transformed input of a block of nt tiles, is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// C_in × α² × nt: each channel's α² rows together.
    ChannelMajor,
    /// α² × C_in × nt: V\[ξ\] (C_in × nt) one contiguous block, the blocks `stride` floats
    /// apart ([`odd_lines`] of C_in·nt). The fused forward's products read it in place: a
    /// few pages, where with the channel-major layout each of its C_in rows lay α²·nt floats
    /// (kilobytes) apart, a page per row.
    PositionMajor {
        /// Floats from V\[ξ\] to V\[ξ + 1\].
        stride: usize,
    },
}

/// `floats` rounded up to an odd number of 64-byte cache lines: the stride between blocks
/// (or rows) that are written or read together.
///
/// Blocks a power of two apart fall in one set of the L1 cache, which holds 8 lines a set.
/// The input transform writes each tile's α² values into α² blocks at once: with 256
/// channels × 16 tiles (16 KiB) between its position-major blocks, F(4×4, 3×3)'s input
/// transform on 14 × 14 maps took 0.23 ms per task, 7 times F(2×2, 3×3)'s on 14 tiles
/// (2-core Zen 4). An odd number of lines puts consecutive blocks in different sets.
fn odd_lines(floats: usize) -> usize {
    const LINE: usize = 16;
    (floats.div_ceil(LINE) | 1) * LINE
}

/// The rows one channel's input transform works on: α input rows padded with a zero column
/// on the left and enough on the right (padded column j holds input column j − 1), and Bᵀ d
/// of them.
struct InputLines {
    tile: Tile,
    d: Vec<Vec<f32>>,
    t: Vec<Vec<f32>>,
    /// Whether the transform runs on AVX-512 vectors (`transforms_avx512`).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    vectors: bool,
}

impl InputLines {
    fn new(x: Shape, tile: Tile) -> Self {
        #[cfg(target_arch = "x86_64")]
        let vectors = Avx512::detect().is_some();
        #[cfg(not(target_arch = "x86_64"))]
        let vectors = false;
        Self::with_vectors(x, tile, vectors)
    }

    /// Lines whose transform runs on AVX-512 vectors where `vectors` is set (the CPU must
    /// have AVX-512 F then: [`Self::new`] checks).
    fn with_vectors(x: Shape, tile: Tile, vectors: bool) -> Self {
        let m = tile.m();
        let wp = m * x.w.div_ceil(m) + 2;
        Self {
            vectors,
            tile,
            d: vec![vec![0f32; wp]; tile.alpha()],
            t: vec![vec![0f32; wp]; tile.alpha()],
        }
    }

    /// V of the channels `channels` of `data` (shape `x`) for the tile rows `rows`, laid out
    /// as `layout` says (channel `channels.start` first), on the calling thread.
    fn transform_channels(
        &mut self,
        data: &[f32],
        x: Shape,
        rows: std::ops::Range<usize>,
        v: &mut [f32],
        layout: Layout,
        channels: std::ops::Range<usize>,
    ) {
        let plane = x.plane();
        let nt = rows.len() * x.w.div_ceil(self.tile.m());
        for (i, ci) in channels.enumerate() {
            let src = &data[ci * plane..][..plane];
            match layout {
                Layout::ChannelMajor => {
                    let v = &mut v[i * self.tile.positions() * nt..];
                    self.transform(src, x, rows.clone(), v, nt);
                }
                Layout::PositionMajor { stride } => {
                    self.transform(src, x, rows.clone(), &mut v[i * nt..], stride)
                }
            }
        }
    }

    /// V of one channel: Bᵀ d B for every tile of the tile rows `rows` of `src` (the
    /// channel's B × H × W values), ξ's row (nt floats) at `ld`·ξ in `v`.
    fn transform(
        &mut self,
        src: &[f32],
        x: Shape,
        rows: std::ops::Range<usize>,
        v: &mut [f32],
        ld: usize,
    ) {
        let (h, w, m) = (x.h, x.w, self.tile.m());
        let (th, tw) = (h.div_ceil(m), w.div_ceil(m));
        let (d, t) = (&mut self.d, &mut self.t);
        let wp = d[0].len();
        for (k, tile_row) in rows.enumerate() {
            let (img, ty) = (tile_row / th, tile_row % th);
            for (r, dr) in d.iter_mut().enumerate() {
                let iy = (m * ty + r).wrapping_sub(1);
                if iy < h {
                    dr[1..=w].copy_from_slice(&src[(img * h + iy) * w..][..w]);
                } else {
                    dr[1..=w].fill(0.0);
                }
            }
            let at = k * tw;
            assert!(
                v.len() >= (self.tile.positions() - 1) * ld + at + tw,
                "winograd: transformed input short"
            );
            #[cfg(target_arch = "x86_64")]
            if self.vectors {
                // SAFETY: `vectors` is set only where the CPU has AVX-512 F
                // (`InputLines::new`); `d` holds α rows of wp = m·tw + 2 floats, and `v` the
                // rows asserted above.
                unsafe {
                    match self.tile {
                        Tile::Two => transforms_avx512::input_tile_row_2x2(d, tw, v, ld, at),
                        Tile::Four => transforms_avx512::input_tile_row_4x4(d, tw, v, ld, at),
                    }
                };
                continue;
            }
            match self.tile {
                Tile::Two => {
                    // Bᵀ d, along the rows, for every column at once.
                    for j in 0..wp {
                        let (d0, d1, d2, d3) = (d[0][j], d[1][j], d[2][j], d[3][j]);
                        t[0][j] = d0 - d2;
                        t[1][j] = d1 + d2;
                        t[2][j] = d2 - d1;
                        t[3][j] = d1 - d3;
                    }
                    // (Bᵀ d) B, per tile: padded columns 2·tx .. 2·tx + 3.
                    for (r, tr) in t.iter().enumerate() {
                        let (o0, rest) = v[4 * r * ld + at..].split_at_mut(ld);
                        let (o1, rest) = rest.split_at_mut(ld);
                        let (o2, o3) = rest.split_at_mut(ld);
                        for tx in 0..tw {
                            let c = &tr[2 * tx..2 * tx + 4];
                            o0[tx] = c[0] - c[2];
                            o1[tx] = c[1] + c[2];
                            o2[tx] = c[2] - c[1];
                            o3[tx] = c[1] - c[3];
                        }
                    }
                }
                Tile::Four => {
                    // Bᵀ d, along the rows, for every column at once (slices of one length,
                    // so that the loop vectorises).
                    let d: [&[f32]; 6] = std::array::from_fn(|r| &d[r][..wp]);
                    if let [t0, t1, t2, t3, t4, t5] = &mut t[..] {
                        let (t0, t1, t2) = (&mut t0[..wp], &mut t1[..wp], &mut t2[..wp]);
                        let (t3, t4, t5) = (&mut t3[..wp], &mut t4[..wp], &mut t5[..wp]);
                        for j in 0..wp {
                            let c =
                                input_4x4([d[0][j], d[1][j], d[2][j], d[3][j], d[4][j], d[5][j]]);
                            (t0[j], t1[j], t2[j]) = (c[0], c[1], c[2]);
                            (t3[j], t4[j], t5[j]) = (c[3], c[4], c[5]);
                        }
                    }
                    // (Bᵀ d) B, per tile: padded columns 4·tx .. 4·tx + 5.
                    for (r, tr) in t.iter().enumerate() {
                        let out = &mut v[6 * r * ld + at..];
                        let (o0, rest) = out.split_at_mut(ld);
                        let (o1, rest) = rest.split_at_mut(ld);
                        let (o2, rest) = rest.split_at_mut(ld);
                        let (o3, rest) = rest.split_at_mut(ld);
                        let (o4, o5) = rest.split_at_mut(ld);
                        let (o0, o1, o2) = (&mut o0[..tw], &mut o1[..tw], &mut o2[..tw]);
                        let (o3, o4, o5) = (&mut o3[..tw], &mut o4[..tw], &mut o5[..tw]);
                        for (tx, c) in tr.windows(6).step_by(4).take(tw).enumerate() {
                            let c = input_4x4([c[0], c[1], c[2], c[3], c[4], c[5]]);
                            (o0[tx], o1[tx], o2[tx]) = (c[0], c[1], c[2]);
                            (o3[tx], o4[tx], o5[tx]) = (c[3], c[4], c[5]);
                        }
                    }
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
            // All the tiles in one call: line r holds output row r of each tile row in turn
            // (as in `forward`).
            let mut y = vec![vec![0f32; 2 * nt]; 2];
            output_tile_row(Tile::Two, m, nt, 0, nt, &mut y);
            for (k, tile_row) in rows.clone().enumerate() {
                for (oy, r) in output_lines(x, tile_row, 2) {
                    let line = &mut dst[oy..][..w];
                    line.iter_mut()
                        .zip(&y[r][2 * k * tw..])
                        .for_each(|(o, v)| *o += v);
                }
            }
        });
}

/// The output rows of tile row `tile_row` (tiles of m × m outputs) inside the map: (offset
/// of the row in a channel's B × H × W values, which of the tile's m rows).
fn output_lines(x: Shape, tile_row: usize, m: usize) -> impl Iterator<Item = (usize, usize)> {
    let th = x.h.div_ceil(m);
    let (img, ty) = (tile_row / th, tile_row % th);
    (0..m)
        .filter(move |r| m * ty + r < x.h)
        .map(move |r| ((img * x.h + m * ty + r) * x.w, r))
}

/// Aᵀ m A for the `tw` tiles from column `at` of one channel's M (α² rows `nt` apart): the m
/// output rows of those tiles, m·tw values each, into `y`. Sixteen tiles at a time in 512-bit
/// vectors where the CPU has AVX-512 ([`transforms_avx512`]: the same operations in the same
/// order, so the same values), else one tile at a time.
fn output_tile_row(tile: Tile, m: &[f32], nt: usize, at: usize, tw: usize, y: &mut [Vec<f32>]) {
    let side = tile.m();
    assert!(
        m.len() >= (tile.positions() - 1) * nt + at + tw,
        "winograd: products too short"
    );
    assert!(
        y.len() == side && y.iter().all(|line| line.len() >= side * tw),
        "winograd: output rows too short"
    );
    #[cfg(target_arch = "x86_64")]
    if Avx512::detect().is_some() {
        // SAFETY: the token proves AVX-512 F; the asserts above are the bounds it needs.
        return unsafe {
            match tile {
                Tile::Two => transforms_avx512::tile_row_2x2(m, nt, at, tw, y),
                Tile::Four => transforms_avx512::tile_row_4x4(m, nt, at, tw, y),
            }
        };
    }
    match tile {
        Tile::Two => output_tile_row_portable(m, nt, at, tw, y),
        Tile::Four => output_tile_row_4x4_portable(m, nt, at, tw, y),
    }
}

/// [`output_tile_row`] of F(2×2, 3×3) one tile at a time, in plain Rust.
fn output_tile_row_portable(m: &[f32], nt: usize, at: usize, tw: usize, y: &mut [Vec<f32>]) {
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

/// [`output_tile_row`] of F(4×4, 3×3) one tile at a time, in plain Rust.
fn output_tile_row_4x4_portable(m: &[f32], nt: usize, at: usize, tw: usize, y: &mut [Vec<f32>]) {
    let rows: [&[f32]; 36] = std::array::from_fn(|xi| &m[xi * nt + at..][..tw]);
    let [y0, y1, y2, y3] = y else {
        unreachable!("F(4×4, 3×3) writes four output rows");
    };
    let mut lines = [
        &mut y0[..4 * tw],
        &mut y1[..4 * tw],
        &mut y2[..4 * tw],
        &mut y3[..4 * tw],
    ];
    for tx in 0..tw {
        // Aᵀ along the columns of the 6 × 6 block (column j from rows j, 6 + j, ...), then
        // along the rows of the 4 × 6 result.
        let columns: [[f32; 4]; 6] = std::array::from_fn(|j| {
            output_4x4([
                rows[j][tx],
                rows[6 + j][tx],
                rows[12 + j][tx],
                rows[18 + j][tx],
                rows[24 + j][tx],
                rows[30 + j][tx],
            ])
        });
        for (r, line) in lines.iter_mut().enumerate() {
            let out = output_4x4([
                columns[0][r],
                columns[1][r],
                columns[2][r],
                columns[3][r],
                columns[4][r],
                columns[5][r],
            ]);
            line[4 * tx..4 * tx + 4].copy_from_slice(&out);
        }
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
    let (tile_rows, per_task) = tile_rows_per_task(x, cout, Tile::Two);
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
                InputLines::new(x, Tile::Two).transform_channels(
                    data,
                    x,
                    rows.clone(),
                    v,
                    Layout::ChannelMajor,
                    0..cin,
                );
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

/// The transforms on 512-bit vectors, lane i on tile tx + i: F(2×2, 3×3)'s input transform
/// (each tile's four columns picked from two vectors of a row by permutes), and both output
/// transforms (the phases of each output row, column m·tx + j from phase j, interleaved
/// before the stores). The same operations in the same order as the scalar code, so the same
/// values.
#[cfg(target_arch = "x86_64")]
mod transforms_avx512 {
    use std::arch::x86_64::{
        __m512, __m512i, __mmask16, _mm512_add_ps, _mm512_castpd_ps, _mm512_castps_pd,
        _mm512_mask_storeu_ps, _mm512_maskz_loadu_ps, _mm512_mul_ps, _mm512_permutex2var_ps,
        _mm512_set1_ps, _mm512_setr_epi32, _mm512_setzero_ps, _mm512_shuffle_f32x4, _mm512_sub_ps,
        _mm512_unpackhi_pd, _mm512_unpackhi_ps, _mm512_unpacklo_pd, _mm512_unpacklo_ps,
    };

    /// Lanes `0..n` on (n ≤ 16).
    fn first_lanes(n: usize) -> __mmask16 {
        ((1u32 << n.min(16)) - 1) as __mmask16
    }

    /// Floats `o .. o + 16` of `row`, those at `len` and past read as zero (not read).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `row` must hold `len` floats at least.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load_row(row: &[f32], len: usize, o: usize) -> __m512 {
        let mask = first_lanes(len.saturating_sub(o));
        // SAFETY: the lanes on read floats o + i < len of `row` (the caller's contract); the
        // others are not read.
        unsafe { _mm512_maskz_loadu_ps(mask, row.as_ptr().wrapping_add(o)) }
    }

    /// Lanes `0..n` of `values[j]` to `v[(first + j)·ld + at ..]`: one tile per lane, the
    /// values rows `first ..` of V (or M).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `v` must hold (first + N − 1)·ld + at + n floats at least.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_rows<const N: usize>(
        v: &mut [f32],
        (first, ld, at): (usize, usize, usize),
        n: usize,
        values: [__m512; N],
    ) {
        for (j, value) in values.into_iter().enumerate() {
            // SAFETY: the lanes on write v[(first + j)·ld + at + i], i < n: inside `v` (the
            // caller's contract).
            unsafe {
                let to = v.as_mut_ptr().add((first + j) * ld + at);
                _mm512_mask_storeu_ps(to, first_lanes(n), value)
            };
        }
    }

    /// `count` floats of the vectors, one after another, to `line[from..]`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `line` must hold `from + count` floats at least, and
    /// count ≤ 16·N.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn store_line<const N: usize>(
        line: &mut [f32],
        from: usize,
        count: usize,
        vectors: [__m512; N],
    ) {
        for (k, value) in vectors.into_iter().enumerate() {
            let valid = count.saturating_sub(16 * k);
            if valid == 0 {
                break;
            }
            // SAFETY: the lanes on write line[from + 16·k + i] with 16·k + i < count: inside
            // the line (the caller's contract).
            unsafe {
                let to = line.as_mut_ptr().add(from + 16 * k);
                _mm512_mask_storeu_ps(to, first_lanes(valid), value)
            };
        }
    }

    /// Aᵀ m for one column or row m of six vectors of a 6 × 6 block: `super::output_4x4`'s
    /// operations in its order (no fused multiply-adds), so that each lane equals it.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn output_4x4([m0, m1, m2, m3, m4, m5]: [__m512; 6]) -> [__m512; 4] {
        let add = _mm512_add_ps;
        let sub = _mm512_sub_ps;
        let times = |k: f32, v: __m512| _mm512_mul_ps(_mm512_set1_ps(k), v);
        [
            add(add(add(add(m0, m1), m2), m3), m4),
            add(sub(m1, m2), times(2.0, sub(m3, m4))),
            add(add(m1, m2), times(4.0, add(m3, m4))),
            add(add(sub(m1, m2), times(8.0, sub(m3, m4))), m5),
        ]
    }

    /// The four phases p (entry i of phase j: column 4·i + j) interleaved: 64 floats, as
    /// four vectors of 16 (columns 0-15, 16-31, ...).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn interleave([p0, p1, p2, p3]: [__m512; 4]) -> [__m512; 4] {
        let pd = _mm512_castps_pd;
        let ps = _mm512_castpd_ps;
        // Per 128-bit lane L (entries 4L .. 4L + 3): a = p0, p1 of entries 4L, 4L + 1;
        // b = of entries 4L + 2, 4L + 3; c and d the same of p2, p3.
        let (a, b) = (_mm512_unpacklo_ps(p0, p1), _mm512_unpackhi_ps(p0, p1));
        let (c, d) = (_mm512_unpacklo_ps(p2, p3), _mm512_unpackhi_ps(p2, p3));
        // Per lane L: e = the four phases of entry 4L, f of 4L + 1, g of 4L + 2, h of 4L + 3.
        let e = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        let f = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        let g = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        let h = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
        // Lanes 0, 1 of e, f and of g, h; then lanes 2, 3.
        let t0 = _mm512_shuffle_f32x4::<0b01_00_01_00>(e, f);
        let t1 = _mm512_shuffle_f32x4::<0b01_00_01_00>(g, h);
        let t2 = _mm512_shuffle_f32x4::<0b11_10_11_10>(e, f);
        let t3 = _mm512_shuffle_f32x4::<0b11_10_11_10>(g, h);
        [
            // Entries 0-3: lane 0 of e, f, g, h.
            _mm512_shuffle_f32x4::<0b10_00_10_00>(t0, t1),
            // Entries 4-7: lane 1 of each.
            _mm512_shuffle_f32x4::<0b11_01_11_01>(t0, t1),
            _mm512_shuffle_f32x4::<0b10_00_10_00>(t2, t3),
            _mm512_shuffle_f32x4::<0b11_01_11_01>(t2, t3),
        ]
    }

    /// F(2×2, 3×3)'s Bᵀ d B for the `tw` tiles of one tile row, from the four padded input
    /// rows `d` (padded column j holds input column j − 1): entry j of row r of every tile to
    /// `v[(4·r + j)·ld + at + tx]`, as the scalar loops of `InputLines::transform`.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `d` must hold four rows of at least 2·tw + 2 floats, and
    /// `v` at least 15·ld + at + tw floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_tile_row_2x2(
        d: &[Vec<f32>],
        tw: usize,
        v: &mut [f32],
        ld: usize,
        at: usize,
    ) {
        let len = 2 * tw + 2;
        let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
        let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
        let mut tx = 0;
        while tx < tw {
            let n = (tw - tx).min(16);
            // Columns o .. o + 16 of row r, those past the row's `len` read as zero (never
            // used: tile tx + i < tw reads columns up to 2·(tx + i) + 3 < len).
            // SAFETY: row r holds `len` floats at least (the caller's contract).
            let load = |r: usize, o: usize| unsafe { load_row(&d[r], len, o) };
            // Bᵀ d along the rows for columns 2·tx + (0, 16, 2, 18) + lane.
            let offsets = [2 * tx, 2 * tx + 16, 2 * tx + 2, 2 * tx + 18];
            // (A plain loop: the compiler left a closure of `map` as a call.)
            // With eight tiles or fewer, columns 2·tx + 16 .. are not read (t[1] and t[3]
            // stay zero).
            let mut t = [[_mm512_setzero_ps(); 4]; 4];
            for (k, (t, o)) in t.iter_mut().zip(offsets).enumerate() {
                if n <= 8 && k % 2 == 1 {
                    continue;
                }
                let (d0, d1, d2, d3) = (load(0, o), load(1, o), load(2, o), load(3, o));
                *t = [sub(d0, d2), add(d1, d2), sub(d2, d1), sub(d1, d3)];
            }
            // `r` picks the same row of four vectors of `t`.
            #[allow(clippy::needless_range_loop)]
            for r in 0..4 {
                // Columns 2·tx + 2·i + (0, 1) and 2·tx + 2·i + (2, 3) of tile tx + i.
                let c0 = _mm512_permutex2var_ps(t[0][r], even, t[1][r]);
                let c1 = _mm512_permutex2var_ps(t[0][r], odd, t[1][r]);
                let c2 = _mm512_permutex2var_ps(t[2][r], even, t[3][r]);
                let c3 = _mm512_permutex2var_ps(t[2][r], odd, t[3][r]);
                let out = [sub(c0, c2), add(c1, c2), sub(c2, c1), sub(c1, c3)];
                // SAFETY: rows 4·r .. 4·r + 3 ≤ 15, columns at + tx + i < at + tw: inside `v`
                // (the caller's contract).
                unsafe { store_rows(v, (4 * r, ld, at + tx), n, out) };
            }
            tx += n;
        }
    }

    /// `super::input_4x4` on vectors, its operations in its order (no fused multiply-adds).
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn input_4x4([d0, d1, d2, d3, d4, d5]: [__m512; 6]) -> [__m512; 6] {
        let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
        let times = |k: f32, v: __m512| _mm512_mul_ps(_mm512_set1_ps(k), v);
        [
            add(sub(times(4.0, d0), times(5.0, d2)), d4),
            add(add(sub(times(-4.0, d1), times(4.0, d2)), d3), d4),
            add(sub(sub(times(4.0, d1), times(4.0, d2)), d3), d4),
            add(add(sub(times(-2.0, d1), d2), times(2.0, d3)), d4),
            add(sub(sub(times(2.0, d1), d2), times(2.0, d3)), d4),
            add(sub(times(4.0, d1), times(5.0, d3)), d5),
        ]
    }

    /// F(4×4, 3×3)'s Bᵀ d B for the `tw` tiles of one tile row, from the six padded input
    /// rows `d` (padded column j holds input column j − 1): entry j of row r of every tile to
    /// `v[(6·r + j)·ld + at + tx]`, as the scalar loops of `InputLines::transform`. Tile
    /// tx + i reads columns 4·(tx + i) .. + 5: the row pass runs on the vectors of columns
    /// 4·tx + 16·k + lane (k = 0..4, and the two columns past them), then permutes pick each
    /// tile's six columns.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `d` must hold six rows of at least 4·tw + 2 floats, and
    /// `v` at least 35·ld + at + tw floats.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn input_tile_row_4x4(
        d: &[Vec<f32>],
        tw: usize,
        v: &mut [f32],
        ld: usize,
        at: usize,
    ) {
        let len = 4 * tw + 2;
        // Entries q, q + 4, .., q + 28 of two vectors (the first eight lanes).
        let phase: [__m512i; 4] = std::array::from_fn(|q| {
            let q = q as i32;
            _mm512_setr_epi32(
                q,
                q + 4,
                q + 8,
                q + 12,
                q + 16,
                q + 20,
                q + 24,
                q + 28,
                q,
                q,
                q,
                q,
                q,
                q,
                q,
                q,
            )
        });
        // Lanes 1.. of the first vector, then lane 0 (or 1) of the second: one tile on.
        let next: [__m512i; 2] = std::array::from_fn(|q| {
            let q = q as i32;
            _mm512_setr_epi32(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16 + q)
        });
        let mut tx = 0;
        while tx < tw {
            let n = (tw - tx).min(16);
            // Columns o .. o + 16 of row r, those past the row's `len` read as zero (never
            // used: tile tx + i < tw reads columns up to 4·(tx + i) + 5 < len).
            // SAFETY: row r holds `len` floats at least (the caller's contract).
            let load = |r: usize, o: usize| unsafe { load_row(&d[r], len, o) };
            // Bᵀ d along the rows, for columns 4·tx + 16·k + lane: t[k][r].
            // (Plain loops here and below: the compiler left `array::from_fn`'s closures as
            // calls, each passing its vectors through memory.)
            // Only the vectors holding columns the n tiles read (up to 4·tx + 4·n + 1): the
            // others stay zero, as do, with seven tiles or fewer, the permutes' high halves.
            let mut t = [[_mm512_setzero_ps(); 6]; 5];
            for (k, t) in t.iter_mut().enumerate().take((4 * n + 1) / 16 + 1) {
                let o = 4 * tx + 16 * k;
                let (d0, d1, d2) = (load(0, o), load(1, o), load(2, o));
                let (d3, d4, d5) = (load(3, o), load(4, o), load(5, o));
                *t = input_4x4([d0, d1, d2, d3, d4, d5]);
            }
            // `r` picks the same row of five vectors of `t`.
            #[allow(clippy::needless_range_loop)]
            for r in 0..6 {
                // Column 4·(tx + i) + q of every tile: phase q of the first 64 columns.
                let mut c = [_mm512_setzero_ps(); 4];
                for (c, phase) in c.iter_mut().zip(&phase) {
                    let low = _mm512_permutex2var_ps(t[0][r], *phase, t[1][r]);
                    *c = match n {
                        // Lanes 8.. (columns 4·tx + 32 ..) unread.
                        ..8 => low,
                        _ => {
                            let high = _mm512_permutex2var_ps(t[2][r], *phase, t[3][r]);
                            _mm512_shuffle_f32x4::<0b01_00_01_00>(low, high)
                        }
                    };
                }
                // Columns 4·(tx + i) + 4 and + 5: phases 0 and 1 one tile on.
                let c4 = _mm512_permutex2var_ps(c[0], next[0], t[4][r]);
                let c5 = _mm512_permutex2var_ps(c[1], next[1], t[4][r]);
                let out = input_4x4([c[0], c[1], c[2], c[3], c4, c5]);
                // SAFETY: rows 6·r .. 6·r + 5 ≤ 35, columns at + tx + i < at + tw: inside `v`
                // (the caller's contract).
                unsafe { store_rows(v, (6 * r, ld, at + tx), n, out) };
            }
            tx += n;
        }
    }

    /// Two phases (entry i of phase j: column 2·i + j) interleaved: 32 floats, as two
    /// vectors of 16.
    #[inline]
    #[target_feature(enable = "avx512f")]
    fn interleave_two(p0: __m512, p1: __m512) -> [__m512; 2] {
        // Per 128-bit lane L: lo = entries 4L, 4L + 1 of both phases, hi = 4L + 2, 4L + 3.
        let (lo, hi) = (_mm512_unpacklo_ps(p0, p1), _mm512_unpackhi_ps(p0, p1));
        // [lo lane 0, lo lane 1, hi lane 0, hi lane 1], then in the order 0, 2, 1, 3.
        let first = _mm512_shuffle_f32x4::<0b01_00_01_00>(lo, hi);
        let second = _mm512_shuffle_f32x4::<0b11_10_11_10>(lo, hi);
        [
            _mm512_shuffle_f32x4::<0b11_01_10_00>(first, first),
            _mm512_shuffle_f32x4::<0b11_01_10_00>(second, second),
        ]
    }

    /// [`super::output_tile_row`] of F(2×2, 3×3) sixteen tiles at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `m` must hold 15·nt + at + tw floats at least, and `y` two
    /// rows of at least 2·tw floats (what the caller asserts).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_row_2x2(
        m: &[f32],
        nt: usize,
        at: usize,
        tw: usize,
        y: &mut [Vec<f32>],
    ) {
        let (add, sub) = (_mm512_add_ps, _mm512_sub_ps);
        let mut tx = 0;
        while tx < tw {
            let n = (tw - tx).min(16);
            // Tiles tx .. tx + n of row ξ ≤ 15 (inside `m`: the caller's contract).
            // SAFETY: the slice holds n floats at least.
            let r = |xi: usize| unsafe { load_row(&m[xi * nt + at + tx..], n, 0) };
            // As `output_tile_row_portable`, operation for operation.
            let (mut s, mut d) = ([_mm512_setzero_ps(); 4], [_mm512_setzero_ps(); 4]);
            for c in 0..4 {
                s[c] = add(add(r(c), r(4 + c)), r(8 + c));
                d[c] = sub(sub(r(4 + c), r(8 + c)), r(12 + c));
            }
            let rows = [
                (add(add(s[0], s[1]), s[2]), sub(sub(s[1], s[2]), s[3])),
                (add(add(d[0], d[1]), d[2]), sub(sub(d[1], d[2]), d[3])),
            ];
            for (line, (even, odd)) in y.iter_mut().zip(rows) {
                // SAFETY: columns 2·tx .. 2·(tx + n) ≤ 2·tw of the line, which holds 2·tw
                // floats (the caller's contract).
                unsafe { store_line(line, 2 * tx, 2 * n, interleave_two(even, odd)) };
            }
            tx += n;
        }
    }

    /// [`super::output_tile_row`] of F(4×4, 3×3) sixteen tiles at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F; `m` must hold 35·nt + at + tw floats at least, and `y` four
    /// rows of at least 4·tw floats (what the caller asserts).
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_row_4x4(
        m: &[f32],
        nt: usize,
        at: usize,
        tw: usize,
        y: &mut [Vec<f32>],
    ) {
        let mut tx = 0;
        while tx < tw {
            let n = (tw - tx).min(16);
            // Tiles tx .. tx + n of row ξ ≤ 35 (inside `m`: the caller's contract).
            // SAFETY: the slice holds n floats at least.
            let load = |xi: usize| unsafe { load_row(&m[xi * nt + at + tx..], n, 0) };
            // Aᵀ along the columns of the 6 × 6 block (column j from rows j, 6 + j, ...), then
            // along the rows of the 4 × 6 result, as `output_tile_row_4x4_portable`.
            // (A plain loop: the compiler left `array::from_fn`'s closure as a call.)
            let mut columns = [[_mm512_setzero_ps(); 4]; 6];
            for (j, column) in columns.iter_mut().enumerate() {
                let (m0, m1, m2) = (load(j), load(6 + j), load(12 + j));
                let (m3, m4, m5) = (load(18 + j), load(24 + j), load(30 + j));
                *column = output_4x4([m0, m1, m2, m3, m4, m5]);
            }
            for (r, line) in y.iter_mut().enumerate() {
                let c = |j: usize| columns[j][r];
                let phases = output_4x4([c(0), c(1), c(2), c(3), c(4), c(5)]);
                // SAFETY: columns 4·tx .. 4·(tx + n) ≤ 4·tw of the line, which holds 4·tw
                // floats (the caller's contract).
                unsafe { store_line(line, 4 * tx, 4 * n, interleave(phases)) };
            }
            tx += n;
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
            let filter = WinogradFilter::new(&weights, cout, cin, Tile::Two);
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

    /// A value out of F(4×4, 3×3)'s range anywhere in the map (any channel, image, row; tasks
    /// on tile rows, on channel groups with the input transformed once, or with each
    /// transforming it; 1, 2 and 7 threads) makes it decline the map.
    #[test]
    fn four_by_four_declines_an_out_of_range_value_anywhere() {
        let mut rng = StdRng::seed_from_u64(15);
        for &(b, cin, cout, h, w) in &[
            (2, 8, 16, 28, 28),
            (1, 8, 8, 30, 26),
            (1, 256, 16, 14, 14),
            (1, 24, 16, 13, 14),
        ] {
            let mut x = Maps {
                data: random(&mut rng, cin * b * h * w),
                c: cin,
                b,
                h,
                w,
            };
            let weights = random(&mut rng, cout * cin * 9);
            let filter = WinogradFilter::new(&weights, cout, cin, Tile::Four);
            if filter.packed.is_none() {
                eprintln!("no panel kernel on this CPU: the fused forward is not used");
                return;
            }
            let zeros = vec![0f32; cout];
            let plane = x.plane();
            let last = x.data.len() - 1;
            let places = [
                0,
                w + 3,
                plane / 2,
                plane - 1,
                (cin / 2) * plane + plane / 3,
                last,
            ];
            for threads in [1, 2, 7] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("a thread pool");
                let run = |x: &Maps| {
                    pool.install(|| forward(&x.data, Shape::of(x), &filter, &zeros, None, false))
                };
                assert!(run(&x).is_some(), "{b}x{cin}x{h}x{w}: in range");
                for &at in &places {
                    for bad in [f32::NAN, f32::NEG_INFINITY, 2e36] {
                        let kept = std::mem::replace(&mut x.data[at], bad);
                        assert!(
                            run(&x).is_none(),
                            "{b}x{cin}x{h}x{w}, {threads} threads: {bad} at {at} taken"
                        );
                        x.data[at] = kept;
                    }
                }
            }
        }
    }

    /// The fused forward, F(2×2, 3×3) and F(4×4, 3×3), equals im2col's convolution plus bias
    /// (plus residual), then ReLU, on odd and even maps (sides 1 to 4 past a multiple of the
    /// tile), batches of one and several, channel counts that leave edge panels, in pools of
    /// 1, 2 and 7 threads (tile rows and channels cut differently, the input transformed by
    /// each task or once for all of them); a NaN input stays NaN through the ReLU.
    #[test]
    fn fused_forward_equals_the_convolution_plus_bias_and_relu() {
        let mut rng = StdRng::seed_from_u64(14);
        for (tile, &(b, cin, cout, h, w)) in [Tile::Two, Tile::Four].into_iter().flat_map(|t| {
            [
                (1, 16, 72, 14, 14),
                (2, 8, 16, 7, 9),
                (1, 3, 5, 1, 6),
                (3, 24, 40, 12, 13),
                (2, 40, 24, 17, 18),
                (1, 64, 64, 28, 28),
                // One image on 7 × 7 maps: F(2×2, 3×3)'s tasks split the channels (10
                // panels of the 8-row kernel).
                (1, 24, 80, 7, 7),
                // 18 tiles per row: F(4×4, 3×3)'s vector output transform takes 16, then 2.
                (1, 8, 16, 9, 70),
                // One image, channels that split into a group per thread on the panel
                // kernel's blocks (two threads): the input transformed once, shared.
                (1, 512, 16, 7, 7),
                (1, 256, 24, 14, 14),
            ]
            .iter()
            .map(move |shape| (t, shape))
        }) {
            let mut x = Maps {
                data: random(&mut rng, cin * b * h * w),
                c: cin,
                b,
                h,
                w,
            };
            x.data[5] = f32::NAN;
            let weights = random(&mut rng, cout * cin * 9);
            let filter = WinogradFilter::new(&weights, cout, cin, tile);
            if filter.packed.is_none() {
                eprintln!("no panel kernel on this CPU: the fused forward is not used");
                return;
            }
            if tile == Tile::Four {
                // F(4×4, 3×3) declines a map holding NaN (or an infinity).
                let zeros = vec![0f32; cout];
                assert!(forward(&x.data, Shape::of(&x), &filter, &zeros, None, true).is_none());
                x.data[5] = f32::INFINITY;
                assert!(forward(&x.data, Shape::of(&x), &filter, &zeros, None, true).is_none());
                // A finite value whose transform could overflow too.
                x.data[5] = -1e37;
                assert!(forward(&x.data, Shape::of(&x), &filter, &zeros, None, true).is_none());
                x.data[5] = 0.25;
            }
            let bias = random(&mut rng, cout);
            let residual = random(&mut rng, cout * x.plane());
            let conv = direct(&x, &weights, cout);
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
                            "{tile:?} {threads} threads, {b}x{cin}x{h}x{w} -> {cout} at {i}: \
                             {g} vs {want}"
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
        let filter = WinogradFilter::new(&weights, cout, cin, Tile::Two);
        accumulate(&x.data, Shape::of(&x), &filter, &mut conv_x);
        let mut adjoint_y = vec![0f32; x.data.len()];
        let adjoint = WinogradFilter::adjoint(&weights, cout, cin, Tile::Two);
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
        let filter = WinogradFilter::new(&[0.5; 8 * 4 * 9], 8, 4, Tile::Two);
        if filter.packed.is_some() {
            let out = forward(&[], x, &filter, &[0.0; 8], None, true).expect("a panel kernel");
            assert!(out.is_empty());
        }
        assert_eq!(kernel_gradient(&[], x, &[], 8), vec![0.0; 8 * 4 * 9]);
    }

    /// The AVX-512 transforms give the scalar code's values bit for bit (the same operations
    /// in the same order): F(2×2, 3×3)'s and F(4×4, 3×3)'s input and output transforms on
    /// rows of 1 to 35 tiles (one vector, a masked one, several), NaN, infinities and large
    /// values included.
    #[test]
    fn vector_transforms_equal_the_scalar_ones_bit_for_bit() {
        #[cfg(target_arch = "x86_64")]
        if Avx512::detect().is_some() {
            let mut rng = StdRng::seed_from_u64(21);
            let same = |a: &[f32], b: &[f32], what: &str| {
                for (i, (a, b)) in a.iter().zip(b).enumerate() {
                    assert!(
                        a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()),
                        "{what} [{i}]: {a} vs {b}"
                    );
                }
            };
            for tile in [Tile::Two, Tile::Four] {
                for (b, h, w) in [(1, 3, 1), (2, 9, 14), (1, 8, 64), (1, 5, 66), (3, 4, 140)] {
                    let x = Shape { c: 3, b, h, w };
                    let mut data = random(&mut rng, 3 * x.plane());
                    data[1] = f32::NAN;
                    data[x.plane() / 2] = f32::INFINITY;
                    data[x.plane() + 3] = 3e37;
                    let tile_rows = b * h.div_ceil(tile.m());
                    let nt = tile_rows * w.div_ceil(tile.m());
                    let len = 3 * tile.positions() * nt;
                    let (mut fast, mut plain) = (vec![0f32; len], vec![0f32; len]);
                    let layout = Layout::ChannelMajor;
                    InputLines::with_vectors(x, tile, true).transform_channels(
                        &data,
                        x,
                        0..tile_rows,
                        &mut fast,
                        layout,
                        0..3,
                    );
                    InputLines::with_vectors(x, tile, false).transform_channels(
                        &data,
                        x,
                        0..tile_rows,
                        &mut plain,
                        layout,
                        0..3,
                    );
                    same(&fast, &plain, &format!("{tile:?} input {b}x{h}x{w}"));
                    // The output transform of one channel's products, every tile row.
                    let tw = w.div_ceil(tile.m());
                    let m = &fast[..tile.positions() * nt];
                    let lines = || vec![vec![0f32; tile.m() * tw]; tile.m()];
                    for k in 0..tile_rows {
                        let (mut y_fast, mut y_plain) = (lines(), lines());
                        output_tile_row(tile, m, nt, k * tw, tw, &mut y_fast);
                        match tile {
                            Tile::Two => output_tile_row_portable(m, nt, k * tw, tw, &mut y_plain),
                            Tile::Four => {
                                output_tile_row_4x4_portable(m, nt, k * tw, tw, &mut y_plain)
                            }
                        }
                        same(
                            &y_fast.concat(),
                            &y_plain.concat(),
                            &format!("{tile:?} output {b}x{h}x{w} tile row {k}"),
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn pays_only_where_tiles_fit() {
        assert!(pays(1, 56, 56) && pays(1, 14, 14) && pays(1, 13, 13) && pays(1, 28, 12));
        assert!(!pays(1, 8, 8) && !pays(1, 7, 7) && !pays(1, 1, 1) && !pays(64, 3, 3));
        assert!(pays(64, 8, 8) && pays(64, 4, 4) && !pays(32, 7, 7) && !pays(8, 4, 4));
        assert!(pays_4x4(56, 56) && pays_4x4(28, 28) && !pays_4x4(14, 14) && !pays_4x4(56, 16));
        // The inference forward's small batches: 7 × 7 maps up to three images (16 tiles
        // each), not where the tiles are many, the maps tiny or the tiles mostly overhang.
        assert!(pays_small_batch(1, 7, 7) && pays_small_batch(3, 7, 7));
        assert!(!pays_small_batch(4, 7, 7) && !pays_small_batch(32, 7, 7));
        assert!(!pays_small_batch(1, 4, 4) && !pays_small_batch(1, 14, 14));
        assert!(!pays_small_batch(1, 5, 9) && !pays_small_batch(1, 1, 6));
        assert!(!few_tiles(1, 28, 28, Tile::Four) && few_tiles(1, 24, 24, Tile::Four));
        // F(4×4, 3×3) at small batches: 14 × 14 maps up to three images (16 tiles each),
        // not on maps under 12 × 12 nor where the tiles are many.
        assert!(pays_4x4_small_batch(1, 14, 14) && pays_4x4_small_batch(3, 14, 14));
        assert!(pays_4x4_small_batch(1, 12, 12) && pays_4x4_small_batch(1, 20, 20));
        assert!(!pays_4x4_small_batch(4, 14, 14) && !pays_4x4_small_batch(1, 28, 28));
        assert!(!pays_4x4_small_batch(1, 7, 7) && !pays_4x4_small_batch(1, 11, 40));
    }

    /// Strides of odd numbers of cache lines, at least the floats asked, less than two
    /// lines more.
    #[test]
    fn odd_lines_are_odd_and_cover_the_floats() {
        for floats in [0, 1, 15, 16, 17, 32, 3584, 4096, 8192, 16 * 49] {
            let stride = odd_lines(floats);
            assert!(
                stride >= floats && stride < floats + 32,
                "{floats}: {stride}"
            );
            assert!(
                stride.is_multiple_of(16) && !(stride / 16).is_multiple_of(2),
                "{floats}: {stride}"
            );
        }
    }

    /// F(4×4, 3×3)'s range: values up to 10³⁶ in magnitude, not beyond, not NaN nor
    /// infinite; an empty map is in range.
    #[test]
    fn the_4x4_range_stops_at_ten_to_the_36() {
        assert!(within_4x4_range(&[]) && within_4x4_range(&[0.0, -0.0, 1e-45, -3.5]));
        assert!(within_4x4_range(&[9.9e35, -1e36]));
        let mut large = vec![1.0f32; 70_000];
        for bad in [
            1.01e36,
            -1e37,
            f32::MAX,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
        ] {
            // In the second block of the parallel scan as well as the first.
            for at in [3, 69_999] {
                large[at] = bad;
                assert!(!within_4x4_range(&large), "{bad} at {at}");
                large[at] = 1.0;
            }
        }
        assert!(within_4x4_range(&large));
    }
}
