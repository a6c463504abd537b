#!/usr/bin/env python3
"""PyTorch's side of `cargo bench --bench loss`: the reference MSC loss (the authors'
`contrastive_loss` on features shifted by the center), forward + backward with autograd,
B = 64, D = 512 and 2048.

    .venv/bin/python scripts/bench_loss.py [--threads 2]
"""

import argparse
import time

import torch
import torch.nn.functional as F


def contrastive_loss(out_1, out_2, temperature=0.25):
    out_1 = F.normalize(out_1, dim=-1)
    out_2 = F.normalize(out_2, dim=-1)
    bs = out_1.size(0)
    out = torch.cat([out_1, out_2], dim=0)
    sim_matrix = torch.exp(torch.mm(out, out.t().contiguous()) / temperature)
    mask = (torch.ones_like(sim_matrix) - torch.eye(2 * bs, device=sim_matrix.device)).bool()
    sim_matrix = sim_matrix.masked_select(mask).view(2 * bs, -1)
    pos_sim = torch.exp(torch.sum(out_1 * out_2, dim=-1) / temperature)
    pos_sim = torch.cat([pos_sim, pos_sim], dim=0)
    return (-torch.log(pos_sim / sim_matrix.sum(dim=-1))).mean()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    b = 64
    for d in (512, 2048):
        p1 = F.normalize(torch.randn(b, d), dim=1)
        p2 = F.normalize(torch.randn(b, d), dim=1)
        center = p1.mean(0)

        def step():
            x1 = p1.clone().requires_grad_()
            x2 = p2.clone().requires_grad_()
            loss = contrastive_loss(x1 - center, x2 - center)
            loss.backward()
            return (x1.grad + x2.grad).sum().item()

        for _ in range(20):
            step()
        runs, start = 0, time.perf_counter()
        while time.perf_counter() - start < 5 or runs < 100:
            step()
            runs += 1
        print(f"fwd+bwd b{b} d{d}: {(time.perf_counter() - start) / runs * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
