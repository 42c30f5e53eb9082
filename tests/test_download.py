"""The DomainNet downloader against a local HTTP server on 127.0.0.1 serving a tiny archive."""
import hashlib

import pytest
from click.testing import CliRunner

from extract import cli
from extract.datasets import load_dataset
from extract.download import DownloadError, fetch


def test_download_then_load(mirror, tmp_path):
    url, served, _ = mirror
    root = tmp_path / "dl"
    digest = hashlib.sha256((served / "real.zip").read_bytes()).hexdigest()
    r = CliRunner().invoke(cli.main, ["download", "--domain", "real", "--root", str(root), "--mirror", url,
                                      "--sha256", f"real.zip={digest}"])
    assert r.exit_code == 0, r.output
    ds = load_dataset("domainnet", domain="real", root=str(root))
    assert len(ds.splits["test"][0]) == 9 and ds.load(ds.splits["test"][0][0]).size == (40, 40)


def test_partial_download_resumes_with_range(mirror, tmp_path):
    url, served, server = mirror
    full = (served / "real.zip").read_bytes()
    dest = tmp_path / "real.zip"
    (tmp_path / "real.zip.part").write_bytes(full[:100])
    fetch(f"{url}/real.zip", dest)
    assert dest.read_bytes() == full
    assert server.requests[-1] == ("/real.zip", 100)


def test_checksum_mismatch_is_reported(mirror, tmp_path):
    url, _, _ = mirror
    with pytest.raises(DownloadError, match="sha256"):
        fetch(f"{url}/real.zip", tmp_path / "real.zip", sha256="0" * 64)
    assert (tmp_path / "real.zip.bad").exists() and not (tmp_path / "real.zip").exists()


def test_unreachable_mirror_is_a_clear_error(tmp_path):
    r = CliRunner().invoke(cli.main, ["download", "--domain", "real", "--root", str(tmp_path),
                                      "--mirror", "http://127.0.0.1:9"])
    assert r.exit_code != 0 and "cannot connect" in r.output and "Traceback" not in r.output
