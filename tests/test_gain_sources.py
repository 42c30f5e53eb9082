"""Where the gain comes from (issue 32, part 1): correction, damage and coverage, against a NumPy count on a
constructed case; the weak model's own confidence as a refinement (METHOD@confident); the tables and the figure."""
import json

import jax.numpy as jnp
import numpy as np
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli, metrics, refine, report


def test_gain_sources_count_what_they_say():
    """8 rows: the weak model is wrong on rows 0-2 (and least confident on rows 0-1); the student mends rows 0-1 and
    breaks row 5."""
    labels = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    weak_pred = np.array([1, 2, 0, 0, 1, 2, 0, 1])  # wrong on 0, 1, 2
    student_pred = np.array([0, 1, 0, 0, 1, 0, 0, 1])  # right on 0, 1; wrong on 2 and 5
    confidence = np.array([1.0, 1.5, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])  # rows 0-1: the least confident quarter
    weak = np.eye(3)[weak_pred] * confidence[:, None]
    student = np.eye(3)[student_pred] * 5.0
    got = {k: float(v) for k, v in metrics.gain_sources(jnp.asarray(student), jnp.asarray(weak),
                                                         jnp.asarray(labels)).items()}
    weak_ok, student_ok = weak_pred == labels, student_pred == labels
    low = np.zeros(8, bool)
    low[:2] = True
    want = {"correction": np.mean(student_ok[~weak_ok]), "damage": np.mean(~student_ok[weak_ok]),
            "low_conf_acc": np.mean(student_ok[low]), "rest_acc": np.mean(student_ok[~low]),
            "weak_low_conf_acc": np.mean(weak_ok[low]), "weak_rest_acc": np.mean(weak_ok[~low])}
    assert want["correction"] == 2 / 3 and want["damage"] == 1 / 5 and want["weak_low_conf_acc"] == 0.0
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-6, key


def test_the_confident_refinement_drops_the_least_confident_rows():
    probs = np.array([[0.9, 0.1], [0.55, 0.45], [0.2, 0.8], [0.5, 0.5], [0.7, 0.3]], np.float32)
    spec = refine.Refinement("confident", c=0.4)
    logits, weights = refine.refine(spec, np.zeros((5, 3), np.float32), np.log(probs))
    np.testing.assert_array_equal(np.asarray(weights), [1, 0, 1, 0, 1])  # the two of least top probability
    np.testing.assert_allclose(np.asarray(logits), np.log(probs))  # the labels themselves are kept
    from w2s_jax.config import Hparams

    assert refine.spec_of("confident", Hparams(refine_c=0.3)) == refine.Refinement("confident", 0, 0.0, 0.3)


def test_fit_printout_metrics_report_and_figure(tmp_path):
    store = tmp_path / "s.h5"
    synthetic_store(store)
    out = tmp_path / "r"
    r = CliRunner().invoke(cli.main, ["--store", str(store), "--methods", "ce+lp,cpl,ceiling+lp", "--refine",
                                      "confident", "--seeds", "2", "--epochs", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "Where the gain comes from" in r.output and "| ce+lp@confident |" in r.output
    summary = json.loads((out / "metrics.json").read_text())
    assert len(summary["methods"]["cpl"]["correction"]) == 2 and "weak_low_conf_acc" in summary["methods"]["cpl"]
    tables, figures = report.write_report([out], tmp_path / "rep")
    table = next(t for t in tables if t.name == "gain-sources")
    assert {r[2] for r in table.rows} == {"ce+lp", "ce+lp@confident", "cpl", "cpl@confident"}  # no ceiling
    for ext in ("md", "csv", "tex"):
        assert (tmp_path / "rep" / f"gain-sources.{ext}").stat().st_size > 50
    figure = next(f for f in figures if f.name.startswith("correction-damage"))
    assert figure.stat().st_size > 10_000
