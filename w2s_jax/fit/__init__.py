"""Training heads (the fit, a package: ``plan`` resolves the config once; ``groups``, ``padding``,
``epoch`` and ``driver`` receive the plan's fields): every model of a seed in one vectorized step, methods as data.

Axis order everywhere: (seed S, model J, ...) inside the fit, (seed S, hparam H, ...) in its outputs. Each model is
trained with Adam (linear warmup, then linear decay), minibatches as ``lax.scan`` over on-device arrays, and keeps
the parameters of the epoch with the best ``hold_val`` score of the ``--select`` rule (by default agreement with
its training target, the paper's; ground-truth accuracy for a ceiling); every rule's score is kept in the
history (:mod:`w2s_jax.select`).

Each seed first computes its training targets once (:class:`w2s_jax.refine.Teachers`: the weak labels, the
reference kNN vote of the ``refined`` rule, and each refinement the methods ``METHOD@knn`` etc. ask for); a
model's row holds the index of its own.

The models of a seed are grouped by head (and by whether their teacher mixes several weak models): a
:class:`Group` holds the J = methods x hparams models of one head with their parameters stacked from the start,
and :class:`Rows` holds what sets them apart as arrays, one row per model: the loss family's coefficients
(:mod:`w2s_jax.losses`), the hyperparameters and the target. So one step computes a group's logits (fused: one
wide GEMM ``r̂ · [A_1 … A_J]ᵀ`` through the heads' ``linear_form``), one vectorized loss and one vectorized Adam
update, whatever the number of methods; the program grows with the number of heads, not of methods.
All models of a seed share its minibatch order, so :func:`seed_epoch` gathers each step's rows once.

The vmapped fit pads a store's rows to its size bucket (:func:`bucket_size`, :func:`pad_to_bucket`) and masks the
padding everywhere, so that the stores of one bucket run the same compiled programs and get the unpadded numbers.
"""
from __future__ import annotations

from w2s_jax.config import FitConfig
from w2s_jax.fit.driver import (check_same_shapes, compile_phases, fit_plan, make_fit,  # noqa: F401
                                model_by_model_fits, over_seeds, vmapped_fits)
from w2s_jax.fit.epoch import *  # noqa: F401,F403
from w2s_jax.fit.groups import *  # noqa: F401,F403
from w2s_jax.fit.groups import FitData
from w2s_jax.fit.padding import Padding, Sizes, bucket_size, pad_rows, pad_to_bucket, paddable  # noqa: F401
from w2s_jax.fit.plan import (Plan, Recipe, available_bytes, check_heads, estimate_bytes,  # noqa: F401
                              make_plan, recipe_of, seed_keys)
from w2s_jax.splits import SeedSplits


def fit_each(cfg: FitConfig, datas, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
             on_compiled=None) -> list[tuple[dict, dict]]:
    """Fit every method of ``cfg`` for every seed x hparam, on each :class:`FitData` of ``datas`` (one store's rows
    with each weak model's logits) by the same compiled programs: ``[({method: FitOutput}, timings)]``, one per
    data, the compile counted in the first's timings (``w2s-fit --weak A,B``: every weak model of a store, one
    compile).

    With ``cfg.vmap`` all methods, seeds and hparams form one jit-compiled epoch program: per seed one
    :func:`seed_epoch` for all its models (fused unless ``cfg.fuse`` is False), the seeds sharded over every
    device (:mod:`w2s_jax.sharding`) and mapped or vmapped on each (:func:`over_seeds`, ``cfg.seed_axis``). It is called once
    per epoch from a short loop so that ``progress(models_done_epochs)`` can report; the state stays on device
    between calls. Without it, :func:`make_fit` is compiled per method and called model by model on one device.
    Outputs are ``S x H``.

    ``METHOD@roundR`` methods (strong-to-strong rounds) are fitted after round 1, one round after the other, by
    the same epoch program: only the targets (:func:`next_teachers`) and each model's index among them
    (:func:`round_rows`) change, and the program's target axis is as wide as the widest round
    (:func:`teacher_width`). A later round compiles only its models' starts (their start targets differ).
    ``on_compiled(seconds)`` is called once round 1's programs are compiled.
    """
    plan = make_plan(cfg, datas[0], splits, text_TxKxD, num_classes, progress)
    return fit_plan(plan, datas, splits, on_compiled)


def fit_methods(cfg: FitConfig, data: FitData, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
                on_compiled=None):
    """Fit every method of ``cfg`` for every seed x hparam; returns ({method: FitOutput}, timings)
    (:func:`fit_each` with one weak model)."""
    return fit_each(cfg, [data], splits, text_TxKxD, num_classes, progress, on_compiled)[0]
