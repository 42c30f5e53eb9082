"""The store contract: round trip, validation on open, atomic writing."""
import dataclasses

import h5py
import numpy as np
import pytest

from conftest import synthetic_store
from w2s_jax import store as st


def test_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    written = synthetic_store(path)
    read = st.read_store(path)
    assert read.provenance == written.provenance
    np.testing.assert_array_equal(read.text_TxKxD, written.text_TxKxD)
    for name in st.SPLITS:
        a, b = read.splits[name], written.splits[name]
        np.testing.assert_array_equal(a.features_NxD, b.features_NxD)
        np.testing.assert_array_equal(a.labels_N, b.labels_N)
        assert a.ids_N == b.ids_N
        np.testing.assert_array_equal(a.weak_logits["noisy"], b.weak_logits["noisy"])
    assert read.weak_names == ("noisy",)
    assert not (tmp_path / "s.h5.tmp").exists()


def _rewrite(path, fn):
    with h5py.File(path, "r+") as f:
        fn(f)


@pytest.mark.parametrize("corrupt, message", [
    (lambda f: f["splits/test/weak/noisy_NxK"].__setitem__((0, 0), np.nan), "non-finite"),
    (lambda f: f["splits/train/features_NxD"].__setitem__((1, 1), np.inf), "non-finite"),
    (lambda f: f["splits/test/labels_N"].__setitem__(0, 99), "labels span"),
    (lambda f: f.attrs.__setitem__("schema_version", 0), "schema version 0"),
    (lambda f: f.attrs.__setitem__("complete", False), "incomplete"),
])
def test_bad_stores_are_refused_with_the_reason(tmp_path, corrupt, message):
    path = tmp_path / "s.h5"
    synthetic_store(path)
    _rewrite(path, corrupt)
    with pytest.raises(st.StoreError, match=message) as err:
        st.read_store(path)
    assert str(path) in str(err.value) and "fix:" in str(err.value)


def test_missing_store_and_missing_weak_model(tmp_path):
    with pytest.raises(st.StoreError, match="run w2s-extract"):
        st.read_store(tmp_path / "nope.h5")
    (tmp_path / "half.h5.parts").mkdir()
    with pytest.raises(st.StoreError, match="resume"):
        st.read_store(tmp_path / "half.h5")
    path = tmp_path / "s.h5"
    synthetic_store(path)
    with pytest.raises(st.StoreError, match=r"\['resnet18-finetune'\] not in store; it has \['noisy'\]"):
        st.read_store(path, need_weak=("resnet18-finetune",))


def test_not_hdf5(tmp_path):
    path = tmp_path / "s.h5"
    path.write_text("hello")
    with pytest.raises(st.StoreError, match="not a readable HDF5"):
        st.read_store(path)


def test_writer_refuses_inconsistent_shapes(tmp_path):
    store = synthetic_store(tmp_path / "a.h5")
    bad = dataclasses.replace(store.splits["test"], weak_logits={"noisy": np.zeros((3, 5), np.float32)})
    with pytest.raises(st.StoreError, match="expected"):
        st.write_store(tmp_path / "b.h5", dataclasses.replace(store, splits={**store.splits, "test": bad}))
    assert not (tmp_path / "b.h5").exists()


def test_compatibility_problems_name_the_field():
    prov = st.Provenance("d", "x", ("a", "b"), (), "enc1", "{}", "h", {}, "t")
    other = dataclasses.replace(prov, encoder="enc2", class_names=("a", "c"))
    problems = st.compatibility_problems(prov, other)
    assert any("encoder differs" in p for p in problems) and any("class_names" in p for p in problems)
    assert st.compatibility_problems(prov, dataclasses.replace(prov, created="later")) == []
