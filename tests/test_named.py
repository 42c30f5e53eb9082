"""Datasets by name, read from fake copies in torchvision's on-disk formats, and weak teachers that never saw the
target labels (a zero-shot open_clip model, an ImageNet classifier mapped onto the classes), checked against NumPy
transcriptions of their formulas."""
import pickle

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from extract import named
from extract.cli import main as extract_main
from extract.datasets import DatasetError, load_dataset
from extract.encoders import load_strong, text_embeddings
from w2s_jax.store import read_store


def _pickle(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj))


@pytest.fixture
def fake_cifar10(tmp_path, monkeypatch):
    """CIFAR-10's pickled batches (5 train batches, a test batch, the meta file) in DATA/cifar-10-batches-py/; their
    md5 check of the real files is what a fake copy cannot pass, so it is switched off for it."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    rng = np.random.default_rng(0)
    base = tmp_path / "data" / "cifar-10-batches-py"

    def batch(n, first):
        labels = [(first + i) % 10 for i in range(n)]
        pixels = np.stack([np.full((3, 32, 32), 20 * y, np.uint8) + rng.integers(0, 20, (3, 32, 32), np.uint8)
                           for y in labels])
        return {"data": pixels.reshape(n, -1), "labels": labels}

    for i in range(5):
        _pickle(base / f"data_batch_{i + 1}", batch(6, i))
    _pickle(base / "test_batch", batch(40, 0))
    _pickle(base / "batches.meta", {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                    "horse", "ship", "truck"]})
    return tmp_path / "data"


def _jpeg(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((24, 24, 3), value, np.uint8)).save(path)


def test_cifar10_is_read_by_name_from_torchvision_batches(fake_cifar10):
    data = load_dataset("cifar10", domain=None, root=str(fake_cifar10))
    assert (data.name, data.domain, len(data.class_names)) == ("cifar10", "cifar10", 10)
    assert data.class_names[:3] == ("airplane", "automobile", "bird")
    assert len(data.templates) == 18 and data.templates[0] == "a photo of a {}."  # CLIP's CIFAR templates
    train_ids, train_labels = data.splits["train"]
    test_ids, test_labels = data.splits["test"]
    assert (len(train_ids), len(test_ids)) == (30, 40)  # the official splits: the 5 train batches, the test batch
    assert list(test_labels[:12]) == [i % 10 for i in range(12)]
    assert np.asarray(data.load(test_ids[3])).mean() == pytest.approx(60 + 9.5, abs=3)  # label 3: 20 * 3 + noise
    assert data.split_rule == "official train / test"


def test_a_missing_dataset_with_no_download_names_the_command(tmp_path):
    with pytest.raises(DatasetError, match=r"w2s-extract --dataset cifar100 --root .*about 0.17 GB"):
        load_dataset("cifar100", domain=None, root=str(tmp_path))
    r = CliRunner().invoke(extract_main, ["--dataset", "food101", "--root", str(tmp_path), "--no-download"])
    assert r.exit_code == 1 and "w2s-extract --dataset food101" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "food-101").exists()  # nothing fetched


def test_list_datasets_prints_names_sizes_downloads_and_classes():
    r = CliRunner().invoke(extract_main, ["--list-datasets"])
    assert r.exit_code == 0
    for name in ("cifar10", "cifar100", "stl10", "food101", "pets", "flowers102", "dtd", "eurosat", "gtsrb",
                 "fgvc-aircraft", "imagenet", "imagenet-v2", "imagenet-sketch", "imagenet-r", "imagenet-a"):
        assert f"\n{name} " in "\n" + r.output
    assert "downloads itself, about 0.17 GB" in r.output and "placed by hand" in r.output
    assert "aquarium fish" in r.output  # CIFAR-100's names, '_' read as a space


def test_dtd_folders_and_label_files_give_train_plus_val_and_test(tmp_path):
    base = tmp_path / "dtd" / "dtd"
    classes = named.class_names("dtd")
    for split in ("train", "val", "test"):
        lines = []
        for k, name in enumerate(classes):
            _jpeg(base / "images" / name / f"{name}_{split}.jpg", k)
            lines.append(f"{name}/{name}_{split}.jpg")
        (base / "labels").mkdir(parents=True, exist_ok=True)
        (base / "labels" / f"{split}1.txt").write_text("\n".join(lines) + "\n")
    data = load_dataset("dtd", domain=None, root=str(tmp_path))
    assert [len(data.splits[s][0]) for s in ("train", "test")] == [2 * 47, 47]
    assert sorted(data.splits["test"][1]) == list(range(47))
    ids, labels = data.splits["train"]
    assert all(np.asarray(data.load(i))[0, 0, 0] == y for i, y in zip(ids[::10], labels[::10]))


def test_a_dataset_without_an_official_split_gets_disjoint_stable_stratified_splits(tmp_path):
    classes = sorted(["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                      "PermanentCrop", "Residential", "River", "SeaLake"])
    for k, name in enumerate(classes):
        for i in range(10):
            _jpeg(tmp_path / "eurosat" / "2750" / name / f"{name}_{i}.jpg", k)
    first = load_dataset("eurosat", domain=None, root=str(tmp_path))
    again = load_dataset("eurosat", domain=None, root=str(tmp_path))
    train, test = first.splits["train"], first.splits["test"]
    assert not set(train[0]) & set(test[0]) and len(train[0]) + len(test[0]) == 100
    assert np.bincount(test[1]).tolist() == [3] * 10  # 30% of every class
    assert first.split_hash == again.split_hash and "seeded class-stratified" in first.split_rule


def test_imagenet_r_is_its_200_class_subset_labelled_in_its_own_order(tmp_path):
    wnids = named.imagenet_wnids("imagenet-r")
    for k in (0, 7, 199):
        for i in range(4):
            _jpeg(tmp_path / "imagenet-r" / wnids[k] / f"{i}.jpg", k)
    data = load_dataset("imagenet", domain="imagenet-r", root=str(tmp_path))
    assert (data.name, data.domain, len(data.class_names)) == ("imagenet", "imagenet-r", 200)
    assert data.class_names[0] == "goldfish"
    assert sorted(set(data.splits["test"][1])) == [0, 7, 199]
    with pytest.raises(DatasetError, match="placed by hand|place it there by hand"):
        load_dataset("imagenet-a", domain=None, root=str(tmp_path))


# ------------------------------------------------------------------ weak teachers


def _extract(*args):
    return CliRunner().invoke(extract_main, [*args, "--device", "cpu", "--num-workers", "0", "--batch-size", "16"])


def _features(encoder, data, ids):
    with torch.no_grad():
        images = torch.stack([encoder.transform(data.load(i)) for i in ids])
        return encoder.encode_images(images).float().numpy()


def test_a_zero_shot_teacher_logits_are_its_scaled_cosines(fake_cifar10, tiny_clip, tmp_path):
    out = tmp_path / "store.h5"
    r = _extract("--dataset", "cifar10", "--root", str(fake_cifar10), "--strong", tiny_clip,
                 "--weak", f"zeroshot:{tiny_clip}", "--template", "a photo of a {}.", "--template", "a {} here.",
                 "--out", str(out))
    assert r.exit_code == 0, r.output
    store = read_store(out)
    name = f"zeroshot-{tiny_clip.split(':')[0]}-tiny"
    assert store.weak_info[name]["kind"] == "zero-shot" and "zero-shot" in r.output
    data = load_dataset("cifar10", domain=None, root=str(fake_cifar10))
    enc = load_strong(tiny_clip)
    ids = store.splits["test"].ids_N
    image = _features(enc, data, ids)
    with torch.no_grad():
        text = text_embeddings(enc, data.class_names, ("a photo of a {}.", "a {} here.")).float().numpy()
    text = text / np.linalg.norm(text, axis=-1, keepdims=True)
    classes = text.mean(0)
    classes /= np.linalg.norm(classes, axis=-1, keepdims=True)
    image /= np.linalg.norm(image, axis=-1, keepdims=True)
    want = float(enc.model.logit_scale.detach().exp()) * image @ classes.T
    np.testing.assert_allclose(store.splits["test"].weak_logits[name], want, rtol=1e-4, atol=1e-3)


@pytest.fixture
def source_classifier(tmp_path):
    """A tiny random HF classifier with five source classes of its own, named like ImageNet's labels."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(1)
    labels = ["airliner, jet", "sports car, racer", "tabby, tabby cat", "goldfish, carp", "container ship"]
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
                          id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)})
    folder = tmp_path / "source-net"
    ResNetForImageClassification(config).save_pretrained(folder)
    return folder, labels


def _source_probs(folder, data, ids):
    from transformers import AutoModelForImageClassification

    from extract.weak import WeakSpec, weak_transform

    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    transform = weak_transform(WeakSpec("x", str(folder), "mapped"))
    with torch.no_grad():
        logits = model(pixel_values=torch.stack([transform(data.load(i)) for i in ids])).logits.float().numpy()
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_a_mapped_teacher_by_name_similarity_is_conse(fake_cifar10, tiny_clip, source_classifier, tmp_path):
    folder, labels = source_classifier
    out = tmp_path / "store.h5"
    r = _extract("--dataset", "cifar10", "--root", str(fake_cifar10), "--strong", tiny_clip,
                 "--weak", f"imagenet:{folder}", "--out", str(out))
    assert r.exit_code == 0, r.output
    store = read_store(out)
    info = store.weak_info["imagenet-source-net"]
    assert info["kind"] == "mapped from another label space" and info["text_tower"].startswith("open_clip:")
    data = load_dataset("cifar10", domain=None, root=str(fake_cifar10))
    ids = store.splits["test"].ids_N
    probs = _source_probs(folder, data, ids)
    enc = load_strong(tiny_clip)
    with torch.no_grad():
        src = enc.encode_text([f"a photo of a {n.split(',')[0]}." for n in labels]).float().numpy()
        tgt = enc.encode_text([f"a photo of a {n}." for n in data.class_names]).float().numpy()
    src /= np.linalg.norm(src, axis=1, keepdims=True)
    tgt /= np.linalg.norm(tgt, axis=1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :5]  # TOP = 10 > 5 source classes: every source counts
    weights = np.take_along_axis(probs, top, 1)
    mixed = np.einsum("bt,btd->bd", weights / weights.sum(1, keepdims=True), src[top])
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    np.testing.assert_allclose(store.splits["test"].weak_logits["imagenet-source-net"], mixed @ tgt.T / 0.01,
                               rtol=1e-3, atol=1e-2)
    nearest = set((src @ tgt.T).argmax(1).tolist())
    assert info["uncovered_classes"] == 10 - len(nearest)  # at most 5 of 10 targets are any source's nearest
    assert "covered by no source class" in r.output


def test_a_mapped_teacher_with_a_mapping_file_sums_the_source_probabilities(fake_cifar10, source_classifier,
                                                                             tmp_path):
    folder, labels = source_classifier
    mapping = tmp_path / "map.tsv"
    mapping.write_text("airliner\tairplane\n1\tautomobile\ntabby, tabby cat\tcat\ngoldfish\tship\n"
                       "container ship\tship\n")
    out = tmp_path / "store.h5"
    r = _extract("--dataset", "cifar10", "--root", str(fake_cifar10), "--weak", f"imagenet:{folder}:{mapping}",
                 "--strong", "efficientnet-lite0@32", "--out", str(out))
    assert r.exit_code == 0, r.output
    store = read_store(out)
    name = "imagenet-source-net-map"
    data = load_dataset("cifar10", domain=None, root=str(fake_cifar10))
    probs = _source_probs(folder, data, store.splits["test"].ids_N)
    sums = np.zeros((len(probs), 10))
    for source, target in ((0, 0), (1, 1), (2, 3), (3, 8), (4, 8)):
        sums[:, target] += probs[:, source]
    got = np.exp(store.splits["test"].weak_logits[name].astype(np.float64))
    covered = [0, 1, 3, 8]
    np.testing.assert_allclose(got[:, covered], sums[:, covered], rtol=1e-5)
    assert np.all(got[:, [2, 4, 5, 6, 7, 9]] < 1e-11)  # no source: log(EPS)
    assert store.weak_info[name]["uncovered_classes"] == 6 and "6 of 10 target classes" in r.output
    bad = tmp_path / "bad.tsv"
    bad.write_text("zebra\tcat\n")
    r = _extract("--dataset", "cifar10", "--root", str(fake_cifar10), "--weak", f"imagenet:{folder}:{bad}",
                 "--strong", "efficientnet-lite0@32", "--out", str(tmp_path / "other.h5"))
    assert r.exit_code == 1 and "source class 'zebra'" in r.output and "Traceback" not in r.output


def test_w2s_run_on_cifar10_with_teachers_without_target_labels(fake_cifar10, tiny_clip, source_classifier,
                                                                 tmp_path, monkeypatch):
    from extract.experiment import main as run_main

    folder, _ = source_classifier
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
out = "{tmp_path / 'out'}"
strong = "{tiny_clip}"
[[data]]
dataset = "cifar10"
root = "{fake_cifar10}"
weak = ["zeroshot:{tiny_clip}", "imagenet:{folder}"]
[fit]
methods = ["ce+lp", "cpl"]
seeds = 2
epochs = 2
[extract]
num_workers = 0
""")
    r = CliRunner().invoke(run_main, [str(exp), "--no-compile-cache"])
    assert r.exit_code == 0, r.output
    report = tmp_path / "out" / "report"
    name = f"zeroshot-{tiny_clip.split(':')[0]}-tiny"
    for weak, kind in ((name, "zero-shot"), ("imagenet-source-net", "mapped from another label space")):
        assert f"weak model {weak} ({kind})" in (report / f"table2-{weak}.md").read_text()
    written = {p.stem for p in report.glob("*.md")}
    assert {f"headline-{name}", "table3-cifar10-cifar10", "pgr", "selection"} <= written
    page = (report / "index.html").read_text()
    assert "zero-shot" in page and "mapped from another label space" in page


def test_imagenet_shifts_in_one_experiment_give_a_cross_domain_matrix_on_class_subsets(tiny_clip, tmp_path):
    """ImageNet-Sketch (1000 classes) and ImageNet-R (its 200) as domains of one block: Sketch's heads and its
    zero-shot teacher classify R's images among R's 200 classes; R's heads have no cell on Sketch, with a note."""
    from extract.experiment import main as run_main

    r_wnids, all_wnids = named.imagenet_wnids("imagenet-r"), named.imagenet_wnids()
    for k, wnid in enumerate(r_wnids[:3]):
        for i in range(8):
            _jpeg(tmp_path / "data" / "imagenet-r" / wnid / f"{i}.jpg", 60 * k + i)
            _jpeg(tmp_path / "data" / "imagenet-sketch" / "sketch" / wnid / f"{i}.JPEG", 60 * k + 2 * i)
    assert all(w in all_wnids for w in r_wnids[:3])
    exp = tmp_path / "exp.toml"
    exp.write_text(f"""
out = "{tmp_path / 'out'}"
strong = "{tiny_clip}"
[[data]]
dataset = "imagenet"
domains = ["imagenet-sketch", "imagenet-r"]
root = "{tmp_path / 'data'}"
weak = ["zeroshot:{tiny_clip}"]
[fit]
methods = ["ce+lp"]
seeds = 2
epochs = 2
[extract]
num_workers = 0
templates = ["a photo of a {{}}."]
[report]
cross_domain = true
""")
    r = CliRunner().invoke(run_main, [str(exp), "--no-compile-cache"])
    assert r.exit_code == 0, r.output
    weak = f"zeroshot-{tiny_clip.split(':')[0]}-tiny"
    table = (tmp_path / "out" / "report" / f"cross-domain-{weak}.md").read_text()
    assert "imagenet/imagenet-sketch" in table and "imagenet/imagenet-r" in table
    assert "the target has classes the heads of imagenet/imagenet-r lack" in table
    cross = list((tmp_path / "out" / "cross-weak" / weak).glob("imagenet-imagenet-sketch__on__imagenet-imagenet-r*"))
    assert len(cross) == 1 and np.load(cross[0])["logits_NxK"].shape[1] == 200
    assert not list((tmp_path / "out" / "cross-weak" / weak).glob("imagenet-imagenet-r__on__*"))
