"""Prompt tuning as data: every TP model of a store trained in one loop, many per step.

A TP model is (method, weak model, seed, grid point): a context, a row of the loss family
(:func:`extract.losses_torch.family_loss`), hyperparameters and a target indexed like the JAX fit's (the seed's
:class:`w2s_jax.refine.Teachers`, computed by :func:`w2s_jax.fit.make_teachers`). A chunk of J prompt models trains
as one: per step the frozen text tower runs once over the ``J·K`` cut prompts (:class:`extract.prompt.PromptBank`),
each model reads its own seed's minibatch of stored features, one loss sums the models' losses (they share no
parameter, so each gets its own gradient) and one optimizer step updates every context. Chunks are sized from a
memory estimate (:func:`chunk_size`). After every epoch each model is scored on ``hold_val`` by every label-free
rule (:func:`w2s_jax.select.scores`, the fit's own function) and keeps its best epoch's text features: the TP head
in its applied form, a prototype head ``zs = s·cos(C_i, r)``.

``ceiling+tp`` does not depend on the weak model: it is fitted once per seed and reported for each.
"""
from __future__ import annotations

import math
import os
from typing import Callable, NamedTuple

import jax
import numpy as np
import torch
import torch.nn.functional as F

from extract.losses_torch import family_loss, rows_to_torch
from extract.prompt import PromptError, freeze_all_but, tower_bytes
from extract.weak import warmup_linear
from w2s_jax import fit as fitlib
from w2s_jax import refine, select
from w2s_jax.config import FLOAT32_MAX, Hparams
from w2s_jax.methods import METHODS, coeffs_of
from w2s_jax.splits import SeedSplits

HISTORY = ("train_loss", "train_acc", "val_loss", "val_score", "test_acc",
           *(select.HISTORY_KEY.format(c) for c in select.CRITERIA))


class TPModel(NamedTuple):
    """One TP model of a run."""

    method: str
    weak: str  # the weak model whose (refined) labels it trains on; "" for a ceiling, shared by every weak model
    seed: int
    grid_index: int


def plan_models(methods, weaks, seeds: int, num_h: int) -> list[TPModel]:
    """Every model, seed-major: per seed, each method x weak model x grid point (a ceiling once per seed)."""
    return [TPModel(m, "" if METHODS[m].target == "truth" else w, s, h)
            for s in range(seeds) for m in methods
            for w in (weaks[:1] if METHODS[m].target == "truth" else weaks) for h in range(num_h)]


class Targets(NamedTuple):
    """What the models of a run train and are scored against, per (seed, weak model), on the host."""

    weaks: tuple  # the weak models, in order (a ceiling's scores read the first one's view: only its labels count)
    teachers: dict  # (seed, weak) -> Teachers (logits U x N x K, weights U x N) as numpy
    views: dict  # (seed, weak) -> select.ValView on hold_val, as numpy
    index: dict  # (method, grid point) -> the model's index among its seed's targets U


def make_targets(cfg, methods, weaks, weak_logits: dict, feats_NxD, labels_N, splits: SeedSplits) -> Targets:
    """The seed's targets of each weak model, as w2s-fit computes them (:func:`w2s_jax.fit.make_teachers`): the weak
    labels, the reference kNN vote of the ``refined`` rule, and each refinement the methods ask for."""
    hps = cfg.grid_hparams()
    num_h = len(hps.lr)
    specs, index = refine.plan({"all": [METHODS[m].refine for m in methods]}, hps, fitlib.reference_refinement(cfg.hparams.refine_k))
    teachers, views = {}, {}
    make = jax.jit(fitlib.make_teachers, static_argnums=0)
    for w in weaks:
        data = fitlib.make_data(feats_NxD, weak_logits[w], labels_N)
        for s in range(cfg.seeds):
            split = jax.tree.map(lambda a: jax.numpy.asarray(a[s]), splits)
            t = jax.tree.map(np.asarray, make(specs, data, split))
            teachers[s, w] = t
            val = split.hold_val
            view = select.val_view(data.weak_NxK[val], t.logits_UxNxK[1][np.asarray(val)], data.labels_N[val])
            views[s, w] = jax.tree.map(np.asarray, view)
    index_of = {(m, h): int(index["all"][i * num_h + h]) for i, m in enumerate(methods) for h in range(num_h)}
    return Targets(tuple(weaks), teachers, views, index_of)


class ModelOutput(NamedTuple):
    history: dict  # field -> (E,)
    best_epoch: int  # 1-based
    text_KxD: np.ndarray  # the best epoch's text features (the prototypes of the applied head)


# ------------------------------------------------------------------ memory


def budget_bytes(device: str, override_gib: float = 0.0) -> int:
    """What a TP step may use: ``override_gib`` if given, else 90% of the GPU's free memory, or 80% of RAM."""
    if override_gib:
        return int(override_gib * 2**30)
    if str(device).startswith("cuda"):
        return int(0.9 * torch.cuda.mem_get_info(torch.device(device))[0])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def model_bytes(model, num_classes: int, length: int, cfg, n: int, dim: int, prefix_len: int = 0) -> int:
    """One prompt model's share of a step: its K prompts through the tower (:func:`extract.prompt.tower_bytes`, its
    prefix once where it is shared), its minibatch (features, teacher, logits and their gradient) and its
    end-of-epoch hold_val and test' logits (36% of the rows), in bytes."""
    batch, evaluated = cfg.batch_size, int(0.36 * n)
    return (tower_bytes(model, num_classes, length, cfg.precision, prefix_len)
            + 4 * (batch * (dim + 4 * num_classes) + evaluated * (dim + 2 * num_classes) + 4 * num_classes * dim))


def chunk_size(num_models: int, per_model: int, fixed: int, budget: int, cap: int = 0) -> int:
    """How many models train per step: as many as fit ``budget`` beside ``fixed`` and at most ``cap`` (0: no cap),
    balanced over the chunks; a PromptError before any work when not even one fits."""
    if fixed + per_model > budget:
        raise PromptError(f"one prompt-tuning model needs about {(fixed + per_model) / 2**30:.2f} GiB (the text tower "
                          f"over its prompts, the stored features and targets), {budget / 2**30:.2f} GiB are "
                          "available; use --precision bf16, fewer seeds or weak models, or a device with more memory "
                          "(--memory-gib raises the budget if the estimate is too careful)")
    most = min(num_models, (budget - fixed) // per_model, cap or num_models)
    chunks = math.ceil(num_models / most)
    return math.ceil(num_models / chunks)


# ------------------------------------------------------------------ one chunk of models


def _score_models(val_logits_JxVxK, teacher_JxVxK, weight_JxV, views_J, truth_J) -> dict:
    """Every rule's score per model, ``{criterion: J}``, by :func:`w2s_jax.select.scores`."""
    scored = jax.jit(jax.vmap(select.scores))(val_logits_JxVxK, teacher_JxVxK, weight_JxV, views_J, truth_J)
    return {c: np.asarray(v) for c, v in scored.items()}


def text_features(bank, device: str, precision: str):
    """``bank()``, the text features ``J x K x D``, under bf16 autocast with ``precision="bf16"`` (the contexts and
    the tower's parameters stay float32)."""
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        return bank()


def prompt_logits(text_JxKxD, feats_JxBxD, scale_J):
    """Each model's prototype logits on its own rows, ``s · r̂ · normalize(text)ᵀ``: ``J x B x K``."""
    protos = F.normalize(text_JxKxD.float(), dim=-1)
    return scale_J[:, None, None] * torch.bmm(feats_JxBxD, protos.transpose(1, 2))


def step_loss(text_JxKxD, feats_JxBxD, teacher_JxBxK, weight_JxB, labels_JxB, coeffs, hp, progress):
    """One step's training loss of each of J models, ``J`` (the mean over its rows that a filter kept), and their
    logits ``J x B x K``; summed, it gives each model its own gradient, as they share no parameter."""
    logits = prompt_logits(text_JxKxD, feats_JxBxD, hp.logit_scale)
    per = family_loss(logits, teacher_JxBxK, labels_JxB, coeffs, progress=progress, hp=hp)
    return (per * weight_JxB).sum(1) / weight_JxB.sum(1).clamp(min=1.0), logits


ADAM_BETA1 = 0.9  # torch's default; Adam's first step moves a parameter by lr / (1 - beta1)


def unsteppable(lrs_J, cfg) -> np.ndarray:
    """``J`` bool: models whose Adam step ``lr / (1 - beta1)`` overflows float32 (torch raises for the whole step).
    They are not stepped, and are reported as failed, as a model whose loss goes non-finite is."""
    return np.array([cfg.optimizer == "adam" and lr / (1 - ADAM_BETA1) >= FLOAT32_MAX for lr in lrs_J], bool)


def make_optimizer(bank, lrs_J, cfg, total: int):
    groups = bank.param_groups([0.002] * len(lrs_J) if cfg.optimizer == "coop" else lrs_J)
    freeze_all_but(bank, groups)
    if cfg.optimizer == "coop":
        opt = torch.optim.SGD(groups, momentum=0.9)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    opt = torch.optim.Adam(groups)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, cfg.warmup))


def train_chunk(bank, models: list[TPModel], targets: Targets, feats_NxD, labels_N, splits: SeedSplits, cfg,
                hps: Hparams, progress: Callable = lambda done: None) -> list[ModelOutput]:
    """Train the J ``models`` of ``bank`` (``bank() -> J x K x D`` text features) together for ``cfg.epochs``."""
    dev = cfg.device
    num_j = len(models)
    point = lambda m: Hparams(*(float(np.asarray(v)[m.grid_index]) for v in hps))  # noqa: E731
    hp = rows_to_torch([point(m) for m in models], dev)
    coeffs = rows_to_torch([coeffs_of(METHODS[m.method]) for m in models], dev)
    truth_J = torch.tensor([METHODS[m.method].target == "truth" for m in models], device=dev)
    weak_of = lambda m: m.weak or targets.weaks[0]  # noqa: E731
    keys = list(dict.fromkeys((m.seed, weak_of(m), targets.index[m.method, m.grid_index]) for m in models))
    q_J = torch.tensor([keys.index((m.seed, weak_of(m), targets.index[m.method, m.grid_index])) for m in models],
                       device=dev)
    teach = lambda field: torch.as_tensor(np.stack([getattr(targets.teachers[s, w], field)[u]  # noqa: E731
                                                    for s, w, u in keys]), device=dev)
    logits_QxNxK, weight_QxN = teach("logits_UxNxK"), teach("weight_UxN")
    views_J = jax.tree.map(lambda *a: np.stack(a), *[targets.views[m.seed, weak_of(m)] for m in models])
    feats = F.normalize(torch.as_tensor(feats_NxD, dtype=torch.float32), dim=1).to(dev)  # r̂, once
    labels = torch.as_tensor(labels_N, dtype=torch.long, device=dev)
    seeds = sorted({m.seed for m in models})
    seed_J = torch.tensor([seeds.index(m.seed) for m in models], device=dev)
    rows = {f: torch.as_tensor(np.stack([getattr(splits, f)[s] for s in seeds]), dtype=torch.long, device=dev)
            for f in ("hold_train", "hold_val", "test_prime")}
    n_train = rows["hold_train"].shape[1]
    steps = math.ceil(n_train / cfg.batch_size)
    total = cfg.epochs * steps
    lrs = [float(np.asarray(hps.lr)[m.grid_index]) for m in models]
    overflow_J = unsteppable(lrs, cfg)
    opt, sched = make_optimizer(bank, [0.0 if bad else lr for lr, bad in zip(lrs, overflow_J)], cfg, total)
    gens = [torch.Generator().manual_seed(s) for s in seeds]  # each seed's minibatch order, as one model's alone
    logits_on = lambda text, rows_JxB: prompt_logits(text, feats[rows_JxB], hp.logit_scale)  # noqa: E731
    def gathered(rows_JxB):
        q = q_J[:, None]
        return logits_QxNxK[q, rows_JxB], weight_QxN[q, rows_JxB], labels[rows_JxB]

    history = {f: np.zeros((num_j, cfg.epochs), np.float32) for f in HISTORY}
    best_score = np.full(num_j, -np.inf)
    best_epoch = np.zeros(num_j, np.int64)
    best_text = None
    for epoch in range(cfg.epochs):
        order = torch.stack([rows["hold_train"][i][torch.randperm(n_train, generator=g).to(dev)]
                             for i, g in enumerate(gens)])[seed_J]
        running = torch.zeros(num_j, device=dev)
        hits = torch.zeros(num_j, device=dev)
        for b, rows_JxB in enumerate(order.split(cfg.batch_size, dim=1)):
            teacher, weight, lab = gathered(rows_JxB)
            loss_J, logits = step_loss(text_features(bank, dev, cfg.precision), feats[rows_JxB], teacher, weight, lab,
                                       coeffs, hp, (epoch * steps + b) / total)
            opt.zero_grad(set_to_none=True)
            loss_J.sum().backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                target = torch.where(truth_J[:, None], lab, teacher.argmax(-1))
                hits += ((logits.argmax(-1) == target).float() * weight).sum(1)
                running += loss_J.detach() * rows_JxB.shape[1]
        with torch.no_grad():
            text = text_features(bank, dev, cfg.precision).float()
            val_rows, test_rows = rows["hold_val"][seed_J], rows["test_prime"][seed_J]
            val_logits = logits_on(text, val_rows)
            teacher, weight, lab = gathered(val_rows)
            val_loss = family_loss(val_logits, teacher, lab, coeffs, progress=(epoch + 1) / cfg.epochs, hp=hp).mean(1)
            test_acc = (logits_on(text, test_rows).argmax(-1) == labels[test_rows]).float().mean(1)
            scores = _score_models(val_logits.cpu().numpy(), teacher.cpu().numpy(), weight.cpu().numpy(), views_J,
                                   truth_J.cpu().numpy())
        values = {"train_loss": running / n_train, "train_acc": hits / n_train, "val_loss": val_loss,
                  "val_score": scores[cfg.select], "test_acc": test_acc,
                  **{select.HISTORY_KEY.format(c): scores[c] for c in select.CRITERIA}}
        for f, v in values.items():
            history[f][:, epoch] = v.cpu().numpy() if torch.is_tensor(v) else v
        history["train_loss"][overflow_J, epoch] = np.nan  # never stepped: failed (select.failed_models)
        better = history["val_score"][:, epoch] > best_score  # the first best epoch is kept, as w2s-fit keeps it
        best_score = np.where(better, history["val_score"][:, epoch], best_score)
        best_epoch = np.where(better, epoch + 1, best_epoch)
        text = text.cpu().numpy()
        best_text = text if best_text is None else np.where(better[:, None, None], text, best_text)
        progress(num_j)
    return [ModelOutput({f: history[f][j] for f in HISTORY}, int(best_epoch[j]), best_text[j]) for j in range(num_j)]

