"""JAX's persistent compilation cache, on by default for the CLIs: a rerun of the same grid (same shapes,
methods, hyperparameter fields and batch size) loads its compiled programs from disk instead of compiling.

The folder is ``$W2S_CACHE/jax``, else ``$XDG_CACHE_HOME/w2s/jax``, else ``~/.cache/w2s/jax``;
``w2s-fit --no-compile-cache`` turns it off. Entries are keyed by JAX on the program and its compile options,
so a stale entry is never used; deleting the folder is always safe.
"""
from __future__ import annotations

import os
import tempfile
import warnings
from pathlib import Path

import jax


def cache_folder() -> Path:
    root = os.environ.get("W2S_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "w2s"
    return Path(root) / "jax"


def enable(folder: Path | None = None, warn=None) -> Path | None:
    """Turn the persistent cache on in ``folder`` (default :func:`cache_folder`); returns the folder. A folder that
    cannot be made or written (a read-only file system, ``W2S_CACHE`` naming a file) leaves the cache off, with
    one warning through ``warn`` (default: ``warnings.warn``), and returns None: the fit runs, compiling as usual."""
    folder = Path(folder or cache_folder())
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        (warn or warnings.warn)(f"compilation cache off: cannot write {folder} ({err.strerror or err}); set W2S_CACHE "
                                "to a writable folder, or pass --no-compile-cache to silence this")
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)  # our programs: every one is worth keeping
    return folder
