"""An experiment's grid run unit by unit (:mod:`extract.units`): all of it in order (``w2s-run EXP``), one shard's
share (``--shard I/N``, for scheduler array jobs), or the units as tasks of a Ray cluster (``--ray``,
:mod:`extract.ray_run`).

Every unit writes only its own outputs, each appearing whole (a store and a results folder by rename), and is skipped
when they exist, so that any mix of shards, Ray tasks and plain runs, interrupted or not, finishes the same grid with
the same files. A :class:`Grid` knows where each unit's outputs go and how to run it; it is built from the experiment
alone, so a Ray worker builds its own.
"""
from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from extract import experiment as ex, pipeline, units as unitlib, weak as weaklib
from extract.datasets import DatasetError, identity, load_dataset
from extract.encoders import DEMO_ENCODER


def _names(block: dict) -> list[str]:
    return [weaklib.parse_weak(w).name for w in weaklib.expand_weak(block.get("weak", ["pixels"]))]


class Grid:
    """The units of experiment ``exp`` (parsed by ``extract.experiment.load_experiment``) and how to run each."""

    def __init__(self, exp: dict, log=print, tp_chunks: int = 1, sizes: bool = True):
        self.exp, self.log = exp, log
        self.out = Path(exp["out"])
        self.strong = exp.get("strong", "efficientnet-lite0")
        extract = exp.get("extract", {})
        self.templates = tuple(extract.get("templates") or ())
        self.opts = pipeline.Options(**{k: v for k, v in extract.items() if k != "templates"}, log=log)
        self.fit, self.tp = exp.get("fit", {}), exp.get("tp")
        self.multi = bool(self.fit.get("multi_weak"))
        self._data, self._facts = {}, {}
        self.stores = [self._store_plan(b, block, domain, sizes) for b, block in enumerate(exp["data"])
                       for domain in block.get("domains", [None])]
        tp = self.tp if self.tp is not None and not self.strong.startswith(DEMO_ENCODER) else None
        cross = tuple(b for b, block in enumerate(exp["data"])
                      if exp.get("report", {}).get("cross_domain") and len(block.get("domains", [None])) > 1)
        self.units = unitlib.plan_units(self.stores, seeds=self.fit.get("seeds", 5), epochs=self.fit.get("epochs", 10),
                                        multi=self.multi, tp=tp, weak_epochs=self.opts.weak_epochs,
                                        cross_blocks=cross, tp_chunks=tp_chunks)
        self.by_key = {u.key: u for u in self.units}

    # ------------------------------------------------------------------ the plan

    def _store_plan(self, b: int, block: dict, domain, sizes: bool) -> unitlib.StorePlan:
        """A store of the plan; ``sizes``: read its dataset now to price its units (a Ray worker does not)."""
        name, dom = identity(block["dataset"], domain, ex.data_root(block))
        specs = [weaklib.parse_weak(w) for w in weaklib.expand_weak(block.get("weak", ["pixels"]))]
        rows = (0, 0)
        try:  # the size prices the units; a dataset not on disk yet (it will be downloaded) counts as unknown
            if sizes:
                data = load_dataset(block["dataset"], domain=domain, root=ex.data_root(block)).limited(
                    block.get("limit"))
                self._data[b, domain] = data
                rows = (len(data.splits["train"][0]), len(data.splits["test"][0]))
        except DatasetError:
            pass
        return unitlib.StorePlan(b, domain, f"{name}-{dom}", tuple(s.name for s in specs),
                                 sum(s.mode == "finetune" for s in specs), rows)

    def dataset(self, i: int):
        s = self.stores[i]
        block = self.exp["data"][s.block]
        if (s.block, s.domain) not in self._data:
            self._data[s.block, s.domain] = load_dataset(
                block["dataset"], domain=s.domain, root=ex.data_root(block), download=block.get("download", True),
                log=self.log).limited(block.get("limit"))
        return self._data[s.block, s.domain]

    def store_path(self, i: int) -> Path:
        return self.out / "stores" / f"{self.stores[i].label}-{ex._slug(self.strong)}.h5"

    def store_facts(self, i: int) -> tuple[set, bool, str]:
        """``(weak-model names, has text embeddings, store id)`` of store ``i`` as it is on disk now: the store is
        read once per version of its file, however many units ask."""
        from w2s_jax.store import read_store

        path = self.store_path(i)
        stamp = path.stat().st_mtime_ns
        if self._facts.get(i, (None,))[0] != stamp:
            store = read_store(path)
            self._facts[i] = (stamp, set(store.weak_info), store.text_TxKxD is not None,
                              ex._key([dataclasses.asdict(store.provenance), store.weak_info]))
        return self._facts[i][1:]

    def store_id(self, i: int) -> str:
        return self.store_facts(i)[2]

    def fit_jobs(self, unit) -> list:
        """``[(weak, ensemble)]`` of a fit unit: every weak model alone, or the ensemble of all of them."""
        names = list(self.stores[unit.store].weaks)
        return [(weak, ()) for weak in names] if unit.kind == "fit" else [(names[0], tuple(names))]

    def folders(self, unit) -> list[Path]:
        """The results folders a fit or TP unit writes (its store must exist: they are keyed by it)."""
        i, where = unit.store, self.out / "results" / self.stores[unit.store].label
        if unit.kind in ("fit", "fit-multi"):
            return [where / "+".join(ens or (weak,)) / f"fit-{ex._key([cfg.to_dict(), self.store_id(i)])}"
                    for (weak, ens), cfg in zip(self.fit_jobs(unit), self.fit_configs(unit))]
        if unit.kind == "tp":
            return [where / w / f"tp-{ex._key([self.tp_config(i, w).to_dict(), self.store_id(i)])}"
                    for w in unit.weaks]
        return []

    def fit_configs(self, unit):
        return [ex.fit_config(self.fit, self.store_path(unit.store), weak, ens) for weak, ens in self.fit_jobs(unit)]

    def tp_config(self, i: int, weak: str):
        return ex.tp_config(self.tp, self.store_path(i), self.strong, weak, self.opts.device)

    def done(self, unit) -> bool:
        """Whether the unit's outputs exist (an extraction: its store, with every weak model; the cross-domain pass
        and the report are never taken as done: they check their own files)."""
        if unit.kind == "extract":
            return self._has_store(unit.store)
        if unit.kind in ("fit", "fit-multi", "tp"):
            return self._has_store(unit.store) and all(ex.complete(f) for f in self.folders(unit))
        return False

    def _has_store(self, i: int) -> bool:
        from w2s_jax.store import StoreError

        if not self.store_path(i).is_file():
            return False
        try:
            return set(self.stores[i].weaks) <= self.store_facts(i)[0]
        except StoreError:
            return False

    # ------------------------------------------------------------------ running

    def run(self, unit) -> list[Path]:
        """Run ``unit`` (what of it is not done yet); returns the results folders it stands for."""
        fault_hook(unit.key)
        return getattr(self, f"_run_{unit.kind.replace('-', '_')}")(unit)

    def _run_extract(self, unit) -> list:
        i = unit.store
        self.log(f"== store {i + 1} of {len(self.stores)}: {self.exp['data'][self.stores[i].block]['dataset']}/"
                 f"{self.stores[i].domain or 'default'}")
        dataset = self.dataset(i)
        templates = self.templates or dataset.templates or pipeline.encoders.DEFAULT_TEMPLATES
        pipeline.extract(dataset, self.strong, weaklib.expand_weak(self.exp["data"][self.stores[i].block].get(
            "weak", ["pixels"])), self.store_path(i), self.opts, templates)
        return []

    def _fit_numbers(self, unit) -> tuple[int, int]:
        """``(first, last)`` of the unit's fits among every fit of the experiment (for the log)."""
        fits = [u for u in self.units if u.kind in ("fit", "fit-multi")]
        sizes = [len(self.fit_jobs(u)) for u in fits]
        first = sum(sizes[:fits.index(unit)]) + 1
        return first, first + len(self.fit_jobs(unit)) - 1

    def _run_fit(self, unit) -> list:
        from w2s_jax.run import run_each

        cfgs, folders = self.fit_configs(unit), self.folders(unit)
        first, last = self._fit_numbers(unit)
        total = sum(len(self.fit_jobs(u)) for u in self.units if u.kind in ("fit", "fit-multi"))
        labels = ", ".join("+".join(ens or (weak,)) for weak, ens in self.fit_jobs(unit))
        dataset = self.dataset(unit.store)
        self.log(f"== fit{'s' if last > first else ''} {first}{f'-{last}' if last > first else ''} of {total}: "
                 f"{dataset.name}/{dataset.domain}, weak {labels}")
        todo = [(cfg, f) for cfg, f in zip(cfgs, folders) if not ex._done(f, self.log)]
        if todo:
            run_each([cfg for cfg, _ in todo], [f for _, f in todo], log=self.log)
            self.log(f"finished: {', '.join(str(f) for _, f in todo)}")
        return folders

    _run_fit_multi = _run_fit

    def _run_tp(self, unit) -> list:
        i = unit.store
        if not self.store_facts(i)[1]:  # a store without a text tower: no prompt tuning
            return []
        return ex._run_tp(self.tp, self.store_path(i), self.strong, list(unit.weaks), self.store_id(i),
                               self.out / "results" / self.stores[i].label, self.opts.device, self.log)

    def _run_cross(self, unit) -> list:
        members = [i for i, s in enumerate(self.stores) if s.block == unit.block]
        made = [(self.dataset(i), self.store_path(i), weaklib.expand_weak(self.exp["data"][unit.block].get(
            "weak", ["pixels"]))) for i in members]
        ex.weak_across_domains(made, self.out / "cross-weak", self.opts, self.log, self.strong,
                                    targets=[members.index(unit.store)])
        return []

    def _run_report(self, unit, verbose: bool = False) -> list:
        return [self.report(verbose)]

    def report(self, verbose: bool = False) -> Path:
        """Write the report from every fit and TP unit's folders; print its headline table."""
        from w2s_jax.report import selection_line, to_markdown, write_report

        current = [f for u in self.units if u.kind in ("fit", "fit-multi", "tp") and self._tp_ran(u)
                   for f in self.folders(u)]
        loaders = {}
        for i in range(len(self.stores)):
            data = self.dataset(i)
            loaders[data.name, data.domain] = data.load
        rep, report = self.exp.get("report", {}), self.out / "report"
        first_weak = _names(self.exp["data"][0])[0]
        tables, figures = write_report(current, report, curves=tuple(rep.get("curves", ("cpl", "kd+lp", "kd+tp"))),
                                       paper=rep.get("paper", False), headline_weak=first_weak,
                                       cross_domain=rep.get("cross_domain", False), cross_dir=self.out / "cross-weak",
                                       title=self.exp.get("name") or self.out.name, loaders=loaders)
        for table in tables if verbose else tables[:1]:
            self.log(to_markdown(table) + "\n")
        regret = selection_line(tables)
        if regret:
            self.log(regret)
        self.log(f"The full report, {len(tables)} tables (.md .csv .tex) and {len(figures)} figures, is in {report}; "
                 f"open {report / 'index.html'} first (every table and figure on one page); `w2s-run --verbose` "
                 "prints every table.")
        return report

    def _tp_ran(self, unit) -> bool:
        """A TP unit stands for results folders only where its store has a text tower (else it runs nothing)."""
        return unit.kind != "tp" or self.store_facts(unit.store)[1]

    # ------------------------------------------------------------------ the three ways

    def run_all(self, verbose: bool = False) -> Path:
        """Every unit in order, in this process (the sequential run); a failing unit stops it."""
        for unit in self.units:
            if unit.kind == "report":
                return self.report(verbose)
            self.run(unit)
        raise AssertionError("the plan ends with the report")

    def run_shard(self, shard: int, shards: int) -> list[str]:
        """The units of shard ``shard`` of ``shards`` (:func:`units.assign`) whose inputs exist, skipping those
        done; returns the keys of those that failed (each named in the log with its error; the others go on)."""
        assignment = unitlib.assign(self.units, shards)
        mine = [u for u in self.units if assignment.get(u.key) == shard]
        failed, waiting = [], []
        for unit in mine:
            if self.done(unit):
                self.log(f"unit {unit.key}: done already")
                continue
            missing = [d for d in unit.deps if not self.done(self.by_key[d])]
            if missing:
                waiting.append(f"{unit.key} (waits for {', '.join(missing)})")
                continue
            started = time.perf_counter()
            self.log(f"unit {unit.key}: started")
            try:
                self.run(unit)
            except Exception as err:  # its own failure: named, and the shard goes on
                failed.append(unit.key)
                self.log(f"unit {unit.key}: FAILED ({type(err).__name__}: {err})")
                continue
            self.log(f"unit {unit.key}: finished in {time.perf_counter() - started:.0f} s")
        for line in waiting:
            self.log(f"not ready, left to a later call: {line}")
        return failed

    def plan_lines(self, gpus: int = 1) -> list[str]:
        """``w2s-run --plan``: every unit, what it waits for, its estimated cost and whether it is done."""
        lines = [f"{len(self.units)} units; estimated cost on the reference CPU (rates of RESULTS §5)"]
        for u in self.units:
            state = "done" if u.kind not in ("cross", "report") and self._safe_done(u) else "to do"
            lines.append(f"  {u.key:48} {_duration(u.cost):>9}  {state:5}  after: {', '.join(u.deps) or '-'}")
        total = sum(u.cost for u in self.units)
        lines.append(f"total {_duration(total)} of work; the longest chain of dependencies "
                     f"{_duration(unitlib.critical_path(self.units))}; on {gpus} device(s) about "
                     f"{_duration(unitlib.makespan(self.units, gpus))}")
        return lines

    def _safe_done(self, unit) -> bool:
        try:
            return self.done(unit)
        except (ValueError, OSError):
            return False


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


FAULT_ENV = "W2S_TEST_FAULT"  # tests only: "KEY=once:MARKER" or "KEY=raise", several joined by ";"


def fault_hook(key: str) -> None:
    """For the tests of retries and failures. With ``W2S_TEST_FAULT`` naming unit KEY: ``once:MARKER``, the first
    process to start that unit creates MARKER and dies at once (as a crashed worker would), later ones run it;
    ``raise``, the unit fails with its own error every time. Unset, it does nothing."""
    for item in filter(None, os.environ.get(FAULT_ENV, "").split(";")):
        want, _, what = item.partition("=")
        if want != key:
            continue
        if what == "raise":
            raise RuntimeError(f"unit {key} fails by design ({FAULT_ENV})")
        marker = what.removeprefix("once:")
        if what.startswith("once:") and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(3)
