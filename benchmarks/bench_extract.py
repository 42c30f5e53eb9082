"""Extraction pipeline efficiency: end-to-end w2s-extract images/s on a synthetic JPEG folder against
encoder-only forward passes on the same preprocessed tensors (same tiny random open_clip model), with the start-up
(model load, worker start to the first batch) reported apart from the steady-state rate of the image pass.
Also: HDF5 write time, and what float16 feature storage saves.
Each figure is printed as soon as it is measured. The JPEG folder is written once per (images, classes, size) and
reused by later runs (``--jpegs``; gpu_check.sh's CPU- and GPU-decode steps share it).
Usage: python benchmarks/bench_extract.py [--images 1024] [--workers 2] [--batch 64] [--model ViT-B-32] [--decode gpu]
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from _common import machine, register_tiny_clip, timed
from extract import encoders, pipeline
from extract.datasets import load_dataset
from w2s_jax import store as st


def make_folder(root: Path, n: int, classes: int = 10, size: int = 256) -> None:
    """``n`` random JPEGs in ``train/`` (a quarter) and ``test/``, each split holding every class (the image-folder
    loader refuses splits with different class sets)."""
    if n < 4 * classes:
        raise SystemExit(f"--images {n}: give at least 4 x --classes ({4 * classes}) so that both splits hold every class")
    rng = np.random.default_rng(0)
    for i in range(n):
        split = "train" if (i // classes) % 4 == 0 else "test"
        path = root / split / f"class_{i % classes}" / f"{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, quality=90)


def jpeg_folder(root: Path | None, n: int, classes: int, size: int) -> Path:
    """The benchmark's JPEGs: ``root`` (default a folder named by the sizes in the temp dir), written unless a run
    before wrote it whole (its ``done`` marker), so that steps share one folder."""
    root = root or Path(tempfile.gettempdir()) / f"w2s-bench-jpegs-{n}-{classes}-{size}"
    if not (root / "done").exists():
        t = time.perf_counter()
        make_folder(root, n, classes, size)
        (root / "done").write_text(f"{n} {classes} {size}\n")
        print(f"wrote {n} JPEGs to {root} in {time.perf_counter() - t:.1f} s (reused by later runs)", flush=True)
    return root


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--size", type=int, default=256, help="JPEG side in pixels")
    ap.add_argument("--model", default="", help="open_clip config with random weights (default: a tiny one)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--decode", choices=["cpu", "gpu", "draft"], default="cpu",
                    help="how the JPEGs are decoded (w2s-extract --decode)")
    ap.add_argument("--jpegs", type=Path, default=None, help="folder of the JPEGs, written once and reused "
                    "[default: w2s-bench-jpegs-IMAGES-CLASSES-SIZE in the temp dir]")
    args = ap.parse_args()
    import open_clip

    tmp = Path(tempfile.mkdtemp())
    images = jpeg_folder(args.jpegs, args.images, args.classes, args.size)
    name = args.model or register_tiny_clip(image_size=96, vision_width=192, layers=4)
    torch.manual_seed(0)
    ckpt = tmp / "weights.pt"
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), ckpt)
    spec = f"{name}:{ckpt}"
    data = load_dataset("imagefolder", domain=None, root=str(images))
    print(f"machine: {machine()}; device {args.device}; model {name} (random weights), {args.images} JPEGs {args.size}px, "
          f"batch {args.batch}, {args.workers} workers, decode on {args.decode}", flush=True)
    opts = pipeline.Options(device=args.device, batch_size=args.batch, num_workers=args.workers, log=lambda *a: None,
                            decode=args.decode)

    # end to end: decode + preprocess + encode + weak probe + text + HDF5 write
    t = time.perf_counter()
    out = pipeline.extract(data, spec, ["pixels@4"], tmp / "e2e.h5", opts)
    e2e = args.images / (time.perf_counter() - t)
    print(f"end-to-end w2s-extract: {e2e:.1f} img/s (start-up, weak models, text and HDF5 included)", flush=True)

    # start-up apart from the steady state: the strong encoder's image pass over every image, as run_pass runs it
    t = time.perf_counter()
    enc = encoders.load_strong(spec, args.device)
    model_load = time.perf_counter() - t
    ids = [i for s in ("train", "test") for i in data.splits[s][0]]
    batches = [list(range(b, min(len(ids), b + args.batch))) for b in range(0, len(ids), args.batch)]
    t = time.perf_counter()
    source = pipeline.ImageSource(data.load, {"strong": [enc.transform]}, opts)
    loader = source.read("strong", ids, batches)
    next(loader)  # the first batch: worker start and the first decode (not counted in the steady state)
    first_batch = time.perf_counter() - t
    t, done = time.perf_counter(), 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=args.device.startswith("cuda")):
        for index, inputs, _ in loader:
            enc.encode_images(inputs[0].to(args.device, non_blocking=True)).float().cpu()
            done += len(index)
    steady = done / (time.perf_counter() - t) if done else float("nan")
    t = time.perf_counter()
    source.close()
    close = time.perf_counter() - t
    print(f"start-up: model load {model_load:.2f} s, workers to the first batch {first_batch:.2f} s; "
          f"steady state of the image pass after the first batch: {steady:.1f} img/s over {done} images; "
          f"stopping the workers {close:.2f} s", flush=True)

    # encoder only, on the same images already decoded and preprocessed
    x = torch.stack([enc.transform(data.load(i)) for s in ("train", "test") for i in data.splits[s][0]])
    x = x.to(args.device)
    use_amp = args.device.startswith("cuda")

    def encode_all():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
            for batch in x.split(args.batch):
                enc.encode_images(batch).float().cpu()

    encode_all()
    encoder_only = args.images / timed(encode_all, repeats=2)
    print(f"encoder only: {encoder_only:.1f} img/s; steady-state efficiency (steady / encoder-only): "
          f"{steady / encoder_only:.2f}; pipeline efficiency (end-to-end / encoder-only): {e2e / encoder_only:.2f}",
          flush=True)

    # HDF5 write time and float16 storage
    store = st.read_store(out)
    half = dataclasses.replace(store, splits={s: dataclasses.replace(sp, features_NxD=sp.features_NxD.astype(np.float16))
                                              for s, sp in store.splits.items()})
    w32 = timed(lambda: st.write_store(tmp / "f32.h5", store), repeats=3)
    w16 = timed(lambda: st.write_store(tmp / "f16.h5", half), repeats=3)
    size32, size16 = (tmp / "f32.h5").stat().st_size, (tmp / "f16.h5").stat().st_size
    err = np.abs(half.splits["test"].features_NxD.astype(np.float32) - store.splits["test"].features_NxD).max()

    print(f"HDF5 write: float32 {w32 * 1e3:.1f} ms ({size32 / 1e6:.2f} MB), float16 {w16 * 1e3:.1f} ms "
          f"({size16 / 1e6:.2f} MB, {size16 / size32:.2f}x size; max abs feature error {err:.2e})", flush=True)


if __name__ == "__main__":
    main()
