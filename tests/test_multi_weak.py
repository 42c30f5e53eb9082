"""Several weak models at once: the learned weights favour the good teacher and beat the uniform average."""
import json

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from test_misfit import flipped_teacher
from w2s_jax import cli
from w2s_jax import fit as fitlib
from w2s_jax import store as st
from w2s_jax.methods import METHODS

MULTI = "raven+lp,average+lp,raven+cpl,average+cpl"


@pytest.fixture(scope="module")
def good_and_useless(tmp_path_factory):
    """A store whose weak models are a good one (15% of labels flipped) and a useless one (random labels)."""
    path = tmp_path_factory.mktemp("multi") / "s.h5"
    store = synthetic_store(path, seed=3)
    rng = np.random.default_rng(4)
    for name, flip in (("good", 0.15), ("useless", 1.0)):
        logits = {split: flipped_teacher(rows.labels_N, 5, flip, rng) for split, rows in store.splits.items()}
        store = st.with_weak_model(store, name, logits, {"source": "synthetic"})
    st.write_store(path, store)
    return path


def fit(store, out, weak, methods, *extra):
    r = CliRunner().invoke(cli.main, ["--store", str(store), "--weak", weak, "--methods", methods, "--seeds", "3",
                                      "--epochs", "5", "--batch-size", "64", "--out", str(out), *extra])
    assert r.exit_code == 0, r.output
    return r.output, json.loads((out / "metrics.json").read_text()) if (out / "metrics.json").exists() else None


def test_learned_weights_favour_the_good_teacher_and_beat_the_average(good_and_useless, tmp_path):
    output, summary = fit(good_and_useless, tmp_path / "res", "useless,good", MULTI)  # the useless one first
    methods = summary["methods"]
    assert [e["weak"] for e in summary["ensemble"]] == ["useless", "good"]  # the order of the weights, on disk too
    assert np.mean(summary["ensemble"][1]["test_acc"]) > 0.8 > 0.3 > np.mean(summary["ensemble"][0]["test_acc"])
    weights_of_lp = np.asarray(methods["raven+lp"]["weak_weights"])
    for head in ("lp", "cpl"):
        weights_SxM = np.asarray(methods[f"raven+{head}"]["weak_weights"])
        assert weights_SxM.shape == (3, 2)
        np.testing.assert_allclose(weights_SxM.sum(axis=1), 1.0, rtol=1e-5)  # on the simplex
        assert (weights_SxM[:, 1] > 0.6).all(), weights_SxM  # every seed favours "good"
        np.testing.assert_allclose(methods[f"average+{head}"]["weak_weights"], 0.5)
    # the uniform average is pulled down by the useless teacher; the learned weights are not (LP: no text start)
    assert np.mean(methods["raven+lp"]["test_acc"]) > np.mean(methods["average+lp"]["test_acc"]) + 0.02
    assert "Learned weights of the weak models" in output and "| raven+lp: weights, seed 2 |" in output
    table = (tmp_path / "res" / "table.md").read_text()
    assert "weak model's own test' acc (%)" in table
    shown = CliRunner().invoke(cli.main, ["--show", str(tmp_path / "res")]).output  # re-read from metrics.json
    header = next(line for line in shown.splitlines() if line.startswith("|  | "))
    row = next(line for line in shown.splitlines() if line.startswith("| raven+lp: weights, seed 0 |"))
    assert header.split("|")[2:4] == [" useless ", " good "]
    assert float(row.split("|")[3]) == pytest.approx(weights_of_lp[0, 1], abs=1e-3)  # good's weight under "good"


def test_several_weak_models_fit_each_in_its_own_folder_as_alone(good_and_useless, tmp_path):
    """--weak good,useless: kd+lp is fitted for each weak model (one folder each, one compiled program for both), each
    the same fit as alone; raven+lp combines them in the folder good+useless."""
    output, _ = fit(good_and_useless, tmp_path / "more", "good,useless", "kd+lp,raven+lp")
    assert "one program for all 2" in output and "== weak good+useless ==" in output
    for weak in ("good", "useless"):
        _, alone = fit(good_and_useless, tmp_path / weak, weak, "kd+lp")
        together = json.loads((tmp_path / "more" / weak / "metrics.json").read_text())
        assert list(together["methods"]) == ["kd+lp"]
        np.testing.assert_allclose(alone["methods"]["kd+lp"]["test_acc"], together["methods"]["kd+lp"]["test_acc"],
                                   atol=1e-6)
        assert json.loads((tmp_path / "more" / weak / "config.json").read_text())["weak"] == weak
    ensemble = json.loads((tmp_path / "more" / "good+useless" / "metrics.json").read_text())
    assert list(ensemble["methods"]) == ["raven+lp"] and [e["weak"] for e in ensemble["ensemble"]] == ["good", "useless"]


def test_raven_starts_from_the_rows_where_the_weak_models_agree():
    weaks = np.array([[[5.0, 0, 0], [0, 5, 0], [0, 0, 5]],
                      [[5.0, 0, 0], [5, 0, 0], [0, 0, 5]]])  # 2 weak models x 3 rows: they agree on rows 0 and 2
    np.testing.assert_array_equal(fitlib.consensus(weaks), [0, -1, 2])
    data = fitlib.make_data(np.eye(3), weaks[0], np.arange(3), weaks)
    mixed = fitlib.teacher_logits(METHODS["average+lp"], data, 3, np.arange(3),
                                  {"mixture": {"logits_M": np.zeros(2)}})
    want = 0.5 * (jax.nn.softmax(weaks[0]) + jax.nn.softmax(weaks[1]))
    np.testing.assert_allclose(np.exp(mixed), want, rtol=1e-5)  # the mixture's logits are the log of its probabilities


def test_multi_weak_needs_two_weak_models(good_and_useless):
    r = CliRunner().invoke(cli.main, ["--store", str(good_and_useless), "--weak", "good", "--methods", "raven+cpl"])
    assert r.exit_code != 0 and "name two or more: --weak A,B" in r.output
    r = CliRunner().invoke(cli.main, ["--store", str(good_and_useless), "--weak", "good,good", "--methods", "raven+cpl"])
    assert r.exit_code != 0 and "name each weak model once" in r.output
    r = CliRunner().invoke(cli.main, ["--store", str(good_and_useless), "--weak", "good,nope", "--methods", "raven+cpl"])
    assert r.exit_code != 0 and "nope" in r.output and "Traceback" not in r.output
