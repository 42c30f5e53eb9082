"""Evaluation, separate from training: predictions and labels in, arrays over ``[seed, hparam]`` out."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.fit import FitData, FitOutput, mixture_weights
from w2s_jax.heads import make_head, zero_shot_prototypes
from w2s_jax.methods import METHODS
from w2s_jax.splits import SeedSplits


def accuracy(logits_NxK, labels_N):
    return jnp.mean(jnp.argmax(logits_NxK, axis=-1) == labels_N)


def agreement(logits_a_NxK, logits_b_NxK):
    """Fraction of rows where the two models predict the same class."""
    return jnp.mean(jnp.argmax(logits_a_NxK, axis=-1) == jnp.argmax(logits_b_NxK, axis=-1))


def cross_entropy(logits_NxK, labels_N):
    """Mean cross-entropy ``-log softmax(z)_y`` against ground truth (nats)."""
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits_NxK), labels_N[:, None], axis=1))


def misfit(student_logits_NxK, weak_logits_NxK):
    """Mean ``KL(p_s ‖ p_w) = Σ_k p_s,k (log p_s,k − log p_w,k)``, ``p = softmax(z)`` (T = 1), in nats; label-free.

    The misfit of Mulgund & Pabbaraju ("Relating Misfit to Gain in Weak-to-Strong Generalization Beyond the
    Squared Loss"), the KL form of Charikar et al.'s squared misfit ("Quantifying the Gain in Weak-to-Strong
    Generalization"). Their result, for a strong class that is convex and contains the truth: the gain
    ``CE(weak) − CE(student)`` on ground truth is at least the misfit. Our heads are neither trained to their
    theorem's projection nor known to contain the truth, so here the inequality is a prediction to check.
    """
    log_ps, log_pw = jax.nn.log_softmax(student_logits_NxK), jax.nn.log_softmax(weak_logits_NxK)
    return jnp.mean(jnp.sum(jnp.exp(log_ps) * (log_ps - log_pw), axis=1))


def choice_by_misfit(misfit_WxS, student_acc_WxS) -> dict:
    """How well the label-free choice of weak model agrees with the truth, over W weak models and S seeds.

    The choice: the weak model whose student has the smallest misfit. Reading: where the student is close to
    the truth, its misfit KL(p_s ‖ p_w) estimates the weak model's own loss against the truth, so a smaller
    misfit marks a better teacher (a larger misfit predicts a larger *gain*, which a worse teacher also has).
    Returns {"top1": fraction of seeds where that weak model also gives the best student test' accuracy,
    "pairwise": fraction of weak-model pairs, over seeds, ordered alike by misfit (ascending) and by student
    test' accuracy (descending); pairs tied in accuracy are left out (NaN if all are)}.
    """
    misfit_WxS, acc_WxS = np.asarray(misfit_WxS, np.float64), np.asarray(student_acc_WxS, np.float64)
    top1 = np.mean(acc_WxS[np.argmin(misfit_WxS, axis=0), np.arange(acc_WxS.shape[1])] == acc_WxS.max(axis=0))
    i, j = np.triu_indices(misfit_WxS.shape[0], k=1)
    by_misfit = np.sign(misfit_WxS[j] - misfit_WxS[i])  # +1: i is chosen before j
    by_acc = np.sign(acc_WxS[i] - acc_WxS[j])  # +1: i's student is better
    decided = by_acc != 0
    pairwise = float(np.mean(by_misfit[decided] == by_acc[decided])) if decided.any() else float("nan")
    return {"top1": float(top1), "pairwise": pairwise}


def pgr(w2s, weak, ceiling):
    """Performance gap recovered, (w2s - weak) / (ceiling - weak); NaN where ceiling <= weak."""
    w2s, weak, ceiling = (np.asarray(x, np.float64) for x in (w2s, weak, ceiling))
    gap = ceiling - weak
    return np.where(gap > 0, (w2s - weak) / np.where(gap > 0, gap, 1.0), np.nan)


def paired_interval(a_S, b_S, level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of ``a − b`` over seeds, paired by seed: Student's t-interval on the S differences,
    ``mean ± t_{(1+level)/2, S−1} · sd / √S`` (sd with S − 1). A t-interval, not a bootstrap: with 5 seeds a
    bootstrap has only 126 distinct resamples and is too narrow; the t-interval assumes roughly normal
    differences. NaN bounds with fewer than 2 seeds.

    >>> paired_interval([0.7, 0.8, 0.9], [0.6, 0.7, 0.8])
    (0.1, 0.1, 0.1)
    """
    from scipy import stats

    diff = np.asarray(a_S, np.float64) - np.asarray(b_S, np.float64)
    mean = float(np.round(diff.mean(), 12))
    if diff.size < 2:
        return mean, float("nan"), float("nan")
    half = float(stats.t.ppf((1 + level) / 2, diff.size - 1) * diff.std(ddof=1) / np.sqrt(diff.size))
    half = float(np.round(half, 12))
    return mean, mean - half, mean + half


def distinguishable(low: float, high: float) -> bool:
    """Whether an interval excludes 0 (a difference told apart from none)."""
    return bool(low > 0 or high < 0)


LOW_CONFIDENCE = 0.25  # coverage: the weak model's least confident quarter of test' rows


def gain_sources(student_logits_NxK, weak_logits_NxK, labels_N) -> dict:
    """Where a student's gain over its weak teacher comes from (Lang, Sontag & Vijayaraghavan: pseudolabel correction
    and coverage expansion), on one seed's test' rows:

    - ``correction``: the share of the rows the weak model gets wrong that the student gets right;
    - ``damage``: the share of the rows the weak model gets right that the student gets wrong;
    - ``low_conf_acc`` / ``rest_acc``: the student's accuracy on the weak model's least confident quarter of the rows
      (the ``floor(0.25·(N−1)) + 1`` rows of lowest top softmax probability, as many as lie at or below the 25th
      percentile when no two tie; ties are broken by row order, so it is a quarter even when every row ties) and on
      the rest; ``weak_low_conf_acc`` / ``weak_rest_acc``: the weak model's own, on the same rows.
    A share over no rows is NaN."""
    student_ok = jnp.argmax(student_logits_NxK, axis=-1) == labels_N
    weak_ok = jnp.argmax(weak_logits_NxK, axis=-1) == labels_N
    confidence = jnp.max(jax.nn.softmax(weak_logits_NxK), axis=-1)
    n = confidence.shape[0]
    quarter = int(math.floor(LOW_CONFIDENCE * (n - 1))) + 1
    low = jnp.zeros(n, bool).at[jnp.argsort(confidence, stable=True)[:quarter]].set(True)
    share = lambda hit, where: jnp.sum(hit & where) / jnp.sum(where)  # noqa: E731  NaN over no rows
    return {"correction": share(student_ok, ~weak_ok), "damage": share(~student_ok, weak_ok),
            "low_conf_acc": share(student_ok, low), "rest_acc": share(student_ok, ~low),
            "weak_low_conf_acc": share(weak_ok, low), "weak_rest_acc": share(weak_ok, ~low)}


GAIN_SOURCES = ("correction", "damage", "low_conf_acc", "rest_acc", "weak_low_conf_acc", "weak_rest_acc")


def evaluate_method(name: str, out: FitOutput, hps, data: FitData, splits: SeedSplits, num_classes,
                    head: str | None = None):
    """-> {test_acc, agreement, misfit, test_ce, and :func:`gain_sources`' shares}, each ``S x H``, for the
    best-epoch variables.

    misfit: KL(student ‖ weak) on hold_val (label-free); test_ce: the student's cross-entropy on test'. With
    several weak models, agreement and misfit are against the first; multi-weak methods add weak_weights, ``S x H x M``.
    The selection rule's hold_val score is the fit's own (its history's ``val_score`` at the kept epoch,
    :func:`w2s_jax.select.at_best_epoch`), not recomputed here. ``head``: the head that applies the variables (default the
    method's; w2s-tp's prompt heads are saved in their applied form, ``"prototype"``).
    """
    head = make_head(head or METHODS[name].head, num_classes)

    def one(variables, hp, split):
        test_logits = head.apply(variables, data.feats_NxD[split.test_prime], hp)
        val_logits = head.apply(variables, data.feats_NxD[split.hold_val], hp)
        scores = {
            "test_acc": accuracy(test_logits, data.labels_N[split.test_prime]),
            "agreement": agreement(test_logits, data.weak_NxK[split.test_prime]),
            "misfit": misfit(val_logits, data.weak_NxK[split.hold_val]),
            "test_ce": cross_entropy(test_logits, data.labels_N[split.test_prime]),
            **gain_sources(test_logits, data.weak_NxK[split.test_prime], data.labels_N[split.test_prime]),
        }
        if "mixture" in variables:  # a multi-weak method: the weights of its weak models, S x H x M
            scores["weak_weights"] = mixture_weights(variables)
        return scores

    over = jax.vmap(jax.vmap(one, in_axes=(0, 0, None)), in_axes=(0, None, 0))
    return jax.tree.map(np.asarray, jax.jit(over)(out.variables, hps, splits))


def weak_accuracy(data: FitData, splits: SeedSplits):
    """Weak model accuracy on each seed's test', ``S``."""
    return np.asarray(jax.vmap(lambda t: accuracy(data.weak_NxK[t], data.labels_N[t]))(splits.test_prime))


def weak_scores(data: FitData, splits: SeedSplits) -> dict:
    """The weak model on each seed's test': {test_acc, test_ce}, each ``S``."""
    ce = jax.vmap(lambda t: cross_entropy(data.weak_NxK[t], data.labels_N[t]))(splits.test_prime)
    return {"test_acc": weak_accuracy(data, splits), "test_ce": np.asarray(ce)}


def zero_shot(data: FitData, splits: SeedSplits, text_TxKxD, logit_scale: float):
    """Untrained text prototypes: {test_acc, agreement}, each ``S``."""
    protos_KxD = zero_shot_prototypes(jnp.asarray(text_TxKxD))

    def one(t):
        logits = logit_scale * data.feats_NxD[t] @ protos_KxD.T
        return {"test_acc": accuracy(logits, data.labels_N[t]), "agreement": agreement(logits, data.weak_NxK[t])}

    return jax.tree.map(np.asarray, jax.vmap(one)(splits.test_prime))
