#!/usr/bin/env python3
"""Two or more msad builds side by side, interleaved: each round runs every case on every
build in turn (the order flips each round), so that all builds see the same machine (a shared
VM's speed drifts by a third within minutes). Prints each round's figures and, at the end,
each build's ratio to the first build (median and range over the rounds).

A case is either a `throughput` example run (images or pairs per second; higher is better) or
a criterion case of a bench binary (median time; lower is better). Example: the build before
and after a change, both in one target directory (only msad recompiles):

    git worktree add /tmp/old HEAD~1
    (cd /tmp/old && CARGO_TARGET_DIR=/tmp/old-target cargo build --release --example throughput)
    cargo build --release --example throughput
    python3 scripts/bench_builds_interleaved.py --rounds 4 \\
        --build old=/tmp/old-target/release --build new=target/release \\
        --throughput "encoder --size 32 --batch 64 --iters 40" \\
        --criterion "loss:loss/b64-d2048/flex"

`--build NAME=DIR` names a build by its cargo output directory (`target/release`): the
`throughput` example is `DIR/examples/throughput`, a bench binary `DIR/deps/BENCH-*` (the newest
executable of that name). `--criterion BENCH:FILTER` runs the case whose id matches FILTER.
"""

import argparse
import glob
import os
import re
import shlex
import statistics
import subprocess

UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6, "us": 1e-6, "ns": 1e-9}


def bench_binary(build_dir: str, bench: str) -> str:
    """The newest executable `DIR/deps/BENCH-HASH`."""
    found = [
        p
        for p in glob.glob(os.path.join(build_dir, "deps", f"{bench}-*"))
        if os.access(p, os.X_OK) and not p.endswith(".d") and os.path.isfile(p)
    ]
    if not found:
        raise SystemExit(f"no bench binary {bench} under {build_dir}/deps (cargo bench --no-run)")
    return max(found, key=os.path.getmtime)


def run_throughput(build_dir: str, args: str) -> float:
    out = subprocess.run(
        [os.path.join(build_dir, "examples", "throughput"), *shlex.split(args)],
        check=True, capture_output=True, text=True,
    ).stdout
    return float(out.strip().splitlines()[-1])


def run_criterion(build_dir: str, spec: str, seconds: float) -> float:
    bench, case = spec.split(":", 1)
    out = subprocess.run(
        [bench_binary(build_dir, bench), "--bench", f"^{re.escape(case)}$", "--warm-up-time", "1",
         "--measurement-time", str(seconds), "--noplot"],
        check=True, capture_output=True, text=True,
    ).stdout
    m = re.search(r"time:\s+\[\S+ \S+ (\S+) (\S+)", out)
    if not m:
        raise SystemExit(f"criterion case {spec} printed no time:\n{out}")
    return float(m.group(1)) * UNITS[m.group(2)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--build", action="append", required=True, help="NAME=DIR")
    parser.add_argument("--throughput", action="append", default=[], help="example arguments")
    parser.add_argument("--criterion", action="append", default=[], help="BENCH:CASE")
    parser.add_argument("--seconds", type=float, default=4.0, help="criterion measurement time")
    args = parser.parse_args()
    builds = [b.split("=", 1) for b in args.build]
    cases = [("throughput", t) for t in args.throughput] + [("criterion", c) for c in args.criterion]
    # results[case][build] = list over rounds
    results = {c: {name: [] for name, _ in builds} for c in cases}
    for r in range(args.rounds):
        order = builds if r % 2 == 0 else builds[::-1]
        for case in cases:
            kind, spec = case
            line = []
            for name, build_dir in order:
                if kind == "throughput":
                    v = run_throughput(build_dir, spec)
                    line.append(f"{name} {v:.2f}/s")
                else:
                    v = run_criterion(build_dir, spec, args.seconds)
                    line.append(f"{name} {v * 1e3:.3f} ms")
                results[case][name].append(v)
            print(f"round {r + 1} {kind} {spec}: " + ", ".join(line), flush=True)
    base = builds[0][0]
    print()
    for case, by_build in results.items():
        kind, spec = case
        for name, _ in builds[1:]:
            # Speed of `name` over the base build: > 1 means `name` is faster.
            ratios = [
                (v / b) if kind == "throughput" else (b / v)
                for v, b in zip(by_build[name], by_build[base])
            ]
            print(
                f"{kind} {spec}: {name} / {base} speed {statistics.median(ratios):.3f} "
                f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} rounds)"
            )


if __name__ == "__main__":
    main()
