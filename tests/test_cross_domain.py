"""W2S across domains (issue 24): saved heads evaluated on every other store of the same encoder and classes,
without refitting; mismatched stores refused by name; a missing store left out with a note."""
import dataclasses
import io
import json

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from w2s_jax import cli as fit_cli
from w2s_jax import cross_domain, report
from w2s_jax.saved_heads import HeadsError
from w2s_jax.store import read_store, write_store


def fit(store, out):
    r = CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", "kd+lp,cpl,ceiling+lp", "--seeds", "2",
                                          "--epochs", "2", "--batch-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return out


@pytest.fixture(scope="module")
def two_domains(tmp_path_factory):
    """Two stores of one encoder and class list whose classes sit in shifted places (domain shift), and a fit on each."""
    folder = tmp_path_factory.mktemp("cross")
    stores = {}
    for name, seed in (("near", 0), ("far", 1)):
        stores[name] = folder / f"{name}.h5"
        synthetic_store(stores[name], seed=seed, domain=name)
    return stores, {name: fit(path, folder / f"res-{name}") for name, path in stores.items()}


def test_the_diagonal_is_each_fit_own_test_accuracy_and_shift_costs(two_domains):
    stores, fits = two_domains
    found, targets, notes = cross_domain.matrix(list(fits.values()))
    assert targets == ["synthetic/far", "synthetic/near"] and notes == []
    cells = found["noisy"]
    for name, folder in fits.items():
        reported = json.loads((folder / "metrics.json").read_text())["methods"]
        for method in ("kd+lp", "cpl", "ceiling+lp"):
            np.testing.assert_allclose(cells[method][(f"synthetic/{name}", f"synthetic/{name}")],
                                       reported[method]["test_acc"], atol=1e-6)
    # the two domains' classes sit in different places, so heads do worse away from home
    for method in ("kd+lp", "ceiling+lp"):
        home = np.mean(cells[method][("synthetic/near", "synthetic/near")])
        away = np.mean(cells[method][("synthetic/near", "synthetic/far")])
        assert away < home - 0.1, (method, home, away)


def test_report_writes_the_matrix_and_its_figure(two_domains, tmp_path):
    _, fits = two_domains
    r = CliRunner().invoke(report.main, [*map(str, fits.values()), "--cross-domain", "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    text = (tmp_path / "rep" / "cross-domain-noisy.md").read_text()
    assert "| kd+lp | synthetic/near |" in text and "out-of-domain (mean)" in text and "PGR" in text
    assert (tmp_path / "rep" / "cross-domain-noisy.png").stat().st_size > 0


def test_a_missing_store_is_left_out_with_a_note(two_domains, tmp_path):
    stores, fits = two_domains
    moved = tmp_path / "far.h5"
    stores["far"].rename(moved)
    try:
        found, targets, notes = cross_domain.matrix(list(fits.values()))
    finally:
        moved.rename(stores["far"])
    assert targets == ["synthetic/near"] and "synthetic/far" in notes[0] and "not on disk" in notes[0]
    assert ("synthetic/far", "synthetic/near") in found["noisy"]["kd+lp"]  # its heads still run on the others


@pytest.mark.parametrize("change, words", [
    (dict(encoder="another"), "encoder differ"),
    (dict(class_names=tuple(f"class {i}" for i in reversed(range(5)))), "in another order"),
    (dict(class_names=tuple(f"kind {i}" for i in range(5))), "class names differ"),
])
def test_a_mismatched_store_is_refused_by_name(two_domains, tmp_path, change, words):
    stores, fits = two_domains
    store = read_store(stores["far"])
    odd = tmp_path / "odd.h5"
    write_store(odd, dataclasses.replace(store, provenance=dataclasses.replace(store.provenance, **change)))
    with pytest.raises(HeadsError, match=words):
        cross_domain.evaluate(fits["near"], read_store(odd), str(odd))


def test_the_weak_probe_across_domains_is_the_store_own_probe_and_gives_pgr(imagefolder_root, tiny_clip, tmp_path):
    """extract.cross_weak retrains a probe weak model on the source as its store did (the same logits on the source's
    own test rows), applies it to the target's images, and the report then shows a weak row and PGR off the diagonal;
    a fine-tuned weak model without kept weights gets no file."""
    import shutil

    from PIL import Image

    from extract import cross_weak, datasets, pipeline, weak

    homes = {"ink": tmp_path / "ink", "paper": tmp_path / "paper"}
    shutil.copytree(imagefolder_root, homes["ink"])
    shutil.copytree(imagefolder_root, homes["paper"])
    for path in homes["paper"].rglob("*.jpg"):  # the shifted domain: the same classes, inverted colours
        image = Image.open(path).convert("RGB")
        Image.eval(image, lambda v: 255 - v).save(path)
    opts = pipeline.Options(device="cpu", batch_size=8, num_workers=0, log=lambda *a: None)
    data, rows = {}, {}
    for name, root in homes.items():
        data[name] = datasets.load_dataset("imagefolder", domain=name, root=str(root))
        pipeline.extract(data[name], tiny_clip, ["pixels@2"], tmp_path / f"{name}.h5", opts)
        store = read_store(tmp_path / f"{name}.h5")
        rows[name] = {s: (sp.ids_N, sp.labels_N) for s, sp in store.splits.items()}
    spec = weak.parse_weak("pixels@2")
    info = read_store(tmp_path / "ink.h5").weak_info["pixels@2"]  # what the cross-weak files are made from
    own = cross_weak.write_cross_weak(data["ink"], rows["ink"], data["ink"], rows["ink"]["test"], spec,
                                      tmp_path / "cw", opts, source_info=info)
    with np.load(own) as z:
        np.testing.assert_allclose(z["logits_NxK"], read_store(tmp_path / "ink.h5").splits["test"].weak_logits[
            "pixels@2"], atol=1e-5)
    path = cross_weak.write_cross_weak(data["ink"], rows["ink"], data["paper"], rows["paper"]["test"], spec,
                                       tmp_path / "cw", opts, source_info=info)
    assert path == cross_domain.cross_weak_file(tmp_path / "cw", "pixels@2", "imagefolder/ink", "imagefolder/paper")
    # issue 31 (11): a file cut short is named on read, and written again rather than kept as "done"
    good = path.read_bytes()
    path.write_bytes(good[:50])
    with pytest.raises(ValueError, match=f"{path.name}: not a readable weak-model file"):
        cross_domain.read_cross_weak(path)
    cross_weak.write_cross_weak(data["ink"], rows["ink"], data["paper"], rows["paper"]["test"], spec, tmp_path / "cw",
                                opts, source_info=info)
    np.testing.assert_array_equal(cross_domain.read_cross_weak(path)[1], np.load(io.BytesIO(good))["logits_NxK"])
    assert cross_weak.write_cross_weak(data["ink"], rows["ink"], data["paper"], rows["paper"]["test"],
                                       weak.parse_weak("resnet18"), tmp_path / "cw", opts,
                                       tmp_path / "ink.h5") is None  # fine-tuned, and no weights kept for it
    folders = []
    for name in homes:
        r = CliRunner().invoke(fit_cli.main, ["--store", str(tmp_path / f"{name}.h5"), "--methods",
                                              "kd+lp,ceiling+lp", "--seeds", "2", "--epochs", "2", "--batch-size",
                                              "8", "--out", str(tmp_path / f"res-{name}")])
        assert r.exit_code == 0, r.output
        folders.append(tmp_path / f"res-{name}")
    tables, _ = report.cross_domain_tables(folders, tmp_path / "cw")
    text = report.to_markdown(tables[0])
    weak_row = next(line for line in text.splitlines() if line.startswith("| weak | imagefolder/ink |"))
    assert weak_row.count("±") == 2  # known on its own domain and, from the file, on the other
    assert next(line for line in text.splitlines() if line.startswith("| weak | imagefolder/paper |")).count("±") == 1


def test_a_fine_tuned_weak_model_is_kept_and_applied_without_fine_tuning_again(domainnet_root, tiny_clip,
                                                                              tiny_resnet_dir, tmp_path):
    """Extraction keeps a fine-tuned weak model's weights beside the store; cross_weak loads them, and on the store's
    own test images they give the store's own weak logits."""
    from extract import cross_weak, datasets, pipeline, weak

    opts = pipeline.Options(device="cpu", batch_size=4, num_workers=0, weak_epochs=1, log=lambda *a: None)
    data = datasets.load_dataset("domainnet", domain="real", root=str(domainnet_root))
    out = tmp_path / "real.h5"
    pipeline.extract(data, tiny_clip, [f"{tiny_resnet_dir}:finetune"], out, opts)
    store = read_store(out)
    name = store.weak_names[0]
    assert pipeline.weak_weights(out, name).is_file() and not out.with_name("real.h5.parts").exists()
    rows = {s: (sp.ids_N, sp.labels_N) for s, sp in store.splits.items()}
    path = cross_weak.write_cross_weak(data, rows, data, rows["test"], weak.parse_weak(f"{tiny_resnet_dir}:finetune"),
                                       tmp_path / "cw", opts, out)
    with np.load(path) as z:
        np.testing.assert_allclose(z["logits_NxK"], store.splits["test"].weak_logits[name], atol=1e-5)


def test_a_store_remade_at_the_same_path_is_not_taken_for_the_fit_store(two_domains, tmp_path):
    """Issue 31 (1): the same path, the same row ids, other features: the fit recorded a content hash of its rows, so
    that domain is left out as a target with a note, instead of a diagonal that is not the fit's."""
    stores, fits = two_domains
    saved = tmp_path / "far-original.h5"
    stores["far"].rename(saved)
    try:
        synthetic_store(stores["far"], seed=7, domain="far")  # remade: same ids and classes, other content
        found, targets, notes = cross_domain.matrix(list(fits.values()))
    finally:
        saved.replace(stores["far"])
    assert targets == ["synthetic/near"]
    assert "synthetic/far" in notes[0] and "not the one its fit used" in notes[0] and "remade" in notes[0]
    assert ("synthetic/far", "synthetic/far") not in found["noisy"]["kd+lp"]


def test_heads_of_a_fit_with_an_import_need_that_import(two_domains, tmp_path):
    """Issue 31 (2): cross-domain evaluation makes the check w2s-predict makes: heads fit with --import X are not
    rebuilt from the built-in registry when X is not imported."""
    import shutil

    stores, fits = two_domains
    folder = tmp_path / "with-import"
    shutil.copytree(fits["near"], folder)
    index_path = folder / "heads" / "heads.json"
    index = json.loads(index_path.read_text())
    index_path.write_text(json.dumps({**index, "imports": ["my_unimported_heads"]}))
    with pytest.raises(HeadsError, match="was fit with --import my_unimported_heads"):
        cross_domain.evaluate(folder, read_store(stores["near"]), "store near")


def test_cross_domain_finds_the_stores_from_another_folder(two_domains, tmp_path, monkeypatch):
    """Issue 31 (10, 18): the fit records its store's absolute path, so the report finds it from any working folder;
    no target at all is an error with the notes, not an empty report; --cross-weak is checked."""
    stores, fits = two_domains
    monkeypatch.chdir(stores["near"].parent)
    relative = fit(stores["near"].name, tmp_path / "relative")  # the store given as a relative path
    monkeypatch.chdir(tmp_path)
    _, targets, notes = cross_domain.matrix([relative, fits["far"]])
    assert targets == ["synthetic/far", "synthetic/near"] and notes == []
    r = CliRunner().invoke(report.main, [str(fits["near"]), "--cross-domain", "--cross-weak", str(tmp_path / "nope"),
                                         "--out", str(tmp_path / "rep")])
    assert r.exit_code != 0 and "no such folder" in r.output
    r = CliRunner().invoke(report.main, [str(fits["near"]), "--cross-weak", str(tmp_path), "--out", str(tmp_path / "r")])
    assert r.exit_code != 0 and "add --cross-domain" in r.output
    moved = tmp_path / "near.h5"
    stores["near"].rename(moved)
    try:
        r = CliRunner().invoke(report.main, [str(fits["near"]), "--cross-domain", "--out", str(tmp_path / "r2")])
    finally:
        moved.rename(stores["near"])
    assert r.exit_code != 0 and "not on disk" in r.output and "Traceback" not in r.output
