//! Mean-shifted contrastive loss, forward + backward, B = 64, D = 512 and 2048, on each
//! enabled CPU backend (`MSAD_BENCH_WGPU=1` adds wgpu). `scripts/bench_loss.py` times the
//! reference PyTorch formula with autograd on the same shapes.

/// glibc's allocator hands large buffers back to the OS on every free, and the page faults of
/// re-acquiring them then cost more than the arithmetic; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use burn::tensor::{Device, Distribution, Tensor};
use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use msad::device::Backend;
use msad::encoder::l2_normalize;
use msad::loss::MeanShiftedContrastiveLossConfig;

fn loss(c: &mut Criterion) {
    let mut backends: Vec<Backend> = Backend::enabled()
        .into_iter()
        .filter(|b| *b != Backend::Wgpu)
        .collect();
    if std::env::var_os("MSAD_BENCH_WGPU").is_some() {
        backends.push(Backend::Wgpu);
    }
    let b = 64;
    let loss = MeanShiftedContrastiveLossConfig::new().init();
    let mut group = c.benchmark_group("loss");
    for backend in backends {
        let device: Device = msad::device::select(backend.name())
            .unwrap()
            .into_device()
            .autodiff();
        for d in [512, 2048] {
            let phi = |_| {
                l2_normalize(Tensor::<2>::random(
                    [b, d],
                    Distribution::Normal(0.0, 1.0),
                    &device,
                ))
            };
            let (p1, p2) = (phi(0), phi(1));
            let center = p1.clone().mean_dim(0).reshape([d]).detach();
            group.bench_function(
                BenchmarkId::new(format!("fwd+bwd-b{b}-d{d}"), backend.name()),
                |bench| {
                    bench.iter(|| {
                        let x1 = p1.clone().detach().require_grad();
                        let x2 = p2.clone().detach().require_grad();
                        let value = loss.forward(x1.clone(), x2.clone(), center.clone());
                        let grads = value.backward();
                        let g = x1.grad(&grads).unwrap() + x2.grad(&grads).unwrap();
                        msad::host::vec_from_tensor(g.sum()).unwrap()
                    })
                },
            );
        }
    }
    group.finish();
}

criterion_group!(benches, loss);
criterion_main!(benches);
