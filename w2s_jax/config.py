"""The one frozen, typed config of a fit, and the hyperparameters that vmap can sweep."""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import NamedTuple

import numpy as np


class Hparams(NamedTuple):
    """Per-model hyperparameters. Fields are scalars, or arrays with a leading grid axis H."""

    lr: float = 1e-2  # Adam peak learning rate (paper: 1e-2)
    temperature: float = 1.0  # T of KD and AdaptConf's KD term; tau of CPL (both sides)
    logit_scale: float = 100.0  # s of the prototype head, zs = s * cos(C, r) (CLIP's is 100)
    lp_scale: float = 10.0  # s of the linear head, zs = s * W (r̂ - mu) + b: its step size in logit space
    lp_shrinkage: float = 0.5  # δ of the linear head's start, a discriminant with Σ = (1-δ) S_w + δ tr(S_w)/D I:
    #                            1 = nearest class mean, 0 = LDA (0.5 chosen on the demo's hold_val, README)
    lp_l2: float = 0.0  # L2 on the linear head's s·W, 0.5·lp_l2·‖sW‖² added to the loss (sklearn: 1 / (C n))
    alpha_max: float = 0.5  # AuxConf's final confidence weight (Burns et al.: 0.5)
    aux_warmup: float = 0.2  # AuxConf's warm-up fraction w of training (Burns et al.: 0.2)
    tau_a: float = 4.0  # AdaptConf's temperature (Guo et al.: 0.5 on CIFAR, 4.0 on ImageNet)
    raven_lr: float = 0.1  # Adam lr of the weak models' mixture logits (raven+... methods; ours, see README)
    refine_k: float = 10  # neighbours of the kNN refinements (METHOD@knn, @graph, @filter) and of `--select refined`
    refine_alpha: float = 0.5  # α of METHOD@graph: how much of each step's target comes from the neighbours
    refine_c: float = 0.2  # c of METHOD@filter: the fraction of rows dropped


# valid range of every hyperparameter: (low, high, low inclusive, high inclusive)
HPARAM_RANGES = {
    "lr": (0.0, math.inf, False, False),
    "temperature": (0.0, math.inf, False, False),
    "logit_scale": (0.0, math.inf, False, False),
    "lp_scale": (0.0, math.inf, False, False),
    "lp_shrinkage": (0.0, 1.0, True, True),
    "lp_l2": (0.0, math.inf, True, False),
    "alpha_max": (0.0, 1.0, True, True),
    "aux_warmup": (0.0, 1.0, False, True),
    "tau_a": (0.0, math.inf, False, False),
    "raven_lr": (0.0, math.inf, True, False),
    "refine_k": (1.0, math.inf, True, False),
    "refine_alpha": (0.0, 0.95, True, True),  # graph propagation converges in ~1/(1-α) steps (refine.propagation_steps)
    "refine_c": (0.0, 0.9, True, True),  # above 0.9 a filter leaves too few rows to train and select on
}
INTEGER_HPARAMS = ("refine_k",)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # hyperparameters are float32 arrays in the fits


def _range_text(low, high, low_in, high_in) -> str:
    return f"{'[' if low_in else '('}{low:g}, {high:g}{']' if high_in else ')'}"


def check_number(name: str, value, low, high, low_in=True, high_in=True, integer=False) -> None:
    """ValueError naming ``name``, its value and the valid range unless ``value`` is a number inside it."""
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ValueError(f"{name} = {value!r} is not {kind}; valid: {kind} in {_range_text(low, high, low_in, high_in)}")
    inside = math.isfinite(value) and (low <= value if low_in else low < value) and (
        value <= high if high_in else value < high)
    if not inside:
        raise ValueError(f"{name} = {value!r} is out of range; valid: {_range_text(low, high, low_in, high_in)}")


def check_hparams(hp: Hparams, grid=()) -> None:
    for field, (low, high, low_in, high_in) in HPARAM_RANGES.items():
        check_number(field, getattr(hp, field), low, high, low_in, high_in)
    for field, values in [*((f, [getattr(hp, f)]) for f in Hparams._fields), *grid]:
        big = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v) and abs(v) > FLOAT32_MAX]
        if big:
            raise ValueError(f"{field} = {big[0]!r} does not fit float32, the fits' precision; valid: at most "
                             f"{FLOAT32_MAX:.4g}")
    for field in INTEGER_HPARAMS:
        for v in [getattr(hp, field), *dict(grid).get(field, ())]:
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v != int(v):
                raise ValueError(f"{field} = {v!r} is not a whole number; valid: an integer >= 1")
    for field, values in grid:
        if field not in HPARAM_RANGES:
            raise ValueError(f"unknown hyperparameter {field!r} in the grid; valid: {', '.join(Hparams._fields)}")
        if not values:
            raise ValueError(f"grid {field} = []: give at least one value")
        if len(set(values)) != len(values):
            raise ValueError(f"grid {field} = {list(values)}: give each value once")
        for v in values:
            check_number(f"grid {field}", v, *HPARAM_RANGES[field])
    fields = [f for f, _ in grid]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ValueError(f"{repeated[0]} is given twice in the grid; list all its values once: {repeated[0]}=V1,V2,...")


def hparam_grid(base: Hparams, grid: dict) -> Hparams:
    """The cartesian product of ``grid`` (field -> values) over ``base``; each field an array (H,)."""
    unknown = set(grid) - set(Hparams._fields)
    if unknown:
        raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; valid: {', '.join(Hparams._fields)}")
    names = list(grid)
    combos = list(itertools.product(*(grid[n] for n in names))) or [()]
    rows = [base._replace(**dict(zip(names, c))) for c in combos]
    return Hparams(*(np.asarray([getattr(r, f) for r in rows], np.float32) for f in Hparams._fields))


PAPER_BATCH_SIZE = 512
MATMUL_DTYPES = ("float32", "bfloat16")
SEED_AXES = ("auto", "map", "vmap")


def resolve_seed_axis(seed_axis: str) -> str:
    """"auto": seeds vmapped on an accelerator (1.38x faster an epoch on an H200), mapped one after the other on
    the CPU (vmapped, XLA's CPU GEMMs become batched and 24% slower); benchmarks/RESULTS.md."""
    if seed_axis != "auto":
        return seed_axis
    import jax

    return "map" if jax.default_backend() == "cpu" else "vmap"
MIN_STEPS_PER_EPOCH = 16


def auto_batch_size(n_train: int) -> int:
    """``--batch-size auto``: the paper's 512, halved until an epoch of ``n_train`` rows has at least 16 steps
    (never below 8). DomainNet's smallest domain keeps 512; the demo's 1,600 rows get 64.

    >>> auto_batch_size(33_306), auto_batch_size(1_600)
    (512, 64)
    """
    batch = PAPER_BATCH_SIZE
    while batch > 8 and n_train / batch < MIN_STEPS_PER_EPOCH:
        batch //= 2
    return batch


@dataclasses.dataclass(frozen=True)
class FitConfig:
    store: str  # path of the feature store
    weak: str  # weak model (name in the store) whose logits supervise the student
    methods: tuple[str, ...]  # names from w2s_jax.methods.METHODS
    seeds: int = 5  # seeds 0..seeds-1: split seed s and JAX key split(key(root_seed), seeds)[s]
    root_seed: int = 0  # root of the JAX keys (init and minibatch order)
    epochs: int = 10  # training epochs (paper: 10)
    batch_size: int | str = "auto"  # minibatch size, or "auto" (auto_batch_size; paper: 512)
    batch_size_rule: str = ""  # how an "auto" batch size was resolved (set by w2s_jax.run; recorded in config.json)
    warmup: float = 0.1  # fraction of steps with linear lr warmup, then linear decay to 0 (paper: 0.1)
    hparams: Hparams = Hparams()  # defaults for every field the grid does not sweep
    grid: tuple = ()  # ((field, (values...)), ...): swept as one vmap axis, cartesian product
    vmap: bool = True  # True: every seed x hparam in one compiled call; False: one call per model
    fuse: bool = True  # True: a seed's linear heads share one wide GEMM per step (fit.heads_logits); False: model by model
    matmul_dtype: str = "float32"  # "bfloat16": the fused GEMM's inputs rounded to bf16, accumulated in float32
    ensemble: tuple[str, ...] = ()  # the weak models the multi-weak methods combine (--weak a,b,...; `weak` is a)
    seed_axis: str = "auto"  # "map": a device's seeds one after the other; "vmap": batched; "auto": by backend
    bucket: bool = True  # pad the rows to a size bucket (fit.bucket_size) so that stores of one bucket share programs
    imports: tuple[str, ...] = ()  # the --import modules that registered user heads/methods (w2s-predict asks for them)
    defined: tuple = ()  # ((name, head, ((field, value), ...)), ...): the user-defined methods among `methods`
    #                      (methods.define_method), filled in by w2s_jax.run so that the folder alone rebuilds them
    select: str = "agreement"  # the label-free rule that keeps a model's epoch and grid point (w2s_jax.select)

    def __post_init__(self):
        """Every number in range before any work starts; a ValueError names the field and the valid range."""
        if not self.methods:
            raise ValueError("no methods to fit: name at least one (w2s-fit --methods cpl,kd+lp, [fit] methods = "
                             "[\"all\"]; w2s-fit --list-methods lists them)")
        check_number("seeds", self.seeds, 1, math.inf, integer=True)
        check_number("root_seed", self.root_seed, 0, math.inf, integer=True)
        check_number("epochs", self.epochs, 1, math.inf, integer=True)
        if self.batch_size != "auto":
            check_number("batch_size", self.batch_size, 1, math.inf, integer=True)
        check_number("warmup", self.warmup, 0.0, 1.0, True, False)
        check_hparams(self.hparams, self.grid)
        if self.matmul_dtype not in MATMUL_DTYPES:
            raise ValueError(f"matmul_dtype {self.matmul_dtype!r}: use one of {', '.join(MATMUL_DTYPES)}")
        if self.matmul_dtype != "float32" and not (self.fuse and self.vmap):
            raise ValueError(f"matmul_dtype {self.matmul_dtype} applies to the fused step; drop --no-fuse and --no-vmap")
        from w2s_jax.select import CRITERIA  # imported here: it imports jax

        if self.select not in CRITERIA:
            raise ValueError(f"select {self.select!r}: use one of {', '.join(CRITERIA)} (w2s-fit --select)")
        if self.seed_axis not in SEED_AXES:
            raise ValueError(f"seed_axis {self.seed_axis!r}: use one of {', '.join(SEED_AXES)}")
        check_ensemble(self)
        from w2s_jax.methods import restore_names

        restore_names(self.methods)  # METHOD@roundR is registered on first use

    def grid_hparams(self) -> Hparams:
        return hparam_grid(self.hparams, dict(self.grid))

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hparams"] = self.hparams._asdict()
        return d


def check_ensemble(cfg: FitConfig) -> None:
    """Several weak models are named once each, ``weak`` first; a multi-weak method needs two or more."""
    from w2s_jax.methods import METHODS, MULTI_WEAK  # imported here: the registry imports flax

    if len(set(cfg.ensemble)) != len(cfg.ensemble):
        raise ValueError(f"--weak {','.join(cfg.ensemble)}: name each weak model once")
    if cfg.ensemble and cfg.ensemble[0] != cfg.weak:
        raise ValueError(f"the first weak model of the ensemble ({cfg.ensemble[0]}) must be --weak's first ({cfg.weak})")
    multi = [m for m in cfg.methods if m in METHODS and METHODS[m].target in MULTI_WEAK]
    if multi and len(cfg.ensemble) < 2:
        raise ValueError(f"{', '.join(multi)} combine several weak models; name two or more: --weak A,B")


def resolve_batch_size(cfg: FitConfig, n_train: int) -> FitConfig:
    """``cfg`` with an integer batch size; an "auto" one is resolved by the rule and the rule recorded."""
    if cfg.batch_size != "auto":
        return cfg
    batch = auto_batch_size(n_train)
    rule = (f"auto -> {batch}: hold_train has {n_train:,} rows; auto keeps the paper's {PAPER_BATCH_SIZE} unless an "
            f"epoch would have fewer than {MIN_STEPS_PER_EPOCH} steps ({n_train / PAPER_BATCH_SIZE:.1f} at 512)")
    return dataclasses.replace(cfg, batch_size=batch, batch_size_rule=rule)
