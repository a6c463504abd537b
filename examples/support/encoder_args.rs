//! The encoder options the examples share: `--arch`, `--weights`, `--weights-version`,
//! `--random-init`. Included by path (`#[path = "support/encoder_args.rs"]`): cargo builds
//! only `examples/*.rs` as examples, not this folder.

use std::path::PathBuf;

use burn::tensor::Device;
use indicatif::{ProgressBar, ProgressStyle};
use msad::encoder::{Arch, ResNet, ResNetConfig, WeightFile, Weights};
use msad::fetch::Fetcher;

/// Where the encoder's weights come from.
#[derive(clap::Args, Debug, Clone)]
pub struct EncoderArgs {
    /// resnet18 ... resnet152. Without --weights: that architecture's torchvision ImageNet
    /// weights, fetched on demand (PyTorch's cache, then msad's, then download). With
    /// --weights: the file must hold it (without --arch, the file's own layout is used).
    #[arg(long)]
    pub arch: Option<Arch>,
    /// A torchvision checkpoint (.pth or .safetensors); the architecture comes from its keys.
    #[arg(long, conflicts_with = "random_init")]
    pub weights: Option<PathBuf>,
    /// Which ImageNet weights to fetch without --weights: v1 (the paper's) or v2
    /// (ResNet-50/101/152 only).
    #[arg(long, default_value = "v1")]
    pub weights_version: Weights,
    /// A randomly initialised net instead of ImageNet weights (a poor detector: MSC relies on
    /// pretrained features).
    #[arg(long)]
    pub random_init: bool,
}

/// The resolved choice: a checkpoint file, or random initialisation.
#[derive(Debug, Clone)]
pub enum EncoderPlan {
    /// Load this file, as this architecture when one is given (a mismatch is an error naming
    /// the key and both shapes), else as the layout its keys describe.
    File(PathBuf, Option<Arch>),
    /// Randomly initialise this architecture.
    Random(Arch),
}

impl EncoderArgs {
    /// Resolves the options, fetching ImageNet weights when needed (with a progress bar).
    /// `default_arch` applies when neither --arch nor --weights says which.
    pub fn plan(&self, default_arch: Arch) -> msad::Result<EncoderPlan> {
        if let Some(path) = &self.weights {
            return Ok(EncoderPlan::File(path.clone(), self.arch));
        }
        let arch = self.arch.unwrap_or(default_arch);
        if self.random_init {
            eprintln!("warning: --random-init: the {arch} is randomly initialised");
            return Ok(EncoderPlan::Random(arch));
        }
        let file = WeightFile::find(arch, self.weights_version)?;
        let path = file.fetch(&fetcher_with_progress())?;
        eprintln!("weights: {} ({})", path.display(), self.weights_version);
        Ok(EncoderPlan::File(path, Some(arch)))
    }
}

impl EncoderPlan {
    /// A fresh encoder (random ones seeded with `seed`).
    pub fn build(&self, device: &Device, seed: u64) -> msad::Result<ResNet> {
        match self {
            EncoderPlan::File(path, Some(arch)) => {
                ResNetConfig::from_arch(*arch).init_from_torchvision(path, device)
            }
            EncoderPlan::File(path, None) => ResNet::from_torchvision(path, device),
            EncoderPlan::Random(arch) => {
                device.seed(seed);
                ResNetConfig::from_arch(*arch).try_init(device)
            }
        }
    }
}

/// The environment's fetch settings, drawing downloads as a progress bar on stderr.
pub fn fetcher_with_progress() -> Fetcher {
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    Fetcher::from_env().with_progress(move |p| {
        if p.received == 0 {
            bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
            bar.set_message(format!("downloading {}", p.url));
            bar.set_length(p.total.unwrap_or(0));
        }
        bar.set_position(p.received);
        if p.total == Some(p.received) {
            bar.finish();
        }
    })
}
