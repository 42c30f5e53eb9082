"""Results: choose hyperparameters on hold_val, summarise over seeds, write and re-read result folders.

A results folder holds everything a report needs, so nothing is ever retrained:
``config.json`` (the frozen FitConfig), ``provenance.json`` (the store's), ``splits.npz`` (per-seed
indices), ``metrics.json`` and ``metrics.csv`` (per seed, per hparam), ``history.npz`` (per-epoch
curves ``S x H x E`` per method), ``timings.json``, ``table.md`` and ``heads/`` (the learned heads,
:mod:`w2s_jax.saved_heads`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np

from w2s_jax.methods import CEILING_OF_HEAD, METHODS, MULTI_WEAK, restore_methods, restore_names
from w2s_jax.metrics import GAIN_SOURCES, pgr
from w2s_jax.outputs import OutputError, staging_folder, swap_in
from w2s_jax.refine import REFINEMENTS
from w2s_jax.saved_heads import write_heads
from w2s_jax.select import CRITERIA, HISTORY_KEY, grid_point, regret

HISTORY_FIELDS = ("train_loss", "train_acc", "val_loss", "val_score", "test_acc",
                  *(HISTORY_KEY.format(c) for c in CRITERIA))  # w2s-tp's histories have no criterion scores


def summarize(evals: dict, best_epochs: dict, hps, weak: dict, zero_shot, failed=None, histories=None,
              select: str = "agreement") -> dict:
    """Pick each method's hparam by mean hold_val score over seeds; add the ceilings, PGR, misfit and gain.

    evals: method -> {test_acc, agreement, val_score, misfit, test_ce}, each ``S x H``; best_epochs: method ->
    ``S x H``; hps: Hparams of arrays ``H``; weak: {test_acc, test_ce} each ``S``; zero_shot: {test_acc,
    agreement} each ``S``, or None;
    failed: method -> ``S x H`` bool, True where the training loss went non-finite (never selected, never
    reported as an accuracy; a method whose every grid point failed is marked ``failed``);
    histories: method -> {field: ``S x H x E``}: with the criteria's scores, ``summary["selection"]`` holds what
    each label-free rule would keep and its regret against the best point on test' (:func:`w2s_jax.select.regret`).
    """
    methods = {}
    for name, ev in evals.items():
        bad_SxH = np.zeros(np.shape(ev["val_score"]), bool) if not failed else np.asarray(failed[name], bool)
        h = grid_point(ev["val_score"], bad_SxH)
        methods[name] = {
            "failed": bool(bad_SxH[:, h].any()),
            "grid_index": h,
            "hparams": {f: float(np.asarray(v)[h]) for f, v in hps._asdict().items()},
            **{k: ev[k][:, h].tolist() for k in ("test_acc", "agreement", "val_score", "misfit", "test_ce",
                                                 "weak_weights", *GAIN_SOURCES) if k in ev},
            "best_epoch": np.asarray(best_epochs[name])[:, h].tolist(),
            "grid": {k: v.tolist() for k, v in ev.items()},
            # misfit-gain diagnostics, per seed (metrics.misfit)
            "gain": (np.asarray(weak["test_ce"]) - ev["test_ce"][:, h]).tolist(),
            "acc_gain": (ev["test_acc"][:, h] - np.asarray(weak["test_acc"])).tolist(),
        }
    summary = {"weak": {k: np.asarray(v).tolist() for k, v in weak.items()},
               "zero_shot": None if zero_shot is None else {k: np.asarray(v).tolist() for k, v in zero_shot.items()},
               "methods": methods}
    choices = {name: regret(h, None if not failed else failed[name]) for name, h in (histories or {}).items()
               if not methods[name]["failed"]}  # a failed method has no choice to regret
    summary["selection"] = {"rule": select, "methods": {m: c for m, c in choices.items() if c is not None}}
    return with_ceilings_and_pgr(summary)


def failure_lines(summary: dict, failed: dict, hps, weak: str) -> list[str]:
    """What the log says of models whose training loss went non-finite (``failed``: method -> ``S x H`` bool): per
    method, which grid points and seeds, and whether the method is reported as failed or from a grid point that
    trained; [] when none failed."""
    varied = [f for f, v in hps._asdict().items() if len(set(np.atleast_1d(np.asarray(v)).tolist())) > 1]
    point = lambda h: "grid point {}{}".format(h, " (" + ", ".join(  # noqa: E731
        f"{f}={np.asarray(getattr(hps, f))[h]:g}" for f in varied) + ")" if varied else "")
    lines = []
    for method, bad_SxH in failed.items():
        bad_SxH = np.asarray(bad_SxH, bool)
        if not bad_SxH.any():
            continue
        where = "; ".join(f"{point(h)} on seed(s) {', '.join(map(str, np.flatnonzero(bad_SxH[:, h])))}"
                          for h in np.flatnonzero(bad_SxH.any(axis=0)))
        m = summary["methods"][method]
        outcome = "reported as failed" if m.get("failed") else f"reported from {point(m['grid_index'])}, which trained"
        lines.append(f"  {method}: {where}: {outcome}")
    return [f"non-finite training loss (weak model {weak}):", *lines] if lines else []


def with_ceilings_and_pgr(summary: dict) -> dict:
    """Add PGR, each method against the ceiling of its own head, and the paper's single "best ceiling".

    Nothing is selected on test': the best ceiling is the ground-truth-trained head with the highest mean
    hold_val accuracy (a ceiling's hold_val score is ground-truth accuracy, so this choice is legitimate).
    """
    methods = summary["methods"]
    summary = {**summary, "best_ceiling": None, "pgr": {}}
    weak = np.asarray(summary["weak"]["test_acc"])
    ok = {name: m for name, m in methods.items() if not m.get("failed")}
    for name, m in ok.items():
        ceiling = CEILING_OF_HEAD.get(METHODS[name].head)
        if METHODS[name].target != "truth" and ceiling in ok:
            acc, ceil = np.asarray(m["test_acc"]), np.asarray(methods[ceiling]["test_acc"])
            summary["pgr"][name] = {"ceiling": ceiling, "per_seed": pgr(acc, weak, ceil).tolist(),
                                    "of_means": float(pgr(acc.mean(), weak.mean(), ceil.mean()))}
    ceilings = [m for m in ok if METHODS[m].target == "truth"]
    if ceilings:
        best = max(ceilings, key=lambda m: np.mean(methods[m]["val_score"]))  # first best on ties
        summary["best_ceiling"] = {"method": best, "test_acc": methods[best]["test_acc"], "selected_on": "hold_val"}
    return summary


def weights_table(summary: dict) -> str:
    """Markdown: each multi-weak method's weights of the weak models, mean and per seed, under each weak model's
    own test' accuracy; "" for a fit without several weak models."""
    ensemble = summary.get("ensemble") or []  # [{weak, test_acc}], in the order of the weights
    names = [e["weak"] for e in ensemble]
    methods = [m for m in method_order(summary["methods"]) if "weak_weights" in summary["methods"][m]]
    if not names or not methods:
        return ""
    rows = [["weak model's own test' acc (%)", *[f"{100 * np.mean(e['test_acc']):.2f}" for e in ensemble]]]
    for m in methods:
        weights_SxM = np.asarray(summary["methods"][m]["weak_weights"])
        rows.append([f"{m}: weights, mean over seeds", *[f"{w:.3f}" for w in weights_SxM.mean(axis=0)]])
        rows += [[f"{m}: weights, seed {s}", *[f"{w:.3f}" for w in ws]] for s, ws in enumerate(weights_SxM)]
    lines = [["", *names], ["---"] * (len(names) + 1), *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines)


TRAINING_KEYS = ("seeds", "root_seed", "epochs", "batch_size", "warmup", "hparams", "grid", "select")  # comparable fits
KEY_DEFAULTS = {"select": "agreement"}  # folders written before the key existed


def check_mergeable(folders) -> None:
    """Refuse (ValueError, naming the folders and what differs) to merge results folders into one table when a
    method appears in two of them, or two w2s-fit folders were trained differently (epochs, batch size, grid, ...):
    rows of one table, and Δ between them, must come from one training setup."""
    seen, fits = {}, []
    check_same_rows_and_seeds(folders)
    for folder in map(Path, folders):
        summary = load_summary(folder)
        for method in summary["methods"]:
            if method in seen:
                raise ValueError(f"{method} is in both {seen[method]} and {folder}; a table shows one fit of each "
                                 "method: report them separately (pass one of the folders)")
            seen[method] = folder
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        if "fuse" in config:  # a w2s-fit folder (w2s-tp's are trained by their own recipe)
            fits.append((folder, config))
    for folder, config in fits[1:]:
        first, first_config = fits[0]
        differ = [k for k in TRAINING_KEYS if config.get(k, KEY_DEFAULTS.get(k)) != first_config.get(k, KEY_DEFAULTS.get(k))]
        if differ:
            what = ", ".join(f"{k}: {first_config.get(k)} vs {config.get(k)}" for k in differ)
            raise ValueError(f"{first} and {folder} were fit differently ({what}); their rows would share one table "
                             "and one Δ: report them separately, or refit them alike")


def check_same_rows_and_seeds(folders) -> None:
    """Refuse (ValueError, naming both folders and what differs) to put in one table folders fit with another number
    of seeds, on other rows of the store, or from another version of the weak model: their rows would be paired seed
    by seed (Δ, intervals), and the pairs would not be alike."""
    from w2s_jax.store import rows_differ

    records = []
    for folder in map(Path, folders):
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
        prov = json.loads((folder / "provenance.json").read_text()) if (folder / "provenance.json").is_file() else {}
        records.append((folder, config.get("seeds"), prov.get("test_rows"), prov.get("weak_model")))
    first, seeds, rows, weak = records[0]
    for folder, other_seeds, other_rows, other_weak in records[1:]:
        if other_seeds != seeds:
            raise ValueError(f"{first} was fit with {seeds} seeds and {folder} with {other_seeds}: a table pairs its "
                             "rows seed by seed; refit them with the same seeds (w2s-run: give [fit] seeds and [tp] "
                             "seeds alike), or report them apart")
        why = rows_differ(rows, other_rows) if rows and other_rows else ""
        if why:
            raise ValueError(f"{first} and {folder} were fit on different rows of their store ({why}); refit them on "
                             "one store, or report them apart")
        if weak is not None and other_weak is not None and weak != other_weak:
            raise ValueError(f"{first} and {folder} learned from different versions of the weak model (the store's "
                             "record of it differs: remade since one of them was fit); refit the older one, or report "
                             "them apart")


def merge(summaries: list[dict]) -> dict:
    """One summary from several results folders of the same store, weak model and seeds (e.g. w2s-fit + w2s-tp)."""
    first = summaries[0]
    for other in summaries[1:]:
        if len(other["weak"]["test_acc"]) != len(first["weak"]["test_acc"]):
            raise ValueError(f"these results have {len(first['weak']['test_acc'])} and {len(other['weak']['test_acc'])} "
                             "seeds; merge only runs with the same --seeds")
        if not np.allclose(other["weak"]["test_acc"], first["weak"]["test_acc"]):
            raise ValueError("these results come from different stores, weak models or seeds; merge only runs of one "
                             "store with the same --weak and --seeds")
    methods = {name: m for s in summaries for name, m in s["methods"].items()}
    zero_shot = next((s["zero_shot"] for s in summaries if s["zero_shot"]), None)
    defined = [d for s in summaries for d in s.get("defined", ())]
    chosen = [s["selection"] for s in summaries if s.get("selection", {}).get("methods")]
    selection = {"rule": chosen[0]["rule"] if chosen else "agreement",
                 "methods": {m: c for sel in chosen for m, c in sel["methods"].items()}}
    merged = with_ceilings_and_pgr({"weak": first["weak"], "zero_shot": zero_shot, "methods": methods,
                                    "selection": selection, **({"defined": defined} if defined else {})})
    ensembles = [s["ensemble"] for s in summaries if s.get("ensemble")]
    return {**merged, "ensemble": ensembles[0]} if ensembles else merged


def check_replace(out_dir, config, overwrite: bool) -> None:
    """Refuse (OutputError) to replace a results folder of another config unless ``overwrite``, and any other
    non-empty folder always; the same config may be rerun into its own folder."""
    out = Path(out_dir)
    if not out.is_dir() or not any(out.iterdir()):
        return
    old_path = out / "config.json"
    if not old_path.is_file():
        raise OutputError(f"--out {out} is a non-empty folder that holds no w2s results; pass another --out")
    old, new = json.loads(old_path.read_text()), _normalised(config.to_dict())
    differ = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    if differ and not overwrite:
        raise OutputError(f"--out {out} holds results of another config (differs in: {', '.join(differ)}); "
                          "pass --overwrite to replace them, or another --out")


def _normalised(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def write_results(out_dir, *, config, provenance: dict, splits, summary: dict, histories: dict, timings: dict,
                  heads: dict, best_epochs: dict, feature_dim: int, failed=None) -> Path:
    """Write the folder under a hidden temporary name, then rename it into place (never half-written).

    heads: method -> (head name, best-epoch variables ``S x H x ...``); best_epochs: method -> ``S x H``;
    failed: method -> ``S x H`` bool, recorded with the heads.
    """
    final = Path(out_dir)
    out = staging_folder(final)
    _write_json(out / "config.json", config.to_dict())
    _write_json(out / "provenance.json", provenance)
    np.savez(out / "splits.npz", **splits._asdict())
    _write_json(out / "metrics.json", summary)
    _write_json(out / "timings.json", timings)
    np.savez(out / "history.npz", **{f"{m}/{f}": np.asarray(h[f]) for m, h in histories.items()
                                     for f in HISTORY_FIELDS if f in h})
    _write_csv(out / "metrics.csv", summary, config.grid_hparams())
    (out / "table.md").write_text(all_tables(summary) + "\n")
    write_heads(out, heads, best_epochs, summary, provenance, config.grid_hparams(), feature_dim,
                getattr(config, "imports", ()), failed)
    return swap_in(out, final)


def load_summary(out_dir) -> dict:
    """The folder's metrics.json; the user-defined methods it holds (``summary["defined"]``) are registered."""
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a w2s-fit results folder (run w2s-fit --store ... --out {out_dir})")
    try:
        summary = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}): the file is damaged or cut short; refit into "
                         f"{out_dir} (w2s-fit ... --out {out_dir} --overwrite)") from None
    try:
        restore_methods(summary.get("defined", ()))
    except ValueError as err:  # the name is registered already, with another row
        raise ValueError(f"{out_dir} defines a method that is defined otherwise already (by a folder read before it, "
                         f"or a plugin): {err}. Folders whose methods of one name differ cannot be read together; "
                         "show or report them apart") from None
    restore_names(summary.get("methods", {}))
    return summary


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
    """The paper's row order: W2S baselines (registry order), then CPL, then the multi-weak rows, then the ceilings.
    A derived row stands where its base would, fitted or not: the base, its rounds (``METHOD@roundR``), then each
    refinement (``METHOD@KIND``, registry order) followed by its own rounds."""
    root = lambda m: m.split("@")[0]  # noqa: E731  (a method's own name has no '@')
    roots = [m for m in METHODS if "@" not in m and any(root(n) == m for n in names)]
    kinds = ("", *REFINEMENTS)
    under = lambda m: sorted((n for n in names if root(n) == m),  # noqa: E731
                             key=lambda n: (kinds.index(METHODS[n].refine), METHODS[n].round))
    ordered = ([m for m in roots if METHODS[m].target == "weak" and m != "cpl"] + [m for m in roots if m == "cpl"]
               + [m for m in roots if METHODS[m].target in MULTI_WEAK] + [m for m in roots if METHODS[m].target == "truth"])
    return [n for m in ordered for n in under(m)]


def table_rows(summary: dict) -> list[tuple[str, str, str, str]]:
    """(row, test' acc, PGR, agreement), ordered as the paper: weak, zero-shot, baselines, CPL, ceilings."""
    rows = [("weak", _mean_std(summary["weak"]["test_acc"]), "", "100.00")]
    if summary["zero_shot"]:
        zs = summary["zero_shot"]
        rows.append(("zero-shot", _mean_std(zs["test_acc"]), "", _mean_std(zs["agreement"])))
    for name in method_order(summary["methods"]):
        m = summary["methods"][name]
        if m.get("failed"):
            rows.append((name, FAILED, "", ""))
            continue
        p = summary["pgr"].get(name, {}).get("of_means")
        rows.append((name, _mean_std(m["test_acc"]), "" if p is None or np.isnan(p) else f"{p:.3f}",
                     _mean_std(m["agreement"])))
    best = summary["best_ceiling"]
    if best:
        rows.append((f"best ceiling ({best['method']}, chosen on hold_val)", _mean_std(best["test_acc"]), "", ""))
    return rows


FAILED = "failed: non-finite training loss"
TABLE_NOTE = ("PGR = (w2s − weak) / (ceiling − weak) from the means over seeds, against the ceiling of the "
              "method's own head (ceiling+lp for LP rows, ceiling+proto for prototype rows, ceiling+tp for TP); "
              "shown only where that ceiling beats the weak model. Hyperparameters, epochs and the best ceiling "
              "are chosen on hold_val; test' is only reported.")


MISFIT_NOTE = ("misfit = mean KL(p_student ‖ p_weak) on hold_val (label-free, nats); gain = CE(weak) − CE(student) "
               "on test' against the ground truth (nats); accuracy gain in points. The theory (Mulgund & Pabbaraju) "
               "predicts gain ≥ misfit for a convex strong class that contains the truth; the last column says how "
               "often that held, over seeds.")


def misfit_rows(summary: dict) -> list[list[str]]:
    """(method, misfit, gain, accuracy gain, gain ≥ misfit), means over seeds, for methods that have them."""
    rows = []
    for name in method_order(summary["methods"]):
        m = summary["methods"][name]
        if m.get("failed") or "misfit" not in m:
            continue
        misfit, gain = np.asarray(m["misfit"]), np.asarray(m["gain"])
        rows.append([name, f"{misfit.mean():.3f}", f"{gain.mean():+.3f}", f"{100 * np.mean(m['acc_gain']):+.2f}",
                     f"{100 * np.mean(gain >= misfit):.0f}%"])
    return rows


def misfit_table(summary: dict) -> str:
    header = ("method", "misfit", "gain (CE)", "gain (acc, points)", "gain ≥ misfit")
    rows = [header, ("---",) * 5, *misfit_rows(summary)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n\n" + MISFIT_NOTE


GAIN_SOURCES_NOTE = ("Where the gain comes from, on test' at the kept epoch (%, means over seeds): correction = the "
                "share of the weak model's wrong rows the student gets right; damage = the share of its right rows "
                "the student gets wrong; low-confidence = the weak model's least confident quarter of the rows "
                "(coverage: student against weak there, then on the rest). Lang, Sontag & Vijayaraghavan, "
                "Theoretical Analysis of Weak-to-Strong Generalization.")


def gain_sources_rows(summary: dict) -> list[list[str]]:
    """(method, correction, damage, student/weak on low-confidence rows, student/weak on the rest), in %, means over
    seeds, for the weak-supervised methods that have them."""
    rows = []
    for name in method_order(summary["methods"]):
        m = summary["methods"][name]
        if m.get("failed") or "correction" not in m or METHODS[name].target == "truth":
            continue
        pct = lambda key: share_text(m[key])  # noqa: E731
        rows.append([name, pct("correction"), pct("damage"), f"{pct('low_conf_acc')} / {pct('weak_low_conf_acc')}",
                     f"{pct('rest_acc')} / {pct('weak_rest_acc')}"])
    return rows


def share_text(per_seed) -> str:
    """The mean over seeds of a share (%, one decimal), over the seeds where it is defined; "n/a" where it is a
    share over no rows on every seed (a weak model right on every row has no correction to make)."""
    v = np.asarray(per_seed, np.float64)
    return f"{100 * v[np.isfinite(v)].mean():.1f}" if np.isfinite(v).any() else "n/a"


GAIN_SOURCES_HEADER = ("method", "correction", "damage", "low-confidence: student / weak", "rest: student / weak")


def gain_sources_table(summary: dict) -> str:
    rows = gain_sources_rows(summary)
    if not rows:
        return ""
    lines = [GAIN_SOURCES_HEADER, ("---",) * 5, *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines) + "\n\n" + GAIN_SOURCES_NOTE


SELECTION_NOTE = ("What each label-free rule keeps (epoch and grid point, on hold_val), as test' accuracy (%), "
                  "and in brackets its regret: that minus the oracle. The oracle, the best grid point and epoch on "
                  "test', is a yardstick only: no rule can use it, and nothing reported is chosen by it. The rule "
                  "marked (used) chose the numbers of the tables above. Ceilings are chosen on hold_val accuracy "
                  "under every rule, so they are left out.")


def selection_header(rule: str) -> list[str]:
    return ["oracle: best on test' (yardstick only)", *[c + (" (used)" if c == rule else "") for c in CRITERIA]]


def selection_rows(summary: dict) -> list[list[str]]:
    """Per W2S method: the oracle's test' accuracy, then each rule's (regret); a last row of mean regrets."""
    chosen = (summary.get("selection") or {}).get("methods", {})
    names = [m for m in method_order(chosen) if METHODS[m].target != "truth"]
    rows = [[m, f"{100 * np.mean(chosen[m]['oracle']['test_acc']):.2f}",
             *[f"{100 * np.mean(chosen[m][c]['test_acc']):.2f} ({100 * chosen[m][c]['regret']:+.2f})"
               for c in CRITERIA]] for m in names]
    if len(names) > 1:
        rows.append(["mean regret (points)", "",
                     *[f"{100 * np.mean([chosen[m][c]['regret'] for m in names]):+.2f}" for c in CRITERIA]])
    return rows


def selection_table(summary: dict) -> str:
    rows = selection_rows(summary)
    if not rows:
        return ""
    header = ["method", *selection_header((summary.get("selection") or {}).get("rule", "agreement"))]
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(r) + " |" for r in lines) + "\n\n" + SELECTION_NOTE


def all_tables(summary: dict) -> str:
    """Markdown: the results table, the misfit table, the selection rules' regret and, for a multi-weak fit, the
    learned weights."""
    weights = weights_table(summary)
    selection = selection_table(summary)
    sources = gain_sources_table(summary)
    return "\n\n".join([markdown_table(summary), misfit_table(summary)]
                        + (["Where the gain comes from\n\n" + sources] if sources else [])
                        + (["Choosing without labels: what each rule keeps, and its regret\n\n" + selection]
                           if selection else [])
                        + (["Learned weights of the weak models:\n\n" + weights] if weights else []))


def markdown_table(summary: dict) -> str:
    header = ("method", "test' acc (%)", "PGR", "agreement w/ weak (%)")
    rows = [header, ("---",) * 4, *table_rows(summary)]
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n\n" + TABLE_NOTE
