"""Prompt tuning (TP) in torch: the loss family shared with JAX, cut prompts, many models in one step, split
parity, results that merge."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner

import w2s_jax
from conftest import synthetic_store
from extract import encoders, tp_cli, tp_fit
from extract.losses_torch import family_loss, rows_to_torch
from extract.prompt import PromptBank, TextEncoderBank, TPConfig, encode_token_embeddings
from w2s_jax import cli as fit_cli
from w2s_jax import losses as losses_jax
from w2s_jax.config import Hparams
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store

HP = Hparams(temperature=2.0, alpha_max=0.5, aux_warmup=0.2, tau_a=0.7)


@pytest.mark.parametrize("progress", [0.1, 0.9])
def test_torch_family_equals_jax_family_values_and_gradients(progress):
    """One torch function reads the JAX rows: every built-in row and a mixed one, J models at once, each at its own
    hyperparameters; values and the gradient w.r.t. the student's logits match ``family_loss`` per model."""
    rows = [*losses_jax.LOSSES.values(), losses_jax.Coeffs(weak_soft=0.3, weak_hard=0.3, self_hard=0.4,
                                                           schedule=0.5, adaptive=0.2)]
    hps = [HP._replace(temperature=1.0 + j / 3, tau_a=0.5 + j / 5) for j in range(len(rows))]
    rng = np.random.default_rng(3)
    zs, zw = (rng.normal(size=(len(rows), 9, 6)).astype(np.float32) * 3 for _ in range(2))
    labels = rng.integers(0, 6, (len(rows), 9))
    student = torch.tensor(zs, requires_grad=True)
    got = family_loss(student, torch.tensor(zw), torch.tensor(labels), rows_to_torch(rows, "cpu"),
                      progress=progress, hp=rows_to_torch(hps, "cpu"))
    got.sum().backward()
    for j, (row, hp) in enumerate(zip(rows, hps)):
        def jax_loss(z):
            return losses_jax.family_loss(z, jnp.asarray(zw[j]), jnp.asarray(labels[j]), row, progress=progress, hp=hp)

        np.testing.assert_allclose(got[j].detach().numpy(), np.asarray(jax_loss(jnp.asarray(zs[j]))),
                                   rtol=1e-5, atol=1e-5)
        want_grad = jax.grad(lambda z: jnp.sum(jax_loss(z)))(jnp.asarray(zs[j]))
        np.testing.assert_allclose(student.grad[j].numpy(), np.asarray(want_grad), rtol=1e-4, atol=1e-5)


def test_an_unused_soft_part_cannot_poison_a_row():
    """CE's row weighs the soft part 0: at a temperature that makes KL NaN, the loss stays CE's (JAX and torch)."""
    zs, zw = np.random.default_rng(0).normal(size=(2, 4, 3)).astype(np.float32)
    hp = Hparams(temperature=1e-30)
    want = losses_jax.family_loss(jnp.asarray(zs), jnp.asarray(zw), jnp.zeros(4, jnp.int32), losses_jax.LOSSES["ce"],
                                  progress=0.5, hp=Hparams())
    got_jax = losses_jax.family_loss(jnp.asarray(zs), jnp.asarray(zw), jnp.zeros(4, jnp.int32),
                                     losses_jax.LOSSES["ce"], progress=0.5, hp=hp)
    got_torch = family_loss(torch.tensor(zs)[None], torch.tensor(zw)[None], torch.zeros(1, 4, dtype=torch.long),
                            rows_to_torch([losses_jax.LOSSES["ce"]], "cpu"), progress=0.5, hp=rows_to_torch([hp], "cpu"))
    np.testing.assert_allclose(np.asarray(got_jax), np.asarray(want), rtol=1e-6)
    np.testing.assert_allclose(got_torch[0].numpy(), np.asarray(want), rtol=1e-5)


NAMES = ("cat", "hot_air_balloon", "aircraft carrier", "the eiffel tower", "see saw")


@pytest.mark.parametrize("ctx_init", ["", "a photo of a"])
def test_cut_prompts_equal_full_prompts(tiny_clip, ctx_init):
    """The tower run up to the last EOT gives the full 77-token features (float32 round-off), for random and
    phrase-initialised contexts, several models at once."""
    enc = encoders.load_strong(tiny_clip)
    bank = PromptBank(enc.model, enc.tokenizer, NAMES, [0, 1, 2], n_ctx=4, ctx_init=ctx_init)
    assert bank.length < 20 and "cut at their last EOT" in bank.cut_note
    with torch.no_grad():
        cut = bank()
        tokens = enc.tokenizer([f"X X X X {n.replace('_', ' ')}." for n in NAMES])  # "a photo of a" is 4 tokens
        embeds = enc.model.token_embedding(tokens)
        for j, ctx in enumerate(bank.contexts):
            embeds[:, 1:1 + ctx.shape[0]] = ctx
            full = encode_token_embeddings(enc.model, embeds, bank.positions_K)
            np.testing.assert_allclose(cut[j].numpy(), full.numpy(), rtol=1e-5, atol=1e-5)
    assert cut.shape == (3, len(NAMES), 32)


def test_prompt_bank_initialised_from_a_phrase_equals_the_text_encoder(tiny_clip):
    enc = encoders.load_strong(tiny_clip)
    names = ("cat", "hot_air_balloon")
    bank = PromptBank(enc.model, enc.tokenizer, names, [0], ctx_init="a photo of a")
    ablation = TextEncoderBank(enc.model, enc.tokenizer, names)
    with torch.no_grad():
        want = enc.encode_text(["a photo of a cat.", "a photo of a hot air balloon."]).numpy()
        np.testing.assert_allclose(bank()[0].numpy(), want, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ablation()[0].numpy(), want, rtol=1e-4, atol=1e-5)
    random_ctx = PromptBank(enc.model, enc.tokenizer, names, [0, 1], n_ctx=16)
    assert random_ctx.contexts[0].shape == (16, 32) and abs(float(random_ctx.contexts[0].detach().std()) - 0.02) < 0.005
    assert not torch.equal(random_ctx.contexts[0], random_ctx.contexts[1])  # seeds differ


def make_clip_store(tiny_clip, path, n_test: int, more_weak=()):
    """A synthetic store whose provenance names the tiny CLIP, with that model's real text embeddings."""
    enc = encoders.load_strong(tiny_clip)
    names = tuple(f"class {i}" for i in range(3))
    with torch.no_grad():
        text = encoders.text_embeddings(enc, names, ("a photo of a {}.",)).numpy()
    synthetic_store(path, n_test=n_test, d=32, k=3, encoder=enc.id, text_TxKxD=text, more_weak=more_weak)
    return path


@pytest.fixture
def clip_store(tiny_clip, tmp_path):
    return make_clip_store(tiny_clip, tmp_path / "clip.h5", 150)


def test_tp_end_to_end_merges_with_w2s_fit(clip_store, tiny_clip, tmp_path):
    tp_out, fit_out = tmp_path / "tp", tmp_path / "fit"
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--seeds", "2",
                                         "--epochs", "2", "--batch-size", "32", "--n-ctx", "4", "--device", "cpu",
                                         "--methods", "kd+tp,ceiling+tp,cpl+textenc", "--out", str(tp_out)])
    assert r.exit_code == 0, r.output
    assert "| kd+tp |" in r.output and "| cpl+textenc |" in r.output
    # identical split indices to w2s-fit's
    saved = np.load(tp_out / "splits.npz")
    for field, want in stacked_splits(150, 2)._asdict().items():
        np.testing.assert_array_equal(saved[field], want)
    assert np.load(tp_out / "history.npz")["kd+tp/test_acc"].shape == (2, 1, 2)
    # the TP heads are saved in their applied form, prototypes, and give the reported test' accuracy
    test = read_store(clip_store).splits["test"]
    reported = json.loads((tp_out / "metrics.json").read_text())["methods"]
    for name, head in w2s_jax.load_heads(tp_out).items():
        assert head.head == "prototype" and head.prototypes(1).shape == (3, 32)
        rows = saved["test_prime"][1]
        acc = np.mean(head.logits(test.features_NxD[rows], seed=1).argmax(1) == test.labels_N[rows])
        assert acc == pytest.approx(reported[name]["test_acc"][1], abs=1e-6), name
    r = CliRunner().invoke(fit_cli.main, ["--store", str(clip_store), "--seeds", "2", "--epochs", "2",
                                          "--methods", "cpl,ceiling+lp", "--out", str(fit_out)])
    assert r.exit_code == 0, r.output
    merged = CliRunner().invoke(fit_cli.main, ["--show", str(fit_out), "--show", str(tp_out)])
    assert merged.exit_code == 0
    for row in ("| weak |", "| zero-shot |", "| kd+tp |", "| cpl |", "| cpl+textenc |", "| ceiling+tp |"):
        assert row in merged.output


def test_bf16_text_tower_keeps_the_accuracy(tiny_clip, tmp_path):
    """--precision bf16 runs the text tower under bfloat16 autocast (here on the CPU; on CUDA it is the default):
    the learned context stays float32, the prototypes move by bf16 rounding, and the test' accuracy, averaged over
    3 seeds of 120 test' rows, stays within 5 points of fp32 (the tolerance). Measured: kd+tp -3.1 points, ceiling+tp
    +1.1: the random tiny model's class prompts are nearly alike, so bf16 rounding flips near-tied rows."""
    clip_store = make_clip_store(tiny_clip, tmp_path / "clip.h5", 600)
    runs = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--seeds", "3",
                                             "--epochs", "2", "--batch-size", "64", "--n-ctx", "4", "--device", "cpu",
                                             "--methods", "kd+tp,ceiling+tp", "--precision", precision,
                                             "--out", str(out)])
        assert r.exit_code == 0, r.output
        assert json.loads((out / "config.json").read_text())["precision"] == precision
        runs[precision] = json.loads((out / "metrics.json").read_text())["methods"]
        runs[precision + "-protos"] = w2s_jax.load_heads(out)["kd+tp"].prototypes(0)
    assert np.abs(runs["bf16-protos"] - runs["fp32-protos"]).max() > 1e-6  # bf16 was used
    for method in ("kd+tp", "ceiling+tp"):
        gap = np.mean(runs["bf16"][method]["test_acc"]) - np.mean(runs["fp32"][method]["test_acc"])
        assert abs(gap) <= 0.05, (method, gap)
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--precision", "fp16"])
    assert r.exit_code != 0 and "fp32" in r.output and "Traceback" not in r.output


def test_tp_on_an_image_only_store_says_why(tmp_path, tiny_clip):
    path = tmp_path / "demo.h5"
    synthetic_store(path, text=False, encoder="efficientnet-lite0@96")
    r = CliRunner().invoke(tp_cli.main, ["--store", str(path), "--strong", tiny_clip, "--seeds", "1"])
    assert r.exit_code != 0 and "needs an open_clip CLIP model with a text tower" in r.output
    assert "Traceback" not in r.output


def test_tp_refuses_another_encoder(clip_store):
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", "ViT-B-32:openai", "--seeds", "1"])
    assert r.exit_code != 0 and "store was built with" in r.output


def test_tp_trains_on_refined_weak_labels(clip_store, tiny_clip, tmp_path):
    """ce+tp@knn and ce+tp@filter (issue 23): the refinements reach w2s-tp as w2s-fit computes them (the seed's targets
    of w2s_jax.fit.make_teachers), named, saved and reported like w2s-fit's; a filter's rows weigh 0."""
    out = tmp_path / "tp"
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--seeds", "2",
                                         "--epochs", "2", "--batch-size", "32", "--n-ctx", "4", "--device", "cpu",
                                         "--methods", "ce+tp", "--refine", "knn,filter", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| ce+tp@knn |" in r.output and "| ce+tp@filter |" in r.output
    test = read_store(clip_store).splits["test"]
    splits = stacked_splits(150, 2)
    cfg = TPConfig(store=str(clip_store), strong=tiny_clip, weak="noisy", methods=("ce+tp", "ce+tp@knn", "ce+tp@filter"),
                   seeds=2)
    targets = tp_fit.make_targets(cfg, cfg.methods, ("noisy",), test.weak_logits, test.features_NxD, test.labels_N,
                                  splits)
    weak = test.weak_logits["noisy"]
    knn = targets.teachers[0, "noisy"].logits_UxNxK[targets.index["ce+tp@knn", 0]]
    train, prime = splits.hold_train[0], splits.test_prime[0]
    assert not np.array_equal(knn.argmax(1)[train], weak.argmax(1)[train])
    np.testing.assert_array_equal(knn[prime], weak[prime])
    kept = targets.teachers[0, "noisy"].weight_UxN[targets.index["ce+tp@filter", 0]]
    assert 0 < kept[train].sum() < len(train) and kept[prime].all()
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--methods",
                                         "ceiling+tp@knn"])
    assert r.exit_code != 0 and "ceilings and the multi-weak methods are not refined" in r.output


def test_one_step_for_many_models_equals_one_model_at_a_time(clip_store, tiny_clip):
    """J models (methods x grid x seeds) trained in one step against each trained alone, float32 on the CPU, same
    seeds: text features within 1e-4 (float32 round-off through a few Adam steps), every history within 1e-4, the
    same kept epochs."""
    enc = encoders.load_strong(tiny_clip)
    test = read_store(clip_store).splits["test"]
    splits = stacked_splits(150, 2)
    cfg = TPConfig(store=str(clip_store), strong=tiny_clip, weak="noisy", methods=("kd+tp", "auxconf+tp", "ceiling+tp"),
                   seeds=2, epochs=2, batch_size=32, n_ctx=4, grid=(("lr", (1e-2, 3e-3)),))
    hps = cfg.grid_hparams()
    targets = tp_fit.make_targets(cfg, cfg.methods, ("noisy",), test.weak_logits, test.features_NxD, test.labels_N,
                                  splits)
    models = tp_fit.plan_models(cfg.methods, ("noisy",), cfg.seeds, 2)
    assert len(models) == 12
    bank = lambda chunk: PromptBank(enc.model, enc.tokenizer, read_store(clip_store).provenance.class_names,  # noqa
                                    [m.seed for m in chunk], n_ctx=4)
    train = lambda chunk: tp_fit.train_chunk(bank(chunk), chunk, targets, test.features_NxD, test.labels_N,  # noqa
                                             splits, cfg, hps)
    together = train(models)
    for model, joint in zip(models, together):
        (alone,) = train([model])
        np.testing.assert_allclose(joint.text_KxD, alone.text_KxD, rtol=1e-4, atol=1e-4)
        assert joint.best_epoch == alone.best_epoch
        for field, curve in alone.history.items():
            np.testing.assert_allclose(joint.history[field], curve, rtol=1e-4, atol=1e-4, err_msg=field)
    assert len({o.text_KxD.tobytes() for o in together}) == len(models)  # every model learned its own prompts


def test_memory_refusal_comes_before_any_work(clip_store, tiny_clip, tmp_path):
    out = tmp_path / "tp"
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--seeds", "1",
                                         "--device", "cpu", "--memory-gib", "0.00001", "--out", str(out)])
    assert r.exit_code != 0 and "one prompt-tuning model needs about" in r.output and "GiB are available" in r.output
    assert "Traceback" not in r.output and "prompt tuning" not in r.output.split("Error")[0]
    assert not out.exists() or not any(out.iterdir())


PROMPT_PLUGIN = """
from w2s_jax.methods import define_method

define_method("half+tp", "prompt", weak_soft=0.5, weak_hard=0.5)
"""


def test_every_weak_model_in_one_loop_with_a_grid_a_user_method_and_regret(tiny_clip, tmp_path, registries):
    """w2s-tp --weak A,B --methods all: one loop, one folder per weak model, ceiling+tp fitted once per seed and
    reported in both, a user method with a prompt head, the grid, PGR and the regret table."""
    store = make_clip_store(tiny_clip, tmp_path / "clip.h5", 150, more_weak=(("noisier", 2.5),))
    plugin = tmp_path / "prompt_methods.py"
    plugin.write_text(PROMPT_PLUGIN)
    r = CliRunner().invoke(tp_cli.main, ["--store", str(store), "--strong", tiny_clip, "--weak", "noisy,noisier",
                                         "--methods", "all", "--import", str(plugin), "--grid", "lr=0.01,0.003",
                                         "--seeds", "2", "--epochs", "2", "--batch-size", "32", "--n-ctx", "4",
                                         "--device", "cpu", "--models-per-step", "8", "--out", str(tmp_path / "tp")])
    assert r.exit_code == 0, r.output
    assert "44 prompt models in 6 step(s) of up to 8" in r.output  # (5 methods x 2 weak + ceiling) x 2 lr x 2 seeds
    assert "prompts cut at their last EOT" in r.output and "model-epoch" not in r.output.split("## weak")[1]
    folders = {w: tmp_path / "tp" / w for w in ("noisy", "noisier")}
    summaries = {w: json.loads((f / "metrics.json").read_text()) for w, f in folders.items()}
    for w, summary in summaries.items():
        assert json.loads((folders[w] / "config.json").read_text())["weak"] == w
        assert {"half+tp", "kd+tp", "ceiling+tp", "cpl+textenc"} <= set(summary["methods"])
        assert set(summary["selection"]["methods"]) >= {"half+tp", "kd+tp", "ceiling+tp"}
        assert np.shape(summary["methods"]["kd+tp"]["grid"]["test_acc"]) == (2, 2)
        table = (folders[w] / "table.md").read_text()
        assert "| half+tp |" in table and "regret" in table
    ceiling = [s["methods"]["ceiling+tp"]["test_acc"] for s in summaries.values()]
    assert ceiling[0] == ceiling[1]  # fitted once per seed, reported for each weak model
    heads = {w: w2s_jax.load_heads(f) for w, f in folders.items()}
    assert not np.allclose(heads["noisy"]["kd+tp"].prototypes(0), heads["noisier"]["kd+tp"].prototypes(0))
    np.testing.assert_array_equal(heads["noisy"]["ceiling+tp"].prototypes(0),
                                  heads["noisier"]["ceiling+tp"].prototypes(0))
    assert heads["noisier"]["half+tp"].prototypes(0).shape == (3, 32)
