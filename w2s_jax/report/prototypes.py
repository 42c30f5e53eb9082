"""``prototypes.html``: CPL in pictures. Prototypes live in the space of the image features, so each can be shown by
the ``test'`` images nearest to it: per class, the images nearest to the prototype CPL starts from (the class's text
embedding, or, for an encoder without a text tower, the centroid of the rows the weak model gives that class) beside
those nearest to the prototype it learned (seed 0), each marked by whether its label is that class; then the
images CPL gets right where the weak model was wrong (correction) and wrong where it was right (damage).

Images are read through a loader per store (``w2s-run`` passes each dataset's own); thumbnails are made once and
kept in ``thumbs/`` beside the page. A store whose images cannot be read is named on the page, and the rest is
written."""
from __future__ import annotations

import json
from pathlib import Path

import jinja2
import numpy as np

from w2s_jax.report.discover import Group

NEAREST = 4  # images shown per prototype and per correction/damage cell
THUMB = 64  # thumbnail side, px

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}: CPL in pictures</title>
<style>
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 90em; padding: 0 1em; color: #222; }
table { border-collapse: collapse; } th, td { border: 1px solid #ddd; padding: .3em; vertical-align: top; }
.how { color: #555; max-width: 60em; } figure { display: inline-block; margin: 0 .2em; text-align: center; }
figcaption { font-size: 12px; } .yes { color: #080; } .no { color: #b00; } .note { color: #b00; }
</style></head><body>
<h1>{{ title }}: CPL in pictures</h1>
<p><a href="index.html">back to the report</a></p>
<p class="how">Prototypes live in the image features' space, so each is shown by the test' images (seed 0) nearest to
it by cosine. Left: the prototype CPL starts from (the class's text embedding, or the centroid of the rows the weak
model gives the class where the encoder has no text tower). Middle: the prototype CPL learned. Right: images of
the class that CPL gets right where the weak model was wrong (correction), and wrong where it was right (damage).
✓ marks an image whose label is the row's class, ✗ one of another class (its label is named).</p>
{% for s in stores %}
<section id="{{ s.id }}"><h2>{{ s.domain }}, weak model {{ s.weak }}, method {{ s.method }}</h2>
{% if s.note %}<p class="note">{{ s.note }}</p>{% else %}
<p class="how">Starting prototypes: {{ s.start }}.</p>
<table><thead><tr><th>class</th><th>nearest to the starting prototype</th><th>nearest to the learned prototype</th>
<th>correction</th><th>damage</th></tr></thead><tbody>
{% for c in s.classes %}<tr><td>{{ c.name }}</td>
{% for cell in (c.start, c.learned, c.correction, c.damage) %}<td>{% for im in cell %}<figure data-row="{{ im.row }}">
<img src="{{ im.src }}" alt="{{ im.id }}" width="{{ thumb }}" height="{{ thumb }}"><figcaption class="{{ 'yes' if im.match else 'no' }}">
{{ "✓" if im.match else "✗" }} {{ im.label }}</figcaption></figure>{% endfor %}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>{% endif %}
</section>
{% endfor %}
</body></html>
"""


def nearest_rows(prototypes_KxD, feats_NxD, rows_N, n: int = NEAREST) -> np.ndarray:
    """``K x n``: for each prototype, the ``n`` rows of ``rows_N`` whose features are nearest by cosine (ties: the
    earlier row)."""
    feats = np.asarray(feats_NxD, np.float64)[rows_N]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    protos = np.asarray(prototypes_KxD, np.float64)
    protos = protos / np.maximum(np.linalg.norm(protos, axis=1, keepdims=True), 1e-12)
    order = np.argsort(-(protos @ feats.T), axis=1, kind="stable")[:, :n]
    return np.asarray(rows_N)[order]


def starting_prototypes(store, hold_train_N, weak_NxK) -> tuple[np.ndarray, str]:
    """``(K x D, what they are)``: the text embeddings' zero-shot prototypes, or the weak-label centroids of
    ``hold_train`` (the prototype head's start without a text tower)."""
    if store.text_TxKxD is not None:
        text = np.asarray(store.text_TxKxD, np.float64)
        text = text / np.linalg.norm(text, axis=-1, keepdims=True)
        return text.mean(axis=0), "the class names' text embeddings"
    feats = np.asarray(store.splits["test"].features_NxD, np.float64)[hold_train_N]
    feats = feats / np.maximum(np.linalg.norm(feats, axis=1, keepdims=True), 1e-12)
    targets = np.asarray(weak_NxK)[hold_train_N].argmax(1)
    sums = np.stack([feats[targets == k].sum(0) for k in range(store.num_classes)])
    return sums, "the centroids of the hold_train rows the weak model gives each class (no text tower)"


def store_section(group: Group, folder: Path, load, out: Path, classes, method: str) -> dict:
    """One store's section: per class, the nearest images to its starting and learned prototypes, and its
    correction and damage images; ``load``: id -> PIL image, or None (the section then says why there is none)."""
    from w2s_jax.saved_heads import load_heads
    from w2s_jax.store import read_store

    section = {"id": f"{group.dataset}-{group.domain}-{group.weak}", "domain": f"{group.dataset}/{group.domain}",
               "weak": group.weak, "method": method, "note": "", "classes": [], "start": ""}
    prov = json.loads((folder / "provenance.json").read_text())
    store_path = Path(prov.get("store_file", ""))
    if not store_path.is_file() or load is None:
        why = f"its store {store_path} is gone" if not store_path.is_file() else \
            "no image loader here: w2s-run passes each dataset its own"
        section["note"] = f"the images of {section['domain']} cannot be read ({why}); the rest of the report is written"
        return section
    store = read_store(store_path)
    test = store.splits["test"]
    with np.load(folder / "splits.npz") as z:
        test_prime, hold_train = z["test_prime"][0], z["hold_train"][0]
    head = load_heads(folder, methods=(method,))[method]
    if head.failed(seed=0):
        section["note"] = f"{method} failed in training on seed 0 (non-finite loss): it has no prototypes to show"
        return section
    weak_NxK = test.weak_logits[group.weak]
    start, section["start"] = starting_prototypes(store, hold_train, weak_NxK)
    learned = head.prototypes(seed=0)
    student = head.logits(test.features_NxD[test_prime], seed=0).argmax(1)
    weak_ok = weak_NxK[test_prime].argmax(1) == test.labels_N[test_prime]
    student_ok = student == test.labels_N[test_prime]
    names = store.provenance.class_names
    picked = range(len(names)) if not classes else [names.index(c) for c in classes if c in names]
    try:
        near_start = nearest_rows(start, test.features_NxD, test_prime)
        near_learned = nearest_rows(learned, test.features_NxD, test_prime)
        for k in picked:
            of_k = test.labels_N[test_prime] == k
            cells = {"start": near_start[k], "learned": near_learned[k],
                     "correction": test_prime[of_k & student_ok & ~weak_ok][:NEAREST],
                     "damage": test_prime[of_k & ~student_ok & weak_ok][:NEAREST]}
            section["classes"].append({"name": names[k], **{c: [thumbnail(row, test, names, k, load, out, section["id"])
                                                                for row in rows] for c, rows in cells.items()}})
    except (OSError, ValueError, KeyError) as err:  # a store moved away from its data: say so, write the rest
        section.update(note=f"the images of {section['domain']} cannot be read ({type(err).__name__}: {err}); the "
                            "rest of the report is written", classes=[])
    return section


def thumbnail(row: int, test, names, k: int, load, out: Path, prefix: str) -> dict:
    """The image of store row ``row`` as a thumbnail in ``out/thumbs/`` (made once), with its caption."""
    path = out / "thumbs" / f"{prefix}-{int(row)}.png"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        image = load(test.ids_N[row]).convert("RGB")
        image.thumbnail((THUMB, THUMB))
        image.save(path)
    label = int(test.labels_N[row])
    return {"row": int(row), "id": test.ids_N[row], "src": f"thumbs/{path.name}", "match": label == k,
            "label": names[label]}


def write_prototypes(out: Path, groups: list[Group], loaders: dict, *, title: str, classes=(),
                     method: str = "cpl", weak: str | None = None) -> Path | None:
    """Write ``out/prototypes.html`` for every group whose folders hold ``method``'s prototype heads (the first
    such folder per (dataset, domain); the weak model ``weak`` first, if given); ``loaders``: {(dataset, domain):
    id -> PIL image}. None when no group has such heads."""
    sections, seen = [], set()
    for g in sorted(groups, key=lambda g: g.weak != weak):  # stable: the headline's weak model first
        if (g.dataset, g.domain) in seen:
            continue
        folder = next((f for f in g.folders if (f / "heads" / "heads.json").is_file()
                       and method in json.loads((f / "heads" / "heads.json").read_text())["methods"]), None)
        if folder is None:
            continue
        seen.add((g.dataset, g.domain))
        sections.append(store_section(g, folder, loaders.get((g.dataset, g.domain)), Path(out), classes, method))
    if not sections:
        return None
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    path = Path(out) / "prototypes.html"
    path.write_text(env.from_string(TEMPLATE).render(title=title, stores=sections, thumb=THUMB))
    return path
