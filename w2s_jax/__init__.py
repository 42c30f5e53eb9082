"""w2s, the JAX side: read a feature store, fit heads, report. ``w2s_jax.load_heads(results_dir)`` reads the
learned heads of a results folder (:mod:`w2s_jax.saved_heads`); ``w2s_jax.define_method(name, head, **coeffs)``
adds a method that is a row of the loss family (:mod:`w2s_jax.methods`)."""


def __getattr__(name):  # lazy, so that importing a small module (the store, say) does not import flax
    if name == "load_heads":
        from w2s_jax.saved_heads import load_heads

        return load_heads
    if name == "define_method":
        from w2s_jax.methods import define_method

        return define_method
    raise AttributeError(f"module 'w2s_jax' has no attribute {name!r}")
