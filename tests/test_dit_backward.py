"""The DiT's hand-written backward passes (GELU-tanh, LayerNorm/RMSNorm statistics) equal autodiff
of the formulas they replace, and keep fewer residuals for the backward."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
# jax exports print_saved_residuals only; the list behind it lives in jax._src.
from jax._src.ad_checkpoint import saved_residuals

from sama_jax.models import wan_dit


def _plain_norm(x, eps, center):
    x = x.astype(jnp.float32)
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    return x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)


@pytest.mark.parametrize("center", [True, False])
def test_normalize_gradient_equals_autodiff(rng, center):
    x = jnp.asarray(3.0 * rng.standard_normal((2, 5, 64)) + 1.0, jnp.float32)
    cot = jnp.asarray(rng.standard_normal(x.shape), jnp.float32)
    ours = lambda x: jnp.sum(wan_dit._normalize(x, 1e-6, center) * cot)
    plain = lambda x: jnp.sum(_plain_norm(x, 1e-6, center) * cot)
    np.testing.assert_allclose(ours(x), plain(x), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(plain)(x), rtol=1e-4, atol=1e-6)
    bf16 = jax.grad(lambda x: jnp.sum(wan_dit._normalize(x, 1e-6, center)))(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    # One (tokens x dim) residual (the output, which the next op keeps anyway) instead of three.
    scale = jnp.ones((64,))
    big = lambda norm: sum(r.shape == x.shape for r, _ in saved_residuals(
        lambda x, scale: jnp.sum(norm(x, 1e-6, center) * scale), x, scale))
    assert big(wan_dit._normalize) == 1 and big(_plain_norm) >= 2, (
        big(wan_dit._normalize), big(_plain_norm))


def test_gelu_tanh_gradient_equals_autodiff(rng):
    x = jnp.asarray(np.concatenate([np.linspace(-8, 8, 401), 3 * rng.standard_normal(200)]),
                    jnp.float32)
    plain = lambda x: jax.nn.gelu(x, approximate=True)
    np.testing.assert_array_equal(wan_dit.gelu_tanh(x), plain(x))
    np.testing.assert_allclose(jax.vmap(jax.grad(wan_dit.gelu_tanh))(x),
                               jax.vmap(jax.grad(plain))(x), rtol=1e-5, atol=1e-6)
    bf16 = jax.grad(lambda x: jnp.sum(wan_dit.gelu_tanh(x)))(x.astype(jnp.bfloat16))
    assert bf16.dtype == jnp.bfloat16
    count = lambda f: sum(r.shape == x.shape for r, _ in saved_residuals(lambda x: jnp.sum(f(x)), x))
    assert count(wan_dit.gelu_tanh) == 1 and count(plain) >= 3


@pytest.mark.slow          # two compiles of a forward+backward: ~40 s on 2 loaded cores
def test_python_loop_over_layers_equals_scan(rng):
    from flax import nnx

    from sama_jax import presets

    batch = (jnp.asarray(rng.standard_normal((2, 2, 4, 4, 16)), jnp.float32),
             jnp.asarray([100.0, 900.0], jnp.float32),
             jnp.asarray(rng.standard_normal((2, 6, 32)), jnp.float32))

    def value_and_grads(scan_layers):
        cfg = wan_dit.WanDiTConfig(**presets.DIT["tiny"], scan_layers=scan_layers)
        loss = lambda m: jnp.mean(m(*batch)[0] ** 2)
        value, grads = nnx.jit(nnx.value_and_grad(loss))(wan_dit.WanDiT(cfg, rngs=nnx.Rngs(0)))
        return value, nnx.to_pure_dict(grads)

    (v_scan, g_scan), (v_loop, g_loop) = value_and_grads(True), value_and_grads(False)
    np.testing.assert_allclose(v_loop, v_scan, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(g_loop), jax.tree.leaves(g_scan)):
        # Same math, different fusion: fp32 reassociation only.
        assert np.max(np.abs(a - b)) <= 1e-5 * np.max(np.abs(b)) + 1e-12
    assert float(jnp.abs(g_loop["blocks"]["ffn"]["fc1"]["kernel"]).max()) > 0
