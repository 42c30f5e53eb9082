"""Weak labels refined by the strong model's geometry: transforms of the training target, ``METHOD@knn`` etc.

Each refinement reads the weak model's probabilities ``p_w`` and the strong features r̂ (L2-normalised) of a seed's
unlabelled pool, ``hold_train ∪ hold_val`` (no label is read), and returns the target the student is trained and
selected against, with a weight per row:

- ``knn``: the soft vote of the k nearest neighbours (cosine on r̂, the row itself left out),
  ``q_i = (1/k) Σ_{j ∈ N_k(i)} p_w(j)``;
- ``graph``: label propagation over the same kNN graph, ``F ← α · mean_{N_k}(F) + (1 − α) · p_w`` from
  ``F = p_w``, until the fixed point's error bound ``α^steps`` is at most ``0.5^20`` (:func:`propagation_steps`);
  α = 0 keeps the weak labels, α = 1 and one step is ``knn``;
- ``filter``: the weak labels kept, and the fraction c of rows whose weak label the kNN vote supports least
  (smallest ``q_i[argmax p_w(i)]``) dropped from the loss (weight 0), as EleutherAI's w2s filters with a kNN probe;
- ``confident``: the weak labels kept, and the fraction c of rows where the weak model is least confident (smallest
  top probability) dropped: the student never sees those rows labelled, so its accuracy there measures coverage
  expansion as Lang, Sontag and Vijayaraghavan define it (no neighbours, no strong features).

Computed in JAX on the device, once per seed before the epochs, in chunks of query rows so that no ``P x P``
matrix is ever held: the largest arrays are ``chunk x P`` similarities and ``chunk x k x K`` neighbour labels.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

REFINEMENTS = ("knn", "graph", "filter", "confident")
PROPAGATION_STEPS = 20
CHUNK = 1024  # query rows per block of the neighbour search


class Refinement(NamedTuple):
    """One refined target: ``kind`` ("" is the weak labels as they are) and the hyperparameters it reads."""

    kind: str = ""
    k: int = 0
    alpha: float = 0.0
    c: float = 0.0
    val_only: bool = False  # refine the hold_val rows alone (the `refined` selection rule's reference, a kNN vote)


class Teachers(NamedTuple):
    """A seed's U training targets over all N rows (rows outside its pool keep the weak logits)."""

    logits_UxNxK: jax.Array  # log-probabilities of each refined target (target 0: the weak logits as they are)
    weight_UxN: jax.Array  # 1, or 0 for a row a filter dropped


def spec_of(kind: str, hp) -> Refinement:
    """The refinement ``kind`` at the (scalar) hyperparameters ``hp``; only the fields it reads are kept."""
    if not kind:
        return Refinement()
    return Refinement(kind, 0 if kind == "confident" else int(round(float(hp.refine_k))),
                      float(hp.refine_alpha) if kind == "graph" else 0.0,
                      float(hp.refine_c) if kind in ("filter", "confident") else 0.0)


def neighbours(feats_PxD, k: int, chunk: int = CHUNK, first: int = 0, valid_P=None):
    """The k nearest neighbours in the pool of each row from ``first`` on, by cosine (rows L2-normalised), itself
    left out: indices ``(P - first) x k`` into the pool. ``valid_P``: False for the padding rows of a size bucket
    (:func:`w2s_jax.fit.pad_to_bucket`), which are never anyone's neighbour (None: every row is real)."""
    feats_PxD = jnp.asarray(feats_PxD)
    num_p = feats_PxD.shape[0]
    if not 1 <= k < num_p:
        raise ValueError(f"refine_k = {k}: a kNN refinement needs 1 <= k < the pool's {num_p} rows")
    num_q = num_p - first
    chunk = min(chunk, num_q)
    pad = (-num_q) % chunk
    queries = jnp.pad(feats_PxD[first:], ((0, pad), (0, 0))).reshape(-1, chunk, feats_PxD.shape[1])
    starts = first + jnp.arange(queries.shape[0]) * chunk

    def block(args):
        q_CxD, start = args
        sims_CxP = jnp.dot(q_CxD, feats_PxD.T, precision="highest")  # full float32: TF32 reorders near-ties
        itself = jnp.arange(num_p)[None, :] == (start + jnp.arange(chunk))[:, None]
        if valid_P is not None:
            itself = itself | ~valid_P[None, :]
        return jax.lax.top_k(jnp.where(itself, -jnp.inf, sims_CxP), k)[1]

    return jax.lax.map(block, (queries, starts)).reshape(-1, k)[:num_q]


def neighbour_mean(values_PxK, index_Pxk, chunk: int = CHUNK):
    """``(1/k) Σ_{j ∈ N(i)} values_j`` for every row, in chunks of rows: ``P x K``."""
    values_PxK, index_Pxk = jnp.asarray(values_PxK), jnp.asarray(index_Pxk)
    num_p, k = index_Pxk.shape
    chunk = min(chunk, num_p)
    pad = (-num_p) % chunk
    blocks = jnp.pad(index_Pxk, ((0, pad), (0, 0))).reshape(-1, chunk, k)
    means = jax.lax.map(lambda idx_Cxk: jnp.mean(values_PxK[idx_Cxk], axis=1), blocks)
    return means.reshape(-1, values_PxK.shape[1])[:num_p]


def knn_vote(probs_PxK, index_Pxk):
    return neighbour_mean(probs_PxK, index_Pxk)


def log_of(probs_PxK):
    """A refined distribution as the logits a loss reads (its softmax gives it back)."""
    return jnp.log(probs_PxK + 1e-12)


def propagation_steps(alpha: float) -> int:
    """Steps until the error bound ``α^steps`` of the fixed point is at most ``0.5^20`` (the default α's, 20 steps):
    132 at α = 0.9, 270 at 0.95 (refine_alpha's limit: the steps grow as ``1/(1 − α)``)."""
    if alpha <= 0.0:
        return 1
    return max(1, math.ceil(math.log(0.5) * PROPAGATION_STEPS / math.log(alpha))) if alpha < 1.0 else PROPAGATION_STEPS


def propagate(probs_PxK, index_Pxk, alpha: float, steps: int | None = None):
    """Label propagation on the kNN graph: ``steps`` (default :func:`propagation_steps`, converged to ``0.5^20``) of
    ``F ← α · mean_N(F) + (1 − α) · p_w`` from ``p_w``."""
    steps = propagation_steps(alpha) if steps is None else steps
    probs_PxK = jnp.asarray(probs_PxK)
    step = lambda _, f: alpha * neighbour_mean(f, index_Pxk) + (1.0 - alpha) * probs_PxK
    return jax.lax.fori_loop(0, steps, step, probs_PxK)


def drop_count(c: float, num_p: int) -> int:
    """Rows a fraction ``c`` of a pool of ``num_p`` drops: ``floor(c · P)``."""
    return int(np.floor(c * num_p))


def drop_least(support_P, c: float, valid_P=None, count=None):
    """1 per row, 0 for the ``floor(c · P)`` rows of least ``support`` (first rows on ties). For a padded pool,
    ``valid_P`` marks its real rows (the padding ranks last) and ``count`` is the real pool's drop count."""
    num_p = support_P.shape[0]
    if valid_P is not None:
        support_P = jnp.where(valid_P, support_P, jnp.inf)
    rank_P = jnp.zeros(num_p, jnp.int32).at[jnp.argsort(support_P, stable=True)].set(jnp.arange(num_p))
    return (rank_P >= (drop_count(c, num_p) if count is None else count)).astype(jnp.float32)


def filter_weights(probs_PxK, vote_PxK, c: float, valid_P=None, count=None):
    """1 per row, 0 for the ``floor(c · P)`` rows whose weak label the vote supports least (first rows on ties)."""
    probs_PxK, vote_PxK = jnp.asarray(probs_PxK), jnp.asarray(vote_PxK)
    support_P = jnp.take_along_axis(vote_PxK, jnp.argmax(probs_PxK, axis=1)[:, None], axis=1)[:, 0]
    return drop_least(support_P, c, valid_P, count)


def refine(spec: Refinement, feats_PxD, weak_PxK, index_Pxk=None, valid_P=None, count=None):
    """The refined target of one pool: (log-probabilities ``P x K``, weights ``P``); ``index_Pxk``: the pool's
    :func:`neighbours` at ``spec.k`` if already found; ``valid_P``, ``count``: a padded pool's real rows and drop
    count (:func:`drop_least`)."""
    weak_PxK = jnp.asarray(weak_PxK)
    probs = jax.nn.softmax(weak_PxK)
    ones = jnp.ones(weak_PxK.shape[0], jnp.float32)
    if not spec.kind:
        return weak_PxK, ones
    if spec.kind == "confident":  # the weak model's own confidence: no neighbours
        return weak_PxK, drop_least(jnp.max(probs, axis=1), spec.c, valid_P, count)
    index = neighbours(feats_PxD, spec.k, valid_P=valid_P) if index_Pxk is None else index_Pxk
    if spec.kind == "knn":
        return log_of(knn_vote(probs, index)), ones
    if spec.kind == "graph":
        return log_of(propagate(probs, index, spec.alpha)), ones
    if spec.kind == "filter":
        return weak_PxK, filter_weights(probs, knn_vote(probs, index), spec.c, valid_P, count)
    raise ValueError(f"unknown refinement {spec.kind!r}; valid: {', '.join(REFINEMENTS)}")


def seed_teachers(specs, feats_NxD, weak_NxK, pool_P, num_val: int, drops_U=None) -> Teachers:
    """Every refinement of ``specs`` over one seed's pool rows (its last ``num_val`` are hold_val), as targets
    over all N rows (leading U). The neighbours are searched once per distinct k, and only for the hold_val rows
    when no refinement of the whole pool needs that k (the ``refined`` rule's reference alone).

    A pool padded to a size bucket marks its padding rows -1 (they point at the data's last row, a padding row
    too) and ``drops_U`` gives each target's drop count on the real pool (:func:`drop_count`, 0 where none)."""
    feats_NxD, weak_NxK, pool_P = jnp.asarray(feats_NxD), jnp.asarray(weak_NxK), jnp.asarray(pool_P)
    feats_PxD, weak_PxK = feats_NxD[pool_P], weak_NxK[pool_P]
    first_val = pool_P.shape[0] - num_val
    valid_P = None if drops_U is None else pool_P >= 0
    whole = {spec.k for spec in specs if spec.kind and spec.k and not spec.val_only}  # "confident" needs none
    index = {k: neighbours(feats_PxD, k, valid_P=valid_P) for k in sorted(whole)}
    # the `refined` rule's reference, which nobody asked for by name: at most pool - 1 neighbours on a small store
    val_k = lambda spec: min(spec.k, pool_P.shape[0] - 1)  # noqa: E731
    val_index = {val_k(spec): index[val_k(spec)][first_val:] if val_k(spec) in index
                 else neighbours(feats_PxD, val_k(spec), first=first_val, valid_P=valid_P)
                 for spec in specs if spec.val_only}
    probs = jax.nn.softmax(weak_PxK)
    outs = [(jnp.concatenate([weak_PxK[:first_val], log_of(knn_vote(probs, val_index[val_k(spec)]))]),
             jnp.ones(pool_P.shape[0], jnp.float32)) if spec.val_only
            else refine(spec, feats_PxD, weak_PxK, index.get(spec.k), valid_P, None if drops_U is None else drops_U[u])
            for u, spec in enumerate(specs)]
    logits = jnp.stack([weak_NxK.at[pool_P].set(lg) for lg, _ in outs])
    weights = jnp.stack([jnp.ones(weak_NxK.shape[0], jnp.float32).at[pool_P].set(w) for _, w in outs])
    return Teachers(logits, weights)


def plan(kinds: dict, hps_H, reference: Refinement) -> tuple[tuple[Refinement, ...], dict]:
    """The distinct targets a fit needs, and each model's index among them: ``(specs, {group: index_J})``.

    ``kinds``: {group: each of its methods' refinement, "" for none}; ``hps_H``: the grid (arrays H); a group's J
    models are method-major (model j: method j // H, grid point j % H). Target 0 is always the weak labels as
    they are, target 1 ``reference`` (what the ``refined`` selection criterion compares with, ``val_only``)."""
    specs = [Refinement(), reference]
    num_h = len(np.asarray(hps_H.lr))
    points = [type(hps_H)(*(np.asarray(v)[h] for v in hps_H)) for h in range(num_h)]
    index = {}
    for g, methods in kinds.items():
        index[g] = []
        for kind in methods:
            for hp in points:
                spec = spec_of(kind, hp)
                if spec not in specs:
                    specs.append(spec)
                index[g].append(specs.index(spec))
        index[g] = np.asarray(index[g], np.int32)
    return tuple(specs), index
