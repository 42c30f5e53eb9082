"""The grid sharded over 4 forced host devices gives the single-device metrics for every seed."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import synthetic_store
from w2s_jax.config import FitConfig
from w2s_jax.run import run

SNIPPET = """
import json, sys
import jax
assert jax.device_count() == 4, jax.devices()
from w2s_jax.config import FitConfig
from w2s_jax.run import run
cfg = FitConfig(**json.loads(sys.argv[1]))
run(cfg, sys.argv[2])
"""


def test_sharded_fit_equals_single_device(tmp_path):
    path = tmp_path / "s.h5"
    synthetic_store(path, n_test=300)
    fields = dict(store=str(path), weak="noisy", methods=("cpl", "kd+lp"), seeds=3, epochs=3, batch_size=64,
                  grid=(("lr", (1e-2, 3e-3)),))  # 6 models: not a multiple of 4, so padding is exercised
    single, _ = run(FitConfig(**fields), tmp_path / "one")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", SNIPPET, json.dumps(fields), str(tmp_path / "four")], env=env, check=True,
                   cwd=os.path.dirname(os.path.dirname(__file__)))
    sharded = json.loads((tmp_path / "four" / "metrics.json").read_text())
    for m in fields["methods"]:
        for key in ("test_acc", "agreement", "val_score"):
            np.testing.assert_allclose(sharded["methods"][m]["grid"][key], single["methods"][m]["grid"][key], atol=1e-6)
        assert sharded["methods"][m]["best_epoch"] == single["methods"][m]["best_epoch"]
    assert json.loads((tmp_path / "four" / "timings.json").read_text())["devices"].__len__() == 4
