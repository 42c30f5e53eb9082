"""The text tower with a shared prompt prefix: each model's prefix run once, not once per class (DESIGN.md §3).

A TP prompt is ``[SOS][ctx_1..ctx_M][CLASS].[EOT]``. Under CLIP's causal mask the hidden states of the first
``P = 1 + M`` positions depend on SOS and the context only, at every layer: they are the same for the K prompts of
one model. :func:`encode_shared_prefix` runs each model's prefix once (``J x P`` positions) and the ``J·K``
suffixes (the class tokens, ``.`` and EOT, cut at the last EOT: ``R = L − P`` positions each) against their own
model's prefix keys and values plus their own, with the tower's own weights. The result equals the full tower's
(:func:`extract.prompt.encode_token_embeddings`) up to float round-off, in ``J·P + J·K·R`` positions instead of
``J·K·L``. The prefix keys are never copied per class: a suffix's scores against them are one batched product per
model, and the two parts of its attention share one softmax.

Towers it cannot serve (no causal mask, a block that is not open_clip's plain ``ResidualAttentionBlock``, a prefix
that sees the suffix, a prompt whose readout lies in the prefix) are named by :func:`shared_prefix_problem`; their
prompts run the cut path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PREFIX_MODES = ("shared", "none")  # w2s-tp --prefix: the shared-prefix tower, or every prompt at its cut length


def shared_prefix_problem(model, prefix_len: int, positions_N, length: int) -> str:
    """Why the tower cannot share a prefix of ``prefix_len`` positions for prompts read at ``positions_N`` and cut at
    ``length``; "" when it can (exactly)."""
    from open_clip.transformer import ResidualAttentionBlock

    mask = getattr(model, "attn_mask", None)
    if mask is None:
        return "this text tower has no causal mask, so every position sees the class tokens"
    if not torch.isinf(mask[:prefix_len, prefix_len:length]).all() or not bool((mask[:length, :length] < 0).any()):
        return "this text tower's attention mask lets the prompt prefix see the class tokens"
    if int(positions_N.min()) < prefix_len:
        return "a prompt is read inside its prefix (the class tokens come before the context)"
    for block in getattr(model.transformer, "resblocks", [None]):
        attn = getattr(block, "attn", None)
        if type(block) is not ResidualAttentionBlock or hasattr(block, "ln_1_kv") or \
                not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim or \
                attn.bias_k is not None or attn.add_zero_attn or attn.dropout:
            return f"its blocks are {type(block).__name__}, not open_clip's plain ResidualAttentionBlock"
    return ""


def _split_heads(x_BxLxW, heads: int):
    """``B x L x W`` -> ``B x heads x L x W/heads``."""
    b, length, w = x_BxLxW.shape
    return x_BxLxW.view(b, length, heads, w // heads).transpose(1, 2)


def _block(block, x_JxPxW, x_JKxRxW, masks):
    """One residual attention block over the prefixes ``J x P x W`` and their suffixes ``J·K x R x W``
    (model-major)."""
    attn, (mask_pp, mask_sp, mask_ss) = block.attn, masks
    j, p, w = x_JxPxW.shape
    jk, r, _ = x_JKxRxW.shape
    k, heads = jk // j, attn.num_heads
    qkv_p = F.linear(block.ln_1(x_JxPxW), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    qkv_s = F.linear(block.ln_1(x_JKxRxW), attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1)
    q_p, k_p, v_p = (_split_heads(t, heads) for t in qkv_p)  # J x H x P x d
    q_s, k_s, v_s = (_split_heads(t, heads) for t in qkv_s)  # J·K x H x R x d
    out_p = F.scaled_dot_product_attention(q_p, k_p, v_p, attn_mask=mask_pp.to(q_p.dtype))
    # a suffix's scores against its model's prefix keys (one product per model, no copy per class) and its own keys
    scale = q_s.shape[-1] ** -0.5
    q_s5 = q_s.view(j, k, heads, r, -1)
    s_sp = torch.einsum("jkhrd,jhpd->jkhrp", q_s5, k_p).reshape(jk, heads, r, p) * scale
    s_ss = (q_s @ k_s.transpose(-1, -2)) * scale
    weights = torch.cat([s_sp + mask_sp.to(s_sp.dtype), s_ss + mask_ss.to(s_ss.dtype)], dim=-1).softmax(dim=-1)
    w_sp = weights[..., :p].reshape(j, k, heads, r, p)
    out_s = (torch.einsum("jkhrp,jhpd->jkhrd", w_sp, v_p).reshape(jk, heads, r, -1)
             + weights[..., p:].to(v_s.dtype) @ v_s)
    x_JxPxW = x_JxPxW + block.ls_1(attn.out_proj(out_p.transpose(1, 2).reshape(j, p, w)))
    x_JKxRxW = x_JKxRxW + block.ls_1(attn.out_proj(out_s.transpose(1, 2).reshape(jk, r, w)))
    x_JxPxW = x_JxPxW + block.ls_2(block.mlp(block.ln_2(x_JxPxW)))
    x_JKxRxW = x_JKxRxW + block.ls_2(block.mlp(block.ln_2(x_JKxRxW)))
    return x_JxPxW, x_JKxRxW


def encode_shared_prefix(model, prefix_JxPxW, suffix_JxKxRxW, positions_K):
    """Text features ``J x K x D`` of the prompts ``[prefix_j][suffix_k]`` (token embeddings; ``suffix`` may be a
    view expanded over J), read at ``positions_K`` (positions in the whole prompt, all ``>= P``): open_clip's
    ``encode_text`` from embeddings, each model's prefix run once. Exact where :func:`shared_prefix_problem` is ""."""
    j, p, w = prefix_JxPxW.shape
    _, k, r, _ = suffix_JxKxRxW.shape
    cast = model.transformer.get_cast_dtype()
    pos = model.positional_embedding.to(cast)
    x_p = prefix_JxPxW.to(cast) + pos[:p]
    x_s = (suffix_JxKxRxW.to(cast) + pos[p:p + r]).reshape(j * k, r, w)
    mask = model.attn_mask
    masks = (mask[:p, :p], mask[p:p + r, :p], mask[p:p + r, p:p + r])
    for block in model.transformer.resblocks:
        x_p, x_s = _block(block, x_p, x_s, masks)
    x_s = model.ln_final(x_s)
    x = x_s[torch.arange(j * k, device=x_s.device), (positions_K - p).repeat(j)]
    proj = model.text_projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x.reshape(j, k, -1)
