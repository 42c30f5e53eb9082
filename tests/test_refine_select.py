"""Issue 23: weak labels refined on the strong features (METHOD@knn, @graph, @filter) and label-free selection."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from w2s_jax import cli, refine, select


# ------------------------------------------------------------------ NumPy references


def np_neighbours(feats, k):
    sims = feats @ feats.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def np_softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def np_vote(probs, index):
    return probs[index].mean(axis=1)


def np_propagate(probs, index, alpha, steps):
    f = probs.copy()
    for _ in range(steps):
        f = alpha * f[index].mean(axis=1) + (1 - alpha) * probs
    return f


def np_filter(probs, vote, c):
    support = vote[np.arange(len(probs)), probs.argmax(axis=1)]
    dropped = np.argsort(support, kind="stable")[: int(np.floor(c * len(probs)))]
    weights = np.ones(len(probs), np.float32)
    weights[dropped] = 0
    return weights


@pytest.fixture
def pool():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(70, 8)).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    return feats, rng.normal(size=(70, 4)).astype(np.float32) * 2


def test_each_refinement_matches_its_numpy_reference_in_chunks(pool):
    """Chunks of 16 query rows over 70 (padding included) give the full-matrix NumPy answer."""
    feats, weak = pool
    probs = np_softmax(weak)
    index = np.asarray(refine.neighbours(feats, 5, chunk=16))
    reference = np_neighbours(feats, 5)
    assert all(set(a) == set(b) for a, b in zip(index, reference))
    assert not (index == np.arange(70)[:, None]).any()  # a row is never its own neighbour
    tail = np.asarray(refine.neighbours(feats, 5, chunk=16, first=50))  # the hold_val rows alone, among the pool
    assert all(set(a) == set(b) for a, b in zip(tail, reference[50:]))
    np.testing.assert_allclose(np.asarray(refine.knn_vote(probs, index)), np_vote(probs, reference), atol=1e-6)
    np.testing.assert_allclose(np.asarray(refine.propagate(probs, index, 0.7, steps=12)),
                               np_propagate(probs, reference, 0.7, 12), atol=1e-5)
    vote = np_vote(probs, reference)
    np.testing.assert_array_equal(np.asarray(refine.filter_weights(probs, vote, 0.3)), np_filter(probs, vote, 0.3))
    # and through refine(): log-probabilities of the refined target, the weights of the kept rows
    logits, weights = refine.refine(refine.Refinement("graph", 5, 0.7), feats, weak)
    np.testing.assert_allclose(np.exp(np.asarray(logits)), np_propagate(probs, reference, 0.7, refine.propagation_steps(0.7)),
                               atol=1e-5)
    assert np.all(np.asarray(weights) == 1)
    logits, weights = refine.refine(refine.Refinement("filter", 5, 0.0, 0.3), feats, weak)
    np.testing.assert_array_equal(np.asarray(logits), weak)  # a filter keeps the weak labels, drops rows
    assert np.asarray(weights).sum() == 70 - 21


def test_a_seeds_targets_refine_the_pool_only(pool):
    """Targets over all N rows: rows outside the pool keep the weak logits; the reference of the `refined` rule
    (val_only) is refined on the pool's last rows (hold_val) alone, with neighbours from the whole pool."""
    feats, weak = pool
    pool_rows = np.arange(10, 70)  # rows 0..9 are test', outside the pool; the last 15 pool rows are hold_val
    specs = (refine.Refinement(), refine.Refinement("knn", 5, val_only=True), refine.Refinement("knn", 5))
    got = refine.seed_teachers(specs, feats, weak, pool_rows, 15)
    logits = np.asarray(got.logits_UxNxK)
    for u in range(3):
        np.testing.assert_array_equal(logits[u, :10], weak[:10])
    np.testing.assert_array_equal(logits[0], weak)
    np.testing.assert_array_equal(logits[1, :55], weak[:55])  # hold_train rows: not refined for the reference
    vote = np_vote(np_softmax(weak[pool_rows]), np_neighbours(feats[pool_rows], 5))
    np.testing.assert_allclose(np.exp(logits[1, 55:]), vote[45:], atol=1e-5)
    np.testing.assert_allclose(np.exp(logits[2, 10:]), vote, atol=1e-5)


def test_graph_at_its_limits(pool):
    """α = 0 keeps the weak labels; α = 1 for one step is the kNN vote."""
    feats, weak = pool
    probs = np_softmax(weak)
    index = refine.neighbours(feats, 5)
    np.testing.assert_allclose(np.asarray(refine.propagate(probs, index, 0.0)), probs, atol=1e-6)
    np.testing.assert_allclose(np.asarray(refine.propagate(probs, index, 1.0, steps=1)),
                               np.asarray(refine.knn_vote(probs, index)), atol=1e-6)


def test_graph_propagation_converges_near_alpha_one(pool):
    """Issue 31 (noticed): 20 fixed steps left α close to 1 far from the fixed point; the steps now follow α
    (20 at the default 0.5), and α above 0.95 is refused by its range."""
    from w2s_jax.config import FitConfig, Hparams

    feats, weak = pool
    probs, index = np_softmax(weak), refine.neighbours(feats, 5)
    assert refine.propagation_steps(0.5) == 20 and refine.propagation_steps(0.95) == 271
    converged = np.asarray(refine.propagate(probs, index, 0.95, steps=3000))
    np.testing.assert_allclose(np.asarray(refine.propagate(probs, index, 0.95)), converged, atol=1e-5)
    assert np.abs(np.asarray(refine.propagate(probs, index, 0.95, steps=20)) - converged).max() > 1e-3
    with pytest.raises(ValueError, match="refine_alpha = 0.99 is out of range"):
        FitConfig(store="s", weak="w", methods=("ce+lp@graph",), hparams=Hparams(refine_alpha=0.99))


def cluster_with_wrong_labels(seed=0, k=4, per_class=60, wrong=0.25):
    """Well-separated classes; the weak labels are right everywhere except on 25% of class 0, labelled 1."""
    rng = np.random.default_rng(seed)
    centers = 4 * np.eye(k, 16)
    labels = np.repeat(np.arange(k), per_class)
    feats = (centers[labels] + 0.5 * rng.normal(size=(len(labels), 16))).astype(np.float32)
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    weak_labels = labels.copy()
    bad = rng.choice(per_class, int(wrong * per_class), replace=False)  # rows of class 0
    weak_labels[bad] = 1
    weak = (3.0 * np.eye(k)[weak_labels]).astype(np.float32)
    return feats, weak, labels, bad


def test_refinement_fixes_most_of_a_wrongly_labelled_cluster():
    feats, weak, labels, bad = cluster_with_wrong_labels()
    for spec in (refine.Refinement("knn", 10), refine.Refinement("graph", 10, 0.9)):
        logits, _ = refine.refine(spec, feats, weak)
        fixed = np.mean(np.asarray(logits).argmax(1)[bad] == 0)
        assert fixed >= 0.8, (spec, fixed)
        assert np.mean(np.asarray(logits).argmax(1) == labels) > 0.95
    _, weights = refine.refine(refine.Refinement("filter", 10, 0.0, len(bad) / len(labels)), feats, weak)
    dropped = np.flatnonzero(np.asarray(weights) == 0)
    assert np.mean(np.isin(dropped, bad)) >= 0.8  # what the filter drops is mostly the wrong labels


def test_refinement_needs_fewer_neighbours_than_rows(pool):
    with pytest.raises(ValueError, match="refine_k = 70"):
        refine.neighbours(pool[0], 70)


# ------------------------------------------------------------------ selection


def test_regret_of_rules_whose_answer_is_known_by_construction():
    """Test' accuracy peaks at grid point 1, epoch 3. 'refined' follows it; 'agreement' peaks at grid point 0, epoch
    1 (the student that agrees most with its teacher generalises worst); the others are constant, so they keep the
    first point and epoch. Regrets are then known exactly."""
    seeds, points, epochs = 2, 2, 3
    test = np.zeros((seeds, points, epochs)) + 0.5
    test[:, 1, 2] = 0.9
    test[:, 0, 0] = 0.4
    history = {"test_acc": test,
               "score_agreement": 1.0 - test, "score_refined": test + 0.01,
               "score_misfit": np.zeros_like(test), "score_confidence": np.ones_like(test)}
    out = select.regret(history)
    assert out["oracle"]["grid_index"] == 1 and out["oracle"]["test_acc"] == [0.9, 0.9]
    assert out["refined"]["regret"] == pytest.approx(0.0)
    assert out["agreement"]["grid_index"] == 0 and out["agreement"]["regret"] == pytest.approx(0.4 - 0.9)
    assert out["misfit"]["regret"] == out["confidence"]["regret"] == pytest.approx(0.4 - 0.9)
    # a grid point that failed on a seed is never chosen, by any rule, even the oracle
    failed = np.array([[False, True], [False, False]])
    assert select.regret(history, failed)["oracle"]["grid_index"] == 0
    assert select.regret({"test_acc": test}) is None  # a history without the rules' scores


def test_a_method_whose_every_grid_point_failed_has_no_regret_row():
    """Issue 31 (5): a failed method is reported as failed, never as an accuracy with regret +0.00 in the mean."""
    from w2s_jax import results
    from w2s_jax.config import Hparams

    seeds, points, epochs = 2, 2, 3
    test = np.full((seeds, points, epochs), 0.5)
    history = {"test_acc": test, "train_loss": np.zeros_like(test),
               **{f"score_{c}": test for c in select.CRITERIA}}
    evals = {k: np.full((seeds, points), 0.5) for k in ("test_acc", "agreement", "val_score", "misfit", "test_ce")}
    hps = Hparams(*(np.full(points, v, np.float32) for v in Hparams()))
    weak = {"test_acc": np.full(seeds, 0.4), "test_ce": np.ones(seeds)}
    failed = {"ce+lp": np.zeros((seeds, points), bool), "kd+lp": np.array([[True, False], [False, True]])}
    summary = results.summarize({m: evals for m in failed}, {m: np.ones((seeds, points)) for m in failed}, hps, weak,
                                None, failed, {m: history for m in failed})
    assert summary["methods"]["kd+lp"]["failed"] and set(summary["selection"]["methods"]) == {"ce+lp"}
    assert "kd+lp" not in results.selection_table(summary)


def test_scores_of_one_model():
    import jax.numpy as jnp

    weak = jnp.array([[3.0, 0, 0], [0, 3.0, 0], [1.0, 0.9, 0], [0, 0, 3.0]])
    student = jnp.array([[5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0]])
    labels = jnp.array([0, 0, 1, 2])
    view = select.val_view(weak, student, labels)
    got = select.scores(student, weak, jnp.ones(4), view, False)
    assert float(got["agreement"]) == pytest.approx(0.5) and float(got["refined"]) == 1.0
    assert float(got["misfit"]) > 0
    # unsure rows: weak top probability at or below its median, rows 1.. here the third row (and the tied ones)
    assert 0 < float(got["confidence"]) <= 1
    kept = select.scores(student, weak, jnp.array([1.0, 0.0, 0.0, 1.0]), view, False)
    assert float(kept["agreement"]) == 1.0  # only rows a filter kept count
    truth = select.scores(student, weak, jnp.ones(4), view, True)
    assert all(float(v) == 1.0 for v in truth.values())  # a ceiling is chosen on the truth under every rule


# ------------------------------------------------------------------ end to end


def fit(store, out, *args):
    result = CliRunner().invoke(cli.main, ["--store", str(store), "--seeds", "2", "--epochs", "4", "--out", str(out),
                                           "--no-compile-cache", *args])
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "metrics.json").read_text())


@pytest.fixture
def noisy_store(tmp_path):
    """Class clusters, weak labels right about 60% of the time (conftest.synthetic_store)."""
    from conftest import synthetic_store

    path = tmp_path / "noisy.h5"
    synthetic_store(path)
    return path


def test_refined_rows_from_the_cli_beat_the_unrefined_one(noisy_store, tmp_path):
    out, summary = fit(noisy_store, tmp_path / "r", "--methods", "ce+lp,ceiling+lp",
                       "--refine", "knn,graph,filter", "--grid", "refine_k=5,10")
    methods = summary["methods"]
    assert set(methods) == {"ce+lp", "ce+lp@knn", "ce+lp@graph", "ce+lp@filter", "ceiling+lp"}
    plain = np.mean(methods["ce+lp"]["test_acc"])
    for name in ("ce+lp@knn", "ce+lp@graph"):
        assert np.mean(methods[name]["test_acc"]) > plain + 0.05, (name, plain)  # measured +10 to +15 points
    assert "ce+lp@knn" in summary["pgr"]  # PGR against the linear ceiling
    assert "Choosing without labels" in out and "oracle: best on test' (yardstick only)" in out
    # the rule used chose the reported numbers: its column of the regret table is the table's accuracy
    for name, choice in summary["selection"]["methods"].items():
        assert choice["agreement"]["test_acc"] == pytest.approx(methods[name]["test_acc"])
        assert choice["agreement"]["grid_index"] == methods[name]["grid_index"]
        assert all(choice[c]["regret"] <= 1e-9 for c in select.CRITERIA)
    # saved heads, for w2s-predict and load_heads; a heads.json written before the refine_* fields still loads
    from w2s_jax import load_heads, store as st

    feats = st.read_store(noisy_store).splits["test"].features_NxD[:7]
    assert load_heads(tmp_path / "r", ["ce+lp@knn"])["ce+lp@knn"].logits(feats).shape == (7, 5)
    index_path = tmp_path / "r" / "heads" / "heads.json"
    index = json.loads(index_path.read_text())
    for field in ("refine_k", "refine_alpha", "refine_c"):
        del index["hparams"][field]
    index_path.write_text(json.dumps(index))
    assert load_heads(tmp_path / "r", ["ce+lp"])["ce+lp"].logits(feats).shape == (7, 5)


def test_a_filter_that_would_drop_nearly_every_row_is_refused():
    """Issue 31 (13): refine_c near 1 dropped every hold_val row without a word; it is refused by its range."""
    from w2s_jax.config import FitConfig, Hparams

    with pytest.raises(ValueError, match=r"refine_c = 0.95 is out of range; valid: \[0, 0.9\]"):
        FitConfig(store="s", weak="w", methods=("ce+lp@filter",), hparams=Hparams(refine_c=0.95))
    FitConfig(store="s", weak="w", methods=("ce+lp@filter",), hparams=Hparams(refine_c=0.9))


def test_select_changes_what_is_kept_and_is_recorded(noisy_store, tmp_path):
    _, by_agreement = fit(noisy_store, tmp_path / "a", "--methods", "ce+lp", "--grid", "lp_shrinkage=0.1,0.9")
    _, by_refined = fit(noisy_store, tmp_path / "b", "--methods", "ce+lp", "--grid", "lp_shrinkage=0.1,0.9",
                        "--select", "refined")
    assert by_refined["selection"]["rule"] == "refined"
    assert json.loads((tmp_path / "b" / "config.json").read_text())["select"] == "refined"
    # each fit reports what its rule chose; both fits score every rule alike, so the tables agree across them
    chosen = by_agreement["selection"]["methods"]["ce+lp"]["refined"]
    assert by_refined["methods"]["ce+lp"]["test_acc"] == pytest.approx(chosen["test_acc"])
    assert by_refined["methods"]["ce+lp"]["grid_index"] == chosen["grid_index"]


def test_refinement_and_selection_refusals(noisy_store, tmp_path):
    runner = CliRunner()
    base = ["--store", str(noisy_store), "--seeds", "1", "--epochs", "1", "--no-compile-cache"]
    result = runner.invoke(cli.main, [*base, "--methods", "ce+lp", "--refine", "smooth", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "unknown refinement(s) ['smooth']" in result.output
    result = runner.invoke(cli.main, [*base, "--methods", "ce+lp", "--select", "oracle", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "oracle" in result.output
    result = runner.invoke(cli.main, [*base, "--methods", "ce+lp@knn", "--grid", "refine_k=2.5",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "refine_k = 2.5 is not a whole number" in result.output
    result = runner.invoke(cli.main, [*base, "--methods", "ceiling+lp@knn", "--out", str(tmp_path / "x")])
    assert result.exit_code != 0 and "the ceilings and the multi-weak methods are not refined" in result.output


def test_a_defined_method_gets_refinements_and_may_not_take_an_at_name(registries):
    from w2s_jax import methods

    methods.define_method("mix+lp", "linear", weak_soft=0.5, weak_hard=0.5)
    assert methods.METHODS["mix+lp@graph"] == methods.Method("linear", "mix+lp", "weak", "graph")
    assert methods.definitions(["mix+lp@graph"]) == methods.definitions(["mix+lp"])  # the folder rebuilds the base
    with pytest.raises(ValueError, match="METHOD@KIND names a refinement"):
        methods.define_method("mine@knn", "linear", weak_hard=1.0)


@pytest.mark.parametrize("name, message", [
    ("weak", "row label of the tables"), ("zero-shot", "row label"), ("mean regret (points)", "row label"),
    ("best ceiling (x)", "row label"), ("a|b", "'|' is not allowed"), ("a\nb", "is not allowed"),
    ("a\x00b", "is not allowed"), ("x" * 300, "300 characters"),
])
def test_names_that_would_break_a_table_or_a_file_are_refused_before_any_work(registries, name, message):
    """Issue 31 (4, 8): a user method cannot take a table's row label (it replaced the weak row of Table 2) or a name
    that breaks a table or a heads file (which failed only after training)."""
    from w2s_jax import methods

    with pytest.raises(ValueError, match=message):
        methods.define_method(name, "linear", weak_hard=1.0)
    assert name not in methods.METHODS


def test_list_methods_shows_the_refinements():
    out = CliRunner().invoke(cli.main, ["--list-methods"]).output
    assert "ce+lp@knn" in out and "cpl@graph" in out and "refined by filter" in out
    assert "ceiling+lp@knn" not in out and "raven+lp@knn" not in out


def test_refined_methods_fitted_without_their_base_are_reported(noisy_store, tmp_path):
    """Issue 31 (6): METHOD@KIND rows stand where their base would, fitted or not; nothing fitted vanishes."""
    from w2s_jax import results

    assert results.method_order(["cpl@graph", "ce+lp@knn", "ceiling+lp"]) == ["ce+lp@knn", "cpl@graph", "ceiling+lp"]
    out, summary = fit(noisy_store, tmp_path / "r", "--methods", "cpl@graph,ce+lp@knn,ceiling+lp", "--epochs", "2")
    for row in ("| ce+lp@knn |", "| cpl@graph |"):
        assert row in out and row in (tmp_path / "r" / "table.md").read_text()
    assert {"ce+lp@knn", "cpl@graph"} <= set(summary["selection"]["methods"])


def test_a_fit_without_refinements_runs_on_a_small_store(tmp_path):
    """Issue 31 (9): the `refined` rule's reference kNN, which nobody asked for by name, uses at most pool - 1
    neighbours, so a 12-row store is fitted instead of refused after compiling."""
    from conftest import synthetic_store

    path = tmp_path / "small.h5"
    synthetic_store(path, n_test=12)
    out, summary = fit(path, tmp_path / "r", "--methods", "ce+lp", "--batch-size", "4", "--epochs", "2")
    assert "ce+lp" in summary["methods"] and not summary["methods"]["ce+lp"]["failed"]


def test_the_delta_note_names_the_rule_and_show_says_select_is_ignored(noisy_store, tmp_path):
    """Issue 31 (17, 19): Δ's baseline is chosen by the fit's rule and its note says which; --show does not
    re-select, and says so."""
    from w2s_jax import report

    fit(noisy_store, tmp_path / "r", "--methods", "cpl,ce+lp,kd+lp", "--select", "refined", "--epochs", "2")
    tables, _ = report.write_report([tmp_path / "r"], tmp_path / "rep")
    table2 = next(t for t in tables if t.name.startswith("table2"))
    assert "selection rule (refined;" in table2.note
    r = CliRunner().invoke(cli.main, ["--show", str(tmp_path / "r"), "--select", "misfit"])
    assert r.exit_code == 0 and "--select misfit is ignored with --show" in r.output
