"""Where one epoch's time goes, at DomainNet shape: the real vmapped epoch of one method against its parts.

For M models of one method (kd+lp or cpl), vmapped as w2s-fit does, time one epoch (66 steps of 512), then its
parts in isolation, each jitted and vmapped the same way: the per-step gather ``feats[rows]``, the two GEMMs of a
step (forward ``x Aᵀ`` and weight gradient ``dZᵀ x``), and the end-of-epoch evaluation (hold_val + test' forward).
XLA fuses differently in isolation, so the parts are estimates, not a partition.
Usage: python benchmarks/bench_step_profile.py [--method kd+lp] [--models 5]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

from _common import clustered, machine, measure
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import METHODS
from w2s_jax.splits import stacked_splits


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="kd+lp")
    ap.add_argument("--models", type=int, default=5)
    ap.add_argument("--n", type=int, default=52041)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    print(f"machine: {machine()}")
    m, b, d, k = args.models, args.batch, args.d, args.k
    feats, weak, labels, text = clustered(args.n, d, k, np.random.default_rng(0))
    data = fitlib.make_data(feats, weak, labels)
    splits = jax.tree.map(jnp.asarray, stacked_splits(args.n, m))
    cfg = FitConfig(store="s", weak="w", methods=(args.method,), seeds=m, epochs=10, batch_size=b)
    trainer = fitlib.make_trainer(METHODS[args.method], k, text, cfg)
    keys = fitlib.seed_keys(0, m)
    hps = jax.tree.map(lambda a: jnp.repeat(jnp.asarray(a), m), cfg.grid_hparams())
    states = jax.jit(jax.vmap(lambda kd, hp, sp: trainer.start(jax.random.wrap_key_data(kd), hp, data, sp)))(
        jax.random.key_data(keys), hps, splits)
    epoch = jax.jit(jax.vmap(lambda st, kd, hp, sp: trainer.epoch(st, jax.random.wrap_key_data(kd), 0, hp, data, sp)))
    args_e = (states, jax.random.key_data(keys), hps, splits)
    jax.block_until_ready(epoch(*args_e))
    steps = math.ceil(splits.hold_train.shape[1] / b)

    rows_MxTxB = jax.random.randint(jax.random.key(1), (m, steps, b), 0, args.n)
    w_MxKxD = jax.random.normal(jax.random.key(2), (m, k, d)) * 0.01
    x_MxTxBxD = jax.vmap(lambda r: data.feats_NxD[r])(rows_MxTxB)
    gather = jax.jit(jax.vmap(lambda r: jnp.sum(data.feats_NxD[r], axis=(0, 1))))  # summed: keep the gather alive

    def gemms_one(x_TxBxD, w_KxD):
        def step(w, x_BxD):
            z_BxK = x_BxD @ w.T
            return w - 1e-3 * (jax.nn.softmax(z_BxK) - 1.0 / k).T @ x_BxD, None
        return jax.lax.scan(step, w_KxD, x_TxBxD)[0]

    gemms = jax.jit(jax.vmap(gemms_one))
    evaluate = jax.jit(jax.vmap(lambda w, v, t: jnp.sum(data.feats_NxD[v] @ w.T) + jnp.sum(data.feats_NxD[t] @ w.T)))
    parts = {
        "one epoch, as w2s-fit runs it": lambda: jax.block_until_ready(epoch(*args_e)),
        "gathers feats[rows], every step": lambda: jax.block_until_ready(gather(rows_MxTxB)),
        "the step's two GEMMs (+ softmax), every step": lambda: jax.block_until_ready(gemms(x_MxTxBxD, w_MxKxD)),
        "end-of-epoch evaluation (hold_val + test')": lambda: jax.block_until_ready(
            evaluate(w_MxKxD, splits.hold_val, splits.test_prime)),
    }
    for fn in parts.values():
        fn()
    flops_step = 2 * 2 * b * d * k * m * steps
    print(f"{args.method}, {m} models vmapped, {steps} steps of {b}, d={d}, k={k}")
    total = None
    for name, fn in parts.items():
        t = measure(fn)
        total = total or t.median
        extra = f", {flops_step / t.median / 1e9:.1f} GFLOP/s" if "GEMM" in name else ""
        print(f"  {name:46s} {t}  = {100 * t.median / total:.0f}% of the epoch{extra}")


if __name__ == "__main__":
    main()
