"""W2S under distribution shift: the heads fitted on one domain's store, evaluated on every other store of the same
encoder and classes (issue #24). Nothing is refitted: each results folder's saved heads are applied to the target
store's features, one GEMM per seed.

Evaluation rows: the target store's ``test'`` rows of each seed (the same per-seed splits as a fit on that store,
``w2s_jax.splits``), so the diagonal equals each fit's reported test' accuracy. The weak model on another domain
comes from ``extract.cross_weak`` (a probe retrained on the source and applied to the target's images), where it could
be had; with it, a cell also has PGR against the ceiling of the method's head, evaluated the same way.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from w2s_jax.saved_heads import HeadsError, load_heads
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store, rows_differ, rows_record


def domain_of(folder: Path) -> tuple[str, str]:
    prov = json.loads((Path(folder) / "provenance.json").read_text())
    return prov["dataset"], prov["domain"]


def target_stores(folders) -> tuple[dict, list[str]]:
    """``({(dataset, domain): store path}, notes)``: the store each results folder was fitted on; a store that is
    no longer on disk is left out, with a note saying so."""
    stores, notes = {}, []
    for folder in map(Path, folders):
        # the store's absolute path, recorded by the fit; a folder written before that holds the path as given
        recorded = json.loads((folder / "provenance.json").read_text()).get("store_file")
        path = Path(recorded or json.loads((folder / "config.json").read_text())["store"])
        domain = domain_of(folder)
        if not path.is_file():
            notes.append(f"{'/'.join(domain)}: its store {path} is not on disk; that domain is left out as a target")
            continue
        stores.setdefault(domain, path)
    return stores, notes


def remade(folders, stores: dict) -> dict:
    """``{domain: why}`` for each target store whose test rows are not the ones a fit of its domain recorded
    (:func:`w2s_jax.store.rows_differ`): a store remade at the same path, with other rows or other content, would
    otherwise give a diagonal that is not the fit's."""
    records = {domain: rows_record(store.splits["test"]) for domain, store in stores.items()}
    found = {}
    for folder in map(Path, folders):
        fitted = json.loads((folder / "provenance.json").read_text()).get("test_rows")
        domain = domain_of(folder)
        why = rows_differ(fitted, records[domain]) if fitted and domain in records else ""
        if why:
            found.setdefault(domain, why)
    return found


def class_columns(head_classes, target_classes) -> np.ndarray | None:
    """The columns of the heads' classes that are the target's classes, in the target's order: every column for the
    same class list, a subset for a target with fewer (ImageNet-R's 200 of ImageNet's 1000: the target's images are
    classified among its own classes, its standard protocol); None where the target has classes the heads lack."""
    head_classes, target_classes = tuple(head_classes), tuple(target_classes)
    if head_classes == target_classes:
        return np.arange(len(head_classes))
    index = {name: i for i, name in enumerate(head_classes)}
    if len(target_classes) < len(head_classes) and all(name in index for name in target_classes):
        return np.asarray([index[name] for name in target_classes])
    return None


def check_compatible(head, store, where: str) -> np.ndarray | None:
    """The head's columns for ``store``'s classes (:func:`class_columns`), or None when the store has classes the
    head lacks but all of the head's (ImageNet-R's heads on ImageNet: no cell); a HeadsError naming what differs when
    ``store`` does not hold features the head takes, or its class list is another one."""
    checks = (
        ("encoder", store.provenance.encoder, head.encoder),
        ("feature dimension", store.splits["test"].features_NxD.shape[1], head.feature_dim),
    )
    for what, have, want in checks:
        if tuple(np.atleast_1d(have)) != tuple(np.atleast_1d(want)):
            raise HeadsError(f"{where}: its {what} differ from the heads' ({_short(have)} against {_short(want)}); "
                             "cross-domain evaluation needs stores of one encoder")
    have, want = tuple(store.provenance.class_names), tuple(head.class_names)
    columns = class_columns(want, have)
    if columns is None and not (len(have) > len(want) and set(want) <= set(have)):
        order = " (the same classes in another order)" if set(have) == set(want) else ""
        raise HeadsError(f"{where}: its class names differ from the heads'{order} ({_short(have)} against "
                         f"{_short(want)}); cross-domain evaluation needs stores of one class list, or of a subset "
                         "of the heads' classes")
    return columns


def _short(value) -> str:
    value = list(np.atleast_1d(value))
    return ", ".join(map(str, value[:4])) + (", ..." if len(value) > 4 else "")


FAILED = "failed"  # a cell of a method that failed in training: never evaluated, never used for PGR


def evaluate(folder, store, where: str) -> dict | None:
    """``{method: test' accuracy per seed (S)}`` of the folder's saved heads (each at its chosen grid point) on the
    target ``store``'s test' rows of each seed, among the target's classes (:func:`class_columns`), or
    :data:`FAILED` for a method the fit reports as failed (its heads are never applied); None when the target has
    classes the heads lack. ``where`` names the store in a refusal."""
    test = store.splits["test"]
    out = {}
    for method, head in load_heads(folder).items():
        columns = check_compatible(head, store, where)
        if columns is None:
            return None
        if head.failed():
            out[method] = FAILED
            continue
        splits = stacked_splits(len(test.ids_N), head.num_seeds)
        out[method] = [float(np.mean(head.logits(test.features_NxD[rows], seed=s)[:, columns].argmax(1)
                                     == test.labels_N[rows])) for s, rows in enumerate(splits.test_prime)]
    return out


def cross_weak_file(folder, weak: str, source: str, target: str) -> Path:
    """Where ``extract.cross_weak`` writes the logits of ``weak`` trained on ``source``, applied to ``target``
    (domains as ``dataset/domain``): ``FOLDER/WEAK/SOURCE__on__TARGET.npz``."""
    return Path(folder) / weak / f"{source.replace('/', '-')}__on__{target.replace('/', '-')}.npz"


def read_cross_weak(path) -> tuple[np.ndarray, np.ndarray]:
    """``(ids_N, logits_NxK)`` of an ``extract.cross_weak`` file; a ValueError naming the file when it is cut short,
    not an npz, or holds mismatched or non-finite arrays."""
    try:
        with np.load(path) as z:
            ids, logits = np.asarray(z["ids"]), np.asarray(z["logits_NxK"])
    except Exception as err:  # zipfile, pickle and key errors alike: the file is not what cross_weak writes
        raise ValueError(f"{path}: not a readable weak-model file ({type(err).__name__}); delete it, and w2s-run "
                         "writes it again") from None
    if logits.ndim != 2 or len(ids) != len(logits) or not np.isfinite(logits).all():
        raise ValueError(f"{path}: {len(ids)} ids against logits of shape {logits.shape}, or non-finite logits; "
                         "delete it, and w2s-run writes it again")
    return ids, logits


def made_from_of(path) -> dict | None:
    """What an ``extract.cross_weak`` file was computed from (``{"weak": the source store's weak_info}``); None for a
    file written before it recorded that."""
    with np.load(path) as z:
        return json.loads(str(z["made_from"])) if "made_from" in z.files else None


def weak_on_target(cross_dir, weak: str, source: str, target: str, store, seeds: int, weak_info=None):
    """The weak model ``weak`` of ``source`` on ``target``'s test' rows of each seed (S), or None where it cannot be
    had: on its own domain from the store; elsewhere from ``extract.cross_weak``'s file in ``cross_dir``, if any and
    if made from the weak model the fit used (``weak_info``: the source folder's record of it)."""
    test = store.splits["test"]
    if source == target:
        if weak not in test.weak_logits:
            return None
        logits = test.weak_logits[weak]
    else:
        path = cross_weak_file(cross_dir, weak, source, target) if cross_dir is not None else None
        if path is None or not path.is_file():
            return None
        ids, logits = read_cross_weak(path)
        if tuple(ids.tolist()) != tuple(test.ids_N):
            return None  # made for another version of the target store
        if made_from_of(path) != {"weak": weak_info}:
            return None  # made from another weak model than the one the fit learned from
    splits = stacked_splits(len(test.ids_N), seeds)
    return [float(np.mean(logits[rows].argmax(1) == test.labels_N[rows])) for rows in splits.test_prime]


def matrix(folders, cross_dir=None) -> tuple[dict, list[str], list[str]]:
    """Every folder's heads on every target store: ``({weak: {method: {(source, target): accuracies (S)}}},
    target domains in order, notes)``; domains are ``dataset/domain`` strings. The row ``"weak"`` holds the weak
    model's accuracies where they can be had (:func:`weak_on_target`)."""
    paths, notes = target_stores(folders)
    stores = {target: read_store(path) for target, path in paths.items()}  # each store read once
    for target, why in remade(folders, stores).items():
        del stores[target]
        notes.append(f"{'/'.join(target)}: the store at {paths[target]} is not the one its fit used ({why}); that "
                     "domain is left out as a target")
    found = {}
    for folder in map(Path, folders):
        config = json.loads((folder / "config.json").read_text())
        weak_info = json.loads((folder / "provenance.json").read_text()).get("weak_model")
        weak = config["weak"]
        source = "/".join(domain_of(folder))
        for target, store in stores.items():
            cells = found.setdefault(weak, {})
            evaluated = evaluate(folder, store, f"store {paths[target]}")
            if evaluated is None:
                note = (f"{source} -> {'/'.join(target)}: the target has classes the heads of {source} lack; no "
                        "cell (a target with a subset of the heads' classes is classified among its own)")
                notes += [] if note in notes else [note]
                continue
            for method, accs in evaluated.items():
                cells.setdefault(method, {})[(source, "/".join(target))] = accs
            weak_accs = weak_on_target(cross_dir, weak, source, "/".join(target), store, config["seeds"], weak_info)
            if weak_accs is not None:
                cells.setdefault("weak", {})[(source, "/".join(target))] = weak_accs
    return found, ["/".join(t) for t in sorted(stores)], notes
