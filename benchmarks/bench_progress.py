"""What the progress bar costs: the fit as one compiled call per epoch from a short Python loop (w2s-fit's
path, which reports after every epoch) against the whole run as a single compiled call (lax.scan over epochs).

Same methods, models, data and numbers; the difference is E dispatches and E small host syncs.
Usage: python benchmarks/bench_progress.py [--n 2500 --d 1280 --k 10 --batch 64 --epochs 10 --repeats 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import clustered, machine
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import jax_methods
from w2s_jax.splits import stacked_splits


def single_call(cfg, data, splits, text, k):
    """The whole run of every method x seed x hparam as one compiled program; returns (compile_s, run fn)."""
    groups = fitlib.make_groups(cfg.methods, k, text)
    specs, teacher_J = fitlib.teacher_plan(groups, cfg.grid_hparams(), cfg.hparams.refine_k)
    recipe = fitlib.recipe_of(cfg, splits.hold_train.shape[-1])
    rows = {g: fitlib.group_rows(grp, cfg.grid_hparams(), teacher_J[g]) for g, grp in groups.items()}
    keys = jax.random.key_data(fitlib.seed_keys(cfg.root_seed, cfg.seeds))
    splits = jax.tree.map(jnp.asarray, splits)

    def whole_run(states, kd, split, teachers):
        key = jax.random.wrap_key_data(kd)
        return jax.lax.scan(lambda st, e: fitlib.seed_epoch(groups, st, key, e, rows, data, split, recipe, teachers),
                            states, jnp.arange(cfg.epochs))

    def program(keys, data, splits):
        teachers = fitlib.seed_targets(specs, data, splits)
        states = {g: fitlib.start_seeds(grp, recipe, keys, rows[g], data, splits, teachers) for g, grp in groups.items()}
        return jax.lax.map(lambda args: whole_run(*args), (states, keys, splits, teachers))

    t0 = time.perf_counter()
    compiled = jax.jit(program).lower(keys, data, splits).compile()
    return time.perf_counter() - t0, lambda: jax.block_until_ready(compiled(keys, data, splits))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2500)
    ap.add_argument("--d", type=int, default=1280)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    feats, weak, labels, text = clustered(args.n, args.d, args.k, np.random.default_rng(0))
    data = fitlib.make_data(feats, weak, labels)
    splits = stacked_splits(args.n, args.seeds)
    cfg = FitConfig(store="synthetic", weak="synthetic", methods=jax_methods(), seeds=args.seeds, epochs=args.epochs,
                    batch_size=args.batch)
    print(f"machine: {machine()}\nshape: n={args.n}, d={args.d}, k={args.k}, batch {args.batch}, {args.epochs} epochs, "
          f"{len(jax_methods())} methods x {args.seeds} seeds; best of {args.repeats} runs each, interleaved")
    compile_single, run_single = single_call(cfg, data, splits, text, args.k)
    run_single()
    per_epoch, single = [], []
    for _ in range(args.repeats):  # interleaved, so that a noisy neighbour hits both alike
        _, timings = fitlib.fit_methods(cfg, data, splits, text, args.k)
        per_epoch.append(timings["run_s"])
        t = time.perf_counter()
        run_single()
        single.append(time.perf_counter() - t)
    print("| path | compile (s) | run, best (s) | run, all (s) |\n|---|---|---|---|")
    print(f"| single call (lax.scan over epochs) | {compile_single:.1f} | {min(single):.3f} | "
          + ", ".join(f"{x:.3f}" for x in single) + " |")
    print(f"| one call per epoch (w2s-fit, progress bar) | {timings['compile_s']:.1f} | {min(per_epoch):.3f} | "
          + ", ".join(f"{x:.3f}" for x in per_epoch) + " |")
    print(f"\nrun-time overhead of the per-epoch loop: {100 * (min(per_epoch) / min(single) - 1):+.2f}% (best of each)")


if __name__ == "__main__":
    main()
