"""A :class:`Table` as markdown, CSV and LaTeX (booktabs)."""
from __future__ import annotations

import csv
import io

from w2s_jax.report.discover import Table


def to_markdown(t: Table) -> str:
    lines = [f"**{t.title}**", "", "| " + " | ".join(t.header) + " |", "|" + "---|" * len(t.header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in t.rows] + ([f"\n{t.note}"] if t.note else []))


def to_csv(t: Table) -> str:
    buf = io.StringIO()
    csv.writer(buf).writerows([t.header, *t.rows])
    return buf.getvalue()


def to_latex(t: Table) -> str:
    def esc(x):
        return str(x).replace("±", r"$\pm$").replace("_", r"\_").replace("&", r"\&").replace("Δ", r"$\Delta$") \
            .replace("−", "--").replace("%", r"\%")

    caption = esc(t.title + (". " + t.note if t.note else ""))
    lines = [r"\begin{table}[t]", r"\centering", rf"\caption{{{caption}}}",
             r"\begin{tabular}{l" + "c" * (len(t.header) - 1) + "}", r"\toprule",
             " & ".join(map(esc, t.header)) + r" \\", r"\midrule"]
    lines += [" & ".join(map(esc, r)) + r" \\" for r in t.rows]
    return "\n".join(lines + [r"\bottomrule", r"\end{tabular}", r"\end{table}"]) + "\n"
