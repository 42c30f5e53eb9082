"""Weak teachers that never saw the target labels: nothing is trained, their logits are computed as they are.

- ``zeroshot:MODEL:TAG``: a zero-shot open_clip model (any model and pretrained tag, or ``MODEL:/path/ckpt``). Its
  logits are ``logit_scale * cos(image feature, class feature)``, the class feature being the mean of the normalised
  text features of the dataset's templates with the class name, normalised again (CLIP's prompt ensemble).
- ``imagenet:MODEL[:MAPPING]``: an ImageNet-1k classifier (an HF id, a registry name such as ``resnet18``, or a
  local directory) whose source-class probabilities ``p`` (S) are mapped onto the K target classes:
  - with a MAPPING file (``.json`` ``{source: target}``, or lines ``source<TAB>target``; a source is a class index,
    its full label or its first name), many to one: ``q_k = sum of p_s over the sources mapped to k``, logits
    ``log(max(q_k, EPS))``;
  - else by name similarity, ConSE-style: the top ``TOP`` sources' name embeddings weighted by their probabilities
    (renormalised over the top), normalised, scored against each target name's embedding by cosine; logits are the
    cosines over ``TEMPERATURE``. The names are embedded by the strong encoder's text tower with ``NAME_TEMPLATE``,
    and that tower is named in the store.
  Target classes that no source covers (no source mapped to them; by names, no source whose nearest target they
  are) are reported at extraction and counted in the store.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from extract import encoders
from extract.weak import WeakModelError, WeakSpec, weak_transform

TOP, TEMPERATURE, NAME_TEMPLATE, EPS = 10, 0.01, "a photo of a {}.", 1e-12
KINDS = {"zeroshot": "zero-shot", "mapped": "mapped from another label space"}
def recipe(spec: WeakSpec, templates) -> dict:
    """What a teacher's logits are made from (``weak_pass.weak_recipe``): a changed template or mapping file
    remakes them."""
    out = {"source": spec.source, "mode": spec.mode, "kind": KINDS[spec.mode]}
    if spec.mode == "zeroshot":
        return {**out, "templates": list(templates)}
    if spec.mapping:
        return {**out, "mapping": spec.mapping, "mapping_sha256": encoders.sha256_file(_mapping_file(spec.mapping))}
    return {**out, "mapping": "name similarity (ConSE)", "top": TOP, "temperature": TEMPERATURE,
            "name_template": NAME_TEMPLATE}


def build(spec: WeakSpec, class_names, templates, device: str, text_encoder: Callable | None = None,
          log=print) -> tuple[Callable, Callable, dict]:
    """``(transform, images_Bx3xHxW -> logits_BxK, info)`` of the teacher ``spec`` for ``class_names``;
    ``text_encoder()`` gives the strong encoder (its text tower embeds names for a mapping by name similarity)."""
    if spec.mode == "zeroshot":
        return _zeroshot(spec, class_names, templates, device)
    return _mapped(spec, class_names, device, text_encoder, log)


# ------------------------------------------------------------------------ zero-shot


def class_features(text_TxKxD: torch.Tensor) -> torch.Tensor:
    """CLIP's prompt ensemble: each prompt's feature normalised, averaged over templates, normalised: ``K x D``."""
    text = torch.nn.functional.normalize(text_TxKxD.float(), dim=-1).mean(0)
    return torch.nn.functional.normalize(text, dim=-1)


def _zeroshot(spec: WeakSpec, class_names, templates, device: str):
    try:
        enc = encoders.load_strong(spec.source, device)
    except encoders.EncoderError as err:
        raise WeakModelError(f"zero-shot weak model {spec.source}: {err}") from None
    if enc.encode_text is None:
        raise WeakModelError(f"zeroshot:{spec.source} has no text tower; use an open_clip model")
    with torch.no_grad():
        weights = class_features(encoders.text_embeddings(enc, class_names, templates))
    scale = float(enc.model.logit_scale.detach().exp()) if hasattr(enc.model, "logit_scale") else 100.0

    def logits(images_Bx3xHxW):
        feats = torch.nn.functional.normalize(enc.encode_images(images_Bx3xHxW).float(), dim=-1)
        return scale * feats @ weights.T

    return enc.transform, logits, {"encoder": enc.id, "logit_scale": scale}


# --------------------------------------------------------------------------- mapped


def _mapping_file(path) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeakModelError(f"mapping file {path} not found; pass imagenet:MODEL:FILE with an existing file, or "
                             "leave FILE out to map by name similarity")
    return path


def source_names(model) -> list[str]:
    """The classifier's source classes in index order (its ``config.id2label``)."""
    id2label = model.config.id2label
    return [str(id2label[i]) for i in range(len(id2label))]


def read_mapping(path, sources: list[str], targets) -> np.ndarray:
    """The 0/1 matrix ``S x K`` of a mapping file (module docstring); a WeakModelError names a line it cannot read."""
    path = _mapping_file(path)
    text = path.read_text()
    if path.suffix == ".json":
        pairs = [(str(s), str(t)) for s, t in json.loads(text).items()]
    else:
        pairs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip() and not line.startswith("#"):
                parts = line.split("\t")
                if len(parts) != 2:
                    raise WeakModelError(f"{path}:{n}: expected 'source<TAB>target', got {line!r}")
                pairs.append((parts[0].strip(), parts[1].strip()))
    by_name = {**{s.split(",")[0].strip(): i for i, s in enumerate(sources)}, **{s: i for i, s in enumerate(sources)},
               **{str(i): i for i in range(len(sources))}}
    target_of = {t: k for k, t in enumerate(targets)}
    matrix = np.zeros((len(sources), len(targets)), np.float32)
    for s, t in pairs:
        if s not in by_name or t not in target_of:
            what = f"source class {s!r}" if s not in by_name else f"target class {t!r}"
            raise WeakModelError(f"{path}: {what} is not one of the model's source classes or the dataset's classes "
                                 f"(e.g. {sources[0]!r} -> {targets[0]!r})")
        matrix[by_name[s], target_of[t]] = 1.0
    return matrix


def name_embeddings(text_encoder, names) -> torch.Tensor:
    """Normalised text features of :data:`NAME_TEMPLATE` with each name (its first name, before a comma): ``N x D``."""
    prompts = [NAME_TEMPLATE.format(n.split(",")[0].strip()) for n in names]
    with torch.no_grad():
        return torch.nn.functional.normalize(text_encoder.encode_text(prompts).float(), dim=-1)


def conse(probs_BxS: torch.Tensor, sources_SxD: torch.Tensor, targets_KxD: torch.Tensor, top: int = TOP,
          temperature: float = TEMPERATURE) -> torch.Tensor:
    """ConSE logits ``B x K``: the top sources' embeddings weighted by their renormalised probabilities."""
    values, index = probs_BxS.topk(min(top, probs_BxS.shape[1]), dim=1)
    weights = values / values.sum(1, keepdim=True)
    mixed = torch.nn.functional.normalize(torch.einsum("bt,btd->bd", weights, sources_SxD[index]), dim=-1)
    return mixed @ targets_KxD.T / temperature


def _mapped(spec: WeakSpec, class_names, device: str, text_encoder, log):
    from transformers import AutoModelForImageClassification

    try:
        model = AutoModelForImageClassification.from_pretrained(spec.source).to(device).eval()
    except (OSError, ValueError) as err:
        raise WeakModelError(f"could not load the ImageNet classifier {spec.source} ({err}). If this machine is "
                             "offline, save it elsewhere with save_pretrained and pass imagenet:/path/to/dir") from None
    sources = source_names(model)
    info = {"source_classes": len(sources)}
    if spec.mapping:
        matrix = torch.as_tensor(read_mapping(spec.mapping, sources, class_names), device=device)
        covered = matrix.sum(0) > 0

        def logits(images_Bx3xHxW):
            probs = model(pixel_values=images_Bx3xHxW).logits.float().softmax(-1)
            return (probs @ matrix).clamp_min(EPS).log()
    else:
        encoder = text_encoder() if text_encoder is not None else None
        if encoder is None or encoder.encode_text is None:
            raise WeakModelError(f"imagenet:{spec.source} maps its classes by name similarity, which needs a text "
                                 "tower, and the strong encoder has none: use an open_clip strong encoder, or give a "
                                 "mapping file (imagenet:MODEL:FILE)")
        src, tgt = name_embeddings(encoder, sources).to(device), name_embeddings(encoder, class_names).to(device)
        covered = torch.zeros(len(class_names), dtype=torch.bool)
        covered[(src @ tgt.T).argmax(1).cpu()] = True
        info["text_tower"] = encoder.id

        def logits(images_Bx3xHxW):
            return conse(model(pixel_values=images_Bx3xHxW).logits.float().softmax(-1), src, tgt)

    uncovered = [name for name, c in zip(class_names, covered.tolist()) if not c]
    if uncovered:
        log(f"weak model {spec.name}: {len(uncovered)} of {len(class_names)} target classes are covered by no source "
            f"class ({', '.join(uncovered[:10])}{', ...' if len(uncovered) > 10 else ''}); it can hardly predict them")
    info.update(uncovered_classes=len(uncovered), uncovered=uncovered[:50])
    return weak_transform(spec), logits, info
