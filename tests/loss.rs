//! The mean-shifted contrastive loss: value and gradients against the reference PyTorch formula
//! on every backend, stability, zero rows, and argument checks.

mod common;

use burn::tensor::{Device, Tensor, TensorData};
use msad::Error;
use msad::loss::{ContrastiveLossConfig, MeanShiftedContrastiveLossConfig};

use common::{backends, fixture, loss_case_inputs, rel_max_err};

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    b: usize,
    d: usize,
    seed: u64,
    angular: bool,
    temperature: f64,
    loss: f64,
    center_head: Vec<f32>,
    phi1_head: Vec<f32>,
}

fn cases() -> Vec<Case> {
    serde_json::from_str(&std::fs::read_to_string(fixture("loss", "cases.json")).unwrap()).unwrap()
}

fn tensor2(values: &[f32], b: usize, d: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [b, d]), device)
}

fn read(name: &str) -> Vec<f32> {
    msad::npy::read_f32(fixture("loss", name))
        .unwrap()
        .iter()
        .copied()
        .collect()
}

#[test]
fn value_and_gradients_match_the_reference_on_every_backend() {
    let cases = cases();
    assert_eq!(cases.len(), 18);
    for selected in backends() {
        let device = selected.device().clone().autodiff();
        for case in &cases {
            let (phi1, phi2, center) = loss_case_inputs(case.b, case.d, case.seed, case.angular);
            // The generator is shared with the fixture script: check it agrees.
            assert_eq!(
                &center[..case.center_head.len()],
                &case.center_head[..],
                "{}",
                case.name
            );
            assert_eq!(
                &phi1[..case.phi1_head.len()],
                &case.phi1_head[..],
                "{}",
                case.name
            );

            let loss = MeanShiftedContrastiveLossConfig::new()
                .with_temperature(case.temperature)
                .with_angular(case.angular)
                .try_init()
                .unwrap();
            let x1 = tensor2(&phi1, case.b, case.d, &device).require_grad();
            let x2 = tensor2(&phi2, case.b, case.d, &device).require_grad();
            let c = Tensor::<1>::from_data(TensorData::new(center, [case.d]), &device);
            let value = loss.try_forward(x1.clone(), x2.clone(), c).unwrap();
            let grads = value.backward();
            let v = msad::host::vec_from_tensor(value).unwrap()[0] as f64;
            let rel = ((v - case.loss) / case.loss).abs();
            assert!(
                rel <= 1e-5,
                "{} on {selected}: loss {v} vs {} (rel {rel:e})",
                case.name,
                case.loss
            );
            for (x, file) in [(&x1, "grad1"), (&x2, "grad2")] {
                let g = msad::host::vec_from_tensor(x.grad(&grads).unwrap()).unwrap();
                let err = rel_max_err(&g, &read(&format!("{}_{file}.npy", case.name)));
                assert!(
                    err <= 1e-5,
                    "{} on {selected}: {file} rel err {err:e}",
                    case.name
                );
            }
        }
    }
}

#[test]
fn forward_without_autodiff_gives_the_same_value() {
    let case = &cases()[4];
    let (phi1, phi2, center) = loss_case_inputs(case.b, case.d, case.seed, case.angular);
    for selected in backends() {
        let device = selected.device();
        let loss = MeanShiftedContrastiveLossConfig::new()
            .with_angular(case.angular)
            .try_init()
            .unwrap();
        let value = loss.forward(
            tensor2(&phi1, case.b, case.d, device),
            tensor2(&phi2, case.b, case.d, device),
            Tensor::from_data(TensorData::new(center.clone(), [case.d]), device),
        );
        assert!(!value.is_autodiff());
        let v = msad::host::vec_from_tensor(value).unwrap()[0] as f64;
        assert!(
            ((v - case.loss) / case.loss).abs() <= 1e-5,
            "{v} vs {}",
            case.loss
        );
    }
}

#[test]
fn small_temperatures_with_identical_rows_do_not_overflow() {
    // Identical unit rows: every similarity is 1/τ = 100, and exp(100) overflows f32. With
    // log-sum-exp every row's loss is log(2B − 1).
    let (b, d) = (8, 16);
    for selected in backends() {
        let device = selected.device().clone().autodiff();
        let row: Vec<f32> = (0..d).map(|i| if i == 3 { 1.0 } else { 0.0 }).collect();
        let x: Vec<f32> = row.iter().cycle().take(b * d).copied().collect();
        let x1 = tensor2(&x, b, d, &device).require_grad();
        let x2 = tensor2(&x, b, d, &device).require_grad();
        let loss = ContrastiveLossConfig::new()
            .with_temperature(0.01)
            .try_init()
            .unwrap()
            .try_forward(x1.clone(), x2)
            .unwrap();
        let grads = loss.backward();
        let v = msad::host::vec_from_tensor(loss).unwrap()[0];
        let want = ((2 * b - 1) as f32).ln();
        assert!((v - want).abs() < 1e-4, "{v} vs {want} on {selected}");
        let g = msad::host::vec_from_tensor(x1.grad(&grads).unwrap()).unwrap();
        assert!(
            g.iter().all(|v| v.is_finite()),
            "non-finite gradient on {selected}"
        );
    }
}

#[test]
fn rows_equal_to_the_center_behave_like_f_normalize() {
    // φ = c gives a zero row: F.normalize maps it to 0 (eps 1e-12), so it is similar to
    // nothing; the loss and gradients stay finite.
    let (b, d) = (4, 8);
    for selected in backends() {
        let device = selected.device().clone().autodiff();
        let c: Vec<f32> = (0..d).map(|i| (i as f32 + 1.0) / 10.0).collect();
        let mut phi1: Vec<f32> = (0..b * d)
            .map(|i| ((i * 7 % 11) as f32 - 5.0) / 10.0)
            .collect();
        phi1[..d].copy_from_slice(&c); // row 0 of the first view equals the center
        let phi2: Vec<f32> = (0..b * d)
            .map(|i| ((i * 5 % 13) as f32 - 6.0) / 10.0)
            .collect();
        let x1 = tensor2(&phi1, b, d, &device).require_grad();
        let x2 = tensor2(&phi2, b, d, &device).require_grad();
        let center = Tensor::<1>::from_data(TensorData::new(c, [d]), &device);
        let loss = MeanShiftedContrastiveLossConfig::new()
            .try_init()
            .unwrap()
            .try_forward(x1.clone(), x2.clone(), center)
            .unwrap();
        let grads = loss.backward();
        let v = msad::host::vec_from_tensor(loss).unwrap()[0];
        assert!(v.is_finite(), "loss {v} on {selected}");
        for x in [&x1, &x2] {
            let g = msad::host::vec_from_tensor(x.grad(&grads).unwrap()).unwrap();
            assert!(
                g.iter().all(|v| v.is_finite()),
                "non-finite gradient on {selected}"
            );
        }
    }
}

#[test]
fn the_mean_shift_matters() {
    // With c = 0 the MSC loss is plain NT-Xent on the same rows.
    let case = &cases()[2];
    let (phi1, phi2, _) = loss_case_inputs(case.b, case.d, case.seed, false);
    let device = Device::flex();
    let x1 = tensor2(&phi1, case.b, case.d, &device);
    let x2 = tensor2(&phi2, case.b, case.d, &device);
    let zero = Tensor::<1>::zeros([case.d], &device);
    let msc = MeanShiftedContrastiveLossConfig::new()
        .init()
        .forward(x1.clone(), x2.clone(), zero);
    let plain = ContrastiveLossConfig::new()
        .try_init()
        .unwrap()
        .try_forward(x1, x2)
        .unwrap();
    let (a, b) = (msc.into_scalar::<f32>(), plain.into_scalar::<f32>());
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    assert!(
        (a as f64 - case.loss).abs() > 1e-3,
        "shifting by the center must change the loss"
    );
}

#[test]
fn bad_arguments_are_errors() {
    let device = Device::flex();
    let loss = MeanShiftedContrastiveLossConfig::new().init();
    let x = |b, d| Tensor::<2>::ones([b, d], &device);
    let c = |d| Tensor::<1>::zeros([d], &device);
    let err = loss.try_forward(x(4, 8), x(3, 8), c(8)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidShape { ref found, .. } if found == &[3, 8]),
        "{err}"
    );
    let err = loss.try_forward(x(1, 8), x(1, 8), c(8)).unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err}");
    let err = loss.try_forward(x(4, 8), x(4, 8), c(7)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidShape { ref found, .. } if found == &[7]),
        "{err}"
    );
    // Float types and devices must agree.
    let f64_view = x(4, 8).cast(burn::tensor::DType::F64);
    let err = loss.try_forward(x(4, 8), f64_view, c(8)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, .. } if what == "second view"),
        "{err}"
    );
    let err = loss
        .try_forward(x(4, 8), x(4, 8), c(8).cast(burn::tensor::DType::F64))
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, .. } if what == "center"),
        "{err}"
    );
    #[cfg(feature = "ndarray")]
    {
        #[allow(deprecated)]
        let other = Tensor::<2>::ones([4, 8], &Device::ndarray());
        let err = loss.try_forward(x(4, 8), other, c(8)).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    // An autodiff view with a plain one is fine (only the first is tracked).
    let tracked = x(4, 8).autodiff().require_grad();
    let value = loss.try_forward(tracked.clone(), x(4, 8), c(8)).unwrap();
    assert!(tracked.grad(&value.backward()).is_some());
    let err = ContrastiveLossConfig::new()
        .try_init()
        .unwrap()
        .try_forward(x(4, 8), x(4, 8).cast(burn::tensor::DType::F64))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    for t in [0.0, -0.25, f64::NAN, f64::INFINITY] {
        let err = MeanShiftedContrastiveLossConfig::new()
            .with_temperature(t)
            .try_init()
            .unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{t}: {err}");
    }
}
