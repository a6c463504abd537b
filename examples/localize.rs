//! Anomaly maps on an MVTec-AD-layout data set: per category, image ROC-AUC, pixel ROC-AUC and
//! PRO for one or more patch-map settings, and the time of a map against the time of a score.
//!
//! ```text
//! # the synthetic benchmark (real photographs, synthetic defects; no download):
//! python3 scripts/make_synthetic_mvtec.py --out /tmp/synthetic_mvtec
//! cargo run --release --example localize -- --mvtec /tmp/synthetic_mvtec --random-init
//! # MVTec AD itself, with ImageNet weights, MSC fine-tuning, and a report per category:
//! cargo run --release --example localize -- --mvtec mvtec_ad/ --category bottle --epochs 5 \
//!     --report bottle.html
//! ```
//!
//! `--variants` lists the settings compared, as stage lists separated by `;`
//! (default `layer2,layer3;layer3;layer1,layer2`): the first is msad's default. Every variant
//! is reported twice: `values` (the map scaled so its maximum is the image's normalised score,
//! what `Detector::anomaly_map` returns) and `distances` (the raw patch distances).

#[path = "support/allocator.rs"]
mod allocator;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

#[path = "support/encoder_args.rs"]
mod encoder_args;
#[path = "support/report_file.rs"]
mod report_file;

use clap::Parser;
use encoder_args::EncoderArgs;
use msad::anomaly_map::{AnomalyMap, PatchMapConfig};
use msad::data::{FolderOptions, MvtecAd};
use msad::encoder::{Arch, Stage};
use msad::metrics::{DEFAULT_MAX_FPR, pixel_roc_auc, pro_auc, roc_auc};
use msad::train::MscTrainerConfig;
use msad::{Detector, Error};
use ndarray::Array2;

/// Anomaly maps on MVTec-layout data: image and pixel metrics, time per map.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Root of an MVTec-AD-layout data set.
    #[arg(long)]
    mvtec: PathBuf,
    /// Categories to run (repeatable); default all.
    #[arg(long)]
    category: Vec<String>,
    #[command(flatten)]
    encoder: EncoderArgs,
    /// MSC fine-tuning epochs; 0 uses the encoder as it is (the kNN baseline).
    #[arg(long, default_value_t = 0)]
    epochs: usize,
    /// Image size (224: the reference's evaluation transform).
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Patch-map settings to compare: stage lists separated by `;`.
    #[arg(long, default_value = "layer2,layer3;layer3;layer1,layer2")]
    variants: String,
    /// Most patches in the bank.
    #[arg(long, default_value_t = 5000)]
    max_patches: usize,
    /// Images timed for the per-image latencies.
    #[arg(long, default_value_t = 10)]
    timed: usize,
    /// Write an HTML report of the first variant per category: `FILE` gets the category
    /// inserted before its extension (`report.html` → `report-bottle.html`).
    #[arg(long)]
    report: Option<PathBuf>,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn parse_variants(text: &str) -> msad::Result<Vec<Vec<Stage>>> {
    text.split(';')
        .map(|variant| {
            variant
                .split(',')
                .map(|name| match name.trim() {
                    "layer1" => Ok(Stage::Layer1),
                    "layer2" => Ok(Stage::Layer2),
                    "layer3" => Ok(Stage::Layer3),
                    "layer4" => Ok(Stage::Layer4),
                    other => Err(Error::InvalidArgument {
                        what: "--variants".into(),
                        reason: format!("unknown stage `{other}`"),
                    }),
                })
                .collect()
        })
        .collect()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn run(args: Args) -> msad::Result<()> {
    let selected = msad::device::select(&args.device)?;
    eprintln!("device: {selected}");
    let device = selected.device();
    let variants = parse_variants(&args.variants)?;
    let categories = if args.category.is_empty() {
        MvtecAd::categories(&args.mvtec)?
    } else {
        args.category.clone()
    };
    let plan = args.encoder.plan(Arch::Resnet18)?;
    println!(
        "| category | stages | image ROC-AUC | pixel ROC-AUC (values) | PRO (values) | pixel ROC-AUC (distances) | PRO (distances) | score ms | map ms | bank fit s |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for category in &categories {
        let mvtec = MvtecAd::open(&args.mvtec, category, FolderOptions::strict())?;
        let masks: Vec<Array2<bool>> = (0..mvtec.test_len())
            .map(|i| mvtec.test_mask(i))
            .collect::<msad::Result<_>>()?;
        let split = mvtec.into_split()?;
        let mut config = MscTrainerConfig::new()
            .with_epochs(args.epochs)
            .with_batch_size(32.min(split.train.len().max(2)));
        if args.image_size != 224 {
            config = config.with_image_size(args.image_size);
        }
        let encoder = plan.build(device, 0)?;
        let mut detector = if args.epochs == 0 {
            Detector::without_training(config, encoder, split.train.as_ref(), device)?
        } else {
            Detector::fit(config, encoder, split.train.as_ref(), device)?
        };
        let timed: Vec<_> = (0..args.timed.min(split.test.len()))
            .map(|i| split.test.get(i))
            .collect::<msad::Result<_>>()?;
        for (v, stages) in variants.iter().enumerate() {
            let map_config = PatchMapConfig::new()
                .with_stages(stages.clone())
                .with_max_patches(args.max_patches);
            let start = Instant::now();
            detector.fit_anomaly_maps(split.train.as_ref(), &map_config)?;
            let fit_s = start.elapsed().as_secs_f64();
            let mut maps: Vec<AnomalyMap> = Vec::with_capacity(split.test.len());
            for result in detector.anomaly_map_each(split.test.as_ref()) {
                maps.push(result.outcome?);
            }
            let scores: Vec<f32> = maps.iter().map(|m| m.score.raw).collect();
            let image_auc = roc_auc(&scores, &split.test_anomalous)?;
            let views: Vec<_> = masks.iter().map(|m| m.view()).collect();
            // MVTec's masks are at the image's resolution, as the maps are.
            let values: Vec<_> = maps.iter().map(|m| m.values.view()).collect();
            let distances: Vec<_> = maps.iter().map(|m| m.distances.view()).collect();
            let metrics = |maps: &[ndarray::ArrayView2<'_, f32>]| -> msad::Result<(f64, f64)> {
                Ok((
                    pixel_roc_auc(maps, &views)?,
                    pro_auc(maps, &views, DEFAULT_MAX_FPR)?,
                ))
            };
            let (pix_v, pro_v) = metrics(&values)?;
            let (pix_d, pro_d) = metrics(&distances)?;
            // Interleaved, one image at a time: the latency a service sees.
            let (mut score_ms, mut map_ms) = (Vec::new(), Vec::new());
            for image in &timed {
                let t = Instant::now();
                detector.score_image(image)?;
                score_ms.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                detector.anomaly_map(image)?;
                map_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let names: Vec<String> = stages
                .iter()
                .map(|s| format!("{s:?}").to_lowercase())
                .collect();
            println!(
                "| {category} | {} | {:.3} | {pix_v:.3} | {pro_v:.3} | {pix_d:.3} | {pro_d:.3} | {:.1} | {:.1} | {fit_s:.1} |",
                names.join("+"),
                image_auc,
                median(score_ms),
                median(map_ms),
            );
            if v == 0
                && let Some(report) = &args.report
            {
                write_report(report, category, &detector, &split, pix_v, pro_v)?;
            }
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

/// The report of the first variant: every test image, the most anomalous with their maps and
/// nearest normal training images.
fn write_report(
    path: &std::path::Path,
    category: &str,
    detector: &Detector,
    split: &msad::data::OneClassSplit,
    pixel_auc: f64,
    pro: f64,
) -> msad::Result<()> {
    let out = report_file::per_part(path, category);
    let report = detector
        .report(
            &format!("{category}: anomaly maps"),
            split.test.as_ref(),
            Some(&split.test_anomalous),
            Some(split.train.as_ref()),
            8,
        )?
        .with_figure("pixel ROC-AUC", format!("{pixel_auc:.3}"))
        .with_figure("PRO (FPR ≤ 0.3)", format!("{pro:.3}"));
    report.write(&out)?;
    eprintln!("report: {}", out.display());
    Ok(())
}
