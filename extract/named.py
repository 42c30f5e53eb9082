"""Datasets by name (``w2s-extract --dataset cifar100``): CLIP's evaluation datasets through ``torchvision.datasets``,
and ImageNet with its shifted test sets, placed by hand.

Every dataset lives in the data folder (``--root`` or ``$W2S_DATA``, default ./data): torchvision's in the folders
torchvision makes there (``cifar-10-batches-py/``, ``food-101/``, ...), so an existing torchvision data folder is read
as it is; ImageNet and its shifted sets in ``<data folder>/<name>``. Its class names and
zero-shot templates are CLIP's published ones (``extract/data/clip_prompts.json``; ImageNet's from open_clip), so the
store's text embeddings average the dataset's own templates. Splits follow the W2S protocol: the official train split
(train and val where there are both) trains the weak model, the official test split is the pool ``w2s-fit`` divides.
A dataset without an official split gets a fixed, seeded, class-stratified one (:func:`stratified_split`), named in
the store's provenance (``split_rule``).
"""
from __future__ import annotations

import dataclasses
import json
from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np

from extract.datasets import (IMAGE_SUFFIXES, Dataset, DatasetError, FileLoader, hash_splits, is_hidden,
                              to_rgb)

SPLIT_SEED, SHIFT_TEST_FRACTION = 0, 0.5


@dataclasses.dataclass(frozen=True)
class Named:
    """One dataset by name: what ``--list-datasets`` prints and how its splits are made."""

    title: str
    images: str  # e.g. "50,000 / 10,000" (train / test)
    download_gb: float | None  # None: placed by hand (the message says where)
    split: str  # the split rule, as recorded in the store
    build: Callable | None  # (data folder, download) -> {part: torchvision dataset}; None: ImageNet's family, by hand


def _tv(cls_name: str, parts: dict, **kw) -> Callable:
    """A builder from ``torchvision.datasets.<cls_name>``: ``parts`` maps our part names to its split argument."""
    def build(folder: Path, download: bool) -> dict:
        import torchvision.datasets as tvd

        cls = getattr(tvd, cls_name)
        out = {}
        for part, arg in parts.items():
            args = dict(kw, **({} if arg is None else arg))
            out[part] = cls(str(folder), download=download, **args)
        return out
    return build


OFFICIAL = "official train / test"
TRAINVAL = "official train + val / test"
SEEDED = "seeded class-stratified split, {pct}% test (seed {seed}), as the dataset has no official split"

NAMED = {
    "cifar10": Named("CIFAR-10", "50,000 / 10,000", 0.17, OFFICIAL,
                     _tv("CIFAR10", {"train": {"train": True}, "test": {"train": False}})),
    "cifar100": Named("CIFAR-100", "50,000 / 10,000", 0.17, OFFICIAL,
                      _tv("CIFAR100", {"train": {"train": True}, "test": {"train": False}})),
    "stl10": Named("STL-10", "5,000 / 8,000", 2.6, OFFICIAL,
                   _tv("STL10", {"train": {"split": "train"}, "test": {"split": "test"}})),
    "food101": Named("Food-101", "75,750 / 25,250", 5.0, OFFICIAL,
                     _tv("Food101", {"train": {"split": "train"}, "test": {"split": "test"}})),
    "pets": Named("Oxford-IIIT Pets", "3,680 / 3,669", 0.8, "official trainval / test",
                  _tv("OxfordIIITPet", {"train": {"split": "trainval"}, "test": {"split": "test"}})),
    "flowers102": Named("Flowers-102", "2,040 / 6,149", 0.35, TRAINVAL,
                        _tv("Flowers102", {"train": {"split": "train"}, "val": {"split": "val"},
                                           "test": {"split": "test"}})),
    "dtd": Named("DTD (partition 1)", "3,760 / 1,880", 0.6, TRAINVAL,
                 _tv("DTD", {"train": {"split": "train"}, "val": {"split": "val"}, "test": {"split": "test"}},
                     partition=1)),
    "eurosat": Named("EuroSAT (RGB)", "18,900 / 8,100", 0.09, SEEDED.format(pct=30, seed=SPLIT_SEED),
                     _tv("EuroSAT", {"all": None})),
    "gtsrb": Named("GTSRB", "26,640 / 12,630", 0.35, OFFICIAL,
                   _tv("GTSRB", {"train": {"split": "train"}, "test": {"split": "test"}})),
    "fgvc-aircraft": Named("FGVC-Aircraft (variants)", "6,667 / 3,333", 2.75, "official trainval / test",
                           _tv("FGVCAircraft", {"train": {"split": "trainval"}, "test": {"split": "test"}},
                               annotation_level="variant")),
    "imagenet": Named("ImageNet-1k (ILSVRC-2012)", "1,281,167 / 50,000", None, "official train / val", None),
    "imagenet-v2": Named("ImageNet-V2 (matched frequency)", "10,000", None,
                         SEEDED.format(pct=50, seed=SPLIT_SEED), None),
    "imagenet-sketch": Named("ImageNet-Sketch", "50,889", None, SEEDED.format(pct=50, seed=SPLIT_SEED), None),
    "imagenet-r": Named("ImageNet-R (200 classes)", "30,000", None, SEEDED.format(pct=50, seed=SPLIT_SEED), None),
    "imagenet-a": Named("ImageNet-A (200 classes)", "7,500", None, SEEDED.format(pct=50, seed=SPLIT_SEED), None),
}
TEST_FRACTION = {"eurosat": 0.3, **{n: SHIFT_TEST_FRACTION for n in NAMED if n.startswith("imagenet-")}}
IMAGENET_LAYOUT = {
    "imagenet": "{f}/train/<wnid>/<image>.JPEG and {f}/val/<wnid>/<image>.JPEG (the val images sorted into wnid "
                "folders, as torchvision.datasets.ImageNet leaves them)",
    "imagenet-v2": "{f}/<class index 0..999>/<image>.jpeg (imagenetv2-matched-frequency-format-val, renamed or inside)",
    "imagenet-sketch": "{f}/<wnid>/<image>.JPEG (or {f}/sketch/<wnid>/...)",
    "imagenet-r": "{f}/<wnid>/<image>.jpg (imagenet-r.tar unpacked)",
    "imagenet-a": "{f}/<wnid>/<image>.jpg (imagenet-a.tar unpacked)",
}


def is_named(name: str) -> bool:
    return name in NAMED


def family(name: str) -> str:
    """``imagenet`` for ImageNet and its shifted sets (the domains of one ImageNet experiment), else the name."""
    return name.split("-")[0] if name.startswith("imagenet") else name


def check_domain(name: str, domain: str | None) -> str:
    """The dataset a ``--dataset NAME --domain DOMAIN`` pair names: DOMAIN must be NAME or a dataset of its family
    (``--dataset imagenet --domain imagenet-r``)."""
    if domain in (None, name):
        return name
    if domain in NAMED and family(domain) == family(name):
        return domain
    others = [n for n in NAMED if family(n) == family(name) and n != name]
    raise DatasetError(f"dataset {name} has no domain {domain!r}; leave the domain out" +
                       (f", or choose one of {', '.join(others)}" if others else ""))


# ------------------------------------------------------------------ names, prompts


def _prompts() -> dict:
    return json.loads(resources.files("extract").joinpath("data/clip_prompts.json").read_text())


def imagenet_wnids(subset: str = "") -> list[str]:
    """ImageNet-1k's 1000 WordNet ids in label order, or those of ImageNet-R/-A's 200-class subset (timm's lists)."""
    info = resources.files("timm").joinpath("data/_info")
    name = {"": "imagenet_synsets.txt", "imagenet-r": "imagenet_r_synsets.txt",
            "imagenet-a": "imagenet_a_synsets.txt"}[subset]
    return info.joinpath(name).read_text().split()


def class_names(name: str) -> tuple[str, ...]:
    """The dataset's class names in label order (CLIP's names)."""
    if name.startswith("imagenet"):
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if name in ("imagenet-r", "imagenet-a"):
            index = {w: i for i, w in enumerate(imagenet_wnids())}
            return tuple(IMAGENET_CLASSNAMES[index[w]] for w in imagenet_wnids(name))
        return tuple(IMAGENET_CLASSNAMES)
    return tuple(_prompts()[name]["classes"])


def templates(name: str) -> tuple[str, ...]:
    """CLIP's zero-shot templates of the dataset (``{}`` is the class name)."""
    if name.startswith("imagenet"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

        return tuple(t("{}") for t in OPENAI_IMAGENET_TEMPLATES)
    return tuple(_prompts()[name]["templates"])


def listing() -> list[str]:
    """``w2s-extract --list-datasets``: a line per dataset (name, size, download, split) and its classes."""
    lines = []
    for name, d in NAMED.items():
        fetch = f"downloads itself, about {d.download_gb} GB" if d.download_gb else "placed by hand"
        names = class_names(name)
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} classes)" if len(names) > 8 else "")
        lines.append(f"{name:16} {d.title}: {d.images} images, {len(names)} classes; {fetch}; {d.split}\n"
                     f"{'':16} classes: {shown}")
    return lines


# ------------------------------------------------------------------------- loading


def load_named(name: str, data_root, *, download: bool = False, log=print) -> Dataset:
    """The dataset ``name`` from the data folder ``data_root`` (torchvision's layout in it; ImageNet's family in
    ``data_root/name``); downloads it there first (after a notice of the size) when ``download`` and it is missing."""
    d = NAMED[name]
    folder = Path(data_root).expanduser()
    if d.build is None:
        return _imagenet_family(name, folder / name)
    try:
        parts = d.build(folder, False)
    except RuntimeError:  # torchvision: "Dataset not found or corrupted"
        if not download:
            raise DatasetError(f"{d.title} is not in the data folder {folder} (or is incomplete), and it is not "
                               f"downloaded here (--no-download). Fetch it with: w2s-extract --dataset {name} --root "
                               f"{folder}  (about {d.download_gb} GB), or place torchvision's files for it there by "
                               "hand") from None
        parts = _download(name, folder, log)
    labels = {part: _targets(ds) for part, ds in parts.items()}
    if "all" in parts:
        train, test = stratified_split(labels["all"], TEST_FRACTION[name], SPLIT_SEED)
        rows = {"train": [("all", i) for i in train], "test": [("all", i) for i in test]}
    else:  # val, where there is one, trains the weak model with train
        merged = {"train": [p for p in parts if p in ("train", "val")], "test": ["test"]}
        rows = {s: [(p, i) for p in ps for i in range(len(labels[p]))] for s, ps in merged.items()}
    splits = {s: (tuple(f"{p}/{i:06d}" for p, i in r), np.asarray([labels[p][i] for p, i in r], np.int64))
              for s, r in rows.items()}
    return _dataset(name, splits, TorchvisionImages(parts))


def _download(name: str, folder: Path, log) -> dict:
    from extract.download import DownloadError, resumable_torchvision

    d = NAMED[name]
    log(f"{d.title} is not in the data folder {folder}. Downloading it there: about {d.download_gb} GB (resumable: rerun after an "
        "interruption; --no-download to refuse; $W2S_DATA or --root moves the data folder).")
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with resumable_torchvision():
            return d.build(folder, True)
    except (OSError, RuntimeError) as err:
        raise DownloadError(f"downloading {d.title} into {folder} failed ({err}); rerun to resume. Offline? Fetch "
                            f"torchvision's files for it elsewhere and place them in {folder}") from None


def _dataset(name: str, splits: dict, load) -> Dataset:
    names = class_names(name)
    for split, (_, labels) in splits.items():
        if len(labels) and (labels.min() < 0 or labels.max() >= len(names)):
            raise DatasetError(f"{name}: {split} labels run from {labels.min()} to {labels.max()}, but the dataset "
                               f"has {len(names)} classes; the files in its folder are not {NAMED[name].title}'s")
    return Dataset(family(name), name, names, splits, load, hash_splits(splits), templates=templates(name),
                   split_rule=NAMED[name].split)


def _targets(ds) -> np.ndarray:
    """A torchvision dataset's labels, without decoding its images."""
    for attr in ("targets", "labels", "_labels"):
        if hasattr(ds, attr):
            return np.asarray(getattr(ds, attr), np.int64)
    if hasattr(ds, "_samples"):  # GTSRB: (path, label) pairs
        return np.asarray([label for _, label in ds._samples], np.int64)
    return np.asarray([ds[i][1] for i in range(len(ds))], np.int64)


def stratified_split(labels_N, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A fixed, seeded, class-stratified split of rows into (train rows, test rows), disjoint and sorted: each class
    gives ``round(test_fraction * its size)`` rows to test, chosen by a seeded permutation."""
    labels = np.asarray(labels_N)
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        test.extend(rng.permutation(rows)[:int(round(test_fraction * len(rows)))])
    test = np.sort(np.asarray(test, np.int64))
    return np.setdiff1d(np.arange(len(labels)), test), test


class TorchvisionImages:
    """id ``PART/INDEX`` -> RGB PIL image of that torchvision dataset's item (picklable, as its datasets are)."""

    def __init__(self, parts: dict):
        self.parts = parts

    def __call__(self, sample_id: str):
        part, index = sample_id.rsplit("/", 1)
        return to_rgb(self.parts[part][int(index)][0])


# --------------------------------------------------------------- ImageNet, by hand


def _imagenet_family(name: str, folder: Path) -> Dataset:
    """ImageNet and its shifted test sets from their official layouts (:data:`IMAGENET_LAYOUT`)."""
    layout = IMAGENET_LAYOUT[name].format(f=folder)
    if not folder.is_dir():
        raise DatasetError(f"{NAMED[name].title} is not in {folder}; it is not downloaded by w2s (its licence asks "
                           f"for a sign-up or it has no torchvision loader): place it there by hand as {layout}")
    if name == "imagenet":
        splits = {s: _wnid_rows(folder, sub, imagenet_wnids(), layout) for s, sub in (("train", "train"),
                                                                                      ("test", "val"))}
        return _dataset(name, splits, FileLoader(str(folder)))
    if name == "imagenet-v2":
        inner = folder / "imagenetv2-matched-frequency-format-val"
        base = inner if inner.is_dir() else folder
        ids, labels = _folder_rows(folder, base, {str(i): i for i in range(1000)}, layout)
    else:
        inner = folder / "sketch"
        base = inner if name == "imagenet-sketch" and inner.is_dir() else folder
        wnids = imagenet_wnids(name if name in ("imagenet-r", "imagenet-a") else "")
        ids, labels = _folder_rows(folder, base, {w: i for i, w in enumerate(wnids)}, layout)
    train, test = stratified_split(labels, TEST_FRACTION[name], SPLIT_SEED)
    splits = {"train": (tuple(ids[i] for i in train), labels[train]), "test": (tuple(ids[i] for i in test),
                                                                             labels[test])}
    return _dataset(name, splits, FileLoader(str(folder)))


def _wnid_rows(folder: Path, sub: str, wnids: list, layout: str) -> tuple:
    if not (folder / sub).is_dir():
        raise DatasetError(f"{folder / sub} not found; ImageNet's layout is {layout}")
    ids, labels = _folder_rows(folder, folder / sub, {w: i for i, w in enumerate(wnids)}, layout)
    return tuple(ids), labels


def _folder_rows(root: Path, base: Path, label_of: dict, layout: str) -> tuple[list, np.ndarray]:
    """Images under ``base/<class folder>/``, ids relative to ``root``, labels by ``label_of[class folder]``."""
    folders = sorted(c.name for c in base.iterdir() if c.is_dir() and not is_hidden(c.name))
    unknown = [f for f in folders if f not in label_of]
    if unknown or not folders:
        raise DatasetError(f"{base}: class folder(s) {unknown[:5] or '(none)'} are not this dataset's; its layout is "
                           f"{layout}")
    pairs = []
    for name in folders:
        pairs += [(str((base / name / f.name).relative_to(root)), label_of[name]) for f in (base / name).iterdir()
                  if f.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(f.name)]
    pairs.sort()
    if not pairs:
        raise DatasetError(f"{base}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders; layout: {layout}")
    return [p for p, _ in pairs], np.asarray([y for _, y in pairs], np.int64)
