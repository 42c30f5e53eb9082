"""Label-free selection: which epoch and grid point of a method are kept, and what each rule costs.

Every criterion is computed on ``hold_val`` after every epoch, for every model, without a label
(:func:`scores`); ``--select`` names the one that keeps each model's epoch and each method's grid point.
The others are kept in the history, so the report can show what each rule would have chosen, and its regret
against the best grid point on test' (:func:`regret`), a yardstick that no rule may use.

- ``agreement``: agreement with the model's own training target, the paper's rule (the weak labels; their
  mixture for a multi-weak method; the refined labels for ``METHOD@refinement``, counting only kept rows);
- ``refined``: agreement with the kNN vote of the weak labels on the strong features (:mod:`w2s_jax.refine`,
  k = ``refine_k`` of the base hyperparameters), whatever the model trained on;
- ``misfit``: the largest ``KL(p_student ‖ p_weak)``: W2S gain sits where the student departs from its teacher
  (Charikar et al.: for a strong class that holds the truth, gain ≥ misfit);
- ``confidence``: the student's mean top probability on the ``hold_val`` rows where the weak model is least sure
  (top probability at or below its median).

A ceiling is trained on the truth and is always selected on ``hold_val`` accuracy, whatever the rule.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CRITERIA = ("agreement", "refined", "misfit", "confidence")
HISTORY_KEY = "score_{}"  # each criterion's per-epoch score in a model's history


class ValView(NamedTuple):
    """What every model of a seed is scored against on hold_val, computed once per seed and epoch."""

    log_weak_VxK: jax.Array  # the weak model's log-probabilities
    unsure_V: jax.Array  # 1 where the weak model's top probability is at or below its median
    reference_V: jax.Array  # the `refined` rule's labels: the argmax of the kNN vote
    labels_V: jax.Array  # ground truth, for the ceilings only


def masked_mean(x_V, valid_V=None):
    """The mean of ``x`` over its real rows (leading axis V; ``valid_V``: False for the padding rows of a size
    bucket; None: every row)."""
    if valid_V is None:
        return jnp.mean(x_V, 0)
    valid = jnp.reshape(valid_V, valid_V.shape + (1,) * (jnp.ndim(x_V) - 1))
    return jnp.sum(jnp.where(valid, x_V, 0.0), 0) / jnp.sum(valid_V)


def val_view(weak_VxK, reference_VxK, labels_V, valid_V=None) -> ValView:
    """``valid_V``: the real rows of hold_val padded to a size bucket (None: every row); a padding row is never
    unsure and the median is over the real rows."""
    log_weak = jax.nn.log_softmax(weak_VxK)
    weak_top = jnp.max(jnp.exp(log_weak), axis=1)
    if valid_V is None:
        unsure = weak_top <= jnp.median(weak_top)
    else:  # nanmedian is the median of the rows that are not NaN, by the same arithmetic as median's
        unsure = valid_V & (weak_top <= jnp.nanmedian(jnp.where(valid_V, weak_top, jnp.nan)))
    return ValView(log_weak, unsure.astype(jnp.float32), jnp.argmax(reference_VxK, axis=1), labels_V)


def scores(val_logits_VxK, teacher_VxK, weight_V, view: ValView, is_truth, valid_V=None) -> dict:
    """Every criterion's score of one model at one epoch (larger is better): ``{criterion: scalar}``;
    ``valid_V`` as in :func:`val_view`."""
    student = jnp.argmax(val_logits_VxK, axis=1)
    kept = masked_mean(weight_V, valid_V)  # 1 unless a filter dropped rows (then agreement is over the kept rows)
    unsure = view.unsure_V
    log_ps, log_pw = jax.nn.log_softmax(val_logits_VxK), view.log_weak_VxK
    hits = weight_V * (student == jnp.argmax(teacher_VxK, axis=1))
    label_free = {
        "agreement": masked_mean(hits, valid_V) / jnp.maximum(kept, 1e-6),
        "refined": masked_mean(student == view.reference_V, valid_V),
        "misfit": masked_mean(jnp.sum(jnp.exp(log_ps) * (log_ps - log_pw), axis=1), valid_V),
        "confidence": jnp.sum(unsure * jnp.max(jnp.exp(log_ps), axis=1)) / jnp.maximum(jnp.sum(unsure), 1.0),
    }
    truth = masked_mean(student == view.labels_V, valid_V)
    return {c: jnp.where(is_truth, truth, label_free[c]).astype(jnp.float32) for c in CRITERIA}


def at_best_epoch(history_SxHxE, best_epoch_SxH):
    """A history field at each model's kept epoch (1-based ``best_epoch``): ``S x H``."""
    index = np.maximum(np.asarray(best_epoch_SxH) - 1, 0)[..., None]
    return np.take_along_axis(np.asarray(history_SxHxE), index, axis=-1)[..., 0]


def failed_models(history: dict):
    """``S x H`` bool: True where a model's training loss went non-finite (never selected, reported as failed)."""
    return ~np.isfinite(np.asarray(history["train_loss"])).all(axis=-1)


def kept_point(history: dict, best_epoch_SxH) -> int:
    """The grid point a method keeps: its ``val_score`` (the fit's --select rule) at each model's kept epoch,
    through :func:`grid_point` (what the results report and the next round trains on)."""
    return grid_point(at_best_epoch(history["val_score"], best_epoch_SxH), failed_models(history))


def grid_point(score_SxH, failed_SxH=None) -> int:
    """The grid point kept: the first with the best mean score over seeds (each model's score at its kept
    epoch); a grid point that failed on any seed is never chosen."""
    score_SxH = np.asarray(score_SxH, np.float64)
    failed = np.zeros(score_SxH.shape, bool) if failed_SxH is None else np.asarray(failed_SxH, bool)
    return int(np.argmax(np.where(failed.any(axis=0), -np.inf, score_SxH.mean(axis=0))))


def choose(score_SxHxE, failed_SxH=None) -> tuple[int, np.ndarray]:
    """A rule's choice from its per-epoch scores: ``(grid point h, 0-based epoch per seed at h)``. Each model keeps
    its first best epoch (as the fit does), then :func:`grid_point`."""
    score = np.asarray(score_SxHxE, np.float64)
    score = np.where(np.isfinite(score), score, -np.inf)
    h = grid_point(score.max(axis=2), failed_SxH)
    return h, np.argmax(score[:, h], axis=1)


def regret(history: dict, failed_SxH=None) -> dict | None:
    """What each rule chose for one method, against the best point on test' (a yardstick, never a choice).

    ``history``: the method's per-epoch fields, each ``S x H x E``, with one ``score_<criterion>`` per rule.
    Returns ``{"oracle": {...}, criterion: {...}}``, each ``{"grid_index", "test_acc" (per seed)}``, and per
    criterion ``"regret"``: its mean test' accuracy minus the oracle's (≤ 0); None without the scores (w2s-tp)."""
    if not all(HISTORY_KEY.format(c) in history for c in CRITERIA):
        return None
    test = np.asarray(history["test_acc"], np.float64)
    seeds = np.arange(test.shape[0])
    h_oracle, e_oracle = choose(test, failed_SxH)
    oracle = test[seeds, h_oracle, e_oracle]
    out = {"oracle": {"grid_index": h_oracle, "test_acc": oracle.tolist()}}
    for c in CRITERIA:
        h, epochs = choose(history[HISTORY_KEY.format(c)], failed_SxH)
        chosen = test[seeds, h, epochs]
        out[c] = {"grid_index": h, "test_acc": chosen.tolist(), "regret": float(chosen.mean() - oracle.mean())}
    return out
