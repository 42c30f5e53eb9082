"""The weak model across domains (issue #24): a weak model trained on one domain's ``train`` split, as its store was
made, applied to another domain's ``test`` images. PGR across domains needs it.

A probe (``pixels@S`` or ``MODEL:probe``) is retrained here: its features and training are deterministic, so it is the
store's own weak model. A fine-tuned one is loaded from the weights its extraction kept beside the store
(``pipeline.weak_weights``), without fine-tuning again; a store made before they were kept has none, and its cells
show accuracy only (the report says so).

Each result is one file, ``DIR/WEAK/SOURCE__on__TARGET.npz`` (domains as ``dataset-domain``), holding the target's
test ids and the logits ``N x K``; the report (``w2s_jax.report.cross_domain_tables``) reads them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from extract import pipeline, weak
from extract.datasets import Dataset
from w2s_jax.cross_domain import cross_weak_file, read_cross_weak


def probe_features(spec: weak.WeakSpec, dataset: Dataset, rows: dict, parts: Path, opts: pipeline.Options) -> dict:
    """``{split: features}`` of the probe's frozen backbone (grey pixels, or the HF backbone) on ``rows``."""
    fn = weak.probe_backbone(spec, len(dataset.class_names), opts.device)
    with pipeline.ImageSource(dataset.load, {"probe": [weak.weak_transform(spec)]}, opts) as source:
        outs = pipeline.run_splits(rows, source, "probe", {spec.name: (weak.weak_transform(spec), fn)}, parts, opts,
                                   f"{spec.name} features, {dataset.domain}")[0]
    return {s: out[spec.name] for s, out in outs.items()}


def finetuned_logits(spec: weak.WeakSpec, weights: Path, target: Dataset, target_rows: tuple, parts: Path,
                     opts: pipeline.Options) -> np.ndarray:
    """A fine-tuned weak model, loaded from its kept ``weights``, on the target's rows: logits ``N x K``."""
    model = weak.load_hf(spec, len(target.class_names), opts.device)
    model.load_state_dict(weak.load_weights(weights, opts.device))
    model.eval()
    transform = weak.weak_transform(spec)
    with pipeline.ImageSource(target.load, {"weak": [transform]}, opts) as source:
        outs = pipeline.run_splits({"test": target_rows}, source, "weak",
                                   {spec.name: (transform, weak.hf_logits(model))}, parts, opts,
                                   f"{spec.name} logits, {target.domain}")[0]
    return outs["test"][spec.name]


def write_cross_weak(source: Dataset, source_rows: dict, target: Dataset, target_rows: tuple, spec: weak.WeakSpec,
                     folder: Path, opts: pipeline.Options, source_store: Path | None = None) -> Path | None:
    """Write the source's weak model ``spec`` applied to the target's test rows: a probe retrained on the source's
    train rows, or a fine-tuned model from the weights kept beside ``source_store``; None where those weights are
    missing. ``source_rows``: {split: (ids, labels)} of the source store; ``target_rows``: (ids, labels) of the target
    store's test split. Done once: an existing valid file is kept, an invalid one (cut short, say) written again."""
    out = cross_weak_file(folder, spec.name, f"{source.name}/{source.domain}", f"{target.name}/{target.domain}")
    if out.exists():
        try:
            read_cross_weak(out)
            return out
        except ValueError as err:
            opts.log(f"{err}: writing it again")
    parts = out.with_name(out.stem + ".parts")
    if spec.mode == "probe":
        train = probe_features(spec, source, {"train": source_rows["train"]}, parts / "source", opts)["train"]
        test = probe_features(spec, target, {"test": target_rows}, parts / "target", opts)["test"]
        logits = weak.train_probe(train, source_rows["train"][1], len(source.class_names), device=opts.device)(test)
    else:
        weights = pipeline.weak_weights(source_store, spec.name) if source_store is not None else None
        if weights is None or not weights.is_file():
            return None
        logits = finetuned_logits(spec, weights, target, target_rows, parts / "target", opts)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.asarray(target_rows[0]), logits_NxK=np.asarray(logits, np.float32))
    tmp.replace(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out
