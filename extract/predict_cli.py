"""``w2s-predict``: classify new data with the heads a fit saved (:mod:`w2s_jax.saved_heads`).

- ``--store S``: the features of a store made by the same encoder, for the same classes (any domain);
- ``--images FOLDER``: image files, encoded here by the strong encoder recorded in the results folder, with
  the preprocessing recorded there (a mismatch is refused). A file under a folder named like a class
  (``FOLDER/<class>/...``) is labelled with that class, so accuracy is printed for it;
- ``--export-prototypes FILE.npy``: a prototype head's ``K x D`` unit-norm class weights, for open_clip.

Predictions go to a CSV (one row per sample) or an ``.npz`` (adds the full logits and probabilities).
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import NamedTuple

import click
import numpy as np

from extract import encoders
from extract.datasets import IMAGE_SUFFIXES, FileLoader, is_hidden
from w2s_jax import outputs
from w2s_jax.methods import import_plugins
from w2s_jax.saved_heads import HeadsError, SavedHead, load_heads, read_index, read_json
from w2s_jax.store import StoreError, read_store, rows_differ, rows_record


class Predictions(NamedTuple):
    ids: tuple[str, ...]  # store sample ids, or image paths relative to the folder
    logits_NxK: np.ndarray  # NaN rows for unreadable images
    labels_N: np.ndarray  # ground truth, -1 where unknown
    readable_N: np.ndarray  # False for an image that could not be read
    store: object = None  # the Provenance of the store the rows came from; None for images
    rows: dict | None = None  # the store split's rows_record (count, ids and content hashes); None for images


def choose_head(results_dir, method: str) -> SavedHead:
    """The saved head of ``method``; a HeadsError if the folder has none, or was fit with an ``--import`` that is
    not given here (:func:`w2s_jax.saved_heads.check_imports`)."""
    index = read_index(results_dir)
    heads = load_heads(results_dir, methods=(method,))
    if method not in heads:
        raise HeadsError(f"{results_dir} has no saved {method!r} head; saved: {', '.join(index['methods'])} (--method)")
    return heads[method]


def check_features_match(head: SavedHead, encoder: str, class_names, dim: int, where: str) -> None:
    """Refuse features of another encoder, class list or dimension than the head's, naming which."""
    if encoder != head.encoder:
        raise HeadsError(f"{where} holds features of {encoder}, but the heads were fit on {head.encoder}; "
                         "use a store made with the same --strong")
    if tuple(class_names) != head.class_names:
        raise HeadsError(f"{where} has another class list ({len(class_names)} classes: "
                         f"{', '.join(list(class_names)[:5])}, ...) than the heads ({len(head.class_names)}: "
                         f"{', '.join(head.class_names[:5])}, ...); predict on data of the same classes")
    if dim != head.feature_dim:
        raise HeadsError(f"{where} has {dim}-d features, the heads take {head.feature_dim}-d")


def predict_store(head: SavedHead, store_path, split: str, seed: int, grid_index) -> Predictions:
    store = read_store(store_path)
    if split not in store.splits:
        raise StoreError(store_path, f"no split {split!r}", f"choose one of {', '.join(store.splits)}")
    rows = store.splits[split]
    check_features_match(head, store.provenance.encoder, store.provenance.class_names, rows.features_NxD.shape[1],
                         f"store {store_path}")
    logits = head.logits(rows.features_NxD, seed, grid_index)
    return Predictions(rows.ids_N, logits, np.asarray(rows.labels_N), np.ones(len(rows.ids_N), bool), store.provenance,
                       rows_record(rows))


def list_images(folder: Path, class_names) -> tuple[tuple[str, ...], np.ndarray]:
    """Image files under ``folder`` (recursive, hidden ones skipped), sorted, and their labels: the class whose
    name (``_`` read as a space) is the first folder of the path, else -1."""
    index = {name: i for i, name in enumerate(class_names)}
    ids = sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                 if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                 and not any(is_hidden(part) for part in p.relative_to(folder).parts))
    labels = [index.get(Path(i).parts[0].replace("_", " "), -1) if len(Path(i).parts) > 1 else -1 for i in ids]
    return tuple(ids), np.asarray(labels, np.int64)


def encode_folder(encoder, folder: Path, ids, batch_size: int, num_workers: int, device: str):
    """Strong features of the images ``ids``: (features_NxD with NaN rows for unreadable images, readable_N)."""
    import torch
    from tqdm.auto import tqdm

    from extract.pipeline import ImageSource, Options

    batches = [list(range(b, min(len(ids), b + batch_size))) for b in range(0, len(ids), batch_size)]
    source = ImageSource(FileLoader(str(folder)), {"strong": [encoder.transform]},
                         Options(device=device, num_workers=num_workers))
    feats, readable = None, np.zeros(len(ids), bool)
    with source, torch.no_grad(), tqdm(total=len(ids), desc="encoding", unit="img", disable=None) as bar:
        for index, inputs, bad in source.read("strong", ids, batches):
            if len(index):
                out = encoder.encode_images(inputs[0].to(device)).float().cpu().numpy()
                feats = np.full((len(ids), out.shape[1]), np.nan, np.float32) if feats is None else feats
                feats[index.numpy()] = out
                readable[index.numpy()] = True
            bar.update(len(index) + len(bad))
    return feats, readable


def predict_images(head: SavedHead, results_dir, folder, seed: int, grid_index, *, checkpoint=None, device="cpu",
                   batch_size: int = 64, num_workers: int = 0) -> Predictions:
    folder = Path(folder)
    if not folder.is_dir():
        raise HeadsError(f"--images {folder}: no such folder")
    ids, labels = list_images(folder, head.class_names)
    if not ids:
        raise HeadsError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it or below it")
    provenance = read_json(Path(results_dir) / "provenance.json", "the results folder's record of its store")
    encoder = encoders.load_strong(encoders.spec_for_id(head.encoder, checkpoint), device)
    if encoder.preprocessing != provenance["preprocessing"]:
        raise HeadsError(f"the encoder's preprocessing here ({encoder.preprocessing}) is not the one the store "
                         f"recorded ({provenance['preprocessing']}); install the package versions in "
                         f"{Path(results_dir) / 'provenance.json'} (versions)")
    feats, readable = encode_folder(encoder, folder, ids, batch_size, num_workers, device)
    if feats is None:
        raise HeadsError(f"--images {folder}: none of the {len(ids)} image(s) could be read")
    check_features_match(head, encoder.id, head.class_names, feats.shape[1], f"encoder {encoder.id}")
    logits = np.full((len(ids), len(head.class_names)), np.nan, np.float32)
    logits[readable] = head.logits(feats[readable], seed, grid_index)
    return Predictions(ids, logits, labels, readable)


def softmax(logits_NxK):
    z = logits_NxK - np.max(logits_NxK, axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def write_predictions(path: Path, preds: Predictions, class_names) -> None:
    """CSV: id, status, predicted index and class, its probability, label; .npz: also the logits and probabilities."""
    probs = softmax(preds.logits_NxK)
    pred = np.where(preds.readable_N, np.nan_to_num(preds.logits_NxK, nan=-np.inf).argmax(1), -1)
    if path.suffix == ".npz":
        np.savez(path, ids=np.asarray(preds.ids), logits_NxK=preds.logits_NxK, probabilities_NxK=probs,
                 predicted_N=pred, labels_N=preds.labels_N, readable_N=preds.readable_N,
                 class_names=np.asarray(class_names))
        return
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "status", "predicted", "class", "probability", "label"])
        for i, sample in enumerate(preds.ids):
            label = int(preds.labels_N[i]) if preds.labels_N[i] >= 0 else ""
            if not preds.readable_N[i]:
                w.writerow([sample, "unreadable", "", "", "", label])
                continue
            w.writerow([sample, "ok", int(pred[i]), class_names[pred[i]], f"{probs[i, pred[i]]:.6f}", label])


def accuracy_lines(preds: Predictions, head: SavedHead, results_dir, split, seed, grid_index) -> list[str]:
    """Accuracy where labels exist; on the fit's own store (the same rows, by count and a hash of the ids), also
    on this seed's test' beside what the fit reported; on a store that differs, a line says why not."""
    known = (preds.labels_N >= 0) & preds.readable_N
    if not known.any():
        return []
    hits = preds.logits_NxK.argmax(1) == preds.labels_N
    lines = [f"accuracy on the {int(known.sum()):,} labelled row(s): {100 * hits[known].mean():.2f}%"]
    results_dir = Path(results_dir)
    fitted = read_json(results_dir / "provenance.json", "the results folder's record of its store")
    here = preds.store
    if here is None or split != "test" or \
            (here.dataset, here.domain, here.split_hash) != (fitted["dataset"], fitted["domain"], fitted["split_hash"]):
        return lines
    why = rows_differ(fitted.get("test_rows"), preds.rows)
    if why:
        return lines + [f"test' accuracy not compared with the fit's: {why}"]
    rows = np.load(results_dir / "splits.npz")["test_prime"][seed]
    summary = read_json(results_dir / "metrics.json", "the fit's metrics")["methods"].get(head.method)
    h = head.selected if grid_index is None else grid_index
    reported = f" (the fit reported {100 * summary['grid']['test_acc'][seed][h]:.2f}%)" if summary else ""
    lines.append(f"test' accuracy of seed {seed} ({len(rows):,} rows held out by the fit): "
                 f"{100 * hits[rows].mean():.2f}%{reported}")
    return lines


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--results", "results_dir", type=click.Path(), required=True, help="A results folder of w2s-fit or w2s-tp.")
@click.option("--store", type=click.Path(), default=None, help="Classify the rows of this feature store.")
@click.option("--split", default="test", show_default=True, help="With --store: which split.")
@click.option("--images", type=click.Path(), default=None, help="Classify the image files under this folder.")
@click.option("--export-prototypes", type=click.Path(), default=None,
              help="Write the prototype head's K x D unit-norm class weights to this .npy file (for open_clip).")
@click.option("--method", default="cpl", show_default=True, help="Which saved head.")
@click.option("--seed", default=0, show_default=True, help="Which seed's head.")
@click.option("--grid-index", type=int, default=None, help="Which grid point. [default: the one chosen on hold_val]")
@click.option("--out", type=click.Path(), default=None,
              help="Predictions file, .csv or .npz. [default: predictions-METHOD-seedS.csv]")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out file.")
@click.option("--checkpoint", type=click.Path(), default=None,
              help="With --images, for heads fit on an encoder loaded from a local checkpoint: that file.")
@click.option("--device", default=None, help="With --images. [default: cuda when present]")
@click.option("--batch-size", default=64, show_default=True, help="With --images.")
@click.option("--num-workers", default=2, show_default=True, help="With --images: image decoding processes.")
@click.option("--import", "plugins", multiple=True, metavar="MODULE",
              help="Import the module that registered your own heads (as given to w2s-fit --import).")
@click.option("--allow-replace", is_flag=True,
              help="Let an --import module replace a head, method or loss row registered before it (refused otherwise).")
def main(results_dir, store, split, images, export_prototypes, method, seed, grid_index, out, overwrite, checkpoint,
         device, batch_size, num_workers, plugins, allow_replace):
    """Classify a store's rows or a folder of images with a head saved by w2s-fit, or export its prototypes."""
    from extract.cli import resolve_device

    if sum(x is not None for x in (store, images, export_prototypes)) != 1:
        raise click.UsageError("give exactly one of --store, --images and --export-prototypes")
    target = Path(export_prototypes or out or f"predictions-{method}-seed{seed}.csv")
    wanted = ".npy" if export_prototypes else (".csv", ".npz")
    if target.suffix not in wanted:
        raise click.UsageError(f"{target}: the file must end in {' or '.join(np.atleast_1d(wanted))}")
    try:
        device = resolve_device(device) if images else device
        import_plugins(plugins, allow_replace)
        outputs.check_output(target, folder=False)
        if not target.parent.is_dir():
            raise outputs.OutputError(f"{target}: the folder {target.parent} does not exist; make it first, or write "
                                      "elsewhere")
        if target.exists() and not overwrite:
            again = "--export-prototypes path" if export_prototypes else "--out"
            raise outputs.OutputError(f"{target} exists; pass --overwrite to replace it, or another {again}")
        head = choose_head(results_dir, method)
        head.check_usable(seed, grid_index)  # a failed model's parameters are not a model
        if export_prototypes:
            np.save(target, head.prototypes(seed, grid_index).astype(np.float32))
            click.echo(f"wrote the {len(head.class_names)} x {head.feature_dim} prototypes of {method} (seed {seed}) "
                       f"to {target}; logits = {head.hparams(grid_index).logit_scale:g} * normalize(features) @ P.T")
            return
        if store:
            preds = predict_store(head, store, split, seed, grid_index)
        else:
            preds = predict_images(head, results_dir, images, seed, grid_index, checkpoint=checkpoint,
                                   device=device, batch_size=batch_size, num_workers=num_workers)
        lines = accuracy_lines(preds, head, results_dir, split, seed, grid_index)  # every file read before writing
        write_predictions(target, preds, head.class_names)
    except ValueError as err:  # HeadsError, StoreError, EncoderError, OutputError are ValueErrors
        raise click.ClickException(str(err)) from None
    click.echo(f"wrote {len(preds.ids):,} prediction(s) of {method} (seed {seed}) to {target}")
    if not preds.readable_N.all():
        bad = [i for i, ok in zip(preds.ids, preds.readable_N) if not ok]
        click.echo(f"{len(bad)} unreadable image(s), marked 'unreadable': {', '.join(bad[:10])}"
                   + (" ..." if len(bad) > 10 else ""))
    for line in lines:
        click.echo(line)


if __name__ == "__main__":
    main()
