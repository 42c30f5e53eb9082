"""W2S across domains (issue 24): saved heads evaluated on every other store of the same encoder and classes,
without refitting; mismatched stores refused by name; a missing store left out with a note."""
import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli as fit_cli
from w2s_jax import cross_domain, report
from w2s_jax.saved_heads import HeadsError
from w2s_jax.store import read_store, write_store


def fit(store, out):
    r = CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", "kd+lp,cpl,ceiling+lp", "--seeds", "2",
                                          "--epochs", "2", "--batch-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two stores of one encoder and class list whose classes sit in shifted places (domain shift), and a fit on each."""
    folder = tmp_path_factory.mktemp("cross")
    stores = {}
    for name, seed in (("near", 0), ("far", 1)):
        stores[name] = folder / f"{name}.h5"
        synthetic_store(stores[name], seed=seed, domain=name)
    return stores, {name: fit(path, folder / f"res-{name}") for name, path in stores.items()}


def test_the_diagonal_is_each_fit_own_test_accuracy_and_shift_costs(two_domains):
    stores, fits = two_domains
    found, targets, notes = cross_domain.matrix(list(fits.values()))
    assert targets == ["synthetic/far", "synthetic/near"] and notes == []
    cells = found["noisy"]
    for name, folder in fits.items():
        reported = json.loads((folder / "metrics.json").read_text())["methods"]
        for method in ("kd+lp", "cpl", "ceiling+lp"):
            np.testing.assert_allclose(cells[method][(f"synthetic/{name}", f"synthetic/{name}")],
                                       reported[method]["test_acc"], atol=1e-6)
    # the two domains' classes sit in different places, so heads do worse away from home
    for method in ("kd+lp", "ceiling+lp"):
        home = np.mean(cells[method][("synthetic/near", "synthetic/near")])
        away = np.mean(cells[method][("synthetic/near", "synthetic/far")])
        assert away < home - 0.1, (method, home, away)


def test_report_writes_the_matrix_and_its_figure(two_domains, tmp_path):
    _, fits = two_domains
    r = CliRunner().invoke(report.main, [*map(str, fits.values()), "--cross-domain", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "rep" / "cross-domain-noisy.md").read_text()
    assert "| kd+lp | synthetic/near |" in text and "out-of-domain (mean)" in text and "PGR" in text
    assert (tmp_path / "rep" / "cross-domain-noisy.png").stat().st_size > 0


def test_a_missing_store_is_left_out_with_a_note(two_domains, tmp_path):
    stores, fits = two_domains
    moved = tmp_path / "far.h5"
    stores["far"].rename(moved)
    try:
        found, targets, notes = cross_domain.matrix(list(fits.values()))
    finally:
        moved.rename(stores["far"])
    assert targets == ["synthetic/near"] and "synthetic/far" in notes[0] and "not on disk" in notes[0]
    assert ("synthetic/far", "synthetic/near") in found["noisy"]["kd+lp"]  # its heads still run on the others


@pytest.mark.parametrize("change, words", [
    (dict(encoder="another"), "encoder differ"),
    (dict(class_names=tuple(f"class {i}" for i in reversed(range(5)))), "in another order"),
    (dict(class_names=tuple(f"kind {i}" for i in range(5))), "class names differ"),
])
def test_a_mismatched_store_is_refused_by_name(two_domains, tmp_path, change, words):
    stores, fits = two_domains
    store = read_store(stores["far"])
    odd = tmp_path / "odd.h5"
    write_store(odd, dataclasses.replace(store, provenance=dataclasses.replace(store.provenance, **change)))
    with pytest.raises(HeadsError, match=words):
        cross_domain.evaluate(fits["near"], read_store(odd), str(odd))
