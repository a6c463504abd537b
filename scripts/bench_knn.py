#!/usr/bin/env python3
"""faiss-cpu's side of `cargo bench --bench knn`: IndexFlatL2, N = 5000, Q = 10000, k = 2,
unit-norm float32 rows, D = 2048 and 512, plus single-query latency at D = 2048.

    .venv/bin/python scripts/bench_knn.py
"""

import time

import faiss
import numpy as np


def unit_rows(rows: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).uniform(-1, 1, size=(rows, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def timed(fn, min_seconds: float = 5.0, min_runs: int = 3) -> float:
    fn()  # warm-up
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds or runs < min_runs:
        fn()
        runs += 1
    return (time.perf_counter() - start) / runs


def main() -> None:
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    n, q, k = 5000, 10000, 2
    for d in (2048, 512):
        bank, queries = unit_rows(n, d, 1), unit_rows(q, d, 2)
        index = faiss.IndexFlatL2(d)
        index.add(bank)
        t = timed(lambda: index.search(queries, k), min_seconds=10)
        print(f"n{n} q{q} d{d}: {t:.3f} s")
    d = 2048
    index = faiss.IndexFlatL2(d)
    index.add(unit_rows(n, d, 1))
    one = unit_rows(1, d, 3)
    t = timed(lambda: index.search(one, k), min_seconds=3, min_runs=50)
    print(f"n{n} q1 d{d}: {t * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
