"""``run(cfg, out_dir)``: store -> fits of every method x seed x hparam -> metrics -> results folder."""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import jax
import numpy as np

from w2s_jax import fit as fitlib
from w2s_jax import metrics, outputs, results
from tqdm.auto import tqdm

from w2s_jax.config import FitConfig, resolve_batch_size
from w2s_jax.methods import METHODS, check_methods, definitions
from w2s_jax.select import at_best_epoch, failed_models
from w2s_jax.splits import split_sizes, stacked_splits
from w2s_jax.store import read_store, rows_record


class GridTooLargeError(MemoryError):
    """The requested grid would not fit in memory; raised before compiling."""


def run(cfg: FitConfig, out_dir, log=None, overwrite: bool = False) -> tuple[dict, Path]:
    """Fit, evaluate and write the results folder. ``log``: a print function for the plan, the compile time
    and a progress bar; None for silence. The folder is checked and locked before any work (outputs.py)."""
    return run_each([cfg], [out_dir], log, overwrite)[0]


def run_each(cfgs, out_dirs, log=None, overwrite: bool = False) -> list[tuple[dict, Path]]:
    """:func:`run` for configs that differ only in their weak model (``w2s-fit --weak A,B``: every weak model of a
    store), each into its own folder, by one compiled program (:func:`w2s_jax.fit.fit_each`). Every folder is
    checked and locked before any work."""
    but_weak = lambda c: {**c.to_dict(), "weak": None}  # noqa: E731
    if any(but_weak(c) != but_weak(cfgs[0]) for c in cfgs) or len({c.weak for c in cfgs}) != len(cfgs):
        raise ValueError("run_each fits one config for several weak models: the configs may differ in `weak` only")
    out_dirs = [outputs.check_output(d, folder=True) for d in out_dirs]
    with contextlib.ExitStack() as locks:
        for d in out_dirs:
            locks.enter_context(outputs.exclusive(d))
        return _run(list(cfgs), out_dirs, log, overwrite)


def _run(cfgs, out_dirs, log, overwrite) -> list[tuple[dict, Path]]:
    check_methods(cfgs[0].methods)
    cfgs = [dataclasses.replace(c, defined=definitions(c.methods)) for c in cfgs]  # the folder alone rebuilds them
    cfg = cfgs[0]
    store = read_store(cfg.store, need_weak=tuple(dict.fromkeys([*(c.weak for c in cfgs), *cfg.ensemble])))
    test = store.splits["test"]
    n, d = test.features_NxD.shape
    k = store.num_classes
    n_train, n_val, n_test = split_sizes(n)
    cfgs = [resolve_batch_size(c, n_train) for c in cfgs]
    cfg = cfgs[0]
    for c, out_dir in zip(cfgs, out_dirs):
        results.check_replace(out_dir, c, overwrite)
    num_h = len(cfg.grid_hparams().lr)
    need = fitlib.estimate_bytes(cfg, n, d, k) + 4 * (len(cfgs) - 1) * n * k  # each more weak model's logits
    have = fitlib.available_bytes()
    if need > have:
        raise GridTooLargeError(
            f"the grid ({len(cfg.methods)} methods x {cfg.seeds} seeds x {num_h} hparams) "
            f"needs about {need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available; "
            f"use fewer seeds, methods or grid values, or --no-vmap"
        )
    splits = stacked_splits(n, cfg.seeds)  # raises ValueError for too few rows
    weaks = np.stack([test.weak_logits[w] for w in cfg.ensemble]) if cfg.ensemble else None
    datas = [fitlib.make_data(test.features_NxD, test.weak_logits[c.weak], test.labels_N, weaks) for c in cfgs]
    text = store.text_TxKxD
    num_models = len(cfg.methods) * cfg.seeds * num_h
    if log:
        each = f" each, one program for all {len(cfgs)}" if len(cfgs) > 1 else ""
        log(f"fitting {len(cfg.methods)} methods x {cfg.seeds} seeds x {num_h} grid point(s) = {num_models} models "
            f"on {cfg.store} (weak {', '.join(','.join(c.ensemble or (c.weak,)) for c in cfgs)}{each})\n"
            f"  rows: hold_train {n_train:,}, hold_val {n_val:,}, test' {n_test:,} of {n:,}; {d}-d features, {k} classes\n"
            f"  batch size {cfg.batch_size}" + (f" ({cfg.batch_size_rule})" if cfg.batch_size_rule else "") + "; "
            f"{cfg.epochs} epochs\n  memory: about {need / 2**30:.2f} GiB of {have / 2**30:.1f} GiB available\n"
            f"compiling ...")
    bar = []  # the progress bar, opened once the program is compiled

    def compiled(seconds):
        if log:
            log(f"compiled in {seconds:.1f} s")
            bar.append(tqdm(total=num_models * cfg.epochs * len(cfgs), unit="model-epoch", desc="training"))

    fitted = fitlib.fit_each(cfg, datas, splits, text, k, on_compiled=compiled,
                             progress=lambda done: bar and bar[0].update(done))
    for b in bar:
        b.close()
    if log and (fitted[0][1].get("bucket_rows") or n) > n:  # a store that fills its bucket exactly is not padded
        log(f"rows padded to the size bucket of {fitted[0][1]['bucket_rows']:,} (the stores of a bucket share one "
            "compiled program; --no-bucket fits them unpadded)")
    done = []
    for c, data, (fits, timings), out_dir in zip(cfgs, datas, fitted, out_dirs):
        done.append(evaluate_and_finish(c, store, splits, data, fits, timings, out_dir, log, k))
    return done


def evaluate_and_finish(cfg, store, splits, data, fits: dict, timings: dict, out_dir, log, k: int):
    """One weak model's fit (``{method: FitOutput}``) -> its metrics and results folder (:func:`finish_run`)."""
    hps = jax.tree.map(jax.numpy.asarray, cfg.grid_hparams())
    jsplits = jax.tree.map(jax.numpy.asarray, splits)
    best_epochs = {m: o.best_epoch for m, o in fits.items()}
    histories = {m: o.history for m, o in fits.items()}
    evals = {m: {**metrics.evaluate_method(m, o, hps, data, jsplits, k),
                 "val_score": at_best_epoch(o.history["val_score"], o.best_epoch)} for m, o in fits.items()}
    failed = {m: failed_models(h) for m, h in histories.items()}
    heads = {m: (METHODS[m].head, o.variables) for m, o in fits.items()}
    done = finish_run(cfg, store, splits, evals, best_epochs, histories, timings, out_dir, heads, data, failed)
    for line in results.failure_lines(done[0], failed, cfg.grid_hparams(), cfg.weak) if log else ():
        log(line)
    return done


def finish_run(cfg, store, splits, evals, best_epochs, histories, timings, out_dir, heads, data=None,
               failed=None) -> tuple[dict, Path]:
    """Shared by w2s-fit and w2s-tp: weak and zero-shot rows, hparam selection, summary, results folder.

    evals: method -> {test_acc, agreement, val_score} each ``S x H``; best_epochs: method -> ``S x H``;
    histories: method -> {field: ``S x H x E``}; heads: method -> (head name, best-epoch variables
    ``S x H x ...``); data: the FitData already on device, if any.
    """
    if data is None:  # w2s-tp has not built it
        test = store.splits["test"]
        data = fitlib.make_data(test.features_NxD, test.weak_logits[cfg.weak], test.labels_N)
    jsplits = jax.tree.map(jax.numpy.asarray, splits)
    text = store.text_TxKxD
    zero_shot = None if text is None else metrics.zero_shot(data, jsplits, text, cfg.hparams.logit_scale)
    summary = results.summarize(evals, best_epochs, cfg.grid_hparams(), metrics.weak_scores(data, jsplits), zero_shot,
                                failed, histories, getattr(cfg, "select", "agreement"))
    if getattr(cfg, "defined", ()):  # user-defined methods (rows of the loss family), rebuilt by load_summary
        summary["defined"] = cfg.defined
    if getattr(cfg, "ensemble", ()):  # each weak model's own test' accuracy, beside the learned weights (in order)
        summary["ensemble"] = [{"weak": name, "test_acc": metrics.weak_accuracy(
            data._replace(weak_NxK=data.weaks_MxNxK[m]), jsplits).tolist()} for m, name in enumerate(cfg.ensemble)]
    test = store.splits["test"]  # which rows the fit saw, so that w2s-predict can tell its own store by content
    provenance = {**dataclasses.asdict(store.provenance), "weak_model": store.weak_info[cfg.weak],
                  "test_rows": rows_record(test), "store_file": str(Path(cfg.store).resolve())}
    timings = {**timings, "backend": jax.default_backend(), "devices": [str(x) for x in jax.devices()]}
    if jax.process_index() == 0:  # on several hosts, every process holds the results; one writes them
        results.write_results(out_dir, config=cfg, provenance=provenance, splits=splits, summary=summary,
                              histories=histories, timings=timings, heads=heads, best_epochs=best_epochs,
                              feature_dim=data.feats_NxD.shape[1], failed=failed)
    return summary, Path(out_dir)
