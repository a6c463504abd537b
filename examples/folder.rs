//! Fit a detector on a folder of normal images (or an MVTec AD category), score another folder,
//! write `path,normalized,raw,anomalous,error` CSV, save the detector; or score with a saved one.
//!
//! ```text
//! # fit on normal images, score a folder, save
//! cargo run --release --example folder -- --train good/ --score incoming/ --out scores.csv \
//!     --save detector/ [--arch resnet18] [--weights W.pth | --random-init] [--epochs 5]
//! # MVTec AD: fit on <root>/<category>/train/good, score <root>/<category>/test
//! cargo run --release --example folder -- --mvtec mvtec_ad/ --category bottle --out scores.csv
//! # score with a saved detector, and write an HTML report (maps when the detector has them)
//! cargo run --release --example folder -- --load detector/ --score incoming/ --out scores.csv \
//!     --report report.html
//! ```
//!
//! The threshold of the `anomalous` column is the detector's calibration: the 0.99 quantile
//! (`--quantile` changes it) of the leave-one-out scores of the normal training images
//! (`Detector::normal_scores`), so no anomalous example is needed. It is saved with the
//! detector, and `--load` works on any directory `Detector::save` wrote. `normalized` puts the
//! threshold at 0.5. Images are scored as a stream (`Detector::score_each`): an unreadable one
//! gets its error in the `error` column and the others are scored.
//!
//! Without `--weights`, `--arch`'s (default resnet18) torchvision ImageNet weights are fetched
//! on demand; `--random-init` trains a randomly initialised net instead (a poor detector).

#[path = "support/allocator.rs"]
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;

#[path = "support/encoder_args.rs"]
mod encoder_args;

use clap::Parser;
use encoder_args::EncoderArgs;
use indicatif::ProgressBar;
use msad::anomaly_map::PatchMapConfig;
use msad::data::{FolderOptions, ImageFolder, ImageSource, MvtecAd};
use msad::encoder::Arch;
use msad::train::{Control, Evaluation, MscTrainerConfig, TrainEvent};
use msad::{Detector, Error};

/// Fit an MSC anomaly detector on normal images and score new ones.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Folder of normal training images.
    #[arg(long, conflicts_with_all = ["mvtec", "load"])]
    train: Option<PathBuf>,
    /// MVTec AD root (with --category): train on train/good, score test/.
    #[arg(long, requires = "category", conflicts_with = "load")]
    mvtec: Option<PathBuf>,
    /// MVTec AD category (bottle, cable, ...).
    #[arg(long)]
    category: Option<String>,
    /// A detector saved with --save: score without training.
    #[arg(long)]
    load: Option<PathBuf>,
    /// Folder of images to score (with --mvtec: the category's test images).
    #[arg(long)]
    score: Option<PathBuf>,
    /// CSV output: path,normalized,raw,anomalous,error (one row per image; an unreadable image
    /// gets its error instead of scores).
    #[arg(long, default_value = "scores.csv")]
    out: PathBuf,
    /// Save the fitted detector to this directory.
    #[arg(long)]
    save: Option<PathBuf>,
    /// Fit anomaly maps (a bank of normal patches, saved with --save) when fitting.
    #[arg(long)]
    maps: bool,
    /// Write a self-contained HTML report of the scored images (charts, the most anomalous
    /// images with their maps and nearest normal training images) to this file. When fitting,
    /// it implies --maps.
    #[arg(long)]
    report: Option<PathBuf>,
    #[command(flatten)]
    encoder: EncoderArgs,
    /// Fine-tuning epochs.
    #[arg(long, default_value_t = 5)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// SGD learning rate.
    #[arg(long, default_value_t = 1e-5)]
    lr: f64,
    /// Image size. 224 is the reference's evaluation transform for the architecture (ResNet-152:
    /// Resize(256) + CenterCrop(224); others: Resize(224, bicubic) + CenterCrop(224)); another
    /// size resizes and crops to it, and the training crop is that size.
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Recalibrate: the threshold becomes this quantile of the leave-one-out scores of the
    /// normal training images (fitting calibrates at 0.99; a loaded detector keeps its own).
    #[arg(long)]
    quantile: Option<f64>,
    /// Skip unreadable training images (and list them), and exit successfully when some
    /// images to score were unreadable (their rows say why).
    #[arg(long)]
    lenient: bool,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
}

/// A folder or a dataset split.
type Source = Box<dyn ImageSource>;

fn run(args: Args) -> msad::Result<()> {
    let selected = msad::device::select(&args.device)?;
    eprintln!("device: {selected}");
    let device = selected.device();
    let options = if args.lenient {
        FolderOptions::lenient()
    } else {
        FolderOptions::strict()
    };
    let open = |dir: &PathBuf| -> msad::Result<ImageFolder> {
        let folder = ImageFolder::open_with(dir, options)?;
        for s in folder.skipped() {
            eprintln!("skipped {}: {}", s.path.display(), s.reason);
        }
        Ok(folder)
    };

    // The images to fit on and (MVTec) the labelled test images.
    let (train, labelled): (Option<Source>, Option<(Source, Vec<bool>)>) =
        match (&args.train, &args.mvtec) {
            (Some(dir), _) => (Some(Box::new(open(dir)?)), None),
            (None, Some(root)) => {
                let category = args.category.as_deref().unwrap_or_default();
                let mvtec = MvtecAd::open(root, category, options)?;
                for s in mvtec.skipped() {
                    eprintln!("skipped {}: {}", s.path.display(), s.reason);
                }
                let split = mvtec.into_split()?;
                (Some(split.train), Some((split.test, split.test_anomalous)))
            }
            (None, None) => (None, None),
        };
    // What to score: --score, else the MVTec test images (then with their labels).
    let (to_score, labels): (Option<Source>, Option<&[bool]>) = match (&args.score, &labelled) {
        (Some(dir), _) => (Some(Box::new(open(dir)?)), None),
        (None, Some((_, labels))) => (None, Some(labels)),
        (None, None) => (None, None),
    };

    let mut detector = match (&args.load, &train) {
        (Some(dir), _) => Detector::load(dir, device)?,
        (None, Some(train)) => {
            let mut config = MscTrainerConfig::new()
                .with_epochs(args.epochs)
                .with_batch_size(args.batch.min(train.len().max(2)))
                .with_lr(args.lr);
            if args.image_size != 224 {
                config = config.with_image_size(args.image_size);
            }
            let encoder = args.encoder.plan(Arch::Resnet18)?.build(device, 0)?;
            eprintln!("fitting on {} normal images", train.len());
            let bar = ProgressBar::new((args.epochs.max(1)) as u64);
            let test = labelled.as_ref().map(|(images, anomalous)| Evaluation {
                images: images.as_ref(),
                anomalous,
            });
            let detector =
                Detector::fit_with(config, encoder, train.as_ref(), test, device, |e| {
                    if let TrainEvent::Epoch(r) = e {
                        if r.epoch > 0 {
                            bar.inc(1);
                        }
                        bar.println(format!(
                            "epoch {}: loss {:?}, ROC-AUC {:?}",
                            r.epoch, r.mean_loss, r.auroc
                        ));
                    }
                    Control::Continue
                })?;
            bar.finish_and_clear();
            detector
        }
        (None, None) => {
            return Err(Error::InvalidArgument {
                what: "arguments".into(),
                reason: "give --train DIR, --mvtec ROOT --category C, or --load DIR".into(),
            });
        }
    };
    if let Some(quantile) = args.quantile {
        detector.calibrate(quantile)?;
    }
    if let (None, Some(train)) = (&args.load, &train)
        && (args.maps || args.report.is_some())
    {
        eprintln!("fitting anomaly maps on {} normal images", train.len());
        detector.fit_anomaly_maps(train.as_ref(), &PatchMapConfig::new())?;
    }
    let calibration = *detector
        .calibration()
        .ok_or_else(|| Error::InvalidArgument {
            what: "detector".into(),
            reason: "not calibrated: it needs more normal images than k".into(),
        })?;
    eprintln!(
        "threshold: {} (quantile {} of the leave-one-out normal scores)",
        calibration.threshold, calibration.quantile
    );
    if let Some(dir) = &args.save {
        detector.save(dir)?;
        eprintln!(
            "saved the detector (threshold included) to {}",
            dir.display()
        );
    }

    let images = match (&to_score, &labelled) {
        (Some(folder), _) => Some(folder.as_ref()),
        (None, Some((test, _))) => Some(test.as_ref()),
        (None, None) => None,
    };
    if let Some(images) = images {
        let csv_error = |e: csv::Error| Error::InvalidArgument {
            what: args.out.display().to_string(),
            reason: format!("cannot write the CSV: {e}"),
        };
        let mut csv = csv::Writer::from_path(&args.out).map_err(csv_error)?;
        csv.write_record(["path", "normalized", "raw", "anomalous", "error"])
            .map_err(csv_error)?;
        let (mut scored, mut failed) = (Vec::new(), 0usize);
        for result in detector.score_each(images) {
            let record = match &result.outcome {
                Ok(s) => {
                    scored.push((result.index, s.raw));
                    [
                        result.name,
                        s.normalized.to_string(),
                        s.raw.to_string(),
                        s.anomalous.to_string(),
                        String::new(),
                    ]
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("{}: {e}", result.name);
                    [
                        result.name,
                        String::new(),
                        String::new(),
                        String::new(),
                        e.to_string(),
                    ]
                }
            };
            csv.write_record(&record).map_err(csv_error)?;
        }
        csv.flush().map_err(|e| Error::Io {
            path: args.out.clone(),
            source: e,
        })?;
        eprintln!(
            "wrote {} scores and {failed} errors to {}",
            scored.len(),
            args.out.display()
        );
        if let Some(labels) = labels {
            let scores: Vec<f32> = scored.iter().map(|&(_, s)| s).collect();
            let labels: Vec<bool> = scored.iter().map(|&(i, _)| labels[i]).collect();
            println!("ROC-AUC {:.4}", msad::metrics::roc_auc(&scores, &labels)?);
        }
        if let Some(path) = &args.report {
            let title = match (&args.category, &args.score) {
                (Some(category), None) => format!("{category}: test images"),
                (_, Some(dir)) => dir.display().to_string(),
                _ => "scored images".into(),
            };
            // The nearest normal images are indices into the images fitted on: only a
            // detector fitted here has them at hand.
            let normal = if args.load.is_none() {
                train.as_deref()
            } else {
                None
            };
            detector
                .report(&title, images, labels, normal, 8)?
                .write(path)?;
            eprintln!("wrote the report to {}", path.display());
        }
        if failed > 0 && !args.lenient {
            return Err(Error::InvalidArgument {
                what: "images".into(),
                reason: format!(
                    "{failed} could not be scored (the error column of {} says why; --lenient \
                     makes this a warning)",
                    args.out.display()
                ),
            });
        }
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
