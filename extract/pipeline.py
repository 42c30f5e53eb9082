"""The extraction pipeline: dataset -> strong features + weak logits -> one feature store.

Work is resumable: every batch's outputs go to ``<out>.parts/<pass>/<split>/<batch>.npz``
(:mod:`extract.image_pass`), so a killed run redoes at most one batch per pass; the weak models are
:mod:`extract.weak_pass`'s. The store itself is written once at the end through :mod:`w2s_jax.store` (atomic
rename), and the parts folder is removed only after that.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
from importlib import metadata
from pathlib import Path

import torch

from extract import encoders, weak
from extract.datasets import Dataset
from extract.image_pass import (ON_CORRUPT, CorruptImagesError, ImageDataset, ImageSource, Options,  # noqa: F401
                                run_splits)
from extract.weak_pass import (TUNED, UnreadableTrainImages, add_weak_models, build_teachers,  # noqa: F401
                               check_failed, finetune_weak, teacher_templates, keep_weak_weights, kept_differences, logit_heads, recipe_differences,
                               recipe_key, tuned_inputs, weak_passes, weak_recipe, weak_weights)
from w2s_jax import outputs
from w2s_jax import store as st


def package_versions() -> dict:
    out = {}
    for pkg in ("w2s", "torch", "torchvision", "open_clip_torch", "transformers", "numpy", "h5py"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def provenance_for(dataset: Dataset, encoder_id: str, preprocessing: str, templates, skipped=(),
                   decode: str = "cpu") -> st.Provenance:
    """The store's provenance; ``versions`` also records which path decoded the images (``image_decode``)."""
    return st.Provenance(
        dataset=dataset.name, domain=dataset.domain, class_names=dataset.class_names, templates=tuple(templates),
        encoder=encoder_id, preprocessing=preprocessing, split_hash=dataset.split_hash,
        versions={**package_versions(), "image_decode": decode},
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
        skipped=tuple(skipped), split_rule=dataset.split_rule,
    )


def extract(dataset: Dataset, strong_spec: str, weak_specs: list[str], out, opts: Options,
            templates=encoders.DEFAULT_TEMPLATES) -> Path | None:
    """Write (or extend with new weak models) the store at ``out``; returns its path.

    With ``opts.shard`` only that shard's share of the feature pass runs and None is returned;
    a later run without a shard finds every finished batch and merges them into the store.
    """
    out = outputs.check_output(out, folder=False)
    if opts.shard is not None:  # shards write the same parts folder at once by design; the merge takes the lock
        return _extract(dataset, strong_spec, weak_specs, out, opts, templates)
    with outputs.exclusive(out):
        return _extract(dataset, strong_spec, weak_specs, out, opts, templates)


def _extract(dataset, strong_spec, weak_specs, out: Path, opts: Options, templates) -> Path | None:
    specs = [weak.parse_weak(w) for w in weak_specs]
    if out.exists():
        return _add_weak_models(dataset, strong_spec, specs, out, opts, templates)
    parts = out.with_name(out.name + ".parts")
    out.parent.mkdir(parents=True, exist_ok=True)
    stale = weak_weights(out, "x").parent
    if stale.is_dir() and not parts.exists():
        opts.log(f"note: {stale} holds the fine-tuned weak weights of an earlier store at {out} (removed by hand?); "
                 "each is replaced when this extraction fine-tunes that weak model, and no other is read")
    encoder = encoders.load_strong(strong_spec, opts.device)
    built = build_teachers(specs, dataset, teacher_templates(templates, dataset), opts, lambda: encoder)
    templates = tuple(templates) if encoder.encode_text else ()
    _check_or_write_meta(parts, provenance_for(dataset, encoder.id, encoder.preprocessing, templates))

    # one pass over the images: strong features, every weak probe's backbone features and, once fine-tuned (before
    # it, on train), every fine-tuned weak model's logits; each image decoded once for all of them
    heads = {"strong": (encoder.transform, encoder.encode_images)}
    probes = [spec for spec in specs if spec.mode == "probe"]
    tuned_specs = [spec for spec in specs if spec.mode == "finetune"]
    k = len(dataset.class_names)
    for spec in probes:
        heads[spec.name] = (weak.weak_transform(spec), weak.probe_backbone(spec, k, opts.device))
    heads.update({name: (transform, fn) for name, (transform, fn, _) in built.items()})  # teachers: logits as they are
    # every split in one pass: the loader's workers start once, and one message lists every split's bad images.
    # The folder is named by the heads that shards compute too: a merge adds the weak models' logits to their parts
    pass_dir = parts / ("features-" + "+".join(sorted(heads)) + ({"gpu": "-gpu-decode", "draft": "-draft-decode"}.get(opts.decode, ""))
                        + "-all-splits")
    logits_too = bool(tuned_specs) and opts.shard is None  # shards leave fine-tuning to the merge
    tuned_transforms, tuned_which = tuned_inputs(tuned_specs)
    transforms = [t for t, _ in heads.values()] + (tuned_transforms if logits_too else [])
    with ImageSource(dataset.load, {"features": transforms, **weak_passes(tuned_specs)}, opts) as source:
        tuned, which = None, None
        if logits_too:
            try:
                models, failed = finetune_weak(tuned_specs, dataset, dataset.splits["train"], parts, opts, source)
                keys = {spec.name: recipe_key(spec, opts) for spec in tuned_specs}
                logit_fns, which = logit_heads(models, len(heads), tuned_which, keys)
                which.update({name: i for i, name in enumerate(heads)})
                heads, tuned = {**heads, **logit_fns}, ({}, failed)
            except UnreadableTrainImages:
                opts.log("fine-tuning stopped at unreadable training images; the image pass lists every split's")
        results, kept, skipped = run_splits(dataset.splits, source, "features", heads, pass_dir, opts,
                                            f"{dataset.domain} images", which)
        rows = {s: (tuple(ids[i] for i in kept[s]), labels[kept[s]]) for s, (ids, labels) in dataset.splits.items()}
        if opts.shard is not None:
            opts.log(f"shard {opts.shard[0]}/{opts.shard[1]} done; when every shard is done, rerun the same command "
                     f"without --shard to merge them into {out}")
            return None
        if skipped:
            opts.log(f"skipped {len(skipped)} unreadable image(s) (--on-corrupt skip): {', '.join(skipped[:10])}")

        text = None
        if encoder.encode_text and templates:
            with torch.no_grad():
                text = encoders.text_embeddings(encoder, dataset.class_names, templates).float().cpu().numpy()
        splits = {s: st.Split(results[s]["strong"].astype(opts.feature_dtype), rows[s][1], rows[s][0], {})
                  for s in rows}
        store = st.Store(provenance_for(dataset, encoder.id, encoder.preprocessing, templates, skipped, opts.decode),
                         splits, text, {})
        feats = {spec.name: {s: results[s][spec.name] for s in rows} for spec in probes}
        if tuned is not None:
            tuned[0].update({h.rpartition("@")[0]: {s: results[s][h] for s in rows} for h in logit_fns})
        frozen = {name: {s: results[s][name] for s in rows} for name in built}
        store, failed = add_weak_models(store, specs, dataset, rows, parts, opts, source, feats, tuned, built, frozen)
    st.write_store(out, store)
    keep_weak_weights(parts, out)
    shutil.rmtree(parts)
    check_failed(failed, out)
    return out


def with_templates(store: st.Store, strong_spec, templates: tuple, opts: Options, out: Path) -> tuple[st.Store, bool]:
    """``(store, changed)``: the store with text embeddings of ``templates``, encoded again (the strong encoder's text
    tower only) when they differ from those it holds; a store without a text tower is returned as it is."""
    have = store.provenance.templates
    if store.text_TxKxD is None or not have or tuple(templates) == tuple(have):
        return store, False
    opts.log(f"{out} holds text embeddings of the template(s) {list(have)}; asked: {list(templates)}: encoding them "
             "again")
    encoder = encoders.load_strong(strong_spec, opts.device)
    with torch.no_grad():
        text = encoders.text_embeddings(encoder, store.provenance.class_names, templates).float().cpu().numpy()
    provenance = dataclasses.replace(store.provenance, templates=tuple(templates))
    return dataclasses.replace(store, provenance=provenance, text_TxKxD=text), True


def _check_or_write_meta(parts: Path, want: st.Provenance) -> None:
    """Refuse to resume parts written for another dataset, encoder, class list or split."""
    meta = parts / "meta.json"
    if meta.exists():
        problems = st.compatibility_problems(st.Provenance.from_json(meta.read_text()), want)
        if problems:
            raise st.StoreError(
                parts, "an interrupted extraction with other settings is here: " + "; ".join(problems),
                f"rerun with the original settings to resume, or delete {parts} to start over",
            )
        return
    parts.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_name(f"meta.json.{os.getpid()}")  # shards may start at once: write, then rename
    tmp.write_text(want.to_json())
    os.replace(tmp, meta)


def _add_weak_models(dataset: Dataset, strong_spec, specs, out: Path, opts: Options,
                     templates=encoders.DEFAULT_TEMPLATES) -> Path:
    """Add weak models to an existing store without touching its strong features. What the store holds is reused
    only as asked: text embeddings of other ``templates`` are encoded again, and a weak model made with other
    settings (:func:`weak_recipe`) is made anew; the log names what differs."""
    store = st.read_store(out)
    want = dataclasses.replace(
        provenance_for(dataset, encoders.encoder_id(strong_spec), "", store.provenance.templates),
        created=store.provenance.created,
    )
    problems = st.compatibility_problems(store.provenance, want)
    if problems:
        raise st.StoreError(
            out, "refusing to add weak models to a store built differently: " + "; ".join(problems),
            "pass the same --dataset/--domain/--root/--strong as when it was built, or choose another --out",
        )
    store, retexted = with_templates(store, strong_spec, tuple(templates), opts, out)
    tpl = teacher_templates(templates, dataset)
    new = []
    for s in specs:
        differ = recipe_differences(store.weak_info[s.name], weak_recipe(s, opts, tpl)) + kept_differences(
            out, s.name, store.weak_info[s.name]) if s.name in store.weak_info else []
        if s.name not in store.weak_info or differ:
            new.append(s)
        if differ:
            opts.log(f"weak model {s.name} in {out} was made otherwise ({'; '.join(differ)}): making it anew")
        elif s.name in store.weak_info:
            opts.log(f"weak model {s.name} already in {out}, made as asked; kept as is")
    if not new:
        if retexted:
            st.write_store(out, store)
        return out
    store = st.without_weak_models(store, {s.name for s in new})  # a remade one that fails is not left as it was
    parts = out.with_name(out.name + ".parts")
    rows = {s: (sp.ids_N, sp.labels_N) for s, sp in store.splits.items()}
    built = build_teachers(new, dataset, tpl, opts, lambda: encoders.load_strong(strong_spec, opts.device))
    with ImageSource(dataset.load, weak_passes(new, built), opts) as source:
        store, failed = add_weak_models(store, new, dataset, rows, parts, opts, source, built=built)
    st.write_store(out, store)
    keep_weak_weights(parts, out)
    shutil.rmtree(parts, ignore_errors=True)
    check_failed(failed, out)
    return out
