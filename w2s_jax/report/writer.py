"""``w2s-report``: every table and figure of the results folders under some roots, written once."""
from __future__ import annotations

from pathlib import Path

import click

from w2s_jax.report.cross import cross_domain_tables
from w2s_jax.report.discover import Table, discover
from w2s_jax.report.figures import (plot_correction_damage, plot_cross_domain, plot_curves, plot_misfit_gain,
                                   plot_pgr)
from w2s_jax.report.formats import to_csv, to_latex, to_markdown
from w2s_jax.report.page import write_index
from w2s_jax.report.prototypes import write_prototypes
from w2s_jax.report.tables import (_by_domain, gain_sources_table, headline, intervals_table, misfit_gain_table,
                                  multi_weak_table, paper_table, paper_table3, pgr_table, rounds_table,
                                  pgr_intervals_table, selection_line, selection_table, sources_table, table2,
                                  table3, table4,
                                  weak_choice_table)


def write_report(roots, out_dir, *, curves=("cpl", "kd+lp", "kd+tp"), paper=False,
                 headline_weak: str | None = None, cross_domain: bool = False,
                 cross_dir=None, title: str = "w2s report", loaders=None,
                 classes=()) -> tuple[list[Table], list[Path]]:
    """Every table (.md .csv .tex) and figure (.png) of the results folders under ``roots``, and ``index.html``,
    the page that shows them all (:func:`w2s_jax.report.page.write_index`, titled ``title``); with
    ``headline_weak``, the first table is :func:`headline` of that weak model; with ``cross_domain``, the
    cross-domain matrices (:func:`cross_domain_tables`, with the weak models across domains from ``cross_dir``) and
    their figures. ``prototypes.html`` (:func:`w2s_jax.report.prototypes.write_prototypes`) shows CPL's prototypes
    by their nearest images where ``loaders`` ({(dataset, domain): id -> PIL image}) can read them (``classes``:
    those classes only; default all)."""
    groups = discover(roots)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = [headline(groups, headline_weak)] if headline_weak else []
    tables += [t for t in [pgr_intervals_table(groups, headline_weak)] if t is not None] if headline_weak else []
    tables += [table2(groups, w) for w in sorted({g.weak for g in groups})]
    tables += [t for t in (intervals_table(groups, w) for w in sorted({g.weak for g in groups})) if t is not None]
    tables += [t for t in (rounds_table(groups, w) for w in sorted({g.weak for g in groups})) if t is not None]
    tables += [table3(groups, *domain) for domain, gs in _by_domain(groups).items() if len(gs) > 1]
    pgr = pgr_table(groups)
    compare = (paper_table(groups), paper_table3(groups)) if paper else ()
    crossed, points = cross_domain_tables([f for g in groups for f in g.folders], cross_dir) if cross_domain \
        else ([], {})
    tables += [t for t in (table4(groups), pgr, selection_table(groups), multi_weak_table(groups), misfit_gain_table(groups),
                           gain_sources_table(groups), weak_choice_table(groups), *compare, *crossed,
                           sources_table(groups)) if t is not None]
    for t in tables:
        (out / f"{t.name}.md").write_text(to_markdown(t) + "\n")
        (out / f"{t.name}.csv").write_text(to_csv(t))
        (out / f"{t.name}.tex").write_text(to_latex(t))
    figures = [plot_curves(g, curves, out / f"curves-{g.dataset}-{g.domain}-{g.weak}.png") for g in groups]
    if pgr.rows:
        figures.append(plot_pgr(pgr, out / "pgr.png"))
    for (dataset, domain), gs in _by_domain(groups).items():
        if any("misfit" in x for g in gs for x in g.summary["methods"].values()):
            figures.append(plot_misfit_gain(gs, out / f"misfit-gain-{dataset}-{domain}.png"))
        if any("correction" in x for g in gs for x in g.summary["methods"].values()):
            figures.append(plot_correction_damage(gs, out / f"correction-damage-{dataset}-{domain}.png"))
    figures += [plot_cross_domain(p, weak, out / f"cross-domain-{weak}.png") for weak, p in points.items()]
    pictures = write_prototypes(out, groups, loaders or {}, title=title, classes=classes, weak=headline_weak)
    write_index(out, tables, figures, groups, title=title, selection=selection_line(tables),
                prototypes=pictures.name if pictures else None)
    return tables, figures


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("results_dirs", nargs=-1, required=True, type=click.Path())
@click.option("--out", type=click.Path(), default="report", show_default=True)
@click.option("--curves", default="cpl,kd+lp,kd+tp", show_default=True, help="Methods drawn in the training curves.")
@click.option("--paper", is_flag=True, help="Also compare our DomainNet numbers with the paper's Table 2.")
@click.option("--cross-domain", is_flag=True,
              help="Also evaluate every folder's saved heads on every other domain's store (same encoder and classes).")
@click.option("--cross-weak", type=click.Path(), default=None,
              help="With --cross-domain: the folder of the weak models' logits across domains (w2s-run writes "
                   "OUT/cross-weak), for PGR across domains.")
@click.option("--classes", default="", metavar="A,B", help="Only these classes on prototypes.html (default: all).")
@click.option("--import", "plugins", multiple=True, metavar="MODULE",
              help="Import the module that registered your own heads and methods (as given to w2s-fit --import).")
@click.option("--allow-replace", is_flag=True,
              help="Let an --import module replace a head, method or loss row registered before it (refused otherwise).")
def main(results_dirs, out, curves, paper, cross_domain, cross_weak, classes, plugins, allow_replace):
    """Tables (markdown, CSV, LaTeX) and figures (PNG) from w2s-fit / w2s-tp results folders."""
    from w2s_jax.methods import import_plugins

    try:
        if cross_weak is not None and not cross_domain:
            raise ValueError("--cross-weak gives the weak models across domains for --cross-domain; add --cross-domain")
        if cross_weak is not None and not Path(cross_weak).is_dir():
            raise ValueError(f"--cross-weak {cross_weak}: no such folder (w2s-run writes it as OUT/cross-weak)")
        import_plugins(plugins, allow_replace)
        tables, figures = write_report(results_dirs, out, curves=tuple(curves.split(",")), paper=paper,
                                       cross_domain=cross_domain, cross_dir=cross_weak,
                                       classes=tuple(c.strip() for c in classes.split(",") if c.strip()))
    except (FileNotFoundError, ValueError, KeyError) as err:
        raise click.ClickException(str(err)) from None
    for t in tables:
        click.echo(to_markdown(t) + "\n")
    click.echo(f"wrote {len(tables)} tables (.md .csv .tex) and {len(figures)} figures to {out}; open "
               f"{Path(out) / 'index.html'} first")
