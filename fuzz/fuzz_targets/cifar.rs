//! Arbitrary bytes into the CIFAR-10 and CIFAR-100 record parsers.
//!
//! Run from `fuzz/`: `cargo fuzz run cifar` (on stable: `RUSTC_BOOTSTRAP=1 cargo fuzz run cifar`).
//! Besides "no panic", it checks what a successful parse promises: a whole number of records,
//! every label in range, and the planes interleaved in R, G, B order.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // the target uses part of the module only
#[path = "../../src/data/cifar_format.rs"]
mod cifar_format;

use cifar_format::{FormatError, IMAGE_BYTES, Layout, PLANE_BYTES, parse};

fn check(data: &[u8], layout: Layout) {
    let record_bytes = layout.record_bytes();
    let fields = layout.label_fields();
    match parse(data, layout) {
        Ok(records) => {
            assert!(!data.is_empty());
            assert_eq!(records.len() * record_bytes, data.len());
            for index in 0..records.len() {
                let labels = records
                    .labels(index)
                    .expect("label bytes of a parsed record");
                let pixels = records.pixels(index).expect("pixels of a parsed record");
                assert_eq!(labels.len(), fields.len());
                assert_eq!(pixels.len(), IMAGE_BYTES);
                let record = &data[index * record_bytes..(index + 1) * record_bytes];
                assert_eq!(labels, &record[..fields.len()]);
                for (field, &value) in fields.iter().zip(labels) {
                    assert!(value < field.classes);
                }
                let planes = &record[fields.len()..];
                for p in 0..PLANE_BYTES {
                    for c in 0..3 {
                        assert_eq!(pixels[3 * p + c], planes[c * PLANE_BYTES + p]);
                    }
                }
            }
            assert!(records.labels(records.len()).is_none());
            assert!(records.pixels(records.len()).is_none());
        }
        Err(error) => {
            let message = error.to_string();
            assert!(!message.is_empty());
            match error {
                FormatError::Empty => assert!(data.is_empty()),
                FormatError::PartialRecord {
                    len,
                    record_bytes: r,
                } => {
                    assert_eq!(len, data.len());
                    assert_eq!(r, record_bytes);
                    assert_ne!(len % r, 0);
                }
                FormatError::LabelOutOfRange {
                    record,
                    field,
                    value,
                    classes,
                } => {
                    assert_eq!(data.len() % record_bytes, 0);
                    assert!(value >= classes);
                    let position = fields
                        .iter()
                        .position(|f| f.name == field)
                        .expect("a field");
                    assert_eq!(data[record * record_bytes + position], value);
                    // Every earlier record is valid.
                    for earlier in data[..record * record_bytes].chunks_exact(record_bytes) {
                        for (f, &v) in fields.iter().zip(earlier) {
                            assert!(v < f.classes);
                        }
                    }
                }
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, Layout::Cifar10);
    check(data, Layout::Cifar100);
});
