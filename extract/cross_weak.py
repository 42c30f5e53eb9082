"""The weak model across domains (issue #24): a weak model trained on one domain's ``train`` split, as its store was
made, applied to another domain's ``test`` images. PGR across domains needs it.

A probe (``pixels@S`` or ``MODEL:probe``) is retrained here: its features and training are deterministic, so it is the
store's own weak model. A teacher without target labels (``zeroshot:``, ``imagenet:``) is built again as its store
recorded it: nothing of it depends on the domain. A target with a subset of the source's classes (ImageNet-R of
ImageNet) gets the logits of its own classes (``w2s_jax.cross_domain.class_columns``). A fine-tuned one is loaded from the weights its extraction kept beside the store
(``pipeline.weak_weights``), without fine-tuning again; a store made before they were kept has none, and its cells
show accuracy only (the report says so).

The fine-tuned weak models of every other domain are applied to a target's test images in one image pass
(:func:`write_cross_weak_all`): each image is decoded once for all of them.

Each result is one file, ``DIR/WEAK/SOURCE__on__TARGET.npz`` (domains as ``dataset-domain``), holding the target's
test ids, the logits ``N x K`` and what they were computed from (``made_from``: the source store's record of its weak
model, with the sha256 of a fine-tuned one's weights). A file made from another weak model than the source store's
own now is written again here, and never read by the report (``w2s_jax.cross_domain.weak_on_target``).
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import NamedTuple

import numpy as np

from extract import pipeline, teachers, weak
from extract.datasets import Dataset
from extract.weak_pass import frozen_logits, kept_problem, models_logits
from w2s_jax.cross_domain import class_columns, cross_weak_file, made_from_of, read_cross_weak


def probe_features(spec: weak.WeakSpec, dataset: Dataset, rows: dict, parts: Path, opts: pipeline.Options) -> dict:
    """``{split: features}`` of the probe's frozen backbone (grey pixels, or the HF backbone) on ``rows``."""
    fn = weak.probe_backbone(spec, len(dataset.class_names), opts.device)
    with pipeline.ImageSource(dataset.load, {"probe": [weak.weak_transform(spec)]}, opts) as source:
        outs = pipeline.run_splits(rows, source, "probe", {spec.name: (weak.weak_transform(spec), fn)}, parts, opts,
                                   f"{spec.name} features, {dataset.domain}")[0]
    return {s: out[spec.name] for s, out in outs.items()}


def finetuned_logits(models, target: Dataset, target_rows: tuple, parts: Path, opts: pipeline.Options) -> list:
    """Fine-tuned weak models, each ``(spec, kept weights, its number of classes)``, on the target's rows in one
    image pass (:func:`extract.weak_pass.models_logits`): a list of logits ``N x K``."""
    loaded = {}
    for j, (spec, weights, k) in enumerate(models):  # two domains' weak models may share a name: keyed by position
        model = weak.load_hf(spec, k, opts.device)
        model.load_state_dict(weak.load_weights(weights, opts.device, fix=KEPT_FIX.format(store=weights.parent)))
        loaded[f"m{j}"] = (spec, model)
    specs = [spec for spec, _, _ in models]
    with pipeline.ImageSource(target.load, {"weak": pipeline.tuned_inputs(specs)[0]}, opts) as source:
        outs = models_logits(loaded, specs, {"test": target_rows}, source, "weak", parts, opts,
                             f"{len(models)} weak model(s)' logits, {target.domain}")
    return [outs[f"m{j}"]["test"] for j in range(len(models))]


KEPT_FIX = ("it is the fine-tuned weak model kept beside its store ({store}), applied to other domains for PGR. Delete "
            "it and run w2s-run (or the store's w2s-extract) again: the store's weak model is then fine-tuned anew, "
            "which changes its logits, so that store's fits are redone")


class CrossJob(NamedTuple):
    """A source domain's weak model to apply to a target's test rows."""

    source: Dataset
    source_rows: dict  # {split: (ids, labels)} of the source store
    spec: weak.WeakSpec
    source_store: Path | None  # beside it, a fine-tuned model's kept weights
    source_info: dict | None = None  # the source store's weak_info of this weak model: what the logits come from
    strong: str | None = None  # the source store's --strong spec: its text tower maps a teacher's classes by name


def write_cross_weak(source: Dataset, source_rows: dict, target: Dataset, target_rows: tuple, spec: weak.WeakSpec,
                     folder: Path, opts: pipeline.Options, source_store: Path | None = None,
                     source_info: dict | None = None) -> Path | None:
    """Write the source's weak model ``spec`` applied to the target's test rows (:func:`write_cross_weak_all` of
    one); ``source_info``: the source store's weak_info of it."""
    return write_cross_weak_all([CrossJob(source, source_rows, spec, source_store, source_info)], target, target_rows,
                                folder, opts)[0]


def write_cross_weak_all(jobs, target: Dataset, target_rows: tuple, folder: Path, opts: pipeline.Options) -> list:
    """Write each job's weak model applied to the target's test rows ``(ids, labels)``: a probe retrained on its
    source's train rows, a fine-tuned model from the weights kept beside its source store; the fine-tuned ones all
    in one image pass over the target (:func:`finetuned_logits`). Returns each job's file, or None where a
    fine-tuned model's weights are missing. Done once: an existing valid file is kept, an invalid one (cut short,
    say) written again."""
    done, tuned = [None] * len(jobs), []
    for i, job in enumerate(jobs):
        out = cross_weak_file(folder, job.spec.name, f"{job.source.name}/{job.source.domain}",
                              f"{target.name}/{target.domain}")
        made_from = {"weak": job.source_info}
        if out.exists():
            try:
                read_cross_weak(out)
                if made_from_of(out) == made_from:
                    done[i] = out
                    continue
                opts.log(f"{out} was computed from another weak model {job.spec.name} of {job.source.domain} than "
                         "its store's now: writing it again")
            except ValueError as err:
                opts.log(f"{err}: writing it again")
        columns = class_columns(job.source.class_names, target.class_names)
        if columns is None:
            continue  # the target has classes the weak model lacks
        if job.spec.mode in weak.FROZEN:
            done[i] = save_logits(out, target_rows, teacher_logits(job, target, target_rows, out, opts)[:, columns],
                                  made_from)
        elif job.spec.mode == "probe":
            parts = out.with_name(out.stem + ".parts")
            train = probe_features(job.spec, job.source, {"train": job.source_rows["train"]}, parts / "source",
                                   opts)["train"]
            test = probe_features(job.spec, target, {"test": target_rows}, parts / "target", opts)["test"]
            logits = weak.train_probe(train, job.source_rows["train"][1], len(job.source.class_names),
                                      device=opts.device)(test)
            done[i] = save_logits(out, target_rows, logits[:, columns], made_from)
            shutil.rmtree(parts, ignore_errors=True)
        else:
            weights = pipeline.weak_weights(job.source_store, job.spec.name) if job.source_store is not None else None
            if weights is not None and weights.is_file():
                check_kept(weights, job.source_info)
                tuned.append((i, out, weights, columns))
    if tuned:
        key = hashlib.sha256("|".join(str(out) for _, out, _, _ in tuned).encode()).hexdigest()[:12]
        parts = folder / f".{target.name}-{target.domain}-{key}.parts"  # resumable, for this set of models only
        logits = finetuned_logits([(jobs[i].spec, weights, len(jobs[i].source.class_names))
                                   for i, _, weights, _ in tuned], target, target_rows, parts, opts)
        for (i, out, _, columns), lg in zip(tuned, logits):
            done[i] = save_logits(out, target_rows, lg[:, columns], {"weak": jobs[i].source_info})
        shutil.rmtree(parts, ignore_errors=True)
    return done


def teacher_logits(job: CrossJob, target: Dataset, target_rows: tuple, out: Path, opts: pipeline.Options):
    """A source's teacher (``zeroshot:``, ``imagenet:``), built as its store recorded it (its templates; the strong
    encoder's text tower, named in the record, for a mapping by names), on the target's rows: logits ``N x K``
    over the source's classes."""
    info = job.source_info or {}
    templates = tuple(info.get("templates") or ()) or job.source.templates or pipeline.encoders.DEFAULT_TEMPLATES
    tower = job.strong or (pipeline.encoders.spec_for_id(info["text_tower"]) if info.get("text_tower") else None)
    text = (lambda: pipeline.encoders.load_strong(tower, opts.device)) if tower else None
    built = teachers.build(job.spec, job.source.class_names, templates, opts.device, text, opts.log)
    parts = out.with_name(out.stem + ".parts")
    with pipeline.ImageSource(target.load, {f"weak:{job.spec.name}": [built[0]]}, opts) as source:
        logits = frozen_logits(job.spec.name, built, {"test": target_rows}, parts, opts, source)["test"]
    shutil.rmtree(parts, ignore_errors=True)
    return logits


def check_kept(weights: Path, info: dict | None) -> None:
    """A WeakModelError when kept weights are not the ones their store recorded (sha256 in its weak_info)."""
    if kept_problem(weights, info):
        raise weak.WeakModelError(f"{weights}: not the weights its store recorded (sha256 differs); "
                                  + KEPT_FIX.format(store=weights.parent))


def save_logits(out: Path, target_rows: tuple, logits, made_from: dict | None = None) -> Path:
    """One cross-weak file: the target's test ids, the logits ``N x K`` and what they were computed from
    (``made_from``, as JSON), written whole (a rename)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.npz")
    np.savez(tmp, ids=np.asarray(target_rows[0]), logits_NxK=np.asarray(logits, np.float32),
             made_from=np.asarray(json.dumps(made_from or {}, sort_keys=True)))
    tmp.replace(out)
    return out
