"""The paper's DomainNet grid: its wall time on this machine, per component, from rates measured in this run.

The grid is experiments/domainnet.toml's: 6 domains x the paper's 5 weak models (fine-tuned 3 epochs, batch 512)
x every method x 5 seeds, ViT-B-32, TP included. The sizes are DomainNet's official split files (written below).
Each component's rate is measured here, at a small size, with random weights, and the estimate is work / rate:

- extraction: every train and test image through the strong encoder and the five fine-tuned weak models (their
  logits come from the same pass, pipeline._extract), at the slower of the PIL decode (one process's rate times
  --workers, assumed to scale) and the models' work;
- the weak models' fine-tuning: the five in lockstep for 3 epochs over their domain's train split, each image
  decoded once per epoch for all five (pipeline.finetune_weak), at the slower of the decode and a ResNet-18's
  train rate times five (random weights; the proxy for all five: CvT-13 and ConvNeXt-tiny are slower, so this is
  a lower bound; the inference rate is a ResNet-18's too);
- the weak models across domains ([report] cross_domain): every weak model of every other domain applied to each
  domain's test images, all in one pass per target domain (cross_weak.write_cross_weak_all), at the inference rate;
- the JAX fits: one per domain x weak model, run (measured at --fit-rows rows, run time scaled by the rows as
  padded to their size bucket, fit.bucket_size), every w2s-fit method, 5 seeds, 10 epochs, batch 512; compiled
  once per size bucket (w2s-run fits a store's weak models by one program, run.run_each, and the stores of one
  bucket share it): the first store of a bucket compiles (measured, cache empty), the others load the program
  from the compilation cache (measured: a second store of the same bucket);
- TP: every TP model (4 weak-label methods x 5 weak models + ceiling+tp, per seed; cpl+textenc per weak model and
  seed) for 10 epochs of hold_train at batch 512, at the measured time per model-step (w2s-tp's own step,
  --tp-models per step) and, for cpl+textenc, the whole tower's step.

On G GPUs (``--gpus 1,8``): the same estimate cut into w2s-run's units (``extract.units``: a domain's extraction with
its fine-tuning, its fit, its prompt tuning in min(G, 5) chunks of weak models, each chunk training its own ceiling,
each domain's cross-domain pass after every extraction), each priced by its share of its component, and scheduled on G devices
with their dependencies (``units.makespan``: never below the critical path).

Not measured here: a run of the whole grid. Usage: python benchmarks/bench_paper_grid.py [--strong ViT-B-32]
[--device cuda] [--gpus 1,8] [--json]
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import time

import numpy as np
import torch

from _common import machine, register_tiny_clip

# DomainNet's official split files ({domain}_train.txt, {domain}_test.txt): rows per domain
DOMAINNET = {"clipart": (33_525, 14_604), "infograph": (36_023, 15_582), "painting": (50_416, 21_850),
             "quickdraw": (120_750, 51_750), "real": (120_906, 52_041), "sketch": (48_212, 20_916)}
SEEDS, EPOCHS, BATCH = 5, 10, 512  # the JAX fit measured here (every w2s-fit method), as the paper grid's


@dataclasses.dataclass(frozen=True)
class Grid:
    """What the estimate counts: rows per domain (train, test), the weak models, the fits and the TP models."""

    sizes: dict  # domain -> (train rows, test rows)
    weak_models: int = 5  # fine-tuned, in lockstep
    weak_epochs: int = 3
    seeds: int = 5
    epochs: int = 10  # of every JAX fit and TP model
    tp_weak_methods: int = 4  # ce+tp, kd+tp, auxconf+tp, adaptconf+tp: per weak model and seed
    tp_ceiling: bool = True  # ceiling+tp: once per seed
    tp_textenc: bool = True  # cpl+textenc: per weak model and seed
    tp_batch: int = 512
    cross_domain: bool = True  # every weak model applied to every other domain's test images ([report] cross_domain)


PAPER = Grid(DOMAINNET)


def estimate(rates: dict, grid: Grid) -> tuple[dict, dict]:
    """``(seconds per component, work)`` of ``grid`` at ``rates``: work / rate, each pass at the slower of its
    decodes and its models' work."""
    images = sum(tr + te for tr, te in grid.sizes.values())
    train_images, test_images = sum(tr for tr, _ in grid.sizes.values()), sum(te for _, te in grid.sizes.values())
    weak_train, weak_logits = grid.weak_models * grid.weak_epochs * train_images, grid.weak_models * images
    cross = grid.weak_models * (len(grid.sizes) - 1) * test_images if grid.cross_domain else 0  # model-images
    cross_decodes = test_images if cross else 0  # every other domain's weak models in one pass per target
    tp_steps = sum(grid.epochs * math.ceil(int(0.64 * te) / grid.tp_batch) for _, te in grid.sizes.values())
    prompt_models = grid.seeds * (grid.tp_weak_methods * grid.weak_models + grid.tp_ceiling)
    textenc_models = grid.seeds * grid.weak_models * grid.tp_textenc
    decode = rates["decode_img_s"]
    from w2s_jax.fit import bucket_size  # imported here: it imports jax

    buckets = {bucket_size(te) for _, te in grid.sizes.values()}  # one compiled program each
    padded_test = sum(bucket_size(te) for _, te in grid.sizes.values())
    seconds = {
        "extraction": max(images / decode, images / rates["encoder_img_s"] + weak_logits / rates["weak_infer_img_s"]),
        "weak_finetune": max(grid.weak_epochs * train_images / decode, weak_train / rates["weak_train_img_s"]),
        "cross_domain_weak": max(cross_decodes / decode, cross / rates["weak_infer_img_s"]),
        "jax_fits_compile": len(buckets) * rates["fit_compile_s"]
        + (len(grid.sizes) - len(buckets)) * rates["fit_cache_load_s"],
        "jax_fits_run": grid.weak_models * padded_test * rates["fit_run_s_per_row"]
        * grid.seeds * grid.epochs / (SEEDS * EPOCHS),
        "tp_prompt": prompt_models * tp_steps * rates["tp_model_step_s"],
        "tp_textenc": textenc_models * tp_steps * rates["textenc_step_s"],
    }
    work = {"images": images, "weak_train_images": weak_train, "weak_logit_images": weak_logits,
            "weak_decodes": grid.weak_epochs * train_images, "weak_decodes_per_image_epoch": 1,
            "cross_domain_weak_images": cross, "cross_domain_decodes": cross_decodes, "fits": len(grid.sizes) * grid.weak_models,
            "fit_programs": len(buckets), "fit_programs_loaded": len(grid.sizes) - len(buckets),
            "fit_padded_rows": padded_test, "tp_model_steps": (prompt_models + textenc_models) * tp_steps}
    return seconds, work


def grid_units(seconds: dict, grid: Grid, chunks: int) -> list:
    """The estimate ``seconds`` (:func:`estimate`) cut into w2s-run's units (module docstring), each priced by its
    domain's share of its component; with ``chunks`` = 1 their costs add up to the estimate."""
    from extract.units import Unit, chunks as split

    train = sum(tr for tr, _ in grid.sizes.values())
    test = sum(te for _, te in grid.sizes.values())
    weaks = tuple(f"w{i}" for i in range(grid.weak_models))
    per_seed = grid.tp_weak_methods * grid.weak_models + grid.tp_ceiling  # prompt models a seed trains in one run
    out = []
    for d, (tr, te) in grid.sizes.items():
        ext = f"extract/{d}"
        out.append(Unit(ext, "extract", (), seconds["extraction"] * (tr + te) / (train + test)
                        + seconds["weak_finetune"] * tr / train))
        out.append(Unit(f"fit/{d}", "fit", (ext,), seconds["jax_fits_compile"] / len(grid.sizes)
                        + seconds["jax_fits_run"] * te / test))
        for chunk in split(weaks, chunks):
            prompt = seconds["tp_prompt"] * te / test * (grid.tp_weak_methods * len(chunk) + grid.tp_ceiling) / per_seed
            out.append(Unit(f"tp/{d}/{'+'.join(chunk)}", "tp", (ext,),
                            prompt + seconds["tp_textenc"] * te / test * len(chunk) / len(weaks)))
    for d, (_, te) in grid.sizes.items():  # every other domain's weak models on d's test images
        out.append(Unit(f"cross/{d}", "cross", tuple(f"extract/{e}" for e in grid.sizes),
                        seconds["cross_domain_weak"] * te / test))
    return out


def on_gpus(seconds: dict, grid: Grid, gpus: list[int]) -> dict:
    """``{G: (wall seconds, critical path seconds)}``: the grid's units on G devices, TP in min(G, weak models)
    chunks a domain (one on a single device, as a plain w2s-run does)."""
    from extract.units import critical_path, makespan

    out = {}
    for g in gpus:
        units = grid_units(seconds, grid, min(g, grid.weak_models))
        out[g] = (makespan(units, g), critical_path(units))
    return out


def best_of(fn, repeats: int = 3) -> float:
    fn()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def decode_rate(size: int) -> float:
    """Images/s of one process: open a JPEG of ``size`` px, convert, and the encoder's 224 px preprocessing."""
    from PIL import Image
    from torchvision import transforms as T

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, "JPEG",
                                                                                                      quality=90)
    data = buffer.getvalue()
    prep = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor()])

    def decode(n=16):
        for _ in range(n):
            prep(Image.open(io.BytesIO(data)).convert("RGB"))

    return 16 / best_of(decode)


def encoder_rate(model, device: str, batch: int, size: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def run():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.float16, enabled=device.startswith("cuda")):
            model.encode_image(x)
        sync()

    return batch / best_of(run)


def weak_rates(device: str, batch: int, tiny: bool) -> tuple[float, float]:
    """(train, inference) images/s of a ResNet-18 (random weights, 224 px; a tiny ResNet with --tiny)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8, num_labels=345) if tiny else \
        ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", num_labels=345)
    model = ResNetForImageClassification(config).to(device)
    size = 224  # the weak models' transform (weak.weak_transform), tiny or not
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 345, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    amp = dict(device_type="cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))

    def train():
        with torch.autocast(**amp):
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()

    def infer():
        with torch.no_grad(), torch.autocast(**amp):
            model(pixel_values=x)
        sync()

    return batch / best_of(train, 2), batch / best_of(infer, 2)


def fit_seconds(rows: int) -> tuple[float, float, float]:
    """(compile, run, cache load) seconds of one w2s-fit of every method, 5 seeds, 10 epochs, batch 512, at ``rows``
    x 512, K = 345 (clustered random features), with the compilation cache on in a new folder; the load is the
    compile of a second store of the same size bucket (one row apart), whose programs come from that cache."""
    import tempfile
    from pathlib import Path

    from _common import bucket_neighbour, clustered
    from w2s_jax import compile_cache
    from w2s_jax import fit as fitlib
    from w2s_jax.config import FitConfig
    from w2s_jax.methods import jax_methods
    from w2s_jax.splits import stacked_splits

    compile_cache.enable(Path(tempfile.mkdtemp(prefix="bench-paper-grid-cache-")))  # empty: the first compiles
    other = bucket_neighbour(rows)
    feats, weak, labels, text = clustered(max(rows, other), 512, 345, np.random.default_rng(0))
    cfg = FitConfig(store="x", weak="w", methods=jax_methods(), seeds=SEEDS, epochs=EPOCHS, batch_size=BATCH)
    timings = [fitlib.fit_methods(cfg, fitlib.make_data(feats[:n], weak[:n], labels[:n]), stacked_splits(n, SEEDS),
                                  text, 345)[1] for n in (rows, other)]
    return timings[0]["compile_s"], timings[0]["run_s"], timings[1]["compile_s"]


CHECK = Grid({"real": (24, 40), "sketch": (24, 38)}, weak_models=2, weak_epochs=1, seeds=2, epochs=2,
             tp_weak_methods=1)  # kd+tp; the tiny tree of --check-run: 4 classes; 38 and 40 test rows, one bucket


def check_run(rates: dict, strong: str, device: str) -> dict:
    """A tiny w2s-run of CHECK (extraction, two tiny fine-tuned weak models, every w2s-fit method, TP, cross-domain
    weak models, report) on a fake DomainNet tree: each phase's measured seconds beside the estimate of the same
    grid at this run's rates (``--strong tiny``: the models the rates were measured on), and how many of the fits'
    epoch programs XLA compiled and how many came from the compilation cache (its two stores share a size bucket)."""
    import logging
    import re
    import tempfile
    from pathlib import Path

    import open_clip
    from PIL import Image
    from transformers import ResNetConfig, ResNetForImageClassification

    from extract import experiment, pipeline, tp_cli
    from w2s_jax import run as runlib

    tmp = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    for domain, (train, test) in CHECK.sizes.items():
        for split, n in (("train", train), ("test", test)):
            lines = []
            for i in range(n):
                rel = f"{domain}/class_{i % 4}/{split}_{i:03d}.jpg"
                (tmp / "tree" / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp / "tree" / rel)
                lines.append(f"{rel} {i % 4}")
            (tmp / "tree" / f"{domain}_{split}.txt").write_text("\n".join(lines) + "\n")
    weaks = []
    for w in range(CHECK.weak_models):
        torch.manual_seed(w)
        folder = tmp / f"weak{w}"
        ResNetForImageClassification(ResNetConfig(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8,
                                                  num_labels=4)).save_pretrained(folder)
        weaks.append(f"{folder}:finetune")
    torch.save(open_clip.create_model(strong, pretrained=None).state_dict(), tmp / "strong.pt")
    (tmp / "exp.toml").write_text(f"""
out = "{tmp / 'out'}"
strong = "{strong}:{tmp / 'strong.pt'}"
[[data]]
dataset = "domainnet"
root = "{tmp / 'tree'}"
domains = {list(CHECK.sizes)}
weak = {weaks}
[fit]
methods = ["all"]
seeds = {CHECK.seeds}
epochs = {CHECK.epochs}
[tp]
methods = ["kd+tp", "ceiling+tp", "cpl+textenc"]
seeds = {CHECK.seeds}
epochs = {CHECK.epochs}
batch_size = {CHECK.tp_batch}
[extract]
num_workers = 0
device = "{device}"
weak_epochs = {CHECK.weak_epochs}
[report]
cross_domain = true
""".replace("'", '"'))
    measured = {"extraction + weak models": 0.0, "cross_domain_weak": 0.0, "jax_fits": 0.0, "tp": 0.0}

    def timed_as(phase, fn):
        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                measured[phase] += time.perf_counter() - t
        return timed

    for module, attr, phase in ((pipeline, "extract", "extraction + weak models"),
                                (experiment, "weak_across_domains", "cross_domain_weak"),
                                (runlib, "run_each", "jax_fits"), (tp_cli, "run_tp", "tp")):
        setattr(module, attr, timed_as(phase, getattr(module, attr)))
    compiler_log, logger = io.StringIO(), logging.getLogger("jax._src.compiler")  # the cache's misses and hits
    handler, level = logging.StreamHandler(compiler_log), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    t = time.perf_counter()
    try:
        experiment.run_experiment(experiment.load_experiment(tmp / "exp.toml"), log=lambda *a: None)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    total = time.perf_counter() - t
    programs = {kind: len(re.findall(pattern + r" for 'jit_epoch_program'", compiler_log.getvalue()))
                for kind, pattern in (("compiled", "PERSISTENT COMPILATION CACHE MISS"),
                                      ("loaded", "Persistent compilation cache hit"))}
    measured["the rest (report, loading)"] = total - sum(measured.values())
    seconds, _ = estimate(rates, CHECK)
    estimated = {"extraction + weak models": seconds["extraction"] + seconds["weak_finetune"],
                 "cross_domain_weak": seconds["cross_domain_weak"],
                 "jax_fits": seconds["jax_fits_compile"] + seconds["jax_fits_run"],
                 "tp": seconds["tp_prompt"] + seconds["tp_textenc"], "the rest (report, loading)": 0.0}
    return {"measured_s": measured, "estimated_s": estimated, "total_measured_s": total,
            "total_estimated_s": sum(estimated.values()), "epoch_programs": programs}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strong", default="ViT-B-32", help="open_clip config (random weights); 'tiny' for a smoke run")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--workers", type=int, default=None, help="decode processes [default: the machine's cores]")
    ap.add_argument("--photo-size", type=int, default=512, help="JPEG side of the decode measurement, px")
    ap.add_argument("--batch", type=int, default=64, help="images per batch of the encoder and weak measurements")
    ap.add_argument("--fit-rows", type=int, default=4096, help="rows of the measured JAX fit (run time scales)")
    ap.add_argument("--tp-models", type=int, default=None, help="TP models per step [default: 30 on CUDA, 1 on CPU]")
    ap.add_argument("--check-run", action="store_true", help="also run a tiny w2s-run (with --strong tiny) and print "
                    "its measured phases beside the estimate of the same tiny grid at this run's rates")
    ap.add_argument("--gpus", default="1,8", help="device counts to estimate the grid's wall time on, e.g. 1,8")
    ap.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last line")
    args = ap.parse_args()
    import os

    import open_clip

    from bench_tp import domainnet_like_names, step_seconds
    from extract.prompt import TextEncoderBank, freeze_all_but

    dev, tiny = args.device, args.strong == "tiny"
    workers = args.workers or os.cpu_count()
    tp_models = args.tp_models or (30 if dev.startswith("cuda") else 1)
    precision = "bf16" if dev.startswith("cuda") else "fp32"
    name = register_tiny_clip() if tiny else args.strong
    torch.manual_seed(0)
    model = open_clip.create_model(name, pretrained=None).to(dev).eval()
    tok = open_clip.get_tokenizer(name)
    image_size = model.visual.image_size
    image_size = image_size[0] if isinstance(image_size, tuple) else image_size

    # ---- rates measured in this run
    rates = {"decode_img_s": decode_rate(64 if tiny else args.photo_size) * workers,
             "encoder_img_s": encoder_rate(model, dev, args.batch, image_size)}
    rates["weak_train_img_s"], rates["weak_infer_img_s"] = weak_rates(dev, args.batch, tiny)
    model.visual = None
    names = domainnet_like_names(8 if tiny else 345)
    steps = 1 if tiny else 2
    tp_step = step_seconds(model, tok, names, tp_models, batch=BATCH, rows=4096, steps=steps, precision=precision,
                           device=dev)
    rates["tp_model_step_s"] = tp_step / tp_models
    text_bank = TextEncoderBank(model, tok, names).to(dev)
    groups = text_bank.param_groups([1e-5])
    freeze_all_but(text_bank, groups)  # the whole tower trains, as cpl+textenc's does
    opt = torch.optim.Adam(groups)

    def textenc_step():
        loss = text_bank().float().square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    rates["textenc_step_s"] = best_of(textenc_step, steps)
    from w2s_jax.fit import bucket_size

    fit_rows = 256 if tiny else args.fit_rows
    compile_s, run_s, rates["fit_cache_load_s"] = fit_seconds(fit_rows)
    rates["fit_compile_s"], rates["fit_run_s_per_row"] = compile_s, run_s / bucket_size(fit_rows)  # per padded row

    # ---- the grid's work, and the estimate
    seconds, work = estimate(rates, PAPER)
    total = sum(seconds.values())
    figures = {"machine": machine(), "device": dev, "strong": name, "precision": precision, "workers": workers,
               "tp_models_per_step": tp_models, "rates": rates, "seconds": seconds, "total_s": total,
               "total_h": total / 3600, "work": work}
    print(f"machine: {figures['machine']}; device {dev}, strong {name} (random weights), TP {precision}, "
          f"{tp_models} TP model(s) a step, {workers} decode workers")
    print("rates measured in this run: " + ", ".join(f"{k} {v:.4g}" for k, v in rates.items()))
    print(f"the paper's DomainNet grid ({work['images']:,} images, {work['fits']} fits by {work['fit_programs']} "
          f"compiled programs (one per size bucket; {work['fit_programs_loaded']} stores load theirs from the "
          f"compilation cache), {work['tp_model_steps']:,} TP model-steps), estimated:")
    for part, s in seconds.items():
        print(f"  {part:18s} {s / 3600:8.2f} h  ({100 * s / total:4.1f}%)")
    print(f"  {'total':18s} {total / 3600:8.2f} h   (north star: 2 h on one H200)")
    spread = on_gpus(seconds, PAPER, [int(g) for g in args.gpus.split(",")])
    figures["on_gpus"] = {g: {"wall_h": wall / 3600, "critical_path_h": path / 3600} for g, (wall, path) in
                          spread.items()}
    base = spread[min(spread)][0]
    for g, (wall, path) in spread.items():
        print(f"  on {g} device(s): {wall / 3600:8.2f} h, {wall / base:.3f} of {min(spread)} (critical path "
              f"{path / 3600:.2f} h; w2s-run's units, TP in {min(g, PAPER.weak_models)} chunk(s) a domain)")
    if args.check_run:
        if not tiny:
            raise SystemExit("--check-run runs the tiny models the rates were measured on: add --strong tiny")
        check = figures["check_run"] = check_run(rates, name, dev)
        print("check: a tiny w2s-run (2 domains x 24 + 40 images, 2 tiny weak models, every w2s-fit method, TP), "
              "measured against its estimate at this run's rates:")
        for phase, s in check["measured_s"].items():
            est = check["estimated_s"][phase]
            print(f"  {phase:26s} measured {s:7.2f} s, estimated {est:7.2f} s"
                  + (f"  (measured / estimated {s / est:.2f})" if est else "  (not estimated)"))
        print(f"  {'total':26s} measured {check['total_measured_s']:7.2f} s, estimated "
              f"{check['total_estimated_s']:7.2f} s: at this size, fixed costs the estimate leaves out (model "
              "loads, worker start, each program's compile, the report) dominate")
        programs = check["epoch_programs"]
        print(f"  the fits' epoch programs: {programs['compiled']} compiled by XLA, {programs['loaded']} loaded from "
              f"the compilation cache ({len(CHECK.sizes)} stores of {sorted(te for _, te in CHECK.sizes.values())} "
              "test rows, one size bucket)")
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
