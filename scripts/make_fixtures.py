#!/usr/bin/env python3
"""Writes the reference fixtures msad's tests compare against.

Everything here comes from PyTorch, torchvision, scikit-learn and PIL from PyPI; nothing is
downloaded besides those packages, and every file written is small (the whole set is a few MB).

    python3 -m venv .venv && .venv/bin/pip install -r scripts/requirements.txt
    .venv/bin/python scripts/make_fixtures.py            # all sections
    .venv/bin/python scripts/make_fixtures.py encoder    # one section

Outputs go to tests/fixtures/<section>/. The values depend on the seeds below only, so running
the script again rewrites the same numbers (up to PyTorch version differences in the last ulp).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"


def save_npy(path: Path, array) -> None:
    array = np.ascontiguousarray(np.asarray(array, dtype=np.float32))
    np.save(path, array)


# --------------------------------------------------------------------------------------------
# Encoder: torchvision-layout ResNets with reduced widths, their checkpoints and outputs.
# --------------------------------------------------------------------------------------------


class NarrowResNet(ResNet):
    """torchvision's ResNet with configurable stem and stage widths.

    Same modules, same key names, same forward (`ResNet._forward_impl`); only the widths that
    torchvision hard-codes (64 / 64, 128, 256, 512) are parameters, so checkpoints stay small.
    """

    def __init__(self, block, layers, stem, widths, num_classes=10):
        nn.Module.__init__(self)
        self._norm_layer = nn.BatchNorm2d
        self.inplanes = stem
        self.dilation = 1
        self.groups = 1
        self.base_width = 64
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


# name -> (block, layers, stem width, stage widths)
NARROW_NETS = {
    "narrow18": (BasicBlock, [2, 2, 2, 2], 8, [4, 8, 16, 32]),
    "narrow50": (Bottleneck, [3, 4, 6, 3], 8, [4, 8, 16, 32]),
    "narrow152": (Bottleneck, [3, 8, 36, 3], 4, [2, 4, 8, 16]),
}


def calibrate(model: nn.Module, generator: torch.Generator) -> None:
    """Gives every BatchNorm realistic running statistics and non-trivial affine parameters,
    so that eval-mode BatchNorm is really exercised by the parity tests.

    The last BatchNorm of each residual branch gets a small scale, as in trained ResNets: with
    unit scales a random 50-block net amplifies float32 rounding to 1e-3 (torch's own float32
    output then differs from its float64 output by that much), which would hide real errors.
    """
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None  # cumulative average over the calibration batches
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0.0, 0.1, generator=generator)
        for m in model.modules():
            last = m.bn3 if isinstance(m, Bottleneck) else m.bn2 if isinstance(m, BasicBlock) else None
            if last is not None:
                last.weight.uniform_(0.1, 0.3, generator=generator)
        model.train()
        for _ in range(4):
            model(torch.randn(8, 3, 48, 48, generator=generator))
        model.eval()


def make_encoder() -> None:
    out = FIXTURES / "encoder"
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(20230207)
    torch.manual_seed(20230207)
    # Odd, non-square images exercise padding, strides and the pooling.
    x = torch.randn(3, 3, 37, 45, generator=generator)
    save_npy(out / "input.npy", x)
    meta = {"input": list(x.shape), "nets": {}}
    for name, (block, layers, stem, widths) in NARROW_NETS.items():
        model = NarrowResNet(block, layers, stem, widths)
        calibrate(model, generator)
        state = model.state_dict()
        torch.save(state, out / f"{name}.pth")
        with torch.no_grad():
            # The reference values are computed in float64: the truth float32 implementations
            # (torchvision's and msad's) are both measured against.
            model.fc = nn.Identity()
            features = model.double()(x.double())
            embed = F.normalize(features, dim=1)
        save_npy(out / f"{name}_features.npy", features)
        save_npy(out / f"{name}_embed.npy", embed)
        meta["nets"][name] = {
            "block": block.__name__,
            "layers": layers,
            "stem_width": stem,
            "widths": widths,
            "feature_dim": features.shape[1],
        }
        if name == "narrow18":
            tensors = {k: v.contiguous() for k, v in state.items()}
            save_file(tensors, str(out / f"{name}.safetensors"))
            torch.save(state, out / f"{name}_legacy.pth", _use_new_zipfile_serialization=False)
            # Broken variants for the error-path tests.
            missing = {k: v for k, v in tensors.items() if k != "layer2.0.downsample.1.running_var"}
            save_file(missing, str(out / f"{name}_missing_key.safetensors"))
            wrong = dict(tensors)
            wrong["layer1.1.conv2.weight"] = torch.zeros(4, 4, 1, 1)
            save_file(wrong, str(out / f"{name}_wrong_shape.safetensors"))
            extra = dict(tensors)
            extra["layer2.1.conv1.bias"] = torch.zeros(8)
            save_file(extra, str(out / f"{name}_extra_key.safetensors"))
            half = {k: (v.half() if v.is_floating_point() else v) for k, v in tensors.items()}
            save_file(half, str(out / f"{name}_f16.safetensors"))

    # The full-size torchvision layouts, keys and shapes only (no weights), to check that
    # msad's layouts are torchvision's exactly.
    layouts = {}
    for arch in ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]:
        model = getattr(torchvision.models, arch)(weights=None)
        layouts[arch] = {k: list(v.shape) for k, v in model.state_dict().items()}
    (out / "torchvision_layouts.json").write_text(json.dumps(layouts, indent=0, sort_keys=True))
    meta["torch"] = torch.__version__
    meta["torchvision"] = torchvision.__version__
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    print(f"encoder fixtures written to {out}")


# --------------------------------------------------------------------------------------------
# Loss: the reference MSC loss (the authors' `contrastive_loss`, exp then log) in float64
# autograd, on inputs both sides generate bit-identically from a seed (tests/common/mod.rs has
# the same generator), so that only the outputs are stored.
# --------------------------------------------------------------------------------------------

MASK64 = (1 << 64) - 1


def splitmix_uniform(seed: int, count: int) -> list:
    """`count` floats uniform in [-1, 1) from SplitMix64, as tests/common/mod.rs computes them."""
    state = seed & MASK64
    out = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        z ^= z >> 31
        out.append((z >> 11) * (2.0 ** -53) * 2.0 - 1.0)
    return out


def unit_f32(row: list) -> list:
    """Row / its norm, summed sequentially in float64, then rounded to float32."""
    total = 0.0
    for v in row:
        total += v * v
    norm = total ** 0.5
    return [float(np.float32(v / norm)) for v in row]


def loss_case_inputs(b: int, d: int, seed: int, angular: bool):
    values = splitmix_uniform(seed, d * (2 * b + 1))
    base = values[:d]
    rows = [values[d * (1 + i): d * (2 + i)] for i in range(2 * b)]
    phi = [unit_f32([2.0 * x + y for x, y in zip(base, r)]) for r in rows]
    center = [0.0] * d
    for r in phi:
        for j, v in enumerate(r):
            center[j] += v
    center = [v / (2 * b) for v in center]
    center = unit_f32(center) if angular else [float(np.float32(v)) for v in center]
    return np.array(phi[:b], np.float32), np.array(phi[b:], np.float32), np.array(center, np.float32)


def reference_msc_loss(out_1, out_2, center, temperature, angular):
    """The authors' code: shift, `contrastive_loss` (exp, masked_select, log), angular term."""
    out_1 = out_1 - center
    out_2 = out_2 - center
    z1 = F.normalize(out_1, dim=-1)
    z2 = F.normalize(out_2, dim=-1)
    bs = z1.size(0)
    out = torch.cat([z1, z2], dim=0)
    sim_matrix = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = (torch.ones_like(sim_matrix) - torch.eye(2 * bs, dtype=sim_matrix.dtype)).bool()
    sim_matrix = sim_matrix.masked_select(mask).view(2 * bs, -1)
    pos_sim = torch.exp(torch.sum(z1 * z2, dim=-1) / temperature)
    pos_sim = torch.cat([pos_sim, pos_sim], dim=0)
    loss = (-torch.log(pos_sim / sim_matrix.sum(dim=-1))).mean()
    if angular:
        loss = loss + ((out_1 ** 2).sum(dim=1).mean() + (out_2 ** 2).sum(dim=1).mean())
    return loss


LOSS_CASES = [(b, d) for b in (2, 7, 64) for d in (3, 512, 2048)]


def make_loss() -> None:
    out = FIXTURES / "loss"
    out.mkdir(parents=True, exist_ok=True)
    index = []
    for b, d in LOSS_CASES:
        for angular in (False, True):
            seed = 1000 * b + d + (1 if angular else 0)
            phi1, phi2, center = loss_case_inputs(b, d, seed, angular)
            x1 = torch.tensor(phi1, dtype=torch.float64, requires_grad=True)
            x2 = torch.tensor(phi2, dtype=torch.float64, requires_grad=True)
            c = torch.tensor(center, dtype=torch.float64)
            loss = reference_msc_loss(x1, x2, c, 0.25, angular)
            loss.backward()
            name = f"b{b}_d{d}_{'angular' if angular else 'plain'}"
            save_npy(out / f"{name}_grad1.npy", x1.grad)
            save_npy(out / f"{name}_grad2.npy", x2.grad)
            index.append({
                "name": name, "b": b, "d": d, "seed": seed, "angular": angular,
                "temperature": 0.25, "loss": loss.item(),
                "center_head": [float(v) for v in center[:4]],
                "phi1_head": [float(v) for v in phi1[0, :4]],
            })
    (out / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"loss fixtures written to {out}")


# --------------------------------------------------------------------------------------------
# Metrics: scikit-learn's roc_auc_score and average_precision_score, ties included.
# --------------------------------------------------------------------------------------------


def make_metrics() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    out = FIXTURES / "metrics"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    # One-class protocol shape: one normal class of ten, anomalies scored higher on average.
    protocol_labels = rng.integers(0, 10, size=10000) != 3
    protocol_scores = rng.normal(size=10000) + 1.5 * protocol_labels
    cases = {
        "random_1000": (rng.normal(size=1000), rng.random(1000) < 0.3),
        # Scores rounded to a few levels: heavy ties, within and across classes.
        "ties_500": (np.round(rng.normal(size=500), 1), rng.random(500) < 0.5),
        "few_levels_300": (rng.integers(0, 4, size=300).astype(np.float64), rng.random(300) < 0.2),
        "protocol_10000": (protocol_scores, protocol_labels),
    }
    index = []
    for name, (scores, labels) in cases.items():
        scores = scores.astype(np.float32)
        np.save(out / f"{name}_scores.npy", scores)
        np.save(out / f"{name}_labels.npy", labels.astype(np.float32))
        index.append({
            "name": name,
            "roc_auc": float(roc_auc_score(labels, scores)),
            "average_precision": float(average_precision_score(labels, scores)),
        })
    (out / "cases.json").write_text(json.dumps(index, indent=1) + "\n")
    print(f"metrics fixtures written to {out}")


# --------------------------------------------------------------------------------------------
# Augmentation: torchvision's PIL path with explicit parameters, on small fixture images.
# --------------------------------------------------------------------------------------------


def augment_sources():
    """Two small RGB images: a smooth, colourful 61x47 one with noise, and a 32x32 one."""
    from PIL import Image

    rng = np.random.default_rng(11)
    y, x = np.mgrid[0:47, 0:61]
    a = np.stack([
        128 + 100 * np.sin(x / 7.0) * np.cos(y / 9.0),
        128 + 90 * np.cos((x + y) / 11.0),
        40 + 3 * x + rng.normal(0, 12, size=x.shape),
    ], axis=-1)
    b = rng.integers(0, 256, size=(32, 32, 3))
    b[8:24, 8:24] = [200, 40, 90]  # a saturated block: hue and saturation matter
    to_img = lambda arr: Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    return {"a": to_img(a), "b": to_img(b)}


def make_augment() -> None:
    import torchvision.transforms as T
    import torchvision.transforms.functional as TF
    from PIL import Image, ImageFilter

    out = FIXTURES / "augment"
    out.mkdir(parents=True, exist_ok=True)
    sources = augment_sources()
    for name, img in sources.items():
        img.save(out / f"src_{name}.png")
    cases = []

    def case(name, src, op, params, result):
        result.save(out / f"{name}.png")
        cases.append({"name": name, "src": src, "op": op, "params": params})

    bil, bic = T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC
    a, b = sources["a"], sources["b"]
    for filt, mode in (("bilinear", bil), ("bicubic", bic)):
        for w, h in ((23, 17), (100, 80), (61, 20)):
            case(f"resize_{filt}_{w}x{h}", "a", "resize", {"width": w, "height": h, "filter": filt},
                 TF.resize(a, [h, w], interpolation=mode))
        case(f"resize_shorter_{filt}_64", "b", "resize_shorter", {"size": 64, "filter": filt},
             TF.resize(b, 64, interpolation=mode))
        case(f"resize_shorter_{filt}_30", "a", "resize_shorter", {"size": 30, "filter": filt},
             TF.resize(a, 30, interpolation=mode))
    case("resized_crop", "a", "resized_crop",
         {"top": 5, "left": 7, "height": 30, "width": 40, "size": 32, "filter": "bilinear"},
         TF.resized_crop(a, 5, 7, 30, 40, [32, 32], interpolation=bil))
    case("crop", "a", "crop", {"top": 3, "left": 9, "height": 20, "width": 25}, TF.crop(a, 3, 9, 20, 25))
    case("center_crop_20", "a", "center_crop", {"size": 20}, TF.center_crop(a, [20, 20]))
    case("center_crop_padded", "b", "center_crop", {"size": 37}, TF.center_crop(b, [37, 37]))
    case("hflip", "a", "hflip", {}, TF.hflip(a))
    case("grayscale", "a", "grayscale", {}, TF.rgb_to_grayscale(a, num_output_channels=3))
    for src in ("a", "b"):
        img = sources[src]
        for f in (0.3, 0.7, 1.3, 1.8):
            case(f"brightness_{src}_{f}", src, "brightness", {"factor": f}, TF.adjust_brightness(img, f))
            case(f"contrast_{src}_{f}", src, "contrast", {"factor": f}, TF.adjust_contrast(img, f))
            case(f"saturation_{src}_{f}", src, "saturation", {"factor": f}, TF.adjust_saturation(img, f))
        for f in (-0.5, -0.1, 0.07, 0.1, 0.33):
            case(f"hue_{src}_{f}", src, "hue", {"factor": f}, TF.adjust_hue(img, f))
        for sigma in (0.1, 0.6, 1.3, 2.0):
            case(f"blur_{src}_{sigma}", src, "blur", {"sigma": sigma},
                 img.filter(ImageFilter.GaussianBlur(radius=sigma)))
    (out / "cases.json").write_text(json.dumps(cases, indent=1) + "\n")

    # ToTensor + Normalize, and the whole evaluation transform.
    norm = T.Compose([T.ToTensor(), T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    save_npy(out / "normalized_b.npy", norm(b))
    eval_152 = T.Compose([T.Resize(50, interpolation=bil), T.CenterCrop(40), norm])
    eval_18 = T.Compose([T.Resize(64, interpolation=bic), T.CenterCrop(64), norm])
    save_npy(out / "eval_bilinear_50_40_a.npy", eval_152(a))
    save_npy(out / "eval_bicubic_64_64_b.npy", eval_18(b))

    # torchvision's RandomResizedCrop.get_params statistics, for the sampling tests.
    torch.manual_seed(5)
    stats = {}
    for w, h in ((500, 375), (1000, 40), (32, 32)):
        img = Image.new("RGB", (w, h))
        area, log_ratio, fallback = [], [], 0
        draws = 20000
        for _ in range(draws):
            i, j, ch, cw = T.RandomResizedCrop.get_params(img, scale=[0.2, 1.0], ratio=[3 / 4, 4 / 3])
            area.append(ch * cw / (w * h))
            log_ratio.append(float(np.log(cw / ch)))
            fallback += int(i == (h - ch) // 2 and j == (w - cw) // 2 and (cw == w or ch == h))
        stats[f"{w}x{h}"] = {
            "draws": draws,
            "area_mean": float(np.mean(area)), "area_std": float(np.std(area)),
            "log_ratio_mean": float(np.mean(log_ratio)), "log_ratio_std": float(np.std(log_ratio)),
            "area_min": float(np.min(area)), "area_max": float(np.max(area)),
        }
    (out / "crop_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"augment fixtures written to {out}")


SECTIONS = {
    "encoder": make_encoder,
    "loss": make_loss,
    "metrics": make_metrics,
    "augment": make_augment,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sections", nargs="*", help=f"any of {', '.join(SECTIONS)} (default: all)")
    args = parser.parse_args()
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for name in args.sections or SECTIONS:
        SECTIONS[name]()


if __name__ == "__main__":
    sys.exit(main())
