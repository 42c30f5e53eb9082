from __future__ import annotations

from typing import TYPE_CHECKING, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


from w2s_jax.config import Hparams
from w2s_jax.heads import get_head, l2_normalize
from w2s_jax.losses import Coeffs, stack_rows
from w2s_jax.methods import METHODS, MULTI_WEAK, Method, coeffs_of, round_of
from w2s_jax.refine import Refinement, Teachers, plan, seed_teachers
from w2s_jax.splits import SeedSplits

if TYPE_CHECKING:  # annotations only: these modules import this one
    from w2s_jax.fit.padding import Sizes



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


def reference_refinement(refine_k: float) -> Refinement:
    """What the ``refined`` selection criterion compares with: the kNN vote at the base ``refine_k``."""
    return Refinement("knn", int(round(refine_k)), val_only=True)


def teacher_plan(groups: dict, hps_H: Hparams, refine_k: float):
    """``(specs, {group: teacher_J})``: the distinct targets of the fit (:func:`w2s_jax.refine.plan`), the
    ``refined`` rule's reference at the base ``refine_k``."""
    return plan({g: [METHODS[m].refine for m in grp.methods] for g, grp in groups.items()}, hps_H,
                reference_refinement(refine_k))


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
