"""The loss family: every built-in row against a plain NumPy transcription of its named formula (DESIGN.md §3),
under jit; gradients; the checks on a user's row."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from w2s_jax.config import Hparams
from w2s_jax.losses import LOSSES, Coeffs, check_coeffs, family_loss, get_loss

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


def np_truth(zs, zw, progress, hp, labels=None):
    return ce_hard(zs, labels)


def np_auxconf_kl(zs, zw, progress, hp):
    """AuxConf as the family reports it: its CE form less the constant (1 - a_t) H(softmax(zw))."""
    alpha = hp.alpha_max * min(1.0, progress / hp.aux_warmup)
    q = softmax(zw)
    return np_auxconf(zs, zw, progress, hp) + (1 - alpha) * np.sum(q * np.log(q), axis=1)


REFERENCE = {"ce": np_ce, "kd": np_kd, "cpl": np_cpl, "auxconf": np_auxconf_kl, "adaptconf": np_adaptconf,
             "truth": np_truth}
LABELS = np.array([0, 1, 2, 3, 4, 0, 1])


def family(name, zs, zw, progress, hp=HP):
    return family_loss(zs, zw, jnp.asarray(LABELS[: zs.shape[0]]), get_loss(name), progress=progress, hp=hp)


def reference(name, zs, zw, progress, hp=HP):
    if name == "truth":
        return np_truth(zs, zw, progress, hp, LABELS[: zs.shape[0]])
    return REFERENCE[name](zs, zw, progress, hp)


def test_registry_is_complete():
    assert set(REFERENCE) == set(LOSSES)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("progress", [0.05, 0.5])
def test_loss_matches_numpy(name, progress):
    rng = np.random.default_rng(0)
    zs, zw = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5)) * 3
    fn = jax.jit(lambda a, b: family(name, a, b, progress))
    got = np.asarray(fn(jnp.asarray(zs, jnp.float32), jnp.asarray(zw, jnp.float32)))
    assert got.shape == (7,)
    np.testing.assert_allclose(got, reference(name, zs, zw, progress), rtol=2e-4, atol=2e-5)


def test_all_rows_are_one_vectorized_loss():
    """The rows of every built-in loss, stacked on a models axis J, give each loss under one vmap."""
    from w2s_jax.losses import stack_rows

    rng = np.random.default_rng(4)
    names = sorted(LOSSES)
    zs_JxBxK = jnp.asarray(rng.normal(size=(len(names), 7, 5)) * 3, jnp.float32)
    zw = jnp.asarray(rng.normal(size=(7, 5)) * 3, jnp.float32)
    hp_J = jax.tree.map(lambda v: jnp.full(len(names), v, jnp.float32), HP)
    got = jax.vmap(lambda z, c, h: family_loss(z, zw, jnp.asarray(LABELS), c, progress=0.3, hp=h))(
        zs_JxBxK, stack_rows([LOSSES[n] for n in names]), hp_J)
    for j, name in enumerate(names):
        np.testing.assert_allclose(got[j], reference(name, np.asarray(zs_JxBxK[j]), np.asarray(zw), 0.3),
                                   rtol=2e-4, atol=2e-5, err_msg=name)


@pytest.mark.parametrize("name", ["ce", "kd", "cpl", "truth"])
def test_gradient_matches_finite_differences(name):
    """Smooth losses: autodiff equals central differences of the NumPy transcription."""
    rng = np.random.default_rng(1)
    zs, zw = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    grad = jax.grad(lambda a: jnp.sum(family(name, a, jnp.asarray(zw), 0.5)))(jnp.asarray(zs))
    eps, num = 1e-4, np.zeros_like(zs)
    for idx in np.ndindex(*zs.shape):
        up, down = zs.copy(), zs.copy()
        up[idx] += eps
        down[idx] -= eps
        num[idx] = (reference(name, up, zw, 0.5).sum() - reference(name, down, zw, 0.5).sum()) / (2 * eps)
    np.testing.assert_allclose(np.asarray(grad), num, rtol=1e-3, atol=1e-4)


def test_auxconf_and_adaptconf_stop_gradient_through_their_weights():
    """The self-label of AuxConf and the weight alpha of AdaptConf are constants for the gradient."""
    rng = np.random.default_rng(2)
    zs, zw = jnp.asarray(rng.normal(size=(4, 3))), jnp.asarray(rng.normal(size=(4, 3)))
    # AuxConf at full alpha: gradient equals that of CE against the fixed mixed target
    hp = HP._replace(aux_warmup=0.1)
    target = 0.5 * jax.nn.softmax(zw) + 0.5 * jax.nn.one_hot(jnp.argmax(zs, 1), 3)
    g_aux = jax.grad(lambda a: family("auxconf", a, zw, 1.0, hp).sum())(zs)
    g_ref = jax.grad(lambda a: -(target * jax.nn.log_softmax(a)).sum())(zs)
    np.testing.assert_allclose(np.asarray(g_aux), np.asarray(g_ref), rtol=1e-5, atol=1e-6)


def test_cpl_is_kl_of_weak_to_student_not_reverse():
    zs, zw = jnp.array([[2.0, 0.0, -1.0]]), jnp.array([[0.0, 3.0, 0.0]])
    pw, ps = jax.nn.softmax(zw), jax.nn.softmax(zs)
    forward = jnp.sum(pw * jnp.log(pw / ps))
    reverse = jnp.sum(ps * jnp.log(ps / pw))
    got = family("cpl", zs, zw, 0.0, Hparams(temperature=1.0))[0]
    assert abs(got - forward) < 1e-5 and abs(got - reverse) > 1e-2


def test_unknown_loss_lists_valid_names():
    with pytest.raises(KeyError, match="valid: ce, kd"):
        get_loss("nope")


def test_adaptconf_gradient_holds_its_gate_fixed():
    """AdaptConf's gradient is that of (1-a) KD + a CE(argmax zs) with a computed aside and held fixed."""
    rng = np.random.default_rng(5)
    zs, zw = jnp.asarray(rng.normal(size=(4, 3)) * 2), jnp.asarray(rng.normal(size=(4, 3)) * 2)
    a = jnp.asarray(ce_hard(np.asarray(zs), np.asarray(zs).argmax(1)))
    b = jnp.asarray(ce_hard(np.asarray(zs), np.asarray(zw).argmax(1)))
    alpha = jax.nn.sigmoid((a - b) / HP.tau_a)
    own = jax.nn.one_hot(jnp.argmax(zs, 1), 3)

    def fixed(z):
        kd = family("kd", z, zw, 0.5)
        return jnp.sum((1 - alpha) * kd - alpha * jnp.sum(own * jax.nn.log_softmax(z), 1))

    np.testing.assert_allclose(jax.grad(lambda z: family("adaptconf", z, zw, 0.5).sum())(zs), jax.grad(fixed)(zs),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("row, message", [
    (Coeffs(weak_soft=-0.5, weak_hard=1.5), "weak_soft = -0.5 is negative"),
    (Coeffs(weak_soft=0.5, weak_hard=0.4), "sum to 0.9"),
    (Coeffs(weak_soft=1.0, t_squared=0.5), "t_squared = 0.5; it is a switch"),
    (Coeffs(weak_soft=1.0, schedule=0.7, adaptive=0.6), "at most 1"),
    (Coeffs(weak_soft=0.5, truth=0.5), "truth = 0.5"),
    (Coeffs(weak_soft=float("nan"), weak_hard=1.0), "not a finite number"),
])
def test_a_bad_row_is_refused_naming_the_field(row, message):
    with pytest.raises(ValueError, match=message):
        check_coeffs("mine", row)


def test_a_mixed_row_is_the_mix_of_its_parts():
    """A user's row is the weighted sum of the parts' losses (here half KD's soft part, half CE's hard labels)."""
    rng = np.random.default_rng(6)
    zs, zw = jnp.asarray(rng.normal(size=(5, 4)) * 2), jnp.asarray(rng.normal(size=(5, 4)) * 2)
    row = check_coeffs("half", Coeffs(weak_soft=0.5, weak_hard=0.5))
    got = family_loss(zs, zw, jnp.zeros(5, jnp.int32), row, progress=0.5, hp=HP)
    want = 0.5 * np_cpl(np.asarray(zs), np.asarray(zw), 0.5, HP) + 0.5 * np_ce(np.asarray(zs), np.asarray(zw), 0.5, HP)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)
