//! The Detector: fit, score, threshold, predict, save and load, and the errors of loading.

mod common;

use burn::tensor::Device;
use msad::data::Digits;
use msad::encoder::ResNet;
use msad::train::MscTrainerConfig;
use msad::{Detector, Error};

use common::fixture;

fn config() -> MscTrainerConfig {
    MscTrainerConfig::new()
        .with_epochs(1)
        .with_batch_size(16)
        .with_lr(1e-3)
        .with_image_size(16)
}

fn fitted(device: &Device) -> (Detector, msad::data::OneClassSplit) {
    let split = Digits::load().one_class(0).unwrap();
    let encoder = ResNet::from_torchvision(fixture("encoder", "narrow18.pth"), device).unwrap();
    let detector = Detector::fit(config(), encoder, split.train.as_ref(), device).unwrap();
    (detector, split)
}

#[test]
fn fit_score_save_load_round_trip() {
    let device = Device::flex();
    let (detector, split) = fitted(&device);
    assert_eq!(detector.bank().dims(), [split.train.len(), 32]);
    let scores = detector.score_source(split.test.as_ref()).unwrap();
    assert_eq!(scores.len(), split.test.len());
    let auroc = msad::metrics::roc_auc(&scores, &split.test_anomalous).unwrap();
    assert!(auroc > 0.5, "ROC-AUC {auroc}");

    // In-memory images score as the source does. Up to float rounding: a batch of 20 and the
    // source's batches give the products different shapes, and OpenBLAS (feature `openblas`)
    // may then sum in another order.
    let images: Vec<_> = (0..20).map(|i| split.test.get(i).unwrap()).collect();
    let in_memory = detector.score(&images).unwrap();
    for (i, (a, b)) in in_memory.iter().zip(&scores[..20]).enumerate() {
        // Squared distances between unit vectors: rounding is absolute, on the scale of 1.
        assert!(
            (a - b).abs() <= 1e-5 * b.abs().max(0.1),
            "image {i}: {a} vs {b}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    detector.save(dir.path()).unwrap();
    let loaded = Detector::load(dir.path(), &device).unwrap();
    assert_eq!(loaded.score_source(split.test.as_ref()).unwrap(), scores);
    assert_eq!(loaded.eval_transform(), detector.eval_transform());

    // The training images are in the bank: each one's nearest neighbour is itself.
    let train_scores = detector.score_source(split.train.as_ref()).unwrap();
    let normal: Vec<f32> = scores
        .iter()
        .zip(&split.test_anomalous)
        .filter(|(_, a)| !**a)
        .map(|(s, _)| *s)
        .collect();
    let threshold = Detector::threshold_from_normal_scores(&normal, 0.9).unwrap();
    let flags = detector
        .predict_source(split.test.as_ref(), threshold)
        .unwrap();
    let flagged_normal = flags
        .iter()
        .zip(&split.test_anomalous)
        .filter(|(f, a)| **f && !**a)
        .count();
    assert!(flagged_normal as f64 <= 0.1 * normal.len() as f64 + 1.0);
    assert!(train_scores.iter().all(|s| s.is_finite()));
}

#[test]
fn normal_scores_leave_each_image_out() {
    let device = Device::flex();
    let (detector, split) = fitted(&device);
    let bank = msad::host::vec_from_tensor(detector.bank().clone()).unwrap();
    let d = detector.bank().dims()[1];
    let rows: Vec<&[f32]> = bank.chunks(d).collect();
    let loo = detector.normal_scores().unwrap();
    assert_eq!(loo.len(), split.train.len());
    for (i, row) in rows.iter().enumerate() {
        let mut dist: Vec<f64> = rows
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, other)| {
                row.iter()
                    .zip(*other)
                    .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
                    .sum()
            })
            .collect();
        dist.sort_by(f64::total_cmp);
        let expected = dist[0] + dist[1];
        assert!(
            (loo[i] as f64 - expected).abs() <= 1e-4 * expected.max(1e-3),
            "row {i}: {} vs {expected}",
            loo[i]
        );
    }
    // Scored as queries the training images find themselves: lower than leave-one-out.
    let own = detector.score_source(split.train.as_ref()).unwrap();
    assert!(own.iter().zip(&loo).all(|(a, b)| *a <= *b + 1e-5));
    assert!(own.iter().sum::<f32>() < loo.iter().sum::<f32>());
}

#[test]
fn thresholds_are_quantiles_of_normal_scores() {
    let t = Detector::threshold_from_normal_scores(&[4.0, 1.0, 3.0, 2.0], 0.5).unwrap();
    assert_eq!(t, 2.5);
    assert_eq!(
        Detector::threshold_from_normal_scores(&[7.0], 0.99).unwrap(),
        7.0
    );
    assert_eq!(
        Detector::threshold_from_normal_scores(&[1.0, 9.0], 1.0).unwrap(),
        9.0
    );
    for (scores, q) in [(&[1.0f32][..], 1.5), (&[][..], 0.5), (&[f32::NAN][..], 0.5)] {
        let err = Detector::threshold_from_normal_scores(scores, q).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
}

#[test]
fn loading_anything_else_is_an_error() {
    let device = Device::flex();
    let (detector, _) = fitted(&device);
    let dir = tempfile::tempdir().unwrap();
    let save = |name: &str| {
        let path = dir.path().join(name);
        detector.save(&path).unwrap();
        path
    };
    let manifest = |path: &std::path::Path| path.join("detector.json");
    let edit = |path: &std::path::Path, from: &str, to: &str| {
        let text = std::fs::read_to_string(manifest(path)).unwrap();
        assert!(text.contains(from), "{from} not in the manifest");
        std::fs::write(manifest(path), text.replacen(from, to, 1)).unwrap();
    };

    let other_version = save("version");
    edit(&other_version, "\"version\": 1", "\"version\": 2");
    let err = Detector::load(&other_version, &device).unwrap_err();
    assert!(
        matches!(err, Error::Checkpoint { ref reason, .. } if reason.contains("version")),
        "{err}"
    );

    // Another architecture recorded than the weights hold.
    let other_arch = save("arch");
    edit(&other_arch, "\"stem_width\": 8", "\"stem_width\": 16");
    let err = Detector::load(&other_arch, &device).unwrap_err();
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");

    // A deeper net recorded than the weights hold: tensors missing from the file.
    let deeper = save("deeper");
    let text = std::fs::read_to_string(manifest(&deeper)).unwrap();
    let value: serde_json::Value = serde_json::from_str(&text).unwrap();
    let layers = value["encoder"]["layers"].clone();
    let mut more = layers.clone();
    more[0] = serde_json::json!(more[0].as_u64().unwrap() + 1);
    let mut value = value;
    value["encoder"]["layers"] = more;
    std::fs::write(manifest(&deeper), value.to_string()).unwrap();
    let err = Detector::load(&deeper, &device).unwrap_err();
    assert!(
        matches!(err, Error::Checkpoint { ref reason, .. } if reason.contains("missing")),
        "{err}"
    );

    let short_bank = save("bank");
    let bank = msad::npy::read_f32(short_bank.join("bank.npy")).unwrap();
    let cut = bank.slice(ndarray::s![..5, ..]).to_owned().into_dyn();
    msad::npy::write_f32(short_bank.join("bank.npy"), &cut).unwrap();
    let err = Detector::load(&short_bank, &device).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err}");

    let missing = save("missing");
    std::fs::remove_file(missing.join("encoder.safetensors")).unwrap();
    assert!(Detector::load(&missing, &device).is_err());

    let garbage = save("garbage");
    std::fs::write(manifest(&garbage), "{ not json").unwrap();
    assert!(matches!(
        Detector::load(&garbage, &device),
        Err(Error::Checkpoint { .. })
    ));

    assert!(matches!(
        Detector::load(dir.path().join("nothing-here"), &device),
        Err(Error::Io { .. })
    ));
}
