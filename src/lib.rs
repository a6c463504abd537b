//! # msad — Mean-Shifted Contrastive anomaly detection on burn
//!
//! Image anomaly detection with the Mean-Shifted Contrastive loss of Reiss & Hoshen,
//! *Mean-Shifted Contrastive Loss for Anomaly Detection* (AAAI 2023, arXiv 2106.03844), in
//! pure Rust on [burn](https://burn.dev): an ImageNet-pretrained ResNet whose L2-normalised
//! features are fine-tuned on normal images, and a kNN score against the normal features.
//!
//! The backend is chosen at run time ([`device::select`]): wgpu on GPUs, flex or ndarray on
//! CPUs.
//!
//! ```
//! use burn::tensor::{Device, Tensor};
//! use msad::encoder::{Arch, ResNetConfig};
//!
//! # fn main() -> msad::Result<()> {
//! let device = msad::device::select("auto")?.into_device();
//! // torchvision's resnet18 (narrowed here to keep the example fast); load real weights with
//! // `msad::encoder::ResNet::from_torchvision("resnet18-f37072fd.pth", &device)?`.
//! let config = ResNetConfig::from_arch(Arch::Resnet18).with_stem_width(8).with_widths([8, 8, 8, 8]);
//! let encoder = config.try_init(&device)?;
//! let images = Tensor::<4>::random([4, 3, 32, 32], burn::tensor::Distribution::Default, &device);
//! let phi = encoder.try_embed(images)?; // 4 × 8, unit rows
//! assert_eq!(phi.dims(), [4, 8]);
//! # Ok(())
//! # }
//! ```
//!
//! ## Modules
//! - [`augment`]: images to tensors: the evaluation transform and the MoCo v2 training views.
//! - [`data`]: CIFAR-10/100, image folders, MVTec AD (with its ground-truth masks), the embedded
//!   digits; one-class splits.
//! - [`encoder`]: torchvision ResNets, checkpoint loading, freezing.
//! - [`device`]: a device from a name (`auto`, `wgpu`, `flex`, `ndarray`).
//! - [`loss`]: the Mean-Shifted Contrastive loss (and plain NT-Xent).
//! - [`knn`]: the kNN anomaly score, chunked on any device or on host memory.
//! - [`metrics`]: ROC-AUC and average precision, equal to scikit-learn's; pixel ROC-AUC and
//!   PRO (per-region overlap) for anomaly maps against masks.
//! - [`host`]: tensors to and from `ndarray` arrays (host memory).
//! - [`npy`]: `.npy` input and output of float32 arrays.
//! - [`features`]: φ over a whole image source, in batches.
//! - [`report`]: a self-contained HTML report of scored images (charts, anomaly maps, table).
//! - [`train`]: the MSC fine-tuning loop, its settings and progress reports, and single steps
//!   ([`train::TrainingSession`]).
//! - [`Detector`]: fit, score, threshold, save and load.
//! - [`anomaly_map`]: where an image is anomalous: PatchCore-style patch kNN on the
//!   detector's fine-tuned encoder, a map per image at its resolution.
//! - `fetch` (feature `pretrained`, on by default): files on demand (torchvision's weights, the
//!   CIFAR archives): caches first, then a verified download.
//! - [`Error`], [`Result`]: the crate's error type.
//!
//! Under these, a private layer, `cpu`, holds everything that runs only on host memory: msad's
//! CPU engines for the ResNet (inference and training), the kNN search and the loss, and the
//! kernels they are built of. [`device`] holds the one rule that decides when they run
//! instead of the backend's tensor operations. ARCHITECTURE.md in the repository maps it all.

#![warn(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod anomaly_map;
pub mod augment;
mod cpu;
pub mod data;
mod detector;
pub mod device;
pub mod encoder;
mod error;
pub mod features;
#[cfg(feature = "pretrained")]
pub mod fetch;
pub mod host;
pub mod knn;
pub mod loss;
pub mod metrics;
pub mod npy;
pub mod report;
pub mod train;

pub use detector::{
    BatchStream, Calibration, Detector, ImageResult, MapResult, MapStream, ScoreStream, Scored,
};
pub use error::{Error, FetchFailure, Result};

/// The eps of PyTorch's `F.normalize`: rows are divided by `max(‖row‖₂, NORM_EPS)`.
pub(crate) const NORM_EPS: f32 = 1e-12;

/// The README's code blocks, compiled as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
