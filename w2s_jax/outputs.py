"""Safe outputs: check an output path before any work, hold a lock while writing, and swap folders in atomically.

Shared by w2s-fit, w2s-tp and w2s-extract (the lock file sits beside the output, as ``.NAME.lock``).
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be used, naming the path, the problem and the fix."""


def result_folders(out, store: str, labels, suffix: str = "") -> dict:
    """``{label: folder}`` of a fit's results folders (a label: a weak model, or ``A+B`` for several combined):
    ``--out`` for one (default ``results/STORE-LABEL`` + ``suffix``); with several, ``--out`` is their parent
    (``OUT/LABEL``), or a pattern holding ``{weak}``."""
    labels = list(labels)
    if out is None:
        return {w: Path(f"results/{Path(store).stem}-{w}{suffix}") for w in labels}
    if "{weak}" in str(out):
        return {w: Path(str(out).replace("{weak}", w)) for w in labels}
    return {labels[0]: Path(out)} if len(labels) == 1 else {w: Path(out) / w for w in labels}


def check_output(path, *, folder: bool) -> Path:
    """``path`` as a Path, or an OutputError if it is the wrong kind or cannot be written (checked by a probe file)."""
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise OutputError(f"--out {path} is a file; pass a folder for the results")
    if not folder and path.is_dir():
        raise OutputError(f"--out {path} is a folder; pass a file path for the store, e.g. {path / 'store.h5'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".w2s-write-test-")
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise OutputError(f"cannot write under {parent} ({err.strerror or err}); pass an --out in a writable folder") \
            from None
    return path


@contextlib.contextmanager
def exclusive(path):
    """Hold the lock of ``path`` (the file ``.NAME.lock`` beside it) for the block; another holder is an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another process is writing {path} right now; wait for it to finish, "
                              "or pass another --out") from None
        yield path


def swap_in(tmp: Path, final: Path) -> Path:
    """Move the finished folder ``tmp`` to ``final``, replacing what was there; readers never see a half folder."""
    old = final.parent / f".{final.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def staging_folder(final: Path) -> Path:
    """A fresh hidden folder beside ``final`` to write into before :func:`swap_in` (call it under
    :func:`exclusive`, so the fixed name is ours; what a killed writer left there is cleared first)."""
    tmp = final.parent / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp
