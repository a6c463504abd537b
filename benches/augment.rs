//! Augmentation throughput: two 224 px MoCo v2 training views per image (pairs/s), for 500×375
//! images and for 32×32 images, and two 32 px views per 32×32 image; batch 64, on all cores. `scripts/bench_augment.py` times
//! torchvision on PIL for the same views.

/// glibc's allocator hands large buffers back to the OS on every free, and the page faults of
/// re-acquiring them then cost more than the arithmetic; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::tensor::Device;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use image::{Rgb, RgbImage};
use msad::augment::{EvalTransform, TrainAugmentConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn images(n: usize, w: u32, h: u32) -> Vec<RgbImage> {
    (0..n)
        .map(|i| {
            RgbImage::from_fn(w, h, |x, y| {
                Rgb([(x * 7 + i as u32) as u8, (y * 5) as u8, ((x ^ y) * 3) as u8])
            })
        })
        .collect()
}

fn augment(c: &mut Criterion) {
    let device = Device::flex();
    let batch = 64;
    let train = TrainAugmentConfig::new().try_init().unwrap();
    let mut group = c.benchmark_group("augment");
    group.sample_size(10);
    group.throughput(Throughput::Elements(batch as u64));
    for (w, h) in [(500, 375), (32, 32)] {
        let imgs = images(batch, w, h);
        let mut rng = StdRng::seed_from_u64(0);
        group.bench_function(BenchmarkId::new("two-views-224", format!("{w}x{h}")), |b| {
            b.iter(|| train.views(&imgs, &mut rng, &device).unwrap())
        });
    }
    // Training at 32 px (CIFAR-sized views, as CPU runs use).
    let small = TrainAugmentConfig::new().with_size(32).try_init().unwrap();
    let imgs = images(batch, 32, 32);
    let mut rng = StdRng::seed_from_u64(0);
    group.bench_function(BenchmarkId::new("two-views-32", "32x32"), |b| {
        b.iter(|| small.views(&imgs, &mut rng, &device).unwrap())
    });
    let eval = EvalTransform::resnet152();
    let imgs = images(batch, 500, 375);
    group.bench_function(BenchmarkId::new("eval-resnet152", "500x375"), |b| {
        b.iter(|| eval.try_batch(&imgs, &device).unwrap())
    });
    group.finish();
}

criterion_group!(benches, augment);
criterion_main!(benches);
