"""The report's tables, each a pure function of the discovered groups: the paper's Table 2/3/4 analogues with PGR
and Δ, intervals, rounds, selection and regret, misfit and gain, gain sources, multi-weak weights, sources."""
from __future__ import annotations

import json

import numpy as np

from w2s_jax import metrics, paper_numbers, results
from w2s_jax.methods import METHODS, MULTI_WEAK, round_of
from w2s_jax.report.discover import Group, Table, weak_kind

BEST_CEILING = "best ceiling (hold_val)"
DELTA = "Δ (cpl − best baseline by hold_val)"
DELTA_TEST = "Δ (cpl − best baseline by test', paper's convention)"
DELTA_CI = "Δ by hold_val, 95% CI over seeds (paired t)"
TABLE2_NOTE = ("The best baseline of Δ is the weak-supervised method (not cpl) with the highest mean hold_val score "
               "of the fit's selection rule ({rules}; agreement with the weak labels is the paper's label-free "
               "criterion); the row marked \"paper's convention\" picks it by test' accuracy instead, a selection on "
               "test'. The best ceiling is the ground-truth head with the highest hold_val accuracy.")


def _acc(values) -> float:
    return 100 * float(np.mean(values))


def _cell(values) -> str:
    if values is None:
        return "failed"
    v = 100 * np.asarray(values, np.float64)
    return f"{v.mean():.2f} ± {v.std():.2f}"


def _row_values(summary: dict) -> dict:
    """Row name -> per-seed test' accuracies: weak, zero-shot, every method, ceiling."""
    rows = {"weak": summary["weak"]["test_acc"]}
    if summary["zero_shot"]:
        rows["zero-shot"] = summary["zero_shot"]["test_acc"]
    rows.update({m: None if summary["methods"][m].get("failed") else summary["methods"][m]["test_acc"]
                 for m in results.method_order(summary["methods"]) if METHODS[m].round == 1})  # rounds: rounds_table
    if summary["best_ceiling"]:
        rows[BEST_CEILING] = summary["best_ceiling"]["test_acc"]
    return rows


def _delta(summary: dict, chosen_on: str = "val_score") -> float | None:
    """CPL minus the best baseline (weak-supervised, non-CPL method), in points of test' accuracy.

    ``chosen_on="val_score"``: the baseline with the best mean hold_val agreement with the weak labels;
    ``"test_acc"``: the best by test' accuracy (the paper's convention; a selection on test'). Rows trained on
    refined labels (``METHOD@knn``) or on a student's (``METHOD@roundR``) are not baselines: their hold_val score is
    agreement with their own target, not comparable with the others', and the paper's Δ compares CPL with methods
    on the weak labels.
    """
    methods = summary["methods"]
    best = best_baseline(summary, chosen_on)
    if "cpl" not in methods or methods["cpl"].get("failed") or best is None:
        return None
    return _acc(methods["cpl"]["test_acc"]) - _acc(methods[best]["test_acc"])


def best_baseline(summary: dict, chosen_on: str = "val_score", exclude=("cpl",)) -> str | None:
    """The weak-supervised method (on the weak labels as they are, none of ``exclude``) with the best mean
    ``chosen_on`` score (:func:`_delta`); None if there is none."""
    methods = summary["methods"]
    baselines = [m for m in methods if METHODS[m].target == "weak" and m not in exclude and not METHODS[m].refine
                 and METHODS[m].round == 1 and not methods[m].get("failed")]
    return max(baselines, key=lambda m: np.mean(methods[m][chosen_on])) if baselines else None


def _interval_cell(a_S, b_S) -> str:
    """``a − b`` in points with its paired 95% t-interval over seeds; "(n.d.)" where it includes 0."""
    mean, low, high = metrics.paired_interval(a_S, b_S)
    if not np.isfinite(low):
        return f"{100 * mean:+.2f} (one seed: no interval)"
    mark = "" if metrics.distinguishable(low, high) else " (n.d.)"
    return f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]{mark}"


INTERVALS_NOTE = ("Differences of test' accuracy in points, paired by seed, with a 95% Student t-interval over the "
                  "seeds (mean ± t·sd/√S; metrics.paired_interval). (n.d.): the interval includes 0, so this many "
                  "seeds do not tell the difference from none. Every row is compared with Δ's best baseline (the weak-label "
                  "method other than cpl with the best hold_val score); Δ's baseline itself is compared with the next "
                  "best, as its cell says.")


def intervals_table(groups: list[Group], weak: str) -> Table | None:
    """Every W2S method against the weak model and against the best baseline, per domain, with paired intervals."""
    rows = []
    for g in (g for g in groups if g.weak == weak):
        methods, weak_acc = g.summary["methods"], g.summary["weak"]["test_acc"]
        deltas = best_baseline(g.summary)  # Δ's: every row is compared with it
        for m in results.method_order(methods):
            if METHODS[m].target == "truth" or methods[m].get("failed"):
                continue
            base = deltas if m != deltas else best_baseline(g.summary, exclude=("cpl", m))
            label = (base or "") if m != deltas else (f"{base} (the next best: this row is Δ's)" if base else "")
            rows.append([f"{g.dataset}/{g.domain}", m, _interval_cell(methods[m]["test_acc"], weak_acc),
                         label, _interval_cell(methods[m]["test_acc"], methods[base]["test_acc"]) if base else ""])
    if not rows:
        return None
    return Table(f"intervals-{weak}", f"How sure each comparison is: W2S methods against the weak model and the best "
                 f"baseline, weak model {weak}", ["domain", "method", "− weak (points, 95% CI)", "best baseline",
                                                   "− best baseline (points, 95% CI)"], rows, INTERVALS_NOTE)


ROUNDS_NOTE = ("Strong-to-strong rounds: round r + 1 trains the method again, at every grid point, on the soft labels "
               "of round r's kept student (its grid point and epochs chosen on hold_val by the fit's rule) on the "
               "unlabelled pool hold_train ∪ hold_val. Test' accuracy (%, mean ± std over seeds) with PGR against the "
               "method's own ceiling; the last column is the last round minus round 1 in points, paired by seed, with "
               "its 95% t-interval ((n.d.): not distinguishable from 0). These rows are left out of the Table 2 and "
               "Table 3 analogues, which are the paper's.")


def rounds_table(groups: list[Group], weak: str) -> Table | None:
    """Each method fitted in rounds (``METHOD@roundR``), per domain: every round's accuracy and PGR, and the last
    round against the first with a paired interval; None without rounds."""
    rows, width = [], 0
    for g in (g for g in groups if g.weak == weak):
        methods = g.summary["methods"]
        chains = {}  # round-1 method -> [its rounds' names, in order]
        for name in results.method_order(methods):
            chains.setdefault(round_of(name)[0], []).append(name)
        for first, chain in chains.items():
            if len(chain) < 2 or first not in methods:
                continue
            width = max(width, len(chain))
            cells = []
            for name in chain:
                pgr = g.summary["pgr"].get(name, {}).get("of_means")
                cells.append(results.FAILED if methods[name].get("failed") else _cell(methods[name]["test_acc"])
                             + ("" if pgr is None or np.isnan(pgr) else f" (PGR {pgr:.3f})"))
            last = methods[chain[-1]]
            change = "" if last.get("failed") or methods[first].get("failed") \
                else _interval_cell(last["test_acc"], methods[first]["test_acc"])
            rows.append([f"{g.dataset}/{g.domain}", first, *cells, change])
    if not rows:
        return None
    rows = [[*r[:-1], *[""] * (width + 3 - len(r)), r[-1]] for r in rows]
    return Table(f"rounds-{weak}", f"Strong-to-strong rounds: test' accuracy (%) by round, weak model {weak}",
                 ["domain", "method", *[f"round {r}" for r in range(1, width + 1)],
                  "last − round 1 (points, 95% CI)"], rows, ROUNDS_NOTE)


def table2(groups: list[Group], weak: str) -> Table:
    cols = [g for g in groups if g.weak == weak]
    per_col = [_row_values(g.summary) for g in cols]
    names = [r for r in ("weak", "zero-shot") if any(r in c for c in per_col)]
    names += results.method_order({m for c in per_col for m in c}) + ([BEST_CEILING] if any(BEST_CEILING in c for c in per_col) else [])
    rows = []
    for name in names:
        cells = [_cell(c[name]) if name in c else "" for c in per_col]
        avg = f"{np.mean([_acc(c[name]) for c in per_col]):.2f}" \
            if all(c.get(name) is not None for c in per_col) else ""
        rows.append([name, *cells, avg])
    for label, chosen_on in ((DELTA, "val_score"), (DELTA_TEST, "test_acc")):
        deltas = [_delta(g.summary, chosen_on) for g in cols]
        if any(d is not None for d in deltas):
            shown = [f"{d:+.2f}" if d is not None else "" for d in deltas]
            avg = f"{np.mean(deltas):+.2f}" if all(d is not None for d in deltas) else ""
            rows.append([label, *shown, avg])
        if chosen_on == "val_score" and any(d is not None for d in deltas):
            cells = [_interval_cell(g.summary["methods"]["cpl"]["test_acc"],
                                    g.summary["methods"][best_baseline(g.summary)]["test_acc"]) if d is not None
                     else "" for g, d in zip(cols, deltas)]
            rows.append([DELTA_CI, *cells, ""])
    return Table(f"table2-{weak}", f"Table 2 analogue: test' accuracy (%) by domain, weak model {weak} "
                 f"({weak_kind(cols[0])})",
                 ["method", *[f"{g.dataset}/{g.domain}" for g in cols], "Avg."], rows,
                 TABLE2_NOTE.format(rules=", ".join(sorted({g.summary.get("selection", {}).get("rule", "agreement")
                                                            for g in cols}))))


def headline(groups: list[Group], weak: str) -> Table:
    """The first screen of a run: the Table 2 analogue of ``weak`` with each row's PGR, averaged over domains
    (blank where a domain has none)."""
    t = table2(groups, weak)
    cols = [g for g in groups if g.weak == weak]
    rows = []
    for row in (r for r in t.rows if r[0] != DELTA_CI):  # one screen: Δ's interval is in Table 2 and intervals
        values = [g.summary["pgr"].get(row[0], {}).get("of_means") for g in cols]
        known = [v for v in values if v is not None and not np.isnan(v)]
        rows.append([*row, f"{np.mean(known):.3f}" if known and len(known) == len(values) else ""])
    return Table(f"headline-{weak}", t.title + ", with PGR", [*t.header, "PGR (avg.)"], rows, HEADLINE_NOTE)


def pgr_intervals_table(groups: list[Group], weak: str) -> Table | None:
    """Each W2S row's PGR per domain with its 95% t-interval over seeds (the per-seed PGR of
    :func:`w2s_jax.results.with_ceilings_and_pgr`, :func:`w2s_jax.metrics.paired_interval` against 0); None
    without PGR."""
    cols = [g for g in groups if g.weak == weak]
    methods = results.method_order({m for g in cols for m in g.summary["pgr"]})
    rows = []
    for m in methods:
        cells = []
        for g in cols:
            per_seed = np.asarray(g.summary["pgr"].get(m, {}).get("per_seed", []), np.float64)
            per_seed = per_seed[np.isfinite(per_seed)]  # a seed whose ceiling does not beat the weak model: none
            if not per_seed.size:
                cells.append("")
                continue
            mean, low, high = metrics.paired_interval(per_seed, np.zeros(len(per_seed)))
            cells.append(f"{mean:.3f}" + ("" if not np.isfinite(low) else f" [{low:.3f}, {high:.3f}]"))
        rows.append([m, *cells])
    if not rows:
        return None
    return Table(f"pgr-intervals-{weak}", f"PGR with its 95% interval over seeds, weak model {weak}",
                 ["method", *(f"{g.dataset}/{g.domain}" for g in cols)], rows,
                 "PGR per seed, (w2s − weak) / (ceiling of the method's head − weak) on that seed's test', its mean "
                 "and 95% Student t-interval over the seeds; a seed whose ceiling does not beat the weak model has no "
                 "PGR. The headline's PGR (avg.) is of the means over seeds.")


HEADLINE_NOTE = ("Test' accuracy (mean ± std over seeds) per domain; PGR is the share of the gap between the weak "
                 "model and the method's own ceiling that the method recovers; Δ compares CPL with the best "
                 "baseline, chosen on hold_val. Nothing here was chosen on test'.")


def table3(groups: list[Group], dataset: str, domain: str) -> Table:
    cols = [g for g in groups if (g.dataset, g.domain) == (dataset, domain)]
    per_col = [_row_values(g.summary) for g in cols]
    names = ["weak"] + results.method_order({m for c in per_col for m in c}) + [BEST_CEILING]
    rows = [[n, *[_cell(c[n]) if n in c else "" for c in per_col]] for n in names if any(n in c for c in per_col)]
    return Table(f"table3-{dataset}-{domain}", f"Table 3 analogue: test' accuracy (%) by weak model, {dataset}/{domain}",
                 ["method", *[g.weak for g in cols]], rows,
                 "Weak models: " + "; ".join(f"{g.weak}, {weak_kind(g)}" for g in cols) + ".")


def table4(groups: list[Group]) -> Table | None:
    rows = [[f"{g.dataset}/{g.domain}", g.weak, _cell(g.summary["methods"]["cpl"]["test_acc"]),
             _cell(g.summary["methods"]["cpl+textenc"]["test_acc"])]
            for g in groups if {"cpl", "cpl+textenc"} <= set(g.summary["methods"])]
    if not rows:
        return None
    return Table("table4", "Table 4 analogue: learning prototypes C vs tuning the text encoder (CPL loss)",
                 ["domain", "weak", "learn C (cpl)", "tune text encoder (cpl+textenc)"], rows)


def pgr_table(groups: list[Group]) -> Table:
    methods = results.method_order({m for g in groups for m in g.summary["pgr"]})
    rows = []
    for m in methods:
        values = [g.summary["pgr"].get(m, {}).get("of_means") for g in groups]
        rows.append([m, *["" if v is None or np.isnan(v) else f"{v:.3f}" for v in values]])
    return Table("pgr", "PGR = (w2s − weak) / (ceiling of the method's own head − weak), from means over seeds",
                 ["method", *[f"{g.dataset}/{g.domain}/{g.weak}" for g in groups]], rows, results.TABLE_NOTE)


def selection_table(groups: list[Group]) -> Table | None:
    """Every folder's label-free rules against the oracle (:func:`w2s_jax.results.selection_rows`)."""
    rows = [[f"{g.dataset}/{g.domain}", g.weak, *r] for g in groups for r in results.selection_rows(g.summary)]
    if not rows:
        return None
    rules = {(g.summary.get("selection") or {}).get("rule", "agreement") for g in groups}
    header = results.selection_header(rules.pop() if len(rules) == 1 else "")
    return Table("selection", "Choosing without labels: test' accuracy (%) of what each rule keeps, and its regret",
                 ["domain", "weak", "method", *header], rows, results.SELECTION_NOTE)


def selection_line(tables: list[Table]) -> str | None:
    """One line for a short screen: each rule's mean regret over the selection table's folders, or None."""
    t = next((t for t in tables if t.name == "selection"), None)
    means = [r[4:] for r in t.rows if r[2] == "mean regret (points)"] if t else []
    if not means:
        return None
    regret = np.mean([[float(v) for v in row] for row in means], axis=0)
    rules = ", ".join(f"{h} {r:+.2f}" for h, r in zip(t.header[4:], regret))
    return (f"Choosing without labels ({t.name}.md): mean regret against the best point on test' (a yardstick "
            f"only), in points: {rules}.")


def paper_table(groups: list[Group]) -> Table | None:
    """Our DomainNet weak / ceiling / CPL beside the paper's Table 2 (ours, paper, difference)."""
    dn = {g.domain: g for g in groups if g.dataset == "domainnet"}
    if not dn:
        return None
    rows = []
    for name, ours_of in (("weak", lambda s: s["weak"]["test_acc"]),
                          ("ceiling", lambda s: (s["best_ceiling"] or {}).get("test_acc")),
                          ("cpl", lambda s: _row_values(s).get("cpl"))):
        for domain in paper_numbers.DOMAINS:
            if domain not in dn:
                continue
            ours = ours_of(dn[domain].summary)
            paper = paper_numbers.TABLE2[name].get(domain)
            if ours is None or paper is None:
                continue
            rows.append([name, domain, f"{_acc(ours):.2f}", f"{paper:.2f}", f"{_acc(ours) - paper:+.2f}"])
    return Table("paper-table2", "Ours vs the paper's Table 2 (DomainNet; paper numbers from paper_numbers.py)",
                 ["row", "domain", "ours", "paper", "ours − paper"], rows)


def paper_table3(groups: list[Group]) -> Table | None:
    """Our rows beside the paper's Table 3 (methods x weak models), where paper_numbers.TABLE3 has them."""
    rows = []
    for g in groups:
        published = paper_numbers.TABLE3.get(g.domain, {}).get(g.weak, {}) if g.dataset == "domainnet" else {}
        ours = _row_values(g.summary)
        for name, paper in published.items():
            if ours.get(name) is not None:
                rows.append([g.domain, g.weak, name, f"{_acc(ours[name]):.2f}", f"{paper:.2f}",
                             f"{_acc(ours[name]) - paper:+.2f}"])
    if not rows:
        return None
    return Table("paper-table3", "Ours vs the paper's Table 3 (DomainNet; paper numbers from paper_numbers.py)",
                 ["domain", "weak", "row", "ours", "paper", "ours − paper"], rows)


def misfit_gain_table(groups: list[Group]) -> Table | None:
    """Misfit and gain (means over seeds) of every method, per domain and weak model."""
    rows = [[f"{g.dataset}/{g.domain}", g.weak, *r] for g in groups for r in results.misfit_rows(g.summary)]
    if not rows:
        return None
    return Table("misfit-gain", "Misfit predicts gain? Per domain, weak model and method (means over seeds)",
                 ["domain", "weak", "method", "misfit", "gain (CE)", "gain (acc, points)", "gain ≥ misfit"], rows,
                 results.MISFIT_NOTE)


def gain_sources_table(groups: list[Group]) -> Table | None:
    """Correction, damage and coverage (:func:`w2s_jax.metrics.gain_sources`) of every weak-supervised method, per
    domain and weak model (means over seeds)."""
    rows = [[f"{g.dataset}/{g.domain}", g.weak, *r] for g in groups for r in results.gain_sources_rows(g.summary)]
    if not rows:
        return None
    return Table("gain-sources", "Where the gain comes from: correction, damage and coverage (%, means over seeds)",
                 ["domain", "weak", *results.GAIN_SOURCES_HEADER], rows, results.GAIN_SOURCES_NOTE)


def weak_choice_table(groups: list[Group]) -> Table | None:
    """Label-free choice of weak model by misfit, against the truth, per domain with several weak models."""
    rows = []
    for (dataset, domain), gs in _by_domain(groups).items():
        if len(gs) < 2 or len({len(g.summary["weak"]["test_acc"]) for g in gs}) > 1:
            continue
        shared = {m for m in set.intersection(*(set(g.summary["methods"]) for g in gs))
                  if METHODS[m].target == "weak"}  # a ceiling's student does not depend on the weak model
        teacher_acc = np.array([g.summary["weak"]["test_acc"] for g in gs])
        for m in results.method_order(shared):
            per_weak = [g.summary["methods"][m] for g in gs]
            if any(x.get("failed") or "misfit" not in x for x in per_weak):
                continue
            misfit, student_acc = np.array([x["misfit"] for x in per_weak]), np.array([x["test_acc"] for x in per_weak])
            cells = []
            for truth in (teacher_acc, student_acc):
                agree = metrics.choice_by_misfit(misfit, truth)
                pairs = "–" if np.isnan(agree["pairwise"]) else f"{100 * agree['pairwise']:.0f}%"
                cells.append(f"{100 * agree['top1']:.0f}% / {pairs}")
            rows.append([f"{dataset}/{domain}", m, *[gs[int(i)].weak for i in (np.argmin(misfit.mean(1)),
                         np.argmax(teacher_acc.mean(1)), np.argmax(student_acc.mean(1)))], *cells])
    if not rows:
        return None
    return Table("weak-choice", "Choosing the weak model without labels: the smallest student misfit",
                 ["domain", "method", "chosen by misfit", "best teacher", "best student",
                  "agrees with teachers (top-1 / pairs)", "agrees with students (top-1 / pairs)"], rows,
                 "Chosen: the weak model whose student has the smallest mean hold_val misfit. Best teacher: the weak "
                 "model with the best test' accuracy; best student: the weak model whose student has the best test' "
                 "accuracy (means over seeds). Agreement, per seed (metrics.choice_by_misfit): top-1, how often the "
                 "choice is the best; pairs, how many weak-model pairs misfit orders as test' accuracy does. Where "
                 "the student is close to the truth, its misfit estimates the weak model's own loss, so a small "
                 "misfit marks a good teacher; a student that copies a near-uniform teacher breaks this.")


def multi_weak_table(groups: list[Group]) -> Table | None:
    """The multi-weak rows: accuracy and the learned weights of the weak models beside each one's own accuracy."""
    rows = []
    for g in groups:
        ensemble = g.summary.get("ensemble") or []  # [{weak, test_acc}], in the order of the weights
        for m in results.method_order(g.summary["methods"]):
            x = g.summary["methods"][m]
            if METHODS[m].target not in MULTI_WEAK or x.get("failed") or "weak_weights" not in x:
                continue
            weights = np.mean(x["weak_weights"], axis=0)
            rows.append([f"{g.dataset}/{g.domain}", m, _cell(x["test_acc"]),
                         ", ".join(f"{e['weak']} {w:.2f}" for e, w in zip(ensemble, weights)),
                         ", ".join(f"{e['weak']} {_acc(e['test_acc']):.2f}" for e in ensemble)])
    if not rows:
        return None
    return Table("multi-weak", "Several weak models at once: test' accuracy (%) and the weights of the weak models",
                 ["domain", "method", "test' acc (%)", "weights (mean over seeds)", "each weak model's test' acc (%)"],
                 rows, "raven+…: weights learned with the head (RAVEN-style); average+…: the uniform average. Single "
                       "weak-model rows are in the Table 3 analogue; per-seed weights are in each results folder's table.md.")


def _by_domain(groups: list[Group]) -> dict:
    """(dataset, domain) -> its groups, in the order of ``groups`` (discover sorts them)."""
    found = {}
    for g in groups:
        found.setdefault((g.dataset, g.domain), []).append(g)
    return found


def sources_table(groups: list[Group]) -> Table:
    """Which results folder, and so which config, every column of the tables came from."""
    rows = []
    for g in groups:
        for folder in g.folders:
            cfg = json.loads((folder / "config.json").read_text())
            setting = ", ".join(f"{k}={cfg[k]}" for k in ("seeds", "epochs", "batch_size") if k in cfg)
            rows.append([f"{g.dataset}/{g.domain}", g.weak, str(folder), setting + (f", grid={cfg['grid']}"
                                                                                     if cfg.get("grid") else "")])
    return Table("sources", "Where every number comes from: results folders and their configs",
                 ["domain", "weak", "results folder", "config"], rows)
