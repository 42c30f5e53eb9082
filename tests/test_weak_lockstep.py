"""The fine-tuned weak models of a store train in lockstep: each image decoded once per epoch for all of them,
each model trained as it would be alone; one that fails is named and the others are kept."""
from collections import Counter

import numpy as np
import torch
from click.testing import CliRunner

from extract import cli, pipeline, weak
from w2s_jax.store import read_store

N_TRAIN, N_ALL = 6, 15  # the domainnet_root fixture: 6 train and 9 test images


def extract(root, clip, out, *weaks, epochs=2):
    args = ["--num-workers", "0", "--batch-size", "4", "--dataset", "domainnet", "--domain", "real", "--root", root,
            "--strong", clip, "--weak-epochs", str(epochs), "--out", out]
    return CliRunner().invoke(cli.main, [*map(str, args), *[x for w in weaks for x in ("--weak", w)]])


def other_resnet(tmp_path) -> str:
    """A second tiny HF ResNet with other weights (conftest's tiny_resnet_dir is seed 0)."""
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(1)
    folder = tmp_path / "other-resnet"
    ResNetForImageClassification(ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                              num_labels=2)).save_pretrained(folder)
    return str(folder)


def count_reads(monkeypatch) -> Counter:
    """Images decoded per pass key (the loader runs in this process: --num-workers 0)."""
    reads, read = Counter(), pipeline.ImageDataset.__getitem__

    def counted(self, item):
        reads[item[0]] += 1
        return read(self, item)

    monkeypatch.setattr(pipeline.ImageDataset, "__getitem__", counted)
    return reads


def test_two_weak_models_fine_tune_in_lockstep_as_each_would_alone(domainnet_root, tiny_clip, tiny_resnet_dir,
                                                                   tmp_path, monkeypatch):
    other = other_resnet(tmp_path)
    reads = count_reads(monkeypatch)
    both = tmp_path / "both.h5"
    r = extract(domainnet_root, tiny_clip, both, f"{tiny_resnet_dir}:finetune", f"{other}:finetune")
    assert r.exit_code == 0, r.output
    # per epoch one decode for both; their logits come from the strong features' pass, one decode per image
    assert reads == {pipeline.TUNED: 2 * N_TRAIN, "features": N_ALL}
    together = read_store(both)
    assert together.weak_names == ("other-resnet-finetune", "tiny-resnet-finetune")
    for folder, name in ((tiny_resnet_dir, "tiny-resnet-finetune"), (other, "other-resnet-finetune")):
        reads.clear()
        alone = tmp_path / f"{name}.h5"
        assert extract(domainnet_root, tiny_clip, alone, f"{folder}:finetune").exit_code == 0
        assert reads == {pipeline.TUNED: 2 * N_TRAIN, "features": N_ALL}
        for split in ("train", "test"):
            np.testing.assert_allclose(together.splits[split].weak_logits[name],
                                       read_store(alone).splits[split].weak_logits[name], atol=1e-5)
        assert together.weak_info[name] == read_store(alone).weak_info[name]
    a, b = (together.splits["test"].weak_logits[n] for n in together.weak_names)
    assert not np.allclose(a, b)  # two different models, each its own


def test_logits_from_the_feature_pass_equal_those_of_their_own_pass(domainnet_root, tiny_clip, tiny_resnet_dir,
                                                                    tmp_path, monkeypatch):
    """A new store's fine-tuned weak models give their logits in the strong features' pass; added to a store that
    exists, they take a pass of their own (the path before issue 30). Same numbers either way."""
    reads = count_reads(monkeypatch)
    built = tmp_path / "built.h5"
    assert extract(domainnet_root, tiny_clip, built, f"{tiny_resnet_dir}:finetune").exit_code == 0
    added = tmp_path / "added.h5"
    assert extract(domainnet_root, tiny_clip, added, "pixels").exit_code == 0
    reads.clear()
    r = extract(domainnet_root, tiny_clip, added, f"{tiny_resnet_dir}:finetune")
    assert r.exit_code == 0, r.output
    assert reads == {pipeline.TUNED: 2 * N_TRAIN + N_ALL}  # fine-tuning, then the logits' own pass
    name = "tiny-resnet-finetune"
    for split in ("train", "test"):
        np.testing.assert_allclose(read_store(added).splits[split].weak_logits[name],
                                   read_store(built).splits[split].weak_logits[name], atol=1e-5)
    assert read_store(added).weak_info[name] == read_store(built).weak_info[name]


def test_sharded_features_then_a_merge_that_fine_tunes(domainnet_root, tiny_clip, tiny_resnet_dir, tmp_path,
                                                       monkeypatch):
    """Shards compute the features only; the merge fine-tunes, then reads each image once more for the logits alone
    and keeps the shards' features."""
    single = tmp_path / "single.h5"
    assert extract(domainnet_root, tiny_clip, single, f"{tiny_resnet_dir}:finetune").exit_code == 0
    out = tmp_path / "sharded.h5"
    for i in (0, 1):
        r = CliRunner().invoke(cli.main, [*map(str, ["--num-workers", "0", "--batch-size", "4", "--dataset",
                                                     "domainnet", "--domain", "real", "--root", domainnet_root,
                                                     "--strong", tiny_clip, "--weak-epochs", "2", "--out", out,
                                                     "--weak", f"{tiny_resnet_dir}:finetune", "--shard", f"{i}/2"])])
        assert r.exit_code == 0, r.output
    assert not list(tmp_path.glob("sharded.h5.parts/weak-*.pt"))  # no shard fine-tuned
    calls = Counter()  # rows each head computes in the merge: the shards' strong features are kept
    monkeypatch.setattr(pipeline, "run_splits", counted_heads(pipeline.run_splits, calls))
    r = extract(domainnet_root, tiny_clip, out, f"{tiny_resnet_dir}:finetune")
    assert r.exit_code == 0, r.output
    assert calls["strong"] == 0 and calls["tiny-resnet-finetune"] == N_ALL
    a, b = read_store(single), read_store(out)
    for split in ("train", "test"):
        np.testing.assert_allclose(a.splits[split].features_NxD, b.splits[split].features_NxD, atol=1e-6)
        np.testing.assert_allclose(a.splits[split].weak_logits["tiny-resnet-finetune"],
                                   b.splits[split].weak_logits["tiny-resnet-finetune"], atol=1e-5)


def counted_heads(run_splits, calls: Counter):
    """``run_splits`` whose heads count the rows they compute, into ``calls``, by weak model name (a fine-tuned
    model's head is ``NAME@RECIPE``)."""
    def counted(splits, source, key, heads, *args, **kwargs):
        def counting(name, fn):
            def run(x):
                calls[name.partition("@")[0] if "finetune@" in name else name] += len(x)
                return fn(x)
            return run

        heads = {name: (t, counting(name, fn)) for name, (t, fn) in heads.items()}
        return run_splits(splits, source, key, heads, *args, **kwargs)

    return counted


def test_a_weak_model_that_fails_is_named_and_the_others_are_kept(domainnet_root, tiny_clip, tiny_resnet_dir,
                                                                 tmp_path, monkeypatch):
    other = other_resnet(tmp_path)
    load = weak.load_hf

    def failing(spec, num_classes, device):
        model = load(spec, num_classes, device)
        if spec.name == "other-resnet-finetune":
            def out_of_memory(*args, **kwargs):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

            model.forward = out_of_memory
        return model

    monkeypatch.setattr(weak, "load_hf", failing)
    out = tmp_path / "s.h5"
    r = extract(domainnet_root, tiny_clip, out, f"{tiny_resnet_dir}:finetune", f"{other}:finetune")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "other-resnet-finetune (OutOfMemoryError: CUDA out of memory" in r.output, r.output
    assert "run the same command again to fine-tune only these" in r.output
    kept = read_store(out)
    assert kept.weak_names == ("tiny-resnet-finetune",)
    monkeypatch.setattr(weak, "load_hf", load)
    r = extract(domainnet_root, tiny_clip, out, f"{tiny_resnet_dir}:finetune", f"{other}:finetune")
    assert r.exit_code == 0, r.output
    assert "weak model tiny-resnet-finetune already in" in r.output
    again = read_store(out)
    assert again.weak_names == ("other-resnet-finetune", "tiny-resnet-finetune")
    np.testing.assert_array_equal(again.splits["test"].weak_logits["tiny-resnet-finetune"],
                                  kept.splits["test"].weak_logits["tiny-resnet-finetune"])


def test_weak_models_across_domains_read_each_target_image_once(domainnet_root, tiny_clip, tiny_resnet_dir, tmp_path,
                                                                monkeypatch):
    """Every fine-tuned weak model applied to a target's test images in one pass: each image decoded once for both,
    and each model's logits are its own (here on its own domain: the store's weak logits)."""
    from extract import cross_weak, datasets

    other = other_resnet(tmp_path)
    opts = pipeline.Options(device="cpu", batch_size=4, num_workers=0, weak_epochs=1, log=lambda *a: None)
    data = datasets.load_dataset("domainnet", domain="real", root=str(domainnet_root))
    out = tmp_path / "real.h5"
    pipeline.extract(data, tiny_clip, [f"{tiny_resnet_dir}:finetune", f"{other}:finetune"], out, opts)
    store = read_store(out)
    rows = {s: (sp.ids_N, sp.labels_N) for s, sp in store.splits.items()}
    jobs = [cross_weak.CrossJob(data, rows, weak.parse_weak(f"{folder}:finetune"), out)
            for folder in (tiny_resnet_dir, other)]
    reads = count_reads(monkeypatch)
    paths = cross_weak.write_cross_weak_all(jobs, data, rows["test"], tmp_path / "cw", opts)
    assert reads["weak"] == N_ALL - N_TRAIN  # the 9 test images, once for both models
    for path, name in zip(paths, ("tiny-resnet-finetune", "other-resnet-finetune")):
        with np.load(path) as z:
            np.testing.assert_allclose(z["logits_NxK"], store.splits["test"].weak_logits[name], atol=1e-5)
    reads.clear()
    assert cross_weak.write_cross_weak_all(jobs, data, rows["test"], tmp_path / "cw", opts) == paths
    assert not reads  # done once: the files are kept


def test_unreadable_training_images_stop_fine_tuning_and_are_listed_with_the_others(domainnet_root, tiny_clip,
                                                                                     tiny_resnet_dir, tmp_path):
    """Fine-tuning runs before the feature pass: under --on-corrupt fail it stops at a broken training image, and
    the feature pass lists every split's; with skip, the store leaves them out, weak logits included."""
    broken = ["real/cat/real_train_0_000.jpg", "real/zebra/real_test_2_001.jpg"]
    for rel in broken:
        (domainnet_root / rel).write_bytes(b"broken")
    out = tmp_path / "s.h5"
    r = extract(domainnet_root, tiny_clip, out, f"{tiny_resnet_dir}:finetune")
    assert r.exit_code != 0 and "Traceback" not in r.output
    assert "2 unreadable image(s)" in r.output and all(rel in r.output for rel in broken), r.output
    assert not list(tmp_path.glob("s.h5.parts/weak-*.pt"))  # not trained without the image the user will fix
    r = CliRunner().invoke(cli.main, [*map(str, ["--num-workers", "0", "--batch-size", "4", "--dataset", "domainnet",
                                                 "--domain", "real", "--root", domainnet_root, "--strong", tiny_clip,
                                                 "--weak-epochs", "2", "--out", out, "--on-corrupt", "skip",
                                                 "--weak", f"{tiny_resnet_dir}:finetune"])])
    assert r.exit_code == 0, r.output
    store = read_store(out)
    assert [len(store.splits[s].labels_N) for s in ("train", "test")] == [N_TRAIN - 1, N_ALL - N_TRAIN - 1]
    assert store.splits["test"].weak_logits["tiny-resnet-finetune"].shape[0] == N_ALL - N_TRAIN - 1
