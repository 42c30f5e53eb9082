"""Where one epoch's time goes, at DomainNet shape: the real fused epoch of every method against its parts.

For S seeds x every JAX method (one hparam point), seed after seed as w2s-fit runs them on one device
(``fit.over_seeds``), time one epoch (66 steps of 512) fused and model by model (``--no-fuse``'s path), and fused
with the seeds vmapped instead (``--seed-axis vmap``); then the fused epoch's parts in isolation, each jitted and mapped over seeds the
same way: the per-step gather ``feats[rows]`` (once per seed), the step's two wide
GEMMs (forward ``x [A_1 … A_J]ᵀ`` and weight gradient ``dZᵀ x``) and the end-of-epoch evaluation (hold_val and
test' through the same wide GEMM). XLA fuses differently in isolation, so the parts are estimates, not a partition.
Usage: python benchmarks/bench_step_profile.py [--seeds 5] [--methods all]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from _common import clustered, machine, measure
from w2s_jax import fit as fitlib
from w2s_jax import sharding
from w2s_jax.config import FitConfig
from w2s_jax.methods import jax_methods
from w2s_jax.splits import stacked_splits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="all", help="comma-separated, or all JAX methods")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--n", type=int, default=52041)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3, help="clean runs wanted per figure")
    args = ap.parse_args()
    print(f"machine: {machine()}")
    s, b, d, k = args.seeds, args.batch, args.d, args.k
    methods = jax_methods() if args.methods == "all" else tuple(args.methods.split(","))
    j = len(methods)  # heads per seed (one hparam point)
    feats, weak, labels, text = clustered(args.n, d, k, np.random.default_rng(0))
    data = fitlib.make_data(feats, weak, labels)
    splits = jax.tree.map(jnp.asarray, stacked_splits(args.n, s))
    cfg = FitConfig(store="s", weak="w", methods=methods, seeds=s, epochs=10, batch_size=b)
    groups = fitlib.make_groups(methods, k, text)
    specs, teacher_J = fitlib.teacher_plan(groups, cfg.grid_hparams(), cfg.hparams.refine_k)
    recipe = fitlib.recipe_of(cfg, splits.hold_train.shape[-1])
    rows = {g: fitlib.group_rows(grp, cfg.grid_hparams(), teacher_J[g]) for g, grp in groups.items()}
    keys = jax.random.key_data(fitlib.seed_keys(0, s))
    # the data goes in as arguments: captured as constants, XLA would fold the whole start at compile time
    teachers = jax.jit(lambda data, splits: fitlib.seed_targets(specs, data, splits))(data, splits)
    states = jax.jit(lambda data, splits, teachers: {g: fitlib.start_seeds(grp, recipe, keys, rows[g], data, splits,
                                                                           teachers)
                                                     for g, grp in groups.items()})(data, splits, teachers)

    def epoch_of(fuse, seed_axis="map"):
        def one_seed(args, data):
            state, key_data, split, seed_teachers = args
            return fitlib.seed_epoch(groups, state, jax.random.wrap_key_data(key_data), 0, rows, data, split,
                                     recipe._replace(fuse=fuse), seed_teachers)

        def program(states, data, splits, teachers):
            return fitlib.over_seeds(one_seed, (states, keys, splits, teachers), data, sharding.seed_mesh(),
                                     seed_axis)

        compiled = jax.jit(program)
        return lambda: jax.block_until_ready(compiled(states, data, splits, teachers))

    feats = data.feats_NxD
    by_seed = lambda fn: jax.jit(lambda f, *args: jax.lax.map(lambda a: fn(*a, f), args))  # seed after seed
    steps = math.ceil(splits.hold_train.shape[1] / b)
    rows_SxTxB = jax.random.randint(jax.random.key(1), (s, steps, b), 0, args.n)
    a_SxJKxD = jax.random.normal(jax.random.key(2), (s, j * k, d)) * 0.01
    x_SxTxBxD = jax.vmap(lambda r: data.feats_NxD[r])(rows_SxTxB)
    gather = by_seed(lambda r, f: jnp.sum(f[r], axis=(0, 1)))  # summed: keep the gather alive

    def gemms_one(x_TxBxD, a_JKxD, _):
        def step(a, x_BxD):
            z_BxJK = x_BxD @ a.T
            return a - 1e-3 * (jax.nn.softmax(z_BxJK) - 1.0 / k).T @ x_BxD, None
        return jax.lax.scan(step, a_JKxD, x_TxBxD)[0]

    gemms = by_seed(gemms_one)
    evaluate = by_seed(lambda a, v, t, f: jnp.sum(f[v] @ a.T) + jnp.sum(f[t] @ a.T))
    parts = {
        "one fused epoch, as w2s-fit runs it": epoch_of(True),
        "the same epoch model by model (--no-fuse)": epoch_of(False),
        "fused, the seeds vmapped instead of mapped": epoch_of(True, "vmap"),
        "gathers feats[rows], once per seed and step": lambda: jax.block_until_ready(gather(feats, rows_SxTxB)),
        "the step's two wide GEMMs (+ softmax)": lambda: jax.block_until_ready(gemms(None, x_SxTxBxD, a_SxJKxD)),
        "end-of-epoch evaluation (hold_val + test')": lambda: jax.block_until_ready(
            evaluate(feats, a_SxJKxD, splits.hold_val, splits.test_prime)),
    }
    for fn in parts.values():
        fn()
    flops_step = 2 * 2 * b * d * k * j * s * steps
    print(f"{j} methods x {s} seeds in {len(groups)} head group(s), {j * k} GEMM columns per seed in all; "
          f"{steps} steps of {b}, d={d}, k={k}")
    medians = {}
    for name, fn in parts.items():
        t = measure(fn, clean=args.runs)
        medians[name] = t.median
        total = medians["one fused epoch, as w2s-fit runs it"]
        extra = f", {flops_step / t.median / 1e9:.1f} GFLOP/s" if "GEMM" in name else ""
        print(f"  {name:46s} {t}  = {100 * t.median / total:.0f}% of the fused epoch{extra}")
    floor = medians["the step's two wide GEMMs (+ softmax)"]
    print(f"fused epoch / its GEMMs alone: seeds mapped {medians['one fused epoch, as w2s-fit runs it'] / floor:.2f}x, "
          f"seeds vmapped {medians['fused, the seeds vmapped instead of mapped'] / floor:.2f}x (#21's GPU target <= 2x)")


if __name__ == "__main__":
    main()
