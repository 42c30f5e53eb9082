"""Prompt tuning as w2s-tp runs it (extract.tp_fit): full against cut prompts, J models one after another against
one step, time per model-step, and the share of the text tower's FLOP floor, against GEMM rates measured in the same
run. Random open_clip weights, K class names of DomainNet's length, one process, one device.

A step is w2s-tp's: the text tower over the prompts (tp_fit.text_features), each model's logits on its own minibatch
of stored features and its row of the loss family (tp_fit.step_loss), the backward pass and one Adam update.
The floor counts the tower's forward and its input-gradient backward (the weights are frozen): per prompt and layer
``2·L·(12·W²) + 2·2·L²·W`` FLOPs forward, the same again backward.

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


def floor_flops(model, prompts: int, length: int) -> float:
    """Forward plus input-gradient backward FLOPs of the text tower over ``prompts`` prompts of ``length`` tokens."""
    width = model.token_embedding.weight.shape[1]
    layers = len(model.transformer.resblocks)
    forward = layers * prompts * (2 * length * 12 * width**2 + 4 * length**2 * width)
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


def step_seconds(model, tok, names, num_models: int, *, cut: bool = True, one_at_a_time: bool = False, n_ctx: int = 16,
                 batch: int = 256, rows: int = 4096, steps: int = 3, precision: str = "fp32", device: str = "cpu") -> float:
    """Seconds of one w2s-tp step of ``num_models`` prompt models over the classes ``names`` (median of ``steps``,
    after a warm-up step): in one bank, or one bank each (``one_at_a_time``)."""
    dev = device
    k, dim = len(names), model.text_projection.shape[1]
    feats = torch.nn.functional.normalize(torch.randn(rows, dim, device=dev), dim=1)
    weak = torch.randn(rows, k, device=dev)
    labels = torch.randint(0, k, (rows,), device=dev)
    kinds = list(LOSSES)[:5]  # ce, kd, cpl, auxconf, adaptconf: the TP rows of the paper grid
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    banks = [PromptBank(model, tok, names, [j], n_ctx=n_ctx, cut=cut).to(dev) for j in range(num_models)] \
        if one_at_a_time else [PromptBank(model, tok, names, list(range(num_models)), n_ctx=n_ctx, cut=cut).to(dev)]
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

    one_step()  # warm-up
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


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
    step_time = lambda num_models, cut, one_at_a_time=False: step_seconds(  # noqa: E731
        model, tok, names, num_models, cut=cut, one_at_a_time=one_at_a_time, n_ctx=args.n_ctx, batch=args.batch,
        rows=args.rows, steps=args.steps, precision=precision, device=dev)
    cut_length = PromptBank(model, tok, names, [0], n_ctx=args.n_ctx).length
    full_length = PromptBank(model, tok, names, [0], n_ctx=args.n_ctx, cut=False).length
    j = args.models
    full_one = step_time(1, cut=False)
    cut_one = step_time(1, cut=True)
    loop = step_time(j, cut=True, one_at_a_time=True)
    together = step_time(j, cut=True)
    rates = {"fp32": gemm_rate(dev, torch.float32), "bf16": gemm_rate(dev, torch.bfloat16)}
    flops = floor_flops(model, j * k, cut_length)
    figures = {
        "machine": machine(), "device": dev, "precision": precision, "model": name, "classes": k, "models": j,
        "batch": args.batch, "tokens_cut": cut_length, "tokens_full": full_length,
        "step_full_s": full_one, "step_cut_s": cut_one, "cut_speedup": full_one / cut_one,
        "loop_step_s": loop, "one_step_s": together, "one_step_speedup": loop / together,
        "model_step_ms": 1e3 * together / j, "model_step_ms_loop_full": 1e3 * full_one,
        "floor_tflop": flops / 1e12, "gemm_tflops_fp32": rates["fp32"] / 1e12, "gemm_tflops_bf16": rates["bf16"] / 1e12,
        "floor_share": flops / together / rates[precision],
    }
    print(f"machine: {figures['machine']}; device {dev}, text tower {precision}")
    print(f"model {name} (random weights), K={k} DomainNet-length class names, M={args.n_ctx}, batch {args.batch}")
    print(f"prompts: {cut_length} of {full_length} tokens after the cut")
    print(f"one model, one step: full {full_one:.4f}s, cut {cut_one:.4f}s; full/cut = {figures['cut_speedup']:.2f}x")
    print(f"J={j} models: one after another {loop:.4f}s, in one step {together:.4f}s; "
          f"loop/one step = {figures['one_step_speedup']:.2f}x")
    print(f"time per model-step: {figures['model_step_ms']:.2f} ms in one step of {j} "
          f"(today's loop at full length: {figures['model_step_ms_loop_full']:.2f} ms)")
    print(f"text tower floor (forward + input-gradient backward): {figures['floor_tflop']:.4f} TFLOP a step; "
          f"measured GEMM rate fp32 {figures['gemm_tflops_fp32']:.3f}, bf16 {figures['gemm_tflops_bf16']:.3f} TFLOP/s; "
          f"share of the floor at the {precision} rate: {figures['floor_share']:.2f}")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
