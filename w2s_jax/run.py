"""``run(cfg, out_dir)``: store -> fits of every method x seed x hparam -> metrics -> results folder."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import jax

from w2s_jax import fit as fitlib
from w2s_jax import metrics, results
from w2s_jax.config import FitConfig
from w2s_jax.methods import check_methods
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store


class GridTooLargeError(MemoryError):
    """The requested grid would not fit in memory; raised before compiling."""


def run(cfg: FitConfig, out_dir) -> tuple[dict, Path]:
    check_methods(cfg.methods)
    store = read_store(cfg.store, need_weak=(cfg.weak,))
    test = store.splits["test"]
    n, d = test.features_NxD.shape
    k = store.num_classes
    need, have = fitlib.estimate_bytes(cfg, n, d, k), fitlib.available_bytes()
    if need > have:
        raise GridTooLargeError(
            f"the grid ({len(cfg.methods)} methods x {cfg.seeds} seeds x {len(cfg.grid_hparams().lr)} hparams) "
            f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available; "
            f"use fewer seeds, methods or grid values, or --no-vmap"
        )
    splits = stacked_splits(n, cfg.seeds)  # raises ValueError for too few rows
    data = fitlib.make_data(test.features_NxD, test.weak_logits[cfg.weak], test.labels_N)
    text = store.text_TxKxD
    outputs, timings = fitlib.fit_methods(cfg, data, splits, text, k)
    hps = jax.tree.map(jax.numpy.asarray, cfg.grid_hparams())
    jsplits = jax.tree.map(jax.numpy.asarray, splits)
    evals = {m: metrics.evaluate_method(m, o, hps, data, jsplits, k, text) for m, o in outputs.items()}
    best_epochs = {m: o.best_epoch for m, o in outputs.items()}
    histories = {m: o.history for m, o in outputs.items()}
    return finish_run(cfg, store, splits, evals, best_epochs, histories, timings, out_dir, data)


def finish_run(cfg, store, splits, evals, best_epochs, histories, timings, out_dir, data=None) -> tuple[dict, Path]:
    """Shared by w2s-fit and w2s-tp: weak and zero-shot rows, hparam selection, summary, results folder.

    evals: method -> {test_acc, agreement, val_score} each ``S x H``; best_epochs: method -> ``S x H``;
    histories: method -> {field: ``S x H x E``}; data: the FitData already on device, if any.
    """
    if data is None:  # w2s-tp has not built it
        test = store.splits["test"]
        data = fitlib.make_data(test.features_NxD, test.weak_logits[cfg.weak], test.labels_N)
    jsplits = jax.tree.map(jax.numpy.asarray, splits)
    text = store.text_TxKxD
    zero_shot = None if text is None else metrics.zero_shot(data, jsplits, text, cfg.hparams.logit_scale)
    summary = results.summarize(evals, best_epochs, cfg.grid_hparams(), metrics.weak_accuracy(data, jsplits), zero_shot)
    provenance = {**dataclasses.asdict(store.provenance), "weak_model": store.weak_info[cfg.weak]}
    timings = {**timings, "backend": jax.default_backend(), "devices": [str(x) for x in jax.devices()]}
    if jax.process_index() == 0:  # on several hosts, every process holds the results; one writes them
        results.write_results(out_dir, config=cfg, provenance=provenance, splits=splits, summary=summary,
                              histories=histories, timings=timings)
    return summary, Path(out_dir)
