"""Every loss against a plain NumPy transcription of its formula (DESIGN.md §3), under jit; gradients."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.config import Hparams
from w2s_jax.losses import LOSSES, get_loss

jax.config.update("jax_enable_x64", False)
HP = Hparams(temperature=2.0, alpha_max=0.5, aux_warmup=0.2, tau_a=0.7)


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def ce_hard(zs, y):
    return -np.log(softmax(zs)[np.arange(len(y)), y])


def kl(p, q):
    return np.sum(p * (np.log(p) - np.log(q)), axis=1)


def np_ce(zs, zw, progress, hp):
    return ce_hard(zs, zw.argmax(1))


def np_kd(zs, zw, progress, hp):
    t = hp.temperature
    return t**2 * kl(softmax(zw / t), softmax(zs / t))


def np_cpl(zs, zw, progress, hp):
    t = hp.temperature  # sum p^w log(p^w / p^s), one temperature on both sides
    pw, ps = softmax(zw / t), softmax(zs / t)
    return np.sum(pw * np.log(pw / ps), axis=1)


def np_auxconf(zs, zw, progress, hp):
    alpha = hp.alpha_max * min(1.0, progress / hp.aux_warmup)
    target = (1 - alpha) * softmax(zw) + alpha * np.eye(zs.shape[1])[zs.argmax(1)]
    return -np.sum(target * np.log(softmax(zs)), axis=1)


def np_adaptconf(zs, zw, progress, hp):
    a, b = ce_hard(zs, zs.argmax(1)), ce_hard(zs, zw.argmax(1))
    alpha = np.exp(a / hp.tau_a) / (np.exp(a / hp.tau_a) + np.exp(b / hp.tau_a))
    return (1 - alpha) * np_kd(zs, zw, progress, hp) + alpha * a


REFERENCE = {"ce": np_ce, "kd": np_kd, "cpl": np_cpl, "auxconf": np_auxconf, "adaptconf": np_adaptconf}


def test_registry_is_complete():
    assert set(REFERENCE) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("progress", [0.05, 0.5])
def test_loss_matches_numpy(name, progress):
    rng = np.random.default_rng(0)
    zs, zw = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    fn = jax.jit(lambda a, b: get_loss(name)(a, b, progress=progress, hp=HP))
    got = np.asarray(fn(jnp.asarray(zs, jnp.float32), jnp.asarray(zw, jnp.float32)))
    assert got.shape == (7,)
    np.testing.assert_allclose(got, REFERENCE[name](zs, zw, progress, HP), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("name", ["ce", "kd", "cpl"])
def test_gradient_matches_finite_differences(name):
    """Smooth losses: autodiff equals central differences of the NumPy transcription."""
    rng = np.random.default_rng(1)
    zs, zw = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    grad = jax.grad(lambda a: jnp.sum(get_loss(name)(a, jnp.asarray(zw), progress=0.5, hp=HP)))(jnp.asarray(zs))
    eps, num = 1e-4, np.zeros_like(zs)
    for idx in np.ndindex(*zs.shape):
        up, down = zs.copy(), zs.copy()
        up[idx] += eps
        down[idx] -= eps
        num[idx] = (REFERENCE[name](up, zw, 0.5, HP).sum() - REFERENCE[name](down, zw, 0.5, HP).sum()) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), num, rtol=1e-3, atol=1e-4)


def test_auxconf_and_adaptconf_stop_gradient_through_their_weights():
    """The self-label of AuxConf and the weight alpha of AdaptConf are constants for the gradient."""
    rng = np.random.default_rng(2)
    zs, zw = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)))
    # AuxConf at full alpha: gradient equals that of CE against the fixed mixed target
    hp = HP._replace(aux_warmup=0.1)
    target = 0.5 * jax.nn.softmax(zw) + 0.5 * jax.nn.one_hot(jnp.argmax(zs, 1), 3)
    g_aux = jax.grad(lambda a: get_loss("auxconf")(a, zw, progress=1.0, hp=hp).sum())(zs)
    g_ref = jax.grad(lambda a: -(target * jax.nn.log_softmax(a)).sum())(zs)
    np.testing.assert_allclose(np.asarray(g_aux), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_cpl_is_kl_of_weak_to_student_not_reverse():
    zs, zw = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 3.0, 0.0]])
    pw, ps = jax.nn.softmax(zw), jax.nn.softmax(zs)
    forward = jnp.sum(pw * jnp.log(pw / ps))
    reverse = jnp.sum(ps * jnp.log(ps / pw))
    got = get_loss("cpl")(zs, zw, progress=0.0, hp=Hparams(temperature=1.0))[0]
    assert abs(got - forward) < 1e-5 and abs(got - reverse) > 1e-2


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError, match="valid: ce, kd"):
        get_loss("nope")
