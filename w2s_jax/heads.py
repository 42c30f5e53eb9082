"""Heads as ``flax.linen`` modules over L2-normalised features ``r̂`` (DESIGN.md §3), and their registry.

Every head is called as ``head(feats_BxD, hp, start=None) -> logits_BxK``:

- ``head.init(key, feats_NxD, hp, Start(targets_N, text_KxD))`` sees the seed's ``hold_train`` rows and
  their target classes, so a head may start from the data. It returns the variables: ``"params"`` (trained)
  and, if the head has any, ``"stats"`` (feature statistics fixed at the start, never trained). A variable
  that starts from the data is made with ``self.variable("params", name, fn)``: its ``fn`` runs at init only
  (``self.param`` also runs its initialiser at apply, abstractly, to check the shape).
- ``head.apply(variables, feats_BxD, hp)`` is the forward pass. Both are pure, so ``fit`` vmaps them.
- A fit padded to a size bucket (``fit.pad_to_bucket``: stores of one bucket share a compiled program) passes
  padding rows to ``init`` too: ``Start.real_N`` is False there (and their ``targets_N`` -1). A head that reads
  statistics of the features at ``init`` must leave them out, and says so with ``Head(masked_start=True)``;
  a fit with any other head is not padded.
- Hyperparameters arrive in ``hp`` (arrays, so a grid sweeps them); fields of the module are its shape.
- A head whose logits are linear in ``r̂`` may also define ``linear_form(self, hp) -> (A_KxD, c_K)``, the logits
  being ``r̂ Aᵀ + c``. The fit then computes it with every other such head of the seed in one wide GEMM
  (``fit.heads_logits``); a head without one is applied on its own. Both built-in heads define it and compute
  their forward pass through it, so the two paths do the same arithmetic.

The two built-in heads:

- prototype (CPL): ``zs_i = s * cos(C_i, r)``, C initialised to the raw text embeddings (mean over
  templates) where the store has them, else to the mean ``r̂`` of the training rows whose target
  argmax is i. The cosine ignores C's norm, but Adam's step is absolute, so the init's norm sets
  the effective step size: raw CLIP text embeddings (norm ~10) move ~10x more slowly at lr 1e-2
  than unit-norm ones, which is what the paper's lr was tuned for.
- linear (LP): ``zs = s * W (r̂ - mu) + b``, a linear probe made to converge in the paper's few steps:
  - ``mu`` is the mean of ``r̂`` over the seed's ``hold_train`` rows (no labels used), the ``stats`` variable
    ``center_D``. Real encoder features are far from centred (on the demo 55% of each unit vector's squared
    norm lies along one shared direction), so without it a fresh head sends most rows to one class, and the
    self-training losses (AuxConf, AdaptConf) lock that class in.
  - ``s = hp.lp_scale`` sets the step size in logit space: Adam's step in W is about ``lr`` whatever the
    gradient's size, and unit-norm features give small logits.
  - It starts from the regularised linear discriminant of the training targets (``shrunk_lda``): the
    problem is convex in ``(W, b)``, so the start changes how fast the probe converges, not where to.
    ``hp.lp_shrinkage = 1`` is the nearest-class-mean start, the LP twin of the prototypes' centroid start.

A new head is one module plus one line in ``HEADS`` (README: "Add a head").
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from w2s_jax.select import masked_mean


class Start(NamedTuple):
    """What a head may start from at ``init`` (never passed to ``apply``)."""

    targets_N: jax.Array  # target class of each training row (weak argmax, or the label for a ceiling);
    #                       -1 leaves a row out (multi-weak: the rows where the weak models disagree)
    text_KxD: Any = None  # mean raw text embedding per class, or None without a text tower
    real_N: Any = None  # False for the padding rows of a size bucket; None: every row is real


class Head(NamedTuple):
    """A registry entry: the module, built as ``module(num_classes)``, an optional training penalty, and which
    hyperparameters its start reads (models of a seed with the same target and these values share one start)."""

    module: Callable[[int], nn.Module]
    penalty: Callable = lambda params, hp: 0.0  # (params, hp) -> scalar added to the mean training loss
    start_fields: tuple | None = None  # Hparams fields that init reads; None: any of them (no start is shared)
    masked_start: bool = False  # init leaves out the rows Start.real_N marks (the fit may pad to a size bucket)


def linear_logits(feats_BxD, a_KxD, c_K):
    """``feats Aᵀ + c``: every head that is linear in ``r̂`` computes its logits this way."""
    return feats_BxD @ a_KxD.T + c_K


def l2_normalize(x, axis=-1):
    return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def zero_shot_prototypes(text_TxKxD):
    """Normalised mean of the normalised per-template text embeddings (open_clip's recipe), ``K x D``."""
    return l2_normalize(jnp.mean(l2_normalize(text_TxKxD), axis=0))


def centroid_prototypes(key, feats_NxD, targets_N, num_classes):
    """Normalised class means of ``feats`` by ``targets`` (-1: left out); a random direction for an empty class."""
    sums_KxD = jax.ops.segment_sum(feats_NxD, targets_N, num_segments=num_classes)
    empty_K = jnp.linalg.norm(sums_KxD, axis=1) == 0
    random_KxD = jax.random.normal(key, sums_KxD.shape, sums_KxD.dtype)
    return l2_normalize(jnp.where(empty_K[:, None], random_KxD, sums_KxD))


def shrunk_lda(x_NxD, targets_N, num_classes, shrinkage):
    """Regularised discriminant (Hastie et al., ESL 2nd ed. Eq. 4.14) of centred features: ``(w_KxD, b_K)``.

    Logits ``x @ w.T + b`` with ``w_k = Σ⁻¹ m_k``, ``b_k = -m_kᵀ Σ⁻¹ m_k / 2 + log π_k``, the class means
    ``m_k``, Laplace-smoothed priors ``π_k`` (an empty class gets ``w_k = 0`` and a small prior) and the
    within-class covariance shrunk toward a scaled identity, ``Σ = (1-δ) S_w + δ tr(S_w)/D I``, δ = shrinkage.
    Rows with target -1 are left out.

    >>> import jax.numpy as jnp
    >>> w, b = shrunk_lda(jnp.array([[1., 0.], [-1., 0.]]), jnp.array([0, 1]), 2, 1.0)
    >>> w.shape, b.shape
    ((2, 2), (2,))
    """
    d = x_NxD.shape[1]
    kept_N = targets_N >= 0
    n = jnp.maximum(jnp.sum(kept_N), 1)
    counts_K = jax.ops.segment_sum(kept_N.astype(x_NxD.dtype), targets_N, num_segments=num_classes)
    means_KxD = jax.ops.segment_sum(x_NxD, targets_N, num_segments=num_classes) / jnp.maximum(counts_K, 1)[:, None]
    within_NxD = jnp.where(kept_N[:, None], x_NxD - means_KxD[jnp.maximum(targets_N, 0)], 0.0)
    cov_DxD = within_NxD.T @ within_NxD / n
    eye_DxD = jnp.eye(d, dtype=x_NxD.dtype)
    cov_DxD = (1.0 - shrinkage) * cov_DxD + shrinkage * jnp.trace(cov_DxD) / d * eye_DxD
    w_DxK = jnp.linalg.solve(cov_DxD + 1e-6 * eye_DxD, means_KxD.T)
    b_K = -0.5 * jnp.sum(means_KxD.T * w_DxK, axis=0) + jnp.log((counts_K + 1.0) / (n + num_classes))
    return w_DxK.T, b_K


class PrototypeHead(nn.Module):
    """CPL's class prototypes: ``logits = s * r̂ · normalize(C)ᵀ``, ``C`` of shape ``K x D``."""

    num_classes: int

    @nn.compact
    def __call__(self, feats_BxD, hp, start: Start | None = None):
        def first_prototypes():
            if start.text_KxD is not None:
                return jnp.asarray(start.text_KxD, feats_BxD.dtype)
            return centroid_prototypes(self.make_rng("params"), feats_BxD, start.targets_N, self.num_classes)

        self.variable("params", "prototypes_KxD", first_prototypes)
        return linear_logits(feats_BxD, *self.linear_form(hp))

    def linear_form(self, hp):
        """``(A_KxD, c_K)``: the logits are ``r̂ Aᵀ + c`` with ``A = s * normalize(C)``, ``c = 0``."""
        prototypes_KxD = self.get_variable("params", "prototypes_KxD")
        return hp.logit_scale * l2_normalize(prototypes_KxD), jnp.zeros(self.num_classes, prototypes_KxD.dtype)


class LinearHead(nn.Module):
    """The centred, scaled linear probe: ``logits = s * (r̂ - mu) · Wᵀ + b``, ``W`` of shape ``K x D``."""

    num_classes: int

    @nn.compact
    def __call__(self, feats_BxD, hp, start: Start | None = None):
        center_D = self.variable("stats", "center_D",  # computed at init only
                                 lambda: masked_mean(feats_BxD, None if start is None else start.real_N)).value
        if start is not None:
            first = shrunk_lda(feats_BxD - center_D, start.targets_N, self.num_classes, hp.lp_shrinkage)
            self.variable("params", "w_KxD", lambda: first[0] / hp.lp_scale)
            self.variable("params", "b_K", lambda: first[1])
        return linear_logits(feats_BxD, *self.linear_form(hp))

    def linear_form(self, hp):
        """``(A_KxD, c_K)``: the logits are ``r̂ Aᵀ + c`` with ``A = s * W``, ``c = b - A mu``."""
        a_KxD = hp.lp_scale * self.get_variable("params", "w_KxD")
        return a_KxD, self.get_variable("params", "b_K") - a_KxD @ self.get_variable("stats", "center_D")


def linear_l2(params, hp):
    """L2 on the effective weights s·W, in logit units: scikit-learn's objective with lp_l2 = 1 / (C n)."""
    return 0.5 * hp.lp_l2 * jnp.sum((hp.lp_scale * params["w_KxD"]) ** 2)


HEADS = {
    "prototype": Head(PrototypeHead, start_fields=(), masked_start=True),  # its centroids read targets_N only
    "linear": Head(LinearHead, linear_l2, start_fields=("lp_shrinkage", "lp_scale"), masked_start=True),
}


def get_head(name: str) -> Head:
    if name not in HEADS:
        raise ValueError(f"unknown head {name!r}; valid: {', '.join(HEADS)}. For a head you registered yourself, "
                         "import its module first (--import MODULE)")
    return HEADS[name]


def make_head(name: str, num_classes: int) -> nn.Module:
    """The registered module ``name`` for ``num_classes`` classes."""
    return get_head(name).module(num_classes)
