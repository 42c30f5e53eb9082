"""Image decoding on the device (``w2s-extract --decode gpu``): the loader's workers only read file bytes; the main
process decodes each batch's JPEGs with ``torchvision.io.decode_jpeg`` on the device and applies tensor forms of the
models' PIL transforms there. A file that is not a JPEG is decoded by PIL in the worker (the CPU path, for that
image); a corrupt one is marked unreadable, as on the CPU path (``--on-corrupt``).

The tensor transforms are not bit-equal to PIL's: PIL and torch resize differently, and the JPEG decoders may round
differently. ``tests/test_extract.py`` bounds the difference in the stored features.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

DECODES = ("cpu", "gpu", "draft")  # cpu: PIL in the workers (default); gpu: torchvision.io.decode_jpeg on the device;
#                                   draft: PIL in the workers, a JPEG decoded at a reduced DCT scale (draft_side)
JPEG_MAGIC = b"\xff\xd8\xff"


class DecodeError(ValueError):
    """The device decode path cannot run here, with the reason and the fix."""


def draft_side(transforms) -> int:
    """The smallest side a JPEG may be decoded at (``--decode draft``) so that no transform of ``transforms`` (PIL
    transforms, torchvision ``Compose`` included) upsamples: the largest ``Resize`` or ``CenterCrop`` size among them;
    0 (decode at full size) where none names one."""
    from torchvision import transforms as T

    def sizes(t):
        if isinstance(t, T.Compose):
            return [s for inner in t.transforms for s in sizes(inner)]
        if isinstance(t, (T.Resize, T.CenterCrop)):
            return [max(np.atleast_1d(t.size))]
        return []

    found = [int(s) for t in transforms for s in sizes(t)]
    return max(found) if found else 0


def check_decode(decode: str, device: str) -> None:
    if decode not in DECODES:
        raise DecodeError(f"--decode {decode}: use one of {', '.join(DECODES)}")
    if decode == "gpu" and not str(device).startswith("cuda"):
        raise DecodeError(f"--decode gpu decodes JPEGs on a CUDA device, and this run uses {device}; "
                          "pass --decode cpu (or run on a GPU with --device cuda)")


def tensor_transform(pil_transform, name: str) -> Callable:
    """The tensor form of a torchvision/open_clip PIL transform: ``uint8 3 x H x W`` (on any device) -> what the PIL
    transform returns. A DecodeError names a step that has no tensor form (use --decode cpu then)."""
    import torchvision.transforms.v2.functional as F2
    from torchvision import transforms as T

    steps = []
    for t in getattr(pil_transform, "transforms", [pil_transform]):
        kind = type(t).__name__
        if isinstance(t, T.Resize):
            steps.append(lambda x, t=t: F2.resize(x, t.size, interpolation=t.interpolation, antialias=True,
                                                 max_size=t.max_size))
        elif isinstance(t, T.CenterCrop):
            steps.append(lambda x, t=t: F2.center_crop(x, t.size))
        elif isinstance(t, T.Grayscale):
            steps.append(lambda x, t=t: F2.rgb_to_grayscale(x, num_output_channels=t.num_output_channels))
        elif kind in ("ToTensor", "MaybeToTensor"):
            steps.append(lambda x: x.float() / 255.0)
        elif kind == "MaybeConvertMode":  # open_clip's RGB conversion: the decoder already gives RGB
            continue
        elif isinstance(t, T.Normalize):
            steps.append(lambda x, t=t: F2.normalize(x, list(t.mean), list(t.std)))
        elif isinstance(t, T.Lambda):  # applied to the tensor, as it is after ToTensor on the CPU path
            steps.append(t.lambd)
        else:
            raise DecodeError(f"{name}'s preprocessing has a step without a tensor form ({kind}); use --decode cpu")

    def apply(x_3xHxW):
        for step in steps:
            x_3xHxW = step(x_3xHxW)
        return x_3xHxW

    return apply


class RawImages(torch.utils.data.Dataset):
    """Items ``(pass key, sample id, row)`` -> ``(row, ("jpeg", uint8 bytes))`` of a JPEG file, ``(row, ("pixels",
    uint8 3 x H x W))`` of another image decoded by PIL in the worker, or ``(row, None)`` for an unreadable file.
    The pass's transforms are applied on the device, after decoding."""

    def __init__(self, load):
        self.root, self.load = load.root, load
        self.collate = collate_raw

    def __getitem__(self, item):
        _, sample_id, row = item
        try:
            data = (Path(self.root) / sample_id).read_bytes()
            if data.startswith(JPEG_MAGIC):
                return row, ("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8))
            image = self.load(sample_id)  # not a JPEG: PIL, as on the CPU path
            return row, ("pixels", torch.from_numpy(np.asarray(image, np.uint8).copy()).permute(2, 0, 1))
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return row, None


def collate_raw(items):
    """-> (good row indices, list of ("jpeg"|"pixels", tensor), bad row indices)."""
    good = [(i, x) for i, x in items if x is not None]
    return (torch.tensor([i for i, _ in good], dtype=torch.long), [x for _, x in good],
            [i for i, x in items if x is None])


def decode_batch(raw, device: str) -> tuple[list, list[int]]:
    """Decode a batch on ``device``: (one ``uint8 3 x H x W`` per readable image, positions of corrupt JPEGs)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    jpegs = [k for k, (kind, _) in enumerate(raw) if kind == "jpeg"]
    out = [x.to(device, non_blocking=True) if kind == "pixels" else None for kind, x in raw]
    bad = []
    try:
        decoded = decode_jpeg([raw[k][1] for k in jpegs], mode=ImageReadMode.RGB, device=device) if jpegs else []
        for k, image in zip(jpegs, decoded):
            out[k] = image
    except RuntimeError:  # a corrupt file in the batch: decode one by one to find it
        for k in jpegs:
            try:
                out[k] = decode_jpeg(raw[k][1], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                bad.append(k)
    return [x for x in out if x is not None], bad
