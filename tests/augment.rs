//! Augmentation: the explicit-parameter primitives against torchvision/PIL fixtures, the random
//! sampling against torchvision's distributions, determinism, and bad input; the evaluation
//! transform on thin images and the folder reader's pixel limit, under a memory limit.

mod common;

use std::collections::HashMap;
use std::path::Path;

use burn::tensor::Device;
use image::RgbImage;
use msad::Error;
use msad::augment::ops::{self, CropBox, Filter};
use msad::augment::{EvalTransform, TrainAugmentConfig};
use msad::data::{FolderOptions, ImageFolder, ImageSource};
use rand::SeedableRng;
use rand::rngs::StdRng;

use common::{fixture, in_child};

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
            "resize_shorter" => (
                ops::resize_shorter_side(&src, u("size"), filter(p)).unwrap(),
                2,
            ),
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
        // The crop computed alone, bit for bit the crop of the whole resized image.
        let whole = ops::center_crop(
            &ops::resize_shorter_side(&png(src), transform.resize, transform.filter).unwrap(),
            transform.crop,
            transform.crop,
        );
        assert_eq!(transform.try_apply(&png(src)).unwrap(), whole, "{file}");
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

/// A deterministic pseudo-random image.
fn noise(width: u32, height: u32, seed: u64) -> RgbImage {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    RgbImage::from_fn(width, height, |_, _| {
        let mut byte = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        };
        image::Rgb([byte(), byte(), byte()])
    })
}

#[test]
fn eval_transform_is_resize_then_center_crop_bit_for_bit() {
    // The crop is computed alone (without the resized image): every pixel must be the one of
    // the whole resize, cropped, including where CenterCrop pads a small resize with zeros.
    let mut cases = 0;
    for (i, (w, h)) in [
        (1, 1),
        (1, 7),
        (9, 2),
        (31, 17),
        (48, 40),
        (64, 64),
        (100, 3),
    ]
    .into_iter()
    .enumerate()
    {
        let img = noise(w, h, i as u64);
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            for (size, crop_w, crop_h) in [
                (1, 1, 1),
                (5, 3, 3),
                (8, 13, 13),
                (16, 16, 9),
                (37, 24, 30),
                (50, 40, 40),
                (64, 64, 64),
                (20, 90, 7),
            ] {
                let got = ops::resize_and_center_crop(&img, size, crop_w, crop_h, filter);
                let resized = ops::resize_shorter_side(&img, size, filter).unwrap();
                let want = ops::center_crop(&resized, crop_w, crop_h);
                assert_eq!(got, want, "{w}x{h}, size {size}, crop {crop_w}x{crop_h}");
                if crop_w == crop_h {
                    let eval = EvalTransform::new(size, crop_w).with_filter(filter);
                    assert_eq!(eval.try_apply(&img).unwrap(), want);
                }
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 7 * 2 * 8);
}

/// Runs this test binary's test `name` again in a memory-capped child
/// ([`common::run_test_in_child`]) and returns its stdout; fails unless it passed and printed
/// "child finished".
fn run_child_under_memory_limit(name: &str, limit_mib: u64) -> String {
    let run = common::run_test_in_child(name, limit_mib);
    assert!(
        run.passed && run.stdout.contains("child finished"),
        "child {name} under {limit_mib} MiB:\nstdout:\n{}\nstderr:\n{}",
        run.stdout,
        run.stderr
    );
    run.stdout
}

/// The address-space limits of the children: far below what the unguarded paths would take
/// (a 1 × 65535 image resized to 256 is 12 GB; a 22000 × 22000 grayscale PNG's buffer is
/// 484 MB before its conversion to RGB), well above what the children need (the thin images
/// themselves are 2 × 48 MiB; either child runs in 150 MiB).
const THIN_LIMIT_MIB: u64 = 512;
const BOMB_LIMIT_MIB: u64 = 256;

#[test]
fn thin_images_take_the_eval_transform_in_bounded_memory() {
    if !in_child() {
        run_child_under_memory_limit(
            "thin_images_take_the_eval_transform_in_bounded_memory",
            THIN_LIMIT_MIB,
        );
        return;
    }
    // Resize(256): the scale 1/256 is exact in binary, so a thin image of length N and one of
    // length M ≡ N (mod 4) with the same pixels around their middles (shifted by
    // D = (N − M) / 2) have the same crops: compare the thin image against the whole
    // resize-then-crop of a small one.
    let tmp = tempfile::tempdir().unwrap();
    for (n, m) in [(65535u32, 63u32), (1 << 24, 64)] {
        let d = (n - m) / 2;
        let small = noise(1, m, u64::from(m));
        let fill = noise(1, 4096, 99);
        let column = |r: u32| {
            if (d..d + m).contains(&r) {
                *small.get_pixel(0, r - d)
            } else {
                *fill.get_pixel(0, r % 4096)
            }
        };
        let tall = RgbImage::from_fn(1, n, |_, y| column(y));
        let wide = RgbImage::from_fn(n, 1, |x, _| column(x));
        let small_wide = image::imageops::rotate90(&small);
        let small_wide = image::imageops::flip_horizontal(&small_wide);
        assert_eq!(*small_wide.get_pixel(5, 0), *small.get_pixel(0, 5));
        // A valid PNG of a few hundred bytes (65535 × 1) decodes to the thin image.
        let (tall, wide) = if n == 65535 {
            let read = |img: &RgbImage, name: &str| {
                let dir = tmp.path().join(name);
                std::fs::create_dir(&dir).unwrap();
                img.save(dir.join("thin.png")).unwrap();
                ImageFolder::open(&dir).unwrap().get(0).unwrap()
            };
            (read(&tall, "tall"), read(&wide, "wide"))
        } else {
            (tall, wide)
        };
        for filter in [Filter::Bilinear, Filter::Bicubic] {
            let eval = EvalTransform::new(256, 224).with_filter(filter);
            for (thin, reference) in [(&tall, &small), (&wide, &small_wide)] {
                let resized = ops::resize_shorter_side(reference, 256, filter).unwrap();
                let want = ops::center_crop(&resized, 224, 224);
                let got = eval.try_apply(thin).unwrap();
                assert_eq!(got, want, "{}x{} {filter:?}", thin.width(), thin.height());
                // Not a blank: the crop shows the middle pixels.
                assert!(got.pixels().any(|p| p.0 != [0, 0, 0]));
            }
        }
        // The whole resize is refused, naming the image, when its longer side overflows u32.
        if n == 1 << 24 {
            let err = ops::resize_shorter_side(&tall, 256, Filter::Bilinear).unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { ref reason, .. } if reason.contains("1x16777216")),
                "{err}"
            );
        }
        println!("thin 1x{n} and {n}x1: equal to the small reference");
    }
    // The batch path (rayon, normalisation) takes them too.
    let thin = noise(1, 65535, 3);
    let batch = EvalTransform::resnet152()
        .try_batch(&[thin.clone(), thin], &Device::flex())
        .unwrap();
    assert_eq!(batch.dims(), [2, 3, 224, 224]);
    println!("child finished");
}

/// The CRC-32 of PNG chunks (ISO 3309).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// A PNG of `width` × `height` 8-bit grayscale pixels whose one IDAT chunk holds the zlib
/// stream of a single zero byte: a valid header, the data of one pixel.
fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut chunk = |kind: &[u8; 4], data: &[u8]| {
        png.extend((data.len() as u32).to_be_bytes());
        let start = png.len();
        png.extend(kind);
        png.extend(data);
        let crc = crc32(&png[start..]);
        png.extend(crc.to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend(width.to_be_bytes());
    ihdr.extend(height.to_be_bytes());
    ihdr.extend([8, 0, 0, 0, 0]); // 8 bits, grayscale, deflate, adaptive filters, no interlace
    chunk(b"IHDR", &ihdr);
    chunk(
        b"IDAT",
        &[0x78, 0x9c, 0x63, 0x00, 0x00, 0x00, 0x01, 0x00, 0x01],
    );
    chunk(b"IEND", &[]);
    png
}

/// The error of reading the one image of folder `dir`, strict, with `options`; and that a
/// lenient open skips it with the same reason.
fn refusal(dir: &Path, options: FolderOptions) -> String {
    let folder = ImageFolder::open_with(dir, options).unwrap();
    let err = folder.get(0).unwrap_err();
    let Error::Image {
        ref path,
        ref reason,
    } = err
    else {
        panic!("not an Error::Image: {err}");
    };
    assert_eq!(path, &folder.paths()[0]);
    let lenient = FolderOptions::lenient().with_max_pixels(options.max_pixels);
    let lenient = ImageFolder::open_with(dir, lenient).unwrap();
    assert_eq!(lenient.len(), 0);
    assert_eq!(lenient.skipped().len(), 1);
    assert!(lenient.skipped()[0].reason.contains(reason.as_str()));
    err.to_string()
}

#[test]
fn a_png_claiming_huge_dimensions_is_an_error_not_an_abort() {
    if !in_child() {
        let out = run_child_under_memory_limit(
            "a_png_claiming_huge_dimensions_is_an_error_not_an_abort",
            BOMB_LIMIT_MIB,
        );
        assert!(out.contains("100000x100000 = 10000000000 pixels"), "{out}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Each a few dozen bytes; decoded they would take 10 GB, 484 MB (under the image crate's
    // own 512 MiB allocation limit, so only msad's pixel limit stops it before the child's
    // memory limit does), and 16 MB against a lowered limit.
    let side = "a side is longer than 1048576 pixels".to_string();
    for (width, height, options, size) in [
        (100_000, 100_000, FolderOptions::default(), None),
        (22_000, 22_000, FolderOptions::default(), None),
        // Refused by the decoder's limit on each side, before the pixel count.
        (
            1,
            1 << 24,
            FolderOptions::strict().with_max_pixels(1 << 20),
            Some(side),
        ),
    ] {
        let dir = tmp.path().join(format!("{width}x{height}"));
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("bomb.png");
        let bytes = png_claiming(width, height);
        assert!(bytes.len() < 100);
        std::fs::write(&file, bytes).unwrap();
        let message = refusal(&dir, options);
        let pixels = u64::from(width) * u64::from(height);
        let max = options.max_pixels;
        let size = size.unwrap_or(format!(
            "{width}x{height} = {pixels} pixels, over the limit"
        ));
        for part in [
            file.display().to_string(),
            size,
            format!("limit of {max} pixels an image"),
            "FolderOptions::with_max_pixels".to_string(),
        ] {
            assert!(message.contains(&part), "{message:?} lacks {part:?}");
        }
        println!("{message}");
    }
    println!("child finished");
}

#[test]
fn images_over_max_pixels_are_refused_naming_the_file_and_the_limit() {
    assert_eq!(FolderOptions::DEFAULT_MAX_PIXELS, 1 << 27);
    assert_eq!(FolderOptions::default().max_pixels, 1 << 27);
    assert_eq!(FolderOptions::lenient().max_pixels, 1 << 27);
    let tmp = tempfile::tempdir().unwrap();
    // A valid, highly compressible 1500 × 1000 black PNG (a few KB).
    let (train, test) = (tmp.path().join("train"), tmp.path().join("test"));
    for dir in [&train, &test] {
        std::fs::create_dir(dir).unwrap();
        RgbImage::new(1500, 1000)
            .save(dir.join("black.png"))
            .unwrap();
    }
    let low = FolderOptions::strict().with_max_pixels(1_000_000);
    let message = refusal(&train, low);
    assert!(
        message.contains("black.png")
            && message.contains("1500x1000 = 1500000 pixels")
            && message.contains("over the limit of 1000000 pixels an image")
            && message.contains("FolderOptions::with_max_pixels"),
        "{message}"
    );
    // At the limit exactly, and above it, the image decodes.
    for max_pixels in [1_500_000, 1 << 27] {
        let folder = ImageFolder::open_with(&train, low.with_max_pixels(max_pixels)).unwrap();
        assert_eq!(folder.get(0).unwrap().dimensions(), (1500, 1000));
    }
    // Joined folders keep the limit each was opened with.
    let split = ImageFolder::one_class(
        ImageFolder::open_with(&train, low).unwrap(),
        ImageFolder::open_with(&test, FolderOptions::default()).unwrap(),
        Some(ImageFolder::open_with(&train, low).unwrap()),
    )
    .unwrap();
    assert!(matches!(split.train.get(0), Err(Error::Image { .. })));
    assert_eq!(split.test.get(0).unwrap().dimensions(), (1500, 1000));
    assert!(matches!(split.test.get(1), Err(Error::Image { .. })));
    // A limit of 0 would refuse everything: refused when opening.
    let err = ImageFolder::open_with(&train, low.with_max_pixels(0)).unwrap_err();
    assert!(
        matches!(err, Error::InvalidArgument { ref what, .. } if what.contains("max_pixels")),
        "{err}"
    );
}
