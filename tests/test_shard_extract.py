"""Sharded extraction: torchrun with 2 gloo ranks, and --shard array jobs with a killed shard, equal one process."""
import os
import subprocess
import sys

import numpy as np
from click.testing import CliRunner

from extract import cli
from w2s_jax.store import read_store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def args(root, out):
    return ["--dataset", "imagefolder", "--root", str(root), "--strong", "efficientnet-lite0@32", "--weak", "pixels@2",
            "--batch-size", "4", "--num-workers", "0", "--out", str(out)]


def assert_same_store(a_path, b_path):
    a, b = read_store(a_path), read_store(b_path)
    for split in ("train", "test"):
        assert a.splits[split].ids_N == b.splits[split].ids_N
        np.testing.assert_allclose(a.splits[split].features_NxD, b.splits[split].features_NxD, atol=1e-5)
        np.testing.assert_allclose(a.splits[split].weak_logits["pixels@2"], b.splits[split].weak_logits["pixels@2"],
                                   atol=1e-4)


def test_torchrun_two_ranks_equals_one_process(imagefolder_root, tmp_path):
    single = tmp_path / "single.h5"
    assert CliRunner().invoke(cli.main, args(imagefolder_root, single)).exit_code == 0
    ranks = tmp_path / "ranks.h5"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "extract.cli", *args(imagefolder_root, ranks)], check=True, cwd=ROOT, env=env,
                   capture_output=True, timeout=300)
    assert_same_store(single, ranks)
    assert not (tmp_path / "ranks.h5.parts").exists()


def test_shards_then_merge_and_a_killed_shard_resumes(imagefolder_root, tmp_path):
    single = tmp_path / "single.h5"
    assert CliRunner().invoke(cli.main, args(imagefolder_root, single)).exit_code == 0
    out = tmp_path / "sharded.h5"
    for i in (0, 1):
        r = CliRunner().invoke(cli.main, [*args(imagefolder_root, out), "--shard", f"{i}/2"])
        assert r.exit_code == 0 and "without --shard to merge" in r.output
    assert not out.exists()
    parts = sorted((tmp_path / "sharded.h5.parts").rglob("*.npz"))
    # shard 1 "was killed" before writing its last batch; its rerun redoes only that batch
    lost = [p for p in parts if int(p.stem) % 2 == 1][-1]
    lost.unlink()
    kept = {p: p.stat().st_mtime_ns for p in parts if p != lost}
    assert CliRunner().invoke(cli.main, [*args(imagefolder_root, out), "--shard", "1/2"]).exit_code == 0
    assert lost.exists() and all(p.stat().st_mtime_ns == t for p, t in kept.items())
    r = CliRunner().invoke(cli.main, args(imagefolder_root, out))  # the merge
    assert r.exit_code == 0, r.output
    assert_same_store(single, out)


def test_bad_shard_spec():
    r = CliRunner().invoke(cli.main, ["--shard", "2/2"])
    assert r.exit_code != 0 and "I/N" in r.output
