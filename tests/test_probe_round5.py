"""The fifth adversarial probe's findings (issue 44, ``shared/probes/2026-12-04.md``), grouped by feature. Each case
failed before its fix (a stale or failed result used as if it were good, a wrong number, or a traceback) and must
now give the right result or a clear error that names the problem and the fix."""
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
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
    fits = []
    for domain, seed in (("clusters", 0), ("shifted", 1)):
        synthetic_store(folder / f"{domain}.h5", domain=domain, seed=seed)
        r = fit(folder / f"{domain}.h5", folder / domain, "--lr", "1e30")
        assert r.exit_code == 0, r.output
        fits.append(folder / domain)
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
