#!/usr/bin/env python3
"""Writes data/digits.bin: scikit-learn's copy of the UCI handwritten digits, compactly.

The data are the 1,797 8x8 images of `sklearn.datasets.load_digits()` (values 0..16), from
E. Alpaydin and C. Kaynak, "Optical Recognition of Handwritten Digits", UCI Machine Learning
Repository, 1998, https://doi.org/10.24432/C50P49, licensed CC BY 4.0. scikit-learn ships them
inside its wheel, so nothing is downloaded.

    /path/to/venv/bin/python scripts/make_digits.py     # needs scikit-learn and numpy

File layout (read by src/data/digits.rs, embedded with include_bytes!):

    bytes 0..8    magic b"MSADDIG1"
    bytes 8..12   record count, u32 little-endian (1797)
    then per record, in scikit-learn's order, 65 bytes:
        1 byte    the digit label 0..9
        64 bytes  the 8x8 pixels, row-major, values 0..16

Running the script again writes the same bytes.
"""

import struct
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "data" / "digits.bin"
MAGIC = b"MSADDIG1"


def main() -> None:
    digits = load_digits()
    images = np.asarray(digits.images)
    labels = np.asarray(digits.target)
    assert images.shape == (1797, 8, 8), images.shape
    assert labels.shape == (1797,), labels.shape
    pixels = images.astype(np.int64)
    # The pixel values are whole numbers stored as floats; refuse anything else.
    assert np.array_equal(pixels, images), "non-integer pixel values"
    assert pixels.min() >= 0 and pixels.max() <= 16, (pixels.min(), pixels.max())
    assert labels.min() >= 0 and labels.max() <= 9

    out = bytearray(MAGIC)
    out += struct.pack("<I", len(labels))
    for label, image in zip(labels, pixels):
        out.append(int(label))
        out += bytes(image.reshape(64).astype(np.uint8).tolist())

    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_bytes(bytes(out))
    counts = np.bincount(labels, minlength=10)
    print(f"wrote {OUT} ({len(out)} bytes, {len(labels)} records, label counts {counts.tolist()})")


if __name__ == "__main__":
    main()
