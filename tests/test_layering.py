"""The JAX side never imports torch."""
import subprocess
import sys


def test_w2s_jax_does_not_import_torch():
    code = ("import sys, w2s_jax.cli, w2s_jax.run, w2s_jax.report, w2s_jax.sharding, w2s_jax.store; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
