"""Helpers shared by the benchmark scripts (not part of the package)."""
from __future__ import annotations

import json
import platform
import resource
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def machine() -> str:
    import os

    versions = {p: metadata.version(p) for p in ("jax", "torch", "open_clip_torch") if _has(p)}
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, {versions}"


def _has(pkg) -> bool:
    try:
        metadata.version(pkg)
        return True
    except metadata.PackageNotFoundError:
        return False


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` calls, seconds."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def register_tiny_clip(image_size=64, vision_width=128, text_width=64, layers=2, embed_dim=64) -> str:
    """Registers a small random open_clip config (the same kind the tests use); returns its name."""
    import open_clip

    name = f"w2s-bench-{image_size}-{vision_width}-{text_width}-{layers}"
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": image_size, "layers": layers, "width": vision_width, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 4, "layers": layers}}
    path = Path(tempfile.mkdtemp()) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def clustered(n, d, k, rng, weak_noise=1.0, feat_noise=5.0, text_noise=1.0):
    """Class-clustered features, noisy weak logits (~55% right at k=345) and noisy text embeddings:
    (feats_NxD, weak_NxK, labels_N, text_1xKxD)."""
    centers = rng.normal(size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    feats = centers[labels] + feat_noise * rng.normal(size=(n, d)).astype(np.float32)
    weak = 3.0 * np.eye(k, dtype=np.float32)[labels] + weak_noise * rng.normal(size=(n, k)).astype(np.float32)
    text = centers + text_noise * rng.normal(size=(k, d)).astype(np.float32)
    return feats.astype(np.float32), weak.astype(np.float32), labels, text[None].astype(np.float32)
