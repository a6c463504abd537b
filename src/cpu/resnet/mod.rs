//! ResNets on host memory: the inference engine (BatchNorm folded into the convs) and the
//! training engine (forward with a tape, hand-written backward).
//!
//! The engines know nothing of burn: they are built from the net's weights as plain values
//! ([`NetWeights`]), which `crate::encoder::cpu_bridge` reads from a `ResNet`, and they work on
//! row-major `f32` slices. Imports run one way: this module uses [`super::conv`] and
//! [`super::kernels`], never the other way round.

mod training;

#[cfg(test)]
pub(crate) use training::Tape;
pub(crate) use training::TrainingEngine;

use std::convert::Infallible;

use rayon::prelude::*;

use super::conv::{ConvBnWeights, FoldedConv, Maps, max_pool_values};
use crate::{Error, Result};

/// A residual block's layers: its convs in order, then the shortcut conv (if any).
#[derive(Clone, Debug)]
pub(crate) struct Block<L> {
    /// The main path's convs (two in a basic block, three in a bottleneck).
    pub(crate) convs: Vec<L>,
    /// The shortcut's conv, where the block changes shape.
    pub(crate) downsample: Option<L>,
}

/// A ResNet's layers: the stem conv, then every block of every stage in order.
///
/// The *layer index* of a layer is its place in the order stem, then each block's convs, then
/// its shortcut ([`Net::layers`]); gradients name their layer by it.
#[derive(Clone, Debug)]
pub(crate) struct Net<L> {
    /// `conv1` with `bn1`.
    pub(crate) stem: L,
    /// `layer1` .. `layer4`, flattened.
    pub(crate) blocks: Vec<Block<L>>,
}

/// One conv + BatchNorm pair of a model, as plain values.
#[derive(Clone, Debug)]
pub(crate) struct LayerWeights {
    /// The conv and BatchNorm.
    pub(crate) conv_bn: ConvBnWeights,
    /// Whether its parameters train (the training engine computes their gradients).
    pub(crate) trains: bool,
}

/// A ResNet's weights as plain values.
pub(crate) type NetWeights = Net<LayerWeights>;

impl<L: Send> Net<L> {
    /// The layers in layer-index order.
    pub(crate) fn layers(&self) -> impl Iterator<Item = &L> {
        std::iter::once(&self.stem).chain(
            self.blocks
                .iter()
                .flat_map(|b| b.convs.iter().chain(&b.downsample)),
        )
    }

    /// Every layer, mutably, in layer-index order (as [`Net::layers`]).
    pub(crate) fn layers_mut(&mut self) -> impl Iterator<Item = &mut L> {
        std::iter::once(&mut self.stem).chain(
            self.blocks
                .iter_mut()
                .flat_map(|b| b.convs.iter_mut().chain(b.downsample.as_mut())),
        )
    }

    /// The same net with every layer mapped by `f(layer index, layer)`, one block per rayon
    /// task.
    pub(crate) fn map<M: Send>(self, f: impl Fn(usize, L) -> M + Sync) -> Net<M> {
        match self.try_map(|i, l| Ok::<M, Infallible>(f(i, l))) {
            Ok(net) => net,
            Err(never) => match never {},
        }
    }

    /// [`Net::map`] with a fallible `f`; the first error stops it.
    pub(crate) fn try_map<M: Send, E: Send>(
        self,
        f: impl Fn(usize, L) -> Result<M, E> + Sync,
    ) -> Result<Net<M>, E> {
        let mut first = 1;
        let numbered: Vec<(usize, Block<L>)> = self
            .blocks
            .into_iter()
            .map(|b| {
                let at = first;
                first += b.convs.len() + usize::from(b.downsample.is_some());
                (at, b)
            })
            .collect();
        let blocks = numbered
            .into_par_iter()
            .map(|(at, block)| {
                let n = block.convs.len();
                Ok(Block {
                    convs: block
                        .convs
                        .into_iter()
                        .enumerate()
                        .map(|(i, l)| f(at + i, l))
                        .collect::<Result<_, E>>()?,
                    downsample: block.downsample.map(|l| f(at + n, l)).transpose()?,
                })
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Net {
            stem: f(0, self.stem)?,
            blocks,
        })
    }
}

/// A conv with its BatchNorm as an engine computes it.
pub(crate) trait Layer: Send + Sync {
    /// BN(conv(x)) (+ residual) (then ReLU).
    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps;
}

impl Layer for FoldedConv {
    fn forward(&self, x: &Maps, residual: Option<&Maps>, relu: bool) -> Maps {
        FoldedConv::forward(self, x, residual, relu)
    }
}

impl<L: Layer> Block<L> {
    /// The block's output and, when `keep`, the outputs (after ReLU) of all but its last conv
    /// (a backward pass needs them); otherwise each is dropped once used.
    pub(crate) fn forward(&self, x: &Maps, keep: bool) -> (Maps, Vec<Maps>) {
        let shortcut = self.downsample.as_ref().map(|d| d.forward(x, None, false));
        // ResNetConfig builds every block with two or three convs.
        let (last, first) = self.convs.split_last().expect("a block has convs");
        let mut inner: Vec<Maps> = Vec::with_capacity(first.len());
        for conv in first {
            let y = conv.forward(inner.last().unwrap_or(x), None, true);
            if !keep {
                inner.clear();
            }
            inner.push(y);
        }
        let out = last.forward(
            inner.last().unwrap_or(x),
            Some(shortcut.as_ref().unwrap_or(x)),
            true,
        );
        if !keep {
            inner.clear();
        }
        (out, inner)
    }
}

/// Checks images (B × C × H × W, row-major in `values`) against a stem of `cin` channels.
pub(crate) fn check_images(values: &[f32], dims: [usize; 4], cin: usize) -> Result<()> {
    let [b, c, h, w] = dims;
    if b == 0 || h == 0 || w == 0 || c != cin || values.len() != b * c * h * w {
        return Err(Error::InvalidShape {
            what: "images".into(),
            expected: format!("[B, {cin}, H, W] with B, H, W ≥ 1"),
            found: dims.to_vec(),
        });
    }
    Ok(())
}

/// The whole net folded for inference: build once, run on many batches.
pub(crate) struct InferenceEngine {
    net: Net<FoldedConv>,
}

impl InferenceEngine {
    /// Folds every layer's BatchNorm into its conv (one block per rayon task).
    pub(crate) fn new(weights: NetWeights) -> Self {
        Self {
            net: weights.map(|_, layer| FoldedConv::fold(layer.conv_bn)),
        }
    }

    /// The pooled features (B × D, row-major) of images B × C × H × W (row-major), D, and the
    /// activations after the blocks named in `taps` (the number of blocks run, 1-based:
    /// `taps = [2]` keeps the second block's output), in the order of `taps`; no taps, no
    /// copies. A tap beyond the last block is an error.
    pub(crate) fn forward_with_taps(
        &self,
        images: &[f32],
        dims: [usize; 4],
        taps: &[usize],
    ) -> Result<(Vec<f32>, usize, Vec<Maps>)> {
        check_images(images, dims, self.net.stem.shape.cin)?;
        if let Some(&bad) = taps.iter().find(|&&t| t == 0 || t > self.net.blocks.len()) {
            return Err(Error::invalid(
                "feature tap",
                format!("block {bad} of {}", self.net.blocks.len()),
            ));
        }
        // On a pool thread from the start: each conv's parallel region then starts and ends
        // among the pool's threads, instead of waking the caller's thread at every region.
        Ok(rayon::scope(|_| self.run(images, dims, taps)))
    }

    /// [`InferenceEngine::forward_with_taps`] once checked.
    fn run(
        &self,
        images: &[f32],
        dims: [usize; 4],
        taps: &[usize],
    ) -> (Vec<f32>, usize, Vec<Maps>) {
        let x = Maps::from_nchw(images, dims);
        let mut x = max_pool_values(&self.net.stem.forward(&x, None, true));
        // One slot per tap; every tap is a block index (checked above), so every slot fills.
        let mut kept: Vec<Option<Maps>> = vec![None; taps.len()];
        for (i, block) in self.net.blocks.iter().enumerate() {
            x = block.forward(&x, false).0;
            for (slot, &tap) in kept.iter_mut().zip(taps) {
                if tap == i + 1 {
                    *slot = Some(x.clone());
                }
            }
        }
        let maps = kept.into_iter().flatten().collect();
        (x.global_average(), x.c, maps)
    }
}
