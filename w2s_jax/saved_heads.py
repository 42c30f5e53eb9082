"""The learned heads of a results folder: written with every fit, read back by :func:`load_heads`.

Layout, inside the results folder::

    heads/heads.json        what is needed to apply them: encoder id, class names, feature dim, the grid's
                            hyperparameters, and per method its head, the grid point chosen on hold_val,
                            the best epoch of every seed x grid point and which of them failed (their
                            training loss went non-finite: never applied, see SavedHead.check_usable)
    heads/<method>.msgpack  the head's flax variables ({"params": ..., "stats": ...}), every leaf
                            stacked ``S x H x ...`` (seed, grid point), in flax's msgpack serialization

A head takes the L2-normalised strong features ``r̂ = r / ‖r‖`` of the encoder named in ``heads.json``.
Prompt-tuning rows (w2s-tp) are saved in their applied form: the class prototypes ``text_enc(prompt_i)``
of the learned prompts, as a ``prototype`` head.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import serialization

from w2s_jax.config import Hparams
from w2s_jax.heads import l2_normalize, make_head

FORMAT = "w2s-heads/1"
FOLDER = "heads"


class HeadsError(ValueError):
    """Saved heads that cannot be read or applied, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class SavedHead:
    """One method's best-epoch heads for every seed and grid point of a fit."""

    method: str  # registry name, e.g. "cpl"
    head: str  # the head that applies them, a name in heads.HEADS
    variables_SxH: dict  # flax variables, every leaf ``S x H x ...``
    hparams_H: Hparams  # the grid, arrays ``H``
    selected: int  # the grid point chosen on hold_val (what the table reports)
    best_epoch_SxH: np.ndarray
    encoder: str  # strong encoder id of the features the head takes
    class_names: tuple[str, ...]
    feature_dim: int
    failed_SxH: np.ndarray | None = None  # True where that model's training loss went non-finite

    @property
    def num_seeds(self) -> int:
        return int(self.best_epoch_SxH.shape[0])

    def variables(self, seed: int = 0, grid_index: int | None = None) -> dict:
        """The variables of one seed and grid point (default: the one chosen on hold_val)."""
        s, h = self._index(seed, grid_index)
        return jax.tree.map(lambda a: a[s, h], self.variables_SxH)

    def hparams(self, grid_index: int | None = None) -> Hparams:
        _, h = self._index(0, grid_index)
        return Hparams(*(float(np.asarray(v)[h]) for v in self.hparams_H))

    def failed(self, seed: int | None = None, grid_index: int | None = None) -> bool:
        """Whether the model of ``seed`` (default: any seed, as the fit's table counts it) at ``grid_index``
        (default: the one chosen on hold_val) failed in training."""
        if self.failed_SxH is None:
            return False
        _, h = self._index(0, grid_index)
        column = np.asarray(self.failed_SxH, bool)[:, h]
        return bool(column.any() if seed is None else column[self._index(seed, h)[0]])

    def check_usable(self, seed: int = 0, grid_index: int | None = None) -> None:
        """A HeadsError when the model of ``seed`` at ``grid_index`` failed: its parameters are not a model."""
        if self.failed(seed, grid_index):
            h = self._index(seed, grid_index)[1]
            ok = [i for i in range(self.failed_SxH.shape[1]) if not self.failed_SxH[:, i].any()]
            other = f"another --grid-index ({', '.join(map(str, ok))} trained)" if ok else "another --method"
            raise HeadsError(f"{self.method} failed at grid point {h}, seed {seed} (its training loss went "
                             f"non-finite; the fit's table reports it as failed): its head is not a model and is never "
                             f"applied. Choose {other}, or refit with a smaller lr")

    def logits(self, features_NxD, seed: int = 0, grid_index: int | None = None) -> np.ndarray:
        """Class logits ``N x K`` of raw (or already normalised) strong features ``N x D``."""
        features_NxD = np.asarray(features_NxD, np.float32)
        if features_NxD.ndim != 2 or features_NxD.shape[1] != self.feature_dim:
            raise HeadsError(f"{self.method}: features of shape {features_NxD.shape}; this head takes "
                             f"N x {self.feature_dim} features of {self.encoder}")
        module = make_head(self.head, len(self.class_names))
        return np.asarray(module.apply(self.variables(seed, grid_index), l2_normalize(features_NxD),
                                       self.hparams(grid_index)))

    def prototypes(self, seed: int = 0, grid_index: int | None = None) -> np.ndarray:
        """Unit-norm class weights ``K x D`` of a prototype head: ``logits = logit_scale * r̂ @ prototypes.T``."""
        if self.head != "prototype":
            raise HeadsError(f"{self.method} has a {self.head} head, not class prototypes; export a prototype "
                             "method (cpl, ce+proto, ..., or a TP row)")
        return np.asarray(l2_normalize(self.variables(seed, grid_index)["params"]["prototypes_KxD"]))

    def _index(self, seed, grid_index) -> tuple[int, int]:
        num_h = len(np.asarray(self.hparams_H.lr))
        h = self.selected if grid_index is None else grid_index
        if not 0 <= seed < self.num_seeds:
            raise HeadsError(f"{self.method}: seed {seed} not in this fit; seeds are 0..{self.num_seeds - 1}")
        if not 0 <= h < num_h:
            raise HeadsError(f"{self.method}: grid point {h} not in this fit; it has {num_h} (0..{num_h - 1})")
        return seed, h


def write_heads(folder: Path, heads: dict, best_epochs: dict, summary: dict, provenance: dict, hps: Hparams,
                feature_dim: int, imports=(), failed=None) -> None:
    """Write ``heads/`` into the (staging) results ``folder``.

    heads: method -> (head name, variables ``S x H x ...``); best_epochs: method -> ``S x H``; imports: the
    ``--import`` modules the fit ran with (w2s-predict asks for them); failed: method -> ``S x H`` bool, True where
    the training loss went non-finite (recorded, so that no later use applies those heads).
    """
    out = Path(folder) / FOLDER
    out.mkdir()
    methods = {}
    for method, (head, variables) in heads.items():
        (out / f"{method}.msgpack").write_bytes(serialization.msgpack_serialize(jax.tree.map(np.asarray, variables)))
        methods[method] = {"head": head, "file": f"{method}.msgpack",
                           "selected_grid_index": summary["methods"][method]["grid_index"],
                           "best_epoch": np.asarray(best_epochs[method]).tolist(),
                           "failed": np.zeros(np.shape(best_epochs[method]), bool).tolist() if not failed
                           else np.asarray(failed[method], bool).tolist()}
    index = {"format": FORMAT, "encoder": provenance["encoder"], "class_names": list(provenance["class_names"]),
             "feature_dim": int(feature_dim), "features": "L2-normalised strong image features r / |r|",
             "hparams": {f: np.asarray(v).tolist() for f, v in hps._asdict().items()}, "methods": methods,
             "imports": list(imports)}
    (out / "heads.json").write_text(json.dumps(index, indent=1))


def read_json(path: Path, what: str):
    """The JSON file ``path``, or a HeadsError naming it: missing, or not valid JSON (truncated, say)."""
    path = Path(path)
    if not path.is_file():
        raise HeadsError(f"{path} not found: {what}")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise HeadsError(f"{path} is not valid JSON ({err}): the file is damaged or cut short; refit into this "
                         "folder (w2s-fit ... --out FOLDER --overwrite)") from None


def read_index(results_dir) -> dict:
    """``heads/heads.json`` of a results folder, checked for its format."""
    index_path = Path(results_dir) / FOLDER / "heads.json"
    if not index_path.is_file():
        what = "no results folder" if not Path(results_dir).is_dir() else "a results folder without saved heads"
        raise HeadsError(f"{results_dir}: {what} ({index_path} not found); heads are saved by w2s-fit and w2s-tp "
                         "since format " + FORMAT + ": rerun the fit with --out " + str(results_dir))
    index = read_json(index_path, "the index of the saved heads")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise HeadsError(f"{index_path}: format {index.get('format') if isinstance(index, dict) else None!r}, this "
                         f"version reads {FORMAT}; refit")
    return index


def check_saved(head: SavedHead, path: Path) -> None:
    """The arrays of ``path`` fit what heads.json says: every leaf ``S x H x ...``, and the head maps
    ``N x feature_dim`` features to ``N x K`` logits; else a HeadsError naming the file and both shapes."""
    from w2s_jax.heads import HEADS

    if head.head not in HEADS:
        raise HeadsError(f"{path}: its head {head.head!r} is not registered here; pass the --import that registers "
                         "it (as given to w2s-fit)")
    s_h = (head.num_seeds, len(np.asarray(head.hparams_H.lr)))
    leaves = jax.tree_util.tree_leaves_with_path(head.variables_SxH)
    bad = [f"{jax.tree_util.keystr(k)} {np.shape(v)}" for k, v in leaves if np.shape(v)[:2] != s_h]
    if bad or not leaves:
        raise HeadsError(f"{path}: arrays {', '.join(bad) or '(none)'} do not start with seeds x grid points "
                         f"{s_h} as heads.json says; the folder is damaged: refit")
    module = make_head(head.head, len(head.class_names))
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a)[2:], np.asarray(a).dtype), head.variables_SxH)
    try:
        shape = jax.eval_shape(module.apply, one, jax.ShapeDtypeStruct((1, head.feature_dim), np.float32),
                               head.hparams(0)).shape
    except Exception as err:  # shapes that do not fit the head raise inside flax
        shape = f"an error ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
    if shape != (1, len(head.class_names)):
        raise HeadsError(f"{path}: the {head.head} head with these arrays maps 1 x {head.feature_dim} features to "
                         f"{shape}, not 1 x {len(head.class_names)} logits as heads.json says "
                         f"({len(head.class_names)} classes, {head.feature_dim}-d features); the folder is damaged "
                         "or mixed with another fit's files: refit")


def check_imports(results_dir, index: dict) -> None:
    """A HeadsError unless every module the fit was run with (``--import``) is imported here: without it, its heads
    or methods would be rebuilt from the built-in registry, or not at all. The one check wherever saved heads
    produce numbers (w2s-predict, cross-domain evaluation, ``load_heads``)."""
    from w2s_jax.methods import plugin_name

    missing = [m for m in index.get("imports", []) if plugin_name(m) not in sys.modules]
    if missing:
        raise HeadsError(f"{results_dir} was fit with --import {' --import '.join(missing)}; pass the same --import "
                         "here (or import it in Python first), so that its heads are rebuilt as they were trained")


def failed_of(results_dir, method: str, entry: dict) -> np.ndarray:
    """``S x H`` bool of the heads.json ``entry``; a folder written before heads.json recorded it has the fit's
    table's word (metrics.json's ``failed``, of the chosen grid point) instead."""
    s_h = np.shape(entry["best_epoch"])
    if "failed" in entry:
        return np.asarray(entry["failed"], bool).reshape(s_h)
    summary = read_json(Path(results_dir) / "metrics.json", "the fit's metrics").get("methods", {}).get(method, {})
    out = np.zeros(s_h, bool)
    out[:, int(entry["selected_grid_index"])] = bool(summary.get("failed"))
    return out


def load_heads(results_dir, methods=None) -> dict[str, SavedHead]:
    """{method: SavedHead} of a results folder written by w2s-fit or w2s-tp, ready to apply to features;
    ``methods``: read only these (default: all). Every head is checked against heads.json (:func:`check_saved`)."""
    index = read_index(results_dir)
    check_imports(results_dir, index)
    folder = Path(results_dir) / FOLDER
    saved = index["hparams"]
    num_h = len(np.atleast_1d(saved["lr"]))  # a field added since the folder was written takes its default
    hps = Hparams(*(np.asarray(saved.get(f, [getattr(Hparams(), f)] * num_h), np.float32) for f in Hparams._fields))
    found = {}
    for method, m in index["methods"].items():
        if methods is not None and method not in methods:
            continue
        path = folder / m["file"]
        if not path.is_file():
            raise HeadsError(f"{path} not found: heads.json lists the {method} head, but its file is gone; refit "
                             "into this folder")
        try:
            variables = serialization.msgpack_restore(path.read_bytes())
        except Exception as err:  # msgpack raises several kinds on a cut file
            raise HeadsError(f"{path} cannot be read ({type(err).__name__}: {err}): the file is damaged or cut "
                             "short; refit into this folder") from None
        found[method] = SavedHead(method=method, head=m["head"], variables_SxH=variables, hparams_H=hps,
                                  selected=int(m["selected_grid_index"]),
                                  best_epoch_SxH=np.asarray(m["best_epoch"]), encoder=index["encoder"],
                                  class_names=tuple(index["class_names"]), feature_dim=int(index["feature_dim"]),
                                  failed_SxH=failed_of(results_dir, method, m))
        check_saved(found[method], path)
    return found
