"""The cross-domain matrices: every folder's heads on every domain's store, with PGR where the weak model there
is known (``w2s_jax.cross_domain``)."""
from __future__ import annotations

import numpy as np

from w2s_jax import metrics, results
from w2s_jax.methods import CEILING_OF_HEAD, METHODS
from w2s_jax.report.discover import Table
from w2s_jax.report.tables import _acc, _cell


CROSS_NOTE = ("Each cell: test' accuracy (%), mean ± std over seeds, of the heads fitted on the row's domain (each at "
              "the grid point chosen on its own hold_val), evaluated on the column's store, on its test' rows of each "
              "seed; nothing is refitted. The diagonal is the in-domain result. The row 'weak' is the row domain's "
              "weak model on the column's images: a probe retrained on the row's domain and applied there "
              "(extract/cross_weak.py), or a fine-tuned one applied from its kept weights (STORE.weak/); where "
              "those were not kept (a store made before they were), its cells are blank. Where it exists, "
              "a cell's PGR is (method − weak) / (ceiling of the method's head − weak) from the means, the ceiling "
              "evaluated the same way, shown where that ceiling beats the weak model, and never against a ceiling "
              "that failed. A method whose fit failed (non-finite training loss) reads 'failed' in every cell: its "
              "heads are never applied. The last columns average the diagonal and the off-diagonal cells.")


def _cross_pgr(methods: dict, method: str, key) -> str:
    """`` (PGR p)`` of one cross-domain cell, or "" where the weak model, the ceiling or the gap is missing."""
    from w2s_jax.cross_domain import FAILED

    ceiling = CEILING_OF_HEAD.get(METHODS[method].head) if method in METHODS else None
    weak, acc = methods.get("weak", {}).get(key), methods[method].get(key)
    ceil = methods.get(ceiling, {}).get(key) if ceiling and METHODS[method].target != "truth" else None
    if weak is None or acc is None or ceil is None or FAILED in (acc, ceil):
        return ""
    value = float(metrics.pgr(np.mean(acc), np.mean(weak), np.mean(ceil)))
    return "" if np.isnan(value) else f" (PGR {value:.2f})"


def cross_domain_tables(folders, cross_dir=None) -> tuple[list[Table], dict]:
    """One table per weak model: the weak model and every method's heads fitted on each domain (rows), evaluated on
    every domain's store (columns), with PGR where the weak model there is known, and the in-domain and out-of-domain
    means; and ``{weak: [(method, source, in, out)]}`` for the figure. ``cross_dir``: ``extract.cross_weak``'s files."""
    from w2s_jax import cross_domain

    found, targets, notes = cross_domain.matrix(folders, cross_dir)
    if not targets:
        raise ValueError("--cross-domain: no store of these results folders can be a target: " + "; ".join(notes))
    tables, points = [], {}
    for weak, methods in sorted(found.items()):
        rows = []
        for method in ["weak"] * ("weak" in methods) + results.method_order(methods):
            for source in sorted({s for s, _ in methods[method]}):
                cells = {t: methods[method].get((source, t)) for t in targets}
                if cross_domain.FAILED in cells.values():  # the fit reports it failed: no accuracy, no PGR
                    rows.append([method, source, *[results.FAILED] * len(targets), "", ""])
                    continue
                inside = cells.get(source)
                outside = [_acc(v) for t, v in cells.items() if t != source and v is not None]
                out_mean = f"{np.mean(outside):.2f}" if outside else ""
                shown = [(_cell(v) + _cross_pgr(methods, method, (source, t))) if v is not None else ""
                         for t, v in cells.items()]
                rows.append([method, source, *shown, f"{_acc(inside):.2f}" if inside is not None else "", out_mean])
                if inside is not None and outside and method != "weak":
                    points.setdefault(weak, []).append((method, source, _acc(inside), float(np.mean(outside))))
        note = CROSS_NOTE + "".join(f"\n\nNote: {n}." for n in notes)
        tables.append(Table(f"cross-domain-{weak}", f"W2S across domains: test' accuracy (%), heads fitted on one "
                            f"domain (rows) evaluated on every domain (columns), weak model {weak}",
                            ["method", "fitted on", *targets, "in-domain", "out-of-domain (mean)"], rows, note))
    return tables, points
