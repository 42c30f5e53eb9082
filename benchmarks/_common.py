"""Helpers shared by the benchmark scripts (not part of the package).

Timings on shared machines: :func:`measure` repeats a run until 3 are *clean* (other processes used at most 5%
of its wall time, from /proc) and reports the median and minimum, or marks the figure NOISY; :func:`machine`
prints the CPU, the versions and BLAS, and the large-GEMM rate every fit is compared with, measured in the same run.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np


def bucket_neighbour(n: int) -> int:
    """A store size one row from ``n`` in the same size bucket (w2s_jax.fit.bucket_size): it loads n's programs."""
    from w2s_jax.fit import bucket_size  # imported here: it imports jax

    return n - 1 if bucket_size(n - 1) == bucket_size(n) else n + 1


def machine() -> str:
    """One line: CPU model and cores, package versions and BLAS, and this machine's best float32 GEMM rates."""
    import os

    versions = {p: metadata.version(p) for p in ("jax", "jaxlib", "torch", "open_clip_torch") if _has(p)}
    rates = peak_gemm_rates()
    return (f"{cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, Python {platform.python_version()}, "
            f"{versions}, torch BLAS {torch_blas()}; large float32 GEMM: "
            + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in rates.items()))


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def torch_blas() -> str:
    if not _has("torch"):
        return "n/a"
    import torch

    config = torch.__config__.show()
    for key in ("BLAS_INFO=", "LAPACK_INFO="):
        if key in config:
            return config.split(key, 1)[1].split(",")[0]
    return "unknown"


def peak_gemm_rates(n: int = 2048) -> dict:
    """The machine's float32 GEMM rate on large square matrices (n x n x n), FLOP/s, best of 5, in JAX and torch:
    the roofline every fit is compared with."""
    import jax
    import jax.numpy as jnp

    rates = {}
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    mm = jax.jit(lambda x: x @ x)
    mm(a).block_until_ready()
    rates["jax"] = 2 * n**3 / min(_wall(lambda: mm(a).block_until_ready()) for _ in range(5))
    if _has("torch"):
        import torch

        t = torch.randn(n, n)
        t @ t
        rates["torch"] = 2 * n**3 / min(_wall(lambda: t @ t) for _ in range(5))
    return rates


def _has(pkg) -> bool:
    try:
        metadata.version(pkg)
        return True
    except metadata.PackageNotFoundError:
        return False


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# ------------------------------------------------------------------ timing on a shared machine


def _wall(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _busy_seconds() -> float:
    """CPU-seconds all processes have spent busy (user, nice, system, irq, softirq, steal), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    """CPU-seconds of this process (all its threads) and its waited-for children, from /proc/self/stat."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class Measurement:
    median: float  # seconds, over the clean runs (over all runs if noisy)
    min: float
    clean: int  # runs where other processes used at most QUIET of the wall time
    runs: int
    noisy: bool  # fewer than the asked-for clean runs could be had
    other: list  # per run: CPU-seconds of other processes / wall seconds

    def __str__(self) -> str:
        text = f"median {self.median:.3f} s, min {self.min:.3f} s"
        if self.noisy:
            return text + (f" NOISY: {self.clean} clean of {self.runs} runs (other processes used up to "
                           f"{100 * max(self.other):.0f}% of wall time)")
        return text + f" ({self.clean} clean runs)"


QUIET = 0.05  # a run is clean when other processes used at most 5% of its wall time (in CPU-seconds)


def measure(fn, *, clean: int = 3, max_runs: int = 10) -> Measurement:
    """Time ``fn()`` until ``clean`` runs were quiet (other processes' CPU time, from /proc, at most QUIET of the
    wall time), or ``max_runs`` were made; median and minimum over the clean runs, marked noisy if too few.
    If ``fn`` returns a number, that is the time recorded for the run (the quiet check still covers the whole call)."""
    walls, others = [], []
    while sum(o <= QUIET for o in others) < clean and len(walls) < max_runs:
        busy, own, t = _busy_seconds(), _own_seconds(), time.perf_counter()
        timed_part = fn()  # fn may return the seconds of the part to time (e.g. run time without compile)
        wall = time.perf_counter() - t
        other = max(0.0, (_busy_seconds() - busy) - (_own_seconds() - own))
        walls.append(float(timed_part) if isinstance(timed_part, (int, float)) else wall)
        others.append(other / wall)
    good = [w for w, o in zip(walls, others) if o <= QUIET]
    noisy = len(good) < clean
    chosen = walls if noisy else good
    return Measurement(float(np.median(chosen)), float(min(chosen)), len(good), len(walls), noisy, others)


def timed(fn, repeats: int = 1) -> float:
    """Best wall time of ``repeats`` clean calls (see :func:`measure`), seconds; a noisy result is announced."""
    m = measure(fn, clean=repeats, max_runs=max(3 * repeats, repeats + 2))
    if m.noisy:
        print(f"  (timing {m})")
    return m.min


def register_tiny_clip(image_size=64, vision_width=128, text_width=64, layers=2, embed_dim=64) -> str:
    """Registers a small random open_clip config (the same kind the tests use); returns its name."""
    import open_clip

    name = f"w2s-bench-{image_size}-{vision_width}-{text_width}-{layers}"
    cfg = {"embed_dim": embed_dim,
           "vision_cfg": {"image_size": image_size, "layers": layers, "width": vision_width, "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": 4, "layers": layers}}
    path = Path(tempfile.mkdtemp()) / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return name


def clustered(n, d, k, rng, weak_noise=1.0, feat_noise=5.0, text_noise=1.0):
    """Class-clustered features, noisy weak logits (~55% right at k=345) and noisy text embeddings:
    (feats_NxD, weak_NxK, labels_N, text_1xKxD)."""
    centers = rng.normal(size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, n)
    feats = centers[labels] + feat_noise * rng.normal(size=(n, d)).astype(np.float32)
    weak = 3.0 * np.eye(k, dtype=np.float32)[labels] + weak_noise * rng.normal(size=(n, k)).astype(np.float32)
    text = centers + text_noise * rng.normal(size=(k, d)).astype(np.float32)
    return feats.astype(np.float32), weak.astype(np.float32), labels, text[None].astype(np.float32)
