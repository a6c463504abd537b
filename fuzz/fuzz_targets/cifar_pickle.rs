//! Arbitrary bytes into the parser of the CIFAR python version (Python 2 cPickle files).
//!
//! Run from `fuzz/`: `cargo fuzz run cifar_pickle` (on stable:
//! `RUSTC_BOOTSTRAP=1 cargo fuzz run cifar_pickle`). The seeds in `corpus/cifar_pickle/` are
//! small valid pickles: two from `scripts/make_cifar_pickle.py --per-file 2` (cPickle layout,
//! CIFAR-10 and CIFAR-100) and one written by Python 3's pickle with protocol 4 from a numpy
//! array.
//!
//! Besides "no panic", it checks what a result promises: on success, at least one record,
//! every label in range, the pixels the interleaving of planar rows that appear as one run of
//! bytes in the input, a pickle that starts with PROTO and ends with STOP (dropping the STOP
//! makes it an error), and the same result on a second parse; on failure, an offset within the
//! input and a message that starts with it.

#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)] // the target uses part of the module only
#[path = "../../src/data/cifar_format.rs"]
mod cifar_format;

#[allow(dead_code)]
#[path = "../../src/data/cifar_pickle.rs"]
mod cifar_pickle;

use cifar_format::{IMAGE_BYTES, Layout, PLANE_BYTES};

fn check(data: &[u8], layout: Layout) {
    let fields = layout.label_fields();
    match cifar_pickle::parse(data, layout) {
        Ok(records) => {
            assert_eq!(data.first(), Some(&0x80), "PROTO first");
            assert_eq!(data.last(), Some(&b'.'), "STOP last");
            assert!(records.len() >= 1);
            let mut planes = vec![0u8; records.len() * IMAGE_BYTES];
            for index in 0..records.len() {
                let labels = records
                    .labels(index)
                    .expect("label bytes of a parsed record");
                let pixels = records.pixels(index).expect("pixels of a parsed record");
                assert_eq!(labels.len(), fields.len());
                assert_eq!(pixels.len(), IMAGE_BYTES);
                for (field, &value) in fields.iter().zip(labels) {
                    assert!(value < field.classes);
                }
                let row = &mut planes[index * IMAGE_BYTES..(index + 1) * IMAGE_BYTES];
                for p in 0..PLANE_BYTES {
                    for c in 0..3 {
                        row[c * PLANE_BYTES + p] = pixels[3 * p + c];
                    }
                }
            }
            assert!(records.labels(records.len()).is_none());
            assert!(records.pixels(records.len()).is_none());
            // The array's bytes are one string of the input, taken as they are.
            assert!(
                data.windows(planes.len()).any(|w| w == planes),
                "the planar rows are not a run of input bytes"
            );
            let error = cifar_pickle::parse(&data[..data.len() - 1], layout)
                .expect_err("a pickle without its STOP");
            assert!(error.offset().is_some_and(|o| o < data.len()));
            assert_eq!(cifar_pickle::parse(data, layout), Ok(records));
        }
        Err(error) => {
            let offset = error.offset().expect("parse errors carry an offset");
            assert!(
                offset <= data.len(),
                "offset {offset} beyond {}",
                data.len()
            );
            assert!(!error.reason().is_empty());
            assert_eq!(
                error.to_string(),
                format!("offset {offset}: {}", error.reason())
            );
        }
    }
}

fuzz_target!(|data: &[u8]| {
    check(data, Layout::Cifar10);
    check(data, Layout::Cifar100);
});
