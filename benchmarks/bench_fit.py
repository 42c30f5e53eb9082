"""Fit throughput at DomainNet scale: w2s-fit vmapped (a) vs --no-vmap (b) vs a plain PyTorch loop (c),
plus the fraction of this machine's float32 GEMM rate that the fit reaches.

Synthetic data shaped like DomainNet "real" (test = 52,041 rows, d = 512, k = 345), with class
clusters and noisy weak logits so accuracies mean something.
Usage: python benchmarks/bench_fit.py [--methods kd+lp,cpl] [--seeds 5] [--epochs 2] [--n 52041]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import torch_reference
from _common import clustered, machine, peak_rss_gib, timed
from w2s_jax import fit as fitlib
from w2s_jax import metrics
from w2s_jax.config import FitConfig
from w2s_jax.methods import jax_methods
from w2s_jax.splits import split_sizes, stacked_splits


def fit_flops(n, d, k, batch, epochs, num_models):
    """GEMM FLOPs: per step forward r̂Wᵀ and backward dW = dZᵀr̂ (2·B·d·k each, padded last batch);
    per epoch one forward over hold_val and test'."""
    n_train, n_val, n_test = split_sizes(n)
    steps = math.ceil(n_train / batch)
    per_epoch = steps * 2 * (2 * batch * d * k) + 2 * (n_val + n_test) * d * k
    return num_models * epochs * per_epoch


def gemm_rate(num_models, batch, d, k):
    """Achieved float32 FLOP/s of the fit's GEMM shape, vmapped over ``num_models``."""
    key = jax.random.key(0)
    a = jax.random.normal(key, (num_models, batch, d))
    b = jax.random.normal(key, (num_models, k, d))
    mm = jax.jit(jax.vmap(lambda x, w: x @ w.T))
    mm(a, b).block_until_ready()
    seconds = timed(lambda: mm(a, b).block_until_ready(), repeats=20)
    return 2 * num_models * batch * d * k / seconds


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="kd+lp,cpl", help="comma list, or 'all' (JAX methods)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--n", type=int, default=52041)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--skip-torch", action="store_true")
    args = ap.parse_args()
    methods = jax_methods() if args.methods == "all" else tuple(args.methods.split(","))

    rng = np.random.default_rng(0)
    feats, weak, labels, text = clustered(args.n, args.d, args.k, rng)
    data = fitlib.make_data(feats, weak, labels)
    splits = stacked_splits(args.n, args.seeds)
    base = FitConfig(store="synthetic", weak="noisy", methods=methods, seeds=args.seeds, epochs=args.epochs,
                     batch_size=args.batch)
    print(f"machine: {machine()}; JAX backend {jax.default_backend()}")
    print(f"data: n={args.n} d={args.d} k={args.k}; {len(methods)} methods x {args.seeds} seeds, "
          f"{args.epochs} epochs, batch {args.batch}")

    # (a) vmapped: one compiled program
    out_a, t_a = fitlib.fit_methods(base, data, splits, text, args.k)
    hps = jax.tree.map(jnp.asarray, base.grid_hparams())
    jsplits = jax.tree.map(jnp.asarray, splits)
    acc_a = {m: metrics.evaluate_method(m, o, hps, data, jsplits, args.k)["test_acc"][:, 0]
             for m, o in out_a.items()}
    # (b) the same fit, model by model
    _, t_b = fitlib.fit_methods(FitConfig(**{**base.__dict__, "vmap": False}), data, splits, text, args.k)
    weak_acc = metrics.weak_accuracy(data, jsplits).mean()
    zero_shot = metrics.zero_shot(data, jsplits, text, base.hparams.logit_scale)["test_acc"].mean()
    print(f"weak test' acc {100 * weak_acc:.2f}, zero-shot {100 * zero_shot:.2f}")
    print(f"(a) vmapped:  compile {t_a['compile_s']:.2f}s, run {t_a['run_s']:.2f}s")
    print(f"(b) no-vmap:  run incl. per-method compile {t_b['run_s']:.2f}s")
    # (c) plain PyTorch
    if not args.skip_torch:
        import time

        t = time.perf_counter()
        acc_c = torch_reference.fit_all(methods, feats, weak, labels, text[0], splits, seeds=args.seeds,
                                        epochs=args.epochs, batch=args.batch, warmup=base.warmup, hp=base.hparams)
        t_c = time.perf_counter() - t
        print(f"(c) PyTorch:  run {t_c:.2f}s")
        for m in methods:
            print(f"    {m:14s} test' acc  w2s-fit {100 * acc_a[m].mean():.2f} ± {100 * acc_a[m].std():.2f}   "
                  f"torch {100 * acc_c[m].mean():.2f} ± {100 * acc_c[m].std():.2f}")
    flops = fit_flops(args.n, args.d, args.k, args.batch, args.epochs, len(methods) * args.seeds)
    rate = gemm_rate(args.seeds, args.batch, args.d, args.k)
    achieved = flops / t_a["run_s"]
    print(f"fit GEMM FLOPs {flops / 1e9:.1f} G; achieved {achieved / 1e9:.1f} GFLOP/s; "
          f"measured GEMM rate at this shape {rate / 1e9:.1f} GFLOP/s -> {100 * achieved / rate:.1f}% of roofline")
    print(f"peak RSS {peak_rss_gib():.2f} GiB")
    ratios = f"(b)/(a) = {t_b['run_s'] / t_a['run_s']:.2f}x"
    if not args.skip_torch:
        ratios = f"(c)/(a) = {t_c / t_a['run_s']:.2f}x, " + ratios
    print(f"ratios (run time, compile excluded for (a)): {ratios}")


if __name__ == "__main__":
    main()
