from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from w2s_jax import sharding
from w2s_jax.config import Hparams, resolve_seed_axis
from w2s_jax.methods import METHODS, round_of
from w2s_jax.refine import Refinement, Teachers
from w2s_jax.splits import SeedSplits
from w2s_jax.fit.groups import (FitData, FitOutput, group_rows, make_groups, make_teachers, pad_targets,
                                reference_refinement, round_rows)
from w2s_jax.fit.epoch import finish, next_teachers, seed_epoch, shared_starts, split_models, start_group, start_model
from w2s_jax.fit.padding import Padding, pad_to_bucket
from w2s_jax.fit.plan import Plan, Recipe



def make_fit(method: str, num_classes: int, text_TxKxD, recipe: Recipe):
    """-> ``fit(key, hp, data, split, teachers, teacher) -> FitOutput`` for one model (one seed, one hparam
    setting) of the method named ``method``: :func:`seed_epoch` with a single model, epochs as ``lax.scan``;
    ``teachers``: the seed's targets (:func:`make_teachers`), ``teacher``: the model's index among them."""
    (g, group), = make_groups((method,), num_classes, text_TxKxD).items()

    def fit(key, hp: Hparams, data: FitData, split: SeedSplits, teachers: Teachers | None = None,
            teacher=0) -> FitOutput:
        if teachers is None:  # the weak labels as they are, and the reference of the `refined` criterion
            if METHODS[method].refine:
                raise ValueError(f"{method} trains on refined labels: pass the seed's teachers (make_teachers)")
            teachers = make_teachers((Refinement(), reference_refinement(recipe.refine_k)), data, split)
        one = lambda tree: jax.tree.map(lambda a: jnp.asarray(a)[None], tree)  # a model axis J of 1
        rows = {g: group_rows(group, one(hp), one(teacher))}
        states = {g: one(start_model(group, recipe, key, jax.tree.map(lambda a: a[0], rows[g]), data, split, teachers))}
        run_epoch = lambda st, e: seed_epoch({g: group}, st, key, e, rows, data, split, recipe, teachers)
        states, history = jax.lax.scan(run_epoch, states, jnp.arange(recipe.epochs))
        return finish(jax.tree.map(lambda a: a[0], states[g]), jax.tree.map(lambda a: a[:, 0], history[g]))

    return fit


def over_seeds(fn, seeded, shared, mesh, seed_axis: str = "map"):
    """``fn(seed_args, shared)`` for each seed of ``seeded`` (leading axis S, sharded over ``mesh``), stacked.

    Each device runs its own seeds either one after the other (``seed_axis="map"``, ``lax.map``) or batched
    (``"vmap"``). A seed's step is already one wide GEMM per head; on XLA's CPU runtime batching the seeds made
    its GEMMs batched and the epoch about 25% slower, on an H200 vmapping them made it 1.38x faster
    (benchmarks/RESULTS.md), so the default follows the backend (:func:`w2s_jax.config.resolve_seed_axis`)."""
    if seed_axis == "vmap":
        local = lambda seeded, shared: jax.vmap(fn, in_axes=(0, None))(seeded, shared)
    else:
        local = lambda seeded, shared: jax.lax.map(lambda args: fn(args, shared), seeded)
    return jax.shard_map(local, mesh=mesh, in_specs=(P("seeds"), P()), out_specs=P("seeds"))(seeded, shared)


def check_same_shapes(datas) -> None:
    """The datas of one :func:`fit_each` share its programs: a ValueError unless their arrays' shapes agree."""
    shapes = [jax.tree.map(np.shape, d) for d in datas]
    if any(sh != shapes[0] for sh in shapes[1:]):
        raise ValueError(f"the weak models of one fit must label the same rows with the same classes: shapes {shapes}")


def vmapped_fits(plan: Plan, datas, splits: SeedSplits, on_compiled) -> list[tuple[dict, dict]]:
    """:func:`fit_each` with ``recipe.vmap``: two programs (start, epoch) compiled once for all datas and rounds."""
    recipe, groups, num_h = plan.recipe, plan.groups, len(plan.hps.lr)
    seed_axis = resolve_seed_axis(recipe.seed_axis)
    t0 = time.perf_counter()
    # every model of a seed in one epoch step, one group per head; the seeds sharded across all devices
    mesh = sharding.seed_mesh()
    datas, padded_splits, orders, sizes = pad_to_bucket(plan, datas, splits)
    key_data_S, splits_S, orders_S = sharding.place(
        sharding.pad_seeds((jax.random.key_data(plan.keys), padded_splits, orders), mesh.size), mesh, P("seeds"))
    sizes = sharding.place(sizes, mesh, P())  # None unless padded
    rows = sharding.place(plan.host_rows, mesh, P())
    by_seed = NamedSharding(mesh, P("seeds"))  # every state and history leaf has the seed axis first

    def start_plans(rows_host):
        return {g: shared_starts(grp, jax.tree.map(np.asarray, rows_host[g])) for g, grp in groups.items()}

    def start_models(plans, key_data_S, rows, data, splits_S, orders_S, sizes, teachers_S):
        return {g: start_group(grp, recipe, plans[g], key_data_S, rows[g], data, splits_S, teachers_S, sizes)
                for g, grp in groups.items()}

    def start_program(key_data_S, rows, data, splits_S, orders_S, sizes):
        """Each seed's targets (its refinements, once, before the epochs), then every model's start."""
        teachers_S = over_seeds(
            lambda split, shared: pad_targets(make_teachers(plan.specs, shared[0], split, shared[1]), plan.width),
            splits_S, (data, sizes), mesh)
        return (start_models(start_plans(plan.host_rows), key_data_S, rows, data, splits_S, orders_S, sizes,
                             teachers_S), teachers_S)

    def epoch_program(states, e, key_data_S, rows, data, splits_S, orders_S, sizes, teachers_S):
        def one_seed(seeded, shared):
            (state, key_data, split, orders, teachers), (e, rows, data, sizes) = seeded, shared
            padding = None if sizes is None else Padding(orders, sizes)
            return seed_epoch(groups, state, jax.random.wrap_key_data(key_data), e, rows, data, split, recipe, teachers,
                              padding)

        return over_seeds(one_seed, (states, key_data_S, splits_S, orders_S, teachers_S), (e, rows, data, sizes),
                          mesh, seed_axis)

    args = (key_data_S, rows, sharding.place(datas[0], mesh, P()), splits_S, orders_S, sizes)
    phases = {"trace_s": 0.0, "lower_s": 0.0, "xla_s": 0.0}  # where the compile goes
    start = compile_phases(jax.jit(start_program, out_shardings=by_seed), args, phases)
    state_shapes, teacher_shapes = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=by_seed), start.out_info)  # traced once
    step = compile_phases(jax.jit(epoch_program, out_shardings=(by_seed, by_seed)),
                          (state_shapes, jnp.int32(0), *args, teacher_shapes), phases)
    compile_s = time.perf_counter() - t0  # both programs compiled (or loaded from the compilation cache)
    if on_compiled:
        on_compiled(compile_s)

    def train(states, rows, shared, teachers_S, models) -> dict:
        """Every epoch of the compiled step -> ``{method of round 1: FitOutput}`` (S x H, on the host)."""
        history = []
        for e in range(recipe.epochs):
            states, h = step(states, jnp.int32(e), key_data_S, rows, shared, splits_S, orders_S, sizes, teachers_S)
            history.append(jax.block_until_ready(h))
            plan.report(recipe.seeds * num_h * models)  # the padding copies are not counted
        history = jax.tree.map(lambda *per_epoch: jnp.stack(per_epoch, axis=-1), *history)
        per_group = {g: finish(states[g], history[g]) for g in groups}
        per_group = jax.tree.map(lambda a: a[: recipe.seeds], sharding.to_host(per_group))  # the padding trimmed
        return {m: o for g, grp in groups.items() for m, o in split_models(per_group[g], grp).items()}

    starts = {}  # a later round's start programs, by their plans (shared by rounds and datas with the same plans)
    done = []
    for data in datas:  # padded to the bucket, if any (the splits of next_teachers are the real ones)
        t1, later_compile_s = time.perf_counter(), 0.0
        shared = sharding.place(data, mesh, P())
        states, teachers_S = start(key_data_S, rows, shared, splits_S, orders_S, sizes)
        outputs = train(states, rows, shared, teachers_S, len(plan.first))
        first_S = jax.tree.map(lambda a: a[: recipe.seeds], teachers_S)
        for names in plan.later.values():
            round_host = round_rows(groups, plan.host_rows, names, num_h)
            round_targets = next_teachers(names, outputs, groups, plan.hps, data, splits, first_S, plan.teacher_J,
                                          plan.width)
            round_args = (key_data_S, sharding.place(round_host, mesh, P()), shared, splits_S, orders_S, sizes,
                          sharding.place(sharding.pad_seeds(round_targets, mesh.size), mesh, P("seeds")))
            plans = start_plans(round_host)
            plan_key = repr({g: (p[0].tolist(), p[1].tolist()) for g, p in plans.items()})
            if plan_key not in starts:
                tc = time.perf_counter()
                starts[plan_key] = jax.jit(functools.partial(start_models, plans), out_shardings=by_seed).lower(
                    *round_args).compile()
                later_compile_s += time.perf_counter() - tc
            by_base = train(starts[plan_key](*round_args), round_args[1], shared, round_args[-1], len(names))
            outputs.update({n: by_base[round_of(n)[0]] for n in names})
        run_s = time.perf_counter() - t1 - later_compile_s
        done.append(({m: outputs[m] for m in plan.methods},  # S x H, in the config's order
                     {"compile_s": (compile_s if not done else 0.0) + later_compile_s, "run_s": run_s,
                      "bucket_rows": None if sizes is None else int(data.labels_N.shape[0]),
                      **({} if done else {"compile_phases": phases})}))
    return done


def compile_phases(jitted, args, phases: dict):
    """``jitted`` compiled for ``args``, each phase's seconds added to ``phases``: tracing to a jaxpr (``trace_s``),
    lowering it to StableHLO (``lower_s``) and XLA's compilation (``xla_s``: its passes, autotuning on a GPU; a
    load from the persistent compilation cache when that holds the program)."""
    t0 = time.perf_counter()
    traced = jitted.trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    phases["trace_s"] += t1 - t0
    phases["lower_s"] += t2 - t1
    phases["xla_s"] += time.perf_counter() - t2
    return compiled


def model_by_model_fits(plan: Plan, datas, splits: SeedSplits, on_compiled) -> list[tuple[dict, dict]]:
    """:func:`fit_each` without vmap: :func:`make_fit` compiled per method (inside its first call, so the compile
    counts as run time) and called model by model on one device."""
    recipe, num_h = plan.recipe, len(plan.hps.lr)
    hps = jax.tree.map(jnp.asarray, plan.hps)
    splits = jax.tree.map(jnp.asarray, splits)
    t0 = time.perf_counter()
    compiled = {m: jax.jit(make_fit(m, plan.num_classes, plan.text_TxKxD, recipe)) for m in plan.first}
    targets = jax.jit(make_teachers, static_argnums=0)
    model_teacher_J = {m: plan.teacher_J[g][i * num_h:(i + 1) * num_h] for g, grp in plan.groups.items()
                       for i, m in enumerate(grp.methods)}
    compile_s = time.perf_counter() - t0

    def fit_seeds(f, data, teachers_S, teacher_H):
        """``f`` for every seed x grid point, stacked ``S x H``."""
        per_seed = []
        for s in range(recipe.seeds):
            split_s = jax.tree.map(lambda a: a[s], splits)
            per_hp = [f(plan.keys[s], jax.tree.map(lambda a: a[h], hps), data, split_s, teachers_S[s], teacher_H[h])
                      for h in range(num_h)]
            per_seed.append(jax.tree.map(lambda *xs: jnp.stack(xs), *per_hp))
        plan.report(recipe.seeds * num_h * recipe.epochs)
        return jax.block_until_ready(jax.tree.map(lambda *xs: jnp.stack(xs), *per_seed))

    done = []
    for data in datas:
        t1 = time.perf_counter()
        teachers = [targets(plan.specs, data, jax.tree.map(lambda a: a[s], splits)) for s in range(recipe.seeds)]
        outputs = {m: fit_seeds(f, data, teachers, model_teacher_J[m]) for m, f in compiled.items()}
        first_S = jax.tree.map(lambda *xs: jnp.stack(xs), *teachers)
        for names in plan.later.values():
            for n in names:  # each on its own targets: the weak labels, the reference, its previous round's student
                round_S = next_teachers((n,), outputs, plan.groups, hps, data, splits, first_S, plan.teacher_J, 3)
                outputs[n] = fit_seeds(compiled[round_of(n)[0]], data,
                                       [jax.tree.map(lambda a: a[s], round_S) for s in range(recipe.seeds)], [2] * num_h)
        done.append(({m: outputs[m] for m in plan.methods},
                     {"compile_s": compile_s if not done else 0.0, "run_s": time.perf_counter() - t1}))
    return done


def fit_plan(plan: Plan, datas, splits: SeedSplits, on_compiled=None) -> list[tuple[dict, dict]]:
    """Fit ``plan`` on each :class:`FitData` of ``datas`` by the same compiled programs (``plan.recipe.vmap``: the
    two vmapped programs, else model by model): ``[({method: FitOutput}, timings)]``, one per data."""
    check_same_shapes(datas)
    fit = vmapped_fits if plan.recipe.vmap else model_by_model_fits
    return fit(plan, datas, splits, on_compiled)
