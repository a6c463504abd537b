#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench train`: one MSC training step (two MoCo v2 views per
image on PIL, ResNet-18 in eval mode, contrastive loss on shifted features, backward, SGD) at
32 px batch 64 and 224 px batch 16; pairs of views per second.

    .venv/bin/python scripts/bench_train.py [--threads 2]
"""

import argparse
import time

import numpy as np
import torch
import torchvision
from PIL import Image

from side_by_side import contrastive_loss, moco


def training_step(size, batch):
    """One MSC training step of ResNet-18 at `size` px on `batch` synthetic images, as a
    function to call repeatedly (`bench_interleaved.py` uses it too)."""
    src = 32 if size <= 32 else 256
    x, y = np.meshgrid(np.arange(src), np.arange(src))
    images = [Image.fromarray(np.stack([(x * 3 + i) % 256, (y * 5) % 256, (x ^ y) % 256], -1).astype(np.uint8))
              for i in range(batch)]
    transform = moco(size)
    model = torchvision.models.resnet18()
    model.fc = torch.nn.Identity()
    model.eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5, weight_decay=5e-5)
    center = torch.zeros(512)

    def step():
        x1 = torch.stack([transform(im) for im in images])
        x2 = torch.stack([transform(im) for im in images])
        out = torch.nn.functional.normalize(model(torch.cat([x1, x2])), dim=-1)
        loss = contrastive_loss(out[:batch] - center, out[batch:] - center)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size, batch in ((32, 64), (224, 16)):
        step = training_step(size, batch)
        step()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 20 or runs < 3:
            step()
            runs += 1
        elapsed = time.perf_counter() - start
        print(f"resnet18 {size}px batch {batch}: {runs * batch / elapsed:.2f} pairs/s")


if __name__ == "__main__":
    main()
