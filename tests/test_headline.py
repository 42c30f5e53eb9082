"""The headline commands as written: `w2s-extract --domain real` and `w2s-fit --seeds 5 --vmap`, offline."""
import pytest
from click.testing import CliRunner

from conftest import synthetic_store
from extract import cli as extract_cli
from w2s_jax import cli as fit_cli
from w2s_jax.store import read_store


def extract(*args):
    return CliRunner().invoke(extract_cli.main, ["--num-workers", "0", "--batch-size", "4", *map(str, args)])


def test_domain_real_alone_means_domainnet_from_the_default_root(domainnet_root, tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_DATA", str(domainnet_root.parent))  # the fixture's tree is <tmp>/domainnet
    out = tmp_path / "s.h5"
    r = extract("--domain", "real", "--strong", tiny_clip, "--weak", "pixels@2", "--out", out)
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert (store.provenance.dataset, store.provenance.domain) == ("domainnet", "real")
    assert store.provenance.class_names == ("cat", "hot air balloon", "zebra")


def test_a_missing_domain_is_downloaded_into_the_default_root(mirror, tiny_clip, tmp_path, monkeypatch):
    url, _, server = mirror
    monkeypatch.setenv("W2S_DATA", str(tmp_path / "data"))
    out = tmp_path / "s.h5"
    r = extract("--domain", "real", "--mirror", url, "--strong", tiny_clip, "--weak", "pixels@2", "--out", out)
    assert r.exit_code == 0, r.output
    assert "missing" in r.output and "GB" in r.output
    assert (tmp_path / "data" / "domainnet" / "real_test.txt").is_file()
    assert {path for path, _ in server.requests} == {"/real.zip", "/domainnet/txt/real_train.txt",
                                                     "/domainnet/txt/real_test.txt"}
    assert len(read_store(out).splits["test"].ids_N) == 9


def test_no_download_refuses_with_the_command_to_run(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_DATA", str(tmp_path / "data"))
    r = extract("--domain", "real", "--no-download")
    root = tmp_path / "data" / "domainnet"
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert f"w2s-extract download --domain real --root {root}" in r.output and "by hand" in r.output


def test_an_explicit_root_is_never_filled_by_a_download(tmp_path):
    r = extract("--domain", "real", "--root", tmp_path / "typo")
    assert r.exit_code != 0 and "not the default data folder" in r.output and "w2s-extract download" in r.output


def test_unreachable_download_says_how_to_place_files_by_hand(tmp_path, monkeypatch):
    monkeypatch.setenv("W2S_DATA", str(tmp_path / "data"))
    r = extract("--domain", "sketch", "--mirror", "http://127.0.0.1:9")
    assert r.exit_code != 0 and "cannot connect" in r.output and "by hand" in r.output


def test_unknown_domain_lists_the_choices():
    r = extract("--domain", "cartoon")
    assert r.exit_code != 0 and "clipart" in r.output and "mnist" in r.output and "imagefolder" in r.output


def test_weak_paper_means_the_papers_five():
    from extract.weak import expand_weak

    assert expand_weak(["paper"]) == ["resnet18", "resnet26", "resnet34", "cvt13", "convnext-tiny"]
    assert expand_weak(["pixels@4", "paper"])[:2] == ["pixels@4", "resnet18"]


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "stores").mkdir()
    return tmp_path


def test_fit_without_store_uses_the_only_store(in_tmp):
    synthetic_store(in_tmp / "stores" / "only.h5", n_test=200)
    r = CliRunner().invoke(fit_cli.main, ["--seeds", "2", "--vmap", "--methods", "cpl", "--epochs", "1",
                                          "--batch-size", "64"])
    assert r.exit_code == 0, r.output
    assert "using the only store under stores/: stores/only.h5" in r.output and "| cpl |" in r.output


def test_fit_without_store_refuses_with_a_list_or_a_recipe(in_tmp):
    r = CliRunner().invoke(fit_cli.main, ["--seeds", "5", "--vmap"])
    assert r.exit_code != 0 and "w2s-extract --domain real" in r.output and "w2s-extract --dataset demo" in r.output
    for name in ("a.h5", "b.h5"):
        synthetic_store(in_tmp / "stores" / name, n_test=50)
    r = CliRunner().invoke(fit_cli.main, ["--seeds", "5", "--vmap"])
    assert r.exit_code != 0 and "stores/a.h5" in r.output and "stores/b.h5" in r.output and "--store" in r.output
