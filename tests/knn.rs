//! The kNN scorer against an f64 brute-force reference, on every backend and on the host path.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use msad::Error;
use msad::knn::{HostKnnScorer, KMeansConfig, KnnScorer};
use ndarray::Array2;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use common::backends;

/// How a case's rows are made.
#[derive(Clone, Copy, PartialEq)]
enum Rows {
    /// Random unit rows.
    Unit,
    /// Duplicate bank rows (exact ties) and queries equal to bank rows.
    Duplicates,
    /// Rows of norms from 0.1 to 10, one all-zero bank row and one all-zero query.
    Varied,
    /// The first 300 bank rows equal, every other query near them: more equidistant rows
    /// than the CPU screen may hold for one query under a tight budget (those queries are
    /// searched again without it), all measured exactly under the default one.
    Crowded,
}

struct Case {
    n: usize,
    q: usize,
    d: usize,
    k: usize,
    tile_bytes: usize,
    rows: Rows,
    seed: u64,
}

const CASES: &[Case] = &[
    // Rows of varied norms, with zeros.
    Case {
        n: 310,
        q: 70,
        d: 129,
        k: 3,
        tile_bytes: 64 << 20,
        rows: Rows::Varied,
        seed: 7,
    },
    // Many equidistant bank rows, k = 2, under a tight budget and the default one.
    Case {
        n: 400,
        q: 60,
        d: 96,
        k: 2,
        tile_bytes: 4 * 64 * 100,
        rows: Rows::Crowded,
        seed: 8,
    },
    Case {
        n: 400,
        q: 60,
        d: 96,
        k: 2,
        tile_bytes: 64 << 20,
        rows: Rows::Crowded,
        seed: 9,
    },
    // One tile, k = 2 as in the paper.
    Case {
        n: 300,
        q: 50,
        d: 64,
        k: 2,
        tile_bytes: 64 << 20,
        rows: Rows::Unit,
        seed: 1,
    },
    // Many chunks, N and Q not multiples of the chunk sizes.
    Case {
        n: 257,
        q: 131,
        d: 33,
        k: 3,
        tile_bytes: 4 * 40 * 33,
        rows: Rows::Unit,
        seed: 2,
    },
    // k = N.
    Case {
        n: 17,
        q: 9,
        d: 8,
        k: 17,
        tile_bytes: 4 * 5 * 8,
        rows: Rows::Unit,
        seed: 3,
    },
    // Duplicate bank rows (exact ties) and queries equal to bank rows.
    Case {
        n: 120,
        q: 40,
        d: 16,
        k: 4,
        tile_bytes: 4 * 1000,
        rows: Rows::Duplicates,
        seed: 4,
    },
    // Several blocks of queries and D above the CPU micro-kernel's column block of 256, none
    // of N, Q, D a multiple of its panel sizes.
    Case {
        n: 150,
        q: 401,
        d: 521,
        k: 2,
        tile_bytes: 64 << 20,
        rows: Rows::Unit,
        seed: 6,
    },
    // A single query.
    Case {
        n: 1000,
        q: 1,
        d: 128,
        k: 2,
        tile_bytes: 4 * 100 * 128,
        rows: Rows::Unit,
        seed: 5,
    },
];

fn unit_rows(rng: &mut StdRng, rows: usize, d: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * d);
    for _ in 0..rows {
        let row: Vec<f64> = (0..d).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect();
        out.extend(common::unit_f32(&row));
    }
    out
}

/// (bank, queries), row-major.
fn data(case: &Case) -> (Vec<f32>, Vec<f32>) {
    let mut rng = StdRng::seed_from_u64(case.seed);
    let mut bank = unit_rows(&mut rng, case.n, case.d);
    let mut queries = unit_rows(&mut rng, case.q, case.d);
    let d = case.d;
    match case.rows {
        Rows::Unit => {}
        Rows::Duplicates => {
            for i in (0..case.n).step_by(3).skip(1) {
                let src = bank[(i - 1) * d..i * d].to_vec();
                bank[i * d..(i + 1) * d].copy_from_slice(&src);
            }
            for j in (0..case.q).step_by(2) {
                let src = bank[(j * 2 % case.n) * d..(j * 2 % case.n + 1) * d].to_vec();
                queries[j * d..(j + 1) * d].copy_from_slice(&src);
            }
        }
        Rows::Varied => {
            for (r, row) in bank
                .chunks_exact_mut(d)
                .chain(queries.chunks_exact_mut(d))
                .enumerate()
            {
                let norm = 10f32.powf(rng.random::<f32>() * 2.0 - 1.0);
                row.iter_mut()
                    .for_each(|v| *v *= if r == 5 { 0.0 } else { norm });
            }
            queries[..d].fill(0.0);
        }
        Rows::Crowded => {
            let first = bank[..d].to_vec();
            for row in bank.chunks_exact_mut(d).take(300) {
                row.copy_from_slice(&first);
            }
            for row in queries.chunks_exact_mut(d).step_by(2) {
                for (v, &c) in row.iter_mut().zip(&first) {
                    *v = c + 0.01 * *v;
                }
            }
        }
    }
    (bank, queries)
}

/// Per query, all (distance, index) in f64, sorted.
fn brute_force(case: &Case, bank: &[f32], queries: &[f32]) -> Vec<Vec<(f64, usize)>> {
    let d = case.d;
    (0..case.q)
        .map(|i| {
            let q = &queries[i * d..(i + 1) * d];
            let mut all: Vec<(f64, usize)> = (0..case.n)
                .map(|j| {
                    let b = &bank[j * d..(j + 1) * d];
                    let dist = q
                        .iter()
                        .zip(b)
                        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
                        .sum();
                    (dist, j)
                })
                .collect();
            all.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            all
        })
        .collect()
}

/// Same neighbours except exact ties; distances to relative 1e-5 (absolute 1e-6 near 0).
fn check(case: &Case, what: &str, dist: &[f32], idx: &[usize], reference: &[Vec<(f64, usize)>]) {
    let k = case.k;
    for (i, all) in reference.iter().enumerate() {
        for j in 0..k {
            let (want_d, want_i) = all[j];
            let (got_d, got_i) = (dist[i * k + j] as f64, idx[i * k + j]);
            assert!(
                (got_d - want_d).abs() <= 1e-5 * want_d.max(0.1),
                "{what}: query {i} rank {j}: distance {got_d} vs {want_d}"
            );
            if got_i != want_i {
                // Only a tie may swap neighbours: the reference distance of what we returned
                // must equal the one at this rank.
                let ours = all.iter().find(|(_, ix)| *ix == got_i).unwrap().0;
                assert!(
                    (ours - want_d).abs() <= 1e-6,
                    "{what}: query {i} rank {j}: index {got_i} vs {want_i} (no tie: {ours} vs {want_d})"
                );
            }
        }
        let got: Vec<usize> = idx[i * k..(i + 1) * k].to_vec();
        let mut unique = got.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            k,
            "{what}: query {i} repeats a neighbour: {got:?}"
        );
    }
}

fn tensor(values: &[f32], rows: usize, d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [rows, d]), device)
}

#[test]
fn device_scorer_matches_brute_force_on_every_backend() {
    for selected in backends() {
        let device = selected.device();
        for (c, case) in CASES.iter().enumerate() {
            let (bank, queries) = data(case);
            let reference = brute_force(case, &bank, &queries);
            // `new` runs the CPU engine on CPU devices; `with_tensor_ops` the tensor engine
            // that GPUs use, here on every backend.
            for tensor_ops in [false, true] {
                let bank = tensor(&bank, case.n, case.d, device);
                let knn = if tensor_ops {
                    KnnScorer::with_tensor_ops(bank, case.k, case.tile_bytes)
                } else {
                    KnnScorer::with_tile_bytes(bank, case.k, case.tile_bytes)
                }
                .unwrap();
                let what = format!("case {c} on {selected} (tensor ops: {tensor_ops})");
                check_scorer(case, &what, &knn, &queries, &reference, device);
            }
        }
    }
}

fn check_scorer(
    case: &Case,
    what: &str,
    knn: &KnnScorer,
    queries: &[f32],
    reference: &[Vec<(f64, usize)>],
    device: &Device,
) {
    let (dist, idx) = knn
        .neighbours(tensor(queries, case.q, case.d, device))
        .unwrap();
    assert_eq!(dist.dims(), [case.q, case.k]);
    let dist = msad::host::vec_from_tensor(dist).unwrap();
    let idx: Vec<usize> = idx
        .into_data()
        .convert::<i64>()
        .iter::<i64>()
        .map(|v| v as usize)
        .collect();
    check(case, what, &dist, &idx, reference);
    let scores =
        msad::host::vec_from_tensor(knn.score(tensor(queries, case.q, case.d, device)).unwrap())
            .unwrap();
    for (i, s) in scores.iter().enumerate() {
        let want: f64 = reference[i][..case.k].iter().map(|(d, _)| d).sum();
        assert!(
            (*s as f64 - want).abs() <= 1e-5 * want.max(0.1),
            "{what}: score {i}"
        );
    }
}

/// In a pool of two threads (CI's), so that the crowded case under its tight budget makes
/// queries overflow the CPU screen whatever the machine (with more threads the bank would be
/// split into parts too small to overflow).
#[test]
fn host_scorer_matches_brute_force() {
    rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap()
        .install(host_scorer_matches_brute_force_on_this_pool);
}

fn host_scorer_matches_brute_force_on_this_pool() {
    for (c, case) in CASES.iter().enumerate() {
        let (bank, queries) = data(case);
        let reference = brute_force(case, &bank, &queries);
        let bank = Array2::from_shape_vec((case.n, case.d), bank).unwrap();
        let queries = Array2::from_shape_vec((case.q, case.d), queries).unwrap();
        let knn = HostKnnScorer::new(bank.view(), case.k)
            .unwrap()
            .with_tile_bytes(case.tile_bytes);
        let (dist, idx) = knn.neighbours(queries.view()).unwrap();
        let what = format!("host case {c}");
        check(
            case,
            &what,
            dist.as_slice().unwrap(),
            idx.as_slice().unwrap(),
            &reference,
        );
        // Nearest first, exact ties ordered by index.
        for (row_d, row_i) in dist.rows().into_iter().zip(idx.rows()) {
            for j in 1..case.k {
                let ordered = row_d[j - 1] < row_d[j]
                    || (row_d[j - 1] == row_d[j] && row_i[j - 1] < row_i[j]);
                assert!(ordered, "{what}: {row_d} {row_i}");
            }
        }
        let scores = knn.score(queries.view()).unwrap();
        assert_eq!(scores.len(), case.q);
    }
}

#[test]
fn compression_to_as_many_clusters_as_rows_changes_nothing() {
    let case = &CASES[0];
    let (bank, queries) = data(case);
    let device = Device::flex();
    let exact = KnnScorer::new(tensor(&bank, case.n, case.d, &device), 2).unwrap();
    let compressed =
        KnnScorer::compressed(tensor(&bank, case.n, case.d, &device), case.n, 2).unwrap();
    let a = msad::host::vec_from_tensor(
        exact
            .score(tensor(&queries, case.q, case.d, &device))
            .unwrap(),
    )
    .unwrap();
    let b = msad::host::vec_from_tensor(
        compressed
            .score(tensor(&queries, case.q, case.d, &device))
            .unwrap(),
    )
    .unwrap();
    assert!(common::max_abs_diff(&a, &b) < 1e-6);
}

#[test]
fn compression_is_seeded() {
    let case = &CASES[0];
    let (bank, queries) = data(case);
    let device = Device::flex();
    let config = KMeansConfig::new(30).with_seed(11);
    let score = |config: &KMeansConfig| {
        let knn =
            KnnScorer::compressed_with(tensor(&bank, case.n, case.d, &device), config, 2).unwrap();
        assert_eq!(knn.len(), 30);
        msad::host::vec_from_tensor(
            knn.score(tensor(&queries, case.q, case.d, &device))
                .unwrap(),
        )
        .unwrap()
    };
    let a = score(&config);
    let b = score(&config);
    assert_eq!(a, b, "same seed, same centroids");
    assert_ne!(
        a,
        score(&config.clone().with_seed(12)),
        "another seed, other centroids"
    );
}

#[test]
fn bad_input_is_an_error() {
    let device = Device::flex();
    let bank = Tensor::<2>::ones([4, 3], &device);
    let err = KnnScorer::new(Tensor::<2>::zeros([0, 3], &device), 2).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err}");
    for k in [0, 5] {
        let err = KnnScorer::new(bank.clone(), k).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { ref what, .. } if what == "k"),
            "{err}"
        );
    }
    let knn = KnnScorer::new(bank.clone(), 2).unwrap();
    let err = knn.score(Tensor::<2>::ones([2, 4], &device)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidShape { ref found, .. } if found == &[2, 4]),
        "{err}"
    );

    let mut values = vec![0.5f32; 12];
    values[7] = f32::NAN;
    let err = KnnScorer::new(tensor(&values, 4, 3, &device), 2).unwrap_err();
    assert!(err.to_string().contains("row 2, column 1"), "{err}");
    let err = knn.score(tensor(&values, 4, 3, &device)).unwrap_err();
    assert!(err.to_string().contains("queries"), "{err}");
    values[7] = f32::INFINITY;
    let err = HostKnnScorer::from_slice(&values, 4, 2).unwrap_err();
    assert!(err.to_string().contains("row 2, column 1"), "{err}");
    assert!(HostKnnScorer::from_slice(&values[..11], 4, 2).is_err());
    let err = KnnScorer::compressed(bank, 5, 2).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, .. } if what == "clusters"),
        "{err}"
    );
}

/// Per query, its k nearest as (distance, bank index).
type Lists = Vec<Vec<(f32, usize)>>;

/// A case of `huge_features_are_measured_exactly_on_every_engine`: (bank, N, queries, Q, k,
/// the expected lists).
type HugeCase<'a> = (&'a [f32], usize, &'a [f32], usize, usize, Lists);

/// The k nearest of each query on every engine: `KnnScorer` on every backend, on its CPU engine
/// (CPU devices) and on its tensor operations, and `HostKnnScorer`, as (distance, index) lists.
fn every_engine(
    bank: &[f32],
    n: usize,
    queries: &[f32],
    q: usize,
    k: usize,
) -> Vec<(String, Result<Lists, Error>)> {
    let d = bank.len() / n;
    let lists = |dist: Vec<f32>, idx: Vec<usize>| {
        dist.chunks(k)
            .zip(idx.chunks(k))
            .map(|(dd, ii)| dd.iter().copied().zip(ii.iter().copied()).collect())
            .collect::<Lists>()
    };
    let mut found = Vec::new();
    for selected in backends() {
        let device = selected.device();
        for tensor_ops in [false, true] {
            let bank = tensor(bank, n, d, device);
            let knn = if tensor_ops {
                KnnScorer::with_tensor_ops(bank, k, 1 << 20)
            } else {
                KnnScorer::new(bank, k)
            }
            .unwrap();
            let result = knn
                .neighbours(tensor(queries, q, d, device))
                .map(|(dist, idx)| {
                    let idx = idx
                        .into_data()
                        .convert::<i64>()
                        .iter::<i64>()
                        .map(|v| v as usize)
                        .collect();
                    lists(msad::host::vec_from_tensor(dist).unwrap(), idx)
                });
            found.push((format!("{selected} (tensor ops: {tensor_ops})"), result));
        }
    }
    let host = HostKnnScorer::from_slice(bank, n, k).unwrap();
    let queries = Array2::from_shape_vec((q, d), queries.to_vec()).unwrap();
    let result = host.neighbours(queries.view()).map(|(dist, idx)| {
        lists(
            dist.iter().copied().collect(),
            idx.iter().copied().collect(),
        )
    });
    found.push(("host".into(), result));
    found
}

/// Features so large that their squared norms overflow f32 (1e20² = 1e40): the estimate
/// ‖q‖² + ‖b‖² − 2 q·b would be ∞ − ∞, and clamped to 0 it made the lowest index win. Such
/// rows (squared norm above 2¹²⁴) are measured exactly, as Σ (q − b)², on every engine; a
/// distance beyond f32's range is `inf` (f32::MAX on a device that saturates).
#[test]
fn huge_features_are_measured_exactly_on_every_engine() {
    let mixed_bank = [0.0f32, 0.0, 1.0, 0.0, 1e20, 0.0, 1e20, 1.0];
    let mixed_queries = [0.25f32, 0.0, 1e20, 0.75, 0.75, 0.0];
    let mixed_expected = vec![
        vec![(0.0625, 0), (0.5625, 1)],
        vec![(0.0625, 3), (0.5625, 2)],
        vec![(0.0625, 1), (0.5625, 0)],
    ];
    // The same queries seven times over (21 ≥ the screen's 6 per thread): normal and huge
    // queries interleaved in one search.
    let many_queries: Vec<f32> = mixed_queries.repeat(7);
    let many_expected: Lists = (0..7).flat_map(|_| mixed_expected.clone()).collect();
    let cases: Vec<HugeCase> = vec![
        // The review's case: row 1 is the query itself.
        (
            &[1e20, 0.0, 1e20, 1.0],
            2,
            &[1e20, 1.0],
            1,
            1,
            vec![vec![(0.0, 1)]],
        ),
        (
            &[1e20, 0.0, 1e20, 1.0],
            2,
            &[1e20, 1.0],
            1,
            2,
            vec![vec![(0.0, 1), (1.0, 0)]],
        ),
        // Huge and ordinary rows in one bank, huge and ordinary queries.
        (&mixed_bank, 4, &mixed_queries, 3, 2, mixed_expected),
        (&mixed_bank, 4, &many_queries, 21, 2, many_expected),
        // An ordinary query whose only neighbour is huge: beyond f32's range (`inf`, or
        // f32::MAX where the device saturates, as lavapipe does).
        (
            &[1e20, 0.0],
            1,
            &[0.0, 0.0],
            1,
            1,
            vec![vec![(f32::MAX, 0)]],
        ),
    ];
    // One thread: the 21 queries also take the CPU search's path for many queries per thread
    // (one product on all threads, with OpenBLAS).
    let host = HostKnnScorer::from_slice(&mixed_bank, 4, 2).unwrap();
    let queries = Array2::from_shape_vec((21, 2), many_queries.clone()).unwrap();
    let (dist, idx) = rayon::ThreadPoolBuilder::new()
        .num_threads(1)
        .build()
        .unwrap()
        .install(|| host.neighbours(queries.view()))
        .unwrap();
    let found: Lists = dist
        .rows()
        .into_iter()
        .zip(idx.rows())
        .map(|(dd, ii)| dd.iter().copied().zip(ii.iter().copied()).collect())
        .collect();
    assert_eq!(found, cases[3].5, "host, one thread");
    for (c, (bank, n, queries, q, k, expected)) in cases.into_iter().enumerate() {
        for (engine, found) in every_engine(bank, n, queries, q, k) {
            let found: Lists = found
                .unwrap()
                .into_iter()
                .map(|row| row.into_iter().map(|(d, i)| (d.min(f32::MAX), i)).collect())
                .collect();
            assert_eq!(found, expected, "case {c} on {engine}");
        }
    }
}

/// A query with a NaN or an infinite value is an error naming its row and column on every
/// engine, never a score (finite or NaN): the features of a broken image, say, are reported.
#[test]
fn non_finite_queries_are_errors_naming_them_on_every_engine() {
    let bank = [0.0f32, 0.0, 1.0, 0.0, 0.0, 1.0];
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let queries = [0.5f32, 0.5, 0.25, bad];
        for (engine, found) in every_engine(&bank, 3, &queries, 2, 2) {
            let err = found.expect_err(&engine);
            assert!(
                matches!(err, Error::InvalidArgument { ref what, .. } if what == "queries"),
                "{bad} on {engine}: {err}"
            );
            assert!(
                err.to_string().contains("row 1, column 1"),
                "{bad} on {engine}: {err}"
            );
        }
    }
}
