"""Misfit and gain: the formulas against NumPy, the label-free choice of weak model on a store where it is known."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli, metrics, report
from w2s_jax import store as st


def np_log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def test_misfit_and_cross_entropy_match_numpy():
    rng = np.random.default_rng(0)
    zs, zw = 3 * rng.normal(size=(50, 7)), 2 * rng.normal(size=(50, 7))
    y = rng.integers(0, 7, 50)
    ps, log_ps, log_pw = np.exp(np_log_softmax(zs)), np_log_softmax(zs), np_log_softmax(zw)
    kl = np.mean([sum(ps[i, k] * (log_ps[i, k] - log_pw[i, k]) for k in range(7)) for i in range(50)])
    ce = np.mean([-log_ps[i, y[i]] for i in range(50)])
    assert float(metrics.misfit(zs, zw)) == pytest.approx(kl, rel=1e-5)
    assert float(metrics.cross_entropy(zs, y)) == pytest.approx(ce, rel=1e-5)
    assert float(metrics.misfit(zs, zs + 3.0)) == pytest.approx(0.0, abs=1e-6)  # a shift of logits is no misfit


def test_choice_by_misfit_counts_agreement():
    # 3 weak models x 2 seeds: seed 0 agrees fully; in seed 1 misfit prefers weak 1 but weak 0's student is best
    misfit = [[0.1, 0.3], [0.2, 0.2], [0.5, 0.9]]
    acc = [[0.9, 0.8], [0.8, 0.7], [0.5, 0.4]]
    got = metrics.choice_by_misfit(misfit, acc)
    assert got["top1"] == 0.5
    assert got["pairwise"] == pytest.approx(5 / 6)  # of the 6 pairs only seed 1's (weak 0, weak 1) is reversed
    assert np.isnan(metrics.choice_by_misfit([[0.1], [0.2]], [[0.5], [0.5]])["pairwise"])  # all tied


def flipped_teacher(labels_N, k, flip, rng):
    """Confident weak logits (margin 4) whose argmax is the label, except for a fraction ``flip`` of random classes."""
    wrong = rng.random(len(labels_N)) < flip
    said = np.where(wrong, rng.integers(0, k, len(labels_N)), labels_N)
    return (4.0 * np.eye(k)[said] + 0.5 * rng.normal(size=(len(labels_N), k))).astype(np.float32)


TEACHERS = {"good": 0.1, "fair": 0.3, "poor": 0.55}  # flip rates: the answer is known


@pytest.fixture(scope="module")
def three_teachers(tmp_path_factory):
    """One store, three confident weak models that flip 10%, 30% and 55% of the labels, each fitted."""
    folder = tmp_path_factory.mktemp("misfit")
    store = synthetic_store(folder / "s.h5", seed=3)
    rng = np.random.default_rng(4)
    for name, flip in TEACHERS.items():
        logits = {split: flipped_teacher(rows.labels_N, 5, flip, rng) for split, rows in store.splits.items()}
        store = st.with_weak_model(store, name, logits, {"source": "synthetic"})
    st.write_store(folder / "s.h5", store)
    for weak in TEACHERS:
        r = CliRunner().invoke(cli.main, ["--store", str(folder / "s.h5"), "--weak", weak, "--methods",
                                          "kd+lp,cpl,ceiling+lp", "--seeds", "3", "--epochs", "3", "--batch-size", "64",
                                          "--out", str(folder / "results" / weak)])
        assert r.exit_code == 0, r.output
        assert "gain ≥ misfit" in r.output  # the misfit table is printed
    return folder / "results"


def test_metrics_json_holds_misfit_and_gain(three_teachers):
    summary = json.loads((three_teachers / "fair" / "metrics.json").read_text())
    m = summary["methods"]["kd+lp"]
    assert len(m["misfit"]) == 3 and all(x > 0 for x in m["misfit"])
    np.testing.assert_allclose(m["gain"], np.subtract(summary["weak"]["test_ce"], m["test_ce"]))
    np.testing.assert_allclose(m["acc_gain"], np.subtract(m["test_acc"], summary["weak"]["test_acc"]))
    assert "gain ≥ misfit" in (three_teachers / "fair" / "table.md").read_text()


def test_misfit_picks_the_good_teacher_and_the_report_draws_the_scatter(three_teachers, tmp_path):
    tables, figures = report.write_report([three_teachers], tmp_path / "report", curves=("cpl",))
    choice = next(t for t in tables if t.name == "weak-choice")
    for row in choice.rows:  # misfit orders the teachers as their known quality, every seed and pair
        domain, method, picked, best_teacher, best_student, vs_teachers, vs_students = row
        assert picked == best_teacher == "good" and vs_teachers == "100% / 100%", row
    assert {r[1] for r in choice.rows} == {"kd+lp", "cpl"}  # ceilings do not depend on the weak model
    assert (tmp_path / "report" / "misfit-gain-synthetic-clusters.png") in figures
    gain_table = next(t for t in tables if t.name == "misfit-gain")
    assert len(gain_table.rows) == 9  # 3 weak models x 3 methods
