"""The second adversarial probe's findings (issue 25): each case failed before its fix (a wrong number, a silent
merge, or a traceback) and must now give the right number or a clear error that names the problem and the fix."""
import json
import shutil

import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from extract import cli as extract_cli
from extract import predict_cli
from w2s_jax import cli as fit_cli
from w2s_jax import report


def fit(store, out, *extra, methods="cpl,kd+lp", epochs=2):
    r = CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", methods, "--seeds", "2", "--epochs",
                                          str(epochs), "--batch-size", "32", "--out", str(out), *map(str, extra)])
    return r


def predict(*args):
    return CliRunner().invoke(predict_cli.main, [*map(str, args)])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    folder = tmp_path_factory.mktemp("probe")
    synthetic_store(folder / "s.h5")
    r = fit(folder / "s.h5", folder / "res")
    assert r.exit_code == 0, r.output
    return folder / "s.h5", folder / "res"


def copy_of(res, tmp_path):
    shutil.copytree(res, tmp_path / "res")
    return tmp_path / "res"


def clean(r, *words):
    """A refusal: non-zero exit, a message, no traceback; the message holds ``words``."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, (SystemExit, type(None))), repr(r.exception)
    for word in words:
        assert word in r.output, (word, r.output)


# 1. the fit's own store is told by its rows, not by its name
def test_predict_does_not_compare_test_accuracy_on_a_store_with_other_rows(fitted, tmp_path):
    _, res = fitted
    other = tmp_path / "other.h5"
    synthetic_store(other, n_test=599)  # same dataset, domain and split hash; one row fewer
    r = predict("--results", res, "--store", other, "--method", "kd+lp", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    assert "the fit reported" not in r.output
    assert "not compared with the fit's" in r.output and "599 rows" in r.output


def test_predict_still_compares_on_the_fit_own_store(fitted, tmp_path):
    store, res = fitted
    r = predict("--results", res, "--store", store, "--method", "kd+lp", "--out", tmp_path / "p.csv")
    assert r.exit_code == 0 and "the fit reported" in r.output, r.output


# 2. fits trained differently are never merged into one table
def test_report_and_show_refuse_to_merge_fits_of_other_epochs(fitted, tmp_path):
    store, res = fitted
    r = fit(store, tmp_path / "more", methods="ce+lp,ceiling+lp", epochs=3)
    assert r.exit_code == 0, r.output
    with pytest.raises(ValueError, match="fit differently .*epochs: 2 vs 3"):
        report.write_report([res, tmp_path / "more"], tmp_path / "rep")
    clean(CliRunner().invoke(fit_cli.main, ["--show", str(res), "--show", str(tmp_path / "more")]),
          "fit differently", "epochs")
    r = fit(store, tmp_path / "again", methods="kd+lp")
    clean(CliRunner().invoke(report.main, [str(res), str(tmp_path / "again"), "--out", str(tmp_path / "r2")]),
          "kd+lp is in both")


# 3. an --import may not replace a built-in head silently; its folder records the import
REPLACING = """
from w2s_jax.heads import HEADS, Head, LinearHead
HEADS["linear"] = Head(LinearHead)
"""


def test_import_replacing_a_builtin_head_is_refused_unless_asked(fitted, tmp_path, registries):
    store, _ = fitted
    plugin = tmp_path / "replace_linear.py"
    plugin.write_text(REPLACING)
    clean(fit(store, tmp_path / "r", "--import", plugin), "replaces the registered head 'linear'", "--allow-replace")
    r = fit(store, tmp_path / "r", "--import", plugin, "--allow-replace")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r" / "config.json").read_text())["imports"] == [str(plugin)]
    import sys

    sys.modules.pop(plugin.stem)  # w2s-predict runs in a new process, where the plugin is not imported
    clean(predict("--results", tmp_path / "r", "--store", store, "--method", "kd+lp", "--out", tmp_path / "p.csv"),
          f"was fit with --import {plugin}")


# 4. an empty method list is refused before any work
def test_an_empty_method_list_is_refused(fitted):
    store, _ = fitted
    clean(CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", ","]), "no methods to fit")


# 5. a negative limit is refused
def test_a_negative_limit_is_refused():
    clean(CliRunner().invoke(extract_cli.main, ["--dataset", "demo", "--limit", "-5"]), "--limit", "-5")


# 6. heads.json is checked against the saved arrays
def test_heads_json_that_does_not_fit_the_arrays_is_refused(fitted, tmp_path):
    _, res = fitted
    res = copy_of(res, tmp_path)
    index = json.loads((res / "heads" / "heads.json").read_text())
    index["feature_dim"] = 99
    (res / "heads" / "heads.json").write_text(json.dumps(index))
    clean(predict("--results", res, "--export-prototypes", tmp_path / "p.npy"), "cpl.msgpack", "1 x 99 features",
          "damaged")


# 7. a compile-cache folder that cannot be made falls back to no cache, with one warning
def test_an_unusable_compile_cache_warns_and_the_fit_runs(fitted, tmp_path, monkeypatch):
    store, _ = fitted
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("W2S_CACHE", str(blocker))
    r = fit(store, tmp_path / "r", methods="cpl")
    assert r.exit_code == 0, r.output
    assert r.output.count("compilation cache off") == 1 and "W2S_CACHE" in r.output


# 8. missing files and folders are named
@pytest.mark.parametrize("remove, words", [
    ("heads/cpl.msgpack", ["cpl.msgpack not found", "refit"]),
    ("provenance.json", ["provenance.json not found"]),
])
def test_predict_names_a_missing_file(fitted, tmp_path, remove, words):
    store, res = fitted
    res = copy_of(res, tmp_path)
    (res / remove).unlink()
    clean(predict("--results", res, "--store", store, "--out", tmp_path / "p.csv"), *words)


def test_predict_names_a_missing_output_folder(fitted, tmp_path):
    store, res = fitted
    clean(predict("--results", res, "--store", store, "--out", tmp_path / "nowhere" / "p.csv"), "does not exist")


# 9. a user head whose output is not B x K is named before compiling
WIDE_HEAD = """
import flax.linen as nn
from w2s_jax.heads import HEADS, Head
from w2s_jax.methods import METHODS, Method


class Wide(nn.Module):
    num_classes: int

    @nn.compact
    def __call__(self, feats_BxD, hp, start=None):
        return nn.Dense(self.num_classes + 1)(feats_BxD)


HEADS["wide"] = Head(Wide)
METHODS["kd+wide"] = Method("wide", "kd", "weak")
"""


def test_a_head_with_the_wrong_output_shape_is_named(fitted, tmp_path, registries):
    store, _ = fitted
    plugin = tmp_path / "wide.py"
    plugin.write_text(WIDE_HEAD)
    clean(fit(store, tmp_path / "r", "--import", plugin, methods="kd+wide"), "head 'wide' returns logits of shape (3, 6)",
          "(3, 5)")


# 10. a plugin that raises at import is named
def test_a_plugin_that_raises_is_named(fitted, tmp_path):
    store, _ = fitted
    plugin = tmp_path / "broken.py"
    plugin.write_text("raise RuntimeError('half-written plugin')\n")
    clean(fit(store, tmp_path / "r", "--import", plugin), "broken.py: importing it raised RuntimeError",
          "half-written plugin")


def test_a_plugin_that_exits_or_clashes_is_named(fitted, tmp_path, registries):
    """Issue 31 (16): a plugin's sys.exit() is an error naming it, not a silent end; a name clash names the plugin."""
    store, _ = fitted
    quitter = tmp_path / "quitter.py"
    quitter.write_text("import sys\nsys.exit(3)\n")
    clean(fit(store, tmp_path / "r", "--import", quitter), "quitter.py: importing it raised SystemExit")
    clash = tmp_path / "clash.py"
    clash.write_text("from w2s_jax.methods import define_method\ndefine_method('kd+lp', 'linear', weak_hard=1.0)\n")
    clean(fit(store, tmp_path / "r2", "--import", clash), "--import", "clash.py", "the name exists already")


def test_unclear_messages_now_say_what_is_wrong(fitted, tmp_path):
    """Issue 31 (16): a refined ceiling, an empty grid list."""
    store, _ = fitted
    clean(fit(store, tmp_path / "r", methods="ceiling+lp@knn"), "the ceilings and the multi-weak methods are not refined")
    clean(fit(store, tmp_path / "r", "--grid", "lr="), "lr")
    from w2s_jax.config import check_hparams, Hparams

    with pytest.raises(ValueError, match="give at least one value"):
        check_hparams(Hparams(), (("lr", ()),))


def test_builtin_methods_are_not_recorded_as_user_definitions(fitted, tmp_path, registries):
    """Issue 31 (15): config.json's "defined" holds the user's methods only; two folders defining one name differently
    are told that the folders conflict."""
    from w2s_jax import methods, results

    _, res = fitted
    assert json.loads((res / "config.json").read_text())["defined"] == []
    assert methods.definitions(["cpl", "kd+lp", "cpl@knn"]) == ()
    a, b = copy_of(res, tmp_path / "a"), copy_of(res, tmp_path / "b")
    for folder, weight in ((a, 0.5), (b, 0.25)):
        path = folder / "metrics.json"
        summary = json.loads(path.read_text())
        summary["defined"] = [["mine+lp", "linear", [["weak_soft", weight], ["weak_hard", 1 - weight]]]]
        path.write_text(json.dumps(summary))
    results.load_summary(a)
    with pytest.raises(ValueError, match="defined otherwise already .* cannot be read together"):
        results.load_summary(b)


# 12. damaged files are named
@pytest.mark.parametrize("damage, words", [
    ("heads/cpl.msgpack", ["cpl.msgpack cannot be read", "cut short"]),
    ("heads/heads.json", ["heads.json is not valid JSON", "cut short"]),
])
def test_a_truncated_file_is_named(fitted, tmp_path, damage, words):
    _, res = fitted
    res = copy_of(res, tmp_path)
    path = res / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    clean(predict("--results", res, "--export-prototypes", tmp_path / "p.npy"), *words)


def test_a_truncated_metrics_file_is_named(fitted, tmp_path):
    _, res = fitted
    res = copy_of(res, tmp_path)
    text = (res / "metrics.json").read_text()
    (res / "metrics.json").write_text(text[: len(text) // 2])
    clean(CliRunner().invoke(fit_cli.main, ["--show", str(res)]), "metrics.json is not valid JSON")


# 13. the refusal to overwrite an exported prototype file names the right option
def test_export_overwrite_refusal_names_the_export_option(fitted, tmp_path):
    _, res = fitted
    target = tmp_path / "p.npy"
    assert predict("--results", res, "--export-prototypes", target).exit_code == 0
    clean(predict("--results", res, "--export-prototypes", target), "--overwrite", "another --export-prototypes path")
