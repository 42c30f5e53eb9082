"""An idiomatic PyTorch reference for the fit, written plainly as a researcher would: a Python loop over
seeds, torch.optim.Adam, the same losses, batch size, schedule, epochs, splits and best-epoch rule.
Kept in benchmarks/ only, to compare speed and accuracy with w2s-fit. It runs on the device the JAX fit uses
(:func:`reference_device`: CUDA when JAX runs on a GPU and torch sees one), so that a ratio compares like with
like; on CUDA its matmuls use TF32, as JAX's default float32 precision does there (:func:`match_jax_precision`)."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from extract.losses_torch import family_loss, rows_to_torch
from extract.weak import warmup_linear
from w2s_jax.heads import shrunk_lda
from w2s_jax.methods import METHODS, coeffs_of


def _fused_adam_works() -> bool:
    try:
        torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True).step()
        return True
    except (RuntimeError, TypeError):
        return False


FUSED_ADAM = _fused_adam_works()  # torch.optim.Adam(fused=True) where this build has it (CPU: torch >= 2.4)


def reference_device() -> str:
    """"cuda" where JAX runs on a GPU and torch can use one too, else "cpu": the reference runs where the fit does."""
    import jax

    return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"


def match_jax_precision(device: str) -> str:
    """On CUDA, let torch's float32 matmuls use TF32 as JAX's default precision does there; says which."""
    if device != "cuda":
        return "float32 (CPU)"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return "TF32 matmuls, as JAX's default float32 precision on this GPU"


def fit_one(method, feats_NxD, weak_NxK, labels_N, text_KxD, split, *, seed, epochs, batch, warmup, hp,
            device="cpu"):
    """Returns test' accuracy of the best-epoch model for one seed, trained on ``device``."""
    spec = METHODS[method]
    torch.manual_seed(seed)
    r = F.normalize(torch.as_tensor(feats_NxD, device=device), dim=1)
    labels = torch.as_tensor(labels_N, device=device)
    weak = torch.as_tensor(weak_NxK, device=device)
    k = weak.shape[1]
    targets = F.one_hot(labels, k).float() if spec.target == "truth" else weak
    train, val, test = (torch.as_tensor(a, device=device) for a in split)
    if spec.head == "linear":  # zs = s W (r̂ - mu) + b from the shrunk discriminant, as w2s-fit (heads.py)
        center = r[train].mean(0)
        w, b = shrunk_lda(jnp.asarray((r[train] - center).cpu().numpy()),
                          jnp.asarray(targets[train].argmax(1).cpu().numpy()), k, hp.lp_shrinkage)
        weight = torch.nn.Parameter(torch.as_tensor(np.asarray(w), device=device) / hp.lp_scale)
        bias = torch.nn.Parameter(torch.as_tensor(np.asarray(b), device=device))
        params = [weight, bias]
        forward = lambda x: hp.lp_scale * (x - center) @ weight.T + bias  # noqa: E731
    else:
        protos = torch.nn.Parameter(torch.as_tensor(text_KxD, device=device).clone())  # raw text embedding, as w2s-fit
        params = [protos]
        forward = lambda x: hp.logit_scale * x @ F.normalize(protos, dim=1).T  # noqa: E731
    steps = math.ceil(len(train) / batch)
    opt = torch.optim.Adam(params, lr=hp.lr, fused=FUSED_ADAM)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(epochs * steps, warmup))
    gen = torch.Generator().manual_seed(seed)
    best_score, best_state = -1.0, None
    row, hp_row = rows_to_torch([coeffs_of(spec)], device), rows_to_torch([hp], device)  # the family's row, J = 1
    for epoch in range(epochs):
        for b, rows in enumerate(train[torch.randperm(len(train), generator=gen).to(device)].split(batch)):
            loss = family_loss(forward(r[rows])[None], targets[rows][None], labels[rows][None], row,
                               progress=(epoch * steps + b) / (epochs * steps), hp=hp_row)
            opt.zero_grad()
            loss.mean().backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            score = float((forward(r[val]).argmax(1) == targets[val].argmax(1)).float().mean())
            if score > best_score:
                best_score, best_state = score, [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, kept in zip(params, best_state):
            p.copy_(kept)
        return float((forward(r[test]).argmax(1) == labels[test]).float().mean())


def fit_all(methods, feats, weak, labels, text, splits, *, seeds, epochs, batch, warmup, hp, lrs=None, device="cpu"):
    """{method: test' accuracies per seed, at the first learning rate}; every lr of ``lrs`` is fitted (the grid)."""
    lrs = lrs or [hp.lr]
    accs = {m: np.array([[fit_one(m, feats, weak, labels, text, [a[s] for a in splits], seed=s, epochs=epochs,
                                  batch=batch, warmup=warmup, hp=hp._replace(lr=lr), device=device) for lr in lrs]
                         for s in range(seeds)]) for m in methods}
    return {m: a[:, 0] for m, a in accs.items()}
