"""Every benchmark script runs at a tiny size and prints its figures: a benchmark that no test runs breaks unnoticed.

Each runs in its own process, as a user runs it (``python benchmarks/NAME.py ...`` from the benchmarks folder),
at a size that takes seconds on a CPU. Only that it runs and what it prints are checked: speed is never asserted.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


def run_script(*args, timeout=1500, env=None) -> str:  # a hang guard only: speed is never asserted
    result = subprocess.run([sys.executable, *map(str, args)], cwd=BENCH, capture_output=True, text=True,
                            timeout=timeout, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_bench_progress_prints_both_paths():
    out = run_script("bench_progress.py", "--n", "600", "--d", "16", "--k", "5", "--epochs", "2", "--seeds", "2",
                     "--repeats", "1")
    assert "single call" in out and "one call per epoch" in out and "overhead of the per-epoch loop" in out


def test_gpu_check_writes_one_json_line_per_step(tmp_path):
    """The device script at its tiny size on the CPU: every step runs (rc 0) and leaves its figures in $OUT. Its
    steps are also the smoke tests of bench_fit.py (every path), bench_step_profile.py, bench_compile_cache.py (its
    three modes), bench_tp.py and bench_refine.py, whose figures are checked here rather than run a second time."""
    result = subprocess.run(["bash", str(BENCH / "gpu_check.sh")], capture_output=True, text=True, timeout=2000,
                            env={**os.environ, "TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert result.returncode == 0, result.stdout + result.stderr
    lines = {x["step"]: x for x in map(json.loads, (tmp_path / "gpu_check.jsonl").read_text().splitlines())}
    assert set(lines) == {"machine", "fit_domainnet", "step_profile", "compile_cache", "compile_methods", "extract",
                          "prompt_tuning", "refine", "padding_cost"}  # fit_many_models: bench_fit again, on a GPU only
    for name, x in lines.items():
        assert x["rc"] == 0, (name, x["output"][-2000:])
    assert "PyTorch / ours" in lines["fit_domainnet"]["output"]
    assert "all methods / one method" in lines["compile_methods"]["output"]
    assert "steady-state efficiency" in lines["extract"]["output"]
    out = {name: x["output"] for name, x in lines.items()}
    for figure in ("machine:", "(a) vmapped, fused", "(a') vmapped, unfused", "(a-bf16)", "(b) no-vmap",
                   "(c) PyTorch on cpu", "PyTorch / ours =", "of this machine's large float32 GEMM rate"):
        assert figure in out["fit_domainnet"], figure
    assert "one fused epoch, as w2s-fit runs it" in out["step_profile"] and "seeds vmapped" in out["step_profile"]
    assert "fused epoch / its GEMMs alone: seeds mapped" in out["step_profile"]
    assert "| cache off |" in out["compile_cache"] and "| warm cache |" in out["compile_cache"]
    off = next(line for line in out["compile_cache"].splitlines() if line.startswith("| cache off |")).split("|")
    total, phases = float(off[2].split()[0]), [float(x) for x in off[3].split("/")]
    assert 0 < sum(phases) <= total + 0.02  # the phases are parts of the compile (printed to 0.01 s each)
    assert "| warm cache, another store of the bucket (n=599) |" in out["compile_cache"]
    assert "run time, padded / unpadded:" in out["padding_cost"] and "| padded to 640 rows |" in out["padding_cost"]
    assert "| ce+lp alone |" in out["compile_methods"]
    for figure in ("full/cut =", "cut/shared =", "full/shared =", "cpl+textenc step:", "estimate / measured =",
                   "loop/one step =", "time per model-step:", "share of the floor"):
        assert figure in out["prompt_tuning"], figure
    figures = json.loads(out["prompt_tuning"].strip().splitlines()[-1])
    assert figures["prefix_tokens"] < figures["tokens_cut"] < figures["tokens_full"] == 77 and figures["models"] == 2
    assert {"cut_speedup", "shared_vs_cut", "shared_vs_full", "textenc_shared_vs_cut", "one_step_speedup",
            "model_step_ms", "floor_share", "gemm_tflops_bf16"} <= set(figures)
    assert figures["tower_bytes_measured"] > 0 and abs(figures["tower_bytes_error"]) < 1.0  # the estimate, checked
    assert "knn     JAX: compile" in out["refine"] and "graph   JAX" in out["refine"] and "filter  JAX" in out["refine"]
    assert "agrees with ours on 1.0000 of rows" in out["refine"] and "scikit-learn / ours =" in out["refine"]


def test_bench_extract_separates_the_pipeline_from_the_encoder(tmp_path):
    """It used to fail: its folder put the even classes only in train/, which the image-folder check refuses. Its
    JPEGs are written once and reused by the next run (gpu_check's GPU-decode step)."""
    args = ("bench_extract.py", "--images", "24", "--classes", "3", "--size", "32", "--batch", "8", "--workers", "0",
            "--device", "cpu", "--jpegs", tmp_path / "jpegs")
    for run in range(2):
        out = run_script(*args)
        assert "end-to-end w2s-extract:" in out and "encoder only:" in out and "pipeline efficiency" in out
        assert "start-up: model load" in out and "steady-state efficiency" in out and "HDF5 write" in out
        assert ("wrote 24 JPEGs" in out) == (run == 0)


def test_bench_fit_variants_prints_every_variant():
    out = run_script("bench_fit_variants.py", "--models", "2", "--n-train", "256", "--d", "16", "--k", "5",
                     "--batch", "64")
    for variant in ("baseline", "bf16", "prepermuted", "fused"):
        assert variant in out
    assert "ratios baseline/variant:" in out


def test_bench_devices_prints_a_row_per_device_count():
    out = run_script("bench_devices.py", "--devices", "1,2", "--n", "600", "--d", "16", "--k", "5", "--seeds", "2",
                     "--epochs", "1")
    assert "| devices |" in out and "run-time ratio 2 devices / 1" in out, out


def test_bench_scaling_tiny_writes_its_table_and_figure(tmp_path):
    out = run_script("bench_scaling.py", "--tiny", "--out", tmp_path / "scaling.png", timeout=1500)
    assert "| varied |" in out and "memory per model modelled/measured" in out
    assert (tmp_path / "scaling.png").stat().st_size > 0


def test_bench_probe_compares_with_scikit_learn(tmp_path):
    from conftest import synthetic_store

    synthetic_store(tmp_path / "s.h5")
    out = run_script("bench_probe.py", "--store", tmp_path / "s.h5", "--seeds", "2")
    assert "| ceiling+lp |" in out and "sklearn" in out and "chosen on hold_val" in out


def test_every_benchmark_script_has_a_smoke_test():
    """A new script in benchmarks/ must get its test here."""
    here = Path(__file__).read_text()
    scripts = sorted(p.name for p in BENCH.glob("bench_*.py")) + ["gpu_check.sh"]
    assert [s for s in scripts if s not in here] == []


def test_bench_scaleout_runs_the_grid_sequentially_and_by_shards():
    """Its Ray way is `w2s-run --ray`, whose run on a local cluster test_grid.py checks."""
    out = run_script("bench_scaleout.py", "--limit", "60", "--seeds", "2", "--epochs", "1", "--methods",
                     "ce+lp", "--no-ray", "--json")
    figures = json.loads(out.strip().splitlines()[-1])
    assert set(figures["seconds"]) == set(figures["ratios"]) == {"sequential", "2 shards + report"}
    assert "of sequential" in out


def test_bench_paper_grid_estimates_every_component():
    out = run_script("bench_paper_grid.py", "--strong", "tiny", "--batch", "8", "--check-run", "--json")
    figures = json.loads(out.strip().splitlines()[-1])
    parts, total = figures["seconds"], figures["total_s"]  # the estimate's arithmetic, never a speed threshold
    assert set(parts) == {"extraction", "weak_finetune", "cross_domain_weak", "jax_fits_compile", "jax_fits_run",
                          "tp_prompt", "tp_textenc"}
    assert figures["work"]["images"] == 586_575 and figures["work"]["fits"] == 30
    rates = figures["rates"]  # DomainNet's six domains in three size buckets: three compile, three load
    assert figures["work"]["fit_programs"] == 3 and figures["work"]["fit_programs_loaded"] == 3
    assert parts["jax_fits_compile"] == pytest.approx(3 * rates["fit_compile_s"] + 3 * rates["fit_cache_load_s"])
    assert figures["work"]["fit_padded_rows"] == 2 * (16_384 + 24_576 + 57_344)
    assert total == pytest.approx(sum(parts.values()))
    rates, work = figures["rates"], figures["work"]
    train = work["weak_decodes"] / 3  # lockstep: 3 epochs of decodes for all 5; their logits in the feature pass
    assert work["weak_train_images"] == 5 * 3 * train and work["weak_decodes_per_image_epoch"] == 1
    assert parts["weak_finetune"] == pytest.approx(
        max(3 * train / rates["decode_img_s"], work["weak_train_images"] / rates["weak_train_img_s"]))
    assert parts["extraction"] == pytest.approx(max(
        work["images"] / rates["decode_img_s"],
        work["images"] / rates["encoder_img_s"] + work["weak_logit_images"] / rates["weak_infer_img_s"]))
    assert "north star" in out
    # on 1 and 8 devices: w2s-run's units, scheduled with their dependencies (extract.units.makespan)
    one, eight = figures["on_gpus"]["1"], figures["on_gpus"]["8"]
    assert one["wall_h"] == pytest.approx(total / 3600)  # one device, one TP chunk a domain: the estimate itself
    assert eight["critical_path_h"] - 1e-9 <= eight["wall_h"] < one["wall_h"] and "on 8 device(s)" in out
    # the tiny w2s-run: every phase measured, beside the same formulas on its own grid
    sys.path.insert(0, str(BENCH))
    import bench_paper_grid

    check, (tiny, _) = figures["check_run"], bench_paper_grid.estimate(rates, bench_paper_grid.CHECK)
    assert check["estimated_s"]["tp"] == pytest.approx(tiny["tp_prompt"] + tiny["tp_textenc"])
    assert check["estimated_s"]["jax_fits"] == pytest.approx(tiny["jax_fits_compile"] + tiny["jax_fits_run"])
    assert all(s > 0 for s in check["measured_s"].values()), check
    assert check["total_measured_s"] == pytest.approx(sum(check["measured_s"].values()))
    assert "measured / estimated" in out
    # its two stores (38 and 40 test rows) share a size bucket: at most one epoch program compiled, both served
    assert check["epoch_programs"]["compiled"] <= 1 and sum(check["epoch_programs"].values()) == 2, check
