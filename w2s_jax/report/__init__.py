"""``w2s-report``: the paper's tables and figures from results folders only (never retrains).

- Table 2 analogue: methods x domains (mean ± std, Avg., Δ = CPL minus the best baseline), per weak model.
  The best baseline is chosen by mean hold_val agreement with the weak labels (label-free); the paper's
  convention, the best by test' accuracy, is shown beside it as a labelled extra row.
- Table 3 analogue: methods x weak models, per domain with several weak models.
- Table 4 analogue: learning C (``cpl``) vs tuning the text encoder (``cpl+textenc``).
- PGR per method and domain (table and heat map); Figure 2 analogue: training curves with weak and
  ceiling lines. Every table is written as markdown, CSV and LaTeX (booktabs).
- Misfit and gain (``metrics.misfit``): a table per domain, weak model and method, the gain-misfit scatter per
  domain with the line gain = misfit, and, for domains with several weak models, how often the label-free
  choice of weak model by misfit agrees with the truth (``metrics.choice_by_misfit``).
- ``--paper``: our DomainNet numbers beside the paper's published Table 2 (and Table 3, for the numbers
  that ``paper_numbers.TABLE3`` holds; it ships empty, see there).
"""
from __future__ import annotations

from w2s_jax.report.cross import CROSS_NOTE, cross_domain_tables  # noqa: F401
from w2s_jax.report.discover import Group, Table, discover  # noqa: F401
from w2s_jax.report.figures import (plot_correction_damage, plot_cross_domain, plot_curves,  # noqa: F401
                                   plot_misfit_gain, plot_pgr)
from w2s_jax.report.formats import to_csv, to_latex, to_markdown  # noqa: F401
from w2s_jax.report.tables import *  # noqa: F401,F403
from w2s_jax.report.tables import _cell, _delta, _interval_cell  # noqa: F401
from w2s_jax.report.writer import main, write_report  # noqa: F401
