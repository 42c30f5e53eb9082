"""Weak-to-strong losses as data (DESIGN.md §3 "One family"): one parametric objective, one row per method.

Every built-in loss is a weighted sum of the student's cross-entropies against four target parts:

- ``weak_soft``: the teacher's soft labels ``softmax(zw/T)``, the student at ``zs/T``, taken as
  ``KL(softmax(zw/T) ‖ softmax(zs/T))`` (the teacher's entropy, a constant for the gradient, is left out);
- ``weak_hard``: the teacher's hard labels ``argmax zw``;
- ``self_hard``: the student's own hard labels ``argmax sg(zs)``;
- ``truth``: the ground truth (the ceilings).

A :class:`Coeffs` row gives each part's weight, whether the soft part is at ``hp.temperature`` and times ``T²``,
and how far the target moves toward ``self_hard``: by AuxConf's schedule ``α_t``, by AdaptConf's per-example gate
``α``, or not at. With ``λ = schedule·α_t + adaptive·α`` the per-example loss is

    (1-λ) · (weak_soft·f_T·KL_T + weak_hard·CE(argmax zw) + truth·CE(y)) + ((1-λ)·self_hard + λ) · CE(argmax sg zs)

with ``f_T = T²`` where ``t_squared`` is set, else 1. Held as arrays, the rows of all models of a seed are one
vectorized loss (``jax.vmap`` over a models axis), and a new method is a new row (:func:`w2s_jax.methods.define_method`).

>>> import jax.numpy as jnp
>>> from w2s_jax.config import Hparams
>>> zs, zw = jnp.zeros((2, 3)), jnp.eye(3)[:2] * 5.0
>>> family_loss(zs, zw, jnp.array([0, 1]), LOSSES["ce"], progress=0.0, hp=Hparams()).shape
(2,)
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Coeffs(NamedTuple):
    """One method's row of the loss family. Fields are floats, or arrays with a leading models axis J."""

    weak_soft: float = 0.0  # weight of KL(softmax(zw/T) || softmax(zs/T)) (KD, CPL, AuxConf, AdaptConf)
    weak_hard: float = 0.0  # weight of CE(zs, argmax zw) (CE)
    self_hard: float = 0.0  # weight of CE(zs, argmax sg(zs)) (self-training)
    truth: float = 0.0  # weight of CE(zs, y): the ceilings, ground truth alone
    soft_at_t: float = 1.0  # 1: the soft part at hp.temperature; 0: at T = 1 (AuxConf)
    t_squared: float = 0.0  # 1: the soft part times T² (Hinton's KD; CPL has no such factor)
    schedule: float = 0.0  # weight of AuxConf's α_t = alpha_max·min(1, progress/aux_warmup) toward self_hard
    adaptive: float = 0.0  # weight of AdaptConf's gate α = sg(sigmoid((CE(argmax zs) - CE(argmax zw)) / tau_a))


PARTS = ("weak_soft", "weak_hard", "self_hard", "truth")  # the target parts; their weights sum to 1
FLAGS = ("soft_at_t", "t_squared")  # 0 or 1
MOVES = ("schedule", "adaptive")  # each in [0, 1], their sum at most 1

# The built-in rows. KD and CPL differ only by T², which Adam's update ignores (methods.py).
LOSSES = {
    "ce": Coeffs(weak_hard=1.0),
    "kd": Coeffs(weak_soft=1.0, t_squared=1.0),
    "cpl": Coeffs(weak_soft=1.0),  # paper Eq. 4-5 as expanded: sum p^w log(p^w/p^s) = KL(p^w || p^s)
    "auxconf": Coeffs(weak_soft=1.0, soft_at_t=0.0, schedule=1.0),  # Burns et al. 2023, multiclass
    "adaptconf": Coeffs(weak_soft=1.0, t_squared=1.0, adaptive=1.0),  # Guo et al. 2024
    "truth": Coeffs(truth=1.0),  # the ceilings: CE against ground truth
}


def check_coeffs(name: str, coeffs: Coeffs) -> Coeffs:
    """``coeffs`` with float fields, or a ValueError naming the field: weights must be a distribution over the
    parts, flags 0 or 1, moves in [0, 1] summing to at most 1, and ground truth alone (a ceiling) or not at all."""
    values = {}
    for field, value in coeffs._asdict().items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"method {name}: {field} = {value!r} is not a finite number")
        values[field] = float(value)
    for field in PARTS + MOVES:
        if values[field] < 0:
            raise ValueError(f"method {name}: {field} = {values[field]:g} is negative; weights are >= 0")
    total = sum(values[p] for p in PARTS)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"method {name}: the weights {', '.join(PARTS)} sum to {total:g}; they describe the "
                         "training target as a distribution over these parts, so they must sum to 1")
    for field in FLAGS:
        if values[field] not in (0.0, 1.0):
            raise ValueError(f"method {name}: {field} = {values[field]:g}; it is a switch, 0 or 1")
    if sum(values[m] for m in MOVES) > 1.0 + 1e-6:
        raise ValueError(f"method {name}: schedule + adaptive = {values['schedule'] + values['adaptive']:g}; "
                         "together they move at most the whole target toward self_hard, so at most 1")
    if 0.0 < values["truth"] < 1.0:
        raise ValueError(f"method {name}: truth = {values['truth']:g}; ground truth is a ceiling's whole target "
                         "(truth = 1) or no part of a weak-to-strong one (truth = 0): hold_train has weak labels only")
    return Coeffs(**values)


def _ce_hard(logp_BxK, labels_B):
    """Cross-entropy against integer labels, per example, from log-probabilities."""
    return -jnp.take_along_axis(logp_BxK, labels_B[:, None], axis=1)[:, 0]


F32_MAX = float(jnp.finfo(jnp.float32).max)


def _kl(teacher_BxK, student_BxK, temperature):
    """KL(softmax(teacher/T) || softmax(student/T)), per example. A teacher's logits near float32's limit (their
    ``/T`` clipped to it) give classes of probability exactly 0, which add 0 (``0 · log 0``), not NaN."""
    logp_t = jax.nn.log_softmax(jnp.clip(teacher_BxK / temperature, -F32_MAX, F32_MAX))
    logp_s = jax.nn.log_softmax(student_BxK / temperature)
    p_t = jnp.exp(logp_t)
    return jnp.sum(jnp.where(p_t > 0, p_t * (logp_t - logp_s), 0.0), axis=1)


def family_loss(student_BxK, teacher_BxK, labels_B, coeffs: Coeffs, *, progress, hp):
    """The loss of one model, per example ``B``: ``coeffs`` (one row) applied to the student's logits, the
    teacher's logits (weak logits, or a multi-weak mixture's log-probabilities) and the ground truth.

    ``progress`` is the fraction of training done (0..1); ``hp`` holds the temperatures and AuxConf's and
    AdaptConf's constants. The teacher and the gates are constants for the gradient; the caller reduces.
    """
    logp_BxK = jax.nn.log_softmax(student_BxK)
    ce_weak_B = _ce_hard(logp_BxK, jnp.argmax(teacher_BxK, axis=1))
    ce_self_B = _ce_hard(logp_BxK, jnp.argmax(jax.lax.stop_gradient(student_BxK), axis=1))
    ce_truth_B = _ce_hard(logp_BxK, labels_B)
    # an unused soft part (weight 0) is computed at T = 1, so that a NaN it could make never reaches the loss
    t = jnp.where((coeffs.soft_at_t > 0) & (coeffs.weak_soft > 0), hp.temperature, 1.0)
    soft_B = jnp.where(coeffs.t_squared > 0, t**2, 1.0) * _kl(teacher_BxK, student_BxK, t)
    scheduled = hp.alpha_max * jnp.minimum(1.0, progress / hp.aux_warmup)
    gate_B = jax.lax.stop_gradient(jax.nn.sigmoid((ce_self_B - ce_weak_B) / hp.tau_a))
    move_B = coeffs.schedule * scheduled + coeffs.adaptive * gate_B
    keep_B = 1.0 - move_B
    return (keep_B * (coeffs.weak_soft * soft_B + coeffs.weak_hard * ce_weak_B + coeffs.truth * ce_truth_B)
            + (keep_B * coeffs.self_hard + move_B) * ce_self_B)


def stack_rows(rows) -> Coeffs:
    """Rows as one :class:`Coeffs` of float32 arrays with a leading models axis J."""
    return Coeffs(*(jnp.asarray([getattr(r, f) for r in rows], jnp.float32) for f in Coeffs._fields))


def get_loss(name: str) -> Coeffs:
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]
