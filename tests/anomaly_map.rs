//! Anomaly maps: where the anomaly is, equal on every backend, saved with the detector.

mod common;

use burn::tensor::Device;
use image::{Rgb, RgbImage};
use msad::anomaly_map::PatchMapConfig;
use msad::encoder::{Arch, ResNetConfig, Stage};
use msad::train::MscTrainerConfig;
use msad::{Detector, Error};
use tempfile::TempDir;

use common::{backends, max_abs_diff, splitmix_uniform};

const SIDE: u32 = 96;

/// The weight draws the localisation test runs with (each a different random net).
const SEEDS: std::ops::Range<u64> = 0..24;

/// A stationary texture: gentle pixel noise around a brown, different in every image, alike
/// in its statistics everywhere (so that no place in a normal image is unusual).
fn texture(seed: u64, width: u32, height: u32) -> RgbImage {
    let noise = splitmix_uniform(seed, (width * height) as usize);
    RgbImage::from_fn(width, height, |x, y| {
        let n = noise[(y * width + x) as usize];
        let v = (120.0 + 24.0 * n) as u8;
        Rgb([v, v - 25, v / 2 + 30])
    })
}

/// `image` with a square of side `s` at (x0, y0) holding a black and white checkerboard of
/// 2-pixel cells: sharp edges that no normal image has.
fn with_defect(mut image: RgbImage, (x0, y0): (u32, u32), s: u32) -> RgbImage {
    for y in y0..y0 + s {
        for x in x0..x0 + s {
            let v = if ((x - x0) / 2 + (y - y0) / 2) % 2 == 0 {
                0
            } else {
                255
            };
            image.put_pixel(x, y, Rgb([v, v, v]));
        }
    }
    image
}

fn normal_images() -> Vec<RgbImage> {
    (0..8).map(|i| texture(100 + i, SIDE, SIDE)).collect()
}

/// A random-weight ResNet-18 (no weights can be fetched here) as a kNN-baseline detector with
/// a patch bank, on `device`.
fn detector(device: &Device) -> Detector {
    detector_seeded(device, 7)
}

/// A random-weight net of `layout` drawn from `device`'s generator seeded with `seed`, under a
/// lock: tests run in parallel and share the generator, and each must draw the same net on
/// every run.
fn draw(device: &Device, seed: u64, layout: ResNetConfig) -> msad::encoder::ResNet {
    static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = DRAW.lock().unwrap_or_else(|e| e.into_inner());
    device.seed(seed);
    layout.try_init(device).unwrap()
}

fn detector_seeded(device: &Device, seed: u64) -> Detector {
    let layout = ResNetConfig::from_arch(Arch::Resnet18)
        .with_widths([16, 32, 64, 64])
        .with_stem_width(16);
    let encoder = draw(device, seed, layout);
    let config = MscTrainerConfig::new().with_image_size(SIDE);
    let normal = normal_images();
    let mut detector = Detector::without_training(config, encoder, &normal, device).unwrap();
    detector.fit_anomaly_maps(&normal, &map_config()).unwrap();
    detector
}

/// Random weights are a poor feature extractor at depth (a pretrained net is what users
/// run): the maps here use the shallower `layer1` and `layer2`, whose random features still
/// describe local texture.
fn map_config() -> PatchMapConfig {
    PatchMapConfig::new()
        .with_stages(vec![Stage::Layer1, Stage::Layer2])
        .with_max_patches(300)
}

/// The (x, y) of the map's largest value.
fn argmax(map: &ndarray::Array2<f32>) -> (usize, usize) {
    let ((y, x), _) = map
        .indexed_iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    (x, y)
}

#[test]
fn the_maximum_of_the_map_lies_in_the_defect_and_agrees_with_the_score() {
    let device = Device::flex();
    for seed in SEEDS {
        let detector = detector_seeded(&device, seed);
        assert_eq!(detector.patch_bank_len(), 300);
        // Non-square images: the transform resizes the shorter side to SIDE and crops the
        // center; the map comes back at the image's own size. The last image is twice the
        // size (scale ½): its defect, and the grid cell allowed around it, are twice as big.
        let cases = [
            ((144, SIDE), (45, 20), 14),
            ((144, SIDE), (75, 60), 12),
            ((144, SIDE), (30, 66), 16),
            ((2 * SIDE, 3 * SIDE), (90, 150), 30),
        ];
        for (i, ((width, height), at, side)) in cases.into_iter().enumerate() {
            let image = with_defect(texture(900 + i as u64, width, height), at, side);
            let map = detector.anomaly_map(&image).unwrap();
            let shape = (height as usize, width as usize);
            assert_eq!((map.values.dim(), map.distances.dim()), (shape, shape));
            // The most distant patch within one cell of the patch grid (stride 8 in the
            // crop) of the defect, and the defect farther from the normal patches than the
            // rest on average.
            let cell = 8 * height.min(width) / SIDE;
            let near = |v: usize, lo: u32| {
                v + cell as usize >= lo as usize && v <= (lo + side + cell) as usize
            };
            let (x, y) = argmax(&map.distances);
            assert!(
                near(x, at.0) && near(y, at.1),
                "seed {seed} case {i}: maximum at ({x}, {y}), defect at {at:?} side {side}"
            );
            let (mut hot, mut cold) = ((0.0, 0), (0.0, 0));
            for ((y, x), &v) in map.distances.indexed_iter() {
                let sum = if near(x, at.0) && near(y, at.1) {
                    &mut hot
                } else {
                    &mut cold
                };
                *sum = (sum.0 + v, sum.1 + 1);
            }
            let (hot, cold) = (hot.0 / hot.1 as f32, cold.0 / cold.1 as f32);
            assert!(
                hot > 1.1 * cold,
                "seed {seed} case {i}: defect {hot}, elsewhere {cold}"
            );
            // The map's maximum is the image's normalised score, at the same place.
            assert_eq!(map.max(), map.score.normalized);
            if map.score.normalized > 0.0 {
                assert_eq!(argmax(&map.values), (x, y));
            }
            assert_eq!(map.segmentation().iter().any(|&m| m), map.score.anomalous);
            // The same score as the image-level call.
            let scored = detector.score_image(&image).unwrap();
            assert!((scored.raw - map.score.raw).abs() <= 1e-4 * scored.raw.abs().max(1.0));
            assert_eq!(scored.anomalous, map.score.anomalous);
        }
    }
}

#[test]
fn maps_are_equal_on_every_backend_and_survive_save_and_load() {
    let flex = Device::flex();
    let reference = detector(&flex);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("detector");
    reference.save(&path).unwrap();
    assert!(path.join("patches.npy").is_file());
    let image = with_defect(texture(5, 80, 70), (30, 20), 9);
    let want = reference.anomaly_map(&image).unwrap();
    for selected in backends() {
        let device = selected.device();
        let loaded = Detector::load(&path, device).unwrap();
        assert_eq!(loaded.anomaly_map_config(), reference.anomaly_map_config());
        let got = loaded.anomaly_map(&image).unwrap();
        let (a, b) = (
            got.values.as_slice().unwrap(),
            want.values.as_slice().unwrap(),
        );
        let diff = max_abs_diff(a, b);
        eprintln!("{}: max |Δ| of the map {diff:.2e}", selected.backend());
        assert!(diff < 2e-3, "{}: {diff}", selected.backend());
        assert_eq!(argmax(&got.values), argmax(&want.values));
        assert_eq!(got.score.anomalous, want.score.anomalous);
    }
}

#[test]
fn a_tampered_patch_bank_is_refused_naming_the_file() {
    let device = Device::flex();
    let detector = detector(&device);
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("detector");
    detector.save(&path).unwrap();
    let patches = path.join("patches.npy");
    let mut bytes = std::fs::read(&patches).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&patches, bytes).unwrap();
    match Detector::load(&path, &device) {
        Err(Error::Checkpoint { path, reason }) => {
            assert!(path.ends_with("patches.npy"), "{}", path.display());
            assert!(reason.contains("SHA-256"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A change to a saved detector's manifest.
type ManifestEdit = fn(&mut serde_json::Value);

#[test]
fn a_patch_bank_that_does_not_fit_its_manifest_is_refused() {
    let device = Device::flex();
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("detector");
    detector(&device).save(&path).unwrap();
    let manifest = path.join("detector.json");
    let original = std::fs::read_to_string(&manifest).unwrap();
    let edits: [(&str, ManifestEdit); 4] = [
        ("dim", |m| m["anomaly_maps"]["dim"] = serde_json::json!(7)),
        ("rows", |m| {
            m["anomaly_maps"]["rows"] = serde_json::json!(301)
        }),
        ("stages", |m| {
            m["anomaly_maps"]["config"]["stages"] = serde_json::json!(["Layer1", "Layer1"])
        }),
        ("version", |m| m["version"] = serde_json::json!(1)),
    ];
    for (what, edit) in edits {
        let mut value: serde_json::Value = serde_json::from_str(&original).unwrap();
        edit(&mut value);
        std::fs::write(&manifest, serde_json::to_string(&value).unwrap()).unwrap();
        match Detector::load(&path, &device) {
            Err(Error::Checkpoint { path, reason }) => {
                assert!(
                    path.ends_with("detector.json"),
                    "{what}: {}",
                    path.display()
                );
                eprintln!("{what}: {reason}");
            }
            other => panic!("{what}: expected a refusal naming the manifest, got {other:?}"),
        }
    }
    std::fs::write(&manifest, original).unwrap();
    assert!(Detector::load(&path, &device).is_ok());
}

#[test]
fn a_stream_of_maps_keeps_every_good_image_past_a_bad_one() {
    let device = Device::flex();
    let detector = detector(&device);
    let dir = TempDir::new().unwrap();
    for i in 0..5u64 {
        let image = with_defect(texture(40 + i, SIDE, SIDE), (20, 20), 6);
        image.save(dir.path().join(format!("{i}.png"))).unwrap();
    }
    std::fs::write(dir.path().join("2.png"), b"not a png").unwrap();
    let folder = msad::data::ImageFolder::open(dir.path()).unwrap();
    let results: Vec<_> = detector.anomaly_map_each(&folder).collect();
    assert_eq!(results.len(), 5);
    for (i, result) in results.iter().enumerate() {
        assert_eq!(result.index, i);
        match (&result.outcome, i) {
            (Err(e), 2) => assert!(e.to_string().contains("2.png"), "{e}"),
            (Ok(map), i) if i != 2 => assert_eq!(map.values.dim(), (SIDE as usize, SIDE as usize)),
            (outcome, i) => panic!("image {i}: {outcome:?}"),
        }
    }
}

#[test]
fn maps_need_a_patch_bank_and_sane_settings() {
    let device = Device::flex();
    let encoder = ResNetConfig::from_arch(Arch::Resnet18)
        .with_widths([4, 4, 8, 8])
        .with_stem_width(4)
        .try_init(&device)
        .unwrap();
    let normal = normal_images();
    let mut detector = Detector::without_training(
        MscTrainerConfig::new().with_image_size(32),
        encoder,
        &normal,
        &device,
    )
    .unwrap();
    let err = detector.anomaly_map(&normal[0]).unwrap_err();
    assert!(err.to_string().contains("fit_anomaly_maps"), "{err}");
    for bad in [
        PatchMapConfig::new().with_neighbourhood(2),
        PatchMapConfig::new().with_stages(vec![]),
        PatchMapConfig::new().with_stages(vec![Stage::Stem]),
        PatchMapConfig::new().with_max_patches(0),
        PatchMapConfig::new().with_sigma(f32::NAN),
    ] {
        let err = detector.fit_anomaly_maps(&normal, &bad).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{bad:?}: {err}"
        );
    }
    // layer1 alone at 32 px: an 8 × 8 grid; fewer patches than the budget keeps them all.
    detector
        .fit_anomaly_maps(
            &normal,
            &PatchMapConfig::new().with_stages(vec![Stage::Layer1]),
        )
        .unwrap();
    assert_eq!(detector.patch_bank_len(), 8 * 8 * 8);
    let empty = RgbImage::new(0, 0);
    assert!(detector.anomaly_map(&empty).is_err());
}

#[test]
fn maps_on_the_synthetic_mvtec_fixture_find_the_defect_pixels() {
    use msad::data::{FolderOptions, MvtecAd};
    use msad::metrics::{DEFAULT_MAX_FPR, pixel_roc_auc, pro_auc};

    let root = common::fixture("synthetic_mvtec", "");
    let device = Device::flex();
    let categories = MvtecAd::categories(&root).unwrap();
    assert!(categories.len() >= 3, "{categories:?}");
    for category in categories {
        let mvtec = MvtecAd::open(&root, &category, FolderOptions::strict()).unwrap();
        let masks: Vec<_> = (0..mvtec.test_len())
            .map(|i| mvtec.test_mask(i).unwrap())
            .collect();
        let split = mvtec.into_split().unwrap();
        let encoder = draw(&device, 11, ResNetConfig::from_arch(Arch::Resnet18));
        let config = MscTrainerConfig::new().with_image_size(64);
        let mut detector =
            Detector::without_training(config, encoder, split.train.as_ref(), &device).unwrap();
        detector
            .fit_anomaly_maps(split.train.as_ref(), &PatchMapConfig::new())
            .unwrap();
        let maps: Vec<_> = detector
            .anomaly_map_each(split.test.as_ref())
            .map(|r| r.outcome.unwrap())
            .collect();
        for (map, mask) in maps.iter().zip(&masks) {
            assert_eq!(map.distances.dim(), mask.dim());
        }
        let distances: Vec<_> = maps.iter().map(|m| m.distances.view()).collect();
        let truth: Vec<_> = masks.iter().map(|m| m.view()).collect();
        let pixel = pixel_roc_auc(&distances, &truth).unwrap();
        let pro = pro_auc(&distances, &truth, DEFAULT_MAX_FPR).unwrap();
        eprintln!("{category}: pixel ROC-AUC {pixel:.3}, PRO {pro:.3}");
        // A random-weight net (no pretrained weights offline) still finds most defect pixels;
        // chance is 0.5.
        assert!(pixel > 0.7, "{category}: pixel ROC-AUC {pixel}");
    }
}
