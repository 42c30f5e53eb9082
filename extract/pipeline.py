"""The extraction pipeline: dataset -> strong features + weak logits -> one feature store.

Work is resumable: every batch's outputs go to ``<out>.parts/<pass>/<split>/<batch>.npz``
(written to a temp name, then renamed), so a killed run redoes at most one batch per pass.
The store itself is written once at the end through :mod:`w2s_jax.store` (atomic rename),
and the parts folder is removed only after that.
"""
from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import shutil
import sys
from importlib import metadata
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from extract import encoders, weak
from extract.datasets import Dataset, FileLoader
from w2s_jax import outputs
from w2s_jax import store as st

ON_CORRUPT = ("fail", "skip")


class CorruptImagesError(RuntimeError):
    """Unreadable images were found and ``--on-corrupt fail`` was chosen; ``bad``: {where: [ids]}."""

    def __init__(self, bad: dict):
        self.bad = bad
        listed = "; ".join(f"{len(ids)} in {where}: {', '.join(ids[:10])}{' ...' if len(ids) > 10 else ''}"
                           for where, ids in bad.items())
        super().__init__(f"{sum(map(len, bad.values()))} unreadable image(s) ({listed}). Fix or remove them, or rerun "
                         f"with --on-corrupt skip to leave them out (their ids are recorded). Work done so far is kept.")


@dataclasses.dataclass(frozen=True)
class Options:
    device: str = "cpu"
    batch_size: int = 256
    num_workers: int = 2
    on_corrupt: str = "fail"  # "fail": stop and list them; "skip": drop those rows and record their ids
    weak_epochs: int = 3  # fine-tuning epochs (paper: 3)
    weak_batch_size: int = 512  # fine-tuning batch (paper: 512)
    weak_lr: float = 1e-3  # fine-tuning peak lr (paper: 1e-3, warmup 0.1)
    feature_dtype: str = "float32"  # stored strong features: "float32", or "float16" (half the disk)
    shard: tuple | None = None  # (i, n): run only batches b with b % n == i of the feature pass, write no store
    decode: str = "cpu"  # "cpu": PIL in the loader's workers; "gpu": JPEG batches decoded on the device (decode.py)
    log: Callable = print


# ------------------------------------------------------------------ one image pass


class ImageDataset(torch.utils.data.Dataset):
    """Items ``(pass key, sample id, row)``: the image decoded once (PIL) and every transform of that pass applied
    to it; None marks an unreadable image."""

    def __init__(self, load, transforms: dict):
        self.load, self.transforms = load, transforms  # {pass key: [PIL image -> tensor, ...]}

    def __getitem__(self, item):
        key, sample_id, row = item
        try:
            image = self.load(sample_id)
            return row, tuple(t(image) for t in self.transforms[key])
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # truncated/corrupt/missing/bomb
            return row, None

    @staticmethod
    def collate(items):
        """-> (good row indices, one stacked tensor per transform, bad row indices)."""
        good = [(i, x) for i, x in items if x is not None]
        bad = [i for i, x in items if x is None]
        inputs = tuple(torch.stack(xs) for xs in zip(*[x for _, x in good])) if good else ()
        return torch.tensor([i for i, _ in good], dtype=torch.long), inputs, bad


class _Requests:
    """The loader's batch sampler: the batches of the pass being read, set by :meth:`ImageSource.read`."""

    batches: list = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class ImageSource:
    """The images of one extraction behind one loader, whose workers start once and serve every pass: the strong
    features with the weak probes, each weak model's fine-tuning epochs, and its logits. Every pass's transforms are
    registered here up front (the workers hold them), under a key; :meth:`read` runs one pass. Images are decoded by
    PIL in the workers, or, with ``opts.decode == "gpu"``, read as bytes there and decoded and transformed on
    ``opts.device`` (:mod:`extract.decode`). Host memory is pinned on CUDA and the workers prefetch batches."""

    def __init__(self, load, transforms: dict, opts: Options):
        self.opts, self.requests = opts, _Requests()
        if opts.decode == "gpu":
            from extract import decode

            if not hasattr(load, "root"):
                raise decode.DecodeError("--decode gpu reads image files, and this dataset's images are arrays in "
                                         "memory (the demo); use --decode cpu")
            self.on_device = {key: [decode.tensor_transform(t, key) for t in ts] for key, ts in transforms.items()}
            dataset = decode.RawImages(load)
        else:
            if opts.decode == "draft" and isinstance(load, FileLoader):  # arrays in memory (the demo) have no JPEG
                from extract.decode import draft_side

                load = FileLoader(load.root, draft=draft_side([t for ts in transforms.values() for t in ts]))
            dataset = ImageDataset(load, transforms)
        # forking a process that already runs JAX's threads can deadlock (w2s-run extracts after fitting)
        context = "spawn" if opts.num_workers and "jax" in sys.modules else None
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.requests, collate_fn=dataset.collate, num_workers=opts.num_workers,
            pin_memory=opts.device.startswith("cuda") and opts.decode != "gpu", multiprocessing_context=context,
            persistent_workers=bool(opts.num_workers))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Stop the workers now. Left to the interpreter's exit, persistent workers that feed pinned memory wait
        about 5 s each before they are killed (pytorch/pytorch#81794): a minute with 12 workers, measured on an H200."""
        iterator = getattr(self.loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self.loader._iterator = None

    def read(self, key: str, ids, batches):
        """One pass: ``(row indices, one stacked tensor per transform of ``key``, unreadable row indices)`` for each
        of ``batches`` (lists of row indices into ``ids``), in order."""
        self.requests.batches = [[(key, ids[i], i) for i in batch] for batch in batches]
        if self.opts.decode != "gpu":
            yield from self.loader
            return
        from extract import decode

        for index, raw, bad in self.loader:
            images, corrupt = decode.decode_batch(raw, self.opts.device)
            kept = [k for k in range(len(raw)) if k not in corrupt]
            inputs = tuple(torch.stack([t(image) for image in images]) for t in self.on_device[key]) if images else ()
            yield index[kept], inputs, bad + [int(index[k]) for k in corrupt]


def run_splits(splits: dict, source: ImageSource, key: str, heads: dict, parts: Path, opts: Options,
               desc: str, which: dict | None = None) -> tuple[dict, dict, list]:
    """:func:`run_pass` over every split's images at once:
    ({split: {head: outputs}}, {split: the split's kept row indices}, ids of unreadable images)."""
    all_ids = [i for ids, _ in splits.values() for i in ids]
    outputs, kept, bad = run_pass(all_ids, source, key, heads, parts, opts, desc, which)
    per_split, kept_by_split, start = {}, {}, 0
    for split, (ids, _) in splits.items():
        mine = (kept >= start) & (kept < start + len(ids))
        per_split[split] = {h: v[mine] for h, v in outputs.items()}
        kept_by_split[split] = kept[mine] - start
        start += len(ids)
    return per_split, kept_by_split, [all_ids[i] for i in bad]


def run_pass(ids, source: ImageSource, key: str, heads: dict, parts: Path, opts: Options,
             desc: str, which: dict | None = None) -> tuple[dict, np.ndarray, list]:
    """Run every head over the images ``ids``, read by ``source`` as its pass ``key`` (whose transforms are the
    heads', in order, unless ``which`` says which transform of the pass each head reads); resumable through
    per-batch part files. A part file that lacks some heads (a sharded feature pass, merged by a run that adds the
    fine-tuned weak models' logits) has its batch read again for those heads only.

    heads: name -> (transform PIL->tensor, fn tensor_Bx...->tensor_BxF).
    Returns ({name: outputs_MxF}, kept row indices M, ids of unreadable images).
    """
    parts.mkdir(parents=True, exist_ok=True)
    n, bs = len(ids), opts.batch_size
    batches = [list(range(b * bs, min(n, (b + 1) * bs))) for b in range(math.ceil(n / bs))]
    mine = range(len(batches)) if opts.shard is None else range(opts.shard[0], len(batches), opts.shard[1])
    names = list(heads)
    missing = {b: _missing_heads(parts / f"{b:06d}.npz", names) for b in mine}
    todo = [b for b in mine if missing[b]]
    loader = source.read(key, ids, [batches[b] for b in todo])
    use_amp = opts.device.startswith("cuda")
    bad_now = []
    total = sum(len(batches[b]) for b in mine)
    done = total - sum(len(batches[b]) for b in todo)

    def apply(index, inputs, which_heads) -> dict:
        if not len(index):
            return {}
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            return {name: heads[name][1](inputs[names.index(name) if which is None else which[name]]
                                         .to(opts.device, non_blocking=True)).float().cpu().numpy()
                    for name in which_heads}

    with tqdm(total=total, initial=done, desc=desc, unit="img", dynamic_ncols=True, disable=None) as bar:
        for b, (index, inputs, bad) in zip(todo, loader):
            path = parts / f"{b:06d}.npz"
            earlier = {}
            if len(missing[b]) < len(names):  # some heads are done: keep them if this read kept the same rows
                with np.load(path) as z:
                    earlier = {f: z[f] for f in z.files} if np.array_equal(z["index"], index.numpy()) else {}
            outputs = {**earlier, **apply(index, inputs, [h for h in names if h not in earlier])}
            bad_now += bad
            bar.update(len(batches[b]))
            if bad and opts.on_corrupt == "fail":
                continue  # not saved: a fixed image is read again on the rerun
            outputs.update(index=index.numpy(), bad=np.asarray(bad, np.int64))
            _save_npz(path, **outputs)
    if bad_now and opts.on_corrupt == "fail":
        raise CorruptImagesError({desc: [ids[i] for i in bad_now]})
    if opts.shard is not None:
        return {}, np.zeros(0, np.int64), []
    return _gather(parts, len(batches), names)


def _missing_heads(path: Path, names) -> list:
    """The heads of ``names`` that the part file ``path`` lacks (all of them when there is none)."""
    if not path.exists():
        return list(names)
    with np.load(path) as z:
        return [n for n in names if n not in z.files]


def _save_npz(path: Path, **arrays) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def _gather(parts: Path, num_batches: int, names) -> tuple[dict, np.ndarray, list]:
    outs, kept, bad = {h: [] for h in names}, [], []
    for b in range(num_batches):
        with np.load(parts / f"{b:06d}.npz") as z:
            kept.append(z["index"])
            bad += z["bad"].tolist()
            for h in names:
                if len(z["index"]):
                    outs[h].append(z[h])
    return {h: np.concatenate(v) for h, v in outs.items()}, np.concatenate(kept), bad


# --------------------------------------------------------------------- weak models


TUNED = "weak-tuned"  # the pass that fine-tunes every fine-tuned weak model at once, and gives their logits


def tuned_inputs(specs) -> tuple[list, dict]:
    """The fine-tuned weak models' distinct transforms, and which of them each model reads:
    ``([transform], {name: index})`` (:func:`weak.transform_key`)."""
    keys = list(dict.fromkeys(weak.transform_key(s) for s in specs))
    first = {key: next(s for s in specs if weak.transform_key(s) == key) for key in keys}
    return [weak.weak_transform(first[key]) for key in keys], {s.name: keys.index(weak.transform_key(s)) for s in specs}


def weak_passes(specs) -> dict:
    """The image passes the weak models ``specs`` need beyond the feature pass, ``{key: [transform]}``: each probe's
    own (``weak:NAME``: when the store exists already), and one for every fine-tuned model at once (``TUNED``)."""
    specs = list(specs)
    passes = {f"weak:{s.name}": [weak.weak_transform(s)] for s in specs if s.mode == "probe"}
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


def weak_recipe(spec: weak.WeakSpec, opts: Options) -> dict:
    """What a weak model is made from: its source and training settings. It is recorded in the store's weak_info
    and beside a fine-tuning checkpoint, and a weak model whose record differs is made anew, never reused."""
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


def tuned_logits(specs, dataset: Dataset, rows: dict, parts: Path, opts: Options,
                 source: ImageSource) -> tuple[dict, dict]:
    """Fine-tune every model of ``specs`` (:func:`finetune_weak`), then their logits per split in one more pass
    (a store that exists already: a new store's feature pass computes them, :func:`_extract`).

    Returns ``({name: {split: logits_NxK}}, {name: why it failed})``; a model that failed has no logits, and the
    others' are kept."""
    models, failed = finetune_weak(specs, dataset, rows["train"], parts, opts, source)
    if not models:
        return {}, failed
    keys = {spec.name: recipe_key(spec, opts) for spec in specs}
    heads, which = logit_heads(models, 0, tuned_inputs(specs)[1], keys)
    outs = run_splits(rows, source, TUNED, heads, parts / f"weaklogits-{'+'.join(models)}-all", opts,
                      f"{', '.join(models)} logits", which)[0]
    return {n: {s: out[f"{n}@{keys[n]}"] for s, out in outs.items()} for n in models}, failed


def tuned_info(spec: weak.WeakSpec, logits: dict, rows: dict, opts: Options, parts: Path) -> dict:
    """A fine-tuned weak model's provenance: its recipe, accuracy per split, and the sha256 of its weights (kept
    beside the store, :func:`weak_weights`; what is applied across domains must be this model)."""
    ckpt = parts / f"weak-{spec.name}.pt"
    kept = {"weights_sha256": encoders.sha256_file(ckpt)} if ckpt.is_file() else {}
    return with_accuracy({**weak_recipe(spec, opts), **kept}, logits, rows)


def add_weak_models(store: st.Store, specs, dataset: Dataset, rows: dict, parts: Path, opts: Options,
                    source: ImageSource, probe_feats: dict | None = None, tuned: tuple | None = None
                    ) -> tuple[st.Store, dict]:
    """``store`` with the logits of every weak model of ``specs`` added, in their order (probes: ``probe_feats``
    {name: {split: features}} from the feature pass, if it computed them; the fine-tuned ones: ``tuned``
    = ({name: {split: logits}}, {name: why it failed}) from the feature pass, else :func:`tuned_logits`);
    returns it and ``{name: why it failed}``."""
    if tuned is None:
        tuned = tuned_logits([s for s in specs if s.mode == "finetune"], dataset, rows, parts, opts, source) \
            if any(s.mode == "finetune" for s in specs) else ({}, {})
    logits, failed = tuned
    for spec in specs:
        if spec.mode == "probe":
            done = probe_logits(spec, dataset, rows, parts, opts, source, (probe_feats or {}).get(spec.name))
        elif spec.name in logits:
            done = logits[spec.name], tuned_info(spec, logits[spec.name], rows, opts, parts)
        else:
            continue
        store = st.with_weak_model(store, spec.name, *done)
        opts.log(f"weak model {spec.name}: test accuracy {done[1]['test_accuracy']:.4f}")
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


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _save_torch(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ---------------------------------------------------------------------- the store


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
        skipped=tuple(skipped),
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
        store, failed = add_weak_models(store, specs, dataset, rows, parts, opts, source, feats, tuned)
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


def kept_differences(store_path: Path, name: str, info: dict) -> list[str]:
    """``["its kept weights ... are missing"]`` when a fine-tuned weak model's weights, recorded in the store by their
    sha256, are no longer beside it as recorded (deleted, damaged or replaced); empty otherwise, and for a store that
    records none."""
    recorded = info.get("weights_sha256")
    kept = weak_weights(store_path, name)
    if not recorded:
        return []
    if not kept.is_file():
        return [f"its kept weights {kept} are missing"]
    return [] if encoders.sha256_file(kept) == recorded else [f"its kept weights {kept} are not the ones recorded"]


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
    new = []
    for s in specs:
        differ = recipe_differences(store.weak_info[s.name], weak_recipe(s, opts)) + kept_differences(
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
    with ImageSource(dataset.load, weak_passes(new), opts) as source:
        store, failed = add_weak_models(store, new, dataset, rows, parts, opts, source)
    st.write_store(out, store)
    keep_weak_weights(parts, out)
    shutil.rmtree(parts, ignore_errors=True)
    check_failed(failed, out)
    return out
