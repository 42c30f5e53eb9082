"""The one frozen, typed config of a fit, and the hyperparameters that vmap can sweep."""
from __future__ import annotations

import dataclasses
import itertools
from typing import NamedTuple

import numpy as np


class Hparams(NamedTuple):
    """Per-model hyperparameters. Fields are scalars, or arrays with a leading grid axis H."""

    lr: float = 1e-2  # Adam peak learning rate (paper: 1e-2)
    temperature: float = 1.0  # T of KD and AdaptConf's KD term; tau of CPL (both sides)
    logit_scale: float = 100.0  # s of the prototype head, zs = s * cos(C, r) (CLIP's is 100)
    alpha_max: float = 0.5  # AuxConf's final confidence weight (Burns et al.: 0.5)
    aux_warmup: float = 0.2  # AuxConf's warm-up fraction w of training (Burns et al.: 0.2)
    tau_a: float = 4.0  # AdaptConf's temperature (Guo et al.: 0.5 on CIFAR, 4.0 on ImageNet)


def hparam_grid(base: Hparams, grid: dict) -> Hparams:
    """The cartesian product of ``grid`` (field -> values) over ``base``; each field an array (H,)."""
    unknown = set(grid) - set(Hparams._fields)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; valid: {', '.join(Hparams._fields)}")
    names = list(grid)
    combos = list(itertools.product(*(grid[n] for n in names))) or [()]
    rows = [base._replace(**dict(zip(names, c))) for c in combos]
    return Hparams(*(np.asarray([getattr(r, f) for r in rows], np.float32) for f in Hparams._fields))


@dataclasses.dataclass(frozen=True)
class FitConfig:
    store: str  # path of the feature store
    weak: str  # weak model (name in the store) whose logits supervise the student
    methods: tuple[str, ...]  # names from w2s_jax.methods.METHODS
    seeds: int = 5  # seeds 0..seeds-1: split seed s and JAX key split(key(root_seed), seeds)[s]
    root_seed: int = 0  # root of the JAX keys (init and minibatch order)
    epochs: int = 10  # training epochs (paper: 10)
    batch_size: int = 512  # minibatch size (paper: 512)
    warmup: float = 0.1  # fraction of steps with linear lr warmup, then linear decay to 0 (paper: 0.1)
    hparams: Hparams = Hparams()  # defaults for every field the grid does not sweep
    grid: tuple = ()  # ((field, (values...)), ...): swept as one vmap axis, cartesian product
    vmap: bool = True  # True: every seed x hparam in one compiled call; False: one call per model

    def grid_hparams(self) -> Hparams:
        return hparam_grid(self.hparams, dict(self.grid))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hparams"] = self.hparams._asdict()
        return d
