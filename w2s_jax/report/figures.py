"""The report's figures (PNG, matplotlib): training curves, PGR heat map, misfit against gain, correction
against damage, in- against out-of-domain accuracy."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from w2s_jax import results
from w2s_jax.methods import CEILING_OF_HEAD, METHODS
from w2s_jax.report.discover import Group, Table
from w2s_jax.report.tables import _acc


def plot_correction_damage(gs: list[Group], path: Path) -> Path:
    """Damage against correction, one point per method x seed x weak model of one domain, coloured by method; the
    line y = x: above it a student breaks more of its teacher's right rows than it mends of its wrong ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>"
    names = [m for m in results.method_order({m for g in gs for m, x in g.summary["methods"].items()
                                              if "correction" in x}) if METHODS[m].target != "truth"]
    top = 0.0
    for i, m in enumerate(names):
        first = True
        for j, g in enumerate(gs):
            x = g.summary["methods"].get(m)
            if not x or x.get("failed") or "correction" not in x:
                continue
            correction, damage = 100 * np.asarray(x["correction"], float), 100 * np.asarray(x["damage"], float)
            ax.scatter(correction, damage, s=18, color=colors[i % len(colors)], marker=markers[j % len(markers)],
                       label=m if first else None, alpha=0.8)
            first = False
            shown = np.concatenate([correction, damage])
            top = max(top, shown[np.isfinite(shown)].max(initial=0.0))  # a share over no rows is NaN: not drawn
    return _finish_scatter(fig, ax, (0, top), "damage = correction", markers, [f"weak {g.weak}" for g in gs],
                           "correction: weak's wrong rows the student gets right (%)",
                           "damage: weak's right rows the student gets wrong (%)",
                           f"Correction vs damage, {gs[0].dataset}/{gs[0].domain} (a point per method, seed and weak "
                           "model)", path)


def plot_cross_domain(points: list, weak: str, path: Path) -> Path:
    """In-domain against out-of-domain accuracy, a point per method and source domain (y = x: no loss in transfer)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.2), dpi=120)
    markers = "os^vD<>"
    methods = list(dict.fromkeys(m for m, *_ in points))
    sources = list(dict.fromkeys(s for _, s, *_ in points))
    colors = plt.get_cmap("tab20").colors
    for method, source, inside, outside in points:
        i = methods.index(method)
        ax.scatter(inside, outside, color=colors[i % len(colors)], marker=markers[sources.index(source) % len(markers)],
                   s=28, label=method if source == sources[0] else None)
    low = min(min(p[2], p[3]) for p in points) - 2
    high = max(max(p[2], p[3]) for p in points) + 2
    return _finish_scatter(fig, ax, (low, high), "out = in", markers, [f"fitted on {s}" for s in sources],
                           "in-domain test' accuracy (%)", "out-of-domain test' accuracy (%), mean over target domains",
                           f"W2S across domains, weak model {weak}", path)


def plot_curves(g: Group, methods, path: Path) -> Path:
    """Figure 2 analogue: train (vs. its target) and test' accuracy per epoch, weak and ceiling lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for color, m in zip(colors, [m for m in methods if m in g.histories]):
        h = g.summary["methods"][m]["grid_index"]
        for field, style, label in (("train_acc", "--", "train (vs its target)"), ("test_acc", "-", "test'")):
            curve = 100 * np.asarray(g.histories[m][field])[:, h].mean(axis=0)
            epochs = np.arange(1, len(curve) + 1)
            ax.plot(epochs, curve, style, color=color, marker="o", ms=3, label=f"{m} {label}")
    ax.axhline(_acc(g.summary["weak"]["test_acc"]), color="gray", ls=":", label="weak")
    ceilings = {CEILING_OF_HEAD.get(METHODS[m].head) for m in methods if m in g.summary["methods"]}
    for style, c in zip(("-.", (0, (5, 1)), (0, (1, 3))), sorted(c for c in ceilings if c in g.summary["methods"])):
        ax.axhline(_acc(g.summary["methods"][c]["test_acc"]), color="black", ls=style, label=c)
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{g.dataset}/{g.domain}, weak {g.weak}")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, ax, path)


def _save(fig, ax, path: Path) -> Path:
    """Grid lines (on ``ax``, if given), tight layout, write the PNG, free the figure."""
    import matplotlib.pyplot as plt

    if ax is not None:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _finish_scatter(fig, ax, line, line_label, markers, marker_labels, xlabel, ylabel, title, path) -> Path:
    """The shared end of a scatter: the y = x line over ``line`` (low, high), a gray key of one marker per label,
    axis labels, a small title and legend; saved to ``path``."""
    ax.plot(line, line, color="black", lw=1, ls="--", label=line_label)
    for j, label in enumerate(marker_labels):
        ax.scatter([], [], color="gray", marker=markers[j % len(markers)], label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.title.set_fontsize(9)
    ax.legend(fontsize=6, ncol=2)
    return _save(fig, ax, path)


def plot_pgr(t: Table, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = np.array([[float(c) if c else np.nan for c in r[1:]] for r in t.rows])
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * values.shape[1], max(2.6, 0.9 + 0.35 * values.shape[0])), dpi=120)
    im = ax.imshow(values, cmap="RdYlGn", vmin=-1, vmax=1, aspect="auto")
    ax.set_xticks(range(values.shape[1]), t.header[1:], rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(values.shape[0]), [r[0] for r in t.rows], fontsize=8)
    for (i, j), v in np.ndenumerate(values):
        if not np.isnan(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, label="PGR")
    ax.set_title("PGR by method and domain", fontsize=9)
    return _save(fig, None, path)


def plot_misfit_gain(gs: list[Group], path: Path) -> Path:
    """Gain against misfit, one point per method x seed x weak model of one domain, coloured by method, with
    the line gain = misfit (the theory's lower bound)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 5.0), dpi=120)
    colors = plt.get_cmap("tab20").colors
    markers = "osD^v<>"
    names = results.method_order({m for g in gs for m, x in g.summary["methods"].items() if "misfit" in x})
    top = 0.0
    for i, m in enumerate(names):
        drawn = [g.summary["methods"][m] for g in gs if m in g.summary["methods"]]
        for j, g in enumerate(gs):
            x = g.summary["methods"].get(m)
            if not x or x.get("failed") or "misfit" not in x:
                continue
            ax.scatter(x["misfit"], x["gain"], s=18, color=colors[i % len(colors)], marker=markers[j % len(markers)],
                       label=m if x is drawn[0] else None, alpha=0.8)
            top = max(top, *x["misfit"], *x["gain"])
    ax.axhline(0, color="gray", lw=0.5)
    return _finish_scatter(fig, ax, (0, top), "gain = misfit", markers, [f"weak {g.weak}" for g in gs],
                           "misfit: KL(student ‖ weak) on hold_val (nats)",
                           "gain: CE(weak) − CE(student) on test' (nats)",
                           f"Gain vs misfit, {gs[0].dataset}/{gs[0].domain} (a point per method, seed and weak model)",
                           path)
