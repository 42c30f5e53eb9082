"""The shared-prefix text tower (extract/prefix.py): each TP model's [SOS][context] run once for its K prompts gives
the cut path's text features and gradients within float32 round-off, for prompt banks and the text-encoder bank."""
import copy
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from extract.prompt import PromptBank, TextEncoderBank
from test_prompt import make_clip_store

NAMES = ("cat", "hot air balloon", "zebra", "the great wall of china", "a", "sea lion", "x ray machine of many parts")


@pytest.fixture(scope="module")
def deep_tower(tmp_path_factory):
    """A random 3-layer open_clip text tower with layer scale, and its tokenizer."""
    import open_clip

    config = {"embed_dim": 24, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 48, "heads": 4, "layers": 3,
                           "ls_init_value": 0.5}}
    path = tmp_path_factory.mktemp("deep") / "w2s-deep-prefix.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    model = open_clip.create_model("w2s-deep-prefix", pretrained=None).eval()
    model.visual = None
    return model, open_clip.get_tokenizer("w2s-deep-prefix")


def features_and_grads(bank):
    """``(text J x K x D, the gradient of a fixed function of it w.r.t. every parameter the bank trains)``."""
    params = [p for group in bank.param_groups([1e-3] * 8) for p in group["params"]]
    text = bank()
    weights = torch.linspace(-1, 1, text.numel()).reshape(text.shape)
    grads = torch.autograd.grad((text * weights).sum(), params)
    return text.detach(), grads


def assert_same(a, b, rtol):
    scale = max(a.abs().max().item(), 1e-6)
    assert (a - b).abs().max().item() <= rtol * scale, ((a - b).abs().max().item(), scale)


@pytest.mark.parametrize("kind", ["random", "ctx_init"])
def test_prompt_bank_shared_equals_cut(deep_tower, kind):
    model, tok = deep_tower
    kw = {"ctx_init": "a photo of a"} if kind == "ctx_init" else {"n_ctx": 5}
    shared = PromptBank(model, tok, NAMES, [0, 1, 2], **kw)
    cut = PromptBank(model, tok, NAMES, [0, 1, 2], prefix="none", **kw)
    assert shared.shared and not cut.shared and "prefix run once" in shared.cut_note
    text_s, grads_s = features_and_grads(shared)
    text_c, grads_c = features_and_grads(cut)
    assert text_s.shape == (3, len(NAMES), 24)
    assert_same(text_s, text_c, 2e-6)  # float32 round-off
    for g_s, g_c in zip(grads_s, grads_c):
        assert_same(g_s, g_c, 2e-5)
    if kind == "random":
        assert not torch.allclose(text_s[0], text_s[1])  # different contexts, different prompts


def test_prompt_bank_shared_equals_cut_under_bf16_autocast(deep_tower):
    model, tok = deep_tower
    banks = [PromptBank(model, tok, NAMES, [0, 1], n_ctx=4, prefix=p) for p in ("shared", "none")]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (text_s, _), (text_c, _) = (features_and_grads(b) for b in banks)
    full = PromptBank(model, tok, NAMES, [0, 1], n_ctx=4, prefix="none")
    exact, _ = features_and_grads(full)
    assert_same(text_s.float(), exact, 5e-2)  # bf16 rounding, both paths alike
    assert (text_s.float() - exact).abs().max() <= 2 * (text_c.float() - exact).abs().max() + 1e-2


def test_text_encoder_bank_shared_equals_cut(deep_tower):
    model, tok = deep_tower
    shared = TextEncoderBank(copy.deepcopy(model), tok, NAMES)
    cut = TextEncoderBank(copy.deepcopy(model), tok, NAMES, prefix="none")
    assert shared.shared and shared.prefix_len == 5  # [SOS] a photo of a
    text_s, grads_s = features_and_grads(shared)
    text_c, grads_c = features_and_grads(cut)
    assert_same(text_s, text_c, 2e-6)
    for g_s, g_c in zip(grads_s, grads_c):
        assert_same(g_s, g_c, 2e-5)


def test_a_tower_without_a_causal_mask_runs_whole_and_says_why(deep_tower):
    model, tok = deep_tower
    open_tower = copy.deepcopy(model)
    open_tower.attn_mask = None
    bank = PromptBank(open_tower, tok, NAMES, [0], n_ctx=4)
    assert not bank.shared and "no causal mask" in bank.cut_note


def test_one_tp_fit_trained_both_ways_keeps_the_same_epochs_and_accuracies(tiny_clip, tmp_path):
    from extract import tp_cli

    store = make_clip_store(tiny_clip, tmp_path / "clip.h5", 150)
    outs = {}
    for prefix in ("shared", "none"):
        r = CliRunner().invoke(tp_cli.main, ["--store", str(store), "--strong", tiny_clip, "--seeds", "2", "--epochs",
                                             "3", "--batch-size", "32", "--n-ctx", "4", "--device", "cpu",
                                             "--methods", "kd+tp,ceiling+tp,cpl+textenc", "--prefix", prefix,
                                             "--out", str(tmp_path / prefix)])
        assert r.exit_code == 0, r.output
        assert ("prefix run once" in r.output) == (prefix == "shared"), r.output
        outs[prefix] = json.loads((tmp_path / prefix / "metrics.json").read_text())["methods"]
    for method, shared in outs["shared"].items():
        cut = outs["none"][method]
        assert shared["best_epoch"] == cut["best_epoch"], method
        np.testing.assert_allclose(shared["test_acc"], cut["test_acc"], atol=1e-6, err_msg=method)
