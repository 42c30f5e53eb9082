"""Textual prompt tuning (TP, CoOp-style) on stored image features, and the text-encoder ablation.

The image features come from the store and are never re-encoded. Per step, the text tower runs
once over all K prompts ``[SOS][ctx_1..ctx_M][CLASS].[EOS]``; logits are ``s * cos(text_k, image)``.
Splits, best-epoch rule and defaults are those of ``w2s-fit`` (the split code is shared).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from extract.losses_torch import LOSSES
from extract.weak import warmup_linear
from w2s_jax.config import Hparams
from w2s_jax.methods import METHODS
from w2s_jax.splits import SeedSplits

OPTIMIZERS = ("adam", "coop")  # adam: paper defaults; coop: SGD lr 0.002, cosine (CoOp's own)
PRECISIONS = ("fp32", "bf16")  # the text tower's compute: float32, or bfloat16 autocast (the learned context stays float32)


def default_precision(device: str) -> str:
    """bf16 on CUDA (the text tower is TP's cost, and bf16 units are there), fp32 elsewhere."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


class PromptError(ValueError):
    """Prompt tuning cannot run on this store or model, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class TPConfig:
    store: str  # path of the feature store
    strong: str  # --strong spec of the store's open_clip encoder (its text tower is tuned)
    weak: str  # weak model in the store
    methods: tuple[str, ...]  # TP methods from w2s_jax.methods.METHODS (head "prompt" or "text-encoder")
    seeds: int = 5  # seeds 0..S-1 -> the same splits as w2s-fit
    epochs: int = 10  # paper: 10
    batch_size: int = 512  # paper: 512
    warmup: float = 0.1  # linear warmup fraction, then linear decay (adam)
    optimizer: str = "adam"  # "adam" (lr = hparams.lr) or "coop" (SGD 0.002, momentum 0.9, cosine)
    n_ctx: int = 16  # M context vectors (ignored with ctx_init)
    ctx_init: str = ""  # e.g. "a photo of a": initialise the context from this phrase
    hparams: Hparams = Hparams()  # lr, temperature, logit_scale, alpha_max, aux_warmup, tau_a
    device: str = "cpu"
    precision: str = "fp32"  # the text tower under "fp32" or "bf16" autocast (default_precision: bf16 on CUDA)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")

    def grid_hparams(self) -> Hparams:
        return Hparams(*(np.asarray([v], np.float32) for v in self.hparams))

    @property
    def grid(self) -> tuple:
        return ()

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hparams": self.hparams._asdict()}


def check_text_tower(model, encoder_id: str) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if model is None or not all(hasattr(model, n) for n in needed):
        raise PromptError(
            f"prompt tuning needs an open_clip CLIP model with a text tower; the store's encoder {encoder_id} "
            f"has none. Use w2s-fit's prototype and linear heads (cpl, kd+lp, ...) on this store instead."
        )


def encode_token_embeddings(model, embeds_KxLxW, tokens_KxL):
    """open_clip's ``CLIP.encode_text`` from token embeddings instead of token ids."""
    cast = model.transformer.get_cast_dtype()
    x = embeds_KxLxW.to(cast) + model.positional_embedding.to(cast)
    x = model.transformer(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), tokens_KxL.argmax(dim=-1)]  # EOT token (highest id)
    proj = model.text_projection
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


class PromptLearner(torch.nn.Module):
    """Shared context vectors; the class token at the end; ``forward() -> text features K x D``."""

    def __init__(self, model, tokenizer, class_names, *, n_ctx=16, ctx_init="", seed=0):
        super().__init__()
        self.model = model
        width = model.token_embedding.weight.shape[1]
        if ctx_init:
            phrase = ctx_init.replace("_", " ")
            n_ctx = int((tokenizer([phrase])[0] > 0).sum()) - 2  # minus SOS and EOS
        placeholder = " ".join(["X"] * n_ctx)
        device = model.token_embedding.weight.device
        tokens = tokenizer([f"{placeholder} {name.replace('_', ' ')}." for name in class_names]).to(device)
        with torch.no_grad():
            embeds = model.token_embedding(tokens)
            if ctx_init:
                ctx = model.token_embedding(tokenizer([phrase]).to(device))[0, 1:1 + n_ctx].clone()
            else:
                ctx = torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(seed)) * 0.02
        self.register_buffer("tokens_KxL", tokens)
        self.register_buffer("prefix_Kx1xW", embeds[:, :1].clone())
        self.register_buffer("suffix_KxRxW", embeds[:, 1 + n_ctx:].clone())
        self.ctx_MxW = torch.nn.Parameter(ctx.to(embeds.dtype))

    def forward(self):
        k = self.tokens_KxL.shape[0]
        embeds = torch.cat([self.prefix_Kx1xW, self.ctx_MxW.expand(k, -1, -1), self.suffix_KxRxW], dim=1)
        return encode_token_embeddings(self.model, embeds, self.tokens_KxL)


class TextEncoderPrompts(torch.nn.Module):
    """Table 4 ablation: fixed prompts 'a photo of a {class}.', the whole text tower trainable."""

    def __init__(self, model, tokenizer, class_names):
        super().__init__()
        self.model = model
        self.register_buffer("tokens_KxL", tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in class_names]))

    def forward(self):
        return self.model.encode_text(self.tokens_KxL)


def trainable(module: torch.nn.Module, head: str) -> list:
    """Freeze everything but the context (prompt) or the text tower (text-encoder)."""
    for p in module.parameters():
        p.requires_grad_(False)
    if head == "prompt":
        params = [module.ctx_MxW]
    else:
        m = module.model
        towers = [m.transformer, m.token_embedding, m.ln_final]
        params = [p for t in towers for p in t.parameters()] + [m.positional_embedding, m.text_projection]
        params = [p for p in params if isinstance(p, torch.nn.Parameter)]
    for p in params:
        p.requires_grad_(True)
    return params


def fit_prompts(method: str, make_module: Callable, feats_NxD, weak_NxK, labels_N, split: SeedSplits,
                cfg: TPConfig, seed: int):
    """Train one TP model for one seed.

    Returns (metrics dict, history dict of lists, best epoch, prototypes_KxD): the last is the text features of
    the best epoch's prompts, the TP head in its applied form (a prototype head, ``zs = s cos(C_i, r)``).
    """
    spec = METHODS[method]
    dev = cfg.device
    loss_fn = LOSSES[spec.loss]
    hp = cfg.hparams
    k = weak_NxK.shape[1]
    torch.manual_seed(seed)
    module = make_module().to(dev)
    params = trainable(module, spec.head)
    feats = F.normalize(torch.as_tensor(feats_NxD, dtype=torch.float32), dim=1).to(dev)  # r̂, once
    labels = torch.as_tensor(labels_N, dtype=torch.long, device=dev)
    weak = torch.as_tensor(weak_NxK, dtype=torch.float32, device=dev)
    targets = F.one_hot(labels, k).float() if spec.target == "truth" else weak
    train_idx, val_idx, test_idx = (torch.as_tensor(a, dtype=torch.long, device=dev) for a in split)
    steps = math.ceil(len(train_idx) / cfg.batch_size)
    total = cfg.epochs * steps
    if cfg.optimizer == "coop":
        opt = torch.optim.SGD(params, lr=0.002, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total)
    else:
        opt = torch.optim.Adam(params, lr=hp.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_linear(total, cfg.warmup))
    gen = torch.Generator().manual_seed(seed)

    def logits_for(text_KxD, rows):
        return hp.logit_scale * feats[rows] @ F.normalize(text_KxD.float(), dim=1).T

    def text_features():
        """The text tower over all K prompts; under bf16 autocast with ``--precision bf16`` (its parameters and the
        learned context stay float32; the logits and the loss are float32)."""
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
            return module()

    history = {"train_loss": [], "train_acc": [], "val_loss": [], "val_score": [], "test_acc": []}
    best = (-1.0, 0, None)
    for epoch in range(cfg.epochs):
        order = train_idx[torch.randperm(len(train_idx), generator=gen).to(dev)]
        running, hits = 0.0, 0
        for b, rows in enumerate(order.split(cfg.batch_size)):
            text = text_features()  # the text tower once per step, over all K prompts
            logits = logits_for(text, rows)
            loss = loss_fn(logits, targets[rows], progress=(epoch * steps + b) / total, hp=hp).mean()
            hits += int((logits.argmax(1) == targets[rows].argmax(1)).sum())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            running += float(loss.detach()) * len(rows)
        with torch.no_grad():
            text = text_features()
            val_logits = logits_for(text, val_idx)
            val_score = float((val_logits.argmax(1) == targets[val_idx].argmax(1)).float().mean())
            val_loss = float(loss_fn(val_logits, targets[val_idx], progress=(epoch + 1) / cfg.epochs, hp=hp).mean())
            test_acc = float((logits_for(text, test_idx).argmax(1) == labels[test_idx]).float().mean())
        n_train = len(train_idx)
        for key, value in zip(history, (running / n_train, hits / n_train, val_loss, val_score, test_acc)):
            history[key].append(value)
        if val_score > best[0]:
            best = (val_score, epoch + 1, [p.detach().clone() for p in params])
    with torch.no_grad():
        for p, kept in zip(params, best[2]):
            p.copy_(kept)
        text = text_features()
        test_logits = logits_for(text, test_idx)
        metrics = {
            "test_acc": float((test_logits.argmax(1) == labels[test_idx]).float().mean()),
            "agreement": float((test_logits.argmax(1) == weak[test_idx].argmax(1)).float().mean()),
            "val_score": best[0],
            # misfit-gain diagnostics, as w2s_jax.metrics.misfit / cross_entropy
            "misfit": float(F.kl_div(F.log_softmax(weak[val_idx], 1), F.log_softmax(logits_for(text, val_idx), 1),
                                     reduction="batchmean", log_target=True)),
            "test_ce": float(F.cross_entropy(test_logits, labels[test_idx])),
        }
    return metrics, history, best[1], text.float().cpu().numpy()
