#!/usr/bin/env python3
"""msad and PyTorch side by side, interleaved: each round times PyTorch for a few seconds and
then msad's `throughput` example right after, so that both see the same machine. On a shared
VM the speed drifts by a third within minutes, and figures taken minutes apart compare the
machine, not the code. Prints one line per round with the ratio msad / PyTorch.

    cargo build --release --features openblas --example throughput
    .venv/bin/python scripts/bench_interleaved.py [--rounds 4] [--cases encoder-r18-32 train-224]

Cases: encoder-r18-32 (batch 64), encoder-r18-224 (32), encoder-r152-224 (8), train-32 (64),
train-224 (16); the shapes of `cargo bench --bench encoder` / `--bench train`.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision

sys.path.insert(0, str(Path(__file__).parent))
from bench_train import training_step  # noqa: E402

CASES = {
    "encoder-r18-32": ("encoder", "resnet18", 32, 64, 40),
    "encoder-r18-224": ("encoder", "resnet18", 224, 32, 4),
    "encoder-r152-224": ("encoder", "resnet152", 224, 8, 3),
    "train-32": ("train", "resnet18", 32, 64, 6),
    "train-224": ("train", "resnet18", 224, 16, 3),
}


def torch_step(work, arch, size, batch):
    """One batch of PyTorch's side, as scripts/bench_encoder.py and bench_train.py time it."""
    if work == "train":
        return training_step(size, batch)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    model.fc = torch.nn.Identity()
    x = torch.randn(batch, 3, size, size)

    def step():
        with torch.inference_mode():
            model(x)

    return step


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=6.0, help="PyTorch time per round")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--binary", action="append", default=None,
                        help="the throughput example, or NAME=PATH; repeat to time several "
                             "msad builds in each round (default target/release/examples/throughput)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    binaries = [
        b.split("=", 1) if "=" in b else ["msad", b]
        for b in (args.binary or ["target/release/examples/throughput"])
    ]
    print(f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), "
          f"{torch.get_num_threads()} threads; msad: {binaries}")
    for name in args.cases:
        work, arch, size, batch, iters = CASES[name]
        step = torch_step(work, arch, size, batch)
        step()  # warm-up
        ratios = {label: [] for label, _ in binaries}
        for _ in range(args.rounds):
            runs, start = 0, time.perf_counter()
            while time.perf_counter() - start < args.seconds or runs < 2:
                step()
                runs += 1
            reference = runs * batch / (time.perf_counter() - start)
            line = [f"torch {reference:.2f}"]
            for label, binary in binaries:
                cmd = [binary, work, "--arch", arch, "--size", str(size), "--batch", str(batch),
                       "--iters", str(iters)]
                ours = float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
                ratios[label].append(ours / reference)
                line.append(f"{label} {ours:.2f} ({ours / reference:.2f}x)")
            print(f"{name}: " + "  ".join(line), flush=True)
        for label, r in ratios.items():
            print(f"{name}: {label} / torch min {min(r):.2f}, median {np.median(r):.2f}, "
                  f"max {max(r):.2f}", flush=True)


if __name__ == "__main__":
    main()
