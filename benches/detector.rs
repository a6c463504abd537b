//! Latency of one image, decoded `RgbImage` (500 × 375) to normalised score:
//! `Detector::score_image` with a prepared engine (weights folded once, when the detector was
//! built), the evaluation transform at 224 px, and the kNN against a bank of 5,000 normal
//! features. ResNet-18 and ResNet-152 (random weights: the speed does not depend on their
//! values), flex backend. `scripts/bench_detector.py` measures PyTorch eager + faiss on the
//! same work.

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use image::{Rgb, RgbImage};
use msad::Detector;
use msad::encoder::{Arch, ResNetConfig, l2_normalize};
use msad::train::MscTrainerConfig;

/// Normal features in the bank.
const BANK_ROWS: usize = 5_000;

fn detector(c: &mut Criterion) {
    let device = Device::flex();
    let image = RgbImage::from_fn(500, 375, |x, y| {
        Rgb([(x % 251) as u8, (y % 241) as u8, ((x * y) % 239) as u8])
    });
    let mut group = c.benchmark_group("detector");
    group.sample_size(20);
    for arch in [Arch::Resnet18, Arch::Resnet152] {
        let config = ResNetConfig::from_arch(arch);
        let eval = MscTrainerConfig::new().eval_for(&config);
        let encoder = config.try_init(&device).expect("a torchvision layout");
        let dim = encoder.feature_dim();
        let bank = l2_normalize(Tensor::random(
            [BANK_ROWS, dim],
            Distribution::Default,
            &device,
        ));
        let center = Tensor::zeros([dim], &device);
        let detector =
            Detector::from_parts(encoder, center, bank, eval, 2, &device).expect("a detector");
        detector.score_image(&image).expect("a score"); // warm-up
        let id = BenchmarkId::new("score_image", format!("{arch}-bank{BANK_ROWS}"));
        group.bench_function(id, |b| b.iter(|| detector.score_image(&image).unwrap()));
    }
    group.finish();
}

criterion_group!(benches, detector);
criterion_main!(benches);
