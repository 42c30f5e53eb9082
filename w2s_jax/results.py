"""Results: choose hyperparameters on hold_val, summarise over seeds, write and re-read result folders.

A results folder holds everything a report needs, so nothing is ever retrained:
``config.json`` (the frozen FitConfig), ``provenance.json`` (the store's), ``splits.npz`` (per-seed
indices), ``metrics.json`` and ``metrics.csv`` (per seed, per hparam), ``history.npz`` (per-epoch
curves ``S x H x E`` per method), ``timings.json`` and ``table.md``.
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from w2s_jax.methods import METHODS
from w2s_jax.metrics import pgr

HISTORY_FIELDS = ("train_loss", "train_acc", "val_loss", "val_score", "test_acc")


def summarize(evals: dict, best_epochs: dict, hps, weak_acc, zero_shot) -> dict:
    """Pick each method's hparam by mean hold_val score over seeds; add the ceiling and PGR.

    evals: method -> {test_acc, agreement, val_score}, each ``S x H``; best_epochs: method -> ``S x H``;
    hps: Hparams of arrays ``H``; weak_acc: ``S``; zero_shot: {test_acc, agreement} each ``S``, or None.
    """
    methods = {}
    for name, ev in evals.items():
        h = int(np.argmax(ev["val_score"].mean(axis=0)))  # first best on ties
        methods[name] = {
            "grid_index": h,
            "hparams": {f: float(np.asarray(v)[h]) for f, v in hps._asdict().items()},
            **{k: ev[k][:, h].tolist() for k in ("test_acc", "agreement", "val_score")},
            "best_epoch": np.asarray(best_epochs[name])[:, h].tolist(),
            "grid": {k: v.tolist() for k, v in ev.items()},
        }
    summary = {"weak": {"test_acc": np.asarray(weak_acc).tolist()},
               "zero_shot": None if zero_shot is None else {k: np.asarray(v).tolist() for k, v in zero_shot.items()},
               "methods": methods}
    return with_ceiling_and_pgr(summary)


def with_ceiling_and_pgr(summary: dict) -> dict:
    """Add the paper's ceiling (the best ground-truth-trained head, by mean test' accuracy) and PGR."""
    methods = summary["methods"]
    summary = {**summary, "ceiling": None, "pgr": {}}
    ceilings = [m for m in methods if METHODS[m].target == "truth"]
    if ceilings:
        best = max(ceilings, key=lambda m: np.mean(methods[m]["test_acc"]))
        summary["ceiling"] = {"method": best, "test_acc": methods[best]["test_acc"]}
        weak, ceil = np.asarray(summary["weak"]["test_acc"]), np.asarray(methods[best]["test_acc"])
        for name, m in methods.items():
            if METHODS[name].target == "weak":
                acc = np.asarray(m["test_acc"])
                summary["pgr"][name] = {"per_seed": pgr(acc, weak, ceil).tolist(),
                                        "of_means": float(pgr(acc.mean(), weak.mean(), ceil.mean()))}
    return summary


def merge(summaries: list[dict]) -> dict:
    """One summary from several results folders of the same store, weak model and seeds (e.g. w2s-fit + w2s-tp)."""
    first = summaries[0]
    for other in summaries[1:]:
        if not np.allclose(other["weak"]["test_acc"], first["weak"]["test_acc"]):
            raise ValueError("these results come from different stores, weak models or seeds; merge only runs of one "
                             "store with the same --weak and --seeds")
    methods = {name: m for s in summaries for name, m in s["methods"].items()}
    zero_shot = next((s["zero_shot"] for s in summaries if s["zero_shot"]), None)
    return with_ceiling_and_pgr({"weak": first["weak"], "zero_shot": zero_shot, "methods": methods})


def write_results(out_dir, *, config, provenance: dict, splits, summary: dict, histories: dict, timings: dict) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", config.to_dict())
    _write_json(out / "provenance.json", provenance)
    np.savez(out / "splits.npz", **splits._asdict())
    _write_json(out / "metrics.json", summary)
    _write_json(out / "timings.json", timings)
    np.savez(out / "history.npz", **{f"{m}/{f}": np.asarray(h[f]) for m, h in histories.items()
                                     for f in HISTORY_FIELDS})
    _write_csv(out / "metrics.csv", summary, config.grid_hparams())
    (out / "table.md").write_text(markdown_table(summary) + "\n")
    return out


def load_summary(out_dir) -> dict:
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a w2s-fit results folder (run w2s-fit --store ... --out {out_dir})")
    return json.loads(path.read_text())


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=1, sort_keys=True, default=_jsonable))


def _jsonable(x):
    if dataclasses.is_dataclass(x):
        return dataclasses.asdict(x)
    if isinstance(x, (np.generic, np.ndarray)):
        return x.tolist()
    return str(x)


def _write_csv(path: Path, summary: dict, hps) -> None:
    fields = list(hps._fields)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "seed", *fields, "selected", "test_acc", "agreement", "val_score"])
        for seed, acc in enumerate(summary["weak"]["test_acc"]):
            w.writerow(["weak", seed, *[""] * len(fields), True, acc, 1.0, ""])
        if summary["zero_shot"]:
            for seed, (acc, agr) in enumerate(zip(summary["zero_shot"]["test_acc"], summary["zero_shot"]["agreement"])):
                w.writerow(["zero-shot", seed, *[""] * len(fields), True, acc, agr, ""])
        for name, m in summary["methods"].items():
            grid = m["grid"]
            for seed, row in enumerate(grid["test_acc"]):
                for h in range(len(row)):
                    values = [float(np.asarray(getattr(hps, f))[h]) for f in fields]
                    w.writerow([name, seed, *values, h == m["grid_index"], grid["test_acc"][seed][h],
                                grid["agreement"][seed][h], grid["val_score"][seed][h]])


# --------------------------------------------------------------------------- table


def _mean_std(values) -> str:
    v = 100 * np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f}"


def method_order(names) -> list[str]:
    """The paper's row order: W2S baselines (registry order), then CPL, then the ceilings."""
    present = [m for m in METHODS if m in names]
    return ([m for m in present if METHODS[m].target == "weak" and m != "cpl"] + [m for m in present if m == "cpl"]
            + [m for m in present if METHODS[m].target == "truth"])


def table_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(row, test' acc, PGR, agreement), ordered as the paper: weak, zero-shot, baselines, CPL, ceilings."""
    rows = [("weak", _mean_std(summary["weak"]["test_acc"]), "", "100.00")]
    if summary["zero_shot"]:
        zs = summary["zero_shot"]
        rows.append(("zero-shot", _mean_std(zs["test_acc"]), "", _mean_std(zs["agreement"])))
    for name in method_order(summary["methods"]):
        m = summary["methods"][name]
        p = summary["pgr"].get(name, {}).get("of_means")
        rows.append((name, _mean_std(m["test_acc"]), "" if p is None or np.isnan(p) else f"{p:.3f}",
                     _mean_std(m["agreement"])))
    if summary["ceiling"]:
        rows.append((f"ceiling (best: {summary['ceiling']['method']})", _mean_std(summary["ceiling"]["test_acc"]),
                     "", ""))
    return rows


def markdown_table(summary: dict) -> str:
    header = ("method", "test' acc (%)", "PGR", "agreement w/ weak (%)")
    rows = [header, ("---",) * 4, *table_rows(summary)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)
