"""The vmapped fit: agreement with the sequential run, end to end on a synthetic store, repeatability, errors."""
import dataclasses
import json
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli, heads
from w2s_jax import fit as fitlib
from w2s_jax.config import FitConfig, Hparams
from w2s_jax.methods import jax_methods, Method, METHODS
from w2s_jax.run import GridTooLargeError, run
from w2s_jax.splits import seed_splits, split_sizes, stacked_splits
from w2s_jax.store import read_store

FAST = dict(epochs=4, batch_size=64)


def test_splits_are_disjoint_deterministic_and_sized():
    a, b = seed_splits(100, 3), seed_splits(100, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert tuple(len(x) for x in a) == split_sizes(100) == (64, 16, 20)
    assert len(np.unique(np.concatenate(a))) == 100
    assert not np.array_equal(seed_splits(100, 4).test_prime, a.test_prime)
    with pytest.raises(ValueError, match="empty splits"):
        seed_splits(3, 0)


def test_vmap_equals_sequential(store_path):
    """For every seed and hparam, the vmapped program gives the sequential run's parameters and metrics."""
    methods = ("kd+lp", "cpl", "auxconf+proto", "adaptconf+lp", "ceiling+lp")
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    splits = stacked_splits(len(test.ids_N), 3)
    base = FitConfig(store=str(store_path), weak="noisy", methods=methods, seeds=3,
                     grid=(("lr", (1e-2, 3e-3)),), **FAST)
    vmapped, _ = fitlib.fit_methods(base, data, splits, store.text_TxKxD, store.num_classes)
    seq_cfg = FitConfig(**{**base.__dict__, "vmap": False})
    sequential, _ = fitlib.fit_methods(seq_cfg, data, splits, store.text_TxKxD, store.num_classes)
    for m in methods:
        for a, b in zip(jax.tree.leaves(vmapped[m]), jax.tree.leaves(sequential[m])):
            assert a.shape[:2] == (3, 2)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_seed_i_equals_single_run_with_key_i(store_path):
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("cpl",), seeds=2, **FAST)
    out, _ = fitlib.fit_methods(cfg, data, stacked_splits(len(test.ids_N), 2), store.text_TxKxD, store.num_classes)
    splits = stacked_splits(len(test.ids_N), 2)
    fit = jax.jit(fitlib.make_fit("cpl", store.num_classes, store.text_TxKxD,
                                  fitlib.recipe_of(cfg, splits.hold_train.shape[-1])))
    hp = jax.tree.map(lambda a: a[0], cfg.grid_hparams())
    single = fit(fitlib.seed_keys(0, 2)[1], hp, data, jax.tree.map(np.asarray, seed_splits(len(test.ids_N), 1)))
    np.testing.assert_allclose(out["cpl"].variables["params"]["prototypes_KxD"][1, 0],
                               single.variables["params"]["prototypes_KxD"], atol=1e-5)


def test_end_to_end_cli_beats_weak_and_ceiling_beats_w2s(store_path, tmp_path):
    out = tmp_path / "res"
    result = CliRunner().invoke(cli.main, ["--store", str(store_path), "--seeds", "3", "--epochs", "8",
                                           "--batch-size", "64", "--logit-scale", "10", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| cpl |" in result.output and "zero-shot" in result.output
    for name in ("config.json", "provenance.json", "splits.npz", "metrics.json", "metrics.csv", "history.npz",
                 "timings.json", "table.md"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics.json").read_text())
    weak = np.mean(summary["weak"]["test_acc"])
    for name, own_ceiling in (("cpl", "ceiling+proto"), ("kd+lp", "ceiling+lp"), ("ce+proto", "ceiling+proto")):
        w2s = np.mean(summary["methods"][name]["test_acc"])
        ceiling = np.mean(summary["methods"][own_ceiling]["test_acc"])
        assert weak < w2s < ceiling, (name, weak, w2s, ceiling)
        assert summary["pgr"][name]["ceiling"] == own_ceiling
    assert set(summary["methods"]) == set(jax_methods())
    history = np.load(out / "history.npz")
    assert history["cpl/test_acc"].shape == (3, 1, 8)
    # the folder alone rebuilds the table
    shown = CliRunner().invoke(cli.main, ["--show", str(out)])
    assert shown.output.strip() == (out / "table.md").read_text().strip()


def test_every_run_repeats_exactly(store_path, tmp_path):
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("cpl", "auxconf+lp"), seeds=2, **FAST)
    a, _ = run(cfg, tmp_path / "a")
    b, _ = run(cfg, tmp_path / "b")
    assert a["methods"] == b["methods"]


def test_grid_is_one_more_axis_and_selection_uses_hold_val(store_path, tmp_path):
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("cpl",), seeds=2,
                    grid=(("temperature", (1.0, 4.0)), ("logit_scale", (5.0, 20.0))), **FAST)
    summary, _ = run(cfg, tmp_path / "grid")
    m = summary["methods"]["cpl"]
    val = np.asarray(m["grid"]["val_score"])
    assert val.shape == (2, 4)
    assert m["grid_index"] == int(np.argmax(val.mean(0)))


def test_bad_input_gives_clear_errors(store_path, tmp_path):
    runner = CliRunner()
    r = runner.invoke(cli.main, ["--store", str(store_path), "--weak", "resnet99"])
    assert r.exit_code != 0 and "resnet99" in r.output and "w2s-extract" in r.output
    r = runner.invoke(cli.main, ["--store", str(store_path), "--methods", "cpl,magic"])
    assert r.exit_code != 0 and "magic" in r.output and "valid:" in r.output
    r = runner.invoke(cli.main, ["--store", str(store_path), "--methods", "kd+tp"])
    assert r.exit_code != 0 and "w2s-tp" in r.output
    tiny = tmp_path / "tiny.h5"
    synthetic_store(tiny, n_test=3)
    r = runner.invoke(cli.main, ["--store", str(tiny)])
    assert r.exit_code != 0 and "empty splits" in r.output
    r = runner.invoke(cli.main, ["--store", str(store_path), "--grid", "lr=1,2", "--grid", "bogus=1"])
    assert r.exit_code != 0 and "bogus" in r.output
    assert "Traceback" not in r.output


def test_grid_too_large_is_refused_before_compiling(store_path, monkeypatch, tmp_path):
    monkeypatch.setattr(fitlib, "available_bytes", lambda: 1000)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("cpl",), seeds=2)
    with pytest.raises(GridTooLargeError, match="GiB"):
        run(cfg, tmp_path / "unused")


def test_store_without_text_starts_prototypes_from_weak_centroids(tmp_path):
    path = tmp_path / "notext.h5"
    synthetic_store(path, text=False)
    cfg = FitConfig(store=str(path), weak="noisy", methods=("cpl", "ceiling+proto"), seeds=2,
                    hparams=Hparams(logit_scale=10.0), **FAST)
    summary, _ = run(cfg, tmp_path / "res")
    assert summary["zero_shot"] is None
    assert np.mean(summary["methods"]["cpl"]["test_acc"]) > np.mean(summary["weak"]["test_acc"])


def test_list_methods():
    r = CliRunner().invoke(cli.main, ["--list-methods"])
    assert r.exit_code == 0 and all(m in r.output for m, spec in METHODS.items() if spec.round == 1)
    assert "METHOD@round2, @round3, ... train METHOD" in r.output  # rounds: listed once, not per method
    torch_side = {line.split()[0] for line in r.output.splitlines() if "(PyTorch: w2s-tp)" in line}
    assert torch_side == {m for m, spec in METHODS.items() if spec.head in ("prompt", "text-encoder")}


def test_the_cli_keeps_compiled_programs_on_disk(store_path, tmp_path):
    """w2s-fit turns on JAX's persistent compilation cache (here in the tests' own folder, conftest.py)."""
    from w2s_jax import compile_cache

    folder = compile_cache.cache_folder()
    assert str(folder).startswith(tempfile.gettempdir())  # the tests never write the user's cache
    r = CliRunner().invoke(cli.main, ["--store", str(store_path), "--methods", "cpl", "--seeds", "1", "--epochs", "1",
                                      "--batch-size", "64", "--out", str(tmp_path / "res")])
    assert r.exit_code == 0, r.output
    assert folder.is_dir() and any(folder.iterdir())


class TanhHead(nn.Module):
    """A head that is not linear in r̂ (no ``linear_form``): the fused step must apply it model by model."""

    num_classes: int

    @nn.compact
    def __call__(self, feats_BxD, hp, start=None):
        return nn.Dense(self.num_classes)(jnp.tanh(hp.lp_scale * feats_BxD))


def every_method(store_path):
    """Every method, multi-weak (a second, noisier weak model) and a non-linear head included, 2 seeds x 2 lrs:
    (store, data, cfg, splits). Registers the head and its method (use with the ``registries`` fixture)."""
    heads.HEADS["tanh"] = heads.Head(TanhHead)
    METHODS["kd+tanh"] = Method("tanh", "kd", "weak")
    store = read_store(store_path)
    test = store.splits["test"]
    weak = test.weak_logits["noisy"]
    other = weak + np.random.default_rng(0).normal(size=weak.shape).astype(np.float32)
    data = fitlib.make_data(test.features_NxD, weak, test.labels_N, np.stack([weak, other]))
    cfg = FitConfig(store=str(store_path), weak="noisy", ensemble=("noisy", "other"), seeds=2,
                    methods=(*jax_methods(multi_weak=True), "kd+tanh"), grid=(("lr", (1e-2, 3e-3)),), **FAST)
    return store, data, cfg, stacked_splits(len(test.ids_N), 2)


def test_fused_step_equals_model_by_model(store_path, registries):
    """Every method (multi-weak and a non-linear head included), 2 seeds x 2 lrs: the fused step (one gather and one
    wide GEMM per seed) gives the parameters, best epochs and curves of the model-by-model step, to 1e-5."""
    store, data, cfg, splits = every_method(store_path)
    methods = cfg.methods
    fused, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    unfused, _ = fitlib.fit_methods(dataclasses.replace(cfg, fuse=False), data, splits, store.text_TxKxD,
                                    store.num_classes)
    for m in methods:
        np.testing.assert_array_equal(fused[m].best_epoch, unfused[m].best_epoch)
        for a, b in zip(jax.tree.leaves(fused[m]), jax.tree.leaves(unfused[m])):
            assert a.shape[:2] == (2, 2)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=m)


def test_fused_logits_of_a_seed_are_one_gemm_per_head(store_path):
    """Fused, the models of all methods x hparams of a seed that share a head take one product with the batch,
    J*K wide, whatever the number of methods; model by model, one batched product per head."""
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    methods = ("kd+lp", "ce+lp", "cpl", "ceiling+lp", "adaptconf+proto")
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=methods, seeds=1, grid=(("lr", (1e-2, 3e-3)),),
                    **FAST)
    groups = fitlib.make_groups(methods, store.num_classes, store.text_TxKxD)
    assert {g: grp.methods for g, grp in groups.items()} == {"linear": ("kd+lp", "ce+lp", "ceiling+lp"),
                                                              "prototype": ("cpl", "adaptconf+proto")}
    rows = {g: fitlib.group_rows(grp, cfg.grid_hparams()) for g, grp in groups.items()}
    splits = jax.tree.map(jnp.asarray, stacked_splits(len(test.ids_N), 1))
    keys = jax.random.key_data(fitlib.seed_keys(0, 1))
    teachers = jax.tree.map(lambda a: a[None], fitlib.plain_teachers(data))
    recipe = fitlib.recipe_of(cfg, splits.hold_train.shape[-1])
    variables = {g: jax.tree.map(lambda a: a[0], fitlib.start_seeds(grp, recipe, keys, rows[g], data, splits,
                                                                    teachers).variables)
                 for g, grp in groups.items()}
    batch = data.feats_NxD[:64]

    def dots(fuse):
        jaxpr = jax.make_jaxpr(lambda v: fitlib.heads_logits(groups, v, batch, rows, fuse))(variables)
        shapes = [e.outvars[0].aval.shape for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
        return sorted(shape for shape in shapes if 64 in shape)  # the products with the batch (not A·mu)

    k = store.num_classes
    assert dots(fuse=True) == [(64, 2 * 2 * k), (64, 3 * 2 * k)]
    assert len(dots(fuse=False)) == len(groups)
    got = fitlib.heads_logits(groups, variables, batch, rows, fuse=True)
    want = fitlib.heads_logits(groups, variables, batch, rows, fuse=False)
    for g, grp in groups.items():
        assert got[g].shape == (len(grp.methods) * 2, 64, k)
        np.testing.assert_allclose(got[g], want[g], rtol=1e-5, atol=1e-5)




def test_methods_as_data_keep_every_builtin_methods_numbers(store_path, registries):
    """Every method (multi-weak and a non-linear head included), 2 seeds x 2 lrs, against a snapshot of the fit
    before methods became rows of one loss family (commit e29a82a, where each method had its own loss code), made
    on this synthetic store by the script in tests/data/README.md. Trained parameters within 1e-5 (float32
    round-off; 2.4e-7 measured), best epochs and every accuracy curve identical. The loss curves too, except
    AuxConf's: the family reports its soft part as a KL, without the teacher's entropy (constant for the
    gradient), so its loss values differ by that constant."""
    import pathlib

    store, data, cfg, splits = every_method(store_path)  # the store the snapshot was made on (conftest's default)
    methods = cfg.methods
    out, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    before = np.load(pathlib.Path(__file__).parent / "data" / "fit_before_methods_as_data.npz")
    assert {key.split("|")[0] for key in before.files} == set(methods)
    for m, o in out.items():
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(o._asdict())[0]:
            where = jax.tree_util.keystr(keypath)
            if "score_" in where:  # the selection criteria's scores (issue 23) came later; "agreement" is the old one
                if "score_agreement" in where:
                    np.testing.assert_array_equal(np.asarray(leaf), before[f"{m}|['history']['val_score']"])
                continue
            want, got = before[f"{m}|{where}"], np.asarray(leaf)
            if "_acc" in where or "score" in where or "best_epoch" in where:
                np.testing.assert_array_equal(got, want, err_msg=f"{m} {where}")
            elif "loss" not in where or not m.startswith("auxconf"):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{m} {where}")


def test_seeds_mapped_and_vmapped_are_equal(store_path):
    """--seed-axis map (the CPU default) and vmap (the GPU default) give the same fit."""
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("kd+lp", "cpl", "ceiling+proto"), seeds=3,
                    grid=(("lr", (1e-2, 3e-3)),), seed_axis="map", **FAST)
    splits = stacked_splits(len(test.ids_N), 3)
    mapped, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    vmapped, _ = fitlib.fit_methods(dataclasses.replace(cfg, seed_axis="vmap"), data, splits, store.text_TxKxD,
                                    store.num_classes)
    for m in cfg.methods:
        np.testing.assert_array_equal(mapped[m].best_epoch, vmapped[m].best_epoch)
        for a, b in zip(jax.tree.leaves(mapped[m]), jax.tree.leaves(vmapped[m])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=m)


def test_bfloat16_gemm_inputs_change_little_and_need_the_fused_step(store_path, tmp_path):
    """--matmul-dtype bfloat16 rounds the fused GEMM's inputs (the parameters move) but keeps the accuracy; it is
    refused, with the fix named, where there is no fused GEMM to apply it to."""
    store = read_store(store_path)
    test = store.splits["test"]
    data = fitlib.make_data(test.features_NxD, test.weak_logits["noisy"], test.labels_N)
    splits = stacked_splits(len(test.ids_N), 2)
    cfg = FitConfig(store=str(store_path), weak="noisy", methods=("kd+lp", "cpl"), seeds=2, **FAST)
    f32, _ = fitlib.fit_methods(cfg, data, splits, store.text_TxKxD, store.num_classes)
    bf16, _ = fitlib.fit_methods(dataclasses.replace(cfg, matmul_dtype="bfloat16"), data, splits, store.text_TxKxD,
                                 store.num_classes)
    for m in cfg.methods:
        a, b = jax.tree.leaves(f32[m].variables["params"]), jax.tree.leaves(bf16[m].variables["params"])
        assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) > 1e-4  # bf16 was used
        np.testing.assert_allclose(bf16[m].history["test_acc"], f32[m].history["test_acc"], atol=0.05)
    r = CliRunner().invoke(cli.main, ["--store", str(store_path), "--matmul-dtype", "bfloat16", "--no-fuse",
                                      "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and "drop --no-fuse" in r.output and "Traceback" not in r.output
