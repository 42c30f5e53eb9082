"""The feature store: the one module that knows the HDF5 layout (DESIGN.md §4).

Layout (schema version ``SCHEMA_VERSION``)::

    /                         attrs: schema_version, complete, provenance (JSON)
    /text/embeddings_TxKxD    text embeddings of the class prompts, one row per template (optional)
    /splits/{train,test}/
        features_NxD          strong image features, raw (not normalised)
        labels_N              int64 ground-truth labels
        ids_N                 sample ids (relative paths), UTF-8
        weak/{name}_NxK       weak-model logits, one dataset per weak model
    /weak/{name}              attrs: provenance (JSON) of that weak model

Writers build a :class:`Store` in memory and call :func:`write_store`, which writes a
temporary file and renames it into place, so a killed writer never leaves a file that
reads as complete. :func:`read_store` validates everything on open and raises
:class:`StoreError` naming the file, the problem and the fix.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import h5py
import numpy as np

SCHEMA_VERSION = 1
SPLITS = ("train", "test")


class StoreError(ValueError):
    """A feature store that cannot be used, with the reason and the fix."""

    def __init__(self, path, problem: str, fix: str = ""):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{path}: {problem}" + (f"\n  fix: {fix}" if fix else ""))


@dataclasses.dataclass(frozen=True)
class Provenance:
    """Where a store came from; compared when resuming or adding a weak model."""

    dataset: str  # e.g. "domainnet", "imagefolder", "demo"
    domain: str  # e.g. "real"; the folder name for an image folder
    class_names: tuple[str, ...]  # k names, label i is class_names[i]
    templates: tuple[str, ...]  # prompt templates, e.g. ("a photo of a {}.",); () without text tower
    encoder: str  # strong encoder id, e.g. "open_clip:ViT-B-32:openai"
    preprocessing: str  # JSON description of the strong image transform
    split_hash: str  # sha256 of the split definition (split files, or the demo's index lists)
    versions: dict  # package -> version at creation
    created: str  # ISO time of creation
    skipped: tuple[str, ...] = ()  # ids of unreadable images that were skipped
    split_rule: str = ""  # how train/test were made where no split files or folders give them (datasets by name)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Provenance":
        raw = json.loads(text)
        for key in ("class_names", "templates", "skipped"):
            raw[key] = tuple(raw.get(key, ()))
        return cls(**raw)


TRAINED = "trained on the target labels"  # every weak model whose record names no other kind (older stores too)


def weak_kind(info: dict | None) -> str:
    """What a weak model's record (``weak_info[name]``) says it is: "zero-shot", "mapped from another label space"
    (``extract.teachers``), or :data:`TRAINED`."""
    return (info or {}).get("kind") or TRAINED


@dataclasses.dataclass(frozen=True)
class Split:
    """One split of the store. N rows, D feature dims, K classes."""

    features_NxD: np.ndarray
    labels_N: np.ndarray
    ids_N: tuple[str, ...]
    weak_logits: dict  # weak-model name -> logits_NxK


@dataclasses.dataclass(frozen=True)
class Store:
    provenance: Provenance
    splits: dict  # "train" / "test" -> Split
    text_TxKxD: np.ndarray | None  # None for an encoder without a text tower
    weak_info: dict  # weak-model name -> provenance dict

    @property
    def num_classes(self) -> int:
        return len(self.provenance.class_names)

    @property
    def weak_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.weak_info))


def compatibility_problems(have: Provenance, want: Provenance) -> list[str]:
    """Reasons why a store built as ``have`` cannot be continued as ``want`` (empty if none)."""
    problems = []
    for field in ("dataset", "domain", "encoder", "class_names", "templates", "split_hash"):
        a, b = getattr(have, field), getattr(want, field)
        if a != b:
            shown = (lambda v: f"{len(v)} classes starting {list(v[:3])}") if field == "class_names" else repr
            problems.append(f"{field} differs: store has {shown(a)}, this run has {shown(b)}")
    return problems


# ---------------------------------------------------------------------------- write


def write_store(path, store: Store) -> None:
    """Validate ``store`` and write it to ``path`` atomically (temp file, then rename)."""
    path = Path(path)
    _validate(path, store)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["complete"] = False
        f.attrs["provenance"] = store.provenance.to_json()
        if store.text_TxKxD is not None:
            f.create_dataset("text/embeddings_TxKxD", data=store.text_TxKxD)
        for name, split in store.splits.items():
            g = f.create_group(f"splits/{name}")
            g.create_dataset("features_NxD", data=split.features_NxD, chunks=True, compression="lzf")
            g.create_dataset("labels_N", data=np.asarray(split.labels_N, np.int64))
            g.create_dataset("ids_N", data=np.array(split.ids_N, dtype=object), dtype=h5py.string_dtype())
            for weak, logits in split.weak_logits.items():
                g.create_dataset(f"weak/{weak}_NxK", data=np.asarray(logits, np.float32))
        for weak, info in store.weak_info.items():
            f.create_group(f"weak/{weak}").attrs["provenance"] = json.dumps(info, sort_keys=True)
        f.attrs["complete"] = True
    os.replace(tmp, path)


def with_weak_model(store: Store, name: str, logits_by_split: dict, info: dict) -> Store:
    """A copy of ``store`` with weak model ``name`` added (or replaced)."""
    splits = {
        s: dataclasses.replace(sp, weak_logits={**sp.weak_logits, name: logits_by_split[s]})
        for s, sp in store.splits.items()
    }
    return dataclasses.replace(store, splits=splits, weak_info={**store.weak_info, name: info})


def without_weak_models(store: Store, names) -> Store:
    """A copy of ``store`` without the weak models ``names`` (those about to be made anew)."""
    splits = {s: dataclasses.replace(sp, weak_logits={k: v for k, v in sp.weak_logits.items() if k not in names})
              for s, sp in store.splits.items()}
    return dataclasses.replace(store, splits=splits, weak_info={k: v for k, v in store.weak_info.items()
                                                                if k not in names})


# ----------------------------------------------------------------------------- read


def read_store(path, *, need_weak: tuple[str, ...] = ()) -> Store:
    """Open and validate a store; ``need_weak`` names weak models that must be present."""
    path = Path(path)
    if not path.exists():
        partial = path.with_name(path.name + ".parts")
        hint = (
            f"an interrupted extraction left {partial}; rerun the same w2s-extract command to resume"
            if partial.exists()
            else "run w2s-extract first, or check the path"
        )
        raise StoreError(path, "no such store", hint)
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        if is_lock_error(err):  # a good store that another process holds open: never advise deleting it
            raise StoreError(path, "another process is writing this store (the file is locked)",
                             "wait for that process to finish, or pass another --out") from None
        raise StoreError(path, f"not a readable HDF5 file ({err})", "delete it and rerun w2s-extract") from None
    with f:
        version = f.attrs.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(
                path,
                f"schema version {version}, this w2s reads version {SCHEMA_VERSION}",
                "re-extract the store with this version of w2s-extract",
            )
        if not f.attrs.get("complete", False):
            raise StoreError(path, "store is incomplete (its writer was interrupted)", "rerun w2s-extract to resume")
        try:
            provenance = Provenance.from_json(f.attrs["provenance"])
            text = f["text/embeddings_TxKxD"][()] if "text" in f else None
            splits = {}
            for name in SPLITS:
                g = f[f"splits/{name}"]
                weak = {k[: -len("_NxK")]: g[f"weak/{k}"][()] for k in g.get("weak", {})}
                ids = tuple(s.decode() if isinstance(s, bytes) else s for s in g["ids_N"][()])
                splits[name] = Split(g["features_NxD"][()], g["labels_N"][()], ids, weak)
            weak_info = {k: json.loads(v.attrs["provenance"]) for k, v in f.get("weak", {}).items()}
        except (KeyError, TypeError, ValueError) as err:
            raise StoreError(path, f"missing or malformed entry ({err})", "re-extract the store") from None
    store = Store(provenance, splits, text, weak_info)
    _validate(path, store)
    missing = [w for w in need_weak if w not in store.weak_info]
    if missing:
        raise StoreError(
            path,
            f"weak model(s) {missing} not in store; it has {list(store.weak_names) or 'none'}",
            f"add one with: w2s-extract ... --out {path} --weak {missing[0]}",
        )
    return store


def is_lock_error(err: OSError) -> bool:
    """HDF5's file lock held by another process (errno 11, EAGAIN)."""
    return getattr(err, "errno", None) == 11 or "errno = 11" in str(err) or "unable to lock file" in str(err)


def _validate(path, store: Store) -> None:
    """Raise StoreError unless shapes, dtypes, labels and values are consistent and finite."""
    k = store.num_classes
    if k < 2:
        raise StoreError(path, f"{k} class names; need at least 2", "check the dataset's class list")
    dims = set()
    for name in SPLITS:
        if name not in store.splits:
            raise StoreError(path, f"split '{name}' missing", "re-extract the store")
        sp = store.splits[name]
        n = len(sp.ids_N)
        feats = np.asarray(sp.features_NxD)
        if feats.ndim != 2 or feats.shape[0] != n or not np.issubdtype(feats.dtype, np.floating):
            raise StoreError(path, f"{name}: features {feats.shape} {feats.dtype}, expected float ({n}, D)")
        dims.add(feats.shape[1])
        labels = np.asarray(sp.labels_N)
        if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
            raise StoreError(path, f"{name}: labels {labels.shape} {labels.dtype}, expected int ({n},)")
        if n and (labels.min() < 0 or labels.max() >= k):
            raise StoreError(
                path, f"{name}: labels span [{labels.min()}, {labels.max()}] but there are {k} classes",
                "the class list does not match the labels; re-extract the store",
            )
        _check_finite(path, f"{name} features", feats)
        for weak, logits in sp.weak_logits.items():
            logits = np.asarray(logits)
            if not np.issubdtype(logits.dtype, np.floating):
                raise StoreError(path, f"{name}: weak '{weak}' logits have dtype {logits.dtype}, expected float",
                                 f"re-add that weak model: w2s-extract ... --out {path} --weak {weak}")
            if logits.shape != (n, k):
                raise StoreError(path, f"{name}: weak '{weak}' logits {logits.shape}, expected ({n}, {k})")
            _check_finite(path, f"{name} weak '{weak}' logits", logits)
    if len(dims) != 1:
        raise StoreError(path, f"splits have different feature dims {sorted(dims)}", "re-extract the store")
    if store.text_TxKxD is not None:
        text = np.asarray(store.text_TxKxD)
        if text.ndim != 3 or text.shape[1:] != (k, dims.pop()):
            raise StoreError(path, f"text embeddings {text.shape}, expected (T, {k}, D)")
        _check_finite(path, "text embeddings", text)
    names_in_splits = {frozenset(sp.weak_logits) for sp in store.splits.values()}
    if names_in_splits != {frozenset(store.weak_info)}:
        raise StoreError(path, "weak models differ between splits and /weak", "re-add the weak model")


def _check_finite(path, what: str, x: np.ndarray) -> None:
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.unique(np.nonzero(bad)[0])
        raise StoreError(
            path,
            f"{what}: {bad.sum()} non-finite values (NaN/inf) in {len(rows)} rows, first rows {rows[:5].tolist()}",
            "the model that produced them diverged or the input was corrupt; re-extract (or re-add that weak model)",
        )


def ids_digest(ids_N) -> str:
    """sha256 of a split's sample ids, in order: tells two stores of the same dataset apart by their rows."""
    return hashlib.sha256("\n".join(map(str, ids_N)).encode()).hexdigest()


def rows_record(split) -> dict:
    """What a fit records of the rows it saw, so that later commands can tell its own store by content: the row
    count, a hash of the ids and a hash of the features and labels (a store remade at the same path, even with the
    same ids, differs there)."""
    content = hashlib.sha256(np.ascontiguousarray(split.features_NxD, np.float32).tobytes())
    content.update(np.ascontiguousarray(split.labels_N, np.int64).tobytes())
    return {"rows": len(split.ids_N), "ids_sha256": ids_digest(split.ids_N), "content_sha256": content.hexdigest()}


def rows_differ(fitted: dict | None, here: dict) -> str:
    """Why a store's rows (:func:`rows_record`) are not the ones a fit recorded, or "" if they are."""
    if not fitted:
        return "the folder does not record which rows it was fit on (fit before w2s 0.1's row record; refit to compare)"
    if (fitted["rows"], fitted["ids_sha256"]) != (here["rows"], here["ids_sha256"]):
        return (f"this store's test split has {here['rows']:,} rows (ids hash {here['ids_sha256'][:12]}), the fit's had "
                f"{fitted['rows']:,} ({fitted['ids_sha256'][:12]}): the same dataset and split files, but other rows "
                "(a re-extraction that skipped files, say)")
    if fitted.get("content_sha256", here["content_sha256"]) != here["content_sha256"]:
        return ("this store holds the fit's row ids with other features or labels (content hash "
                f"{here['content_sha256'][:12]}, the fit's {fitted['content_sha256'][:12]}): it was remade since "
                "the fit (another encoder run or weak model, say); refit on it to compare")
    return ""
