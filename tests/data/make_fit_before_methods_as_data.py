"""Snapshot of the fit before 'methods as data' (commit e29a82a): every method, 2 seeds x 2 lrs."""
import sys
sys.path.insert(0, "tests")
import numpy as np, jax, jax.numpy as jnp, flax.linen as nn
from conftest import synthetic_store
from w2s_jax import heads, fit as fitlib
from w2s_jax.config import FitConfig
from w2s_jax.methods import jax_methods, Method, METHODS
from w2s_jax.splits import stacked_splits
from w2s_jax.store import read_store

class TanhHead(nn.Module):
    num_classes: int
    @nn.compact
    def __call__(self, feats_BxD, hp, start=None):
        return nn.Dense(self.num_classes)(jnp.tanh(hp.lp_scale * feats_BxD))

heads.HEADS["tanh"] = heads.Head(TanhHead)
METHODS["kd+tanh"] = Method("tanh", "kd", "weak")
path = "/tmp/golden_store.h5"  # any path; the store is made here
synthetic_store(path)
store = read_store(path)
test = store.splits["test"]
weak = test.weak_logits["noisy"]
other = weak + np.random.default_rng(0).normal(size=weak.shape).astype(np.float32)
data = fitlib.make_data(test.features_NxD, weak, test.labels_N, np.stack([weak, other]))
methods = (*jax_methods(multi_weak=True), "kd+tanh")
cfg = FitConfig(store=path, weak="noisy", ensemble=("noisy", "other"), methods=methods, seeds=2,
                grid=(("lr", (1e-2, 3e-3)),), epochs=4, batch_size=64)
out, _ = fitlib.fit_methods(cfg, data, stacked_splits(len(test.ids_N), 2), store.text_TxKxD, store.num_classes)
flat = {}
for m, o in out.items():
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(o._asdict())[0]:
        flat[m + "|" + jax.tree_util.keystr(keypath)] = np.asarray(leaf)
np.savez_compressed(sys.argv[1], **flat)
print(len(flat), sorted(flat)[:40])
