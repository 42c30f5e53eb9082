"""Fit throughput at DomainNet scale: w2s-fit (a, the fused step per seed) vs --no-fuse (a') vs --no-vmap (b) vs
a plain PyTorch loop (c),
plus the fraction of this machine's best float32 GEMM rate (large square matrices) that the fit reaches.
Every time is a median over clean runs (benchmarks/_common.measure); compile time is reported apart.

Synthetic data shaped like DomainNet "real" (test = 52,041 rows, d = 512, k = 345), with class
clusters and noisy weak logits so accuracies mean something.
Usage: python benchmarks/bench_fit.py [--methods all] [--seeds 5] [--epochs 10] [--n 52041] [--grid-lr 1e-2,3e-3]
       [--bf16] [--skip-unfused] [--skip-novmap] [--skip-torch]
"""
from __future__ import annotations

import argparse
import math

import jax
import jax.numpy as jnp
import numpy as np

import torch_reference
from _common import clustered, machine, measure, peak_gemm_rates, peak_rss_gib
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="all", help="comma list, or 'all' (JAX methods)")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=512)
    ap.add_argument("--n", type=int, default=52041)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=345)
    ap.add_argument("--grid-lr", default="", help="comma list of learning rates: the many-model regime")
    ap.add_argument("--runs", type=int, default=3, help="clean runs wanted per figure")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--skip-novmap", action="store_true")
    ap.add_argument("--skip-unfused", action="store_true")
    ap.add_argument("--bf16", action="store_true", help="also run the fused step with bfloat16 GEMM inputs")
    args = ap.parse_args()
    methods = jax_methods() if args.methods == "all" else tuple(args.methods.split(","))
    grid = (("lr", tuple(float(x) for x in args.grid_lr.split(","))),) if args.grid_lr else ()

    print(f"machine: {machine()}; JAX backend {jax.default_backend()}")
    rng = np.random.default_rng(0)
    feats, weak, labels, text = clustered(args.n, args.d, args.k, rng)
    data = fitlib.make_data(feats, weak, labels)
    splits = stacked_splits(args.n, args.seeds)
    base = FitConfig(store="synthetic", weak="noisy", methods=methods, seeds=args.seeds, epochs=args.epochs,
                     batch_size=args.batch, grid=grid)
    num_h = len(base.grid_hparams().lr)
    print(f"data: n={args.n} d={args.d} k={args.k}; {len(methods)} methods x {args.seeds} seeds x {num_h} grid "
          f"point(s), {args.epochs} epochs, batch {args.batch}; compilation cache off")

    # (a) vmapped: one compiled program; the first call's compile time, then the run time of clean calls
    out_a, t_first = fitlib.fit_methods(base, data, splits, text, args.k)
    run_a = measure(lambda: fitlib.fit_methods(base, data, splits, text, args.k)[1]["run_s"], clean=args.runs)
    hps = jax.tree.map(jnp.asarray, base.grid_hparams())
    jsplits = jax.tree.map(jnp.asarray, splits)
    acc_a = {m: metrics.evaluate_method(m, o, hps, data, jsplits, args.k)["test_acc"][:, 0]
             for m, o in out_a.items()}
    weak_acc = metrics.weak_accuracy(data, jsplits).mean()
    print(f"weak test' acc {100 * weak_acc:.2f}")
    print(f"(a) vmapped, fused:  compile {t_first['compile_s']:.2f} s; run {run_a}")
    # (a') the same program with each model's logits computed on its own (--no-fuse)
    if not args.skip_unfused:
        unfused = FitConfig(**{**base.__dict__, "fuse": False})
        _, t_unfused = fitlib.fit_methods(unfused, data, splits, text, args.k)
        run_u = measure(lambda: fitlib.fit_methods(unfused, data, splits, text, args.k)[1]["run_s"], clean=args.runs)
        print(f"(a') vmapped, unfused: compile {t_unfused['compile_s']:.2f} s; run {run_u}")
    # (a-bf16) the fused step's GEMMs with bfloat16 inputs, float32 accumulation: time and accuracy against (a)
    if args.bf16:
        bf16 = FitConfig(**{**base.__dict__, "matmul_dtype": "bfloat16"})
        out_bf, t_bf = fitlib.fit_methods(bf16, data, splits, text, args.k)
        run_bf = measure(lambda: fitlib.fit_methods(bf16, data, splits, text, args.k)[1]["run_s"], clean=args.runs)
        print(f"(a-bf16) fused, bfloat16 GEMM inputs: compile {t_bf['compile_s']:.2f} s; run {run_bf}; "
              f"float32 / bfloat16 = {run_a.median / run_bf.median:.2f}x run only")
        for m, o in out_bf.items():
            acc = metrics.evaluate_method(m, o, hps, data, jsplits, args.k)["test_acc"][:, 0]
            print(f"    {m:16s} test' acc  float32 {100 * acc_a[m].mean():.2f}  bfloat16 {100 * acc.mean():.2f}  "
                  f"(max seed difference {100 * np.abs(acc - acc_a[m]).max():.2f} points)")
    # (b) the same fit, model by model (compile included: one jit per method, called per model)
    if not args.skip_novmap:
        novmap = FitConfig(**{**base.__dict__, "vmap": False})
        run_b = measure(lambda: fitlib.fit_methods(novmap, data, splits, text, args.k)[1]["run_s"], clean=args.runs)
        print(f"(b) no-vmap:  run incl. per-method compile {run_b}")
    # (c) plain PyTorch, per seed, method and grid point
    if not args.skip_torch:
        acc_c = {}
        device = torch_reference.reference_device()
        precision = torch_reference.match_jax_precision(device)

        def torch_all():
            acc_c.update(torch_reference.fit_all(methods, feats, weak, labels, text[0], splits, seeds=args.seeds,
                                                 epochs=args.epochs, batch=args.batch, warmup=base.warmup,
                                                 hp=base.hparams, lrs=hps.lr.tolist(), device=device))
            if device == "cuda":
                import torch

                torch.cuda.synchronize()

        run_c = measure(torch_all, clean=args.runs)
        print(f"(c) PyTorch on {device} ({precision}):  run {run_c}")
        for m in methods:
            print(f"    {m:16s} test' acc  w2s-fit {100 * acc_a[m].mean():.2f} ± {100 * acc_a[m].std():.2f}   "
                  f"torch {100 * acc_c[m].mean():.2f} ± {100 * acc_c[m].std():.2f}")
    flops = fit_flops(args.n, args.d, args.k, args.batch, args.epochs, len(methods) * args.seeds * num_h)
    peak = peak_gemm_rates()["jax"]
    achieved = flops / run_a.median
    print(f"fit GEMM FLOPs {flops / 1e9:.1f} G; achieved {achieved / 1e9:.1f} GFLOP/s = {100 * achieved / peak:.1f}% of "
          f"this machine's large float32 GEMM rate ({peak / 1e9:.1f} GFLOP/s, JAX, measured in this run)")
    print(f"peak RSS {peak_rss_gib():.2f} GiB")
    if not args.skip_torch:
        both = t_first["compile_s"] + run_a.median
        print(f"ratios, medians: PyTorch / ours = {run_c.median / run_a.median:.2f}x run only, "
              f"{run_c.median / both:.2f}x counting our compile time")
    if not args.skip_unfused:
        print(f"unfused / fused = {run_u.median / run_a.median:.2f}x run only, "
              f"{(t_unfused['compile_s'] + run_u.median) / (t_first['compile_s'] + run_a.median):.2f}x with compile")
    if not args.skip_novmap:
        print(f"no-vmap / vmapped (run only) = {run_b.median / run_a.median:.2f}x")


if __name__ == "__main__":
    main()
