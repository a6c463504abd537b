//! Augmentation: the explicit-parameter primitives against torchvision/PIL fixtures, the random
//! sampling against torchvision's distributions, determinism, and bad input.

mod common;

use std::collections::HashMap;

use burn::tensor::Device;
use image::RgbImage;
use msad::Error;
use msad::augment::ops::{self, CropBox, Filter};
use msad::augment::{EvalTransform, TrainAugmentConfig};
use rand::SeedableRng;
use rand::rngs::StdRng;

use common::fixture;

fn png(name: &str) -> RgbImage {
    image::open(fixture("augment", &format!("{name}.png")))
        .unwrap()
        .to_rgb8()
}

fn max_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions());
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

#[derive(serde::Deserialize)]
struct Case {
    name: String,
    src: String,
    op: String,
    params: HashMap<String, serde_json::Value>,
}

fn filter(p: &HashMap<String, serde_json::Value>) -> Filter {
    match p["filter"].as_str().unwrap() {
        "bilinear" => Filter::Bilinear,
        _ => Filter::Bicubic,
    }
}

#[test]
fn primitives_match_torchvision_on_pil() {
    let cases: Vec<Case> =
        serde_json::from_str(&std::fs::read_to_string(fixture("augment", "cases.json")).unwrap())
            .unwrap();
    assert!(cases.len() > 50);
    let mut worst: HashMap<String, u8> = HashMap::new();
    for case in &cases {
        let src = png(&format!("src_{}", case.src));
        let p = &case.params;
        let u = |k: &str| p[k].as_u64().unwrap() as u32;
        let f = |k: &str| p[k].as_f64().unwrap() as f32;
        let (got, tolerance) = match case.op.as_str() {
            "resize" => (ops::resize(&src, u("width"), u("height"), filter(p)), 2),
            "resize_shorter" => (ops::resize_shorter_side(&src, u("size"), filter(p)), 2),
            "resized_crop" => {
                let region = CropBox {
                    top: u("top"),
                    left: u("left"),
                    height: u("height"),
                    width: u("width"),
                };
                (
                    ops::resize_region(&src, region, u("size"), u("size"), filter(p)).unwrap(),
                    2,
                )
            }
            "crop" => {
                let region = CropBox {
                    top: u("top"),
                    left: u("left"),
                    height: u("height"),
                    width: u("width"),
                };
                (ops::crop(&src, region).unwrap(), 0)
            }
            "center_crop" => (ops::center_crop(&src, u("size"), u("size")), 0),
            "hflip" => (ops::hflip(&src), 0),
            "grayscale" => (ops::to_grayscale(&src), 0),
            "brightness" => (ops::adjust_brightness(&src, f("factor")), 2),
            "contrast" => (ops::adjust_contrast(&src, f("factor")), 2),
            "saturation" => (ops::adjust_saturation(&src, f("factor")), 2),
            "hue" => (ops::adjust_hue(&src, f("factor")), 2),
            "blur" => (ops::gaussian_blur(&src, f("sigma")), 2),
            other => panic!("unknown op {other}"),
        };
        let want = png(&case.name);
        let diff = max_diff(&got, &want);
        assert!(
            diff <= tolerance,
            "{}: max difference {diff} > {tolerance}",
            case.name
        );
        let w = worst.entry(case.op.clone()).or_default();
        *w = (*w).max(diff);
    }
    eprintln!("largest difference per operation (of 255): {worst:?}");
}

#[test]
fn normalisation_and_the_eval_transform_match_torchvision() {
    let b = png("src_b");
    let mut out = vec![0f32; 3 * 32 * 32];
    ops::to_normalized_chw(&b, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut out).unwrap();
    let want = msad::npy::read_f32(fixture("augment", "normalized_b.npy")).unwrap();
    assert!(common::max_abs_diff(&out, want.as_slice().unwrap()) <= 1e-6);

    // Two resize-and-crop pipelines, end to end; 2/255 in pixel values is 2/255/std here.
    let device = Device::flex();
    let tol = 2.0 / 255.0 / 0.224 + 1e-6;
    for (transform, src, file) in [
        (
            EvalTransform::new(50, 40).with_filter(Filter::Bilinear),
            "src_a",
            "eval_bilinear_50_40_a.npy",
        ),
        (
            EvalTransform::new(64, 64).with_filter(Filter::Bicubic),
            "src_b",
            "eval_bicubic_64_64_b.npy",
        ),
    ] {
        let batch = transform.try_batch(&[png(src)], &device).unwrap();
        let got = msad::host::vec_from_tensor(batch).unwrap();
        let want = msad::npy::read_f32(fixture("augment", file)).unwrap();
        let diff = common::max_abs_diff(&got, want.as_slice().unwrap());
        assert!(diff <= tol, "{file}: {diff}");
    }
    assert_eq!(
        EvalTransform::resnet152(),
        EvalTransform::new(256, 224).with_filter(Filter::Bilinear)
    );
    assert_eq!(EvalTransform::resnet18().size(), 224);
}

#[derive(serde::Deserialize)]
struct CropStats {
    draws: usize,
    area_mean: f64,
    area_std: f64,
    log_ratio_mean: f64,
    log_ratio_std: f64,
    area_min: f64,
}

#[test]
fn crop_sampling_matches_torchvision_distributions() {
    let stats: HashMap<String, CropStats> = serde_json::from_str(
        &std::fs::read_to_string(fixture("augment", "crop_stats.json")).unwrap(),
    )
    .unwrap();
    let augment = TrainAugmentConfig::new().try_init().unwrap();
    let mut rng = StdRng::seed_from_u64(3);
    for (size, want) in &stats {
        let (w, h): (u32, u32) = {
            let mut it = size.split('x').map(|v| v.parse().unwrap());
            (it.next().unwrap(), it.next().unwrap())
        };
        let n = 10_000;
        let (mut areas, mut ratios) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let c = augment.sample_crop(w, h, &mut rng);
            assert!(c.top + c.height <= h && c.left + c.width <= w && c.width > 0 && c.height > 0);
            areas.push((c.width * c.height) as f64 / (w * h) as f64);
            ratios.push((c.width as f64 / c.height as f64).ln());
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        // Two independent samples: the difference of means within 3 standard errors.
        let close = |ours: f64, theirs: f64, std: f64| {
            let se = std * (1.0 / n as f64 + 1.0 / want.draws as f64).sqrt();
            (ours - theirs).abs() <= 3.0 * se + 1e-12
        };
        assert!(
            close(mean(&areas), want.area_mean, want.area_std),
            "{size}: area mean {} vs {}",
            mean(&areas),
            want.area_mean
        );
        assert!(
            close(mean(&ratios), want.log_ratio_mean, want.log_ratio_std),
            "{size}: log-ratio mean {} vs {}",
            mean(&ratios),
            want.log_ratio_mean
        );
        let (lo, hi) = areas
            .iter()
            .fold((f64::MAX, f64::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
        // The area fraction stays in the scale range [0.2, 1] up to the rounding of the box to
        // whole pixels (torchvision's own minimum on 32 × 32 is 0.1875).
        assert!(
            lo >= want.area_min.min(0.2) - 0.02 && hi <= 1.0,
            "{size}: areas in [{lo}, {hi}]"
        );
        // Log-ratios stay in [ln 3/4, ln 4/3] up to that rounding; the fallback for 1000 × 40
        // is clamped to 4/3 as well.
        let bound = (4.0f64 / 3.0).ln() + 0.1;
        assert!(
            ratios.iter().all(|r| r.abs() <= bound),
            "{size}: ratio out of range"
        );
    }
    // 1000 × 40 never fits: always torchvision's fallback, a 53 × 40 center crop.
    let c = augment.sample_crop(1000, 40, &mut rng);
    assert_eq!(
        c,
        CropBox {
            top: 0,
            left: (1000 - 53) / 2,
            height: 40,
            width: 53
        }
    );
}

#[test]
fn application_rates_are_within_three_standard_errors() {
    let augment = TrainAugmentConfig::new().try_init().unwrap();
    let mut rng = StdRng::seed_from_u64(9);
    let n = 10_000;
    let mut counts = [0usize; 4];
    let mut hue_in_range = true;
    for _ in 0..n {
        let v = augment.sample(500, 375, &mut rng);
        if let Some(j) = &v.jitter {
            counts[0] += 1;
            let mut order = j.order;
            order.sort_unstable();
            assert_eq!(order, [0, 1, 2, 3]);
            for f in [j.brightness, j.contrast, j.saturation] {
                assert!((0.6..=1.4).contains(&f), "factor {f}");
            }
            hue_in_range &= (-0.1..=0.1).contains(&j.hue);
        }
        counts[1] += v.grayscale as usize;
        if let Some(s) = v.blur_sigma {
            counts[2] += 1;
            assert!((0.1..=2.0).contains(&s));
        }
        counts[3] += v.flip as usize;
    }
    assert!(hue_in_range);
    for (count, p) in counts.iter().zip([0.8, 0.2, 0.5, 0.5]) {
        let rate = *count as f64 / n as f64;
        let se = (p * (1.0 - p) / n as f64).sqrt();
        assert!((rate - p).abs() <= 3.0 * se, "rate {rate} vs {p}");
    }
}

fn images() -> Vec<RgbImage> {
    vec![
        png("src_a"),
        png("src_b"),
        png("src_a"),
        png("src_b"),
        png("src_a"),
    ]
}

#[test]
fn views_are_deterministic_whatever_the_thread_count() {
    let device = Device::flex();
    let augment = TrainAugmentConfig::new().with_size(48).try_init().unwrap();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut rng = StdRng::seed_from_u64(42);
            let (a, b) = augment.views(&images(), &mut rng, &device).unwrap();
            (
                msad::host::vec_from_tensor(a).unwrap(),
                msad::host::vec_from_tensor(b).unwrap(),
            )
        })
    };
    let one = run(1);
    assert_eq!(one, run(3));
    assert_ne!(one.0, one.1, "the two views differ");
    let mut rng = StdRng::seed_from_u64(43);
    let (other, _) = augment.views(&images(), &mut rng, &device).unwrap();
    assert_ne!(
        msad::host::vec_from_tensor(other).unwrap(),
        one.0,
        "another seed, other views"
    );
}

#[test]
fn bad_input_is_an_error() {
    let device = Device::flex();
    let augment = TrainAugmentConfig::new().with_size(16).try_init().unwrap();
    let mut rng = StdRng::seed_from_u64(1);
    let err = augment
        .views(&[png("src_a"), RgbImage::new(0, 5)], &mut rng, &device)
        .unwrap_err();
    assert!(
        matches!(err, Error::InvalidShape { ref what, .. } if what == "image 1"),
        "{err}"
    );
    let err = EvalTransform::new(8, 8)
        .try_batch(&[RgbImage::new(4, 0)], &device)
        .unwrap_err();
    assert!(matches!(err, Error::InvalidShape { .. }), "{err}");
    assert!(
        EvalTransform::new(8, 0)
            .try_batch(&[png("src_a")], &device)
            .is_err()
    );
    for config in [
        TrainAugmentConfig::new().with_size(0),
        TrainAugmentConfig::new().with_scale([0.0, 1.0]),
        TrainAugmentConfig::new().with_scale([0.5, 1.2]),
        TrainAugmentConfig::new().with_scale([0.9, 0.5]),
        TrainAugmentConfig::new().with_ratio([-1.0, 1.0]),
        TrainAugmentConfig::new().with_jitter_p(1.5),
        TrainAugmentConfig::new().with_hue(0.7),
        TrainAugmentConfig::new().with_blur_sigma([0.0, 1.0]),
        TrainAugmentConfig::new().with_blur_sigma([1.0, 1e9]),
        TrainAugmentConfig::new().with_size(1 << 20),
    ] {
        let err = config.try_init().unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
    }
    assert!(
        EvalTransform::new(1 << 20, 224)
            .try_batch(&[png("src_a")], &device)
            .is_err()
    );

    // Explicit parameters outside the image are errors, not panics.
    let src = png("src_a");
    let (w, h) = src.dimensions();
    let outside = [
        CropBox {
            top: 0,
            left: 0,
            height: h + 1,
            width: 4,
        },
        CropBox {
            top: h - 2,
            left: 0,
            height: 4,
            width: 4,
        },
        CropBox {
            top: 0,
            left: w,
            height: 1,
            width: 1,
        },
        CropBox {
            top: 0,
            left: 0,
            height: 0,
            width: 4,
        },
        CropBox {
            top: u32::MAX,
            left: 0,
            height: 2,
            width: 2,
        },
    ];
    for region in outside {
        let err = ops::crop(&src, region).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        assert!(ops::resize_region(&src, region, 8, 8, Filter::Bilinear).is_err());
        let mut params = augment.sample(w, h, &mut rng);
        params.crop = region;
        assert!(augment.apply(&src, &params).is_err());
    }
    let mut short = vec![0f32; 5];
    assert!(matches!(
        ops::to_normalized_chw(&src, ops::IMAGENET_MEAN, ops::IMAGENET_STD, &mut short),
        Err(Error::InvalidShape { .. })
    ));
    // Absurd or non-finite blur strengths are clamped, not overflowed.
    assert_eq!(ops::gaussian_blur(&src, f32::NAN), src);
    assert_eq!(ops::gaussian_blur(&src, 1e12).dimensions(), (w, h));
}
