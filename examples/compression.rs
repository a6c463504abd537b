//! What k-means bank compression (`KnnScorer::compressed`) costs in accuracy and saves in time.
//!
//! ```text
//! cargo run --release --example compression [-- --weights resnet18-f37072fd.pth --device flex]
//! ```
//!
//! Part 1, accuracy: for every digit of the embedded digits set, the one-class protocol with
//! ResNet-18 features (no fine-tuning), scored against the full bank of the digit's training
//! features and against k-means compressions of it; prints the mean ROC-AUC per bank size.
//!
//! Part 2, time: scoring 1,000 unit queries against a bank of 5,000 unit rows (D = 512) and
//! against its compressions.

#[path = "support/allocator.rs"]
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use burn::tensor::{Distribution, Tensor};
use clap::Parser;
use msad::augment::EvalTransform;
use msad::data::Digits;
use msad::encoder::{Arch, ResNet, ResNetConfig};
use msad::features::embed_source;
use msad::knn::KnnScorer;
use msad::metrics::roc_auc;

/// Accuracy and speed of k-means bank compression.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// torchvision ResNet-18 checkpoint; random initialisation (seeded) without.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// Image size fed to the network.
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Bank sizes to compress to (centroids).
    #[arg(long, value_delimiter = ',', default_value = "64,32,16,8,4,2")]
    clusters: Vec<usize>,
}

fn scores(scorer: &KnnScorer, queries: Tensor<2>) -> msad::Result<Vec<f32>> {
    msad::host::vec_from_tensor(scorer.score(queries)?)
}

fn run(args: Args) -> msad::Result<()> {
    let selected = msad::device::select(&args.device)?;
    println!("device: {selected}");
    let device = selected.device();
    let encoder: ResNet = match &args.weights {
        Some(path) => {
            ResNetConfig::from_arch(Arch::Resnet18).init_from_torchvision(path, device)?
        }
        None => {
            println!("encoder: ResNet-18, randomly initialised (seed 0)");
            device.seed(0);
            ResNetConfig::from_arch(Arch::Resnet18).try_init(device)?
        }
    };
    let eval = EvalTransform::new(args.image_size, args.image_size);
    let digits = Digits::load();

    // Part 1: ROC-AUC per digit for the full bank and each compression.
    let sizes: Vec<Option<usize>> = std::iter::once(None)
        .chain(args.clusters.iter().map(|&c| Some(c)))
        .collect();
    let mut sums = vec![0.0; sizes.len()];
    let mut bank_rows = 0;
    for digit in 0..10 {
        let split = digits.one_class(digit)?;
        let bank = embed_source(&encoder, split.train.as_ref(), &eval, 256, device)?;
        let test = embed_source(&encoder, split.test.as_ref(), &eval, 256, device)?;
        bank_rows += bank.dims()[0];
        for (size, sum) in sizes.iter().zip(&mut sums) {
            let scorer = match size {
                None => KnnScorer::new(bank.clone(), 2)?,
                Some(c) => KnnScorer::compressed(bank.clone(), *c, 2)?,
            };
            *sum += roc_auc(&scores(&scorer, test.clone())?, &split.test_anomalous)?;
        }
    }
    println!(
        "\nmean one-class ROC-AUC over the 10 digits (k = 2, {} training images per digit on average)",
        bank_rows / 10
    );
    println!("| bank | mean ROC-AUC | change |");
    println!("|---|---|---|");
    for (size, sum) in sizes.iter().zip(&sums) {
        let name = size.map_or("full".to_string(), |c| format!("{c} centroids"));
        println!(
            "| {name} | {:.4} | {:+.4} |",
            sum / 10.0,
            (sum - sums[0]) / 10.0
        );
    }

    // Part 2: time against a large synthetic bank.
    let unit = |rows: usize| {
        let x = Tensor::<2>::random([rows, 512], Distribution::Normal(0.0, 1.0), device);
        let norm = x.clone().powf_scalar(2.0).sum_dim(1).sqrt();
        x / norm
    };
    let bank = unit(5000);
    let queries = unit(1000);
    println!("\nscoring 1000 queries, D = 512");
    println!("| bank rows | build (k-means) | score |");
    println!("|---|---|---|");
    for rows in [5000usize, 500, 50] {
        let start = Instant::now();
        let scorer = if rows == 5000 {
            KnnScorer::new(bank.clone(), 2)?
        } else {
            KnnScorer::compressed(bank.clone(), rows, 2)?
        };
        let fit = start.elapsed();
        let start = Instant::now();
        let s = scores(&scorer, queries.clone())?;
        let took = start.elapsed();
        assert_eq!(s.len(), 1000);
        println!(
            "| {rows} | {:.1} ms | {:.1} ms |",
            fit.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3
        );
    }
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
