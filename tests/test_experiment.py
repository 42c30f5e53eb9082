"""w2s-run: an experiment file runs end to end, skips finished work, resumes after a crash, rejects bad files."""
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract import experiment
from w2s_jax import run as runlib

TOML = """
out = "{out}"
strong = "efficientnet-lite0@32"
[[data]]
dataset = "demo"
domains = ["mnist"]
limit = 120
weak = ["pixels@2", "pixels@3"]
[fit]
methods = ["cpl", "kd+lp", "ceiling+proto"]
multi_weak = ["raven+cpl"]
seeds = 2
epochs = 2
batch_size = 32
[extract]
num_workers = 0
batch_size = 64
"""


def write(tmp_path, text, name="exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_runs_skips_and_resumes(tmp_path, monkeypatch):
    path = write(tmp_path, TOML.format(out=tmp_path / "out"))
    calls = []  # one run_each call per compiled program: every weak model of the store at once, then the ensemble
    real_run = runlib.run_each

    def crashing_run(cfgs, out_dirs, **kw):
        calls.append(tuple("+".join(c.ensemble or (c.weak,)) for c in cfgs))
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return real_run(cfgs, out_dirs, **kw)

    monkeypatch.setattr(runlib, "run_each", crashing_run)
    with pytest.raises(RuntimeError, match="simulated crash"):
        experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: None)
    assert calls == [("pixels@2", "pixels@3"), ("pixels@2+pixels@3",)]
    # rerun: only the crashed fit is redone, then the report is written
    monkeypatch.setattr(runlib, "run_each", lambda cfgs, outs, **kw: (
        calls.append(tuple("+".join(c.ensemble or (c.weak,)) for c in cfgs)), real_run(cfgs, outs, **kw))[1])
    lines = []
    report = experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(a)))
    assert calls[2:] == [("pixels@2+pixels@3",)]  # the multi-weak fit
    # it says where it is in the grid
    assert "== store 1 of 1: demo/mnist" in lines and "== fits 1-2 of 3: demo/mnist, weak pixels@2, pixels@3" in lines
    assert "== fit 3 of 3: demo/mnist, weak pixels@2+pixels@3" in lines
    assert any(line.startswith("compiled in") for line in lines)
    # the first screen: the headline table with PGR, one line saying where the rest is (issue 25)
    text = "\n".join(lines)
    assert "Table 2 analogue: test' accuracy (%) by domain, weak model pixels@2 (trained on the target labels), with PGR" in text
    assert "PGR (avg.)" in text and "The full report," in text and "--verbose" in text
    assert "Choosing without labels (selection.md): mean regret" in text and "agreement (used)" in text
    assert "Misfit predicts gain?" not in text and (report / "misfit-gain.md").exists()
    assert (report / "table2-pixels@2.md").exists() and (report / "table3-demo-mnist.md").exists()
    assert (report / "curves-demo-mnist-pixels@3.png").exists()
    assert "raven+cpl" in (report / "multi-weak.md").read_text() and (report / "weak-choice.md").exists()
    assert (report / "misfit-gain-demo-mnist.png").exists()
    assert "oracle: best on test' (yardstick only)" in (report / "selection.md").read_text()  # issue 23
    # nothing left to do; an edit (more epochs) redoes only the fits
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: None)
    assert len(calls) == 3
    # a folder from before heads were saved with each fit is fitted again, alone
    import shutil

    shutil.rmtree(next((tmp_path / "out" / "results" / "demo-mnist" / "pixels@3").rglob("heads")))
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: None)
    assert calls[3:] == [("pixels@3",)]
    write(tmp_path, TOML.format(out=tmp_path / "out").replace("epochs = 2", "epochs = 3"))
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: None)
    assert calls[4:] == [("pixels@2", "pixels@3"), ("pixels@2+pixels@3",)]


def test_one_compiled_fit_program_per_store(tmp_path, caplog):
    """w2s-run fits every weak model of a store by one program: two stores x two weak models, two epoch programs
    (each weak model's fit as it would be alone: tests/test_multi_weak.py)."""
    import logging
    import re

    text = (TOML.format(out=tmp_path / "out").replace('domains = ["mnist"]', 'domains = ["mnist", "digits"]')
            .replace('multi_weak = ["raven+cpl"]\n', ""))
    with caplog.at_level(logging.DEBUG, logger="jax._src.dispatch"):
        experiment.run_experiment(experiment.load_experiment(write(tmp_path, text)), log=lambda *a: None)
    programs = re.findall(r"Finished XLA compilation of jit\((\w+)\)", caplog.text)
    assert programs.count("epoch_program") == 2 and programs.count("start_program") == 2, programs
    for domain in ("mnist", "digits"):
        for weak in ("pixels@2", "pixels@3"):
            (folder,) = (tmp_path / "out" / "results" / f"demo-{domain}" / weak).glob("fit-*")
            assert (folder / "heads" / "heads.json").exists()


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace("seeds = 2", "seeds = 2\nlearning_rate = 3"), "unknown key(s) ['learning_rate'] in [fit]"),
    (lambda t: t.replace('"cpl", ', '"cpl", "magic", '), "unknown method(s) ['magic']"),
    (lambda t: t.replace('multi_weak = ["raven+cpl"]', 'multi_weak = ["kd+lp"]'), "learn from one weak model"),
    (lambda t: t.replace('dataset = "demo"', 'dataset = "domainnet"\nroot = "/nowhere"'), "/nowhere does not exist"),
    (lambda t: t + "\n[fit.grid]\nbogus = [1, 2]\n", "unknown hyperparameter(s) ['bogus']"),
    (lambda t: "typo = 1\n" + t, "unknown key(s) ['typo'] in the top level"),
    (lambda t: t.replace("seeds = 2", 'seeds = 2\nselect = "oracle"'), "select 'oracle': use one of agreement"),
    (lambda t: t.replace("seeds = 2", 'seeds = 2\nrefine = ["smooth"]'), "unknown refinement(s) ['smooth']"),
])
def test_bad_experiment_files(tmp_path, edit, message):
    path = write(tmp_path, edit(TOML.format(out=tmp_path / "out")))
    r = CliRunner().invoke(experiment.main, [str(path)])
    assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output


def test_domainnet_root_follows_w2s_data_and_a_missing_one_names_both(tmp_path, monkeypatch):
    """No root in [[data]]: DomainNet is read from $W2S_DATA/domainnet, where w2s-extract downloads; a missing
    folder is refused naming the path and W2S_DATA (before: the file's /data/domainnet, found by nobody)."""
    monkeypatch.setenv("W2S_DATA", str(tmp_path / "mydata"))
    text = TOML.format(out=tmp_path / "out").replace('dataset = "demo"', 'dataset = "domainnet"')
    text = text.replace('domains = ["mnist"]', 'domains = ["real"]')
    r = CliRunner().invoke(experiment.main, [str(write(tmp_path, text))])
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert str(tmp_path / "mydata" / "domainnet") in r.output and "W2S_DATA" in r.output, r.output
    assert experiment.data_root({"dataset": "domainnet"}) == str(tmp_path / "mydata" / "domainnet")
    assert 'root = "/data' not in (Path(__file__).parent.parent / "experiments" / "domainnet.toml").read_text()


def test_fit_table_selects_and_refines(tmp_path):
    """[fit] select and refine reach the FitConfig; "all" takes named rows beside it (issue 23)."""
    cfg = experiment.fit_config({"methods": ["kd+lp", "cpl"], "refine": ["knn", "filter"], "select": "misfit"},
                                tmp_path / "s.h5", "pixels@2")
    assert cfg.methods == ("kd+lp", "cpl", "kd+lp@knn", "kd+lp@filter", "cpl@knn", "cpl@filter")
    assert cfg.select == "misfit"
    cfg = experiment.fit_config({"methods": ["all", "ce+lp@graph"]}, tmp_path / "s.h5", "pixels@2")
    assert cfg.methods[-1] == "ce+lp@graph" and "cpl" in cfg.methods and cfg.select == "agreement"


def test_prompt_tuning_runs_once_per_store_for_every_weak_model(tmp_path, monkeypatch, tiny_clip):
    """[tp] in an experiment file: one w2s-tp loop per store trains the TP models of all its weak models (one folder
    each, in the report); a rerun finds them done."""
    from extract import tp_cli

    text = (TOML.format(out=tmp_path / "out").replace("efficientnet-lite0@32", tiny_clip)
            .replace('multi_weak = ["raven+cpl"]\n', "").replace('"cpl", "kd+lp", "ceiling+proto"', '"cpl"')
            + '[tp]\nmethods = ["kd+tp", "ceiling+tp"]\nseeds = 2\nepochs = 2\nbatch_size = 32\nn_ctx = 4\n'
            + 'grid = {lr = [0.01, 0.003]}\n')
    path = write(tmp_path, text)
    calls = []
    real = tp_cli.run_tp
    monkeypatch.setattr(tp_cli, "run_tp", lambda cfg, outs, **kw: (calls.append(tuple(outs)), real(cfg, outs, **kw))[1])
    lines = []
    report = experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(a)))
    assert calls == [("pixels@2", "pixels@3")]
    assert any("prompts cut at their last EOT" in line for line in lines)
    assert "| kd+tp |" in (report / "table2-pixels@3.md").read_text()
    assert "| pixels@3 | kd+tp |" in (report / "selection.md").read_text()  # TP's regret rows
    for weak in ("pixels@2", "pixels@3"):
        (folder,) = (tmp_path / "out" / "results" / "demo-mnist" / weak).glob("tp-*")
        assert (folder / "heads" / "heads.json").exists()
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: None)
    assert len(calls) == 1  # done already


def test_editing_a_defined_method_fits_it_again(tmp_path, registries):
    """Issue 31 (7): the folder key holds the [methods.X] definitions, so an edit fits X again instead of reusing
    the stale fit (which then crashed every rerun)."""
    base = (TOML.format(out=tmp_path / "out").replace('multi_weak = ["raven+cpl"]\n', "")
            .replace('"cpl", "kd+lp", "ceiling+proto"', '"mine+lp", "ceiling+lp"')
            .replace('weak = ["pixels@2", "pixels@3"]', 'weak = ["pixels@2"]'))
    folders = []
    for weight in (0.5, 0.25, 0.5):
        path = write(tmp_path, base + f"[methods.\"mine+lp\"]\nhead = \"linear\"\nweak_soft = {weight}\n"
                                      f"weak_hard = {1 - weight}\n")
        lines = []
        experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(a)))
        folders.append(next(line for line in lines if "fit-" in line and ("finished" in line or "done already" in line)))
        from w2s_jax import methods
        from w2s_jax.refine import REFINEMENTS

        for name in ("mine+lp", *(f"mine+lp@{k}" for k in REFINEMENTS)):  # a new process each time
            methods.METHODS.pop(name, None)
        methods.LOSSES.pop("mine+lp", None)
    assert folders[0].startswith("finished") and folders[1].startswith("finished") and folders[2].startswith("done")
    assert folders[0].split()[-1] != folders[1].split()[-1] and folders[0].split()[-1] == folders[2].split()[-1]
