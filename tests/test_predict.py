"""w2s-predict: a store's rows and a folder of images classified by saved heads, prototypes exported, mismatches refused."""
import csv
import re

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from extract import cli as extract_cli
from extract import predict_cli
from w2s_jax import cli as fit_cli
from w2s_jax.store import read_store


def predict(*args):
    return CliRunner().invoke(predict_cli.main, [*map(str, args)])


def fit(store, out, methods="cpl,kd+lp", seeds=2):
    r = CliRunner().invoke(fit_cli.main, ["--store", str(store), "--methods", methods, "--seeds", str(seeds),
                                          "--epochs", "2", "--batch-size", "32", "--out", str(out)])
    assert r.exit_code == 0, r.output


@pytest.fixture(scope="module")
def synthetic_fit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("predict")
    synthetic_store(folder / "s.h5")
    fit(folder / "s.h5", folder / "res")
    return folder / "s.h5", folder / "res"


def test_store_predictions_reproduce_the_reported_test_accuracy(synthetic_fit, tmp_path):
    store, res = synthetic_fit
    import json

    reported = json.loads((res / "metrics.json").read_text())["methods"]["kd+lp"]["test_acc"][1]
    r = predict("--results", res, "--store", store, "--method", "kd+lp", "--seed", 1, "--out", tmp_path / "p.csv")
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if x.startswith("test' accuracy of seed 1"))
    got, fit_said = re.findall(r"(\d+\.\d+)%", line)
    assert got == fit_said == f"{100 * reported:.2f}"
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    test = read_store(store).splits["test"]
    assert [row["id"] for row in rows] == list(test.ids_N) and {row["status"] for row in rows} == {"ok"}
    split = np.load(res / "splits.npz")["test_prime"][1]
    hits = [rows[i]["predicted"] == rows[i]["label"] for i in split]
    assert np.mean(hits) == pytest.approx(reported, abs=1e-6)  # the CSV itself gives the reported number
    # an existing file is kept unless --overwrite
    r = predict("--results", res, "--store", store, "--out", tmp_path / "p.csv")
    assert r.exit_code != 0 and "exists; pass --overwrite" in r.output
    # the .npz holds the full probabilities
    r = predict("--results", res, "--store", store, "--out", tmp_path / "p.npz")
    assert r.exit_code == 0, r.output
    saved = np.load(tmp_path / "p.npz")
    assert saved["probabilities_NxK"].shape == (600, 5)
    np.testing.assert_allclose(saved["probabilities_NxK"].sum(1), 1.0, rtol=1e-5)


def test_a_mismatched_results_folder_is_refused_by_name(synthetic_fit, tmp_path):
    _, res = synthetic_fit
    cases = [(dict(encoder="another-encoder"), "features of another-encoder, but the heads were fit on synthetic"),
             (dict(k=4), "another class list"),
             (dict(d=8), "8-d features, the heads take 16-d")]
    for i, (change, message) in enumerate(cases):
        other = tmp_path / f"other{i}.h5"
        synthetic_store(other, **change)
        r = predict("--results", res, "--store", other, "--out", tmp_path / f"p{i}.csv")
        assert r.exit_code != 0 and message in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / f"p{i}.csv").exists()
    r = predict("--results", tmp_path, "--store", other, "--out", tmp_path / "q.csv")
    assert r.exit_code != 0 and "without saved heads" in r.output
    r = predict("--results", res, "--store", other, "--method", "nope", "--out", tmp_path / "q.csv")
    assert r.exit_code != 0 and "no saved 'nope' head; saved: cpl, kd+lp" in r.output


def test_export_prototypes(synthetic_fit, tmp_path):
    _, res = synthetic_fit
    r = predict("--results", res, "--export-prototypes", tmp_path / "cpl.npy", "--seed", 1)
    assert r.exit_code == 0, r.output
    protos = np.load(tmp_path / "cpl.npy")
    assert protos.shape == (5, 16) and protos.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-5)
    r = predict("--results", res, "--export-prototypes", tmp_path / "lp.npy", "--method", "kd+lp")
    assert r.exit_code != 0 and "not class prototypes" in r.output


def test_images_end_to_end_with_the_demo_encoder(tmp_path):
    """Demo store -> fit -> the same test images written as PNG files -> w2s-predict --images: per file, the same
    logits as the store's rows; a broken file is reported, not fatal."""
    store = tmp_path / "demo.h5"
    r = CliRunner().invoke(extract_cli.main, ["--dataset", "demo", "--strong", "efficientnet-lite0@32", "--limit", "160",
                                              "--num-workers", "0", "--batch-size", "64", "--out", str(store)])
    assert r.exit_code == 0, r.output
    fit(store, tmp_path / "res", methods="cpl,kd+lp", seeds=1)
    images = tmp_path / "images"
    r = CliRunner().invoke(extract_cli.main, ["demo-images", "--domain", "mnist", "--count", "160", "--out", str(images)])
    assert r.exit_code == 0, r.output
    (images / "broken.png").write_bytes(b"not a png")
    r = predict("--results", tmp_path / "res", "--images", images, "--method", "kd+lp", "--num-workers", 0,
                "--out", tmp_path / "img.npz")
    assert r.exit_code == 0, r.output
    assert "1 unreadable image(s), marked 'unreadable': broken.png" in r.output
    assert "accuracy on the 160 labelled row(s)" in r.output
    from_images = np.load(tmp_path / "img.npz")
    assert len(from_images["ids"]) == 161 and not from_images["readable_N"][list(from_images["ids"]).index("broken.png")]
    r = predict("--results", tmp_path / "res", "--store", store, "--method", "kd+lp", "--out", tmp_path / "store.npz")
    assert r.exit_code == 0, r.output
    from_store = np.load(tmp_path / "store.npz")
    row_of = {sample: i for i, sample in enumerate(from_store["ids"])}
    rows = [row_of[f"mnist/{p.split('-')[-1][:-4]}"] for p in from_images["ids"] if p != "broken.png"]
    keep = from_images["readable_N"]
    np.testing.assert_allclose(from_images["logits_NxK"][keep], from_store["logits_NxK"][rows], rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(from_images["labels_N"][keep], from_store["labels_N"][rows])


def test_images_need_a_rebuildable_encoder(synthetic_fit, tmp_path):
    _, res = synthetic_fit
    (tmp_path / "imgs").mkdir()
    r = predict("--results", res, "--images", tmp_path / "imgs", "--out", tmp_path / "p.csv")
    assert r.exit_code != 0 and "no image files" in r.output
    from conftest import write_image

    write_image(tmp_path / "imgs" / "a.jpg", 0, np.random.default_rng(0))
    r = predict("--results", res, "--images", tmp_path / "imgs", "--out", tmp_path / "p.csv")
    assert r.exit_code != 0 and "'synthetic' is not one w2s can rebuild" in r.output
