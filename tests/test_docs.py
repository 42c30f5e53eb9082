"""The README is a front page and docs/ the manual: every relative link in them resolves (the file, and the heading
an anchor names), and none of them, nor benchmarks/RESULTS.md, tells the history of its writing."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())  # headings inside code blocks are not headings
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", text)}


def links(path: Path):
    text = re.sub(r"(?ms)^```.*?^```", "", path.read_text())
    return [m.group(1) for m in LINK.finditer(text)]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_relative_link_resolves(page):
    broken = []
    for target in links(page):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading #{anchor} in {path.name}")
    assert not broken, broken


def test_the_readme_is_a_front_page():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 300


HISTORY = re.compile(r"\b(this|an earlier|the last|the previous|our) session\b|\bwas lent\b|\bno GPU was\b|"
                     r"\bnot lent\b|(?<![\w/])#\d{2}\b|\bsession's\b|\bdevice calls?\b|\boutran\b", re.IGNORECASE)


@pytest.mark.parametrize("page", [*PAGES, ROOT / "benchmarks" / "RESULTS.md"], ids=lambda p: p.name)
def test_no_page_tells_the_history_of_its_writing(page):
    found = [line.strip()[:120] for line in page.read_text().splitlines() if HISTORY.search(line)]
    assert not found, found
