//! The encoder: torchvision parity on every backend, checkpoint loading and its errors, freezing.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{GradientsParams, SgdConfig};
use burn::tensor::{Device, Tensor};
use msad::Error;
use msad::encoder::weights::{Checkpoint, CheckpointFormat};
use msad::encoder::{Arch, BlockKind, FreezePolicy, InferenceEncoder, ResNet, ResNetConfig, Stage};

use common::{backends, fixture, max_abs_diff};

const NETS: [&str; 3] = ["narrow18", "narrow50", "narrow152"];

fn input(device: &Device) -> Tensor<4> {
    let x = msad::npy::read_f32(fixture("encoder", "input.npy")).unwrap();
    msad::host::tensor_from_array::<4>(x, device).unwrap()
}

fn expected(name: &str) -> Vec<f32> {
    let a = msad::npy::read_f32(fixture("encoder", &format!("{name}.npy"))).unwrap();
    a.iter().copied().collect()
}

fn check_parity(model: &ResNet, net: &str, device: &msad::device::SelectedDevice, what: &str) {
    let features = msad::host::vec_from_tensor(model.forward(input(device.device()))).unwrap();
    let embed = msad::host::vec_from_tensor(model.embed(input(device.device()))).unwrap();
    let df = max_abs_diff(&features, &expected(&format!("{net}_features")));
    let de = max_abs_diff(&embed, &expected(&format!("{net}_embed")));
    assert!(
        df <= 1e-4,
        "{what} on {device}: forward differs from torchvision by {df}"
    );
    assert!(
        de <= 1e-4,
        "{what} on {device}: embed differs from torchvision by {de}"
    );
    // The same through an encoder prepared once for many calls.
    let prepared = InferenceEncoder::new(model, device.device());
    assert_eq!(
        prepared.uses_host_engine(),
        device.backend() != msad::device::Backend::Wgpu,
        "{device}"
    );
    for _ in 0..2 {
        let out = prepared.try_forward(input(device.device())).unwrap();
        let df = max_abs_diff(
            &msad::host::vec_from_tensor(out).unwrap(),
            &expected(&format!("{net}_features")),
        );
        assert!(
            df <= 1e-4,
            "{what} on {device}: prepared forward off by {df}"
        );
        let out = prepared.try_embed(input(device.device())).unwrap();
        let de = max_abs_diff(
            &msad::host::vec_from_tensor(out).unwrap(),
            &expected(&format!("{net}_embed")),
        );
        assert!(de <= 1e-4, "{what} on {device}: prepared embed off by {de}");
    }
}

#[test]
fn matches_torchvision_on_every_backend() {
    for device in backends() {
        for net in NETS {
            let path = fixture("encoder", &format!("{net}.pth"));
            let model = ResNet::from_torchvision(&path, device.device()).unwrap();
            check_parity(&model, net, &device, &format!("{net}.pth"));
        }
    }
}

#[test]
fn the_cpu_engine_equals_the_tensor_path() {
    // On CPU devices `forward` runs the CPU engine (folded BatchNorm, im2col + sgemm);
    // `forward_tensor_ops` the backend's own operations. Odd sizes, several images, every
    // block design, strides and downsampling included; 112 × 100 images give 28 × 25 maps,
    // where F(4×4, 3×3) runs; one 200 × 196 image gives 7 × 7 maps in layer4, where the
    // forward runs F(2×2, 3×3) on groups of channels.
    let cpu = backends()
        .into_iter()
        .filter(|d| d.backend() != msad::device::Backend::Wgpu);
    for device in cpu {
        let device = device.device();
        for net in NETS {
            let model = ResNet::from_torchvision(fixture("encoder", &format!("{net}.pth")), device)
                .unwrap();
            for [b, h, w] in [
                [3, 37, 29],
                [1, 1, 1],
                [2, 64, 64],
                [1, 112, 100],
                [1, 200, 196],
            ] {
                let values = common::splitmix_uniform((b * h * w) as u64, b * 3 * h * w);
                let values: Vec<f32> = values.iter().map(|v| *v as f32 * 2.0).collect();
                let x = Tensor::<4>::from_data(
                    burn::tensor::TensorData::new(values, [b, 3, h, w]),
                    device,
                );
                let fast = msad::host::vec_from_tensor(model.forward(x.clone())).unwrap();
                let plain = msad::host::vec_from_tensor(model.forward_tensor_ops(x)).unwrap();
                let scale = plain.iter().fold(1f32, |m, v| m.max(v.abs()));
                let diff = max_abs_diff(&fast, &plain);
                assert!(
                    diff <= 1e-5 * scale,
                    "{net} {b}x{h}x{w} on {device:?}: {diff}"
                );
            }
        }
    }
}

#[test]
fn safetensors_and_legacy_pickles_load_the_same_weights() {
    let device = &backends()[0];
    for file in ["narrow18.safetensors", "narrow18_legacy.pth"] {
        let model = ResNet::from_torchvision(fixture("encoder", file), device.device()).unwrap();
        check_parity(&model, "narrow18", device, file);
    }
    let formats: Vec<CheckpointFormat> = [
        "narrow18.pth",
        "narrow18_legacy.pth",
        "narrow18.safetensors",
    ]
    .iter()
    .map(|f| Checkpoint::open(fixture("encoder", f)).unwrap().format())
    .collect();
    assert_eq!(
        formats,
        [
            CheckpointFormat::Pytorch,
            CheckpointFormat::Pytorch,
            CheckpointFormat::Safetensors
        ]
    );
}

#[test]
fn embeddings_are_unit_rows() {
    let device = &backends()[0];
    let model =
        ResNet::from_torchvision(fixture("encoder", "narrow50.pth"), device.device()).unwrap();
    let phi = model.embed(input(device.device()));
    let norms = msad::host::vec_from_tensor(phi.square().sum_dim(1)).unwrap();
    for n in norms {
        assert!((n - 1.0).abs() < 1e-5, "squared norm {n}");
    }
}

#[test]
fn architecture_is_inferred_from_keys() {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("encoder", "meta.json")).unwrap())
            .unwrap();
    for net in NETS {
        let m = &meta["nets"][net];
        let block = match m["block"].as_str().unwrap() {
            "BasicBlock" => BlockKind::Basic,
            _ => BlockKind::Bottleneck,
        };
        let ints = |v: &serde_json::Value| -> [usize; 4] {
            let v: Vec<usize> = v
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_u64().unwrap() as usize)
                .collect();
            v.try_into().unwrap()
        };
        let want = ResNetConfig::new(block, ints(&m["layers"]))
            .with_stem_width(m["stem_width"].as_u64().unwrap() as usize)
            .with_widths(ints(&m["widths"]));
        let got = Checkpoint::open(fixture("encoder", &format!("{net}.pth")))
            .unwrap()
            .infer_config()
            .unwrap();
        assert_eq!(got, want, "{net}");
        assert_eq!(
            got.feature_dim(),
            m["feature_dim"].as_u64().unwrap() as usize
        );
        assert_eq!(got.arch(), None, "narrow nets are no torchvision preset");
    }
}

fn torchvision_layouts() -> BTreeMap<String, BTreeMap<String, Vec<usize>>> {
    serde_json::from_str(
        &std::fs::read_to_string(fixture("encoder", "torchvision_layouts.json")).unwrap(),
    )
    .unwrap()
}

#[test]
fn layouts_are_torchvisions_exactly() {
    for (name, shapes) in torchvision_layouts() {
        let arch: Arch = name.parse().unwrap();
        let want: BTreeMap<String, Vec<usize>> = shapes
            .iter()
            .filter(|(k, _)| !k.starts_with("fc.") && !k.ends_with("num_batches_tracked"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let ours: BTreeMap<String, Vec<usize>> = ResNetConfig::from_arch(arch)
            .torchvision_keys()
            .into_iter()
            .collect();
        assert_eq!(ours, want, "{arch}");
        let inferred = ResNetConfig::from_torchvision_shapes(&shapes).unwrap();
        assert_eq!(inferred.arch(), Some(arch));
    }
}

#[test]
fn module_parameters_cover_the_torchvision_keys() {
    // Every key the loader checks is a parameter or buffer of the module, and nothing more.
    let config = ResNetConfig::from_arch(Arch::Resnet50)
        .with_stem_width(4)
        .with_widths([2, 2, 2, 2]);
    let model = config.init(&Device::flex());
    // num_params counts BatchNorm's running statistics too.
    let ours: usize = model.num_params();
    let keys: usize = config
        .torchvision_keys()
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    assert_eq!(ours, keys);
}

fn expect_err(file: &str) -> Error {
    let device = Device::flex();
    ResNet::from_torchvision(fixture("encoder", file), &device).unwrap_err()
}

#[test]
fn a_missing_key_is_named_with_its_shape() {
    match expect_err("narrow18_missing_key.safetensors") {
        Error::MissingKey {
            key,
            expected,
            path,
        } => {
            assert_eq!(key, "layer2.0.downsample.1.running_var");
            assert_eq!(expected, [8]);
            assert!(path.ends_with("narrow18_missing_key.safetensors"));
        }
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn a_shape_mismatch_names_the_key_and_both_shapes() {
    let err = expect_err("narrow18_wrong_shape.safetensors");
    match &err {
        Error::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "layer1.1.conv2.weight");
            assert_eq!(expected, &[4, 4, 3, 3]);
            assert_eq!(found, &[4, 4, 1, 1]);
        }
        other => panic!("unexpected {other}"),
    }
    let msg = err.to_string();
    assert!(
        msg.contains("[4, 4, 3, 3]") && msg.contains("[4, 4, 1, 1]"),
        "{msg}"
    );
}

#[test]
fn an_unexpected_key_is_an_error_but_fc_is_ignored() {
    match expect_err("narrow18_extra_key.safetensors") {
        Error::UnexpectedKey { key, found, .. } => {
            assert_eq!(key, "layer2.1.conv1.bias");
            assert_eq!(found, [8]);
        }
        other => panic!("unexpected {other}"),
    }
    // The fixtures carry `fc.weight` / `fc.bias` and `num_batches_tracked`: they load.
    let shapes = Checkpoint::open(fixture("encoder", "narrow18.pth")).unwrap();
    assert!(shapes.shapes().contains_key("fc.weight"));
    assert!(shapes.shapes().contains_key("bn1.num_batches_tracked"));
}

#[test]
fn a_given_architecture_that_does_not_fit_is_a_shape_mismatch() {
    let err = ResNetConfig::from_arch(Arch::Resnet18)
        .init_from_torchvision(fixture("encoder", "narrow18.pth"), &Device::flex())
        .unwrap_err();
    match err {
        Error::ShapeMismatch {
            key,
            expected,
            found,
            ..
        } => {
            assert_eq!(key, "bn1.bias");
            assert_eq!((expected, found), (vec![64], vec![8]));
        }
        other => panic!("unexpected {other}"),
    }
    let err = ResNetConfig::from_arch(Arch::Resnet50)
        .init_from_torchvision(fixture("encoder", "narrow18.pth"), &Device::flex())
        .unwrap_err();
    assert!(
        matches!(err, Error::ShapeMismatch { .. } | Error::MissingKey { .. }),
        "{err}"
    );
}

#[test]
fn half_precision_checkpoints_are_refused_by_name() {
    match expect_err("narrow18_f16.safetensors") {
        Error::Checkpoint { reason, .. } => assert!(reason.contains("F16"), "{reason}"),
        other => panic!("unexpected {other}"),
    }
}

#[test]
fn truncated_and_foreign_files_are_errors_not_panics() {
    let dir = tempfile::tempdir().unwrap();
    let mut cases: Vec<(String, Vec<u8>)> = Vec::new();
    for file in [
        "narrow18.pth",
        "narrow18_legacy.pth",
        "narrow18.safetensors",
    ] {
        let bytes = std::fs::read(fixture("encoder", file)).unwrap();
        for cut in [bytes.len() / 2, bytes.len() - 100, 12] {
            cases.push((format!("{file}.cut{cut}"), bytes[..cut].to_vec()));
        }
    }
    cases.push(("empty.pth".into(), Vec::new()));
    cases.push(("text.pth".into(), b"this is not a checkpoint".to_vec()));
    cases.push((
        "input.npy".into(),
        std::fs::read(fixture("encoder", "input.npy")).unwrap(),
    ));
    for (name, bytes) in cases {
        let path = dir.path().join(&name);
        std::fs::write(&path, &bytes).unwrap();
        let err = ResNet::from_torchvision(&path, &Device::flex())
            .err()
            .unwrap_or_else(|| panic!("{name} loaded"));
        assert!(
            matches!(
                err,
                Error::Checkpoint { .. } | Error::UnknownArchitecture { .. }
            ),
            "{name}: {err}"
        );
        assert!(err.to_string().contains(&name), "{name}: {err}");
    }
    let missing = dir.path().join("nope.pth");
    assert!(matches!(
        ResNet::from_torchvision(&missing, &Device::flex()).unwrap_err(),
        Error::Io { .. }
    ));
}

#[test]
fn images_without_three_channels_are_rejected() {
    let model = ResNetConfig::from_arch(Arch::Resnet18)
        .with_stem_width(4)
        .with_widths([4, 4, 4, 4])
        .init(&Device::flex());
    let err = model
        .try_embed(Tensor::<4>::zeros([2, 1, 32, 32], &Device::flex()))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidShape { ref found, .. } if found == &[2, 1, 32, 32]));
    let prepared = InferenceEncoder::new(&model, &Device::flex());
    for dims in [[2, 1, 32, 32], [0, 3, 32, 32], [1, 3, 0, 8]] {
        let err = prepared
            .try_embed(Tensor::<4>::zeros(dims, &Device::flex()))
            .unwrap_err();
        assert!(matches!(err, Error::InvalidShape { ref found, .. } if found == &dims));
    }
}

#[test]
fn frozen_stages_get_no_gradient_and_stay_bit_identical() {
    for selected in backends() {
        let device = selected.device().clone().autodiff();
        let policy = FreezePolicy::through(Stage::Layer2);
        let model = ResNet::from_torchvision(fixture("encoder", "narrow18.pth"), &device).unwrap();
        let model = policy.apply(model);
        let before = common::params(&model);
        assert!(before.iter().any(|(p, ..)| policy.is_frozen(p)));
        assert!(before.iter().any(|(p, ..)| !policy.is_frozen(p)));

        let phi = model.embed(input(&device));
        // A loss whose gradient reaches every parameter: pull the embeddings towards one
        // direction.
        let target = Tensor::<2>::ones(phi.dims(), &device);
        let loss = (phi - target).square().sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        let is_buffer = |p: &str| p.ends_with("running_mean") || p.ends_with("running_var");
        for (path, id, rank, _) in &before {
            let has = match rank {
                1 => grads.get::<1>(*id).is_some(),
                4 => grads.get::<4>(*id).is_some(),
                other => panic!("unexpected rank {other} at {path}"),
            };
            // BatchNorm's running statistics are buffers: never a gradient.
            let trains = !policy.is_frozen(path) && !is_buffer(path);
            assert_eq!(has, trains, "{path} on {selected}");
        }

        let mut optim = SgdConfig::new()
            .with_weight_decay(Some(WeightDecayConfig::new(5e-5)))
            .init();
        let model = optim.step(0.5, model, grads);
        let after = common::params(&model);
        let mut changed = 0;
        for ((path, _, _, old), (path2, _, _, new)) in before.iter().zip(&after) {
            assert_eq!(path, path2);
            if policy.is_frozen(path) || is_buffer(path) {
                let same = old.iter().zip(new).all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "frozen {path} changed on {selected}");
            } else if old != new {
                changed += 1;
            }
        }
        assert!(changed > 0, "no trainable parameter moved on {selected}");
    }
}

#[test]
fn reference_freeze_policy_is_resnet152_through_layer2() {
    assert_eq!(
        FreezePolicy::reference(Arch::Resnet152).frozen_stages(),
        [Stage::Stem, Stage::Layer1, Stage::Layer2]
    );
    for arch in [
        Arch::Resnet18,
        Arch::Resnet34,
        Arch::Resnet50,
        Arch::Resnet101,
    ] {
        assert!(FreezePolicy::reference(arch).frozen_stages().is_empty());
    }
}

/// Images of 4 × 3 × `h` × `w`: image 0 clean, image 1 with a NaN in its green plane, image 2
/// with +inf in red, image 3 with −inf in blue.
fn non_finite_images(h: usize, w: usize, device: &Device) -> Tensor<4> {
    let plane = h * w;
    let mut values: Vec<f32> = common::splitmix_uniform(plane as u64, 4 * 3 * plane)
        .iter()
        .map(|v| *v as f32 * 2.0)
        .collect();
    let at = (h / 2) * w + w / 3;
    values[3 * plane + plane + at] = f32::NAN;
    values[2 * 3 * plane + at] = f32::INFINITY;
    values[3 * 3 * plane + 2 * plane + at] = f32::NEG_INFINITY;
    Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [4, 3, h, w]), device)
}

/// NaN and infinities propagate through the CPU engine as through PyTorch's ResNet and flex's
/// tensor path (the specification on CPU devices): burn's relu and max-pool keep NaN on flex,
/// and so does the CPU engine now (its ReLU mapped NaN to 0). Images with a NaN, a +inf or a
/// −inf pixel beside a clean one give NaN features at the same positions as flex's tensor
/// path, through `forward` (the CPU engine) and an `InferenceEncoder`, on flex and on ndarray,
/// at sizes where the convs run on im2col, on F(2×2, 3×3), and where F(4×4, 3×3) would
/// (28 × 25 maps: it declines maps holding NaN or infinities, which would spread over its
/// tiles, and F(2×2, 3×3) takes them); the other features agree.
///
/// Two tensor paths differ from PyTorch here, and are only checked on the clean image (which
/// the others in its batch must not disturb): ndarray's max-pool skips NaN (`val > max`), and
/// wgpu's drops it too on lavapipe (a GPU `max` returns the operand that is not NaN), so that
/// there a NaN pixel can vanish from the features.
#[test]
fn non_finite_pixels_give_nan_features_as_the_tensor_path() {
    let flex = Device::flex();
    for net in ["narrow18", "narrow50"] {
        let checkpoint = fixture("encoder", &format!("{net}.pth"));
        let reference_model = ResNet::from_torchvision(&checkpoint, &flex).unwrap();
        for [h, w] in [[37, 29], [64, 64], [9, 9], [112, 100], [200, 196]] {
            let reference = msad::host::vec_from_tensor(
                reference_model.forward_tensor_ops(non_finite_images(h, w, &flex)),
            )
            .unwrap();
            let d = reference_model.feature_dim();
            let what = format!("{net} {h}x{w}");
            assert!(
                reference[..d].iter().all(|v| v.is_finite()),
                "{what}: the clean image"
            );
            assert!(
                reference[d..2 * d].iter().all(|v| v.is_nan()),
                "{what}: the NaN image"
            );
            let nan = |v: &[f32]| v.iter().map(|x| x.is_nan()).collect::<Vec<bool>>();
            let scale = reference
                .iter()
                .filter(|v| v.is_finite())
                .fold(1f32, |m, v| m.max(v.abs()));
            for selected in backends() {
                let device = selected.device();
                let model = ResNet::from_torchvision(&checkpoint, device).unwrap();
                let prepared = InferenceEncoder::new(&model, device);
                let x = non_finite_images(h, w, device);
                let paths = [
                    ("forward", model.forward(x.clone())),
                    ("InferenceEncoder", prepared.try_forward(x.clone()).unwrap()),
                    ("forward_tensor_ops", model.forward_tensor_ops(x)),
                ];
                for (path, found) in paths {
                    let found = msad::host::vec_from_tensor(found).unwrap();
                    let what = format!("{what} on {selected}: {path}");
                    let follows_pytorch = match selected.backend() {
                        msad::device::Backend::Flex => true,
                        // The CPU engine.
                        msad::device::Backend::NdArray => path != "forward_tensor_ops",
                        _ => false,
                    };
                    let checked = if follows_pytorch {
                        assert_eq!(nan(&found), nan(&reference), "{what}: NaN positions");
                        found.len()
                    } else {
                        d
                    };
                    for (i, (a, b)) in found[..checked].iter().zip(&reference).enumerate() {
                        if !b.is_nan() {
                            assert!(
                                a == b || (a - b).abs() <= 1e-4 * scale,
                                "{what}: feature {i}: {a} vs {b}"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The narrow18 safetensors fixture with one value of `key` replaced, in a temporary file.
fn patched_checkpoint(dir: &std::path::Path, key: &str, index: usize, value: f32) -> PathBuf {
    let path = dir.join(format!("{key}.{index}.safetensors"));
    common::patch_safetensors(
        &fixture("encoder", "narrow18.safetensors"),
        &path,
        key,
        index,
        value,
    );
    path
}

/// A NaN or infinite weight ([`Error::NonFinite`]), or a negative BatchNorm running variance
/// ([`Error::Checkpoint`]), is refused when the checkpoint is loaded, naming the file, the key,
/// the value and its index, whichever way it is loaded.
#[test]
fn non_finite_weights_and_negative_variances_are_refused_by_key() {
    let dir = tempfile::tempdir().unwrap();
    let device = Device::flex();
    let config = Checkpoint::open(fixture("encoder", "narrow18.safetensors"))
        .unwrap()
        .infer_config()
        .unwrap();
    for (key, index, value, words) in [
        (
            "layer1.0.bn1.running_var",
            3,
            -0.5,
            "tensor `layer1.0.bn1.running_var` has a negative value (-0.5) at index 3",
        ),
        (
            "layer2.0.conv1.weight",
            5,
            f32::NAN,
            "tensor `layer2.0.conv1.weight` is not finite: value 5 (row-major) is NaN",
        ),
        (
            "bn1.weight",
            0,
            f32::INFINITY,
            "tensor `bn1.weight` is not finite: value 0 (row-major) is inf",
        ),
        (
            "layer2.0.downsample.1.running_mean",
            7,
            f32::NEG_INFINITY,
            "tensor `layer2.0.downsample.1.running_mean` is not finite: value 7 (row-major) is -inf",
        ),
        (
            "layer2.0.downsample.0.weight",
            1,
            f32::NAN,
            "tensor `layer2.0.downsample.0.weight` is not finite: value 1 (row-major) is NaN",
        ),
        (
            "layer4.1.bn2.running_var",
            0,
            f32::NAN,
            "tensor `layer4.1.bn2.running_var` is not finite: value 0 (row-major) is NaN",
        ),
    ] {
        let path = patched_checkpoint(dir.path(), key, index, value);
        let mut errors = vec![
            config.init_from_torchvision(&path, &device).unwrap_err(),
            Checkpoint::open(&path)
                .unwrap()
                .load(&config, &device)
                .unwrap_err(),
        ];
        // The check runs on the device the weights are loaded onto.
        errors.extend(
            backends()
                .iter()
                .map(|selected| ResNet::from_torchvision(&path, selected.device()).unwrap_err()),
        );
        for err in errors {
            let message = err.to_string();
            assert!(
                message.contains(words) && message.contains(&*path.to_string_lossy()),
                "{message}"
            );
            match (&err, value.is_finite()) {
                (Error::Checkpoint { path: p, .. }, true) => assert_eq!(p, &path),
                (Error::NonFinite { .. }, false) => {}
                (other, _) => panic!("{key}: unexpected {other:?}"),
            }
        }
    }
    // A running variance of exactly 0 is a valid one.
    let path = patched_checkpoint(dir.path(), "layer1.0.bn1.running_var", 3, 0.0);
    ResNet::from_torchvision(&path, &device).unwrap();
}

/// Writes a safetensors file of zero-filled tensors (`F32`, or `I64` for
/// `num_batches_tracked`) with these keys and shapes.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (key, shape) in tensors {
        let (dtype, size) = if key.ends_with("num_batches_tracked") {
            ("I64", 8)
        } else {
            ("F32", 4)
        };
        let len = size * shape.iter().product::<usize>();
        header.insert(
            key.to_string(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len]}),
        );
        offset += len;
    }
    let header = serde_json::to_vec(&header).unwrap();
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header);
    bytes.resize(bytes.len() + offset, 0);
    std::fs::write(path, bytes).unwrap();
}

/// Layouts of absurd size read from files: refused before anything loops or allocates per
/// block. Run in a child process limited to 1 GiB of address space and 60 s, so that an
/// allocation without bound (an abort) or a loop over 10⁹ blocks fails the test.
#[test]
fn oversized_layouts_are_refused_in_bounded_time_and_memory() {
    let run = common::run_test_in_child("oversized_layouts_child", 1024);
    assert!(run.passed, "{}\n{}", run.stdout, run.stderr);
}

/// The body of `oversized_layouts_are_refused_in_bounded_time_and_memory`, in its child
/// process (it does nothing elsewhere).
#[test]
#[ignore = "run by oversized_layouts_are_refused_in_bounded_time_and_memory"]
fn oversized_layouts_child() {
    if !common::in_child() {
        return;
    }
    let device = Device::flex();
    // A layout as a manifest would hold it, with 10⁸ blocks in layer1.
    let config: ResNetConfig = serde_json::from_str(
        r#"{"block":"Basic","layers":[100000000,2,2,2],"stem_width":64,"widths":[64,128,256,512]}"#,
    )
    .unwrap();
    for err in [
        config.validate().unwrap_err(),
        config.try_init(&device).unwrap_err(),
        Checkpoint::open(fixture("encoder", "narrow18.safetensors"))
            .unwrap()
            .check(&config)
            .unwrap_err(),
    ] {
        assert!(err.to_string().contains("blocks per stage"), "{err}");
    }
    let wide: ResNetConfig = serde_json::from_str(
        r#"{"block":"Bottleneck","layers":[3,4,6,3],"stem_width":64,"widths":[64,128,256,4611686018427387904]}"#,
    )
    .unwrap();
    assert!(wide.try_init(&device).is_err());
    // A checkpoint whose one key names block 10⁹ of layer1.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("deep.safetensors");
    let mut tensors = vec![("conv1.weight", vec![8, 3, 7, 7])];
    let firsts: Vec<String> = (1..=4)
        .map(|s| format!("layer{s}.0.conv1.weight"))
        .collect();
    tensors.extend(firsts.iter().map(|k| (k.as_str(), vec![8, 8, 3, 3])));
    tensors.push(("layer1.1000000000.bn1.num_batches_tracked", vec![]));
    write_safetensors(&path, &tensors);
    let err = ResNet::from_torchvision(&path, &device).unwrap_err();
    match &err {
        Error::UnknownArchitecture { reason, .. } => assert!(
            reason.contains("`layer1.1000000000.bn1.num_batches_tracked`"),
            "{err}"
        ),
        other => panic!("unexpected {other}"),
    }
}
