"""One image pass of an extraction: a loader whose workers decode each image once for every model of the pass, and
resumable per-batch part files (``<out>.parts/<pass>/<batch>.npz``, written to a temp name, then renamed), so a
killed run redoes at most one batch per pass."""
from __future__ import annotations

import dataclasses
import io
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from extract.datasets import FileLoader


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
