#!/usr/bin/env python3
"""Writes an MVTec-AD-layout anomaly-detection data set made from photographs scikit-image ships.

Each category is one texture photograph bundled inside the scikit-image wheel (nothing is
downloaded; the photographs are CC0 or without known copyright restrictions, see the
docstrings of `skimage.data`):

    brick    skimage.data.brick()                  grayscale, CC0 (CC0Textures Bricks25)
    grass    skimage.data.grass()                  grayscale, CC0 (DeviantArt linolafett)
    gravel   skimage.data.gravel()                 grayscale, CC0 (CC0Textures Gravel04)
    tissue   skimage.data.immunohistochemistry()   colour, colonic glands (CMMI)

Every image is a random square window of the photograph (random position, one of the eight
flips / 90-degree rotations), resized to --size pixels and saved as an RGB PNG (grayscale
photographs get three equal channels). The window's side in photograph pixels is fixed per
category, so every image shows the texture at the same scale. Training windows lie in the left
two thirds of the photograph and test windows in the right third, so test images are new views
of the texture.

Anomalous test images carry one synthetic defect, one folder per kind:

    scratch   one or two thin bright or dark curved lines
    stain     a soft-edged blob that darkens or lightens and tints the texture
    hole      a dark, roughly elliptical region with a darker rim
    foreign   an irregular patch cut from a different category's photograph

The defect's mask (8-bit grayscale, 255 = defect, 0 = normal) holds exactly the pixels whose
blend weight is above 0.5; pixels the defect changes at all lie inside the central 7/8 of the
image, and the masked area is 0.5%-8% of the image at any --size. The output is the layout
src/data/mvtec.rs reads:

    <out>/<category>/train/good/000.png ...
    <out>/<category>/test/good/000.png ...
    <out>/<category>/test/<defect>/000.png ...
    <out>/<category>/ground_truth/<defect>/000_mask.png

Each image draws from its own random stream, seeded by --seed, the category, the folder and the
index, so a run writes the same bytes every time and an image does not depend on the counts or
on which categories are written. The script replaces the train/, test/ and ground_truth/ folders
of each category it writes.

Needs numpy, scipy, pillow and scikit-image (scripts/requirements.txt). Two uses:

1. The small fixture committed for msad's tests (tests/fixtures/synthetic_mvtec/, about 420 KB;
   grass is left out to keep it small):

    scripts/.venv/bin/python scripts/make_synthetic_mvtec.py --out tests/fixtures/synthetic_mvtec \\
        --size 64 --train 6 --test-good 2 --test-per-defect 1 --categories brick,gravel,tissue

2. A benchmark set at the usual 224-pixel input size (not committed; 60 training, 20 normal and
   40 anomalous test images per category, about 25 MB in all, some 25 seconds to write):

    scripts/.venv/bin/python scripts/make_synthetic_mvtec.py --out /tmp/synthetic_mvtec_224

scripts/check_synthetic_mvtec.py verifies a written set.
"""

import argparse
import math
import shutil
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image
from scipy.spatial import cKDTree
from skimage import data as skdata


@dataclass(frozen=True)
class Category:
    """A texture photograph and the side, in photograph pixels, of the window one image shows."""

    load: Callable[[], np.ndarray]
    window: int


CATEGORIES = {
    "brick": Category(skdata.brick, 160),
    "grass": Category(skdata.grass, 160),
    "gravel": Category(skdata.gravel, 128),
    "tissue": Category(skdata.immunohistochemistry, 128),
}

# The share of the photograph's width, from the left, that training windows come from.
TRAIN_SHARE = 2 / 3

# The masked area of a defect, as a share of the image, is kept within these bounds.
MIN_AREA = 0.005
MAX_AREA = 0.08


def load_photo(name: str) -> np.ndarray:
    """The photograph of category `name` as an (H, W, 3) uint8 array."""
    photo = np.asarray(CATEGORIES[name].load())
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    assert photo.ndim == 3 and photo.shape[2] == 3 and photo.dtype == np.uint8, photo.shape
    return photo


def rng_for(seed: int, *names: str | int) -> np.random.Generator:
    """A random stream determined by `seed` and `names` (strings hashed with CRC-32)."""
    words = [zlib.crc32(n.encode()) if isinstance(n, str) else n for n in names]
    return np.random.default_rng([seed, *words])


def crop(photo: np.ndarray, window: int, columns: tuple[int, int], size: int,
         rng: np.random.Generator) -> np.ndarray:
    """A random `window`-pixel square of `photo` whose columns lie in `columns` (start, stop),
    flipped / rotated by one of the eight symmetries of the square and resized to `size`
    pixels; float32 in [0, 1]."""
    start, stop = columns
    height = photo.shape[0]
    assert stop - start >= window and height >= window, (columns, photo.shape, window)
    x = int(rng.integers(start, stop - window + 1))
    y = int(rng.integers(0, height - window + 1))
    patch = photo[y:y + window, x:x + window]
    patch = np.rot90(patch, k=int(rng.integers(4)))
    if rng.integers(2):
        patch = patch[:, ::-1]
    image = Image.fromarray(np.ascontiguousarray(patch)).resize(
        (size, size), Image.Resampling.LANCZOS)
    return np.asarray(image, dtype=np.float32) / 255


def margin(size: int) -> int:
    """The border, in pixels, outside the central 7/8 of a `size`-pixel image."""
    return math.ceil(size / 16)


def place(size: int, reach: float, rng: np.random.Generator) -> np.ndarray | None:
    """A random centre (x, y) for a shape reaching `reach` pixels from it, such that every
    pixel the shape touches lies in the central 7/8 of the image; None if it cannot fit."""
    low = margin(size) + reach
    high = size - margin(size) - reach
    if low >= high:
        return None
    return rng.uniform(low, high, size=2)


def pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (x, y) coordinates of the pixel centres of a `size`-pixel image."""
    centres = np.arange(size, dtype=np.float64) + 0.5
    return np.meshgrid(centres, centres)


def blob_depth(size: int, radius: float, aspect: float, roughness: float, harmonics: int,
               edge: float, rng: np.random.Generator) -> np.ndarray | None:
    """How far, in pixels, each pixel lies inside a random blob (negative outside): an ellipse
    with mean radius `radius`, axis ratio `aspect` and a random orientation, whose boundary is
    pushed in and out by `harmonics` random angular harmonics of total relative amplitude
    `roughness`. The blob, grown by `edge` pixels, lies in the central 7/8 of the image; None
    if it does not fit."""
    amplitudes = rng.uniform(0.2, 1.0, harmonics) / np.arange(2, harmonics + 2)
    amplitudes *= roughness / amplitudes.sum()
    phases = rng.uniform(0, 2 * np.pi, harmonics)
    major, minor = radius * math.sqrt(aspect), radius / math.sqrt(aspect)
    centre = place(size, major * (1 + roughness + edge / minor), rng)
    if centre is None:
        return None
    angle = rng.uniform(0, np.pi)
    x, y = pixel_grid(size)
    dx, dy = x - centre[0], y - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    r = np.hypot(u / major, v / minor)
    theta = np.arctan2(v / minor, u / major)
    k = np.arange(2, harmonics + 2)[:, None, None]
    boundary = 1 + (amplitudes[:, None, None] * np.cos(k * theta + phases[:, None, None])).sum(0)
    # The distance inside the boundary along the ray, in pixels of the minor axis (a slight
    # underestimate along the major axis, so edges are never narrower than asked).
    return (boundary - r) * minor


def smoothstep(low: float, high: float, x: np.ndarray) -> np.ndarray:
    """0 below `low`, 1 above `high`, a smooth cubic in between."""
    t = np.clip((x - low) / (high - low), 0, 1)
    return t * t * (3 - 2 * t)


def random_tint(rng: np.random.Generator, saturation: tuple[float, float]) -> np.ndarray:
    """An RGB colour of random hue and a saturation drawn from `saturation`, brightest
    channel 1."""
    hue = rng.uniform(0, 1)
    s = rng.uniform(*saturation)
    channel = np.abs((hue * 6 + np.array([0, 4, 2])) % 6 - 3) - 1
    return (1 - s * (1 - np.clip(channel, 0, 1))).astype(np.float32)


def mean_colour(image: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """The RGB mean of `image` weighted by `weight` (not all zero)."""
    return (image * weight[:, :, None]).sum((0, 1)) / weight.sum()


def lighten(image: np.ndarray, weight: np.ndarray, rng: np.random.Generator,
            chance: float) -> bool:
    """Whether a defect over `weight` should lighten the texture rather than darken it, so
    that it stands out: yes where the texture there is dark (mean below 0.4), no where it is
    bright (above 0.5), and with probability `chance` in between."""
    brightness = mean_colour(image, weight).mean()
    return brightness < 0.4 or (brightness <= 0.5 and rng.uniform() < chance)


def scratch(image: np.ndarray, rng: np.random.Generator,
            others: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """One or two thin curved lines (cubic Bézier curves), all bright or all dark (whichever
    stands out from the texture under them, see `lighten`), thinning towards their ends,
    drawn with anti-aliased edges. Returns the defective image and its blend weight; None
    when a curve does not fit in the central 7/8."""
    size = image.shape[0]
    weight = np.zeros(image.shape[:2])
    x, y = pixel_grid(size)
    pixels = np.stack([x.ravel(), y.ravel()], axis=1)
    for _ in range(int(rng.integers(1, 3))):
        length = rng.uniform(0.35, 0.6) * size
        width = rng.uniform(1 / 80, 1 / 40) * size
        heading = rng.uniform(0, 2 * np.pi)
        turns = np.cumsum(rng.uniform(-0.6, 0.6, 3))
        steps = length / 3 * np.stack([np.cos(heading + turns), np.sin(heading + turns)], 1)
        control = np.vstack([[0, 0], np.cumsum(steps, axis=0)])
        t = np.linspace(0, 1, max(8, int(length * 4)))[:, None]
        curve = ((1 - t) ** 3 * control[0] + 3 * (1 - t) ** 2 * t * control[1]
                 + 3 * (1 - t) * t ** 2 * control[2] + t ** 3 * control[3])
        widths = np.maximum(1.5, width * (0.4 + 0.6 * np.sqrt(np.sin(np.pi * t[:, 0]))))
        curve -= (curve.min(0) + curve.max(0)) / 2
        reach = np.abs(curve).max(0) + widths.max() / 2 + 0.5
        low = margin(size) + reach
        high = size - margin(size) - reach
        if np.any(low >= high):
            return None
        curve += rng.uniform(low, high)
        # Pixels further than widths.max() / 2 + 1 from the curve are untouched (infinite
        # distance).
        bound = widths.max() / 2 + 1
        distance, nearest = cKDTree(curve).query(pixels, distance_upper_bound=bound)
        near = np.isfinite(distance)
        line = np.zeros(size * size)
        line[near] = np.clip(widths[nearest[near]] / 2 + 0.5 - distance[near], 0, 1)
        weight = np.maximum(weight, line.reshape(size, size))
    bright = lighten(image, weight, rng, 0.5)
    colour = rng.uniform(0.9, 1.0) if bright else rng.uniform(0.0, 0.1)
    strength = rng.uniform(0.8, 0.95)
    alpha = (strength * weight)[:, :, None]
    return image * (1 - alpha) + colour * alpha, weight


def stain(image: np.ndarray, rng: np.random.Generator,
          others: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """A soft-edged smooth blob in which the texture is tinted and darkened or lightened
    (lightened one time in three where `lighten` leaves the choice). Returns the defective
    image and its blend weight; None when the blob does not fit in the central 7/8."""
    size = image.shape[0]
    radius = rng.uniform(0.07, 0.14) * size
    soft = max(1.5, 0.25 * radius)
    depth = blob_depth(size, radius, rng.uniform(1, 1.8), rng.uniform(0.1, 0.25), 4, soft, rng)
    if depth is None:
        return None
    weight = smoothstep(-soft, soft, depth)
    tint = random_tint(rng, (0.35, 0.75))
    if lighten(image, weight, rng, 1 / 3):
        stained = image + (1 - image) * rng.uniform(0.45, 0.7) * tint
    else:
        stained = image * rng.uniform(0.4, 0.65) * tint
    w = weight[:, :, None]
    return image * (1 - w) + stained * w, weight


def hole(image: np.ndarray, rng: np.random.Generator,
         others: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """A roughly elliptical hole: the texture inside is flattened towards its mean colour and
    darkened to 30-45% of its brightness, and to a quarter of that at the rim, with a
    one-pixel anti-aliased edge. Returns the defective image and its blend weight; None when
    the hole does not fit in the central 7/8."""
    size = image.shape[0]
    radius = rng.uniform(0.05, 0.1) * size
    depth = blob_depth(size, radius, rng.uniform(1, 1.7), rng.uniform(0.03, 0.1), 3, 1, rng)
    if depth is None:
        return None
    weight = np.clip(depth + 0.5, 0, 1)
    rim = max(1.0, 0.25 * radius)
    # 1 on the boundary, falling to 0 at `rim` pixels inside.
    near_rim = 1 - smoothstep(0, rim, depth)
    darkening = rng.uniform(0.3, 0.45) * (1 - 0.75 * near_rim)
    # The bottom of the hole keeps a faint trace of the texture around its mean colour.
    inside = (0.35 * image + 0.65 * mean_colour(image, weight)) * darkening[:, :, None]
    w = weight[:, :, None]
    return image * (1 - w) + inside * w, weight


def foreign(image: np.ndarray, rng: np.random.Generator,
            others: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    """An irregular patch of a different photograph (one of `others`, cropped at its own
    category's scale and randomly flipped / rotated) pasted with a one-pixel anti-aliased
    edge. Returns the defective image and its blend weight; None when the patch does not fit
    in the central 7/8."""
    size = image.shape[0]
    radius = rng.uniform(0.07, 0.13) * size
    depth = blob_depth(size, radius, rng.uniform(1, 2), rng.uniform(0.25, 0.45), 6, 1, rng)
    if depth is None:
        return None
    weight = np.clip(depth + 0.5, 0, 1)
    source = sorted(others)[int(rng.integers(len(others)))]
    photo = others[source]
    patch = crop(photo, CATEGORIES[source].window, (0, photo.shape[1]), size, rng)
    w = weight[:, :, None]
    return image * (1 - w) + patch * w, weight


# The defect kinds, each drawn by a function of (image, rng, the other categories' photographs)
# that returns the defective image and its blend weight, or None when the drawn shape does not
# fit in the central 7/8.
DEFECTS = {
    "scratch": scratch,
    "stain": stain,
    "hole": hole,
    "foreign": foreign,
}


def add_defect(image: np.ndarray, kind: str, rng: np.random.Generator,
               others: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`image` with one defect of `kind` and its boolean mask (blend weight above 0.5),
    redrawn until the mask covers MIN_AREA..MAX_AREA of the image and everything the defect
    changes lies in the central 7/8."""
    size = image.shape[0]
    m = margin(size)
    for _ in range(1000):
        drawn = DEFECTS[kind](image, rng, others)
        if drawn is None:
            continue
        defective, weight = drawn
        mask = weight > 0.5
        if not MIN_AREA <= mask.mean() <= MAX_AREA:
            continue
        touched = weight > 0
        assert not touched[:m].any() and not touched[size - m:].any(), kind
        assert not touched[:, :m].any() and not touched[:, size - m:].any(), kind
        return defective, mask
    raise RuntimeError(f"could not draw a {kind} defect of the allowed area at size {size}")


def save_png(pixels: np.ndarray, path: Path) -> None:
    """Writes a float [0, 1] image (H, W, 3) or a boolean mask (H, W) as an 8-bit PNG."""
    if pixels.dtype == bool:
        image = Image.fromarray(pixels.astype(np.uint8) * 255)
    else:
        image = Image.fromarray(np.rint(np.clip(pixels, 0, 1) * 255).astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, optimize=True)


def stem(index: int, count: int) -> str:
    """The file stem of image `index` of `count`: zero-padded to at least three digits, so
    names sort in index order."""
    return f"{index:0{max(3, len(str(count - 1)))}d}"


def write_category(out: Path, name: str, args: argparse.Namespace) -> dict[str, float]:
    """Writes category `name` under `out` as `args` says; returns the mean masked share of the
    image per defect kind."""
    category = CATEGORIES[name]
    photo = load_photo(name)
    others = {other: load_photo(other) for other in CATEGORIES if other != name}
    width = photo.shape[1]
    split = round(width * TRAIN_SHARE)
    train_columns, test_columns = (0, split), (split, width)
    root = out / name
    for folder in ("train", "test", "ground_truth"):
        shutil.rmtree(root / folder, ignore_errors=True)
    for index in range(args.train):
        rng = rng_for(args.seed, name, "train", index)
        image = crop(photo, category.window, train_columns, args.size, rng)
        save_png(image, root / "train" / "good" / f"{stem(index, args.train)}.png")
    for index in range(args.test_good):
        rng = rng_for(args.seed, name, "good", index)
        image = crop(photo, category.window, test_columns, args.size, rng)
        save_png(image, root / "test" / "good" / f"{stem(index, args.test_good)}.png")
    areas = {}
    for kind in DEFECTS:
        shares = []
        for index in range(args.test_per_defect):
            rng = rng_for(args.seed, name, kind, index)
            image = crop(photo, category.window, test_columns, args.size, rng)
            defective, mask = add_defect(image, kind, rng, others)
            s = stem(index, args.test_per_defect)
            save_png(defective, root / "test" / kind / f"{s}.png")
            save_png(mask, root / "ground_truth" / kind / f"{s}_mask.png")
            shares.append(mask.mean())
        areas[kind] = float(np.mean(shares))
    return areas


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output root folder")
    parser.add_argument("--size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--train", type=int, default=60, help="training images per category")
    parser.add_argument("--test-good", type=int, default=20,
                        help="normal test images per category")
    parser.add_argument("--test-per-defect", type=int, default=10,
                        help="anomalous test images per defect kind and category")
    parser.add_argument("--categories", default=",".join(CATEGORIES),
                        help="comma-separated categories to write")
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    args = parser.parse_args(argv)
    args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = [c for c in args.categories if c not in CATEGORIES]
    if unknown or not args.categories:
        parser.error(f"unknown categories {unknown}; choose from {', '.join(CATEGORIES)}")
    if args.seed < 0:
        parser.error("--seed must not be negative")
    if args.size < 32:
        parser.error("--size must be at least 32")
    if args.train < 1 or args.test_good < 1 or args.test_per_defect < 1:
        parser.error("--train, --test-good and --test-per-defect must be at least 1")
    return args


def main(argv: list[str]) -> None:
    """Writes the categories the command line asks for, printing a line for each."""
    args = parse_args(argv)
    for name in args.categories:
        start = time.perf_counter()
        areas = write_category(args.out, name, args)
        mean_areas = ", ".join(f"{kind} {100 * share:.1f}%" for kind, share in areas.items())
        print(f"{name}: {args.train} train, {args.test_good} good + "
              f"{args.test_per_defect} x {len(DEFECTS)} defective test images of "
              f"{args.size}x{args.size} in {args.out / name} (mean defect area {mean_areas}; "
              f"{time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
