#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench detector`: latency of one image, decoded PIL image
(500 x 375) to normalised score, as a PyTorch user would run MSC's detector: torchvision's
evaluation transform, the model in eval mode under torch.no_grad() (eager), the L2-normalised
features, faiss IndexFlatL2 over a bank of 5,000 normal features (k = 2, score = sum of the
squared distances), and the anomalib-style normalisation. Median of --runs after a warm-up.

    scripts/.venv/bin/python scripts/bench_detector.py [--threads 2] [--runs 20]
"""

import argparse
import statistics
import time

import faiss
import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision import transforms

BANK_ROWS = 5000


def transform_for(arch: str):
    # The reference's evaluation transforms (msad's EvalTransform for 224 px).
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if arch in ("resnet18", "resnet34"):
        resize = transforms.Resize(224, interpolation=transforms.InterpolationMode.BICUBIC)
    else:
        resize = transforms.Resize(256)
    return transforms.Compose([resize, transforms.CenterCrop(224), transforms.ToTensor(), normalize])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--runs", type=int, default=20)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, faiss {faiss.__version__}, "
          f"{torch.get_num_threads()} threads")
    x, y = np.meshgrid(np.arange(500), np.arange(375))
    pixels = np.stack([x % 251, y % 241, (x * y) % 239], axis=-1).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    rng = np.random.default_rng(0)
    for arch in ("resnet18", "resnet152"):
        model = getattr(torchvision.models, arch)(weights=None).eval()
        model.fc = torch.nn.Identity()
        dim = 512 if arch == "resnet18" else 2048
        bank = rng.standard_normal((BANK_ROWS, dim)).astype(np.float32)
        bank /= np.linalg.norm(bank, axis=1, keepdims=True)
        index = faiss.IndexFlatL2(dim)
        index.add(bank)
        threshold, lo, hi = 1.0, 0.5, 1.5
        transform = transform_for(arch)

        def score() -> float:
            with torch.no_grad():
                phi = torch.nn.functional.normalize(model(transform(image).unsqueeze(0)), dim=1)
            distances, _ = index.search(phi.numpy(), 2)
            raw = float(distances.sum())
            return min(max(0.5 + (raw - threshold) / (hi - lo), 0.0), 1.0)

        score()  # warm-up
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            score()
            times.append(time.perf_counter() - start)
        print(f"{arch} bank {BANK_ROWS}: median {statistics.median(times) * 1e3:.1f} ms "
              f"(min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}) per image")


if __name__ == "__main__":
    main()
