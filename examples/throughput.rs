//! Times the encoder's inference forward or the training step on a CPU device with random
//! weights, for side-by-side comparisons (`scripts/bench_interleaved.py` alternates it with
//! PyTorch, which a shared, noisy machine needs: its speed drifts by a third within minutes).
//!
//! ```text
//! cargo run --release --features openblas --example throughput -- encoder --arch resnet18 \
//!     --size 32 --batch 64 --iters 50
//! cargo run --release --features openblas --example throughput -- train --size 224 --batch 16
//! ```
//!
//! Prints one line: images per second (encoder) or pairs of views per second (train).

#[path = "support/allocator.rs"]
mod allocator;

use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use clap::{Parser, ValueEnum};
use image::{Rgb, RgbImage};
use msad::encoder::{Arch, InferenceEncoder, ResNetConfig};
use msad::train::{MscTrainer, MscTrainerConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

/// What to time.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Work {
    /// `InferenceEncoder::try_forward` (weights folded once).
    Encoder,
    /// `TrainingSession::step`: two augmented views, forward, loss, backward, SGD.
    Train,
}

/// Throughput of the encoder or of the training step.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    work: Work,
    /// Architecture (the reference freeze policy applies: ResNet-152 through layer2).
    #[arg(long, default_value = "resnet18")]
    arch: Arch,
    /// Image side in pixels.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed batches, after one untimed warm-up batch.
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// CPU device: flex or ndarray.
    #[arg(long, default_value = "flex")]
    device: String,
}

fn main() -> ExitCode {
    allocator::keep_freed_memory();
    match run(Args::parse()) {
        Ok(rate) => {
            println!("{rate:.2}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> msad::Result<f64> {
    let selected = msad::device::select(&args.device)?;
    match args.work {
        Work::Encoder => {
            let device = selected.device();
            let model = ResNetConfig::from_arch(args.arch).init(device);
            let shape = [args.batch, 3, args.size, args.size];
            let x = Tensor::<4>::random(shape, Distribution::Default, device);
            // Materialised, so that no backend regenerates it lazily inside the timed loop.
            let x = Tensor::<4>::from_data(x.into_data(), device);
            let encoder = InferenceEncoder::new(&model, device);
            let batch = || -> msad::Result<()> {
                msad::host::vec_from_tensor(encoder.try_forward(x.clone())?).map(drop)
            };
            batch()?;
            let start = Instant::now();
            for _ in 0..args.iters {
                batch()?;
            }
            Ok((args.iters * args.batch) as f64 / start.elapsed().as_secs_f64())
        }
        Work::Train => {
            let device = selected.into_device().autodiff();
            // The pictures `benches/train.rs` and `scripts/bench_train.py` use.
            let src = if args.size <= 32 { 32 } else { 256 };
            let images: Vec<RgbImage> = (0..args.batch as u32)
                .map(|i| {
                    RgbImage::from_fn(src, src, |x, y| {
                        Rgb([(x * 3 + i) as u8, (y * 5) as u8, (x ^ y) as u8])
                    })
                })
                .collect();
            let config = MscTrainerConfig::new()
                .with_image_size(args.size as u32)
                .with_batch_size(args.batch);
            let encoder = ResNetConfig::from_arch(args.arch).init(&device);
            let center = Tensor::<1>::zeros([encoder.feature_dim()], &device);
            let mut session = MscTrainer::new(config)?.session(encoder, center, &device)?;
            let mut rng = StdRng::seed_from_u64(0);
            session.step(&images, &mut rng)?;
            let start = Instant::now();
            for _ in 0..args.iters {
                session.step(&images, &mut rng)?;
            }
            Ok((args.iters * args.batch) as f64 / start.elapsed().as_secs_f64())
        }
    }
}
