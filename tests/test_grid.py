"""The grid as units: the plan, shards run in parallel processes (one of them killed and resumed), TP chunks, and a
local Ray cluster, each giving the results a sequential run gives, file for file."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from extract import units as unitlib
from extract.experiment import load_experiment, main as run_main, run_experiment

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
from bench_scaleout import GRID  # noqa: E402  the grid bench_scaleout.py measures, at a tiny size

DEMO = GRID.format(out="{out}", limit=60, methods='["cpl"]', seeds=2, epochs=1)


def results_files(out: Path) -> dict:
    """Every file a run leaves in ``out`` (stores, results, weak models across domains) by its path, results folder
    names read without their hash (which keys the store's creation time), except what records when and how fast:
    timings, the store's creation time, the HDF5 files themselves (their bytes hold it)."""
    found = {}
    for sub in ("results", "cross-weak"):
        for p in sorted((out / sub).rglob("*")):
            if p.is_file() and not p.name.startswith(".") and p.name not in ("timings.json", "provenance.json"):
                parts = [x.split("-")[0] + "-*" if x.startswith(("fit-", "tp-")) else x for x in p.relative_to(out).parts]
                found["/".join(parts)] = p.read_bytes()
    return found


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """One sequential run of the demo grid, kept apart: ``(its files, the experiment file)``; a later run in the same
    ``out`` compares with it."""
    folder = tmp_path_factory.mktemp("grid")
    exp = folder / "exp.toml"
    exp.write_text(DEMO.format(out=folder / "out"))
    run_experiment(load_experiment(exp), log=lambda line: None)
    files = results_files(folder / "out")
    shutil.rmtree(folder / "out")
    return files, exp


def test_units_are_planned_balanced_and_priced():
    stores = [unitlib.StorePlan(0, d, f"x-{d}", ("a", "b", "c"), 3, (1000 * (i + 1), 500)) for i, d in
              enumerate(("p", "q"))]
    units = unitlib.plan_units(stores, seeds=2, epochs=2, multi=True, tp={"methods": ["kd+tp"]}, weak_epochs=1,
                               cross_blocks=(0,), tp_chunks=2)
    keys = [u.key for u in units]
    assert keys[:5] == ["extract/x-p", "fit/x-p", "fit-multi/x-p", "tp/x-p/a+b", "tp/x-p/c"] and keys[-1] == "report"
    assert set(units[-1].deps) == set(keys[:-1]) and {"cross/x-p", "cross/x-q"} <= set(keys)
    for u in units:  # every dependency comes before the unit
        assert all(keys.index(d) < keys.index(u.key) for d in u.deps)
    assign = unitlib.assign(units, 2)
    assert assign == unitlib.assign(list(units), 2) and set(assign.values()) == {0, 1} and "report" not in assign
    loads = [sum(u.cost for u in units if assign.get(u.key) == s) for s in (0, 1)]
    assert max(loads) - min(loads) <= max(u.cost for u in units)  # LPT: within one unit of each other
    work = sum(u.cost for u in units)
    one, many = unitlib.makespan(units, 1), unitlib.makespan(units, 8)
    assert one <= work + 1e-6 and many >= unitlib.critical_path(units) - 1e-6 and many < one
    assert unitlib.chunks(("a", "b", "c", "d", "e"), 2) == [("a", "b", "c"), ("d", "e")]


def test_plan_prints_units_and_runs_nothing(tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(DEMO.format(out=tmp_path / "out"))
    r = CliRunner().invoke(run_main, [str(exp), "--plan", "--gpus", "2"])
    assert r.exit_code == 0, r.output
    assert "fit/demo-mnist" in r.output and "after: extract/demo-mnist" in r.output and "cross/demo-digits" in r.output
    assert "on 2 device(s) about" in r.output and not (tmp_path / "out").exists()
    r = CliRunner().invoke(run_main, [str(exp), "--plan", "--shard", "0/2"])
    assert r.exit_code != 0 and "one of --plan, --shard and --ray" in r.output


def _w2s_run(exp, *args, env=None):
    return subprocess.Popen([sys.executable, "-m", "extract.experiment", str(exp), "--no-compile-cache", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


def test_two_shards_in_parallel_then_a_plain_run_equal_the_sequential_run(sequential, tmp_path):
    """The shard of ``fit/demo-mnist`` is killed as that unit starts, and resumes without redoing what it finished."""
    from extract.grid import Grid

    files, exp = sequential
    grid = Grid(load_experiment(exp), lambda line: None, tp_chunks=2)
    killed = unitlib.assign(grid.units, 2)["fit/demo-mnist"]
    marker = tmp_path / "killed"
    fault = {"W2S_TEST_FAULT": f"fit/demo-mnist=once:{marker}"}
    first = [_w2s_run(exp, "--shard", f"{i}/2", env=fault if i == killed else None) for i in (0, 1)]
    logs = [p.communicate()[0] for p in first]
    assert first[1 - killed].returncode == 0, logs[1 - killed]
    assert first[killed].returncode == 3 and marker.exists(), logs[killed]  # died as the fit started
    finished = [line.split(":")[0].removeprefix("unit ") for line in logs[killed].splitlines()
                if line.startswith("unit ") and line.endswith(" s") and ": finished" in line]
    assert finished, logs[killed]
    lines = []  # the killed shard again (in this process: the marker lets the fit run now)
    assert Grid(load_experiment(exp), lines.append, tp_chunks=2).run_shard(killed, 2) == []
    log = "\n".join(lines)
    assert all(f"unit {key}: done already" in log for key in finished if not key.startswith("cross")), log
    assert "unit fit/demo-mnist: finished" in log
    lines = []
    run_experiment(load_experiment(exp), log=lines.append)  # the plain run: what is left, and the report
    assert any(line.startswith("The full report") for line in lines)
    out = Path(load_experiment(exp)["out"])
    assert results_files(out) == files  # metrics, heads, histories, splits, configs, cross-domain weak logits
    shutil.rmtree(out)


def test_ray_runs_the_grid_retries_a_crash_and_names_a_failure(sequential, imagefolder_root, tmp_path,
                                                                monkeypatch):
    """One run on a local cluster (2 CPUs, 2 logical GPUs) of the demo grid plus a block whose extraction always
    fails: a fit whose worker dies once is retried, the failing unit is named, the unit that needs it is not run,
    and every other unit gives the sequential run's files."""
    ray = pytest.importorskip("ray")
    from extract.ray_run import run_on_ray

    files, exp_path = sequential
    extra = f'''
[[data]]
dataset = "imagefolder"
root = "{imagefolder_root}"
weak = ["pixels@2"]
'''
    text = exp_path.read_text()
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(text.replace("[fit]", extra + "[fit]", 1))
    exp = load_experiment(exp_file)
    marker = tmp_path / "crashed"
    monkeypatch.setenv("W2S_TEST_FAULT", f"fit/demo-digits=once:{marker};extract/imagefolder-folder=raise")
    lines = []
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)  # its workers inherit the faults
    try:
        failed = run_on_ray(exp, None, log=lines.append, compile_cache=False)
    finally:
        ray.shutdown()
    text = "\n".join(lines)
    assert "Ray cluster: 2 CPUs, 2 GPUs" in lines[0]
    assert marker.exists() and "unit fit/demo-digits: finished" in text  # its worker died once; retried
    assert failed == ["extract/imagefolder-folder", "fit/imagefolder-folder"], text
    assert "unit extract/imagefolder-folder: FAILED (RuntimeError: unit extract/imagefolder-folder fails" in text
    assert "unit fit/imagefolder-folder: not run, as extract/imagefolder-folder did not finish" in text
    assert "the report is not written" in text and not (Path(exp["out"]) / "report").exists()
    assert results_files(Path(exp["out"])) == files  # every other unit: the sequential run's files
    shutil.rmtree(exp["out"])


def test_ray_is_not_imported_without_ray_and_its_absence_says_how_to_install(tmp_path, monkeypatch):
    code = ("import sys; from extract import experiment, grid; "
            "assert 'ray' not in sys.modules, 'ray imported'; print('ok')")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "ok"
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    exp = tmp_path / "exp.toml"
    exp.write_text(DEMO.format(out=tmp_path / "out"))
    r = CliRunner().invoke(run_main, [str(exp), "--ray"])
    assert r.exit_code == 1 and "pip install 'w2s[ray]'" in r.output and not (tmp_path / "out").exists()


def test_tp_chunks_of_shards_give_the_folders_of_one_tp_run(tiny_clip, imagefolder_root, tmp_path):
    """A store's prompt tuning split over two shards (a weak model each, each chunk training its own ceiling)
    writes the same TP folders as one run over both weak models."""
    from extract.grid import Grid

    text = f"""
out = "{tmp_path / 'out'}"
strong = "{tiny_clip}"
[[data]]
dataset = "imagefolder"
root = "{imagefolder_root}"
weak = ["pixels@2", "pixels@3"]
[fit]
methods = ["ce+lp"]
seeds = 2
epochs = 1
[tp]
methods = ["kd+tp", "ceiling+tp"]
epochs = 1
batch_size = 8
n_ctx = 2
[extract]
num_workers = 0
"""
    exp_file = tmp_path / "exp.toml"
    exp_file.write_text(text)
    exp = load_experiment(exp_file)
    Grid(exp, lambda line: None).run_all()
    files = results_files(tmp_path / "out")
    shutil.rmtree(tmp_path / "out" / "results")
    sharded = Grid(exp, lambda line: None, tp_chunks=2)
    assert [u.key for u in sharded.units if u.kind == "tp"] == ["tp/imagefolder-folder/pixels@2",
                                                                "tp/imagefolder-folder/pixels@3"]
    for shard in (0, 1):
        assert sharded.run_shard(shard, 2) == []
    assert {k: v for k, v in results_files(tmp_path / "out").items() if "/tp-*/" in k} == \
        {k: v for k, v in files.items() if "/tp-*/" in k} != {}
