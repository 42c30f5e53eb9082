from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


from w2s_jax.config import FitConfig, Hparams, resolve_batch_size
from w2s_jax.methods import METHODS
from w2s_jax.refine import plan
from w2s_jax.splits import SeedSplits, split_sizes
from w2s_jax.fit.groups import (FitData, group_rows, later_rounds, make_groups, plain_teachers, reference_refinement,
                                teacher_plan, teacher_width)
from w2s_jax.fit.epoch import start_model
from w2s_jax.fit.padding import bucket_size



class Recipe(NamedTuple):
    """How the models train: every setting the fit below the plan reads, resolved once from the FitConfig
    (:func:`recipe_of`; ``batch_size`` is a number, "auto" resolved)."""

    seeds: int
    root_seed: int
    epochs: int
    batch_size: int
    warmup: float  # linear warmup fraction of the lr schedule
    select: str  # the label-free rule that keeps each model's epoch (w2s_jax.select)
    fuse: bool  # one wide GEMM per head group
    matmul_dtype: str
    seed_axis: str  # "auto", "map" or "vmap"
    vmap: bool  # every model in one compiled program; False: model by model
    bucket: bool  # pad the rows to the store's size bucket
    refine_k: float  # the base refine_k: the ``refined`` rule's reference kNN


def recipe_of(cfg: FitConfig, n_train: int) -> Recipe:
    """The :class:`Recipe` of ``cfg`` for a store of ``n_train`` hold_train rows (an "auto" batch resolved)."""
    cfg = resolve_batch_size(cfg, n_train)
    return Recipe(cfg.seeds, cfg.root_seed, cfg.epochs, int(cfg.batch_size), cfg.warmup, cfg.select, cfg.fuse,
                  cfg.matmul_dtype, cfg.seed_axis, cfg.vmap, cfg.bucket, float(cfg.hparams.refine_k))


class Plan(NamedTuple):
    """What a fit is, resolved once from its FitConfig and the store (:func:`make_plan`): how the models train, the
    methods, the seeds' keys, the grid, the groups and their rows, the targets and the rounds. The epoch step and
    the drivers receive its fields, never the config."""

    recipe: Recipe
    methods: tuple  # every method, in the config's order
    keys: jax.Array
    hps: Hparams
    groups: dict
    specs: tuple  # the distinct targets of round 1 (refine.plan)
    teacher_J: dict  # {group: each model's target index}
    width: int  # targets per seed in every round (teacher_width)
    host_rows: dict  # {group: Rows} on the host
    later: dict  # {round: its METHOD@roundR names}
    first: tuple  # the round-1 methods
    num_classes: int
    text_TxKxD: object  # the store's text embeddings, or None
    report: Callable


def make_plan(cfg: FitConfig, data: FitData, splits: SeedSplits, text_TxKxD, num_classes: int,
              progress=None) -> Plan:
    """The :class:`Plan` of ``cfg`` on a store (``data``: its rows with one weak model, for the heads' check): the
    only place the fit reads its config. Each head is checked on a first batch before anything compiles."""
    recipe = recipe_of(cfg, splits.hold_train.shape[-1])
    hps = cfg.grid_hparams()
    later = later_rounds(cfg.methods)
    first = tuple(m for m in cfg.methods if METHODS[m].round == 1)
    groups = make_groups(first, num_classes, text_TxKxD)
    specs, teacher_J = teacher_plan(groups, hps, recipe.refine_k)
    host_rows = {g: group_rows(grp, hps, teacher_J[g]) for g, grp in groups.items()}
    check_heads(groups, host_rows, data, splits, recipe, num_classes)
    return Plan(recipe, tuple(cfg.methods), seed_keys(recipe.root_seed, recipe.seeds), hps, groups, specs, teacher_J,
                teacher_width(len(specs), later), host_rows, later, first, num_classes, text_TxKxD,
                progress or (lambda done: None))


def seed_keys(root_seed: int, num_seeds: int):
    """Key of seed s: ``jax.random.split(jax.random.key(root_seed), S)[s]``."""
    return jax.random.split(jax.random.key(root_seed), num_seeds)


def check_heads(groups: dict, rows: dict, data: FitData, splits: SeedSplits, recipe: Recipe, num_classes: int):
    """Each head, started as the fit starts it, maps ``B x D`` features to ``B x K`` logits: checked once,
    abstractly (``jax.eval_shape``), before anything compiles; a ValueError names the head and the shapes."""
    for g, grp in groups.items():
        row = jax.tree.map(lambda a: a[0], rows[g])
        split = jax.tree.map(lambda a: jnp.asarray(a)[0], splits)

        def first_logits():
            state = start_model(grp, recipe, jax.random.key(0), row._replace(teacher=jnp.int32(0)), data, split,
                                plain_teachers(data))
            return grp.module.apply(state.variables, data.feats_NxD[:3], row.hp)

        try:
            shape = jax.eval_shape(first_logits).shape
        except Exception as err:  # a user head's own error: name the head, not only flax's traceback
            raise ValueError(f"head {grp.head!r} fails on a first batch of 3 x {data.feats_NxD.shape[1]} features "
                             f"({type(err).__name__}: {str(err).splitlines()[0][:300]})") from None
        if tuple(shape) != (3, num_classes):
            raise ValueError(f"head {grp.head!r} returns logits of shape {tuple(shape)} for a batch of 3 rows; a head "
                             f"returns B x K = (3, {num_classes}) logits, one per class")


def estimate_bytes(cfg: FitConfig, n: int, d: int, k: int) -> int:
    """Rough memory per device of the vmapped fit, in bytes (float32): the shared data; per model on that device
    its params, Adam moments, grads and best copy (6 x params); per seed its targets (the weak labels, the
    reference kNN vote and each refinement, N x (K + 1) each); and, for the one seed running at a time, its J
    models' step (one minibatch's features and J logits, twice for the gradient) and end-of-epoch evaluation
    (hold_val and test' features and J logits, 36% of n rows); n as padded to its size bucket. Checked against
    measured peak RSS in benchmarks/bench_scaling.py (runtime overhead not included)."""
    cfg = resolve_batch_size(cfg, split_sizes(n)[0])  # an "auto" batch as the fit will resolve it
    n = bucket_size(n) if cfg.vmap and cfg.bucket else n  # the rows the fit may be padded to
    num_h = int(np.prod([len(v) for _, v in cfg.grid] or [1]))
    params = k * d + k
    first = [m for m in cfg.methods if m not in METHODS or METHODS[m].round == 1]  # later rounds reuse their slots
    j = num_h * len(first)  # models of one seed
    eval_rows = int(0.36 * n)
    running = lambda models: (4 * cfg.batch_size + eval_rows) * (d + 2 * models * k) + n  # one seed's step + eval
    data = n * (d + k * (1 + len(cfg.ensemble)) + 1)  # features, the weak logits (and the ensemble's), labels
    kinds = {"all": [METHODS[m].refine if m in METHODS else "" for m in cfg.methods]}
    num_first = len(plan(kinds, cfg.grid_hparams(), reference_refinement(cfg.hparams.refine_k))[0])
    later = later_rounds([m for m in cfg.methods if m in METHODS])
    targets = teacher_width(num_first, later) * n * (k + 1)  # a seed's targets, as wide as the widest round
    if not cfg.vmap:  # one model at a time
        return 4 * (data + cfg.seeds * targets + 6 * params + running(1))
    seeds_here = math.ceil(cfg.seeds / jax.device_count())
    return 4 * (data + seeds_here * (targets + j * 6 * params) + running(j))


def available_bytes() -> int:
    """Memory the fit may use: the device's limit on an accelerator, else 80% of physical RAM."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not report memory
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
