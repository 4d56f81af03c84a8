"""Context parallelism of the DiT's self-attention (Ulysses all-to-all and ring) on 8 simulated CPU
devices: the sharded kernels and the whole SAMA forward and gradients equal the unsharded model.

Error metric: max|ours - ref| / max|ref| (rel_err)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sama_jax import flow_matching, presets, sharding
from sama_jax.models import attention as attn_lib
from sama_jax.models.wan_dit import WanDiT, WanDiTConfig
from test_wan_dit_reference import rel_err

# SAMA's token layout at tiny size: source 2x2x2 + 65 semantic (zero RoPE) + target 2x2x2 = 81
# tokens, divisible by none of the context sizes 2, 4, 8.
LATENT_SHAPE = (2, 4, 4)
NUM_SEMANTIC = 65


def _mesh(**axes):
    """A mesh over the first prod(axes) of the 8 devices."""
    return sharding.create_mesh(dict(ici=axes), jax.devices()[:int(np.prod(list(axes.values())))])


def _qkv(rng, batch=2, length=13, heads=4, dim=8):
    return tuple(jnp.asarray(rng.standard_normal((batch, length, heads, dim)), jnp.float32)
                 for _ in range(3))


@pytest.mark.parametrize("mesh_axes,heads,mode", [
    (dict(context=2, tensor=4), 8, "ulysses"),
    pytest.param(dict(context=8), 6, "ring", marks=pytest.mark.slow),
    (dict(data=2, context=4), 6, "ring"),
    pytest.param(dict(context=4, tensor=2), 8, "ulysses", marks=pytest.mark.slow),
])
def test_self_attention_kernels_match_masked_reference(rng, mesh_axes, heads, mode):
    """13 real tokens padded to 16: padded keys are masked out, forward and gradients unchanged."""
    q, k, v = _qkv(rng, heads=heads)
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    real = 13

    def loss(fn, q, k, v):
        return jnp.sum(fn(q, k, v)[:, :real] * cot[:, :real])

    ref_fn = lambda q, k, v: attn_lib.attention(q, k, v, "xla")
    ref_out = ref_fn(q, k, v)
    ref_grads = jax.grad(lambda *a: loss(ref_fn, *a), argnums=(0, 1, 2))(q, k, v)

    pad = lambda t: jnp.pad(t, ((0, 0), (0, 3), (0, 0), (0, 0)), constant_values=7.0)
    sharded_fn = lambda q, k, v: attn_lib.self_attention(q, k, v, "xla", mode, kv_valid=real)
    with sharding.use_mesh(_mesh(**mesh_axes), sharding.DEFAULT_RULES):
        assert attn_lib.resolve_context_parallel("auto", heads) == mode
        out = jax.jit(sharded_fn)(*map(pad, (q, k, v)))
        grads = jax.jit(jax.grad(lambda *a: loss(sharded_fn, *a), argnums=(0, 1, 2)))(
            *map(pad, (q, k, v)))
    assert rel_err(out[:, :real], ref_out) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got[:, :real], want) < 1e-5
        # Padded keys/values get exactly no gradient: nothing attended to them.
        assert float(jnp.max(jnp.abs(got[:, real:]))) == 0.0


def test_ulysses_runs_the_splash_kernel_per_device(rng):
    q, k, v = _qkv(rng, batch=1, length=40, heads=4, dim=128)
    reference = attn_lib.attention(q[:, :37], k[:, :37], v[:, :37], "xla")
    with sharding.use_mesh(_mesh(data=2, context=2, tensor=2), sharding.DEFAULT_RULES):
        out = jax.jit(lambda *a: attn_lib.self_attention(
            *a, "splash", "ulysses", kv_valid=37, splash_interpret=True))(q, k, v)
    assert rel_err(out[:, :37], reference) < 1e-5


def test_mode_choice_and_errors():
    with sharding.use_mesh(_mesh(context=4, tensor=2), sharding.DEFAULT_RULES):
        assert attn_lib.context_size() == 4
        assert attn_lib.resolve_context_parallel("auto", 8) == "ulysses"     # 4 local heads
        assert attn_lib.resolve_context_parallel("auto", 12) == "ring"       # 6 local heads
        assert attn_lib.resolve_context_parallel("auto", 3) == "ring"        # 3 heads, replicated
        with pytest.raises(ValueError, match="precision.context_parallel"):
            attn_lib.resolve_context_parallel("ulysses", 12)
        with pytest.raises(ValueError, match="not a multiple of the context axis"):
            attn_lib.self_attention(*(jnp.zeros((1, 6, 8, 4)),) * 3)
    with sharding.use_mesh(_mesh(data=2, fsdp=4), sharding.DEFAULT_RULES):
        assert attn_lib.context_size() == 1 and attn_lib.context_axes() == ()
    assert attn_lib.context_size() == 1
    with pytest.raises(ValueError, match="context_parallel 'tree'"):
        WanDiTConfig(**presets.DIT["tiny"], context_parallel="tree")


def _model(context_parallel):
    model = WanDiT(WanDiTConfig(**presets.DIT["tiny"], context_parallel=context_parallel),
                   rngs=nnx.Rngs(0))
    model.segment_embedding.value = 0.1 * jax.random.normal(jax.random.key(1),
                                                            model.segment_embedding.value.shape)
    return model


def _batch(batch=2):
    rng = np.random.default_rng(0)
    cfg = presets.DIT["tiny"]
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    return dict(target=normal(batch, *LATENT_SHAPE, 16), noise=normal(batch, *LATENT_SHAPE, 16),
                timesteps=rng.uniform(0, 1000, batch).astype(np.float32),
                text=normal(batch, 6, cfg["text_dim"]), source=normal(batch, *LATENT_SHAPE, 16),
                semantic=normal(batch, NUM_SEMANTIC, cfg["semantic_dim"]),
                semantic_noise=normal(batch, NUM_SEMANTIC, cfg["semantic_dim"]))


def _loss(model, b):
    """SAMA's training loss on a fixed noisy sample (sigma from the timestep)."""
    sigma = b["timesteps"] / 1000.0
    noisy = flow_matching.add_noise(b["target"], b["noise"], sigma)
    noisy_semantic = flow_matching.add_noise(b["semantic"], b["semantic_noise"], sigma)
    velocity, semantic_velocity = model(noisy, b["timesteps"], b["text"], b["source"], noisy_semantic)
    loss, _ = flow_matching.sama_loss(velocity, b["noise"], b["target"], semantic_velocity,
                                      b["semantic_noise"], b["semantic"])
    return loss, (velocity, semantic_velocity)


_value_and_grad = nnx.jit(nnx.value_and_grad(_loss, has_aux=True))


@pytest.fixture(scope="module")
def unsharded():
    (loss, outputs), grads = _value_and_grad(_model("auto"), _batch())
    return loss, outputs, nnx.to_pure_dict(grads)


# Two of these (~20 s each on 2 cores) run by default; the rest are marked slow.
@pytest.mark.parametrize("mesh_axes,mode", [
    pytest.param(dict(context=2), "auto", marks=pytest.mark.slow),    # ulysses, 2 heads per device
    pytest.param(dict(context=4), "ring", marks=pytest.mark.slow),
    (dict(context=8), "auto"),                                        # ring: 4 heads, 8 shards
    (dict(data=2, context=2, tensor=2), "auto"),                      # ulysses on 2 local heads
    pytest.param(dict(fsdp=2, context=4), "ulysses", marks=pytest.mark.slow),
    pytest.param(dict(fsdp=2, context=2, tensor=2), "ring", marks=pytest.mark.slow),
])
def test_sama_loss_and_gradients_match_unsharded(unsharded, mesh_axes, mode):
    ref_loss, (ref_v, ref_s), ref_grads = unsharded
    model = _model(mode)
    mesh = _mesh(**mesh_axes)
    rules = sharding.DEFAULT_RULES
    sharding.shard_module(model, mesh, rules)
    batch = sharding.shard_batch(_batch(), mesh, rules)
    with sharding.use_mesh(mesh, rules):
        (loss, (v, s)), grads = _value_and_grad(model, batch)
    assert abs(float(loss) - float(ref_loss)) < 1e-5 * abs(float(ref_loss))
    assert rel_err(v, ref_v) < 1e-5 and rel_err(s, ref_s) < 1e-5
    grads = nnx.to_pure_dict(grads)
    errors = jax.tree.map(rel_err, grads, ref_grads)
    assert max(jax.tree.leaves(errors)) < 1e-5, errors
    # The semantic tokens take part: their projector gets gradient.
    assert float(jnp.max(jnp.abs(grads["siglip_feat_mlp"]["fc1"]["kernel"]))) > 0
