"""w2s-report from small results folders made by the test: tables in three formats, real figures."""
import dataclasses

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import report
from w2s_jax import store as st
from w2s_jax.config import FitConfig
from w2s_jax.run import run

FAST = dict(methods=("kd+lp", "cpl", "ceiling+lp", "ceiling+proto"), seeds=2, epochs=3, batch_size=64)


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("results")
    for i, domain in enumerate(("real", "sketch")):
        path = root / f"{domain}.h5"
        store = synthetic_store(path, n_test=300, seed=i)
        store = dataclasses.replace(store, provenance=dataclasses.replace(store.provenance, dataset="domainnet",
                                                                          domain=domain))
        weaker = {s: sp.weak_logits["noisy"] + np.random.default_rng(9).normal(0, 2, sp.weak_logits["noisy"].shape)
                  for s, sp in store.splits.items()}
        st.write_store(path, st.with_weak_model(store, "noisier", {s: w.astype(np.float32) for s, w in weaker.items()},
                                                {"source": "synthetic"}))
        weaks = ("noisy", "noisier") if domain == "real" else ("noisy",)
        for weak in weaks:
            run(FitConfig(store=str(path), weak=weak, **FAST), root / "res" / domain / weak)
    return root / "res"


def test_tables_in_three_formats(results_root, tmp_path):
    tables, figures = report.write_report([results_root], tmp_path, paper=True)
    names = {t.name for t in tables}
    assert {"table2-noisy", "table3-domainnet-real", "pgr", "paper-table2"} <= names
    t2 = next(t for t in tables if t.name == "table2-noisy")
    assert t2.header == ["method", "domainnet/real", "domainnet/sketch", "Avg."]
    rows = {r[0]: r for r in t2.rows}
    assert {"weak", "zero-shot", "kd+lp", "cpl", report.BEST_CEILING} <= set(rows)
    assert rows[report.DELTA][1].startswith(("+", "-")) and rows[report.DELTA_TEST][1].startswith(("+", "-"))
    assert "hold_val" in t2.note and t2.note in (tmp_path / "table2-noisy.md").read_text()
    # Avg. is the mean of the domain means
    means = [float(c.split(" ± ")[0]) for c in rows["cpl"][1:3]]
    assert abs(float(rows["cpl"][3]) - np.mean(means)) < 0.01
    t3 = next(t for t in tables if t.name == "table3-domainnet-real")
    assert t3.header == ["method", "noisier", "noisy"]
    paper = next(t for t in tables if t.name == "paper-table2")
    assert ["weak", "real"] == paper.rows[0][:2] and paper.rows[0][3] == "85.10"
    for t in tables:
        for ext in ("md", "csv", "tex"):
            assert (tmp_path / f"{t.name}.{ext}").stat().st_size > 50
    tex = (tmp_path / "table2-noisy.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\pm$" in tex


def test_figures_are_real_images(results_root, tmp_path):
    import matplotlib.image

    _, figures = report.write_report([results_root], tmp_path)
    assert {f.name for f in figures} >= {"curves-domainnet-real-noisy.png", "pgr.png"}
    for f in figures:
        pixels = matplotlib.image.imread(f)
        assert f.stat().st_size > 10_000 and min(pixels.shape[:2]) > 150
        assert pixels[..., :3].std() > 0.05  # not a blank canvas


def test_cli_and_errors(results_root, tmp_path):
    r = CliRunner().invoke(report.main, [str(results_root), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0 and "Table 2 analogue" in r.output
    r = CliRunner().invoke(report.main, [str(tmp_path / "empty")])
    assert r.exit_code != 0 and "does not exist" in r.output
    (tmp_path / "empty").mkdir()
    r = CliRunner().invoke(report.main, [str(tmp_path / "empty")])
    assert r.exit_code != 0 and "no results folders" in r.output


def test_paper_table3_comparison_when_numbers_exist(results_root, tmp_path, monkeypatch):
    from w2s_jax import paper_numbers

    monkeypatch.setattr(paper_numbers, "TABLE3", {"real": {"noisier": {"cpl": 50.0, "weak": 40.0}}})
    tables, _ = report.write_report([results_root], tmp_path, paper=True)
    t = next(t for t in tables if t.name == "paper-table3")
    assert [r[:3] for r in t.rows] == [["real", "noisier", "cpl"], ["real", "noisier", "weak"]]
    assert t.rows[0][4] == "50.00" and t.rows[0][5].startswith(("+", "-"))


def test_paired_intervals_against_known_cases():
    """Issue 32 (3): a constant difference has zero width; for normal samples the interval is the NumPy transcription
    of Student's t-interval, with scipy's quantile, and covers the true mean at about its level."""
    from scipy import stats

    from w2s_jax import metrics

    assert metrics.paired_interval([0.5, 0.6, 0.7], [0.4, 0.5, 0.6]) == (0.1, 0.1, 0.1)
    rng = np.random.default_rng(0)
    a, b = rng.normal(0.7, 0.02, 5), rng.normal(0.68, 0.02, 5)
    d = a - b
    half = stats.t.ppf(0.975, 4) * d.std(ddof=1) / np.sqrt(5)
    mean, low, high = metrics.paired_interval(a, b)
    np.testing.assert_allclose([mean, low, high], [d.mean(), d.mean() - half, d.mean() + half], atol=1e-10)
    covered = np.mean([low <= 0.01 <= high for low, high in
                       (metrics.paired_interval(rng.normal(0.01, 0.02, 5), np.zeros(5))[1:] for _ in range(2000))])
    assert 0.93 <= covered <= 0.97, covered
    assert metrics.distinguishable(0.01, 0.02) and not metrics.distinguishable(-0.01, 0.02)
    assert np.isnan(metrics.paired_interval([0.5], [0.4])[1])


def test_table2_and_the_intervals_table_say_how_sure_each_difference_is(results_root, tmp_path):
    """Δ has its paired interval in Table 2 (not on the one-screen headline), and every W2S row is compared with the
    weak model and the best baseline; an interval that includes 0 is marked (n.d.)."""
    tables, _ = report.write_report([results_root], tmp_path)
    t2 = next(t for t in tables if t.name == "table2-noisy")
    ci = {r[0]: r for r in t2.rows}[report.DELTA_CI]
    assert all("[" in cell and "]" in cell for cell in ci[1:3])
    assert report.DELTA_CI not in {r[0] for r in report.headline(report.discover([results_root]), "noisy").rows}
    intervals = next(t for t in tables if t.name == "intervals-noisy")
    rows = {(r[0], r[1]): r for r in intervals.rows}
    assert {("domainnet/real", "kd+lp"), ("domainnet/real", "cpl")} <= set(rows)
    assert rows[("domainnet/real", "cpl")][3] == "kd+lp"  # the only other weak-label method
    for r in intervals.rows:
        assert r[2].count("[") == 1 and ("(n.d.)" in r[2]) == (not _excludes_zero(r[2]))
    assert "Student t-interval" in intervals.note


def _excludes_zero(cell: str) -> bool:
    low, high = (float(x) for x in cell.split("[")[1].split("]")[0].split(","))
    return low > 0 or high < 0
