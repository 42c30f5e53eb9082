"""Weak-label refinement (w2s_jax.refine): the kNN vote, label propagation and the kNN filter of one seed's pool, in
JAX and chunked, against scikit-learn's brute-force cosine NearestNeighbors with a NumPy vote on the same data.

Default shape: DomainNet's largest pool (hold_train ∪ hold_val of real's test split, about 41,600 rows), d = 512,
K = 345 classes, k = 10. Compile time is reported apart from the run.
Usage: python benchmarks/bench_refine.py [--pool 41600 --d 512 --classes 345 --k 10 --runs 3]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from _common import machine, timed
from w2s_jax import refine


def sklearn_vote(feats_PxD, probs_PxK, k: int) -> np.ndarray:
    """The reference: brute-force cosine neighbours (the row itself left out), then the mean of their weak probs."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(n_neighbors=k + 1, metric="cosine", algorithm="brute").fit(feats_PxD)
    neighbours = index.kneighbors(feats_PxD, return_distance=False)
    rows = np.arange(len(feats_PxD))[:, None]
    keep = np.where((neighbours == rows).any(axis=1, keepdims=True),  # drop itself, or the last if it is not found
                    neighbours != rows, np.arange(k + 1)[None, :] < k)
    return probs_PxK[neighbours[keep].reshape(-1, k)].mean(axis=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pool", type=int, default=41_600)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--skip-sklearn", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.pool)
    centers = rng.normal(size=(args.classes, args.d))
    feats = (centers[labels] + 2.0 * rng.normal(size=(args.pool, args.d))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    weak = (5.0 * np.eye(args.classes)[labels] + 1.5 * rng.normal(size=(args.pool, args.classes))).astype(np.float32)
    feats_j, weak_j = jnp.asarray(feats), jnp.asarray(weak)
    print(f"machine: {machine()}; JAX backend {jax.default_backend()}")
    print(f"pool {args.pool:,} rows x d={args.d}, K={args.classes}, k={args.k}; chunks of {refine.CHUNK} query rows "
          f"(largest block {min(refine.CHUNK, args.pool) * args.pool * 4 / 2**20:.0f} MiB of similarities, never "
          f"the {args.pool ** 2 * 4 / 2**30:.2f} GiB P x P matrix)")
    specs = {"knn": refine.Refinement("knn", args.k), "graph": refine.Refinement("graph", args.k, 0.5),
             "filter": refine.Refinement("filter", args.k, 0.0, 0.2)}
    ours = {}
    for name, spec in specs.items():
        t = time.perf_counter()
        compiled = jax.jit(lambda f, w, spec=spec: refine.refine(spec, f, w)).lower(feats_j, weak_j).compile()
        compile_s = time.perf_counter() - t
        run_s = timed(lambda: jax.block_until_ready(compiled(feats_j, weak_j)), repeats=args.runs)
        ours[name] = (compile_s, run_s, compiled(feats_j, weak_j))
        print(f"  {name:7s} JAX: compile {compile_s:.2f} s, run {run_s:.3f} s (best of {args.runs})")
    print(f"weak labels right on {np.mean(weak.argmax(1) == labels):.3f} of rows; after the kNN vote "
          f"{np.mean(np.asarray(ours['knn'][2][0]).argmax(1) == labels):.3f}, after propagation "
          f"{np.mean(np.asarray(ours['graph'][2][0]).argmax(1) == labels):.3f}; the filter keeps "
          f"{np.mean(np.asarray(ours['filter'][2][1])):.2f} of rows, right on "
          f"{np.mean((weak.argmax(1) == labels)[np.asarray(ours['filter'][2][1]) > 0]):.3f} of them")
    if args.skip_sklearn:
        return
    probs = np.asarray(jax.nn.softmax(weak_j))
    t = time.perf_counter()
    reference = sklearn_vote(feats, probs, args.k)
    sk_s = time.perf_counter() - t
    same = np.mean(reference.argmax(1) == np.asarray(ours["knn"][2][0]).argmax(1))
    print(f"  knn     scikit-learn brute cosine + NumPy vote: {sk_s:.3f} s (one run); the refined argmax agrees with "
          f"ours on {same:.4f} of rows; max |vote difference| "
          f"{np.abs(np.exp(np.asarray(ours['knn'][2][0])) - reference).max():.1e}")
    print(f"ratio, kNN vote: scikit-learn / ours = {sk_s / ours['knn'][1]:.2f}x run only, "
          f"{sk_s / (ours['knn'][0] + ours['knn'][1]):.2f}x counting our compile")


if __name__ == "__main__":
    main()
