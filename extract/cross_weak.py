"""The weak model across domains (issue #24): a probe weak model trained on one domain's ``train`` split, as its store
was made, applied to another domain's ``test`` images. PGR across domains needs it.

A probe (``pixels@S`` or ``MODEL:probe``) is retrained here: its features and training are deterministic, so it is the
store's own weak model. A fine-tuned weak model is not: its weights are not kept after extraction, so it has no
cross-domain logits and its cells show accuracy only (the report says so).

Each result is one file, ``DIR/WEAK/SOURCE__on__TARGET.npz`` (domains as ``dataset-domain``), holding the target's
test ids and the logits ``N x K``; the report (``w2s_jax.report.cross_domain_tables``) reads them.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from extract import pipeline, weak
from extract.datasets import Dataset
from w2s_jax.cross_domain import cross_weak_file


def probe_features(spec: weak.WeakSpec, dataset: Dataset, rows: dict, parts: Path, opts: pipeline.Options) -> dict:
    """``{split: features}`` of the probe's frozen backbone (grey pixels, or the HF backbone) on ``rows``."""
    fn = weak.probe_backbone(spec, len(dataset.class_names), opts.device)
    source = pipeline.ImageSource(dataset.load, {"probe": [weak.weak_transform(spec)]}, opts)
    outs = pipeline.run_splits(rows, source, "probe", {spec.name: (weak.weak_transform(spec), fn)}, parts, opts,
                               f"{spec.name} features, {dataset.domain}")[0]
    return {s: out[spec.name] for s, out in outs.items()}


def write_cross_weak(source: Dataset, source_rows: dict, target: Dataset, target_rows: tuple, spec: weak.WeakSpec,
                     folder: Path, opts: pipeline.Options) -> Path | None:
    """Train the probe ``spec`` on the source's train rows and write its logits on the target's test rows; None for a
    fine-tuned weak model (its weights are not kept). ``source_rows``: {split: (ids, labels)} of the source store;
    ``target_rows``: (ids, labels) of the target store's test split. Done once: an existing file is kept."""
    if spec.mode != "probe":
        return None
    out = cross_weak_file(folder, spec.name, f"{source.name}/{source.domain}", f"{target.name}/{target.domain}")
    if out.exists():
        return out
    parts = out.with_name(out.stem + ".parts")
    train = probe_features(spec, source, {"train": source_rows["train"]}, parts / "source", opts)["train"]
    test = probe_features(spec, target, {"test": target_rows}, parts / "target", opts)["test"]
    predict = weak.train_probe(train, source_rows["train"][1], len(source.class_names), device=opts.device)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.asarray(target_rows[0]), logits_NxK=predict(test).astype(np.float32))
    tmp.replace(out)
    shutil.rmtree(parts, ignore_errors=True)
    return out
