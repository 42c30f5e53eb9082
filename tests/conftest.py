"""Shared fixtures: images, dataset trees and stores made by the tests; a tiny random open_clip model."""
from __future__ import annotations

import http.server
import json
import sys
import os
import tempfile
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never touch the network
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("W2S_CACHE", tempfile.mkdtemp(prefix="w2s-test-cache-"))  # never the user's compile cache

TINY_CLIP = "w2s-tiny-test"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
CLASSES = ("cat", "hot_air_balloon", "zebra")


def write_image(path: Path, label: int, rng, size=40) -> None:
    """A JPEG whose colour depends on the label, plus noise."""
    from PIL import Image

    base = np.zeros((size, size, 3))
    base[..., label % 3] = 180
    pixels = np.clip(base + rng.normal(0, 30, base.shape), 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format="JPEG")


@pytest.fixture
def domainnet_root(tmp_path) -> Path:
    """A DomainNet-layout tree for domain 'real': 3 classes, 6 train and 9 test images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "domainnet"
    for split, per_class in (("train", 2), ("test", 3)):
        lines = []
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                rel = f"real/{name}/real_{split}_{label}_{i:03d}.jpg"
                write_image(root / rel, label, rng)
                lines.append(f"{rel} {label}")
        (root / f"real_{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def imagefolder_root(tmp_path) -> Path:
    """``train/<class>/*.jpg`` and ``test/<class>/*.jpg``: 3 classes, 4 train and 6 test per class."""
    rng = np.random.default_rng(1)
    root = tmp_path / "folder"
    for split, per_class in (("train", 4), ("test", 6)):
        for label, name in enumerate(CLASSES):
            for i in range(per_class):
                write_image(root / split / name / f"{i:03d}.jpg", label, rng)
    return root


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory) -> str:
    """Registers a tiny open_clip config and saves random weights; returns the --strong spec."""
    import open_clip
    import torch

    folder = tmp_path_factory.mktemp("tiny_clip")
    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP, pretrained=None)
    ckpt = folder / "tiny.pt"
    torch.save(model.state_dict(), ckpt)
    return f"{TINY_CLIP}:{ckpt}"


@pytest.fixture(scope="session")
def tiny_resnet_dir(tmp_path_factory) -> str:
    """A randomly initialised tiny HF ResNet saved with save_pretrained (loaded like a hub model)."""
    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    folder = tmp_path_factory.mktemp("tiny_resnet") / "tiny-resnet"
    ResNetForImageClassification(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture
def registries():
    """Put the registries back after a test registers its own head, methods and loss rows."""
    from w2s_jax import heads, losses, methods

    registries = (heads.HEADS, methods.METHODS, methods.CEILING_OF_HEAD, losses.LOSSES)
    saved = [dict(d) for d in registries]
    imported = set(methods.IMPORTED)
    yield
    for d, items in zip(registries, saved):
        d.clear()
        d.update(items)
    for name in methods.IMPORTED - imported:  # as if the plugin had been imported by another process
        sys.modules.pop(name, None)
    methods.IMPORTED.intersection_update(imported)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    """The default :func:`synthetic_store` (600 test rows, d = 16, k = 5), once per test module."""
    path = tmp_path_factory.mktemp("store") / "synthetic.h5"
    synthetic_store(path)
    return path


def synthetic_store(path, *, n_test=600, n_train=60, d=16, k=5, weak_noise=1.6, text=True, seed=0,
                    encoder="synthetic", text_TxKxD=None, domain="clusters", more_weak=()):
    """A store with class clusters and noisy weak logits (the weak model is right ~60% of the time);
    ``more_weak``: ``(name, noise)`` pairs of further weak models."""
    from w2s_jax import store as st

    rng = np.random.default_rng(seed)
    centers_KxD = rng.normal(size=(k, d))

    def split(n):
        labels = rng.integers(0, k, n)
        feats = centers_KxD[labels] + 1.3 * rng.normal(size=(n, d))
        weak = {name: (2.0 * np.eye(k)[labels] + noise * rng.normal(size=(n, k))).astype(np.float32)
                for name, noise in (("noisy", weak_noise), *more_weak)}
        return st.Split(feats.astype(np.float32), labels, tuple(f"img/{i}" for i in range(n)), weak)

    prov = st.Provenance(
        dataset="synthetic", domain=domain, class_names=tuple(f"class {i}" for i in range(k)),
        templates=("a photo of a {}.",) if text else (), encoder=encoder, preprocessing="{}",
        split_hash="x", versions={}, created="now",
    )
    if text_TxKxD is None and text:
        text_TxKxD = (centers_KxD + 0.5 * rng.normal(size=(k, d)))[None].astype(np.float32)
    store = st.Store(prov, {"train": split(n_train), "test": split(n_test)}, text_TxKxD,
                     {name: {"source": "synthetic"} for name in ("noisy", *dict(more_weak))})
    st.write_store(path, store)
    return store


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Serves files from the test's folder and honours 'Range: bytes=N-'."""

    def do_GET(self):
        path = self.translate_path(self.path)
        try:
            data = open(path, "rb").read()
        except OSError:
            return self.send_error(404)
        start = int(self.headers.get("Range", "bytes=0-")[6:].rstrip("-") or 0)
        if start >= len(data) and start:
            return self.send_error(416)
        self.server.requests.append((self.path, start))  # before replying: the client may check it at once
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def mirror(tmp_path, domainnet_root):
    """A mirror with DomainNet's relative paths: real.zip and domainnet/txt/real_{train,test}.txt."""
    served = tmp_path / "served"
    (served / "domainnet" / "txt").mkdir(parents=True)
    for split in ("train", "test"):
        (served / "domainnet" / "txt" / f"real_{split}.txt").write_bytes((domainnet_root / f"real_{split}.txt").read_bytes())
    with zipfile.ZipFile(served / "real.zip", "w") as z:
        for f in (domainnet_root / "real").rglob("*.jpg"):
            z.write(f, f.relative_to(domainnet_root))
    handler = lambda *a, **k: RangeHandler(*a, directory=str(served), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.requests = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", served, server
    server.shutdown()


def fit_two_domains(folder, *extra) -> list:
    """Synthetic stores of two domains ("clusters", "shifted") and their ``w2s-fit`` folders (cpl, kd+lp,
    ceiling+lp; 2 seeds, 2 epochs); ``extra``: more w2s-fit arguments."""
    from click.testing import CliRunner

    from w2s_jax import cli as fit_cli

    fits = []
    for domain, seed in (("clusters", 0), ("shifted", 1)):
        synthetic_store(folder / f"{domain}.h5", domain=domain, seed=seed)
        r = CliRunner().invoke(fit_cli.main, ["--store", str(folder / f"{domain}.h5"), "--methods",
                                              "cpl,kd+lp,ceiling+lp", "--seeds", "2", "--epochs", "2",
                                              "--batch-size", "64", "--out", str(folder / domain), *map(str, extra)])
        assert r.exit_code == 0, r.output
        fits.append(folder / domain)
    return fits
