"""Size buckets: a fit padded to its store's bucket gives the numbers of the fit as it is, and the stores of one
bucket (DomainNet's domains, two by two) run one compiled program, the second loaded from the compilation cache."""
import dataclasses
import logging
import re

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.splits import split_sizes, stacked_splits
from w2s_jax.store import read_store

COUNTS = ("train_acc", "test_acc", "score_agreement", "score_refined")  # ratios of whole counts: exactly equal


def test_bucket_sizes_are_a_quarter_octave_apart():
    domainnet = (14_604, 15_582, 20_916, 21_850, 51_750, 52_041)  # the six domains' test splits
    assert [fitlib.bucket_size(n) for n in domainnet] == [16_384] * 2 + [24_576] * 2 + [57_344] * 2
    for n in range(1, 20_000):
        b = fitlib.bucket_size(n)
        assert n <= b <= 1.25 * n, n
        shift = b.bit_length() - 3  # b = m * 2^shift, m in 4..7 (below 8 rows, b = n)
        assert b == n if n < 8 else (4 <= b >> shift <= 7 and b % 2 ** shift == 0), n
        assert all(p <= q for p, q in zip(split_sizes(n), split_sizes(b))), n  # each split fits in the bucket's


@pytest.mark.parametrize("select", ["confidence"])  # the median of the unsure rows; agreement is in the history
def test_padding_changes_no_number(store_path, select):
    """Every kind of model (both heads, a ceiling, multi-weak, each refinement, a second round), 2 seeds x 2 lrs:
    padded from 600 to 640 rows, the fit keeps the same epochs, the same accuracies to the last bit, and the
    same losses, scores and parameters to float32 rounding."""
    store = read_store(store_path)
    test = store.splits["test"]
    weak = test.weak_logits["noisy"]
    other = weak + np.random.default_rng(0).normal(size=weak.shape).astype(np.float32)
    data = fitlib.make_data(test.features_NxD, weak, test.labels_N, np.stack([weak, other]))
    methods = ("cpl", "kd+lp", "auxconf+proto", "adaptconf+lp", "ceiling+lp", "ceiling+proto", "raven+cpl",
               "average+lp", "kd+lp@knn", "cpl@graph", "kd+lp@filter", "ce+proto@confident", "kd+lp@round2")
    cfg = FitConfig(store=str(store_path), weak="noisy", ensemble=("noisy", "other"), methods=methods, seeds=2,
                    epochs=4, batch_size=64, select=select, grid=(("lr", (1e-2, 3e-3)),))
    splits = stacked_splits(len(test.ids_N), 2)
    ((padded, timings),) = fitlib.fit_each(cfg, [data], splits, store.text_TxKxD, store.num_classes)
    ((plain, plain_timings),) = fitlib.fit_each(dataclasses.replace(cfg, bucket=False), [data], splits,
                                                store.text_TxKxD, store.num_classes)
    assert timings["bucket_rows"] == 640 and plain_timings["bucket_rows"] is None
    for m in methods:
        np.testing.assert_array_equal(padded[m].best_epoch, plain[m].best_epoch, err_msg=m)
        for field, curve in plain[m].history.items():
            if field in COUNTS:
                np.testing.assert_array_equal(padded[m].history[field], curve, err_msg=f"{m} {field}")
            else:
                np.testing.assert_allclose(padded[m].history[field], curve, rtol=1e-5, atol=1e-5,
                                           err_msg=f"{m} {field}")
        for a, b in zip(jax.tree.leaves(padded[m].variables), jax.tree.leaves(plain[m].variables)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5, err_msg=m)


def test_a_head_that_does_not_weigh_its_start_is_fitted_unpadded(store_path, registries):
    """A registered head that does not say it honours ``Start.real_N`` (``masked_start``) is never padded."""
    from w2s_jax import heads
    from w2s_jax.methods import METHODS, Method

    heads.HEADS["plain-proto"] = heads.Head(heads.PrototypeHead)
    METHODS["kd+plain-proto"] = Method("plain-proto", "kd", "weak")
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("kd+plain-proto",), seeds=1, epochs=1, batch_size=64)
    _, timings = fitlib.fit_methods(cfg, data, stacked_splits(len(test.ids_N), 1), store.text_TxKxD, store.num_classes)
    assert timings["bucket_rows"] is None


def fit_cli(store, out, *more):
    return CliRunner().invoke(cli.main, ["--store", str(store), "--methods", "cpl,kd+lp,kd+lp@filter", "--seeds", "2",
                                         "--epochs", "2", "--batch-size", "32", "--out", str(out), *more])


def test_stores_of_one_bucket_share_one_compiled_program(tmp_path, caplog):
    """Two stores of 640 and 620 test rows (one bucket, 640, which the first fills): w2s-fit compiles the start and
    epoch programs for the first, and the second loads both from the compilation cache; --no-bucket compiles its
    own. Shapes no other
    test uses (d = 12, k = 4), so the tests' shared cache cannot already hold these programs."""
    text = np.random.default_rng(1).normal(size=(1, 4, 12)).astype(np.float32)  # the same classes and prompts
    for n in (640, 620):
        synthetic_store(tmp_path / f"s{n}.h5", n_test=n, d=12, k=4, seed=n, text_TxKxD=text)
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
        first = fit_cli(tmp_path / "s640.h5", tmp_path / "a")
        second = fit_cli(tmp_path / "s620.h5", tmp_path / "b")
    assert first.exit_code == 0 and second.exit_code == 0, first.output + second.output
    assert "rows padded to the size bucket of 640" in second.output
    missed = re.findall(r"PERSISTENT COMPILATION CACHE MISS for 'jit_(\w+)'", caplog.text)
    hits = re.findall(r"Persistent compilation cache hit for 'jit_(\w+)'", caplog.text)
    for program in ("start_program", "epoch_program"):
        assert missed.count(program) == 1 and hits.count(program) == 1, (program, missed, hits)
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
        unpadded = fit_cli(tmp_path / "s620.h5", tmp_path / "c", "--no-bucket")
    assert unpadded.exit_code == 0 and "size bucket" not in unpadded.output
    assert "epoch_program" in re.findall(r"PERSISTENT COMPILATION CACHE MISS for 'jit_(\w+)'", caplog.text)


def test_an_experiment_file_turns_buckets_off(tmp_path):
    """``[fit] bucket = false`` reaches the fit's config; a value that is not a boolean is named before any work."""
    from extract import experiment
    from test_experiment import TOML, write

    assert experiment.fit_config({"bucket": False}, "s.h5", "w").bucket is False
    assert experiment.fit_config({}, "s.h5", "w").bucket is True
    path = write(tmp_path, TOML.format(out=tmp_path / "out").replace("seeds = 2", 'seeds = 2\nbucket = "no"'))
    with pytest.raises(experiment.ExperimentError, match="bucket"):
        experiment.load_experiment(path)
