"""The loss family of :mod:`w2s_jax.losses` in PyTorch, for prompt tuning: one function reads the same
:class:`w2s_jax.losses.Coeffs` rows, so every TP method, a user's ``[methods.NAME]`` with a prompt head included,
is a row of data and the two sides cannot drift (a test checks values and gradients against ``family_loss``).

Vectorized over the J models of a TP step: logits ``J x B x K``, one row of coefficients and hyperparameters
per model (tensors ``J``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from w2s_jax.config import Hparams
from w2s_jax.losses import Coeffs


def _ce_hard(logp_JxBxK, labels_JxB):
    return -torch.gather(logp_JxBxK, -1, labels_JxB.unsqueeze(-1)).squeeze(-1)


def _kl(teacher_JxBxK, student_JxBxK, t_Jx1x1):
    """KL(softmax(teacher/T) || softmax(student/T)), per example ``J x B``; a class of teacher probability exactly
    0 (logits near float32's limit) adds 0, as in JAX."""
    big = torch.finfo(torch.float32).max
    logp_t = F.log_softmax((teacher_JxBxK / t_Jx1x1).clamp(-big, big), dim=-1)
    logp_s = F.log_softmax(student_JxBxK / t_Jx1x1, dim=-1)
    p_t = logp_t.exp()
    return torch.sum(torch.where(p_t > 0, p_t * (logp_t - logp_s), torch.zeros_like(p_t)), dim=-1)


def family_loss(student_JxBxK, teacher_JxBxK, labels_JxB, coeffs: Coeffs, *, progress: float, hp: Hparams):
    """The loss of each of J models per example, ``J x B``: :func:`w2s_jax.losses.family_loss` with a models axis.

    ``coeffs`` and ``hp`` hold tensors ``J`` (:func:`rows_to_torch`); the teacher and the gates are constants for
    the gradient; the caller reduces. A part whose weight is 0 is computed at a harmless temperature, so a NaN
    it could produce never reaches the loss (the same in JAX)."""
    col = lambda v: v.unsqueeze(-1)  # J -> J x 1, broadcast over the batch
    logp = F.log_softmax(student_JxBxK, dim=-1)
    ce_weak = _ce_hard(logp, teacher_JxBxK.argmax(-1))
    ce_self = _ce_hard(logp, student_JxBxK.detach().argmax(-1))
    ce_truth = _ce_hard(logp, labels_JxB)
    t = torch.where((coeffs.soft_at_t > 0) & (coeffs.weak_soft > 0), hp.temperature, torch.ones_like(hp.temperature))
    soft = col(torch.where(coeffs.t_squared > 0, t**2, torch.ones_like(t))) * _kl(
        teacher_JxBxK, student_JxBxK, t[:, None, None])
    scheduled = hp.alpha_max * torch.clamp(progress / hp.aux_warmup, max=1.0)
    gate = torch.sigmoid((ce_self - ce_weak) / col(hp.tau_a)).detach()
    move = col(coeffs.schedule * scheduled) + col(coeffs.adaptive) * gate
    keep = 1.0 - move
    return (keep * (col(coeffs.weak_soft) * soft + col(coeffs.weak_hard) * ce_weak + col(coeffs.truth) * ce_truth)
            + (keep * col(coeffs.self_hard) + move) * ce_self)


def rows_to_torch(rows, device) -> "Coeffs | Hparams":
    """A NamedTuple of rows (``Coeffs`` or ``Hparams``; a list of them, or one of arrays ``J``) as float32 tensors
    ``J`` on ``device``."""
    if isinstance(rows, (list, tuple)) and rows and isinstance(rows[0], tuple):
        kind = type(rows[0])
        return kind(*(torch.tensor([float(getattr(r, f)) for r in rows], dtype=torch.float32, device=device)
                      for f in kind._fields))
    return type(rows)(*(torch.as_tensor(v, dtype=torch.float32, device=device).reshape(-1) for v in rows))
