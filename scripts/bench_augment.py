#!/usr/bin/env python3
"""torchvision's side of `cargo bench --bench augment`: the MoCo v2 training transform on PIL
images, two 224 px views per image, batch 64 (pairs/s), for 500x375 and 32x32 images, in one
process (as a DataLoader worker does) and, with --workers, over a process pool.

    .venv/bin/python scripts/bench_augment.py [--workers 2]
"""

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import torch
from PIL import Image

from side_by_side import moco


MOCO = {224: moco(224), 32: moco(32)}


def images(n, w, h):
    x, y = np.meshgrid(np.arange(w), np.arange(h))
    out = []
    for i in range(n):
        arr = np.stack([(x * 7 + i) % 256, (y * 5) % 256, ((x ^ y) * 3) % 256], -1).astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


def pairs(args):
    imgs, size = args
    t = MOCO[size]
    return torch.stack([t(im) for im in imgs]), torch.stack([t(im) for im in imgs])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for w, h, size in ((500, 375, 224), (32, 32, 224), (32, 32, 32)):
        imgs = images(64, w, h)
        if args.workers == 1:
            pairs((imgs, size))
            start, runs = time.perf_counter(), 0
            while time.perf_counter() - start < 10 or runs < 2:
                pairs((imgs, size))
                runs += 1
        else:
            with ProcessPoolExecutor(args.workers) as pool:
                chunks = [(imgs[i::args.workers], size) for i in range(args.workers)]
                list(pool.map(pairs, chunks))
                start, runs = time.perf_counter(), 0
                while time.perf_counter() - start < 10 or runs < 2:
                    list(pool.map(pairs, chunks))
                    runs += 1
        elapsed = time.perf_counter() - start
        print(f"{w}x{h} -> {size} px: {runs * 64 / elapsed:.1f} pairs/s ({args.workers} worker(s))")


if __name__ == "__main__":
    main()
