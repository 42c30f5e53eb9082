"""``w2s-extract``: dataset -> one HDF5 feature store. ``w2s-extract download``: fetch DomainNet."""
from __future__ import annotations

import os
import re
from pathlib import Path

import click

from extract.datasets import (DATA_ENV, DEMO_DOMAINS, DOMAINNET_DOMAINS, DatasetError, all_names,
                              check_domainnet_domain, default_data_root)
from extract.decode import DecodeError, check_decode
from extract.download import ARCHIVE_GB, DownloadError
from extract.encoders import DEMO_ENCODER, EncoderError
from extract.pipeline import ON_CORRUPT, CorruptImagesError, Options
from extract.weak import WeakModelError
from w2s_jax.store import StoreError

from w2s_jax.outputs import OutputError

USER_ERRORS = (DatasetError, EncoderError, WeakModelError, StoreError, CorruptImagesError, DownloadError, OutputError,
               DecodeError)


def default_domainnet_root() -> Path:
    return default_data_root() / "domainnet"


def infer_dataset(dataset: str | None, domain: str | None) -> str:
    """``--dataset`` when given; otherwise what ``--domain`` names (the demo when neither is given)."""
    if dataset:
        return dataset
    if domain is None or domain in DEMO_DOMAINS:
        return "demo"
    if domain in DOMAINNET_DOMAINS:
        return "domainnet"
    raise DatasetError(f"unknown domain {domain!r}: DomainNet domains are {', '.join(DOMAINNET_DOMAINS)}; demo domains "
                       f"are {', '.join(DEMO_DOMAINS)}; for an image folder pass --dataset imagefolder --root FOLDER")


def missing_domainnet_files(root: Path, domain: str) -> list[str]:
    """The parts of DomainNet's official layout for ``domain`` that ``root`` lacks."""
    wanted = [root / domain, root / f"{domain}_train.txt", root / f"{domain}_test.txt"]
    return [str(p) + ("/" if p == root / domain else "") for p in wanted if not p.exists()]


def ensure_domainnet(domain: str, root, *, download: bool, mirror: str | None, log) -> Path:
    """The DomainNet root for ``domain``, downloading the domain into the default root when it is missing there."""
    default = root is None
    root = default_domainnet_root() if default else Path(root).expanduser()
    check_domainnet_domain(domain)
    missing = missing_domainnet_files(root, domain)
    if not missing:
        return root
    command = f"w2s-extract download --domain {domain} --root {root}"
    by_hand = (f"or place the files by hand in DomainNet's official layout: {root}/{domain}/<class>/<image>.jpg, "
               f"{root}/{domain}_train.txt and {root}/{domain}_test.txt")
    if not (default and download):
        why = "--no-download was given" if default else "it is not the default data folder, so nothing is downloaded"
        raise DatasetError(f"DomainNet {domain} is missing from {root} ({', '.join(missing)}); {why}. "
                           f"Fetch it with: {command}  (about {ARCHIVE_GB[domain]} GB), {by_hand}")
    from extract.download import download_domainnet

    log(f"DomainNet {domain} is not in {root} (missing: {', '.join(missing)}).\n"
        f"Downloading it: about {ARCHIVE_GB[domain]} GB for the archive, plus the split files, into {root} "
        f"(resumable: rerun after an interruption; --no-download to refuse; ${DATA_ENV} moves the data folder).")
    try:
        return download_domainnet(domain, root, mirror)
    except DownloadError as err:
        raise DownloadError(f"{err}\nOffline? {by_hand}") from None


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_device(device: str | None) -> str:
    """``--device`` checked with the other options, before any lock or work: the default, or a torch device that
    exists here; a ValueError names the problem and the fix (a CUDA device on a machine without one, say)."""
    import torch

    if device is None:
        return default_device()
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a torch device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device torch can use; use --device cpu, or "
                         "leave --device out (cuda when present, else cpu)")
    here = available_devices()
    if kind not in here:
        known = "" if kind in COMPUTE_DEVICES else f" (w2s runs on {', '.join(COMPUTE_DEVICES)})"
        raise ValueError(f"--device {device}: not a device torch can compute on here{known}; this machine has "
                         f"{', '.join(here)}: use one of them, or leave --device out (cuda when present, else cpu)")
    return device


COMPUTE_DEVICES = ("cpu", "cuda", "mps", "xpu")  # device types that run real computation (not meta, not a backend stub)


def available_devices() -> list[str]:
    """The device types of :data:`COMPUTE_DEVICES` whose torch backend is available on this machine."""
    import torch

    checks = {"cpu": lambda: True, "cuda": torch.cuda.is_available,
              "mps": lambda: getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
              "xpu": lambda: hasattr(torch, "xpu") and torch.xpu.is_available()}
    return [kind for kind in COMPUTE_DEVICES if checks[kind]()]


def list_datasets(ctx, _param, value):
    """``--list-datasets``: every dataset by name, its size, whether it downloads by itself, its split and classes."""
    if not value or ctx.resilient_parsing:
        return
    from extract.named import listing

    click.echo("\n".join(listing()))
    click.echo("\nAlso: domainnet (--domain NAME), imagefolder (--root FOLDER) and demo (offline). A dataset by name "
               f"is read from DATA/NAME, DATA being --root or ${DATA_ENV} (default ./data).")
    ctx.exit()


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--list-datasets", is_flag=True, expose_value=False, is_eager=True, callback=list_datasets,
              help="List the datasets by name (size, download, split, classes) and exit.")
@click.option("--dataset", type=click.Choice(all_names()), default=None, metavar="NAME",
              help="demo, domainnet, imagefolder, or a dataset by name (cifar10, cifar100, imagenet, ...: "
                   "--list-datasets). [default: from --domain: a DomainNet domain means domainnet, mnist/digits or "
                   "none the demo]")
@click.option("--domain", default=None, help="DomainNet domain, demo domain (mnist, digits), or a name for an image folder.")
@click.option("--root", type=click.Path(), default=None,
              help=f"Dataset folder (not needed for the demo); for a dataset by name, the data folder that holds "
                   f"NAME/. [default: ${DATA_ENV} (./data when unset), DomainNet in its domainnet/; a missing "
                   f"dataset is downloaded there]")
@click.option("--download/--no-download", default=True, show_default=True,
              help="Download a DomainNet domain missing from the default data folder, or a dataset by name missing "
                   "from the data folder.")
@click.option("--mirror", default=None, help="Base URL of a DomainNet mirror for that download.")
@click.option("--strong", default=None,
              help=f"Strong encoder: MODEL:TAG (open_clip), MODEL:/path/ckpt, or {DEMO_ENCODER}[@SIZE]. "
                   f"[default: ViT-B-32:openai; {DEMO_ENCODER} for the demo]")
@click.option("--weak", multiple=True,
              help="Weak model NAME[:finetune|probe], repeatable (resnet18, resnet26, resnet34, cvt13, "
                   "convnext-tiny, an HF id or local dir; pixels[@S] for the demo); 'paper' = the paper's five, "
                   "fine-tuned. Without the target labels: zeroshot:MODEL:TAG (a zero-shot open_clip model) or "
                   "imagenet:MODEL[:MAPPING] (an ImageNet classifier mapped onto the classes). [default: resnet18 "
                   "(fine-tuned); pixels for the demo]")
@click.option("--out", type=click.Path(), default=None, help="Store path. [default: stores/DATASET-DOMAIN.h5]")
@click.option("--template", "templates", multiple=True,
              help="Prompt template with {} for the class; repeatable. [default: the dataset's zero-shot templates "
                   "(CLIP's) for a dataset by name, else 'a photo of a {}.']")
@click.option("--device", default=None, help="torch device [default: cuda when present, else cpu]")
@click.option("--batch-size", default=256, show_default=True)
@click.option("--num-workers", default=2, show_default=True, help="Image-decoding worker processes.")
@click.option("--on-corrupt", type=click.Choice(ON_CORRUPT), default="fail", show_default=True,
              help="Unreadable images: stop and list them, or skip them (their ids are recorded in the store).")
@click.option("--weak-epochs", default=3, show_default=True, help="Weak fine-tuning epochs (paper: 3).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Use only the first N samples of each split (quick tries).")
@click.option("--shard", default=None, metavar="I/N",
              help="Run only shard I of N of the feature pass (scheduler array jobs); then rerun without --shard "
                   "to merge. Under torchrun the ranks shard and merge by themselves.")
@click.option("--feature-dtype", type=click.Choice(["float32", "float16"]), default="float32", show_default=True,
              help="Dtype of the stored strong features (w2s-fit computes in float32 either way).")
@click.option("--decode", type=click.Choice(["cpu", "gpu", "draft"]), default="cpu", show_default=True,
              help="Decode images in the loader's workers with PIL (cpu), or decode JPEG batches and apply the "
                   "transforms on the CUDA device (gpu; other formats fall back to PIL per image), or with PIL at a "
                   "reduced DCT scale for JPEGs much larger than the models' input (draft; README: measured "
                   "difference).")
@click.pass_context
def main(ctx, dataset, domain, root, download, mirror, strong, weak, out, templates, device, batch_size, num_workers,
         on_corrupt, weak_epochs, limit, shard, feature_dtype, decode):
    """Extract strong features, text embeddings and weak logits into one feature store.

    Rerun the same command to resume an interrupted extraction. Run it again on an existing
    store with another --weak to add that weak model without re-extracting the strong features.
    """
    if ctx.invoked_subcommand is not None:
        return
    from extract import datasets, encoders, pipeline
    from extract.weak import expand_weak

    try:
        dataset = infer_dataset(dataset, domain)
    except DatasetError as err:
        raise click.UsageError(str(err)) from None
    is_demo = dataset == "demo"
    strong = strong or (DEMO_ENCODER if is_demo else "ViT-B-32:openai")
    weak = expand_weak(weak) or (["pixels"] if is_demo else ["resnet18"])
    try:
        device = resolve_device(device)
    except ValueError as err:
        raise click.UsageError(str(err)) from None
    opts = Options(device=device, batch_size=batch_size, num_workers=num_workers,
                   on_corrupt=on_corrupt, weak_epochs=weak_epochs, feature_dtype=feature_dtype,
                   shard=_parse_shard(shard), decode=decode, log=click.echo)
    try:
        check_decode(opts.decode, opts.device)
        if dataset == "domainnet":
            root = ensure_domainnet(domain, root, download=download, mirror=mirror, log=click.echo)
        data = datasets.load_dataset(dataset, domain=domain, root=root, download=download,
                                     log=click.echo).limited(limit)
        out = Path(out or f"stores/{data.name}-{data.domain}{f'-limit{limit}' if limit else ''}.h5")
        templates = templates or data.templates or encoders.DEFAULT_TEMPLATES
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            path = _extract_distributed(data, strong, weak, out, opts, templates)
        else:
            path = pipeline.extract(data, strong, weak, out, opts, templates)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    if path is not None:
        click.echo(f"wrote {path}")


def _parse_shard(text):
    if text is None:
        return None
    i, sep, n = text.partition("/")
    if not (sep and i.isdigit() and n.isdigit() and 0 <= int(i) < int(n)):
        raise click.BadParameter(f"{text!r}: expected I/N with 0 <= I < N, e.g. 0/4", param_hint="--shard")
    return int(i), int(n)


def _extract_distributed(data, strong, weak, out, opts, templates):
    """Under torchrun: each rank runs its shard of the feature pass on its own device; rank 0 merges."""
    import dataclasses

    import torch
    import torch.distributed as dist

    from extract import pipeline

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else opts.device
    failure = None
    try:
        if not out.exists():  # adding weak models to an existing store is rank 0's job alone (below)
            pipeline.extract(data, strong, weak, out, dataclasses.replace(opts, shard=(rank, world), device=device),
                             templates)
    except USER_ERRORS as err:
        failure = err
    failed = torch.tensor([failure is not None], dtype=torch.int32, device=device if cuda else "cpu")
    dist.all_reduce(failed)  # every rank learns whether any shard failed, so none waits forever
    try:
        if failure is not None:
            raise failure
        if failed.item():
            raise click.ClickException("another rank failed (see its message); finished shards are kept, rerun to resume")
        path = pipeline.extract(data, strong, weak, out, dataclasses.replace(opts, device=device), templates) \
            if rank == 0 else None
        dist.barrier()
        return path
    finally:
        dist.destroy_process_group()


@main.command()
@click.option("--domain", required=True, help="One of clipart, infograph, painting, quickdraw, real, sketch.")
@click.option("--root", type=click.Path(), required=True, help="Folder to download into.")
@click.option("--mirror", default=None, help="Base URL of a mirror with the official relative paths.")
@click.option("--sha256", "sums", multiple=True, help="FILE=DIGEST to verify a file, e.g. real.zip=ab12...")
def download(domain, root, mirror, sums):
    """Download one DomainNet domain (archive + official split files), resuming partial files."""
    from extract.download import download_domainnet

    checksums = {}
    for item in sums:
        name, sep, digest = item.partition("=")
        if not sep or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise click.BadParameter(f"{item!r}: expected FILE=<64 hex digits>", param_hint="--sha256")
        checksums[name] = digest
    try:
        path = download_domainnet(domain, root, mirror, checksums)
    except USER_ERRORS as err:
        raise click.ClickException(str(err)) from None
    click.echo(f"DomainNet {domain} is ready in {path}; next: w2s-extract --domain {domain} --root {path}")


@main.command("demo-images")
@click.option("--domain", type=click.Choice(DEMO_DOMAINS), default="digits", show_default=True)
@click.option("--count", default=100, show_default=True, help="How many test images, spread over the classes.")
@click.option("--out", type=click.Path(), required=True, help="Folder to write OUT/<class>/<id>.png into.")
def demo_images(domain, count, out):
    """Write demo test images as PNG files under class folders: a folder to try w2s-predict --images on."""
    from extract.datasets import demo

    data = demo(domain).limited(count)
    ids, labels = data.splits["test"]
    folder = Path(out)
    if folder.exists() and any(folder.iterdir()):
        raise click.ClickException(f"--out {folder} is not empty; pass a new folder")
    for sample, label in zip(ids, labels):
        path = folder / data.class_names[label] / f"{sample.replace('/', '-')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        data.load(sample).save(path)
    click.echo(f"wrote {len(ids)} {domain} test images to {folder}/<class>/; next: "
               f"w2s-predict --results RESULTS --images {folder}")


if __name__ == "__main__":
    main()
