"""Heads as flax modules: saved with every fit, reloaded with the same logits, and a new head from the manual
(docs/heads.md)."""
import json
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from click.testing import CliRunner

import w2s_jax
from conftest import synthetic_store
from w2s_jax import cli, heads, methods
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.run import run
from w2s_jax.saved_heads import HeadsError
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store

README = Path(__file__).resolve().parents[1] / "docs" / "heads.md"  # where "Add a head" is written
METHODS = ("cpl", "kd+lp", "ceiling+proto", "ceiling+lp")


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A fit of 4 methods x 2 seeds x 2 grid points on a synthetic store with text; (store path, results folder)."""
    folder = tmp_path_factory.mktemp("fitted")
    synthetic_store(folder / "s.h5")
    cfg = FitConfig(store=str(folder / "s.h5"), weak="noisy", methods=METHODS, seeds=2, epochs=3, batch_size=64,
                    grid=(("lr", (1e-2, 1e-3)),))
    run(cfg, folder / "res")
    return folder / "s.h5", folder / "res", cfg


def test_saved_heads_give_the_fits_logits_and_reported_accuracy(fitted):
    store_path, res, cfg = fitted
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    splits = stacked_splits(len(test.ids_N), 2)
    refit, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    summary = json.loads((res / "metrics.json").read_text())
    saved = w2s_jax.load_heads(res)
    assert set(saved) == set(METHODS)
    hps = cfg.grid_hparams()
    for name, head in saved.items():
        assert head.head == methods.METHODS[name].head and head.selected == summary["methods"][name]["grid_index"]
        assert head.encoder == "synthetic" and head.class_names == store.provenance.class_names
        module = heads.make_head(head.head, store.num_classes)
        for s in range(2):
            rows = splits.test_prime[s]
            for h in range(2):
                fit_vars = jax.tree.map(lambda a: np.asarray(a)[s, h], refit[name].variables)
                jax.tree.map(np.testing.assert_array_equal, head.variables(s, h), fit_vars)  # same params, bit for bit
                want = module.apply(fit_vars, data.feats_NxD[rows], jax.tree.map(lambda a: a[h], hps))
                got = head.logits(test.features_NxD[rows], s, h)  # raw features in; normalised inside
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
                acc = np.mean(got.argmax(1) == test.labels_N[rows])
                assert acc == pytest.approx(summary["methods"][name]["grid"]["test_acc"][s][h], abs=1e-6)
    assert "center_D" in saved["kd+lp"].variables()["stats"]  # the LP centring mean travels with the head


def test_prototypes_export_is_the_prototype_head(fitted):
    store_path, res, _ = fitted
    cpl = w2s_jax.load_heads(res)["cpl"]
    feats = read_store(store_path).splits["test"].features_NxD[:50]
    protos = cpl.prototypes(seed=1)
    assert protos.shape == (5, 16)
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-5)
    r_hat = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    np.testing.assert_allclose(cpl.hparams().logit_scale * r_hat @ protos.T, cpl.logits(feats, seed=1), rtol=1e-4,
                               atol=1e-4)
    with pytest.raises(HeadsError, match="linear head, not class prototypes"):
        w2s_jax.load_heads(res)["kd+lp"].prototypes()


def test_bad_requests_are_refused_by_name(fitted, tmp_path):
    _, res, _ = fitted
    cpl = w2s_jax.load_heads(res)["cpl"]
    with pytest.raises(HeadsError, match="seed 7 not in this fit; seeds are 0..1"):
        cpl.logits(np.ones((2, 16)), seed=7)
    with pytest.raises(HeadsError, match="grid point 5 not in this fit"):
        cpl.variables(0, 5)
    with pytest.raises(HeadsError, match="takes N x 16 features"):
        cpl.logits(np.ones((2, 8)))
    with pytest.raises(HeadsError, match="no results folder"):
        w2s_jax.load_heads(tmp_path / "nowhere")
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.json").write_text("{}")
    with pytest.raises(HeadsError, match="without saved heads"):
        w2s_jax.load_heads(tmp_path / "old")


def readme_block(first_line: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return next(b for b in blocks if b.startswith(first_line))


def test_the_readme_mlp_head_trains_saves_and_reloads(fitted, tmp_path, registries, monkeypatch):
    """The manual's MLP example (docs/heads.md), as written there: one module and one registry line, then w2s-fit --import."""
    store_path, _, _ = fitted
    plugin = tmp_path / "my_heads.py"
    plugin.write_text(readme_block("# my_heads.py"))
    out = tmp_path / "res"
    r = CliRunner().invoke(cli.main, ["--import", str(plugin), "--store", str(store_path), "--methods",
                                      "kd+mlp,ceiling+mlp", "--seeds", "2", "--epochs", "3", "--batch-size", "64",
                                      "--out", str(out)])
    assert r.exit_code == 0, r.output
    summary = json.loads((out / "metrics.json").read_text())
    weak = np.mean(summary["weak"]["test_acc"])
    assert np.mean(summary["methods"]["ceiling+mlp"]["test_acc"]) > weak  # it learns
    assert summary["pgr"]["kd+mlp"]["ceiling"] == "ceiling+mlp"
    mlp = w2s_jax.load_heads(out)["kd+mlp"]
    assert set(mlp.variables()["params"]) == {"Dense_0", "Dense_1"}
    test = read_store(store_path).splits["test"]
    rows = np.load(out / "splits.npz")["test_prime"][1]
    acc = np.mean(mlp.logits(test.features_NxD[rows], seed=1).argmax(1) == test.labels_N[rows])
    assert acc == pytest.approx(summary["methods"]["kd+mlp"]["test_acc"][1], abs=1e-6)


def test_import_of_a_missing_module_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli.main, ["--import", "no_such_heads_module", "--list-methods"])
    assert r.exit_code != 0 and "--import no_such_heads_module" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(cli.main, ["--import", str(tmp_path / "gone.py"), "--list-methods"])
    assert r.exit_code != 0 and "no such file" in r.output
