"""Textual prompt tuning (TP, CoOp-style) on stored image features: the text side.

The image features come from the store and are never re-encoded. TP models are data (DESIGN.md §3 "TP is data
too"): J models differ only by their context ``M x W``, so :class:`PromptBank` stacks them as ``J x M x W`` and
runs the frozen text tower once over the ``J·K`` prompts ``[SOS][ctx_1..ctx_M][CLASS].[EOT]``. CLIP's text tower is
causal and reads its feature at the EOT token, so positions after the longest EOT never matter: every prompt is
cut there (:func:`cut_length`), exactly. Under the same mask the ``1 + M`` prefix positions are the same for all K
prompts of a model, so each model's prefix runs once (:mod:`extract.prefix`, ``prefix="shared"``, the default),
exactly. The training loop is :mod:`extract.tp_fit`.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from extract.prefix import PREFIX_MODES, encode_shared_prefix, shared_prefix_problem
from w2s_jax.config import Hparams, check_hparams, hparam_grid

OPTIMIZERS = ("adam", "coop")  # adam: paper defaults; coop: SGD lr 0.002, cosine (CoOp's own)
PRECISIONS = ("fp32", "bf16")  # the text tower's compute: float32, or bfloat16 autocast (the learned context stays float32)
UNUSED_BY_TP = ("lp_scale", "lp_shrinkage", "lp_l2", "raven_lr")  # linear-head and multi-weak fields


def default_precision(device: str) -> str:
    """bf16 on CUDA (the text tower is TP's cost, and bf16 units are there), fp32 elsewhere."""
    return "bf16" if str(device).startswith("cuda") else "fp32"


class PromptError(ValueError):
    """Prompt tuning cannot run on this store or model, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class TPConfig:
    store: str  # path of the feature store
    strong: str  # --strong spec of the store's open_clip encoder (its text tower is tuned)
    weak: str  # the weak model of this results folder (w2s-tp --weak A,B fits all of them in one loop)
    methods: tuple[str, ...]  # TP methods from w2s_jax.methods.METHODS (head "prompt" or "text-encoder")
    seeds: int = 5  # seeds 0..S-1 -> the same splits as w2s-fit
    epochs: int = 10  # paper: 10
    batch_size: int = 512  # paper: 512
    warmup: float = 0.1  # linear warmup fraction, then linear decay (adam)
    optimizer: str = "adam"  # "adam" (lr = hparams.lr) or "coop" (SGD 0.002, momentum 0.9, cosine)
    n_ctx: int = 16  # M context vectors (ignored with ctx_init)
    ctx_init: str = ""  # e.g. "a photo of a": initialise the context from this phrase
    hparams: Hparams = Hparams()  # lr, temperature, logit_scale, alpha_max, aux_warmup, tau_a, refine_*
    device: str = "cpu"
    precision: str = "fp32"  # the text tower under "fp32" or "bf16" autocast (default_precision: bf16 on CUDA)
    prefix: str = "shared"  # "shared": each model's prompt prefix run once (exact); "none": every prompt whole
    grid: tuple = ()  # ((field, (values...)), ...): swept for every method, cartesian product, as w2s-fit's
    select: str = "agreement"  # the label-free rule that keeps a model's epoch and grid point (w2s_jax.select)
    imports: tuple[str, ...] = ()  # the --import modules that registered user methods
    defined: tuple = ()  # the user-defined methods among `methods` (w2s_jax.methods.definitions), filled in by w2s-tp

    def __post_init__(self):
        from w2s_jax.config import check_number
        from w2s_jax.select import CRITERIA

        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: use one of {', '.join(PRECISIONS)}")
        if self.prefix not in PREFIX_MODES:
            raise ValueError(f"prefix {self.prefix!r}: use one of {', '.join(PREFIX_MODES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: use one of {', '.join(OPTIMIZERS)}")
        if self.select not in CRITERIA:
            raise ValueError(f"select {self.select!r}: use one of {', '.join(CRITERIA)} (w2s-tp --select)")
        if not self.methods:
            raise ValueError("no methods to fit: name at least one (w2s-tp --methods kd+tp,ceiling+tp)")
        if self.ctx_init and not self.ctx_init.replace("_", " ").strip():
            raise ValueError(f"ctx_init {self.ctx_init!r} holds no word, so no context vector would be trained; give "
                             "a phrase such as 'a photo of a', or leave it out for n_ctx random context vectors")
        for name in ("seeds", "epochs", "batch_size", "n_ctx"):
            check_number(name, getattr(self, name), 1, math.inf, integer=True)
        check_number("warmup", self.warmup, 0.0, 1.0, True, False)
        check_hparams(self.hparams, self.grid)
        unused = [f for f, _ in self.grid if f in UNUSED_BY_TP]
        if unused:
            raise ValueError(f"grid {unused[0]}: prompt tuning does not read it (a linear-head or multi-weak field); "
                             f"sweep lr, temperature, logit_scale, alpha_max, aux_warmup, tau_a or refine_*")

    def grid_hparams(self) -> Hparams:
        return hparam_grid(self.hparams, dict(self.grid))

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "hparams": self.hparams._asdict()}


def check_text_tower(model, encoder_id: str) -> None:
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if model is None or not all(hasattr(model, n) for n in needed):
        raise PromptError(
            f"prompt tuning needs an open_clip CLIP model with a text tower; the store's encoder {encoder_id} "
            f"has none. Use w2s-fit's prototype and linear heads (cpl, kd+lp, ...) on this store instead."
        )


# ------------------------------------------------------------------ the text tower, cut at the last EOT


def pool_positions(model, tokens_NxL):
    """Where the tower reads each prompt's feature, ``N``: open_clip's ``text_global_pool`` (the EOT token, the
    highest id, for CLIP's ``argmax`` pooling)."""
    pool = getattr(model, "text_pool_type", "argmax")
    n, length = tokens_NxL.shape
    if pool == "argmax":
        return tokens_NxL.argmax(dim=-1)
    if pool == "eos":
        return (tokens_NxL == model.text_eos_id).int().argmax(dim=-1)
    return torch.full((n,), 0 if pool == "first" else length - 1, dtype=torch.long, device=tokens_NxL.device)


def cut_length(model, positions_N, full_length: int) -> tuple[int, str]:
    """``(L, why)``: how many positions the tower must run. With a causal mask, a position after the last one read
    never reaches it, so ``L = max(positions) + 1`` is exact; without one, every position matters."""
    if getattr(model, "attn_mask", None) is None:
        return full_length, f"prompts run at full length ({full_length} tokens): this text tower has no causal mask"
    length = int(positions_N.max()) + 1
    return length, f"prompts cut at their last EOT: {length} of {full_length} tokens (exact under the causal mask)"


def encode_token_embeddings(model, embeds_NxLxW, positions_N, length: int | None = None):
    """open_clip's ``CLIP.encode_text`` from token embeddings instead of token ids, run over the first ``length``
    positions only (:func:`cut_length`; default all): text features ``N x D``."""
    length = embeds_NxLxW.shape[1] if length is None else length
    cast = model.transformer.get_cast_dtype()
    x = embeds_NxLxW[:, :length].to(cast) + model.positional_embedding[:length].to(cast)
    mask = None if model.attn_mask is None else model.attn_mask[:length, :length]
    x = model.transformer(x, attn_mask=mask)
    x = model.ln_final(x)
    x = x[torch.arange(x.shape[0], device=x.device), positions_N]
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def class_tokens(tokenizer, class_names, prefix: str):
    """Tokens ``K x L`` of ``"{prefix} {name}."`` per class (``_`` read as a space)."""
    return tokenizer([f"{prefix} {name.replace('_', ' ')}." for name in class_names])


def check_prompts_fit(tokenizer, class_names, n_prefix: int, length: int, what: str) -> None:
    """A PromptError, before any work, when a class's prompt ``[SOS][prefix: n_prefix tokens][name].[EOT]`` does not
    fit the tower's ``length`` tokens: the tokenizer would cut its name (and EOT) silently, and classes whose names
    are cut away share one prompt. ``what`` names the setting that decides ``n_prefix``."""
    name_tokens = [int((t > 0).sum()) - 2 for t in tokenizer([f"{n.replace('_', ' ')}." for n in class_names])]
    need = [2 + n_prefix + t for t in name_tokens]  # SOS, the prefix, the name and '.', EOT
    worst = int(np.argmax(need))
    if need[worst] > length or name_tokens[worst] >= length - 2:
        most = length - 2 - max(name_tokens)
        fix = f"use {most} context tokens or fewer" if most >= 1 else "shorten that class name"
        raise PromptError(f"{what}: the prompt of class {class_names[worst]!r} needs {need[worst]} tokens (SOS, "
                          f"{n_prefix} of context, {name_tokens[worst]} of its name and '.', EOT), more than the text "
                          f"tower's {length}: its name would be cut, and classes could share one prompt; {fix}")


class PromptBank(torch.nn.Module):
    """J prompt models over the same K classes: contexts ``J x M x W``, ``forward() -> text features J x K x D``
    from one pass of the frozen tower over the ``J·K`` cut prompts. Model j's context starts from ``seeds_J[j]``
    (``randn · 0.02``, CoOp's) or from the phrase ``ctx_init``. Each context is its own parameter (``contexts``),
    stacked per step, so one optimizer can give each model its own learning rate. ``prefix="shared"`` runs each
    model's ``[SOS][context]`` once (:func:`extract.prefix.encode_shared_prefix`) where the tower allows it, else
    (or with ``"none"``) every prompt at its cut length; ``cut=False`` runs the full length (for benchmarks)."""

    def __init__(self, model, tokenizer, class_names, seeds_J, *, n_ctx=16, ctx_init="", cut=True, prefix="shared"):
        super().__init__()
        self.model = model
        width = model.token_embedding.weight.shape[1]
        if ctx_init:
            phrase = ctx_init.replace("_", " ")
            n_ctx = int((tokenizer([phrase])[0] > 0).sum()) - 2  # minus SOS and EOT
            if n_ctx < 1:
                raise PromptError(f"--ctx-init {ctx_init!r} holds no token, so no context vector would be trained; "
                                  "give a phrase such as 'a photo of a', or leave it out")
        device = model.token_embedding.weight.device
        length = int(tokenizer(["x"]).shape[1])
        check_prompts_fit(tokenizer, class_names, n_ctx, length,
                          f"--ctx-init {ctx_init!r} ({n_ctx} tokens)" if ctx_init else f"--n-ctx {n_ctx}")
        tokens = class_tokens(tokenizer, class_names, " ".join(["X"] * n_ctx)).to(device)
        positions = pool_positions(model, tokens)
        self.length, self.cut_note = (cut_length(model, positions, tokens.shape[1]) if cut else
                                      (tokens.shape[1], f"prompts run at full length ({tokens.shape[1]} tokens)"))
        with torch.no_grad():
            embeds = model.token_embedding(tokens)[:, :self.length]
            phrase_ctx = model.token_embedding(tokenizer([phrase]).to(device))[0, 1:1 + n_ctx] if ctx_init else None
        self.register_buffer("positions_K", positions)
        self.register_buffer("prefix_Kx1xW", embeds[:, :1].clone())
        self.register_buffer("suffix_KxRxW", embeds[:, 1 + n_ctx:].clone())
        self.prefix_len, self.shared, self.cut_note = shared_note(model, 1 + n_ctx, positions, self.length,
                                                                  self.cut_note, prefix if cut else "none")
        starts = [phrase_ctx.clone() if ctx_init else
                  torch.randn(n_ctx, width, generator=torch.Generator().manual_seed(int(s))) * 0.02 for s in seeds_J]
        self.contexts = torch.nn.ParameterList([torch.nn.Parameter(c.to(embeds.dtype).to(device)) for c in starts])

    def forward(self):
        ctx_JxMxW = torch.stack(list(self.contexts))
        j, m, w = ctx_JxMxW.shape
        k = self.prefix_Kx1xW.shape[0]
        if self.shared:  # [SOS][context] once per model; the K suffixes against it
            prefix = torch.cat([self.prefix_Kx1xW[:1].expand(j, -1, -1), ctx_JxMxW], dim=1)
            return encode_shared_prefix(self.model, prefix, self.suffix_KxRxW.expand(j, -1, -1, -1), self.positions_K)
        embeds = torch.cat([self.prefix_Kx1xW.expand(j, -1, -1, -1), ctx_JxMxW[:, None].expand(-1, k, -1, -1),
                            self.suffix_KxRxW.expand(j, -1, -1, -1)], dim=2).reshape(j * k, -1, w)
        text = encode_token_embeddings(self.model, embeds, self.positions_K.repeat(j), self.length)
        return text.reshape(j, k, -1)

    def param_groups(self, lrs_J) -> list[dict]:
        """One optimizer group per distinct learning rate (the grid's), each model's context in its own."""
        groups = {}
        for ctx, lr in zip(self.contexts, lrs_J):
            groups.setdefault(float(lr), []).append(ctx)
        return [{"params": params, "lr": lr} for lr, params in groups.items()]


class TextEncoderBank(torch.nn.Module):
    """Table 4 ablation: fixed prompts 'a photo of a {class}.', the whole text tower trainable; one model (J = 1).

    It trains the tower's weights, which differ per model, so its models cannot share a pass: each runs alone
    (with cut prompts all the same, and the fixed prefix ``[SOS] a photo of a`` run once for its K prompts where
    ``prefix="shared"``)."""

    def __init__(self, model, tokenizer, class_names, prefix="shared"):
        super().__init__()
        self.model = model
        n_prefix = int((tokenizer(["a photo of a"])[0] > 0).sum()) - 2
        check_prompts_fit(tokenizer, class_names, n_prefix, int(tokenizer(["x"]).shape[1]),
                          "the text-encoder prompt 'a photo of a {class}.'")
        tokens = class_tokens(tokenizer, class_names, "a photo of a").to(model.token_embedding.weight.device)
        self.register_buffer("tokens_KxL", tokens)
        self.register_buffer("positions_K", pool_positions(model, tokens))
        self.length, self.cut_note = cut_length(model, self.positions_K, tokens.shape[1])
        same = bool((tokens[:, :1 + n_prefix] == tokens[:1, :1 + n_prefix]).all())  # the phrase tokenizes alike
        self.prefix_len, self.shared, self.cut_note = shared_note(model, 1 + n_prefix, self.positions_K, self.length,
                                                                  self.cut_note, prefix if same else "none")

    def forward(self):
        embeds = self.model.token_embedding(self.tokens_KxL[:, :self.length])
        if self.shared:
            p = self.prefix_len
            return encode_shared_prefix(self.model, embeds[:1, :p], embeds[None, :, p:], self.positions_K)
        return encode_token_embeddings(self.model, embeds, self.positions_K, self.length)[None]

    def param_groups(self, lrs_J) -> list[dict]:
        m = self.model
        towers = [m.transformer, m.token_embedding, m.ln_final]
        params = [p for t in towers for p in t.parameters()] + [m.positional_embedding, m.text_projection]
        return [{"params": [p for p in params if isinstance(p, torch.nn.Parameter)], "lr": float(lrs_J[0])}]


def shared_note(model, prefix_len: int, positions_K, length: int, cut_note: str, prefix: str) -> tuple[int, bool, str]:
    """``(prefix length, shared, the log's note)``: whether a bank's prompts share their prefix of ``prefix_len``
    positions (``prefix="shared"`` and :func:`extract.prefix.shared_prefix_problem` finds nothing), and why not."""
    if prefix != "shared":
        return 0, False, cut_note + "; prefix not shared (--prefix none)"
    problem = shared_prefix_problem(model, prefix_len, positions_K, length)
    if problem:
        return 0, False, f"{cut_note}; prefix not shared: {problem}"
    k = len(positions_K)
    return prefix_len, True, (f"{cut_note}; each model's prefix run once: {prefix_len} + {k} x {length - prefix_len} "
                              f"positions, not {k} x {length} (exact under the causal mask)")


def freeze_all_but(bank: torch.nn.Module, groups: list[dict]) -> None:
    """Only the parameters of ``groups`` (the contexts, or the text tower) are trained."""
    for p in bank.parameters():
        p.requires_grad_(False)
    for group in groups:
        for p in group["params"]:
            p.requires_grad_(True)


def tower_bytes(model, num_prompts: int, length: int, precision: str, prefix_len: int = 0) -> int:
    """Rough memory of one forward and backward pass of the text tower over ``num_prompts`` prompts of ``length``
    tokens (the activations autograd keeps): per layer and token about 20 widths (attention's q, k, v, its output,
    the MLP's 4-wide hidden twice, the norms and residuals) plus the attention weights (2 per head and key), at 4
    bytes a value in float32 and 3 under bf16 autocast (the norms stay float32). With a shared prefix of
    ``prefix_len`` positions, the prefix is counted once and each prompt's ``length − prefix_len`` suffix
    positions against all ``length`` keys."""
    width = model.token_embedding.weight.shape[1]
    blocks = getattr(model.transformer, "resblocks", [])
    layers = len(blocks) or 12
    heads = getattr(getattr(blocks[0], "attn", None), "num_heads", 8) if layers and blocks else 8
    tokens = prefix_len + num_prompts * (length - prefix_len)
    keys = prefix_len * prefix_len + num_prompts * (length - prefix_len) * length  # attention weights per head
    return int(layers * (tokens * 20 * width + 2 * heads * keys) * (4 if precision == "fp32" else 3))

