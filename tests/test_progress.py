"""The fit says what it does: --batch-size auto (printed, recorded), the plan, the compile time, the progress."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli
from w2s_jax.config import FitConfig, auto_batch_size, resolve_batch_size


@pytest.mark.parametrize("n_train, batch", [(33_306, 512), (9_346, 512), (8_000, 256), (1_600, 64), (920, 32),
                                            (50, 8)])
def test_auto_batch_keeps_512_unless_an_epoch_would_be_too_short(n_train, batch):
    assert auto_batch_size(n_train) == batch
    assert n_train / batch >= 16 or batch == 8


def test_explicit_batch_size_wins_and_auto_is_recorded():
    cfg = FitConfig(store="s", weak="w", methods=("cpl",))
    assert cfg.batch_size == "auto"
    resolved = resolve_batch_size(cfg, 1_600)
    assert resolved.batch_size == 64 and "16 steps" in resolved.batch_size_rule
    explicit = FitConfig(store="s", weak="w", methods=("cpl",), batch_size=512)
    assert resolve_batch_size(explicit, 1_600) == explicit


def test_fit_prints_its_plan_and_compile_time_and_records_the_rule(tmp_path):
    store = tmp_path / "s.h5"
    synthetic_store(store, n_test=400)
    out = tmp_path / "res"
    r = CliRunner().invoke(cli.main, ["--store", str(store), "--seeds", "2", "--methods", "cpl,kd+lp",
                                      "--epochs", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "fitting 2 methods x 2 seeds x 1 grid point(s) = 4 models" in r.output
    assert "hold_train 256, hold_val 64, test' 80 of 400; 16-d features, 5 classes" in r.output
    assert "batch size 16 (auto -> 16" in r.output and "memory: about" in r.output and "compiled in" in r.output
    config = json.loads((out / "config.json").read_text())
    assert config["batch_size"] == 16 and config["batch_size_rule"].startswith("auto -> 16")
    r = CliRunner().invoke(cli.main, ["--store", str(store), "--batch-size", "0"])
    assert r.exit_code != 0 and "positive integer" in r.output


def test_per_epoch_calls_equal_the_single_call_fit(tmp_path):
    """The progress loop (one compiled call per epoch) gives the same parameters as ``fit`` (one lax.scan)."""
    import jax

    from w2s_jax import fit as fitlib
    from w2s_jax.splits import stacked_splits
    from w2s_jax.store import read_store

    synthetic_store(tmp_path / "s.h5")
    st = read_store(tmp_path / "s.h5")
    test = st.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    cfg = FitConfig(store="s", weak="noisy", methods=("cpl", "kd+lp"), seeds=2, epochs=3, batch_size=64)
    splits = stacked_splits(len(test.ids_N), 2)
    looped, _ = fitlib.fit_methods(cfg, data, splits, st.text_TxKxD, st.num_classes)
    for m in cfg.methods:
        fit = jax.jit(fitlib.make_fit(m, st.num_classes, st.text_TxKxD, fitlib.recipe_of(cfg, splits.hold_train.shape[-1])))
        for s in range(2):
            one = fit(fitlib.seed_keys(0, 2)[s], jax.tree.map(lambda a: a[0], cfg.grid_hparams()), data,
                      jax.tree.map(lambda a: a[s], splits))
            for a, b in zip(jax.tree.leaves(looped[m]), jax.tree.leaves(one)):
                np.testing.assert_allclose(np.asarray(a)[s, 0], np.asarray(b), rtol=2e-4, atol=2e-5)
