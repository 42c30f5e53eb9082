"""Heads as pairs of pure functions over L2-normalised features ``r̂`` (DESIGN.md §3).

- prototype (CPL): ``zs_i = s * cos(C_i, r)``, C initialised to the raw text embeddings (mean over
  templates) where the store has them, else to the mean ``r̂`` of the training rows whose target
  argmax is i. The cosine ignores C's norm, but Adam's step is absolute, so the init's norm sets
  the effective step size: raw CLIP text embeddings (norm ~10) move ~10x more slowly at lr 1e-2
  than unit-norm ones, which is what the paper's lr was tuned for.
- linear (LP): ``zs = s * W (r̂ - mu) + b``, a linear probe made to converge in the paper's few steps:
  - ``mu`` is the mean of ``r̂`` over the seed's ``hold_train`` rows (no labels used), kept in the params
    as ``center_D`` and never trained. Real encoder features are far from centred (on the demo 55% of
    each unit vector's squared norm lies along one shared direction), so without it a fresh head sends
    most rows to one class, and the self-training losses (AuxConf, AdaptConf) lock that class in.
  - ``s = hp.lp_scale`` sets the step size in logit space: Adam's step in W is about ``lr`` whatever the
    gradient's size, and unit-norm features give small logits.
  - It starts from the regularised linear discriminant of the training targets (``shrunk_lda``): the
    problem is convex in ``(W, b)``, so the start changes how fast the probe converges, not where to.
    ``hp.lp_shrinkage = 1`` is the nearest-class-mean start, the LP twin of the prototypes' centroid start.

``init(key, feats_NxD, targets_N, hp) -> params``; ``apply(params, feats_BxD, hp) -> logits_BxK``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Head(NamedTuple):
    init: Callable
    apply: Callable
    penalty: Callable = lambda params, hp: 0.0  # added to the mean training loss


def l2_normalize(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def zero_shot_prototypes(text_TxKxD):
    """Normalised mean of the normalised per-template text embeddings (open_clip's recipe), ``K x D``."""
    return l2_normalize(jnp.mean(l2_normalize(text_TxKxD), axis=0))


def centroid_prototypes(key, feats_NxD, targets_N, num_classes):
    """Normalised class means of ``feats`` by ``targets``; a random direction for an empty class."""
    sums_KxD = jax.ops.segment_sum(feats_NxD, targets_N, num_segments=num_classes)
    empty_K = jnp.linalg.norm(sums_KxD, axis=1) == 0
    random_KxD = jax.random.normal(key, sums_KxD.shape, sums_KxD.dtype)
    return l2_normalize(jnp.where(empty_K[:, None], random_KxD, sums_KxD))


def shrunk_lda(x_NxD, targets_N, num_classes, shrinkage):
    """Regularised discriminant (Hastie et al., ESL 2nd ed. Eq. 4.14) of centred features: ``(w_KxD, b_K)``.

    Logits ``x @ w.T + b`` with ``w_k = Σ⁻¹ m_k``, ``b_k = -m_kᵀ Σ⁻¹ m_k / 2 + log π_k``, the class means
    ``m_k``, Laplace-smoothed priors ``π_k`` (an empty class gets ``w_k = 0`` and a small prior) and the
    within-class covariance shrunk toward a scaled identity, ``Σ = (1-δ) S_w + δ tr(S_w)/D I``, δ = shrinkage.

    >>> import jax.numpy as jnp
    >>> w, b = shrunk_lda(jnp.array([[1., 0.], [-1., 0.]]), jnp.array([0, 1]), 2, 1.0)
    >>> w.shape, b.shape
    ((2, 2), (2,))
    """
    n, d = x_NxD.shape
    counts_K = jnp.bincount(targets_N, length=num_classes)
    means_KxD = jax.ops.segment_sum(x_NxD, targets_N, num_segments=num_classes) / jnp.maximum(counts_K, 1)[:, None]
    within_NxD = x_NxD - means_KxD[targets_N]
    cov_DxD = within_NxD.T @ within_NxD / n
    eye_DxD = jnp.eye(d, dtype=x_NxD.dtype)
    cov_DxD = (1.0 - shrinkage) * cov_DxD + shrinkage * jnp.trace(cov_DxD) / d * eye_DxD
    w_DxK = jnp.linalg.solve(cov_DxD + 1e-6 * eye_DxD, means_KxD.T)
    b_K = -0.5 * jnp.sum(means_KxD.T * w_DxK, axis=0) + jnp.log((counts_K + 1.0) / (n + num_classes))
    return w_DxK.T, b_K


def prototype_head(num_classes: int, text_TxKxD=None) -> Head:
    def init(key, feats_NxD, targets_N, hp):
        if text_TxKxD is not None:
            return {"prototypes_KxD": jnp.mean(jnp.asarray(text_TxKxD), axis=0)}
        return {"prototypes_KxD": centroid_prototypes(key, feats_NxD, targets_N, num_classes)}

    def apply(params, feats_BxD, hp):
        return hp.logit_scale * feats_BxD @ l2_normalize(params["prototypes_KxD"]).T

    return Head(init, apply)


def linear_head(num_classes: int) -> Head:
    def init(key, feats_NxD, targets_N, hp):
        center_D = jnp.mean(feats_NxD, axis=0)
        w_KxD, b_K = shrunk_lda(feats_NxD - center_D, targets_N, num_classes, hp.lp_shrinkage)
        return {"w_KxD": w_KxD / hp.lp_scale, "b_K": b_K, "center_D": center_D}

    def apply(params, feats_BxD, hp):
        centred_BxD = feats_BxD - jax.lax.stop_gradient(params["center_D"])  # a statistic: zero gradient, no step
        return hp.lp_scale * centred_BxD @ params["w_KxD"].T + params["b_K"]

    def penalty(params, hp):
        """L2 on the effective weights s·W, in logit units: scikit-learn's objective with lp_l2 = 1 / (C n)."""
        return 0.5 * hp.lp_l2 * jnp.sum((hp.lp_scale * params["w_KxD"]) ** 2)

    return Head(init, apply, penalty)


def make_head(name: str, num_classes: int, text_TxKxD=None) -> Head:
    if name == "prototype":
        return prototype_head(num_classes, text_TxKxD)
    if name == "linear":
        return linear_head(num_classes)
    raise ValueError(f"unknown head {name!r}; valid: prototype, linear")
