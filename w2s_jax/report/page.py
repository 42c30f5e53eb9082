"""``index.html``: one self-contained page that reads a report first (Jinja2, autoescaped: a method or class name is
always text). It opens from the file system: no server, no network, no script or font fetched from anywhere; the
figures are the PNG files beside it, and each table links its md/csv/tex files. A few lines of inline script sort a
table by the column whose header is clicked."""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess
from pathlib import Path

import jinja2

from w2s_jax.report.discover import Group, Table
from w2s_jax.store import weak_kind

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}: w2s report</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 80em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: .5em 0 1em; } th, td { border: 1px solid #ccc; padding: .2em .5em; }
th { background: #f3f3f3; cursor: pointer; user-select: none; } th:after { content: " \\2195"; color: #999; }
td { text-align: right; } td:first-child, td:nth-child(2) { text-align: left; }
.how { color: #555; max-width: 60em; } .meta { color: #555; } .files a { margin-right: .6em; }
figure { display: inline-block; margin: 0 1em 1em 0; } img { max-width: 36em; border: 1px solid #eee; }
nav a { margin-right: .8em; }
</style></head><body>
<h1>{{ title }}</h1>
<p class="meta">Written {{ written }} by w2s, code {{ commit }}; machine: {{ machine }}.</p>
<nav>{% for t in tables %}<a href="#{{ t.name }}">{{ t.name }}</a>{% endfor %}
<a href="#figures">training curves</a><a href="#provenance">provenance</a>{% if prototypes %}
<a href="{{ prototypes }}">CPL in pictures</a>{% endif %}</nav>
{% for t in tables %}
<section id="{{ t.name }}">
<h2>{{ t.title }}</h2>
{% if t.how %}<p class="how">{{ t.how }}</p>{% endif %}
<table class="sortable"><thead><tr>{% for h in t.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody></table>
{% if loop.first and selection %}<p class="how">{{ selection }}</p>{% endif %}
{% for f in t.figures %}<figure><img src="{{ f.file }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}
<p class="files">{% for ext in ("md", "csv", "tex") %}<a href="{{ t.name }}.{{ ext }}">{{ t.name }}.{{ ext }}</a>{% endfor %}</p>
</section>
{% endfor %}
<section id="figures"><h2>Training curves</h2>
<p class="how">Per domain and weak model: each method's train accuracy against its own target (dashed) and test'
accuracy (solid) by epoch, with the weak model and the ceilings as lines; the kept epoch is chosen on hold_val.</p>
{% for f in figures %}<figure><img src="{{ f.file }}" alt="{{ f.caption }}"><figcaption>{{ f.caption }}</figcaption></figure>
{% endfor %}</section>
<section id="provenance"><h2>Provenance</h2>
<p class="how">Every results folder behind these tables: its store, the strong encoder, the weak model and how it was
made, the seeds and the grid.</p>
<table class="sortable"><thead><tr>{% for h in provenance.header %}<th>{{ h }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in provenance.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>{% endfor %}</tbody>
</table></section>
<script>
document.querySelectorAll("table.sortable th").forEach(function (th, _) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), col = Array.prototype.indexOf.call(th.parentNode.children, th);
    var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
    var up = table.dataset.sorted !== col + "up";
    var key = function (r) { var t = r.cells[col] ? r.cells[col].textContent.trim() : "";
                             var v = parseFloat(t.replace(/^[^0-9+\\-.]*/, "")); return isNaN(v) ? t : v; };
    rows.sort(function (a, b) { var x = key(a), y = key(b);
      var c = (typeof x === "number" && typeof y === "number") ? x - y : String(x).localeCompare(String(y));
      return up ? c : -c; });
    rows.forEach(function (r) { body.appendChild(r); });
    table.dataset.sorted = up ? col + "up" : col + "down";
  });
});
</script>
</body></html>
"""


def commit_of_code() -> str:
    """The git commit of the code that writes the page (``abc1234``, ``+`` when the tree has changes), or the
    package version where it is not a git checkout."""
    root = Path(__file__).resolve().parents[2]
    try:
        rev = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        if rev.returncode == 0:
            return rev.stdout.strip() + ("+" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib import metadata

    return f"w2s {metadata.version('w2s')}"


def machine_line() -> str:
    """CPU model, cores, OS and Python, and JAX's devices: the machine the report was written on."""
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}, Python "
            f"{platform.python_version()}, jax {jax.__version__} ({', '.join(str(d) for d in jax.devices())})")


def provenance_table(groups: list[Group]) -> Table:
    """Per results folder: domain, store, encoder, the weak model and how it was made, seeds and grid."""
    rows = []
    for g in groups:
        for folder in g.folders:
            prov = json.loads((folder / "provenance.json").read_text())
            cfg = json.loads((folder / "config.json").read_text())
            info = prov.get("weak_model") or {}
            made = ", ".join(f"{k} {info[k]}" for k in ("mode", "source", "epochs", "mapping", "text_tower",
                                                         "uncovered_classes") if k in info)
            rows.append([f"{g.dataset}/{g.domain}", str(folder), prov.get("store_file", cfg.get("store", "")),
                         prov.get("encoder", ""), g.weak, weak_kind(info), made, str(cfg.get("seeds", "")),
                         str(cfg.get("grid") or "")])
    return Table("provenance", "Provenance", ["domain", "results folder", "store", "strong encoder", "weak model",
                                              "weak kind", "how the weak model was made", "seeds", "grid"], rows)


def caption(path: Path) -> str:
    """A figure's caption from its file name (``curves-demo-mnist-pixels@4.png``)."""
    kinds = {"curves": "training curves", "pgr": "PGR by method and domain", "misfit-gain": "gain against misfit",
             "correction-damage": "correction against damage", "cross-domain": "in- against out-of-domain accuracy"}
    stem = path.stem
    for prefix, words in kinds.items():
        if stem == prefix or stem.startswith(prefix + "-"):
            rest = stem[len(prefix) + 1:]
            return words + (f": {rest}" if rest else "")
    return stem


def figure_table(path: Path, tables: set) -> str | None:
    """The table a figure is shown under (PGR's heat map under the PGR table, correction against damage under the
    gain sources, misfit against gain under misfit-gain, the cross-domain scatter under its matrix), or None."""
    stem = path.stem
    for prefix, table in (("pgr", "pgr"), ("correction-damage", "gain-sources"), ("misfit-gain", "misfit-gain")):
        if (stem == prefix or stem.startswith(prefix + "-")) and table in tables:
            return table
    return stem if stem.startswith("cross-domain-") and stem in tables else None


def write_index(out: Path, tables: list[Table], figures: list[Path], groups: list[Group], *, title: str,
                selection: str | None = None, prototypes: str | None = None) -> Path:
    """Write ``out/index.html``: the tables in order (the first is the headline), each with its note as how to read
    it and links to its files; the figures; the provenance. Returns its path."""
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    names = {t.name for t in tables}
    beside = {}  # table name -> the figures shown under it; the rest (training curves) get their own section
    for f in map(Path, figures):
        beside.setdefault(figure_table(f, names), []).append({"file": f.name, "caption": caption(f)})
    shown = [{"name": t.name, "title": t.title, "header": t.header, "rows": t.rows, "how": t.note,
              "figures": beside.get(t.name, [])} for t in tables]
    page = env.from_string(TEMPLATE).render(
        title=title, written=datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), commit=commit_of_code(),
        machine=machine_line(), tables=shown, selection=selection,
        figures=beside.get(None, []),
        provenance=provenance_table(groups), prototypes=prototypes)
    path = Path(out) / "index.html"
    path.write_text(page)
    return path
