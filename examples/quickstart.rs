//! Quickstart: a one-class detector for one handwritten digit, on the digits set embedded in
//! msad (UCI handwritten digits, 1,797 8x8 images, CC BY 4.0), with no download and no
//! argument needed.
//!
//! ```text
//! cargo run --release --example quickstart [-- --digit 8 --epochs 10 --pretrained]
//! ```
//!
//! Offline by default (a randomly initialised ResNet-18); `--pretrained` fetches torchvision's
//! ImageNet ResNet-18 on demand, `--weights FILE` uses a checkpoint on disk.
//!
//! Trains MSC on the chosen digit's training images (normal), tests on every test image
//! (anomalous = another digit) and prints the kNN ROC-AUC before and after fine-tuning.

#[path = "support/allocator.rs"]
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use msad::data::Digits;
use msad::encoder::{Arch, ResNet, ResNetConfig, WeightFile, Weights};
use msad::fetch::Fetcher;
use msad::train::{Control, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};

/// One-class anomaly detection on the embedded digits with Mean-Shifted Contrastive learning.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The normal digit (0-9).
    #[arg(long, default_value_t = 8)]
    digit: usize,
    /// Fine-tuning epochs.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// SGD learning rate (the paper's is 1e-5, tuned for ImageNet-pretrained weights; a
    /// randomly initialised net needs a larger one to move in a few epochs).
    #[arg(long)]
    lr: Option<f64>,
    /// Image size fed to the network.
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// torchvision ResNet-18 checkpoint (resnet18-f37072fd.pth); random initialisation without.
    #[arg(long, conflicts_with = "pretrained")]
    weights: Option<PathBuf>,
    /// torchvision's ImageNet ResNet-18 (IMAGENET1K_V1), fetched on demand (PyTorch's cache,
    /// then msad's, then https://download.pytorch.org/models).
    #[arg(long)]
    pretrained: bool,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Seed of the initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn run(args: Args) -> msad::Result<()> {
    let start = Instant::now();
    let selected = msad::device::select(&args.device)?;
    println!("device: {selected}");
    let device = selected.device();
    let split = Digits::load().one_class(args.digit)?;
    println!(
        "data: {} ({} normal training images, {} test images of which {} anomalous)",
        split.description,
        split.train.len(),
        split.test.len(),
        split.test_anomalous.iter().filter(|a| **a).count()
    );
    let weights = if args.pretrained {
        let file = WeightFile::find(Arch::Resnet18, Weights::ImagenetV1)?;
        Some(file.fetch(&Fetcher::from_env())?)
    } else {
        args.weights.clone()
    };
    let (encoder, default_lr) = match &weights {
        Some(path) => {
            println!("encoder: ResNet-18 from {}", path.display());
            (
                ResNetConfig::from_arch(Arch::Resnet18).init_from_torchvision(path, device)?,
                1e-5,
            )
        }
        None => {
            println!(
                "encoder: ResNet-18, randomly initialised (pass --pretrained for ImageNet weights)"
            );
            device.seed(args.seed);
            let encoder: ResNet = ResNetConfig::from_arch(Arch::Resnet18).try_init(device)?;
            (encoder, 1e-3)
        }
    };
    let config = MscTrainerConfig::new()
        .with_epochs(args.epochs)
        .with_batch_size(args.batch)
        .with_lr(args.lr.unwrap_or(default_lr))
        .with_seed(args.seed)
        .with_image_size(args.image_size);
    println!(
        "training: {} epochs, batch {}, lr {:e}, {} px",
        config.epochs, config.batch_size, config.lr, args.image_size
    );
    let trainer = MscTrainer::new(config)?;
    let test = Evaluation {
        images: split.test.as_ref(),
        anomalous: &split.test_anomalous,
    };
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("epoch {prefix:>2} {bar:30} {pos}/{len} steps, loss {msg}")
            .expect("a valid template"),
    );
    let outcome = trainer.fit(encoder, split.train.as_ref(), Some(test), device, |event| {
        match event {
            TrainEvent::Step(step) => {
                if step.step == 1 {
                    bar.reset();
                    bar.set_length(step.steps as u64);
                    bar.set_prefix(step.epoch.to_string());
                    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
                }
                bar.set_message(format!("{:.4}", step.loss));
                bar.inc(1);
            }
            TrainEvent::Epoch(report) => {
                bar.finish_and_clear();
                match report.mean_loss {
                    None => println!(
                        "epoch  0: ROC-AUC {:.4} (before fine-tuning)",
                        report.auroc.unwrap_or(f64::NAN)
                    ),
                    Some(loss) => println!(
                        "epoch {:>2}: loss {loss:.4}, ROC-AUC {:.4}",
                        report.epoch,
                        report.auroc.unwrap_or(f64::NAN)
                    ),
                }
            }
        }
        Control::Continue
    })?;
    let before = outcome
        .history
        .first()
        .and_then(|r| r.auroc)
        .unwrap_or(f64::NAN);
    let after = outcome
        .history
        .last()
        .and_then(|r| r.auroc)
        .unwrap_or(f64::NAN);
    println!(
        "ROC-AUC before fine-tuning {before:.4}, after {after:.4} ({:.0} s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
