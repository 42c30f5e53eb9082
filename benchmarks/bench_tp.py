"""Prompt tuning: time per epoch on stored image features vs. the CoOp loop that re-encodes images every step, and
the text tower in float32 vs bfloat16 autocast (``w2s-tp --precision``) on stored features.

Same tiny random open_clip model, same images, same prompt learner and loss, one run.
Usage: python benchmarks/bench_tp.py [--images 1024] [--classes 20] [--batch 128] [--device cpu] [--model ViT-B-32]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from _common import machine, register_tiny_clip, timed
from extract.losses_torch import kd
from extract.prompt import PromptLearner
from w2s_jax.config import Hparams


def epoch(learner, image_source, weak_NxK, batch, opt, hp, bf16=False):
    n = weak_NxK.shape[0]
    device_type = weak_NxK.device.type
    for rows in torch.randperm(n).split(batch):
        feats = F.normalize(image_source(rows), dim=1)
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):  # as extract.prompt.fit_prompts
            text = learner()
        logits = hp.logit_scale * feats @ F.normalize(text.float(), dim=1).T
        loss = kd(logits, weak_NxK[rows], progress=0.5, hp=hp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--classes", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--model", default="", help="an open_clip config, e.g. ViT-B-32 (random weights); default: tiny")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    import open_clip

    torch.manual_seed(0)
    name = args.model or register_tiny_clip(image_size=args.image_size)
    model = open_clip.create_model(name, pretrained=None).to(args.device).eval()
    args.image_size = model.visual.image_size[0] if isinstance(model.visual.image_size, tuple) else model.visual.image_size
    tok = open_clip.get_tokenizer(name)
    images = torch.randn(args.images, 3, args.image_size, args.image_size, device=args.device)
    weak = torch.randn(args.images, args.classes, device=args.device)
    classes = [f"class {i}" for i in range(args.classes)]
    hp = Hparams()

    with torch.no_grad():
        encode_once = timed(lambda: torch.cat([model.encode_image(x) for x in images.split(args.batch)]))
        stored = torch.cat([model.encode_image(x) for x in images.split(args.batch)])

    def reencode(rows):
        with torch.no_grad():
            return model.encode_image(images[rows])

    def synced(fn):
        def run():
            fn()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    times = {}
    for label, source, bf16 in (("stored", lambda rows: stored[rows], False), ("re-encode", reencode, False),
                                ("stored, bf16 text tower", lambda rows: stored[rows], True)):
        learner = PromptLearner(model, tok, classes, n_ctx=16).to(args.device)
        opt = torch.optim.Adam([learner.ctx_MxW], lr=1e-2)
        epoch(learner, source, weak, args.batch, opt, hp, bf16)  # warm-up
        times[label] = timed(synced(lambda: epoch(learner, source, weak, args.batch, opt, hp, bf16)), repeats=3)

    print(f"machine: {machine()}; device {args.device}")
    print(f"model {name} (random weights), N={args.images} images {args.image_size}px, K={args.classes} prompts x 77 tokens, batch {args.batch}")
    print(f"one-off image encoding for the store: {encode_once:.3f}s")
    print(f"epoch on stored features: {times['stored']:.3f}s; epoch re-encoding images: {times['re-encode']:.3f}s")
    print(f"ratio re-encode/stored per epoch: {times['re-encode'] / times['stored']:.2f}x")
    print(f"epoch with the text tower in bf16 autocast: {times['stored, bf16 text tower']:.3f}s; "
          f"fp32/bf16 per epoch: {times['stored'] / times['stored, bf16 text tower']:.2f}x (#22's GPU target >= 3x)")


if __name__ == "__main__":
    main()
