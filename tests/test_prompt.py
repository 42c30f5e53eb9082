"""Prompt tuning (TP) in torch: loss parity with JAX, the prompt learner, split parity, results that merge."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from conftest import synthetic_store
from extract import encoders, losses_torch, tp_cli
from extract.prompt import PromptLearner
from w2s_jax import cli as fit_cli
from w2s_jax import losses as losses_jax
from w2s_jax.config import Hparams
from w2s_jax.splits import stacked_splits

HP = Hparams(temperature=2.0, alpha_max=0.5, aux_warmup=0.2, tau_a=0.7)


@pytest.mark.parametrize("name", sorted(losses_torch.LOSSES))
@pytest.mark.parametrize("progress", [0.1, 0.9])
def test_torch_loss_equals_jax_loss(name, progress):
    assert set(losses_torch.LOSSES) == set(losses_jax.LOSSES)
    rng = np.random.default_rng(3)
    zs, zw = (rng.normal(size=(9, 6)).astype(np.float32) * 3 for _ in range(2))
    got = losses_torch.LOSSES[name](torch.tensor(zs), torch.tensor(zw), progress=progress, hp=HP).numpy()
    labels = jnp.argmax(jnp.asarray(zw), 1)  # torch's ceiling reads the truth as a one-hot teacher
    want = np.asarray(losses_jax.family_loss(jnp.asarray(zs), jnp.asarray(zw), labels,
                                             losses_jax.LOSSES[name], progress=progress, hp=HP))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_learner_initialised_from_a_phrase_equals_the_text_encoder(tiny_clip):
    enc = encoders.load_strong(tiny_clip)
    names = ("cat", "hot_air_balloon")
    learner = PromptLearner(enc.model, enc.tokenizer, names, ctx_init="a photo of a")
    with torch.no_grad():
        np.testing.assert_allclose(learner().numpy(),
                                   enc.encode_text(["a photo of a cat.", "a photo of a hot air balloon."]).numpy(),
                                   rtol=1e-4, atol=1e-5)
    random_ctx = PromptLearner(enc.model, enc.tokenizer, names, n_ctx=16, seed=0)
    assert random_ctx.ctx_MxW.shape == (16, 32) and abs(float(random_ctx.ctx_MxW.detach().std()) - 0.02) < 0.005


def make_clip_store(tiny_clip, path, n_test: int):
    """A synthetic store whose provenance names the tiny CLIP, with that model's real text embeddings."""
    enc = encoders.load_strong(tiny_clip)
    names = tuple(f"class {i}" for i in range(3))
    with torch.no_grad():
        text = encoders.text_embeddings(enc, names, ("a photo of a {}.",)).numpy()
    synthetic_store(path, n_test=n_test, d=32, k=3, encoder=enc.id, text_TxKxD=text)
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
    import json

    import w2s_jax
    from w2s_jax.store import read_store

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
        import json

        assert json.loads((out / "config.json").read_text())["precision"] == precision
        runs[precision] = json.loads((out / "metrics.json").read_text())["methods"]
        import w2s_jax

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
    """ce+tp@knn and ce+tp@filter (issue 23): the refinements reach w2s-tp, named, saved and reported like w2s-fit's;
    the kNN vote changes what the prompts learn, and a filter trains on fewer rows."""
    out = tmp_path / "tp"
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--seeds", "2",
                                         "--epochs", "2", "--batch-size", "32", "--n-ctx", "4", "--device", "cpu",
                                         "--methods", "ce+tp,ce+tp@knn,ce+tp@filter", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "| ce+tp@knn |" in r.output and "| ce+tp@filter |" in r.output
    from w2s_jax.store import read_store

    test = read_store(clip_store).splits["test"]
    split = tp_cli.seed_splits(150, 0)
    cfg = tp_cli.TPConfig(store=str(clip_store), strong=tiny_clip, weak="noisy", methods=("ce+tp@knn",))
    weak, same = tp_cli.refined_target("ce+tp@knn", test, cfg, split)
    assert not np.array_equal(weak.argmax(1)[split.hold_train], test.weak_logits["noisy"].argmax(1)[split.hold_train])
    np.testing.assert_array_equal(weak[split.test_prime], test.weak_logits["noisy"][split.test_prime])
    _, kept = tp_cli.refined_target("ce+tp@filter", test, cfg, split)
    assert len(kept.hold_train) < len(split.hold_train) and len(kept.test_prime) == len(split.test_prime)
    r = CliRunner().invoke(tp_cli.main, ["--store", str(clip_store), "--strong", tiny_clip, "--methods",
                                         "ceiling+tp@knn"])
    assert r.exit_code != 0 and "unknown method(s) ['ceiling+tp@knn']" in r.output
