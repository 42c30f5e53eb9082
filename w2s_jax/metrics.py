"""Evaluation, separate from training: predictions and labels in, arrays over ``[seed, hparam]`` out."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from w2s_jax.fit import FitData, FitOutput, teacher_logits
from w2s_jax.heads import make_head, zero_shot_prototypes
from w2s_jax.methods import METHODS
from w2s_jax.splits import SeedSplits


def accuracy(logits_NxK, labels_N):
    return jnp.mean(jnp.argmax(logits_NxK, axis=-1) == labels_N)


def agreement(logits_a_NxK, logits_b_NxK):
    """Fraction of rows where the two models predict the same class."""
    return jnp.mean(jnp.argmax(logits_a_NxK, axis=-1) == jnp.argmax(logits_b_NxK, axis=-1))


def pgr(w2s, weak, ceiling):
    """Performance gap recovered, (w2s - weak) / (ceiling - weak); NaN where ceiling <= weak."""
    w2s, weak, ceiling = (np.asarray(x, np.float64) for x in (w2s, weak, ceiling))
    gap = ceiling - weak
    return np.where(gap > 0, (w2s - weak) / np.where(gap > 0, gap, 1.0), np.nan)


def evaluate_method(name: str, out: FitOutput, hps, data: FitData, splits: SeedSplits, num_classes):
    """-> {test_acc, agreement, val_score}, each ``S x H``, for the best-epoch variables."""
    method = METHODS[name]
    head = make_head(method.head, num_classes)
    targets_NxK = teacher_logits(method, data, num_classes)

    def one(variables, hp, split):
        test_logits = head.apply(variables, data.feats_NxD[split.test_prime], hp)
        val_logits = head.apply(variables, data.feats_NxD[split.hold_val], hp)
        return {
            "test_acc": accuracy(test_logits, data.labels_N[split.test_prime]),
            "agreement": agreement(test_logits, data.weak_NxK[split.test_prime]),
            "val_score": agreement(val_logits, targets_NxK[split.hold_val]),
        }

    over = jax.vmap(jax.vmap(one, in_axes=(0, 0, None)), in_axes=(0, None, 0))
    return jax.tree.map(np.asarray, jax.jit(over)(out.variables, hps, splits))


def weak_accuracy(data: FitData, splits: SeedSplits):
    """Weak model accuracy on each seed's test', ``S``."""
    return np.asarray(jax.vmap(lambda t: accuracy(data.weak_NxK[t], data.labels_N[t]))(splits.test_prime))


def zero_shot(data: FitData, splits: SeedSplits, text_TxKxD, logit_scale: float):
    """Untrained text prototypes: {test_acc, agreement}, each ``S``."""
    protos_KxD = zero_shot_prototypes(jnp.asarray(text_TxKxD))

    def one(t):
        logits = logit_scale * data.feats_NxD[t] @ protos_KxD.T
        return {"test_acc": accuracy(logits, data.labels_N[t]), "agreement": agreement(logits, data.weak_NxK[t])}

    return jax.tree.map(np.asarray, jax.vmap(one)(splits.test_prime))
