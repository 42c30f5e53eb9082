"""Training heads: one model's pure functions (:class:`Trainer`), and one fused epoch for all models of a seed.

Axis order everywhere: (seed S, hparam H, ...). Each model is trained with Adam (linear warmup, then linear
decay), minibatches as ``lax.scan`` over on-device arrays, and keeps the parameters of the epoch with the best
``hold_val`` score (agreement with the weak labels, or ground-truth accuracy for a ceiling).

All methods and hparams of a seed share its minibatch order, so :func:`seed_epoch` trains them together: one
gather per step, and, fused, every head that is linear in ``r̂`` (``linear_form``: LP ``s·W``, CPL
``s·normalize(C)``) in one wide GEMM forward and one back. ``cfg.fuse=False`` computes each model's logits on
its own (the reference the fused step is tested against); :func:`make_fit` is one model alone.
"""
from __future__ import annotations

import functools
import math
import os
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax import sharding
from w2s_jax.config import FitConfig, Hparams, resolve_batch_size
from w2s_jax.heads import Start, get_head, l2_normalize
from w2s_jax.losses import get_loss
from w2s_jax.methods import METHODS, MULTI_WEAK, Method
from w2s_jax.splits import SeedSplits


class FitData(NamedTuple):
    """The store's ``test`` split on device, shared by every seed."""

    feats_NxD: jax.Array  # L2-normalised strong features r̂ (normalised once, outside the loop)
    weak_NxK: jax.Array  # weak logits (with several weak models: the first one's)
    labels_N: jax.Array  # ground truth
    weaks_MxNxK: jax.Array | None = None  # the logits of the M weak models the multi-weak methods combine


class FitOutput(NamedTuple):
    variables: dict  # the head's best-epoch variables: {"params": trained, "stats": fixed at the start, if any;
    #                  "mixture": {"logits_M"}, the weights of the weak models, for the multi-weak methods}
    history: dict  # per-epoch curves, each (E,): train_loss, train_acc (vs. the training target, during the
    #                epoch), val_loss, val_score, test_acc
    best_epoch: jax.Array  # 1-based epoch whose parameters were kept


def make_data(feats_NxD, weak_NxK, labels_N, weaks_MxNxK=None) -> FitData:
    weaks = None if weaks_MxNxK is None else jnp.asarray(weaks_MxNxK, jnp.float32)
    return FitData(l2_normalize(jnp.asarray(feats_NxD, jnp.float32)), jnp.asarray(weak_NxK, jnp.float32),
                   jnp.asarray(labels_N, jnp.int32), weaks)


def mixture_weights(variables: dict):
    """The multi-weak methods' weights ``w_M`` on the simplex: ``softmax`` of the variables' mixture logits."""
    return jax.nn.softmax(variables["mixture"]["logits_M"])


def teacher_logits(method: Method, data: FitData, num_classes: int, rows_B, variables=None):
    """What the loss is trained against on ``rows_B``, ``B x K`` logits: the weak logits; one-hot ground truth for
    a ceiling; for a multi-weak method the log of the mixture ``Σ_m w_m softmax(z_m)`` (learned ``w`` for
    ``raven``, uniform for ``average``)."""
    if method.target == "truth":
        return jax.nn.one_hot(data.labels_N[rows_B], num_classes)
    if method.target in MULTI_WEAK:
        probs_MxBxK = jax.nn.softmax(data.weaks_MxNxK[:, rows_B])
        return jnp.log(jnp.einsum("m,mbk->bk", mixture_weights(variables), probs_MxBxK) + 1e-12)
    return data.weak_NxK[rows_B]


def consensus(weaks_MxBxK):
    """The class all M weak models predict, per row; -1 where they disagree (RAVEN's easy samples)."""
    votes_MxB = jnp.argmax(weaks_MxBxK, axis=-1)
    return jnp.where(jnp.all(votes_MxB == votes_MxB[0], axis=0), votes_MxB[0], -1)


def lr_factor(step, total_steps: int, warmup: float):
    """Linear warmup over ``warmup`` of the steps to 1, then linear decay to 0 at ``total_steps``."""
    warm = max(1, math.ceil(warmup * total_steps))
    up = (step + 1) / warm
    down = (total_steps - step) / max(1, total_steps - warm)
    return jnp.clip(jnp.where(step < warm, up, down), 0.0, 1.0)


TRAINED = ("params", "mixture")  # the variable collections the optimizer updates


def trained(variables: dict) -> dict:
    return {c: variables[c] for c in TRAINED if c in variables}


def mixture_loss(student_logits_BxK, mixture_logits_BxK):
    """RAVEN-style update of the weak models' weights, per example: the student's cross-entropy under the mixture,
    ``-Σ_k q_k(w) log sg(p_s,k)`` with ``q(w) = Σ_m w_m p_m``. Its gradient reaches only ``w``; it is linear in
    ``w``, so it moves weight toward the weak models whose predictions the student already agrees with."""
    log_student_BxK = jax.lax.stop_gradient(jax.nn.log_softmax(student_logits_BxK))
    return -jnp.sum(jnp.exp(mixture_logits_BxK) * log_student_BxK, axis=1)


class FitState(NamedTuple):
    """What one model carries from epoch to epoch."""

    variables: dict  # the head's current variables (flax): "params" are trained, "stats" stay as they started
    opt_state: tuple  # Adam's moments and step count, for the TRAINED collections only
    best: dict  # {"variables", "score", "epoch"}: the best epoch so far by hold_val score


class Trainer(NamedTuple):
    """One method's training as pure functions of one model (one seed, one hparam setting); callers vmap them.

    start(key, hp, data, split) -> FitState
    logits(variables, feats_BxD, hp) -> logits_BxK, the head's forward pass
    linear_form(variables, hp) -> (A_KxD, c_K) with logits ``r̂ Aᵀ + c``; None for a head without one (an MLP)
    loss(trainable, logits_BxK, rows_B, mask_B, progress, hp, data) -> (loss to minimise, (the head's loss, hits))
    optimizer(hp, total_steps) -> the optax transformation of the TRAINED collections
    end_epoch(state, trainable, opt_state, val_logits, test_logits, epoch, train, hp, data, split)
        -> (FitState, history_e): the hold_val choice of the best epoch, and the epoch's curves
    """

    start: Callable
    logits: Callable
    linear_form: Callable | None
    loss: Callable
    optimizer: Callable
    end_epoch: Callable


def make_trainer(method: Method, num_classes: int, text_TxKxD, cfg: FitConfig) -> Trainer:
    """The pure training functions of one model (one seed, one hparam setting) of ``method``."""
    head = get_head(method.head)
    module = head.module(num_classes)
    text_KxD = None if text_TxKxD is None else jnp.mean(jnp.asarray(text_TxKxD, jnp.float32), axis=0)
    loss_fn = get_loss(method.loss)
    epochs = cfg.epochs

    def optimizer(hp, total):
        """Adam with warmup and linear decay: the head at ``hp.lr``, the multi-weak mixture logits at ``hp.raven_lr``."""
        def adam(lr):
            return optax.chain(optax.scale_by_adam(),
                               optax.scale_by_schedule(lambda count: -lr * lr_factor(count, total, cfg.warmup)))

        return optax.multi_transform({"params": adam(hp.lr), "mixture": adam(hp.raven_lr)},
                                     lambda trainable: {collection: collection for collection in trainable})

    def start(key, hp: Hparams, data: FitData, split: SeedSplits) -> FitState:
        init_key, _ = jax.random.split(key)
        mixture = {"mixture": {"logits_M": jnp.zeros(data.weaks_MxNxK.shape[0])}} if method.target in MULTI_WEAK else {}
        if method.target == "raven":  # easy-sample start: only the rows where every weak model agrees
            targets_N = consensus(data.weaks_MxNxK[:, split.hold_train])
        else:
            targets_N = jnp.argmax(teacher_logits(method, data, num_classes, split.hold_train, mixture), axis=1)
        variables = {**module.init(init_key, data.feats_NxD[split.hold_train], hp, Start(targets_N, text_KxD)),
                     **mixture}
        best = {"variables": variables, "score": jnp.float32(-1.0), "epoch": jnp.int32(0)}
        return FitState(variables, optimizer(hp, total_steps(cfg, split)).init(trained(variables)), best)

    def logits(variables, feats_BxD, hp):
        return module.apply(variables, feats_BxD, hp)

    def linear_form(variables, hp):
        return module.apply(variables, hp, method="linear_form")

    def loss(trainable, logits_BxK, rows_B, mask_B, progress, hp, data):
        target_BxK = teacher_logits(method, data, num_classes, rows_B, trainable)
        per_example_B = loss_fn(logits_BxK, jax.lax.stop_gradient(target_BxK), progress=progress, hp=hp)
        hits = jnp.sum((jnp.argmax(logits_BxK, 1) == jnp.argmax(target_BxK, 1)) * mask_B)
        head_loss = jnp.sum(per_example_B * mask_B) / jnp.sum(mask_B) + head.penalty(trainable["params"], hp)
        if method.target != "raven":
            return head_loss, (head_loss, hits)
        mixture_B = mixture_loss(logits_BxK, target_BxK)
        return head_loss + jnp.sum(mixture_B * mask_B) / jnp.sum(mask_B), (head_loss, hits)

    def end_epoch(state: FitState, trainable, opt_state, val_logits, test_logits, epoch, train, hp, data, split):
        """hold_val picks the best epoch; test' accuracy is kept for curves only. ``train``: (loss, accuracy)."""
        val_targets = teacher_logits(method, data, num_classes, split.hold_val, trainable)
        val_score = jnp.mean(jnp.argmax(val_logits, 1) == jnp.argmax(val_targets, 1))
        val_loss = jnp.mean(loss_fn(val_logits, val_targets, progress=(epoch + 1) / epochs, hp=hp))
        test_acc = jnp.mean(jnp.argmax(test_logits, 1) == data.labels_N[split.test_prime])
        better = val_score > state.best["score"]
        variables = {**state.variables, **trainable}
        candidate = {"variables": variables, "score": val_score, "epoch": epoch + 1}
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), candidate, state.best)
        history = {"train_loss": train[0], "train_acc": train[1], "val_loss": val_loss, "val_score": val_score,
                   "test_acc": test_acc}
        return FitState(variables, opt_state, best), history

    return Trainer(start, logits, linear_form if hasattr(module, "linear_form") else None, loss, optimizer, end_epoch)


def total_steps(cfg: FitConfig, split: SeedSplits) -> int:
    """Optimizer steps of a whole fit: epochs x minibatches per epoch (the lr schedule's length)."""
    return cfg.epochs * math.ceil(split.hold_train.shape[-1] / cfg.batch_size)


def minibatches(key, epoch, hold_train_N, batch: int):
    """This epoch's rows ``T x B`` (a permutation of ``hold_train`` from the seed's key, padded) and their mask.

    The order depends on the seed's key and the epoch only, so every method and hparam of a seed shares it."""
    n_train = hold_train_N.shape[0]
    steps = math.ceil(n_train / batch)
    _, order_key = jax.random.split(key)
    perm = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
    perm = jnp.concatenate([perm, jnp.zeros(steps * batch - n_train, perm.dtype)])
    mask_TxB = (jnp.arange(steps * batch) < n_train).reshape(steps, batch).astype(jnp.float32)
    return hold_train_N[perm].reshape(steps, batch), mask_TxB


def heads_logits(trainers: dict, variables: dict, feats_BxD, hps_H: Hparams, fuse: bool,
                 matmul_dtype: str = "float32") -> dict:
    """Every model's logits on one shared batch, ``{method: H x B x K}``, from ``{method: variables}`` (leading H).

    Fused, the heads with a linear form are computed in one wide GEMM ``feats · [A_1 … A_J]ᵀ`` over all J of
    them (methods x H; the gradient is one wide GEMM back). Heads without one (an MLP), and every head when not
    fused, are applied model by model (vmapped). Both compute ``feats Aᵀ + c`` for a linear head.
    ``matmul_dtype="bfloat16"`` rounds the wide GEMM's inputs to bfloat16 and accumulates in float32.
    """
    fused = [m for m, t in trainers.items() if fuse and t.linear_form is not None]
    out = {m: jax.vmap(t.logits, in_axes=(0, None, 0))(variables[m], feats_BxD, hps_H)
           for m, t in trainers.items() if m not in fused}
    if fused:
        forms = [jax.vmap(trainers[m].linear_form)(variables[m], hps_H) for m in fused]  # (H x K x D, H x K) each
        a_JxKxD = jnp.concatenate([a for a, _ in forms])
        c_JxK = jnp.concatenate([c for _, c in forms])
        j, k, d = a_JxKxD.shape
        wide_BxJK = jnp.dot(feats_BxD.astype(matmul_dtype), a_JxKxD.reshape(j * k, d).T.astype(matmul_dtype),
                            preferred_element_type=jnp.float32)
        wide_BxJxK = wide_BxJK.reshape(-1, j, k) + c_JxK
        per_method = jnp.split(jnp.moveaxis(wide_BxJxK, 1, 0), len(fused))
        out.update(zip(fused, per_method))
    return out


def optimizer_step(optimizer, total: int, grad, opt_state, trainable, hp):
    """One update of one model's TRAINED collections -> (trainable, opt_state)."""
    updates, opt_state = optimizer(hp, total).update(grad, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def seed_epoch(trainers: dict, states: dict, key, epoch, hps_H: Hparams, data: FitData, split: SeedSplits,
               cfg: FitConfig):
    """One epoch of all models of one seed: every method's H models, ``{method: FitState}`` with a leading H axis.

    The models share the seed's minibatches. Each step gathers its rows once, computes every model's logits
    (:func:`heads_logits`) and differentiates the sum of the models' losses, which gives each model its own
    gradient, as they share no parameters. At the end, hold_val and test' are gathered once for all models.
    Returns ``({method: FitState}, {method: history_e})``.
    """
    total = total_steps(cfg, split)
    rows_TxB, mask_TxB = minibatches(key, epoch, split.hold_train, cfg.batch_size)

    def logits_of(trainables, feats_BxD):
        variables = {m: {**states[m].variables, **trainables[m]} for m in trainers}
        return heads_logits(trainers, variables, feats_BxD, hps_H, cfg.fuse, cfg.matmul_dtype)

    def summed_loss(trainables, rows_B, mask_B, progress):
        logits = logits_of(trainables, data.feats_NxD[rows_B])  # one gather for every model of the seed
        out = {m: jax.vmap(t.loss, in_axes=(0, 0, None, None, None, 0, None))(
            trainables[m], logits[m], rows_B, mask_B, progress, hps_H, data) for m, t in trainers.items()}
        return sum(jnp.sum(loss_H) for loss_H, _ in out.values()), {m: aux for m, (_, aux) in out.items()}

    def train_step(carry, xs):
        trainables, opt_states = carry
        step, rows_B, mask_B = xs
        grads, aux = jax.grad(summed_loss, has_aux=True)(trainables, rows_B, mask_B, step / total)
        new = {m: jax.vmap(functools.partial(optimizer_step, t.optimizer, total))(
            grads[m], opt_states[m], trainables[m], hps_H) for m, t in trainers.items()}
        count = jnp.sum(mask_B)
        per_step = {m: (head_loss * count, hits) for m, (head_loss, hits) in aux.items()}
        return ({m: n[0] for m, n in new.items()}, {m: n[1] for m, n in new.items()}), per_step

    steps = rows_TxB.shape[0]
    first = ({m: trained(st.variables) for m, st in states.items()}, {m: st.opt_state for m, st in states.items()})
    (trainables, opt_states), sums = jax.lax.scan(
        train_step, first, (epoch * steps + jnp.arange(steps), rows_TxB, mask_TxB))
    val = logits_of(trainables, data.feats_NxD[split.hold_val])
    test = logits_of(trainables, data.feats_NxD[split.test_prime])
    n_train = split.hold_train.shape[0]
    out = {m: jax.vmap(t.end_epoch, in_axes=(0, 0, 0, 0, 0, None, 0, 0, None, None))(
        states[m], trainables[m], opt_states[m], val[m], test[m], epoch,
        (jnp.sum(sums[m][0], 0) / n_train, jnp.sum(sums[m][1], 0) / n_train), hps_H, data, split)
        for m, t in trainers.items()}
    return {m: o[0] for m, o in out.items()}, {m: o[1] for m, o in out.items()}


def finish(state: FitState, history: dict) -> FitOutput:
    return FitOutput(state.best["variables"], history, state.best["epoch"])


def make_fit(method: Method, num_classes: int, text_TxKxD, cfg: FitConfig):
    """-> ``fit(key, hp, data, split) -> FitOutput`` for one model (one seed, one hparam setting):
    :func:`seed_epoch` with a single model, epochs as ``lax.scan``."""
    trainers = {"model": make_trainer(method, num_classes, text_TxKxD, cfg)}

    def fit(key, hp: Hparams, data: FitData, split: SeedSplits) -> FitOutput:
        one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[None], tree)  # an H axis of 1
        states = {"model": one(trainers["model"].start(key, hp, data, split))}
        run_epoch = lambda st, e: seed_epoch(trainers, st, key, e, one(hp), data, split, cfg)
        states, history = jax.lax.scan(run_epoch, states, jnp.arange(cfg.epochs))
        return finish(jax.tree.map(lambda a: a[0], states["model"]), jax.tree.map(lambda a: a[:, 0], history["model"]))

    return fit


def start_seeds(trainer: Trainer, key_data_S, hps_H: Hparams, data: FitData, splits_S) -> FitState:
    """``trainer.start`` for every seed x hparam, one model after the other (``lax.map``): a state with leading S x H.

    Not vmapped on purpose: the linear head's start solves a D x D system, and on XLA's CPU runtime (jax 0.10)
    several *batched* LAPACK solves running at once in one program can deadlock its thread pool
    (benchmarks/RESULTS.md). Model by model, the solves are unbatched; the start is a small part of a fit.
    """
    num_s, num_h = key_data_S.shape[0], hps_H.lr.shape[0]
    per_model = functools.partial(jnp.repeat, repeats=num_h, axis=0)  # seed-major: model s*H + h
    models = (per_model(key_data_S), jax.tree.map(lambda a: jnp.tile(a, num_s), hps_H), jax.tree.map(per_model, splits_S))
    states_M = jax.lax.map(lambda args: trainer.start(jax.random.wrap_key_data(args[0]), args[1], data, args[2]), models)
    return jax.tree.map(lambda a: a.reshape(num_s, num_h, *a.shape[1:]), states_M)


def over_seeds(fn, seeded, shared, mesh):
    """``fn(seed_args, shared)`` for each seed of ``seeded`` (leading axis S, sharded over ``mesh``), stacked.

    Each device runs its own seeds one after the other (``shard_map`` of ``lax.map``). A seed's step is already
    one wide GEMM; batching the seeds as well (a vmap, even of size 1) made XLA's CPU GEMMs batched and the fused
    epoch about 25% slower (benchmarks/RESULTS.md)."""
    local = lambda seeded, shared: jax.lax.map(lambda args: fn(args, shared), seeded)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("seeds"), P()), out_specs=P("seeds"))(seeded, shared)


def seed_keys(root_seed: int, num_seeds: int):
    """Key of seed s: ``jax.random.split(jax.random.key(root_seed), S)[s]``."""
    return jax.random.split(jax.random.key(root_seed), num_seeds)


def fit_methods(cfg: FitConfig, data: FitData, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
                on_compiled=None):
    """Fit every method of ``cfg`` for every seed x hparam; returns ({method: FitOutput}, timings).

    With ``cfg.vmap`` all methods, seeds and hparams form one jit-compiled epoch program: per seed one
    :func:`seed_epoch` for all its models (fused unless ``cfg.fuse`` is False), the seeds sharded over every
    device (:mod:`w2s_jax.sharding`) and run one after the other on each (:func:`over_seeds`). It is called once
    per epoch from a short loop so that ``progress(models_done_epochs)`` can report; the state stays on device
    between calls. Without it, :func:`make_fit` is compiled per method and called model by model on one device.
    Outputs are ``S x H``.
    ``on_compiled(seconds)`` is called once the program is compiled.
    """
    cfg = resolve_batch_size(cfg, splits.hold_train.shape[-1])
    keys = seed_keys(cfg.root_seed, cfg.seeds)
    hps = cfg.grid_hparams()
    num_h = len(hps.lr)
    trainers = {m: make_trainer(METHODS[m], num_classes, text_TxKxD, cfg) for m in cfg.methods}
    report = progress or (lambda done: None)
    t0 = time.perf_counter()
    if cfg.vmap:
        # every method and hparam of a seed in one fused epoch; the seeds sharded across all devices, mapped on each
        mesh = sharding.seed_mesh()
        key_data_S, splits_S = sharding.place(sharding.pad_seeds((jax.random.key_data(keys), splits), mesh.size),
                                              mesh, P("seeds"))
        hps_H, shared = sharding.place((hps, data), mesh, P())

        def start_program(key_data_S, hps_H, data, splits_S):
            return {m: start_seeds(t, key_data_S, hps_H, data, splits_S) for m, t in trainers.items()}

        def epoch_program(states, e, key_data_S, hps_H, data, splits_S):
            def one_seed(seeded, shared):
                (state, key_data, split), (e, hps_H, data) = seeded, shared
                return seed_epoch(trainers, state, jax.random.wrap_key_data(key_data), e, hps_H, data, split, cfg)

            return over_seeds(one_seed, (states, key_data_S, splits_S), (e, hps_H, data), mesh)

        args = (key_data_S, hps_H, shared, splits_S)
        by_seed = NamedSharding(mesh, P("seeds"))  # every state and history leaf has the seed axis first
        start = jax.jit(start_program, out_shardings=by_seed).lower(*args).compile()
        state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_seed),
                                    jax.eval_shape(start_program, *args))
        step = jax.jit(epoch_program, out_shardings=(by_seed, by_seed)).lower(state_shapes, jnp.int32(0), *args)
        step = step.compile()
        t1 = time.perf_counter()  # both programs compiled (or loaded from the compilation cache); nothing run yet
        if on_compiled:
            on_compiled(t1 - t0)
        states = start(*args)
        history = []
        for e in range(cfg.epochs):
            states, h = step(states, jnp.int32(e), *args)
            history.append(jax.block_until_ready(h))
            report(cfg.seeds * num_h * len(trainers))  # the padding copies are not counted
        history = jax.tree.map(lambda *per_epoch: jnp.stack(per_epoch, axis=-1), *history)
        outputs = {m: finish(states[m], history[m]) for m in trainers}
        outputs = jax.tree.map(lambda a: a[: cfg.seeds], sharding.to_host(outputs))  # S x H, the padding trimmed
    else:
        hps = jax.tree.map(jnp.asarray, hps)
        splits = jax.tree.map(jnp.asarray, splits)
        compiled = {m: jax.jit(make_fit(METHODS[m], num_classes, text_TxKxD, cfg)) for m in trainers}
        outputs = {}
        t1 = time.perf_counter()
        for m, f in compiled.items():
            per_seed = []
            for s in range(cfg.seeds):
                split_s = jax.tree.map(lambda a: a[s], splits)
                per_hp = [f(keys[s], jax.tree.map(lambda a: a[h], hps), data, split_s) for h in range(num_h)]
                per_seed.append(jax.tree.map(lambda *xs: jnp.stack(xs), *per_hp))
            outputs[m] = jax.block_until_ready(jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed))
            report(cfg.seeds * num_h * cfg.epochs)
    t2 = time.perf_counter()
    # without vmap, compilation happens inside the first calls and is counted as run time
    return outputs, {"compile_s": t1 - t0, "run_s": t2 - t1}


def estimate_bytes(cfg: FitConfig, n: int, d: int, k: int) -> int:
    """Rough memory per device of the vmapped fit, in bytes (float32): the shared data; per model on that device
    its params, Adam moments, grads and best copy (6 x params); and, for the one seed running at a time, its J
    models' step (one minibatch's features and J logits, twice for the gradient) and end-of-epoch evaluation
    (hold_val and test' features and J logits, 36% of n rows). Checked against measured peak RSS in
    benchmarks/bench_scaling.py (runtime overhead not included)."""
    num_h = int(np.prod([len(v) for _, v in cfg.grid] or [1]))
    params = k * d + k
    j = num_h * len(cfg.methods)  # models of one seed
    eval_rows = int(0.36 * n)
    running = lambda models: (4 * cfg.batch_size + eval_rows) * (d + 2 * models * k) + n  # one seed's step + eval
    data = n * (d + k * (1 + len(cfg.ensemble)) + 1)  # features, the weak logits (and the ensemble's), labels
    if not cfg.vmap:  # one model at a time
        return 4 * (data + 6 * params + running(1))
    seeds_here = math.ceil(cfg.seeds / jax.device_count())
    return 4 * (data + seeds_here * j * 6 * params + running(j))


def available_bytes() -> int:
    """Memory the fit may use: the device's limit on an accelerator, else 80% of physical RAM."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not report memory
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
