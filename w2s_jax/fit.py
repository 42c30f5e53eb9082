"""One pure ``fit`` for a single model; seeds and hyperparameters are vmap axes added by the caller.

Axis order everywhere: (seed S, hparam H, ...). ``fit(key, hp, data, split)`` trains one head
with Adam (linear warmup, then linear decay), epochs and minibatches as nested ``lax.scan``
over on-device arrays, and keeps the parameters of the epoch with the best ``hold_val`` score
(agreement with the weak labels, or ground-truth accuracy for a ceiling).
"""
from __future__ import annotations

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
    """One model's training as pure functions: ``fit`` = ``start``, then ``epoch`` for e = 0..E-1 (lax.scan).

    start(key, hp, data, split) -> FitState
    epoch(state, key, e, hp, data, split) -> (FitState, history_e), history_e a dict of scalars
    fit(key, hp, data, split) -> FitOutput, the whole run in one call
    """

    start: Callable
    epoch: Callable
    fit: Callable


def make_trainer(method: Method, num_classes: int, text_TxKxD, cfg: FitConfig) -> Trainer:
    """The pure training functions of one model (one seed, one hparam setting) of ``method``."""
    head = get_head(method.head)
    module = head.module(num_classes)
    text_KxD = None if text_TxKxD is None else jnp.mean(jnp.asarray(text_TxKxD, jnp.float32), axis=0)
    loss_fn = get_loss(method.loss)
    epochs, batch = cfg.epochs, cfg.batch_size

    def optimizer(hp, total):
        """Adam with warmup and linear decay: the head at ``hp.lr``, the multi-weak mixture logits at ``hp.raven_lr``."""
        def adam(lr):
            return optax.chain(optax.scale_by_adam(),
                               optax.scale_by_schedule(lambda count: -lr * lr_factor(count, total, cfg.warmup)))

        return optax.multi_transform({"params": adam(hp.lr), "mixture": adam(hp.raven_lr)},
                                     lambda trainable: {collection: collection for collection in trainable})

    def start(key, hp: Hparams, data: FitData, split: SeedSplits) -> FitState:
        total = epochs * math.ceil(split.hold_train.shape[0] / batch)
        init_key, _ = jax.random.split(key)
        mixture = {"mixture": {"logits_M": jnp.zeros(data.weaks_MxNxK.shape[0])}} if method.target in MULTI_WEAK else {}
        if method.target == "raven":  # easy-sample start: only the rows where every weak model agrees
            targets_N = consensus(data.weaks_MxNxK[:, split.hold_train])
        else:
            targets_N = jnp.argmax(teacher_logits(method, data, num_classes, split.hold_train, mixture), axis=1)
        variables = {**module.init(init_key, data.feats_NxD[split.hold_train], hp, Start(targets_N, text_KxD)),
                     **mixture}
        best = {"variables": variables, "score": jnp.float32(-1.0), "epoch": jnp.int32(0)}
        return FitState(variables, optimizer(hp, total).init(trained(variables)), best)

    def epoch(state: FitState, key, epoch, hp: Hparams, data: FitData, split: SeedSplits):
        n_train = split.hold_train.shape[0]
        steps = math.ceil(n_train / batch)
        total = epochs * steps
        tx = optimizer(hp, total)
        _, order_key = jax.random.split(key)

        def apply(trainable, feats_BxD):
            return module.apply({**state.variables, **trainable}, feats_BxD, hp)

        def batch_loss(trainable, rows_B, mask_B, progress):
            """-> (loss to minimise, (the head's loss, hits)); ``trainable``: the TRAINED collections."""
            logits_BxK = apply(trainable, data.feats_NxD[rows_B])
            target_BxK = teacher_logits(method, data, num_classes, rows_B, trainable)
            per_example_B = loss_fn(logits_BxK, jax.lax.stop_gradient(target_BxK), progress=progress, hp=hp)
            hits = jnp.sum((jnp.argmax(logits_BxK, 1) == jnp.argmax(target_BxK, 1)) * mask_B)
            head_loss = jnp.sum(per_example_B * mask_B) / jnp.sum(mask_B) + head.penalty(trainable["params"], hp)
            if method.target != "raven":
                return head_loss, (head_loss, hits)
            mixture_B = mixture_loss(logits_BxK, target_BxK)
            return head_loss + jnp.sum(mixture_B * mask_B) / jnp.sum(mask_B), (head_loss, hits)

        def train_step(carry, xs):
            trainable, opt_state = carry
            step, rows_B, mask_B = xs
            grads, (loss, hits) = jax.grad(batch_loss, has_aux=True)(trainable, rows_B, mask_B, step / total)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            return (optax.apply_updates(trainable, updates), opt_state), (loss * jnp.sum(mask_B), hits)

        # --- this epoch's minibatches: a permutation from this seed's key, padded and masked
        perm = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
        perm = jnp.concatenate([perm, jnp.zeros(steps * batch - n_train, perm.dtype)])
        rows_TxB = split.hold_train[perm].reshape(steps, batch)
        mask_TxB = (jnp.arange(steps * batch) < n_train).reshape(steps, batch).astype(jnp.float32)
        step_ids = epoch * steps + jnp.arange(steps)
        (trainable, opt_state), (losses, hits) = jax.lax.scan(
            train_step, (trained(state.variables), state.opt_state), (step_ids, rows_TxB, mask_TxB))
        # --- end of epoch: hold_val picks the best epoch; test' accuracy is kept for curves only
        val_logits = apply(trainable, data.feats_NxD[split.hold_val])
        val_targets = teacher_logits(method, data, num_classes, split.hold_val, trainable)
        val_score = jnp.mean(jnp.argmax(val_logits, 1) == jnp.argmax(val_targets, 1))
        val_loss = jnp.mean(loss_fn(val_logits, val_targets, progress=(epoch + 1) / epochs, hp=hp))
        test_logits = apply(trainable, data.feats_NxD[split.test_prime])
        test_acc = jnp.mean(jnp.argmax(test_logits, 1) == data.labels_N[split.test_prime])
        better = val_score > state.best["score"]
        variables = {**state.variables, **trainable}
        candidate = {"variables": variables, "score": val_score, "epoch": epoch + 1}
        best = jax.tree.map(lambda new, old: jnp.where(better, new, old), candidate, state.best)
        history = {"train_loss": jnp.sum(losses) / n_train, "train_acc": jnp.sum(hits) / n_train,
                   "val_loss": val_loss, "val_score": val_score, "test_acc": test_acc}
        return FitState(variables, opt_state, best), history

    def fit(key, hp: Hparams, data: FitData, split: SeedSplits) -> FitOutput:
        state = start(key, hp, data, split)
        state, history = jax.lax.scan(lambda st, e: epoch(st, key, e, hp, data, split), state, jnp.arange(epochs))
        return finish(state, history)

    return Trainer(start, epoch, fit)


def finish(state: FitState, history: dict) -> FitOutput:
    return FitOutput(state.best["variables"], history, state.best["epoch"])


def make_fit(method: Method, num_classes: int, text_TxKxD, cfg: FitConfig):
    """-> ``fit(key, hp, data, split) -> FitOutput`` for one model (one seed, one hparam setting)."""
    return make_trainer(method, num_classes, text_TxKxD, cfg).fit


def start_models(trainer: Trainer, key_data_M, hps_M, data: FitData, splits_M) -> FitState:
    """``trainer.start`` for each of M models, one after the other (``lax.map``), stacked.

    Not vmapped on purpose: the linear head's start solves a D x D system, and on XLA's CPU runtime (jax 0.10)
    several *batched* LAPACK solves running at once in one program can deadlock its thread pool
    (benchmarks/RESULTS.md). Model by model, the solves are unbatched; the start is a small part of a fit.
    """
    return jax.lax.map(lambda args: trainer.start(jax.random.wrap_key_data(args[0]), args[1], data, args[2]),
                       (key_data_M, hps_M, splits_M))


def seed_keys(root_seed: int, num_seeds: int):
    """Key of seed s: ``jax.random.split(jax.random.key(root_seed), S)[s]``."""
    return jax.random.split(jax.random.key(root_seed), num_seeds)


def fit_methods(cfg: FitConfig, data: FitData, splits: SeedSplits, text_TxKxD, num_classes: int, progress=None,
                on_compiled=None):
    """Fit every method of ``cfg`` for every seed x hparam; returns ({method: FitOutput}, timings).

    With ``cfg.vmap`` all methods, seeds and hparams form one jit-compiled epoch program whose model axis
    is sharded over every device (:mod:`w2s_jax.sharding`), called once per epoch from a short loop so
    that ``progress(models_done_epochs)`` can report; the state stays on device between calls. Without it,
    the same ``fit`` is compiled per method and called model by model on one device. Outputs are ``S x H``.
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
        # every method, vmapped over M = S*H models sharded across all devices
        mesh = sharding.model_mesh()
        per_model = sharding.pad_models(sharding.flatten_grid(jax.random.key_data(keys), hps, splits), mesh.size)
        key_data_M, hps_M, splits_M = sharding.place(per_model, mesh, P("models"))
        shared = sharding.place(data, mesh, P())

        def start_program(key_data_M, hps_M, data, splits_M):
            return {m: start_models(t, key_data_M, hps_M, data, splits_M) for m, t in trainers.items()}

        def epoch_program(states, e, key_data_M, hps_M, data, splits_M):
            out = {m: jax.vmap(lambda st, kd, hp, sp: t.epoch(st, jax.random.wrap_key_data(kd), e, hp, data, sp))(
                states[m], key_data_M, hps_M, splits_M) for m, t in trainers.items()}
            return {m: o[0] for m, o in out.items()}, {m: o[1] for m, o in out.items()}

        args = (key_data_M, hps_M, shared, splits_M)
        by_model = NamedSharding(mesh, P("models"))  # every state and history leaf has the model axis first
        start = jax.jit(start_program, out_shardings=by_model).lower(*args).compile()
        state_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_model),
                                    jax.eval_shape(start_program, *args))
        step = jax.jit(epoch_program, out_shardings=(by_model, by_model)).lower(state_shapes, jnp.int32(0), *args)
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
        outputs = sharding.unflatten(sharding.to_host(outputs), cfg.seeds, num_h)
    else:
        hps = jax.tree.map(jnp.asarray, hps)
        splits = jax.tree.map(jnp.asarray, splits)
        compiled = {m: jax.jit(t.fit) for m, t in trainers.items()}
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
    """Rough memory per device of the vmapped fit, in bytes (float32): the shared data, plus per model on
    that device its params, Adam moments, grads and best copy (6 x params), one minibatch's features and
    logits, and the end-of-epoch evaluation's gathered hold_val/test' features and logits (36% of n rows).
    Checked against measured peak RSS in benchmarks/bench_scaling.py (runtime overhead not included)."""
    num_models = cfg.seeds * int(np.prod([len(v) for _, v in cfg.grid] or [1]))
    params = k * d + k
    eval_rows = int(0.36 * n)
    per_model = 6 * params + 4 * cfg.batch_size * (d + k) + eval_rows * (d + 2 * k) + n
    data = n * (d + k * (1 + len(cfg.ensemble)) + 1)  # features, the weak logits (and the ensemble's), labels
    models = math.ceil(num_models / jax.device_count()) * len(cfg.methods) if cfg.vmap else 1  # per device
    return 4 * (data + models * per_model)


def available_bytes() -> int:
    """Memory the fit may use: the device's limit on an accelerator, else 80% of physical RAM."""
    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:  # some backends do not report memory
        stats = {}
    if "bytes_limit" in stats:
        return int(stats["bytes_limit"])
    return int(0.8 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
