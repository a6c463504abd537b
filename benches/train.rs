//! Training-step throughput (pairs of views per second): ResNet-18, two MoCo v2 views per image,
//! the mean-shifted loss, backward and an SGD step, as `msad::train` runs them; at 32 px batch
//! 64 and 224 px batch 16, on each enabled CPU backend: the library's `TrainingSession::step`
//! and the same step through burn's autodiff (`-autodiff`). `scripts/bench_train.py` times the same
//! step in PyTorch.

#[path = "../examples/support/allocator.rs"]
mod allocator;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::Tensor;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use image::{Rgb, RgbImage};
use msad::augment::TrainAugmentConfig;
use msad::device::Backend;
use msad::encoder::{Arch, ResNetConfig};
use msad::loss::MeanShiftedContrastiveLossConfig;
use msad::train::{MscTrainer, MscTrainerConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn train(c: &mut Criterion) {
    allocator::keep_freed_memory();
    let mut group = c.benchmark_group("train-step");
    group.sample_size(10);
    let backends: Vec<Backend> = Backend::enabled()
        .into_iter()
        .filter(|b| *b == Backend::Flex)
        .collect();
    for backend in backends {
        let device = msad::device::select(backend.name())
            .unwrap()
            .into_device()
            .autodiff();
        for (size, batch, src) in [(32u32, 64usize, 32u32), (224, 16, 256)] {
            let images: Vec<RgbImage> = (0..batch)
                .map(|i| {
                    RgbImage::from_fn(src, src, |x, y| {
                        Rgb([(x * 3 + i as u32) as u8, (y * 5) as u8, (x ^ y) as u8])
                    })
                })
                .collect();
            let augment = TrainAugmentConfig::new()
                .with_size(size)
                .try_init()
                .unwrap();
            let loss_fn = MeanShiftedContrastiveLossConfig::new().init();
            let mut model = Some(ResNetConfig::from_arch(Arch::Resnet18).init(&device));
            let center = Tensor::<1>::zeros([512], &device);
            let mut optim = SgdConfig::new()
                .with_weight_decay(Some(WeightDecayConfig::new(5e-5)))
                .init();
            let mut rng = StdRng::seed_from_u64(0);
            group.throughput(Throughput::Elements(batch as u64));
            // The library's step (`TrainingSession`: on CPU devices, forward and backward on
            // host memory).
            let trainer = MscTrainer::new(
                MscTrainerConfig::new()
                    .with_image_size(size)
                    .with_batch_size(batch),
            )
            .unwrap();
            let encoder = ResNetConfig::from_arch(Arch::Resnet18).init(&device);
            let mut session = trainer
                .session(encoder, Tensor::<1>::zeros([512], &device), &device)
                .unwrap();
            group.bench_function(
                BenchmarkId::new(format!("resnet18-{size}px-b{batch}"), backend.name()),
                |b| b.iter(|| session.step(&images, &mut rng).unwrap()),
            );
            // The same step through burn's autodiff and the backend's convolutions.
            group.bench_function(
                BenchmarkId::new(
                    format!("resnet18-{size}px-b{batch}-autodiff"),
                    backend.name(),
                ),
                |b| {
                    b.iter(|| {
                        let m = model.take().unwrap();
                        let (v1, v2) = augment.views(&images, &mut rng, &device).unwrap();
                        let phi = m.embed(Tensor::cat(vec![v1, v2], 0));
                        let phi1 = phi.clone().slice([0..batch, 0..512]);
                        let phi2 = phi.slice([batch..2 * batch, 0..512]);
                        let loss = loss_fn.forward(phi1, phi2, center.clone());
                        let grads = GradientsParams::from_grads(loss.backward(), &m);
                        let m = optim.step(1e-5, m, grads);
                        let _ = m.devices();
                        model = Some(m);
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, train);
criterion_main!(benches);
