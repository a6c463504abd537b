#!/usr/bin/env python3
"""faiss and msad's kNN side by side, interleaved case by case: each round times faiss's
`IndexFlatL2` (median of 3 searches) and then the `knn` criterion bench's host case of each
given msad bench binary right after, so that all see the same machine (a shared VM's speed
drifts by a third within minutes). Prints one line per round with faiss's time over msad's.

    cargo bench --features openblas --bench knn --no-run   # prints the binary's path
    .venv/bin/python scripts/bench_knn_interleaved.py --rounds 3 \\
        --binary openblas=target/release/deps/knn-HASH1 --binary gemm=target/release/deps/knn-HASH2
"""

import argparse
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import faiss

sys.path.insert(0, str(Path(__file__).parent))
from bench_knn import unit_rows  # noqa: E402

UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6}


def criterion_median(binary: str, case: str) -> float:
    """The median time, in seconds, of one criterion case of the `knn` bench."""
    out = subprocess.run(
        [binary, "--bench", f"{case}/host", "--warm-up-time", "1", "--measurement-time", "4"],
        check=True, capture_output=True, text=True,
    ).stdout
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", out)
    return float(m.group(1)) * UNITS[m.group(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--binary", action="append", required=True, help="NAME=PATH")
    args = parser.parse_args()
    binaries = dict(b.split("=", 1) for b in args.binary)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    n, k = 5000, 2
    for q, d in ((10000, 2048), (10000, 512), (1, 2048)):
        index = faiss.IndexFlatL2(d)
        index.add(unit_rows(n, d, 1))
        queries = unit_rows(q, d, 2 if q > 1 else 3)
        index.search(queries, k)
        for r in range(args.rounds):
            times = []
            for _ in range(3 if q > 1 else 200):
                start = time.perf_counter()
                index.search(queries, k)
                times.append(time.perf_counter() - start)
            ref = statistics.median(times)
            line = f"n{n} q{q} d{d} round {r}: faiss {ref:.4f} s"
            for name, binary in binaries.items():
                ours = criterion_median(binary, f"n{n}-q{q}-d{d}")
                line += f"  {name} {ours:.4f} s ({ref / ours:.2f}x)"
            print(line, flush=True)


if __name__ == "__main__":
    main()
