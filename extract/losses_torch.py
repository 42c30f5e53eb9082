"""The W2S losses in PyTorch for prompt tuning: the rows of ``w2s_jax.losses.LOSSES`` of the same names, written out.

``loss(student_BxK, teacher_BxK, *, progress, hp) -> per_example_B``. A test checks each against the JAX loss
family with the row of the same name, so the two cannot drift apart.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _ce_hard(student_BxK, labels_B):
    return F.cross_entropy(student_BxK, labels_B, reduction="none")


def _kl(teacher_BxK, student_BxK, temperature):
    """KL(softmax(teacher/T) || softmax(student/T)), per example."""
    logp_t = F.log_softmax(teacher_BxK / temperature, dim=1)
    logp_s = F.log_softmax(student_BxK / temperature, dim=1)
    return torch.sum(logp_t.exp() * (logp_t - logp_s), dim=1)


def ce(student_BxK, teacher_BxK, *, progress, hp):
    return _ce_hard(student_BxK, teacher_BxK.argmax(1))


def kd(student_BxK, teacher_BxK, *, progress, hp):
    return hp.temperature**2 * _kl(teacher_BxK, student_BxK, hp.temperature)


def cpl(student_BxK, teacher_BxK, *, progress, hp):
    """sum p^w log(p^w / p^s), the paper's Eq. 5 as expanded (see w2s_jax.losses.cpl)."""
    return _kl(teacher_BxK, student_BxK, hp.temperature)


def auxconf(student_BxK, teacher_BxK, *, progress, hp):
    """(1-a_t) KL(softmax(zw) || softmax(zs)) + a_t CE(zs, argmax zs): CE against the mixed target less the
    teacher's entropy, a constant (the JAX family's value)."""
    alpha = hp.alpha_max * min(1.0, progress / hp.aux_warmup)
    return (1.0 - alpha) * _kl(teacher_BxK, student_BxK, 1.0) + alpha * _ce_hard(student_BxK, student_BxK.detach().argmax(1))


def adaptconf(student_BxK, teacher_BxK, *, progress, hp):
    self_ce = _ce_hard(student_BxK, student_BxK.argmax(1))
    weak_ce = _ce_hard(student_BxK, teacher_BxK.argmax(1))
    alpha = torch.sigmoid((self_ce - weak_ce) / hp.tau_a).detach()
    return (1.0 - alpha) * kd(student_BxK, teacher_BxK, progress=progress, hp=hp) + alpha * self_ce


def truth(student_BxK, teacher_BxK, *, progress, hp):
    """The ceilings' row: CE against ground truth, passed in as a one-hot teacher."""
    return _ce_hard(student_BxK, teacher_BxK.argmax(1))


LOSSES = {"ce": ce, "kd": kd, "cpl": cpl, "auxconf": auxconf, "adaptconf": adaptconf, "truth": truth}
