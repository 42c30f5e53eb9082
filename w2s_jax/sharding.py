"""Laying the model axis (seeds x hparams, flattened) over every visible device, on one or many hosts.

The grid (S seeds x H hparams) is flattened seed-major into M = S*H models, padded to a multiple
of the device count by repeating the last model, sharded over a 1-D ``Mesh`` axis "models" with
``NamedSharding``; the shared data is replicated. One device is the same code path with a mesh of 1.
Multi-host: call :func:`initialize_distributed` first (``w2s-fit --distributed``); every host
holds the full (small) inputs and results are all-gathered.
"""
from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def initialize_distributed(coordinator=None, num_processes=None, process_id=None) -> None:
    """``jax.distributed.initialize``: with no arguments it auto-detects SLURM (and other clusters JAX
    knows); for a plain multi-node run pass the coordinator's host:port, the process count and this
    process's id (see README, "Scaling out")."""
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def model_mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), ("models",))


def flatten_grid(keys_S, hps, splits_S):
    """(keys S, hparams H, splits S) -> the same inputs per model, M = S*H, seed-major (m = s*H + h)."""
    num_s, num_h = len(keys_S), len(np.asarray(hps[0]))
    keys_M = np.repeat(np.asarray(keys_S), num_h, axis=0)
    hps_M = jax.tree.map(lambda a: np.tile(np.asarray(a), num_s), hps)
    splits_M = jax.tree.map(lambda a: np.repeat(np.asarray(a), num_h, axis=0), splits_S)
    return keys_M, hps_M, splits_M


def pad_models(tree, multiple: int):
    """Pad the leading (model) axis to a multiple of ``multiple`` by repeating the last model."""
    def pad(a):
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


def unflatten(tree_M, num_s: int, num_h: int):
    """Trim padding and reshape the model axis back to ``S x H``."""
    return jax.tree.map(lambda a: a[: num_s * num_h].reshape(num_s, num_h, *a.shape[1:]), tree_M)


def padded_size(num_models: int) -> int:
    return math.ceil(num_models / jax.device_count()) * jax.device_count()
