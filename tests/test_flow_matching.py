import jax
import jax.numpy as jnp
import numpy as np

from sama_jax import flow_matching as fm


def test_shift_matches_the_closed_form_and_keeps_the_ends():
    s = jnp.array([0.0, 0.2, 0.5, 1.0])
    np.testing.assert_allclose(fm.shift_sigma(s, 5.0), [0.0, 1.0 / 1.8, 5.0 / 6.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(fm.shift_sigma(s, 1.0), s)


def test_sampled_sigmas_are_shifted_uniforms():
    sigma = fm.sample_sigma(jax.random.key(0), 20000, 5.0)
    assert sigma.shape == (20000,) and float(sigma.min()) > 0 and float(sigma.max()) <= 1
    # With u ~ U(0,1): P(s' <= 1/2) = P(u <= 1/6) = 1/6 for shift 5.
    assert abs(float(jnp.mean(sigma <= 0.5)) - (1 / 6 - 1 / 1000)) < 0.01


def test_noising_interpolates_per_sample():
    x0 = jnp.ones((2, 3, 4))
    noise = jnp.full((2, 3, 4), 3.0)
    xt = fm.add_noise(x0, noise, jnp.array([0.0, 0.25]))
    np.testing.assert_allclose(xt[0], 1.0)
    np.testing.assert_allclose(xt[1], 0.75 * 1 + 0.25 * 3)


def test_loss_values():
    x0, noise = jnp.zeros((1, 4)), jnp.ones((1, 4))
    velocity = jnp.array([[1.0, 1.0, 3.0, 1.0]])  # error 2 on one of 4 -> MSE 1
    sem_x0, sem_noise = jnp.zeros((1, 2, 2)), jnp.zeros((1, 2, 2))
    sem_v = jnp.array([[[0.0, 4.0], [0.0, 0.0]]])  # L1 mean 1
    loss, metrics = fm.sama_loss(velocity, noise, x0, sem_v, sem_noise, sem_x0, semantic_weight=0.1)
    np.testing.assert_allclose(metrics["loss_fm"], 1.0)
    np.testing.assert_allclose(metrics["loss_semantic"], 1.0)
    np.testing.assert_allclose(loss, 1.1)
    loss, metrics = fm.sama_loss(velocity, noise, x0)
    assert set(metrics) == {"loss_fm", "loss"} and float(loss) == 1.0


def test_invalid_samples_contribute_nothing():
    x0, noise = jnp.zeros((3, 2)), jnp.ones((3, 2))
    velocity = jnp.array([[1.0, 1.0], [9.0, 9.0], [1.0, 3.0]])  # per-sample MSE 0, 64, 2
    valid = jnp.array([True, False, True])
    loss, metrics = fm.sama_loss(velocity, noise, x0, valid=valid)
    np.testing.assert_allclose(loss, 1.0)
    loss, _ = fm.sama_loss(velocity, noise, x0, valid=jnp.zeros(3, bool))
    assert float(loss) == 0.0
    grad = jax.grad(lambda v: fm.sama_loss(v, noise, x0, valid=valid)[0])(velocity)
    np.testing.assert_array_equal(grad[1], 0.0)
