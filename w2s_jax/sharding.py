"""Laying the seed axis over every visible device, on one or many hosts.

The fit's unit of work is a seed: all methods x hparams of a seed share its minibatches and run as one fused
step (:func:`w2s_jax.fit.seed_epoch`). The S seeds are padded to a multiple of the device count by repeating
the last seed and sharded over a 1-D ``Mesh`` axis "seeds" with ``NamedSharding``; the hparams and the shared
data are replicated. One device is the same code path with a mesh of 1.
Multi-host: call :func:`initialize_distributed` first (``w2s-fit --distributed``); every host
holds the full (small) inputs and results are all-gathered.
"""
from __future__ import annotations


import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
    """``jax.distributed.initialize``: with no arguments it auto-detects SLURM (and other clusters JAX
    knows); for a plain multi-node run pass the coordinator's host:port, the process count and this
    process's id (see README, "Scaling out")."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def seed_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("seeds",))


def pad_seeds(tree, multiple: int):
    """Pad the leading (seed) axis to a multiple of ``multiple`` by repeating the last seed."""
    def pad(a):
        a = np.asarray(a)
        extra = (-a.shape[0]) % multiple
        return np.concatenate([a, np.repeat(a[-1:], extra, axis=0)]) if extra else a
    return jax.tree.map(pad, tree)


def place(tree, mesh: Mesh, spec: P):
    """Host NumPy arrays -> global jax Arrays with ``NamedSharding(mesh, spec)`` (works on many hosts)."""
    sharding = NamedSharding(mesh, spec)
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx]),
                        jax.tree.map(np.asarray, tree))


def to_host(tree):
    """Global arrays -> NumPy on every host (all-gathered when several processes)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, tree)
