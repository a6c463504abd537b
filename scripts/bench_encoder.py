#!/usr/bin/env python3
"""torchvision's side of `cargo bench --bench encoder`: ResNet forward images/s, eval mode,
no grad, on this machine's CPU threads (default: all cores).

    .venv/bin/python scripts/bench_encoder.py [--threads 2]
"""

import argparse
import time

import torch
import torchvision

CASES = [("resnet18", 32, 64), ("resnet18", 224, 32), ("resnet152", 224, 8)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=10.0, help="time per case")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads")
    for arch, size, batch in CASES:
        model = getattr(torchvision.models, arch)(weights=None).eval()
        model.fc = torch.nn.Identity()
        x = torch.randn(batch, 3, size, size)
        with torch.inference_mode():
            model(x)  # warm-up
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or runs < 2:
                model(x)
                runs += 1
            elapsed = time.perf_counter() - start
        print(f"{arch} {size}px batch {batch}: {runs * batch / elapsed:.1f} images/s ({elapsed / runs * 1e3:.1f} ms/batch)")


if __name__ == "__main__":
    main()
