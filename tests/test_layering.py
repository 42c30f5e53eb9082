"""The JAX side never imports torch."""
import subprocess
import sys


def test_w2s_jax_does_not_import_torch():
    code = ("import sys, w2s_jax.cli, w2s_jax.run, w2s_jax.report, w2s_jax.sharding, w2s_jax.store; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith('torch.')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_below_the_plan_nothing_reads_the_config():
    """The fit reads its FitConfig once, in ``w2s_jax.fit.plan`` (``make_plan``, ``recipe_of``, the memory
    estimate); the groups, padding, epoch and driver modules receive the plan's fields: none of their functions
    takes a FitConfig (by annotation or as ``cfg``), and none imports it."""
    import inspect

    from w2s_jax.fit import driver, epoch, groups, padding

    found = []
    for module in (groups, padding, epoch, driver):
        assert "FitConfig" not in vars(module), module.__name__
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ != module.__name__:
                continue
            for param in inspect.signature(fn).parameters.values():
                if param.name == "cfg" or "FitConfig" in str(param.annotation):
                    found.append(f"{module.__name__}.{name}({param.name})")
    assert not found, found


def test_no_module_is_over_about_500_lines():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    long = {str(p.relative_to(root)): n for p in [*root.glob("w2s_jax/**/*.py"), *root.glob("extract/**/*.py")]
            if (n := len(p.read_text().splitlines())) > 550}
    assert not long, long
