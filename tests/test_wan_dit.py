"""WanDiT (Flax NNX) against diffusers' WanTransformer3DModel and a PyTorch SAMA reference, after
converting the PyTorch weights with our converter; sharding, precision, remat and attention paths.

Error metric throughout: max|ours - ref| / max|ref| (rel_err)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.torch import save_file
from wan_reference import (
    SamaExtras,
    diffusers_forward,
    official_state_dict,
    options,
    rel_err,
    sama_reference_forward,
    save_diffusers_layout,
    tiny_diffusers_wan,
)

from convert_wan_weights import dit as convert_dit
from sama_jax import presets, sharding
from sama_jax.models import attention as attn_lib
from sama_jax.models import rope
from sama_jax.models.wan_dit import WanDiT, WanDiTConfig, load_dit, save_dit
from sama_jax.tensor_source import TensorSource

TEXT_LEN = 8


def _convert(path, out, **kw):
    convert_dit.convert(TensorSource(str(path)), str(out), options(text_len=TEXT_LEN, **kw))
    return load_dit(str(out))


def _inputs(rng, batch, frames, height, width, text_dim, text_tokens=5):
    latents = rng.standard_normal((batch, frames, height, width, 16)).astype(np.float32)
    timesteps = rng.uniform(0, 1000, batch).astype(np.float32)
    text = rng.standard_normal((batch, text_tokens, text_dim)).astype(np.float32)
    return latents, timesteps, text


def _padded(text):
    return np.pad(text, ((0, 0), (0, TEXT_LEN - text.shape[1]), (0, 0)))


@pytest.mark.parametrize(
    "heads,layers,shape",
    [
        (3, 2, (2, 3, 4, 6)),  # odd head count, non-square latents, batch 2
        (5, 3, (3, 2, 6, 4)),  # odd head count, tall latents, batch 3
    ],
)
def test_t2v_matches_diffusers_from_both_layouts(tmp_path, rng, heads, layers, shape):
    torch_model = tiny_diffusers_wan(num_heads=heads, num_layers=layers)
    save_diffusers_layout(torch_model, tmp_path / "diffusers")
    save_file(official_state_dict(torch_model), str(tmp_path / "official.safetensors"))
    from_diffusers = _convert(tmp_path / "diffusers", tmp_path / "a", allow_base_wan=True)
    from_official = _convert(
        tmp_path / "official.safetensors", tmp_path / "b", allow_base_wan=True, num_heads=heads
    )

    latents, timesteps, text = _inputs(rng, *shape, text_dim=24)
    reference = diffusers_forward(torch_model, latents, timesteps, _padded(text))
    for model in (from_diffusers, from_official):
        velocity, semantic = model(jnp.asarray(latents), jnp.asarray(timesteps), jnp.asarray(text))
        assert semantic is None
        assert velocity.shape == latents.shape
        assert rel_err(velocity, reference) < 1e-5


@pytest.mark.parametrize("semantic_rope", ["zero", "identity"])
def test_sama_path_matches_pytorch_reference(tmp_path, rng, semantic_rope):
    torch_model = tiny_diffusers_wan(num_heads=3, num_layers=2)
    extras = SamaExtras(dim=48, semantic_dim=20, hidden_dim=28)
    save_file(official_state_dict(torch_model, extras), str(tmp_path / "sama.safetensors"))
    model = _convert(tmp_path / "sama.safetensors", tmp_path / "ckpt", num_heads=3)
    loaded = load_dit(str(tmp_path / "ckpt"))
    # semantic_rope is a run-time variant of the same weights: rebuild with it, keep the parameters.
    model = WanDiT(dataclasses.replace(loaded.cfg, semantic_rope=semantic_rope), rngs=nnx.Rngs(0))
    nnx.update(model, nnx.state(loaded))

    target, timesteps, text = _inputs(rng, 2, 3, 4, 6, text_dim=24)
    source = rng.standard_normal(target.shape).astype(np.float32)
    semantic = rng.standard_normal((2, 5, 20)).astype(np.float32)
    ref_velocity, ref_semantic = sama_reference_forward(
        torch_model, extras, target, timesteps, _padded(text), source, semantic, semantic_rope
    )
    velocity, semantic_velocity = model(*map(jnp.asarray, (target, timesteps, text, source, semantic)))
    assert velocity.shape == target.shape and semantic_velocity.shape == semantic.shape
    assert rel_err(velocity, ref_velocity) < 1e-5
    assert rel_err(semantic_velocity, ref_semantic) < 1e-5
    if semantic_rope == "zero":
        # The other RoPE choice for semantic tokens is a different model: the test can tell them apart.
        other, _ = sama_reference_forward(
            torch_model, extras, target, timesteps, _padded(text), source, semantic, "identity"
        )
        assert rel_err(other, ref_velocity) > 1e-3


def test_zero_phasors_zero_qk_and_uniform_attention(rng):
    q = jnp.asarray(rng.standard_normal((1, 4, 2, 16)), jnp.float32)
    cos, sin = rope.constant_phasors(4, 16, "zero")
    assert np.all(np.asarray(rope.apply_rope(q, cos, sin)) == 0.0)
    cos, sin = rope.constant_phasors(4, 16, "identity")
    np.testing.assert_array_equal(np.asarray(rope.apply_rope(q, cos, sin)), np.asarray(q))
    # A zero query attends uniformly: its output is the mean of the values.
    v = jnp.asarray(rng.standard_normal((1, 7, 2, 16)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 7, 2, 16)), jnp.float32)
    out = attn_lib.attention(jnp.zeros((1, 1, 2, 16)), k, v, "xla")
    np.testing.assert_allclose(np.asarray(out[0, 0]), np.asarray(v[0].mean(0)), rtol=1e-6, atol=1e-6)


def test_rope_split_and_frequencies():
    assert rope.axis_dims(128) == (44, 42, 42)
    assert rope.axis_dims(16) == (8, 4, 4)
    angles = rope.grid_angles((2, 3, 4), 16)
    assert angles.shape == (24, 8)
    token = 1 * 12 + 2 * 4 + 3  # f=1, h=2, w=3 in (f, h, w) order
    expected = np.concatenate(
        [
            1 * 10000.0 ** (-np.arange(0, 8, 2) / 8),
            2 * 10000.0 ** (-np.arange(0, 4, 2) / 4),
            3 * 10000.0 ** (-np.arange(0, 4, 2) / 4),
        ]
    )
    np.testing.assert_allclose(angles[token], expected, rtol=1e-12)


def _tiny_sama_model(seed=0, **overrides):
    cfg = WanDiTConfig(**presets.DIT["tiny"], **overrides)
    model = WanDiT(cfg, rngs=nnx.Rngs(seed))
    # Nonzero segment embedding so that the segment path is exercised.
    model.segment_embedding.value = 0.1 * jax.random.normal(
        jax.random.key(seed + 1), model.segment_embedding.value.shape
    )
    return model


def _tiny_batch(rng, batch=4, shape=(2, 4, 4)):
    cfg = presets.DIT["tiny"]
    return (
        jnp.asarray(rng.standard_normal((batch, *shape, 16)), jnp.float32),
        jnp.asarray(rng.uniform(0, 1000, batch), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, 6, cfg["text_dim"])), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, *shape, 16)), jnp.float32),
        jnp.asarray(rng.standard_normal((batch, 4, cfg["semantic_dim"])), jnp.float32),
    )


@pytest.mark.parametrize(
    "mesh_axes",
    [
        dict(fsdp=8),
        dict(data=2, fsdp=2, tensor=2),
        dict(data=2, context=2, tensor=2),
        dict(fsdp=2, tensor=4),
    ],
)
def test_sharded_forward_equals_unsharded(rng, mesh_axes):
    model = _tiny_sama_model()
    batch = _tiny_batch(rng, batch=8 if "fsdp" in mesh_axes and mesh_axes["fsdp"] == 8 else 4)
    forward = nnx.jit(lambda m, *a: m(*a))
    ref_v, ref_s = forward(model, *batch)

    mesh = sharding.create_mesh(dict(ici=mesh_axes))
    rules = sharding.DEFAULT_RULES
    sharding.shard_module(model, mesh, rules)
    batch = sharding.shard_batch([np.asarray(b) for b in batch], mesh, rules)
    with sharding.use_mesh(mesh, rules):
        v, s = forward(model, *batch)
    kernel = model.blocks.ffn.fc1.kernel.value
    expected = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_mesh_spec(("layers", "embed", "mlp"), rules)
    )
    assert kernel.sharding.is_equivalent_to(expected, kernel.ndim)
    assert rel_err(v, ref_v) < 1e-5 and rel_err(s, ref_s) < 1e-5


def test_remat_policies_give_the_same_gradients(rng):
    batch = _tiny_batch(rng, batch=2)

    def grads(remat):
        model = _tiny_sama_model(remat=remat)

        def loss(m):
            v, s = m(*batch)
            return jnp.mean(v**2) + 0.1 * jnp.mean(jnp.abs(s))

        return nnx.to_pure_dict(nnx.jit(nnx.grad(loss))(model))

    ref = grads("none")
    for policy in ("full", "attention"):
        other = grads(policy)
        for a, b in zip(jax.tree.leaves(other), jax.tree.leaves(ref)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)
    assert float(jnp.abs(ref["blocks"]["self_attn"]["q"]["kernel"]).max()) > 0


def test_precision_policy(rng):
    batch = _tiny_batch(rng, batch=2)
    forward = nnx.jit(lambda m, *a: m(*a))
    fp32 = _tiny_sama_model()
    ref_v, ref_s = forward(fp32, *batch)
    state = nnx.state(fp32, nnx.Param)
    results = {}
    for name, overrides in {
        "bf16 compute, fp32 residual": dict(compute_dtype="bfloat16"),
        "all bf16": dict(compute_dtype="bfloat16", residual_dtype="bfloat16", param_dtype="bfloat16"),
    }.items():
        model = _tiny_sama_model(**overrides)
        nnx.update(model, jax.tree.map(lambda a, b: a.astype(b.dtype), state, nnx.state(model, nnx.Param)))
        v, s = forward(model, *batch)
        results[name] = (v.dtype, rel_err(v, ref_v), rel_err(s, ref_s))
    assert results["bf16 compute, fp32 residual"][0] == jnp.float32
    assert results["all bf16"][0] == jnp.bfloat16
    assert model.blocks.ffn.fc1.kernel.value.dtype == jnp.bfloat16
    for _dtype, err_v, err_s in results.values():
        assert 1e-5 < err_v < 5e-2 and err_s < 5e-2, results


def test_attention_dispatch(rng):
    assert attn_lib.resolve_implementation("auto", jnp.bfloat16) == "xla"  # CPU backend here
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attn_lib.resolve_implementation("flash", jnp.float32)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 3, 128)), jnp.float32) for n in (70, 50, 50))
    with pytest.raises(ValueError, match="cuDNN attention needs bfloat16"):
        attn_lib.attention(q, k, v, "cudnn")
    # The TPU kernel in Pallas interpret mode, with padding of both lengths to its 128-token tiles.
    reference = attn_lib.attention(q, k, v, "xla")
    splash = attn_lib.attention(q, k, v, "splash", splash_interpret=True)
    assert rel_err(splash, reference) < 1e-5
    # Under a mesh the kernel runs per shard: batch, query length and heads split, keys gathered.
    mesh = sharding.create_mesh(dict(ici=dict(data=2, context=2, tensor=2)))
    q4, k4, v4 = (jnp.concatenate([t, t[..., :1, :]], axis=2) for t in (q, k, v))  # 4 heads
    with sharding.use_mesh(mesh, sharding.DEFAULT_RULES):
        sharded = jax.jit(lambda *a: attn_lib.attention(*a, "splash", splash_interpret=True))(q4, k4, v4)
    assert sharded.sharding.spec == jax.sharding.PartitionSpec("data", "context", "tensor")
    assert rel_err(sharded, attn_lib.attention(q4, k4, v4, "xla")) < 1e-5


def test_save_load_round_trip_and_mesh_load(tmp_path, rng):
    model = _tiny_sama_model()
    batch = _tiny_batch(rng, batch=2)
    save_dit(str(tmp_path / "ckpt"), model)
    forward = nnx.jit(lambda m, *a: m(*a))
    ref_v, ref_s = forward(model, *batch)
    loaded = load_dit(str(tmp_path / "ckpt"))
    assert loaded.cfg == model.cfg
    v, s = forward(loaded, *batch)
    np.testing.assert_array_equal(np.asarray(v), np.asarray(ref_v))
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=2, tensor=4)))
    on_mesh = load_dit(str(tmp_path / "ckpt"), mesh=mesh, precision=dict(param_dtype="bfloat16"))
    kernel = on_mesh.blocks.self_attn.q.kernel.value
    assert kernel.dtype == jnp.bfloat16
    expected = jax.sharding.NamedSharding(
        mesh, sharding.logical_to_mesh_spec(("layers", "embed", "heads"), sharding.DEFAULT_RULES)
    )
    assert kernel.sharding.is_equivalent_to(expected, kernel.ndim)


def test_bad_inputs_are_named(rng):
    model = _tiny_sama_model()
    latents, t, text, _, semantic = _tiny_batch(rng, batch=1)
    with pytest.raises(ValueError, match="divisible by patch"):
        model(latents[:, :, :3], t, text)
    with pytest.raises(ValueError, match="expected \\(B, L <= 16, 32\\)"):
        model(latents, t, jnp.zeros((1, 17, 32)))
    with pytest.raises(ValueError, match="semantic_tokens of shape"):
        model(latents, t, text, semantic_tokens=semantic[..., :5])
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        WanDiTConfig(**dict(presets.DIT["tiny"], num_heads=3))


@pytest.mark.parametrize("preset,wan_params", [("wan_1_3b", 1_418_996_800), ("wan_14b", 14_288_491_584)])
def test_full_size_presets_have_the_released_parameter_counts(preset, wan_params):
    from sama_jax.models.wan_dit import abstract_dit

    model = abstract_dit(WanDiTConfig(**presets.DIT[preset]))
    sizes = {
        jax.tree_util.keystr(path): int(np.prod(leaf.shape))
        for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]
    }
    sama = sum(
        n
        for key, n in sizes.items()
        if key.startswith(("['segment_embedding']", "['siglip_feat_mlp']", "['semantic_head']"))
    )
    dim = presets.DIT[preset]["dim"]
    assert sama == 3 * dim + (2 * 1152 + 1152 * 1024 + 1024 + 1024 * dim + dim) + (
        2 * dim + dim * 1152 + 1152
    )
    assert sum(sizes.values()) - sama == wan_params
