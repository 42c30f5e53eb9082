"""What an adversarial try found: no stale, overwritten or silently wrong results, and clear errors for bad input."""
import json
import subprocess
import sys

import h5py
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import synthetic_store
from extract import cli as extract_cli
from extract import experiment, pipeline
from extract.datasets import DatasetError, FileLoader, load_dataset
from w2s_jax import cli, outputs, report, results
from w2s_jax.config import FitConfig, Hparams
from w2s_jax.run import run
from w2s_jax.store import StoreError, read_store

FAST = dict(seeds=2, epochs=2, batch_size=64)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "s.h5"
    synthetic_store(path, n_test=300)
    return path


def fit(*args):
    return CliRunner().invoke(cli.main, [*map(str, args)])


# ------------------------------------------------------------------ 3. numbers are validated before any work


@pytest.mark.parametrize("args, message", [
    (("--epochs", "0"), "epochs = 0 is out of range; valid: [1, inf]"),
    (("--epochs", "-1"), "epochs = -1 is out of range"),
    (("--lr", "nan"), "lr = nan is out of range; valid: (0, inf)"),
    (("--lr", "-1"), "lr = -1.0 is out of range"),
    (("--temperature", "0"), "temperature = 0.0 is out of range"),
    (("--seeds", "0"), "seeds = 0 is out of range"),
    (("--seeds", "-3"), "seeds = -3 is out of range"),
    (("--batch-size", "0"), "expected 'auto' or a positive integer"),
    (("--lp-shrinkage", "2"), "lp_shrinkage = 2.0 is out of range; valid: [0, 1]"),
    (("--grid", "lr=1e-2,-1"), "grid lr = -1.0 is out of range"),
    (("--grid", "lr=1e-2", "--grid", "lr=1e-3"), "lr is given twice"),
])
def test_nonsense_numbers_are_refused_with_the_valid_range(store_path, tmp_path, args, message):
    r = fit("--store", store_path, "--out", tmp_path / "res", *args)
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "res").exists()


def test_a_non_finite_training_loss_is_a_named_failure_never_an_accuracy(store_path, tmp_path):
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("cpl", "kd+lp", "ceiling+proto"),
                    hparams=Hparams(logit_scale=1e38), **FAST)  # cosine logits x 1e38 overflow
    summary, _ = run(cfg, tmp_path / "res")
    assert summary["methods"]["cpl"]["failed"] and not summary["methods"]["kd+lp"]["failed"]
    assert "cpl" not in summary["pgr"]
    rows = dict((r[0], r[1]) for r in results.table_rows(summary))
    assert rows["cpl"] == results.FAILED and rows["kd+lp"] != results.FAILED


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("seeds = 2", 'seeds = "five"'), "[fit] seeds = 'five' should be a whole number"),
    # issue 25: wrong types are caught by the typed schema, naming the key (before: "'float' object is not
    # iterable", or a string read letter by letter as "unknown demo domain 'm'")
    (lambda t: t + "[fit.grid]\nlr = 0.1\n", "[fit.grid] lr = 0.1 should be a list"),
    (lambda t: t.replace('domains = ["mnist"]', 'domains = "mnist"'), "domains = 'mnist' should be a list"),
    (lambda t: t.replace("limit = 120", "limit = -5"), "limit = -5 should be a positive whole number"),
    (lambda t: t.replace("limit = 120", 'limit = "ten"'), "limit = 'ten' should be a whole number"),
    (lambda t: t.replace('methods = ["cpl", "kd+lp", "ceiling+proto"]', "methods = []"), "no methods to fit"),
    (lambda t: t.replace("epochs = 2", "epochs = 0"), "epochs = 0 is out of range"),
    (lambda t: t + 'feature_dtype = "int8"\n', "feature_dtype = 'int8'; valid: float32, float16"),
    (lambda t: t.replace('domains = ["mnist"]', 'domains = ["../escape"]'), "'../escape' becomes part of a path"),
])
def test_bad_experiment_values_are_refused_before_any_work(tmp_path, edit, message):
    from test_experiment import TOML

    path = tmp_path / "exp.toml"
    path.write_text(edit(TOML.format(out=tmp_path / "out")))
    r = CliRunner().invoke(experiment.main, [str(path)])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------- 1, 6, 11. results: never stale, overwritten or half


def test_report_shows_only_the_current_experiment(tmp_path):
    from test_experiment import TOML

    path = tmp_path / "exp.toml"
    path.write_text(TOML.format(out=tmp_path / "out"))
    quiet = dict(log=lambda *a: None)
    experiment.run_experiment(experiment.load_experiment(path), **quiet)
    path.write_text(TOML.format(out=tmp_path / "out").replace("epochs = 2", "epochs = 3"))
    rep = experiment.run_experiment(experiment.load_experiment(path), **quiet)
    fits = sorted((tmp_path / "out" / "results").rglob("fit-*/metrics.json"))
    assert len(fits) == 6  # 3 fits (2 weak models + the multi-weak one) x 2 configs stay on disk for the skip logic ...
    sources = (rep / "sources.md").read_text()
    assert sources.count("fit-") == 3 and "epochs=3" in sources and "epochs=2" not in sources  # ... but not here
    new = [f.parent for f in fits if json.loads((f.parent / "config.json").read_text())["epochs"] == 3]
    table = (rep / "table2-pixels@2.md").read_text()
    cpl = next(json.loads((f / "metrics.json").read_text())["methods"]["cpl"]["test_acc"]
               for f in new if f.parent.name == "pixels@2")
    assert f"{100 * np.mean(cpl):.2f} ± {100 * np.std(cpl):.2f}" in table


def test_results_of_another_config_are_not_replaced_without_overwrite(store_path, tmp_path):
    out = tmp_path / "res"
    assert fit("--store", store_path, "--out", out, "--methods", "cpl", "--seeds", "2", "--epochs", "2").exit_code == 0
    before = (out / "metrics.json").read_text()
    r = fit("--store", store_path, "--out", out, "--methods", "cpl", "--seeds", "2", "--epochs", "3")
    assert r.exit_code != 0 and "another config (differs in: epochs)" in r.output and "--overwrite" in r.output
    assert (out / "metrics.json").read_text() == before
    r = fit("--store", store_path, "--out", out, "--methods", "cpl", "--seeds", "2", "--epochs", "3", "--overwrite")
    assert r.exit_code == 0 and json.loads((out / "config.json").read_text())["epochs"] == 3
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("precious")
    r = fit("--store", store_path, "--out", other, "--methods", "cpl", "--overwrite")
    assert r.exit_code != 0 and "holds no w2s results" in r.output and (other / "notes.txt").exists()


def test_a_concurrent_writer_gets_a_lock_error(store_path, tmp_path):
    out = tmp_path / "res"
    with outputs.exclusive(out):
        r = fit("--store", store_path, "--out", out, "--methods", "cpl")
    assert r.exit_code != 0 and "another process is writing" in r.output


def test_a_killed_write_leaves_no_folder_that_reads_as_results(store_path, tmp_path, monkeypatch):
    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the write stops halfway, as a kill would stop it

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        run(FitConfig(store=str(store_path), weak="noisy", methods=("cpl",), **FAST), tmp_path / "res")
    assert not (tmp_path / "res").exists()
    assert fit("--show", tmp_path / "res").exit_code != 0
    with pytest.raises(FileNotFoundError, match="no results folders"):
        report.discover([tmp_path])  # the half-written staging folder is never read


@pytest.mark.parametrize("make, message", [
    (lambda p: p.write_text("a file"), "is a file; pass a folder"),
])
def test_out_is_checked_before_the_fit(store_path, tmp_path, make, message):
    make(tmp_path / "res")
    r = fit("--store", store_path, "--out", tmp_path / "res", "--methods", "cpl")
    assert r.exit_code != 0 and message in r.output


def test_unwritable_out_is_refused_before_any_work(store_path, tmp_path, monkeypatch):
    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    r = fit("--store", store_path, "--out", tmp_path / "res", "--methods", "cpl")
    assert r.exit_code != 0 and "cannot write under" in r.output and "Permission denied" in r.output


# ---------------------------------------------------------------------- 2, 13. stores


def test_a_locked_store_gets_its_own_message_not_delete_advice(store_path):
    holder = subprocess.Popen([sys.executable, "-c", f"import h5py, time; f = h5py.File({str(store_path)!r}, 'r+'); "
                               "print('open', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(StoreError) as err:
            read_store(store_path)
        assert "another process is writing this store" in str(err.value) and "delete" not in str(err.value)
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("dtype", ["int32", "S8"])
def test_weak_logits_of_a_non_float_dtype_are_refused_by_name(tmp_path, dtype):
    path = tmp_path / "s.h5"
    synthetic_store(path, n_test=50)
    with h5py.File(path, "r+") as f:
        shape = f["splits/test/weak/noisy_NxK"].shape
        del f["splits/test/weak/noisy_NxK"]
        f["splits/test/weak/noisy_NxK"] = np.zeros(shape, dtype)
    with pytest.raises(StoreError, match="weak 'noisy' logits have dtype .*expected float"):
        read_store(path)


# ------------------------------------------------------------------- 4, 5, 8, 9, 12. datasets and images


def test_image_folders_skip_hidden_and_refuse_empty_or_mismatched_classes(imagefolder_root):
    for junk in ("train/.ipynb_checkpoints", "test/.ipynb_checkpoints", "train/__MACOSX", "test/__MACOSX"):
        (imagefolder_root / junk).mkdir()
    ds = load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    assert ds.class_names == ("cat", "hot air balloon", "zebra")
    (imagefolder_root / "train" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"only in train/: \['dog'\]; only in test/: \[\]"):
        load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    (imagefolder_root / "test" / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"with no images.*\['train/dog', 'test/dog'\]"):
        load_dataset("imagefolder", domain=None, root=str(imagefolder_root))


def test_sixteen_bit_greyscale_is_scaled_not_saturated(tmp_path):
    pixels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(pixels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(FileLoader(str(tmp_path))("deep.png"))
    assert rgb.shape == (64, 64, 3) and rgb.max() == 255 and rgb.min() == 0
    assert abs(rgb[..., 0].mean() - 127.5) < 2  # a ramp stays a ramp (today: 99.7% of pixels at 255)


def test_a_decompression_bomb_is_an_unreadable_image(imagefolder_root, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # our 40x40 images are then over twice the limit
    ds = load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    item = pipeline.ImageDataset(ds.load, {"pass": [lambda im: im]})[("pass", ds.splits["test"][0][0], 0)]
    assert item == (0, None)


def test_limit_takes_a_seeded_stratified_sample(imagefolder_root):
    ds = load_dataset("imagefolder", domain=None, root=str(imagefolder_root))  # ids sorted by class folder
    small = ds.limited(6)
    ids, labels = small.splits["test"]
    assert len(ids) == 6 and np.bincount(labels).tolist() == [2, 2, 2]  # path order would give 6 cats
    assert small.split_hash == ds.limited(6).split_hash != ds.split_hash  # seeded: the same sample every time
    assert list(ids) == sorted(ids, key=ds.splits["test"][0].index)  # kept in the original order


def test_the_corrupt_image_list_covers_every_split(imagefolder_root, tiny_clip, tmp_path):
    for rel in ("train/cat/000.jpg", "test/zebra/001.jpg"):
        (imagefolder_root / rel).write_bytes(b"broken")
    r = CliRunner().invoke(extract_cli.main, ["--num-workers", "0", "--batch-size", "4", "--dataset", "imagefolder",
                                              "--root", str(imagefolder_root), "--strong", tiny_clip, "--weak",
                                              "pixels@2", "--out", str(tmp_path / "s.h5")])
    assert r.exit_code != 0 and "2 unreadable image(s)" in r.output
    assert "train/cat/000.jpg" in r.output and "test/zebra/001.jpg" in r.output


# ------------------------------------------------------------------------------ 10. extraction outputs


def test_extraction_out_and_lock_are_checked_before_work(tmp_path):
    (tmp_path / "dir.h5").mkdir()
    r = CliRunner().invoke(extract_cli.main, ["--dataset", "demo", "--out", str(tmp_path / "dir.h5")])
    assert r.exit_code != 0 and "is a folder; pass a file path" in r.output
    out = tmp_path / "s.h5"
    with outputs.exclusive(out):
        r = CliRunner().invoke(extract_cli.main, ["--dataset", "demo", "--out", str(out)])
    assert r.exit_code != 0 and "another process is writing" in r.output and "Traceback" not in r.output


def test_a_cuda_device_without_cuda_is_refused_before_any_lock_or_work(tmp_path, tiny_clip, store_path):
    """Issue 31 (12): --device cuda on a machine without CUDA is an option error (w2s-extract, w2s-tp, w2s-predict,
    [extract] device), not torch's driver traceback after the lock files were made."""
    import torch

    from extract import predict_cli, tp_cli

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "s.h5"
    r = CliRunner().invoke(extract_cli.main, ["--dataset", "demo", "--device", "cuda", "--out", str(out)])
    assert r.exit_code != 0 and "no CUDA device" in r.output and "Traceback" not in r.output
    assert list(tmp_path.iterdir()) == []  # no lock file, no parts folder
    r = CliRunner().invoke(tp_cli.main, ["--store", str(store_path), "--strong", tiny_clip, "--device", "cuda:0"])
    assert r.exit_code != 0 and "no CUDA device" in r.output
    r = CliRunner().invoke(predict_cli.main, ["--results", str(tmp_path), "--images", str(tmp_path), "--device", "nope"])
    assert r.exit_code != 0 and "is not a torch device" in r.output
    with pytest.raises(ValueError, match="no CUDA device"):
        experiment._check_extract({"device": "cuda"})


# ------------------------------------------------------------------------------ 14. the test run's summary


def test_a_pytest_run_ends_with_its_summary_line():
    import os
    import re

    root = os.path.dirname(os.path.dirname(__file__))
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_layering.py"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and re.search(r"^\d+ passed in [\d.]+s", r.stdout.strip().splitlines()[-1]), r.stdout
