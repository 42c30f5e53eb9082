from __future__ import annotations

import functools
import math
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax


from w2s_jax.config import Hparams
from w2s_jax.heads import Start
from w2s_jax.losses import family_loss
from w2s_jax.methods import previous_round, round_of
from w2s_jax.refine import Teachers
from w2s_jax.select import CRITERIA, HISTORY_KEY, ValView, kept_point, masked_mean, scores, val_view
from w2s_jax.splits import SeedSplits
from w2s_jax.fit.groups import (FitData, FitOutput, FitState, Group, RAVEN, Rows, TRUTH, consensus, group_of,
                                mixture_teacher, pad_targets, pool_rows)

if TYPE_CHECKING:  # annotations only: these modules import this one
    from w2s_jax.fit.padding import Padding, Sizes
    from w2s_jax.fit.plan import Recipe



def warmup_steps(total_steps: int, warmup: float) -> int:
    return max(1, math.ceil(warmup * total_steps))


def lr_factor(step, total_steps, warmup: float, warm=None):
    """Linear warmup over ``warmup`` of the steps to 1, then linear decay to 0 at ``total_steps``; a padded fit
    passes ``total_steps`` and ``warm`` (:func:`warmup_steps`) as data (:class:`Padding`)."""
    warm = warmup_steps(total_steps, warmup) if warm is None else warm
    up = (step + 1) / warm
    down = (total_steps - step) / jnp.maximum(1, total_steps - warm)
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


def split_models(tree, group: Group):
    """``{method: tree[:, j0:j0 + H]}``: a group's outputs (leading S x J) per method (leading S x H)."""
    num_h = jax.tree.leaves(tree)[0].shape[1] // len(group.methods)
    return {m: jax.tree.map(lambda a: a[:, i * num_h:(i + 1) * num_h], tree) for i, m in enumerate(group.methods)}


def make_optimizer(recipe: Recipe):
    """-> ``optimizer(hp, total_steps, warm=None)``: one model's Adam with warmup and linear decay
    (:func:`lr_factor`), the head at ``hp.lr``, the multi-weak mixture logits at ``hp.raven_lr``."""
    def optimizer(hp, total, warm=None):
        def adam(lr):
            return optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(
                lambda count: -lr * lr_factor(count, total, recipe.warmup, warm)))

        return optax.multi_transform({"params": adam(hp.lr), "mixture": adam(hp.raven_lr)},
                                     lambda trainable: {collection: collection for collection in trainable})

    return optimizer


def total_steps(recipe: Recipe, split: SeedSplits) -> int:
    """Optimizer steps of a whole fit: epochs x minibatches per epoch (the lr schedule's length)."""
    return recipe.epochs * math.ceil(split.hold_train.shape[-1] / recipe.batch_size)


def start_targets(group: Group, row: Rows, data: FitData, rows_N, teachers: Teachers):
    """The class each training row starts a head from (``Start.targets_N``): the argmax of the model's target (the
    weak labels, or their refinement; -1 where a filter dropped the row), the label for a ceiling; multi-weak: the
    rows where every weak model agrees (raven's easy samples, -1 elsewhere) or the argmax of the uniform mixture
    (average)."""
    target = row.target
    if group.multi:
        weaks_MxNxK = data.weaks_MxNxK[:, rows_N]
        uniform = {"mixture": {"logits_M": jnp.zeros(weaks_MxNxK.shape[0])}}
        average_N = jnp.argmax(mixture_teacher(uniform, jax.nn.softmax(weaks_MxNxK)), axis=1)
        return jnp.where(target == RAVEN, consensus(weaks_MxNxK), average_N)
    weak_N = jnp.where(teachers.weight_UxN[row.teacher, rows_N] > 0,
                       jnp.argmax(teachers.logits_UxNxK[row.teacher, rows_N], axis=1), -1)
    return jnp.where(target == TRUTH, data.labels_N[rows_N], weak_N)


def start_model(group: Group, recipe: Recipe, key, row: Rows, data: FitData, split: SeedSplits,
                teachers: Teachers, sizes: Sizes | None = None) -> FitState:
    """One model's first state (leading axes none): its head started from the data, Adam's state, no best yet.
    Padded (``sizes``), the padding rows of hold_train start nothing (``Start.real_N`` False, target -1)."""
    init_key, _ = jax.random.split(key)
    mixture = {"mixture": {"logits_M": jnp.zeros(data.weaks_MxNxK.shape[0])}} if group.multi else {}
    targets_N = start_targets(group, row, data, split.hold_train, teachers)
    real_N = None
    if sizes is not None:
        real_N = split.hold_train >= 0
        targets_N = jnp.where(real_N, targets_N, -1)
    variables = {**group.module.init(init_key, data.feats_NxD[split.hold_train], row.hp,
                                     Start(targets_N, group.text_KxD, real_N)), **mixture}
    best = {"variables": variables, "score": jnp.float32(-1.0), "epoch": jnp.int32(0)}
    return FitState(variables, make_optimizer(recipe)(row.hp, 1).init(trained(variables)), best)  # init reads no lr


def shared_starts(group: Group, rows: Rows) -> tuple[np.ndarray, np.ndarray]:
    """Which models of a group can share one start: ``(firsts_U, of_model_J)``, the first model of each distinct
    (target, start hyperparameters) and, per model, the index of its start among them. The linear head's start
    solves a D x D system that depends on the targets, δ and s only, so the LDA of a seed is solved once for all
    its weak-label methods and learning rates instead of once per model."""
    num_j = np.shape(rows.target)[0]
    if group.start_fields is None:
        return np.arange(num_j), np.arange(num_j)
    keys = [(int(np.asarray(rows.target)[j]), int(np.asarray(rows.teacher)[j]),
             *(float(np.asarray(getattr(rows.hp, f))[j]) for f in group.start_fields)) for j in range(num_j)]
    distinct = list(dict.fromkeys(keys))
    firsts = np.asarray([keys.index(key) for key in distinct])
    return firsts, np.asarray([distinct.index(key) for key in keys])


def start_group(group: Group, recipe: Recipe, plan, key_data_S, rows: Rows, data: FitData, splits_S,
                teachers_S: Teachers, sizes: Sizes | None = None) -> FitState:
    """:func:`start_seeds` for a group, each distinct start made once and copied to the models that share it
    (``plan``: :func:`shared_starts` of the group's rows): leading S x J. A model's other hyperparameters enter
    only in training."""
    firsts_U, of_model_J = plan
    states_SxU = start_seeds(group, recipe, key_data_S, jax.tree.map(lambda a: a[firsts_U], rows), data, splits_S,
                             teachers_S, sizes)
    return jax.tree.map(lambda a: a[:, of_model_J], states_SxU)


def start_seeds(group: Group, recipe: Recipe, key_data_S, rows: Rows, data: FitData, splits_S,
                teachers_S: Teachers, sizes: Sizes | None = None) -> FitState:
    """:func:`start_model` for every seed x model of ``group``, one after the other (``lax.map`` over the seeds,
    then over their models): leading S x J.

    Not vmapped on purpose: the linear head's start solves a D x D system, and on XLA's CPU runtime (jax 0.10)
    several *batched* LAPACK solves running at once in one program can deadlock its thread pool
    (benchmarks/RESULTS.md). Model by model, the solves are unbatched; the start is a small part of a fit.
    """
    def one_seed(seeded):
        key_data, split, teachers = seeded
        return jax.lax.map(lambda row: start_model(group, recipe, jax.random.wrap_key_data(key_data), row, data, split,
                                                   teachers, sizes), rows)

    return jax.lax.map(one_seed, (key_data_S, splits_S, teachers_S))


def epoch_order(key, epoch, hold_train_N, length: int):
    """This epoch's ``hold_train`` rows in minibatch order, ``length``: a permutation from the seed's key and the
    epoch, padded with the first row (masked out). Every method and hparam of a seed shares it."""
    n_train = hold_train_N.shape[0]
    _, order_key = jax.random.split(key)
    perm = jax.random.permutation(jax.random.fold_in(order_key, epoch), n_train)
    return hold_train_N[jnp.concatenate([perm, jnp.zeros(length - n_train, perm.dtype)])]


def minibatches(key, epoch, hold_train_N, batch: int):
    """This epoch's rows ``T x B`` (:func:`epoch_order`) and their mask."""
    n_train = hold_train_N.shape[0]
    steps = math.ceil(n_train / batch)
    mask_TxB = (jnp.arange(steps * batch) < n_train).reshape(steps, batch).astype(jnp.float32)
    return epoch_order(key, epoch, hold_train_N, steps * batch).reshape(steps, batch), mask_TxB


def group_logits(group: Group, variables: dict, feats_BxD, hp: Hparams, fuse: bool, matmul_dtype: str = "float32"):
    """The logits of a group's J models on one shared batch, ``J x B x K``, from variables with a leading J.

    Fused, a head with a linear form is computed in one wide GEMM ``feats · [A_1 … A_J]ᵀ`` (the gradient is one
    wide GEMM back); a head without one (an MLP), and every head when not fused, is applied model by model
    (vmapped). Both compute ``feats Aᵀ + c`` for a linear head. ``matmul_dtype="bfloat16"`` rounds the wide GEMM's
    inputs to bfloat16 and accumulates in float32.
    """
    if not (fuse and group.linear):
        return jax.vmap(group.module.apply, in_axes=(0, None, 0))(variables, feats_BxD, hp)
    a_JxKxD, c_JxK = jax.vmap(lambda v, h: group.module.apply(v, h, method="linear_form"))(variables, hp)
    j, k, d = a_JxKxD.shape
    wide_BxJK = jnp.dot(feats_BxD.astype(matmul_dtype), a_JxKxD.reshape(j * k, d).T.astype(matmul_dtype),
                        preferred_element_type=jnp.float32)
    return jnp.moveaxis(wide_BxJK.reshape(-1, j, k) + c_JxK, 1, 0)


def heads_logits(groups: dict, variables: dict, feats_BxD, rows: dict, fuse: bool, matmul_dtype="float32") -> dict:
    """Every model's logits on one shared batch, ``{group: J x B x K}`` (:func:`group_logits` per group)."""
    return {g: group_logits(grp, variables[g], feats_BxD, rows[g].hp, fuse, matmul_dtype) for g, grp in groups.items()}


class Shared(NamedTuple):
    """What every model of a group reads of its teacher on some rows B, once for all of them."""

    teachers: jax.Array  # the seed's targets U x B x K; multi-weak: the weak models' probabilities M x B x K
    weights_UxB: jax.Array  # 1, or 0 where a filter dropped the row


def shared_teacher(group: Group, data: FitData, teachers: Teachers, rows_B) -> Shared:
    """The seed's targets on ``rows_B`` (each model picks its own, ``Rows.teacher``), or, multi-weak, the weak
    models' probabilities (each model mixes them with its own weights)."""
    weights = teachers.weight_UxN[:, rows_B]
    if group.multi:
        return Shared(jax.nn.softmax(data.weaks_MxNxK[:, rows_B]), weights)
    return Shared(teachers.logits_UxNxK[:, rows_B], weights)


def model_teacher(group: Group, trainable: dict, shared: Shared, row: Rows):
    """One model's teacher ``B x K`` and row weights ``B``."""
    if group.multi:
        return mixture_teacher(trainable, shared.teachers), shared.weights_UxB[0]
    return shared.teachers[row.teacher], shared.weights_UxB[row.teacher]


def model_loss(group: Group, trainable, logits_BxK, shared: Shared, labels_B, mask_B, row: Rows, progress):
    """One model's training loss on a batch -> (loss to minimise, (the head's loss, hits vs its target)); rows a
    filter dropped count for nothing."""
    teacher_BxK, weight_B = model_teacher(group, trainable, shared, row)
    mask_B = mask_B * weight_B
    per_example_B = family_loss(logits_BxK, jax.lax.stop_gradient(teacher_BxK), labels_B, row.coeffs,
                                progress=progress, hp=row.hp)
    target_B = jnp.where(row.target == TRUTH, labels_B, jnp.argmax(teacher_BxK, axis=1))
    hits = jnp.sum((jnp.argmax(logits_BxK, 1) == target_B) * mask_B)
    head_loss = (jnp.sum(per_example_B * mask_B) / jnp.maximum(jnp.sum(mask_B), 1.0)
                 + group.penalty(trainable["params"], row.hp))
    if not group.multi:
        return head_loss, (head_loss, hits)
    mixture_B = mixture_loss(logits_BxK, teacher_BxK)  # raven learns its weights; average's never move
    learns = (row.target == RAVEN).astype(jnp.float32)
    return head_loss + learns * (jnp.sum(mixture_B * mask_B) / jnp.sum(mask_B)), (head_loss, hits)


def end_model(group: Group, select: str, state: FitState, trainable, opt_state, val_logits, test_logits, row: Rows,
              val_shared: Shared, view: ValView, labels_test, progress, epoch, train, valid=(None, None)):
    """hold_val picks a model's best epoch by the ``select`` criterion (:mod:`w2s_jax.select`; every criterion's
    score is kept in the history); test' accuracy is kept for curves only. ``view``: what the rules read on
    hold_val, once for all models (:func:`w2s_jax.select.val_view`); ``train``: (loss, accuracy); ``valid``: the
    real rows of hold_val and test' when they are padded to a size bucket (None: every row)."""
    labels_val = view.labels_V
    valid_V, valid_T = valid
    teacher_BxK, weight_B = model_teacher(group, trainable, val_shared, row)
    criteria = scores(val_logits, teacher_BxK, weight_B, view, row.target == TRUTH, valid_V)
    val_score = criteria[select]
    val_loss = masked_mean(family_loss(val_logits, teacher_BxK, labels_val, row.coeffs, progress=progress, hp=row.hp),
                           valid_V)
    test_acc = masked_mean(jnp.argmax(test_logits, 1) == labels_test, valid_T)
    better = val_score > state.best["score"]
    variables = {**state.variables, **trainable}
    candidate = {"variables": variables, "score": val_score, "epoch": epoch + 1}
    best = jax.tree.map(lambda new, old: jnp.where(better, new, old), candidate, state.best)
    history = {"train_loss": train[0], "train_acc": train[1], "val_loss": val_loss, "val_score": val_score,
               "test_acc": test_acc, **{HISTORY_KEY.format(c): criteria[c] for c in CRITERIA}}
    return FitState(variables, opt_state, best), history


def optimizer_step(optimizer, schedule, grad, opt_state, trainable, hp):
    """One update of one model's TRAINED collections -> (trainable, opt_state); ``schedule``: (total, warm)."""
    updates, opt_state = optimizer(hp, *schedule).update(grad, opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


def seed_epoch(groups: dict, states: dict, key, epoch, rows: dict, data: FitData, split: SeedSplits,
               recipe: Recipe, teachers: Teachers, padding: Padding | None = None):
    """One epoch of all models of one seed: ``{group: FitState}`` with a leading J, ``{group: Rows}``, the seed's
    targets ``teachers`` (:func:`make_teachers`).

    The models share the seed's minibatches. Each step gathers its rows once, computes each group's logits
    (:func:`group_logits`), its vectorized loss (:func:`model_loss` vmapped over J) and differentiates the sum,
    which gives each model its own gradient, as they share no parameters; one vmapped Adam update per group
    follows. At the end, hold_val and test' are gathered once for all models.

    With ``padding`` (splits padded to a size bucket, :func:`pad_to_bucket`), the minibatch order, the real
    sizes and the lr schedule come as data; the steps past the real ones are skipped (``lax.cond`` on a
    predicate that every seed shares, so it stays a branch when the seeds are vmapped), and every mean is over
    the real rows, so the numbers are those of the unpadded fit.
    Returns ``({group: FitState}, {group: history_e})``, each history field ``J``.
    """
    optimizer = make_optimizer(recipe)
    if padding is None:
        schedule, n_train = (total_steps(recipe, split), None), split.hold_train.shape[0]
        rows_TxB, mask_TxB = minibatches(key, epoch, split.hold_train, recipe.batch_size)
        steps_before = epoch * rows_TxB.shape[0]
        valid = (None, None)
    else:
        sizes = padding.sizes
        schedule, n_train = (sizes.total, sizes.warm), sizes.n_train
        rows_TxB = padding.orders_ExR[epoch].reshape(-1, recipe.batch_size)
        mask_TxB = (jnp.arange(rows_TxB.size) < n_train).reshape(rows_TxB.shape).astype(jnp.float32)
        steps_before = epoch * sizes.steps
        valid = (split.hold_val >= 0, split.test_prime >= 0)
    total = schedule[0]

    def logits_of(trainables, feats_BxD):
        variables = {g: {**states[g].variables, **trainables[g]} for g in groups}
        return heads_logits(groups, variables, feats_BxD, rows, recipe.fuse, recipe.matmul_dtype)

    def summed_loss(trainables, rows_B, mask_B, progress):
        logits = logits_of(trainables, data.feats_NxD[rows_B])  # one gather for every model of the seed
        labels_B = data.labels_N[rows_B]
        out = {g: jax.vmap(functools.partial(model_loss, grp), in_axes=(0, 0, None, None, None, 0, None))(
            trainables[g], logits[g], shared_teacher(grp, data, teachers, rows_B), labels_B, mask_B, rows[g],
            progress)
            for g, grp in groups.items()}
        return sum(jnp.sum(loss_J) for loss_J, _ in out.values()), {g: aux for g, (_, aux) in out.items()}

    def train_step(carry, xs):
        trainables, opt_states = carry
        step, rows_B, mask_B = xs
        grads, aux = jax.grad(summed_loss, has_aux=True)(trainables, rows_B, mask_B, step / total)
        new = {g: jax.vmap(functools.partial(optimizer_step, optimizer, schedule))(
            grads[g], opt_states[g], trainables[g], rows[g].hp) for g in groups}
        count = jnp.sum(mask_B)
        per_step = {g: (head_loss * count, hits) for g, (head_loss, hits) in aux.items()}
        return ({g: n[0] for g, n in new.items()}, {g: n[1] for g, n in new.items()}), per_step

    def padded_step(carry, xs):  # a step past the real ones (padding rows only): skipped, nothing changes
        t, xs = xs
        no_step = lambda carry, xs: (carry, jax.tree.map(  # noqa: E731
            jnp.zeros_like, jax.eval_shape(train_step, carry, xs)[1]))
        return jax.lax.cond(t < padding.sizes.steps, train_step, no_step, carry, xs)

    steps = rows_TxB.shape[0]
    first = ({g: trained(st.variables) for g, st in states.items()}, {g: st.opt_state for g, st in states.items()})
    xs = (steps_before + jnp.arange(steps), rows_TxB, mask_TxB)
    (trainables, opt_states), sums = (jax.lax.scan(train_step, first, xs) if padding is None
                                      else jax.lax.scan(padded_step, first, (jnp.arange(steps), xs)))
    val = logits_of(trainables, data.feats_NxD[split.hold_val])
    test = logits_of(trainables, data.feats_NxD[split.test_prime])
    labels_val, labels_test = data.labels_N[split.hold_val], data.labels_N[split.test_prime]
    view = val_view(data.weak_NxK[split.hold_val], teachers.logits_UxNxK[1, split.hold_val], labels_val, valid[0])
    out = {g: jax.vmap(functools.partial(end_model, grp, recipe.select, valid=valid),
                       in_axes=(0, 0, 0, 0, 0, 0, None, None, None, None, None, 0))(
        states[g], trainables[g], opt_states[g], val[g], test[g], rows[g],
        shared_teacher(grp, data, teachers, split.hold_val), view, labels_test, (epoch + 1) / recipe.epochs, epoch,
        (jnp.sum(sums[g][0], 0) / n_train, jnp.sum(sums[g][1], 0) / n_train))
        for g, grp in groups.items()}
    return {g: o[0] for g, o in out.items()}, {g: o[1] for g, o in out.items()}


def finish(state: FitState, history: dict) -> FitOutput:
    return FitOutput(state.best["variables"], history, state.best["epoch"])


def student_logits(group: Group, variables_S, hp: Hparams, feats_NxD):
    """Each seed's kept student of one method on every row: ``S x N x K``."""
    return jax.vmap(lambda v: group.module.apply(v, feats_NxD, hp))(variables_S)


def next_teachers(names, outputs: dict, groups: dict, hps_H: Hparams, data: FitData, splits_S,
                  first_S: Teachers, teacher_J: dict, width: int) -> Teachers:
    """The targets of one later round for every seed (leading S x ``width``), each method of ``names``
    (``METHOD@roundR``) trained on its previous round's kept student:

    - 0: the weak labels; 1: the ``refined`` rule's reference, as in round 1 (``first_S``: round 1's targets);
    - 2 + i: the soft labels (logits) of the kept student of ``previous_round(names[i])`` (its grid point by the
      fit's --select rule, :func:`w2s_jax.select.kept_point`, each seed at its kept epoch) on the seed's pool,
      ``hold_train ∪ hold_val``, the weak logits elsewhere; with the row weights of the round-1 target of that
      student (the rows a ``@filter`` or ``@confident`` dropped stay unseen), then target 0 repeated up to width.
    """
    num_h = np.shape(hps_H.lr)[0]
    pool_SxP = pool_rows(jax.tree.map(jnp.asarray, splits_S))
    logits, weights = [first_S.logits_UxNxK[:, 0], first_S.logits_UxNxK[:, 1]], [first_S.weight_UxN[:, 0]] * 2
    for name in names:
        previous = outputs[previous_round(name)]
        h = kept_point(previous.history, previous.best_epoch)
        g, i = group_of(groups, round_of(name)[0])
        hp = jax.tree.map(lambda a: jnp.asarray(a)[h], hps_H)
        student = student_logits(groups[g], jax.tree.map(lambda a: jnp.asarray(a)[:, h], previous.variables), hp,
                                 data.feats_NxD)
        logits.append(jax.vmap(lambda s, pool: data.weak_NxK.at[pool].set(s[pool]))(student, pool_SxP))
        weights.append(first_S.weight_UxN[:, int(teacher_J[g][i * num_h + h])])
    by_target = pad_targets(Teachers(jnp.stack(logits), jnp.stack(weights)), width)  # U x S x ...
    return jax.tree.map(lambda a: jnp.moveaxis(a, 0, 1), by_target)
