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
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli as fit_cli
from w2s_jax import report
from w2s_jax.report.discover import Table
from w2s_jax.report.page import write_index


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """Two domains' fits (cpl, kd+lp, ceiling+lp; 2 seeds) and their report."""
    folder = tmp_path_factory.mktemp("page")
    fits = []
    for domain, seed in (("clusters", 0), ("shifted", 1)):
        synthetic_store(folder / f"{domain}.h5", domain=domain, seed=seed)
        r = CliRunner().invoke(fit_cli.main, ["--store", str(folder / f"{domain}.h5"), "--methods",
                                              "cpl,kd+lp,ceiling+lp", "--seeds", "2", "--epochs", "2",
                                              "--batch-size", "64", "--out", str(folder / domain)])
        assert r.exit_code == 0, r.output
        fits.append(folder / domain)
    report.write_report(fits, folder / "report", curves=("cpl", "kd+lp"), headline_weak="noisy", cross_domain=True,
                        title="page test")
    return folder / "report", fits


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
