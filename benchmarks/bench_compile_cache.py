"""Compile time with and without JAX's persistent compilation cache (w2s_jax.compile_cache), side by side.

Each fit runs in a fresh process (the in-memory jit cache would hide the disk cache otherwise): first with an
empty cache folder (cold), then again with the folder it filled (warm), then with the cache off. Shape: the demo's
(n=2,500, d=1,280, k=10, batch 64, 10 epochs, every method x 5 seeds), synthetic data.
Usage: python benchmarks/bench_compile_cache.py [--n 2500 --d 1280 --k 10 --epochs 10 --seeds 5 --repeats 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

CHILD = """
import json, sys
import numpy as np
sys.path.insert(0, {bench!r})
from _common import clustered
from w2s_jax import compile_cache, fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import jax_methods
from w2s_jax.splits import stacked_splits
if {cache!r}:
    compile_cache.enable({cache!r})
feats, weak, labels, text = clustered({n}, {d}, {k}, np.random.default_rng(0))
cfg = FitConfig(store="synthetic", weak="noisy", methods=jax_methods(), seeds={seeds}, epochs={epochs}, batch_size={batch})
_, t = fitlib.fit_methods(cfg, fitlib.make_data(feats, weak, labels), stacked_splits({n}, {seeds}), text, {k})
print(json.dumps(t))
"""


def run_child(args, cache) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), cache=cache, n=args.n, d=args.d, k=args.k,
                        seeds=args.seeds, epochs=args.epochs, batch=args.batch)
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    from _common import machine

    print(f"machine: {machine()}")
    rows = {"cache off": [], "cold cache": [], "warm cache": []}
    for _ in range(args.repeats):
        rows["cache off"].append(run_child(args, ""))
        with tempfile.TemporaryDirectory() as folder:
            rows["cold cache"].append(run_child(args, folder))
            rows["warm cache"].append(run_child(args, folder))
    print(f"shape: n={args.n} d={args.d} k={args.k}, batch {args.batch}, {args.epochs} epochs, every method x "
          f"{args.seeds} seeds; {args.repeats} fresh processes each, interleaved")
    print("| | compile (s), median [min-max] | run (s), median |")
    print("|---|---|---|")
    for name, timings in rows.items():
        c = np.array([t["compile_s"] for t in timings])
        r = np.array([t["run_s"] for t in timings])
        print(f"| {name} | {np.median(c):.2f} [{c.min():.2f}-{c.max():.2f}] | {np.median(r):.2f} |")


if __name__ == "__main__":
    main()
