"""Heads as pairs of pure functions over L2-normalised features ``r̂`` (DESIGN.md §3).

- prototype (CPL): ``zs_i = s * cos(C_i, r)``, C initialised to the raw text embeddings (mean over
  templates) where the store has them, else to the mean ``r̂`` of the training rows whose target
  argmax is i. The cosine ignores C's norm, but Adam's step is absolute, so the init's norm sets
  the effective step size: raw CLIP text embeddings (norm ~10) move ~10x more slowly at lr 1e-2
  than unit-norm ones, which is what the paper's lr was tuned for.
- linear (LP): ``zs = W r̂ + b``.

``init(key, feats_NxD, targets_N, text_KxD) -> params``; ``apply(params, feats_BxD, hp) -> logits_BxK``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp


class Head(NamedTuple):
    init: Callable
    apply: Callable


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


def prototype_head(num_classes: int, text_TxKxD=None) -> Head:
    def init(key, feats_NxD, targets_N):
        if text_TxKxD is not None:
            return {"prototypes_KxD": jnp.mean(jnp.asarray(text_TxKxD), axis=0)}
        return {"prototypes_KxD": centroid_prototypes(key, feats_NxD, targets_N, num_classes)}

    def apply(params, feats_BxD, hp):
        return hp.logit_scale * feats_BxD @ l2_normalize(params["prototypes_KxD"]).T

    return Head(init, apply)


def linear_head(num_classes: int) -> Head:
    def init(key, feats_NxD, targets_N):
        d = feats_NxD.shape[1]
        return {"w_KxD": 0.01 * jax.random.normal(key, (num_classes, d)), "b_K": jnp.zeros((num_classes,))}

    def apply(params, feats_BxD, hp):
        return feats_BxD @ params["w_KxD"].T + params["b_K"]

    return Head(init, apply)


def make_head(name: str, num_classes: int, text_TxKxD=None) -> Head:
    if name == "prototype":
        return prototype_head(num_classes, text_TxKxD)
    if name == "linear":
        return linear_head(num_classes)
    raise ValueError(f"unknown head {name!r}; valid: prototype, linear")
