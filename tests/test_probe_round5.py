"""The fifth adversarial probe's findings (issue 44, ``shared/probes/2026-12-04.md``), grouped by feature. Each case
failed before its fix (a stale or failed result used as if it were good, a wrong number, or a traceback) and must
now give the right result or a clear error that names the problem and the fix."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import fit_two_domains, synthetic_store
from extract import predict_cli
from w2s_jax import cli as fit_cli
from w2s_jax import report
from w2s_jax.saved_heads import load_heads


def fit(store, out, *extra, methods="cpl,kd+lp,ceiling+lp", seeds=2, epochs=2):
    return CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", methods, "--seeds", str(seeds),
                                             "--epochs", str(epochs), "--batch-size", "64", "--out", str(out),
                                             *map(str, extra)])


def clean(r, *words):
    """A refusal: non-zero exit, a message, no traceback; the message holds ``words``."""
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and isinstance(r.exception, (SystemExit, type(None))), repr(r.exception)
    for word in words:
        assert word in r.output, (word, r.output)


# ---------------------------------------------------------------- a failed model carries its flag (H1)


@pytest.fixture(scope="module")
def failed_fits(tmp_path_factory):
    """Two domains' fits with lr 1e30: kd+lp and ceiling+lp fail (non-finite loss), cpl trains."""
    folder = tmp_path_factory.mktemp("failed")
    fits = fit_two_domains(folder, "--lr", "1e30")
    summary = json.loads((fits[0] / "metrics.json").read_text())
    assert summary["methods"]["kd+lp"]["failed"] and summary["methods"]["ceiling+lp"]["failed"]
    assert not summary["methods"]["cpl"]["failed"]
    return folder, fits


def test_saved_heads_carry_the_failed_flag(failed_fits):
    _, (res, _) = failed_fits
    heads = load_heads(res)
    assert heads["kd+lp"].failed() and heads["ceiling+lp"].failed() and not heads["cpl"].failed()
    assert np.asarray(heads["kd+lp"].failed_SxH).shape == (2, 1)


def test_predict_refuses_a_failed_head_and_names_it(failed_fits, tmp_path):
    folder, (res, _) = failed_fits
    r = CliRunner().invoke(predict_cli.main, ["--results", str(res), "--store", str(folder / "clusters.h5"),
                                              "--method", "kd+lp", "--out", str(tmp_path / "p.npz")])
    clean(r, "kd+lp failed", "non-finite")
    assert not (tmp_path / "p.npz").exists()
    r = CliRunner().invoke(predict_cli.main, ["--results", str(res), "--store", str(folder / "clusters.h5"),
                                              "--method", "cpl", "--out", str(tmp_path / "p.npz")])
    assert r.exit_code == 0, r.output


def test_predict_refuses_a_failed_grid_point_and_keeps_the_trained_one(tmp_path):
    synthetic_store(tmp_path / "s.h5")
    r = fit(tmp_path / "s.h5", tmp_path / "res", "--grid", "lr=1e-2,1e30", methods="kd+lp")
    assert r.exit_code == 0, r.output
    head = load_heads(tmp_path / "res")["kd+lp"]
    assert head.selected == 0 and not head.failed() and head.failed(grid_index=1)
    args = ["--results", str(tmp_path / "res"), "--store", str(tmp_path / "s.h5"), "--method", "kd+lp"]
    clean(CliRunner().invoke(predict_cli.main, [*args, "--grid-index", "1", "--out", str(tmp_path / "p.csv")]),
          "grid point 1", "--grid-index (0 trained)")
    r = CliRunner().invoke(predict_cli.main, [*args, "--out", str(tmp_path / "p.csv")])
    assert r.exit_code == 0 and "the fit reported" in r.output, r.output


def test_a_folder_without_the_flag_takes_the_tables_word(failed_fits, tmp_path):
    import shutil

    _, (res, _) = failed_fits
    old = shutil.copytree(res, tmp_path / "old")
    index = json.loads((old / "heads" / "heads.json").read_text())
    for entry in index["methods"].values():
        del entry["failed"]  # as written before heads.json recorded it
    (old / "heads" / "heads.json").write_text(json.dumps(index))
    heads = load_heads(old)
    assert heads["kd+lp"].failed() and not heads["cpl"].failed()


def test_cross_domain_marks_failed_rows_with_no_pgr(failed_fits, tmp_path):
    _, fits = failed_fits
    report.write_report(fits, tmp_path / "rep", curves=(), cross_domain=True)
    lines = (tmp_path / "rep" / "cross-domain-noisy.md").read_text().splitlines()
    rows = {(cells[1].strip(), cells[2].strip()): cells for cells in (line.split("|") for line in lines)
            if len(cells) > 3}
    for method in ("kd+lp", "ceiling+lp"):
        for source in ("synthetic/clusters", "synthetic/shifted"):
            cells = [c.strip() for c in rows[method, source][3:5]]
            assert cells == ["failed: non-finite training loss"] * 2, rows[method, source]
    assert "PGR" not in "".join(rows["kd+lp", "synthetic/clusters"])
    assert "±" in rows["cpl", "synthetic/clusters"][3]  # the healthy row keeps its numbers


# ---------------------------------------------------------------- anything reused is what was asked (H2, H3, M6)


def extract(*args):
    from extract import cli

    return CliRunner().invoke(cli.main, ["--num-workers", "0", "--batch-size", "4", *map(str, args)])


def test_an_edited_template_encodes_the_text_again(imagefolder_root, tiny_clip, tmp_path, monkeypatch):
    from extract import encoders
    from w2s_jax.store import read_store

    out = tmp_path / "s.h5"
    base = ("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip, "--weak", "pixels@2")
    assert extract(*base, "--out", out).exit_code == 0
    before = read_store(out)
    r = extract(*base, "--template", "a sketch of a {}.", "--out", out)
    assert r.exit_code == 0, r.output
    assert "encoding them again" in r.output
    after = read_store(out)
    assert after.provenance.templates == ("a sketch of a {}.",)
    want = encoders.text_embeddings(encoders.load_strong(tiny_clip), after.provenance.class_names,
                                    ("a sketch of a {}.",)).detach().float().numpy()
    np.testing.assert_allclose(after.text_TxKxD, want, atol=1e-6)
    assert not np.allclose(after.text_TxKxD, before.text_TxKxD)
    np.testing.assert_array_equal(after.splits["test"].features_NxD, before.splits["test"].features_NxD)


def test_an_edited_weak_recipe_makes_the_weak_model_anew(imagefolder_root, tiny_clip, tiny_resnet_dir, tmp_path):
    from w2s_jax.store import read_store

    out = tmp_path / "s.h5"
    base = ("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip,
            "--weak", f"{tiny_resnet_dir}:finetune", "--out", out)
    assert extract(*base, "--weak-epochs", "1").exit_code == 0
    name = "tiny-resnet-finetune"
    assert read_store(out).weak_info[name]["epochs"] == 1
    kept = out.with_name(out.name + ".weak") / f"{name}.pt"
    first = kept.read_bytes()
    r = extract(*base, "--weak-epochs", "2")
    assert r.exit_code == 0, r.output
    assert "made otherwise (epochs 1 (asked 2))" in r.output and "kept as is" not in r.output
    assert read_store(out).weak_info[name]["epochs"] == 2
    assert kept.read_bytes() != first  # the kept weights are the new model's
    r = extract(*base, "--weak-epochs", "2")
    assert "made as asked; kept as is" in r.output, r.output


def test_a_checkpoint_of_another_recipe_is_not_resumed(imagefolder_root, tiny_resnet_dir, tmp_path):
    from extract import pipeline, weak
    from extract.datasets import load_dataset

    data = load_dataset("imagefolder", domain="toy", root=str(imagefolder_root))
    spec = weak.parse_weak(f"{tiny_resnet_dir}:finetune")
    parts = tmp_path / "parts"
    lines = []
    opts = pipeline.Options(num_workers=0, batch_size=4, weak_epochs=1, log=lines.append)
    with pipeline.ImageSource(data.load, pipeline.weak_passes([spec]), opts) as source:
        pipeline.finetune_weak([spec], data, data.splits["train"], parts, opts, source)
        again = pipeline.dataclasses.replace(opts, weak_epochs=2)
        pipeline.finetune_weak([spec], data, data.splits["train"], parts, again, source)
    assert any("fine-tuned with other settings (epochs 1 (asked 2))" in line for line in lines), lines
    assert not any("resumed" in line for line in lines)
    assert json.loads((parts / f"weak-{spec.name}.json").read_text())["epochs"] == 2


RUN = """
out = "{out}"
strong = "{strong}"
[[data]]
dataset = "imagefolder"
domains = ["toy"]
root = "{root}"
weak = ["{weak}:finetune"]
[fit]
methods = ["cpl"]
seeds = 1
epochs = 1
batch_size = 8
[extract]
num_workers = 0
batch_size = 8
"""


def test_w2s_run_refits_after_an_edited_weak_recipe_or_template(imagefolder_root, tiny_clip, tiny_resnet_dir,
                                                                 tmp_path):
    from extract import experiment

    text = RUN.format(out=tmp_path / "out", strong=tiny_clip, root=imagefolder_root, weak=tiny_resnet_dir)
    path = tmp_path / "exp.toml"
    path.write_text(text + "weak_epochs = 1\n")
    lines = []
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(map(str, a))))
    first = sorted((tmp_path / "out" / "results").rglob("fit-*"))
    path.write_text(text + 'weak_epochs = 2\ntemplates = ["a sketch of a {}."]\n')
    lines.clear()
    experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(map(str, a))))
    assert any("made otherwise (epochs 1 (asked 2))" in line for line in lines), lines
    assert any("encoding them again" in line for line in lines), lines
    assert not any(line.startswith("done already") for line in lines), lines
    second = sorted((tmp_path / "out" / "results").rglob("fit-*"))
    assert len(second) == 2 and first[0] in second  # a new folder, keyed by the store as it is now
    new = next(f for f in second if f != first[0])
    prov = json.loads((new / "provenance.json").read_text())
    assert prov["weak_model"]["epochs"] == 2 and prov["templates"] == ["a sketch of a {}."]


def test_cross_domain_weak_logits_follow_the_source_weak_model(imagefolder_root, tiny_clip, tiny_resnet_dir,
                                                                tmp_path):
    """H3: a cross-weak file records what it was computed from and is written again when the source store's weak
    model changes; the report never reads one made from another weak model. M6: kept weights that are damaged or
    deleted are noticed by the store's record, and the weak model is fine-tuned anew, so the weak row comes back."""
    from extract import cross_weak, experiment
    from w2s_jax import cross_domain
    from w2s_jax.store import read_store

    text = RUN.format(out=tmp_path / "out", strong=tiny_clip, root=imagefolder_root, weak=tiny_resnet_dir)
    text = text.replace('domains = ["toy"]', 'domains = ["a", "b"]') + "[report]\ncross_domain = true\n"
    path = tmp_path / "exp.toml"
    lines = []

    def run(epochs):
        path.write_text(text.replace("[extract]", f"[extract]\nweak_epochs = {epochs}"))
        lines.clear()
        experiment.run_experiment(experiment.load_experiment(path), log=lambda *a: lines.append(" ".join(map(str, a))))

    out, name = tmp_path / "out", "tiny-resnet-finetune"
    cw = out / "cross-weak" / name / "imagefolder-a__on__imagefolder-b.npz"
    run(1)
    store_a = next((out / "stores").glob("imagefolder-a-*.h5"))
    first = cross_domain.made_from_of(cw)
    assert first == {"weak": read_store(store_a).weak_info[name]} and first["weak"]["epochs"] == 1
    run(2)
    assert any("computed from another weak model" in line for line in lines), lines
    assert cross_domain.made_from_of(cw) == {"weak": read_store(store_a).weak_info[name]}
    assert cross_domain.made_from_of(cw)["weak"]["epochs"] == 2
    store_b = read_store(next((out / "stores").glob("imagefolder-b-*.h5")))
    assert cross_domain.weak_on_target(out / "cross-weak", name, "imagefolder/a", "imagefolder/b", store_b, 1,
                                       first["weak"]) is None  # the report never reads it for the old weak model
    # M6: damaged kept weights are named with what deleting costs, and noticed by the store's record
    kept = store_a.with_name(store_a.name + ".weak") / f"{name}.pt"
    kept.write_bytes(kept.read_bytes()[: kept.stat().st_size // 3])
    with pytest.raises(Exception, match="fine-tuned anew, which changes its logits"):
        cross_weak.check_kept(kept, read_store(store_a).weak_info[name])
    run(2)
    assert any("are not the ones recorded" in line and "making it anew" in line for line in lines), lines
    kept.unlink()
    run(2)
    assert any("are missing" in line and "making it anew" in line for line in lines), lines
    assert kept.is_file() and not any("no PGR" in line for line in lines)
    table = (out / "report" / "cross-domain-tiny-resnet-finetune.md").read_text()
    weak_row = next(line for line in table.splitlines() if line.startswith("| weak | imagefolder/a |"))
    assert weak_row.count("±") == 2, weak_row  # on a and on b: the row across domains is back


# ---------------------------------------------------------------- prompt tuning (H4, L5, M3, M4, L1, L6)


@pytest.fixture
def clip_store(tiny_clip, tmp_path):
    from test_prompt import make_clip_store

    return make_clip_store(tiny_clip, tmp_path / "clip.h5", 150, more_weak=(("other", 1.0),))


def tp(store, strong, out, *extra, methods="kd+tp,ceiling+tp"):
    from extract import tp_cli

    return CliRunner().invoke(tp_cli.main, ["--store", str(store), "--strong", strong, "--seeds", "1", "--epochs",
                                            "1", "--batch-size", "32", "--device", "cpu", "--methods", methods,
                                            "--out", str(out), *map(str, extra)])


@pytest.mark.parametrize("setting", [("--n-ctx", "76"), ("--n-ctx", "80"), ("--n-ctx", "74"),
                                     ("--ctx-init", " ".join(["word"] * 80))])
def test_prompts_past_the_context_length_are_refused_naming_the_class(clip_store, tiny_clip, tmp_path, setting):
    r = tp(clip_store, tiny_clip, tmp_path / "tp", *setting)
    clean(r, "the prompt of class 'class 0' needs", "more than the text tower's 77", "or fewer")
    assert not (tmp_path / "tp").exists()


def test_the_longest_prompt_that_fits_trains(tiny_clip):
    from extract import encoders
    from extract.prompt import PromptBank, PromptError

    enc = encoders.load_strong(tiny_clip)
    names = ("cat", "a very long class name of many words")  # 9 tokens with '.'
    bank = PromptBank(enc.model, enc.tokenizer, names, [0], n_ctx=77 - 2 - 9)
    assert bank.length == 77
    text = bank()[0]
    assert not torch_allclose(text[0], text[1])
    with pytest.raises(PromptError, match="'a very long class name of many words' needs 78 tokens"):
        PromptBank(enc.model, enc.tokenizer, names, [0], n_ctx=77 - 2 - 8)


def torch_allclose(a, b):
    import torch

    return torch.allclose(a, b)


@pytest.mark.parametrize("phrase", ["   ", "___"])
def test_a_blank_ctx_init_is_refused(clip_store, tiny_clip, tmp_path, phrase):
    clean(tp(clip_store, tiny_clip, tmp_path / "tp", "--ctx-init", phrase), "holds no word", "a photo of a")


def test_a_tp_lr_that_overflows_adam_fails_that_model_only(clip_store, tiny_clip, tmp_path):
    """M3: lr 1e38 overflows Adam's first step in float32; that grid point is failed, the other trains and is saved;
    L1: w2s-tp names its failed models."""
    r = tp(clip_store, tiny_clip, tmp_path / "tp", "--n-ctx", "4", "--grid", "lr=1e-2,1e38", methods="kd+tp")
    assert r.exit_code == 0, r.output
    assert "non-finite training loss (weak model noisy):" in r.output
    assert "kd+tp: grid point 1 (lr=1e+38) on seed(s) 0: reported from grid point 0 (lr=0.01), which trained" \
        in r.output
    head = load_heads(tmp_path / "tp")["kd+tp"]
    assert head.selected == 0 and head.failed(grid_index=1) and not head.failed()


@pytest.mark.parametrize("command", ["fit", "tp"])
def test_a_hyperparameter_beyond_float32_is_refused(clip_store, tiny_clip, tmp_path, command):
    r = tp(clip_store, tiny_clip, tmp_path / "o", "--lr", "1e39") if command == "tp" else \
        fit(clip_store, tmp_path / "o", "--grid", "lr=1e-2,1e39")
    clean(r, "lr = 1e+39 does not fit float32")


@pytest.mark.parametrize("command", ["fit", "tp"])
def test_an_empty_weak_list_is_named(clip_store, tiny_clip, tmp_path, command):
    r = tp(clip_store, tiny_clip, tmp_path / "o", "--weak", ",") if command == "tp" else \
        fit(clip_store, tmp_path / "o", "--weak", ",")
    clean(r, "--weak ','", "name at least one weak model", "noisy")


def test_the_tp_plan_balances_capped_steps(clip_store, tiny_clip, tmp_path):
    from extract.tp_fit import chunk_size

    assert chunk_size(48, 1, 0, 10**9, cap=40) == 24 and chunk_size(48, 1, 0, 10**9) == 48
    assert chunk_size(48, 10, 0, 405, cap=40) == 24  # memory caps at 40 too: balanced the same
    r = tp(clip_store, tiny_clip, tmp_path / "tp", "--n-ctx", "4", "--grid", "lr=1e-2,2e-2,3e-2",
           "--models-per-step", "2", methods="kd+tp")
    assert r.exit_code == 0, r.output
    assert "3 prompt models in 2 step(s) of up to 2" in r.output


@pytest.mark.parametrize("device", ["meta", "mps", "xpu", "hpu"])
def test_a_device_torch_cannot_compute_on_here_is_refused(clip_store, tiny_clip, tmp_path, imagefolder_root, device):
    r = CliRunner().invoke(__import__("extract.tp_cli", fromlist=["main"]).main,
                           ["--store", str(clip_store), "--strong", tiny_clip, "--device", device,
                            "--out", str(tmp_path / "tp")])
    clean(r, f"--device {device}: not a device torch can compute on here", "this machine has cpu")
    r = extract("--dataset", "imagefolder", "--root", imagefolder_root, "--strong", tiny_clip, "--weak", "pixels@2",
                "--device", device, "--out", tmp_path / "s.h5")
    clean(r, f"--device {device}: not a device torch can compute on here")
    assert not (tmp_path / "s.h5").exists()


# ---------------------------------------------------------------- reports and fits (M1, M2, L1-L4)


def test_every_interval_row_is_compared_with_deltas_baseline(tmp_path):
    from w2s_jax import results

    synthetic_store(tmp_path / "s.h5", n_test=641, seed=641)
    r = fit(tmp_path / "s.h5", tmp_path / "res", methods="cpl,kd+lp,ce+lp,ce+lp@graph,ceiling+lp", seeds=3,
            epochs=3)
    assert r.exit_code == 0, r.output
    report.write_report([tmp_path / "res"], tmp_path / "rep", curves=())
    summary = results.load_summary(tmp_path / "res")
    deltas = report.best_baseline(summary)
    lines = [line.split("|") for line in (tmp_path / "rep" / "intervals-noisy.md").read_text().splitlines()
             if line.startswith("| synthetic")]
    shown = {cells[2].strip(): cells[4].strip() for cells in lines}
    assert set(shown) == {"cpl", "kd+lp", "ce+lp", "ce+lp@graph"}
    for method, base in shown.items():
        if method == deltas:
            nxt = report.best_baseline(summary, exclude=("cpl", deltas))
            assert base == f"{nxt} (the next best: this row is Δ's)", (method, base)
        else:
            assert base == deltas, (method, base)


def test_folders_of_other_seed_counts_are_refused_by_name(clip_store, tiny_clip, tmp_path):
    assert fit(clip_store, tmp_path / "fit3", methods="cpl", seeds=3).exit_code == 0
    assert tp(clip_store, tiny_clip, tmp_path / "tp1", "--n-ctx", "4", methods="kd+tp").exit_code == 0
    r = CliRunner().invoke(report.main, [str(tmp_path / "fit3"), str(tmp_path / "tp1"), "--out", str(tmp_path / "r")])
    clean(r, "with 3 seeds", "with 1", "report them apart")
    r = CliRunner().invoke(fit_cli.main, ["--show", str(tmp_path / "fit3"), "--show", str(tmp_path / "tp1")])
    clean(r, "with 3 seeds")


def test_w2s_run_refuses_unequal_fit_and_tp_seeds_before_any_work(tmp_path):
    from extract import experiment

    base = ('out = "{}"\n[[data]]\ndataset = "demo"\ndomains = ["mnist"]\nweak = ["pixels@2"]\n'
            '[fit]\nseeds = 3\n').format(tmp_path / "out")
    path = tmp_path / "e.toml"
    path.write_text(base + "[tp]\nseeds = 2\n")
    with pytest.raises(experiment.ExperimentError, match=r"\[tp\] seeds = 2 and \[fit\] seeds = 3"):
        experiment.load_experiment(path)
    path.write_text(base + "[tp]\nepochs = 2\n")
    assert experiment.load_experiment(path)["tp"]["seeds"] == 3  # [tp] seeds follows [fit]
    assert not (tmp_path / "out").exists()


def test_the_failure_line_names_grid_points_seeds_and_the_weak_model(tmp_path):
    synthetic_store(tmp_path / "s.h5", more_weak=(("other", 1.0),))
    r = fit(tmp_path / "s.h5", tmp_path / "res", "--grid", "lr=1e-2,1e30", "--weak", "noisy,other",
            methods="kd+lp,ceiling+lp")
    assert r.exit_code == 0, r.output
    for weak in ("noisy", "other"):
        assert f"non-finite training loss (weak model {weak}):" in r.output
    assert "kd+lp: grid point 1 (lr=1e+30) on seed(s) 0, 1: reported from grid point 0 (lr=0.01), which trained" \
        in r.output
    assert "reported as failed" not in r.output


def test_rows_padded_is_said_only_when_rows_are_padded(tmp_path):
    synthetic_store(tmp_path / "full.h5", n_test=640)
    synthetic_store(tmp_path / "less.h5", n_test=600)
    full = fit(tmp_path / "full.h5", tmp_path / "a", methods="cpl", seeds=1, epochs=1)
    less = fit(tmp_path / "less.h5", tmp_path / "b", methods="cpl", seeds=1, epochs=1)
    assert full.exit_code == 0 and less.exit_code == 0
    assert "rows padded" not in full.output
    assert "rows padded to the size bucket of 640" in less.output


def test_tied_weak_confidences_still_split_a_quarter():
    import jax.numpy as jnp

    from w2s_jax.metrics import gain_sources

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, 101)
    student = rng.normal(size=(101, 5)).astype(np.float32)
    tied = 5.0 * np.eye(5, dtype=np.float32)[rng.integers(0, 5, 101)]  # every row equally confident
    out = {k: float(v) for k, v in gain_sources(jnp.asarray(student), jnp.asarray(tied), jnp.asarray(labels)).items()}
    assert all(np.isfinite(v) for v in out.values()), out
    ok = student.argmax(1) == labels
    assert out["low_conf_acc"] == pytest.approx(ok[:26].mean()) and out["rest_acc"] == pytest.approx(ok[26:].mean())
    weak = rng.normal(size=(101, 5)).astype(np.float32)  # no ties: the same rows as the 25th percentile rule
    conf = np.exp(weak).max(1) / np.exp(weak).sum(1)
    low = conf <= np.quantile(conf, 0.25)
    got = float(gain_sources(jnp.asarray(student), jnp.asarray(weak), jnp.asarray(labels))["low_conf_acc"])
    assert got == pytest.approx(ok[low].mean())


def test_a_weak_model_right_on_every_row_reports_without_warnings(tmp_path):
    import warnings

    import h5py

    synthetic_store(tmp_path / "s.h5")
    with h5py.File(tmp_path / "s.h5", "r+") as f:  # the weak model is right on every row: no correction to make
        labels = f["splits/test/labels_N"][()]
        f["splits/test/weak/noisy_NxK"][...] = 5.0 * np.eye(5, dtype=np.float32)[labels]
    assert fit(tmp_path / "s.h5", tmp_path / "res", methods="cpl,kd+lp").exit_code == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        report.write_report([tmp_path / "res"], tmp_path / "rep", curves=())
    table = (tmp_path / "rep" / "gain-sources.md").read_text()
    assert "n/a" in table and "nan" not in table


def test_weak_logits_near_float32s_limit_train_every_method(tmp_path):
    import h5py

    synthetic_store(tmp_path / "s.h5", more_weak=(("other", 1.0),))
    with h5py.File(tmp_path / "s.h5", "r+") as f:
        logits = f["splits/test/weak/other_NxK"][()]
        f["splits/test/weak/other_NxK"][...] = np.where(logits == logits.max(1, keepdims=True), 3e38, -3e38)
    r = fit(tmp_path / "s.h5", tmp_path / "res", "--weak", "noisy,other", methods="ce+lp,kd+lp,cpl")
    assert r.exit_code == 0, r.output
    assert "non-finite" not in r.output
    summary = json.loads((tmp_path / "res" / "other" / "metrics.json").read_text())
    assert not any(m["failed"] for m in summary["methods"].values())


# ---------------------------------------------------------------- packaging


def test_every_imported_package_is_declared():
    """Every third-party module that w2s_jax/ and extract/ import is a declared dependency (pydantic was not)."""
    import ast
    import sys
    import tomllib
    from importlib import metadata
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    declared = {dep.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0].split("!")[0].strip().lower()
                .replace("_", "-") for dep in project["dependencies"]}
    providers = metadata.packages_distributions()
    missing = {}
    for path in [*root.glob("w2s_jax/**/*.py"), *root.glob("extract/**/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
            for name in names:
                top = name.split(".")[0]
                if top in sys.stdlib_module_names or top in ("w2s_jax", "extract"):
                    continue
                dists = {d.lower().replace("_", "-") for d in providers.get(top, [top])}
                if not dists & declared:
                    missing.setdefault(top, set()).add(path.name)
    optional = {"ray"}  # an optional extra, imported only where it is asked for
    assert not {k: v for k, v in missing.items() if k not in optional}, missing
