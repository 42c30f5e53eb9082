"""A small grid three ways: one sequential ``w2s-run``, two ``--shard I/2`` processes in parallel then a plain
``w2s-run`` (the report), and ``w2s-run --ray`` on a local Ray cluster with 2 workers. Prints each one's wall time and
its ratio to the sequential run's, all measured in this run, on the same grid (the offline demo's two domains, each
with two weak models; every run in a fresh folder, the compilation cache off so that every way compiles its own).

On a 2-core machine two workers bound the ratio near 0.5, and what the units share (start-up, compiles, the report
at the end) keeps it above. Usage: python benchmarks/bench_scaleout.py [--limit 1500] [--seeds 5] [--json]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import machine

GRID = """
out = "{out}"
strong = "efficientnet-lite0@32"
[[data]]
dataset = "demo"
domains = ["mnist", "digits"]
weak = ["pixels@2", "pixels@3"]
limit = {limit}
[fit]
methods = {methods}
seeds = {seeds}
epochs = {epochs}
[extract]
num_workers = 0
[report]
cross_domain = true
"""


def timed(commands: list[list[str]]) -> float:
    """Seconds until every command of the list, started together, has finished (each must succeed)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for c in commands]
    for proc, command in zip(procs, commands):
        out = proc.communicate()[0]
        if proc.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{out[-3000:]}")
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--limit", type=int, default=1500, help="rows per split of each demo domain")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--methods", default="all", help="w2s-fit methods, comma-separated [default: all]")
    ap.add_argument("--no-ray", action="store_true", help="leave the Ray run out")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-scaleout-"))
    run = [sys.executable, "-m", "extract.experiment"]

    def experiment(name: str) -> str:
        path = folder / f"{name}.toml"
        path.write_text(GRID.format(out=folder / name, limit=args.limit, seeds=args.seeds, epochs=args.epochs,
                                    methods=json.dumps(args.methods.split(","))))
        return str(path)

    seconds = {"sequential": timed([[*run, experiment("sequential"), "--no-compile-cache"]])}
    shards = experiment("shards")
    seconds["2 shards + report"] = timed([[*run, shards, "--shard", f"{i}/2", "--no-compile-cache"] for i in (0, 1)]) \
        + timed([[*run, shards, "--no-compile-cache"]])
    if not args.no_ray:  # ray.init() starts a local cluster with a worker per core: 2 here
        seconds["Ray, local cluster"] = timed([[*run, experiment("ray"), "--no-compile-cache", "--ray"]])
    base = seconds["sequential"]
    print(f"machine: {machine()}; grid: 2 demo domains x 2 weak models, {args.limit} rows a split, every w2s-fit "
          f"method, {args.seeds} seeds, {args.epochs} epochs, cross-domain weak models, the report")
    for way, s in seconds.items():
        print(f"  {way:22s} {s:8.1f} s   {s / base:.2f} of sequential")
    if args.json:
        print(json.dumps({"machine": machine(), "seconds": seconds,
                          "ratios": {way: s / base for way, s in seconds.items()}}))


if __name__ == "__main__":
    main()
