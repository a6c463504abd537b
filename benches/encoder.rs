//! ResNet forward throughput (images/s) on each enabled CPU backend.
//!
//! Cases, as the PyTorch reference figures were taken (eval mode, no grad, 2 threads):
//! ResNet-18 at 32 px batch 64 and 224 px batch 32, ResNet-152 at 224 px batch 8.
//! `scripts/bench_encoder.py` measures torchvision on the same machine. On CPU backends each
//! case also runs `forward_tensor_ops` (the backend's own convolutions) for comparison.
//! Set `MSAD_BENCH_WGPU=1` to add the wgpu backend.

/// glibc's allocator hands large buffers back to the OS on every free, and the page faults of
/// re-acquiring them then cost more than the arithmetic; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::tensor::{Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use msad::device::Backend;
use msad::encoder::{Arch, InferenceEncoder, ResNetConfig};

fn encoder(c: &mut Criterion) {
    let mut backends: Vec<Backend> = Backend::enabled()
        .into_iter()
        .filter(|b| *b != Backend::Wgpu)
        .collect();
    if std::env::var_os("MSAD_BENCH_WGPU").is_some() {
        backends.push(Backend::Wgpu);
    }
    let cases = [
        (Arch::Resnet18, 32, 64),
        (Arch::Resnet18, 224, 32),
        (Arch::Resnet152, 224, 8),
    ];
    let mut group = c.benchmark_group("encoder");
    group.sample_size(10);
    for backend in backends {
        let selected = msad::device::select(backend.name()).expect("enabled backend");
        let device = selected.device();
        for (arch, size, batch) in cases {
            let model = ResNetConfig::from_arch(arch).init(device);
            let x = Tensor::<4>::random([batch, 3, size, size], Distribution::Default, device);
            // Materialised, so that no backend regenerates it lazily inside the timed loop.
            let x = Tensor::<4>::from_data(x.into_data(), device);
            // Warm up (kernel selection, allocation pools).
            let _ = msad::host::vec_from_tensor(model.forward(x.clone())).unwrap();
            group.throughput(Throughput::Elements(batch as u64));
            let id = BenchmarkId::new(format!("{arch}-{size}px-b{batch}"), backend.name());
            group.bench_function(id, |b| {
                b.iter(|| msad::host::vec_from_tensor(model.forward(x.clone())).unwrap())
            });
            // The weights folded once, as for many batches (`features`, the `Detector`).
            let prepared = InferenceEncoder::new(&model, device);
            let id = BenchmarkId::new(format!("{arch}-{size}px-b{batch}-prepared"), backend.name());
            group.bench_function(id, |b| {
                b.iter(|| {
                    msad::host::vec_from_tensor(prepared.try_forward(x.clone()).unwrap()).unwrap()
                })
            });
            // On CPU devices `forward` runs msad's CPU engine; this is the backend's own path.
            if backend != Backend::Wgpu {
                let id = BenchmarkId::new(
                    format!("{arch}-{size}px-b{batch}-tensor-ops"),
                    backend.name(),
                );
                group.bench_function(id, |b| {
                    b.iter(|| {
                        msad::host::vec_from_tensor(model.forward_tensor_ops(x.clone())).unwrap()
                    })
                });
            }
        }
    }
    group.finish();
}

criterion_group!(benches, encoder);
criterion_main!(benches);
