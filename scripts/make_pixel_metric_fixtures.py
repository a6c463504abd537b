"""Fixtures for msad's pixel metrics (`metrics::pixel_roc_auc`, `metrics::pro_auc`).

Writes small cases into tests/fixtures/metrics/pixel/: per case `<name>_maps.npy` (float32,
N x H x W anomaly maps), `<name>_masks.npy` (float32 0/1 ground truth, same shape) and
`cases.json` with the expected values:

- `pixel_roc_auc`: scikit-learn's `roc_auc_score(masks.ravel(), maps.ravel())`.
- `pro_auc_0_3` / `pro_auc_1_0`: the normalised area under the per-region overlap curve up to
  a false positive rate of 0.3 / 1.0, computed here independently from the definition of the
  MVTec AD paper (Bergmann et al., IJCV 2021, Sec. 5.2) as the MVTec AD evaluation code
  (`pro_curve_util.compute_pro`, `generic_util.trapezoid`) does: ground-truth regions are the
  8-connected components of each mask (scipy.ndimage.label with a 3 x 3 structure); the
  thresholds are every distinct map value; at a threshold t, FPR = normal pixels >= t / normal
  pixels (all images) and PRO = mean over all regions of |region & map >= t| / |region|; the
  curve starts at (0, 0), ends at (1, 1), is integrated with the trapezoid rule up to max_fpr
  (the point at max_fpr linearly interpolated) and divided by max_fpr.

Run with scripts/.venv/bin/python scripts/make_pixel_metric_fixtures.py (numpy, scipy,
scikit-learn).
"""

import json
from pathlib import Path

import numpy as np
from scipy import ndimage
from sklearn.metrics import roc_auc_score

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "metrics" / "pixel"


def pro_curve(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) at every distinct threshold, highest first, with (0, 0) and (1, 1) added."""
    structure = np.ones((3, 3), dtype=int)  # 8-connectivity
    fp_weight = np.zeros(maps.shape, dtype=np.float64)
    pro_weight = np.zeros(maps.shape, dtype=np.float64)
    regions = 0
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask > 0, structure=structure)
        regions += count
        fp_weight[i][labelled == 0] = 1.0
        for k in range(1, count + 1):
            region = labelled == k
            pro_weight[i][region] = 1.0 / region.sum()
    normal = fp_weight.sum()
    scores = maps.ravel().astype(np.float64)
    order = np.argsort(-scores, kind="stable")
    scores = scores[order]
    fpr = np.cumsum(fp_weight.ravel()[order]) / normal
    pro = np.cumsum(pro_weight.ravel()[order]) / regions
    # One point a threshold: the last pixel of each run of equal scores.
    last = np.append(np.diff(scores) != 0, True)
    fpr = np.minimum(fpr[last], 1.0)
    pro = np.minimum(pro[last], 1.0)
    return np.concatenate(([0.0], fpr, [1.0])), np.concatenate(([0.0], pro, [1.0]))


def area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max], y interpolated linearly at x_max."""
    total = 0.0
    for k in range(1, len(x)):
        x0, x1, y0, y1 = x[k - 1], x[k], y[k - 1], y[k]
        if x0 >= x_max:
            break
        if x1 > x_max:
            y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
            total += 0.5 * (y0 + y_at) * (x_max - x0)
            break
        total += 0.5 * (y0 + y1) * (x1 - x0)
    return total


def pro_auc(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    fpr, pro = pro_curve(maps, masks)
    return area(fpr, pro, max_fpr) / max_fpr


def pro_auc_by_thresholds(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> float:
    """The same value, slowly: the masks thresholded at each distinct value one by one."""
    regions = []
    for i, mask in enumerate(masks):
        labelled, count = ndimage.label(mask > 0, structure=np.ones((3, 3), dtype=int))
        regions += [(i, labelled == k) for k in range(1, count + 1)]
    normal = masks == 0
    x, y = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        predicted = maps >= t
        x.append((predicted & normal).sum() / normal.sum())
        y.append(np.mean([(predicted[i] & r).sum() / r.sum() for i, r in regions]))
    x.append(1.0)
    y.append(1.0)
    return area(np.array(x), np.array(y), max_fpr) / max_fpr


def blobs(rng: np.random.Generator, shape: tuple[int, int], count: int) -> np.ndarray:
    """A 0/1 mask of `count` random ellipses (some touching diagonally or merging)."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    mask = np.zeros(shape, dtype=bool)
    for _ in range(count):
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(1.0, 4.0), rng.uniform(1.0, 5.0)
        mask |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return mask


def make_cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(21)
    shape = (24, 32)  # H x W
    cases = {}

    # 3 images of 32 x 24: blob masks, maps = noise + signal on the blobs (one image normal).
    masks = np.stack([blobs(rng, shape, 3), blobs(rng, shape, 2), np.zeros(shape, bool)])
    maps = rng.normal(size=masks.shape) + 1.2 * masks
    cases["blobs_3x24x32"] = (maps, masks)

    # Heavy ties: maps rounded to a few levels.
    masks = np.stack([blobs(rng, shape, 2), blobs(rng, shape, 4), blobs(rng, shape, 1)])
    maps = np.round(rng.normal(size=masks.shape) + 0.8 * masks, 0)
    cases["ties_3x24x32"] = (maps, masks)

    # Diagonal-only contacts: two 8-connected regions that are four 4-connected ones.
    mask = np.zeros((8, 8), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True
    mask[5, 6] = mask[6, 5] = mask[6, 6] = True
    maps = rng.normal(size=(1, 8, 8)) + 1.0 * mask
    cases["diagonal_1x8x8"] = (maps, mask[None])

    # Regions of very different sizes, where per-region averaging differs from pixel recall.
    masks = np.zeros((2, 16, 20), bool)
    masks[0, 2:12, 2:14] = True  # one large region
    masks[1, 3, 4] = True  # single pixel
    masks[1, 10:12, 15:18] = True
    maps = rng.normal(size=masks.shape) + np.where(masks, 0.5, 0.0)
    maps[1][3, 4] += 3.0
    cases["sizes_2x16x20"] = (maps, masks)

    out = {}
    for name, (maps, masks) in cases.items():
        out[name] = (maps.astype(np.float32), masks.astype(bool))
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    index = []
    for name, (maps, masks) in make_cases().items():
        np.save(OUT / f"{name}_maps.npy", maps)
        np.save(OUT / f"{name}_masks.npy", masks.astype(np.float32))
        # The metrics see exactly the float32 values the Rust side reads.
        scores = maps.astype(np.float64)
        for max_fpr in (0.3, 1.0):
            fast = pro_auc(scores, masks, max_fpr)
            slow = pro_auc_by_thresholds(scores, masks, max_fpr)
            assert abs(fast - slow) < 1e-12, (name, max_fpr, fast, slow)
        index.append({
            "name": name,
            "shape": list(maps.shape),
            "regions": int(sum(ndimage.label(m, np.ones((3, 3), int))[1] for m in masks)),
            "pixel_roc_auc": float(roc_auc_score(masks.ravel(), scores.ravel())),
            "pro_auc_0_3": pro_auc(scores, masks, 0.3),
            "pro_auc_1_0": pro_auc(scores, masks, 1.0),
        })
    (OUT / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"pixel metric fixtures written to {OUT}")


if __name__ == "__main__":
    main()
