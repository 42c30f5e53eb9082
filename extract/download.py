"""Download DomainNet's official archives and split files into the layout :func:`datasets.domainnet` reads.

Partial downloads resume with an HTTP Range request; a finished file is verified against
``CHECKSUMS`` where we know its sha256 (otherwise its sha256 is printed so you can pin it).
``--mirror`` replaces the official base URL, keeping the same relative paths.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

from tqdm.auto import tqdm

from extract.datasets import DOMAINNET_DOMAINS, check_domainnet_domain

OFFICIAL_BASE = "http://csr.bu.edu/ftp/visda/2019/multi-source"
# Relative paths on the official server (clipart and painting live under groundtruth/).
ARCHIVES = {d: f"{'groundtruth/' if d in ('clipart', 'painting') else ''}{d}.zip" for d in DOMAINNET_DOMAINS}
ARCHIVE_GB = {"clipart": 1.2, "infograph": 4.0, "painting": 3.7, "quickdraw": 0.4, "real": 5.6, "sketch": 2.5}  # approx.
SPLIT_FILES = {(d, s): f"domainnet/txt/{d}_{s}.txt" for d in DOMAINNET_DOMAINS for s in ("train", "test")}
# sha256 of files whose digest we have verified ourselves; none yet (we could not reach the server).
# Pass --sha256 FILE=DIGEST to pin one, or add it here once verified.
CHECKSUMS: dict[str, str] = {}


class DownloadError(RuntimeError):
    """A download that failed, with the reason and the fix."""


def fetch(url: str, dest: Path, sha256: str | None = None, chunk: int = 1 << 20, quiet: bool = False) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present; verify ``sha256`` if given (``quiet``: the
    caller checks the file otherwise, so no digest is printed without one)."""
    if dest.exists():
        _verify(dest, sha256, quiet)
        return dest
    part = dest.with_name(dest.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=60)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # range past the end: the part file is already complete
            os.replace(part, dest)
            _verify(dest, sha256, quiet)
            return dest
        raise DownloadError(f"{url}: HTTP {err.code} {err.reason}; check the URL or --mirror") from None
    except (urllib.error.URLError, OSError) as err:
        raise DownloadError(
            f"{url}: cannot connect ({err}); check your network, or pass --mirror with a reachable copy. "
            f"Partial data in {part} is kept and resumes next time."
        ) from None
    with response:
        resumed = have and response.status == 206
        total = int(response.headers.get("Content-Length") or 0) + (have if resumed else 0)
        with open(part, "ab" if resumed else "wb") as f, tqdm(
            total=total or None, initial=have if resumed else 0, unit="B", unit_scale=True, desc=dest.name,
            disable=None,
        ) as bar:
            for block in iter(lambda: response.read(chunk), b""):
                f.write(block)
                bar.update(len(block))
    os.replace(part, dest)
    _verify(dest, sha256, quiet)
    return dest


def _verify(path: Path, sha256: str | None, quiet: bool = False) -> None:
    if quiet and not sha256:
        return
    digest = _sha256(path)
    if sha256 and digest != sha256:
        bad = path.with_name(path.name + ".bad")
        os.replace(path, bad)
        raise DownloadError(f"{path.name}: sha256 {digest} != expected {sha256}; moved to {bad}; download again")
    if not sha256:
        print(f"{path.name}: sha256 {digest} (no known checksum to compare)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_domainnet(domain: str, root, mirror: str | None = None, checksums: dict | None = None) -> Path:
    """Fetch ``domain``'s archive and split files into ``root`` and unzip the archive there."""
    check_domainnet_domain(domain)
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    base = (mirror or OFFICIAL_BASE).rstrip("/")
    sums = {**CHECKSUMS, **(checksums or {})}
    for split in ("train", "test"):
        rel = SPLIT_FILES[(domain, split)]
        fetch(f"{base}/{rel}", root / Path(rel).name, sums.get(Path(rel).name))
    archive = fetch(f"{base}/{ARCHIVES[domain]}", root / f"{domain}.zip", sums.get(f"{domain}.zip"))
    if not (root / domain).is_dir():
        tmp = root / f".{domain}.unzipping"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
        except zipfile.BadZipFile:
            raise DownloadError(f"{archive} is not a valid zip; delete it and download again") from None
        os.replace(tmp / domain, root / domain)
        shutil.rmtree(tmp)
    return root


@contextlib.contextmanager
def resumable_torchvision():
    """Within it, ``torchvision.datasets`` download their archives with :func:`fetch` (an interrupted download
    resumes where it stopped, from its ``.part`` file) and check them by their md5 as torchvision does; torchvision
    then unpacks them as usual."""
    import torchvision.datasets.flowers102 as flowers
    import torchvision.datasets.utils as tv

    def download_url(url, root, filename=None, md5=None, max_redirect_hops=3):
        dest = Path(root).expanduser() / (filename or Path(url).name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not (dest.exists() and tv.check_integrity(str(dest), md5)):
            dest.unlink(missing_ok=True)  # a finished file with the wrong md5 is fetched again
            fetch(url, dest, quiet=True)
        if not tv.check_integrity(str(dest), md5):
            bad = dest.with_name(dest.name + ".bad")
            os.replace(dest, bad)
            raise DownloadError(f"{url}: the file's md5 is not {md5}; moved to {bad}; download again")

    saved = tv.download_url, flowers.download_url
    tv.download_url = flowers.download_url = download_url
    try:
        yield
    finally:
        tv.download_url, flowers.download_url = saved
