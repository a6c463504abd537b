//! The fine-tuning loop: reproducibility, the observer, freezing, BatchNorm statistics, errors.

mod common;

use burn::module::Module;
use burn::tensor::Device;
use image::RgbImage;
use msad::data::{Digits, OneClassSplit};
use msad::encoder::{FreezePolicy, ResNet, Stage};
use msad::train::{Control, EpochReport, Evaluation, MscTrainer, MscTrainerConfig, TrainEvent};

use common::fixture;

fn encoder(device: &Device) -> ResNet {
    ResNet::from_torchvision(fixture("encoder", "narrow18.pth"), device).unwrap()
}

fn split() -> OneClassSplit {
    Digits::load().one_class(8).unwrap()
}

fn config() -> MscTrainerConfig {
    MscTrainerConfig::new()
        .with_epochs(2)
        .with_batch_size(16)
        .with_lr(1e-3)
        .with_seed(5)
        .with_image_size(16)
}

/// Float tensors by path.
type Weights = Vec<(String, Vec<f32>)>;

/// Every float tensor of the module (parameters and BatchNorm statistics) by path.
fn values(model: &ResNet) -> Weights {
    common::params(model)
        .into_iter()
        .map(|(path, _, _, v)| (path, v))
        .collect()
}

fn run(config: MscTrainerConfig, device: &Device) -> (Vec<EpochReport>, Weights, usize) {
    let split = split();
    let trainer = MscTrainer::new(config).unwrap();
    let test = Evaluation {
        images: split.test.as_ref(),
        anomalous: &split.test_anomalous,
    };
    let mut steps = 0;
    let outcome = trainer
        .fit(
            encoder(device),
            split.train.as_ref(),
            Some(test),
            device,
            |e| {
                if matches!(e, TrainEvent::Step(_)) {
                    steps += 1;
                }
                Control::Continue
            },
        )
        .unwrap();
    assert!(!outcome.stopped);
    assert!(!outcome.encoder.devices().iter().any(|d| d.is_autodiff()));
    (outcome.history, values(&outcome.encoder), steps)
}

#[test]
fn training_is_reproducible_for_a_seed_and_reports_every_epoch() {
    let device = Device::flex();
    let (history, weights, steps) = run(config(), &device);
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].mean_loss, None);
    for (i, report) in history.iter().enumerate() {
        assert_eq!(report.epoch, i);
        let auroc = report.auroc.unwrap();
        assert!((0.0..=1.0).contains(&auroc));
        if i > 0 {
            assert!(report.mean_loss.unwrap().is_finite());
        }
    }
    // 122 training images in batches of 16: 8 steps per epoch (the last has 10 images).
    assert_eq!(steps, 16);
    let (history2, weights2, _) = run(config(), &device);
    assert_eq!(history, history2, "same seed, same run");
    assert_eq!(weights, weights2);
    let (history3, _, _) = run(config().with_seed(6), &device);
    assert_ne!(
        history[1].mean_loss, history3[1].mean_loss,
        "another seed, another run"
    );
}

#[test]
fn frozen_stages_and_batchnorm_statistics_do_not_move() {
    let device = Device::flex();
    let before = values(&encoder(&device));
    let policy = FreezePolicy::through(Stage::Layer2);
    let (_, after, _) = run(config().with_epochs(1).with_freeze(Some(policy)), &device);
    let mut moved = 0;
    for ((path, old), (path2, new)) in before.iter().zip(&after) {
        assert_eq!(path, path2);
        let buffer = path.ends_with("running_mean") || path.ends_with("running_var");
        if policy.is_frozen(path) || buffer {
            assert_eq!(old, new, "{path} changed");
        } else if old != new {
            moved += 1;
        }
    }
    assert!(moved > 10, "only {moved} trainable tensors moved");
}

#[test]
fn the_observer_can_stop_the_run() {
    let device = Device::flex();
    let split = split();
    let trainer = MscTrainer::new(config()).unwrap();
    let mut events = Vec::new();
    let outcome = trainer
        .fit(encoder(&device), split.train.as_ref(), None, &device, |e| {
            events.push(e.clone());
            match e {
                TrainEvent::Step(s) if s.step == 3 => Control::Stop,
                _ => Control::Continue,
            }
        })
        .unwrap();
    assert!(outcome.stopped);
    assert_eq!(outcome.history.len(), 1, "no epoch completed");
    assert_eq!(outcome.history[0].auroc, None, "no test set, no ROC-AUC");
    assert_eq!(events.len(), 4, "epoch 0 and three steps");
}

#[test]
fn zero_epochs_is_the_pretrained_baseline() {
    let device = Device::flex();
    let split = split();
    let trainer = MscTrainer::new(config().with_epochs(0)).unwrap();
    let test = Evaluation {
        images: split.test.as_ref(),
        anomalous: &split.test_anomalous,
    };
    let before = values(&encoder(&device));
    let outcome = trainer
        .fit(
            encoder(&device),
            split.train.as_ref(),
            Some(test),
            &device,
            |_| Control::Continue,
        )
        .unwrap();
    assert_eq!(outcome.history.len(), 1);
    assert_eq!(values(&outcome.encoder), before);
    let auroc = trainer
        .evaluate(&encoder(&device), split.train.as_ref(), test, &device)
        .unwrap();
    assert_eq!(outcome.history[0].auroc, Some(auroc));
}

#[test]
fn bad_settings_are_errors() {
    for config in [
        config().with_batch_size(1),
        config().with_lr(0.0),
        config().with_lr(f64::NAN),
        config().with_weight_decay(-1.0),
        config().with_temperature(0.0),
        config().with_k(0),
    ] {
        assert!(matches!(
            MscTrainer::new(config),
            Err(msad::Error::InvalidArgument { .. })
        ));
    }
    let device = Device::flex();
    let split = split();
    let trainer = MscTrainer::new(config()).unwrap();
    let wrong = Evaluation {
        images: split.test.as_ref(),
        anomalous: &split.test_anomalous[..10],
    };
    let err = trainer
        .evaluate(&encoder(&device), split.train.as_ref(), wrong, &device)
        .unwrap_err();
    assert!(err.to_string().contains("labels"), "{err}");
}

/// One epoch on the first `count` training images, no test set: the loss history and weights.
fn short_run(config: MscTrainerConfig, count: usize, device: &Device) -> (Vec<f32>, Weights) {
    let split = split();
    let images: Vec<RgbImage> = (0..count).map(|i| split.train.get(i).unwrap()).collect();
    let trainer = MscTrainer::new(config).unwrap();
    let mut losses = Vec::new();
    let outcome = trainer
        .fit(encoder(device), &images, None, device, |e| {
            if let TrainEvent::Step(s) = e {
                losses.push(s.loss);
            }
            Control::Continue
        })
        .unwrap();
    (losses, values(&outcome.encoder))
}

#[test]
fn every_backend_takes_the_same_steps() {
    // The views are made on the host from the seed, so every backend sees the same batches; the
    // losses and the fine-tuned weights must then agree up to float rounding.
    let config = config()
        .with_epochs(1)
        .with_batch_size(8)
        .with_angular(true);
    let (losses, weights) = short_run(config.clone(), 24, &Device::flex());
    assert_eq!(losses.len(), 3);
    for selected in common::backends() {
        let name = selected.backend();
        let (l, w) = short_run(config.clone(), 24, selected.device());
        assert_eq!(l.len(), losses.len(), "{name}");
        for (x, y) in l.iter().zip(&losses) {
            assert!(
                (x - y).abs() <= 1e-4 * y.abs().max(1.0),
                "{name}: loss {x} vs {y}"
            );
        }
        for ((path, a), (_, b)) in w.iter().zip(&weights) {
            let scale = b.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = common::max_abs_diff(a, b);
            assert!(diff <= 1e-4 * scale, "{name}: {path} differs by {diff}");
        }
    }
}
