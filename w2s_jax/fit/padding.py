from __future__ import annotations

import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


from w2s_jax.heads import get_head
from w2s_jax.refine import drop_count
from w2s_jax.splits import SeedSplits, split_sizes
from w2s_jax.fit.groups import FitData
from w2s_jax.fit.epoch import epoch_order, total_steps, warmup_steps

if TYPE_CHECKING:  # annotations only: these modules import this one
    from w2s_jax.fit.plan import Plan



def bucket_size(n: int) -> int:
    """The rows a fit of ``n`` test rows is padded to (:func:`pad_to_bucket`): the smallest ``m · 2^k >= n`` with
    m in 4..7, so at most 25% padding. DomainNet's six test splits fall in three buckets: 14,604 and 15,582 rows
    in 16,384; 20,916 and 21,850 in 24,576; 51,750 and 52,041 in 57,344."""
    unit = 2 ** max(0, n.bit_length() - 3)
    return -(-n // unit) * unit


class Sizes(NamedTuple):
    """A store's real sizes when its splits are padded to a size bucket, as data (the same for every seed), so that
    every store of the bucket runs the same compiled programs. A padded split marks its padding rows -1."""

    n_train: jax.Array  # the real hold_train rows
    steps: jax.Array  # the real minibatches per epoch
    total: jax.Array  # the lr schedule's steps (total_steps of the real split)
    warm: jax.Array  # its warmup steps (warmup_steps)
    drops_U: jax.Array  # rows each of a seed's targets drops from its real pool (refine.drop_count; 0: none)


class Padding(NamedTuple):
    """What one seed's epoch reads of a padded fit."""

    orders_ExR: jax.Array  # each epoch's hold_train rows in minibatch order (epoch_order), R = padded steps x batch
    sizes: Sizes


def paddable(plan: Plan, splits: SeedSplits) -> bool:
    """Whether padding keeps every number of the fit: each head weighs its start's rows (``Head.masked_start``)
    and each refinement's k is below the real pool's size (on a smaller pool, the fit as it is says why)."""
    pool = splits.hold_train.shape[-1] + splits.hold_val.shape[-1]
    return (all(get_head(grp.head).masked_start for grp in plan.groups.values())
            and all(spec.k < pool for spec in plan.specs))


def pad_rows(data: FitData, n_pad: int) -> FitData:
    """``data`` with its first row repeated up to ``n_pad`` rows (finite values where the padding rows point)."""
    def pad(a, axis=0):
        first = jax.lax.slice_in_dim(a, 0, 1, axis=axis)
        return jnp.concatenate([a, jnp.repeat(first, n_pad - a.shape[axis], axis)], axis)

    return FitData(pad(data.feats_NxD), pad(data.weak_NxK), pad(data.labels_N),
                   None if data.weaks_MxNxK is None else pad(data.weaks_MxNxK, 1))


def pad_to_bucket(plan: Plan, datas, splits: SeedSplits):
    """``(datas, splits, orders_SxExR, sizes)`` padded to the store's size bucket (:func:`bucket_size`), or as they
    are with None, None when ``recipe.bucket`` is off or padding would not be exact (:func:`paddable`).

    Padded, each split grows to its size for the bucket's row count, its extra rows -1, which point at the
    data's last row (a padding row: a store below its bucket's size gains one at least). The minibatch orders are
    those of the unpadded fit, computed here (:func:`epoch_order`), and :func:`seed_epoch` masks the padding
    everywhere. A store that fills its bucket exactly runs the padded program too (with no padding row), so
    that it shares the bucket's program."""
    recipe = plan.recipe
    n = datas[0].labels_N.shape[0]
    n_pad = bucket_size(n)
    if not recipe.bucket or not paddable(plan, splits):
        return datas, splits, None, None
    part_sizes = [max(a, np.shape(part)[-1]) for a, part in zip(split_sizes(n_pad), splits)]
    padded = SeedSplits(*(np.pad(np.asarray(part), ((0, 0), (0, size - np.shape(part)[-1])), constant_values=-1)
                          for part, size in zip(splits, part_sizes)))
    n_train, n_val = splits.hold_train.shape[-1], splits.hold_val.shape[-1]
    total = total_steps(recipe, splits)
    steps = total // recipe.epochs
    length = math.ceil(part_sizes[0] / recipe.batch_size) * recipe.batch_size
    order = jax.jit(epoch_order, static_argnums=3)
    orders_SxExR = np.stack([np.stack([np.asarray(order(plan.keys[s], e, jnp.asarray(splits.hold_train[s]), length))
                                       for e in range(recipe.epochs)]) for s in range(recipe.seeds)])
    drops_U = [drop_count(spec.c, n_train + n_val) for spec in plan.specs]  # c is 0 but for filter, confident
    sizes = Sizes(*(np.asarray(v, np.int32) for v in (n_train, steps, total, warmup_steps(total, recipe.warmup), drops_U)))
    return [pad_rows(d, n_pad) for d in datas], padded, orders_SxExR.astype(np.int32), sizes
