//! Convolutions and pooling on host memory: the layers the ResNet engines ([`super::resnet`])
//! are built of.
//!
//! Activations are channel-major, C × B·H·W ([`Maps`]), so that a conv's output is directly
//! the next conv's input and a conv is one matrix product over the whole batch. Each conv has
//! its BatchNorm folded in ([`FoldedConv`]) and runs as im2col + a product with its weights
//! packed once, one block of columns per task ([`blocked`]), or as im2col + [`sgemm`] in column chunks
//! ([`ConvPlan`]), or as Winograd F(2×2, 3×3) ([`winograd`]) where that pays, or as one dense
//! product on maps the kernel covers whole (`unrolled`: 2 × 2 and 1 × 1 maps).
//!
//! Imports run one way: this module uses [`super::kernels`] and nothing above it.
//!
//! [`sgemm`]: super::kernels::sgemm

mod blocked;
mod folded;
mod geometry;
mod im2col;
mod maps;
mod pool;
mod scratch;
mod unrolled;
pub(crate) mod weight_gradient;
pub(crate) mod winograd;

pub(crate) use folded::{ConvBnWeights, ConvMethod, FoldedConv};
pub(crate) use geometry::{ConvLayout, ConvShape};
pub(crate) use im2col::col2im;
pub(crate) use maps::Maps;
pub(crate) use pool::{max_pool, max_pool_backward, max_pool_values};
pub(crate) use scratch::ColsBuffer;
