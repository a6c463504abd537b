//! Embeds images with a torchvision ResNet: writes φ(x), the L2-normalised pooled features.
//!
//! ```text
//! cargo run --release --example embed -- (--weights resnet18-f37072fd.pth | --arch resnet18) \
//!     (--input images.npy | --images DIR) --output features.npy \
//!     [--image-size 224] [--device auto] [--batch 32]
//! ```
//!
//! `--arch A` without `--weights` fetches A's torchvision ImageNet weights on demand
//! (`--weights-version v2` for V2); with `--weights`, the layout comes from the file's keys.
//!
//! `--input` is an (N, 3, H, W) float32 `.npy`, already normalised with the ImageNet mean and
//! std. `--images` reads every image under a folder (sorted paths, recursively) with the
//! reference's evaluation transform: Resize(size) bicubic + CenterCrop(size) for the basic-block
//! nets (ResNet-18/34), Resize(size · 256/224) bilinear + CenterCrop(size) for the bottleneck
//! nets. The output is an (N, D) float32 `.npy` with unit rows (D = 512 or 2048).

use std::path::PathBuf;
use std::process::ExitCode;

#[path = "support/encoder_args.rs"]
mod encoder_args;

use clap::Parser;
use encoder_args::EncoderArgs;
use indicatif::{ProgressBar, ProgressStyle};
use msad::augment::{EvalTransform, Filter};
use msad::data::{ImageFolder, ImageSource};
use msad::encoder::{Arch, BlockKind};
use ndarray::{Axis, concatenate};

/// Embed images with a torchvision ResNet (fc removed, features L2-normalised).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(flatten)]
    encoder: EncoderArgs,
    /// (N, 3, H, W) float32 .npy, ImageNet-normalised.
    #[arg(long, required_unless_present = "images", conflicts_with = "images")]
    input: Option<PathBuf>,
    /// A folder of images (png, jpg, bmp, tiff), read with the evaluation transform.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Output side of the evaluation transform (with --images).
    #[arg(long, default_value_t = 224)]
    image_size: u32,
    /// Where to write the (N, D) float32 features.
    #[arg(long)]
    output: PathBuf,
    /// auto, wgpu, flex or ndarray.
    #[arg(long, default_value = "auto")]
    device: String,
    /// Images per forward pass.
    #[arg(long, default_value_t = 32)]
    batch: usize,
}

fn run(args: Args) -> msad::Result<()> {
    let selected = msad::device::select(&args.device)?;
    eprintln!("device: {selected}");
    let device = selected.device();
    if args.encoder.weights.is_none() && args.encoder.arch.is_none() {
        return Err(msad::Error::InvalidArgument {
            what: "encoder".into(),
            reason: "give --weights FILE, or --arch A for A's ImageNet weights (fetched on demand)"
                .into(),
        });
    }
    let encoder = args.encoder.plan(Arch::Resnet18)?.build(device, 0)?;
    eprintln!("encoder: {} features", encoder.feature_dim());

    if args.batch == 0 {
        return Err(msad::Error::InvalidArgument {
            what: "--batch".into(),
            reason: "must be at least 1".into(),
        });
    }
    let mut parts = Vec::new();
    let bar = ProgressBar::hidden();
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} images {per_sec} eta {eta}")
            .expect("a valid template"),
    );
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Some(dir) = &args.images {
        let folder = ImageFolder::open(dir)?;
        let size = args.image_size;
        let eval = match encoder.config().block {
            BlockKind::Basic => EvalTransform::new(size, size).with_filter(Filter::Bicubic),
            BlockKind::Bottleneck => {
                EvalTransform::new(size * 256 / 224, size).with_filter(Filter::Bilinear)
            }
        };
        bar.set_length(folder.len() as u64);
        for start in (0..folder.len()).step_by(args.batch) {
            let indices: Vec<usize> = (start..(start + args.batch).min(folder.len())).collect();
            let images = msad::features::load_images(&folder, &indices)?;
            let phi = encoder.try_embed(eval.try_batch(&images, device)?)?;
            parts.push(msad::host::array_from_tensor(phi)?);
            bar.inc(indices.len() as u64);
        }
    } else if let Some(input) = &args.input {
        let images = msad::npy::read_f32(input)?;
        if images.ndim() != 4 || images.shape()[1] != 3 {
            return Err(msad::Error::InvalidShape {
                what: format!("{}", input.display()),
                expected: "(N, 3, H, W)".into(),
                found: images.shape().to_vec(),
            });
        }
        bar.set_length(images.shape()[0] as u64);
        for chunk in images.axis_chunks_iter(Axis(0), args.batch) {
            let x = msad::host::tensor_from_array::<4>(chunk.to_owned(), device)?;
            let phi = msad::host::array_from_tensor(encoder.try_embed(x)?)?;
            bar.inc(chunk.shape()[0] as u64);
            parts.push(phi);
        }
    }
    bar.finish();
    if parts.is_empty() {
        return Err(msad::Error::InvalidArgument {
            what: "input".into(),
            reason: "no images to embed".into(),
        });
    }
    let views: Vec<_> = parts.iter().map(|p| p.view()).collect();
    let features = concatenate(Axis(0), &views).map_err(|e| msad::Error::Backend(e.to_string()))?;
    msad::npy::write_f32(&args.output, &features)?;
    eprintln!(
        "wrote {} ({} x {})",
        args.output.display(),
        features.shape()[0],
        features.shape()[1]
    );
    Ok(())
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
