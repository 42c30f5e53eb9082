"""DomainNet layout, image folders and the demo: parsing and clear errors."""
import numpy as np
import pytest

from conftest import CLASSES
from extract.datasets import DatasetError, load_dataset


def test_domainnet_official_layout(domainnet_root):
    ds = load_dataset("domainnet", domain="real", root=str(domainnet_root))
    assert ds.class_names == ("cat", "hot air balloon", "zebra")
    ids, labels = ds.splits["test"]
    assert len(ids) == 9 and ids[0].startswith("real/cat/")
    assert ds.load(ids[0]).mode == "RGB"
    np.testing.assert_array_equal(np.bincount(labels), [3, 3, 3])


@pytest.mark.parametrize("kwargs, message", [
    (dict(domain="photos"), "choose one of clipart, infograph"),
    (dict(domain="sketch"), "sketch_train.txt not found"),
])
def test_domainnet_errors(domainnet_root, kwargs, message):
    with pytest.raises(DatasetError, match=message):
        load_dataset("domainnet", root=str(domainnet_root), **kwargs)


def test_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset("domainnet", domain="real", root=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="--root is required"):
        load_dataset("imagefolder", domain=None, root=None)


def test_domainnet_inconsistent_labels(domainnet_root):
    path = domainnet_root / "real_train.txt"
    path.write_text(path.read_text() + "real/zebra/extra.jpg 0\n")
    with pytest.raises(DatasetError, match="label 0 is used for both"):
        load_dataset("domainnet", domain="real", root=str(domainnet_root))


def test_imagefolder_from_folders_and_from_split_files(imagefolder_root):
    ds = load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    assert ds.domain == "folder" and ds.class_names == tuple(c.replace("_", " ") for c in CLASSES)
    assert len(ds.splits["train"][0]) == 12 and len(ds.splits["test"][0]) == 18
    # the same images listed in split files
    for split in ("train", "test"):
        ids, labels = ds.splits[split]
        (imagefolder_root / f"{split}.txt").write_text("".join(f"{i} {y}\n" for i, y in zip(ids, labels)))
    from_files = load_dataset("imagefolder", domain=None, root=str(imagefolder_root))
    assert from_files.splits["test"][0] == ds.splits["test"][0]
    assert from_files.class_names == ds.class_names


def test_imagefolder_without_splits(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="needs train/ and test/"):
        load_dataset("imagefolder", domain=None, root=str(tmp_path))


def test_demo_domains():
    mnist = load_dataset("demo", domain="mnist", root=None)
    assert len(mnist.splits["train"][0]) == len(mnist.splits["test"][0]) == 2500
    assert set(mnist.splits["train"][0]).isdisjoint(mnist.splits["test"][0])
    digits = load_dataset("demo", domain="digits", root=None)
    assert len(digits.class_names) == 10 and digits.load(digits.splits["test"][0][0]).size == (8, 8)
    assert load_dataset("demo", domain="mnist", root=None).split_hash == mnist.split_hash
    with pytest.raises(DatasetError, match="mnist, digits"):
        load_dataset("demo", domain="svhn", root=None)
