"""Fit wall time against the number of JAX devices the model axis is sharded over.

On a CPU machine the devices are forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=D),
which share the same cores: this measures the sharding's overhead, not a speed-up. On a multi-GPU
machine run it with --real to use the visible accelerators.
Usage: python benchmarks/bench_devices.py [--devices 1,2,4] [--n 20000] [--seeds 4]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = """
import json, sys
sys.path.insert(0, {bench!r})
import jax, numpy as np
from _common import clustered
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.splits import stacked_splits
a = json.loads(sys.argv[1])
feats, weak, labels, text = clustered(a["n"], a["d"], a["k"], np.random.default_rng(0))
cfg = FitConfig(store="synthetic", weak="noisy", methods=tuple(a["methods"]), seeds=a["seeds"], epochs=a["epochs"])
data = fitlib.make_data(feats, weak, labels)
_, t = fitlib.fit_methods(cfg, data, stacked_splits(a["n"], a["seeds"]), text, a["k"])
print(json.dumps({{"devices": jax.device_count(), **t}}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--devices", default="1,2,4")
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--methods", default="kd+lp,cpl")
    ap.add_argument("--real", action="store_true", help="use the visible accelerators (no forced host devices)")
    args = ap.parse_args()
    here = os.path.dirname(os.path.abspath(__file__))
    payload = json.dumps({"n": args.n, "d": args.d, "k": args.k, "seeds": args.seeds, "epochs": args.epochs,
                          "methods": args.methods.split(",")})
    rows = []
    for d in map(int, args.devices.split(",")):
        env = dict(os.environ)
        if args.real:
            env.update(CUDA_VISIBLE_DEVICES=",".join(map(str, range(d))))
        else:
            env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={d}", JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, "-c", CHILD.format(bench=here), payload], env=env, check=True,
                             capture_output=True, text=True, cwd=os.path.dirname(here))
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["run_s"]
    print(f"n={args.n} d={args.d} k={args.k}, methods {args.methods}, {args.seeds} seeds, {args.epochs} epochs, "
          f"{os.cpu_count()} CPU cores")
    print("| devices | compile s | run s | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    for r in rows:
        speedup = base / r["run_s"]
        print(f"| {r['devices']} | {r['compile_s']:.2f} | {r['run_s']:.2f} | {speedup:.2f}x | "
              f"{speedup / (r['devices'] / rows[0]['devices']):.2f} |")
    print(f"run-time ratio {rows[-1]['devices']} devices / {rows[0]['devices']}: {rows[-1]['run_s'] / base:.2f}x")


if __name__ == "__main__":
    main()
