"""Training heads: every model of a seed in one vectorized step, methods as data.

Axis order everywhere: (seed S, model J, ...) inside the fit, (seed S, hparam H, ...) in its outputs. Each model is
trained with Adam (linear warmup, then linear decay), minibatches as ``lax.scan`` over on-device arrays, and keeps
the parameters of the epoch with the best ``hold_val`` score of the ``--select`` rule (by default agreement with
its training target, the paper's; ground-truth accuracy for a ceiling); every rule's score is kept in the
history (:mod:`w2s_jax.select`).

Each seed first computes its training targets once (:class:`w2s_jax.refine.Teachers`: the weak labels, the
reference kNN vote of the ``refined`` rule, and each refinement the methods ``METHOD@knn`` etc. ask for); a
model's row holds the index of its own.

The models of a seed are grouped by head (and by whether their teacher mixes several weak models): a
:class:`Group` holds the J = methods x hparams models of one head with their parameters stacked from the start,
and :class:`Rows` holds what sets them apart as arrays, one row per model: the loss family's coefficients
(:mod:`w2s_jax.losses`), the hyperparameters and the target. So one step computes a group's logits (fused: one
wide GEMM ``r̂ · [A_1 … A_J]ᵀ`` through the heads' ``linear_form``), one vectorized loss and one vectorized Adam
update, whatever the number of methods; the program grows with the number of heads, not of methods.
All models of a seed share its minibatch order, so :func:`seed_epoch` gathers each step's rows once.

The vmapped fit pads a store's rows to its size bucket (:func:`bucket_size`, :func:`pad_to_bucket`) and masks the
padding everywhere, so that the stores of one bucket run the same compiled programs and get the unpadded numbers.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax import sharding
from w2s_jax.config import FitConfig, Hparams, resolve_batch_size, resolve_seed_axis
from w2s_jax.heads import Start, get_head, l2_normalize
from w2s_jax.losses import Coeffs, family_loss, stack_rows
from w2s_jax.methods import METHODS, MULTI_WEAK, Method, coeffs_of, previous_round, round_of
from w2s_jax.refine import Refinement, Teachers, drop_count, plan, seed_teachers
from w2s_jax.select import CRITERIA, HISTORY_KEY, ValView, kept_point, masked_mean, scores, val_view
from w2s_jax.splits import SeedSplits, split_sizes


class FitData(NamedTuple):
    """The store's ``test`` split on device, shared by every seed."""

    feats_NxD: jax.Array  # L2-normalised strong features r̂ (normalised once, outside the loop)
    weak_NxK: jax.Array  # weak logits (with several weak models: the first one's)
    labels_N: jax.Array  # ground truth
    weaks_MxNxK: jax.Array | None = None  # the logits of the M weak models the multi-weak methods combine


class FitOutput(NamedTuple):
    variables: dict  # the head's best-epoch variables: {"params": trained, "stats": fixed at the start, if any;
    #                  "mixture": {"logits_M"}, the weights of the weak models, for the multi-weak methods}
    history: dict  # per-epoch curves, each (E,): train_loss, train_acc (vs. the training target, during the
    #                epoch), val_loss, val_score, test_acc
    best_epoch: jax.Array  # 1-based epoch whose parameters were kept


def make_data(feats_NxD, weak_NxK, labels_N, weaks_MxNxK=None) -> FitData:
    weaks = None if weaks_MxNxK is None else jnp.asarray(weaks_MxNxK, jnp.float32)
    return FitData(l2_normalize(jnp.asarray(feats_NxD, jnp.float32)), jnp.asarray(weak_NxK, jnp.float32),
                   jnp.asarray(labels_N, jnp.int32), weaks)


# ------------------------------------------------------------------ teachers

TARGETS = ("weak", "truth", "raven", "average")  # Method.target, as the code a model's row holds
WEAK, TRUTH, RAVEN, AVERAGE = range(len(TARGETS))


def mixture_weights(variables: dict):
    """The multi-weak methods' weights ``w_M`` on the simplex: ``softmax`` of the variables' mixture logits."""
    return jax.nn.softmax(variables["mixture"]["logits_M"])


def mixture_teacher(variables: dict, probs_MxBxK):
    """A multi-weak teacher, ``B x K`` log-probabilities: ``log Σ_m w_m p_m`` (learned ``w`` for ``raven``; for
    ``average`` the mixture logits never move from 0, so ``w`` is uniform)."""
    return jnp.log(jnp.einsum("m,mbk->bk", mixture_weights(variables), probs_MxBxK) + 1e-12)


def teacher_logits(method: Method, data: FitData, num_classes: int, rows_B, variables=None):
    """What a model of ``method`` is graded against on ``rows_B``, ``B x K``: the weak logits; one-hot ground truth
    for a ceiling; for a multi-weak method its mixture (:func:`mixture_teacher`)."""
    if method.target == "truth":
        return jax.nn.one_hot(data.labels_N[rows_B], num_classes)
    if method.target in MULTI_WEAK:
        return mixture_teacher(variables, jax.nn.softmax(data.weaks_MxNxK[:, rows_B]))
    return data.weak_NxK[rows_B]


def consensus(weaks_MxBxK):
    """The class all M weak models predict, per row; -1 where they disagree (RAVEN's easy samples)."""
    votes_MxB = jnp.argmax(weaks_MxBxK, axis=-1)
    return jnp.where(jnp.all(votes_MxB == votes_MxB[0], axis=0), votes_MxB[0], -1)


def warmup_steps(total_steps: int, warmup: float) -> int:
    return max(1, math.ceil(warmup * total_steps))


def lr_factor(step, total_steps, warmup: float, warm=None):
    """Linear warmup over ``warmup`` of the steps to 1, then linear decay to 0 at ``total_steps``; a padded fit
    passes ``total_steps`` and ``warm`` (:func:`warmup_steps`) as data (:class:`Padding`)."""
    warm = warmup_steps(total_steps, warmup) if warm is None else warm
    up = (step + 1) / warm
    down = (total_steps - step) / jnp.maximum(1, total_steps - warm)
    return jnp.clip(jnp.where(step < warm, up, down), 0.0, 1.0)


TRAINED = ("params", "mixture")  # the variable collections the optimizer updates


def trained(variables: dict) -> dict:
    return {c: variables[c] for c in TRAINED if c in variables}


def mixture_loss(student_logits_BxK, mixture_logits_BxK):
    """RAVEN-style update of the weak models' weights, per example: the student's cross-entropy under the mixture,
    ``-Σ_k q_k(w) log sg(p_s,k)`` with ``q(w) = Σ_m w_m p_m``. Its gradient reaches only ``w``; it is linear in
    ``w``, so it moves weight toward the weak models whose predictions the student already agrees with."""
    log_student_BxK = jax.lax.stop_gradient(jax.nn.log_softmax(student_logits_BxK))
    return -jnp.sum(jnp.exp(mixture_logits_BxK) * log_student_BxK, axis=1)


# ------------------------------------------------------------------ groups of models: code per head, rows as data


class Group(NamedTuple):
    """The models of a seed that share a head and a kind of teacher: static, one per (head, multi-weak or not)."""

    head: str
    multi: bool  # the teacher mixes several weak models (raven, average); else the weak logits or the truth
    methods: tuple[str, ...]  # model j is method j // H at hparam j % H
    module: nn.Module
    penalty: Callable  # (params, hp) -> scalar added to a model's mean training loss
    linear: bool  # the head has a linear_form (the fused step computes its logits in one wide GEMM)
    text_KxD: jax.Array | None  # mean raw text embedding per class (the prototype head's start), or None
    start_fields: tuple | None  # the Hparams fields the head's start reads (heads.Head.start_fields)


class Rows(NamedTuple):
    """What sets a group's J models apart, one row per model (leading J): data, passed to the program as arrays."""

    coeffs: Coeffs  # the loss family's coefficients
    hp: Hparams
    target: jax.Array  # int32, the index of the method's target in TARGETS
    teacher: jax.Array  # int32, which of the seed's refined targets it trains on (Teachers; 0: the weak labels)


class FitState(NamedTuple):
    """What the models of a group carry from epoch to epoch (leading J, or S x J)."""

    variables: dict  # the heads' current variables (flax): "params" are trained, "stats" stay as they started
    opt_state: tuple  # Adam's moments and step count, for the TRAINED collections only
    best: dict  # {"variables", "score", "epoch"}: the best epoch so far by hold_val score


def make_groups(methods, num_classes: int, text_TxKxD) -> dict[str, Group]:
    """``{name: Group}``: the methods grouped by head and kind of teacher, in the order they first appear."""
    text_KxD = None if text_TxKxD is None else jnp.mean(jnp.asarray(text_TxKxD, jnp.float32), axis=0)
    keys = {}
    for m in methods:
        spec = METHODS[m]
        keys.setdefault((spec.head, spec.target in MULTI_WEAK), []).append(m)
    groups = {}
    for (head_name, multi), names in keys.items():
        head = get_head(head_name)
        module = head.module(num_classes)
        groups[head_name + ("+multi-weak" if multi else "")] = Group(
            head_name, multi, tuple(names), module, head.penalty, hasattr(module, "linear_form"), text_KxD,
            head.start_fields)
    return groups


def group_rows(group: Group, hps_H: Hparams, teacher_J=None) -> Rows:
    """The rows of ``group``'s J = methods x H models, method-major (model j: method j // H, hparam j % H);
    ``teacher_J``: each model's index among the seed's targets (:func:`teacher_plan`; default the weak labels)."""
    num_h = np.shape(hps_H.lr)[0]
    specs = [METHODS[m] for m in group.methods]
    coeffs = jax.tree.map(lambda a: jnp.repeat(a, num_h), stack_rows([coeffs_of(s) for s in specs]))
    hp = jax.tree.map(lambda a: jnp.tile(jnp.asarray(a, jnp.float32), len(specs)), hps_H)
    target = jnp.repeat(jnp.asarray([TARGETS.index(s.target) for s in specs], jnp.int32), num_h)
    teacher = jnp.zeros(len(specs) * num_h, jnp.int32) if teacher_J is None else jnp.asarray(teacher_J, jnp.int32)
    return Rows(coeffs, hp, target, teacher)


def reference_refinement(cfg: FitConfig) -> Refinement:
    """What the ``refined`` selection criterion compares with: the kNN vote at the base ``refine_k``."""
    return Refinement("knn", int(round(cfg.hparams.refine_k)), val_only=True)


def teacher_plan(groups: dict, hps_H: Hparams, cfg: FitConfig):
    """``(specs, {group: teacher_J})``: the distinct targets of the fit (:func:`w2s_jax.refine.plan`)."""
    return plan({g: [METHODS[m].refine for m in grp.methods] for g, grp in groups.items()}, hps_H,
                reference_refinement(cfg))


def pool_rows(split: SeedSplits):
    """A seed's unlabelled pool, where refinements look for neighbours: hold_train then hold_val (``P``, or
    ``S x P`` for stacked splits)."""
    return jnp.concatenate([split.hold_train, split.hold_val], axis=-1)


def make_teachers(specs, data: FitData, split: SeedSplits, sizes: Sizes | None = None) -> Teachers:
    """A seed's targets (:func:`w2s_jax.refine.seed_teachers`); ``sizes``: the store's real :class:`Sizes` when its
    splits are padded to a size bucket."""
    return seed_teachers(specs, data.feats_NxD, data.weak_NxK, pool_rows(split), split.hold_val.shape[-1],
                         None if sizes is None else sizes.drops_U)


def seed_targets(specs, data: FitData, splits_S) -> Teachers:
    """:func:`make_teachers` for every seed, one after the other: leading S."""
    return jax.lax.map(lambda split: make_teachers(specs, data, split), splits_S)


# ------------------------------------------------------------------ size buckets: one program per bucket of stores


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
    are with None, None when ``cfg.bucket`` is off or padding would not be exact (:func:`paddable`).

    Padded, each split grows to its size for the bucket's row count, its extra rows -1, which point at the
    data's last row (a padding row: a store below its bucket's size gains one at least). The minibatch orders are
    those of the unpadded fit, computed here (:func:`epoch_order`), and :func:`seed_epoch` masks the padding
    everywhere. A store that fills its bucket exactly runs the padded program too (with no padding row), so
    that it shares the bucket's program."""
    cfg = plan.cfg
    n = datas[0].labels_N.shape[0]
    n_pad = bucket_size(n)
    if not cfg.bucket or not paddable(plan, splits):
        return datas, splits, None, None
    part_sizes = [max(a, np.shape(part)[-1]) for a, part in zip(split_sizes(n_pad), splits)]
    padded = SeedSplits(*(np.pad(np.asarray(part), ((0, 0), (0, size - np.shape(part)[-1])), constant_values=-1)
                          for part, size in zip(splits, part_sizes)))
    n_train, n_val = splits.hold_train.shape[-1], splits.hold_val.shape[-1]
    total = total_steps(cfg, splits)
    steps = total // cfg.epochs
    length = math.ceil(part_sizes[0] / cfg.batch_size) * cfg.batch_size
    order = jax.jit(epoch_order, static_argnums=3)
    orders_SxExR = np.stack([np.stack([np.asarray(order(plan.keys[s], e, jnp.asarray(splits.hold_train[s]), length))
                                       for e in range(cfg.epochs)]) for s in range(cfg.seeds)])
    drops_U = [drop_count(spec.c, n_train + n_val) for spec in plan.specs]  # c is 0 but for filter, confident
    sizes = Sizes(*(np.asarray(v, np.int32) for v in (n_train, steps, total, warmup_steps(total, cfg.warmup), drops_U)))
    return [pad_rows(d, n_pad) for d in datas], padded, orders_SxExR.astype(np.int32), sizes


# ------------------------------------------------------------------ strong-to-strong rounds (METHOD@roundR)


def later_rounds(methods) -> dict[int, tuple[str, ...]]:
    """``{round r >= 2: its METHOD@round<r> names}``, rounds ascending; round 1 is every other method."""
    rounds = sorted({METHODS[m].round for m in methods} - {1})
    return {r: tuple(m for m in methods if METHODS[m].round == r) for r in rounds}


def teacher_width(num_first: int, later: dict) -> int:
    """Targets per seed (U) in every round, so that all rounds run one compiled epoch program: round 1's
    ``num_first``, a later round's 2 + one per method it retrains (:func:`next_teachers`)."""
    return max([num_first, *(2 + len(names) for names in later.values())])


def pad_targets(teachers: Teachers, width: int) -> Teachers:
    """``teachers`` (leading U) with target 0 repeated up to ``width`` targets (no model points at the copies)."""
    extra = width - teachers.weight_UxN.shape[0]
    return jax.tree.map(lambda a: jnp.concatenate([a, jnp.repeat(a[:1], extra, axis=0)]), teachers)


def group_of(groups: dict, method: str) -> tuple[str, int]:
    """``(group name, index of method in it)``."""
    return next((g, grp.methods.index(method)) for g, grp in groups.items() if method in grp.methods)


def student_logits(group: Group, variables_S, hp: Hparams, feats_NxD):
    """Each seed's kept student of one method on every row: ``S x N x K``."""
    return jax.vmap(lambda v: group.module.apply(v, feats_NxD, hp))(variables_S)


def next_teachers(names, outputs: dict, groups: dict, hps_H: Hparams, data: FitData, splits_S,
                  first_S: Teachers, teacher_J: dict, width: int) -> Teachers:
    """The targets of one later round for every seed (leading S x ``width``), each method of ``names``
    (``METHOD@roundR``) trained on its previous round's kept student:

    - 0: the weak labels; 1: the ``refined`` rule's reference, as in round 1 (``first_S``: round 1's targets);
    - 2 + i: the soft labels (logits) of the kept student of ``previous_round(names[i])`` (its grid point by the
      fit's --select rule, :func:`w2s_jax.select.kept_point`, each seed at its kept epoch) on the seed's pool,
      ``hold_train ∪ hold_val``, the weak logits elsewhere; with the row weights of the round-1 target of that
      student (the rows a ``@filter`` or ``@confident`` dropped stay unseen), then target 0 repeated up to width.
    """
    num_h = np.shape(hps_H.lr)[0]
    pool_SxP = pool_rows(jax.tree.map(jnp.asarray, splits_S))
    logits, weights = [first_S.logits_UxNxK[:, 0], first_S.logits_UxNxK[:, 1]], [first_S.weight_UxN[:, 0]] * 2
    for name in names:
        previous = outputs[previous_round(name)]
        h = kept_point(previous.history, previous.best_epoch)
        g, i = group_of(groups, round_of(name)[0])
        hp = jax.tree.map(lambda a: jnp.asarray(a)[h], hps_H)
        student = student_logits(groups[g], jax.tree.map(lambda a: jnp.asarray(a)[:, h], previous.variables), hp,
                                 data.feats_NxD)
        logits.append(jax.vmap(lambda s, pool: data.weak_NxK.at[pool].set(s[pool]))(student, pool_SxP))
        weights.append(first_S.weight_UxN[:, int(teacher_J[g][i * num_h + h])])
    by_target = pad_targets(Teachers(jnp.stack(logits), jnp.stack(weights)), width)  # U x S x ...
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), by_target)


def round_rows(groups: dict, rows: dict, names, num_h: int) -> dict:
    """Round 1's ``{group: Rows}`` with each model's target index set for a later round: ``2 + i`` for the models
    of the method that ``names[i]`` retrains, 0 (the weak labels) for the others, which train again unreported so
    that the round runs the same compiled program."""
    bases = [round_of(n)[0] for n in names]
    out = {}
    for g, grp in groups.items():
        index = [2 + bases.index(m) if m in bases else 0 for m in grp.methods for _ in range(num_h)]
        out[g] = rows[g]._replace(teacher=jnp.asarray(index, jnp.int32))
    return out


def plain_teachers(data: FitData) -> Teachers:
    """The weak labels as they are, the only target (U = 1): for shape checks."""
    return Teachers(data.weak_NxK[None], jnp.ones((1, data.weak_NxK.shape[0]), jnp.float32))


def check_heads(groups: dict, rows: dict, data: FitData, splits: SeedSplits, cfg: FitConfig, num_classes: int):
    """Each head, started as the fit starts it, maps ``B x D`` features to ``B x K`` logits: checked once,
    abstractly (``jax.eval_shape``), before anything compiles; a ValueError names the head and the shapes."""
    for g, grp in groups.items():
        row = jax.tree.map(lambda a: a[0], rows[g])
        split = jax.tree.map(lambda a: jnp.asarray(a)[0], splits)

        def first_logits():
            state = start_model(grp, cfg, jax.random.key(0), row._replace(teacher=jnp.int32(0)), data, split,
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


def split_models(tree, group: Group):
    """``{method: tree[:, j0:j0 + H]}``: a group's outputs (leading S x J) per method (leading S x H)."""
    num_h = jax.tree.leaves(tree)[0].shape[1] // len(group.methods)
    return {m: jax.tree.map(lambda a: a[:, i * num_h:(i + 1) * num_h], tree) for i, m in enumerate(group.methods)}


def make_optimizer(cfg: FitConfig):
    """-> ``optimizer(hp, total_steps, warm=None)``: one model's Adam with warmup and linear decay
    (:func:`lr_factor`), the head at ``hp.lr``, the multi-weak mixture logits at ``hp.raven_lr``."""
    def optimizer(hp, total, warm=None):
        def adam(lr):
            return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(
                lambda count: -lr * lr_factor(count, total, cfg.warmup, warm)))

        return optax.multi_transform({"params": adam(hp.lr), "mixture": adam(hp.raven_lr)},
                                     lambda trainable: {collection: collection for collection in trainable})

    return optimizer


def total_steps(cfg: FitConfig, split: SeedSplits) -> int:
    """Optimizer steps of a whole fit: epochs x minibatches per epoch (the lr schedule's length)."""
    return cfg.epochs * math.ceil(split.hold_train.shape[-1] / cfg.batch_size)


def start_targets(group: Group, row: Rows, data: FitData, rows_N, teachers: Teachers):
    """The class each training row starts a head from (``Start.targets_N``): the argmax of the model's target (the
    weak labels, or their refinement; -1 where a filter dropped the row), the label for a ceiling; multi-weak: the
    rows where every weak model agrees (raven's easy samples, -1 elsewhere) or the argmax of the uniform mixture
    (average)."""
    target = row.target
    if group.multi:
        weaks_MxNxK = data.weaks_MxNxK[:, rows_N]
        uniform = {"mixture": {"logits_M": jnp.zeros(weaks_MxNxK.shape[0])}}
        average_N = jnp.argmax(mixture_teacher(uniform, jax.nn.softmax(weaks_MxNxK)), axis=1)
        return jnp.where(target == RAVEN, consensus(weaks_MxNxK), average_N)
    weak_N = jnp.where(teachers.weight_UxN[row.teacher, rows_N] > 0,
                       jnp.argmax(teachers.logits_UxNxK[row.teacher, rows_N], axis=1), -1)
    return jnp.where(target == TRUTH, data.labels_N[rows_N], weak_N)


def start_model(group: Group, cfg: FitConfig, key, row: Rows, data: FitData, split: SeedSplits,
                teachers: Teachers, sizes: Sizes | None = None) -> FitState:
    """One model's first state (leading axes none): its head started from the data, Adam's state, no best yet.
    Padded (``sizes``), the padding rows of hold_train start nothing (``Start.real_N`` False, target -1)."""
    init_key, _ = jax.random.split(key)
    mixture = {"mixture": {"logits_M": jnp.zeros(data.weaks_MxNxK.shape[0])}} if group.multi else {}
    targets_N = start_targets(group, row, data, split.hold_train, teachers)
    real_N = None
    if sizes is not None:
        real_N = split.hold_train >= 0
        targets_N = jnp.where(real_N, targets_N, -1)
    variables = {**group.module.init(init_key, data.feats_NxD[split.hold_train], row.hp,
                                     Start(targets_N, group.text_KxD, real_N)), **mixture}
    best = {"variables": variables, "score": jnp.float32(-1.0), "epoch": jnp.int32(0)}
    return FitState(variables, make_optimizer(cfg)(row.hp, 1).init(trained(variables)), best)  # init reads no lr


def shared_starts(group: Group, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Which models of a group can share one start: ``(firsts_U, of_model_J)``, the first model of each distinct
    (target, start hyperparameters) and, per model, the index of its start among them. The linear head's start
    solves a D x D system that depends on the targets, δ and s only, so the LDA of a seed is solved once for all
    its weak-label methods and learning rates instead of once per model."""
    num_j = np.shape(rows.target)[0]
    if group.start_fields is None:
        return np.arange(num_j), np.arange(num_j)
    keys = [(int(np.asarray(rows.target)[j]), int(np.asarray(rows.teacher)[j]),
             *(float(np.asarray(getattr(rows.hp, f))[j]) for f in group.start_fields)) for j in range(num_j)]
    distinct = list(dict.fromkeys(keys))
    firsts = np.asarray([keys.index(key) for key in distinct])
    return firsts, np.asarray([distinct.index(key) for key in keys])


def start_group(group: Group, cfg: FitConfig, plan, key_data_S, rows: Rows, data: FitData, splits_S,
                teachers_S: Teachers, sizes: Sizes | None = None) -> FitState:
    """:func:`start_seeds` for a group, each distinct start made once and copied to the models that share it
    (``plan``: :func:`shared_starts` of the group's rows): leading S x J. A model's other hyperparameters enter
    only in training."""
    firsts_U, of_model_J = plan
    states_SxU = start_seeds(group, cfg, key_data_S, jax.tree.map(lambda a: a[firsts_U], rows), data, splits_S,
                             teachers_S, sizes)
    return jax.tree.map(lambda a: a[:, of_model_J], states_SxU)


def start_seeds(group: Group, cfg: FitConfig, key_data_S, rows: Rows, data: FitData, splits_S,
                teachers_S: Teachers, sizes: Sizes | None = None) -> FitState:
    """:func:`start_model` for every seed x model of ``group``, one after the other (``lax.map`` over the seeds,
    then over their models): leading S x J.

    Not vmapped on purpose: the linear head's start solves a D x D system, and on XLA's CPU runtime (jax 0.10)
    several *batched* LAPACK solves running at once in one program can deadlock its thread pool
    (benchmarks/RESULTS.md). Model by model, the solves are unbatched; the start is a small part of a fit.
    """
    def one_seed(seeded):
        key_data, split, teachers = seeded
        return jax.lax.map(lambda row: start_model(group, cfg, jax.random.wrap_key_data(key_data), row, data, split,
                                                   teachers, sizes), rows)

    return jax.lax.map(one_seed, (key_data_S, splits_S, teachers_S))


# ------------------------------------------------------------------ one epoch of every model of a seed


def epoch_order(key, epoch, hold_train_N, length: int):
    """This epoch's ``hold_train`` rows in minibatch order, ``length``: a permutation from the seed's key and the
    epoch, padded with the first row (masked out). Every method and hparam of a seed shares it."""
    n_train = hold_train_N.shape[0]
    _, order_key = jax.random.split(key)
    perm = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
    return hold_train_N[jnp.concatenate([perm, jnp.zeros(length - n_train, perm.dtype)])]


def minibatches(key, epoch, hold_train_N, batch: int):
    """This epoch's rows ``T x B`` (:func:`epoch_order`) and their mask."""
    n_train = hold_train_N.shape[0]
    steps = math.ceil(n_train / batch)
    mask_TxB = (jnp.arange(steps * batch) < n_train).reshape(steps, batch).astype(jnp.float32)
    return epoch_order(key, epoch, hold_train_N, steps * batch).reshape(steps, batch), mask_TxB


def group_logits(group: Group, variables: dict, feats_BxD, hp: Hparams, fuse: bool, matmul_dtype: str = "float32"):
    """The logits of a group's J models on one shared batch, ``J x B x K``, from variables with a leading J.

    Fused, a head with a linear form is computed in one wide GEMM ``feats · [A_1 … A_J]ᵀ`` (the gradient is one
    wide GEMM back); a head without one (an MLP), and every head when not fused, is applied model by model
    (vmapped). Both compute ``feats Aᵀ + c`` for a linear head. ``matmul_dtype="bfloat16"`` rounds the wide GEMM's
    inputs to bfloat16 and accumulates in float32.
    """
    if not (fuse and group.linear):
        return jax.vmap(group.module.apply, in_axes=(0, None, 0))(variables, feats_BxD, hp)
    a_JxKxD, c_JxK = jax.vmap(lambda v, h: group.module.apply(v, h, method="linear_form"))(variables, hp)
    j, k, d = a_JxKxD.shape
    wide_BxJK = jnp.dot(feats_BxD.astype(matmul_dtype), a_JxKxD.reshape(j * k, d).T.astype(matmul_dtype),
                        preferred_element_type=jnp.float32)
    return jnp.moveaxis(wide_BxJK.reshape(-1, j, k) + c_JxK, 1, 0)


def heads_logits(groups: dict, variables: dict, feats_BxD, rows: dict, fuse: bool, matmul_dtype="float32") -> dict:
    """Every model's logits on one shared batch, ``{group: J x B x K}`` (:func:`group_logits` per group)."""
    return {g: group_logits(grp, variables[g], feats_BxD, rows[g].hp, fuse, matmul_dtype) for g, grp in groups.items()}


class Shared(NamedTuple):
    """What every model of a group reads of its teacher on some rows B, once for all of them."""

    teachers: jax.Array  # the seed's targets U x B x K; multi-weak: the weak models' probabilities M x B x K
    weights_UxB: jax.Array  # 1, or 0 where a filter dropped the row


def shared_teacher(group: Group, data: FitData, teachers: Teachers, rows_B) -> Shared:
    """The seed's targets on ``rows_B`` (each model picks its own, ``Rows.teacher``), or, multi-weak, the weak
    models' probabilities (each model mixes them with its own weights)."""
    weights = teachers.weight_UxN[:, rows_B]
    if group.multi:
        return Shared(jax.nn.softmax(data.weaks_MxNxK[:, rows_B]), weights)
    return Shared(teachers.logits_UxNxK[:, rows_B], weights)


def model_teacher(group: Group, trainable: dict, shared: Shared, row: Rows):
    """One model's teacher ``B x K`` and row weights ``B``."""
    if group.multi:
        return mixture_teacher(trainable, shared.teachers), shared.weights_UxB[0]
    return shared.teachers[row.teacher], shared.weights_UxB[row.teacher]


def model_loss(group: Group, trainable, logits_BxK, shared: Shared, labels_B, mask_B, row: Rows, progress):
    """One model's training loss on a batch -> (loss to minimise, (the head's loss, hits vs its target)); rows a
    filter dropped count for nothing."""
    teacher_BxK, weight_B = model_teacher(group, trainable, shared, row)
    mask_B = mask_B * weight_B
    per_example_B = family_loss(logits_BxK, jax.lax.stop_gradient(teacher_BxK), labels_B, row.coeffs,
                                progress=progress, hp=row.hp)
    target_B = jnp.where(row.target == TRUTH, labels_B, jnp.argmax(teacher_BxK, axis=1))
    hits = jnp.sum((jnp.argmax(logits_BxK, 1) == target_B) * mask_B)
    head_loss = (jnp.sum(per_example_B * mask_B) / jnp.maximum(jnp.sum(mask_B), 1.0)
                 + group.penalty(trainable["params"], row.hp))
    if not group.multi:
        return head_loss, (head_loss, hits)
    mixture_B = mixture_loss(logits_BxK, teacher_BxK)  # raven learns its weights; average's never move
    learns = (row.target == RAVEN).astype(jnp.float32)
    return head_loss + learns * (jnp.sum(mixture_B * mask_B) / jnp.sum(mask_B)), (head_loss, hits)


def end_model(group: Group, select: str, state: FitState, trainable, opt_state, val_logits, test_logits, row: Rows,
              val_shared: Shared, view: ValView, labels_test, progress, epoch, train, valid=(None, None)):
    """hold_val picks a model's best epoch by the ``select`` criterion (:mod:`w2s_jax.select`; every criterion's
    score is kept in the history); test' accuracy is kept for curves only. ``view``: what the rules read on
    hold_val, once for all models (:func:`w2s_jax.select.val_view`); ``train``: (loss, accuracy); ``valid``: the
    real rows of hold_val and test' when they are padded to a size bucket (None: every row)."""
    labels_val = view.labels_V
    valid_V, valid_T = valid
    teacher_BxK, weight_B = model_teacher(group, trainable, val_shared, row)
    criteria = scores(val_logits, teacher_BxK, weight_B, view, row.target == TRUTH, valid_V)
    val_score = criteria[select]
    val_loss = masked_mean(family_loss(val_logits, teacher_BxK, labels_val, row.coeffs, progress=progress, hp=row.hp),
                           valid_V)
    test_acc = masked_mean(jnp.argmax(test_logits, 1) == labels_test, valid_T)
    better = val_score > state.best["score"]
    variables = {**state.variables, **trainable}
    candidate = {"variables": variables, "score": val_score, "epoch": epoch + 1}
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), candidate, state.best)
    history = {"train_loss": train[0], "train_acc": train[1], "val_loss": val_loss, "val_score": val_score,
               "test_acc": test_acc, **{HISTORY_KEY.format(c): criteria[c] for c in CRITERIA}}
    return FitState(variables, opt_state, best), history


def optimizer_step(optimizer, schedule, grad, opt_state, trainable, hp):
    """One update of one model's TRAINED collections -> (trainable, opt_state); ``schedule``: (total, warm)."""
    updates, opt_state = optimizer(hp, *schedule).update(grad, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def seed_epoch(groups: dict, states: dict, key, epoch, rows: dict, data: FitData, split: SeedSplits,
               cfg: FitConfig, teachers: Teachers, padding: Padding | None = None):
    """One epoch of all models of one seed: ``{group: FitState}`` with a leading J, ``{group: Rows}``, the seed's
    targets ``teachers`` (:func:`make_teachers`).

    The models share the seed's minibatches. Each step gathers its rows once, computes each group's logits
    (:func:`group_logits`), its vectorized loss (:func:`model_loss` vmapped over J) and differentiates the sum,
    which gives each model its own gradient, as they share no parameters; one vmapped Adam update per group
    follows. At the end, hold_val and test' are gathered once for all models.

    With ``padding`` (splits padded to a size bucket, :func:`pad_to_bucket`), the minibatch order, the real
    sizes and the lr schedule come as data; the steps past the real ones are skipped (``lax.cond`` on a
    predicate that every seed shares, so it stays a branch when the seeds are vmapped), and every mean is over
    the real rows, so the numbers are those of the unpadded fit.
    Returns ``({group: FitState}, {group: history_e})``, each history field ``J``.
    """
    optimizer = make_optimizer(cfg)
    if padding is None:
        schedule, n_train = (total_steps(cfg, split), None), split.hold_train.shape[0]
        rows_TxB, mask_TxB = minibatches(key, epoch, split.hold_train, cfg.batch_size)
        steps_before = epoch * rows_TxB.shape[0]
        valid = (None, None)
    else:
        sizes = padding.sizes
        schedule, n_train = (sizes.total, sizes.warm), sizes.n_train
        rows_TxB = padding.orders_ExR[epoch].reshape(-1, cfg.batch_size)
        mask_TxB = (jnp.arange(rows_TxB.size) < n_train).reshape(rows_TxB.shape).astype(jnp.float32)
        steps_before = epoch * sizes.steps
        valid = (split.hold_val >= 0, split.test_prime >= 0)
    total = schedule[0]

    def logits_of(trainables, feats_BxD):
        variables = {g: {**states[g].variables, **trainables[g]} for g in groups}
        return heads_logits(groups, variables, feats_BxD, rows, cfg.fuse, cfg.matmul_dtype)

    def summed_loss(trainables, rows_B, mask_B, progress):
        logits = logits_of(trainables, data.feats_NxD[rows_B])  # one gather for every model of the seed
        labels_B = data.labels_N[rows_B]
        out = {g: jax.vmap(functools.partial(model_loss, grp), in_axes=(0, 0, None, None, None, 0, None))(
            trainables[g], logits[g], shared_teacher(grp, data, teachers, rows_B), labels_B, mask_B, rows[g],
            progress)
            for g, grp in groups.items()}
        return sum(jnp.sum(loss_J) for loss_J, _ in out.values()), {g: aux for g, (_, aux) in out.items()}

    def train_step(carry, xs):
        trainables, opt_states = carry
        step, rows_B, mask_B = xs
        grads, aux = jax.grad(summed_loss, has_aux=True)(trainables, rows_B, mask_B, step / total)
        new = {g: jax.vmap(functools.partial(optimizer_step, optimizer, schedule))(
            grads[g], opt_states[g], trainables[g], rows[g].hp) for g in groups}
        count = jnp.sum(mask_B)
        per_step = {g: (head_loss * count, hits) for g, (head_loss, hits) in aux.items()}
        return ({g: n[0] for g, n in new.items()}, {g: n[1] for g, n in new.items()}), per_step

    def padded_step(carry, xs):  # a step past the real ones (padding rows only): skipped, nothing changes
        t, xs = xs
        no_step = lambda carry, xs: (carry, jax.tree.map(  # noqa: E731
            jnp.zeros_like, jax.eval_shape(train_step, carry, xs)[1]))
        return jax.lax.cond(t < padding.sizes.steps, train_step, no_step, carry, xs)

    steps = rows_TxB.shape[0]
    first = ({g: trained(st.variables) for g, st in states.items()}, {g: st.opt_state for g, st in states.items()})
    xs = (steps_before + jnp.arange(steps), rows_TxB, mask_TxB)
    (trainables, opt_states), sums = (jax.lax.scan(train_step, first, xs) if padding is None
                                      else jax.lax.scan(padded_step, first, (jnp.arange(steps), xs)))
    val = logits_of(trainables, data.feats_NxD[split.hold_val])
    test = logits_of(trainables, data.feats_NxD[split.test_prime])
    labels_val, labels_test = data.labels_N[split.hold_val], data.labels_N[split.test_prime]
    view = val_view(data.weak_NxK[split.hold_val], teachers.logits_UxNxK[1, split.hold_val], labels_val, valid[0])
    out = {g: jax.vmap(functools.partial(end_model, grp, cfg.select, valid=valid),
                       in_axes=(0, 0, 0, 0, 0, 0, None, None, None, None, None, 0))(
        states[g], trainables[g], opt_states[g], val[g], test[g], rows[g],
        shared_teacher(grp, data, teachers, split.hold_val), view, labels_test, (epoch + 1) / cfg.epochs, epoch,
        (jnp.sum(sums[g][0], 0) / n_train, jnp.sum(sums[g][1], 0) / n_train))
        for g, grp in groups.items()}
    return {g: o[0] for g, o in out.items()}, {g: o[1] for g, o in out.items()}


def finish(state: FitState, history: dict) -> FitOutput:
    return FitOutput(state.best["variables"], history, state.best["epoch"])


def make_fit(method: str, num_classes: int, text_TxKxD, cfg: FitConfig):
    """-> ``fit(key, hp, data, split, teachers, teacher) -> FitOutput`` for one model (one seed, one hparam
    setting) of the method named ``method``: :func:`seed_epoch` with a single model, epochs as ``lax.scan``;
    ``teachers``: the seed's targets (:func:`make_teachers`), ``teacher``: the model's index among them."""
    (g, group), = make_groups((method,), num_classes, text_TxKxD).items()

    def fit(key, hp: Hparams, data: FitData, split: SeedSplits, teachers: Teachers | None = None,
            teacher=0) -> FitOutput:
        if teachers is None:  # the weak labels as they are, and the reference of the `refined` criterion
            if METHODS[method].refine:
                raise ValueError(f"{method} trains on refined labels: pass the seed's teachers (make_teachers)")
            teachers = make_teachers((Refinement(), reference_refinement(cfg)), data, split)
        one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[None], tree)  # a model axis J of 1
        rows = {g: group_rows(group, one(hp), one(teacher))}
        states = {g: one(start_model(group, cfg, key, jax.tree.map(lambda a: a[0], rows[g]), data, split, teachers))}
        run_epoch = lambda st, e: seed_epoch({g: group}, st, key, e, rows, data, split, cfg, teachers)
        states, history = jax.lax.scan(run_epoch, states, jnp.arange(cfg.epochs))
        return finish(jax.tree.map(lambda a: a[0], states[g]), jax.tree.map(lambda a: a[:, 0], history[g]))

    return fit


def over_seeds(fn, seeded, shared, mesh, seed_axis: str = "map"):
    """``fn(seed_args, shared)`` for each seed of ``seeded`` (leading axis S, sharded over ``mesh``), stacked.

    Each device runs its own seeds either one after the other (``seed_axis="map"``, ``lax.map``) or batched
    (``"vmap"``). A seed's step is already one wide GEMM per head; on XLA's CPU runtime batching the seeds made
    its GEMMs batched and the epoch about 25% slower, on an H200 vmapping them made it 1.38x faster
    (benchmarks/RESULTS.md), so the default follows the backend (:func:`w2s_jax.config.resolve_seed_axis`)."""
    if seed_axis == "vmap":
        local = lambda seeded, shared: jax.vmap(fn, in_axes=(0, None))(seeded, shared)
    else:
        local = lambda seeded, shared: jax.lax.map(lambda args: fn(args, shared), seeded)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("seeds"), P()), out_specs=P("seeds"))(seeded, shared)


def seed_keys(root_seed: int, num_seeds: int):
    """Key of seed s: ``jax.random.split(jax.random.key(root_seed), S)[s]``."""
    return jax.random.split(jax.random.key(root_seed), num_seeds)


def fit_methods(cfg: FitConfig, data: FitData, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
                on_compiled=None):
    """Fit every method of ``cfg`` for every seed x hparam; returns ({method: FitOutput}, timings)
    (:func:`fit_each` with one weak model)."""
    return fit_each(cfg, [data], splits, text_TxKxD, num_classes, progress, on_compiled)[0]


def check_same_shapes(datas) -> None:
    """The datas of one :func:`fit_each` share its programs: a ValueError unless their arrays' shapes agree."""
    shapes = [jax.tree.map(np.shape, d) for d in datas]
    if any(sh != shapes[0] for sh in shapes[1:]):
        raise ValueError(f"the weak models of one fit must label the same rows with the same classes: shapes {shapes}")


def fit_each(cfg: FitConfig, datas, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
             on_compiled=None) -> list[tuple[dict, dict]]:
    """Fit every method of ``cfg`` for every seed x hparam, on each :class:`FitData` of ``datas`` (one store's rows
    with each weak model's logits) by the same compiled programs: ``[({method: FitOutput}, timings)]``, one per
    data, the compile counted in the first's timings (``w2s-fit --weak A,B``: every weak model of a store, one
    compile).

    With ``cfg.vmap`` all methods, seeds and hparams form one jit-compiled epoch program: per seed one
    :func:`seed_epoch` for all its models (fused unless ``cfg.fuse`` is False), the seeds sharded over every
    device (:mod:`w2s_jax.sharding`) and mapped or vmapped on each (:func:`over_seeds`, ``cfg.seed_axis``). It is called once
    per epoch from a short loop so that ``progress(models_done_epochs)`` can report; the state stays on device
    between calls. Without it, :func:`make_fit` is compiled per method and called model by model on one device.
    Outputs are ``S x H``.

    ``METHOD@roundR`` methods (strong-to-strong rounds) are fitted after round 1, one round after the other, by
    the same epoch program: only the targets (:func:`next_teachers`) and each model's index among them
    (:func:`round_rows`) change, and the program's target axis is as wide as the widest round
    (:func:`teacher_width`). A later round compiles only its models' starts (their start targets differ).
    ``on_compiled(seconds)`` is called once round 1's programs are compiled.
    """
    check_same_shapes(datas)
    cfg = resolve_batch_size(cfg, splits.hold_train.shape[-1])
    keys = seed_keys(cfg.root_seed, cfg.seeds)
    hps = cfg.grid_hparams()
    later = later_rounds(cfg.methods)
    first = tuple(m for m in cfg.methods if METHODS[m].round == 1)
    groups = make_groups(first, num_classes, text_TxKxD)
    specs, teacher_J = teacher_plan(groups, hps, cfg)
    width = teacher_width(len(specs), later)
    host_rows = {g: group_rows(grp, hps, teacher_J[g]) for g, grp in groups.items()}
    check_heads(groups, host_rows, datas[0], splits, cfg, num_classes)
    plan = Plan(cfg, keys, hps, groups, specs, teacher_J, width, host_rows, later, first, num_classes, text_TxKxD,
                progress or (lambda done: None))
    fit = vmapped_fits if cfg.vmap else model_by_model_fits
    return fit(plan, datas, splits, on_compiled)


class Plan(NamedTuple):
    """What every data of a :func:`fit_each` shares: the config, seeds' keys, grid, groups and targets."""

    cfg: FitConfig
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


def vmapped_fits(plan: Plan, datas, splits: SeedSplits, on_compiled) -> list[tuple[dict, dict]]:
    """:func:`fit_each` with ``cfg.vmap``: two programs (start, epoch) compiled once for all datas and rounds."""
    cfg, groups, num_h = plan.cfg, plan.groups, len(plan.hps.lr)
    seed_axis = resolve_seed_axis(cfg.seed_axis)
    t0 = time.perf_counter()
    # every model of a seed in one epoch step, one group per head; the seeds sharded across all devices
    mesh = sharding.seed_mesh()
    datas, padded_splits, orders, sizes = pad_to_bucket(plan, datas, splits)
    key_data_S, splits_S, orders_S = sharding.place(
        sharding.pad_seeds((jax.random.key_data(plan.keys), padded_splits, orders), mesh.size), mesh, P("seeds"))
    sizes = sharding.place(sizes, mesh, P())  # None unless padded
    rows = sharding.place(plan.host_rows, mesh, P())
    by_seed = NamedSharding(mesh, P("seeds"))  # every state and history leaf has the seed axis first

    def start_plans(rows_host):
        return {g: shared_starts(grp, jax.tree.map(np.asarray, rows_host[g])) for g, grp in groups.items()}

    def start_models(plans, key_data_S, rows, data, splits_S, orders_S, sizes, teachers_S):
        return {g: start_group(grp, cfg, plans[g], key_data_S, rows[g], data, splits_S, teachers_S, sizes)
                for g, grp in groups.items()}

    def start_program(key_data_S, rows, data, splits_S, orders_S, sizes):
        """Each seed's targets (its refinements, once, before the epochs), then every model's start."""
        teachers_S = over_seeds(
            lambda split, shared: pad_targets(make_teachers(plan.specs, shared[0], split, shared[1]), plan.width),
            splits_S, (data, sizes), mesh)
        return (start_models(start_plans(plan.host_rows), key_data_S, rows, data, splits_S, orders_S, sizes,
                             teachers_S), teachers_S)

    def epoch_program(states, e, key_data_S, rows, data, splits_S, orders_S, sizes, teachers_S):
        def one_seed(seeded, shared):
            (state, key_data, split, orders, teachers), (e, rows, data, sizes) = seeded, shared
            padding = None if sizes is None else Padding(orders, sizes)
            return seed_epoch(groups, state, jax.random.wrap_key_data(key_data), e, rows, data, split, cfg, teachers,
                              padding)

        return over_seeds(one_seed, (states, key_data_S, splits_S, orders_S, teachers_S), (e, rows, data, sizes),
                          mesh, seed_axis)

    args = (key_data_S, rows, sharding.place(datas[0], mesh, P()), splits_S, orders_S, sizes)
    phases = {"trace_s": 0.0, "lower_s": 0.0, "xla_s": 0.0}  # where the compile goes
    start = compile_phases(jax.jit(start_program, out_shardings=by_seed), args, phases)
    state_shapes, teacher_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_seed), start.out_info)  # traced once
    step = compile_phases(jax.jit(epoch_program, out_shardings=(by_seed, by_seed)),
                          (state_shapes, jnp.int32(0), *args, teacher_shapes), phases)
    compile_s = time.perf_counter() - t0  # both programs compiled (or loaded from the compilation cache)
    if on_compiled:
        on_compiled(compile_s)

    def train(states, rows, shared, teachers_S, models) -> dict:
        """Every epoch of the compiled step -> ``{method of round 1: FitOutput}`` (S x H, on the host)."""
        history = []
        for e in range(cfg.epochs):
            states, h = step(states, jnp.int32(e), key_data_S, rows, shared, splits_S, orders_S, sizes, teachers_S)
            history.append(jax.block_until_ready(h))
            plan.report(cfg.seeds * num_h * models)  # the padding copies are not counted
        history = jax.tree.map(lambda *per_epoch: jnp.stack(per_epoch, axis=-1), *history)
        per_group = {g: finish(states[g], history[g]) for g in groups}
        per_group = jax.tree.map(lambda a: a[: cfg.seeds], sharding.to_host(per_group))  # the padding trimmed
        return {m: o for g, grp in groups.items() for m, o in split_models(per_group[g], grp).items()}

    starts = {}  # a later round's start programs, by their plans (shared by rounds and datas with the same plans)
    done = []
    for data in datas:  # padded to the bucket, if any (the splits of next_teachers are the real ones)
        t1, later_compile_s = time.perf_counter(), 0.0
        shared = sharding.place(data, mesh, P())
        states, teachers_S = start(key_data_S, rows, shared, splits_S, orders_S, sizes)
        outputs = train(states, rows, shared, teachers_S, len(plan.first))
        first_S = jax.tree.map(lambda a: a[: cfg.seeds], teachers_S)
        for names in plan.later.values():
            round_host = round_rows(groups, plan.host_rows, names, num_h)
            round_targets = next_teachers(names, outputs, groups, plan.hps, data, splits, first_S, plan.teacher_J,
                                          plan.width)
            round_args = (key_data_S, sharding.place(round_host, mesh, P()), shared, splits_S, orders_S, sizes,
                          sharding.place(sharding.pad_seeds(round_targets, mesh.size), mesh, P("seeds")))
            plans = start_plans(round_host)
            plan_key = repr({g: (p[0].tolist(), p[1].tolist()) for g, p in plans.items()})
            if plan_key not in starts:
                tc = time.perf_counter()
                starts[plan_key] = jax.jit(functools.partial(start_models, plans), out_shardings=by_seed).lower(
                    *round_args).compile()
                later_compile_s += time.perf_counter() - tc
            by_base = train(starts[plan_key](*round_args), round_args[1], shared, round_args[-1], len(names))
            outputs.update({n: by_base[round_of(n)[0]] for n in names})
        run_s = time.perf_counter() - t1 - later_compile_s
        done.append(({m: outputs[m] for m in cfg.methods},  # S x H, in the config's order
                     {"compile_s": (compile_s if not done else 0.0) + later_compile_s, "run_s": run_s,
                      "bucket_rows": None if sizes is None else int(data.labels_N.shape[0]),
                      **({} if done else {"compile_phases": phases})}))
    return done


def compile_phases(jitted, args, phases: dict):
    """``jitted`` compiled for ``args``, each phase's seconds added to ``phases``: tracing to a jaxpr (``trace_s``),
    lowering it to StableHLO (``lower_s``) and XLA's compilation (``xla_s``: its passes, autotuning on a GPU; a
    load from the persistent compilation cache when that holds the program)."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    phases["trace_s"] += t1 - t0
    phases["lower_s"] += t2 - t1
    phases["xla_s"] += time.perf_counter() - t2
    return compiled


def model_by_model_fits(plan: Plan, datas, splits: SeedSplits, on_compiled) -> list[tuple[dict, dict]]:
    """:func:`fit_each` without vmap: :func:`make_fit` compiled per method (inside its first call, so the compile
    counts as run time) and called model by model on one device."""
    cfg, num_h = plan.cfg, len(plan.hps.lr)
    hps = jax.tree.map(jnp.asarray, plan.hps)
    splits = jax.tree.map(jnp.asarray, splits)
    t0 = time.perf_counter()
    compiled = {m: jax.jit(make_fit(m, plan.num_classes, plan.text_TxKxD, cfg)) for m in plan.first}
    targets = jax.jit(make_teachers, static_argnums=0)
    model_teacher_J = {m: plan.teacher_J[g][i * num_h:(i + 1) * num_h] for g, grp in plan.groups.items()
                       for i, m in enumerate(grp.methods)}
    compile_s = time.perf_counter() - t0

    def fit_seeds(f, data, teachers_S, teacher_H):
        """``f`` for every seed x grid point, stacked ``S x H``."""
        per_seed = []
        for s in range(cfg.seeds):
            split_s = jax.tree.map(lambda a: a[s], splits)
            per_hp = [f(plan.keys[s], jax.tree.map(lambda a: a[h], hps), data, split_s, teachers_S[s], teacher_H[h])
                      for h in range(num_h)]
            per_seed.append(jax.tree.map(lambda *xs: jnp.stack(xs), *per_hp))
        plan.report(cfg.seeds * num_h * cfg.epochs)
        return jax.block_until_ready(jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed))

    done = []
    for data in datas:
        t1 = time.perf_counter()
        teachers = [targets(plan.specs, data, jax.tree.map(lambda a: a[s], splits)) for s in range(cfg.seeds)]
        outputs = {m: fit_seeds(f, data, teachers, model_teacher_J[m]) for m, f in compiled.items()}
        first_S = jax.tree.map(lambda *xs: jnp.stack(xs), *teachers)
        for names in plan.later.values():
            for n in names:  # each on its own targets: the weak labels, the reference, its previous round's student
                round_S = next_teachers((n,), outputs, plan.groups, hps, data, splits, first_S, plan.teacher_J, 3)
                outputs[n] = fit_seeds(compiled[round_of(n)[0]], data,
                                       [jax.tree.map(lambda a: a[s], round_S) for s in range(cfg.seeds)], [2] * num_h)
        done.append(({m: outputs[m] for m in cfg.methods},
                     {"compile_s": compile_s if not done else 0.0, "run_s": time.perf_counter() - t1}))
    return done


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
    num_first = len(plan(kinds, cfg.grid_hparams(), reference_refinement(cfg))[0])
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
