"""An experiment as units of work with dependencies (``w2s-run --plan``, ``--shard I/N``, ``--ray``).

Units, keyed by what they make (``L`` is a store's ``DATASET-DOMAIN``):

- ``extract/L``: the store, its weak models' fine-tuning included;
- ``fit/L``: every single-weak fit of the store in one program; ``fit-multi/L``: its multi-weak fit;
- ``tp/L/W1+W2``: prompt tuning of a chunk of the store's weak models (each weak model's results folder is written
  whole by one chunk; a chunk trains the ceiling once, for its weak models);
- ``cross/L``: the weak models of the other domains of L's block on L's test images (for PGR across domains);
- ``report``: last, after every other unit.

Pure planning: no unit runs here (``extract.experiment`` runs them). Each unit has an estimated cost in seconds of
the reference CPU (:data:`RATES`, from ``benchmarks/bench_paper_grid.py``'s measured rates, RESULTS §5), which
balances the shards (:func:`assign`) and estimates the wall time on G devices (:func:`makespan`).
"""
from __future__ import annotations

import dataclasses
import heapq
import math

# seconds per unit of work on the reference CPU (a 2-core Intel Xeon, ViT-B-32, RESULTS §5's last CPU row)
RATES = {"encode_image": 0.056, "weak_infer_image": 0.02, "weak_train_image": 0.062, "fit_row": 0.0033 / 50,
         "tp_model_step": 1.9, "textenc_step": 2.9, "report": 30.0}
GPU_SHARE = {"extract": 1.0, "tp": 1.0, "cross": 1.0, "fit": 0.25, "fit-multi": 0.25, "report": 0.0}


@dataclasses.dataclass(frozen=True)
class Unit:
    key: str  # "extract/demo-mnist", "tp/demo-mnist/pixels@2", "report", ...
    kind: str  # extract, fit, fit-multi, tp, cross, report
    deps: tuple  # keys of the units it reads the outputs of
    cost: float  # estimated seconds on the reference CPU
    store: int = -1  # index of its store in the plan's stores (-1: none)
    weaks: tuple = ()  # the weak models it works on (tp: its chunk)
    block: int = -1  # the [[data]] block (cross: its target is ``store``)

    @property
    def gpus(self) -> float:
        """The share of a GPU it asks for (a fraction for the small JAX fits, which share a GPU)."""
        return GPU_SHARE[self.kind]


@dataclasses.dataclass(frozen=True)
class StorePlan:
    """One store of the experiment: its [[data]] block, domain, label and size (rows: train, test)."""

    block: int
    domain: str | None
    label: str  # DATASET-DOMAIN
    weaks: tuple  # weak-model names
    finetuned: int  # how many of them are fine-tuned
    rows: tuple  # (train, test); (0, 0) when unknown


def chunks(items: tuple, n: int) -> list[tuple]:
    """``items`` in ``min(n, len)`` contiguous, nearly equal chunks (at least one)."""
    n = max(1, min(n, len(items)))
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        stop = start + size + (i < extra)
        out.append(tuple(items[start:stop]))
        start = stop
    return out


def plan_units(stores: list[StorePlan], *, seeds: int, epochs: int, multi: bool, tp: dict | None,
               weak_epochs: int, cross_blocks: tuple, tp_chunks: int = 1) -> list[Unit]:
    """Every unit of an experiment, in an order that respects the dependencies. ``tp``: the [tp] table (None: no
    prompt tuning, or a strong encoder without a text tower); ``tp_chunks``: how many chunks a store's TP is split
    into (its weak models spread over them); ``cross_blocks``: the blocks with a cross-domain pass."""
    units = []
    for i, s in enumerate(stores):
        train, test = s.rows
        ext = f"extract/{s.label}"
        cost = (train + test) * (RATES["encode_image"] + len(s.weaks) * RATES["weak_infer_image"]) \
            + s.finetuned * weak_epochs * train * RATES["weak_train_image"]
        units.append(Unit(ext, "extract", (), cost, i, s.weaks))
        units.append(Unit(f"fit/{s.label}", "fit", (ext,), len(s.weaks) * test * seeds * epochs * RATES["fit_row"],
                          i, s.weaks))
        if multi and len(s.weaks) > 1:
            units.append(Unit(f"fit-multi/{s.label}", "fit-multi", (ext,), test * seeds * epochs * RATES["fit_row"],
                              i, s.weaks))
        if tp is not None:
            steps = tp.get("epochs", 10) * math.ceil(0.64 * test / tp.get("batch_size", 512))
            methods = len(tp.get("methods", ())) or 6
            for chunk in chunks(s.weaks, tp_chunks):
                models = tp.get("seeds", seeds) * (methods * len(chunk) + 1)
                units.append(Unit(f"tp/{s.label}/{'+'.join(chunk)}", "tp", (ext,),
                                  models * steps * RATES["tp_model_step"], i, chunk))
    for b in cross_blocks:
        members = [(i, s) for i, s in enumerate(stores) if s.block == b]
        for i, target in members:
            cost = sum(len(s.weaks) for j, s in members if j != i) * target.rows[1] * RATES["weak_infer_image"]
            units.append(Unit(f"cross/{target.label}", "cross", tuple(f"extract/{s.label}" for _, s in members),
                              cost, i, block=b))
    units.append(Unit("report", "report", tuple(u.key for u in units), RATES["report"]))
    return units


def assign(units: list[Unit], shards: int) -> dict[str, int]:
    """A fixed shard for every unit but the report: the costliest first, each to the shard with the least cost so
    far (ties to the lowest shard), so that every shard of a run gets the same assignment."""
    load = [(0.0, i) for i in range(shards)]
    out = {}
    for unit in sorted((u for u in units if u.kind != "report"), key=lambda u: (-u.cost, u.key)):
        total, shard = heapq.heappop(load)
        out[unit.key] = shard
        heapq.heappush(load, (total + unit.cost, shard))
    return out


def makespan(units: list[Unit], gpus: int) -> float:
    """The estimated wall time of ``units`` on ``gpus`` devices: a list schedule in which a ready unit (its
    dependencies finished) starts, costliest first, as soon as a device is free. Each unit is priced as having a
    device to itself, the fits too (Ray packs four on one, which can only shorten this), and the report none. It is
    never below the critical path's cost, and on one device it is the sum of the costs."""
    done, running, now, free = {}, [], 0.0, float(gpus)
    pending = list(units)
    while pending or running:
        ready = sorted((u for u in pending if all(d in done for d in u.deps)), key=lambda u: (-u.cost, u.key))
        for u in ready:
            need = 1.0 if u.gpus else 0.0
            if need <= free + 1e-9:
                free -= need
                heapq.heappush(running, (now + u.cost, u.key, need))
                pending.remove(u)
        if not running:
            raise ValueError(f"units whose dependencies are never met: {[u.key for u in pending][:5]}")
        now, key, need = heapq.heappop(running)
        done[key] = now
        free += need
    return now


def critical_path(units: list[Unit]) -> float:
    """The cost of the longest chain of dependencies: no number of devices finishes sooner."""
    finish = {}
    for u in units:  # in dependency order
        finish[u.key] = u.cost + max((finish[d] for d in u.deps), default=0.0)
    return max(finish.values(), default=0.0)
