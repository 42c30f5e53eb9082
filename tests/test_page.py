"""The report's page (index.html), opened in a real headless browser (Debian's chromium, driven by selenium): it
loads from file:// with no console error, every image loads, every link inside the report resolves, the headline
table's numbers are metrics.json's, sorting a column reorders its rows, and a screenshot is saved. Names are text."""
import json
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
import pytest

from conftest import fit_two_domains
from w2s_jax import report
from w2s_jax.report.discover import Table
from w2s_jax.report.page import write_index


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two domains' fits (cpl, kd+lp, ceiling+lp; 2 seeds) and their report."""
    folder = tmp_path_factory.mktemp("page")
    fits = fit_two_domains(folder)
    loaders = {("synthetic", "clusters"): image_of}  # "shifted"'s images are gone: its section says so
    report.write_report(fits, folder / "report", curves=("cpl", "kd+lp"), headline_weak="noisy", cross_domain=True,
                        title="page test", loaders=loaders)
    return folder / "report", fits


def image_of(sample_id: str):
    """A small image per id (its colour from the id), as a dataset's loader gives."""
    from PIL import Image

    row = int(sample_id.split("/")[-1])
    return Image.new("RGB", (12, 12), ((37 * row) % 256, (11 * row) % 256, 128))


def browser():
    """A headless chromium under selenium, or a skip naming what is missing (never in CI, which installs them)."""
    missing = [b for b in ("chromium", "chromedriver") if shutil.which(b) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip install -e '.[test]')")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI needs {', '.join(missing)} for the browser test (.ci/run installs them)")
        pytest.skip(f"no {', '.join(missing)} here: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1600"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def test_the_page_in_a_real_browser(written, tmp_path):
    from selenium.webdriver.common.by import By

    out, fits = written
    page = out / "index.html"
    driver = browser()
    try:
        driver.get(page.as_uri())
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        assert not errors, errors
        # every image has loaded
        images = driver.find_elements(By.TAG_NAME, "img")
        assert len(images) >= 4
        sizes = driver.execute_script("return Array.from(document.images).map(i => [i.src, i.naturalWidth])")
        assert all(width > 0 for _, width in sizes), sizes
        # every link inside the report resolves: a file beside the page, or a heading on it
        ids = set(driver.execute_script("return Array.from(document.querySelectorAll('[id]')).map(e => e.id)"))
        for href in driver.execute_script("return Array.from(document.links).map(a => a.href)"):
            url = urlparse(href)
            assert url.scheme == "file", href  # nothing from the network
            assert Path(unquote(url.path)).is_file(), href
            if url.fragment:
                assert unquote(url.fragment) in ids, href
        # the headline's numbers are metrics.json's
        headline = driver.find_element(By.CSS_SELECTOR, "section#headline-noisy table")
        rows = {r.find_elements(By.TAG_NAME, "td")[0].text: [c.text for c in r.find_elements(By.TAG_NAME, "td")]
                for r in headline.find_elements(By.CSS_SELECTOR, "tbody tr")}
        for column, fit in enumerate(fits, start=1):
            summary = json.loads((fit / "metrics.json").read_text())
            for method in ("cpl", "kd+lp"):
                acc = 100 * np.asarray(summary["methods"][method]["test_acc"])
                assert rows[method][column] == f"{acc.mean():.2f} ± {acc.std():.2f}", (method, rows[method])
        # sorting a column reorders its rows
        first_column = lambda: [r.find_elements(By.TAG_NAME, "td")[0].text  # noqa: E731
                                for r in headline.find_elements(By.CSS_SELECTOR, "tbody tr")]
        before = first_column()
        headline.find_elements(By.TAG_NAME, "th")[0].click()
        after = first_column()
        assert after == sorted(before) and after != before
        headline.find_elements(By.TAG_NAME, "th")[0].click()
        assert first_column() == sorted(before, reverse=True)
        shot = tmp_path / "index.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        driver.get((out / "prototypes.html").as_uri())  # CPL in pictures: its thumbnails load too
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        sizes = driver.execute_script("return Array.from(document.images).map(i => [i.src, i.naturalWidth])")
        assert len(sizes) >= 20 and all(width > 0 for _, width in sizes), sizes
    finally:
        driver.quit()


def test_names_are_shown_as_text(written, tmp_path):
    out, fits = written
    name = '<b>x&y</b> "q" \'s'
    table = Table("t", f"a title {name}", ["method", "acc"], [[name, "1.00"]], note=f"note {name}")
    path = write_index(tmp_path, [table], [], report.discover(fits), title=name)
    html = path.read_text()
    assert "<b>x&y</b>" not in html
    assert "&lt;b&gt;x&amp;y&lt;/b&gt; &#34;q&#34; &#39;s" in html


def test_every_report_writes_its_page(written):
    out, _ = written
    html = (out / "index.html").read_text()
    assert "<h1>page test</h1>" in html and "code " in html and "machine:" in html
    for t in ("headline-noisy", "intervals-noisy", "cross-domain-noisy", "sources"):
        assert f'id="{t}"' in html and f'href="{t}.csv"' in html


def test_the_prototype_page_shows_the_true_nearest_images(written):
    """Each class's images nearest to its starting (text) and learned cpl prototype are the nearest by a NumPy
    computation on the store's test' rows of seed 0; the store whose images cannot be read is named."""
    import re

    from w2s_jax.saved_heads import load_heads
    from w2s_jax.store import read_store

    out, fits = written
    html = (out / "prototypes.html").read_text()
    assert "the images of synthetic/shifted cannot be read" in html and "no image loader" in html
    store = read_store(fits[0].parent / "clusters.h5")
    test = store.splits["test"]
    rows = np.load(fits[0] / "splits.npz")["test_prime"][0]
    feats = test.features_NxD[rows] / np.linalg.norm(test.features_NxD[rows], axis=1, keepdims=True)
    text = store.text_TxKxD / np.linalg.norm(store.text_TxKxD, axis=-1, keepdims=True)
    learned = load_heads(fits[0])["cpl"].prototypes(seed=0)
    section = html[html.index('id="synthetic-clusters-noisy"'):html.index("</section>")]
    table_rows = section.split("<tr><td>")[1:]
    assert len(table_rows) == store.num_classes
    for k, row_html in enumerate(table_rows):
        cells = row_html.split("<td>")[1:]
        shown = [[int(x) for x in re.findall(r'data-row="(\d+)"', cell)] for cell in cells]
        for protos, got in ((text.mean(0), shown[0]), (learned, shown[1])):
            want = rows[np.argsort(-(feats @ protos[k]))[:4]]
            assert got == want.tolist(), (k, got, want)
        assert all((out / "thumbs" / f"synthetic-clusters-noisy-{r}.png").is_file() for r in shown[0])
    assert 'href="prototypes.html"' in (out / "index.html").read_text()


def test_the_headline_is_followed_by_pgr_with_its_interval(written):
    """PGR per domain with its 95% t-interval over seeds, recomputed with scipy from metrics.json's per-seed PGR."""
    import csv

    from scipy import stats

    out, fits = written
    rows = list(csv.reader((out / "pgr-intervals-noisy.csv").open()))
    html = (out / "index.html").read_text()
    assert html.index('id="headline-noisy"') < html.index('id="pgr-intervals-noisy"') < html.index('id="table2-noisy"')
    cell = next(r for r in rows if r[0] == "kd+lp")[1]
    per_seed = np.asarray(json.loads((fits[0] / "metrics.json").read_text())["pgr"]["kd+lp"]["per_seed"])
    half = stats.t.ppf(0.975, len(per_seed) - 1) * per_seed.std(ddof=1) / np.sqrt(len(per_seed))
    assert cell == f"{per_seed.mean():.3f} [{per_seed.mean() - half:.3f}, {per_seed.mean() + half:.3f}]"


def test_without_a_text_tower_cpl_starts_from_the_weak_label_centroids(tmp_path):
    """The demo's case: no text tower, so the starting prototypes are the centroids of the hold_train rows the weak
    model gives each class; the page's nearest images to them are the NumPy ones."""
    import re

    from click.testing import CliRunner

    from conftest import synthetic_store
    from w2s_jax import cli as fit_cli
    from w2s_jax.report.prototypes import write_prototypes

    store = synthetic_store(tmp_path / "s.h5", text=False)
    r = CliRunner().invoke(fit_cli.main, ["--store", str(tmp_path / "s.h5"), "--methods", "cpl", "--seeds", "1",
                                          "--epochs", "1", "--batch-size", "64", "--out", str(tmp_path / "fit")])
    assert r.exit_code == 0, r.output
    page = write_prototypes(tmp_path, report.discover([tmp_path / "fit"]), {("synthetic", "clusters"): image_of},
                            title="t")
    html = page.read_text()
    assert "the centroids of the hold_train rows" in html
    test = store.splits["test"]
    splits = np.load(tmp_path / "fit" / "splits.npz")
    train, rows = splits["hold_train"][0], splits["test_prime"][0]
    unit = test.features_NxD / np.linalg.norm(test.features_NxD, axis=1, keepdims=True)
    weak = test.weak_logits["noisy"][train].argmax(1)
    for k, row_html in enumerate(html.split("<tr><td>")[1:]):
        centroid = unit[train][weak == k].mean(0)
        want = rows[np.argsort(-(unit[rows] @ centroid))[:4]].tolist()
        got = [int(x) for x in re.findall(r'data-row="(\d+)"', row_html.split("<td>")[1])]
        assert got == want, (k, got, want)
