//! A conv's forward as one parallel region: its output cut into blocks of columns (and, where
//! columns are few, of output channels), each block computed start to end by one rayon task:
//! im2col of its columns into the thread's buffer, then the product with the weights packed
//! once ([`PackedLhs`]), which starts its sums from the bias (+ residual) and applies ReLU in
//! its stores, so that the output is written once.
//!
//! Before, a conv was three or four parallel passes (the output's initialisation, im2col, the
//! `gemm` crate's threaded product with its own packing of both operands, ReLU), each waking
//! the pool and walking the whole output. On 32 px images (8 × 8 maps and smaller), where a
//! conv is little arithmetic, those passes and hand-offs cost about as much as the products.
//! Here a block's columns are written by im2col and read by the product while they are in the
//! thread's cache.

use rayon::prelude::*;

use super::geometry::{Chunk, ConvPlan, ConvShape};
use super::im2col::im2col_serial;
use super::maps::Maps;
use super::scratch::ColsBuffer;
use crate::cpu::kernels::prepacked::{Ends, PackedLhs, Start};

/// Floats of im2col, or of output for a direct conv, per block (1 MiB): they stay in a
/// core's L2 cache. Weights of more floats than this count as not fitting it ([`blocks`]).
const BLOCK_FLOATS: usize = 1 << 18;

/// Floats of weights (128 KiB) up to which more column blocks cost no reads of them that
/// matter: they stay in a core's L1 and L2 caches from block to block.
const SMALL_WEIGHTS: usize = 1 << 15;

/// Blocks per thread at least, where the output has that many columns and the weights fit a
/// core's L2 cache: the work spreads evenly when the threads finish at different times.
const BLOCKS_PER_THREAD: usize = 2;

/// Where a conv's right operand comes from.
#[derive(Clone, Copy)]
pub(crate) enum Columns<'a> {
    /// `x` itself, k rows of `n` columns: a 1 × 1 stride-1 conv, or an unrolled conv's
    /// transposed maps.
    Direct(&'a [f32]),
    /// The im2col of `x` for `shape`, planned as `plan`.
    Im2col(&'a Maps, &'a ConvShape, &'a ConvPlan),
}

/// An output's pointer, shared by the tasks of one parallel region; each writes only its own
/// block (this module's and [`super::winograd`]'s products).
#[derive(Clone, Copy)]
pub(crate) struct SharedOutput(pub(crate) *mut f32);

impl SharedOutput {
    /// The element `offset` floats from the start (a method, so that a closure captures the
    /// whole `SharedOutput`, which is `Sync`, not its raw pointer field).
    pub(crate) fn at(self, offset: usize) -> *mut f32 {
        self.0.wrapping_add(offset)
    }
}

// SAFETY: the tasks that share it write disjoint blocks of the output (see `forward` and
// `winograd::packed_products`), and the output outlives them (they run inside the parallel
// loop of the function that owns it).
unsafe impl Send for SharedOutput {}
// SAFETY: as for `Send`.
unsafe impl Sync for SharedOutput {}

/// `weights` (C_out × K) times the columns (K × n) plus `bias` (per output channel) plus
/// `residual` (C_out × n) where given, then ReLU where asked: the C_out × n output.
///
/// ReLU keeps NaN (`v < 0 ? 0 : v`), as the backends' relu does.
pub(crate) fn forward(
    weights: &PackedLhs,
    columns: Columns<'_>,
    n: usize,
    bias: &[f32],
    residual: Option<&[f32]>,
    relu: bool,
) -> Vec<f32> {
    let m = weights.rows();
    let len = m * n;
    let grid = blocks(weights, columns, n);
    let mut out: Vec<f32> = Vec::with_capacity(len);
    let shared = SharedOutput(out.as_mut_ptr());
    (0..grid.count()).into_par_iter().for_each(|task| {
        let GridTask {
            items: cols,
            panels,
            ..
        } = grid.task(task);
        let width = cols.len();
        // This task's block: the rows of `panels` × columns `cols` of the m × n output (the
        // tasks cut it without overlap); row r at `block + r · n`.
        let block = shared.at(cols.start);
        let mut buffer;
        let (b, ldb) = match columns {
            Columns::Direct(x) => (&x[cols.start..], n),
            Columns::Im2col(x, shape, plan) => {
                let wo = plan.wo;
                let chunk = Chunk {
                    index: 0,
                    rows: cols.start / wo..cols.end / wo,
                    wo,
                };
                buffer = ColsBuffer::take();
                buffer.resize(shape.patch() * width, 0.0);
                im2col_serial(x, shape, plan, &chunk, 0..shape.patch(), &mut buffer);
                (&buffer[..], width)
            }
        };
        // Bias (+ residual), the product and ReLU in the product's stores: the output is
        // written once.
        let ends = Ends {
            start: Start::Bias {
                bias,
                residual: residual.map(|r| (&r[cols.start..], n)),
            },
            relu,
        };
        // SAFETY: the rows of `panels`, columns `cols` of the output from `block`: this
        // task's own block; the start is a bias, so the product writes each element before
        // reading it.
        unsafe { weights.multiply(panels, (b, ldb), width, (block, n), ends) };
    });
    // SAFETY: the blocks cover every row and column of the m × n output, and each task wrote
    // its block's every element (the product's first pass, which starts from the bias)
    // before finishing.
    unsafe { out.set_len(len) };
    out
}

/// How the columns of a conv's output are cut into blocks (whole output rows for im2col),
/// and, where they are few, its channels into groups ([`TaskGrid`]).
fn blocks(weights: &PackedLhs, columns: Columns<'_>, n: usize) -> TaskGrid {
    let threads = rayon::current_num_threads().max(1);
    let shape = weights.kernel().shape();
    // Every column block reads all the weights: where they outgrow a core's L2 cache, each
    // block streams them again from L3 or memory, so the columns are cut into one block per
    // thread rather than two (ResNet-18's 128 → 256-channel stride-2 conv at batch 1, 1.2 MB
    // of weights on 196 columns: 0.79 → 0.65 ms, 2-core Zen 4).
    let weight_floats = weights.rows() * weights.inner();
    let wanted = match weight_floats <= BLOCK_FLOATS {
        true => BLOCKS_PER_THREAD * threads,
        false => threads,
    };
    let balanced = n.div_ceil(wanted);
    // And every group of channels does the im2col of its columns: where the weights far
    // outweigh the columns (a batch of one on 7 × 7 maps: 512 channels, 49 columns), the
    // columns stay in one block and the channels are split, so that each weight comes from
    // memory once. A direct conv has no im2col to repeat; an im2col one splits its channels
    // only at four times as many channels as columns (at 32 px, 256 channels on 256
    // columns lost 3% to the repeated im2col).
    let few_columns = match columns {
        Columns::Direct(_) => weights.rows() >= n,
        Columns::Im2col(..) => weights.rows() >= 4 * n,
    };
    let columns_per_block = match columns {
        Columns::Direct(_) => {
            // The block's output (C_out × width) stays in the L2 cache between the passes
            // over the inner dimension.
            let fits = (BLOCK_FLOATS / weights.rows().max(1)) / shape.nr * shape.nr;
            if few_columns { n } else { balanced }
                .next_multiple_of(shape.nr)
                .min(fits.max(shape.nr))
                .clamp(1, n.max(1))
        }
        Columns::Im2col(_, conv, plan) => {
            let wo = plan.wo.max(1);
            // Where the weights are small (ResNet's stem: 64 × 147), blocks cost no extra
            // reads of them, and an im2col block of half the L2 cache leaves room for the
            // output block: the stem at 224 px, 7 output rows per block instead of 15,
            // 1.40-1.43 → 1.31 ms (2-core Zen 4).
            let budget = match weight_floats <= SMALL_WEIGHTS {
                true => BLOCK_FLOATS / 2,
                false => BLOCK_FLOATS,
            };
            let fits = (budget / (conv.patch() * wo).max(1)).max(1);
            // Whole output rows; at least a tile's width where the output has it.
            let least = shape.nr.div_ceil(wo);
            let wanted_rows = if few_columns {
                n.div_ceil(wo)
            } else {
                balanced.div_ceil(wo)
            };
            wanted_rows.max(least).min(fits).max(1) * wo
        }
    };
    // Split by channels, the tasks are equal: one per thread, each repeating the im2col once
    // (ResNet-152's 512-channel stride-2 conv at batch 1: 1.97-1.99 → 1.72-1.81 ms with one
    // group per thread instead of two, 2-core Zen 4).
    let wanted = match columns {
        Columns::Im2col(..) if few_columns => threads,
        _ => wanted,
    };
    TaskGrid::new(n, columns_per_block, weights, wanted)
}

/// The tasks of one parallel region over a product's output: blocks of `per_block` items
/// (columns, or Winograd's tile rows) times groups of panels of output rows, as many groups
/// as it takes to give `wanted` tasks where the blocks are fewer (at most one per panel).
pub(crate) struct TaskGrid {
    items: usize,
    per_block: usize,
    blocks: usize,
    panels: usize,
    panels_per_group: usize,
    groups: usize,
    /// Rows per panel, and of the output.
    mr: usize,
    rows: usize,
    /// Whether the blocks split the items evenly ([`TaskGrid::even`]).
    even: bool,
}

/// One task of a [`TaskGrid`].
pub(crate) struct GridTask {
    /// Its items (columns, tile rows).
    pub(crate) items: std::ops::Range<usize>,
    /// Its panels of the weights.
    pub(crate) panels: std::ops::Range<usize>,
    /// The output rows of those panels.
    pub(crate) rows: std::ops::Range<usize>,
}

impl TaskGrid {
    /// `items` in blocks of `per_block` (at least one block), times groups of the panels of
    /// `weights` up to `wanted` tasks.
    pub(crate) fn new(items: usize, per_block: usize, weights: &PackedLhs, wanted: usize) -> Self {
        let (panels, mr) = (weights.panels(), weights.kernel().shape().mr);
        Self::build(items, per_block, (panels, mr, weights.rows()), wanted)
    }

    /// `items` in blocks of `per_block` (at least one block), each block one task (no
    /// panels: [`GridTask::panels`] and [`GridTask::rows`] are `0..1`).
    pub(crate) fn blocks_only(items: usize, per_block: usize) -> Self {
        Self::build(items, per_block, (1, 1, 1), 1)
    }

    fn build(
        items: usize,
        per_block: usize,
        (panels, mr, rows): (usize, usize, usize),
        wanted: usize,
    ) -> Self {
        let per_block = per_block.max(1);
        let blocks = items.div_ceil(per_block).max(1);
        let groups = wanted.div_ceil(blocks).clamp(1, panels.max(1));
        let panels_per_group = panels.div_ceil(groups).max(1);
        Self {
            items,
            per_block,
            blocks,
            panels,
            panels_per_group,
            groups: panels.div_ceil(panels_per_group).max(1),
            mr,
            rows,
            even: false,
        }
    }

    /// The same grid with its items split evenly over its blocks (sizes differing by one at
    /// most) instead of `per_block` to each but the last: 14 tile rows in 4 blocks are 3, 4,
    /// 3 and 4 rows, not 4, 4, 4 and 2 (which left one of two threads 8 rows and the other 6).
    pub(crate) fn even(self) -> Self {
        Self { even: true, ..self }
    }

    /// Tasks.
    pub(crate) fn count(&self) -> usize {
        self.blocks * self.groups
    }

    /// Task `task`'s items, panels and output rows.
    pub(crate) fn task(&self, task: usize) -> GridTask {
        let (b, g) = (task / self.groups, task % self.groups);
        let items = match self.even {
            true => b * self.items / self.blocks..(b + 1) * self.items / self.blocks,
            false => {
                let i0 = b * self.per_block;
                i0..(i0 + self.per_block).min(self.items)
            }
        };
        let p0 = g * self.panels_per_group;
        let panels = p0..(p0 + self.panels_per_group).min(self.panels);
        GridTask {
            items,
            rows: panels.start * self.mr..(panels.end * self.mr).min(self.rows),
            panels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tasks of a grid cover every item once; an even grid's blocks differ by one item
    /// at most, a plain one's are `per_block` but the last.
    #[test]
    fn task_grids_cover_every_item_once() {
        for (items, per_block) in [(14, 4), (7, 2), (1, 1), (196, 32), (5, 9), (0, 3)] {
            let plain = TaskGrid::build(items, per_block, (1, 1, 1), 1);
            let even = TaskGrid::build(items, per_block, (1, 1, 1), 1).even();
            for grid in [&plain, &even] {
                let mut covered = vec![0; items];
                for task in 0..grid.count() {
                    for i in grid.task(task).items {
                        covered[i] += 1;
                    }
                }
                assert!(covered.iter().all(|&c| c == 1), "{items} / {per_block}");
            }
            let sizes: Vec<usize> = (0..even.count())
                .map(|t| even.task(t).items.len())
                .collect();
            let (min, max) = (sizes.iter().min(), sizes.iter().max());
            assert!(max.zip(min).is_none_or(|(a, b)| a - b <= 1), "{sizes:?}");
            assert!(sizes.iter().all(|&s| s <= per_block.max(1)), "{sizes:?}");
        }
        let even = TaskGrid::build(14, 4, (1, 1, 1), 1).even();
        let sizes: Vec<usize> = (0..even.count())
            .map(|t| even.task(t).items.len())
            .collect();
        assert_eq!(sizes, [3, 4, 3, 4]);
    }
}
