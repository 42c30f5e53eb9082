"""``w2s-run EXP --ray [ADDRESS]``: the grid's units (:mod:`extract.units`) as tasks of a Ray cluster.

Ray is optional (``pip install 'w2s[ray]'``) and imported only here. The driver joins the cluster at ADDRESS (else
``$RAY_ADDRESS``, else it starts a local one), plans the units with a store's prompt tuning split into as many
chunks as the cluster has GPUs (CPUs without one), and submits every unit whose dependencies have finished:

- resources per kind: a whole GPU for an extraction, a TP chunk and a cross-domain pass, a quarter for a JAX fit
  (which then allocates its memory as it goes, not 75% of the GPU up front); no GPU where the cluster has none;
- a unit whose worker dies (a crash, a lost node) is retried by Ray, twice; a unit that fails by its own error is
  named with it, the units that need it are named as not run, and the others go on;
- one line per unit started and finished, and a bar over the estimated cost;
- the report is written by the driver once every unit has finished, from the same files a sequential run writes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from tqdm.auto import tqdm

RETRIES = 2


def import_ray():
    """The ``ray`` module, or a ValueError saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ValueError("--ray needs Ray, an optional extra: pip install 'w2s[ray]' (or pip install 'ray>=2.9'); "
                         "without it, run the grid with --shard I/N, or as one run") from None
    return ray


def absolute(exp: dict) -> dict:
    """``exp`` with its output folder and data roots absolute, as a worker may start in another folder."""
    data = [{**b, "root": str(Path(b["root"]).expanduser().resolve())} if b.get("root") else b for b in exp["data"]]
    return {**exp, "out": str(Path(exp["out"]).expanduser().resolve()), "data": data}


def run_unit(exp: dict, key: str, tp_chunks: int, compile_cache: bool) -> str | None:
    """A Ray task: run unit ``key`` of ``exp`` in this worker; None, or its error in one line."""
    from extract.experiment import define_methods
    from extract.grid import Grid

    if compile_cache:
        from w2s_jax import compile_cache as cache

        cache.enable(warn=print)
    define_methods(exp.get("methods", {}))
    grid = Grid(exp, print, tp_chunks=tp_chunks, sizes=False)
    try:
        grid.run(grid.by_key[key])
    except Exception as err:  # its own failure: reported to the driver, not retried
        text = str(err).strip().splitlines()[0][:300] if str(err).strip() else ""
        return f"{type(err).__name__}: {text}"
    return None


def task_options(unit, gpus_in_cluster: float, threads: int) -> dict:
    """Ray options of a unit: its GPU share (none on a cluster without GPUs), retries, and the environment that
    keeps a worker's numbers those of a sequential run (the same threads) and a shared GPU shared (no JAX
    preallocation)."""
    env = {"OMP_NUM_THREADS": str(threads), "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    return {"num_cpus": 1, "num_gpus": unit.gpus if gpus_in_cluster else 0, "max_retries": RETRIES,
            "runtime_env": {"env_vars": env}}


def run_on_ray(exp: dict, address: str | None, *, log=print, verbose: bool = False, compile_cache: bool = True,
               init: dict | None = None) -> list[str]:
    """Run every unit of ``exp`` on a Ray cluster, then the report; returns the keys of the units that failed or
    could not run (the report is then not written)."""
    ray = import_ray()
    import torch

    from extract.grid import Grid

    exp = absolute(exp)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None, include_dashboard=False,
                 **(init or {}))
    resources = ray.cluster_resources()
    gpus = resources.get("GPU", 0)
    chunks = int(gpus) if gpus >= 1 else max(1, int(resources.get("CPU", 1)))
    grid = Grid(exp, log, tp_chunks=chunks)
    log(f"Ray cluster: {resources.get('CPU', 0):g} CPUs, {gpus:g} GPUs; {len(grid.units)} units, prompt tuning in "
        f"{chunks} chunk(s) a store")
    remote = ray.remote(run_unit)
    threads = torch.get_num_threads()
    pending = {u.key: u for u in grid.units if u.kind != "report"}
    finished, failed, blocked, running = set(), {}, {}, {}
    bar = tqdm(total=round(sum(u.cost for u in pending.values()) / 3600, 2), unit="h", desc="grid (estimated)",
               disable=None)
    for key, unit in list(pending.items()):
        if unit.kind not in ("extract", "cross") and grid.done(unit):  # an extraction checks its recipes itself
            finished.add(key)
            del pending[key]
            log(f"unit {key}: done already")
            bar.update(round(unit.cost / 3600, 2))
    while pending or running:
        for key, unit in list(pending.items()):
            stopped = [d for d in unit.deps if d in failed or d in blocked]
            if stopped:
                blocked[key] = stopped
                del pending[key]
            elif all(d in finished for d in unit.deps):
                ref = remote.options(**task_options(unit, gpus, threads)).remote(exp, key, chunks, compile_cache)
                running[ref] = (key, time.perf_counter())
                del pending[key]
                log(f"unit {key}: started")
        if not running:
            break
        (ref,), _ = ray.wait(list(running), num_returns=1)
        key, started = running.pop(ref)
        try:
            error = ray.get(ref)
        except ray.exceptions.RayError as err:  # its worker died more often than it was retried
            error = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
        if error:
            failed[key] = error
            log(f"unit {key}: FAILED ({error})")
        else:
            finished.add(key)
            log(f"unit {key}: finished in {time.perf_counter() - started:.0f} s")
        bar.update(round(grid.by_key[key].cost / 3600, 2))
    bar.close()
    for key, deps in blocked.items():
        log(f"unit {key}: not run, as {', '.join(deps)} did not finish")
    if failed or blocked:
        log("the report is not written while units are missing")
        return [*failed, *blocked]
    grid.report(verbose)
    return []
