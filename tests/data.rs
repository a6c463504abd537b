//! Dataset readers: every format written to temporary directories, plus corrupt variants.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use image::{ImageBuffer, Luma, LumaA, Rgb, RgbImage, Rgba};
use msad::Error;
use msad::data::{
    Cifar10, Cifar100, Digits, FolderOptions, ImageFolder, ImageSource, MaskedFolder, MvtecAd,
    OneClassSplit,
};
use tempfile::TempDir;

// ------------------------------------------------------------------------------------------
// CIFAR record files
// ------------------------------------------------------------------------------------------

/// The known pixel value of channel `c` (0 = R) at pixel `p` (row-major) of image `id`.
fn cifar_value(id: usize, c: usize, p: usize) -> u8 {
    ((id * 31 + c * 97 + p * 7) % 256) as u8
}

/// One record: the label bytes, then the R, G and B planes of image `id`.
fn cifar_record(labels: &[u8], id: usize) -> Vec<u8> {
    let mut bytes = labels.to_vec();
    for c in 0..3 {
        bytes.extend((0..1024).map(|p| cifar_value(id, c, p)));
    }
    bytes
}

/// Checks that `image` holds image `id`'s planes as interleaved RGB.
fn assert_cifar_image(image: &RgbImage, id: usize) {
    assert_eq!(image.dimensions(), (32, 32));
    for (x, y) in [(0, 0), (1, 0), (31, 0), (0, 1), (5, 17), (31, 31)] {
        let p = (y * 32 + x) as usize;
        let expected = [
            cifar_value(id, 0, p),
            cifar_value(id, 1, p),
            cifar_value(id, 2, p),
        ];
        assert_eq!(
            image.get_pixel(x, y).0,
            expected,
            "image {id} at ({x}, {y})"
        );
    }
}

/// CIFAR-10 labels of the records written by [`write_cifar10`]: file `f`, record `r`.
fn cifar10_label(f: usize, r: usize) -> u8 {
    ((f * 3 + r) % 10) as u8
}

/// Writes five training batches of 3 records (ids 0..15) and a test batch of 10 records
/// (ids 100..110, labels 0..9); returns the directory.
fn write_cifar10(dir: &Path) {
    for f in 0..5 {
        let bytes: Vec<u8> = (0..3)
            .flat_map(|r| cifar_record(&[cifar10_label(f, r)], f * 3 + r))
            .collect();
        fs::write(dir.join(format!("data_batch_{}.bin", f + 1)), bytes).unwrap();
    }
    let test: Vec<u8> = (0..10)
        .flat_map(|r| cifar_record(&[r as u8], 100 + r))
        .collect();
    fs::write(dir.join("test_batch.bin"), test).unwrap();
}

fn dataset_error(err: Error) -> (PathBuf, Option<usize>, String) {
    let message = err.to_string();
    match err {
        Error::Dataset { path, record, .. } => (path, record, message),
        other => panic!("expected Error::Dataset, got {other:?}"),
    }
}

#[test]
fn cifar10_reads_labels_and_rgb_planes_in_order() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let cifar = Cifar10::open(tmp.path()).unwrap();
    assert_eq!(cifar.train_images().len(), 15);
    assert_eq!(cifar.test_images().len(), 10);
    let expected_labels: Vec<u8> = (0..5)
        .flat_map(|f| (0..3).map(move |r| cifar10_label(f, r)))
        .collect();
    assert_eq!(cifar.train_labels(), expected_labels.as_slice());
    assert_eq!(cifar.test_labels(), &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    for (id, image) in cifar.train_images().iter().enumerate() {
        assert_cifar_image(image, id);
    }
    for (r, image) in cifar.test_images().iter().enumerate() {
        assert_cifar_image(image, 100 + r);
    }
    assert_eq!(Cifar10::CLASSES[3], "cat");
}

#[test]
fn cifar10_opens_the_extracted_archive_folder() {
    let tmp = TempDir::new().unwrap();
    let nested = tmp.path().join("cifar-10-batches-bin");
    fs::create_dir(&nested).unwrap();
    write_cifar10(&nested);
    let cifar = Cifar10::open(tmp.path()).unwrap();
    assert_eq!(cifar.dir(), nested.as_path());
    assert_eq!(cifar.train_images().len(), 15);
}

#[test]
fn cifar10_one_class_split() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let cifar = Cifar10::open(tmp.path()).unwrap();
    let split = cifar.one_class(3).unwrap();
    // Training labels are (3f + r) % 10 for f in 0..5, r in 0..3: label 3 at ids 3 and 13.
    assert_eq!(split.train.len(), 2);
    assert_cifar_image(&split.train.get(0).unwrap(), 3);
    assert_cifar_image(&split.train.get(1).unwrap(), 13);
    assert_eq!(split.train.name(1), "cifar10:train:13");
    assert_eq!(split.test.len(), 10);
    let expected: Vec<bool> = (0..10).map(|c| c != 3).collect();
    assert_eq!(split.test_anomalous, expected);
    assert_eq!(split.test.name(4), "cifar10:test:4");
    assert!(split.description.contains("cat"), "{}", split.description);
    assert!(split.train.get(2).is_err());

    match cifar.one_class(10) {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {:?}", other.err()),
    }
}

#[test]
fn cifar10_truncated_file_is_an_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let file = tmp.path().join("data_batch_3.bin");
    let bytes = fs::read(&file).unwrap();
    fs::write(&file, &bytes[..2 * 3073 + 100]).unwrap();
    let (path, record, message) = dataset_error(Cifar10::open(tmp.path()).err().unwrap());
    assert_eq!(path, file);
    assert_eq!(record, None);
    assert!(message.contains("data_batch_3.bin"), "{message}");
    assert!(message.contains("3073"), "{message}");
}

#[test]
fn cifar10_empty_file_is_an_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let file = tmp.path().join("test_batch.bin");
    fs::write(&file, b"").unwrap();
    let (path, _, _) = dataset_error(Cifar10::open(tmp.path()).err().unwrap());
    assert_eq!(path, file);
}

#[test]
fn cifar10_label_out_of_range_names_the_record() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let file = tmp.path().join("test_batch.bin");
    let mut bytes = fs::read(&file).unwrap();
    bytes[2 * 3073] = 10;
    fs::write(&file, bytes).unwrap();
    let (path, record, message) = dataset_error(Cifar10::open(tmp.path()).err().unwrap());
    assert_eq!(path, file);
    assert_eq!(record, Some(2));
    assert!(message.contains("test_batch.bin (record 2)"), "{message}");
    assert!(message.contains("label 10"), "{message}");
}

#[test]
fn cifar10_missing_batch_file_is_an_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    write_cifar10(tmp.path());
    let file = tmp.path().join("data_batch_4.bin");
    fs::remove_file(&file).unwrap();
    let (path, record, message) = dataset_error(Cifar10::open(tmp.path()).err().unwrap());
    assert_eq!(path, file);
    assert_eq!(record, None);
    assert!(message.contains("missing"), "{message}");
}

/// Writes `train.bin` (8 records, ids 0..8, coarse = id % 4, fine = id * 11) and `test.bin`
/// (6 records, ids 50..56, coarse = r, fine = 99 - r).
fn write_cifar100(dir: &Path) {
    let train: Vec<u8> = (0..8)
        .flat_map(|id| cifar_record(&[(id % 4) as u8, (id * 11) as u8], id))
        .collect();
    fs::write(dir.join("train.bin"), train).unwrap();
    let test: Vec<u8> = (0..6)
        .flat_map(|r| cifar_record(&[r as u8, 99 - r as u8], 50 + r))
        .collect();
    fs::write(dir.join("test.bin"), test).unwrap();
}

#[test]
fn cifar100_reads_coarse_and_fine_labels_and_pixels() {
    let tmp = TempDir::new().unwrap();
    write_cifar100(tmp.path());
    let cifar = Cifar100::open(tmp.path()).unwrap();
    assert_eq!(cifar.train_images().len(), 8);
    assert_eq!(cifar.train_coarse_labels(), &[0, 1, 2, 3, 0, 1, 2, 3]);
    assert_eq!(cifar.train_fine_labels(), &[0, 11, 22, 33, 44, 55, 66, 77]);
    assert_eq!(cifar.test_coarse_labels(), &[0, 1, 2, 3, 4, 5]);
    assert_eq!(cifar.test_fine_labels(), &[99, 98, 97, 96, 95, 94]);
    for (id, image) in cifar.train_images().iter().enumerate() {
        assert_cifar_image(image, id);
    }
    for (r, image) in cifar.test_images().iter().enumerate() {
        assert_cifar_image(image, 50 + r);
    }
    assert_eq!(Cifar100::COARSE_CLASSES.len(), 20);
    assert_eq!(Cifar100::COARSE_CLASSES[4], "fruit_and_vegetables");
}

#[test]
fn cifar100_one_class_split_uses_superclasses() {
    let tmp = TempDir::new().unwrap();
    let nested = tmp.path().join("cifar-100-binary");
    fs::create_dir(&nested).unwrap();
    write_cifar100(&nested);
    let cifar = Cifar100::open(tmp.path()).unwrap();
    let split = cifar.one_class(2).unwrap();
    assert_eq!(split.train.len(), 2);
    assert_cifar_image(&split.train.get(0).unwrap(), 2);
    assert_cifar_image(&split.train.get(1).unwrap(), 6);
    assert_eq!(
        split.test_anomalous,
        vec![true, true, false, true, true, true]
    );
    assert!(
        split.description.contains("flowers"),
        "{}",
        split.description
    );
    assert!(matches!(
        cifar.one_class(20),
        Err(Error::InvalidArgument { .. })
    ));
    // Superclass 7 has no training images here.
    assert!(matches!(cifar.one_class(7), Err(Error::Dataset { .. })));
}

#[test]
fn cifar100_out_of_range_labels_name_the_record() {
    for (record, labels, needle) in [
        (5, [20u8, 0u8], "coarse label 20"),
        (3, [1, 100], "fine label 100"),
    ] {
        let tmp = TempDir::new().unwrap();
        write_cifar100(tmp.path());
        let file = tmp.path().join("train.bin");
        let mut bytes = fs::read(&file).unwrap();
        bytes[record * 3074..record * 3074 + 2].copy_from_slice(&labels);
        fs::write(&file, bytes).unwrap();
        let (path, found, message) = dataset_error(Cifar100::open(tmp.path()).err().unwrap());
        assert_eq!(path, file);
        assert_eq!(found, Some(record));
        assert!(message.contains(needle), "{message}");
    }
}

#[test]
fn cifar100_truncated_and_missing_files_are_errors_naming_them() {
    let tmp = TempDir::new().unwrap();
    write_cifar100(tmp.path());
    let test = tmp.path().join("test.bin");
    let bytes = fs::read(&test).unwrap();
    fs::write(&test, &bytes[..bytes.len() - 1]).unwrap();
    let (path, record, message) = dataset_error(Cifar100::open(tmp.path()).err().unwrap());
    assert_eq!((path, record), (test.clone(), None));
    assert!(message.contains("3074"), "{message}");

    fs::remove_file(&test).unwrap();
    let (path, _, _) = dataset_error(Cifar100::open(tmp.path()).err().unwrap());
    assert_eq!(path, test);
}

// ------------------------------------------------------------------------------------------
// CIFAR python version (pickles written by scripts/make_cifar_pickle.py)
// ------------------------------------------------------------------------------------------

/// A copy of a fixture folder in a temporary directory.
fn copy_fixture(folder: &str) -> (TempDir, PathBuf) {
    let tmp = TempDir::new().unwrap();
    let dir = tmp.path().join(folder);
    fs::create_dir_all(&dir).unwrap();
    for entry in fs::read_dir(common::fixture("cifar", folder)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

#[test]
fn cifar10_python_version_equals_the_binary_version() {
    let python = Cifar10::open(common::fixture("cifar", "cifar-10-batches-py")).unwrap();
    let binary = Cifar10::open(common::fixture("cifar", "cifar-10-batches-bin")).unwrap();
    assert_eq!(python.train_images().len(), 15);
    assert_eq!(python.test_images().len(), 3);
    assert_eq!(python.train_labels(), binary.train_labels());
    assert_eq!(python.test_labels(), binary.test_labels());
    assert_eq!(python.train_images(), binary.train_images());
    assert_eq!(python.test_images(), binary.test_images());
    // Not every image is the same: the comparison above can fail.
    assert_ne!(python.train_images()[0], python.train_images()[1]);
}

#[test]
fn cifar100_python_version_equals_the_binary_version() {
    let python = Cifar100::open(common::fixture("cifar", "cifar-100-python")).unwrap();
    let binary = Cifar100::open(common::fixture("cifar", "cifar-100-binary")).unwrap();
    assert_eq!(python.train_images().len(), 3);
    assert_eq!(python.train_coarse_labels(), binary.train_coarse_labels());
    assert_eq!(python.train_fine_labels(), binary.train_fine_labels());
    assert_eq!(python.test_coarse_labels(), binary.test_coarse_labels());
    assert_eq!(python.test_fine_labels(), binary.test_fine_labels());
    assert_eq!(python.train_images(), binary.train_images());
    assert_eq!(python.test_images(), binary.test_images());
}

#[test]
fn cifar_open_finds_the_python_folder_inside_a_data_directory() {
    let (tmp, _) = copy_fixture("cifar-10-batches-py");
    let cifar = Cifar10::open(tmp.path()).unwrap();
    assert!(cifar.dir().ends_with("cifar-10-batches-py"));
    let (tmp, _) = copy_fixture("cifar-100-python");
    assert!(Cifar100::open(tmp.path()).is_ok());
}

#[test]
fn cifar_open_on_an_empty_directory_lists_the_files_it_looked_for() {
    let tmp = TempDir::new().unwrap();
    let (path, _, message) = dataset_error(Cifar10::open(tmp.path()).err().unwrap());
    assert_eq!(path, tmp.path());
    for name in [
        "data_batch_1.bin",
        "cifar-10-batches-bin",
        "data_batch_1,",
        "cifar-10-batches-py",
    ] {
        assert!(message.contains(name), "{name} not in {message}");
    }
    let (_, _, message) = dataset_error(Cifar100::open(tmp.path()).err().unwrap());
    assert!(message.contains("cifar-100-python"), "{message}");
}

#[test]
fn cifar_python_truncated_file_names_file_and_offset() {
    let (_tmp, dir) = copy_fixture("cifar-10-batches-py");
    let file = dir.join("data_batch_3");
    let bytes = fs::read(&file).unwrap();
    for cut in [1, 40, bytes.len() / 2, bytes.len() - 1] {
        fs::write(&file, &bytes[..cut]).unwrap();
        let (path, _, message) = dataset_error(Cifar10::open(&dir).err().unwrap());
        assert_eq!(path, file, "cut at {cut}");
        assert!(message.contains("offset"), "cut at {cut}: {message}");
    }
}

#[test]
fn cifar_python_file_calling_os_system_is_refused_naming_the_offset() {
    let (_tmp, dir) = copy_fixture("cifar-100-python");
    let file = dir.join("test");
    // PROTO 2, then GLOBAL 'os system', as a malicious pickle starts.
    fs::write(
        &file,
        b"\x80\x02cos\nsystem\nq\x00X\x02\x00\x00\x00idq\x01\x85q\x02Rq\x03.",
    )
    .unwrap();
    let (path, _, message) = dataset_error(Cifar100::open(&dir).err().unwrap());
    assert_eq!(path, file);
    assert!(message.contains("offset 2"), "{message}");
    assert!(
        message.contains("os") && message.contains("system"),
        "{message}"
    );
}

// ------------------------------------------------------------------------------------------
// Image folders
// ------------------------------------------------------------------------------------------

/// A recognisable RGB image: red = x * 10, green = y * 20, blue = 77.
fn pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        Rgb([(x * 10) as u8, (y * 20) as u8, 77])
    })
}

/// Writes one file of every supported kind under `dir`; returns the paths in sorted order
/// with the RGB image each must read back as (`None`: JPEG, checked loosely).
fn write_image_files(dir: &Path) -> Vec<(PathBuf, Option<RgbImage>)> {
    let sub = dir.join("b_sub").join("deeper");
    fs::create_dir_all(&sub).unwrap();
    let rgb = pattern(6, 5);
    let mut files = Vec::new();

    let png = dir.join("a_rgb.png");
    rgb.save(&png).unwrap();
    files.push((png, Some(rgb.clone())));

    // Grayscale 8-bit.
    let gray = ImageBuffer::<Luma<u8>, _>::from_fn(4, 3, |x, y| Luma([(x * 50 + y) as u8]));
    let gray_png = dir.join("b_gray.PNG");
    gray.save_with_format(&gray_png, image::ImageFormat::Png)
        .unwrap();
    let gray_rgb = RgbImage::from_fn(4, 3, |x, y| {
        let v = (x * 50 + y) as u8;
        Rgb([v, v, v])
    });
    files.push((gray_png, Some(gray_rgb)));

    // 16-bit RGB: multiples of 257 map to exact 8-bit values.
    let rgb16 = ImageBuffer::<Rgb<u16>, _>::from_fn(3, 2, |x, y| {
        Rgb([(x * 40) as u16 * 257, (y * 90) as u16 * 257, 65535])
    });
    let rgb16_png = sub.join("c_rgb16.png");
    rgb16.save(&rgb16_png).unwrap();
    let rgb16_expected = RgbImage::from_fn(3, 2, |x, y| Rgb([(x * 40) as u8, (y * 90) as u8, 255]));
    files.push((rgb16_png, Some(rgb16_expected)));

    // 16-bit grayscale with alpha.
    let la16 = ImageBuffer::<LumaA<u16>, _>::from_fn(2, 2, |x, y| {
        LumaA([((x + 2 * y) * 60) as u16 * 257, 1000])
    });
    let la16_png = sub.join("d_gray_alpha16.png");
    la16.save(&la16_png).unwrap();
    let la16_expected = RgbImage::from_fn(2, 2, |x, y| {
        let v = ((x + 2 * y) * 60) as u8;
        Rgb([v, v, v])
    });
    files.push((la16_png, Some(la16_expected)));

    // RGBA: alpha is dropped.
    let rgba = ImageBuffer::<Rgba<u8>, _>::from_fn(5, 4, |x, y| {
        Rgba([(x * 10) as u8, (y * 20) as u8, 77, (x * 40) as u8])
    });
    let rgba_png = dir.join("e_rgba.png");
    rgba.save(&rgba_png).unwrap();
    files.push((rgba_png, Some(pattern(5, 4))));

    // JPEG (lossy: a flat colour, compared with a tolerance).
    let flat = RgbImage::from_pixel(16, 16, Rgb([200, 100, 50]));
    let jpeg = dir.join("f_flat.JPEG");
    flat.save_with_format(&jpeg, image::ImageFormat::Jpeg)
        .unwrap();
    files.push((jpeg.clone(), None));
    let jpg = dir.join("g_flat.jpg");
    fs::copy(&jpeg, &jpg).unwrap();
    files.push((jpg, None));

    let bmp = dir.join("h_rgb.bmp");
    rgb.save(&bmp).unwrap();
    files.push((bmp, Some(rgb.clone())));

    let tif = dir.join("i_rgb.TIF");
    rgb.save_with_format(&tif, image::ImageFormat::Tiff)
        .unwrap();
    files.push((tif, Some(rgb.clone())));
    let tiff = sub.join("j_rgb.tiff");
    rgb.save(&tiff).unwrap();
    files.push((tiff, Some(rgb.clone())));

    // A name that is not UTF-8 (Latin-1 "é") is listed like any other.
    #[cfg(unix)]
    {
        use std::os::unix::ffi::OsStrExt;
        let name = std::ffi::OsStr::from_bytes(b"k_caf\xe9.png");
        let latin1 = dir.join(name);
        rgb.save_with_format(&latin1, image::ImageFormat::Png)
            .unwrap();
        files.push((latin1, Some(rgb.clone())));
    }

    // Not listed: other extensions and hidden files.
    fs::write(dir.join("notes.txt"), "not an image").unwrap();
    fs::write(dir.join("._a_rgb.png"), "macOS resource fork").unwrap();
    let hidden = dir.join(".cache");
    fs::create_dir(&hidden).unwrap();
    rgb.save(hidden.join("thumb.png")).unwrap();

    files.sort_by(|a, b| a.0.cmp(&b.0));
    files
}

fn assert_flat_jpeg(image: &RgbImage) {
    assert_eq!(image.dimensions(), (16, 16));
    for (got, want) in image.get_pixel(8, 8).0.iter().zip([200u8, 100, 50]) {
        assert!(got.abs_diff(want) <= 3, "{:?}", image.get_pixel(8, 8));
    }
}

#[test]
fn image_folder_reads_every_format_as_rgb() {
    let tmp = TempDir::new().unwrap();
    let files = write_image_files(tmp.path());
    let folder = ImageFolder::open(tmp.path()).unwrap();
    let expected_paths: Vec<PathBuf> = files.iter().map(|(p, _)| p.clone()).collect();
    assert_eq!(folder.paths(), expected_paths.as_slice());
    assert_eq!(folder.len(), files.len());
    assert!(folder.skipped().is_empty());
    assert_eq!(folder.root(), tmp.path());
    for (index, (path, expected)) in files.iter().enumerate() {
        assert_eq!(folder.name(index), path.display().to_string());
        let image = folder.get(index).unwrap();
        match expected {
            Some(expected) => assert_eq!(&image, expected, "{}", path.display()),
            None => assert_flat_jpeg(&image),
        }
    }
    match folder.get(files.len()) {
        Err(Error::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument, got {:?}", other.err()),
    }
}

/// Writes two good PNGs, a truncated PNG and a text file named `.jpg`; returns the paths of
/// the two bad files.
fn write_corrupt_folder(dir: &Path) -> (PathBuf, PathBuf) {
    pattern(8, 8).save(dir.join("good_1.png")).unwrap();
    pattern(9, 9).save(dir.join("good_2.png")).unwrap();
    let truncated = dir.join("truncated.png");
    pattern(64, 64).save(&truncated).unwrap();
    let bytes = fs::read(&truncated).unwrap();
    fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let text = dir.join("text.jpg");
    fs::write(&text, "this is not a JPEG file\n").unwrap();
    (truncated, text)
}

#[test]
fn image_folder_strict_reports_unreadable_files_on_get() {
    let tmp = TempDir::new().unwrap();
    let (truncated, text) = write_corrupt_folder(tmp.path());
    let folder = ImageFolder::open(tmp.path()).unwrap();
    assert_eq!(folder.len(), 4);
    assert!(folder.skipped().is_empty());
    for bad in [&truncated, &text] {
        let index = folder.paths().iter().position(|p| p == bad).unwrap();
        let err = folder.get(index).unwrap_err();
        let message = err.to_string();
        match err {
            Error::Image { path, reason } => {
                assert_eq!(&path, bad);
                assert!(!reason.is_empty());
            }
            other => panic!("expected Error::Image, got {other:?}"),
        }
        assert!(message.contains(&bad.display().to_string()), "{message}");
    }
    for good in ["good_1.png", "good_2.png"] {
        let index = folder
            .paths()
            .iter()
            .position(|p| p.ends_with(good))
            .unwrap();
        folder.get(index).unwrap();
    }
}

#[test]
fn image_folder_lenient_skips_unreadable_files_with_reasons() {
    let tmp = TempDir::new().unwrap();
    let (truncated, text) = write_corrupt_folder(tmp.path());
    let folder = ImageFolder::open_with(tmp.path(), FolderOptions::lenient()).unwrap();
    assert_eq!(folder.len(), 2);
    for index in 0..folder.len() {
        folder.get(index).unwrap();
    }
    let skipped: Vec<&Path> = folder.skipped().iter().map(|s| s.path.as_path()).collect();
    assert_eq!(skipped, vec![text.as_path(), truncated.as_path()]);
    for s in folder.skipped() {
        assert!(!s.reason.is_empty(), "{s:?}");
    }
}

#[test]
fn image_folder_missing_directory_is_an_error_naming_it() {
    let tmp = TempDir::new().unwrap();
    let missing = tmp.path().join("nope");
    match ImageFolder::open(&missing) {
        Err(Error::Io { path, .. }) => assert_eq!(path, missing),
        other => panic!("expected Error::Io, got {:?}", other.err()),
    }
}

#[test]
fn image_folder_one_class_split() {
    let tmp = TempDir::new().unwrap();
    let dirs: Vec<PathBuf> = ["train", "normal", "anomalous", "empty"]
        .iter()
        .map(|d| {
            let path = tmp.path().join(d);
            fs::create_dir(&path).unwrap();
            path
        })
        .collect();
    for (dir, count) in dirs.iter().zip([3, 2, 4, 0]) {
        for i in 0..count {
            pattern(4, 4).save(dir.join(format!("{i}.png"))).unwrap();
        }
    }
    let open = |i: usize| ImageFolder::open(&dirs[i]).unwrap();

    let split = ImageFolder::one_class(open(0), open(1), Some(open(2))).unwrap();
    assert_eq!(split.train.len(), 3);
    assert_eq!(split.test.len(), 6);
    assert_eq!(
        split.test_anomalous,
        vec![false, false, true, true, true, true]
    );
    assert!(split.test.name(0).contains("normal"));
    assert!(split.test.name(5).contains("anomalous"));
    split.test.get(5).unwrap();

    let split = ImageFolder::one_class(open(0), open(1), None).unwrap();
    assert_eq!(split.test_anomalous, vec![false, false]);

    let (path, _, _) = dataset_error(
        ImageFolder::one_class(open(3), open(1), None)
            .err()
            .unwrap(),
    );
    assert_eq!(path, dirs[3]);
}

// ------------------------------------------------------------------------------------------
// MVTec AD
// ------------------------------------------------------------------------------------------

/// `<root>/bottle` (train/good 3, test/good 2, test/broken 2, test/contamination 1,
/// ground_truth), `<root>/cable` (1 + 1), `<root>/license` (no train/good).
fn write_mvtec(root: &Path) {
    let images = [
        ("bottle/train/good", 3),
        ("bottle/test/good", 2),
        ("bottle/test/broken", 2),
        ("bottle/test/contamination", 1),
        ("bottle/ground_truth/broken", 2),
        ("cable/train/good", 1),
        ("cable/test/good", 1),
        ("license/misc", 1),
    ];
    for (dir, count) in images {
        let dir = root.join(dir);
        fs::create_dir_all(&dir).unwrap();
        for i in 0..count {
            pattern(4, 4).save(dir.join(format!("{i:03}.png"))).unwrap();
        }
    }
    fs::write(root.join("readme.txt"), "MVTec AD").unwrap();
}

#[test]
fn mvtec_categories_and_split() {
    let tmp = TempDir::new().unwrap();
    write_mvtec(tmp.path());
    assert_eq!(
        MvtecAd::categories(tmp.path()).unwrap(),
        vec!["bottle".to_string(), "cable".to_string()]
    );

    let split: OneClassSplit =
        MvtecAd::one_class(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    assert_eq!(split.train.len(), 3);
    assert_eq!(split.test.len(), 5);
    // Folders in sorted order: broken, contamination, good.
    assert_eq!(split.test_anomalous, vec![true, true, true, false, false]);
    assert!(split.test.name(0).contains("broken"));
    assert!(split.test.name(2).contains("contamination"));
    assert!(split.test.name(3).contains("good") && split.test.name(4).contains("good"));
    assert!(
        (0..split.test.len()).all(|i| !split.test.name(i).contains("ground_truth")),
        "ground_truth must be ignored"
    );
    assert_eq!(split.test.get(0).unwrap(), pattern(4, 4));
    assert!(split.description.contains("bottle"));

    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    let folders: Vec<(&str, usize)> = mvtec.test_folders().map(|(n, f)| (n, f.len())).collect();
    assert_eq!(
        folders,
        vec![("broken", 2), ("contamination", 1), ("good", 2)]
    );
    assert_eq!(mvtec.category(), "bottle");
    assert_eq!(mvtec.train().len(), 3);
}

#[test]
fn mvtec_missing_pieces_are_errors_naming_the_path() {
    let tmp = TempDir::new().unwrap();
    write_mvtec(tmp.path());
    let (path, _, message) = dataset_error(
        MvtecAd::one_class(tmp.path(), "zipper", FolderOptions::default())
            .err()
            .unwrap(),
    );
    assert_eq!(path, tmp.path().join("zipper"));
    assert!(message.contains("bottle, cable"), "{message}");

    let (path, _, _) = dataset_error(
        MvtecAd::one_class(tmp.path(), "license", FolderOptions::default())
            .err()
            .unwrap(),
    );
    assert_eq!(path, tmp.path().join("license/train/good"));

    fs::remove_dir_all(tmp.path().join("cable/test")).unwrap();
    let (path, _, _) = dataset_error(
        MvtecAd::one_class(tmp.path(), "cable", FolderOptions::default())
            .err()
            .unwrap(),
    );
    assert_eq!(path, tmp.path().join("cable/test"));

    assert!(matches!(
        MvtecAd::categories(tmp.path().join("nowhere")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn mvtec_lenient_skips_corrupt_test_images() {
    let tmp = TempDir::new().unwrap();
    write_mvtec(tmp.path());
    let bad = tmp.path().join("bottle/test/broken/bad.png");
    fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();

    let strict = MvtecAd::one_class(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    assert_eq!(strict.test.len(), 6);
    let index = (0..6)
        .find(|&i| strict.test.name(i) == bad.display().to_string())
        .unwrap();
    assert!(matches!(strict.test.get(index), Err(Error::Image { .. })));

    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::lenient()).unwrap();
    let skipped: Vec<_> = mvtec.skipped().map(|s| s.path.clone()).collect();
    assert_eq!(skipped, vec![bad]);
    let split = mvtec.into_split().unwrap();
    assert_eq!(split.test.len(), 5);
    for i in 0..split.test.len() {
        split.test.get(i).unwrap();
    }
}

/// `write_mvtec`'s layout with MVTec AD masks for bottle's anomalous test images: 4×4, 255 on
/// the pixels of `mask_pixels(name)`.
fn write_mvtec_masks(root: &Path) {
    write_mvtec(root);
    for (defect, stem) in [
        ("broken", "000"),
        ("broken", "001"),
        ("contamination", "000"),
    ] {
        let dir = root.join("bottle/ground_truth").join(defect);
        fs::create_dir_all(&dir).unwrap();
        mask_image(defect, stem)
            .save(dir.join(format!("{stem}_mask.png")))
            .unwrap();
    }
}

/// The anomalous (x, y) pixels of a test mask.
fn mask_pixels(defect: &str, stem: &str) -> Vec<(u32, u32)> {
    match (defect, stem) {
        ("broken", "000") => vec![(0, 0), (1, 0), (3, 2)],
        ("broken", "001") => vec![(2, 3)],
        _ => vec![(1, 1), (2, 1), (1, 2), (2, 2)],
    }
}

fn mask_image(defect: &str, stem: &str) -> ImageBuffer<Luma<u8>, Vec<u8>> {
    let mut mask = ImageBuffer::from_pixel(4, 4, Luma([0u8]));
    for (x, y) in mask_pixels(defect, stem) {
        mask.put_pixel(x, y, Luma([255]));
    }
    mask
}

#[test]
fn mvtec_masks_follow_the_test_images() {
    let tmp = TempDir::new().unwrap();
    write_mvtec_masks(tmp.path());
    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    assert_eq!(mvtec.test_len(), 5);
    let expected = [
        Some(("broken", "000")),
        Some(("broken", "001")),
        Some(("contamination", "000")),
        None,
        None,
    ];
    let split = mvtec.clone().into_split().unwrap();
    assert_eq!(split.test.len(), mvtec.test_len());
    for (i, expected) in expected.into_iter().enumerate() {
        let mask = mvtec.test_mask(i).unwrap();
        assert_eq!(mask.dim(), (4, 4), "image {i}");
        let path = mvtec.test_mask_path(i).unwrap();
        assert_eq!(split.test_anomalous[i], expected.is_some());
        match expected {
            Some((defect, stem)) => {
                assert_eq!(
                    path,
                    Some(
                        tmp.path()
                            .join(format!("bottle/ground_truth/{defect}/{stem}_mask.png"))
                    )
                );
                assert!(split.test.name(i).contains(&format!("{defect}/{stem}.png")));
                let mut want = ndarray::Array2::from_elem((4, 4), false);
                for (x, y) in mask_pixels(defect, stem) {
                    want[[y as usize, x as usize]] = true;
                }
                assert_eq!(mask, want, "image {i}");
            }
            None => {
                assert_eq!(path, None);
                assert!(
                    mask.iter().all(|&m| !m),
                    "a good image's mask is all normal"
                );
            }
        }
    }
    assert!(matches!(
        mvtec.test_mask(5),
        Err(Error::InvalidArgument { .. })
    ));
    assert!(mvtec.test_mask_path(5).is_err());
}

#[test]
fn mvtec_mask_pixels_above_zero_are_anomalous() {
    let tmp = TempDir::new().unwrap();
    write_mvtec_masks(tmp.path());
    // A grey, 16-bit-free mask with values 1 and 128: both anomalous.
    let mut mask = ImageBuffer::from_pixel(4, 4, Luma([0u8]));
    mask.put_pixel(0, 3, Luma([1]));
    mask.put_pixel(3, 0, Luma([128]));
    mask.save(tmp.path().join("bottle/ground_truth/broken/001_mask.png"))
        .unwrap();
    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    let mask = mvtec.test_mask(1).unwrap();
    assert_eq!(mask.iter().filter(|&&m| m).count(), 2);
    assert!(mask[[3, 0]] && mask[[0, 3]]);
}

#[test]
fn mvtec_missing_mask_is_an_error_naming_the_expected_path() {
    let tmp = TempDir::new().unwrap();
    write_mvtec_masks(tmp.path());
    let missing = tmp
        .path()
        .join("bottle/ground_truth/contamination/000_mask.png");
    fs::remove_file(&missing).unwrap();
    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    let (path, _, message) = dataset_error(mvtec.test_mask(2).unwrap_err());
    assert_eq!(path, missing);
    assert!(message.contains("contamination"), "{message}");
    // The other masks still read.
    mvtec.test_mask(0).unwrap();
    mvtec.test_mask(3).unwrap();
}

#[test]
fn mvtec_mask_of_another_size_is_an_error_naming_both_sizes() {
    let tmp = TempDir::new().unwrap();
    write_mvtec_masks(tmp.path());
    let wrong = tmp.path().join("bottle/ground_truth/broken/000_mask.png");
    ImageBuffer::from_pixel(5, 3, Luma([255u8]))
        .save(&wrong)
        .unwrap();
    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    let (path, _, message) = dataset_error(mvtec.test_mask(0).unwrap_err());
    assert_eq!(path, wrong);
    assert!(
        message.contains("5x3") && message.contains("4x4"),
        "{message}"
    );

    let corrupt = tmp.path().join("bottle/ground_truth/broken/001_mask.png");
    fs::write(&corrupt, b"\x89PNG\r\n\x1a\n truncated").unwrap();
    match mvtec.test_mask(1) {
        Err(Error::Image { path, .. }) => assert_eq!(path, corrupt),
        other => panic!("expected an image error naming the mask, got {other:?}"),
    }
}

#[test]
fn mvtec_masks_feed_the_pixel_metrics() {
    let tmp = TempDir::new().unwrap();
    write_mvtec_masks(tmp.path());
    let mvtec = MvtecAd::open(tmp.path(), "bottle", FolderOptions::default()).unwrap();
    let masks: Vec<_> = (0..mvtec.test_len())
        .map(|i| mvtec.test_mask(i).unwrap())
        .collect();
    // A perfect map: the mask itself.
    let maps: Vec<_> = masks
        .iter()
        .map(|m| m.mapv(|a| if a { 1.0f32 } else { 0.0 }))
        .collect();
    let maps: Vec<_> = maps.iter().map(|m| m.view()).collect();
    let masks: Vec<_> = masks.iter().map(|m| m.view()).collect();
    assert_eq!(msad::metrics::pixel_roc_auc(&maps, &masks).unwrap(), 1.0);
    let pro = msad::metrics::pro_auc(&maps, &masks, 0.3).unwrap();
    assert!((pro - 1.0).abs() < 1e-12, "{pro}");
}

// ------------------------------------------------------------------------------------------
// Digits
// ------------------------------------------------------------------------------------------

/// Records of scikit-learn's `load_digits()` (index, target, `images[index].ravel()`).
const SKLEARN_RECORDS: [(usize, u8, [u8; 64]); 3] = [
    (
        0,
        0,
        [
            0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0, 0, 4,
            12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0, 0, 2, 14, 5, 10,
            12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0,
        ],
    ),
    (
        1000,
        1,
        [
            0, 0, 1, 14, 2, 0, 0, 0, 0, 0, 0, 16, 5, 0, 0, 0, 0, 0, 0, 14, 10, 0, 0, 0, 0, 0, 0,
            11, 16, 1, 0, 0, 0, 0, 0, 3, 14, 6, 0, 0, 0, 0, 0, 0, 8, 12, 0, 0, 0, 0, 10, 14, 13,
            16, 8, 3, 0, 0, 2, 11, 12, 15, 16, 15,
        ],
    ),
    (
        1796,
        8,
        [
            0, 0, 10, 14, 8, 1, 0, 0, 0, 2, 16, 14, 6, 1, 0, 0, 0, 0, 15, 15, 8, 15, 0, 0, 0, 0, 5,
            16, 16, 10, 0, 0, 0, 0, 12, 15, 15, 12, 0, 0, 0, 4, 16, 6, 4, 16, 6, 0, 0, 8, 16, 10,
            8, 16, 8, 0, 0, 1, 8, 12, 14, 12, 1, 0,
        ],
    ),
];

#[test]
fn digits_match_scikit_learn() {
    let digits = Digits::load();
    assert_eq!(digits.images().len(), 1797);
    assert_eq!(digits.labels().len(), 1797);
    let mut counts = [0usize; 10];
    for &label in digits.labels() {
        counts[label as usize] += 1;
    }
    // numpy.bincount(load_digits().target)
    assert_eq!(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]);
    for (index, label, values) in SKLEARN_RECORDS {
        assert_eq!(digits.labels()[index], label, "record {index}");
        let image = &digits.images()[index];
        assert_eq!(image.dimensions(), (8, 8));
        for (p, &v) in values.iter().enumerate() {
            let gray = (f64::from(v) * 255.0 / 16.0).round() as u8;
            let pixel = image.get_pixel((p % 8) as u32, (p / 8) as u32).0;
            assert_eq!(pixel, [gray; 3], "record {index} pixel {p}");
        }
    }
}

#[test]
fn digits_one_class_split() {
    let digits = Digits::load();
    let split = digits.one_class(3).unwrap();
    // numpy.bincount(target[i % 3 != 0]) and (target[i % 3 == 0]) for digit 3: 122 and 61.
    assert_eq!(split.train.len(), 122);
    assert_eq!(split.test.len(), 599);
    assert_eq!(split.test_anomalous.len(), 599);
    assert_eq!(split.test_anomalous.iter().filter(|&&a| !a).count(), 61);
    for i in 0..split.train.len() {
        let name = split.train.name(i);
        let index: usize = name.strip_prefix("digits:train:").unwrap().parse().unwrap();
        assert!(!Digits::is_test(index));
        assert_eq!(digits.labels()[index], 3);
        assert_eq!(&split.train.get(i).unwrap(), &digits.images()[index]);
    }
    for (i, &anomalous) in split.test_anomalous.iter().enumerate() {
        let name = split.test.name(i);
        let index: usize = name.strip_prefix("digits:test:").unwrap().parse().unwrap();
        assert_eq!(index, 3 * i);
        assert_eq!(anomalous, digits.labels()[index] != 3);
    }
    let total_train: usize = (0..10)
        .map(|d| digits.one_class(d).unwrap().train.len())
        .sum();
    assert_eq!(total_train, 1198);
    assert!(matches!(
        digits.one_class(10),
        Err(Error::InvalidArgument { .. })
    ));
}

#[test]
fn a_folder_pairs_its_images_with_masks_and_names_a_mask_of_the_wrong_size() {
    let tmp = TempDir::new().unwrap();
    let (images, masks) = (tmp.path().join("images"), tmp.path().join("masks"));
    fs::create_dir_all(images.join("lot2")).unwrap();
    fs::create_dir_all(masks.join("lot2")).unwrap();
    for name in ["a.png", "lot2/b.png", "c.png"] {
        RgbImage::from_pixel(6, 4, image::Rgb([9, 9, 9]))
            .save(images.join(name))
            .unwrap();
    }
    // a: a 2-pixel defect; lot2/b: no mask file (all normal); c: a mask of the wrong size.
    let mut mask = ImageBuffer::from_pixel(6, 4, Luma([0u8]));
    mask.put_pixel(5, 0, Luma([255]));
    mask.put_pixel(0, 3, Luma([3]));
    mask.save(masks.join("a_mask.png")).unwrap();
    ImageBuffer::from_pixel(4, 6, Luma([255u8]))
        .save(masks.join("c_mask.png"))
        .unwrap();
    let folder = MaskedFolder::new(ImageFolder::open(&images).unwrap(), &masks).unwrap();
    assert_eq!(folder.len(), 3);
    assert_eq!(folder.mask_path(0).unwrap(), masks.join("a_mask.png"));
    assert_eq!(folder.mask_path(2).unwrap(), masks.join("lot2/b_mask.png"));
    let a = folder.mask(0).unwrap();
    assert_eq!(a.dim(), (4, 6));
    assert!(a[[0, 5]] && a[[3, 0]] && a.iter().filter(|&&m| m).count() == 2);
    match folder.mask(1) {
        Err(Error::Dataset { path, reason, .. }) => {
            assert_eq!(path, masks.join("c_mask.png"));
            assert!(reason.contains("4x6") && reason.contains("6x4"), "{reason}");
        }
        other => panic!("expected a size error naming the mask, got {other:?}"),
    }
    let b = folder.mask(2).unwrap();
    assert_eq!(b.dim(), (4, 6));
    assert!(b.iter().all(|&m| !m));
    assert!(matches!(folder.mask(3), Err(Error::InvalidArgument { .. })));
    assert_eq!(folder.get(2).unwrap().dimensions(), (6, 4));
    // A mistyped masks directory is an error, not all-normal masks.
    let typo = tmp.path().join("maks");
    match MaskedFolder::new(ImageFolder::open(&images).unwrap(), &typo) {
        Err(Error::Dataset { path, .. }) => assert_eq!(path, typo),
        other => panic!("expected an error naming the directory, got {other:?}"),
    }
}
