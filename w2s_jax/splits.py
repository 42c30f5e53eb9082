"""Per-seed splits of the store's ``test`` split (DESIGN.md §2.3), in NumPy so the torch side reuses them.

``test`` -> ``hold`` (80%) and ``test'`` (20%); ``hold`` -> ``hold_train`` (80%) and ``hold_val`` (20%).
Sizes depend only on n, so the splits of all seeds stack into arrays ``S x n_part``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

HOLD_FRACTION = 0.8
HOLD_TRAIN_FRACTION = 0.8


class SeedSplits(NamedTuple):
    """Row indices into the store's ``test`` split; each array is ``n_part`` (or ``S x n_part`` stacked)."""

    hold_train: np.ndarray
    hold_val: np.ndarray
    test_prime: np.ndarray


def split_sizes(n: int) -> tuple[int, int, int]:
    n_hold = int(round(HOLD_FRACTION * n))
    n_train = int(round(HOLD_TRAIN_FRACTION * n_hold))
    return n_train, n_hold - n_train, n - n_hold


def seed_splits(n: int, seed: int) -> SeedSplits:
    """The splits of seed ``seed`` for ``n`` test rows: a NumPy permutation seeded by ``seed``."""
    sizes = split_sizes(n)
    if min(sizes) < 1:
        raise ValueError(
            f"{n} test rows give empty splits (hold_train, hold_val, test') = {sizes}; "
            "need more test rows (hundreds for meaningful numbers): extract a larger test split"
        )
    perm = np.random.default_rng(seed).permutation(n)
    a, b = sizes[0], sizes[0] + sizes[1]
    return SeedSplits(np.sort(perm[:a]), np.sort(perm[a:b]), np.sort(perm[b:]))


def stacked_splits(n: int, num_seeds: int) -> SeedSplits:
    """Seeds 0..num_seeds-1 stacked on a leading axis: each field ``S x n_part``."""
    per_seed = [seed_splits(n, s) for s in range(num_seeds)]
    return SeedSplits(*(np.stack(parts) for parts in zip(*per_seed)))
