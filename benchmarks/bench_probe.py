"""The linear probe against a converged reference: scikit-learn's LogisticRegression on the same stored
features and splits, C chosen on hold_val, beside our ceiling+lp and ce+lp at two batch sizes.

Also sweeps the linear head's start (``lp_shrinkage`` δ) and prints each LP method's mean hold_val score:
that, never test', is what the default δ was chosen by.
Usage: python benchmarks/bench_probe.py [--store stores/demo-mnist.h5] [--weak pixels@4] [--seeds 5]
"""
from __future__ import annotations

import argparse
import tempfile
import warnings

import numpy as np

from _common import machine
from w2s_jax.config import FitConfig
from w2s_jax.run import run
from w2s_jax.splits import seed_splits
from w2s_jax.store import read_store

C_GRID = (1.0, 10.0, 100.0, 1000.0)
LP_METHODS = ("ce+lp", "kd+lp", "auxconf+lp", "adaptconf+lp", "ceiling+lp")


def sklearn_probe(feats_NxD, train_targets_N, labels_N, seeds) -> np.ndarray:
    """test' accuracy per seed of a converged logistic regression on unit-norm features, C chosen on hold_val."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    x = feats_NxD / np.linalg.norm(feats_NxD, axis=1, keepdims=True)
    accs = []
    for seed in range(seeds):
        sp = seed_splits(len(labels_N), seed)
        best = (-1.0, 0.0)
        for c in C_GRID:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                model = LogisticRegression(C=c, max_iter=3000).fit(x[sp.hold_train], train_targets_N[sp.hold_train])
            val = np.mean(model.predict(x[sp.hold_val]) == train_targets_N[sp.hold_val])
            if val > best[0]:
                best = (val, np.mean(model.predict(x[sp.test_prime]) == labels_N[sp.test_prime]))
        accs.append(best[1])
    return 100 * np.asarray(accs)


def ours(store, weak, seeds, batch, grid=()) -> dict:
    cfg = FitConfig(store=store, weak=weak, methods=LP_METHODS, seeds=seeds, batch_size=batch, grid=grid)
    with tempfile.TemporaryDirectory() as out:
        summary, _ = run(cfg, out)
    return summary["methods"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", default="stores/demo-mnist.h5")
    ap.add_argument("--weak", default=None)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    store = read_store(args.store)
    weak = args.weak or store.weak_names[0]
    test = store.splits["test"]
    feats, labels = test.features_NxD.astype(np.float64), test.labels_N
    weak_labels = test.weak_logits[weak].argmax(1)
    print(f"machine: {machine()}\nstore: {args.store}, weak: {weak}, {args.seeds} seeds, C grid {C_GRID}\n")

    reference = {"ceiling+lp": sklearn_probe(feats, labels, labels, args.seeds),
                 "ce+lp": sklearn_probe(feats, weak_labels, labels, args.seeds)}
    print("| row | sklearn LogisticRegression | ours, batch 64 | gap | ours, batch 512 | gap |")
    print("|---|---|---|---|---|---|")
    runs = {b: ours(args.store, weak, args.seeds, b) for b in (64, 512)}
    for name, ref in reference.items():
        cells = [f"{ref.mean():.2f} ± {ref.std():.2f}"]
        for b in (64, 512):
            acc = 100 * np.asarray(runs[b][name]["test_acc"])
            cells += [f"{acc.mean():.2f} ± {acc.std():.2f}", f"{acc.mean() - ref.mean():+.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")

    shrinkages = (0.02, 0.1, 0.5, 0.9, 1.0)
    sweep = ours(args.store, weak, args.seeds, 64, grid=(("lp_shrinkage", shrinkages),))
    print("\nmean hold_val score by lp_shrinkage δ, batch 64 (agreement with the weak labels; ground-truth accuracy "
          "for ceiling+lp); test' in brackets, for reading only")
    print("| method | " + " | ".join(f"δ={s}" for s in shrinkages) + " | chosen on hold_val |")
    print("|---|" + "---|" * (len(shrinkages) + 1))
    for name in LP_METHODS:
        val = 100 * np.asarray(sweep[name]["grid"]["val_score"]).mean(0)
        acc = 100 * np.asarray(sweep[name]["grid"]["test_acc"]).mean(0)
        print(f"| {name} | " + " | ".join(f"{v:.2f} ({a:.2f})" for v, a in zip(val, acc))
              + f" | δ={shrinkages[int(np.argmax(val))]} |")


if __name__ == "__main__":
    main()
