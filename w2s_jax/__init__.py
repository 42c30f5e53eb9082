"""w2s, the JAX side: read a feature store, fit heads, report. ``w2s_jax.load_heads(results_dir)`` reads the
learned heads of a results folder (:mod:`w2s_jax.saved_heads`)."""


def __getattr__(name):  # lazy, so that importing a small module (the store, say) does not import flax
    if name == "load_heads":
        from w2s_jax.saved_heads import load_heads

        return load_heads
    raise AttributeError(f"module 'w2s_jax' has no attribute {name!r}")
