//! torchvision's ImageNet weights on demand (feature `pretrained`).
//!
//! MSC only works on ImageNet-pretrained features: the authors call
//! `torchvision.models.resnetXX(pretrained=True)`, which is `IMAGENET1K_V1`.
//! [`ResNet::pretrained`] returns the same weights, taking the file from PyTorch's cache when a
//! PyTorch user already has it, else from msad's cache, else downloading it (see
//! [`crate::fetch`] for the caches, the environment variables and the guarantees).
//!
//! ```no_run
//! use msad::encoder::{Arch, ResNet, Weights};
//!
//! # fn main() -> msad::Result<()> {
//! let device = burn::tensor::Device::flex();
//! let encoder = ResNet::pretrained(Arch::Resnet18, Weights::ImagenetV1, &device)?;
//! assert_eq!(encoder.feature_dim(), 512);
//! # Ok(())
//! # }
//! ```

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::Device;

use super::weights::Checkpoint;
use super::{Arch, ResNet, ResNetConfig};
use crate::fetch::{Digest, Fetcher, Remote};
use crate::{Error, Result};

/// Which of torchvision's ImageNet weights.
///
/// ```
/// use msad::encoder::Weights;
/// assert_eq!("v2".parse::<Weights>()?, Weights::ImagenetV2);
/// assert_eq!(Weights::ImagenetV1.to_string(), "IMAGENET1K_V1");
/// # Ok::<(), msad::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Weights {
    /// `IMAGENET1K_V1`: the original weights, what `pretrained=True` gives (the paper's).
    #[default]
    ImagenetV1,
    /// `IMAGENET1K_V2`: torchvision's newer training recipe; ResNet-50/101/152 only.
    ImagenetV2,
}

impl fmt::Display for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Weights::ImagenetV1 => "IMAGENET1K_V1",
            Weights::ImagenetV2 => "IMAGENET1K_V2",
        })
    }
}

impl FromStr for Weights {
    type Err = Error;

    /// `v1`, `v2`, or torchvision's names `IMAGENET1K_V1`, `IMAGENET1K_V2` (any case).
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "v1" | "imagenet1k_v1" => Ok(Weights::ImagenetV1),
            "v2" | "imagenet1k_v2" => Ok(Weights::ImagenetV2),
            _ => Err(Error::invalid(
                "weights version",
                format!("`{s}` is not one of v1, v2, IMAGENET1K_V1, IMAGENET1K_V2"),
            )),
        }
    }
}

/// One of torchvision's weight files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeightFile {
    /// The architecture.
    pub arch: Arch,
    /// The weights version.
    pub weights: Weights,
    /// The file name under <https://download.pytorch.org/models/>; the hex after the last `-`
    /// is the prefix of the file's SHA-256.
    pub file_name: &'static str,
}

/// torchvision's ImageNet weight files (verified against torchvision 0.29.2).
pub const TORCHVISION_WEIGHTS: [WeightFile; 8] = [
    file(Arch::Resnet18, Weights::ImagenetV1, "resnet18-f37072fd.pth"),
    file(Arch::Resnet34, Weights::ImagenetV1, "resnet34-b627a593.pth"),
    file(Arch::Resnet50, Weights::ImagenetV1, "resnet50-0676ba61.pth"),
    file(Arch::Resnet50, Weights::ImagenetV2, "resnet50-11ad3fa6.pth"),
    file(
        Arch::Resnet101,
        Weights::ImagenetV1,
        "resnet101-63fe2227.pth",
    ),
    file(
        Arch::Resnet101,
        Weights::ImagenetV2,
        "resnet101-cd907fc2.pth",
    ),
    file(
        Arch::Resnet152,
        Weights::ImagenetV1,
        "resnet152-394f9c45.pth",
    ),
    file(
        Arch::Resnet152,
        Weights::ImagenetV2,
        "resnet152-f82ba261.pth",
    ),
];

const fn file(arch: Arch, weights: Weights, file_name: &'static str) -> WeightFile {
    WeightFile {
        arch,
        weights,
        file_name,
    }
}

impl WeightFile {
    /// The file for `arch` and `weights`.
    ///
    /// Errors: [`Error::InvalidArgument`] for a pair torchvision does not publish (V2 of
    /// ResNet-18 or ResNet-34).
    ///
    /// ```
    /// use msad::encoder::{Arch, WeightFile, Weights};
    /// let file = WeightFile::find(Arch::Resnet152, Weights::ImagenetV1)?;
    /// assert_eq!(file.file_name, "resnet152-394f9c45.pth");
    /// assert_eq!(file.sha256_prefix(), "394f9c45");
    /// assert!(WeightFile::find(Arch::Resnet18, Weights::ImagenetV2).is_err());
    /// # Ok::<(), msad::Error>(())
    /// ```
    pub fn find(arch: Arch, weights: Weights) -> Result<&'static WeightFile> {
        TORCHVISION_WEIGHTS
            .iter()
            .find(|f| f.arch == arch && f.weights == weights)
            .ok_or_else(|| {
                Error::invalid(
                    "pretrained weights",
                    format!("torchvision publishes no {weights} weights for {arch}; use v1"),
                )
            })
    }

    /// The SHA-256 prefix in the file name (the hex between the last `-` and `.pth`).
    pub fn sha256_prefix(&self) -> &'static str {
        let stem = self
            .file_name
            .strip_suffix(".pth")
            .unwrap_or(self.file_name);
        stem.rsplit_once('-').map_or("", |(_, hex)| hex)
    }

    /// The file as a [`Remote`] under `fetcher`'s weights URL.
    pub fn remote(&self, fetcher: &Fetcher) -> Remote {
        Remote::new(
            format!("{}/{}", fetcher.weights_url(), self.file_name),
            self.file_name,
            Digest::sha256(self.sha256_prefix()),
        )
    }

    /// The local path of the file: PyTorch's cache, msad's cache, or a download.
    ///
    /// Errors: [`Error::Fetch`].
    pub fn fetch(&self, fetcher: &Fetcher) -> Result<PathBuf> {
        let torch: Vec<&Path> = fetcher.torch_checkpoints().into_iter().collect();
        fetcher.fetch(&self.remote(fetcher), &torch)
    }
}

impl ResNet {
    /// torchvision's ImageNet `weights` for `arch`, fetched on demand with the environment's
    /// settings ([`Fetcher::from_env`]).
    ///
    /// Errors: [`Error::InvalidArgument`] for a pair torchvision does not publish,
    /// [`Error::Fetch`] when the file is in no cache and cannot be downloaded, and the
    /// checkpoint errors of [`Checkpoint::load`].
    pub fn pretrained(arch: Arch, weights: Weights, device: &Device) -> Result<ResNet> {
        Self::pretrained_with(arch, weights, &Fetcher::from_env(), device)
    }

    /// [`ResNet::pretrained`] with explicit fetch settings (cache, URL, progress, offline).
    pub fn pretrained_with(
        arch: Arch,
        weights: Weights,
        fetcher: &Fetcher,
        device: &Device,
    ) -> Result<ResNet> {
        let path = WeightFile::find(arch, weights)?.fetch(fetcher)?;
        Checkpoint::open(path)?.load(&ResNetConfig::from_arch(arch), device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_covers_v1_for_every_depth_and_v2_for_the_bottleneck_nets() {
        for arch in Arch::ALL {
            let v1 = WeightFile::find(arch, Weights::ImagenetV1).unwrap();
            assert!(v1.file_name.starts_with(&format!("{}-", arch.name())));
            let v2 = WeightFile::find(arch, Weights::ImagenetV2);
            let bottleneck = matches!(arch, Arch::Resnet50 | Arch::Resnet101 | Arch::Resnet152);
            assert_eq!(v2.is_ok(), bottleneck, "{arch}");
        }
        for file in &TORCHVISION_WEIGHTS {
            let hex = file.sha256_prefix();
            assert_eq!(hex.len(), 8, "{}", file.file_name);
            assert!(
                hex.bytes()
                    .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            );
            assert_eq!(
                file.file_name,
                format!("{}-{hex}.pth", file.arch.name()),
                "name layout"
            );
        }
        let mut names: Vec<_> = TORCHVISION_WEIGHTS.iter().map(|f| f.file_name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), TORCHVISION_WEIGHTS.len());
    }

    #[test]
    fn remote_urls_follow_the_base_url() {
        let fetcher = Fetcher::from_vars(|_| None).with_weights_url("http://127.0.0.1:1/m/");
        let remote = WeightFile::find(Arch::Resnet34, Weights::ImagenetV1)
            .unwrap()
            .remote(&fetcher);
        assert_eq!(remote.url(), "http://127.0.0.1:1/m/resnet34-b627a593.pth");
        assert_eq!(remote.digest(), &Digest::sha256("b627a593"));
    }
}
