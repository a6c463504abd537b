//! The paper's one-class protocol on CIFAR-10 / CIFAR-100 (binary or python versions): train on the
//! training images of one class, test on every test image (anomalous = other classes; CIFAR-100
//! by its 20 superclasses), kNN ROC-AUC before fine-tuning (epoch 0) and after each epoch.
//!
//! ```text
//! cargo run --release --example one_class -- --data data --download --dataset cifar10 \
//!     --class 3 --arch resnet152 --epochs 20 --batch 64 --lr 1e-5 --image-size 224 \
//!     [--weights-version v1] [--angular] [--device auto] [--seed 0]
//! ```
//!
//! Without `--weights`, `--arch`'s torchvision ImageNet weights are fetched on demand
//! (`--weights W.pth` uses a file, whose architecture is read from its keys; `--random-init` a
//! random net). `--download` fetches torchvision's CIFAR archive into `--data` when neither
//! version is there.
//!
//! `--class all` runs every class and reports the mean, as the paper's tables do. The last line
//! of the output is one JSON object with every figure.

#[path = "support/allocator.rs"]
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;

#[path = "support/encoder_args.rs"]
mod encoder_args;
#[path = "support/report_file.rs"]
mod report_file;

use burn::module::Module;
use clap::{Parser, ValueEnum};
use encoder_args::{EncoderArgs, fetcher_with_progress};
use msad::data::{Cifar10, Cifar100, OneClassSplit};
use msad::encoder::Arch;
use msad::train::{Control, EpochReport, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};
use serde_json::json;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Dataset {
    Cifar10,
    Cifar100,
}

/// Mean-Shifted Contrastive anomaly detection, one-class protocol on CIFAR.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Directory of either version (binary or python), or the folder holding it; with
    /// --download, where torchvision's archive is fetched to when neither is there.
    #[arg(long)]
    data: PathBuf,
    /// Fetch torchvision's CIFAR archive into --data when it is not there.
    #[arg(long)]
    download: bool,
    /// cifar10 or cifar100.
    #[arg(long, value_enum, default_value = "cifar10")]
    dataset: Dataset,
    /// The normal class (0-9 for CIFAR-10, superclass 0-19 for CIFAR-100), or `all`.
    #[arg(long, default_value = "0")]
    class: String,
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Fine-tuning epochs (0: the pretrained kNN baseline only).
    #[arg(long, default_value_t = 20)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Image size. 224 is the reference's evaluation transform for the architecture (ResNet-152:
    /// Resize(256) + CenterCrop(224); others: Resize(224, bicubic) + CenterCrop(224)); another
    /// size resizes and crops to it, and the training crop is that size.
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Add the angular center loss.
    #[arg(long)]
    angular: bool,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Write a self-contained HTML report per class (ROC curve, score histograms, the most
    /// anomalous test images with their nearest normal training images): `FILE` gets the
    /// class inserted before its extension (`report.html` → `report-3.html`).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

enum Data {
    Cifar10(Cifar10),
    Cifar100(Cifar100),
}

impl Data {
    fn classes(&self) -> usize {
        match self {
            Data::Cifar10(_) => 10,
            Data::Cifar100(_) => 20,
        }
    }

    fn split(&self, class: usize) -> msad::Result<OneClassSplit> {
        match self {
            Data::Cifar10(d) => d.one_class(class),
            Data::Cifar100(d) => d.one_class(class),
        }
    }
}

fn run(args: Args) -> msad::Result<()> {
    let selected = msad::device::select(&args.device)?;
    eprintln!("device: {selected}");
    let device = selected.device();
    let data = match args.dataset {
        Dataset::Cifar10 if args.download => {
            Data::Cifar10(Cifar10::download(&args.data, &fetcher_with_progress())?)
        }
        Dataset::Cifar100 if args.download => {
            Data::Cifar100(Cifar100::download(&args.data, &fetcher_with_progress())?)
        }
        Dataset::Cifar10 => Data::Cifar10(Cifar10::open(&args.data)?),
        Dataset::Cifar100 => Data::Cifar100(Cifar100::open(&args.data)?),
    };
    let classes: Vec<usize> = if args.class == "all" {
        (0..data.classes()).collect()
    } else {
        vec![
            args.class
                .parse()
                .map_err(|_| msad::Error::InvalidArgument {
                    what: "--class".into(),
                    reason: format!("`{}`; a class number or `all`", args.class),
                })?,
        ]
    };
    let mut config = MscTrainerConfig::new()
        .with_epochs(args.epochs)
        .with_batch_size(args.batch)
        .with_lr(args.lr)
        .with_angular(args.angular)
        .with_seed(args.seed);
    if args.image_size != 224 {
        config = config.with_image_size(args.image_size);
    }
    let trainer = MscTrainer::new(config)?;
    let plan = args.encoder.plan(Arch::Resnet152)?;
    let mut results = Vec::new();
    for class in classes {
        let split = data.split(class)?;
        eprintln!(
            "{}: {} training images, {} test images",
            split.description,
            split.train.len(),
            split.test.len()
        );
        let encoder = plan.build(device, args.seed)?;
        let test = Evaluation {
            images: split.test.as_ref(),
            anomalous: &split.test_anomalous,
        };
        let outcome = trainer.fit(encoder, split.train.as_ref(), Some(test), device, |event| {
            if let TrainEvent::Epoch(r) = event {
                match r.mean_loss {
                    None => println!(
                        "class {class} epoch 0: ROC-AUC {:.4}",
                        r.auroc.unwrap_or(f64::NAN)
                    ),
                    Some(loss) => println!(
                        "class {class} epoch {}: loss {loss:.6}, ROC-AUC {:.4}",
                        r.epoch,
                        r.auroc.unwrap_or(f64::NAN)
                    ),
                }
            }
            Control::Continue
        })?;
        if let Some(path) = &args.report {
            let config = trainer.config();
            let eval = config.eval_for(outcome.encoder.config());
            let plain = device.clone().without_autodiff();
            let encoder = outcome.encoder.valid().to_device(&plain);
            let bank = msad::features::embed_source(
                &encoder,
                split.train.as_ref(),
                &eval,
                config.eval_batch_size,
                &plain,
            )?;
            let detector = msad::Detector::from_parts(
                encoder,
                outcome.center.clone(),
                bank,
                eval,
                config.k,
                &plain,
            )?;
            let out = report_file::per_part(path, &class.to_string());
            detector
                .report(
                    &split.description,
                    split.test.as_ref(),
                    Some(&split.test_anomalous),
                    Some(split.train.as_ref()),
                    8,
                )?
                .write(&out)?;
            eprintln!("report: {}", out.display());
        }
        results.push((class, outcome.history));
    }
    let per_class = |(class, history): &(usize, Vec<EpochReport>)| {
        json!({
            "class": class,
            "epochs": history.iter().map(|r| json!({"epoch": r.epoch, "loss": r.mean_loss, "auroc": r.auroc})).collect::<Vec<_>>(),
        })
    };
    let line = if results.len() == 1 {
        per_class(&results[0])
    } else {
        let mean = |pick: fn(&[EpochReport]) -> Option<f64>| {
            let v: Vec<f64> = results.iter().filter_map(|(_, h)| pick(h)).collect();
            (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
        };
        let before = mean(|h| h.first().and_then(|r| r.auroc));
        let after = mean(|h| h.last().and_then(|r| r.auroc));
        println!(
            "mean ROC-AUC over {} classes: before {:.4}, after {:.4}",
            results.len(),
            before.unwrap_or(f64::NAN),
            after.unwrap_or(f64::NAN)
        );
        json!({
            "classes": results.iter().map(per_class).collect::<Vec<_>>(),
            "mean_auroc_before": before,
            "mean_auroc_after": after,
        })
    };
    println!("{line}");
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
