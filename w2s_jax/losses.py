"""Weak-to-strong losses (DESIGN.md §3), one listable registry.

Every loss is ``loss(student_BxK, teacher_BxK, *, progress, hp) -> per_example_B``: the
student's logits, the teacher's logits (weak logits, or one-hot ground truth for the
ceiling), the fraction of training done (0..1) and the hyperparameters (arrays, so
``jax.vmap`` can sweep them). The caller reduces.

>>> import jax.numpy as jnp
>>> from w2s_jax.config import Hparams
>>> zs, zw = jnp.zeros((2, 3)), jnp.eye(3)[:2] * 5.0
>>> get_loss("ce")(zs, zw, progress=0.0, hp=Hparams()).shape
(2,)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _ce_hard(student_BxK, labels_B):
    """Cross-entropy against integer labels, per example."""
    logp_BxK = jax.nn.log_softmax(student_BxK)
    return -jnp.take_along_axis(logp_BxK, labels_B[:, None], axis=1)[:, 0]


def _ce_soft(student_BxK, target_BxK):
    """Cross-entropy against a distribution, per example."""
    return -jnp.sum(target_BxK * jax.nn.log_softmax(student_BxK), axis=1)


def _kl(teacher_BxK, student_BxK, temperature):
    """KL(softmax(teacher/T) || softmax(student/T)), per example."""
    logp_t = jax.nn.log_softmax(teacher_BxK / temperature)
    logp_s = jax.nn.log_softmax(student_BxK / temperature)
    return jnp.sum(jnp.exp(logp_t) * (logp_t - logp_s), axis=1)


def ce(student_BxK, teacher_BxK, *, progress, hp):
    """CE(zs, argmax zw): train on the teacher's hard labels."""
    return _ce_hard(student_BxK, jnp.argmax(teacher_BxK, axis=1))


def kd(student_BxK, teacher_BxK, *, progress, hp):
    """T^2 * KL(softmax(zw/T) || softmax(zs/T)) (Hinton et al. 2015), T = hp.temperature."""
    return hp.temperature**2 * _kl(teacher_BxK, student_BxK, hp.temperature)


def cpl(student_BxK, teacher_BxK, *, progress, hp):
    """CPL, paper Eq. 4-5: sum_k p^w log(p^w / p^s) with one temperature tau on both sides.

    The paper writes KL(p^s || p^w) but expands it as sum p^w log(p^w/p^s) = KL(p^w || p^s);
    we use the expansion. No T^2 factor (Eq. 5 has none); the logit scale s of the prototype
    head is a separate hyperparameter because cosine logits lie in [-1, 1].
    """
    return _kl(teacher_BxK, student_BxK, hp.temperature)


def auxconf(student_BxK, teacher_BxK, *, progress, hp):
    """Burns et al. 2023, multiclass: CE(zs, (1-a_t) softmax(zw) + a_t onehot(argmax sg(zs))).

    a_t = alpha_max * min(1, progress / warmup). (openai/weak-to-strong multiplies by
    ``progress`` instead of ``progress / warmup``, a known bug we do not copy.)
    """
    alpha = hp.alpha_max * jnp.minimum(1.0, progress / hp.aux_warmup)
    k = student_BxK.shape[1]
    self_BxK = jax.nn.one_hot(jnp.argmax(jax.lax.stop_gradient(student_BxK), axis=1), k)
    target_BxK = (1.0 - alpha) * jax.nn.softmax(teacher_BxK) + alpha * self_BxK
    return _ce_soft(student_BxK, target_BxK)


def adaptconf(student_BxK, teacher_BxK, *, progress, hp):
    """Guo et al. 2024: (1-a) KD(zs, zw; T) + a CE(zs, argmax zs), a = sg(sigmoid((A-B)/tau_a)),

    with A = CE(zs, argmax zs), B = CE(zs, argmax zw); e^{A/t}/(e^{A/t}+e^{B/t}) = sigmoid((A-B)/t).
    """
    self_ce = _ce_hard(student_BxK, jnp.argmax(student_BxK, axis=1))
    weak_ce = _ce_hard(student_BxK, jnp.argmax(teacher_BxK, axis=1))
    alpha = jax.lax.stop_gradient(jax.nn.sigmoid((self_ce - weak_ce) / hp.tau_a))
    return (1.0 - alpha) * kd(student_BxK, teacher_BxK, progress=progress, hp=hp) + alpha * self_ce


LOSSES = {"ce": ce, "kd": kd, "cpl": cpl, "auxconf": auxconf, "adaptconf": adaptconf}


def get_loss(name: str):
    if name not in LOSSES:
        raise KeyError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
    return LOSSES[name]
