"""Weak models: the paper's five (HF transformers), fine-tuned or probed, and the demo's pixel model.

Spec strings (``--weak``, repeatable): ``NAME[:MODE]``
- NAME: a registry name (``resnet18`` ... ``convnext-tiny``), an HF repo id, or a local directory
  written by ``save_pretrained``; or ``pixels`` / ``pixels@S`` (demo: S x S grey pixels, default 4).
- MODE: ``finetune`` (paper default: all weights, 3 epochs, batch 512, lr 1e-3, warmup 0.1)
  or ``probe`` (frozen backbone + a trained linear head; fast). ``pixels`` is always a probe.

Teachers that never saw the target labels (:mod:`extract.teachers`): ``zeroshot:MODEL:TAG`` and
``imagenet:MODEL[:MAPPING]``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torchvision import transforms as T

HF_WEAK_MODELS = {
    "resnet18": "microsoft/resnet-18",
    "resnet26": "microsoft/resnet-26",
    "resnet34": "microsoft/resnet-34",
    "cvt13": "microsoft/cvt-13",
    "convnext-tiny": "facebook/convnext-tiny-224",
}
PAPER_WEAK_MODELS = tuple(HF_WEAK_MODELS)  # "--weak paper": the paper's five, fine-tuned as the paper does
MODES = ("finetune", "probe")  # trained on the target labels
FROZEN = ("zeroshot", "mapped")  # never trained here: extract.teachers
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class WeakModelError(ValueError):
    """A weak model that cannot be built, with the reason and the fix."""


@dataclasses.dataclass(frozen=True)
class WeakSpec:
    name: str  # key in the store, e.g. "resnet18-finetune", "pixels@4"
    source: str  # HF repo id, local directory, or "pixels"
    mode: str  # "finetune" or "probe"
    pixels: int = 0  # side of the demo's pixel grid (pixels only)
    mapping: str = ""  # a mapped teacher's mapping file ("" maps by name similarity)

    @property
    def is_pixels(self) -> bool:
        return self.source == "pixels"


def expand_weak(specs) -> list[str]:
    """The weak-model specs with ``paper`` replaced by the paper's five weak models (fine-tuned)."""
    return [name for spec in specs for name in (PAPER_WEAK_MODELS if spec == "paper" else (spec,))]


def parse_weak(spec: str) -> WeakSpec:
    base, _, mode = spec.partition(":")
    if base in ("zeroshot", "imagenet") and mode:
        return _parse_teacher(base, mode, spec)
    if Path(base).expanduser().is_dir():  # a local directory may contain ':' only in exotic cases
        source = str(Path(base).expanduser())
    elif base.split("@")[0] == "pixels":
        size = int(base.partition("@")[2] or 4)
        if mode not in ("", "probe"):
            raise WeakModelError(f"weak model {spec!r}: pixels is a probe only")
        return WeakSpec(f"pixels@{size}", "pixels", "probe", size)
    elif base in HF_WEAK_MODELS:
        source = HF_WEAK_MODELS[base]
    elif "/" in base:
        source = base
    else:
        raise WeakModelError(
            f"unknown weak model {base!r}; choose one of {', '.join([*HF_WEAK_MODELS, 'pixels'])}, "
            f"an HF repo id, or a local save_pretrained directory"
        )
    mode = mode or "finetune"
    if mode not in MODES:
        raise WeakModelError(f"weak model {spec!r}: unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return WeakSpec(f"{Path(base).name}-{mode}", source, mode)


def _parse_teacher(kind: str, rest: str, spec: str) -> WeakSpec:
    """``zeroshot:MODEL:TAG`` or ``imagenet:MODEL[:MAPPING]`` (:mod:`extract.teachers`)."""
    if kind == "zeroshot":
        model, _, tag = rest.partition(":")
        if not model or not tag:
            raise WeakModelError(f"weak model {spec!r}: expected zeroshot:MODEL:TAG (an open_clip model and pretrained "
                                 "tag, e.g. zeroshot:RN50:openai, or zeroshot:MODEL:/path/to/checkpoint)")
        return WeakSpec(f"zeroshot-{model}-{Path(tag).stem if '/' in tag else tag}", rest, "zeroshot")
    model, _, mapping = rest.partition(":")
    source = str(Path(model).expanduser()) if Path(model).expanduser().is_dir() else HF_WEAK_MODELS.get(model, model)
    return WeakSpec(f"imagenet-{Path(source).name}" + (f"-{Path(mapping).stem}" if mapping else ""), source, "mapped",
                    mapping=mapping)


def weak_transform(spec: WeakSpec, size: int = 224) -> Callable:
    """PIL image -> tensor for the weak model (the paper's ImageNet preprocessing, or grey pixels)."""
    if spec.is_pixels:
        return T.Compose([T.Grayscale(), T.Resize((spec.pixels, spec.pixels)), T.ToTensor(), T.Lambda(torch.flatten)])
    return T.Compose([
        T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


RESUME_FIX = "Delete it and run again: the weak model is fine-tuned anew"  # a checkpoint in a .parts folder


def load_weights(path, device: str, fix: str = RESUME_FIX) -> dict:
    """A kept fine-tuned weak model's state dict. Loaded with ``weights_only=True`` always, so that no pickled code
    runs, whatever ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says; a damaged or unsafe file is a WeakModelError naming
    it and ``fix`` (what deleting it costs, and how the model is had again)."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated, not a torch file, or holding objects other than tensors
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise WeakModelError(f"{path}: cannot be loaded as plain weights ({reason}); it is damaged or holds more than "
                             f"tensors, and only tensors are ever loaded. {fix[0].upper()}{fix[1:]}") from None


def head_seed(spec: WeakSpec) -> int:
    """The seed of a weak model's fresh classifier head: from its name, so that the head is the same whatever ran
    before (and whichever other weak models are loaded with it)."""
    return int.from_bytes(hashlib.sha256(spec.name.encode()).digest()[:4], "little")


def load_hf(spec: WeakSpec, num_classes: int, device: str) -> torch.nn.Module:
    """The HF image classifier with a fresh ``num_classes`` head, drawn from :func:`head_seed` (torch's global
    generator is left as it was)."""
    from transformers import AutoModelForImageClassification

    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(head_seed(spec))
            model = AutoModelForImageClassification.from_pretrained(
                spec.source, num_labels=num_classes, ignore_mismatched_sizes=True
            )
    except (OSError, ValueError) as err:
        raise WeakModelError(
            f"could not load weak model {spec.source} ({err}). If this machine is offline, save it elsewhere "
            f"with save_pretrained and pass the directory: --weak /path/to/dir:{spec.mode}"
        ) from None
    return model.to(device)


def backbone_features(model: torch.nn.Module) -> Callable:
    """images -> the features the classifier head sees (a hook on ``model.classifier``)."""
    captured = {}
    model.classifier.register_forward_pre_hook(lambda mod, args: captured.__setitem__("x", args[0]))

    def features(images_Bx3xHxW):
        model(pixel_values=images_Bx3xHxW)
        return captured["x"].flatten(1)

    return features


def probe_backbone(spec: WeakSpec, num_classes: int, device: str) -> Callable:
    """The frozen feature function a probe trains on: grey pixels as they are, or the HF backbone."""
    if spec.is_pixels:
        return torch.nn.Identity()
    return backbone_features(load_hf(spec, num_classes, device).eval())


def hf_logits(model: torch.nn.Module) -> Callable:
    return lambda images_Bx3xHxW: model(pixel_values=images_Bx3xHxW).logits


# -------------------------------------------------------------------- training


def warmup_linear(total_steps: int, warmup: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup`` of the steps, then linear decay to 0."""
    warm = max(1, math.ceil(warmup * total_steps))
    return lambda step: (step + 1) / warm if step < warm else max(0.0, (total_steps - step) / max(1, total_steps - warm))


PROBE_EPOCHS, PROBE_LR = 30, 1e-2


def train_probe(feats_NxF: np.ndarray, labels_N: np.ndarray, num_classes: int, *, epochs: int = PROBE_EPOCHS,
                lr: float = PROBE_LR, batch_size: int = 512, seed: int = 0, device: str = "cpu") -> Callable:
    """Fit a linear head (on standardised features) with Adam; returns feats -> logits (numpy)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.as_tensor(feats_NxF, dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-6
    x = ((x - mean) / std).to(device)
    y = torch.as_tensor(labels_N, dtype=torch.long, device=device)
    head = torch.nn.Linear(x.shape[1], num_classes).to(device)
    torch.nn.init.zeros_(head.weight), torch.nn.init.zeros_(head.bias)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = torch.nn.functional.cross_entropy(head(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    head = head.cpu().eval()

    @torch.no_grad()
    def predict(feats):
        return head((torch.as_tensor(feats, dtype=torch.float32) - mean) / std).numpy()

    return predict


def transform_key(spec: WeakSpec) -> str:
    """Weak models with equal keys preprocess an image alike (:func:`weak_transform`), so they share one transform
    of each decoded image: the paper's five all read the 224 px ImageNet crop."""
    return f"pixels@{spec.pixels}" if spec.is_pixels else "imagenet-224"


def finetune(models: dict, loader, *, epochs: int = 3, lr: float = 1e-3, warmup: float = 0.1, device: str = "cpu",
             progress: Callable = lambda it, **kw: it) -> dict[str, str]:
    """Fine-tune every model of ``models`` (``{name: (module, index of its input)}``) in lockstep: all weights,
    cross-entropy, AdamW with linear warmup and decay (the paper's defaults). ``loader`` yields ``(inputs, labels)``,
    ``inputs`` one tensor per distinct preprocessing, so each image is decoded once per epoch whatever the number
    of models. Each model has its own optimizer and schedule and sees the same batches as it would alone, so it
    trains as it would alone (a model that draws random numbers in training, e.g. dropout, draws them from torch's
    one generator in another order). A model whose step raises (out of memory, ...) is dropped and the others go
    on. Returns ``{name: reason}`` of the failed ones; the others are left in eval mode."""
    total = epochs * len(loader)
    optimizers = {n: torch.optim.AdamW(m.parameters(), lr=lr) for n, (m, _) in models.items()}
    schedules = {n: torch.optim.lr_scheduler.LambdaLR(o, warmup_linear(total, warmup)) for n, o in optimizers.items()}
    use_amp = device.startswith("cuda")
    failed = {}
    for model, _ in models.values():
        model.train()
    for epoch in range(epochs):
        for inputs, labels in progress(loader, desc=f"fine-tune epoch {epoch + 1}/{epochs}", unit="batch"):
            labels = labels.to(device)
            for name, (model, which) in models.items():
                if name in failed:
                    continue
                try:
                    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
                        logits = model(pixel_values=inputs[which].to(device, non_blocking=True)).logits
                    loss = torch.nn.functional.cross_entropy(logits.float(), labels)
                    optimizers[name].zero_grad()
                    loss.backward()
                    optimizers[name].step()
                    schedules[name].step()
                except Exception as err:  # its own failure, out of memory first: the others' work goes on
                    first_line = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
                    failed[name] = f"{type(err).__name__}: {first_line}"
                    optimizers[name].zero_grad(set_to_none=True)
                    if use_amp:
                        torch.cuda.empty_cache()
    for model, _ in models.values():
        model.eval()
    return failed
