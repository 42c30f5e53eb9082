"""Prompt tuning as w2s-tp runs it (extract.tp_fit): full against cut prompts against the shared prefix (each model's
[SOS][context] run once, extract.prefix), J models one after another against one step, time per model-step, the
cpl+textenc step with and without its shared prefix, the memory estimate against the measured peak, and the share of
the text tower's FLOP floor, against GEMM rates measured in the same run. Random open_clip weights, K class names of
DomainNet's length, one process, one device.

A step is w2s-tp's: the text tower over the prompts (tp_fit.text_features), each model's logits on its own minibatch
of stored features and its row of the loss family (tp_fit.step_loss), the backward pass and one Adam update.
The floor counts the tower's forward and its input-gradient backward (the weights are frozen): per layer and position
``2·12·W²`` FLOPs plus ``2·2·W`` per attended key, forward, the same again backward; with the shared prefix a model
runs P positions and K suffixes of R positions, each suffix position attending to at most L keys.

Usage: python benchmarks/bench_tp.py [--model ViT-B-32] [--classes 345] [--models 30] [--batch 256]
       [--precision fp32|bf16] [--device cpu|cuda] [--json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from _common import machine, register_tiny_clip
from extract.losses_torch import rows_to_torch
from extract.prompt import PromptBank
from extract.tp_fit import make_optimizer, step_loss, text_features
from w2s_jax.config import Hparams
from w2s_jax.losses import LOSSES

WORDS = ("aircraft", "carrier", "the", "eiffel", "tower", "see", "saw", "hot", "air", "balloon", "garden", "hose",
         "fire", "hydrant", "paper", "clip", "teddy", "bear", "ice", "cream")


def domainnet_like_names(k: int) -> list[str]:
    """K distinct names of one to three words, as long as DomainNet's ("aircraft carrier", "the eiffel tower")."""
    return [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(1 + i % 3)) + f" {i}" for i in range(k)]


def floor_flops(model, prompts: int, length: int, prefix_len: int = 0, models: int = 1) -> float:
    """Forward plus input-gradient backward FLOPs of the text tower over ``prompts`` prompts of ``length`` tokens
    (``models`` prefixes of ``prefix_len`` positions run once each, where shared)."""
    width = model.token_embedding.weight.shape[1]
    layers = len(model.transformer.resblocks)
    positions = models * prefix_len + prompts * (length - prefix_len)
    keys = models * prefix_len**2 + prompts * (length - prefix_len) * length
    forward = layers * (2 * positions * 12 * width**2 + 4 * keys * width)
    return 2.0 * forward


def gemm_rate(device: str, dtype, n: int = 2048) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    a @ a
    sync()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        a @ a
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class _AdamConfig:  # what make_optimizer reads of a TPConfig
    optimizer, warmup = "adam", 0.1


def median_step(one_step, steps: int) -> float:
    """Median seconds of ``steps`` calls of ``one_step``, after a warm-up call."""
    one_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def step_seconds(model, tok, names, num_models: int, *, cut: bool = True, one_at_a_time: bool = False, n_ctx: int = 16,
                 batch: int = 256, rows: int = 4096, steps: int = 3, precision: str = "fp32", device: str = "cpu",
                 prefix: str = "shared") -> float:
    """Seconds of one w2s-tp step of ``num_models`` prompt models over the classes ``names`` (median of ``steps``,
    after a warm-up step): in one bank, or one bank each (``one_at_a_time``); ``prefix``: "shared" (w2s-tp's
    default) or "none" (every prompt at its cut length, or full with ``cut=False``)."""
    dev = device
    k, dim = len(names), model.text_projection.shape[1]
    feats = torch.nn.functional.normalize(torch.randn(rows, dim, device=dev), dim=1)
    weak = torch.randn(rows, k, device=dev)
    labels = torch.randint(0, k, (rows,), device=dev)
    kinds = list(LOSSES)[:5]  # ce, kd, cpl, auxconf, adaptconf: the TP rows of the paper grid
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    make = lambda seeds: PromptBank(model, tok, names, seeds, n_ctx=n_ctx, cut=cut, prefix=prefix).to(dev)  # noqa: E731
    banks = [make([j]) for j in range(num_models)] if one_at_a_time else [make(list(range(num_models)))]
    jobs = []
    for bank in banks:
        j = len(bank.contexts)
        opt, _ = make_optimizer(bank, [1e-2] * j, _AdamConfig, 100)
        coeffs = rows_to_torch([LOSSES[kinds[i % len(kinds)]] for i in range(j)], dev)
        jobs.append((bank, opt, coeffs, rows_to_torch([Hparams()] * j, dev)))

    def one_step():
        for bank, opt, coeffs, hp in jobs:
            j = len(bank.contexts)
            picked = torch.randint(0, rows, (j, batch), device=dev)
            loss, _ = step_loss(text_features(bank, dev, precision), feats[picked], weak[picked],
                                torch.ones(j, batch, device=dev), labels[picked], coeffs, hp, 0.5)
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
        sync()

    return median_step(one_step, steps)


def textenc_step_seconds(model, tok, names, *, prefix: str, steps: int = 3, precision: str = "fp32",
                         device: str = "cpu") -> float:
    """Seconds of one ``cpl+textenc`` step's text tower (the whole tower trained: forward, backward, Adam) over the
    classes ``names``, median of ``steps`` after a warm-up step; ``prefix``: "shared" or "none"."""
    import copy

    from extract.prompt import TextEncoderBank, freeze_all_but

    bank = TextEncoderBank(copy.deepcopy(model), tok, names, prefix).to(device)
    groups = bank.param_groups([1e-5])
    freeze_all_but(bank, groups)
    opt = torch.optim.Adam(groups)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def one_step():
        loss = text_features(bank, device, precision).float().square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync()

    return median_step(one_step, steps)


def tower_peak_bytes(model, tok, names, num_models: int, *, n_ctx: int, precision: str, device: str,
                     prefix: str) -> tuple[int, int, str]:
    """``(estimated, measured, what was measured)`` bytes of one forward and backward of a bank's text tower:
    ``tower_bytes`` against, on CUDA, the peak allocated above the start, and elsewhere the bytes of the tensors
    autograd saves for the backward (each storage once), which is what ``tower_bytes`` models."""
    from extract.prompt import tower_bytes

    bank = PromptBank(model, tok, names, list(range(num_models)), n_ctx=n_ctx, prefix=prefix).to(device)
    freeze = [p for p in bank.parameters() if p not in set(bank.contexts)]
    for p in freeze:
        p.requires_grad_(False)  # as in training: the tower is frozen, only the contexts learn
    estimate = num_models * tower_bytes(model, len(names), bank.length, precision, bank.prefix_len)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        text_features(bank, device, precision).float().square().sum().backward()
        torch.cuda.synchronize()
        measured, what = torch.cuda.max_memory_allocated() - start, "CUDA peak above the start"
    else:
        saved = {}

        def keep(t):
            storage = t.untyped_storage()
            saved[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            loss = text_features(bank, device, precision).float().square().sum()
        loss.backward()
        measured, what = sum(saved.values()), "tensors saved for the backward"
    for p in freeze:
        p.requires_grad_(True)
    return estimate, measured, what


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="", help="an open_clip config, e.g. ViT-B-32 (random weights); default: tiny")
    ap.add_argument("--classes", type=int, default=345)
    ap.add_argument("--models", type=int, default=30, help="J: TP models in one step (6 methods x 5 seeds)")
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rows", type=int, default=4096, help="stored features the minibatches are drawn from")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per figure (after one warm-up step)")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default=None, help="[default: bf16 on CUDA]")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = ap.parse_args()
    import open_clip

    dev = args.device
    precision = args.precision or ("bf16" if dev.startswith("cuda") else "fp32")
    torch.manual_seed(0)
    name = args.model or register_tiny_clip()
    model = open_clip.create_model(name, pretrained=None).to(dev).eval()
    model.visual = None
    tok = open_clip.get_tokenizer(name)
    names = domainnet_like_names(args.classes)
    k = args.classes
    step_time = lambda num_models, cut, one_at_a_time=False, prefix="shared": step_seconds(  # noqa: E731
        model, tok, names, num_models, cut=cut, one_at_a_time=one_at_a_time, n_ctx=args.n_ctx, batch=args.batch,
        rows=args.rows, steps=args.steps, precision=precision, device=dev, prefix=prefix)
    bank = PromptBank(model, tok, names, [0], n_ctx=args.n_ctx)
    cut_length, prefix_len = bank.length, bank.prefix_len
    full_length = PromptBank(model, tok, names, [0], n_ctx=args.n_ctx, cut=False).length
    j = args.models
    # the three paths side by side, one model a step, interleaved so that a change in the machine's load hits all
    full_one, cut_one, shared_one = [], [], []
    for _ in range(2):
        full_one.append(step_time(1, cut=False, prefix="none"))
        cut_one.append(step_time(1, cut=True, prefix="none"))
        shared_one.append(step_time(1, cut=True))
    full_one, cut_one, shared_one = min(full_one), min(cut_one), min(shared_one)
    loop = step_time(j, cut=True, one_at_a_time=True)
    together = step_time(j, cut=True)
    textenc = {p: textenc_step_seconds(model, tok, names, prefix=p, steps=args.steps, precision=precision, device=dev)
               for p in ("none", "shared")}
    estimate, peak, measured_what = tower_peak_bytes(model, tok, names, min(j, 4), n_ctx=args.n_ctx,
                                                     precision=precision, device=dev, prefix="shared")
    rates = {"fp32": gemm_rate(dev, torch.float32), "bf16": gemm_rate(dev, torch.bfloat16)}
    flops = floor_flops(model, j * k, cut_length, prefix_len, j)
    figures = {
        "machine": machine(), "device": dev, "precision": precision, "model": name, "classes": k, "models": j,
        "batch": args.batch, "tokens_cut": cut_length, "tokens_full": full_length, "prefix_tokens": prefix_len,
        "step_full_s": full_one, "step_cut_s": cut_one, "step_shared_s": shared_one,
        "cut_speedup": full_one / cut_one, "shared_vs_cut": cut_one / shared_one, "shared_vs_full": full_one / shared_one,
        "positions_ratio": k * cut_length / (prefix_len + k * (cut_length - prefix_len)),
        "textenc_step_cut_s": textenc["none"], "textenc_step_shared_s": textenc["shared"],
        "textenc_shared_vs_cut": textenc["none"] / textenc["shared"],
        "loop_step_s": loop, "one_step_s": together, "one_step_speedup": loop / together,
        "model_step_ms": 1e3 * together / j, "model_step_ms_loop_full": 1e3 * full_one,
        "tower_bytes_estimate": estimate, "tower_bytes_measured": peak, "tower_bytes_error": estimate / peak - 1,
        "floor_tflop": flops / 1e12, "gemm_tflops_fp32": rates["fp32"] / 1e12, "gemm_tflops_bf16": rates["bf16"] / 1e12,
        "floor_share": flops / together / rates[precision],
    }
    print(f"machine: {figures['machine']}; device {dev}, text tower {precision}")
    print(f"model {name} (random weights), K={k} DomainNet-length class names, M={args.n_ctx}, batch {args.batch}")
    print(f"prompts: {cut_length} of {full_length} tokens after the cut; the shared prefix is {prefix_len} of them "
          f"({figures['positions_ratio']:.2f}x fewer positions a model than cut)")
    print(f"one model, one step: full {full_one:.4f}s, cut {cut_one:.4f}s, shared prefix {shared_one:.4f}s; "
          f"full/cut = {figures['cut_speedup']:.2f}x, cut/shared = {figures['shared_vs_cut']:.2f}x, "
          f"full/shared = {figures['shared_vs_full']:.2f}x")
    print(f"cpl+textenc step: cut {textenc['none']:.4f}s, shared prefix {textenc['shared']:.4f}s; "
          f"cut/shared = {figures['textenc_shared_vs_cut']:.2f}x")
    print(f"text tower memory of {min(j, 4)} model(s), shared prefix: estimated {estimate / 2**20:.2f} MiB, measured "
          f"{peak / 2**20:.2f} MiB ({measured_what}); estimate / measured = {estimate / peak:.2f}")
    print(f"J={j} models: one after another {loop:.4f}s, in one step {together:.4f}s; "
          f"loop/one step = {figures['one_step_speedup']:.2f}x")
    print(f"time per model-step: {figures['model_step_ms']:.2f} ms in one step of {j}, shared prefix "
          f"(today's loop at full length: {figures['model_step_ms_loop_full']:.2f} ms)")
    print(f"text tower floor (forward + input-gradient backward): {figures['floor_tflop']:.4f} TFLOP a step; "
          f"measured GEMM rate fp32 {figures['gemm_tflops_fp32']:.3f}, bf16 {figures['gemm_tflops_bf16']:.3f} TFLOP/s; "
          f"share of the floor at the {precision} rate: {figures['floor_share']:.2f}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
