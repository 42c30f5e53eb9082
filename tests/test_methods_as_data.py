"""Methods as data: a user's method is a named row of the loss family, defined in Python or in an experiment
file, trained in the same vectorized step, listed, tabled, saved and rebuilt from its results folder."""
import json

import jax
import numpy as np
import pytest
from click.testing import CliRunner

from w2s_jax import cli
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import METHODS, define_method
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store

FAST = dict(epochs=3, batch_size=64)


def test_a_row_equal_to_kd_trains_like_kd_in_the_same_group(store_path, registries):
    """A user's row that repeats KD's coefficients joins the linear group and gives kd+lp's parameters: the method
    is only data."""
    define_method("my-kd+lp", "linear", weak_soft=1.0, t_squared=1.0)
    define_method("half+lp", "linear", weak_soft=0.5, weak_hard=0.5)
    methods = ("kd+lp", "my-kd+lp", "half+lp", "ce+lp")
    groups = fitlib.make_groups(methods, 5, None)
    assert list(groups) == ["linear"] and groups["linear"].methods == methods
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=methods, seeds=2, **FAST)
    out, _ = fitlib.fit_methods(cfg, data, stacked_splits(len(test.ids_N), 2), store.text_TxKxD, store.num_classes)
    for a, b in zip(jax.tree.leaves(out["kd+lp"]), jax.tree.leaves(out["my-kd+lp"])):
        np.testing.assert_array_equal(a, b)
    assert not np.allclose(out["half+lp"].variables["params"]["w_KxD"], out["kd+lp"].variables["params"]["w_KxD"])
    assert not np.allclose(out["half+lp"].variables["params"]["w_KxD"], out["ce+lp"].variables["params"]["w_KxD"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="kd+lp", head="linear", weak_soft=1.0),
     r"kd\+lp: the name exists already \(a built-in method or loss row\)"),
    (dict(name="ce", head="linear", weak_soft=1.0), "the name exists already"),
    (dict(name="mine", head="linear", weak_hard=1.0), r"mine: the name exists already \(defined as head=linear"),
    (dict(name="x", head="mlp9", weak_soft=1.0), "unknown head 'mlp9'"),
    (dict(name="x", head="linear", weak_sfot=1.0), r"unknown field\(s\) \['weak_sfot'\]"),
    (dict(name="x", head="linear", weak_soft=1.5, weak_hard=-0.5), "weak_hard = -0.5 is negative"),
    (dict(name="x", head="linear", weak_soft=0.3, weak_hard=0.3), "sum to 0.6"),
])
def test_a_bad_definition_names_the_problem(kwargs, message, registries):
    define_method("mine", "linear", weak_soft=1.0)
    define_method("mine", "linear", weak_soft=1.0)  # the same definition again (a plugin imported twice): no-op
    name, head = kwargs.pop("name"), kwargs.pop("head")
    with pytest.raises(ValueError, match=message):
        define_method(name, head, **kwargs)
    assert name in ("kd+lp", "ce", "mine") or name not in METHODS  # nothing half-registered


PLUGIN = """
import w2s_jax
w2s_jax.define_method("half+lp", "linear", weak_soft=0.5, weak_hard=0.5)
"""


def test_a_python_method_runs_from_the_cli_and_its_folder_rebuilds_it(store_path, tmp_path, registries):
    plugin = tmp_path / "my_methods.py"
    plugin.write_text(PLUGIN)
    r = CliRunner().invoke(cli.main, ["--import", str(plugin), "--list-methods"])
    assert r.exit_code == 0 and "half+lp" in r.output and "weak_soft=0.5, weak_hard=0.5" in r.output
    out = tmp_path / "res"
    r = CliRunner().invoke(cli.main, ["--import", str(plugin), "--store", str(store_path), "--methods",
                                      "half+lp,kd+lp,ceiling+lp", "--seeds", "2", "--epochs", "3",
                                      "--batch-size", "64", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| half+lp |" in r.output
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["pgr"]["half+lp"]["ceiling"] == "ceiling+lp"
    assert summary["defined"][0][:2] == ["half+lp", "linear"]
    assert json.loads((out / "config.json").read_text())["defined"][0][0] == "half+lp"
    heads = json.loads((out / "heads" / "heads.json").read_text())
    assert "half+lp" in json.dumps(heads)
    # a fresh registry (another process, say) rebuilds the method from the folder alone
    del METHODS["half+lp"]
    from w2s_jax.losses import LOSSES
    del LOSSES["half+lp"]
    shown = CliRunner().invoke(cli.main, ["--show", str(out)])
    assert shown.exit_code == 0 and shown.output.strip() == (out / "table.md").read_text().strip()


def test_a_ceiling_needs_the_truth_row(store_path, tmp_path, registries):
    """A ceiling registered with a weak loss would train on weak labels and be graded on the truth: refused."""
    from w2s_jax.methods import Method

    METHODS["ceiling+odd"] = Method("linear", "ce", "truth")
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("ceiling+odd",), seeds=1, **FAST)
    from w2s_jax.run import run

    with pytest.raises(ValueError, match='needs loss="truth"'):
        run(cfg, tmp_path / "r")
