"""The weak models of an extraction: probes trained on their backbone's features, and fine-tuned models trained in
lockstep (one decode per image and epoch for all of them), each recorded with the recipe it was made with
(:func:`weak_recipe`), so that a store never keeps a weak model made otherwise than asked."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from extract import encoders, teachers, weak
from extract.datasets import Dataset
from extract.image_pass import ImageSource, Options, run_splits
from w2s_jax import store as st


TUNED = "weak-tuned"  # the pass that fine-tunes every fine-tuned weak model at once, and gives their logits


def tuned_inputs(specs) -> tuple[list, dict]:
    """The fine-tuned weak models' distinct transforms, and which of them each model reads:
    ``([transform], {name: index})`` (:func:`weak.transform_key`)."""
    keys = list(dict.fromkeys(weak.transform_key(s) for s in specs))
    first = {key: next(s for s in specs if weak.transform_key(s) == key) for key in keys}
    return [weak.weak_transform(first[key]) for key in keys], {s.name: keys.index(weak.transform_key(s)) for s in specs}


def weak_passes(specs, built: dict | None = None) -> dict:
    """The image passes the weak models ``specs`` need beyond the feature pass, ``{key: [transform]}``: each probe's
    and each teacher's own (``weak:NAME``: when the store exists already; ``built``: {name: the teacher's
    (transform, fn, info)}, :func:`extract.teachers.build`), and one for every fine-tuned model at once (``TUNED``)."""
    specs = list(specs)
    passes = {f"weak:{s.name}": [weak.weak_transform(s)] for s in specs if s.mode == "probe"}
    passes.update({f"weak:{name}": [transform] for name, (transform, _, _) in (built or {}).items()})
    tuned = [s for s in specs if s.mode == "finetune"]
    if tuned:
        passes[TUNED] = tuned_inputs(tuned)[0]
    return passes


def probe_logits(spec: weak.WeakSpec, dataset: Dataset, rows: dict, parts: Path, opts: Options, source: ImageSource,
                 probe_feats: dict | None = None) -> tuple[dict, dict]:
    """Train the probe ``spec`` on ``train`` (ground truth) and return its logits per split.

    rows: split -> (ids, labels) of the store's rows; source: the extraction's images, with the pass
    ``weak:NAME`` (:func:`weak_passes`); probe_feats: split -> features, if the feature pass already computed them.
    Returns ({split: logits_NxK}, provenance dict).
    """
    k = len(dataset.class_names)
    if probe_feats is None:
        fn = weak.probe_backbone(spec, k, opts.device)
        outs = run_splits(rows, source, f"weak:{spec.name}", {spec.name: (weak.weak_transform(spec), fn)},
                          parts / f"weakfeat-{spec.name}-all", opts, f"{spec.name} features")[0]
        probe_feats = {s: out[spec.name] for s, out in outs.items()}
    predict = weak.train_probe(probe_feats["train"], rows["train"][1], k, device=opts.device)
    logits = {s: predict(f) for s, f in probe_feats.items()}
    return logits, with_accuracy(weak_recipe(spec, opts), logits, rows)


def weak_recipe(spec: weak.WeakSpec, opts: Options, templates=()) -> dict:
    """What a weak model is made from: its source and training settings (a teacher's: :func:`teachers.recipe`, with
    the store's ``templates``). It is recorded in the store's weak_info and beside a fine-tuning checkpoint, and a
    weak model whose record differs is made anew, never reused."""
    if spec.mode in weak.FROZEN:
        return teachers.recipe(spec, templates)
    if spec.mode == "probe":
        return {"source": spec.source, "mode": spec.mode, "probe_epochs": weak.PROBE_EPOCHS, "probe_lr": weak.PROBE_LR}
    return {"source": spec.source, "mode": spec.mode, "epochs": opts.weak_epochs, "batch_size": opts.weak_batch_size,
            "lr": opts.weak_lr, "warmup": 0.1}


def recipe_key(spec: weak.WeakSpec, opts: Options) -> str:
    """A short hash of :func:`weak_recipe`: it names the resumable work of that recipe (part files, checkpoints)."""
    return hashlib.sha256(json.dumps(weak_recipe(spec, opts), sort_keys=True).encode()).hexdigest()[:10]


def recipe_differences(have: dict, want: dict) -> list[str]:
    """``["epochs 2 (asked 5)", ...]``: the settings of a recorded weak model that differ from those asked."""
    return [f"{k} {have.get(k)!r} (asked {v!r})" for k, v in want.items() if have.get(k) != v]


def teacher_templates(templates, dataset: Dataset) -> tuple:
    """The templates a zero-shot teacher reads: those asked (the store's), else the dataset's, else the default."""
    return tuple(templates) or dataset.templates or encoders.DEFAULT_TEMPLATES


def build_teachers(specs, dataset: Dataset, templates, opts: Options, text_encoder=None) -> dict:
    """``{name: (transform, images -> logits, info)}`` of the teachers among ``specs`` (:func:`teachers.build`),
    ``info`` their recipe and what building them found (uncovered classes, the text tower)."""
    built = {}
    for spec in specs:
        if spec.mode in weak.FROZEN:
            transform, fn, found = teachers.build(spec, dataset.class_names, templates, opts.device, text_encoder,
                                                  opts.log)
            built[spec.name] = (transform, fn, {**weak_recipe(spec, opts, templates), **found})
    return built


def frozen_logits(name: str, built: tuple, rows: dict, parts: Path, opts: Options, source: ImageSource) -> dict:
    """A teacher's logits per split (nothing trained): ``built`` = its (transform, fn, info), in the pass
    ``weak:NAME`` of ``source``."""
    transform, fn, _ = built
    outs = run_splits(rows, source, f"weak:{name}", {name: (transform, fn)}, parts / f"teacher-{name}-all", opts,
                      f"{name} logits")[0]
    return {s: out[name] for s, out in outs.items()}


def with_accuracy(info: dict, logits: dict, rows: dict) -> dict:
    return {**info, **{f"{s}_accuracy": float(np.mean(logits[s].argmax(1) == labels)) for s, (_, labels) in rows.items()}}


class UnreadableTrainImages(Exception):
    """Fine-tuning met unreadable training images under ``--on-corrupt fail``: it stops, and the feature pass lists
    every split's unreadable images at once (:class:`CorruptImagesError`)."""


def finetune_weak(specs, dataset: Dataset, train: tuple, parts: Path, opts: Options,
                  source: ImageSource) -> tuple[dict, dict]:
    """Fine-tune every model of ``specs`` on ``train`` = (ids, labels) in lockstep (:func:`weak.finetune`): each
    image decoded once per epoch, whatever the number of models; unreadable images are left out (a
    :class:`UnreadableTrainImages` under ``--on-corrupt fail``). A model fine-tuned before (its ``weak-NAME.pt`` in
    ``parts``) is resumed. Returns ``({name: model}, {name: why it failed})``, the failed ones not in the first."""
    k = len(dataset.class_names)
    _, which = tuned_inputs(specs)
    models, todo = {}, {}
    for spec in specs:
        models[spec.name] = weak.load_hf(spec, k, opts.device)
        ckpt = parts / f"weak-{spec.name}.pt"
        recipe = ckpt.with_suffix(".json")  # what the checkpoint was fine-tuned with
        made_with = json.loads(recipe.read_text()) if recipe.is_file() else None
        if ckpt.exists() and made_with == weak_recipe(spec, opts):
            models[spec.name].load_state_dict(weak.load_weights(ckpt, opts.device))
            opts.log(f"resumed fine-tuned weak model from {ckpt}")
        else:
            if ckpt.exists():
                why = "; ".join(recipe_differences(made_with or {}, weak_recipe(spec, opts)))
                opts.log(f"{ckpt} was fine-tuned with other settings ({why}): fine-tuning {spec.name} anew")
            todo[spec.name] = (models[spec.name], which[spec.name])
    failed = {}
    if todo:
        ids, labels = train
        order = np.random.default_rng(0).permutation(len(ids))
        batches = [order[i:i + opts.weak_batch_size].tolist() for i in range(0, len(ids), opts.weak_batch_size)]
        loader = _FineTuneBatches(lambda: source.read(TUNED, ids, batches), len(batches), labels,
                                  stop_at_bad=opts.on_corrupt == "fail")
        failed = weak.finetune(todo, loader, epochs=opts.weak_epochs, lr=opts.weak_lr, device=opts.device,
                               progress=tqdm)
        parts.mkdir(parents=True, exist_ok=True)
        for spec in specs:
            if spec.name in todo and spec.name not in failed:
                _save_torch(parts / f"weak-{spec.name}.pt", models[spec.name].state_dict())
                _write_text(parts / f"weak-{spec.name}.json", json.dumps(weak_recipe(spec, opts), sort_keys=True))
    return {n: m for n, m in models.items() if n not in failed}, failed


def logit_heads(models: dict, first: int, which: dict, keys: dict) -> tuple[dict, dict]:
    """The fine-tuned ``models``' logits as heads of an image pass (:func:`run_pass`) whose transforms from index
    ``first`` on are :func:`tuned_inputs`'s: ``({head: (None, fn)}, {head: its transform's index})``, each head
    named ``NAME@KEY`` by its recipe's ``keys[NAME]`` (:func:`recipe_key`), so that part files of a model fine-tuned
    with other settings are never read as this one's."""
    return ({f"{n}@{keys[n]}": (None, weak.hf_logits(m)) for n, m in models.items()},
            {f"{n}@{keys[n]}": first + which[n] for n in models})


def models_logits(models: dict, specs, rows: dict, source: ImageSource, key: str, parts: Path, opts: Options,
                  desc: str) -> dict:
    """Fine-tuned weak models' logits on ``rows`` ({split: (ids, labels)}), every model in one pass ``key`` of
    ``source``, whose transforms are :func:`tuned_inputs` of ``specs`` (each image decoded once for all of them):
    ``{head: {split: logits_NxK}}``. ``models``: {head: (spec, model)}; the head names key the part files."""
    which = tuned_inputs(specs)[1]
    heads = {h: (None, weak.hf_logits(model.eval())) for h, (_, model) in models.items()}
    outs = run_splits(rows, source, key, heads, parts, opts, desc,
                      {h: which[spec.name] for h, (spec, _) in models.items()})[0]
    return {h: {s: out[h] for s, out in outs.items()} for h in models}


def tuned_logits(specs, dataset: Dataset, rows: dict, parts: Path, opts: Options,
                 source: ImageSource) -> tuple[dict, dict]:
    """Fine-tune every model of ``specs`` (:func:`finetune_weak`), then their logits per split in one more pass
    (a store that exists already: a new store's feature pass computes them, :func:`_extract`).

    Returns ``({name: {split: logits_NxK}}, {name: why it failed})``; a model that failed has no logits, and the
    others' are kept."""
    models, failed = finetune_weak(specs, dataset, rows["train"], parts, opts, source)
    if not models:
        return {}, failed
    spec_of = {spec.name: spec for spec in specs}
    heads = {f"{n}@{recipe_key(spec_of[n], opts)}": n for n in models}  # part files keyed by the recipe
    outs = models_logits({h: (spec_of[n], models[n]) for h, n in heads.items()}, specs, rows, source, TUNED,
                         parts / f"weaklogits-{'+'.join(models)}-all", opts, f"{', '.join(models)} logits")
    return {n: outs[h] for h, n in heads.items()}, failed


def tuned_info(spec: weak.WeakSpec, logits: dict, rows: dict, opts: Options, parts: Path) -> dict:
    """A fine-tuned weak model's provenance: its recipe, accuracy per split, and the sha256 of its weights (kept
    beside the store, :func:`weak_weights`; what is applied across domains must be this model)."""
    ckpt = parts / f"weak-{spec.name}.pt"
    kept = {"weights_sha256": encoders.sha256_file(ckpt)} if ckpt.is_file() else {}
    return with_accuracy({**weak_recipe(spec, opts), **kept}, logits, rows)


def add_weak_models(store: st.Store, specs, dataset: Dataset, rows: dict, parts: Path, opts: Options,
                    source: ImageSource, probe_feats: dict | None = None, tuned: tuple | None = None,
                    built: dict | None = None, frozen: dict | None = None) -> tuple[st.Store, dict]:
    """``store`` with the logits of every weak model of ``specs`` added, in their order (probes: ``probe_feats``
    {name: {split: features}} from the feature pass, if it computed them; the fine-tuned ones: ``tuned``
    = ({name: {split: logits}}, {name: why it failed}) from the feature pass, else :func:`tuned_logits`; the
    teachers, ``built`` {name: (transform, fn, info)}: ``frozen`` {name: {split: logits}} from the feature pass, else
    :func:`frozen_logits`); returns it and ``{name: why it failed}``."""
    if tuned is None:
        tuned = tuned_logits([s for s in specs if s.mode == "finetune"], dataset, rows, parts, opts, source) \
            if any(s.mode == "finetune" for s in specs) else ({}, {})
    logits, failed = tuned
    for spec in specs:
        if spec.mode == "probe":
            done = probe_logits(spec, dataset, rows, parts, opts, source, (probe_feats or {}).get(spec.name))
        elif spec.mode in weak.FROZEN:
            got = (frozen or {}).get(spec.name) or frozen_logits(spec.name, built[spec.name], rows, parts, opts, source)
            done = got, with_accuracy(built[spec.name][2], got, rows)
        elif spec.name in logits:
            done = logits[spec.name], tuned_info(spec, logits[spec.name], rows, opts, parts)
        else:
            continue
        store = st.with_weak_model(store, spec.name, *done)
        opts.log(f"weak model {spec.name} ({st.weak_kind(done[1])}): test accuracy {done[1]['test_accuracy']:.4f}")
    return store, failed


def check_failed(failed: dict, out: Path) -> None:
    """A WeakModelError naming each weak model that failed, once the store holds the others'."""
    if failed:
        raise weak.WeakModelError(
            "weak model(s) failed and were left out of the store: " + "; ".join(f"{n} ({why})" for n, why in
                                                                              failed.items())
            + f". {out} holds the others; run the same command again to fine-tune only these (out of memory: "
            "fewer at once with separate --weak runs, or a smaller batch)")


class _FineTuneBatches:
    """(inputs, labels) for :func:`weak.finetune` (inputs: one tensor per distinct preprocessing), one pass of
    ``read()`` per epoch, dropping unreadable rows (or stopping at them: ``stop_at_bad``)."""

    def __init__(self, read, num_batches: int, labels_N, stop_at_bad: bool = False):
        self.read, self.num_batches, self.labels = read, num_batches, torch.as_tensor(labels_N)
        self.stop_at_bad = stop_at_bad

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        for index, inputs, bad in self.read():
            if bad and self.stop_at_bad:
                raise UnreadableTrainImages()
            if len(index):
                yield inputs, self.labels[index]


def weak_weights(store_path: Path, weak_name: str) -> Path:
    """Where a fine-tuned weak model's weights are kept beside its store (``STORE.weak/NAME.pt``), so that it can be
    applied to another domain's images without fine-tuning again (``extract.cross_weak``)."""
    store_path = Path(store_path)
    return store_path.with_name(store_path.name + ".weak") / f"{weak_name}.pt"


def keep_weak_weights(parts: Path, store_path: Path) -> None:
    """Move the fine-tuned weak models' weights of a finished extraction from its parts folder to
    :func:`weak_weights`, replacing those of an earlier store at that path."""
    for ckpt in Path(parts).glob("weak-*.pt"):
        kept = weak_weights(store_path, ckpt.stem.removeprefix("weak-"))
        kept.parent.mkdir(parents=True, exist_ok=True)
        os.replace(ckpt, kept)


def kept_problem(kept: Path, info: dict | None) -> str:
    """Why the kept weights ``kept`` are not the ones a store recorded by their sha256 in the weak model's ``info``
    (missing, or damaged or replaced); "" when they are, and for a store that records none."""
    recorded = (info or {}).get("weights_sha256")
    if not recorded:
        return ""
    if not kept.is_file():
        return f"its kept weights {kept} are missing"
    return "" if encoders.sha256_file(kept) == recorded else f"its kept weights {kept} are not the ones recorded"


def kept_differences(store_path: Path, name: str, info: dict) -> list[str]:
    """:func:`kept_problem` of the weak model ``name`` kept beside ``store_path``, as a list (empty: none)."""
    problem = kept_problem(weak_weights(store_path, name), info)
    return [problem] if problem else []


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_torch(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
