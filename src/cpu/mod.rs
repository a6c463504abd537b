//! msad's CPU engines: everything that runs only on host memory.
//!
//! On CPU devices (flex, ndarray) the tensors live in host memory, and msad computes the heavy
//! work itself instead of through the backend's tensor operations: the ResNet forward (BatchNorm
//! folded, im2col or Winograd + matrix products) and its backward, the kNN search (an exact
//! 16-bit integer screen) and the loss (one fused pass). The backend-generic modules (encoder,
//! loss, knn, train, detector) reach this layer only where [`crate::device::route`] says so,
//! through their bridges: `encoder::cpu_bridge` (ResNet weights in, tensors and gradients
//! out), `loss::cpu_op` (a burn backend extension), and `knn`'s `KnnScorer` and
//! `HostKnnScorer`, which check their input and hold a [`knn::ExactSearch`].
//!
//! Layers, imports running one way (each uses only those below it):
//!
//! - [`isa`]: instruction-set tokens, made only by run-time detection.
//! - [`kernels`]: matrix products and micro-kernels on slices.
//! - [`conv`]: activations, convolutions (folded BatchNorm, im2col, Winograd, each conv one
//!   parallel region of column blocks on weights packed once), pooling.
//! - [`resnet`]: the inference and training engines, built from plain weights.
//! - [`knn`] and [`loss`]: the kNN search and the loss kernel, on [`kernels`].
//! - [`lazy`]: values made on first use outside their cell (`get_or_make`), for [`conv`] and
//!   [`knn`].
//!
//! Nothing here reads a burn module or a tensor: the bridges convert. The tensor path is the
//! specification; every engine is tested against it and every kernel against an f64
//! reference, on every instruction set the machine has.

pub(crate) mod conv;
pub(crate) mod isa;
pub(crate) mod kernels;
pub(crate) mod knn;
pub(crate) mod lazy;
pub(crate) mod loss;
pub(crate) mod resnet;
