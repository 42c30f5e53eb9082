"""Time and peak memory of the vmapped fit as n, k, seeds and the hparam grid grow; checks the memory
model of ``w2s_jax.fit.estimate_bytes`` against measured peak RSS. Writes scaling.png and a table.
Each point runs in a fresh process so its peak RSS is its own.
Usage: python benchmarks/bench_scaling.py [--out benchmarks/scaling.png]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, resource, sys
sys.path.insert(0, {bench!r})
import jax, numpy as np
from _common import clustered
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.splits import stacked_splits
a = json.loads(sys.argv[1])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
feats, weak, labels, text = clustered(a["n"], a["d"], a["k"], np.random.default_rng(0))
grid = (("lr", tuple(np.geomspace(1e-2, 1e-3, a["grid"]).tolist())),)
cfg = FitConfig(store="x", weak="w", methods=("cpl",), seeds=a["seeds"], epochs=1, grid=grid)
data = fitlib.make_data(feats, weak, labels)
_, t = fitlib.fit_methods(cfg, data, stacked_splits(a["n"], a["seeds"]), text, a["k"])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{**a, **t, "peak_rss_mib": peak / 1024, "rss_before_data_mib": base / 1024,
                  "model_mib": fitlib.estimate_bytes(cfg, a["n"], a["d"], a["k"]) / 2**20}}))
"""
BASE = {"n": 20000, "d": 512, "k": 345, "seeds": 4, "grid": 1}
SWEEPS = {"n": [5000, 10000, 20000, 40000], "k": [50, 100, 200, 345], "seeds": [1, 2, 4, 8], "grid": [1, 2, 4, 8]}
TINY_BASE = {"n": 600, "d": 16, "k": 5, "seeds": 2, "grid": 1}  # --tiny: seconds, for the suite's smoke test
TINY_SWEEPS = {"n": [400, 600], "k": [3, 5], "seeds": [1, 2], "grid": [1, 2]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "scaling.png"))
    ap.add_argument("--tiny", action="store_true", help="two small points per axis (a smoke test, not a measurement)")
    args = ap.parse_args()
    base, sweeps = (TINY_BASE, TINY_SWEEPS) if args.tiny else (BASE, SWEEPS)
    here = os.path.dirname(os.path.abspath(__file__))
    rows, measured = [], {}  # the base point lies on every axis: measured once
    for axis, values in sweeps.items():
        for v in values:
            payload = json.dumps({**base, axis: v}, sort_keys=True)
            if payload not in measured:
                out = subprocess.run([sys.executable, "-c", CHILD.format(bench=here), payload],
                                     capture_output=True, text=True, cwd=os.path.dirname(here))
                if out.returncode:
                    raise SystemExit(f"the point {payload} failed:\n{out.stderr[-3000:]}")
                measured[payload] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"axis": axis, **measured[payload]})
    print("| varied | n | k | seeds | grid | models | run s | compile s | peak RSS MiB | RSS before data MiB "
          "| model MiB | measured − baseline MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['axis']} | {r['n']} | {r['k']} | {r['seeds']} | {r['grid']} | {r['seeds'] * r['grid']} "
              f"| {r['run_s']:.2f} | {r['compile_s']:.2f} | {r['peak_rss_mib']:.0f} | {r['rss_before_data_mib']:.0f} "
              f"| {r['model_mib']:.0f} | {r['peak_rss_mib'] - r['rss_before_data_mib']:.0f} |")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 4, figsize=(13, 5.5), dpi=110)
    for j, axis in enumerate(sweeps):
        pts = [r for r in rows if r["axis"] == axis]
        xs = [r[axis] for r in pts]
        axes[0, j].plot(xs, [r["run_s"] for r in pts], "o-")
        axes[0, j].set(title=f"vary {axis}", ylabel="run s (1 epoch)")
        axes[1, j].plot(xs, [r["peak_rss_mib"] - r["rss_before_data_mib"] for r in pts], "o-", label="measured")
        axes[1, j].plot(xs, [r["model_mib"] for r in pts], "s--", label="memory model")
        axes[1, j].set(xlabel=axis, ylabel="MiB above baseline")
        axes[1, j].legend(fontsize=7)
    fig.suptitle(f"vmapped fit (cpl), base n={base['n']} d={base['d']} k={base['k']} seeds={base['seeds']} "
                 f"grid={base['grid']}, {os.cpu_count()} CPU cores")
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")
    g = [r for r in rows if r["axis"] == "grid"]
    measured = (g[-1]["peak_rss_mib"] - g[0]["peak_rss_mib"]) / (g[-1]["grid"] - g[0]["grid"]) / base["seeds"]
    modelled = (g[-1]["model_mib"] - g[0]["model_mib"]) / (g[-1]["grid"] - g[0]["grid"]) / base["seeds"]
    print(f"time ratio grid {g[-1]['grid']}/{g[0]['grid']}: {g[-1]['run_s'] / g[0]['run_s']:.2f}x; "
          f"memory per model modelled/measured: {modelled:.1f}/{measured:.1f} MiB = {modelled / measured:.2f}x")


if __name__ == "__main__":
    main()
