"""Compile time with and without JAX's persistent compilation cache (w2s_jax.compile_cache), side by side, split
into its phases (tracing, lowering, XLA: fit.compile_phases), how compile time grows with the number of methods
(one method against every built-in one, cache off), and what size buckets cost (fit.bucket_size).

Each fit runs in a fresh process (the in-memory jit cache would hide the disk cache otherwise): first with an
empty cache folder (cold), then again with the folder it filled (warm), then a store one row smaller or larger in
the same size bucket with that folder (it loads the program), then with the cache off. Shape: the demo's
(n=2,500, d=1,280, k=10, batch 64, 10 epochs, every method x 5 seeds), synthetic data.
Usage: python benchmarks/bench_compile_cache.py [--n 2500 --d 1280 --k 10 --epochs 10 --seeds 5 --repeats 3]
       python benchmarks/bench_compile_cache.py --methods-scaling [--seeds 2 --epochs 1]   (#21's target: <= 1.5x)
       python benchmarks/bench_compile_cache.py --padding-cost [--n 3700 --d 512 --k 345 --batch 512]
         (run time padded to the bucket against unpadded, --no-bucket; 3,700 rows pad by 10.7%, DomainNet's 11%)
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
feats, weak, labels, text = clustered({rows}, {d}, {k}, np.random.default_rng(0))  # one dataset: the same text
feats, weak, labels = feats[:{n}], weak[:{n}], labels[:{n}]
methods = {methods!r} or jax_methods()
cfg = FitConfig(store="synthetic", weak="noisy", methods=methods, seeds={seeds}, epochs={epochs}, batch_size={batch},
                bucket={bucket!r})
_, t = fitlib.fit_methods(cfg, fitlib.make_data(feats, weak, labels), stacked_splits({n}, {seeds}), text, {k})
print(json.dumps(t))
"""


def run_child(args, cache, methods=(), n=None, bucket=True) -> dict:
    code = CHILD.format(bench=str(Path(__file__).parent), cache=cache, n=n or args.n, rows=args.n + 1, d=args.d,
                        k=args.k,
                        seeds=args.seeds, epochs=args.epochs, batch=args.batch, methods=tuple(methods), bucket=bucket)
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
    ap.add_argument("--methods-scaling", action="store_true",
                    help="compile time of one method (ce+lp) against every built-in method, cache off")
    ap.add_argument("--padding-cost", action="store_true",
                    help="run time of the fit padded to its size bucket against unpadded (--no-bucket), cache off")
    args = ap.parse_args()
    from _common import bucket_neighbour, machine

    print(f"machine: {machine()}")
    if args.methods_scaling:
        return methods_scaling(args)
    if args.padding_cost:
        return padding_cost(args)
    other = bucket_neighbour(args.n)
    rows = {"cache off": [], "cold cache": [], "warm cache": [], f"warm cache, another store of the bucket "
            f"(n={other})": []}
    for _ in range(args.repeats):
        rows["cache off"].append(run_child(args, ""))
        with tempfile.TemporaryDirectory() as folder:
            rows["cold cache"].append(run_child(args, folder))
            rows["warm cache"].append(run_child(args, folder))
            rows[list(rows)[-1]].append(run_child(args, folder, n=other))
    print(f"shape: n={args.n} d={args.d} k={args.k}, batch {args.batch}, {args.epochs} epochs, every method x "
          f"{args.seeds} seeds; {args.repeats} fresh processes each, interleaved")
    print("| | compile (s), median [min-max] | of it: trace / lower / XLA (s), medians | run (s), median |")
    print("|---|---|---|---|")
    for name, timings in rows.items():
        c = np.array([t["compile_s"] for t in timings])
        r = np.array([t["run_s"] for t in timings])
        phases = " / ".join(f"{np.median([t['compile_phases'][p] for t in timings]):.2f}"
                            for p in ("trace_s", "lower_s", "xla_s"))
        print(f"| {name} | {np.median(c):.2f} [{c.min():.2f}-{c.max():.2f}] | {phases} | {np.median(r):.2f} |")
    print("trace: Python to jaxpr; lower: jaxpr to StableHLO (both needed for the cache key); XLA: its passes and, on "
          "a GPU, GEMM autotuning, or the load from a warm cache")


def side_by_side(args, variants: dict, what: str, key: str) -> list[float]:
    """Cache off, fresh processes, interleaved: each variant's fit (``{name: run_child keywords}``), printed as a
    table of compile and run time; returns each variant's median of ``key`` ("compile_s" or "run_s")."""
    rows = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, keywords in variants.items():
            rows[name].append(run_child(args, "", **keywords))
    print(f"shape: n={args.n} d={args.d} k={args.k}, batch {args.batch}, {args.epochs} epochs, {args.seeds} seeds, "
          f"cache off; {args.repeats} fresh processes each, interleaved")
    print(f"| {what} | compile (s), median [min-max] | run (s), median [min-max] |")
    print("|---|---|---|")
    for name, timings in rows.items():
        c, r = (np.array([t[f] for t in timings]) for f in ("compile_s", "run_s"))
        print(f"| {name} | {np.median(c):.2f} [{c.min():.2f}-{c.max():.2f}] | {np.median(r):.2f} "
              f"[{r.min():.2f}-{r.max():.2f}] |")
    return [float(np.median([t[key] for t in timings])) for timings in rows.values()]


def padding_cost(args) -> None:
    """The fit padded to its size bucket against the unpadded fit (--no-bucket), every method."""
    from w2s_jax.fit import bucket_size

    padded, unpadded = side_by_side(args, {f"padded to {bucket_size(args.n):,} rows": {"bucket": True},
                                           "unpadded (--no-bucket)": {"bucket": False}}, "every method", "run_s")
    print(f"run time, padded / unpadded: {padded / unpadded:.2f}x "
          f"(rows padded / real: {bucket_size(args.n) / args.n:.3f})")


def methods_scaling(args) -> None:
    """Compile time of ``ce+lp`` alone and of every built-in method."""
    from w2s_jax.methods import jax_methods

    one, every = side_by_side(args, {"ce+lp alone": {"methods": ("ce+lp",)},
                                     f"all {len(jax_methods())} built-in methods": {}}, "methods", "compile_s")
    print(f"compile time, all methods / one method: {every / one:.2f}x (target <= 1.5x)")


if __name__ == "__main__":
    main()
