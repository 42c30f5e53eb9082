"""Results folders found and grouped: one :class:`Group` per (dataset, domain, weak model), merged across
w2s-fit and w2s-tp folders; a :class:`Table` is what every table function returns."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np

from w2s_jax import results
from w2s_jax.store import weak_kind as store_weak_kind


@dataclasses.dataclass
class Group:
    """All results of one (dataset, domain, weak model), merged across w2s-fit and w2s-tp folders."""

    dataset: str
    domain: str
    weak: str
    summary: dict
    histories: dict  # method -> {field: S x H x E}
    folders: list  # the results folders merged into this group


def weak_kind(group: Group) -> str:
    """The kind of the group's weak model (:func:`w2s_jax.store.weak_kind`), from its first folder's provenance."""
    prov = json.loads((Path(group.folders[0]) / "provenance.json").read_text()) if group.folders else {}
    return store_weak_kind(prov.get("weak_model"))


@dataclasses.dataclass
class Table:
    name: str  # file stem
    title: str
    header: list
    rows: list  # lists of str
    note: str = ""  # printed under the table


def discover(roots) -> list[Group]:
    """Every results folder (a folder with metrics.json) under ``roots``, grouped and merged."""
    found = {}
    for root in map(Path, roots):
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist; pass results folders written by w2s-fit or w2s-tp")
        for metrics_json in sorted(root.rglob("metrics.json")):
            folder = metrics_json.parent
            if any(part.startswith(".") or part.endswith(".tmp") for part in folder.relative_to(root).parts):
                continue  # a folder still being written (or left by a killed writer) is never read
            prov = json.loads((folder / "provenance.json").read_text())
            weak = json.loads((folder / "config.json").read_text())["weak"]
            found.setdefault((prov["dataset"], prov["domain"], weak), []).append(folder)
    if not found:
        raise FileNotFoundError(f"no results folders (metrics.json) under {', '.join(map(str, roots))}")
    groups = []
    for (dataset, domain, weak), folders in sorted(found.items()):
        results.check_mergeable(folders)
        summary = results.merge([results.load_summary(f) for f in folders])
        histories = {}
        for f in folders:
            with np.load(f / "history.npz") as z:
                for key in z.files:
                    method, field = key.split("/")
                    histories.setdefault(method, {})[field] = z[key]
        groups.append(Group(dataset, domain, weak, summary, histories, folders))
    return groups
