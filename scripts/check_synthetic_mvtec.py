#!/usr/bin/env python3
"""Checks a data set in the MVTec AD layout, such as scripts/make_synthetic_mvtec.py writes.

    scripts/.venv/bin/python scripts/check_synthetic_mvtec.py DIR [--preview PNG]

For every category under DIR (a folder with train/good) it checks what src/data/mvtec.rs needs:

- train/good and test/good hold images, and test/ has at least one defect folder;
- every image under test/<defect>/ (defect != good) has ground_truth/<defect>/<stem>_mask.png,
  an 8-bit grayscale mask of the image's size, holding only 0 and 255, not all 0;
- test/good images have no mask (ground_truth has no good folder), and every mask and every
  ground_truth folder has its test image / test folder;

and prints per category the image counts and sizes and the mean masked share of the defect
images per defect kind. With --preview it also writes a contact sheet: one row per category,
a few defect images of each kind with their mask outlined in red. Exits with status 1 if any
check fails.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


def images_in(folder: Path) -> list[Path]:
    """The image files directly in `folder`, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def subfolders(folder: Path) -> list[str]:
    """The names of the subfolders of `folder`, sorted; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


def check_mask(image_path: Path, mask_path: Path, problems: list[str]) -> np.ndarray | None:
    """The boolean mask of `image_path` read from `mask_path`, or None after appending what is
    wrong with it to `problems`."""
    if not mask_path.is_file():
        problems.append(f"{image_path}: no mask {mask_path}")
        return None
    with Image.open(image_path) as image, Image.open(mask_path) as mask_image:
        size, mask_size, mode = image.size, mask_image.size, mask_image.mode
        mask = np.asarray(mask_image)
    if mode != "L":
        problems.append(f"{mask_path}: mode {mode}, not 8-bit grayscale L")
        return None
    if mask_size != size:
        problems.append(f"{mask_path}: {mask_size} but its image is {size}")
        return None
    values = set(np.unique(mask).tolist())
    if not values <= {0, 255}:
        others = sorted(values - {0, 255})[:5]
        problems.append(f"{mask_path}: values other than 0 and 255: {others}")
        return None
    if 255 not in values:
        problems.append(f"{mask_path}: empty mask")
        return None
    return mask == 255


def check_category(root: Path, problems: list[str]) -> dict[str, list[tuple[Path, np.ndarray]]]:
    """Checks the category folder `root`, appending problems to `problems`, prints its summary
    line and returns its defect images with their masks, per defect kind."""
    train = images_in(root / "train" / "good")
    good = images_in(root / "test" / "good")
    for folder, files in (("train/good", train), ("test/good", good)):
        if not files:
            problems.append(f"{root / folder}: no images")
    kinds = [name for name in subfolders(root / "test") if name != "good"]
    if not kinds:
        problems.append(f"{root / 'test'}: no defect folders")
    for name in subfolders(root / "ground_truth"):
        if name not in kinds:
            reason = "good test images must have no mask" if name == "good" else "no test images"
            problems.append(f"{root / 'ground_truth' / name}: {reason}")
    defects = {}
    counts = {}
    for kind in kinds:
        defects[kind] = []
        expected = set()
        images = images_in(root / "test" / kind)
        counts[kind] = len(images)
        for image_path in images:
            mask_path = root / "ground_truth" / kind / f"{image_path.stem}_mask.png"
            expected.add(mask_path)
            mask = check_mask(image_path, mask_path, problems)
            if mask is not None:
                defects[kind].append((image_path, mask))
        for orphan in images_in(root / "ground_truth" / kind):
            if orphan not in expected:
                problems.append(f"{orphan}: a mask without its image")
    sizes = set()
    modes = set()
    for path in train + good + [p for pairs in defects.values() for p, _ in pairs]:
        with Image.open(path) as image:
            sizes.add("x".join(map(str, image.size)))
            modes.add(image.mode)
    areas = ", ".join(
        f"{kind} {counts[kind]} ({100 * np.mean([m.mean() for _, m in pairs]):.2f}%)"
        if pairs else f"{kind} {counts[kind]} (no valid mask)"
        for kind, pairs in defects.items()) or "none"
    print(f"{root.name}: {len(train)} train, {len(good)} good test, defect test images "
          f"(mean mask area): {areas}; sizes {', '.join(sorted(sizes))}; "
          f"modes {', '.join(sorted(modes))}")
    return defects


def outlined(image_path: Path, mask: np.ndarray) -> np.ndarray:
    """The image at `image_path` as RGB uint8 with the boundary pixels of `mask` in red."""
    with Image.open(image_path) as image:
        pixels = np.array(image.convert("RGB"))
    edge = mask & ~binary_erosion(mask)
    pixels[edge] = (255, 0, 0)
    return pixels


def contact_sheet(defects: dict[str, dict[str, list[tuple[Path, np.ndarray]]]], per_kind: int,
                  path: Path) -> None:
    """Writes `path`: one row per category of up to `per_kind` images of each defect kind, each
    shown plain and with its mask outlined, on a white background."""
    rows = []
    for category in defects.values():
        row = []
        for pairs in category.values():
            for image_path, mask in pairs[:per_kind]:
                row += [outlined(image_path, np.zeros_like(mask)), outlined(image_path, mask)]
        if row:
            rows.append(row)
    side = max(t.shape[0] for row in rows for t in row)
    gap = max(2, side // 32)
    columns = max(len(row) for row in rows)
    sheet = np.full((len(rows) * (side + gap) + gap, columns * (side + gap) + gap, 3), 255,
                    np.uint8)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            y, x = gap + r * (side + gap), gap + c * (side + gap)
            sheet[y:y + tile.shape[0], x:x + tile.shape[1]] = tile
    Image.fromarray(sheet).save(path)


def main(argv: list[str]) -> int:
    """Checks the data set the command line names; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the data set folder")
    parser.add_argument("--preview", type=Path, help="write a contact sheet PNG here")
    parser.add_argument("--per-kind", type=int, default=2,
                        help="defect images of each kind per category on the contact sheet")
    args = parser.parse_args(argv)
    categories = sorted(p for p in args.root.iterdir() if (p / "train" / "good").is_dir())
    if not categories:
        print(f"{args.root}: no category folders with train/good", file=sys.stderr)
        return 1
    problems: list[str] = []
    defects = {root.name: check_category(root, problems) for root in categories}
    if args.preview:
        contact_sheet(defects, args.per_kind, args.preview)
        print(f"wrote {args.preview}")
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"{len(categories)} categories, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
