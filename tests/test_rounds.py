"""Strong-to-strong rounds: METHOD@roundR trains METHOD on the soft labels of round R - 1's kept student, by the
same compiled epoch program as round 1."""
import json
import logging
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from w2s_jax import cli, report
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import check_methods, with_rounds
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store

FAST = dict(epochs=3, batch_size=64)


def fit(store_path, methods, seeds=1, weak_NxK=None, **kwargs):
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"] if weak_NxK is None else weak_NxK,
                            test.labels_N)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=tuple(methods), seeds=seeds, **{**FAST, **kwargs})
    splits = stacked_splits(len(test.ids_N), seeds)
    out, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    return out, data, splits


def assert_same_fit(a, b, atol=1e-5):
    np.testing.assert_array_equal(a.best_epoch, b.best_epoch)
    for field in ("train_loss", "train_acc", "val_score", "test_acc"):
        np.testing.assert_allclose(a.history[field], b.history[field], atol=atol, err_msg=field)
    for x, y in zip(jax.tree.leaves(a.variables), jax.tree.leaves(b.variables)):
        np.testing.assert_allclose(x, y, atol=atol)


@pytest.mark.parametrize("method", ["ce+lp", "cpl"])
def test_round_two_is_round_one_on_the_kept_students_soft_labels(store_path, method):
    """ce+lp@round2 equals a fresh ce+lp fit whose weak logits are the kept ce+lp student's on the pool
    (hold_train ∪ hold_val) and the weak model's elsewhere: the round changes the target and nothing else."""
    out, data, splits = fit(store_path, [method, "ceiling+lp", f"{method}@round2"])
    group = fitlib.make_groups((method,), 5, read_store(store_path).text_TxKxD)
    (module,) = [g.module for g in group.values()]
    hp = jax.tree.map(lambda a: jnp.asarray(a)[0], FitConfig(store="", weak="", methods=(method,)).grid_hparams())
    student = module.apply(jax.tree.map(lambda a: a[0, 0], out[method].variables), data.feats_NxD, hp)
    pool = np.concatenate([splits.hold_train[0], splits.hold_val[0]])
    relabelled = np.asarray(data.weak_NxK).copy()
    relabelled[pool] = np.asarray(student)[pool]
    assert not np.allclose(relabelled, data.weak_NxK)
    again, _, _ = fit(store_path, [method, "ceiling+lp"], weak_NxK=relabelled)
    assert_same_fit(out[f"{method}@round2"], again[method])


def test_rounds_change_no_round_one_number_and_match_the_model_by_model_path(store_path):
    """Adding rounds widens the targets' axis and nothing else: every round-1 output is unchanged. With two seeds
    and a grid, the vmapped rounds (kept grid point per method, each seed at its kept epoch) equal --no-vmap's."""
    grid = dict(grid=(("lr", (1e-3, 3e-2)),))
    plain, _, _ = fit(store_path, ["ce+lp", "cpl", "ce+lp@filter"], seeds=2, **grid)
    methods = with_rounds(("ce+lp", "cpl", "ce+lp@filter"), 3)
    assert methods[3:] == ("ce+lp@round2", "ce+lp@round3", "cpl@round2", "cpl@round3", "ce+lp@filter@round2",
                           "ce+lp@filter@round3")
    rounds, _, _ = fit(store_path, methods, seeds=2, **grid)
    for m in plain:
        for x, y in zip(jax.tree.leaves(plain[m]), jax.tree.leaves(rounds[m])):
            np.testing.assert_array_equal(x, y)
    one_by_one, _, _ = fit(store_path, methods, seeds=2, vmap=False, **grid)
    for m in methods:
        assert_same_fit(rounds[m], one_by_one[m], atol=2e-4)
    assert not np.allclose(rounds["ce+lp@round2"].history["test_acc"], rounds["ce+lp"].history["test_acc"])


def compiled_programs(caplog) -> list[str]:
    return re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)


def test_later_rounds_reuse_the_compiled_epoch_program(store_path, caplog):
    """Three rounds compile one epoch program; rounds 2 and 3 share one start program (their models' starts)."""
    with caplog.at_level(logging.DEBUG, logger="jax._src.dispatch"):
        fit(store_path, with_rounds(("ce+lp", "cpl", "ceiling+lp"), 3), seeds=2)
    programs = compiled_programs(caplog)
    assert programs.count("epoch_program") == 1, programs
    assert programs.count("start_program") == 1 and programs.count("start_models") == 1, programs


@pytest.mark.parametrize("methods, message", [
    ("ce+lp@round2", r"ce\+lp@round2 trains on the kept student of ce\+lp; add it"),
    ("ce+lp,ce+lp@round3", r"ce\+lp@round3 trains on the kept student of ce\+lp@round2"),
    ("ceiling+lp,ceiling+lp@round2", r"ceiling\+lp@round2: METHOD@roundR .* ceilings, multi-weak"),
    ("ce+lp,ce+lp@round1", r"round 1 is METHOD itself"),
])
def test_a_round_without_its_teacher_is_named(store_path, tmp_path, methods, message):
    r = CliRunner().invoke(cli.main, ["--store", str(store_path), "--methods", methods, "--seeds", "1",
                                      "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and re.search(message, r.output), r.output
    assert "Traceback" not in r.output and not (tmp_path / "r").exists()


def test_rounds_are_not_w2s_tps():
    with pytest.raises(ValueError, match="w2s-tp methods have no rounds"):
        check_methods(["ce+tp", "ce+tp@round2"], valid=("ce+tp",), command="w2s-tp")
    with pytest.raises(ValueError, match="rounds = 0"):
        with_rounds(("ce+lp",), 0)


def test_rounds_from_the_cli_to_the_report(store_path, tmp_path):
    """--rounds 2: each W2S method's round-2 row with PGR, a regret row and gain sources; the ceiling has none, and
    a round is never Δ's best baseline."""
    out = tmp_path / "r"
    r = CliRunner().invoke(cli.main, ["--store", str(store_path), "--methods", "ce+lp,cpl,ceiling+lp,ceiling+proto",
                                      "--rounds", "2", "--seeds", "2", "--epochs", "3", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [line.split(" | ")[0].strip("| ") for line in r.output.splitlines() if line.startswith("| ")]
    table = rows[:rows.index("best ceiling (ceiling+lp, chosen on hold_val)") + 1] if "best ceiling (ceiling+lp, " \
        "chosen on hold_val)" in rows else rows[:9]
    assert [x for x in table if "round" in x or x in ("ce+lp", "cpl")] == ["ce+lp", "ce+lp@round2", "cpl",
                                                                         "cpl@round2"]
    summary = json.loads((out / "metrics.json").read_text())
    assert "ce+lp@round2" in summary["pgr"] and "ceiling+lp@round2" not in summary["methods"]
    assert "ce+lp@round2" in summary["selection"]["methods"] and "correction" in summary["methods"]["cpl@round2"]
    assert report.best_baseline(summary) == "ce+lp"
    r = CliRunner().invoke(cli.main, ["--show", str(out)])
    assert r.exit_code == 0 and "| cpl@round2 |" in r.output
    tables, _ = report.write_report([out], tmp_path / "rep")
    rounds = next(t for t in tables if t.name == "rounds-noisy")
    assert rounds.header[2:4] == ["round 1", "round 2"] and [r[1] for r in rounds.rows] == ["ce+lp", "cpl"]
    methods = summary["methods"]
    assert rounds.rows[0][-1] == report._interval_cell(methods["ce+lp@round2"]["test_acc"], methods["ce+lp"]["test_acc"])
    assert rounds.rows[0][3].startswith(report._cell(methods["ce+lp@round2"]["test_acc"]) + " (PGR ")
    table2 = next(t for t in tables if t.name.startswith("table2"))
    assert not any("round" in r[0] for r in table2.rows)  # the paper's table; rounds have their own
    assert (tmp_path / "rep" / "rounds-noisy.tex").exists()


def test_an_experiment_file_asks_for_rounds(store_path, tmp_path):
    from extract.experiment import fit_config, load_experiment

    path = tmp_path / "exp.toml"
    path.write_text('out = "o"\n[[data]]\ndataset = "demo"\n[fit]\nmethods = ["ce+lp"]\nrounds = 3\n')
    assert load_experiment(path)["fit"]["rounds"] == 3  # the typed file takes it
    path.write_text('out = "o"\n[[data]]\ndataset = "demo"\n[fit]\nmethods = ["ce+lp"]\nrounds = 0\n')
    with pytest.raises(ValueError, match="rounds = 0"):
        load_experiment(path)

    cfg = fit_config({"methods": ["ce+lp", "ceiling+lp"], "refine": ["knn"], "rounds": 2}, store_path, "noisy")
    assert set(cfg.methods) == {"ce+lp", "ce+lp@knn", "ceiling+lp", "ce+lp@round2", "ce+lp@knn@round2"}
    with pytest.raises(ValueError, match=r"rounds = 0: use a whole number >= 1"):
        fit_config({"methods": ["ce+lp"], "rounds": 0}, store_path, "noisy")
