"""Candidate speed-ups of the fit's inner loop, measured side by side on the same data in one run.

One epoch of minibatch training of M linear heads (KD loss, Adam), vmapped over models, DomainNet shape:
- baseline: gather ``feats[rows]`` per step, float32 GEMMs (what w2s_jax.fit does);
- bf16: the same with bfloat16 GEMM inputs and float32 accumulation;
- pre-permuted: one gather of the whole epoch's rows per model, then contiguous slices per step;
- fused: the M heads of one seed share its minibatches, so gather once per step and compute every head's
  logits in one wide GEMM ``x · [W_1 … W_M]ᵀ`` (and the weight gradients in one wide GEMM back), the
  prototype of issue #14's fused step. The M models here all use one seed's rows, so fused must equal baseline.
Usage: python benchmarks/bench_fit_variants.py [--models 10] [--n-train 33306]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from _common import machine, timed
from w2s_jax.config import Hparams
from w2s_jax.losses import LOSSES, family_loss


def kd(logits_BxK, teacher_BxK, hp):
    """KD's row of the loss family, per example (the labels are not read by this row)."""
    labels_B = jnp.zeros(logits_BxK.shape[0], jnp.int32)
    return family_loss(logits_BxK, teacher_BxK, labels_B, LOSSES["kd"], progress=0.5, hp=hp)


def make_epoch(variant, feats_NxD, weak_NxK, batch, steps):
    hp = Hparams()
    tx = optax.adam(1e-3)
    dtype = jnp.bfloat16 if variant == "bf16" else jnp.float32
    feats_c = feats_NxD.astype(dtype)

    def loss_fn(w, x_BxD, t_BxK):
        logits = jnp.dot(x_BxD, w.astype(dtype).T, preferred_element_type=jnp.float32)
        return kd(logits, t_BxK, hp).mean()

    if variant == "fused":
        def fused_loss(w_MxKxD, x_BxD, t_BxK):
            m, k, d = w_MxKxD.shape
            logits_BxMxK = (x_BxD @ w_MxKxD.reshape(m * k, d).T).reshape(-1, m, k)  # one wide GEMM for M heads
            return jnp.sum(jax.vmap(lambda z: kd(z, t_BxK, hp).mean(), in_axes=1)(logits_BxMxK))

        def fused_epoch(w_MxKxD, rows_MxTxB):
            opt = tx.init(w_MxKxD)

            def step(carry, rows_B):
                w, opt = carry
                g = jax.grad(fused_loss)(w, feats_c[rows_B], weak_NxK[rows_B])  # one gather for all M heads
                u, opt = tx.update(g, opt, w)
                return (optax.apply_updates(w, u), opt), None

            return jax.lax.scan(step, (w_MxKxD, opt), rows_MxTxB[0])[0][0]

        return jax.jit(fused_epoch)

    def epoch(w, rows_TxB):
        opt = tx.init(w)
        if variant == "prepermuted":
            xs = (feats_c[rows_TxB.reshape(-1)].reshape(steps, batch, -1), weak_NxK[rows_TxB])
        else:
            xs = (rows_TxB, rows_TxB)

        def step(carry, x):
            w, opt = carry
            if variant == "prepermuted":
                x_BxD, t_BxK = x
            else:
                x_BxD, t_BxK = feats_c[x[0]], weak_NxK[x[1]]
            g = jax.grad(loss_fn)(w, x_BxD, t_BxK)
            u, opt = tx.update(g, opt, w)
            return (optax.apply_updates(w, u), opt), None

        (w, _), _ = jax.lax.scan(step, (w, opt), xs)
        return w

    return jax.jit(jax.vmap(epoch))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", type=int, default=10, help="heads of one seed (they share its minibatches)")
    ap.add_argument("--n-train", type=int, default=33306)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--batch", type=int, default=512)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    feats = jnp.asarray(rng.normal(size=(args.n_train, args.d)), jnp.float32)
    weak = jnp.asarray(rng.normal(size=(args.n_train, args.k)), jnp.float32)
    steps = math.ceil(args.n_train / args.batch)
    one_seed = rng.permutation(steps * args.batch) % args.n_train
    rows = jnp.asarray(np.stack([one_seed] * args.models).reshape(args.models, steps, args.batch))
    w0 = jnp.zeros((args.models, args.k, args.d))
    times, outs = {}, {}
    for variant in ("baseline", "bf16", "prepermuted", "fused"):
        fn = make_epoch(variant, feats, weak, args.batch, steps)
        outs[variant] = fn(w0, rows).block_until_ready()
        times[variant] = timed(lambda: fn(w0, rows).block_until_ready(), repeats=3)
    print(f"machine: {machine()}; backend {jax.default_backend()}")
    print(f"{args.models} models x {steps} steps of batch {args.batch}, d={args.d}, k={args.k}")
    for v, t in times.items():
        diff = float(jnp.abs(outs[v] - outs["baseline"]).max())
        print(f"{v:12s} {t:.2f}s  ({times['baseline'] / t:.2f}x baseline; max |w - w_baseline| = {diff:.1e})")
    print("ratios baseline/variant: " + ", ".join(f"{v} {times['baseline'] / t:.2f}x" for v, t in times.items()))


if __name__ == "__main__":
    main()
