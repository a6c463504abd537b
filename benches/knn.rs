//! kNN search: N = 5000 bank rows, Q = 10000 queries, k = 2, unit-norm f32 rows, D = 2048 and
//! D = 512; and single-query latency at D = 2048. `scripts/bench_knn.py` runs faiss-cpu's
//! `IndexFlatL2` on the same shapes.
//!
//! Host path (`HostKnnScorer`) and device path (`KnnScorer`) on flex; `MSAD_BENCH_NDARRAY=1`
//! adds ndarray, `MSAD_BENCH_WGPU=1` adds wgpu.

/// glibc's allocator hands large buffers back to the OS on every free, and the page faults of
/// re-acquiring them then cost more than the arithmetic; mimalloc keeps them.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::time::Duration;

use burn::tensor::{Device, Tensor, TensorData};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use msad::knn::{HostKnnScorer, KnnScorer};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

fn unit_rows(rows: usize, d: usize, seed: u64) -> Array2<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut a = Array2::from_shape_fn((rows, d), |_| rng.random::<f32>() * 2.0 - 1.0);
    for mut row in a.rows_mut() {
        let norm = row.dot(&row).sqrt();
        row /= norm;
    }
    a
}

fn to_tensor(a: &Array2<f32>, device: &Device) -> Tensor<2> {
    let (r, c) = a.dim();
    Tensor::from_data(TensorData::new(a.iter().copied().collect(), [r, c]), device)
}

fn knn(c: &mut Criterion) {
    let (n, q, k) = (5000, 10000, 2);
    let mut devices = vec![("flex", Device::flex())];
    if std::env::var_os("MSAD_BENCH_NDARRAY").is_some() {
        devices.push((
            "ndarray",
            msad::device::select("ndarray").unwrap().into_device(),
        ));
    }
    if std::env::var_os("MSAD_BENCH_WGPU").is_some() {
        devices.push(("wgpu", msad::device::select("wgpu").unwrap().into_device()));
    }
    let mut group = c.benchmark_group("knn");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(20));
    for d in [2048, 512] {
        let bank = unit_rows(n, d, 1);
        let queries = unit_rows(q, d, 2);
        group.throughput(Throughput::Elements(q as u64));
        let host = HostKnnScorer::new(bank.view(), k).unwrap();
        group.bench_function(BenchmarkId::new(format!("n{n}-q{q}-d{d}"), "host"), |b| {
            b.iter(|| host.score(queries.view()).unwrap())
        });
        for (name, device) in &devices {
            let scorer = KnnScorer::new(to_tensor(&bank, device), k).unwrap();
            let qt = to_tensor(&queries, device);
            group.bench_function(BenchmarkId::new(format!("n{n}-q{q}-d{d}"), *name), |b| {
                b.iter(|| msad::host::vec_from_tensor(scorer.score(qt.clone()).unwrap()).unwrap())
            });
        }
    }
    // Single-query latency.
    let d = 2048;
    let bank = unit_rows(n, d, 1);
    let one = unit_rows(1, d, 3);
    group.throughput(Throughput::Elements(1));
    group
        .measurement_time(Duration::from_secs(5))
        .sample_size(50);
    let host = HostKnnScorer::new(bank.view(), k).unwrap();
    group.bench_function(BenchmarkId::new(format!("n{n}-q1-d{d}"), "host"), |b| {
        b.iter(|| host.score(one.view()).unwrap())
    });
    for (name, device) in &devices {
        let scorer = KnnScorer::new(to_tensor(&bank, device), k).unwrap();
        let qt = to_tensor(&one, device);
        group.bench_function(BenchmarkId::new(format!("n{n}-q1-d{d}"), *name), |b| {
            b.iter(|| msad::host::vec_from_tensor(scorer.score(qt.clone()).unwrap()).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, knn);
criterion_main!(benches);
